//! The CRDs of the tether.dev API, generated from the types in `tether-api`.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::{Api, Patch, PatchParams};
use tether_api::{BootImage, DataStore, Machine, TenantControlPlane, WorkerPool};

use crate::error::Error;
use crate::kube::MANAGER;

/// Every CRD the operator owns, in apply order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        Machine::crd(),
        BootImage::crd(),
        DataStore::crd(),
        TenantControlPlane::crd(),
        WorkerPool::crd(),
    ]
}

/// Prints all CRDs as a multi-document YAML stream.
pub fn print() -> Result<(), Error> {
    for crd in all() {
        let yaml = serde_yaml::to_string(&crd).map_err(|source| Error::Render {
            what: "CRD",
            source,
        })?;
        println!("---\n{yaml}");
    }
    Ok(())
}

/// Applies every CRD and waits until each is established.
pub async fn install(client: &kube::Client) -> Result<(), Error> {
    let pp = PatchParams::apply(MANAGER).force();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &pp, &Patch::Apply(&crd))
            .await
            .map_err(Error::kube(format!("apply CRD {name}")))?;
    }
    for crd in all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let cond = kube::runtime::conditions::is_crd_established();
        tokio::time::timeout(
            Duration::from_secs(30),
            kube::runtime::wait::await_condition(crds.clone(), &name, cond),
        )
        .await
        .map_err(|_| Error::Timeout(format!("CRD {name} established")))?
        .map_err(|e| Error::Invalid(format!("wait for CRD {name}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn crds_have_group_and_status() {
        for crd in super::all() {
            assert_eq!(crd.spec.group, "tether.dev");
            let v = &crd.spec.versions[0];
            assert_eq!(v.name, "v1alpha1");
            assert!(
                v.subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some()
            );
        }
    }
}
