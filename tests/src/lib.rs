//! Shared helpers for the end-to-end tests: start the real `relais` binary on a free loopback
//! port, run its admin commands, and talk raw HTTP and WebSocket to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use relais_client::{Replica, Writer};

/// Path to the `relais` binary next to the test executables. The first call in each test
/// process runs `cargo build` for it, so a test never runs against a stale binary (running
/// only this package's tests would not rebuild the server otherwise).
pub fn relais_bin() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .to_path_buf();
    let bin = dir.join(format!("relais{}", std::env::consts::EXE_SUFFIX));
    BUILT.call_once(|| {
        let mut cmd = Command::new(env!("CARGO"));
        // The whole workspace's bins, so features resolve as in `cargo test --workspace`
        // and nothing is rebuilt when that already built the binary.
        cmd.args(["build", "--workspace", "--bins"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo build relais");
        assert!(status.success(), "building relais failed");
    });
    bin
}

/// Runs `relais ARGS` to completion.
pub fn relais(args: &[&str]) -> Output {
    Command::new(relais_bin())
        .args(args)
        .env("RELAIS_LOG", "warn")
        .output()
        .expect("run relais")
}

/// Runs `relais ARGS`, panicking with its stderr on failure; returns stdout.
pub fn relais_ok(args: &[&str]) -> String {
    let out = relais(args);
    assert!(
        out.status.success(),
        "relais {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Creates a token with the CLI (server stopped) and returns it.
pub fn create_token(data: &Path, name: &str, extra: &[&str]) -> String {
    let d = data.to_str().unwrap();
    let mut args = vec!["token", "create", "--data", d, "--name", name];
    args.extend_from_slice(extra);
    let out = relais_ok(&args);
    out.lines().last().expect("token line").trim().to_string()
}

/// Adds sites SOC-01, SOC-02 (Mopti), GAO-01 (Gao) and campaign JP-2023 with the CLI.
pub fn seed_reference(data: &Path) {
    let d = data.to_str().unwrap();
    for (code, name, region) in [
        ("SOC-01", "Socoura", "Mopti"),
        ("SOC-02", "Sevare", "Mopti"),
        ("GAO-01", "Gao Chateau", "Gao"),
    ] {
        relais_ok(&[
            "site",
            "add",
            "--data",
            d,
            "--code",
            code,
            "--name",
            name,
            "--adm1",
            region,
            "--adm2",
            region,
            "--type",
            "official-site",
        ]);
    }
    relais_ok(&[
        "campaign",
        "add",
        "--data",
        d,
        "--code",
        "JP-2023",
        "--name",
        "Responding to the needs of IDPs in northern and central Mali",
        "--item",
        "nfi-kit:1",
        "--item",
        "shelter-kit:1",
        "--sites",
        "SOC-01,SOC-02,GAO-01",
    ]);
}

/// A temporary directory holding a server data directory (`srv`) seeded with the reference
/// sites and campaign, and an admin token for it.
pub fn seeded_data_dir() -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("srv");
    seed_reference(&data);
    let token = create_token(&data, "admin", &["--role", "admin"]);
    (dir, data, token)
}

/// A command running `relais`, with no file it writes allowed to grow past `bytes`: a disk
/// that fills up. Writes beyond the limit fail with EFBIG (SIGXFSZ is ignored, as a full
/// disk sends no signal), through `prlimit` from util-linux.
pub fn relais_with_file_limit(bytes: u64) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "trap '' XFSZ; exec \"$@\"", "sh", "prlimit"])
        .arg(format!("--fsize={bytes}:unlimited"))
        .arg("--")
        .arg(relais_bin());
    cmd
}

/// A running `relais serve` process.
pub struct Server {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its data directory.
    pub data: PathBuf,
}

impl Server {
    /// Starts `relais serve --data DATA --listen 127.0.0.1:0 EXTRA` and waits until it listens.
    pub fn start(data: &Path, extra: &[&str]) -> Server {
        Server::start_env(data, extra, &[])
    }

    /// Like [`Server::start`], with extra environment variables.
    pub fn start_env(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Server::spawn(Command::new(relais_bin()), data, extra, env)
    }

    /// Like [`Server::start`], but no file the server writes may grow past `bytes`: a disk
    /// that fills up (see [`relais_with_file_limit`]).
    pub fn start_with_file_limit(data: &Path, extra: &[&str], bytes: u64) -> Server {
        Server::spawn(relais_with_file_limit(bytes), data, extra, &[])
    }

