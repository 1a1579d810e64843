//! The CRDs of the tether.dev API, generated from the types in `tether-api`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use tether_api::{BootImage, DataStore, Machine, TenantControlPlane};

use crate::error::Error;

/// Every CRD the operator owns, in apply order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        Machine::crd(),
        BootImage::crd(),
        DataStore::crd(),
        TenantControlPlane::crd(),
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
