//! `tether-operator token create|list|delete`: join tokens for machines that do not PXE-boot
//! through tether-pxe (cloud-init, hand-written `agent.toml`). Like `kubeadm token create`,
//! `create` prints the token and nothing else on stdout — or, with `--user-data`, a NoCloud
//! user-data carrying the machine API URL, CA pin and token. The management cluster is found
//! as kubectl finds it (`KUBECONFIG`, `~/.kube/config`, in-cluster).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use tether_api::machine_api::{CONFIG_MAP, NAMESPACE};
use tether_api::token::parse_labels;
use tether_boot::seed::Seed;
use time::OffsetDateTime;

use crate::error::Error;
use crate::machine_api::tokens::{self, Tokens};

/// The token subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a join token and print it (`<id>.<secret>`), or a NoCloud user-data with
    /// `--user-data`.
    Create {
        /// How long it stays valid, e.g. `15m`, `24h`, `7d`.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many machines may enroll with it (default: unlimited until it expires).
        #[arg(long)]
        uses: Option<u32>,
        /// Pre-assign enrolled machines to this WorkerPool (`NAMESPACE/NAME`).
        #[arg(long)]
        pool: Option<String>,
        /// Labels enrolled machines get: `k=v,k2=v2`.
        #[arg(long, default_value = "")]
        labels: String,
        /// Print a NoCloud user-data (`#cloud-config`) instead of the bare token.
        #[arg(long)]
        user_data: bool,
        /// The operator's namespace.
        #[arg(long, default_value = NAMESPACE)]
        namespace: String,
    },
    /// List tokens (ids only; secrets are never stored).
    List {
        /// The operator's namespace.
        #[arg(long, default_value = NAMESPACE)]
        namespace: String,
    },
    /// Delete a token by id: machines can no longer enroll with it.
    Delete {
        /// The token id (the part before the dot).
        id: String,
        /// The operator's namespace.
        #[arg(long, default_value = NAMESPACE)]
        namespace: String,
    },
}

/// Runs a token subcommand against the ambient management cluster.
pub async fn run(cmd: Command) -> Result<(), Error> {
    let client = kube::Client::try_default()
        .await
        .map_err(Error::kube("connect to the management cluster"))?;
    match cmd {
        Command::Create {
            ttl,
            uses,
            pool,
            labels,
            user_data,
            namespace,
        } => {
            let labels: BTreeMap<String, String> = parse_labels(&labels).map_err(Error::Invalid)?;
            if uses == Some(0) {
                return Err(Error::Invalid(
                    "--uses 0 would make a token nobody can use".into(),
                ));
            }
            let ttl = time::Duration::try_from(ttl)
                .ok()
                .filter(|t| t.is_positive())
                .ok_or_else(|| Error::Invalid("--ttl must be positive".into()))?;
            // Read the API's coordinates first: a failure creates no token.
            let seed_parts = if user_data {
                Some(published(&client, &namespace).await?)
            } else {
                None
            };
            let token = Tokens::new(client, &namespace)
                .create_join(ttl, uses, pool, labels)
                .await?;
            match seed_parts {
                Some((url, pin)) => {
                    let seed = Seed::new(&url, pin, token)
                        .map_err(|e| Error::Invalid(format!("ConfigMap {CONFIG_MAP}: {e}")))?;
                    print!("{}", seed.to_user_data());
                }
                None => println!("{token}"),
            }
            Ok(())
        }
        Command::List { namespace } => {
            let now = OffsetDateTime::now_utc();
            println!(
                "{:<8} {:<5} {:<9} {:<9} {:<20} LABELS",
                "ID", "KIND", "TTL", "USES", "POOL/MAC"
            );
            for r in Tokens::new(client, &namespace).list().await? {
                println!("{}", tokens::list_line(&r, now));
            }
            Ok(())
        }
        Command::Delete { id, namespace } => {
            if Tokens::new(client, &namespace).delete(&id).await? {
                eprintln!("token {id} deleted");
                Ok(())
            } else {
                Err(Error::Invalid(format!("no token {id}")))
            }
        }
    }
}

/// The machine API's URL and pin as published by the operator.
async fn published(
    client: &kube::Client,
    namespace: &str,
) -> Result<(String, tether_boot::CaPin), Error> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = cms
        .get_opt(CONFIG_MAP)
        .await
        .map_err(Error::kube(format!("get ConfigMap {CONFIG_MAP}")))?
        .ok_or_else(|| {
            Error::Invalid(format!(
                "ConfigMap {namespace}/{CONFIG_MAP} does not exist: is the operator serving the machine API?"
            ))
        })?;
    tether_api::machine_api::published(&cm).map_err(Error::Invalid)
}
