//! Domain and store costs: registering a household, merging a remote change, saving and
//! loading a whole site of 5,000 households with 2 distributions each, and the server's hub
//! taking a pushed batch of households on one thread and on two.
//!
//! Run with `cargo bench -p relais-core --bench domain`; figures go to BENCHMARKS.md.

use std::time::Duration;

use automerge::sync::SyncDoc;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use relais_core::campaign::{Campaign, Entitlement};
use relais_core::household::{parse_members, HouseholdUpdate, NewHousehold};
use relais_core::ledger::{Ledger, Writer};
use relais_core::site::{Site, SiteKind};
use relais_core::store::{DocWrite, Store};
use relais_core::DocumentId;

const SITE_SIZE: usize = 5_000;

fn ledger(dir: &std::path::Path, name: &str) -> Ledger {
    let l = Ledger::new(
        Store::open(dir.join(format!("{name}.redb"))).unwrap(),
        Writer {
            enumerator: "bench".into(),
            device: name.into(),
        },
    )
    .unwrap();
    l.put_site(&Site {
        code: "SOC-01".into(),
        name: "Socoura".into(),
        kind: SiteKind::OfficialSite,
        admin1: "Mopti".into(),
        admin2: "Mopti".into(),
        admin3: None,
    })
    .unwrap();
    l.put_campaign(&Campaign {
        code: "JP-2023".into(),
        name: "Responding to the needs of IDPs".into(),
        donor: None,
        start: None,
        end: None,
        items: vec![
            Entitlement {
                item: "nfi-kit".into(),
                quantity: 1,
            },
            Entitlement {
                item: "shelter-kit".into(),
                quantity: 1,
            },
        ],
        sites: vec!["SOC-01".into()],
    })
    .unwrap();
    l
}

fn new_household(i: usize) -> NewHousehold {
    NewHousehold {
        site: "SOC-01".into(),
        head_name: format!("Aminata Traoré {i}"),
        members: parse_members("F:34,M:12,F:7,M:3").unwrap(),
        origin: Some("Ségou".into()),
        displacement_date: Some("2023-05-02".into()),
        displacement_reason: Some("conflict".into()),
        ..Default::default()
    }
}

fn register(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "reg");
    let mut i = 0;
    c.bench_function("register_household_durable", |b| {
        b.iter(|| {
            i += 1;
            l.register(new_household(i)).unwrap()
        })
    });
}

fn merge_remote_change(c: &mut Criterion) {
    // A household edited on a tablet, merged on the server through the sync protocol.
    let dir = tempfile::tempdir().unwrap();
    let tab = ledger(dir.path(), "tab");
    let id = tab.register(new_household(1)).unwrap();
    let mut k = 0u32;
    c.bench_function("merge_remote_change", |b| {
        b.iter_batched(
            || {
                let server = tab.store().load(id).unwrap().unwrap().doc;
                k += 1;
                tab.update(
                    id,
                    &HouseholdUpdate {
                        contact: Some(format!("+223 {k}")),
                        ..Default::default()
                    },
                )
                .unwrap();
                let client = tab.store().load(id).unwrap().unwrap().doc;
                // The message a client sends once it knows the server's heads.
                let mut cs = automerge::sync::State::new();
                cs.shared_heads = server.get_heads();
                cs.their_heads = Some(server.get_heads());
                cs.their_have = Some(vec![automerge::sync::Have {
                    last_sync: server.get_heads(),
                    bloom: Default::default(),
                }]);
                cs.their_need = Some(vec![]);
                let msg = client.generate_sync_message(&mut cs).unwrap();
                assert!(!msg.changes.is_empty(), "the message must carry the change");
                let before = server.get_heads();
                (server, msg, before)
            },
            |(mut server, msg, before)| {
                let mut ss = automerge::sync::State::new();
                server.receive_sync_message(&mut ss, msg).unwrap();
                assert_ne!(server.get_heads(), before, "the change was applied");
                server
            },
            BatchSize::SmallInput,
        )
    });
}

