//! An opened image: the top QCOW2 file, its external data file, and its backing chain.
//!
//! Opening reads and validates every header and the active L1 table of each qcow2 layer
//! (through a private io_uring, off the data path) and resolves the backing chain. The result
//! is immutable and shared by all shards through an `Arc`.

use crate::error::{Error, ErrorKind};
use crate::format::{self, field, incompat, FeatureKind, Header};
use crate::io::{BlockingReader, DataFd, DioAlign, DirectError, Role};
use crate::meta::Geometry;
use crate::paths::{AllowedRoots, NamedKind};
use crate::shard::{Shard, ShardConfig};
use serde::Serialize;
use std::collections::HashSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// How to open an image.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Open every file read-only; otherwise the top image (and its external data file) is
    /// opened for writing. Backing files are always read-only.
    pub read_only: bool,
    /// Keep refcount updates in memory until a clean close (the image's dirty bit is set
    /// meanwhile); faster allocating writes, a refcount rebuild after a crash.
    pub lazy_refcounts: bool,
    /// Deepest backing chain accepted (the top image is not counted).
    pub max_backing_depth: usize,
    /// Per-shard L2 cache size in bytes, shared by every layer of the backing chain; `None`
    /// covers the whole chain, up to 1 GiB.
    pub l2_cache_bytes: Option<u64>,
    /// Threads that inflate compressed clusters off the shard threads; `None`: one per CPU,
    /// `Some(0)`: shards inflate themselves. Started on the first compressed read, or by
    /// [`Image::start_inflate_workers`].
    pub inflate_threads: Option<usize>,
    /// Read and write guest data of the top image (and of its external data file) with
    /// O_DIRECT, bypassing the page cache. Metadata, compressed clusters and backing files
    /// stay buffered, as do data operations that are not aligned for direct I/O. A file
    /// system that refuses O_DIRECT makes [`Image::open`] fail with
    /// [`ErrorKind::Unsupported`]. Flushes still fdatasync.
    pub direct: bool,
    /// Which metadata every write to a writable image is checked against (QEMU's
    /// `overlap-check`); a write that would land on it fails, and the image is marked
    /// corrupt. The allocator never hands out a cluster of that metadata either.
    pub overlap_check: crate::OverlapCheck,
    /// Directories, besides the top image's own, under which the files an image names
    /// (backing files at any depth, external data files) may lie. Every named file must be a
    /// regular file under one of them, after symlinks and `..` are resolved; see the
    /// `paths` module.
    pub allowed_roots: Vec<PathBuf>,
    /// Called first thing on each inflate worker thread, once its io_uring exists (a caller
    /// that confines its threads installs the worker's filter here).
    pub inflate_thread_start: Option<fn()>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: true,
            lazy_refcounts: false,
            max_backing_depth: 16,
            l2_cache_bytes: None,
            inflate_threads: None,
            direct: false,
            overlap_check: crate::OverlapCheck::default(),
            allowed_roots: Vec::new(),
            inflate_thread_start: None,
        }
    }
}

/// Upper bound of the default L2 cache (per shard).
const MAX_DEFAULT_L2_CACHE_BYTES: u64 = 1 << 30;

/// One qcow2 file of the chain.
pub(crate) struct Qcow2Layer {
    pub header: Header,
    pub geom: Geometry,
    pub file: File,
    pub data_file: Option<File>,
    /// Where `data_file` was opened from.
    pub data_file_path: Option<PathBuf>,
    /// O_DIRECT descriptors (and their alignment) on `file` and `data_file`, guest data only.
    pub file_direct: Option<(File, DioAlign)>,
    pub data_file_direct: Option<(File, DioAlign)>,
    /// The active L1 table, raw entries in native byte order. Atomic because the image is
    /// shared by every shard; each entry is only ever changed by the shard that owns it.
    pub l1: Box<[AtomicU64]>,
    /// The header as read: its first `header_length` bytes, patched and rewritten when a
    /// field changes so that unknown fields and extensions are preserved.
    pub header_bytes: Vec<u8>,
}

