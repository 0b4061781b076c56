//! The state of an opened image that every shard shares: the chain of layers (a typed qcow2
//! top, then the backing files), the writable state of a writable image and the L2 cache
//! budget; and opening it (the chain resolved, every file validated, locked
//! and opened through `paths.rs`, a dirty image repaired first).
//!
//! Built once on the opening thread and shared through an `Arc` by the front ([`crate::Image`])
//! and every shard; immutable after open but for the L1 entries (see `layer.rs`) and what
//! `write.rs` guards. Only a resize (`resize.rs`), with the image held alone, changes it.

use crate::error::{Error, ErrorKind};
use crate::format::{self, field, incompat};
use crate::io::{BlockingReader, Role};
use crate::layer::{
    data_file_path, file_len, lock_file, open_qcow2, probe_is_qcow2, read_header, resolve_relative,
    KindRef, Layer, LayerKind, LayerRef, Qcow2Layer, TopLayer,
};
use crate::paths::{AllowedRoots, NamedKind};
use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

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
    /// Read and write guest data of the top image (and of its external data file) with
    /// O_DIRECT, bypassing the page cache. Metadata, compressed clusters and backing files
    /// stay buffered, as do data operations that are not aligned for direct I/O. A file
    /// system that refuses O_DIRECT makes [`crate::Image::open`] fail with
    /// [`ErrorKind::Unsupported`]. Flushes still fdatasync.
    pub direct: bool,
    /// Which metadata every write to a writable image is checked against (QEMU's
    /// `overlap-check`); a write that would land on it fails, and the image is marked
    /// corrupt. The allocator never hands out a cluster of that metadata either.
    pub overlap_check: crate::overlap::OverlapCheck,
    /// Directories, besides the top image's own, under which the files an image names
    /// (backing files at any depth, external data files) may lie. Every named file must be a
    /// regular file under one of them, after symlinks and `..` are resolved; see the
    /// `paths` module.
    pub allowed_roots: Vec<PathBuf>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: true,
            lazy_refcounts: false,
            max_backing_depth: 16,
            l2_cache_bytes: None,
            direct: false,
            overlap_check: crate::overlap::OverlapCheck::default(),
            allowed_roots: Vec::new(),
        }
    }
}

/// Upper bound of the default L2 cache (per shard).
const MAX_DEFAULT_L2_CACHE_BYTES: u64 = 1 << 30;

/// See the module documentation.
pub(crate) struct ImageInner {
    /// Layer 0 of the chain, the image served.
    pub top: TopLayer,
    /// Layers 1 and below: the backing chain, top first.
    pub backing: Vec<Layer>,
    pub read_only: bool,
    pub l2_cache_bytes: u64,
    /// Allocation and header state of a writable image (None when read-only).
    pub writable: Option<crate::write::Writable>,
}

impl ImageInner {
    /// The top image and its writable state, for the write paths of a shard (a shard refuses
    /// writes before they reach a read-only image).
    pub(crate) fn writable_top(&self) -> (&Qcow2Layer, &crate::write::Writable) {
        let w = self
            .writable
            .as_ref()
            .expect("writes are refused before they reach a read-only image");
        (&self.top.q, w)
    }

