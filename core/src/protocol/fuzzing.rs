//! Entry points shared by the cargo-fuzz targets in `fuzz/` and the stable test that
//! replays their corpus (`core/tests/fuzz_corpus.rs`), so CI exercises every saved input
//! without a nightly toolchain.
//!
//! Each function must never panic, whatever the bytes.

use std::collections::HashMap;
use std::sync::Mutex;

use automerge::ChangeHash;

use super::hub::{Event, Hub, HubConfig, HubStore, Step};
use super::message::Message;
use crate::access::{Identity, Role, Scope};
use crate::document;
use crate::store::{DocWrite, FeedEntry, StoreError, StoredBytes, StoredDoc};
use crate::DocumentId;

/// Decodes one frame; a decoded message must encode and decode to itself.
pub fn decode_message(data: &[u8]) {
    if let Ok(m) = Message::decode(data) {
        let again = Message::decode(&m.encode()).expect("an encoded message decodes");
        assert_eq!(again, m, "encode/decode round trip");
    }
}

/// An in-memory [`HubStore`] that keeps what the hub asks to write, so a fuzzed session
/// exercises loads of documents it created.
#[derive(Default)]
pub struct MemStore {
    docs: Mutex<HashMap<DocumentId, (Vec<u8>, crate::store::DocMeta)>>,
    /// The feed's last sequence: each write takes the next one, as in the real store.
    seq: std::sync::atomic::AtomicU64,
}

impl MemStore {
    /// Applies a step's writes (whole documents are re-saved: simple, and enough here). As
    /// in the real store, nothing is written under an erased id again.
    pub fn write(&self, writes: &[DocWrite]) {
        let mut docs = self.docs.lock().expect("not poisoned");
        for w in writes {
            let mut doc = match docs.get(&w.id) {
                Some((_, m)) if m.info.erased => continue,
                Some((bytes, _)) => automerge::Automerge::load(bytes).unwrap_or_default(),
                None => automerge::Automerge::new(),
            };
            if doc.load_incremental(&w.data).is_err() {
                continue;
            }
            let seq = 1 + self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let meta = crate::store::DocMeta {
                info: w.info.clone(),
                heads: doc.get_heads().iter().map(|h| h.to_string()).collect(),
                seq,
                chunks: 0,
                former_sites: Vec::new(),
                former_regions: Vec::new(),
                gone: false,
            };
            docs.insert(w.id, (doc.save(), meta));
        }
    }

