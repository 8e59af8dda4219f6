//! The change feed indexed by scope: which feed entries a device scoped to some sites or
//! regions may have to hear of, without reading every other entry's metadata.
//!
//! A server's listing for a tablet used to read the metadata of every document written since
//! the tablet's cursor, to find the few of its own sites: when twenty tablets push at once,
//! each one's end-of-push listing walked what all the others had written. The table
//! `feed_by_scope` holds, for each document's feed entry, one row per site and region the
//! entry can concern, so a listing reads only those rows.
//!
//! The rows of an entry come from its metadata alone (`entry_keys`): its sites and regions,
//! and the sites and regions it was moved away from (whoever could read it there must purge
//! it). Erased and gone documents keep theirs: their entries tell devices to purge. A
//! document the domain cannot place ([`DocKind::Other`]) has none, as no scope but the whole
//! store covers it.
//!
//! Every write of the feed goes through one writer (`FeedWriter`), which adds or removes an
//! entry's rows with it and records, in the same transaction, how far the index goes. A file
//! whose feed went further (written by a build without the index) gets the index rebuilt at
//! open. Rows left behind by such a build point at entries that no longer exist; readers
//! check each row against the document's metadata and skip those.

use redb::{ReadableTable, TableDefinition};

use crate::access::Scope;
use crate::document::DocKind;
use crate::DocumentId;

use super::{decode_meta, DocMeta, FeedEntry, StoreError, DOCS, FEED, FEED_MARKER, META};

/// (scope key, feed sequence) → document id.
pub(super) const FEED_BY_SCOPE: TableDefinition<(&str, u64), [u8; 16]> =
    TableDefinition::new("feed_by_scope");

/// In `meta`: the last feed sequence given out, up to which `feed_by_scope` is complete
/// (8 bytes, big endian).
const INDEXED_UPTO: &str = "feed-by-scope-upto";

