//! One sync session over a WebSocket: the adapter around relais-core's hub.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use relais_core::access::Identity;
use relais_core::protocol::hub::{advance_cursor, ConnId, Event, Hub, HubConfig, Step};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

use crate::{now_ms, server_key, ClientError, Cursors, Replica, ReplicaEvent, SyncOptions};

const CONN: ConnId = 1;

/// Frames already received that one step (and one commit) may cover.
const GROUP_FRAMES: usize = 256;

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncSummary {
    /// The server (URL without its query).
    pub server: String,
    /// Documents with local changes since the last sync, pushed to the server and accepted
    /// (those it refused are in [`SyncSummary::documents_refused`]).
    pub documents_sent: usize,
    /// Documents that received changes from the server.
    pub documents_received: usize,
    /// Documents removed at the server's request.
    pub documents_purged: usize,
    /// Documents whose local changes the server refused, and why. They stay on this replica
    /// and count in [`crate::SyncStatus::pending_documents`]: the next sync offers them
    /// again, so once the token has the right role or scope they go through.
    #[serde(default)]
    pub documents_refused: Vec<RefusedDocument>,
    /// Frames sent.
    pub frames_sent: usize,
    /// Frames received.
    pub frames_received: usize,
    /// Bytes sent in frames.
    pub bytes_sent: u64,
    /// Bytes received in frames.
    pub bytes_received: u64,
    /// Milliseconds from connecting to completion.
    pub elapsed_ms: u64,
    /// The server speaks Relais's fast-reconnect extension.
    pub extension: bool,
}

/// A document whose local changes the server refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedDocument {
    /// The document.
    pub id: relais_core::DocumentId,
    /// The server's reason: "read-only device" (the token's role may not write), "out of
    /// scope" (the document, or what the change makes of it, is outside the token's sites
    /// and regions), "sites and campaigns are written by managers" (an enumerator's token
    /// writes households only) or "erased".
    pub reason: String,
}

/// The slowest link a send is given time for: 1 KiB/s, a fifth of a poor 2G link.
const SLOWEST_LINK_BYTES_PER_SEC: usize = 1024;

/// How long sending `bytes` may take before the peer counts as gone: `idle` plus a second per
/// KiB, so that a dead route is noticed and a slow but live 2G link is not cut.
pub fn send_budget(idle: Duration, bytes: usize) -> Duration {
    idle + Duration::from_secs((bytes / SLOWEST_LINK_BYTES_PER_SEC) as u64)
}

/// A WebSocket connected to `req`, or `None` when no answer came within `limit`: a route
/// that takes the connection and then says nothing (a dead 2G route, a captive portal)
/// would otherwise hold the caller, and its retries, for good. Shared by relais-client and
/// a server's upstream link.
pub async fn connect_within(
    req: tungstenite::handshake::client::Request,
    cfg: WebSocketConfig,
    connector: Option<tokio_tungstenite::Connector>,
    limit: Duration,
) -> Option<Result<WsConnection, tungstenite::Error>> {
    // `true`: no Nagle delay on small sync frames.
    let connect = tokio_tungstenite::connect_async_tls_with_config(req, Some(cfg), true, connector);
    let connected = tokio::time::timeout(limit, connect).await.ok()?;
    Some(connected.map(|(ws, _)| ws))
}

/// A client WebSocket, plain or TLS.
pub type WsConnection =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What one session has done, to tell its own writes from the app's.
#[derive(Default)]
struct Progress {
    /// Documents that received changes from the server.
    received: HashSet<relais_core::DocumentId>,
    /// The app's writes up to this feed sequence have been offered to the server.
    offered: u64,
}

/// Background mode: stay connected and push local writes.
pub(crate) struct Live {
    pub stop: watch::Receiver<bool>,
    pub local_write: Arc<Notify>,
}

fn connect_error(e: tungstenite::Error) -> ClientError {
    match e {
        tungstenite::Error::Http(resp) => {
            let status = resp.status();
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            if status.as_u16() == 401 || status.as_u16() == 403 || status.as_u16() == 429 {
                ClientError::Auth(format!("{status}: {body}"))
            } else {
                ClientError::Protocol(format!("server answered {status}: {body}"))
            }
        }
        tungstenite::Error::Tls(e) => ClientError::Tls(e.to_string()),
        tungstenite::Error::Io(e)
            if e.get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) =>
        {
            ClientError::Tls(e.to_string())
        }
        other => ClientError::Network(other.to_string()),
    }
}

