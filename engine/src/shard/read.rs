//! Planning and completing reads (compressed clusters included, inflated here or handed to
//! the shard's inflate queue), and the data I/O shared with writes. An `impl State` block
//! over the requests, the caches, the operations and the inflation part (`inflation.rs`).
//!
//! Runs on the shard's thread.

use super::direct::write_fd;
use super::l2::Table;
use super::op::{Buffer, InflateTarget, OpKind};
use super::op::{DataIo, Target};
use super::slab::{OpId, PartId};
use super::state::State;
use crate::error::IoError;
use crate::format::CompressionType;
use crate::io::sqe;
use crate::io::{
    iov_contiguous, iov_copy_from, iov_fill_zero, iov_subrange, DataFd, Job, Output, Ring,
};
use crate::layer::{KindRef, Qcow2Layer};
use crate::meta::{resolve, Lookup, Step, WaitList};
use crate::shared::ImageInner;
use std::os::fd::AsRawFd;

/// Most inflate jobs of a shard queued or run by others at once (at most half its completion
/// queue); more clusters are inflated as their reads complete.
const MAX_JOBS_OUT: usize = 64;

impl State {
    /// Corruption found in layer `layer`: a writable top image is marked corrupt.
    pub(super) fn corrupt_detected(&mut self, layer: u16, why: &'static str) {
        if layer == 0 {
            self.flush.corruption_found(why);
        }
    }

    /// Plans read part `pid` until it is served, split, or waiting on a cache slot.
    pub(super) fn plan_read(&mut self, ring: &mut Ring, img: &ImageInner, pid: PartId) {
        loop {
            let p = self.requests.parts[pid];
            let Some(layer) = img.get_layer(p.layer) else {
                return self.zero_part(pid);
            };
            if p.guest_off >= layer.virtual_size {
                return self.zero_part(pid);
            }
            if p.guest_off + p.len > layer.virtual_size {
                self.requests.split(pid, layer.virtual_size - p.guest_off);
                continue;
            }
            let q = match layer.kind {
                KindRef::Raw(file) => {
                    return self.start_data(
                        ring,
                        pid,
                        DataFd::buffered(file.as_raw_fd()),
                        p.guest_off,
                        false,
                        Buffer::Request,
                    );
                }
                KindRef::Qcow2(q) => q,
            };
            let cover = q.geom.l2_coverage();
            let l1_index = p.guest_off / cover;
            let table_end = (l1_index + 1) * cover;
            if p.guest_off + p.len > table_end {
                self.requests.split(pid, table_end - p.guest_off);
                continue;
            }
            let cs = q.geom.cluster_size();
            // Another shard's table is read from this shard's own copy while the owner has
            // nothing unwritten in it (`group.rs`), else the part goes to the owner.
            let foreign = self.is_foreign(p.layer, l1_index);
            let version = if foreign {
                self.table_version(l1_index)
            } else {
                0
            };
            if version % 2 == 1 {
                return self.forward_part(pid);
            }
            let (step, run) = match self.l2_table(ring, p.layer, q, layer.path, l1_index, pid) {
                Table::Pending => return,
                Table::Unallocated => {
                    if foreign {
                        self.requests.parts[pid].tag = version;
                    }
                    (Step::Backing, p.len)
                }
                Table::Ready { slot, .. } if foreign && self.foreign_tag(slot) != version => {
                    // A copy read at another version (or torn by the owner's writes): read
                    // the table again (copies are never dirty or pinned, so it goes).
                    if !self.layers[0].l2.invalidate(l1_index) {
                        return self.forward_part(pid);
                    }
                    continue;
                }
                Table::Ready { slot, host } => {
                    if foreign {
                        self.requests.parts[pid].tag = version;
                    }
                    let table = self.layers[p.layer as usize].l2.buf(slot);
                    match resolve(&q.geom, table, p.guest_off, p.len) {
                        Ok(r) => r,
                        Err(_) if foreign => return self.forward_part(pid),
                        Err(why) => {
                            let at = host + (p.guest_off % cover) / cs * q.geom.l2_entry_bytes();
                            tracing::warn!("{}: L2 entry at {at:#x}: {why}", layer.path.display());
                            self.corrupt_detected(p.layer, why);
                            return self
                                .finish_part(pid, Err(IoError::Corrupt { host_offset: at }));
                        }
                    }
                }
            };
            if run < p.len {
                self.requests.split(pid, run);
            }
            match step {
                Step::Zero => return self.zero_part(pid),
                Step::Backing => {
                    if usize::from(p.layer) + 1 < img.layer_count() {
                        self.requests.parts[pid].layer += 1;
                        continue;
                    }
                    return self.zero_part(pid);
                }
                Step::Data { host } => {
                    return self.start_data(ring, pid, q.data_fd(), host, false, Buffer::Request)
                }
                Step::Compressed(desc) => return self.read_compressed(ring, q, pid, desc),
            }
        }
    }

