//! # relais-client
//!
//! The offline replica a tablet app embeds. Enumerators register households and record
//! distributions with no network; [`Replica::sync`] (or the background [`Replica::start_sync`])
//! sends everything to a Relais server when a link is up and brings back what others did.
//! The app never writes merge code: concurrent edits merge field by field, true conflicts and
//! double handouts are kept and shown.
//!
//! - Every write is durable in the local redb file before the call returns.
//! - A sync returns only once the server has durably committed everything this replica sent.
//! - A dropped link loses nothing: the next sync resends only what the server lacks, and with
//!   a Relais server (fast-reconnect extension) a replica with nothing new reconnects with one
//!   small request and one small reply, whatever the number of documents.
//! - Against a stock automerge-repo sync server the base protocol is used instead.
//!
//! ## Example
//!
//! Open a replica, register offline, and sync. Here no server is listening, as in the field:
//! the sync fails with a network error, and the registration is safe on the tablet until the
//! next sync finds a link.
//!
//! ```
//! use relais_client::{ClientError, Replica, Writer};
//! use relais_core::household::{parse_members, NewHousehold};
//! use relais_core::site::{Site, SiteKind};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), ClientError> {
//! # let dir = tempfile::tempdir().unwrap();
//! let replica = Replica::open(dir.path().join("tablet"), Writer {
//!     enumerator: "e-07".into(),
//!     device: "tab-mopti-07".into(),
//! })?;
//! // Normally received at the office by a first sync; created here to stay offline.
//! replica.ledger().put_site(&Site { code: "SOC-01".into(), name: "Socoura".into(),
//!     kind: SiteKind::OfficialSite, admin1: "Mopti".into(), admin2: "Mopti".into(), admin3: None })?;
//!
//! let hh = replica.ledger().register(NewHousehold {
//!     site: "SOC-01".into(),
//!     head_name: "Aminata Traoré".into(),
//!     members: parse_members("F:34,M:12,F:7").unwrap(),
//!     ..Default::default()
//! })?;
//! assert_eq!(replica.status()?.pending_documents, 2);
//!
//! match replica.sync("ws://127.0.0.1:9/sync", "rls_token").await {
//!     Ok(summary) => println!("sent {} documents", summary.documents_sent),
//!     Err(ClientError::Network(e)) => println!("offline ({e}); will retry"),
//!     Err(other) => return Err(other),
//! }
//! assert_eq!(replica.ledger().household(hh)?.household.head_name, "Aminata Traoré");
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod error;
mod session;
mod tls;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use relais_core::ledger::Ledger;
pub use relais_core::ledger::Writer;
use relais_core::store::Store;
use relais_core::DocumentId;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch, Notify};

pub use error::ClientError;
pub use session::{connect_within, send_budget, RefusedDocument, SyncSummary, WsConnection};
pub use tls::TlsTrust;

/// Something that changed in the replica because of a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplicaEvent {
    /// A document received changes from the server.
    DocumentChanged(DocumentId),
    /// A document was removed here at the server's request (erased or out of scope).
    DocumentPurged(DocumentId),
    /// The server refused this replica's changes to a document; they stay here, and the
    /// next sync offers them again.
    DocumentRefused {
        /// The document.
        id: DocumentId,
        /// The server's reason (see [`RefusedDocument::reason`]).
        reason: String,
    },
    /// A sync completed.
    Synced(SyncSummary),
}

/// What an app can show about syncing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// Documents changed locally and not yet confirmed by the last server synced with.
    pub pending_documents: u64,
    /// When the last sync completed (Unix milliseconds).
    pub last_sync_ms: Option<i64>,
    /// The server of the last sync.
    pub last_server: Option<String>,
    /// A background sync is connected right now.
    pub connected: bool,
}

/// Where a replica left off with one server.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Cursors {
    pub peer: Option<String>,
    pub remote: u64,
    pub local: u64,
    pub at_ms: Option<i64>,
}

const LAST_SERVER_KEY: &str = "client:last-server";
const PEER_KEY: &str = "client:peer-id";

