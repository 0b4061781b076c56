//! One io_uring with an eventfd that the kernel signals on every completion, and the
//! restricted construction every ring of the engine goes through.
//!
//! Seccomp sees `io_uring_enter`, never the operations it carries, so each ring is confined
//! itself: it is created disabled (`IORING_SETUP_R_DISABLED`), told which submission opcodes
//! and which later `io_uring_register` operations it accepts (`IORING_REGISTER_RESTRICTIONS`:
//! only those its owner uses, no SQE flags), and only then enabled. An entry with any other
//! opcode completes with `-EACCES` without being performed. A kernel without restrictions
//! (before Linux 5.10) gets an unrestricted ring and one warning.

use io_uring::{opcode, register, squeue, IoUring};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Submission opcodes of a shard's ring: data and metadata reads and writes, syncs, the
/// retry timeout, the no-op that stands in for an elided sync, and (where the kernel has it)
/// posting the result of another shard's inflate job into that shard's ring.
const SHARD_OPS: [u8; 8] = [
    opcode::Read::CODE,
    opcode::Readv::CODE,
    opcode::Write::CODE,
    opcode::Writev::CODE,
    opcode::Fsync::CODE,
    opcode::Timeout::CODE,
    opcode::Nop::CODE,
    opcode::MsgRingData::CODE,
];

/// User data of the completion a ring gets for a result it posted into another ring
/// ([`Ring::post_to`]); never an operation's.
pub const POSTED: u64 = u64::MAX;

/// Submission opcodes of a [`BlockingReader`]'s ring.
const BLOCKING_OPS: [u8; 3] = [opcode::Read::CODE, opcode::Write::CODE, opcode::Fsync::CODE];

/// Submission opcodes of an inflate worker's ring: posting results into shards' rings.
pub(crate) const MSG_RING_OPS: [u8; 1] = [opcode::MsgRingData::CODE];

/// Whether the kernel refused a disabled ring once (then rings are made unrestricted).
static UNRESTRICTED: AtomicBool = AtomicBool::new(false);

/// `io_uring_register` operation that fills a probe (uapi value, the same on every
/// architecture).
const IORING_REGISTER_PROBE: u8 = 8;

/// Whether this kernel can post completions into another ring (`IORING_OP_MSG_RING`, Linux
/// 5.18); probed once.
pub(crate) fn msg_ring_supported() -> bool {
    static SUPPORTED: AtomicBool = AtomicBool::new(false);
    static PROBED: OnceLock<()> = OnceLock::new();
    PROBED.get_or_init(|| SUPPORTED.store(probe_msg_ring(), Ordering::Relaxed));
    SUPPORTED.load(Ordering::Relaxed)
}

fn probe_msg_ring() -> bool {
    // A ring that can only be probed.
    let probe_op = [IORING_REGISTER_PROBE];
    let Ok(ring) = build_restricted(&mut IoUring::builder(), 2, &[], &probe_op, |_| Ok(())) else {
        return false;
    };
    let mut probe = io_uring::Probe::new();
    if ring.submitter().register_probe(&mut probe).is_err() {
        return false;
    }
    probe.is_supported(opcode::MsgRingData::CODE)
}

/// Builds a ring of `entries` slots with `builder`, runs `setup` on it while it is still
/// disabled (registrations it needs, such as its eventfd), restricts it to the submission
/// opcodes `sqe_ops` and the `io_uring_register` operations `register_ops`, then enables it.
pub(crate) fn build_restricted(
    builder: &mut io_uring::Builder,
    entries: u32,
    sqe_ops: &[u8],
    register_ops: &[u8],
    setup: impl FnOnce(&IoUring) -> io::Result<()>,
) -> io::Result<IoUring> {
    if UNRESTRICTED.load(Ordering::Relaxed) {
        let ring = builder.build(entries)?;
        setup(&ring)?;
        return Ok(ring);
    }
    let ring = match builder.clone().setup_r_disabled().build(entries) {
        Ok(ring) => ring,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            if !UNRESTRICTED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "This kernel cannot create disabled io_urings (Linux 5.10+): rings are not \
                     restricted to the operations they use"
                );
            }
            let ring = builder.build(entries)?;
            setup(&ring)?;
            return Ok(ring);
        }
        Err(e) => return Err(e),
    };
    setup(&ring)?;
    let mut restrictions: Vec<register::Restriction> = sqe_ops
        .iter()
        .map(|&op| register::Restriction::sqe_op(op))
        .chain(
            register_ops
                .iter()
                .map(|&op| register::Restriction::register_op(op)),
        )
        .collect();
    let submitter = ring.submitter();
    submitter.register_restrictions(&mut restrictions)?;
    submitter.register_enable_rings()?;
    Ok(ring)
}

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
    /// Entries pushed while the completion queue had no room for their completions, in
    /// order: handed to the kernel as completions are reaped (see [`Ring::push`]).
    overflow: VecDeque<squeue::Entry>,
}

