//! The change journal of one machine: segment files of checksummed records.
//!
//! [`JournalWriter`] appends records to the active segment, seals it (footer + fsync)
//! and opens the next. [`recover`] reads a journal directory back after a clean stop
//! or a crash: it verifies every segment, cuts a torn tail off the last one only,
//! reports damage in a segment it may not cut ([`DamagedSegment`]: indexed up to the
//! damage, never beyond) and refuses anything else as corruption naming the segment
//! and offset.
//!
//! The writer is not synchronised: [`crate::volume::Machine`] owns it behind a mutex,
//! so that LSN order, file order and index order are one and the same.

pub mod reader;
pub mod spare;

use crate::error::{Error, Result};
use crate::format::record::{PointPayload, FLAG_APP_CONSISTENT, MAX_LSN};
use crate::format::segment::{parse_segment_name, segment_name};
use crate::format::{
    now_ns, RecordHeader, RecordKind, SegmentFooter, SegmentHeader, RECORD_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};
use crate::storage::{OpenMode, Storage, StorageFile};
use reader::{scan_segment, valid_records_after, Expect, ScannedRecord};
use spare::Spares;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A recovery point known to the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub lsn: u64,
    pub time_ns: u64,
    pub kind: PointKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointKind {
    /// A flush / fsync boundary.
    Flush,
    /// A segment seal.
    Seal,
    /// An application-consistent checkpoint.
    AppConsistent,
}

/// A sealed, immutable segment.
#[derive(Debug, Clone)]
pub struct SealedSegment {
    pub seq: u64,
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub records: u32,
    pub bytes: u64,
    pub sealed_ns: u64,
    pub file: Arc<dyn StorageFile>,
}

/// Where an appended record landed.
#[derive(Debug, Clone, Copy)]
pub struct Appended {
    pub lsn: u64,
    pub seq: u64,
    pub payload_offset: u64,
}

#[derive(Debug)]
struct Active {
    seq: u64,
    file: Arc<dyn StorageFile>,
    tail: u64,
    records: u32,
    first_lsn: Option<u64>,
    chain_crc: u32,
    /// Bytes before this offset have been handed to writeback already.
    writeback_from: u64,
    /// A recycled file (see [`spare`]): the bytes from `tail` up to here are an
    /// earlier segment's, cut off at the seal. 0 for a new file.
    stale_to: u64,
    /// The segment's record CRC salt (non-zero in a recycled file).
    salt: u32,
}

/// A page of zeroes (see [`JournalWriter::append`] and `spare::reuse`).
pub(crate) static ZERO_PAGE: [u8; 4096] = [0; 4096];

/// Start writeback of the active segment every this many bytes, so that data streams
/// to the device while the guest writes and a flush or seal waits only for the tail.
const WRITEBACK_CHUNK: u64 = 1 << 20;

/// Appends to the active segment; see the module documentation.
#[derive(Debug)]
pub struct JournalWriter {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    machine_id: u64,
    generation: u32,
    segment_bytes: u64,
    active: Active,
    next_lsn: u64,
    last_point_lsn: u64,
    spares: Spares,
}

impl JournalWriter {
    /// The LSN the next record will get.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// The newest LSN written (0: none ever).
    pub fn last_lsn(&self) -> u64 {
        self.next_lsn - 1
    }

    pub fn active_seq(&self) -> u64 {
        self.active.seq
    }

    pub fn active_file(&self) -> Arc<dyn StorageFile> {
        self.active.file.clone()
    }

    /// The spare segment files new segments are written into (the compactor offers
    /// merged segments to them).
    pub fn spares(&self) -> Spares {
        self.spares.clone()
    }

    /// Bytes in the active segment.
    pub fn active_bytes(&self) -> u64 {
        self.active.tail
    }

    /// True when something was written since the newest point or seal.
    pub fn has_unpointed_writes(&self) -> bool {
        self.last_lsn() > self.last_point_lsn
    }

