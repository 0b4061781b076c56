//! Worker threads that inflate compressed clusters off the shard threads.
//!
//! Inflating a 64 KiB cluster costs tens of microseconds: done on a shard, it stalls every
//! other request of that shard and keeps compressed reads to one core. A shard hands the
//! compressed extent and the cache slot to decode into to a worker; the worker inflates and
//! posts the result as a completion into the shard's own io_uring (`IORING_OP_MSG_RING`), so
//! it arrives like any other completion: the shard's eventfd fires and a shard blocked waiting
//! for its ring wakes up. Nothing is shared but the two buffers, which the shard leaves alone
//! until that completion arrives.
//!
//! A cluster goes either into a decompressed-cache slot (engine memory) or, when a read covers
//! the whole cluster with one segment of guest memory, straight into that guest memory
//! ([`Output::Guest`]). Guest memory is shared with a guest that may change it while we
//! inflate: [`ClusterInflater`] writes only inside the segment and never makes a decision on
//! what it finds there. libdeflate gets the segment as a raw pointer (no Rust reference to
//! memory another process writes); its match copies read back earlier output, but a changed
//! byte only changes which bytes land in the segment, never where they go. Streams libdeflate
//! refuses (no final block, longer than a cluster) and zstd streams are decoded into the
//! inflater's own scratch cluster and copied: the rare paths keep one copy, as before. Tests:
//! `tests::guest_changing_its_memory_meanwhile` (a thread scribbling over the segment, guard
//! bytes around it) and `engine/tests/compressed_reads.rs` (both paths give the same bytes).

use crate::format::{CompressionType, InflateError, Inflater};
use io_uring::{opcode, types, IoUring};
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::thread::JoinHandle;

/// Where an inflated cluster goes.
#[derive(Clone, Copy, Debug)]
pub enum Output {
    /// Engine memory (a cache slot) that nobody else reads or writes meanwhile.
    Engine {
        /// First byte.
        ptr: *mut u8,
        /// Bytes: one cluster.
        len: usize,
    },
    /// Guest memory: written only, never read back as trusted; the guest may change it while
    /// we write.
    Guest {
        /// First byte.
        ptr: *mut u8,
        /// Bytes: one cluster.
        len: usize,
    },
    /// Engine memory that nobody else reads or writes meanwhile, for only the first `len`
    /// bytes of a deflate cluster ([`Inflater::inflate_deflate_prefix`]).
    Prefix {
        /// First byte.
        ptr: *mut u8,
        /// Bytes: at most one cluster.
        len: usize,
    },
}

/// One cluster to inflate.
struct Job {
    kind: CompressionType,
    input: *const u8,
    input_len: usize,
    out: Output,
    ring_fd: RawFd,
    user_data: u64,
}

// SAFETY: a job's pointers refer to buffers its submitter keeps valid until the completion
// for `user_data` arrives on `ring_fd`: the input unchanged, engine and prefix output untouched
// by anyone else, guest output valid for writes (the `InflatePool::submit` contract), so the
// worker thread may use them meanwhile.
unsafe impl Send for Job {}

/// The worker threads; dropping the pool lets them finish their jobs and exit.
pub struct InflatePool {
    // Field order is drop order: the sender goes first so the workers' loops end.
    tx: Option<crossbeam::channel::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

/// Result code of a job whose stream did not inflate to a full cluster.
pub const INFLATE_FAILED: i32 = -libc::EBADMSG;

impl InflatePool {
    /// Starts `threads` workers, or returns `None` when `threads` is 0 or the kernel cannot
    /// post completions into another ring (`IORING_OP_MSG_RING`, Linux 5.18).
    /// `on_start` runs first on each worker, once its io_uring exists.
    pub fn new(threads: usize, on_start: Option<fn()>) -> Option<InflatePool> {
        if threads == 0 || !msg_ring_supported() {
            return None;
        }
        let (tx, rx) = crossbeam::channel::bounded::<Job>(1024);
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("qcow2d-inflate-{i}"))
                .spawn(move || worker(rx, on_start));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    tracing::warn!("Cannot start an inflate worker: {e}");
                    break;
                }
            }
        }
        if handles.is_empty() {
            return None;
        }
        Some(InflatePool {
            tx: Some(tx),
            threads: handles,
        })
    }

    /// Queues the inflation of `input` into `out`; its completion arrives on the ring `ring_fd`
    /// with `user_data`, result 0 or [`INFLATE_FAILED`]. Returns false when the pool is
    /// shutting down (the caller inflates itself).
    ///
    /// # Safety
    /// `input` must stay valid and unchanged, and `out` valid for writes (and, for
    /// [`Output::Engine`] and [`Output::Prefix`], untouched by anyone else), until that
    /// completion has been reaped from `ring_fd`, which must stay open until then.
    pub unsafe fn submit(
        &self,
        kind: CompressionType,
        input: &[u8],
        out: Output,
        ring_fd: RawFd,
        user_data: u64,
    ) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        let job = Job {
            kind,
            input: input.as_ptr(),
            input_len: input.len(),
            out,
            ring_fd,
            user_data,
        };
        tx.send(job).is_ok()
    }
}

