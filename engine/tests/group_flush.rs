//! Flushes of several shards of one writable image never wait for something no shard will
//! do: a right held by a shard nobody polls any more, or an answer from a shard that is gone.
//! Each scenario runs on a thread of its own and fails after a minute instead of hanging.

use qcow2d_engine::{Completion, Image, OpenOptions, Shard, ShardConfig};
use qcow2d_tests::{assert_clean_and_equal, create_qcow2_in, Rng};
use std::path::Path;
use std::time::Duration;

/// Runs `f` on a thread and fails if it has not returned within a minute.
fn within_a_minute(what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => worker.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // The thread panicked: show its message.
            if let Err(p) = worker.join() {
                std::panic::resume_unwind(p);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: still waiting after a minute")
        }
    }
}

fn open_two(path: &Path) -> (Image, Vec<Shard>) {
    let opts = OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    };
    let image = Image::open(path, &opts).unwrap();
    let shards = image.new_shards(&ShardConfig::default(), 2).unwrap();
    (image, shards)
}

/// Polls every shard until none reports anything in flight, the way a single thread that
/// drives all the shards of a connection settles them before flushing each in turn.
fn settle(shards: &mut [Shard], out: &mut Vec<Completion>) {
    while shards.iter().any(|s| s.in_flight() > 0) {
        for s in shards.iter_mut() {
            s.poll(out);
        }
        std::thread::yield_now();
    }
}

/// Random batches of writes, discards and group flushes over two shards of a 512-byte-cluster
/// image (the pattern the fuzzer found hanging), each batch followed by the teardown of a
/// connection: settle both shards from one thread, then flush each alone in turn. A shard
/// whose requests were done could still hold the right to write refcount blocks (its durable
/// refcount writes, written after a reservation and carrying blocks other shards dirtied, in
/// the kernel): the flush of the other then waited for a shard nobody polled.
#[test]
fn teardown_flushes_of_each_shard_in_turn_always_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = create_qcow2_in(dir.path(), "a.qcow2", "cluster_size=512", "2M");
    let check_path = path.clone();
    let model = within_a_minute_model(move || {
        let (image, mut shards) = open_two(&path);
        let sectors = 4096u64;
        let mut model = vec![0u8; (sectors * 512) as usize];
        let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
        let mut next = move |n: u64| rng.below(n);
        let mut out = Vec::new();
        for batch in 0..60u64 {
            let mut bufs = Vec::new();
            let mut taken: Vec<(u64, u64)> = Vec::new();
            for i in 0..next(4) + 1 {
                let start = next(sectors);
                let count = (next(256) + 1).min(sectors - start);
                let (off, len) = (start * 512, count * 512);
                if taken.iter().any(|&(o, l)| off < o + l && o < off + len) {
                    continue;
                }
                taken.push((off, len));
                let s = next(2) as usize;
                if next(4) == 0 {
                    shards[s].submit_discard(i, off, len).unwrap();
                    // No backing file: a discarded range reads as zeros.
                    model[off as usize..(off + len) as usize].fill(0);
                } else {
                    let fill = (batch * 7 + i) as u8 | 1;
                    let mut buf = vec![fill; len as usize];
                    let iov = [libc::iovec {
                        iov_base: buf.as_mut_ptr().cast(),
                        iov_len: buf.len(),
                    }];
                    // SAFETY: `buf` is kept in `bufs` until the batch is settled below.
                    unsafe { shards[s].submit_write(i, off, &iov) }.unwrap();
                    model[off as usize..(off + len) as usize].fill(fill);
                    bufs.push(buf);
                }
            }
            if next(2) == 0 {
                let s = next(2) as usize;
                shards[s].submit_flush(100).unwrap();
            }
            settle(&mut shards, &mut out);
            assert!(out.drain(..).all(|c| c.result.is_ok()), "batch {batch}");
            for s in shards.iter_mut() {
                s.flush_blocking().unwrap();
            }
        }
        for s in &mut shards {
            s.release_reserved();
        }
        drop(shards);
        image.close().unwrap();
        model
    });
    assert_clean_and_equal(&check_path, &model, dir.path());
}

fn within_a_minute_model(f: impl FnOnce() -> Vec<u8> + Send + 'static) -> Vec<u8> {
    let slot = std::sync::Arc::new(std::sync::Mutex::new(None));
    let put = std::sync::Arc::clone(&slot);
    within_a_minute("the flushes", move || {
        *put.lock().unwrap() = Some(f());
    });
    let model = slot.lock().unwrap().take();
    model.expect("the scenario returned its model")
}

/// A shard of the group is dropped; the other then flushes and writes into a table the gone
/// shard owned. Nobody serves that shard's part any more: the flush and the write fail with
/// an error (what the gone shard held is not durable), they do not wait forever.
#[test]
fn a_flush_sent_to_a_dropped_shard_fails_instead_of_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let path = create_qcow2_in(dir.path(), "a.qcow2", "cluster_size=512", "8M");
    within_a_minute("a flush to a dropped shard", move || {
        let (image, mut shards) = open_two(&path);
        let mut second = shards.pop().unwrap();
        second.flush_blocking().unwrap();
        second.release_reserved();
        drop(second);
        let first = &mut shards[0];
        first.submit_flush(1).unwrap();
        let mut buf = vec![7u8; 4096];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // Table 1 (guest bytes 32 KiB..64 KiB) belonged to the dropped shard.
        // SAFETY: `buf` lives until the request completes in the loop below.
        unsafe { first.submit_write(2, 32 << 10, &iov) }.unwrap();
        let mut out = Vec::new();
        while first.in_flight() > 0 {
            first.wait(&mut out);
        }
        out.sort_by_key(|c| c.token);
        let tokens: Vec<u64> = out.iter().map(|c| c.token).collect();
        assert_eq!(tokens, [1, 2]);
        assert!(out.iter().all(|c| c.result.is_err()), "{out:?}");
        first.flush_blocking().unwrap();
        first.release_reserved();
        drop(shards);
        image.close().unwrap();
    });
}
