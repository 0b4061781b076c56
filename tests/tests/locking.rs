//! Image locking between qcow2d and QEMU, both ways (DESIGN.md section 4, invariant 8).
//!
//! QEMU's file-posix driver takes OFD read locks on bytes `100 + perm` for the permissions it
//! holds and `200 + perm` for those it does not share (perm 0 consistent read, 1 write,
//! 3 resize). Every QEMU user of a qcow2 image, even a read-only one, unshares write and
//! resize on the file (bytes 201 and 203); a read-write user also holds write (byte 101);
//! `qemu-img info` opens without I/O, so it holds nothing and only unshares write and resize.
//!
//! qcow2d (engine/src/io/lock.rs): a read-only export takes what a QEMU reader takes (holds
//! 100, unshares 201 and 203). A writable export holds 100 and unshares consistent read,
//! write and resize (200, 201, 203), and refuses an image whose users do not share write
//! (someone holds 201). It does not hold byte 101, so `qemu-img info` (which checks it) still
//! works while it serves; readers with I/O (`qemu-io -r`, a read-only qcow2d) need consistent
//! read and are kept out by byte 200, as a QEMU writer keeps them out; writers (QEMU or qcow2d)
//! are always kept out.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long qemu-storage-daemon gets to fail; if it is still running after this, it got the
/// image.
const QSD_TIMEOUT: Duration = Duration::from_secs(15);

fn image(s: &Scratch) -> PathBuf {
    let img = s.join("l.qcow2");
    create_qcow2(&img, 16 * MIB, "");
    write_pattern(&img, "qcow2", 0x3c, 0, 64 * KIB);
    img
}

/// `qemu-io [-r] -c 'read 0 512' IMG`.
fn qemu_io_read(img: &Path, read_only: bool) -> CmdOutput {
    require_qemu_tools();
    let mut c = Command::new("qemu-io");
    c.current_dir(image_dir(img));
    if read_only {
        c.arg("-r");
    }
    c.args(["-f", "qcow2", "-c", "read -P 0x3c 0 512"]).arg(img);
    run_cmd(&mut c, TOOL_TIMEOUT)
}

fn text(out: &CmdOutput) -> String {
    format!("{}{}", out.stdout, out.stderr)
}

/// The QEMU command succeeded and read the sector.
fn assert_qemu_read_ok(out: &CmdOutput, what: &str) {
    let t = text(out);
    assert!(
        out.status.success() && t.contains("read 512/512 bytes") && !t.contains("failed"),
        "{what}: expected the read to succeed ({}):\n{t}",
        out.status
    );
}

/// The QEMU command failed because of a lock.
fn assert_qemu_lock_error(out: &CmdOutput, what: &str) {
    let t = text(out);
    assert!(
        !out.status.success() && t.contains("lock"),
        "{what}: expected a lock error ({}):\n{t}",
        out.status
    );
}

/// `qemu-img info IMG` (without -U) succeeds.
fn assert_qemu_img_info_ok(img: &Path, what: &str) {
    let out = run_cmd(
        Command::new("qemu-img")
            .current_dir(image_dir(img))
            .arg("info")
            .arg(img),
        TOOL_TIMEOUT,
    );
    assert!(
        out.status.success() && out.stdout.contains("file format: qcow2"),
        "{what}: qemu-img info must work ({}):\n{}",
        out.status,
        text(&out)
    );
}

/// `qemu-storage-daemon` exporting IMG writable over vhost-user-blk: must fail with a lock
/// error (if it is still running after [`QSD_TIMEOUT`], it got the image: failure).
fn assert_qsd_writable_export_refused(img: &Path, socket: &Path, what: &str) {
    require_tool("qemu-storage-daemon", "qemu-utils");
    let mut c = Command::new("qemu-storage-daemon");
    c.current_dir(image_dir(img))
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            img.display()
        ))
        .args(["--blockdev", "driver=qcow2,node-name=q,file=f", "--export"])
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("run qemu-storage-daemon");
    let deadline = Instant::now() + QSD_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what}: qemu-storage-daemon was still running after {} s: it got the image \
                 for writing",
                QSD_TIMEOUT.as_secs()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let out = child
        .wait_with_output()
        .expect("qemu-storage-daemon output");
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !status.success() && t.contains("lock"),
        "{what}: qemu-storage-daemon must fail with a lock error ({status}):\n{t}"
    );
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

