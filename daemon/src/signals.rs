//! SIGINT, SIGTERM (stop) and SIGHUP (reload), turned into messages.
//!
//! The main thread blocks these signals before it starts any other thread (so every thread
//! inherits the mask and none is interrupted by them), then starts one signal thread that waits
//! for them with `sigwait` and forwards each as a message to the main thread, which stops the
//! exports in an orderly way.

use std::io;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;

/// The signals that stop the daemon, and SIGHUP, which reloads its config file.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// A set of blocked signals to wait for.
pub struct StopSignals {
    set: libc::sigset_t,
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (and so in every thread it starts later).
pub fn block_stop_signals() -> io::Result<StopSignals> {
    // SAFETY: sigset_t is a plain C struct for which all-zero bytes are a valid (if unspecified)
    // value; sigemptyset below initialises it properly before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t.
    if unsafe { libc::sigemptyset(&mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for signal in STOP_SIGNALS {
        // SAFETY: `set` is an initialised sigset_t and `signal` a valid signal number.
        if unsafe { libc::sigaddset(&mut set, signal) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: `set` is an initialised sigset_t; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(StopSignals { set })
}

/// Name of a stop signal, for the log.
pub fn signal_name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

/// Starts the thread that waits for the blocked signals and sends `wrap(signal)` on `tx` for
/// each. The thread ends when the receiver is gone.
pub fn spawn_signal_thread<T: Send + 'static>(
    signals: StopSignals,
    tx: Sender<T>,
    wrap: fn(libc::c_int) -> T,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("qcow2d-signals".into())
        .spawn(move || {
            crate::sandbox::seccomp::enter_or_abort(crate::sandbox::Role::Signals);
            loop {
                let mut signal: libc::c_int = 0;
                // SAFETY: `signals.set` is an initialised sigset_t whose signals are blocked in
                // this thread (inherited mask); `signal` is a valid place to store the result.
                let rc = unsafe { libc::sigwait(&signals.set, &mut signal) };
                if rc != 0 {
                    // Only EINVAL is documented, for an invalid set: nothing to retry.
                    tracing::error!(
                        "Cannot wait for signals: {}",
                        io::Error::from_raw_os_error(rc)
                    );
                    return;
                }
                if tx.send(wrap(signal)).is_err() {
                    return;
                }
            }
        })
}
