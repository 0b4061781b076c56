//! The vhost-user-blk client on blkio's `virtio-blk-vhost-user` driver ([`BlkClient`]),
//! connected read-only ([`blk_session`]) or read-write ([`rw_session`]) and used on the
//! session's own thread with every wait bounded; and checking a whole image read through the
//! daemon against the oracle; [`read_answers`], whether an export takes a new client.

use crate::*;
use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};
use std::path::Path;
use std::time::{Duration, Instant};

/// Largest request the client submits.
pub const SLOT_BYTES: usize = MIB as usize;
/// Data buffers (so reads and writes in flight at once) of a read-only client.
pub const SLOTS: usize = 8;

fn blkio_err(what: &str, e: blkio::Error) -> String {
    format!("blkio {what}: {} (errno {})", e.message(), e.errno())
}

/// A started `virtio-blk-vhost-user` connection with `slots` request slots of memory mapped,
/// and the device's limits.
struct Connection {
    queues: Vec<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
    capacity: u64,
    max_segment_len: usize,
    max_segments: usize,
    max_write_zeroes_len: u64,
    max_discard_len: u64,
    flush_needed: bool,
}

impl Connection {
    /// Connects to `socket` with `num_queues` queues of 128 descriptors.
    fn open(
        socket: &Path,
        num_queues: i32,
        read_only: bool,
        slots: usize,
    ) -> Result<Connection, String> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| blkio_err("new", e))?;
        b.set_str("path", &socket.display().to_string())
            .map_err(|e| blkio_err("set path", e))?;
        if read_only {
            b.set_bool("read-only", true)
                .map_err(|e| blkio_err("set read-only", e))?;
        }
        b.connect().map_err(|e| blkio_err("connect", e))?;
        b.set_i32("num-queues", num_queues)
            .map_err(|e| blkio_err("set num-queues", e))?;
        b.set_i32("queue-size", 128)
            .map_err(|e| blkio_err("set queue-size", e))?;
        let get_u64 = |b: &Blkio, name: &str| {
            b.get_u64(name)
                .map_err(|e| blkio_err(&format!("get {name}"), e))
        };
        let get_i32 = |b: &Blkio, name: &str| {
            b.get_i32(name)
                .map_err(|e| blkio_err(&format!("get {name}"), e))
        };
        let capacity = get_u64(&b, "capacity")?;
        let max_segment_len = get_i32(&b, "max-segment-len")?.max(0) as usize;
        let max_segments = get_i32(&b, "max-segments")?.max(1) as usize;
        let max_write_zeroes_len = get_u64(&b, "max-write-zeroes-len")?;
        let max_discard_len = get_u64(&b, "max-discard-len")?;
        let flush_needed = b
            .get_bool("flush-needed")
            .map_err(|e| blkio_err("get flush-needed", e))?;
        let outcome = b.start().map_err(|e| blkio_err("start", e))?;
        let region = b
            .alloc_mem_region(SLOT_BYTES * slots)
            .map_err(|e| blkio_err("alloc_mem_region", e))?;
        b.map_mem_region(&region)
            .map_err(|e| blkio_err("map_mem_region", e))?;
        Ok(Connection {
            queues: outcome.queues,
            blkio: b,
            region,
            capacity,
            max_segment_len,
            max_segments,
            max_write_zeroes_len,
            max_discard_len,
            flush_needed,
        })
    }
}

/// Runs `f` with a read-only client connected to `socket`, on its own thread, within
/// `timeout`.
pub fn blk_session<T, F>(
    socket: &Path,
    num_queues: i32,
    timeout: Duration,
    f: F,
) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce(&mut BlkClient) -> Result<T, String> + Send + 'static,
{
    let socket = socket.to_path_buf();
    try_with_timeout("vhost-user-blk client", timeout, move || {
        let mut c = BlkClient::connect(&socket, num_queues)?;
        f(&mut c)
    })?
}