pub(crate) async fn run(
    replica: &Replica,
    url: &str,
    token: &str,
    opts: &SyncOptions,
    live: Option<Live>,
) -> Result<SyncSummary, ClientError> {
    let started = Instant::now();
    let mut req = url
        .into_client_request()
        .map_err(|e| ClientError::Network(format!("bad server URL {}: {e}", server_key(url))))?;
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}").parse().map_err(|_| {
            ClientError::Auth("token has characters not allowed in a header".into())
        })?,
    );
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(opts.max_frame_bytes))
        .max_frame_size(Some(opts.max_frame_bytes));
    let connector = if url.starts_with("wss:") {
        Some(tokio_tungstenite::Connector::Rustls(
            opts.tls.client_config()?,
        ))
    } else {
        None
    };
    let ws = connect_within(req, cfg, connector, opts.idle_timeout)
        .await
        .ok_or_else(|| {
            ClientError::Network(format!(
                "{} did not answer within {} s",
                server_key(url),
                opts.idle_timeout.as_secs_f64()
            ))
        })?
        .map_err(connect_error)?;
    let (mut sink, mut stream) = ws.split();
    let store = replica.ledger().store_arc();
    let mut hub = Hub::new(
        HubConfig {
            // A new peer id per session: servers that keep per-peer sync state in memory
            // across reconnects (automerge-repo 1.x) would otherwise reuse state from a
            // session whose last messages were lost, and never resend them. The storage id
            // stays stable.
            peer_id: format!("{}-{}", replica.peer_id(), rand::random::<u32>()),
            storage_id: Some(replica.peer_id().to_string()),
            // A tablet syncs every document it holds; do not evict mid-sync.
            max_loaded_docs: usize::MAX / 2,
            workers: opts.workers.max(1),
            ..HubConfig::default()
        },
        store.clone(),
    );
    let cursors = replica.cursors(url);
    let mut summary = SyncSummary {
        server: server_key(url),
        ..Default::default()
    };
    // Documents with local changes the server may lack: those written since the last sync
    // that it has not confirmed (as `Replica::status` counts them).
    let pushing: HashSet<relais_core::DocumentId> = relais_core::protocol::hub::unconfirmed_since(
        store.as_ref(),
        cursors.local,
        cursors.peer.as_deref(),
        usize::MAX,
    )?
    .into_iter()
    .collect();
    let mut progress = Progress {
        offered: store.last_seq()?,
        ..Default::default()
    };
    let mut last_progress = Instant::now();
    // When the server last sent anything at all, pongs included.
    let mut last_heard = Instant::now();
    let mut local_poll = tokio::time::interval(Duration::from_secs(1));
    local_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A frame read while gathering a batch that must be handled after it.
    let mut deferred: Option<WsResult> = None;
    let mut step = hub.connect_outbound(
        CONN,
        Identity::admin("server"),
        cursors.remote,
        cursors.local,
        cursors.peer.clone(),
    );
    loop {
        let handling = Instant::now();
        let done = handle(
            replica,
            url,
            &mut hub,
            step,
            &mut summary,
            &pushing,
            &mut progress,
            &mut sink,
            started,
            opts,
        )
        .await?;
        // Nothing is read while a step is stored and sent (a big frame on a slow link takes
        // a while): that time is not the server's silence.
        last_progress += handling.elapsed();
        last_heard += handling.elapsed();
        if done {
            if live.is_none() {
                close(&mut sink).await;
                return Ok(summary);
            }
            replica.set_connected(true);
        }
        let live_idle = live.is_some() && hub.awaiting(CONN) == 0;
        let wait = if live_idle {
            // Connected and idle: wait for the server or for local writes, pinging now and
            // then so that a route that died without a reset is noticed (any server answers
            // a ping) instead of the tablet showing "connected" on a dead link.
            (opts.idle_timeout / 4).max(Duration::from_millis(10))
        } else {
            // Pings do not count as progress: a server that only pings is stalled.
            opts.idle_timeout.saturating_sub(last_progress.elapsed())
        };
        let (local_write, mut stop) = match &live {
            Some(l) => (Some(l.local_write.clone()), Some(l.stop.clone())),
            None => (None, None),
        };
        if let Some(msg) = deferred.take() {
            step = next_step(&mut hub, Ok(msg), &mut summary)?;
            continue;
        }
        step = tokio::select! {
            msg = tokio::time::timeout(wait, stream.next()) => match msg {
                Err(_) if live_idle => {
                    keep_alive(&mut sink, last_heard, opts).await?;
                    Step::default()
                }
                msg => {
                    // On a timeout outside a live session's idle wait, `next_step` fails.
                    last_heard = Instant::now();
                    let binary = matches!(msg, Ok(Some(Ok(WsMessage::Binary(_)))));
                    let mut s = next_step(&mut hub, msg, &mut summary)?;
                    if binary {
                        last_progress = Instant::now();
                        // Group commit: take every frame already received, so that one durable
                        // commit covers all of them (a fresh tablet receives thousands of
                        // documents, and a commit per frame would cost a disk flush each).
                        for _ in 1..GROUP_FRAMES {
                            match stream.next().now_or_never() {
                                Some(Some(Ok(WsMessage::Binary(b)))) => s.absorb(next_step(
                                    &mut hub,
                                    Ok(Some(Ok(WsMessage::Binary(b)))),
                                    &mut summary,
                                )?),
                                // A close, an error or a control frame: after this batch.
                                Some(other) => {
                                    deferred = Some(other);
                                    break;
                                }
                                None => break,
                            }
                        }
                    }
                    s
                }
            },
            _ = wait_local(local_write.as_deref(), &store, progress.offered, &mut local_poll) => {
                tokio::time::sleep(opts.push_delay).await;
                let mut s = Step::default();
                for e in store.changes_since(progress.offered, usize::MAX)? {
                    progress.offered = progress.offered.max(e.seq);
                    let r = hub.reload(e.id);
                    s.writes.extend(r.writes);
                    s.sends.extend(r.sends);
                    s.closes.extend(r.closes);
                    s.events.extend(r.events);
                }
                s
            }
            _ = wait_stop(stop.as_mut()) => {
                close(&mut sink).await;
                return Err(ClientError::Stopped);
            }
        };
    }
}

