//! Recovery-point figures: restoring a point against `cp --sparse=always` of the same
//! image, the time to open a point view of a 1 GiB and an 8 GiB disk, and what the
//! source's digests cost on the journal write path.
//!
//! The replication figures use a second site in this process (a target listening on
//! 127.0.0.1 over mutual TLS, like `serve --listen`) and the source site of the run.

use super::{
    drop_caches, fmt_runs, mb_per_s, median, pattern_at, progress, settle, Bench, Figure, Result,
    Rng, GIB, KIB, MIB,
};
use replog::failover::{Host, Offline};
use replog::replica::replay::PointImage;
use replog::replica::store::ReplicaStore;
use replog::replication::receiver::Target;
use replog::replication::shipper::Shipper;
use replog::Site;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// A target site listening in this process, trusted both ways with the run's site.
pub struct TargetSite {
    pub path: PathBuf,
    pub addr: String,
    /// The site, as the failover commands see it with no serve running; it also
    /// carries out the promotion of a planned failover.
    pub host: Arc<Offline>,
}

impl TargetSite {
    pub fn start(b: &Bench) -> Result<TargetSite> {
        Self::start_with(b, "target", replog::config::SiteConfig::default())
    }

    /// A target in `b.dir/<name>` with settings `cfg` (an S3 replica store, say).
    pub fn start_with(
        b: &Bench,
        name: &str,
        cfg: replog::config::SiteConfig,
    ) -> Result<TargetSite> {
        let path = b.dir.join(name);
        Site::init_with(&path, cfg)?;
        let source = b.site.path();
        let (sid, tid) = (
            replog::identity::Identity::load(source)?.id(),
            replog::identity::Identity::load(&path)?.id(),
        );
        replog::identity::trust(source, tid)?;
        replog::identity::trust(&path, sid)?;
        let host = Arc::new(Offline::new(Site::open(&path)?)?);
        let promoting = host.clone();
        let target = Arc::new(
            // The host's replicas: the read-ahead a session starts is the one the
            // check finds (`replica::warm`).
            Target::new(tid, host.replicas().clone())
                .at_site(&path)
                .on_promote(move |m, lsn, generation| {
                    replog::failover::run::planned_target(&*promoting, m, lsn, generation)
                        .map(|_| ())
                }),
        );
        let addr =
            replog::replication::transport::listen(&path, "127.0.0.1:0", move |mut s, peer| {
                target.session_tls(&mut s, peer)
            })?;
        Ok(TargetSite {
            path,
            addr: addr.to_string(),
            host,
        })
    }

    pub fn store(&self, machine: &str) -> Result<ReplicaStore> {
        Ok(replog::replica::store::Replicas::local(&self.path)?.open_readonly(machine)?)
    }
}

