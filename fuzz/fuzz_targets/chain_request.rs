//! Descriptor chains and virtio-blk requests: guest memory (up to three regions at
//! fuzzer-chosen addresses, filled with fuzzer bytes) holds a descriptor table; the chain at a
//! fuzzer-chosen head is walked by the daemon's walker and parsed into a request. No panic, no
//! hang, and whatever is accepted is safe to act on: host buffers inside guest memory and as
//! long as the request says, disk ranges inside the disk, status bytes inside guest memory,
//! no write on a read-only export.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use qcow2d::chain::ChainWalker;
use qcow2d::request::{prepare, DeviceInfo, Prepared, Scratch};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

#[derive(Arbitrary, Debug)]
struct Region {
    /// Start, in 4 KiB pages.
    page: u16,
    /// Length, in 4 KiB pages, minus one (taken modulo 16).
    pages: u8,
}

#[derive(Arbitrary, Debug)]
struct Input {
    regions: Vec<Region>,
    /// Descriptor table: guest address.
    table: u32,
    queue_size: u16,
    head: u16,
    capacity_sectors: u32,
    read_only: bool,
    /// Guest memory contents, from the start of the first region on.
    memory: Vec<u8>,
}

fn run(input: Input) {
    let ranges: Vec<(GuestAddress, usize)> = input
        .regions
        .iter()
        .take(3)
        .map(|r| {
            (
                GuestAddress(u64::from(r.page) << 12),
                (usize::from(r.pages % 16) + 1) << 12,
            )
        })
        .collect();
    if ranges.is_empty() {
        return;
    }
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&ranges) else {
        return;
    };
    // The contents, region after region.
    let mut rest = &input.memory[..];
    for &(start, len) in &ranges {
        let n = rest.len().min(len);
        mem.write_slice(&rest[..n], start).unwrap();
        rest = &rest[n..];
    }
    let host: Vec<(usize, usize)> = mem
        .iter()
        .map(|r| {
            let base = r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            (base, base + r.len() as usize)
        })
        .collect();
    let capacity = u64::from(input.capacity_sectors) * 512;
    let dev = DeviceInfo {
        capacity,
        read_only: input.read_only,
        serial: *b"fuzz-serial-12345678",
    };
    let queue_size = input.queue_size.clamp(1, 32768);
    let head = input.head % queue_size;
    let mut walker = ChainWalker::new(&mem, GuestAddress(u64::from(input.table)), queue_size, head);
    let mut scratch = Scratch::new();
    let (prepared, malformed) = prepare(&mut walker, &mem, &dev, &mut scratch);
    let prepared = if walker.error().is_some() {
        prepared.into_ioerr()
    } else {
        prepared
    };
    let in_memory = |a: GuestAddress| mem.address_in_range(a);
    let check_iov = |len: u32| {
        let mut total = 0u64;
        for v in &scratch.iov {
            let (b, l) = (v.iov_base as usize, v.iov_len);
            assert!(
                host.iter().any(|&(s, e)| b >= s && b + l <= e),
                "an iovec outside guest memory: {b:#x}+{l:#x}"
            );
            total += l as u64;
        }
        assert_eq!(total, u64::from(len), "iovecs do not add up to the request");
    };
    let check_disk = |offset: u64, len: u64| {
        assert!(
            offset % 512 == 0 && len % 512 == 0,
            "unaligned {offset:#x}+{len:#x}"
        );
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= capacity),
            "{offset:#x}+{len:#x} past the disk's {capacity:#x} bytes"
        );
    };
    match prepared {
        Prepared::Done { status, .. } => {
            if let Some((at, _)) = status {
                assert!(in_memory(at), "status byte outside memory");
            }
        }
        Prepared::Read {
            offset,
            len,
            status,
        } => {
            assert!(malformed.is_none());
            assert!(in_memory(status));
            check_iov(len);
            check_disk(offset, u64::from(len));
        }
        Prepared::Write {
            offset,
            len,
            status,
        } => {
            assert!(malformed.is_none());
            assert!(!input.read_only, "a write accepted on a read-only export");
            assert!(in_memory(status));
            check_iov(len);
            check_disk(offset, u64::from(len));
        }
        Prepared::Flush { status } => assert!(in_memory(status)),
        Prepared::Discard { status } | Prepared::WriteZeroes { status } => {
            assert!(
                !input.read_only,
                "a discard or write-zeroes accepted on a read-only export"
            );
            assert!(in_memory(status));
            for r in &scratch.ranges {
                check_disk(r.offset, r.len);
            }
        }
    }
}

fuzz_target!(|input: Input| run(input));
