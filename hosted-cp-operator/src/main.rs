//! `tether-operator` command line.

use std::net::{IpAddr, SocketAddr};

use tether_operator::machine_api::Tuning;
use tether_operator::manager::{self, RuntimeKind};
use tether_operator::{crds, error, token};

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
        /// Where the machine API listens.
        #[arg(long, default_value = "0.0.0.0:9443")]
        machine_api_listen: SocketAddr,
        /// The URL machines reach the machine API at (a LoadBalancer or NodePort address
        /// on the node network, https://…). Without it the machine API is not served.
        #[arg(long)]
        machine_api_url: Option<String>,
        #[command(flatten)]
        machine_api: Tuning,
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
        /// This machine's address on the node network: the machine API and the tenant
        /// control planes are published there (loopback serves only this machine).
        #[arg(long, default_value = "127.0.0.1")]
        advertise_address: IpAddr,
        #[command(flatten)]
        machine_api: Tuning,
    },
    /// Enrollment tokens (the management cluster is found as kubectl finds it).
    Token {
        #[command(subcommand)]
        command: token::Command,
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
            machine_api_listen,
            machine_api_url,
            machine_api,
        } => {
            let api = machine_api_url.map(|url| machine_api.settings(machine_api_listen, url));
            tokio::runtime::Runtime::new()
                .map_err(Error::io("start async runtime", &data_dir))
                .and_then(|rt| {
                    rt.block_on(manager::run(
                        &data_dir,
                        &namespace,
                        runtime,
                        install_crds,
                        api,
                    ))
                })
        }
        Command::Standalone {
            data_dir,
            runtime,
            advertise_address,
            machine_api,
        } => tokio::runtime::Runtime::new()
            .map_err(Error::io("start async runtime", &data_dir))
            .and_then(|rt| {
                rt.block_on(tether_operator::standalone::run(
                    &data_dir,
                    runtime,
                    advertise_address,
                    &machine_api,
                ))
            }),
        Command::Token { command } => tokio::runtime::Runtime::new()
            .map_err(Error::io("start async runtime", "."))
            .and_then(|rt| rt.block_on(token::run(command))),
    };
    if let Err(e) = result {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}
