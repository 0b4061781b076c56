//! Requests and their parts: a request as submitted (its kind, iovecs, pieces pending), the
//! parts it is cut into (a guest range at one layer of the chain), and their wait lists: the
//! shard's [`Requests`], one part of its state. How a part is planned, finished and its
//! request completed is `plan.rs`.
//!
//! Runs on the shard's thread, on the shard's own arenas.

use super::slab::Slab;
use super::slab::{AllocId, PartId, ReqId, SlabId};
use crate::error::IoError;
use crate::meta::{WaitList, NO_ID};
use libc::iovec;
use std::collections::VecDeque;

/// What a request does.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ReqKind {
    #[default]
    Read,
    Write,
    WriteZeroes {
        unmap: bool,
    },
    Discard,
    /// A flush sent to every shard of a group.
    Flush,
}

impl ReqKind {
    pub(super) fn is_write(self) -> bool {
        matches!(
            self,
            ReqKind::Write | ReqKind::WriteZeroes { .. } | ReqKind::Discard
        )
    }
}

#[derive(Default)]
pub(super) struct Req {
    pub(super) token: u64,
    pub(super) kind: ReqKind,
    pub(super) iov: Vec<iovec>,
    /// Parts not yet finished.
    pub(super) pending: u32,
    pub(super) error: Option<IoError>,
    /// For a read issued by an allocation (copy on write): that allocation.
    pub(super) parent: Option<AllocId>,
    /// Some of it is served by this shard (else every piece went to other shards, which
    /// completed them the way writes complete, and nothing is left to do here).
    pub(super) has_local: bool,
    /// Write-through when it was submitted (a piece served for another shard: the
    /// submitter's mode, whatever this shard's is while the modes are being switched).
    pub(super) writethrough: bool,
}

#[derive(Default, Clone, Copy)]
pub(super) struct Part {
    pub(super) req: ReqId,
    pub(super) layer: u16,
    pub(super) guest_off: u64,
    pub(super) len: u64,
    /// Byte offset of this part within the request's iovecs.
    pub(super) skip: u64,
    /// Next part in the wait list this part is on.
    /// (The wait list's raw link: [`WaitList`] is the caches' and knows no part type.)
    pub(super) next: u32,
    /// A read planned with this shard's copy of another shard's table: the table's version
    /// the copy was read at (0: none). The part is redone by the owner if the version has
    /// changed when it finishes (`group.rs`).
    pub(super) tag: u64,
}

/// A shard's requests and their parts: the arenas, and the parts ready to be planned.
pub(super) struct Requests {
    pub(super) reqs: Slab<ReqId, Req>,
    pub(super) parts: Slab<PartId, Part>,
    /// Parts to plan in this turn (new, split off, or woken from a wait list).
    pub(super) ready: VecDeque<PartId>,
}

impl Requests {
    /// Empty arenas, with room for the usual load before they grow.
    pub(super) fn new() -> Requests {
        Requests {
            reqs: Slab::with_capacity(256),
            parts: Slab::with_capacity(512),
            ready: VecDeque::with_capacity(512),
        }
    }

    /// Takes a request entry and sets it up, with no pieces yet; `writethrough`: the write
    /// cache mode it was submitted in.
    pub(super) fn new_req(
        &mut self,
        token: u64,
        kind: ReqKind,
        parent: Option<AllocId>,
        iov: &[iovec],
        has_local: bool,
        writethrough: bool,
    ) -> ReqId {
        let r = self.reqs.alloc();
        let req = &mut self.reqs[r];
        req.token = token;
        req.kind = kind;
        req.iov.clear();
        req.iov.extend_from_slice(iov);
        req.error = None;
        req.parent = parent;
        req.has_local = has_local;
        req.writethrough = writethrough;
        req.pending = 0;
        r
    }

    /// Adds a ready part of request `req` at layer 0: `len` bytes at `guest_off`, at `skip`
    /// within the request's iovecs.
    pub(super) fn new_part(&mut self, req: ReqId, guest_off: u64, len: u64, skip: u64) {
        self.reqs[req].pending += 1;
        let p = self.parts.alloc();
        self.parts[p] = Part {
            req,
            layer: 0,
            guest_off,
            len,
            skip,
            next: NO_ID,
            tag: 0,
        };
        self.ready.push_back(p);
    }

    /// Splits part `pid` at `at` bytes; the tail becomes a new ready part.
    pub(super) fn split(&mut self, pid: PartId, at: u64) {
        let p = self.parts[pid];
        debug_assert!(at > 0 && at < p.len);
        let t = self.parts.alloc();
        self.parts[t] = Part {
            guest_off: p.guest_off + at,
            len: p.len - at,
            skip: p.skip + at,
            next: NO_ID,
            ..p
        };
        self.parts[pid].len = at;
        self.reqs[p.req].pending += 1;
        self.ready.push_back(t);
    }

    /// Appends part `pid` to a wait list.
    pub(super) fn enqueue_waiter(&mut self, list: &mut WaitList, pid: PartId) {
        self.parts[pid].next = NO_ID;
        if list.tail == NO_ID {
            list.head = pid.index();
        } else {
            self.parts[PartId::from_index(list.tail)].next = pid.index();
        }
        list.tail = pid.index();
    }

    /// Takes the first part off a wait list.
    pub(super) fn pop_waiter(&self, list: &mut WaitList) -> Option<PartId> {
        if list.head == NO_ID {
            return None;
        }
        let pid = PartId::from_index(list.head);
        list.head = self.parts[pid].next;
        if list.head == NO_ID {
            list.tail = NO_ID;
        }
        Some(pid)
    }

    /// Makes every part of `list` ready to be planned again.
    pub(super) fn wake_waiters(&mut self, mut list: WaitList) {
        while let Some(pid) = self.pop_waiter(&mut list) {
            self.ready.push_back(pid);
        }
    }
}
