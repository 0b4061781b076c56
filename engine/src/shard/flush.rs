//! Guest flushes, and metadata write-back: getting metadata changed in memory into the file.
//!
//! **Flushes** make every completed write durable, metadata in dependency order. At the start
//! of a run (a flush or a write-back) the shard takes a snapshot of what is dirty: refcount
//! blocks (and the refcount table and header if the table grew or moved), L2 tables and L1
//! entries ([`State::snapshot_dirty`]). The planner (`flush_plan.rs`) turns it into ordered
//! steps (refcounts durable, then L2 tables, then L1 entries, with the syncs between), and this
//! file executes them one after the other: each step's writes all complete before the next
//! starts.
//!
//! Then the references dropped before the snapshot are freed in memory (invariant 3: an L2
//! entry stops pointing at a cluster durably before its refcount drops, and the cluster is not
//! reused before), once the data operations in flight at that moment have completed
//! (invariant 10, `apply_frees`). Whatever changes while a flush runs belongs to the next one; flushes that
//! arrive meanwhile are served together by the next one. If a write or sync fails, the image
//! turns read-only and every waiting flush fails: nothing pretends to be durable.
//!
//! **Write-backs** keep a killed process from losing what it acknowledged. In write-back
//! mode a write that changed metadata completes only once that metadata is in the file (in
//! the page cache, not necessarily durable), so SIGKILL, an OOM kill or a crash of the daemon
//! loses no completed write; only a host crash loses what no flush covered, as the guest was
//! told (a volatile write cache). A write-back writes the same things in the same order as a
//! flush, but only the L2 bytes that changed (512-byte chunks), and its plan syncs only where
//! an ordering needs it, because each of its writes may become durable at any moment after it
//! is issued and the invariants must hold at every such moment:
//! - refcount blocks are written with RWF_DSYNC (durable before any entry pointing into a new
//!   reservation is written, without syncing the guest data that is dirty in the file);
//! - an fdatasync precedes the L2 entries when one of them points at a cluster whose data must
//!   not be lost under it (copy-on-write data, a reused cluster; a fresh cluster whose span
//!   read as zeros still reads as zeros without its data), when the refcount table moved, and
//!   with lazy refcounts after a reservation (the file's new length);
//! - an fdatasync separates new L2 tables from the L1 entries that point at them.
//!
//! No frees are applied after a write-back: invariant 3 waits for a flush. A failed write-back
//! fails the image like a failed flush.
//!
//! `impl State` blocks over the shard's flush state (`flush_state.rs`: what is unwritten, the
//! queues, the run in progress), its reservations and frees, and its L2 cache; run on the
//! shard's thread.

use super::config::Completion;
use super::flush_plan::{self, Dirty, MovedTable, PlannedWrite, Step, WriteMode};
use super::op::OpKind;
use super::slab::OpId;
use super::state::State;
use super::write_log::LoggedStep;
use crate::error::IoError;
use crate::format::field;
use crate::io::sqe;
use crate::io::Ring;
use crate::meta::class;
use crate::shared::ImageInner;
use crate::write::BlockWriter;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

impl State {
    /// Marks the image corrupt for what this turn found (a write refused by the overlap
    /// checks, metadata that does not decode).
    pub(super) fn report_corruption(&mut self, img: &ImageInner) {
        let Some(w) = &img.writable else {
            return;
        };
        if let Some(why) = self.flush.pending_corrupt.take() {
            w.mark_corrupt(&img.top, why);
        }
        if let Some(hit) = self.flush.pending_overlap.take() {
            w.overlap_found(&img.top, &hit);
        }
    }

    /// Whether metadata changed in memory has not been written to the file yet (or a run
    /// that may be writing it has not finished).
    pub(super) fn metadata_unwritten(&self) -> bool {
        self.flush.active
            || self.layers[0].l2.has_unwritten()
            || !self.flush.unwritten_l1.is_empty()
    }

