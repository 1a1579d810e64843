//! The tests that run on the shared site ([`tether_vm_tests::site`]): one test binary, so
//! the image is built and the site (segment, site DHCP, standalone, tether-pxe) started
//! once per run for all of them.

mod enroll;
mod join_kills;
mod node_artifacts;
mod tunnel;
mod workers;
