//! `replog inspect`: dump and verify a site, a machine, a journal or one segment —
//! and the replicas a site holds, or one replica file.
//!
//! Read-only: files are opened read-only and nothing is repaired. Every record's
//! checksum, every footer and LSN continuity are verified with the same scanner
//! recovery uses. Every replica file — segment, segment index, parent chunk, patch,
//! metadata, hash page — is decrypted and authenticated with the site's replica key, every
//! segment verified as the source's recovery would and its index compared with it,
//! and the chain from the parent to the newest segment checked. The report names
//! the first corruption exactly (file and offset).

use crate::error::{Error, Result};
use crate::format::meta::{Manifest, Watermark};
use crate::format::rfc3339;
use crate::journal::reader::{scan_segment, valid_records_after, Expect};
use crate::journal::{list_segments, PointKind};
use crate::replica::store::Replicas;
use crate::site::{is_site, list_machines, MACHINES_DIR};
use crate::storage::{read_all, FileStorage, OpenMode, Storage};
use crate::volume::{JOURNAL_DIR, MANIFEST_FILE, WATERMARK_FILE};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub journals: Vec<JournalReport>,
    pub replicas: Vec<ReplicaReport>,
    /// Single metadata or encrypted files inspected on their own.
    pub files: Vec<FileReport>,
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

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplicaReport {
    pub machine: String,
    pub generation: u32,
    pub source: String,
    pub initial_done: bool,
    pub parent_lsn: u64,
    pub received_lsn: u64,
    pub segments: u64,
    pub parent_chunks: u64,
    pub patches: u64,
    pub points: u64,
    pub objects_verified: u64,
    pub bytes_verified: u64,
    pub resync_under_way: bool,
    pub damage_recorded: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub path: PathBuf,
    /// What the file is.
    pub kind: String,
    /// What it holds, or what is needed to check it.
    pub detail: String,
    pub verified: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct PointReport {
    pub lsn: u64,
    pub time: String,
    pub kind: &'static str,
}

impl Report {
    /// Nothing is damaged and everything asked about was verified.
    pub fn ok(&self) -> bool {
        self.corruption.is_none() && self.files.iter().all(|f| f.verified)
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
        replicas: Vec::new(),
        files: Vec::new(),
        corruption: None,
        warnings: Vec::new(),
    };
    if !path.exists() {
        return Err(Error::NotFound(format!(
            "{} does not exist",
            path.display()
        )));
    }
    if path.is_file() && !is_segment_file(path)? {
        inspect_file(path, &mut report)?;
    } else if path.is_file() {
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
        // Only a site that holds replicas has (or needs) a replica key: inspect
        // never creates one.
        if path.join(crate::replica::store::REPLICAS_DIR).is_dir()
            || !crate::site::Site::read_config(path)?
                .replica
                .store
                .is_empty()
        {
            let replicas = Replicas::local(path)?;
            for m in replicas.machines()? {
                inspect_replica(&replicas, &m, &mut report)?;
            }
        }
    } else if let Some((site, machine)) = replica_dir(path) {
        inspect_replica(&Replicas::local(&site)?, &machine, &mut report)?;
    } else if path.join(MANIFEST_FILE).is_file() {
        inspect_journal(&path.join(JOURNAL_DIR), None, &mut report)?;
    } else if path.join(WATERMARK_FILE).is_file() || !list_segments(&FileStorage, path)?.is_empty()
    {
        inspect_journal(path, None, &mut report)?;
    } else {
        return Err(Error::InvalidInput(format!(
            "{} is not a replog site, machine, journal, segment or replica",
            path.display()
        )));
    }
    Ok(report)
}

/// Whether `path` is a journal segment (its magic; a file too short is taken for one,
/// so the segment scanner reports what is wrong with it).
fn is_segment_file(path: &Path) -> Result<bool> {
    let mut head = [0u8; 8];
    let f = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    let n = std::os::unix::fs::FileExt::read_at(&f, &mut head, 0)
        .map_err(|e| Error::io("read", path, e))?;
    Ok(n < 8
        || head == crate::format::segment::SEGMENT_MAGIC
        || !(head == crate::format::meta::META_MAGIC || head == crate::replica::crypt::MAGIC))
}

/// `SITE/replicas/<machine>` → (SITE, machine), when `path` is (in) one.
fn replica_dir(path: &Path) -> Option<(PathBuf, String)> {
    let abs = path.canonicalize().ok()?;
    let mut p = abs.as_path();
    while let Some(parent) = p.parent() {
        if parent
            .file_name()
            .is_some_and(|n| n == crate::replica::store::REPLICAS_DIR)
        {
            let site = parent.parent()?;
            if is_site(site) {
                let machine = p.file_name()?.to_str()?.to_string();
                return Some((site.to_path_buf(), machine));
            }
        }
        p = parent;
    }
    None
}

/// One metadata or encrypted replica file on its own: decoded; an encrypted one is
/// authenticated when it lies in a site's replica (the site has the key), and
/// otherwise the report says what it needs.
fn inspect_file(path: &Path, report: &mut Report) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    if bytes.starts_with(&crate::format::meta::META_MAGIC) {
        match crate::replica::store::decode_meta_file(&bytes) {
            Ok((kind, file)) => report.files.push(FileReport {
                path: path.to_path_buf(),
                kind: format!(
                    "{} (metadata kind {kind}, version {})",
                    crate::format::meta::kind_name(kind),
                    bytes
                        .get(8..10)
                        .map_or(0, |v| u16::from_le_bytes([v[0], v[1]]))
                ),
                detail: format!("{file:?}"),
                verified: true,
            }),
            Err(e) => report.corrupt(Corruption {
                path: path.to_path_buf(),
                offset: e.offset,
                what: e.what,
            }),
        }
        return Ok(());
    }
    // An encrypted replica file: which one, and can it be checked here?
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let in_hashes = path
        .parent()
        .and_then(|p| p.parent())
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "hashes");
    let kind = if in_hashes {
        "encrypted hash page (a resync's cache of parent chunk hashes)"
    } else if name.ends_with(".seg.enc") {
        "encrypted replica segment"
    } else if name.ends_with(".data.enc") {
        "encrypted resync patch"
    } else if name.ends_with(".idx.enc") {
        "encrypted index (of a segment or a patch)"
    } else {
        "encrypted replica parent chunk"
    };
    let Some((site, machine)) = replica_dir(path) else {
        report.files.push(FileReport {
            path: path.to_path_buf(),
            kind: kind.into(),
            detail: "encrypted with a site's replica key: it can be checked only with its \
                     site — run `replog inspect SITE` (or inspect it where it lies, under \
                     SITE/replicas/<machine>/)"
                .into(),
            verified: false,
        });
        return Ok(());
    };
    let before = report.corruption.is_none();
    inspect_replica(&Replicas::local(&site)?, &machine, report)?;
    report.files.push(FileReport {
        path: path.to_path_buf(),
        kind: kind.into(),
        detail: format!(
            "checked with its replica ({machine} at {}) and every other file of it",
            site.display()
        ),
        verified: before && report.corruption.is_none(),
    });
    Ok(())
}

