use super::*;
use crate::virtio_blk::{ID_BYTES, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::Bytes;

use crate::metrics::exposition::{ExportSnapshot, OpSnapshot};
use crate::metrics::{ExportLabels, Metrics};

/// What a submitted request does.
#[derive(Clone, Debug, PartialEq, Eq)]
enum FakeOp {
    /// Offset and buffers.
    Read(u64, Vec<(usize, usize)>),
    /// Offset and the bytes, copied at submission.
    Write(u64, Vec<u8>),
    /// Offset, length, unmap.
    Zeroes(u64, u64, bool),
    /// Offset, length.
    Discard(u64, u64),
    Flush,
}

impl FakeOp {
    fn offset(&self) -> Option<u64> {
        match self {
            FakeOp::Read(o, _) | FakeOp::Write(o, _) => Some(*o),
            FakeOp::Zeroes(o, _, _) | FakeOp::Discard(o, _) => Some(*o),
            FakeOp::Flush => None,
        }
    }
}

/// Performs requests synchronously when polled: byte i of the disk reads as `pattern(i)`.
#[derive(Default)]
struct FakeIo {
    pending: Vec<(u64, FakeOp)>,
    /// Every request submitted, in order.
    log: Vec<(u64, FakeOp)>,
    /// While true, `poll` finishes nothing (only `wait` does).
    hold: bool,
    /// Requests at this offset fail when they complete.
    fail_offset: Option<u64>,
    /// Requests at this offset are refused at submission.
    refuse_offset: Option<u64>,
    /// Last `set_writethrough`.
    writethrough: Option<bool>,
    /// `finish` calls: requests in flight at the time of each (shared, to be read after the
    /// worker is dropped).
    finished: Arc<std::sync::Mutex<Vec<usize>>>,
    /// What `cache_stats` reports.
    cache: CacheStats,
    /// Like an engine with one job of its own per request: a poll finishes the oldest
    /// request only, and says that work is left while requests are pending.
    one_per_poll: bool,
    /// Polls that returned with work left and made the completion descriptor readable for
    /// it (a trip through the event loop).
    signals: u32,
}

fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

impl FakeIo {
    fn complete_all(&mut self, out: &mut Vec<Done<String>>) {
        for (token, op) in self.pending.drain(..) {
            if op.offset().is_some() && op.offset() == self.fail_offset {
                out.push((token, Err("injected failure".to_string())));
                continue;
            }
            if let FakeOp::Read(offset, iov) = op {
                let mut pos = offset;
                for (base, len) in iov {
                    for i in 0..len {
                        // SAFETY: the worker guarantees the iovec is valid for writes
                        // until this completion is returned.
                        unsafe { *(base as *mut u8).add(i) = pattern(pos) };
                        pos += 1;
                    }
                }
            }
            out.push((token, Ok(())));
        }
    }

    fn push(&mut self, token: u64, op: FakeOp) -> Result<(), String> {
        if op.offset().is_some() && op.offset() == self.refuse_offset {
            return Err("refused".into());
        }
        self.log.push((token, op.clone()));
        self.pending.push((token, op));
        Ok(())
    }
}

impl BlockIo for FakeIo {
    type SubmitError = String;
    type IoError = String;

    unsafe fn submit_read(
        &mut self,
        token: u64,
        offset: u64,
        iov: &[libc::iovec],
    ) -> Result<(), String> {
        let iov = iov
            .iter()
            .map(|v| (v.iov_base as usize, v.iov_len))
            .collect();
        self.push(token, FakeOp::Read(offset, iov))
    }

    unsafe fn submit_write(
        &mut self,
        token: u64,
        offset: u64,
        iov: &[libc::iovec],
    ) -> Result<(), String> {
        let mut data = Vec::new();
        for v in iov {
            // SAFETY: the worker guarantees the iovec is valid for reads of its length
            // until the completion.
            data.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
            });
        }
        self.push(token, FakeOp::Write(offset, data))
    }

    fn submit_write_zeroes(
        &mut self,
        token: u64,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), String> {
        self.push(token, FakeOp::Zeroes(offset, len, unmap))
    }

    fn submit_discard(&mut self, token: u64, offset: u64, len: u64) -> Result<(), String> {
        self.push(token, FakeOp::Discard(offset, len))
    }

    fn submit_flush(&mut self, token: u64) -> Result<(), String> {
        self.push(token, FakeOp::Flush)
    }

    fn set_writethrough(&mut self, on: bool) {
        self.writethrough = Some(on);
    }

    fn finish(&mut self) -> Result<(), String> {
        self.finished.lock().unwrap().push(self.pending.len());
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Done<String>>) {
        if self.poll_more(out) {
            self.signals += 1;
        }
    }

    fn poll_more(&mut self, out: &mut Vec<Done<String>>) -> bool {
        if self.hold {
            return false;
        }
        if !self.one_per_poll {
            self.complete_all(out);
            return false;
        }
        let rest = self.pending.split_off(self.pending.len().min(1));
        self.complete_all(out);
        self.pending = rest;
        !self.pending.is_empty()
    }

    fn wait(&mut self, out: &mut Vec<Done<String>>) {
        self.complete_all(out);
    }

    fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn cache_stats(&self) -> CacheStats {
        self.cache
    }
}

