//! `relais demo`: a server, five tablets in Mopti and Gao working offline through a day of
//! registrations and distributions, a sync, and what a data manager then sees.
//!
//! Nothing is inserted by hand into the results: the double handout and the duplicate
//! registration come from two tablets doing their ordinary work while cut off from each
//! other, exactly as in the field.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relais_client::{Replica, Writer};
use relais_core::access::{Role, Scope};
use relais_core::campaign::{parse_entitlement, Campaign};
use relais_core::household::{parse_members, NewHousehold, Vulnerability};
use relais_core::ledger::Ledger;
use relais_core::site::{Site, SiteKind};
use relais_core::DocumentId;
use relais_server::{config::ServerConfig, tokens};

/// Options of `relais demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Keep the demo's server store and tablets here (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Households each tablet registers.
    #[arg(long, default_value_t = 12)]
    households: usize,
    /// Seed for the simulated field work.
    #[arg(long, default_value_t = 2023)]
    seed: u64,
}

const GIVEN: [&str; 16] = [
    "Aminata",
    "Fatoumata",
    "Mariam",
    "Awa",
    "Kadiatou",
    "Oumou",
    "Hawa",
    "Bintou",
    "Moussa",
    "Ousmane",
    "Boubacar",
    "Seydou",
    "Amadou",
    "Ibrahim",
    "Hamidou",
    "Issa",
];
const FAMILY: [&str; 14] = [
    "Traoré",
    "Coulibaly",
    "Diarra",
    "Keïta",
    "Sangaré",
    "Maïga",
    "Touré",
    "Cissé",
    "Dicko",
    "Diallo",
    "Ag Alhassane",
    "Sidibé",
    "Guindo",
    "Kassogué",
];
const ORIGINS: [&str; 6] = [
    "Ténenkou",
    "Youwarou",
    "Djenné",
    "Ansongo",
    "Ménaka",
    "Bourem",
];

struct Tablet {
    name: &'static str,
    site: &'static str,
    token: String,
    replica: Replica,
}

