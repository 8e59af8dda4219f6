//! # relais-server
//!
//! The `relais` sync server: a WebSocket endpoint speaking automerge-repo's protocol
//! (version "1", plus Relais's fast-reconnect extension), an HTTP admin API, health and
//! metrics. The protocol logic is relais-core's sans-IO [`Hub`](relais_core::protocol::hub::Hub);
//! this crate is the adapter: sockets, the engine thread that commits before it relays,
//! tokens, configuration and shutdown.
//!
//! Tests start a server on port 0 with [`serve`] or run the real binary.

#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod devices;
pub mod engine;
pub mod metrics;
pub mod reports;
pub mod tls;
pub mod tokens;
pub mod upstream;
pub mod ws;

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::Router;
use relais_core::access::Identity;
use relais_core::ledger::{Ledger, Writer};
use relais_core::protocol::hub::HubConfig;
use relais_core::store::Store;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::ServerConfig;
use engine::Engine;
use metrics::Metrics;

/// Failed logins allowed per source address per window before it is refused outright.
pub const MAX_FAILED_LOGINS: u32 = 10;
/// The window for [`MAX_FAILED_LOGINS`].
pub const FAILED_LOGIN_WINDOW: Duration = Duration::from_secs(60);

/// Shared state of a running server.
pub struct App {
    /// The store.
    pub store: Arc<Store>,
    /// Domain writes from the admin API.
    pub ledger: Ledger,
    /// The engine thread.
    pub engine: Engine,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Settings.
    pub cfg: ServerConfig,
    /// Flips to true on shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// Connection ids.
    pub next_conn: Arc<AtomicU64>,
    /// The link to the upstream server, if this server replicates with one.
    pub upstream: Option<Arc<upstream::Link>>,
    /// When each device was last connected.
    pub devices: devices::Devices,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl App {
    /// The upstream link's state, or null when this server has no upstream.
    pub fn upstream_status(&self) -> serde_json::Value {
        match &self.upstream {
            Some(l) => l.status(&self.store),
            None => serde_json::Value::Null,
        }
    }

    /// Checks a presented token, slowing down addresses that keep guessing.
    #[allow(clippy::result_large_err)]
    pub fn authenticate(
        &self,
        addr: SocketAddr,
        token: Option<String>,
    ) -> Result<Identity, Response> {
        let ip = addr.ip();
        {
            let mut f = self.failures.lock().expect("not poisoned");
            if let Some((since, n)) = f.get(&ip).copied() {
                if since.elapsed() > FAILED_LOGIN_WINDOW {
                    f.remove(&ip);
                } else if n >= MAX_FAILED_LOGINS {
                    return Err(ws::refuse(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too many failed logins from this address; wait a minute",
                    ));
                }
            }
        }
        let fail = |msg: &str| {
            let mut f = self.failures.lock().expect("not poisoned");
            let e = f.entry(ip).or_insert((Instant::now(), 0));
            e.1 += 1;
            tracing::warn!(peer = %addr, "refused login: {msg}");
            ws::refuse(StatusCode::UNAUTHORIZED, msg)
        };
        let Some(token) = token else {
            return Err(fail(
                "missing token: send Authorization: Bearer TOKEN or ?token=TOKEN",
            ));
        };
        match tokens::authenticate(&self.store, &token) {
            Ok(Some(rec)) => Ok(rec.identity()),
            Ok(None) => Err(fail("unknown or revoked token")),
            Err(e) => {
                tracing::error!(error = %e, "token lookup failed");
                Err(ws::refuse(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "storage error",
                ))
            }
        }
    }
}

#[cfg(test)]
impl App {
    /// An app over `store` and a running `engine`, with default settings, as [`serve`]
    /// builds it, for tests that call handlers directly.
    pub(crate) fn for_tests(store: Arc<Store>, engine: Engine, metrics: Arc<Metrics>) -> App {
        let ledger = Ledger::new(
            store.clone(),
            Writer {
                enumerator: "admin-api".into(),
                device: "server".into(),
            },
        )
        .unwrap();
        let devices = devices::Devices::load(&store).unwrap();
        // Kept open for the test's life: a closed channel reads as "shutting down".
        let (stop, shutdown) = watch::channel(false);
        std::mem::forget(stop);
        App {
            store,
            ledger,
            engine,
            metrics,
            cfg: ServerConfig::default(),
            shutdown,
            next_conn: Arc::new(AtomicU64::new(1)),
            upstream: None,
            devices,
            failures: Mutex::new(HashMap::new()),
        }
    }
}

/// The HTTP routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/sync", get(ws::upgrade))
        .route("/healthz", get(api::healthz))
        .route("/metrics", get(api::metrics))
        .route("/api/v1/sites", post(api::add_site))
        .route("/api/v1/campaigns", post(api::add_campaign))
        .route(
            "/api/v1/tokens",
            post(api::create_token).get(api::list_tokens),
        )
        .route(
            "/api/v1/tokens/{name}",
            delete(api::revoke_token).patch(api::rescope_token),
        )
        .route("/api/v1/households/{id}", delete(api::erase_household))
        .route("/api/v1/audit", get(api::audit))
        .route("/api/v1/devices", get(api::devices))
        .route("/api/v1/status", get(api::status))
        .route("/api/v1/upstream", get(api::upstream))
        .route("/api/v1/reports/figures", get(reports::figures))
        .route("/api/v1/reports/doubles", get(reports::doubles))
        .route("/api/v1/reports/duplicates", get(reports::duplicates))
        .route("/api/v1/exports/{file}", get(reports::export))
        .with_state(app)
}

