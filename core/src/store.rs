//! The durable store: every document of a replica in one redb file.
//!
//! # Tables
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `docs` | document id | [`DocMeta`] (kind, sites, regions, heads, feed sequence) as a version byte and a CBOR array; stores written before 2026-12-02 hold JSON, still read, and rewritten at each document's next write |
//! | `snapshots` | document id | a full `save()` of the document |
//! | `chunks` | (document id, n) | incremental changes appended after the snapshot |
//! | `feed` | sequence | document id, one entry per document: its latest write |
//! | `by_site` | (site code, document id) | nothing: which documents belong to a site |
//! | `feed_by_scope` | (`s/` site or `r/` region, sequence) | document id: the feed entries that may concern a site or region ([`scope_feed`]) |
//! | `meta` | name | small values (this replica's actor id, cursors) |
//! | `sync_states` | (peer key, document id) | automerge's encoded `sync::State` for a peer that keeps its own storage |
//! | `audit` | sequence | one [`AuditEntry`] as JSON: who did what to which document, and when |
//!
//! An erased document keeps only its metadata, marked erased (a tombstone): its bytes are
//! gone, and [`Store::write`] refuses to store anything under its id again, so no replica can
//! bring it back.
//!
//! A write appends the bytes `save_after(stored heads)` as a chunk; it costs what changed, not
//! what the document holds. Once a document has [`COMPACT_AFTER_CHUNKS`] chunks, the same
//! transaction folds them into a new snapshot. Since a redb write transaction is exclusive,
//! compaction can never interleave with another write of the same document.
//!
//! Every [`Store::write`] is one redb transaction, committed with redb's default immediate
//! durability: when it returns `Ok`, the data survives a crash or a SIGKILL. Callers that write
//! many documents at once (a sync, a registration touching a roster) pass them together so
//! they share one fsync.
//!
//! The feed gives every durable write of a document the next sequence number and drops that
//! document's previous entry, so "what changed since N" is one range scan whose length is the
//! number of documents changed, not the number of writes.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use automerge::{Automerge, ChangeHash};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::audit::AuditEntry;
use crate::document::DocInfo;
use crate::DocumentId;

mod meta;
pub mod scope_feed;

pub use scope_feed::ScopedPage;
use scope_feed::{FeedWriter, FEED_BY_SCOPE};

const DOCS: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("docs");
const SNAPSHOTS: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("snapshots");
const CHUNKS: TableDefinition<([u8; 16], u32), &[u8]> = TableDefinition::new("chunks");
const FEED: TableDefinition<u64, [u8; 16]> = TableDefinition::new("feed");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const BY_SITE: TableDefinition<(&str, [u8; 16]), ()> = TableDefinition::new("by_site");
const SYNC_STATES: TableDefinition<(&str, [u8; 16]), &[u8]> = TableDefinition::new("sync_states");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const COMPACT_PENDING: &str = "compact-pending";

/// The id under which [`Store::mark_feed`] records a marker in the change feed. No document
/// has it: [`Store::changes_since`] returns the marker as an entry of kind `other`, which
/// readers of the feed skip, so that a cursor can move past it.
pub const FEED_MARKER: DocumentId = DocumentId::from_bytes([0xff; 16]);

/// A document is compacted into one snapshot once it has this many incremental chunks. Small
/// enough that loading a busy document stays cheap, large enough that compaction (a full
/// `save()`) is rare.
pub const COMPACT_AFTER_CHUNKS: u32 = 64;

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// redb failed (I/O, a full disk, a damaged file).
    #[error("storage: {0}")]
    Redb(#[from] redb::Error),
    /// Another process has the file open.
    #[error("the store {0} is already open in another process (is `relais serve` running?)")]
    Locked(PathBuf),
    /// Stored or supplied bytes are not a valid Automerge document.
    #[error("document {id}: bytes are not valid Automerge data: {reason}")]
    Corrupt {
        /// The document concerned.
        id: DocumentId,
        /// What Automerge reported.
        reason: String,
    },
    /// A metadata record failed to decode.
    #[error("document {id}: metadata record is damaged: {reason}")]
    BadMeta {
        /// The document concerned.
        id: DocumentId,
        /// What went wrong.
        reason: String,
    },
    /// An audit record failed to decode.
    #[error("audit record {seq} is damaged: {reason}")]
    BadAudit {
        /// Its sequence.
        seq: u64,
        /// What went wrong.
        reason: String,
    },
    /// A write failed earlier (a full disk) and the file could not be opened again yet; see
    /// [`Store::reopen`].
    #[error("the store is closed after a storage failure (is the disk full?); retry later")]
    Closed,
    /// The directory for the store could not be created.
    #[error("cannot create {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(e.into())
            }
        }
    )*};
}
redb_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// What the store keeps about a document besides its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocMeta {
    /// Kind, sites and regions: what access control and listings need.
    pub info: DocInfo,
    /// Heads of the stored document, as hex strings.
    pub heads: Vec<String>,
    /// Feed sequence of the latest write.
    pub seq: u64,
    /// Incremental chunks stored after the snapshot.
    pub chunks: u32,
    /// Sites the document belonged to before (a household that moved). A device that could
    /// read it there is told to purge its copy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub former_sites: Vec<String>,
    /// Regions of [`DocMeta::former_sites`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub former_regions: Vec<String>,
    /// The document left this replica's scope ([`Store::forget`]): its bytes are gone, and
    /// the feed tells devices that held it to purge it. A later write brings it back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gone: bool,
}

impl DocMeta {
    /// The heads as change hashes.
    pub fn change_hashes(&self) -> Vec<ChangeHash> {
        self.heads.iter().filter_map(|h| h.parse().ok()).collect()
    }

    /// The document as it was placed before it moved: what a device that may have held it
    /// could read.
    pub fn former_info(&self) -> DocInfo {
        DocInfo {
            kind: self.info.kind,
            sites: self.former_sites.clone(),
            regions: self.former_regions.clone(),
            erased: false,
        }
    }
}

