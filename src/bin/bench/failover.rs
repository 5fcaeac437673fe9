//! Failover figures: an unplanned failover and a test copy of a 1 GiB and an 8 GiB
//! replica with the same history (nothing is copied, so the ratio should be ~1),
//! and a planned failover with 64 MiB unshipped against shipping 64 MiB alone.
//!
//! Everything runs as the commands do with no serve: the failover jobs through
//! `failover::run` on an offline host; the planned failover's target is the run's
//! target site in this process (mutual TLS on 127.0.0.1), which promotes, verifies
//! the point's digests and opens the machine before it answers.

use super::replica::TargetSite;
use super::{median, pattern_at, progress, Bench, Figure, Result, GIB, MIB};
use replog::failover::{planned, run, Host, Offline};
use replog::protection::FailoverKind;
use replog::replication::relationship::Relationship;
use replog::replication::shipper::Shipper;
use replog::{Machine, Site};
use std::time::Instant;

fn ms_since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

impl Bench {
    /// Unplanned failover (then cancel) and test copy (then cleanup) of `fo1g` and
    /// `fo8g`, interleaved; medians.
    pub fn failover_by_size(&mut self, t: &TargetSite) -> Result<Vec<Figure>> {
        const UNPLANNED: &str = "unplanned failover, 8GiB vs 1GiB disk";
        const TEST: &str = "open a test copy, 8GiB vs 1GiB disk";
        progress(&format!(
            "{UNPLANNED}; {TEST}: two replicas with the same history"
        ));
        let names = ["fo1g", "fo8g"];
        self.replica_with_history(t, names[0], GIB)?;
        self.replica_with_history(t, names[1], 8 * GIB)?;
        let runs = if self.quick { 4 } else { 16 };
        let host: &dyn Host = &*t.host;
        let (mut unplanned, mut test) = ([vec![], vec![]], [vec![], vec![]]);
        for i in 0..runs {
            let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
            for k in order {
                let name = names[k];
                let t0 = Instant::now();
                run::failover(host, name, FailoverKind::Unplanned, "latest", None)?;
                unplanned[k].push(ms_since(t0));
                run::cancel(host, name)?;
                let t0 = Instant::now();
                run::failover(host, name, FailoverKind::Test, "latest", None)?;
                test[k].push(ms_since(t0));
                run::cleanup_test(host, name, None, None)?;
            }
        }
        let figure = |name: &str, runs_ms: &[Vec<f64>; 2], what: &str| {
            let (small, big) = (median(&runs_ms[0]), median(&runs_ms[1]));
            Figure::versus(
                name,
                big,
                small,
                "ms",
                format!(
                    "{what} (a job, the point pinned, the machine opened on the replica \
                     point: nothing copied), median of {runs}; 1 GiB {small:.1} ms, 8 GiB \
                     {big:.1} ms; ratio ~1 means size does not matter"
                ),
            )
        };
        Ok(vec![
            figure(UNPLANNED, &unplanned, "replog failover at latest"),
            figure(TEST, &test, "replog failover --test at latest"),
        ])
    }

    /// A planned failover of a 1 GiB machine with 64 MiB written and not shipped
    /// (fence, ship, promote, verify the point's digests at the target, open), against
    /// shipping 64 MiB of the same machine just before; one fresh machine per run.
    pub fn planned_failover(&mut self, t: &TargetSite) -> Result<Figure> {
        const NAME: &str = "planned failover, 64MiB unshipped vs shipping 64MiB";
        let unshipped = if self.quick { 16 * MIB } else { 64 * MIB };
        let runs = if self.quick { 1 } else { 3 };
        progress(&format!("{NAME}: {runs} machine(s) of 1 GiB"));
        // A source site of its own, owned by the offline host the command uses.
        let src = self.dir.join("planned-src");
        Site::init(&src)?;
        let (sid, tid) = (
            replog::identity::Identity::load(&src)?.id(),
            replog::identity::Identity::load(&t.path)?.id(),
        );
        replog::identity::trust(&src, tid)?;
        replog::identity::trust(&t.path, sid)?;
        let host = Offline::new(Site::open(&src)?)?;
        let (mut ship_ms, mut planned_ms) = (Vec::new(), Vec::new());
        for r in 0..runs {
            let name = format!("pf{r}");
            host.site().create_disk(&name, "d0", GIB, None)?;
            Relationship {
                target: t.addr.clone(),
                target_id: tid.to_string(),
                ..Default::default()
            }
            .save(&src, &name)?;
            let m = host.machine(&name)?;
            let mut shipper = Shipper::new(&src, &m, &t.addr);
            shipper.ship_once(&m)?;
            self.write_unshipped(&m, unshipped, 0)?;
            let t0 = Instant::now();
            m.seal()?;
            let acked = shipper.ship_once(&m)?.acked_lsn;
            if acked < m.status().last_lsn {
                return Err(format!("{name}: shipped up to LSN {acked} only").into());
            }
            ship_ms.push(ms_since(t0));
            drop(shipper);
            self.write_unshipped(&m, unshipped, unshipped)?;
            drop(m);
            let ship = planned::OfflineShipping::new(&src, &t.addr);
            let t0 = Instant::now();
            planned::run(&host, &ship, &name, None)?;
            planned_ms.push(ms_since(t0));
            for (side, site) in [("primary", &src), ("target", &t.path)] {
                progress(&format!("  {side}: {}", step_times(site, &name)?));
            }
        }
        let (base, value) = (median(&ship_ms), median(&planned_ms));
        Ok(Figure::versus(
            NAME,
            value,
            base,
            "ms",
            format!(
                "{} MiB incompressible in 1 MiB writes; planned = fence + seal + ship + \
                 promote + verify every disk's digests at the target (reads the 1 GiB \
                 point) + open; median of {runs}: ship {base:.0} ms, planned {value:.0} ms",
                unshipped / MIB
            ),
        ))
    }

    /// `bytes` of incompressible data in 1 MiB writes from disk offset `at`, flushed.
    fn write_unshipped(&self, m: &Machine, bytes: u64, at: u64) -> Result<()> {
        let v = m.volume("d0")?;
        let mut done = 0;
        while done < bytes {
            v.write(
                at + done,
                pattern_at(self.pattern.as_slice(), at + done, MIB as usize),
            )?;
            done += MIB;
        }
        m.flush()?;
        Ok(())
    }
}

/// The steps of the newest planned-failover job of `machine` at `site`, with times.
fn step_times(site: &std::path::Path, machine: &str) -> Result<String> {
    let at = |t: &str| humantime::parse_rfc3339(t).ok();
    let jobs = replog::jobs::list(site)?;
    let job = jobs.iter().find(|j| {
        j.kind == replog::jobs::JobKind::FailoverPlanned && j.machine.as_deref() == Some(machine)
    });
    Ok(job
        .map(|j| {
            j.steps
                .iter()
                .map(|s| {
                    let ms = match (at(&s.started), s.ended.as_deref().and_then(at)) {
                        (Some(a), Some(b)) => b
                            .duration_since(a)
                            .map(|d| d.as_secs_f64() * 1e3)
                            .unwrap_or(0.0),
                        _ => 0.0,
                    };
                    match s.detail.as_deref().filter(|d| d.contains("bytes read")) {
                        Some(d) => format!("{} {ms:.0} ms ({d})", s.name),
                        None => format!("{} {ms:.0} ms", s.name),
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default())
}