fn indexed_upto(txn: &redb::WriteTransaction) -> Result<u64, StoreError> {
    Ok(txn
        .open_table(META)?
        .get(INDEXED_UPTO)?
        .and_then(|g| <[u8; 8]>::try_from(g.value()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

fn site_key(site: &str) -> String {
    format!("s/{site}")
}

fn region_key(region: &str) -> String {
    format!("r/{region}")
}

/// The index rows of a document's feed entry.
pub(super) fn entry_keys(meta: &DocMeta) -> Vec<String> {
    if meta.info.kind == DocKind::Other {
        return Vec::new();
    }
    let mut keys: Vec<String> = meta
        .info
        .sites
        .iter()
        .chain(&meta.former_sites)
        .map(|s| site_key(s))
        .chain(
            meta.info
                .regions
                .iter()
                .chain(&meta.former_regions)
                .map(|r| region_key(r)),
        )
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// The index rows a listing for `scope` reads, or `None` when the scope is the whole store
/// (read the feed itself).
pub fn scope_keys(scope: &Scope) -> Option<Vec<String>> {
    if scope.is_all() {
        return None;
    }
    let mut keys: Vec<String> = scope
        .sites
        .iter()
        .map(|s| site_key(s))
        .chain(scope.regions.iter().map(|r| region_key(r)))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    Some(keys)
}

/// The change feed and its scope index, open for writing in one transaction. Every write
/// of the feed goes through it, so that no entry is added without its rows, and sequences
/// are handed out in one place.
pub(super) struct FeedWriter<'txn> {
    txn: &'txn redb::WriteTransaction,
    entries: redb::Table<'txn, u64, [u8; 16]>,
    rows: redb::Table<'txn, (&'static str, u64), [u8; 16]>,
    next: u64,
    wrote: bool,
}

impl<'txn> FeedWriter<'txn> {
    /// Opens the feed's tables in `txn`.
    pub(super) fn open(txn: &'txn redb::WriteTransaction) -> Result<Self, StoreError> {
        let entries = txn.open_table(FEED)?;
        let last = entries.last()?.map(|(k, _)| k.value()).unwrap_or(0);
        // The last entry may have been removed since (a purged document): its sequence was
        // given all the same.
        let next = last.max(indexed_upto(txn)?) + 1;
        Ok(FeedWriter {
            txn,
            entries,
            rows: txn.open_table(FEED_BY_SCOPE)?,
            next,
            wrote: false,
        })
    }

    /// The next sequence: after every one given before, not after the entries left. An
    /// entry removed may have been the last, and a sequence given twice would be missed by a
    /// cursor that had seen it.
    pub(super) fn take_seq(&mut self) -> u64 {
        self.next += 1;
        self.next - 1
    }

    /// Adds the entry of a document whose metadata is `meta` (at `meta.seq`), with its rows.
    pub(super) fn insert(&mut self, id: [u8; 16], meta: &DocMeta) -> Result<(), StoreError> {
        self.entries.insert(meta.seq, id)?;
        for k in entry_keys(meta) {
            self.rows.insert((k.as_str(), meta.seq), id)?;
        }
        self.wrote = true;
        Ok(())
    }

    /// Removes the entry of a document whose metadata is `meta`, and its rows.
    pub(super) fn remove(&mut self, meta: &DocMeta) -> Result<(), StoreError> {
        self.entries.remove(meta.seq)?;
        for k in entry_keys(meta) {
            self.rows.remove((k.as_str(), meta.seq))?;
        }
        Ok(())
    }

    /// Adds a marker ([`FEED_MARKER`]): it has no rows, devices hear of it by their cursor.
    pub(super) fn insert_marker(&mut self, seq: u64) -> Result<(), StoreError> {
        self.entries.insert(seq, *FEED_MARKER.as_bytes())?;
        self.wrote = true;
        Ok(())
    }

    /// Removes a marker.
    pub(super) fn remove_marker(&mut self, seq: u64) -> Result<(), StoreError> {
        self.entries.remove(seq)?;
        Ok(())
    }

    /// Records the last sequence given, up to which the index is complete, in the same
    /// transaction. Every writer that inserted must finish: the next one counts from it.
    pub(super) fn finish(self) -> Result<(), StoreError> {
        let FeedWriter {
            txn, next, wrote, ..
        } = self;
        if wrote {
            mark_indexed(txn, next - 1)?;
        }
        Ok(())
    }
}

/// Records that the index covers the feed up to `seq`, inside the transaction that wrote it.
fn mark_indexed(txn: &redb::WriteTransaction, seq: u64) -> Result<(), StoreError> {
    txn.open_table(META)?
        .insert(INDEXED_UPTO, seq.to_be_bytes().as_slice())?;
    Ok(())
}

/// Rebuilds the index in `txn` if the feed went past what it covers. Returns the number of
/// entries indexed (0 when nothing was to do).
pub(super) fn ensure_indexed(txn: &redb::WriteTransaction) -> Result<usize, StoreError> {
    let last = txn
        .open_table(FEED)?
        .last()?
        .map(|(k, _)| k.value())
        .unwrap_or(0);
    // Below it: the last entries were removed, which leaves nothing to index.
    if last <= indexed_upto(txn)? {
        return Ok(0);
    }
    let started = std::time::Instant::now();
    txn.delete_table(FEED_BY_SCOPE)?;
    let mut indexed = 0;
    let mut damaged = 0;
    {
        let feed = txn.open_table(FEED)?;
        let docs = txn.open_table(DOCS)?;
        let mut rows = txn.open_table(FEED_BY_SCOPE)?;
        for row in feed.iter()? {
            let (seq, id) = row?;
            let (seq, id) = (seq.value(), DocumentId::from_bytes(id.value()));
            if id == FEED_MARKER {
                continue;
            }
            let Some(m) = docs.get(id.as_bytes())? else {
                continue;
            };
            // A record that does not decode cannot be placed: scoped listings leave it out,
            // and a listing of the whole feed reports the damage, as it did before.
            let Ok(meta) = decode_meta(id, m.value()) else {
                damaged += 1;
                continue;
            };
            for k in entry_keys(&meta) {
                rows.insert((k.as_str(), seq), *id.as_bytes())?;
            }
            indexed += 1;
        }
    }
    mark_indexed(txn, last)?;
    if damaged > 0 {
        tracing::warn!(
            damaged,
            "feed entries with damaged metadata left out of the scope index"
        );
    }
    tracing::info!(
        entries = indexed,
        ms = started.elapsed().as_millis() as u64,
        "feed indexed by scope"
    );
    Ok(indexed)
}

/// One page of a listing by scope ([`super::Store::scoped_changes_since`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopedPage {
    /// Entries under the scope's rows after the cursor, oldest first: a superset of those the
    /// scope covers (a row says the entry may concern the scope; the caller decides).
    pub entries: Vec<FeedEntry>,
    /// Where the next page starts: the feed's last sequence when `complete`, else the last
    /// row read (which may be past the last entry: rows of replaced entries are skipped).
    pub cursor: u64,
    /// `entries` is every such entry up to the end of the feed.
    pub complete: bool,
}

impl ScopedPage {
    /// A page of the whole feed ([`super::Store::changes_since`] after `since`, at most
    /// `limit`), as a page of a reader whose scope is everything.
    pub fn of_feed(entries: Vec<FeedEntry>, since: u64, limit: usize) -> Self {
        ScopedPage {
            cursor: entries.last().map_or(since, |e| e.seq),
            complete: entries.len() < limit,
            entries,
        }
    }
}

/// Reads the rows under `keys` after `since` in `txn`: at most `limit` entries.
pub(super) fn read(
    txn: &redb::ReadTransaction,
    since: u64,
    limit: usize,
    keys: &[String],
) -> Result<ScopedPage, StoreError> {
    let limit = limit.max(1);
    let table = txn.open_table(FEED_BY_SCOPE)?;
    let docs = txn.open_table(DOCS)?;
    let last = txn
        .open_table(FEED)?
        .last()?
        .map(|(k, _)| k.value())
        .unwrap_or(0);
    // Each key's rows are in sequence order. Take up to `limit` from each; where a key had
    // more, nothing after its last row taken is known to be complete.
    let mut rows: Vec<(u64, [u8; 16])> = Vec::new();
    let mut bound = u64::MAX;
    for k in keys {
        let range = (k.as_str(), since.saturating_add(1))..=(k.as_str(), u64::MAX);
        for (taken, row) in table.range(range)?.enumerate() {
            let (key, id) = row?;
            let seq = key.value().1;
            if taken == limit {
                bound = bound.min(seq - 1);
                break;
            }
            rows.push((seq, id.value()));
        }
    }
    rows.retain(|(seq, _)| *seq <= bound);
    rows.sort_unstable_by_key(|(seq, _)| *seq);
    rows.dedup_by_key(|(seq, _)| *seq);
    let mut complete = bound == u64::MAX;
    if rows.len() > limit {
        rows.truncate(limit);
        complete = false;
    }
    let cursor = if complete {
        last.max(since)
    } else {
        rows.last().map_or(since, |(seq, _)| *seq)
    };
    let mut entries = Vec::with_capacity(rows.len());
    for (seq, id) in rows {
        let id = DocumentId::from_bytes(id);
        let Some(m) = docs.get(id.as_bytes())? else {
            continue;
        };
        let meta = decode_meta(id, m.value())?;
        // A row left by a build without the index, for an entry since replaced.
        if meta.seq != seq {
            continue;
        }
        entries.push(FeedEntry { seq, id, meta });
    }
    Ok(ScopedPage {
        entries,
        cursor,
        complete,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{DocWrite, Store};
    use super::*;
    use crate::document::DocInfo;
    use automerge::transaction::Transactable;
    use automerge::Automerge;
    use proptest::prelude::*;

    const SITES: [(&str, &str); 4] = [
        ("SOC-01", "Mopti"),
        ("SOC-02", "Mopti"),
        ("GAO-01", "Gao"),
        ("GAO-02", "Gao"),
    ];

    fn info(kind: DocKind, site: usize) -> DocInfo {
        let (s, r) = SITES[site % SITES.len()];
        DocInfo {
            kind,
            sites: vec![s.into()],
            regions: vec![r.into()],
            erased: false,
        }
    }

    /// What a listing for `scope` must hear of: the entries it covers, and those of
    /// documents moved away from it.
    fn concerns(scope: &Scope, e: &FeedEntry) -> bool {
        e.id != FEED_MARKER
            && (scope.covers(&e.meta.info)
                || (!e.meta.former_sites.is_empty() && scope.covers(&e.meta.former_info())))
    }

    /// Every entry a scoped reader gets, page after page from `since`, and the cursor it
    /// ends at.
    fn read_all(store: &Store, scope: &Scope, since: u64, limit: usize) -> (Vec<u64>, u64) {
        let keys = scope_keys(scope).expect("scoped");
        let mut cursor = since;
        let mut seen = Vec::new();
        for _ in 0..10_000 {
            let page = store.scoped_changes_since(cursor, limit, &keys).unwrap();
            assert!(page.entries.len() <= limit);
            assert!(page.cursor >= cursor, "the cursor never goes back");
            seen.extend(
                page.entries
                    .iter()
                    .filter(|e| concerns(scope, e))
                    .map(|e| e.seq),
            );
            if page.complete {
                return (seen, page.cursor);
            }
            assert!(page.cursor > cursor, "an incomplete page moves the cursor");
            cursor = page.cursor;
        }
        panic!("the listing never completed");
    }

    fn expected(store: &Store, scope: &Scope, since: u64) -> Vec<u64> {
        store
            .changes_since(since, usize::MAX)
            .unwrap()
            .iter()
            .filter(|e| concerns(scope, e))
            .map(|e| e.seq)
            .collect()
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Write document `doc` (a new one, or a change) placed at site `site`.
        Write {
            doc: usize,
            site: usize,
            kind: u8,
        },
        Erase(usize),
        Forget(usize),
        Remove(usize),
        Mark,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..8usize, 0..4usize, 0..4u8).prop_map(|(doc, site, kind)| Op::Write { doc, site, kind }),
            1 => (0..8usize).prop_map(Op::Erase),
            1 => (0..8usize).prop_map(Op::Forget),
            1 => (0..8usize).prop_map(Op::Remove),
            1 => Just(Op::Mark),
        ]
    }

    fn apply(store: &Store, docs: &mut [Option<Automerge>], ids: &[DocumentId], op: &Op) {
        match *op {
            Op::Write { doc, site, kind } => {
                let kind = match kind {
                    0 => DocKind::Household,
                    1 => DocKind::Site,
                    2 => DocKind::Campaign,
                    _ => DocKind::Other,
                };
                let d = docs[doc].get_or_insert_with(Automerge::new);
                let base = store
                    .meta(ids[doc])
                    .unwrap()
                    .filter(|m| !m.gone)
                    .map(|m| m.change_hashes())
                    .unwrap_or_default();
                let stamp = store.last_seq().unwrap() as i64;
                let mut tx = d.transaction();
                // Always a change: automerge writes nothing for a value put again.
                tx.put(automerge::ROOT, "stamp", stamp).unwrap();
                tx.commit();
                let info = if kind == DocKind::Other {
                    DocInfo::other()
                } else {
                    info(kind, site)
                };
                let mut w = DocWrite::from_doc(ids[doc], info, d, base.clone());
                if base.is_empty() {
                    w.data = d.save();
                }
                store.write(&[w]).unwrap();
            }
            Op::Erase(doc) => {
                store.erase(ids[doc], &[]).unwrap();
            }
            Op::Forget(doc) => {
                store.forget(ids[doc]).unwrap();
            }
            Op::Remove(doc) => {
                if store.remove(ids[doc]).unwrap() {
                    docs[doc] = None;
                }
            }
            Op::Mark => {
                store.mark_feed().unwrap();
            }
        }
    }

    fn scopes() -> Vec<Scope> {
        let site = |s: &str| Scope {
            regions: vec![],
            sites: vec![s.into()],
        };
        vec![
            site("SOC-01"),
            site("GAO-02"),
            Scope {
                regions: vec!["Mopti".into()],
                sites: vec![],
            },
            Scope {
                regions: vec!["Gao".into()],
                sites: vec!["SOC-02".into()],
            },
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Whatever was written, moved, erased, forgotten or removed, a scoped reader paging
        /// through the index hears of exactly what a reader of the whole feed, filtered by
        /// the same scope, would; and it ends at the feed's last sequence.
        #[test]
        fn a_scoped_listing_hears_what_the_whole_feed_says_of_its_scope(
            ops in proptest::collection::vec(op(), 1..40),
            since_at in 0..40usize,
            limit in 1..5usize,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path().join("s.redb")).unwrap();
            let ids: Vec<DocumentId> = (0..8).map(|_| DocumentId::random()).collect();
            let mut docs: Vec<Option<Automerge>> = vec![None; 8];
            let mut since = 0;
            for (i, op) in ops.iter().enumerate() {
                if i == since_at {
                    since = store.last_seq().unwrap();
                }
                apply(&store, &mut docs, &ids, op);
            }
            for scope in scopes() {
                let (got, cursor) = read_all(&store, &scope, since, limit);
                prop_assert_eq!(&got, &expected(&store, &scope, since), "scope {:?}", scope);
                prop_assert_eq!(cursor, store.last_seq().unwrap().max(since));
            }
        }
    }

    /// A store of 8 households, 2 at each site, in the order of `ids`.
    fn two_households_a_site() -> (tempfile::TempDir, Store, Vec<DocumentId>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s.redb")).unwrap();
        let ids: Vec<DocumentId> = (0..8).map(|_| DocumentId::random()).collect();
        let mut docs: Vec<Option<Automerge>> = vec![None; 8];
        for doc in 0..8 {
            let op = Op::Write {
                doc,
                site: doc,
                kind: 0,
            };
            apply(&store, &mut docs, &ids, &op);
        }
        (dir, store, ids)
    }

    #[test]
    fn a_feed_written_without_the_index_is_indexed_again_at_open() {
        let (_dir, store, _) = two_households_a_site();
        let scope = &scopes()[0];
        let want = expected(&store, scope, 0);
        assert_eq!(want.len(), 2);
        assert_eq!(read_all(&store, scope, 0, 10).0, want);
        // A build without the index wrote: no rows, and the feed went on.
        {
            let db = store.database().unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(FEED_BY_SCOPE).unwrap();
            txn.open_table(FEED_BY_SCOPE).unwrap();
            mark_indexed(&txn, 1).unwrap();
            txn.commit().unwrap();
        }
        assert_eq!(read_all(&store, scope, 0, 10).0, Vec::<u64>::new());
        store.reopen().unwrap();
        assert_eq!(read_all(&store, scope, 0, 10).0, want);
        // Indexed once: opening again finds nothing to do.
        let db = store.database().unwrap();
        let txn = db.begin_write().unwrap();
        assert_eq!(ensure_indexed(&txn).unwrap(), 0);
    }

    #[test]
    fn a_damaged_record_is_left_out_of_a_rebuilt_index_and_the_rest_still_lists() {
        let (_dir, store, ids) = two_households_a_site();
        let scope = &scopes()[0];
        let want = expected(&store, scope, 0);
        assert_eq!(want.len(), 2);
        // Damage the metadata of the scope's first household, and make the index stale.
        {
            let db = store.database().unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(DOCS)
                .unwrap()
                .insert(ids[0].as_bytes(), [0x01u8, 0xff, 0x00].as_slice())
                .unwrap();
            mark_indexed(&txn, 1).unwrap();
            txn.commit().unwrap();
        }
        store
            .reopen()
            .expect("a damaged record does not stop the store from opening");
        assert!(matches!(
            store.changes_since(0, 100),
            Err(StoreError::BadMeta { .. })
        ));
        let (seen, cursor) = read_all(&store, scope, 0, 10);
        assert_eq!(seen, vec![want[1]]);
        assert_eq!(cursor, store.last_seq().unwrap());
    }

    #[test]
    fn rows_of_entries_since_replaced_are_skipped_and_still_move_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s.redb")).unwrap();
        let ids: Vec<DocumentId> = (0..2).map(|_| DocumentId::random()).collect();
        let mut docs: Vec<Option<Automerge>> = vec![None; 2];
        for doc in [0, 1, 0] {
            let op = Op::Write {
                doc,
                site: 0,
                kind: 0,
            };
            apply(&store, &mut docs, &ids, &op);
        }
        let keys = scope_keys(&scopes()[0]).unwrap();
        // Rows a build without the index left behind: one for an entry that was replaced
        // (document 0 moved on to sequence 3), one for a document that no longer exists.
        {
            let db = store.database().unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(FEED_BY_SCOPE).unwrap();
                let k = keys[0].as_str();
                t.insert((k, 1), *ids[0].as_bytes()).unwrap();
                t.insert((k, 1_000), *DocumentId::random().as_bytes())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        assert_eq!(store.last_seq().unwrap(), 3);
        let page = store.scoped_changes_since(0, 1, &keys).unwrap();
        assert!(page.entries.is_empty() && !page.complete, "{page:?}");
        assert_eq!(page.cursor, 1);
        let (seen, cursor) = read_all(&store, &scopes()[0], 0, 1);
        assert_eq!(seen, vec![2, 3]);
        assert_eq!(seen, expected(&store, &scopes()[0], 0));
        assert_eq!(cursor, 3);
    }
}
