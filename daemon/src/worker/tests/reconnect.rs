//! Chains left in flight by a connection that ended, taken up again by the next one.

use super::*;

/// A vring of a new connection over the rings of `vq`, as the frontend handler sets it up:
/// SET_VRING_BASE to `base` and the used index read from guest memory.
fn reconnected_vring(
    mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    base: u16,
) -> Vring {
    let vring = Vring::new(mem.clone(), QSIZE).unwrap();
    vring
        .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
        .unwrap();
    vring.set_queue_size(QSIZE);
    vring.set_queue_next_avail(base);
    let used = vring.queue_used_idx().unwrap();
    vring.set_queue_next_used(used);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    vring
}

#[test]
fn chains_left_in_flight_by_a_killed_worker_are_resubmitted_in_order() {
    use crate::inflight::{create_area, InflightArea, InflightShared};

    let mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
    );
    let m = mem.memory();
    let vq = MockSplitQueue::new(&*m, QSIZE);
    // Four reads of one sector each (sectors 1..=4), heads 0, 3, 6, 9.
    let mut descs = Vec::new();
    for i in 0..4u64 {
        write_header(&m, 0x1000 + 0x100 * i, VIRTIO_BLK_T_IN, 1 + i);
        let next = 3 * i as u16;
        descs.push(desc(0x1000 + 0x100 * i, 16, false, Some(next + 1)));
        descs.push(desc(0x8000 + 0x1000 * i, 512, true, Some(next + 2)));
        descs.push(desc(0x5000 + i, 1, true, None));
    }
    vq.add_desc_chains(&descs, 0).unwrap();
    // The driver has made only the first three available so far.
    let avail_idx = vq.avail_addr().unchecked_add(2);
    m.write_obj(3u16, avail_idx).unwrap();

    let (file, size) = create_area(1, QSIZE).unwrap();
    let area = || InflightArea::map(file.try_clone().unwrap(), 0, size, 1, QSIZE).unwrap();

    // First daemon: takes the three chains, completes the second, and is killed.
    let shared = Arc::new(InflightShared::default());
    shared.set(area());
    let vring = reconnected_vring(&mem, &vq, 0);
    let io = FakeIo {
        hold: true,
        ..FakeIo::default()
    };
    let mut w = Worker::new(io, mem.clone()).with_inflight(shared, 0, 1);
    w.process_queue(std::slice::from_ref(&vring), 0, false, &device());
    assert_eq!(w.io().log.len(), 3);
    let token_of_head_3 = w.slots.iter().position(|s| s.head == 3).unwrap() as u64;
    w.io.pending.retain(|(t, _)| *t != token_of_head_3);
    w.complete(std::slice::from_ref(&vring), token_of_head_3, true);
    let used_at = vq.used_addr().0;
    let used_idx = |m: &GuestMemoryMmap| m.read_obj::<u16>(GuestAddress(used_at + 2)).unwrap();
    assert_eq!(used_idx(&m), 1);
    // Killed: what is still in flight never reaches the used ring.
    w.finish().unwrap();
    drop(w);
    assert_eq!(used_idx(&m), 1);

    // Meanwhile the driver adds the fourth chain; QEMU reconnects and sets the ring base to
    // the used index (it could not get the avail index from the dead daemon).
    m.write_obj(4u16, avail_idx).unwrap();
    let shared = Arc::new(InflightShared::default());
    shared.set(area());
    let vring = reconnected_vring(&mem, &vq, 1);
    let mut w = Worker::new(FakeIo::default(), mem.clone()).with_inflight(shared.clone(), 0, 1);
    w.process_queue(std::slice::from_ref(&vring), 0, false, &device());

    // Heads 0 and 6 resubmitted, oldest first, then head 9 taken; head 3 not redone.
    let offsets: Vec<Option<u64>> = w.io().log.iter().map(|(_, op)| op.offset()).collect();
    assert_eq!(offsets, vec![Some(512), Some(3 * 512), Some(4 * 512)]);
    assert_eq!(used_idx(&m), 4);
    let used: Vec<u32> = (1..4)
        .map(|i| {
            m.read_obj::<u32>(GuestAddress(used_at + 4 + 8 * i))
                .unwrap()
        })
        .collect();
    assert_eq!(used, vec![0, 6, 9]);
    for (i, sector) in [(0u64, 1u64), (2, 3), (3, 4)] {
        let at = GuestAddress(0x8000 + 0x1000 * i);
        assert_eq!(m.read_obj::<u8>(at).unwrap(), pattern(sector * 512));
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x5000 + i)).unwrap(),
            STATUS_OK
        );
    }
    // The area is clean again, and records the used index.
    let (_, area) = shared.current();
    let area = area.unwrap();
    let part = area.queue(0).unwrap();
    assert!((0..QSIZE).all(|h| !part.is_inflight(h)));
    assert_eq!(part.used_idx(), 4);
    assert_eq!(part.last_batch_head(), 9);
    assert_eq!(vring.queue_next_avail(), 4);
}

