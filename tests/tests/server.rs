//! The real `relais` binary, real WebSockets on loopback: convergence, restarts, auth, and
//! hostile input that must never take the server down.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use relais_core::protocol::message::{DocMessage, Message, PeerMetadata};
use relais_tests::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message as Ws};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_converge_and_a_double_handout_shows_on_both() {
    let (dir, data, token) = seeded_data_dir();
    let server = Server::start(&data, &[]);
    let a = replica(dir.path(), "tab-a");
    let b = replica(dir.path(), "tab-b");
    a.sync(&server.url(), &token).await.unwrap();
    b.sync(&server.url(), &token).await.unwrap();
    let h = a
        .ledger()
        .register(household("SOC-01", "Aminata Traoré"))
        .unwrap();
    a.sync(&server.url(), &token).await.unwrap();
    b.sync(&server.url(), &token).await.unwrap();
    // Both offline: different fields of the same household, and the same kit.
    a.ledger()
        .update(
            h,
            &relais_core::household::HouseholdUpdate {
                origin: Some("Ségou".into()),
                ..Default::default()
            },
        )
        .unwrap();
    b.ledger()
        .update(
            h,
            &relais_core::household::HouseholdUpdate {
                contact: Some("+223".into()),
                ..Default::default()
            },
        )
        .unwrap();
    a.ledger()
        .distribute_on(h, "JP-2023", "nfi-kit", 1, "2023-07-10")
        .unwrap();
    b.ledger()
        .distribute_on(h, "JP-2023", "nfi-kit", 1, "2023-07-11")
        .unwrap();
    a.sync(&server.url(), &token).await.unwrap();
    b.sync(&server.url(), &token).await.unwrap();
    a.sync(&server.url(), &token).await.unwrap();
    for r in [&a, &b] {
        let v = r.ledger().household(h).unwrap();
        assert_eq!(v.household.origin.as_deref(), Some("Ségou"));
        assert_eq!(v.household.contact.as_deref(), Some("+223"));
        let doubles = r.ledger().double_distributions().unwrap();
        assert_eq!(doubles.len(), 1);
        assert_eq!(doubles[0].slot.handouts.len(), 2);
    }
    assert_eq!(
        a.ledger().store().load(h).unwrap().unwrap().meta.heads,
        b.ledger().store().load(h).unwrap().unwrap().meta.heads
    );
    assert!(server.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_lose_nothing_that_was_acknowledged() {
    let (dir, data, token) = seeded_data_dir();
    let a = replica(dir.path(), "tab-a");
    let b = replica(dir.path(), "tab-b");
    let server = Server::start(&data, &[]);
    a.sync(&server.url(), &token).await.unwrap();
    let h1 = a
        .ledger()
        .register(household("SOC-01", "Before SIGTERM"))
        .unwrap();
    a.sync(&server.url(), &token).await.unwrap();
    // Graceful stop: exit code 0.
    assert!(server.stop().success());
    let server = Server::start(&data, &[]);
    let h2 = a
        .ledger()
        .register(household("SOC-01", "Before SIGKILL"))
        .unwrap();
    a.sync(&server.url(), &token).await.unwrap();
    // A sync that returned was acknowledged: it survives SIGKILL.
    server.kill();
    let server = Server::start(&data, &[]);
    b.sync(&server.url(), &token).await.unwrap();
    assert_eq!(
        b.ledger().household(h1).unwrap().household.head_name,
        "Before SIGTERM"
    );
    assert_eq!(
        b.ledger().household(h2).unwrap().household.head_name,
        "Before SIGKILL"
    );
    assert_eq!(b.ledger().list_site("SOC-01").unwrap().len(), 2);
}

async fn ws_status(url: &str, token: Option<&str>) -> u16 {
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("Authorization", format!("Bearer {t}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => 101,
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_unknown_token_is_401_before_any_protocol() {
    let (_dir, data, token) = seeded_data_dir();
    let server = Server::start(&data, &[]);
    assert_eq!(ws_status(&server.url(), None).await, 401);
    assert_eq!(ws_status(&server.url(), Some("rls_not-a-token")).await, 401);
    assert_eq!(
        ws_status(&format!("{}?token=wrong", server.url()), None).await,
        401
    );
    assert_eq!(ws_status(&server.url(), Some(&token)).await, 101);
    assert_eq!(
        ws_status(&format!("{}?token={token}", server.url()), None).await,
        101
    );
    // Plain HTTP on /sync without a token is refused the same way.
    assert_eq!(http(server.addr, "GET", "/sync", None, None).0, 401);
    assert_eq!(http(server.addr, "GET", "/healthz", None, None).0, 200);
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn raw(url: &str, token: &str) -> WsStream {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, None, false)
        .await
        .unwrap();
    ws
}

fn join() -> Vec<u8> {
    Message::Join {
        sender_id: "hostile".into(),
        supported_protocol_versions: vec!["1".into()],
        peer_metadata: PeerMetadata::default(),
    }
    .encode()
}

/// Reads until the server closes; returns the close reason (or the error text).
async fn closed_with(ws: &mut WsStream) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("server did not close the connection"),
            Ok(None) => return "eof".into(),
            Ok(Some(Err(e))) => return format!("error: {e}"),
            Ok(Some(Ok(Ws::Close(f)))) => {
                return f.map(|f| f.reason.to_string()).unwrap_or_default()
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_closes_only_that_connection() {
    let (dir, data, token) = seeded_data_dir();
    let server = Server::start(&data, &["--max-frame-bytes", "65536"]);
    let good = replica(dir.path(), "good");
    good.sync(&server.url(), &token).await.unwrap();

    let bad_sync = |data: Vec<u8>| {
        Message::Sync(DocMessage {
            sender_id: "hostile".into(),
            target_id: "srv".into(),
            document_id: relais_core::DocumentId::random().to_string(),
            data,
        })
        .encode()
    };
    let mut wrong_types = minicbor::Encoder::new(Vec::new());
    wrong_types
        .map(4)
        .unwrap()
        .str("type")
        .unwrap()
        .str("sync")
        .unwrap();
    wrong_types.str("senderId").unwrap().u32(5).unwrap();
    wrong_types.str("documentId").unwrap().array(0).unwrap();
    wrong_types.str("data").unwrap().str("not bytes").unwrap();
    let mut unknown = minicbor::Encoder::new(Vec::new());
    unknown
        .map(1)
        .unwrap()
        .str("type")
        .unwrap()
        .str("launch-missiles")
        .unwrap();

    let cases: Vec<(&str, bool, Ws, &str)> = vec![
        (
            "truncated CBOR",
            true,
            Ws::Binary(join()[..7].to_vec().into()),
            "malformed",
        ),
        (
            "random bytes",
            true,
            Ws::Binary(vec![0xff, 0x13, 0x37, 0x00, 0x99].into()),
            "malformed",
        ),
        (
            "wrong field types",
            true,
            Ws::Binary(wrong_types.into_writer().into()),
            "wrong type",
        ),
        (
            "unknown type",
            true,
            Ws::Binary(unknown.into_writer().into()),
            "unknown message type",
        ),
        (
            "bad automerge bytes",
            true,
            Ws::Binary(bad_sync(vec![0x42, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).into()),
            "automerge",
        ),
        (
            "sync before join",
            false,
            Ws::Binary(bad_sync(vec![]).into()),
            "before the handshake",
        ),
        (
            "text frame",
            true,
            Ws::Text("{\"type\":\"join\"}".into()),
            "text frames",
        ),
        (
            "oversized frame",
            true,
            Ws::Binary(vec![0u8; 70_000].into()),
            "",
        ),
    ];
    for (name, joined, frame, want) in cases {
        let mut ws = raw(&server.url(), &token).await;
        if joined {
            ws.send(Ws::Binary(join().into())).await.unwrap();
            match ws.next().await {
                Some(Ok(Ws::Binary(b))) => {
                    assert!(matches!(Message::decode(&b), Ok(Message::Peer { .. })))
                }
                other => panic!("{name}: no peer reply: {other:?}"),
            }
        }
        let _ = ws.send(frame).await;
        let reason = closed_with(&mut ws).await;
        assert!(
            reason.contains(want),
            "{name}: closed with {reason:?}, wanted {want:?}"
        );
        // Everyone else is fine.
        let h = good.ledger().register(household("SOC-01", name)).unwrap();
        good.sync(&server.url(), &token)
            .await
            .unwrap_or_else(|e| panic!("{name}: good client failed: {e}"));
        assert!(good.ledger().store().meta(h).unwrap().is_some());
    }
    assert_eq!(http(server.addr, "GET", "/healthz", None, None).0, 200);
    let (_, metrics) = http(server.addr, "GET", "/metrics", None, None);
    assert!(
        metrics.contains("relais_connections_dropped_total"),
        "{metrics}"
    );
    assert!(server.stop().success());
}

/// Stores `count` documents of `bytes` random bytes each (random, so they do not compress)
/// in the server store under `data`, and returns their ids.
fn store_blobs(data: &std::path::Path, count: usize, bytes: usize) -> Vec<relais_core::DocumentId> {
    use automerge::transaction::Transactable;
    let store = relais_core::store::Store::open(data.join("relais.redb")).unwrap();
    let writes: Vec<_> = (0..count)
        .map(|_| {
            let mut doc = automerge::Automerge::new();
            let mut tx = doc.transaction();
            let blob: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
            tx.put(automerge::ROOT, "blob", blob).unwrap();
            tx.commit();
            relais_core::store::DocWrite::from_doc(
                relais_core::DocumentId::random(),
                relais_core::document::DocInfo::other(),
                &doc,
                vec![],
            )
        })
        .collect();
    store.write(&writes).unwrap();
    writes.into_iter().map(|w| w.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_drains_is_dropped_and_others_carry_on() {
    let (dir, data, token) = seeded_data_dir();
    // Big documents, so that the stalled reader's socket buffers fill.
    store_blobs(&data, 40, 300_000);
    let ids: Vec<String> = {
        let store = relais_core::store::Store::open(data.join("relais.redb")).unwrap();
        store
            .list()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id.to_string())
            .collect()
    };
    let tablet = create_token(
        &data,
        "tab-soc",
        &["--role", "enumerator", "--sites", "SOC-01"],
    );
    let server = Server::start(&data, &["--send-buffer-bytes", "1000000"]);
    let mut slow = raw(&server.url(), &token).await;
    slow.send(Ws::Binary(join().into())).await.unwrap();
    let empty = {
        use automerge::sync::SyncDoc;
        automerge::Automerge::new()
            .generate_sync_message(&mut automerge::sync::State::new())
            .unwrap()
            .encode()
    };
    for id in &ids {
        let m = Message::Request(DocMessage {
            sender_id: "slow".into(),
            target_id: "s".into(),
            document_id: id.clone(),
            data: empty.clone(),
        });
        slow.send(Ws::Binary(m.encode().into())).await.unwrap();
    }
    // The stalled reader reads nothing; a good client syncs meanwhile.
    let good = replica(dir.path(), "good");
    tokio::time::timeout(Duration::from_secs(60), good.sync(&server.url(), &tablet))
        .await
        .unwrap()
        .unwrap();
    assert!(good.ledger().site("SOC-01").unwrap().is_some());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, metrics) = http(server.addr, "GET", "/metrics", None, None);
        if metrics
            .lines()
            .any(|l| l.starts_with("relais_connections_dropped_total") && !l.ends_with(" 0"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slow reader was never dropped:\n{}\n{metrics}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server.log().contains("send queue full"));
    // Its socket is closed, not left open holding the queue: reading what the socket had
    // buffered ends at the end of the stream, before all 40 documents.
    let received = tokio::time::timeout(Duration::from_secs(30), async {
        let mut n = 0;
        while let Some(Ok(_)) = slow.next().await {
            n += 1;
        }
        n
    })
    .await
    .expect("the dropped connection's socket was left open");
    assert!(received < ids.len(), "{received} frames");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = http(server.addr, "GET", "/metrics", None, None);
        if metrics.lines().any(|l| l == "relais_connections 0") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server.stop().success());
}

/// Connections the server counts for the device of token `device`.
fn connections_of(server: &Server, admin: &str, device: &str) -> i64 {
    let (status, body) = http(server.addr, "GET", "/api/v1/devices", Some(admin), None);
    assert_eq!(status, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == device)
        .map_or(0, |d| d["connections"].as_i64().unwrap())
}

/// A tablet that left the network's range without a reset stops answering: here, a socket
/// that is never read again, so no pong answers the server's pings. The server drops it
/// once it has heard nothing for its idle limit, instead of holding its place for ever; a
/// quiet client that still reads (tungstenite answers pings as it reads) stays through
/// several limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_went_silent_is_dropped_and_a_quiet_one_stays() {
    let (_dir, data, admin) = seeded_data_dir();
    let tablet = create_token(
        &data,
        "tab-soc",
        &["--role", "enumerator", "--sites", "SOC-01"],
    );
    let server = Server::start_env(&data, &[], &[("RELAIS_PEER_IDLE_SECS", "2")]);
    let mut quiet = joined(&server.url(), &admin).await;
    let quiet_reads = tokio::spawn(async move {
        loop {
            match quiet.next().await {
                Some(Ok(Ws::Close(f))) => return format!("closed: {f:?}"),
                None => return "eof".to_string(),
                Some(Err(e)) => return format!("error: {e}"),
                Some(Ok(_)) => {}
            }
        }
    });
    let mut silent = joined(&server.url(), &tablet).await;
    assert_eq!(connections_of(&server, &admin, "tab-soc"), 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while connections_of(&server, &admin, "tab-soc") != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the silent peer was never dropped:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its socket was closed (reading it now ends: the close frame, or the write of the pongs
    // tungstenite owes finds the socket gone), and the server says why.
    closed_with(&mut silent).await;
    assert!(
        server
            .log()
            .contains("heard nothing from the peer; closing"),
        "{}",
        server.log()
    );
    // Three more limits: the quiet client is still there, and so is its connection.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!quiet_reads.is_finished(), "{:?}", quiet_reads.await);
    assert_eq!(connections_of(&server, &admin, "admin"), 1);
    let (_, metrics) = http(server.addr, "GET", "/metrics", None, None);
    assert!(
        metrics
            .lines()
            .any(|l| l == "relais_connections_dropped_total 1"),
        "{metrics}"
    );
    assert!(server.stop().success());
}

/// Silence while a large frame is on its way is not a dead link: a peer on a slow link,
/// receiving a 300 KB document for several of the server's idle limits, keeps its
/// connection, because a frame sent gets its send budget to arrive before silence counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_receiving_a_large_frame_slowly_is_not_taken_for_gone() {
    let (_dir, data, admin) = seeded_data_dir();
    let id = store_blobs(&data, 1, 300_000)[0];
    let server = Server::start_env(&data, &[], &[("RELAIS_PEER_IDLE_SECS", "1")]);
    // About 6 s for the document: six idle limits.
    let proxy = FreezingProxy::start_throttled(server.addr, Some(50_000)).await;
    let mut ws = joined(&proxy.url(), &admin).await;
    let empty = {
        use automerge::sync::SyncDoc;
        automerge::Automerge::new()
            .generate_sync_message(&mut automerge::sync::State::new())
            .unwrap()
            .encode()
    };
    let request = |doc: String| {
        Message::Request(DocMessage {
            sender_id: "hostile".into(),
            target_id: "s".into(),
            document_id: doc,
            data: empty.clone(),
        })
        .encode()
    };
    ws.send(Ws::Binary(request(id.to_string()).into()))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("the document never arrived"),
            Ok(Some(Ok(Ws::Binary(b)))) => match Message::decode(&b) {
                Ok(Message::Sync(m)) if m.data.len() > 250_000 => break,
                _ => {}
            },
            Ok(Some(Ok(Ws::Close(f)))) => panic!("closed while receiving: {f:?}"),
            Ok(Some(Ok(_))) => {}
            other => panic!("{other:?}"),
        }
    }
    // Still connected: another request is answered.
    ws.send(Ws::Binary(
        request(relais_core::DocumentId::random().to_string()).into(),
    ))
    .await
    .unwrap();
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Ws::Binary(b)))) => {
                if matches!(Message::decode(&b), Ok(Message::DocUnavailable { .. })) {
                    break;
                }
            }
            Ok(Some(Ok(Ws::Close(f)))) => panic!("closed after receiving: {f:?}"),
            Ok(Some(Ok(_))) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(!server.log().contains("heard nothing"), "{}", server.log());
    assert!(server.stop().success());
}

async fn joined(url: &str, token: &str) -> WsStream {
    let mut ws = raw(url, token).await;
    ws.send(Ws::Binary(join().into())).await.unwrap();
    match ws.next().await {
        Some(Ok(Ws::Binary(b))) => assert!(matches!(Message::decode(&b), Ok(Message::Peer { .. }))),
        other => panic!("no peer reply: {other:?}"),
    }
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_is_honoured_and_a_bad_one_is_refused_clearly() {
    let (dir, data, token) = seeded_data_dir();
    let cfg = dir.path().join("relais.toml");
    std::fs::write(
        &cfg,
        "max-frame-bytes = 2000\nmax-loaded-docs = 100\ncache-mib = 8\n",
    )
    .unwrap();
    let server = Server::start(&data, &["--config", cfg.to_str().unwrap()]);
    let mut ws = joined(&server.url(), &token).await;
    let _ = ws.send(Ws::Binary(vec![0u8; 3_000].into())).await;
    let reason = closed_with(&mut ws).await;
    assert!(!reason.is_empty());
    drop(server);
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = 12\nno-such-option = true\n").unwrap();
    let out = relais(&[
        "serve",
        "--data",
        data.to_str().unwrap(),
        "--config",
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid config file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_adds_reference_data_and_revocation_is_immediate() {
    let (dir, data, admin) = seeded_data_dir();
    let viewer = create_token(
        &data,
        "viewer-1",
        &["--role", "viewer", "--sites", "SOC-01"],
    );
    // The same rule on the command line: a forgotten --sites fails, and makes no token.
    let d = data.to_str().unwrap();
    let out = relais(&[
        "token",
        "create",
        "--data",
        d,
        "--name",
        "tab-y",
        "--role",
        "enumerator",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs sites or regions"), "{err}");
    let listed = relais_ok(&["token", "list", "--data", d]);
    assert!(!listed.contains("tab-y"), "{listed}");
    let all = create_token(&data, "tab-all", &["--role", "viewer", "--all"]);
    assert!(!all.is_empty());
    let server = Server::start(&data, &[]);
    let site = r#"{"code":"SOC-03","name":"Bandiagara museum","kind":"collective-centre","admin1":"Mopti","admin2":"Bandiagara","admin3":null}"#;
    assert_eq!(
        http(server.addr, "POST", "/api/v1/sites", None, Some(site)).0,
        401
    );
    assert_eq!(
        http(
            server.addr,
            "POST",
            "/api/v1/sites",
            Some(&viewer),
            Some(site)
        )
        .0,
        403
    );
    let (status, body) = http(
        server.addr,
        "POST",
        "/api/v1/sites",
        Some(&admin),
        Some(site),
    );
    assert_eq!(status, 201, "{body}");
    let bad = r#"{"code":"","name":"x","kind":"official-site","admin1":"Mopti","admin2":"Mopti","admin3":null}"#;
    assert_eq!(
        http(
            server.addr,
            "POST",
            "/api/v1/sites",
            Some(&admin),
            Some(bad)
        )
        .0,
        422
    );
    // A forgotten scope is an error, not the whole country.
    let (status, body) = http(
        server.addr,
        "POST",
        "/api/v1/tokens",
        Some(&admin),
        Some(r#"{"name":"tab-x","role":"enumerator"}"#),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("needs sites or regions"), "{body}");
    let (status, body) = http(
        server.addr,
        "POST",
        "/api/v1/tokens",
        Some(&admin),
        Some(r#"{"name":"tab-x","role":"enumerator","sites":["SOC-03"]}"#),
    );
    assert_eq!(status, 201, "{body}");
    let tab_token = body
        .split("\"token\":\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let tab = replica(dir.path(), "tab-x");
    tab.sync(&server.url(), &tab_token).await.unwrap();
    assert_eq!(
        tab.ledger().site("SOC-03").unwrap().unwrap().name,
        "Bandiagara museum"
    );
    assert!(
        tab.ledger().site("SOC-01").unwrap().is_none(),
        "out of the tablet's scope"
    );

    // Revocation closes the live connection at once, and the token never works again.
    let mut live = joined(&server.url(), &tab_token).await;
    let (status, _) = http(
        server.addr,
        "DELETE",
        "/api/v1/tokens/tab-x",
        Some(&admin),
        None,
    );
    assert_eq!(status, 200);
    let reason = closed_with(&mut live).await;
    assert!(reason.contains("revoked"), "{reason}");
    assert!(matches!(
        tab.sync(&server.url(), &tab_token).await,
        Err(relais_client::ClientError::Auth(_))
    ));
    let (_, list) = http(server.addr, "GET", "/api/v1/tokens", Some(&admin), None);
    assert!(list.contains("tab-x") && !list.contains(&tab_token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_sockets_with_a_close_frame_and_exits_zero() {
    let (_dir, data, token) = seeded_data_dir();
    let server = Server::start(&data, &[]);
    let mut ws = joined(&server.url(), &token).await;
    let stopper = tokio::task::spawn_blocking(move || server.stop());
    let reason = closed_with(&mut ws).await;
    assert!(reason.contains("shutting down"), "{reason}");
    assert!(stopper.await.unwrap().success());
}

#[test]
fn failed_logins_are_slowed_per_address() {
    let (_dir, data, token) = seeded_data_dir();
    let server = Server::start(&data, &[]);
    let mut codes = Vec::new();
    for i in 0..12 {
        codes.push(
            http(
                server.addr,
                "GET",
                "/api/v1/tokens",
                Some(&format!("rls_guess{i}")),
                None,
            )
            .0,
        );
    }
    assert!(codes[..10].iter().all(|c| *c == 401), "{codes:?}");
    assert!(codes[10..].iter().all(|c| *c == 429), "{codes:?}");
    // Even the right token waits out the window from that address.
    assert_eq!(
        http(server.addr, "GET", "/api/v1/tokens", Some(&token), None).0,
        429
    );
}
