//! The replication protocol: versioned, checksummed frames carrying postcard-encoded
//! messages, with a maximum frame size.
//!
//! ## Frame (16-byte header, then the body)
//!
//! ```text
//! off len field
//!   0   4 magic "RPLF" (52 50 4C 46)
//!   4   2 protocol version (2; version 1 is refused: its messages are another enum)
//!   6   2 reserved, zero
//!   8   4 body length in bytes (at most MAX_FRAME_BODY)
//!  12   4 CRC-32C of the body
//!  16   … body: postcard encoding of a `Message`
//! ```
//!
//! Byte payloads (`bytes` of the chunk messages) are postcard byte strings: a varint
//! length, then the bytes. serde would encode a `Vec<u8>` as a sequence of `u8`, which
//! postcard writes as the very same bytes, one serialize call per byte (8% of a
//! shipping source's CPU); `serde_bytes` writes and reads them as one slice. The wire
//! is unchanged, so the protocol version is too (the v3/v4 fixture frames decode).
//! Since `bytes` is the last field of each message that has one, a sender writes the
//! frame's head ([`encode_head`]) and then the payload from where it lies, and a
//! target decodes a `SegmentChunk` in place ([`segment_chunk_ref`]): the same bytes on
//! the wire, without two copies of every chunk at each end.
//!
//! A frame that does not decode — wrong magic or version, a length over the limit, a
//! checksum mismatch, a body postcard cannot read, bytes left over — is a
//! [`FrameError`]: the session must be closed and nothing of the frame applied. The
//! length is checked before anything is allocated, so a hostile peer cannot make the
//! reader allocate more than one maximum frame.
//!
//! ## Versions and features
//!
//! The version in every frame header is the protocol version; a peer speaking another
//! one is refused, naming both (a version-1 peer cannot read this build's frames, and
//! says so naming both too). `Hello`, the first message each way, repeats the version
//! and carries feature bits: what this build can do (`features`) and what the peer
//! must be able to do for this session (`required`); a peer that lacks a required bit
//! is refused naming it. [`Message`] is postcard-encoded by variant index: new
//! variants go at the end, and any change to an existing one is a new version.
//!
//! Version history: 1 (fc86700 … f501a4c: Hello without version or features, no
//! generations, `ErrorCode` Retry/BrokenChain/UnknownMachine/Fatal); 2 (this build:
//! `Hello { protocol, features, required }`, the machine's generation in Protect,
//! Protected, InitialChunk, SegmentChunk and ResyncStart, [`RefusalCode`]).

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{self, Read, Write};

pub const FRAME_MAGIC: [u8; 4] = *b"RPLF";
pub const PROTOCOL_VERSION: u16 = 2;

/// Feature bits (`Hello::features`): the machine's generation travels with Protect,
/// segments and resyncs, and lower generations are refused.
pub const FEATURE_GENERATIONS: u64 = 1 << 0;
/// Resynchronisation by chunk hashes (ResyncStart … ResyncDone).
pub const FEATURE_RESYNC: u64 = 1 << 1;
/// A source mends damaged ranges from the replica (ResyncFetch / ResyncData).
pub const FEATURE_RESYNC_FETCH: u64 = 1 << 2;
/// Planned failover: `Promote` / `Promoted`.
pub const FEATURE_FAILOVER: u64 = 1 << 3;
/// A source acts on `RefusalCode::FailoverRequested` (`--shutdown-source`); a target
/// sends that code only to a source with this bit.
pub const FEATURE_SHUTDOWN_REQUEST: u64 = 1 << 4;
/// Reprotect: `Reprotect` / `ReprotectState`, a replica seeded from an old primary's
/// own disks.
pub const FEATURE_REPROTECT: u64 = 1 << 5;
/// Resync chunk and group hashes are BLAKE3 (SHA-256 unless both sides set it).
pub const FEATURE_RESYNC_BLAKE3: u64 = 1 << 6;
/// A source says `PromoteSoon` when a planned failover starts, and a target reads
/// ahead for the check to come (`replica::warm`).
pub const FEATURE_PROMOTE_SOON: u64 = 1 << 7;
/// What this build can do.
pub const FEATURES: u64 = FEATURE_GENERATIONS
    | FEATURE_RESYNC
    | FEATURE_RESYNC_FETCH
    | FEATURE_FAILOVER
    | FEATURE_SHUTDOWN_REQUEST
    | FEATURE_REPROTECT
    | FEATURE_RESYNC_BLAKE3
    | FEATURE_PROMOTE_SOON;

