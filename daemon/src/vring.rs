//! One virtqueue of a connection as the daemon keeps it: virtio-queue's `Queue` with the
//! queue's kick, call and error eventfds and whether the frontend enabled it, behind a mutex.
//!
//! The frontend handler ([`crate::handler`], on the relay thread) sets a queue up and tears
//! it down (sizes, addresses, eventfds, ready and enabled states); the worker thread that
//! owns the queue takes chains from it and returns them. Neither holds the lock across a
//! wait for anyone: a worker holds it while it takes and starts a batch of chains or returns
//! one, the handler while it changes one field.

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use virtio_queue::{Error as QueueError, Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// The state of one queue (see the module documentation).
pub struct VringState {
    queue: Queue,
    kick: Option<EventFd>,
    call: Option<EventFd>,
    err: Option<EventFd>,
    enabled: bool,
    /// The connection's guest memory (shared by every queue and worker of the connection).
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
}

/// A [`VringState`] shared between the frontend handler and the queue's worker.
#[derive(Clone)]
pub struct Vring {
    state: Arc<Mutex<VringState>>,
}

/// Takes ownership of a descriptor handed in by the frontend (an eventfd: the relay checked
/// it, see `crate::relay`).
fn eventfd(file: File) -> EventFd {
    // SAFETY: `File` owned the descriptor alone; `EventFd` takes that ownership over (it
    // closes it when dropped), and the file is consumed, so nothing else closes it.
    unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
}

impl VringState {
    /// Whether the frontend enabled the queue (SET_VRING_ENABLE, or features without the
    /// vhost-user protocol bit).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The queue.
    pub fn get_queue(&self) -> &Queue {
        &self.queue
    }

    /// The queue, for taking chains from it.
    pub fn get_queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    /// Tells the guest that the used ring moved (its call eventfd, if it shared one).
    pub fn signal_used_queue(&self) -> io::Result<()> {
        match &self.call {
            Some(call) => call.write(1),
            None => Ok(()),
        }
    }

    /// The kick eventfd, once the frontend shared one.
    pub fn kick(&self) -> Option<&EventFd> {
        self.kick.as_ref()
    }
}

impl Vring {
    /// A queue of at most `max_size` entries over `mem`, not ready, not enabled.
    pub fn new(mem: GuestMemoryAtomic<GuestMemoryMmap>, max_size: u16) -> Result<Self, QueueError> {
        Ok(Vring {
            state: Arc::new(Mutex::new(VringState {
                queue: Queue::new(max_size)?,
                kick: None,
                call: None,
                err: None,
                enabled: false,
                mem,
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, VringState> {
        // A thread that panicked while holding it left the queue between two changes at
        // worst; refusing to go on would wedge the connection.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state, for reading.
    pub fn get_ref(&self) -> MutexGuard<'_, VringState> {
        self.lock()
    }

    /// The state, for changing.
    pub fn get_mut(&self) -> MutexGuard<'_, VringState> {
        self.lock()
    }

    /// Tells the guest that the used ring moved.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.lock().signal_used_queue()
    }

    /// Enables or disables the queue.
    pub fn set_enabled(&self, enabled: bool) {
        self.lock().enabled = enabled;
    }

    /// The guest addresses of the descriptor table and the rings.
    pub fn set_queue_info(&self, desc: u64, avail: u64, used: u64) -> Result<(), QueueError> {
        let mut state = self.lock();
        state.queue.try_set_desc_table_address(GuestAddress(desc))?;
        state
            .queue
            .try_set_avail_ring_address(GuestAddress(avail))?;
        state.queue.try_set_used_ring_address(GuestAddress(used))
    }

    /// The index of the next available entry the device will take (GET_VRING_BASE).
    pub fn queue_next_avail(&self) -> u16 {
        self.lock().queue.next_avail()
    }

    /// SET_VRING_BASE.
    pub fn set_queue_next_avail(&self, base: u16) {
        self.lock().queue.set_next_avail(base);
    }

    /// Where the device goes on in the used ring.
    pub fn set_queue_next_used(&self, idx: u16) {
        self.lock().queue.set_next_used(idx);
    }

    /// The used index as the guest's memory holds it.
    pub fn queue_used_idx(&self) -> Result<u16, QueueError> {
        let state = self.lock();
        let mem = state.mem.memory();
        state
            .queue
            .used_idx(mem.deref(), Ordering::Relaxed)
            .map(|idx| idx.0)
    }

    /// SET_VRING_NUM (virtio-queue refuses a size that is not a power of two up to the
    /// maximum, keeping the queue invalid).
    pub fn set_queue_size(&self, num: u16) {
        self.lock().queue.set_size(num);
    }

    /// Whether EVENT_IDX was negotiated.
    pub fn set_queue_event_idx(&self, enabled: bool) {
        self.lock().queue.set_event_idx(enabled);
    }

    /// Starts or stops the queue.
    pub fn set_queue_ready(&self, ready: bool) {
        self.lock().queue.set_ready(ready);
    }

    /// SET_VRING_KICK (`None`: taken away).
    pub fn set_kick(&self, file: Option<File>) {
        self.lock().kick = file.map(eventfd);
    }

    /// SET_VRING_CALL.
    pub fn set_call(&self, file: Option<File>) {
        self.lock().call = file.map(eventfd);
    }

    /// SET_VRING_ERR.
    pub fn set_err(&self, file: Option<File>) {
        self.lock().err = file.map(eventfd);
    }

    /// Reads the kick eventfd (so that it stops firing); returns whether the queue is to be
    /// served (ready and enabled).
    pub fn read_kick(&self) -> bool {
        let state = self.lock();
        if let Some(kick) = &state.kick {
            // Non-blocking (the relay made it so): nothing to read is fine.
            let _ = kick.read();
        }
        state.enabled && state.queue.ready()
    }
}