/// Starts qcow2d (`extra` options), failing the test if it does not become ready.
fn serve(img: &Path, socket: &Path, extra: &[&str]) -> Daemon {
    Daemon::start_writable(img, socket, extra)
        .unwrap_or_else(|f| panic!("qcow2d serve {extra:?}: {f}"))
}

fn stop(d: Daemon) {
    let st = d.terminate();
    assert!(st.success(), "qcow2d exit status {st} after SIGTERM");
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

#[test]
fn writable_export_keeps_qemu_writers_out_and_lets_qemu_img_info_in() {
    let s = Scratch::new("lock_rw");
    let img = image(&s);
    let socket = s.socket("l.sock");
    let d = serve(&img, &socket, &[]);

    assert_qemu_img_info_ok(&img, "writable qcow2d export");
    assert_qemu_lock_error(
        &qemu_io_read(&img, false),
        "qemu-io (read-write) while qcow2d serves the image writable",
    );
    // A QEMU reader needs consistent read, which the writable export does not share.
    assert_qemu_lock_error(
        &qemu_io_read(&img, true),
        "qemu-io -r while qcow2d serves the image writable",
    );
    assert_qsd_writable_export_refused(
        &img,
        &s.socket("qsd.sock"),
        "qemu-storage-daemon writable export while qcow2d serves the image writable",
    );
    // A second writable qcow2d is refused.
    assert_qcow2d_refused(&img, &s.socket("2.sock"), &[], "second writable qcow2d");
    // A read-only qcow2d needs consistent read too: refused.
    assert_qcow2d_refused(
        &img,
        &s.socket("3.sock"),
        &["--read-only"],
        "read-only qcow2d while another qcow2d writes",
    );
    export_still_works(&socket, true);
    stop(d);

    // The locks went with the daemon: QEMU may now write.
    assert_qemu_read_ok(&qemu_io_read(&img, false), "qemu-io after qcow2d stopped");
    assert_check_clean(&img, "after the lock tests");
}

#[test]
fn read_only_export_keeps_qemu_writers_out_and_lets_readers_in() {
    let s = Scratch::new("lock_ro");
    let img = image(&s);
    let socket = s.socket("l.sock");
    let d = serve(&img, &socket, &["--read-only"]);

    assert_qemu_img_info_ok(&img, "read-only qcow2d export");
    assert_qemu_lock_error(
        &qemu_io_read(&img, false),
        "qemu-io (read-write) while qcow2d serves the image read-only",
    );
    assert_qemu_read_ok(
        &qemu_io_read(&img, true),
        "qemu-io -r while qcow2d serves the image read-only",
    );
    assert_qsd_writable_export_refused(
        &img,
        &s.socket("qsd.sock"),
        "qemu-storage-daemon writable export while qcow2d serves the image read-only",
    );
    assert_qcow2d_refused(
        &img,
        &s.socket("2.sock"),
        &[],
        "writable qcow2d while another one serves it read-only",
    );
    export_still_works(&socket, false);
    stop(d);
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
    let d = serve(&img, &s.socket("c.sock"), &[]);
    stop(d);
}

#[test]
fn qemu_reader_lets_only_read_only_qcow2d_in() {
    let s = Scratch::new("lock_qr");
    let img = image(&s);
    let mut holder = QemuIoHolder::open(&img, true)
        .unwrap_or_else(|e| panic!("qemu-io -r holding the image: {e}"));
    let socket = s.socket("a.sock");
    let d = serve(&img, &socket, &["--read-only"]);
    export_still_works(&socket, false);
    stop(d);
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
