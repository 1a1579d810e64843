//! The TenantControlPlane pipeline's steps, one type per owned object (apply and clean-up
//! together), plus the steps that only decide. [`STEPS`] is their order: apply runs it
//! forwards, deletion backwards.

pub mod bootstrap;
pub mod components;
pub mod config;
pub mod datastore;
pub mod kubeconfigs;
pub mod pki;
pub mod prepare;
pub mod status;

use super::pipeline::Step;

/// Every step in apply order. The names are the metrics series `cargo xtask bench cp`
/// reports, so they stay stable.
pub static STEPS: &[&dyn Step] = &[
    &prepare::Validate,
    &prepare::DataStoreLookup,
    &prepare::VersionGate,
    &prepare::Place,
    &pki::PkiSecret,
    &kubeconfigs::KubeconfigSecrets,
    &datastore::DataStoreCarveOut,
    &config::ConfigSecret,
    &components::Components,
    &components::Readyz,
    &bootstrap::TenantBootstrap,
    &status::Status,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_run_in_the_documented_order_under_stable_names() {
        let names: Vec<&str> = STEPS.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "validate",
                "datastore-lookup",
                "version-gate",
                "placement",
                "pki",
                "kubeconfigs",
                "datastore",
                "config",
                "components",
                "readyz",
                "bootstrap",
                "status",
            ]
        );
    }
}
