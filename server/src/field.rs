//! `relais field`: tablet commands over a local replica, driving relais-client. Handy for
//! trainers and field tests, and a working example of embedding the client.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use relais_client::{Replica, SyncOptions, TlsTrust, Writer};
use relais_core::household::{parse_members, NewHousehold, Vulnerability};
use relais_core::ledger::Decision;
use relais_core::ledger::HouseholdView;
use relais_core::DocumentId;

/// Arguments of `relais field`.
#[derive(Args)]
pub struct FieldArgs {
    /// Directory of the local replica (created if missing).
    #[arg(long, env = "RELAIS_REPLICA")]
    replica: PathBuf,
    /// Enumerator code recorded with every write.
    #[arg(long, env = "RELAIS_ENUMERATOR", default_value = "enumerator")]
    enumerator: String,
    /// Device name recorded with every write.
    #[arg(long, env = "RELAIS_DEVICE", default_value = "field-cli")]
    device: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: FieldCmd,
}

#[derive(Subcommand)]
enum FieldCmd {
    /// Register a household.
    Register {
        /// Site code.
        #[arg(long)]
        site: String,
        /// Head of household's name.
        #[arg(long)]
        head: String,
        /// Members as SEX:AGE, head first, e.g. F:34,M:12,F:7.
        #[arg(long)]
        members: String,
        /// Declared size, if larger than the members listed.
        #[arg(long)]
        size: Option<u32>,
        /// Vulnerability criteria (repeat or comma-separate).
        #[arg(long = "vulnerability", value_delimiter = ',')]
        vulnerabilities: Vec<Vulnerability>,
        /// Locality of origin.
        #[arg(long)]
        origin: Option<String>,
        /// Host-community household rather than displaced.
        #[arg(long)]
        host: bool,
    },
    /// Record that a household received an item of a campaign.
    Distribute {
        /// Household id (bs58 or automerge: URL).
        #[arg(long)]
        household: String,
        /// Campaign code.
        #[arg(long)]
        campaign: String,
        /// Item code.
        #[arg(long)]
        item: String,
        /// Quantity.
        #[arg(long, default_value_t = 1)]
        quantity: u32,
        /// Date, YYYY-MM-DD [default: today].
        #[arg(long)]
        date: Option<String>,
    },
    /// List the households of a site.
    List {
        /// Site code.
        #[arg(long)]
        site: String,
    },
    /// Find households by head of household's name (accent- and case-insensitive).
    Find {
        /// Part of the name.
        name: String,
    },
    /// Show one household with its handouts and conflicts.
    Show {
        /// Household id.
        household: String,
    },
    /// Households that received the same item of a campaign twice (resolved or open).
    Doubles,
    /// Resolve a double handout: confirm every handout, or keep one and void the others.
    Resolve {
        /// Household id.
        #[arg(long)]
        household: String,
        /// Campaign code.
        #[arg(long)]
        campaign: String,
        /// Item code.
        #[arg(long)]
        item: String,
        /// Every handout happened (e.g. a replacement).
        #[arg(long, conflicts_with = "keep")]
        confirm_all: bool,
        /// Keep only handout number N (as `doubles` lists them), void the others.
        #[arg(long)]
        keep: Option<usize>,
    },
    /// Possible duplicate registrations among the households held here.
    Duplicates,
    /// Mark a household as a second registration of another.
    MarkDuplicate {
        /// The duplicate.
        #[arg(long)]
        household: String,
        /// The household it duplicates (which stays).
        #[arg(long)]
        of: String,
    },
    /// Figures over the households held here.
    Report,
    /// Sync with a server.
    Sync {
        /// Server sync URL, e.g. ws://127.0.0.1:7373/sync.
        #[arg(long, env = "RELAIS_SERVER")]
        server: String,
        /// Device token.
        #[arg(long, env = "RELAIS_TOKEN")]
        token: String,
        /// For wss://: trust server certificates issued by this CA (PEM) only.
        #[arg(long, conflicts_with = "pin")]
        ca: Option<std::path::PathBuf>,
        /// For wss://: accept only the certificate with this SHA-256 (hex, of its DER form).
        #[arg(long)]
        pin: Option<String>,
    },
    /// Pending changes and the last sync.
    Status,
}

