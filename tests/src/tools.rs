//! The external tools in one place: finding `qemu-img`, `qemu-io` and
//! `qemu-storage-daemon` (a missing tool fails the test, naming the tool and its package), and
//! every wrapper around them: making images, writing patterns, the oracle (`qemu-img convert -O
//! raw`), `qemu-img check` / `compare` (against a model too), `qemu-img` under memory and time
//! bounds, and a `qemu-io` process that holds an image open.

use crate::*;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Fails the test (never skips it) when a tool the tests need is missing.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    find_in_path(tool).unwrap_or_else(|| {
        panic!(
            "MISSING TOOL: `{tool}` is not in PATH; these tests need it. Install the Debian \
             package `{package}` (.ci/run does)."
        )
    })
}

/// qemu-img and qemu-io (package qemu-utils).
pub fn require_qemu_tools() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-io", "qemu-utils");
}

/// A `qemu-img` command, the one place that names the binary: checks the tool is there first.
pub fn qemu_img_cmd() -> Command {
    require_tool("qemu-img", "qemu-utils");
    Command::new("qemu-img")
}

/// A `qemu-io` command, the one place that names the binary: checks the tool is there first.
pub fn qemu_io_cmd() -> Command {
    require_tool("qemu-io", "qemu-utils");
    Command::new("qemu-io")
}

/// A `qemu-storage-daemon` command, the one place that names the binary: checks the tool is
/// there first.
pub fn qemu_storage_daemon_cmd() -> Command {
    require_tool("qemu-storage-daemon", "qemu-utils");
    Command::new("qemu-storage-daemon")
}

/// A `qemu-img` command with bounded memory and time (under `prlimit --as=2G` and `timeout
/// 60`): on some damaged images QEMU's repair sizes its in-memory refcount table by a
/// reference terabytes past the end of the file. A run that hits a bound fails, which the
/// caller sees in the exit status.
pub fn qemu_img_bounded_cmd() -> Command {
    require_tool("qemu-img", "qemu-utils");
    require_tool("prlimit", "util-linux");
    require_tool("timeout", "coreutils");
    let mut cmd = Command::new("prlimit");
    cmd.args(["--as=2147483648", "timeout", "60", "qemu-img"]);
    cmd
}

/// `qemu-img ARGS`, must succeed; returns stdout.
pub fn qemu_img<S: AsRef<OsStr>>(args: &[S]) -> String {
    require_qemu_tools();
    run_ok(qemu_img_cmd().args(args))
}

/// `qemu-img ARGS` run in directory `cwd`, must succeed.
pub fn qemu_img_in<S: AsRef<OsStr>>(cwd: &Path, args: &[S]) -> String {
    require_qemu_tools();
    run_ok(qemu_img_cmd().current_dir(cwd).args(args))
}

/// `qemu-img create -f qcow2 -u -b BACKING -F FMT IMG 16M` in `dir` (the backing file is not
/// opened, so it may be anything).
pub fn overlay_in(dir: &Path, img: &str, backing: &str, fmt: &str) {
    qemu_img_in(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, img, "16M",
        ],
    );
}

/// A 16 MiB image `dir/top.qcow2` whose guest data lies raw in the external data file
/// `data_file` (as the image names it: relative to `dir`, or absolute). Returns its path.
pub fn data_file_image_in(dir: &Path, data_file: &str) -> PathBuf {
    qemu_img_in(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={data_file},data_file_raw=on"),
            "top.qcow2",
            "16M",
        ],
    );
    dir.join("top.qcow2")
}

/// `qemu-io -f FMT -c CMD... IMG`, must succeed. qemu-io reports some failures only on stdout
/// and still exits 0, so its output is checked as well.
pub fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    require_qemu_tools();
    let mut c = qemu_io_cmd();
    c.current_dir(image_dir(img));
    c.arg("-f").arg(fmt);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(img);
    let desc = describe_cmd(&c);
    let out = run_cmd(&mut c, TOOL_TIMEOUT);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "`{desc}` failed ({}):\n{text}",
        out.status
    );
}