    /// Starts a run when none is running: a flush when one is queued, else a write-back when
    /// writes wait for one.
    pub(super) fn maybe_start_flush(&mut self, ring: &mut Ring, img: &ImageInner) {
        if self.flush.active || (self.flush.queued.is_empty() && self.flush.writeback.is_empty()) {
            return;
        }
        let Some(w) = &img.writable else {
            let f = &mut self.flush;
            for token in f.queued.drain(..).chain(f.writeback.drain(..)) {
                self.finished.push(Completion {
                    token,
                    result: Ok(()),
                });
            }
            return;
        };
        if w.failed.load(Ordering::Relaxed) {
            let f = &mut self.flush;
            for token in f.queued.drain(..).chain(f.writeback.drain(..)) {
                self.finished.push(Completion {
                    token,
                    result: Err(IoError::Os { errno: libc::EIO }),
                });
            }
            return;
        }
        let hard = !self.flush.queued.is_empty();
        // A run that writes refcount blocks (or the table) must hold the right to (see
        // `Writable::take_block_writes`). (A grown table is written by such a run: until then
        // reservation writes leave it alone, so an entry pointing into a reservation it
        // describes makes the next write-back wait and write it.)
        let writes_blocks = flush_plan::takes_block_right(
            hard,
            w.lazy_refcounts,
            self.reservations.referenced_not_durable(),
        );
        if writes_blocks {
            match w.take_block_writes(self.index) {
                Ok(()) => {}
                // This shard's reservation writes are in flight: started again at the end
                // of the turn that completes them.
                Err(BlockWriter::Me) => return,
                Err(BlockWriter::Other) => return self.retry_later(ring),
            }
        }
        let f = &mut self.flush;
        if hard {
            f.flushes += 1;
        }
        f.active = true;
        f.hard = hard;
        f.running = std::mem::take(&mut f.queued);
        f.running.append(&mut f.writeback);
        f.error = None;
        self.flush.record(|| LoggedStep::RunStart { hard });
        let dirty = self.snapshot_dirty(img, hard, writes_blocks);
        let steps = flush_plan::plan(dirty);
        self.flush.steps = steps.into();
        self.next_flush_batch(ring, img);
    }

    /// Takes the L2 writes of a run: whole dirty tables for a flush, the changed 512-byte
    /// chunks for a write-back (their keys kept in `l2_keys`, to finish or undo the run).
    fn snapshot_l2(&mut self, q: &crate::layer::Qcow2Layer, hard: bool) -> Vec<PlannedWrite> {
        let cs = q.geom.cluster_size();
        let f = &mut self.flush;
        f.l2_keys.clear();
        let mut l2 = Vec::new();
        if hard {
            self.layers[0].l2.take_dirty(&mut f.l2_keys);
            for &(l1_index, slot) in &f.l2_keys {
                let Some(host) = l2_host(q, l1_index, cs) else {
                    continue;
                };
                // A cluster of the top image.
                let mut buf = self.buffers.cluster();
                buf.copy_from_slice(self.layers[0].l2.buf(slot));
                l2.push(planned(host, buf, class::ACTIVE_L2));
            }
        } else {
            let mut ranges = Vec::new();
            self.layers[0].l2.take_unwritten(&mut ranges);
            for (l1_index, slot, offset, len) in ranges {
                f.l2_keys.push((l1_index, slot));
                let Some(host) = l2_host(q, l1_index, cs) else {
                    continue;
                };
                let bytes = &self.layers[0].l2.buf(slot)[offset..offset + len];
                l2.push(planned(
                    host + offset as u64,
                    Box::from(bytes),
                    class::ACTIVE_L2,
                ));
            }
        }
        l2
    }

