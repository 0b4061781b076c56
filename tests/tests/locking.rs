//! Image locking between qcow2d and QEMU, both ways (DESIGN.md section 4, invariant 8), with
//! qemu-storage-daemon as the oracle.
//!
//! QEMU's file-posix driver takes OFD read locks on bytes `100 + perm` for the permissions it
//! holds and `200 + perm` for those it does not share (perm 0 consistent read, 1 write,
//! 2 write unchanged, 3 resize). qcow2d must take exactly the bytes a QEMU process serving the
//! same image in the same mode takes, so every QEMU tool (and every second server) behaves the
//! same against a qcow2d export as against a qemu-storage-daemon export. The tests here run
//! qemu-storage-daemon on a copy of each image in the same mode and compare:
//! - the lock bytes held on every file (image, external data file, qcow2 and raw backing
//!   files), probed with F_OFD_GETLK from another file description;
//! - the outcome of QEMU's tools, with and without `-U` (force share), of a second QEMU
//!   writer, and of a second `qcow2d serve` and a second qemu-storage-daemon, writable and
//!   read-only.

use qcow2d_tests::*;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The two export modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Writable,
    ReadOnly,
}

// ---------------------------------------------------------------------------------------------
// The oracle: qemu-storage-daemon exporting an image over vhost-user-blk
// ---------------------------------------------------------------------------------------------

/// A running `qemu-storage-daemon`; killed on drop.
struct Qsd {
    child: Child,
}