fn random_household(rng: &mut StdRng, site: &str) -> NewHousehold {
    let size = rng.random_range(1..=7);
    let members: Vec<String> = (0..size)
        .map(|i| {
            let sex = if rng.random_bool(0.55) { "F" } else { "M" };
            let age = if i == 0 {
                rng.random_range(18..70)
            } else {
                rng.random_range(0..40)
            };
            format!("{sex}:{age}")
        })
        .collect();
    let vulnerabilities = match rng.random_range(0..10) {
        0 => vec![Vulnerability::Widow],
        1 => vec![Vulnerability::Elderly],
        2 => vec![Vulnerability::SingleParent],
        _ => Vec::new(),
    };
    NewHousehold {
        site: site.into(),
        head_name: format!(
            "{} {}",
            GIVEN[rng.random_range(0..GIVEN.len())],
            FAMILY[rng.random_range(0..FAMILY.len())]
        ),
        members: parse_members(&members.join(",")).expect("valid members"),
        origin: Some(ORIGINS[rng.random_range(0..ORIGINS.len())].into()),
        displacement_date: Some("2023-05-14".into()),
        vulnerabilities,
        ..Default::default()
    }
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let tmp;
    let root = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile_dir()?;
            tmp.clone()
        }
    };
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(demo(&root, &args));
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("relais-demo-{}", DocumentId::random()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn step(text: &str) {
    println!("\n== {text}");
}

async fn demo(root: &std::path::Path, args: &DemoArgs) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    step("Bamako sets up the server: sites, a campaign, a token per tablet");
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().expect("valid"),
        data: root.join("server"),
        ..ServerConfig::default()
    };
    let store = relais_server::open_store(&cfg)?;
    let admin_ledger = Ledger::new(
        store.clone(),
        Writer {
            enumerator: "data-manager".into(),
            device: "bamako".into(),
        },
    )?;
    let sites = [
        ("SOC-01", "Socoura", "Mopti", "Mopti"),
        ("SOC-02", "Sévaré", "Mopti", "Mopti"),
        ("GAO-01", "Gao Château", "Gao", "Gao"),
    ];
    for (code, name, adm1, adm2) in sites {
        admin_ledger.put_site(&Site {
            code: code.into(),
            name: name.into(),
            kind: SiteKind::OfficialSite,
            admin1: adm1.into(),
            admin2: adm2.into(),
            admin3: None,
        })?;
        println!("   site {code} {name} ({adm1})");
    }
    admin_ledger.put_campaign(&Campaign {
        code: "JP-2023".into(),
        name: "Responding to the needs of IDPs in northern and central Mali".into(),
        donor: Some("ECHO".into()),
        start: Some("2023-07-01".into()),
        end: Some("2023-08-31".into()),
        items: vec![
            parse_entitlement("nfi-kit:1")?,
            parse_entitlement("shelter-kit:1")?,
        ],
        sites: vec!["SOC-01".into(), "SOC-02".into(), "GAO-01".into()],
    })?;
    println!("   campaign JP-2023: one NFI kit and one shelter kit per household");
    let plan: [(&'static str, &'static str); 5] = [
        ("tab-mopti-1", "SOC-01"),
        ("tab-mopti-2", "SOC-01"),
        ("tab-mopti-3", "SOC-02"),
        ("tab-gao-1", "GAO-01"),
        ("tab-gao-2", "GAO-01"),
    ];
    let mut tablets = Vec::new();
    for (name, site) in plan {
        let scope = Scope {
            regions: Vec::new(),
            sites: vec![site.into()],
        };
        let (token, _) = tokens::create(&store, name, Role::Enumerator, scope, "demo")?;
        let replica = Replica::open(
            root.join("tablets").join(name),
            Writer {
                enumerator: format!("enum-{name}"),
                device: name.into(),
            },
        )?;
        tablets.push(Tablet {
            name,
            site,
            token,
            replica,
        });
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let url = format!("ws://{addr}/sync");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(relais_server::serve(
        cfg.clone(),
        store.clone(),
        listener,
        async move {
            let _ = stop_rx.await;
        },
    ));
    println!("   server listening on {url}");

    step("Morning: each tablet syncs once, then goes out of range");
    for t in &tablets {
        let s = t.replica.sync(&url, &t.token).await?;
        println!(
            "   {:<12} received {} documents (its site and the campaign)",
            t.name, s.documents_received
        );
    }

    step("Offline: enumerators register households");
    let mut registered: Vec<Vec<DocumentId>> = Vec::new();
    for t in &tablets {
        let mut ids = Vec::new();
        for _ in 0..args.households {
            ids.push(
                t.replica
                    .ledger()
                    .register(random_household(&mut rng, t.site))?,
            );
        }
        registered.push(ids);
        println!(
            "   {:<12} registered {} households at {}",
            t.name, args.households, t.site
        );
    }
    // A family queues at both gates of Socoura: two enumerators register it, each spelling
    // the name their own way.
    let family = |head: &str| NewHousehold {
        site: "SOC-01".into(),
        head_name: head.into(),
        members: parse_members("F:38,M:16,F:11,M:4").expect("valid"),
        origin: Some("Ténenkou".into()),
        displacement_date: Some("2023-06-02".into()),
        vulnerabilities: vec![Vulnerability::Widow],
        ..Default::default()
    };
    tablets[0]
        .replica
        .ledger()
        .register(family("Fatoumata Kouyaté"))?;
    tablets[1]
        .replica
        .ledger()
        .register(family("Fatumata Kuyate"))?;
    println!("   tab-mopti-1 and tab-mopti-2 both met a widow from Ténenkou with three children");

    step("Midday: the tablets come back in range and sync (twice: the first ones to sync hear of the others' work on the second pass)");
    for round in 0..2 {
        for t in &tablets {
            let s = t.replica.sync(&url, &t.token).await?;
            if round == 0 {
                println!(
                    "   {:<12} sent {:>2} documents ({} B out)",
                    t.name, s.documents_sent, s.bytes_sent
                );
            }
        }
    }
    for t in &tablets {
        println!(
            "   {:<12} now holds {} households of {}",
            t.name,
            t.replica.ledger().list_site(t.site)?.len(),
            t.site
        );
    }

    step("Afternoon, offline again: kits handed out at the distribution points");
    for (i, t) in tablets.iter().enumerate() {
        let at_site = t.replica.ledger().list_site(t.site)?;
        let item = if t.site.starts_with("GAO") {
            "shelter-kit"
        } else {
            "nfi-kit"
        };
        // Each tablet serves the households it registered; the two Socoura tablets both
        // serve the first household registered at the other gate: it queued twice.
        let mut serve: Vec<DocumentId> = registered[i].clone();
        if i == 0 {
            serve.extend(registered[1].first());
        }
        let mut n = 0;
        for h in serve {
            if at_site.iter().any(|v| v.id == h)
                && t.replica
                    .ledger()
                    .distribute_on(h, "JP-2023", item, 1, "2023-07-12")
                    .is_ok()
            {
                n += 1;
            }
        }
        println!("   {:<12} handed out {n} {item}s", t.name);
    }

    step("Evening: every tablet syncs; the server merges");
    for _ in 0..2 {
        for t in &tablets {
            t.replica.sync(&url, &t.token).await?;
        }
    }
    println!("   done: every tablet and the server hold the same records");

    step("What the data manager sees: figures (relais report)");
    let figures = admin_ledger.report(|_| true)?;
    crate::print_figures(&serde_json::to_value(&figures)?);

    step("Flagged: the same kit handed twice (relais report doubles)");
    let doubles = admin_ledger.double_distributions()?;
    crate::print_doubles(&serde_json::to_value(&doubles)?);

    step("Flagged: possible duplicate registrations (relais report duplicates)");
    let dups = admin_ledger.duplicate_candidates()?;
    crate::print_duplicates(&serde_json::to_value(&dups)?);
    for c in dups.iter().take(1) {
        for id in [c.a, c.b] {
            let v = admin_ledger.household(id)?;
            println!(
                "   {id}: {} ({} people, from {}) registered on {}",
                v.household.head_name,
                v.household.size,
                v.household.origin.as_deref().unwrap_or("?"),
                v.household.registered.device
            );
        }
    }
    println!(
        "\nA manager resolves these with `relais field resolve` and `relais field mark-duplicate`;\nthe resolutions sync like any other edit."
    );
    let _ = stop_tx.send(());
    server
        .await
        .context("server task")?
        .context("server failed")?;
    Ok(())
}