    /// Takes what a run starting now writes (see `flush_plan::Dirty`), and the bookkeeping to
    /// finish or undo it. L2 tables and L1 entries first, then refcounts, so that every
    /// cluster a snapshotted entry points at was reserved (and counted) before the refcount
    /// snapshot.
    fn snapshot_dirty(&mut self, img: &ImageInner, hard: bool, writes_blocks: bool) -> Dirty {
        let q = &img.top.q;
        let w = img
            .writable
            .as_ref()
            .expect("only writable images run flushes");
        let l2 = self.snapshot_l2(q, hard);
        let f = &mut self.flush;
        f.l1_indices.clear();
        if hard {
            f.l1_indices.append(&mut f.dirty_l1);
            f.unwritten_l1.clear();
        } else {
            f.l1_indices.append(&mut f.unwritten_l1);
        }
        f.l1_indices.sort_unstable();
        f.l1_indices.dedup();
        if hard {
            f.frees = std::mem::take(&mut self.reservations.pending_frees);
        }
        let sync_data_first = std::mem::take(&mut f.sync_before_l2);
        self.reservations.newest_referenced = 0;
        f.snap_seq = self.reservations.seq;

        // A write-back takes refcount blocks only when an entry it writes needs them durable
        // first, or the table moved; otherwise they are left to the durable refcount writes
        // that follow each reservation (`start_refcount_writes`), or to the next flush.
        let (blocks, table) = if writes_blocks {
            let mut rc = w.refcounts.lock().unwrap_or_else(|p| p.into_inner());
            let table = rc.take_table();
            (rc.take_dirty_blocks(), table)
        } else {
            (Vec::new(), None)
        };
        f.holds_blocks = writes_blocks;
        if writes_blocks && blocks.is_empty() && table.is_none() {
            // Nothing to write; whatever was written before is durable (the holder keeps
            // the right until it is), so the run still proves every reservation so far.
            w.end_block_writes(self.index);
            f.holds_blocks = false;
        }
        if !hard && !writes_blocks {
            // This run does not prove every reservation's refcounts durable: it writes none
            // (some may be being written apart from it).
            f.snap_seq = 0;
        }
        debug_assert!(
            blocks.is_empty() || (f.holds_blocks && self.reservations.refcount_writes == 0),
            "refcount blocks written by a run without the right to"
        );
        let moved_table = table.map(|snapshot| {
            let moved = moved_table(w, &snapshot);
            f.table = Some(snapshot);
            moved
        });
        Dirty {
            hard,
            lazy_refcounts: w.lazy_refcounts,
            holds_block_right: f.holds_blocks,
            refcount_blocks: blocks
                .into_iter()
                .map(|(host, buf)| planned(host, buf, class::REFCOUNT_BLOCK))
                .collect(),
            moved_table,
            l2,
            l1: l1_writes(q, &f.l1_indices, self.group.is_some()),
            sync_data_first,
            data_file: q.data_file.is_some(),
        }
    }

    /// After a reservation (outside lazy refcounts): writes the dirty refcount blocks with
    /// RWF_DSYNC at once, apart from any run (a run in progress only writes entries whose
    /// reservations it made durable itself or that were durable when it started), so that
    /// they are durable before the reservation's clusters are referenced and no write waits
    /// for them. One batch at a time, and never while a run writes refcount blocks (nor does a
    /// run write them while these are in flight): two writes of one block in flight together
    /// may land in either order. A table that grew or moved is left to the next run (which
    /// then writes the blocks too, in order).
    pub(super) fn start_refcount_writes(&mut self, ring: &mut Ring, img: &ImageInner) {
        if !self.reservations.refcounts_to_write || self.reservations.refcount_writes > 0 {
            return;
        }
        let Some(w) = &img.writable else {
            return;
        };
        if w.failed.load(Ordering::Relaxed) {
            return;
        }
        match w.take_block_writes(self.index) {
            Ok(()) => {}
            // A run of this shard writes blocks: started again at the end of the turn that
            // completes them.
            Err(BlockWriter::Me) => return,
            Err(BlockWriter::Other) => return self.retry_later(ring),
        }
        let q = &img.top.q;
        let fd = q.file.as_raw_fd();
        let blocks = {
            let mut rc = w.refcounts.lock().unwrap_or_else(|p| p.into_inner());
            if rc.table_changed() {
                drop(rc);
                w.end_block_writes(self.index);
                return;
            }
            rc.take_dirty_blocks()
        };
        self.reservations.refcounts_to_write = false;
        self.reservations.refcount_writes_seq = self.reservations.seq;
        self.reservations.refcount_writes_failed = None;
        let blocks: Vec<PlannedWrite> = blocks
            .into_iter()
            .map(|(host, buf)| planned(host, buf, class::REFCOUNT_BLOCK))
            .collect();
        if let Some(hit) = first_overlap(img, &blocks) {
            self.flush.overlap_found(hit);
            self.reservations.refcount_writes_failed = Some(IoError::Corrupt {
                host_offset: hit.at,
            });
            return self.refcount_writes_finished(img);
        }
        self.flush.record(|| logged(true, &blocks));
        for PlannedWrite {
            host, bytes: buf, ..
        } in blocks
        {
            let entry = sqe::write(fd, &buf, host, libc::RWF_DSYNC);
            let op = self.ops.alloc();
            self.ops[op].kind = OpKind::RefcountWrite { bytes: buf };
            // SAFETY: the buffer is owned by the op (a heap allocation that does not move)
            // until its completion.
            match unsafe { self.push(ring, op, entry) } {
                Ok(()) => self.reservations.refcount_writes += 1,
                Err(e) => {
                    self.reservations.refcount_writes_failed.get_or_insert(e);
                }
            }
        }
        if self.reservations.refcount_writes == 0 {
            self.refcount_writes_finished(img);
        }
    }

