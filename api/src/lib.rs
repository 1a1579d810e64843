//! Tether's shared types: the `tether.dev/v1alpha1` custom resources, the agent ↔ operator
//! wire protocol ([`machine_api`]) and enrollment token records ([`token`]).
//!
//! The types are plain serde + schemars structs so that every program can use them; the
//! `kube` feature adds the `CustomResource` derives (and with them the CRD manifests) for
//! the programs that talk to a Kubernetes API.

pub mod artifacts;
pub mod datastore;
pub mod machine;
pub mod machine_api;
pub mod tenant_control_plane;
pub mod token;
pub mod worker_pool;

pub use machine::{
    Artifact, BootImageSpec, BootImageStatus, Facts, MachineCertificate, MachinePhase, MachineSpec,
    MachineStatus,
};

#[cfg(feature = "kube")]
pub use machine::{BootImage, Machine};
#[cfg(feature = "kube")]
pub use worker_pool::WorkerPool;
pub use worker_pool::{WorkerPoolSpec, WorkerPoolStatus};

pub use datastore::{DataStoreSpec, DataStoreStatus, Driver};
pub use tenant_control_plane::{
    Condition, TenantControlPlanePhase, TenantControlPlaneSpec, TenantControlPlaneStatus,
};

#[cfg(feature = "kube")]
pub use datastore::DataStore;
#[cfg(feature = "kube")]
pub use tenant_control_plane::TenantControlPlane;

/// The API group every Tether resource belongs to.
pub const GROUP: &str = "tether.dev";
/// The API version of the resources in this crate.
pub const VERSION: &str = "v1alpha1";
