//! Helpers shared by the core integration tests.
#![allow(dead_code)]

use relais_core::campaign::{Campaign, Entitlement};
use relais_core::household::{parse_members, NewHousehold};
use relais_core::ledger::{Ledger, Writer};
use relais_core::site::{Site, SiteKind};
use relais_core::store::Store;

/// A ledger on a fresh redb file in `dir`, writing as `device`.
pub fn ledger(dir: &std::path::Path, device: &str) -> Ledger {
    let store = Store::open(dir.join(format!("{device}.redb"))).unwrap();
    Ledger::new(
        store,
        Writer {
            enumerator: format!("enum-{device}"),
            device: device.into(),
        },
    )
    .unwrap()
}

pub fn site(code: &str, region: &str) -> Site {
    Site {
        code: code.into(),
        name: format!("Site {code}"),
        kind: SiteKind::OfficialSite,
        admin1: region.into(),
        admin2: region.into(),
        admin3: None,
    }
}

pub fn campaign(code: &str, sites: &[&str]) -> Campaign {
    Campaign {
        code: code.into(),
        name: "Responding to the needs of IDPs".into(),
        donor: Some("ECHO".into()),
        start: Some("2023-07-01".into()),
        end: Some("2023-08-31".into()),
        items: vec![
            Entitlement {
                item: "nfi-kit".into(),
                quantity: 1,
            },
            Entitlement {
                item: "shelter-kit".into(),
                quantity: 1,
            },
            Entitlement {
                item: "tarpaulin".into(),
                quantity: 2,
            },
        ],
        sites: sites.iter().map(|s| s.to_string()).collect(),
    }
}

/// Seeds a ledger with site SOC-01 (Mopti) and campaign JP-2023.
pub fn seed(l: &Ledger) {
    l.put_site(&site("SOC-01", "Mopti")).unwrap();
    l.put_site(&site("GAO-01", "Gao")).unwrap();
    l.put_campaign(&campaign("JP-2023", &["SOC-01", "GAO-01"]))
        .unwrap();
}

pub fn new_household(site: &str, name: &str) -> NewHousehold {
    NewHousehold {
        site: site.into(),
        head_name: name.into(),
        members: parse_members("F:34,M:12,F:7").unwrap(),
        ..Default::default()
    }
}

/// Copies every document of `from` into `to` (an in-process merge, as a sync would).
pub fn merge_into(from: &Store, to: &Ledger) {
    for (id, _) in from.list().unwrap() {
        let doc = from.load(id).unwrap().unwrap().doc;
        let bytes = doc.save();
        to.store().apply(id, &bytes, |d| to.describe(d)).unwrap();
    }
}

/// Two ledgers in a temporary directory, both seeded with the same reference data.
pub fn forked() -> (
    tempfile::TempDir,
    relais_core::ledger::Ledger,
    relais_core::ledger::Ledger,
) {
    let dir = tempfile::tempdir().unwrap();
    let a = ledger(dir.path(), "tab-a");
    let b = ledger(dir.path(), "tab-b");
    seed(&a);
    merge_into(a.store(), &b);
    (dir, a, b)
}
