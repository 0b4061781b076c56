//! Comparing reads against the oracle: read plans, first-difference reports, and reading a
//! whole image through the engine (`Image::read_at`).

use crate::*;
use std::path::Path;

/// `None` when equal; otherwise a report of the first differing byte.
pub fn first_difference(
    what: &str,
    settings: &str,
    offset: u64,
    expected: &[u8],
    actual: &[u8],
) -> Option<String> {
    if expected == actual {
        return None;
    }
    if expected.len() != actual.len() {
        return Some(format!(
            "{what}: read at {offset:#x} returned {} bytes, expected {} [image: {settings}]",
            actual.len(),
            expected.len()
        ));
    }
    let i = expected
        .iter()
        .zip(actual)
        .position(|(a, b)| a != b)
        .unwrap();
    let end = (i + 16).min(expected.len());
    let ndiff = expected.iter().zip(actual).filter(|(a, b)| a != b).count();
    Some(format!(
        "{what}: MISMATCH at guest offset {:#x} (read of {} bytes at {offset:#x}, {ndiff} bytes \
         differ)\n  expected {:02x?}\n  actual   {:02x?}\n  image: {settings}",
        offset + i as u64,
        expected.len(),
        &expected[i..end],
        &actual[i..end],
    ))
}

/// One read of a plan: (guest offset, length).
pub type ReadReq = (u64, usize);

/// Whole-disk reads in 1 MiB chunks, then odd-sized reads at odd (512-aligned) offsets, reads
/// straddling cluster boundaries, the first and the last sector.
pub fn read_plan(size: u64, cluster_size: u64, seed: u64) -> Vec<ReadReq> {
    assert_eq!(
        size % 512,
        0,
        "virtual size {size} is not a multiple of 512"
    );
    let mut v = Vec::new();
    let mut off = 0;
    while off < size {
        let len = MIB.min(size - off);
        v.push((off, len as usize));
        off += len;
    }
    let sectors = size / 512;
    let mut rng = Rng::new(seed);
    for _ in 0..40 {
        let s = rng.below(sectors);
        let n = 1 + rng.below((sectors - s).min(2047));
        v.push((s * 512, (n * 512) as usize));
    }
    let clusters = size.div_ceil(cluster_size);
    for _ in 0..16 {
        let k = 1 + rng.below(clusters.max(2) - 1);
        let start = (k * cluster_size).saturating_sub(512 * (1 + rng.below(3)));
        if start < size {
            let len = (512 * (2 + rng.below(6))).min(size - start);
            v.push((start, len as usize));
        }
    }
    v.push((0, 512));
    v.push((size - 512, 512));
    v
}

/// Checks a plan's results against the oracle; the first mismatch or error.
pub(crate) fn check_results(
    what: &str,
    settings: &str,
    oracle: &[u8],
    plan: &[ReadReq],
    results: &[Result<Vec<u8>, String>],
) -> Result<(), String> {
    for ((off, len), r) in plan.iter().zip(results) {
        let start = *off as usize;
        match r {
            Err(e) => {
                return Err(format!(
                    "{what}: read of {len} bytes at {off:#x} FAILED: {e} [image: {settings}]"
                ))
            }
            Ok(data) => {
                if let Some(m) =
                    first_difference(what, settings, *off, &oracle[start..start + len], data)
                {
                    return Err(m);
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The engine
// ---------------------------------------------------------------------------------------------

/// Opens the image with default options, in a thread with a timeout.
pub fn engine_open(img: &Path) -> Result<qcow2d_engine::Image, String> {
    let p = img.to_path_buf();
    try_with_timeout("Image::open", OPEN_TIMEOUT, move || {
        qcow2d_engine::Image::open(&p, &qcow2d_engine::OpenOptions::default())
            .map_err(|e| error_chain(&e))
    })?
}

/// Display of an error followed by its `source()` chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(" <- caused by: ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Reads `plan` with `Image::read_at`.
pub fn engine_read_plan(
    img: &Path,
    plan: &[ReadReq],
) -> Result<Vec<Result<Vec<u8>, String>>, String> {
    engine_read_plan_with(img, plan, qcow2d_engine::OpenOptions::default())
}

/// Reads `plan` with `Image::read_at`, the image opened with `opts`.
pub fn engine_read_plan_with(
    img: &Path,
    plan: &[ReadReq],
    opts: qcow2d_engine::OpenOptions,
) -> Result<Vec<Result<Vec<u8>, String>>, String> {
    let p = img.to_path_buf();
    let plan = plan.to_vec();
    try_with_timeout("engine read_at", READ_TIMEOUT, move || {
        let image = qcow2d_engine::Image::open(&p, &opts)
            .map_err(|e| format!("Image::open failed: {}", error_chain(&e)))?;
        Ok(plan
            .iter()
            .map(|&(off, len)| {
                let mut buf = vec![0u8; len];
                image
                    .read_at(&mut buf, off)
                    .map(|()| buf)
                    .map_err(|e| format!("{:?}: {}", e.kind(), error_chain(&e)))
            })
            .collect())
    })?
}

/// Opens the image with the engine and compares every read of a plan with the oracle.
pub fn check_engine(img: &Path, settings: &str, oracle: &[u8]) -> Result<(), String> {
    let (size, cluster) = {
        let image = engine_open(img).map_err(|e| format!("engine: Image::open failed: {e}"))?;
        (image.virtual_size(), image.cluster_size())
    };
    if size != oracle.len() as u64 {
        return Err(format!(
            "engine: virtual_size() = {size}, qemu-img says {} [image: {settings}]",
            oracle.len()
        ));
    }
    let plan = read_plan(size, cluster, 1);
    let results = engine_read_plan(img, &plan).map_err(|e| format!("engine: {e}"))?;
    check_results("engine read_at", settings, oracle, &plan, &results)
}