fn print_household(v: &HouseholdView) {
    let h = &v.household;
    let doubles = v.distributions.iter().filter(|s| s.is_double()).count();
    println!(
        "{}  {:<28} size {:<2} site {:<8} handouts {}{}{}",
        v.id,
        h.head_name,
        h.size,
        h.site,
        v.distributions.len(),
        if doubles > 0 {
            format!("  DOUBLE x{doubles}")
        } else {
            String::new()
        },
        if v.conflicts.is_empty() {
            String::new()
        } else {
            format!("  CONFLICTS {}", v.conflicts.len())
        }
    );
}

fn parse_id(s: &str) -> anyhow::Result<DocumentId> {
    s.parse()
        .with_context(|| format!("{s:?} is not a household id"))
}

/// Runs a field command.
pub fn run(args: FieldArgs) -> anyhow::Result<()> {
    let replica = Arc::new(
        Replica::open(
            &args.replica,
            Writer {
                enumerator: args.enumerator,
                device: args.device,
            },
        )
        .with_context(|| format!("opening replica {}", args.replica.display()))?,
    );
    let l = replica.ledger();
    let json = args.json;
    let out =
        |v: serde_json::Value| println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    match args.command {
        FieldCmd::Register {
            site,
            head,
            members,
            size,
            vulnerabilities,
            origin,
            host,
        } => {
            let members = parse_members(&members).map_err(anyhow::Error::msg)?;
            let id = l.register(NewHousehold {
                site,
                head_name: head,
                members,
                size,
                host_community: host,
                origin,
                vulnerabilities,
                ..Default::default()
            })?;
            if json {
                out(serde_json::json!({ "id": id, "url": id.url() }));
            } else {
                println!("{id}");
            }
        }
        FieldCmd::Distribute {
            household,
            campaign,
            item,
            quantity,
            date,
        } => {
            let id = parse_id(&household)?;
            let date = date.unwrap_or_else(relais_core::ledger::today);
            let d = l.distribute_on(id, &campaign, &item, quantity, &date)?;
            if json {
                out(serde_json::to_value(&d)?);
            } else {
                println!(
                    "{} x{} of {} to {} on {}",
                    d.item, d.quantity, d.campaign, id, d.date
                );
            }
        }
        FieldCmd::List { site } => {
            let list = l.list_site(&site)?;
            if json {
                out(serde_json::to_value(&list)?);
            } else {
                for v in &list {
                    print_household(v);
                }
                println!("{} households at {site}", list.len());
            }
        }
        FieldCmd::Find { name } => {
            let list = l.find_by_name(&name)?;
            if json {
                out(serde_json::to_value(&list)?);
            } else {
                for v in &list {
                    print_household(v);
                }
            }
        }
        FieldCmd::Show { household } => {
            let v = l.household(parse_id(&household)?)?;
            if json {
                out(serde_json::to_value(&v)?);
            } else {
                print_household(&v);
                for s in &v.distributions {
                    for d in &s.handouts {
                        println!(
                            "  {} {} x{} on {} at {} by {} ({})",
                            d.campaign, d.item, d.quantity, d.date, d.site, d.enumerator, d.device
                        );
                    }
                }
                for c in &v.conflicts {
                    println!("  conflict on {}: {:?}", c.path, c.values);
                }
            }
        }
        FieldCmd::Doubles => {
            let list = l.double_distributions()?;
            if json {
                out(serde_json::to_value(&list)?);
            } else {
                for d in &list {
                    let devices: Vec<String> = d
                        .slot
                        .handouts
                        .iter()
                        .map(|h| format!("{} on {}", h.device, h.date))
                        .collect();
                    println!(
                        "{}  {} / {}: {}",
                        d.household,
                        d.slot.campaign,
                        d.slot.item,
                        devices.join(", ")
                    );
                }
                println!("{} double distributions", list.len());
            }
        }
        FieldCmd::Resolve {
            household,
            campaign,
            item,
            confirm_all,
            keep,
        } => {
            let decision = match (confirm_all, keep) {
                (true, _) => Decision::ConfirmAll,
                (false, Some(n)) => Decision::Keep(n),
                (false, None) => anyhow::bail!("say --confirm-all or --keep N"),
            };
            let r = l.resolve_double(parse_id(&household)?, &campaign, &item, decision)?;
            if json {
                out(serde_json::to_value(&r)?);
            } else {
                println!(
                    "{} {} {}: {} ({} voided); syncs at the next sync",
                    household,
                    campaign,
                    item,
                    r.decision,
                    r.voided.len()
                );
            }
        }
        FieldCmd::Duplicates => {
            let list = l.duplicate_candidates()?;
            if json {
                out(serde_json::to_value(&list)?);
            } else {
                crate::print_duplicates(&serde_json::to_value(&list)?);
            }
        }
        FieldCmd::MarkDuplicate { household, of } => {
            l.mark_duplicate(parse_id(&household)?, parse_id(&of)?)?;
            println!("{household} marked as a duplicate of {of}");
        }
        FieldCmd::Report => {
            let f = l.report(|_| true)?;
            if json {
                out(serde_json::to_value(&f)?);
            } else {
                crate::print_figures(&serde_json::to_value(&f)?);
            }
        }
        FieldCmd::Sync {
            server,
            token,
            ca,
            pin,
        } => {
            let tty = std::io::stderr().is_terminal() && !json;
            let tls = match (ca, pin) {
                (Some(ca), _) => TlsTrust::ca_file(ca)?,
                (None, Some(pin)) => TlsTrust::pinned_hex(&pin)?,
                (None, None) => TlsTrust::default(),
            };
            let opts = SyncOptions {
                tls,
                progress: tty.then(|| {
                    Arc::new(|left: usize, received: usize| {
                        eprint!(
                            "\rsyncing: {left:>6} documents in progress, {received:>6} received"
                        );
                    }) as Arc<dyn Fn(usize, usize) + Send + Sync>
                }),
                ..Default::default()
            };
            let rt = tokio::runtime::Runtime::new()?;
            let summary = rt.block_on(replica.sync_with(&server, &token, &opts));
            if tty {
                eprintln!();
            }
            let summary = summary?;
            if json {
                out(serde_json::to_value(&summary)?);
            } else {
                println!(
                    "synced with {}: {} documents sent, {} received, {} purged, {} B out, {} B in, {} ms",
                    summary.server,
                    summary.documents_sent,
                    summary.documents_received,
                    summary.documents_purged,
                    summary.bytes_sent,
                    summary.bytes_received,
                    summary.elapsed_ms
                );
            }
            if !summary.documents_refused.is_empty() {
                // On stderr even with --json, so that a refusal is never missed.
                eprintln!(
                    "the server refused the changes to {} documents; they stay here and the next sync offers them again:",
                    summary.documents_refused.len()
                );
                for r in &summary.documents_refused {
                    eprintln!("  {}: {}", r.id, r.reason);
                }
            }
        }
        FieldCmd::Status => {
            let s = replica.status()?;
            if json {
                out(serde_json::to_value(&s)?);
            } else {
                println!("pending documents  {}", s.pending_documents);
                println!(
                    "last sync          {}",
                    s.last_sync_ms
                        .map(|ms| format!(
                            "{} ({} s ago)",
                            ms,
                            (relais_core::ledger::now_ms() - ms) / 1000
                        ))
                        .unwrap_or_else(|| "never".into())
                );
                println!(
                    "server             {}",
                    s.last_server.unwrap_or_else(|| "none".into())
                );
            }
        }
    }
    Ok(())
}
