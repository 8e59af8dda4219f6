//! Server configuration: command line, `RELAIS_*` environment variables, a TOML file, and
//! built-in defaults, in that order of precedence.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default listening address: loopback only, so a fresh install exposes nothing.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7373";
/// Default data directory.
pub const DEFAULT_DATA: &str = "./relais-data";
/// Largest frame accepted. A household document is a few KB; a whole-site bootstrap sync
/// message stays well below this.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// Bytes queued for one connection before it counts as stalled and is dropped. Large enough
/// for a burst of replies to a whole window of requests, small enough that a thousand
/// stalled devices cannot exhaust memory on their own.
pub const DEFAULT_SEND_BUFFER_BYTES: usize = 32 * 1024 * 1024;
/// Frames queued for one connection, whatever their size.
pub const MAX_QUEUED_FRAMES: usize = 65_536;
/// Documents kept in memory before idle ones are evicted.
pub const DEFAULT_MAX_LOADED_DOCS: usize = 20_000;
/// A device connection on which nothing (not even a pong to the server's pings) arrived
/// for this long is closed: a tablet that left the network's range without a reset would
/// otherwise hold its socket, buffers and place in the hub for ever. Only whole messages
/// count, so this is also the longest a frame from a device may take to arrive: 300 KB at
/// 1 KiB/s, more than relais-client's 128 KB batch frames.
/// `RELAIS_PEER_IDLE_SECS` overrides it (tests use a second or two).
pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// [`PEER_IDLE_TIMEOUT`], or `RELAIS_PEER_IDLE_SECS`.
pub fn peer_idle_timeout() -> Duration {
    secs_from_env("RELAIS_PEER_IDLE_SECS", PEER_IDLE_TIMEOUT)
}

/// The environment variable `name` as a duration in seconds where it is a positive number,
/// kept within 10 ms and 30 days (a zero ping period would panic, a huge deadline would
/// overflow), else `default`.
pub fn secs_from_env(name: &str, default: Duration) -> Duration {
    secs_from(std::env::var(name).ok().as_deref(), default)
}

fn secs_from(value: Option<&str>, default: Duration) -> Duration {
    value
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map(|s| Duration::from_secs_f64(s.clamp(0.01, 30.0 * 86_400.0)))
        .unwrap_or(default)
}

/// Settings from a TOML file; every field is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    /// `listen = "127.0.0.1:7373"`
    pub listen: Option<String>,
    /// `data = "/var/lib/relais"`
    pub data: Option<PathBuf>,
    /// `max-frame-bytes = 16777216`
    pub max_frame_bytes: Option<usize>,
    /// `send-buffer-bytes = 33554432`
    pub send_buffer_bytes: Option<usize>,
    /// `max-loaded-docs = 20000`
    pub max_loaded_docs: Option<usize>,
    /// `cache-mib = 64`
    pub cache_mib: Option<usize>,
    /// `sync-workers = 2`
    pub sync_workers: Option<usize>,
    /// `tls-cert = "/etc/relais/cert.pem"`
    pub tls_cert: Option<PathBuf>,
    /// `tls-key = "/etc/relais/key.pem"`
    pub tls_key: Option<PathBuf>,
    /// `upstream = "wss://bamako.example.org/sync"`
    pub upstream: Option<String>,
    /// `upstream-token = "rls_..."`
    pub upstream_token: Option<String>,
    /// `upstream-ca = "/etc/relais/bamako-ca.pem"`
    pub upstream_ca: Option<PathBuf>,
}

impl FileConfig {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", path.display()))
    }
}

/// The resolved settings of `relais serve`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Data directory; the store is `relais.redb` inside it.
    pub data: PathBuf,
    /// Largest WebSocket message accepted.
    pub max_frame_bytes: usize,
    /// Per-connection outbound queue, in bytes.
    pub send_buffer_bytes: usize,
    /// Documents kept in memory.
    pub max_loaded_docs: usize,
    /// redb's page cache, in MiB.
    pub cache_mib: usize,
    /// Threads that apply the documents of one batch at once (at least 1).
    pub sync_workers: usize,
    /// Certificate chain and private key (PEM): serve `https://` and `wss://`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Upstream server to replicate with.
    pub upstream: Option<Upstream>,
    /// A device connection heard nothing from for this long is closed
    /// ([`PEER_IDLE_TIMEOUT`], or `RELAIS_PEER_IDLE_SECS`).
    pub peer_idle: Duration,
}

/// An upstream server this one replicates with (a sub-office syncing with Bamako).
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `ws://` or `wss://` URL of its `/sync` endpoint.
    pub url: String,
    /// A `replica` token issued by the upstream server.
    pub token: String,
    /// CA certificate (PEM) to verify it by, instead of the usual web roots.
    pub ca: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN.parse().expect("valid default"),
            data: PathBuf::from(DEFAULT_DATA),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            send_buffer_bytes: DEFAULT_SEND_BUFFER_BYTES,
            max_loaded_docs: DEFAULT_MAX_LOADED_DOCS,
            cache_mib: relais_core::store::DEFAULT_CACHE_BYTES >> 20,
            sync_workers: relais_core::protocol::hub::HubConfig::default().workers,
            tls: None,
            upstream: None,
            peer_idle: peer_idle_timeout(),
        }
    }
}

/// The store file inside a data directory.
pub fn store_path(data: &Path) -> PathBuf {
    data.join("relais.redb")
}

impl ServerConfig {
    /// The store file.
    pub fn store_path(&self) -> PathBuf {
        store_path(&self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_from_the_environment_are_kept_within_bounds() {
        let default = Duration::from_secs(120);
        assert_eq!(secs_from(None, default), default);
        assert_eq!(
            secs_from(Some(" 1.5 "), default),
            Duration::from_millis(1500)
        );
        for bad in ["", "x", "0", "-3", "NaN"] {
            assert_eq!(secs_from(Some(bad), default), default, "{bad:?}");
        }
        assert_eq!(secs_from(Some("1e-9"), default), Duration::from_millis(10));
        let month = Duration::from_secs(30 * 86_400);
        assert_eq!(secs_from(Some("1e300"), default), month);
        assert_eq!(secs_from(Some("inf"), default), month);
    }
}
