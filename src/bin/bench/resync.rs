//! Resync figures: a 1 GiB disk replicated to a target in this process, then 0%, 1%
//! and 30% of its 4 KiB blocks changed at random on the source; `Shipper::resync_once`
//! against `rsync --no-whole-file --inplace` of the same images to an rsync daemon on
//! 127.0.0.1, in the same run: time and bytes on the wire.

use super::replica::TargetSite;
use super::{pattern_at, progress, settle, Bench, Figure, Result, Rng, GIB, MIB};
use replog::replication::shipper::Shipper;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

const BLOCK: u64 = 4096;

/// An rsync daemon on 127.0.0.1 serving `dir` as module `bench`; stopped on drop.
pub(crate) struct RsyncDaemon {
    child: std::process::Child,
    pub(crate) port: u16,
}

impl RsyncDaemon {
    pub(crate) fn start(work: &Path, dir: &Path) -> Result<RsyncDaemon> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = work.join("rsyncd.conf");
        fs::write(
            &conf,
            format!(
                "port = {port}\naddress = 127.0.0.1\nuse chroot = no\npid file = {}\n\
                 [bench]\npath = {}\nread only = false\nuid = root\ngid = root\n",
                work.join("rsyncd.pid").display(),
                dir.display()
            ),
        )?;
        let child = Command::new("rsync")
            .args(["--daemon", "--no-detach", "--config"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("rsync --daemon: {e} (install rsync)"))?;
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("the rsync daemon did not listen".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(RsyncDaemon { child, port })
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// rsync `src` onto the daemon's `name`: (seconds, bytes sent + received).
fn rsync(src: &Path, port: u16, name: &str) -> Result<(f64, u64)> {
    let t0 = Instant::now();
    let out = Command::new("rsync")
        // --ignore-times: compare the contents even where size and mtime agree.
        .args(["--no-whole-file", "--inplace", "--ignore-times", "--stats"])
        .arg(src)
        .arg(format!("rsync://127.0.0.1:{port}/bench/{name}"))
        .output()?;
    let secs = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!("rsync: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| {
                v.split_whitespace()
                    .next()
                    .unwrap_or("0")
                    .replace(',', "")
                    .parse()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    Ok((
        secs,
        field("Total bytes sent:") + field("Total bytes received:"),
    ))
}

/// One pass of the target compactor over the bench replica.
fn fold(t: &TargetSite) -> Result<()> {
    let replicas = replog::replica::store::Replicas::local(&t.path)?;
    replog::replica::compact::compact_replica(&replicas, "rs", replog::format::now_ns())?;
    Ok(())
}

impl Bench {
    /// The resync figures at 0%, 1% and 30% of blocks changed.
    pub fn resync(&mut self, t: &TargetSite) -> Result<Vec<Figure>> {
        let size = if self.quick { 128 * MIB } else { GIB };
        progress(&format!(
            "resync vs rsync: a {} MiB disk at both ends",
            size / MIB
        ));
        // The image: every block data.
        let raw = self.raw_image("resync-src.raw", size, 3, |_| true)?;
        self.site.create_disk("rs", "d0", size, Some(&raw))?;
        let m = self.site.open_machine("rs")?;
        let v = m.volume("d0")?;
        let mut shipper = Shipper::new(self.site.path(), &m, &t.addr);
        shipper.ship_once(&m)?;
        // rsync's two copies: the daemon's (the replica) and the source's.
        let rdir = self.dir.join("rsync-dst");
        fs::create_dir_all(&rdir)?;
        let daemon = RsyncDaemon::start(&self.dir, &rdir)?;
        let mut rng = Rng(0xabcdef);
        let mut figures = Vec::new();
        for pct in [0u64, 1, 30] {
            // Both ends equal: the rsync target is a copy of the source as it is.
            let replica_copy = rdir.join("img");
            fs::copy(&raw, &replica_copy)?;
            // Change pct% of the blocks, through the engine and in the raw image.
            let blocks = size / BLOCK;
            let n = blocks * pct / 100;
            let f = OpenOptions::new().write(true).open(&raw)?;
            for i in 0..n {
                let b = rng.below(blocks);
                let data = pattern_at(self.pattern.as_slice(), i * 8191 + pct, BLOCK as usize);
                v.write(b * BLOCK, data)?;
                f.write_all_at(data, b * BLOCK)?;
            }
            m.flush()?;
            f.sync_all()?;
            drop(f);
            settle();
            let t0 = Instant::now();
            let r = shipper.resync_once(&m, 4096)?;
            let ours = t0.elapsed().as_secs_f64();
            let ours_bytes = r.sent_bytes_now + r.hash_bytes_now;
            settle();
            let (theirs, theirs_bytes) = rsync(&raw, daemon.port, "img")?;
            // Catch the replica's chain up for the next round, and let the target's
            // compactor fold the resync's patches in, as serve's would in the
            // background (not timed).
            m.seal()?;
            shipper.ship_once(&m)?;
            fold(t)?;
            let note = format!(
                "{} MiB, {pct}% of 4 KiB blocks changed ({n}); replog {ours:.2} s, {} KiB \
                 ({} chunks, {} KiB of hashes) vs rsync --no-whole-file --inplace to a daemon \
                 {theirs:.2} s, {} KiB; aim: bytes <= rsync, time <= 0.5x",
                size / MIB,
                ours_bytes / 1024,
                r.sent_chunks,
                r.hash_bytes_now / 1024,
                theirs_bytes / 1024
            );
            figures.push(Figure::versus(
                &format!("resync {pct}% changed: time"),
                ours,
                theirs,
                "s",
                note.clone(),
            ));
            figures.push(Figure::versus(
                &format!("resync {pct}% changed: bytes"),
                ours_bytes as f64,
                theirs_bytes as f64,
                "bytes",
                "bytes on the wire, both ways (replog: chunks + hashes; rsync: --stats sent + \
                 received)"
                    .into(),
            ));
        }
        // The chunk size: the same 1% change resynced with 4, 16 and 64 KiB chunks.
        let mut base: Option<(f64, u64)> = None;
        for cb in [4096u64, 16384, 65536] {
            let blocks = size / BLOCK;
            for i in 0..blocks / 100 {
                let b = rng.below(blocks);
                let data = pattern_at(self.pattern.as_slice(), i * 8191 + cb, BLOCK as usize);
                v.write(b * BLOCK, data)?;
            }
            m.flush()?;
            settle();
            let t0 = Instant::now();
            let r = shipper.resync_once(&m, cb)?;
            let secs = t0.elapsed().as_secs_f64();
            let bytes = r.sent_bytes_now + r.hash_bytes_now;
            m.seal()?;
            shipper.ship_once(&m)?;
            fold(t)?;
            let (bt, bb) = *base.get_or_insert((secs, bytes));
            figures.push(Figure::versus(
                &format!("resync 1% changed, {} KiB chunks: time", cb / 1024),
                secs,
                bt,
                "s",
                format!(
                    "{} KiB on the wire ({} chunks sent, {} KiB of hashes); baseline: 4 KiB \
                     chunks, {} KiB",
                    bytes / 1024,
                    r.sent_chunks,
                    r.hash_bytes_now / 1024,
                    bb / 1024
                ),
            ));
        }
        drop(daemon);
        drop(v);
        m.close()?;
        fs::remove_file(&raw)?;
        let _ = fs::remove_dir_all(&rdir);
        Ok(figures)
    }
}