/// Serves `img` with the daemon, reads a plan through the socket with 2 queues and compares
/// every read with the oracle.
pub fn check_daemon(img: &Path, settings: &str, oracle: &[u8], cluster: u64) -> Result<(), String> {
    check_daemon_with(img, settings, oracle, cluster, &[])
}

/// [`check_daemon`] with more `qcow2d serve` options.
pub fn check_daemon_with(
    img: &Path,
    settings: &str,
    oracle: &[u8],
    cluster: u64,
    extra: &[&str],
) -> Result<(), String> {
    let sock_dir = Scratch::new("sock");
    let socket = sock_dir.socket("s");
    let mut d = Daemon::start_with(img, &socket, extra).map_err(|f| format!("daemon: {f}"))?;
    let size = oracle.len() as u64;
    let plan = read_plan(size, cluster, 2);
    let plan2 = plan.clone();
    let res = blk_session(&socket, 2, READ_TIMEOUT, move |c| {
        if c.capacity() != size {
            return Err(format!(
                "device capacity {} bytes, qemu-img says {size}",
                c.capacity()
            ));
        }
        c.read_batch(&plan2)
    });
    let exited = d
        .try_exit_status()
        .map(|st| format!("qcow2d EXITED ({st}) while or after serving the client\n"));
    let out = match res {
        Err(e) => Err(format!("daemon+blkio: {e}")),
        Ok(results) => check_results("daemon+blkio", settings, oracle, &plan, &results),
    };
    match (out, exited) {
        (Ok(()), None) => Ok(()),
        (out, exited) => Err(format!(
            "{}{}\ndaemon stderr:\n{}",
            exited.unwrap_or_default(),
            out.err().unwrap_or_default(),
            d.stderr()
        )),
    }
}

/// The whole differential check of one image: oracle, engine, daemon. Reports every failure.
pub fn check_image(img: &Path, settings: &str) {
    let oracle = oracle(img);
    let mut failures = Vec::new();
    let mut cluster = 65536;
    match engine_open(img) {
        Ok(image) => cluster = image.cluster_size(),
        Err(e) => failures.push(format!("engine: Image::open failed: {e}")),
    }
    if failures.is_empty() {
        if let Err(e) = check_engine(img, settings, &oracle) {
            failures.push(e);
        }
    }
    if let Err(e) = check_daemon(img, settings, &oracle, cluster) {
        failures.push(e);
    }
    if !failures.is_empty() {
        panic!(
            "{} ({} failure(s)):\n{}\n--- qemu-img info ---\n{}",
            img.display(),
            failures.len(),
            failures.join("\n\n"),
            qemu_img_info_text(img)
        );
    }
}

/// One request of [`BlkClient`].
#[derive(Clone, Debug)]
pub enum BlkOp {
    /// Read `len` bytes (at most [`SLOT_BYTES`]).
    Read { off: u64, len: usize },
    /// Write `data` (at most [`SLOT_BYTES`]).
    Write { off: u64, data: Vec<u8> },
    /// Write zeroes; `unmap: false` sends BLKIO_REQ_NO_UNMAP (the device must not deallocate).
    WriteZeroes { off: u64, len: u64, unmap: bool },
    /// Discard.
    Discard { off: u64, len: u64 },
    /// Flush: makes every write completed before it was submitted durable.
    Flush,
}

impl BlkOp {
    /// For messages: `write 4096 bytes at 0x10000` and so on.
    pub fn describe(&self) -> String {
        match self {
            BlkOp::Read { off, len } => format!("read {len} bytes at {off:#x}"),
            BlkOp::Write { off, data } => format!("write {} bytes at {off:#x}", data.len()),
            BlkOp::WriteZeroes { off, len, unmap } => {
                format!("write-zeroes (unmap {unmap}) {len} bytes at {off:#x}")
            }
            BlkOp::Discard { off, len } => format!("discard {len} bytes at {off:#x}"),
            BlkOp::Flush => "flush".into(),
        }
    }

