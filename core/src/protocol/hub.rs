//! The server side of sync, as a state machine with no I/O.
//!
//! A [`Hub`] holds the loaded documents, the connected peers and, per peer and document,
//! automerge's `sync::State`. It is fed frames ([`Hub::receive`]) and returns a [`Step`]:
//! document writes to make durable, then frames to send and connections to close.
//!
//! **Contract with the adapter:** commit `Step::writes` durably *before* sending any frame of
//! the same step. A sync reply tells a client "I have your change" (its heads match), and a
//! relay shows the change to others, so both must wait until the change is on disk. If the
//! commit fails, call [`Hub::reset`] and close every connection: clients resync from what
//! is durable.
//!
//! Documents are loaded on demand through [`HubStore`] and evicted, least recently used
//! first, beyond [`HubConfig::max_loaded_docs`]; sync states of evicted documents are
//! dropped too, and a later exchange starts afresh (automerge's protocol recovers from any
//! state). Subscriptions are indexed by document and by connection, so the work for one
//! message depends on the peers of that document, not on the totals.

use std::collections::{HashMap, HashSet, VecDeque};

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, ChangeHash, ReadDoc};

use crate::access::{Identity, Role};
use crate::audit::{AuditAction, AuditEntry};
use crate::document::{self, DocInfo, DocKind};
use crate::protocol::message::{
    BatchDoc, DecodeError, DocMessage, FeedDoc, Message, PeerMetadata, Refusal, PROTOCOL_RELAIS,
    PROTOCOL_V1,
};
use crate::protocol::prepare::{self, Job, Prepared};
use crate::store::{
    scope_feed, DocWrite, FeedEntry, ScopedPage, Store, StoreError, StoredBytes, StoredDoc,
    FEED_MARKER,
};
use crate::DocumentId;

/// Identifies one connection, chosen by the adapter.
pub type ConnId = u64;

/// What the hub needs from durable storage: reads only. Writes go out in [`Step::writes`].
pub trait HubStore {
    /// Loads a document.
    fn load(&self, id: DocumentId) -> Result<Option<StoredDoc>, StoreError>;
    /// The change feed after `since`.
    fn changes_since(&self, since: u64, limit: usize) -> Result<Vec<FeedEntry>, StoreError>;
    /// The change feed after `since` for a reader scoped to the index rows `keys` (see
    /// [`Store::scoped_changes_since`]). The default reads the whole feed, which holds every
    /// entry the rows could select.
    fn scoped_changes_since(
        &self,
        since: u64,
        limit: usize,
        _keys: &[String],
    ) -> Result<ScopedPage, StoreError> {
        Ok(ScopedPage::of_feed(
            self.changes_since(since, limit)?,
            since,
            limit,
        ))
    }
    /// Stored heads of a document, without loading it.
    fn heads(&self, id: DocumentId) -> Result<Option<Vec<ChangeHash>>, StoreError>;
    /// The latest feed sequence.
    fn last_seq(&self) -> Result<u64, StoreError>;
    /// A peer's saved sync state for a document (see [`Hub::take_sync_states`]).
    fn sync_state(&self, _peer: &str, _id: DocumentId) -> Option<Vec<u8>> {
        None
    }
    /// A document's stored heads and bytes, unparsed (see [`Store::stored_bytes`]). `None`
    /// where a store cannot give them, and the hub loads the document instead.
    fn stored_bytes(&self, _id: DocumentId) -> Result<Option<StoredBytes>, StoreError> {
        Ok(None)
    }
}

impl HubStore for Store {
    fn load(&self, id: DocumentId) -> Result<Option<StoredDoc>, StoreError> {
        Store::load(self, id)
    }
    fn changes_since(&self, since: u64, limit: usize) -> Result<Vec<FeedEntry>, StoreError> {
        Store::changes_since(self, since, limit)
    }
    fn scoped_changes_since(
        &self,
        since: u64,
        limit: usize,
        keys: &[String],
    ) -> Result<ScopedPage, StoreError> {
        Store::scoped_changes_since(self, since, limit, keys)
    }
    fn heads(&self, id: DocumentId) -> Result<Option<Vec<ChangeHash>>, StoreError> {
        Ok(Store::meta(self, id)?.map(|m| m.change_hashes()))
    }
    fn last_seq(&self) -> Result<u64, StoreError> {
        Store::last_seq(self)
    }
    fn sync_state(&self, peer: &str, id: DocumentId) -> Option<Vec<u8>> {
        Store::sync_state(self, peer, id).ok().flatten()
    }
    fn stored_bytes(&self, id: DocumentId) -> Result<Option<StoredBytes>, StoreError> {
        Store::stored_bytes(self, id)
    }
}

impl<T: HubStore> HubStore for std::sync::Arc<T> {
    fn load(&self, id: DocumentId) -> Result<Option<StoredDoc>, StoreError> {
        (**self).load(id)
    }
    fn changes_since(&self, since: u64, limit: usize) -> Result<Vec<FeedEntry>, StoreError> {
        (**self).changes_since(since, limit)
    }
    fn scoped_changes_since(
        &self,
        since: u64,
        limit: usize,
        keys: &[String],
    ) -> Result<ScopedPage, StoreError> {
        (**self).scoped_changes_since(since, limit, keys)
    }
    fn heads(&self, id: DocumentId) -> Result<Option<Vec<ChangeHash>>, StoreError> {
        (**self).heads(id)
    }
    fn last_seq(&self) -> Result<u64, StoreError> {
        (**self).last_seq()
    }
    fn sync_state(&self, peer: &str, id: DocumentId) -> Option<Vec<u8>> {
        (**self).sync_state(peer, id)
    }
    fn stored_bytes(&self, id: DocumentId) -> Result<Option<StoredBytes>, StoreError> {
        (**self).stored_bytes(id)
    }
}

/// Limits and names.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// This server's peer id.
    pub peer_id: String,
    /// This server's storage id, announced in `peer`.
    pub storage_id: Option<String>,
    /// Documents kept in memory before the least recently used are evicted. Each loaded
    /// household costs a few tens of KB of RSS in automerge, so 20,000 is a few hundred MB.
    pub max_loaded_docs: usize,
    /// Documents per `relais-changes` page: about 60 bytes each, so ~120 KB a page.
    pub feed_page: usize,
    /// Threads that apply the documents of one `relais-sync-batch` at once (the calling
    /// thread among them); 1 applies them one by one. Defaults to the cores available, at
    /// most 8.
    pub workers: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            peer_id: format!("relais-{}", DocumentId::random()),
            storage_id: None,
            max_loaded_docs: 20_000,
            feed_page: 2_000,
            workers: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(8),
        }
    }
}

/// What the adapter must do after an input.
#[derive(Debug, Default)]
pub struct Step {
    /// Commit these durably first.
    pub writes: Vec<DocWrite>,
    /// Then send these frames.
    pub sends: Vec<(ConnId, Vec<u8>)>,
    /// Then close these connections, with a reason for the close frame and the log.
    pub closes: Vec<(ConnId, String)>,
    /// Sync messages that brought new changes (for metrics).
    pub merges: u64,
    /// Audit records, to commit with the writes.
    pub audit: Vec<AuditEntry>,
    /// What happened, for the adapter and the application.
    pub events: Vec<Event>,
    /// The `relais-sync-batch` frame at the end of `sends`, still open for more documents.
    batch: Option<OpenBatch>,
}

/// Feed pages one `relais-changes` reply scans at most, however few of their entries the
/// device may read.
pub const MAX_SCANNED_PAGES: usize = 10;

/// Documents in one `relais-sync-batch` frame at most.
pub const BATCH_DOCS: usize = 256;

/// Documents of one round that [`Hub::receive_all`] applies ahead at most. Their results wait
/// in memory until their frame is handled, so a round of many full frames must not expand
/// all at once; the documents past this are applied with their own batch, as by
/// [`Hub::receive`].
pub const AHEAD_MAX_DOCS: usize = 1_024;

/// Bytes of sync messages one round applies ahead at most (see [`AHEAD_MAX_DOCS`]).
pub const AHEAD_MAX_BYTES: usize = 16 * 1024 * 1024;

/// How many times each document is in a batch: one sent twice is applied in order only.
fn times_in(docs: &[BatchDoc]) -> HashMap<DocumentId, usize> {
    let mut count = HashMap::new();
    for d in docs {
        *count.entry(d.document_id).or_default() += 1;
    }
    count
}

/// Bytes of one `relais-sync-batch` frame before the next document starts another (a single
/// larger message still goes, alone). Far under any sane frame limit, and small enough that a
/// frame lost to a dropped 2G link costs little to send again.
pub const BATCH_BYTES: usize = 128 * 1024;

#[derive(Debug)]
struct OpenBatch {
    conn: ConnId,
    /// Its place in `sends`: documents join it only while it is the last frame.
    index: usize,
    docs: usize,
}

/// CBOR's "break" byte, closing the indefinite-length `docs` array of a batch.
const CBOR_BREAK: u8 = 0xff;

/// Something an adapter or application may want to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// An outbound connection finished its handshake.
    Connected {
        /// The connection.
        conn: ConnId,
        /// The remote selected Relais's fast-reconnect extension.
        extension: bool,
    },
    /// A document changed because of a peer.
    DocChanged {
        /// The document.
        id: DocumentId,
    },
    /// The remote of an outbound connection says this document must be deleted here.
    Purge {
        /// The connection.
        conn: ConnId,
        /// The document.
        id: DocumentId,
        /// It was erased: keep a tombstone ([`crate::store::Store::erase`]) so it never comes
        /// back. Otherwise it only left this replica's scope.
        erased: bool,
    },
    /// The remote of an outbound connection refused this replica's changes to a document.
    /// The document is no longer waited for, and [`Event::Synced`]'s local cursor stays
    /// before it, so the next session offers it again (a token given the right role or scope
    /// in between then pushes it).
    Refused {
        /// The connection.
        conn: ConnId,
        /// The document.
        id: DocumentId,
        /// The remote's reason ("read-only device", "out of scope", "sites and campaigns are
        /// written by managers", "erased").
        reason: String,
    },
    /// An outbound connection is fully in sync: everything this replica holds is confirmed
    /// by the remote (or refused by it: see [`Event::Refused`]), and everything the remote
    /// listed is here. Persist the cursors to
    /// resume cheaply next time.
    Synced {
        /// The connection.
        conn: ConnId,
        /// Remote feed cursor to send in the next `relais-changes-since`.
        remote_cursor: u64,
        /// Local feed sequence up to which the remote has everything.
        local_cursor: u64,
        /// The remote's peer id, to pass back to [`Hub::connect_outbound`].
        peer: String,
    },
}

impl Step {
    /// Appends a later step to this one, so that an adapter can handle several inputs with
    /// one commit (group commit): the writes of both are committed before any frame of
    /// either is sent.
    pub fn absorb(&mut self, later: Step) {
        let offset = self.sends.len();
        if !later.sends.is_empty() {
            // Only a batch that ends the later step's frames can take more documents.
            self.batch = later.batch.map(|b| OpenBatch {
                index: b.index + offset,
                ..b
            });
        }
        self.writes.extend(later.writes);
        self.sends.extend(later.sends);
        self.closes.extend(later.closes);
        self.merges += later.merges;
        self.audit.extend(later.audit);
        self.events.extend(later.events);
    }

    fn send(&mut self, conn: ConnId, msg: &Message) {
        self.sends.push((conn, msg.encode()));
        self.batch = None;
    }

    /// Sends one document's sync message. To a peer that speaks `relais-1`, consecutive ones
    /// share a `relais-sync-batch` frame: the envelope a `sync` repeats per document (type,
    /// sender, target, text id) was a third of a pushed household's bytes on the wire, and a
    /// fresh tablet received one frame per document.
    fn send_doc(
        &mut self,
        conn: ConnId,
        batched: bool,
        sender_id: &str,
        target_id: &str,
        doc: BatchDoc,
    ) {
        if !batched {
            let dm = DocMessage {
                sender_id: sender_id.to_string(),
                target_id: target_id.to_string(),
                document_id: doc.document_id.to_string(),
                data: doc.data,
            };
            let msg = if doc.request {
                Message::Request(dm)
            } else {
                Message::Sync(dm)
            };
            return self.send(conn, &msg);
        }
        let infallible = "encoding to a Vec is infallible";
        let last = self.sends.len().wrapping_sub(1);
        if let (Some(open), Some((to, frame))) = (self.batch.as_mut(), self.sends.last_mut()) {
            if open.conn == conn
                && *to == conn
                && open.index == last
                && open.docs < BATCH_DOCS
                && frame.len() + doc.data.len() <= BATCH_BYTES
            {
                frame.pop();
                let mut e = minicbor::Encoder::new(std::mem::take(frame));
                doc.write(&mut e).expect(infallible);
                *frame = e.into_writer();
                frame.push(CBOR_BREAK);
                open.docs += 1;
                return;
            }
        }
        let mut e = minicbor::Encoder::new(Vec::with_capacity(doc.data.len() + 128));
        (|| {
            e.map(4)?.str("type")?.str("relais-sync-batch")?;
            e.str("senderId")?.str(sender_id)?;
            e.str("targetId")?.str(target_id)?;
            e.str("docs")?.begin_array()?;
            doc.write(&mut e)
        })()
        .expect(infallible);
        let mut frame = e.into_writer();
        frame.push(CBOR_BREAK);
        self.sends.push((conn, frame));
        self.batch = Some(OpenBatch {
            conn,
            index: self.sends.len() - 1,
            docs: 1,
        });
    }

    fn audit(&mut self, identity: &Identity, action: AuditAction, id: DocumentId) {
        self.audit
            .push(AuditEntry::now(identity.device.clone(), action, Some(id)));
    }