    /// Serves part `pid`, which lies in one compressed cluster: from the decompressed-cluster
    /// cache, or by reading the extent and inflating it.
    ///
    /// A part that misses the cache and covers the whole cluster with one segment of its
    /// request's memory is inflated straight into that memory, and the cluster is not cached.
    /// Caching it would mean inflating into a slot and copying out (the copy this saves) or
    /// copying back from guest memory, which the guest may change meanwhile and so cannot be
    /// trusted. Whole-cluster reads are mostly sequential streams that read each cluster once.
    /// A cluster read whole again soon after (a hot set read with O_DIRECT) would then cost a
    /// full inflate each time instead of a copy from the cache, 20 times more: its second miss
    /// within the cache's recent window ([`crate::meta::SlotCache::admit_on_repeat`]) loads it
    /// into the cache, and it hits from then on. A whole-cluster read that finds the cluster
    /// cached or loading uses the slot.
    ///
    /// A partial read (a 4 KiB random read) of a deflate cluster that misses, ends in the
    /// first three quarters of the cluster, does not continue one of the last few compressed
    /// reads (a sequential stream), and did not miss within that window before,
    /// inflates only the cluster's start up to the end of the part (a streaming inflater that
    /// stops at that byte; miniz_oxide costs about 1.3 times libdeflate per byte, so this
    /// saves work up to three quarters) and copies the part out; nothing is cached. A
    /// cluster read again soon (sequential 4 KiB reads, a hot set) is inflated whole into the
    /// cache on its second miss, and further parts share that slot. Damage past the end of
    /// the part goes unnoticed by a prefix read (the bytes it returns are what the stream
    /// holds), while a read that reaches it fails, as a full inflation does.
    fn read_compressed(
        &mut self,
        ring: &mut Ring,
        q: &Qcow2Layer,
        pid: PartId,
        desc: crate::format::CompressedDescriptor,
    ) {
        let p = self.requests.parts[pid];
        let cs = q.geom.cluster_size();
        let sequential = self.inflation.continues_recent(p.guest_off, p.len);
        let caches = &mut self.layers[p.layer as usize];
        let target = match caches.decompressed.lookup(desc.host_offset) {
            Lookup::Ready(slot) => {
                let at = (p.guest_off % cs) as usize;
                let src = &caches.decompressed.buf(slot)[at..at + p.len as usize];
                // SAFETY: the request's iovecs are valid for writes until its completion; the
                // part lies within them; `src` is our own buffer.
                unsafe { iov_copy_from(&self.requests.reqs[p.req].iov, p.skip as usize, src) };
                return self.finish_part(pid, Ok(()));
            }
            Lookup::Loading(slot) => {
                self.requests
                    .enqueue_waiter(caches.decompressed.waiters_mut(slot), pid);
                return;
            }
            Lookup::Miss if self.scratch.full() => {
                // Its buffers would take the shard past its scratch limit: wait for a read
                // in flight to give some back rather than allocate.
                self.requests.enqueue_waiter(&mut self.scratch.waiters, pid);
                return;
            }
            Lookup::Miss => {
                let whole = p.guest_off.is_multiple_of(cs) && p.len == cs;
                let zlib = q.header.compression_type == CompressionType::Zlib;
                let req_iov = &self.requests.reqs[p.req].iov;
                let dest = whole
                    .then(|| iov_contiguous(req_iov, p.skip as usize, p.len as usize))
                    .flatten()
                    .filter(|_| !caches.decompressed.admit_on_repeat(desc.host_offset));
                // Past three quarters of the cluster, libdeflate's whole-cluster inflation
                // costs no more than the streaming inflater's prefix.
                let end = p.guest_off % cs + p.len;
                // A part that continues one of the last few compressed reads is a sequential
                // stream, which reads the whole cluster soon: load it whole right away.
                let prefix = !whole
                    && !sequential
                    && zlib
                    && end * 4 <= cs * 3
                    && !caches.decompressed.admit_on_repeat(desc.host_offset);
                match dest {
                    Some(dest) => Target::Part {
                        part: pid,
                        seg: libc::iovec {
                            iov_base: dest.cast(),
                            iov_len: p.len as usize,
                        },
                    },
                    None if prefix => {
                        // A pooled cluster buffer when this layer's clusters are the pool's
                        // size (a backing file's clusters may be larger than the top
                        // image's), else just the bytes inflated.
                        let pooled = self.buffers.pooled_cluster(cs as usize);
                        let prefix_len = (p.guest_off % cs + p.len) as usize;
                        let scratch =
                            pooled.unwrap_or_else(|| vec![0u8; prefix_len].into_boxed_slice());
                        Target::Prefix { part: pid, scratch }
                    }
                    None => {
                        let slot = caches.decompressed.start_load(desc.host_offset);
                        self.requests
                            .enqueue_waiter(caches.decompressed.waiters_mut(slot), pid);
                        Target::Slot(slot)
                    }
                }
            }
        };
        self.start_extent_read(ring, q, p.layer, desc, target);
    }

