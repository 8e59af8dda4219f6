//! A read-only view of a document that reads each map or list once.
//!
//! autosurgeon hydrates a struct field by field: one `get` per field, and two for an
//! `Option`. Each `get` seeks the key among the object's ops again, which made reading a
//! household record for access control about a fifth of the server's time in a push. This
//! view answers `get` from one pass over the object (`map_range` or `list_range`), made the
//! first time the object is asked for, so the record is still hydrated, and its shape checked,
//! by the same autosurgeon code. Every other read goes to the document unchanged.

use std::cell::RefCell;
use std::ops::RangeBounds;
use std::rc::Rc;

use automerge::iter::{ListRange, MapRange};
use automerge::{AutomergeError, ChangeHash, ObjId, ObjType, Prop, Value};
use autosurgeon::ReadDoc;

/// What one pass over an object found: its visible entries, in order.
enum Entries {
    /// A map's keys, sorted, each with its winning value and that value's id.
    Map(Vec<(String, Value<'static>, ObjId)>),
    /// A list's elements, each with its winning value and that value's id.
    List(Vec<(Value<'static>, ObjId)>),
    /// Text, a table, or an id that names no object: read from the document.
    Other,
}

/// Wraps a document so that repeated `get`s on one object cost one pass over it. Meant for
/// one short read (a record's hydration): it keeps what it read until it is dropped, and
/// borrows the document, so the document cannot change meanwhile.
pub(crate) struct ReadOnce<'a, D: ReadDoc> {
    doc: &'a D,
    read: RefCell<Vec<(ObjId, Rc<Entries>)>>,
}

impl<'a, D: ReadDoc> ReadOnce<'a, D> {
    /// A view of `doc` that has read nothing yet.
    pub(crate) fn new(doc: &'a D) -> Self {
        ReadOnce {
            doc,
            read: RefCell::new(Vec::new()),
        }
    }

    fn entries(&self, obj: &ObjId) -> Rc<Entries> {
        // A record has a handful of objects, so a scan beats hashing the ids.
        if let Some((_, e)) = self.read.borrow().iter().find(|(id, _)| id == obj) {
            return e.clone();
        }
        let entries = match self.doc.object_type(obj) {
            Some(ObjType::Map) => {
                let mut keys: Vec<_> = self
                    .doc
                    .map_range(obj, ..)
                    .map(|item| {
                        let id = item.id();
                        (item.key.into_owned(), item.value.into_value(), id)
                    })
                    .collect();
                // `get` looks keys up by halving; automerge does not promise their order.
                keys.sort_by(|a, b| a.0.cmp(&b.0));
                Entries::Map(keys)
            }
            Some(ObjType::List) => Entries::List(
                self.doc
                    .list_range(obj, ..)
                    .map(|item| {
                        let id = item.id();
                        (item.value.into_value(), id)
                    })
                    .collect(),
            ),
            _ => Entries::Other,
        };
        let entries = Rc::new(entries);
        self.read.borrow_mut().push((obj.clone(), entries.clone()));
        entries
    }
}

impl<D: ReadDoc> ReadDoc for ReadOnce<'_, D> {
    type Parents<'b>
        = D::Parents<'b>
    where
        Self: 'b;

    fn get<P: Into<Prop>>(
        &self,
        obj: &ObjId,
        prop: P,
    ) -> Result<Option<(Value<'_>, ObjId)>, AutomergeError> {
        let prop = prop.into();
        let found = match (&*self.entries(obj), &prop) {
            (Entries::Map(entries), Prop::Map(key)) => entries
                .binary_search_by(|(k, _, _)| k.as_str().cmp(key.as_str()))
                .ok()
                .map(|i| (entries[i].1.clone(), entries[i].2.clone())),
            (Entries::List(entries), Prop::Seq(i)) => {
                entries.get(*i).map(|(v, id)| (v.clone(), id.clone()))
            }
            // A key of the wrong kind, text, a table, or an unknown id: let the document say.
            _ => return self.doc.get(obj, prop),
        };
        Ok(found)
    }

    fn length<O: AsRef<ObjId>>(&self, obj: O) -> usize {
        match &*self.entries(obj.as_ref()) {
            Entries::Map(e) => e.len(),
            Entries::List(e) => e.len(),
            Entries::Other => self.doc.length(obj),
        }
    }

    fn get_heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    fn object_type<O: AsRef<ObjId>>(&self, obj: O) -> Option<ObjType> {
        self.doc.object_type(obj)
    }

    fn map_range<'b, O, R>(&'b self, obj: O, range: R) -> MapRange<'b>
    where
        R: RangeBounds<String> + 'b,
        O: AsRef<ObjId>,
        R: RangeBounds<String>,
    {
        self.doc.map_range(obj, range)
    }

    fn list_range<O: AsRef<ObjId>, R: RangeBounds<usize>>(
        &self,
        obj: O,
        range: R,
    ) -> ListRange<'_> {
        self.doc.list_range(obj, range)
    }

