//! `relais bench`: a load generator. It starts a real `relais serve` process on a fresh store
//! and drives it with simulated tablets (relais-client replicas) doing realistic work:
//! households with members registered at sites, kits handed out. It reports, as a table or
//! JSON:
//!
//! - changes merged per second, sustained, while every tablet pushes its offline work at once;
//! - sync latency, p50 and p99, from a handout on tablet A until tablet B (live) has it;
//! - a fresh tablet's initial sync of a whole site: time and bytes on the wire;
//! - a reconnect with nothing new, for a replica holding many documents;
//! - the server's peak RSS and CPU seconds (from /proc);
//! - wire bytes per registered household, against the size of its Automerge changes.
//!
//! Timings depend on the machine; compare ratios measured in one run (BENCHMARKS.md).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use relais_client::{Replica, ReplicaEvent, SyncOptions, Writer};
use relais_core::access::{Role, Scope};
use relais_core::campaign::{parse_entitlement, Campaign};
use relais_core::household::{parse_members, NewHousehold};
use relais_core::ledger::Ledger;
use relais_core::site::{Site, SiteKind};
use relais_core::store::Store;
use serde::Serialize;

/// Options of `relais bench`.
#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Simulated tablets pushing at once.
    #[arg(long, default_value_t = 20)]
    tablets: usize,
    /// Households each tablet registers offline before pushing.
    #[arg(long, default_value_t = 100)]
    households: usize,
    /// Households at the site a fresh tablet downloads.
    #[arg(long, default_value_t = 5_000)]
    site_size: usize,
    /// Handouts timed from tablet A to tablet B.
    #[arg(long, default_value_t = 50)]
    latency_samples: usize,
    /// Registrations a tablet pushes over a simulated 2G link (50 kbit/s, 600 ms round
    /// trip, a drop every 200 KB); 0 skips that phase.
    #[arg(long, default_value_t = 200)]
    poor_link_registrations: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Keep the store and replicas here (default: a temporary directory, removed after).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Soak instead: hold many connected tablets at a trickle of changes and report the
    /// server's RSS over time (fails if it grows or anything errs).
    #[arg(long)]
    soak: bool,
    /// Soak: connected tablets.
    #[arg(long, default_value_t = 1_000)]
    soak_tablets: usize,
    /// Soak: minutes of trickle.
    #[arg(long, default_value_t = 10.0)]
    soak_minutes: f64,
    /// Soak: changes a second, across all tablets.
    #[arg(long, default_value_t = 20.0)]
    soak_rate: f64,
    /// Soak: the server's page cache (`serve --cache-mib`). Small by default, so that it is
    /// full before the first reading: a cache still filling would look like a leak.
    #[arg(long, default_value_t = 8)]
    soak_cache_mib: u64,
    /// Soak: documents the server keeps loaded (`serve --max-loaded-docs`). Small by default
    /// for the same reason; `serve`'s own default is 20,000.
    #[arg(long, default_value_t = 300)]
    soak_max_loaded_docs: usize,
    /// Threads that apply a batch's documents at once, on the server (`serve
    /// --sync-workers`) and on every tablet (`SyncOptions::workers`) [default: the cores,
    /// at most 8].
    #[arg(long)]
    sync_workers: Option<usize>,
}

/// Everything measured in one run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// What was run.
    pub config: serde_json::Value,
    /// Changes the server merged per second while `tablets` tablets pushed.
    pub changes_per_second: f64,
    /// Households pushed in that phase.
    pub households_pushed: usize,
    /// Seconds that phase took.
    pub push_seconds: f64,
    /// CPU time (user + system) the server used in that phase, seconds, all its threads
    /// together. The tablets run on the same machine, so `households_pushed` over this is
    /// what the server alone merges per CPU-second.
    pub push_server_cpu_seconds: f64,
    /// Handout on A to visible on B, milliseconds.
    pub latency_ms_p50: f64,
    /// Same, 99th percentile.
    pub latency_ms_p99: f64,
    /// A fresh tablet downloading the site.
    pub initial_sync: Phase,
    /// That tablet reconnecting with nothing new.
    pub reconnect: Phase,
    /// A tablet holding every document on the server reconnecting with nothing new.
    pub reconnect_all: Phase,
    /// Server peak resident memory, MB.
    pub server_peak_rss_mb: f64,
    /// Server CPU time (user + system), seconds.
    pub server_cpu_seconds: f64,
    /// Bytes a tablet sent per household it pushed.
    pub wire_bytes_per_household: f64,
    /// Bytes of the Automerge changes of one household (the floor).
    pub change_bytes_per_household: f64,
    /// A tablet's registrations pushed over a simulated 2G link.
    pub poor_link: Option<PoorLink>,
    /// How the server spread the push's merging over its threads: what the push added to
    /// the `sync` counters of `GET /api/v1/status` (documents applied ahead, frames past a
    /// round's bound); null if the server did not answer.
    pub push_server_sync: serde_json::Value,
}

