//! End-to-end tests with a real Linux guest: QEMU boots a Debian kernel and a small initramfs
//! whose only disk is served by `qcow2d serve` over vhost-user-blk, runs workloads through the
//! guest's own virtio-blk driver (fio write-then-verify over both queues, ext4 with e2fsck, a
//! sha256 of the whole disk) and powers off. The host then checks the image with
//! `qemu-img check` and compares its content (`qemu-img convert -O raw`) with the sha256 the
//! guest printed.
//!
//! Everything the guest needs is fetched from Debian packages and cached by
//! `tests/guest/build-guest.sh` (run once per test binary; see that script and
//! `tests/guest/guest-init.sh` for the workloads and the lines the guest prints). Nothing is
//! skipped: a missing QEMU, kernel or package, or a guest that does not boot, fails the tests
//! with a message saying what is missing.
//!
//! Environment:
//! - `QCOW2D_CACHE`: cache folder of build-guest.sh (default `<workspace>/.cache/guest`);
//! - `QCOW2D_GUEST_ACCEL`: `tcg`, `kvm` or `auto` (default: KVM if a probe guest prints its
//!   first kernel line within a few seconds, else TCG);
//! - `QCOW2D_BIN`, `QCOW2D_KEEP_TEMP`, `QCOW2D_TEST_TMP` as for the other tests. With
//!   `QCOW2D_KEEP_TEMP` the guest's serial log (`serial.log`) stays in the test's temp dir.
//!
//! Guests run one at a time (a static mutex): each takes both cores of a small machine.

use qcow2d_tests::*;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Virtual size of the test images.
const DISK: u64 = 128 * MIB;
/// Limit for build-guest.sh (a first run downloads about 120 MB of Debian packages and takes
/// about 40 s here).
const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// Limit for a guest that runs fio-verify, fs and sha256 (15 to 25 s under TCG here).
const GUEST_BUDGET: Duration = Duration::from_secs(120);
/// Limit for a guest of the restart tests (20 to 30 s under TCG here).
const RESTART_BUDGET: Duration = Duration::from_secs(120);
/// How long the KVM probe guest gets to print its first kernel line.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// The guest environment: build-guest.sh, once per test binary
// ---------------------------------------------------------------------------------------------

/// What build-guest.sh made, and the accelerator to boot with.
struct GuestEnv {
    qemu: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    qemu_version: String,
    kernel_version: String,
    /// QEMU arguments selecting the accelerator and CPU model.
    accel: Vec<&'static str>,
}

static GUEST_ENV: OnceLock<Result<GuestEnv, String>> = OnceLock::new();
/// One guest at a time.
static GUEST_LOCK: Mutex<()> = Mutex::new(());

/// Takes the guest lock (a test that failed while holding it does not block the others).
fn guest_lock() -> MutexGuard<'static, ()> {
    GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn cache_dir() -> PathBuf {
    std::env::var_os("QCOW2D_CACHE")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                workspace_root().join(p)
            }
        })
        .unwrap_or_else(|| workspace_root().join(".cache").join("guest"))
}

/// Runs build-guest.sh (first call only) and picks the accelerator. Fails the test with the
/// script's output if the guest cannot be built.
fn guest_env() -> &'static GuestEnv {
    let env = GUEST_ENV.get_or_init(|| {
        let env = build_guest()?;
        let accel = choose_accel(&env)?;
        Ok(GuestEnv { accel, ..env })
    });
    match env {
        Ok(env) => env,
        Err(e) => panic!("GUEST ENVIRONMENT UNAVAILABLE: {e}"),
    }
}

fn build_guest() -> Result<GuestEnv, String> {
    let script = workspace_root().join("tests/guest/build-guest.sh");
    if !script.is_file() {
        return Err(format!("{} is missing", script.display()));
    }
    let cache = cache_dir();
    let t = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(&script).env("QCOW2D_CACHE", &cache);
    let out = try_with_timeout("build-guest.sh", BUILD_TIMEOUT + Duration::from_secs(5), {
        move || run_cmd(&mut cmd, BUILD_TIMEOUT)
    })?;
    let log = format!(
        "--- build-guest.sh stdout ---\n{}\n--- stderr ---\n{}",
        out.stdout, out.stderr
    );
    if !out.status.success() {
        return Err(format!(
            "tests/guest/build-guest.sh failed ({}); it fetches QEMU, the kernel and the guest \
             userland from the Debian mirrors with apt-get and needs them reachable (run it by \
             hand to see more).\n{log}",
            out.status
        ));
    }
    eprintln!(
        "guest: build-guest.sh took {:.1} s (cache {})",
        t.elapsed().as_secs_f64(),
        cache.display()
    );
    let env_file = cache.join("guest.env");
    let text = fs::read_to_string(&env_file)
        .map_err(|e| format!("build-guest.sh left no {}: {e}\n{log}", env_file.display()))?;
    let vars: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| -> Result<String, String> {
        vars.get(k)
            .map(|v| v.to_string())
            .ok_or_else(|| format!("{} has no {k}=\n{text}", env_file.display()))
    };
    let env = GuestEnv {
        qemu: get("QEMU")?.into(),
        kernel: get("KERNEL")?.into(),
        initrd: get("INITRD")?.into(),
        qemu_version: get("QEMU_VERSION")?,
        kernel_version: get("KERNEL_VERSION")?,
        accel: Vec::new(),
    };
    for p in [&env.qemu, &env.kernel, &env.initrd] {
        if !p.is_file() {
            return Err(format!(
                "build-guest.sh reported {} but it does not exist\n{log}",
                p.display()
            ));
        }
    }
    Ok(env)
}