impl Drop for InflatePool {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `io_uring_register` operation that fills a probe (uapi value, the same on every
/// architecture).
const IORING_REGISTER_PROBE: u8 = 8;

fn msg_ring_supported() -> bool {
    // A ring that can only be probed.
    let probe_op = [IORING_REGISTER_PROBE];
    let Ok(ring) =
        super::ring::build_restricted(&mut IoUring::builder(), 2, &[], &probe_op, |_| Ok(()))
    else {
        return false;
    };
    let mut probe = io_uring::Probe::new();
    if ring.submitter().register_probe(&mut probe).is_err() {
        return false;
    }
    probe.is_supported(opcode::MsgRingData::CODE)
}

fn worker(rx: crossbeam::channel::Receiver<Job>, on_start: Option<fn()>) {
    let mut inflater = ClusterInflater::new();
    let ring = super::ring::build_restricted(
        &mut IoUring::builder(),
        8,
        &super::ring::MSG_RING_OPS,
        &[],
        |_| Ok(()),
    );
    let mut ring = match ring {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("Inflate worker cannot create an io_uring: {e}");
            return;
        }
    };
    if let Some(on_start) = on_start {
        on_start();
    }
    for job in rx {
        // SAFETY: the submitter keeps the input alive and unchanged until the completion posted
        // below has been reaped (InflatePool::submit contract).
        let input = unsafe { std::slice::from_raw_parts(job.input, job.input_len) };
        // SAFETY: the output stays valid for writes, and engine memory untouched by anyone
        // else, until that completion has been reaped (InflatePool::submit contract).
        let result = match unsafe { inflater.inflate(job.kind, input, job.out) } {
            Ok(()) => 0,
            Err(_) => INFLATE_FAILED,
        };
        let entry =
            opcode::MsgRingData::new(types::Fd(job.ring_fd), result, job.user_data, None).build();
        // SAFETY: a MSG_RING entry points at no memory of ours.
        let pushed = unsafe { ring.submission().push(&entry).is_ok() };
        if !pushed {
            tracing::error!("Inflate worker: submission queue full");
            continue;
        }
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    tracing::error!("Inflate worker cannot post a completion: {e}");
                    break;
                }
            }
        }
        for cqe in ring.completion() {
            if cqe.result() < 0 {
                tracing::error!(
                    "Inflate worker: posting a completion failed: {}",
                    std::io::Error::from_raw_os_error(-cqe.result())
                );
            }
        }
    }
}

/// Decodes compressed clusters into engine or guest memory; one per worker thread and one per
/// shard (for inline inflation). Wraps the format layer's [`Inflater`] and adds libdeflate
/// driven through raw pointers for guest memory.
pub struct ClusterInflater {
    /// libdeflate's decompressor, for guest memory.
    raw: NonNull<libdeflate_sys::libdeflate_decompressor>,
    inflater: Inflater,
    /// One cluster, allocated on first use: where the fallback paths decode guest clusters.
    scratch: Vec<u8>,
}

// SAFETY: the libdeflate decompressor is plain heap memory with no thread affinity, used
// through `&mut self` only, so by one thread at a time.
unsafe impl Send for ClusterInflater {}

impl Default for ClusterInflater {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterInflater {
    /// Allocates the decompressors.
    pub fn new() -> Self {
        // SAFETY: no preconditions; returns a new decompressor or null.
        let raw = unsafe { libdeflate_sys::libdeflate_alloc_decompressor() };
        // As for any allocation, running out of memory here is not recoverable (libdeflater's
        // own constructor panics the same way).
        let raw = NonNull::new(raw).expect("libdeflate_alloc_decompressor: out of memory");
        ClusterInflater {
            raw,
            inflater: Inflater::new(),
            scratch: Vec::new(),
        }
    }

