//! A host cluster is freed only when no data operation in flight still targets it: an
//! in-place write still in the kernel (slow, with O_DIRECT) when a discard of its cluster and
//! a flush make the cluster free must not land on whatever the cluster is given to next.
//! The engine's test hook holds the write back, so the interleaving is forced, not hoped for.

use qcow2d_engine::{Completion, Image, OpenOptions, Shard, ShardConfig};
use qcow2d_tests::{assert_clean_and_equal, create_qcow2_in, oracle, qemu_io_cmd, run_ok};
use std::time::{Duration, Instant};

/// Polls `shard` until the request `token` has completed, collecting completions in `out`.
fn poll_until(shard: &mut Shard, out: &mut Vec<Completion>, token: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !out.iter().any(|c| c.token == token) {
        assert!(
            Instant::now() < deadline,
            "request {token} did not complete: {out:?}"
        );
        shard.poll(out);
        std::thread::sleep(Duration::from_millis(1));
    }
    let c = out.iter().find(|c| c.token == token).unwrap();
    assert_eq!(c.result, Ok(()), "request {token}");
}

fn iov(b: &[u8]) -> [libc::iovec; 1] {
    [libc::iovec {
        iov_base: b.as_ptr() as *mut libc::c_void,
        iov_len: b.len(),
    }]
}

#[test]
fn a_cluster_discarded_under_a_write_in_flight_is_not_reused_before_the_write_completes() {
    // 4 KiB clusters, an L2 table maps 2 MiB. The next allocation after the free: a data
    // cluster of the same L2 table, or a new L2 table and its data.
    for next_at in [1u64 << 20, 32 << 20] {
        discard_under_a_slow_write(next_at);
    }
}

fn discard_under_a_slow_write(next_at: u64) {
    let dir = tempfile::tempdir().unwrap();
    let p = create_qcow2_in(dir.path(), "f.qcow2", "cluster_size=4096", "64M");
    run_ok(qemu_io_cmd().args(["-c", "write -P 0xa5 0 4k"]).arg(&p));
    let mut model = oracle(&p);
    let img = Image::open(
        &p,
        &OpenOptions {
            read_only: false,
            direct: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut shard = img
        .new_shard(&ShardConfig {
            hold_data_writes: true,
            ..Default::default()
        })
        .unwrap();
    let mut out = Vec::new();
    let slow = vec![0x11u8; 4096];
    let next = vec![0x22u8; 4096];
    // An in-place write of guest cluster 0, still "in the kernel".
    // SAFETY: both buffers outlive the requests: every request completes below.
    unsafe { shard.submit_write(1, 0, &iov(&slow)).unwrap() };
    shard.poll(&mut out);
    assert!(out.is_empty());
    // Its cluster is discarded and the discard made durable: the cluster is due to be freed.
    shard.submit_discard(2, 0, 4096).unwrap();
    poll_until(&mut shard, &mut out, 2);
    shard.submit_flush(3).unwrap();
    poll_until(&mut shard, &mut out, 3);
    // The next allocation (the first reservation of this shard, which starts at the lowest
    // free cluster) must not be given that cluster while the write is in flight.
    // SAFETY: as above.
    unsafe { shard.submit_write(4, next_at, &iov(&next)).unwrap() };
    poll_until(&mut shard, &mut out, 4);
    // The slow write lands now.
    shard.release_held_writes();
    poll_until(&mut shard, &mut out, 1);
    // What the file holds now, before a flush could write a reused table again: QEMU (not
    // taking the image's locks) reads the new data where it belongs.
    let read = qemu_io_cmd()
        .args(["-U", "-r", "-c", &format!("read -P 0x22 {next_at} 4k")])
        .arg(&p)
        .output()
        .expect("cannot run qemu-io (is qemu-utils installed?)");
    let text =
        String::from_utf8_lossy(&read.stdout).into_owned() + &String::from_utf8_lossy(&read.stderr);
    assert!(
        read.status.success() && !text.contains("verification failed") && !text.contains("error"),
        "next_at {next_at:#x}: {text}"
    );
    shard.submit_flush(5).unwrap();
    poll_until(&mut shard, &mut out, 5);
    shard.release_reserved();
    drop(shard);
    img.close().unwrap();
    drop(img);

    model[..4096].fill(0);
    let at = next_at as usize;
    model[at..at + 4096].copy_from_slice(&next);
    // No leak either: the cluster was freed once the write completed.
    assert_clean_and_equal(&p, &model, dir.path());
}
