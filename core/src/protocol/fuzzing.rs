//! Entry points shared by the cargo-fuzz targets in `fuzz/` and the stable test that
//! replays their corpus (`core/tests/fuzz_corpus.rs`), so CI exercises every saved input
//! without a nightly toolchain.
//!
//! Each function must never panic, whatever the bytes.

use std::collections::HashMap;
use std::sync::Mutex;

use automerge::ChangeHash;

use super::hub::{Hub, HubConfig, HubStore};
use super::message::Message;
use crate::access::{Identity, Role, Scope};
use crate::store::{DocWrite, FeedEntry, StoreError, StoredDoc};
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
}

impl MemStore {
    /// Applies a step's writes (whole documents are re-saved: simple, and enough here).
    pub fn write(&self, writes: &[DocWrite]) {
        let mut docs = self.docs.lock().expect("not poisoned");
        for w in writes {
            let mut doc = match docs.get(&w.id) {
                Some((bytes, _)) => automerge::Automerge::load(bytes).unwrap_or_default(),
                None => automerge::Automerge::new(),
            };
            if doc.load_incremental(&w.data).is_err() {
                continue;
            }
            let seq = docs.len() as u64 + 1;
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
}

impl HubStore for MemStore {
    fn load(&self, id: DocumentId) -> Result<Option<StoredDoc>, StoreError> {
        let docs = self.docs.lock().expect("not poisoned");
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
        Ok(self.docs.lock().expect("not poisoned").len() as u64)
    }
}

/// Feeds a session of frames to a hub: `data` is split into frames, each prefixed by a
/// 2-byte big-endian length, sent alternately by a scoped enumerator and a viewer.
pub fn hub_session(data: &[u8]) {
    let store = MemStore::default();
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
    let mut rest = data;
    let mut turn = 0u64;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let frame = &rest[2..2 + len];
        rest = &rest[2 + len..];
        let conn = 1 + turn % 2;
        turn += 1;
        let step = hub.receive(conn, frame);
        store.write(&step.writes);
        for (closed, _) in step.closes {
            hub.disconnect(closed);
        }
        hub.evict();
    }
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
}
