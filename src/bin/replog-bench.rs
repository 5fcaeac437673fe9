//! `replog-bench`: the journal's performance figures (docs: DESIGN.md, "Targets").
//!
//! Every figure is measured against a baseline taken in the same process, on the same
//! file system, in the same directory, and printed as `value / baseline`. Engine and
//! baseline runs are interleaved in short slices (the disks of these machines drift
//! over a run, e.g. as burst credits run out), so a slow moment hurts both sides alike:
//! the write figures take the median slice of each side, the read figures the best of
//! a few interleaved passes. The table says which, per figure.
//!
//! ```text
//! replog-bench [--quick] [--json] [--dir DIR]
//! ```
//!
//! - `--json`: print only `{"figures": [{"name", "value", "baseline", "ratio", "unit"}]}`
//!   on stdout (progress goes to stderr).
//! - `--quick`: a short run of every figure (a few seconds), for smoke checks.
//! - `--dir DIR`: where the temporary files go (default `target/bench-tmp` under the
//!   current directory; not /tmp, which may be tmpfs). A fresh subdirectory is created
//!   in it and removed at the end.

#[path = "bench/engine.rs"]
mod engine;
#[path = "bench/failback.rs"]
mod failback;
#[path = "bench/failover.rs"]
mod failover;
#[path = "bench/fio.rs"]
mod fio;
#[path = "bench/lag.rs"]
mod lag;
#[path = "bench/pipeline.rs"]
mod pipeline;
#[path = "bench/plan.rs"]
mod plan;
#[path = "bench/replica.rs"]
mod replica;
#[path = "bench/resync.rs"]
mod resync;
#[path = "bench/s3.rs"]
mod s3;
#[path = "bench/util.rs"]
mod util;
use util::*;

use clap::Parser;
use replog::{Machine, Site, Volume};
use serde::Serialize;
use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

// ---------------------------------------------------------------------------------
// Counting allocator: live heap bytes (as requested by callers, without malloc's own
// per-chunk overhead), for the index memory figure.

struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and
// only updates a counter on the side, so `System`'s guarantees carry over.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `alloc_zeroed`'s contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; `ptr` came from this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `realloc`'s contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live_bytes() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------

#[derive(Parser, Debug)]
#[command(
    name = "replog-bench",
    about = "Measure replog's journal against plain-file baselines on the same disk"
)]
struct Args {
    /// Print one JSON document on stdout and nothing else.
    #[arg(long)]
    json: bool,
    /// A short run of every figure (a few seconds in all).
    #[arg(long)]
    quick: bool,
    /// Skip the FUSE (fio) figures.
    #[arg(long, conflicts_with = "fuse_only")]
    no_fuse: bool,
    /// Run only the FUSE (fio) figures.
    #[arg(long)]
    fuse_only: bool,
    /// Extra argument for `replog serve` in the FUSE figures (repeatable), to measure
    /// a front-end option, e.g. --serve-arg=--fuse-threads=1.
    #[arg(long, allow_hyphen_values = true)]
    serve_arg: Vec<String>,
    /// Run only the engine figures whose group is named here: journal (append and the
    /// reads of its data), random, index, digest, plan, amplification, ship, initial,
    /// restore, view, resync, failover, failback; and of the FUSE figures: fio (every
    /// fio comparison), lag (replication lag under load), plan (both the plan point's
    /// pause and the plan's failover). --no-fuse / --fuse-only still apply.
    #[arg(long, value_name = "GROUP")]
    only: Vec<String>,
    /// Directory for temporary files (default: ./target/bench-tmp).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Figure {
    name: String,
    value: f64,
    baseline: f64,
    /// value / baseline; null where there is no baseline.
    ratio: Option<f64>,
    unit: String,
    /// How it was measured; shown in the table, not in the JSON.
    #[serde(skip)]
    note: String,
}

impl Figure {
    /// Interleaved runs of both sides, pair by pair: value and baseline are the
    /// medians, the ratio the median of the pairs' ratios (a disk that changes speed
    /// mid-run moves both runs of a pair, not one side's median).
    fn paired(name: &str, ours: &[f64], theirs: &[f64], unit: &str, note: String) -> Figure {
        let ratios: Vec<f64> = ours
            .iter()
            .zip(theirs)
            .filter(|(_, b)| **b > 0.0)
            .map(|(a, b)| a / b)
            .collect();
        Figure {
            name: name.to_string(),
            value: median(ours),
            baseline: median(theirs),
            ratio: (!ratios.is_empty()).then(|| median(&ratios)),
            unit: unit.to_string(),
            note,
        }
    }

