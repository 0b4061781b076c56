//! What the worker records into its shard metrics.

use super::*;

fn metrics() -> (Metrics, Arc<ShardMetrics>) {
    let metrics = Metrics::new();
    let export = metrics.add_export(
        ExportLabels {
            export: "/run/test.sock".into(),
            image: "test.qcow2".into(),
            serial: "test".into(),
            read_only: false,
        },
        1,
    );
    let shard = export.shard(0).unwrap();
    (metrics, shard)
}

fn export_snapshot(metrics: &Metrics) -> ExportSnapshot {
    metrics.snapshot().exports.remove(0)
}

fn op(snap: &ExportSnapshot, op: Operation) -> &OpSnapshot {
    &snap.ops[op as usize]
}

#[test]
fn metrics_count_every_request_returned_to_the_guest() {
    let h = Harness::new();
    let used_addr = queue_mixed_requests(&h);
    let (metrics, shard) = metrics();
    let io = FakeIo {
        cache: CacheStats {
            l2_hits: 7,
            l2_misses: 2,
            decompressed_hits: 1,
            decompressed_misses: 3,
        },
        ..FakeIo::default()
    };
    let mut w = Worker::new(io, h.mem.clone()).with_metrics(Some(shard));
    w.process_queue(std::slice::from_ref(&h.vring), 0, true, &device_rw());
    assert_eq!(h.used_idx(used_addr), 5);

    // More than one queue of 16 descriptors holds.
    let h = Harness::new();
    let m = h.mem.memory();
    write_header(&m, 0x1500, VIRTIO_BLK_T_GET_ID, 0);
    write_header(&m, 0x1600, 77, 0);
    write_header(&m, 0x1700, VIRTIO_BLK_T_IN, 4);
    let descs = [
        // 0..2: GET_ID: 20 bytes.
        desc(0x1500, 16, false, Some(1)),
        desc(0x9000, 32, true, Some(2)),
        desc(0x5005, 1, true, None),
        // 3..4: unknown type: UNSUPP, "other".
        desc(0x1600, 16, false, Some(4)),
        desc(0x5006, 1, true, None),
        // 5..7: read of 2048 bytes: OK.
        desc(0x1700, 16, false, Some(6)),
        desc(0xa000, 2048, true, Some(7)),
        desc(0x5007, 1, true, None),
        // 8..10: read into memory the guest does not have: IOERR.
        desc(0x1700, 16, false, Some(9)),
        desc(0x4000_0000, 512, true, Some(10)),
        desc(0x5008, 1, true, None),
        // 11: no status byte: dropped, "other", an error.
        desc(0x1700, 16, false, None),
    ];
    let used_addr = h.queue(&descs);
    w.set_memory(h.mem.clone());
    w.process_queue(std::slice::from_ref(&h.vring), 0, true, &device_rw());
    assert_eq!(h.used_idx(used_addr), 5);

    let snap = export_snapshot(&metrics);
    let expect = [
        // (operation, requests, bytes, errors)
        (Operation::Read, 2, 2048, 1),
        (Operation::Write, 1, 1024, 0),
        (Operation::Flush, 1, 0, 0),
        (Operation::Discard, 2, 3 * 4096, 1),
        (Operation::WriteZeroes, 1, 4096, 0),
        (Operation::GetId, 1, 20, 0),
        (Operation::Other, 2, 0, 2),
    ];
    for (o, requests, bytes, errors) in expect {
        let s = op(&snap, o);
        assert_eq!(
            (s.requests(), s.bytes, s.errors),
            (requests, bytes, errors),
            "{o:?}"
        );
        assert!(s.quantiles.is_some(), "{o:?}");
        assert!(s.duration_seconds > 0.0, "{o:?}");
    }
    assert_eq!(snap.shards[0].in_flight, 0);
    assert_eq!(snap.shards[0].cache, w.io().cache);

    // Held requests are in flight until they complete; cache counters only grow by what
    // the engine counted since the last turn.
    let h2 = Harness::new();
    let m2 = h2.mem.memory();
    write_header(&m2, 0x1000, VIRTIO_BLK_T_IN, 0);
    write_header(&m2, 0x1100, VIRTIO_BLK_T_FLUSH, 0);
    let used_addr = h2.queue(&[
        desc(0x1000, 16, false, Some(1)),
        desc(0x8000, 4096, true, Some(2)),
        desc(0x5000, 1, true, None),
        desc(0x1100, 16, false, Some(4)),
        desc(0x5001, 1, true, None),
    ]);
    w.set_memory(h2.mem.clone());
    w.io.hold = true;
    w.io.cache.l2_hits += 5;
    w.process_queue(std::slice::from_ref(&h2.vring), 0, true, &device_rw());
    let snap = export_snapshot(&metrics);
    assert_eq!(snap.shards[0].in_flight, 2);
    assert_eq!(snap.shards[0].cache.l2_hits, 12);
    assert_eq!(
        op(&snap, Operation::Read).requests(),
        2,
        "not counted before it completes"
    );
    w.io.hold = false;
    w.process_completions(std::slice::from_ref(&h2.vring), true, &device_rw());
    assert_eq!(h2.used_idx(used_addr), 2);
    let snap = export_snapshot(&metrics);
    assert_eq!(snap.shards[0].in_flight, 0);
    assert_eq!(op(&snap, Operation::Read).requests(), 3);
    assert_eq!(op(&snap, Operation::Read).bytes, 2048 + 4096);
    assert_eq!(op(&snap, Operation::Flush).requests(), 2);
    let [p50, p99, p999] = op(&snap, Operation::Read).quantiles.unwrap();
    assert!(p50 <= p99 && p99 <= p999);

    // A request still in flight when the connection ends is never returned, never
    // counted, and no longer in flight.
    let h3 = Harness::new();
    let m3 = h3.mem.memory();
    write_header(&m3, 0x1000, VIRTIO_BLK_T_IN, 0);
    h3.queue(&[
        desc(0x1000, 16, false, Some(1)),
        desc(0x8000, 512, true, Some(2)),
        desc(0x5000, 1, true, None),
    ]);
    w.set_memory(h3.mem.clone());
    w.io.hold = true;
    w.process_queue(std::slice::from_ref(&h3.vring), 0, true, &device_rw());
    assert_eq!(export_snapshot(&metrics).shards[0].in_flight, 1);
    w.finish().unwrap();
    let snap = export_snapshot(&metrics);
    assert_eq!(snap.shards[0].in_flight, 0);
    assert_eq!(op(&snap, Operation::Read).requests(), 3);
}

#[test]
fn without_metrics_nothing_is_timed() {
    let h = Harness::new();
    let m = h.mem.memory();
    write_header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
    h.queue(&[
        desc(0x1000, 16, false, Some(1)),
        desc(0x8000, 512, true, Some(2)),
        desc(0x5000, 1, true, None),
    ]);
    let mut w = Worker::new(
        FakeIo {
            hold: true,
            ..FakeIo::default()
        },
        h.mem.clone(),
    );
    w.process_queue(std::slice::from_ref(&h.vring), 0, true, &device());
    assert!(w.slots.iter().all(|s| s.started.is_none()));
    w.io_mut().hold = false;
    w.quiesce();
    assert_eq!(w.drain_step(), (0, true, 0));
}
