//! The servers under test as child processes: started, waited for until they serve, watched,
//! sampled for CPU time and always stopped. A [`Server`] kills its process when dropped, and
//! the kernel kills it if the bench itself dies (`PR_SET_PDEATHSIG`), so no run leaves orphans.
//! Used from the main thread only (the death signal is tied to the thread that spawned).

use crate::error::{Context, Error, Result};
use crate::signals;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a server may take to start serving.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// What a server is started on, and how.
#[derive(Clone, Copy)]
pub struct ServerSpec<'a> {
    pub image: &'a Path,
    pub socket: &'a Path,
    /// Queues the export offers.
    pub queues: usize,
    pub read_only: bool,
    /// Guest data bypasses the host page cache.
    pub direct: bool,
    /// Where its output is appended.
    pub log_path: &'a Path,
    /// The CPUs it may run on (default: any).
    pub cpus: Option<CpuSet>,
}

/// A running server process and where its output goes.
pub struct Server {
    pub name: &'static str,
    child: Child,
    pub log_path: PathBuf,
    exited: Option<ExitStatus>,
}

/// The CPUs a server may run on (`compare --cpus N`): the first N of those the bench may run on.
#[derive(Clone, Copy)]
pub struct CpuSet(libc::cpu_set_t);

impl CpuSet {
    /// The first `n` CPUs of this process's affinity mask; an error when it has fewer.
    pub fn first(n: usize) -> Result<CpuSet> {
        // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
        let mut own: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `own` is a valid cpu_set_t of the size passed; pid 0 is this thread.
        let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&own), &mut own) };
        if r != 0 {
            return Err(Error::msg(format!(
                "sched_getaffinity: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: as above.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let mut taken = 0;
        for cpu in 0..libc::CPU_SETSIZE as usize {
            if taken == n {
                break;
            }
            // SAFETY: `cpu` is below CPU_SETSIZE; both sets are valid.
            if unsafe { libc::CPU_ISSET(cpu, &own) } {
                // SAFETY: as above.
                unsafe { libc::CPU_SET(cpu, &mut set) };
                taken += 1;
            }
        }
        if n == 0 || taken < n {
            return Err(Error::msg(format!(
                "Cannot pin servers to {n} CPUs: this process may run on {taken}"
            )));
        }
        Ok(CpuSet(set))
    }

    /// The CPU numbers, for the report.
    pub fn list(&self) -> Vec<usize> {
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `cpu` is below CPU_SETSIZE; the set is valid.
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &self.0) })
            .collect()
    }
}

