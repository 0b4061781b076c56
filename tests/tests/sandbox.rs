//! The daemon's sandbox, seen from outside: every thread of a serving daemon runs under a
//! seccomp filter with NO_NEW_PRIVS (threads made for a client included); a forbidden call
//! does what `--seccomp` says; Landlock refuses a file outside what the daemon serves even
//! when the engine is asked to open it directly; `--user` leaves no capability.
//!
//! The forbidden-call and open hooks (`QCOW2D_DEBUG_FORBIDDEN_SYSCALL`,
//! `QCOW2D_DEBUG_OPEN_IMAGE`) exist in debug builds only, which is what these tests run.

use qcow2d_tests::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SESSION_TIMEOUT: Duration = Duration::from_secs(60);
/// `getppid`, the call the forbidden-call hook makes.
const GETPPID: &str = "110";

/// A writable 16 MiB image with known content in `s`.
fn image(s: &Scratch, name: &str) -> PathBuf {
    let img = s.join(name);
    create_qcow2(&img, 16 * MIB, "cluster_size=65536");
    write_pattern(&img, "qcow2", 0x5a, 0, MIB);
    img
}

/// `serve --image IMG --socket SOCK` (writable) with `extra` arguments and `env`.
fn serve_cmd(img: &Path, socket: &Path, extra: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("serve")
        .arg("--image")
        .arg(img)
        .arg("--socket")
        .arg(socket)
        .args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// `(thread name, Seccomp, NoNewPrivs, Seccomp_filters, CapEff, CapPrm, CapBnd, Uid)` of every
/// thread of `pid`.
#[derive(Debug)]
struct ThreadStatus {
    name: String,
    seccomp: String,
    no_new_privs: String,
    filters: u32,
    caps: Vec<(String, u64)>,
    uid: String,
}

/// The CPUs this process (and so a daemon it starts) may run on: one core thread each.
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The nice value of each core thread of process `pid` (field 19 of its `stat`).
fn core_nice_values(pid: i32) -> Vec<i64> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = entry.unwrap().path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue;
        };
        if comm.starts_with("qcow2d-core-") {
            // After the name in parentheses: field 3 on, so the nice value is the 17th.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            out.push(rest.split(' ').nth(16).unwrap().parse().unwrap());
        }
    }
    out
}

fn threads(pid: i32) -> Vec<ThreadStatus> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = entry.unwrap().path().join("status");
        // A thread may end meanwhile.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .map(|v| v.trim().to_owned())
                .unwrap_or_else(|| panic!("no {name} in {}", path.display()))
        };
        let caps = ["CapEff", "CapPrm", "CapBnd"]
            .iter()
            .map(|c| (c.to_string(), u64::from_str_radix(&field(c), 16).unwrap()))
            .collect();
        out.push(ThreadStatus {
            name: field("Name"),
            seccomp: field("Seccomp"),
            no_new_privs: field("NoNewPrivs"),
            filters: field("Seccomp_filters").parse().unwrap(),
            caps,
            uid: field("Uid"),
        });
    }
    out
}

fn assert_all_filtered(pid: i32, when: &str) -> Vec<ThreadStatus> {
    let all = threads(pid);
    assert!(!all.is_empty());
    for t in &all {
        assert!(
            t.seccomp == "2" && t.no_new_privs == "1" && t.filters >= 1,
            "{when}: thread {:?} is not filtered: {t:?}\nall: {all:#?}",
            t.name
        );
    }
    all
}

