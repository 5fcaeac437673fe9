//! Plan points: one recovery point per machine of a plan, all at one barrier
//! (`volume::plan_point`), taken at the primary site by `replog plan checkpoint`;
//! and, at the target, the choice of the point each machine of a run fails over to.

use super::file::{Known, Plan};
use crate::control::{PlanPointReply, Request};
use crate::error::{Error, Result};
use crate::protection::FailoverKind;
use crate::replica::points::{plan_point_id, retained, ReplicaPoint};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

/// `replog plan checkpoint SITE PLAN`: hold writes to every machine of `plan` at one
/// barrier (taking the holds at most `max_pause`), record a point in each under one
/// plan-point ID, release them. Every machine must be a protected primary here.
pub fn checkpoint(
    site: &Path,
    plan: &Plan,
    app_consistent: bool,
    max_pause: Duration,
) -> Result<PlanPointReply> {
    let mut machines = Vec::new();
    for m in plan.machines() {
        match super::store::known(site, m) {
            Known::Primary => {}
            Known::Replica => {
                return Err(Error::InvalidInput(format!(
                    "{m} is a replica at this site: take plan points at the primary site"
                )))
            }
            _ => {
                return Err(Error::InvalidInput(format!(
                    "{m} is not a primary of this site"
                )))
            }
        }
        if crate::replication::relationship::Relationship::load(site, m)?.is_none() {
            return Err(Error::InvalidInput(format!(
                "{m} is not protected: its plan point would reach no replica"
            )));
        }
        machines.push(m.clone());
    }
    let reply = crate::control::run(
        site,
        &Request::PlanCheckpoint {
            machines,
            app_consistent,
            max_pause_ms: max_pause.as_millis() as u64,
        },
    )?;
    reply
        .plan_point
        .ok_or_else(|| Error::InvalidInput("the plan point was not recorded".into()))
}

/// The plan points `machine`'s replica keeps (ID → its point there), or None when
/// the machine cannot fail over here now (not a replica here, or promoted already).
fn plan_points_of(site: &Path, machine: &str) -> Result<Option<BTreeMap<u64, ReplicaPoint>>> {
    // Checked before the replica key is read: nothing is created for a primary.
    if !crate::replica::store::held_at(site, machine) {
        return Ok(None);
    }
    // A replica that does not open, or was promoted, fails at its own step.
    let Ok(store) = crate::replica::store::Replicas::local(site)?.open_readonly(machine) else {
        return Ok(None);
    };
    if !matches!(store.promotion(), Ok(None)) {
        return Ok(None);
    }
    let mut out = BTreeMap::new();
    for p in retained(&store, crate::format::now_ns())? {
        if let Some(id) = p.plan_point {
            out.insert(id, p);
        }
    }
    Ok(Some(out))
}

/// The point each machine of a run of `plan` as `kind` asks for, by the rule `at`:
/// `latest` and `latest-app-consistent` are each machine's own; `plan-point` is the
/// newest plan point every machine that can fail over keeps, `pp-ID` that one.
/// Returns the plan point chosen and each machine's `pt-LSN`.
pub fn choose(
    site: &Path,
    plan: &Plan,
    kind: FailoverKind,
    at: &str,
) -> Result<(Option<u64>, BTreeMap<String, String>)> {
    if kind == FailoverKind::Planned {
        return Ok((None, BTreeMap::new()));
    }
    let wanted = match at {
        "latest" | "latest-app-consistent" => return Ok((None, BTreeMap::new())),
        "plan-point" => None,
        _ => match at.strip_prefix("pp-").and_then(|n| n.parse::<u64>().ok()) {
            Some(id) => Some(id),
            None => {
                return Err(Error::InvalidInput(format!(
                    "--at {at:?}: a plan fails over at latest, latest-app-consistent, \
                     plan-point (the newest plan point every machine keeps) or a plan point \
                     ID (pp-…, see `replog points`)"
                )))
            }
        },
    };
    // Machines that cannot fail over at all fail at their step (an unplanned run goes
    // on without them); the others must share the point.
    let mut held: BTreeMap<String, BTreeMap<u64, ReplicaPoint>> = BTreeMap::new();
    for m in plan.machines() {
        if let Some(ids) = plan_points_of(site, m)? {
            held.insert(m.clone(), ids);
        }
    }
    if held.is_empty() {
        return Err(Error::InvalidInput(format!(
            "no machine of plan {} is a replica here that can fail over",
            plan.name
        )));
    }
    let mut common: Option<BTreeSet<u64>> = None;
    for ids in held.values() {
        let these: BTreeSet<u64> = ids.keys().copied().collect();
        common = Some(match common {
            None => these,
            Some(c) => c.intersection(&these).copied().collect(),
        });
    }
    let common = common.unwrap_or_default();
    let id = match wanted {
        Some(id) if common.contains(&id) => id,
        // The newest by the write order of a machine (every barrier holds all its
        // machines, so any one machine's LSNs order them), not by the ID's clock.
        None if !common.is_empty() => {
            let first = held.values().next();
            *common
                .iter()
                .max_by_key(|id| first.and_then(|ids| ids.get(id)).map_or(0, |p| p.lsn))
                .unwrap_or(&0)
        }
        _ => {
            let each: Vec<String> = held
                .iter()
                .map(|(m, ids)| match ids.keys().next_back() {
                    Some(id) => format!("{m}: newest {}", plan_point_id(*id)),
                    None => format!("{m}: none"),
                })
                .collect();
            let what = match wanted {
                Some(id) => format!("plan point {} is not", plan_point_id(id)),
                None => "no plan point is".into(),
            };
            return Err(Error::NotFound(format!(
                "{what} kept by every machine of plan {} ({}); take one with `replog plan \
                 checkpoint SITE {}` at the primary site and let it ship",
                plan.name,
                each.join(", "),
                plan.name
            )));
        }
    };
    let points = held
        .iter()
        .filter_map(|(m, ids)| ids.get(&id).map(|p| (m.clone(), p.id())))
        .collect();
    Ok((Some(id), points))
}
