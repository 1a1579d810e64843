//! Free loopback ports, for everything that picks its own: standalone's management plane,
//! the process runtime's tenants and the test harness.

use std::collections::HashSet;
use std::net::TcpListener;

use crate::error::Error;

/// A TCP port on 127.0.0.1 that was free a moment ago and is not in `taken`; it is added
/// to `taken`. The kernel may hand the same ephemeral port out twice in a row, so callers
/// that allocate several ports at once pass the ones they already hold.
pub fn free_port(taken: &mut HashSet<u16>) -> Result<u16, Error> {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(Error::io("bind a free port", "127.0.0.1:0"))?
            .port();
        if taken.insert(port) {
            return Ok(port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_never_repeated() {
        let mut taken = HashSet::new();
        let ports: Vec<u16> = (0..50).map(|_| free_port(&mut taken).unwrap()).collect();
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
        assert_eq!(taken, unique);
    }
}
