//! In-flight budgets: how many requests, and how many bytes of data, one worker (one engine
//! shard) and one connection may have in flight at once.
//!
//! A guest decides how many chains it makes available and how large each is; without a bound,
//! a guest that fills its queues with the largest requests it may send would make the engine
//! hold their state (request parts, bounce buffers, compressed-cluster scratch waiting for
//! its turn) all at once. Each worker holds a [`Gate`]: before it pops a chain it asks
//! [`Gate::admits`]; while the gate is closed it leaves the queue's chains in the available
//! ring and remembers the queue, and as completions give budget back ([`Gate::give`]) it
//! takes them up again (`Worker::resume_starved`). The budget counts the bytes a request asks
//! for, not the distinct guest memory behind them: 126 segments over the same megabyte are
//! 126 MiB. A chain is admitted while the worker is under its limits, so a worker exceeds its
//! byte limit by at most one request (at most `MAX_REQUEST_BYTES`).
//!
//! The connection's limits are shared by its workers through [`ConnectionBudget`] (atomics;
//! no lock on the data path). A worker stopped by the connection's limit registers in the
//! connection's waiting mask; the worker that next gives budget back wakes it through its
//! waker: a duplicate of the worker's timer (a timerfd on its epoll loop), armed to fire at
//! once, so the worker goes round its queues as after a wait under the I/O limits. Another admission rule (a rate
//! limit) belongs in [`Gate::admits`], and whatever reopens it calls [`ConnectionBudget::wake`]
//! for the workers it stopped.
//!
//! [`Gate`] is owned by its worker thread (behind the worker's mutex); [`ConnectionBudget`] is
//! shared by the connection's workers.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Limits of one kind of budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of data (reads and writes) in flight.
    pub bytes: u64,
    /// Requests (descriptor chains) in flight.
    pub requests: u32,
}

/// The budgets of one export: per connection and per worker (shard).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    /// Shared by all the workers of a connection.
    pub connection: Limits,
    /// Of each worker.
    pub shard: Limits,
}

/// Default bytes in flight per connection: 256 MiB.
pub const DEFAULT_CONNECTION_BYTES: u64 = 256 << 20;
/// Default requests in flight per connection.
pub const DEFAULT_CONNECTION_REQUESTS: u32 = 4096;
/// Default bytes in flight per shard: 64 MiB (a queue depth of 128 of 512 KiB requests).
pub const DEFAULT_SHARD_BYTES: u64 = 64 << 20;
/// Default requests in flight per shard.
pub const DEFAULT_SHARD_REQUESTS: u32 = 1024;

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            connection: Limits {
                bytes: DEFAULT_CONNECTION_BYTES,
                requests: DEFAULT_CONNECTION_REQUESTS,
            },
            shard: Limits {
                bytes: DEFAULT_SHARD_BYTES,
                requests: DEFAULT_SHARD_REQUESTS,
            },
        }
    }
}

/// What one connection's workers have in flight together.
pub struct ConnectionBudget {
    limits: Limits,
    bytes: AtomicU64,
    requests: AtomicU32,
    /// Workers stopped by this budget, one bit per worker (at most 64 workers).
    waiting: AtomicU64,
    /// Per worker, what wakes its event loop (set once the workers exist).
    wakers: OnceLock<Vec<File>>,
}

impl ConnectionBudget {
    /// An empty budget with `limits`.
    pub fn new(limits: Limits) -> Self {
        ConnectionBudget {
            limits,
            bytes: AtomicU64::new(0),
            requests: AtomicU32::new(0),
            waiting: AtomicU64::new(0),
            wakers: OnceLock::new(),
        }
    }

    /// Sets what wakes each worker: `wakers[i]` is an eventfd on worker `i`'s event loop.
    /// Later calls are ignored.
    pub fn set_wakers(&self, wakers: Vec<OwnedFd>) {
        let _ = self
            .wakers
            .set(wakers.into_iter().map(File::from).collect());
    }

    fn over(&self) -> bool {
        self.bytes.load(Ordering::Acquire) >= self.limits.bytes
            || self.requests.load(Ordering::Acquire) >= self.limits.requests
    }

    /// Wakes every worker waiting for this budget but `me`.
    pub fn wake(&self, me: usize) {
        let waiting = self.waiting.swap(0, Ordering::AcqRel) & !(1u64 << (me % 64));
        if waiting == 0 {
            return;
        }
        let Some(wakers) = self.wakers.get() else {
            return;
        };
        for (i, waker) in wakers.iter().enumerate() {
            if i < 64 && waiting & (1 << i) != 0 {
                wake(waker);
            }
        }
    }
}

/// Wakes the worker whose waker is `fd`: an eventfd is written to; a timerfd (the worker's
/// timer) is armed to fire at once.
fn wake(fd: &File) {
    let raw = fd.as_raw_fd();
    let timer = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: 0,
            tv_nsec: 1,
        },
    };
    // SAFETY: timerfd_settime reads the local `timer` and writes nothing (no old value
    // asked for); on a descriptor that is not a timerfd it fails with EINVAL.
    if unsafe { libc::timerfd_settime(raw, 0, &timer, std::ptr::null_mut()) } == 0 {
        return;
    }
    // A non-blocking eventfd: fails only when its counter is full, and then the worker has a
    // wake-up pending anyway.
    let mut f: &File = fd;
    let _ = f.write(&1u64.to_ne_bytes());
}

