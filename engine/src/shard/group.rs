//! Several shards serving one writable image: who owns what, the messages between them, and
//! each shard's [`GroupLink`] (the group, pieces in and out, wake-ups, table versions), a
//! part of its `State`, run on that shard's thread. What a shard does with it (cutting
//! requests, forwarding and answering pieces, table versions) is `coordinate.rs`.
//!
//! Each L2 table of the top image belongs to one shard: table `i` (the L1 index) to shard
//! `i % count`. Only the owner caches the table, changes its entries, allocates for the guest
//! clusters it maps and writes it back, so every table and every allocation in flight still has
//! exactly one owner and the data path takes no lock. A request submitted to a shard is cut at
//! L2-table boundaries; the pieces it owns become its own parts, every other piece is sent to its
//! owner as a [`Msg::Part`]. The owner serves it like a request of its own (reading into or
//! writing from the submitter's memory directly) and answers with [`Msg::Done`]; the submitter
//! completes the request when its last piece is done. A flush is sent to every shard and
//! completes when all of them have flushed.
//!
//! Messages go through one lock-free queue per shard. A sender wakes the receiver by writing
//! to the receiver's completion eventfd (a duplicate owned here, so it stays valid whatever
//! happens to the receiver), at most once until the receiver next looks at its queue.
//!
//! A shard that is dropped closes its mailbox: a piece or a flush sent to it afterwards (or
//! left in its queue) is answered at once with an error on its behalf, so that no request of
//! another shard waits for a shard that is gone.

use super::request::ReqKind;
use super::slab::{ReqId, SlabId};
use crate::error::IoError;
use crossbeam::queue::SegQueue;
use libc::iovec;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Every table's version at the start: even (nothing unwritten) and never 0, which marks a
/// part or a cached copy that no version vouches for.
const FIRST_VERSION: u64 = 2;

/// A message from one shard of a group to another.
pub(super) enum Msg {
    /// Serve `len` bytes at `guest_off` of request `req` of shard `from`; the bytes are at
    /// `skip` within the request's iovecs.
    Part {
        from: u16,
        req: ReqId,
        kind: ReqKind,
        guest_off: u64,
        len: u64,
        skip: u64,
        iov: *const iovec,
        iov_len: usize,
        /// The submitter's write cache mode when the request was submitted.
        writethrough: bool,
    },
    /// Flush, for request `req` of shard `from`.
    Flush { from: u16, req: ReqId },
    /// A piece of request `req` of the receiver is done.
    Done {
        req: ReqId,
        result: Result<(), IoError>,
    },
}

// SAFETY: the only pointer a message carries is a request's iovec array, which lives in the
// sending shard's request (a vector that is neither changed nor freed until the request
// completes, which waits for this piece's `Done`), pointing at caller memory that the submit
// contract keeps valid until then. The receiving shard reads the array once, when it takes the
// message, and the memory it describes is only read or written by the kernel on its behalf.
unsafe impl Send for Msg {}

struct Mailbox {
    inbox: SegQueue<Msg>,
    /// The receiver's completion eventfd (a duplicate).
    wake: OwnedFd,
    /// A wake-up was sent and the receiver has not looked at its queue since.
    woken: AtomicBool,
    /// The receiver is gone (see [`Group::close`]).
    closed: AtomicBool,
}

/// The shards of one writable image; see the module documentation.
pub(crate) struct Group {
    boxes: Box<[Mailbox]>,
    /// Per L2 table of the top image (by L1 index): its version. Odd while the owner has
    /// changes to the table (or to its L1 entry) that are not in the file yet; bumped by the
    /// owner on every change of parity. See "Reads of tables owned by another shard".
    versions: Box<[AtomicU64]>,
}

impl Group {
    /// A group over shards whose completion eventfds are `wakes`, in shard order, for a top
    /// image with `tables` L1 entries.
    pub(crate) fn new(wakes: Vec<OwnedFd>, tables: usize) -> Group {
        Group {
            versions: (0..tables).map(|_| AtomicU64::new(FIRST_VERSION)).collect(),
            boxes: wakes
                .into_iter()
                .map(|wake| Mailbox {
                    inbox: SegQueue::new(),
                    wake,
                    woken: AtomicBool::new(false),
                    closed: AtomicBool::new(false),
                })
                .collect(),
        }
    }

