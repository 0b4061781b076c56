//! Planning writes, write-zeroes and discards, cluster by cluster.
//!
//! A write to a cluster that is allocated with refcount 1 (COPIED) goes in place. Anything else
//! becomes an [`Alloc`]: a new host cluster (or, with extended L2 entries, new subclusters of
//! the same one), filled with the guest data plus a copy of whatever the write does not cover
//! (read through the normal read path from the old mapping, or known to be zeros), written,
//! and only then made visible by updating the L2 entry (invariant: data before the entry that
//! points at it). The old host cluster is freed after the next flush has made the new entry
//! durable. While an allocation is in flight on a cluster, other writes to it wait; reads see
//! the old mapping until the entry changes, so they get old or new data, never garbage.
//!
//! An `impl State` block over the requests, the top layer's L2 cache, the allocations in
//! flight (`alloc_write.rs`), the reservations and the operations; runs on the shard's thread.

use super::alloc_write::Alloc;
use super::direct::write_fd;
use super::op::{Buffer, OpKind};
use super::request::ReqKind;
use super::reserve::PendingFree;
use super::slab::{AllocId, PartId};
use super::state::State;
use crate::error::IoError;
use crate::format::{be64_at, encode_l2_entry, ClusterMapping, L2Entry, SubclusterState};
use crate::io::sqe;
use crate::io::{iov_copy_to, iov_subrange, Ring};
use crate::layer::Qcow2Layer;
use crate::meta::WaitList;
use crate::shared::ImageInner;
use std::sync::atomic::Ordering;

/// Bits of the subclusters overlapping in-cluster bytes `a..b`.
fn subcluster_mask(a: u64, b: u64, sc: u64) -> u64 {
    let first = a / sc;
    let last = b.div_ceil(sc);
    let n = last - first;
    if n >= 32 {
        0xffff_ffff
    } else {
        ((1u64 << n) - 1) << first
    }
}

/// Whether in-cluster bytes `a..b` of `entry` read as zeros without looking at data.
fn reads_zero(entry: &L2Entry, ext: bool, sc: u64, a: u64, b: u64, has_backing: bool) -> bool {
    if a >= b {
        return true;
    }
    if !ext {
        return match entry.mapping {
            ClusterMapping::Zero { .. } => true,
            ClusterMapping::Unallocated => !has_backing,
            _ => false,
        };
    }
    (a / sc..b.div_ceil(sc)).all(|i| match entry.subcluster(i as u32) {
        SubclusterState::Zero => true,
        SubclusterState::Unallocated => !has_backing,
        _ => false,
    })
}

/// Whether a write of in-cluster bytes `ws..we` may go in place into the cluster `entry` maps
/// (allocated, COPIED): every subcluster it touches is allocated.
fn in_place(entry: &L2Entry, ws: u64, we: u64, sc: u64) -> bool {
    match entry.bitmap {
        None => true,
        Some(bm) => {
            let m = subcluster_mask(ws, we, sc);
            bm & m == m
        }
    }
}

/// What a write-zeroes or discard of one cluster of the top image is planned with.
struct ZeroHow {
    cs: u64,
    sc: u64,
    ext: bool,
    /// Version 3: L2 entries have a zero flag.
    zero_flag: bool,
    has_backing: bool,
    discard: bool,
}

/// What zeroing (or discarding) in-cluster bytes `ws..we` of a cluster comes to.
enum ZeroPlan {
    /// Nothing changes: a discard that cannot drop any whole (sub)cluster.
    Nothing,
    /// Real zeros written through the write path, over `narrow` of the cluster when set.
    WriteZeros { narrow: Option<(u64, u64)> },
    /// The new L2 entry, and with extended L2 its subcluster bitmap.
    Entry { raw: u64, bitmap: Option<u64> },
}