    /// The byte range the request touches (`None` for a flush).
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            BlkOp::Read { off, len } => Some((*off, *len as u64)),
            BlkOp::Write { off, data } => Some((*off, data.len() as u64)),
            BlkOp::WriteZeroes { off, len, .. } | BlkOp::Discard { off, len } => Some((*off, *len)),
            BlkOp::Flush => None,
        }
    }
}

/// What a finished [`BlkOp`] returned: the data of a read (empty for the others) or the error.
pub type OpResult = Result<Vec<u8>, String>;

/// Data buffers of a read-write client (of [`SLOT_BYTES`] each).
pub const RW_SLOTS: usize = 16;
/// Requests of a [`BlkClient`] in flight at once over all queues (each queue has 128
/// descriptors).
pub const RW_MAX_IN_FLIGHT: usize = 48;
/// Limit for [`BlkClient::run_batch`] to make progress (one completion).
pub const RW_PROGRESS_TIMEOUT: Duration = Duration::from_secs(20);

struct RwRequest {
    tag: usize,
    queue: usize,
    slot: Option<usize>,
    read_len: Option<usize>,
    /// Bytes past the slot's start where the data begins (odd iovecs only).
    shift: usize,
    // Kept alive until completion: blkio may hold the pointer in its request backlog.
    _iov: Vec<libc::iovec>,
}

/// A vhost-user-blk client on blkio's `virtio-blk-vhost-user` driver: reads, writes
/// (scatter-gather, uneven segments), write zeroes, discards and flushes, several in flight over
/// all queues. Not `Send`: use it on one thread (see [`blk_session`] and [`rw_session`]).
pub struct BlkClient {
    // Field order matters: queues go before the Blkio that owns the memory region.
    queues: Vec<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
    capacity: u64,
    max_segment_len: usize,
    max_segments: usize,
    max_write_zeroes_len: u64,
    max_discard_len: u64,
    flush_needed: bool,
    free_slots: Vec<usize>,
    free_ids: Vec<usize>,
    requests: Vec<Option<RwRequest>>,
    queue_load: Vec<usize>,
    next_queue: usize,
    ready: Vec<(usize, OpResult)>,
    completions: Vec<std::mem::MaybeUninit<blkio::Completion>>,
    /// Segment sizes of a request, in turn (see [`split_iovecs`]).
    segments: &'static [usize],
    /// Each request in as few segments as the device allows, instead of `segments`.
    one_segment: bool,
    /// Every other read and write gets misaligned memory and odd segment lengths.
    odd_iovecs: bool,
    data_requests: usize,
}

/// Segment sizes of a read-write client's requests: multiples of 512 in uneven sizes.
const EVEN_SEGMENTS: [usize; 5] = [4096, 512, 65536, 3584, 131072];
/// Segment sizes of a read-only client's requests: multiples of 512 in uneven sizes, larger.
const READ_SEGMENTS: [usize; 5] = [3584, 61440, 131072, 512, 262144];
/// Segment sizes of odd requests ([`BlkClient::set_odd_iovecs`]): no multiple of 512 but one.
const ODD_SEGMENTS: [usize; 5] = [1000, 511, 4097, 65536, 3583];

/// Splits `len` bytes at `base` into iovecs of the sizes `sizes` in turn (none: as large as the
/// device allows) within the device's segment limits; too many falls back to the largest.
fn split_iovecs(
    base: usize,
    len: usize,
    max_segments: usize,
    max_segment_len: usize,
    sizes: &[usize],
) -> Result<Vec<libc::iovec>, String> {
    let mut seg_sizes = Vec::new();
    let mut done = 0;
    let mut i = 0;
    while done < len {
        let mut n = if max_segments == 1 || sizes.is_empty() {
            len - done
        } else {
            sizes[i % sizes.len()].min(len - done)
        };
        if max_segment_len > 0 {
            n = n.min(max_segment_len);
        }
        seg_sizes.push(n);
        done += n;
        i += 1;
    }
    if seg_sizes.len() > max_segments {
        let seg = if max_segment_len > 0 {
            max_segment_len
        } else {
            len
        };
        seg_sizes = (0..len.div_ceil(seg))
            .map(|k| seg.min(len - k * seg))
            .collect();
        if seg_sizes.len() > max_segments {
            return Err(format!(
                "a {len}-byte request needs {} segments, the device allows {max_segments} of at \
                 most {max_segment_len} bytes",
                seg_sizes.len()
            ));
        }
    }
    let mut at = base;
    Ok(seg_sizes
        .into_iter()
        .map(|n| {
            let v = libc::iovec {
                iov_base: at as *mut libc::c_void,
                iov_len: n,
            };
            at += n;
            v
        })
        .collect())
}