/// Opens the store under the configured data directory.
pub fn open_store(cfg: &ServerConfig) -> anyhow::Result<Arc<Store>> {
    let path = cfg.store_path();
    let store = Store::open_with_cache(&path, cfg.cache_mib << 20)
        .with_context(|| format!("opening store {}", path.display()))?;
    Ok(Arc::new(store))
}

/// Serves until `shutdown` completes, then stops accepting, closes sockets with a close frame,
/// lets the engine commit what it holds, and returns.
pub async fn serve(
    cfg: ServerConfig,
    store: Arc<Store>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Read the certificate first: a bad one is reported before anything starts.
    let tls = cfg
        .tls
        .as_ref()
        .map(|(cert, key)| tls::server_config(cert, key))
        .transpose()?;
    let metrics = Arc::new(Metrics::default());
    let storage_id = match store.get_meta("storage-id")? {
        Some(b) => String::from_utf8_lossy(&b).to_string(),
        None => {
            let id = relais_core::DocumentId::random().to_string();
            store.put_meta("storage-id", id.as_bytes())?;
            id
        }
    };
    let hub_cfg = HubConfig {
        peer_id: format!("relais-server-{storage_id}"),
        storage_id: Some(storage_id),
        max_loaded_docs: cfg.max_loaded_docs,
        workers: cfg.sync_workers,
        ..HubConfig::default()
    };
    let link = cfg
        .upstream
        .as_ref()
        .map(|u| Arc::new(upstream::Link::new(&u.url)));
    let (engine, engine_thread) = Engine::start(
        store.clone(),
        hub_cfg,
        cfg.send_buffer_bytes,
        metrics.clone(),
        link.clone(),
    );
    let ledger = Ledger::new(
        store.clone(),
        Writer {
            enumerator: "admin-api".into(),
            device: "server".into(),
        },
    )?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let store_handle = store.clone();
    let devices = devices::Devices::load(&store)?;
    let app = Arc::new(App {
        store,
        ledger,
        engine,
        metrics,
        cfg,
        shutdown: stop_rx.clone(),
        next_conn: Arc::new(AtomicU64::new(1)),
        upstream: link.clone(),
        devices,
        failures: Mutex::new(HashMap::new()),
    });
    let flusher = {
        let app = app.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(devices::FLUSH_EVERY) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                let a = app.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = a.devices.flush(&a.store) {
                        tracing::warn!(error = %e, "could not save devices' last-seen times");
                    }
                })
                .await;
            }
        })
    };
    let upstream_task = match (&app.cfg.upstream, &link) {
        (Some(u), Some(l)) => Some(tokio::spawn(upstream::run(
            u.clone(),
            app.engine.clone(),
            l.clone(),
            app.next_conn.clone(),
            app.cfg.max_frame_bytes,
            stop_rx.clone(),
        ))),
        _ => None,
    };
    let service = router(app.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let mut stop_wait = stop_rx.clone();
    let server: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> = match tls {
        None => Box::pin(
            // Sync frames are small and answered at once: Nagle's algorithm would hold each
            // reply back until the peer's delayed ACK, some 40 ms a round trip.
            axum::serve(
                axum::serve::ListenerExt::tap_io(listener, |tcp| {
                    let _ = tcp.set_nodelay(true);
                }),
                service,
            )
            .with_graceful_shutdown(async move {
                let _ = stop_wait.wait_for(|s| *s).await;
            })
            .into_future(),
        ),
        Some(tls) => {
            let handle = axum_server::Handle::new();
            let h = handle.clone();
            tokio::spawn(async move {
                let _ = stop_wait.wait_for(|s| *s).await;
                h.graceful_shutdown(Some(Duration::from_secs(10)));
            });
            let std_listener = listener.into_std()?;
            Box::pin(
                axum_server::from_tcp_rustls(
                    std_listener,
                    axum_server::tls_rustls::RustlsConfig::from_config(tls),
                )
                .map(|tls| tls.acceptor(axum_server::accept::NoDelayAcceptor::new()))
                .handle(handle)
                .serve(service),
            )
        }
    };
    let trigger = tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: closing connections");
        let _ = stop_tx.send(true);
        stop_tx
    });
    server.await.context("server failed")?;
    let _stop_tx = trigger.await.ok();
    let _ = flusher.await;
    if let Some(t) = upstream_task {
        let _ = t.await;
    }
    // Upgraded sockets are not tracked by the HTTP server: wait for them to close.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Arc::strong_count(&app) > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Err(e) = app.devices.flush(&app.store) {
        tracing::warn!(error = %e, "could not save devices' last-seen times");
    }
    drop(app);
    // The engine stops once every sender is gone, after committing its last round.
    let join = tokio::task::spawn_blocking(move || {
        let _ = engine_thread.join();
    });
    if tokio::time::timeout(Duration::from_secs(10), join)
        .await
        .is_err()
    {
        tracing::warn!(
            "engine did not stop in time; every acknowledged change is already committed"
        );
    }
    // Erased households leave freed pages behind: rewrite the file so none of their bytes
    // stay on disk.
    if let Ok(mut store) = Arc::try_unwrap(store_handle) {
        if store.compact_pending().unwrap_or(false) {
            tracing::info!("compacting the store after erasures");
            if let Err(e) = store.compact_file() {
                tracing::warn!(error = %e, "compaction failed; run `relais compact`");
            }
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// One page of the audit log: entries after sequence `after` that pass `filter`, at most
/// `limit`, and the sequence to continue from when more may follow.
pub fn audit_page(
    store: &Store,
    filter: &relais_core::audit::AuditFilter,
    after: u64,
    limit: usize,
) -> Result<(Vec<serde_json::Value>, Option<u64>), relais_core::store::StoreError> {
    let mut out = Vec::new();
    let mut cursor = after;
    loop {
        let batch = store.audit_since(cursor, 4_096)?;
        let full = batch.len() == 4_096;
        for (seq, e) in batch {
            cursor = seq;
            if filter.matches(&e) {
                let mut v = serde_json::to_value(&e).expect("AuditEntry serialises");
                v["seq"] = seq.into();
                out.push(v);
                if out.len() >= limit {
                    return Ok((out, Some(cursor)));
                }
            }
        }
        if !full {
            return Ok((out, None));
        }
    }
}
