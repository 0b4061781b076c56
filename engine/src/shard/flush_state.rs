//! The shard's part that gets metadata into the file ([`FlushState`]): what changed since it
//! was last written, the flushes and writes waiting for a run, the run in progress with its
//! steps and bookkeeping, the corruption found during the turn, and the test hooks (the
//! flush count's fault injection, the write log). Running flushes and write-backs is
//! `flush.rs`.
//!
//! Owned by one shard and used only on its thread.

use super::config::ShardConfig;
use super::flush_plan::Step;
use super::reserve::PendingFree;
use super::write_log::{LoggedStep, WriteLog};
use crate::error::IoError;
use std::collections::VecDeque;

/// The shard's part that gets metadata into the file: what changed since it was last
/// written (L1 entries, the syncs L2 entries wait for), the flushes and writes waiting for a
/// run, the run in progress, the corruption found during the turn (reported at its end), and
/// the flush count with its fault injection and write log for tests.
#[derive(Default)]
pub(super) struct FlushState {
    /// L1 entries changed since the last flush.
    pub(super) dirty_l1: Vec<u64>,
    /// L1 entries changed since they were last written (by a flush or a metadata write-back).
    pub(super) unwritten_l1: Vec<u64>,
    /// Something an unwritten L2 entry depends on (new refcounts, the file's length, data that
    /// must not be lost under the entry) is not durable yet: the next metadata write-back
    /// syncs before it writes L2 entries.
    pub(super) sync_before_l2: bool,
    /// Corruption of the top image found during this turn, handled at its end.
    pub(super) pending_corrupt: Option<&'static str>,
    /// A write refused because it would have landed on metadata (or a cluster the
    /// allocator found free that holds metadata) during this turn, handled at its end.
    pub(super) pending_overlap: Option<crate::overlap::Hit>,
    /// Flushes started so far.
    pub(super) flushes: u64,
    /// Test hook: the flush (counting from 1) whose syncs fail
    /// ([`ShardConfig::fail_flush_number`]).
    pub(super) fail_flush_number: Option<u64>,
    /// Flushes waiting for the next run.
    pub(super) queued: Vec<u64>,
    /// Writes waiting for the next metadata write-back.
    pub(super) writeback: Vec<u64>,
    /// Flushes and writes the run in progress completes.
    pub(super) running: Vec<u64>,
    pub(super) active: bool,
    /// The run in progress is a flush (else a write-back: no durability promised).
    pub(super) hard: bool,
    /// The steps of the run in progress still to start (`flush_plan`).
    pub(super) steps: VecDeque<Step>,
    pub(super) pending_ops: u32,
    pub(super) error: Option<IoError>,
    /// Snapshot bookkeeping, to undo on failure and finish on success.
    pub(super) l2_keys: Vec<(u64, u32)>,
    pub(super) l1_indices: Vec<u64>,
    pub(super) frees: Vec<PendingFree>,
    /// The last reservation taken when the run started: on success every reservation up to
    /// it has durable refcounts.
    pub(super) snap_seq: u64,
    /// The refcount table this flush writes (kept to undo on failure and to free the table
    /// it retires on success).
    pub(super) table: Option<crate::meta::TableSnapshot>,
    /// The run holds the right to write refcount blocks (until its `EndBlockWrites` batch).
    pub(super) holds_blocks: bool,
    /// Test hook: where submitted writes and syncs are recorded.
    log: Option<std::sync::Arc<WriteLog>>,
}

impl FlushState {
    /// Nothing changed yet, nothing waiting; the test hooks of `config`.
    pub(super) fn new(config: &ShardConfig) -> FlushState {
        FlushState {
            fail_flush_number: config.fail_flush_number,
            log: config.write_log.clone(),
            ..FlushState::default()
        }
    }

    /// L1 entry `l1_index` changed: the next flush writes it, and so does the next
    /// write-back.
    pub(super) fn l1_entry_changed(&mut self, l1_index: u64) {
        self.dirty_l1.push(l1_index);
        self.unwritten_l1.push(l1_index);
    }

    /// Whether L1 entries changed that no flush has made durable.
    pub(super) fn has_dirty_l1(&self) -> bool {
        !self.dirty_l1.is_empty()
    }

    /// Whether L1 entry `l1_index` changed since it was last written.
    pub(super) fn l1_entry_unwritten(&self, l1_index: u64) -> bool {
        self.unwritten_l1.contains(&l1_index)
    }

    /// An unwritten L2 entry now depends on something not durable yet: the next write-back
    /// syncs before it writes L2 entries.
    pub(super) fn sync_before_l2(&mut self) {
        self.sync_before_l2 = true;
    }

    /// Corruption of the top image found: reported at the end of the turn (the first reason
    /// found is kept).
    pub(super) fn corruption_found(&mut self, why: &'static str) {
        self.pending_corrupt.get_or_insert(why);
    }

    /// A write refused because it would have landed on metadata: reported at the end of the
    /// turn (the first found is kept).
    pub(super) fn overlap_found(&mut self, hit: crate::overlap::Hit) {
        self.pending_overlap.get_or_insert(hit);
    }

    /// Whether a write was refused this turn for landing on metadata (the image takes no
    /// more writes).
    pub(super) fn has_overlap(&self) -> bool {
        self.pending_overlap.is_some()
    }

    pub(super) fn record(&self, step: impl FnOnce() -> LoggedStep) {
        if let Some(log) = &self.log {
            log.push(step());
        }
    }

    pub(super) fn enqueue(&mut self, token: u64) {
        self.queued.push(token);
    }

    /// A write that completes once the metadata it changed has been written back.
    pub(super) fn enqueue_writeback(&mut self, token: u64) {
        self.writeback.push(token);
    }

    /// Flush requests and writes waiting for a run, not yet completed.
    pub(super) fn waiting(&self) -> usize {
        self.queued.len() + self.writeback.len() + self.running.len()
    }
}