    /// Reads a compressed extent into a pooled buffer of the op, which holds `target` (and
    /// its memory) until the cluster is inflated.
    fn start_extent_read(
        &mut self,
        ring: &mut Ring,
        q: &Qcow2Layer,
        layer: u16,
        desc: crate::format::CompressedDescriptor,
        target: Target,
    ) {
        let mut extent = self.buffers.extent();
        let want = desc.max_len.min(extent.len() as u64);
        let charge = extent.len()
            + match &target {
                Target::Prefix { scratch, .. } => scratch.len(),
                Target::Slot(_) | Target::Part { .. } => 0,
            };
        let id = target.id();
        let fd = q.file.as_raw_fd();
        let entry = sqe::read(fd, &mut extent[..want as usize], desc.host_offset);
        let op = self.ops.alloc();
        self.ops[op].kind = OpKind::Compressed {
            layer,
            target,
            fd,
            host: desc.host_offset,
            want,
            got: 0,
            extent,
        };
        self.hold_epoch(op);
        self.charge_scratch(op, charge);
        // SAFETY: the extent is owned by the op (a heap allocation that does not move) until
        // the op's completion is handled.
        if let Err(e) = unsafe { self.push(ring, op, entry) } {
            self.fail_inflate(layer, id, e);
        }
    }

    /// Fails the parts waiting for a compressed cluster that could not be read or inflated.
    fn fail_inflate(&mut self, layer: u16, target: InflateTarget, err: IoError) {
        match target {
            InflateTarget::Slot(slot) => {
                let w = self.layers[layer as usize].decompressed.fail_load(slot);
                self.fail_waiters(w, err);
            }
            InflateTarget::Part(pid) | InflateTarget::Prefix(pid) => {
                self.finish_part(pid, Err(err))
            }
        }
    }

    /// A compressed cluster was inflated: its waiting parts copy it out, or the part it was
    /// inflated into is done.
    ///
    /// A prefix target's `scratch` holds the inflated bytes (from the cluster's start).
    fn finish_inflate(&mut self, ring: &mut Ring, img: &ImageInner, layer: u16, target: Target) {
        match target {
            Target::Slot(slot) => {
                let w = self.layers[layer as usize].decompressed.finish_load(slot);
                self.replan_waiters(ring, img, w);
            }
            Target::Part { part, .. } => self.finish_part(part, Ok(())),
            Target::Prefix { part: pid, scratch } => {
                let p = self.requests.parts[pid];
                let cs = match img.layer(layer).kind {
                    KindRef::Qcow2(q) => q.geom.cluster_size(),
                    KindRef::Raw(_) => unreachable!("compressed cluster in a raw layer"),
                };
                let at = (p.guest_off % cs) as usize;
                let src = &scratch[at..at + p.len as usize];
                // SAFETY: the request's iovecs are valid for writes until its completion; the
                // part lies within them; `src` is our own buffer.
                unsafe { iov_copy_from(&self.requests.reqs[p.req].iov, p.skip as usize, src) };
                self.buffers.recycle(scratch);
                self.finish_part(pid, Ok(()));
            }
        }
    }

