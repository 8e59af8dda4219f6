//! Scale probe for `relais serve`: a store of N household documents and M connected devices.
//!
//! `cargo run --release -p relais-tests --example load_probe -- 100000 1000`
//! (raise `ulimit -n` first). Prints server RSS at each stage and the time a tablet takes to
//! sync while everyone is connected. Results go to BENCHMARKS.md by hand.

use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use relais_core::document::{DocInfo, DocKind};
use relais_core::protocol::message::{DocMessage, Message, PeerMetadata};
use relais_core::store::{DocWrite, Store};
use relais_core::DocumentId;
use relais_tests::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;

fn rss_mb(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let m: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1_000);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    seed_reference(&data);
    let admin = create_token(&data, "admin", &["--role", "admin"]);
    let tablet = create_token(&data, "tab", &["--role", "enumerator", "--sites", "SOC-02"]);

    // N households at SOC-01, written in batches (one template household's bytes, each under
    // its own id: realistic size, quick to make).
    let t = Instant::now();
    let ids = {
        let tmp = replica(dir.path(), "template");
        let site = relais_core::site::Site {
            code: "SOC-01".into(),
            name: "Socoura".into(),
            kind: relais_core::site::SiteKind::OfficialSite,
            admin1: "Mopti".into(),
            admin2: "Mopti".into(),
            admin3: None,
        };
        tmp.ledger().put_site(&site).unwrap();
        let h = tmp
            .ledger()
            .register(household("SOC-01", "Template"))
            .unwrap();
        let doc = tmp.ledger().store().load(h).unwrap().unwrap().doc;
        drop(tmp);
        let store = Store::open(data.join("relais.redb")).unwrap();
        let info = DocInfo {
            kind: DocKind::Household,
            sites: vec!["SOC-01".into()],
            regions: vec!["Mopti".into()],
            erased: false,
        };
        let mut ids = Vec::with_capacity(n);
        let mut batch = Vec::new();
        for _ in 0..n {
            let id = DocumentId::random();
            ids.push(id);
            batch.push(DocWrite::from_doc(id, info.clone(), &doc, vec![]));
            if batch.len() == 5_000 {
                store.write(&batch).unwrap();
                batch.clear();
            }
        }
        store.write(&batch).unwrap();
        ids
    };
    println!("stored {n} households in {:.1?}", t.elapsed());

    let server = Server::start(&data, &[]);
    let pid = server.pid();
    println!("server started: RSS {:.1} MB", rss_mb(pid));

    let t = Instant::now();
    let mut conns = Vec::with_capacity(m);
    for i in 0..m {
        let mut req = server.url().into_client_request().unwrap();
        req.headers_mut()
            .insert("Authorization", format!("Bearer {admin}").parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let join = Message::Join {
            sender_id: format!("probe-{i}"),
            supported_protocol_versions: vec!["1".into()],
            peer_metadata: PeerMetadata::default(),
        };
        ws.send(Ws::Binary(join.encode().into())).await.unwrap();
        let _peer = ws.next().await;
        conns.push(ws);
    }
    println!(
        "{m} devices connected in {:.1?}: RSS {:.1} MB",
        t.elapsed(),
        rss_mb(pid)
    );

    // Each device asks for a few households, so the server loads and serves them.
    let t = Instant::now();
    let empty = {
        use automerge::sync::SyncDoc;
        automerge::Automerge::new()
            .generate_sync_message(&mut automerge::sync::State::new())
            .unwrap()
            .encode()
    };
    let per = 5;
    for (i, ws) in conns.iter_mut().enumerate() {
        for k in 0..per {
            let id = ids[(i * per + k * 7919) % ids.len()];
            let msg = Message::Request(DocMessage {
                sender_id: format!("probe-{i}"),
                target_id: "s".into(),
                document_id: id.to_string(),
                data: empty.clone(),
            });
            ws.send(Ws::Binary(msg.encode().into())).await.unwrap();
        }
    }
    let mut replies = 0;
    for ws in conns.iter_mut() {
        for _ in 0..per {
            if let Some(Ok(Ws::Binary(_))) = ws.next().await {
                replies += 1;
            }
        }
    }
    println!(
        "{} requests answered ({replies} replies) in {:.1?}: RSS {:.1} MB",
        m * per,
        t.elapsed(),
        rss_mb(pid)
    );

    // A tablet registers and syncs while everyone is connected.
    let tab = replica(dir.path(), "tab");
    let t = Instant::now();
    tab.sync(&server.url(), &tablet).await.unwrap();
    for i in 0..20 {
        tab.ledger()
            .register(household("SOC-02", &format!("new {i}")))
            .unwrap();
    }
    let s = tab.sync(&server.url(), &tablet).await.unwrap();
    println!(
        "tablet: provisioned and pushed 20 households in {:.1?} ({} B out): RSS {:.1} MB",
        t.elapsed(),
        s.bytes_sent,
        rss_mb(pid)
    );
    let (_, metrics) = http(server.addr, "GET", "/metrics", None, None);
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("relais_") && !l.contains("bucket"))
    {
        println!("  {l}");
    }
    drop(conns);
}
