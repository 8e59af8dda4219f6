//! A stock automerge-repo 2.x JS client (pinned in tests/js/package-lock.json) syncs through
//! the real `relais serve`: create, find from a fresh client, edits both ways, concurrent
//! edits, `doc-unavailable` for unknown ids, and reading a Relais domain document.
//!
//! Needs Node.js and npm; `.ci/run` installs them. The packages are installed on first use.

use std::path::PathBuf;
use std::process::Command;

use relais_tests::*;

fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}

fn ensure_packages() {
    let dir = js_dir();
    if dir.join("node_modules/@automerge/automerge-repo").exists() {
        return;
    }
    let status = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir)
        .status()
        .expect("npm is needed for the interop test (apt-get install nodejs npm)");
    assert!(status.success(), "npm install failed in {}", dir.display());
}

#[test]
fn stock_automerge_repo_client_syncs_through_relais() {
    ensure_packages();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    seed_reference(&data);
    // A browser-style client authenticates with ?token=.
    let token = create_token(&data, "js-client", &["--role", "admin"]);
    let site = relais_core::DocumentId::derived("site", "SOC-01").url();
    // A short idle limit, so that the server pings the client many times during the run: a
    // stock client must answer them (Node's `ws` does) and never be taken for gone.
    let server = Server::start_env(&data, &[], &[("RELAIS_PEER_IDLE_SECS", "2")]);
    let out = Command::new("node")
        .arg("interop.mjs")
        .current_dir(js_dir())
        .env("RELAIS_URL", format!("{}?token={token}", server.url()))
        .env("SITE_URL", &site)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("js interop ok"),
        "node failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver log:\n{}",
        server.log()
    );
    assert!(
        !server.log().contains("heard nothing from the peer"),
        "the server dropped a stock client that answers pings:\n{}",
        server.log()
    );
    assert!(server.stop().success());
}

/// The side-by-side comparison (`tests/js/compare.sh`) keeps working: a tiny workload
/// against `relais serve` and the reference sync server. Checks what was measured, never
/// timings (those belong in BENCHMARKS.md).
#[test]
fn the_side_by_side_comparison_runs_against_both_servers() {
    ensure_packages();
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("compare.json");
    let out = Command::new("bash")
        .arg(js_dir().join("compare.sh"))
        .env("WRITERS", "2")
        .env("DOCS", "20")
        .env("CHANGES", "2")
        .env("TIMEOUT_SCALE", "4")
        .env("RELAIS_BIN", relais_bin())
        .env("OUT", &out_file)
        .output()
        .expect("run compare.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "compare.sh failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out_file).expect("compare.sh wrote OUT"))
            .expect("JSON report");
    for server in ["relais", "reference"] {
        let r = &report[server];
        assert_eq!(r["documents"], 20, "{server}: {r}");
        for key in [
            "changes_per_second",
            "fresh_fetch_seconds",
            "server_peak_rss_kb",
        ] {
            assert!(
                r[key].as_f64().is_some_and(|v| v > 0.0),
                "{server}.{key}: {r}"
            );
        }
        // The fresh client received every document.
        assert!(
            r["fresh_messages_received"].as_u64() >= Some(20),
            "{server}: {r}"
        );
    }
    assert!(
        report["ratios"]["server_peak_rss"].as_f64().is_some(),
        "{report}"
    );
}
