//! Prometheus metrics served at `GET /metrics`.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The server's metrics. Cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: Gauge<i64, AtomicI64>,
    /// Documents in the store.
    pub documents: Gauge<i64, AtomicI64>,
    /// Documents held in memory.
    pub loaded_documents: Gauge<i64, AtomicI64>,
    /// Sync messages that brought new changes, durably merged.
    pub changes_merged: Counter,
    /// Bytes received in WebSocket frames.
    pub bytes_in: Counter,
    /// Bytes sent in WebSocket frames.
    pub bytes_out: Counter,
    /// Connections closed for bad input, overflow, policy or silence.
    pub connections_dropped: Counter,
    /// Time from receiving a frame to handing its replies to the connections, durable
    /// commit included.
    pub sync_latency: Histogram,
    /// 1 while the upstream link is up (only with `--upstream`).
    pub upstream_connected: Gauge<i64, AtomicI64>,
    /// When the upstream last confirmed everything, seconds since the epoch.
    pub upstream_last_full_sync: Gauge<i64, AtomicI64>,
    /// Documents written here that the upstream has not confirmed yet.
    pub upstream_pending_documents: Gauge<i64, AtomicI64>,
    /// Times the upstream refused this server's changes to a document (its token lacks the
    /// role or scope); they stay pending and are offered again.
    pub upstream_refused: Counter,
    /// Rounds on which the sync engine panicked, and started again from the store.
    pub engine_panics: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("relais");
        let m = Metrics {
            connections: Gauge::default(),
            documents: Gauge::default(),
            loaded_documents: Gauge::default(),
            changes_merged: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            connections_dropped: Counter::default(),
            sync_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            upstream_connected: Gauge::default(),
            upstream_last_full_sync: Gauge::default(),
            upstream_pending_documents: Gauge::default(),
            upstream_refused: Counter::default(),
            engine_panics: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Open WebSocket connections",
            m.connections.clone(),
        );
        registry.register("documents", "Documents in the store", m.documents.clone());
        registry.register(
            "loaded_documents",
            "Documents held in memory",
            m.loaded_documents.clone(),
        );
        registry.register(
            "changes_merged",
            "Sync messages that brought new changes, durably merged",
            m.changes_merged.clone(),
        );
        registry.register("bytes_in", "Bytes received in frames", m.bytes_in.clone());
        registry.register("bytes_out", "Bytes sent in frames", m.bytes_out.clone());
        registry.register(
            "connections_dropped",
            "Connections closed for bad input, overflow, policy or silence",
            m.connections_dropped.clone(),
        );
        registry.register(
            "sync_latency_seconds",
            "Time from receiving a frame to queueing its replies, commit included",
            m.sync_latency.clone(),
        );
        registry.register(
            "upstream_connected",
            "1 while the link to the upstream server is up",
            m.upstream_connected.clone(),
        );
        registry.register(
            "upstream_last_full_sync_timestamp_seconds",
            "When the upstream last confirmed everything",
            m.upstream_last_full_sync.clone(),
        );
        registry.register(
            "upstream_pending_documents",
            "Documents written here not yet confirmed by the upstream",
            m.upstream_pending_documents.clone(),
        );
        registry.register(
            "upstream_refused",
            "Documents whose changes from this server the upstream refused",
            m.upstream_refused.clone(),
        );
        registry.register(
            "engine_panics",
            "Rounds on which the sync engine panicked and started again from the store",
            m.engine_panics.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Copies the upstream link's state (from `Link::status`) into the gauges.
    pub fn set_upstream(&self, v: &serde_json::Value) {
        self.upstream_connected
            .set(i64::from(v["connected"].as_bool() == Some(true)));
        self.upstream_last_full_sync
            .set(v["last_full_sync"].as_i64().unwrap_or(0) / 1000);
        self.upstream_pending_documents
            .set(v["pending_documents"].as_i64().unwrap_or(0));
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
