//! Pipeline figures: how fast sealed segments ship against how fast the journal takes
//! them, the initial replication of a half-full image against an rsync daemon, and the
//! bytes the engine writes to disk per byte a guest writes (journal and merge).

use super::replica::TargetSite;
use super::resync::RsyncDaemon;
use super::{
    drop_caches, mb_per_s, median, pattern_at, progress, settle, Bench, Figure, Result, GIB, KIB,
    MIB,
};
use replog::replication::shipper::{ShipReport, Shipper};
use replog::{Machine, Volume};
use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

/// This process's bytes sent towards storage so far (`/proc/self/io`: write_bytes
/// less cancelled_write_bytes; counted when a page is dirtied, mapped pages included).
fn written_to_disk() -> Result<u64> {
    let io = fs::read_to_string("/proc/self/io")?;
    let field = |k: &str| -> u64 {
        io.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(field("write_bytes:").saturating_sub(field("cancelled_write_bytes:")))
}

impl Bench {
    /// Write `size` bytes of incompressible data to `v` in 64 KiB writes (pattern
    /// offset `at * stride`), a flush every 4 MiB, then flush and seal.
    fn write_stream(&self, m: &Machine, v: &Volume, size: u64, stride: u64) -> Result<()> {
        let mut at = 0;
        while at < size {
            v.write(
                at,
                pattern_at(self.pattern.as_slice(), at * stride, (64 * KIB) as usize),
            )?;
            at += 64 * KIB;
            if at.is_multiple_of(4 * MIB) {
                m.flush()?;
            }
        }
        m.flush()?;
        m.seal()?;
        Ok(())
    }

    /// Ship `size` of sealed, incompressible segments to the target (TLS on loopback,
    /// the target verifying, encrypting and fsyncing each) against the rate at which
    /// the journal took the same writes (64 KiB writes, a flush every 4 MiB).
    pub fn ship_throughput(&mut self, t: &TargetSite) -> Result<Figure> {
        const NAME: &str = "shipping throughput vs journal append";
        let size = if self.quick { 256 * MIB } else { 2 * GIB };
        progress(&format!(
            "{NAME}: {} MiB of sealed segments to a target over TLS on loopback",
            size / MIB
        ));
        let (r, ship, append) = self.ship_sealed(t, "ship", size)?;
        let (ours, theirs) = (mb_per_s(r.bytes, ship), mb_per_s(size, append));
        Ok(Figure::versus(
            NAME,
            ours,
            theirs,
            "MB/s",
            format!(
                "{} segments, {} MiB incompressible: shipped and acknowledged in {:.2} s \
                 ({ours:.0} MB/s) vs appended (64 KiB writes, flush every 4 MiB) in {:.2} s; \
                 aim: >= 300 MB/s and >= 1.0x",
                r.segments,
                r.bytes / MIB,
                ship.as_secs_f64(),
                append.as_secs_f64()
            ),
        ))
    }

    /// Write `size` of incompressible data to a new machine `name` (protected toward
    /// `t`, its empty initial copy done), sealed; then ship it all in one pass. What
    /// was shipped, how long shipping and appending took. The machine is removed.
    pub fn ship_sealed(
        &self,
        t: &TargetSite,
        name: &str,
        size: u64,
    ) -> Result<(ShipReport, Duration, Duration)> {
        self.site.create_disk(name, "d0", size, None)?;
        let m = self.site.open_machine(name)?;
        let v = m.volume("d0")?;
        let mut shipper = Shipper::new(self.site.path(), &m, &t.addr);
        // Protected, initial copy (of an empty disk) done: from here on only deltas.
        shipper.ship_once(&m)?;
        settle();
        let t0 = Instant::now();
        self.write_stream(&m, &v, size, 5)?;
        let append = t0.elapsed();
        settle();
        let t0 = Instant::now();
        // As serve's loop does: a pass that fails in passing is tried again (each
        // try resumes where the last one's acknowledgements left off).
        let mut r = ShipReport::default();
        let mut tries = 0;
        loop {
            match shipper.ship_once(&m) {
                Ok(pass) => {
                    r.bytes += pass.bytes;
                    r.segments += pass.segments;
                    break;
                }
                Err(e) if e.class() == replog::error::ErrorClass::Retry && tries < 5 => {
                    progress(&format!("{name}: a pass failed in passing, again: {e}"));
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let ship = t0.elapsed();
        drop(v);
        m.close()?;
        fs::remove_dir_all(self.site.machine_dir(name)?)?;
        Ok((r, ship, append))
    }

    /// Shipping under a bandwidth limit of 50 MiB/s (the relationship's `bandwidth`):
    /// the rate measured against the rate set (the aim: within ±10%).
    pub fn bandwidth_limit(&mut self, t: &TargetSite) -> Result<Figure> {
        const NAME: &str = "shipping under --bandwidth 50MiB/s: rate held";
        const RATE: u64 = 50 * MIB;
        let size = if self.quick { 64 * MIB } else { 512 * MIB };
        progress(&format!("{NAME}: {} MiB of sealed segments", size / MIB));
        let name = "bw";
        self.site.create_disk(name, "d0", size, None)?;
        replog::replication::relationship::Relationship {
            target: t.addr.clone(),
            target_id: replog::identity::Identity::load(&t.path)?.id().to_string(),
            bandwidth: Some("50MiB/s".into()),
            ..Default::default()
        }
        .save(self.site.path(), name)?;
        let m = self.site.open_machine(name)?;
        let v = m.volume("d0")?;
        let mut shipper = Shipper::new(self.site.path(), &m, &t.addr);
        shipper.ship_once(&m)?;
        self.write_stream(&m, &v, size, 7)?;
        settle();
        let t0 = Instant::now();
        let r = shipper.ship_once(&m)?;
        let took = t0.elapsed();
        drop(v);
        m.close()?;
        fs::remove_dir_all(self.site.machine_dir(name)?)?;
        let rate = r.bytes as f64 / took.as_secs_f64();
        Ok(Figure::versus(
            NAME,
            rate / MIB as f64,
            RATE as f64 / MIB as f64,
            "MiB/s",
            format!(
                "{} MiB shipped in {:.2} s through the sender's token bucket (the pass's \
                 handshake and its last acknowledgement count in the time, frame headers in \
                 the limit); aim: 0.9x to 1.1x",
                r.bytes / MIB,
                took.as_secs_f64()
            ),
        ))
    }

    /// Initial replication of a half-full image (data in every other MiB,
    /// incompressible) against `rsync --sparse` of the same image to a daemon, caches
    /// dropped before each, three interleaved rounds.
    pub fn initial_vs_rsync(&mut self, t: &TargetSite) -> Result<Figure> {
        const NAME: &str = "initial replication of a half-full 1GiB image";
        let size = if self.quick { 128 * MIB } else { GIB };
        progress(&format!(
            "{NAME}: a {} MiB image against an rsync daemon",
            size / MIB
        ));
        let raw = self.raw_image("initial-src.raw", size, 11, |mib| mib.is_multiple_of(2))?;
        let rdir = self.dir.join("initial-rsync");
        fs::create_dir_all(&rdir)?;
        let daemon = RsyncDaemon::start(&self.dir, &rdir)?;
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let rounds = if self.quick { 1 } else { 3 };
        for round in 0..rounds {
            let name = format!("init{round}");
            self.site.create_disk(&name, "d0", size, Some(&raw))?;
            let m = self.site.open_machine(&name)?;
            let mut shipper = Shipper::new(self.site.path(), &m, &t.addr);
            drop_caches();
            let t0 = Instant::now();
            shipper.ship_once(&m)?;
            ours.push(t0.elapsed().as_secs_f64());
            m.close()?;
            fs::remove_dir_all(self.site.machine_dir(&name)?)?;
            let _ = fs::remove_file(rdir.join("img"));
            drop_caches();
            let t0 = Instant::now();
            let out = Command::new("rsync")
                .args(["--sparse", "--whole-file"])
                .arg(&raw)
                .arg(format!("rsync://127.0.0.1:{}/bench/img", daemon.port))
                .output()?;
            // rsync leaves the copy in the page cache: its fsync is part of the copy.
            fs::File::open(rdir.join("img"))?.sync_all()?;
            theirs.push(t0.elapsed().as_secs_f64());
            if !out.status.success() {
                return Err(format!("rsync: {}", String::from_utf8_lossy(&out.stderr)).into());
            }
        }
        drop(daemon);
        fs::remove_file(&raw)?;
        let _ = fs::remove_dir_all(&rdir);
        let s = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join("/")
        };
        Ok(Figure::versus(
            NAME,
            median(&ours),
            median(&theirs),
            "s",
            format!(
                "{} MiB, data in every other MiB; initial replication over TLS (target \
                 encrypts, fsyncs) {} s vs rsync --sparse --whole-file to a daemon + fsync {} s; \
                 caches dropped; floor 1.0x, aim 0.5x",
                size / MIB,
                s(&ours),
                s(&theirs)
            ),
        ))
    }

    /// Bytes this process writes to disk per byte written to a disk: journal appends
    /// (records, footers, metadata) and the compactor's merge into the parent image.
    pub fn write_amplification(&mut self) -> Result<Figure> {
        const NAME: &str = "bytes written to disk per guest byte";
        let size = if self.quick { 256 * MIB } else { GIB };
        progress(&format!(
            "{NAME}: {} MiB of 64 KiB writes, journaled and merged",
            size / MIB
        ));
        self.site.create_disk("wa", "d0", size, None)?;
        let m = self.site.open_machine("wa")?;
        let v = m.volume("d0")?;
        settle();
        let before = written_to_disk()?;
        self.write_stream(&m, &v, size, 13)?;
        let journal = written_to_disk()? - before;
        m.compact()?;
        drop(v);
        m.close()?;
        settle();
        let total = written_to_disk()? - before;
        fs::remove_dir_all(self.site.machine_dir("wa")?)?;
        Ok(Figure::versus(
            NAME,
            total as f64 / size as f64,
            0.0,
            "bytes/byte",
            format!(
                "{} MiB written in 64 KiB writes: {} MiB to disk in all (journal {} MiB, \
                 merge and the rest {} MiB), from /proc/self/io; floor 2.1, aim 2.05",
                size / MIB,
                total / MIB,
                journal / MIB,
                (total - journal) / MIB
            ),
        ))
    }
}