/// The chunk hash of a resync with a peer whose Hello said `peer_features` (this
/// build sets every bit of [`FEATURES`]).
pub fn chunk_hash_for(peer_features: u64) -> crate::chunk_hash::ChunkHash {
    if peer_features & FEATURE_RESYNC_BLAKE3 != 0 {
        crate::chunk_hash::ChunkHash::Blake3
    } else {
        crate::chunk_hash::ChunkHash::Sha256
    }
}
/// What this build needs of its peer.
pub const REQUIRED_FEATURES: u64 = FEATURE_GENERATIONS;
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest frame body: one segment chunk plus its envelope.
pub const MAX_FRAME_BODY: u32 = 16 << 20;
/// Largest segment chunk (uncompressed bytes) in one frame.
pub const MAX_CHUNK: usize = 8 << 20;

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("bad frame: {0}")]
    Malformed(String),
    #[error("frame body of {0} bytes is over the {MAX_FRAME_BODY}-byte limit")]
    TooLarge(u64),
    #[error(
        "the peer speaks protocol version {0}; this build speaks version {PROTOCOL_VERSION} \
         (upgrade the older site)"
    )]
    Version(u16),
    #[error("frame checksum mismatch")]
    Checksum,
}

/// Messages between a source (primary) and a target (replica) site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message each way: who speaks, its protocol version, what it can do and
    /// what it needs the other side to be able to do (feature bits).
    Hello {
        site_id: [u8; 32],
        software: String,
        protocol: u16,
        features: u64,
        required: u64,
    },
    /// Source → target: replicate `machine` (created at the target if new; its chain
    /// starts after `base_lsn` / segment `base_seq`; the target keeps every point for
    /// `retention_ms` and app-consistent ones for `app_retention_ms`; `generation` is
    /// the machine's at the source: a lower one than the replica's is refused as
    /// fenced). Answered by `Protected`.
    Protect {
        machine: String,
        machine_id: u64,
        generation: u32,
        disks: Vec<(String, u64)>,
        base_lsn: u64,
        base_seq: u64,
        retention_ms: u64,
        app_retention_ms: u64,
    },
    /// Target → source: the replica holds everything up to `lsn` (segment `seq`); the
    /// initial copy is complete, or resumes at disk `resume_disk`, byte
    /// `resume_offset`; `free_bytes` is the room left at the target; `diverged` says
    /// why the replica needs a resync (a damaged stored segment, a resync under way);
    /// `generation` is the replica's.
    Protected {
        machine: String,
        generation: u32,
        lsn: u64,
        seq: u64,
        initial_done: bool,
        resume_disk: u32,
        resume_offset: u64,
        free_bytes: u64,
        diverged: Option<String>,
    },
    /// Source → target: resynchronise `machine` in chunks of `chunk_bytes`; afterwards
    /// the chain continues after `base_lsn` / segment `base_seq`. Answered by
    /// `ResyncState` (where a resync with this base stopped, or 0).
    ResyncStart {
        machine: String,
        generation: u32,
        base_lsn: u64,
        base_seq: u64,
        chunk_bytes: u64,
    },
    /// Target → source: the resync's position and counters, persisted.
    ResyncState {
        machine: String,
        disk: u32,
        next: u64,
        compared: u64,
        sent_chunks: u64,
        sent_bytes: u64,
    },
    /// Source → target: send the hashes of chunks `first..first+count` of `disk`, one
    /// per `group` chunks (SHA-256 of a chunk; of a group, SHA-256 of its chunks'
    /// hashes): groups first, then the chunks of the groups that differ.
    ResyncHashRequest {
        machine: String,
        disk: u32,
        first: u64,
        count: u64,
        group: u64,
    },
    /// Target → source: those hashes.
    ResyncHashes {
        machine: String,
        disk: u32,
        first: u64,
        hashes: Vec<[u8; 32]>,
    },
    /// Source → target: a chunk that differs (LZ4 when `compressed`).
    ResyncChunk {
        machine: String,
        disk: u32,
        offset: u64,
        compressed: bool,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Source → target: the batch is complete; persist the position and counters.
    /// Answered by `ResyncState`.
    ResyncBatchDone {
        machine: String,
        disk: u32,
        next: u64,
        compared: u64,
        sent_chunks: u64,
        sent_bytes: u64,
    },
    /// Source → target: send the replica's bytes `offset..offset+len` of `disk` (a
    /// range damaged at the source, mended from the replica). Answered by
    /// `ResyncData`.
    ResyncFetch {
        machine: String,
        disk: u32,
        offset: u64,
        len: u64,
    },
    /// Target → source: those bytes (LZ4 when `compressed`).
    ResyncData {
        machine: String,
        compressed: bool,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Source → target: every chunk compared; points before `valid_from` are not
    /// consistent. Answered by `Ack` at the base.
    ResyncDone { machine: String, valid_from: u64 },
    /// Source → target: initial replication, the parent image of disk `disk` at
    /// `offset` (holes and zero blocks are never sent; LZ4 when `compressed`).
    InitialChunk {
        machine: String,
        generation: u32,
        disk: u32,
        offset: u64,
        compressed: bool,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Source → target: every disk has been copied; answered by `Ack` at the base LSN.
    InitialDone { machine: String },
    /// Source → target: a piece of sealed journal segment `seq` of `machine` (its
    /// file's bytes from `offset`, LZ4-compressed when `compressed`). Segments are
    /// bigger than a frame, so they travel in chunks of at most [`MAX_CHUNK`] bytes;
    /// the target verifies and stores the segment when the chunk ending at
    /// `segment_len` arrives.
    SegmentChunk {
        machine: String,
        generation: u32,
        seq: u64,
        segment_len: u64,
        offset: u64,
        compressed: bool,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Target → source: everything of `machine` up to `lsn` is stored durably.
    Ack { machine: String, lsn: u64 },
    /// Source → target: how much room is there? (`replog protect` asks before it
    /// creates a relationship.) Answered by `Room`.
    Probe,
    /// Target → source: bytes free where replicas are stored.
    Room { free_bytes: u64 },
    /// Either way: the session ends because of this.
    Error { code: RefusalCode, message: String },
    /// Source → target, a planned failover (feature `FEATURE_FAILOVER`): the source
    /// takes no writes and the target has acknowledged everything up to `lsn`; promote
    /// the replica at exactly `lsn` to `generation`. Answered by `Promoted` once the
    /// promoted disks open and match the point's digests — or by `Error`, and then
    /// nothing was promoted.
    Promote {
        machine: String,
        machine_id: u64,
        generation: u32,
        lsn: u64,
    },
    /// Target → source: promoted at `lsn`; the source's generation is fenced.
    Promoted {
        machine: String,
        generation: u32,
        lsn: u64,
    },
    /// Source → target, before `Protect` (feature `FEATURE_REPROTECT`): `machine` at
    /// `generation` was promoted at LSN `since` and keeps a map of what it changed
    /// since (holding also what its replica had stored after `since`, up to
    /// `foreign_upto`); its replica's chain will start after `base_lsn` / `base_seq`.
    /// A target holding an older generation of the machine as its own (the old
    /// primary) makes it a replica seeded from its own disks; `probe` only asks what
    /// the target holds. Answered by `ReprotectState`.
    Reprotect {
        machine: String,
        machine_id: u64,
        generation: u32,
        since: u64,
        foreign_upto: Option<u64>,
        disks: Vec<(String, u64)>,
        base_lsn: u64,
        base_seq: u64,
        probe: bool,
    },
    /// Target → source: what it holds of the machine; for a seeded replica, the
    /// ranges the old primary wrote after `since` that are still in its journal
    /// (`tail`: disk, offset, length), whether its journal and the source's map
    /// cover everything it wrote after `since` (`covered`; if not, a resync follows
    /// the copy), the orphan point it kept, and the LSN of the first point it
    /// verified after the copy.
    ReprotectState {
        machine: String,
        held: Held,
        generation: u32,
        tail: Vec<(u32, u64, u64)>,
        covered: bool,
        seeded_bytes: u64,
        orphan: Option<OrphanReport>,
        verified: Option<u64>,
    },
    /// Source → target, in a session of `machine` at `generation` (feature
    /// `FEATURE_PROMOTE_SOON`): a planned failover has begun (the source takes no
    /// writes and ships the rest); a `Promote` follows once everything is
    /// acknowledged. Not answered: the target reads ahead what the check of the
    /// promoted point will read (`replica::warm`); a target that does not, loses
    /// nothing.
    PromoteSoon { machine: String, generation: u32 },
}

/// What a target holds of a machine it is asked to reprotect toward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Held {
    /// Nothing: an alternate location, the normal initial copy follows.
    Nothing,
    /// An older generation of the machine as its own (the old primary).
    OldPrimary,
    /// A replica seeded from the old primary's disks by this reprotect.
    Seeded,
    /// A replica of this generation (a reprotect toward it began with a full copy).
    Replica,
}

/// The old primary's last state, kept as a recovery point of kind `orphan`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrphanReport {
    pub id: String,
    pub first_lsn: u64,
    pub last_lsn: u64,
    /// Bytes its journal wrote after the point (each byte once).
    pub bytes: u64,
    /// The clock of its first and last point after the promoted one (0: none).
    pub first_ns: u64,
    pub last_ns: u64,
}

/// Why a site refused, so the other side knows what to do (see
/// [`RefusalCode::class`]); the message says it for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RefusalCode {
    /// Something needed is in use at the target (a merge, readers): retry.
    Busy,
    /// The target is out of space: retry when there is room.
    NoSpace,
    /// A passing failure at the target (I/O, its own storage unreachable): retry.
    Unavailable,
    /// The chain is broken (a gap, a segment that does not verify or differs from the
    /// one stored): resynchronise.
    BrokenChain,
    /// The target holds no such machine, or it is not a replica there.
    UnknownMachine,
    /// The replica belongs to another site or machine, or the Hello names another
    /// site than its certificate.
    NotOwner,
    /// A message out of place or out of range, a frame that does not decode: the
    /// session is closed with nothing of it applied; retried.
    Protocol,
    /// Another protocol version, or a feature the other side needs and lacks.
    Version,
    /// The sender's generation of the machine is older than the receiver's: it was
    /// failed over and may not replicate it any more.
    Fenced,
    /// Anything else the operator must look at.
    Fatal,
    /// The target is failing the machine over and asks its primary to shut down:
    /// fence writes, ship everything, and ask for the promotion (a planned failover
    /// the target began, `replog failover --shutdown-source`). A sender that does not
    /// act on it retries.
    FailoverRequested,
}