    /// An inflate job finished, on this shard or on a thief.
    pub(super) fn complete_inflating(
        &mut self,
        ring: &mut Ring,
        img: &ImageInner,
        op: OpId,
        res: i32,
    ) {
        let OpKind::Inflating {
            layer,
            target,
            host,
            extent,
        } = std::mem::take(&mut self.ops[op].kind)
        else {
            unreachable!("complete_inflating on another op");
        };
        self.inflation.jobs_out -= 1;
        self.free_op(op);
        self.buffers.recycle(extent);
        if res == 0 {
            self.finish_inflate(ring, img, layer, target);
        } else {
            let target = self.recycle_target(target);
            tracing::warn!(
                "{}: compressed cluster at {host:#x} does not inflate to a full cluster",
                img.layer(layer).path.display()
            );
            self.fail_inflate(
                layer,
                target,
                IoError::BadCompressedCluster { host_offset: host },
            );
        }
    }

    /// Zeroes the part's range of its request and finishes it.
    pub(super) fn zero_part(&mut self, pid: PartId) {
        let p = self.requests.parts[pid];
        // SAFETY: the request's iovecs are valid for writes until its completion (the
        // submit_read contract), and the part lies within them.
        unsafe {
            iov_fill_zero(
                &self.requests.reqs[p.req].iov,
                p.skip as usize,
                p.len as usize,
            )
        };
        self.finish_part(pid, Ok(()));
    }

    /// Starts reading (or writing) part `pid` at `host` of `fd`.
    pub(super) fn start_data(
        &mut self,
        ring: &mut Ring,
        pid: PartId,
        fd: DataFd,
        host: u64,
        write: bool,
        buffer: Buffer,
    ) {
        let op = self.ops.alloc();
        self.hold_epoch(op);
        let io = DataIo {
            part: pid,
            fd,
            host,
            done: 0,
            write,
            buffer,
        };
        self.submit_data(ring, op, io);
    }

    /// Submits (the rest of) data operation `op`, which does `io`.
    fn submit_data(&mut self, ring: &mut Ring, op: OpId, io: DataIo) {
        let DataIo {
            part,
            fd,
            host,
            done,
            write,
            buffer,
        } = io;
        let p = self.requests.parts[part];
        let o = &mut self.ops[op];
        o.iov.clear();
        let rest = (p.len - done) as usize;
        match buffer {
            Buffer::Request => iov_subrange(
                &self.requests.reqs[p.req].iov,
                (p.skip + done) as usize,
                rest,
                &mut o.iov,
            ),
            Buffer::Zeros => {
                // The zero buffer is one cluster; a data part never spans more than one.
                o.iov.push(libc::iovec {
                    iov_base: self.buffers.zeros.as_ptr() as *mut libc::c_void,
                    iov_len: rest.min(self.buffers.zeros.len()),
                });
            }
        }
        let (entry, bounce) = if write {
            let (fd, bounce) = write_fd(&mut o.iov, fd, host + done);
            (sqe::writev(fd, &o.iov, host + done), bounce)
        } else {
            let fd = fd.read_fd(host + done, &o.iov);
            (sqe::readv(fd, &o.iov, host + done), None)
        };
        o.kind = OpKind::Data { io, bounce };
        if write && self.hold_data_writes {
            // Test hook: the write stays here until `release_held_writes`.
            self.held.push((op, entry));
            return;
        }
        // SAFETY: the iovec array lives in the op until its completion; the memory it points
        // to is the request's, valid until the request completes (submit contract), and the
        // request cannot complete before this part does; or it is the shard's zero buffer,
        // which lives as long as the shard and is never written; or the op's bounce buffer,
        // freed only with the op after its completion.
        if let Err(e) = unsafe { self.push(ring, op, entry) } {
            self.finish_part(part, Err(e));
        }
    }

