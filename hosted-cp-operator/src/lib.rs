//! The operator's control-plane half: tenant control planes hosted as workloads.
//!
//! Layers, pure first: [`pki`] and [`kubeconfig`] decide what certificates and kubeconfigs
//! a tenant needs; [`render`] turns a spec into runtime-neutral component descriptions;
//! [`runtime`] runs them (supervised processes, or Deployments in a management cluster);
//! [`datastore`] carves a tenant out of a shared etcd or PostgreSQL; [`controller`] runs the
//! ordered reconcile pipeline; [`standalone`] starts a whole management plane on one machine.
//! [`kube`], [`x509`], [`fs`] and [`ports`] are the helpers every part shares.

pub mod addons;
pub mod binaries;
pub mod bootstrap;
pub mod controller;
pub mod crds;
pub mod datastore;
pub mod error;
pub mod fs;
pub mod kube;
pub mod kubeconfig;
pub mod pki;
pub mod ports;
pub mod render;
pub mod runtime;
pub mod standalone;
pub mod x509;

pub use error::Error;
