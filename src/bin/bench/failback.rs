//! Failback figures: a 1 GiB machine of incompressible data replicated from a site
//! A to the run's target site B, failed over unplanned at B and committed; 1% of its
//! 4 KiB blocks changed at B (the promoted primary); then the reprotect toward A —
//! A's old copy seeded as the replica from its own disks, only the blocks that differ
//! on the wire, until A has checked a point's digests. Its bytes on the wire (counted
//! by a TCP proxy between the two: TLS, framing and all) against the bytes changed,
//! and its time against a chunk-checksum resync of the same machine after another 1%
//! changed, over the same proxy.
//!
//! A is a site of its own in this process with a receiver that answers reprotects
//! through the offline host (what serve's registry does, without the registry).

use super::replica::TargetSite;
use super::{pattern_at, progress, settle, Bench, Figure, Result, Rng, GIB, MIB};
use replog::failover::{reprotect, run, Host, Offline};
use replog::protection::FailoverKind;
use replog::replication::receiver::Target;
use replog::replication::shipper::Shipper;
use replog::{Machine, Site};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

const BLOCK: u64 = 4096;

/// A TCP proxy on 127.0.0.1 in front of `upstream` that counts every byte it
/// carries, both ways.
struct CountingProxy {
    addr: String,
    bytes: Arc<AtomicU64>,
}