    fn refused(&mut self, identity: &Identity, id: DocumentId, reason: &str) {
        tracing::warn!(device = %identity.device, document = %id, "refused a change: {reason}");
        self.audit.push(
            AuditEntry::now(identity.device.clone(), AuditAction::RefusedWrite, Some(id))
                .with_detail(reason),
        );
    }
}

struct LoadedDoc {
    doc: Automerge,
    info: DocInfo,
    /// Heads known durable (or handed to the adapter to make durable).
    persisted: Vec<ChangeHash>,
    last_used: u64,
    /// Bytes of the messages whose changes wait in automerge's queue for their
    /// dependencies, from every connection (see [`MAX_QUEUED_BYTES`]).
    queued_bytes: usize,
}

enum Phase {
    AwaitingJoin,
    AwaitingPeer,
    Ready,
}

/// Progress of an outbound connection (this replica syncing with a server).
#[derive(Default)]
struct Outbound {
    remote_cursor: u64,
    local_cursor: u64,
    /// A `relais-changes-since` is in flight.
    listing_pending: bool,
    /// Documents pushed since the last listing was requested.
    pushed_since_listing: bool,
    /// Documents still being synced.
    awaiting: HashSet<DocumentId>,
    /// Documents waiting for a place in the window.
    queued: Queue,
    /// `Synced` was reported and nothing happened since.
    quiet: bool,
    /// Peer id the cursors belong to.
    expected_peer: Option<String>,
    /// Documents the remote refused in this session (see [`Event::Refused`]).
    refused: HashSet<DocumentId>,
    /// Documents the remote told this replica to purge in this session: their tombstone or
    /// `gone` record, written by the adapter after the event, is the remote's doing.
    purged: HashSet<DocumentId>,
    /// Documents sent from their stored bytes, not loaded (see [`Hub::offer_stored`]), with
    /// the heads sent, until the remote answers.
    offered: HashMap<DocumentId, Vec<ChangeHash>>,
}

/// Documents waiting for a place in an outbound window, in order, each once. Removal is
/// lazy, so that finishing or purging one of thousands of queued documents costs O(1).
#[derive(Default)]
struct Queue {
    order: VecDeque<DocumentId>,
    members: HashSet<DocumentId>,
}

impl Queue {
    fn push_back(&mut self, id: DocumentId) {
        if self.members.insert(id) {
            self.order.push_back(id);
        }
    }

    fn pop_front(&mut self) -> Option<DocumentId> {
        while let Some(id) = self.order.pop_front() {
            if self.members.remove(&id) {
                return Some(id);
            }
        }
        None
    }

    fn remove(&mut self, id: DocumentId) {
        self.members.remove(&id);
    }

    fn len(&self) -> usize {
        self.members.len()
    }

    fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = DocumentId> + '_ {
        self.order
            .iter()
            .copied()
            .filter(|id| self.members.contains(id))
    }
}

struct Conn {
    identity: Identity,
    phase: Phase,
    peer_id: String,
    ext: bool,
    syncs: HashMap<DocumentId, sync::State>,
    subscribed: HashSet<DocumentId>,
    outbound: Option<Outbound>,
    /// Documents this peer announced (a `sync` for an id the hub did not have) that have
    /// not received content yet.
    announced: HashSet<DocumentId>,
    /// Key under which this peer's sync states are saved: its device (from its token) and
    /// the storage id it declared. `None` for ephemeral peers and outbound connections.
    state_key: Option<String>,
    /// Documents whose refused writes were already audited on this connection.
    refused: HashSet<DocumentId>,
    /// Documents whose changes this peer read were already audited on this connection.
    read_audited: HashSet<DocumentId>,
    /// Per document: this peer's sync messages in a row whose changes all waited in
    /// automerge's queue for missing dependencies.
    unapplied: HashMap<DocumentId, u32>,
    /// A listing of everything started over on this connection because the token's scope
    /// changed (see [`Identity::former`]): the pages that follow continue it.
    relisted: bool,
}

/// The fields of a `relais-changes` message.
struct Listing {
    docs: Vec<FeedDoc>,
    cursor: u64,
    more: bool,
    purge: Vec<String>,
    erased: Vec<String>,
    refused: Vec<Refusal>,
}

/// Why a device's change was refused. The audit records exactly which; the device is told
/// in words that never reveal whether a document it may not read exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refuse {
    /// The document was erased, and the device may read it.
    Erased,
    /// The document was erased, and the device may not read it.
    ErasedUnreadable,
    /// The document exists outside the device's scope.
    OutOfScope,
    /// The change would put the document outside the device's scope.
    ChangeOutOfScope,
    /// The device's role may not write.
    ReadOnly,
    /// The device's role writes households only, not sites or campaigns.
    ReferenceData,
}