    /// Append one record. The payload is written in place after the header (one
    /// `pwritev`); nothing is synced.
    pub fn append(
        &mut self,
        kind: RecordKind,
        flags: u8,
        disk: u32,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<Appended> {
        let lsn = self.next_lsn;
        let h = RecordHeader::new(kind, flags, lsn, disk, offset, length, &[payload])
            .salted(self.active.salt);
        let head = h.encode();
        let at = self.active.tail;
        let end = at + h.total_len();
        // In a recycled file, zeroes after the record up to the next 4 KiB boundary:
        // the record's last page is then written whole, and the kernel need not read
        // the earlier segment's block first (a synchronous read per record when the
        // spare is not in the page cache; appending past a file's end needs none).
        // The zeroes are past the tail: the next record overwrites them.
        let pad = if end < self.active.stale_to {
            &ZERO_PAGE[..((4096 - end % 4096) % 4096) as usize]
        } else {
            &[][..]
        };
        self.active.file.write_at(&[&head, payload, pad], at)?;
        self.active.tail = end;
        self.active.records += 1;
        self.active.first_lsn.get_or_insert(lsn);
        self.active.chain_crc =
            crate::crc::crc32c_append(self.active.chain_crc, &h.crc.to_le_bytes());
        self.next_lsn += 1;
        if kind == RecordKind::Point {
            self.last_point_lsn = lsn;
        }
        Ok(Appended {
            lsn,
            seq: self.active.seq,
            payload_offset: at + head.len() as u64,
        })
    }

    /// Once a chunk of appends is waiting, hand out the range to start writing back
    /// (the caller starts it after releasing the writer lock: it may block on a busy
    /// device).
    pub fn take_writeback(&mut self) -> Option<(Arc<dyn StorageFile>, u64, u64)> {
        let from = self.active.writeback_from;
        if self.active.tail - from < WRITEBACK_CHUNK {
            return None;
        }
        self.active.writeback_from = self.active.tail;
        Some((self.active.file.clone(), from, self.active.tail - from))
    }

    /// Append a recovery point record (`plan_point`: the ID of the plan point it
    /// belongs to; written only with digests, see `format::record`).
    pub fn append_point(
        &mut self,
        app_consistent: bool,
        digests: Option<Vec<u64>>,
        plan_point: Option<u64>,
    ) -> Result<Point> {
        let time_ns = now_ns();
        let payload = PointPayload {
            time_ns,
            digests,
            plan_point,
        }
        .encode();
        let flags = if app_consistent {
            FLAG_APP_CONSISTENT
        } else {
            0
        };
        let a = self.append(RecordKind::Point, flags, 0, 0, 0, &payload)?;
        Ok(Point {
            lsn: a.lsn,
            time_ns,
            kind: if app_consistent {
                PointKind::AppConsistent
            } else {
                PointKind::Flush
            },
        })
    }

    pub fn wants_rotation(&self) -> bool {
        self.active.tail >= self.segment_bytes
    }

    /// Seal the active segment (footer, fdatasync) and start the next one. Returns
    /// None, and does nothing, when the active segment holds no records.
    pub fn seal(&mut self) -> Result<Option<SealedSegment>> {
        let Some(first_lsn) = self.active.first_lsn else {
            return Ok(None);
        };
        let sealed_ns = now_ns();
        let footer = SegmentFooter {
            records: self.active.records,
            first_lsn,
            last_lsn: self.last_lsn(),
            footer_offset: self.active.tail,
            sealed_ns,
            chain_crc: self.active.chain_crc,
        };
        // Records first, then the footer, each durable before the next step: a footer
        // that reached the disk then proves every record before it was durable, so
        // damage in front of a footer is corruption, never a torn tail (writeback may
        // reorder pages, so one sync for both would not prove that).
        self.active.file.sync_data()?;
        // A recycled file: the earlier segment's bytes after the records go first, so
        // that the footer ends the file (a crash between leaves a segment without a
        // footer, the newest: recovered as the active one).
        if self.active.stale_to > self.active.tail {
            self.active.file.set_len(self.active.tail)?;
        }
        self.active
            .file
            .write_at(&[&footer.encode()], self.active.tail)?;
        // The footer must be durable before the next segment exists: recovery treats
        // only the last segment as possibly torn.
        self.active.file.sync_data()?;
        let bytes = self.active.tail + footer.encode().len() as u64;
        // Give back the blocks preallocated past the footer (a truncate to the same
        // size frees ext4's KEEP_SIZE preallocation): a machine that seals every few
        // seconds with little written would otherwise hold a whole segment's worth of
        // disk per sealed segment until it is merged (found by the 100-machine bench:
        // ENOSPC with the journals' data at a few GiB).
        if bytes < self.segment_bytes {
            self.active.file.set_len(bytes)?;
        }
        let sealed = SealedSegment {
            seq: self.active.seq,
            first_lsn,
            last_lsn: self.last_lsn(),
            records: self.active.records,
            bytes,
            sealed_ns,
            file: self.active.file.clone(),
        };
        self.last_point_lsn = self.last_lsn();
        let header = SegmentHeader::new(self.machine_id, sealed.seq + 1, self.next_lsn, now_ns())
            .with_generation(self.generation);
        self.active = create_segment(
            self.storage.as_ref(),
            &self.dir,
            header,
            self.segment_bytes,
            Some(&self.spares),
        )?;
        Ok(Some(sealed))
    }
}

/// Start segment `header.seq` in a spare file if `spares` has one free, else in a new
/// file with `segment_bytes` preallocated.
fn create_segment(
    storage: &dyn Storage,
    dir: &Path,
    header: SegmentHeader,
    segment_bytes: u64,
    spares: Option<&Spares>,
) -> Result<Active> {
    let seq = header.seq;
    let path = dir.join(segment_name(seq));
    let (file, header, stale_to, salt) = match spares.and_then(|s| s.take()) {
        Some(spare) => {
            let stale_to = spare.len;
            // Chosen now, after every byte the spare holds was written: nothing in it
            // can carry a CRC salted with it.
            let salt = spare::new_salt()?;
            let header = header.recycled(salt).encode();
            (
                spare::reuse(storage, dir, spare, &path, &header)?,
                header,
                stale_to,
                salt,
            )
        }
        None => {
            let file = storage.open(&path, OpenMode::CreateNew)?;
            file.preallocate(segment_bytes);
            let header = header.encode();
            file.write_at(&[&header], 0)?;
            // The name must be durable before any fsync of the file can promise its
            // data.
            storage.sync_dir(dir)?;
            (file, header, 0, 0)
        }
    };
    Ok(Active {
        seq,
        file,
        tail: header.len() as u64,
        records: 0,
        first_lsn: None,
        chain_crc: 0,
        writeback_from: 0,
        stale_to,
        salt,
    })
}

/// For the newest segment of a journal whose scan found damage: may that damage be a
/// torn tail (unsynced writes cut by a crash), to be cut off? Not if the segment ends
/// in a written footer (its records were durable before the footer was written), nor
/// if its header is intact but belongs elsewhere (another machine, number or LSN).
/// A torn header (`scan.header` is None) is for the caller to judge.
pub fn may_be_torn_tail(file: &dyn StorageFile, scan: &reader::SegmentScan) -> Result<bool> {
    let foreign_header = scan
        .fault
        .as_ref()
        .is_some_and(|f| scan.header.is_some() && f.offset < SEGMENT_HEADER_LEN as u64);
    Ok(!foreign_header && !ends_in_footer(file, scan.file_len)?)
}

/// The footer the file ends in, if its magic and checksum are right.
fn read_footer(file: &dyn StorageFile, len: u64) -> Result<Option<SegmentFooter>> {
    if !ends_in_footer(file, len)? {
        return Ok(None);
    }
    let mut b = [0u8; crate::format::FOOTER_LEN];
    file.read_exact_at(&mut b, len - crate::format::FOOTER_LEN as u64)?;
    Ok(SegmentFooter::decode(&b).ok())
}

/// True if the file ends in a written footer (right magic and checksum).
fn ends_in_footer(file: &dyn StorageFile, len: u64) -> Result<bool> {
    let footer_len = crate::format::FOOTER_LEN as u64;
    if len < footer_len {
        return Ok(false);
    }
    let mut b = [0u8; crate::format::FOOTER_LEN];
    file.read_exact_at(&mut b, len - footer_len)?;
    Ok(SegmentFooter::checksum_ok(&b))
}

/// A segment recovery may not cut (any but the newest, or the newest once sealed) that
/// does not verify to its end: its records up to `offset` were handed out, nothing
/// after. Which ranges the records after `offset` wrote cannot be known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedSegment {
    pub seq: u64,
    pub path: PathBuf,
    /// Where the damage starts.
    pub offset: u64,
    pub what: String,
}

