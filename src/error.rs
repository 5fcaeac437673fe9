//! One public error type for the whole crate.
//!
//! Each variant is a kind a caller can match on and carries the context that says
//! where it happened (file, offset, machine, peer). Messages are written for people:
//! what happened, where, and — where there is one — what to do next.
//!
//! What to do about an error is decided by its kind, never by its message:
//! [`Error::class`] says whether an operation is retried later ([`ErrorClass::Retry`]),
//! mended by resynchronisation ([`ErrorClass::NeedsResync`]) or stopped until an
//! operator acts ([`ErrorClass::Critical`]). The shipping loop, the resync, the
//! receiver's refusals ([`Error::refusal_code`]) and the command line all use it.

use std::io;
use std::path::PathBuf;

pub use crate::replication::protocol::RefusalCode;

/// The crate-wide result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A local operating-system I/O error, with the operation and the file it touched.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A network error talking to a peer site (connect, send, receive), with the
    /// peer's address.
    #[error("{op} {peer}: {source}")]
    Net {
        op: &'static str,
        peer: String,
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

    /// Writes to the machine are refused for now (a failover is taking it over, or
    /// it was failed over): EROFS to a guest.
    #[error("machine {machine} does not take writes: {reason}")]
    Fenced { machine: String, reason: String },

    /// The machine was closed (removed, or reopened after a change) while a request
    /// for it was in flight: look it up again.
    #[error("machine {machine} was closed (removed, or reopened after a change)")]
    Closed { machine: String },

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

    /// Bytes no copy of which is left: damaged at the source and lost at the replica
    /// too. Nothing retries its way out; an operator must decide.
    #[error("data lost: {0}")]
    Lost(String),

    /// A replica that neither a resync nor its initial copy can bring along (an
    /// initial copy whose base the source's parents have left). An operator must act.
    #[error("replica cannot continue: {0}")]
    Unmendable(String),

    /// A file written by a newer replog, or with incompatible feature bits.
    #[error("unsupported format in {}: {what}", path.display())]
    Unsupported { path: PathBuf, what: String },

    /// The peer site refused what this site asked for, saying why (its `Error` frame).
    #[error("{peer} refused ({}): {message}", code.as_str())]
    Refused {
        peer: String,
        code: RefusalCode,
        message: String,
    },

    /// TLS authentication failed: the peer refused this site's certificate
    /// (`by_peer`), or this site refused the peer's (not trusted: `replog trust` pins
    /// sites on both ends).
    #[error("TLS authentication with {peer} failed: {why}")]
    Auth {
        peer: String,
        why: String,
        by_peer: bool,
    },

    /// The session with the peer went wrong: a frame that does not decode, a message
    /// out of place or out of range. Nothing of it was applied; a new session starts
    /// over (retried), and health says why meanwhile.
    #[error("protocol error with {peer}: {what}")]
    Protocol { peer: String, what: String },

    /// The peer speaks another protocol version, or lacks a feature this needs: no
    /// new session will do better.
    #[error("{peer} is incompatible: {what}")]
    Incompatible { peer: String, what: String },

    /// Something this needs is in use (a merge, readers of a replica); try later.
    #[error("{0}")]
    Busy(String),

    /// There is not enough room where the data must go.
    #[error("no space: {0}")]
    NoSpace(String),

    /// The object store that keeps replicas (S3) failed a request: `transient` when
    /// it was unreachable, slow or busy (retry), otherwise refused for good (wrong
    /// credentials, no such bucket, written by another receiver). Never carries the
    /// credentials.
    #[error("replica store {store}: {what}")]
    Store {
        store: String,
        what: String,
        transient: bool,
    },
}

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorClass {
    /// Recoverable (network, no space, busy): retry on the schedule, health Warning.
    Retry,
    /// The replication chain is broken or the data damaged: resynchronise.
    NeedsResync,
    /// Non-recoverable (trust, protocol, a replica in an invalid state, bad input):
    /// stop and tell an operator; health Critical.
    Critical,
}

/// An error as it crosses a thread or the control socket: its class, the refusal
/// code when a peer refused, and the message. [`Failure::into_error`] gives back an
/// `Error` of the same class (and code), so callers on the far side decide as the
/// near side would.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    pub class: ErrorClass,
    pub code: Option<RefusalCode>,
    pub message: String,
}

impl Failure {
    pub fn of(e: &Error) -> Failure {
        Failure {
            class: e.class(),
            code: match e {
                Error::Refused { code, .. } => Some(*code),
                Error::Fenced { .. } => Some(RefusalCode::Fenced),
                _ => None,
            },
            message: e.to_string(),
        }
    }

    /// A temporary condition (paused, waiting for a window): retry later.
    pub fn retry(message: impl Into<String>) -> Failure {
        Failure {
            class: ErrorClass::Retry,
            code: None,
            message: message.into(),
        }
    }

    pub fn into_error(self, peer: &str) -> Error {
        match (self.class, self.code) {
            (_, Some(code)) => Error::Refused {
                peer: peer.to_string(),
                code,
                message: self.message,
            },
            (ErrorClass::Retry, None) => Error::Busy(self.message),
            (ErrorClass::NeedsResync, None) => Error::BrokenChain(self.message),
            (ErrorClass::Critical, None) => Error::InvalidInput(self.message),
        }
    }
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

    pub fn protocol(peer: impl Into<String>, what: impl Into<String>) -> Self {
        Error::Protocol {
            peer: peer.into(),
            what: what.into(),
        }
    }