    /// Decodes `input` into exactly one cluster at `out`, with the same acceptance rules as
    /// [`Inflater::inflate`] (the result is identical for engine and guest memory), or, for
    /// [`Output::Prefix`], only the first bytes of the cluster.
    ///
    /// On error the bytes at `out` are unspecified (never outside it).
    ///
    /// # Safety
    /// `out` must be valid for writes of its length until this returns; [`Output::Engine`]
    /// and [`Output::Prefix`] memory must not be accessed by anyone else meanwhile.
    /// [`Output::Guest`] memory may be changed by others meanwhile: it is only written.
    pub unsafe fn inflate(
        &mut self,
        kind: CompressionType,
        input: &[u8],
        out: Output,
    ) -> Result<(), InflateError> {
        match out {
            Output::Engine { ptr, len } => {
                // SAFETY: the caller makes `ptr..ptr + len` valid and exclusively ours until we
                // return.
                let out = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
                self.inflater.inflate(kind, input, out)
            }
            // SAFETY: forwarded from the caller.
            Output::Guest { ptr, len } => unsafe { self.inflate_guest(kind, input, ptr, len) },
            Output::Prefix { ptr, len } => {
                // SAFETY: as for engine memory.
                let out = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
                match kind {
                    CompressionType::Zlib => self.inflater.inflate_deflate_prefix(input, out),
                    // Not used for zstd (the shard inflates whole zstd clusters).
                    CompressionType::Zstd => Err(InflateError::BadDeflate),
                }
            }
        }
    }

    /// [`ClusterInflater::inflate`] into guest memory.
    ///
    /// # Safety
    /// `out..out + len` must be valid for writes until this returns.
    unsafe fn inflate_guest(
        &mut self,
        kind: CompressionType,
        input: &[u8],
        out: *mut u8,
        len: usize,
    ) -> Result<(), InflateError> {
        if kind == CompressionType::Zlib {
            let mut produced = 0usize;
            // SAFETY: `self.raw` is our live decompressor; `input` is a valid slice; `out` is
            // valid for writes of `len` bytes (the caller's contract) and libdeflate never
            // writes past `out + len`; `produced` is a valid local.
            let result = unsafe {
                libdeflate_sys::libdeflate_deflate_decompress(
                    self.raw.as_ptr(),
                    input.as_ptr().cast(),
                    input.len(),
                    out.cast(),
                    len,
                    &mut produced,
                )
            };
            if result == libdeflate_sys::libdeflate_result_LIBDEFLATE_SUCCESS {
                return if produced == len {
                    Ok(())
                } else {
                    Err(InflateError::Short {
                        produced,
                        expected: len,
                    })
                };
            }
            // No final block, longer than a cluster, or corrupt: the streaming fallback
            // decides, as for engine memory.
        }
        self.scratch.resize(len, 0);
        self.inflater.inflate(kind, input, &mut self.scratch)?;
        // SAFETY: `out` is valid for writes of `len` bytes (the caller's contract) and cannot
        // overlap `scratch`, our own allocation of `len` bytes.
        unsafe { std::ptr::copy_nonoverlapping(self.scratch.as_ptr(), out, len) };
        Ok(())
    }
}

impl Drop for ClusterInflater {
    fn drop(&mut self) {
        // SAFETY: `raw` came from libdeflate_alloc_decompressor and is freed once, here.
        unsafe { libdeflate_sys::libdeflate_free_decompressor(self.raw.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

    const CLUSTER: usize = 65536;
    /// Bytes around the "guest segment" that must never be written.
    const GUARD: usize = 4096;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i * 7 % 251) as u8 ^ (i >> 12) as u8)
            .collect()
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
        let mut out = vec![0u8; c.deflate_compress_bound(data.len())];
        let n = c.deflate_compress(data, &mut out).unwrap();
        out.truncate(n);
        out
    }

    /// Non-final stored blocks only: libdeflate refuses it, QEMU (and the fallback) accept it.
    fn stored_without_final_block(data: &[u8]) -> Vec<u8> {
        let mut s = Vec::new();
        for chunk in data.chunks(32768) {
            s.push(0b000); // BFINAL=0, BTYPE=00, padded to the byte boundary
            s.extend_from_slice(&(chunk.len() as u16).to_le_bytes());
            s.extend_from_slice(&(!(chunk.len() as u16)).to_le_bytes());
            s.extend_from_slice(chunk);
        }
        s
    }