/// What recovery found.
#[derive(Debug)]
pub struct Recovered {
    pub writer: JournalWriter,
    pub sealed: Vec<SealedSegment>,
    pub points: Vec<Point>,
    /// Human-readable notes on what recovery repaired (torn tails cut, leftovers removed).
    pub repairs: Vec<String>,
    /// Segments that are damaged past their verified prefix (oldest first). Each is in
    /// `sealed` too, with the LSN range it must have had.
    pub damaged: Vec<DamagedSegment>,
}

/// Settings recovery needs.
#[derive(Debug, Clone, Copy)]
pub struct JournalParams {
    pub machine_id: u64,
    pub disk_count: u32,
    pub segment_bytes: u64,
    /// Every record with LSN <= this is in the parents already.
    pub watermark_lsn: u64,
    /// Segments with seq <= this were merged (and may be left over from a crash).
    pub watermark_seq: u64,
    /// The machine's generation: new segments carry it.
    pub generation: u32,
    /// Spare files an earlier run left (see [`spare`]) are kept, to be written again,
    /// while the sealed segments and they fit in this many bytes (the compactor's
    /// `compact_min_bytes`, the budget it keeps spares within); the rest are removed.
    /// 0 removes them all.
    pub spare_budget: u64,
}

/// Segment files of a journal directory, oldest first.
pub fn list_segments(storage: &dyn Storage, dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut segs: Vec<(u64, PathBuf)> = storage
        .list_dir(dir)?
        .into_iter()
        .filter_map(|n| parse_segment_name(&n).map(|s| (s, dir.join(n))))
        .collect();
    segs.sort();
    Ok(segs)
}