    /// One durable refcount-block write completed.
    pub(super) fn refcount_write_done(&mut self, img: &ImageInner, res: i32) {
        if res < 0 {
            self.reservations
                .refcount_writes_failed
                .get_or_insert(IoError::Os { errno: -res });
        }
        self.reservations.refcount_writes -= 1;
        if self.reservations.refcount_writes == 0 {
            self.refcount_writes_finished(img);
        }
    }

    fn refcount_writes_finished(&mut self, img: &ImageInner) {
        if let Some(w) = &img.writable {
            w.end_block_writes(self.index);
        }
        match self.reservations.refcount_writes_failed.take() {
            None => {
                let seq = self.reservations.refcount_writes_seq;
                self.reservations.made_durable(seq);
            }
            Some(e) => {
                let w = img
                    .writable
                    .as_ref()
                    .expect("only writable images write refcounts");
                tracing::error!(
                    "{}: writing refcount blocks failed ({e}); the image takes no more writes",
                    img.top.path.display()
                );
                w.failed.store(true, Ordering::Relaxed);
                w.refcounts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .mark_all_dirty();
            }
        }
    }

    /// Starts the next step of the run, or finishes it when none is left.
    fn next_flush_batch(&mut self, ring: &mut Ring, img: &ImageInner) {
        let Some(step) = self.flush.steps.pop_front() else {
            return self.finish_flush(img);
        };
        let q = &img.top.q;
        let fd = q.file.as_raw_fd();
        if let Step::Write { writes, .. } = &step {
            if let Some(hit) = first_overlap(img, writes) {
                // A table would land on other metadata: nothing of this step is written,
                // the run fails and the image is marked corrupt.
                self.flush.overlap_found(hit);
                self.flush.error.get_or_insert(IoError::Corrupt {
                    host_offset: hit.at,
                });
                self.flush.steps.clear();
                return self.finish_flush(img);
            }
        }
        match &step {
            Step::Write { mode, writes } => self
                .flush
                .record(|| logged(*mode == WriteMode::Durable, writes)),
            Step::Sync { .. } => self.flush.record(|| LoggedStep::Sync),
            Step::Complete | Step::EndBlockWrites => {}
        }
        let mut entries = Vec::new();
        match step {
            Step::Complete => {
                for token in std::mem::take(&mut self.flush.running) {
                    self.finished.push(Completion {
                        token,
                        result: Ok(()),
                    });
                }
            }
            Step::EndBlockWrites => {
                self.end_run_block_writes(img);
            }
            Step::Write {
                mode: WriteMode::Inline,
                writes,
            } => {
                for PlannedWrite { host, bytes, .. } in writes {
                    if let Err(e) = crate::io::pwrite_all(fd, &bytes, host) {
                        self.flush.error.get_or_insert(IoError::os(&e));
                    }
                    self.buffers.recycle(bytes);
                }
            }
            Step::Write { mode, writes } => {
                let flags = if mode == WriteMode::Durable {
                    libc::RWF_DSYNC
                } else {
                    0
                };
                for PlannedWrite { host, bytes, .. } in writes {
                    let entry = sqe::write(fd, &bytes, host, flags);
                    let op = self.ops.alloc();
                    self.ops[op].kind = OpKind::FlushWrite { bytes };
                    entries.push((op, entry));
                }
            }
            Step::Sync { data_file } => {
                let data_fd = q.data_file.as_ref().filter(|_| data_file);
                let fds = std::iter::once(fd).chain(data_fd.map(|f| f.as_raw_fd()));
                for fd in fds {
                    let f = &self.flush;
                    let injected = f.hard && f.fail_flush_number == Some(f.flushes);
                    let entry = if injected {
                        sqe::nop()
                    } else {
                        sqe::fdatasync(fd)
                    };
                    let op = self.ops.alloc();
                    self.ops[op].kind = OpKind::FlushSync { injected };
                    entries.push((op, entry));
                }
            }
        }
        self.flush.pending_ops = 0;
        for (op, entry) in entries {
            // SAFETY: a write's buffer is owned by its op (a heap allocation that does not
            // move) until the op's completion; syncs point at no memory.
            match unsafe { self.push(ring, op, entry) } {
                Ok(()) => self.flush.pending_ops += 1,
                Err(e) => {
                    self.flush.error.get_or_insert(e);
                }
            }
        }
        if self.flush.pending_ops == 0 {
            if self.flush.error.is_some() {
                self.finish_flush(img);
            } else {
                self.next_flush_batch(ring, img);
            }
        }
    }