/// On a live session's quiet link: fails once nothing at all was heard from the server for
/// the idle timeout (a route that died without a reset), else pings it if nothing was heard
/// for half of it, so that a live server has something to answer. A Relais server also
/// pings a quiet link (every 75 s by default), which spares some of the tablet's: on mobile
/// data, each ping and pong costs some 60 bytes of headers.
async fn keep_alive<S>(
    sink: &mut S,
    last_heard: Instant,
    opts: &SyncOptions,
) -> Result<(), ClientError>
where
    S: futures_util::Sink<WsMessage, Error = tungstenite::Error> + Unpin,
{
    let idle = opts.idle_timeout;
    if last_heard.elapsed() >= idle {
        return Err(ClientError::Network(format!(
            "the server went silent: nothing heard for {} s",
            idle.as_secs_f64()
        )));
    }
    if last_heard.elapsed() < idle / 2 {
        return Ok(());
    }
    match tokio::time::timeout(idle, sink.send(WsMessage::Ping(Vec::new().into()))).await {
        Ok(r) => r.map_err(|e| ClientError::Network(e.to_string())),
        Err(_) => Err(ClientError::Network(format!(
            "the server took nothing for {} s",
            idle.as_secs_f64()
        ))),
    }
}

/// Sends a close frame, giving up after a few seconds: on a dead route it would never leave.
async fn close<S>(sink: &mut S)
where
    S: futures_util::Sink<WsMessage, Error = tungstenite::Error> + Unpin,
{
    let _ = tokio::time::timeout(Duration::from_secs(5), sink.send(WsMessage::Close(None))).await;
}

