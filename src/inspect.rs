//! `replog inspect`: dump and verify a site, a machine, a journal or one segment.
//!
//! Read-only: files are opened read-only and nothing is repaired. Every record's
//! checksum, every footer and LSN continuity are verified with the same scanner
//! recovery uses. The report names the first corruption exactly (file and offset).

use crate::error::{Error, Result};
use crate::format::meta::{Manifest, Watermark};
use crate::format::rfc3339;
use crate::journal::reader::{scan_segment, valid_records_after, Expect};
use crate::journal::{list_segments, PointKind};
use crate::site::{is_site, list_machines, MACHINES_DIR};
use crate::storage::{read_all, FileStorage, OpenMode, Storage};
use crate::volume::{JOURNAL_DIR, MANIFEST_FILE, WATERMARK_FILE};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub journals: Vec<JournalReport>,
    /// The first corruption found, if any.
    pub corruption: Option<Corruption>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Corruption {
    pub path: PathBuf,
    pub offset: u64,
    pub what: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct JournalReport {
    pub path: PathBuf,
    pub machine: Option<String>,
    pub machine_id: Option<String>,
    pub disks: Vec<String>,
    pub watermark_lsn: u64,
    pub segments: Vec<SegmentReport>,
    pub points: Vec<PointReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SegmentReport {
    pub path: PathBuf,
    pub seq: u64,
    pub sealed: bool,
    pub records: u32,
    pub writes: u64,
    pub zeroes: u64,
    pub first_lsn: Option<u64>,
    pub last_lsn: Option<u64>,
    pub bytes: u64,
    pub data_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PointReport {
    pub lsn: u64,
    pub time: String,
    pub kind: &'static str,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.corruption.is_none()
    }

    fn corrupt(&mut self, e: Corruption) {
        if self.corruption.is_none() {
            self.corruption = Some(e);
        }
    }
}

/// Inspect whatever `path` is.
pub fn inspect(path: &Path) -> Result<Report> {
    let mut report = Report {
        journals: Vec::new(),
        corruption: None,
        warnings: Vec::new(),
    };
    if !path.exists() {
        return Err(Error::NotFound(format!(
            "{} does not exist",
            path.display()
        )));
    }
    if path.is_file() {
        inspect_journal(
            path.parent().unwrap_or(Path::new(".")),
            Some(path),
            &mut report,
        )?;
    } else if is_site(path) {
        for m in list_machines(path)? {
            inspect_journal(
                &path.join(MACHINES_DIR).join(m).join(JOURNAL_DIR),
                None,
                &mut report,
            )?;
        }
    } else if path.join(MANIFEST_FILE).is_file() {
        inspect_journal(&path.join(JOURNAL_DIR), None, &mut report)?;
    } else if path.join(WATERMARK_FILE).is_file() || !list_segments(&FileStorage, path)?.is_empty()
    {
        inspect_journal(path, None, &mut report)?;
    } else {
        return Err(Error::InvalidInput(format!(
            "{} is not a replog site, machine, journal or segment",
            path.display()
        )));
    }
    Ok(report)
}

fn inspect_journal(dir: &Path, only: Option<&Path>, report: &mut Report) -> Result<()> {
    let storage = FileStorage;
    let machine_dir = dir.parent();
    let manifest_path = machine_dir.map(|m| m.join(MANIFEST_FILE));
    let manifest = match manifest_path.as_ref().filter(|p| p.is_file()) {
        Some(p) => {
            let bytes = read_all(
                storage.open(p, OpenMode::ReadOnly)?.as_ref(),
                crate::volume::META_FILE_LIMIT,
            )?;
            match Manifest::decode(&bytes) {
                Ok(m) => Some(m),
                Err(e) => {
                    report.corrupt(Corruption {
                        path: p.clone(),
                        offset: e.offset,
                        what: e.what,
                    });
                    None
                }
            }
        }
        None => None,
    };
    let wm_path = dir.join(WATERMARK_FILE);
    let watermark = if wm_path.is_file() && only.is_none() {
        let bytes = read_all(
            storage.open(&wm_path, OpenMode::ReadOnly)?.as_ref(),
            crate::volume::META_FILE_LIMIT,
        )?;
        match Watermark::decode(&bytes) {
            Ok(w) => Some(w),
            Err(e) => {
                report.corrupt(Corruption {
                    path: wm_path.clone(),
                    offset: e.offset,
                    what: e.what,
                });
                None
            }
        }
    } else {
        None
    };
    let mut jr = JournalReport {
        path: dir.to_path_buf(),
        machine: machine_dir
            .filter(|_| manifest.is_some())
            .and_then(|m| m.file_name())
            .map(|n| n.to_string_lossy().into_owned()),
        machine_id: manifest.as_ref().map(|m| format!("{:016x}", m.machine_id)),
        disks: manifest
            .as_ref()
            .map(|m| {
                m.disks
                    .iter()
                    .map(|d| format!("{} ({} bytes)", d.name, d.size))
                    .collect()
            })
            .unwrap_or_default(),
        watermark_lsn: watermark.map(|w| w.lsn).unwrap_or(0),
        segments: Vec::new(),
        points: Vec::new(),
    };
    let segs: Vec<(u64, PathBuf)> = match only {
        Some(p) => {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let seq = crate::format::segment::parse_segment_name(name);
            vec![(seq.unwrap_or(0), p.to_path_buf())]
        }
        None => list_segments(&storage, dir)?
            .into_iter()
            .filter(|(s, _)| *s > watermark.map(|w| w.segment_seq).unwrap_or(0))
            .collect(),
    };
    let mut next_lsn = match (only, watermark) {
        (None, Some(w)) => Some(w.lsn + 1),
        _ => None,
    };
    let count = segs.len();
    // A lone segment is the newest (and may have a torn tail) only if no segment with
    // a higher number sits beside it.
    let newest_beside = list_segments(&storage, dir)
        .ok()
        .and_then(|v| v.last().map(|(s, _)| *s));
    for (i, (seq, path)) in segs.into_iter().enumerate() {
        let is_last = match only {
            Some(_) => newest_beside.is_none_or(|n| n <= seq),
            None => i + 1 == count,
        };
        let file = storage.open(&path, OpenMode::ReadOnly)?;
        let expect = Expect {
            machine_id: manifest.as_ref().map(|m| m.machine_id),
            seq: only.is_none().then_some(seq),
            first_lsn: next_lsn,
            disk_count: manifest.as_ref().map(|m| m.disks.len() as u32),
        };
        let mut sr = SegmentReport {
            path: path.clone(),
            seq,
            sealed: false,
            records: 0,
            writes: 0,
            zeroes: 0,
            first_lsn: None,
            last_lsn: None,
            bytes: 0,
            data_bytes: 0,
        };
        let sizes: Vec<u64> = manifest
            .as_ref()
            .map(|m| m.disks.iter().map(|d| d.size).collect())
            .unwrap_or_default();
        let mut outside: Option<Corruption> = None;
        let scan = scan_segment(file.as_ref(), expect, |rec| {
            if let Some(what) = crate::volume::record_outside_disk(&rec.header, &sizes) {
                outside.get_or_insert(Corruption {
                    path: path.clone(),
                    offset: rec.offset,
                    what,
                });
            }
            match rec.header.kind {
                crate::format::RecordKind::Write => {
                    sr.writes += 1;
                    sr.data_bytes += rec.header.length;
                }
                crate::format::RecordKind::Zero => sr.zeroes += 1,
                crate::format::RecordKind::Point => {
                    if let Some((t, app)) = rec.point() {
                        jr.points.push(PointReport {
                            lsn: rec.header.lsn,
                            time: rfc3339(t),
                            kind: if app {
                                "app-consistent"
                            } else {
                                "crash-consistent"
                            },
                        });
                    }
                }
            }
            Ok(())
        })?;
        if let Some(c) = outside {
            report.corrupt(c);
        }
        sr.sealed = scan.is_sealed();
        sr.records = scan.records;
        sr.first_lsn = scan.first_lsn;
        sr.last_lsn = scan.last_lsn;
        sr.bytes = scan.file_len;
        if let Some(f) = &scan.footer {
            jr.points.push(PointReport {
                lsn: f.last_lsn,
                time: rfc3339(f.sealed_ns),
                kind: "crash-consistent",
            });
        }
        if let Some(last) = scan.last_lsn {
            next_lsn = Some(last + 1);
        } else if let Some(h) = scan.header {
            next_lsn.get_or_insert(h.base_lsn);
        }
        if let Some(f) = scan.fault.clone() {
            // Which damage may be a torn tail: the rule recovery applies. A torn header
            // is torn only as the newest segment of a journal; a lone file without a
            // header is not a segment. Inspect is stricter than recovery in one case:
            // if checksummed records follow the damage, recovery still cuts there (after
            // a power loss those are unsynced writes persisted out of order) with a
            // warning, but inspect reports corruption, since it cannot know whether the
            // machine lost power.
            let torn_tail = is_last
                && match scan.header {
                    None => only.is_none(),
                    Some(_) => crate::journal::may_be_torn_tail(file.as_ref(), &scan)?,
                };
            let following = if torn_tail {
                valid_records_after(file.as_ref(), scan.end)?
            } else {
                0
            };
            if torn_tail && following == 0 {
                report.warnings.push(format!(
                    "{}: torn tail at offset {} ({} bytes: {}); opening the site cuts it off",
                    path.display(),
                    scan.end,
                    scan.file_len - scan.end,
                    f.what
                ));
            } else {
                let what = if following > 0 {
                    format!("{} ({following} checksummed records follow it)", f.what)
                } else {
                    f.what
                };
                report.corrupt(Corruption {
                    path: path.clone(),
                    offset: f.offset,
                    what,
                });
            }
        } else if !scan.is_sealed() && !is_last {
            report.corrupt(Corruption {
                path: path.clone(),
                offset: scan.end,
                what: "segment has no footer but is not the newest".into(),
            });
        }
        jr.segments.push(sr);
    }
    report.journals.push(jr);
    Ok(())
}

/// Print a report for people.
pub fn print_text(r: &Report) {
    for j in &r.journals {
        println!(
            "journal {}{}",
            j.path.display(),
            j.machine
                .as_ref()
                .map(|m| format!(" (machine {m})"))
                .unwrap_or_default()
        );
        if let Some(id) = &j.machine_id {
            println!("  machine id {id}; disks: {}", j.disks.join(", "));
        }
        println!("  merge watermark: LSN {}", j.watermark_lsn);
        let total: u64 = j.segments.iter().map(|s| s.bytes).sum();
        println!("  {} segment(s), {} bytes", j.segments.len(), total);
        for s in &j.segments {
            let lsns = match (s.first_lsn, s.last_lsn) {
                (Some(a), Some(b)) => format!("LSN {a}..={b}"),
                _ => "no records".to_string(),
            };
            println!(
                "    {:>6}  {:<8} {:<24} {:>6} records ({} writes, {} zero), {} bytes",
                s.seq,
                if s.sealed { "sealed" } else { "active" },
                lsns,
                s.records,
                s.writes,
                s.zeroes,
                s.bytes
            );
        }
        let n = j.points.len();
        println!("  {n} recovery point(s)");
        let shown: Vec<&PointReport> = if n > 6 {
            j.points
                .iter()
                .take(3)
                .chain(j.points.iter().skip(n - 3))
                .collect()
        } else {
            j.points.iter().collect()
        };
        for (i, p) in shown.iter().enumerate() {
            if n > 6 && i == 3 {
                println!("    … {} more …", n - 6);
            }
            println!("    LSN {:>8}  {}  {}", p.lsn, p.time, p.kind);
        }
    }
    for w in &r.warnings {
        println!("warning: {w}");
    }
    match &r.corruption {
        None => println!("all checksums verified: OK"),
        Some(c) => println!(
            "CORRUPTION in {} at offset {}: {}",
            c.path.display(),
            c.offset,
            c.what
        ),
    }
}

impl PointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PointKind::AppConsistent => "app-consistent",
            _ => "crash-consistent",
        }
    }
}
