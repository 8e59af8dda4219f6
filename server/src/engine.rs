//! The sync engine: one thread that owns the [`Hub`], batches inputs, commits their writes
//! in one redb transaction (group commit), then hands the replies to the connections.
//!
//! One thread keeps document state free of locks. Draining up to [`MAX_BATCH`] inputs per
//! round makes one fsync cover many devices' changes under load, while a lone change still
//! commits at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use relais_core::access::Identity;
use relais_core::audit::{AuditAction, AuditEntry};
use relais_core::protocol::hub::{
    advance_cursor, AppliedRound, ConnId, Event, Hub, HubConfig, HubStats, Step,
};
use relais_core::store::Store;
use relais_core::DocumentId;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use crate::metrics::Metrics;
use crate::upstream::{self, Link};

/// Inputs taken per round before committing.
pub const MAX_BATCH: usize = 512;

/// Close codes used on the WebSocket (RFC 6455).
pub mod close_code {
    /// Going away (shutdown).
    pub const AWAY: u16 = 1001;
    /// Protocol error (malformed or out-of-order message).
    pub const PROTOCOL: u16 = 1002;
    /// Policy violation (revoked, text frame, overflow).
    pub const POLICY: u16 = 1008;
    /// Message too big.
    pub const TOO_BIG: u16 = 1009;
    /// Internal error (storage).
    pub const INTERNAL: u16 = 1011;
}

/// What the engine sends to a connection.
#[derive(Debug)]
pub enum Outgoing {
    /// A binary frame.
    Frame(Vec<u8>),
    /// Close the socket with this code and reason.
    Close(u16, String),
}

/// What the engine receives.
pub enum Input {
    /// A device connected and authenticated.
    Connect {
        /// Connection id.
        conn: ConnId,
        /// Who it is.
        identity: Identity,
        /// Where its frames go.
        outbox: mpsc::Sender<Outgoing>,
        /// Bytes in `outbox` not yet written to the socket (the writer subtracts).
        queued: Arc<AtomicUsize>,
        /// Notified when the engine drops the connection: its socket must close even while
        /// its writer is stuck on a peer that does not read.
        kill: Arc<tokio::sync::Notify>,
    },
    /// The link to the upstream server is open: start syncing over it as a client.
    ConnectUpstream {
        /// Connection id.
        conn: ConnId,
        /// The upstream URL (its cursors are saved under it).
        url: String,
        /// Where its frames go.
        outbox: mpsc::Sender<Outgoing>,
        /// Bytes in `outbox` not yet written to the socket.
        queued: Arc<AtomicUsize>,
    },
    /// A binary frame arrived.
    Frame {
        /// Connection id.
        conn: ConnId,
        /// The frame.
        bytes: Vec<u8>,
        /// When it arrived.
        at: Instant,
    },
    /// The socket closed.
    Disconnect {
        /// Connection id.
        conn: ConnId,
    },
    /// A document was written by the admin API: show it to peers.
    Reload {
        /// The document.
        id: DocumentId,
    },
    /// Close every connection of a device (revocation).
    CloseDevice {
        /// Token name.
        device: String,
        /// Reason.
        reason: String,
    },
    /// Erase a household: tombstone it in the store, tell devices to purge it.
    Erase {
        /// The household.
        id: DocumentId,
        /// Token name of the admin, for the audit log.
        by: String,
        /// `Ok(true)` when erased, `Ok(false)` when no such household.
        reply: oneshot::Sender<Result<bool, String>>,
    },
    /// Report counters.
    Stats {
        /// Reply channel.
        reply: oneshot::Sender<HubStats>,
    },
    /// Panics in the round that handles it: what a bug would do (see the tests).
    #[cfg(test)]
    Panic,
    /// Stops the engine thread with a panic outside the rounds' guard: a thread that died
    /// some other way than in a round.
    #[cfg(test)]
    Die,
    /// Holds the engine in the round that takes it, after telling `held`, until `release`
    /// sends or goes: the inputs sent meanwhile wait in the queue, as behind a slow round.
    #[cfg(test)]
    Hold {
        /// Told once the engine holds.
        held: oneshot::Sender<()>,
        /// Ends the hold.
        release: std::sync::mpsc::Receiver<()>,
    },
    /// Fails the next commit, as a full disk would, after the overlap has applied all it
    /// planned (`commit_applying`); `overlapped` then gets how many documents that was.
    #[cfg(test)]
    FailNextCommit {
        /// Documents the overlap had applied when the commit failed.
        overlapped: Arc<AtomicUsize>,
    },
}

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Queued>,
    /// Bytes of frames waiting for the engine thread, at most `bound`.
    bytes: Arc<tokio::sync::Semaphore>,
    /// That bound: a larger frame takes all of it.
    bound: usize,
}