/// The directory of an image. QEMU resolves a relative external data file name against the
/// current directory (backing file names against the image's directory), so the tests run
/// qemu tools there, which makes both resolve the same way.
pub fn image_dir(img: &Path) -> &Path {
    img.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `qemu-img info` of an image, for failure messages (never fails).
pub fn qemu_img_info_text(img: &Path) -> String {
    let out = run_cmd(
        qemu_img_cmd()
            .current_dir(image_dir(img))
            .arg("info")
            .arg("-U")
            .arg(img),
        TOOL_TIMEOUT,
    );
    format!("{}{}", out.stdout, out.stderr)
}

/// `qemu-img create -f qcow2 [-o OPTS] IMG SIZE`, run in the image's directory (so a relative
/// data file name in OPTS resolves there, as the engine resolves it). SIZE is in bytes or in
/// qemu-img's notation (`64M`). Returns the image's path.
pub fn create_qcow2(img: &Path, size: impl std::fmt::Display, opts: &str) -> PathBuf {
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if !opts.is_empty() {
        args.push("-o".into());
        args.push(opts.into());
    }
    args.push(img.display().to_string());
    args.push(size.to_string());
    qemu_img_in(image_dir(img), &args);
    img.to_path_buf()
}

/// [`create_qcow2`] of `dir/name`, for tests that make their images in a temp dir of their own.
pub fn create_qcow2_in(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    create_qcow2(&dir.join(name), size, opts)
}

/// `qemu-img convert -f raw -O qcow2 [-c] -o OPTS RAW IMG`. Returns the image's path.
pub fn convert_raw_to_qcow2(raw: &Path, img: &Path, opts: &str, compress: bool) -> PathBuf {
    let mut args: Vec<String> = vec!["convert".into(), "-f".into(), "raw".into()];
    args.extend(["-O".into(), "qcow2".into()]);
    if compress {
        args.push("-c".into());
    }
    if !opts.is_empty() {
        args.push("-o".into());
        args.push(opts.into());
    }
    args.push(raw.display().to_string());
    args.push(img.display().to_string());
    qemu_img(&args);
    img.to_path_buf()
}

/// `qemu-io -c 'write -P BYTE OFF LEN'`.
pub fn write_pattern(img: &Path, fmt: &str, byte: u8, off: u64, len: u64) {
    qemu_io(img, fmt, &[&format!("write -P {byte:#x} {off} {len}")]);
}

/// The oracle: the image as `qemu-img convert -O raw` reads it.
pub fn oracle(img: &Path) -> Vec<u8> {
    let out = img.with_extension(format!(
        "oracle-{}.raw",
        img.file_name().unwrap().to_string_lossy()
    ));
    qemu_img_in(
        image_dir(img),
        &[
            OsStr::new("convert"),
            OsStr::new("-U"),
            OsStr::new("-O"),
            OsStr::new("raw"),
            img.as_os_str(),
            out.as_os_str(),
        ],
    );
    let data = fs::read(&out).unwrap_or_else(|e| panic!("read {}: {e}", out.display()));
    let _ = fs::remove_file(&out);
    data
}

/// `qemu-img convert -f qcow2 -O raw` on a broken image: true when qemu refuses it (open or
/// read).
pub fn qemu_rejects(img: &Path) -> (bool, String) {
    require_qemu_tools();
    let out_path = img.with_extension("qemu-reject-check.raw");
    let out = run_cmd(
        qemu_img_cmd()
            .current_dir(image_dir(img))
            .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
            .arg(img)
            .arg(&out_path),
        TOOL_TIMEOUT,
    );
    let _ = fs::remove_file(&out_path);
    (!out.status.success(), out.stderr)
}

/// Asserts that qemu-img refuses the image: proves the test really broke it.
pub fn assert_qemu_rejects(img: &Path) {
    let (rejected, _) = qemu_rejects(img);
    assert!(
        rejected,
        "test setup: qemu-img still reads {} after it was broken; the patch did not break it",
        img.display()
    );
}

/// `qemu-img check --output=json IMG`: (exit code, parsed report). Exit codes: 0 clean,
/// 1 check could not run, 2 corruptions, 3 leaks only.
pub fn qemu_img_check(img: &Path, repair: Option<&str>) -> (i32, serde_json::Value) {
    require_qemu_tools();
    let mut c = qemu_img_cmd();
    c.current_dir(image_dir(img))
        .args(["check", "--output=json"]);
    if let Some(r) = repair {
        c.args(["-r", r]);
    }
    c.arg(img);
    let desc = describe_cmd(&c);
    // A daemon killed a moment ago can still hold its image locks while the kernel tears
    // down its io_uring (requests in flight keep the file open): give that a few seconds.
    let deadline = Instant::now() + Duration::from_secs(5);
    let out = loop {
        let out = run_cmd(&mut c, TOOL_TIMEOUT);
        if out.status.code() == Some(1) && out.stderr.contains("lock") && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(50));
            continue;
        }
        break out;
    };
    let code = out.status.code().unwrap_or(-1);
    let v = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "`{desc}` ({}) printed no JSON report ({e}):\nstdout: {}\nstderr: {}",
            out.status, out.stdout, out.stderr
        )
    });
    (code, v)
}