impl ZeroHow {
    /// Plans the change for `entry` (raw `old_raw`), keeping host cluster `keep_host` when set.
    fn plan(
        &self,
        entry: &L2Entry,
        old_raw: u64,
        keep_host: Option<u64>,
        ws: u64,
        we: u64,
    ) -> ZeroPlan {
        let ZeroHow {
            cs,
            sc,
            ext,
            zero_flag,
            has_backing,
            discard,
        } = *self;
        let full = ws == 0 && we == cs;
        let write = ZeroPlan::WriteZeros { narrow: None };
        if !ext {
            if !full {
                return if discard { ZeroPlan::Nothing } else { write };
            }
            return if zero_flag {
                if discard && !has_backing {
                    ZeroPlan::Entry {
                        raw: encode_l2_entry(None, false, false),
                        bitmap: None,
                    }
                } else {
                    ZeroPlan::Entry {
                        raw: encode_l2_entry(keep_host, true, true),
                        bitmap: None,
                    }
                }
            } else if !has_backing {
                // Version 2 has no zero flag: an unallocated cluster without backing reads
                // as zeros.
                ZeroPlan::Entry {
                    raw: encode_l2_entry(None, false, false),
                    bitmap: None,
                }
            } else if discard {
                ZeroPlan::Nothing
            } else {
                write
            };
        }
        let old_bm = entry.bitmap.unwrap_or(0);
        let normal_or_unalloc = matches!(entry.mapping, ClusterMapping::Unallocated)
            || (matches!(entry.mapping, ClusterMapping::Normal { .. }) && entry.copied);
        if full && keep_host.is_none() {
            ZeroPlan::Entry {
                raw: encode_l2_entry(None, false, false),
                bitmap: Some(0xffff_ffffu64 << 32),
            }
        } else if normal_or_unalloc {
            let (a, b) = if discard {
                (ws.div_ceil(sc) * sc, we / sc * sc)
            } else if !ws.is_multiple_of(sc) || (!we.is_multiple_of(sc) && we != cs) {
                return write;
            } else {
                (ws, we)
            };
            if a >= b {
                return ZeroPlan::Nothing;
            }
            let m = subcluster_mask(a, b, sc);
            ZeroPlan::Entry {
                raw: old_raw,
                bitmap: Some((old_bm & !m) | (m << 32)),
            }
        } else if discard {
            // A compressed or shared cluster has no per-subcluster state to change: fully
            // covered subclusters read as zeros through a copy of the cluster.
            let (a, b) = (ws.div_ceil(sc) * sc, we / sc * sc);
            if a >= b {
                return ZeroPlan::Nothing;
            }
            ZeroPlan::WriteZeros {
                narrow: Some((a, b)),
            }
        } else {
            write
        }
    }
}

impl State {
    /// Plans write part `pid` (a write, write-zeroes or discard) for one cluster.
    pub(super) fn plan_write(
        &mut self,
        ring: &mut Ring,
        img: &ImageInner,
        pid: PartId,
        kind: ReqKind,
    ) {
        let (q, w) = img.writable_top();
        if self.flush.has_overlap() || w.corrupt.load(Ordering::Relaxed) {
            // Corruption was found: the image takes no more writes, even those already
            // submitted.
            return self.finish_part(pid, Err(IoError::Os { errno: libc::EIO }));
        }
        let cs = q.geom.cluster_size();
        let p = self.requests.parts[pid];
        let cluster = p.guest_off & !(cs - 1);
        if p.guest_off + p.len > cluster + cs {
            self.requests.split(pid, cluster + cs - p.guest_off);
        }
        if let Some(&a) = self.allocations.allocating.get(&cluster) {
            self.requests
                .enqueue_waiter(&mut self.allocations.allocs[a].waiters, pid);
            return;
        }
        let cover = q.geom.l2_coverage();
        let l1_index = p.guest_off / cover;
        let Some(slot) = self.writable_l2_table(ring, img, l1_index, pid, kind) else {
            return;
        };
        let index = ((p.guest_off % cover) / cs) as usize;
        let table = self.layers[0].l2.buf(slot);
        let at = index * q.geom.l2_entry_bytes() as usize;
        let raw = be64_at(table, at);
        let bitmap = q.geom.extended_l2.then(|| be64_at(table, at + 8));
        let entry = match L2Entry::decode(raw, bitmap, q.geom.cluster_bits, q.geom.has_data_file) {
            Ok(e) => e,
            Err(why) => {
                tracing::warn!("{}: L2 entry {index}: {why}", img.top.path.display());
                self.corrupt_detected(0, why);
                return self.finish_part(pid, Err(IoError::Corrupt { host_offset: 0 }));
            }
        };
        match kind {
            ReqKind::Write => self.write_cluster(ring, img, pid, slot, index, entry, false),
            ReqKind::WriteZeroes { unmap } => {
                self.zero_cluster(ring, img, pid, slot, index, entry, unmap, false)
            }
            ReqKind::Discard => self.zero_cluster(ring, img, pid, slot, index, entry, true, true),
            ReqKind::Read | ReqKind::Flush => unreachable!("only writes have parts planned here"),
        }
    }

