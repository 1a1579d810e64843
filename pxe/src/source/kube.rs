//! The cluster [`BootSource`]: `Machine` and `BootImage` objects in one namespace of the
//! management cluster.
//!
//! A MAC is looked up through the label `tether.dev/mac=<aa-bb-cc-dd-ee-ff>` (labels are
//! indexed by the apiserver; `spec.macs` is not). An unknown MAC becomes a `Machine` named
//! `mac-<12 hex>` — a name derived from the MAC, so two PXE servers racing on one segment
//! both try to create the same object and exactly one wins (the loser's `AlreadyExists` is
//! success) — with status phase `Discovered`.

use futures::FutureExt;
use futures::future::BoxFuture;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use tether_api::{BootImage, Machine, MachinePhase, MachineSpec, MachineStatus};

use super::{Assignment, BootSource};
use crate::error::{Error, Result};
use tether_boot::Mac;

/// Label carrying a machine's (boot) MAC.
pub const MAC_LABEL: &str = "tether.dev/mac";
/// Field manager for our writes.
const MANAGER: &str = "tether-pxe";

/// A [`BootSource`] backed by the management cluster.
#[derive(Clone)]
pub struct KubeSource {
    machines: Api<Machine>,
    images: Api<BootImage>,
    default_image: String,
}

impl KubeSource {
    /// Machines without `spec.image` boot `default_image`. `namespace` is the operator's
    /// (where boot tokens are minted).
    pub fn new(client: Client, namespace: &str, default_image: &str) -> KubeSource {
        let _ = namespace;
        KubeSource {
            machines: Api::all(client.clone()),
            images: Api::all(client),
            default_image: default_image.to_string(),
        }
    }

    /// Finds the machine with `mac`, creating it (phase `Discovered`) when there is none.
    /// Returns it and whether this call created it.
    pub async fn find_or_create(&self, mac: Mac) -> Result<(Machine, bool)> {
        let lp = ListParams::default().labels(&format!("{MAC_LABEL}={}", mac.dashed()));
        let list = self
            .machines
            .list(&lp)
            .await
            .map_err(Error::kube(format!("list machines with MAC {mac}")))?;
        if let Some(m) = list.items.into_iter().min_by_key(|m| m.name_any()) {
            return Ok((m, false));
        }
        let name = format!("mac-{}", mac.compact());
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
}

impl BootSource for KubeSource {
    fn assignment(&self, mac: Mac) -> BoxFuture<'_, Result<Assignment>> {
        async move {
            let (machine, discovered) = self.find_or_create(mac).await?;
            let image_name = machine
                .spec
                .image
                .clone()
                .unwrap_or_else(|| self.default_image.clone());
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
            Ok(Assignment {
                machine: machine.name_any(),
                discovered,
                image: image.spec,
            })
        }
        .boxed()
    }
}
