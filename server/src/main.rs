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

mod field;

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
    /// What the store holds.
    Status(DataArg),
    /// Field tablet commands over a local replica (for trainers, testing and as an example).
    Field(field::FieldArgs),
}

#[derive(Args, Clone)]
struct DataArg {
    /// Data directory holding relais.redb.
    #[arg(long, env = "RELAIS_DATA", default_value = config::DEFAULT_DATA)]
    data: PathBuf,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7373].
    #[arg(long, env = "RELAIS_LISTEN")]
    listen: Option<String>,
    /// Data directory; the store is DIR/relais.redb [default: ./relais-data].
    #[arg(long, env = "RELAIS_DATA")]
    data: Option<PathBuf>,
    /// TOML file with any of: listen, data, max-frame-bytes, send-buffer-bytes, max-loaded-docs.
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

fn admin_ledger(data: &std::path::Path) -> anyhow::Result<Ledger> {
    Ok(Ledger::new(
        open(data)?,
        Writer {
            enumerator: "admin-cli".into(),
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

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RELAIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() {
    let cli = Cli::parse();
    init_tracing();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
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
                println!(
                    "relais listening on http://{addr} (sync: ws://{addr}/sync), store {}",
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
            } => {
                let store = open(&data.data)?;
                let (token, rec) = tokens::create(&store, &name, role, Scope { regions, sites })?;
                eprintln!(
                    "created token {:?} (role {}); it is shown once, keep it safe:",
                    rec.name,
                    rec.role.as_str()
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
                tokens::revoke(&store, &name)?;
                println!("revoked {name}");
                Ok(())
            }
        },
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
        Command::Status(data) => {
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
