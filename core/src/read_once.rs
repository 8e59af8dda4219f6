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
    use automerge::transaction::Transactable;
    use automerge::{ActorId, Automerge, ReadDoc as _, ScalarValue, ROOT};
    use autosurgeon::hydrate_prop;
    use proptest::prelude::*;

    use super::ReadOnce;
    use crate::document::{put_record, DocKind, RECORD};
    use crate::household::{tests::sample, Household};

    /// Where an edit lands: the root, the record, the provenance, the status or a member.
    #[derive(Debug, Clone)]
    enum Target {
        Root,
        Record,
        Registered,
        Status,
        Member(usize),
        Members,
    }

    #[derive(Debug, Clone)]
    enum Edit {
        Put(Target, &'static str, ScalarValue),
        PutObject(Target, &'static str, automerge::ObjType),
        Delete(Target, &'static str),
        InsertMember(usize),
        DeleteMember(usize),
    }

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
        "at",
        "sex",
        "age",
        "duplicate-of",
        "extra",
    ];

    fn scalar() -> impl Strategy<Value = ScalarValue> {
        prop_oneof![
            prop::sample::select(vec!["BEN-01", "F", "M", "idp", "active", "erased", "x"])
                .prop_map(|s| ScalarValue::Str(s.into())),
            (-3i64..200).prop_map(ScalarValue::Int),
            (0u64..200).prop_map(ScalarValue::Uint),
            Just(ScalarValue::Null),
            any::<bool>().prop_map(ScalarValue::Boolean),
            Just(ScalarValue::F64(2.5)),
        ]
    }

    fn target() -> impl Strategy<Value = Target> {
        prop_oneof![
            Just(Target::Root),
            Just(Target::Record),
            Just(Target::Registered),
            Just(Target::Status),
            (0usize..4).prop_map(Target::Member),
            Just(Target::Members),
        ]
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let key = prop::sample::select(KEYS);
        let obj = prop::sample::select(vec![
            automerge::ObjType::Map,
            automerge::ObjType::List,
            automerge::ObjType::Text,
        ]);
        prop_oneof![
            4 => (target(), key.clone(), scalar()).prop_map(|(t, k, v)| Edit::Put(t, k, v)),
            1 => (target(), key.clone(), obj).prop_map(|(t, k, o)| Edit::PutObject(t, k, o)),
            1 => (target(), key).prop_map(|(t, k)| Edit::Delete(t, k)),
            1 => (0usize..4).prop_map(Edit::InsertMember),
            1 => (0usize..4).prop_map(Edit::DeleteMember),
        ]
    }

    fn apply(doc: &mut Automerge, edits: &[Edit]) {
        let mut tx = doc.transaction();
        for e in edits {
            // Edits whose target is gone or of another kind fail; that is part of the mix.
            let Ok(Some((_, record))) = tx.get(ROOT, RECORD) else {
                continue;
            };
            let members = tx.get(&record, "members").ok().flatten().map(|(_, o)| o);
            let obj = |tx: &automerge::transaction::Transaction<'_>, t: &Target| match t {
                Target::Root => Some(ROOT),
                Target::Record => Some(record.clone()),
                Target::Registered => tx.get(&record, "registered").ok().flatten().map(|v| v.1),
                Target::Status => tx.get(&record, "status").ok().flatten().map(|v| v.1),
                Target::Members => members.clone(),
                Target::Member(i) => members
                    .as_ref()
                    .and_then(|m| tx.get(m, *i).ok().flatten().map(|v| v.1)),
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
                Edit::InsertMember(i) => {
                    if let Some(m) = &members {
                        if let Ok(o) = tx.insert_object(m, *i, automerge::ObjType::Map) {
                            let _ = tx.put(&o, "sex", "F");
                            let _ = tx.put(&o, "age", 30u64);
                        }
                    }
                }
                Edit::DeleteMember(i) => {
                    if let Some(m) = &members {
                        let _ = tx.delete(m, *i);
                    }
                }
            }
        }
        tx.commit();
    }

    fn both(doc: &Automerge) -> (String, String) {
        let direct: Result<Household, _> = hydrate_prop(doc, ROOT, RECORD);
        let once: Result<Household, _> = hydrate_prop(&ReadOnce::new(doc), ROOT, RECORD);
        (format!("{direct:?}"), format!("{once:?}"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Reading through the view gives what reading the document gives, record or error,
        /// for records edited out of shape, and for concurrent edits that conflict.
        #[test]
        fn reads_what_the_document_reads(
            ours in prop::collection::vec(edit(), 0..8),
            theirs in prop::collection::vec(edit(), 0..8),
        ) {
            let mut doc = Automerge::new().with_actor(ActorId::from(b"aaaa".as_slice()));
            {
                let mut tx = doc.transaction();
                put_record(&mut tx, DocKind::Household, &sample()).unwrap();
                tx.commit();
            }
            let mut other = doc.fork().with_actor(ActorId::from(b"bbbb".as_slice()));
            apply(&mut doc, &ours);
            apply(&mut other, &theirs);
            doc.merge(&mut other).unwrap();
            let (direct, once) = both(&doc);
            prop_assert_eq!(direct, once);
        }
    }

    #[test]
    fn a_stored_record_reads_the_same_and_whole() {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        put_record(&mut tx, DocKind::Household, &sample()).unwrap();
        tx.commit();
        let once: Household = hydrate_prop(&ReadOnce::new(&doc), ROOT, RECORD).unwrap();
        assert_eq!(once, sample());
        let (direct, once) = both(&doc);
        assert_eq!(direct, once);
    }
}
