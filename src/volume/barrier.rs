//! A plan point: one recovery point in each of several machines, all at one barrier,
//! so that together they are a state the machines were in at one moment (what Azure
//! Site Recovery calls multi-VM consistency).
//!
//! Each machine's writes are ordered by its writer lock. Holding every machine's
//! writer lock at once, then appending a point to each, cuts every machine's write
//! order at the same instant: a write acknowledged to any machine before the barrier
//! is in that machine's point, and a write that began after it in none. Taking the
//! locks one after another while releasing each would not do: a guest that writes
//! to A and then to B could have its write to B inside B's point while the write to
//! A that preceded it, which arrived after A's point, is not in A's.
//!
//! Locks are taken in name order (so two barriers over overlapping machines cannot
//! deadlock) with one deadline for all; if one cannot be had in time, every lock
//! taken is released and nothing is recorded. The point records carry the plan
//! point's ID (the barrier's wall clock in ns) after their digests
//! (`format::record`); the points are made durable after the locks are released, so
//! writes wait only for the appends. Should an append fail (a write error poisons
//! that machine), the machines before it keep a point with the ID while the others
//! have none: no machine set offers it as a plan point of all of them, and what was
//! recorded is still one instant's state.

use super::Machine;
use crate::error::{Error, Result};
use crate::journal::Point;
use std::time::{Duration, Instant};

/// A plan-point ID: the wall clock in ns, unique within this process (two plan
/// points taken in one clock tick, or after the clock stepped back, still differ).
/// Which plan point is newest is decided by LSN, not by ID (`plan::points`).
fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = crate::format::now_ns().max(1);
    let prev = LAST
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
            Some(now.max(last + 1))
        })
        .unwrap_or(0);
    now.max(prev + 1)
}

/// What a barrier recorded.
#[derive(Debug, Clone)]
pub struct PlanPoint {
    /// The ID every machine's point carries.
    pub id: u64,
    /// Each machine's point, in name order.
    pub points: Vec<(String, Point)>,
    /// How long writes to the first machine locked were held (the longest pause).
    pub held: Duration,
    /// How long taking the locks took (writes in flight finishing).
    pub waited: Duration,
}

/// Record one point in each of `machines` at one barrier (see the module
/// documentation); gives up, recording nothing, when the writer locks cannot all be
/// had within `max_wait`.
pub fn plan_point(
    machines: &[&Machine],
    app_consistent: bool,
    max_wait: Duration,
) -> Result<PlanPoint> {
    let mut sorted: Vec<&Machine> = machines.to_vec();
    sorted.sort_by(|a, b| a.name().cmp(b.name()));
    if sorted
        .windows(2)
        .any(|w| w.first().map(|m| m.name()) == w.get(1).map(|m| m.name()))
    {
        return Err(Error::InvalidInput(
            "a plan point names a machine twice".into(),
        ));
    }
    if sorted.is_empty() {
        return Err(Error::InvalidInput("a plan point needs machines".into()));
    }
    for m in &sorted {
        if !m.keeps_digests() {
            return Err(Error::InvalidInput(format!(
                "{} keeps no digests (it is not protected): a plan point is for machines \
                 whose points reach a replica",
                m.name()
            )));
        }
        if let Some(why) = m.fenced() {
            return Err(Error::InvalidInput(format!(
                "{} refuses writes ({why}): no plan point is taken of it",
                m.name()
            )));
        }
        m.inner.check_poison()?;
    }
    let start = Instant::now();
    let deadline = start + max_wait;
    let mut guards = Vec::with_capacity(sorted.len());
    let mut first_locked = None;
    for m in &sorted {
        match m.inner.writer.try_lock_until(deadline) {
            Some(g) => {
                first_locked.get_or_insert_with(Instant::now);
                guards.push(g);
            }
            None => {
                drop(guards);
                return Err(Error::Busy(format!(
                    "writes to {} could not be held within {} ms (a write or a seal took \
                     longer); nothing was recorded",
                    m.name(),
                    max_wait.as_millis()
                )));
            }
        }
    }
    let waited = start.elapsed();
    // Checked again under the locks: a machine closed meanwhile (reopened by a
    // failover, whose new instance owns the journal now) or fenced takes no point.
    for m in &sorted {
        m.inner.check_fence()?;
        m.inner.check_poison()?;
    }
    let id = next_id();
    let mut points = Vec::with_capacity(sorted.len());
    for (m, g) in sorted.iter().zip(guards.iter_mut()) {
        let p = m
            .inner
            .append_tagged_point_locked(g, app_consistent, Some(id))?;
        points.push((m.name().to_string(), p));
    }
    drop(guards);
    let held = first_locked.map(|t| t.elapsed()).unwrap_or_default();
    for (m, (_, p)) in sorted.iter().zip(&points) {
        m.inner.sync_to(p.lsn)?;
    }
    Ok(PlanPoint {
        id,
        points,
        held,
        waited,
    })
}