impl RefusalCode {
    pub const ALL: [RefusalCode; 11] = [
        RefusalCode::Busy,
        RefusalCode::NoSpace,
        RefusalCode::Unavailable,
        RefusalCode::BrokenChain,
        RefusalCode::UnknownMachine,
        RefusalCode::NotOwner,
        RefusalCode::Protocol,
        RefusalCode::Version,
        RefusalCode::Fenced,
        RefusalCode::Fatal,
        RefusalCode::FailoverRequested,
    ];

    /// Retry, resynchronise or stop.
    pub fn class(self) -> crate::error::ErrorClass {
        use crate::error::ErrorClass;
        match self {
            RefusalCode::Busy
            | RefusalCode::NoSpace
            | RefusalCode::Unavailable
            | RefusalCode::FailoverRequested
            // The session went wrong (nothing of it applied): a new one starts over.
            | RefusalCode::Protocol => ErrorClass::Retry,
            RefusalCode::BrokenChain => ErrorClass::NeedsResync,
            RefusalCode::UnknownMachine
            | RefusalCode::NotOwner
            | RefusalCode::Version
            | RefusalCode::Fenced
            | RefusalCode::Fatal => ErrorClass::Critical,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::Busy => "busy",
            RefusalCode::NoSpace => "no space",
            RefusalCode::Unavailable => "unavailable",
            RefusalCode::BrokenChain => "broken chain",
            RefusalCode::UnknownMachine => "unknown machine",
            RefusalCode::NotOwner => "not the owner",
            RefusalCode::Protocol => "protocol",
            RefusalCode::Version => "version",
            RefusalCode::Fenced => "fenced",
            RefusalCode::Fatal => "fatal",
            RefusalCode::FailoverRequested => "failover requested",
        }
    }
}