impl Qcow2Layer {
    /// The descriptors guest data is read from and written to.
    pub fn data_fd(&self) -> DataFd {
        let (buffered, direct) = match &self.data_file {
            Some(f) => (f, &self.data_file_direct),
            None => (&self.file, &self.file_direct),
        };
        DataFd {
            buffered: buffered.as_raw_fd(),
            direct: direct.as_ref().map(|(f, a)| (f.as_raw_fd(), *a)),
        }
    }
}

pub(crate) enum LayerKind {
    Qcow2(Box<Qcow2Layer>),
    Raw(File),
}

/// One image of the chain; index 0 is the top.
pub(crate) struct Layer {
    pub path: PathBuf,
    /// Bytes the layer covers; reads past it are zeros.
    pub virtual_size: u64,
    pub kind: LayerKind,
}

pub(crate) struct ImageInner {
    pub layers: Vec<Layer>,
    pub read_only: bool,
    pub l2_cache_bytes: u64,
    /// Allocation and header state of a writable image (None when read-only).
    pub writable: Option<crate::write::Writable>,
    inflate_threads: usize,
    inflate_thread_start: Option<fn()>,
    inflate_pool: std::sync::OnceLock<Option<crate::io::InflatePool>>,
}

impl ImageInner {
    /// The inflate workers, started on first use (`None`: shards inflate themselves).
    pub fn inflate_pool(&self) -> Option<&crate::io::InflatePool> {
        self.inflate_pool
            .get_or_init(|| {
                crate::io::InflatePool::new(self.inflate_threads, self.inflate_thread_start)
            })
            .as_ref()
    }
}

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

fn file_len(file: &File, path: &Path) -> Result<u64, Error> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|e| Error::io(format!("Cannot stat {}", path.display()), e))
}

/// Takes the locks a QEMU process takes on a file in `role` (see [`crate::io::Role`]), so
/// that QEMU and qcow2d never both write an image, and refuses a file whose other users
/// conflict.
fn lock_file(file: &File, path: &Path, role: Role) -> Result<(), Error> {
    crate::io::lock_file(file, role).map_err(|e| match e {
        crate::io::LockError::Conflict(why) => Error::new(
            ErrorKind::Locked,
            format!(
                "{}: {why}; is another process using the image?",
                path.display()
            ),
        ),
        crate::io::LockError::Os(e) => Error::io(format!("Cannot lock {}", path.display()), e),
    })
}

/// Opens `path` (already open as `file`) a second time with O_DIRECT, for guest data; `name`
/// is the file's name in messages.
fn open_direct(
    path: &Path,
    name: &Path,
    file: &File,
    writable: bool,
) -> Result<(File, DioAlign), Error> {
    match crate::io::open_direct(path, file, writable) {
        Ok((direct, align, source)) => {
            tracing::info!(
                "{}: direct I/O, alignment {} bytes in memory, {} bytes in the file ({source})",
                name.display(),
                align.mem_bytes,
                align.offset_bytes
            );
            Ok((direct, align))
        }
        Err(DirectError::Unsupported(e)) => Err(Error::with_source(
            ErrorKind::Unsupported,
            format!(
                "Cannot open {} with O_DIRECT: its file system does not support direct I/O \
                 (serve it without direct I/O, or move it)",
                name.display()
            ),
            e,
        )),
        Err(DirectError::Os(e)) => Err(Error::io(
            format!("Cannot open {} with O_DIRECT", name.display()),
            e,
        )),
        Err(DirectError::Replaced) => Err(Error::new(
            ErrorKind::Io,
            format!("{} was replaced while it was being opened", name.display()),
        )),
    }
}