impl Refuse {
    /// The audit entry's detail, for a data manager.
    fn audited(self) -> &'static str {
        match self {
            Refuse::Erased | Refuse::ErasedUnreadable => "erased",
            Refuse::OutOfScope => "out of scope",
            Refuse::ChangeOutOfScope => "change out of scope",
            Refuse::ReadOnly => "read-only device",
            Refuse::ReferenceData => "sites and campaigns are written by managers",
        }
    }

    /// What `identity` is told: never more than an unknown id would get it told. A viewer
    /// hears "read-only device" whatever the document (no change of a viewer is taken, so
    /// that is true of an unknown id too); a writer hears "out of scope" for a document or
    /// tombstone it may not read, as for an unknown id whose content is out of its scope.
    fn told(self, identity: &Identity) -> &'static str {
        if identity.role == Role::Viewer {
            return "read-only device";
        }
        match self {
            Refuse::Erased => "erased",
            Refuse::ErasedUnreadable | Refuse::OutOfScope | Refuse::ChangeOutOfScope => {
                "out of scope"
            }
            Refuse::ReadOnly => "read-only device",
            Refuse::ReferenceData => "sites and campaigns are written by managers",
        }
    }

    /// The reason for a change `identity` may not make to a document it may read.
    fn denied_to(identity: &Identity) -> Refuse {
        if identity.role == Role::Viewer {
            Refuse::ReadOnly
        } else {
            Refuse::ReferenceData
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct HubStats {
    /// Connections that completed the handshake and are still open.
    pub ready_connections: usize,
    /// Documents in memory.
    pub loaded_docs: usize,
    /// Documents of `relais-sync-batch` frames, since the start, whose changes were applied
    /// ahead on several threads and taken as they were (see [`HubConfig::workers`]).
    pub applied_ahead: u64,
    /// Documents sent over outbound connections from their stored bytes, without being
    /// loaded, and confirmed by the remote as they were (see [`HubStore::stored_bytes`]).
    pub confirmed_unloaded: u64,
    /// Frames, since the start, of which some new documents were not applied ahead with
    /// their round because it had reached [`AHEAD_MAX_DOCS`] or [`AHEAD_MAX_BYTES`] (they
    /// are applied with their own batch instead): how often the bound costs time.
    pub frames_past_ahead_bound: u64,
}

/// The sync hub. See the [module docs](self).
pub struct Hub<S: HubStore> {
    cfg: HubConfig,
    store: S,
    /// Boxed: an Automerge document is large, and the map grows to tens of thousands of
    /// entries during a push; moving the documents themselves at each rehash cost a
    /// twentieth of the engine thread's time (`perf`, 20,000 households).
    docs: HashMap<DocumentId, Box<LoadedDoc>>,
    conns: HashMap<ConnId, Conn>,
    subs: HashMap<DocumentId, HashSet<ConnId>>,
    regions: HashMap<String, String>,
    clock: u64,
    ephemeral_seen: HashSet<(String, String, u64)>,
    ephemeral_order: VecDeque<(String, String, u64)>,
    /// Documents whose next outbound sync pushes its changes in the first message, with the
    /// heads the remote is assumed to hold (none: every change goes).
    optimistic: HashMap<(ConnId, DocumentId), Vec<ChangeHash>>,
    /// Sync states to save for peers that keep their own storage.
    saved_states: Vec<(String, DocumentId, Vec<u8>)>,
    /// The documents of the batch being handled, applied ahead (see [`prepare`]).
    prepared: HashMap<DocumentId, Prepared>,
    /// Of those, how many were taken, since the start.
    applied_ahead: u64,
    /// See [`HubStats::confirmed_unloaded`].
    confirmed_unloaded: u64,
    /// See [`HubStats::frames_past_ahead_bound`].
    frames_past_ahead_bound: u64,
}

/// Documents an outbound connection syncs at once. A replica with thousands of documents
/// would otherwise send thousands of requests in one burst, and their replies would pile up
/// in the server's queue for that connection faster than a 2G link drains it.
pub const OUTBOUND_WINDOW: usize = 64;

/// Documents one peer may announce (a `sync` for an unknown id) before sending their
/// content. A client creating documents offline announces each before pushing it; thousands
/// of announcements without content are a flood, and would hold memory for nothing.
pub const MAX_EMPTY_ANNOUNCEMENTS: usize = 4_096;

/// Bytes of messages whose changes wait for their dependencies that one loaded document
/// may hold, over all peers: past it the copy (and its queue) is dropped, to be reloaded
/// from the store, and the sender's connection closed.
pub const MAX_QUEUED_BYTES: usize = 8 * 1024 * 1024;

/// Sync messages in a row from one peer for one document whose changes all lack
/// dependencies before the connection is dropped: a peer that only ever sends orphans would
/// grow automerge's queue.
pub const MAX_UNAPPLIED: u32 = 64;

/// Sets a sync state as if the remote held exactly `heads` and had asked for nothing, so
/// that the next message carries every change after them in one trip (for a document the
/// remote has never seen, `heads` is empty: all its changes). Were the assumption wrong, the
/// remote's reply says what it lacks, as after any bloom-filter miss.
pub fn assume_remote_holds(st: &mut sync::State, heads: Vec<ChangeHash>) {
    st.their_heads = Some(heads.clone());
    st.their_need = Some(Vec::new());
    st.their_have = Some(vec![sync::Have {
        last_sync: heads,
        bloom: Default::default(),
    }]);
}

/// A replica's local cursor (see [`Event::Synced`]) moved over the feed sequences of
/// writes the remote is known to hold: only over an unbroken run from `cursor + 1`, since a
/// sequence left out is a write the remote may still lack.
pub fn advance_cursor(cursor: u64, confirmed: &[u64]) -> u64 {
    let mut new: Vec<u64> = confirmed.iter().copied().filter(|s| *s > cursor).collect();
    new.sort_unstable();
    new.dedup();
    let mut c = cursor;
    for s in new {
        if s == c + 1 {
            c = s;
        } else {
            break;
        }
    }
    c
}

/// Prefix of the key under which an outbound connection's confirmed heads are saved,
/// followed by the remote's peer id.
const UPSTREAM_KEY: &str = "upstream\u{1f}";

/// The heads of `id` that the peer whose sync states are saved under `key` confirmed
/// holding (its saved sync state's shared heads), sorted.
fn saved_heads<S: HubStore>(store: &S, key: &str, id: DocumentId) -> Option<Vec<ChangeHash>> {
    let mut heads = sync::State::decode(&store.sync_state(key, id)?)
        .ok()?
        .shared_heads;
    heads.sort();
    Some(heads)
}

/// Documents stored after `cursor` that the server whose peer id is `peer` has not
/// confirmed holding, among the first `cap` entries: what a replica still has to push. A saved
/// cursor stops before the first such document, so the documents after it that went
/// through (a refused one ahead of them holds the cursor) do not count.
pub fn unconfirmed_since<S: HubStore>(
    store: &S,
    cursor: u64,
    peer: Option<&str>,
    cap: usize,
) -> Result<Vec<DocumentId>, StoreError> {
    let key = peer.map(|p| format!("{UPSTREAM_KEY}{p}"));
    let confirmed = |e: &FeedEntry| {
        let mut stored = e.meta.change_hashes();
        stored.sort();
        !stored.is_empty()
            && key.as_deref().and_then(|k| saved_heads(store, k, e.id)) == Some(stored)
    };
    Ok(store
        .changes_since(cursor, cap)?
        .iter()
        .filter(|e| e.id != FEED_MARKER && !e.meta.info.erased && !e.meta.gone)
        .filter(|e| !confirmed(e))
        .map(|e| e.id)
        .collect())
}

/// How many recent ephemeral messages are remembered to stop relay loops.
const EPHEMERAL_MEMORY: usize = 4_096;

/// Longest `senderId` or `sessionId` of an ephemeral message: the duplicate filter keeps
/// both for [`EPHEMERAL_MEMORY`] messages.
pub const EPHEMERAL_MAX_ID_BYTES: usize = 256;

/// Largest ephemeral payload relayed (presence, cursors): each is copied to every reader.
pub const EPHEMERAL_MAX_BYTES: usize = 64 * 1024;

impl<S: HubStore> Hub<S> {
    /// A hub over a store.
    pub fn new(cfg: HubConfig, store: S) -> Self {
        Hub {
            cfg,
            store,
            docs: HashMap::new(),
            conns: HashMap::new(),
            subs: HashMap::new(),
            regions: HashMap::new(),
            clock: 0,
            ephemeral_seen: HashSet::new(),
            ephemeral_order: VecDeque::new(),
            optimistic: HashMap::new(),
            saved_states: Vec::new(),
            prepared: HashMap::new(),
            applied_ahead: 0,
            confirmed_unloaded: 0,
            frames_past_ahead_bound: 0,
        }
    }

    /// The store underneath.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Counters.
    pub fn stats(&self) -> HubStats {
        HubStats {
            ready_connections: self
                .conns
                .values()
                .filter(|c| matches!(c.phase, Phase::Ready))
                .count(),
            loaded_docs: self.docs.len(),
            applied_ahead: self.applied_ahead,
            confirmed_unloaded: self.confirmed_unloaded,
            frames_past_ahead_bound: self.frames_past_ahead_bound,
        }
    }

    /// Documents held in memory (cheap: for a per-round metric).
    pub fn loaded_docs(&self) -> usize {
        self.docs.len()
    }

    /// Connections authenticated as `device`.
    pub fn connections_of(&self, device: &str) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| c.identity.device == device)
            .map(|(id, _)| *id)
            .collect()
    }

    /// A new, authenticated connection. It must send `join` first.
    pub fn connect(&mut self, conn: ConnId, identity: Identity) {
        self.conns.insert(
            conn,
            Conn {
                identity,
                phase: Phase::AwaitingJoin,
                peer_id: String::new(),
                ext: false,
                syncs: HashMap::new(),
                subscribed: HashSet::new(),
                outbound: None,
                announced: HashSet::new(),
                state_key: None,
                refused: HashSet::new(),
                read_audited: HashSet::new(),
                unapplied: HashMap::new(),
                relisted: false,
            },
        );
    }

    /// Opens an outbound connection to a server whose identity (what it may receive) is
    /// `remote`. `remote_cursor` and `local_cursor` come from the last [`Event::Synced`] with
    /// the server whose peer id was `remote_peer` (0 and `None` the first time); if another
    /// server answers, both cursors start from 0. Returns the `join` to send.
    pub fn connect_outbound(
        &mut self,
        conn: ConnId,
        remote: Identity,
        remote_cursor: u64,
        local_cursor: u64,
        remote_peer: Option<String>,
    ) -> Step {
        let mut step = Step::default();
        self.conns.insert(
            conn,
            Conn {
                identity: remote,
                phase: Phase::AwaitingPeer,
                peer_id: String::new(),
                ext: false,
                syncs: HashMap::new(),
                subscribed: HashSet::new(),
                announced: HashSet::new(),
                state_key: None,
                refused: HashSet::new(),
                read_audited: HashSet::new(),
                unapplied: HashMap::new(),
                relisted: false,
                outbound: Some(Outbound {
                    remote_cursor,
                    local_cursor,
                    expected_peer: remote_peer,
                    ..Default::default()
                }),
            },
        );
        step.send(
            conn,
            &Message::Join {
                sender_id: self.cfg.peer_id.clone(),
                supported_protocol_versions: vec![PROTOCOL_V1.into(), PROTOCOL_RELAIS.into()],
                peer_metadata: PeerMetadata {
                    storage_id: self.cfg.storage_id.clone(),
                    is_ephemeral: false,
                },
            },
        );
        step
    }

    /// Documents an outbound connection is still syncing.
    pub fn awaiting(&self, conn: ConnId) -> usize {
        self.conns
            .get(&conn)
            .and_then(|c| c.outbound.as_ref())
            .map(|o| o.awaiting.len() + o.queued.len())
            .unwrap_or(0)
    }

    /// The connection is gone.
    pub fn disconnect(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.remove(&conn) {
            if let Some(key) = &c.state_key {
                for (id, st) in &c.syncs {
                    self.saved_states.push((key.clone(), *id, st.encode()));
                }
            }
            for d in &c.announced {
                let empty = self
                    .docs
                    .get(d)
                    .is_some_and(|l| l.doc.get_heads().is_empty());
                let followed = self
                    .subs
                    .get(d)
                    .is_some_and(|s| s.iter().any(|o| *o != conn));
                if empty && !followed {
                    self.docs.remove(d);
                }
            }
            for d in c.subscribed {
                if let Some(s) = self.subs.get_mut(&d) {
                    s.remove(&conn);
                    if s.is_empty() {
                        self.subs.remove(&d);
                    }
                }
            }
        }
    }

    /// Forgets every loaded document and sync state (after a failed commit). Connections
    /// stay registered; the adapter closes them.
    pub fn reset(&mut self) {
        self.docs.clear();
        for c in self.conns.values_mut() {
            c.syncs.clear();
        }
    }

    /// Fails a connection over changes it sent that cannot be taken. They were applied to a
    /// fork, so the document stays as it was; one this message alone brought is forgotten.
    /// So is the sync state, which now counts those changes as shared: saved for the peer's
    /// next session, it would start that session from changes the hub does not hold.
    fn refuse_changes(
        &mut self,
        step: &mut Step,
        conn: ConnId,
        id: DocumentId,
        known: bool,
        reason: String,
    ) {
        if !known && self.docs.get(&id).is_some_and(|d| d.persisted.is_empty()) {
            self.docs.remove(&id);
        }
        self.fail_over(step, conn, id, reason);
    }

    /// Fails a connection over one document, dropping its sync state there first so that
    /// nothing of the failed exchange is saved for the peer's next session.
    fn fail_over(&mut self, step: &mut Step, conn: ConnId, id: DocumentId, reason: String) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.syncs.remove(&id);
        }
        self.fail(step, conn, reason);
    }

    fn fail(&mut self, step: &mut Step, conn: ConnId, reason: String) {
        step.send(
            conn,
            &Message::Error {
                message: reason.clone(),
            },
        );
        step.closes.push((conn, reason));
        self.disconnect(conn);
    }

    /// Handles one binary frame from a connection.
    pub fn receive(&mut self, conn: ConnId, frame: &[u8]) -> Step {
        self.receive_decoded(conn, Message::decode(frame))
    }

    /// Handles the frames of a round, of any connections, in order: exactly as
    /// [`Self::receive`] one after the other, with their steps absorbed into one. With
    /// [`HubConfig::workers`] above one, the documents new to this hub that the frames bring
    /// are applied on helper threads while the earlier frames are handled (see
    /// [`prepare::ahead`]).
    pub fn receive_all(&mut self, frames: &[(ConnId, &[u8])]) -> Step {
        if self.cfg.workers < 2 || frames.len() < 2 {
            let mut step = Step::default();
            for (conn, frame) in frames {
                step.absorb(self.receive(*conn, frame));
            }
            return step;
        }
        let decoded = decode_all(frames);
        self.walk_round(decoded, Vec::new())
    }

    /// Plans a round that will be handled later, with [`Self::receive_applied`]: the
    /// documents new to this hub that `frames` bring, to be applied by
    /// [`RoundAhead::apply`] while the adapter does something else that needs no hub (the
    /// commit of the round before). Nothing in the hub changes until then.
    pub fn plan_ahead(&mut self, frames: &[(ConnId, &[u8])]) -> RoundAhead {
        let decoded = decode_all(frames);
        let mut budget = (AHEAD_MAX_DOCS, AHEAD_MAX_BYTES);
        let jobs = decoded
            .iter()
            .map(|(conn, msg)| self.jobs_ahead(*conn, msg, &mut budget, &HashSet::new()).0)
            .collect();
        RoundAhead { decoded, jobs }
    }

    /// Handles a round planned by [`Self::plan_ahead`] and applied by
    /// [`RoundAhead::apply`]: exactly as [`Self::receive_all`] on the same frames. Whatever
    /// changed in the hub since the plan is checked for as in `receive_all` (a result that no
    /// longer starts from what the hub holds is applied again), and the documents the applying
    /// did not reach are applied ahead here, with the walk.
    pub fn receive_applied(&mut self, round: AppliedRound) -> Step {
        self.walk_round(round.decoded, round.done)
    }

    /// Handles decoded frames in order. `done[i]` holds documents of frame `i` already
    /// applied (by [`RoundAhead::apply`]); with more than one worker, the others new to the
    /// hub are applied ahead on the hub's workers while the walk handles the earlier frames.
    fn walk_round(
        &mut self,
        decoded: Vec<(ConnId, Result<Message, DecodeError>)>,
        done: Vec<Vec<Prepared>>,
    ) -> Step {
        let mut step = Step::default();
        let workers = self.cfg.workers;
        // What was applied already counts against the round's bound: it waits in memory too.
        let held = done.iter().map(Vec::len).sum::<usize>();
        let mut budget = (AHEAD_MAX_DOCS.saturating_sub(held), AHEAD_MAX_BYTES);
        let jobs: Vec<_> = if workers < 2 {
            Vec::new()
        } else {
            decoded
                .iter()
                .enumerate()
                .map(|(i, (conn, msg))| {
                    let skip: HashSet<DocumentId> =
                        done.get(i).into_iter().flatten().map(|p| p.id).collect();
                    let (jobs, capped) = self.jobs_ahead(*conn, msg, &mut budget, &skip);
                    // Counted here, where the round is handled, not when it is planned.
                    self.frames_past_ahead_bound += u64::from(capped);
                    jobs
                })
                .collect()
        };
        let mut done = done.into_iter();
        prepare::ahead(jobs, workers, |ahead| {
            for (i, (conn, msg)) in decoded.into_iter().enumerate() {
                // Only this frame's documents: a prepared result is checked against the
                // document and state it started from, not against the message.
                self.prepared.clear();
                let results = done.next().unwrap_or_default();
                for p in results.into_iter().chain(ahead.take(i)) {
                    self.prepared.insert(p.id, p);
                }
                step.absorb(self.receive_decoded(conn, msg));
            }
            self.prepared.clear();
        });
        step
    }

    /// The documents of one frame of a round to apply ahead: those that bring changes to a
    /// document this hub holds nothing of in memory, or only an empty placeholder, so that
    /// the job needs no copy of it. Each is checked again when its frame is handled (one the
    /// store holds, say, has other heads and is applied there instead), so this only has to
    /// guess well; it never decides anything.
    ///
    /// `budget` is what the round may still apply ahead, in documents and bytes; the `bool`
    /// says whether it ran out before the frame's end. Documents in `skip` are applied
    /// already.
    fn jobs_ahead(
        &mut self,
        conn: ConnId,
        msg: &Result<Message, DecodeError>,
        budget: &mut (usize, usize),
        skip: &HashSet<DocumentId>,
    ) -> (Vec<Job<'static>>, bool) {
        let Some(c) = self.conns.get(&conn) else {
            return (Vec::new(), false);
        };
        if !matches!(c.phase, Phase::Ready) {
            return (Vec::new(), false);
        }
        let docs: Vec<(DocumentId, &[u8])> = match msg {
            Ok(Message::SyncBatch { docs, .. }) if c.ext => {
                // A document twice in one batch is left to the batch, which applies it twice.
                let count = times_in(docs);
                docs.iter()
                    .filter(|d| count[&d.document_id] == 1)
                    .map(|d| (d.document_id, d.data.as_slice()))
                    .collect()
            }
            Ok(Message::Sync(m) | Message::Request(m)) => match m.document_id.parse() {
                Ok(id) => vec![(id, m.data.as_slice())],
                Err(_) => Vec::new(),
            },
            _ => return (Vec::new(), false),
        };
        let mut jobs = Vec::new();
        for (id, data) in docs {
            if skip.contains(&id) {
                continue;
            }
            let empty = self.docs.get(&id).is_none_or(|e| {
                e.doc.get_heads().is_empty() && e.doc.get_missing_deps(&[]).is_empty()
            });
            if !empty {
                continue;
            }
            if budget.0 == 0 || budget.1 < data.len() {
                return (jobs, true);
            }
            let Ok(message) = prepare::decode_sync(data) else {
                continue;
            };
            if message.changes.is_empty() {
                continue;
            }
            let state = self.state_to_apply(conn, id);
            budget.0 -= 1;
            budget.1 -= data.len();
            jobs.push(Job {
                id,
                base: None,
                state,
                message,
            });
        }
        (jobs, false)
    }

    fn receive_decoded(&mut self, conn: ConnId, msg: Result<Message, DecodeError>) -> Step {
        let mut step = Step::default();
        if !self.conns.contains_key(&conn) {
            return step;
        }
        match msg {
            Ok(msg) => self.handle(conn, msg, &mut step),
            Err(e) => {
                let reason = match e {
                    DecodeError::UnknownType(t) => format!("unknown message type {t:?}"),
                    other => format!("malformed message: {other}"),
                };
                self.fail(&mut step, conn, reason);
            }
        }
        step
    }

    fn handle(&mut self, conn: ConnId, msg: Message, step: &mut Step) {
        let phase_ready = matches!(self.conns[&conn].phase, Phase::Ready);
        let outbound = self.conns[&conn].outbound.is_some();
        match msg {
            Message::Join {
                sender_id,
                supported_protocol_versions,
                peer_metadata,
            } if !outbound => {
                if phase_ready {
                    return self.fail(step, conn, "join sent twice".into());
                }
                if let (Some(storage), false) =
                    (&peer_metadata.storage_id, peer_metadata.is_ephemeral)
                {
                    // Keyed by the device from its token too: a peer cannot load, or spoil,
                    // another device's sync state by declaring its storage id.
                    let c = self.conns.get_mut(&conn).expect("checked");
                    c.state_key = Some(format!("{}\u{1f}{storage}", c.identity.device));
                }
                self.join(conn, sender_id, supported_protocol_versions, step);
            }
            Message::Peer {
                sender_id,
                selected_protocol_version,
                ..
            } if outbound && !phase_ready => {
                let ext = selected_protocol_version == PROTOCOL_RELAIS;
                if !ext && selected_protocol_version != PROTOCOL_V1 {
                    return self.fail(
                        step,
                        conn,
                        format!("server selected unknown protocol {selected_protocol_version:?}"),
                    );
                }
                let c = self.conns.get_mut(&conn).expect("checked");
                c.phase = Phase::Ready;
                if let Some(o) = c.outbound.as_mut() {
                    if o.expected_peer.as_ref().is_some_and(|p| *p != sender_id) {
                        // Cursors of another server mean nothing here.
                        o.remote_cursor = 0;
                        o.local_cursor = 0;
                    }
                }
                if ext {
                    // What this server confirmed holding, per document, is remembered under
                    // its peer id: the next session pushes only what it lacks, in the first
                    // message, and skips what it already has.
                    c.state_key = Some(format!("{UPSTREAM_KEY}{sender_id}"));
                }
                c.peer_id = sender_id;
                c.ext = ext;
                step.events.push(Event::Connected {
                    conn,
                    extension: ext,
                });
                self.start_outbound(conn, step);
            }
            _ if !phase_ready => {
                self.fail(
                    step,
                    conn,
                    format!("{} before the handshake", msg.type_name()),
                );
            }
            Message::Request(m) => self.sync(conn, m, true, step),
            Message::Sync(m) => self.sync(conn, m, false, step),
            Message::SyncBatch {
                sender_id,
                target_id,
                docs,
            } => {
                if !self.conns[&conn].ext {
                    return self.fail(
                        step,
                        conn,
                        "relais-sync-batch needs protocol relais-1".into(),
                    );
                }
                self.prepare_batch(conn, &docs);
                for d in docs {
                    if !self.conns.contains_key(&conn) {
                        // An earlier document of the batch failed the connection.
                        break;
                    }
                    let m = DocMessage {
                        sender_id: sender_id.clone(),
                        target_id: target_id.clone(),
                        document_id: d.document_id.to_string(),
                        data: d.data,
                    };
                    self.sync(conn, m, d.request, step);
                }
                self.prepared.clear();
            }
            Message::Ephemeral {
                sender_id,
                count,
                session_id,
                document_id,
                data,
                ..
            } => self.ephemeral(conn, sender_id, count, session_id, document_id, data, step),
            Message::ChangesSince { since, .. } if !outbound => {
                if !self.conns[&conn].ext {
                    return self.fail(
                        step,
                        conn,
                        "relais-changes-since needs protocol relais-1".into(),
                    );
                }
                self.changes_since(conn, since, step);
            }
            Message::Changes {
                docs,
                cursor,
                more,
                purge,
                erased,
                refused,
                ..
            } if outbound => self.changes(
                conn,
                Listing {
                    docs,
                    cursor,
                    more,
                    purge,
                    erased,
                    refused,
                },
                step,
            ),
            Message::DocUnavailable { document_id, .. } => {
                if let Ok(id) = document_id.parse::<DocumentId>() {
                    // A placeholder made for a request that found nothing.
                    if self
                        .docs
                        .get(&id)
                        .is_some_and(|d| d.doc.get_heads().is_empty())
                    {
                        self.docs.remove(&id);
                    }
                    self.unsubscribe(conn, id);
                    self.finish_doc(conn, id, step);
                }
                self.check_synced(conn, step);
            }
            Message::Leave { .. }
            | Message::RemoteSubscriptionChange { .. }
            | Message::RemoteHeadsChanged { .. } => {}
            Message::Error { message } => {
                step.closes
                    .push((conn, format!("peer reported an error: {message}")));
                self.disconnect(conn);
            }
            other => {
                self.fail(
                    step,
                    conn,
                    format!("unexpected {} message", other.type_name()),
                );
            }
        }
    }

    fn join(&mut self, conn: ConnId, sender_id: String, versions: Vec<String>, step: &mut Step) {
        let ext = versions.iter().any(|v| v == PROTOCOL_RELAIS);
        if !ext && !versions.iter().any(|v| v == PROTOCOL_V1) {
            return self.fail(
                step,
                conn,
                format!("unsupported protocol versions {versions:?}; this server speaks \"1\""),
            );
        }
        // The JS server closes an older socket of the same peer. Only do so for the same
        // device: a peer id is just a claim, and must not let one device kick another off.
        let device = self.conns[&conn].identity.device.clone();
        let stale: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(id, c)| **id != conn && c.peer_id == sender_id && c.identity.device == device)
            .map(|(id, _)| *id)
            .collect();
        for old in stale {
            step.closes.push((
                old,
                "replaced by a newer connection of the same peer".into(),
            ));
            self.disconnect(old);
        }
        let c = self.conns.get_mut(&conn).expect("checked");
        c.phase = Phase::Ready;
        c.peer_id = sender_id.clone();
        c.ext = ext;
        step.send(
            conn,
            &Message::Peer {
                sender_id: self.cfg.peer_id.clone(),
                target_id: sender_id,
                selected_protocol_version: if ext { PROTOCOL_RELAIS } else { PROTOCOL_V1 }.into(),
                peer_metadata: PeerMetadata {
                    storage_id: self.cfg.storage_id.clone(),
                    is_ephemeral: false,
                },
            },
        );
    }

    /// After the handshake of an outbound connection: push what changed here since the last
    /// sync, and ask the server what changed there.
    fn start_outbound(&mut self, conn: ConnId, step: &mut Step) {
        let ext = self.conns[&conn].ext;
        let since = if ext {
            self.conns[&conn]
                .outbound
                .as_ref()
                .map(|o| o.local_cursor)
                .unwrap_or(0)
        } else {
            // A stock server cannot list its changes: offer every local document, so that
            // both pushes and pulls happen.
            0
        };
        let mut cursor = since;
        loop {
            let page = match self.store.changes_since(cursor, self.cfg.feed_page) {
                Ok(p) => p,
                Err(e) => return self.fail(step, conn, format!("local storage error: {e}")),
            };
            let full = page.len() == self.cfg.feed_page;
            let local_cursor = self.conns[&conn]
                .outbound
                .as_ref()
                .map(|o| o.local_cursor)
                .unwrap_or(0);
            for e in page {
                cursor = e.seq;
                if e.id == FEED_MARKER {
                    continue;
                }
                let absent = e.meta.info.erased || e.meta.gone;
                if !absent && self.conns[&conn].identity.can_read(&e.meta.info) {
                    if ext {
                        let confirmed = self.confirmed_heads(conn, e.id);
                        let mut heads = e.meta.change_hashes();
                        heads.sort();
                        if confirmed.as_ref() == Some(&heads) {
                            // The server confirmed this very version (in a session that
                            // ended before it could report `Synced`): nothing to offer.
                            continue;
                        }
                        // Push what the server lacks in the first message: everything it
                        // did not confirm, so one round trip per document.
                        self.optimistic
                            .insert((conn, e.id), confirmed.unwrap_or_default());
                    } else if e.seq > local_cursor {
                        // A stock server may not answer a first message that only announces
                        // heads for a document it lacks (the reference server with its
                        // default share policy does not), so documents written since the
                        // last sync with it go out with their changes at once.
                        self.optimistic.insert((conn, e.id), Vec::new());
                    }
                    self.start_sync(conn, e.id, step);
                }
            }
            if !full {
                break;
            }
        }
        if ext {
            self.request_listing(conn, step);
        }
        self.check_synced(conn, step);
    }

    /// Sends a document the remote has never seen from its stored bytes, without loading
    /// it: on a tablet pushing its offline work, loading each household and having automerge
    /// write it out again was over half of the push's CPU (`perf`, 20 tablets of 1,000). Only
    /// on a Relais server's connection, for a document not in memory whose every change the
    /// remote lacks (no confirmed heads). The message asks for nothing and summarises
    /// nothing (`need` and `have` empty), so the reply carries nothing back when the server
    /// merely stores it; see [`Hub::answer_to_stored`]. Returns false where the usual path must run.
    fn offer_stored(&mut self, conn: ConnId, id: DocumentId, step: &mut Step) -> bool {
        let Some(c) = self.conns.get(&conn) else {
            return false;
        };
        if !c.ext || c.outbound.is_none() || c.syncs.contains_key(&id) {
            return false;
        }
        if self.docs.contains_key(&id)
            || !self
                .optimistic
                .get(&(conn, id))
                .is_some_and(|h| h.is_empty())
        {
            return false;
        }
        let (mut heads, bytes) = match self.store.stored_bytes(id) {
            Ok(Some(StoredBytes { heads, bytes })) if !heads.is_empty() => (heads, bytes),
            _ => return false,
        };
        heads.sort();
        self.optimistic.remove(&(conn, id));
        let c = self.conns.get_mut(&conn).expect("checked");
        let o = c.outbound.as_mut().expect("checked");
        o.quiet = false;
        o.awaiting.insert(id);
        o.pushed_since_listing = true;
        o.refused.remove(&id);
        o.purged.remove(&id);
        o.offered.insert(id, heads.clone());
        let mut flags = sync::MessageFlags::new();
        flags.set(sync::MessageFlags::SUPPORTS_SYNC_RESET);
        // No `have`: the remote then sends only what this message asks for (nothing).
        let msg = sync::Message {
            heads: heads.clone(),
            need: Vec::new(),
            have: Vec::new(),
            changes: sync::ChunkList::from(bytes),
            flags: Some(flags),
            version: sync::MessageVersion::V2,
        };
        let doc = BatchDoc {
            document_id: id,
            data: msg.encode(),
            request: false,
        };
        step.send_doc(conn, true, &self.cfg.peer_id, &c.peer_id, doc);
        self.subscribe(conn, id);
        true
    }

    /// The remote's answer about a document sent by [`Hub::offer_stored`]. When it reports
    /// exactly the heads sent and brings nothing, the document is done without ever being
    /// loaded here (true). Anything else goes the usual way, from a fresh sync state: the
    /// document is loaded and automerge answers what the remote said.
    fn answer_to_stored(
        &mut self,
        conn: ConnId,
        id: DocumentId,
        msg: &sync::Message,
        step: &mut Step,
    ) -> bool {
        let Some(o) = self.conns.get_mut(&conn).and_then(|c| c.outbound.as_mut()) else {
            return false;
        };
        let Some(sent) = o.offered.remove(&id) else {
            return false;
        };
        let mut theirs = msg.heads.clone();
        theirs.sort();
        if !msg.changes.is_empty() || theirs != sent || self.docs.contains_key(&id) {
            return false;
        }
        let c = self.conns.get_mut(&conn).expect("checked");
        let mut st = sync::State::new();
        assume_remote_holds(&mut st, sent.clone());
        st.shared_heads = sent.clone();
        c.syncs.insert(id, st);
        self.save_confirmed(conn, id, sent);
        self.confirmed_unloaded += 1;
        self.finish_doc(conn, id, step);
        true
    }

    fn request_listing(&mut self, conn: ConnId, step: &mut Step) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(o) = c.outbound.as_mut() else {
            return;
        };
        o.listing_pending = true;
        o.pushed_since_listing = false;
        o.quiet = false;
        let msg = Message::ChangesSince {
            sender_id: self.cfg.peer_id.clone(),
            target_id: c.peer_id.clone(),
            since: o.remote_cursor,
        };
        step.send(conn, &msg);
    }

    /// Starts syncing one document over an outbound connection, or queues it while the
    /// window is full.
    fn start_sync(&mut self, conn: ConnId, id: DocumentId, step: &mut Step) {
        if let Some(o) = self.conns.get_mut(&conn).and_then(|c| c.outbound.as_mut()) {
            o.quiet = false;
            if !o.awaiting.contains(&id) && o.awaiting.len() >= OUTBOUND_WINDOW {
                o.queued.push_back(id);
                return;
            }
        }
        if self.offer_stored(conn, id, step) {
            return;
        }
        match self.ensure_loaded(id) {
            Ok(true) if self.docs[&id].info.erased => {
                // Erased here: never offered nor fetched again.
                return;
            }
            Ok(true) => {}
            Ok(false) => {
                self.insert_placeholder(id);
            }
            Err(e) => {
                tracing::error!(document = %id, error = %e, "cannot load document");
                return;
            }
        }
        if let Some(o) = self.conns.get_mut(&conn).and_then(|c| c.outbound.as_mut()) {
            o.awaiting.insert(id);
            o.quiet = false;
            o.pushed_since_listing = true;
            // Offered again (written again here): the remote's word on it is awaited anew.
            o.refused.remove(&id);
            o.purged.remove(&id);
        }
        let assumed = self.optimistic.remove(&(conn, id));
        // An exchange already under way in this session goes on: starting afresh on this
        // side only would leave the remote answering nothing (it has replied already, and
        // automerge does not reply twice to the same heads).
        let under_way = self
            .conns
            .get(&conn)
            .is_some_and(|c| c.syncs.contains_key(&id));
        if let (Some(heads), false) = (assumed, under_way) {
            self.ensure_state(conn, id, true);
            if let Some(st) = self.conns.get_mut(&conn).and_then(|c| c.syncs.get_mut(&id)) {
                assume_remote_holds(st, heads);
            }
        }
        self.subscribe(conn, id);
        self.reply(conn, id, step);
        if under_way {
            self.maybe_done(conn, id, step);
        }
    }

    fn changes(&mut self, conn: ConnId, listing: Listing, step: &mut Step) {
        let Listing {
            docs,
            cursor,
            more,
            purge,
            erased,
            refused,
        } = listing;
        for r in refused {
            let Ok(id) = r.document_id.parse::<DocumentId>() else {
                continue;
            };
            let Some(o) = self.conns.get_mut(&conn).and_then(|c| c.outbound.as_mut()) else {
                break;
            };
            if o.refused.insert(id) {
                step.events.push(Event::Refused {
                    conn,
                    id,
                    reason: r.reason,
                });
            }
            // Not waited for any more: the remote will not confirm what it refused.
            self.finish_doc(conn, id, step);
        }
        for p in purge {
            if let Ok(id) = p.parse::<DocumentId>() {
                let erased = erased.contains(&p);
                self.docs.remove(&id);
                for c in self.subs.get(&id).cloned().unwrap_or_default() {
                    self.unsubscribe(c, id);
                }
                if let Some(o) = self.conns.get_mut(&conn).and_then(|c| c.outbound.as_mut()) {
                    o.awaiting.remove(&id);
                    o.queued.remove(id);
                    o.offered.remove(&id);
                    // Purged here: nothing left to offer again.
                    o.refused.remove(&id);
                    o.purged.insert(id);
                }
                step.events.push(Event::Purge { conn, id, erased });
            }
        }
        for d in docs {
            let Ok(id) = d.document_id.parse::<DocumentId>() else {
                continue;
            };
            let mut theirs: Vec<ChangeHash> = d
                .heads
                .iter()
                .filter_map(|h| ChangeHash::try_from(h.as_slice()).ok())
                .collect();
            theirs.sort();
            let mut mine = match self.docs.get(&id) {
                Some(l) => l.doc.get_heads(),
                None => self.store.heads(id).ok().flatten().unwrap_or_default(),
            };
            mine.sort();
            if mine != theirs {
                if let Some(st) = self.conns.get_mut(&conn).and_then(|c| c.syncs.get_mut(&id)) {
                    // The listing is the server's word on its heads now.
                    st.their_heads = Some(theirs);
                }
                // Refused in this session, its heads differ for good (this replica holds the
                // refused change); waiting for them to match would never end. The exchange
                // under way still brings what the server has.
                let refused = self
                    .conns
                    .get(&conn)
                    .and_then(|c| c.outbound.as_ref())
                    .is_some_and(|o| o.refused.contains(&id));
                if !refused {
                    self.start_sync(conn, id, step);
                }
            }
        }
        // Cursor 0 marks a live notice, not a reply to a listing.
        if cursor > 0 {
            let c = self.conns.get_mut(&conn).expect("checked");
            let o = c.outbound.as_mut().expect("outbound");
            o.remote_cursor = cursor;
            if more {
                self.request_listing(conn, step);
                return;
            }
            o.listing_pending = false;
        }
        self.check_synced(conn, step);
    }

    /// Reports [`Event::Synced`] once nothing is left to exchange on an outbound connection.
    fn check_synced(&mut self, conn: ConnId, step: &mut Step) {
        let ext = match self.conns.get(&conn) {
            Some(c) if matches!(c.phase, Phase::Ready) => c.ext,
            _ => return,
        };
        let Some(o) = self.conns.get(&conn).and_then(|c| c.outbound.as_ref()) else {
            return;
        };
        if o.quiet || o.listing_pending || !o.awaiting.is_empty() || !o.queued.is_empty() {
            return;
        }
        if ext && o.pushed_since_listing {
            // Our pushes moved the server's feed: advance the cursor past them, so the next
            // reconnect lists nothing.
            return self.request_listing(conn, step);
        }
        let mut local_cursor = match self.store.last_seq() {
            Ok(s) => s,
            Err(_) => return,
        };
        // The cursor says "the remote holds every version stored up to here", so it stops
        // before the first stored version the remote is not known to hold: one it refused,
        // or one written to the store while this session ran without passing through the
        // hub (an app's edit on a tablet, an admin-API write on a sub-office whose reload
        // has not arrived yet). The next session offers it again. What the remote said to
        // purge is left out: its tombstone, written after this, is the remote's doing.
        // The feed is in sequence order: the first such entry is where the cursor stops,
        // and the scan ends there (a cursor held by a lasting refusal costs one page).
        let identity = &self.conns[&conn].identity;
        let mut from = o.local_cursor;
        let first = loop {
            let Ok(page) = self.store.changes_since(from, self.cfg.feed_page) else {
                return;
            };
            let full = page.len() == self.cfg.feed_page;
            from = page.last().map_or(from, |e| e.seq);
            let found = page
                .iter()
                .filter(|e| e.id != FEED_MARKER && !e.meta.info.erased && !e.meta.gone)
                .filter(|e| !o.purged.contains(&e.id))
                .filter(|e| identity.can_read(&e.meta.info))
                .find(|e| o.refused.contains(&e.id) || !self.remote_holds(conn, e))
                .map(|e| e.seq);
            if found.is_some() || !full {
                break found;
            }
        };
        if let Some(first) = first {
            local_cursor = local_cursor.min(first.saturating_sub(1));
        }
        let c = self.conns.get_mut(&conn).expect("checked");
        let peer = c.peer_id.clone();
        let o = c.outbound.as_mut().expect("checked");
        o.local_cursor = local_cursor;
        o.quiet = true;
        step.events.push(Event::Synced {
            conn,
            remote_cursor: o.remote_cursor,
            peer,
            local_cursor,
        });
    }

    fn region_of(&mut self, site: &str) -> Option<String> {
        if let Some(r) = self.regions.get(site) {
            return Some(r.clone());
        }
        let id = DocumentId::derived("site", site);
        let region = match self.docs.get(&id) {
            Some(d) => document::read_site(&d.doc).ok().map(|s| s.admin1),
            None => self
                .store
                .load(id)
                .ok()
                .flatten()
                .and_then(|s| document::read_site(&s.doc).ok())
                .map(|s| s.admin1),
        }?;
        self.regions.insert(site.to_string(), region.clone());
        Some(region)
    }

    /// Fills in the regions of what [`document::describe`] read, which only the hub knows
    /// (from the site documents).
    fn with_regions(&mut self, info: DocInfo) -> DocInfo {
        if info.kind == DocKind::Site {
            // A site document carries its own region. Nothing is learnt from it here: it may
            // be a change about to be refused, or a document under any id claiming any code,
            // and only the site's own document says where a site is (see `region_of`).
            return info;
        }
        let mut regions: Vec<String> = info
            .sites
            .iter()
            .filter_map(|s| self.region_of(s))
            .collect();
        regions.sort();
        regions.dedup();
        DocInfo { regions, ..info }
    }

    /// Makes sure a connection has a sync state for a document: the one saved from this
    /// peer's last session when there is one (so a reconnect does not start the bloom-filter
    /// exchange from scratch), else a fresh one.
    fn ensure_state(&mut self, conn: ConnId, id: DocumentId, can_write: bool) {
        if self
            .conns
            .get(&conn)
            .is_none_or(|c| c.syncs.contains_key(&id))
        {
            return;
        }
        let state = self.initial_state(conn, id, can_write);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.syncs.insert(id, state);
        }
    }

    /// The sync state a connection starts a document with (see [`Self::ensure_state`]).
    /// The sync state a document of `conn` is applied ahead from: the connection's, or the
    /// one `sync` would start it with.
    fn state_to_apply(&self, conn: ConnId, id: DocumentId) -> sync::State {
        match self.conns.get(&conn).and_then(|c| c.syncs.get(&id)) {
            Some(s) => s.clone(),
            None => self.initial_state(conn, id, true),
        }
    }

    fn initial_state(&self, conn: ConnId, id: DocumentId, can_write: bool) -> sync::State {
        let Some(c) = self.conns.get(&conn) else {
            return sync::State::new();
        };
        let doc = self.docs.get(&id).map(|d| &d.doc);
        // A saved state holds shared heads only, and none of them can be in a document with
        // no changes: no need to look (a store read per document of a first push).
        let holds = doc.is_some_and(|d| !d.get_heads().is_empty());
        let saved = c
            .state_key
            .as_deref()
            .filter(|_| holds)
            .and_then(|k| self.store.sync_state(k, id))
            .and_then(|b| sync::State::decode(&b).ok())
            // Heads this replica no longer holds (a document purged, then back in scope)
            // would make automerge build a bloom filter from changes it lacks.
            .filter(|st| {
                st.shared_heads.is_empty()
                    || doc.is_some_and(|d| document::has_changes(d, &st.shared_heads))
            });
        let mut state = saved.unwrap_or_default();
        state.set_read_only(!can_write);
        state
    }

    /// Applies ahead, on several threads, the documents of a batch that [`Self::sync`] is
    /// about to apply to a fork: those this connection may write, whose message brings
    /// changes, each once (see [`prepare`]). Anything unusual is left to `sync` alone.
    fn prepare_batch(&mut self, conn: ConnId, docs: &[BatchDoc]) {
        if self.cfg.workers < 2 || docs.len() < prepare::PARALLEL_MIN {
            return;
        }
        let Some(identity) = self.conns.get(&conn).map(|c| c.identity.clone()) else {
            return;
        };
        let count = times_in(docs);
        let mut wanted = Vec::new();
        for d in docs {
            let id = d.document_id;
            if count[&id] > 1 {
                continue;
            }
            let Ok(message) = prepare::decode_sync(&d.data) else {
                continue;
            };
            if message.changes.is_empty() || self.ensure_loaded(id).is_err() {
                continue;
            }
            if let Some(p) = self.prepared.get(&id) {
                // Applied ahead with its round (`receive_all`): still from what is held now?
                let heads = self.docs.get(&id).map(|e| e.doc.get_heads());
                if heads.unwrap_or_default() == p.before {
                    continue;
                }
                self.prepared.remove(&id);
            }
            if let Some(e) = self.docs.get(&id) {
                let known = !e.doc.get_heads().is_empty();
                let writable =
                    !known || (identity.can_read(&e.info) && identity.can_write(&e.info));
                // A queue of changes waiting for their dependencies is not in the heads, so
                // two documents with the same heads could still differ there.
                if e.info.erased || !writable || !e.doc.get_missing_deps(&[]).is_empty() {
                    continue;
                }
            }
            let state = self.state_to_apply(conn, id);
            wanted.push((id, state, message));
        }
        let jobs = wanted
            .into_iter()
            .map(|(id, state, message)| Job {
                id,
                base: self.docs.get(&id).map(|d| &d.doc),
                state,
                message,
            })
            .collect();
        for p in prepare::prepare_all(jobs, self.cfg.workers) {
            self.prepared.insert(p.id, p);
        }
    }

    /// Sync states of peers that keep their own storage, to be saved by the adapter (after
    /// a disconnect or an eviction). Only the shared heads are kept, which both sides have
    /// acknowledged, so a saved state never claims a change the peer did not confirm.
    pub fn take_sync_states(&mut self) -> Vec<(String, DocumentId, Vec<u8>)> {
        std::mem::take(&mut self.saved_states)
    }

    /// An empty, unstored document for an id a peer announced or asked for.
    fn insert_placeholder(&mut self, id: DocumentId) {
        self.clock += 1;
        self.docs.insert(
            id,
            Box::new(LoadedDoc {
                doc: Automerge::new(),
                info: DocInfo::other(),
                persisted: Vec::new(),
                last_used: self.clock,
                queued_bytes: 0,
            }),
        );
    }

    /// Loads a document into memory if it is stored. `Ok(false)` when unknown.
    fn ensure_loaded(&mut self, id: DocumentId) -> Result<bool, StoreError> {
        self.clock += 1;
        if let Some(d) = self.docs.get_mut(&id) {
            d.last_used = self.clock;
            return Ok(true);
        }
        match self.store.load(id)? {
            Some(s) => {
                let persisted = s.meta.change_hashes();
                self.docs.insert(
                    id,
                    Box::new(LoadedDoc {
                        doc: s.doc,
                        info: s.meta.info,
                        persisted,
                        last_used: self.clock,
                        queued_bytes: 0,
                    }),
                );
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn unavailable(&self, conn: ConnId, document_id: String, step: &mut Step) {
        let target_id = self.conns[&conn].peer_id.clone();
        step.send(
            conn,
            &Message::DocUnavailable {
                sender_id: self.cfg.peer_id.clone(),
                target_id,
                document_id,
            },
        );
    }

    fn sync(&mut self, conn: ConnId, m: DocMessage, is_request: bool, step: &mut Step) {
        let Ok(id) = m.document_id.parse::<DocumentId>() else {
            return self.unavailable(conn, m.document_id, step);
        };
        let sync_msg = match prepare::decode_sync(&m.data) {
            Ok(s) => s,
            Err(e) => {
                return self.fail(
                    step,
                    conn,
                    format!("document {id}: unacceptable automerge sync message: {e}"),
                )
            }
        };
        if self.answer_to_stored(conn, id, &sync_msg, step) {
            return;
        }
        let loaded = match self.ensure_loaded(id) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(document = %id, error = %e, "cannot load document");
                return self.unavailable(conn, m.document_id, step);
            }
        };
        let identity = self.conns[&conn].identity.clone();
        let readable = loaded && identity.can_read(&self.docs[&id].info);
        let erased = loaded && self.docs[&id].info.erased;
        if erased && readable {
            // A tombstone: nobody gets it back, nobody brings it back. A device that may
            // have held it is told to purge its copy.
            if !sync_msg.changes.is_empty() || !sync_msg.heads.is_empty() {
                let again = !sync_msg.changes.is_empty();
                self.refuse_once(conn, &identity, id, Refuse::Erased, again, step);
            }
            self.purge_notice(conn, id, true, step);
            return self.unavailable(conn, m.document_id, step);
        }
        // An empty placeholder (made for an earlier message) is not a known document; a
        // tombstone is, and one the device may not read answers as out of scope.
        let known = loaded && (erased || !self.docs[&id].doc.get_heads().is_empty());
        if known && !readable {
            // Out of scope answers exactly as unknown, so ids cannot be probed.
            if !sync_msg.changes.is_empty() {
                let why = if erased {
                    Refuse::ErasedUnreadable
                } else {
                    Refuse::OutOfScope
                };
                self.refuse_once(conn, &identity, id, why, true, step);
            }
            if is_request || !sync_msg.changes.is_empty() {
                return self.unavailable(conn, m.document_id, step);
            }
            // Answered as a placeholder for an unknown id answers the same message: an empty
            // document that took it in.
            let mut empty = Automerge::new();
            let mut st = sync::State::new();
            let _ = empty.receive_sync_message(&mut st, sync_msg);
            if let Some(reply) = empty.generate_sync_message(&mut st) {
                // In the same framing too (a batch for Relais peers), as `reply` sends it.
                let c = &self.conns[&conn];
                let doc = BatchDoc {
                    document_id: id,
                    data: reply.encode(),
                    request: false,
                };
                step.send_doc(conn, c.ext, &self.cfg.peer_id, &c.peer_id, doc);
            }
            return;
        }
        // A request for something unknown is answered `doc-unavailable`; an empty
        // placeholder means someone is creating it right now, so sync that instead.
        if !known && is_request && !loaded && self.conns[&conn].outbound.is_none() {
            return self.unavailable(conn, m.document_id, step);
        }
        if !loaded {
            let c = self.conns.get_mut(&conn).expect("checked");
            if c.outbound.is_none() {
                c.announced.insert(id);
                if c.announced.len() > MAX_EMPTY_ANNOUNCEMENTS {
                    return self.fail(
                        step,
                        conn,
                        format!("more than {MAX_EMPTY_ANNOUNCEMENTS} documents announced without content"),
                    );
                }
            }
            self.insert_placeholder(id);
        }
        let can_write = !known || identity.can_write(&self.docs[&id].info);
        if !can_write {
            // The read-only sync state never asks for the device's changes and drops any it
            // sends; a device holding changes the server lacks is trying to write.
            let doc = &self.docs[&id].doc;
            let unknown = !document::has_changes(doc, &sync_msg.heads);
            if unknown || !sync_msg.changes.is_empty() {
                // Told every time: a client made to wait for the document again (its next
                // message carries heads only) must hear it again. Clients never answer a
                // notice, so this cannot loop.
                let why = Refuse::denied_to(&identity);
                self.refuse_once(conn, &identity, id, why, true, step);
            }
        }
        self.ensure_state(conn, id, can_write);
        let entry = self.docs.get_mut(&id).expect("loaded above");
        let before = entry.doc.get_heads();
        // A new document sent whole as one document chunk (a first push from stored bytes):
        // once automerge has loaded it and found the heads it claims, those bytes are its
        // snapshot, and saving it again would cost nearly as much as the load did.
        let whole =
            (before.is_empty() && entry.persisted.is_empty() && sync_msg.changes.len() == 1)
                .then(|| sync_msg.changes.iter().next().unwrap_or_default())
                .filter(|b| crate::store::one_document_chunk(b))
                .map(|b| (b.to_vec(), sync_msg.heads.clone()));
        let state = self
            .conns
            .get_mut(&conn)
            .expect("checked")
            .syncs
            .get_mut(&id)
            .expect("ensured");
        // Applied ahead with the rest of its batch, from exactly this document and state.
        let prepared = self.prepared.remove(&id).filter(|p| {
            !sync_msg.changes.is_empty()
                && p.before == before
                && p.state_in == *state
                && entry.doc.get_missing_deps(&[]).is_empty()
        });
        let (candidate, refused, described) = match prepared {
            Some(p) => {
                self.applied_ahead += 1;
                *state = p.state_out;
                (Some(p.candidate), p.refused, p.info)
            }
            None => {
                // Apply to a fork: a change refused below then leaves nothing behind.
                let mut candidate = if sync_msg.changes.is_empty() {
                    None
                } else {
                    Some(entry.doc.fork())
                };
                let target = candidate.as_mut().unwrap_or(&mut entry.doc);
                let refused = prepare::apply_message(target, state, sync_msg, id);
                (candidate, refused, None)
            }
        };
        if let Some(reason) = refused {
            return self.refuse_changes(step, conn, id, known, reason);
        }
        if let Some(candidate) = candidate {
            let after = candidate.get_heads();
            if after == before {
                // Changes whose dependencies have not arrived wait in automerge's queue. Keep
                // them: the sender counts them as sent and will not send them again in this
                // session (a bloom-filter false positive leads here), so dropping them would
                // leave both sides asking each other for the same change forever. They are
                // checked like any change once their dependencies arrive.
                // Nothing queued (duplicates, or a read-only state ignoring them): nothing to
                // keep. Counted per connection, so one peer's orphans never cut off another.
                if !candidate.get_missing_deps(&[]).is_empty() {
                    let queued = self.docs[&id].queued_bytes + m.data.len();
                    let c = self.conns.get_mut(&conn).expect("checked");
                    let n = c.unapplied.entry(id).or_insert(0);
                    *n += 1;
                    let n = *n;
                    if self.over_queue(conn, id, queued, step) {
                        return;
                    }
                    if n > MAX_UNAPPLIED {
                        // Reloaded from the store when next needed, without the queue.
                        self.docs.remove(&id);
                        return self.fail(
                            step,
                            conn,
                            format!("document {id}: {MAX_UNAPPLIED} messages of changes with missing dependencies"),
                        );
                    }
                    let entry = self.docs.get_mut(&id).expect("loaded above");
                    entry.doc = candidate;
                    entry.queued_bytes = queued;
                }
            } else {
                let info = match described.map_or_else(|| prepare::describe(id, &candidate), Ok) {
                    Ok(info) => self.with_regions(info),
                    Err(reason) => return self.refuse_changes(step, conn, id, known, reason),
                };
                let old_info = self.docs[&id].info.clone();
                // A household may move out of the writer's scope by the writer's own edit.
                let allowed = identity.can_write(&info)
                    || (known && identity.can_write(&old_info) && info.kind == DocKind::Household);
                if !allowed {
                    let why = if identity.can_read(&info) {
                        Refuse::denied_to(&identity)
                    } else {
                        Refuse::ChangeOutOfScope
                    };
                    self.refuse_once(conn, &identity, id, why, true, step);
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.syncs.remove(&id);
                    }
                    return self.unavailable(conn, m.document_id, step);
                }
                // Changes still waiting for dependencies came with these: they count against
                // the same bounds as a message that applied nothing.
                let still_queued = !candidate.get_missing_deps(&[]).is_empty();
                let queued = if still_queued {
                    self.docs[&id].queued_bytes + m.data.len()
                } else {
                    0
                };
                if self.over_queue(conn, id, queued, step) {
                    return;
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    if !still_queued {
                        c.unapplied.remove(&id);
                    }
                }
                if info.kind == DocKind::Site || old_info.kind == DocKind::Site {
                    // Read again from the site's own document when next needed.
                    for code in info.sites.iter().chain(&old_info.sites) {
                        self.regions.remove(code);
                    }
                }
                let entry = self.docs.get_mut(&id).expect("loaded above");
                entry.doc = candidate;
                entry.info = info.clone();
                entry.queued_bytes = queued;
                let base = std::mem::take(&mut entry.persisted);
                let write = match whole {
                    Some((data, mut claimed)) if base.is_empty() && !still_queued => {
                        let mut heads = after.clone();
                        heads.sort();
                        claimed.sort();
                        (heads == claimed).then(|| DocWrite {
                            id,
                            info: info.clone(),
                            base_heads: Vec::new(),
                            data,
                            heads: after.clone(),
                            verified: true,
                        })
                    }
                    _ => None,
                };
                step.writes.push(
                    write.unwrap_or_else(|| DocWrite::from_doc(id, info.clone(), &entry.doc, base)),
                );
                entry.persisted = after;
                step.merges += 1;
                if self.conns[&conn].outbound.is_none() {
                    step.audit(&identity, AuditAction::Write, id);
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.announced.remove(&id);
                }
                step.events.push(Event::DocChanged { id });
                if !identity.can_read(&info) {
                    // The writer moved it out of its own scope: it keeps nothing of it.
                    self.purge_notice(conn, id, false, step);
                    self.unsubscribe(conn, id);
                    self.relay(id, Some(conn), step);
                    return;
                }
                self.subscribe(conn, id);
                self.relay(id, Some(conn), step);
            }
        }
        self.subscribe(conn, id);
        // Done once the remote reported our exact heads.
        self.reply(conn, id, step);
        self.maybe_done(conn, id, step);
    }

    /// Past [`MAX_QUEUED_BYTES`] of changes waiting for dependencies in document `id` (over
    /// all peers and reconnects), drops its copy with the queue, to be reloaded from the
    /// store when next needed, and closes the sender's connection.
    fn over_queue(&mut self, conn: ConnId, id: DocumentId, queued: usize, step: &mut Step) -> bool {
        if queued <= MAX_QUEUED_BYTES {
            return false;
        }
        self.docs.remove(&id);
        self.fail(
            step,
            conn,
            format!(
                "document {id}: over {MAX_QUEUED_BYTES} bytes of changes with missing dependencies"
            ),
        );
        true
    }

    /// The remote of outbound connection `conn` reported holding exactly this replica's
    /// heads of `id`: a write of it is confirmed there (see [`advance_cursor`]), and there
    /// is nothing to tell it.
    pub fn confirmed_by(&self, conn: ConnId, id: DocumentId) -> bool {
        let (Some(c), Some(entry)) = (self.conns.get(&conn), self.docs.get(&id)) else {
            return false;
        };
        if c.outbound.is_none() {
            return false;
        }
        let mut mine = entry.doc.get_heads();
        if mine.is_empty() {
            return false;
        }
        mine.sort();
        c.syncs
            .get(&id)
            .and_then(|s| s.their_heads.clone())
            .is_some_and(|mut h| {
                h.sort();
                h == mine
            })
    }

    /// True when the remote of an outbound connection is known to hold the stored version
    /// `e`: it reported heads whose history contains it, in this session or an earlier one.
    fn remote_holds(&self, conn: ConnId, e: &FeedEntry) -> bool {
        let mut stored = e.meta.change_hashes();
        if stored.is_empty() {
            return true;
        }
        stored.sort();
        let theirs = self
            .conns
            .get(&conn)
            .and_then(|c| c.syncs.get(&e.id))
            .and_then(|s| s.their_heads.clone())
            .map(|mut h| {
                h.sort();
                h
            });
        if let Some(theirs) = &theirs {
            if *theirs == stored {
                return true;
            }
            // The remote reported the heads held here in memory, which may be ahead of the
            // store (changes not committed yet): it holds every version they contain.
            if let Some(d) = self.docs.get(&e.id) {
                let mut mine = d.doc.get_heads();
                mine.sort();
                if mine == *theirs && document::has_changes(&d.doc, &stored) {
                    return true;
                }
            }
        }
        self.confirmed_heads(conn, e.id).as_ref() == Some(&stored)
    }

    /// The heads of `id` that the remote of an outbound connection confirmed holding in an
    /// earlier session, sorted.
    fn confirmed_heads(&self, conn: ConnId, id: DocumentId) -> Option<Vec<ChangeHash>> {
        let key = self.conns.get(&conn)?.state_key.as_deref()?;
        saved_heads(&self.store, key, id)
    }

    /// On an outbound connection, a document is done when the server reported our heads
    /// and nothing is left to send.
    fn maybe_done(&mut self, conn: ConnId, id: DocumentId, step: &mut Step) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if c.outbound.is_none() {
            return;
        }
        let Some(entry) = self.docs.get(&id) else {
            return;
        };
        let mut mine = entry.doc.get_heads();
        mine.sort();
        let theirs = c
            .syncs
            .get(&id)
            .and_then(|s| s.their_heads.clone())
            .map(|mut h| {
                h.sort();
                h
            });
        if theirs.as_ref() == Some(&mine) {
            if mine.is_empty() {
                // Nothing on either side: drop the placeholder.
                self.docs.remove(&id);
                self.unsubscribe(conn, id);
            } else {
                self.save_confirmed(conn, id, mine);
            }
            self.finish_doc(conn, id, step);
        }
    }

    /// The remote of outbound connection `conn` holds `heads` of `id`: saved for the adapter
    /// to commit, so that a later session need not offer this version again.
    fn save_confirmed(&mut self, conn: ConnId, id: DocumentId, heads: Vec<ChangeHash>) {
        if let Some(key) = self.conns.get(&conn).and_then(|c| c.state_key.clone()) {
            let mut st = sync::State::new();
            st.shared_heads = heads;
            self.saved_states.push((key, id, st.encode()));
        }
    }

    /// A document is done on an outbound connection: let queued ones in, then see whether
    /// everything is in sync.
    fn finish_doc(&mut self, conn: ConnId, id: DocumentId, step: &mut Step) {
        let mut next = Vec::new();
        if let Some(o) = self.conns.get_mut(&conn).and_then(|c| c.outbound.as_mut()) {
            o.awaiting.remove(&id);
            o.queued.remove(id);
            o.offered.remove(&id);
            while o.awaiting.len() + next.len() < OUTBOUND_WINDOW {
                match o.queued.pop_front() {
                    Some(n) => next.push(n),
                    None => break,
                }
            }
        }
        for n in next {
            self.start_sync(conn, n, step);
        }
        self.check_synced(conn, step);
    }

    fn subscribe(&mut self, conn: ConnId, id: DocumentId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.subscribed.insert(id) {
                self.subs.entry(id).or_default().insert(conn);
            }
        }
    }

    /// Generates the next sync message for `conn` about `id`, if any. Returns whether one
    /// was sent.
    fn reply(&mut self, conn: ConnId, id: DocumentId, step: &mut Step) -> bool {
        let (Some(entry), Some(c)) = (self.docs.get(&id), self.conns.get(&conn)) else {
            return false;
        };
        if self.confirmed_by(conn, id) {
            // On an outbound connection, a remote that reported our exact heads needs
            // nothing: the acknowledgement automerge would send carries no change, and
            // leaving it out saves a frame per document (a fresh tablet receives thousands).
            return false;
        }
        let can_write = c.outbound.is_some() || c.identity.can_write(&entry.info);
        self.ensure_state(conn, id, can_write);
        let entry = &self.docs[&id];
        let c = self.conns.get_mut(&conn).expect("checked");
        let state = c.syncs.get_mut(&id).expect("ensured");
        // The state holds what this peer said (its bloom filters, its needs): if automerge
        // still chokes on it, the peer loses its connection, not every device the hub.
        let generated = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            #[cfg(test)]
            if id == prepare::REPLY_PANICS_IN_TESTS {
                panic!("a test's panic while replying");
            }
            entry.doc.generate_sync_message(state)
        }));
        let msg = match generated {
            Ok(Some(msg)) => msg,
            Ok(None) => return false,
            Err(_) => {
                let reason = format!("document {id}: automerge panicked while replying");
                self.fail_over(step, conn, id, reason);
                return false;
            }
        };
        // Once per session and document: a record per message would add a durable write to
        // every relay round.
        if !msg.changes.is_empty() && c.outbound.is_none() && c.read_audited.insert(id) {
            step.audit(&c.identity, AuditAction::SyncRead, id);
        }
        // Asking for a document we do not have is a `request`, so the server may answer
        // `doc-unavailable`.
        let doc = BatchDoc {
            document_id: id,
            data: msg.encode(),
            request: c.outbound.is_some() && entry.doc.get_heads().is_empty(),
        };
        step.send_doc(conn, c.ext, &self.cfg.peer_id, &c.peer_id, doc);
        true
    }

    /// Shows a changed document to every other peer that may see it.
    fn relay(&mut self, id: DocumentId, from: Option<ConnId>, step: &mut Step) {
        let info = self.docs[&id].info.clone();
        let subscribers: Vec<ConnId> = self
            .subs
            .get(&id)
            .map(|s| s.iter().copied().filter(|c| Some(*c) != from).collect())
            .unwrap_or_default();
        let heads = self.docs[&id].doc.get_heads();
        let mut mine = heads.clone();
        mine.sort();
        for other in &subscribers {
            let readable = self.conns[other].identity.can_read(&info);
            if readable {
                let sent = self.reply(*other, id, step);
                // Await the server's answer only when there is one to come: a reload of a
                // document the server itself just sent has nothing to say, and waiting for an
                // answer to it would keep a live session from ever reporting `Synced`.
                if let Some(c) = self.conns.get_mut(other) {
                    let mut theirs = c.syncs.get(&id).and_then(|s| s.their_heads.clone());
                    if let Some(t) = theirs.as_mut() {
                        t.sort();
                    }
                    let differ = theirs.as_ref() != Some(&mine);
                    if let Some(o) = c.outbound.as_mut() {
                        if sent || differ {
                            o.awaiting.insert(id);
                            o.quiet = false;
                        }
                        if sent {
                            o.pushed_since_listing = true;
                        }
                    }
                }
            } else {
                // The document left this peer's scope (a household moved): it hears nothing
                // more of it, and a Relais client is told to delete its copy. Stock clients
                // never see extension messages.
                self.purge_notice(*other, id, false, step);
                self.unsubscribe(*other, id);
            }
        }
        // Relais clients hear of documents they do not follow yet, so a tablet in the
        // field receives its colleagues' registrations while connected.
        let heads: Vec<Vec<u8>> = heads.iter().map(|h| h.0.to_vec()).collect();
        let candidates: Vec<(ConnId, bool)> = self
            .conns
            .iter()
            .filter(|(cid, c)| {
                Some(**cid) != from
                    && matches!(c.phase, Phase::Ready)
                    && !c.subscribed.contains(&id)
                    && c.identity.can_read(&info)
            })
            .map(|(cid, c)| (*cid, c.outbound.is_some()))
            .collect();
        // Upstream servers get new documents pushed at once.
        for (cid, _) in candidates.iter().filter(|(_, out)| *out) {
            self.start_sync(*cid, id, step);
        }
        let notify: Vec<(ConnId, String)> = candidates
            .iter()
            .filter(|(cid, out)| !out && self.conns[cid].ext)
            .map(|(cid, _)| (*cid, self.conns[cid].peer_id.clone()))
            .collect();
        for (cid, peer) in notify {
            let doc = FeedDoc {
                document_id: id.to_string(),
                heads: heads.clone(),
            };
            let notice = self.live_notice(peer, vec![doc], Vec::new(), Vec::new(), Vec::new());
            step.send(cid, &notice);
        }
    }

    /// Logs and audits a refused write, once per connection and document, and tells a
    /// Relais client (the first time, and again whenever `again`: a message that brought
    /// changes), so that it stops waiting for a confirmation that will not come.
    fn refuse_once(
        &mut self,
        conn: ConnId,
        identity: &Identity,
        id: DocumentId,
        why: Refuse,
        again: bool,
        step: &mut Step,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let first = c.refused.insert(id);
        if first {
            step.refused(identity, id, why.audited());
        }
        let told = why.told(identity);
        if (first || again) && c.ext && c.outbound.is_none() {
            let refusal = Refusal {
                document_id: id.to_string(),
                reason: told.into(),
            };
            let target = c.peer_id.clone();
            let notice =
                self.live_notice(target, Vec::new(), Vec::new(), Vec::new(), vec![refusal]);
            step.send(conn, &notice);
        }
    }

    /// Tells a Relais client, live, to delete its copy of a document. Stock clients and
    /// upstream servers never see extension messages.
    fn purge_notice(&self, conn: ConnId, id: DocumentId, erased: bool, step: &mut Step) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if !c.ext || c.outbound.is_some() {
            return;
        }
        let doc = id.to_string();
        let erased = if erased {
            vec![doc.clone()]
        } else {
            Vec::new()
        };
        let notice = self.live_notice(c.peer_id.clone(), Vec::new(), vec![doc], erased, Vec::new());
        step.send(conn, &notice);
    }

    /// A `relais-changes` sent unasked to a Relais client: cursor 0 marks it as a live
    /// notice, not a page of a listing it requested.
    fn live_notice(
        &self,
        target_id: String,
        docs: Vec<FeedDoc>,
        purge: Vec<String>,
        erased: Vec<String>,
        refused: Vec<Refusal>,
    ) -> Message {
        Message::Changes {
            sender_id: self.cfg.peer_id.clone(),
            target_id,
            docs,
            cursor: 0,
            more: false,
            purge,
            erased,
            refused,
        }
    }

    /// A document was erased (or, with `erased` false, removed because it left this
    /// replica's scope) in the store: forget it, and tell every connected Relais client that
    /// may hold it to purge its copy.
    pub fn purged(&mut self, id: DocumentId, info: &DocInfo, erased: bool) -> Step {
        let mut step = Step::default();
        self.docs.remove(&id);
        let readers: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Ready) && c.identity.can_read(info))
            .map(|(cid, _)| *cid)
            .collect();
        for conn in readers {
            self.purge_notice(conn, id, erased, &mut step);
            self.unsubscribe(conn, id);
            if let Some(o) = self.conns.get_mut(&conn).and_then(|c| c.outbound.as_mut()) {
                o.awaiting.remove(&id);
                o.queued.remove(id);
                o.offered.remove(&id);
            }
        }
        self.subs.remove(&id);
        step
    }

    fn unsubscribe(&mut self, conn: ConnId, id: DocumentId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.subscribed.remove(&id);
            c.syncs.remove(&id);
        }
        if let Some(s) = self.subs.get_mut(&id) {
            s.remove(&conn);
            if s.is_empty() {
                self.subs.remove(&id);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn ephemeral(
        &mut self,
        conn: ConnId,
        sender_id: String,
        count: u64,
        session_id: String,
        document_id: String,
        data: Vec<u8>,
        step: &mut Step,
    ) {
        // Presence and cursors are small; the duplicate filter keeps ids, so they are bounded.
        if sender_id.len() > EPHEMERAL_MAX_ID_BYTES || session_id.len() > EPHEMERAL_MAX_ID_BYTES {
            return self.fail(
                step,
                conn,
                format!(
                    "ephemeral message: senderId or sessionId over {EPHEMERAL_MAX_ID_BYTES} bytes"
                ),
            );
        }
        if data.len() > EPHEMERAL_MAX_BYTES {
            return self.fail(
                step,
                conn,
                format!(
                    "ephemeral message of {} bytes; at most {EPHEMERAL_MAX_BYTES}",
                    data.len()
                ),
            );
        }
        let Ok(id) = document_id.parse::<DocumentId>() else {
            return;
        };
        let Some(info) = self.docs.get(&id).map(|d| d.info.clone()) else {
            return;
        };
        if !self.conns[&conn].identity.can_read(&info) {
            return;
        }
        let key = (sender_id.clone(), session_id.clone(), count);
        if !self.ephemeral_seen.insert(key.clone()) {
            return;
        }
        self.ephemeral_order.push_back(key);
        if self.ephemeral_order.len() > EPHEMERAL_MEMORY {
            if let Some(old) = self.ephemeral_order.pop_front() {
                self.ephemeral_seen.remove(&old);
            }
        }
        let targets: Vec<(ConnId, String)> = self
            .subs
            .get(&id)
            .into_iter()
            .flatten()
            .filter(|c| **c != conn)
            .filter_map(|c| {
                let other = &self.conns[c];
                other
                    .identity
                    .can_read(&info)
                    .then(|| (*c, other.peer_id.clone()))
            })
            .collect();
        for (c, peer) in targets {
            step.send(
                c,
                &Message::Ephemeral {
                    sender_id: sender_id.clone(),
                    target_id: peer,
                    count,
                    session_id: session_id.clone(),
                    document_id: document_id.clone(),
                    data: data.clone(),
                },
            );
        }
    }

    fn changes_since(&mut self, conn: ConnId, since: u64, step: &mut Step) {
        let identity = self.conns[&conn].identity.clone();
        let peer = self.conns[&conn].peer_id.clone();
        let mut docs = Vec::new();
        let mut purge = Vec::new();
        let mut erased = Vec::new();
        // The token's scope changed after this device last listed: list everything again
        // (it may now see documents changed long ago) and purge what it may no longer hold.
        // Once per connection: the pages after the first carry a cursor that is still
        // older than the change, and must continue the listing, not start it again.
        let (since, former) = match &identity.former {
            Some(f) if since < f.seq => {
                let c = self.conns.get_mut(&conn).expect("connected");
                let restart = !std::mem::replace(&mut c.relisted, true);
                (if restart { 0 } else { since }, Some(f.scope.clone()))
            }
            _ => (since, None),
        };
        let mut cursor = since;
        let mut more = false;
        let mut scanned = 0;
        // A scoped device reads the feed's rows for its sites and regions (and those its
        // token covered before a change of scope), not every entry: the entries it may not
        // see are skipped below either way.
        let keys = if identity.role == crate::access::Role::Admin {
            None
        } else {
            let all = match &former {
                Some(f) => identity.scope.union(f),
                None => identity.scope.clone(),
            };
            scope_feed::scope_keys(&all)
        };
        // Scan pages until one reply is full or the feed ends, skipping what the device
        // may not see without telling it anything about those documents. A narrow token
        // over a national feed would skip nearly everything, so one reply scans a bounded
        // part of the feed: the device asks for the rest, and other devices' work goes on
        // in between.
        'scan: loop {
            let read = match &keys {
                Some(k) => self
                    .store
                    .scoped_changes_since(cursor, self.cfg.feed_page, k),
                None => self
                    .store
                    .changes_since(cursor, self.cfg.feed_page)
                    .map(|e| ScopedPage::of_feed(e, cursor, self.cfg.feed_page)),
            };
            let page = match read {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "feed read failed");
                    return self.fail(step, conn, "server storage error".into());
                }
            };
            let full = !page.complete;
            let page_end = page.cursor;
            for e in page.entries {
                cursor = e.seq;
                if e.id == FEED_MARKER {
                    continue;
                }
                if !identity.can_read(&e.meta.info) {
                    // A household that moved away from this device's sites: it may hold a
                    // copy, so it must purge it. Any other device hears nothing of it.
                    let moved_away =
                        !e.meta.former_sites.is_empty() && identity.can_read(&e.meta.former_info());
                    let rescoped = former.as_ref().is_some_and(|f| {
                        f.covers(&e.meta.info)
                            || (!e.meta.former_sites.is_empty() && f.covers(&e.meta.former_info()))
                    });
                    if moved_away || rescoped {
                        purge.push(e.id.to_string());
                    }
                } else if e.meta.info.erased {
                    purge.push(e.id.to_string());
                    erased.push(e.id.to_string());
                } else if e.meta.gone {
                    // Left this server's scope: whoever could read it here may hold a copy.
                    purge.push(e.id.to_string());
                } else {
                    // The loaded document may be ahead of the store: a change that came in
                    // this same round is committed only after this step, before the listing
                    // goes out. Stale heads here would make the device sync again a document
                    // it has just pushed, while the server thinks that exchange is over.
                    let heads = self
                        .docs
                        .get(&e.id)
                        .map(|d| d.doc.get_heads())
                        .filter(|h| !h.is_empty())
                        .unwrap_or_else(|| e.meta.change_hashes());
                    docs.push(FeedDoc {
                        document_id: e.id.to_string(),
                        heads: heads.iter().map(|h| h.0.to_vec()).collect(),
                    });
                }
                if docs.len() + purge.len() >= self.cfg.feed_page {
                    more = true;
                    break 'scan;
                }
            }
            cursor = cursor.max(page_end);
            scanned += 1;
            if !full {
                break;
            }
            if scanned >= MAX_SCANNED_PAGES {
                more = true;
                break;
            }
        }
        step.send(
            conn,
            &Message::Changes {
                sender_id: self.cfg.peer_id.clone(),
                target_id: peer,
                docs,
                cursor,
                more,
                purge,
                erased,
                refused: Vec::new(),
            },
        );
    }

    /// A document was written outside the hub (admin API, upstream replication): reload it
    /// and show it to its peers.
    pub fn reload(&mut self, id: DocumentId) -> Step {
        let mut step = Step::default();
        let fresh = match self.store.load(id) {
            Ok(Some(s)) => s,
            _ => return step,
        };
        let info = fresh.meta.info.clone();
        let persisted = fresh.meta.change_hashes();
        if info.kind == DocKind::Site {
            self.regions
                .remove(&info.sites.first().cloned().unwrap_or_default());
        }
        self.clock += 1;
        match self.docs.get_mut(&id) {
            Some(d) => {
                let mut other = fresh.doc;
                if d.doc.merge(&mut other).is_err() {
                    self.docs.remove(&id);
                    return step;
                }
                d.info = info;
                d.persisted = persisted;
                d.last_used = self.clock;
            }
            None => {
                self.docs.insert(
                    id,
                    Box::new(LoadedDoc {
                        doc: fresh.doc,
                        info,
                        persisted,
                        last_used: self.clock,
                        queued_bytes: 0,
                    }),
                );
            }
        }
        self.relay(id, None, &mut step);
        step
    }

    /// Evicts the least recently used documents beyond the limit. Call it after a round's
    /// writes are committed, never between a step and its commit.
    pub fn evict(&mut self) {
        let max = self.cfg.max_loaded_docs.max(1);
        if self.docs.len() <= max + max / 10 {
            return;
        }
        let busy: HashSet<DocumentId> = self
            .conns
            .values()
            .filter_map(|c| c.outbound.as_ref())
            .flat_map(|o| o.awaiting.iter().copied().chain(o.queued.iter()))
            .collect();
        let mut by_age: Vec<(u64, DocumentId)> = self
            .docs
            .iter()
            .filter(|(id, _)| !busy.contains(id))
            .map(|(id, d)| (d.last_used, *id))
            .collect();
        by_age.sort_unstable();
        let excess = self.docs.len().saturating_sub(max);
        for (_, id) in by_age.into_iter().take(excess) {
            self.docs.remove(&id);
            if let Some(conns) = self.subs.get(&id) {
                for c in conns {
                    if let Some(conn) = self.conns.get_mut(c) {
                        if let (Some(st), Some(key)) = (conn.syncs.remove(&id), &conn.state_key) {
                            self.saved_states.push((key.clone(), id, st.encode()));
                        }
                    }
                }
            }
        }
    }
}

