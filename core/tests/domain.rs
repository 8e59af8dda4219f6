//! Domain behaviour across replicas: field-level merge, kept conflicts, double handouts,
//! validation that writes nothing.

mod common;

use common::*;
use relais_core::household::{HouseholdUpdate, Status};
use relais_core::ledger::LedgerError;
use relais_core::validation::ValidationError;

#[test]
fn concurrent_edits_to_different_fields_both_survive() {
    let (_d, a, b) = forked();
    let hh = a
        .register(new_household("SOC-01", "Aminata Traoré"))
        .unwrap();
    merge_into(a.store(), &b);
    a.update(
        hh,
        &HouseholdUpdate {
            origin: Some("Ségou".into()),
            ..Default::default()
        },
    )
    .unwrap();
    b.update(
        hh,
        &HouseholdUpdate {
            contact: Some("+223 00 00 00 00".into()),
            ..Default::default()
        },
    )
    .unwrap();
    merge_into(a.store(), &b);
    merge_into(b.store(), &a);
    for l in [&a, &b] {
        let v = l.household(hh).unwrap();
        assert_eq!(v.household.origin.as_deref(), Some("Ségou"));
        assert_eq!(v.household.contact.as_deref(), Some("+223 00 00 00 00"));
        assert!(v.conflicts.is_empty(), "{:?}", v.conflicts);
    }
}

#[test]
fn true_conflict_on_one_field_is_kept_and_visible() {
    let (_d, a, b) = forked();
    let hh = a
        .register(new_household("SOC-01", "Aminata Traoré"))
        .unwrap();
    merge_into(a.store(), &b);
    for (l, name) in [(&a, "Aminata Traore"), (&b, "Aminata Touré")] {
        l.update(
            hh,
            &HouseholdUpdate {
                head_name: Some(name.into()),
                ..Default::default()
            },
        )
        .unwrap();
    }
    merge_into(a.store(), &b);
    merge_into(b.store(), &a);
    let va = a.household(hh).unwrap();
    let vb = b.household(hh).unwrap();
    assert_eq!(va.household.head_name, vb.household.head_name);
    let c = va.conflicts.iter().find(|c| c.path == "head_name").unwrap();
    let mut values: Vec<String> = c
        .values
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    values.sort();
    assert_eq!(values, vec!["Aminata Touré", "Aminata Traore"]);
}

#[test]
fn concurrent_double_handout_is_detected_on_both_sides() {
    let (_d, a, b) = forked();
    let hh = a
        .register(new_household("SOC-01", "Fatoumata Diallo"))
        .unwrap();
    let other = a
        .register(new_household("SOC-01", "Moussa Coulibaly"))
        .unwrap();
    merge_into(a.store(), &b);
    a.distribute_on(hh, "JP-2023", "nfi-kit", 1, "2023-07-10")
        .unwrap();
    b.distribute_on(hh, "JP-2023", "nfi-kit", 1, "2023-07-11")
        .unwrap();
    // Different items or households are not doubles.
    a.distribute_on(hh, "JP-2023", "shelter-kit", 1, "2023-07-10")
        .unwrap();
    b.distribute_on(other, "JP-2023", "nfi-kit", 1, "2023-07-11")
        .unwrap();
    assert!(a.double_distributions().unwrap().is_empty());
    merge_into(a.store(), &b);
    merge_into(b.store(), &a);
    for l in [&a, &b] {
        let doubles = l.double_distributions().unwrap();
        assert_eq!(doubles.len(), 1, "{doubles:?}");
        assert_eq!(doubles[0].household, hh);
        assert_eq!(doubles[0].slot.item, "nfi-kit");
        let mut devices: Vec<_> = doubles[0]
            .slot
            .handouts
            .iter()
            .map(|h| h.device.clone())
            .collect();
        devices.sort();
        assert_eq!(devices, vec!["tab-a", "tab-b"]);
    }
}

#[test]
fn concurrent_registrations_on_one_site_are_all_listed() {
    let (_d, a, b) = forked();
    let h1 = a.register(new_household("SOC-01", "A")).unwrap();
    let h2 = b.register(new_household("SOC-01", "B")).unwrap();
    merge_into(a.store(), &b);
    merge_into(b.store(), &a);
    for l in [&a, &b] {
        let mut ids: Vec<_> = l
            .list_site("SOC-01")
            .unwrap()
            .iter()
            .map(|v| v.id)
            .collect();
        ids.sort();
        let mut want = vec![h1, h2];
        want.sort();
        assert_eq!(ids, want);
    }
}