impl Ring {
    /// Creates a ring of `entries` submission slots and registers a non-blocking eventfd.
    pub fn new(entries: u32) -> io::Result<Ring> {
        let entries = entries.max(8);
        // A completion queue well larger than the submission queue: a shard may have many
        // operations in flight, and a full queue makes the kernel refuse submissions.
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A restriction naming an opcode the kernel does not know is refused.
        let ops = if msg_ring_supported() {
            &SHARD_OPS[..]
        } else {
            &SHARD_OPS[..SHARD_OPS.len() - 1]
        };
        let ring = build_restricted(
            IoUring::builder().setup_cqsize(entries * 8),
            entries,
            ops,
            &[],
            |ring| ring.submitter().register_eventfd(eventfd.as_raw_fd()),
        )?;
        let cq_capacity = ring.params().cq_entries() as usize;
        Ok(Ring {
            ring,
            eventfd,
            unsubmitted: 0,
            stash: Vec::new(),
            in_kernel: 0,
            cq_capacity,
            overflow: VecDeque::new(),
        })
    }

    /// The eventfd that becomes readable when completions are posted.
    pub fn event_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// A duplicate of [`Ring::event_fd`], valid whatever happens to the ring (writing to it
    /// wakes whoever waits on the ring's completions).
    pub fn dup_event_fd(&self) -> io::Result<OwnedFd> {
        self.eventfd.try_clone()
    }

    /// Completions the completion queue holds.
    pub fn cq_capacity(&self) -> usize {
        self.cq_capacity
    }

    /// The ring's own descriptor, for others to post completions into it (MSG_RING).
    pub fn ring_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Counts a completion that someone else will post into this ring, if the completion
    /// queue has room for it now (after moving what it holds to the stash); never waits.
    pub fn try_expect_external_completion(&mut self) -> bool {
        if self.in_kernel >= self.cq_capacity {
            self.stash_completions();
            if self.in_kernel >= self.cq_capacity {
                return false;
            }
        }
        self.in_kernel += 1;
        true
    }

    /// Posts `result` with `user_data` as a completion into the ring `target` (which counted
    /// it with [`Ring::try_expect_external_completion`]), submits at once and waits for the
    /// post to be done: returns its own result (negative: the kernel refused it). The post's
    /// completion on this ring (user data [`POSTED`]) is taken here; any other completion
    /// that arrives meanwhile is kept for the next [`Ring::reap_into`]. The post normally
    /// completes during the submit, so this rarely waits.
    pub fn post_to(&mut self, target: RawFd, result: i32, user_data: u64) -> io::Result<i32> {
        let entry = opcode::MsgRingData::new(io_uring::types::Fd(target), result, user_data, None)
            .build()
            .user_data(POSTED);
        // SAFETY: a MSG_RING entry points at no memory of ours.
        unsafe { self.push(&entry)? };
        self.submit()?;
        loop {
            let mut posted = None;
            let mut taken = 0;
            for cqe in self.ring.completion() {
                taken += 1;
                if cqe.user_data() == POSTED && posted.is_none() {
                    posted = Some(cqe.result());
                } else {
                    self.stash.push((cqe.user_data(), cqe.result()));
                }
            }
            self.in_kernel -= taken;
            if let Some(result) = posted {
                return Ok(result);
            }
            // The post may be in the overflow, behind entries waiting for the room the
            // completions just taken made.
            self.admit_overflow()?;
            self.submit_and_wait()?;
        }
    }