impl CountingProxy {
    fn start(upstream: &str) -> Result<CountingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let bytes = Arc::new(AtomicU64::new(0));
        let (up, counter) = (upstream.to_string(), bytes.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&up) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (conn.try_clone(), server.try_clone()),
                    (server.try_clone(), conn.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    let counter = counter.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 256 << 10];
                        while let Ok(n) = from.read(&mut buf) {
                            let chunk = buf.get(..n).unwrap_or(&[]);
                            if n == 0 || to.write_all(chunk).is_err() {
                                break;
                            }
                            counter.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Ok(CountingProxy { addr, bytes })
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Bench {
    /// The failback figures (see the module documentation).
    pub fn failback(&mut self, t: &TargetSite) -> Result<Vec<Figure>> {
        let size = if self.quick { 128 * MIB } else { GIB };
        const NAME: &str = "fb";
        progress(&format!(
            "failback after 1% changed at the promoted site: a {} MiB machine",
            size / MIB
        ));
        // Site A, trusted both ways with B, with a receiver that answers reprotects.
        let a = self.dir.join("failback-a");
        Site::init(&a)?;
        let (aid, bid) = (
            replog::identity::Identity::load(&a)?.id(),
            replog::identity::Identity::load(&t.path)?.id(),
        );
        replog::identity::trust(&a, bid)?;
        replog::identity::trust(&t.path, aid)?;
        let host_a = Arc::new(Offline::new(Site::open(&a)?)?);
        let answering = host_a.clone();
        let seed_us = Arc::new(AtomicU64::new(0));
        let seeding = seed_us.clone();
        let receiver = Arc::new(
            Target::new(aid, host_a.replicas().clone())
                .at_site(&a)
                .on_reprotect(move |req| {
                    let t0 = Instant::now();
                    let answer = reprotect::answer(&*answering, req);
                    seeding.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                    answer
                }),
        );
        let a_addr = replog::replication::transport::listen(&a, "127.0.0.1:0", move |mut s, p| {
            receiver.session_tls(&mut s, p)
        })?;

        // A → B: the whole disk, incompressible.
        host_a.site().create_disk(NAME, "d0", size, None)?;
        {
            let m = host_a.machine(NAME)?;
            self.fill(&m, size)?;
            let mut shipper = Shipper::new(&a, &m, &t.addr);
            shipper.ship_once(&m)?;
            m.checkpoint()?;
            m.seal()?;
            let acked = shipper.ship_once(&m)?.acked_lsn;
            if acked < m.status().last_lsn {
                return Err(format!("shipped up to LSN {acked} only").into());
            }
        }
        // Failover to B, committed; then 1% of the blocks change there.
        let host_b: &dyn Host = &*t.host;
        run::failover(host_b, NAME, FailoverKind::Unplanned, "latest", None)?;
        run::commit(host_b, NAME)?;
        let m = host_b.machine(NAME)?;
        let mut rng = Rng(0xfa11_bac4);
        let changed = self.change_blocks(&m, size, &mut rng, 1)?;
        settle();

        // The reprotect toward A, through the counting proxy.
        let proxy = CountingProxy::start(&a_addr.to_string())?;
        let a_replicas = replog::replica::store::Replicas::local(&a)?;
        let t0 = Instant::now();
        let mut shipper = Shipper::new(&t.path, &m, &proxy.addr);
        let mut passes = 0;
        let verified = loop {
            let r = shipper.ship_once(&m)?;
            passes += 1;
            let seed = reprotect::read_seed(&a_replicas, NAME)?;
            if let Some(lsn) = seed.as_ref().and_then(|s| s.verified) {
                break (lsn, r.initial_bytes);
            }
            if passes >= 5 {
                return Err(format!("A never verified the reprotect: {seed:?}").into());
            }
        };
        let reprotect_s = t0.elapsed().as_secs_f64();
        let reprotect_bytes = proxy.bytes();
        m.stop_tracking()?;
        let seed_s = seed_us.load(Ordering::Relaxed) as f64 / 1e6;
        progress(&format!(
            "  reprotect: {reprotect_s:.2} s (the old primary's answer, seeding from its \
             own disks: {seed_s:.2} s), {} KiB on the wire for {} KiB changed, verified at \
             LSN {} in {passes} pass(es)",
            reprotect_bytes / 1024,
            changed / 1024,
            verified.0
        ));

        // The baseline: another 1% changed, a chunk-checksum resync of the machine.
        let changed2 = self.change_blocks(&m, size, &mut rng, 1)?;
        settle();
        let before = proxy.bytes();
        let t0 = Instant::now();
        let r = shipper.resync_once(&m, 4096)?;
        let resync_s = t0.elapsed().as_secs_f64();
        let resync_bytes = proxy.bytes() - before;
        drop(shipper);
        drop(m);
        Ok(vec![
            Figure::versus(
                "failback 1% changed: bytes on the wire vs bytes changed",
                reprotect_bytes as f64,
                changed as f64,
                "bytes",
                format!(
                    "{} MiB incompressible, {} blocks of 4 KiB changed at the promoted site; \
                     the reprotect's whole traffic both ways (TLS, frames, the delta and \
                     the segments up to the verified point): {} KiB; aim <= 1.1x",
                    size / MIB,
                    changed / BLOCK,
                    reprotect_bytes / 1024
                ),
            ),
            Figure::versus(
                "failback 1% changed: time vs chunk-checksum resync",
                reprotect_s,
                resync_s,
                "s",
                format!(
                    "reprotect until the old primary checked a point's digests (its \
                     own disks seeded into the replica locally, {} bytes of blocks that \
                     differ sent) {reprotect_s:.2} s; a 4 KiB-chunk resync of the same \
                     machine after another {} KiB changed {resync_s:.2} s, {} KiB on the \
                     wire ({} chunks sent)",
                    verified.1,
                    changed2 / 1024,
                    resync_bytes / 1024,
                    r.sent_chunks
                ),
            ),
        ])
    }

    /// Every block of `m`'s disk written with incompressible data, flushed.
    fn fill(&self, m: &Machine, size: u64) -> Result<()> {
        let v = m.volume("d0")?;
        let mut at = 0;
        while at < size {
            v.write(
                at,
                pattern_at(self.pattern.as_slice(), at * 5, MIB as usize),
            )?;
            at += MIB;
        }
        m.flush()?;
        Ok(())
    }

    /// `pct`% of `m`'s 4 KiB blocks rewritten at random, distinct blocks; the bytes
    /// changed.
    fn change_blocks(&self, m: &Machine, size: u64, rng: &mut Rng, pct: u64) -> Result<u64> {
        let v = m.volume("d0")?;
        let blocks = size / BLOCK;
        let mut picked = std::collections::BTreeSet::new();
        while (picked.len() as u64) < blocks * pct / 100 {
            picked.insert(rng.below(blocks));
        }
        for (i, b) in picked.iter().enumerate() {
            let data = pattern_at(
                self.pattern.as_slice(),
                (i as u64) * 8191 + 17,
                BLOCK as usize,
            );
            v.write(b * BLOCK, data)?;
        }
        m.flush()?;
        Ok(picked.len() as u64 * BLOCK)
    }
}