/// Starts `command` with its output appended to `log_path`, and arranges for the kernel to kill
/// it if the bench dies. With `stdout_piped`, stdout is returned to the caller instead. With
/// `cpus`, the process (and every thread it starts) runs only on those CPUs.
fn spawn(
    mut command: Command,
    log_path: &Path,
    stdout_piped: bool,
    cpus: Option<CpuSet>,
) -> Result<Child> {
    // Appended to: a server restarted on a fresh image keeps its earlier output.
    let log = File::options()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("Opening log file {}", log_path.display()))?;
    let log_for_stdout = log
        .try_clone()
        .with_context(|| format!("Duplicating log file {}", log_path.display()))?;
    command.stdin(Stdio::null()).stderr(Stdio::from(log));
    if stdout_piped {
        command.stdout(Stdio::piped());
    } else {
        command.stdout(Stdio::from(log_for_stdout));
    }
    let parent_pid = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls only prctl, getppid
    // and sched_setaffinity, which are async-signal-safe; it allocates nothing and touches no
    // locks.
    unsafe {
        command.pre_exec(move || {
            if let Some(CpuSet(set)) = &cpus {
                if libc::sched_setaffinity(0, std::mem::size_of_val(set), set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() as u32 != parent_pid {
                return Err(std::io::Error::other("parent exited during spawn"));
            }
            Ok(())
        });
    }
    // Its own process group: Ctrl-C in the terminal reaches only the bench, which then stops
    // the server in order.
    command.process_group(0);
    command
        .spawn()
        .with_context(|| format!("Starting {:?}", command.get_program()))
}

impl Server {
    /// Starts qcow2d and waits for its `qcow2d: serving <IMG> on <SOCK>` line.
    pub fn start_qcow2d(binary: &Path, spec: &ServerSpec<'_>) -> Result<Server> {
        let ServerSpec {
            image,
            socket,
            queues,
            read_only,
            direct,
            log_path,
            cpus,
        } = *spec;
        let mut command = Command::new(binary);
        command
            .arg("serve")
            .arg("--image")
            .arg(image)
            .arg("--socket")
            .arg(socket)
            .arg("--queues")
            .arg(queues.to_string());
        if read_only {
            command.arg("--read-only");
        }
        if direct {
            command.arg("--direct");
        }
        let mut child = spawn(command, log_path, true, cpus)?;
        let stdout = child.stdout.take();
        let mut server = Server {
            name: "qcow2d",
            child,
            log_path: log_path.to_path_buf(),
            exited: None,
        };
        let Some(stdout) = stdout else {
            return Err(Error::msg("qcow2d's stdout was not captured"));
        };
        let mut log = File::options()
            .append(true)
            .open(log_path)
            .with_context(|| format!("Opening log file {}", log_path.display()))?;
        let (ready_tx, ready_rx) = mpsc::channel();
        // Copies stdout to the log for the life of the process, and reports the ready line.
        std::thread::Builder::new()
            .name("qcow2d-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(log, "{line}");
                    if line.starts_with("qcow2d: serving") {
                        let _ = ready_tx.send(());
                    }
                }
            })
            .context("Starting the qcow2d stdout reader")?;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            match ready_rx.recv_timeout(POLL_INTERVAL) {
                Ok(()) => return Ok(server),
                Err(mpsc::RecvTimeoutError::Disconnected)
                | Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if let Err(reason) = server.check_running() {
                return Err(Error::msg(format!("qcow2d did not start: {reason}")));
            }
            if signals::interrupted() {
                return Err(Error::msg("Interrupted"));
            }
            if Instant::now() >= deadline {
                return Err(Error::msg(format!(
                    "qcow2d did not print its ready line within {} s (log: {})",
                    STARTUP_TIMEOUT.as_secs(),
                    log_path.display()
                )));
            }
        }
    }

    /// Starts qemu-storage-daemon exporting `image` (qcow2 over a plain file, io_uring, host
    /// page cache on, or off with `direct`: `cache.direct=on`, QEMU's `cache=none`) and waits
    /// until its socket accepts connections.
    pub fn start_qsd(spec: &ServerSpec<'_>) -> Result<Server> {
        let ServerSpec {
            image,
            socket,
            queues,
            read_only,
            direct,
            log_path,
            cpus,
        } = *spec;
        let mut file_node = std::ffi::OsString::from(format!(
            "driver=file,node-name=file0,aio=io_uring,cache.direct={},filename=",
            if direct { "on" } else { "off" }
        ));
        file_node.push(qsd_escape(image));
        let mut export = std::ffi::OsString::from(format!(
            "type=vhost-user-blk,id=exp0,node-name=fmt0,num-queues={queues},writable={},addr.type=unix,addr.path=",
            if read_only { "off" } else { "on" }
        ));
        export.push(qsd_escape(socket));
        let mut command = Command::new("qemu-storage-daemon");
        command
            .arg("--blockdev")
            .arg(file_node)
            .arg("--blockdev")
            .arg("driver=qcow2,node-name=fmt0,file=file0")
            .arg("--export")
            .arg(export);
        let child = spawn(command, log_path, false, cpus)?;
        let mut server = Server {
            name: "qemu-storage-daemon",
            child,
            log_path: log_path.to_path_buf(),
            exited: None,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Err(reason) = server.check_running() {
                return Err(Error::msg(format!(
                    "qemu-storage-daemon did not start: {reason}"
                )));
            }
            if signals::interrupted() {
                return Err(Error::msg("Interrupted"));
            }
            // A probe connection that is closed at once: the export drops it and listens again.
            if socket.exists() && UnixStream::connect(socket).is_ok() {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                return Err(Error::msg(format!(
                    "qemu-storage-daemon's socket {} did not accept within {} s (log: {})",
                    socket.display(),
                    STARTUP_TIMEOUT.as_secs(),
                    log_path.display()
                )));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Starts `qcow2d serve --config CONFIG` and waits until every socket of `sockets`
    /// accepts connections.
    pub fn start_qcow2d_config(
        binary: &Path,
        config: &Path,
        sockets: &[PathBuf],
        log_path: &Path,
    ) -> Result<Server> {
        let mut command = Command::new(binary);
        command.arg("serve").arg("--config").arg(config);
        let child = spawn(command, log_path, false, None)?;
        let mut server = Server {
            name: "qcow2d",
            child,
            log_path: log_path.to_path_buf(),
            exited: None,
        };
        server.wait_for_sockets(sockets)?;
        Ok(server)
    }

    /// Starts qemu-storage-daemon serving `image` read-only on every socket of `sockets`
    /// (one file node, qcow2 node and vhost-user-blk export of one queue per socket; page
    /// cache on, io_uring) and waits until every socket accepts connections.
    pub fn start_qsd_exports(image: &Path, sockets: &[PathBuf], log_path: &Path) -> Result<Server> {
        let mut command = Command::new("qemu-storage-daemon");
        for (i, socket) in sockets.iter().enumerate() {
            let mut file_node = std::ffi::OsString::from(format!(
                "driver=file,node-name=file{i},aio=io_uring,read-only=on,filename="
            ));
            file_node.push(qsd_escape(image));
            let mut export = std::ffi::OsString::from(format!(
                "type=vhost-user-blk,id=exp{i},node-name=fmt{i},num-queues=1,writable=off,addr.type=unix,addr.path="
            ));
            export.push(qsd_escape(socket));
            command
                .arg("--blockdev")
                .arg(file_node)
                .arg("--blockdev")
                .arg(format!(
                    "driver=qcow2,node-name=fmt{i},file=file{i},read-only=on"
                ))
                .arg("--export")
                .arg(export);
        }
        let child = spawn(command, log_path, false, None)?;
        let mut server = Server {
            name: "qemu-storage-daemon",
            child,
            log_path: log_path.to_path_buf(),
            exited: None,
        };
        server.wait_for_sockets(sockets)?;
        Ok(server)
    }

    /// Waits until every socket of `sockets` accepts a (probe) connection.
    fn wait_for_sockets(&mut self, sockets: &[PathBuf]) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut ready = 0;
        while ready < sockets.len() {
            if let Err(reason) = self.check_running() {
                return Err(Error::msg(format!("{} did not start: {reason}", self.name)));
            }
            if signals::interrupted() {
                return Err(Error::msg("Interrupted"));
            }
            let socket = &sockets[ready];
            if socket.exists() && UnixStream::connect(socket).is_ok() {
                ready += 1;
                continue;
            }
            if Instant::now() >= deadline {
                return Err(Error::msg(format!(
                    "{}'s socket {} did not accept within {} s (log: {})",
                    self.name,
                    socket.display(),
                    STARTUP_TIMEOUT.as_secs(),
                    self.log_path.display()
                )));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Err(reason)` once the process has exited, with its status and the end of its log.
    pub fn check_running(&mut self) -> std::result::Result<(), String> {
        if self.exited.is_none() {
            match self.child.try_wait() {
                Ok(Some(status)) => self.exited = Some(status),
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("cannot query the process: {e}")),
            }
        }
        let status = self.exited.map(describe_status).unwrap_or_default();
        Err(format!(
            "{} exited ({status}); last log lines: {}",
            self.name,
            log_tail(&self.log_path, 3)
        ))
    }

    /// User plus system CPU time the process has used so far, in clock ticks.
    pub fn cpu_ticks(&self) -> Result<u64> {
        let path = format!("/proc/{}/stat", self.pid());
        let stat = std::fs::read_to_string(&path).with_context(|| format!("Reading {path}"))?;
        parse_cpu_ticks(&stat).ok_or_else(|| Error::msg(format!("Unexpected format of {path}")))
    }

    /// SIGTERM, a grace period, then SIGKILL; reaps the process either way.
    pub fn stop(&mut self) {
        if self.exited.is_some() {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.pid()) {
            // SAFETY: kill() has no memory-safety preconditions; `pid` is our own child, not
            // yet reaped (exited is None), so the id cannot have been reused by another process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = Some(status);
                return;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        let _ = self.child.kill();
        if let Ok(status) = self.child.wait() {
            self.exited = Some(status);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The number of clock ticks per second that /proc/PID/stat counts in.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf() only reads a configuration value; it has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// utime + stime from the text of /proc/PID/stat. The command name (field 2) is in
/// parentheses and may itself contain spaces and parentheses, so fields are counted from the
/// last `)`: after it come state (field 3), ..., utime (field 14), stime (field 15).
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// The last `lines` non-empty lines of a log, joined with ` | `.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return "(no log)".into();
    };
    let tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if tail.is_empty() {
        return "(log empty)".into();
    }
    tail[tail.len().saturating_sub(lines)..].join(" | ")
}

/// QEMU's option syntax splits on commas; a literal comma in a value is written twice.
fn qsd_escape(path: &Path) -> std::ffi::OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut escaped = Vec::new();
    for &byte in path.as_os_str().as_bytes() {
        escaped.push(byte);
        if byte == b',' {
            escaped.push(b',');
        }
    }
    std::ffi::OsString::from_vec(escaped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_from_stat() {
        let stat = "1234 (qemu-storage-d) S 1 1234 1234 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        let tricky = "99 (a) b (c) R 1 1 1 0 -1 0 0 0 0 0 7 8 0 0";
        assert_eq!(parse_cpu_ticks(tricky), Some(15));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        assert_eq!(parse_cpu_ticks("1 (x) S 1"), None);
    }

    #[test]
    fn own_cpu_ticks_are_readable() {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_cpu_ticks(&stat).is_some());
        assert!(clock_ticks_per_second() > 0);
    }

    #[test]
    fn cpu_sets_take_the_first_cpus_allowed() {
        let one = CpuSet::first(1).unwrap();
        assert_eq!(one.list().len(), 1);
        assert!(CpuSet::first(libc::CPU_SETSIZE as usize + 1).is_err());
        assert!(CpuSet::first(0).is_err());
    }

    #[test]
    fn commas_are_doubled_for_qemu() {
        assert_eq!(qsd_escape(Path::new("/tmp/a,b.qcow2")), "/tmp/a,,b.qcow2");
        assert_eq!(qsd_escape(Path::new("/plain")), "/plain");
    }
}