    /// One write or sync of the running flush completed.
    pub(super) fn flush_op_done(&mut self, ring: &mut Ring, img: &ImageInner, res: i32) {
        if res < 0 {
            self.flush.error.get_or_insert(IoError::Os { errno: -res });
        }
        self.flush.pending_ops -= 1;
        if self.flush.pending_ops > 0 {
            return;
        }
        if self.flush.error.is_some() {
            self.flush.steps.clear();
            return self.finish_flush(img);
        }
        self.next_flush_batch(ring, img);
    }

    fn finish_flush(&mut self, img: &ImageInner) {
        let w = img
            .writable
            .as_ref()
            .expect("only writable images run flushes");
        self.end_run_block_writes(img);
        let ok = self.flush.error.is_none();
        self.flush.record(|| LoggedStep::RunEnd { ok });
        if ok {
            self.tables_written();
        }
        let f = &mut self.flush;
        f.active = false;
        let result = match f.error {
            None => {
                self.reservations.made_durable(f.snap_seq);
                if let Some((off, n)) = f.table.take().and_then(|t| t.retired) {
                    let cluster = 1u64 << rc_cluster_bits(img);
                    let mut rc = w.refcounts.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(e) = rc.release(off, n * cluster, class::REFCOUNT_TABLE) {
                        tracing::warn!("Cannot free the old refcount table: {e}");
                    }
                }
                // The dropped references are durable: the clusters are freed once no data
                // operation in flight targets them (invariant 10).
                self.reservations.frees.due.append(&mut f.frees);
                self.apply_frees(img);
                Ok(())
            }
            Some(e) => {
                tracing::error!(
                    "{}: flush failed ({e}); the image takes no more writes",
                    img.top.path.display()
                );
                w.failed.store(true, Ordering::Relaxed);
                for &(key, _) in &f.l2_keys {
                    self.layers[0].l2.remark_dirty(key);
                }
                f.dirty_l1.extend_from_slice(&f.l1_indices);
                f.unwritten_l1.extend_from_slice(&f.l1_indices);
                self.reservations.pending_frees.append(&mut f.frees);
                let mut rc = w.refcounts.lock().unwrap_or_else(|p| p.into_inner());
                rc.mark_all_dirty();
                if let Some(t) = f.table.take() {
                    rc.table_write_failed(t);
                }
                Err(e)
            }
        };
        for token in std::mem::take(&mut self.flush.running) {
            self.finished.push(Completion { token, result });
        }
    }
}

impl State {
    /// A data operation on a host cluster starts: it holds the current epoch until it is
    /// freed (see `Frees`).
    pub(super) fn hold_epoch(&mut self, op: OpId) {
        let e = self.reservations.frees.current;
        self.reservations.frees.live[e] += 1;
        self.ops[op].epoch = e as u8 + 1;
    }

    /// Applies the frees whose data operations have all completed, and starts the wait of
    /// those due since (see `Frees`).
    pub(super) fn apply_frees(&mut self, img: &ImageInner) {
        let Some(w) = &img.writable else {
            return;
        };
        loop {
            let f = &mut self.reservations.frees;
            if !f.draining.is_empty() {
                if f.live[1 - f.current] > 0 {
                    return;
                }
                let mut rc = w.refcounts.lock().unwrap_or_else(|p| p.into_inner());
                for free in f.draining.drain(..) {
                    if let Err(e) = rc.release(free.host, free.len, free.meta) {
                        tracing::warn!(
                            "{}: cannot free {} bytes at {:#x}: {e}",
                            img.top.path.display(),
                            free.len,
                            free.host
                        );
                    }
                    if let Some(key) = free.compressed {
                        let _ = self.layers[0].decompressed.invalidate(key);
                    }
                }
            }
            let f = &mut self.reservations.frees;
            if f.due.is_empty() {
                return;
            }
            // The old epoch is empty: every operation in flight counts in the current one.
            f.current = 1 - f.current;
            std::mem::swap(&mut f.draining, &mut f.due);
        }
    }

