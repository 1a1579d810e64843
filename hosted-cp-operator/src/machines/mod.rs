//! Controllers of the site's machines:
//! - [`pool`]: the WorkerPool controller — claims free Machines ([`claim`]), renders each
//!   one's join ([`join`]) with a per-Machine bootstrap token ([`bootstrap_tokens`]) and the
//!   node artifacts resolved in the store ([`store`]) and a konnectivity token
//!   ([`tunnel_tokens`]), gives machines back ([`release`]);
//! - [`csr`] approves or denies kubelet certificate requests in tenants, per Machine;
//! - [`reachability`] marks Machines whose agent stopped reporting.
//!
//! Rolling upgrades arrive with their issue.

pub mod bootstrap_tokens;
pub mod claim;
pub mod csr;
pub mod join;
pub mod pool;
pub mod reachability;
pub mod release;
pub mod store;
pub mod tunnel_tokens;