/// Every thread of a serving daemon has a seccomp filter and NO_NEW_PRIVS, before a client
/// connects and once one is served (no thread is made for a connection: the one relay
/// thread runs its request handler and the core threads, one per CPU, its workers, all of
/// them started by the main thread before any filter existed, so each has its own alone).
#[test]
fn every_thread_is_filtered_before_and_after_a_client_connects() {
    let s = Scratch::new("sbx_threads");
    let img = image(&s, "a.qcow2");
    let socket = s.socket("a.sock");
    let cmd = serve_cmd(
        &img,
        &socket,
        &["--shards", "2", "--queues", "2", "--nice", "-3"],
        &[],
    );
    let mut d = Daemon::spawn(cmd, &img, &socket).unwrap_or_else(|f| panic!("{f}"));
    let pid = d.pid();
    // The ready line comes once the main thread is filtered; the other threads take their
    // own filters as they start.
    let main = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        main.contains("\nSeccomp:\t2\n"),
        "main thread once ready:\n{main}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = threads(pid);
        let ready = all
            .iter()
            .all(|t| t.seccomp == "2" && t.no_new_privs == "1")
            && all.iter().any(|t| t.name == "qcow2d-listen")
            && all.iter().any(|t| t.name == "qcow2d-relay")
            && all
                .iter()
                .filter(|t| t.name.starts_with("qcow2d-core-"))
                .count()
                == cpus();
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "threads without their filters: {all:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let names = blk_session(&socket, 2, SESSION_TIMEOUT, move |c| {
        let data = c.read_batch(&[(0, 65536)])?.remove(0)?;
        assert!(data.iter().all(|&b| b == 0x5a));
        let all = assert_all_filtered(pid, "serving a client");
        Ok(all
            .into_iter()
            .map(|t| (t.name, t.filters))
            .collect::<Vec<_>>())
    })
    .unwrap_or_else(|e| panic!("client: {e}\n{}", d.stderr()));
    // Listener, relay thread (which also runs the connection's request handler), the core
    // threads (which run the connection's two workers); main, signals.
    let count = |name: &str| names.iter().filter(|(n, _)| n == name).count();
    let filters = |name: &str| names.iter().find(|(n, _)| n == name).map(|(_, f)| *f);
    assert_eq!(count("qcow2d-listen"), 1, "{names:?}");
    assert_eq!(count("qcow2d-export0"), 0, "{names:?}");
    assert_eq!(count("qcow2d-vu0"), 0, "no request thread: {names:?}");
    assert!(
        !names.iter().any(|(n, _)| n.starts_with("qcow2d-w")),
        "no worker thread per connection: {names:?}"
    );
    let cores = names
        .iter()
        .filter(|(n, _)| n.starts_with("qcow2d-core-"))
        .count();
    assert_eq!(cores, cpus(), "{names:?}");
    assert_eq!(count("qcow2d-relay"), 1, "{names:?}");
    assert!(
        !names.iter().any(|(n, _)| n.starts_with("qcow2d-vu0-")),
        "no relay thread per connection: {names:?}"
    );
    assert_eq!(count("qcow2d-signals"), 1, "{names:?}");
    // Each role installs its filter and the no-open filter over what it inherited; the
    // relay and core threads, started by the main thread before any filter existed, have
    // their own two.
    assert_eq!(filters("qcow2d-listen"), Some(2), "{names:?}");
    assert_eq!(filters("qcow2d-relay"), Some(2), "{names:?}");
    assert_eq!(filters("qcow2d-core-0"), Some(2), "{names:?}");
    // `--nice` sets the core threads' nice value.
    assert_eq!(core_nice_values(pid), vec![-3; cpus()]);
    d.assert_alive("after the client");
    let st = d.terminate();
    assert!(st.success(), "qcow2d exited with {st}\n");
}