/// Bytes of received frames that may wait for the engine thread, over all connections. The
/// queue's length alone would let 8,192 frames of 16 MiB pile up; past this, readers wait,
/// which pushes back on their sockets.
pub const QUEUED_INPUT_BYTES: usize = 256 * 1024 * 1024;

/// An input on its way to the engine thread, holding its share of [`QUEUED_INPUT_BYTES`]
/// until handled.
struct Queued {
    input: Input,
    _bytes: Option<OwnedSemaphorePermit>,
}

impl Engine {
    /// Starts the engine thread over a store.
    pub fn start(
        store: Arc<Store>,
        cfg: HubConfig,
        send_buffer_bytes: usize,
        metrics: Arc<Metrics>,
        link: Option<Arc<Link>>,
    ) -> (Engine, std::thread::JoinHandle<()>) {
        Self::start_bounded(
            store,
            cfg,
            send_buffer_bytes,
            metrics,
            link,
            QUEUED_INPUT_BYTES,
        )
    }

    /// [`Engine::start`] with `queued_bytes` in place of [`QUEUED_INPUT_BYTES`].
    fn start_bounded(
        store: Arc<Store>,
        cfg: HubConfig,
        send_buffer_bytes: usize,
        metrics: Arc<Metrics>,
        link: Option<Arc<Link>>,
        queued_bytes: usize,
    ) -> (Engine, std::thread::JoinHandle<()>) {
        // A frame's permits are counted in a u32, and a frame takes at least one.
        assert!((1..=u32::MAX as usize).contains(&queued_bytes));
        // Bounded: when the engine falls behind, connection readers wait, which pushes back
        // on the sockets instead of growing memory.
        let (tx, rx) = mpsc::channel(8_192);
        let handle = std::thread::Builder::new()
            .name("relais-engine".into())
            .spawn(move || run(store, cfg, send_buffer_bytes, metrics, link, rx))
            .expect("spawn engine thread");
        let bytes = Arc::new(tokio::sync::Semaphore::new(queued_bytes));
        let engine = Engine {
            tx,
            bytes,
            bound: queued_bytes,
        };
        (engine, handle)
    }

    /// Sends an input; false if the engine has stopped. A frame first waits for room among
    /// the bytes queued for the engine.
    pub async fn send(&self, input: Input) -> bool {
        let bytes = match &input {
            Input::Frame { bytes, .. } => {
                let n = bytes.len().clamp(1, self.bound) as u32;
                match self.bytes.clone().acquire_many_owned(n).await {
                    Ok(p) => Some(p),
                    Err(_) => return false,
                }
            }
            _ => None,
        };
        self.tx
            .send(Queued {
                input,
                _bytes: bytes,
            })
            .await
            .is_ok()
    }

    /// False once the engine thread has stopped: nothing syncs any more.
    pub fn is_running(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Counters from the hub.
    pub async fn stats(&self) -> Option<HubStats> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Input::Stats { reply }).await {
            return None;
        }
        rx.await.ok()
    }
}

struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    device: String,
    queued: Arc<AtomicUsize>,
    /// See [`Input::Connect`]; `None` for the upstream link, whose task ends when `tx` goes.
    kill: Option<Arc<tokio::sync::Notify>>,
}

