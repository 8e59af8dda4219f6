//! A full disk: the real server runs with its files capped (`prlimit --fsize`), so the store
//! cannot grow. Writes that do not fit are refused with a clear close, nothing acknowledged
//! is lost, the server stays up, and once there is room again every refused change arrives
//! from the tablets that kept it.

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

/// Longer than the engine waits between two attempts to reopen the store.
fn engine_reopen_wait() -> std::time::Duration {
    std::time::Duration::from_secs(3)
}
