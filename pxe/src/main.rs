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

async fn serve_until_signal(args: ServeArgs) -> tether_pxe::Result<()> {
    let prepared = serve::prepare(args).await?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(tether_pxe::Error::io("install", "SIGTERM handler"))?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        let _ = tx.send(true);
    });
    serve::run(prepared, rx).await
}

fn main() {
    let cli = Cli::parse();
    cli.log.init();
    let result = match cli.command {
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(tether_pxe::Error::io("start", "tokio runtime"))
            .and_then(|rt| rt.block_on(serve_until_signal(*args))),
    };
    if let Err(e) = result {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}
