//! Replication with an upstream server: `relais serve --upstream wss://bamako/sync
//! --upstream-token T` makes this server (a sub-office) also a replica of Bamako.
//!
//! The link is one more connection of the engine's hub, opened outwards with
//! [`Hub::connect_outbound`](relais_core::protocol::hub::Hub::connect_outbound): the same
//! client state machine relais-client drives, with the same fast-reconnect extension. So a
//! change a tablet makes here is committed, then pushed upstream at once; a change arriving
//! from upstream is committed, then relayed to the tablets here that may see it. Which
//! documents travel is decided by the upstream token's scope, on the upstream server.
//!
//! This module holds the socket loop (connect, forward frames both ways, back off and
//! retry) and the link's state for `/metrics`, `GET /api/v1/upstream` and `relais status`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use relais_client::TlsTrust;
use relais_core::audit::now_ms;
use relais_core::store::Store;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::config::Upstream;
use crate::engine::{Engine, Input, Outgoing};

/// First retry delay after the link drops.
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A link on which nothing (not even a pong) arrived for this long is considered dead and
/// reopened; `RELAIS_UPSTREAM_IDLE_SECS` overrides it (tests use a few seconds).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

fn idle_timeout() -> Duration {
    crate::config::secs_from_env("RELAIS_UPSTREAM_IDLE_SECS", IDLE_TIMEOUT)
}

/// Where the last full sync with the upstream left off, saved in the store's meta table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursors {
    /// The upstream's peer id the cursors belong to.
    pub peer: Option<String>,
    /// Upstream feed cursor for the next `relais-changes-since`.
    pub remote: u64,
    /// Local feed sequence up to which the upstream has everything.
    pub local: u64,
    /// When that was, ms since the epoch.
    pub at_ms: Option<i64>,
}

fn cursor_key(url: &str) -> String {
    let base = url.split('?').next().unwrap_or(url);
    format!("upstream:cursor:{base}")
}