fn add_all(into: &mut Vec<String>, from: &[String]) {
    for s in from {
        if !into.contains(s) {
            into.push(s.clone());
        }
    }
}

/// One document to write: the bytes to append and the heads they lead to.
#[derive(Debug, Clone)]
pub struct DocWrite {
    /// The document.
    pub id: DocumentId,
    /// Its description after the write.
    pub info: DocInfo,
    /// Heads the writer believes are stored (what `data` was saved after).
    pub base_heads: Vec<ChangeHash>,
    /// `save_after(base_heads)`, or a full `save()` for a new document.
    pub data: Vec<u8>,
    /// Heads of the writer's document after the write.
    pub heads: Vec<ChangeHash>,
    /// `data` was saved from a document held in memory ([`DocWrite::from_doc`]), or is one
    /// document chunk that automerge loaded, verifying its heads, into the document being
    /// written; so a new document's bytes are stored without being parsed again. False for bytes from
    /// anywhere else: the store then loads them first and refuses what does not load.
    pub verified: bool,
}

impl DocWrite {
    /// The write that brings the store from `base_heads` to `doc`'s current state.
    pub fn from_doc(
        id: DocumentId,
        info: DocInfo,
        doc: &Automerge,
        base_heads: Vec<ChangeHash>,
    ) -> Self {
        let data = if base_heads.is_empty() {
            doc.save()
        } else {
            doc.save_after(&base_heads)
        };
        DocWrite {
            id,
            info,
            base_heads,
            data,
            heads: doc.get_heads(),
            verified: true,
        }
    }
}

/// A document loaded from the store.
#[derive(Debug)]
pub struct StoredDoc {
    /// The document.
    pub doc: Automerge,
    /// Its metadata.
    pub meta: DocMeta,
}

/// A document's stored heads and bytes, not parsed ([`Store::stored_bytes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBytes {
    /// Heads of the stored document.
    pub heads: Vec<ChangeHash>,
    /// Its snapshot and the chunks after it: what [`Automerge::load`] reads.
    pub bytes: Vec<u8>,
}

/// One entry of the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEntry {
    /// Sequence of the document's latest write.
    pub seq: u64,
    /// The document.
    pub id: DocumentId,
    /// Its metadata at that write.
    pub meta: DocMeta,
}

/// The durable store of one replica. See the [module docs](self).
pub struct Store {
    /// `None` only between a failed [`Store::reopen`] and the next.
    db: RwLock<Option<Database>>,
    path: PathBuf,
    cache_bytes: usize,
    /// When a write last found the file failed and reopened it (see [`REOPEN_EVERY`]).
    last_recovery: Mutex<Option<Instant>>,
}

/// Least time between two reopenings of the file that a write does by itself after a
/// storage failure: reopening may run redb's recovery over the whole file.
pub const REOPEN_EVERY: Duration = Duration::from_secs(2);

/// The open database, borrowed from a [`Store`] (see [`Store::database`]).
pub struct DbGuard<'a>(RwLockReadGuard<'a, Option<Database>>);

impl std::ops::Deref for DbGuard<'_> {
    type Target = Database;
    fn deref(&self) -> &Database {
        self.0
            .as_ref()
            .expect("a guard is only made over an open database")
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// Parses Automerge bytes, turning both errors and panics into [`StoreError::Corrupt`]:
/// these bytes may come from a damaged disk or from the network.
pub fn load_doc(id: DocumentId, parts: &[&[u8]]) -> Result<Automerge, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { id, reason };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut parts = parts.iter();
        let mut doc = match parts.next() {
            Some(first) if !first.is_empty() => {
                Automerge::load(first).map_err(|e| e.to_string())?
            }
            _ => Automerge::new(),
        };
        for p in parts {
            doc.load_incremental(p).map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(doc)
    }));
    match result {
        Ok(Ok(doc)) => Ok(doc),
        Ok(Err(e)) => Err(corrupt(e)),
        Err(_) => Err(corrupt("automerge panicked while loading".into())),
    }
}

/// Automerge's chunk header: magic bytes, then a checksum, a type and a length.
const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// True when `bytes` is a run of automerge chunks (documents, changes or bundles) whose
/// checksums match their contents: the first four bytes of the SHA-256 of the type, the
/// length and the data. A compressed change's checksum is that of its inflated bytes, so a
/// run holding one is not vouched for here (`false`).
pub(crate) fn chunks_intact(bytes: &[u8]) -> bool {
    chunk_types(bytes).is_some()
}

/// True when `bytes` is exactly one intact document chunk: what a whole `save()` is.
pub(crate) fn one_document_chunk(bytes: &[u8]) -> bool {
    chunk_types(bytes).is_some_and(|t| t == [0])
}

/// The type of every chunk in `bytes`, in order, if each is intact (see [`chunks_intact`]).
fn chunk_types(mut bytes: &[u8]) -> Option<Vec<u8>> {
    use sha2::{Digest, Sha256};
    if bytes.is_empty() {
        return None;
    }
    let mut types = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 9 || bytes[..4] != CHUNK_MAGIC {
            return None;
        }
        let checksum = &bytes[4..8];
        let kind = bytes[8];
        if !matches!(kind, 0 | 1 | 3) {
            return None;
        }
        // The length, unsigned LEB128 (at most ten bytes for a u64).
        let (mut len, mut shift, mut at) = (0u64, 0u32, 9usize);
        loop {
            let &b = bytes.get(at)?;
            if shift > 63 {
                return None;
            }
            len |= u64::from(b & 0x7f) << shift;
            at += 1;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        let end = usize::try_from(len).ok().and_then(|l| at.checked_add(l))?;
        if end > bytes.len() {
            return None;
        }
        let digest = Sha256::new()
            .chain_update(&bytes[8..at])
            .chain_update(&bytes[at..end])
            .finalize();
        if digest[..4] != *checksum {
            return None;
        }
        types.push(kind);
        bytes = &bytes[end..];
    }
    Some(types)
}

