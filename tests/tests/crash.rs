//! Crash safety: the real server killed with SIGKILL at random moments, 50 times, while a
//! tablet pushes households. Every household whose sync the server acknowledged must be in
//! the store afterwards, and the tablet's interrupted syncs complete on reconnect with no
//! duplicates. `RELAIS_CRASH_KILLS=N` changes the number of kills.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relais_core::document::DocKind;
use relais_core::store::Store;
use relais_core::DocumentId;
use relais_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sigkills_lose_nothing_acknowledged() {
    let kills: usize = std::env::var("RELAIS_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let (dir, data, token) = seeded_data_dir();
    let tab = Arc::new(replica(dir.path(), "tab"));
    let mut server = Server::start(&data, &[]);
    tab.sync(&server.url(), &token).await.unwrap();
    let mut rng = StdRng::seed_from_u64(50);
    let mut acknowledged: Vec<DocumentId> = Vec::new();
    let mut written: Vec<DocumentId> = Vec::new();
    let (mut completed, mut interrupted) = (0, 0);
    for round in 0..kills {
        let batch: Vec<DocumentId> = (0..rng.random_range(1..6))
            .map(|i| {
                tab.ledger()
                    .register(household("SOC-01", &format!("Round {round} household {i}")))
                    .unwrap()
            })
            .collect();
        written.extend(&batch);
        let (t, url, tok) = (tab.clone(), server.url(), token.clone());
        let sync = tokio::spawn(async move { t.sync(&url, &tok).await });
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..250))).await;
        server.kill();
        match sync.await.unwrap() {
            Ok(_) => {
                // The sync returned: the server acknowledged everything written so far.
                completed += 1;
                acknowledged = written.clone();
            }
            Err(_) => interrupted += 1,
        }
        // The store must open after every kill.
        server = Server::start(&data, &[]);
    }
    eprintln!(
        "{kills} kills: {completed} syncs completed before the kill, {interrupted} interrupted"
    );
    assert!(
        completed > 0 && interrupted > 0,
        "the kills must land both during and after syncs"
    );
    // The interrupted syncs complete on reconnect.
    tab.sync(&server.url(), &token).await.unwrap();
    assert!(server.stop().success());
    let store = Store::open(data.join("relais.redb")).unwrap();
    let held: Vec<DocumentId> = store
        .list()
        .unwrap()
        .into_iter()
        .filter(|(_, m)| m.info.kind == DocKind::Household)
        .map(|(id, _)| id)
        .collect();
    for id in &acknowledged {
        assert!(held.contains(id), "acknowledged household {id} lost");
    }
    assert_eq!(
        held.len(),
        written.len(),
        "every household once, no duplicates"
    );
    for id in &written {
        let here = store.load(*id).unwrap().unwrap().meta.heads;
        let there = tab.ledger().store().load(*id).unwrap().unwrap().meta.heads;
        assert_eq!(here, there, "{id} identical on both sides");
    }
}
