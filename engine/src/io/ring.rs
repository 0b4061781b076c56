//! One io_uring with an eventfd that the kernel signals on every completion.

use io_uring::{squeue, IoUring};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// An io_uring owned by one shard, with its completion eventfd.
///
/// Field order is drop order: the ring is dropped (and the kernel releases every buffer it
/// still references) before the eventfd is closed.
pub struct Ring {
    ring: IoUring,
    eventfd: OwnedFd,
    /// Entries pushed since the last `submit`.
    unsubmitted: usize,
    /// Completions taken off the completion queue to make room while pushing, handed out by
    /// the next `reap_into` before anything else.
    stash: Vec<(u64, i32)>,
    /// Entries pushed whose completion has not been taken off the completion queue. Kept at
    /// or below the completion queue's size, so the kernel never overflows it.
    in_kernel: usize,
    cq_capacity: usize,
}

impl Ring {
    /// Creates a ring of `entries` submission slots and registers a non-blocking eventfd.
    pub fn new(entries: u32) -> io::Result<Ring> {
        let entries = entries.max(8);
        // A completion queue well larger than the submission queue: a shard may have many
        // operations in flight, and a full queue makes the kernel refuse submissions.
        let ring = IoUring::builder()
            .setup_cqsize(entries * 8)
            .build(entries)?;
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let cq_capacity = ring.params().cq_entries() as usize;
        Ok(Ring {
            ring,
            eventfd,
            unsubmitted: 0,
            stash: Vec::new(),
            in_kernel: 0,
            cq_capacity,
        })
    }

    /// The eventfd that becomes readable when completions are posted.
    pub fn event_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// The ring's own descriptor, for others to post completions into it (MSG_RING).
    pub fn ring_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Counts a completion that someone else will post into this ring (MSG_RING), so the
    /// completion queue keeps room for it. Waits for room first when it is full.
    pub fn expect_external_completion(&mut self) -> io::Result<()> {
        while self.in_kernel >= self.cq_capacity {
            self.stash_completions();
            if self.in_kernel >= self.cq_capacity {
                self.submit_and_wait()?;
                self.stash_completions();
            }
        }
        self.in_kernel += 1;
        Ok(())
    }

    /// Takes back an [`Ring::expect_external_completion`] that will not come.
    pub fn cancel_external_completion(&mut self) {
        self.in_kernel -= 1;
    }