/// Parses untrusted Automerge bytes (a saved document or changes), refusing any damage rather
/// than keeping a valid prefix. Panics inside automerge become [`StoreError::Corrupt`].
pub fn parse_strict(id: DocumentId, bytes: &[u8]) -> Result<Automerge, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { id, reason };
    let opts = || {
        automerge::LoadOptions::new()
            .on_partial_load(automerge::OnPartialLoad::Error)
            .verification_mode(automerge::VerificationMode::Check)
    };
    match catch_unwind(AssertUnwindSafe(|| {
        Automerge::load_with_options(bytes, opts())
    })) {
        Ok(Ok(doc)) => Ok(doc),
        Ok(Err(e)) => Err(corrupt(e.to_string())),
        Err(_) => Err(corrupt("automerge panicked while parsing".into())),
    }
}

fn hex_heads(heads: &[ChangeHash]) -> Vec<String> {
    let mut v: Vec<String> = heads.iter().map(|h| h.to_string()).collect();
    v.sort();
    v
}

fn decode_meta(id: DocumentId, bytes: &[u8]) -> Result<DocMeta, StoreError> {
    meta::decode(id, bytes)
}

/// redb's page cache for [`Store::open`]: 64 MiB. redb's own default, 1 GiB, lets a
/// long-running server's memory grow with its file (measured: +108 MB over a 10-minute
/// soak), and a tablet has no such memory to spare.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

fn open_db(path: &Path, cache_bytes: usize) -> Result<Database, StoreError> {
    let db = match redb::Builder::new()
        .set_cache_size(cache_bytes)
        .create(path)
    {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
            return Err(StoreError::Locked(path.to_path_buf()))
        }
        Err(e) => return Err(e.into()),
    };
    let txn = db.begin_write()?;
    txn.open_table(DOCS)?;
    txn.open_table(SNAPSHOTS)?;
    txn.open_table(CHUNKS)?;
    txn.open_table(FEED)?;
    txn.open_table(META)?;
    txn.open_table(BY_SITE)?;
    txn.open_table(SYNC_STATES)?;
    txn.open_table(AUDIT)?;
    txn.open_table(FEED_BY_SCOPE)?;
    scope_feed::ensure_indexed(&txn)?;
    txn.commit()?;
    Ok(db)
}

