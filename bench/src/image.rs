//! `make-image`: the benchmark images, made by qemu-img so that their layout is QEMU's own.
//! `compressed` and `allocated` hold the same seeded data (every 4 KiB: half random bytes, half
//! a repeated phrase, so each 64 KiB cluster deflates to roughly half), compressed clusters or
//! plain ones; `empty` has no data clusters at all. Runs on the main thread.

use crate::error::{Context, Error, Result};
use crate::rng::SplitMix64;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

const CLUSTER_SIZE_BYTES: u64 = 64 << 10;
/// The unit of the fill pattern: its first half is random, its second half compresses away.
const FILL_BLOCK_BYTES: usize = 4096;
const WRITE_CHUNK_BYTES: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageKind {
    /// Every cluster compressed (qemu-img convert -c).
    Compressed,
    /// Every cluster allocated, uncompressed.
    Allocated,
    /// No cluster allocated (qemu-img create).
    Empty,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

/// Removes a temporary file when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn make_image(
    out: &Path,
    size_bytes: u64,
    kind: ImageKind,
    compression: CompressionType,
    seed: u64,
) -> Result<()> {
    if size_bytes == 0 || size_bytes % 512 != 0 {
        return Err(Error::msg(format!(
            "Image size {size_bytes} must be a non-zero multiple of 512"
        )));
    }
    let mut options = format!("cluster_size={CLUSTER_SIZE_BYTES}");
    if kind == ImageKind::Compressed {
        options.push_str(match compression {
            CompressionType::Zlib => ",compression_type=zlib",
            CompressionType::Zstd => ",compression_type=zstd",
        });
    }
    if kind == ImageKind::Empty {
        return qemu_img(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-o", &options])
                .arg(out)
                .arg(size_bytes.to_string()),
        );
    }

    let mut raw_name = out.as_os_str().to_owned();
    raw_name.push(".raw.tmp");
    let raw = TempFile(PathBuf::from(raw_name));
    write_fill(&raw.0, size_bytes, seed)?;
    let mut command = Command::new("qemu-img");
    command.args(["convert", "-q", "-f", "raw", "-O", "qcow2"]);
    if kind == ImageKind::Compressed {
        command.arg("-c");
    }
    command.args(["-o", &options]).arg(&raw.0).arg(out);
    qemu_img(&mut command)
}

fn qemu_img(command: &mut Command) -> Result<()> {
    let output = command.output().context("Running qemu-img")?;
    if !output.status.success() {
        return Err(Error::msg(format!(
            "qemu-img failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// Writes `size_bytes` of the semi-compressible pattern to a new raw file.
fn write_fill(path: &Path, size_bytes: u64, seed: u64) -> Result<()> {
    let file = File::create(path).with_context(|| format!("Creating {}", path.display()))?;
    let mut writer = BufWriter::with_capacity(WRITE_CHUNK_BYTES, file);
    let mut rng = SplitMix64::new(seed);
    let mut chunk = vec![0u8; WRITE_CHUNK_BYTES];
    let mut left = size_bytes;
    while left > 0 {
        fill_semi_compressible(&mut rng, &mut chunk);
        let n = usize::try_from(left.min(WRITE_CHUNK_BYTES as u64)).unwrap_or(WRITE_CHUNK_BYTES);
        writer
            .write_all(&chunk[..n])
            .with_context(|| format!("Writing {}", path.display()))?;
        left -= n as u64;
    }
    writer
        .into_inner()
        .map_err(|e| Error::msg(format!("Flushing {}: {}", path.display(), e.error())))?
        .sync_all()
        .with_context(|| format!("Syncing {}", path.display()))
}

/// Per 4 KiB: 2 KiB of random bytes, then a random 16-byte phrase repeated over 2 KiB.
fn fill_semi_compressible(rng: &mut SplitMix64, buf: &mut [u8]) {
    for block in buf.chunks_mut(FILL_BLOCK_BYTES) {
        let half = block.len() / 2;
        let (random, repeated) = block.split_at_mut(half);
        rng.fill(random);
        let mut phrase = [0u8; 16];
        rng.fill(&mut phrase);
        for (byte, &p) in repeated.iter_mut().zip(phrase.iter().cycle()) {
            *byte = p;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_deterministic_and_half_random() {
        let mut a = vec![0u8; 8192];
        let mut b = vec![0u8; 8192];
        fill_semi_compressible(&mut SplitMix64::new(1), &mut a);
        fill_semi_compressible(&mut SplitMix64::new(1), &mut b);
        assert_eq!(a, b);
        // The second half of each block repeats with period 16.
        assert_eq!(a[2048..2064], a[2064..2080]);
        assert_ne!(a[0..16], a[16..32]);
    }
}
