//! How the field domain is laid out in Automerge documents.
//!
//! Every document has a `kind` at its root (`site`, `household` or `campaign`) and its typed
//! content under `record`, kept in step with the Rust structs by autosurgeon. A household
//! document also holds `distributions`, see [`crate::distribution`].
//!
//! There is no roster document listing a site's households: it would grow with the site, and
//! every registration would rewrite it. The store indexes each document under the sites its
//! record names instead ([`crate::store::Store::at_site`]).
//!
//! Documents written by other automerge-repo clients, with no `kind`, are [`DocKind::Other`]:
//! the server stores and relays them but the domain ignores them.

use automerge::{transaction::Transactable, Automerge, ObjId, ReadDoc, ScalarValue, Value, ROOT};
use autosurgeon::{hydrate_prop, Hydrate};
use serde::{Deserialize, Serialize};

use crate::read_once::ReadOnce;
use crate::{campaign::Campaign, household::Household, site::Site};

/// Root key naming the kind of a document.
pub const KIND: &str = "kind";
/// Root key of the typed record.
pub const RECORD: &str = "record";

/// What a document holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DocKind {
    /// A site and its roster.
    Site,
    /// One household registration and its distributions.
    Household,
    /// A campaign definition.
    Campaign,
    /// Anything else (e.g. a document made by a stock automerge-repo client).
    Other,
}

impl DocKind {
    /// The string stored under `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            DocKind::Site => "site",
            DocKind::Household => "household",
            DocKind::Campaign => "campaign",
            DocKind::Other => "other",
        }
    }
}

/// What the store and access control need to know about a document without loading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocInfo {
    /// Kind of document.
    pub kind: DocKind,
    /// Site codes the document belongs to (a household's current site, a campaign's sites).
    pub sites: Vec<String>,
    /// Regions (admin1) those sites are in, where known.
    pub regions: Vec<String>,
    /// The household was erased: only a tombstone remains.
    pub erased: bool,
}

impl DocInfo {
    /// Info for a document the domain does not understand.
    pub fn other() -> Self {
        DocInfo {
            kind: DocKind::Other,
            sites: Vec::new(),
            regions: Vec::new(),
            erased: false,
        }
    }
}

/// A document whose content is not what its kind promises.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DocError {
    /// The document is of another kind.
    #[error("expected a {expected} document, found {found}")]
    WrongKind {
        /// Kind asked for.
        expected: &'static str,
        /// Kind found.
        found: &'static str,
    },
    /// The record does not hydrate into the Rust type.
    #[error("malformed {kind} record: {source}")]
    Malformed {
        /// Kind of record.
        kind: &'static str,
        /// What autosurgeon reported.
        #[source]
        source: Box<autosurgeon::HydrateError>,
    },
}

/// Reads the kind of a document.
pub fn kind_of(doc: &impl automerge::ReadDoc) -> DocKind {
    kind_from(doc.get(ROOT, KIND))
}

