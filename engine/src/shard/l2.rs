//! The L2 tables of a shard: finding a layer's table in the shard's cache and loading it on a
//! miss (reads and writes), and, for writes to the top image, the table owned by the active L1
//! alone (copied when a snapshot shares it, created when missing), pointing the L1 entry at a
//! moved table, and storing entries. What the flush writes back is in `flush.rs`. An
//! `impl State` block over the shard's L2 caches, its requests and operations.
//!
//! Runs on the shard's thread, on the shard's own caches.

use super::op::OpKind;
use super::request::ReqKind;
use super::reserve::PendingFree;
use super::slab::{OpId, PartId};
use super::state::State;
use crate::error::IoError;
use crate::format::{encode_l1_entry, l1_entry_copied};
use crate::io::sqe;
use crate::io::Ring;
use crate::layer::Qcow2Layer;
use crate::meta::Lookup;
use crate::shared::ImageInner;
use crate::write::Writable;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

/// What [`State::l2_table`] found.
pub(super) enum Table {
    /// The table is cached in this slot; its host offset.
    Ready { slot: u32, host: u64 },
    /// The layer has no L2 table for this range.
    Unallocated,
    /// The part now waits for the table, or has failed.
    Pending,
}

impl State {
    /// Finds the L2 table of `l1_index` in layer `layer` for part `pid`, starting its load on a
    /// miss (the part then waits on it).
    pub(super) fn l2_table(
        &mut self,
        ring: &mut Ring,
        layer: u16,
        q: &Qcow2Layer,
        path: &std::path::Path,
        l1_index: u64,
        pid: PartId,
    ) -> Table {
        let raw_l1 =
            q.l1.get(l1_index as usize)
                .map_or(0, |e| e.load(Ordering::Relaxed));
        let host = match crate::format::decode_l1_entry(raw_l1, q.geom.cluster_size()) {
            Err(_) if self.is_foreign(layer, l1_index) => {
                // Another shard's entry, perhaps changing: its owner judges it.
                self.forward_part(pid);
                return Table::Pending;
            }
            Err(why) => {
                let at = q.header.l1_table_offset + 8 * l1_index;
                tracing::warn!("{}: L1 entry at {at:#x}: {why}", path.display());
                self.corrupt_detected(layer, why);
                self.finish_part(pid, Err(IoError::Corrupt { host_offset: at }));
                return Table::Pending;
            }
            Ok(None) => return Table::Unallocated,
            Ok(Some(h)) => h,
        };
        let caches = &mut self.layers[layer as usize];
        match caches.l2.lookup(l1_index) {
            Lookup::Ready(slot) => Table::Ready { slot, host },
            Lookup::Loading(slot) => {
                self.requests
                    .enqueue_waiter(caches.l2.waiters_mut(slot), pid);
                Table::Pending
            }
            Lookup::Miss => {
                let slot = caches.l2.start_load(l1_index);
                self.requests
                    .enqueue_waiter(caches.l2.waiters_mut(slot), pid);
                if self.is_foreign(layer, l1_index) {
                    // The version the copy is read at; checked again when the read is done.
                    let v = self.table_version(l1_index);
                    self.set_foreign_tag(slot, if v.is_multiple_of(2) { v } else { 0 });
                }
                let caches = &mut self.layers[layer as usize];
                let buf = caches.l2.buf_mut(slot);
                let entry = sqe::read(q.file.as_raw_fd(), buf, host);
                let op = self.ops.alloc();
                self.ops[op].kind = OpKind::L2Load {
                    layer,
                    slot,
                    host,
                    key: l1_index,
                };
                // SAFETY: the slot's buffer is not freed, moved or reused while the slot is
                // loading; it stays loading until this op completes.
                if let Err(e) = unsafe { self.push(ring, op, entry) } {
                    let w = self.layers[layer as usize].l2.fail_load(slot);
                    self.fail_waiters(w, e);
                }
                Table::Pending
            }
        }
    }

    pub(super) fn complete_l2_load(
        &mut self,
        ring: &mut Ring,
        img: &ImageInner,
        op: OpId,
        res: i32,
    ) {
        let OpKind::L2Load {
            layer,
            slot,
            host,
            key,
        } = self.ops[op].kind
        else {
            unreachable!("complete_l2_load on another op");
        };
        self.free_op(op);
        if self.is_foreign(layer, key) {
            let tag = self.foreign_tag(slot);
            if self.table_version(key) != tag {
                // The owner changed the table meanwhile: the copy may be torn. Its waiters
                // see the mismatch and read it again or go to the owner.
                self.set_foreign_tag(slot, 0);
            }
        }
        let foreign = self.is_foreign(layer, key);
        let cache = &mut self.layers[layer as usize].l2;
        let expected = cache.buf(slot).len();
        if res >= 0 && res as usize == expected {
            let w = cache.finish_load(slot);
            self.replan_waiters(ring, img, w);
        } else if foreign {
            // Another shard's table: its owner serves the parts (and judges the failure).
            let mut w = cache.fail_load(slot);
            while let Some(pid) = self.requests.pop_waiter(&mut w) {
                self.forward_part(pid);
            }
        } else {
            let w = cache.fail_load(slot);
            let err = if res < 0 {
                IoError::Os { errno: -res }
            } else {
                tracing::warn!(
                    "{}: L2 table at {host:#x} lies past the end of the file",
                    img.layer(layer).path.display()
                );
                IoError::Corrupt { host_offset: host }
            };
            self.fail_waiters(w, err);
        }
    }