impl Bench {
    /// Restore the newest point of a replica of a `size` disk (three quarters data,
    /// from the initial copy, plus 32 MiB of later writes) against `cp --sparse=always`
    /// of the same image plus an fsync of the copy (restore fsyncs its images too).
    /// Caches are dropped before every run of either side.
    pub fn restore_point(&mut self, t: &TargetSite) -> Result<Figure> {
        const NAME: &str = "restore a 1GiB point";
        let size = if self.quick { 128 * MIB } else { GIB };
        progress(&format!(
            "{NAME}: building a {} MiB replica (initial copy + deltas over TLS)",
            size / MIB
        ));
        // The source disk: data in three of every four MiB, holes in the fourth.
        let raw = self.raw_image("restore-src.raw", size, 7, |mib| mib % 4 != 3)?;
        self.site.create_disk("rsrc", "d0", size, Some(&raw))?;
        let m = self.site.open_machine("rsrc")?;
        let v = m.volume("d0")?;
        let mut shipper = Shipper::new(self.site.path(), &m, &t.addr);
        shipper.ship_once(&m)?;
        let mut rng = Rng(0x7e57);
        for i in 0..(32 * MIB / (64 * KIB)) {
            let at = rng.below(size / (64 * KIB)) * 64 * KIB;
            v.write(
                at,
                pattern_at(self.pattern.as_slice(), i * 4096, (64 * KIB) as usize),
            )?;
            if i % 64 == 63 {
                m.flush()?;
            }
        }
        m.flush()?;
        m.seal()?;
        shipper.ship_once(&m)?;
        // The image cp copies: the source disk as it is now, holes kept.
        let image = self.dir.join("restore-image.raw");
        {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&image)?;
            f.set_len(size)?;
            let mut buf = vec![0u8; MIB as usize];
            let mut at = 0;
            while at < size {
                v.read(at, &mut buf)?;
                if buf.iter().any(|b| *b != 0) {
                    f.write_all_at(&buf, at)?;
                }
                at += MIB;
            }
            f.sync_all()?;
        }
        drop(v);
        m.close()?;
        let (mut ours, mut cps) = (Vec::new(), Vec::new());
        // This disk is noisy (±30% between runs): more rounds than the other figures.
        let reps = if self.quick { 2 } else { 5 };
        for rep in 0..reps {
            for restore in [rep % 2 == 0, rep % 2 == 1] {
                let out = self.dir.join("restore-out");
                let _ = fs::remove_dir_all(&out);
                settle();
                drop_caches();
                let t0 = Instant::now();
                if restore {
                    let image = PointImage::open(t.store("rsrc")?, "latest")?;
                    let r = replog::replica::restore::restore(&image, &out, &|_, _| {})?;
                    if !r.verified {
                        return Err("the restored point was not verified".into());
                    }
                    ours.push(t0.elapsed().as_secs_f64());
                } else {
                    fs::create_dir_all(&out)?;
                    let copy = out.join("d0.img");
                    let st = std::process::Command::new("cp")
                        .arg("--sparse=always")
                        .arg(&image)
                        .arg(&copy)
                        .status()?;
                    if !st.success() {
                        return Err("cp --sparse=always failed".into());
                    }
                    fs::File::open(&copy)?.sync_all()?;
                    cps.push(t0.elapsed().as_secs_f64());
                }
            }
        }
        // The restored image must be the image.
        let out = self.dir.join("restore-out");
        let _ = fs::remove_dir_all(&out);
        let image_ = PointImage::open(t.store("rsrc")?, "latest")?;
        replog::replica::restore::restore(&image_, &out, &|_, _| {})?;
        if !same_file(&out.join("d0.img"), &image)? {
            return Err("the restored image differs from the source".into());
        }
        let _ = fs::remove_dir_all(&out);
        fs::remove_file(&raw)?;
        fs::remove_file(&image)?;
        Ok(Figure::versus(
            NAME,
            median(&ours),
            median(&cps),
            "s",
            format!(
                "{} MiB disk, 3/4 data; median of {reps} interleaved rounds; restore \
                 (decrypt, write sparse, fsync, digest check) {} s vs cp --sparse=always + \
                 fsync {} s, caches dropped; lower is better; floor 1.5x, aim 1.0x",
                size / MIB,
                fmt_s(&ours),
                fmt_s(&cps)
            ),
        ))
    }

    /// A replica at `t` of machine `name` with one `size` disk and the same history
    /// whatever the size: 2000 4 KiB writes in the first GiB, a flush every 10, 20
    /// segments, all shipped.
    pub fn replica_with_history(&mut self, t: &TargetSite, name: &str, size: u64) -> Result<()> {
        self.site.create_disk(name, "d0", size, None)?;
        let m = self.site.open_machine(name)?;
        let v = m.volume("d0")?;
        let mut shipper = Shipper::new(self.site.path(), &m, &t.addr);
        shipper.ship_once(&m)?;
        let mut rng = Rng(99);
        for i in 0..2000u64 {
            let at = rng.below(GIB / 4096) * 4096;
            v.write(at, pattern_at(self.pattern.as_slice(), i * 4096, 4096))?;
            if i % 10 == 9 {
                m.flush()?;
            }
            if i % 100 == 99 {
                m.seal()?;
            }
        }
        m.seal()?;
        shipper.ship_once(&m)?;
        drop(v);
        m.close()?;
        Ok(())
    }

    pub fn view_open(&mut self, t: &TargetSite) -> Result<Figure> {
        const NAME: &str = "open a point view, 8GiB vs 1GiB disk";
        progress(&format!("{NAME}: two replicas with the same history"));
        let names = ["view1g", "view8g"];
        self.replica_with_history(t, names[0], GIB)?;
        self.replica_with_history(t, names[1], 8 * GIB)?;
        let runs = if self.quick { 10 } else { 40 };
        let (mut small, mut big) = (Vec::new(), Vec::new());
        for i in 0..runs {
            for name in if i % 2 == 0 {
                [names[0], names[1]]
            } else {
                [names[1], names[0]]
            } {
                let store = t.store(name)?;
                let t0 = Instant::now();
                let img = PointImage::open(store, "latest")?;
                let dt = t0.elapsed().as_secs_f64() * 1e3;
                drop(img);
                if name == names[0] {
                    small.push(dt);
                } else {
                    big.push(dt);
                }
            }
        }
        Ok(Figure::versus(
            NAME,
            median(&big),
            median(&small),
            "ms",
            format!(
                "PointImage::open (pin + map from the segment indexes) of the newest point, \
                 20 segments / 2000 writes each, median of {runs}; 1 GiB {:.2} ms, 8 GiB \
                 {:.2} ms; ratio ~1 means size does not matter",
                median(&small),
                median(&big)
            ),
        ))
    }

    /// 64 KiB writes with a flush every 4 MiB on a machine that keeps digests (as a
    /// protected one does) against one that does not, interleaved slices.
    pub fn digest_cost(&mut self) -> Result<Figure> {
        const NAME: &str = "digest cost: journal writes with digests";
        let total = if self.quick { 64 * MIB } else { 512 * MIB };
        let slices = if self.quick { 4 } else { 8 };
        let slice = total / slices;
        progress(&format!("{NAME}: {} MiB each side", total / MIB));
        let (plain_m, plain_v) = self.fresh_machine("dg-off", GIB)?;
        let (dig_m, dig_v) = self.fresh_machine("dg-on", GIB)?;
        dig_m.keep_digests()?;
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for i in 0..slices {
            for digests in [i % 2 == 0, i % 2 == 1] {
                let (m, v) = if digests {
                    (&dig_m, &dig_v)
                } else {
                    (&plain_m, &plain_v)
                };
                settle();
                let t0 = Instant::now();
                let mut at = i * slice;
                while at < (i + 1) * slice {
                    v.write(
                        at,
                        pattern_at(self.pattern.as_slice(), at, (64 * KIB) as usize),
                    )?;
                    at += 64 * KIB;
                    if at % (4 * MIB) == 0 {
                        m.flush()?;
                    }
                }
                let r = mb_per_s(slice, t0.elapsed());
                if digests {
                    on.push(r);
                } else {
                    off.push(r);
                }
            }
        }
        drop((plain_v, dig_v));
        plain_m.close()?;
        dig_m.close()?;
        self.remove_machine("dg-off")?;
        self.remove_machine("dg-on")?;
        Ok(Figure::versus(
            NAME,
            median(&on),
            median(&off),
            "MB/s",
            format!(
                "64 KiB writes, flush every 4 MiB, median of {slices} interleaved slices; with \
                 digests {} vs without {} MB/s; above 0.9x the digest stays on the write path",
                fmt_runs(&on),
                fmt_runs(&off)
            ),
        ))
    }
}

fn fmt_s(runs: &[f64]) -> String {
    runs.iter()
        .map(|r| format!("{r:.2}"))
        .collect::<Vec<_>>()
        .join("/")
}

fn same_file(a: &Path, b: &Path) -> Result<bool> {
    let (fa, fb) = (fs::File::open(a)?, fs::File::open(b)?);
    let len = fa.metadata()?.len();
    if len != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut at = 0;
    while at < len {
        let n = (len - at).min(MIB) as usize;
        fa.read_exact_at(&mut x[..n], at)?;
        fb.read_exact_at(&mut y[..n], at)?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}