/// A sync over a shaped link (see [`crate::shaping::Shape::edge`]).
#[derive(Debug, Serialize)]
pub struct PoorLink {
    /// Households registered offline and pushed.
    pub registrations: usize,
    /// Seconds from the first attempt until a sync completed.
    pub seconds: f64,
    /// Sync attempts (each drop costs one).
    pub attempts: usize,
    /// Connections the link dropped.
    pub drops: u64,
    /// Bytes that crossed the link, both directions.
    pub link_bytes: u64,
    /// Bytes of the same sync on a clean link.
    pub clean_bytes: u64,
    /// Bytes sent again because of drops: link bytes minus clean bytes.
    pub resent_bytes: i64,
}

/// One sync, measured.
#[derive(Debug, Serialize)]
pub struct Phase {
    /// Documents in the replica.
    pub documents: usize,
    /// Milliseconds.
    pub ms: u64,
    /// Frames sent and received.
    pub frames: usize,
    /// Bytes sent and received.
    pub bytes: u64,
}

pub(crate) struct ServerProc {
    pub(crate) child: Child,
    /// Where it listens.
    pub(crate) addr: std::net::SocketAddr,
    /// Its sync endpoint.
    pub(crate) url: String,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `relais serve` on a free loopback port with its store at `data`, passing `extra`
/// flags through.
pub(crate) fn start_server(data: &Path, extra: &[String]) -> anyhow::Result<ServerProc> {
    use std::io::BufRead;
    let exe = std::env::current_exe().context("own executable")?;
    let mut child = Command::new(exe)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(extra)
        .env("RELAIS_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting relais serve")?;
    let out = child.stdout.take().expect("piped");
    let mut lines = std::io::BufReader::new(out).lines();
    let first = lines
        .next()
        .context("relais serve printed nothing")?
        .context("reading relais serve")?;
    let addr: std::net::SocketAddr = first
        .split("://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .context("unexpected first line of relais serve")?;
    std::thread::spawn(move || for _ in lines {});
    Ok(ServerProc {
        child,
        addr,
        url: format!("ws://{addr}/sync"),
    })
}

/// A fresh server store holding sites `codes` (region Mopti) and campaign JP-2023 with
/// `items` (e.g. `nfi-kit:1`) at all of them.
pub(crate) fn reference_store(
    data: &Path,
    codes: &[String],
    items: &[&str],
) -> anyhow::Result<Ledger> {
    let store = Store::open(data.join("relais.redb"))?;
    let ledger = Ledger::new(
        store,
        Writer {
            enumerator: "bench".into(),
            device: "bench".into(),
        },
    )?;
    for code in codes {
        ledger.put_site(&Site {
            code: code.clone(),
            name: code.clone(),
            kind: SiteKind::OfficialSite,
            admin1: "Mopti".into(),
            admin2: "Mopti".into(),
            admin3: None,
        })?;
    }
    ledger.put_campaign(&Campaign {
        code: "JP-2023".into(),
        name: "bench".into(),
        donor: None,
        start: None,
        end: None,
        items: items
            .iter()
            .map(|i| parse_entitlement(i))
            .collect::<Result<_, _>>()?,
        sites: codes.to_vec(),
    })?;
    Ok(ledger)
}

/// An enumerator token named `name` for one site, or for every site.
pub(crate) fn enumerator_token(
    ledger: &Ledger,
    name: &str,
    site: Option<&str>,
) -> anyhow::Result<String> {
    let scope = match site {
        Some(s) => Scope {
            regions: Vec::new(),
            sites: vec![s.into()],
        },
        None => Scope::all(),
    };
    let (token, _) =
        relais_server::tokens::create(ledger.store(), name, Role::Enumerator, scope, "bench")?;
    Ok(token)
}

/// A `/proc/PID/status` memory line (`VmRSS`, `VmHWM`) in MB; 0 when unreadable.
pub(crate) fn status_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Peak RSS (MB) and CPU seconds of a process, from /proc.
pub(crate) fn usage(pid: u32) -> (f64, f64) {
    let hwm = status_mb(pid, "VmHWM");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th field.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Linux reports CPU time in clock ticks of 1/100 s.
    (hwm, (ticks(11) + ticks(12)) / 100.0)
}

pub(crate) fn household(site: &str, i: usize) -> NewHousehold {
    const NAMES: [&str; 8] = [
        "Aminata Traoré",
        "Moussa Coulibaly",
        "Fatoumata Diarra",
        "Ousmane Maïga",
        "Awa Keïta",
        "Boubacar Touré",
        "Mariam Sangaré",
        "Issa Cissé",
    ];
    NewHousehold {
        site: site.into(),
        head_name: format!("{} {i}", NAMES[i % NAMES.len()]),
        members: parse_members(["F:34,M:12,F:7", "M:51,F:44,M:17,F:9,M:3", "F:29"][i % 3])
            .expect("valid"),
        origin: Some("Ténenkou".into()),
        ..Default::default()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the benchmark and prints its report.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let tmp;
    let root = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!(
                "relais-bench-{}",
                relais_core::DocumentId::random()
            ));
            tmp.clone()
        }
    };
    std::fs::create_dir_all(&root)?;
    let rt = tokio::runtime::Runtime::new()?;
    if args.soak {
        let result = rt.block_on(crate::soak::soak(
            &root,
            args.soak_tablets,
            args.soak_minutes,
            args.soak_rate,
            crate::soak::ServerCaches {
                cache_mib: args.soak_cache_mib,
                max_loaded_docs: args.soak_max_loaded_docs,
            },
        ));
        if args.dir.is_none() {
            let _ = std::fs::remove_dir_all(&root);
        }
        let report = result?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            crate::soak::print_table(&report);
        }
        if !report.errors.is_empty() {
            bail!("the soak saw {} errors", report.errors.len());
        }
        if !report.flat {
            bail!(
                "server RSS grew from {:.1} MB to {:.1} MB",
                report.rss_start_mb,
                report.rss_end_mb
            );
        }
        return Ok(());
    }
    let result = rt.block_on(bench(&root, &args));
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!("| measure | value |");
    println!("| --- | --- |");
    println!(
        "| threads applying a batch (server and each tablet) | {} |",
        r.config["sync_workers"]
    );
    println!(
        "| changes merged per second ({} households pushed at once) | {:.0} |",
        r.households_pushed, r.changes_per_second
    );
    println!(
        "| server CPU in that push / households merged per server CPU-second | {:.2} s / {:.0} |",
        r.push_server_cpu_seconds,
        r.households_pushed as f64 / r.push_server_cpu_seconds.max(0.01)
    );
    println!(
        "| of those households, applied ahead on the server's threads / frames past a round's bound | {} / {} |",
        r.push_server_sync["applied_ahead"], r.push_server_sync["frames_past_ahead_bound"]
    );
    println!(
        "| sync latency A → server → B, p50 / p99 | {:.1} ms / {:.1} ms |",
        r.latency_ms_p50, r.latency_ms_p99
    );
    println!(
        "| fresh tablet, initial sync of {} documents | {} ms, {} frames, {} bytes |",
        r.initial_sync.documents, r.initial_sync.ms, r.initial_sync.frames, r.initial_sync.bytes
    );
    println!(
        "| reconnect with nothing new, {} documents | {} ms, {} frames, {} bytes |",
        r.reconnect.documents, r.reconnect.ms, r.reconnect.frames, r.reconnect.bytes
    );
    println!(
        "| reconnect with nothing new, {} documents | {} ms, {} frames, {} bytes |",
        r.reconnect_all.documents,
        r.reconnect_all.ms,
        r.reconnect_all.frames,
        r.reconnect_all.bytes
    );
    println!(
        "| server peak RSS / CPU | {:.1} MB / {:.1} s |",
        r.server_peak_rss_mb, r.server_cpu_seconds
    );
    println!(
        "| wire bytes per household pushed / its Automerge changes | {:.0} B / {:.0} B ({:.2}×) |",
        r.wire_bytes_per_household,
        r.change_bytes_per_household,
        r.wire_bytes_per_household / r.change_bytes_per_household.max(1.0)
    );
    if let Some(p) = &r.poor_link {
        println!(
            "| 2G link (50 kbit/s, 600 ms RTT, drop every 200 KB): {} registrations | {:.1} s, {} attempts, {} drops |",
            p.registrations, p.seconds, p.attempts, p.drops
        );
        println!(
            "| 2G link bytes / same sync on a clean link / sent again | {} B / {} B / {} B |",
            p.link_bytes, p.clean_bytes, p.resent_bytes
        );
    }
}

