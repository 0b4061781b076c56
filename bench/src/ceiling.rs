//! The inflate ceiling of a compressed image: how many of its clusters libdeflate inflates per
//! second on one core. A server that inflates every cluster it reads cannot read more clusters
//! per second than that times the cores it runs on; `compare` reports how close qcow2d gets.
//!
//! Reads the image's own compressed extents (a walk of the L1 and L2 tables, through the
//! engine's header parser and entry decoding; 64-bit L2 entries only) and inflates them in a
//! loop on the calling thread, timed by that thread's CPU time: other work
//! on the machine takes turns on the core but does not change what a core can do, so the
//! ceiling stays the same on a busy machine. Runs on the main thread, before any server.

use crate::error::{Context, Error, Result};
use qcow2d_engine::format::{
    be64_at, decode_l1_entry, ClusterMapping, CompressionType, Header, L2Entry, MAX_CLUSTER_BITS,
};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

/// At most this many compressed extents are read (spread over the whole image).
const MAX_SAMPLE_CLUSTERS: usize = 1024;
/// Each of the passes inflates the sample for at least this much CPU time; the best pass
/// counts (the one least disturbed by other work sharing the core's caches).
const PASS_TIME: Duration = Duration::from_millis(700);
const PASSES: usize = 3;

/// libdeflate's rate on the image's clusters.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct InflateRate {
    pub cluster_size_bytes: u64,
    /// Compressed clusters in the sample.
    pub sample_clusters: usize,
    /// Whole clusters inflated per second of one core's CPU time (best pass).
    pub clusters_per_s_per_core: f64,
}

/// What one image's header says about its compressed clusters.
struct Layout {
    cluster_bits: u32,
    l1_entries: u64,
    l1_offset: u64,
}

/// `Ok(None)` for an image whose compressed clusters are not deflate (zstd) or that libdeflate
/// would not see (extended L2 entries are refused too: the bench's images have none).
/// `header` holds the image's first cluster (or the whole file, when shorter), `file_len`
/// bytes long.
fn layout(header: &[u8], file_len: u64) -> Result<Option<Layout>> {
    let h = Header::parse(header, file_len).map_err(|e| Error::msg(e.to_string()))?;
    if h.extended_l2() || h.compression_type != CompressionType::Zlib {
        return Ok(None);
    }
    Ok(Some(Layout {
        cluster_bits: h.cluster_bits,
        l1_entries: u64::from(h.l1_size),
        l1_offset: h.l1_table_offset,
    }))
}

/// The compressed clusters of the image's active L2 tables, as (host offset, length bound).
fn descriptors(file: &File, l: &Layout) -> Result<Vec<(u64, u64)>> {
    let cluster = 1u64 << l.cluster_bits;
    let l1_bytes = usize::try_from(l.l1_entries * 8).context("L1 table size")?;
    let mut l1 = vec![0u8; l1_bytes];
    file.read_exact_at(&mut l1, l.l1_offset)
        .context("Reading the L1 table")?;
    let mut descriptors = Vec::new();
    let mut l2 = vec![0u8; cluster as usize];
    for entry in l1.chunks_exact(8) {
        let table = decode_l1_entry(be64_at(entry, 0), cluster)
            .map_err(|why| Error::msg(format!("L1 entry: {why}")))?;
        let Some(table) = table else {
            continue;
        };
        file.read_exact_at(&mut l2, table)
            .context("Reading an L2 table")?;
        for e in l2.chunks_exact(8) {
            if let Ok(L2Entry {
                mapping: ClusterMapping::Compressed(d),
                ..
            }) = L2Entry::decode(be64_at(e, 0), None, l.cluster_bits, false)
            {
                descriptors.push((d.host_offset, d.max_len));
            }
        }
    }
    Ok(descriptors)
}

/// Reads up to [`MAX_SAMPLE_CLUSTERS`] compressed extents, spread evenly over the image's
/// compressed clusters.
fn sample(file: &File, l: &Layout) -> Result<Vec<Vec<u8>>> {
    let descriptors = descriptors(file, l)?;
    let step = descriptors.len().div_ceil(MAX_SAMPLE_CLUSTERS).max(1);
    let mut extents = Vec::new();
    for &(offset, len) in descriptors.iter().step_by(step) {
        let mut buf = vec![0u8; len as usize];
        // The length is an upper bound: a short read at the end of the file is fine.
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::msg(format!("Reading an extent: {e}"))),
            }
        }
        buf.truncate(got);
        extents.push(buf);
    }
    Ok(extents)
}