    fn text<O: AsRef<ObjId>>(&self, obj: O) -> Result<String, AutomergeError> {
        self.doc.text(obj)
    }

    fn parents<O: AsRef<ObjId>>(&self, obj: O) -> Result<Self::Parents<'_>, AutomergeError> {
        self.doc.parents(obj)
    }

    fn is_empty(&self) -> bool {
        self.doc.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use automerge::transaction::{Transactable, Transaction};
    use automerge::{ActorId, Automerge, ObjId, ReadDoc as _, ScalarValue, ROOT};
    use autosurgeon::hydrate_prop;
    use proptest::prelude::*;

    use super::ReadOnce;
    use crate::campaign::{Campaign, Entitlement};
    use crate::document::{put_record, DocKind, RECORD};
    use crate::household::{tests::sample, Household};
    use crate::site::Site;

    /// Where an edit lands: the root, the record, a map in it, a list in it, or an element of
    /// a list.
    #[derive(Debug, Clone)]
    enum Target {
        Root,
        Record,
        Map(&'static str),
        List(&'static str),
        Elem(&'static str, usize),
    }

    #[derive(Debug, Clone)]
    enum Edit {
        Put(Target, &'static str, ScalarValue),
        PutObject(Target, &'static str, automerge::ObjType),
        Delete(Target, &'static str),
        /// Overwrites a list element in place: concurrent ones conflict.
        PutAt(&'static str, usize, ScalarValue),
        InsertMap(&'static str, usize),
        DeleteAt(&'static str, usize),
    }

    /// Field names of the three records and their parts, and one no record has.
    const KEYS: &[&str] = &[
        "kind",
        "record",
        "site",
        "head_name",
        "members",
        "size",
        "population",
        "origin",
        "vulnerabilities",
        "contact",
        "status",
        "registered",
        "enumerator",
        "device",
        "at",
        "sex",
        "age",
        "duplicate-of",
        "code",
        "name",
        "admin1",
        "admin3",
        "donor",
        "items",
        "sites",
        "item",
        "quantity",
        "extra",
    ];
    const LISTS: &[&str] = &["members", "vulnerabilities", "items", "sites"];
    const MAPS: &[&str] = &["registered", "status"];

    fn scalar() -> impl Strategy<Value = ScalarValue> {
        prop_oneof![
            prop::sample::select(vec![
                "BEN-01", "F", "M", "idp", "active", "erased", "widow", "Mopti", "x"
            ])
            .prop_map(|s| ScalarValue::Str(s.into())),
            (-3i64..200).prop_map(ScalarValue::Int),
            (0u64..200).prop_map(ScalarValue::Uint),
            Just(ScalarValue::Null),
            any::<bool>().prop_map(ScalarValue::Boolean),
            Just(ScalarValue::F64(2.5)),
            (0i64..5).prop_map(ScalarValue::counter),
            Just(ScalarValue::Timestamp(1_700_000_000_000)),
            Just(ScalarValue::Bytes(vec![1, 2])),
        ]
    }

    fn target() -> impl Strategy<Value = Target> {
        prop_oneof![
            Just(Target::Root),
            Just(Target::Record),
            prop::sample::select(MAPS).prop_map(Target::Map),
            prop::sample::select(LISTS).prop_map(Target::List),
            (prop::sample::select(LISTS), 0usize..4).prop_map(|(l, i)| Target::Elem(l, i)),
        ]
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let key = prop::sample::select(KEYS);
        let list = prop::sample::select(LISTS);
        let obj = prop::sample::select(vec![
            automerge::ObjType::Map,
            automerge::ObjType::List,
            automerge::ObjType::Text,
            automerge::ObjType::Table,
        ]);
        prop_oneof![
            4 => (target(), key.clone(), scalar()).prop_map(|(t, k, v)| Edit::Put(t, k, v)),
            1 => (target(), key.clone(), obj).prop_map(|(t, k, o)| Edit::PutObject(t, k, o)),
            1 => (target(), key).prop_map(|(t, k)| Edit::Delete(t, k)),
            2 => (list.clone(), 0usize..4, scalar()).prop_map(|(l, i, v)| Edit::PutAt(l, i, v)),
            1 => (list.clone(), 0usize..4).prop_map(|(l, i)| Edit::InsertMap(l, i)),
            1 => (list, 0usize..4).prop_map(|(l, i)| Edit::DeleteAt(l, i)),
        ]
    }

    fn child(tx: &Transaction<'_>, parent: &ObjId, key: &str) -> Option<ObjId> {
        tx.get(parent, key).ok().flatten().map(|(_, o)| o)
    }

    fn apply(doc: &mut Automerge, edits: &[Edit]) {
        let mut tx = doc.transaction();
        for e in edits {
            // Edits whose target is gone or of another kind fail; that is part of the mix.
            let Some(record) = child(&tx, &ROOT, RECORD) else {
                continue;
            };
            let obj = |tx: &Transaction<'_>, t: &Target| match t {
                Target::Root => Some(ROOT),
                Target::Record => Some(record.clone()),
                Target::Map(k) | Target::List(k) => child(tx, &record, k),
                Target::Elem(l, i) => {
                    child(tx, &record, l).and_then(|l| tx.get(&l, *i).ok().flatten().map(|v| v.1))
                }
            };
            match e {
                Edit::Put(t, k, v) => {
                    if let Some(o) = obj(&tx, t) {
                        let _ = tx.put(&o, *k, v.clone());
                    }
                }
                Edit::PutObject(t, k, ty) => {
                    if let Some(o) = obj(&tx, t) {
                        let _ = tx.put_object(&o, *k, *ty);
                    }
                }
                Edit::Delete(t, k) => {
                    if let Some(o) = obj(&tx, t) {
                        let _ = tx.delete(&o, *k);
                    }
                }
                Edit::PutAt(l, i, v) => {
                    if let Some(o) = child(&tx, &record, l) {
                        let _ = tx.put(&o, *i, v.clone());
                    }
                }
                Edit::InsertMap(l, i) => {
                    if let Some(o) = child(&tx, &record, l) {
                        if let Ok(m) = tx.insert_object(&o, *i, automerge::ObjType::Map) {
                            let _ = tx.put(&m, "sex", "F");
                            let _ = tx.put(&m, "age", 30u64);
                            let _ = tx.put(&m, "item", "nfi-kit");
                            let _ = tx.put(&m, "quantity", 1u64);
                        }
                    }
                }
                Edit::DeleteAt(l, i) => {
                    if let Some(o) = child(&tx, &record, l) {
                        let _ = tx.delete(&o, *i);
                    }
                }
            }
        }
        tx.commit();
    }

    fn site() -> Site {
        Site::socoura()
    }

    fn campaign() -> Campaign {
        Campaign {
            code: "JP-2023".into(),
            name: "Responding to the needs of IDPs".into(),
            donor: None,
            start: Some("2023-07-01".into()),
            end: None,
            items: vec![Entitlement {
                item: "nfi-kit".into(),
                quantity: 1,
            }],
            sites: vec!["SOC-01".into(), "BEN-01".into()],
        }
    }

    /// The record hydrated from the document itself and through the view, as text (an
    /// error included), for each record type.
    fn both(doc: &Automerge) -> Vec<(String, String)> {
        fn pair<T: autosurgeon::Hydrate + std::fmt::Debug>(doc: &Automerge) -> (String, String) {
            let direct: Result<T, _> = hydrate_prop(doc, ROOT, RECORD);
            let once: Result<T, _> = hydrate_prop(&ReadOnce::new(doc), ROOT, RECORD);
            (format!("{direct:?}"), format!("{once:?}"))
        }
        vec![
            pair::<Household>(doc),
            pair::<Site>(doc),
            pair::<Campaign>(doc),
        ]
    }

    fn start(kind: u8) -> Automerge {
        let mut doc = Automerge::new().with_actor(ActorId::from(b"aaaa".as_slice()));
        let mut tx = doc.transaction();
        match kind {
            0 => put_record(&mut tx, DocKind::Household, &sample()),
            1 => put_record(&mut tx, DocKind::Site, &site()),
            _ => put_record(&mut tx, DocKind::Campaign, &campaign()),
        }
        .unwrap();
        tx.commit();
        doc
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        /// Reading through the view gives what reading the document gives, record or error,
        /// for households, sites and campaigns edited out of shape, and for concurrent edits
        /// that conflict (on map keys and on list elements).
        #[test]
        fn reads_what_the_document_reads(
            kind in 0u8..3,
            ours in prop::collection::vec(edit(), 0..8),
            theirs in prop::collection::vec(edit(), 0..8),
        ) {
            let mut doc = start(kind);
            let mut other = doc.fork().with_actor(ActorId::from(b"bbbb".as_slice()));
            apply(&mut doc, &ours);
            apply(&mut other, &theirs);
            doc.merge(&mut other).unwrap();
            for (direct, once) in both(&doc) {
                prop_assert_eq!(direct, once);
            }
            // And after a save and load, as the store hands documents to `describe`.
            let loaded = Automerge::load(&doc.save()).unwrap();
            for (direct, once) in both(&loaded) {
                prop_assert_eq!(direct, once);
            }
        }
    }

    #[test]
    fn stored_records_read_the_same_and_whole() {
        let once: Household = hydrate_prop(&ReadOnce::new(&start(0)), ROOT, RECORD).unwrap();
        assert_eq!(once, sample());
        let once: Site = hydrate_prop(&ReadOnce::new(&start(1)), ROOT, RECORD).unwrap();
        assert_eq!(once, site());
        let once: Campaign = hydrate_prop(&ReadOnce::new(&start(2)), ROOT, RECORD).unwrap();
        assert_eq!(once, campaign());
        for kind in 0..3 {
            for (direct, once) in both(&start(kind)) {
                assert_eq!(direct, once);
            }
        }
    }
}
