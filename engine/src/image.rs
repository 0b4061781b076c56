//! The front of the engine: [`Image`], an opened image as callers see it. It opens the image
//! (the shared state, `shared.rs`), makes the shards that serve it, reports what it is
//! (`qcow2d info`), and offers blocking reads and writes through a private shard for tools and
//! tests; a resize is in `resize.rs`.
//!
//! Any thread may hold an `Image`; it is a cheap handle on state that shards share.

use crate::error::{Error, ErrorKind};
use crate::format::{self, incompat, FeatureKind};
use crate::layer::KindRef;
use crate::shard::{Shard, ShardConfig};
use crate::shared::ImageInner;
pub use crate::shared::{verify_named_files, OpenOptions};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An opened image; cheap to clone, shared by every shard.
#[derive(Clone)]
pub struct Image {
    pub(crate) inner: Arc<ImageInner>,
}

/// One image of the backing chain, as reported by [`Image::info`].
#[derive(Clone, Debug, Serialize)]
pub struct ChainEntry {
    /// Path as resolved.
    pub filename: String,
    /// "qcow2" or "raw".
    pub format: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
}

/// What `qcow2d info` reports about an image.
#[derive(Clone, Debug, Serialize)]
pub struct ImageInfo {
    /// Path of the top image.
    pub filename: String,
    /// Always "qcow2" for the top image.
    pub format: String,
    /// 2 or 3.
    pub version: u32,
    /// "0.10" for version 2, "1.1" for version 3.
    pub compat: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Compression type of compressed clusters.
    pub compression_type: format::CompressionType,
    /// Incompatible features by name.
    pub incompatible_features: Vec<String>,
    /// Compatible features by name.
    pub compatible_features: Vec<String>,
    /// Autoclear features by name.
    pub autoclear_features: Vec<String>,
    /// Dirty bit set (refcounts may be stale).
    pub dirty: bool,
    /// Corrupt bit set.
    pub corrupt: bool,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// Lazy refcounts enabled.
    pub lazy_refcounts: bool,
    /// External data file, if any.
    pub data_file: Option<String>,
    /// External data file is raw.
    pub data_file_raw: bool,
    /// Number of internal snapshots.
    pub snapshots: u32,
    /// Backing file name as written in the header.
    pub backing_file: Option<String>,
    /// Backing format as written in the header.
    pub backing_format: Option<String>,
    /// The backing chain below the top image, top first.
    pub backing_chain: Vec<ChainEntry>,
}

impl std::fmt::Display for ImageInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        writeln!(f, "image: {}", self.filename)?;
        writeln!(f, "file format: {}", self.format)?;
        writeln!(f, "virtual size: {} bytes", self.virtual_size)?;
        writeln!(f, "cluster_size: {}", self.cluster_size)?;
        writeln!(f, "compat: {} (version {})", self.compat, self.version)?;
        writeln!(f, "refcount bits: {}", self.refcount_bits)?;
        writeln!(
            f,
            "compression type: {}",
            match self.compression_type {
                format::CompressionType::Zlib => "zlib",
                format::CompressionType::Zstd => "zstd",
            }
        )?;
        writeln!(
            f,
            "incompatible features: {}",
            list(&self.incompatible_features)
        )?;
        writeln!(
            f,
            "compatible features: {}",
            list(&self.compatible_features)
        )?;
        writeln!(f, "autoclear features: {}", list(&self.autoclear_features))?;
        writeln!(f, "dirty: {}", self.dirty)?;
        writeln!(f, "corrupt: {}", self.corrupt)?;
        writeln!(f, "extended l2: {}", self.extended_l2)?;
        writeln!(f, "lazy refcounts: {}", self.lazy_refcounts)?;
        if let Some(d) = &self.data_file {
            writeln!(f, "data file: {d} (raw: {})", self.data_file_raw)?;
        }
        writeln!(f, "snapshots: {}", self.snapshots)?;
        if let Some(b) = &self.backing_file {
            write!(f, "backing file: {b}")?;
            if let Some(fmt) = &self.backing_format {
                write!(f, " (format {fmt})")?;
            }
            writeln!(f)?;
        }
        for (i, e) in self.backing_chain.iter().enumerate() {
            writeln!(
                f,
                "backing chain [{}]: {} ({}, {} bytes)",
                i + 1,
                e.filename,
                e.format,
                e.virtual_size
            )?;
        }
        Ok(())
    }
}

