//! Operations on the ring: pushing one (its submission entry, counted in flight), freeing it
//! (its buffers back to their pools, its scratch and epoch given back), and dispatching its
//! completion to the behaviour it belongs to (`read.rs`, `l2.rs`, `write.rs`, `flush.rs`);
//! the retry timeout. An `impl State` block over the operations (`op.rs`) and the parts their
//! buffers and charges come from.
//!
//! Runs on the shard's thread.

use super::op::{InflateTarget, OpKind, Target, RETRY_AFTER};
use super::slab::OpId;
use super::state::State;
use crate::error::IoError;
use crate::io::sqe::{self, Sqe};
use crate::io::Ring;
use crate::meta::NO_ID;
use crate::shared::ImageInner;

impl State {
    /// Pushes `entry` for operation `op`; on failure the operation is freed and its error
    /// returned.
    ///
    /// # Safety
    /// The buffers `entry` points to must stay valid until the operation's completion.
    pub(super) unsafe fn push(
        &mut self,
        ring: &mut Ring,
        op: OpId,
        entry: Sqe,
    ) -> Result<(), IoError> {
        // SAFETY: forwarded from the caller.
        match unsafe { ring.push(&entry.user_data(u64::from(op))) } {
            Ok(()) => {
                self.ops_in_kernel += 1;
                Ok(())
            }
            Err(e) => {
                self.free_op(op);
                Err(IoError::os(&e))
            }
        }
    }

    pub(super) fn free_op(&mut self, op: OpId) {
        let o = &mut self.ops[op];
        let kind = std::mem::take(&mut o.kind);
        if o.epoch != 0 {
            self.reservations.frees.live[usize::from(o.epoch - 1)] -= 1;
            o.epoch = 0;
        }
        let charge = std::mem::take(&mut o.scratch_charge);
        self.ops.free(op);
        self.recycle_kind(kind);
        if charge > 0 {
            self.scratch.bytes -= charge;
            self.wake_scratch_waiters();
        }
    }

    /// Gives the buffers of a freed operation's kind back to their pools.
    fn recycle_kind(&mut self, kind: OpKind) {
        match kind {
            OpKind::Compressed { extent, target, .. }
            | OpKind::Inflating { extent, target, .. } => {
                self.buffers.recycle(extent);
                self.recycle_target(target);
            }
            OpKind::FlushWrite { bytes } | OpKind::RefcountWrite { bytes } => {
                self.buffers.recycle(bytes)
            }
            // The kernel is done with a bounce buffer: it goes.
            OpKind::Data { bounce, .. } | OpKind::AllocWrite { bounce, .. } => drop(bounce),
            OpKind::Idle | OpKind::L2Load { .. } | OpKind::FlushSync { .. } | OpKind::Retry => {}
        }
    }

    /// Gives an inflate target's buffer back to its pool and says which target it was.
    pub(super) fn recycle_target(&mut self, target: Target) -> InflateTarget {
        let id = target.id();
        if let Target::Prefix { scratch, .. } = target {
            self.buffers.recycle(scratch);
        }
        id
    }

    /// Takes `charge` bytes of scratch for operation `op`.
    pub(super) fn charge_scratch(&mut self, op: OpId, charge: usize) {
        self.ops[op].scratch_charge += charge;
        self.scratch.bytes += charge;
        self.scratch.peak = self.scratch.peak.max(self.scratch.bytes);
    }

    /// Makes ready as many of the parts waiting for scratch, oldest first, as the scratch
    /// given back can serve.
    pub(super) fn wake_scratch_waiters(&mut self) {
        let mut room = self.scratch.limit.saturating_sub(self.scratch.bytes);
        let mut first = self.scratch.bytes == 0;
        while self.scratch.waiters.head != NO_ID && (first || room >= self.scratch.need) {
            first = false;
            room = room.saturating_sub(self.scratch.need);
            if let Some(pid) = self.requests.pop_waiter(&mut self.scratch.waiters) {
                self.requests.ready.push_back(pid);
            }
        }
    }

    /// Handles the completion of operation `op` with result `res`.
    pub(super) fn complete_op(&mut self, ring: &mut Ring, img: &ImageInner, op: OpId, res: i32) {
        match self.ops[op].kind {
            OpKind::Idle => unreachable!("completion for idle op {op}"),
            OpKind::Data { .. } => self.complete_data(ring, op, res),
            OpKind::L2Load { .. } => self.complete_l2_load(ring, img, op, res),
            OpKind::Compressed { .. } => self.complete_compressed(ring, img, op, res),
            OpKind::Inflating { .. } => self.complete_inflating(ring, img, op, res),
            OpKind::AllocWrite { alloc, .. } => {
                self.free_op(op);
                self.alloc_written(img, alloc, res);
            }
            OpKind::RefcountWrite { .. } => {
                self.free_op(op);
                self.refcount_write_done(img, res);
            }
            OpKind::FlushWrite { .. } => {
                self.free_op(op);
                self.flush_op_done(ring, img, res);
            }
            OpKind::FlushSync { injected } => {
                self.free_op(op);
                self.flush_op_done(ring, img, if injected { -libc::EIO } else { res });
            }
            OpKind::Retry => {
                self.free_op(op);
                self.retry_armed = false;
            }
        }
    }

    /// Wakes this shard again shortly (another shard holds something this one waits for).
    pub(super) fn retry_later(&mut self, ring: &mut Ring) {
        if self.retry_armed {
            return;
        }
        let entry = sqe::timeout(&RETRY_AFTER);
        let op = self.ops.alloc();
        self.ops[op].kind = OpKind::Retry;
        // SAFETY: the timeout points at a static.
        match unsafe { self.push(ring, op, entry) } {
            Ok(()) => self.retry_armed = true,
            Err(e) => tracing::error!("Cannot arm a retry timeout: {e}"),
        }
    }
}
