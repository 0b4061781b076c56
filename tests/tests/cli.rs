//! The `qcow2d` command line: `info` (text and JSON, checked against `qemu-img info`), `serve`
//! (ready line, config files, SIGTERM, clients coming and going).

use qcow2d_tests::*;
use serde_json::Value;
use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn qcow2d(args: &[&str]) -> CmdOutput {
    run_cmd(
        Command::new(daemon_bin()).args(args),
        Duration::from_secs(60),
    )
}

/// `qcow2d info IMG --json`, parsed.
fn info_json(img: &Path) -> Value {
    let out = qcow2d(&["info", img.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "qcow2d info {} --json failed ({}): {}",
        img.display(),
        out.status,
        out.stderr
    );
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qcow2d info --json printed invalid JSON ({e}):\n{}",
            out.stdout
        )
    })
}

/// The first of `keys` present in `v` (snake_case or qemu-img's kebab-case).
fn field<'a>(v: &'a Value, keys: &[&str]) -> &'a Value {
    keys.iter()
        .find_map(|k| v.get(*k))
        .unwrap_or_else(|| panic!("qcow2d info --json has none of the keys {keys:?}:\n{v:#}"))
}

fn qemu_info(img: &Path) -> Value {
    let s = qemu_img(&["info", "-U", "--output=json", img.to_str().unwrap()]);
    serde_json::from_str(&s).unwrap()
}

/// Checks the geometry that `qcow2d info --json` reports against `qemu-img info`.
fn check_info_against_qemu(img: &Path, expect_compression: &str) {
    let ours = info_json(img);
    let theirs = qemu_info(img);
    let data = &theirs["format-specific"]["data"];
    let ctx = format!("{}\nqcow2d: {ours:#}\nqemu-img: {theirs:#}", img.display());
    assert_eq!(
        field(&ours, &["virtual_size", "virtual-size"]).as_u64(),
        theirs["virtual-size"].as_u64(),
        "virtual size; {ctx}"
    );
    assert_eq!(
        field(&ours, &["cluster_size", "cluster-size"]).as_u64(),
        theirs["cluster-size"].as_u64(),
        "cluster size; {ctx}"
    );
    let compat = data["compat"].as_str().unwrap();
    let version = if compat == "0.10" { 2 } else { 3 };
    if let Some(c) = ours.get("compat") {
        assert_eq!(c.as_str(), Some(compat), "compat; {ctx}");
    }
    if let Some(v) = ours.get("version") {
        assert_eq!(v.as_u64(), Some(version), "version; {ctx}");
    }
    assert!(
        ours.get("compat").is_some() || ours.get("version").is_some(),
        "neither compat nor version reported; {ctx}"
    );
    assert_eq!(
        field(&ours, &["refcount_bits", "refcount-bits"]).as_u64(),
        data["refcount-bits"].as_u64(),
        "refcount bits; {ctx}"
    );
    assert_eq!(
        field(&ours, &["compression_type", "compression-type"]).as_str(),
        Some(expect_compression),
        "compression type; {ctx}"
    );
    if let Some(q) = data["compression-type"].as_str() {
        assert_eq!(
            q, expect_compression,
            "test setup: qemu-img disagrees; {ctx}"
        );
    }
}

#[test]
fn info_json_v3_defaults() {
    let s = Scratch::new("info_v3");
    let img = s.join("a.qcow2");
    create_qcow2(&img, 20 * MIB + 3584, "");
    check_info_against_qemu(&img, "zlib");
}

#[test]
fn info_json_v2_small_clusters() {
    let s = Scratch::new("info_v2");
    let img = s.join("b.qcow2");
    create_qcow2(&img, 16 * MIB, "compat=0.10,cluster_size=4096");
    check_info_against_qemu(&img, "zlib");
}

#[test]
fn info_json_zstd_refcount64_2m() {
    let s = Scratch::new("info_zstd");
    let img = s.join("c.qcow2");
    create_qcow2(
        &img,
        64 * MIB,
        "compression_type=zstd,refcount_bits=64,cluster_size=2M",
    );
    check_info_against_qemu(&img, "zstd");
}

#[test]
fn info_json_refcount1_extended_l2() {
    let s = Scratch::new("info_rc1");
    let img = s.join("d.qcow2");
    create_qcow2(
        &img,
        16 * MIB,
        "refcount_bits=1,extended_l2=on,cluster_size=32k",
    );
    check_info_against_qemu(&img, "zlib");
}

