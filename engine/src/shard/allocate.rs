//! Handing out clusters: one at a time from the shard's reservation, without a lock; a new
//! run reserved from the image's allocator (under its mutex, the slow path) and the file
//! extended over it when the reservation runs low; and noting which reservation an entry in
//! memory points into, so that its refcounts are made durable before the entry is written.
//! An `impl State` block over the reservations (`reserve.rs`) and the flush state.
//!
//! Runs on the shard's thread; only `State::reserve` takes the image's refcount mutex.

use super::reserve::Reserved;
use super::state::State;
use crate::error::IoError;
use crate::meta::RefcountError;
use crate::shared::ImageInner;
use crate::write::Writable;
use std::sync::atomic::Ordering;

/// Bytes a shard reserves from the image's allocator at a time (as clusters, within
/// [`RESERVE_MIN_CLUSTERS`]..=[`RESERVE_MAX_CLUSTERS`]). Each reservation is made durable
/// before its first cluster is referenced, so larger ones mean fewer syncs; what a crash
/// leaves reserved is leaked (harmless, repaired by `qcow2d check --repair`).
const RESERVE_BYTES: u64 = 32 << 20;
const RESERVE_MIN_CLUSTERS: u64 = 32;
const RESERVE_MAX_CLUSTERS: u64 = 1024;

fn refcount_error(e: &RefcountError, cluster_bits: u32) -> IoError {
    match *e {
        RefcountError::TooLarge => IoError::Os {
            errno: libc::ENOSPC,
        },
        RefcountError::Overflow { cluster }
        | RefcountError::Underflow { cluster }
        | RefcountError::FreeMetadata { cluster, .. } => IoError::Corrupt {
            host_offset: cluster << cluster_bits,
        },
    }
}

impl State {
    /// Takes one cluster from this shard's reservation, reserving more when it is empty.
    /// Returns (host offset, fresh, reservation): a fresh cluster has never held data and
    /// reads as zeros; the reservation's number tells whether its refcounts are durable yet
    /// (see [`State::note_reference`]).
    ///
    /// Once half of a reservation is handed out the next one is taken, so that the write-back
    /// that makes its refcounts durable runs while the current one is still in use and no
    /// write has to wait for it.
    pub(super) fn alloc_cluster(
        &mut self,
        img: &ImageInner,
        w: &Writable,
    ) -> Result<(u64, bool, u64), IoError> {
        let (q, _) = img.writable_top();
        let cs = q.geom.cluster_size();
        if self.reservations.reserved.remaining == 0 {
            self.reservations.reserved = if self.reservations.spare.remaining > 0 {
                std::mem::take(&mut self.reservations.spare)
            } else {
                self.reserve(img, w)?
            };
        }
        let r = &mut self.reservations.reserved;
        let (host, fresh, seq) = (r.next, r.fresh, r.seq);
        r.next += cs;
        r.remaining -= 1;
        if r.remaining <= r.size / 2 && self.reservations.spare.remaining == 0 {
            // Failing early is harmless: the next reservation reports the error.
            match self.reserve(img, w) {
                Ok(spare) => self.reservations.spare = spare,
                Err(e) => tracing::debug!("Cannot reserve clusters ahead: {e}"),
            }
        }
        Ok((host, fresh, seq))
    }

    /// Reserves a run of clusters from the image's allocator and extends the file over it.
    pub(super) fn reserve(&mut self, img: &ImageInner, w: &Writable) -> Result<Reserved, IoError> {
        let (q, _) = img.writable_top();
        let cs = q.geom.cluster_size();
        let (off, n, fresh) = {
            let mut rc = w.refcounts.lock().unwrap_or_else(|p| p.into_inner());
            let want = (RESERVE_BYTES / cs).clamp(RESERVE_MIN_CLUSTERS, RESERVE_MAX_CLUSTERS);
            let (off, n, fresh) = match rc.allocate(want) {
                Ok(run) => run,
                Err(e) => {
                    if let RefcountError::FreeMetadata { cluster, classes } = e {
                        // The refcounts call a metadata cluster free: they are damaged.
                        let host = cluster << q.geom.cluster_bits;
                        self.flush.overlap_found(crate::overlap::Hit {
                            what: "clusters the refcounts call free",
                            host,
                            len: cs,
                            at: host,
                            classes,
                        });
                    } else if !self.reservations.allocation_failed {
                        // Once until an allocation succeeds again: every write that needs a
                        // cluster fails the same way meanwhile.
                        tracing::error!(
                            "{}: cluster allocation failed: {e}",
                            img.top.path.display()
                        );
                    }
                    self.reservations.allocation_failed = true;
                    return Err(refcount_error(&e, q.geom.cluster_bits));
                }
            };
            self.reservations.allocation_failed = false;
            // Extend the file over the reservation so that no entry ever points past its end
            // (under the lock: another shard's reservation may end further out, and the file
            // must never be cut back under it).
            let end = off + n * cs;
            if end > w.file_len.load(Ordering::Relaxed) {
                if let Err(e) = q.file.set_len(end) {
                    tracing::error!("Cannot extend {}: {e}", img.top.path.display());
                    if let Err(e) = rc.adjust_range(off, n * cs, -1) {
                        tracing::warn!("Cannot give back the clusters just reserved: {e}");
                    }
                    return Err(IoError::os(&e));
                }
                w.file_len.store(end, Ordering::Relaxed);
            }
            (off, n, fresh)
        };
        // With lazy refcounts the new refcounts are not written, but the file's new length
        // must be durable before an entry points into it.
        if w.lazy_refcounts {
            self.flush.sync_before_l2();
        } else {
            self.reservations.refcounts_to_write = true;
        }
        self.reservations.seq += 1;
        Ok(Reserved {
            next: off,
            remaining: n,
            size: n,
            fresh,
            seq: self.reservations.seq,
        })
    }

    /// An entry now in memory (L2, or L1 for a new table) points at a cluster of reservation
    /// `seq`: the write-back that writes the entry must first make that reservation's
    /// refcounts durable unless an earlier one already did (invariant 1).
    pub(super) fn note_reference(&mut self, img: &ImageInner, seq: u64) {
        let lazy = img.writable.as_ref().is_some_and(|w| w.lazy_refcounts);
        if !lazy && seq > self.reservations.durable_seq {
            self.reservations.newest_referenced = self.reservations.newest_referenced.max(seq);
        }
    }
}