/// This build's `Hello` from the site with ID `site_id`.
pub fn hello(site_id: [u8; 32]) -> Message {
    Message::Hello {
        site_id,
        software: format!("replog {}", env!("CARGO_PKG_VERSION")),
        protocol: PROTOCOL_VERSION,
        features: FEATURES,
        required: REQUIRED_FEATURES,
    }
}

/// Check a peer's `Hello` fields: the same protocol version, and each side has what
/// the other requires. The error names both versions or the missing feature bits.
pub fn check_hello(protocol: u16, features: u64, required: u64) -> Result<(), String> {
    if protocol != PROTOCOL_VERSION {
        return Err(format!(
            "the peer speaks protocol version {protocol}; this build speaks version \
             {PROTOCOL_VERSION}"
        ));
    }
    let we_lack = required & !FEATURES;
    if we_lack != 0 {
        return Err(format!(
            "the peer requires protocol features {we_lack:#x} that this build lacks"
        ));
    }
    let they_lack = REQUIRED_FEATURES & !features;
    if they_lack != 0 {
        return Err(format!(
            "the peer lacks protocol features {they_lack:#x} that this build requires"
        ));
    }
    Ok(())
}

/// Encode one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = postcard::to_stdvec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let mut out = frame_header(body.len(), crate::crc::crc32c(&body))?.to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// The header of a frame whose body is `len` bytes with CRC-32C `crc`.
fn frame_header(len: usize, crc: u32) -> Result<[u8; FRAME_HEADER_LEN], FrameError> {
    let len32 = u32::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_FRAME_BODY)
        .ok_or(FrameError::TooLarge(len as u64))?;
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[..4].copy_from_slice(&FRAME_MAGIC);
    h[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&len32.to_le_bytes());
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    Ok(h)
}

/// The frame of a message whose last field is a byte payload (`SegmentChunk`,
/// `InitialChunk`, `ResyncChunk`; `ResyncData` too, though the target sends it whole),
/// with the payload kept apart: `head`
/// is the message with its `bytes` empty, and the returned head of the frame followed
/// by `payload` is byte for byte the frame [`encode`] makes of the message holding
/// `payload` (a test checks it). The payload — up to [`MAX_CHUNK`] bytes — is neither
/// copied into a message nor into the frame: the sender writes both parts.
pub fn encode_head(head: &Message, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let empty = match head {
        Message::SegmentChunk { bytes, .. }
        | Message::InitialChunk { bytes, .. }
        | Message::ResyncChunk { bytes, .. }
        | Message::ResyncData { bytes, .. } => bytes.is_empty(),
        _ => false,
    };
    let malformed = || FrameError::Malformed("not a payload message with its bytes apart".into());
    if !empty {
        return Err(malformed());
    }
    let mut body = postcard::to_stdvec(head).map_err(|e| FrameError::Malformed(e.to_string()))?;
    // The empty payload is encoded last as its length, the varint 0: the payload's own
    // length (a postcard varint too) takes its place, and its bytes follow.
    if body.pop() != Some(0) {
        return Err(malformed());
    }
    let len =
        postcard::to_stdvec(&payload.len()).map_err(|e| FrameError::Malformed(e.to_string()))?;
    body.extend_from_slice(&len);
    let crc = crate::crc::crc32c_append(crate::crc::crc32c(&body), payload);
    let mut out = frame_header(body.len() + payload.len(), crc)?.to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Write one message as a frame.
pub fn write_frame<T: Serialize>(w: &mut (impl Write + ?Sized), msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg)?)?;
    Ok(())
}

