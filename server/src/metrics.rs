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
    /// Connections closed for bad input, overflow or policy.
    pub connections_dropped: Counter,
    /// Time from receiving a frame to handing its replies to the connections, durable
    /// commit included.
    pub sync_latency: Histogram,
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
            "Connections closed for bad input, overflow or policy",
            m.connections_dropped.clone(),
        );
        registry.register(
            "sync_latency_seconds",
            "Time from receiving a frame to queueing its replies, commit included",
            m.sync_latency.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
