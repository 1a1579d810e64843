//! The operator: tenant control planes hosted as workloads ([`controlplane`]), the site's
//! machines ([`machines`]) and the HTTPS API their agents talk to ([`machine_api`]), all
//! started by [`manager`]; [`standalone`] is a whole management plane on one machine.
//! [`kube`], [`x509`], [`fs`] and [`ports`] are the helpers every part shares.

pub mod artifacts;
pub mod binaries;
pub mod controlplane;
pub mod crds;
pub mod error;
pub mod fs;
pub mod kube;
pub mod machine_api;
pub mod machines;
pub mod manager;
pub mod ports;
pub mod standalone;
pub mod token;
pub mod x509;

pub use error::Error;