fn kind_from(found: Result<Option<(Value<'_>, ObjId)>, automerge::AutomergeError>) -> DocKind {
    match found {
        Ok(Some((Value::Scalar(s), _))) => match s.as_ref() {
            ScalarValue::Str(k) => match k.as_str() {
                "site" => DocKind::Site,
                "household" => DocKind::Household,
                "campaign" => DocKind::Campaign,
                _ => DocKind::Other,
            },
            _ => DocKind::Other,
        },
        _ => DocKind::Other,
    }
}

/// The kind of the document behind `view`, read through it so that the root is read once.
fn kind_in(view: &ReadOnce<'_, Automerge>) -> DocKind {
    kind_from(autosurgeon::ReadDoc::get(view, &ROOT, KIND))
}

fn read_record<T: Hydrate>(doc: &Automerge, kind: DocKind) -> Result<T, DocError> {
    read_record_in(&ReadOnce::new(doc), kind)
}

fn read_record_in<T: Hydrate>(
    view: &ReadOnce<'_, Automerge>,
    kind: DocKind,
) -> Result<T, DocError> {
    let found = kind_in(view);
    if found != kind {
        return Err(DocError::WrongKind {
            expected: kind.as_str(),
            found: found.as_str(),
        });
    }
    hydrate_prop(view, ROOT, RECORD).map_err(|source| DocError::Malformed {
        kind: kind.as_str(),
        source: Box::new(source),
    })
}

/// Reads a site document's record.
pub fn read_site(doc: &Automerge) -> Result<Site, DocError> {
    read_record(doc, DocKind::Site)
}

/// Reads a household document's record.
pub fn read_household(doc: &Automerge) -> Result<Household, DocError> {
    read_record(doc, DocKind::Household)
}

/// Reads a campaign document's record.
pub fn read_campaign(doc: &Automerge) -> Result<Campaign, DocError> {
    read_record(doc, DocKind::Campaign)
}

/// Writes `kind` and the typed record into a transaction.
pub fn put_record<T: autosurgeon::Reconcile>(
    tx: &mut automerge::transaction::Transaction<'_>,
    kind: DocKind,
    record: &T,
) -> Result<(), autosurgeon::ReconcileError> {
    if kind_of(tx) != kind {
        Transactable::put(tx, ROOT, KIND, kind.as_str())?;
    }
    autosurgeon::reconcile_prop(tx, ROOT, RECORD, record)
}

/// The root map under `key`, created if missing.
pub fn ensure_map<Tx: Transactable + ReadDoc>(
    tx: &mut Tx,
    key: &str,
) -> Result<ObjId, automerge::AutomergeError> {
    match tx.get(ROOT, key)? {
        Some((Value::Object(automerge::ObjType::Map), obj)) => Ok(obj),
        _ => tx.put_object(ROOT, key, automerge::ObjType::Map),
    }
}

/// Whether `doc` has applied every change in `hashes`.
///
/// automerge 0.12's `get_change_by_hash` rebuilds the whole change from the op set, which
/// was a tenth of the server's engine thread in a push when used as a membership test; the
/// change graph answers the same question from a hash lookup. With changes queued for
/// missing dependencies `get_missing_deps` reports those too, so that rare case asks the
/// slow way.
pub fn has_changes(doc: &Automerge, hashes: &[automerge::ChangeHash]) -> bool {
    if doc.get_missing_deps(&[]).is_empty() {
        doc.get_missing_deps(hashes).is_empty()
    } else {
        hashes.iter().all(|h| doc.get_change_by_hash(h).is_some())
    }
}

/// Describes a document for the store and for access control. `region_of` maps a site code to
/// its region, where the caller knows it.
pub fn describe(doc: &Automerge, region_of: &mut dyn FnMut(&str) -> Option<String>) -> DocInfo {
    let view = ReadOnce::new(doc);
    let kind = kind_in(&view);
    // `erased` never comes from the content: only the store's own erasure (which drops the
    // bytes) makes a tombstone. A record whose status a peer set to "erased" is a household
    // like any other here, so no writer can make one vanish from every replica.
    let sites = match kind {
        DocKind::Site => match read_record_in::<Site>(&view, kind) {
            Ok(s) => {
                let region = s.admin1.clone();
                return DocInfo {
                    kind,
                    sites: vec![s.code],
                    regions: vec![region],
                    erased: false,
                };
            }
            Err(_) => Vec::new(),
        },
        DocKind::Household => match read_record_in::<Household>(&view, kind) {
            Ok(h) => vec![h.site],
            Err(_) => Vec::new(),
        },
        DocKind::Campaign => match read_record_in::<Campaign>(&view, kind) {
            Ok(c) => c.sites,
            Err(_) => Vec::new(),
        },
        DocKind::Other => Vec::new(),
    };
    let mut regions: Vec<String> = sites.iter().filter_map(|s| region_of(s)).collect();
    regions.sort();
    regions.dedup();
    DocInfo {
        kind,
        sites,
        regions,
        erased: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_change(doc: &mut Automerge, key: &str) -> automerge::ChangeHash {
        let mut tx = doc.transaction();
        tx.put(ROOT, key, 1).unwrap();
        tx.commit().0.unwrap()
    }

    #[test]
    fn has_changes_answers_as_the_slow_lookup_does() {
        let mut a = Automerge::new();
        let first = with_change(&mut a, "x");
        let mut b = a.fork();
        let second = with_change(&mut b, "y");
        let third = with_change(&mut b, "z");
        let unknown = automerge::ChangeHash([7u8; 32]);
        assert!(has_changes(&a, &[]));
        assert!(has_changes(&a, &[first]));
        assert!(!has_changes(&a, &[first, second]));
        assert!(!has_changes(&a, &[unknown]));
        // `third` alone arrives: it waits in the queue for `second`. It is not applied, and
        // `first` still is.
        let change = b.get_change_by_hash(&third).unwrap();
        a.apply_changes([change]).unwrap();
        assert!(!a.get_missing_deps(&[]).is_empty());
        assert!(has_changes(&a, &[first]));
        assert!(!has_changes(&a, &[third]));
        assert!(!has_changes(&a, &[first, second]));
    }
}
