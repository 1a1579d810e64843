//! `tether-agent` command line.

use clap::{Parser, Subcommand};
use tether_telemetry::LogArgs;

/// The Tether node agent: enrolls this machine, joins it to its cluster and keeps it upgraded.
#[derive(Parser)]
#[command(name = "tether-agent", version, about)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (what the systemd unit starts). For now it announces its version and
    /// stays up until stopped; enrollment and join arrive with their issues.
    Run,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    cli.log.init();
    match cli.command {
        Command::Run => {
            tracing::info!(version = env!("CARGO_PKG_VERSION"), "tether-agent started");
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("install SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("tether-agent stopping");
        }
    }
}