const QSIZE: u16 = 64;

fn device() -> DeviceInfo {
    let mut serial = [0u8; ID_BYTES];
    serial[..4].copy_from_slice(b"test");
    DeviceInfo {
        capacity: 1 << 20,
        read_only: true,
        serial,
    }
}

fn desc(addr: u64, len: u32, write: bool, next: Option<u16>) -> RawDescriptor {
    let mut flags = 0;
    if write {
        flags |= VRING_DESC_F_WRITE as u16;
    }
    if next.is_some() {
        flags |= VRING_DESC_F_NEXT as u16;
    }
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next.unwrap_or(0)))
}

fn write_header(mem: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
    let mut raw = [0u8; 16];
    raw[0..4].copy_from_slice(&t.to_le_bytes());
    raw[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(at)).unwrap();
}

struct Harness {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    vring: Vring,
}

impl Harness {
    fn new() -> Self {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
        );
        let vring = Vring::new(mem.clone(), QSIZE).unwrap();
        Harness { mem, vring }
    }

    /// Lays out the rings, writes `descs` (chains linked by their `next` fields) and makes
    /// them available; returns the queue's ring addresses for reading the used ring.
    fn queue(&self, descs: &[RawDescriptor]) -> u64 {
        let guard = self.mem.memory();
        let vq = MockSplitQueue::new(&*guard, QSIZE);
        vq.add_desc_chains(descs, 0).unwrap();
        self.vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        self.vring.set_queue_size(QSIZE);
        self.vring.set_queue_ready(true);
        self.vring.set_enabled(true);
        vq.used_addr().0
    }

    /// (head, len) of used entry `i`, and the used index.
    fn used(&self, used_addr: u64, i: u64) -> (u32, u32) {
        let m = self.mem.memory();
        let at = GuestAddress(used_addr + 4 + 8 * i);
        (
            m.read_obj::<u32>(at).unwrap(),
            m.read_obj::<u32>(at.unchecked_add(4)).unwrap(),
        )
    }

    fn used_idx(&self, used_addr: u64) -> u16 {
        self.mem
            .memory()
            .read_obj::<u16>(GuestAddress(used_addr + 2))
            .unwrap()
    }

    fn byte(&self, at: u64) -> u8 {
        self.mem.memory().read_obj::<u8>(GuestAddress(at)).unwrap()
    }
}

use vm_memory::Address;