    /// Fails part `pid`, whose write would have landed on metadata: the image is marked
    /// corrupt at the end of the turn.
    fn overlap_refused(&mut self, pid: PartId, hit: crate::overlap::Hit) {
        self.flush.overlap_found(hit);
        self.finish_part(
            pid,
            Err(IoError::Corrupt {
                host_offset: hit.at,
            }),
        );
    }

    /// Writes (or, with `zeros`, writes zeros over) part `pid` within one cluster.
    #[allow(clippy::too_many_arguments)]
    fn write_cluster(
        &mut self,
        ring: &mut Ring,
        img: &ImageInner,
        pid: PartId,
        slot: u32,
        index: usize,
        entry: L2Entry,
        zeros: bool,
    ) {
        let (q, w) = img.writable_top();
        let cs = q.geom.cluster_size();
        let sc = q.geom.subcluster_size();
        let ext = q.geom.extended_l2;
        let p = self.requests.parts[pid];
        let cluster = p.guest_off & !(cs - 1);
        let (ws, we) = (p.guest_off - cluster, p.guest_off - cluster + p.len);
        let buffer = if zeros {
            Buffer::Zeros
        } else {
            Buffer::Request
        };

        let copied_normal = match entry.mapping {
            ClusterMapping::Normal { host } if entry.copied => Some(host),
            _ => None,
        };
        if let Some(host) = copied_normal {
            if in_place(&entry, ws, we, sc) {
                if q.data_file.is_none() {
                    if let Some(hit) = w.overlap("guest data", host + ws, we - ws, 0) {
                        return self.overlap_refused(pid, hit);
                    }
                }
                return self.start_data(ring, pid, q.data_fd(), host + ws, true, buffer);
            }
        }

        let partial_ok = ext
            && (copied_normal.is_some() || matches!(entry.mapping, ClusterMapping::Unallocated));
        let (span_s, span_e) = if partial_ok {
            (ws / sc * sc, we.div_ceil(sc) * sc)
        } else {
            (0, cs)
        };
        let (host, new_cluster, fresh, seq) = match copied_normal {
            Some(h) if ext => (h, false, false, 0),
            _ if q.data_file.is_some() => (cluster, true, false, 0),
            _ => match self.alloc_cluster(img, w) {
                Ok((h, fresh, seq)) => (h, true, fresh, seq),
                Err(e) => return self.finish_part(pid, Err(e)),
            },
        };
        let has_backing = !img.backing.is_empty();
        let cow_zero = reads_zero(&entry, ext, sc, span_s, ws, has_backing)
            && reads_zero(&entry, ext, sc, we, span_e, has_backing);
        let need_cow = span_s < ws || we < span_e;
        let survives_loss =
            new_cluster && fresh && reads_zero(&entry, ext, sc, span_s, span_e, has_backing);

        let a = self.allocations.allocs.alloc();
        self.allocations.allocs[a] = Alloc {
            part: pid,
            cluster,
            slot,
            index,
            host,
            new_cluster,
            span: (span_s, span_e),
            write: (ws, we),
            zeros,
            identity: q.data_file.is_some(),
            whole: ext && !partial_ok,
            old_raw: 0,
            old_bitmap: entry.bitmap,
            survives_loss,
            reservation: seq,
            buf: None,
            cow_pending: 0,
            error: None,
            expected: 0,
            waiters: WaitList::EMPTY,
        };
        self.allocations.allocs[a].old_raw = {
            let table = self.layers[0].l2.buf(slot);
            be64_at(table, index * q.geom.l2_entry_bytes() as usize)
        };
        self.allocations.allocating.insert(cluster, a);
        self.layers[0].l2.pin(slot);

        self.fill_alloc(ring, img, a, need_cow, cow_zero && fresh, cow_zero);
    }

