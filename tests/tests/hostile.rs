//! A hostile guest and a hostile frontend against a daemon serving two exports: what one
//! connection does must not take the daemon down, nor stop the other export.
//!
//! - A guest that fills its queues with the largest reads it can build (indirect tables of
//!   many buffers over the same guest memory) of a compressed image: requests beyond the
//!   advertised SEG_MAX/SIZE_MAX fail with VIRTIO_BLK_S_IOERR, legal ones are served, the
//!   daemon's own memory stays within its budget and falls back once the guest leaves, and
//!   the other export answers meanwhile.
//! - A frontend whose memory table lies about its file, whose rings lie outside its memory,
//!   that truncates its memory with requests in flight (sealed: it cannot; unsealable: the
//!   daemon reads zeros there), whose available index runs past its ring, or whose call or
//!   kick descriptor is a pipe: the daemon survives, the attacked connection fails cleanly,
//!   both exports keep answering and the attacked one takes the next connection.
//!
//! The daemon is the real binary (`QCOW2D_BIN` or target/debug/qcow2d); the frontend is
//! `qcow2d_tests::frontend`.

use qcow2d_tests::frontend::{rss_kib, GuestRam, RawFrontend, T_IN};
use qcow2d_tests::*;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Bytes of compressed data at the start of the disk.
const DATA_BYTES: usize = 128 << 20;
/// The disk's virtual size.
const DISK_BYTES: u64 = 1 << 30;
/// Guest memory of the hostile frontend, and where its data buffer lies (the upper 2 MiB).
const RAM_BYTES: usize = 4 << 20;
const BUFFER: u64 = 2 << 20;
/// Reads in flight at once: 32 on each of two queues.
const QUEUES: usize = 2;
const PER_QUEUE: u16 = 32;
/// Shards of the daemon (worker threads per export).
const SHARDS: u64 = 2;
/// The memory budget the daemon's own memory (RssAnon) must stay within while attacked: 64 MiB
/// plus, per shard, the decompressed-cluster cache (16 MiB), the compressed-read scratch
/// limit (16 MiB) and the L2 cache (128 KiB covers this disk).
const BUDGET_KIB: u64 = (64 << 10) + SHARDS * ((16 << 10) + (16 << 10) + 128);
/// How far above its starting point the daemon's RssAnon may stay once the guest has left
/// (the allocator keeps some freed memory for reuse).
const FALLBACK_SLACK_KIB: u64 = 16 << 10;
/// Beyond this the test stops the daemon rather than let it take the machine down.
const ABORT_KIB: u64 = 2 << 20;

