//! Times the phases of a 5,000-household site: register, push, fresh pull, reconnect.
use relais_tests::*;
use std::time::Instant;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    seed_reference(&data);
    let token = create_token(&data, "admin", &["--role", "admin"]);
    let server = Server::start(&data, &[]);
    let tab = replica(dir.path(), "tab");
    tab.sync(&server.url(), &token).await.unwrap();
    let t = Instant::now();
    for i in 0..n {
        tab.ledger()
            .register(household("SOC-01", &format!("hh {i}")))
            .unwrap();
    }
    eprintln!("register {n}: {:?}", t.elapsed());
    let t = Instant::now();
    let s = tab.sync(&server.url(), &token).await.unwrap();
    eprintln!(
        "push: {:?} {} B out {} B in",
        t.elapsed(),
        s.bytes_sent,
        s.bytes_received
    );
    let fresh = replica(dir.path(), "fresh");
    let t = Instant::now();
    let s = fresh.sync(&server.url(), &token).await.unwrap();
    eprintln!(
        "fresh pull: {:?} {} B out {} B in",
        t.elapsed(),
        s.bytes_sent,
        s.bytes_received
    );
    let t = Instant::now();
    let s = fresh.sync(&server.url(), &token).await.unwrap();
    eprintln!(
        "reconnect: {:?} frames {}+{}",
        t.elapsed(),
        s.frames_sent,
        s.frames_received
    );
    let t = Instant::now();
    let l = fresh.ledger().list_site("SOC-01").unwrap().len();
    eprintln!("list {l}: {:?}", t.elapsed());
}
