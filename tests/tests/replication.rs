//! Sub-office replicas with real processes: Bamako, Mopti and Gao servers, the offices
//! replicating with Bamako through a proxy that partitions the link, tablets writing on
//! every side, servers restarted, households moving from Mopti to Gao. A seeded schedule is
//! replayed for each seed; set `RELAIS_PARTITION_SEEDS=N` for a long run, and
//! `RELAIS_PARTITION_SEED=S` to replay one seed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relais_client::Replica;
use relais_core::household::HouseholdUpdate;
use relais_core::DocumentId;
use relais_tests::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy whose link can be cut (every open connection dropped, new ones refused)
/// and healed.
struct Partition {
    addr: SocketAddr,
    up: watch::Sender<bool>,
}

impl Partition {
    async fn start(target: SocketAddr) -> Partition {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, rx) = watch::channel(true);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !*rx.borrow() {
                    continue;
                }
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, rx.clone()));
                tokio::spawn(pipe(sr, cw, rx.clone()));
            }
        });
        Partition { addr, up }
    }

    fn cut(&self) {
        self.up.send_replace(false);
    }

    fn heal(&self) {
        self.up.send_replace(true);
    }

    fn is_up(&self) -> bool {
        *self.up.borrow()
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut up: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            },
            _ = async { up.wait_for(|u| !*u).await.map(|_| ()) } => break,
        }
    }
    let _ = to.shutdown().await;
}

fn data_dir(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}