impl Qsd {
    /// Starts qemu-storage-daemon exporting `img` (a qcow2 node over a file node) on `socket`:
    /// writable, or read-only with read-only nodes (a read-only QEMU user of the image). Waits
    /// until the socket exists (the image is open and locked by then); `Err` with its output
    /// when it exits instead.
    fn start(img: &Path, socket: &Path, mode: Mode) -> Result<Qsd, String> {
        let (ro, writable) = match mode {
            Mode::Writable => ("off", "on"),
            Mode::ReadOnly => ("on", "off"),
        };
        let mut c = qemu_storage_daemon_cmd();
        c.current_dir(image_dir(img))
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,read-only={ro},filename={}",
                img.display()
            ))
            .arg("--blockdev")
            .arg(format!("driver=qcow2,node-name=q,read-only={ro},file=f"))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={},writable={writable}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run qemu-storage-daemon: {e}"));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                let mut t = String::new();
                for r in [
                    child.stdout.take().map(|r| Box::new(r) as Box<dyn Read>),
                    child.stderr.take().map(|r| Box::new(r) as Box<dyn Read>),
                ]
                .into_iter()
                .flatten()
                {
                    let mut r = r;
                    let _ = r.read_to_string(&mut t);
                }
                return Err(format!("qemu-storage-daemon exited ({st}): {t}"));
            }
            if socket.exists() {
                return Ok(Qsd { child });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "qemu-storage-daemon neither exited nor created {} within {} s",
                    socket.display(),
                    READY_TIMEOUT.as_secs()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What serves the image while the probes run.
enum Server {
    Qcow2d(Daemon),
    Qsd(Qsd),
}

impl Server {
    fn start(qsd: bool, img: &Path, socket: &Path, mode: Mode) -> Server {
        if qsd {
            Server::Qsd(
                Qsd::start(img, socket, mode)
                    .unwrap_or_else(|e| panic!("the oracle did not start: {e}")),
            )
        } else {
            let extra: &[&str] = match mode {
                Mode::Writable => &[],
                Mode::ReadOnly => &["--read-only"],
            };
            Server::Qcow2d(
                Daemon::start_writable(img, socket, extra)
                    .unwrap_or_else(|f| panic!("qcow2d serve {extra:?}: {f}")),
            )
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Server::Qcow2d(_) => "qcow2d",
            Server::Qsd(_) => "qemu-storage-daemon",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lock bytes
// ---------------------------------------------------------------------------------------------

/// The lock bytes among 100..=104 and 200..=204 that another file description holds on
/// `path`, as seen through a new description of our own.
fn lock_bytes(path: &Path) -> Vec<i64> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    (100..=104)
        .chain(200..=204)
        .filter(|&byte| {
            // SAFETY: flock is a plain C struct of integers; all-zero is a valid value.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = libc::F_WRLCK as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            fl.l_start = byte;
            fl.l_len = 1;
            // SAFETY: F_OFD_GETLK reads and writes the flock struct, which lives on our stack.
            let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
            assert!(
                r == 0,
                "F_OFD_GETLK on {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
            i32::from(fl.l_type) != libc::F_UNLCK
        })
        .collect()
}

/// The files of one test image, created in `dir` with names relative to it.
struct Tree {
    top: PathBuf,
    /// Every file to compare, by name.
    files: Vec<(&'static str, PathBuf)>,
}

/// Builds an image of kind `kind` in `dir`: "plain", "data-file" (an external data file),
/// "qcow2-backing" or "raw-backing".
fn make_tree(dir: &Path, kind: &str) -> Tree {
    std::fs::create_dir_all(dir).unwrap();
    let top = dir.join("top.qcow2");
    let size = (16 * MIB).to_string();
    let mut files = vec![("image", top.clone())];
    match kind {
        "plain" => {
            create_qcow2(&top, 16 * MIB, "");
        }
        "data-file" => {
            data_file_image_in(dir, "top.data");
            files.push(("data file", dir.join("top.data")));
        }
        "qcow2-backing" | "raw-backing" => {
            let (base, fmt) = if kind == "raw-backing" {
                ("base.raw", "raw")
            } else {
                ("base.qcow2", "qcow2")
            };
            qemu_img_in(dir, &["create", "-q", "-f", fmt, base, &size]);
            overlay_in(dir, "top.qcow2", base, fmt);
            files.push(("backing file", dir.join(base)));
        }
        other => panic!("unknown image kind {other}"),
    }
    Tree { top, files }
}

/// Serves a `kind` image with qcow2d and a copy with qemu-storage-daemon in `mode` and
/// compares the lock bytes on every file.
fn assert_same_lock_bytes(kind: &str, mode: Mode) {
    let s = Scratch::new(&format!("lockb-{kind}"));
    let mut seen = Vec::new();
    for qsd in [true, false] {
        let tree = make_tree(&s.join(if qsd { "qsd" } else { "q2d" }), kind);
        let server = Server::start(qsd, &tree.top, &s.socket(&format!("{qsd}.sock")), mode);
        let bytes: Vec<(&str, Vec<i64>)> = tree
            .files
            .iter()
            .map(|(what, p)| (*what, lock_bytes(p)))
            .collect();
        seen.push((server.name(), bytes));
    }
    let (qsd, q2d) = (&seen[0], &seen[1]);
    assert!(
        !qsd.1[0].1.is_empty(),
        "the oracle holds no lock on the image: {qsd:?}"
    );
    assert_eq!(
        qsd.1, q2d.1,
        "{kind} image served {mode:?}: lock bytes held by {} (left) and {} (right)",
        qsd.0, q2d.0
    );
}

#[test]
fn writable_export_locks_what_qemu_locks() {
    for kind in ["plain", "data-file", "qcow2-backing", "raw-backing"] {
        assert_same_lock_bytes(kind, Mode::Writable);
    }
}

#[test]
fn read_only_export_locks_what_qemu_locks() {
    for kind in ["plain", "data-file", "qcow2-backing", "raw-backing"] {
        assert_same_lock_bytes(kind, Mode::ReadOnly);
    }
}

// ---------------------------------------------------------------------------------------------
// What QEMU's tools and second servers do while an image is served
// ---------------------------------------------------------------------------------------------

/// How a probe ended.
#[derive(Debug)]
struct Outcome {
    ok: bool,
    text: String,
}

impl Outcome {
    fn of(out: &CmdOutput) -> Outcome {
        let text = format!("{}{}", out.stdout, out.stderr);
        // qemu-io reports a failed command on stdout and may still exit 0.
        let ok = out.status.success() && !text.contains("failed");
        Outcome { ok, text }
    }
}

/// Everything run against a served image, with and without `-U`.
const TOOL_PROBES: &[&str] = &[
    "qemu-img info IMG",
    "qemu-img info -U IMG",
    "qemu-img map IMG",
    "qemu-img map -U IMG",
    "qemu-img check IMG",
    "qemu-img check -U IMG",
    "qemu-img convert -O raw IMG OUT",
    "qemu-img convert -U -O raw IMG OUT",
    "qemu-io -r -c read -P 0x3c 0 4k IMG",
    "qemu-io -r -U -c read -P 0x3c 0 4k IMG",
    "qemu-io -c read -P 0x3c 0 4k IMG",
];

/// Runs one probe of [`TOOL_PROBES`] on `img` (the `-c` argument is the words after it up to
/// IMG); `out` is a scratch output path.
fn run_tool_probe(probe: &str, img: &Path, out: &Path) -> Outcome {
    let words: Vec<&str> = probe.split(' ').collect();
    let mut c = match words[0] {
        "qemu-img" => qemu_img_cmd(),
        "qemu-io" => qemu_io_cmd(),
        other => panic!("a tool probe names `{other}`, not qemu-img or qemu-io"),
    };
    c.current_dir(image_dir(img));
    let mut i = 1;
    while i < words.len() {
        match words[i] {
            "IMG" => {
                c.arg(img);
            }
            "OUT" => {
                c.arg(out);
            }
            "-c" => {
                let end = words.iter().position(|&w| w == "IMG").expect("IMG");
                c.arg("-c").arg(words[i + 1..end].join(" "));
                i = end - 1;
            }
            w => {
                c.arg(w);
            }
        }
        i += 1;
    }
    Outcome::of(&run_cmd(&mut c, TOOL_TIMEOUT))
}

/// A second server of the image: `qcow2d serve` or qemu-storage-daemon, in `mode`.
fn run_server_probe(qsd: bool, mode: Mode, img: &Path, socket: &Path) -> Outcome {
    if qsd {
        match Qsd::start(img, socket, mode) {
            Ok(q) => {
                drop(q);
                Outcome {
                    ok: true,
                    text: "started".into(),
                }
            }
            Err(text) => Outcome { ok: false, text },
        }
    } else {
        let extra: &[&str] = match mode {
            Mode::Writable => &[],
            Mode::ReadOnly => &["--read-only"],
        };
        match Daemon::start_writable(img, socket, extra) {
            Ok(d) => {
                let st = d.terminate();
                assert!(st.success(), "second qcow2d exit status {st} after SIGTERM");
                Outcome {
                    ok: true,
                    text: "started".into(),
                }
            }
            Err(f) => {
                let st = f
                    .status
                    .unwrap_or_else(|| panic!("qcow2d neither started nor exited: {f}"));
                assert!(!st.success(), "qcow2d exited 0 without serving: {f}");
                let text = f.stderr.clone();
                assert!(
                    text.contains(&img.display().to_string()),
                    "qcow2d's refusal must name the image: {f}"
                );
                Outcome { ok: false, text }
            }
        }
    }
}

/// Every probe's outcome while `server_is_qsd` serves a fresh image in `mode`.
fn probe_all(s: &Scratch, server_is_qsd: bool, mode: Mode) -> Vec<(String, Outcome)> {
    let dir = s.join(if server_is_qsd { "qsd" } else { "q2d" });
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("l.qcow2");
    create_qcow2(&img, 16 * MIB, "");
    write_pattern(&img, "qcow2", 0x3c, 0, 64 * KIB);
    let socket = s.socket(&format!("{server_is_qsd}.sock"));
    let server = Server::start(server_is_qsd, &img, &socket, mode);
    let mut outcomes = Vec::new();
    for probe in TOOL_PROBES {
        let out = dir.join("out.raw");
        outcomes.push((probe.to_string(), run_tool_probe(probe, &img, &out)));
    }
    for second_qsd in [false, true] {
        for second_mode in [Mode::Writable, Mode::ReadOnly] {
            let name = format!(
                "second {} {second_mode:?}",
                if second_qsd {
                    "qemu-storage-daemon"
                } else {
                    "qcow2d serve"
                }
            );
            let sock = s.socket(&format!("{server_is_qsd}-2.sock"));
            let _ = std::fs::remove_file(&sock);
            outcomes.push((name, run_server_probe(second_qsd, second_mode, &img, &sock)));
        }
    }
    match server {
        Server::Qcow2d(d) => {
            export_still_works(&socket, mode == Mode::Writable);
            let st = d.terminate();
            assert!(st.success(), "qcow2d exit status {st} after SIGTERM");
            assert_check_clean(&img, "after the lock probes");
        }
        Server::Qsd(q) => drop(q),
    }
    outcomes
}

/// Runs every probe against qemu-storage-daemon and against qcow2d serving in `mode` and
/// compares: each probe succeeds under both or fails under both, and fails for a lock.
fn assert_same_outcomes(test: &str, mode: Mode) {
    let s = Scratch::new(test);
    let oracle = probe_all(&s, true, mode);
    let ours = probe_all(&s, false, mode);
    // The oracle is live: a QEMU writer is kept out in both modes.
    let writer = &oracle
        .iter()
        .find(|(p, _)| p.starts_with("qemu-io -c"))
        .unwrap()
        .1;
    assert!(
        !writer.ok,
        "a QEMU writer opened the image while qemu-storage-daemon served it: {writer:?}"
    );
    let mut diffs = Vec::new();
    for ((probe, want), (_, got)) in oracle.iter().zip(&ours) {
        if want.ok != got.ok {
            diffs.push(format!(
                "`{probe}`: under qemu-storage-daemon {}, under qcow2d {}\n  qemu-storage-daemon: \
                 {}\n  qcow2d: {}",
                if want.ok { "works" } else { "refused" },
                if got.ok { "works" } else { "refused" },
                want.text.trim(),
                got.text.trim()
            ));
        } else if !got.ok && !got.text.to_lowercase().contains("lock") {
            diffs.push(format!(
                "`{probe}` failed under qcow2d for another reason than a lock: {}",
                got.text.trim()
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "served {mode:?}, QEMU's tools behave differently under qcow2d:\n{}",
        diffs.join("\n")
    );
}

#[test]
fn qemu_tools_see_a_writable_export_as_a_qemu_writer() {
    assert_same_outcomes("lock_rw", Mode::Writable);
}

#[test]
fn qemu_tools_see_a_read_only_export_as_a_qemu_reader() {
    assert_same_outcomes("lock_ro", Mode::ReadOnly);
}

/// The export still serves its client (reads, and writes when writable).
fn export_still_works(socket: &Path, writable: bool) {
    let r = if writable {
        rw_session(socket, 2, READ_TIMEOUT, |c| {
            c.run_ok(&[BlkOp::Write {
                off: MIB,
                data: vec![0x5d; 4096],
            }])?;
            c.read_range(0, 512)
        })
    } else {
        blk_session(socket, 2, READ_TIMEOUT, |c| {
            c.read_batch(&[(0, 512)])?.remove(0)
        })
    };
    let data = r.unwrap_or_else(|e| panic!("the export stopped working: {e}"));
    assert!(data.iter().all(|&b| b == 0x3c), "sector 0 reads wrong");
}

// ---------------------------------------------------------------------------------------------
// QEMU holding the image first
// ---------------------------------------------------------------------------------------------

fn image(s: &Scratch) -> PathBuf {
    let img = s.join("l.qcow2");
    create_qcow2(&img, 16 * MIB, "");
    write_pattern(&img, "qcow2", 0x3c, 0, 64 * KIB);
    img
}

/// `qcow2d serve` with `extra` options must fail to start with a clear lock error.
fn assert_qcow2d_refused(img: &Path, socket: &Path, extra: &[&str], what: &str) {
    match Daemon::start_writable(img, socket, extra) {
        Ok(d) => {
            let _ = d.sigkill();
            panic!("{what}: qcow2d serve {extra:?} started, but the image is locked");
        }
        Err(f) => {
            let status = f
                .status
                .unwrap_or_else(|| panic!("{what}: qcow2d neither started nor exited: {f}"));
            assert!(
                !status.success(),
                "{what}: exit status 0 without serving: {f}"
            );
            let err = f.stderr.to_lowercase();
            assert!(
                err.contains("lock") && err.contains(&img.display().to_string().to_lowercase()),
                "{what}: the error must name the image and say it is locked: {f}"
            );
        }
    }
}

#[test]
fn qemu_writer_keeps_qcow2d_out() {
    let s = Scratch::new("lock_qw");
    let img = image(&s);
    let holder = QemuIoHolder::open(&img, false)
        .unwrap_or_else(|e| panic!("qemu-io holding the image read-write: {e}"));
    assert_qcow2d_refused(
        &img,
        &s.socket("a.sock"),
        &[],
        "writable qcow2d while qemu-io holds the image read-write",
    );
    assert_qcow2d_refused(
        &img,
        &s.socket("b.sock"),
        &["--read-only"],
        "read-only qcow2d while qemu-io holds the image read-write",
    );
    let mut holder = holder;
    assert!(
        holder.alive(),
        "qemu-io stopped holding the image: {}",
        holder.output()
    );
    let st = holder.close();
    assert!(
        st.is_some_and(|st| st.success()),
        "qemu-io exit at end of input: {st:?}"
    );
    // Without the holder, qcow2d opens it.
    let d = Daemon::start_writable(&img, &s.socket("c.sock"), &[])
        .unwrap_or_else(|f| panic!("qcow2d serve after qemu-io exited: {f}"));
    let st = d.terminate();
    assert!(st.success(), "qcow2d exit status {st} after SIGTERM");
}

#[test]
fn qemu_reader_lets_only_read_only_qcow2d_in() {
    let s = Scratch::new("lock_qr");
    let img = image(&s);
    let mut holder = QemuIoHolder::open(&img, true)
        .unwrap_or_else(|e| panic!("qemu-io -r holding the image: {e}"));
    let socket = s.socket("a.sock");
    let d = Daemon::start_writable(&img, &socket, &["--read-only"])
        .unwrap_or_else(|f| panic!("read-only qcow2d while qemu-io -r holds the image: {f}"));
    export_still_works(&socket, false);
    let st = d.terminate();
    assert!(st.success(), "qcow2d exit status {st} after SIGTERM");
    assert_qcow2d_refused(
        &img,
        &s.socket("b.sock"),
        &[],
        "writable qcow2d while qemu-io -r holds the image",
    );
    assert!(
        holder.alive(),
        "qemu-io -r stopped holding the image: {}",
        holder.output()
    );
    let st = holder.close();
    assert!(
        st.is_some_and(|st| st.success()),
        "qemu-io -r exit at end of input: {st:?}"
    );
}
