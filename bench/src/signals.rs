//! Ctrl-C and SIGTERM during `compare`: instead of dying with servers and gigabytes of image
//! copies left behind, the bench notes the signal, the run in progress stops at its next
//! completion, and `compare` returns an error, whose unwinding stops the servers and removes the
//! copies. The flag is process-wide; the handler only stores to an atomic.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    // An atomic store is async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Routes SIGINT and SIGTERM to the flag. Called once, from the main thread, by `compare`.
pub fn install() -> std::io::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags) that we then
        // fill in; `on_signal` has the `extern "C" fn(c_int)` signature sa_sigaction expects
        // without SA_SIGINFO, and it only performs an atomic store, which is async-signal-safe.
        let result = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if result != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// True once SIGINT or SIGTERM arrived (after [`install`]).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}
