//! A hostile vhost-user frontend at the protocol level, against a daemon serving two exports
//! (a writable one with two queues and a read-only one): messages that cannot be framed or
//! make no sense, memory tables and vring set-ups that lie, in-flight areas and channels that
//! are not what they claim, and descriptor chains of every malformed shape. After each attack
//! the daemon is alive, both exports answer a new connection, and where the attack is refused
//! the daemon says so (an error answer, the connection closed, a log line) or, for a request,
//! fails it with the status the virtio spec asks for.
//!
//! Among them: memory tables sent one after another until the SIGBUS guards would run out
//! (then a truncation must still read as zeros), connections of three exports filling their
//! memory slots with unsealable memory (a truncation past what the guards once held reads as
//! zeros too), unsealable guest memory on huge pages of 2 MiB and on a gigantic page of 1 GiB
//! truncated with reads in flight (the huge pages cut off read as zeros; needs huge pages
//! reserved, `/sys/kernel/mm/hugepages/hugepages-{2048,1048576}kB/nr_hugepages`: without the
//! 2 MiB ones the test fails, without a 1 GiB one the gigantic-page tests say loudly that they
//! cannot run), reads and writes through guest memory on a gigantic page, memory slots past
//! the advertised maximum (refused), a backend request channel whose send timeout the
//! frontend resets (an online resize still completes), and a frontend that fills its memory
//! slots in a process short of file descriptors (another export's connection is closed, the
//! export goes on).
//!
//! hostile.rs covers the resource attacks (huge reads, memory past the end of its file, rings
//! outside memory, truncated memory, a runaway available index, pipes as eventfds); the relay's
//! unit tests cover partial messages and floods at the relay alone.
//!
//! The daemon is the real binary (`QCOW2D_BIN` or target/debug/qcow2d); the frontend is
//! `qcow2d_tests::frontend` (vhost's own frontend for honest messages, [`Wire`] for raw ones).

use qcow2d_tests::frontend::{
    GuestRam, RawFrontend, Wire, WireMsg, F_INDIRECT, F_NEXT, F_WRITE, NEED_REPLY, VERSION_1,
};
use qcow2d_tests::*;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the daemon may take to answer or to close a connection on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(60);
/// Guest memory of the hostile frontend.
const RAM_BYTES: usize = 4 << 20;
/// What each export holds in its first 64 KiB.
const DISK_BYTE: u8 = 0xa1;
const OTHER_BYTE: u8 = 0x5a;
const SHOWN: usize = 64 << 10;

/// vhost-user request codes.
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const RESET_OWNER: u32 = 4;
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const SET_LOG_FD: u32 = 7;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const SET_BACKEND_REQ_FD: u32 = 21;
const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
const GPU_SET_SOCKET: u32 = 33;
const RESET_DEVICE: u32 = 34;
const GET_MAX_MEM_SLOTS: u32 = 36;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;
const SET_DEVICE_STATE_FD: u32 = 42;
const CHECK_DEVICE_STATE: u32 = 43;

/// Protocol feature bits.
const BACKEND_REQ: u64 = 1 << 5;
const INFLIGHT_SHMFD: u64 = 1 << 12;
const CONFIGURE_MEM_SLOTS: u64 = 1 << 15;

/// What the daemon logs when its request handler ends a connection over a message it refuses.
const ENDED_WITH_ERROR: &str = "Connection ended with an error";
/// What the daemon logs when a connection ends that read guest memory cut short as zeros.
const CUT_SHORT: &str = "cut guest memory short";
/// What the relay logs when it refuses a message's descriptors.
const REFUSED: &str = "the frontend's message is refused";

struct Setup {
    _dir: Scratch,
    daemon: Daemon,
    /// The writable export (two queues), its socket.
    disk: PathBuf,
    /// The read-only export.
    other: PathBuf,
    /// Further writable exports over empty images ([`setup_extra`]).
    extra: Vec<PathBuf>,
    control: PathBuf,
}

/// Two 64 MiB qcow2 images, the first 64 KiB of each filled with its byte, served by one
/// daemon with two shards: `disk` writable with two queues, `other` read-only; and a control
/// socket.
fn setup(name: &str) -> Setup {
    setup_with(name, None, 0)
}

/// As [`setup`], with `extra` more writable exports over empty 64 MiB images.
fn setup_extra(name: &str, extra: usize) -> Setup {
    setup_with(name, None, extra)
}