fn erase(
    store: &Store,
    hub: &mut Hub<Arc<Store>>,
    step: &mut Step,
    id: DocumentId,
    by: &str,
) -> Result<bool, String> {
    match store.erase_household(id, by) {
        Ok(Some((tomb, newly))) => {
            if newly {
                tracing::info!(document = %id, by, "household erased");
                step.absorb(hub.purged(id, &tomb.info, true));
            }
            Ok(true)
        }
        Ok(None) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// The upstream link as the engine sees it.
struct UpstreamConn {
    conn: ConnId,
    url: String,
}

/// What the upstream told this replica to purge: keep a tombstone (erased) or drop the
/// document (it left this server's scope), then tell the local devices that may hold it.
fn purge_from_upstream(
    store: &Store,
    hub: &mut Hub<Arc<Store>>,
    id: DocumentId,
    erased: bool,
) -> (Step, Option<u64>) {
    let info = match store.meta(id) {
        Ok(Some(m)) => m.info,
        Ok(None) => return (Step::default(), None),
        Err(e) => {
            tracing::error!(document = %id, error = %e, "cannot read a document to purge");
            return (Step::default(), None);
        }
    };
    let done = if erased {
        let entry = AuditEntry::now("upstream", AuditAction::Erase, Some(id))
            .with_detail("erased upstream");
        store.erase(id, &[entry]).map(|_| ())
    } else {
        store.forget(id).map(|_| ())
    };
    if let Err(e) = done {
        tracing::error!(document = %id, error = %e, "cannot purge a document");
        return (Step::default(), None);
    }
    tracing::info!(document = %id, erased, "purged at the upstream's request");
    let seq = store.meta(id).ok().flatten().map(|m| m.seq);
    (hub.purged(id, &info, erased), seq)
}

/// Frames received and not handled yet, with their share of the queued bytes.
type Pending = Vec<(ConnId, Vec<u8>, Option<OwnedSemaphorePermit>)>;

/// Hands the pending frames to the hub as one round.
fn flush_frames(hub: &mut Hub<Arc<Store>>, step: &mut Step, frames: &mut Pending) {
    if !frames.is_empty() {
        let round: Vec<(ConnId, &[u8])> = frames.iter().map(|(c, b, _)| (*c, &b[..])).collect();
        step.absorb(hub.receive_all(&round));
        frames.clear();
    }
}

fn run(
    store: Arc<Store>,
    cfg: HubConfig,
    send_buffer_bytes: usize,
    metrics: Arc<Metrics>,
    link: Option<Arc<Link>>,
    mut rx: mpsc::Receiver<Queued>,
) {
    // The commit's overlap applies on all threads but the commit's (`commit_applying`).
    let overlap_threads = cfg.workers.saturating_sub(1).max(1);
    let mut hub = Hub::new(cfg.clone(), store.clone());
    let mut upstream: Option<UpstreamConn> = None;
    let mut outboxes: HashMap<ConnId, Outbox> = HashMap::new();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // Inputs taken while the round before committed, and the documents their leading
    // frames brought, applied meanwhile (see `commit_applying`).
    let mut next: Vec<Queued> = Vec::new();
    let mut applied: Option<AppliedRound> = None;
    #[cfg(test)]
    let mut fail_next_commit: Option<Arc<AtomicUsize>> = None;
    loop {
        if next.is_empty() {
            match rx.blocking_recv() {
                Some(first) => batch.push(first),
                None => break,
            }
        } else {
            batch.append(&mut next);
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(i) => batch.push(i),
                Err(_) => break,
            }
        }
        #[cfg(test)]
        if batch.iter().any(|q| matches!(q.input, Input::Die)) {
            panic!("a test's engine thread dies");
        }
        // A panic anywhere in a round (a bug, or input automerge chokes on that no check
        // caught) must not stop sync for every device while the process looks healthy.
        let round = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut step = Step::default();
            let mut arrivals = Vec::new();
            if let Some(round) = applied.take() {
                // The first frames of the batch, planned and applied during the last commit.
                let planned: Vec<Queued> = batch.drain(..round.len()).collect();
                arrivals.extend(planned.iter().filter_map(|q| match &q.input {
                    Input::Frame { at, .. } => Some(*at),
                    _ => None,
                }));
                step.absorb(hub.receive_applied(round));
                drop(planned);
            }
            // Frames in a row are handed to the hub together, which applies their documents on
            // several threads while it handles them in order (`Hub::receive_all`). Each frame's
            // share of the queued bytes is given back once it has been handled.
            let mut frames: Pending = Vec::new();
            for queued in batch.drain(..) {
                let Queued { input, _bytes } = queued;
                if let Input::Frame { conn, bytes, at } = input {
                    frames.push((conn, bytes, _bytes));
                    arrivals.push(at);
                    continue;
                }
                // Whatever came before this input is handled before it.
                flush_frames(&mut hub, &mut step, &mut frames);
                match input {
                    Input::Connect {
                        conn,
                        identity,
                        outbox,
                        queued,
                        kill,
                    } => {
                        outboxes.insert(
                            conn,
                            Outbox {
                                tx: outbox,
                                device: identity.device.clone(),
                                queued,
                                kill: Some(kill),
                            },
                        );
                        hub.connect(conn, identity);
                    }
                    Input::ConnectUpstream {
                        conn,
                        url,
                        outbox,
                        queued,
                    } => {
                        outboxes.insert(
                            conn,
                            Outbox {
                                tx: outbox,
                                device: "upstream".into(),
                                queued,
                                kill: None,
                            },
                        );
                        let c = upstream::load_cursors(&store, &url);
                        let remote = Identity::admin("upstream");
                        step.absorb(hub.connect_outbound(conn, remote, c.remote, c.local, c.peer));
                        upstream = Some(UpstreamConn { conn, url });
                    }
                    Input::Frame { .. } => unreachable!("frames are gathered above"),
                    Input::Disconnect { conn } => {
                        hub.disconnect(conn);
                        outboxes.remove(&conn);
                        if upstream.as_ref().is_some_and(|u| u.conn == conn) {
                            upstream = None;
                        }
                    }
                    Input::Reload { id } => step.absorb(hub.reload(id)),
                    Input::CloseDevice { device, reason } => {
                        for conn in hub.connections_of(&device) {
                            step.closes.push((conn, reason.clone()));
                            hub.disconnect(conn);
                        }
                    }
                    Input::Erase { id, by, reply } => {
                        let _ = reply.send(erase(&store, &mut hub, &mut step, id, &by));
                    }
                    Input::Stats { reply } => {
                        let _ = reply.send(hub.stats());
                    }
                    #[cfg(test)]
                    Input::Panic => panic!("a test's panic in the engine"),
                    #[cfg(test)]
                    Input::Die => unreachable!("the thread died before the round"),
                    #[cfg(test)]
                    Input::Hold { held, release } => {
                        let _ = held.send(());
                        let _ = release.recv();
                    }
                    #[cfg(test)]
                    Input::FailNextCommit { overlapped } => fail_next_commit = Some(overlapped),
                }
            }
            flush_frames(&mut hub, &mut step, &mut frames);
            // Feed sequences of this round's writes that the upstream already holds (documents
            // it sent, now identical on both sides, and the purges it asked for).
            let mut confirmed_upstream = Vec::new();
            if !step.writes.is_empty() || !step.audit.is_empty() {
                // Sync states this round produced so far (peers that left, documents the upstream
                // confirmed) ride in the same transaction: one flush instead of two.
                let states = hub.take_sync_states();
                #[cfg(test)]
                let failing = fail_next_commit.take();
                #[cfg(test)]
                let apply_all = failing.is_some();
                #[cfg(not(test))]
                let apply_all = false;
                let seqs = {
                    let commit = || {
                        #[cfg(test)]
                        if failing.is_some() {
                            return Err(relais_core::store::StoreError::Closed);
                        }
                        store.commit_with_states(&step.writes, &step.audit, &states)
                    };
                    let (seqs, round) = commit_applying(
                        &mut hub,
                        &mut rx,
                        &mut next,
                        overlap_threads,
                        commit,
                        apply_all,
                    );
                    applied = round;
                    seqs
                };
                #[cfg(test)]
                if let Some(overlapped) = &failing {
                    let n = applied.as_ref().map_or(0, AppliedRound::applied_docs);
                    overlapped.store(n, Ordering::Release);
                }
                if let (Ok(seqs), Some(u)) = (&seqs, &upstream) {
                    confirmed_upstream = seqs
                        .iter()
                        .zip(&step.writes)
                        .filter(|(_, w)| hub.confirmed_by(u.conn, w.id))
                        .map(|(s, _)| *s)
                        .collect();
                }
                if let Err(e) = seqs {
                    // Nothing of this round was acknowledged: forget it, drop everyone, and let
                    // clients resync from what is durable.
                    tracing::error!(error = %e, "commit failed; closing all connections");
                    // The store reopens its file by itself at the next write (redb refuses every
                    // transaction after an I/O error until then), so writes resume once they fit.
                    hub.reset();
                    // What the overlap applied started from documents the reset just forgot, for
                    // connections about to close: the next round handles those frames afresh
                    // (and drops them, their connections gone).
                    applied = None;
                    for (conn, o) in outboxes.drain() {
                        let _ = o.tx.try_send(Outgoing::Close(
                            close_code::INTERNAL,
                            "server storage error; retry later".into(),
                        ));
                        hub.disconnect(conn);
                    }
                    return;
                }
                metrics.changes_merged.inc_by(step.merges);
            }
            // After the commit: what the upstream said is now durable here. The cursors it
            // moves are written once, below, with what this round confirmed.
            let mut synced: Option<upstream::Cursors> = None;
            for event in std::mem::take(&mut step.events) {
                match event {
                    Event::Synced {
                        conn,
                        remote_cursor,
                        local_cursor,
                        peer,
                    } if upstream.as_ref().is_some_and(|u| u.conn == conn) => {
                        synced = Some(upstream::Cursors {
                            peer: Some(peer),
                            remote: remote_cursor,
                            local: local_cursor,
                            at_ms: Some(relais_core::audit::now_ms()),
                        });
                    }
                    Event::Purge { id, erased, .. } => {
                        let (s, seq) = purge_from_upstream(&store, &mut hub, id, erased);
                        step.sends.extend(s.sends);
                        // The tombstone or `gone` record is the upstream's doing: nothing to
                        // push back to it.
                        confirmed_upstream.extend(seq);
                    }
                    Event::Refused { id, reason, .. } => {
                        // Offered again on the next session; the upstream token needs the role
                        // or scope to take it.
                        tracing::warn!(document = %id, %reason, "the upstream refused a change from this server");
                        metrics.upstream_refused.inc();
                    }
                    _ => {}
                }
            }
            if let Some(u) = &upstream {
                save_upstream_cursors(&store, &u.url, synced, &confirmed_upstream);
            }
            if let (Some(l), Some(u)) = (&link, &upstream) {
                l.set_awaiting(hub.awaiting(u.conn));
            }
            let mut overflowed = Vec::new();
            for (conn, frame) in step.sends {
                if let Some(o) = outboxes.get(&conn) {
                    let len = frame.len();
                    let queued = o.queued.load(Ordering::Relaxed);
                    if queued + len > send_buffer_bytes && queued > 0 {
                        overflowed.push(conn);
                        continue;
                    }
                    o.queued.fetch_add(len, Ordering::Relaxed);
                    if o.tx.try_send(Outgoing::Frame(frame)).is_err() {
                        overflowed.push(conn);
                    } else {
                        metrics.bytes_out.inc_by(len as u64);
                    }
                }
            }
            for (conn, reason) in step.closes {
                if let Some(Outbox {
                    tx, device, kill, ..
                }) = outboxes.remove(&conn)
                {
                    tracing::warn!(device = %device, conn, reason = %reason, "closing connection");
                    metrics.connections_dropped.inc();
                    let code = if reason.contains("revoked") {
                        close_code::POLICY
                    } else {
                        close_code::PROTOCOL
                    };
                    let _ = tx.try_send(Outgoing::Close(code, reason));
                    // Closed at once, even behind frames a peer does not read: the connection
                    // gives its writer a moment for the close frame, then drops the socket.
                    if let Some(k) = kill {
                        k.notify_one();
                    }
                }
            }
            overflowed.sort_unstable();
            overflowed.dedup();
            for conn in overflowed {
                // A reader that does not drain must not hold memory or slow the others: its
                // connection task stops its writer (stuck on the full socket) and closes it.
                if let Some(Outbox { device, kill, .. }) = outboxes.remove(&conn) {
                    if let Some(k) = kill {
                        k.notify_one();
                    }
                    tracing::warn!(device = %device, conn, "send queue full; dropping slow connection");
                    metrics.connections_dropped.inc();
                    hub.disconnect(conn);
                }
            }
            hub.evict();
            // What is left: states of a round that wrote nothing, and of documents evicted or
            // connections dropped after the commit.
            let states = hub.take_sync_states();
            if let Err(e) = store.put_sync_states(&states) {
                // Only a cost: the peer's next session starts its exchange from scratch.
                tracing::warn!(error = %e, "could not save sync states");
            }
            let now = Instant::now();
            for at in arrivals {
                metrics
                    .sync_latency
                    .observe(now.duration_since(at).as_secs_f64());
            }
            metrics.loaded_documents.set(hub.loaded_docs() as i64);
        }));
        if let Err(panic) = round {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = %what, "the sync engine panicked; closing all connections and starting again from the store");
            metrics.engine_panics.inc();
            // The hub may be half way through anything: only the store is trusted.
            hub = Hub::new(cfg.clone(), store.clone());
            batch.clear();
            applied = None;
            upstream = None;
            for (_, o) in outboxes.drain() {
                let _ = o.tx.try_send(Outgoing::Close(
                    close_code::INTERNAL,
                    "server error; retry later".into(),
                ));
                if let Some(k) = o.kill {
                    k.notify_one();
                }
            }
        }
    }
    tracing::debug!("engine stopped");
}