    /// Resets the eventfd counter so level-triggered pollers stop firing until the next
    /// completion. Call it before reaping, so a completion posted meanwhile re-arms it.
    pub fn drain_eventfd(&self) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local u64; the fd is non-blocking, errors are ignored
        // (EAGAIN means the counter was already zero).
        unsafe {
            libc::read(
                self.eventfd.as_raw_fd(),
                (&mut v as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }

    /// Queues one entry, submitting what is queued first when the submission queue is full.
    /// At most as many entries as the completion queue holds are in the kernel at once: when
    /// that many are, completions are moved to the stash to make room (waiting for one if
    /// none has arrived), so the completion queue never overflows and nothing spins.
    ///
    /// # Safety
    /// Every buffer and iovec array the entry points to must stay valid (and not be moved
    /// or freed) until the completion carrying the entry's user data has been reaped.
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        while self.in_kernel >= self.cq_capacity {
            self.stash_completions();
            if self.in_kernel >= self.cq_capacity {
                self.submit_and_wait()?;
                self.stash_completions();
            }
        }
        loop {
            // SAFETY: the caller guarantees the entry's buffers outlive its completion.
            let pushed = unsafe { self.ring.submission().push(entry).is_ok() };
            if pushed {
                self.unsubmitted += 1;
                self.in_kernel += 1;
                return Ok(());
            }
            self.submit()?;
        }
    }

    fn stash_completions(&mut self) {
        let before = self.stash.len();
        self.stash
            .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        self.in_kernel -= self.stash.len() - before;
    }

    /// Whether entries were queued but not yet handed to the kernel.
    pub fn has_unsubmitted(&self) -> bool {
        self.unsubmitted > 0
    }

    /// Submits everything queued with one `io_uring_enter`; a no-op when nothing is queued.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is full: the caller must reap first.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits what is queued and blocks until at least one completion is available.
    pub fn submit_and_wait(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Blocks until the eventfd is readable: a completion was posted, or someone else (another
    /// shard with messages) wrote to it since it was last drained.
    pub fn wait_eventfd(&self) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.eventfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one pollfd on the stack, valid for the call.
            let n = unsafe { libc::poll(&mut pfd, 1, -1) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }

    /// Whether completions are waiting to be reaped.
    pub fn has_completions(&mut self) -> bool {
        !self.stash.is_empty() || !self.ring.completion().is_empty()
    }

    /// Appends every available completion to `out` as (user data, result).
    ///
    /// Collected into a caller-owned buffer (reused, so no allocation in steady state) because
    /// handling a completion may push new entries, which needs the ring again.
    pub fn reap_into(&mut self, out: &mut Vec<(u64, i32)>) -> usize {
        let before = out.len();
        out.append(&mut self.stash);
        let stashed = out.len() - before;
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        self.in_kernel -= out.len() - before - stashed;
        out.len() - before
    }
}

/// Reads and writes through a private io_uring and waits: for metadata at open and close
/// time, off the data path.
pub struct BlockingReader {
    ring: IoUring,
}

impl BlockingReader {
    /// Creates a small ring.
    pub fn new() -> io::Result<BlockingReader> {
        Ok(BlockingReader {
            ring: IoUring::new(4)?,
        })
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (less only at
    /// end of file).
    pub fn read_at(&mut self, fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0usize;
        while done < buf.len() {
            let chunk = (buf.len() - done).min(1 << 30);
            let entry = io_uring::opcode::Read::new(
                io_uring::types::Fd(fd),
                buf[done..].as_mut_ptr(),
                chunk as u32,
            )
            .offset(offset + done as u64)
            .build();
            let n = self.run_one(entry)?;
            if n == 0 {
                break;
            }
            done += n as usize;
        }
        Ok(done)
    }

    /// Reads exactly `buf.len()` bytes at `offset`; end of file first is an error.
    pub fn read_exact_at(&mut self, fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = self.read_at(fd, buf, offset)?;
        if n < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "end of file after {n} of {} bytes at offset {offset:#x}",
                    buf.len()
                ),
            ));
        }
        Ok(())
    }

    fn run_one(&mut self, entry: io_uring::squeue::Entry) -> io::Result<i32> {
        // The entry's buffers are the caller's, borrowed for the whole call.
        // SAFETY: we wait for this entry's completion before returning, so every buffer it
        // points to (borrowed by our caller for the duration of the call) outlives the
        // kernel's use; nothing else is queued on this private ring.
        unsafe {
            self.ring
                .submission()
                .push(&entry)
                .map_err(|_| io::Error::other("submission queue full"))?;
        }
        // A signal may end the wait after the entry was submitted but before it completed:
        // io_uring_enter then returns the count submitted, not EINTR. Wait again until the
        // completion is there.
        let res = loop {
            if let Some(c) = self.ring.completion().next() {
                break c.result();
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        };
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        Ok(res)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_all_at(&mut self, fd: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let chunk = (buf.len() - done).min(1 << 30);
            let entry = io_uring::opcode::Write::new(
                io_uring::types::Fd(fd),
                buf[done..].as_ptr(),
                chunk as u32,
            )
            .offset(offset + done as u64)
            .build();
            let n = self.run_one(entry)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0"));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Makes everything written to `fd` durable (data and the metadata needed to read it).
    pub fn fdatasync(&mut self, fd: RawFd) -> io::Result<()> {
        let entry = io_uring::opcode::Fsync::new(io_uring::types::Fd(fd))
            .flags(io_uring::types::FsyncFlags::DATASYNC)
            .build();
        self.run_one(entry).map(|_| ())
    }
}