const TCG: [&str; 4] = ["-accel", "tcg,thread=multi", "-cpu", "max"];
const KVM: [&str; 4] = ["-accel", "kvm", "-cpu", "host"];

/// `QCOW2D_GUEST_ACCEL` or a probe: KVM only if a KVM guest prints its first kernel line
/// within [`KVM_PROBE_TIMEOUT`] (a nested, software-emulated /dev/kvm is far slower than TCG).
fn choose_accel(env: &GuestEnv) -> Result<Vec<&'static str>, String> {
    let want = std::env::var("QCOW2D_GUEST_ACCEL").unwrap_or_else(|_| "auto".into());
    match want.as_str() {
        "tcg" => return Ok(TCG.to_vec()),
        "kvm" => return Ok(KVM.to_vec()),
        "auto" | "" => {}
        other => return Err(format!("QCOW2D_GUEST_ACCEL={other}: use tcg, kvm or auto")),
    }
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("guest: no usable /dev/kvm: TCG");
        return Ok(TCG.to_vec());
    }
    let t = Instant::now();
    let mut cmd = Command::new(&env.qemu);
    cmd.args(KVM)
        .args([
            "-smp",
            "1",
            "-m",
            "256M",
            "-no-reboot",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&env.kernel)
        .arg("-initrd")
        .arg(&env.initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 no_timer_check qcow2d.test=probe",
        ]);
    let mut q = Qemu::spawn(cmd, None).map_err(|e| format!("KVM probe: {e}"))?;
    let seen = q.wait_for(|l| l.contains("Linux version"), t + KVM_PROBE_TIMEOUT);
    q.kill();
    thread::sleep(Duration::from_millis(50));
    match seen {
        Ok(_) => {
            eprintln!(
                "guest: KVM probe booted in {:.1} s: KVM",
                t.elapsed().as_secs_f64()
            );
            Ok(KVM.to_vec())
        }
        Err(why) => {
            eprintln!(
                "guest: KVM probe printed no kernel line within {} s ({why}; QEMU stderr: {}): \
                 TCG",
                KVM_PROBE_TIMEOUT.as_secs(),
                q.stderr().trim()
            );
            Ok(TCG.to_vec())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// QEMU and its serial console
// ---------------------------------------------------------------------------------------------

/// Removes terminal escape sequences (SeaBIOS clears the screen) and carriage returns.
fn clean_line(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI (ESC [ parameters, then one final byte in @..~); any other escape is
                // two bytes long (ESC c, ...).
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// A running QEMU: serial lines arrive on a channel and are kept in a log (and a file).
struct Qemu {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    log: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Qemu {
    fn spawn(mut cmd: Command, log_file: Option<&Path>) -> Result<Qemu, String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        {
            let mut out = child.stdout.take().unwrap();
            let log = log.clone();
            let mut file = log_file.map(|p| {
                fs::File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()))
            });
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut pending = Vec::new();
                loop {
                    let n = match out.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                        let line = clean_line(&pending[..i]);
                        pending.drain(..=i);
                        if let Some(f) = file.as_mut() {
                            let _ = writeln!(f, "{line}");
                        }
                        {
                            let mut l = log.lock().unwrap();
                            l.push_str(&line);
                            l.push('\n');
                        }
                        let _ = tx.send(line);
                    }
                }
                if !pending.is_empty() {
                    let line = clean_line(&pending);
                    log.lock().unwrap().push_str(&line);
                    let _ = tx.send(line);
                }
            });
        }
        {
            let mut err = child.stderr.take().unwrap();
            let stderr = stderr.clone();
            thread::spawn(move || {
                let mut v = Vec::new();
                let _ = err.read_to_end(&mut v);
                stderr
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&v));
            });
        }
        Ok(Qemu {
            child: Some(child),
            lines: rx,
            log,
            stderr,
        })
    }

    /// Waits for a serial line matching `pred` until `deadline`. Err: QEMU exited or the
    /// deadline passed first (the message says which).
    fn wait_for(
        &mut self,
        pred: impl Fn(&str) -> bool,
        deadline: Instant,
    ) -> Result<String, String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if pred(&line) {
                        return Ok(line);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => return Err("time budget ran out".into()),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("QEMU closed its console (exited)".into())
                }
            }
        }
    }

    /// Waits for QEMU to exit until `deadline`; None if it had to be killed.
    fn wait_exit(&mut self, deadline: Instant) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() >= deadline {
                self.kill();
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `QCOW2D-RESULT name=N status=S [key=value...] detail=TEXT` line.
#[derive(Debug, Clone)]
struct WorkloadResult {
    name: String,
    ok: bool,
    fields: BTreeMap<String, String>,
    line: String,
}

fn parse_result(line: &str) -> Option<WorkloadResult> {
    let rest = &line[line.find("QCOW2D-RESULT ")? + "QCOW2D-RESULT ".len()..];
    let (kv, detail) = match rest.find("detail=") {
        Some(i) => (&rest[..i], &rest[i + "detail=".len()..]),
        None => (rest, ""),
    };
    let mut fields: BTreeMap<String, String> = kv
        .split_whitespace()
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    fields.insert("detail".into(), detail.trim().to_string());
    Some(WorkloadResult {
        name: fields.get("name")?.clone(),
        ok: fields.get("status").map(|s| s == "ok").unwrap_or(false),
        fields,
        line: line.trim().to_string(),
    })
}

/// The `key=value` fields of the guest's `QCOW2D-BOOT` line (kernel, disk_bytes, queues, ro,
/// write_cache, cpus).
fn parse_boot(log: &str) -> Option<BTreeMap<String, String>> {
    let line = log.lines().find(|l| l.contains("QCOW2D-BOOT "))?;
    let rest = &line[line.find("QCOW2D-BOOT ")? + "QCOW2D-BOOT ".len()..];
    Some(
        rest.split_whitespace()
            .filter_map(|t| t.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// What a finished guest left: what it saw at boot and its results in order.
struct GuestOutcome {
    boot: BTreeMap<String, String>,
    results: Vec<WorkloadResult>,
    elapsed: Duration,
}

impl GuestOutcome {
    /// The results named `name`, in order.
    fn named(&self, name: &str) -> Vec<&WorkloadResult> {
        self.results.iter().filter(|r| r.name == name).collect()
    }

    /// The `sha256=` of the `index`th sha256 result.
    fn sha256(&self, index: usize) -> String {
        self.named("sha256")[index].fields["sha256"].clone()
    }
}

/// A guest booting or running, with the daemon's socket as its disk.
struct Guest {
    qemu: Qemu,
    started: Instant,
    deadline: Instant,
    workloads: Vec<String>,
    log_path: PathBuf,
    what: String,
    /// Fields the QCOW2D-BOOT line must have (besides 2 queues and 2 CPUs).
    expect_boot: Vec<(&'static str, String)>,
}

impl Guest {
    /// Boots the guest with `qcow2d.test=WORKLOADS` (comma-separated) plus `extra` kernel
    /// arguments; the whole run must end within `budget`. The guest must see a disk of
    /// [`DISK`] bytes, read-only or not as `read_only` says.
    fn boot(
        scratch: &Scratch,
        socket: &Path,
        read_only: bool,
        workloads: &str,
        extra: &str,
        budget: Duration,
    ) -> Guest {
        let env = guest_env();
        let log_path = scratch.join("serial.log");
        let mut cmd = Command::new(&env.qemu);
        cmd.args(&env.accel)
            .args(["-smp", "2", "-m", "1G"])
            .args(["-object", "memory-backend-memfd,id=mem,size=1G,share=on"])
            .args(["-numa", "node,memdev=mem"])
            .arg("-kernel")
            .arg(&env.kernel)
            .arg("-initrd")
            .arg(&env.initrd)
            .arg("-append")
            // no_timer_check: under TCG on a busy host the kernel's check that the timer
            // interrupt reaches the IO-APIC can miss its window and panic at boot.
            .arg(format!(
                "console=ttyS0 quiet panic=-1 no_timer_check qcow2d.test={workloads} {extra}"
            ))
            .arg("-chardev")
            // QEMU 10 spells the old `reconnect=1` as reconnect-ms.
            .arg(format!(
                "socket,id=c0,path={},reconnect-ms=1000",
                socket.display()
            ))
            .args(["-device", "vhost-user-blk-pci,chardev=c0,num-queues=2"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-serial", "stdio", "-no-reboot"]);
        let what = format!(
            "guest (QEMU {}, kernel {}, {}) running {workloads}",
            env.qemu_version,
            env.kernel_version,
            env.accel.join(" ")
        );
        let qemu = Qemu::spawn(cmd, Some(&log_path)).unwrap_or_else(|e| panic!("{what}: {e}"));
        let started = Instant::now();
        Guest {
            qemu,
            started,
            deadline: started + budget,
            workloads: workloads.split(',').map(String::from).collect(),
            log_path,
            what,
            expect_boot: vec![
                ("ro", if read_only { "1" } else { "0" }.to_string()),
                ("disk_bytes", DISK.to_string()),
            ],
        }
    }

    /// The last lines of the console and QEMU's stderr, for failure messages.
    fn context(&self) -> String {
        let log = self.qemu.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        format!(
            "--- guest console (last 60 lines; all in {}) ---\n{tail}\n--- QEMU stderr ---\n{}",
            self.log_path.display(),
            self.qemu.stderr()
        )
    }

    /// Waits for a console line containing `marker` (the guest's own lines: QCOW2D-...).
    /// `daemon_stderr` goes into failure messages.
    fn wait_marker(&mut self, marker: &str, daemon_stderr: &dyn Fn() -> String) -> String {
        match self.qemu.wait_for(|l| l.contains(marker), self.deadline) {
            Ok(l) => l,
            Err(why) => {
                self.qemu.kill();
                panic!(
                    "{}: waited {:.0} s for `{marker}`: {why}\n{}\n--- qcow2d stderr ---\n{}",
                    self.what,
                    self.started.elapsed().as_secs_f64(),
                    self.context(),
                    daemon_stderr()
                )
            }
        }
    }

    /// Waits for the guest to power off (killing it when its budget runs out) and checks that
    /// every workload reported `status=ok`. `daemon_stderr` goes into failure messages.
    fn finish(mut self, daemon_stderr: &dyn Fn() -> String) -> GuestOutcome {
        let done = self
            .qemu
            .wait_for(|l| l.contains("QCOW2D-DONE"), self.deadline);
        let status = self.qemu.wait_exit(if done.is_ok() {
            Instant::now() + Duration::from_secs(20)
        } else {
            Instant::now()
        });
        let elapsed = self.started.elapsed();
        // Let the reader thread deliver the last lines.
        thread::sleep(Duration::from_millis(50));
        let log = self.qemu.log();
        let results: Vec<WorkloadResult> = log.lines().filter_map(parse_result).collect();
        let fail = |msg: String| -> ! {
            panic!(
                "{}: {msg}\n{}\n--- qcow2d stderr ---\n{}",
                self.what,
                self.context(),
                daemon_stderr()
            )
        };
        if let Err(why) = done {
            let last = results
                .last()
                .map(|r| r.line.clone())
                .unwrap_or_else(|| "none".into());
            let how = match status {
                None => format!(
                    "it was still running when its budget of {:.0} s ran out, and was killed",
                    (self.deadline - self.started).as_secs_f64()
                ),
                Some(st) => format!("QEMU exited ({st}): {why}"),
            };
            let booted = if log.contains("QCOW2D-BOOT") {
                "it booted and saw the disk"
            } else if log.trim().is_empty() {
                "QEMU printed nothing: it never started the guest (QEMU waits for the \
                 vhost-user handshake with the daemon before it starts the guest)"
            } else {
                "it never printed QCOW2D-BOOT (no boot, or no disk)"
            };
            fail(format!(
                "the guest did not finish (no QCOW2D-DONE after {:.0} s): {how}; {booted}; last \
                 result line: {last}",
                elapsed.as_secs_f64(),
            ));
        }
        match status {
            Some(st) if st.success() => {}
            Some(st) => fail(format!("QEMU exited with {st} after the guest powered off")),
            None => fail("QEMU did not exit within 20 s of the guest's poweroff".into()),
        }
        let failed: Vec<&str> = results
            .iter()
            .filter(|r| !r.ok)
            .map(|r| r.line.as_str())
            .collect();
        if !failed.is_empty() {
            fail(format!("workloads failed:\n{}", failed.join("\n")));
        }
        for w in &self.workloads {
            if !results.iter().any(|r| &r.name == w) {
                fail(format!("no result line for workload {w}"));
            }
        }
        let boot = parse_boot(&log).unwrap_or_else(|| fail("no QCOW2D-BOOT line".into()));
        let want = [("queues", "2".to_string()), ("cpus", "2".to_string())];
        for (k, v) in want.iter().chain(self.expect_boot.iter()) {
            if boot.get(*k) != Some(v) {
                fail(format!(
                    "the guest saw {k}={:?} at boot, expected {v}",
                    boot.get(*k)
                ));
            }
        }
        let outcome = GuestOutcome {
            boot,
            results,
            elapsed,
        };
        eprintln!(
            "guest: {} finished in {:.1} s (write cache {}): {}",
            self.workloads.join(","),
            outcome.elapsed.as_secs_f64(),
            outcome.boot["write_cache"],
            outcome
                .results
                .iter()
                .map(|r| format!(
                    "{} {} s",
                    r.name,
                    r.fields.get("secs").map(String::as_str).unwrap_or("?")
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        outcome
    }
}

// ---------------------------------------------------------------------------------------------
// Host side: the daemon, the images, the checks
// ---------------------------------------------------------------------------------------------

/// `qcow2d serve --image IMG --socket SOCK [--read-only]`, ready.
fn serve(img: &Path, socket: &Path, read_only: bool) -> Daemon {
    serve_with(img, socket, if read_only { &["--read-only"] } else { &[] })
}

/// `qcow2d serve --image IMG --socket SOCK EXTRA...`, ready.
fn serve_with(img: &Path, socket: &Path, extra: &[&str]) -> Daemon {
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("serve")
        .arg("--image")
        .arg(img)
        .arg("--socket")
        .arg(socket)
        .args(extra);
    Daemon::spawn(cmd, img, socket).unwrap_or_else(|f| panic!("qcow2d serve: {f}"))
}

/// Starts the daemon again after a stop. After a SIGKILL the image's lock can outlive the
/// process for a moment (the kernel tears a dead process's io_uring down asynchronously, and the
/// open file, which holds the lock, with it), so a start that fails on the lock is retried for
/// up to 5 s, saying so.
fn serve_again(img: &Path, socket: &Path, extra: &[&str]) -> Daemon {
    let t = Instant::now();
    let mut tries = 0;
    loop {
        let mut cmd = Command::new(daemon_bin());
        cmd.arg("serve")
            .arg("--image")
            .arg(img)
            .arg("--socket")
            .arg(socket)
            .args(extra);
        tries += 1;
        match Daemon::spawn(cmd, img, socket) {
            Ok(d) => {
                if tries > 1 {
                    eprintln!(
                        "guest: the restarted daemon could lock the image only after {:.2} s \
                         ({tries} tries)",
                        t.elapsed().as_secs_f64()
                    );
                }
                return d;
            }
            Err(f) if f.stderr.contains("lock") && t.elapsed() < Duration::from_secs(5) => {
                thread::sleep(Duration::from_millis(100));
            }
            Err(f) => panic!("qcow2d serve (restart, try {tries}): {f}"),
        }
    }
}

/// SIGTERM; the daemon must exit 0 in time.
fn stop(daemon: Daemon, when: &str) {
    let stderr = daemon.stderr();
    let st = daemon.terminate();
    assert!(
        st.success(),
        "qcow2d exited with {st} after SIGTERM {when}; stderr:\n{stderr}"
    );
}

/// SIGKILL, and wait for the process to go.
fn kill9(mut daemon: Daemon) {
    // SAFETY: kill(2) on the pid of a child we own and have not reaped; no memory involved.
    let rc = unsafe { libc::kill(daemon.pid(), libc::SIGKILL) };
    assert_eq!(rc, 0, "kill(SIGKILL) failed");
    assert!(
        daemon.wait_exit(EXIT_TIMEOUT).is_some(),
        "qcow2d did not die of SIGKILL within {} s",
        EXIT_TIMEOUT.as_secs()
    );
}

/// `qemu-img check`: no corruption and no check error; leaks only when `allow_leaks` (after a
/// SIGKILL, clusters allocated but not yet referenced are leaks, which the format allows).
fn check_image(img: &Path, allow_leaks: bool) -> String {
    let out = run_cmd(
        qemu_img_cmd()
            .current_dir(image_dir(img))
            .arg("check")
            .arg(img),
        TOOL_TIMEOUT,
    );
    let code = out.status.code();
    let ok = code == Some(0) || (allow_leaks && code == Some(3));
    assert!(
        ok,
        "qemu-img check {} exited {:?} (2: corruption, 3: leaks, 1: check failed):\n{}{}\n{}",
        img.display(),
        code,
        out.stdout,
        out.stderr,
        qemu_img_info_text(img)
    );
    out.stdout
}

/// The lines of `qemu-img check` output that say what it found.
fn check_summary(check: &str) -> String {
    check
        .lines()
        .filter(|l| l.contains("found") || l.contains("leaked") || l.contains("Leaked"))
        .take(3)
        .collect::<Vec<_>>()
        .join("; ")
}

/// sha256 of `qemu-img convert -O raw IMG`.
fn image_sha256(img: &Path, scratch: &Scratch) -> String {
    let raw = scratch.join("content.raw");
    let _ = fs::remove_file(&raw);
    qemu_img_in(
        image_dir(img),
        &[
            OsStr::new("convert"),
            OsStr::new("-O"),
            OsStr::new("raw"),
            img.as_os_str(),
            raw.as_os_str(),
        ],
    );
    let sum = file_sha256(&raw);
    let _ = fs::remove_file(&raw);
    sum
}

/// sha256 of a file's bytes.
fn file_sha256(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(path));
    out.split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("sha256sum {} printed nothing", path.display()))
        .to_string()
}

/// A 128 MiB raw file: mixed data (zeros, random, text, counters) in its first 96 MiB.
fn data_raw(path: &Path, seed: u64) {
    let mut data = mixed_bytes(seed, (96 * MIB) as usize);
    data.resize(DISK as usize, 0);
    write_file(path, &data);
}

/// The zlib-compressed image: `qemu-img convert -c` of [`data_raw`].
fn compressed_image(scratch: &Scratch, name: &str) -> PathBuf {
    let raw = scratch.join("data.raw");
    data_raw(&raw, 0x9e57);
    let img = scratch.join(name);
    convert_raw_to_qcow2(&raw, &img, "compression_type=zlib", true);
    let _ = fs::remove_file(&raw);
    let info = qemu_img_info_text(&img);
    assert!(
        info.contains("compression type: zlib"),
        "test setup: {} is not zlib-compressed:\n{info}",
        img.display()
    );
    img
}

/// The common flow: serve `img` (writable), boot the guest with `workloads` (ending in
/// sha256), power off, stop the daemon, `qemu-img check` clean, the image content equals the
/// guest's last sha256. Returns the outcome for more checks.
fn run_writable_case(scratch: &Scratch, img: &Path, workloads: &str) -> GuestOutcome {
    let socket = scratch.socket("vhost.sock");
    let _lock = guest_lock();
    guest_env();
    let t = Instant::now();
    let daemon = serve(img, &socket, false);
    let guest = Guest::boot(scratch, &socket, false, workloads, "", GUEST_BUDGET);
    let outcome = guest.finish(&|| daemon.stderr());
    stop(daemon, "after the guest powered off");
    let check = check_image(img, false);
    let n = outcome.named("sha256").len();
    assert!(n > 0, "no sha256 result");
    let guest_sum = outcome.sha256(n - 1);
    let host_sum = image_sha256(img, scratch);
    assert_eq!(
        guest_sum,
        host_sum,
        "the guest read sha256 {guest_sum} from its disk, but the image ({}) holds {host_sum} \
         after the daemon stopped; qemu-img check:\n{check}",
        img.display()
    );
    eprintln!(
        "guest case {}: {:.1} s in all",
        img.file_name().unwrap().to_string_lossy(),
        t.elapsed().as_secs_f64()
    );
    outcome
}

// ---------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------

/// A fresh, empty image: fio write-then-verify over both queues, ext4 + e2fsck, sha256.
#[test]
fn guest_fresh_image() {
    require_qemu_tools();
    let scratch = Scratch::new("guest-fresh");
    let img = scratch.join("fresh.qcow2");
    create_qcow2(&img, DISK, "");
    let outcome = run_writable_case(&scratch, &img, "fio-verify,fs,sha256");
    assert_eq!(outcome.named("fio-verify")[0].fields["written_mib"], "64");
}

/// A zlib-compressed image: the guest first reads it whole (sha256 = qemu-img's), then writes
/// over compressed clusters (copy-on-write of compressed data), makes a file system, reads it
/// whole again.
#[test]
fn guest_compressed_image() {
    require_qemu_tools();
    let scratch = Scratch::new("guest-compressed");
    let img = compressed_image(&scratch, "compressed.qcow2");
    let before = image_sha256(&img, &scratch);
    let outcome = run_writable_case(&scratch, &img, "sha256,fio-verify,fs,sha256");
    assert_eq!(
        outcome.sha256(0),
        before,
        "the guest's first read of the compressed image differs from qemu-img's"
    );
}

/// An overlay (qcow2 with a backing file) over a compressed base: reads fall through to the
/// base, writes allocate in the overlay, the base is never written.
#[test]
fn guest_overlay_over_compressed_base() {
    require_qemu_tools();
    let scratch = Scratch::new("guest-overlay");
    let base = compressed_image(&scratch, "base.qcow2");
    let base_bytes = file_sha256(&base);
    let base_content = image_sha256(&base, &scratch);
    let overlay = scratch.join("overlay.qcow2");
    qemu_img_in(
        scratch.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "overlay.qcow2",
        ],
    );
    let outcome = run_writable_case(&scratch, &overlay, "sha256,fio-verify,fs,sha256");
    assert_eq!(
        outcome.sha256(0),
        base_content,
        "the guest's first read of the fresh overlay differs from the base's content"
    );
    assert_eq!(
        file_sha256(&base),
        base_bytes,
        "the backing file {} was modified",
        base.display()
    );
    check_image(&base, false);
}

/// A read-only export of a compressed image: the disk is read-only in the guest, a write
/// fails, the whole disk reads as qemu-img reads it, the file is untouched.
#[test]
fn guest_read_only_export() {
    require_qemu_tools();
    let scratch = Scratch::new("guest-ro");
    let img = compressed_image(&scratch, "ro.qcow2");
    let bytes = file_sha256(&img);
    let content = image_sha256(&img, &scratch);
    let socket = scratch.socket("vhost.sock");
    let _lock = guest_lock();
    guest_env();
    let t = Instant::now();
    let daemon = serve(&img, &socket, true);
    let guest = Guest::boot(
        &scratch,
        &socket,
        true,
        "read-only,sha256",
        "",
        GUEST_BUDGET,
    );
    let outcome = guest.finish(&|| daemon.stderr());
    stop(daemon, "after the guest powered off");
    assert_eq!(
        outcome.sha256(0),
        content,
        "guest read differs from qemu-img's"
    );
    assert_eq!(
        file_sha256(&img),
        bytes,
        "the read-only image file was modified"
    );
    eprintln!(
        "guest case read-only: {:.1} s in all",
        t.elapsed().as_secs_f64()
    );
}

/// How the daemon is stopped in a restart test.
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// SIGTERM: the daemon finishes what it has and exits 0.
    Graceful,
    /// SIGKILL: requests in flight are lost unless the daemon resumes them (INFLIGHT_SHMFD).
    Kill,
}

impl Stop {
    fn signal(self) -> &'static str {
        match self {
            Stop::Graceful => "SIGTERM",
            Stop::Kill => "SIGKILL",
        }
    }
    fn done(self) -> &'static str {
        match self {
            Stop::Graceful => "stopped",
            Stop::Kill => "killed",
        }
    }
}

/// How a restart test drives the daemon.
#[derive(Clone, Copy)]
struct Restart {
    how: Stop,
    /// `--writethrough`: every write is durable before it completes.
    writethrough: bool,
    /// Restart while the guest is idle between its write and verify runs (nothing in flight)
    /// instead of once during each run.
    idle: bool,
}

/// While the guest runs fio (a rate-limited write run, then a verify-only run), the daemon is
/// stopped and started again on the same socket, once during each run (or once between the
/// runs, with `idle`); QEMU reconnects (reconnect-ms). The guest must see no I/O error and fio
/// must verify everything; afterwards `qemu-img check` must find no corruption (leaks are
/// allowed after a SIGKILL) and the image must hold what the guest read last.
fn restart_case(r: Restart) {
    require_qemu_tools();
    let label = format!(
        "{}{}{}",
        r.how.signal(),
        if r.writethrough {
            ", write-through"
        } else {
            ""
        },
        if r.idle {
            ", while idle"
        } else {
            ", under load"
        }
    );
    let scratch = Scratch::new(&format!(
        "guest-{}{}{}",
        r.how.done(),
        if r.writethrough { "-wt" } else { "" },
        if r.idle { "-idle" } else { "" }
    ));
    let img = scratch.join("restart.qcow2");
    create_qcow2(&img, DISK, "");
    let socket = scratch.socket("vhost.sock");
    let extra: &[&str] = if r.writethrough {
        &["--writethrough"]
    } else {
        &[]
    };
    // Under load: 2 jobs x 32 MiB of 4k writes at 1000 IOPS each, so that the write run lasts
    // about 8 s; the verify run takes about 2 s. Idle: full speed, then a 6 s pause.
    let (args, stops): (&str, &[(&str, u64)]) = if r.idle {
        ("qcow2d.fio_mb=32 qcow2d.pause=6", &[("pause", 2000)])
    } else {
        (
            "qcow2d.fio_mb=32 qcow2d.fio_rate=1000",
            &[("write", 2000), ("verify", 300)],
        )
    };
    let _lock = guest_lock();
    guest_env();
    let t = Instant::now();
    let mut daemon = serve_with(&img, &socket, extra);
    let mut old_stderr = String::new();
    let mut guest = Guest::boot(
        &scratch,
        &socket,
        false,
        "restart-verify,sha256",
        args,
        RESTART_BUDGET,
    );
    for &(phase, delay) in stops {
        guest.wait_marker(
            &format!("QCOW2D-PHASE name=restart-verify phase={phase}"),
            &|| format!("{old_stderr}--- current daemon ---\n{}", daemon.stderr()),
        );
        thread::sleep(Duration::from_millis(delay));
        daemon.assert_alive(&format!("before the restart during the {phase} phase"));
        old_stderr.push_str(&format!(
            "--- daemon {} during the {phase} phase ---\n{}",
            r.how.done(),
            daemon.stderr()
        ));
        match r.how {
            Stop::Graceful => stop(daemon, &format!("during the guest's {phase} phase")),
            Stop::Kill => kill9(daemon),
        }
        eprintln!(
            "guest: daemon {} during the {phase} phase at {:.1} s",
            r.how.done(),
            t.elapsed().as_secs_f64()
        );
        daemon = serve_again(&img, &socket, extra);
    }
    let outcome =
        guest.finish(&|| format!("{old_stderr}--- current daemon ---\n{}", daemon.stderr()));
    // What the restarted daemons found in flight (INFLIGHT_SHMFD), for the record.
    let all_stderr = format!("{old_stderr}{}", daemon.stderr());
    for line in all_stderr.lines().filter(|l| l.contains("left in flight")) {
        eprintln!("guest: daemon: {}", line.trim());
    }
    stop(daemon, "after the guest powered off");
    let check = check_image(&img, r.how == Stop::Kill);
    let guest_sum = outcome.sha256(0);
    let host_sum = image_sha256(&img, &scratch);
    assert_eq!(
        guest_sum, host_sum,
        "restart ({label}): the guest's sha256 differs from the image's after the daemon \
         stopped; qemu-img check:\n{check}"
    );
    eprintln!(
        "guest case restart ({label}): {:.1} s in all; qemu-img check: {}",
        t.elapsed().as_secs_f64(),
        check_summary(&check)
    );
}

/// Graceful restart (SIGTERM, start again) while the guest is idle between its write and verify
/// runs: the daemon flushes and exits 0, the new one serves everything the guest wrote (QEMU
/// reconnects).
#[test]
fn guest_graceful_restart_idle() {
    restart_case(Restart {
        how: Stop::Graceful,
        writethrough: false,
        idle: true,
    });
}

/// Graceful restart (SIGTERM, start again) under load, once during the write run and once
/// during the verify run. On SIGTERM the daemon stops taking requests, returns every request in
/// flight to the used ring, and only then disconnects: QEMU, which cannot get the rings' state
/// from a closed socket, rewinds each ring to its used index, which is then exactly where the
/// new daemon must resume.
#[test]
fn guest_graceful_restart_under_load() {
    restart_case(Restart {
        how: Stop::Graceful,
        writethrough: false,
        idle: false,
    });
}

/// SIGKILL and start again under load, default (write-back) export: the restarted daemon
/// resumes the guest's in-flight requests from the area QEMU kept
/// (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD); without it, QEMU cannot get the rings' state back
/// from the dead daemon and rewinds each ring to its used index, so when requests completed
/// out of order some are redone twice and others never. fio does not flush, so this also
/// needs the engine's promise that a killed process loses no completed write: the metadata a
/// write changed is in the file before the write completes.
#[test]
fn guest_sigkill_restart_under_load() {
    restart_case(Restart {
        how: Stop::Kill,
        writethrough: false,
        idle: false,
    });
}

/// The same with a write-through export, where a completed write is durable: only the
/// requests in flight at the SIGKILL are at stake, and the restarted daemon resubmits them from
/// the in-flight area QEMU kept (INFLIGHT_SHMFD). Without that, passing would depend on QEMU's
/// rewind of the rings to their used index happening to redo exactly the lost requests.
#[test]
fn guest_sigkill_restart_under_load_writethrough() {
    restart_case(Restart {
        how: Stop::Kill,
        writethrough: true,
        idle: false,
    });
}

/// SIGKILL while nothing is in flight, default (write-back) export: every write the guest saw
/// complete is in the file, flushed or not, so the new daemon serves exactly what the guest
/// wrote.
#[test]
fn guest_sigkill_idle() {
    restart_case(Restart {
        how: Stop::Kill,
        writethrough: false,
        idle: true,
    });
}

/// The same with a write-through export.
#[test]
fn guest_sigkill_idle_writethrough() {
    restart_case(Restart {
        how: Stop::Kill,
        writethrough: true,
        idle: true,
    });
}

/// Online resize seen by a running guest: the guest waits for its disk to grow, the host runs
/// `qcow2d ctl resize` (128 MiB to 1 GiB, past what the L1 table covered), the guest's
/// `/sys/block/vda/size` changes (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, QEMU re-reads the
/// config space), and it writes and reads back 1 MiB in the new area. Afterwards qemu-img sees
/// the new size, the image checks clean and holds what the guest wrote.
#[test]
fn guest_online_resize() {
    require_qemu_tools();
    let scratch = Scratch::new("guest-resize");
    let img = scratch.join("grow.qcow2");
    create_qcow2(&img, DISK, "");
    let socket = scratch.socket("vhost.sock");
    let control = scratch.socket("ctl.sock");
    let _lock = guest_lock();
    guest_env();
    let daemon = serve_with(
        &img,
        &socket,
        &["--control", &control.display().to_string()],
    );
    let mut guest = Guest::boot(&scratch, &socket, false, "resize", "", GUEST_BUDGET);
    guest.wait_marker("QCOW2D-PHASE name=resize phase=wait", &|| daemon.stderr());
    let new_size = 1024 * MIB;
    let out = run_cmd(
        Command::new(daemon_bin())
            .arg("ctl")
            .arg("--control")
            .arg(&control)
            .arg("resize")
            .arg(&socket)
            .arg(new_size.to_string()),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "qcow2d ctl resize failed: {}{}\n--- qcow2d stderr ---\n{}",
        out.stdout,
        out.stderr,
        daemon.stderr()
    );
    let outcome = guest.finish(&|| daemon.stderr());
    let r = &outcome.named("resize")[0];
    assert_eq!(r.fields["sectors"], (new_size / 512).to_string());
    stop(daemon, "after the guest powered off");
    check_image(&img, false);
    let info = qemu_img_info_text(&img);
    assert!(
        info.contains(&format!("({new_size} bytes)")),
        "qemu-img info does not show the new size:\n{info}"
    );
    let raw = scratch.join("content.raw");
    qemu_img_in(
        image_dir(&img),
        &[
            OsStr::new("convert"),
            OsStr::new("-O"),
            OsStr::new("raw"),
            img.as_os_str(),
            raw.as_os_str(),
        ],
    );
    let part = scratch.join("part.raw");
    write_file(&part, &read_bytes(&raw, DISK, MIB as usize));
    assert_eq!(
        file_sha256(&part),
        r.fields["sha256"],
        "the 1 MiB the guest wrote at the old end is not in the image"
    );
}
