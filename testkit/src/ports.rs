//! Free loopback ports for test components.

/// A TCP port on 127.0.0.1 that was free a moment ago. Ports handed out by this process are
/// never repeated, which removes most collisions between components of one test. The
/// allocation itself is the operator's ([`tether_operator::ports::free_port`]).
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    tether_operator::ports::free_port(given.get_or_insert_with(HashSet::new))
        .expect("bind an ephemeral loopback port")
}
