//! The engine's one public error type.
//!
//! [`Error`] carries a matchable [`ErrorKind`], a message that names what failed (path, offset,
//! field) and an optional source. Per-layer error enums (such as
//! [`crate::format::FormatError`]) become its source where a caller knows what failed
//! ([`Error::with_source`], [`Error::io`] for an OS error); there are no blanket `From`
//! conversions, so every error says which file or structure it is about. [`IoError`] is the
//! cheap, `Copy` cause attached to a failed request on the data path, where nothing may
//! allocate.

use std::fmt;

/// What kind of failure an [`Error`] is, for callers that react differently to each.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The operating system failed an I/O operation.
    Io,
    /// The file is not a valid image (bad magic, field out of range, truncated).
    InvalidImage,
    /// The image uses a feature this engine does not implement.
    Unsupported,
    /// The image's metadata contradicts itself (bad L2 entry, undecodable compressed data).
    Corrupt,
    /// A write was attempted on a read-only image.
    ReadOnly,
    /// A request lies outside the virtual disk or is misaligned.
    OutOfRange,
    /// The backing chain is broken: missing file, loop, or too deep.
    BackingChain,
    /// Another process holds the image.
    Locked,
    /// An image names a file it may not use: outside the allowed directories, or not a
    /// regular file.
    NotAllowed,
    /// A caller passed an invalid argument or configuration.
    InvalidArgument,
}

/// An engine error: a kind, a message and an optional cause.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// Creates an error of `kind` with `message` and no source.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Creates an error of `kind` with `message`, caused by `source`.
    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error {
            kind,
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// Wraps an OS error with a message naming what was being done.
    pub fn io(message: impl Into<String>, source: std::io::Error) -> Self {
        Error::with_source(ErrorKind::Io, message, source)
    }

    /// The matchable kind of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Prefixes the message with context (for example the path of the image that failed).
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Why one request failed; small and `Copy` so the data path never allocates for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoError {
    /// The OS failed a read or write on a file of the image, with this errno.
    Os {
        /// The positive errno value.
        errno: i32,
    },
    /// The request touched metadata that is corrupt (details are logged once).
    Corrupt {
        /// The host offset of the structure that failed to decode.
        host_offset: u64,
    },
    /// A compressed cluster did not inflate to a full cluster.
    BadCompressedCluster {
        /// The host offset of the compressed extent.
        host_offset: u64,
    },
    /// The image is read-only.
    ReadOnly,
}

impl IoError {
    /// The failure of an OS call (EIO when the error carries no errno).
    pub(crate) fn os(e: &std::io::Error) -> IoError {
        IoError::Os {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::Os { errno } => {
                write!(f, "{}", std::io::Error::from_raw_os_error(*errno))
            }
            IoError::Corrupt { host_offset } => {
                write!(f, "Corrupt metadata at host offset {host_offset:#x}")
            }
            IoError::BadCompressedCluster { host_offset } => write!(
                f,
                "Compressed cluster at host offset {host_offset:#x} does not inflate to a full cluster"
            ),
            IoError::ReadOnly => f.write_str("Image is read-only"),
        }
    }
}

impl std::error::Error for IoError {}
