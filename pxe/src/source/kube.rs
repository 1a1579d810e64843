//! The cluster [`BootSource`]: the management cluster's cluster-scoped `Machine` and
//! `BootImage` objects, plus the machine API's publication and boot tokens in the operator's
//! namespace.
//!
//! A MAC is looked up through the label `tether.dev/mac=<aa-bb-cc-dd-ee-ff>` (labels are
//! indexed by the apiserver; `spec.macs` is not). An unknown MAC that DHCP'd on our segment
//! becomes a `Machine` named `mac-<12 hex>` — a name derived from the MAC, so two PXE servers
//! racing on one segment both try to create the same object and exactly one wins (the
//! loser's `AlreadyExists` is success) — with status phase `Discovered`.
//!
//! Every script rendered for a MAC seen on the segment carries a fresh boot token: single
//! use, bound to that MAC, [`BOOT_TOKEN_TTL`] long, its record a Secret in the operator's
//! namespace labelled with this server's id, written before the script is served. The URL
//! and CA pin of the machine API come from the ConfigMap `tether-system/tether-machine-api`
//! (flags may override either); without it no token is minted and no script served.
//! Expired tokens of this server are deleted every [`GC_PERIOD`].

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use tether_api::machine::MAC_LABEL;
use tether_api::machine_api::CONFIG_MAP;
use tether_api::token::{KIND_LABEL, TokenKind, TokenRecord};
use tether_api::{BootImage, Machine, MachinePhase, MachineSpec, MachineStatus};
use tether_boot::{CaPin, Mac, Token};
use time::OffsetDateTime;
use tokio::sync::watch;

use super::{Assignment, BootSource};
use crate::error::{Error, Result};
use crate::script::Enrollment;

/// Label on the boot tokens a server minted: its id (by default its address on the segment).
pub const SERVER_LABEL: &str = "tether.dev/pxe-server";
/// How long a boot token works: a TCG VM needs minutes from script to enrollment; a real
/// server a few.
pub const BOOT_TOKEN_TTL: time::Duration = time::Duration::minutes(15);
/// How often expired boot tokens are deleted.
pub const GC_PERIOD: Duration = Duration::from_secs(60);
/// Secrets listed per page when collecting expired tokens.
const GC_PAGE: u32 = 250;
/// Pages per collection round; what is left waits for the next round.
const GC_MAX_PAGES: usize = 20;
/// Field manager for our writes.
const MANAGER: &str = "tether-pxe";

/// What the cluster source is told at start-up.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// The operator's namespace: the machine API ConfigMap and the boot tokens.
    pub namespace: String,
    /// The BootImage of machines that name none.
    pub default_image: String,
    /// Machine API URL, instead of the ConfigMap's `url`.
    pub api_url: Option<String>,
    /// Machine API CA pin, instead of the ConfigMap's `caPin`.
    pub ca_pin: Option<CaPin>,
    /// This server's id, the value of [`SERVER_LABEL`] on the tokens it mints.
    pub server_id: String,
}

/// A [`BootSource`] backed by the management cluster.
#[derive(Clone)]
pub struct KubeSource {
    machines: Api<Machine>,
    images: Api<BootImage>,
    secrets: Api<Secret>,
    config_maps: Api<ConfigMap>,
    opts: Arc<KubeOptions>,
}

impl KubeSource {
    /// A source on `client`; the options' URL is checked here.
    pub fn new(client: Client, opts: KubeOptions) -> Result<KubeSource> {
        Enrollment::new(opts.api_url.clone(), None, None)?;
        check_label_value(&opts.server_id)?;
        Ok(KubeSource {
            machines: Api::all(client.clone()),
            images: Api::all(client.clone()),
            secrets: Api::namespaced(client.clone(), &opts.namespace),
            config_maps: Api::namespaced(client, &opts.namespace),
            opts: Arc::new(opts),
        })
    }

    /// The machine API's URL and CA pin: the flags', else the ConfigMap's.
    pub async fn machine_api(&self) -> Result<(String, CaPin)> {
        if let (Some(u), Some(p)) = (&self.opts.api_url, self.opts.ca_pin) {
            return Ok((u.clone(), p));
        }
        let ns = &self.opts.namespace;
        let cm = self
            .config_maps
            .get_opt(CONFIG_MAP)
            .await
            .map_err(Error::kube(format!("get ConfigMap {ns}/{CONFIG_MAP}")))?
            .ok_or_else(|| {
                Error::Unpublished(format!(
                    "ConfigMap {ns}/{CONFIG_MAP} not found (is tether-operator running? \
                     --api-url and --ca-pin stand in for it)"
                ))
            })?;
        let (url, pin) = tether_api::machine_api::published(&cm)
            .map_err(|e| Error::Unpublished(format!("{ns}/{e}")))?;
        Ok((
            self.opts.api_url.clone().unwrap_or(url),
            self.opts.ca_pin.unwrap_or(pin),
        ))
    }

