fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let l = relais_core::ledger::Ledger::new(
        relais_core::store::Store::open(dir.path().join("x.redb")).unwrap(),
        relais_core::ledger::Writer {
            enumerator: "e".into(),
            device: "d".into(),
        },
    )
    .unwrap();
    l.put_site(&relais_core::site::Site {
        code: "SOC-01".into(),
        name: "S".into(),
        kind: relais_core::site::SiteKind::OfficialSite,
        admin1: "Mopti".into(),
        admin2: "Mopti".into(),
        admin3: None,
    })
    .unwrap();
    let t = std::time::Instant::now();
    for i in 0..n {
        l.register(relais_tests::household("SOC-01", &format!("hh {i}")))
            .unwrap();
        if (i + 1) % 250 == 0 {
            eprintln!("{}: {:?} per register", i + 1, t.elapsed() / (i as u32 + 1));
        }
    }
}