/// Check a frame header; returns the body length and CRC.
pub fn check_header(h: &[u8; FRAME_HEADER_LEN]) -> Result<(u32, u32), FrameError> {
    let field = |at: usize| -> [u8; 4] {
        let mut b = [0u8; 4];
        if let Some(s) = h.get(at..at + 4) {
            b.copy_from_slice(s);
        }
        b
    };
    if field(0) != FRAME_MAGIC {
        return Err(FrameError::Malformed(
            "bad magic (not a replog peer?)".into(),
        ));
    }
    let v = field(4);
    let version = u16::from_le_bytes([v[0], v[1]]);
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Version(version));
    }
    if v[2] != 0 || v[3] != 0 {
        return Err(FrameError::Malformed("non-zero reserved bytes".into()));
    }
    let len = u32::from_le_bytes(field(8));
    if len > MAX_FRAME_BODY {
        return Err(FrameError::TooLarge(u64::from(len)));
    }
    Ok((len, u32::from_le_bytes(field(12))))
}

/// Decode a body whose header was checked.
pub fn decode_body<T: DeserializeOwned>(body: &[u8], crc: u32) -> Result<T, FrameError> {
    check_body(body, crc)?;
    decode_message(body)
}

/// A body's bytes against the CRC-32C its header gives.
fn check_body(body: &[u8], crc: u32) -> Result<(), FrameError> {
    if crate::crc::crc32c(body) != crc {
        return Err(FrameError::Checksum);
    }
    Ok(())
}

/// Decode a body whose CRC was checked: exactly one message, nothing after it.
pub fn decode_message<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    let (msg, rest) =
        postcard::take_from_bytes::<T>(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} bytes after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

/// Read one frame. The body buffer grows as its bytes arrive (never past the checked
/// length), so a peer that claims a large frame and stalls holds little memory.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> Result<T, FrameError> {
    let mut body = Vec::new();
    read_frame_body(r, &mut body)?;
    decode_message(&body)
}

/// Read one frame's body into `body`, checked against its header's length and CRC.
/// The buffer is the caller's to reuse: it keeps its capacity, so a stream of 8 MiB
/// chunks is read without allocating (and faulting in) 8 MiB for each. It grows as
/// the bytes arrive, never past the checked length. Bytes it already holds are read
/// over in place (what `read_to_end` would first fill with zeroes: for a body given
/// back by an earlier frame, a megabyte of memset saved each time). After an error
/// `body` holds nothing to use (new and old bytes mixed).
pub fn read_frame_body(r: &mut impl Read, body: &mut Vec<u8>) -> Result<(), FrameError> {
    let mut h = [0u8; FRAME_HEADER_LEN];
    r.read_exact(&mut h)?;
    let (len, crc) = check_header(&h)?;
    let len = len as usize;
    body.truncate(len);
    r.read_exact(body)?;
    let more = len - body.len();
    if more > 0 {
        r.take(more as u64).read_to_end(body)?;
    }
    if body.len() != len {
        return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    check_body(body, crc)
}

/// The postcard variant index of [`Message::SegmentChunk`] (its place in the enum; a
/// test checks it against an encoded message).
const SEGMENT_CHUNK_TAG: u32 = 14;

/// A [`Message::SegmentChunk`] decoded in place: its fields in the same order, its
/// bytes borrowed from the frame's body, which the receiver copies once, into the
/// segment it assembles.
#[derive(Debug, PartialEq, Eq, Deserialize)]
pub struct SegmentChunkRef<'a> {
    pub machine: &'a str,
    pub generation: u32,
    pub seq: u64,
    pub segment_len: u64,
    pub offset: u64,
    pub compressed: bool,
    pub bytes: &'a [u8],
}

impl SegmentChunkRef<'_> {
    /// The same chunk as an owned [`Message::SegmentChunk`] (a copy of its bytes).
    pub fn to_message(&self) -> Message {
        Message::SegmentChunk {
            machine: self.machine.into(),
            generation: self.generation,
            seq: self.seq,
            segment_len: self.segment_len,
            offset: self.offset,
            compressed: self.compressed,
            bytes: self.bytes.to_vec(),
        }
    }
}

/// The body's message as a [`SegmentChunkRef`] if it is a `SegmentChunk` (None for
/// any other message: decode those with [`decode_message`]). The same checks as
/// [`decode_message`]: a body that does not decode, or has bytes after the message, is
/// an error.
pub fn segment_chunk_ref(body: &[u8]) -> Option<Result<SegmentChunkRef<'_>, FrameError>> {
    variant_ref(body, SEGMENT_CHUNK_TAG)
}

/// The fields of the body's message as `T` if its variant index is `tag`, else None.
fn variant_ref<'a, T: Deserialize<'a>>(body: &'a [u8], tag: u32) -> Option<Result<T, FrameError>> {
    // The variant index is a varint, read as postcard reads it (an overlong encoding
    // of a variant's index is that variant to the owned decoder too).
    let (found, fields) = postcard::take_from_bytes::<u32>(body).ok()?;
    if found != tag {
        return None;
    }
    Some(decode_message(fields))
}

