//! The target side of a replication session: checks who speaks, opens or creates the
//! machine's replica, assembles segment chunks, stores each whole segment through the
//! replica store (verify, encrypt, fsync) and only then acknowledges it.
//!
//! A frame that does not decode, a chunk out of order, a segment that fails
//! verification or breaks the chain: an `Error` message goes back, the session closes,
//! and nothing of that segment is stored.

use super::protocol::{read_frame, write_frame, ErrorCode, FrameError, Message, MAX_CHUNK};
use crate::error::Error;
use crate::format::meta::{DiskEntry, Watermark};
use crate::identity::SiteId;
use crate::replica::crypt::ReplicaKey;
use crate::replica::store::{ReplicaManifest, ReplicaStore};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

/// A replica store shared by the sessions of one machine.
type SharedStore = Arc<Mutex<ReplicaStore>>;
/// Why a session ends: the class the peer is told, and the reason.
type Refusal = (ErrorCode, String);

/// The largest segment a target assembles in memory.
pub const MAX_SEGMENT: u64 = 1 << 30;

/// What a target site needs to receive replicas.
#[derive(Debug)]
pub struct Target {
    pub site: PathBuf,
    pub me: SiteId,
    key: ReplicaKey,
    /// One open store per machine; a second session for the same machine waits.
    stores: Mutex<HashMap<String, Arc<Mutex<ReplicaStore>>>>,
}

impl Target {
    pub fn new(site: PathBuf, me: SiteId, key: ReplicaKey) -> Self {
        Target {
            site,
            me,
            key,
            stores: Mutex::new(HashMap::new()),
        }
    }

    fn store(&self, peer: SiteId, m: &Message) -> Result<(String, SharedStore), Refusal> {
        let Message::Protect {
            machine,
            machine_id,
            disks,
            base_lsn,
            base_seq,
            retention_ms,
            app_retention_ms,
        } = m
        else {
            return Err((ErrorCode::Fatal, "expected Protect".into()));
        };
        if *base_seq >= crate::format::segment::MAX_SEGMENT_SEQ
            || *base_lsn >= crate::format::record::MAX_LSN
        {
            return Err((ErrorCode::Fatal, "base segment or LSN out of range".into()));
        }
        let fatal = |e: Error| (ErrorCode::Fatal, e.to_string());
        // Under the table's lock, so two sessions never open the same store twice.
        let mut stores = self.stores.lock();
        let store = match stores.get(machine) {
            Some(s) => s.clone(),
            None => {
                let store = match ReplicaStore::open(&self.site, machine, self.key.clone()) {
                    Ok(s) => s,
                    Err(Error::NotFound(_)) => {
                        let manifest = ReplicaManifest {
                            source_site: peer.0,
                            machine_id: *machine_id,
                            disks: disks
                                .iter()
                                .enumerate()
                                .map(|(i, (name, size))| DiskEntry {
                                    id: i as u32,
                                    name: name.clone(),
                                    size: *size,
                                })
                                .collect(),
                            base_lsn: *base_lsn,
                            base_seq: *base_seq,
                        };
                        let base = Watermark {
                            lsn: *base_lsn,
                            segment_seq: *base_seq,
                        };
                        ReplicaStore::create(&self.site, machine, manifest, base, self.key.clone())
                            .map_err(fatal)?
                    }
                    Err(e) => return Err(fatal(e)),
                };
                let store = Arc::new(Mutex::new(store));
                stores.insert(machine.clone(), store.clone());
                store
            }
        };
        drop(stores);
        // Every Protect, not just the first: the replica must be this peer's machine.
        {
            let st = store.lock();
            let man = st.manifest();
            if man.source_site != peer.0 || man.machine_id != *machine_id {
                return Err((
                    ErrorCode::Fatal,
                    format!("this site's replica of {machine} belongs to another site or machine"),
                ));
            }
        }
        if *retention_ms == 0 {
            return Err((ErrorCode::Fatal, "retention of 0 ms".into()));
        }
        store
            .lock()
            .set_retention(crate::replica::store::Retention {
                window_ms: *retention_ms,
                app_window_ms: (*app_retention_ms).max(*retention_ms),
            })
            .map_err(fatal)?;
        Ok((machine.clone(), store))
    }

