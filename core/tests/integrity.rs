//! Field integrity: resolving double handouts (and the resolution syncing), possible
//! duplicate registrations with true and false cases, and report figures on a known dataset.

mod common;

use common::*;
use relais_core::household::{parse_members, HouseholdUpdate, NewHousehold, Status, Vulnerability};
use relais_core::ledger::{Decision, LedgerError};
use relais_core::validation::ValidationError;

fn sync(a: &relais_core::ledger::Ledger, b: &relais_core::ledger::Ledger) {
    merge_into(a.store(), b);
    merge_into(b.store(), a);
}

#[test]
fn voiding_a_double_handout_syncs_and_records_who_resolved_it() {
    let (_d, a, b) = forked();
    let hh = a
        .register(new_household("SOC-01", "Fatoumata Diallo"))
        .unwrap();
    sync(&a, &b);
    a.distribute_on(hh, "JP-2023", "nfi-kit", 1, "2023-07-10")
        .unwrap();
    b.distribute_on(hh, "JP-2023", "nfi-kit", 1, "2023-07-11")
        .unwrap();
    sync(&a, &b);
    let flag = &a.double_distributions().unwrap()[0];
    assert!(flag.resolution.is_none(), "open until a manager decides");
    let keep = flag
        .slot
        .handouts
        .iter()
        .position(|h| h.device == "tab-a")
        .unwrap();
    let r = a
        .resolve_double(hh, "JP-2023", "nfi-kit", Decision::Keep(keep))
        .unwrap();
    assert_eq!(r.decision, "voided");
    assert_eq!(r.voided.len(), 1);
    assert_eq!(r.voided[0].device, "tab-b");
    sync(&a, &b);
    for l in [&a, &b] {
        let flags = l.double_distributions().unwrap();
        assert_eq!(flags.len(), 1);
        let res = flags[0].resolution.as_ref().expect("resolution synced");
        assert_eq!(res.by, "enum-tab-a");
        assert_eq!(res.device, "tab-a");
        assert_eq!(flags[0].slot.handouts.len(), 1);
        assert_eq!(flags[0].slot.handouts[0].date, "2023-07-10");
        let figures = l.report(|_| true).unwrap();
        assert_eq!(
            figures.distributions[0].quantity, 1,
            "the voided kit is not counted"
        );
    }
}

#[test]
fn confirming_both_keeps_both_and_a_later_handout_reopens_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let a = ledger(dir.path(), "tab-a");
    let b = ledger(dir.path(), "tab-b");
    let c = ledger(dir.path(), "tab-c");
    seed(&a);
    let hh = a.register(new_household("SOC-01", "Awa Keita")).unwrap();
    merge_into(a.store(), &b);
    merge_into(a.store(), &c);
    a.distribute_on(hh, "JP-2023", "tarpaulin", 1, "2023-07-10")
        .unwrap();
    b.distribute_on(hh, "JP-2023", "tarpaulin", 1, "2023-07-11")
        .unwrap();
    sync(&a, &b);
    let r = b
        .resolve_double(hh, "JP-2023", "tarpaulin", Decision::ConfirmAll)
        .unwrap();
    assert_eq!((r.decision.as_str(), r.handouts), ("confirmed", 2));
    sync(&a, &b);
    let flags = a.double_distributions().unwrap();
    assert_eq!(flags[0].slot.handouts.len(), 2);
    assert!(flags[0].resolution.is_some());
    assert_eq!(a.report(|_| true).unwrap().distributions[0].quantity, 2);
    // A third tablet, offline all along, handed one more: the flag opens again.
    c.distribute_on(hh, "JP-2023", "tarpaulin", 1, "2023-07-12")
        .unwrap();
    merge_into(c.store(), &a);
    let flags = a.double_distributions().unwrap();
    assert_eq!(flags[0].slot.handouts.len(), 3);
    assert!(flags[0].resolution.is_none());
}