/// Verify every file of the replica of `machine`.
fn inspect_replica(replicas: &Replicas, machine: &str, report: &mut Report) -> Result<()> {
    let mut rr = ReplicaReport {
        machine: machine.to_string(),
        ..Default::default()
    };
    let store = match replicas.open_readonly(machine) {
        Ok(s) => s,
        Err(Error::Corruption { path, offset, what }) => {
            report.corrupt(Corruption { path, offset, what });
            report.replicas.push(rr);
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    rr.generation = store.generation();
    rr.source = crate::identity::SiteId(store.manifest().source_site).to_string();
    rr.initial_done = store.initial().done;
    rr.parent_lsn = store.parent().lsn;
    rr.received_lsn = store.received().lsn;
    rr.patches = store.parent().patches;
    rr.damage_recorded = store.damage()?;
    // Every metadata file decodes (reading them at open did most; these may be absent).
    for meta in ["initial", "retention.meta", "resync.meta", "scrub.meta"] {
        if let Some(b) = store.backend().get(&store.key_of(meta))? {
            if let Err(e) = crate::replica::store::decode_meta_file(&b) {
                report.corrupt(Corruption {
                    path: store.locate(meta),
                    offset: e.offset,
                    what: e.what,
                });
            }
        }
    }
    rr.resync_under_way = match store.resync_progress() {
        Ok(p) => p.is_some(),
        Err(Error::Corruption { path, offset, what }) => {
            report.corrupt(Corruption { path, offset, what });
            false
        }
        Err(e) => return Err(e),
    };
    // Every object authenticates.
    let found = |e: Error, report: &mut Report| -> Result<()> {
        match e {
            Error::Corruption { path, offset, what } => {
                report.corrupt(Corruption { path, offset, what });
                Ok(())
            }
            other => Err(other),
        }
    };
    for item in crate::replica::scrub::items(&store)? {
        match item.check(&store) {
            Ok(n) => {
                rr.objects_verified += 1;
                rr.bytes_verified += n;
                match item {
                    crate::replica::scrub::Item::Chunk(..) => rr.parent_chunks += 1,
                    crate::replica::scrub::Item::Segment(_) => rr.segments += 1,
                    _ => {}
                }
            }
            Err(e) => found(e, report)?,
        }
    }
    // The hash pages (a resync's cache): damage is reported like any file's, though
    // a resync would only read around the page and rebuild it.
    for (d, _) in store.manifest().disks.iter().enumerate() {
        for page in store.stored_hash_pages(d as u32)? {
            match store.check_hash_page(d as u32, page) {
                Ok(n) => {
                    rr.objects_verified += 1;
                    rr.bytes_verified += n;
                }
                Err(e) => found(e, report)?,
            }
        }
    }
    // The chain: from the parent to the newest segment, every LSN once, each segment
    // what its index says.
    let mut next = store.parent().lsn + 1;
    for seq in store.parent().seq + 1..=store.received().segment_seq {
        match store.verify_segment(seq, next) {
            Ok(index) => next = index.last_lsn + 1,
            Err(Error::BrokenChain(what)) => {
                report.corrupt(Corruption {
                    path: store.locate(&format!("segments/{seq:020}.seg.enc")),
                    offset: 0,
                    what: format!("the chain breaks: {what}"),
                });
                break;
            }
            Err(e) => {
                found(e, report)?;
                break;
            }
        }
    }
    if report.corruption.is_none() && next != store.received().lsn + 1 {
        report.corrupt(Corruption {
            path: store.locate("received"),
            offset: 0,
            what: format!(
                "the received mark says LSN {} but the segments end at {}",
                store.received().lsn,
                next - 1
            ),
        });
    }
    rr.points = crate::replica::points::materialisable(&store)
        .map(|p| p.len() as u64)
        .unwrap_or(0);
    report.replicas.push(rr);
    Ok(())
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
        let merged_note = |path: &Path| {
            format!(
                "{}: merged while inspect read the journal (a running site); not checked",
                path.display()
            )
        };
        let file = match storage.open(&path, OpenMode::ReadOnly) {
            Ok(f) => f,
            Err(_) if only.is_none() && merged_meanwhile(&storage, dir, seq) => {
                report.warnings.push(merged_note(&path));
                continue;
            }
            Err(e) => return Err(e),
        };
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
        let fault = scan.fault.clone();
        if fault.is_some() && only.is_none() && merged_meanwhile(&storage, dir, seq) {
            // The compactor merged it and wrote another segment into the file (a
            // spare) while it was read: what was read is no longer the segment.
            report.warnings.push(merged_note(&path));
        } else if let Some(f) = fault {
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
            // The newest segment written into a recycled file (`journal::spare`):
            // an earlier segment's bytes follow its records, as they do while it is
            // being written. Not a fault unless records of its own (its salt) follow.
            let salt = scan.header.map_or(0, |h| h.salt);
            let following = if torn_tail {
                valid_records_after(file.as_ref(), scan.end, salt)?
            } else {
                0
            };
            if torn_tail && salt != 0 && following == 0 {
                sr.bytes = scan.end;
            } else if torn_tail && following == 0 {
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

/// True if the merge watermark of journal `dir` now says segment `seq` was merged
/// (read again: a running site merges while inspect reads).
fn merged_meanwhile(storage: &FileStorage, dir: &Path, seq: u64) -> bool {
    let Ok(f) = storage.open(&dir.join(WATERMARK_FILE), OpenMode::ReadOnly) else {
        return false;
    };
    read_all(f.as_ref(), crate::volume::META_FILE_LIMIT)
        .ok()
        .and_then(|b| Watermark::decode(&b).ok())
        .is_some_and(|w| seq <= w.segment_seq)
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
    for rr in &r.replicas {
        println!(
            "replica {} (generation {}, from site {})",
            rr.machine, rr.generation, rr.source
        );
        println!(
            "  parent at LSN {}, received up to LSN {}; {} segment(s), {} parent chunk(s), \
             {} patch(es), {} point(s){}",
            rr.parent_lsn,
            rr.received_lsn,
            rr.segments,
            rr.parent_chunks,
            rr.patches,
            rr.points,
            if rr.initial_done {
                ""
            } else {
                "; initial replication not complete"
            }
        );
        println!(
            "  {} file(s), {} bytes decrypted and authenticated{}",
            rr.objects_verified,
            rr.bytes_verified,
            if rr.resync_under_way {
                "; a resync is under way"
            } else {
                ""
            }
        );
        if let Some(d) = &rr.damage_recorded {
            println!("  damage recorded (the source resynchronises): {d}");
        }
    }
    for f in &r.files {
        println!("{}: {}", f.path.display(), f.kind);
        println!("  {}", f.detail);
    }
    for w in &r.warnings {
        println!("warning: {w}");
    }
    match &r.corruption {
        None if r.files.iter().any(|f| !f.verified) => {
            println!("not verified: see above for what it needs")
        }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_is_merged_meanwhile_only_if_the_watermark_now_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        assert!(!merged_meanwhile(&FileStorage, dir, 1), "no watermark");
        std::fs::write(dir.join(WATERMARK_FILE), b"not a watermark").unwrap();
        assert!(
            !merged_meanwhile(&FileStorage, dir, 1),
            "a damaged watermark"
        );
        let w = Watermark {
            lsn: 40,
            segment_seq: 5,
        };
        std::fs::write(dir.join(WATERMARK_FILE), w.encode()).unwrap();
        assert!(merged_meanwhile(&FileStorage, dir, 5));
        assert!(merged_meanwhile(&FileStorage, dir, 4));
        assert!(!merged_meanwhile(&FileStorage, dir, 6));
    }
}
