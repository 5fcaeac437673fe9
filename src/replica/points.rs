//! Recovery points held by a replica: every flush/fsync point record and every seal in
//! the segments received (from their indexes), and the point the parent stands for
//! after a merge — each an LSN with its wall-clock time, its kind and the source's
//! digests of every disk there.
//!
//! Retention (per replica, set by the source's relationship; ages count from when this
//! site stored the point, not from the source's clock): a point is kept while it
//! is younger than the window, an app-consistent one while it is younger than the
//! app-consistent window, and the newest point always. Points retention lets go are
//! "expired": not listed, not restorable, and the target compactor merges them away.

use super::store::{IndexedPoint, ReplicaStore};
use crate::error::{Error, Result};

/// One recovery point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaPoint {
    pub lsn: u64,
    pub time_ns: u64,
    pub app_consistent: bool,
    /// The source's digest of each disk at this point (None: not kept then).
    pub digests: Option<Vec<u64>>,
    /// When this site stored it (retention ages points by this clock).
    pub received_ns: u64,
    /// The plan point it belongs to (`replog plan checkpoint` at the source), if any.
    pub plan_point: Option<u64>,
}

impl ReplicaPoint {
    /// The point's ID as `replog points` prints it and `--at` accepts it.
    pub fn id(&self) -> String {
        format!("pt-{}", self.lsn)
    }

    fn from_indexed(p: &IndexedPoint, plan_point: Option<u64>) -> Self {
        ReplicaPoint {
            lsn: p.lsn,
            time_ns: p.time_ns,
            app_consistent: p.app,
            digests: p.digests.clone(),
            received_ns: p.received_ns,
            plan_point,
        }
    }
}

/// A point for people: `pt-N (time[, app-consistent])`, the time being "the initial
/// copy" for the initial copy's state (no source time).
pub fn describe(lsn: u64, time_ns: u64, app_consistent: bool) -> String {
    format!(
        "pt-{lsn} ({}{})",
        if time_ns > 0 {
            crate::format::rfc3339(time_ns)
        } else {
            "the initial copy".into()
        },
        if app_consistent {
            ", app-consistent"
        } else {
            ""
        }
    )
}

/// A plan point's ID as `replog points` prints it and `--at` accepts it.
pub fn plan_point_id(id: u64) -> String {
    format!("pp-{id}")
}

/// Every point that can still be materialised, oldest first: the parent's (when it is
/// one), then every point after the parent (and not before a merge under way).
pub fn materialisable(store: &ReplicaStore) -> Result<Vec<ReplicaPoint>> {
    let parent = store.parent();
    if parent.resyncing {
        return Ok(Vec::new());
    }
    // Nothing before the parent, a merge under way, or a resync's first consistent
    // point.
    let floor = parent
        .merging_to
        .map_or(parent.lsn, |(l, _)| l.max(parent.lsn))
        .max(parent.valid_from);
    let mut out: Vec<ReplicaPoint> = Vec::new();
    if parent.merging_to.is_none() {
        if let Some(p) = parent.point.as_ref().filter(|p| p.lsn >= parent.valid_from) {
            out.push(ReplicaPoint::from_indexed(p, None));
        }
    }
    for seq in parent.seq + 1..=store.received().segment_seq {
        let index = store.segment_index(seq)?;
        for p in &index.points {
            if p.lsn >= floor && out.last().is_none_or(|q| q.lsn < p.lsn) {
                out.push(ReplicaPoint::from_indexed(p, index.plan_point_at(p.lsn)));
            }
        }
    }
    Ok(out)
}

/// The newest point the replica holds (cheap: one index read), for status.
pub fn newest(store: &ReplicaStore) -> Result<Option<ReplicaPoint>> {
    let parent = store.parent();
    if parent.resyncing {
        return Ok(None);
    }
    let floor = parent.valid_from;
    let received = store.received().segment_seq;
    if received > parent.seq {
        let index = store.segment_index(received)?;
        if let Some(p) = index.points.iter().rev().find(|p| p.lsn >= floor) {
            return Ok(Some(ReplicaPoint::from_indexed(
                p,
                index.plan_point_at(p.lsn),
            )));
        }
        return Ok(None);
    }
    Ok(parent
        .point
        .as_ref()
        .filter(|p| p.lsn >= floor && parent.merging_to.is_none())
        .map(|p| ReplicaPoint::from_indexed(p, None)))
}

/// Whether retention keeps `p` at `now_ns` (the newest point is kept regardless).
pub fn kept(store: &ReplicaStore, p: &ReplicaPoint, now_ns: u64) -> bool {
    let r = store.retention();
    let age_ms = now_ns.saturating_sub(p.received_ns) / 1_000_000;
    age_ms <= r.window_ms || (p.app_consistent && age_ms <= r.app_window_ms.max(r.window_ms))
}