    /// Takes back a [`Ring::try_expect_external_completion`] whose completion will not come.
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

    /// Makes the eventfd readable, as a completion would: a poll that returns with work of its
    /// own left asks whoever waits on the eventfd to come back for it at once.
    pub fn signal_eventfd(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local to our own eventfd; an error (the counter is
        // full, which increments of 1 never reach) only means it is readable already.
        unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }

    /// Queues one entry, submitting what is queued first when the submission queue is full.
    /// At most as many entries as the completion queue holds are in the kernel at once: when
    /// that many are (after moving the completions that arrived to the stash), the entry
    /// waits in the ring's overflow, in order behind any already there, and goes to the
    /// kernel once reaping has made room ([`Ring::reap_into`]). So the completion queue never
    /// overflows, and nothing waits: the thread pushing may serve other shards too.
    ///
    /// # Safety
    /// Every buffer and iovec array the entry points to must stay valid (and not be moved
    /// or freed) until the completion carrying the entry's user data has been reaped.
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        if !self.overflow.is_empty() || self.in_kernel >= self.cq_capacity {
            self.stash_completions();
            self.admit_overflow()?;
            if !self.overflow.is_empty() || self.in_kernel >= self.cq_capacity {
                self.overflow.push_back(entry.clone());
                return Ok(());
            }
        }
        // SAFETY: the caller's guarantee.
        unsafe { self.push_now(entry) }
    }

    /// Hands the entries of the overflow to the submission queue while the completion queue
    /// has room for their completions.
    fn admit_overflow(&mut self) -> io::Result<()> {
        while self.in_kernel < self.cq_capacity {
            let Some(entry) = self.overflow.pop_front() else {
                break;
            };
            // SAFETY: `push` took it under its caller's guarantee, which lasts until its
            // completion is reaped.
            unsafe { self.push_now(&entry)? };
        }
        Ok(())
    }

    /// Puts one entry in the submission queue (submitting what is queued first if it is full).
    ///
    /// # Safety
    /// As [`Ring::push`]; the completion queue must have room for its completion.
    unsafe fn push_now(&mut self, entry: &squeue::Entry) -> io::Result<()> {
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
        self.reap_at_most(out, usize::MAX)
    }

    /// Like [`Ring::reap_into`], but appends at most `max` completions (the oldest); the others
    /// stay for the next reap.
    pub fn reap_at_most(&mut self, out: &mut Vec<(u64, i32)>, max: usize) -> usize {
        let before = out.len();
        let from_stash = self.stash.len().min(max);
        out.extend(self.stash.drain(..from_stash));
        let stashed = out.len() - before;
        out.extend(
            self.ring
                .completion()
                .take(max - stashed)
                .map(|c| (c.user_data(), c.result())),
        );
        self.in_kernel -= out.len() - before - stashed;
        if !self.overflow.is_empty() {
            // Entries left behind for room go in now; the caller's next submit sends them.
            if let Err(e) = self.admit_overflow() {
                tracing::error!("io_uring submit failed while making room: {e}");
            }
        }
        out.len() - before
    }

    /// Whether an entry pushed now goes to the kernel at once (nothing waits in the overflow
    /// and the completion queue has room for one more completion).
    pub fn has_room(&self) -> bool {
        self.overflow.is_empty() && self.in_kernel < self.cq_capacity
    }

    /// Entries waiting in the overflow for room in the completion queue.
    pub fn overflowed(&self) -> usize {
        self.overflow.len()
    }
}

/// Reads and writes through a private io_uring and waits: for metadata at open and close
/// time, off the data path.
///
/// A thread keeps the ring of the last reader it dropped and hands it to the next one it
/// creates: opens, closes and checks follow one another on a thread, and a ring costs
/// several system calls and a few pages to set up, and a kernel worker to tear down. A kept
/// ring has nothing in flight (a reader whose wait failed with an entry still in the kernel
/// is not kept), names no file (entries carry plain descriptors, released as they complete)
/// and is restricted as every reader's is; it is closed when its thread exits.
pub struct BlockingReader {
    /// Always `Some` until the reader is dropped.
    ring: Option<IoUring>,
    /// An entry was pushed and its completion has not been taken.
    busy: bool,
}

