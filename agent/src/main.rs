//! `tether-agent` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tether_agent::identity::{DEFAULT_STATE_DIR, StateDir};
use tether_agent::notify::Notifier;
use tether_agent::service::Service;
use tether_agent::{enroll, facts, inputs};
use tether_boot::seed::Seed;
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
    /// The service (what the systemd unit starts): enroll if needed, then long-poll the
    /// desired config, report status and renew the certificate until stopped.
    Run {
        /// Where the machine key and certificate live.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Enroll once and exit: 0 when enrolled (or already enrolled), non-zero with the reason.
    /// Without --api/--ca-pin/--token the inputs are found as `run` finds them.
    Enroll {
        /// Machine API base URL.
        #[arg(long, requires_all = ["ca_pin", "token"])]
        api: Option<String>,
        /// The machine API CA's pin, sha256:<hex>.
        #[arg(long, requires_all = ["api", "token"])]
        ca_pin: Option<String>,
        /// Enrollment token <id>.<secret>.
        #[arg(long, requires_all = ["api", "ca_pin"])]
        token: Option<String>,
        /// Where the machine key and certificate live.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Print the facts the agent reports (JSON) and where its inputs come from.
    Facts,
    /// Fetch one artifact by digest the way the agent installs node binaries (resumable
    /// `.part`, size and sha256 checked, renamed into place) and print what it did.
    Fetch {
        /// The blob's URL (`http://STORE/v2/<repo>/blobs/sha256:…`).
        #[arg(long)]
        url: String,
        /// Its sha256 (hex).
        #[arg(long)]
        sha256: String,
        /// Its size in bytes.
        #[arg(long)]
        size: u64,
        /// Where to put it.
        dest: PathBuf,
    },
}

fn seed(
    api: Option<String>,
    pin: Option<String>,
    token: Option<String>,
) -> Result<Option<Seed>, String> {
    let (Some(api), Some(pin), Some(token)) = (api, pin, token) else {
        return Ok(None);
    };
    let pin = pin.parse().map_err(|e: tether_boot::Error| e.to_string())?;
    let token = token
        .parse()
        .map_err(|e: tether_boot::Error| e.to_string())?;
    Seed::new(&api, pin, token)
        .map(Some)
        .map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.log.init();
    let root = PathBuf::from("/");
    let result: Result<(), String> = match cli.command {
        Command::Run { state_dir } => {
            tracing::info!(version = env!("CARGO_PKG_VERSION"), "tether-agent started");
            Service {
                root,
                state: StateDir::new(state_dir),
                notify: Notifier::default(),
            }
            .run()
            .await
            .map_err(|e| e.to_string())
        }
        Command::Enroll {
            api,
            ca_pin,
            token,
            state_dir,
        } => {
            let state = StateDir::new(state_dir);
            match (seed(api, ca_pin, token), state.load()) {
                (Err(e), _) => Err(e),
                (_, Ok(Some(id))) => {
                    println!("already enrolled as {}", id.enrolled.machine);
                    Ok(())
                }
                (Ok(seed), _) => enroll::enroll(&root, &state, seed, &Notifier::default())
                    .await
                    .map(|id| println!("enrolled as {}", id.enrolled.machine))
                    .map_err(|e| e.to_string()),
            }
        }
        Command::Fetch {
            url,
            sha256,
            size,
            dest,
        } => match tether_agent::node::download::client() {
            Err(e) => Err(e.to_string()),
            Ok(client) => {
                let want = tether_agent::node::download::Want {
                    url: &url,
                    sha256: &sha256,
                    size,
                };
                tether_agent::node::download::fetch(&client, &want, &dest)
                    .await
                    .map(|outcome| println!("{}: {outcome:?}", dest.display()))
                    .map_err(|e| e.to_string())
            }
        },
        Command::Facts => {
            let boot = inputs::boot_params(&root).unwrap_or_default();
            let f = facts::gather(&root, &boot, &facts::live_links());
            println!(
                "{}",
                serde_json::to_string_pretty(&f).expect("facts serialize")
            );
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("tether-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
