//! End-to-end tests that boot real machines.
//!
//! The tests live in `tests/`: nodes as `systemd-nspawn` containers (real systemd, real
//! D-Bus) and, as the PXE and image issues land, qemu VMs that PXE-boot over a bridge in a
//! network namespace. They need root, iproute2 and systemd-container, which
//! `cargo xtask deps` installs. This library holds what those tests share.

use std::time::Duration;

pub mod image;
pub mod node;
pub mod site;

/// How long a unit started in a test container may take.
pub const UNIT_TIMEOUT: Duration = Duration::from_secs(30);

/// A oneshot service that runs `command` with `/bin/sh -c` and stays active afterwards.
pub fn oneshot_unit(description: &str, command: &str) -> String {
    format!(
        "[Unit]\nDescription={description}\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/sh -c '{}'\n",
        command.replace('\'', r"'\''")
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn oneshot_unit_quotes_command() {
        let unit = super::oneshot_unit("x", "echo 'hi' > /run/x");
        assert!(unit.contains("Type=oneshot\n"));
        assert!(unit.contains(r"ExecStart=/bin/sh -c 'echo '\''hi'\'' > /run/x'"));
    }
}