    /// Gives back the right to write refcount blocks if the running run holds it.
    fn end_run_block_writes(&mut self, img: &ImageInner) {
        if std::mem::take(&mut self.flush.holds_blocks) {
            if let Some(w) = &img.writable {
                w.end_block_writes(self.index);
            }
        }
    }
}

/// The writes of a grown or moved refcount table and of the header that points at it (the
/// shared header state updated to it).
fn moved_table(w: &crate::write::Writable, snapshot: &crate::meta::TableSnapshot) -> MovedTable {
    let (toff, tclusters) = snapshot.location;
    let header = {
        let mut h = w.header.lock().unwrap_or_else(|p| p.into_inner());
        h.put64(field::REFCOUNT_TABLE_OFFSET, toff);
        h.put32(field::REFCOUNT_TABLE_CLUSTERS, tclusters as u32);
        h.bytes.clone()
    };
    MovedTable {
        table: planned(
            toff,
            snapshot.bytes.clone().into_boxed_slice(),
            class::REFCOUNT_TABLE,
        ),
        header: planned(0, header.into_boxed_slice(), class::FIXED),
    }
}

fn logged(durable: bool, writes: &[PlannedWrite]) -> LoggedStep {
    LoggedStep::Writes {
        durable,
        writes: writes.iter().map(|w| (w.host, w.bytes.to_vec())).collect(),
    }
}

fn planned(host: u64, bytes: Box<[u8]>, class: u8) -> PlannedWrite {
    PlannedWrite { host, bytes, class }
}

/// The first of `writes` that would land on metadata other than what it writes.
fn first_overlap(img: &ImageInner, writes: &[PlannedWrite]) -> Option<crate::overlap::Hit> {
    let w = img.writable.as_ref()?;
    writes.iter().find_map(|pw| {
        let (host, buf, own) = (&pw.host, &pw.bytes, &pw.class);
        let what = match *own {
            class::ACTIVE_L2 => "an L2 table",
            class::ACTIVE_L1 => "L1 table entries",
            class::REFCOUNT_BLOCK => "a refcount block",
            class::REFCOUNT_TABLE => "the refcount table",
            _ => "the header",
        };
        w.overlap(what, *host, buf.len() as u64, *own)
    })
}

/// Host offset of the L2 table of `l1_index`, if the active L1 points at one.
fn l2_host(q: &crate::layer::Qcow2Layer, l1_index: u64, cs: u64) -> Option<u64> {
    let raw = q.l1[l1_index as usize].load(Ordering::Relaxed);
    crate::format::decode_l1_entry(raw, cs).ok().flatten()
}

/// Writes of the L1 entries `indices` (sorted, deduplicated). One shard writes the 512-byte
/// sectors that hold them; with several shards each writes only its own entries (8 bytes
/// each, runs of neighbours together), never another shard's entry, which may point at a
/// table that shard has not written yet.
fn l1_writes(q: &crate::layer::Qcow2Layer, indices: &[u64], shared: bool) -> Vec<PlannedWrite> {
    let mut writes = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let (first, last) = if shared {
            let mut j = i + 1;
            while j < indices.len() && indices[j] == indices[j - 1] + 1 {
                j += 1;
            }
            let run = (indices[i] as usize, indices[j - 1] as usize + 1);
            i = j;
            run
        } else {
            let sector = indices[i] / 64;
            while i < indices.len() && indices[i] / 64 == sector {
                i += 1;
            }
            let first = (sector * 64) as usize;
            (first, (first + 64).min(q.l1.len()))
        };
        let bytes: Vec<u8> = q.l1[first..last]
            .iter()
            .flat_map(|e| e.load(Ordering::Relaxed).to_be_bytes())
            .collect();
        writes.push(planned(
            q.header.l1_table_offset + first as u64 * 8,
            bytes.into_boxed_slice(),
            class::ACTIVE_L1,
        ));
    }
    writes
}

fn rc_cluster_bits(img: &ImageInner) -> u32 {
    img.top.q.geom.cluster_bits
}