impl Store {
    /// Opens the store at `path`, creating the file (and its directory) if needed, with a
    /// page cache of [`DEFAULT_CACHE_BYTES`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Store::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Like [`Store::open`], with redb's page cache bounded to `cache_bytes`.
    pub fn open_with_cache(path: impl AsRef<Path>, cache_bytes: usize) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let db = open_db(&path, cache_bytes)?;
        Ok(Store {
            db: RwLock::new(Some(db)),
            path,
            cache_bytes,
            last_recovery: Mutex::new(None),
        })
    }

    /// Opens the file again, after a write failed. redb refuses every transaction after an
    /// I/O error (a disk that filled up) until the file is reopened, and then recovers the
    /// last committed state: nothing committed is lost, and writes work again once there is
    /// room. If the file cannot be opened yet (still no room, or a transaction begun before
    /// still holds the old handle), every call fails with [`StoreError::Closed`] until a
    /// later `reopen` succeeds: any read or write tries one by itself, at most every
    /// [`REOPEN_EVERY`].
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        // The old handle must be gone first: redb locks the file while it is open.
        drop(slot.take());
        match open_db(&self.path, self.cache_bytes) {
            Ok(db) => {
                *slot = Some(db);
                Ok(())
            }
            // Our own old handle, not another process.
            Err(StoreError::Locked(_)) => Err(StoreError::Closed),
            Err(e) => Err(e),
        }
    }

    /// Begins a write transaction. After a storage failure (a full disk) redb refuses every
    /// write until the file is opened again; this reopens it by itself, at most every
    /// [`REOPEN_EVERY`], so that a long-running process (a tablet's app, a server) writes
    /// again once there is room, without a restart. Within that interval the write fails
    /// with [`StoreError::Closed`].
    fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        // The guard must be gone before a reopen, which takes the lock exclusively: it is
        // dropped at the end of the match. A reopen that failed earlier was retried by
        // `db` already.
        match self.db()?.begin_write() {
            Ok(txn) => return Ok(txn),
            Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo)) => {}
            Err(e) => return Err(e.into()),
        }
        self.recover()?;
        let db = self.db()?;
        Ok(db.begin_write()?)
    }

    fn recover(&self) -> Result<(), StoreError> {
        let mut last = self.last_recovery.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
            return Err(StoreError::Closed);
        }
        *last = Some(Instant::now());
        // A file that is gone (a volume not mounted, a path removed) is not replaced by an
        // empty store behind the caller's back: that would serve nothing as if it were all.
        if !self.path.exists() {
            tracing::error!(path = %self.path.display(), "the store's file is missing; not reopening it");
            return Err(StoreError::Closed);
        }
        match self.reopen() {
            Ok(()) => {
                tracing::warn!(path = %self.path.display(), "store reopened after a storage failure");
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "could not reopen the store");
                Err(e)
            }
        }
    }

    /// The open database. After a reopen that failed, reads as well as writes try again (at
    /// most every [`REOPEN_EVERY`]), so that a process that only reads meanwhile (a server
    /// answering reconnects with nothing new) comes back by itself once the file opens.
    fn db(&self) -> Result<DbGuard<'_>, StoreError> {
        {
            let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
            if guard.is_some() {
                return Ok(DbGuard(guard));
            }
        }
        // `recover` logs why the file does not open; the caller hears `Closed`, as the
        // docs of `reopen` say. Another thread may have reopened it meanwhile, in which case
        // this one's attempt was skipped: look again either way.
        let _ = self.recover();
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(StoreError::Closed);
        }
        Ok(DbGuard(guard))
    }

    /// The path of the redb file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying database, for adapters that keep their own tables in the same file.
    /// Hold it only for the time it takes to begin a transaction: [`Store::reopen`] waits.
    pub fn database(&self) -> Result<DbGuard<'_>, StoreError> {
        self.db()
    }

    /// The metadata of a document, without loading it.
    pub fn meta(&self, id: DocumentId) -> Result<Option<DocMeta>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let docs = txn.open_table(DOCS)?;
        let v = docs.get(id.as_bytes())?;
        v.map(|g| decode_meta(id, g.value())).transpose()
    }

    /// Loads a document. `Ok(None)` when it is not stored.
    pub fn load(&self, id: DocumentId) -> Result<Option<StoredDoc>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let docs = txn.open_table(DOCS)?;
        let Some(meta) = docs.get(id.as_bytes())? else {
            return Ok(None);
        };
        let meta = decode_meta(id, meta.value())?;
        if meta.gone {
            return Ok(None);
        }
        let doc = assemble(
            id,
            &txn.open_table(SNAPSHOTS)?,
            &txn.open_table(CHUNKS)?,
            meta.chunks,
        )?;
        Ok(Some(StoredDoc { doc, meta }))
    }

    /// A document's stored heads and bytes (its snapshot and the chunks after it, as
    /// [`Automerge::load`] reads them), without parsing them: what a replica sends a server
    /// that has never seen the document. `Ok(None)` when it is not stored, erased or gone,
    /// and when a chunk's checksum does not match its bytes (damage on disk, which the
    /// caller then meets as a load error instead of sending it).
    pub fn stored_bytes(&self, id: DocumentId) -> Result<Option<StoredBytes>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let docs = txn.open_table(DOCS)?;
        let Some(meta) = docs.get(id.as_bytes())? else {
            return Ok(None);
        };
        let meta = decode_meta(id, meta.value())?;
        if meta.gone || meta.info.erased {
            return Ok(None);
        }
        let parts = stored_parts(
            id,
            &txn.open_table(SNAPSHOTS)?,
            &txn.open_table(CHUNKS)?,
            meta.chunks,
        )?;
        // No snapshot: the document is in its chunks alone (back in scope after `forget`).
        if parts[0].is_empty() {
            return Ok(None);
        }
        let bytes = parts.concat();
        if !chunks_intact(&bytes) {
            return Ok(None);
        }
        Ok(Some(StoredBytes {
            heads: meta.change_hashes(),
            bytes,
        }))
    }

    /// Writes several documents in one durable transaction and returns their new feed
    /// sequence numbers, in order. A write whose heads are already stored is skipped and
    /// returns the sequence it already had.
    pub fn write(&self, writes: &[DocWrite]) -> Result<Vec<u64>, StoreError> {
        self.commit(writes, &[])
    }

    /// Like [`Store::write`], and appends audit entries in the same transaction, so a change
    /// is never stored without its audit record, nor recorded without being stored.
    pub fn commit(
        &self,
        writes: &[DocWrite],
        audit: &[AuditEntry],
    ) -> Result<Vec<u64>, StoreError> {
        self.commit_all(writes, audit, &[])
    }

    /// Like [`Store::commit`], and saves sync states (as [`Store::put_sync_states`]) in the
    /// same transaction: one disk flush for a server's round.
    pub fn commit_with_states(
        &self,
        writes: &[DocWrite],
        audit: &[AuditEntry],
        states: &[(String, DocumentId, Vec<u8>)],
    ) -> Result<Vec<u64>, StoreError> {
        self.commit_all(writes, audit, states)
    }

    /// Like [`Store::write`], and saves sync states (as [`Store::put_sync_states`]) in the
    /// same transaction: one disk flush for a replica's whole batch.
    pub fn write_with_states(
        &self,
        writes: &[DocWrite],
        states: &[(String, DocumentId, Vec<u8>)],
    ) -> Result<Vec<u64>, StoreError> {
        self.commit_all(writes, &[], states)
    }

    fn commit_all(
        &self,
        writes: &[DocWrite],
        audit: &[AuditEntry],
        states: &[(String, DocumentId, Vec<u8>)],
    ) -> Result<Vec<u64>, StoreError> {
        if writes.is_empty() && audit.is_empty() && states.is_empty() {
            return Ok(Vec::new());
        }
        let txn = self.begin_write()?;
        if !audit.is_empty() {
            append_audit(&txn, audit)?;
        }
        if !states.is_empty() {
            insert_sync_states(&txn, states)?;
        }
        let mut seqs = Vec::with_capacity(writes.len());
        {
            let mut docs = txn.open_table(DOCS)?;
            let mut snaps = txn.open_table(SNAPSHOTS)?;
            let mut chunks = txn.open_table(CHUNKS)?;
            let mut feed = FeedWriter::open(&txn)?;
            let mut by_site = txn.open_table(BY_SITE)?;
            for w in writes {
                let key = *w.id.as_bytes();
                let old = docs
                    .get(&key)?
                    .map(|g| decode_meta(w.id, g.value()))
                    .transpose()?;
                let new_heads = hex_heads(&w.heads);
                // A forgotten document has no site index entries left.
                let old_sites = old
                    .as_ref()
                    .filter(|m| !m.gone)
                    .map(|m| m.info.sites.clone())
                    .unwrap_or_default();
                let mut meta = match old {
                    Some(old) if old.info.erased => {
                        // A tombstone is final: nothing is stored under an erased id again.
                        seqs.push(old.seq);
                        continue;
                    }
                    Some(old) => {
                        if old.heads == new_heads && old.info == w.info {
                            seqs.push(old.seq);
                            continue;
                        }
                        feed.remove(&old)?;
                        if !w.data.is_empty() {
                            chunks.insert((key, old.chunks), w.data.as_slice())?;
                        }
                        let mut m = old;
                        if m.gone {
                            // Back in scope: the write carries the whole document.
                            m.gone = false;
                            m.heads.clear();
                        }
                        if !w.data.is_empty() {
                            m.chunks += 1;
                        }
                        if hex_heads(&w.base_heads) == m.heads {
                            m.heads = new_heads;
                        } else {
                            // The writer saved from an older view: the stored heads are the
                            // union, which only the merged document knows.
                            let doc = assemble(w.id, &snaps, &chunks, m.chunks)?;
                            m.heads = hex_heads(&doc.get_heads());
                        }
                        m
                    }
                    None => {
                        // Validate before storing: a snapshot that does not load would make
                        // the document unreadable for good. Bytes automerge just saved from a
                        // loaded document need no second parse (an eighth of the server engine's
                        // time per new household was this parse).
                        let heads = if w.verified {
                            new_heads
                        } else {
                            hex_heads(&load_doc(w.id, &[&w.data])?.get_heads())
                        };
                        snaps.insert(key, w.data.as_slice())?;
                        DocMeta {
                            info: w.info.clone(),
                            heads,
                            seq: 0,
                            chunks: 0,
                            former_sites: Vec::new(),
                            former_regions: Vec::new(),
                            gone: false,
                        }
                    }
                };
                if old_sites != w.info.sites {
                    let gone: Vec<String> = old_sites
                        .iter()
                        .filter(|s| !w.info.sites.contains(s))
                        .cloned()
                        .collect();
                    add_all(&mut meta.former_sites, &gone);
                    let gone: Vec<String> = meta
                        .info
                        .regions
                        .iter()
                        .filter(|r| !w.info.regions.contains(r))
                        .cloned()
                        .collect();
                    add_all(&mut meta.former_regions, &gone);
                    for s in &old_sites {
                        by_site.remove((s.as_str(), key))?;
                    }
                    for s in &w.info.sites {
                        by_site.insert((s.as_str(), key), ())?;
                    }
                }
                meta.info = w.info.clone();
                if meta.chunks >= COMPACT_AFTER_CHUNKS {
                    let doc = assemble(w.id, &snaps, &chunks, meta.chunks)?;
                    snaps.insert(key, doc.save().as_slice())?;
                    for n in 0..meta.chunks {
                        chunks.remove((key, n))?;
                    }
                    meta.chunks = 0;
                }
                meta.seq = feed.take_seq();
                feed.insert(key, &meta)?;
                let bytes = meta::encode(&meta);
                docs.insert(key, bytes.as_slice())?;
                seqs.push(meta.seq);
            }
            feed.finish()?;
        }
        txn.commit()?;
        Ok(seqs)
    }

    /// Applies untrusted Automerge bytes (changes or a saved document) to a stored document,
    /// creating it if absent, and returns its new heads. Bytes that fail to decode return
    /// [`StoreError::Corrupt`] and leave the store as it was.
    pub fn apply(
        &self,
        id: DocumentId,
        bytes: &[u8],
        describe: impl FnOnce(&Automerge) -> DocInfo,
    ) -> Result<Vec<ChangeHash>, StoreError> {
        let (mut doc, base) = match self.load(id)? {
            Some(s) => (s.doc, s.meta.change_hashes()),
            None => (Automerge::new(), Vec::new()),
        };
        // Strict parse first: `load_incremental` silently keeps a valid prefix of damaged
        // input, and untrusted bytes must be all good or refused.
        let mut incoming = parse_strict(id, bytes)?;
        let merged = catch_unwind(AssertUnwindSafe(|| doc.merge(&mut incoming)));
        match merged {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(StoreError::Corrupt {
                    id,
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                return Err(StoreError::Corrupt {
                    id,
                    reason: "automerge panicked while merging".into(),
                })
            }
        }
        let info = describe(&doc);
        self.write(&[DocWrite::from_doc(id, info, &doc, base)])?;
        Ok(doc.get_heads())
    }

    /// Folds a document's chunks into one snapshot. Content and heads do not change.
    pub fn compact(&self, id: DocumentId) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        {
            let mut docs = txn.open_table(DOCS)?;
            let mut snaps = txn.open_table(SNAPSHOTS)?;
            let mut chunks = txn.open_table(CHUNKS)?;
            let key = *id.as_bytes();
            let Some(meta) = docs.get(&key)?.map(|g| decode_meta(id, g.value())) else {
                return Ok(());
            };
            let mut meta = meta?;
            if meta.chunks > 0 {
                let doc = assemble(id, &snaps, &chunks, meta.chunks)?;
                snaps.insert(key, doc.save().as_slice())?;
                for n in 0..meta.chunks {
                    chunks.remove((key, n))?;
                }
                meta.chunks = 0;
                let bytes = meta::encode(&meta);
                docs.insert(key, bytes.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Removes a document's bytes and metadata (used when a replica must purge a document).
    pub fn remove(&self, id: DocumentId) -> Result<bool, StoreError> {
        let txn = self.begin_write()?;
        let existed;
        {
            let mut docs = txn.open_table(DOCS)?;
            let mut snaps = txn.open_table(SNAPSHOTS)?;
            let mut chunks = txn.open_table(CHUNKS)?;
            let mut feed = FeedWriter::open(&txn)?;
            let mut by_site = txn.open_table(BY_SITE)?;
            let key = *id.as_bytes();
            let meta = docs
                .remove(&key)?
                .map(|g| decode_meta(id, g.value()))
                .transpose()?;
            existed = meta.is_some();
            if let Some(meta) = meta {
                feed.remove(&meta)?;
                for s in &meta.info.sites {
                    by_site.remove((s.as_str(), key))?;
                }
                for n in 0..meta.chunks {
                    chunks.remove((key, n))?;
                }
            }
            snaps.remove(&key)?;
        }
        txn.commit()?;
        Ok(existed)
    }

    /// Erases a household on `by`'s request (a token name, recorded in the audit log in the
    /// same transaction). Returns the tombstone's metadata and whether this call erased it
    /// (`false`: it already was, and nothing was written), or `None` when `id` is not a
    /// household here.
    pub fn erase_household(
        &self,
        id: DocumentId,
        by: &str,
    ) -> Result<Option<(DocMeta, bool)>, StoreError> {
        match self.meta(id)? {
            Some(m) if m.info.kind == crate::document::DocKind::Household && m.info.erased => {
                Ok(Some((m, false)))
            }
            Some(m) if m.info.kind == crate::document::DocKind::Household => {
                let entry = AuditEntry::now(by, crate::audit::AuditAction::Erase, Some(id));
                Ok(self.erase(id, &[entry])?.map(|t| (t, true)))
            }
            _ => Ok(None),
        }
    }

    /// Erases a document: drops its bytes and saved sync states, keeps its metadata marked
    /// erased (no personal data: kind, sites, regions), and gives it a new feed sequence so
    /// every replica that could hold it is told to purge it. Returns the tombstone's metadata,
    /// or `None` for an unknown id. Erasing twice is harmless.
    pub fn erase(
        &self,
        id: DocumentId,
        audit: &[AuditEntry],
    ) -> Result<Option<DocMeta>, StoreError> {
        let txn = self.begin_write()?;
        let out;
        {
            let mut docs = txn.open_table(DOCS)?;
            let mut snaps = txn.open_table(SNAPSHOTS)?;
            let mut chunks = txn.open_table(CHUNKS)?;
            let mut feed = FeedWriter::open(&txn)?;
            let key = *id.as_bytes();
            let old = docs
                .get(&key)?
                .map(|g| decode_meta(id, g.value()))
                .transpose()?;
            let Some(mut meta) = old else {
                return Ok(None);
            };
            if !meta.info.erased {
                drop_bytes(&mut snaps, &mut chunks, &mut feed, key, &mut meta)?;
                feed.finish()?;
                meta.info.erased = true;
                let bytes = meta::encode(&meta);
                docs.insert(key, bytes.as_slice())?;
                txn.open_table(META)?
                    .insert(COMPACT_PENDING, [1u8].as_slice())?;
                let mut states = txn.open_table(SYNC_STATES)?;
                let stale: Vec<String> = states
                    .iter()?
                    .filter_map(|r| r.ok())
                    .filter(|(k, _)| k.value().1 == key)
                    .map(|(k, _)| k.value().0.to_string())
                    .collect();
                for peer in stale {
                    states.remove((peer.as_str(), key))?;
                }
                append_audit(&txn, audit)?;
            }
            out = meta;
        }
        txn.commit()?;
        Ok(Some(out))
    }

    /// Rewrites the file so that pages freed by erasures and compactions are overwritten or
    /// cut off: after it, no byte of an erased document remains on disk. Needs exclusive
    /// access (the server runs it at every clean shutdown; `relais compact` runs it offline).
    pub fn compact_file(&mut self) -> Result<(), StoreError> {
        let db = self
            .db
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .ok_or(StoreError::Closed)?;
        let txn = db.begin_write()?;
        txn.open_table(META)?.remove(COMPACT_PENDING)?;
        txn.commit()?;
        while db.compact().map_err(|e| StoreError::Redb(e.into()))? {}
        Ok(())
    }

    /// True when documents were erased since the file was last compacted.
    pub fn compact_pending(&self) -> Result<bool, StoreError> {
        Ok(self.get_meta(COMPACT_PENDING)?.is_some())
    }

    /// Drops a document that left this replica's scope (a server replica told so by its
    /// upstream): its bytes and site index entries go, its metadata stays marked
    /// [`DocMeta::gone`] with a new feed sequence, so that devices that held it are told to
    /// purge it. Returns false for an unknown id.
    pub fn forget(&self, id: DocumentId) -> Result<bool, StoreError> {
        let txn = self.begin_write()?;
        {
            let mut docs = txn.open_table(DOCS)?;
            let mut snaps = txn.open_table(SNAPSHOTS)?;
            let mut chunks = txn.open_table(CHUNKS)?;
            let mut feed = FeedWriter::open(&txn)?;
            let mut by_site = txn.open_table(BY_SITE)?;
            let key = *id.as_bytes();
            let old = docs
                .get(&key)?
                .map(|g| decode_meta(id, g.value()))
                .transpose()?;
            let Some(mut meta) = old else {
                return Ok(false);
            };
            if meta.gone || meta.info.erased {
                return Ok(true);
            }
            for s in &meta.info.sites {
                by_site.remove((s.as_str(), key))?;
            }
            drop_bytes(&mut snaps, &mut chunks, &mut feed, key, &mut meta)?;
            feed.finish()?;
            meta.gone = true;
            let bytes = meta::encode(&meta);
            docs.insert(key, bytes.as_slice())?;
        }
        txn.commit()?;
        Ok(true)
    }

    /// Appends audit entries, durably.
    pub fn audit(&self, entries: &[AuditEntry]) -> Result<(), StoreError> {
        self.commit(&[], entries).map(|_| ())
    }

    /// Audit entries with sequence above `after`, oldest first, at most `limit`, with their
    /// sequence numbers.
    pub fn audit_since(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, AuditEntry)>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(AUDIT)?;
        let mut out = Vec::new();
        for row in t.range(after.saturating_add(1)..)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row?;
            let entry: AuditEntry =
                serde_json::from_slice(v.value()).map_err(|e| StoreError::BadAudit {
                    seq: k.value(),
                    reason: e.to_string(),
                })?;
            out.push((k.value(), entry));
        }
        Ok(out)
    }

    /// Documents written after feed sequence `since`, oldest first, at most `limit`.
    pub fn changes_since(&self, since: u64, limit: usize) -> Result<Vec<FeedEntry>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let feed = txn.open_table(FEED)?;
        let docs = txn.open_table(DOCS)?;
        let mut out = Vec::new();
        for row in feed.range(since.saturating_add(1)..)? {
            if out.len() >= limit {
                break;
            }
            let (seq, id) = row?;
            let id = DocumentId::from_bytes(id.value());
            if id == FEED_MARKER {
                out.push(FeedEntry {
                    seq: seq.value(),
                    id,
                    meta: DocMeta {
                        info: DocInfo::other(),
                        heads: Vec::new(),
                        seq: seq.value(),
                        chunks: 0,
                        former_sites: Vec::new(),
                        former_regions: Vec::new(),
                        gone: false,
                    },
                });
            } else if let Some(m) = docs.get(id.as_bytes())? {
                out.push(FeedEntry {
                    seq: seq.value(),
                    id,
                    meta: decode_meta(id, m.value())?,
                });
            }
        }
        Ok(out)
    }

    /// Like [`Store::changes_since`], for a reader scoped to some sites and regions: only the
    /// entries indexed under `keys` ([`scope_feed::scope_keys`]), at most `limit`. Every
    /// entry the scope covers is there, and some it does not (a document moved away from it,
    /// or under a region of the scope): the caller checks each one, as with the whole feed.
    pub fn scoped_changes_since(
        &self,
        since: u64,
        limit: usize,
        keys: &[String],
    ) -> Result<ScopedPage, StoreError> {
        let txn = self.db()?.begin_read()?;
        scope_feed::read(&txn, since, limit, keys)
    }

    /// Appends a marker to the change feed and returns its sequence: something changed that
    /// is not a document (a token's scope), and devices whose cursor is older must know.
    /// Only the latest marker is kept.
    pub fn mark_feed(&self) -> Result<u64, StoreError> {
        let txn = self.begin_write()?;
        let mut feed = FeedWriter::open(&txn)?;
        let seq = feed.take_seq();
        {
            let mut meta = txn.open_table(META)?;
            if let Some(old) = meta.get("feed-marker")?.map(|g| g.value().to_vec()) {
                if let Ok(b) = <[u8; 8]>::try_from(old.as_slice()) {
                    feed.remove_marker(u64::from_be_bytes(b))?;
                }
            }
            feed.insert_marker(seq)?;
            meta.insert("feed-marker", seq.to_be_bytes().as_slice())?;
        }
        feed.finish()?;
        txn.commit()?;
        Ok(seq)
    }

    /// The latest feed sequence (0 for an empty store).
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        let txn = self.db()?.begin_read()?;
        let feed = txn.open_table(FEED)?;
        let last = feed.last()?.map(|(k, _)| k.value()).unwrap_or(0);
        Ok(last)
    }

    /// Number of stored documents.
    pub fn len(&self) -> Result<u64, StoreError> {
        let txn = self.db()?.begin_read()?;
        Ok(txn.open_table(DOCS)?.len()?)
    }

    /// True when no document is stored.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// Every stored document id with its metadata, in id order.
    pub fn list(&self) -> Result<Vec<(DocumentId, DocMeta)>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let docs = txn.open_table(DOCS)?;
        let mut out = Vec::new();
        for row in docs.iter()? {
            let (k, v) = row?;
            let id = DocumentId::from_bytes(k.value());
            out.push((id, decode_meta(id, v.value())?));
        }
        Ok(out)
    }

    /// Documents that belong to a site (households living there, the site itself, campaigns
    /// serving it), in id order.
    pub fn at_site(&self, site: &str) -> Result<Vec<DocumentId>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(BY_SITE)?;
        let mut out = Vec::new();
        for row in t.range((site, [0u8; 16])..=(site, [0xffu8; 16]))? {
            let (k, _) = row?;
            out.push(DocumentId::from_bytes(k.value().1));
        }
        Ok(out)
    }

    /// Saves encoded sync states, keyed by peer and document, in one transaction.
    pub fn put_sync_states(
        &self,
        states: &[(String, DocumentId, Vec<u8>)],
    ) -> Result<(), StoreError> {
        if states.is_empty() {
            return Ok(());
        }
        let txn = self.begin_write()?;
        insert_sync_states(&txn, states)?;
        txn.commit()?;
        Ok(())
    }

    /// The saved sync state of a peer for a document.
    pub fn sync_state(&self, peer: &str, id: DocumentId) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(SYNC_STATES)?;
        let v = t.get((peer, *id.as_bytes()))?.map(|g| g.value().to_vec());
        Ok(v)
    }

    /// Reads a small named value.
    pub fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(META)?;
        let v = t.get(name)?.map(|g| g.value().to_vec());
        Ok(v)
    }

    /// Writes a small named value, durably.
    pub fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        txn.open_table(META)?.insert(name, value)?;
        txn.commit()?;
        Ok(())
    }
}