fn get(server: &Server, path: &str, token: &str) -> Value {
    let (status, text) = http(server.addr, "GET", path, Some(token), None);
    assert_eq!(status, 200, "{path}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// An office server replicating with Bamako through its partition.
struct Office {
    name: &'static str,
    data: PathBuf,
    admin: String,
    upstream_token: String,
    link: Partition,
    server: Option<Server>,
}

impl Office {
    fn start(&mut self) {
        let up = format!("ws://{}/sync", self.link.addr);
        self.server = Some(Server::start(
            &self.data,
            &["--upstream", &up, "--upstream-token", &self.upstream_token],
        ));
    }

    fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    fn restart(&mut self, kill: bool) {
        let s = self.server.take().expect("running");
        if kill {
            s.kill();
        } else {
            assert!(s.stop().success(), "{} did not stop cleanly", self.name);
        }
        self.start();
    }
}

/// A tablet: its replica, its site, and its token on each server it may use.
struct Tablet {
    name: String,
    site: &'static str,
    replica: Replica,
    office: usize,
    office_token: String,
    bamako_token: String,
}

/// Household id → every site it was ever registered at or moved to.
type Places = HashMap<DocumentId, HashSet<&'static str>>;

fn region(site: &str) -> &'static str {
    if site.starts_with("GAO") {
        "Gao"
    } else {
        "Mopti"
    }
}

fn households(r: &Replica) -> BTreeMap<DocumentId, (String, Vec<String>)> {
    r.ledger()
        .households()
        .unwrap()
        .into_iter()
        .map(|v| {
            let heads = r.ledger().store().meta(v.id).unwrap().unwrap().heads;
            (v.id, (v.household.site, heads))
        })
        .collect()
}

async fn run_schedule(seed: u64, steps: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let root = tempfile::tempdir().unwrap();
    // Bamako: the reference data, an admin, and a replica token per office.
    let bamako_data = data_dir(root.path(), "bamako");
    seed_reference(&bamako_data);
    let b_admin = create_token(&bamako_data, "admin", &["--role", "admin"]);
    let mopti_up = create_token(
        &bamako_data,
        "mopti-office",
        &["--role", "replica", "--regions", "Mopti"],
    );
    let gao_up = create_token(
        &bamako_data,
        "gao-office",
        &["--role", "replica", "--regions", "Gao"],
    );
    let sites: [(&str, &str, usize); 3] = [
        ("m1", "SOC-01", 0),
        ("m2", "SOC-02", 0),
        ("g1", "GAO-01", 1),
    ];
    let mut bamako_tablet_tokens = HashMap::new();
    for (name, site, _) in sites {
        let t = create_token(
            &bamako_data,
            &format!("tab-{name}"),
            &["--role", "enumerator", "--sites", site],
        );
        bamako_tablet_tokens.insert(name, t);
    }
    let bamako = Server::start(&bamako_data, &[]);
    let mut offices = Vec::new();
    let mut office_tablet_tokens = HashMap::new();
    for (name, up) in [("mopti", mopti_up), ("gao", gao_up)] {
        let data = data_dir(root.path(), name);
        let admin = create_token(&data, "admin", &["--role", "admin"]);
        for (tab, site, office) in sites {
            if offices.len() == office {
                let t = create_token(
                    &data,
                    &format!("tab-{tab}"),
                    &["--role", "enumerator", "--sites", site],
                );
                office_tablet_tokens.insert(tab, t);
            }
        }
        let link = Partition::start(bamako.addr).await;
        let mut o = Office {
            name,
            data,
            admin,
            upstream_token: up,
            link,
            server: None,
        };
        o.start();
        offices.push(o);
    }
    let tablets: Vec<Tablet> = sites
        .iter()
        .map(|(name, site, office)| Tablet {
            name: name.to_string(),
            site,
            replica: replica(root.path(), name),
            office: *office,
            office_token: office_tablet_tokens[name].clone(),
            bamako_token: bamako_tablet_tokens[name].clone(),
        })
        .collect();
    // First contact: reference data reaches the offices from Bamako, and the tablets from
    // their office.
    for _ in 0..40 {
        let mut ready = true;
        for t in &tablets {
            let url = offices[t.office].server().url();
            let _ = t.replica.sync(&url, &t.office_token).await;
            ready &= t
                .replica
                .ledger()
                .sites()
                .unwrap()
                .iter()
                .any(|s| s.code == t.site)
                && t.replica.ledger().campaign("JP-2023").unwrap().is_some();
        }
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let desk = replica(root.path(), "desk");
    let mut places: Places = HashMap::new();
    let mut log = Vec::new();
    for step in 0..steps {
        let roll = rng.random_range(0..100);
        let t = &tablets[rng.random_range(0..tablets.len())];
        let held: Vec<DocumentId> = t
            .replica
            .ledger()
            .list_site(t.site)
            .map(|v| v.into_iter().map(|h| h.id).collect())
            .unwrap_or_default();
        match roll {
            0..=29 => {
                let id = t
                    .replica
                    .ledger()
                    .register(household(t.site, &format!("{} {seed}-{step}", t.name)))
                    .unwrap();
                places.entry(id).or_default().insert(t.site);
                log.push(format!("{step}: {} registers {id}", t.name));
            }
            30..=44 if !held.is_empty() => {
                let h = held[rng.random_range(0..held.len())];
                let item = if rng.random_bool(0.5) {
                    "nfi-kit"
                } else {
                    "shelter-kit"
                };
                let r = t
                    .replica
                    .ledger()
                    .distribute_on(h, "JP-2023", item, 1, "2023-07-10");
                log.push(format!(
                    "{step}: {} hands {item} to {h}: {}",
                    t.name,
                    r.is_ok()
                ));
            }
            45..=49 => {
                // A manager in Bamako moves a Mopti household to Gao.
                let _ = desk.sync(&bamako.url(), &b_admin).await;
                let mopti: Vec<DocumentId> = households(&desk)
                    .into_iter()
                    .filter(|(_, (site, _))| region(site) == "Mopti")
                    .map(|(id, _)| id)
                    .collect();
                if !mopti.is_empty() {
                    let h = mopti[rng.random_range(0..mopti.len())];
                    let to_gao = HouseholdUpdate {
                        site: Some("GAO-01".into()),
                        ..Default::default()
                    };
                    desk.ledger().update(h, &to_gao).unwrap();
                    places.entry(h).or_default().insert("GAO-01");
                    let r = desk.sync(&bamako.url(), &b_admin).await;
                    log.push(format!("{step}: desk moves {h} to GAO-01: {}", r.is_ok()));
                }
            }
            50..=79 => {
                // Usually the nearest office; sometimes Bamako directly.
                let direct = rng.random_bool(0.25);
                let (url, tok) = if direct {
                    (bamako.url(), &t.bamako_token)
                } else {
                    (offices[t.office].server().url(), &t.office_token)
                };
                let r = t.replica.sync(&url, tok).await;
                log.push(format!(
                    "{step}: {} syncs with {}: {:?}",
                    t.name,
                    if direct {
                        "bamako"
                    } else {
                        offices[t.office].name
                    },
                    r.as_ref()
                        .map(|s| s.documents_received)
                        .map_err(|e| e.to_string())
                ));
            }
            80..=89 => {
                let o = &offices[rng.random_range(0..offices.len())];
                if o.link.is_up() {
                    o.link.cut();
                    log.push(format!("{step}: cut {}-bamako", o.name));
                } else {
                    o.link.heal();
                    log.push(format!("{step}: heal {}-bamako", o.name));
                }
            }
            90..=94 => {
                let i = rng.random_range(0..offices.len());
                let kill = rng.random_bool(0.5);
                offices[i].restart(kill);
                log.push(format!(
                    "{step}: restart {} ({})",
                    offices[i].name,
                    if kill { "SIGKILL" } else { "SIGTERM" }
                ));
            }
            _ => {
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
            }
        }
        // Gao must never hold a household that was only ever in Mopti, even mid-schedule.
        if step % 10 == 9 {
            let g = households(&tablets[2].replica);
            for id in g.keys() {
                let p = places.get(id).cloned().unwrap_or_default();
                assert!(
                    p.iter().any(|s| region(s) == "Gao"),
                    "seed {seed}: Gao tablet holds Mopti-only {id}\n{}",
                    log.join("\n")
                );
            }
        }
    }
    // Heal everything and sync until every replica agrees.
    for o in &offices {
        o.link.heal();
    }
    let probe_b = replica(root.path(), "probe-bamako");
    let probe_m = replica(root.path(), "probe-mopti");
    let probe_g = replica(root.path(), "probe-gao");
    let mut last = String::new();
    let mut converged = false;
    for _round in 0..60 {
        for t in &tablets {
            let url = offices[t.office].server().url();
            let _ = t.replica.sync(&url, &t.office_token).await;
        }
        let _ = probe_b.sync(&bamako.url(), &b_admin).await;
        let _ = probe_m
            .sync(&offices[0].server().url(), &offices[0].admin)
            .await;
        let _ = probe_g
            .sync(&offices[1].server().url(), &offices[1].admin)
            .await;
        match check(&places, &probe_b, &probe_m, &probe_g, &tablets) {
            Ok(()) => {
                converged = true;
                break;
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        converged,
        "seed {seed} did not converge: {last}\nschedule:\n{}\nmopti upstream: {}\ngao upstream: {}",
        log.join("\n"),
        get(offices[0].server(), "/api/v1/upstream", &offices[0].admin),
        get(offices[1].server(), "/api/v1/upstream", &offices[1].admin),
    );
    // The link state is visible, and says everything is confirmed.
    for o in &offices {
        let mut v = get(o.server(), "/api/v1/upstream", &o.admin);
        for _ in 0..40 {
            if v["connected"] == true && v["pending_documents"] == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            v = get(o.server(), "/api/v1/upstream", &o.admin);
        }
        assert_eq!(v["connected"], true, "{}: {v}", o.name);
        assert_eq!(v["pending_documents"], 0, "{}: {v}", o.name);
        assert!(v["last_full_sync"].as_i64().is_some(), "{v}");
        let (_, metrics) = http(o.server().addr, "GET", "/metrics", None, None);
        assert!(metrics.contains("relais_upstream_connected 1"), "{metrics}");
    }
    // Finally, the Gao server's own file: no Mopti-only household was ever stored there.
    let mut offices = offices;
    let gao = offices.pop().unwrap();
    let gao_data = gao.data.clone();
    drop(gao.server);
    let store = relais_core::store::Store::open(gao_data.join("relais.redb")).unwrap();
    for (id, meta) in store.list().unwrap() {
        if meta.info.kind == relais_core::document::DocKind::Household {
            let p = places.get(&id).cloned().unwrap_or_default();
            assert!(
                p.iter().any(|s| region(s) == "Gao"),
                "seed {seed}: Gao server stored Mopti-only {id}"
            );
        }
    }
}

/// Everything written reached every replica whose scope covers it, with identical heads,
/// and nothing reached a replica whose scope never covered it.
fn check(
    places: &Places,
    b: &Replica,
    m: &Replica,
    g: &Replica,
    tablets: &[Tablet],
) -> Result<(), String> {
    let hb = households(b);
    let hm = households(m);
    let hg = households(g);
    for id in places.keys() {
        if !hb.contains_key(id) {
            return Err(format!("{id} missing at Bamako"));
        }
    }
    for (id, (site, heads)) in &hb {
        let (here, other) = if region(site) == "Gao" {
            (&hg, &hm)
        } else {
            (&hm, &hg)
        };
        match here.get(id) {
            Some((s, h)) if s == site && h == heads => {}
            other_state => {
                return Err(format!(
                    "{id} at {site}: office has {other_state:?}, Bamako {heads:?}"
                ))
            }
        }
        if other.contains_key(id) {
            return Err(format!(
                "{id} (now at {site}) still held by the other office"
            ));
        }
        for t in tablets {
            let th = households(&t.replica);
            match (t.site == site.as_str(), th.get(id)) {
                (true, Some((_, h))) if h == heads => {}
                (true, got) => {
                    return Err(format!("tablet {} lacks {id} at {site}: {got:?}", t.name))
                }
                (false, Some(_)) => {
                    return Err(format!("tablet {} still holds {id}, now at {site}", t.name))
                }
                (false, None) => {}
            }
        }
    }
    for (id, _) in hg.iter().chain(hm.iter()) {
        if !hb.contains_key(id) {
            return Err(format!("{id} at an office but not at Bamako"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_converge_through_partitions_and_restarts() {
    let seeds: Vec<u64> = match (
        std::env::var("RELAIS_PARTITION_SEED").ok(),
        std::env::var("RELAIS_PARTITION_SEEDS").ok(),
    ) {
        (Some(s), _) => vec![s.parse().expect("RELAIS_PARTITION_SEED is a number")],
        (None, Some(n)) => (1..=n
            .parse::<u64>()
            .expect("RELAIS_PARTITION_SEEDS is a number"))
            .collect(),
        // Fast mode for CI.
        (None, None) => vec![1, 2],
    };
    for seed in seeds {
        eprintln!("partition schedule seed {seed}");
        run_schedule(seed, 40).await;
    }
}

/// Registers one SOC-01 household on `tab` once the site has reached it through `office`,
/// and pushes it there.
async fn register_through(tab: &Replica, office: &Server, token: &str, name: &str) -> DocumentId {
    let mut h = None;
    for _ in 0..40 {
        let _ = tab.sync(&office.url(), token).await;
        if tab
            .ledger()
            .sites()
            .unwrap()
            .iter()
            .any(|s| s.code == "SOC-01")
        {
            h = Some(tab.ledger().register(household("SOC-01", name)).unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let h = h.expect("reference data reached the tablet through the office");
    tab.sync(&office.url(), token).await.unwrap();
    h
}

/// An erasure at Bamako reaches the office as a tombstone, and the office's tablets purge
/// their copies at their next sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_at_bamako_reaches_an_office_and_its_tablets() {
    let root = tempfile::tempdir().unwrap();
    let bamako_data = data_dir(root.path(), "bamako");
    seed_reference(&bamako_data);
    let b_admin = create_token(&bamako_data, "admin", &["--role", "admin"]);
    let up = create_token(
        &bamako_data,
        "mopti-office",
        &["--role", "replica", "--regions", "Mopti"],
    );
    let bamako = Server::start(&bamako_data, &[]);
    let mopti_data = data_dir(root.path(), "mopti");
    let m_admin = create_token(&mopti_data, "admin", &["--role", "admin"]);
    let tab_token = create_token(
        &mopti_data,
        "tab",
        &["--role", "enumerator", "--sites", "SOC-01"],
    );
    let upstream = bamako.url();
    let mopti = Server::start(
        &mopti_data,
        &["--upstream", &upstream, "--upstream-token", &up],
    );
    let tab = replica(root.path(), "tab");
    let h = register_through(&tab, &mopti, &tab_token, "Erased Upstream").await;
    // Wait until Bamako has it, then erase it there.
    let mut erased = false;
    for _ in 0..40 {
        let (status, _) = http(
            bamako.addr,
            "DELETE",
            &format!("/api/v1/households/{h}"),
            Some(&b_admin),
            None,
        );
        if status == 200 {
            erased = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(erased, "the household never reached Bamako");
    // The office learns of it (live, or at its next listing); the tablet then purges.
    let mut purged = false;
    for _ in 0..40 {
        let s = tab.sync(&mopti.url(), &tab_token).await.unwrap();
        if s.documents_purged == 1 {
            purged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(purged, "the tablet never purged the erased household");
    assert!(tab.ledger().store().meta(h).unwrap().unwrap().info.erased);
    let status = get(&mopti, "/api/v1/status", &m_admin);
    assert_eq!(
        status["store"]["erased"], 1,
        "the office keeps a tombstone: {status}"
    );
    assert!(mopti.stop().success());
    assert!(bamako.stop().success());
}

/// A quiet office keeps its link: it pings, and only silence from Bamako (not even a pong)
/// counts as a dead link. The idle limit is shortened to one second for the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_upstream_link_stays_up() {
    let root = tempfile::tempdir().unwrap();
    let bamako_data = data_dir(root.path(), "bamako");
    seed_reference(&bamako_data);
    let up = create_token(
        &bamako_data,
        "mopti-office",
        &["--role", "replica", "--regions", "Mopti"],
    );
    let bamako = Server::start(&bamako_data, &[]);
    let mopti_data = data_dir(root.path(), "mopti");
    let m_admin = create_token(&mopti_data, "admin", &["--role", "admin"]);
    let upstream = bamako.url();
    let mopti = Server::start_env(
        &mopti_data,
        &["--upstream", &upstream, "--upstream-token", &up],
        &[("RELAIS_UPSTREAM_IDLE_SECS", "1")],
    );
    let mut v = get(&mopti, "/api/v1/upstream", &m_admin);
    for _ in 0..40 {
        if v["connected"] == true && v["last_full_sync"].as_i64().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        v = get(&mopti, "/api/v1/upstream", &m_admin);
    }
    assert_eq!(v["connected"], true, "{v}");
    // Five idle limits with nothing to sync.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let v = get(&mopti, "/api/v1/upstream", &m_admin);
    assert_eq!(v["connected"], true, "{v}");
    assert_eq!(v["connects"], 1, "the link never dropped: {v}");
    assert!(v["last_error"].is_null(), "{v}");
}

/// An upstream that takes the connection and never answers the handshake (a dead route
/// past the first hop) is given up on after the idle limit and tried again, over and over,
/// with the reason shown to the office's admin; meanwhile the office serves its tablets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_is_retried_and_the_office_serves_meanwhile() {
    let root = tempfile::tempdir().unwrap();
    let (mute, taken) = mute_listener().await;
    let mopti_data = data_dir(root.path(), "mopti");
    seed_reference(&mopti_data);
    let m_admin = create_token(&mopti_data, "admin", &["--role", "admin"]);
    let mopti = Server::start_env(
        &mopti_data,
        &[
            "--upstream",
            &format!("ws://{mute}/sync"),
            "--upstream-token",
            "rls_x",
        ],
        &[("RELAIS_UPSTREAM_IDLE_SECS", "1")],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let v = loop {
        let v = get(&mopti, "/api/v1/upstream", &m_admin);
        if taken.load(std::sync::atomic::Ordering::SeqCst) >= 2 && !v["last_error"].is_null() {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the office stopped trying its upstream: {v}\n{}",
            mopti.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(v["connected"], false, "{v}");
    let error = v["last_error"].as_str().unwrap();
    assert!(error.contains("did not answer within 1 s"), "{v}");
    let tab = replica(root.path(), "tab");
    tokio::time::timeout(Duration::from_secs(30), tab.sync(&mopti.url(), &m_admin))
        .await
        .expect("the office answers its tablets")
        .unwrap();
    assert!(tab.ledger().site("SOC-01").unwrap().is_some());
    assert!(mopti.stop().success());
}

/// An office whose upstream token may not write (a viewer's) still completes its syncs:
/// Bamako refuses the office's households, the office logs and counts each refusal, keeps
/// them as pending, and offers them again once the token may write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_upstream_refuses_is_counted_kept_and_offered_again() {
    let root = tempfile::tempdir().unwrap();
    let bamako_data = data_dir(root.path(), "bamako");
    seed_reference(&bamako_data);
    let b_admin = create_token(&bamako_data, "admin", &["--role", "admin"]);
    let up = create_token(
        &bamako_data,
        "mopti-office",
        &["--role", "viewer", "--regions", "Mopti"],
    );
    let bamako = Server::start(&bamako_data, &[]);
    let mopti_data = data_dir(root.path(), "mopti");
    let m_admin = create_token(&mopti_data, "admin", &["--role", "admin"]);
    let tab_token = create_token(&mopti_data, "tab", &["--role", "admin"]);
    let mopti = Server::start(
        &mopti_data,
        &["--upstream", &bamako.url(), "--upstream-token", &up],
    );
    let tab = replica(root.path(), "tab");
    let h = register_through(&tab, &mopti, &tab_token, "Refused Upstream").await;
    let mut counted = false;
    for _ in 0..40 {
        let (_, metrics) = http(mopti.addr, "GET", "/metrics", None, None);
        if metrics.contains("relais_upstream_refused_total 1\n") {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(counted, "the office never counted Bamako's refusal");
    // The sync with Bamako completes, and the household stays pending there.
    let mut v = get(&mopti, "/api/v1/upstream", &m_admin);
    for _ in 0..40 {
        if v["in_flight_documents"] == 0 && v["last_full_sync"].as_i64().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        v = get(&mopti, "/api/v1/upstream", &m_admin);
    }
    assert!(v["last_full_sync"].as_i64().is_some(), "{v}");
    assert_eq!(v["pending_documents"], 1, "{v}");
    let seer = replica(root.path(), "bamako-tab");
    seer.sync(&bamako.url(), &b_admin).await.unwrap();
    assert!(seer.ledger().store().meta(h).unwrap().is_none());
    let (_, audit) = http(
        bamako.addr,
        "GET",
        "/api/v1/audit?action=refused-write",
        Some(&b_admin),
        None,
    );
    assert!(audit.contains(&h.to_string()), "{audit}");

    // Bamako gives the office a token that may write: at its next session (a restart here),
    // the office pushes what was refused.
    assert!(mopti.stop().success());
    let (status, body) = http(
        bamako.addr,
        "POST",
        "/api/v1/tokens",
        Some(&b_admin),
        Some(r#"{"name":"mopti-office-2","role":"replica","regions":["Mopti"]}"#),
    );
    assert_eq!(status, 201, "{body}");
    let up: Value = serde_json::from_str(&body).unwrap();
    let up = up["token"].as_str().unwrap();
    let mopti = Server::start(
        &mopti_data,
        &["--upstream", &bamako.url(), "--upstream-token", up],
    );
    let mut arrived = false;
    for _ in 0..40 {
        let v = get(&mopti, "/api/v1/upstream", &m_admin);
        if v["pending_documents"] == 0 && v["last_full_sync"].as_i64().is_some() {
            arrived = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(arrived, "the refused household was never offered again");
    seer.sync(&bamako.url(), &b_admin).await.unwrap();
    assert_eq!(
        seer.ledger().household(h).unwrap().household.head_name,
        "Refused Upstream"
    );
    assert!(mopti.stop().success());
    assert!(bamako.stop().success());
}
