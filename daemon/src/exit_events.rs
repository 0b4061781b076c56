//! The eventfds that stop vhost-user-backend's worker threads, and their cleanup.
//!
//! Created on the export's listener thread with each connection's backend, handed to
//! vhost-user-backend (one per worker thread) when it builds its epoll loops, and closed when
//! the backend is dropped, on the listener thread again.
//!
//! vhost-user-backend 0.24 turns the consumer half it is given into a raw fd, adds it to the
//! worker's epoll set and never closes it: one descriptor per worker thread per connection
//! would leak. [`ExitEvents`] records the descriptors it handed out and closes them on drop. The
//! backend that owns it is dropped only after every worker's epoll handler (each holds a clone
//! of the backend's `Arc`) is gone, so nothing uses them any more by then. The test below
//! checks that the crate still leaks them, so that an upgrade that fixes the leak (and would
//! make this a double close) cannot go unnoticed.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Mutex, PoisonError};

use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

type Pair = (EventConsumer, EventNotifier);

/// One exit event per worker thread of a connection.
pub struct ExitEvents {
    state: Mutex<State>,
}

struct State {
    unused: Vec<Option<Pair>>,
    handed_out: Vec<RawFd>,
}

fn new_pair() -> io::Result<Pair> {
    new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
}

impl ExitEvents {
    /// Creates `threads` exit events up front, so that running out of descriptors shows when
    /// a connection is set up rather than as a worker that can never be stopped.
    pub fn new(threads: usize) -> io::Result<Self> {
        let unused = (0..threads)
            .map(|_| new_pair().map(Some))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(ExitEvents {
            state: Mutex::new(State {
                unused,
                handed_out: Vec::with_capacity(threads),
            }),
        })
    }

    /// The exit event of worker `thread`, for `VhostUserBackend::exit_event`.
    pub fn take(&self, thread: usize) -> io::Result<Pair> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let pair = match state.unused.get_mut(thread).and_then(Option::take) {
            Some(pair) => pair,
            // Asked twice for the same worker (vhost-user-backend asks once): make another.
            None => new_pair()?,
        };
        state.handed_out.push(pair.0.as_raw_fd());
        Ok(pair)
    }
}

impl Drop for ExitEvents {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        for fd in state.handed_out.drain(..) {
            // SAFETY: `fd` is the consumer half of an eventfd we created and handed to
            // vhost-user-backend, which converted it into a raw fd it never closes (see the
            // module documentation and the test below). The owner of `self` outlives every
            // worker epoll loop that used it, so nothing refers to the descriptor any more and
            // closing it cannot affect anyone else.
            unsafe { libc::close(fd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::epoll::EventSet;

    /// The smallest backend: two workers, one queue each, and our exit events.
    struct Mock {
        exits: ExitEvents,
        fds: Mutex<Vec<RawFd>>,
    }

    impl VhostUserBackend for Mock {
        type Bitmap = ();
        type Vring = VringRwLock<GuestMemoryAtomic<GuestMemoryMmap>>;

        fn num_queues(&self) -> usize {
            2
        }
        fn max_queue_size(&self) -> usize {
            256
        }
        fn features(&self) -> u64 {
            0
        }
        fn protocol_features(&self) -> VhostUserProtocolFeatures {
            VhostUserProtocolFeatures::empty()
        }
        fn set_event_idx(&self, _: bool) {}
        fn update_memory(&self, _: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
            Ok(())
        }
        fn queues_per_thread(&self) -> Vec<u64> {
            vec![1, 2]
        }
        fn exit_event(&self, thread: usize) -> Option<(EventConsumer, EventNotifier)> {
            let pair = self.exits.take(thread).ok()?;
            self.fds.lock().unwrap().push(pair.0.as_raw_fd());
            Some(pair)
        }
        fn handle_event(&self, _: u16, _: EventSet, _: &[Self::Vring], _: usize) -> io::Result<()> {
            Ok(())
        }
    }

    fn is_eventfd(fd: RawFd) -> bool {
        std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .is_ok_and(|target| target.to_string_lossy().contains("eventfd"))
    }

    #[test]
    fn vhost_user_backend_leaks_exit_consumers_and_we_close_them() {
        let backend = Arc::new(Mock {
            exits: ExitEvents::new(2).unwrap(),
            fds: Mutex::new(Vec::new()),
        });
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let daemon = VhostUserDaemon::new("exit-test".into(), backend.clone(), mem).unwrap();
        // Dropping the daemon stops and joins both workers.
        drop(daemon);
        let fds = backend.fds.lock().unwrap().clone();
        assert_eq!(fds.len(), 2);
        for &fd in &fds {
            assert!(
                is_eventfd(fd),
                "vhost-user-backend closed exit consumer {fd} itself: ExitEvents must not close it"
            );
        }
        let backend = Arc::into_inner(backend).expect("workers still hold the backend");
        drop(backend);
        for &fd in &fds {
            assert!(!is_eventfd(fd), "exit consumer {fd} still open");
        }
    }
}
