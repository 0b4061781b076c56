//! The control socket through the real daemon and `qcow2d ctl`: list, add, remove (with and
//! without a client), I/O limits measured against their settings (one export, a group of two),
//! and SIGHUP reloads of the config file.

use qcow2d_tests::*;
use serde_json::Value;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How long a rate is measured.
const MEASURE: Duration = Duration::from_secs(10);

fn ctl_cmd<S: AsRef<OsStr>>(control: &Path, args: &[S]) -> Command {
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("ctl").arg("--control").arg(control).args(args);
    cmd
}

fn ctl<S: AsRef<OsStr>>(control: &Path, args: &[S]) -> CmdOutput {
    run_cmd(&mut ctl_cmd(control, args), Duration::from_secs(60))
}

/// `ctl ARGS` must succeed; returns its stdout.
fn ctl_ok<S: AsRef<OsStr>>(control: &Path, args: &[S]) -> String {
    run_ok(&mut ctl_cmd(control, args))
}

/// `ctl ARGS` must fail; returns its stderr.
fn ctl_err<S: AsRef<OsStr> + std::fmt::Debug>(control: &Path, args: &[S]) -> String {
    let out = ctl(control, args);
    assert!(
        !out.status.success(),
        "qcow2d ctl {args:?} succeeded:\n{}",
        out.stdout
    );
    out.stderr
}

fn list(control: &Path) -> Vec<Value> {
    let text = ctl_ok(control, &["list", "--json"]);
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    v["exports"].as_array().cloned().unwrap_or_default()
}

fn export_of(exports: &[Value], socket: &Path) -> Option<Value> {
    exports
        .iter()
        .find(|e| e["socket"].as_str() == Some(&socket.display().to_string()))
        .cloned()
}

