//! Recovery-plan figures.
//!
//! - The pause a plan point costs: four 1 GiB machines take 4 KiB writes, each
//!   followed by an fdatasync (as a database's commit), on a thread each; plan points
//!   over all four are taken meanwhile. The figure is how long writes were held by a
//!   barrier (the longest hold: the first machine locked), against the time one
//!   4 KiB write and its fdatasync take on the same machines in the same run.
//! - A plan's failover of four machines in one group (side by side, one command)
//!   against failing the same four over one after another with `replog failover`,
//!   through real serves, TLS on 127.0.0.1 and FUSE mounts (with the FUSE figures).

use super::fio::{run, ServedPair};
use super::{median, progress, Bench, Figure, Result, GIB, MIB};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Bench {
    pub fn plan_point_pause(&mut self) -> Result<Figure> {
        const NAME: &str = "plan point over 4 machines: writes held vs one 4KiB write+fdatasync";
        let runs = if self.quick { 10 } else { 40 };
        progress(&format!("{NAME}: {runs} plan points under load"));
        let mut machines = Vec::new();
        for k in 0..4 {
            let name = format!("pp{k}");
            self.site.create_disk(&name, "d0", GIB, None)?;
            let m = Arc::new(self.site.open_machine(&name)?);
            // A plan point is taken of protected machines, which keep digests.
            m.keep_digests()?;
            machines.push(m);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = machines
            .iter()
            .enumerate()
            .map(|(k, m)| {
                let (m, stop) = (m.clone(), stop.clone());
                let block = super::pattern(4096, 77 + k as u64);
                std::thread::spawn(move || -> replog::Result<Vec<f64>> {
                    let v = m.volume("d0")?;
                    let mut rng = super::Rng(1 + k as u64);
                    let mut lat = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let at = rng.below(GIB / 4096) * 4096;
                        let t0 = Instant::now();
                        v.write(at, block.as_slice())?;
                        m.flush()?;
                        lat.push(t0.elapsed().as_secs_f64() * 1e6);
                    }
                    Ok(lat)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let refs: Vec<&replog::Machine> = machines.iter().map(|m| m.as_ref()).collect();
        let mut held = Vec::new();
        for _ in 0..runs {
            let p = replog::volume::plan_point(&refs, false, Duration::from_secs(5))?;
            held.push(p.held.as_secs_f64() * 1e6);
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        let mut lat = Vec::new();
        for w in writers {
            lat.extend(w.join().map_err(|_| "a writer panicked")??);
        }
        drop(refs);
        for m in machines {
            if let Ok(m) = Arc::try_unwrap(m) {
                m.close()?;
            }
        }
        let (value, base) = (median(&held), median(&lat));
        let max = held.iter().copied().fold(0.0, f64::max);
        Ok(Figure::versus(
            NAME,
            value,
            base,
            "us",
            format!(
                "median of {runs} plan points (longest hold {max:.0} us) against the median of \
                 {} writes+fdatasync on the same 4 machines meanwhile",
                lat.len()
            ),
        ))
    }
}

/// Plan failover of 4 machines in one group vs the same 4 one after another:
/// (value ms, baseline ms, note).
pub fn parallel_failover(
    dir: &Path,
    replog: &Path,
    quick: bool,
) -> std::result::Result<(f64, f64, String), String> {
    let (size, data) = if quick {
        (256 * MIB, 32 * MIB)
    } else {
        (GIB, 128 * MIB)
    };
    let rounds = if quick { 1 } else { 3 };
    let names: Vec<String> = (0..4).map(|k| format!("pm{k}")).collect();
    let pair = ServedPair::init(dir, replog, "plan")?;
    let (src, dst) = (pair.src.clone(), pair.dst.clone());
    let cfg_path = src.join("site.toml");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| e.to_string())?;
    let mut cfg =
        replog::config::SiteConfig::from_toml(&cfg_path, &text).map_err(|e| e.to_string())?;
    cfg.replication.seal_interval_ms = 200;
    std::fs::write(&cfg_path, cfg.to_toml()).map_err(|e| e.to_string())?;
    for n in &names {
        run(Command::new(replog)
            .args(["disk", "create"])
            .arg(&src)
            .arg(format!("{n}/d0"))
            .arg("--size")
            .arg(size.to_string()))?;
    }
    let (addr, src_serve, dst_serve) = pair.serve(replog)?;
    for n in &names {
        pair.protect(replog, n, &addr)?;
    }
    progress(&format!(
        "plan failover: writing {} MiB of incompressible data to each of 4 machines",
        data / MIB
    ));
    for (k, n) in names.iter().enumerate() {
        use std::os::unix::fs::FileExt;
        let img = src_serve.mount.join(n).join("d0.img");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .map_err(|e| format!("{}: {e}", img.display()))?;
        let block = super::pattern(MIB as usize, 900 + k as u64);
        for i in 0..data / MIB {
            f.write_all_at(block.as_slice(), i * 2 * MIB)
                .map_err(|e| e.to_string())?;
        }
        f.sync_all().map_err(|e| e.to_string())?;
    }
    // Everything shipped.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let st: serde_json::Value = serde_json::from_str(&run(Command::new(replog)
            .arg("status")
            .arg(&src)
            .arg("--json"))?)
        .map_err(|e| e.to_string())?;
        let all = st["machines"].as_array().is_some_and(|ms| {
            ms.len() == names.len()
                && ms.iter().all(|m| {
                    m["state"] == "protected"
                        && m["acked_lsn"].as_u64().is_some()
                        && m["acked_lsn"].as_u64() >= m["last_lsn"].as_u64()
                })
        });
        if all {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("never shipped: {st}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let plan_file = dir.join("plan-bench.toml");
    std::fs::write(
        &plan_file,
        format!(
            "name = \"bench\"\n[[group]]\nmachines = [{}]\n",
            names
                .iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .map_err(|e| e.to_string())?;
    run(Command::new(replog)
        .args(["plan", "add"])
        .arg(&dst)
        .arg(&plan_file))?;
    let (mut seq_ms, mut plan_ms) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        progress(&format!("plan failover: round {} of {rounds}", r + 1));
        let one_by_one = || -> std::result::Result<f64, String> {
            let t0 = Instant::now();
            for n in &names {
                run(Command::new(replog)
                    .arg("failover")
                    .arg(&dst)
                    .arg(n)
                    .arg("--test"))?;
            }
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            for n in &names {
                run(Command::new(replog)
                    .arg("failover")
                    .arg(&dst)
                    .arg(n)
                    .arg("--cleanup-test"))?;
            }
            Ok(ms)
        };
        let as_plan = || -> std::result::Result<f64, String> {
            let t0 = Instant::now();
            run(Command::new(replog)
                .args(["plan", "failover"])
                .arg(&dst)
                .args(["bench", "--test"]))?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            run(Command::new(replog)
                .args(["plan", "cleanup-test"])
                .arg(&dst)
                .arg("bench"))?;
            Ok(ms)
        };
        // Interleaved, in alternating order.
        if r % 2 == 0 {
            seq_ms.push(one_by_one()?);
            plan_ms.push(as_plan()?);
        } else {
            plan_ms.push(as_plan()?);
            seq_ms.push(one_by_one()?);
        }
    }
    drop(src_serve);
    drop(dst_serve);
    let (value, base) = (median(&plan_ms), median(&seq_ms));
    Ok((
        value,
        base,
        format!(
            "test failovers of 4 machines of {} MiB with {} MiB of data each (every one's \
             digests verified: its data read); one `replog plan failover` (one group, side \
             by side) {value:.0} ms vs 4 `replog failover --test` one after another {base:.0} \
             ms; median of {rounds}",
            size / MIB,
            data / MIB
        ),
    ))
}