    /// Inflates into the middle of a guarded buffer as guest memory, and into a plain buffer as
    /// engine memory; both must agree, and the guards must be untouched.
    fn both_ways(kind: CompressionType, input: &[u8]) -> Result<Vec<u8>, InflateError> {
        let mut inflater = ClusterInflater::new();
        let mut guest = vec![0xA5u8; GUARD + CLUSTER + GUARD];
        // SAFETY: the segment lies inside `guest`, which nobody else touches.
        let g = unsafe {
            let ptr = guest.as_mut_ptr().add(GUARD);
            inflater.inflate(kind, input, Output::Guest { ptr, len: CLUSTER })
        };
        assert!(guest[..GUARD].iter().all(|&b| b == 0xA5), "wrote before");
        assert!(
            guest[GUARD + CLUSTER..].iter().all(|&b| b == 0xA5),
            "wrote after"
        );
        let mut engine = vec![0u8; CLUSTER];
        let out = Output::Engine {
            ptr: engine.as_mut_ptr(),
            len: CLUSTER,
        };
        // SAFETY: `engine` is ours alone for the call.
        let e = unsafe { inflater.inflate(kind, input, out) };
        assert_eq!(g, e, "guest and engine memory disagree on the result");
        g.map(|()| {
            assert_eq!(&guest[GUARD..GUARD + CLUSTER], &engine[..]);
            engine
        })
    }

    #[test]
    fn deflate_into_guest_memory_with_trailing_bytes() {
        let data = pattern(CLUSTER);
        let mut comp = deflate(&data);
        // The extent read from disk runs on to the end of its last sector.
        comp.extend_from_slice(&[0x5A; 511]);
        assert_eq!(both_ways(CompressionType::Zlib, &comp).unwrap(), data);
    }

    #[test]
    fn stream_without_final_block_takes_the_fallback() {
        let data = pattern(CLUSTER);
        let s = stored_without_final_block(&data);
        assert_eq!(both_ways(CompressionType::Zlib, &s).unwrap(), data);
    }

    #[test]
    fn zstd_frames_into_guest_memory() {
        let data = pattern(CLUSTER);
        let mut comp = zstd::bulk::compress(&data[..20000], 3).unwrap();
        comp.extend(zstd::bulk::compress(&data[20000..], 3).unwrap());
        comp.extend_from_slice(&[0u8; 100]);
        assert_eq!(both_ways(CompressionType::Zstd, &comp).unwrap(), data);
        let short = zstd::bulk::compress(&data[..20000], 3).unwrap();
        assert!(both_ways(CompressionType::Zstd, &short).is_err());
    }

    #[test]
    fn short_long_and_corrupt_streams() {
        let data = pattern(2 * CLUSTER);
        // Less than a cluster: an error, whichever decoder sees it.
        assert_eq!(
            both_ways(CompressionType::Zlib, &deflate(&data[..CLUSTER - 1])),
            Err(InflateError::Short {
                produced: CLUSTER - 1,
                expected: CLUSTER
            })
        );
        let s = stored_without_final_block(&data[..CLUSTER - 512]);
        assert!(both_ways(CompressionType::Zlib, &s).is_err());
        // More than a cluster: the first cluster, as QEMU reads it (and as the cached path
        // does), never a byte past the segment (both_ways checks the guard).
        let long = both_ways(CompressionType::Zlib, &deflate(&data[..CLUSTER + 4096])).unwrap();
        assert_eq!(long, data[..CLUSTER]);
        for bad in [&[][..], &[0xff; 64][..], &[0x07, 0xff, 0xff, 0xff][..]] {
            assert!(both_ways(CompressionType::Zlib, bad).is_err());
            assert!(both_ways(CompressionType::Zstd, bad).is_err());
        }
    }

    /// A guest that scribbles over the segment while we inflate gets garbage in its own
    /// segment, never a write outside it, and no crash.
    #[test]
    fn guest_changing_its_memory_meanwhile() {
        let data = pattern(CLUSTER);
        let inputs = [
            (CompressionType::Zlib, deflate(&data)),
            (CompressionType::Zlib, stored_without_final_block(&data)),
            (
                CompressionType::Zstd,
                zstd::bulk::compress(&data, 1).unwrap(),
            ),
        ];
        let mem: Vec<AtomicU8> = (0..GUARD + CLUSTER + GUARD)
            .map(|_| AtomicU8::new(0xA5))
            .collect();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    mem[GUARD + i % CLUSTER].store(i as u8, Ordering::Relaxed);
                    i = i.wrapping_add(4099);
                }
            });
            let mut inflater = ClusterInflater::new();
            for _ in 0..20 {
                for (kind, input) in &inputs {
                    let ptr = mem[GUARD].as_ptr();
                    // SAFETY: the segment lies inside `mem`, which outlives the call; the other
                    // thread changes it concurrently, as a guest may.
                    let r = unsafe {
                        inflater.inflate(*kind, input, Output::Guest { ptr, len: CLUSTER })
                    };
                    assert!(r.is_ok(), "{kind:?}: {r:?}");
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        let outside = mem[..GUARD].iter().chain(&mem[GUARD + CLUSTER..]);
        assert!(outside
            .into_iter()
            .all(|b| b.load(Ordering::Relaxed) == 0xA5));
    }
}
