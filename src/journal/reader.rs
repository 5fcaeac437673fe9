//! Reading segments: one sequential pass that verifies every checksum and LSN.
//!
//! Used by recovery, the index rebuild, the compactor and `replog inspect` alike, so
//! there is exactly one definition of a valid segment.

use crate::error::{Error, Result};
use crate::format::record::{PointPayload, FLAG_APP_CONSISTENT};
use crate::format::{
    RecordHeader, RecordKind, SegmentFooter, SegmentHeader, FOOTER_LEN, RECORD_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};
use crate::storage::StorageFile;

/// How far a buffered read looks ahead.
const READ_AHEAD: usize = 1 << 20;

/// One record as the scanner hands it to its caller.
pub struct ScannedRecord<'a> {
    pub header: RecordHeader,
    /// File offset of the record header.
    pub offset: u64,
    /// File offset of the payload.
    pub payload_offset: u64,
    pub payload: &'a [u8],
}

impl ScannedRecord<'_> {
    /// The point's time and app-consistency, for point records.
    pub fn point(&self) -> Option<(u64, bool)> {
        if self.header.kind != RecordKind::Point {
            return None;
        }
        let p = PointPayload::decode(self.payload).ok()?;
        Some((p.time_ns, self.header.flags & FLAG_APP_CONSISTENT != 0))
    }

    /// The disk digests a point record carries (None: not a point, or none kept).
    pub fn point_digests(&self) -> Option<Vec<u64>> {
        if self.header.kind != RecordKind::Point {
            return None;
        }
        PointPayload::decode(self.payload).ok()?.digests
    }

    /// The plan point a point record belongs to (`replog plan checkpoint`).
    pub fn point_plan(&self) -> Option<u64> {
        if self.header.kind != RecordKind::Point {
            return None;
        }
        PointPayload::decode(self.payload).ok()?.plan_point
    }
}

/// Where and why a scan stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanFault {
    pub offset: u64,
    pub what: String,
    pub kind: FaultKind,
}

/// What kind of fault a scan found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Bytes that do not decode or fail a checksum (or a torn tail).
    Damage,
    /// Intact, checksummed content that does not continue what was expected: a
    /// segment or record whose LSN is not the next one.
    Discontinuity,
    /// Intact, checksummed content that makes no sense here (a record for a disk the
    /// machine does not have): written wrongly, not damaged since.
    Invalid,
}

/// The result of scanning one segment.
#[derive(Debug, Clone)]
pub struct SegmentScan {
    pub header: Option<SegmentHeader>,
    pub records: u32,
    pub first_lsn: Option<u64>,
    pub last_lsn: Option<u64>,
    /// Offset just after the last valid record (where the footer or the next append goes).
    pub end: u64,
    pub chain_crc: u32,
    pub footer: Option<SegmentFooter>,
    pub file_len: u64,
    /// The first thing that is wrong, if any. Everything before `end` is valid.
    pub fault: Option<ScanFault>,
}

impl SegmentScan {
    pub fn is_sealed(&self) -> bool {
        self.footer.is_some() && self.fault.is_none()
    }

    /// The scan's fault as a corruption error.
    pub fn fault_error(&self, file: &dyn StorageFile) -> Option<Error> {
        self.fault
            .as_ref()
            .map(|f| Error::corruption(file.path(), f.offset, f.what.clone()))
    }
}

/// What the scanner expects of a segment.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// The machine the segment must belong to (None: take the header's).
    pub machine_id: Option<u64>,
    /// The sequence number from the file name.
    pub seq: Option<u64>,
    /// The LSN the first record must carry (None: take the header's base LSN).
    pub first_lsn: Option<u64>,
    /// Disk ids must be below this.
    pub disk_count: Option<u32>,
}

/// What a scan reads: a file through a window of [`READ_AHEAD`] bytes, or a segment
/// already in memory, read in place.
enum Buffered<'f> {
    File {
        file: &'f dyn StorageFile,
        len: u64,
        buf: Vec<u8>,
        start: u64,
    },
    Bytes(&'f [u8]),
}

