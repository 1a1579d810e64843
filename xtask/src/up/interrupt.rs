//! Ctrl-C, SIGTERM and SIGHUP as a flag `up` checks between phases and every 250 ms while
//! it waits for workers or for Ctrl-C, so that it tears down what it started instead of
//! dying with qemu, tether-pxe and the management plane still running (they run in their
//! own process groups, out of the terminal's reach). A terminal's Ctrl-C also stops `up`'s
//! foreground children (kubectl, cargo, the image build) at once, which fails the phase in
//! progress; SIGTERM is seen at the next check.

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use crate::error::Error;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Routes SIGINT, SIGTERM and SIGHUP to the flag.
pub fn install() -> Result<(), Error> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.map_err(|e| Error::Step {
            step: "signals".into(),
            detail: format!("install the {sig} handler: {e}"),
        })?;
    }
    Ok(())
}

/// Whether Ctrl-C or SIGTERM arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// An error naming `phase` if Ctrl-C or SIGTERM arrived.
pub fn check(phase: &str) -> Result<(), Error> {
    if interrupted() {
        Err(Error::Step {
            step: phase.into(),
            detail: "interrupted (Ctrl-C or SIGTERM)".into(),
        })
    } else {
        Ok(())
    }
}
