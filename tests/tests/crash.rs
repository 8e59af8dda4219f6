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

/// The tablet side: `relais field sync` killed with SIGKILL at random moments (aimed within
/// the time a sync takes here) until 50 kills landed mid-sync,
/// while it pulls another tablet's households (300, then 20 more each round) and pushes its
/// own new ones. After every kill the
/// replica opens and holds every household it registered; then one sync completes, and the
/// replica and the server hold the same households, each once, with the same heads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sigkills_of_a_tablet_mid_sync_lose_nothing() {
    let kills: usize = std::env::var("RELAIS_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let (dir, data, token) = seeded_data_dir();
    let server = Server::start(&data, &[]);
    // Another tablet's work, for the victim to pull; both get the reference data first.
    let source = replica(dir.path(), "source");
    source.sync(&server.url(), &token).await.unwrap();
    replica(dir.path(), "victim")
        .sync(&server.url(), &token)
        .await
        .unwrap();
    for i in 0..300 {
        source
            .ledger()
            .register(household("SOC-01", &format!("Source household {i}")))
            .unwrap();
    }
    source.sync(&server.url(), &token).await.unwrap();
    let victim = dir.path().join("victim");
    let mut rng = StdRng::seed_from_u64(51);
    let mut written: Vec<DocumentId> = Vec::new();
    let (mut completed, mut interrupted, mut partial) = (0, 0, 0);
    let count = |tab: &relais_client::Replica| tab.ledger().store().list().unwrap().len();
    let mut rounds = 0;
    // Kills land at a random moment before `latest` ms, which follows how long a sync
    // takes on this machine (a faster sync would otherwise finish before every kill).
    let mut latest: u64 = 220;
    while interrupted < kills {
        let round = rounds;
        rounds += 1;
        assert!(rounds <= 4 * kills, "the kills keep missing the syncs");
        // More for the victim to pull at every round.
        for i in 0..20 {
            source
                .ledger()
                .register(household("SOC-01", &format!("Source round {round} {i}")))
                .unwrap();
        }
        source.sync(&server.url(), &token).await.unwrap();
        let before;
        {
            // The app registers a few households, then the sync starts in its own process.
            let tab = replica(dir.path(), "victim");
            for i in 0..rng.random_range(1..4) {
                written.push(
                    tab.ledger()
                        .register(household("SOC-01", &format!("Round {round} household {i}")))
                        .unwrap(),
                );
            }
            before = count(&tab);
        }
        let mut child = std::process::Command::new(relais_bin())
            .args(["field", "--replica", victim.to_str().unwrap(), "sync"])
            .args(["--server", &server.url(), "--token", &token])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let delay = rng.random_range(5..latest.max(6));
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let killed = match child.try_wait().unwrap() {
            Some(status) => {
                assert!(status.success(), "round {round}: sync failed: {status}");
                completed += 1;
                // It finished within `delay`: aim the next kills earlier.
                latest = delay;
                false
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                interrupted += 1;
                latest = (latest + 10).min(400);
                true
            }
        };
        // The replica opens after every kill, with every household it registered.
        let tab = replica(dir.path(), "victim");
        if killed && count(&tab) > before {
            partial += 1;
        }
        for id in &written {
            assert!(
                tab.ledger().store().meta(*id).unwrap().is_some(),
                "round {round}: registered household {id} lost"
            );
        }
    }
    eprintln!(
        "{rounds} rounds: {completed} syncs finished before the kill, {interrupted} killed, \
         {partial} of them after some documents were stored"
    );
    assert!(
        partial > 0,
        "the kills must land during syncs, after some documents arrived"
    );
    // The interrupted syncs complete.
    let tab = replica(dir.path(), "victim");
    tab.sync(&server.url(), &token).await.unwrap();
    let households = |store: &Store| -> Vec<(DocumentId, Vec<String>)> {
        let mut v: Vec<_> = store
            .list()
            .unwrap()
            .into_iter()
            .filter(|(_, m)| m.info.kind == DocKind::Household)
            .map(|(id, m)| (id, m.heads))
            .collect();
        v.sort();
        v
    };
    let mine = households(tab.ledger().store());
    assert_eq!(
        mine.len(),
        300 + 20 * rounds + written.len(),
        "each household once"
    );
    assert!(server.stop().success());
    let theirs = households(&Store::open(data.join("relais.redb")).unwrap());
    assert_eq!(mine, theirs, "the tablet and the server agree");
}