fn assert_nothing_written<T: std::fmt::Debug>(
    l: &relais_core::ledger::Ledger,
    r: Result<T, LedgerError>,
    want: ValidationError,
) {
    let before = l.store().last_seq().unwrap();
    match r {
        Err(LedgerError::Validation(e)) => assert_eq!(e, want),
        other => panic!("expected {want:?}, got {other:?}"),
    }
    assert_eq!(l.store().last_seq().unwrap(), before);
}

#[test]
fn validation_errors_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "tab");
    seed(&l);
    let seq = l.store().last_seq().unwrap();
    let mut h = new_household("SOC-01", " ");
    assert_nothing_written(&l, l.register(h.clone()), ValidationError::EmptyHeadName);
    h.head_name = "Aïssata".into();
    h.members[0].age = 130;
    assert_nothing_written(
        &l,
        l.register(h.clone()),
        ValidationError::AgeOutOfRange { index: 0, age: 130 },
    );
    h.members[0].age = 30;
    h.size = Some(2);
    assert_nothing_written(
        &l,
        l.register(h.clone()),
        ValidationError::SizeBelowMembers {
            size: 2,
            members: 3,
        },
    );
    h.size = None;
    h.site = "NOPE-1".into();
    assert_nothing_written(
        &l,
        l.register(h.clone()),
        ValidationError::UnknownSite("NOPE-1".into()),
    );
    assert_eq!(l.store().last_seq().unwrap(), seq);

    h.site = "SOC-01".into();
    let hh = l.register(h).unwrap();
    assert_nothing_written(
        &l,
        l.distribute(hh, "NOPE", "nfi-kit", 1),
        ValidationError::UnknownCampaign("NOPE".into()),
    );
    assert_nothing_written(
        &l,
        l.distribute(hh, "JP-2023", "food", 1),
        ValidationError::UnknownItem {
            campaign: "JP-2023".into(),
            item: "food".into(),
        },
    );
    assert_nothing_written(
        &l,
        l.distribute(hh, "JP-2023", "tarpaulin", 3),
        ValidationError::AboveEntitlement {
            item: "tarpaulin".into(),
            quantity: 3,
            entitled: 2,
        },
    );
    l.distribute(hh, "JP-2023", "tarpaulin", 2).unwrap();
    assert_nothing_written(
        &l,
        l.distribute(hh, "JP-2023", "tarpaulin", 1),
        ValidationError::AlreadyReceived {
            campaign: "JP-2023".into(),
            item: "tarpaulin".into(),
        },
    );
    let unknown = relais_core::DocumentId::random();
    assert_nothing_written(
        &l,
        l.distribute(unknown, "JP-2023", "nfi-kit", 1),
        ValidationError::UnknownHousehold(unknown.to_string()),
    );
    assert_nothing_written(
        &l,
        l.update(
            hh,
            &HouseholdUpdate {
                site: Some("ZZZ".into()),
                ..Default::default()
            },
        ),
        ValidationError::UnknownSite("ZZZ".into()),
    );
    assert_nothing_written(
        &l,
        l.put_campaign(&campaign("C2", &["NOWHERE"])),
        ValidationError::UnknownSite("NOWHERE".into()),
    );
}

#[test]
fn moving_a_household_moves_it_between_site_lists() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "tab");
    seed(&l);
    let hh = l.register(new_household("SOC-01", "Hawa Maïga")).unwrap();
    l.update(
        hh,
        &HouseholdUpdate {
            site: Some("GAO-01".into()),
            status: Some(Status::Active),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(l.list_site("SOC-01").unwrap().is_empty());
    assert_eq!(l.list_site("GAO-01").unwrap()[0].id, hh);
    let meta = l.store().meta(hh).unwrap().unwrap();
    assert_eq!(meta.info.regions, vec!["Gao".to_string()]);
}

#[test]
fn name_lookup_ignores_accents_and_case() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "tab");
    seed(&l);
    l.register(new_household("SOC-01", "Aminata Traoré"))
        .unwrap();
    l.register(new_household("SOC-01", "Oumar Touré")).unwrap();
    assert_eq!(l.find_by_name("TRAORE").unwrap().len(), 1);
    assert_eq!(l.find_by_name("toure").unwrap().len(), 1);
    assert_eq!(l.find_by_name("ou").unwrap().len(), 1);
    assert!(l.find_by_name("keita").unwrap().is_empty());
}