/// The process-wide inflate pool's workers take their own filter as they start, before any
/// client, and inflate under it: a compressed image read with one queue (one shard, many
/// clusters in flight, so the shard hands some to the idle worker) reads right, and the
/// daemon lives on.
#[test]
fn inflate_workers_are_filtered_and_inflate_under_their_filter() {
    let s = Scratch::new("sbx_inflate");
    let raw = s.join("src.raw");
    let data: Vec<u8> = (0..4 * MIB as usize)
        .map(|i| (i / 7 % 251) as u8 ^ (i >> 13) as u8)
        .collect();
    std::fs::write(&raw, &data).unwrap();
    let img = s.join("c.qcow2");
    convert_raw_to_qcow2(&raw, &img, "cluster_size=65536", true);
    let socket = s.socket("c.sock");
    let cmd = serve_cmd(&img, &socket, &["--read-only", "--queues", "1"], &[]);
    let mut d = Daemon::spawn(cmd, &img, &socket).unwrap_or_else(|f| panic!("{f}"));
    let pid = d.pid();
    let pool: Vec<ThreadStatus> = threads(pid)
        .into_iter()
        .filter(|t| t.name.starts_with("qcow2d-inflate"))
        .collect();
    assert!(!pool.is_empty(), "no inflate worker");
    // Its role's filter and the no-open filter, over nothing inherited from main.
    assert!(
        pool.iter()
            .all(|t| t.seccomp == "2" && t.no_new_privs == "1" && t.filters == 2),
        "{pool:#?}"
    );
    let expected = data.clone();
    blk_session(&socket, 1, SESSION_TIMEOUT, move |c| {
        for _ in 0..4 {
            let reqs: Vec<ReadReq> = (0..64).map(|i| (i * 65536, 65536)).collect();
            for (i, r) in c.read_batch(&reqs)?.into_iter().enumerate() {
                let got = r?;
                assert!(got == expected[i * 65536..(i + 1) * 65536], "cluster {i}");
            }
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("client: {e}\n{}", d.stderr()));
    d.assert_alive("after compressed reads");
    let st = d.terminate();
    assert!(st.success(), "qcow2d exited with {st}");
}

/// Runs a daemon whose worker threads make a forbidden call once filtered, with `mode`;
/// returns the daemon (or its failure to start, with its exit status and stderr).
fn forbidden_call(s: &Scratch, mode: &str) -> (PathBuf, Result<Daemon, StartFailure>) {
    let img = image(s, "f.qcow2");
    let socket = s.socket("f.sock");
    let cmd = serve_cmd(
        &img,
        &socket,
        &["--seccomp", mode, "--shards", "1"],
        &[("QCOW2D_DEBUG_FORBIDDEN_SYSCALL", "worker")],
    );
    let started = Daemon::spawn(cmd, &img, &socket);
    (socket, started)
}

/// The exit status and stderr of a daemon that is expected to die as its core threads take
/// their filter (at start-up; a client connects in case it survived that far).
fn death(
    socket: &Path,
    started: Result<Daemon, StartFailure>,
) -> (std::process::ExitStatus, String) {
    match started {
        Ok(mut d) => {
            let _client = std::os::unix::net::UnixStream::connect(socket);
            let st = d
                .wait_exit(Duration::from_secs(20))
                .unwrap_or_else(|| panic!("the daemon survived a forbidden call:\n{}", d.stderr()));
            // Let the stderr reader finish.
            std::thread::sleep(Duration::from_millis(200));
            (st, d.stderr())
        }
        Err(f) => (f.status.expect("exit status"), f.stderr),
    }
}

#[test]
fn kill_mode_kills_the_process_on_a_forbidden_call() {
    let s = Scratch::new("sbx_kill");
    let (socket, started) = forbidden_call(&s, "kill");
    let (st, stderr) = death(&socket, started);
    assert_eq!(st.signal(), Some(libc::SIGSYS), "{st}\n{stderr}");
    assert!(
        stderr.contains("Debug hook: making a forbidden system call"),
        "{stderr}"
    );
    assert!(!stderr.contains("the process goes on"), "{stderr}");
}

#[test]
fn trap_mode_names_the_thread_and_call_then_kills() {
    let s = Scratch::new("sbx_trap");
    let (socket, started) = forbidden_call(&s, "trap");
    let (st, stderr) = death(&socket, started);
    assert_eq!(st.signal(), Some(libc::SIGSYS), "{st}\n{stderr}");
    // Whichever core thread gets there first.
    let tail = format!("\" made the forbidden system call {GETPPID}; killing the process");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("qcow2d: seccomp: thread \"qcow2d-core-") && l.ends_with(&tail)),
        "{stderr}"
    );
    assert!(!stderr.contains("the process goes on"), "{stderr}");
}

