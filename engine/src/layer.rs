//! One opened file of an image's chain: a qcow2 file (header, active L1 table, descriptors,
//! external data file) or a raw backing file, and what opening one takes (reading and
//! validating its header, locking it as QEMU does, O_DIRECT descriptors).
//!
//! Runs at open time on the opening thread, through a private blocking io_uring. Once open,
//! a layer is immutable but for its L1 entries (atomics, each changed only by the shard that
//! owns it) and is shared by every shard through the image's shared state (`shared.rs`).

use crate::error::{Error, ErrorKind};
use crate::format::{self, Header};
use crate::io::{BlockingReader, DataFd, DioAlign, DirectError, Role};
use crate::meta::Geometry;
use crate::paths::{AllowedRoots, NamedKind};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

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

impl Drop for Qcow2Layer {
    /// The locks go as the layer goes, not when the kernel lets go of the descriptions.
    fn drop(&mut self) {
        crate::io::unlock_file(&self.file);
        if let Some(f) = &self.data_file {
            crate::io::unlock_file(f);
        }
    }
}

/// What a backing file is.
pub(crate) enum LayerKind {
    Qcow2(Box<Qcow2Layer>),
    Raw(File),
}

/// A backing file: layer 1 and below of the chain.
pub(crate) struct Layer {
    pub path: PathBuf,
    /// Bytes the layer covers; reads past it are zeros.
    pub virtual_size: u64,
    pub kind: LayerKind,
}

impl Drop for Layer {
    /// A raw backing file's locks go as the layer goes (a qcow2 layer's go with it).
    fn drop(&mut self) {
        if let LayerKind::Raw(f) = &self.kind {
            crate::io::unlock_file(f);
        }
    }
}

/// The top image: layer 0 of the chain, always qcow2 (its virtual size is its header's).
pub(crate) struct TopLayer {
    pub path: PathBuf,
    pub q: Qcow2Layer,
}

/// A view of one layer of the chain, the top or a backing file.
#[derive(Clone, Copy)]
pub(crate) struct LayerRef<'a> {
    pub path: &'a Path,
    /// Bytes the layer covers; reads past it are zeros.
    pub virtual_size: u64,
    pub kind: KindRef<'a>,
}

/// What a layer of the chain is.
#[derive(Clone, Copy)]
pub(crate) enum KindRef<'a> {
    Qcow2(&'a Qcow2Layer),
    Raw(&'a File),
}

impl TopLayer {
    /// The top as a layer of the chain.
    pub fn view(&self) -> LayerRef<'_> {
        LayerRef {
            path: &self.path,
            virtual_size: self.q.header.size,
            kind: KindRef::Qcow2(&self.q),
        }
    }
}

impl Layer {
    /// The backing file as a layer of the chain.
    pub fn view(&self) -> LayerRef<'_> {
        LayerRef {
            path: &self.path,
            virtual_size: self.virtual_size,
            kind: match &self.kind {
                LayerKind::Qcow2(q) => KindRef::Qcow2(q),
                LayerKind::Raw(f) => KindRef::Raw(f),
            },
        }
    }
}

pub(crate) fn file_len(file: &File, path: &Path) -> Result<u64, Error> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|e| Error::io(format!("Cannot stat {}", path.display()), e))
}

