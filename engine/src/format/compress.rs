//! Decompression of compressed clusters.
//!
//! QEMU's "zlib" clusters are raw deflate streams (no zlib header). libdeflate decodes them
//! fastest, but it refuses a stream that fills the cluster without a final block, which QEMU
//! accepts; those fall back to miniz_oxide's streaming inflater. zstd clusters may hold
//! several frames; decoding stops once the cluster is full. The compressed extent read from
//! disk is only an upper bound, so input past the end of the stream is ignored.
//!
//! A zstd frame names the window its decoder must keep. A cluster is at most 2 MiB, so no
//! frame of a cluster needs more than [`ZSTD_WINDOW_LOG_MAX`]; a frame that asks for a larger
//! window (up to 2 GiB by the format) is refused rather than allocated for.

use super::CompressionType;
use thiserror::Error;

/// Why a compressed cluster could not be decoded into a full cluster.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InflateError {
    /// The stream is not valid deflate data.
    #[error("Invalid deflate stream")]
    BadDeflate,
    /// The stream is not valid zstd data.
    #[error("Invalid zstd stream: {0}")]
    BadZstd(&'static str),
    /// The stream ended before filling the cluster.
    #[error("Stream ended after {produced} of {expected} bytes")]
    Short {
        /// Bytes produced.
        produced: usize,
        /// Bytes needed: the cluster size.
        expected: usize,
    },
}

/// log2 of the largest zstd window a cluster's frame may ask for: 2 MiB, the largest cluster.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 21;

/// Reusable decompression state; one per shard (not shared between threads).
pub struct Inflater {
    deflate: libdeflater::Decompressor,
    fallback: Box<miniz_oxide::inflate::core::DecompressorOxide>,
    zstd: Option<zstd::stream::raw::Decoder<'static>>,
}

impl Default for Inflater {
    fn default() -> Self {
        Self::new()
    }
}

impl Inflater {
    /// Creates decompressors for both compression types (the zstd context lazily).
    pub fn new() -> Self {
        Inflater {
            deflate: libdeflater::Decompressor::new(),
            fallback: Box::default(),
            zstd: None,
        }
    }

    /// Decodes `input` into exactly `out.len()` bytes (one cluster).
    pub fn inflate(
        &mut self,
        kind: CompressionType,
        input: &[u8],
        out: &mut [u8],
    ) -> Result<(), InflateError> {
        match kind {
            CompressionType::Zlib => self.inflate_deflate(input, out),
            CompressionType::Zstd => self.inflate_zstd(input, out),
        }
    }

    /// Decodes the first `out.len()` bytes of a deflate cluster (at most one cluster) and
    /// stops there, with miniz_oxide's streaming inflater: the exact number of bytes, whether
    /// or not the stream has a final block or goes on. A read of the start of a cluster needs
    /// no more, and inflation costs in proportion to the output. What a stream holds past the
    /// prefix is not looked at: damage there is not reported. Also the fallback for streams
    /// libdeflate refuses.
    pub fn inflate_deflate_prefix(
        &mut self,
        input: &[u8],
        out: &mut [u8],
    ) -> Result<(), InflateError> {
        use miniz_oxide::inflate::core::{decompress, inflate_flags};
        use miniz_oxide::inflate::TINFLStatus;
        self.fallback.init();
        let (status, _consumed, produced) = decompress(
            &mut self.fallback,
            input,
            out,
            0,
            inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
        );
        if produced == out.len() {
            return Ok(());
        }
        match status {
            TINFLStatus::Done | TINFLStatus::NeedsMoreInput | TINFLStatus::HasMoreOutput => {
                Err(InflateError::Short {
                    produced,
                    expected: out.len(),
                })
            }
            _ => Err(InflateError::BadDeflate),
        }
    }