#[test]
fn no_flag_without_a_real_double_handout() {
    let (_d, a, b) = forked();
    let hh = a
        .register(new_household("SOC-01", "Moussa Coulibaly"))
        .unwrap();
    let other = a
        .register(new_household("SOC-01", "Ousmane Touré"))
        .unwrap();
    sync(&a, &b);
    // Different items, different households, and the same handout seen by both sides.
    a.distribute_on(hh, "JP-2023", "nfi-kit", 1, "2023-07-10")
        .unwrap();
    b.distribute_on(hh, "JP-2023", "shelter-kit", 1, "2023-07-10")
        .unwrap();
    b.distribute_on(other, "JP-2023", "nfi-kit", 1, "2023-07-10")
        .unwrap();
    sync(&a, &b);
    sync(&a, &b);
    assert!(a.double_distributions().unwrap().is_empty());
    assert!(b.double_distributions().unwrap().is_empty());
    assert!(matches!(
        a.resolve_double(hh, "JP-2023", "nfi-kit", Decision::ConfirmAll),
        Err(LedgerError::Validation(ValidationError::NotDouble { .. }))
    ));
}

fn family(site: &str, head: &str, members: &str, origin: Option<&str>) -> NewHousehold {
    NewHousehold {
        site: site.into(),
        head_name: head.into(),
        members: parse_members(members).unwrap(),
        origin: origin.map(str::to_string),
        ..Default::default()
    }
}

#[test]
fn duplicate_candidates_true_and_false_cases() {
    let (_d, a, b) = forked();
    // The same family registered on two tablets, spelled differently.
    let first = a
        .register(family(
            "SOC-01",
            "Fatoumata Kouyaté",
            "F:40,M:15,F:9",
            Some("Ténenkou"),
        ))
        .unwrap();
    let second = b
        .register(family(
            "SOC-01",
            "Fatumata Kuyate",
            "F:41,M:15,F:9",
            Some("Tenenkou"),
        ))
        .unwrap();
    // Same name, different family: other size, composition, origin, site.
    a.register(family(
        "GAO-01",
        "Fatoumata Kouyaté",
        "M:70",
        Some("Ansongo"),
    ))
    .unwrap();
    // Different names, same composition.
    b.register(family(
        "SOC-01",
        "Aminata Traoré",
        "F:40,M:15,F:9",
        Some("Ténenkou"),
    ))
    .unwrap();
    sync(&a, &b);
    let found = a.duplicate_candidates().unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    let pair = [found[0].a, found[0].b];
    assert!(pair.contains(&first) && pair.contains(&second));
    assert!(found[0].reasons.iter().any(|r| r == "origin"));
    // Marking it drops it from counts and from candidates; its handouts count for the other.
    b.distribute_on(second, "JP-2023", "nfi-kit", 1, "2023-07-10")
        .unwrap();
    merge_into(b.store(), &a);
    a.mark_duplicate(second, first).unwrap();
    assert_eq!(
        a.household(second).unwrap().household.status,
        Status::DuplicateOf(first.to_string())
    );
    assert!(a.duplicate_candidates().unwrap().is_empty());
    let f = a.report(|_| true).unwrap();
    assert_eq!(f.total.households, 3);
    assert_eq!(f.duplicates_excluded, 1);
    assert_eq!(f.reached_by_campaign["JP-2023"], 1);
    assert!(a.mark_duplicate(first, first).is_err());
    assert!(
        a.mark_duplicate(first, second).is_err(),
        "not onto a duplicate"
    );
}