fn insert_sync_states(
    txn: &redb::WriteTransaction,
    states: &[(String, DocumentId, Vec<u8>)],
) -> Result<(), StoreError> {
    let mut t = txn.open_table(SYNC_STATES)?;
    for (peer, id, bytes) in states {
        t.insert((peer.as_str(), *id.as_bytes()), bytes.as_slice())?;
    }
    Ok(())
}

/// Drops a document's snapshot and chunks and gives it the next feed sequence, so that
/// replicas hear of the change (an erasure, or leaving this replica's scope).
fn drop_bytes(
    snaps: &mut redb::Table<'_, [u8; 16], &'static [u8]>,
    chunks: &mut redb::Table<'_, ([u8; 16], u32), &'static [u8]>,
    feed: &mut FeedWriter<'_>,
    key: [u8; 16],
    meta: &mut DocMeta,
) -> Result<(), StoreError> {
    for n in 0..meta.chunks {
        chunks.remove((key, n))?;
    }
    snaps.remove(&key)?;
    // The new entry keeps the rows of the old one: an erased or forgotten document concerns
    // whoever could read it, who must purge it.
    feed.remove(meta)?;
    meta.seq = feed.take_seq();
    feed.insert(key, meta)?;
    meta.heads.clear();
    meta.chunks = 0;
    Ok(())
}