#[test]
fn a_malformed_chain_from_the_area_fails_with_ioerr_and_is_returned() {
    use crate::inflight::{create_area, InflightArea, InflightShared, QueueTracker};

    let h = Harness::new();
    let m = h.mem.memory();
    write_header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
    // A read that would be well formed but for its status descriptor's `next`, which
    // points outside the table: only the walker's error keeps it from being served (the
    // walk stops on the status descriptor, so there is a status byte to fail).
    let used_at = h.queue(&[
        desc(0x1000, 16, false, Some(1)),
        desc(0x8000, 512, true, Some(2)),
        desc(0x5000, 1, true, Some(QSIZE)),
    ]);
    m.write_obj(0xeeu8, GuestAddress(0x5000)).unwrap();
    let (file, size) = create_area(1, QSIZE).unwrap();
    let area = Arc::new(InflightArea::map(file.try_clone().unwrap(), 0, size, 1, QSIZE).unwrap());
    // A previous daemon took head 0.
    let mut t = QueueTracker::new(area.clone(), 0).unwrap();
    t.recover(0, QSIZE);
    t.taken(0);
    let shared = Arc::new(InflightShared::default());
    shared.set(InflightArea::map(file, 0, size, 1, QSIZE).unwrap());
    let mut w = Worker::new(FakeIo::default(), h.mem.clone()).with_inflight(shared, 0, 1);
    w.process_queue(std::slice::from_ref(&h.vring), 0, false, &device());
    assert!(w.io().log.is_empty(), "nothing submitted");
    assert_eq!(h.used_idx(used_at), 1);
    assert_eq!(h.used(used_at, 0), (0, 1));
    assert_eq!(h.byte(0x5000), STATUS_IOERR);
    assert!(!area.queue(0).unwrap().is_inflight(0));
}

#[test]
fn an_area_that_does_not_match_the_ring_is_started_over() {
    use crate::inflight::{create_area, InflightArea, InflightShared, QueueTracker};

    let h = Harness::new();
    let m = h.mem.memory();
    write_header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
    let used_at = h.queue(&[
        desc(0x1000, 16, false, Some(1)),
        desc(0x8000, 512, true, Some(2)),
        desc(0x5000, 1, true, None),
    ]);
    let (file, size) = create_area(1, QSIZE).unwrap();
    let area = Arc::new(InflightArea::map(file.try_clone().unwrap(), 0, size, 1, QSIZE).unwrap());
    // The area claims two chains in flight; the driver made one available.
    let mut t = QueueTracker::new(area.clone(), 0).unwrap();
    t.recover(0, QSIZE);
    t.taken(4);
    t.taken(7);
    let shared = Arc::new(InflightShared::default());
    shared.set(InflightArea::map(file, 0, size, 1, QSIZE).unwrap());
    let mut w = Worker::new(FakeIo::default(), h.mem.clone()).with_inflight(shared, 0, 1);
    w.process_queue(std::slice::from_ref(&h.vring), 0, false, &device());
    // Only the available chain was read, once.
    assert_eq!(w.io().log.len(), 1);
    assert_eq!(h.used_idx(used_at), 1);
    assert_eq!(h.used(used_at, 0), (0, 513));
    let part = area.queue(0).unwrap();
    assert!((0..QSIZE).all(|head| !part.is_inflight(head)));
    assert_eq!(part.used_idx(), 1);
}