/// Text-like data: every cluster compresses, each one differently.
fn text(len: usize) -> Vec<u8> {
    let mut rng = Rng::new(5);
    let mut v = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while v.len() < len {
        v.extend_from_slice(format!("{i}: hostile read {}\n", rng.below(1_000_000)).as_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

struct Setup {
    _dir: Scratch,
    daemon: Daemon,
    data: Vec<u8>,
    socket: PathBuf,
    other_socket: PathBuf,
}

/// A zlib image of 1 GiB (its first 128 MiB compressed data, the rest unallocated) and a small
/// plain image, served by one daemon as two read-only exports.
fn setup(name: &str) -> Setup {
    require_qemu_tools();
    let dir = Scratch::new(name);
    let data = text(DATA_BYTES);
    let raw = dir.join("data.raw");
    write_file(&raw, &data);
    let img = dir.join("zlib.qcow2");
    convert_raw_to_qcow2(&raw, &img, "compression_type=zlib", true);
    std::fs::remove_file(&raw).unwrap();
    qemu_img(&[
        "resize",
        "-q",
        &img.display().to_string(),
        &DISK_BYTES.to_string(),
    ]);
    let other = dir.join("other.qcow2");
    create_qcow2(&other, 64 * MIB, "");
    write_pattern(&other, "qcow2", 0x5a, 0, 64 * KIB);
    let socket = dir.socket("zlib.sock");
    let other_socket = dir.socket("other.sock");
    let config = dir.join("qcow2d.toml");
    std::fs::write(
        &config,
        format!(
            "shards = {SHARDS}\n\
             [[export]]\nimage = {:?}\nsocket = {:?}\nread_only = true\nqueues = {QUEUES}\n\
             [[export]]\nimage = {:?}\nsocket = {:?}\nread_only = true\nqueues = 1\n",
            img, socket, other, other_socket
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(daemon_bin());
    cmd.arg("serve").arg("--config").arg(&config);
    let daemon = Daemon::spawn(cmd, &img, &socket).unwrap_or_else(|f| panic!("qcow2d serve: {f}"));
    wait_for_socket(&other_socket);
    Setup {
        _dir: dir,
        daemon,
        data,
        socket,
        other_socket,
    }
}

/// Reads the other export over and over on its own connection until `stop`; counts reads.
fn keep_reading(socket: PathBuf, stop: Arc<AtomicBool>, reads: Arc<AtomicU64>) {
    let mut c = BlkClient::connect(&socket, 1).unwrap_or_else(|e| panic!("connect: {e}"));
    while !stop.load(Ordering::Relaxed) {
        let got = c
            .read_batch(&[(0, 4096)])
            .unwrap_or_else(|e| panic!("read: {e}"));
        let got = got
            .into_iter()
            .next()
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            got.iter().all(|&b| b == 0x5a),
            "wrong data from the other export"
        );
        reads.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Samples the daemon's (VmRSS, RssAnon) every 20 ms until `stop`, keeping the peak of each;
/// kills the daemon (SIGKILL) if it goes past [`ABORT_KIB`].
fn sample_rss(pid: i32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let mut peak = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            let (rss, anon) = rss_kib(pid);
            peak = (peak.0.max(rss), peak.1.max(anon));
            if anon > ABORT_KIB {
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    })
}

#[test]
fn a_guest_flooding_its_queues_with_huge_reads_stays_within_the_memory_budget() {
    let mut s = setup("flood");
    let pid = s.daemon.pid();
    let (rss0, anon0) = rss_kib(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let other = {
        let (socket, stop, reads) = (s.other_socket.clone(), stop.clone(), reads.clone());
        std::thread::spawn(move || keep_reading(socket, stop, reads))
    };
    let sampler = sample_rss(pid, stop.clone());

    let ram = GuestRam::new(RAM_BYTES, true);
    let mut fe = RawFrontend::connect(&s.socket, QUEUES).unwrap();
    fe.set_memory(&ram, RAM_BYTES as u64).unwrap();
    for q in 0..QUEUES {
        fe.start_queue(&ram, q, 128).unwrap();
    }
    // Every request reads from sector 0, its header at 0x10000, its status at 0x10100.
    ram.write_header(0x10000, T_IN, 0);
    // 1 GiB from 512 descriptors of 2 MiB over the same 2 MiB: beyond SEG_MAX and SIZE_MAX.
    let huge: Vec<(u64, u32)> = (0..512).map(|_| (BUFFER, 2 << 20)).collect();
    let huge_len = ram.write_request_table(0x20000, 0x10000, &huge, true, 0x10100);
    // 126 MiB from 126 descriptors of 1 MiB over the same megabyte: the largest legal read.
    let legal: Vec<(u64, u32)> = (0..126).map(|_| (BUFFER, 1 << 20)).collect();
    let legal_len = ram.write_request_table(0x30000, 0x10000, &legal, true, 0x10100);

    for (table, len, round) in [(0x20000, huge_len, 1u16), (0x30000, legal_len, 2)] {
        for q in 0..QUEUES {
            for _ in 0..PER_QUEUE {
                fe.push_indirect(&ram, q, table, len);
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(600);
        for q in 0..QUEUES {
            let mut waited = fe.wait_used(&ram, q, round * PER_QUEUE, Duration::from_secs(1));
            while waited.is_err()
                && s.daemon.try_exit_status().is_none()
                && std::time::Instant::now() < deadline
            {
                waited = fe.wait_used(&ram, q, round * PER_QUEUE, Duration::from_secs(1));
            }
            if let Err(e) = waited {
                stop.store(true, Ordering::Relaxed);
                let (peak_rss, peak_anon) = sampler.join().unwrap();
                panic!(
                    "{e}; daemon peak VmRSS {peak_rss} KiB, RssAnon {peak_anon} KiB (stopped \
                     above {ABORT_KIB} KiB); stderr:\n{}",
                    s.daemon.stderr()
                );
            }
        }
        s.daemon.assert_alive("under the flood");
    }
    // The used lengths: the 1 GiB reads failed (status byte only), the legal ones are served.
    let queue = fe.queues[0].as_ref().unwrap();
    for i in 0..2 * u64::from(PER_QUEUE) {
        let mut len = [0u8; 4];
        ram.read(queue.used_addr() + 4 + 8 * i + 4, &mut len);
        let want = if i < u64::from(PER_QUEUE) {
            1
        } else {
            (126 << 20) + 1
        };
        assert_eq!(u32::from_le_bytes(len), want, "used element {i}");
    }
    // And the data is right: one more read, of 2 MiB at 100 MiB into distinct buffers.
    ram.write_header(0x11000, T_IN, (100 << 20) / 512);
    let two = [(BUFFER, 1 << 20), (BUFFER + (1 << 20), 1 << 20)];
    let len = ram.write_request_table(0x40000, 0x11000, &two, true, 0x11100);
    fe.push_indirect(&ram, 0, 0x40000, len);
    fe.wait_used(&ram, 0, 2 * PER_QUEUE + 1, Duration::from_secs(60))
        .unwrap();
    let mut got = vec![0u8; 2 << 20];
    ram.read(BUFFER, &mut got);
    assert!(got == s.data[100 << 20..102 << 20], "wrong data read");

    let during_reads = reads.load(Ordering::Relaxed);
    drop(fe);
    stop.store(true, Ordering::Relaxed);
    let (peak_rss, peak_anon) = sampler.join().unwrap();
    other.join().unwrap();
    s.daemon.assert_alive("after the flood");
    assert!(
        during_reads > 0,
        "the other export answered no read during the flood"
    );

    // Once the guest is gone, its shards are dropped: the memory falls back.
    let mut after = rss_kib(pid);
    for _ in 0..100 {
        if after.1 <= anon0 + FALLBACK_SLACK_KIB {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        after = rss_kib(pid);
    }
    eprintln!(
        "daemon memory (KiB): start VmRSS {rss0} RssAnon {anon0}; peak VmRSS {peak_rss} RssAnon \
         {peak_anon}; after VmRSS {} RssAnon {}; other export: {during_reads} reads during",
        after.0, after.1
    );
    assert!(
        peak_anon <= BUDGET_KIB,
        "RssAnon peaked at {peak_anon} KiB, above the budget of {BUDGET_KIB} KiB"
    );
    assert!(
        after.1 <= anon0 + FALLBACK_SLACK_KIB,
        "RssAnon {} KiB once the guest left, started at {anon0} KiB\n{}",
        after.1,
        s.daemon.stderr()
    );
    // Both exports still answer new connections.
    read_answers(&s.socket, &s.data[..64 << 10]);
    read_answers(&s.other_socket, &[0x5a; 64 << 10]);
    s.daemon.assert_alive("at the end");
}

/// A pipe (read end, write end) with `O_NONBLOCK` on both.
fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(rc, 0);
    // SAFETY: fresh descriptors nothing else owns.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

#[test]
fn frontends_that_would_crash_or_block_the_daemon_fail_alone() {
    let mut s = setup("frontend");
    let still_serving = |s: &mut Setup, when: &str| {
        s.daemon.assert_alive(when);
        read_answers(&s.other_socket, &[0x5a; 64 << 10]);
        read_answers(&s.socket, &s.data[..64 << 10]);
    };

    // A memory table over a 1 MiB memfd that claims 4 MiB.
    let small = GuestRam::new(1 << 20, true);
    let mut fe = RawFrontend::connect(&s.socket, QUEUES).unwrap();
    let refused = fe.set_memory(&small, 4 << 20);
    assert!(
        refused.is_err(),
        "a region past the end of its file was accepted"
    );
    drop(fe);
    still_serving(&mut s, "after a memory table past the end of its file");

    // Rings past the end of guest memory (the table itself is honest).
    let mut fe = RawFrontend::connect(&s.socket, QUEUES).unwrap();
    fe.set_memory(&small, 1 << 20).unwrap();
    let call = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    assert!(
        fe.start_queue_with(&small, 0, 128, 3 << 20, call, kick)
            .is_err(),
        "rings outside guest memory were accepted"
    );
    drop(fe);
    still_serving(&mut s, "after rings outside guest memory");

    // Guest memory truncated with requests in flight: the daemon sealed it, so it cannot be.
    let ram = GuestRam::new(RAM_BYTES, true);
    let mut fe = RawFrontend::connect(&s.socket, QUEUES).unwrap();
    fe.set_memory(&ram, RAM_BYTES as u64).unwrap();
    fe.start_queue(&ram, 0, 128).unwrap();
    ram.write_header(0x10000, T_IN, 0);
    let legal: Vec<(u64, u32)> = (0..126).map(|_| (BUFFER, 1 << 20)).collect();
    let len = ram.write_request_table(0x30000, 0x10000, &legal, true, 0x10100);
    for _ in 0..8 {
        fe.push_indirect(&ram, 0, 0x30000, len);
    }
    let truncated = ram.file.set_len(4096);
    assert!(
        truncated.is_err(),
        "the frontend could shrink guest memory under the daemon"
    );
    fe.wait_used(&ram, 0, 8, Duration::from_secs(300)).unwrap();
    drop(fe);
    still_serving(&mut s, "after an attempt to truncate guest memory");

    // An available index far ahead of anything the ring can hold (more than the queue size
    // past the device's): the queue takes nothing more, its worker does not spin on it, and
    // the export takes the next connection.
    let ram = GuestRam::new(RAM_BYTES, true);
    let mut fe = RawFrontend::connect(&s.socket, QUEUES).unwrap();
    fe.set_memory(&ram, RAM_BYTES as u64).unwrap();
    fe.start_queue(&ram, 0, 128).unwrap();
    let avail_idx = fe.queues[0].as_ref().unwrap().avail_addr() + 2;
    ram.write(avail_idx, &1000u16.to_le_bytes());
    let broken_before = s.daemon.stderr().matches(BROKEN_RING).count();
    fe.kick(0);
    // Noticed (once) when the worker takes the kick.
    s.daemon
        .wait_for_stderr(BROKEN_RING, broken_before + 1, Duration::from_secs(120));
    drop(fe);
    still_serving(&mut s, "after an available index past the ring");

    // A full pipe as the call descriptor, then a pipe as the kick descriptor.
    let (_read_end, mut write_end) = pipe();
    while write_end.write(&[0u8; 4096]).is_ok() {}
    for as_call in [true, false] {
        let ram = GuestRam::new(RAM_BYTES, true);
        let mut fe = RawFrontend::connect(&s.socket, QUEUES).unwrap();
        fe.set_memory(&ram, RAM_BYTES as u64).unwrap();
        let fd = if as_call {
            write_end.try_clone().unwrap()
        } else {
            _read_end.try_clone().unwrap()
        };
        // SAFETY: hands the descriptor's ownership to the EventFd wrapper (it only passes it on).
        let not_an_eventfd = unsafe {
            vmm_sys_util::eventfd::EventFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd))
        };
        let eventfd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (call, kick) = if as_call {
            (not_an_eventfd, eventfd)
        } else {
            (eventfd, not_an_eventfd)
        };
        assert!(
            fe.start_queue_with(&ram, 0, 128, 0, call, kick).is_err(),
            "a pipe was accepted as {} descriptor",
            if as_call { "call" } else { "kick" }
        );
        drop(fe);
        still_serving(&mut s, "after a pipe as a queue descriptor");
    }
}

/// Guest memory that cannot be sealed, truncated under the daemon: once with a 126 MiB read
/// taken and in flight (its ring, read as zeros from then on, says the driver's index went
/// back, which the worker must not spin on), once with the read added but not yet taken. Each
/// time the daemon lives, the other export answers and the attacked one takes the next client.
#[test]
fn unsealable_guest_memory_truncated_under_the_daemon() {
    let mut s = setup("unsealable");
    let legal: Vec<(u64, u32)> = (0..126).map(|_| (BUFFER, 1 << 20)).collect();
    for in_flight in [true, false] {
        // Guest memory that cannot be sealed (a memfd made without MFD_ALLOW_SEALING, as
        // libblkio makes them), truncated under the daemon with a request waiting: the pages
        // cut off read as zeros on the daemon's side instead of killing it.
        let ram = GuestRam::new(RAM_BYTES, false);
        let mut fe = RawFrontend::connect(&s.socket, QUEUES).unwrap();
        fe.set_memory(&ram, RAM_BYTES as u64).unwrap();
        fe.start_queue(&ram, 0, 128).unwrap();
        ram.write_header(0x10000, T_IN, 0);
        let len = ram.write_request_table(0x30000, 0x10000, &legal, true, 0x10100);
        ram.write(BUFFER, &[FILL; 64]);
        fe.add_indirect(&ram, 0, 0x30000, len);
        if in_flight {
            fe.kick(0);
            // Taken by the worker: data has begun to arrive in its buffer.
            wait_for_data(&ram);
        }
        let broken_before = s.daemon.stderr().matches(BROKEN_RING).count();
        ram.file.set_len(0).unwrap();
        fe.kick(0);
        // Nothing of guest memory is readable here any more either: the daemon must go on
        // alone. With a read in flight, the ring (read as zeros) now says the driver took
        // back a chain: the worker says so when it takes the kick, however long a loaded
        // machine makes that; a waiting read leaves nothing to see.
        if in_flight {
            s.daemon
                .wait_for_stderr(BROKEN_RING, broken_before + 1, Duration::from_secs(120));
        } else {
            std::thread::sleep(Duration::from_millis(500));
        }
        drop(fe);
        drop(ram);
        let when = if in_flight {
            "after guest memory was truncated under a read in flight"
        } else {
            "after guest memory was truncated under a waiting read"
        };
        s.daemon.assert_alive(when);
        read_answers(&s.other_socket, &[0x5a; 64 << 10]);
        read_answers(&s.socket, &s.data[..64 << 10]);
    }
    assert!(
        s.daemon.stderr().contains("cannot be sealed"),
        "no warning about unsealable guest memory:\n{}",
        s.daemon.stderr()
    );
    // The daemon did touch the pages cut off (and survived it).
    assert!(
        s.daemon.stderr().contains("cut guest memory short"),
        "the daemon never touched the truncated memory:\n{}",
        s.daemon.stderr()
    );
}

/// What the daemon says of a queue whose available ring cannot be right.
const BROKEN_RING: &str = "broke the available ring";

/// What the data buffer holds before the device writes into it.
const FILL: u8 = 0xee;

/// Waits until the device has written into the data buffer (filled with [`FILL`] before).
fn wait_for_data(ram: &GuestRam) {
    for _ in 0..60_000 {
        let mut b = [0u8; 64];
        ram.read(BUFFER, &mut b);
        if b != [FILL; 64] {
            return;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    panic!("the device never took the read");
}