/// As [`setup`], the daemon limited to `nofile` open files when given, with `extra` more
/// exports.
fn setup_with(name: &str, nofile: Option<u64>, extra: usize) -> Setup {
    require_qemu_tools();
    let dir = Scratch::new(name);
    let disk_img = dir.join("disk.qcow2");
    create_qcow2(&disk_img, 64 * MIB, "");
    write_pattern(&disk_img, "qcow2", DISK_BYTE, 0, SHOWN as u64);
    let other_img = dir.join("other.qcow2");
    create_qcow2(&other_img, 64 * MIB, "");
    write_pattern(&other_img, "qcow2", OTHER_BYTE, 0, SHOWN as u64);
    let disk = dir.socket("disk.sock");
    let other = dir.socket("other.sock");
    let control = dir.socket("control.sock");
    let config = dir.join("qcow2d.toml");
    let mut text = format!(
        "shards = 2\ncontrol = {control:?}\n\
         [[export]]\nimage = {disk_img:?}\nsocket = {disk:?}\nqueues = 2\n\
         [[export]]\nimage = {other_img:?}\nsocket = {other:?}\nread_only = true\n"
    );
    let mut extras = Vec::new();
    for i in 0..extra {
        let img = dir.join(&format!("extra{i}.qcow2"));
        create_qcow2(&img, 64 * MIB, "");
        let socket = dir.socket(&format!("extra{i}.sock"));
        text.push_str(&format!(
            "[[export]]\nimage = {img:?}\nsocket = {socket:?}\n"
        ));
        extras.push(socket);
    }
    std::fs::write(&config, text).unwrap();
    let mut cmd = std::process::Command::new(daemon_bin());
    cmd.arg("serve").arg("--config").arg(&config);
    if let Some(n) = nofile {
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // setrlimit, which is async-signal-safe, on a local struct.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                let limit = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let daemon =
        Daemon::spawn(cmd, &disk_img, &disk).unwrap_or_else(|f| panic!("qcow2d serve: {f}"));
    wait_for_socket(&other);
    for socket in &extras {
        wait_for_socket(socket);
    }
    Setup {
        _dir: dir,
        daemon,
        disk,
        other,
        extra: extras,
        control,
    }
}

impl Setup {
    /// The daemon lives and both exports answer a new connection with their data.
    fn still_serving(&mut self, when: &str) {
        self.daemon.assert_alive(when);
        read_answers(&self.other, &[OTHER_BYTE; SHOWN]);
        read_answers(&self.disk, &[DISK_BYTE; SHOWN]);
        self.daemon.assert_alive(when);
    }

    /// Occurrences of `what` in the daemon's stderr so far.
    fn count(&self, what: &str) -> usize {
        self.daemon.stderr().matches(what).count()
    }

    /// Waits until the daemon reports pages of guest memory it read as zeros (the SIGBUS
    /// handler's, counted and reported when the connection ends) more than `before` times;
    /// fails if the daemon died meanwhile: a page cut off either reads as zeros or kills it.
    fn read_cut_pages_as_zeros(&mut self, before: usize) {
        let deadline = std::time::Instant::now() + PATIENCE;
        while self.count(CUT_SHORT) == before {
            if let Some(status) = self.daemon.try_exit_status() {
                panic!(
                    "the daemon died ({status}) when it touched truncated guest memory; \
                     stderr:\n{}",
                    self.daemon.stderr()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the connection never reported the pages it read as zeros; stderr:\n{}",
                self.daemon.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `what` occurs in the daemon's stderr more than `before` times: the attack
    /// `name` was noticed with that line.
    fn logged(&self, name: &str, what: &str, before: usize) {
        let stderr = self.daemon.stderr();
        if stderr.matches(what).count() > before {
            return;
        }
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::time::Instant::now() < deadline {
            if self.count(what) > before {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{name}: the daemon never said {what:?}; stderr:\n{}",
            self.daemon.stderr()
        );
    }
}

/// A connection with the honest part of the handshake done (owner, features, and every
/// protocol feature the daemon offers, REPLY_ACK among them), and its raw socket.
fn handshake(socket: &Path) -> (RawFrontend, Wire) {
    let fe = RawFrontend::connect(socket, 2).unwrap();
    let wire = Wire::of(&fe);
    let offered = wire
        .ask(GET_PROTOCOL_FEATURES, &[], &[], PATIENCE)
        .unwrap()
        .and_then(|m| m.u64_at(0))
        .expect("GET_PROTOCOL_FEATURES answered");
    for wanted in [CONFIGURE_MEM_SLOTS, INFLIGHT_SHMFD, BACKEND_REQ] {
        assert_ne!(
            offered & wanted,
            0,
            "protocol feature {wanted:#x} not offered"
        );
    }
    let acked = wire
        .ask(SET_PROTOCOL_FEATURES, &u64s(&[offered]), &[], PATIENCE)
        .unwrap()
        .expect("SET_PROTOCOL_FEATURES answered");
    assert_eq!(
        status(&acked),
        0,
        "the daemon's own protocol features refused"
    );
    (fe, wire)
}

fn u64s(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

/// A `VhostUserVringState` body: queue index, number.
fn vring_state(index: u32, num: u32) -> Vec<u8> {
    [index.to_ne_bytes(), num.to_ne_bytes()].concat()
}

/// The REPLY_ACK status of an answer (0: done).
fn status(msg: &WireMsg) -> u64 {
    msg.u64_at(0).expect("an 8-byte answer")
}

fn eventfd() -> vmm_sys_util::eventfd::EventFd {
    vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

/// The attack `name` made on `wire`: the daemon closes the connection, says `line` once more
/// than the `before` times it had, and both exports go on serving.
fn ends_connection(s: &mut Setup, name: &str, wire: Wire, line: &str, before: usize) {
    wire.wait_closed(PATIENCE)
        .unwrap_or_else(|e| panic!("{name}: {e}; stderr:\n{}", s.daemon.stderr()));
    drop(wire);
    s.logged(name, line, before);
    s.still_serving(name);
}

/// A memory region description: guest address, size, user address, mmap offset.
fn region(guest: u64, size: u64, user: u64, offset: u64) -> Vec<u8> {
    u64s(&[guest, size, user, offset])
}

/// A SET_MEM_TABLE body: `count` as the region count, then the regions.
fn mem_table(count: u32, regions: &[Vec<u8>]) -> Vec<u8> {
    let mut body = [count.to_ne_bytes(), [0; 4]].concat();
    for r in regions {
        body.extend_from_slice(r);
    }
    body
}

/// An ADD_MEM_REG / REM_MEM_REG body: padding, then one region.
fn one_region(guest: u64, size: u64, user: u64, offset: u64) -> Vec<u8> {
    [vec![0u8; 8], region(guest, size, user, offset)].concat()
}

/// A SET_VRING_ADDR body: index, flags, descriptor, used, available, log.
fn vring_addr(index: u32, flags: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    [
        index.to_ne_bytes().to_vec(),
        flags.to_ne_bytes().to_vec(),
        u64s(&[desc, used, avail, 0]),
    ]
    .concat()
}

#[test]
fn messages_the_daemon_refuses_end_only_their_connection() {
    let mut s = setup("refused-messages");
    let ram = GuestRam::new(RAM_BYTES, true);
    let efd = eventfd();
    let efd_raw = efd.as_raw_fd();
    let (pipe_end, pipe_other) = pipe();

    // Before any handshake: request codes vhost-user does not have, and headers that lie.
    for (name, request, flags) in [
        ("an unknown request code", 999, VERSION_1),
        ("request code 0", 0, VERSION_1 | NEED_REPLY),
        (
            "a request flagged as a reply",
            GET_FEATURES,
            VERSION_1 | 0x4,
        ),
        ("a request of protocol version 0", GET_FEATURES, 0),
    ] {
        let before = s.count(ENDED_WITH_ERROR);
        let wire = Wire::connect(&s.disk).unwrap();
        wire.send(request, flags, &[], &[]).unwrap();
        ends_connection(&mut s, name, wire, ENDED_WITH_ERROR, before);
    }
    for (name, size, line) in [
        ("a size field of 4097", 4097, "above the 4096-byte limit"),
        (
            "a size field of 4 GiB",
            u32::MAX,
            "above the 4096-byte limit",
        ),
    ] {
        let before = s.count(line);
        let wire = Wire::connect(&s.disk).unwrap();
        wire.send_bytes(&frontend::message(GET_FEATURES, VERSION_1, size, &[]), &[])
            .unwrap();
        ends_connection(&mut s, name, wire, line, before);
    }
    // 40 descriptors on one message (vhost-user allows at most 32), and one on a message
    // that takes none.
    let many: Vec<_> = (0..40).map(|_| eventfd()).collect();
    let many_raw: Vec<RawFd> = many.iter().map(|e| e.as_raw_fd()).collect();
    let before = s.count("file descriptors attached to a message");
    let wire = Wire::connect(&s.disk).unwrap();
    wire.send(GET_FEATURES, VERSION_1 | NEED_REPLY, &[], &many_raw)
        .unwrap();
    ends_connection(
        &mut s,
        "40 descriptors on a message",
        wire,
        "file descriptors attached to a message",
        before,
    );
    drop(many);
    let before = s.count(ENDED_WITH_ERROR);
    let wire = Wire::connect(&s.disk).unwrap();
    wire.send(GET_FEATURES, VERSION_1 | NEED_REPLY, &[], &[efd_raw])
        .unwrap();
    ends_connection(
        &mut s,
        "a descriptor on GET_FEATURES",
        wire,
        ENDED_WITH_ERROR,
        before,
    );
    let before = s.count(ENDED_WITH_ERROR);
    let wire = Wire::connect(&s.disk).unwrap();
    wire.send(GET_FEATURES, VERSION_1 | NEED_REPLY, &[0u8; 4096], &[])
        .unwrap();
    ends_connection(
        &mut s,
        "a 4096-byte body on GET_FEATURES",
        wire,
        ENDED_WITH_ERROR,
        before,
    );

    // After an honest handshake (REPLY_ACK on): each refused message is answered with a
    // failure status, then the connection ends.
    let refused = |s: &mut Setup, name: &str, request: u32, body: &[u8], fds: &[RawFd]| {
        let before = s.count(ENDED_WITH_ERROR);
        let (fe, wire) = handshake(&s.disk);
        let answer = wire.ask(request, body, fds, PATIENCE);
        match answer {
            Ok(Some(msg)) => assert_ne!(
                msg.u64_at(0),
                Some(0),
                "{name}: the daemon answered success"
            ),
            Ok(None) => {}
            Err(e) => panic!("{name}: {e}; stderr:\n{}", s.daemon.stderr()),
        }
        drop(fe);
        ends_connection(s, name, wire, ENDED_WITH_ERROR, before);
    };
    refused(&mut s, "SET_OWNER twice", SET_OWNER, &[], &[]);
    refused(
        &mut s,
        "SET_FEATURES with features never offered",
        SET_FEATURES,
        &u64s(&[(1 << 63) | (1 << 26) | (1 << 32)]),
        &[],
    );
    refused(
        &mut s,
        "SET_VRING_ENABLE 2",
        SET_VRING_ENABLE,
        &vring_state(0, 2),
        &[],
    );
    refused(
        &mut s,
        "SET_VRING_NUM 0",
        SET_VRING_NUM,
        &vring_state(0, 0),
        &[],
    );
    refused(
        &mut s,
        "SET_VRING_NUM above the maximum",
        SET_VRING_NUM,
        &vring_state(0, 2048),
        &[],
    );
    for (name, request, body) in [
        ("SET_VRING_NUM", SET_VRING_NUM, vring_state(2, 128)),
        ("SET_VRING_BASE", SET_VRING_BASE, vring_state(2, 0)),
        ("GET_VRING_BASE", GET_VRING_BASE, vring_state(2, 0)),
        ("SET_VRING_ENABLE", SET_VRING_ENABLE, vring_state(2, 1)),
        ("SET_VRING_NUM", SET_VRING_NUM, vring_state(u32::MAX, 128)),
        ("SET_VRING_ADDR", SET_VRING_ADDR, vring_addr(2, 0, 0, 0, 0)),
    ] {
        refused(
            &mut s,
            &format!("{name} on a queue the device does not have"),
            request,
            &body,
            &[],
        );
    }
    for (name, request) in [
        ("SET_VRING_KICK", SET_VRING_KICK),
        ("SET_VRING_CALL", SET_VRING_CALL),
        ("SET_VRING_ERR", SET_VRING_ERR),
    ] {
        for index in [2u64, 255] {
            refused(
                &mut s,
                &format!("{name} on queue {index}"),
                request,
                &u64s(&[index]),
                &[efd_raw],
            );
        }
    }
    refused(
        &mut s,
        "SET_VRING_ADDR before any memory table",
        SET_VRING_ADDR,
        &vring_addr(0, 0, ram.addr(), ram.addr() + 0x1000, ram.addr() + 0x800),
        &[],
    );
    refused(
        &mut s,
        "GPU_SET_SOCKET with a pipe",
        GPU_SET_SOCKET,
        &[],
        &[pipe_end],
    );
    refused(
        &mut s,
        "SET_BACKEND_REQ_FD with a pipe",
        SET_BACKEND_REQ_FD,
        &[],
        &[pipe_end],
    );
    refused(
        &mut s,
        "GET_CONFIG at an offset that wraps",
        GET_CONFIG,
        &config(u32::MAX, 8),
        &[],
    );
    refused(&mut s, "SET_LOG_FD", SET_LOG_FD, &u64s(&[0]), &[efd_raw]);
    refused(
        &mut s,
        "SET_LOG_BASE without the feature",
        SET_LOG_BASE,
        &u64s(&[4096, 0]),
        &[ram.file.as_raw_fd()],
    );

    // Memory tables that cannot be right.
    let fd = ram.file.as_raw_fd();
    let len = RAM_BYTES as u64;
    let user = ram.addr();
    refused(
        &mut s,
        "a memory table of 0 regions",
        SET_MEM_TABLE,
        &mem_table(0, &[]),
        &[],
    );
    for (name, regions) in [
        ("a region of 0 bytes", vec![region(0, 0, user, 0)]),
        (
            "a region whose guest addresses wrap",
            vec![region(u64::MAX - 4095, len, user, 0)],
        ),
        (
            "a region whose user addresses wrap",
            vec![region(0, len, u64::MAX - 4095, 0)],
        ),
        (
            "overlapping regions",
            vec![region(0, len, user, 0), region(4096, 4096, user, 0)],
        ),
    ] {
        let fds = vec![fd; regions.len()];
        refused(
            &mut s,
            name,
            SET_MEM_TABLE,
            &mem_table(regions.len() as u32, &regions),
            &fds,
        );
    }
    // What the relay refuses itself, before the request handler maps anything.
    for (name, body, fds) in [
        (
            "a region count that is not the table's",
            mem_table(2, &[region(0, len, user, 0)]),
            vec![fd],
        ),
        (
            "a region without its descriptor",
            mem_table(1, &[region(0, len, user, 0)]),
            vec![],
        ),
        (
            "a region whose offset and size wrap",
            mem_table(1, &[region(0, len, user, u64::MAX - 4095)]),
            vec![fd],
        ),
        (
            "a region over an eventfd",
            mem_table(1, &[region(0, 4096, user, 0)]),
            vec![efd_raw],
        ),
        (
            "a region at an offset that is not page-aligned",
            mem_table(1, &[region(0, 4096, user, 100)]),
            vec![fd],
        ),
    ] {
        let before = s.count(REFUSED);
        let (fe, wire) = handshake(&s.disk);
        let answer = wire.ask(SET_MEM_TABLE, &body, &fds, PATIENCE).unwrap();
        if let Some(msg) = answer {
            assert_ne!(status(&msg), 0, "{name}: the daemon answered success");
        }
        drop(fe);
        ends_connection(&mut s, name, wire, REFUSED, before);
    }
    // 33 regions: 33 descriptors, one more than a message may carry.
    let regions: Vec<_> = (0..33).map(|i| region(i * 4096, 4096, user, 0)).collect();
    let before = s.count("file descriptors attached to a message");
    let (fe, wire) = handshake(&s.disk);
    wire.send(
        SET_MEM_TABLE,
        VERSION_1 | NEED_REPLY,
        &mem_table(33, &regions),
        &[fd; 33],
    )
    .unwrap();
    drop(fe);
    ends_connection(
        &mut s,
        "a memory table of 33 regions",
        wire,
        "file descriptors attached to a message",
        before,
    );

    // Memory slots added one by one that cannot be right.
    for (name, request, body) in [
        (
            "ADD_MEM_REG of 0 bytes",
            ADD_MEM_REG,
            one_region(0, 0, user, 0),
        ),
        (
            "ADD_MEM_REG whose guest addresses wrap",
            ADD_MEM_REG,
            one_region(u64::MAX - 4095, len, user, 0),
        ),
        (
            "REM_MEM_REG of a region never added",
            REM_MEM_REG,
            one_region(1 << 30, len, user, 0),
        ),
    ] {
        let fds: &[RawFd] = if request == ADD_MEM_REG { &[fd] } else { &[] };
        refused(&mut s, name, request, &body, fds);
    }
    let before = s.count(ENDED_WITH_ERROR);
    let (mut fe, wire) = handshake(&s.disk);
    fe.set_memory(&ram, len).unwrap();
    let answer = wire
        .ask(
            ADD_MEM_REG,
            &one_region(4096, 4096, user, 0),
            &[fd],
            PATIENCE,
        )
        .unwrap();
    if let Some(msg) = answer {
        assert_ne!(status(&msg), 0, "an overlapping ADD_MEM_REG was accepted");
    }
    drop(fe);
    ends_connection(
        &mut s,
        "ADD_MEM_REG over a region already there",
        wire,
        ENDED_WITH_ERROR,
        before,
    );

    // Rings that break the split ring's alignment (descriptors 16 bytes, used ring 4 bytes).
    for (name, desc, used, avail) in [
        ("a misaligned descriptor table", 8, 0x1000, 0x800),
        ("a misaligned used ring", 0, 0x1002, 0x800),
        ("a misaligned available ring", 0, 0x1000, 0x801),
    ] {
        let before = s.count(ENDED_WITH_ERROR);
        let (mut fe, wire) = handshake(&s.disk);
        fe.set_memory(&ram, len).unwrap();
        let answer = wire
            .ask(
                SET_VRING_ADDR,
                &vring_addr(0, 0, user + desc, user + used, user + avail),
                &[],
                PATIENCE,
            )
            .unwrap();
        if let Some(msg) = answer {
            assert_ne!(status(&msg), 0, "{name}: the daemon answered success");
        }
        drop(fe);
        ends_connection(&mut s, name, wire, ENDED_WITH_ERROR, before);
    }
    let before = s.count(ENDED_WITH_ERROR);
    let (mut fe, wire) = handshake(&s.disk);
    fe.set_memory(&ram, len).unwrap();
    let answer = wire
        .ask(
            SET_VRING_ADDR,
            &vring_addr(0, 0x80, user, user + 0x1000, user + 0x800),
            &[],
            PATIENCE,
        )
        .unwrap();
    if let Some(msg) = answer {
        assert_ne!(
            status(&msg),
            0,
            "SET_VRING_ADDR with unknown flags was accepted"
        );
    }
    drop(fe);
    ends_connection(
        &mut s,
        "SET_VRING_ADDR with unknown flags",
        wire,
        ENDED_WITH_ERROR,
        before,
    );
    // SAFETY: closes the pipe's two descriptors, which nothing else uses.
    unsafe {
        libc::close(pipe_end);
        libc::close(pipe_other);
    }
}

/// A pipe (read end, write end), blocking.
fn pipe() -> (RawFd, RawFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0);
    (fds[0], fds[1])
}

/// The daemon's virtual memory size (VmSize) in KiB.
fn vm_size_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmSize in /proc/PID/status")
}

/// A `VhostUserInflight` body: mmap size, mmap offset, queues, queue size.
fn inflight(size: u64, offset: u64, queues: u16, queue_size: u16) -> Vec<u8> {
    [
        u64s(&[size, offset]),
        queues.to_ne_bytes().to_vec(),
        queue_size.to_ne_bytes().to_vec(),
        vec![0u8; 4],
    ]
    .concat()
}

/// A `VhostUserConfig` body asking for `size` bytes at `offset`.
fn config(offset: u32, size: u32) -> Vec<u8> {
    let mut body = [offset.to_ne_bytes(), size.to_ne_bytes(), 0u32.to_ne_bytes()].concat();
    body.resize(12 + size as usize, 0);
    body
}

#[test]
fn messages_answered_with_an_error_leave_the_connection_up() {
    let mut s = setup("answered-messages");
    let ram = GuestRam::new(RAM_BYTES, true);
    let fd = ram.file.as_raw_fd();
    let (rd, wr) = pipe();
    let (mut fe, wire) = handshake(&s.disk);
    fe.set_memory(&ram, RAM_BYTES as u64).unwrap();
    // The connection still answers after each of them.
    let alive = |wire: &Wire, after: &str| {
        let got = wire
            .ask(GET_FEATURES, &[], &[], PATIENCE)
            .unwrap_or_else(|e| panic!("after {after}: {e}"))
            .unwrap_or_else(|| panic!("the connection ended after {after}"));
        assert_ne!(got.u64_at(0), Some(0), "after {after}: no features");
    };

    // Queue state of queues never started, twice in a row.
    for _ in 0..2 {
        let got = wire
            .ask(GET_VRING_BASE, &vring_state(1, 0), &[], PATIENCE)
            .unwrap()
            .expect("GET_VRING_BASE answered");
        assert_eq!(got.body, vring_state(1, 0), "a queue never started");
    }
    alive(&wire, "GET_VRING_BASE of a queue never started");

    // Config space beyond its end: zeros (the spec's "no such field"), never bytes of
    // anything else.
    for (offset, size) in [(4000u32, 96u32), (90, 8), (0, 4000)] {
        let got = wire
            .ask(GET_CONFIG, &config(offset, size), &[], PATIENCE)
            .unwrap()
            .expect("GET_CONFIG answered");
        assert_eq!(
            got.body.len(),
            12 + size as usize,
            "GET_CONFIG {offset}+{size}"
        );
        let known = 96usize.saturating_sub(offset as usize);
        assert!(
            got.body[12 + known.min(size as usize)..]
                .iter()
                .all(|&b| b == 0),
            "GET_CONFIG {offset}+{size}: bytes past the config space are not zeros"
        );
        let ack = wire
            .ask(SET_CONFIG, &config(offset, size), &[], PATIENCE)
            .unwrap()
            .expect("SET_CONFIG answered");
        assert_eq!(
            status(&ack),
            0,
            "SET_CONFIG {offset}+{size} is ignored, not refused"
        );
    }
    alive(&wire, "config space out of range");

    // In-flight areas that cannot be: no area (size 0, no descriptor), an error status, a
    // log line that says why, and the connection goes on without in-flight tracking.
    for (name, queues, size, line) in [
        (
            "65535 queues of 32768",
            65535u16,
            32768u16,
            "Invalid in-flight area geometry",
        ),
        ("0 queues of 0", 0, 0, "Invalid in-flight area geometry"),
    ] {
        let before = s.count(line);
        let got = wire
            .ask(
                GET_INFLIGHT_FD,
                &inflight(0, 0, queues, size),
                &[],
                PATIENCE,
            )
            .unwrap()
            .expect("GET_INFLIGHT_FD answered");
        assert_eq!(
            got.u64_at(0),
            Some(0),
            "GET_INFLIGHT_FD {name}: an area was made"
        );
        s.logged(&format!("GET_INFLIGHT_FD {name}"), line, before);
    }
    for (name, body, fds, line) in [
        (
            "a pipe",
            inflight(4096, 0, 2, 128),
            vec![rd],
            "Cannot use the frontend's in-flight area",
        ),
        (
            "no descriptor",
            inflight(4096, 0, 2, 128),
            vec![],
            "without exactly one file descriptor",
        ),
        (
            "an area too small for its queues",
            inflight(4096, 0, 2, 128),
            vec![fd],
            "does not fit 2 queues of 128 descriptors",
        ),
        (
            "an area past the end of its file",
            inflight(8192, RAM_BYTES as u64 - 4096, 1, 4),
            vec![fd],
            "reaches past the end of its file",
        ),
        (
            "an area above the size limit",
            inflight(1 << 30, 0, 64, 32768),
            vec![fd],
            "does not fit",
        ),
    ] {
        let before = s.count(line);
        let got = wire
            .ask(SET_INFLIGHT_FD, &body, &fds, PATIENCE)
            .unwrap()
            .expect("SET_INFLIGHT_FD answered");
        assert_eq!(status(&got), 1, "SET_INFLIGHT_FD with {name} was accepted");
        s.logged(&format!("SET_INFLIGHT_FD with {name}"), line, before);
    }
    let unsealed = GuestRam::new(1 << 20, false);
    let got = wire
        .ask(
            SET_INFLIGHT_FD,
            &inflight(4224, 0, 2, 128),
            &[unsealed.file.as_raw_fd()],
            PATIENCE,
        )
        .unwrap()
        .expect("SET_INFLIGHT_FD answered");
    assert_eq!(
        status(&got),
        1,
        "an in-flight area that can shrink was accepted"
    );
    alive(&wire, "in-flight areas that cannot be");

    // Migration of the device state, which the daemon does not offer, with a pipe.
    let got = wire
        .ask(SET_DEVICE_STATE_FD, &[0u8; 8], &[wr], PATIENCE)
        .unwrap()
        .expect("SET_DEVICE_STATE_FD answered");
    assert_ne!(status(&got) & 0xff, 0, "SET_DEVICE_STATE_FD was accepted");
    alive(&wire, "SET_DEVICE_STATE_FD");

    drop(fe);
    drop(wire);

    // Protocol features never offered are taken as they come (as libvhost-user takes them),
    // but what they would enable costs nothing: before any memory table, a dirty log of
    // 1 TiB, 64 times, is mapped and let go; with one, the log is refused.
    let (mut fe, wire) = handshake(&s.disk);
    let got = wire
        .ask(SET_PROTOCOL_FEATURES, &u64s(&[u64::MAX]), &[], PATIENCE)
        .unwrap()
        .expect("SET_PROTOCOL_FEATURES answered");
    assert_eq!(status(&got), 0);
    let pid = s.daemon.pid();
    let vm_before = vm_size_kib(pid);
    for _ in 0..64 {
        wire.ask(SET_LOG_BASE, &u64s(&[1 << 40, 0]), &[fd], PATIENCE)
            .unwrap()
            .expect("SET_LOG_BASE answered");
    }
    let vm_after = vm_size_kib(pid);
    assert!(
        vm_after < vm_before + (1 << 30),
        "64 dirty logs of 1 TiB left the daemon's address space at {vm_after} KiB, from \
         {vm_before} KiB"
    );
    alive(&wire, "dirty logs of 1 TiB");
    fe.set_memory(&ram, RAM_BYTES as u64).unwrap();
    let before = s.count(ENDED_WITH_ERROR);
    wire.send(
        SET_LOG_BASE,
        VERSION_1 | NEED_REPLY,
        &u64s(&[1 << 20, 0]),
        &[fd],
    )
    .unwrap();
    drop(fe);
    ends_connection(
        &mut s,
        "a dirty log over guest memory",
        wire,
        ENDED_WITH_ERROR,
        before,
    );

    // SAFETY: closes the pipe's two descriptors, which nothing else uses.
    unsafe {
        libc::close(rd);
        libc::close(wr);
    }
    s.still_serving("after messages answered with an error");
}

/// Where a request's parts lie in guest memory: the queue's rings at 0 (see
/// `RawFrontend::start_queue`), indirect tables, headers and status bytes, data.
const TABLE: u64 = 0x20000;
const HEADER: u64 = 0x10000;
const STATUS: u64 = 0x10100;
const DATA: u64 = 0x100000;
/// What the status byte holds before the device writes it.
const UNTOUCHED: u8 = 0xee;
/// virtio-blk request types and status codes.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// The first descriptor index the hand-made chains use (indirect requests take 0 on).
const FIRST: u16 = 64;

/// One descriptor: address, length, flags, next.
type Desc = (u64, u32, u16, u16);

/// Drives queue 0 of a connection one chain at a time.
struct Driver {
    fe: RawFrontend,
    ram: GuestRam,
    used: u16,
}

impl Driver {
    fn new(socket: &Path) -> Driver {
        Driver::with_ram(socket, GuestRam::new(RAM_BYTES, true))
    }

    /// As [`Driver::new`], over guest memory `ram` (one region of all of it).
    fn with_ram(socket: &Path, ram: GuestRam) -> Driver {
        let mut fe = RawFrontend::connect(socket, 1).unwrap();
        fe.set_memory(&ram, ram.len() as u64).unwrap();
        fe.start_queue(&ram, 0, 128).unwrap();
        Driver { fe, ram, used: 0 }
    }

    /// Writes `descs` into the queue's table from index [`FIRST`] on.
    fn direct(&self, descs: &[Desc]) -> u16 {
        let table = self.fe.queues[0].as_ref().unwrap().desc_addr();
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            self.ram.write_desc(
                table + 16 * (u64::from(FIRST) + i as u64),
                addr,
                len,
                flags,
                next,
            );
        }
        FIRST
    }

    /// Writes `descs` as an indirect table at `at` and a head descriptor pointing at it.
    fn indirect(&self, at: u64, descs: &[Desc]) -> u16 {
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            self.ram
                .write_desc(at + 16 * i as u64, addr, len, flags, next);
        }
        self.direct(&[(at, 16 * descs.len() as u32, F_INDIRECT, 0)])
    }

    /// Makes `head` available, waits for the device to return it, and returns the used
    /// element's length and the status byte at [`STATUS`].
    fn submit(&mut self, name: &str, head: u16) -> (u32, u8) {
        self.ram.write(STATUS, &[UNTOUCHED]);
        self.fe.push_head(&self.ram, 0, head);
        self.used = self.used.wrapping_add(1);
        self.fe
            .wait_used(&self.ram, 0, self.used, PATIENCE)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let used = self.fe.queues[0].as_ref().unwrap().used_addr();
        let slot = used + 4 + 8 * u64::from((self.used - 1) % 128);
        let mut elem = [0u8; 8];
        self.ram.read(slot, &mut elem);
        let id = u32::from_le_bytes(elem[0..4].try_into().unwrap());
        assert_eq!(id, u32::from(head), "{name}: another chain was returned");
        let mut status = [0u8];
        self.ram.read(STATUS, &mut status);
        (
            u32::from_le_bytes(elem[4..8].try_into().unwrap()),
            status[0],
        )
    }

    fn header(&self, request_type: u32, sector: u64) {
        self.ram.write_header(HEADER, request_type, sector);
    }
}

/// A chain of header, data and status as direct descriptors.
fn plain(data: &[(u64, u32, u16)]) -> Vec<Desc> {
    let mut descs = vec![(HEADER, 16, F_NEXT, FIRST + 1)];
    for (i, &(addr, len, flags)) in data.iter().enumerate() {
        descs.push((addr, len, flags | F_NEXT, FIRST + 2 + i as u16));
    }
    descs.push((STATUS, 1, F_WRITE, 0));
    descs
}

/// A discard / write-zeroes segment: sector, sectors, flags.
fn dwz(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    [
        sector.to_le_bytes().to_vec(),
        sectors.to_le_bytes().to_vec(),
        flags.to_le_bytes().to_vec(),
    ]
    .concat()
}

#[test]
fn malformed_requests_fail_alone() {
    let mut s = setup("malformed-requests");
    let disk_sectors = 64 * MIB / 512;
    let mut d = Driver::new(&s.disk);
    let w = F_WRITE;
    let honest = |d: &mut Driver, when: &str| {
        d.ram.write(DATA, &[0u8; 4096]);
        d.header(T_IN, 0);
        let head = d.direct(&plain(&[(DATA, 4096, w)]));
        assert_eq!(d.submit(when, head), (4097, S_OK), "{when}: an honest read");
        let mut got = vec![0u8; 4096];
        d.ram.read(DATA, &mut got);
        assert!(got.iter().all(|&b| b == DISK_BYTE), "{when}: wrong data");
    };
    honest(&mut d, "before anything");

    // (name, request type, sector, chain, what the device answers: used length, status)
    let r = 0u16;
    let cases = vec![
        (
            "a header split across two descriptors",
            T_IN,
            0,
            vec![
                (HEADER, 8, F_NEXT, FIRST + 1),
                (HEADER + 8, 8, F_NEXT, FIRST + 2),
                (DATA, 4096, w | F_NEXT, FIRST + 3),
                (STATUS, 1, w, 0),
            ],
            (4097, S_OK),
        ),
        (
            "a chain that loops",
            T_IN,
            0,
            vec![
                (HEADER, 16, F_NEXT, FIRST + 1),
                (STATUS, 1, w | F_NEXT, FIRST),
            ],
            (1, S_IOERR),
        ),
        (
            "a next index past the queue",
            T_IN,
            0,
            vec![(HEADER, 16, F_NEXT, 500), (STATUS, 1, w, 0)],
            (0, UNTOUCHED),
        ),
        (
            "a header in a device-writable descriptor",
            T_IN,
            0,
            plain(&[])
                .into_iter()
                .map(|(a, l, f, n)| (a, l, f | w, n))
                .collect(),
            (1, S_IOERR),
        ),
        (
            "a status byte in a device-readable descriptor",
            T_IN,
            0,
            vec![
                (HEADER, 16, F_NEXT, FIRST + 1),
                (DATA, 512, w | F_NEXT, FIRST + 2),
                (STATUS, 1, r, 0),
            ],
            (0, UNTOUCHED),
        ),
        (
            "a readable buffer after a writable one",
            T_IN,
            0,
            vec![
                (HEADER, 16, F_NEXT, FIRST + 1),
                (DATA, 512, w | F_NEXT, FIRST + 2),
                (DATA + 512, 512, F_NEXT, FIRST + 3),
                (STATUS, 1, w, 0),
            ],
            (1, S_IOERR),
        ),
        (
            "a read of 1000 bytes",
            T_IN,
            0,
            plain(&[(DATA, 1000, w)]),
            (1, S_IOERR),
        ),
        (
            "a read past the end of the disk",
            T_IN,
            disk_sectors - 1,
            plain(&[(DATA, 1024, w)]),
            (1, S_IOERR),
        ),
        (
            "a read at a sector whose offset overflows",
            T_IN,
            u64::MAX / 256,
            plain(&[(DATA, 512, w)]),
            (1, S_IOERR),
        ),
        (
            "a read into a buffer outside guest memory",
            T_IN,
            0,
            plain(&[(1 << 40, 4096, w)]),
            (1, S_IOERR),
        ),
        (
            "a read into a buffer that runs past guest memory",
            T_IN,
            0,
            plain(&[(RAM_BYTES as u64 - 512, 4096, w)]),
            (1, S_IOERR),
        ),
        (
            "a status byte outside guest memory",
            T_IN,
            0,
            vec![
                (HEADER, 16, F_NEXT, FIRST + 1),
                (DATA, 512, w | F_NEXT, FIRST + 2),
                (1 << 40, 1, w, 0),
            ],
            (0, UNTOUCHED),
        ),
        (
            "a write with a device-writable buffer",
            T_OUT,
            2048,
            plain(&[(DATA, 512, w)]),
            (1, S_IOERR),
        ),
        (
            "an unknown request type",
            0x1234,
            0,
            plain(&[]),
            (1, S_UNSUPP),
        ),
        (
            "GET_ID into 4 bytes",
            T_GET_ID,
            0,
            plain(&[(DATA, 4, w)]),
            (5, S_OK),
        ),
        (
            "GET_ID from a device-readable buffer",
            T_GET_ID,
            0,
            plain(&[(DATA, 20, r)]),
            (1, S_IOERR),
        ),
        (
            "a discard of no segment",
            T_DISCARD,
            0,
            plain(&[]),
            (1, S_IOERR),
        ),
        (
            "a discard of 17 segments",
            T_DISCARD,
            0,
            plain(&[(DATA, 17 * 16, r)]),
            (1, S_IOERR),
        ),
        (
            "a discard of half a segment",
            T_DISCARD,
            0,
            plain(&[(DATA, 8, r)]),
            (1, S_IOERR),
        ),
        (
            "a discard with the unmap flag",
            T_DISCARD,
            0,
            plain(&[(DATA + 0x1000, 16, r)]),
            (1, S_UNSUPP),
        ),
        (
            "write zeroes with reserved flags",
            T_WRITE_ZEROES,
            0,
            plain(&[(DATA + 0x2000, 16, r)]),
            (1, S_UNSUPP),
        ),
        (
            "write zeroes of 4 GiB",
            T_WRITE_ZEROES,
            0,
            plain(&[(DATA + 0x3000, 16, r)]),
            (1, S_IOERR),
        ),
        (
            "write zeroes past the end of the disk",
            T_WRITE_ZEROES,
            0,
            plain(&[(DATA + 0x4000, 16, r)]),
            (1, S_IOERR),
        ),
    ];
    d.ram.write(DATA + 0x1000, &dwz(2048, 8, 1));
    d.ram.write(DATA + 0x2000, &dwz(2048, 8, 2));
    d.ram.write(DATA + 0x3000, &dwz(2048, u32::MAX, 0));
    d.ram.write(DATA + 0x4000, &dwz(disk_sectors - 4, 8, 0));
    for (name, request_type, sector, descs, want) in cases {
        d.header(request_type, sector);
        let head = d.direct(&descs);
        assert_eq!(d.submit(name, head), want, "{name}: (used length, status)");
        s.daemon.assert_alive(name);
    }

    // Indirect tables that cannot be.
    let good = [
        (HEADER, 16, F_NEXT, 1),
        (DATA, 512, w | F_NEXT, 2),
        (STATUS, 1, w, 0),
    ];
    d.header(T_IN, 0);
    for (name, head, want) in [
        (
            "an indirect table inside an indirect table",
            {
                d.ram.write_desc(TABLE + 0x1000, TABLE, 48, F_INDIRECT, 0);
                d.ram.write_desc(TABLE + 0x1010, STATUS, 1, w, 0);
                for (i, &(a, l, f, n)) in good.iter().enumerate() {
                    d.ram.write_desc(TABLE + 16 * i as u64, a, l, f, n);
                }
                d.direct(&[(TABLE + 0x1000, 32, F_INDIRECT, 0)])
            },
            (0, UNTOUCHED),
        ),
        (
            "an indirect table of 0 bytes",
            d.direct(&[(TABLE, 0, F_INDIRECT, 0)]),
            (0, UNTOUCHED),
        ),
        (
            "an indirect table of 17 bytes",
            d.direct(&[(TABLE, 17, F_INDIRECT, 0)]),
            (0, UNTOUCHED),
        ),
        (
            "an indirect table past the end of guest memory",
            d.direct(&[(RAM_BYTES as u64 - 16, 48, F_INDIRECT, 0)]),
            (0, UNTOUCHED),
        ),
        (
            "an indirect descriptor that also has NEXT",
            d.direct(&[
                (TABLE, 48, F_INDIRECT | F_NEXT, FIRST + 1),
                (STATUS, 1, w, 0),
            ]),
            (0, UNTOUCHED),
        ),
    ] {
        assert_eq!(d.submit(name, head), want, "{name}: (used length, status)");
        s.daemon.assert_alive(name);
    }
    // 5000 descriptors in one indirect table: more than any chain may have. The device reads
    // no further than 4096 of them, so it never reaches the status byte.
    let mut long = vec![(HEADER, 16, F_NEXT, 1)];
    for i in 1..4999u16 {
        long.push((DATA, 0, w | F_NEXT, i + 1));
    }
    long.push((STATUS, 1, w, 0));
    let head = d.indirect(TABLE + 0x10000, &long);
    assert_eq!(
        d.submit("a chain of 5000 descriptors", head),
        (0, UNTOUCHED),
        "a chain of 5000 descriptors: (used length, status)"
    );

    // The queue goes on serving its guest.
    honest(&mut d, "after malformed requests");

    // A head past the end of the queue's table: the chain has no descriptor to walk and no
    // used element can name it, so it is dropped, and said so; the queue goes on.
    let line = "Cannot return a request to the guest";
    let before = s.count(line);
    d.fe.push_head(&d.ram, 0, 200);
    s.logged("a head past the queue", line, before);
    honest(&mut d, "after a head past the queue");
    drop(d);
    s.still_serving("after malformed requests");

    // A read-only export: writes fail, flushes succeed, discard and write zeroes are not
    // offered.
    let mut d = Driver::new(&s.other);
    d.ram.write(DATA + 0x1000, &dwz(2048, 8, 0));
    for (name, request_type, data, want) in [
        ("a write", T_OUT, vec![(DATA, 512, r)], (1, S_IOERR)),
        ("a flush", T_FLUSH, vec![], (1, S_OK)),
        (
            "a discard",
            T_DISCARD,
            vec![(DATA + 0x1000, 16, r)],
            (1, S_UNSUPP),
        ),
        (
            "write zeroes",
            T_WRITE_ZEROES,
            vec![(DATA + 0x1000, 16, r)],
            (1, S_UNSUPP),
        ),
    ] {
        d.header(request_type, 2048);
        let head = d.direct(&plain(&data));
        let name = format!("{name} on a read-only export");
        assert_eq!(d.submit(&name, head), want, "{name}: (used length, status)");
    }
    drop(d);
    s.still_serving("after requests a read-only export refuses");
}

/// How far the daemon's RssAnon may rise while a frontend floods it and never reads.
const FLOOD_SLACK_KIB: u64 = 16 << 10;

/// Sends copies of `msg` on `wire` (made non-blocking) until the socket has taken nothing for
/// half a second: the daemon has stopped reading. Returns how many whole messages went.
fn flood(wire: &Wire, msg: &[u8]) -> usize {
    wire.sock.set_nonblocking(true).unwrap();
    let mut sent = 0usize;
    let mut bytes = 0usize;
    let mut idle = 0;
    while idle < 50 {
        let at = bytes % msg.len();
        match (&wire.sock).write(&msg[at..]) {
            Ok(n) => {
                bytes += n;
                sent = bytes / msg.len();
                idle = 0;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                idle += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("flood: {e}"),
        }
    }
    sent
}

#[test]
fn frontends_that_flood_stall_or_leave_mid_way() {
    let mut s = setup("flood-stall-leave");
    let pid = s.daemon.pid();

    // Messages that ask for answers, never read: the daemon stops reading the frontend once
    // its answers have nowhere to go; it holds a bounded amount for it; the other export
    // answers meanwhile; the attacked one takes the next connection once this one leaves.
    let (_, anon0) = frontend::rss_kib(pid);
    let wire = Wire::connect(&s.disk).unwrap();
    let sent = flood(&wire, &frontend::message(GET_FEATURES, VERSION_1, 0, &[]));
    assert!(sent > 0);
    read_answers(&s.other, &[OTHER_BYTE; SHOWN]);
    let (_, anon1) = frontend::rss_kib(pid);
    assert!(
        anon1 <= anon0 + FLOOD_SLACK_KIB,
        "RssAnon went from {anon0} KiB to {anon1} KiB under {sent} unanswered messages"
    );
    eprintln!("{sent} messages never answered: RssAnon {anon0} KiB -> {anon1} KiB");
    drop(wire);
    s.still_serving("after a flood of messages never answered");
    let (fe, wire) = handshake(&s.disk);
    let body = vring_state(0, 0);
    let sent = flood(
        &wire,
        &frontend::message(
            SET_VRING_BASE,
            VERSION_1 | NEED_REPLY,
            body.len() as u32,
            &body,
        ),
    );
    assert!(sent > 0);
    read_answers(&s.other, &[OTHER_BYTE; SHOWN]);
    let (_, anon1) = frontend::rss_kib(pid);
    assert!(
        anon1 <= anon0 + FLOOD_SLACK_KIB,
        "RssAnon went from {anon0} KiB to {anon1} KiB under {sent} REPLY_ACKs never read"
    );
    eprintln!("{sent} REPLY_ACKs never read: RssAnon {anon0} KiB -> {anon1} KiB");
    drop(fe);
    drop(wire);
    s.still_serving("after a flood of REPLY_ACKs never read");

    // Leaving in the middle of a message: half a header; a header and half its body; the
    // first bytes of a message that carries a descriptor.
    let efd = eventfd();
    let table = mem_table(1, &[region(0, 4096, 0x1000, 0)]);
    let whole = frontend::message(SET_MEM_TABLE, VERSION_1, table.len() as u32, &table);
    for (name, bytes, fds) in [
        ("half a header", &whole[..6], vec![]),
        ("a header and half its body", &whole[..12 + 20], vec![]),
        (
            "the first bytes of a message with a descriptor",
            &whole[..16],
            vec![efd.as_raw_fd()],
        ),
    ] {
        let (fe, wire) = handshake(&s.disk);
        wire.send_bytes(bytes, &fds).unwrap();
        drop(fe);
        drop(wire);
        s.still_serving(&format!("after a frontend left after {name}"));
    }

    // Requests in flight while the memory table is sent again (as QEMU does on memory
    // hotplug): they complete, with the right data; then a table over other memory, which
    // the rings no longer lie in: the queue is the frontend's to have broken.
    let ram = GuestRam::new(RAM_BYTES, true);
    let mut fe = RawFrontend::connect(&s.disk, 2).unwrap();
    fe.set_memory(&ram, RAM_BYTES as u64).unwrap();
    fe.start_queue(&ram, 0, 128).unwrap();
    ram.write_header(HEADER, T_IN, 0);
    let bufs: Vec<(u64, u32)> = (0..32).map(|i| (DATA + i * 65536, 65536)).collect();
    let len = ram.write_request_table(TABLE, HEADER, &bufs, true, STATUS);
    for _ in 0..8 {
        fe.add_indirect(&ram, 0, TABLE, len);
    }
    fe.kick(0);
    for _ in 0..16 {
        fe.set_memory(&ram, RAM_BYTES as u64).unwrap();
    }
    fe.wait_used(&ram, 0, 8, PATIENCE).unwrap();
    let mut got = vec![0u8; SHOWN];
    ram.read(DATA, &mut got);
    assert!(
        got.iter().all(|&b| b == DISK_BYTE),
        "wrong data read across new memory tables"
    );
    for _ in 0..8 {
        fe.add_indirect(&ram, 0, TABLE, len);
    }
    fe.kick(0);
    let other_ram = GuestRam::new(RAM_BYTES, true);
    fe.set_memory(&other_ram, RAM_BYTES as u64).unwrap();
    fe.kick(0);
    std::thread::sleep(Duration::from_millis(200));
    drop(fe);
    s.still_serving("after memory tables sent again with requests in flight");

    // GET_VRING_BASE with requests in flight, and the frontend gone before the answer.
    let mut fe = RawFrontend::connect(&s.disk, 2).unwrap();
    fe.set_memory(&ram, RAM_BYTES as u64).unwrap();
    fe.start_queue(&ram, 1, 128).unwrap();
    let big: Vec<(u64, u32)> = (0..32).map(|_| (DATA, 1 << 20)).collect();
    let len = ram.write_request_table(TABLE + 0x1000, HEADER, &big, true, STATUS);
    for _ in 0..32 {
        fe.add_indirect(&ram, 1, TABLE + 0x1000, len);
    }
    fe.kick(1);
    let wire = Wire::of(&fe);
    wire.send(GET_VRING_BASE, VERSION_1, &vring_state(1, 0), &[])
        .unwrap();
    drop(fe);
    drop(wire);
    s.still_serving("after a frontend left in the middle of GET_VRING_BASE");

    // The available ring's next index set far past the ring while the queue runs: the
    // queue takes nothing more, and says so.
    let line = "broke the available ring";
    let before = s.count(line);
    let mut fe = RawFrontend::connect(&s.disk, 2).unwrap();
    fe.set_memory(&ram, RAM_BYTES as u64).unwrap();
    fe.start_queue(&ram, 0, 128).unwrap();
    let wire = Wire::of(&fe);
    let ack = wire
        .ask(SET_VRING_BASE, &vring_state(0, 1000), &[], PATIENCE)
        .unwrap()
        .expect("SET_VRING_BASE answered");
    assert_eq!(status(&ack), 0);
    ram.write_header(HEADER, T_IN, 0);
    let one = ram.write_request_table(TABLE, HEADER, &[(DATA, 4096)], true, STATUS);
    fe.push_indirect(&ram, 0, TABLE, one);
    s.logged("SET_VRING_BASE past the ring", line, before);
    drop(fe);
    drop(wire);
    s.still_serving("after SET_VRING_BASE past the ring");

    // The used ring laid over the descriptor table: each used element lands on descriptors
    // the device has consumed already, so the reads complete, into the guest's own memory.
    let ram = GuestRam::new(RAM_BYTES, true);
    let mut fe = RawFrontend::connect(&s.disk, 2).unwrap();
    fe.set_memory(&ram, RAM_BYTES as u64).unwrap();
    fe.start_queue(&ram, 0, 128).unwrap();
    let wire = Wire::of(&fe);
    let base = ram.addr();
    let ack = wire
        .ask(
            SET_VRING_ADDR,
            &vring_addr(0, 0, base, base, base + 0x800),
            &[],
            PATIENCE,
        )
        .unwrap()
        .expect("SET_VRING_ADDR answered");
    assert_eq!(
        status(&ack),
        0,
        "a used ring over the descriptor table was refused"
    );
    ram.write_header(HEADER, T_IN, 0);
    let one = ram.write_request_table(TABLE, HEADER, &[(DATA, 4096)], true, STATUS);
    for n in 1..=4u16 {
        ram.write(DATA, &[0u8; 4096]);
        fe.push_indirect(&ram, 0, TABLE, one);
        let deadline = std::time::Instant::now() + PATIENCE;
        // The used index lies where the used ring does: on the descriptor table.
        while ram.read_u16(2) != n {
            assert!(
                std::time::Instant::now() < deadline,
                "read {n} over a used ring on the descriptor table never completed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut got = vec![0u8; 4096];
        ram.read(DATA, &mut got);
        assert!(got.iter().all(|&b| b == DISK_BYTE), "read {n}: wrong data");
    }
    drop(fe);
    drop(wire);
    s.still_serving("after a used ring over the descriptor table");
}

/// `qcow2d ctl --control CONTROL resize SOCKET SIZE`, bounded by a minute; its output.
fn resize(s: &Setup, size: &str) -> CmdOutput {
    let mut cmd = std::process::Command::new(daemon_bin());
    cmd.arg("ctl")
        .arg("--control")
        .arg(&s.control)
        .arg("resize")
        .arg(&s.disk)
        .arg(size);
    run_cmd(&mut cmd, PATIENCE)
}

/// A connected socket pair whose first end cannot take one more byte (its peer, the second
/// end, never reads); both ends blocking.
fn full_socket() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let chunk = [0u8; 4096];
    while (&a).write(&chunk).is_ok() {}
    a.set_nonblocking(false).unwrap();
    (a, b)
}

/// The frontend shares a backend request channel that never takes the config-change message:
/// an online resize still completes (the message gives up after its timeout, and says so),
/// and both exports go on serving.
#[test]
fn a_backend_channel_nobody_reads_does_not_stall_a_resize() {
    resize_with_a_stalled_channel("stalled-channel", false);
}

/// As above, but the frontend clears the channel's send timeout after sharing it: the socket
/// is shared, so a send timeout (or blocking mode) the daemon relied on would be the
/// frontend's to take back. The resize must still complete.
#[test]
fn a_backend_channel_whose_timeout_the_frontend_resets_does_not_stall_a_resize() {
    resize_with_a_stalled_channel("reset-channel-timeout", true);
}

/// Shares a full socket nobody reads as the backend request channel (its send timeout
/// cleared after the daemon took it if `clear_timeout`), resizes the export online, and
/// checks that the resize completes, the daemon says it could not tell the frontend, and
/// both exports go on serving.
fn resize_with_a_stalled_channel(name: &str, clear_timeout: bool) {
    let mut s = setup(name);
    let (fe, wire) = handshake(&s.disk);
    let (channel, _peer) = full_socket();
    let ack = wire
        .ask(SET_BACKEND_REQ_FD, &[], &[channel.as_raw_fd()], PATIENCE)
        .unwrap()
        .expect("SET_BACKEND_REQ_FD answered");
    assert_eq!(
        status(&ack),
        0,
        "a socket as the backend request channel was refused"
    );
    if clear_timeout {
        channel.set_write_timeout(None).unwrap();
    }
    let line = "Cannot tell the frontend of the new size";
    let before = s.count(line);
    let out = resize(&s, "96M");
    assert!(out.status.success(), "resize failed: {}", out.stderr);
    s.logged("a config change nobody reads", line, before);
    drop(fe);
    drop(wire);
    s.still_serving("after a resize with a stalled backend channel");
}

/// More memory tables than the SIGBUS handler has room for, on one connection (each table is
/// registered with it while something holds the table), then a table over fresh memory
/// that cannot be sealed, truncated under the daemon: the pages cut off must read as zeros,
/// as they do for the first tables, not kill the daemon.
#[test]
fn a_frontend_cannot_use_up_the_truncation_guards() {
    let mut s = setup("truncation-guards");
    let ram = GuestRam::new(RAM_BYTES, false);
    let mut fe = RawFrontend::connect(&s.disk, 2).unwrap();
    for i in 0..1100 {
        fe.set_memory(&ram, RAM_BYTES as u64)
            .unwrap_or_else(|e| panic!("memory table {i}: {e}"));
    }
    // Larger than the mappings before, so it lands where none of them was.
    let fresh = GuestRam::new(64 << 20, false);
    fe.set_memory(&fresh, 64 << 20).unwrap();
    fe.start_queue(&fresh, 0, 128).unwrap();
    fresh.file.set_len(0).unwrap();
    // The worker reads the ring's index at each kick.
    let before = s.count(CUT_SHORT);
    kick_ten_times(&fe);
    drop(fe);
    s.read_cut_pages_as_zeros(before);
    s.still_serving("after a frontend used up the truncation guards");
}

/// Three connections (one per export) fill the memory slots they were offered with regions
/// of memfds that cannot be sealed: more such regions than the SIGBUS handler's registry
/// once had room for in the whole process (1024). The last region of the last connection
/// holds its rings and is truncated under the daemon: the pages cut off must read as zeros,
/// as the first regions' do, not kill the daemon; the other exports go on serving.
#[test]
fn unsealed_memory_of_many_connections_stays_guarded() {
    let mut s = setup_extra("many-unsealed", 2);
    let sockets = [s.disk.clone(), s.extra[0].clone(), s.extra[1].clone()];
    // Where the filler regions claim to be mapped in the frontend: nowhere the rings are.
    const FILLER_USER: u64 = 0x4000_0000_0000;
    let victim = GuestRam::new(64 << 10, false);
    let mut connections = Vec::new();
    for (n, socket) in sockets.iter().enumerate() {
        let (fe, wire) = handshake(socket);
        let slots = wire
            .ask(GET_MAX_MEM_SLOTS, &[], &[], PATIENCE)
            .unwrap()
            .and_then(|m| m.u64_at(0))
            .expect("GET_MAX_MEM_SLOTS answered");
        let filler = GuestRam::new(4096, false);
        let last = n + 1 == sockets.len();
        for i in 0..slots {
            // The last connection's last region: its rings, in a file of their own.
            let (ram, len, user) = if last && i + 1 == slots {
                (&victim, victim.len() as u64, victim.addr())
            } else {
                (&filler, 4096, FILLER_USER + (i << 20))
            };
            let ack = wire
                .ask(
                    ADD_MEM_REG,
                    &one_region(i << 20, len, user, 0),
                    &[ram.file.as_raw_fd()],
                    PATIENCE,
                )
                .unwrap()
                .unwrap_or_else(|| {
                    panic!(
                        "connection {n} ended at slot {i} of {slots}; stderr:\n{}",
                        s.daemon.stderr()
                    )
                });
            assert_eq!(
                status(&ack),
                0,
                "connection {n}: slot {i} of {slots} refused"
            );
        }
        connections.push((fe, wire, filler));
    }
    let (fe, _, _) = connections.last_mut().unwrap();
    fe.start_queue_with(&victim, 0, 128, 0, eventfd(), eventfd())
        .unwrap();
    victim.file.set_len(0).unwrap();
    // The worker reads the ring's index at each kick.
    let before = s.count(CUT_SHORT);
    kick_ten_times(fe);
    drop(connections);
    s.read_cut_pages_as_zeros(before);
    s.still_serving("after three connections filled their slots with unsealed memory");
}

/// Guest memory on 2 MiB huge pages that cannot be sealed (a memfd made with MFD_HUGETLB
/// and without MFD_ALLOW_SEALING, like the hugetlbfs files of QEMU's
/// `memory-backend-file,mem-path=/dev/hugepages`), holding the rings and the buffers of reads
/// in flight, truncated under the daemon and kicked: the huge pages cut off must read as zeros
/// (a zero page of 4 KiB cannot be mapped into a huge-page mapping), not kill the daemon; the
/// attacked export takes the next client and the other export answers
/// ([`huge_pages_truncated_under_the_daemon`]). Needs 4 huge pages of 2 MiB reserved
/// (`/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages`, or `/proc/sys/vm/nr_hugepages`,
/// which `.ci/run` sets): without them it fails.
#[test]
fn guest_memory_on_huge_pages_truncated_under_the_daemon() {
    const HUGE: usize = 2 << 20;
    let mut s = setup("huge-pages");
    huge_pages_truncated_under_the_daemon(&mut s, GuestRam::huge(4 * HUGE, HUGE, false));
}

/// Gigantic pages: 1 GiB huge pages.
const GIGANTIC: usize = 1 << 30;
/// Held by the tests that map guest memory on a gigantic page: a machine may have only one
/// reserved, and the tests of this file run in parallel.
static GIGANTIC_PAGE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether a gigantic page is reserved for the tests; when none is (the kernel or the CPU
/// has no 1 GiB pages, or none could be reserved), says loudly, naming the knob, that the
/// test `name` cannot run. With one reserved the test runs, and fails on any error.
fn gigantic_page_reserved(name: &str) -> bool {
    let knob = qcow2d_tests::frontend::huge_page_knob(GIGANTIC);
    match qcow2d_tests::frontend::reserved_huge_pages(GIGANTIC) {
        Some(reserved) if reserved > 0 => true,
        reserved => {
            eprintln!(
                "\n!!!!!!!! {name} CANNOT RUN: it needs a 1 GiB huge page reserved, and {} \
                 (as root: `echo 1 > {}`; .ci/run tries). NOTHING WAS TESTED. !!!!!!!!\n",
                match reserved {
                    Some(_) => format!("{} is 0", knob.display()),
                    None => format!(
                        "{} does not exist (a kernel or CPU without 1 GiB pages)",
                        knob.display()
                    ),
                },
                knob.display()
            );
            false
        }
    }
}

/// As [`guest_memory_on_huge_pages_truncated_under_the_daemon`], on one gigantic page (a
/// memfd made with MFD_HUGETLB | MFD_HUGE_1GB, without MFD_ALLOW_SEALING, as QEMU's
/// `mem-path` files on a hugetlbfs mounted with `pagesize=1G`): the whole gigantic page cut
/// off must read as zeros. Needs one 1 GiB huge page reserved
/// (`/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages`, which `.ci/run` tries to
/// set): without one it says loudly that it cannot run; with one it runs and fails on error.
#[test]
fn guest_memory_on_a_gigantic_page_truncated_under_the_daemon() {
    let name = "guest_memory_on_a_gigantic_page_truncated_under_the_daemon";
    if !gigantic_page_reserved(name) {
        return;
    }
    let _page = GIGANTIC_PAGE.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup("gigantic-page");
    huge_pages_truncated_under_the_daemon(&mut s, GuestRam::huge(GIGANTIC, GIGANTIC, false));
}

/// Guest memory on gigantic pages sealed against shrinking (a memfd made with MFD_HUGETLB |
/// MFD_HUGE_1GB | MFD_ALLOW_SEALING, as QEMU's `memory-backend-memfd,hugetlb=on,
/// hugetlbsize=1G` makes it) can still fault under the daemon: a page of it that is not backed
/// (never touched by the frontend, or punched out with FALLOC_FL_PUNCH_HOLE, which
/// F_SEAL_SHRINK allows) takes a free huge page at the daemon's first access, and when the
/// host has none left, that access raises SIGBUS. Here the frontend backs as many gigantic
/// pages as are free, declares one more, and puts a request's header on that last page: the
/// daemon must read it as zeros (a read of sector 0, into a buffer on a backed page, which
/// then holds the disk's bytes), not die; the export takes the next client and the other
/// export answers. Needs a 1 GiB huge page reserved, as
/// [`guest_memory_on_a_gigantic_page_truncated_under_the_daemon`].
#[test]
fn sealed_guest_memory_on_gigantic_pages_the_host_cannot_back() {
    let name = "sealed_guest_memory_on_gigantic_pages_the_host_cannot_back";
    if !gigantic_page_reserved(name) {
        return;
    }
    let _page = GIGANTIC_PAGE.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup("gigantic-unbacked");
    let free = qcow2d_tests::frontend::free_huge_pages(GIGANTIC).unwrap_or(0) as usize;
    assert!(
        free > 0,
        "a 1 GiB page is reserved, but none is free: another process holds it"
    );
    let ram = GuestRam::huge(free * GIGANTIC, GIGANTIC, true);
    assert_eq!(qcow2d_tests::frontend::free_huge_pages(GIGANTIC), Some(0));
    let len = ((free + 1) * GIGANTIC) as u64;
    ram.file.set_len(len).unwrap();
    let mut fe = RawFrontend::connect(&s.disk, 2).unwrap();
    fe.set_memory(&ram, len).unwrap();
    fe.start_queue(&ram, 0, 128).unwrap();
    let unbacked = (free * GIGANTIC) as u64 + HEADER;
    let buffer = DATA;
    ram.write(buffer, &[0u8; 4096]);
    ram.write(STATUS, &[UNTOUCHED]);
    let table = 0x30000;
    let table_len = ram.write_request_table(table, unbacked, &[(buffer, 4096)], true, STATUS);
    let before = s.count(CUT_SHORT);
    fe.push_indirect(&ram, 0, table, table_len);
    let deadline = std::time::Instant::now() + PATIENCE;
    while let Err(e) = fe.wait_used(&ram, 0, 1, Duration::from_millis(50)) {
        if let Some(status) = s.daemon.try_exit_status() {
            panic!(
                "the daemon died ({status}) when it read a page the host could not back; \
                 stderr:\n{}",
                s.daemon.stderr()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the request with its header on an unbacked page: {e}; stderr:\n{}",
            s.daemon.stderr()
        );
    }
    let mut status = [0u8];
    ram.read(STATUS, &mut status);
    assert_eq!(
        status[0], S_OK,
        "a header read as zeros is a read of sector 0"
    );
    let mut got = vec![0u8; 4096];
    ram.read(buffer, &mut got);
    assert!(
        got.iter().all(|&b| b == DISK_BYTE),
        "the read brought the disk's bytes"
    );
    drop(fe);
    s.read_cut_pages_as_zeros(before);
    drop(ram);
    s.still_serving("after sealed guest memory on gigantic pages the host could not back");
}

/// Reads and writes through guest memory on one gigantic page: a write from a buffer far into
/// the page lands on the disk, and reads into buffers elsewhere in it (one across its middle,
/// one at its very end) bring back what the disk holds. Needs one 1 GiB huge page reserved, as
/// [`guest_memory_on_a_gigantic_page_truncated_under_the_daemon`].
#[test]
fn reads_and_writes_through_guest_memory_on_a_gigantic_page() {
    let name = "reads_and_writes_through_guest_memory_on_a_gigantic_page";
    if !gigantic_page_reserved(name) {
        return;
    }
    let _page = GIGANTIC_PAGE.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup("gigantic-page-io");
    let mut d = Driver::with_ram(&s.disk, GuestRam::huge(GIGANTIC, GIGANTIC, false));
    const LEN: u32 = 64 << 10;
    // Past the first 64 KiB that `still_serving` reads back.
    const SECTOR: u64 = 1024;
    let source = 0x3000_0000u64;
    let pattern: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    d.ram.write(source, &pattern);
    d.header(T_OUT, SECTOR);
    let head = d.direct(&plain(&[(source, LEN, 0)]));
    assert_eq!(d.submit("a write", head), (1, S_OK), "a write");
    let last = GIGANTIC as u64 - u64::from(LEN);
    for (what, sector, at, want) in [
        ("what was written", SECTOR, last, pattern.clone()),
        (
            "the disk's first bytes",
            0,
            0x2000_0000 - 0x1000,
            vec![DISK_BYTE; LEN as usize],
        ),
    ] {
        d.ram.write(at, &vec![0u8; LEN as usize]);
        d.header(T_IN, sector);
        let head = d.direct(&plain(&[(at, LEN, F_WRITE)]));
        assert_eq!(d.submit(what, head), (LEN + 1, S_OK), "a read of {what}");
        let mut got = vec![0u8; LEN as usize];
        d.ram.read(at, &mut got);
        assert!(got == want, "a read of {what} at {at:#x}: wrong data");
    }
    drop(d);
    s.still_serving("after reads and writes through a gigantic page");
}

/// Memory regions in files of huge pages (2 MiB, and 1 GiB where the kernel has such pages)
/// must start and end on the file's pages: a region at an offset inside a huge page cannot be
/// mapped, and one whose size ends inside a huge page is mapped to the page's end, which the
/// daemon could not unmap with the region's own size later (a hugetlb mapping splits only at
/// its page boundaries), so every such table would leave a mapping behind in the daemon.
/// Both are refused by the relay, in SET_MEM_TABLE and ADD_MEM_REG, with a line naming the
/// page size; a region on whole pages of the same file is taken, and once its connection
/// ends, no mapping of the file is left in the daemon. Needs no huge page reserved (the
/// files are never mapped here, and the daemon maps them with MAP_NORESERVE); without 1 GiB
/// pages in the kernel, it says loudly that it tested 2 MiB pages only.
#[test]
fn memory_regions_not_on_whole_huge_pages_are_refused() {
    const HUGE: usize = 2 << 20;
    const NOT_WHOLE: &str = "not a multiple of the file's page size";
    let mut s = setup("huge-page-alignment");
    let mut sizes = vec![HUGE];
    if qcow2d_tests::frontend::reserved_huge_pages(GIGANTIC).is_some() {
        sizes.push(GIGANTIC);
    } else {
        eprintln!(
            "\n!!!!!!!! memory_regions_not_on_whole_huge_pages_are_refused tests 2 MiB pages \
             ONLY: the kernel has no 1 GiB pages ({} does not exist). !!!!!!!!\n",
            qcow2d_tests::frontend::huge_page_knob(GIGANTIC).display()
        );
    }
    for page in sizes {
        let file = qcow2d_tests::frontend::huge_memfd(2 * page, page, false)
            .unwrap_or_else(|e| panic!("a memfd of {page}-byte pages: {e}"));
        let fd = file.as_raw_fd();
        let p = page as u64;
        let user = 0x7f00_0000_0000u64;
        for (what, size, offset) in [
            ("at an offset inside a huge page", p, p / 2),
            ("at an offset of base pages only", p, 4096),
            ("ending inside a huge page", p / 2, 0),
            ("of one base page", 4096, p),
        ] {
            for request in [SET_MEM_TABLE, ADD_MEM_REG] {
                let name = format!("a region of {page}-byte pages {what} ({request})");
                let body = if request == SET_MEM_TABLE {
                    mem_table(1, &[region(0, size, user, offset)])
                } else {
                    one_region(0, size, user, offset)
                };
                let before = s.count(NOT_WHOLE);
                let (fe, wire) = handshake(&s.disk);
                if let Some(msg) = wire.ask(request, &body, &[fd], PATIENCE).unwrap() {
                    assert_ne!(status(&msg), 0, "{name}: the daemon answered success");
                }
                drop(fe);
                ends_connection(&mut s, &name, wire, NOT_WHOLE, before);
            }
        }
        // Whole pages: taken.
        let (fe, wire) = handshake(&s.disk);
        for (request, body) in [
            (SET_MEM_TABLE, mem_table(1, &[region(0, p, user, p)])),
            (ADD_MEM_REG, one_region(p, p, user + p, 0)),
        ] {
            let answer = wire.ask(request, &body, &[fd], PATIENCE).unwrap();
            let answer = answer.unwrap_or_else(|| {
                panic!(
                    "whole pages of {page} bytes ({request}): the connection ended; stderr:\n{}",
                    s.daemon.stderr()
                )
            });
            assert_eq!(
                status(&answer),
                0,
                "whole pages of {page} bytes ({request})"
            );
        }
        drop(fe);
        drop(wire);
        s.still_serving(&format!("after regions of {page}-byte pages"));
        // Nothing of the file is left mapped in the daemon once its connections are gone.
        let maps = format!("/proc/{}/maps", s.daemon.pid());
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let text = std::fs::read_to_string(&maps).unwrap();
            let left: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("hostile-huge-ram"))
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "mappings of {page}-byte pages left in the daemon:\n{}",
                left.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `ram`, unsealable guest memory on huge pages, holds the rings of queue 0 of the writable
/// export and the buffers of three reads in flight (in its second, third and fourth quarters:
/// on other huge pages than the rings, or far into the one gigantic page), is truncated under
/// the daemon and kicked: the daemon reads the pages cut off as zeros instead of dying, the
/// attacked export takes the next client and the other export answers.
fn huge_pages_truncated_under_the_daemon(s: &mut Setup, ram: GuestRam) {
    let len = ram.len() as u64;
    let mut fe = RawFrontend::connect(&s.disk, 2).unwrap();
    fe.set_memory(&ram, len).unwrap();
    // Rings at the start, each read's four buffers of 512 KiB in a quarter of its own.
    fe.start_queue(&ram, 0, 128).unwrap();
    for (i, table) in [0x30000u64, 0x40000, 0x50000].into_iter().enumerate() {
        let header = HEADER + 0x200 * i as u64;
        ram.write_header(header, T_IN, 0);
        let buffers: Vec<(u64, u32)> = (0..4)
            .map(|b| (len / 4 * (i as u64 + 1) + (b << 19), 1 << 19))
            .collect();
        let table_len = ram.write_request_table(table, header, &buffers, true, header + 0x100);
        fe.push_indirect(&ram, 0, table, table_len);
    }
    let before = s.count(CUT_SHORT);
    // Nothing here touches guest memory from now on: the test's own mapping of it faults too.
    ram.file.set_len(0).unwrap();
    kick_ten_times(&fe);
    drop(fe);
    s.read_cut_pages_as_zeros(before);
    drop(ram);
    s.still_serving("after guest memory on huge pages was truncated under the daemon");
}

/// The daemon advertises how many memory slots a frontend may add (GET_MAX_MEM_SLOTS); one
/// more is refused.
#[test]
fn memory_slots_beyond_the_advertised_maximum_are_refused() {
    let mut s = setup("memory-slots");
    let (fe, wire) = handshake(&s.disk);
    let max = wire
        .ask(GET_MAX_MEM_SLOTS, &[], &[], PATIENCE)
        .unwrap()
        .and_then(|m| m.u64_at(0))
        .expect("GET_MAX_MEM_SLOTS answered");
    let ram = GuestRam::new(1 << 20, true);
    let fd = ram.file.as_raw_fd();
    for i in 0..max {
        let ack = wire
            .ask(
                ADD_MEM_REG,
                &one_region(i << 20, 4096, ram.addr(), 0),
                &[fd],
                PATIENCE,
            )
            .unwrap()
            .unwrap_or_else(|| panic!("the connection ended at slot {i} of {max}"));
        assert_eq!(status(&ack), 0, "slot {i} of {max} refused");
    }
    let answer = wire
        .ask(
            ADD_MEM_REG,
            &one_region(max << 20, 4096, ram.addr(), 0),
            &[fd],
            PATIENCE,
        )
        .unwrap();
    if let Some(ack) = answer {
        assert_ne!(
            status(&ack),
            0,
            "slot {max}, past the {max} advertised, was accepted"
        );
    }
    drop(fe);
    drop(wire);
    s.still_serving("after memory slots past the maximum");
}

/// What one frontend may replace or share as often as it likes: in-flight areas replaced
/// 200 times (the daemon keeps the last one mapped, not all of them), and two queues on the
/// same rings, served by two workers at once (every chain is answered, by either or both).
#[test]
fn areas_replaced_and_rings_shared() {
    let mut s = setup("replaced-and-shared");
    let pid = s.daemon.pid();
    let (fe, wire) = handshake(&s.disk);
    let area = GuestRam::new(256 << 20, true);
    // SAFETY: fcntl(F_ADD_SEALS) on a descriptor we own, with an integer argument.
    let sealed = unsafe {
        libc::fcntl(
            area.file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK,
        )
    };
    assert_eq!(sealed, 0, "seal the in-flight area");
    let vm_before = vm_size_kib(pid);
    for i in 0..200 {
        let ack = wire
            .ask(
                SET_INFLIGHT_FD,
                &inflight(256 << 20, 0, 64, 32768),
                &[area.file.as_raw_fd()],
                PATIENCE,
            )
            .unwrap()
            .unwrap_or_else(|| panic!("in-flight area {i}: the connection ended"));
        assert_eq!(status(&ack), 0, "in-flight area {i} refused");
    }
    let vm_after = vm_size_kib(pid);
    assert!(
        vm_after < vm_before + (1 << 20),
        "200 in-flight areas of 256 MiB took the address space from {vm_before} KiB to \
         {vm_after} KiB"
    );
    drop(fe);
    drop(wire);
    s.still_serving("after 200 in-flight areas");

    let ram = GuestRam::new(RAM_BYTES, true);
    let mut fe = RawFrontend::connect(&s.disk, 2).unwrap();
    fe.set_memory(&ram, RAM_BYTES as u64).unwrap();
    fe.start_queue_with(&ram, 0, 128, 0, eventfd(), eventfd())
        .unwrap();
    fe.start_queue_with(&ram, 1, 128, 0, eventfd(), eventfd())
        .unwrap();
    ram.write_header(HEADER, T_IN, 0);
    let one = ram.write_request_table(TABLE, HEADER, &[(DATA, 65536)], true, STATUS);
    let mut pushed = 0u16;
    for _ in 0..20 {
        for _ in 0..64 {
            fe.add_indirect(&ram, 0, TABLE, one);
        }
        pushed += 64;
        fe.kick(0);
        fe.kick(1);
        // Both workers take from the ring; whichever returns a chain moves the used index.
        let deadline = std::time::Instant::now() + PATIENCE;
        while fe.used_idx(&ram, 0).wrapping_sub(pushed) > 0x8000 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {pushed} chains returned on a ring two queues share",
                fe.used_idx(&ram, 0)
            );
            s.daemon.assert_alive("with two queues on one ring");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    drop(fe);
    s.still_serving("after two queues on one ring");
}

/// Requests the daemon's request handler has no answer for, or whose feature the frontend claimed
/// without the daemon offering it (every protocol bit set): each ends the connection, but
/// CHECK_DEVICE_STATE, which is answered with an error.
#[test]
fn messages_without_a_handler_end_only_their_connection() {
    let mut s = setup("unhandled-messages");
    for code in [
        19u32, 20, 22, 23, 26, 27, 28, 29, 30, 35, 39, 40, 41, 44, 45, 60, 1000,
    ] {
        let before = s.count(ENDED_WITH_ERROR);
        let (fe, wire) = handshake(&s.disk);
        let ack = wire
            .ask(SET_PROTOCOL_FEATURES, &u64s(&[u64::MAX]), &[], PATIENCE)
            .unwrap()
            .expect("SET_PROTOCOL_FEATURES answered");
        assert_eq!(status(&ack), 0);
        wire.send(code, VERSION_1 | NEED_REPLY, &u64s(&[0]), &[])
            .unwrap();
        drop(fe);
        ends_connection(
            &mut s,
            &format!("request {code}"),
            wire,
            ENDED_WITH_ERROR,
            before,
        );
    }
    let (fe, wire) = handshake(&s.disk);
    let got = wire
        .ask(CHECK_DEVICE_STATE, &[], &[], PATIENCE)
        .unwrap()
        .expect("CHECK_DEVICE_STATE answered");
    assert_ne!(status(&got), 0, "CHECK_DEVICE_STATE said the state is fine");
    drop(fe);
    drop(wire);
    s.still_serving("after messages without a handler");
}

/// RESET_OWNER, and RESET_DEVICE (claimed without being offered), with reads in flight: the
/// daemon goes on, GET_VRING_BASE then answers the queue's index, and every chain taken up to
/// it comes back to the used ring.
#[test]
fn resets_with_requests_in_flight() {
    let mut s = setup("resets");
    for (name, reset) in [("RESET_OWNER", RESET_OWNER), ("RESET_DEVICE", RESET_DEVICE)] {
        let ram = GuestRam::new(RAM_BYTES, true);
        let mut fe = RawFrontend::connect(&s.disk, 2).unwrap();
        let wire = Wire::of(&fe);
        let ack = wire
            .ask(SET_PROTOCOL_FEATURES, &u64s(&[u64::MAX]), &[], PATIENCE)
            .unwrap()
            .expect("SET_PROTOCOL_FEATURES answered");
        assert_eq!(status(&ack), 0);
        fe.set_memory(&ram, RAM_BYTES as u64).unwrap();
        fe.start_queue(&ram, 0, 128).unwrap();
        ram.write_header(HEADER, T_IN, 0);
        let big: Vec<(u64, u32)> = (0..32).map(|_| (DATA, 1 << 20)).collect();
        let len = ram.write_request_table(TABLE, HEADER, &big, true, STATUS);
        for _ in 0..32 {
            fe.add_indirect(&ram, 0, TABLE, len);
        }
        fe.kick(0);
        let ack = wire
            .ask(reset, &[], &[], PATIENCE)
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: the connection ended"));
        assert_eq!(status(&ack), 0, "{name} refused");
        let base = wire
            .ask(GET_VRING_BASE, &vring_state(0, 0), &[], PATIENCE)
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: the connection ended at GET_VRING_BASE"));
        let taken = u16::from_ne_bytes([base.body[4], base.body[5]]);
        fe.wait_used(&ram, 0, taken, PATIENCE)
            .unwrap_or_else(|e| panic!("after {name}: {e}"));
        drop(fe);
        drop(wire);
        s.still_serving(&format!("after {name} with requests in flight"));
    }
}

/// A frontend that adds memory slots until the daemon cannot take more: each region the
/// daemon maps keeps its file open, so a frontend that fills the slots it was offered runs a
/// process with few descriptors out of them. The daemon runs with a limit of 512
/// descriptors (below the 509 slots and what the daemon holds itself) so that one
/// connection is enough and this takes a second, not a minute. The frontend stops adding
/// while the daemon still has a few descriptors (too few for a connection's set-up, enough
/// for its own messages): one more region would end its connection, whose teardown gives the
/// descriptors back, and the connection below could then race it. A connection to the other
/// export then cannot be accepted or set up: the daemon closes it and says why, the export is
/// not given up, and once the frontend has left both exports serve again.
#[test]
fn running_out_of_descriptors_does_not_end_the_other_export() {
    /// The daemon's descriptor limit, and how many it keeps free once the frontend stops.
    const LIMIT: usize = 512;
    const FEW_LEFT: usize = 4;
    let mut s = setup_with("descriptor-starvation", Some(LIMIT as u64), 0);
    let pid = s.daemon.pid();
    let open_files = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let at_start = open_files();
    let (fe, wire) = handshake(&s.disk);
    let ram = GuestRam::new(1 << 20, true);
    let fd = ram.file.as_raw_fd();
    let mut added = 0;
    let mut few_left = false;
    for i in 0..2000u64 {
        if open_files() + FEW_LEFT >= LIMIT {
            few_left = true;
            break;
        }
        let answer = wire
            .ask(
                ADD_MEM_REG,
                &one_region(i << 20, 4096, ram.addr(), 0),
                &[fd],
                PATIENCE,
            )
            .unwrap_or_else(|e| panic!("memory slot {i}: {e}"));
        match answer {
            Some(ack) if status(&ack) == 0 => added += 1,
            _ => break,
        }
    }
    assert!(added > 400, "only {added} memory slots went in");
    assert!(
        few_left,
        "a memory slot was refused after {added} while the daemon had {} of {LIMIT} \
         descriptors open",
        open_files()
    );
    let line = "the process has no file descriptor left";
    let before = s.count(line);
    let starved = Wire::connect(&s.other).unwrap();
    // Closed without an answer (or an answer, should a descriptor have come free).
    let _ = starved.ask(GET_FEATURES, &[], &[], PATIENCE);
    s.logged("a connection with no descriptor left", line, before);
    drop(starved);
    drop(fe);
    drop(wire);
    // Its descriptors are free once its connection is torn down.
    let deadline = std::time::Instant::now() + PATIENCE;
    while open_files() > at_start + 64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon still has {} files open, {at_start} at the start",
            open_files()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s.still_serving("after a frontend held every descriptor it could");
}

/// Kicks queue 0 ten times, 20 ms apart: the worker reads the ring's index at each kick.
fn kick_ten_times(fe: &RawFrontend) {
    for _ in 0..10 {
        fe.kick(0);
        std::thread::sleep(Duration::from_millis(20));
    }
}
