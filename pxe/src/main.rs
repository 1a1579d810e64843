//! `tether-pxe` command line.

mod error;

use clap::{Parser, Subcommand};
use tether_telemetry::LogArgs;

use crate::error::Error;

/// Boots a fleet over the network: proxyDHCP/DHCP, TFTP and HTTP in one program.
#[derive(Parser)]
#[command(name = "tether-pxe", version, about)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve DHCP, TFTP and HTTP on an interface (not implemented yet).
    Serve,
}

fn main() {
    let cli = Cli::parse();
    cli.log.init();
    let result: Result<(), Error> = match cli.command {
        Command::Serve => Err(Error::NotYet("serve")),
    };
    if let Err(e) = result {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}
