//! `qcow2d serve --direct` start-up: a file system that refuses O_DIRECT is an error naming
//! the file (never a panic, never a silent fallback to the page cache), and the config file's
//! `direct = true` reaches the engine. Reads and writes through direct exports are tested in
//! `differential.rs` (`direct_reads`) and `writes.rs` (`direct_*`).

use qcow2d_tests::*;
use std::path::Path;
use std::process::Command;

/// Replaces the external data file name of `img` (written by qemu-img as a placeholder of the
/// same length) with `name`.
fn point_data_file_at(img: &Path, placeholder: &str, name: &str) {
    assert_eq!(placeholder.len(), name.len());
    let mut bytes = std::fs::read(img).unwrap();
    let at = bytes
        .windows(placeholder.len())
        .position(|w| w == placeholder.as_bytes())
        .expect("data file name in the header");
    bytes[at..at + name.len()].copy_from_slice(name.as_bytes());
    std::fs::write(img, &bytes).unwrap();
}

fn assert_refused(f: StartFailure, file: &str) {
    let status = f.status.expect("the daemon exits");
    assert_eq!(status.code(), Some(1), "{f}");
    assert!(
        f.stderr.contains(file) && f.stderr.contains("O_DIRECT") && !f.stderr.contains("panicked"),
        "{f}"
    );
}

/// procfs refuses O_DIRECT: an image whose external data file is /proc/self/status (allowed
/// with --allow-path /proc) is served without --direct and refused with it, the error naming
/// the data file.
#[test]
fn o_direct_refused_for_a_data_file_is_an_error_naming_it() {
    const NAME: &str = "/proc/self/status";
    let s = Scratch::new("direct_proc");
    let placeholder = "p".repeat(NAME.len());
    let img = s.join("e.qcow2");
    qemu_img_in(
        s.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={placeholder}"),
            "e.qcow2",
            "1M",
        ],
    );
    point_data_file_at(&img, &placeholder, NAME);
    let socket = s.socket("d.sock");
    // The data file lies outside the image's directory: allowed explicitly.
    let allow = ["--allow-path", "/proc"];
    let d = Daemon::start_with(&img, &socket, &allow).unwrap_or_else(|f| panic!("{f}"));
    d.terminate();
    let f = match Daemon::start_with(&img, &socket, &[&allow[..], &["--direct"]].concat()) {
        Ok(_) => panic!("--direct served a data file on procfs"),
        Err(f) => f,
    };
    assert_refused(f, NAME);
}

/// An image on ramfs (which has no O_DIRECT) is refused by name. Mounts a ramfs: needs
/// `mount` (package `mount`) and root, and fails, saying so, without them.
#[test]
fn o_direct_refused_for_the_image_on_ramfs() {
    let s = Scratch::new("direct_ramfs");
    let mnt = s.join("ramfs");
    std::fs::create_dir(&mnt).unwrap();
    let mount = require_tool("mount", "mount");
    let out = run_cmd(
        Command::new(mount)
            .args(["-t", "ramfs", "q2d-test"])
            .arg(&mnt),
        TOOL_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "this test mounts a ramfs (run the tests as root): `mount -t ramfs` failed ({}): {}",
        out.status,
        out.stderr
    );
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mnt);
    let img = mnt.join("r.qcow2");
    create_qcow2(&img, MIB, "");
    let socket = s.socket("r.sock");
    let f = match Daemon::start_writable(&img, &socket, &["--direct"]) {
        Ok(_) => panic!("--direct served an image on ramfs"),
        Err(f) => f,
    };
    assert_refused(f, &img.display().to_string());
    // Without --direct it is served.
    let d = Daemon::start_writable(&img, &socket, &[]).unwrap_or_else(|f| panic!("{f}"));
    assert!(d.terminate().success());
}

/// `direct = true` in a config file opens the image with O_DIRECT; `qcow2d info` is unaffected.
#[test]
fn config_file_direct_key() {
    let s = Scratch::new("direct_cfg");
    let img = s.join("c.qcow2");
    create_qcow2(&img, 8 * MIB, "");
    let socket = s.socket("c.sock");
    let cfg = s.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[export]]\nimage = \"{}\"\nsocket = \"{}\"\ndirect = true\n",
            img.display(),
            socket.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("serve").arg("--config").arg(&cfg);
    let d = Daemon::spawn(cmd, &img, &socket).unwrap_or_else(|f| panic!("{f}"));
    let files = o_direct_files(d.pid());
    let canonical = std::fs::canonicalize(&img).unwrap();
    assert!(files.contains(&canonical), "O_DIRECT files: {files:?}");
    assert!(d.terminate().success());
    let info = run_ok(Command::new(daemon_bin()).arg("info").arg(&img));
    assert!(info.contains("cluster_size: 65536"), "{info}");
}
