//! The daemon process: finding the binary, starting `qcow2d serve` and waiting for its ready
//! line (and for its other sockets), stopping it (SIGTERM, SIGKILL), its stderr, and running
//! `qcow2d` subcommands.

use crate::*;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The daemon binary: `$QCOW2D_BIN`, else `<target>/debug/qcow2d`. Missing: fail loudly.
pub fn daemon_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("QCOW2D_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "QCOW2D_BIN={} does not exist; unset it or build the daemon",
            p.display()
        );
        return p;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| {
            if t.is_absolute() {
                t
            } else {
                workspace_root().join(t)
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"));
    let p = target.join("debug").join("qcow2d");
    assert!(
        p.is_file(),
        "MISSING DAEMON BINARY: {} does not exist. Run `make test` (it builds the whole \
         workspace first), or `cargo build -p qcow2d`, or set QCOW2D_BIN.",
        p.display()
    );
    p
}

/// A `qcow2d` process; killed (SIGKILL) on drop unless it was stopped.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub image: PathBuf,
    stderr: Arc<Mutex<String>>,
    /// Says (by closing) that the stderr reader has read the pipe to its end.
    stderr_done: mpsc::Receiver<()>,
    stdout_lines: mpsc::Receiver<String>,
    /// What the daemon printed on stdout before its ready line.
    startup_stdout: String,
}

/// The daemon exited (or timed out) instead of becoming ready.
#[derive(Debug)]
pub struct StartFailure {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub reason: String,
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (exit status {:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.reason, self.status, self.stdout, self.stderr
        )
    }
}

/// The line the daemon prints when its socket is ready.
pub fn ready_line(image: &Path, socket: &Path) -> String {
    format!(
        "qcow2d: serving {} on {}",
        image.display(),
        socket.display()
    )
}

impl Daemon {
    /// `qcow2d serve --image IMG --socket SOCK --read-only EXTRA...`, waiting for the ready line.
    pub fn start(image: &Path, socket: &Path) -> Daemon {
        Self::start_with(image, socket, &[]).unwrap_or_else(|f| panic!("qcow2d serve: {f}"))
    }

    pub fn start_with(image: &Path, socket: &Path, extra: &[&str]) -> Result<Daemon, StartFailure> {
        let mut cmd = Command::new(daemon_bin());
        cmd.arg("serve")
            .arg("--image")
            .arg(image)
            .arg("--socket")
            .arg(socket)
            .arg("--read-only")
            .args(extra);
        Self::spawn(cmd, image, socket)
    }