/// The postcard variant index of [`Message::InitialChunk`] (a test checks it).
const INITIAL_CHUNK_TAG: u32 = 12;

/// A [`Message::InitialChunk`] decoded in place: its fields in the same order, its
/// bytes borrowed from the frame's body. The receiver keeps the body itself as the
/// chunk's buffer until the chunk is stored (no copy, no new buffer per chunk).
#[derive(Debug, PartialEq, Eq, Deserialize)]
pub struct InitialChunkRef<'a> {
    pub machine: &'a str,
    pub generation: u32,
    pub disk: u32,
    pub offset: u64,
    pub compressed: bool,
    pub bytes: &'a [u8],
}

impl InitialChunkRef<'_> {
    /// Where the chunk's bytes lie in `body`, the frame's body it was decoded from:
    /// its last bytes (the message's last field, nothing after the message), checked
    /// by address. None if they are not there.
    pub fn bytes_at(&self, body: &[u8]) -> Option<std::ops::Range<usize>> {
        let at = body.len().checked_sub(self.bytes.len())?..body.len();
        (body.get(at.clone())?.as_ptr() == self.bytes.as_ptr()).then_some(at)
    }

    /// The same chunk as an owned [`Message::InitialChunk`] (a copy of its bytes).
    pub fn to_message(&self) -> Message {
        Message::InitialChunk {
            machine: self.machine.into(),
            generation: self.generation,
            disk: self.disk,
            offset: self.offset,
            compressed: self.compressed,
            bytes: self.bytes.to_vec(),
        }
    }
}

/// The body's message as an [`InitialChunkRef`] if it is an `InitialChunk` (None for
/// any other message), with the same checks as [`segment_chunk_ref`].
pub fn initial_chunk_ref(body: &[u8]) -> Option<Result<InitialChunkRef<'_>, FrameError>> {
    variant_ref(body, INITIAL_CHUNK_TAG)
}

