//! Controllers of the site's machines. Today: [`reachability`], which marks Machines whose
//! agent stopped reporting. WorkerPool claims and rollouts arrive with their issues.

pub mod reachability;
