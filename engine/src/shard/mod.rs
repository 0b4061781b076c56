//! The per-core executor: drives guest requests from submission to completion.
//!
//! A [`Shard`] is owned by one thread. It owns an io_uring, per-layer caches of L2 tables and
//! decompressed clusters, and arenas of requests, parts and operations; nothing in it is shared
//! with other shards, so the data path takes no locks.
//!
//! A request becomes one or more *parts*: a guest range at one layer of the backing chain. The
//! planner ([`crate::meta::resolve`]) maps the start of a part to a step (zeros, data at a host
//! offset, a compressed cluster, or the next layer down); the part is split where the mapping
//! changes and each piece is served: zeros are written at once, data is read by the kernel
//! straight into the caller's memory, compressed clusters go through the decompressed-cluster
//! cache. A part that needs an L2 table or a compressed cluster that is not cached waits on the
//! cache slot being loaded and is planned again when the load completes.
//!
//! One loop turn ([`Shard::poll`]) reaps completions, plans every ready part, and submits all
//! the I/O that produced with one `io_uring_enter`.

mod slab;

use crate::error::{Error, ErrorKind, IoError};
use crate::format::Inflater;
use crate::image::{Image, ImageInner, LayerKind};
use crate::io::{iov_copy_from, iov_fill_zero, iov_subrange, iov_total_len, Ring};
use crate::meta::{resolve, Lookup, SlotCache, Step, WaitList, NO_ID};
use io_uring::{opcode, types};
use libc::iovec;
use slab::Slab;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};

/// How a shard is set up.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// This shard's index, `0..count`.
    pub index: usize,
    /// How many shards serve the image.
    pub count: usize,
    /// Submission queue entries of the shard's io_uring.
    pub ring_entries: u32,
    /// Bytes of decompressed clusters cached per layer.
    pub decompressed_cache_bytes: u64,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            index: 0,
            count: 1,
            ring_entries: 256,
            decompressed_cache_bytes: 16 << 20,
        }
    }
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The token the request was submitted with.
    pub token: u64,
    /// Success, or why it failed.
    pub result: Result<(), IoError>,
}

/// Most iovecs one read may carry (the kernel's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;
/// Compressed-extent buffers kept for reuse; more are freed after use.
const MAX_POOLED_COMPRESSED_BUFFERS: usize = 8;

#[derive(Default)]
struct Req {
    token: u64,
    iov: Vec<iovec>,
    /// Parts not yet finished.
    pending: u32,
    error: Option<IoError>,
}

#[derive(Default, Clone, Copy)]
struct Part {
    req: u32,
    layer: u16,
    guest_off: u64,
    len: u64,
    /// Byte offset of this part within the request's iovecs.
    skip: u64,
    /// Next part in the wait list this part is on.
    next: u32,
}

#[derive(Default, Clone, Copy)]
enum OpKind {
    #[default]
    Idle,
    L2Load {
        layer: u16,
        slot: u32,
        host: u64,
    },
    Data {
        part: u32,
        fd: RawFd,
        host: u64,
        done: u64,
    },
    Compressed {
        layer: u16,
        slot: u32,
        fd: RawFd,
        host: u64,
        want: u64,
        got: u64,
    },
}

#[derive(Default)]
struct Op {
    kind: OpKind,
    iov: Vec<iovec>,
    buf: Option<Box<[u8]>>,
}

struct LayerCaches {
    l2: SlotCache,
    decompressed: SlotCache,
}

/// Everything a shard mutates, apart from the ring.
struct State {
    layers: Vec<LayerCaches>,
    reqs: Slab<Req>,
    parts: Slab<Part>,
    ops: Slab<Op>,
    ready: VecDeque<u32>,
    finished: Vec<Completion>,
    cqes: Vec<(u64, i32)>,
    compressed_bufs: Vec<Box<[u8]>>,
    compressed_buf_bytes: usize,
    inflater: Inflater,
    ops_in_kernel: usize,
}