    /// Opens the image at `path` and its whole backing chain.
    pub(crate) fn open(path: &Path, opts: &OpenOptions) -> Result<ImageInner, Error> {
        let mut reader = BlockingReader::new()
            .map_err(|e| Error::io("Cannot create an io_uring (is io_uring enabled?)", e))?;
        let roots = AllowedRoots::new(path, &opts.allowed_roots)?;
        if !opts.read_only {
            repair_if_dirty(path, &mut reader)?;
        }
        let writable = !opts.read_only;
        let file = crate::paths::open_image(path, writable)?;
        let canonical = std::fs::canonicalize(path)
            .map_err(|e| Error::io(format!("Cannot open {}", path.display()), e))?;
        let role = if writable {
            Role::Qcow2Writer
        } else {
            Role::Qcow2Reader
        };
        lock_file(&file, path, role)?;
        let q = open_qcow2(path, file, &mut reader, &roots, !writable, opts.direct)?;
        let mut top = TopLayer {
            path: path.to_path_buf(),
            q,
        };
        let mut seen = HashSet::from([canonical]);
        let backing = open_backing(&top, &mut reader, &roots, &mut seen, opts)?;

        let l2_cache_bytes = match opts.l2_cache_bytes {
            Some(b) => b,
            None => std::iter::once(top.view())
                .chain(backing.iter().map(Layer::view))
                .map(|l| match l.kind {
                    KindRef::Qcow2(q) => q.l1.len() as u64 * q.geom.cluster_size(),
                    KindRef::Raw(_) => 0,
                })
                .sum::<u64>()
                .min(MAX_DEFAULT_L2_CACHE_BYTES),
        };
        let writable = if opts.read_only {
            None
        } else {
            Some(crate::write::open_writable(
                &mut top,
                &mut reader,
                opts.lazy_refcounts,
                opts.overlap_check,
            )?)
        };
        Ok(ImageInner {
            top,
            backing,
            read_only: opts.read_only,
            l2_cache_bytes,
            writable,
        })
    }

    /// Layers in the chain, the top included.
    pub fn layer_count(&self) -> usize {
        1 + self.backing.len()
    }

    /// Layer `index` of the chain (0: the top); `index` must be below [`Self::layer_count`].
    pub fn layer(&self, index: u16) -> LayerRef<'_> {
        match index {
            0 => self.top.view(),
            i => self.backing[usize::from(i) - 1].view(),
        }
    }

    /// Layer `index` of the chain, or `None` past its bottom.
    pub fn get_layer(&self, index: u16) -> Option<LayerRef<'_>> {
        (usize::from(index) < self.layer_count()).then(|| self.layer(index))
    }

    /// Every layer of the chain, the top first.
    pub fn layers(&self) -> impl Iterator<Item = LayerRef<'_>> {
        std::iter::once(self.top.view()).chain(self.backing.iter().map(Layer::view))
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.top.q.header.size
    }

    /// Cluster size of the top image in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.top.q.geom.cluster_size()
    }
}

/// Opens the backing chain of `top`, top first, recording each file in `seen` (a loop is an
/// error) and refusing a chain deeper than `opts.max_backing_depth`.
fn open_backing(
    top: &TopLayer,
    reader: &mut BlockingReader,
    roots: &AllowedRoots,
    seen: &mut HashSet<PathBuf>,
    opts: &OpenOptions,
) -> Result<Vec<Layer>, Error> {
    let path = &top.path;
    let mut layers = Vec::new();
    // The next file of the chain: its path (resolved against the image that names it), that
    // image, and its format.
    let mut next = top.q.header.backing_file.as_ref().map(|name| {
        (
            resolve_relative(path, name),
            path.clone(),
            top.q.header.backing_format.clone(),
        )
    });
    while let Some((p, named_by, format)) = next.take() {
        let (file, canonical) = roots.open_named(NamedKind::Backing, &p, &named_by, false)?;
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
        if layers.len() >= opts.max_backing_depth {
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
            None => probe_is_qcow2(&file, reader)
                .map_err(|e| Error::io(format!("Cannot read {}", p.display()), e))?,
        };
        let role = if is_qcow2 {
            Role::Qcow2Reader
        } else {
            Role::RawBacking
        };
        lock_file(&file, &p, role)?;
        if is_qcow2 {
            // Backing files stay buffered: they are only read, and a base image shared by
            // many overlays is best served from one page cache.
            let q = open_qcow2(&p, file, reader, roots, true, false)?;
            if let Some(name) = &q.header.backing_file {
                next = Some((
                    resolve_relative(&p, name),
                    p.clone(),
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
    Ok(layers)
}

/// Checks that every file the chain of `path` names (backing files at any depth, external
/// data files) is a regular file under the allowed roots of `opts` (the top image's directory
/// and `opts.allowed_roots`), as [`crate::Image::open`] would, opening each without blocking and
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
    // A repair that changes the image's refcount width says so: the operator may have
    // chosen that width.
    for m in report
        .messages
        .iter()
        .filter(|m| m.starts_with("Widened the refcounts"))
    {
        tracing::warn!("{}: {m}", path.display());
    }
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
