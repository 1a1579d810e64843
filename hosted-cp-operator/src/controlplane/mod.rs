//! TenantControlPlane: tenant control planes hosted as workloads.
//!
//! Pure layers first: [`pki`] and [`kubeconfig`] decide what certificates and kubeconfigs a
//! tenant needs; [`render`] turns a spec into runtime-neutral component descriptions;
//! [`runtime`] runs them (supervised processes, or Deployments in a management cluster);
//! [`datastore`] carves a tenant out of a shared etcd or PostgreSQL. [`controller`] is the
//! controller whose [`pipeline`] runs one [`steps`] type per owned object, in order.

pub mod addons;
pub mod bootstrap;
pub mod component;
pub mod controller;
pub mod datastore;
pub mod kubeconfig;
pub mod pipeline;
pub mod pki;
pub mod render;
pub mod runtime;
pub mod steps;

/// Label on every Secret of a tenant (value: tenant name).
pub const TENANT_LABEL: &str = "tether.dev/tenant";
/// The DataStore used when neither spec nor status names one.
pub const DEFAULT_DATASTORE: &str = "default";