/// Appends audit entries inside a caller's write transaction (for adapters that keep their
/// own tables in the store's file, such as the server's tokens).
pub fn append_audit(
    txn: &redb::WriteTransaction,
    entries: &[AuditEntry],
) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut t = txn.open_table(AUDIT)?;
    let first = t.last()?.map(|(k, _)| k.value()).unwrap_or(0) + 1;
    for (seq, e) in (first..).zip(entries) {
        let bytes = serde_json::to_vec(e).expect("AuditEntry serialises");
        t.insert(seq, bytes.as_slice())?;
    }
    Ok(())
}

fn assemble(
    id: DocumentId,
    snaps: &impl ReadableTable<[u8; 16], &'static [u8]>,
    chunks: &impl ReadableTable<([u8; 16], u32), &'static [u8]>,
    n_chunks: u32,
) -> Result<Automerge, StoreError> {
    let parts = stored_parts(id, snaps, chunks, n_chunks)?;
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    load_doc(id, &refs)
}

/// A document's stored bytes, in load order: its snapshot (empty if it has none), then each
/// chunk after it.
fn stored_parts(
    id: DocumentId,
    snaps: &impl ReadableTable<[u8; 16], &'static [u8]>,
    chunks: &impl ReadableTable<([u8; 16], u32), &'static [u8]>,
    n_chunks: u32,
) -> Result<Vec<Vec<u8>>, StoreError> {
    let key = *id.as_bytes();
    let snap = snaps.get(&key)?.map(|g| g.value().to_vec());
    let mut parts: Vec<Vec<u8>> = Vec::with_capacity(n_chunks as usize + 1);
    parts.push(snap.unwrap_or_default());
    for n in 0..n_chunks {
        if let Some(g) = chunks.get((key, n))? {
            parts.push(g.value().to_vec());
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;

    fn doc_with(n: usize) -> Automerge {
        let mut doc = Automerge::new();
        for i in 0..n {
            let mut tx = doc.transaction();
            tx.put(automerge::ROOT, format!("k{i}"), i as i64).unwrap();
            tx.commit();
        }
        doc
    }

    #[test]
    fn a_sequence_is_never_given_twice_even_after_the_last_entry_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let mut store = Store::open(&path).unwrap();
        let write = |store: &Store| {
            let id = DocumentId::random();
            let w = DocWrite::from_doc(id, DocInfo::other(), &doc_with(1), Vec::new());
            (id, store.write(&[w]).unwrap()[0])
        };
        write(&store);
        let (last, seq) = write(&store);
        assert_eq!(seq, 2);
        // A purged document was the feed's last entry: a cursor may have seen its sequence.
        assert!(store.remove(last).unwrap());
        assert_eq!(store.last_seq().unwrap(), 1);
        assert_eq!(write(&store).1, 3);
        store.remove(write(&store).0).unwrap();
        assert_eq!(store.mark_feed().unwrap(), 5);
        // Across a restart too.
        let purged = write(&store).0;
        assert!(store.remove(purged).unwrap());
        drop(store);
        store = Store::open(&path).unwrap();
        assert_eq!(write(&store).1, 7);
    }

    #[test]
    fn chunk_checksums_vouch_for_saved_bytes_and_catch_damage() {
        let doc = doc_with(3);
        let snap = doc.save();
        assert!(chunks_intact(&snap));
        // A snapshot followed by the incremental chunks of later changes, as stored.
        let mut more = doc.clone();
        let heads = more.get_heads();
        let mut tx = more.transaction();
        tx.put(automerge::ROOT, "later", "yes").unwrap();
        tx.commit();
        let mut run = snap.clone();
        run.extend(more.save_after(&heads));
        assert!(chunks_intact(&run));
        assert!(!chunks_intact(&[]));
        for at in [0, 5, 8, snap.len() / 2, snap.len() - 1] {
            let mut bad = snap.clone();
            bad[at] ^= 0x01;
            assert!(!chunks_intact(&bad), "a flipped bit at {at}");
        }
        assert!(!chunks_intact(&snap[..snap.len() - 1]), "cut short");
        let mut longer = snap.clone();
        longer.push(0);
        assert!(!chunks_intact(&longer), "trailing byte");
        // A compressed change's checksum is over its inflated bytes: not vouched for.
        let mut compressed = snap.clone();
        compressed[8] = 2;
        assert!(!chunks_intact(&compressed));
        assert!(one_document_chunk(&snap));
        assert!(!one_document_chunk(&run), "a snapshot and a change");
        assert!(
            !one_document_chunk(&more.save_after(&heads)),
            "a change alone"
        );
    }

    #[test]
    fn stored_bytes_are_what_loads_and_damage_gives_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s.redb")).unwrap();
        let id = DocumentId::random();
        let doc = doc_with(2);
        store
            .write(&[DocWrite::from_doc(id, DocInfo::other(), &doc, vec![])])
            .unwrap();
        let mut edited = doc.clone();
        let base = edited.get_heads();
        let mut tx = edited.transaction();
        tx.put(automerge::ROOT, "k9", 9).unwrap();
        tx.commit();
        store
            .write(&[DocWrite::from_doc(id, DocInfo::other(), &edited, base)])
            .unwrap();

        let StoredBytes { heads, bytes } = store.stored_bytes(id).unwrap().expect("stored");
        let loaded = Automerge::load(&bytes).unwrap();
        let mut want = edited.get_heads();
        want.sort();
        let mut got = heads.clone();
        got.sort();
        assert_eq!(got, want);
        assert_eq!(loaded.get_heads(), edited.get_heads());
        assert!(store.stored_bytes(DocumentId::random()).unwrap().is_none());
        // Nothing is handed out for an erased document, nor for one that left the scope.
        let (erased, gone) = (DocumentId::random(), DocumentId::random());
        for other in [erased, gone] {
            store
                .write(&[DocWrite::from_doc(other, DocInfo::other(), &doc, vec![])])
                .unwrap();
            assert!(store.stored_bytes(other).unwrap().is_some());
        }
        store.erase(erased, &[]).unwrap();
        store.forget(gone).unwrap();
        assert!(store.stored_bytes(erased).unwrap().is_none());
        assert!(store.stored_bytes(gone).unwrap().is_none());

        // A snapshot damaged on disk is not handed out.
        {
            let txn = store.begin_write().unwrap();
            {
                let mut snaps = txn.open_table(SNAPSHOTS).unwrap();
                let mut snap = snaps.get(id.as_bytes()).unwrap().unwrap().value().to_vec();
                let mid = snap.len() / 2;
                snap[mid] ^= 0xff;
                snaps.insert(id.as_bytes(), snap.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        assert!(store.stored_bytes(id).unwrap().is_none());
    }
}