    /// Fills allocation `a` around the guest's bytes and writes it: nothing to fill (`!need_cow`,
    /// or `fresh_zero`: the rest of a fresh cluster already reads as zeros), zeros (`cow_zero`),
    /// or a copy of what the old mapping reads, through internal reads.
    fn fill_alloc(
        &mut self,
        ring: &mut Ring,
        img: &ImageInner,
        a: AllocId,
        need_cow: bool,
        fresh_zero: bool,
        cow_zero: bool,
    ) {
        let Alloc {
            cluster,
            span: (span_s, span_e),
            write: (ws, we),
            ..
        } = self.allocations.allocs[a];
        if !need_cow || fresh_zero {
            // Only the guest's bytes need writing: the rest of the cluster already reads as
            // zeros (a fresh cluster) or is not part of the span.
            self.allocations.allocs[a].span = (ws, we);
            return self.submit_alloc_write(ring, img, a);
        }
        // The guest's bytes go into the buffer first (the copy-on-write reads fill the rest,
        // which does not overlap them): the buffer's owner needs nothing more than it.
        let mut buf = self.buffers.cluster();
        self.copy_guest_bytes(a, &mut buf);
        if cow_zero {
            buf[span_s as usize..ws as usize].fill(0);
            buf[we as usize..span_e as usize].fill(0);
            self.allocations.allocs[a].buf = Some(buf);
            return self.submit_alloc_write(ring, img, a);
        }
        let base = buf.as_mut_ptr();
        self.allocations.allocs[a].buf = Some(buf);
        for (rs, re) in [(span_s, ws), (we, span_e)] {
            if rs >= re {
                continue;
            }
            self.allocations.allocs[a].cow_pending += 1;
            let iov = [libc::iovec {
                // The buffer is a heap allocation owned by the allocation until it finishes,
                // which is after this read completes; only the address is computed here.
                iov_base: (base as usize + rs as usize) as *mut libc::c_void,
                iov_len: (re - rs) as usize,
            }];
            self.start_internal_read(a, cluster + rs, &iov);
        }
    }

    /// Starts a read of the current content of a range into an allocation's buffer.
    fn start_internal_read(&mut self, alloc: AllocId, offset: u64, iov: &[libc::iovec]) {
        let len = iov[0].iov_len as u64;
        self.start_request(0, ReqKind::Read, Some(alloc), offset, len, iov);
    }

    /// A copy-on-write read of allocation `a` finished.
    pub(super) fn cow_read_done(&mut self, a: AllocId, result: Result<(), IoError>) {
        let al = &mut self.allocations.allocs[a];
        al.cow_pending -= 1;
        if let Err(e) = result {
            al.error.get_or_insert(e);
        }
        if al.cow_pending > 0 {
            return;
        }
        // The write is submitted by the turn loop, which has the ring at hand.
        self.allocations.cow_ready.push(a);
    }

    /// Allocations whose copy-on-write reads completed: write them.
    pub(super) fn run_cow_ready(&mut self, ring: &mut Ring, img: &ImageInner) {
        while let Some(a) = self.allocations.cow_ready.pop() {
            if let Some(e) = self.allocations.allocs[a].error {
                self.fail_alloc(a, e);
            } else {
                self.submit_alloc_write(ring, img, a);
            }
        }
    }

    /// Copies allocation `a`'s bytes from the guest (or zeros) into `buf`, a cluster buffer,
    /// where they go in the cluster.
    fn copy_guest_bytes(&self, a: AllocId, buf: &mut [u8]) {
        let al = &self.allocations.allocs[a];
        let (ws, we) = al.write;
        let dst = &mut buf[ws as usize..we as usize];
        if al.zeros {
            dst.fill(0);
        } else {
            let p = self.requests.parts[al.part];
            // SAFETY: the request's iovecs are valid for reads until its completion (submit
            // contract), the part lies within them, and `dst` is our own buffer.
            unsafe { iov_copy_to(&self.requests.reqs[p.req].iov, p.skip as usize, dst) };
        }
    }