    fn spawn(mut cmd: Command, data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let log = std::fs::File::create(data.with_extension("log")).expect("log file");
        let mut child = cmd
            .args([
                "serve",
                "--data",
                data.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("RELAIS_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn relais serve");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let first = lines
            .next()
            .expect("relais serve printed nothing")
            .expect("read stdout");
        let addr = first
            .split("://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {first}"));
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            addr,
            data: data.to_path_buf(),
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The sync URL.
    pub fn url(&self) -> String {
        format!("ws://{}/sync", self.addr)
    }

    /// The sync URL over TLS (for a server started with `--tls-cert`).
    pub fn wss_url(&self) -> String {
        format!("wss://{}/sync", self.addr)
    }

    /// SIGTERM, then wait for exit.
    pub fn stop(mut self) -> ExitStatus {
        signal(&self.child, "TERM");
        wait_timeout(&mut self.child, Duration::from_secs(20)).expect("server did not stop")
    }

    /// SIGKILL.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), child.id().to_string()])
        .status();
}

fn wait_timeout(child: &mut Child, t: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + t;
    while Instant::now() < end {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A minimal HTTP/1.1 request; returns (status, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("")
        .to_string();
    // Chunked bodies: good enough for JSON assertions with `contains`.
    (status, body)
}

/// A replica in `dir` writing as `device`.
pub fn replica(dir: &Path, device: &str) -> Replica {
    Replica::open(
        dir.join(device),
        Writer {
            enumerator: format!("enum-{device}"),
            device: device.into(),
        },
    )
    .expect("open replica")
}

/// A household to register.
pub fn household(site: &str, name: &str) -> relais_core::household::NewHousehold {
    relais_core::household::NewHousehold {
        site: site.into(),
        head_name: name.into(),
        members: relais_core::household::parse_members("F:34,M:12,F:7").unwrap(),
        ..Default::default()
    }
}

/// A raw WebSocket to a running server.
pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens an authenticated WebSocket without speaking the protocol.
pub async fn ws_open(url: &str, token: &str) -> WsStream {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

/// Opens a WebSocket and completes the stock `join`/`peer` handshake as `peer`.
pub async fn ws_joined(url: &str, token: &str, peer: &str) -> WsStream {
    use futures_util::{SinkExt, StreamExt};
    use relais_core::protocol::message::{Message, PeerMetadata};
    use tokio_tungstenite::tungstenite::Message as Ws;
    let mut ws = ws_open(url, token).await;
    let join = Message::Join {
        sender_id: peer.into(),
        supported_protocol_versions: vec!["1".into()],
        peer_metadata: PeerMetadata::default(),
    };
    ws.send(Ws::Binary(join.encode().into())).await.unwrap();
    match ws.next().await {
        Some(Ok(Ws::Binary(b))) => assert!(matches!(Message::decode(&b), Ok(Message::Peer { .. }))),
        other => panic!("no peer reply: {other:?}"),
    }
    ws
}

/// A stock `request` for document `id` from an empty document, as frame bytes.
pub fn request_frame(peer: &str, id: &str) -> Vec<u8> {
    use automerge::sync::SyncDoc;
    use relais_core::protocol::message::{DocMessage, Message};
    let data = automerge::Automerge::new()
        .generate_sync_message(&mut automerge::sync::State::new())
        .unwrap()
        .encode();
    Message::Request(DocMessage {
        sender_id: peer.into(),
        target_id: "server".into(),
        document_id: id.into(),
        data,
    })
    .encode()
}

/// Creates a token through a running server's admin API and returns it. `scope` is the JSON
/// members for the scope, e.g. `"sites":["SOC-01"]`.
pub fn api_token(server: &Server, admin: &str, name: &str, role: &str, scope: &str) -> String {
    let body = format!(r#"{{"name":"{name}","role":"{role}",{scope}}}"#);
    let (status, text) = http(
        server.addr,
        "POST",
        "/api/v1/tokens",
        Some(admin),
        Some(&body),
    );
    assert_eq!(status, 201, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["token"].as_str().unwrap().to_string()
}

/// A listener that takes connections and never answers: a dead 2G route past the first
/// hop, or a captive portal. It holds each socket open, and counts them.
pub async fn mute_listener() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = taken.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(socket);
        }
    });
    (addr, taken)
}

/// A TCP proxy to `target` whose route can die without a reset: frozen, it forwards nothing
/// either way and answers nothing, but holds every socket open, new ones included. It
/// counts the connections it took, and can be slow towards the client (a poor link's
/// download).
pub struct FreezingProxy {
    /// Where to connect instead of the target.
    pub addr: SocketAddr,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    taken: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FreezingProxy {
    /// Starts forwarding to `target`.
    pub async fn start(target: SocketAddr) -> FreezingProxy {
        Self::start_throttled(target, None).await
    }

    /// Starts forwarding to `target`, at most `down` bytes a second towards the client.
    pub async fn start_throttled(target: SocketAddr, down: Option<usize>) -> FreezingProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (f, t) = (frozen.clone(), taken.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                t.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(Self::pipe(cr, sw, f.clone(), None));
                tokio::spawn(Self::pipe(sr, cw, f.clone(), down));
            }
        });
        FreezingProxy {
            addr,
            frozen,
            taken,
        }
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
        rate: Option<usize>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; rate.map_or(16 * 1024, |r| (r / 10).clamp(1, 16 * 1024))];
        loop {
            // Frozen: nothing is read, so the sender's buffers fill as on a dead route.
            while frozen.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while frozen.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
            if let Some(rate) = rate {
                tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
            }
        }
    }

    /// The route dies: nothing passes until [`FreezingProxy::thaw`].
    pub fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The route is back.
    pub fn thaw(&self) {
        self.frozen
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections taken so far.
    pub fn taken(&self) -> usize {
        self.taken.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The sync URL through the proxy.
    pub fn url(&self) -> String {
        format!("ws://{}/sync", self.addr)
    }
}