/// Decodes each frame of a round.
fn decode_all(frames: &[(ConnId, &[u8])]) -> Vec<(ConnId, Result<Message, DecodeError>)> {
    frames
        .iter()
        .map(|(conn, frame)| (*conn, Message::decode(frame)))
        .collect()
}

/// A round of frames planned by [`Hub::plan_ahead`], its new documents not yet applied.
pub struct RoundAhead {
    decoded: Vec<(ConnId, Result<Message, DecodeError>)>,
    jobs: Vec<Vec<Job<'static>>>,
}

impl RoundAhead {
    /// Frames in the round.
    pub fn len(&self) -> usize {
        self.decoded.len()
    }

    /// Whether the round has no frames.
    pub fn is_empty(&self) -> bool {
        self.decoded.is_empty()
    }

    /// Applies the round's new documents, in order, on `threads` threads (this one among
    /// them), until `stop` says so: each thread asks before each document, so this returns
    /// about one document's time after `stop` turns true. What was not reached is applied
    /// ahead when the round is handled. Needs no hub, so it can run while the adapter
    /// commits the round before.
    pub fn apply(self, threads: usize, stop: &(dyn Fn() -> bool + Sync)) -> AppliedRound {
        let done = prepare::apply_until(self.jobs, threads, stop);
        AppliedRound {
            decoded: self.decoded,
            done,
        }
    }
}

