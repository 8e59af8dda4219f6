//! One WebSocket connection: authentication at the upgrade, then frames in and out.
//!
//! The reader forwards binary frames to the engine; a writer task drains the connection's
//! bounded outbox and pings a quiet peer. A peer not heard from for
//! [`PEER_IDLE_TIMEOUT`](crate::config::PEER_IDLE_TIMEOUT), once what was sent to it has had
//! its send budget to arrive, is dropped, and so is one that takes nothing sent to it within
//! that budget (the timeout plus a second per KiB). Protocol logic lives in the engine's
//! hub, not here.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use relais_core::access::Identity;
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::engine::{close_code, Input, Outgoing};
use crate::App;

/// Initial read and write buffer per WebSocket.
pub const SOCKET_BUFFER_BYTES: usize = 8 * 1024;

/// `?token=` for browsers that cannot set headers.
#[derive(Debug, Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

/// The bearer token of a request: the `Authorization` header, else `?token=`.
pub fn presented_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    let from_header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    from_header.or_else(|| query.map(str::to_string))
}

/// `GET /sync`.
pub async fn upgrade(
    State(app): State<Arc<App>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // Authenticate before anything else: no token, no protocol.
    let identity = match app.authenticate(addr, presented_token(&headers, q.token.as_deref())) {
        Ok(identity) => identity,
        Err(resp) => return resp,
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let limit = app.cfg.max_frame_bytes;
    // tungstenite's 128 KiB default buffers would cost ~260 KiB per idle tablet; most frames
    // are a few hundred bytes, and larger ones grow the buffers as needed.
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .read_buffer_size(SOCKET_BUFFER_BYTES)
        .write_buffer_size(SOCKET_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            let span = tracing::info_span!("conn", device = %identity.device, peer = %addr);
            connection(app, socket, identity).instrument(span)
        })
}

fn close(code: u16, reason: &str) -> WsMessage {
    // A close reason must fit in 123 bytes.
    let mut r = reason.to_string();
    while r.len() > 120 {
        r.pop();
    }
    WsMessage::Close(Some(CloseFrame {
        code,
        reason: r.into(),
    }))
}