impl<'f> Buffered<'f> {
    /// `n` bytes at `off`, or None if the segment ends first.
    fn get(&mut self, off: u64, n: usize) -> Result<Option<&[u8]>> {
        match self {
            Buffered::Bytes(bytes) => {
                let start = usize::try_from(off).ok();
                let end = start.and_then(|s| s.checked_add(n));
                Ok(start.zip(end).and_then(|(s, e)| bytes.get(s..e)))
            }
            Buffered::File {
                file,
                len,
                buf,
                start,
            } => {
                if off + n as u64 > *len {
                    return Ok(None);
                }
                let have = off >= *start && off + n as u64 <= *start + buf.len() as u64;
                if !have {
                    let want = n.max(READ_AHEAD).min((*len - off) as usize);
                    buf.resize(want, 0);
                    let got = file.read_at(buf, off)?;
                    buf.truncate(got);
                    *start = off;
                    if got < n {
                        return Ok(None);
                    }
                }
                let at = (off - *start) as usize;
                Ok(buf.get(at..at + n))
            }
        }
    }
}

/// Scan a segment, calling `each` for every valid record in order. I/O errors are
/// returned as errors; damage is reported in [`SegmentScan::fault`] and stops the scan
/// (nothing after it is handed out).
pub fn scan_segment(
    file: &dyn StorageFile,
    expect: Expect,
    each: impl FnMut(&ScannedRecord<'_>) -> Result<()>,
) -> Result<SegmentScan> {
    let len = file.len()?;
    let r = Buffered::File {
        file,
        len,
        buf: Vec::new(),
        start: 0,
    };
    scan(r, len, expect, each)
}

/// [`scan_segment`] of a segment's bytes in memory (a target's incoming segment),
/// read in place: the same checks, no copy.
pub fn scan_bytes(
    bytes: &[u8],
    expect: Expect,
    each: impl FnMut(&ScannedRecord<'_>) -> Result<()>,
) -> Result<SegmentScan> {
    scan(Buffered::Bytes(bytes), bytes.len() as u64, expect, each)
}

fn scan(
    mut r: Buffered<'_>,
    len: u64,
    expect: Expect,
    mut each: impl FnMut(&ScannedRecord<'_>) -> Result<()>,
) -> Result<SegmentScan> {
    let mut scan = SegmentScan {
        header: None,
        records: 0,
        first_lsn: None,
        last_lsn: None,
        end: 0,
        chain_crc: 0,
        footer: None,
        file_len: len,
        fault: None,
    };
    let fault = |scan: &mut SegmentScan, offset: u64, what: String| {
        scan.fault = Some(ScanFault {
            offset,
            what,
            kind: FaultKind::Damage,
        });
    };
    let invalid = |scan: &mut SegmentScan, offset: u64, what: String| {
        scan.fault = Some(ScanFault {
            offset,
            what,
            kind: FaultKind::Invalid,
        });
    };
    let gap = |scan: &mut SegmentScan, offset: u64, what: String| {
        scan.fault = Some(ScanFault {
            offset,
            what,
            kind: FaultKind::Discontinuity,
        });
    };

    let Some(hb) = r.get(0, SEGMENT_HEADER_LEN)? else {
        fault(
            &mut scan,
            0,
            format!("segment header cut short ({len} bytes)"),
        );
        return Ok(scan);
    };
    let header = match SegmentHeader::decode(hb) {
        Ok(h) => h,
        Err(e) => {
            fault(&mut scan, e.offset, e.what);
            return Ok(scan);
        }
    };
    // From here on the header is intact: a mismatch below is not a torn write.
    scan.header = Some(header);
    if let Some(id) = expect.machine_id.filter(|id| *id != header.machine_id) {
        fault(
            &mut scan,
            24,
            format!(
                "segment belongs to machine {:#x}, not {id:#x}",
                header.machine_id
            ),
        );
        return Ok(scan);
    }
    if let Some(seq) = expect.seq.filter(|s| *s != header.seq) {
        fault(
            &mut scan,
            32,
            format!(
                "header says segment {} but the file name says {seq}",
                header.seq
            ),
        );
        return Ok(scan);
    }
    let mut next_lsn = expect.first_lsn.unwrap_or(header.base_lsn);
    if header.base_lsn != next_lsn {
        gap(
            &mut scan,
            40,
            format!(
                "segment starts at LSN {} but LSN {next_lsn} is next",
                header.base_lsn
            ),
        );
        return Ok(scan);
    }
    let mut pos = SEGMENT_HEADER_LEN as u64;
    scan.end = pos;

    loop {
        if pos == len {
            return Ok(scan); // unsealed, clean end
        }
        let Some(magic) = r.get(pos, 4)? else {
            fault(&mut scan, pos, "record cut short".into());
            return Ok(scan);
        };
        if SegmentFooter::is_footer(magic) {
            let Some(fb) = r.get(pos, FOOTER_LEN)? else {
                fault(&mut scan, pos, "footer cut short".into());
                return Ok(scan);
            };
            let footer = match SegmentFooter::decode(fb) {
                Ok(f) => f,
                Err(e) => {
                    fault(&mut scan, pos + e.offset, e.what);
                    return Ok(scan);
                }
            };
            let agrees = footer.footer_offset == pos
                && footer.records == scan.records
                && footer.chain_crc == scan.chain_crc
                && Some(footer.last_lsn) == scan.last_lsn
                && Some(footer.first_lsn) == scan.first_lsn;
            if !agrees {
                fault(
                    &mut scan,
                    pos,
                    "footer disagrees with the records before it".into(),
                );
                return Ok(scan);
            }
            if pos + FOOTER_LEN as u64 != len {
                fault(
                    &mut scan,
                    pos + FOOTER_LEN as u64,
                    "bytes after the footer".into(),
                );
                return Ok(scan);
            }
            scan.footer = Some(footer);
            return Ok(scan);
        }
        let Some(hb) = r.get(pos, RECORD_HEADER_LEN)? else {
            fault(&mut scan, pos, "record header cut short".into());
            return Ok(scan);
        };
        let rh = match RecordHeader::decode(hb) {
            Ok(h) => h,
            Err(e) => {
                fault(&mut scan, pos + e.offset, e.what);
                return Ok(scan);
            }
        };
        let payload_offset = pos + RECORD_HEADER_LEN as u64;
        let Some(payload) = r.get(payload_offset, rh.payload_len as usize)? else {
            fault(&mut scan, pos, "record payload cut short".into());
            return Ok(scan);
        };
        if let Err(e) = rh.verify_salted(payload, header.salt) {
            fault(&mut scan, pos, e.what);
            return Ok(scan);
        }
        if rh.lsn != next_lsn {
            gap(
                &mut scan,
                pos + 8,
                format!("LSN {} where {next_lsn} was next", rh.lsn),
            );
            return Ok(scan);
        }
        if rh.kind != RecordKind::Point {
            if let Some(n) = expect.disk_count.filter(|n| rh.disk >= *n) {
                invalid(
                    &mut scan,
                    pos + 16,
                    format!("disk id {} but the machine has {n} disks", rh.disk),
                );
                return Ok(scan);
            }
        }
        let rec = ScannedRecord {
            header: rh,
            offset: pos,
            payload_offset,
            payload,
        };
        each(&rec)?;
        scan.records += 1;
        scan.first_lsn.get_or_insert(rh.lsn);
        scan.last_lsn = Some(rh.lsn);
        scan.chain_crc = crate::crc::crc32c_append(scan.chain_crc, &rh.crc.to_le_bytes());
        next_lsn = rh.lsn + 1;
        pos = payload_offset + u64::from(rh.payload_len);
        scan.end = pos;
    }
}

/// Count records with valid checksums (seeded with the segment's `salt`, 0: none)
/// anywhere after `from` (a search for the record magic, used only to word the
/// warning when a torn tail is cut off).
pub fn valid_records_after(file: &dyn StorageFile, from: u64, salt: u32) -> Result<usize> {
    // Look at most one segment's worth past the damage (a hostile file may be huge).
    // Behind a recycled segment's records lie an earlier segment's bytes up to the
    // file's end, read at every open: only the first 8 MiB after the cut are
    // searched there (records of its own persisted out of order lie near its tail).
    let window: u64 = if salt != 0 { 8 << 20 } else { 256 << 20 };
    let len = file.len()?.min(from.saturating_add(window));
    let mut buf = vec![0u8; (len.saturating_sub(from)) as usize];
    let n = file.read_at(&mut buf, from)?;
    buf.truncate(n);
    let mut count = 0;
    // Records may not overlap: after one that verifies, the search goes on past it.
    let mut next = 1;
    for i in memchr::memmem::find_iter(&buf, &crate::format::record::RECORD_MAGIC) {
        if i < next || i + RECORD_HEADER_LEN > buf.len() {
            continue;
        }
        let rest = buf.get(i..).unwrap_or(&[]);
        if let Ok(h) = RecordHeader::decode(rest) {
            let p = rest.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + h.payload_len as usize);
            if p.is_some_and(|p| h.verify_salted(p, salt).is_ok()) {
                count += 1;
                next = i + h.total_len() as usize;
            }
        }
    }
    Ok(count)
}
