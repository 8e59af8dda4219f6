//! relais-client against the reference `@automerge/automerge-repo-sync-server` (pinned in
//! tests/js/package-lock.json): the base protocol works without Relais's extension.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use relais_core::household::HouseholdUpdate;
use relais_core::site::{Site, SiteKind};
use relais_tests::*;

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}

fn start_reference_server(data: &std::path::Path) -> (Node, u16) {
    let dir = js_dir();
    if !dir
        .join("node_modules/@automerge/automerge-repo-sync-server")
        .exists()
    {
        let ok = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .expect("npm is needed (apt-get install nodejs npm)")
            .success();
        assert!(ok, "npm install failed");
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("node")
        .arg("node_modules/@automerge/automerge-repo-sync-server/src/index.js")
        .current_dir(&dir)
        .env("PORT", port.to_string())
        .env("DATA_DIR", data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run node");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "reference server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Node(child), port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_protocol_syncs_with_the_reference_server() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, port) = start_reference_server(&dir.path().join("amrg"));
    let url = format!("ws://127.0.0.1:{port}/");
    let a_dir = dir.path().join("a");
    let h = {
        let a = replica(&a_dir, "tab");
        a.ledger()
            .put_site(&Site {
                code: "SOC-01".into(),
                name: "Socoura".into(),
                kind: SiteKind::OfficialSite,
                admin1: "Mopti".into(),
                admin2: "Mopti".into(),
                admin3: None,
            })
            .unwrap();
        let h = a
            .ledger()
            .register(household("SOC-01", "Fatoumata Diallo"))
            .unwrap();
        let s = a
            .sync(&url, "unused")
            .await
            .unwrap_or_else(|e| panic!("first push: {e}"));
        assert!(!s.extension, "the reference server does not speak relais-1");
        h
    };
    // B starts as a copy of A (same documents, as a second tablet provisioned from it).
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(b_dir.join("tab")).unwrap();
    std::fs::copy(
        a_dir.join("tab/replica.redb"),
        b_dir.join("tab/replica.redb"),
    )
    .unwrap();
    {
        // A copied tablet must not write as the original: give it its own actor and peer id.
        let store = relais_core::store::Store::open(b_dir.join("tab/replica.redb")).unwrap();
        store
            .put_meta("actor", automerge::ActorId::random().to_bytes())
            .unwrap();
        store
            .put_meta("client:peer-id", b"relais-replica-copy")
            .unwrap();
    }
    let a = replica(&a_dir, "tab");
    let b = replica(&b_dir, "tab");
    a.ledger()
        .update(
            h,
            &HouseholdUpdate {
                origin: Some("Ségou".into()),
                ..Default::default()
            },
        )
        .unwrap();
    b.ledger()
        .update(
            h,
            &HouseholdUpdate {
                contact: Some("+223".into()),
                ..Default::default()
            },
        )
        .unwrap();
    a.sync(&url, "unused").await.unwrap();
    b.sync(&url, "unused").await.unwrap();
    a.sync(&url, "unused").await.unwrap();
    for r in [&a, &b] {
        let v = r.ledger().household(h).unwrap().household;
        assert_eq!(v.origin.as_deref(), Some("Ségou"));
        assert_eq!(v.contact.as_deref(), Some("+223"));
    }
}