impl BlkClient {
    /// Connects to `socket` read-only with `num_queues` queues of 128 descriptors and
    /// [`SLOTS`] data buffers.
    pub fn connect(socket: &Path, num_queues: i32) -> Result<BlkClient, String> {
        Self::open(socket, num_queues, true)
    }

    /// Connects to `socket` read-write with `num_queues` queues of 128 descriptors and
    /// [`RW_SLOTS`] data buffers.
    pub fn connect_rw(socket: &Path, num_queues: i32) -> Result<BlkClient, String> {
        Self::open(socket, num_queues, false)
    }

    fn open(socket: &Path, num_queues: i32, read_only: bool) -> Result<BlkClient, String> {
        let (slots, segments) = if read_only {
            (SLOTS, &READ_SEGMENTS)
        } else {
            (RW_SLOTS, &EVEN_SEGMENTS)
        };
        let c = Connection::open(socket, num_queues, read_only, slots)?;
        let nq = c.queues.len();
        Ok(BlkClient {
            queues: c.queues,
            blkio: c.blkio,
            region: c.region,
            capacity: c.capacity,
            max_segment_len: c.max_segment_len,
            max_segments: c.max_segments,
            max_write_zeroes_len: c.max_write_zeroes_len,
            max_discard_len: c.max_discard_len,
            flush_needed: c.flush_needed,
            free_slots: (0..slots).rev().collect(),
            free_ids: (0..RW_MAX_IN_FLIGHT).rev().collect(),
            requests: (0..RW_MAX_IN_FLIGHT).map(|_| None).collect(),
            queue_load: vec![0; nq],
            next_queue: 0,
            ready: Vec::new(),
            completions: (0..128).map(|_| std::mem::MaybeUninit::uninit()).collect(),
            segments,
            one_segment: false,
            odd_iovecs: false,
            data_requests: 0,
        })
    }

    /// Sends each request in one segment (within the device's segment size limit) instead of
    /// the default uneven ones: a whole-cluster read then reaches the server as one contiguous
    /// buffer.
    pub fn set_one_segment(&mut self, on: bool) {
        self.one_segment = on;
    }

    /// From now on every other read and write puts its data 1 to 7 bytes past a 512-byte
    /// boundary (when it fits in its slot) in segments of odd lengths: what direct I/O cannot
    /// take as it is.
    pub fn set_odd_iovecs(&mut self, on: bool) {
        self.odd_iovecs = on;
    }

    /// Where a read or write of `len` bytes in `slot` starts, and how it is split.
    fn data_iovecs(
        &mut self,
        slot: usize,
        len: usize,
    ) -> Result<(usize, Vec<libc::iovec>), String> {
        self.data_requests += 1;
        let odd = self.odd_iovecs && self.data_requests & 1 == 0;
        let shift = if odd && len + 8 <= SLOT_BYTES {
            1 + self.data_requests / 2 % 7
        } else {
            0
        };
        let sizes: &[usize] = if odd {
            &ODD_SEGMENTS
        } else if self.one_segment {
            &[]
        } else {
            self.segments
        };
        let base = self.region.addr + slot * SLOT_BYTES + shift;
        let iov = split_iovecs(base, len, self.max_segments, self.max_segment_len, sizes)?;
        Ok((shift, iov))
    }

    /// The disk size the device reports.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Largest write-zeroes request the device accepts (0: not offered).
    pub fn max_write_zeroes_len(&self) -> u64 {
        self.max_write_zeroes_len
    }

