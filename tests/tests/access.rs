//! Access control with real processes: scopes that cannot be probed, erasure that reaches
//! every replica and cannot be undone, households moving away, scope changes, the audit
//! log, devices last seen, and TLS with a CA made in the test.

use std::time::Duration;

use automerge::sync::SyncDoc;
use futures_util::{SinkExt, StreamExt};
use relais_client::{ClientError, Replica, SyncOptions, TlsTrust};
use relais_core::household::HouseholdUpdate;
use relais_core::protocol::message::{DocMessage, Message};
use relais_core::DocumentId;
use relais_tests::*;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message as Ws;

fn json(server: &Server, method: &str, path: &str, token: &str) -> (u16, Value) {
    let (status, text) = http(server.addr, method, path, Some(token), None);
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Sends a stock `request` for `id` from an empty document and returns the reply.
async fn request(ws: &mut WsStream, peer: &str, id: &str) -> Message {
    ws.send(Ws::Binary(request_frame(peer, id).into()))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(Ws::Binary(b)))) => return Message::decode(&b).unwrap(),
            Ok(Some(Ok(_))) => {}
            other => panic!("no reply for {id}: {other:?}"),
        }
    }
}

/// The reply with the document id blanked, to compare replies about different ids.
fn shape(m: &Message) -> Vec<u8> {
    match m {
        Message::DocUnavailable {
            sender_id,
            target_id,
            ..
        } => Message::DocUnavailable {
            sender_id: sender_id.clone(),
            target_id: target_id.clone(),
            document_id: String::new(),
        }
        .encode(),
        other => other.encode(),
    }
}