#[test]
fn info_json_backing_chain() {
    let s = Scratch::new("info_chain");
    let base_len = 8 * MIB + 1536;
    write_file(&s.join("base.raw"), &vec![7u8; base_len as usize]);
    qemu_img_in(
        s.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
            "12M",
        ],
    );
    qemu_img_in(
        s.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "20M",
        ],
    );
    let top = s.join("top.qcow2");
    let ours = info_json(&top);
    check_info_against_qemu(&top, "zlib");
    let chain = field(&ours, &["backing_chain", "backing-chain"])
        .as_array()
        .unwrap_or_else(|| panic!("backing chain is not an array: {ours:#}"));
    assert_eq!(chain.len(), 2, "two images below the top: {ours:#}");
    let expect = [
        ("mid.qcow2", "qcow2", 12 * MIB),
        ("base.raw", "raw", base_len),
    ];
    for (entry, (name, format, size)) in chain.iter().zip(expect) {
        let filename = field(entry, &["filename"]).as_str().unwrap();
        assert!(
            filename.ends_with(name),
            "chain entry {filename:?} should be {name}: {ours:#}"
        );
        assert_eq!(field(entry, &["format"]).as_str(), Some(format), "{ours:#}");
        assert_eq!(
            field(entry, &["virtual_size", "virtual-size"]).as_u64(),
            Some(size),
            "{ours:#}"
        );
    }
    if let Some(b) = ours
        .get("backing_file")
        .or_else(|| ours.get("backing-filename"))
    {
        assert_eq!(b.as_str(), Some("mid.qcow2"), "{ours:#}");
    }
}

#[test]
fn info_text_mentions_size() {
    let s = Scratch::new("info_text");
    let img = s.join("t.qcow2");
    create_qcow2(&img, 20 * MIB + 3584, "");
    let out = qcow2d(&["info", img.to_str().unwrap()]);
    assert!(out.status.success(), "qcow2d info failed: {}", out.stderr);
    assert!(
        out.stdout.contains(&(20 * MIB + 3584).to_string()),
        "qcow2d info does not show the virtual size in bytes:\n{}",
        out.stdout
    );
}

#[test]
fn info_on_bad_image_fails_clearly() {
    let s = Scratch::new("info_bad");
    let img = s.join("bad.qcow2");
    create_qcow2(&img, 16 * MIB, "");
    write_bytes(&img, 0, b"XXXX");
    let out = qcow2d(&["info", img.to_str().unwrap(), "--json"]);
    assert!(!out.status.success(), "qcow2d info on a bad image exited 0");
    assert!(
        out.stderr.contains("bad.qcow2") && !out.stderr.contains("panicked"),
        "qcow2d info's error should name the image and not panic:\n{}",
        out.stderr
    );
    let missing = qcow2d(&["info", s.join("nope.qcow2").to_str().unwrap()]);
    assert!(!missing.status.success());
    assert!(
        missing.stderr.contains("nope.qcow2"),
        "qcow2d info on a missing file should name it:\n{}",
        missing.stderr
    );
}

// ---- serve ------------------------------------------------------------------------------

/// A small image with known content (and its oracle).
fn small_image(s: &Scratch) -> (std::path::PathBuf, Vec<u8>) {
    let raw = s.join("src.raw");
    write_file(&raw, &mixed_bytes(500, (8 * MIB) as usize));
    let img = s.join("img.qcow2");
    convert_raw_to_qcow2(&raw, &img, "compression_type=zstd", true);
    let o = oracle(&img);
    (img, o)
}

fn whole_disk(size: u64) -> Vec<ReadReq> {
    read_plan(size, 65536, 9)
}

fn read_and_compare(socket: &Path, oracle: &[u8], what: &str) {
    let plan = whole_disk(oracle.len() as u64);
    let p = plan.clone();
    let results = blk_session(socket, 2, READ_TIMEOUT, move |c| c.read_batch(&p))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    for ((off, len), r) in plan.iter().zip(results) {
        let data = r.unwrap_or_else(|e| panic!("{what}: read {len} at {off:#x}: {e}"));
        let o = *off as usize;
        if let Some(m) = first_difference(what, "zstd 64k, 8 MiB", *off, &oracle[o..o + len], &data)
        {
            panic!("{m}");
        }
    }
}