    /// Largest discard request the device accepts (0: not offered).
    pub fn max_discard_len(&self) -> u64 {
        self.max_discard_len
    }

    /// Whether the device reports a volatile write cache (write-back: FLUSH needed).
    pub fn flush_needed(&self) -> bool {
        self.flush_needed
    }

    /// Requests submitted and not yet returned by [`BlkClient::poll`].
    pub fn in_flight(&self) -> usize {
        RW_MAX_IN_FLIGHT - self.free_ids.len() + self.ready.len()
    }

    /// Whether [`BlkClient::submit`] would accept `op` now.
    pub fn can_submit(&self, op: &BlkOp) -> bool {
        let needs_slot = matches!(op, BlkOp::Read { .. } | BlkOp::Write { .. });
        !self.free_ids.is_empty() && (!needs_slot || !self.free_slots.is_empty())
    }

    /// Queues `op` (tagged `tag` in its completion) and kicks the device. Fails when
    /// [`BlkClient::can_submit`] is false, the request is too large, or on a transport error.
    pub fn submit(&mut self, op: &BlkOp, tag: usize) -> Result<(), String> {
        if !self.can_submit(op) {
            return Err(format!("no room to submit {}", op.describe()));
        }
        let nq = self.queues.len();
        let q = self.next_queue % nq;
        self.next_queue += 1;
        let id = self.free_ids.pop().unwrap();
        let mut req = RwRequest {
            tag,
            queue: q,
            slot: None,
            read_len: None,
            shift: 0,
            _iov: Vec::new(),
        };
        let bad_len = match op {
            BlkOp::Read { len, .. } => *len == 0 || *len > SLOT_BYTES,
            BlkOp::Write { data, .. } => data.is_empty() || data.len() > SLOT_BYTES,
            BlkOp::WriteZeroes { len, .. } | BlkOp::Discard { len, .. } => *len == 0,
            BlkOp::Flush => false,
        };
        if bad_len {
            self.free_ids.push(id);
            return Err(format!("bad request length: {}", op.describe()));
        }
        match op {
            BlkOp::Read { off, len } => {
                let slot = self.free_slots.pop().unwrap();
                req.slot = Some(slot);
                req.read_len = Some(*len);
                (req.shift, req._iov) = match self.data_iovecs(slot, *len) {
                    Ok(v) => v,
                    Err(e) => {
                        self.free_slots.push(slot);
                        self.free_ids.push(id);
                        return Err(e);
                    }
                };
                self.queues[q].readv(
                    *off,
                    req._iov.as_ptr(),
                    req._iov.len() as u32,
                    id,
                    ReqFlags::empty(),
                );
            }
            BlkOp::Write { off, data } => {
                let slot = self.free_slots.pop().unwrap();
                req.slot = Some(slot);
                (req.shift, req._iov) = match self.data_iovecs(slot, data.len()) {
                    Ok(v) => v,
                    Err(e) => {
                        self.free_slots.push(slot);
                        self.free_ids.push(id);
                        return Err(e);
                    }
                };
                let base = self.region.addr + slot * SLOT_BYTES + req.shift;
                // SAFETY: the region is mapped for the client's lifetime, this slot is free (no
                // request of ours uses it), and `data` fits in it after the shift (checked
                // above and in data_iovecs).
                unsafe {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), base as *mut u8, data.len())
                };
                self.queues[q].writev(
                    *off,
                    req._iov.as_ptr(),
                    req._iov.len() as u32,
                    id,
                    ReqFlags::empty(),
                );
            }
            BlkOp::WriteZeroes { off, len, unmap } => {
                let flags = if *unmap {
                    ReqFlags::empty()
                } else {
                    ReqFlags::NO_UNMAP
                };
                self.queues[q].write_zeroes(*off, *len, id, flags);
            }
            BlkOp::Discard { off, len } => {
                self.queues[q].discard(*off, *len, id, ReqFlags::empty());
            }
            BlkOp::Flush => self.queues[q].flush(id, ReqFlags::empty()),
        }
        self.requests[id] = Some(req);
        self.queue_load[q] += 1;
        self.kick(q)
    }

    /// Submits what is queued on queue `q` and collects what has completed, without waiting.
    fn kick(&mut self, q: usize) -> Result<(), String> {
        let n = self.queues[q]
            .do_io(&mut self.completions, 0, None, None)
            .map_err(|e| blkio_err("do_io", e))?;
        self.collect(n);
        Ok(())
    }

    fn collect(&mut self, n: usize) {
        for i in 0..n {
            // SAFETY: do_io() initialised the first n entries of the array.
            let c = unsafe { self.completions[i].assume_init_ref() };
            let (id, ret) = (c.user_data, c.ret);
            let req = self.requests[id]
                .take()
                .expect("completion of a request that is not in flight");
            self.queue_load[req.queue] -= 1;
            self.free_ids.push(id);
            let result = if ret == 0 {
                match (req.slot, req.read_len) {
                    (Some(slot), Some(len)) => {
                        let base = self.region.addr + slot * SLOT_BYTES + req.shift;
                        // SAFETY: the region is mapped for the client's lifetime and this slot's
                        // request has completed, so nothing writes to these bytes now.
                        let data = unsafe { std::slice::from_raw_parts(base as *const u8, len) };
                        Ok(data.to_vec())
                    }
                    _ => Ok(Vec::new()),
                }
            } else {
                Err(format!(
                    "request failed: {}",
                    std::io::Error::from_raw_os_error(-ret)
                ))
            };
            if let Some(slot) = req.slot {
                self.free_slots.push(slot);
            }
            self.ready.push((req.tag, result));
        }
    }

    /// Returns the completions that arrived (tag, result), waiting up to `wait` for at least
    /// one when requests are in flight. An empty vector after `wait` means nothing completed.
    pub fn poll(&mut self, wait: Duration) -> Result<Vec<(usize, OpResult)>, String> {
        for q in 0..self.queues.len() {
            if self.queue_load[q] > 0 {
                self.kick(q)?;
            }
        }
        let deadline = Instant::now() + wait;
        let mut turn = 0;
        while self.ready.is_empty() && self.queue_load.iter().any(|&n| n > 0) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Wait on one queue for a short while, then look at the others too.
            let nq = self.queues.len();
            let q = (0..nq)
                .map(|i| (turn + i) % nq)
                .find(|&q| self.queue_load[q] > 0)
                .unwrap();
            turn = q + 1;
            let mut t = left.min(Duration::from_millis(5));
            match self.queues[q].do_io(&mut self.completions, 1, Some(&mut t), None) {
                Ok(n) => self.collect(n),
                Err(e) if e.errno() == blkio::Errno::TIME => {}
                Err(e) => return Err(blkio_err("do_io (waiting)", e)),
            }
            for q in 0..nq {
                if self.queue_load[q] > 0 {
                    self.kick(q)?;
                }
            }
        }
        Ok(std::mem::take(&mut self.ready))
    }

    /// Runs every op of `ops` with as many in flight at once as the client allows (submitted in
    /// order, completing in any order) and returns the results in the order of `ops`. The
    /// caller makes sure concurrent ops do not overlap. `Err` on a transport failure or when
    /// nothing completes for [`RW_PROGRESS_TIMEOUT`].
    pub fn run_batch(&mut self, ops: &[BlkOp]) -> Result<Vec<OpResult>, String> {
        let mut results: Vec<Option<OpResult>> = vec![None; ops.len()];
        let mut next = 0;
        let mut done = 0;
        let mut last_progress = Instant::now();
        while done < ops.len() {
            while next < ops.len() && self.can_submit(&ops[next]) {
                self.submit(&ops[next], next)?;
                next += 1;
            }
            let got = self.poll(Duration::from_millis(200))?;
            if got.is_empty() {
                if last_progress.elapsed() > RW_PROGRESS_TIMEOUT {
                    let stuck: Vec<String> = results
                        .iter()
                        .enumerate()
                        .take(next)
                        .filter(|(_, r)| r.is_none())
                        .map(|(i, _)| ops[i].describe())
                        .collect();
                    return Err(format!(
                        "no completion for {} s; in flight: {}",
                        RW_PROGRESS_TIMEOUT.as_secs(),
                        stuck.join(", ")
                    ));
                }
                continue;
            }
            last_progress = Instant::now();
            for (tag, r) in got {
                assert!(results[tag].is_none(), "two completions for op {tag}");
                results[tag] = Some(r);
                done += 1;
            }
        }
        Ok(results.into_iter().map(Option::unwrap).collect())
    }

    /// Like [`BlkClient::run_batch`], failing on the first request that failed.
    pub fn run_ok(&mut self, ops: &[BlkOp]) -> Result<Vec<Vec<u8>>, String> {
        let results = self.run_batch(ops)?;
        ops.iter()
            .zip(results)
            .map(|(op, r)| r.map_err(|e| format!("{}: {e}", op.describe())))
            .collect()
    }

    /// Reads every request of `reqs` (each at most [`SLOT_BYTES`]) with as many in flight as
    /// the client has data buffers. Per-request result; `Err` for the whole batch on a
    /// transport failure or when nothing completes for [`RW_PROGRESS_TIMEOUT`].
    pub fn read_batch(&mut self, reqs: &[ReadReq]) -> Result<Vec<OpResult>, String> {
        let ops: Vec<BlkOp> = reqs
            .iter()
            .map(|&(off, len)| BlkOp::Read { off, len })
            .collect();
        self.run_batch(&ops)
    }

    /// Submits reads of `reqs` (as many as there are free data buffers) and returns without
    /// waiting for them: dropping the client next leaves them in flight.
    pub fn abandon_with_requests_in_flight(&mut self, reqs: &[ReadReq]) -> Result<(), String> {
        for (tag, &(off, len)) in reqs.iter().enumerate() {
            let op = BlkOp::Read { off, len };
            if !self.can_submit(&op) {
                break;
            }
            self.submit(&op, tag)?;
        }
        Ok(())
    }

    /// Reads `len` bytes at `off` in requests of at most 1 MiB.
    pub fn read_range(&mut self, off: u64, len: u64) -> Result<Vec<u8>, String> {
        let mut ops = Vec::new();
        let mut at = off;
        while at < off + len {
            let n = (SLOT_BYTES as u64).min(off + len - at);
            ops.push(BlkOp::Read {
                off: at,
                len: n as usize,
            });
            at += n;
        }
        Ok(self.run_ok(&ops)?.concat())
    }
}

