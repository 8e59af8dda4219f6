//! `relais field`: tablet commands over a local replica (filled in with relais-client).

use clap::Args;

/// Arguments of `relais field`.
#[derive(Args)]
pub struct FieldArgs {
    /// Directory of the local replica.
    #[arg(long)]
    replica: std::path::PathBuf,
}

/// Runs a field command.
pub fn run(args: FieldArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "relais field is not available in this build (replica {})",
        args.replica.display()
    )
}
