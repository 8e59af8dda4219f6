//! The `relais` command: run the sync server and administer its store.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use relais_core::access::{Role, Scope};
use relais_core::campaign::{parse_entitlement, Campaign};
use relais_core::ledger::{Ledger, Writer};
use relais_core::site::{Site, SiteKind};
use relais_core::store::{Store, StoreError};
use relais_server::config::{self, FileConfig, ServerConfig};
use relais_server::tokens;

mod bench;
mod demo;
mod field;
mod shaping;
mod soak;

/// Relais: offline-first sync for humanitarian field registrations and distributions.
#[derive(Parser)]
#[command(name = "relais", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sync server (WebSocket at /sync, admin API at /api/v1, /healthz, /metrics).
    Serve(ServeArgs),
    /// Create, list and revoke device tokens (server stopped; use the API while it runs).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Reference data: sites.
    #[command(subcommand)]
    Site(SiteCmd),
    /// Reference data: campaigns.
    #[command(subcommand)]
    Campaign(CampaignCmd),
    /// What the store holds (server stopped), or a running server's state (--server).
    Status(StatusArgs),
    /// Households: erase one (right to erasure, retention).
    #[command(subcommand)]
    Household(HouseholdCmd),
    /// Read the audit log: who did what to which document, and when.
    Audit(AuditArgs),
    /// Devices (tokens) and when each was last connected (running server).
    Devices(RemoteArgs),
    /// Rewrite the store file (server stopped), so no byte of an erased household remains.
    Compact(DataArg),
    /// Figures as DTM reports present them, double handouts, possible duplicates.
    Report(ReportArgs),
    /// CSV exports: sites and distributions (aggregated, --hxl for HXL tags), households
    /// (personal data: admins only, audited).
    Export(ExportArgs),
    /// See the whole point in one command: a server, tablets in Mopti and Gao working offline,
    /// a sync, merged figures, a double handout and a duplicate registration flagged.
    Demo(demo::DemoArgs),
    /// Load generator: a real server driven by simulated tablets; prints throughput,
    /// latency, sync sizes, server memory and CPU (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// Field tablet commands over a local replica (for trainers, testing and as an example).
    Field(field::FieldArgs),
}

#[derive(Args, Clone)]
struct DataArg {
    /// Data directory holding relais.redb.
    #[arg(long, env = "RELAIS_DATA", default_value = config::DEFAULT_DATA)]
    data: PathBuf,
}

/// Talk to a running server through its admin API instead of opening the store.
#[derive(Args, Clone, Default)]
struct RemoteArgs {
    /// Base URL of a running server, e.g. http://127.0.0.1:7373 or https://bamako.example.org.
    #[arg(long, env = "RELAIS_SERVER")]
    server: Option<String>,
    /// Admin token for --server.
    #[arg(long, env = "RELAIS_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// CA certificate (PEM) to verify an https server by.
    #[arg(long)]
    ca: Option<PathBuf>,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    data: DataArg,
    #[command(flatten)]
    remote: RemoteArgs,
}

