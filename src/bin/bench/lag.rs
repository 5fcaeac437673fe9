//! Replication lag under a busy guest: two `replog serve`s on 127.0.0.1 (the source
//! with its mount, the target listening), a protected 2 GiB disk, and a writer that
//! writes 100 MB/s of incompressible data through the mount (1 MiB O_DIRECT writes,
//! paced every 10 ms) while `replog status --json` is read four times a second. The
//! figure is the 99th percentile of the lag status reports (the age of the oldest
//! write the target has not acknowledged).

use super::fio::{run, ServedPair};
use super::{median, pattern, progress, MIB};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The figures: (p99 lag, note).
pub fn lag_under_load(
    dir: &Path,
    replog: &Path,
    quick: bool,
) -> std::result::Result<(f64, String), String> {
    let (size, secs) = if quick {
        (512 * MIB, 10u64)
    } else {
        (2048 * MIB, 60)
    };
    let rate_mib = 100u64;
    let pair = ServedPair::init(dir, replog, "lag")?;
    let src = pair.src.clone();
    run(Command::new(replog)
        .args(["disk", "create"])
        .arg(&src)
        .arg("vm1/d0")
        .arg("--size")
        .arg(size.to_string()))?;
    let (addr, src_serve, _dst_serve) = pair.serve(replog)?;
    pair.protect(replog, "vm1", &addr)?;
    let status = || -> std::result::Result<serde_json::Value, String> {
        let st: serde_json::Value = serde_json::from_str(&run(Command::new(replog)
            .arg("status")
            .arg(&src)
            .arg("--json"))?)
        .map_err(|e| e.to_string())?;
        Ok(st["machines"][0].clone())
    };
    // The initial copy (of an empty disk) done.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = status()?;
        if m["state"] == "protected" && m["acked_lsn"].as_u64().is_some() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("initial replication never finished: {m}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    progress(&format!(
        "replication lag: {rate_mib} MB/s of incompressible 1 MiB O_DIRECT writes for {secs} s"
    ));
    let img = src_serve.mount.join("vm1").join("d0.img");
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written) = (stop.clone(), written.clone());
        std::thread::spawn(move || -> std::result::Result<(), String> {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&img)
                .map_err(|e| format!("{}: {e}", img.display()))?;
            // 64 MiB of random bytes: no 1 MiB write repeats another within a segment.
            let data = pattern(64 * MIB as usize, 0x1a9);
            let t0 = Instant::now();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Paced: write i is due at i * 10 ms (1 MiB each: 100 MiB/s).
                let due = t0 + Duration::from_millis(10 * i);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let from = ((i * 7) % 64) * MIB;
                let block = data
                    .as_slice()
                    .get(from as usize..(from + MIB) as usize)
                    .unwrap_or(&[]);
                f.write_all_at(block, (i * MIB) % size)
                    .map_err(|e| format!("write: {e}"))?;
                written.fetch_add(MIB, Ordering::Relaxed);
                i += 1;
            }
            Ok(())
        })
    };
    let t0 = Instant::now();
    let mut lags = Vec::new();
    let warmup = Duration::from_secs(if quick { 2 } else { 5 });
    let mut failure = None;
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(250));
        match status() {
            Ok(m) if t0.elapsed() >= warmup => {
                if m["health"] != "healthy" {
                    failure = Some(format!("replication not healthy under load: {m}"));
                    break;
                }
                lags.push(m["lag_seconds"].as_f64().unwrap_or(0.0));
            }
            Ok(_) => {}
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let wrote = t0.elapsed();
    writer
        .join()
        .map_err(|_| "the writer panicked".to_string())??;
    if let Some(e) = failure {
        return Err(e);
    }
    let rate = written.load(Ordering::Relaxed) as f64 / wrote.as_secs_f64() / 1e6;
    let mut sorted = lags.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let p99 = pct(0.99);
    Ok((
        p99,
        format!(
            "{} status samples over {secs} s (after {} s of warm-up) while the guest wrote \
             {rate:.0} MB/s: lag median {:.2} s, p99 {p99:.2} s, max {:.2} s; seal interval \
             2 s (the default); floor p99 <= 5 s, aim <= 1 s",
            lags.len(),
            warmup.as_secs(),
            median(&lags),
            pct(1.0)
        ),
    ))
}
