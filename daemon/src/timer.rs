//! A one-shot, non-blocking timerfd: how a worker thread waits without blocking its event loop.
//!
//! Owned by one worker ([`crate::worker::Worker`]), whose epoll loop watches its descriptor;
//! only that worker arms, reads and drops it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// A CLOCK_MONOTONIC timerfd, non-blocking and close-on-exec.
pub struct Timer {
    fd: OwnedFd,
}

impl Timer {
    /// A disarmed timer.
    pub fn new() -> io::Result<Timer> {
        // SAFETY: timerfd_create takes no pointers; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Timer { fd })
    }

    /// Fires once after `after` (at least a nanosecond: zero would disarm it), replacing any
    /// earlier setting; an expiry not yet read is forgotten.
    pub fn arm(&mut self, after: Duration) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(after.as_secs()).unwrap_or(libc::time_t::MAX),
                // Below 10^9, so it fits.
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `spec` is a valid itimerspec for the call's duration; a null old value is
        // allowed; the descriptor is ours.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads the expiry count so that the descriptor is no longer readable (nothing happens
    /// if it has not expired).
    pub fn clear(&mut self) {
        let mut count = 0u64;
        // SAFETY: reads at most 8 bytes into `count`, which is 8 bytes long; non-blocking.
        unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut count as *mut u64).cast::<libc::c_void>(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// The descriptor, for epoll.
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_and_clears() {
        let mut t = Timer::new().unwrap();
        let mut pfd = libc::pollfd {
            fd: t.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let poll = |pfd: &mut libc::pollfd, ms| unsafe { libc::poll(pfd, 1, ms) };
        assert_eq!(poll(&mut pfd, 0), 0, "disarmed");
        t.arm(Duration::from_millis(1)).unwrap();
        assert_eq!(poll(&mut pfd, 5000), 1);
        t.clear();
        assert_eq!(poll(&mut pfd, 20), 0, "one shot, read");
        t.clear();
    }
}