    /// Run one session with `peer` (already authenticated by TLS) until it ends.
    pub fn session(&self, stream: &mut (impl Read + Write), peer: SiteId) {
        match self.run(stream, peer) {
            Ok(()) => tracing::debug!("replication session with {peer} ended"),
            Err((code, why)) => {
                tracing::warn!("replication session with {peer} closed: {why}");
                let _ = write_frame(stream, &Message::Error { code, message: why });
                let _ = stream.flush();
            }
        }
    }

    fn run(&self, s: &mut (impl Read + Write), peer: SiteId) -> Result<(), Refusal> {
        let frame = |e: FrameError| (ErrorCode::Fatal, e.to_string());
        let send = |s: &mut dyn Write, m: &Message| {
            write_frame(s, m).map_err(frame)?;
            s.flush().map_err(|e| (ErrorCode::Retry, e.to_string()))
        };
        match read_frame::<Message>(s).map_err(frame)? {
            Message::Hello { site_id, .. } if site_id == peer.0 => {}
            Message::Hello { .. } => {
                return Err((
                    ErrorCode::Fatal,
                    "Hello names another site than its certificate".into(),
                ))
            }
            _ => return Err((ErrorCode::Fatal, "expected Hello".into())),
        }
        send(
            s,
            &Message::Hello {
                site_id: self.me.0,
                software: software(),
            },
        )?;
        let mut current: Option<(String, SharedStore)> = None;
        let mut assembling: Option<(u64, u64, Vec<u8>)> = None;
        // The differing chunks of the resync batch in flight (applied at its end).
        let mut resync_editor: Vec<(u32, u64, Vec<u8>)> = Vec::new();
        let mut resync_held = 0usize;
        let mut hash_cache: Option<(u32, u64, Vec<[u8; 32]>)> = None;
        loop {
            let msg = match read_frame::<Message>(s) {
                Ok(m) => m,
                Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(())
                }
                Err(e) => return Err(frame(e)),
            };
            match msg {
                m @ Message::Protect { .. } => {
                    let (name, store) = self.store(peer, &m)?;
                    let (w, init, diverged) = {
                        let st = store.lock();
                        let diverged = match st.resync_progress() {
                            Ok(Some(_)) => Some("a resync is under way".to_string()),
                            Ok(None) => st.damage().map_err(refusal)?,
                            Err(e) => Some(format!("resync progress unreadable: {e}")),
                        };
                        (st.received(), st.initial(), diverged)
                    };
                    send(
                        s,
                        &Message::Protected {
                            machine: name.clone(),
                            lsn: w.lsn,
                            seq: w.segment_seq,
                            initial_done: init.done,
                            resume_disk: init.disk,
                            resume_offset: init.offset,
                            free_bytes: free_bytes(&self.site),
                            diverged,
                        },
                    )?;
                    current = Some((name, store));
                    assembling = None;
                }
                Message::InitialChunk {
                    machine,
                    disk,
                    offset,
                    compressed,
                    bytes,
                } => {
                    let (_, store) = session_store(&current, &machine, "initial chunk")?;
                    let data = if compressed {
                        decompress(&bytes)?
                    } else {
                        bytes
                    };
                    store
                        .lock()
                        .receive_base(disk, offset, &data)
                        .map_err(refusal)?;
                }
                Message::InitialDone { machine } => {
                    let (name, store) = session_store(&current, &machine, "InitialDone")?;
                    let lsn = {
                        let mut st = store.lock();
                        st.finish_initial().map_err(refusal)?;
                        st.received().lsn
                    };
                    send(s, &ack(name, lsn))?;
                }
                Message::SegmentChunk {
                    machine,
                    seq,
                    segment_len,
                    offset,
                    compressed,
                    bytes,
                } => {
                    let (name, store) = session_store(&current, &machine, "segment")?;
                    if segment_len > MAX_SEGMENT {
                        return Err((
                            ErrorCode::Fatal,
                            format!("segment of {segment_len} bytes is over the limit"),
                        ));
                    }
                    let data = if compressed {
                        decompress(&bytes)?
                    } else {
                        bytes
                    };
                    let buf = match assembling.as_mut() {
                        Some((s_seq, s_len, buf))
                            if *s_seq == seq
                                && *s_len == segment_len
                                && buf.len() as u64 == offset =>
                        {
                            buf
                        }
                        _ if offset == 0 => {
                            &mut assembling.insert((seq, segment_len, Vec::new())).2
                        }
                        _ => {
                            return Err((
                                ErrorCode::BrokenChain,
                                format!("chunk at {offset} of segment {seq} out of order"),
                            ))
                        }
                    };
                    buf.extend_from_slice(&data);
                    if buf.len() as u64 > segment_len {
                        return Err((
                            ErrorCode::Fatal,
                            format!("segment {seq} is longer than announced"),
                        ));
                    }
                    if buf.len() as u64 == segment_len {
                        let whole = assembling.take().map(|a| a.2).unwrap_or_default();
                        let receipt = store.lock().receive(seq, &whole).map_err(refusal)?;
                        let lsn = match receipt {
                            crate::replica::store::Receipt::Stored { lsn }
                            | crate::replica::store::Receipt::Duplicate { lsn } => lsn,
                        };
                        send(s, &ack(name, lsn))?;
                    }
                }
                Message::ResyncStart {
                    machine,
                    base_lsn,
                    base_seq,
                    chunk_bytes,
                } => {
                    let (name, store) = session_store(&current, &machine, "ResyncStart")?;
                    if base_seq >= crate::format::segment::MAX_SEGMENT_SEQ
                        || base_lsn >= crate::format::record::MAX_LSN
                    {
                        return Err((ErrorCode::Fatal, "resync base out of range".into()));
                    }
                    let p = store
                        .lock()
                        .begin_resync(base_lsn, base_seq, chunk_bytes)
                        .map_err(refusal)?;
                    resync_editor.clear();
                    resync_held = 0;
                    hash_cache = None;
                    send(s, &resync_state(name, &p))?;
                }
                Message::ResyncHashRequest {
                    machine,
                    disk,
                    first,
                    count,
                    group,
                } => {
                    let (name, store) = session_store(&current, &machine, "ResyncHashRequest")?;
                    if count > MAX_HASHES
                        || group == 0
                        || group > count.max(1)
                        || first.checked_add(count).is_none()
                    {
                        return Err((
                            ErrorCode::Fatal,
                            format!("{count} hashes in groups of {group} asked for"),
                        ));
                    }
                    // Chunk hashes of the last range asked for are kept: the detail
                    // requests that follow a group request fall inside it.
                    let cached = match &hash_cache {
                        Some((d, f, h))
                            if *d == disk && *f <= first && first + count <= f + h.len() as u64 =>
                        {
                            let at = (first - f) as usize;
                            h.get(at..at + count as usize).map(<[_]>::to_vec)
                        }
                        _ => None,
                    };
                    let chunk_hashes = match cached {
                        Some(h) => h,
                        None => {
                            let st = store.lock();
                            let p = st
                                .resync_progress()
                                .map_err(refusal)?
                                .ok_or((ErrorCode::Fatal, "no resync under way".to_string()))?;
                            let h = st
                                .resync_hashes(p.chunk_bytes, disk, first, count)
                                .map_err(refusal)?;
                            hash_cache = Some((disk, first, h.clone()));
                            h
                        }
                    };
                    let hashes =
                        crate::replica::resync::group_hashes(&chunk_hashes, group as usize);
                    send(
                        s,
                        &Message::ResyncHashes {
                            machine: name.clone(),
                            disk,
                            first,
                            hashes,
                        },
                    )?;
                }
                Message::ResyncChunk {
                    machine,
                    disk,
                    offset,
                    compressed,
                    bytes,
                } => {
                    session_store(&current, &machine, "ResyncChunk")?;
                    let data = if compressed {
                        decompress(&bytes)?
                    } else {
                        bytes
                    };
                    resync_held += data.len();
                    resync_editor.push((disk, offset, data));
                    if resync_held > MAX_RESYNC_BATCH {
                        return Err((ErrorCode::Fatal, "resync batch too large".into()));
                    }
                }
                Message::ResyncBatchDone {
                    machine,
                    disk,
                    next,
                    compared,
                    sent_chunks,
                    sent_bytes,
                } => {
                    let (name, store) = session_store(&current, &machine, "ResyncBatchDone")?;
                    let p = {
                        let mut st = store.lock();
                        let cur = st
                            .resync_progress()
                            .map_err(refusal)?
                            .ok_or((ErrorCode::Fatal, "no resync under way".to_string()))?;
                        let p = crate::replica::resync::ResyncProgress {
                            disk,
                            next,
                            compared,
                            sent_chunks,
                            sent_bytes,
                            ..cur
                        };
                        st.apply_resync(&resync_editor, p).map_err(refusal)?;
                        p
                    };
                    resync_editor.clear();
                    send(s, &resync_state(name, &p))?;
                }
                Message::ResyncFetch {
                    machine,
                    disk,
                    offset,
                    len,
                } => {
                    let (name, store) = session_store(&current, &machine, "ResyncFetch")?;
                    if len > MAX_CHUNK as u64 {
                        return Err((ErrorCode::Fatal, format!("fetch of {len} bytes")));
                    }
                    let mut data = vec![0u8; len as usize];
                    store
                        .lock()
                        .read_replica(disk, offset, &mut data)
                        .map_err(refusal)?;
                    send(
                        s,
                        &Message::ResyncData {
                            machine: name.clone(),
                            compressed: true,
                            bytes: lz4_flex::block::compress_prepend_size(&data),
                        },
                    )?;
                }
                Message::ResyncDone {
                    machine,
                    valid_from,
                } => {
                    let (name, store) = session_store(&current, &machine, "ResyncDone")?;
                    let lsn = {
                        let mut st = store.lock();
                        st.finish_resync(valid_from).map_err(refusal)?;
                        st.received().lsn
                    };
                    send(s, &ack(name, lsn))?;
                }
                Message::Probe => {
                    send(
                        s,
                        &Message::Room {
                            free_bytes: free_bytes(&self.site),
                        },
                    )?;
                }
                Message::Error { code, message } => {
                    return Err((code, format!("peer reported: {message}")));
                }
                other => {
                    return Err((
                        ErrorCode::Fatal,
                        format!("unexpected message {:?}", std::mem::discriminant(&other)),
                    ));
                }
            }
        }
    }
}