    fn versus(name: &str, value: f64, baseline: f64, unit: &str, note: String) -> Figure {
        Figure {
            name: name.to_string(),
            value,
            baseline,
            ratio: (baseline > 0.0).then(|| value / baseline),
            unit: unit.to_string(),
            note,
        }
    }
}

#[derive(Serialize)]
struct Report<'a> {
    figures: &'a [Figure],
}

/// The run directory, removed (with everything in it) when dropped.
struct WorkDir {
    path: PathBuf,
    /// The default parent, removed too if the run left it empty.
    parent: Option<PathBuf>,
    /// Every figure was measured (else the serves' logs are shown on drop).
    finished: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.finished {
            // A figure failed: what the serves it ran said, before it all goes.
            for log in fs::read_dir(&self.path).into_iter().flatten().flatten() {
                let p = log.path();
                if p.to_string_lossy().ends_with(".serve.log") {
                    let text = fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    progress(&format!("the end of {}:", p.display()));
                    for l in tail.iter().rev() {
                        eprintln!("    {l}");
                    }
                }
            }
        }
        // A serve that did not unmount would keep its mount, and everything under it,
        // from being removed.
        replog::frontend::detach_replog_mounts_under(&self.path);
        let _ = fs::remove_dir_all(&self.path);
        if let Some(p) = &self.parent {
            let _ = fs::remove_dir(p);
        }
    }
}

/// Remove what runs that died left in `root` (`run-<pid>-<stamp>` of a process that
/// is gone): a run killed, or one whose serve's mount outlived it, leaves gigabytes
/// (a full run filled the disk on 2026-12-05 with 37 GB of them). Mounts still under
/// such a directory are detached first.
fn remove_dead_runs(root: &Path) {
    for entry in fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("run-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = entry.path();
        replog::frontend::detach_replog_mounts_under(&dir);
        match fs::remove_dir_all(&dir) {
            Ok(()) => progress(&format!("removed {} (its run is gone)", dir.display())),
            Err(e) => progress(&format!("could not remove {}: {e}", dir.display())),
        }
    }
}