#[test]
fn a_household_with_two_vulnerabilities_is_one_vulnerable_household() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "tab");
    seed(&l);
    l.register(NewHousehold {
        vulnerabilities: vec![Vulnerability::Widow, Vulnerability::Disability],
        ..family("SOC-01", "A One", "F:34,M:12", None)
    })
    .unwrap();
    l.register(family("SOC-01", "B Two", "M:40", None)).unwrap();
    let f = l.report(|_| true).unwrap();
    assert_eq!(f.total.vulnerable_households, 1);
    assert_eq!(f.total.vulnerabilities.values().sum::<u64>(), 2);
    let ctx = relais_core::export::ExportContext {
        date: "2023-07-31".into(),
        org: "UNHCR".into(),
    };
    let mut out = Vec::new();
    relais_core::export::write_sites(&mut out, &f, &ctx, false).unwrap();
    let text = String::from_utf8(out).unwrap();
    let row: Vec<&str> = text.lines().nth(1).unwrap().split(',').collect();
    assert_eq!(row[12], "1", "vulnerable_households:\n{text}");
}

#[test]
fn figures_of_a_known_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "tab");
    seed(&l);
    let h1 = l
        .register(NewHousehold {
            vulnerabilities: vec![Vulnerability::Widow],
            ..family("SOC-01", "A One", "F:34,M:12,F:3", None)
        })
        .unwrap();
    let h2 = l
        .register(family("SOC-01", "B Two", "M:65,F:60", None))
        .unwrap();
    let h3 = l
        .register(family("GAO-01", "C Three", "F:20,M:1,M:18,F:59", None))
        .unwrap();
    l.distribute_on(h1, "JP-2023", "nfi-kit", 1, "2023-07-10")
        .unwrap();
    l.distribute_on(h1, "JP-2023", "tarpaulin", 2, "2023-07-10")
        .unwrap();
    l.distribute_on(h2, "JP-2023", "nfi-kit", 1, "2023-07-10")
        .unwrap();
    l.distribute_on(h3, "JP-2023", "nfi-kit", 1, "2023-07-11")
        .unwrap();
    // A household that moved, and one that returned home, still count where they are.
    l.update(
        h2,
        &HouseholdUpdate {
            status: Some(Status::Returned),
            ..Default::default()
        },
    )
    .unwrap();
    let f = l.report(|_| true).unwrap();
    assert_eq!(f.sites.len(), 2);
    let soc = &f.sites.iter().find(|s| s.site == "SOC-01").unwrap();
    assert_eq!((soc.households, soc.individuals), (2, 5));
    assert_eq!((soc.female, soc.male), (3, 2));
    assert_eq!(
        (soc.age_0_4, soc.age_5_17, soc.age_18_59, soc.age_60_plus),
        (1, 1, 1, 2)
    );
    assert_eq!(soc.vulnerabilities["widow"], 1);
    assert_eq!(
        (soc.admin1.as_str(), soc.site_name.as_str()),
        ("Mopti", "Site SOC-01")
    );
    let gao = &f.sites.iter().find(|s| s.site == "GAO-01").unwrap();
    assert_eq!(
        (gao.households, gao.individuals, gao.female, gao.male),
        (1, 4, 2, 2)
    );
    assert_eq!((gao.age_0_4, gao.age_18_59), (1, 3));
    assert_eq!(f.admin1.len(), 2);
    assert_eq!((f.total.households, f.total.individuals), (3, 9));
    let nfi_soc = f
        .distributions
        .iter()
        .find(|d| d.site == "SOC-01" && d.item == "nfi-kit")
        .unwrap();
    assert_eq!((nfi_soc.quantity, nfi_soc.households_reached), (2, 2));
    let tarp = f
        .distributions
        .iter()
        .find(|d| d.item == "tarpaulin")
        .unwrap();
    assert_eq!((tarp.quantity, tarp.households_reached), (2, 1));
    assert_eq!(f.reached_by_campaign["JP-2023"], 3);
    // A scope sees only its part.
    let mopti = l
        .report(|i| i.regions.iter().any(|r| r == "Mopti"))
        .unwrap();
    assert_eq!(mopti.total.households, 2);
}