impl Drop for BlkClient {
    fn drop(&mut self) {
        self.queues.clear();
        self.blkio.unmap_mem_region(&self.region);
    }
}

/// Runs `f` with a read-write client connected to `socket`, on its own thread, within
/// `timeout`.
pub fn rw_session<T, F>(
    socket: &Path,
    num_queues: i32,
    timeout: Duration,
    f: F,
) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce(&mut BlkClient) -> Result<T, String> + Send + 'static,
{
    let socket = socket.to_path_buf();
    try_with_timeout("vhost-user-blk read-write client", timeout, move || {
        let mut c = BlkClient::connect_rw(&socket, num_queues)?;
        f(&mut c)
    })?
}

/// Reads `want.len()` bytes at offset 0 through a fresh read-only blkio connection to `socket`
/// (on a thread of its own, bounded by [`READ_TIMEOUT`]) and fails the test unless they are
/// `want`: the export takes a new connection and answers it.
pub fn read_answers(socket: &Path, want: &[u8]) {
    let socket = socket.to_path_buf();
    let want = want.to_vec();
    with_timeout("a read of a new connection", READ_TIMEOUT, move || {
        let mut c = BlkClient::connect(&socket, 1)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
        let got = c
            .read_range(0, want.len() as u64)
            .unwrap_or_else(|e| panic!("read from {}: {e}", socket.display()));
        assert!(got == want, "wrong data from {}", socket.display());
    });
}