/// The image's first cluster, or the whole file when it is shorter (what [`Header::parse`]
/// reads), and the file's length.
fn read_header(file: &File) -> Result<(Vec<u8>, u64)> {
    let file_len = file.metadata().context("Reading the image's size")?.len();
    let len = file_len.min(1 << MAX_CLUSTER_BITS);
    let mut header = vec![0u8; len as usize];
    file.read_exact_at(&mut header, 0)
        .context("Reading the header")?;
    Ok((header, file_len))
}

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Result<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Err(Error::msg(format!(
            "Reading the thread's CPU time: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    ))
}

/// Measures libdeflate on `image`'s compressed clusters; `Ok(None)` when it has none that are
/// deflate-compressed.
pub fn measure(image: &Path) -> Result<Option<InflateRate>> {
    let file = File::open(image).with_context(|| format!("Opening {}", image.display()))?;
    let (header, file_len) = read_header(&file)?;
    let Some(l) = layout(&header, file_len)? else {
        return Ok(None);
    };
    let extents = sample(&file, &l)?;
    if extents.is_empty() {
        return Ok(None);
    }
    let cluster = 1usize << l.cluster_bits;
    let mut out = vec![0u8; cluster];
    let mut d = libdeflater::Decompressor::new();
    // Streams libdeflate refuses (QEMU may write one without a final block) are left out.
    let good: Vec<&Vec<u8>> = extents
        .iter()
        .filter(|e| {
            d.deflate_decompress(e, &mut out)
                .is_ok_and(|n| n == cluster)
        })
        .collect();
    if good.is_empty() {
        return Ok(None);
    }
    let mut best = 0f64;
    for _ in 0..PASSES {
        let start = thread_cpu_time()?;
        let mut done = 0u64;
        let mut spent = Duration::ZERO;
        while spent < PASS_TIME {
            for e in &good {
                // Checked above; the result is only timed.
                let _ = d.deflate_decompress(e, &mut out);
            }
            done += good.len() as u64;
            spent = thread_cpu_time()?.saturating_sub(start);
        }
        best = best.max(done as f64 / spent.as_secs_f64());
    }
    Ok(Some(InflateRate {
        cluster_size_bytes: cluster as u64,
        sample_clusters: good.len(),
        clusters_per_s_per_core: best,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, cluster_bits: u32, incompatible: u64, compression: u8) -> Vec<u8> {
        let mut h = vec![0u8; 112];
        h[..4].copy_from_slice(b"QFI\xfb"); // magic
        h[4..8].copy_from_slice(&version.to_be_bytes()); // version
        h[20..24].copy_from_slice(&cluster_bits.to_be_bytes()); // cluster_bits
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes()); // size
        h[36..40].copy_from_slice(&8u32.to_be_bytes()); // l1_size
        h[40..48].copy_from_slice(&0x30000u64.to_be_bytes()); // l1_table_offset
        h[48..56].copy_from_slice(&0x10000u64.to_be_bytes()); // refcount_table_offset
        h[56..60].copy_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
        if version == 3 {
            h[72..80].copy_from_slice(&incompatible.to_be_bytes()); // incompatible_features
            h[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order
            h[100..104].copy_from_slice(&112u32.to_be_bytes()); // header_length
            h[104] = compression; // compression_type
        }
        h
    }

    fn layout_of(h: &[u8]) -> Result<Option<Layout>> {
        layout(h, h.len() as u64)
    }

    #[test]
    fn headers_say_which_images_are_measured() {
        let l = layout_of(&header(3, 16, 0, 0)).unwrap().unwrap();
        assert_eq!(
            (l.cluster_bits, l.l1_entries, l.l1_offset),
            (16, 8, 0x30000)
        );
        assert!(layout_of(&header(2, 16, 0, 0)).unwrap().is_some());
        // zstd, extended L2: not measured.
        assert!(layout_of(&header(3, 16, 1 << 3, 1)).unwrap().is_none());
        assert!(layout_of(&header(3, 16, 1 << 4, 0)).unwrap().is_none());
        assert!(layout_of(&header(3, 30, 0, 0)).is_err());
        assert!(layout_of(b"not an image").is_err());
    }
}