    /// Writes the allocation's span to its host cluster, from its buffer or straight from the
    /// request (or the zero buffer) when no copy was needed.
    fn submit_alloc_write(&mut self, ring: &mut Ring, img: &ImageInner, a: AllocId) {
        let (q, w) = img.writable_top();
        let op = self.ops.alloc();
        self.ops[op].kind = OpKind::AllocWrite {
            alloc: a,
            bounce: None,
        };
        let al = &self.allocations.allocs[a];
        let (s, e) = al.span;
        let o = &mut self.ops[op];
        o.iov.clear();
        match (&al.buf, al.zeros) {
            (Some(buf), _) => o.iov.push(libc::iovec {
                iov_base: (buf.as_ptr() as usize + s as usize) as *mut libc::c_void,
                iov_len: (e - s) as usize,
            }),
            (None, true) => o.iov.push(libc::iovec {
                iov_base: self.buffers.zeros.as_ptr() as *mut libc::c_void,
                iov_len: (e - s) as usize,
            }),
            (None, false) => {
                let p = self.requests.parts[al.part];
                iov_subrange(
                    &self.requests.reqs[p.req].iov,
                    p.skip as usize,
                    p.len as usize,
                    &mut o.iov,
                );
            }
        }
        let host = al.host + s;
        if !al.identity {
            if let Some(hit) = w.overlap("guest data", host, e - s, 0) {
                self.free_op(op);
                self.flush.overlap_found(hit);
                return self.fail_alloc(
                    a,
                    IoError::Corrupt {
                        host_offset: hit.at,
                    },
                );
            }
        }
        let o = &mut self.ops[op];
        let (fd, bounce) = write_fd(&mut o.iov, q.data_fd(), host);
        let entry = sqe::writev(fd, &o.iov, host);
        o.kind = OpKind::AllocWrite { alloc: a, bounce };
        self.allocations.allocs[a].expected = e - s;
        // SAFETY: the iovecs point into the allocation's buffer (owned by it until it
        // finishes, after this op completes), the shard's zero buffer (never written, lives as
        // long as the shard), the op's bounce buffer (freed with the op after its completion),
        // or the request's memory (valid until the request completes, which waits for this
        // part); the iovec array lives in the op.
        if let Err(err) = unsafe { self.push(ring, op, entry) } {
            self.fail_alloc(a, err);
        }
    }

    /// The new cluster of allocation `a` is written: point the L2 entry at it.
    pub(super) fn alloc_written(&mut self, img: &ImageInner, a: AllocId, res: i32) {
        if res < 0 {
            return self.fail_alloc(a, IoError::Os { errno: -res });
        }
        if res as u64 != self.allocations.allocs[a].expected {
            return self.fail_alloc(a, IoError::Os { errno: libc::EIO });
        }
        let (q, _) = img.writable_top();
        let cs = q.geom.cluster_size();
        let sc = q.geom.subcluster_size();
        let al = std::mem::take(&mut self.allocations.allocs[a]);
        let at = al.index * q.geom.l2_entry_bytes() as usize;
        let raw = encode_l2_entry(Some(al.host), false, true);
        let bitmap = al.old_bitmap.map(|old_bm| {
            if al.whole {
                0xffff_ffff
            } else {
                let m = subcluster_mask(al.span.0, al.span.1, sc);
                (old_bm | m) & !(m << 32)
            }
        });
        self.set_entry(q, al.cluster / self.l2_cover, al.slot, at, raw, bitmap);
        self.layers[0].l2.unpin(al.slot);
        if !al.survives_loss {
            self.flush.sync_before_l2();
        }
        self.note_reference(img, al.reservation);
        if al.new_cluster && !al.identity {
            self.free_old_mapping(q, al.old_raw, al.old_bitmap, cs);
        }
        self.allocations.allocating.remove(&al.cluster);
        self.requests.wake_waiters(al.waiters);
        if let Some(buf) = al.buf {
            self.buffers.recycle(buf);
        }
        self.allocations.allocs.free(a);
        self.finish_part(al.part, Ok(()));
    }