/// One raw request line on a fresh connection; the answer line.
fn raw_request(control: &Path, line: &[u8]) -> Value {
    let stream = UnixStream::connect(control).expect("connect to the control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let _ = w.write_all(line);
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

/// The arguments of `ctl add --image IMAGE --socket SOCKET EXTRA...`.
fn add_args(image: &Path, socket: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "add".into(),
        "--image".into(),
        image.into(),
        "--socket".into(),
        socket.into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    args
}

/// `len` bytes at `off` read through `socket` on one queue.
fn read_through(socket: &Path, off: u64, len: usize) -> Vec<u8> {
    blk_session(socket, 1, READ_TIMEOUT, move |c| {
        c.read_batch(&[(off, len)])?.remove(0)
    })
    .unwrap()
}

fn image_with(s: &Scratch, name: &str, byte: u8) -> PathBuf {
    let img = s.join(name);
    create_qcow2(&img, 64 * MIB, "");
    write_pattern(&img, "qcow2", byte, 0, 4 * MIB);
    img
}

/// `qcow2d-bench`, built beside the daemon.
fn bench_bin() -> PathBuf {
    let p = daemon_bin().with_file_name("qcow2d-bench");
    assert!(
        p.is_file(),
        "MISSING BENCH BINARY: {} does not exist; build the workspace (cargo build)",
        p.display()
    );
    p
}

/// Starts `qcow2d-bench run`: random reads of `bs` through `socket`, 64 in flight on one
/// queue (so the daemon always has requests waiting, however the machine schedules the
/// client), 2 s of warm-up (the bucket's initial burst) then [`MEASURE`] measured.
fn start_bench(socket: &Path, bs: &str, json: &Path) -> std::process::Child {
    Command::new(bench_bin())
        .arg("run")
        .arg("--socket")
        .arg(socket)
        .args([
            "--pattern",
            "randread",
            "--bs",
            bs,
            "--iodepth",
            "64",
            "--queues",
            "1",
        ])
        .args(["--warmup", "2s", "--runtime"])
        .arg(format!("{}s", MEASURE.as_secs()))
        .args(["--region-size", "4m", "--json"])
        .arg(json)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run qcow2d-bench: {e}"))
}

/// Waits for a bench started by [`start_bench`]; its measured requests per second.
fn bench_iops(child: std::process::Child, json: &Path) -> f64 {
    let out = child.wait_with_output().expect("wait for qcow2d-bench");
    assert!(
        out.status.success(),
        "qcow2d-bench failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(json).expect("the bench's JSON result");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["errors"], 0, "{text}");
    v["iops"]
        .as_f64()
        .unwrap_or_else(|| panic!("no iops in {text}"))
}

/// Requests per second of `bs` reads through `socket` (see [`start_bench`]).
fn measure_rate(s: &Scratch, socket: &Path, bs: &str) -> f64 {
    let json = s.join(&format!("bench-{bs}.json"));
    bench_iops(start_bench(socket, bs, &json), &json)
}

/// A limit holds: never more than 5 % over it (what an operator relies on), and not far
/// below it (a limit that throttles too hard). The lower bound is loose: a machine busy with
/// other work may not keep the client at the limit, which says nothing of the limit.
fn assert_near(what: &str, measured: f64, limit: f64) {
    let ratio = measured / limit;
    eprintln!("{what}: limit {limit:.0}/s, measured {measured:.1}/s ({ratio:.3} of the limit)");
    assert!(
        (0.8..=1.05).contains(&ratio),
        "{what}: measured {measured:.1}/s against a limit of {limit:.0}/s"
    );
}

/// What the daemon counted of an export's reads and of its throttle (`ctl list`).
#[derive(Clone, Copy, Debug)]
struct Throttled {
    reads: u64,
    seconds: f64,
    requests: u64,
}

/// The start of the name (`comm`) of the threads that serve exports' queues (the core threads,
/// `qcow2d-core-<cpu>`, which run the connections' workers, which hold and release throttled
/// requests).
const QUEUE_THREAD: &str = "qcow2d-core-";

/// Nanoseconds each thread of `pid` serving queues ([`QUEUE_THREAD`]) has waited on a run
/// queue, runnable but not running (`/proc/PID/task/TID/schedstat`, second field), by thread
/// id. The other threads' waits do not delay a held request.
fn run_delays(pid: i32) -> std::collections::HashMap<String, u64> {
    let mut delays = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return delays;
    };
    for task in tasks.flatten() {
        // A thread may end meanwhile.
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
            continue;
        };
        if !comm.starts_with(QUEUE_THREAD) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        let delay = text.split_whitespace().nth(1).and_then(|d| d.parse().ok());
        if let Some(delay) = delay {
            delays.insert(task.file_name().to_string_lossy().into_owned(), delay);
        }
    }
    delays
}

/// Watches the run-queue delay of `pid`'s queue threads (every 20 ms) until `stop` is set: returns
/// the seconds they waited on run queues meanwhile (a thread that ended counts up to its last
/// sample) and how many threads ended (each may have waited up to 20 ms more unseen).
fn watch_run_delay(
    pid: i32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> thread::JoinHandle<(f64, usize)> {
    assert!(
        std::fs::read_to_string(format!("/proc/{pid}/schedstat")).is_ok(),
        "cannot read /proc/{pid}/schedstat (a kernel without CONFIG_SCHED_INFO?)"
    );
    let first = run_delays(pid);
    thread::spawn(move || {
        let mut last = first.clone();
        loop {
            let done = stop.load(std::sync::atomic::Ordering::Acquire);
            let now = run_delays(pid);
            let ended = last.keys().filter(|t| !now.contains_key(*t)).count();
            for (tid, delay) in now {
                last.insert(tid, delay);
            }
            if done {
                let waited: u64 = last
                    .iter()
                    .map(|(tid, d)| d - first.get(tid).copied().unwrap_or(0).min(*d))
                    .sum();
                let live = run_delays(pid);
                let ended = ended.max(last.keys().filter(|t| !live.contains_key(*t)).count());
                return (waited as f64 / 1e9, ended);
            }
            thread::sleep(Duration::from_millis(20));
        }
    })
}

fn throttled(control: &Path, socket: &Path) -> Throttled {
    let e = export_of(&list(control), socket).unwrap();
    Throttled {
        reads: e["ops"]["read"]["requests"].as_u64().unwrap(),
        seconds: e["throttled_seconds"].as_f64().unwrap(),
        requests: e["throttled_requests"].as_u64().unwrap(),
    }
}

/// Runs [`measure_rate`] against the export `socket` of `daemon` (`control`: its control
/// socket) and checks that a limit of `per_second` reads holds (see [`assert_limited`]).
fn assert_rate_limited(
    what: &str,
    s: &Scratch,
    daemon: &Daemon,
    control: &Path,
    socket: &Path,
    bs: &str,
    per_second: f64,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = watch_run_delay(daemon.pid(), std::sync::Arc::clone(&stop));
    let before = throttled(control, socket);
    let rate = measure_rate(s, socket, bs);
    let after = throttled(control, socket);
    stop.store(true, std::sync::atomic::Ordering::Release);
    let late = watch.join().unwrap();
    assert_limited(what, rate, per_second, before, after, late);
}

/// A limit of `per_second` reads holds over a bench of one queue (run between `before` and
/// `after`, two moments with nothing in flight), whose client measured `measured` reads per
/// second: never more than 5 % over the limit (what an operator relies on), and requests held
/// back no longer than the limit asks. While a request is held the buckets leak at the
/// limit's rate, and what they leak is room the requests after it take, so the daemon served
/// at least `per_second` times the seconds it held requests, less the bucket (a tenth of a
/// second at the limit), less a tenth, and less what the machine kept its queue threads
/// from running (`late`: the seconds they waited on run queues, from [`watch_run_delay`],
/// and how many of them ended: a held request released late is held longer than the limit
/// asked). A slow client cannot break that: it only makes the throttle hold requests less;
/// a throttle that holds them too long does. (The client's own rate is no lower bound: a
/// starved client cannot reach the limit.)
fn assert_limited(
    what: &str,
    measured: f64,
    per_second: f64,
    before: Throttled,
    after: Throttled,
    late: (f64, usize),
) {
    let served = (after.reads - before.reads) as f64;
    let (waited, ended) = late;
    let held = after.seconds - before.seconds - waited - 0.02 * ended as f64;
    let held_requests = after.requests - before.requests;
    eprintln!(
        "{what}: limit {per_second:.1}/s, measured {measured:.1}/s; the daemon served {served} \
         reads and held {held_requests} of them {:.3} s in all, its queue threads waited \
         {waited:.3} s to run ({ended} ended)",
        after.seconds - before.seconds
    );
    assert!(
        measured <= 1.05 * per_second,
        "{what}: measured {measured:.1}/s against a limit of {per_second:.1}/s"
    );
    // The bench runs flat out against the limit for seconds: the throttle must have held at
    // least a second's worth of its requests.
    assert!(
        held_requests as f64 >= per_second,
        "{what}: the limit held only {held_requests} requests"
    );
    let allowed = 0.9 * per_second * held - 0.1 * per_second - 2.0;
    assert!(
        served >= allowed,
        "{what}: the throttle held requests {held:.3} s (while the daemon could run), which \
         at {per_second:.1}/s is room for {:.0} requests, yet only {served} were served",
        per_second * held
    );
}

/// Holds a read-write client connected to `socket` (after writing 4 KiB of 0x5a at 1 MiB)
/// until the sender is dropped.
fn hold_client(socket: &Path) -> (mpsc::Sender<()>, thread::JoinHandle<Result<(), String>>) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let socket = socket.to_path_buf();
    let handle = thread::spawn(move || {
        let mut c = BlkClient::connect_rw(&socket, 1)?;
        c.run_ok(&[
            BlkOp::Write {
                off: MIB,
                data: vec![0x5a; 4096],
            },
            BlkOp::Flush,
        ])?;
        let _ = ready_tx.send(());
        let _ = release_rx.recv();
        drop(c);
        Ok(())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the client connects and writes");
    (release_tx, handle)
}

#[test]
fn add_list_remove_through_the_daemon() {
    require_qemu_tools();
    let s = Scratch::new("ctl-add");
    let a = image_with(&s, "a.qcow2", 0xa1);
    let b = image_with(&s, "b.qcow2", 0xb2);
    let (a_sock, b_sock, c_sock) = (s.socket("a.sock"), s.socket("b.sock"), s.socket("c.sock"));
    let control = s.socket("ctl.sock");
    let control_arg = control.display().to_string();
    let mut d = Daemon::start_writable(&a, &a_sock, &["--control", &control_arg, "--queues", "2"])
        .unwrap_or_else(|f| panic!("{f}"));

    let mode = std::fs::metadata(&control).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode");

    let exports = list(&control);
    assert_eq!(exports.len(), 1, "{exports:?}");
    let e = &exports[0];
    assert_eq!(e["image"], a.display().to_string());
    assert_eq!(e["read_only"], false);
    assert_eq!(e["size"], 64 * MIB);
    assert_eq!(e["queues"], 2);
    assert_eq!(e["client"], Value::Null);
    assert_eq!(e["in_flight"], 0);
    assert_eq!(e["limits"], serde_json::json!({}));
    assert!(e["ops"]["read"]["requests"].is_u64(), "{e}");

    // Bad requests get an error answer and change nothing.
    for (line, want) in [
        (&b"not json\n"[..], "Malformed request"),
        (b"{\"command\":\"format\"}\n", "Unknown command"),
        (b"{\"command\":\"remove\"}\n", "Invalid request"),
        (
            b"{\"command\":\"remove\",\"socket\":\"/nope\"}\n",
            "No export on /nope",
        ),
    ] {
        let answer = raw_request(&control, line);
        assert_eq!(answer["ok"], false, "{answer}");
        assert!(answer["error"].as_str().unwrap().contains(want), "{answer}");
    }
    let mut big = vec![b' '; 70 * 1024];
    big.push(b'\n');
    let answer = raw_request(&control, &big);
    assert!(
        answer["error"].as_str().unwrap().contains("longer than"),
        "{answer}"
    );
    d.assert_alive("after bad control requests");
    assert_eq!(list(&control).len(), 1);

    // Add a second export while the first serves a client.
    let (release, holder) = hold_client(&a_sock);
    ctl_ok(
        &control,
        &add_args(
            &b,
            &b_sock,
            &[
                "--read-only",
                "--serial",
                "bee",
                "--queues",
                "1",
                "--iops-read",
                "100000",
                "--group",
                "gb",
            ],
        ),
    );
    let data = read_through(&b_sock, 0, 65536);
    assert!(
        data.iter().all(|&x| x == 0xb2),
        "the added export serves its image"
    );
    let exports = list(&control);
    assert_eq!(exports.len(), 2);
    let eb = export_of(&exports, &b_sock).expect("b is listed");
    assert_eq!(eb["read_only"], true);
    assert_eq!(eb["serial"], "bee");
    assert_eq!(eb["group"], "gb");
    assert_eq!(eb["limits"], serde_json::json!({"iops_read": 100000}));
    assert_eq!(eb["ops"]["read"]["requests"], 1);
    assert_eq!(eb["ops"]["read"]["bytes"], 65536);
    let ea = export_of(&exports, &a_sock).unwrap();
    assert_eq!(ea["client"]["pid"], std::process::id(), "{ea}");
    assert_eq!(ea["ops"]["write"]["requests"], 1);

    // Failures name the cause and leave nothing behind.
    let missing = s.join("missing.qcow2");
    let err = ctl_err(&control, &add_args(&missing, &c_sock, &[]));
    assert!(err.contains("missing.qcow2"), "{err}");
    assert!(!c_sock.exists(), "no socket left behind");
    let err = ctl_err(&control, &add_args(&a, &c_sock, &[]));
    assert!(
        err.to_lowercase().contains("lock"),
        "the image is in use: {err}"
    );
    assert!(!c_sock.exists(), "no socket left behind");
    let err = ctl_err(&control, &add_args(&b, &a_sock, &["--read-only"]));
    assert!(err.contains("already"), "{err}");
    let err = ctl_err(&control, &add_args(&b, &c_sock, &["--queues", "0"]));
    assert!(err.contains("Queue count"), "{err}");
    assert_eq!(list(&control).len(), 2);

    // Remove refuses while a client is connected, unless forced.
    let err = ctl_err(&control, &["remove", &a_sock.display().to_string()]);
    assert!(err.contains("client connected"), "{err}");
    assert!(a_sock.exists());
    ctl_ok(
        &control,
        &["remove", &a_sock.display().to_string(), "--force"],
    );
    assert!(!a_sock.exists(), "the socket is removed");
    drop(release);
    let _ = holder.join();
    // Closed cleanly: no lock held, dirty bit clear, the write is there.
    assert!(!dirty_bit(&a));
    assert_check_clean(&a, "after remove --force");
    let raw = oracle(&a);
    assert!(raw[MIB as usize..MIB as usize + 4096]
        .iter()
        .all(|&x| x == 0x5a));

    ctl_ok(&control, &["remove", &b_sock.display().to_string()]);
    assert!(!b_sock.exists());
    assert!(list(&control).is_empty());
    let text = ctl_ok(&control, &["list"]);
    assert!(text.contains("No exports"), "{text}");
    d.assert_alive("with no exports left (the control socket keeps it running)");

    // The image is free again: added back, served, and closed cleanly at exit.
    ctl_ok(&control, &add_args(&a, &a_sock, &[]));
    let data = read_through(&a_sock, MIB, 4096);
    assert!(data.iter().all(|&x| x == 0x5a));
    let status = d.terminate();
    assert!(status.success(), "{status}");
    assert!(!control.exists(), "the control socket is removed at exit");
    assert_check_clean(&a, "after exit");
}

#[test]
fn an_iops_limit_and_a_bps_limit_hold_their_rates() {
    require_qemu_tools();
    let s = Scratch::new("ctl-limit");
    let a = image_with(&s, "a.qcow2", 0xa1);
    let sock = s.socket("a.sock");
    let control = s.socket("ctl.sock");
    let control_arg = control.display().to_string();
    let d = Daemon::start_writable(
        &a,
        &sock,
        &["--control", &control_arg, "--iops-total", "500"],
    )
    .unwrap_or_else(|f| panic!("{f}"));
    let e = export_of(&list(&control), &sock).unwrap();
    assert_eq!(e["limits"], serde_json::json!({"iops_total": 500}));

    let what = "iops_total 500, 4 KiB reads";
    assert_rate_limited(what, &s, &d, &control, &sock, "4k", 500.0);

    // At run time: 2 MiB/s of 64 KiB reads is 32 requests per second.
    ctl_ok(
        &control,
        &[
            "limit",
            &sock.display().to_string(),
            "--bps-read",
            "2097152",
        ],
    );
    let e = export_of(&list(&control), &sock).unwrap();
    assert_eq!(e["limits"], serde_json::json!({"bps_read": 2097152}));
    let what = "bps_read 2 MiB/s, 64 KiB reads";
    assert_rate_limited(what, &s, &d, &control, &sock, "64k", 32.0);

    let err = ctl_err(
        &control,
        &[
            "limit",
            &sock.display().to_string(),
            "--iops-total",
            "5",
            "--iops-read",
            "5",
        ],
    );
    assert!(err.contains("cannot be used together"), "{err}");
    ctl_ok(&control, &["limit", &sock.display().to_string(), "--none"]);
    let e = export_of(&list(&control), &sock).unwrap();
    assert_eq!(e["limits"], serde_json::json!({}));
    assert_eq!(e["group"], Value::Null);
}

#[test]
fn a_group_shares_its_limit_fairly() {
    require_qemu_tools();
    let s = Scratch::new("ctl-group");
    let a = image_with(&s, "a.qcow2", 0xa1);
    let b = image_with(&s, "b.qcow2", 0xb2);
    let (a_sock, b_sock) = (s.socket("a.sock"), s.socket("b.sock"));
    let control = s.socket("ctl.sock");
    let config = s.join("q.toml");
    std::fs::write(
        &config,
        format!(
            "control = \"{}\"\n\
             [[export]]\nimage = \"{}\"\nsocket = \"{}\"\n\
             group = \"tenant\"\niops_total = 400\n\
             [[export]]\nimage = \"{}\"\nsocket = \"{}\"\ngroup = \"tenant\"\n",
            control.display(),
            a.display(),
            a_sock.display(),
            b.display(),
            b_sock.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("serve").arg("--config").arg(&config);
    let _d = Daemon::spawn(cmd, &a, &a_sock).unwrap_or_else(|f| panic!("{f}"));
    let exports = list(&control);
    for sock in [&a_sock, &b_sock] {
        let e = export_of(&exports, sock).unwrap();
        assert_eq!(e["group"], "tenant");
        assert_eq!(e["limits"], serde_json::json!({"iops_total": 400}));
    }
    // Both clients run side by side over the same window.
    let (ja, jb) = (s.join("a.json"), s.join("b.json"));
    let (ca, cb) = (
        start_bench(&a_sock, "4k", &ja),
        start_bench(&b_sock, "4k", &jb),
    );
    let (ra, rb) = (bench_iops(ca, &ja), bench_iops(cb, &jb));
    eprintln!("group tenant, iops_total 400: export a {ra:.1}/s, export b {rb:.1}/s");
    assert_near("group of two, together", ra + rb, 400.0);
    let share = ra / (ra + rb);
    assert!((0.4..=0.6).contains(&share), "a's share {share:.3}");

    // Setting the group's limits through one export changes them for both.
    ctl_ok(
        &control,
        &[
            "limit",
            &b_sock.display().to_string(),
            "--iops-total",
            "100",
        ],
    );
    let exports = list(&control);
    for sock in [&a_sock, &b_sock] {
        assert_eq!(
            export_of(&exports, sock).unwrap()["limits"],
            serde_json::json!({"iops_total": 100})
        );
    }
}

fn write_config(path: &Path, control: &Path, exports: &[(&Path, &Path, &str)]) {
    let mut text = format!("control = \"{}\"\n", control.display());
    for (image, socket, extra) in exports {
        text.push_str(&format!(
            "[[export]]\nimage = \"{}\"\nsocket = \"{}\"\nread_only = true\n{extra}",
            image.display(),
            socket.display()
        ));
    }
    std::fs::write(path, text).unwrap();
}

/// Polls `ctl list` until `done` holds (at most 30 s).
fn wait_for_list(control: &Path, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let exports = list(control);
        if done(&exports) {
            return exports;
        }
        assert!(Instant::now() < deadline, "{what}: {exports:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sighup_applies_the_config_difference() {
    require_qemu_tools();
    let s = Scratch::new("ctl-hup");
    let a = image_with(&s, "a.qcow2", 0xa1);
    let b = image_with(&s, "b.qcow2", 0xb2);
    let (a_sock, b_sock) = (s.socket("a.sock"), s.socket("b.sock"));
    let control = s.socket("ctl.sock");
    let config = s.join("q.toml");
    write_config(&config, &control, &[(&a, &a_sock, "iops_total = 1000\n")]);
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("serve").arg("--config").arg(&config);
    let mut d = Daemon::spawn(cmd, &a, &a_sock).unwrap_or_else(|f| panic!("{f}"));
    let hup = |d: &Daemon| {
        // SAFETY: kill(2) on our own child's pid; no memory involved.
        assert_eq!(unsafe { libc::kill(d.pid(), libc::SIGHUP) }, 0);
    };

    // An export added to the file, another's limits changed.
    write_config(
        &config,
        &control,
        &[
            (&a, &a_sock, "iops_total = 200\niops_total_max = 400\n"),
            (&b, &b_sock, ""),
        ],
    );
    hup(&d);
    let exports = wait_for_list(&control, "b added", |e| e.len() == 2);
    assert_eq!(
        export_of(&exports, &a_sock).unwrap()["limits"],
        serde_json::json!({"iops_total": 200, "iops_total_max": 400})
    );
    let data = read_through(&b_sock, 0, 4096);
    assert!(data.iter().all(|&x| x == 0xb2));

    // A broken file changes nothing.
    std::fs::write(&config, "[[export]]\nimage = 3\n").unwrap();
    hup(&d);
    thread::sleep(Duration::from_millis(300));
    d.assert_alive("after reloading a broken config file");
    assert_eq!(list(&control).len(), 2);

    // Daemon-wide settings fixed at start-up: reported, not applied; the rest is.
    write_config(&config, &control, &[(&a, &a_sock, ""), (&b, &b_sock, "")]);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("nice = 5\ncache_per_core = \"1G\"\n{text}"),
    )
    .unwrap();
    hup(&d);
    d.wait_for_stderr(
        "Reload: a change of nice, cache_per_core takes a restart; not applied",
        1,
        Duration::from_secs(30),
    );
    // The next reload compares with the file as it was read last: nothing more to report.
    write_config(&config, &control, &[(&a, &a_sock, "")]);
    std::fs::write(
        &config,
        format!(
            "nice = 5\ncache_per_core = \"1G\"\n{}",
            std::fs::read_to_string(&config).unwrap()
        ),
    )
    .unwrap();
    hup(&d);
    let exports = wait_for_list(&control, "b removed", |e| e.len() == 1);
    assert_eq!(
        d.stderr().matches("takes a restart").count(),
        1,
        "{}",
        d.stderr()
    );
    assert!(!b_sock.exists());
    assert_eq!(
        export_of(&exports, &a_sock).unwrap()["limits"],
        serde_json::json!({})
    );
    d.assert_alive("after the reloads");
    let status = d.terminate();
    assert!(status.success(), "{status}");
}

fn qemu_img_virtual_size(img: &Path) -> u64 {
    let out = run_ok(
        qemu_img_cmd()
            .args(["info", "--output=json", "-U"])
            .arg(img),
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

#[test]
fn resize_grows_the_l1_table_and_new_connections_see_it() {
    require_qemu_tools();
    let s = Scratch::new("ctl-resize");
    // 64 KiB clusters: one L1 entry covers 512 MiB, so 1.5 GiB needs a larger L1 table.
    let a = image_with(&s, "a.qcow2", 0xa1);
    let sock = s.socket("a.sock");
    let control = s.socket("ctl.sock");
    let control_arg = control.display().to_string();
    let sock_arg = sock.display().to_string();
    let d = Daemon::start_writable(&a, &sock, &["--control", &control_arg, "--queues", "2"])
        .unwrap_or_else(|f| panic!("{f}"));

    // A client connected during the resize goes on working.
    let (release, holder) = hold_client(&sock);
    ctl_ok(&control, &["resize", &sock_arg, "1536M"]);
    drop(release);
    holder.join().unwrap().unwrap();
    assert_eq!(
        export_of(&list(&control), &sock).unwrap()["size"],
        1536 * MIB
    );

    // A new connection sees the new size and can write past the old end.
    let data = rw_session(&sock, 2, READ_TIMEOUT, |c| {
        assert_eq!(c.capacity(), 1536 * MIB);
        c.run_ok(&[
            BlkOp::Write {
                off: GIB_1 + 4096,
                data: vec![0xc3; 65536],
            },
            BlkOp::Flush,
        ])?;
        let tail = c.read_range(GIB_1 + 4096, 65536)?;
        let head = c.read_range(0, 65536)?;
        Ok((tail, head))
    })
    .unwrap();
    assert!(data.0.iter().all(|&x| x == 0xc3), "the new area reads back");
    assert!(
        data.1.iter().all(|&x| x == 0xa1),
        "the old data is still there"
    );

    // Shrinking: refused without --shrink, refused over allocated data, and allowed when
    // nothing is allocated past the new end.
    let err = ctl_err(&control, &["resize", &sock_arg, "64M"]);
    assert!(err.contains("shrink"), "{err}");
    let err = ctl_err(&control, &["resize", &sock_arg, "64M", "--shrink"]);
    assert!(err.contains("is allocated"), "{err}");
    ctl_ok(&control, &["resize", &sock_arg, "1280M", "--shrink"]);
    let err = ctl_err(&control, &["resize", &sock_arg, "1000000001"]);
    assert!(err.contains("multiple of 512"), "{err}");
    assert_eq!(
        export_of(&list(&control), &sock).unwrap()["size"],
        1280 * MIB
    );

    ctl_ok(&control, &["remove", &sock_arg]);
    assert_eq!(qemu_img_virtual_size(&a), 1280 * MIB);
    assert_check_clean(&a, "after online resizes");
    let raw = oracle(&a);
    assert_eq!(raw.len() as u64, 1280 * MIB);
    let at = (GIB_1 + 4096) as usize;
    assert!(raw[at..at + 65536].iter().all(|&x| x == 0xc3));
    assert!(raw[..MIB as usize].iter().all(|&x| x == 0xa1));
    let held = MIB as usize;
    assert!(
        raw[held..held + 4096].iter().all(|&x| x == 0x5a),
        "the write of the client connected during the resize is there"
    );
    drop(d);
}

const GIB_1: u64 = 1024 * MIB;

#[test]
fn resize_of_a_read_only_export_is_refused() {
    require_qemu_tools();
    let s = Scratch::new("ctl-resize-ro");
    let a = image_with(&s, "a.qcow2", 0xa1);
    let sock = s.socket("a.sock");
    let control = s.socket("ctl.sock");
    let control_arg = control.display().to_string();
    let _d = Daemon::start_with(&a, &sock, &["--control", &control_arg])
        .unwrap_or_else(|f| panic!("{f}"));
    let err = ctl_err(&control, &["resize", &sock.display().to_string(), "128M"]);
    assert!(err.contains("read-only"), "{err}");
    let err = ctl_err(
        &control,
        &["resize", &s.join("nope.sock").display().to_string(), "128M"],
    );
    assert!(err.contains("No export"), "{err}");
    assert_eq!(qemu_img_virtual_size(&a), 64 * MIB);
}

/// Starts `serve --control CONTROL` without an export and waits for its control line.
fn serve_control_only(control: &Path) -> std::process::Child {
    let mut child = Command::new(daemon_bin())
        .arg("serve")
        .arg("--control")
        .arg(control)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start qcow2d serve --control");
    let stdout = child.stdout.take().unwrap();
    let want = format!("qcow2d: control on {}", control.display());
    let line = with_timeout("the control line", READY_TIMEOUT, move || {
        let mut first = String::new();
        BufReader::new(stdout).read_line(&mut first).map(|_| first)
    });
    let line = line.expect("read the daemon's stdout");
    assert_eq!(line.trim_end(), want);
    child
}

/// Stops a daemon started by [`serve_control_only`] with SIGTERM; it must exit cleanly.
fn stop(mut child: std::process::Child) {
    // SAFETY: kill(2) on our own child's pid; no memory involved.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = with_timeout("the daemon's exit", EXIT_TIMEOUT, move || child.wait());
    assert!(status.unwrap().success());
}

/// `serve --control SOCK` alone: no export until `ctl add`, and the daemon says when its
/// control socket takes requests.
#[test]
fn a_daemon_with_only_a_control_socket_takes_exports_later() {
    require_qemu_tools();
    let s = Scratch::new("ctl-empty");
    let a = image_with(&s, "a.qcow2", 0xa1);
    let sock = s.socket("a.sock");
    let control = s.socket("ctl.sock");
    let child = serve_control_only(&control);
    assert!(list(&control).is_empty());
    ctl_ok(&control, &add_args(&a, &sock, &[]));
    let data = read_through(&sock, 0, 4096);
    assert!(data.iter().all(|&x| x == 0xa1));
    stop(child);
    assert!(!sock.exists() && !control.exists());
    assert_check_clean(&a, "after exit");
}

/// An image left dirty (lazy refcounts) added at run time is repaired by the supervisor
/// thread, under its seccomp filter (the repair reads, writes and syncs the file), before it
/// is served: the export answers with the image's data and the dirty bit is cleared.
#[test]
fn a_dirty_image_added_at_run_time_is_repaired_under_the_filter() {
    require_qemu_tools();
    let s = Scratch::new("ctl-dirty");
    let img = s.join("dirty.qcow2");
    create_qcow2(&img, 64 * MIB, "lazy_refcounts=on");
    write_pattern(&img, "qcow2", 0xd1, 0, MIB);
    let features = be64(&img, hdr::INCOMPATIBLE_FEATURES);
    set_be64(&img, hdr::INCOMPATIBLE_FEATURES, features | 1);
    assert!(dirty_bit(&img));
    let sock = s.socket("d.sock");
    let control = s.socket("ctl.sock");
    let child = serve_control_only(&control);
    ctl_ok(&control, &add_args(&img, &sock, &[]));
    assert!(!dirty_bit(&img), "the repair at open clears the dirty bit");
    let data = read_through(&sock, 0, 4096);
    assert!(data.iter().all(|&x| x == 0xd1));
    stop(child);
    assert_check_clean(&img, "after exit");
}

/// The daemon's test hook (debug builds only): the set-up of the next connection to each
/// socket it names (separated by `:`) fails once, as a real set-up error would.
const FAIL_SETUP: &str = "QCOW2D_TEST_ONLY_FAIL_SETUP";

/// Waits until the daemon has logged `count` export failures; `what` names the wait.
fn wait_for_failures(d: &Daemon, count: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.stderr().matches("Export failed").count() < count {
        assert!(
            Instant::now() < deadline,
            "{what} did not fail (the {FAIL_SETUP} hook exists in debug builds only: is \
             QCOW2D_BIN a release build?):\n{}",
            d.stderr()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// One export that fails while serving (here the set-up of its next client's connection
/// fails, through the daemon's test hook, which ends the export) stops only itself: one log
/// line names it, `ctl list` shows it failed, the other export goes on serving its client
/// and new ones, the daemon lives, and `ctl remove` / `ctl add` replace it.
#[test]
fn an_export_that_fails_while_serving_stops_only_itself() {
    require_qemu_tools();
    let s = Scratch::new("ctl-fail");
    let a = image_with(&s, "a.qcow2", 0xa1);
    let b = image_with(&s, "b.qcow2", 0xb2);
    let (a_sock, b_sock) = (s.socket("a.sock"), s.socket("b.sock"));
    let control = s.socket("ctl.sock");
    let config = s.join("q.toml");
    write_config(&config, &control, &[(&a, &a_sock, ""), (&b, &b_sock, "")]);
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("serve").arg("--config").arg(&config);
    cmd.env(FAIL_SETUP, &a_sock);
    let mut d = Daemon::spawn(cmd, &b, &b_sock).unwrap_or_else(|f| panic!("{f}"));
    wait_for_list(&control, "both exports", |e| e.len() == 2);

    // A client of b, connected before the failure and reading after it.
    let mut b_client = BlkClient::connect(&b_sock, 1).unwrap_or_else(|e| panic!("{e}"));
    let read_b = |c: &mut BlkClient| {
        let got = c.read_batch(&[(0, 4096)]).unwrap().remove(0).unwrap();
        assert!(got.iter().all(|&x| x == 0xb2), "wrong data from b");
    };
    read_b(&mut b_client);

    let attempt = UnixStream::connect(&a_sock);
    wait_for_failures(&d, 1, "a");
    drop(attempt);
    d.assert_alive("after an export failed");
    let log = d.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("Export failed"))
        .unwrap()
        .to_owned();
    assert!(
        line.contains(&a_sock.display().to_string()) && line.contains(FAIL_SETUP),
        "the failure line names neither the export nor the cause: {line}"
    );

    // b serves its client and new ones.
    read_b(&mut b_client);
    drop(b_client);
    let data = read_through(&b_sock, 0, 4096);
    assert!(data.iter().all(|&x| x == 0xb2));

    let exports = list(&control);
    let failed = export_of(&exports, &a_sock).unwrap();
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains(FAIL_SETUP),
        "{failed}"
    );
    assert_eq!(export_of(&exports, &b_sock).unwrap()["state"], "serving");
    let text = ctl_ok(&control, &["list"]);
    assert!(text.contains("failed:"), "{text}");
    assert!(
        !a_sock.exists(),
        "the failed export's socket is left behind"
    );
    let refused = ctl_err(&control, &["resize", &a_sock.display().to_string(), "128M"]);
    assert!(refused.contains("failed"), "{refused}");

    // Replaced by `ctl add` on its socket; then removed and added again.
    ctl_ok(&control, &add_args(&a, &a_sock, &["--read-only"]));
    let data = read_through(&a_sock, 0, 4096);
    assert!(data.iter().all(|&x| x == 0xa1));
    let exports = list(&control);
    assert_eq!(exports.len(), 2, "{exports:?}");
    assert_eq!(export_of(&exports, &a_sock).unwrap()["state"], "serving");

    d.assert_alive("at the end");
    let status = d.terminate();
    assert!(status.success(), "{status}");
}

/// A failed export that nobody removed makes the daemon's exit status non-zero when it
/// stops; `ctl remove` forgets one.
#[test]
fn a_failed_export_is_forgotten_by_remove_and_reported_at_exit() {
    require_qemu_tools();
    let s = Scratch::new("ctl-fail-exit");
    let a = image_with(&s, "a.qcow2", 0xa1);
    let b = image_with(&s, "b.qcow2", 0xb2);
    let c = image_with(&s, "c.qcow2", 0xc3);
    let (a_sock, b_sock, c_sock) = (s.socket("a.sock"), s.socket("b.sock"), s.socket("c.sock"));
    let control = s.socket("ctl.sock");
    let config = s.join("q.toml");
    write_config(
        &config,
        &control,
        &[(&a, &a_sock, ""), (&b, &b_sock, ""), (&c, &c_sock, "")],
    );
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("serve").arg("--config").arg(&config);
    cmd.env(
        FAIL_SETUP,
        format!("{}:{}", a_sock.display(), b_sock.display()),
    );
    let mut d = Daemon::spawn(cmd, &c, &c_sock).unwrap_or_else(|f| panic!("{f}"));
    wait_for_list(&control, "three exports", |e| e.len() == 3);
    for (sock, failures) in [(&a_sock, 1), (&b_sock, 2)] {
        let attempt = UnixStream::connect(sock);
        wait_for_failures(&d, failures, &sock.display().to_string());
        drop(attempt);
    }
    d.assert_alive("after two exports failed");
    ctl_ok(&control, &["remove", &a_sock.display().to_string()]);
    let exports = wait_for_list(&control, "a forgotten", |e| e.len() == 2);
    assert_eq!(export_of(&exports, &b_sock).unwrap()["state"], "failed");
    let data = read_through(&c_sock, 0, 4096);
    assert!(data.iter().all(|&x| x == 0xc3));
    let status = d.terminate();
    assert!(
        !status.success(),
        "a daemon with a failed export exited with {status}"
    );
}

/// `ctl add --overlap-check MODE` serves the export in that mode (as `overlap_check` in the
/// config file does); without it, the default (`cached`).
#[test]
fn ctl_add_takes_the_overlap_check_mode() {
    require_qemu_tools();
    let s = Scratch::new("ctl-overlap");
    let a = image_with(&s, "a.qcow2", 0xa1);
    let b = image_with(&s, "b.qcow2", 0xb2);
    let (a_sock, b_sock) = (s.socket("a.sock"), s.socket("b.sock"));
    let control = s.socket("ctl.sock");
    let control_arg = control.display().to_string();
    let mut d = Daemon::start_writable(&a, &a_sock, &["--control", &control_arg])
        .unwrap_or_else(|f| panic!("{f}"));
    ctl_ok(
        &control,
        &add_args(&b, &b_sock, &["--overlap-check", "all"]),
    );
    let exports = list(&control);
    assert_eq!(
        export_of(&exports, &b_sock).unwrap()["overlap_check"],
        "all"
    );
    assert_eq!(
        export_of(&exports, &a_sock).unwrap()["overlap_check"],
        "cached"
    );
    assert!(
        d.stderr().lines().any(|l| l.contains("Export ready")
            && l.contains("b.sock")
            && l.contains("overlap_check=all")),
        "{}",
        d.stderr()
    );
    let refused = ctl_err(
        &control,
        &add_args(&b, &s.socket("c.sock"), &["--overlap-check", "some"]),
    );
    assert!(refused.contains("some"), "{refused}");
    d.assert_alive("after the adds");
    let st = d.terminate();
    assert!(st.success(), "{st}");
}

/// The names of the threads of process `pid`, but the kernel's io_uring workers (`iou-wrk-…`,
/// which the kernel starts for the rings' blocking work and ends once idle for a few seconds).
fn thread_names(pid: i32) -> Vec<String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        // A thread may end meanwhile.
        if let Ok(name) = std::fs::read_to_string(task.unwrap().path().join("comm")) {
            let name = name.trim_end();
            if !name.starts_with("iou-") {
                names.push(name.to_owned());
            }
        }
    }
    names
}

/// Many exports share one listener thread: an idle export has no thread of its own; two
/// exports serve a client each at once (no thread of their own: the core threads run the
/// connections' workers); a second
/// client of a busy export waits for the first to leave; an idle writable export that is
/// removed gives its socket and its image back at once.
#[test]
fn idle_exports_share_one_listener_thread() {
    require_qemu_tools();
    let s = Scratch::new("ctl-listen");
    let shared = image_with(&s, "shared.qcow2", 0x5e);
    let w = image_with(&s, "w.qcow2", 0x77);
    let sockets: Vec<PathBuf> = (0..16).map(|i| s.socket(&format!("r{i}.sock"))).collect();
    let w_sock = s.socket("w.sock");
    let control = s.socket("ctl.sock");
    let config = s.join("q.toml");
    let mut text = format!("control = \"{}\"\n", control.display());
    for socket in &sockets {
        text.push_str(&format!(
            "[[export]]\nimage = \"{}\"\nsocket = \"{}\"\nread_only = true\nqueues = 1\n",
            shared.display(),
            socket.display()
        ));
    }
    // Export 16, writable.
    text.push_str(&format!(
        "[[export]]\nimage = \"{}\"\nsocket = \"{}\"\nqueues = 1\n",
        w.display(),
        w_sock.display()
    ));
    std::fs::write(&config, text).unwrap();
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("serve").arg("--config").arg(&config);
    let mut d = Daemon::spawn(cmd, &w, &w_sock).unwrap_or_else(|f| panic!("{f}"));
    wait_for_list(&control, "17 exports", |e| e.len() == 17);

    // Idle: main, signals, control, the listener, the relay thread, the core threads (one
    // per CPU) and the inflate pool; no export thread. A thread of start-up may still be ending, or one of the pool starting
    // (named after its parent until it names itself): wait (bounded) for the threads to be
    // those, then check them.
    let count =
        |names: &[String], prefix: &str| names.iter().filter(|n| n.starts_with(prefix)).count();
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let deadline = Instant::now() + Duration::from_secs(30);
    let idle = loop {
        let names = thread_names(d.pid());
        let pool = count(&names, "qcow2d-inflate");
        let settled = count(&names, "qcow2d-listen") == 1
            && count(&names, "qcow2d-relay") == 1
            && count(&names, "qcow2d-export") == 0
            && count(&names, "qcow2d-core-") == cpus
            && names.len() == 5 + cpus + pool;
        if settled || Instant::now() >= deadline {
            break names;
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(count(&idle, "qcow2d-listen"), 1, "{idle:?}");
    assert_eq!(count(&idle, "qcow2d-relay"), 1, "{idle:?}");
    assert_eq!(count(&idle, "qcow2d-export"), 0, "{idle:?}");
    assert_eq!(count(&idle, "qcow2d-core-"), cpus, "{idle:?}");
    let pool = count(&idle, "qcow2d-inflate");
    assert_eq!(idle.len(), 5 + cpus + pool, "{idle:?}");

    // A writer on w holds its connection while r3 serves a reader.
    let (release, holder) = hold_client(&w_sock);
    let data = read_through(&sockets[3], 0, 4096);
    assert!(data.iter().all(|&x| x == 0x5e));
    // Once r3's connection is torn down (by a short-lived thread, which shows its parent's
    // name, the listener's, until it names itself), the threads are the idle daemon's: w's
    // connection has none of its own.
    let deadline = Instant::now() + Duration::from_secs(30);
    let busy = loop {
        let names = thread_names(d.pid());
        if !names.iter().any(|n| n == "qcow2d-export3") && count(&names, "qcow2d-listen") == 1 {
            break names;
        }
        assert!(Instant::now() < deadline, "r3's threads left: {names:?}");
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(count(&busy, "qcow2d-export16"), 0, "{busy:?}");
    // w's connection: no worker thread (the core threads run its worker) and no request
    // thread (the relay thread runs its handler).
    assert_eq!(busy.len(), idle.len(), "{busy:?}");
    assert_eq!(count(&busy, "qcow2d-core-"), cpus, "{busy:?}");
    assert_eq!(count(&busy, "qcow2d-vu"), 0, "{busy:?}");
    assert_eq!(count(&busy, "qcow2d-listen"), 1, "{busy:?}");
    // One relay thread, whatever the number of connections, and none per connection.
    assert_eq!(count(&busy, "qcow2d-relay"), 1, "{busy:?}");
    assert!(
        !busy
            .iter()
            .any(|n| n.starts_with("qcow2d-vu") && (n.ends_with("-in") || n.ends_with("-out"))),
        "{busy:?}"
    );
    // A second client of w waits for the first: it reads what the first wrote.
    let w_sock2 = w_sock.clone();
    let (done_tx, done_rx) = mpsc::channel();
    let second = thread::spawn(move || {
        let data = read_through(&w_sock2, MIB, 4096);
        let _ = done_tx.send(());
        data
    });
    thread::sleep(Duration::from_millis(300));
    assert!(
        done_rx.try_recv().is_err(),
        "a second client was served while the first was connected"
    );
    release.send(()).unwrap();
    holder.join().unwrap().unwrap();
    let data = second.join().unwrap();
    assert!(data.iter().all(|&x| x == 0x5a), "the first client's write");

    // Every connection's thread is gone once its client is.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let names = thread_names(d.pid());
        if count(&names, "qcow2d-export") == 0
            && count(&names, "qcow2d-vu") == 0
            && names.len() == idle.len()
        {
            break;
        }
        assert!(Instant::now() < deadline, "threads left: {names:?}");
        thread::sleep(Duration::from_millis(20));
    }

    // An idle writable export removed: its socket goes and its image is free for qemu-io.
    ctl_ok(&control, &["remove", &w_sock.display().to_string()]);
    assert!(!w_sock.exists(), "the socket of a removed export is left");
    write_pattern(&w, "qcow2", 0x33, 0, 4096);
    let exports = list(&control);
    assert_eq!(exports.len(), 16, "{exports:?}");
    // The others still serve.
    let data = read_through(&sockets[15], 0, 4096);
    assert!(data.iter().all(|&x| x == 0x5e));
    d.assert_alive("after the removal");
    let status = d.terminate();
    assert!(status.success(), "qcow2d exited with {status}");
    for socket in &sockets {
        assert!(!socket.exists(), "{} left behind", socket.display());
    }
}