/// Open a journal directory: verify, repair the tail, and hand every live record
/// (LSN above the watermark) to `each` in LSN order.
pub fn recover(
    storage: Arc<dyn Storage>,
    dir: &Path,
    params: JournalParams,
    mut each: impl FnMut(u64, &ScannedRecord<'_>),
) -> Result<Recovered> {
    let mut repairs = Vec::new();
    let mut segs = list_segments(storage.as_ref(), dir)?;
    // Merged segments left behind by a crash between persisting the watermark and
    // deleting them.
    while let Some((seq, path)) = segs.first().cloned() {
        if seq > params.watermark_seq {
            break;
        }
        storage.remove_file(&path)?;
        repairs.push(format!("removed merged segment {}", path.display()));
        segs.remove(0);
    }
    // Spares an earlier run left: kept within the budget once the sealed segments
    // are known (below), the rest removed.
    let leftover_spares = spare::leftovers(storage.as_ref(), dir)?;
    if !repairs.is_empty() {
        storage.sync_dir(dir)?;
    }

    let mut next_lsn = params.watermark_lsn + 1;
    let mut last_point_lsn = params.watermark_lsn;
    let mut expected_seq = segs.first().map(|(s, _)| *s);
    let mut sealed: Vec<SealedSegment> = Vec::new();
    let mut points = Vec::new();
    let mut active: Option<Active> = None;
    let mut damaged = Vec::new();
    // A damaged segment whose last LSN is not known yet: the next segment's header
    // tells (`sealed` index, its last verified LSN, the bound no record of it can
    // exceed).
    let mut open_end: Option<(usize, u64, u64)> = None;
    let count = segs.len();

    for (i, (seq, path)) in segs.into_iter().enumerate() {
        let is_last = i + 1 == count;
        if Some(seq) != expected_seq {
            return Err(Error::corruption(
                &path,
                0,
                format!("segment {} is missing before it", expected_seq.unwrap_or(0)),
            ));
        }
        expected_seq = Some(seq + 1);
        let file = storage.open(&path, OpenMode::ReadWrite)?;
        let expect = Expect {
            machine_id: Some(params.machine_id),
            seq: Some(seq),
            // After a damaged segment of unknown end, this one's header says where
            // the chain goes on (checked below).
            first_lsn: open_end.is_none().then_some(next_lsn),
            disk_count: Some(params.disk_count),
        };
        let mut seg_points = Vec::new();
        let scan = scan_segment(file.as_ref(), expect, |rec| {
            if let Some((time_ns, app)) = rec.point() {
                seg_points.push(Point {
                    lsn: rec.header.lsn,
                    time_ns,
                    kind: if app {
                        PointKind::AppConsistent
                    } else {
                        PointKind::Flush
                    },
                });
            }
            each(seq, rec);
            Ok(())
        })?;
        if let (Some((at, verified, bound)), Some(h)) = (open_end, scan.header) {
            // The chain goes on after what the damaged segment verifiably holds, and
            // no further than it can hold.
            if h.base_lsn <= verified || h.base_lsn > bound + 1 {
                return Err(Error::corruption(
                    &path,
                    40,
                    format!(
                        "segment starts at LSN {} but the damaged segment before it \
                         reached LSN {verified}",
                        h.base_lsn
                    ),
                ));
            }
            if let Some(d) = sealed.get_mut(at) {
                d.last_lsn = h.base_lsn - 1;
            }
            next_lsn = h.base_lsn;
            open_end = None;
        }
        // `each` has seen the valid prefix. Anything after it must be a torn tail of
        // the last segment, or damage (bit rot) in a segment that may not be cut.
        if let Some(f) = &scan.fault {
            // A damaged segment that still ends in a valid footer was sealed (and
            // synced): its damage is not a torn tail.
            if !is_last || !may_be_torn_tail(file.as_ref(), &scan)? {
                // An intact header that belongs elsewhere (another machine, number or
                // LSN), or an LSN gap between intact records, is a journal put
                // together wrongly, not damage: refused.
                let foreign = scan.header.is_some() && f.offset < SEGMENT_HEADER_LEN as u64;
                if foreign || f.kind != reader::FaultKind::Damage {
                    return Err(Error::corruption(&path, f.offset, f.what.clone()));
                }
                let first = scan.header.map_or(next_lsn, |h| h.base_lsn);
                let verified = scan.last_lsn.unwrap_or(first.saturating_sub(1));
                // The footer, if it still verifies and fits, says where it ended.
                let footer = read_footer(file.as_ref(), scan.file_len)?.filter(|ft| {
                    ft.first_lsn == first
                        && ft.last_lsn >= verified
                        && ft.last_lsn < MAX_LSN
                        && ft.records >= scan.records
                });
                tracing::error!(
                    "segment {} is damaged at offset {}: {}; its records before that are \
                     kept, the ranges written after it are lost until a resync mends them",
                    path.display(),
                    f.offset,
                    f.what
                );
                damaged.push(DamagedSegment {
                    seq,
                    path: path.clone(),
                    offset: f.offset,
                    what: f.what.clone(),
                });
                points.extend(seg_points);
                if let Some(p) = points.last() {
                    last_point_lsn = last_point_lsn.max(p.lsn);
                }
                // No record after the damage can be shorter than a header.
                let bound = verified
                    .saturating_add(
                        scan.file_len.saturating_sub(f.offset) / RECORD_HEADER_LEN as u64,
                    )
                    .saturating_add(1)
                    .min(MAX_LSN - 2);
                let last = footer.map_or(bound, |ft| ft.last_lsn);
                if footer.is_none() {
                    open_end = Some((sealed.len(), verified, bound));
                }
                sealed.push(SealedSegment {
                    seq,
                    first_lsn: first,
                    last_lsn: last,
                    records: footer.map_or(scan.records, |ft| ft.records),
                    bytes: scan.file_len,
                    sealed_ns: footer.map_or(0, |ft| ft.sealed_ns),
                    file,
                });
                next_lsn = last + 1;
                continue;
            }
        }
        if let Some(last) = scan.last_lsn {
            next_lsn = last + 1;
        }
        if let Some(p) = seg_points.last() {
            last_point_lsn = p.lsn;
        }
        points.extend(seg_points);
        if let (Some(footer), None) = (scan.footer, &scan.fault) {
            last_point_lsn = footer.last_lsn;
            points.push(Point {
                lsn: footer.last_lsn,
                time_ns: footer.sealed_ns,
                kind: PointKind::Seal,
            });
            sealed.push(SealedSegment {
                seq,
                first_lsn: footer.first_lsn,
                last_lsn: footer.last_lsn,
                records: footer.records,
                bytes: scan.file_len,
                sealed_ns: footer.sealed_ns,
                file,
            });
            continue;
        }
        if !is_last {
            return Err(Error::corruption(
                &path,
                scan.end,
                "segment has no footer but is not the newest (a sealed segment lost its end)",
            ));
        }
        // The last segment, unsealed: cut a torn tail, keep appending after the valid
        // prefix.
        let Some(header) = scan.header else {
            repairs.push(format!(
                "removed newest segment {} with a torn header ({} bytes)",
                path.display(),
                scan.file_len
            ));
            drop(file);
            storage.remove_file(&path)?;
            storage.sync_dir(dir)?;
            expected_seq = Some(seq);
            continue;
        };
        if scan.end < scan.file_len {
            // Checksummed records of this segment (its salt: an earlier segment's in a
            // recycled file fail it) after the cut.
            let following = valid_records_after(file.as_ref(), scan.end, header.salt)?;
            let what = scan.fault.as_ref().map(|f| f.what.as_str()).unwrap_or("");
            let mut note = if header.is_recycled() {
                // What follows is the earlier segment's (and, after a crash, unsynced
                // writes cut short): cut, as a torn tail is, so that nothing after
                // the cut can ever continue the chain.
                format!(
                    "cut recycled segment {} at offset {}: the {} bytes after its records \
                     were an earlier segment's, or writes a crash cut short",
                    path.display(),
                    scan.end,
                    scan.file_len - scan.end
                )
            } else {
                format!(
                    "cut torn tail of {} at offset {}: {} bytes dropped ({what})",
                    path.display(),
                    scan.end,
                    scan.file_len - scan.end
                )
            };
            if following > 0 {
                note.push_str(&format!(
                    "; {following} checksummed records followed it: unsynced writes if the \
                     machine lost power, otherwise corruption"
                ));
            }
            if header.is_recycled() && following == 0 {
                tracing::info!("{note}");
            } else {
                tracing::warn!("{note}");
            }
            repairs.push(note);
            file.set_len(scan.end)?;
            file.sync_data()?;
        }
        active = Some(Active {
            seq: header.seq,
            file,
            tail: scan.end,
            records: scan.records,
            first_lsn: scan.first_lsn,
            chain_crc: scan.chain_crc,
            writeback_from: scan.end,
            stale_to: 0,
            salt: header.salt,
        });
    }

    // A damaged segment of unknown end that nothing followed: the bound stands.
    if let Some((at, _, bound)) = open_end {
        if let Some(d) = sealed.get_mut(at) {
            d.last_lsn = bound;
        }
        next_lsn = bound + 1;
    }
    // Spares an earlier run left, now that the sealed segments are known: kept within
    // the budget, so that even the segment made below can be written into one.
    let spares = Spares::new(params.segment_bytes);
    let sealed_bytes = sealed.iter().map(|s| s.bytes).sum();
    let removed = spares.adopt(
        storage.as_ref(),
        dir,
        leftover_spares,
        sealed_bytes,
        params.spare_budget,
    )?;
    if removed > 0 {
        storage.sync_dir(dir)?;
    }
    let active = match active {
        Some(a) => a,
        None => {
            // The newest segment is sealed, but its footer may still be only in the page
            // cache (a kill -9 between writing it and its fdatasync). It must be durable
            // before a newer segment exists: recovery treats only the newest as torn.
            if let Some(last) = sealed.last() {
                last.file.sync_data()?;
            }
            let seq = expected_seq.unwrap_or(params.watermark_seq + 1);
            let header = SegmentHeader::new(params.machine_id, seq, next_lsn, now_ns())
                .with_generation(params.generation);
            create_segment(
                storage.as_ref(),
                dir,
                header,
                params.segment_bytes,
                Some(&spares),
            )?
        }
    };
    if let Some(p) = points.last() {
        last_point_lsn = last_point_lsn.max(p.lsn);
    }
    let writer = JournalWriter {
        storage,
        dir: dir.to_path_buf(),
        machine_id: params.machine_id,
        generation: params.generation,
        segment_bytes: params.segment_bytes,
        active,
        next_lsn,
        last_point_lsn,
        spares,
    };
    Ok(Recovered {
        writer,
        sealed,
        points,
        repairs,
        damaged,
    })
}