/// Reads the saved cursors for an upstream URL.
pub fn load_cursors(store: &Store, url: &str) -> Cursors {
    store
        .get_meta(&cursor_key(url))
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Saves the cursors after a full sync.
pub fn save_cursors(
    store: &Store,
    url: &str,
    c: &Cursors,
) -> Result<(), relais_core::store::StoreError> {
    store.put_meta(
        &cursor_key(url),
        &serde_json::to_vec(c).expect("cursors serialise"),
    )
}

/// The link's state, shared by the socket loop, the engine and the API.
#[derive(Debug, Default)]
pub struct Link {
    inner: Mutex<LinkState>,
}

#[derive(Debug, Default, Clone)]
struct LinkState {
    url: String,
    connected: bool,
    since: Option<i64>,
    last_error: Option<String>,
    connects: u64,
    awaiting: usize,
}

impl Link {
    /// A link to `url`, not connected yet.
    pub fn new(url: &str) -> Self {
        Link {
            inner: Mutex::new(LinkState {
                url: url.split('?').next().unwrap_or(url).to_string(),
                ..Default::default()
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut LinkState) -> R) -> R {
        f(&mut self.inner.lock().expect("not poisoned"))
    }

    /// Documents the engine is still syncing with the upstream (set by the engine).
    pub fn set_awaiting(&self, n: usize) {
        self.with(|s| s.awaiting = n);
    }

    /// The link's state as JSON, with what the store says is not yet confirmed upstream.
    pub fn status(&self, store: &Store) -> serde_json::Value {
        let s = self.with(|s| s.clone());
        let cursors = load_cursors(store, &s.url);
        // Documents written here that the upstream has not confirmed. Capped: the figure is
        // for a dashboard, and a week offline is a few thousand.
        let pending = relais_core::protocol::hub::unconfirmed_since(
            store,
            cursors.local,
            cursors.peer.as_deref(),
            1_000_000,
        )
        .map_or(0, |v| v.len());
        serde_json::json!({
            "url": s.url,
            "connected": s.connected,
            "connected_since": s.since,
            "connects": s.connects,
            "last_error": s.last_error,
            "last_full_sync": cursors.at_ms,
            "remote_cursor": cursors.remote,
            "local_cursor": cursors.local,
            "pending_documents": pending,
            "in_flight_documents": s.awaiting,
        })
    }
}

/// Keeps the link to the upstream up until shutdown: connect, hand the connection to the
/// engine, forward frames both ways, and on any drop wait (exponential backoff with jitter)
/// and retry.
pub async fn run(
    cfg: Upstream,
    engine: Engine,
    link: Arc<Link>,
    next_conn: Arc<std::sync::atomic::AtomicU64>,
    max_frame_bytes: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let trust = match &cfg.ca {
        Some(ca) => match TlsTrust::ca_file(ca) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "upstream CA unusable; not replicating");
                link.with(|s| s.last_error = Some(e.to_string()));
                return;
            }
        },
        None => TlsTrust::default(),
    };
    let mut backoff = MIN_BACKOFF;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let started = Instant::now();
        let outcome = tokio::select! {
            r = session(&cfg, &trust, &engine, &link, &next_conn, max_frame_bytes) => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        link.with(|s| {
            s.connected = false;
            s.since = None;
            if let Err(e) = &outcome {
                s.last_error = Some(e.clone());
            }
        });
        match &outcome {
            Ok(()) => tracing::info!("upstream link closed"),
            Err(e) => tracing::warn!(error = %e, "upstream link down"),
        }
        // A link that stayed up a while starts the backoff afresh.
        if started.elapsed() > MAX_BACKOFF {
            backoff = MIN_BACKOFF;
        }
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        let wait = backoff.mul_f64(jitter);
        backoff = (backoff * 2).min(MAX_BACKOFF);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// How long a close frame may take to leave before the socket is dropped anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Sends one message, giving up after `limit`. A link whose far end stopped reading (a
/// dead 2G route that sends no reset) fills the socket's buffer and would block the send
/// for ever; meanwhile nothing is read and the idle check never runs.
async fn send_within<S>(sink: &mut S, msg: WsMessage, limit: Duration) -> Result<(), String>
where
    S: futures_util::Sink<WsMessage, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    match tokio::time::timeout(limit, sink.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("send failed: {e}")),
        Err(_) => Err(format!(
            "upstream took nothing for {} s; reconnecting",
            limit.as_secs()
        )),
    }
}

