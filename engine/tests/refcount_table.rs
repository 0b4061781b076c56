//! The refcount table never grows past what an image may have: QEMU and qcow2d refuse to open
//! an image whose refcount table is larger than 8 MiB, so a write that would need a larger one
//! fails with ENOSPC, and everything written before stays, in an image that opens and checks
//! clean.

use qcow2d_engine::{Image, OpenOptions, ShardConfig};
use qcow2d_tests::{create_qcow2_in, qemu_img, qemu_io_cmd, run_ok};

#[test]
fn refcount_table_growth_stops_at_the_size_an_image_may_have() {
    let dir = tempfile::tempdir().unwrap();
    // 512-byte clusters and 64-bit refcounts: a refcount block describes 64 clusters, so
    // the largest table (1 Mi entries) describes 32 GiB of file.
    let p = create_qcow2_in(
        dir.path(),
        "r.qcow2",
        "cluster_size=512,refcount_bits=64",
        "64M",
    );
    run_ok(qemu_io_cmd().args(["-c", "write -P 0xa5 0 64k"]).arg(&p));
    // A file (sparse) that reaches almost that far: a grown table would have to be placed
    // past its end, beyond what the largest table can describe.
    let limit = (1u64 << 20) * 64 * 512;
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(limit - 100 * 512).unwrap();
    drop(f);

    let img = Image::open(
        &p,
        &OpenOptions {
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap();
    let mut shard = img.new_shard(&ShardConfig::default()).unwrap();
    let new = vec![0x5au8; 4 << 20];
    let again = vec![0x3cu8; 65536];
    let iov = |b: &[u8]| {
        [libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }]
    };
    let mut out = Vec::new();
    // SAFETY: both buffers outlive the requests, which are drained below.
    unsafe {
        shard.submit_write(1, 1 << 20, &iov(&new)).unwrap();
    }
    shard.drain(&mut out);
    // SAFETY: as above.
    unsafe {
        shard.submit_write(2, 0, &iov(&again)).unwrap();
    }
    shard.drain(&mut out);
    shard.submit_flush(3).unwrap();
    shard.drain(&mut out);
    let result = |t: u64| out.iter().find(|c| c.token == t).unwrap().result;
    assert_eq!(
        result(1),
        Err(qcow2d_engine::IoError::Os {
            errno: libc::ENOSPC
        }),
        "a write that needs a larger refcount table fails: {out:?}"
    );
    assert_eq!(result(2), Ok(()), "writes in place go on");
    assert_eq!(result(3), Ok(()), "the image keeps working");
    shard.release_reserved();
    drop(shard);
    img.close().unwrap();
    drop(img);

    // The table is no larger than before, the image opens in QEMU and in qcow2d, checks
    // clean (leaks aside: reservations of the failed write), and holds what was written.
    let mut bytes = [0u8; 104];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&p).unwrap(), &mut bytes, 0)
        .unwrap();
    let rt_clusters = u32::from_be_bytes(bytes[56..60].try_into().unwrap());
    assert!(u64::from(rt_clusters) * 512 <= 8 << 20);
    let json = qemu_img(&["check", "--output=json", p.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    for key in ["corruptions", "check-errors"] {
        assert_eq!(
            v.get(key).and_then(|x| x.as_u64()).unwrap_or(0),
            0,
            "{json}"
        );
    }
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 0).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0x3c),
        "the write in place reads back"
    );
    let out = run_ok(
        qemu_io_cmd()
            .args(["-r", "-c", "read -P 0x3c 0 64k"])
            .arg(&p),
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}
