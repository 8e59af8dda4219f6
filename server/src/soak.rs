//! `relais bench --soak`: holds many connected tablets (relais-client replicas in background
//! sync) against a real `relais serve` process for minutes, at a steady trickle of changes,
//! and reports the server's RSS over time, disconnections and errors. The server's memory
//! must stay flat: a leak per message or per connection shows as growth here. The server runs
//! with small caches (an 8 MiB page cache, 300 loaded documents) unless told otherwise, so
//! that both are full before the first reading; a cache still filling towards its cap would
//! grow like a leak.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use relais_client::{Replica, SyncOptions, Writer};
use serde::Serialize;

use crate::bench::{enumerator_token, household, reference_store, start_server, status_mb};

/// Tablets per site: about one team's tablets.
const PER_SITE: usize = 20;

/// Households each tablet registered offline before the soak, pushed when it connects: the
/// server's working set is warm before the first RSS reading.
const OFFLINE_PER_TABLET: usize = 3;

/// The server's two caches, set for a soak. Both fill as documents are written and read,
/// up to their caps; while they fill, RSS grows without any leak.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ServerCaches {
    /// redb's page cache, MiB (`serve --cache-mib`).
    pub cache_mib: u64,
    /// Automerge documents kept loaded (`serve --max-loaded-docs`).
    pub max_loaded_docs: usize,
}

/// What a soak run saw.
#[derive(Debug, Serialize)]
pub struct SoakReport {
    /// Connected tablets.
    pub tablets: usize,
    /// Minutes the trickle ran.
    pub minutes: f64,
    /// The server's caches in this run.
    pub server_caches: ServerCaches,
    /// Changes written by tablets (registrations and handouts).
    pub changes: u64,
    /// Seconds until every tablet was connected.
    pub connect_seconds: f64,
    /// Server RSS once every tablet was connected and the store warm, MB.
    pub rss_start_mb: f64,
    /// Server RSS at the end, MB.
    pub rss_end_mb: f64,
    /// Server peak RSS, MB.
    pub rss_peak_mb: f64,
    /// RSS samples (minute, MB).
    pub rss_samples: Vec<(f64, f64)>,
    /// Samples at which some tablet was not connected, summed over tablets.
    pub disconnected_samples: u64,
    /// Tablets with changes not confirmed by the server after the trickle stopped.
    pub unconfirmed_tablets: usize,
    /// Errors: failed writes, a server that died, tablets left unconfirmed.
    pub errors: Vec<String>,
    /// End RSS within 10 % (plus 8 MB of allocator slack) of the start.
    pub flat: bool,
}

fn rss_mb(pid: u32) -> f64 {
    status_mb(pid, "VmRSS")
}

