//! `cargo xtask`: the project's entry points (see the README).
//!
//! - `deps`  installs missing Debian packages and builds the pinned upstream binaries;
//! - `env`   prints shell lines that put the cached binaries on PATH;
//! - `test`  deps + fmt + clippy + every test (what CI runs);
//! - `up`    the local quickstart: a tenant and PXE-booted workers that join it;
//! - `bench` the benchmarks.

mod bench;
mod deps;
mod error;
mod steps;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Tether project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install missing Debian packages and build missing upstream binaries into the cache.
    Deps {
        /// Do not touch Debian packages (for hosts where someone else manages them).
        #[arg(long)]
        no_apt: bool,
    },
    /// Print shell lines putting the pinned binaries on PATH: `eval "$(cargo xtask env)"`.
    Env,
    /// Install what is missing, then run fmt, clippy and every test.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// The local quickstart: management plane, tenant control plane, PXE-booted workers.
    Up {
        /// Worker VMs (qemu, TCG) to boot and join.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=254))]
        workers: u32,
        /// Boot the workers from `disk.raw` with a NoCloud seed instead of PXE.
        #[arg(long)]
        cloud_init: bool,
        /// Tear everything down once the nodes are Ready instead of running until Ctrl-C.
        #[arg(long)]
        exit: bool,
    },
    /// Run a benchmark area and print its figures.
    Bench {
        /// The area: cp, deps, enroll, image, join, pxe, store or tunnel.
        area: String,
        /// For `deps`: also measure a cold build (fresh Go build cache and binary cache).
        #[arg(long)]
        cold: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Deps { no_apt } => deps::run(!no_apt).map(|_| ()),
        Command::Env => deps::print_env(),
        Command::Test { cargo_test_args } => steps::test(&cargo_test_args),
        Command::Up {
            workers,
            cloud_init,
            exit,
        } => up::run(up::Options {
            workers,
            cloud_init,
            exit,
        }),
        Command::Bench { area, cold } => bench::run(&area, cold),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