#[test]
fn malformed_chains_get_ioerr_or_are_dropped_and_good_requests_still_complete() {
    let h = Harness::new();
    let m = h.mem.memory();
    write_header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
    write_header(&m, 0x1100, VIRTIO_BLK_T_IN, 2);
    write_header(&m, 0x1200, 77, 0);
    for status in [0x5000u64, 0x5001, 0x5002] {
        m.write_obj(0xeeu8, GuestAddress(status)).unwrap();
    }
    let descs = [
        // 0..2: read whose data buffer lies outside guest memory -> IOERR.
        desc(0x1000, 16, false, Some(1)),
        desc(0x4000_0000, 512, true, Some(2)),
        desc(0x5000, 1, true, None),
        // 3: header only, no status byte -> dropped with len 0.
        desc(0x1000, 16, false, None),
        // 4..6: good read of sectors 2..4.
        desc(0x1100, 16, false, Some(5)),
        desc(0x8000, 1024, true, Some(6)),
        desc(0x5001, 1, true, None),
        // 7..8: unknown request type -> UNSUPP.
        desc(0x1200, 16, false, Some(8)),
        desc(0x5002, 1, true, None),
    ];
    let used_addr = h.queue(&descs);

    let mut w = Worker::new(FakeIo::default(), h.mem.clone());
    w.process_queue(std::slice::from_ref(&h.vring), 0, false, &device());

    assert_eq!(h.used_idx(used_addr), 4);
    // Immediate answers come first, in ring order; the read completes after the poll.
    assert_eq!(h.used(used_addr, 0), (0, 1));
    assert_eq!(h.used(used_addr, 1), (3, 0));
    assert_eq!(h.used(used_addr, 2), (7, 1));
    assert_eq!(h.used(used_addr, 3), (4, 1025));
    assert_eq!(h.byte(0x5000), STATUS_IOERR);
    assert_eq!(h.byte(0x5001), STATUS_OK);
    assert_eq!(h.byte(0x5002), STATUS_UNSUPP);
    for i in 0..1024u64 {
        assert_eq!(h.byte(0x8000 + i), pattern(1024 + i), "byte {i}");
    }
    assert_eq!(w.queue_in_flight(0), 0);
    // The slot was recycled: a second round reuses it.
    assert_eq!(w.slots.len(), 1);
    assert_eq!(w.free.len(), 1);
}

/// Queues five reads of 4 KiB (sectors 0..5), all into the same guest buffer at 0x8000 (the
/// budget counts bytes asked for, not distinct memory), status bytes at 0x5000..0x5005.
/// Returns the used ring's address.
fn queue_five_reads(h: &Harness) -> u64 {
    let m = h.mem.memory();
    let mut descs = Vec::new();
    for i in 0..5u16 {
        let header = 0x1000 + 0x100 * u64::from(i);
        write_header(&m, header, VIRTIO_BLK_T_IN, u64::from(i));
        descs.push(desc(header, 16, false, Some(3 * i + 1)));
        descs.push(desc(0x8000, 4096, true, Some(3 * i + 2)));
        descs.push(desc(0x5000 + u64::from(i), 1, true, None));
    }
    h.queue(&descs)
}

/// A worker gate of `bytes` in flight (100 requests), on a connection without limits.
fn byte_gate(bytes: u64) -> Gate {
    let unlimited = Limits {
        bytes: u64::MAX,
        requests: u32::MAX,
    };
    Gate::new(
        Limits {
            bytes,
            requests: 100,
        },
        Arc::new(ConnectionBudget::new(unlimited)),
        0,
    )
}

#[test]
fn chains_wait_in_the_ring_while_over_budget_and_are_taken_as_requests_complete() {
    let h = Harness::new();
    let used_addr = queue_five_reads(&h);
    let io = FakeIo {
        hold: true,
        ..FakeIo::default()
    };
    let gate = byte_gate(8192);
    let mut w = Worker::new(io, h.mem.clone()).with_budget(gate);
    let vrings = std::slice::from_ref(&h.vring);
    w.process_queue(vrings, 0, true, &device());
    assert_eq!(w.io().pending.len(), 2, "8 KiB in flight");
    assert!(w.starved);
    // Nothing kicks again: completions alone bring the rest in, two at a time.
    w.io.hold = false;
    let mut turns = 0;
    while h.used_idx(used_addr) < 5 {
        turns += 1;
        assert!(turns <= 4, "stuck at {} used", h.used_idx(used_addr));
        w.process_completions(vrings, true, &device());
        assert!(w.io().pending.len() <= 2);
        assert!(w.budget.in_flight().0 <= 8192);
    }
    assert_eq!(w.io().log.len(), 5);
    let offsets: Vec<Option<u64>> = w.io().log.iter().map(|(_, op)| op.offset()).collect();
    assert_eq!(
        offsets,
        (0..5u64).map(|i| Some(i * 512)).collect::<Vec<_>>(),
        "in ring order"
    );
    for i in 0..5 {
        assert_eq!(h.byte(0x5000 + i), STATUS_OK);
    }
    assert!(!w.starved);
    assert_eq!(w.budget.in_flight(), (0, 0));
}