    /// Finds the machine with `mac`; when there is none and `create` is set, creates it
    /// (phase `Discovered`). Returns it and whether this call created it.
    pub async fn find_or_create(&self, mac: Mac, create: bool) -> Result<(Machine, bool)> {
        let lp = ListParams::default().labels(&format!("{MAC_LABEL}={}", mac.dashed()));
        let list = self
            .machines
            .list(&lp)
            .await
            .map_err(Error::kube(format!("list machines with MAC {mac}")))?;
        let owner = tether_api::machine::owner_of_mac(list.items.iter().map(|m| m.name_any()));
        if let Some(m) = list.items.into_iter().find(|m| Some(m.name_any()) == owner) {
            return Ok((m, false));
        }
        if !create {
            return Err(Error::NotSeen {
                mac: mac.to_string(),
            });
        }
        let name = mac.machine_name();
        let machine = Machine {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(MAC_LABEL.to_string(), mac.dashed())].into()),
                ..Default::default()
            },
            spec: MachineSpec {
                macs: vec![mac.to_string()],
                ..Default::default()
            },
            status: None,
        };
        let pp = PostParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        };
        match self.machines.create(&pp, &machine).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let m = self
                    .machines
                    .get(&name)
                    .await
                    .map_err(Error::kube(format!("get machine {name}")))?;
                return Ok((m, false));
            }
            Err(e) => return Err(Error::kube(format!("create machine {name}"))(e)),
        };
        let status = serde_json::json!({ "status": MachineStatus {
            phase: MachinePhase::Discovered,
            ..Default::default()
        }});
        let m = self
            .machines
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(Error::kube(format!("set machine {name} Discovered")))?;
        tracing::info!(%mac, machine = %name, "discovered unknown machine");
        Ok((m, true))
    }

    /// The Secret that records `token`, minted for `mac` at `now`.
    pub fn token_secret(&self, token: &Token, mac: Mac, now: OffsetDateTime) -> Secret {
        let record = TokenRecord::boot(token, mac, now, BOOT_TOKEN_TTL);
        let mut s = record.to_secret(&self.opts.namespace);
        let labels = s.metadata.labels.get_or_insert_with(Default::default);
        labels.insert(SERVER_LABEL.into(), self.opts.server_id.clone());
        labels.insert(MAC_LABEL.into(), mac.dashed());
        s
    }

    /// Deletes this server's boot tokens that expired before `now`; returns how many. Lists
    /// in bounded pages; Secrets it cannot read are left alone (and logged).
    pub async fn collect_expired(&self, now: OffsetDateTime) -> Result<usize> {
        let selector = format!(
            "{KIND_LABEL}={},{SERVER_LABEL}={}",
            TokenKind::Boot.name(),
            self.opts.server_id
        );
        let mut lp = ListParams::default().labels(&selector).limit(GC_PAGE);
        let mut deleted = 0;
        for _ in 0..GC_MAX_PAGES {
            let page = self
                .secrets
                .list(&lp)
                .await
                .map_err(Error::kube("list boot tokens"))?;
            for s in &page.items {
                let name = s.name_any();
                match TokenRecord::from_secret(s) {
                    Ok(r) if r.expires <= now => {
                        match self.secrets.delete(&name, &DeleteParams::default()).await {
                            Ok(_) => deleted += 1,
                            Err(kube::Error::Api(e)) if e.code == 404 => {}
                            Err(e) => {
                                return Err(Error::kube(format!("delete boot token {name}"))(e));
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(secret = %name, "unreadable boot token left alone: {e}")
                    }
                }
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => lp.continue_token = Some(c),
                None => break,
            }
        }
        Ok(deleted)
    }

    /// Collects expired tokens every `period` until `shutdown` flips. A failed round is
    /// logged and retried next period: the apiserver being away is no reason to stop
    /// booting machines.
    pub async fn collect_expired_every(
        self,
        period: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            match self.collect_expired(OffsetDateTime::now_utc()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "expired boot tokens deleted"),
                Err(e) => tracing::warn!("boot token clean-up: {e}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

fn check_label_value(v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && v.as_bytes()[0].is_ascii_alphanumeric()
        && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(Error::Config {
            path: "flags".into(),
            detail: format!(
                "server id {v:?} is not a Kubernetes label value (1-63 of A-Z a-z 0-9 - _ ., alphanumeric at both ends)"
            ),
        })
    }
}

impl BootSource for KubeSource {
    fn assignment(&self, mac: Mac, seen: bool) -> BoxFuture<'_, Result<Assignment>> {
        async move {
            // First: without a published machine API nothing is created at all.
            let (api_url, ca_pin) = self.machine_api().await?;
            let (machine, discovered) = self.find_or_create(mac, seen).await?;
            let image_name = machine
                .spec
                .image
                .clone()
                .unwrap_or_else(|| self.opts.default_image.clone());
            let image = self
                .images
                .get_opt(&image_name)
                .await
                .map_err(Error::kube(format!("get boot image {image_name}")))?
                .ok_or_else(|| Error::NoPlan {
                    mac: mac.to_string(),
                    detail: format!(
                        "machine {} wants BootImage {image_name:?}, which does not exist",
                        machine.name_any()
                    ),
                })?;
            // A token only for a machine on our segment: minting writes a Secret.
            let token = if seen { Some(Token::generate()?) } else { None };
            Ok(Assignment {
                machine: machine.name_any(),
                discovered,
                image: image.spec,
                enroll: Enrollment::new(Some(api_url), Some(ca_pin), token.clone())?,
                minted: token.is_some(),
            })
        }
        .boxed()
    }

    fn commit<'a>(&'a self, mac: Mac, a: &'a Assignment) -> BoxFuture<'a, Result<()>> {
        async move {
            let Some(token) = a.enroll.token.as_ref().filter(|_| a.minted) else {
                return Ok(());
            };
            let secret = self.token_secret(token, mac, OffsetDateTime::now_utc());
            let pp = PostParams {
                field_manager: Some(MANAGER.into()),
                ..Default::default()
            };
            self.secrets
                .create(&pp, &secret)
                .await
                .map_err(Error::kube(format!("create boot token {}", token.id())))?;
            tracing::info!(%mac, token = token.id(), machine = %a.machine, "boot token minted");
            Ok(())
        }
        .boxed()
    }
}