    /// Erases a document as [`crate::store::Store::erase`] does: its bytes go, a tombstone
    /// with a new feed sequence stays.
    pub fn erase(&self, id: DocumentId) {
        let mut docs = self.docs.lock().expect("not poisoned");
        if let Some((bytes, meta)) = docs.get_mut(&id) {
            if !meta.info.erased {
                bytes.clear();
                meta.heads.clear();
                meta.info.erased = true;
                meta.seq = 1 + self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    fn meta(&self, id: DocumentId) -> Option<crate::store::DocMeta> {
        let docs = self.docs.lock().expect("not poisoned");
        docs.get(&id).map(|(_, m)| m.clone())
    }

    /// Removes a document and its feed entry, as [`crate::store::Store::remove`] does.
    pub fn remove(&self, id: DocumentId) {
        self.docs.lock().expect("not poisoned").remove(&id);
    }

    /// Handles a step's purges as a tablet does (`relais-client`): a tombstone for an erased
    /// document, nothing left of one that left the tablet's scope.
    fn purge(&self, events: &[Event]) {
        for event in events {
            if let Event::Purge { id, erased, .. } = event {
                if *erased {
                    self.erase(*id);
                } else {
                    self.remove(*id);
                }
            }
        }
    }
}

impl HubStore for MemStore {
    fn load(&self, id: DocumentId) -> Result<Option<StoredDoc>, StoreError> {
        let docs = self.docs.lock().expect("not poisoned");
        // An erased document loads as its tombstone: no changes, the metadata marked erased.
        Ok(docs.get(&id).and_then(|(bytes, meta)| {
            automerge::Automerge::load(bytes).ok().map(|doc| StoredDoc {
                doc,
                meta: meta.clone(),
            })
        }))
    }
    fn changes_since(&self, since: u64, limit: usize) -> Result<Vec<FeedEntry>, StoreError> {
        let docs = self.docs.lock().expect("not poisoned");
        let mut out: Vec<FeedEntry> = docs
            .iter()
            .filter(|(_, (_, m))| m.seq > since)
            .map(|(id, (_, m))| FeedEntry {
                seq: m.seq,
                id: *id,
                meta: m.clone(),
            })
            .collect();
        out.sort_by_key(|e| e.seq);
        out.truncate(limit);
        Ok(out)
    }
    fn heads(&self, id: DocumentId) -> Result<Option<Vec<ChangeHash>>, StoreError> {
        let docs = self.docs.lock().expect("not poisoned");
        Ok(docs.get(&id).map(|(_, m)| m.change_hashes()))
    }
    fn last_seq(&self) -> Result<u64, StoreError> {
        Ok(self.seq.load(std::sync::atomic::Ordering::Relaxed))
    }
    fn stored_bytes(&self, id: DocumentId) -> Result<Option<StoredBytes>, StoreError> {
        let docs = self.docs.lock().expect("not poisoned");
        Ok(docs
            .get(&id)
            .filter(|(_, m)| !m.gone && !m.info.erased)
            .map(|(bytes, m)| StoredBytes {
                heads: m.change_hashes(),
                bytes: bytes.clone(),
            }))
    }
}

/// Feeds a session of frames to a hub: `data` is split into frames, each prefixed by a
/// 2-byte big-endian length, sent alternately by a scoped enumerator and a viewer, to a
/// store holding [`OUTBOUND_DOCS`].
pub fn hub_session(data: &[u8]) {
    let store = MemStore::default();
    // Documents to answer about: a hub holding nothing never reads a peer's bloom filter.
    store.write(&outbound_docs());
    let mut hub = Hub::new(HubConfig::default(), &store);
    let tab = Identity {
        device: "tab".into(),
        role: Role::Enumerator,
        scope: Scope {
            regions: Vec::new(),
            sites: vec!["SOC-01".into()],
        },
        former: None,
    };
    let viewer = Identity {
        role: Role::Viewer,
        device: "viewer".into(),
        ..tab.clone()
    };
    hub.connect(1, tab);
    hub.connect(2, viewer);
    for (turn, frame) in (0u64..).zip(frames(data)) {
        let conn = 1 + turn % 2;
        let step = if frame == ERASE_FRAME {
            erase_household(&store, &mut hub)
        } else {
            hub.receive(conn, frame)
        };
        store.write(&step.writes);
        for (closed, _) in step.closes {
            hub.disconnect(closed);
        }
        hub.evict();
    }
}

/// What the engine does for `DELETE /api/v1/households/{id}`, for the household of
/// [`OUTBOUND_DOCS`].
fn erase_household(store: &MemStore, hub: &mut Hub<&MemStore>) -> Step {
    let id = OUTBOUND_DOCS[0];
    match store.meta(id).map(|m| m.info) {
        Some(info) if !info.erased => {
            store.erase(id);
            hub.purged(id, &info, true)
        }
        _ => Step::default(),
    }
}

/// A frame of a [`hub_session`] that no peer sends: an admin erases the household of
/// [`OUTBOUND_DOCS`] there instead, so that sessions also meet a document erased while they
/// run (and the inputs without it mean what they meant before it existed).
pub const ERASE_FRAME: &[u8] = b"ERASE";

/// The frames of a fuzzed session: each prefixed by a 2-byte big-endian length (the last
/// one cut short where the input ends).
fn frames(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.len() < 2 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let frame = &rest[2..2 + len];
        rest = &rest[2 + len..];
        Some(frame)
    })
}

/// The documents a fuzzed session's store starts with (not yet pushed, in an
/// [`outbound_session`]): a household at SOC-01 and a document of no known kind.
pub const OUTBOUND_DOCS: [DocumentId; 2] = [
    DocumentId::from_bytes([1; 16]),
    DocumentId::from_bytes([2; 16]),
];

/// How many times an [`outbound_session`] opens its connection again after a close.
const OUTBOUND_RECONNECTS: u64 = 3;

/// Feeds a session of frames from a server to a hub's outbound connection, as a tablet or
/// a sub-office meets them; `data` is split as in [`hub_session`]. The store starts with
/// [`OUTBOUND_DOCS`], so the first push goes out from their stored bytes. A closed
/// connection is opened again, from the cursors of the last `Synced`, a few times: a
/// hostile reply must not stop the next session either.
pub fn outbound_session(data: &[u8]) {
    let store = MemStore::default();
    store.write(&outbound_docs());
    let cfg = HubConfig {
        peer_id: "relais-tablet".into(),
        workers: 1,
        ..HubConfig::default()
    };
    let mut hub = Hub::new(cfg, &store);
    let upstream = || Identity::admin("upstream");
    let mut conn = 1;
    let mut cursors = (0, 0, None);
    store.write(&hub.connect_outbound(conn, upstream(), 0, 0, None).writes);
    for frame in frames(data) {
        let step = hub.receive(conn, frame);
        store.write(&step.writes);
        store.purge(&step.events);
        for event in step.events {
            if let Event::Synced {
                remote_cursor,
                local_cursor,
                peer,
                ..
            } = event
            {
                cursors = (remote_cursor, local_cursor, Some(peer));
            }
        }
        if step.closes.iter().any(|(c, _)| *c == conn) {
            hub.disconnect(conn);
            if conn > OUTBOUND_RECONNECTS {
                return;
            }
            conn += 1;
            let (remote, local, peer) = cursors.clone();
            store.write(
                &hub.connect_outbound(conn, upstream(), remote, local, peer)
                    .writes,
            );
        }
        hub.evict();
    }
}

fn outbound_docs() -> Vec<DocWrite> {
    use automerge::transaction::Transactable;
    let contents: [&[(&str, &str)]; 2] = [
        &[
            ("kind", "household"),
            ("site", "SOC-01"),
            ("head_name", "x"),
        ],
        &[("note", "not a record")],
    ];
    OUTBOUND_DOCS
        .iter()
        .zip(contents)
        .map(|(id, fields)| {
            let mut doc = automerge::Automerge::new();
            let mut tx = doc.transaction();
            for (k, v) in fields {
                tx.put(automerge::ROOT, *k, *v)
                    .expect("a fresh map takes a key");
            }
            tx.commit();
            let info = document::describe(&doc, &mut |_| None);
            DocWrite::from_doc(*id, info, &doc, Vec::new())
        })
        .collect()
}

impl HubStore for &MemStore {
    fn load(&self, id: DocumentId) -> Result<Option<StoredDoc>, StoreError> {
        (**self).load(id)
    }
    fn changes_since(&self, since: u64, limit: usize) -> Result<Vec<FeedEntry>, StoreError> {
        (**self).changes_since(since, limit)
    }
    fn heads(&self, id: DocumentId) -> Result<Option<Vec<ChangeHash>>, StoreError> {
        (**self).heads(id)
    }
    fn last_seq(&self) -> Result<u64, StoreError> {
        (**self).last_seq()
    }
    fn stored_bytes(&self, id: DocumentId) -> Result<Option<StoredBytes>, StoreError> {
        (**self).stored_bytes(id)
    }
}