    /// True for errors that say the stored data is damaged.
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corruption { .. })
    }

    /// Retry, resynchronise, or stop: see [`ErrorClass`].
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Io { .. }
            | Error::Net { .. }
            | Error::Busy(_)
            | Error::NoSpace(_)
            | Error::Closed { .. }
            | Error::Protocol { .. }
            | Error::Store {
                transient: true, ..
            } => ErrorClass::Retry,
            Error::Store { .. } => ErrorClass::Critical,
            Error::Corruption { .. } | Error::BrokenChain(_) => ErrorClass::NeedsResync,
            Error::Refused { code, .. } => code.class(),
            Error::Auth { .. }
            | Error::Incompatible { .. }
            | Error::InvalidInput(_)
            | Error::NotFound(_)
            | Error::AlreadyExists(_)
            | Error::Locked(_)
            | Error::Poisoned { .. }
            | Error::Fenced { .. }
            | Error::OutOfRange { .. }
            | Error::Unsupported { .. }
            | Error::Lost(_)
            | Error::Unmendable(_) => ErrorClass::Critical,
        }
    }

    /// How a target tells a source that this error ended its request.
    pub fn refusal_code(&self) -> RefusalCode {
        match self {
            Error::NoSpace(_) => RefusalCode::NoSpace,
            Error::Io { source, .. } if is_no_space(source) => RefusalCode::NoSpace,
            Error::Io { .. } | Error::Net { .. } | Error::Closed { .. } => RefusalCode::Unavailable,
            Error::Store {
                transient: true, ..
            } => RefusalCode::Unavailable,
            Error::Store { .. } => RefusalCode::Fatal,
            Error::Busy(_) => RefusalCode::Busy,
            Error::Corruption { .. } | Error::BrokenChain(_) => RefusalCode::BrokenChain,
            Error::Refused { code, .. } => *code,
            Error::NotFound(_) => RefusalCode::UnknownMachine,
            Error::Fenced { .. } => RefusalCode::Fenced,
            Error::Incompatible { .. } => RefusalCode::Version,
            // A request the target refuses as it stands (out of range, not valid
            // there) would be refused again: Fatal, not a session to retry.
            Error::InvalidInput(_) | Error::OutOfRange { .. } => RefusalCode::Fatal,
            Error::Protocol { .. } => RefusalCode::Protocol,
            Error::Unsupported { .. } => RefusalCode::Version,
            Error::Auth { .. } => RefusalCode::NotOwner,
            Error::AlreadyExists(_)
            | Error::Locked(_)
            | Error::Poisoned { .. }
            | Error::Lost(_)
            | Error::Unmendable(_) => RefusalCode::Fatal,
        }
    }

    /// The errno a FUSE front end should answer with.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } | Error::Net { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            Error::Corruption { .. }
            | Error::Poisoned { .. }
            | Error::BrokenChain(_)
            | Error::Lost(_)
            | Error::Unmendable(_) => libc::EIO,
            Error::Fenced { .. } => libc::EROFS,
            Error::InvalidInput(_) | Error::Protocol { .. } | Error::Incompatible { .. } => {
                libc::EINVAL
            }
            Error::NotFound(_) | Error::Closed { .. } => libc::ENOENT,
            Error::AlreadyExists(_) => libc::EEXIST,
            Error::Locked(_) | Error::Busy(_) => libc::EBUSY,
            Error::OutOfRange { .. } | Error::NoSpace(_) => libc::ENOSPC,
            Error::Unsupported { .. } => libc::EOPNOTSUPP,
            Error::Refused { .. } | Error::Auth { .. } | Error::Store { .. } => libc::EIO,
        }
    }
}

/// ENOSPC or EDQUOT: the file system is full.
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_class() {
        let io = || io::Error::from_raw_os_error(libc::EIO);
        let table: Vec<(Error, ErrorClass)> = vec![
            (Error::io("read", "/x", io()), ErrorClass::Retry),
            (
                Error::Net {
                    op: "connect to",
                    peer: "10.0.0.2:7000".into(),
                    source: io(),
                },
                ErrorClass::Retry,
            ),
            (Error::Busy("merging".into()), ErrorClass::Retry),
            (Error::NoSpace("full".into()), ErrorClass::Retry),
            (Error::corruption("/x", 3, "crc"), ErrorClass::NeedsResync),
            (Error::BrokenChain("gap".into()), ErrorClass::NeedsResync),
            (
                Error::Lost("disk 1 bytes 0..4096".into()),
                ErrorClass::Critical,
            ),
            (
                Error::Auth {
                    peer: "p".into(),
                    why: "untrusted".into(),
                    by_peer: true,
                },
                ErrorClass::Critical,
            ),
            (Error::protocol("p", "bad frame"), ErrorClass::Retry),
            (
                Error::Incompatible {
                    peer: "p".into(),
                    what: "protocol 3".into(),
                },
                ErrorClass::Critical,
            ),
            (Error::InvalidInput("x".into()), ErrorClass::Critical),
            (Error::NotFound("x".into()), ErrorClass::Critical),
            (
                Error::Fenced {
                    machine: "vm1".into(),
                    reason: "failover".into(),
                },
                ErrorClass::Critical,
            ),
        ];
        for (e, want) in table {
            assert_eq!(e.class(), want, "{e}");
        }
        // A refusal's class is its code's, whatever the message says.
        for code in RefusalCode::ALL {
            let e = Error::Refused {
                peer: "p".into(),
                code,
                message: "(Retry) was next TLS".into(),
            };
            assert_eq!(e.class(), code.class(), "{code:?}");
        }
    }

    #[test]
    fn a_full_disk_is_no_space_not_a_passing_io_error() {
        let full = Error::io("write", "/x", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(full.refusal_code(), RefusalCode::NoSpace);
        assert_eq!(full.class(), ErrorClass::Retry);
        let eio = Error::io("write", "/x", io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(eio.refusal_code(), RefusalCode::Unavailable);
    }
}