/// `log`: the call goes through, the daemon keeps serving, and the kernel logs the call
/// (audit record of type 1326 with the process id and the call number).
#[test]
fn log_mode_lets_the_call_through_and_the_kernel_logs_it() {
    let s = Scratch::new("sbx_log");
    let (socket, started) = forbidden_call(&s, "log");
    let mut d = started.unwrap_or_else(|f| panic!("{f}"));
    let pid = d.pid();
    // The core threads make the forbidden call as they start; a client connects meanwhile.
    let probe = std::os::unix::net::UnixStream::connect(&socket);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.stderr().contains("the process goes on") {
        assert!(Instant::now() < deadline, "no hook output:\n{}", d.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(probe);
    let data = blk_session(&socket, 1, SESSION_TIMEOUT, |c| c.read_batch(&[(0, 4096)]))
        .and_then(|mut r| r.remove(0))
        .unwrap_or_else(|e| panic!("client after the forbidden call: {e}\n{}", d.stderr()));
    assert!(data.iter().all(|&b| b == 0x5a));
    d.assert_alive("after the forbidden call");
    let wanted = format!("pid={pid} ");
    let syscall = format!("syscall={GETPPID} ");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("dmesg")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run dmesg (util-linux) to read the kernel log: {e}")
            });
        assert!(
            out.status.success(),
            "dmesg cannot read the kernel log: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = String::from_utf8_lossy(&out.stdout);
        if log
            .lines()
            .any(|l| l.contains("type=1326") && l.contains(&wanted) && l.contains(&syscall))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the kernel log has no seccomp record of {wanted}{syscall}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(d.terminate().success());
}

/// An image outside what the daemon serves is refused by Landlock even when the engine is
/// asked to open it directly (no path check in the way); an image the daemon serves can be.
#[test]
fn landlock_refuses_an_image_outside_the_sandbox() {
    let s = Scratch::new("sbx_landlock");
    let img = image(&s, "served.qcow2");
    let socket = s.socket("l.sock");
    let outside_dir = Scratch::new("sbx_landlock_out");
    let outside = image(&outside_dir, "outside.qcow2");
    assert!(std::fs::File::open(&outside).is_ok());

    for (target, refused) in [(&outside, true), (&img, false)] {
        let cmd = serve_cmd(
            &img,
            &socket,
            &["--read-only"],
            &[("QCOW2D_DEBUG_OPEN_IMAGE", target.to_str().unwrap())],
        );
        let mut d = Daemon::spawn(cmd, &img, &socket).unwrap_or_else(|f| panic!("{f}"));
        let stderr = d.wait_for_stderr("Debug hook: ", 1, Duration::from_secs(10));
        if refused {
            assert!(
                stderr.contains("Debug hook: cannot open the image")
                    && stderr.contains("Permission denied"),
                "{stderr}"
            );
        } else {
            assert!(stderr.contains("Debug hook: opened the image"), "{stderr}");
        }
        d.assert_alive("after the open hook");
        assert!(d.terminate().success());
    }
}

/// `--user`: the socket belongs to the user (mode 0660), every thread runs as that user with
/// no capability (bounding set included), and the export still reads and writes.
#[test]
fn user_drops_every_privilege() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test starts the daemon as root (run the tests as root)"
    );
    let nobody = run_ok(Command::new("id").args(["-u", "nobody"]));
    let nobody = nobody.trim().to_owned();
    let s = Scratch::new("sbx_user");
    // The user must be able to reach the socket's directory.
    std::fs::set_permissions(s.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let img = image(&s, "u.qcow2");
    let socket = s.socket("u.sock");
    let cmd = serve_cmd(&img, &socket, &["--user", "nobody"], &[]);
    let d = Daemon::spawn(cmd, &img, &socket).unwrap_or_else(|f| panic!("{f}"));
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.uid().to_string(), nobody);
    assert_eq!(meta.mode() & 0o777, 0o660);
    let pid = d.pid();
    let data = rw_session(&socket, 1, SESSION_TIMEOUT, move |c| {
        c.run_ok(&[BlkOp::Write {
            off: 65536,
            data: vec![0x33; 4096],
        }])?;
        let data = c.read_range(65536, 4096)?;
        let all = assert_all_filtered(pid, "serving as nobody");
        for t in &all {
            assert!(t.uid.split_whitespace().all(|u| u == nobody), "{t:?}");
            assert!(t.caps.iter().all(|(_, v)| *v == 0), "{t:?}");
        }
        // The core threads took their default nice value with no privilege left.
        assert_eq!(core_nice_values(pid), vec![-5; cpus()]);
        Ok(data)
    })
    .unwrap_or_else(|e| panic!("client: {e}\n{}", d.stderr()));
    assert!(data.iter().all(|&b| b == 0x33));
    let st = d.terminate();
    assert!(st.success(), "{st}");
    let (code, report) = qemu_img_check(&img, None);
    assert_eq!(code, 0, "{report}");
}

