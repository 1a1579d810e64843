//! `tether-pxe` command line.

use clap::{Parser, Subcommand};
use tether_pxe::serve::{self, ServeArgs};
use tether_telemetry::LogArgs;

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
    /// Serve DHCP (proxy by default), TFTP and HTTP until SIGTERM or SIGINT.
    Serve(Box<ServeArgs>),
}

fn main() {
    let cli = Cli::parse();
    cli.log.init();
    let code = match cli.command {
        Command::Serve(args) => serve::exit_code(serve::serve_until_signal(*args)),
    };
    std::process::exit(code);
}