/// Commits a round (`commit`, on a thread of its own; it keeps a core busy, so the applying
/// takes `threads`, the others) while the engine takes the inputs
/// already waiting into `next` and applies the documents new to the hub that their leading
/// frames bring ([`Hub::plan_ahead`]): the commit is mostly the file's, and this is work
/// the next round would otherwise do with the other core idle. The applying stops at the
/// first frame after the commit is done, so the round's replies wait for no more than one
/// frame's documents. Nothing is decided here: the next round hands the result to
/// [`Hub::receive_applied`], which handles the frames as [`Hub::receive_all`] would.
/// With `apply_all` (tests only) the applying goes through the frames' documents whatever
/// the commit does, so that a test knows what it overlapped.
fn commit_applying<T: Send>(
    hub: &mut Hub<Arc<Store>>,
    rx: &mut mpsc::Receiver<Queued>,
    next: &mut Vec<Queued>,
    threads: usize,
    commit: impl FnOnce() -> T + Send,
    apply_all: bool,
) -> (T, Option<AppliedRound>) {
    while next.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(i) => next.push(i),
            Err(_) => break,
        }
    }
    let lead: Vec<(ConnId, &[u8])> = next
        .iter()
        .map_while(|q| match &q.input {
            Input::Frame { conn, bytes, .. } => Some((*conn, &bytes[..])),
            _ => None,
        })
        .collect();
    if lead.is_empty() {
        return (commit(), None);
    }
    let plan = hub.plan_ahead(&lead);
    let committed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let committing = scope.spawn(|| {
            let r = commit();
            committed.store(true, Ordering::Release);
            r
        });
        let round = plan.apply(threads, &|| !apply_all && committed.load(Ordering::Acquire));
        match committing.join() {
            Ok(r) => (r, Some(round)),
            // The commit's own panic, as if it had run on this thread.
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// Writes the upstream cursors once for a round: those of a full sync that ended in it, if
/// any, moved over the feed sequences of what this round took from upstream. The hub's
/// cursor at `Synced` is the store's before this round's commit; without the move, those
/// documents would count as not yet confirmed until the next full sync.
fn save_upstream_cursors(
    store: &Store,
    url: &str,
    synced: Option<upstream::Cursors>,
    confirmed: &[u64],
) {
    let in_sync = synced.is_some();
    if !in_sync && confirmed.is_empty() {
        return;
    }
    let mut c = synced.unwrap_or_else(|| upstream::load_cursors(store, url));
    let next = advance_cursor(c.local, confirmed);
    let moved = next > c.local && c.peer.is_some();
    if moved {
        c.local = next;
    }
    if !in_sync && !moved {
        return;
    }
    match upstream::save_cursors(store, url, &c) {
        Err(e) => tracing::warn!(error = %e, "could not save upstream cursors"),
        Ok(()) if in_sync => {
            tracing::info!(
                remote_cursor = c.remote,
                local_cursor = c.local,
                "in sync with upstream"
            )
        }
        Ok(()) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relais_core::household::{parse_members, NewHousehold};
    use relais_core::ledger::{Ledger, Writer};
    use relais_core::protocol::message::{DocMessage, Message, PeerMetadata};
    use relais_core::site::{Site, SiteKind};
    use relais_core::store::StoredBytes;
    use std::time::Duration;

    /// A device's connection to the engine: its outbox, as the WebSocket task holds it.
    async fn connect(engine: &Engine, conn: ConnId) -> mpsc::Receiver<Outgoing> {
        let (outbox, rx) = mpsc::channel(64);
        let connect = Input::Connect {
            conn,
            identity: Identity::admin(format!("tab-{conn}")),
            outbox,
            queued: Arc::new(AtomicUsize::new(0)),
            kill: Arc::new(tokio::sync::Notify::new()),
        };
        assert!(engine.send(connect).await);
        rx
    }

    async fn join(engine: &Engine, conn: ConnId) {
        let join = Message::Join {
            sender_id: format!("tab-{conn}"),
            supported_protocol_versions: vec!["1".into()],
            peer_metadata: PeerMetadata::default(),
        };
        let frame = Input::Frame {
            conn,
            bytes: join.encode(),
            at: Instant::now(),
        };
        assert!(engine.send(frame).await);
    }

    /// Joins the engine thread, failing the test rather than hanging it if it does not end.
    async fn ended(thread: std::thread::JoinHandle<()>) -> std::thread::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !thread.is_finished() {
            assert!(Instant::now() < deadline, "the engine thread ends in time");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        thread.join()
    }

    /// Sends an input, failing the test rather than hanging it if the engine does not take it.
    async fn send(engine: &Engine, input: Input) -> bool {
        tokio::time::timeout(Duration::from_secs(20), engine.send(input))
            .await
            .expect("the engine takes the input in time")
    }

    async fn next(rx: &mut mpsc::Receiver<Outgoing>) -> Outgoing {
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("an answer in time")
            .expect("the outbox is open")
    }

    #[tokio::test]
    async fn a_panic_in_a_round_closes_the_connections_and_the_engine_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path().join("relais.redb")).unwrap());
        let metrics = Arc::new(Metrics::default());
        let (engine, thread) =
            Engine::start(store, HubConfig::default(), 1 << 20, metrics.clone(), None);
        let mut before = connect(&engine, 1).await;
        join(&engine, 1).await;
        assert!(matches!(next(&mut before).await, Outgoing::Frame(_)));

        assert!(engine.send(Input::Panic).await);
        match next(&mut before).await {
            Outgoing::Close(code, reason) => {
                assert_eq!(code, close_code::INTERNAL);
                assert!(reason.contains("retry later"), "{reason}");
            }
            other => panic!("expected a close, got {other:?}"),
        }
        assert_eq!(metrics.engine_panics.get(), 1);

        // The engine still answers, and a device that connects again syncs.
        assert!(engine.is_running());
        assert!(engine.stats().await.is_some());
        let mut after = connect(&engine, 2).await;
        join(&engine, 2).await;
        match next(&mut after).await {
            Outgoing::Frame(f) => {
                assert!(matches!(Message::decode(&f), Ok(Message::Peer { .. })))
            }
            other => panic!("expected the peer reply, got {other:?}"),
        }
        drop(engine);
        ended(thread).await.expect("the engine thread ends cleanly");
    }

    /// A tablet's store with `n` households registered at one site.
    fn tablet_with_households(dir: &std::path::Path, n: usize) -> (Ledger, Vec<DocumentId>) {
        let tablet = Ledger::new(
            Store::open(dir.join("tablet.redb")).unwrap(),
            Writer {
                enumerator: "enum-tab".into(),
                device: "tab".into(),
            },
        )
        .unwrap();
        tablet
            .put_site(&Site {
                code: "SOC-01".into(),
                name: "Socoura".into(),
                kind: SiteKind::OfficialSite,
                admin1: "Mopti".into(),
                admin2: "Mopti".into(),
                admin3: None,
            })
            .unwrap();
        let ids = (0..n)
            .map(|i| {
                tablet
                    .register(NewHousehold {
                        site: "SOC-01".into(),
                        head_name: format!("Household {i}"),
                        members: parse_members("F:34,M:12").unwrap(),
                        ..Default::default()
                    })
                    .unwrap()
            })
            .collect();
        (tablet, ids)
    }

    /// A connection's frame pushing a household whole, as a tablet's first push does: its
    /// stored bytes in one sync message.
    fn push(tablet: &Ledger, conn: ConnId, id: DocumentId) -> Input {
        let StoredBytes { heads, bytes } = tablet.store().stored_bytes(id).unwrap().unwrap();
        let msg = automerge::sync::Message {
            heads,
            need: Vec::new(),
            have: Vec::new(),
            changes: automerge::sync::ChunkList::from(bytes),
            flags: None,
            version: automerge::sync::MessageVersion::V2,
        };
        let frame = Message::Sync(DocMessage {
            sender_id: format!("tab-{conn}"),
            target_id: HubConfig::default().peer_id,
            document_id: id.to_string(),
            data: msg.encode(),
        });
        Input::Frame {
            conn,
            bytes: frame.encode(),
            at: Instant::now(),
        }
    }

    fn assert_closed_for_storage(out: Outgoing) {
        match out {
            Outgoing::Close(code, reason) => {
                assert_eq!(code, close_code::INTERNAL);
                assert!(reason.contains("storage error"), "{reason}");
            }
            other => panic!("expected a close, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_commit_that_fails_while_the_next_round_is_applied_ahead_loses_nothing_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (tablet, ids) = tablet_with_households(dir.path(), 3);
        let store = Arc::new(Store::open(dir.path().join("relais.redb")).unwrap());
        let metrics = Arc::new(Metrics::default());
        let cfg = HubConfig {
            workers: 2,
            ..HubConfig::default()
        };
        let (engine, thread) = Engine::start(store.clone(), cfg, 1 << 20, metrics, None);
        let mut one = connect(&engine, 1).await;
        let mut two = connect(&engine, 2).await;
        for conn in [1, 2] {
            join(&engine, conn).await;
        }
        assert!(matches!(next(&mut one).await, Outgoing::Frame(_)));
        assert!(matches!(next(&mut two).await, Outgoing::Frame(_)));

        // While the engine is held, queue a round that writes (one household from the first
        // tablet) and fills the batch, then a frame that only fits in the next round: it is
        // what the overlap applies while the first round's commit fails.
        let release = hold(&engine).await;
        let overlapped = Arc::new(AtomicUsize::new(usize::MAX));
        let fail = Input::FailNextCommit {
            overlapped: overlapped.clone(),
        };
        assert!(engine.send(fail).await);
        assert!(engine.send(push(&tablet, 1, ids[0])).await);
        for _ in 2..MAX_BATCH {
            let (reply, _) = oneshot::channel();
            assert!(engine.send(Input::Stats { reply }).await);
        }
        assert!(engine.send(push(&tablet, 2, ids[1])).await);
        release.send(()).unwrap();

        // Both tablets are told to retry; nothing of either household is in the store.
        assert_closed_for_storage(next(&mut one).await);
        assert_closed_for_storage(next(&mut two).await);
        assert_eq!(
            overlapped.load(Ordering::Acquire),
            1,
            "the second tablet's household was applied during the failed commit"
        );
        assert!(store.load(ids[0]).unwrap().is_none());
        assert!(store.load(ids[1]).unwrap().is_none());

        // The engine goes on from what is durable, not from what the failed round held in
        // memory: a tablet that connects again pushes both households, then another, and
        // each is stored whole (a hub that still held the first would take it as known).
        let mut again = connect(&engine, 3).await;
        join(&engine, 3).await;
        assert!(matches!(next(&mut again).await, Outgoing::Frame(_)));
        for &id in &ids {
            assert!(engine.send(push(&tablet, 3, id)).await);
            assert!(matches!(next(&mut again).await, Outgoing::Frame(_)));
            let stored = store.load(id).unwrap().expect("stored after the retry");
            let sent = tablet.store().load(id).unwrap().unwrap();
            assert_eq!(stored.doc.get_heads(), sent.doc.get_heads());
        }
        drop(engine);
        ended(thread).await.expect("the engine thread ends cleanly");
    }

    /// Holds the engine until the returned sender sends or goes.
    async fn hold(engine: &Engine) -> std::sync::mpsc::Sender<()> {
        let (held, is_held) = oneshot::channel();
        let (release, on_release) = std::sync::mpsc::channel();
        let hold = Input::Hold {
            held,
            release: on_release,
        };
        assert!(engine.send(hold).await);
        is_held.await.unwrap();
        release
    }

    fn frame(len: usize) -> Input {
        Input::Frame {
            conn: 99,
            bytes: vec![0xA5; len],
            at: Instant::now(),
        }
    }

    #[tokio::test]
    async fn readers_wait_once_the_frames_queued_for_the_engine_reach_the_byte_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path().join("relais.redb")).unwrap());
        let metrics = Arc::new(Metrics::default());
        let bound = 1 << 20;
        let (engine, thread) =
            Engine::start_bounded(store, HubConfig::default(), 1 << 20, metrics, None, bound);
        let release = hold(&engine).await;
        // Under the bound, frames are queued at once, whatever their number.
        assert!(send(&engine, frame(600 << 10)).await);
        for _ in 0..3 {
            assert!(send(&engine, frame(100 << 10)).await);
        }
        // One more would pass it: its reader waits, and so does a frame larger than the whole
        // bound, behind it.
        let e = engine.clone();
        let over = tokio::spawn(async move { e.send(frame(200 << 10)).await });
        let e = engine.clone();
        let huge = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            e.send(frame(3 << 20)).await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!over.is_finished(), "a frame past the bound waits");
        assert!(!huge.is_finished());

        // Once the engine has handled the queued frames, their bytes are free again.
        release.send(()).unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(20), async {
            (over.await.unwrap(), huge.await.unwrap())
        })
        .await
        .expect("the waiting readers go on once the engine drains the queue");
        assert_eq!(waited, (true, true));
        assert!(engine.stats().await.is_some());
        drop(engine);
        ended(thread).await.expect("the engine thread ends cleanly");
    }

    #[tokio::test]
    async fn an_engine_thread_that_died_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path().join("relais.redb")).unwrap());
        let metrics = Arc::new(Metrics::default());
        let (engine, thread) = Engine::start(store, HubConfig::default(), 1 << 20, metrics, None);
        let mut before = connect(&engine, 1).await;
        assert!(engine.is_running());
        assert!(engine.send(Input::Die).await);
        assert!(ended(thread).await.is_err(), "the thread panicked");
        assert!(!engine.is_running());
        assert!(engine.stats().await.is_none());
        // The device's outbox went with the thread: its connection ends.
        assert!(before.recv().await.is_none());
        assert!(!engine.send(Input::Disconnect { conn: 1 }).await);
    }
}