impl Image {
    /// Opens the image at `path` and its whole backing chain.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image, Error> {
        Ok(Image {
            inner: Arc::new(ImageInner::open(path.as_ref(), opts)?),
        })
    }

    /// Every file the image was opened from: the top image and its backing files (in chain
    /// order), then external data files. Only the top image and its data file are written.
    pub fn files(&self) -> Vec<PathBuf> {
        let layers = || self.inner.layers();
        let mut files: Vec<PathBuf> = layers().map(|l| l.path.to_path_buf()).collect();
        files.extend(layers().filter_map(|l| match l.kind {
            KindRef::Qcow2(q) => q.data_file_path.clone(),
            KindRef::Raw(_) => None,
        }));
        files
    }

    /// The top image's external data file, if it has one.
    pub fn data_file_path(&self) -> Option<&Path> {
        self.inner.top.q.data_file_path.as_deref()
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    /// Cluster size of the top image in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.inner.cluster_size()
    }

    /// Finishes a writable image cleanly: writes refcounts still in memory and clears the
    /// dirty bit. Call it after every shard has run [`Shard::flush_blocking`] and
    /// [`Shard::release_reserved`]; a no-op for read-only images.
    pub fn close(&self) -> Result<(), Error> {
        match &self.inner.writable {
            Some(w) => crate::write::close(&self.inner.top, w),
            None => Ok(()),
        }
    }

    /// Writes `buf` at `offset` through a private shard, flushes, and closes the image's
    /// state cleanly. For tools and tests.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        let mut shard = self.new_shard(&ShardConfig::default())?;
        shard.write_blocking(buf, offset)?;
        shard.flush_blocking()?;
        shard.release_reserved();
        Ok(())
    }

    /// Creates a shard: an io_uring and caches for one thread. Several shards of a writable
    /// image must be made together, by [`Image::new_shards`].
    pub fn new_shard(&self, config: &ShardConfig) -> Result<Shard, Error> {
        Shard::new(Arc::clone(&self.inner), config, false)
    }

    /// Creates `count` shards (`config.index` is ignored), one per thread. A read-only image's
    /// shards are independent. A writable image's share out its L2 tables: each request may
    /// be submitted to any of them, and the pieces another shard owns are passed to it (see
    /// the `shard` module), so every shard must be polled (on its completion eventfd, which
    /// other shards also write to) for any of them to make progress.
    pub fn new_shards(&self, config: &ShardConfig, count: usize) -> Result<Vec<Shard>, Error> {
        if count == 0 || count > 64 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("{count} shards: between 1 and 64 are supported"),
            ));
        }
        crate::shard::new_shards(&self.inner, config, count)
    }

    /// Reads `buf.len()` bytes at `offset` through a private shard, waiting for the result.
    /// For tools and tests; servers use shards.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let mut shard = self.new_shard(&ShardConfig::default())?;
        shard.read_blocking(buf, offset)
    }

    /// A description of the image for `qcow2d info`.
    pub fn info(&self) -> ImageInfo {
        let h = &self.inner.top.q.header;
        let names = |kind, bits| -> Vec<String> {
            let s = h.feature_list(kind, bits);
            if s.is_empty() {
                Vec::new()
            } else {
                s.split(", ").map(str::to_owned).collect()
            }
        };
        ImageInfo {
            filename: self.inner.top.path.display().to_string(),
            format: "qcow2".into(),
            version: h.version,
            compat: if h.version == 2 { "0.10" } else { "1.1" }.into(),
            virtual_size: h.size,
            cluster_size: h.cluster_size(),
            refcount_bits: h.refcount_bits(),
            compression_type: h.compression_type,
            incompatible_features: names(FeatureKind::Incompatible, h.incompatible_features),
            compatible_features: names(FeatureKind::Compatible, h.compatible_features),
            autoclear_features: names(FeatureKind::Autoclear, h.autoclear_features),
            dirty: h.incompatible_features & incompat::DIRTY != 0,
            corrupt: h.incompatible_features & incompat::CORRUPT != 0,
            extended_l2: h.extended_l2(),
            lazy_refcounts: h.compatible_features & format::compat::LAZY_REFCOUNTS != 0,
            data_file: h.data_file.clone(),
            data_file_raw: h.data_file_raw(),
            snapshots: h.nb_snapshots,
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            backing_chain: self
                .inner
                .layers()
                .skip(1)
                .map(|l| ChainEntry {
                    filename: l.path.display().to_string(),
                    format: match l.kind {
                        KindRef::Qcow2(_) => "qcow2",
                        KindRef::Raw(_) => "raw",
                    }
                    .into(),
                    virtual_size: l.virtual_size,
                })
                .collect(),
        }
    }
}
