//! The load generator keeps working: a tiny configuration, checked for what it measured,
//! never for how fast (timings belong in BENCHMARKS.md).

use relais_tests::*;
use serde_json::Value;

#[test]
fn the_load_generator_runs_a_tiny_configuration() {
    let out = relais(&[
        "bench",
        "--tablets",
        "2",
        "--households",
        "5",
        "--site-size",
        "20",
        "--latency-samples",
        "3",
        "--poor-link-registrations",
        "5",
        // Batches applied on two threads on both ends, whatever the cores here.
        "--sync-workers",
        "2",
        "--json",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["households_pushed"], 10);
    assert_eq!(r["config"]["sync_workers"], 2);
    assert!(r["changes_per_second"].as_f64().unwrap() > 0.0);
    assert!(r["push_server_cpu_seconds"].as_f64().unwrap() >= 0.0);
    // Each tablet's five new households come in one batch, applied on the server's two
    // threads; nothing else was merged before the status was read.
    assert_eq!(r["push_server_sync"]["applied_ahead"], 10, "{r}");
    assert_eq!(r["push_server_sync"]["frames_past_ahead_bound"], 0, "{r}");
    assert!(r["latency_ms_p50"].as_f64().unwrap() > 0.0);
    assert!(r["latency_ms_p99"].as_f64().unwrap() >= r["latency_ms_p50"].as_f64().unwrap());
    // The downloaded site: its 20 households, the site and the campaign.
    assert_eq!(r["initial_sync"]["documents"], 22);
    // Everything: 5 sites (one per pushing tablet, one to download, two for the poor-link
    // phase), 1 campaign, 20 + 10 households.
    assert_eq!(r["reconnect_all"]["documents"], 36);
    for phase in ["reconnect", "reconnect_all"] {
        assert_eq!(
            r[phase]["frames"], 4,
            "a reconnect with nothing new is join, peer, request, reply"
        );
        assert!(r[phase]["bytes"].as_u64().unwrap() < 1024);
    }
    assert!(r["server_peak_rss_mb"].as_f64().unwrap() > 0.0);
    assert!(r["change_bytes_per_household"].as_f64().unwrap() > 0.0);
    assert!(r["wire_bytes_per_household"].as_f64().unwrap() > 0.0);
    let poor = &r["poor_link"];
    assert_eq!(poor["registrations"], 5);
    assert!(poor["attempts"].as_u64().unwrap() >= 1);
    assert!(
        poor["link_bytes"].as_u64().unwrap() >= poor["clean_bytes"].as_u64().unwrap() / 2,
        "{poor}"
    );
}

#[test]
fn the_soak_runs_a_tiny_configuration() {
    let out = relais(&[
        "bench",
        "--soak",
        "--soak-tablets",
        "30",
        "--soak-minutes",
        "0.25",
        "--soak-rate",
        "20",
        "--soak-cache-mib",
        "4",
        "--soak-max-loaded-docs",
        "50",
        "--json",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    // The report comes out even when the run fails; whether 15 s is long enough to call the
    // RSS flat is for the documented 10-minute run, so the exit status is not checked here.
    let r: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "no report ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(r["tablets"], 30);
    assert_eq!(r["server_caches"]["cache_mib"], 4, "{r}");
    assert_eq!(r["server_caches"]["max_loaded_docs"], 50, "{r}");
    assert!(r["changes"].as_u64().unwrap() > 20, "{r}");
    assert_eq!(r["unconfirmed_tablets"], 0, "{r}");
    assert_eq!(r["errors"].as_array().unwrap().len(), 0, "{r}");
    assert!(r["rss_start_mb"].as_f64().unwrap() > 0.0);
    assert!(r["rss_samples"].as_array().unwrap().len() >= 2);
}
