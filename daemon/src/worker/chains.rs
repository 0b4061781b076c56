//! The request path of a worker: taking chains from the available rings, turning them into
//! engine requests, recording them in the in-flight area, and returning them to the used rings
//! once the engine completes them; draining and finishing a worker at the end of a connection.
//!
//! An `impl` block of [`Worker`] (see `mod.rs` for the thread model): runs on the worker's own
//! thread, or on the thread that holds the worker's mutex (stop, quiesce, finish).

use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, error, info, warn};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};

use crate::block_io::BlockIo;
use crate::chain::ChainWalker;
use crate::inflight::{QueueTracker, Recovery};
use crate::metrics::Operation;
use crate::request::{prepare, DeviceInfo, Malformed, Prepared};
use crate::virtio_blk::{STATUS_IOERR, STATUS_OK};

use super::{Avail, Held, Op, Reap, RingState, Slot, TrackedQueue, Vring, Worker, LOUD_ERRORS};

impl<B: BlockIo> Worker<B> {
    /// Once per turn: publishes the requests in flight and what the engine's caches counted
    /// since the last turn.
    pub(super) fn publish_metrics(&mut self) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        let in_flight =
            self.in_flight_per_queue.iter().sum::<u32>() + u32::from(self.held.is_some());
        metrics.set_in_flight(u64::from(in_flight));
        let stats = self.io.cache_stats();
        if stats != self.cache_published {
            metrics.add_cache(stats.since(self.cache_published));
            self.cache_published = stats;
        }
    }

    /// Counts a request returned to the used ring just now.
    pub(super) fn record(&self, started: Option<Instant>, op: Operation, ok: bool, bytes: u64) {
        if let (Some(metrics), Some(started)) = (&self.metrics, started) {
            metrics.record(op, ok, bytes, started.elapsed());
        }
    }

    /// Takes the chains available on local queue `index` while the gate is open and the ring
    /// is sound, and starts them; returns how many it took.
    ///
    /// Chains are read through a view of guest memory taken after the available index that
    /// showed them was read (`mem` is replaced by a fresh view when it is not): the frontend
    /// adds a memory region, and only once the daemon has answered does the driver put
    /// chains that use it in the ring. A view taken before that index, even an instant before,
    /// may lack the region, and the chain would fail as lying outside guest memory. One view
    /// per index read that shows new chains, not one per chain.
    pub(super) fn pop_requests(
        &mut self,
        vring: &Vring,
        index: usize,
        mem: &mut Arc<GuestMemoryMmap>,
        dev: &DeviceInfo,
    ) -> usize {
        let mut state = vring.get_mut();
        let mut taken = 0;
        // Chains, from the next one on, that the index showed before `mem` was taken.
        let mut covered: u16 = 0;
        while self.gate_open() && self.broken & (1 << index) == 0 {
            let head = match next_avail(&mut state, mem) {
                Avail::Chain { head, shown } => {
                    if covered == 0 {
                        *mem = self.mem.memory().into_inner();
                        covered = shown;
                    }
                    covered -= 1;
                    head
                }
                Avail::Empty => break,
                Avail::Broken(why) => {
                    // Taking nothing more from this ring is the only way not to spin on it:
                    // the ring keeps saying it has chains, and none can be taken.
                    self.broken |= 1 << index;
                    error!(
                        queue = self.global_queue(index),
                        "The driver broke the available ring ({why}): the queue takes no more \
                         requests until the frontend sets it up again"
                    );
                    break;
                }
            };
            // Recorded before the request has any effect, so that if this process dies from
            // here on, the next one resubmits the chain.
            if let Some(tracker) = self.tracker_mut(index) {
                tracker.taken(head);
            }
            self.start_chain(&mut state, index, head, mem, dev, false);
            taken += 1;
        }
        taken
    }

    /// Prepares the chain of `head` on local queue `index` and submits it, or answers it at
    /// once, or holds it when the export's limits say it must wait (unless `admitted`: it
    /// waited already, or is resubmitted after a reconnect). For chains just taken from the
    /// available ring and for chains resubmitted after a reconnect alike.
    pub(super) fn start_chain(
        &mut self,
        state: &mut RingState,
        index: usize,
        head: u16,
        mem: &Arc<GuestMemoryMmap>,
        dev: &DeviceInfo,
        admitted: bool,
    ) {
        let started = self.metrics.is_some().then(Instant::now);
        let queue = state.get_queue();
        let mut walker =
            ChainWalker::new(mem, GuestAddress(queue.desc_table()), queue.size(), head);
        let (mut prepared, mut malformed) = prepare(&mut walker, mem, dev, &mut self.scratch);
        if let Some(why) = walker.error() {
            debug!(index, head, ?why, "Malformed descriptor chain");
            prepared = prepared.into_ioerr();
            malformed = Some(Malformed::Chain);
        }
        if let Some(why) = malformed {
            debug!(index, head, ?why, "Malformed request");
        }
        let (op, ok_len, status, bytes) = match prepared {
            Prepared::Done { status, used_len } => {
                if let Some((addr, code)) = status {
                    write_status(mem, addr, code);
                }
                self.return_chain(state, &self.mem.memory(), index, head, used_len);
                let ok = matches!(status, Some((_, STATUS_OK)));
                // On success everything written but the status byte is payload (GET_ID).
                let bytes = u64::from(used_len.saturating_sub(1));
                let op = Operation::of(self.scratch.request_type);
                self.record(started, op, ok, bytes);
                return;
            }
            Prepared::Read {
                offset,
                len,
                status,
            } => (Op::Read(offset), len + 1, status, u64::from(len)),
            Prepared::Write {
                offset,
                len,
                status,
            } => (Op::Write(offset), 1, status, u64::from(len)),
            Prepared::Flush { status } => (Op::Flush, 1, status, 0),
            Prepared::Discard { status } => (Op::Discard, 1, status, self.ranges_bytes()),
            Prepared::WriteZeroes { status } => (Op::WriteZeroes, 1, status, self.ranges_bytes()),
        };
        if !admitted {
            if let Some((throttle, timer)) = &mut self.throttle {
                let wait_ns = match op {
                    Op::Read(_) => throttle.admit(false, bytes),
                    Op::Write(_) | Op::WriteZeroes => throttle.admit(true, bytes),
                    Op::Flush | Op::Discard => 0,
                };
                if wait_ns > 0 {
                    let now = Instant::now();
                    let wait = std::time::Duration::from_nanos(wait_ns);
                    match timer.arm(wait) {
                        Ok(()) => {
                            self.held = Some(Held {
                                queue: index,
                                head,
                                dev: dev.clone(),
                                taken: now,
                                until: now + wait,
                            });
                            return;
                        }
                        // Without a timer the request cannot wait: it goes now.
                        Err(e) => warn!("Cannot arm the throttle timer: {e}"),
                    }
                }
            }
        }

        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                // Bounded by the sum of this thread's queue sizes (each chain is in flight at
                // most once), far below u32::MAX.
                self.slots.push(Slot::FREE);
                (self.slots.len() - 1) as u32
            }
        };
        let token = u64::from(slot);
        self.slots[slot as usize] = Slot {
            head,
            // Local queue indexes are below MAX_QUEUES (64).
            queue: index as u8,
            status,
            ok_len,
            pending: 0,
            failed: false,
            mem: Some(self.snapshots.hold(mem)),
            op: op.operation(),
            bytes,
            started,
            // The data a read or write asks for; the others carry none.
            budget_bytes: match op {
                Op::Read(_) | Op::Write(_) => bytes,
                _ => 0,
            },
        };
        let (submitted, refused) = self.submit(op, token);
        if let Some(e) = &refused {
            // Refusals are the guest's doing (or a read-only export) and can come at request
            // rate: not worth more than a debug line each.
            debug!(index, head, "Request refused by the engine: {e}");
        }
        let slot_state = &mut self.slots[slot as usize];
        slot_state.pending = submitted;
        slot_state.failed = refused.is_some();
        if submitted > 0 {
            if let Some(n) = self.in_flight_per_queue.get_mut(index) {
                *n += 1;
            }
            let budget_bytes = slot_state.budget_bytes;
            self.budget.take(budget_bytes);
            return;
        }
        // Nothing reached the engine: answer now.
        if let Some(snapshot) = slot_state.mem.take() {
            self.snapshots.release(snapshot);
        }
        self.free.push(slot);
        write_status(mem, status, STATUS_IOERR);
        self.return_chain(state, &self.mem.memory(), index, head, 1);
        self.record(started, op.operation(), false, bytes);
    }

    /// Adds chain `head` of local queue `index` to its used ring, recording it in the
    /// in-flight area in libvhost-user's order: the head about to be returned, the used
    /// element and index (virtio-queue stores the index with release ordering), then the
    /// chain's flag cleared and the new index copied.
    ///
    /// `mem` is this worker's view of guest memory (taken for the batch being returned),
    /// never the vring's own: only the backend publishes a table to the workers, once its
    /// regions are guarded.
    pub(super) fn return_chain(
        &mut self,
        state: &mut RingState,
        mem: &GuestMemoryMmap,
        index: usize,
        head: u16,
        len: u32,
    ) {
        let tracker = self.tracked.get(index).and_then(|t| t.tracker.as_ref());
        if let Some(t) = tracker {
            t.returning(head);
        }
        let used = state.get_queue_mut().add_used(mem, head, len);
        match used {
            Ok(()) => {
                if let Some(t) = tracker {
                    t.returned(head, state.get_queue().next_used());
                }
            }
            Err(e) => warn!(index, head, "Cannot return a request to the guest: {e}"),
        }
        self.dirty |= 1 << index;
    }

    pub(super) fn tracker_mut(&mut self, index: usize) -> Option<&mut QueueTracker> {
        self.tracked.get_mut(index).and_then(|t| t.tracker.as_mut())
    }

    /// Before local queue `index` is processed: when the connection's in-flight area is new
    /// to this queue, sets the queue up with it. A new area is initialised; one a previous
    /// backend used is recovered from (libvhost-user's `vu_check_queue_inflights`): the queue
    /// resumes taking chains after the ones that backend had taken (whatever SET_VRING_BASE
    /// said), and the chains it left in flight are resubmitted, oldest first.
    pub(super) fn sync_inflight(
        &mut self,
        vring: &Vring,
        index: usize,
        mem: &Arc<GuestMemoryMmap>,
        dev: &DeviceInfo,
    ) {
        let Some(link) = &self.inflight else {
            return;
        };
        let generation = link.shared.generation();
        if self.tracked.get(index).map_or(0, |t| t.generation) == generation {
            return;
        }
        let (generation, area) = link.shared.current();
        let global = index * link.threads + link.thread;
        if self.tracked.len() <= index {
            self.tracked.resize_with(index + 1, TrackedQueue::default);
        }
        self.tracked[index] = TrackedQueue {
            generation,
            tracker: None,
        };
        let Some(area) = area else {
            return;
        };
        let Some(mut tracker) = QueueTracker::new(area, global) else {
            warn!(
                queue = global,
                "The in-flight area has no room for this queue: its requests are not tracked"
            );
            return;
        };
        if self.queue_in_flight(index) > 0 {
            // Not something QEMU does (it shares the area before it starts the queues): the
            // requests in flight are not in the new area, which cannot describe the queue
            // until it is stopped and started again.
            warn!(
                queue = global,
                "In-flight area shared while requests are in flight: not tracked until the \
                 queue restarts"
            );
            return;
        }
        let mut state = vring.get_mut();
        let queue = state.get_queue();
        let used = match queue.used_idx(&**mem, std::sync::atomic::Ordering::Acquire) {
            Ok(used) => used.0,
            Err(e) => {
                warn!(
                    queue = global,
                    "Cannot read the used index: requests not tracked: {e}"
                );
                return;
            }
        };
        let avail = queue
            .avail_idx(&**mem, std::sync::atomic::Ordering::Acquire)
            .map_or(used, |a| a.0);
        let recovery = tracker.recover(used, queue.size());
        let Recovery::Resume {
            next_avail,
            resubmit,
            fixed_last_batch,
        } = recovery
        else {
            self.tracked[index].tracker = Some(tracker);
            return;
        };
        // The chains in flight are among those the driver made available and the device has
        // not returned: more than that, and the area does not describe this ring.
        let available = avail.wrapping_sub(used);
        if resubmit.len() > usize::from(available) {
            error!(
                queue = global,
                in_flight = resubmit.len(),
                available,
                "The in-flight area does not match the ring: its requests are not resubmitted"
            );
            tracker.reset(used);
            self.tracked[index].tracker = Some(tracker);
            return;
        }
        self.tracked[index].tracker = Some(tracker);
        let set_base = state.get_queue().next_avail();
        if !resubmit.is_empty() || next_avail != set_base || fixed_last_batch {
            info!(
                queue = global,
                used,
                resubmitted = resubmit.len(),
                next_avail,
                "Resuming the requests a previous daemon left in flight"
            );
        }
        state.get_queue_mut().set_next_avail(next_avail);
        for head in resubmit {
            self.start_chain(&mut state, index, head, mem, dev, true);
        }
        drop(state);
        // In case the previous daemon died between returning a chain and notifying the guest.
        if let Err(e) = vring.signal_used_queue() {
            warn!(queue = global, "Cannot notify the guest: {e}");
        }
    }

    /// Bytes covered by the ranges of the discard or write-zeroes request just prepared.
    pub(super) fn ranges_bytes(&self) -> u64 {
        self.scratch.ranges.iter().map(|r| r.len).sum()
    }

    /// Submits the engine requests of the chain prepared in `self.scratch` with `token`.
    /// Returns how many were accepted and, if one was refused, why (the ones after it are not
    /// submitted).
    pub(super) fn submit(&mut self, op: Op, token: u64) -> (u32, Option<B::SubmitError>) {
        let one = |r: Result<(), B::SubmitError>| match r {
            Ok(()) => (1, None),
            Err(e) => (0, Some(e)),
        };
        match op {
            Op::Read(offset) => {
                // SAFETY: `prepare` built the iovecs from regions of the memory snapshot whose
                // Arc the slot of `token` holds; that clone lives until the completion for
                // `token` is processed (or, if the worker is dropped first, until the I/O
                // engine has been drained), so the mapping outlives the I/O. They are the
                // chain's device-writable buffers, which the driver does not touch while the
                // request is in flight (if a broken driver does, it only garbles its own data:
                // the memory is a shared mapping, accessed by the kernel and raw copies).
                one(unsafe { self.io.submit_read(token, offset, &self.scratch.iov) })
            }
            Op::Write(offset) => {
                // SAFETY: as for reads: the mapping outlives the I/O; the buffers are the
                // chain's device-readable ones and are only read.
                one(unsafe { self.io.submit_write(token, offset, &self.scratch.iov) })
            }
            Op::Flush => one(self.io.submit_flush(token)),
            Op::Discard | Op::WriteZeroes => {
                let mut submitted = 0;
                for r in &self.scratch.ranges {
                    let result = match op {
                        Op::Discard => self.io.submit_discard(token, r.offset, r.len),
                        _ => self.io.submit_write_zeroes(token, r.offset, r.len, r.unmap),
                    };
                    match result {
                        Ok(()) => submitted += 1,
                        Err(e) => return (submitted, Some(e)),
                    }
                }
                (submitted, None)
            }
        }
    }

    /// Collects finished requests from the engine as `how` says and returns them to their
    /// queues; true if the engine has work of its own left that waits for the next reap
    /// ([`Reap::PollMore`] only).
    pub(super) fn reap_as(&mut self, vrings: &[Vring], how: Reap) -> bool {
        let mut done = std::mem::take(&mut self.done);
        let more = match how {
            Reap::Poll => {
                self.io.poll(&mut done);
                false
            }
            Reap::PollMore => self.io.poll_more(&mut done),
        };
        if done.is_empty() {
            self.done = done;
            return more;
        }
        // One view of guest memory, one lock of a queue's state for as long as consecutive
        // completions are of that queue, and one give of the budget for the whole batch.
        let mem = self.mem.memory();
        let mut locked: Option<(usize, std::sync::MutexGuard<'_, RingState>)> = None;
        let (mut given_bytes, mut given) = (0u64, 0u32);
        for (token, result) in done.drain(..) {
            let ok = match result {
                Ok(()) => true,
                Err(e) => {
                    if self.note_error() {
                        warn!(token, "Request failed: {e}");
                    }
                    false
                }
            };
            let Some(c) = self.release_slot(token, ok) else {
                continue;
            };
            given_bytes += c.budget_bytes;
            given += 1;
            if locked.as_ref().map(|(q, _)| *q) != Some(c.queue) {
                locked = None;
                match vrings.get(c.queue) {
                    Some(vring) => locked = Some((c.queue, vring.get_mut())),
                    None => {
                        error!(
                            queue = c.queue,
                            "Completion for a queue this worker does not know"
                        );
                        continue;
                    }
                }
            }
            if let Some((_, state)) = &mut locked {
                self.return_chain(state, &mem, c.queue, c.head, c.len);
            }
            self.record(c.started, c.op, c.ok, c.bytes);
        }
        drop(locked);
        self.budget.give_many(given_bytes, given);
        self.done = done;
        more
    }

    /// One engine request of `token` is done (`ok`: it succeeded). After the chain's last,
    /// writes its status, frees its slot and returns what its chain goes back with; the
    /// caller returns the chain to its used ring and gives its budget back.
    fn release_slot(&mut self, token: u64, ok: bool) -> Option<Completed> {
        let Some(slot) = usize::try_from(token)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
        else {
            error!(token, "Completion for an unknown request");
            return None;
        };
        if slot.mem.is_none() || slot.pending == 0 {
            error!(token, "Completion for a request that is not in flight");
            return None;
        }
        slot.failed |= !ok;
        slot.pending -= 1;
        if slot.pending > 0 {
            // More segments of the same chain to come.
            return None;
        }
        let snapshot = slot.mem.take()?;
        let (code, len) = if !slot.failed {
            (STATUS_OK, slot.ok_len)
        } else {
            (STATUS_IOERR, 1)
        };
        let status = slot.status;
        let done = Completed {
            queue: usize::from(slot.queue),
            head: slot.head,
            len,
            op: slot.op,
            bytes: slot.bytes,
            started: slot.started,
            ok: !slot.failed,
            budget_bytes: slot.budget_bytes,
        };
        match self.snapshots.get(snapshot) {
            Some(mem) => write_status(mem, status, code),
            None => error!(token, "A request in flight lost its memory snapshot"),
        }
        self.snapshots.release(snapshot);
        // In range: `token` indexed `slots`, whose length fits u32 (see `pop_requests`).
        self.free.push(token as u32);
        if let Some(n) = self.in_flight_per_queue.get_mut(done.queue) {
            *n = n.saturating_sub(1);
        }
        Some(done)
    }

    /// One engine request of `token` is done: after the chain's last, returns the chain to
    /// its used ring (for a completion outside a batch of [`Worker::reap_as`]).
    pub(super) fn complete(&mut self, vrings: &[Vring], token: u64, ok: bool) {
        let Some(c) = self.release_slot(token, ok) else {
            return;
        };
        self.budget.give(c.budget_bytes);
        match vrings.get(c.queue) {
            Some(vring) => {
                let mem = self.mem.memory();
                self.return_chain(&mut vring.get_mut(), &mem, c.queue, c.head, c.len);
                self.record(c.started, c.op, c.ok, c.bytes);
            }
            None => error!(
                queue = c.queue,
                "Completion for a queue this worker does not know"
            ),
        }
    }

    /// Fails every request still recorded on local queue `index` (used only when the engine
    /// lost track of them, which is a bug).
    pub(super) fn abandon_queue(&mut self, vrings: &[Vring], index: usize) {
        let stuck: Vec<u64> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.mem.is_some() && usize::from(s.queue) == index)
            .map(|(i, _)| i as u64)
            .collect();
        for token in stuck {
            if let Some(slot) = self.slots.get_mut(token as usize) {
                slot.pending = 1;
            }
            self.complete(vrings, token, false);
        }
    }

    /// For a connection whose threads are gone: polls the engine once, dropping what completed
    /// (nobody reads the rings any more; see [`Worker::finish`]). Returns the requests still in
    /// flight and whether any completed.
    pub fn pump(&mut self) -> (usize, bool) {
        self.io.poll(&mut self.done);
        let moved = !self.done.is_empty();
        self.done.clear();
        (self.io.in_flight(), moved)
    }

    /// Ends this worker's part of a connection whose threads are gone: waits for every request
    /// still in flight (their chains are not returned: nobody reads the rings any more), then
    /// makes every completed write durable and gives back the engine's reservations
    /// ([`BlockIo::finish`]). Idempotent: a second call finds nothing to do but flush again.
    pub fn finish(&mut self) -> Result<(), B::SubmitError> {
        self.finished = true;
        while self.io.in_flight() > 0 {
            let before = self.io.in_flight();
            self.io.wait(&mut self.done);
            let progressed = !self.done.is_empty() || self.io.in_flight() < before;
            self.done.clear();
            if !progressed {
                error!(
                    in_flight = self.io.in_flight(),
                    "The engine stopped completing requests; flushing what completed"
                );
                break;
            }
        }
        let finished = self.io.finish();
        self.publish_metrics();
        if let Some(metrics) = &self.metrics {
            // Whatever was still in flight will never be returned to the guest.
            metrics.set_in_flight(0);
        }
        finished
    }

    /// Gives this worker's part of a connection up without waiting or flushing (its engine
    /// stopped completing requests): dropping it then does not wait either.
    pub fn abandon(&mut self) {
        self.finished = true;
        if let Some(metrics) = &self.metrics {
            metrics.set_in_flight(0);
        }
    }

    /// Signals every queue that got used entries, when the driver asked for it.
    pub(super) fn notify(&mut self, vrings: &[Vring]) {
        while self.dirty != 0 {
            let queue = self.dirty.trailing_zeros() as usize;
            self.dirty &= self.dirty - 1;
            let Some(vring) = vrings.get(queue) else {
                continue;
            };
            let needed = vring
                .get_mut()
                .get_queue_mut()
                .needs_notification(&*self.mem.memory());
            let needed = needed.unwrap_or_else(|e| {
                warn!(queue, "Cannot read the driver's notification index: {e}");
                true
            });
            if needed {
                if let Err(e) = vring.signal_used_queue() {
                    warn!(queue, "Cannot notify the guest: {e}");
                }
            }
        }
    }

    /// Counts a failed request; true if it should be logged (the first few, then every power
    /// of two), so a broken disk cannot flood the log.
    pub(super) fn note_error(&mut self) -> bool {
        self.errors += 1;
        self.errors <= LOUD_ERRORS || self.errors.is_power_of_two()
    }
}
/// Takes the next chain from the available ring of `state`'s queue, unless the ring is empty
/// or broken. virtio-queue's own `pop_descriptor_chain` answers `None` for both (logging an
/// error each time), while its `enable_notification` goes on reporting chains to take: a
/// worker that trusted the two would spin on a broken ring forever, never back in its event
/// loop, and the connection could never end. A driver (or a frontend that truncated the
/// memory the ring lies in, which then reads as zeros) controls the ring, so this is the
/// guest's to break, and the queue's alone to suffer.
pub(super) fn next_avail(state: &mut RingState, mem: &GuestMemoryMmap) -> Avail {
    let queue = state.get_queue_mut();
    let size = queue.size();
    let next = std::num::Wrapping(queue.next_avail());
    let idx = match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(idx) => idx,
        Err(e) => return Avail::Broken(format!("its index cannot be read: {e}")),
    };
    if idx == next {
        return Avail::Empty;
    }
    if (idx - next).0 > size {
        return Avail::Broken(format!(
            "its index {} is more than the queue size {size} ahead of the device's {}",
            idx.0, next.0
        ));
    }
    match queue.iter(mem) {
        Ok(mut chains) => match chains.next() {
            Some(chain) => Avail::Chain {
                head: chain.head_index(),
                shown: (idx - next).0,
            },
            None => Avail::Broken(format!("its entry {} cannot be read", next.0)),
        },
        Err(e) => Avail::Broken(e.to_string()),
    }
}

pub(super) fn write_status(mem: &GuestMemoryMmap, addr: GuestAddress, code: u8) {
    // `prepare` checked that the status byte is inside guest memory.
    if let Err(e) = mem.write_obj(code, addr) {
        warn!("Cannot write a request status at {:#x}: {e}", addr.0);
    }
}

/// A chain whose last engine request completed, to return to its used ring.
struct Completed {
    queue: usize,
    head: u16,
    /// Used length: the data read and the status byte, or the status byte alone.
    len: u32,
    op: crate::metrics::Operation,
    bytes: u64,
    started: Option<Instant>,
    ok: bool,
    budget_bytes: u64,
}
