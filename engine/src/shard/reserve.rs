//! The shard's reservations and allocation: runs of clusters reserved from the image's
//! allocator (under its mutex, the slow path) and handed out one at a time without a lock,
//! the durability of their refcounts that entries pointing into them wait for, and the
//! references dropped whose clusters are freed once that is durable and no operation in
//! flight still uses them.
//!
//! Runs on the shard's thread; only `State::reserve` takes the image's refcount mutex.

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

/// Clusters reserved from the image's allocator, handed out one at a time.
#[derive(Default, Clone, Copy)]
pub(super) struct Reserved {
    pub(super) next: u64,
    pub(super) remaining: u64,
    /// Clusters reserved in all.
    pub(super) size: u64,
    pub(super) fresh: bool,
    /// Numbered from 1 in the order this shard reserved them.
    pub(super) seq: u64,
}

/// A shard's reservations: the clusters it hands out, the durability of their refcounts
/// that entries pointing into them wait for, and the references dropped whose clusters are
/// freed once that is durable and no operation in flight still uses them.
#[derive(Default)]
pub(super) struct Reservations {
    /// The reservation clusters are handed out from.
    pub(super) reserved: Reserved,
    /// The next reservation, taken once half of `reserved` is used.
    pub(super) spare: Reserved,
    /// Number of the last reservation taken.
    pub(super) seq: u64,
    /// Reservations up to this number have durable refcounts.
    pub(super) durable_seq: u64,
    /// The newest reservation an unwritten entry points into (0: none that is not durable).
    pub(super) newest_referenced: u64,
    /// A reservation was taken whose refcount blocks have not been submitted for writing.
    pub(super) refcounts_to_write: bool,
    /// Durable refcount-block writes in flight, and the last reservation they cover.
    pub(super) refcount_writes: u32,
    pub(super) refcount_writes_seq: u64,
    pub(super) refcount_writes_failed: Option<IoError>,
    /// References dropped, freed after the next flush.
    pub(super) pending_frees: Vec<PendingFree>,
    /// Frees made due by flushes, waiting for data operations in flight.
    pub(super) frees: Frees,
    /// The last reservation failed (and was logged).
    pub(super) allocation_failed: bool,
}

impl Reservations {
    /// Whether anything reserved or freed waits for a flush or a release (a writable shard
    /// dropped with this loses it).
    pub(super) fn holds_anything(&self) -> bool {
        !self.pending_frees.is_empty()
            || !self.frees.due.is_empty()
            || !self.frees.draining.is_empty()
            || self.reserved.remaining > 0
            || self.spare.remaining > 0
    }

    /// The refcounts of reservations up to `seq` are durable.
    pub(super) fn made_durable(&mut self, seq: u64) {
        self.durable_seq = self.durable_seq.max(seq);
    }

    /// Whether an unwritten entry points into a reservation whose refcounts are not durable.
    pub(super) fn referenced_not_durable(&self) -> bool {
        self.newest_referenced > self.durable_seq
    }
}

/// A host range whose reference was dropped; freed after the next flush makes that durable.
#[derive(Clone, Copy, Debug)]
pub(super) struct PendingFree {
    pub(super) host: u64,
    pub(super) len: u64,
    /// Key of the decompressed-cluster cache entry to drop (compressed extents).
    pub(super) compressed: Option<u64>,
    /// The metadata class the range stops holding (an L2 table replaced by a copy), or 0.
    pub(super) meta: u8,
}

/// Frees that wait for the data operations in flight when they became due (DESIGN.md
/// invariant 10: a host cluster is freed only when no operation in flight still reads or
/// writes it). A reference dropped by a discard, write-zeroes or copy on write is due once
/// the flush that made the new entry durable completes; a read or in-place write planned
/// from the old entry may still be in the kernel then (slow with O_DIRECT), and the cluster,
/// once free, may become a new L2 table or another guest's data.
///
/// Two epochs, counted without allocation: each data operation counts in the current epoch
/// while it lives. Frees that become due wait in `due`; when no batch is draining, the
/// epochs switch and `due` becomes `draining`, which is applied once the old epoch's count
/// reaches zero: every operation in flight at the switch, and so every one that could
/// target those clusters, has completed by then.
#[derive(Default)]
pub(super) struct Frees {
    /// Data operations alive per epoch.
    pub(super) live: [u32; 2],
    /// The epoch new operations count in.
    pub(super) current: usize,
    /// Frees due, waiting for the next switch.
    pub(super) due: Vec<PendingFree>,
    /// Frees waiting for the old epoch (`1 - current`) to drain.
    pub(super) draining: Vec<PendingFree>,
}

impl Frees {
    /// Whether frees wait for the old epoch and it has drained.
    pub(super) fn drained(&self) -> bool {
        !self.draining.is_empty() && self.live[1 - self.current] == 0
    }
}

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