async fn bench(root: &Path, args: &BenchArgs) -> anyhow::Result<Report> {
    if args.tablets == 0 || args.site_size == 0 {
        bail!("--tablets and --site-size must be at least 1");
    }
    // The store: one site for the pushing tablets, one for the download, a campaign.
    let data = root.join("server");
    // Each pushing tablet has its own site, so the push phase measures merging, not the
    // fan-out of every tablet's work to every other (measured by the latency phase). The
    // poor-link tablet and its clean-link twin each have a site of their own too.
    let mut codes: Vec<String> = (0..args.tablets).map(|t| format!("BEN-P{t}")).collect();
    codes.extend(["BEN-02", "BEN-2G", "BEN-LAN"].map(String::from));
    let (token, tablet_tokens, edge_token, lan_token, site_token, admin_token) = {
        let ledger = reference_store(&data, &codes, &["nfi-kit:1"])?;
        let per_tablet = (0..args.tablets)
            .map(|t| {
                enumerator_token(
                    &ledger,
                    &format!("bench-tab-{t}"),
                    Some(&format!("BEN-P{t}")),
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        (
            enumerator_token(&ledger, "bench-tablet", None)?,
            per_tablet,
            enumerator_token(&ledger, "bench-BEN-2G", Some("BEN-2G"))?,
            enumerator_token(&ledger, "bench-BEN-LAN", Some("BEN-LAN"))?,
            enumerator_token(&ledger, "bench-BEN-02", Some("BEN-02"))?,
            relais_server::tokens::create(
                ledger.store(),
                "bench-admin",
                Role::Admin,
                Scope::all(),
                "bench",
            )?
            .0,
        )
    };
    let workers = args
        .sync_workers
        .unwrap_or(SyncOptions::default().workers)
        .max(1);
    let sopts = SyncOptions {
        workers,
        ..Default::default()
    };
    let server = start_server(&data, &["--sync-workers".into(), workers.to_string()])?;
    let pid = server.child.id();
    let url = server.url.clone();
    let writer = |n: &str| Writer {
        enumerator: format!("enum-{n}"),
        device: n.to_string(),
    };

    // 1. The site a fresh tablet will download, pushed by one seeding tablet.
    let seeder = Replica::open(root.join("seeder"), writer("seeder"))?;
    seeder.sync_with(&url, &token, &sopts).await?;
    for i in 0..args.site_size {
        seeder.ledger().register(household("BEN-02", i))?;
    }
    seeder.sync_with(&url, &token, &sopts).await?;

    // 2. Tablets register offline, then all push at once.
    let mut tablets = Vec::new();
    for (t, tok) in tablet_tokens.iter().enumerate() {
        let r = Replica::open(root.join(format!("tab-{t}")), writer(&format!("tab-{t}")))?;
        r.sync_with(&url, tok, &sopts).await?;
        let site = format!("BEN-P{t}");
        for i in 0..args.households {
            r.ledger().register(household(&site, t * 100_000 + i))?;
        }
        tablets.push(Arc::new(r));
    }
    // The floor: the Automerge changes of one household as a tablet made them.
    let sample = tablets[0].ledger().household_ids(|_| true)?;
    let mut change_bytes = 0usize;
    let mut counted = 0usize;
    for id in sample.iter().take(50) {
        if let Some(s) = tablets[0].ledger().store().load(*id)? {
            if s.meta.info.sites.iter().any(|x| x == "BEN-P0") {
                change_bytes += s
                    .doc
                    .get_changes(&[])
                    .iter()
                    .map(|c| c.raw_bytes().len())
                    .sum::<usize>();
                counted += 1;
            }
        }
    }
    let cpu_before = usage(pid).1;
    let sync_before = server_sync(server.addr, &admin_token);
    let started = Instant::now();
    let mut pushes = Vec::new();
    for (r, token) in tablets.iter().zip(&tablet_tokens) {
        let (r, url, token, sopts) = (r.clone(), url.clone(), token.clone(), sopts.clone());
        pushes.push(tokio::spawn(async move {
            r.sync_with(&url, &token, &sopts).await
        }));
    }
    let mut sent_bytes = 0u64;
    let mut pushed = 0usize;
    for p in pushes {
        let s = p.await.context("push task")??;
        sent_bytes += s.bytes_sent;
        pushed += s.documents_sent;
    }
    let push_seconds = started.elapsed().as_secs_f64();
    let push_server_cpu_seconds = usage(pid).1 - cpu_before;
    let push_server_sync = counted_since(&sync_before, &server_sync(server.addr, &admin_token));

    // 3. Latency: A hands out a kit; B, connected in the background, sees it.
    let a = Arc::new(Replica::open(root.join("lat-a"), writer("lat-a"))?);
    let b = Arc::new(Replica::open(root.join("lat-b"), writer("lat-b"))?);
    a.sync_with(&url, &token, &sopts).await?;
    let targets: Vec<_> = a
        .ledger()
        .list_site("BEN-02")?
        .into_iter()
        .map(|v| v.id)
        .take(args.latency_samples)
        .collect();
    b.sync_with(&url, &token, &sopts).await?;
    let opts = SyncOptions {
        push_delay: Duration::ZERO,
        ..sopts.clone()
    };
    let bg_a = a.start_sync(&url, &token, opts.clone());
    let bg_b = b.start_sync(&url, &token, opts);
    let mut events = b.subscribe();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut lat = Vec::new();
    for h in targets {
        let t0 = Instant::now();
        a.ledger()
            .distribute_on(h, "JP-2023", "nfi-kit", 1, "2023-07-10")?;
        a.wrote();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, events.recv()).await {
                Ok(Ok(ReplicaEvent::DocumentChanged(id))) if id == h => break,
                Ok(_) => {}
                Err(_) => bail!("tablet B never saw the handout to {h}"),
            }
        }
        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    bg_a.stop().await;
    bg_b.stop().await;
    lat.sort_by(f64::total_cmp);

    // 4. A fresh tablet of the seeded site downloads it (its households, the site and the
    // campaign), then reconnects with nothing new; then one holding every document does.
    let fresh = Replica::open(root.join("fresh"), writer("fresh"))?;
    let first = fresh.sync_with(&url, &site_token, &sopts).await?;
    let docs = fresh.ledger().store().len()? as usize;
    let again = fresh.sync_with(&url, &site_token, &sopts).await?;
    let whole = Replica::open(root.join("whole"), writer("whole"))?;
    whole.sync_with(&url, &token, &sopts).await?;
    let whole_docs = whole.ledger().store().len()? as usize;
    let whole_again = whole.sync_with(&url, &token, &sopts).await?;
    let (rss, cpu) = usage(pid);

    // 5. Poor link: the same registrations on a clean link, then over 2G with drops.
    let poor_link = if args.poor_link_registrations > 0 {
        Some(
            poor_link(
                root,
                &server,
                &lan_token,
                &edge_token,
                args.poor_link_registrations,
                &sopts,
            )
            .await?,
        )
    } else {
        None
    };
    drop(server);

    Ok(Report {
        config: serde_json::json!({
            "tablets": args.tablets,
            "households_per_tablet": args.households,
            "site_size": args.site_size,
            "latency_samples": args.latency_samples,
            "sync_workers": workers,
        }),
        changes_per_second: pushed as f64 / push_seconds.max(1e-9),
        households_pushed: pushed,
        push_seconds,
        push_server_cpu_seconds,
        latency_ms_p50: percentile(&lat, 0.5),
        latency_ms_p99: percentile(&lat, 0.99),
        initial_sync: Phase {
            documents: docs,
            ms: first.elapsed_ms,
            frames: first.frames_sent + first.frames_received,
            bytes: first.bytes_sent + first.bytes_received,
        },
        reconnect: Phase {
            documents: docs,
            ms: again.elapsed_ms,
            frames: again.frames_sent + again.frames_received,
            bytes: again.bytes_sent + again.bytes_received,
        },
        reconnect_all: Phase {
            documents: whole_docs,
            ms: whole_again.elapsed_ms,
            frames: whole_again.frames_sent + whole_again.frames_received,
            bytes: whole_again.bytes_sent + whole_again.bytes_received,
        },
        server_peak_rss_mb: rss,
        server_cpu_seconds: cpu,
        wire_bytes_per_household: sent_bytes as f64 / pushed.max(1) as f64,
        change_bytes_per_household: change_bytes as f64 / counted.max(1) as f64,
        poor_link,
        push_server_sync,
    })
}

/// What each counter of `after` added to `before`; null unless both were read.
fn counted_since(before: &serde_json::Value, after: &serde_json::Value) -> serde_json::Value {
    let (Some(b), Some(a)) = (before.as_object(), after.as_object()) else {
        return serde_json::Value::Null;
    };
    a.iter()
        .map(|(k, v)| {
            let count = |x: Option<&serde_json::Value>| x.and_then(|x| x.as_u64()).unwrap_or(0);
            let added = count(Some(v)).saturating_sub(count(b.get(k)));
            (k.clone(), serde_json::Value::from(added))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The `sync` counters of the server's status, or null (with a warning) if it cannot be read:
/// they explain a figure, they are not one.
fn server_sync(addr: std::net::SocketAddr, admin_token: &str) -> serde_json::Value {
    let read = || -> anyhow::Result<serde_json::Value> {
        let text = ureq::get(&format!("http://{addr}/api/v1/status"))
            .header("Authorization", &format!("Bearer {admin_token}"))
            .call()?
            .body_mut()
            .read_to_string()?;
        let status: serde_json::Value = serde_json::from_str(&text)?;
        Ok(status["sync"].clone())
    };
    read().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the server's status");
        serde_json::Value::Null
    })
}

async fn poor_link(
    root: &Path,
    server: &ServerProc,
    lan_token: &str,
    edge_token: &str,
    n: usize,
    sopts: &SyncOptions,
) -> anyhow::Result<PoorLink> {
    let writer = |d: &str| Writer {
        enumerator: format!("enum-{d}"),
        device: d.to_string(),
    };
    let lan = Replica::open(root.join("lan"), writer("lan"))?;
    let edge = Replica::open(root.join("edge"), writer("edge"))?;
    // Reference data over the clean link for both, then a day's registrations offline.
    let url = &server.url;
    lan.sync_with(url, lan_token, sopts).await?;
    edge.sync_with(url, edge_token, sopts).await?;
    for i in 0..n {
        lan.ledger().register(household("BEN-LAN", 500_000 + i))?;
        edge.ledger().register(household("BEN-2G", 600_000 + i))?;
    }
    let clean = lan.sync_with(url, lan_token, sopts).await?;
    let proxy = crate::shaping::Proxy::start(server.addr, crate::shaping::Shape::edge()).await?;
    let via = format!("ws://{}/sync", proxy.addr);
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match edge.sync_with(&via, edge_token, sopts).await {
            Ok(_) => break,
            Err(e) if attempts < 50 => {
                tracing::debug!(error = %e, "poor-link sync dropped; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => bail!("the poor-link sync never completed: {e}"),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    use std::sync::atomic::Ordering;
    let link_bytes =
        proxy.counters.up.load(Ordering::Relaxed) + proxy.counters.down.load(Ordering::Relaxed);
    let clean_bytes = clean.bytes_sent + clean.bytes_received;
    Ok(PoorLink {
        registrations: n,
        seconds,
        attempts,
        drops: proxy.counters.drops.load(Ordering::Relaxed),
        link_bytes,
        clean_bytes,
        resent_bytes: link_bytes as i64 - clean_bytes as i64,
    })
}