    /// Test hook: submits the writes [`ShardConfig::hold_data_writes`](super::config::ShardConfig::hold_data_writes) held back.
    pub(super) fn release_held_writes(&mut self, ring: &mut Ring) {
        for (op, entry) in std::mem::take(&mut self.held) {
            let OpKind::Data { io, .. } = &self.ops[op].kind else {
                unreachable!("only data writes are held");
            };
            let part = io.part;
            // SAFETY: as in `submit_data`, which built the entry: its memory lives until the
            // op completes, and the op has not been submitted yet.
            if let Err(e) = unsafe { self.push(ring, op, entry) } {
                self.finish_part(part, Err(e));
            }
        }
    }

    pub(super) fn complete_data(&mut self, ring: &mut Ring, op: OpId, res: i32) {
        let OpKind::Data { io, .. } = &self.ops[op].kind else {
            unreachable!("complete_data on a non-data op");
        };
        let io = *io;
        let part = io.part;
        let p = self.requests.parts[part];
        if res < 0 {
            self.free_op(op);
            return self.finish_part(part, Err(IoError::Os { errno: -res }));
        }
        let done = io.done + res as u64;
        if res == 0 {
            self.free_op(op);
            if io.write {
                return self.finish_part(part, Err(IoError::Os { errno: libc::EIO }));
            }
            // End of file: what lies past it reads as zeros.
            // SAFETY: as in zero_part; the range is the unread tail of the part.
            unsafe {
                iov_fill_zero(
                    &self.requests.reqs[p.req].iov,
                    (p.skip + done) as usize,
                    (p.len - done) as usize,
                )
            };
            return self.finish_part(part, Ok(()));
        }
        if done < p.len {
            return self.submit_data(ring, op, DataIo { done, ..io });
        }
        self.free_op(op);
        self.finish_part(part, Ok(()));
    }

    pub(super) fn replan_waiters(&mut self, ring: &mut Ring, img: &ImageInner, mut list: WaitList) {
        while let Some(pid) = self.requests.pop_waiter(&mut list) {
            self.plan(ring, img, pid);
        }
    }

    /// A read of a compressed extent completed: read on if it was short of what the
    /// descriptor allows (and not at the end of the file), else inflate the cluster.
    pub(super) fn complete_compressed(
        &mut self,
        ring: &mut Ring,
        img: &ImageInner,
        op: OpId,
        res: i32,
    ) {
        let OpKind::Compressed {
            layer,
            target,
            fd,
            host,
            want,
            got,
            extent,
        } = &mut self.ops[op].kind
        else {
            unreachable!("complete_compressed on another op");
        };
        let (layer, id) = (*layer, target.id());
        if res < 0 {
            self.free_op(op);
            return self.fail_inflate(layer, id, IoError::Os { errno: -res });
        }
        *got += res as u64;
        if res > 0 && *got < *want {
            let entry = sqe::read(
                *fd,
                &mut extent[*got as usize..*want as usize],
                *host + *got,
            );
            // SAFETY: the extent stays owned by the op until its completion.
            if let Err(e) = unsafe { self.push(ring, op, entry) } {
                self.fail_inflate(layer, id, e);
            }
            return;
        }
        // A short read at the end of the file is fine: the length is an upper bound.
        let OpKind::Compressed {
            mut target,
            host,
            got,
            extent,
            ..
        } = std::mem::take(&mut self.ops[op].kind)
        else {
            unreachable!("complete_compressed on another op");
        };
        let kind = match img.layer(layer).kind {
            KindRef::Qcow2(q) => q.header.compression_type,
            KindRef::Raw(_) => unreachable!("compressed cluster in a raw layer"),
        };
        let out = self.inflate_output(img, layer, &mut target);
        let extent = Extent {
            layer,
            host,
            bytes: extent,
            len: got as usize,
            target,
        };
        if self.may_hand_off(ring) {
            self.hand_off_inflate(ring, op, kind, out, extent);
        } else {
            self.free_op(op);
            self.inflate_here(ring, img, kind, out, extent);
        }
    }