/// Budget given back by completions reaped in a turn that a kick started (the reap drains
/// the engine's completion eventfd, so no completion event follows) still brings the
/// chains left in the ring in. The events are driven as the worker's event loop would
/// see them: a completion event only while the engine has something to report, the timer
/// only when it has fired, no kick but the first.
#[test]
fn budget_given_back_during_a_kick_brings_the_waiting_chains_in() {
    let h = Harness::new();
    let used_addr = queue_five_reads(&h);
    let gate = byte_gate(4096);
    let throttle = WorkerThrottle::new(Arc::new(crate::throttle::ExportThrottle::new(None)));
    let io = FakeIo {
        hold: true,
        ..FakeIo::default()
    };
    let mut w = Worker::new(io, h.mem.clone())
        .with_budget(gate)
        .with_throttle(throttle, Timer::new().unwrap());
    let vrings = std::slice::from_ref(&h.vring);
    w.process_queue(vrings, 0, true, &device());
    assert_eq!(w.io().pending.len(), 1, "4 KiB in flight");
    // The engine finishes it while the worker handles a kick: the kick's turn reaps it.
    w.io.hold = false;
    w.process_queue(vrings, 0, true, &device());
    let timer_fired = |w: &Worker<FakeIo>| {
        let mut pfd = libc::pollfd {
            fd: w.timer_fd().unwrap(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    };
    let mut turns = 0;
    while h.used_idx(used_addr) < 5 {
        turns += 1;
        assert!(turns <= 10, "stuck at {} used", h.used_idx(used_addr));
        if !w.io().pending.is_empty() {
            w.process_completions(vrings, true, &device());
        } else if timer_fired(&w) {
            w.process_timer(vrings, true, &device());
        } else {
            // Ample for a timer armed 1 ns ahead.
            std::thread::sleep(std::time::Duration::from_millis(10));
            assert!(
                timer_fired(&w),
                "chains wait in the ring ({} used) and nothing will wake the worker",
                h.used_idx(used_addr)
            );
        }
    }
    for i in 0..5 {
        assert_eq!(h.byte(0x5000 + i), STATUS_OK);
    }
    assert_eq!(w.budget.in_flight(), (0, 0));
}

/// An engine that hands back each request before its next job of its own gets the worker
/// back at once, not through the event loop: the worker returns what finished and reaps
/// again, up to its bound of rounds in one turn; then the engine's completion descriptor
/// brings it back for the rest.
#[test]
fn finished_requests_go_back_before_the_engines_next_job_without_the_event_loop() {
    let h = Harness::new();
    let used_addr = queue_five_reads(&h);
    let io = FakeIo {
        one_per_poll: true,
        ..FakeIo::default()
    };
    let mut w = Worker::new(io, h.mem.clone());
    let vrings = std::slice::from_ref(&h.vring);
    w.process_queue(vrings, 0, true, &device());
    assert_eq!(h.used_idx(used_addr), 5, "every request in one turn");
    assert_eq!(w.io().signals, 0, "no trip through the event loop");
    for i in 0..5 {
        assert_eq!(h.byte(0x5000 + i), STATUS_OK);
    }

    // More jobs than rounds: the turn ends after the bound, the descriptor made readable.
    let h = Harness::new();
    let m = h.mem.memory();
    let requests = MAX_HAND_BACK_ROUNDS as u16 + 4;
    let mut descs = Vec::new();
    for i in 0..requests {
        let header = 0x1000 + 0x100 * u64::from(i);
        write_header(&m, header, VIRTIO_BLK_T_IN, u64::from(i));
        descs.push(desc(header, 16, false, Some(3 * i + 1)));
        descs.push(desc(0x8000, 4096, true, Some(3 * i + 2)));
        descs.push(desc(0x5000 + u64::from(i), 1, true, None));
    }
    let used_addr = h.queue(&descs);
    let io = FakeIo {
        one_per_poll: true,
        ..FakeIo::default()
    };
    let mut w = Worker::new(io, h.mem.clone());
    let vrings = std::slice::from_ref(&h.vring);
    w.process_queue(vrings, 0, true, &device());
    let first_turn = MAX_HAND_BACK_ROUNDS as u16 + 1;
    assert_eq!(h.used_idx(used_addr), first_turn);
    assert_eq!(w.io().signals, 1);
    w.process_completions(vrings, true, &device());
    assert_eq!(h.used_idx(used_addr), requests);
    assert_eq!(w.io().signals, 1);
}

#[test]
fn engine_failure_becomes_ioerr() {
    let h = Harness::new();
    let m = h.mem.memory();
    write_header(&m, 0x1000, VIRTIO_BLK_T_IN, 1);
    let descs = [
        desc(0x1000, 16, false, Some(1)),
        desc(0x8000, 512, true, Some(2)),
        desc(0x5000, 1, true, None),
    ];
    let used_addr = h.queue(&descs);
    let io = FakeIo {
        fail_offset: Some(512),
        ..FakeIo::default()
    };
    let mut w = Worker::new(io, h.mem.clone());
    w.process_queue(std::slice::from_ref(&h.vring), 0, true, &device());
    assert_eq!(h.used_idx(used_addr), 1);
    assert_eq!(h.used(used_addr, 0), (0, 1));
    assert_eq!(h.byte(0x5000), STATUS_IOERR);
}

/// A driver's available index more than the queue size ahead of the device's: with
/// EVENT_IDX the ring would go on saying it has chains that cannot be taken. The worker
/// returns to its loop (instead of spinning), takes nothing more from that ring, and
/// takes chains again once the queue was stopped and set up anew.
#[test]
fn a_broken_available_index_stops_the_queue_instead_of_spinning() {
    let h = Harness::new();
    let m = h.mem.memory();
    write_header(&m, 0x1000, VIRTIO_BLK_T_IN, 1);
    let descs = [
        desc(0x1000, 16, false, Some(1)),
        desc(0x8000, 512, true, Some(2)),
        desc(0x5000, 1, true, None),
    ];
    let used_addr = h.queue(&descs);
    let vrings = std::slice::from_ref(&h.vring);
    let mut w = Worker::new(FakeIo::default(), h.mem.clone());
    w.process_queue(vrings, 0, true, &device());
    assert_eq!(h.used_idx(used_addr), 1);
    let avail_idx = GuestAddress(h.vring.get_ref().get_queue().avail_ring() + 2);
    // One chain taken; the index now says QSIZE + 1 more.
    m.write_obj(2 + QSIZE, avail_idx).unwrap();
    w.process_queue(vrings, 0, true, &device());
    assert_ne!(w.broken & 1, 0);
    assert_eq!(h.used_idx(used_addr), 1);
    // A plausible index again: the queue still takes nothing until it is set up anew.
    m.write_obj(2u16, avail_idx).unwrap();
    w.process_queue(vrings, 0, true, &device());
    assert_eq!(h.used_idx(used_addr), 1);
    w.begin_stop(0);
    assert_eq!(
        w.finish_stops(vrings),
        1,
        "nothing in flight: the stop ends at once"
    );
    assert_eq!(w.broken, 0);
    w.process_queue(vrings, 0, true, &device());
    assert_eq!(h.used_idx(used_addr), 2);
}

#[test]
fn a_stop_ends_once_the_requests_in_flight_have_completed() {
    let h = Harness::new();
    let m = h.mem.memory();
    write_header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
    write_header(&m, 0x1100, VIRTIO_BLK_T_FLUSH, 0);
    let descs = [
        desc(0x1000, 16, false, Some(1)),
        desc(0x8000, 512, true, Some(2)),
        desc(0x5000, 1, true, None),
        desc(0x1100, 16, false, Some(4)),
        desc(0x5001, 1, true, None),
    ];
    let used_addr = h.queue(&descs);
    let io = FakeIo {
        hold: true,
        ..FakeIo::default()
    };
    let mut w = Worker::new(io, h.mem.clone());
    w.process_queue(std::slice::from_ref(&h.vring), 0, true, &device());
    assert_eq!(h.used_idx(used_addr), 0, "nothing finished yet");
    assert_eq!(w.queue_in_flight(0), 2);

    let vrings = std::slice::from_ref(&h.vring);
    w.begin_stop(0);
    assert!(w.stops_pending());
    assert_eq!(
        w.finish_stops(vrings),
        0,
        "requests in flight: the stop goes on"
    );
    assert_eq!(w.queue_in_flight(0), 2);
    // A kick meanwhile takes nothing more from a stopping queue once the frontend marked
    // it not ready; the engine completes the requests, and the stop ends with them.
    w.io_mut().hold = false;
    w.process_completions(vrings, true, &device());
    assert_eq!(w.finish_stops(vrings), 1);
    assert!(!w.stops_pending());
    assert_eq!(w.queue_in_flight(0), 0);
    assert_eq!(h.used_idx(used_addr), 2);
    assert_eq!(h.used(used_addr, 0), (0, 513));
    assert_eq!(h.used(used_addr, 1), (3, 1));
    assert_eq!(h.byte(0x5000), STATUS_OK);
    assert_eq!(h.byte(0x5001), STATUS_OK);
}

fn device_rw() -> DeviceInfo {
    DeviceInfo {
        read_only: false,
        ..device()
    }
}

/// Writes virtio_blk_discard_write_zeroes structs at `at`; returns their length.
fn write_segments(mem: &GuestMemoryMmap, at: u64, segs: &[(u64, u32, u32)]) -> u32 {
    for (i, &(sector, num, flags)) in segs.iter().enumerate() {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&num.to_le_bytes());
        raw[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(at + 16 * i as u64))
            .unwrap();
    }
    16 * segs.len() as u32
}

/// Queues five requests on the harness's ring: a write of 1024 bytes (0xab), a discard of
/// three 4 KiB ranges, a write-zeroes of 4 KiB, a flush, and a discard with the unmap flag
/// (UNSUPP); status bytes at 0x5000..0x5005 start as 0xee. Returns the used ring's address.
fn queue_mixed_requests(h: &Harness) -> u64 {
    let m = h.mem.memory();
    write_header(&m, 0x1000, VIRTIO_BLK_T_OUT, 2);
    m.write_slice(&[0xab; 1024], GuestAddress(0x8000)).unwrap();
    write_header(&m, 0x1100, VIRTIO_BLK_T_DISCARD, 0);
    let d = write_segments(&m, 0x6000, &[(0, 8, 0), (16, 8, 0), (64, 8, 0)]);
    write_header(&m, 0x1200, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let z = write_segments(&m, 0x6100, &[(8, 8, 1)]);
    write_header(&m, 0x1300, VIRTIO_BLK_T_FLUSH, 0);
    write_header(&m, 0x1400, VIRTIO_BLK_T_DISCARD, 0);
    let bad = write_segments(&m, 0x6200, &[(8, 8, 1)]);
    for status in 0x5000u64..0x5005 {
        m.write_obj(0xeeu8, GuestAddress(status)).unwrap();
    }
    let descs = [
        // 0..2: write of 1024 bytes: OK.
        desc(0x1000, 16, false, Some(1)),
        desc(0x8000, 1024, false, Some(2)),
        desc(0x5000, 1, true, None),
        // 3..5: discard of three 4 KiB ranges: OK.
        desc(0x1100, 16, false, Some(4)),
        desc(0x6000, d, false, Some(5)),
        desc(0x5001, 1, true, None),
        // 6..8: write zeroes, 4 KiB: OK.
        desc(0x1200, 16, false, Some(7)),
        desc(0x6100, z, false, Some(8)),
        desc(0x5002, 1, true, None),
        // 9..10: flush: OK.
        desc(0x1300, 16, false, Some(10)),
        desc(0x5003, 1, true, None),
        // 11..13: discard with unmap: UNSUPP, an error.
        desc(0x1400, 16, false, Some(12)),
        desc(0x6200, bad, false, Some(13)),
        desc(0x5004, 1, true, None),
    ];
    h.queue(&descs)
}

#[test]
fn writes_discards_write_zeroes_and_flushes_reach_the_engine() {
    let h = Harness::new();
    let used_addr = queue_mixed_requests(&h);
    let mut w = Worker::new(FakeIo::default(), h.mem.clone());
    w.process_queue(std::slice::from_ref(&h.vring), 0, true, &device_rw());

    let log = &w.io().log;
    let ops: Vec<&FakeOp> = log.iter().map(|(_, op)| op).collect();
    assert_eq!(
        ops,
        vec![
            &FakeOp::Write(1024, vec![0xab; 1024]),
            &FakeOp::Discard(0, 4096),
            &FakeOp::Discard(8192, 4096),
            &FakeOp::Discard(32768, 4096),
            &FakeOp::Zeroes(4096, 4096, true),
            &FakeOp::Flush,
        ]
    );
    // The segments of one chain share its token.
    assert_eq!(log[1].0, log[2].0);
    assert_eq!(log[2].0, log[3].0);
    assert_ne!(log[0].0, log[1].0);

    assert_eq!(h.used_idx(used_addr), 5);
    assert_eq!(h.used(used_addr, 0), (11, 1), "UNSUPP answered at once");
    assert_eq!(h.used(used_addr, 1), (0, 1));
    assert_eq!(h.used(used_addr, 2), (3, 1), "discard completed once");
    assert_eq!(h.used(used_addr, 3), (6, 1));
    assert_eq!(h.used(used_addr, 4), (9, 1));
    for status in 0x5000..0x5004 {
        assert_eq!(h.byte(status), STATUS_OK, "status at {status:#x}");
    }
    assert_eq!(h.byte(0x5004), STATUS_UNSUPP);
    assert_eq!(w.queue_in_flight(0), 0);
    assert_eq!(w.free.len(), w.slots.len());
}

#[test]
fn a_failed_segment_fails_the_whole_chain() {
    let h = Harness::new();
    let m = h.mem.memory();
    // 1: three segments, the second fails in the engine.
    write_header(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
    let a = write_segments(&m, 0x6000, &[(0, 8, 0), (16, 8, 0), (32, 8, 0)]);
    // 2: two segments, the second is refused at submission.
    write_header(&m, 0x1100, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let b = write_segments(&m, 0x6100, &[(100, 8, 0), (128, 8, 0)]);
    // 3: one segment, refused: answered at once.
    write_header(&m, 0x1200, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let c = write_segments(&m, 0x6200, &[(128, 8, 1)]);
    let descs = [
        desc(0x1000, 16, false, Some(1)),
        desc(0x6000, a, false, Some(2)),
        desc(0x5000, 1, true, None),
        desc(0x1100, 16, false, Some(4)),
        desc(0x6100, b, false, Some(5)),
        desc(0x5001, 1, true, None),
        desc(0x1200, 16, false, Some(7)),
        desc(0x6200, c, false, Some(8)),
        desc(0x5002, 1, true, None),
    ];
    let used_addr = h.queue(&descs);
    let io = FakeIo {
        fail_offset: Some(16 * 512),
        refuse_offset: Some(128 * 512),
        ..FakeIo::default()
    };
    let mut w = Worker::new(io, h.mem.clone());
    w.process_queue(std::slice::from_ref(&h.vring), 0, false, &device_rw());
    assert_eq!(w.io().log.len(), 4, "3 + 1 segments submitted");
    assert_eq!(h.used_idx(used_addr), 3);
    assert_eq!(h.used(used_addr, 0), (6, 1));
    assert_eq!(h.used(used_addr, 1), (0, 1));
    assert_eq!(h.used(used_addr, 2), (3, 1));
    for status in [0x5000, 0x5001, 0x5002] {
        assert_eq!(h.byte(status), STATUS_IOERR, "status at {status:#x}");
    }
    assert_eq!(w.queue_in_flight(0), 0);
    assert_eq!(w.free.len(), w.slots.len());
}

#[test]
fn writes_to_a_read_only_export_are_refused_before_the_engine() {
    let h = Harness::new();
    let m = h.mem.memory();
    write_header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
    write_header(&m, 0x1100, VIRTIO_BLK_T_DISCARD, 0);
    let d = write_segments(&m, 0x6000, &[(0, 8, 0)]);
    let descs = [
        desc(0x1000, 16, false, Some(1)),
        desc(0x8000, 512, false, Some(2)),
        desc(0x5000, 1, true, None),
        desc(0x1100, 16, false, Some(4)),
        desc(0x6000, d, false, Some(5)),
        desc(0x5001, 1, true, None),
    ];
    let used_addr = h.queue(&descs);
    let mut w = Worker::new(FakeIo::default(), h.mem.clone());
    w.process_queue(std::slice::from_ref(&h.vring), 0, false, &device());
    assert!(w.io().log.is_empty());
    assert_eq!(h.used_idx(used_addr), 2);
    assert_eq!(h.byte(0x5000), STATUS_IOERR);
    assert_eq!(h.byte(0x5001), STATUS_UNSUPP);
}

#[test]
fn finish_drains_then_flushes_once_and_drop_finishes_otherwise() {
    let h = Harness::new();
    let m = h.mem.memory();
    write_header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
    let descs = [
        desc(0x1000, 16, false, Some(1)),
        desc(0x8000, 512, false, Some(2)),
        desc(0x5000, 1, true, None),
    ];
    let used_addr = h.queue(&descs);
    let io = FakeIo {
        hold: true,
        ..FakeIo::default()
    };
    let finished = Arc::clone(&io.finished);
    let mut w = Worker::new(io, h.mem.clone());
    w.set_writethrough(true);
    assert_eq!(w.io().writethrough, Some(true));
    w.process_queue(std::slice::from_ref(&h.vring), 0, false, &device_rw());
    assert_eq!(w.io().in_flight(), 1);
    w.finish().unwrap();
    // Drained before the flush; the ring is left alone (the connection is gone).
    assert_eq!(*finished.lock().unwrap(), vec![0]);
    assert_eq!(h.used_idx(used_addr), 0);
    drop(w);
    assert_eq!(finished.lock().unwrap().len(), 1, "not finished twice");

    // Dropped without `finish`: the drop finishes it.
    let io = FakeIo::default();
    let finished = Arc::clone(&io.finished);
    drop(Worker::new(io, h.mem.clone()));
    assert_eq!(*finished.lock().unwrap(), vec![0]);
}

mod metrics;
mod reconnect;

/// The frontend adds a memory region and, once answered, the driver makes a read into it
/// available, while the worker holds a view of guest memory taken before the region was
/// added (it was in the middle of a round): the chain is read through a fresh view and the
/// read goes to the engine, not back as lying outside guest memory.
#[test]
fn chains_are_read_through_a_view_no_older_than_the_index_that_showed_them() {
    let h = Harness::new();
    let mut w = Worker::new(FakeIo::default(), h.mem.clone());
    let stale = h.mem.memory().into_inner();
    // The new region, after the first one's MiB; the table shares the first region.
    let added = Arc::new(
        vm_memory::GuestRegionMmap::from_range(GuestAddress(0x10_0000), 0x1_0000, None).unwrap(),
    );
    let table = h.mem.memory().insert_region(added).unwrap();
    h.mem.lock().unwrap().replace(table);
    let m = h.mem.memory();
    write_header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
    let descs = [
        desc(0x1000, 16, false, Some(1)),
        desc(0x10_0000, 512, true, Some(2)),
        desc(0x10_0200, 1, true, None),
    ];
    let used_addr = h.queue(&descs);
    assert!(
        !vm_memory::GuestMemoryBackend::address_in_range(&*stale, GuestAddress(0x10_0000)),
        "the old view lacks the region"
    );

    let mut mem = stale;
    let taken = w.pop_requests(&h.vring, 0, &mut mem, &device());
    assert_eq!(taken, 1);
    assert_eq!(
        w.io().log.len(),
        1,
        "the read reached the engine (the old view would have answered it with IOERR)"
    );
    assert!(vm_memory::GuestMemoryBackend::address_in_range(
        &*mem,
        GuestAddress(0x10_0000)
    ));
    // It completes into the new region.
    w.process_queue(std::slice::from_ref(&h.vring), 0, false, &device());
    assert_eq!(h.used_idx(used_addr), 1);
    assert_eq!(h.byte(0x10_0200), STATUS_OK);
    assert_eq!(h.byte(0x10_0000 + 7), pattern(7));
}
