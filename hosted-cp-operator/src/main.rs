//! `tether-operator` command line.

use tether_operator::manager::{self, RuntimeKind};
use tether_operator::{crds, error};

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
    /// Run the operator against an existing management cluster (KUBECONFIG or in-cluster).
    Run {
        /// How tenants run.
        #[arg(long, value_enum, default_value = "kubernetes")]
        runtime: RuntimeKind,
        /// Namespace whose Secrets hold DataStore credentials.
        #[arg(long, default_value = "tether-system")]
        namespace: String,
        /// Local state: etcdctl credentials, metrics, and the process runtime's tenants.
        #[arg(long, default_value = "/var/lib/tether-operator")]
        data_dir: std::path::PathBuf,
        /// Apply the CRDs before starting.
        #[arg(long)]
        install_crds: bool,
    },
    /// Print the CustomResourceDefinitions of the tether.dev API as YAML documents.
    Crds,
    /// Start a whole management plane on this machine: embedded etcd + kube-apiserver, the
    /// default DataStore, and the operator on the process runtime.
    Standalone {
        /// Where the embedded etcd, certificates and kubeconfigs live.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// How tenants run (`kubernetes` only renders Deployments here: no nodes).
        #[arg(long, value_enum, default_value_t)]
        runtime: RuntimeKind,
    },
}

fn main() {
    let cli = Cli::parse();
    cli.log.init();
    let result = match cli.command {
        Command::Crds => crds::print(),
        Command::Run {
            runtime,
            namespace,
            data_dir,
            install_crds,
        } => tokio::runtime::Runtime::new()
            .map_err(Error::io("start async runtime", &data_dir))
            .and_then(|rt| rt.block_on(manager::run(&data_dir, &namespace, runtime, install_crds))),
        Command::Standalone { data_dir, runtime } => tokio::runtime::Runtime::new()
            .map_err(Error::io("start async runtime", &data_dir))
            .and_then(|rt| rt.block_on(tether_operator::standalone::run(&data_dir, runtime))),
    };
    if let Err(e) = result {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}