thread_local! {
    /// The ring of the last reader this thread dropped.
    static SPARE_RING: std::cell::Cell<Option<IoUring>> = const { std::cell::Cell::new(None) };
}

impl BlockingReader {
    /// Creates a small ring, or takes the one this thread kept.
    pub fn new() -> io::Result<BlockingReader> {
        let ring = match SPARE_RING.with(std::cell::Cell::take) {
            Some(ring) => ring,
            None => build_restricted(&mut IoUring::builder(), 4, &BLOCKING_OPS, &[], |_| Ok(()))?,
        };
        Ok(BlockingReader {
            ring: Some(ring),
            busy: false,
        })
    }

    fn ring(&mut self) -> &mut IoUring {
        self.ring
            .as_mut()
            .expect("a blocking reader's ring is only taken when it is dropped")
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
            self.ring()
                .submission()
                .push(&entry)
                .map_err(|_| io::Error::other("submission queue full"))?;
        }
        self.busy = true;
        // A signal may end the wait after the entry was submitted but before it completed:
        // io_uring_enter then returns the count submitted, not EINTR. Wait again until the
        // completion is there.
        let res = loop {
            if let Some(c) = self.ring().completion().next() {
                break c.result();
            }
            match self.ring().submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        };
        self.busy = false;
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

impl Drop for BlockingReader {
    fn drop(&mut self) {
        let Some(ring) = self.ring.take() else {
            return;
        };
        if self.busy {
            return; // Closed here: the kernel cancels what it still holds.
        }
        // A thread exiting has no slot any more: the ring is closed with the reader.
        let _ = SPARE_RING.try_with(|spare| spare.set(Some(ring)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::types;

    /// Pushes `entry` into the shard ring, submits it and returns its result.
    fn run(ring: &mut Ring, entry: squeue::Entry) -> i32 {
        // SAFETY: the entries used here point at a C string literal (static) or at nothing.
        unsafe { ring.push(&entry.user_data(7)).unwrap() };
        ring.submit_and_wait().unwrap();
        let mut out = Vec::new();
        ring.reap_into(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, 7);
        out[0].1
    }

    /// Pushing more entries than the completion queue holds never waits: those without room
    /// wait in the overflow and go to the kernel as reaping makes room; every one completes
    /// exactly once. (Reads of an empty pipe stay in the kernel until it has data.)
    #[test]
    fn pushes_past_the_completion_queue_wait_in_the_overflow_and_never_block() {
        let mut ring = Ring::new(1).unwrap();
        let cap = ring.cq_capacity();
        let total = cap + 5;
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pipe(2) just returned these descriptors, owned here from now on.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut bufs = vec![0u8; total];
        for (i, byte) in bufs.iter_mut().enumerate() {
            let read = opcode::Read::new(types::Fd(rd.as_raw_fd()), byte, 1)
                .build()
                .user_data(i as u64);
            // SAFETY: `bufs` outlives every completion (all are reaped below).
            unsafe { ring.push(&read).unwrap() };
            ring.submit().unwrap();
        }
        assert_eq!(ring.overflowed(), total - cap);
        assert_eq!(ring.in_kernel, cap);
        let mut seen = vec![0u32; total];
        let mut done = 0;
        while done < total {
            // SAFETY: writes one byte from a local to the pipe this test owns.
            let n = unsafe { libc::write(wr.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
            assert_eq!(n, 1);
            ring.submit_and_wait().unwrap();
            let mut out = Vec::new();
            ring.reap_into(&mut out);
            ring.submit().unwrap();
            for (data, res) in out {
                assert_eq!(res, 1);
                seen[data as usize] += 1;
                done += 1;
            }
            assert!(ring.in_kernel <= cap);
        }
        assert_eq!(ring.overflowed(), 0);
        assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
    }

    /// A shard's ring performs the operations it was allowed and refuses, with EACCES and
    /// without performing it, one it was not: an `openat` of a file that exists.
    #[test]
    fn a_shard_ring_refuses_opcodes_it_was_not_allowed() {
        let mut ring = Ring::new(8).unwrap();
        assert_eq!(run(&mut ring, opcode::Nop::new().build()), 0);
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), c"/proc/self/status".as_ptr())
            .flags(libc::O_RDONLY | libc::O_CLOEXEC)
            .build();
        assert_eq!(run(&mut ring, open), -libc::EACCES);
        let socket = opcode::Socket::new(libc::AF_UNIX, libc::SOCK_STREAM, 0).build();
        assert_eq!(run(&mut ring, socket), -libc::EACCES);
        // Registering anything once the ring is enabled is refused too.
        let err = ring
            .ring
            .submitter()
            .register_files(&[libc::STDERR_FILENO])
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    }

    /// A post waits for its own completion and hands back its result, whatever else
    /// completes meanwhile: a completion of another operation is kept for the next reap, and
    /// the posted result arrives on the target ring with the target's user data. A post to a
    /// descriptor that is not a ring is refused (EBADFD), and said so.
    #[test]
    fn a_post_waits_for_its_own_completion_and_keeps_the_others() {
        if !msg_ring_supported() {
            panic!("this kernel cannot post across rings (MSG_RING, Linux 5.18)");
        }
        let mut ring = Ring::new(8).unwrap();
        let mut target = Ring::new(8).unwrap();
        assert!(target.try_expect_external_completion());
        // SAFETY: a no-op points at no memory.
        unsafe { ring.push(&opcode::Nop::new().build().user_data(5)).unwrap() };
        assert_eq!(ring.post_to(target.ring_fd(), -3, 42).unwrap(), 0);
        let mut out = Vec::new();
        assert_eq!(ring.reap_into(&mut out), 1);
        assert_eq!(
            out,
            [(5, 0)],
            "the no-op's completion is kept, the post's taken"
        );
        out.clear();
        target.reap_into(&mut out);
        assert_eq!(out, [(42, -3)]);
        let not_a_ring = std::fs::File::open("/dev/null").unwrap();
        let refused = ring.post_to(not_a_ring.as_raw_fd(), 0, 1).unwrap();
        assert_eq!(refused, -libc::EBADFD);
        out.clear();
        assert_eq!(ring.reap_into(&mut out), 0, "{out:?}");
    }

    /// The blocking reader's ring reads, writes and syncs, and nothing else.
    #[test]
    fn a_blocking_ring_refuses_other_opcodes() {
        let mut reader = BlockingReader::new().unwrap();
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let mut buf = [0u8; 5];
        reader.read_exact_at(file.as_raw_fd(), &mut buf, 0).unwrap();
        assert_eq!(&buf, b"Name:");
        let err = reader.run_one(opcode::Nop::new().build()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    }

    /// A dropped reader's ring is kept open and serves the next reader of the thread,
    /// restricted as before; a second reader alive at the same time gets a ring of its own.
    #[test]
    fn a_thread_reuses_the_ring_of_its_last_blocking_reader() {
        std::thread::spawn(|| {
            let file = std::fs::File::open("/proc/self/status").unwrap();
            let mut first = BlockingReader::new().unwrap();
            let ring_fd = first.ring().as_raw_fd();
            drop(first);
            // Had the ring been closed, this would take its descriptor.
            let other = std::fs::File::open("/dev/null").unwrap();
            assert_ne!(other.as_raw_fd(), ring_fd);
            let mut again = BlockingReader::new().unwrap();
            assert_eq!(again.ring().as_raw_fd(), ring_fd, "the kept ring");
            let mut buf = [0u8; 5];
            again.read_exact_at(file.as_raw_fd(), &mut buf, 0).unwrap();
            assert_eq!(&buf, b"Name:");
            let err = again.run_one(opcode::Nop::new().build()).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EACCES));
            let mut second = BlockingReader::new().unwrap();
            assert_ne!(second.ring().as_raw_fd(), ring_fd);
            second.read_exact_at(file.as_raw_fd(), &mut buf, 0).unwrap();
        })
        .join()
        .unwrap();
    }
}
