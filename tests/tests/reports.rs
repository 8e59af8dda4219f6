//! Field integrity and reporting through the real server: scoped figures, HXL exports, the
//! audited household export, a double handout resolved on one tablet reaching another, and
//! `relais demo` end to end.

use relais_core::ledger::Decision;
use relais_tests::*;
use serde_json::Value;

/// The body of a possibly chunked HTTP response, de-chunked.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_string();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_string();
        };
        if n == 0 {
            return out;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_scoped_exports_are_tagged_and_resolutions_sync() {
    let (dir, data, admin) = seeded_data_dir();
    let server = Server::start(&data, &[]);
    let mopti = api_token(
        &server,
        &admin,
        "tab-soc",
        "enumerator",
        r#""sites":["SOC-01"]"#,
    );
    let gao = api_token(
        &server,
        &admin,
        "tab-gao",
        "enumerator",
        r#""sites":["GAO-01"]"#,
    );
    let a = replica(dir.path(), "a");
    let b = replica(dir.path(), "b");
    let g = replica(dir.path(), "g");
    a.sync(&server.url(), &mopti).await.unwrap();
    g.sync(&server.url(), &gao).await.unwrap();
    let h = a
        .ledger()
        .register(household("SOC-01", "Aminata Traoré"))
        .unwrap();
    a.ledger()
        .register(household("SOC-01", "Moussa Diarra"))
        .unwrap();
    g.ledger()
        .register(household("GAO-01", "Issa Maïga"))
        .unwrap();
    a.sync(&server.url(), &mopti).await.unwrap();
    g.sync(&server.url(), &gao).await.unwrap();
    b.sync(&server.url(), &mopti).await.unwrap();
    // Both Socoura tablets hand the same kit while offline.
    a.ledger()
        .distribute_on(h, "JP-2023", "nfi-kit", 1, "2023-07-10")
        .unwrap();
    b.ledger()
        .distribute_on(h, "JP-2023", "nfi-kit", 1, "2023-07-10")
        .unwrap();
    a.sync(&server.url(), &mopti).await.unwrap();
    b.sync(&server.url(), &mopti).await.unwrap();
    a.sync(&server.url(), &mopti).await.unwrap();

    // Figures per caller scope.
    let figures = |tok: &str| -> Value {
        let (s, t) = http(
            server.addr,
            "GET",
            "/api/v1/reports/figures",
            Some(tok),
            None,
        );
        assert_eq!(s, 200, "{t}");
        serde_json::from_str(&t).unwrap()
    };
    assert_eq!(figures(&admin)["total"]["households"], 3);
    assert_eq!(figures(&mopti)["total"]["households"], 2);
    assert_eq!(figures(&gao)["total"]["households"], 1);
    assert_eq!(figures(&gao)["sites"][0]["site"], "GAO-01");
    assert_eq!(
        http(server.addr, "GET", "/api/v1/reports/figures", None, None).0,
        401
    );
    // The double handout is flagged for Mopti, invisible to Gao.
    let (_, t) = http(
        server.addr,
        "GET",
        "/api/v1/reports/doubles",
        Some(&mopti),
        None,
    );
    let doubles: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(doubles.as_array().unwrap().len(), 1, "{t}");
    assert_eq!(doubles[0]["slot"]["handouts"].as_array().unwrap().len(), 2);
    let (_, t) = http(
        server.addr,
        "GET",
        "/api/v1/reports/doubles",
        Some(&gao),
        None,
    );
    assert_eq!(t, "[]");

    // A manager on tablet B voids B's handout; A sees the resolution after syncing.
    let flags = b.ledger().double_distributions().unwrap();
    let keep = flags[0]
        .slot
        .handouts
        .iter()
        .position(|d| d.device == "a")
        .unwrap();
    b.ledger()
        .resolve_double(h, "JP-2023", "nfi-kit", Decision::Keep(keep))
        .unwrap();
    b.sync(&server.url(), &mopti).await.unwrap();
    a.sync(&server.url(), &mopti).await.unwrap();
    let seen = a.ledger().double_distributions().unwrap();
    let res = seen[0]
        .resolution
        .as_ref()
        .expect("resolution reached tablet A");
    assert_eq!(
        (res.decision.as_str(), res.device.as_str()),
        ("voided", "b")
    );
    assert_eq!(seen[0].slot.handouts.len(), 1);
    let (_, t) = http(
        server.addr,
        "GET",
        "/api/v1/reports/doubles",
        Some(&admin),
        None,
    );
    assert!(t.contains("\"voided\""), "{t}");
    assert_eq!(figures(&admin)["distributions"][0]["quantity"], 1);

    // Aggregated export with HXL tags, in scope.
    let (s, t) = http(
        server.addr,
        "GET",
        "/api/v1/exports/sites.csv?hxl=1",
        Some(&mopti),
        None,
    );
    assert_eq!(s, 200);
    let csv = dechunk(&t);
    let lines: Vec<&str> = csv.lines().collect();
    assert!(
        lines[1].starts_with("#adm1+name,#adm2+name,#loc+name,#loc+code,#affected+idps+hh"),
        "{csv}"
    );
    assert_eq!(lines.len(), 3, "Mopti's one site only:\n{csv}");
    assert!(lines[2].contains("SOC-01"));
    assert!(!csv.contains("Aminata"));
    // Household level: admins only, audited, and it holds the names.
    let (s, _) = http(
        server.addr,
        "GET",
        "/api/v1/exports/households.csv",
        Some(&mopti),
        None,
    );
    assert_eq!(s, 403);
    let (s, t) = http(
        server.addr,
        "GET",
        "/api/v1/exports/households.csv",
        Some(&admin),
        None,
    );
    assert_eq!(s, 200);
    let csv = dechunk(&t);
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(csv.contains("Aminata Traoré"));
    let (_, t) = http(
        server.addr,
        "GET",
        "/api/v1/audit?action=export",
        Some(&admin),
        None,
    );
    let audit: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(audit["entries"].as_array().unwrap().len(), 1, "{t}");
    // The command line reads the same through the API.
    let base = format!("http://{}", server.addr);
    let out = relais_ok(&[
        "export",
        "distributions",
        "--hxl",
        "--server",
        &base,
        "--admin-token",
        &admin,
    ]);
    assert!(out.lines().nth(1).unwrap().contains("#reached+hh"), "{out}");
    assert!(out.contains("JP-2023,Mopti,SOC-01,nfi-kit,1,1"), "{out}");
    assert!(server.stop().success());
    // And from the store with the server stopped.
    let out = relais_ok(&["report", "--data", data.to_str().unwrap(), "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["total"]["households"], 3);
}

#[test]
fn the_demo_shows_a_double_handout_and_a_duplicate_from_offline_work() {
    let out = relais(&["demo", "--households", "4"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("TOTAL"), "{text}");
    let doubles = text
        .split("== Flagged: the same kit handed twice")
        .nth(1)
        .unwrap();
    assert!(doubles.contains("OPEN"), "{text}");
    assert!(
        doubles.contains("on tab-mopti-1") && doubles.contains("on tab-mopti-2"),
        "{text}"
    );
    let dups = text
        .split("possible duplicate registrations")
        .nth(1)
        .unwrap();
    assert!(
        dups.contains("Fatoumata Kouyaté") && dups.contains("Fatumata Kuyate"),
        "{text}"
    );
}