#[derive(Subcommand)]
enum HouseholdCmd {
    /// Erase a household: its document and personal data leave the server; a tombstone
    /// remains, every replica purges its copy at its next sync, and none can bring it back.
    Erase {
        /// Household id (or automerge: URL).
        id: String,
        #[command(flatten)]
        data: DataArg,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ReportKind {
    /// Households, individuals, sex, age, vulnerabilities, items distributed.
    Figures,
    /// Households that received the same item of a campaign twice.
    Doubles,
    /// Possible duplicate registrations.
    Duplicates,
}

#[derive(Args)]
struct ReportArgs {
    /// What to report.
    #[arg(value_enum, default_value = "figures")]
    what: ReportKind,
    #[command(flatten)]
    data: DataArg,
    #[command(flatten)]
    remote: RemoteArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ExportKind {
    /// Per site: households, individuals, sex, age bands, vulnerable households.
    Sites,
    /// Per campaign, site and item: quantity and households reached.
    Distributions,
    /// One row per household, with names and contacts (admins only; audited).
    Households,
}

#[derive(Args)]
struct ExportArgs {
    /// What to export.
    #[arg(value_enum)]
    kind: ExportKind,
    /// Add the HXL hashtag row under the header (aggregated exports).
    #[arg(long)]
    hxl: bool,
    /// Organisation for #org+impl.
    #[arg(long, default_value = "IOM")]
    org: String,
    /// Write to this file instead of stdout.
    #[arg(long, short)]
    out: Option<PathBuf>,
    #[command(flatten)]
    data: DataArg,
    #[command(flatten)]
    remote: RemoteArgs,
}

#[derive(Args)]
struct AuditArgs {
    #[command(flatten)]
    data: DataArg,
    #[command(flatten)]
    remote: RemoteArgs,
    /// Only entries at or after this time: YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS] (UTC).
    #[arg(long)]
    since: Option<String>,
    /// Only entries by this token name.
    #[arg(long)]
    token: Option<String>,
    /// Only this action: sync-read, write, refused-write, export, erase, token-created,
    /// token-revoked.
    #[arg(long)]
    action: Option<String>,
    /// Only entries about this document.
    #[arg(long)]
    document: Option<String>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7373].
    #[arg(long, env = "RELAIS_LISTEN")]
    listen: Option<String>,
    /// Data directory; the store is DIR/relais.redb [default: ./relais-data].
    #[arg(long, env = "RELAIS_DATA")]
    data: Option<PathBuf>,
    /// TOML file with any of: listen, data, max-frame-bytes, send-buffer-bytes, max-loaded-docs,
    /// cache-mib, sync-workers, tls-cert, tls-key, upstream, upstream-token, upstream-ca.
    #[arg(long, env = "RELAIS_CONFIG")]
    config: Option<PathBuf>,
    /// Largest WebSocket message accepted, in bytes [default: 16 MiB].
    #[arg(long, env = "RELAIS_MAX_FRAME_BYTES")]
    max_frame_bytes: Option<usize>,
    /// Bytes queued per connection before a stalled reader is dropped [default: 32 MiB].
    #[arg(long, env = "RELAIS_SEND_BUFFER_BYTES")]
    send_buffer_bytes: Option<usize>,
    /// Documents kept in memory before idle ones are evicted [default: 20000].
    #[arg(long, env = "RELAIS_MAX_LOADED_DOCS")]
    max_loaded_docs: Option<usize>,
    /// Memory for the store's page cache, in MiB [default: 64].
    #[arg(long, env = "RELAIS_CACHE_MIB")]
    cache_mib: Option<usize>,
    /// Threads that apply the documents of one pushed batch at once [default: the cores, at most 8].
    #[arg(long, env = "RELAIS_SYNC_WORKERS")]
    sync_workers: Option<usize>,
    /// Certificate chain (PEM): serve https:// and wss:// (needs --tls-key).
    #[arg(long, env = "RELAIS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "RELAIS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Replicate with this upstream server, e.g. wss://bamako.example.org/sync.
    #[arg(long, env = "RELAIS_UPSTREAM", requires = "upstream_token")]
    upstream: Option<String>,
    /// A replica token issued by the upstream server.
    #[arg(long, env = "RELAIS_UPSTREAM_TOKEN", hide_env_values = true)]
    upstream_token: Option<String>,
    /// CA certificate (PEM) to verify the upstream server by.
    #[arg(long, env = "RELAIS_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token; it is printed once, on the last line of stdout.
    Create {
        #[command(flatten)]
        data: DataArg,
        /// Device or office name, e.g. tab-mopti-07.
        #[arg(long)]
        name: String,
        /// admin, replica, manager, enumerator or viewer.
        #[arg(long, default_value = "enumerator")]
        role: Role,
        /// Regions (admin1) in scope, comma-separated.
        #[arg(long, value_delimiter = ',')]
        regions: Vec<String>,
        /// Site codes in scope, comma-separated.
        #[arg(long, value_delimiter = ',')]
        sites: Vec<String>,
        /// The whole store, every region and site (needed for any role but admin when no
        /// sites or regions are given).
        #[arg(long)]
        all: bool,
    },
    /// List tokens (names, roles, scopes; never the tokens).
    List(DataArg),
    /// Revoke a token by name.
    Revoke {
        #[command(flatten)]
        data: DataArg,
        /// Token name.
        name: String,
    },
    /// Change a token's scope; its devices purge what the new scope no longer covers.
    Scope {
        #[command(flatten)]
        data: DataArg,
        /// Token name.
        #[arg(long)]
        name: String,
        /// Regions (admin1) in scope, comma-separated.
        #[arg(long, value_delimiter = ',')]
        regions: Vec<String>,
        /// Site codes in scope, comma-separated.
        #[arg(long, value_delimiter = ',')]
        sites: Vec<String>,
        /// The whole store, every region and site.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum SiteCmd {
    /// Create or update a site.
    Add {
        #[command(flatten)]
        data: DataArg,
        /// Site code, e.g. SOC-01.
        #[arg(long)]
        code: String,
        /// Site name, e.g. Socoura.
        #[arg(long)]
        name: String,
        /// Region (admin1).
        #[arg(long)]
        adm1: String,
        /// Cercle (admin2).
        #[arg(long)]
        adm2: String,
        /// Commune (admin3).
        #[arg(long)]
        adm3: Option<String>,
        /// official-site, host-community or collective-centre.
        #[arg(long = "type", default_value = "official-site")]
        kind: SiteKind,
    },
}

#[derive(Subcommand)]
enum CampaignCmd {
    /// Create or update a campaign.
    Add {
        #[command(flatten)]
        data: DataArg,
        /// Campaign code, e.g. JP-2023.
        #[arg(long)]
        code: String,
        /// Campaign name.
        #[arg(long)]
        name: String,
        /// Donor or project code.
        #[arg(long)]
        donor: Option<String>,
        /// First day, YYYY-MM-DD.
        #[arg(long)]
        start: Option<String>,
        /// Last day, YYYY-MM-DD.
        #[arg(long)]
        end: Option<String>,
        /// Item and entitlement per household, e.g. nfi-kit:1 (repeat for each item).
        #[arg(long = "item", required = true)]
        items: Vec<String>,
        /// Site codes served, comma-separated.
        #[arg(long, value_delimiter = ',')]
        sites: Vec<String>,
    },
}

fn open(data: &std::path::Path) -> anyhow::Result<Store> {
    let path = config::store_path(data);
    match Store::open(&path) {
        Ok(s) => Ok(s),
        Err(StoreError::Locked(p)) => bail!(
            "{} is in use by a running server; stop it, or use the admin API (/api/v1) instead",
            p.display()
        ),
        Err(e) => Err(e).with_context(|| format!("opening {}", path.display())),
    }
}

/// The name the local command line acts as in the audit log.
const ADMIN_CLI: &str = "admin-cli";

fn describe_scope(s: &Scope) -> String {
    if s.is_all() {
        "everything".into()
    } else {
        format!(
            "regions={} sites={}",
            s.regions.join(","),
            s.sites.join(",")
        )
    }
}

fn format_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let date = relais_core::ledger::date_of_days(days);
    format!(
        "{date} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn audit(args: AuditArgs) -> anyhow::Result<()> {
    use relais_core::audit::{parse_time, AuditAction, AuditFilter};
    let since = args
        .since
        .as_deref()
        .map(parse_time)
        .transpose()
        .map_err(|e| anyhow::anyhow!(e))?;
    let action = args
        .action
        .as_deref()
        .map(str::parse::<AuditAction>)
        .transpose()
        .map_err(|e| anyhow::anyhow!(e))?;
    let document = args
        .document
        .as_deref()
        .map(|d| {
            d.trim_start_matches("automerge:")
                .parse::<relais_core::DocumentId>()
        })
        .transpose()
        .map_err(|e| anyhow::anyhow!("bad document id: {e}"))?;
    let print = |e: &serde_json::Value| {
        if args.json {
            println!("{e}");
        } else {
            println!(
                "{}\t{}\t{}\t{}\t{}",
                e["at"].as_i64().map(format_ms).unwrap_or_default(),
                e["token"].as_str().unwrap_or(""),
                e["action"].as_str().unwrap_or(""),
                e["document"].as_str().unwrap_or("-"),
                e["detail"].as_str().unwrap_or("")
            );
        }
    };
    let mut after = 0u64;
    if let Some(r) = args.remote.connect()? {
        let mut q = Vec::new();
        if let Some(s) = since {
            q.push(format!("since={s}"));
        }
        if let Some(t) = &args.token {
            q.push(format!("token={}", urlencode(t)));
        }
        if let Some(a) = action {
            q.push(format!("action={}", a.as_str()));
        }
        if let Some(d) = document {
            q.push(format!("document={d}"));
        }
        loop {
            let mut query = q.clone();
            query.push(format!("after={after}"));
            let page = r.call("GET", &format!("/api/v1/audit?{}", query.join("&")), None)?;
            for e in page["entries"].as_array().into_iter().flatten() {
                print(e);
            }
            match page["next"].as_u64() {
                Some(n) => after = n,
                None => return Ok(()),
            }
        }
    }
    let store = open(&args.data.data)?;
    let filter = AuditFilter {
        since,
        token: args.token.clone(),
        action,
        document,
    };
    loop {
        let (entries, next) = relais_server::audit_page(&store, &filter, after, 4_096)?;
        for e in &entries {
            print(e);
        }
        match next {
            Some(n) => after = n,
            None => return Ok(()),
        }
    }
}

fn report(args: ReportArgs) -> anyhow::Result<()> {
    let path = match args.what {
        ReportKind::Figures => "figures",
        ReportKind::Doubles => "doubles",
        ReportKind::Duplicates => "duplicates",
    };
    let value = if let Some(r) = args.remote.connect()? {
        r.call("GET", &format!("/api/v1/reports/{path}"), None)?
    } else {
        let ledger = admin_ledger(&args.data.data)?;
        match args.what {
            ReportKind::Figures => serde_json::to_value(ledger.report(|_| true)?)?,
            ReportKind::Doubles => serde_json::to_value(ledger.double_distributions()?)?,
            ReportKind::Duplicates => serde_json::to_value(ledger.duplicate_candidates()?)?,
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    match args.what {
        ReportKind::Figures => print_figures(&value),
        ReportKind::Doubles => print_doubles(&value),
        ReportKind::Duplicates => print_duplicates(&value),
    }
    Ok(())
}

/// Prints figures (as JSON from the ledger or the API) as tables.
pub(crate) fn print_figures(f: &serde_json::Value) {
    println!(
        "{:<8} {:<10} {:<8} {:>10} {:>11} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6}",
        "region",
        "cercle",
        "site",
        "households",
        "individuals",
        "female",
        "male",
        "0-4",
        "5-17",
        "18-59",
        "60+"
    );
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let rows = f["sites"].as_array().cloned().unwrap_or_default();
    let total = f["total"].clone();
    for s in rows.iter().chain(std::iter::once(&total)) {
        let site = s["site"]
            .as_str()
            .filter(|x| !x.is_empty())
            .unwrap_or("TOTAL");
        println!(
            "{:<8} {:<10} {:<8} {:>10} {:>11} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6}",
            s["admin1"].as_str().unwrap_or(""),
            s["admin2"].as_str().unwrap_or(""),
            site,
            n(&s["households"]),
            n(&s["individuals"]),
            n(&s["female"]),
            n(&s["male"]),
            n(&s["age_0_4"]),
            n(&s["age_5_17"]),
            n(&s["age_18_59"]),
            n(&s["age_60_plus"])
        );
    }
    if let Some(v) = total["vulnerabilities"]
        .as_object()
        .filter(|v| !v.is_empty())
    {
        let parts: Vec<String> = v.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!("vulnerable households: {}", parts.join(", "));
    }
    if f["duplicates_excluded"].as_u64().unwrap_or(0) > 0 {
        println!(
            "{} households marked as duplicates are not counted",
            f["duplicates_excluded"]
        );
    }
    let dist = f["distributions"].as_array().cloned().unwrap_or_default();
    if !dist.is_empty() {
        println!();
        println!(
            "{:<10} {:<8} {:<14} {:>8} {:>18}",
            "campaign", "site", "item", "quantity", "households reached"
        );
        for d in dist {
            println!(
                "{:<10} {:<8} {:<14} {:>8} {:>18}",
                d["campaign"].as_str().unwrap_or(""),
                d["site"].as_str().unwrap_or(""),
                d["item"].as_str().unwrap_or(""),
                n(&d["quantity"]),
                n(&d["households_reached"])
            );
        }
    }
}

/// Prints double handouts as a list.
pub(crate) fn print_doubles(v: &serde_json::Value) {
    let list = v.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no double handouts");
    }
    for d in list {
        let state = match d["resolution"]["decision"].as_str() {
            Some(dec) => format!(
                "resolved ({dec} by {})",
                d["resolution"]["by"].as_str().unwrap_or("")
            ),
            None => "OPEN".to_string(),
        };
        println!(
            "household {}: {} {} x{} — {state}",
            d["household"].as_str().unwrap_or(""),
            d["slot"]["campaign"].as_str().unwrap_or(""),
            d["slot"]["item"].as_str().unwrap_or(""),
            d["slot"]["handouts"].as_array().map(Vec::len).unwrap_or(0)
        );
        for (i, h) in d["slot"]["handouts"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            println!(
                "  [{i}] {} at {} by {} on {}",
                h["date"].as_str().unwrap_or(""),
                h["site"].as_str().unwrap_or(""),
                h["enumerator"].as_str().unwrap_or(""),
                h["device"].as_str().unwrap_or("")
            );
        }
    }
}

/// Prints duplicate candidates.
pub(crate) fn print_duplicates(v: &serde_json::Value) {
    let list = v.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no possible duplicate registrations");
    }
    for c in list {
        let reasons: Vec<&str> = c["reasons"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str())
            .collect();
        println!(
            "{} ~ {}  score {}  ({})",
            c["a"].as_str().unwrap_or(""),
            c["b"].as_str().unwrap_or(""),
            c["score"],
            reasons.join(", ")
        );
    }
}

fn export(args: ExportArgs) -> anyhow::Result<()> {
    use relais_core::export::{write_distributions, write_sites, ExportContext, HouseholdWriter};
    use std::io::Write;
    let mut out: Box<dyn Write> = match &args.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let file = match args.kind {
        ExportKind::Sites => "sites.csv",
        ExportKind::Distributions => "distributions.csv",
        ExportKind::Households => "households.csv",
    };
    if let Some(r) = args.remote.connect()? {
        let text = r.get_text(&format!(
            "/api/v1/exports/{file}?hxl={}&org={}",
            u8::from(args.hxl),
            urlencode(&args.org)
        ))?;
        out.write_all(text.as_bytes())?;
        out.flush()?;
        return Ok(());
    }
    let ledger = admin_ledger(&args.data.data)?;
    let ctx = ExportContext {
        date: relais_core::ledger::today(),
        org: args.org.clone(),
    };
    match args.kind {
        ExportKind::Sites => write_sites(&mut out, &ledger.report(|_| true)?, &ctx, args.hxl)?,
        ExportKind::Distributions => {
            write_distributions(&mut out, &ledger.report(|_| true)?, &ctx, args.hxl)?
        }
        ExportKind::Households => {
            ledger.store().audit(&[relais_core::audit::AuditEntry::now(
                ADMIN_CLI,
                relais_core::audit::AuditAction::Export,
                None,
            )
            .with_detail("households.csv")])?;
            let ids = ledger.household_ids(|_| true)?;
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let mut w = HouseholdWriter::new(&mut out)?;
            for (n, id) in ids.iter().enumerate() {
                if let Some((h, slots)) = ledger.household_lite(*id)? {
                    w.write(*id, &h, &slots)?;
                }
                if tty && (n % 500 == 0 || n + 1 == ids.len()) {
                    eprint!("\rexporting households: {}/{}", n + 1, ids.len());
                }
            }
            if tty {
                eprintln!();
            }
            w.finish()?;
        }
    }
    out.flush()?;
    Ok(())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Remote {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl RemoteArgs {
    /// `None` when no --server was given: work on the local store.
    fn connect(&self) -> anyhow::Result<Option<Remote>> {
        let Some(server) = &self.server else {
            return Ok(None);
        };
        let Some(token) = &self.admin_token else {
            bail!("--server needs --admin-token (or RELAIS_ADMIN_TOKEN)");
        };
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
            let certs = ureq::tls::parse_pem(&pem)
                .filter_map(|i| match i {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect::<Vec<_>>();
            if certs.is_empty() {
                bail!("{} holds no PEM certificate", ca.display());
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        let agent = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(120)))
            .build()
            .new_agent();
        Ok(Some(Remote {
            base: server.trim_end_matches('/').to_string(),
            token: token.clone(),
            agent,
        }))
    }
}

impl Remote {
    fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let url = format!("{}{}", self.base, path);
        let mut resp = self
            .agent
            .get(&url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .call()
            .with_context(|| format!("cannot reach {}", self.base))?;
        let status = resp.status().as_u16();
        // Exports can be large: no 10 MB cap.
        let text = resp
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_string()?;
        if status >= 400 {
            bail!("{} answered {status}: {text}", self.base);
        }
        Ok(text)
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{}", self.base, path);
        let auth = format!("Bearer {}", self.token);
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &auth)
                .call(),
            (_, Some(b)) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(b),
            _ => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_empty(),
        };
        let mut resp = resp.with_context(|| format!("cannot reach {}", self.base))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let value: serde_json::Value =
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        if status >= 400 {
            let msg = value["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            bail!("{} answered {status}: {msg}", self.base);
        }
        Ok(value)
    }
}

fn admin_ledger(data: &std::path::Path) -> anyhow::Result<Ledger> {
    Ok(Ledger::new(
        open(data)?,
        Writer {
            enumerator: ADMIN_CLI.into(),
            device: "server".into(),
        },
    )?)
}

fn resolve(args: ServeArgs) -> anyhow::Result<ServerConfig> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let d = ServerConfig::default();
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| config::DEFAULT_LISTEN.to_string());
    Ok(ServerConfig {
        listen: listen.parse().with_context(|| {
            format!("--listen {listen:?} is not an address like 127.0.0.1:7373")
        })?,
        data: args.data.or(file.data).unwrap_or(d.data),
        max_frame_bytes: args
            .max_frame_bytes
            .or(file.max_frame_bytes)
            .unwrap_or(d.max_frame_bytes),
        send_buffer_bytes: args
            .send_buffer_bytes
            .or(file.send_buffer_bytes)
            .unwrap_or(d.send_buffer_bytes)
            .max(1),
        max_loaded_docs: args
            .max_loaded_docs
            .or(file.max_loaded_docs)
            .unwrap_or(d.max_loaded_docs),
        cache_mib: args
            .cache_mib
            .or(file.cache_mib)
            .unwrap_or(d.cache_mib)
            .max(1),
        sync_workers: args
            .sync_workers
            .or(file.sync_workers)
            .unwrap_or(d.sync_workers)
            .max(1),
        tls: match (
            args.tls_cert.or(file.tls_cert),
            args.tls_key.or(file.tls_key),
        ) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => bail!("TLS needs both a certificate (tls-cert) and a private key (tls-key)"),
        },
        upstream: match (
            args.upstream.or(file.upstream),
            args.upstream_token.or(file.upstream_token),
        ) {
            (Some(url), Some(token)) => Some(config::Upstream {
                url,
                token,
                ca: args.upstream_ca.or(file.upstream_ca),
            }),
            (None, _) => None,
            (Some(_), None) => bail!("an upstream needs a token (upstream-token)"),
        },
        peer_idle: d.peer_idle,
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RELAIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() {
    let cli = Cli::parse();
    // The demo narrates on stdout; its server only speaks up about problems.
    init_tracing(
        if matches!(cli.command, Command::Demo(_) | Command::Bench(_)) {
            "warn"
        } else {
            "info"
        },
    );
    if let Err(e) = run(cli) {
        eprintln!("error: {}", error_message(&e));
        std::process::exit(1);
    }
}

/// An error and its causes on one line, each said once: the library errors name their cause
/// in their own message too, so `{:#}` would repeat it. A full disk gets a hint.
fn error_message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    // ENOSPC, and EFBIG (a file size limit) which looks the same to the store.
    if out.contains("(os error 28)") || out.contains("(os error 27)") {
        out.push_str(
            "\n(the disk is full, or the file reached its size limit: nothing saved before is \
             lost; free some space and run it again)",
        );
    }
    out
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let cfg = resolve(args)?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let store = relais_server::open_store(&cfg).map_err(|e| {
                    if format!("{e:#}").contains("already open") {
                        anyhow::anyhow!("{e:#}")
                    } else {
                        e
                    }
                })?;
                let listener = tokio::net::TcpListener::bind(cfg.listen)
                    .await
                    .with_context(|| format!("cannot listen on {}", cfg.listen))?;
                let addr = listener.local_addr()?;
                let (http, ws) = if cfg.tls.is_some() {
                    ("https", "wss")
                } else {
                    ("http", "ws")
                };
                println!(
                    "relais listening on {http}://{addr} (sync: {ws}://{addr}/sync), store {}",
                    cfg.store_path().display()
                );
                if store.is_empty()? && tokens::list(&store)?.is_empty() {
                    println!(
                        "no tokens yet: stop the server and run `relais token create --data {} --name admin --role admin`",
                        cfg.data.display()
                    );
                }
                relais_server::serve(cfg, store, listener, shutdown_signal()).await
            })
        }
        Command::Token(cmd) => match cmd {
            TokenCmd::Create {
                data,
                name,
                role,
                regions,
                sites,
                all,
            } => {
                let scope = tokens::scope_for(role, Scope { regions, sites }, all)?;
                let store = open(&data.data)?;
                let (token, rec) = tokens::create(&store, &name, role, scope, ADMIN_CLI)?;
                eprintln!(
                    "created token {:?} (role {}, covering {}); it is shown once, keep it safe:",
                    rec.name,
                    rec.role.as_str(),
                    describe_scope(&rec.scope)
                );
                println!("{token}");
                Ok(())
            }
            TokenCmd::List(data) => {
                let store = open(&data.data)?;
                for r in tokens::list(&store)? {
                    let scope = if r.scope.is_all() {
                        "everything".to_string()
                    } else {
                        format!(
                            "regions={} sites={}",
                            r.scope.regions.join(","),
                            r.scope.sites.join(",")
                        )
                    };
                    let state = if r.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    };
                    println!("{}\t{}\t{}\t{}", r.name, r.role.as_str(), state, scope);
                }
                Ok(())
            }
            TokenCmd::Revoke { data, name } => {
                let store = open(&data.data)?;
                tokens::revoke(&store, &name, ADMIN_CLI)?;
                println!("revoked {name}");
                Ok(())
            }
            TokenCmd::Scope {
                data,
                name,
                regions,
                sites,
                all,
            } => {
                let store = open(&data.data)?;
                let rec =
                    tokens::set_scope(&store, &name, Scope { regions, sites }, all, ADMIN_CLI)?;
                println!("{name} now covers {}", describe_scope(&rec.scope));
                Ok(())
            }
        },
        Command::Household(HouseholdCmd::Erase { id, data, remote }) => {
            let doc: relais_core::DocumentId = id
                .trim_start_matches("automerge:")
                .parse()
                .map_err(|e| anyhow::anyhow!("bad household id {id:?}: {e}"))?;
            if let Some(r) = remote.connect()? {
                r.call("DELETE", &format!("/api/v1/households/{doc}"), None)?;
            } else {
                let mut store = open(&data.data)?;
                if store.erase_household(doc, ADMIN_CLI)?.is_none() {
                    bail!("unknown household {doc} in {}", data.data.display());
                }
                store.compact_file()?;
            }
            println!("erased household {doc}; replicas purge it at their next sync");
            Ok(())
        }
        Command::Audit(args) => audit(args),
        Command::Report(args) => report(args),
        Command::Export(args) => export(args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Compact(data) => {
            let mut store = open(&data.data)?;
            let before = std::fs::metadata(store.path())
                .map(|m| m.len())
                .unwrap_or(0);
            store.compact_file()?;
            let after = std::fs::metadata(store.path())
                .map(|m| m.len())
                .unwrap_or(0);
            println!(
                "compacted {}: {before} B -> {after} B",
                store.path().display()
            );
            Ok(())
        }
        Command::Devices(remote) => {
            let Some(r) = remote.connect()? else {
                bail!("devices are tracked by a running server: pass --server and --admin-token");
            };
            let list = r.call("GET", "/api/v1/devices", None)?;
            for d in list.as_array().into_iter().flatten() {
                let seen = d["last_seen"]
                    .as_i64()
                    .map(format_ms)
                    .unwrap_or_else(|| "never".into());
                println!(
                    "{}\t{}\t{}\tconnections={}\tlast seen {}",
                    d["name"].as_str().unwrap_or(""),
                    d["role"].as_str().unwrap_or(""),
                    if d["revoked"].as_bool() == Some(true) {
                        "revoked"
                    } else {
                        "active"
                    },
                    d["connections"],
                    seen
                );
            }
            Ok(())
        }
        Command::Site(SiteCmd::Add {
            data,
            code,
            name,
            adm1,
            adm2,
            adm3,
            kind,
        }) => {
            let ledger = admin_ledger(&data.data)?;
            let id = ledger.put_site(&Site {
                code: code.clone(),
                name,
                kind,
                admin1: adm1,
                admin2: adm2,
                admin3: adm3,
            })?;
            println!("site {code} saved as {}", id.url());
            Ok(())
        }
        Command::Campaign(CampaignCmd::Add {
            data,
            code,
            name,
            donor,
            start,
            end,
            items,
            sites,
        }) => {
            let ledger = admin_ledger(&data.data)?;
            let items = items
                .iter()
                .map(|i| parse_entitlement(i))
                .collect::<Result<Vec<_>, _>>()?;
            let id = ledger.put_campaign(&Campaign {
                code: code.clone(),
                name,
                donor,
                start,
                end,
                items,
                sites,
            })?;
            println!("campaign {code} saved as {}", id.url());
            Ok(())
        }
        Command::Status(StatusArgs { data, remote }) => {
            if let Some(r) = remote.connect()? {
                let v = r.call("GET", "/api/v1/status", None)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let store = open(&data.data)?;
            let docs = store.list()?;
            let count = |k| docs.iter().filter(|(_, m)| m.info.kind == k).count();
            use relais_core::document::DocKind;
            println!("store        {}", store.path().display());
            println!("documents    {}", docs.len());
            println!("  sites      {}", count(DocKind::Site));
            println!("  households {}", count(DocKind::Household));
            println!("  campaigns  {}", count(DocKind::Campaign));
            println!("  other      {}", count(DocKind::Other));
            println!("feed seq     {}", store.last_seq()?);
            println!("tokens       {}", tokens::list(&store)?.len());
            Ok(())
        }
        Command::Field(args) => field::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::error_message;

    #[derive(Debug, thiserror::Error)]
    #[error("local storage: {0}")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn an_error_names_each_cause_once_and_a_full_disk_gets_a_hint() {
        let io = std::io::Error::from_raw_os_error(28);
        let e = anyhow::Error::new(Outer(io)).context("sync failed");
        let m = error_message(&e);
        assert_eq!(m.matches("os error 28").count(), 1, "{m}");
        assert!(m.starts_with("sync failed: local storage: "), "{m}");
        assert!(m.contains("free some space"), "{m}");
        let plain = error_message(&anyhow::anyhow!("bad token"));
        assert_eq!(plain, "bad token");
    }
}