/// Decode one frame from the start of `bytes`; returns the message and bytes used.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), FrameError> {
    let Some(h) = bytes.get(..FRAME_HEADER_LEN) else {
        return Err(FrameError::Malformed("frame header cut short".into()));
    };
    let mut hdr = [0u8; FRAME_HEADER_LEN];
    hdr.copy_from_slice(h);
    let (len, crc) = check_header(&hdr)?;
    let end = FRAME_HEADER_LEN + len as usize;
    let Some(body) = bytes.get(FRAME_HEADER_LEN..end) else {
        return Err(FrameError::Malformed("frame body cut short".into()));
    };
    Ok((decode_body(body, crc)?, end))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    #[test]
    fn resync_hashes_are_blake3_only_when_the_peer_says_so() {
        use crate::chunk_hash::ChunkHash;
        assert_eq!(chunk_hash_for(FEATURES), ChunkHash::Blake3);
        // Every build before the bit: SHA-256.
        assert_eq!(
            chunk_hash_for(FEATURES & !FEATURE_RESYNC_BLAKE3),
            ChunkHash::Sha256
        );
        assert_eq!(chunk_hash_for(0), ChunkHash::Sha256);
    }

    use super::*;
    use proptest::prelude::*;

    fn sample() -> Message {
        Message::SegmentChunk {
            machine: "vm1".into(),
            generation: 1,
            seq: 7,
            segment_len: 9000,
            offset: 3000,
            compressed: false,
            bytes: (0..3000u32).map(|i| i as u8).collect(),
        }
    }

    /// A refusal code's wire form is its index (postcard): a new code goes at the
    /// end, or older peers read one refusal as another.
    #[test]
    fn refusal_codes_keep_their_wire_index() {
        for (i, code) in RefusalCode::ALL.iter().enumerate() {
            assert_eq!(
                postcard::to_allocvec(code).unwrap(),
                vec![i as u8],
                "{code:?}"
            );
        }
        assert_eq!(RefusalCode::ALL[8], RefusalCode::Fenced);
        assert_eq!(RefusalCode::ALL[10], RefusalCode::FailoverRequested);
    }

    #[test]
    fn a_full_chunk_fits_a_frame() {
        let m = Message::SegmentChunk {
            machine: "x".repeat(64),
            generation: u32::MAX,
            seq: u64::MAX,
            segment_len: u64::MAX,
            offset: u64::MAX,
            compressed: true,
            bytes: vec![0xAB; MAX_CHUNK],
        };
        let f = encode(&m).unwrap();
        assert_eq!(decode::<Message>(&f).unwrap().0, m);
    }

    #[test]
    fn round_trip_through_a_stream() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &sample()).unwrap();
        write_frame(
            &mut wire,
            &Message::Ack {
                machine: "vm1".into(),
                lsn: 180,
            },
        )
        .unwrap();
        let mut r = &wire[..];
        assert_eq!(read_frame::<Message>(&mut r).unwrap(), sample());
        assert_eq!(
            read_frame::<Message>(&mut r).unwrap(),
            Message::Ack {
                machine: "vm1".into(),
                lsn: 180
            }
        );
        assert!(matches!(
            read_frame::<Message>(&mut r),
            Err(FrameError::Io(_))
        ));
    }

    #[test]
    fn every_cut_and_every_flip_is_refused() {
        let wire = encode(&sample()).unwrap();
        for cut in 0..wire.len() {
            assert!(
                decode::<Message>(&wire[..cut]).is_err(),
                "cut at {cut} accepted"
            );
            assert!(read_frame::<Message>(&mut &wire[..cut]).is_err());
        }
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x20;
            assert!(decode::<Message>(&bad).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn oversized_and_foreign_frames_are_refused_before_allocating() {
        let mut h = encode(&Message::Ack {
            machine: "m".into(),
            lsn: 1,
        })
        .unwrap();
        h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_frame::<Message>(&mut &h[..]),
            Err(FrameError::TooLarge(_))
        ));
        let mut v = encode(&Message::Ack {
            machine: "m".into(),
            lsn: 1,
        })
        .unwrap();
        v[4] = 1;
        assert!(matches!(decode::<Message>(&v), Err(FrameError::Version(1))));
        assert!(matches!(
            read_frame::<Message>(&mut &b"GET / HTTP/1.1\r\n\r\n"[..]),
            Err(FrameError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Message>(&bytes);
            let _ = read_frame::<Message>(&mut &bytes[..]);
        }

        #[test]
        fn valid_header_random_body_is_refused_or_exact(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut f = Vec::new();
            f.extend_from_slice(&FRAME_MAGIC);
            f.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            f.extend_from_slice(&0u16.to_le_bytes());
            f.extend_from_slice(&(body.len() as u32).to_le_bytes());
            f.extend_from_slice(&crate::crc::crc32c(&body).to_le_bytes());
            f.extend_from_slice(&body);
            if let Ok((m, used)) = decode::<Message>(&f) {
                // Whatever decodes used the whole frame and survives a round trip.
                prop_assert_eq!(used, f.len());
                let again = encode(&m).unwrap();
                prop_assert_eq!(decode::<Message>(&again).unwrap().0, m);
            }
        }
    }

    /// Each payload message with `payload` in it, and the same with its bytes empty.
    fn payload_messages(payload: &[u8]) -> Vec<(Message, Message)> {
        let with = |bytes: Vec<u8>| {
            vec![
                Message::SegmentChunk {
                    machine: "vm1".into(),
                    generation: 3,
                    seq: 1 << 40,
                    segment_len: 64 << 20,
                    offset: 8 << 20,
                    compressed: false,
                    bytes: bytes.clone(),
                },
                Message::InitialChunk {
                    machine: "a machine".into(),
                    generation: 1,
                    disk: 2,
                    offset: u64::MAX,
                    compressed: true,
                    bytes: bytes.clone(),
                },
                Message::ResyncChunk {
                    machine: "m".into(),
                    disk: 0,
                    offset: 4096,
                    compressed: false,
                    bytes: bytes.clone(),
                },
                Message::ResyncData {
                    machine: String::new(),
                    compressed: true,
                    bytes,
                },
            ]
        };
        with(payload.to_vec())
            .into_iter()
            .zip(with(Vec::new()))
            .collect()
    }

    #[test]
    fn a_frame_with_its_payload_apart_is_the_frame_of_the_whole_message() {
        // Payload lengths around the varint's byte boundaries, and a whole chunk.
        for len in [
            0, 1, 127, 128, 16383, 16384, 2_097_151, 2_097_152, MAX_CHUNK,
        ] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            for (whole, head) in payload_messages(&payload) {
                let mut frame = encode_head(&head, &payload).unwrap();
                frame.extend_from_slice(&payload);
                assert_eq!(frame, encode(&whole).unwrap(), "{len} bytes");
                assert_eq!(decode::<Message>(&frame).unwrap(), (whole, frame.len()));
            }
        }
    }

    #[test]
    fn a_frame_head_is_refused_for_a_message_that_is_not_a_payload_one_or_holds_its_bytes() {
        assert!(matches!(
            encode_head(&Message::Probe, b"data"),
            Err(FrameError::Malformed(_))
        ));
        for (whole, _) in payload_messages(b"data") {
            assert!(matches!(
                encode_head(&whole, b"data"),
                Err(FrameError::Malformed(_))
            ));
        }
        // Over the frame limit with the payload counted.
        let big = vec![0u8; MAX_FRAME_BODY as usize];
        for (_, head) in payload_messages(b"") {
            assert!(matches!(
                encode_head(&head, &big),
                Err(FrameError::TooLarge(_))
            ));
        }
    }

    #[test]
    fn an_initial_chunk_reads_in_place_and_nothing_else_does() {
        let payload: Vec<u8> = (0..70_000u32).map(|i| (i % 241) as u8).collect();
        let mut all = payload_messages(&payload);
        let (whole, _) = all.remove(1);
        let frame = encode(&whole).unwrap();
        let body = &frame[FRAME_HEADER_LEN..];
        assert_eq!(
            initial_chunk_ref(body).unwrap().unwrap(),
            // The fields `payload_messages` gives it.
            InitialChunkRef {
                machine: "a machine",
                generation: 1,
                disk: 2,
                offset: u64::MAX,
                compressed: true,
                bytes: &payload,
            },
            "the tag is InitialChunk's place in the enum"
        );
        // The receiver keeps the body as the chunk's buffer: the bytes are its end.
        let c = initial_chunk_ref(body).unwrap().unwrap();
        assert_eq!(
            body[body.len() - payload.len()..].as_ptr(),
            c.bytes.as_ptr()
        );
        assert_eq!(
            c.bytes_at(body),
            Some(body.len() - payload.len()..body.len())
        );
        let copy = body.to_vec();
        assert_eq!(c.bytes_at(&copy), None, "another buffer");
        for (other, _) in all {
            let frame = encode(&other).unwrap();
            assert!(initial_chunk_ref(&frame[FRAME_HEADER_LEN..]).is_none());
        }
        let done = Message::InitialDone {
            machine: "a machine".into(),
        };
        assert!(initial_chunk_ref(&encode(&done).unwrap()[FRAME_HEADER_LEN..]).is_none());
        assert!(initial_chunk_ref(&[]).is_none());
        // Cut short, or with bytes after it: an error, never a chunk.
        assert!(matches!(
            initial_chunk_ref(&body[..body.len() - 1]),
            Some(Err(FrameError::Malformed(_)))
        ));
        let mut longer = body.to_vec();
        longer.push(0);
        assert!(matches!(
            initial_chunk_ref(&longer),
            Some(Err(FrameError::Malformed(_)))
        ));
    }

    #[test]
    fn a_segment_chunk_reads_in_place_and_nothing_else_does() {
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (whole, _) = payload_messages(&payload).remove(0);
        let frame = encode(&whole).unwrap();
        let body = &frame[FRAME_HEADER_LEN..];
        assert_eq!(
            segment_chunk_ref(body).unwrap().unwrap(),
            // The fields `payload_messages` gives it.
            SegmentChunkRef {
                machine: "vm1",
                generation: 3,
                seq: 1 << 40,
                segment_len: 64 << 20,
                offset: 8 << 20,
                compressed: false,
                bytes: &payload,
            },
            "the tag is SegmentChunk's place in the enum"
        );
        for (other, _) in payload_messages(&payload).into_iter().skip(1) {
            let frame = encode(&other).unwrap();
            assert!(segment_chunk_ref(&frame[FRAME_HEADER_LEN..]).is_none());
        }
        assert!(segment_chunk_ref(&encode(&Message::Probe).unwrap()[FRAME_HEADER_LEN..]).is_none());
        assert!(segment_chunk_ref(&[]).is_none());
        // An overlong varint for the variant index is still a SegmentChunk, as the
        // owned decoder reads it.
        let overlong = [&[0x8E, 0x00][..], &body[1..]].concat();
        assert_eq!(
            segment_chunk_ref(&overlong).unwrap().unwrap(),
            segment_chunk_ref(body).unwrap().unwrap()
        );
        assert_eq!(decode_message::<Message>(&overlong).unwrap(), whole);
        // Cut short, or with bytes after it: an error, never a chunk.
        assert!(matches!(
            segment_chunk_ref(&body[..body.len() - 1]),
            Some(Err(FrameError::Malformed(_)))
        ));
        let mut longer = body.to_vec();
        longer.push(0);
        assert!(matches!(
            segment_chunk_ref(&longer),
            Some(Err(FrameError::Malformed(_)))
        ));
    }

    #[test]
    fn frame_bodies_are_read_into_one_buffer_that_keeps_its_room() {
        let big = payload_messages(&vec![9u8; 1 << 20]).remove(0).0;
        let mut wire = encode(&big).unwrap();
        wire.extend(encode(&Message::Probe).unwrap());
        wire.extend(encode(&big).unwrap());
        let mut r = &wire[..];
        let mut body = Vec::new();
        read_frame_body(&mut r, &mut body).unwrap();
        assert_eq!(decode_message::<Message>(&body).unwrap(), big);
        let room = body.capacity();
        read_frame_body(&mut r, &mut body).unwrap();
        assert_eq!(decode_message::<Message>(&body).unwrap(), Message::Probe);
        assert_eq!(body.capacity(), room, "a small frame keeps the room");
        let at = body.as_ptr();
        read_frame_body(&mut r, &mut body).unwrap();
        assert_eq!(decode_message::<Message>(&body).unwrap(), big);
        assert_eq!(body.as_ptr(), at, "the second big frame was read in place");
        // A body that holds other bytes, more or fewer than the frame's, ends up
        // holding the frame's exactly.
        for held in [(3 << 20) / 2, 1000] {
            let mut held_body = vec![0xa5; held];
            read_frame_body(&mut &wire[..], &mut held_body).unwrap();
            assert_eq!(
                decode_message::<Message>(&held_body).unwrap(),
                big,
                "{held}"
            );
        }
        assert!(matches!(
            read_frame_body(&mut r, &mut body),
            Err(FrameError::Io(_))
        ));
        // A damaged body is refused.
        let mut bad = encode(&big).unwrap();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            read_frame_body(&mut &bad[..], &mut body),
            Err(FrameError::Checksum)
        ));
    }
}