/// See the module documentation.
pub struct Shard {
    // Field order is drop order; Drop waits for the kernel first anyway.
    ring: Ring,
    st: State,
    image: Image,
}

// SAFETY: the raw pointers a shard holds (iovecs into caller memory) are only dereferenced by
// the kernel and by the shard's own thread; the submit contract makes that memory valid until
// completion regardless of which thread owns the shard. Moving a shard between threads moves
// its ring with it; it is never shared (`Shard` is not `Sync`).
unsafe impl Send for Shard {}

fn os_error(e: &std::io::Error) -> IoError {
    IoError::Os {
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    }
}

impl Shard {
    pub(crate) fn new(image: Image, config: &ShardConfig) -> Result<Shard, Error> {
        let ring = Ring::new(config.ring_entries)
            .map_err(|e| Error::io("Cannot create an io_uring (is io_uring enabled?)", e))?;
        let inner = &image.inner;
        let mut layers = Vec::with_capacity(inner.layers.len());
        let mut compressed_buf_bytes = 0usize;
        for layer in &inner.layers {
            let caches = match &layer.kind {
                LayerKind::Qcow2(q) => {
                    let cs = q.geom.cluster_size();
                    compressed_buf_bytes = compressed_buf_bytes.max(2 * cs as usize);
                    let l2_slots = (inner.l2_cache_bytes / cs).clamp(4, q.l1.len().max(4) as u64);
                    LayerCaches {
                        l2: SlotCache::new(l2_slots as usize, cs as usize),
                        decompressed: SlotCache::new(
                            (config.decompressed_cache_bytes / cs).max(2) as usize,
                            cs as usize,
                        ),
                    }
                }
                LayerKind::Raw(_) => LayerCaches {
                    l2: SlotCache::new(1, 0),
                    decompressed: SlotCache::new(1, 0),
                },
            };
            layers.push(caches);
        }
        Ok(Shard {
            ring,
            st: State {
                layers,
                reqs: Slab::with_capacity(256),
                parts: Slab::with_capacity(512),
                ops: Slab::with_capacity(512),
                ready: VecDeque::with_capacity(512),
                finished: Vec::with_capacity(256),
                cqes: Vec::with_capacity(512),
                compressed_bufs: Vec::new(),
                compressed_buf_bytes,
                inflater: Inflater::new(),
                ops_in_kernel: 0,
            },
            image,
        })
    }

    /// An eventfd that becomes readable when the kernel has posted completions.
    pub fn completion_fd(&self) -> RawFd {
        self.ring.event_fd()
    }

    /// Requests submitted and not yet returned as completions.
    pub fn in_flight(&self) -> usize {
        self.st.reqs.live()
    }

    /// L2 cache (hits, misses) summed over the layers.
    pub fn l2_cache_stats(&self) -> (u64, u64) {
        self.st.layers.iter().fold((0, 0), |(h, m), l| {
            let (a, b) = l.l2.stats();
            (h + a, m + b)
        })
    }

    /// Decompressed-cluster cache (hits, misses) summed over the layers.
    pub fn decompressed_cache_stats(&self) -> (u64, u64) {
        self.st.layers.iter().fold((0, 0), |(h, m), l| {
            let (a, b) = l.decompressed.stats();
            (h + a, m + b)
        })
    }