    /// Spawns an arbitrary daemon command line and waits for the ready line for
    /// `image`/`socket`.
    pub fn spawn(mut cmd: Command, image: &Path, socket: &Path) -> Result<Daemon, StartFailure> {
        let desc = describe_cmd(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `{desc}`: {e}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (stderr_done_tx, stderr_done) = mpsc::channel::<()>();
        {
            let stderr = stderr.clone();
            let r = child.stderr.take().unwrap();
            thread::spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    let mut s = stderr.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
                drop(stderr_done_tx);
            });
        }
        let (tx, rx) = mpsc::channel();
        {
            let r = child.stdout.take().unwrap();
            thread::spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let mut d = Daemon {
            child: Some(child),
            socket: socket.to_path_buf(),
            image: image.to_path_buf(),
            stderr,
            stderr_done,
            stdout_lines: rx,
            startup_stdout: String::new(),
        };
        let want = ready_line(image, socket);
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut seen = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match d.stdout_lines.recv_timeout(left) {
                Ok(line) => {
                    if line.trim_end() == want {
                        d.startup_stdout = seen;
                        return Ok(d);
                    }
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(d.fail(
                        seen,
                        format!(
                            "`{desc}` printed no ready line `{want}` within {} s",
                            READY_TIMEOUT.as_secs()
                        ),
                    ))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(d.fail(
                        seen,
                        format!("`{desc}` closed stdout without printing `{want}`"),
                    ))
                }
            }
        }
    }

    fn fail(&mut self, stdout: String, reason: String) -> StartFailure {
        let status = self.wait_exit(EXIT_TIMEOUT);
        if status.is_none() {
            self.kill();
        }
        // The process is gone: its stderr ends once every line is read (a busy machine may
        // take a while to schedule the reader).
        let _ = self.stderr_done.recv_timeout(EXIT_TIMEOUT);
        StartFailure {
            status,
            stdout,
            stderr: self.stderr(),
            reason,
        }
    }

    /// The lines the daemon printed on stdout before its ready line (such as the metrics
    /// endpoint's address).
    pub fn startup_stdout(&self) -> &str {
        &self.startup_stdout
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon still owned").id() as i32
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The daemon's stderr once `what` occurs in it at least `times` times (its reader may lag
    /// behind the daemon, and the daemon behind the test). Fails the test, with the stderr, if
    /// that takes longer than `timeout`.
    pub fn wait_for_stderr(&self, what: &str, times: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let stderr = self.stderr();
            if stderr.matches(what).count() >= times {
                // The rest of the line.
                thread::sleep(Duration::from_millis(50));
                return self.stderr();
            }
            assert!(
                Instant::now() < deadline,
                "{what:?} not {times} time(s) in qcow2d's stderr within {timeout:?}:\n{stderr}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `Some(status)` if the daemon has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and waits for the exit; fails the test if it does not exit in time.
    pub fn terminate(mut self) -> ExitStatus {
        let pid = self.pid();
        // SAFETY: kill(2) on the pid of a child we own and have not reaped; no memory involved.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
        match self.wait_exit(EXIT_TIMEOUT) {
            Some(st) => {
                self.child = None;
                st
            }
            None => panic!(
                "qcow2d did not exit within {} s of SIGTERM; stderr:\n{}",
                EXIT_TIMEOUT.as_secs(),
                self.stderr()
            ),
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Fails the test if the daemon has exited.
    pub fn assert_alive(&mut self, when: &str) {
        if let Some(st) = self.try_exit_status() {
            panic!("qcow2d exited ({st}) {when}; stderr:\n{}", self.stderr());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Writable exports: starting and killing the daemon
// ---------------------------------------------------------------------------------------------

impl Daemon {
    /// `qcow2d serve --image IMG --socket SOCK EXTRA...` without `--read-only` (the export is
    /// writable unless EXTRA says otherwise), waiting for the ready line.
    pub fn start_writable(
        image: &Path,
        socket: &Path,
        extra: &[&str],
    ) -> Result<Daemon, StartFailure> {
        let mut cmd = Command::new(daemon_bin());
        cmd.arg("serve")
            .arg("--image")
            .arg(image)
            .arg("--socket")
            .arg(socket)
            .args(extra);
        Self::spawn(cmd, image, socket)
    }

    /// SIGKILL (no chance to flush or close anything), then reaps the process.
    pub fn sigkill(mut self) -> ExitStatus {
        let mut c = self.child.take().expect("daemon still owned");
        c.kill().expect("kill(SIGKILL) the daemon");
        c.wait().expect("wait for the killed daemon")
    }
}

/// Files process `pid` holds open with O_DIRECT (from /proc/PID/fdinfo).
pub fn o_direct_files(pid: i32) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            info.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| i64::from_str_radix(f.trim(), 8).ok())
                .is_some_and(|f| f & i64::from(libc::O_DIRECT) != 0)
        })
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .collect()
}

/// Runs `qcow2d ARGS` to completion.
pub fn run_daemon_cmd(args: &[&OsStr]) -> CmdOutput {
    run_cmd(Command::new(daemon_bin()).args(args), TOOL_TIMEOUT)
}

/// Waits until `socket` accepts a connection (the daemon binds every export before it prints
/// its ready line for the first one); fails the test after 30 s.
pub fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + READY_TIMEOUT;
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never accepted a connection",
            socket.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
}
