//! Worker threads that inflate compressed clusters off the shard threads.
//!
//! Inflating a 64 KiB cluster costs tens of microseconds: done on a shard, it stalls every
//! other request of that shard and keeps compressed reads to one core. A shard hands the
//! compressed extent and the cache slot to decode into to a worker; the worker inflates and
//! posts the result as a completion into the shard's own io_uring (`IORING_OP_MSG_RING`), so
//! it arrives like any other completion: the shard's eventfd fires and a shard blocked waiting
//! for its ring wakes up. Nothing is shared but the two buffers, which the shard leaves alone
//! until that completion arrives.

use crate::format::{CompressionType, Inflater};
use io_uring::{opcode, types, IoUring};
use std::os::fd::RawFd;
use std::thread::JoinHandle;

/// One cluster to inflate.
struct Job {
    kind: CompressionType,
    input: *const u8,
    input_len: usize,
    out: *mut u8,
    out_len: usize,
    ring_fd: RawFd,
    user_data: u64,
}

// SAFETY: a job's pointers refer to buffers its submitter keeps alive and untouched until the
// completion for `user_data` arrives on `ring_fd` (the `InflatePool::submit` contract), so the
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
    pub fn new(threads: usize) -> Option<InflatePool> {
        if threads == 0 || !msg_ring_supported() {
            return None;
        }
        let (tx, rx) = crossbeam::channel::bounded::<Job>(1024);
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("qcow2d-inflate-{i}"))
                .spawn(move || worker(rx));
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
    /// `input` and `out` must stay valid, and untouched by anyone else, until that completion
    /// has been reaped from `ring_fd`, which must stay open until then.
    pub unsafe fn submit(
        &self,
        kind: CompressionType,
        input: &[u8],
        out: &mut [u8],
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
            out: out.as_mut_ptr(),
            out_len: out.len(),
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

fn msg_ring_supported() -> bool {
    let Ok(ring) = IoUring::new(2) else {
        return false;
    };
    let mut probe = io_uring::Probe::new();
    if ring.submitter().register_probe(&mut probe).is_err() {
        return false;
    }
    probe.is_supported(opcode::MsgRingData::CODE)
}

fn worker(rx: crossbeam::channel::Receiver<Job>) {
    let mut inflater = Inflater::new();
    let mut ring = match IoUring::new(8) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("Inflate worker cannot create an io_uring: {e}");
            return;
        }
    };
    for job in rx {
        // SAFETY: the submitter keeps both buffers alive and untouched until the completion
        // posted below has been reaped (InflatePool::submit contract).
        let (input, out) = unsafe {
            (
                std::slice::from_raw_parts(job.input, job.input_len),
                std::slice::from_raw_parts_mut(job.out, job.out_len),
            )
        };
        let result = match inflater.inflate(job.kind, input, out) {
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