    /// Where the inflater writes the cluster of `target`, a cluster of layer `layer`.
    fn inflate_output(&mut self, img: &ImageInner, layer: u16, target: &mut Target) -> Output {
        match target {
            Target::Slot(slot) => {
                let buf = self.layers[layer as usize].decompressed.buf_mut(*slot);
                Output::Engine {
                    ptr: buf.as_mut_ptr(),
                    len: buf.len(),
                }
            }
            Target::Part { seg, .. } => Output::Guest {
                ptr: seg.iov_base.cast(),
                len: seg.iov_len,
            },
            Target::Prefix { part, scratch } => {
                let p = self.requests.parts[*part];
                let cs = match img.layer(layer).kind {
                    KindRef::Qcow2(q) => q.geom.cluster_size(),
                    KindRef::Raw(_) => unreachable!("compressed cluster in a raw layer"),
                };
                // A checked slice: the inflater writes exactly this range and nothing past it.
                let prefix = &mut scratch[..(p.guest_off % cs + p.len) as usize];
                Output::Prefix {
                    ptr: prefix.as_mut_ptr(),
                    len: prefix.len(),
                }
            }
        }
    }

    /// Whether an inflation is queued for this shard to run at the end of its turn, or for a
    /// thief, rather than run here and now: not when jobs do not change threads, when enough
    /// are out already, or when the completion queue has no room for a thief's completion.
    /// The bound keeps the completions reserved for jobs well below the queue's size: a push
    /// that finds the queue full waits for a completion, and a job still on this shard's
    /// deque would never post one.
    fn may_hand_off(&mut self, ring: &mut Ring) -> bool {
        self.inflation.jobs_out < ring.cq_capacity().min(2 * MAX_JOBS_OUT) / 2
            && self.inflation.jobs.shares()
            && ring.try_expect_external_completion()
    }

    /// Queues the inflation of `extent` into `out` as a job of operation `op`, which holds
    /// the extent and its target until the job's completion.
    fn hand_off_inflate(
        &mut self,
        ring: &mut Ring,
        op: OpId,
        kind: CompressionType,
        out: Output,
        extent: Extent,
    ) {
        let Extent {
            layer,
            host,
            bytes,
            len,
            target,
        } = extent;
        // SAFETY: the extent stays in the op, unchanged, until the job is run by this shard
        // or its completion for this op is reaped (the op is freed only then). A slot stays
        // loading (never evicted, read or written) until then, and a prefix's scratch buffer
        // stays in the op untouched; a part's guest memory stays valid for writes until the
        // part, and so this op, completes (submit_read contract). The ring outlives the
        // completion (Shard::drop takes back the jobs still queued and waits for every
        // operation counted in ops_in_kernel).
        let job = unsafe { Job::new(kind, &bytes[..len], out, ring.ring_fd(), u64::from(op)) };
        self.inflation.jobs.push(job);
        self.inflation.jobs_out += 1;
        self.ops[op].kind = OpKind::Inflating {
            layer,
            target,
            host,
            extent: bytes,
        };
        self.ops_in_kernel += 1;
    }

    /// Inflates `extent` into `out` on this thread, now (its operation is freed).
    fn inflate_here(
        &mut self,
        ring: &mut Ring,
        img: &ImageInner,
        kind: CompressionType,
        out: Output,
        extent: Extent,
    ) {
        let Extent {
            layer,
            host,
            bytes,
            len,
            target,
        } = extent;
        // SAFETY: a slot is ours alone while it is loading; a prefix's scratch buffer is ours
        // (a heap allocation held in `target` until after this call); a part's guest memory
        // is valid for writes until the part completes (submit_read contract), which is not
        // before this.
        let result = unsafe { self.inflation.inflater.inflate(kind, &bytes[..len], out) };
        self.buffers.recycle(bytes);
        match result {
            Ok(()) => self.finish_inflate(ring, img, layer, target),
            Err(e) => {
                tracing::warn!(
                    "{}: compressed cluster at {host:#x}: {e}",
                    img.layer(layer).path.display()
                );
                let target = self.recycle_target(target);
                self.fail_inflate(
                    layer,
                    target,
                    IoError::BadCompressedCluster { host_offset: host },
                );
            }
        }
    }
}

/// A compressed extent read in full (`bytes[..len]`, read at `host` of layer `layer`), to
/// inflate to `target`.
struct Extent {
    layer: u16,
    host: u64,
    bytes: Box<[u8]>,
    len: usize,
    target: Target,
}