/// The store of the machine this session protects; `machine` must name it.
fn session_store<'a>(
    current: &'a Option<(String, SharedStore)>,
    machine: &str,
    what: &str,
) -> Result<(&'a String, &'a SharedStore), Refusal> {
    match current {
        None => Err((ErrorCode::Fatal, format!("{what} before Protect"))),
        Some((name, _)) if name != machine => Err((
            ErrorCode::Fatal,
            format!("{what} for {machine} in a session for {name}"),
        )),
        Some((name, store)) => Ok((name, store)),
    }
}

/// Hashes one `ResyncHashRequest` may ask for.
pub const MAX_HASHES: u64 = 1 << 16;
/// Bytes of differing chunks one resync batch may carry.
const MAX_RESYNC_BATCH: usize = 256 << 20;

fn ack(machine: &str, lsn: u64) -> Message {
    Message::Ack {
        machine: machine.to_string(),
        lsn,
    }
}

fn resync_state(machine: &str, p: &crate::replica::resync::ResyncProgress) -> Message {
    Message::ResyncState {
        machine: machine.to_string(),
        disk: p.disk,
        next: p.next,
        compared: p.compared,
        sent_chunks: p.sent_chunks,
        sent_bytes: p.sent_bytes,
    }
}

/// How a store error is reported to the source.
fn refusal(e: Error) -> Refusal {
    let code = match e {
        Error::BrokenChain(_) | Error::Corruption { .. } => ErrorCode::BrokenChain,
        // No space, a full disk, a passing I/O error: the source retries later.
        Error::Io { .. } => ErrorCode::Retry,
        _ => ErrorCode::Fatal,
    };
    (code, e.to_string())
}

/// Bytes free for the site's files (statvfs), 0 if unknown.
pub fn free_bytes(site: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(site.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs fills a zeroed plain-data struct from a valid C path.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return 0;
        }
        st.f_bavail.saturating_mul(st.f_frsize)
    }
}

pub fn software() -> String {
    format!("replog {}", env!("CARGO_PKG_VERSION"))
}

/// LZ4 block with a 4-byte little-endian size in front, at most [`MAX_CHUNK`] bytes.
fn decompress(bytes: &[u8]) -> Result<Vec<u8>, Refusal> {
    let size = bytes
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or((ErrorCode::Fatal, "compressed chunk cut short".to_string()))?;
    if size > MAX_CHUNK {
        return Err((
            ErrorCode::Fatal,
            format!("compressed chunk claims {size} bytes"),
        ));
    }
    lz4_flex::block::decompress_size_prepended(bytes)
        .map_err(|e| (ErrorCode::Fatal, format!("LZ4: {e}")))
}