/// Resolves a file name stored in an image against the directory of that image.
fn resolve_relative(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Reads and parses the header of the qcow2 file `file`; also returns the bytes read.
fn read_header(
    file: &File,
    path: &Path,
    reader: &mut BlockingReader,
) -> Result<(Header, Vec<u8>), Error> {
    let len = file_len(file, path)?;
    let mut buf = vec![0u8; (Header::PROBE_BYTES as u64).min(len) as usize];
    reader
        .read_exact_at(file.as_raw_fd(), &mut buf, 0)
        .map_err(|e| Error::io(format!("Cannot read the header of {}", path.display()), e))?;
    let header = Header::parse(&buf, len).map_err(|e| {
        let kind = match e {
            format::FormatError::UnsupportedFeature { .. }
            | format::FormatError::Encrypted(_)
            | format::FormatError::UnsupportedVersion(_) => ErrorKind::Unsupported,
            _ => ErrorKind::InvalidImage,
        };
        Error::with_source(kind, format!("Cannot open {}", path.display()), e)
    })?;
    Ok((header, buf))
}

/// Where the external data file `name` of image `image` is: relative to the image's
/// directory; QEMU opens it relative to its working directory, so that when only it exists.
fn data_file_path(image: &Path, name: &str) -> PathBuf {
    let path = resolve_relative(image, name);
    if !path.exists() && Path::new(name).exists() {
        PathBuf::from(name)
    } else {
        path
    }
}

/// Checks that every file the chain of `path` names (backing files at any depth, external
/// data files) is a regular file under the allowed roots of `opts` (the top image's directory
/// and `opts.allowed_roots`), as [`Image::open`] would, opening each without blocking and
/// reading no more than headers; nothing is locked. The walk stops at a header that does not
/// parse (the image's own check reports it). For tools that read the top image only, such as
/// `check`.
pub fn verify_named_files(path: &Path, opts: &OpenOptions) -> Result<(), Error> {
    let roots = AllowedRoots::new(path, &opts.allowed_roots)?;
    let mut reader = BlockingReader::new()
        .map_err(|e| Error::io("Cannot create an io_uring (is io_uring enabled?)", e))?;
    let mut file = crate::paths::open_image(path, false)?;
    let mut p = path.to_path_buf();
    let mut seen = HashSet::new();
    seen.insert(
        std::fs::canonicalize(path)
            .map_err(|e| Error::io(format!("Cannot open {}", path.display()), e))?,
    );
    for _ in 0..=opts.max_backing_depth {
        let Ok((header, _)) = read_header(&file, &p, &mut reader) else {
            return Ok(());
        };
        if let Some(name) = header
            .data_file
            .as_deref()
            .filter(|_| header.has_data_file())
        {
            roots.open_named(NamedKind::DataFile, &data_file_path(&p, name), &p, false)?;
        }
        let Some(name) = &header.backing_file else {
            return Ok(());
        };
        let next = resolve_relative(&p, name);
        let (f, canonical) = roots.open_named(NamedKind::Backing, &next, &p, false)?;
        if !seen.insert(canonical) {
            return Ok(()); // A loop: opening the image reports it.
        }
        let is_qcow2 = match header.backing_format.as_deref() {
            Some("raw") => false,
            _ => probe_is_qcow2(&f, &mut reader)
                .map_err(|e| Error::io(format!("Cannot read {}", next.display()), e))?,
        };
        if !is_qcow2 {
            return Ok(());
        }
        (file, p) = (f, next);
    }
    Ok(())
}

fn open_qcow2(
    path: &Path,
    file: File,
    reader: &mut BlockingReader,
    roots: &AllowedRoots,
    read_only: bool,
    direct: bool,
) -> Result<Qcow2Layer, Error> {
    let (header, buf) = read_header(&file, path, reader)?;
    let len = file_len(&file, path)?;

    header.l1_in_file(len).map_err(|e| {
        Error::with_source(
            ErrorKind::InvalidImage,
            format!("Cannot open {}", path.display()),
            e,
        )
    })?;
    if !read_only {
        // QEMU opens such an image and reads zeros past the end of the file; qcow2d reads it
        // too, but does not write where the tables it would update are missing.
        header.tables_in_file(len).map_err(|e| {
            Error::with_source(
                ErrorKind::Corrupt,
                format!(
                    "Cannot open {} for writing (serve it read-only, or repair it with qcow2d check --repair)",
                    path.display()
                ),
                e,
            )
        })?;
    }
    let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
    read_zero_filled(reader, &file, &mut l1_bytes, header.l1_table_offset)
        .map_err(|e| Error::io(format!("Cannot read the L1 table of {}", path.display()), e))?;
    // QEMU reads the snapshot table at open and refuses one it cannot use.
    format::read_snapshot_table(
        header.snapshots_offset,
        header.nb_snapshots,
        false,
        false,
        &mut |off, buf| read_zero_filled(reader, &file, buf, off),
    )
    .map_err(|e| match e {
        format::SnapshotReadError::Io(e) => Error::io(
            format!("Cannot read the snapshot table of {}", path.display()),
            e,
        ),
        format::SnapshotReadError::Format(e) => Error::with_source(
            ErrorKind::InvalidImage,
            format!("Cannot open {}", path.display()),
            e,
        ),
    })?;
    let l1: Box<[AtomicU64]> = l1_bytes
        .chunks_exact(8)
        .map(|c| AtomicU64::new(format::be64_at(c, 0)))
        .collect();
    let header_bytes = buf[..header.header_length as usize].to_vec();

    let data_file = match &header.data_file {
        Some(name) if header.has_data_file() => {
            let dpath = data_file_path(path, name);
            let (f, real) = roots.open_named(NamedKind::DataFile, &dpath, path, !read_only)?;
            let role = if read_only {
                Role::DataReader
            } else {
                Role::DataWriter
            };
            lock_file(&f, &dpath, role)?;
            Some((f, dpath, real))
        }
        _ => None,
    };
    // The external data file holds nothing but guest data: direct whatever the cluster size.
    let data_file_direct = match &data_file {
        Some((f, dpath, real)) if direct => Some(
            open_direct(real, dpath, f, !read_only)
                .map_err(|e| e.context(format!("External data file of {}", path.display())))?,
        ),
        _ => None,
    };
    let (data_file, data_path) = match data_file {
        Some((f, _, real)) => (Some(f), Some(real)),
        None => (None, None),
    };
    let file_direct = if !direct || data_file.is_some() {
        None
    } else {
        let min_cluster = crate::io::min_direct_cluster_bytes(&file);
        if header.cluster_size() < min_cluster {
            tracing::warn!(
                "{}: clusters of {} bytes share pages with metadata, which is cached: guest \
                 data stays in the page cache too (direct I/O needs clusters of at least {} \
                 bytes)",
                path.display(),
                header.cluster_size(),
                min_cluster
            );
            None
        } else {
            Some(open_direct(path, path, &file, !read_only)?)
        }
    };
    let geom = Geometry {
        cluster_bits: header.cluster_bits,
        extended_l2: header.extended_l2(),
        has_data_file: header.has_data_file(),
        version2: header.version < 3,
    };
    Ok(Qcow2Layer {
        header,
        geom,
        file,
        data_file,
        data_file_path: data_path,
        file_direct,
        data_file_direct,
        l1,
        header_bytes,
    })
}

/// An image left with the dirty bit (lazy refcounts, not closed cleanly) has stale refcounts:
/// rebuild them before writing, as QEMU does.
fn repair_if_dirty(path: &Path, reader: &mut BlockingReader) -> Result<(), Error> {
    let file = crate::paths::open_image(path, false)?;
    let mut head = [0u8; field::INCOMPATIBLE + 8];
    let n = reader
        .read_at(file.as_raw_fd(), &mut head, 0)
        .map_err(|e| Error::io(format!("Cannot read {}", path.display()), e))?;
    drop(file);
    if n < head.len()
        || format::be32(&head, field::MAGIC) != format::MAGIC
        || format::be32(&head, field::VERSION) < 3
    {
        return Ok(()); // Not a v3 image: Header::parse reports what is wrong.
    }
    if format::be64_at(&head, field::INCOMPATIBLE) & incompat::DIRTY == 0 {
        return Ok(());
    }
    tracing::warn!(
        "{} was not closed cleanly while lazy refcounts were in use; rebuilding its refcounts",
        path.display()
    );
    let report = crate::check::repair_dirty(path)?;
    if report.corruptions > 0 {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "{}: {} corruptions remain after rebuilding the refcounts: {report}",
                path.display(),
                report.corruptions
            ),
        ));
    }
    Ok(())
}