/// Runs the soak with `tablets` tablets for `minutes`, writing `rate` changes a second.
pub async fn soak(
    root: &Path,
    tablets: usize,
    minutes: f64,
    rate: f64,
    caches: ServerCaches,
) -> anyhow::Result<SoakReport> {
    if tablets == 0 || rate <= 0.0 || minutes <= 0.0 {
        bail!("--soak-tablets, --soak-rate and --soak-minutes must be positive");
    }
    let sites = tablets.div_ceil(PER_SITE);
    let data = root.join("server");
    let codes: Vec<String> = (0..sites).map(|s| format!("SOAK-{s:03}")).collect();
    let tokens = {
        let ledger = reference_store(&data, &codes, &["nfi-kit:1", "shelter-kit:1"])?;
        (0..tablets)
            .map(|t| {
                enumerator_token(
                    &ledger,
                    &format!("soak-tab-{t}"),
                    Some(&codes[t / PER_SITE]),
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let mut server = start_server(
        &data,
        &[
            "--cache-mib".to_string(),
            caches.cache_mib.to_string(),
            "--max-loaded-docs".to_string(),
            caches.max_loaded_docs.to_string(),
        ],
    )?;
    let pid = server.child.id();
    let url = server.url.clone();
    eprintln!(
        "soak: {tablets} tablets at {sites} sites against {url} (server page cache {} MiB, {} documents loaded at most)",
        caches.cache_mib, caches.max_loaded_docs
    );

    let started = Instant::now();
    let mut replicas = Vec::with_capacity(tablets);
    let mut syncs = Vec::with_capacity(tablets);
    let opts = SyncOptions {
        max_backoff: Duration::from_secs(5),
        ..SyncOptions::default()
    };
    for (t, tok) in tokens.iter().enumerate() {
        let r = Arc::new(Replica::open(
            root.join(format!("tab-{t}")),
            Writer {
                enumerator: format!("enum-{t}"),
                device: format!("soak-tab-{t}"),
            },
        )?);
        // The reference data first, then a morning's offline registrations.
        r.sync(&url, tok).await?;
        let site = format!("SOAK-{:03}", t / PER_SITE);
        for i in 0..OFFLINE_PER_TABLET {
            r.ledger().register(household(&site, t * 1_000 + i))?;
        }
        syncs.push(r.start_sync(&url, tok, opts.clone()));
        replicas.push(r);
    }
    let connected = |rs: &[Arc<Replica>]| {
        rs.iter()
            .filter(|r| r.status().map(|s| s.connected).unwrap_or(false))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let n = connected(&replicas);
        if n == tablets {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {n} of {tablets} tablets connected within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    // Warm: every offline registration confirmed, and colleagues' work fetched.
    let warm = Instant::now() + Duration::from_secs(300);
    while replicas
        .iter()
        .any(|r| r.status().map(|s| s.pending_documents > 0).unwrap_or(true))
    {
        if Instant::now() > warm {
            bail!("the tablets' offline work was not confirmed within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss_start = rss_mb(pid);
    eprintln!(
        "soak: all connected in {connect_seconds:.1} s; server RSS {rss_start:.1} MB; trickling {rate} changes/s for {minutes} min"
    );

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut errors = Vec::new();
    let mut changes = 0u64;
    let mut samples = vec![(0.0, rss_start)];
    let mut disconnected = 0u64;
    let run = Duration::from_secs_f64(minutes * 60.0);
    let tick = Duration::from_secs_f64(1.0 / rate);
    let trickle = Instant::now();
    let mut next_sample = Duration::from_secs(10);
    let mut serial = 0usize;
    while trickle.elapsed() < run {
        let t = rng.random_range(0..tablets);
        let r = &replicas[t];
        let site = format!("SOAK-{:03}", t / PER_SITE);
        let held = r.ledger().household_ids(|_| true)?;
        // Mostly edits of known households (a phone number corrected, a kit handed out), a
        // few new registrations: the working set grows slowly, as in the field.
        let roll = rng.random_range(0..100);
        let result = if held.is_empty() || roll < 10 {
            serial += 1;
            r.ledger()
                .register(household(&site, 10_000_000 + serial))
                .map(|_| ())
        } else if roll < 70 {
            let h = held[rng.random_range(0..held.len())];
            let update = relais_core::household::HouseholdUpdate {
                contact: Some(format!("+223 7{:07}", rng.random_range(0..10_000_000))),
                ..Default::default()
            };
            r.ledger().update(h, &update)
        } else {
            let h = held[rng.random_range(0..held.len())];
            let item = if rng.random_bool(0.5) {
                "nfi-kit"
            } else {
                "shelter-kit"
            };
            match r
                .ledger()
                .distribute_on(h, "JP-2023", item, 1, "2023-07-10")
            {
                // Already handed out: the app would refuse too; not an error of the sync.
                Err(relais_core::ledger::LedgerError::Validation(_)) => Ok(()),
                other => other.map(|_| ()),
            }
        };
        match result {
            Ok(()) => {
                changes += 1;
                r.wrote();
            }
            Err(e) => errors.push(format!("tablet {t}: write failed: {e}")),
        }
        if trickle.elapsed() >= next_sample {
            next_sample += Duration::from_secs(10);
            if let Some(status) = server.child.try_wait()? {
                bail!("the server exited during the soak: {status}");
            }
            let rss = rss_mb(pid);
            let up = connected(&replicas);
            disconnected += (tablets - up) as u64;
            let minute = trickle.elapsed().as_secs_f64() / 60.0;
            samples.push((minute, rss));
            eprintln!(
                "soak: {minute:5.1} min, {changes} changes, {up}/{tablets} connected, server RSS {rss:.1} MB"
            );
        }
        tokio::time::sleep(tick).await;
    }
    // Let the last pushes land, then see that every tablet's work was confirmed.
    let settle = Instant::now() + Duration::from_secs(60);
    let mut unconfirmed;
    loop {
        unconfirmed = replicas
            .iter()
            .filter(|r| r.status().map(|s| s.pending_documents > 0).unwrap_or(true))
            .count();
        if unconfirmed == 0 || Instant::now() > settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if unconfirmed > 0 {
        errors.push(format!(
            "{unconfirmed} tablets still had unconfirmed changes a minute after the trickle"
        ));
    }
    let rss_end = rss_mb(pid);
    let (peak, _) = crate::bench::usage(pid);
    samples.push((trickle.elapsed().as_secs_f64() / 60.0, rss_end));
    for s in syncs {
        s.stop().await;
    }
    if let Some(status) = server.child.try_wait().context("server status")? {
        errors.push(format!("the server exited: {status}"));
    }
    drop(server);
    Ok(SoakReport {
        tablets,
        minutes,
        server_caches: caches,
        changes,
        connect_seconds,
        rss_start_mb: rss_start,
        rss_end_mb: rss_end,
        rss_peak_mb: peak,
        rss_samples: samples,
        disconnected_samples: disconnected,
        unconfirmed_tablets: unconfirmed,
        flat: rss_end <= rss_start * 1.10 + 8.0,
        errors,
    })
}

/// Prints a soak report as a table.
pub fn print_table(r: &SoakReport) {
    println!("| measure | value |");
    println!("| --- | --- |");
    println!(
        "| tablets connected / minutes / changes written | {} / {:.1} / {} |",
        r.tablets, r.minutes, r.changes
    );
    println!(
        "| server page cache / documents kept loaded | {} MiB / {} |",
        r.server_caches.cache_mib, r.server_caches.max_loaded_docs
    );
    println!("| all connected after | {:.1} s |", r.connect_seconds);
    println!(
        "| server RSS start → end (peak) | {:.1} MB → {:.1} MB ({:.1} MB) |",
        r.rss_start_mb, r.rss_end_mb, r.rss_peak_mb
    );
    println!("| flat | {} |", if r.flat { "yes" } else { "NO" });
    println!(
        "| tablet-samples disconnected | {} |",
        r.disconnected_samples
    );
    println!("| tablets left unconfirmed | {} |", r.unconfirmed_tablets);
    println!("| errors | {} |", r.errors.len());
    for e in &r.errors {
        println!("| | {e} |");
    }
}
