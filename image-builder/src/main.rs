//! `tether-image` command line.

mod error;

use clap::{Parser, Subcommand};
use tether_telemetry::LogArgs;

use crate::error::Error;

/// Builds the immutable node boot image from a declarative spec.
#[derive(Parser)]
#[command(name = "tether-image", version, about)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build an image from a TOML spec (not implemented yet).
    Build,
}

fn main() {
    let cli = Cli::parse();
    cli.log.init();
    let result: Result<(), Error> = match cli.command {
        Command::Build => Err(Error::NotYet("build")),
    };
    if let Err(e) = result {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}