async fn session(
    cfg: &Upstream,
    trust: &TlsTrust,
    engine: &Engine,
    link: &Link,
    next_conn: &std::sync::atomic::AtomicU64,
    max_frame_bytes: usize,
) -> Result<(), String> {
    let mut req = cfg
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad upstream URL: {e}"))?;
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", cfg.token)
            .parse()
            .map_err(|_| "upstream token has characters not allowed in a header".to_string())?,
    );
    let connector = if cfg.url.starts_with("wss:") {
        Some(tokio_tungstenite::Connector::Rustls(
            trust.client_config().map_err(|e| e.to_string())?,
        ))
    } else {
        None
    };
    let ws_cfg = WebSocketConfig::default()
        .max_message_size(Some(max_frame_bytes))
        .max_frame_size(Some(max_frame_bytes));
    let idle = idle_timeout();
    let ws = relais_client::connect_within(req, ws_cfg, connector, idle)
        .await
        .ok_or_else(|| {
            format!(
                "upstream did not answer within {} s; retrying",
                idle.as_secs_f64()
            )
        })?
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                format!("upstream refused the connection: {}", resp.status())
            }
            other => format!("cannot reach upstream: {other}"),
        })?;
    let conn = next_conn.fetch_add(1, Ordering::Relaxed);
    let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(crate::config::MAX_QUEUED_FRAMES);
    let queued = Arc::new(AtomicUsize::new(0));
    if !engine
        .send(Input::ConnectUpstream {
            conn,
            url: cfg.url.clone(),
            outbox: out_tx,
            queued: queued.clone(),
        })
        .await
    {
        return Err("server stopping".into());
    }
    link.with(|s| {
        s.connected = true;
        s.since = Some(now_ms());
        s.connects += 1;
        s.last_error = None;
    });
    tracing::info!(conn, upstream = %cfg.url.split('?').next().unwrap_or(""), "upstream link up");
    let (mut sink, mut stream) = ws.split();
    // A quiet office is not a dead link: ping, and count only what arrives as a sign of life.
    let mut ping = tokio::time::interval(idle / 4);
    ping.tick().await;
    let mut heard = tokio::time::Instant::now();
    let result = loop {
        tokio::select! {
            _ = ping.tick() => {
                let sending = tokio::time::Instant::now();
                if let Err(e) = send_within(&mut sink, WsMessage::Ping(Vec::new().into()), idle).await {
                    break Err(e);
                }
                // Nothing is read while a send waits for room: not the upstream's silence.
                heard += sending.elapsed();
            }
            out = out_rx.recv() => match out {
                Some(Outgoing::Frame(bytes)) => {
                    let len = bytes.len();
                    // More time for a bigger frame, so that a slow but live link is not cut.
                    let limit = relais_client::send_budget(idle, len);
                    let sending = tokio::time::Instant::now();
                    let sent = send_within(&mut sink, WsMessage::Binary(bytes.into()), limit).await;
                    queued.fetch_sub(len, Ordering::Relaxed);
                    if let Err(e) = sent {
                        break Err(e);
                    }
                    heard += sending.elapsed();
                }
                Some(Outgoing::Close(_, reason)) => {
                    let _ = send_within(&mut sink, WsMessage::Close(None), CLOSE_GRACE).await;
                    break Err(format!("closed here: {reason}"));
                }
                None => break Err("engine dropped the link".into()),
            },
            msg = tokio::time::timeout_at(heard + idle, stream.next()) => match msg {
                Err(_) => break Err("upstream went silent".into()),
                Ok(None) => break Err("upstream closed the connection".into()),
                Ok(Some(Err(e))) => break Err(e.to_string()),
                Ok(Some(Ok(WsMessage::Binary(b)))) => {
                    heard = tokio::time::Instant::now();
                    let input = Input::Frame { conn, bytes: b.to_vec(), at: Instant::now() };
                    if !engine.send(input).await {
                        break Ok(());
                    }
                }
                Ok(Some(Ok(WsMessage::Close(frame)))) => {
                    let reason = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                    break Err(format!("upstream closed the link: {reason}"));
                }
                Ok(Some(Ok(_))) => heard = tokio::time::Instant::now(),
            },
        }
    };
    engine.send(Input::Disconnect { conn }).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A socket whose far end never reads: it never has room for another message.
    struct Stuck;

    impl futures_util::Sink<WsMessage> for Stuck {
        type Error = tokio_tungstenite::tungstenite::Error;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Pending
        }
        fn start_send(self: Pin<&mut Self>, _: WsMessage) -> Result<(), Self::Error> {
            unreachable!("never ready")
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Pending
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Pending
        }
    }

    #[test]
    fn a_bigger_frame_gets_more_time_to_leave() {
        let idle = Duration::from_secs(120);
        assert_eq!(relais_client::send_budget(idle, 100), idle);
        let mib = relais_client::send_budget(idle, 1024 * 1024);
        assert_eq!(mib, idle + Duration::from_secs(1024));
    }

    #[tokio::test(start_paused = true)]
    async fn a_send_to_an_upstream_that_does_not_read_gives_up() {
        let started = tokio::time::Instant::now();
        let r = send_within(&mut Stuck, WsMessage::Binary(vec![1].into()), IDLE_TIMEOUT).await;
        let err = r.expect_err("a stuck send must fail");
        assert!(err.contains("took nothing for 120 s"), "{err}");
        assert_eq!(started.elapsed(), IDLE_TIMEOUT);
    }
}
