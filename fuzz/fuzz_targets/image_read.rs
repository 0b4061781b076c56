//! Opens an image whose bytes come from the fuzzer (seeds: small images made by `qemu-img`),
//! describes it and reads it: no panic, no unbounded memory, and two reads of the same range
//! through two shards agree (their buffers filled with two different markers first, so that
//! bytes a read leaves unwritten show as a difference).

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2d_engine::{Image, OpenOptions};
use qcow2d_fuzz::{on_shard, read, scratch_file};

/// Bytes per read.
const CHUNK: u64 = 64 << 10;

thread_local! {
    /// The two read buffers, allocated once (fresh ones cost every execution their
    /// allocation and page faults).
    static BUFFERS: std::cell::RefCell<[Vec<u8>; 2]> =
        std::cell::RefCell::new([vec![0; CHUNK as usize], vec![0; CHUNK as usize]]);
}

fuzz_target!(|data: &[u8]| {
    let path = scratch_file("image.qcow2", data);
    let options = OpenOptions {
        read_only: true,
        l2_cache_bytes: Some(1 << 20),
        ..OpenOptions::default()
    };
    let Ok(image) = Image::open(&path, &options) else {
        return;
    };
    let _ = image.info().to_string();
    let size = image.virtual_size();
    let Ok(mut shards) = image.new_shards(&on_shard(), 2) else {
        return;
    };
    // The first 256 KiB, then eight chunks spread over the disk.
    let mut offsets: Vec<u64> = (0..4).map(|i| i * CHUNK).collect();
    offsets.extend((1..9).map(|i| size / 9 * i / 512 * 512));
    BUFFERS.with_borrow_mut(|[a, b]| {
        for off in offsets {
            if off >= size {
                continue;
            }
            let len = CHUNK.min(size - off) as usize;
            a[..len].fill(0xa5);
            b[..len].fill(0x5a);
            let (first, second) = shards.split_at_mut(1);
            let ok_a = read(&mut first[0], &mut a[..len], off);
            let ok_b = read(&mut second[0], &mut b[..len], off);
            if ok_a && ok_b {
                assert!(
                    a[..len] == b[..len],
                    "two reads at {off:#x} of {len} bytes differ"
                );
            }
        }
    });
    drop(shards);
    let _ = image.close();
});
