//! The artifact store: the OCI registry the management plane runs (DESIGN.md "Artifacts
//! and images without a registry"). Nodes mirror `registry.k8s.io` to it and download node
//! artifacts from it by digest; the operator (or xtask) pushes.

/// ConfigMap in [`crate::machine_api::NAMESPACE`] where the store's address is published.
pub const CONFIG_MAP: &str = "tether-registry";
/// Its key: `host:port` the node network reaches (plain HTTP; content is pulled by digest).
pub const KEY_ADDRESS: &str = "address";