#[test]
fn exports_of_a_known_dataset_cell_by_cell() {
    use relais_core::export::{write_distributions, write_sites, ExportContext, HouseholdWriter};
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "tab");
    seed(&l);
    let h1 = l
        .register(NewHousehold {
            vulnerabilities: vec![Vulnerability::Widow],
            ..family("SOC-01", "Aminata Traoré", "F:34,M:12,F:3", Some("Ségou"))
        })
        .unwrap();
    l.register(family("GAO-01", "Moussa Maïga", "M:40", None))
        .unwrap();
    l.distribute_on(h1, "JP-2023", "nfi-kit", 1, "2023-07-10")
        .unwrap();
    let f = l.report(|_| true).unwrap();
    let ctx = ExportContext {
        date: "2026-11-23".into(),
        org: "IOM".into(),
    };
    let mut out = Vec::new();
    write_sites(&mut out, &f, &ctx, true).unwrap();
    let text = String::from_utf8(out).unwrap();
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 4, "header, hashtags, two sites:\n{text}");
    assert_eq!(
        rows[0],
        [
            "admin1",
            "admin2",
            "site_name",
            "site_code",
            "households",
            "individuals",
            "female",
            "male",
            "age_0_4",
            "age_5_17",
            "age_18_59",
            "age_60_plus",
            "vulnerable_households",
            "date",
            "organisation"
        ]
    );
    assert_eq!(
        rows[1],
        [
            "#adm1+name",
            "#adm2+name",
            "#loc+name",
            "#loc+code",
            "#affected+idps+hh",
            "#affected+idps+ind",
            "#affected+f",
            "#affected+m",
            "#affected+age0_4",
            "#affected+age5_17",
            "#affected+age18_59",
            "#affected+age60plus",
            "#affected+vulnerable+hh",
            "#date+occurred",
            "#org+impl"
        ]
    );
    assert_eq!(
        rows[2],
        [
            "Gao",
            "Gao",
            "Site GAO-01",
            "GAO-01",
            "1",
            "1",
            "0",
            "1",
            "0",
            "0",
            "1",
            "0",
            "0",
            "2026-11-23",
            "IOM"
        ]
    );
    assert_eq!(
        rows[3],
        [
            "Mopti",
            "Mopti",
            "Site SOC-01",
            "SOC-01",
            "1",
            "3",
            "2",
            "1",
            "1",
            "1",
            "1",
            "0",
            "1",
            "2026-11-23",
            "IOM"
        ]
    );
    assert!(
        !text.contains("Aminata"),
        "aggregated exports hold no names"
    );
    let mut out = Vec::new();
    write_distributions(&mut out, &f, &ctx, true).unwrap();
    let text = String::from_utf8(out).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows[1], "#activity+code,#adm1+name,#loc+code,#item+name,#item+num,#reached+hh,#date+occurred,#org+impl");
    assert_eq!(rows[2], "JP-2023,Mopti,SOC-01,nfi-kit,1,1,2026-11-23,IOM");
    assert_eq!(rows.len(), 3);
    // Without HXL, no hashtag row.
    let mut out = Vec::new();
    write_sites(&mut out, &f, &ctx, false).unwrap();
    assert!(!String::from_utf8(out).unwrap().contains('#'));
    // Household level: one row per household, quoted where needed.
    let mut w = HouseholdWriter::new(Vec::new()).unwrap();
    let (h, slots) = l.household_lite(h1).unwrap().unwrap();
    w.write(h1, &h, &slots).unwrap();
    assert_eq!(w.rows(), 1);
    let mut r = csv::Reader::from_reader(std::io::Cursor::new(
        String::from_utf8(w.finish().unwrap()).unwrap(),
    ));
    let rec = r.records().next().unwrap().unwrap();
    assert_eq!(&rec[0], h1.to_string());
    assert_eq!(
        (&rec[1], &rec[2], &rec[3]),
        ("SOC-01", "Aminata Traoré", "3")
    );
    assert_eq!(
        (&rec[4], &rec[5], &rec[7], &rec[9]),
        ("2", "1", "Ségou", "widow")
    );
    assert_eq!(&rec[13], "JP-2023/nfi-kitx1");
}