    fn fail_alloc(&mut self, a: AllocId, err: IoError) {
        let al = std::mem::take(&mut self.allocations.allocs[a]);
        self.layers[0].l2.unpin(al.slot);
        if al.new_cluster && !al.identity {
            // Never referenced: free it once the next flush has passed. (Cluster buffers are
            // one cluster of the top image.)
            self.reservations.pending_frees.push(PendingFree {
                host: al.host,
                len: self.buffers.cluster_bytes() as u64,
                compressed: None,
                meta: 0,
            });
        }
        self.allocations.allocating.remove(&al.cluster);
        self.requests.wake_waiters(al.waiters);
        if let Some(buf) = al.buf {
            self.buffers.recycle(buf);
        }
        self.allocations.allocs.free(a);
        self.finish_part(al.part, Err(err));
    }

    /// Queues the free of whatever an L2 entry pointed at before it was replaced.
    fn free_old_mapping(&mut self, q: &Qcow2Layer, raw: u64, bitmap: Option<u64>, cs: u64) {
        let Ok(old) = L2Entry::decode(raw, bitmap, q.geom.cluster_bits, q.geom.has_data_file)
        else {
            return;
        };
        match old.mapping {
            ClusterMapping::Normal { host } | ClusterMapping::Zero { host: Some(host) } => {
                self.reservations.pending_frees.push(PendingFree {
                    host,
                    len: cs,
                    compressed: None,
                    meta: 0,
                })
            }
            ClusterMapping::Compressed(d) => {
                let (host, len) = d.host_range();
                self.reservations.pending_frees.push(PendingFree {
                    host,
                    len,
                    compressed: Some(d.host_offset),
                    meta: 0,
                });
            }
            ClusterMapping::Zero { host: None } | ClusterMapping::Unallocated => {}
        }
    }

    /// Write-zeroes (or discard) of part `pid` within one cluster: metadata only where the
    /// format allows, real zeros otherwise.
    #[allow(clippy::too_many_arguments)]
    fn zero_cluster(
        &mut self,
        ring: &mut Ring,
        img: &ImageInner,
        pid: PartId,
        slot: u32,
        index: usize,
        entry: L2Entry,
        unmap: bool,
        discard: bool,
    ) {
        let (q, w) = img.writable_top();
        let cs = q.geom.cluster_size();
        let sc = q.geom.subcluster_size();
        let ext = q.geom.extended_l2;
        let has_backing = !img.backing.is_empty();
        let p = self.requests.parts[pid];
        let cluster = p.guest_off & !(cs - 1);
        let (ws, we) = (p.guest_off - cluster, p.guest_off - cluster + p.len);

        if q.data_file.is_some() {
            // Guest data has a fixed place in the external data file: write real zeros there.
            if discard {
                return self.finish_part(pid, Ok(()));
            }
            return self.write_cluster(ring, img, pid, slot, index, entry, true);
        }
        if reads_zero(&entry, ext, sc, ws, we, has_backing) {
            return self.finish_part(pid, Ok(()));
        }
        let at = index * q.geom.l2_entry_bytes() as usize;
        let old_raw = be64_at(self.layers[0].l2.buf(slot), at);
        let keep_host = match entry.mapping {
            ClusterMapping::Normal { host } | ClusterMapping::Zero { host: Some(host) }
                if entry.copied && !unmap && !discard =>
            {
                Some(host)
            }
            _ => None,
        };

        let how = ZeroHow {
            cs,
            sc,
            ext,
            zero_flag: w.zero_flag,
            has_backing,
            discard,
        };
        let (raw, bitmap) = match how.plan(&entry, old_raw, keep_host, ws, we) {
            ZeroPlan::Nothing => return self.finish_part(pid, Ok(())),
            ZeroPlan::WriteZeros { narrow } => {
                if let Some((a, b)) = narrow {
                    let part = &mut self.requests.parts[pid];
                    part.guest_off = cluster + a;
                    part.len = b - a;
                }
                return self.write_cluster(ring, img, pid, slot, index, entry, true);
            }
            ZeroPlan::Entry { raw, bitmap } => (raw, bitmap),
        };

        self.set_entry(
            q,
            self.requests.parts[pid].guest_off / self.l2_cover,
            slot,
            at,
            raw,
            bitmap,
        );
        let old_host_kept = raw & 0x00ff_ffff_ffff_fe00 != 0;
        if !old_host_kept {
            self.free_old_mapping(q, old_raw, entry.bitmap, cs);
        }
        self.finish_part(pid, Ok(()));
    }
}
