//! One public error type for the whole crate.
//!
//! Each variant is a kind a caller can match on and carries the context that says
//! where it happened (file, offset, machine). Messages are written for people: what
//! happened, where, and — where there is one — what to do next.

use std::io;
use std::path::PathBuf;

/// The crate-wide result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error, with the operation and the file it touched.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Bytes on disk (or from the network) that do not decode or fail a checksum.
    /// Never served as data.
    #[error("corruption in {} at offset {offset}: {what}", path.display())]
    Corruption {
        path: PathBuf,
        offset: u64,
        what: String,
    },

    /// Bad input from a user or a caller: names, sizes, ranges, arguments.
    #[error("{0}")]
    InvalidInput(String),

    /// A named thing (site, machine, disk, point) that does not exist.
    #[error("{0}")]
    NotFound(String),

    /// Something that was to be created exists already.
    #[error("{0}")]
    AlreadyExists(String),

    /// The site is owned by another process.
    #[error("{0}")]
    Locked(String),

    /// A durability operation failed earlier; after a failed fsync the kernel may have
    /// dropped dirty pages, so nothing written since can be claimed durable.
    #[error(
        "machine {machine} is poisoned: {reason}; no further writes are accepted. \
         Stop the process, check the disk, and reopen (recovery keeps every write \
         that was durable)"
    )]
    Poisoned { machine: String, reason: String },

    /// An I/O request outside the disk: never grows the disk.
    #[error("{what}: range {offset}..{end} is outside the disk ({size} bytes)")]
    OutOfRange {
        what: String,
        offset: u64,
        end: u64,
        size: u64,
    },

    /// A replication chain is broken (a gap, a segment that differs from the one stored
    /// under its number): the replica needs resynchronisation.
    #[error("broken chain: {0}")]
    BrokenChain(String),

    /// A file written by a newer replog, or with incompatible feature bits.
    #[error("unsupported format in {}: {what}", path.display())]
    Unsupported { path: PathBuf, what: String },
}

impl Error {
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub fn corruption(path: impl Into<PathBuf>, offset: u64, what: impl Into<String>) -> Self {
        Error::Corruption {
            path: path.into(),
            offset,
            what: what.into(),
        }
    }

    /// True for errors that say the stored data is damaged.
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corruption { .. })
    }

    /// The errno a FUSE front end should answer with.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Corruption { .. } | Error::Poisoned { .. } | Error::BrokenChain(_) => libc::EIO,
            Error::InvalidInput(_) => libc::EINVAL,
            Error::NotFound(_) => libc::ENOENT,
            Error::AlreadyExists(_) => libc::EEXIST,
            Error::Locked(_) => libc::EBUSY,
            Error::OutOfRange { .. } => libc::ENOSPC,
            Error::Unsupported { .. } => libc::EOPNOTSUPP,
        }
    }
}
