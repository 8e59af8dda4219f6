//! A full disk: the real server runs with its files capped (`prlimit --fsize`), so the store
//! cannot grow. Writes that do not fit are refused with a clear close, nothing acknowledged
//! is lost, the server stays up, and once there is room again every refused change arrives
//! from the tablets that kept it. The same for a tablet: `relais field sync` runs capped, its
//! pull does not fit, the replica keeps its own work and completes the sync once there is room.

use relais_core::document::DocKind;
use relais_core::store::Store;
use relais_core::DocumentId;
use relais_tests::*;

fn households(store: &Store) -> Vec<DocumentId> {
    store
        .list()
        .unwrap()
        .into_iter()
        .filter(|(_, m)| m.info.kind == DocKind::Household)
        .map(|(id, _)| id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_loses_nothing_and_recovers_without_a_restart() {
    let (dir, data, token) = seeded_data_dir();
    let db = data.join("relais.redb");
    // Room for the reference data and a few households, not for 3,000 (about 1.5 MB).
    let limit = std::fs::metadata(&db).unwrap().len() + 1024 * 1024;
    let server = Server::start_with_file_limit(&data, &[], limit);
    let a = replica(dir.path(), "tab-a");
    let b = replica(dir.path(), "tab-b");
    a.sync(&server.url(), &token).await.unwrap();
    b.sync(&server.url(), &token).await.unwrap();
    let early: Vec<DocumentId> = (0..5)
        .map(|i| {
            a.ledger()
                .register(household("SOC-01", &format!("Early {i}")))
                .unwrap()
        })
        .collect();
    a.sync(&server.url(), &token)
        .await
        .expect("room for the first households");

    let late: Vec<DocumentId> = (0..3000)
        .map(|i| {
            b.ledger()
                .register(household("SOC-01", &format!("Late {i}")))
                .unwrap()
        })
        .collect();
    let err = b
        .sync(&server.url(), &token)
        .await
        .expect_err("3,000 households do not fit");
    assert!(err.to_string().contains("storage error"), "{err}");
    assert!(server.log().contains("File too large"), "{}", server.log());

    // The server stays up, and a tablet with nothing to push still syncs: reading needs no
    // room. It receives what of B's push was committed before the disk filled.
    let (status, _) = http(server.addr, "GET", "/healthz", None, None);
    assert_eq!(status, 200);
    let pulled = a.sync(&server.url(), &token).await.expect("reads go on");
    assert!(pulled.documents_received > 0 && pulled.documents_received < late.len());
    // Nothing refused was lost on the tablet that wrote it.
    let kept = b.ledger().household_ids(|_| true).unwrap();
    assert!(late.iter().all(|id| kept.contains(id)));

    // Room again: the same server process takes the rest of B's work.
    let raised = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &server.pid().to_string(),
            "--fsize=unlimited:unlimited",
        ])
        .status()
        .unwrap();
    assert!(raised.success());
    tokio::time::sleep(engine_reopen_wait()).await;
    b.sync(&server.url(), &token)
        .await
        .expect("writes resume once there is room");
    assert!(server.log().contains("store reopened"), "{}", server.log());
    a.sync(&server.url(), &token).await.unwrap();
    assert!(server.stop().success());

    let held = households(&Store::open(&db).unwrap());
    for id in early.iter().chain(&late) {
        assert!(held.contains(id), "household {id} lost");
    }
    assert_eq!(held.len(), early.len() + late.len(), "each household once");
    assert_eq!(
        a.ledger().household_ids(|_| true).unwrap().len(),
        held.len(),
        "tablet A has everything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tablet_whose_disk_fills_keeps_its_work_and_syncs_once_there_is_room() {
    let (dir, data, token) = seeded_data_dir();
    let server = Server::start(&data, &[]);
    // The tablet has the reference data and a morning's offline work.
    let own: Vec<DocumentId> = {
        let tab = replica(dir.path(), "tab");
        tab.sync(&server.url(), &token).await.unwrap();
        (0..3)
            .map(|i| {
                tab.ledger()
                    .register(household("SOC-01", &format!("Own {i}")))
                    .unwrap()
            })
            .collect()
    };
    // A colleague's 3,000 households wait on the server for the tablet to pull.
    let source = replica(dir.path(), "source");
    source.sync(&server.url(), &token).await.unwrap();
    for i in 0..3000 {
        source
            .ledger()
            .register(household("SOC-01", &format!("Colleague {i}")))
            .unwrap();
    }
    source.sync(&server.url(), &token).await.unwrap();
    let expected = source.ledger().household_ids(|_| true).unwrap().len() + 3;
    let file = dir.path().join("tab").join("replica.redb");
    let limit = std::fs::metadata(&file).unwrap().len() + 256 * 1024;
    let sync = |capped: bool| {
        let mut cmd = if capped {
            relais_with_file_limit(limit)
        } else {
            std::process::Command::new(relais_bin())
        };
        cmd.args(["field", "--replica"])
            .arg(dir.path().join("tab"))
            .args(["sync", "--server", &server.url(), "--token", &token])
            .env("RELAIS_LOG", "warn")
            .output()
            .unwrap()
    };
    let full = sync(true);
    let stderr = String::from_utf8_lossy(&full.stderr);
    let grown = std::fs::metadata(&file).unwrap().len();
    assert!(
        !full.status.success(),
        "3,000 households do not fit: limit {limit}, file now {grown}: {stderr}"
    );
    eprintln!("capped sync: {}", stderr.trim());
    assert!(stderr.contains("File too large"), "a clear error: {stderr}");
    assert_eq!(
        stderr.matches("File too large").count(),
        1,
        "said once: {stderr}"
    );
    assert!(stderr.contains("free some space"), "a hint: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // The replica opens, its own work intact, and what it stored of the pull is whole.
    {
        let tab = replica(dir.path(), "tab");
        let held = tab.ledger().household_ids(|_| true).unwrap();
        assert!(own.iter().all(|id| held.contains(id)), "own work kept");
        assert!(held.len() < expected, "the pull was cut short");
        for id in &held {
            tab.ledger().store().load(*id).unwrap().expect("whole");
        }
    }

    // Room again: the sync completes, each household once, the same on both sides.
    let done = sync(false);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let tab = replica(dir.path(), "tab");
    let mut held = tab.ledger().household_ids(|_| true).unwrap();
    held.sort();
    assert!(server.stop().success());
    let server_store = Store::open(data.join("relais.redb")).unwrap();
    let mut at_server = households(&server_store);
    at_server.sort();
    assert_eq!(held, at_server, "the tablet and the server hold the same");
    assert_eq!(held.len(), expected, "each household once");
    for id in &held {
        assert_eq!(
            tab.ledger().store().meta(*id).unwrap().unwrap().heads,
            server_store.meta(*id).unwrap().unwrap().heads,
            "household {id}"
        );
    }
}

/// Longer than the engine waits between two attempts to reopen the store.
fn engine_reopen_wait() -> std::time::Duration {
    std::time::Duration::from_secs(3)
}