/// A count of a `qemu-img check` JSON report (absent: 0).
pub fn check_count(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key).and_then(|x| x.as_u64()).unwrap_or(0)
}

/// Fails unless `qemu-img check` finds no corruption, no leak and no check error.
pub fn assert_check_clean(img: &Path, what: &str) {
    let (code, v) = qemu_img_check(img, None);
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            check_count(&v, key),
            0,
            "{what}: qemu-img check of {} reports {key}: {v}",
            img.display()
        );
    }
    assert_eq!(code, 0, "{what}: qemu-img check exit code {code}: {v}");
}

/// `qemu-img compare -f qcow2 -F raw IMG RAW`: `Err` with qemu-img's output when they differ.
pub fn qemu_img_compare_raw(img: &Path, raw: &Path) -> Result<(), String> {
    require_qemu_tools();
    let mut c = qemu_img_cmd();
    c.current_dir(image_dir(img))
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(img)
        .arg(raw);
    let desc = describe_cmd(&c);
    let out = run_cmd(&mut c, TOOL_TIMEOUT);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{desc}` ({}): {}{}",
            out.status, out.stdout, out.stderr
        ))
    }
}

/// Fails unless `qemu-img compare` finds the image's guest data equal to `model` (written to
/// `dir/model.raw` for it).
pub fn assert_equal_to_model(img: &Path, model: &[u8], dir: &Path, what: &str) {
    let raw = dir.join("model.raw");
    write_file(&raw, model);
    if let Err(e) = qemu_img_compare_raw(img, &raw) {
        panic!("{what}: the image differs from the model: {e}");
    }
}

/// [`assert_check_clean`] and [`assert_equal_to_model`]: what a test checks of an image after
/// writing it through the engine and closing it.
pub fn assert_clean_and_equal(img: &Path, model: &[u8], dir: &Path) {
    let what = img.display().to_string();
    assert_check_clean(img, &what);
    assert_equal_to_model(img, model, dir, &what);
}

/// A `qemu-io` process that holds an image open (read-write, or read-only with `-r`) until it
/// is dropped: started without `-c`, its commands come from a pipe the test holds.
pub struct QemuIoHolder {
    child: Option<Child>,
    stdin: Option<std::process::ChildStdin>,
    output: Arc<Mutex<String>>,
}

impl QemuIoHolder {
    /// Starts `qemu-io [-r] -f qcow2 IMG` and waits until it has read the first sector (so the
    /// image is open and locked). `Err` with its output when it fails to open the image.
    pub fn open(img: &Path, read_only: bool) -> Result<QemuIoHolder, String> {
        use std::io::Write;
        require_qemu_tools();
        let mut c = qemu_io_cmd();
        c.current_dir(image_dir(img));
        if read_only {
            c.arg("-r");
        }
        c.args(["-f", "qcow2"]).arg(img);
        let desc = describe_cmd(&c);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `{desc}`: {e}"));
        let output = Arc::new(Mutex::new(String::new()));
        for r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            thread::spawn(move || {
                let mut r = r;
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let mut stdin = child.stdin.take().unwrap();
        let mut h = QemuIoHolder {
            child: Some(child),
            stdin: None,
            output,
        };
        // A failed open makes qemu-io exit; the write may then fail with EPIPE.
        let _ = stdin
            .write_all(b"read 0 512\n")
            .and_then(|()| stdin.flush());
        h.stdin = Some(stdin);
        let deadline = Instant::now() + TOOL_TIMEOUT;
        loop {
            if h.output().contains("read 512/512 bytes at offset 0") {
                return Ok(h);
            }
            let exited = h.child.as_mut().unwrap().try_wait().ok().flatten();
            if let Some(st) = exited {
                thread::sleep(Duration::from_millis(50));
                return Err(format!("`{desc}` exited ({st}): {}", h.output()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "`{desc}` did not read its first sector within {} s: {}",
                    TOOL_TIMEOUT.as_secs(),
                    h.output()
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything qemu-io printed so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Closes qemu-io's stdin (it exits at end of input) and waits for it; kills it after
    /// [`EXIT_TIMEOUT`].
    pub fn close(mut self) -> Option<ExitStatus> {
        self.finish()
    }

    fn finish(&mut self) -> Option<ExitStatus> {
        drop(self.stdin.take());
        let mut child = self.child.take()?;
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for QemuIoHolder {
    fn drop(&mut self) {
        self.finish();
    }
}