/// Every request a frontend like QEMU sends is handled on the relay thread under its own
/// filter (the default mode kills the process on a forbidden call): the backend request
/// channel (whose socket vhost checks), memory slots, the config space and its write-cache
/// byte, a queue set up, a read through it, GET_VRING_BASE (answered once the queue's worker
/// stopped it) and the queue started again from that base; the daemon then serves the next
/// client.
#[test]
fn a_frontends_requests_are_handled_on_the_relay_thread_under_its_filter() {
    use qcow2d_tests::frontend::{GuestRam, RawFrontend, T_IN};
    use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::VhostBackend;

    let s = Scratch::new("sbx_requests");
    let img = image(&s, "r.qcow2");
    let socket = s.socket("r.sock");
    let cmd = serve_cmd(&img, &socket, &["--queues", "2", "--shards", "2"], &[]);
    let mut d = Daemon::spawn(cmd, &img, &socket).unwrap_or_else(|f| panic!("{f}"));

    let mut fe = RawFrontend::connect(&socket, 2).unwrap_or_else(|e| panic!("{e}"));
    let offered = fe.fe.get_protocol_features().unwrap();
    let wanted = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    assert!(offered.contains(wanted), "{offered:?}");
    fe.fe.set_protocol_features(wanted).unwrap();
    assert_eq!(fe.fe.get_queue_num().unwrap(), 2);
    assert!(fe.fe.get_max_mem_slots().unwrap() > 0);
    let (channel, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    fe.fe
        .set_backend_request_fd(&channel)
        .unwrap_or_else(|e| panic!("SET_BACKEND_REQ_FD: {e:?}\n{}", d.stderr()));
    // The config space: capacity in sectors, then the write-cache byte turned off and on.
    let (_, config) = fe
        .fe
        .get_config(0, 40, VhostUserConfigFlags::WRITABLE, &[0; 40])
        .unwrap();
    assert_eq!(
        u64::from_le_bytes(config[0..8].try_into().unwrap()),
        16 * MIB / 512
    );
    for byte in [0u8, 1] {
        fe.fe
            .set_config(32, VhostUserConfigFlags::WRITABLE, &[byte])
            .unwrap();
        let (_, now) = fe
            .fe
            .get_config(32, 1, VhostUserConfigFlags::WRITABLE, &[0])
            .unwrap();
        assert_eq!(now, [byte]);
    }

    let ram = GuestRam::new(4 * MIB as usize, true);
    fe.set_memory(&ram, 4 * MIB).unwrap();
    fe.start_queue(&ram, 1, 128).unwrap();
    let read = |fe: &mut RawFrontend, round: u64| {
        let header = 0x10000 + 0x100 * round;
        ram.write_header(header, T_IN, 0);
        let len = ram.write_request_table(
            0x20000 + 0x100 * round,
            header,
            &[(0x30000, 4096)],
            true,
            header + 0x20,
        );
        fe.push_indirect(&ram, 1, 0x20000 + 0x100 * round, len);
        fe.wait_used(&ram, 1, round as u16 + 1, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}\n{}", d.stderr()));
        let mut data = vec![0u8; 4096];
        ram.read(0x30000, &mut data);
        assert!(data.iter().all(|&b| b == 0x5a), "round {round}");
        ram.write(0x30000, &[0; 4096]);
    };
    read(&mut fe, 0);
    // Stopped: the base is the one chain taken.
    let base = fe
        .fe
        .get_vring_base(1)
        .unwrap_or_else(|e| panic!("GET_VRING_BASE: {e:?}\n{}", d.stderr()));
    assert_eq!(base, 1);
    // Started again where it stopped (rings as they are, fresh eventfds).
    {
        use vmm_sys_util::eventfd::EventFd;
        let q = fe.queues[1].as_mut().unwrap();
        q.kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        q.call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let q = fe.queues[1].as_ref().unwrap();
        fe.fe.set_vring_base(1, base as u16).unwrap();
        fe.fe.set_vring_call(1, &q.call).unwrap();
        fe.fe.set_vring_kick(1, &q.kick).unwrap();
        fe.fe.set_vring_enable(1, true).unwrap();
    }
    read(&mut fe, 1);
    drop(fe);
    d.assert_alive("after the frontend's requests");
    let data = blk_session(&socket, 2, SESSION_TIMEOUT, |c| c.read_batch(&[(0, 4096)]))
        .and_then(|mut r| r.remove(0))
        .unwrap_or_else(|e| panic!("next client: {e}\n{}", d.stderr()));
    assert!(data.iter().all(|&b| b == 0x5a));
    let st = d.terminate();
    assert!(st.success(), "qcow2d exited with {st}");
}
