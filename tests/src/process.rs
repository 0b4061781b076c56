//! Running things: the time limits every test uses, running a closure or a command under a
//! limit, and capturing a command's output. Called from the test's own thread.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// Limit for one run of qemu-img / qemu-io.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// Limit for reading a whole (small) image through the engine or the socket.
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Limit for the daemon to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Limit for the daemon to exit after SIGTERM, or after failing to start.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Limit for opening a (possibly malicious) image.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Running things with a timeout
// ---------------------------------------------------------------------------------------------

/// Runs `f` on its own thread and waits at most `timeout` for it. A panic inside `f` is turned
/// into a test failure that says so; a timeout fails the test (the thread is left behind: the
/// test process ends soon after).
pub fn with_timeout<T, F>(what: &str, timeout: Duration, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match try_with_timeout(what, timeout, f) {
        Ok(v) => v,
        Err(msg) => panic!("{msg}"),
    }
}

/// Like [`with_timeout`], but returns the panic or timeout as `Err(message)`.
pub fn try_with_timeout<T, F>(what: &str, timeout: Duration, f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let handle = thread::Builder::new()
        .name(format!("timed: {what}"))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawn a thread");
    match rx.recv_timeout(timeout) {
        Ok(v) => {
            let _ = handle.join();
            Ok(v)
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let payload = handle.join().err();
            let msg = payload
                .as_ref()
                .and_then(|p| {
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                })
                .unwrap_or_else(|| "(no message)".into());
            Err(format!("{what}: PANICKED: {msg}"))
        }
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "{what}: HUNG: no result after {} s",
            timeout.as_secs()
        )),
    }
}

/// What a finished external command left behind.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

pub(crate) fn describe_cmd(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push_str(&format!("'{a}'"));
        } else {
            s.push_str(&a);
        }
    }
    if let Some(dir) = cmd.get_current_dir() {
        s.push_str(&format!("   (cwd {})", dir.display()));
    }
    s
}

pub(crate) fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}

/// Runs `cmd` to completion, killing it after `timeout`. Fails the test if it cannot be
/// started or times out; a non-zero exit is returned, not a failure.
pub fn run_cmd(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let desc = describe_cmd(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{desc}`: {e}"));
    let out = spawn_reader(child.stdout.take().unwrap());
    let err = spawn_reader(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`{desc}` did not finish within {} s; stderr so far: {}",
                timeout.as_secs(),
                err.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(5));
    };
    CmdOutput {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Runs `cmd` and fails the test unless it exits 0. Returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let desc = describe_cmd(cmd);
    let out = run_cmd(cmd, TOOL_TIMEOUT);
    assert!(
        out.status.success(),
        "`{desc}` failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout
}
