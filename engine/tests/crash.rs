//! Crash tests: a child process writes through the engine and is killed with SIGKILL at a
//! random moment; the image must then pass `qemu-img check` with no corruption (leaks are
//! allowed), and every write acknowledged before the last completed flush must read back.
//!
//! The child (this test binary re-executed with `QCOW2D_CRASH_CHILD` set) runs a
//! deterministic sequence of batches derived from a seed. Before submitting batch `k` it
//! appends `S k` to a log, and after a flush that covers batches `<= k` completes it appends
//! `F k`. The parent replays the same sequence: bytes written by batches up to the last `F` must
//! match, bytes that later (possibly partly applied) batches touched are not judged.

use qcow2d_engine::{Image, OpenOptions, ShardConfig};
use qcow2d_tests::{create_qcow2, qemu_img_cmd, Rng};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SIZE: u64 = 32 << 20;
const BATCHES: u64 = 100_000;

/// One write of the sequence: offset, length and fill byte, derived from (seed, batch, i).
fn batch(seed: u64, k: u64) -> Vec<(u64, u64, u8)> {
    let mut rng = Rng::new(seed ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let n = rng.next_u64() % 8 + 1;
    let mut out: Vec<(u64, u64, u8)> = Vec::new();
    for _ in 0..n {
        let len = (rng.next_u64() % 64 + 1) * 512;
        let off = (rng.next_u64() % ((SIZE - len) / 512)) * 512;
        if out.iter().any(|&(o, l, _)| off < o + l && o < off + len) {
            continue;
        }
        out.push((off, len, (rng.next_u64() % 255 + 1) as u8));
    }
    out
}

/// The child: writes batches forever (until killed), flushing every few batches.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var("QCOW2D_CRASH_CHILD") else {
        return;
    };
    let mut it = spec.split(',');
    let image = it.next().unwrap().to_owned();
    let log_path = it.next().unwrap().to_owned();
    let seed: u64 = it.next().unwrap().parse().unwrap();
    let img = Image::open(
        &image,
        &OpenOptions {
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap();
    let mut shard = img.new_shard(&ShardConfig::default()).unwrap();
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log_path)
        .unwrap();
    let mut out = Vec::new();
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    for k in 0..BATCHES {
        writeln!(log, "S {k}").unwrap();
        bufs.clear();
        for (i, &(off, len, fill)) in batch(seed, k).iter().enumerate() {
            bufs.push(vec![fill; len as usize]);
            let b = bufs.last_mut().unwrap();
            let iov = [libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            }];
            // SAFETY: `bufs` keeps the buffer alive until the batch is drained below.
            unsafe { shard.submit_write(k * 100 + i as u64, off, &iov).unwrap() };
        }
        shard.drain(&mut out);
        assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
        out.clear();
        if k % 4 == 3 {
            shard.submit_flush(u64::MAX).unwrap();
            shard.drain(&mut out);
            assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
            out.clear();
            writeln!(log, "F {k}").unwrap();
        }
    }
}

fn check_image(image: &Path) -> serde_json::Value {
    // The killed writer's image locks can outlive it for a moment, while the kernel tears
    // down its io_uring: retry a lock refusal for a few seconds.
    let deadline = Instant::now() + Duration::from_secs(5);
    let out = loop {
        let out = qemu_img_cmd()
            .args(["check", "--output=json", image.to_str().unwrap()])
            .output()
            .expect("qemu-img must be installed");
        let locked = String::from_utf8_lossy(&out.stderr).contains("lock");
        if out.status.code() == Some(1) && locked && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        break out;
    };
    // Exit status 3 means leaks only, which a crash may leave.
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "qemu-img check failed ({code}): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn one_crash(dir: &Path, round: u64) {
    let image = dir.join(format!("crash{round}.qcow2"));
    let log = dir.join(format!("crash{round}.log"));
    create_qcow2(&image, SIZE, "");
    let seed = 0x5eed_0000 + round;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(
            "QCOW2D_CRASH_CHILD",
            format!("{},{},{seed}", image.display(), log.display()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Let it run a random while (20..400 ms), then kill it hard.
    let wait = Duration::from_millis(20 + (Rng::new(seed).next_u64() % 380));
    let start = Instant::now();
    while start.elapsed() < wait {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the crash child exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let v = check_image(&image);
    assert_eq!(
        v.get("corruptions").and_then(|x| x.as_u64()).unwrap_or(0),
        0,
        "round {round}: corruption after a crash: {v}"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut last_flushed: Option<u64> = None;
    let mut last_started: Option<u64> = None;
    for line in text.lines() {
        let mut w = line.split(' ');
        match (w.next(), w.next().and_then(|n| n.parse::<u64>().ok())) {
            (Some("F"), Some(k)) => last_flushed = Some(k),
            (Some("S"), Some(k)) => last_started = Some(k),
            _ => {}
        }
    }
    let Some(flushed) = last_flushed else {
        return; // Killed before the first flush completed: only consistency is judged.
    };
    let started = last_started.unwrap_or(flushed);
    // Model of the disk after every batch up to the flushed one, and which bytes later batches
    // may have touched.
    let mut model = vec![0u8; SIZE as usize];
    let mut unknown = vec![false; SIZE as usize];
    for k in 0..=started {
        for (off, len, fill) in batch(seed, k) {
            let r = off as usize..(off + len) as usize;
            if k <= flushed {
                model[r].fill(fill);
            } else {
                unknown[r].fill(true);
            }
        }
    }
    let img = Image::open(&image, &OpenOptions::default()).unwrap();
    let mut disk = vec![0u8; SIZE as usize];
    img.read_at(&mut disk, 0).unwrap();
    for i in 0..SIZE as usize {
        if !unknown[i] && disk[i] != model[i] {
            panic!(
                "round {round}: byte {i:#x} is {} but {} was written and flushed (flushed up to batch {flushed}, started {started})",
                disk[i], model[i]
            );
        }
    }
}

#[test]
fn killed_writer_leaves_a_consistent_image() {
    if std::env::var("QCOW2D_CRASH_CHILD").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rounds: u64 = std::env::var("QCOW2D_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    for round in 0..rounds {
        one_crash(dir.path(), round);
    }
}
