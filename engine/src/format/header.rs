//! The QCOW2 header (v2 and v3) and its extensions.
//!
//! Fields are validated in dependency order: magic and version, then the cluster size (every
//! other limit derives from it), then tables, then features and extensions. All arithmetic on
//! values from the file is checked.

use super::{
    autoclear, be32, be64_at, incompat, FormatError, MAX_BACKING_NAME_BYTES, MAX_CLUSTER_BITS,
    MAX_L1_BYTES, MAX_REFCOUNT_TABLE_BYTES, MAX_SNAPSHOTS, MAX_VIRTUAL_SIZE, MIN_CLUSTER_BITS,
};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;

/// Byte offsets of the header's fields: where [`Header::parse`] reads them, and where the
/// writers of a header (opening for writing, flush, resize, repair) patch them.
pub mod field {
    /// `u32`: [`super::MAGIC`].
    pub const MAGIC: usize = 0;
    /// `u32`: 2 or 3.
    pub const VERSION: usize = 4;
    /// `u64`: where the backing file name is.
    pub const BACKING_FILE_OFFSET: usize = 8;
    /// `u32`: length of the backing file name.
    pub const BACKING_FILE_SIZE: usize = 16;
    /// `u32`: log2 of the cluster size.
    pub const CLUSTER_BITS: usize = 20;
    /// `u64`: virtual disk size in bytes.
    pub const SIZE: usize = 24;
    /// `u32`: encryption method.
    pub const CRYPT_METHOD: usize = 32;
    /// `u32`: entries of the active L1 table.
    pub const L1_SIZE: usize = 36;
    /// `u64`: where the active L1 table is.
    pub const L1_TABLE_OFFSET: usize = 40;
    /// `u64`: where the refcount table is.
    pub const REFCOUNT_TABLE_OFFSET: usize = 48;
    /// `u32`: clusters of the refcount table.
    pub const REFCOUNT_TABLE_CLUSTERS: usize = 56;
    /// `u32`: internal snapshots.
    pub const NB_SNAPSHOTS: usize = 60;
    /// `u64`: where the snapshot table is.
    pub const SNAPSHOTS_OFFSET: usize = 64;
    /// `u64` (v3): incompatible feature bits.
    pub const INCOMPATIBLE: usize = 72;
    /// `u64` (v3): compatible feature bits.
    pub const COMPATIBLE: usize = 80;
    /// `u64` (v3): autoclear feature bits.
    pub const AUTOCLEAR: usize = 88;
    /// `u32` (v3): log2 of the refcount width.
    pub const REFCOUNT_ORDER: usize = 96;
    /// `u32` (v3): length of the header.
    pub const HEADER_LENGTH: usize = 100;
    /// `u8` (v3, when the header is longer than 104 bytes): compression type.
    pub const COMPRESSION_TYPE: usize = 104;
}
/// The bytes of the refcount table's offset and size (in clusters), as offsets in the file
/// (the header starts it): what a rebuild of the refcount structure rewrites.
pub const REFCOUNT_TABLE_FIELDS: std::ops::Range<u64> =
    field::REFCOUNT_TABLE_OFFSET as u64..field::REFCOUNT_TABLE_CLUSTERS as u64 + 4;
/// Size of the fixed v2 header.
pub const V2_HEADER_BYTES: usize = 72;
/// Smallest v3 header.
pub const V3_MIN_HEADER_BYTES: usize = 104;

/// Header extension type: end of the extension area.
pub const END_EXT: u32 = 0;
/// Header extension type: backing file format name.
pub const BACKING_FORMAT_EXT: u32 = 0xe279_2aca;
/// Header extension type: feature name table.
pub const FEATURE_NAME_TABLE_EXT: u32 = 0x6803_f857;
/// Header extension type: bitmaps.
pub const BITMAPS_EXT: u32 = 0x2385_2875;
/// Header extension type: full disk encryption header pointer.
pub const CRYPTO_EXT: u32 = 0x0537_be77;
/// Header extension type: external data file name.
pub const DATA_FILE_EXT: u32 = 0x4441_5441;

