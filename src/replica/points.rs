//! Recovery points held by a replica: every flush/fsync point record and every segment
//! seal in the segments received, each an LSN with its wall-clock time. (Retention,
//! app-consistent checkpoints and digests come with the rest of recovery points.)

use super::store::ReplicaStore;
use crate::error::{Error, Result};
use crate::journal::reader::{scan_segment, Expect};
use crate::storage::{MemStorage, OpenMode, Storage};
use std::path::Path;

/// One recovery point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaPoint {
    pub lsn: u64,
    pub time_ns: u64,
    pub app_consistent: bool,
}

impl ReplicaPoint {
    /// The point's ID as `replog points` prints it and `--at` accepts it.
    pub fn id(&self) -> String {
        format!("pt-{}", self.lsn)
    }
}

/// Every point in the stored segments, oldest first (one per LSN).
pub fn list(store: &ReplicaStore) -> Result<Vec<ReplicaPoint>> {
    let man = store.manifest();
    let mut out: Vec<ReplicaPoint> = Vec::new();
    let mut next_lsn = man.base_lsn + 1;
    for seq in man.base_seq + 1..=store.received().segment_seq {
        let plain = store.read_segment(seq)?;
        let mem = MemStorage::new();
        let dir = Path::new("/points");
        mem.create_dir_all(dir)?;
        let f = mem.open(&dir.join("seg"), OpenMode::CreateNew)?;
        f.write_at(&[&plain], 0)?;
        let expect = Expect {
            machine_id: Some(man.machine_id),
            seq: Some(seq),
            first_lsn: Some(next_lsn),
            disk_count: Some(man.disks.len() as u32),
        };
        let scan = scan_segment(f.as_ref(), expect, |rec| {
            if let Some((time_ns, app)) = rec.point() {
                out.push(ReplicaPoint {
                    lsn: rec.header.lsn,
                    time_ns,
                    app_consistent: app,
                });
            }
            Ok(())
        })?;
        if let Some(fault) = scan.fault {
            return Err(Error::corruption(
                format!("replica segment {seq}"),
                fault.offset,
                fault.what,
            ));
        }
        if let Some(footer) = scan.footer {
            if out.last().map(|p| p.lsn) != Some(footer.last_lsn) {
                out.push(ReplicaPoint {
                    lsn: footer.last_lsn,
                    time_ns: footer.sealed_ns,
                    app_consistent: false,
                });
            }
        }
        if let Some(last) = scan.last_lsn {
            next_lsn = last + 1;
        }
    }
    Ok(out)
}

/// Resolve a POINT (`latest`, an LSN, an RFC 3339 time — the newest point at or before
/// it — or a point ID) to the LSN of a point this replica holds.
pub fn resolve(store: &ReplicaStore, at: &str) -> Result<u64> {
    if at == "latest" {
        return Ok(store.received().lsn);
    }
    let points = list(store)?;
    let unknown = || {
        Error::NotFound(format!(
            "{at:?} is not a recovery point of this replica (see `replog points`)"
        ))
    };
    let by_lsn = |lsn: u64| {
        points
            .iter()
            .find(|p| p.lsn == lsn)
            .map(|p| p.lsn)
            .ok_or_else(unknown)
    };
    if let Some(n) = at.strip_prefix("pt-") {
        return by_lsn(n.parse().map_err(|_| unknown())?);
    }
    if let Ok(lsn) = at.parse::<u64>() {
        return by_lsn(lsn);
    }
    let t = humantime::parse_rfc3339_weak(at).map_err(|_| {
        Error::InvalidInput(format!(
            "--at {at:?}: use latest, an LSN, a point ID (pt-…) or an RFC 3339 time"
        ))
    })?;
    let ns = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    points
        .iter()
        .rev()
        .find(|p| p.time_ns <= ns)
        .map(|p| p.lsn)
        .ok_or_else(|| Error::NotFound(format!("no recovery point at or before {at}")))
}