/// Takes the locks a QEMU process takes on a file in `role` (see [`crate::io::Role`]), so
/// that QEMU and qcow2d never both write an image, and refuses a file whose other users
/// conflict.
pub(crate) fn lock_file(file: &File, path: &Path, role: Role) -> Result<(), Error> {
    crate::io::lock_file(file, role).map_err(|e| match e {
        crate::io::LockError::Conflict(why) => Error::new(
            ErrorKind::Locked,
            format!(
                "{}: {why}; is another process using the image?",
                path.display()
            ),
        ),
        crate::io::LockError::GuestData(why) => {
            Error::new(ErrorKind::Locked, format!("{}: {why}", path.display()))
        }
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
pub(crate) fn resolve_relative(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Reads and parses the header of the qcow2 file `file`; also returns the bytes read.
pub(crate) fn read_header(
    file: &File,
    path: &Path,
    reader: &mut BlockingReader,
) -> Result<(Header, Vec<u8>), Error> {
    let len = file_len(file, path)?;
    let read_err = |e| Error::io(format!("Cannot read the header of {}", path.display()), e);
    let mut buf = vec![0u8; (Header::FIRST_READ_BYTES as u64).min(len) as usize];
    reader
        .read_exact_at(file.as_raw_fd(), &mut buf, 0)
        .map_err(read_err)?;
    let have = buf.len();
    let need = Header::bytes_needed(&buf, len) as usize;
    if need > have {
        buf.resize(need, 0);
        reader
            .read_exact_at(file.as_raw_fd(), &mut buf[have..], have as u64)
            .map_err(read_err)?;
    }
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
pub(crate) fn data_file_path(image: &Path, name: &str) -> PathBuf {
    let path = resolve_relative(image, name);
    if !path.exists() && Path::new(name).exists() {
        PathBuf::from(name)
    } else {
        path
    }
}

/// Opens qcow2 file `file` (at `path`): its header, L1 table and snapshot table read and
/// checked, its external data file opened and locked, and with `direct` its O_DIRECT
/// descriptors.
pub(crate) fn open_qcow2(
    path: &Path,
    file: File,
    reader: &mut BlockingReader,
    roots: &AllowedRoots,
    read_only: bool,
    direct: bool,
) -> Result<Qcow2Layer, Error> {
    let (header, buf) = read_header(&file, path, reader)?;
    let len = file_len(&file, path)?;
    check_tables_in_file(&header, len, path, read_only)?;
    let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
    read_zero_filled(reader, &file, &mut l1_bytes, header.l1_table_offset)
        .map_err(|e| Error::io(format!("Cannot read the L1 table of {}", path.display()), e))?;
    check_snapshot_table(&header, &file, path, reader)?;
    let l1: Box<[AtomicU64]> = l1_bytes
        .chunks_exact(8)
        .map(|c| AtomicU64::new(format::be64_at(c, 0)))
        .collect();
    let header_bytes = buf[..header.header_length as usize].to_vec();

    let data_file = open_data_file(&header, path, roots, read_only)?;
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
        open_file_direct(&header, &file, path, read_only)?
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

/// Refuses an image whose L1 table is past the end of its file (`len` bytes), and, for
/// writing, one whose other tables are.
fn check_tables_in_file(
    header: &Header,
    len: u64,
    path: &Path,
    read_only: bool,
) -> Result<(), Error> {
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
    Ok(())
}

/// Reads the snapshot table as QEMU does at open, which refuses one it cannot use.
fn check_snapshot_table(
    header: &Header,
    file: &File,
    path: &Path,
    reader: &mut BlockingReader,
) -> Result<(), Error> {
    format::check_snapshot_table(
        header.snapshots_offset,
        header.nb_snapshots,
        &mut |off, buf| read_zero_filled(reader, file, buf, off),
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
    Ok(())
}

/// The external data file the header names, if the image has one: opened (under the allowed
/// roots) and locked, with the path it was named by and its real path.
fn open_data_file(
    header: &Header,
    path: &Path,
    roots: &AllowedRoots,
    read_only: bool,
) -> Result<Option<(File, PathBuf, PathBuf)>, Error> {
    let Some(name) = header.data_file.as_ref().filter(|_| header.has_data_file()) else {
        return Ok(None);
    };
    let dpath = data_file_path(path, name);
    let (f, real) = roots.open_named(NamedKind::DataFile, &dpath, path, !read_only)?;
    let role = if read_only {
        Role::DataReader
    } else {
        Role::DataWriter
    };
    lock_file(&f, &dpath, role)?;
    Ok(Some((f, dpath, real)))
}

/// The image file's O_DIRECT descriptor, unless its clusters are smaller than direct I/O
/// needs (they would share pages with metadata, which is cached).
fn open_file_direct(
    header: &Header,
    file: &File,
    path: &Path,
    read_only: bool,
) -> Result<Option<(File, DioAlign)>, Error> {
    let min_cluster = crate::io::min_direct_cluster_bytes(file);
    if header.cluster_size() < min_cluster {
        tracing::warn!(
            "{}: clusters of {} bytes share pages with metadata, which is cached: guest \
             data stays in the page cache too (direct I/O needs clusters of at least {} \
             bytes)",
            path.display(),
            header.cluster_size(),
            min_cluster
        );
        return Ok(None);
    }
    Ok(Some(open_direct(path, path, file, !read_only)?))
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
pub(crate) fn probe_is_qcow2(
    file: &File,
    reader: &mut BlockingReader,
) -> Result<bool, std::io::Error> {
    let mut magic = [0u8; 4];
    let n = reader.read_at(file.as_raw_fd(), &mut magic, 0)?;
    Ok(n == 4 && u32::from_be_bytes(magic) == format::MAGIC)
}