#[test]
fn serve_prints_ready_line_and_serves() {
    let s = Scratch::new("serve_ready");
    let (img, o) = small_image(&s);
    let socket = s.socket("q.sock");
    // Daemon::start waits for exactly `qcow2d: serving <IMG> on <SOCK>`.
    let mut d = Daemon::start(&img, &socket);
    assert!(
        socket.exists(),
        "the socket must exist once the ready line is printed"
    );
    read_and_compare(&socket, &o, "first client");
    d.assert_alive("after one client");
    let st = d.terminate();
    assert!(
        st.success(),
        "qcow2d exited with {st} after SIGTERM, expected 0"
    );
}

#[test]
fn sigterm_exits_zero_when_idle() {
    let s = Scratch::new("sigterm_idle");
    let (img, _) = small_image(&s);
    let d = Daemon::start(&img, &s.socket("q.sock"));
    let st = d.terminate();
    assert!(
        st.success(),
        "qcow2d exited with {st} after SIGTERM, expected 0"
    );
}

#[test]
fn sigterm_exits_zero_with_client_connected() {
    let s = Scratch::new("sigterm_busy");
    let (img, o) = small_image(&s);
    let socket = s.socket("q.sock");
    let d = Daemon::start(&img, &socket);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let size = o.len() as u64;
    let sock = socket.clone();
    // A client that connects, reads, and stays connected until told to go.
    let client = std::thread::spawn(move || {
        let r = BlkClient::connect(&sock, 2).and_then(|mut c| {
            c.read_batch(&[(0, 65536), (size - 512, 512)])?;
            Ok(c)
        });
        match r {
            Ok(c) => {
                let _ = ready_tx.send(Ok(()));
                let _ = rx.recv_timeout(Duration::from_secs(60));
                drop(c);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    });
    ready_rx
        .recv_timeout(READ_TIMEOUT)
        .expect("client did not connect in time")
        .unwrap_or_else(|e| panic!("client: {e}"));
    let st = d.terminate();
    let _ = tx.send(());
    // Not joined: a client stuck on a dead socket must not hang the test.
    drop(client);
    assert!(
        st.success(),
        "qcow2d exited with {st} after SIGTERM with a client connected, expected 0"
    );
}

#[test]
fn clients_come_and_go() {
    let s = Scratch::new("reconnect");
    let (img, o) = small_image(&s);
    let socket = s.socket("q.sock");
    let mut d = Daemon::start(&img, &socket);
    read_and_compare(&socket, &o, "first client");
    d.assert_alive("after the first client disconnected");
    // A client that leaves with requests in flight.
    blk_session(&socket, 2, READ_TIMEOUT, |c| {
        c.abandon_with_requests_in_flight(&[(0, 1 << 20), (1 << 20, 1 << 20), (4096, 512)])
    })
    .unwrap_or_else(|e| panic!("second client: {e}"));
    std::thread::sleep(Duration::from_millis(200));
    d.assert_alive("after a client left with requests in flight");
    read_and_compare(&socket, &o, "third client");
    // One queue this time.
    let p = vec![(0u64, 65536usize)];
    let r = blk_session(&socket, 1, READ_TIMEOUT, move |c| c.read_batch(&p))
        .unwrap_or_else(|e| panic!("fourth client: {e}"));
    assert_eq!(r[0].as_deref().unwrap(), &o[..65536], "fourth client data");
    d.assert_alive("after four clients");
    let st = d.terminate();
    assert!(
        st.success(),
        "qcow2d exited with {st} after SIGTERM, expected 0"
    );
}

#[test]
fn serve_missing_image_fails() {
    let s = Scratch::new("serve_missing");
    let img = s.join("absent.qcow2");
    let f = match Daemon::start_with(&img, &s.socket("q.sock"), &[]) {
        Ok(_) => panic!("qcow2d serve became ready for a missing image"),
        Err(f) => f,
    };
    let st = f
        .status
        .unwrap_or_else(|| panic!("qcow2d serve did not exit: {f}"));
    assert!(!st.success(), "exit status {st}");
    assert!(
        f.stderr.contains("absent.qcow2"),
        "message should name the image: {f}"
    );
}

// ---- serve --config ---------------------------------------------------------------------

#[test]
fn serve_config_file() {
    let s = Scratch::new("config_ok");
    let (img, o) = small_image(&s);
    let socket = s.socket("c.sock");
    let cfg = s.join("qcow2d.toml");
    std::fs::write(
        &cfg,
        format!(
            "# qcow2d test config\n[[export]]\nimage = \"{}\"\nsocket = \"{}\"\nread_only = true\n",
            img.display(),
            socket.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("serve").arg("--config").arg(&cfg);
    let mut d = Daemon::spawn(cmd, &img, &socket).unwrap_or_else(|f| panic!("serve --config: {f}"));
    read_and_compare(&socket, &o, "client of a config-file export");
    d.assert_alive("after a client");
    assert!(d.terminate().success());
}

fn expect_config_error(test: &str, body: impl Fn(&Path, &Path) -> String, key: &str, line: usize) {
    let s = Scratch::new(test);
    let img = s.join("i.qcow2");
    create_qcow2(&img, 16 * MIB, "");
    let socket = s.socket("c.sock");
    let cfg = s.join("bad.toml");
    std::fs::write(&cfg, body(&img, &socket)).unwrap();
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("serve").arg("--config").arg(&cfg);
    let f = match Daemon::spawn(cmd, &img, &socket) {
        Ok(_) => panic!("qcow2d serve accepted a config file with the unknown key {key}"),
        Err(f) => f,
    };
    let st = f
        .status
        .unwrap_or_else(|| panic!("qcow2d serve did not exit: {f}"));
    assert!(!st.success(), "exit status {st}");
    assert!(
        f.stderr.contains(key) && f.stderr.contains(&format!("line {line}")),
        "the error should name the key `{key}` and `line {line}`: {f}"
    );
    assert!(!f.stderr.contains("panicked"), "{f}");
    assert!(
        !socket.exists(),
        "the socket was created despite the bad config"
    );
}

#[test]
fn serve_config_unknown_key_in_export() {
    expect_config_error(
        "config_bad_export",
        |img, sock| {
            format!(
                "# qcow2d test config\n\n[[export]]\nimage = \"{}\"\nsocket = \"{}\"\nbogus_key = 7\n",
                img.display(),
                sock.display()
            )
        },
        "bogus_key",
        6,
    );
}

#[test]
fn serve_config_unknown_top_level_key() {
    expect_config_error(
        "config_bad_top",
        |img, sock| {
            format!(
                "shards = 1\nfrobnicate = true\n[[export]]\nimage = \"{}\"\nsocket = \"{}\"\n",
                img.display(),
                sock.display()
            )
        },
        "frobnicate",
        2,
    );
}

/// `qcow2d check` counts like `qemu-img check`, exits like it, and `--repair` fixes a leak.
#[test]
fn check_reports_and_repairs_a_leak() {
    let s = Scratch::new("check_leak");
    let img = s.join("c.qcow2");
    create_qcow2(&img, 16 * MIB, "");
    qemu_io(&img, "qcow2", &["write -P 0x21 0 1M"]);
    let check = |repair: bool| {
        let mut args: Vec<&OsStr> = vec![OsStr::new("check")];
        if repair {
            args.push(OsStr::new("--repair"));
        }
        args.push(img.as_os_str());
        run_daemon_cmd(&args)
    };
    let out = check(false);
    assert_eq!(
        out.status.code(),
        Some(0),
        "clean image: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.contains("No errors were found"),
        "{}",
        out.stdout
    );

    // One more reference on the refcount of cluster 0 (the header): a leak.
    let table = be64(&img, 48);
    let block = be64(&img, table);
    let v = u16::from_be_bytes(read_bytes(&img, block, 2).try_into().unwrap());
    write_bytes(&img, block, &(v + 1).to_be_bytes());
    let out = check(false);
    assert_eq!(
        out.status.code(),
        Some(3),
        "leak: {}{}",
        out.stdout,
        out.stderr
    );
    let (code, q) = qemu_img_check(&img, None);
    assert_eq!(code, 3, "qemu-img agrees: {q}");
    assert!(out.stdout.contains("1 leaked clusters"), "{}", out.stdout);

    let out = check(true);
    assert_eq!(
        out.status.code(),
        Some(0),
        "repaired: {}{}",
        out.stdout,
        out.stderr
    );
    assert_check_clean(&img, "after qcow2d check --repair");
}
