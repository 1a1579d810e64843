//! `tether-operator` command line.

mod crds;
mod error;

use clap::{Parser, Subcommand};
use tether_telemetry::LogArgs;

use crate::error::Error;

/// Hosts tenant Kubernetes control planes and manages the machines that join them.
#[derive(Parser)]
#[command(name = "tether-operator", version, about)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions of the tether.dev API as YAML documents.
    Crds,
    /// Start a whole management plane on this machine (not implemented yet).
    Standalone {
        /// Where the embedded etcd, certificates and kubeconfigs live.
        #[arg(long)]
        data_dir: std::path::PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    cli.log.init();
    let result = match cli.command {
        Command::Crds => crds::print(),
        Command::Standalone { .. } => Err(Error::NotYet("standalone mode")),
    };
    if let Err(e) = result {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}