/// The points retention keeps at `now_ns`, oldest first.
pub fn retained(store: &ReplicaStore, now_ns: u64) -> Result<Vec<ReplicaPoint>> {
    let all = materialisable(store)?;
    let newest = all.last().map(|p| p.lsn);
    Ok(all
        .into_iter()
        .filter(|p| Some(p.lsn) == newest || kept(store, p, now_ns))
        .collect())
}

/// The point at exactly `lsn`, whatever its age, if the replica can still
/// materialise it (the initial copy's state included).
pub fn exact(store: &ReplicaStore, lsn: u64) -> Result<ReplicaPoint> {
    if let Some(p) = materialisable(store)?.into_iter().find(|p| p.lsn == lsn) {
        return Ok(p);
    }
    let parent = store.parent();
    if store.initial().done && parent.lsn == lsn && !parent.resyncing && parent.valid_from <= lsn {
        return Ok(ReplicaPoint {
            lsn,
            time_ns: 0,
            app_consistent: false,
            digests: None,
            received_ns: 0,
            plan_point: None,
        });
    }
    Err(Error::NotFound(format!(
        "the replica can no longer materialise the point at LSN {lsn}"
    )))
}

/// The points `replog points` lists now.
pub fn list(store: &ReplicaStore) -> Result<Vec<ReplicaPoint>> {
    retained(store, crate::format::now_ns())
}

/// Resolve a POINT (`latest`, an LSN, an RFC 3339 time — the newest point at or before
/// it — or a point ID) to a point this replica keeps.
pub fn resolve(store: &ReplicaStore, at: &str) -> Result<ReplicaPoint> {
    let now = crate::format::now_ns();
    let points = retained(store, now)?;
    if store.parent().resyncing {
        return Err(Error::NotFound(
            "this replica is being resynchronised; no point can be read until it ends".into(),
        ));
    }
    if at == "latest" {
        if let Some(p) = points.last() {
            return Ok(p.clone());
        }
        if store.initial().done && store.parent().valid_from > store.parent().lsn {
            return Err(Error::NotFound(
                "no consistent point since the resync yet (the first one arrives with the \
                 next segment)"
                    .into(),
            ));
        }
        if store.initial().done {
            // Only the initial copy so far: its state is the one point there is.
            return Ok(ReplicaPoint {
                lsn: store.parent().lsn,
                time_ns: 0,
                app_consistent: false,
                digests: None,
                received_ns: 0,
                plan_point: None,
            });
        }
        return Err(Error::NotFound(
            "this replica holds no recovery point yet (initial replication is not complete)".into(),
        ));
    }
    if at == "latest-app-consistent" {
        return points
            .iter()
            .rev()
            .find(|p| p.app_consistent)
            .cloned()
            .ok_or_else(|| {
                Error::NotFound(
                    "this replica holds no app-consistent point (take one with `replog \
                     checkpoint SITE MACHINE --app-consistent` at the source)"
                        .into(),
                )
            });
    }
    if let Some(n) = at.strip_prefix("pp-") {
        let id: u64 = n.parse().map_err(|_| {
            Error::NotFound(format!(
                "{at:?} is not a plan point ID (see `replog points`)"
            ))
        })?;
        return points
            .iter()
            .rev()
            .find(|p| p.plan_point == Some(id))
            .cloned()
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "this replica keeps no point of plan point {at} (expired, not received \
                     yet, or never taken of this machine; see `replog points`)"
                ))
            });
    }
    let oldest = points.first().map(|p| p.lsn).unwrap_or(u64::MAX);
    let by_lsn = |lsn: u64| -> Result<ReplicaPoint> {
        if let Some(p) = points.iter().find(|p| p.lsn == lsn) {
            return Ok(p.clone());
        }
        if lsn < oldest && !points.is_empty() {
            return Err(Error::NotFound(format!(
                "{at:?} has expired: it is older than this replica's retention keeps \
                 (oldest point kept: pt-{oldest})"
            )));
        }
        Err(Error::NotFound(format!(
            "{at:?} is not a recovery point of this replica (see `replog points`)"
        )))
    };
    if let Some(n) = at.strip_prefix("pt-") {
        let lsn = n.parse().map_err(|_| {
            Error::NotFound(format!("{at:?} is not a point ID (see `replog points`)"))
        })?;
        return by_lsn(lsn);
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
        .cloned()
        .ok_or_else(|| {
            Error::NotFound(match points.first() {
                Some(p) => format!(
                    "no recovery point at or before {at}: the oldest point kept is {} at {}",
                    p.id(),
                    crate::format::rfc3339(p.time_ns)
                ),
                None => format!("no recovery point at or before {at}"),
            })
        })
}