/// A round with some of its new documents applied, by [`RoundAhead::apply`]: to
/// be handled with [`Hub::receive_applied`].
pub struct AppliedRound {
    decoded: Vec<(ConnId, Result<Message, DecodeError>)>,
    done: Vec<Vec<Prepared>>,
}

impl AppliedRound {
    /// Frames in the round.
    pub fn len(&self) -> usize {
        self.decoded.len()
    }

    /// Whether the round has no frames.
    pub fn is_empty(&self) -> bool {
        self.decoded.is_empty()
    }

    /// Documents of the round already applied, which [`Hub::receive_applied`] will take
    /// as they are if nothing changed since.
    pub fn applied_docs(&self) -> usize {
        self.done.iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(n: u8, len: usize) -> BatchDoc {
        BatchDoc {
            document_id: DocumentId::from_bytes([n; 16]),
            data: vec![n; len],
            request: n.is_multiple_of(2),
        }
    }

    fn decoded(step: &Step) -> Vec<(ConnId, Message)> {
        step.sends
            .iter()
            .map(|(c, f)| (*c, Message::decode(f).expect("a valid frame")))
            .collect()
    }

    #[test]
    fn consecutive_documents_to_one_peer_share_a_batch_frame() {
        let mut step = Step::default();
        for n in 1..=3 {
            step.send_doc(7, true, "s", "t", doc(n, 10));
        }
        // Another peer, then a message of another kind, each end the open batch.
        step.send_doc(8, true, "s", "u", doc(4, 10));
        step.send_doc(7, true, "s", "t", doc(5, 10));
        step.send(
            7,
            &Message::Leave {
                sender_id: "s".into(),
            },
        );
        step.send_doc(7, true, "s", "t", doc(6, 10));
        // A peer without relais-1 gets plain messages.
        step.send_doc(9, false, "s", "v", doc(7, 10));
        let frames = decoded(&step);
        let ids = |m: &Message| match m {
            Message::SyncBatch { docs, .. } => docs
                .iter()
                .map(|d| (d.document_id.as_bytes()[0], d.request))
                .collect::<Vec<_>>(),
            other => panic!("not a batch: {other:?}"),
        };
        assert_eq!(frames.len(), 6);
        assert_eq!(frames[0].0, 7);
        assert_eq!(ids(&frames[0].1), [(1, false), (2, true), (3, false)]);
        assert_eq!((frames[1].0, ids(&frames[1].1)), (8, vec![(4, true)]));
        assert_eq!(ids(&frames[2].1), [(5, false)]);
        assert!(matches!(frames[3].1, Message::Leave { .. }));
        assert_eq!(ids(&frames[4].1), [(6, true)]);
        assert!(matches!(frames[5].1, Message::Sync(ref d) if d.data == vec![7; 10]));
    }

    #[test]
    fn a_batch_is_capped_in_documents_and_bytes() {
        let mut step = Step::default();
        for _ in 0..BATCH_DOCS + 1 {
            step.send_doc(1, true, "s", "t", doc(1, 1));
        }
        assert_eq!(step.sends.len(), 2);
        let mut step = Step::default();
        let big = BATCH_BYTES / 3;
        for _ in 0..4 {
            step.send_doc(1, true, "s", "t", doc(1, big));
        }
        assert_eq!(step.sends.len(), 2);
        assert!(step.sends.iter().all(|(_, f)| f.len() <= BATCH_BYTES + 256));
        // A message larger than a batch still goes, alone.
        step.send_doc(1, true, "s", "t", doc(1, BATCH_BYTES * 2));
        step.send_doc(1, true, "s", "t", doc(1, 1));
        assert_eq!(step.sends.len(), 4);
        for (_, m) in decoded(&step) {
            assert!(matches!(m, Message::SyncBatch { .. }));
        }
    }

    #[test]
    fn an_absorbed_step_keeps_only_its_own_open_batch() {
        let mut first = Step::default();
        first.send_doc(1, true, "s", "t", doc(1, 4));
        let mut later = Step::default();
        later.send_doc(1, true, "s", "t", doc(2, 4));
        first.absorb(later);
        // The later step's batch is the last frame: it takes the next document.
        first.send_doc(1, true, "s", "t", doc(3, 4));
        first.absorb(Step::default());
        first.send_doc(1, true, "s", "t", doc(4, 4));
        let frames = decoded(&first);
        assert_eq!(frames.len(), 2);
        assert!(matches!(&frames[1].1, Message::SyncBatch { docs, .. } if docs.len() == 3));
    }

    #[test]
    fn cursor_advances_only_over_contiguous_confirmed_writes() {
        assert_eq!(advance_cursor(10, &[11, 12, 13]), 13);
        assert_eq!(
            advance_cursor(10, &[12, 13]),
            10,
            "a foreign write at 11 must be pushed later"
        );
        assert_eq!(
            advance_cursor(10, &[5, 11]),
            11,
            "skipped writes keep their old sequence"
        );
        assert_eq!(advance_cursor(10, &[]), 10);
    }

    /// The whole of `doc` in one sync message, as a peer sends it once it knows the other
    /// side holds nothing of it.
    fn carrying_all(doc: &Automerge) -> Vec<u8> {
        let mut doc = doc.clone();
        let (mut mine, mut theirs) = (sync::State::new(), sync::State::new());
        let mut empty = Automerge::new();
        let first = doc
            .generate_sync_message(&mut mine)
            .expect("something to say");
        empty.receive_sync_message(&mut theirs, first).unwrap();
        let ask = empty.generate_sync_message(&mut theirs).expect("an ask");
        doc.receive_sync_message(&mut mine, ask).unwrap();
        let message = doc.generate_sync_message(&mut mine).expect("the changes");
        assert!(!message.changes.is_empty());
        message.encode()
    }

    #[test]
    fn a_document_automerge_panics_on_costs_its_sender_the_connection_not_the_hub() {
        use crate::household::{parse_members, NewHousehold};
        use crate::ledger::{Ledger, Writer};
        use crate::protocol::message::{DocMessage, PeerMetadata};
        use crate::site::Site;
        use crate::store::Store;
        use std::sync::Arc;

        let dir = tempfile::tempdir().unwrap();
        let tablet = Ledger::new(
            Store::open(dir.path().join("tablet.redb")).unwrap(),
            Writer {
                enumerator: "enum-tab".into(),
                device: "tab".into(),
            },
        )
        .unwrap();
        tablet.put_site(&Site::socoura()).unwrap();
        let register = |name: &str| {
            tablet
                .register(NewHousehold {
                    site: "SOC-01".into(),
                    head_name: name.into(),
                    members: parse_members("F:34,M:12").unwrap(),
                    ..Default::default()
                })
                .unwrap()
        };
        let (a, b, c) = (register("A"), register("B"), register("C"));
        let (d, e) = (register("D"), register("E"));
        let whole = |id| carrying_all(&tablet.store().load(id).unwrap().unwrap().doc);
        let sync = |id: DocumentId, data: Vec<u8>| {
            Message::Sync(DocMessage {
                sender_id: "js".into(),
                target_id: "office".into(),
                document_id: id.to_string(),
                data,
            })
            .encode()
        };
        let join = Message::Join {
            sender_id: "js".into(),
            supported_protocol_versions: vec!["1".into()],
            peer_metadata: PeerMetadata {
                storage_id: Some("tablet-storage".into()),
                is_ephemeral: false,
            },
        }
        .encode();
        let bad_id = prepare::DESCRIBE_PANICS_IN_TESTS;
        let bad = sync(bad_id, whole(a));
        let good = sync(b, whole(b));

        // One thread takes the in-order path; two apply both documents ahead first.
        for workers in [1, 2] {
            let path = dir.path().join(format!("office-{workers}.redb"));
            let store = Arc::new(Store::open(path).unwrap());
            let cfg = HubConfig {
                workers,
                ..HubConfig::default()
            };
            let mut hub = Hub::new(cfg, store.clone());
            for conn in [1, 2] {
                hub.connect(conn, Identity::admin(format!("tab-{conn}")));
                assert!(hub.receive(conn, &join).closes.is_empty());
            }
            let step = hub.receive_all(&[(1, bad.as_slice()), (2, good.as_slice())]);
            store.write(&step.writes).unwrap();
            assert_eq!(step.closes.len(), 1, "{workers} workers: {:?}", step.closes);
            let (conn, reason) = &step.closes[0];
            assert_eq!(*conn, 1);
            assert!(reason.contains("panicked"), "{reason}");
            assert!(store.load(bad_id).unwrap().is_none());
            assert!(step.writes.iter().all(|w| w.id != bad_id));
            assert!(
                hub.take_sync_states()
                    .iter()
                    .all(|(_, id, _)| *id != bad_id),
                "the refused changes' sync state is not kept for the next session"
            );
            let heads = |id| store.load(id).unwrap().map(|s| s.doc.get_heads());
            let tablet_heads = |id| tablet.store().load(id).unwrap().map(|s| s.doc.get_heads());
            assert_eq!(heads(b), tablet_heads(b), "{workers} workers");

            // The hub goes on for every other connection.
            let step = hub.receive(2, &sync(c, whole(c)));
            store.write(&step.writes).unwrap();
            assert!(step.closes.is_empty(), "{:?}", step.closes);
            assert_eq!(heads(c), tablet_heads(c));

            // A reply automerge panics on costs that peer its connection, and only it.
            hub.connect(3, Identity::admin("tab-3"));
            assert!(hub.receive(3, &join).closes.is_empty());
            let step = hub.receive(3, &sync(prepare::REPLY_PANICS_IN_TESTS, whole(d)));
            store.write(&step.writes).unwrap();
            assert_eq!(step.closes.len(), 1, "{:?}", step.closes);
            assert_eq!(step.closes[0].0, 3);
            assert!(step.closes[0].1.contains("replying"), "{:?}", step.closes);
            let step = hub.receive(2, &sync(e, whole(e)));
            store.write(&step.writes).unwrap();
            assert!(step.closes.is_empty(), "{:?}", step.closes);
            assert_eq!(heads(e), tablet_heads(e));
        }
    }
}