    /// Number of shards.
    pub(super) fn count(&self) -> usize {
        self.boxes.len()
    }

    /// Version of table `l1_index` (see `versions`).
    pub(super) fn version(&self, l1_index: u64) -> u64 {
        self.versions
            .get(l1_index as usize)
            .map_or(1, |v| v.load(Ordering::SeqCst))
    }

    /// The owner of table `l1_index` starts (to odd) or ends (to even) having changes that
    /// are not in the file. Only the owner calls it.
    pub(super) fn bump_version(&self, l1_index: u64) {
        if let Some(v) = self.versions.get(l1_index as usize) {
            v.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Queues `msg` for shard `to`; the caller wakes it later with [`Group::wake`]. If `to`
    /// is gone, the message is answered at once instead (see [`Group::close`]).
    pub(super) fn send(&self, to: usize, msg: Msg) {
        let b = &self.boxes[to];
        b.inbox.push(msg);
        // Pairs with the fence in `close`: either the closing shard's last look at its queue
        // finds this message, or this load sees the mailbox closed.
        fence(Ordering::SeqCst);
        if b.closed.load(Ordering::Relaxed) {
            self.answer_for(to);
        }
    }

    /// Shard `me` is gone (dropped, having answered what it found): from now on whatever is
    /// sent to it is answered with an error on its behalf, so no other shard waits for it.
    pub(super) fn close(&self, me: usize) {
        self.boxes[me].closed.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.answer_for(me);
    }

    /// Answers every piece and flush in the queue of the closed shard `gone` with EIO (its
    /// answers to requests of its own are dropped: nobody waits for them). Several threads
    /// may do this at once; each message is taken by one of them.
    fn answer_for(&self, gone: usize) {
        while let Some(msg) = self.boxes[gone].inbox.pop() {
            let (from, req) = match msg {
                Msg::Part { from, req, .. } | Msg::Flush { from, req } => (from, req),
                Msg::Done { .. } => continue,
            };
            let from = usize::from(from);
            if from == gone {
                continue;
            }
            let result = Err(IoError::Os { errno: libc::EIO });
            self.send(from, Msg::Done { req, result });
            self.wake(from);
        }
    }

    /// Wakes shard `to` unless a wake-up is already on its way.
    pub(super) fn wake(&self, to: usize) {
        let b = &self.boxes[to];
        if b.woken.swap(true, Ordering::AcqRel) {
            return;
        }
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local to an eventfd this group owns; an error (the
        // counter is full, which cannot happen with wake-ups of 1) is harmless.
        unsafe {
            libc::write(
                b.wake.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }

    /// The next message for shard `me`. Call [`Group::looking`] first.
    pub(super) fn receive(&self, me: usize) -> Option<Msg> {
        self.boxes[me].inbox.pop()
    }

    /// Shard `me` is about to empty its queue: a message sent from now on wakes it again.
    pub(super) fn looking(&self, me: usize) {
        self.boxes[me].woken.store(false, Ordering::Release);
    }

    /// Whether messages wait for shard `me`.
    pub(super) fn has_mail(&self, me: usize) -> bool {
        !self.boxes[me].inbox.is_empty()
    }
}

/// Tokens of requests served for another shard (and of each shard's own piece of a group
/// flush): `FORWARDED | from << 32 | request id`. Callers may not use this range.
pub(super) const FORWARDED: u64 = 0xC000_0000_0000_0000;
const FORWARDED_MASK: u64 = 0xFFFF_0000_0000_0000;

pub(super) fn forwarded_token(from: u16, req: ReqId) -> u64 {
    FORWARDED | u64::from(from) << 32 | u64::from(req)
}

/// `(from, request id)` of a forwarded token, or `None` for a caller's token.
pub(super) fn forwarded_parts(token: u64) -> Option<(u16, ReqId)> {
    (token & FORWARDED_MASK == FORWARDED)
        .then_some(((token >> 32) as u16, ReqId::from_index(token as u32)))
}

/// A shard's link to its group, and its side of the coordination: pieces served for others
/// and sent to others, the shards to wake at the end of the poll, the versions its copies of
/// other shards' tables were read at, its own tables whose version is odd.
pub(super) struct GroupLink {
    pub(super) group: Arc<Group>,
    /// This shard's index in the group.
    pub(super) index: usize,
    /// Requests and flushes served for other shards (and this shard's own piece of a group
    /// flush), not yet answered.
    pub(super) forwarded_in: usize,
    /// Pieces of this shard's requests (and flushes) sent to other shards, not yet answered.
    pub(super) remote_pieces: usize,
    /// Shards to wake at the end of this poll (bit per shard).
    to_wake: u64,
    /// Per top-layer L2 cache slot holding a copy of another shard's table: the table's
    /// version the copy was read at (0: none vouches for it).
    pub(super) foreign_tags: Vec<u64>,
    /// Tables of this shard whose version is odd (changes not in the file yet).
    pub(super) odd_tables: Vec<u64>,
}

impl GroupLink {
    /// Shard `index`'s link to `group`.
    pub(super) fn new(group: Arc<Group>, index: usize) -> GroupLink {
        GroupLink {
            group,
            index,
            forwarded_in: 0,
            remote_pieces: 0,
            to_wake: 0,
            foreign_tags: Vec::new(),
            odd_tables: Vec::new(),
        }
    }

    /// The shard that owns table `l1_index`.
    pub(super) fn owner(&self, l1_index: u64) -> usize {
        (l1_index % self.group.count() as u64) as usize
    }

    /// Version of table `l1_index` (see [`Group::version`]).
    pub(super) fn version(&self, l1_index: u64) -> u64 {
        self.group.version(l1_index)
    }

    /// Sends a piece (a part or a flush) of one of this shard's requests to shard `to`.
    pub(super) fn send_piece(&mut self, to: usize, msg: Msg) {
        self.group.send(to, msg);
        self.remote_pieces += 1;
        self.to_wake |= 1 << to;
    }

    /// Answers a piece shard `to` sent.
    pub(super) fn answer(&mut self, to: usize, req: ReqId, result: Result<(), IoError>) {
        self.group.send(to, Msg::Done { req, result });
        self.to_wake |= 1 << to;
    }

    /// The next message for this shard (call [`Group::looking`] first).
    pub(super) fn receive(&self) -> Option<Msg> {
        self.group.receive(self.index)
    }

    /// Wakes the shards this poll sent messages to.
    pub(super) fn wake_others(&mut self) {
        let mut bits = std::mem::take(&mut self.to_wake);
        while bits != 0 {
            self.group.wake(bits.trailing_zeros() as usize);
            bits &= bits - 1;
        }
    }

    /// Requests and flushes served for other shards, not yet answered.
    pub(super) fn forwarded_in(&self) -> usize {
        self.forwarded_in
    }

    /// Pieces of this shard's requests served by other shards, not yet answered.
    pub(super) fn remote_pieces(&self) -> usize {
        self.remote_pieces
    }

    /// The shard is dropped: waits (a while) for the answers to the pieces of its requests
    /// that other shards still serve, answers what they send meanwhile with an error, and
    /// closes its mailbox.
    pub(super) fn leave(mut self) {
        let group = Arc::clone(&self.group);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            group.looking(self.index);
            while let Some(msg) = group.receive(self.index) {
                let (from, req) = match msg {
                    Msg::Done { .. } => {
                        self.remote_pieces -= 1;
                        continue;
                    }
                    Msg::Part { from, req, .. } | Msg::Flush { from, req } => (from, req),
                };
                let result = Err(IoError::Os { errno: libc::EIO });
                group.send(usize::from(from), Msg::Done { req, result });
                group.wake(usize::from(from));
            }
            if self.remote_pieces == 0 {
                break;
            }
            if std::time::Instant::now() > deadline {
                tracing::error!(
                    "A shard is dropped while {} pieces of its requests are still served by \
                     other shards",
                    self.remote_pieces
                );
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        group.close(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_tokens_round_trip_and_callers_tokens_are_not_taken_for_them() {
        let t = forwarded_token(3, ReqId::from_index(0xdead_beef));
        assert_eq!(
            forwarded_parts(t),
            Some((3, ReqId::from_index(0xdead_beef)))
        );
        for caller in [0, 1, 1 << 40, u64::MAX, u64::MAX - 1, u64::MAX - 2, 1 << 63] {
            assert_eq!(forwarded_parts(caller), None, "{caller:#x}");
        }
    }
}