    /// Plans every part of `list` now: a slot just loaded cannot be evicted before they use it.
    /// The L2 table of `l1_index`, owned by the active L1 only (copied if a snapshot shares
    /// it, created if missing). `None` when the part waits, has failed, or needs nothing.
    pub(super) fn writable_l2_table(
        &mut self,
        ring: &mut Ring,
        img: &ImageInner,
        l1_index: u64,
        pid: PartId,
        kind: ReqKind,
    ) -> Option<u32> {
        let (q, w) = img.writable_top();
        debug_assert!(
            !self.is_foreign(0, l1_index),
            "L2 table {l1_index} changed by a shard that does not own it"
        );
        let cs = q.geom.cluster_size();
        let raw_l1 = q.l1[l1_index as usize].load(Ordering::Relaxed);
        match self.l2_table(ring, 0, q, &img.top.path, l1_index, pid) {
            Table::Pending => None,
            Table::Unallocated => {
                let has_backing = !img.backing.is_empty();
                if !has_backing && !matches!(kind, ReqKind::Write) {
                    // Nothing allocated and nothing below: the range already reads as zeros.
                    self.finish_part(pid, Ok(()));
                    return None;
                }
                let host = match self.alloc_cluster(img, w) {
                    Ok((h, _, seq)) => {
                        self.note_reference(img, seq);
                        h
                    }
                    Err(e) => {
                        self.finish_part(pid, Err(e));
                        return None;
                    }
                };
                let slot = self.layers[0].l2.insert_new(l1_index);
                self.move_table(q, w, l1_index, slot, host);
                Some(slot)
            }
            Table::Ready { slot, host } => {
                if !l1_entry_copied(raw_l1) {
                    // Shared with an internal snapshot: the active L1 gets its own copy.
                    let new = match self.alloc_cluster(img, w) {
                        Ok((h, _, seq)) => {
                            self.note_reference(img, seq);
                            h
                        }
                        Err(e) => {
                            self.finish_part(pid, Err(e));
                            return None;
                        }
                    };
                    self.move_table(q, w, l1_index, slot, new);
                    self.reservations.pending_frees.push(PendingFree {
                        host,
                        len: cs,
                        compressed: None,
                        meta: crate::meta::class::ACTIVE_L2,
                    });
                }
                Some(slot)
            }
        }
    }

    /// Points the L1 entry of table `l1_index` (cached in `slot`) at `host`, a new or copied
    /// table: the whole table and the entry are to be written, other shards stop trusting
    /// their copies of it, and the cluster is metadata from now on.
    pub(super) fn move_table(
        &mut self,
        q: &Qcow2Layer,
        w: &Writable,
        l1_index: u64,
        slot: u32,
        host: u64,
    ) {
        w.meta
            .set(host, q.geom.cluster_size(), crate::meta::class::ACTIVE_L2);
        self.layers[0].l2.mark_all_dirty(slot);
        self.table_changed(l1_index);
        q.l1[l1_index as usize].store(encode_l1_entry(host), Ordering::Relaxed);
        self.flush.l1_entry_changed(l1_index);
    }

    /// Stores L2 entry `raw` (and, with extended L2, its subcluster `bitmap`) at byte `at` of
    /// table `l1_index`, cached in `slot`: the bytes are to be written, and other shards stop
    /// trusting their copies of the table.
    pub(super) fn set_entry(
        &mut self,
        q: &Qcow2Layer,
        l1_index: u64,
        slot: u32,
        at: usize,
        raw: u64,
        bitmap: Option<u64>,
    ) {
        let cache = &mut self.layers[0].l2;
        let table = cache.buf_mut(slot);
        table[at..at + 8].copy_from_slice(&raw.to_be_bytes());
        if let Some(bm) = bitmap {
            table[at + 8..at + 16].copy_from_slice(&bm.to_be_bytes());
        }
        cache.mark_dirty(slot, at..at + q.geom.l2_entry_bytes() as usize);
        self.table_changed(l1_index);
    }
}