/// How compressed clusters are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionType {
    /// Raw deflate (RFC 1951), called "zlib" by QEMU.
    Zlib,
    /// Zstandard frames.
    Zstd,
}

/// Which feature bitmap a named feature belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureKind {
    /// `incompatible_features`.
    Incompatible,
    /// `compatible_features`.
    Compatible,
    /// `autoclear_features`.
    Autoclear,
}

/// One entry of the feature name table extension.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FeatureName {
    /// Which bitmap.
    pub kind: FeatureKind,
    /// Bit number, 0..63.
    pub bit: u8,
    /// The name, without trailing NULs.
    pub name: String,
}

/// A header extension as found in the file; unknown ones are kept so that a header rewrite
/// can preserve them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    /// The extension type.
    pub ext_type: u32,
    /// The payload, without padding.
    pub data: Vec<u8>,
}

/// The parsed and validated header of a QCOW2 image.
#[derive(Clone, Debug)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Byte offset of the backing file name, 0 if none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the header in bytes (72 for v2).
    pub header_length: u32,
    /// Compression type of compressed clusters.
    pub compression_type: CompressionType,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// The backing file format from its extension, if any.
    pub backing_format: Option<String>,
    /// The external data file name from its extension, if any.
    pub data_file: Option<String>,
    /// The feature name table, if any.
    pub feature_names: Vec<FeatureName>,
    /// Bitmaps extension: (number of bitmaps, directory size, directory offset).
    pub bitmaps: Option<(u32, u64, u64)>,
    /// Encryption header pointer: (offset, length).
    pub crypto_header: Option<(u64, u64)>,
    /// Every extension in file order, known and unknown.
    pub extensions: Vec<Extension>,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> FormatError {
    FormatError::InvalidField {
        field,
        reason: reason.into(),
    }
}

/// The magic and a supported version (2 or 3), with the bytes version 2's header needs.
fn parse_version(buf: &[u8]) -> Result<u32, FormatError> {
    if buf.len() < 8 {
        return Err(FormatError::Truncated { len: buf.len() });
    }
    let magic = be32(buf, field::MAGIC);
    if magic != MAGIC {
        return Err(FormatError::BadMagic { magic });
    }
    let version = be32(buf, field::VERSION);
    if version != 2 && version != 3 {
        return Err(FormatError::UnsupportedVersion(version));
    }
    if buf.len() < V2_HEADER_BYTES {
        return Err(FormatError::Truncated { len: buf.len() });
    }
    Ok(version)
}

/// The cluster size's bits, within what QEMU accepts, with the first cluster read whole
/// (or the whole file, when shorter).
fn parse_cluster_bits(buf: &[u8], file_len: u64) -> Result<u32, FormatError> {
    let cluster_bits = be32(buf, field::CLUSTER_BITS);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(invalid(
            "cluster_bits",
            format!("{cluster_bits} (cluster size must be 512 B to 2 MiB)"),
        ));
    }
    let cluster_size = 1u64 << cluster_bits;
    if (buf.len() as u64) < cluster_size.min(file_len) {
        return Err(FormatError::Truncated { len: buf.len() });
    }
    Ok(cluster_bits)
}

impl Header {
    /// Bytes a caller reads first from the start of the file: the whole header of an image of
    /// clusters up to 64 KiB (the default), and the cluster size of any image; then
    /// [`Header::bytes_needed`] tells whether more is needed. (Reading the largest possible
    /// first cluster, 2 MiB, every time cost every open and check a 2 MiB buffer.)
    pub const FIRST_READ_BYTES: usize = 64 << 10;

