//! TenantControlPlane: tenant control planes hosted as workloads.
//!
//! Pure layers first: [`pki`] and [`kubeconfig`] decide what certificates and kubeconfigs a
//! tenant needs; [`render`] turns a spec into runtime-neutral component descriptions;
//! [`runtime`] runs them (supervised processes, or Deployments in a management cluster);
//! [`datastore`] carves a tenant out of a shared etcd or PostgreSQL; [`controller`] runs the
//! ordered reconcile pipeline.

pub mod addons;
pub mod bootstrap;
pub mod component;
pub mod controller;
pub mod datastore;
pub mod kubeconfig;
pub mod pki;
pub mod render;
pub mod runtime;
