//! On-disk formats: magics, versions, feature bits, checksums and the byte layout of
//! every record replog writes. All integers are little-endian.
//!
//! Decoders take bytes and return [`DecodeError`] (an offset inside the bytes and what
//! was wrong); callers add the file and the file offset to make an
//! [`Error::Corruption`](crate::Error::Corruption). Decoders never panic on any input.

#![deny(clippy::indexing_slicing)]

pub mod meta;
pub mod record;
pub mod segment;

pub use record::{RecordHeader, RecordKind, RECORD_HEADER_LEN};
pub use segment::{SegmentFooter, SegmentHeader, FOOTER_LEN, SEGMENT_HEADER_LEN};

/// Why some bytes do not decode, and where inside them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub offset: u64,
    pub what: String,
}

impl DecodeError {
    pub fn new(offset: u64, what: impl Into<String>) -> Self {
        DecodeError {
            offset,
            what: what.into(),
        }
    }
}

/// Incompatible feature bits this build understands (none yet). A file with any other
/// incompatible bit set is refused, not guessed at.
pub const SUPPORTED_INCOMPAT: u32 = 0;

/// Little-endian field access on a fixed-size header, without panics.
pub(crate) struct Le<'a>(pub &'a [u8]);

impl Le<'_> {
    pub fn u8(&self, at: usize) -> u8 {
        self.0.get(at).copied().unwrap_or(0)
    }
    pub fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes(self.array(at))
    }
    pub fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.array(at))
    }
    pub fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.array(at))
    }
    fn array<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(src) = self.0.get(at..at + N) {
            out.copy_from_slice(src);
        }
        out
    }
}

/// Little-endian field writer for a fixed-size header.
pub(crate) struct LeMut<'a>(pub &'a mut [u8]);

impl LeMut<'_> {
    pub fn put(&mut self, at: usize, bytes: &[u8]) {
        if let Some(dst) = self.0.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }
    pub fn u8(&mut self, at: usize, v: u8) {
        self.put(at, &[v]);
    }
    pub fn u16(&mut self, at: usize, v: u16) {
        self.put(at, &v.to_le_bytes());
    }
    pub fn u32(&mut self, at: usize, v: u32) {
        self.put(at, &v.to_le_bytes());
    }
    pub fn u64(&mut self, at: usize, v: u64) {
        self.put(at, &v.to_le_bytes());
    }
}

/// Check a format version (this build reads 1 to `newest` of `what`) and the
/// incompatible feature bits read from a file.
pub(crate) fn check_version(
    what: &str,
    version: u16,
    newest: u16,
    incompat: u32,
    at: u64,
) -> Result<(), DecodeError> {
    check_version_supporting(what, version, newest, incompat, SUPPORTED_INCOMPAT, at)
}

/// [`check_version`] for a layout that knows the incompatible feature bits
/// `supported` (segments: `segment::INCOMPAT_RECYCLED`).
pub(crate) fn check_version_supporting(
    what: &str,
    version: u16,
    newest: u16,
    incompat: u32,
    supported: u32,
    at: u64,
) -> Result<(), DecodeError> {
    if version == 0 || version > newest {
        return Err(DecodeError::new(
            at,
            format!("{what} version {version}; this build reads versions 1 to {newest}"),
        ));
    }
    let unknown = incompat & !supported;
    if unknown != 0 {
        return Err(DecodeError::new(
            at,
            format!("unknown incompatible feature bits {unknown:#x}"),
        ));
    }
    Ok(())
}

/// Nanoseconds since the Unix epoch, now.
/// An LZ4 block with its size in front (4 bytes, little-endian), as
/// `lz4_flex::block::compress_prepend_size` makes it: refused before any allocation
/// when it claims more than `max` bytes.
pub fn lz4_unpack(bytes: &[u8], max: usize) -> std::result::Result<Vec<u8>, String> {
    let size = bytes
        .first_chunk::<4>()
        .map(|b| u32::from_le_bytes(*b) as usize)
        .ok_or("cut short before its size")?;
    if size > max {
        return Err(format!("claims {size} bytes, more than {max}"));
    }
    lz4_flex::block::decompress_size_prepended(bytes).map_err(|e| format!("LZ4: {e}"))
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Format nanoseconds since the epoch as RFC 3339 (UTC, microseconds).
pub fn rfc3339(ns: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns);
    humantime::format_rfc3339_micros(t).to_string()
}