/// Fills `buf` from `offset`; what lies past the end of the file reads as zeros.
fn read_zero_filled(
    reader: &mut BlockingReader,
    file: &File,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), std::io::Error> {
    let mut done = 0usize;
    while done < buf.len() {
        let n = reader.read_at(file.as_raw_fd(), &mut buf[done..], offset + done as u64)?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// Reads the first bytes of a file to decide whether it is qcow2.
fn probe_is_qcow2(file: &File, reader: &mut BlockingReader) -> Result<bool, std::io::Error> {
    let mut magic = [0u8; 4];
    let n = reader.read_at(file.as_raw_fd(), &mut magic, 0)?;
    Ok(n == 4 && u32::from_be_bytes(magic) == format::MAGIC)
}

impl Image {
    /// Opens the image at `path` and its whole backing chain.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image, Error> {
        let path = path.as_ref();
        let mut reader = BlockingReader::new()
            .map_err(|e| Error::io("Cannot create an io_uring (is io_uring enabled?)", e))?;
        let roots = AllowedRoots::new(path, &opts.allowed_roots)?;
        if !opts.read_only {
            repair_if_dirty(path, &mut reader)?;
        }
        let mut layers = Vec::new();
        let mut seen = HashSet::new();
        // The next file of the chain: its path (resolved against the image that names it),
        // that image, and its format.
        let mut next: Option<(PathBuf, Option<PathBuf>, Option<String>)> =
            Some((path.to_path_buf(), None, Some("qcow2".into())));
        while let Some((p, named_by, format)) = next.take() {
            let writable = layers.is_empty() && !opts.read_only;
            let (file, canonical) = match &named_by {
                None => {
                    let file = crate::paths::open_image(&p, writable)?;
                    let canonical = std::fs::canonicalize(&p)
                        .map_err(|e| Error::io(format!("Cannot open {}", p.display()), e))?;
                    (file, canonical)
                }
                Some(by) => roots.open_named(NamedKind::Backing, &p, by, false)?,
            };
            if !seen.insert(canonical) {
                return Err(Error::new(
                    ErrorKind::BackingChain,
                    format!(
                        "Backing chain of {} loops back to {}",
                        path.display(),
                        p.display()
                    ),
                ));
            }
            if layers.len() > opts.max_backing_depth {
                return Err(Error::new(
                    ErrorKind::BackingChain,
                    format!(
                        "Backing chain of {} is deeper than {} images",
                        path.display(),
                        opts.max_backing_depth
                    ),
                ));
            }
            let is_qcow2 = match format.as_deref() {
                Some("qcow2") => true,
                Some("raw") => false,
                Some(other) => {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!(
                            "Backing file {} has unsupported format {other}",
                            p.display()
                        ),
                    ))
                }
                None => probe_is_qcow2(&file, &mut reader)
                    .map_err(|e| Error::io(format!("Cannot read {}", p.display()), e))?,
            };
            let role = match (is_qcow2, writable) {
                (true, true) => Role::Qcow2Writer,
                (true, false) => Role::Qcow2Reader,
                (false, _) => Role::RawBacking,
            };
            lock_file(&file, &p, role)?;
            if is_qcow2 {
                // Backing files stay buffered: they are only read, and a base image shared
                // by many overlays is best served from one page cache.
                let q = open_qcow2(
                    &p,
                    file,
                    &mut reader,
                    &roots,
                    !writable,
                    opts.direct && layers.is_empty(),
                )?;
                if let Some(name) = &q.header.backing_file {
                    next = Some((
                        resolve_relative(&p, name),
                        Some(p.clone()),
                        q.header.backing_format.clone(),
                    ));
                }
                layers.push(Layer {
                    path: p,
                    virtual_size: q.header.size,
                    kind: LayerKind::Qcow2(Box::new(q)),
                });
            } else {
                let len = file_len(&file, &p)?;
                layers.push(Layer {
                    path: p,
                    virtual_size: len,
                    kind: LayerKind::Raw(file),
                });
            }
        }

        let l2_cache_bytes = match opts.l2_cache_bytes {
            Some(b) => b,
            None => layers
                .iter()
                .map(|l| match &l.kind {
                    LayerKind::Qcow2(q) => q.l1.len() as u64 * q.geom.cluster_size(),
                    LayerKind::Raw(_) => 0,
                })
                .sum::<u64>()
                .min(MAX_DEFAULT_L2_CACHE_BYTES),
        };
        let writable = if opts.read_only {
            None
        } else {
            Some(crate::write::open_writable(
                &mut layers[0],
                &mut reader,
                opts.lazy_refcounts,
                opts.overlap_check,
            )?)
        };
        Ok(Image {
            inner: Arc::new(ImageInner {
                layers,
                read_only: opts.read_only,
                l2_cache_bytes,
                writable,
                inflate_threads: opts
                    .inflate_threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
                inflate_thread_start: opts.inflate_thread_start,
                inflate_pool: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Every file the image was opened from: the top image and its backing files (in chain
    /// order), then external data files. Only the top image and its data file are written.
    pub fn files(&self) -> Vec<PathBuf> {
        let layers = &self.inner.layers;
        let mut files: Vec<PathBuf> = layers.iter().map(|l| l.path.clone()).collect();
        files.extend(layers.iter().filter_map(|l| match &l.kind {
            LayerKind::Qcow2(q) => q.data_file_path.clone(),
            LayerKind::Raw(_) => None,
        }));
        files
    }

    /// The top image's external data file, if it has one.
    pub fn data_file_path(&self) -> Option<&Path> {
        self.top().data_file_path.as_deref()
    }

    /// Starts the inflate workers now rather than on the first compressed read, so that the
    /// thread that starts them is the caller (a caller that confines its threads starts them
    /// during set-up).
    pub fn start_inflate_workers(&self) {
        let _ = self.inner.inflate_pool();
    }

    fn top(&self) -> &Qcow2Layer {
        match &self.inner.layers[0].kind {
            LayerKind::Qcow2(q) => q,
            LayerKind::Raw(_) => unreachable!("the top layer is always opened as qcow2"),
        }
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.inner.layers[0].virtual_size
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    /// Cluster size of the top image in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.top().geom.cluster_size()
    }

    /// Finishes a writable image cleanly: writes refcounts still in memory and clears the
    /// dirty bit. Call it after every shard has run [`Shard::flush_blocking`] and
    /// [`Shard::release_reserved`]; a no-op for read-only images.
    pub fn close(&self) -> Result<(), Error> {
        match &self.inner.writable {
            Some(w) => crate::write::close(&self.inner.layers[0], w),
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
        Shard::new(self.clone(), config, false)
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
        let grouped = self.inner.writable.is_some() && count > 1;
        let mut shards = (0..count)
            .map(|index| {
                let c = ShardConfig {
                    index,
                    count,
                    ..config.clone()
                };
                Shard::new(self.clone(), &c, grouped)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if grouped {
            let wakes = shards
                .iter()
                .map(|s| {
                    // SAFETY: the shard's eventfd is open for as long as the shard, which
                    // outlives this borrow.
                    unsafe { std::os::fd::BorrowedFd::borrow_raw(s.completion_fd()) }
                        .try_clone_to_owned()
                        .map_err(|e| Error::io("Cannot duplicate a shard's eventfd", e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let tables = match &self.inner.layers[0].kind {
                LayerKind::Qcow2(q) => q.l1.len(),
                LayerKind::Raw(_) => 0,
            };
            let group = std::sync::Arc::new(crate::shard::Group::new(wakes, tables));
            for s in &mut shards {
                s.join(std::sync::Arc::clone(&group));
            }
        }
        Ok(shards)
    }

    /// Reads `buf.len()` bytes at `offset` through a private shard, waiting for the result.
    /// For tools and tests; servers use shards.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let mut shard = self.new_shard(&ShardConfig::default())?;
        shard.read_blocking(buf, offset)
    }

    /// A description of the image for `qcow2d info`.
    pub fn info(&self) -> ImageInfo {
        let top = self.top();
        let h = &top.header;
        let names = |kind, bits| -> Vec<String> {
            let s = h.feature_list(kind, bits);
            if s.is_empty() {
                Vec::new()
            } else {
                s.split(", ").map(str::to_owned).collect()
            }
        };
        ImageInfo {
            filename: self.inner.layers[0].path.display().to_string(),
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
            backing_chain: self.inner.layers[1..]
                .iter()
                .map(|l| ChainEntry {
                    filename: l.path.display().to_string(),
                    format: match l.kind {
                        LayerKind::Qcow2(_) => "qcow2",
                        LayerKind::Raw(_) => "raw",
                    }
                    .into(),
                    virtual_size: l.virtual_size,
                })
                .collect(),
        }
    }
}