/// A local replica. Cheap to share behind an `Arc`.
pub struct Replica {
    ledger: Ledger,
    dir: PathBuf,
    peer_id: String,
    events: broadcast::Sender<ReplicaEvent>,
    connected: Mutex<bool>,
    local_write: Arc<Notify>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("dir", &self.dir).finish()
    }
}

/// The server URL without its query (where a token may sit), used as a key and in logs.
pub(crate) fn server_key(url: &str) -> String {
    url.split('?').next().unwrap_or(url).to_string()
}

impl Replica {
    /// Opens or creates the replica in directory `dir` (file `replica.redb` inside),
    /// writing as `writer`.
    pub fn open(dir: impl AsRef<Path>, writer: Writer) -> Result<Self, ClientError> {
        let dir = dir.as_ref().to_path_buf();
        let mut store = Store::open(dir.join("replica.redb"))?;
        if store.compact_pending()? {
            // Households erased at the server were purged here during an earlier session;
            // rewrite the file so none of their bytes stay on the tablet's disk.
            store.compact_file()?;
        }
        let peer_id = match store.get_meta(PEER_KEY)? {
            Some(p) => String::from_utf8_lossy(&p).to_string(),
            None => {
                let p = format!("relais-replica-{}", DocumentId::random());
                store.put_meta(PEER_KEY, p.as_bytes())?;
                p
            }
        };
        let ledger = Ledger::new(store, writer)?;
        let (events, _) = broadcast::channel(1_024);
        Ok(Replica {
            ledger,
            dir,
            peer_id,
            events,
            connected: Mutex::new(false),
            local_write: Arc::new(Notify::new()),
        })
    }

    /// The typed domain operations (register, update, distribute, list, look up,
    /// conflicts, double handouts). Every write is durable when it returns. A running
    /// background sync notices writes within a second; [`Replica::wrote`] makes it push at
    /// once.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Tells a running background sync that local writes happened.
    pub fn wrote(&self) {
        self.local_write.notify_one();
    }

    /// The directory of the replica.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This replica's peer id on the wire.
    pub fn peer_id(&self) -> &str {
        &self.peer_id
    }

    /// Subscribes to changes brought by syncs.
    pub fn subscribe(&self) -> broadcast::Receiver<ReplicaEvent> {
        self.events.subscribe()
    }