/// One worker's view of its budgets; see the module documentation.
pub struct Gate {
    limits: Limits,
    bytes: u64,
    requests: u32,
    connection: Arc<ConnectionBudget>,
    /// This worker's index among the connection's workers.
    worker: usize,
}

impl Gate {
    /// The gate of worker `worker` of a connection whose shared budget is `connection`.
    pub fn new(limits: Limits, connection: Arc<ConnectionBudget>, worker: usize) -> Self {
        Gate {
            limits,
            bytes: 0,
            requests: 0,
            connection,
            worker,
        }
    }

    /// Whether another chain may be taken now. When the connection's budget is what stops it,
    /// the worker is registered to be woken when another worker gives some back.
    pub fn admits(&self) -> bool {
        if self.bytes >= self.limits.bytes || self.requests >= self.limits.requests {
            // Only this worker's own completions reopen it.
            return false;
        }
        if !self.connection.over() {
            return true;
        }
        self.connection
            .waiting
            .fetch_or(1 << (self.worker % 64), Ordering::AcqRel);
        // Budget given back between the check and the registration would have found no
        // waiter: look again.
        !self.connection.over()
    }

    /// Counts a request of `bytes` taken.
    pub fn take(&mut self, bytes: u64) {
        self.bytes += bytes;
        self.requests += 1;
        self.connection.bytes.fetch_add(bytes, Ordering::AcqRel);
        self.connection.requests.fetch_add(1, Ordering::AcqRel);
    }

    /// Counts a request of `bytes` done, and wakes the workers the connection's budget
    /// stopped.
    pub fn give(&mut self, bytes: u64) {
        self.give_many(bytes, 1);
    }

    /// Counts `requests` requests of `bytes` in all done (a batch of completions: the
    /// connection's counters, which its other workers write too, are written once), and
    /// wakes the workers the connection's budget stopped.
    pub fn give_many(&mut self, bytes: u64, requests: u32) {
        if requests == 0 {
            return;
        }
        self.bytes = self.bytes.saturating_sub(bytes);
        self.requests = self.requests.saturating_sub(requests);
        self.connection.bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.connection
            .requests
            .fetch_sub(requests, Ordering::AcqRel);
        if self.connection.waiting.load(Ordering::Acquire) != 0 {
            self.connection.wake(self.worker);
        }
    }

    /// Bytes and requests this worker has in flight.
    #[cfg(test)]
    pub fn in_flight(&self) -> (u64, u32) {
        (self.bytes, self.requests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;

    fn eventfd() -> OwnedFd {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn count(fd: &OwnedFd) -> u64 {
        let mut f = File::from(fd.try_clone().unwrap());
        let mut b = [0u8; 8];
        match f.read(&mut b) {
            Ok(8) => u64::from_ne_bytes(b),
            _ => 0,
        }
    }

    #[test]
    fn a_worker_stops_at_its_limits_and_resumes_as_requests_complete() {
        let conn = Arc::new(ConnectionBudget::new(Limits {
            bytes: u64::MAX,
            requests: u32::MAX,
        }));
        let mut gate = Gate::new(
            Limits {
                bytes: 1 << 20,
                requests: 3,
            },
            conn,
            0,
        );
        assert!(gate.admits());
        gate.take(512 << 10);
        assert!(gate.admits());
        // Admitted while under the limit: one request may go past it.
        gate.take(4 << 20);
        assert!(!gate.admits());
        gate.give(4 << 20);
        assert!(gate.admits());
        gate.take(0);
        gate.take(0);
        assert!(!gate.admits(), "three requests");
        gate.give(0);
        assert!(gate.admits());
        assert_eq!(gate.in_flight(), (512 << 10, 2));
    }

    #[test]
    fn the_connection_budget_is_shared_and_wakes_the_workers_it_stopped() {
        let conn = Arc::new(ConnectionBudget::new(Limits {
            bytes: 1 << 20,
            requests: 100,
        }));
        let fds = [eventfd(), eventfd()];
        conn.set_wakers(fds.iter().map(|f| f.try_clone().unwrap()).collect());
        let shard = Limits {
            bytes: u64::MAX,
            requests: u32::MAX,
        };
        let mut a = Gate::new(shard, Arc::clone(&conn), 0);
        let b = Gate::new(shard, Arc::clone(&conn), 1);
        a.take(1 << 20);
        assert!(!a.admits());
        assert!(!b.admits(), "the connection is over its budget");
        assert_eq!(count(&fds[1]), 0);
        // A's completion reopens the connection: B (registered when it was stopped) is woken,
        // A itself is not (it resumes in the same turn).
        a.give(1 << 20);
        assert_eq!(count(&fds[1]), 1);
        assert_eq!(count(&fds[0]), 0);
        assert!(b.admits());
        // Nobody waiting: nobody woken.
        a.take(10);
        a.give(10);
        assert_eq!(count(&fds[1]), 0);
    }
}