    /// How many bytes from the start of a file of `file_len` bytes parsing its header needs,
    /// given the first bytes `start` read from it: its first cluster, or the whole file when
    /// shorter. When `start` cannot tell (too short, or no valid cluster size), what it holds:
    /// parsing fails on those bytes as it would on more.
    pub fn bytes_needed(start: &[u8], file_len: u64) -> u64 {
        let bits_end = field::CLUSTER_BITS + 4;
        if start.len() < bits_end {
            return start.len() as u64;
        }
        let bits = be32(start, field::CLUSTER_BITS);
        if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            (1u64 << bits).min(file_len).max(start.len() as u64)
        } else {
            start.len() as u64
        }
    }

    /// Parses and validates the header from the first bytes of the file, refusing what QEMU
    /// refuses when it opens an image.
    ///
    /// `buf` holds the start of the file (at least the first cluster, or the whole file when it
    /// is shorter); `file_len` is the file's length. Tables may lie past the end of the file
    /// (QEMU reads zeros there); their offsets must be cluster aligned and their ends
    /// addressable, and their sizes within QEMU's limits.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, FormatError> {
        Self::parse_mode(buf, file_len, false)
    }

    /// Like [`Header::parse`], with the leniency QEMU has when it opens an image to check or
    /// repair it: no refcount table at all (`refcount_table_clusters` = 0) is accepted, and
    /// the snapshot table is not validated here (the check reports and repairs it).
    pub fn parse_for_check(buf: &[u8], file_len: u64) -> Result<Header, FormatError> {
        Self::parse_mode(buf, file_len, true)
    }

    /// Parses in dependency order: magic and version, the cluster size (every other limit
    /// derives from it), the fields of version 2 then of version 3, the refcount width, size
    /// and encryption, the tables, the extensions, the backing file's name, the features.
    fn parse_mode(buf: &[u8], file_len: u64, check: bool) -> Result<Header, FormatError> {
        let version = parse_version(buf)?;
        let cluster_bits = parse_cluster_bits(buf, file_len)?;
        let mut h = Header::v2_fields(buf, version, cluster_bits);
        if version == 3 {
            h.parse_v3_fields(buf)?;
        }
        h.validate_sizes()?;
        h.validate_tables(check)?;
        h.parse_extensions(buf)?;
        h.parse_backing_name(buf)?;
        h.validate_features()?;
        Ok(h)
    }

    /// The fields every version has, and version 2's values of the others.
    fn v2_fields(buf: &[u8], version: u32, cluster_bits: u32) -> Header {
        Header {
            version,
            backing_file_offset: be64_at(buf, field::BACKING_FILE_OFFSET),
            backing_file_size: be32(buf, field::BACKING_FILE_SIZE),
            cluster_bits,
            size: be64_at(buf, field::SIZE),
            crypt_method: be32(buf, field::CRYPT_METHOD),
            l1_size: be32(buf, field::L1_SIZE),
            l1_table_offset: be64_at(buf, field::L1_TABLE_OFFSET),
            refcount_table_offset: be64_at(buf, field::REFCOUNT_TABLE_OFFSET),
            refcount_table_clusters: be32(buf, field::REFCOUNT_TABLE_CLUSTERS),
            nb_snapshots: be32(buf, field::NB_SNAPSHOTS),
            snapshots_offset: be64_at(buf, field::SNAPSHOTS_OFFSET),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_BYTES as u32,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            crypto_header: None,
            extensions: Vec::new(),
        }
    }

    /// Version 3's fields: feature bits, refcount order, header length and compression type.
    fn parse_v3_fields(&mut self, buf: &[u8]) -> Result<(), FormatError> {
        if buf.len() < V3_MIN_HEADER_BYTES {
            return Err(FormatError::Truncated { len: buf.len() });
        }
        self.incompatible_features = be64_at(buf, field::INCOMPATIBLE);
        self.compatible_features = be64_at(buf, field::COMPATIBLE);
        self.autoclear_features = be64_at(buf, field::AUTOCLEAR);
        self.refcount_order = be32(buf, field::REFCOUNT_ORDER);
        self.header_length = be32(buf, field::HEADER_LENGTH);
        let hl = u64::from(self.header_length);
        if hl < V3_MIN_HEADER_BYTES as u64 || hl > self.cluster_size() {
            return Err(invalid(
                "header_length",
                format!("{hl} (must be at least 104 and within the first cluster)"),
            ));
        }
        if hl as usize > buf.len() {
            return Err(FormatError::Truncated { len: buf.len() });
        }
        if self.header_length > 104 {
            self.compression_type = match buf[field::COMPRESSION_TYPE] {
                0 => CompressionType::Zlib,
                1 => CompressionType::Zstd,
                other => {
                    return Err(FormatError::UnsupportedFeature {
                        names: format!("compression type {other}"),
                    })
                }
            };
        }
        let has_bit = self.incompatible_features & incompat::COMPRESSION_TYPE != 0;
        let nonzero = self.compression_type != CompressionType::Zlib;
        if has_bit != nonzero {
            return Err(invalid(
                "compression_type",
                "the compression type field and incompatible bit 3 disagree",
            ));
        }
        Ok(())
    }

    /// The refcount width, the virtual size, and no encryption.
    fn validate_sizes(&self) -> Result<(), FormatError> {
        if self.refcount_order > 6 {
            return Err(invalid(
                "refcount_order",
                format!("{} (at most 6)", self.refcount_order),
            ));
        }
        if self.version == 2 && self.refcount_order != 4 {
            return Err(invalid(
                "refcount_order",
                "version 2 images use 16-bit refcounts",
            ));
        }
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(invalid("size", format!("{} bytes is too large", self.size)));
        }
        if self.crypt_method != 0 {
            return Err(FormatError::Encrypted(self.crypt_method));
        }
        Ok(())
    }

    /// Size of one cluster in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Whether L2 entries are 128 bits with subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTENDED_L2 != 0
    }

    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::EXTERNAL_DATA_FILE != 0
    }

    /// Whether the external data file is a consistent raw image.
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }

    /// Guest bytes covered by one L2 table.
    pub fn l2_coverage_bytes(&self) -> u64 {
        self.l2_entries() * self.cluster_size()
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// L1 entries needed to cover the virtual size.
    pub fn l1_entries_needed(&self) -> u64 {
        self.size.div_ceil(self.l2_coverage_bytes())
    }

    /// Validates table offsets and sizes as QEMU's `qcow2_validate_table` does: a size within
    /// the limit, an aligned offset, and an end that fits in a signed 64-bit offset. Tables
    /// may lie past the end of the file: reads there return zeros, as in QEMU.
    fn validate_tables(&self, check: bool) -> Result<(), FormatError> {
        let cs = self.cluster_size();
        let table = |field: &'static str, off: u64, len: u64| -> Result<(), FormatError> {
            if !off.is_multiple_of(cs) {
                return Err(invalid(
                    field,
                    format!("offset {off:#x} is not cluster aligned"),
                ));
            }
            match off.checked_add(len) {
                Some(end) if end <= i64::MAX as u64 => Ok(()),
                _ => Err(invalid(
                    field,
                    format!("table at {off:#x} of {len} bytes ends past the largest file offset"),
                )),
            }
        };

        if self.refcount_table_clusters == 0 && !check {
            return Err(invalid(
                "refcount_table_clusters",
                "0: the image has no refcount table (qcow2d check --repair rebuilds it)",
            ));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(invalid(
                "refcount_table_clusters",
                format!(
                    "{} clusters exceeds the 8 MiB limit",
                    self.refcount_table_clusters
                ),
            ));
        }
        table(
            "refcount_table_offset",
            self.refcount_table_offset,
            rt_bytes,
        )?;

        if !check {
            // Each snapshot entry is at least 40 bytes; the whole table is checked when it
            // is read.
            if self.nb_snapshots > MAX_SNAPSHOTS {
                return Err(invalid(
                    "nb_snapshots",
                    format!(
                        "{} exceeds the limit of {MAX_SNAPSHOTS} (qcow2d check --repair drops the snapshots past it)",
                        self.nb_snapshots
                    ),
                ));
            }
            table(
                "snapshots_offset",
                self.snapshots_offset,
                u64::from(self.nb_snapshots) * 40,
            )?;
        }

        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(invalid(
                "l1_size",
                format!("{} entries exceeds the 32 MiB limit", self.l1_size),
            ));
        }
        table("l1_table_offset", self.l1_table_offset, l1_bytes)?;
        if u64::from(self.l1_size) < self.l1_entries_needed() {
            return Err(invalid(
                "l1_size",
                format!(
                    "{} entries cannot cover the virtual size of {} bytes",
                    self.l1_size, self.size
                ),
            ));
        }
        Ok(())
    }

    /// Whether the active L1 table lies inside a file of `file_len` bytes. QEMU opens an
    /// image whose L1 table does not, and reads zeros for the guest data it lost; qcow2d
    /// refuses it rather than answer reads with zeros the image never held.
    pub fn l1_in_file(&self, file_len: u64) -> Result<(), FormatError> {
        let (off, len) = (self.l1_table_offset, u64::from(self.l1_size) * 8);
        match off.checked_add(len) {
            Some(end) if end <= file_len => Ok(()),
            _ => Err(invalid(
                "l1_table_offset",
                format!(
                    "the L1 table at {off:#x} of {len} bytes lies past the end of the file ({file_len} bytes)"
                ),
            )),
        }
    }

    /// Whether the L1 and refcount tables lie inside a file of `file_len` bytes. QEMU opens
    /// an image whose refcount table does not (reading zeros past the end); qcow2d reads it
    /// too, but refuses to write it.
    pub fn tables_in_file(&self, file_len: u64) -> Result<(), FormatError> {
        let cs = self.cluster_size();
        let inside = |field: &'static str, off: u64, len: u64| -> Result<(), FormatError> {
            match off.checked_add(len) {
                Some(end) if end <= file_len => Ok(()),
                _ => Err(invalid(
                    field,
                    format!(
                        "table at {off:#x} of {len} bytes lies past the end of the file ({file_len} bytes)"
                    ),
                )),
            }
        };
        inside(
            "l1_table_offset",
            self.l1_table_offset,
            u64::from(self.l1_size) * 8,
        )?;
        inside(
            "refcount_table_offset",
            self.refcount_table_offset,
            u64::from(self.refcount_table_clusters) * cs,
        )
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<(), FormatError> {
        let cs = self.cluster_size() as usize;
        let mut end = cs.min(buf.len());
        if self.backing_file_offset != 0 && (self.backing_file_offset as usize) < end {
            end = self.backing_file_offset as usize;
        }
        let mut off = self.header_length as usize;
        while off + 8 <= end {
            let ext_type = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            if ext_type == END_EXT {
                break;
            }
            let data_start = off + 8;
            let bad = |reason: &'static str| FormatError::InvalidExtension {
                ext_type,
                offset: off,
                reason,
            };
            let data_end = data_start
                .checked_add(len)
                .filter(|&e| e <= end)
                .ok_or_else(|| bad("extends past the header area"))?;
            let data = &buf[data_start..data_end];
            match ext_type {
                BACKING_FORMAT_EXT => {
                    self.backing_format = Some(
                        std::str::from_utf8(data)
                            .map_err(|_| bad("backing format is not UTF-8"))?
                            .trim_end_matches('\0')
                            .to_owned(),
                    );
                }
                DATA_FILE_EXT => {
                    self.data_file = Some(
                        std::str::from_utf8(data)
                            .map_err(|_| bad("data file name is not UTF-8"))?
                            .trim_end_matches('\0')
                            .to_owned(),
                    );
                }
                FEATURE_NAME_TABLE_EXT => {
                    // Whole entries only; QEMU ignores a partial one at the end.
                    for e in data.chunks_exact(48) {
                        let kind = match e[0] {
                            0 => FeatureKind::Incompatible,
                            1 => FeatureKind::Compatible,
                            2 => FeatureKind::Autoclear,
                            _ => continue, // Unknown kinds are ignored, as QEMU does.
                        };
                        let name_bytes = &e[2..];
                        let n = name_bytes.iter().position(|&b| b == 0).unwrap_or(46);
                        self.feature_names.push(FeatureName {
                            kind,
                            bit: e[1],
                            name: String::from_utf8_lossy(&name_bytes[..n]).into_owned(),
                        });
                    }
                }
                BITMAPS_EXT => {
                    if len < 24 {
                        return Err(bad("bitmaps extension shorter than 24 bytes"));
                    }
                    self.bitmaps = Some((be32(data, 0), be64_at(data, 8), be64_at(data, 16)));
                }
                CRYPTO_EXT => {
                    if len < 16 {
                        return Err(bad("encryption header pointer shorter than 16 bytes"));
                    }
                    self.crypto_header = Some((be64_at(data, 0), be64_at(data, 8)));
                }
                _ => {}
            }
            self.extensions.push(Extension {
                ext_type,
                data: data.to_vec(),
            });
            off = data_start + len.next_multiple_of(8);
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, buf: &[u8]) -> Result<(), FormatError> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        if self.backing_file_offset > self.cluster_size() {
            return Err(invalid(
                "backing_file_offset",
                format!(
                    "{:#x} lies outside the first cluster",
                    self.backing_file_offset
                ),
            ));
        }
        if self.backing_file_size > MAX_BACKING_NAME_BYTES {
            return Err(invalid(
                "backing_file_size",
                format!("{} (at most 1023)", self.backing_file_size),
            ));
        }
        if self.backing_file_size == 0 {
            // An empty name: no backing file, as QEMU reads it.
            return Ok(());
        }
        let start = self.backing_file_offset;
        let end = start.checked_add(u64::from(self.backing_file_size));
        let Some(end) = end.filter(|&e| e <= self.cluster_size() && e <= buf.len() as u64) else {
            return Err(invalid(
                "backing_file_offset",
                "the backing file name lies outside the first cluster",
            ));
        };
        // A C string, as QEMU reads it: it ends at the first NUL; an empty one names nothing.
        let bytes = &buf[start as usize..end as usize];
        let bytes = &bytes[..bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len())];
        if bytes.is_empty() {
            return Ok(());
        }
        let name = std::str::from_utf8(bytes)
            .map_err(|_| invalid("backing_file_offset", "backing file name is not UTF-8"))?;
        self.backing_file = Some(name.to_owned());
        Ok(())
    }

    fn validate_features(&self) -> Result<(), FormatError> {
        let unknown = self.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            return Err(FormatError::UnsupportedFeature {
                names: self.feature_list(FeatureKind::Incompatible, unknown),
            });
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(invalid(
                "cluster_bits",
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        if self.has_data_file() && self.data_file.is_none() {
            return Err(invalid(
                "incompatible_features",
                "an external data file is required but the image does not name one",
            ));
        }
        Ok(())
    }

    /// Names the features set in `bits` of bitmap `kind`, using the image's feature name table
    /// where it has an entry and `bit N` otherwise.
    pub fn feature_list(&self, kind: FeatureKind, bits: u64) -> String {
        let mut names = Vec::new();
        for bit in 0..64u8 {
            if bits & (1u64 << bit) == 0 {
                continue;
            }
            let name = self
                .feature_names
                .iter()
                .find(|f| f.kind == kind && f.bit == bit)
                .map(|f| f.name.clone())
                .or_else(|| builtin_feature_name(kind, bit).map(str::to_owned))
                .unwrap_or_else(|| format!("unknown bit {bit}"));
            names.push(name);
        }
        names.join(", ")
    }
}

/// The names QEMU gives to the features the specification defines.
pub fn builtin_feature_name(kind: FeatureKind, bit: u8) -> Option<&'static str> {
    match (kind, bit) {
        (FeatureKind::Incompatible, 0) => Some("dirty bit"),
        (FeatureKind::Incompatible, 1) => Some("corrupt bit"),
        (FeatureKind::Incompatible, 2) => Some("external data file"),
        (FeatureKind::Incompatible, 3) => Some("compression type"),
        (FeatureKind::Incompatible, 4) => Some("extended L2 entries"),
        (FeatureKind::Compatible, 0) => Some("lazy refcounts"),
        (FeatureKind::Autoclear, 0) => Some("bitmaps"),
        (FeatureKind::Autoclear, 1) => Some("raw external data"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 header for a 1 MiB disk with 64 KiB clusters; tables placed in clusters 1..=3.
    fn v3_header() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_be_bytes()); // magic
        b.extend_from_slice(&3u32.to_be_bytes()); // version
        b.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset
        b.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size
        b.extend_from_slice(&16u32.to_be_bytes()); // cluster_bits: 64 KiB
        b.extend_from_slice(&(1u64 << 20).to_be_bytes()); // size: 1 MiB
        b.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
        b.extend_from_slice(&1u32.to_be_bytes()); // l1_size
        b.extend_from_slice(&0x30000u64.to_be_bytes()); // l1_table_offset
        b.extend_from_slice(&0x10000u64.to_be_bytes()); // refcount_table_offset
        b.extend_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
        b.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
        b.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
        b.extend_from_slice(&0u64.to_be_bytes()); // incompatible_features
        b.extend_from_slice(&0u64.to_be_bytes()); // compatible_features
        b.extend_from_slice(&0u64.to_be_bytes()); // autoclear_features
        b.extend_from_slice(&4u32.to_be_bytes()); // refcount_order: 16 bits
        b.extend_from_slice(&112u32.to_be_bytes()); // header_length
        b.extend_from_slice(&[0u8; 8]); // compression_type + padding
        b.resize(0x40000, 0);
        b
    }

    #[test]
    fn bytes_needed_is_the_first_cluster_or_what_was_read() {
        let mut b = v3_header();
        let first = &b[..Header::FIRST_READ_BYTES];
        assert_eq!(Header::bytes_needed(first, 1 << 30), 64 << 10);
        // A shorter file: all of it.
        assert_eq!(Header::bytes_needed(&b[..4096], 4096), 4096);
        put32(&mut b, field::CLUSTER_BITS, 21);
        assert_eq!(Header::bytes_needed(&b[..65536], 1 << 30), 2 << 20);
        assert_eq!(Header::bytes_needed(&b[..65536], 100_000), 100_000);
        put32(&mut b, field::CLUSTER_BITS, 9);
        assert_eq!(Header::bytes_needed(&b[..65536], 1 << 30), 65536);
        // No valid cluster size, or too few bytes to tell: what was read.
        put32(&mut b, field::CLUSTER_BITS, 22);
        assert_eq!(Header::bytes_needed(&b[..65536], 1 << 30), 65536);
        assert_eq!(Header::bytes_needed(&b[..20], 1 << 30), 20);
    }

    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    #[test]
    fn parses_minimal_v3() {
        let b = v3_header();
        let h = Header::parse(&b, b.len() as u64).unwrap();
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.l2_entries(), 8192);
        assert_eq!(h.compression_type, CompressionType::Zlib);
        assert_eq!(h.refcount_bits(), 16);
    }

    #[test]
    fn refuses_bad_magic_and_version() {
        let mut b = v3_header();
        b[0] = b'X';
        assert!(matches!(
            Header::parse(&b, b.len() as u64),
            Err(FormatError::BadMagic { .. })
        ));
        let mut b = v3_header();
        put32(&mut b, 4, 4);
        assert_eq!(
            Header::parse(&b, b.len() as u64).unwrap_err(),
            FormatError::UnsupportedVersion(4)
        );
    }

    #[test]
    fn refuses_out_of_range_cluster_bits() {
        for bits in [8u32, 22, 63, u32::MAX] {
            let mut b = v3_header();
            put32(&mut b, 20, bits);
            assert!(matches!(
                Header::parse(&b, b.len() as u64),
                Err(FormatError::InvalidField {
                    field: "cluster_bits",
                    ..
                })
            ));
        }
    }

    #[test]
    fn names_unknown_incompatible_feature_from_table() {
        let mut b = v3_header();
        put64(&mut b, 72, 1 << 9);
        // Feature name table extension with one entry naming bit 9.
        put32(&mut b, 112, FEATURE_NAME_TABLE_EXT);
        put32(&mut b, 116, 48);
        b[120] = 0; // incompatible
        b[121] = 9; // bit
        b[122..122 + 9].copy_from_slice(b"frobnicat");
        let err = Header::parse(&b, b.len() as u64).unwrap_err();
        assert_eq!(
            err,
            FormatError::UnsupportedFeature {
                names: "frobnicat".into()
            }
        );
    }

    #[test]
    fn unnamed_unknown_feature_says_its_bit() {
        let mut b = v3_header();
        put64(&mut b, 72, 1 << 40);
        let err = Header::parse(&b, b.len() as u64).unwrap_err().to_string();
        assert!(err.contains("unknown bit 40"), "{err}");
    }

    #[test]
    fn backing_name_offset_that_overflows_is_an_error() {
        for offset in [u64::MAX - 0xff, u64::MAX, 0x10000 - 4] {
            let mut b = v3_header();
            put64(&mut b, 8, offset);
            put32(&mut b, 16, 0x100);
            assert!(
                matches!(
                    Header::parse(&b, b.len() as u64),
                    Err(FormatError::InvalidField {
                        field: "backing_file_offset",
                        ..
                    })
                ),
                "offset {offset:#x}"
            );
        }
    }

    #[test]
    fn refuses_encryption() {
        let mut b = v3_header();
        put32(&mut b, 32, 2);
        assert_eq!(
            Header::parse(&b, b.len() as u64).unwrap_err(),
            FormatError::Encrypted(2)
        );
    }

    #[test]
    fn refuses_tables_unaligned_or_unaddressable() {
        let mut b = v3_header();
        put64(&mut b, 40, 0x30200);
        assert!(Header::parse(&b, b.len() as u64).is_err());
        // Past the end of the file: QEMU opens it (reading zeros); qcow2d refuses it.
        let mut b = v3_header();
        put64(&mut b, 40, 0x1_0000_0000);
        let h = Header::parse(&b, b.len() as u64).unwrap();
        assert!(h.tables_in_file(b.len() as u64).is_err());
        assert!(h.l1_in_file(b.len() as u64).is_err());
        let mut b = v3_header();
        put64(&mut b, 40, 0xffff_ffff_ffff_0000);
        assert!(Header::parse(&b, b.len() as u64).is_err());
        // A misaligned snapshot table is refused even when it has no entries, as in QEMU.
        let mut b = v3_header();
        put64(&mut b, 64, 0x1234);
        assert!(Header::parse(&b, b.len() as u64).is_err());
        assert!(Header::parse_for_check(&b, b.len() as u64).is_ok());
        // No refcount table: only a check opens it.
        let mut b = v3_header();
        put32(&mut b, 56, 0);
        assert!(Header::parse(&b, b.len() as u64).is_err());
        assert!(Header::parse_for_check(&b, b.len() as u64).is_ok());
        let mut b = v3_header();
        put32(&mut b, 36, u32::MAX);
        assert!(Header::parse(&b, b.len() as u64).is_err());
        let mut b = v3_header();
        put32(&mut b, 56, u32::MAX);
        assert!(Header::parse(&b, b.len() as u64).is_err());
        let mut b = v3_header();
        put64(&mut b, 24, u64::MAX);
        assert!(Header::parse(&b, b.len() as u64).is_err());
    }

    #[test]
    fn truncated_header_is_an_error() {
        let b = v3_header();
        for len in [0usize, 7, 50, 100] {
            assert!(Header::parse(&b[..len], len as u64).is_err());
        }
    }

    #[test]
    fn keeps_unknown_extensions_and_reads_known_ones() {
        let mut b = v3_header();
        put32(&mut b, 112, BACKING_FORMAT_EXT);
        put32(&mut b, 116, 5);
        b[120..125].copy_from_slice(b"qcow2");
        put32(&mut b, 128, 0x1234_5678);
        put32(&mut b, 132, 3);
        b[136..139].copy_from_slice(b"abc");
        let h = Header::parse(&b, b.len() as u64).unwrap();
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(h.extensions.len(), 2);
        assert_eq!(h.extensions[1].ext_type, 0x1234_5678);
        assert_eq!(h.extensions[1].data, b"abc");
    }

    #[test]
    fn extension_overrunning_the_cluster_is_an_error() {
        let mut b = v3_header();
        put32(&mut b, 112, 0x1234_5678);
        put32(&mut b, 116, u32::MAX);
        assert!(matches!(
            Header::parse(&b, b.len() as u64),
            Err(FormatError::InvalidExtension { .. })
        ));
    }
}