    fn inflate_deflate(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), InflateError> {
        match self.deflate.deflate_decompress(input, out) {
            Ok(n) if n == out.len() => return Ok(()),
            Ok(n) => {
                return Err(InflateError::Short {
                    produced: n,
                    expected: out.len(),
                })
            }
            // A stream without a final block that fills the cluster, or a corrupt one: let
            // the streaming inflater decide.
            Err(_) => {}
        }
        self.inflate_deflate_prefix(input, out)
    }

    fn inflate_zstd(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), InflateError> {
        use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
        let decoder = match &mut self.zstd {
            Some(d) => d,
            None => {
                let mut d =
                    Decoder::new().map_err(|_| InflateError::BadZstd("cannot create a context"))?;
                // Kept across the session resets below.
                d.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(
                    ZSTD_WINDOW_LOG_MAX,
                ))
                .map_err(|_| InflateError::BadZstd("cannot limit the window"))?;
                self.zstd.insert(d)
            }
        };
        decoder
            .reinit()
            .map_err(|_| InflateError::BadZstd("cannot reset the context"))?;
        let mut src = InBuffer::around(input);
        let mut dst = OutBuffer::around(out);
        loop {
            if dst.pos() == dst.capacity() {
                return Ok(());
            }
            if src.pos == src.src.len() {
                break;
            }
            let before = (src.pos, dst.pos());
            let hint = decoder
                .run(&mut src, &mut dst)
                .map_err(|_| InflateError::BadZstd("corrupt frame"))?;
            if hint == 0 {
                // A frame ended; the next one (if any) starts at src.pos.
                decoder
                    .reinit()
                    .map_err(|_| InflateError::BadZstd("cannot reset the context"))?;
                // Zero padding after the last frame is not a frame: stop there.
                if src.src[src.pos..].iter().all(|&b| b == 0) {
                    break;
                }
            } else if before == (src.pos, dst.pos()) {
                break;
            }
        }
        let produced = dst.pos();
        if produced == out.len() {
            Ok(())
        } else {
            Err(InflateError::Short {
                produced,
                expected: out.len(),
            })
        }
    }
}