/// Resolves when local writes need pushing: at once on [`Replica::wrote`], or within a
/// second when the app wrote without saying so.
/// `poll` lives across the session's loop: a wait rebuilt more often than once a second (a
/// short idle timeout's keep-alive) must not restart the second each time.
async fn wait_local(
    n: Option<&Notify>,
    store: &relais_core::store::Store,
    seen: u64,
    poll: &mut tokio::time::Interval,
) {
    let Some(n) = n else {
        return std::future::pending().await;
    };
    let poll = async {
        loop {
            poll.tick().await;
            if store.last_seq().map(|s| s > seen).unwrap_or(false) {
                return;
            }
        }
    };
    tokio::select! {
        _ = n.notified() => {}
        _ = poll => {}
    }
}

async fn wait_stop(stop: Option<&mut watch::Receiver<bool>>) {
    match stop {
        Some(s) => {
            let _ = s.wait_for(|v| *v).await;
        }
        None => std::future::pending().await,
    }
}

type WsResult = Option<Result<WsMessage, tungstenite::Error>>;

fn next_step(
    hub: &mut Hub<Arc<relais_core::store::Store>>,
    msg: Result<WsResult, tokio::time::error::Elapsed>,
    summary: &mut SyncSummary,
) -> Result<Step, ClientError> {
    match msg {
        Err(_) => Err(ClientError::Network("the server went silent".into())),
        Ok(None) => Err(ClientError::Network("connection closed".into())),
        Ok(Some(Err(e))) => Err(ClientError::Network(e.to_string())),
        Ok(Some(Ok(WsMessage::Binary(b)))) => {
            summary.frames_received += 1;
            summary.bytes_received += b.len() as u64;
            Ok(hub.receive(CONN, &b))
        }
        Ok(Some(Ok(WsMessage::Close(frame)))) => {
            let reason = frame
                .map(|f| f.reason.to_string())
                .unwrap_or_else(|| "no reason given".into());
            if reason.contains("revoked") {
                Err(ClientError::Auth(reason))
            } else {
                Err(ClientError::Network(format!(
                    "server closed the connection: {reason}"
                )))
            }
        }
        Ok(Some(Ok(_))) => Ok(Step::default()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn handle<S>(
    replica: &Replica,
    url: &str,
    hub: &mut Hub<Arc<relais_core::store::Store>>,
    step: Step,
    summary: &mut SyncSummary,
    pushing: &HashSet<relais_core::DocumentId>,
    progress: &mut Progress,
    sink: &mut S,
    started: Instant,
    opts: &SyncOptions,
) -> Result<bool, ClientError>
where
    S: futures_util::Sink<WsMessage, Error = tungstenite::Error> + Unpin,
{
    let store = replica.ledger().store();
    // Durable before anything is acknowledged to the server; with them, what the server
    // confirmed holding, so that an interrupted sync does not offer it again.
    let mut seqs = store.write_with_states(&step.writes, &hub.take_sync_states())?;
    let mut done = false;
    for e in step.events {
        match e {
            Event::Connected { extension, .. } => summary.extension = extension,
            Event::DocChanged { id } => {
                progress.received.insert(id);
                replica.emit(ReplicaEvent::DocumentChanged(id));
            }
            Event::Purge { id, erased, .. } => {
                // Told twice (a live notice and a listing) counts once.
                let held = store.meta(id)?.is_some_and(|m| !m.info.erased);
                if erased {
                    // A tombstone, so that no other server or stale copy brings it back here.
                    // It takes a feed sequence of its own: the server's doing, not a local
                    // change, so the cursor moves over it like over what the server sent.
                    if let Some(tomb) = store.erase(id, &[])? {
                        seqs.push(tomb.seq);
                    }
                } else {
                    store.remove(id)?;
                }
                if !held {
                    continue;
                }
                summary.documents_purged += 1;
                replica.emit(ReplicaEvent::DocumentPurged(id));
            }
            Event::Refused { id, reason, .. } => {
                tracing::warn!(document = %id, %reason, "the server refused this replica's changes");
                replica.emit(ReplicaEvent::DocumentRefused {
                    id,
                    reason: reason.clone(),
                });
                if !summary.documents_refused.iter().any(|r| r.id == id) {
                    summary
                        .documents_refused
                        .push(RefusedDocument { id, reason });
                }
            }
            Event::Synced {
                remote_cursor,
                local_cursor,
                peer,
                ..
            } => {
                // The hub's cursor stops before any stored version the server is not known
                // to hold, such as a write the app made while this session ran; what this
                // round stored from the server is on the server.
                let local = advance_cursor(local_cursor, &seqs);
                replica.save_cursors(
                    url,
                    &Cursors {
                        peer: Some(peer),
                        remote: remote_cursor,
                        local,
                        at_ms: Some(now_ms()),
                    },
                )?;
                summary.documents_received = progress.received.len();
                let refused = summary
                    .documents_refused
                    .iter()
                    .filter(|r| pushing.contains(&r.id))
                    .count();
                summary.documents_sent = pushing.len() - refused;
                summary.elapsed_ms = started.elapsed().as_millis() as u64;
                replica.emit(ReplicaEvent::Synced(summary.clone()));
                done = true;
            }
            _ => {}
        }
    }
    if !done && !seqs.is_empty() {
        // What the server sent is on the server: move the local cursor over it when nothing
        // written here is waiting before it, so that `pending_documents` counts only local
        // changes while a live session keeps receiving others' work.
        let mut c = replica.cursors(url);
        let next = advance_cursor(c.local, &seqs);
        if next > c.local {
            c.local = next;
            replica.save_cursors(url, &c)?;
        }
    }
    let sent = !step.sends.is_empty();
    let bytes: usize = step.sends.iter().map(|(_, f)| f.len()).sum();
    // A server that stopped reading (a dead route that sends no reset) would otherwise hold
    // the send, where the idle timeout does not run, until TCP gives up many minutes later.
    // The budget grows with the bytes, so that a slow but live 2G link is not cut.
    let budget = send_budget(opts.idle_timeout, bytes);
    let send = async {
        for (_, frame) in step.sends {
            summary.frames_sent += 1;
            summary.bytes_sent += frame.len() as u64;
            sink.feed(WsMessage::Binary(frame.into())).await?;
        }
        if sent {
            sink.flush().await?;
        }
        Ok::<(), tungstenite::Error>(())
    };
    match tokio::time::timeout(budget, send).await {
        Ok(r) => r.map_err(|e| ClientError::Network(e.to_string()))?,
        Err(_) => {
            return Err(ClientError::Network(format!(
                "the server took nothing for {} s",
                budget.as_secs()
            )))
        }
    }
    if let Some((_, reason)) = step.closes.into_iter().next() {
        close(sink).await;
        return Err(ClientError::Protocol(reason));
    }
    if let Some(p) = &opts.progress {
        p(hub.awaiting(CONN), progress.received.len());
    }
    // Let a long sync breathe.
    tokio::task::yield_now().await;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket whose far end never reads: a send into it never completes.
    fn stuck() -> impl futures_util::Sink<WsMessage, Error = tungstenite::Error> + Unpin {
        Box::pin(futures_util::sink::unfold((), |(), _: WsMessage| {
            std::future::pending::<Result<(), tungstenite::Error>>()
        }))
    }

    /// The keep-alive's three answers: nothing to do while the server was heard from
    /// lately, a ping after half the idle timeout (here into a socket that takes nothing,
    /// so the ping's own limit ends the session), and an end once nothing came for all of it.
    #[tokio::test(start_paused = true)]
    async fn the_keep_alive_pings_only_after_half_the_idle_timeout_and_gives_up_after_all() {
        let opts = SyncOptions {
            idle_timeout: Duration::from_secs(60),
            ..SyncOptions::default()
        };
        let ago = |s| Instant::now() - Duration::from_secs(s);
        // Heard 10 s ago: no ping (one into this socket would have timed out).
        keep_alive(&mut stuck(), ago(10), &opts).await.unwrap();
        match keep_alive(&mut stuck(), ago(40), &opts).await {
            Err(ClientError::Network(e)) => assert!(e.contains("took nothing for 60 s"), "{e}"),
            other => panic!("expected the ping to time out, got {other:?}"),
        }
        match keep_alive(&mut stuck(), ago(61), &opts).await {
            Err(ClientError::Network(e)) => assert!(e.contains("nothing heard for 60 s"), "{e}"),
            other => panic!("expected the session to end, got {other:?}"),
        }
    }
}
