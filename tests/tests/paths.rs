//! Files named by an image (backing files at any depth, external data files) must be regular
//! files under the allowed roots: the top image's own directory, plus `--allow-path DIR` or
//! `allow_paths` in a config file (DESIGN.md section 4b). Refusals name the file and the
//! option, for `serve`, `info` and `check`; FIFOs and device nodes are refused without
//! blocking; relative names still resolve against the directory of the image naming them.

use qcow2d_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// `qcow2d ARGS`.
fn qcow2d(args: &[&str]) -> CmdOutput {
    run_cmd(
        Command::new(daemon_bin()).args(args),
        Duration::from_secs(60),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A qcow2 base image at `path` whose first 64 KiB hold `byte`.
fn base(path: &Path, byte: u8) {
    create_qcow2(path, 16 * MIB, "");
    write_pattern(path, "qcow2", byte, 0, 64 * KIB);
}

/// `serve` (read-only) with `extra` must fail at once, naming `file` and saying `why`.
fn assert_serve_refused(img: &Path, socket: &Path, extra: &[&str], file: &str, why: &str) {
    let f = match Daemon::start_with(img, socket, extra) {
        Ok(d) => {
            d.terminate();
            panic!("qcow2d served {} although it names {file}", img.display());
        }
        Err(f) => f,
    };
    let status = f
        .status
        .unwrap_or_else(|| panic!("qcow2d neither served nor exited (blocked?): {f}"));
    assert_eq!(status.code(), Some(1), "{f}");
    assert!(
        f.stderr.contains(file) && f.stderr.contains(why) && !f.stderr.contains("panicked"),
        "the refusal must name {file} and say {why:?}: {f}"
    );
}

/// `qcow2d info` and `qcow2d check` with `extra` must fail, naming `file` and saying `why`.
fn assert_tools_refuse(img: &Path, extra: &[&str], file: &str, why: &str) {
    for sub in ["info", "check"] {
        let mut args = vec![sub, s(img)];
        args.extend_from_slice(extra);
        let out = qcow2d(&args);
        assert_eq!(out.status.code(), Some(1), "qcow2d {args:?}: {out:?}");
        assert!(
            out.stderr.contains(file) && out.stderr.contains(why),
            "qcow2d {args:?} must name {file} and say {why:?}: {}",
            out.stderr
        );
    }
}

/// `qcow2d info` and `qcow2d check` with `extra` succeed.
fn assert_tools_accept(img: &Path, extra: &[&str]) {
    for sub in ["info", "check"] {
        let mut args = vec![sub, s(img)];
        args.extend_from_slice(extra);
        let out = qcow2d(&args);
        assert!(out.status.success(), "qcow2d {args:?}: {out:?}");
    }
}

/// Serves `img` read-only with `extra` and reads its first sector: it must hold `byte`.
fn assert_serves(img: &Path, socket: &Path, extra: &[&str], byte: u8) {
    let d = Daemon::start_with(img, socket, extra)
        .unwrap_or_else(|f| panic!("qcow2d serve {extra:?}: {f}"));
    let data = blk_session(socket, 1, READ_TIMEOUT, |c| {
        c.read_batch(&[(0, 512)])?.remove(0)
    })
    .unwrap_or_else(|e| panic!("reading {}: {e}", img.display()));
    assert!(data.iter().all(|&b| b == byte), "sector 0 reads wrong");
    assert!(d.terminate().success());
}

#[test]
fn a_backing_file_outside_the_image_directory_needs_allow_path() {
    let sc = Scratch::new("paths_outside");
    let (a, b) = (sc.join("a"), sc.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let base_path = b.join("base.qcow2");
    base(&base_path, 0x42);
    overlay_in(&a, "top.qcow2", s(&base_path), "qcow2");
    let top = a.join("top.qcow2");
    let socket = sc.socket("s.sock");

    let base_name = s(&base_path);
    assert_serve_refused(&top, &socket, &[], base_name, "--allow-path");
    assert_serve_refused(
        &top,
        &socket,
        &[],
        base_name,
        "outside the allowed directories",
    );
    assert_tools_refuse(&top, &[], base_name, "--allow-path");
    // Written as a name with `..` from inside the image's directory: the same refusal.
    overlay_in(&a, "dots.qcow2", "../b/base.qcow2", "qcow2");
    assert_serve_refused(
        &a.join("dots.qcow2"),
        &socket,
        &[],
        "../b/base.qcow2",
        "--allow-path",
    );

    let allow = ["--allow-path", s(&b)];
    assert_serves(&top, &socket, &allow, 0x42);
    assert_serves(&a.join("dots.qcow2"), &socket, &allow, 0x42);
    assert_tools_accept(&top, &allow);
    // A parent directory of the file allows it too.
    assert_serves(&top, &socket, &["--allow-path", s(sc.path())], 0x42);
}

#[test]
fn a_backing_file_outside_at_any_depth_is_refused() {
    let sc = Scratch::new("paths_depth");
    let (a, b) = (sc.join("a"), sc.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let base_path = b.join("base.qcow2");
    base(&base_path, 0x17);
    // top -> mid (same directory) -> base (elsewhere).
    overlay_in(&a, "mid.qcow2", s(&base_path), "qcow2");
    overlay_in(&a, "top.qcow2", "mid.qcow2", "qcow2");
    let top = a.join("top.qcow2");
    let socket = sc.socket("s.sock");
    assert_serve_refused(&top, &socket, &[], s(&base_path), "--allow-path");
    assert_tools_refuse(&top, &[], s(&base_path), "--allow-path");
    assert_serves(&top, &socket, &["--allow-path", s(&b)], 0x17);
}

#[test]
fn a_symlink_inside_pointing_outside_is_refused() {
    let sc = Scratch::new("paths_symlink");
    let (a, b) = (sc.join("a"), sc.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let base_path = b.join("base.qcow2");
    base(&base_path, 0x33);
    std::os::unix::fs::symlink(&base_path, a.join("link.qcow2")).unwrap();
    overlay_in(&a, "top.qcow2", "link.qcow2", "qcow2");
    let top = a.join("top.qcow2");
    let socket = sc.socket("s.sock");
    assert_serve_refused(&top, &socket, &[], "link.qcow2", "resolves to");
    assert_serve_refused(&top, &socket, &[], s(&base_path), "--allow-path");
    assert_tools_refuse(&top, &[], "link.qcow2", "--allow-path");
    assert_serves(&top, &socket, &["--allow-path", s(&b)], 0x33);

    // A symlinked directory inside the root that leads outside: the same.
    std::os::unix::fs::symlink(&b, a.join("dirlink")).unwrap();
    overlay_in(&a, "top2.qcow2", "dirlink/base.qcow2", "qcow2");
    assert_serve_refused(
        &a.join("top2.qcow2"),
        &socket,
        &[],
        "dirlink",
        "resolves to",
    );
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
}

#[test]
fn fifos_and_device_nodes_are_refused_without_blocking() {
    let sc = Scratch::new("paths_fifo");
    let socket = sc.socket("s.sock");

    // A FIFO as backing file, inside the image's directory: refused for its type, at once
    // (opening it for reading would wait for a writer forever).
    let d = sc.join("fifo-backing");
    std::fs::create_dir_all(&d).unwrap();
    mkfifo(&d.join("base.raw"));
    overlay_in(&d, "top.qcow2", "base.raw", "raw");
    let top = d.join("top.qcow2");
    assert_serve_refused(
        &top,
        &socket,
        &[],
        "base.raw",
        "is a FIFO, not a regular file",
    );
    assert_tools_refuse(&top, &[], "base.raw", "FIFO");

    // A FIFO as external data file (opened read-write by a writable export).
    let d = sc.join("fifo-data");
    std::fs::create_dir_all(&d).unwrap();
    let top = data_file_image_in(&d, s(&d.join("top.data")));
    std::fs::remove_file(d.join("top.data")).unwrap();
    mkfifo(&d.join("top.data"));
    assert_serve_refused(&top, &socket, &[], "top.data", "is a FIFO");
    let f = Daemon::start_writable(&top, &socket, &[])
        .err()
        .expect("refused");
    assert!(f.status.is_some() && f.stderr.contains("is a FIFO"), "{f}");
    assert_tools_refuse(&top, &[], "top.data", "FIFO");

    // /dev/zero as backing file and as data file: outside the roots, and with /dev allowed,
    // still not a regular file.
    let d = sc.join("dev");
    std::fs::create_dir_all(&d).unwrap();
    overlay_in(&d, "top.qcow2", "/dev/zero", "raw");
    let top = d.join("top.qcow2");
    assert_serve_refused(&top, &socket, &[], "/dev/zero", "--allow-path");
    let allow_dev = ["--allow-path", "/dev"];
    assert_serve_refused(&top, &socket, &allow_dev, "/dev/zero", "character device");
    assert_tools_refuse(&top, &allow_dev, "/dev/zero", "character device");

    let d = sc.join("dev-data");
    std::fs::create_dir_all(&d).unwrap();
    let top = data_file_image_in(&d, s(&d.join("top.data")));
    std::fs::remove_file(d.join("top.data")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", d.join("top.data")).unwrap();
    assert_serve_refused(&top, &socket, &[], "top.data", "--allow-path");
    assert_serve_refused(&top, &socket, &allow_dev, "top.data", "character device");

    // A directory as backing file.
    let d = sc.join("dir");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    overlay_in(&d, "top.qcow2", "sub", "raw");
    assert_serve_refused(&d.join("top.qcow2"), &socket, &[], "sub", "is a directory");
}

#[test]
fn relative_names_resolve_against_the_naming_image() {
    let sc = Scratch::new("paths_relative");
    // a/top.qcow2 -> "sub/mid.qcow2" -> (relative to a/sub) "base.qcow2" = a/sub/base.qcow2.
    let a = sc.join("a");
    std::fs::create_dir_all(a.join("sub")).unwrap();
    base(&a.join("sub/base.qcow2"), 0x5a);
    overlay_in(&a.join("sub"), "mid.qcow2", "base.qcow2", "qcow2");
    overlay_in(&a, "top.qcow2", "sub/mid.qcow2", "qcow2");
    // A decoy where a working-directory resolution would look.
    base(&sc.join("base.qcow2"), 0x01);
    let top = a.join("top.qcow2");
    let socket = sc.socket("s.sock");
    let mut cmd = Command::new(daemon_bin());
    cmd.current_dir(sc.path())
        .args(["serve", "--read-only", "--image"])
        .arg(&top)
        .arg("--socket")
        .arg(&socket);
    let d = Daemon::spawn(cmd, &top, &socket).unwrap_or_else(|f| panic!("{f}"));
    let data = blk_session(&socket, 1, READ_TIMEOUT, |c| {
        c.read_batch(&[(0, 512)])?.remove(0)
    })
    .unwrap_or_else(|e| panic!("reading: {e}"));
    assert!(data.iter().all(|&b| b == 0x5a), "the chain resolved wrong");
    assert!(d.terminate().success());
    // The same image given by a relative path from its own directory.
    let out = run_cmd(
        Command::new(daemon_bin())
            .current_dir(&a)
            .args(["info", "top.qcow2"]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("sub/mid.qcow2"), "{}", out.stdout);
}

#[test]
fn config_file_allow_paths_top_level_and_per_export() {
    let sc = Scratch::new("paths_config");
    let (a, b, c) = (sc.join("a"), sc.join("b"), sc.join("c"));
    for d in [&a, &b, &c] {
        std::fs::create_dir_all(d).unwrap();
    }
    base(&b.join("base.qcow2"), 0x61);
    base(&c.join("base.qcow2"), 0x62);
    overlay_in(&a, "one.qcow2", s(&b.join("base.qcow2")), "qcow2");
    overlay_in(&a, "two.qcow2", s(&c.join("base.qcow2")), "qcow2");
    let (s1, s2) = (sc.socket("1.sock"), sc.socket("2.sock"));
    let config = sc.join("q.toml");
    let serve_config = |text: &str| {
        std::fs::write(&config, text).unwrap();
        let mut cmd = Command::new(daemon_bin());
        cmd.arg("serve").arg("--config").arg(&config);
        Daemon::spawn(cmd, &a.join("one.qcow2"), &s1)
    };
    let exports = |extra1: &str, extra2: &str| {
        format!(
            "[[export]]\nimage = \"{}\"\nsocket = \"{}\"\nread_only = true\n{extra1}\n\
             [[export]]\nimage = \"{}\"\nsocket = \"{}\"\nread_only = true\n{extra2}\n",
            s(&a.join("one.qcow2")),
            s(&s1),
            s(&a.join("two.qcow2")),
            s(&s2)
        )
    };
    // Export 2's base is not allowed: nothing is served, and the error names it.
    let f = serve_config(&format!(
        "allow_paths = [\"{}\"]\n{}",
        s(&b),
        exports("", "")
    ))
    .err()
    .expect("refused");
    assert!(
        f.stderr.contains(s(&c.join("base.qcow2"))) && f.stderr.contains("allow_paths"),
        "{f}"
    );
    // Top level for both, or per export: served.
    for text in [
        format!("allow_paths = [\"{}\", \"c\"]\n{}", s(&b), exports("", "")),
        exports(
            &format!("allow_paths = [\"{}\"]", s(&b)),
            "allow_paths = [\"c\"]",
        ),
    ] {
        let d = serve_config(&text).unwrap_or_else(|f| panic!("{text}\n{f}"));
        for (socket, byte) in [(&s1, 0x61u8), (&s2, 0x62u8)] {
            let data = blk_session(socket, 1, READ_TIMEOUT, |c| {
                c.read_batch(&[(0, 512)])?.remove(0)
            })
            .unwrap_or_else(|e| panic!("reading: {e}"));
            assert!(data.iter().all(|&x| x == byte));
        }
        assert!(d.terminate().success());
    }
    // An allowed path that does not exist is an error naming it.
    let f = serve_config(&exports("allow_paths = [\"/nonexistent/q2d\"]", ""))
        .err()
        .expect("refused");
    assert!(f.stderr.contains("/nonexistent/q2d"), "{f}");
}

#[test]
fn ctl_add_takes_allow_path() {
    let sc = Scratch::new("paths_ctl");
    let (a, b) = (sc.join("a"), sc.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    base(&b.join("base.qcow2"), 0x77);
    overlay_in(&a, "top.qcow2", s(&b.join("base.qcow2")), "qcow2");
    let top = a.join("top.qcow2");
    let control = sc.socket("ctl.sock");
    // A daemon serving another image, with a control socket.
    let first = a.join("first.qcow2");
    base(&first, 0x01);
    let daemon = Daemon::start_with(&first, &sc.socket("f.sock"), &["--control", s(&control)])
        .unwrap_or_else(|f| panic!("{f}"));
    let socket = sc.socket("t.sock");
    let ctl = |extra: &[&str]| {
        let mut c = Command::new(daemon_bin());
        c.arg("ctl")
            .arg("--control")
            .arg(&control)
            .args([
                "add",
                "--read-only",
                "--image",
                s(&top),
                "--socket",
                s(&socket),
            ])
            .args(extra);
        run_cmd(&mut c, Duration::from_secs(60))
    };
    let out = ctl(&[]);
    assert!(
        !out.status.success()
            && out.stderr.contains(s(&b.join("base.qcow2")))
            && out.stderr.contains("--allow-path"),
        "{out:?}"
    );
    let out = ctl(&["--allow-path", s(&b)]);
    assert!(out.status.success(), "{out:?}");
    let data = blk_session(&socket, 1, READ_TIMEOUT, |c| {
        c.read_batch(&[(0, 512)])?.remove(0)
    })
    .unwrap_or_else(|e| panic!("reading: {e}"));
    assert!(data.iter().all(|&x| x == 0x77));
    assert!(daemon.terminate().success());
}

/// A config file with a control socket, a top-level `allow_paths` and no export: the
/// directories apply to exports added later (path check and file system sandbox alike).
#[test]
fn top_level_allow_paths_apply_to_exports_added_to_a_daemon_without_exports() {
    use std::io::BufRead;
    let sc = Scratch::new("paths_ctl_top");
    let (a, b) = (sc.join("a"), sc.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    base(&b.join("base.qcow2"), 0x77);
    overlay_in(&a, "top.qcow2", s(&b.join("base.qcow2")), "qcow2");
    let top = a.join("top.qcow2");
    let control = sc.socket("ctl.sock");
    let config = sc.join("q.toml");
    std::fs::write(
        &config,
        format!("control = {:?}\nallow_paths = [{:?}]\n", s(&control), s(&b)),
    )
    .unwrap();
    let mut child = Command::new(daemon_bin())
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start qcow2d serve --config");
    let stdout = child.stdout.take().unwrap();
    let line = with_timeout("the control line", READY_TIMEOUT, move || {
        let mut first = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut first)
            .map(|_| first)
    })
    .expect("read the daemon's stdout");
    assert!(line.starts_with("qcow2d: control on"), "{line}");
    let socket = sc.socket("t.sock");
    let out = run_cmd(
        Command::new(daemon_bin()).args([
            "ctl",
            "--control",
            s(&control),
            "add",
            "--read-only",
            "--image",
            s(&top),
            "--socket",
            s(&socket),
        ]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{out:?}");
    let data = blk_session(&socket, 1, READ_TIMEOUT, |c| {
        c.read_batch(&[(0, 512)])?.remove(0)
    })
    .unwrap_or_else(|e| panic!("reading: {e}"));
    assert!(data.iter().all(|&x| x == 0x77));
    // SAFETY: kill(2) on our own child's pid; no memory involved.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = with_timeout("the daemon's exit", EXIT_TIMEOUT, move || child.wait());
    assert!(status.unwrap().success());
}

/// An image whose external data file is another image's raw backing file would write its
/// guest data into that other disk (QEMU's locks let it: they share writes of both). A daemon
/// serving the other image refuses it, naming the file, and keeps serving the other; read-only,
/// it is served (it writes nothing there).
#[test]
fn a_data_file_another_image_reads_as_guest_data_is_not_written() {
    let sc = Scratch::new("paths_shared_data");
    let dir = sc.join("vm");
    std::fs::create_dir_all(&dir).unwrap();
    let raw = dir.join("base.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    write_pattern(&raw, "raw", 0x55, 0, 64 * KIB);
    overlay_in(&dir, "a.qcow2", "base.raw", "raw");
    // b.qcow2 names base.raw as its data file (made with another name, then renamed in the
    // header: creating it would write the data file).
    let b = create_qcow2_in(&dir, "b.qcow2", "data_file=xxxx.raw", "16M");
    let _ = std::fs::remove_file(dir.join("xxxx.raw"));
    let mut bytes = std::fs::read(&b).unwrap();
    let at = bytes
        .windows(8)
        .position(|w| w == b"xxxx.raw")
        .expect("the data file name in the header");
    bytes[at..at + 8].copy_from_slice(b"base.raw");
    std::fs::write(&b, bytes).unwrap();

    let control = sc.socket("ctl.sock");
    let a_socket = sc.socket("a.sock");
    let daemon = Daemon::start_with(&dir.join("a.qcow2"), &a_socket, &["--control", s(&control)])
        .unwrap_or_else(|f| panic!("{f}"));
    let add = |extra: &[&str]| {
        let mut c = Command::new(daemon_bin());
        c.args(["ctl", "--control", s(&control), "add", "--image", s(&b)])
            .args(["--socket", s(&sc.socket("b.sock"))])
            .args(extra);
        run_cmd(&mut c, Duration::from_secs(60))
    };
    let out = add(&[]);
    assert!(
        !out.status.success()
            && out.stderr.contains(s(&raw))
            && out
                .stderr
                .contains("raw backing file or external data file in use"),
        "{out:?}"
    );
    let data = blk_session(&a_socket, 1, READ_TIMEOUT, |c| {
        c.read_batch(&[(0, 512)])?.remove(0)
    })
    .unwrap_or_else(|e| panic!("reading a.qcow2: {e}"));
    assert!(data.iter().all(|&x| x == 0x55));
    let out = add(&["--read-only"]);
    assert!(out.status.success(), "{out:?}");
    assert!(daemon.terminate().success());
}