/// One-shot convenience around [`Inflater::inflate`] for tools and tests.
pub fn inflate_cluster(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), InflateError> {
    Inflater::new().inflate(kind, input, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn deflate_roundtrip_with_trailing_garbage() {
        let data = pattern(65536);
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
        let mut comp = vec![0u8; c.deflate_compress_bound(data.len())];
        let n = c.deflate_compress(&data, &mut comp).unwrap();
        comp.truncate(n);
        comp.extend_from_slice(&[0xAB; 300]);
        let mut out = vec![0u8; 65536];
        inflate_cluster(CompressionType::Zlib, &comp, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn deflate_stream_without_final_block_that_fills_the_cluster() {
        // A stored (uncompressed) non-final block of exactly 4096 bytes, with no final block
        // after it: libdeflate refuses it, QEMU accepts it.
        let data = pattern(4096);
        let mut s = vec![0b000u8]; // BFINAL=0, BTYPE=00 (stored), padded to the byte boundary
        s.extend_from_slice(&(4096u16).to_le_bytes());
        s.extend_from_slice(&(!4096u16).to_le_bytes());
        s.extend_from_slice(&data);
        let mut out = vec![0u8; 4096];
        inflate_cluster(CompressionType::Zlib, &s, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn prefix_of_a_deflate_cluster() {
        // Compresses to about two thirds, so half the stream holds well over 1 KiB of output.
        let data: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (i / 7) as u8)
            .collect();
        let comp = miniz_oxide::deflate::compress_to_vec(&data, 6);
        let mut inf = Inflater::new();
        for n in [1usize, 511, 4096, 30000, 65536] {
            let mut out = vec![0u8; n];
            inf.inflate_deflate_prefix(&comp, &mut out).unwrap();
            assert_eq!(out, data[..n], "prefix of {n} bytes");
        }
        // Cut in the middle: a prefix before the cut inflates, one past it does not.
        let cut = &comp[..comp.len() / 2];
        let mut small = vec![0u8; 1024];
        inf.inflate_deflate_prefix(cut, &mut small).unwrap();
        assert_eq!(small, data[..1024]);
        let mut big = vec![0u8; 65536];
        assert!(inf.inflate_deflate_prefix(cut, &mut big).is_err());
        // Garbage is an error, not a panic.
        assert!(inf.inflate_deflate_prefix(&[0xff; 64], &mut small).is_err());
    }

    #[test]
    fn short_or_corrupt_deflate_is_an_error() {
        let data = pattern(1000);
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
        let mut comp = vec![0u8; c.deflate_compress_bound(data.len())];
        let n = c.deflate_compress(&data, &mut comp).unwrap();
        let mut out = vec![0u8; 4096];
        assert!(matches!(
            inflate_cluster(CompressionType::Zlib, &comp[..n], &mut out),
            Err(InflateError::Short { produced: 1000, .. })
        ));
        assert!(inflate_cluster(CompressionType::Zlib, &[0xff; 64], &mut out).is_err());
        assert!(inflate_cluster(CompressionType::Zlib, &[], &mut out).is_err());
    }

    #[test]
    fn zstd_several_frames_and_padding() {
        let data = pattern(65536);
        let mut comp = zstd::bulk::compress(&data[..30000], 3).unwrap();
        comp.extend(zstd::bulk::compress(&data[30000..], 3).unwrap());
        comp.extend_from_slice(&[0u8; 200]);
        let mut out = vec![0u8; 65536];
        inflate_cluster(CompressionType::Zstd, &comp, &mut out).unwrap();
        assert_eq!(out, data);
        // One frame short of a cluster.
        let comp = zstd::bulk::compress(&data[..30000], 3).unwrap();
        assert!(inflate_cluster(CompressionType::Zstd, &comp, &mut out).is_err());
        assert!(inflate_cluster(CompressionType::Zstd, &[0x55; 100], &mut out).is_err());
    }

    /// Compresses `data` as one zstd frame without a content size, whose header asks for a
    /// window of 2^`window_log` bytes.
    fn zstd_frame_with_window(data: &[u8], window_log: u32) -> Vec<u8> {
        use zstd::stream::raw::{CParameter, Encoder, InBuffer, Operation, OutBuffer};
        let mut enc = Encoder::new(3).unwrap();
        enc.set_parameter(CParameter::WindowLog(window_log))
            .unwrap();
        enc.set_parameter(CParameter::ContentSizeFlag(false))
            .unwrap();
        let mut out = vec![0u8; data.len() + 1024];
        let mut dst = OutBuffer::around(&mut out[..]);
        let mut src = InBuffer::around(data);
        while src.pos < data.len() {
            enc.run(&mut src, &mut dst).unwrap();
        }
        while enc.finish(&mut dst, true).unwrap() > 0 {}
        let n = dst.pos();
        out.truncate(n);
        out
    }

    #[test]
    fn a_zstd_frame_asking_for_a_window_larger_than_a_cluster_is_refused() {
        let data = pattern(65536);
        let mut out = vec![0u8; 65536];
        let fits = zstd_frame_with_window(&data, ZSTD_WINDOW_LOG_MAX);
        inflate_cluster(CompressionType::Zstd, &fits, &mut out).unwrap();
        assert_eq!(out, data);
        // The same data in a frame that asks for a 1 GiB window: no decoder that large.
        let huge = zstd_frame_with_window(&data, 30);
        assert_eq!(
            inflate_cluster(CompressionType::Zstd, &huge, &mut out),
            Err(InflateError::BadZstd("corrupt frame"))
        );
        // The decoder is still good for the next cluster.
        inflate_cluster(CompressionType::Zstd, &fits, &mut out).unwrap();
        assert_eq!(out, data);
    }
}