async fn connection(app: Arc<App>, socket: WebSocket, identity: Identity) {
    let conn = app.next_conn.fetch_add(1, Ordering::Relaxed);
    let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(crate::config::MAX_QUEUED_FRAMES);
    let queued = Arc::new(AtomicUsize::new(0));
    let kill = Arc::new(tokio::sync::Notify::new());
    let device = identity.device.clone();
    if !app
        .engine
        .send(Input::Connect {
            conn,
            identity,
            outbox: out_tx.clone(),
            queued: queued.clone(),
            kill: kill.clone(),
        })
        .await
    {
        return;
    }
    app.metrics.connections.inc();
    app.devices.connected(&device);
    tracing::info!(conn, "connected");
    let (mut sink, mut stream) = socket.split();
    let idle = app.cfg.peer_idle;
    let grace = Arc::new(SendGrace::new());
    let writer = {
        let (grace, kill, metrics) = (grace.clone(), kill.clone(), app.metrics.clone());
        tokio::spawn(async move {
            // Pings on a quiet link, so that a live peer answers and a gone one does not.
            let mut ping = tokio::time::interval(idle / 4);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ping.tick().await;
            loop {
                let (msg, len) = tokio::select! {
                    out = out_rx.recv() => match out {
                        Some(Outgoing::Frame(bytes)) => {
                            let len = bytes.len();
                            (WsMessage::Binary(bytes.into()), len)
                        }
                        Some(Outgoing::Close(code, reason)) => {
                            let _ = sink.send(close(code, &reason)).await;
                            break;
                        }
                        None => break,
                    },
                    _ = ping.tick() => (WsMessage::Ping(Default::default()), 0),
                };
                // A peer that takes nothing for this long is gone or too slow to serve: a
                // dead route without a reset would hold the send for many minutes.
                let budget = relais_client::send_budget(idle, len);
                if len > 0 {
                    grace.extend(budget);
                }
                let sent = tokio::time::timeout(budget, sink.send(msg)).await;
                queued.fetch_sub(len, Ordering::Relaxed);
                ping.reset();
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break,
                    Err(_) => {
                        tracing::warn!(
                            conn,
                            secs = budget.as_secs(),
                            "the peer took nothing; dropping it"
                        );
                        metrics.connections_dropped.inc();
                        kill.notify_one();
                        break;
                    }
                }
            }
            let _ = sink.close().await;
        })
    };
    let mut shutdown = app.shutdown.clone();
    // When the peer last said anything. It may also stay silent while it receives what was
    // sent to it (a large frame over 2G), for as long as the writer gives that to arrive.
    let mut heard = tokio::time::Instant::now();
    loop {
        let deadline = (heard + idle).max(grace.until());
        tokio::select! {
            _ = kill.notified() => {
                // Dropped by the engine (a close, or a peer that does not read): stop
                // reading; below, the writer gets a moment for what is queued, then goes.
                break;
            }
            _ = shutdown.changed() => {
                let _ = out_tx.try_send(Outgoing::Close(close_code::AWAY, "server shutting down".into()));
                break;
            }
            msg = tokio::time::timeout_at(deadline, stream.next()) => {
                let Ok(msg) = msg else {
                    if grace.until() > tokio::time::Instant::now() {
                        // Something was sent to it meanwhile: wait on.
                        continue;
                    }
                    tracing::info!(conn, secs = idle.as_secs_f64(), "heard nothing from the peer; closing");
                    app.metrics.connections_dropped.inc();
                    let _ = out_tx.try_send(Outgoing::Close(close_code::AWAY, format!("heard nothing for {} s", idle.as_secs_f64())));
                    break;
                };
                heard = tokio::time::Instant::now();
                match msg {
                    Some(Ok(WsMessage::Binary(bytes))) => {
                        app.metrics.bytes_in.inc_by(bytes.len() as u64);
                        let input = Input::Frame { conn, bytes: bytes.to_vec(), at: Instant::now() };
                        if !app.engine.send(input).await {
                            break;
                        }
                        // Waiting for room in the engine's queue is not the peer's silence.
                        heard = tokio::time::Instant::now();
                    }
                    Some(Ok(WsMessage::Text(_))) => {
                        tracing::warn!(conn, "text frame; closing");
                        app.metrics.connections_dropped.inc();
                        let _ = out_tx.try_send(Outgoing::Close(close_code::PROTOCOL, "text frames are not part of the protocol; send binary CBOR".into()));
                        break;
                    }
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                    Some(Ok(WsMessage::Close(_))) | None => break,
                    Some(Err(e)) => {
                        let text = e.to_string();
                        if text.contains("without closing handshake") {
                            // The peer went away (tablet out of range): not an error.
                            tracing::debug!(conn, "connection reset by peer");
                            break;
                        }
                        let code = if text.contains("too long") || text.contains("too big") || text.contains("Space limit") {
                            close_code::TOO_BIG
                        } else {
                            close_code::PROTOCOL
                        };
                        tracing::warn!(conn, error = %text, "read failed; closing");
                        app.metrics.connections_dropped.inc();
                        let _ = out_tx.try_send(Outgoing::Close(code, format!("closing: {text}")));
                        break;
                    }
                }
            }
        }
    }
    app.engine.send(Input::Disconnect { conn }).await;
    drop(out_tx);
    // Let the writer flush a close frame, but never hang on a dead peer: a writer stuck
    // on a full socket is stopped, which drops the socket and the frames queued for it.
    let abort = writer.abort_handle();
    if tokio::time::timeout(std::time::Duration::from_secs(5), writer)
        .await
        .is_err()
    {
        abort.abort();
    }
    app.metrics.connections.dec();
    app.devices.disconnected(&device);
    tracing::info!(conn, device = %device, "disconnected");
}

/// How long a peer may stay silent because of what was sent to it: a frame may take its
/// send budget to reach the peer over the slowest link served, the socket's buffers and the
/// network's queues included, and its answer comes after. Pings do not extend it.
struct SendGrace {
    origin: tokio::time::Instant,
    /// The latest end of a frame's budget, in microseconds since `origin`.
    until_us: AtomicU64,
}

impl SendGrace {
    fn new() -> Self {
        SendGrace {
            origin: tokio::time::Instant::now(),
            until_us: AtomicU64::new(0),
        }
    }

    /// A frame whose budget is `budget` starts to leave now.
    fn extend(&self, budget: std::time::Duration) {
        let until = self.origin.elapsed().saturating_add(budget).as_micros();
        self.until_us
            .fetch_max(u64::try_from(until).unwrap_or(u64::MAX), Ordering::AcqRel);
    }

    /// Until when the peer's silence is excused.
    fn until(&self) -> tokio::time::Instant {
        let us = self.until_us.load(Ordering::Acquire);
        self.origin + std::time::Duration::from_micros(us)
    }
}

/// A plain-text error response.
pub fn refuse(status: StatusCode, msg: &str) -> Response {
    (status, msg.to_string()).into_response()
}