    pub(crate) fn cursors(&self, url: &str) -> Cursors {
        let key = format!("client:cursor:{}", server_key(url));
        self.ledger
            .store()
            .get_meta(&key)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub(crate) fn save_cursors(&self, url: &str, c: &Cursors) -> Result<(), ClientError> {
        let key = format!("client:cursor:{}", server_key(url));
        let store = self.ledger.store();
        store.put_meta(&key, &serde_json::to_vec(c).expect("cursors serialise"))?;
        store.put_meta(LAST_SERVER_KEY, server_key(url).as_bytes())?;
        Ok(())
    }

    pub(crate) fn emit(&self, e: ReplicaEvent) {
        let _ = self.events.send(e);
    }

    pub(crate) fn set_connected(&self, c: bool) {
        *self.connected.lock().expect("not poisoned") = c;
    }

    /// Sync status: pending local changes, last sync, connection.
    pub fn status(&self) -> Result<SyncStatus, ClientError> {
        let store = self.ledger.store();
        let last_server = store
            .get_meta(LAST_SERVER_KEY)?
            .map(|b| String::from_utf8_lossy(&b).to_string());
        let cursors = last_server
            .as_deref()
            .map(|s| self.cursors(s))
            .unwrap_or_default();
        let pending = relais_core::protocol::hub::unconfirmed_since(
            store,
            cursors.local,
            cursors.peer.as_deref(),
            usize::MAX,
        )?
        .len() as u64;
        Ok(SyncStatus {
            pending_documents: pending,
            last_sync_ms: cursors.at_ms,
            last_server,
            connected: *self.connected.lock().expect("not poisoned"),
        })
    }

    /// Runs one sync with the server at `url` (e.g. `ws://host:7373/sync`) to completion:
    /// returns once the server has committed everything this replica sent and this replica
    /// holds everything the server has for it.
    pub async fn sync(&self, url: &str, token: &str) -> Result<SyncSummary, ClientError> {
        self.sync_with(url, token, &SyncOptions::default()).await
    }

    /// [`Replica::sync`] with options (progress, timeouts, frame limit).
    pub async fn sync_with(
        &self,
        url: &str,
        token: &str,
        opts: &SyncOptions,
    ) -> Result<SyncSummary, ClientError> {
        session::run(self, url, token, opts, None).await
    }

    /// Starts syncing in the background: connects whenever possible, stays connected and
    /// pushes local writes shortly after [`Replica::wrote`], reconnects with exponential
    /// backoff and jitter, and stops cleanly with [`BackgroundSync::stop`].
    pub fn start_sync(
        self: &Arc<Self>,
        url: &str,
        token: &str,
        opts: SyncOptions,
    ) -> BackgroundSync {
        let (stop_tx, stop_rx) = watch::channel(false);
        let replica = self.clone();
        let url = url.to_string();
        let token = token.to_string();
        let task = tokio::spawn(async move {
            let mut backoff = opts.min_backoff;
            let mut stop = stop_rx;
            loop {
                if *stop.borrow() {
                    break;
                }
                let live = session::Live {
                    stop: stop.clone(),
                    local_write: replica.local_write.clone(),
                };
                match session::run(&replica, &url, &token, &opts, Some(live)).await {
                    Ok(_) => backoff = opts.min_backoff,
                    Err(ClientError::Stopped) => break,
                    Err(e) => {
                        tracing::info!(server = %server_key(&url), error = %e, "sync failed; retrying");
                    }
                }
                replica.set_connected(false);
                let jitter = rand::random::<f64>() * 0.5 + 0.75;
                let wait = backoff.mul_f64(jitter);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => break,
                }
                backoff = (backoff * 2).min(opts.max_backoff);
            }
            replica.set_connected(false);
        });
        BackgroundSync {
            stop: stop_tx,
            task,
        }
    }
}

/// Options of a sync.
#[derive(Clone)]
pub struct SyncOptions {
    /// Give up when the server says nothing for this long (connecting included), or takes
    /// nothing we send for this long plus a second per KiB sent (a link that went dead
    /// without a reset). A background sync that is connected and idle pings the server when
    /// it has heard nothing for half of this, and reconnects once nothing at all, pongs
    /// included, came for all of it: [`SyncStatus::connected`] turns false on a dead route
    /// instead of staying true.
    pub idle_timeout: Duration,
    /// Largest frame accepted from the server.
    pub max_frame_bytes: usize,
    /// Called with (documents left to sync, documents done) as a sync progresses.
    pub progress: Option<Arc<dyn Fn(usize, usize) + Send + Sync>>,
    /// First retry delay of a background sync.
    pub min_backoff: Duration,
    /// Longest retry delay of a background sync.
    pub max_backoff: Duration,
    /// How long a background sync waits after a local write before pushing, to batch writes.
    pub push_delay: Duration,
    /// Which server certificates to accept on `wss://`.
    pub tls: TlsTrust,
    /// Threads that apply the documents of one batch from the server at once, so that a
    /// fresh tablet's download uses its cores; 1 applies them one by one. Defaults to the
    /// cores available, at most 8.
    pub workers: usize,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            idle_timeout: Duration::from_secs(60),
            max_frame_bytes: 16 * 1024 * 1024,
            progress: None,
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            push_delay: Duration::from_millis(200),
            tls: TlsTrust::default(),
            workers: relais_core::protocol::hub::HubConfig::default().workers,
        }
    }
}

impl std::fmt::Debug for SyncOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncOptions")
            .field("idle_timeout", &self.idle_timeout)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("workers", &self.workers)
            .finish()
    }
}

/// A running background sync.
pub struct BackgroundSync {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl BackgroundSync {
    /// Stops syncing: closes the connection cleanly and waits for the task.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
