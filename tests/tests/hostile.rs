//! More hostile input against the real server while a good tablet keeps syncing: hundreds
//! of connections that never join, a flood of requests for random ids, a peer that claims
//! another device's peer id, and sync messages whose bloom filters automerge chokes on.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use relais_core::protocol::message::Message;
use relais_core::DocumentId;
use relais_tests::*;
use tokio_tungstenite::tungstenite::Message as Ws;

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|v| v.parse().unwrap_or(0)))
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_and_request_floods_do_not_disturb_a_good_tablet() {
    let (dir, data, token) = seeded_data_dir();
    let server = Server::start(&data, &[]);
    let good = replica(dir.path(), "good");
    good.sync(&server.url(), &token).await.unwrap();
    let before = rss_kb(server.pid());

    // 300 connections that authenticate and never send join.
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(ws_open(&server.url(), &token).await);
    }
    // One connection floods 20,000 requests for random ids.
    let mut flood = ws_joined(&server.url(), &token, "flooder").await;
    let n = 20_000;
    let sender = tokio::spawn(async move {
        for _ in 0..n {
            let id = DocumentId::random().to_string();
            if flood
                .send(Ws::Binary(request_frame("flooder", &id).into()))
                .await
                .is_err()
            {
                break;
            }
        }
        // Every request is answered doc-unavailable (or the connection is cut): count them.
        let mut unavailable = 0;
        while unavailable < n {
            match tokio::time::timeout(Duration::from_secs(30), flood.next()).await {
                Ok(Some(Ok(Ws::Binary(b)))) => {
                    if matches!(Message::decode(&b), Ok(Message::DocUnavailable { .. })) {
                        unavailable += 1;
                    }
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        unavailable
    });
    // Meanwhile the good tablet registers and syncs, several times.
    for i in 0..5 {
        good.ledger()
            .register(household("SOC-01", &format!("During the flood {i}")))
            .unwrap();
        let s = good.sync(&server.url(), &token).await.unwrap();
        assert_eq!(s.documents_sent, 1);
    }
    let answered = sender.await.unwrap();
    assert_eq!(
        answered, n,
        "every flooded request answered doc-unavailable"
    );
    let after = rss_kb(server.pid());
    eprintln!("server RSS {before} kB before, {after} kB with 300 silent connections and a 20,000-request flood");
    assert!(
        after < before + 150_000,
        "memory must stay bounded: {before} kB -> {after} kB"
    );
    drop(silent);
    assert_eq!(
        http(server.addr, "GET", "/healthz", None, None).0,
        200,
        "still healthy"
    );
    assert!(server.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_claiming_another_devices_peer_id_gets_only_its_own_scope() {
    let (dir, data, admin) = seeded_data_dir();
    let server = Server::start(&data, &[]);
    let token = |name: &str, site: &str| {
        let body = format!(r#"{{"name":"{name}","role":"enumerator","sites":["{site}"]}}"#);
        let (s, t) = http(
            server.addr,
            "POST",
            "/api/v1/tokens",
            Some(&admin),
            Some(&body),
        );
        assert_eq!(s, 201);
        serde_json::from_str::<serde_json::Value>(&t).unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mopti = token("tab-mopti", "SOC-01");
    let gao = token("tab-gao", "GAO-01");
    let real = replica(dir.path(), "real");
    real.sync(&server.url(), &mopti).await.unwrap();
    let h = real
        .ledger()
        .register(household("SOC-01", "Kept in Mopti"))
        .unwrap();
    // The Gao device joins under the Mopti tablet's peer id, while the Mopti tablet is
    // connected too, then asks for the Mopti household.
    let mut imposter = ws_joined(&server.url(), &gao, real.peer_id()).await;
    real.sync(&server.url(), &mopti).await.unwrap();
    imposter
        .send(Ws::Binary(
            request_frame(real.peer_id(), &h.to_string()).into(),
        ))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), imposter.next()).await {
            Ok(Some(Ok(Ws::Binary(b)))) => {
                let m = Message::decode(&b).unwrap();
                assert!(
                    matches!(m, Message::DocUnavailable { .. }),
                    "the imposter got {m:?}"
                );
                break;
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no answer: {other:?}"),
        }
    }
    // The real tablet is undisturbed: its edits still reach the server.
    real.ledger()
        .distribute_on(h, "JP-2023", "nfi-kit", 1, "2023-07-10")
        .unwrap();
    let s = real.sync(&server.url(), &mopti).await.unwrap();
    assert_eq!(s.documents_sent, 1);
    assert!(server.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bloom_filter_that_would_crash_automerge_costs_only_its_own_connection() {
    use automerge::sync::{BloomFilter, SyncDoc};
    use relais_core::protocol::message::DocMessage;
    let (dir, data, token) = seeded_data_dir();
    let server = Server::start(&data, &[]);
    let good = replica(dir.path(), "good");
    good.sync(&server.url(), &token).await.unwrap();
    let h = good
        .ledger()
        .register(household("SOC-01", "Held on the server"))
        .unwrap();
    good.sync(&server.url(), &token).await.unwrap();
    // Filters a stock peer could send: entries but no bits (automerge 0.12 divides by
    // zero when it replies), and four billion probes per hash.
    for bloom in [
        &[1u8, 0, 7][..],
        &[1, 10, 0xff, 0xff, 0xff, 0xff, 0x0f, 0xff, 0x03],
    ] {
        let mut doc = automerge::Automerge::new();
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            use automerge::transaction::Transactable;
            tx.put(automerge::ROOT, "offline", 1)?;
            Ok(())
        })
        .unwrap();
        let mut message = doc
            .generate_sync_message(&mut automerge::sync::State::new())
            .unwrap();
        message.have[0].bloom = BloomFilter::try_from(bloom).unwrap();
        let frame = Message::Sync(DocMessage {
            sender_id: "hostile".into(),
            target_id: "server".into(),
            document_id: h.to_string(),
            data: message.encode(),
        });
        let mut hostile = ws_joined(&server.url(), &token, "hostile").await;
        hostile
            .send(Ws::Binary(frame.encode().into()))
            .await
            .unwrap();
        let reason = loop {
            match tokio::time::timeout(Duration::from_secs(20), hostile.next()).await {
                Ok(Some(Ok(Ws::Binary(b)))) => {
                    if let Ok(Message::Error { message }) = Message::decode(&b) {
                        break message;
                    }
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("no error for the hostile peer: {other:?}"),
            }
        };
        assert!(reason.contains("bloom filter"), "{reason}");
        // The server goes on: the good tablet's next registration still arrives.
        good.ledger()
            .register(household("SOC-01", "Registered after"))
            .unwrap();
        let s = good.sync(&server.url(), &token).await.unwrap();
        assert_eq!(s.documents_sent, 1);
    }
    assert_eq!(http(server.addr, "GET", "/healthz", None, None).0, 200);
    assert!(server.stop().success());
}