fn site_of_5000(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "site");
    // Build the households in memory, then store them in one transaction, as a sync would.
    let mut docs = Vec::with_capacity(SITE_SIZE);
    for i in 0..SITE_SIZE {
        let id = l.register(new_household(i)).unwrap();
        l.distribute_on(id, "JP-2023", "nfi-kit", 1, "2023-07-10")
            .unwrap();
        l.distribute_on(id, "JP-2023", "shelter-kit", 1, "2023-07-10")
            .unwrap();
        docs.push(id);
    }
    let loaded: Vec<(
        DocumentId,
        automerge::Automerge,
        relais_core::document::DocInfo,
    )> = docs
        .iter()
        .map(|id| {
            let s = l.store().load(*id).unwrap().unwrap();
            (*id, s.doc, s.meta.info)
        })
        .collect();
    let mut g = c.benchmark_group("site_5000_households");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    let mut round = 0;
    g.bench_function("save", |b| {
        b.iter_batched(
            || {
                round += 1;
                Store::open(dir.path().join(format!("copy-{round}.redb"))).unwrap()
            },
            |store| {
                let writes: Vec<DocWrite> = loaded
                    .iter()
                    .map(|(id, doc, info)| DocWrite::from_doc(*id, info.clone(), doc, vec![]))
                    .collect();
                store.write(&writes).unwrap();
                store
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("load", |b| {
        b.iter(|| {
            let mut n = 0;
            for id in &docs {
                n += l.store().load(*id).unwrap().unwrap().doc.get_heads().len();
            }
            n
        })
    });
    g.bench_function("list_site_typed", |b| {
        b.iter(|| l.list_site("SOC-01").unwrap().len())
    });
    g.finish();
}

/// Reading a stored household's record, as the hub does for access control on every document
/// it takes: autosurgeon straight on the document (a seek per field), against
/// `document::describe`, which reads each object once.
fn describe_household(c: &mut Criterion) {
    use relais_core::document::{describe, RECORD};
    use relais_core::household::Household;
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "describe");
    let id = l.register(new_household(7)).unwrap();
    l.distribute(id, "JP-2023", "nfi-kit", 1).unwrap();
    let doc = l.store().load(id).unwrap().unwrap().doc;
    let mut g = c.benchmark_group("describe_household");
    g.bench_function("autosurgeon_on_document", |b| {
        b.iter(|| {
            let h: Household = autosurgeon::hydrate_prop(&doc, automerge::ROOT, RECORD).unwrap();
            h.site.len()
        })
    });
    g.bench_function("describe", |b| {
        b.iter(|| describe(&doc, &mut |_| None).sites.len())
    });
    g.finish();
}

/// Possible duplicates among 100,000 households nationally: names drawn from common Malian
/// given and family names (so blocks are realistically crowded), 1% registered twice with a
/// different spelling.
fn duplicates_100k(c: &mut Criterion) {
    use relais_core::household::{parse_members, Household, Population, Provenance, Status};
    use relais_core::DocumentId;
    const GIVEN: [&str; 24] = [
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
        "Salif",
        "Adama",
        "Aissata",
        "Rokia",
        "Djeneba",
        "Mamadou",
        "Souleymane",
        "Assitan",
    ];
    const FAMILY: [&str; 24] = [
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
        "Konaté",
        "Dembélé",
        "Samaké",
        "Kanté",
        "Bagayoko",
        "Doumbia",
        "Haïdara",
        "Tounkara",
        "Sow",
        "Ba",
    ];
    let mut seed = 42u64;
    let mut next = move |n: usize| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as usize) % n
    };
    let mut all: Vec<(DocumentId, Household)> = Vec::with_capacity(101_000);
    for i in 0..100_000 {
        let size = 1 + next(7) as u32;
        let members: Vec<String> = (0..size)
            .map(|_| format!("{}:{}", if next(2) == 0 { "F" } else { "M" }, next(70)))
            .collect();
        let mut h = Household {
            site: format!("S-{:03}", next(300)),
            head_name: format!("{} {}", GIVEN[next(24)], FAMILY[next(24)]),
            members: parse_members(&members.join(",")).unwrap(),
            size,
            population: Population::Idp,
            origin: Some(format!("origin-{}", next(60))),
            displacement_date: None,
            displacement_reason: None,
            vulnerabilities: Vec::new(),
            contact: None,
            status: Status::Active,
            registered: Provenance {
                enumerator: "e".into(),
                device: "d".into(),
                at: i as i64,
            },
        };
        all.push((DocumentId::random(), h.clone()));
        if i % 100 == 0 {
            h.head_name = h.head_name.replace("ou", "u").replace('é', "e");
            all.push((DocumentId::random(), h));
        }
    }
    let mut g = c.benchmark_group("duplicates");
    g.sample_size(10);
    g.bench_function("candidates among 101,000 households", |b| {
        b.iter(|| {
            let found = relais_core::dedup::candidates(&all);
            assert!(found.len() >= 1_000, "every planted duplicate is found");
            found.len()
        })
    });
    g.finish();
}

/// A tablet's push as the server's hub receives it: one `relais-sync-batch` of 256 new
/// households, each with all its changes, applied with 1 and then 2 `workers` (the
/// documents' changes applied and their records read on that many threads). The step is not
/// committed, so every iteration starts from the same store.
fn hub_push_batch(c: &mut Criterion) {
    use relais_core::access::Identity;
    use relais_core::protocol::hub::{Hub, HubConfig, BATCH_DOCS};
    use relais_core::protocol::message::{BatchDoc, Message, PeerMetadata, PROTOCOL_RELAIS};
    let dir = tempfile::tempdir().unwrap();
    let tab = ledger(dir.path(), "tab");
    let office = ledger(dir.path(), "office");
    let docs = (0..BATCH_DOCS)
        .map(|i| {
            let id = tab.register(new_household(i)).unwrap();
            let doc = tab.store().load(id).unwrap().unwrap().doc;
            // What a tablet sends first for a document the server has never seen.
            let mut st = automerge::sync::State::new();
            relais_core::protocol::hub::assume_remote_holds(&mut st, vec![]);
            BatchDoc {
                document_id: id,
                data: doc.generate_sync_message(&mut st).unwrap().encode(),
                request: false,
            }
        })
        .collect();
    let batch = Message::SyncBatch {
        sender_id: "tab".into(),
        target_id: "office".into(),
        docs,
    }
    .encode();
    let join = Message::Join {
        sender_id: "tab".into(),
        supported_protocol_versions: vec!["1".into(), PROTOCOL_RELAIS.into()],
        peer_metadata: PeerMetadata::default(),
    }
    .encode();
    let mut g = c.benchmark_group("hub_push_batch_256");
    g.sample_size(20);
    for workers in [1, 2] {
        g.bench_function(format!("workers={workers}"), |b| {
            b.iter_batched(
                || {
                    let cfg = HubConfig {
                        workers,
                        ..HubConfig::default()
                    };
                    let mut hub = Hub::new(cfg, office.store_arc());
                    hub.connect(1, Identity::admin("tab"));
                    hub.receive(1, &join);
                    hub
                },
                |mut hub| {
                    let step = hub.receive(1, &batch);
                    assert_eq!(step.writes.len(), BATCH_DOCS, "every household taken");
                    (hub, step)
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    register,
    merge_remote_change,
    hub_push_batch,
    site_of_5000,
    describe_household,
    duplicates_100k
);
criterion_main!(benches);