    /// Queues a read of the guest range `offset..offset + total iov length` into `iov`.
    ///
    /// `Err` means the request was rejected before any I/O (out of range, too many
    /// segments); `Ok` means exactly one [`Completion`] with `token` will come out of
    /// [`Shard::poll`] or [`Shard::wait`].
    ///
    /// # Safety
    /// Every iovec must point to memory valid for writes of its length, not otherwise accessed,
    /// until the completion for `token` has been returned or the shard has been dropped.
    pub unsafe fn submit_read(
        &mut self,
        token: u64,
        offset: u64,
        iov: &[iovec],
    ) -> Result<(), Error> {
        let len = iov_total_len(iov);
        let size = self.image.virtual_size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "Read of {len} bytes at {offset:#x} is beyond the disk size of {size} bytes"
                ),
            ));
        }
        if iov.len() > MAX_IOVECS {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("Read with {} segments (at most {MAX_IOVECS})", iov.len()),
            ));
        }
        let st = &mut self.st;
        let r = st.reqs.alloc();
        let req = &mut st.reqs[r];
        req.token = token;
        req.iov.clear();
        req.iov.extend_from_slice(iov);
        req.error = None;
        if len == 0 {
            req.pending = 0;
            st.finished.push(Completion {
                token,
                result: Ok(()),
            });
            st.reqs.free(r);
            return Ok(());
        }
        req.pending = 1;
        let p = st.parts.alloc();
        st.parts[p] = Part {
            req: r,
            layer: 0,
            guest_off: offset,
            len,
            skip: 0,
            next: NO_ID,
        };
        st.ready.push_back(p);
        Ok(())
    }

    /// Queues a write. Writable images are not supported yet: always `Err(ReadOnly)`.
    ///
    /// # Safety
    /// Every iovec must point to memory valid for reads of its length until the completion for
    /// `token` has been returned or the shard has been dropped.
    pub unsafe fn submit_write(
        &mut self,
        _token: u64,
        offset: u64,
        iov: &[iovec],
    ) -> Result<(), Error> {
        Err(Error::new(
            ErrorKind::ReadOnly,
            format!(
                "Write of {} bytes at {offset:#x} to a read-only image",
                iov_total_len(iov)
            ),
        ))
    }

    /// Queues a flush: completes when every write completed before it is durable. A read-only
    /// image has nothing to flush, so it completes at the next poll.
    pub fn submit_flush(&mut self, token: u64) -> Result<(), Error> {
        self.st.finished.push(Completion {
            token,
            result: Ok(()),
        });
        Ok(())
    }

    /// Reaps kernel completions, plans every ready part, submits the new I/O with one
    /// `io_uring_enter`, and appends finished requests to `out`. Never blocks.
    pub fn poll(&mut self, out: &mut Vec<Completion>) {
        self.ring.drain_eventfd();
        loop {
            self.turn();
            if let Err(e) = self.ring.submit() {
                tracing::error!("io_uring submit failed: {e}");
            }
            // Reads served from the page cache complete during the submit: finish them in
            // this call rather than after another wake-up.
            if !self.ring.has_completions() && self.st.ready.is_empty() {
                break;
            }
        }
        out.append(&mut self.st.finished);
    }

    /// Like [`Shard::poll`], but blocks until at least one completion has been appended, or
    /// returns at once when nothing is in flight.
    pub fn wait(&mut self, out: &mut Vec<Completion>) {
        let before = out.len();
        loop {
            self.poll(out);
            if out.len() > before || self.in_flight() == 0 {
                return;
            }
            if let Err(e) = self.ring.submit_and_wait() {
                tracing::error!("io_uring wait failed: {e}");
                return;
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset` and waits for them.
    pub(crate) fn read_blocking(&mut self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let iov = [iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        const TOKEN: u64 = u64::MAX;
        // SAFETY: `buf` is borrowed mutably for this whole call and we wait below until the
        // request's completion has been returned; if waiting fails, the shard (a local of the
        // caller) is dropped before `buf`'s borrow ends, and Drop waits for the kernel.
        unsafe { self.submit_read(TOKEN, offset, &iov)? };
        let mut out = Vec::with_capacity(1);
        loop {
            self.wait(&mut out);
            if !out.is_empty() {
                break;
            }
            if self.in_flight() == 0 {
                return Err(Error::new(ErrorKind::Io, "Read lost by the shard"));
            }
        }
        out[0].result.map_err(|e| {
            let kind = match e {
                IoError::Os { .. } => ErrorKind::Io,
                IoError::Corrupt { .. } | IoError::BadCompressedCluster { .. } => {
                    ErrorKind::Corrupt
                }
                IoError::ReadOnly => ErrorKind::ReadOnly,
            };
            Error::with_source(
                kind,
                format!("Read of {} bytes at {offset:#x} failed", buf.len()),
                e,
            )
        })
    }

    /// One pass: handle every available completion, then plan every ready part.
    fn turn(&mut self) {
        let Shard { ring, st, image } = self;
        let img = &*image.inner;
        st.cqes.clear();
        ring.reap_into(&mut st.cqes);
        for i in 0..st.cqes.len() {
            let (op, res) = st.cqes[i];
            st.ops_in_kernel -= 1;
            st.complete_op(ring, img, op as u32, res);
        }
        while let Some(p) = st.ready.pop_front() {
            st.plan(ring, img, p);
        }
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        // The kernel may still write into caller memory and our buffers: wait until it is done.
        while self.st.ops_in_kernel > 0 {
            if let Err(e) = self.ring.submit_and_wait() {
                tracing::error!(
                    "io_uring failed while draining {} operations: {e}; leaking their buffers",
                    self.st.ops_in_kernel
                );
                let st = std::mem::take(&mut self.st.layers);
                std::mem::forget(st);
                let ops = std::mem::replace(&mut self.st.ops, Slab::with_capacity(0));
                std::mem::forget(ops);
                return;
            }
            self.st.cqes.clear();
            self.ring.reap_into(&mut self.st.cqes);
            self.st.ops_in_kernel -= self.st.cqes.len();
        }
    }
}

impl State {
    /// Splits part `pid` at `at` bytes; the tail becomes a new ready part.
    fn split(&mut self, pid: u32, at: u64) {
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

    fn finish_part(&mut self, pid: u32, result: Result<(), IoError>) {
        let req_id = self.parts[pid].req;
        self.parts.free(pid);
        let req = &mut self.reqs[req_id];
        if let Err(e) = result {
            req.error.get_or_insert(e);
        }
        req.pending -= 1;
        if req.pending == 0 {
            self.finished.push(Completion {
                token: req.token,
                result: req.error.map_or(Ok(()), Err),
            });
            self.reqs.free(req_id);
        }
    }

    fn zero_part(&mut self, pid: u32) {
        let p = self.parts[pid];
        // SAFETY: the request's iovecs are valid for writes until its completion (the
        // submit_read contract), and the part lies within them.
        unsafe { iov_fill_zero(&self.reqs[p.req].iov, p.skip as usize, p.len as usize) };
        self.finish_part(pid, Ok(()));
    }

    fn fail_waiters(&mut self, mut list: WaitList, err: IoError) {
        while list.head != NO_ID {
            let next = self.parts[list.head].next;
            self.finish_part(list.head, Err(err));
            list.head = next;
        }
    }

    fn replan_waiters(&mut self, ring: &mut Ring, img: &ImageInner, mut list: WaitList) {
        while list.head != NO_ID {
            let next = self.parts[list.head].next;
            self.plan(ring, img, list.head);
            list.head = next;
        }
    }

    /// Appends part `pid` to a wait list.
    fn enqueue_waiter(parts: &mut Slab<Part>, list: &mut WaitList, pid: u32) {
        parts[pid].next = NO_ID;
        if list.tail == NO_ID {
            list.head = pid;
        } else {
            parts[list.tail].next = pid;
        }
        list.tail = pid;
    }

    /// Pushes `entry` for operation `op`; on failure the operation is freed and its error
    /// returned.
    ///
    /// # Safety
    /// The buffers `entry` points to must stay valid until the operation's completion.
    unsafe fn push(
        &mut self,
        ring: &mut Ring,
        op: u32,
        entry: io_uring::squeue::Entry,
    ) -> Result<(), IoError> {
        // SAFETY: forwarded from the caller.
        match unsafe { ring.push(&entry.user_data(u64::from(op))) } {
            Ok(()) => {
                self.ops_in_kernel += 1;
                Ok(())
            }
            Err(e) => {
                self.ops[op].kind = OpKind::Idle;
                self.ops.free(op);
                Err(os_error(&e))
            }
        }
    }

    /// Plans part `pid` until it is served, split, or waiting on a cache slot.
    fn plan(&mut self, ring: &mut Ring, img: &ImageInner, pid: u32) {
        loop {
            let p = self.parts[pid];
            let Some(layer) = img.layers.get(p.layer as usize) else {
                return self.zero_part(pid);
            };
            if p.guest_off >= layer.virtual_size {
                return self.zero_part(pid);
            }
            if p.guest_off + p.len > layer.virtual_size {
                self.split(pid, layer.virtual_size - p.guest_off);
                continue;
            }
            let q = match &layer.kind {
                LayerKind::Raw(file) => {
                    return self.start_data(ring, pid, file.as_raw_fd(), p.guest_off);
                }
                LayerKind::Qcow2(q) => q,
            };
            let cover = q.geom.l2_coverage();
            let l1_index = p.guest_off / cover;
            let table_end = (l1_index + 1) * cover;
            if p.guest_off + p.len > table_end {
                self.split(pid, table_end - p.guest_off);
                continue;
            }
            let raw_l1 = q.l1.get(l1_index as usize).copied().unwrap_or(0);
            let cs = q.geom.cluster_size();
            let l2_host = match crate::format::decode_l1_entry(raw_l1, cs) {
                Err(why) => {
                    let at = q.header.l1_table_offset + 8 * l1_index;
                    tracing::warn!("{}: L1 entry at {at:#x}: {why}", layer.path.display());
                    return self.finish_part(pid, Err(IoError::Corrupt { host_offset: at }));
                }
                Ok(h) => h,
            };
            let (step, run) = match l2_host {
                None => (Step::Backing, p.len),
                Some(l2_host) => {
                    let caches = &mut self.layers[p.layer as usize];
                    match caches.l2.lookup(l1_index) {
                        Lookup::Ready(slot) => {
                            match resolve(&q.geom, caches.l2.buf(slot), p.guest_off, p.len) {
                                Ok(r) => r,
                                Err(why) => {
                                    let at = l2_host
                                        + (p.guest_off % cover) / cs * q.geom.l2_entry_bytes();
                                    tracing::warn!(
                                        "{}: L2 entry at {at:#x}: {why}",
                                        layer.path.display()
                                    );
                                    return self.finish_part(
                                        pid,
                                        Err(IoError::Corrupt { host_offset: at }),
                                    );
                                }
                            }
                        }
                        Lookup::Loading(slot) => {
                            Self::enqueue_waiter(&mut self.parts, caches.l2.waiters_mut(slot), pid);
                            return;
                        }
                        Lookup::Miss => {
                            let slot = caches.l2.start_load(l1_index);
                            Self::enqueue_waiter(&mut self.parts, caches.l2.waiters_mut(slot), pid);
                            let buf = caches.l2.buf_mut(slot);
                            let entry = opcode::Read::new(
                                types::Fd(q.file.as_raw_fd()),
                                buf.as_mut_ptr(),
                                buf.len() as u32,
                            )
                            .offset(l2_host)
                            .build();
                            let op = self.ops.alloc();
                            self.ops[op].kind = OpKind::L2Load {
                                layer: p.layer,
                                slot,
                                host: l2_host,
                            };
                            // SAFETY: the slot's buffer is not freed, moved or reused while the
                            // slot is loading; it stays loading until this op completes.
                            if let Err(e) = unsafe { self.push(ring, op, entry) } {
                                let w = self.layers[p.layer as usize].l2.fail_load(slot);
                                self.fail_waiters(w, e);
                            }
                            return;
                        }
                    }
                }
            };
            if run < p.len {
                self.split(pid, run);
            }
            match step {
                Step::Zero => return self.zero_part(pid),
                Step::Backing => {
                    if p.layer as usize + 1 < img.layers.len() {
                        self.parts[pid].layer += 1;
                        continue;
                    }
                    return self.zero_part(pid);
                }
                Step::Data { host } => return self.start_data(ring, pid, q.data_fd(), host),
                Step::Compressed(desc) => {
                    let caches = &mut self.layers[p.layer as usize];
                    match caches.decompressed.lookup(desc.host_offset) {
                        Lookup::Ready(slot) => {
                            let at = (p.guest_off % cs) as usize;
                            let part = self.parts[pid];
                            let src = &caches.decompressed.buf(slot)[at..at + part.len as usize];
                            // SAFETY: the request's iovecs are valid for writes until its
                            // completion; the part lies within them; `src` is our own buffer.
                            unsafe {
                                iov_copy_from(&self.reqs[part.req].iov, part.skip as usize, src)
                            };
                            return self.finish_part(pid, Ok(()));
                        }
                        Lookup::Loading(slot) => {
                            Self::enqueue_waiter(
                                &mut self.parts,
                                caches.decompressed.waiters_mut(slot),
                                pid,
                            );
                            return;
                        }
                        Lookup::Miss => {
                            let slot = caches.decompressed.start_load(desc.host_offset);
                            Self::enqueue_waiter(
                                &mut self.parts,
                                caches.decompressed.waiters_mut(slot),
                                pid,
                            );
                            let bytes = self.compressed_buf_bytes;
                            let mut buf = self
                                .compressed_bufs
                                .pop()
                                .unwrap_or_else(|| vec![0u8; bytes].into_boxed_slice());
                            let want = desc.max_len.min(buf.len() as u64);
                            let fd = q.file.as_raw_fd();
                            let entry =
                                opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), want as u32)
                                    .offset(desc.host_offset)
                                    .build();
                            let op = self.ops.alloc();
                            self.ops[op].kind = OpKind::Compressed {
                                layer: p.layer,
                                slot,
                                fd,
                                host: desc.host_offset,
                                want,
                                got: 0,
                            };
                            self.ops[op].buf = Some(buf);
                            // SAFETY: the buffer is owned by the op (a heap allocation that
                            // does not move) until the op's completion is handled.
                            if let Err(e) = unsafe { self.push(ring, op, entry) } {
                                let w = self.layers[p.layer as usize].decompressed.fail_load(slot);
                                self.fail_waiters(w, e);
                            }
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Starts (or continues, after a short read) reading part `pid` from `fd` at `host`.
    fn start_data(&mut self, ring: &mut Ring, pid: u32, fd: RawFd, host: u64) {
        let op = self.ops.alloc();
        self.ops[op].kind = OpKind::Data {
            part: pid,
            fd,
            host,
            done: 0,
        };
        self.submit_data(ring, op);
    }

    fn submit_data(&mut self, ring: &mut Ring, op: u32) {
        let OpKind::Data {
            part,
            fd,
            host,
            done,
        } = self.ops[op].kind
        else {
            unreachable!("submit_data on a non-data op");
        };
        let p = self.parts[part];
        let o = &mut self.ops[op];
        o.iov.clear();
        iov_subrange(
            &self.reqs[p.req].iov,
            (p.skip + done) as usize,
            (p.len - done) as usize,
            &mut o.iov,
        );
        let entry = opcode::Readv::new(types::Fd(fd), o.iov.as_ptr(), o.iov.len() as u32)
            .offset(host + done)
            .build();
        // SAFETY: the iovec array lives in the op until its completion; the memory it points
        // to is the request's, valid until the request completes (submit_read contract), and
        // the request cannot complete before this part does.
        if let Err(e) = unsafe { self.push(ring, op, entry) } {
            self.finish_part(part, Err(e));
        }
    }

    /// Handles the completion of operation `op` with result `res`.
    fn complete_op(&mut self, ring: &mut Ring, img: &ImageInner, op: u32, res: i32) {
        match self.ops[op].kind {
            OpKind::Idle => unreachable!("completion for idle op {op}"),
            OpKind::Data {
                part,
                fd,
                host,
                done,
            } => {
                let p = self.parts[part];
                if res < 0 {
                    self.free_op(op);
                    return self.finish_part(part, Err(IoError::Os { errno: -res }));
                }
                let done = done + res as u64;
                if res == 0 {
                    // End of file: what lies past it reads as zeros.
                    self.free_op(op);
                    // SAFETY: as in zero_part; the range is the unread tail of the part.
                    unsafe {
                        iov_fill_zero(
                            &self.reqs[p.req].iov,
                            (p.skip + done) as usize,
                            (p.len - done) as usize,
                        )
                    };
                    return self.finish_part(part, Ok(()));
                }
                if done < p.len {
                    self.ops[op].kind = OpKind::Data {
                        part,
                        fd,
                        host,
                        done,
                    };
                    return self.submit_data(ring, op);
                }
                self.free_op(op);
                self.finish_part(part, Ok(()));
            }
            OpKind::L2Load { layer, slot, host } => {
                self.free_op(op);
                let cache = &mut self.layers[layer as usize].l2;
                let expected = cache.buf(slot).len();
                if res >= 0 && res as usize == expected {
                    let w = cache.finish_load(slot);
                    self.replan_waiters(ring, img, w);
                } else {
                    let w = cache.fail_load(slot);
                    let err = if res < 0 {
                        IoError::Os { errno: -res }
                    } else {
                        tracing::warn!(
                            "{}: L2 table at {host:#x} lies past the end of the file",
                            img.layers[layer as usize].path.display()
                        );
                        IoError::Corrupt { host_offset: host }
                    };
                    self.fail_waiters(w, err);
                }
            }
            OpKind::Compressed {
                layer,
                slot,
                fd,
                host,
                want,
                got,
            } => {
                if res < 0 {
                    self.free_op(op);
                    let w = self.layers[layer as usize].decompressed.fail_load(slot);
                    return self.fail_waiters(w, IoError::Os { errno: -res });
                }
                let got = got + res as u64;
                if res > 0 && got < want {
                    let o = &mut self.ops[op];
                    o.kind = OpKind::Compressed {
                        layer,
                        slot,
                        fd,
                        host,
                        want,
                        got,
                    };
                    let buf = o.buf.as_mut().expect("compressed op owns a buffer");
                    let entry = opcode::Read::new(
                        types::Fd(fd),
                        buf[got as usize..].as_mut_ptr(),
                        (want - got) as u32,
                    )
                    .offset(host + got)
                    .build();
                    // SAFETY: the buffer stays owned by the op until its completion.
                    if let Err(e) = unsafe { self.push(ring, op, entry) } {
                        let w = self.layers[layer as usize].decompressed.fail_load(slot);
                        self.fail_waiters(w, e);
                    }
                    return;
                }
                let buf = self.ops[op]
                    .buf
                    .take()
                    .expect("compressed op owns a buffer");
                self.free_op(op);
                let kind = match &img.layers[layer as usize].kind {
                    LayerKind::Qcow2(q) => q.header.compression_type,
                    LayerKind::Raw(_) => unreachable!("compressed cluster in a raw layer"),
                };
                let cache = &mut self.layers[layer as usize].decompressed;
                let result = self
                    .inflater
                    .inflate(kind, &buf[..got as usize], cache.buf_mut(slot));
                if self.compressed_bufs.len() < MAX_POOLED_COMPRESSED_BUFFERS {
                    self.compressed_bufs.push(buf);
                }
                match result {
                    Ok(()) => {
                        let w = cache.finish_load(slot);
                        self.replan_waiters(ring, img, w);
                    }
                    Err(e) => {
                        tracing::warn!(
                            "{}: compressed cluster at {host:#x}: {e}",
                            img.layers[layer as usize].path.display()
                        );
                        let w = cache.fail_load(slot);
                        self.fail_waiters(w, IoError::BadCompressedCluster { host_offset: host });
                    }
                }
            }
        }
    }

    fn free_op(&mut self, op: u32) {
        self.ops[op].kind = OpKind::Idle;
        self.ops.free(op);
    }
}
