//! Property: random domain operations on 2 to 5 forks, merged in random orders, always
//! converge to the same state with no committed change lost; a concurrent double handout is
//! always detected, and none is reported when there was none.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use automerge::ReadDoc;

use common::*;
use proptest::prelude::*;
use relais_core::household::HouseholdUpdate;
use relais_core::ledger::Ledger;
use relais_core::DocumentId;

#[derive(Debug, Clone)]
enum Op {
    Register {
        replica: usize,
        name: u8,
    },
    Edit {
        replica: usize,
        hh: usize,
        field: u8,
        value: u8,
    },
    Distribute {
        replica: usize,
        hh: usize,
        item: usize,
    },
    Merge {
        from: usize,
        to: usize,
    },
}

const ITEMS: [&str; 3] = ["nfi-kit", "shelter-kit", "tarpaulin"];

fn op(n: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..n, any::<u8>()).prop_map(|(replica, name)| Op::Register { replica, name }),
        (0..n, 0..8usize, 0..3u8, any::<u8>()).prop_map(|(replica, hh, field, value)| Op::Edit {
            replica,
            hh,
            field,
            value
        }),
        (0..n, 0..8usize, 0..3usize).prop_map(|(replica, hh, item)| Op::Distribute {
            replica,
            hh,
            item
        }),
        (0..n, 0..n).prop_map(|(from, to)| Op::Merge { from, to }),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, Vec<Op>, Vec<usize>)> {
    (2..=5usize).prop_flat_map(|n| {
        (
            Just(n),
            prop::collection::vec(op(n), 1..40),
            Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
        )
    })
}

/// The state every replica must agree on: every document's heads and content.
fn snapshot(l: &Ledger) -> BTreeMap<DocumentId, (Vec<String>, Vec<u8>)> {
    l.store()
        .list()
        .unwrap()
        .into_iter()
        .map(|(id, m)| {
            let doc = l.store().load(id).unwrap().unwrap().doc;
            (
                id,
                (
                    m.heads,
                    serde_json::to_vec(&relais_core::conflict::to_json(
                        &doc,
                        &automerge::Value::Object(automerge::ObjType::Map),
                        &automerge::ROOT,
                    ))
                    .unwrap(),
                ),
            )
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn forks_converge_and_doubles_are_exact((n, ops, order) in scenario()) {
        let dir = tempfile::tempdir().unwrap();
        let reps: Vec<Ledger> = (0..n).map(|i| ledger(dir.path(), &format!("r{i}"))).collect();
        seed(&reps[0]);
        for r in &reps[1..] { merge_into(reps[0].store(), r); }

        // Households each replica knows about, in registration order.
        let mut known: Vec<Vec<DocumentId>> = vec![Vec::new(); n];
        // Every successful handout: (household, item) -> number of replicas that recorded it.
        let mut handouts: BTreeMap<(DocumentId, &str), usize> = BTreeMap::new();
        // Heads of each document right after each committed write, on the replica that wrote.
        let mut committed: Vec<(DocumentId, Vec<automerge::ChangeHash>)> = Vec::new();
        let heads = |l: &Ledger, id: DocumentId| l.store().load(id).unwrap().unwrap().doc.get_heads();

        for op in &ops {
            match *op {
                Op::Register { replica, name } => {
                    let id = reps[replica].register(new_household("SOC-01", &format!("H{name}"))).unwrap();
                    known[replica].push(id);
                    committed.push((id, heads(&reps[replica], id)));
                }
                Op::Edit { replica, hh, field, value } => {
                    let Some(&id) = known[replica].get(hh) else { continue };
                    let v = format!("v{value}");
                    let u = match field {
                        0 => HouseholdUpdate { origin: Some(v.clone()), ..Default::default() },
                        1 => HouseholdUpdate { contact: Some(v.clone()), ..Default::default() },
                        _ => HouseholdUpdate { displacement_reason: Some(v.clone()), ..Default::default() },
                    };
                    reps[replica].update(id, &u).unwrap();
                    committed.push((id, heads(&reps[replica], id)));
                }
                Op::Distribute { replica, hh, item } => {
                    let Some(&id) = known[replica].get(hh) else { continue };
                    if reps[replica].distribute(id, "JP-2023", ITEMS[item], 1).is_ok() {
                        *handouts.entry((id, ITEMS[item])).or_default() += 1;
                        committed.push((id, heads(&reps[replica], id)));
                    }
                }
                Op::Merge { from, to } => {
                    if from != to {
                        merge_into(reps[from].store(), &reps[to]);
                        let ids: Vec<DocumentId> = known[from].clone();
                        for id in ids { if !known[to].contains(&id) { known[to].push(id); } }
                    }
                }
            }
        }
        // Heal: merge everything into one replica in a random order, then back out.
        let hub = order[0];
        for &i in &order[1..] { merge_into(reps[i].store(), &reps[hub]); }
        for &i in &order[1..] { merge_into(reps[hub].store(), &reps[i]); }

        let want = snapshot(&reps[hub]);
        for r in &reps { prop_assert_eq!(&snapshot(r), &want); }

        // No committed change lost: every change any replica committed is in the merged
        // document on every replica.
        for r in &reps {
            for (id, hs) in &committed {
                let doc = r.store().load(*id).unwrap().unwrap().doc;
                for h in hs {
                    prop_assert!(doc.get_change_by_hash(h).is_some(), "change {} of {} lost", h, id);
                }
            }
        }
        let l = &reps[hub];
        // Doubles reported exactly where two replicas each recorded the same handout.
        let reported: BTreeSet<(DocumentId, String)> = l.double_distributions().unwrap()
            .into_iter().map(|d| (d.household, d.slot.item)).collect();
        let expected: BTreeSet<(DocumentId, String)> = handouts.iter()
            .filter(|(_, &c)| c > 1).map(|((id, item), _)| (*id, item.to_string())).collect();
        prop_assert_eq!(reported, expected);
        // And every handout recorded anywhere is present.
        for ((id, item), count) in &handouts {
            let view = l.household(*id).unwrap();
            let slot = view.distributions.iter().find(|s| s.item == *item).unwrap();
            prop_assert_eq!(slot.handouts.len(), *count);
        }
    }
}