/// Three households at each of SOC-01, SOC-02 (Mopti) and GAO-01 (Gao), pushed by an admin
/// replica. Returns the replica and the households by site.
async fn populate(
    server: &Server,
    dir: &std::path::Path,
    admin: &str,
) -> (Replica, Vec<(String, DocumentId)>) {
    let office = replica(dir, "office");
    office.sync(&server.url(), admin).await.unwrap();
    let mut made = Vec::new();
    for site in ["SOC-01", "SOC-02", "GAO-01"] {
        for n in 0..3 {
            let id = office
                .ledger()
                .register(household(site, &format!("Head {site} {n}")))
                .unwrap();
            made.push((site.to_string(), id));
        }
    }
    office.sync(&server.url(), admin).await.unwrap();
    (office, made)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_scope_documents_answer_exactly_like_unknown_ids() {
    let (dir, data, admin) = seeded_data_dir();
    let server = Server::start(&data, &[]);
    let (office, made) = populate(&server, dir.path(), &admin).await;
    let gao = api_token(
        &server,
        &admin,
        "tab-gao-01",
        "enumerator",
        r#""sites":["GAO-01"]"#,
    );

    // Every document id in the store, probed by a Gao tablet speaking the stock protocol.
    let all = office.ledger().store().list().unwrap();
    assert!(all.len() >= 13, "3 sites, 1 campaign, 9 households");
    let mut ws = ws_joined(&server.url(), &gao, "prober").await;
    let unknown = request(&mut ws, "prober", &DocumentId::random().to_string()).await;
    assert!(matches!(unknown, Message::DocUnavailable { .. }));
    let mut readable = Vec::new();
    for (id, meta) in &all {
        let reply = request(&mut ws, "prober", &id.to_string()).await;
        let in_scope = meta.info.sites.iter().any(|s| s == "GAO-01");
        if in_scope {
            assert!(matches!(reply, Message::Sync(_)), "{id} should be readable");
            readable.push(*id);
        } else {
            assert_eq!(
                shape(&reply),
                shape(&unknown),
                "{id} ({:?}) must answer exactly like an unknown id",
                meta.info.sites
            );
        }
    }
    // GAO-01's site document, the campaign serving it, its three households.
    assert_eq!(readable.len(), 5);

    // A change pushed to an out-of-scope household is refused, stored nowhere, and audited.
    let (soc_site, soc_hh) = made.iter().find(|(s, _)| s == "SOC-01").unwrap().clone();
    assert_eq!(soc_site, "SOC-01");
    let mut forged = office
        .ledger()
        .store()
        .load(soc_hh)
        .unwrap()
        .unwrap()
        .doc
        .fork();
    forged
        .transact::<_, _, automerge::AutomergeError>(|tx| {
            use automerge::transaction::Transactable;
            tx.put(automerge::ROOT, "note", "written from Gao")?;
            Ok(())
        })
        .unwrap();
    let mut st = automerge::sync::State::new();
    st.their_heads = Some(Vec::new());
    st.their_need = Some(Vec::new());
    st.their_have = Some(vec![automerge::sync::Have::default()]);
    let push = forged.generate_sync_message(&mut st).unwrap();
    let msg = Message::Sync(DocMessage {
        sender_id: "prober".into(),
        target_id: "server".into(),
        document_id: soc_hh.to_string(),
        data: push.encode(),
    });
    ws.send(Ws::Binary(msg.encode().into())).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(Ws::Binary(b)))) => {
                assert!(matches!(
                    Message::decode(&b).unwrap(),
                    Message::DocUnavailable { .. }
                ));
                break;
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no reply: {other:?}"),
        }
    }
    office.sync(&server.url(), &admin).await.unwrap();
    let doc = office.ledger().store().load(soc_hh).unwrap().unwrap().doc;
    assert!(automerge::ReadDoc::get(&doc, automerge::ROOT, "note")
        .unwrap()
        .is_none());
    let (status, audit) = json(
        &server,
        "GET",
        "/api/v1/audit?token=tab-gao-01&action=refused-write",
        &admin,
    );
    assert_eq!(status, 200);
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{audit}");
    assert_eq!(entries[0]["document"], soc_hh.to_string());

    // A Relais client with the Gao token ends up with exactly the readable set.
    let tab = replica(dir.path(), "tab-gao");
    tab.sync(&server.url(), &gao).await.unwrap();
    let mut held: Vec<DocumentId> = tab
        .ledger()
        .store()
        .list()
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    held.sort();
    readable.sort();
    assert_eq!(held, readable);
    assert!(server.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_reaches_every_replica_and_nothing_brings_it_back() {
    let (dir, data, admin) = seeded_data_dir();
    let server = Server::start(&data, &[]);
    let tab = api_token(
        &server,
        &admin,
        "tab-soc",
        "enumerator",
        r#""sites":["SOC-01"]"#,
    );
    let b = replica(dir.path(), "tab-b");
    let c = replica(dir.path(), "tab-c");
    b.sync(&server.url(), &tab).await.unwrap();
    let h = b
        .ledger()
        .register(household("SOC-01", "Fatoumata Erasable"))
        .unwrap();
    let keep = b
        .ledger()
        .register(household("SOC-01", "Kept Household"))
        .unwrap();
    b.sync(&server.url(), &tab).await.unwrap();
    c.sync(&server.url(), &tab).await.unwrap();
    assert!(c.ledger().household(h).is_ok());
    // C goes offline and edits the household; meanwhile an admin erases it.
    c.ledger()
        .distribute_on(h, "JP-2023", "nfi-kit", 1, "2023-07-10")
        .unwrap();
    let (status, body) = json(
        &server,
        "DELETE",
        &format!("/api/v1/households/{h}"),
        &admin,
    );
    assert_eq!(status, 200, "{body}");
    let (status, _) = json(
        &server,
        "DELETE",
        &format!("/api/v1/households/{}", DocumentId::random()),
        &admin,
    );
    assert_eq!(status, 404);
    let (status, _) = json(&server, "DELETE", &format!("/api/v1/households/{h}"), &tab);
    assert_eq!(status, 403, "only admins erase");

    let sb = b.sync(&server.url(), &tab).await.unwrap();
    assert_eq!(sb.documents_purged, 1);
    let sc = c.sync(&server.url(), &tab).await.unwrap();
    assert_eq!(sc.documents_purged, 1);
    for r in [&b, &c] {
        assert!(matches!(
            r.ledger().household(h),
            Err(e) if e.to_string().contains("erased")
        ));
        assert!(r.ledger().household(keep).is_ok());
        let meta = r.ledger().store().meta(h).unwrap().unwrap();
        assert!(meta.info.erased && meta.heads.is_empty());
        assert_eq!(
            r.status().unwrap().pending_documents,
            0,
            "the tombstone is the server's doing, not a change waiting to be pushed"
        );
        // Syncing again brings nothing back.
        r.sync(&server.url(), &tab).await.unwrap();
        assert!(r.ledger().household(h).is_err());
    }
    // Reopened, a tablet's file keeps no byte of it either.
    drop(c);
    let c = replica(dir.path(), "tab-c");
    assert!(c.ledger().household(h).is_err());
    let bytes = std::fs::read(dir.path().join("tab-c").join("replica.redb")).unwrap();
    assert!(
        !bytes.windows(8).any(|w| w == b"Erasable"),
        "erased name left on the tablet"
    );
    // A stock client asking for it gets doc-unavailable.
    let mut ws = ws_joined(&server.url(), &tab, "stock").await;
    assert!(matches!(
        request(&mut ws, "stock", &h.to_string()).await,
        Message::DocUnavailable { .. }
    ));
    drop(ws);
    let (_, audit) = json(&server, "GET", "/api/v1/audit?action=erase", &admin);
    assert_eq!(audit["entries"].as_array().unwrap().len(), 1);
    assert_eq!(audit["entries"][0]["token"], "admin");
    let (_, refused) = json(
        &server,
        "GET",
        "/api/v1/audit?action=refused-write&token=tab-soc",
        &admin,
    );
    assert!(
        refused["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["detail"] == "erased"),
        "C's offline edit was refused: {refused}"
    );
    let (_, status) = json(&server, "GET", "/api/v1/status", &admin);
    assert_eq!(status["store"]["erased"], 1, "{status}");
    assert!(server.stop().success());
    // No trace of the personal data is left in the server's file.
    let bytes = std::fs::read(data.join("relais.redb")).unwrap();
    let needle = b"Erasable";
    assert!(
        !bytes.windows(needle.len()).any(|w| w == needle),
        "the erased household's name is still in the store file"
    );
    // The CLI can erase with the server stopped, and the store keeps the tombstone.
    let out = relais(&[
        "household",
        "erase",
        "--data",
        data.to_str().unwrap(),
        &keep.to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = relais(&[
        "household",
        "erase",
        "--data",
        data.to_str().unwrap(),
        &DocumentId::random().to_string(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown household"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_household_that_moved_while_a_tablet_was_offline_is_purged_there() {
    let (dir, data, admin) = seeded_data_dir();
    let server = Server::start(&data, &[]);
    let (office, made) = populate(&server, dir.path(), &admin).await;
    let soc1 = api_token(
        &server,
        &admin,
        "tab-soc-01",
        "enumerator",
        r#""sites":["SOC-01"]"#,
    );
    let soc2 = api_token(
        &server,
        &admin,
        "tab-soc-02",
        "enumerator",
        r#""sites":["SOC-02"]"#,
    );
    let t1 = replica(dir.path(), "t1");
    let t2 = replica(dir.path(), "t2");
    t1.sync(&server.url(), &soc1).await.unwrap();
    t2.sync(&server.url(), &soc2).await.unwrap();
    let moving = made.iter().find(|(s, _)| s == "SOC-01").unwrap().1;
    assert!(t1.ledger().household(moving).is_ok());
    // Both tablets offline; the office moves the household to Gao.
    office
        .ledger()
        .update(
            moving,
            &HouseholdUpdate {
                site: Some("GAO-01".into()),
                ..Default::default()
            },
        )
        .unwrap();
    office.sync(&server.url(), &admin).await.unwrap();
    let s1 = t1.sync(&server.url(), &soc1).await.unwrap();
    assert_eq!(s1.documents_purged, 1);
    assert!(t1.ledger().store().meta(moving).unwrap().is_none());
    assert_eq!(t1.ledger().list_site("SOC-01").unwrap().len(), 2);
    // A tablet that could never see it hears nothing of it.
    let s2 = t2.sync(&server.url(), &soc2).await.unwrap();
    assert_eq!(s2.documents_purged, 0);
    assert!(t2.ledger().store().meta(moving).unwrap().is_none());
    assert!(server.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_change_purges_what_the_device_may_no_longer_hold() {
    let (dir, data, admin) = seeded_data_dir();
    let server = Server::start(&data, &[]);
    let (_office, made) = populate(&server, dir.path(), &admin).await;
    let tok = api_token(
        &server,
        &admin,
        "tab-x",
        "enumerator",
        r#""sites":["SOC-01","SOC-02"]"#,
    );
    let t = replica(dir.path(), "tx");
    t.sync(&server.url(), &tok).await.unwrap();
    assert_eq!(t.ledger().households().unwrap().len(), 6);
    let (status, body) = http(
        server.addr,
        "PATCH",
        "/api/v1/tokens/tab-x",
        Some(&admin),
        Some(r#"{"sites":["SOC-02","GAO-01"]}"#),
    );
    assert_eq!(status, 200, "{body}");
    let (_, audit) = json(
        &server,
        "GET",
        "/api/v1/audit?action=token-rescoped",
        &admin,
    );
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{audit}");
    assert_eq!(entries[0]["token"], "admin");
    assert_eq!(
        entries[0]["detail"],
        "tab-x: regions [], sites [SOC-02,GAO-01]"
    );
    let (status, _) = http(
        server.addr,
        "PATCH",
        "/api/v1/tokens/no-such-token",
        Some(&admin),
        Some(r#"{"sites":["SOC-02"]}"#),
    );
    assert_eq!(status, 404, "an unknown token");
    let s = t.sync(&server.url(), &tok).await.unwrap();
    assert_eq!(
        s.documents_purged,
        3 + 1,
        "SOC-01's households and its site document"
    );
    let mut held: Vec<String> = t
        .ledger()
        .households()
        .unwrap()
        .into_iter()
        .map(|v| v.household.site)
        .collect();
    held.sort();
    assert_eq!(
        held,
        ["GAO-01", "GAO-01", "GAO-01", "SOC-02", "SOC-02", "SOC-02"]
    );
    assert!(made.iter().filter(|(s, _)| s == "SOC-01").all(|(_, id)| t
        .ledger()
        .store()
        .meta(*id)
        .unwrap()
        .is_none()));
    assert!(server.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_records_reads_writes_and_admin_actions_without_personal_data() {
    let (dir, data, admin) = seeded_data_dir();
    let server = Server::start(&data, &[]);
    let tok = api_token(
        &server,
        &admin,
        "tab-audit",
        "enumerator",
        r#""sites":["SOC-01"]"#,
    );
    let viewer = api_token(
        &server,
        &admin,
        "viewer-1",
        "viewer",
        r#""sites":["SOC-01"]"#,
    );
    let a = replica(dir.path(), "a");
    a.sync(&server.url(), &tok).await.unwrap();
    let h = a
        .ledger()
        .register(household("SOC-01", "Mariam Secretname"))
        .unwrap();
    a.sync(&server.url(), &tok).await.unwrap();
    let v = replica(dir.path(), "v");
    v.sync(&server.url(), &viewer).await.unwrap();
    assert!(v.ledger().household(h).is_ok());
    // The viewer edits offline and syncs: refused, audited, and nobody else sees it.
    v.ledger()
        .update(
            h,
            &HouseholdUpdate {
                origin: Some("Forged".into()),
                ..Default::default()
            },
        )
        .unwrap();
    // Told at once: the sync completes (it used to wait out its idle timeout and fail),
    // saying what was refused and why, and the edit stays on the tablet, waiting.
    let opts = SyncOptions {
        idle_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let s = v.sync_with(&server.url(), &viewer, &opts).await.unwrap();
    assert_eq!(
        s.documents_refused,
        vec![relais_client::RefusedDocument {
            id: h,
            reason: "read-only device".into()
        }]
    );
    assert_eq!(s.documents_sent, 0);
    assert_eq!(v.status().unwrap().pending_documents, 1);
    assert_eq!(
        v.ledger().household(h).unwrap().household.origin.as_deref(),
        Some("Forged")
    );
    a.sync(&server.url(), &tok).await.unwrap();
    assert_eq!(a.ledger().household(h).unwrap().household.origin, None);

    let (status, _) = json(&server, "GET", "/api/v1/audit", &tok);
    assert_eq!(status, 403);
    let (status, all) = json(&server, "GET", "/api/v1/audit", &admin);
    assert_eq!(status, 200);
    let text = all.to_string();
    assert!(
        !text.contains("Secretname"),
        "no personal data in the audit log"
    );
    let has =
        |token: &str, action: &str| {
            all["entries"].as_array().unwrap().iter().any(|e| {
                e["token"] == token && e["action"] == action && e["document"] == h.to_string()
            })
        };
    assert!(has("tab-audit", "write"), "{all}");
    assert!(has("viewer-1", "sync-read"), "{all}");
    assert!(has("viewer-1", "refused-write"), "{all}");
    assert!(!has("viewer-1", "write"));
    let created: Vec<&Value> = all["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "token-created")
        .collect();
    assert_eq!(
        created.len(),
        3,
        "admin (command line), tab-audit and viewer-1 (API)"
    );
    assert_eq!(created[0]["token"], "admin-cli");
    assert!(created[1..].iter().all(|e| e["token"] == "admin"));
    let (_, revoked) = json(&server, "DELETE", "/api/v1/tokens/viewer-1", &admin);
    assert!(revoked["revoked_at"].is_i64());
    let (_, page) = json(&server, "GET", "/api/v1/audit?action=token-revoked", &admin);
    assert_eq!(page["entries"].as_array().unwrap().len(), 1);
    let (status, _) = json(&server, "GET", "/api/v1/audit?since=yesterday", &admin);
    assert_eq!(status, 400);
    // The same log through the command line, from a running server and from the store.
    let base = format!("http://{}", server.addr);
    let out = relais_ok(&[
        "audit",
        "--server",
        &base,
        "--admin-token",
        &admin,
        "--token",
        "tab-audit",
        "--json",
    ]);
    assert!(
        out.lines().count() >= 2 && out.lines().all(|l| l.contains("\"tab-audit\"")),
        "{out}"
    );
    let (_, devices) = json(&server, "GET", "/api/v1/devices", &admin);
    let dev = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "tab-audit")
        .unwrap()
        .clone();
    assert!(dev["last_seen"].as_i64().unwrap() > 0, "{devices}");
    assert_eq!(dev["connections"], 0);
    assert!(server.stop().success());
    let out = relais_ok(&[
        "audit",
        "--data",
        data.to_str().unwrap(),
        "--action",
        "token-revoked",
    ]);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("viewer-1"));
}

fn write(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_ca_made_here_and_with_a_pinned_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let (dir, data, admin) = seeded_data_dir();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let p = |n: &str| dir.path().join(n);
    write(&p("ca.pem"), &ca.pem());
    write(&p("cert.pem"), &cert.pem());
    write(&p("key.pem"), &key.serialize_pem());
    let server = Server::start(
        &data,
        &[
            "--tls-cert",
            p("cert.pem").to_str().unwrap(),
            "--tls-key",
            p("key.pem").to_str().unwrap(),
        ],
    );
    let url = server.wss_url();
    let a = replica(dir.path(), "tls-a");
    // The usual web roots do not know this CA.
    let err = a.sync(&url, &admin).await.unwrap_err();
    assert!(matches!(err, ClientError::Tls(_)), "{err}");
    let with_ca = SyncOptions {
        tls: TlsTrust::ca_file(p("ca.pem")).unwrap(),
        ..Default::default()
    };
    a.sync_with(&url, &admin, &with_ca).await.unwrap();
    a.ledger()
        .register(household("SOC-01", "Over TLS"))
        .unwrap();
    let s = a.sync_with(&url, &admin, &with_ca).await.unwrap();
    assert_eq!(s.documents_sent, 1);
    // Pinning the server's own certificate works without the CA; another pin does not.
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(cert.der()))
    };
    let b = replica(dir.path(), "tls-b");
    let pinned = SyncOptions {
        tls: TlsTrust::pinned_hex(&digest).unwrap(),
        ..Default::default()
    };
    b.sync_with(&url, &admin, &pinned).await.unwrap();
    assert_eq!(b.ledger().households().unwrap().len(), 1);
    let wrong = SyncOptions {
        tls: TlsTrust::pinned_hex(&"00".repeat(32)).unwrap(),
        ..Default::default()
    };
    assert!(matches!(
        b.sync_with(&url, &admin, &wrong).await,
        Err(ClientError::Tls(_))
    ));
    // Plain ws:// to a TLS port does not get through.
    assert!(b.sync(&server.url(), &admin).await.is_err());
    // The admin API over https, verified by the same CA.
    let base = format!("https://{}", server.addr);
    let out = relais_ok(&[
        "status",
        "--server",
        &base,
        "--admin-token",
        &admin,
        "--ca",
        p("ca.pem").to_str().unwrap(),
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["store"]["households"], 1, "{out}");
    let out = relais(&["status", "--server", &base, "--admin-token", &admin]);
    assert!(!out.status.success(), "an unknown CA is refused");
    assert!(server.stop().success());
}