/// State shared by the figures.
struct Bench {
    quick: bool,
    dir: PathBuf,
    site: Site,
    /// 4 MiB of pseudo-random bytes; every data write is a slice of it.
    pattern: Aligned,
    /// Interleaved passes of each side in the read figures (the best is kept).
    reps: usize,
    /// Figure (a)'s journal, kept open for (b): its data is still in the journal.
    seq: Option<(Machine, Volume)>,
    /// Figure (a)'s plain file.
    seq_plain: PathBuf,
    seq_bytes: u64,
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const PATTERN_BYTES: usize = 4 << 20;

fn main() {
    let args = Args::parse();
    // The target in this process says why it closed a session (RUST_LOG overrides).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(&args) {
        eprintln!("replog-bench: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let (root, default_root) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::current_dir()?.join("target").join("bench-tmp"),
            true,
        ),
    };
    fs::create_dir_all(&root).map_err(|e| format!("create {}: {e}", root.display()))?;
    remove_dead_runs(&root);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let path = root.join(format!("run-{}-{stamp}", std::process::id()));
    fs::create_dir(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let work = WorkDir {
        path,
        parent: default_root.then(|| root.clone()),
        finished: false,
    };
    progress(&format!(
        "temporary files in {}{}",
        work.path.display(),
        if args.quick { " (quick run)" } else { "" }
    ));

    let site_dir = work.path.join("site");
    Site::init(&site_dir)?;
    let site = Site::open(&site_dir)?;
    let mut b = Bench {
        quick: args.quick,
        dir: work.path.clone(),
        site,
        pattern: pattern(PATTERN_BYTES, 0x5eed_1234_abcd_ef01),
        reps: if args.quick { 2 } else { 3 },
        seq: None,
        seq_plain: work.path.join("plain-seq.img"),
        seq_bytes: 0,
    };

    let mut figures = Vec::new();
    let want = |group: &str| args.only.is_empty() || args.only.iter().any(|o| o == group);
    if !args.fuse_only {
        if want("journal") {
            figures.push(b.append_64k()?);
            figures.extend(b.read_sequential()?);
            if let Some((m, _)) = b.seq.take() {
                m.close()?;
            }
        }
        if want("random") {
            figures.push(b.random_4k()?);
        }
        if want("index") {
            figures.push(b.index_memory()?);
        }
        if want("digest") {
            figures.push(b.digest_cost()?);
        }
        if want("plan") {
            figures.push(b.plan_point_pause()?);
        }
        if want("amplification") {
            figures.push(b.write_amplification()?);
        }
        if [
            "ship",
            "initial",
            "restore",
            "view",
            "resync",
            "failover",
            "failback",
            "s3",
            "bandwidth",
        ]
        .iter()
        .any(|g| want(g))
        {
            let target = replica::TargetSite::start(&b)?;
            if want("s3") {
                // Like for like first (one copy each side), then the store's own
                // replication (three copies, the tests' setting).
                let one = s3::S3Target::start(&b, 1)?;
                figures.push(b.s3_vs_local(&target, &one)?);
                drop(one);
                let three = s3::S3Target::start(&b, 3)?;
                figures.push(b.s3_vs_local(&target, &three)?);
                figures.push(b.s3_fleet(&three)?);
                // The store's processes stopped and its files removed before the
                // next group.
                drop(three);
            }
            if want("ship") {
                figures.push(b.ship_throughput(&target)?);
            }
            if want("bandwidth") {
                figures.push(b.bandwidth_limit(&target)?);
            }
            if want("initial") {
                figures.push(b.initial_vs_rsync(&target)?);
            }
            if want("restore") {
                figures.push(b.restore_point(&target)?);
            }
            if want("view") {
                figures.push(b.view_open(&target)?);
            }
            if want("resync") {
                figures.extend(b.resync(&target)?);
            }
            if want("failover") {
                figures.extend(b.failover_by_size(&target)?);
                figures.push(b.planned_failover(&target)?);
            }
            if want("failback") {
                figures.extend(b.failback(&target)?);
            }
        }
    }
    drop(b);
    if args.no_fuse {
        progress("FUSE figures skipped (--no-fuse)");
    } else {
        let replog = std::env::current_exe()?
            .parent()
            .map(|d| d.join("replog"))
            .ok_or("cannot locate the replog binary")?;
        if want("fio") {
            progress("FUSE figures: fio through replog serve --mount against a plain file");
            for f in fio::run_all(&work.path, &replog, args.quick, &args.serve_arg)? {
                let each: Vec<String> = f.rounds.iter().map(|r| format!("{r:.2}")).collect();
                let note = format!(
                    "fio, median of interleaved runs; each round's ratio {}",
                    each.join("/")
                );
                figures.push(Figure::versus(&f.name, f.value, f.baseline, f.unit, note));
            }
        }
        if want("lag") {
            let (p99, note) = lag::lag_under_load(&work.path, &replog, args.quick)?;
            figures.push(Figure::versus(
                "replication lag p99 under 100 MB/s of guest writes",
                p99,
                0.0,
                "s",
                note,
            ));
        }
        if want("plan") {
            progress("plan failover: 4 machines as one plan against one after another");
            let (value, base, note) = plan::parallel_failover(&work.path, &replog, args.quick)?;
            figures.push(Figure::versus(
                "plan failover of 4 machines in one group vs one after another",
                value,
                base,
                "ms",
                note,
            ));
        }
    }
    let mut work = work;
    work.finished = true;
    drop(work);

    if args.json {
        let doc = serde_json::to_string_pretty(&Report { figures: &figures })?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{doc}")?;
    } else {
        print_table(&figures)?;
    }
    Ok(())
}

fn print_table(figures: &[Figure]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let w = figures.iter().map(|f| f.name.len()).max().unwrap_or(0);
    writeln!(
        out,
        "{:<w$}  {:>10}  {:>10}  {:>7}  unit",
        "figure", "value", "baseline", "ratio"
    )?;
    for f in figures {
        let ratio = f
            .ratio
            .map(|r| format!("{r:.3}x"))
            .unwrap_or_else(|| "-".to_string());
        writeln!(
            out,
            "{:<w$}  {:>10.1}  {:>10.1}  {:>7}  {}",
            f.name, f.value, f.baseline, ratio, f.unit
        )?;
        if !f.note.is_empty() {
            writeln!(out, "{:<w$}    {}", "", f.note)?;
        }
    }
    Ok(())
}
