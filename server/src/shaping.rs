//! An in-process TCP proxy that shapes a link like 2G in the field: a bandwidth cap in each
//! direction, a one-way delay, and a dropped connection every few hundred KB. `relais bench`
//! puts it between a tablet and the server to measure syncs over poor links.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// How the link behaves.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Bytes per second in each direction.
    pub bytes_per_second: f64,
    /// One-way delay (half the round-trip time).
    pub delay: Duration,
    /// Drop every connection once this many bytes crossed the link since the last drop
    /// (both directions); 0 never drops.
    pub drop_every: u64,
}

impl Shape {
    /// 2G as the field sees it: 50 kbit/s, 600 ms round trip, a drop every 200 KB.
    pub fn edge() -> Shape {
        Shape {
            bytes_per_second: 50_000.0 / 8.0,
            delay: Duration::from_millis(300),
            drop_every: 200_000,
        }
    }
}

/// What crossed the link.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes from clients to the server.
    pub up: AtomicU64,
    /// Bytes from the server to clients.
    pub down: AtomicU64,
    /// Connections dropped by the proxy.
    pub drops: AtomicU64,
    since_drop: AtomicU64,
}

/// A running proxy: connect to [`Proxy::addr`] instead of the server.
pub struct Proxy {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Traffic so far.
    pub counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr, shape: Shape) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let c = c.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(target).await {
                        link(client, server, shape, c).await;
                    }
                });
            }
        });
        Ok(Proxy {
            addr,
            counters,
            task,
        })
    }
}

async fn link(client: TcpStream, server: TcpStream, shape: Shape, counters: Arc<Counters>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let cut = Arc::new(Notify::new());
    let up = tokio::spawn(pump(cr, sw, shape, counters.clone(), true, cut.clone()));
    let down = tokio::spawn(pump(sr, cw, shape, counters, false, cut.clone()));
    cut.notified().await;
    up.abort();
    down.abort();
}

/// Forwards one direction: chunks leave after the delay, no faster than the bandwidth.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shape: Shape,
    counters: Arc<Counters>,
    upward: bool,
    cut: Arc<Notify>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = {
        let cut = cut.clone();
        tokio::spawn(async move {
            while let Some((at, chunk)) = rx.recv().await {
                tokio::time::sleep_until(at).await;
                if to.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            cut.notify_one();
        })
    };
    let mut free_at = Instant::now();
    let mut buf = vec![0u8; 1024];
    let mut dropped = false;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let now = Instant::now();
        let wire = Duration::from_secs_f64(n as f64 / shape.bytes_per_second);
        free_at = free_at.max(now) + wire;
        if tx.send((free_at + shape.delay, buf[..n].to_vec())).is_err() {
            break;
        }
        let total = if upward { &counters.up } else { &counters.down };
        total.fetch_add(n as u64, Ordering::Relaxed);
        let since = counters.since_drop.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if shape.drop_every > 0 && since >= shape.drop_every {
            counters.since_drop.store(0, Ordering::Relaxed);
            counters.drops.fetch_add(1, Ordering::Relaxed);
            dropped = true;
            break;
        }
        // Read no faster than the link carries, so the sender feels it as a slow socket
        // instead of the proxy buffering without bound.
        tokio::time::sleep_until(free_at).await;
    }
    drop(tx);
    if dropped {
        // What was still on its way never arrives.
        writer.abort();
    } else {
        let _ = writer.await;
    }
    cut.notify_one();
}
