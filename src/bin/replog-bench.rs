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

#[path = "bench/fio.rs"]
mod fio;
#[path = "bench/replica.rs"]
mod replica;
#[path = "bench/resync.rs"]
mod resync;

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
    /// reads of its data), random, index, digest, restore, view, resync (FUSE figures are
    /// governed by --no-fuse / --fuse-only).
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
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
        if let Some(p) = &self.parent {
            let _ = fs::remove_dir(p);
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
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let path = root.join(format!("run-{}-{stamp}", std::process::id()));
    fs::create_dir(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let work = WorkDir {
        path,
        parent: default_root.then(|| root.clone()),
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
        if want("restore") || want("view") || want("resync") {
            let target = replica::TargetSite::start(&b)?;
            if want("restore") {
                figures.push(b.restore_point(&target)?);
            }
            if want("view") {
                figures.push(b.view_open(&target)?);
            }
            if want("resync") {
                figures.extend(b.resync(&target)?);
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
        progress("FUSE figures: fio through replog serve --mount against a plain file");
        for f in fio::run_all(&work.path, &replog, args.quick, &args.serve_arg)? {
            let note = "fio, median of interleaved runs".to_string();
            figures.push(Figure::versus(&f.name, f.value, f.baseline, f.unit, note));
        }
    }
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

fn progress(msg: &str) {
    eprintln!("replog-bench: {msg}");
}

// ---------------------------------------------------------------------------------
// Helpers.

/// xorshift64*: a fixed, fast stream of pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A page-aligned byte buffer. Buffers matter here: glibc returns large blocks at 16
/// bytes past a page boundary, and on these machines the kernel's copy between the
/// page cache and a buffer whose address is 16 bytes (mod 4096) past the file offset
/// runs 4-5x slower than any other alignment. Page-aligned buffers keep the
/// baselines honest.
struct Aligned {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn zeroed(len: usize) -> Aligned {
        let v = vec![0u8; len + 4096];
        let off = v.as_ptr().align_offset(4096).min(4096);
        Aligned { v, off, len }
    }

    fn as_slice(&self) -> &[u8] {
        self.v.get(self.off..self.off + self.len).unwrap_or(&[])
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        self.v
            .get_mut(self.off..self.off + self.len)
            .unwrap_or(&mut [])
    }
}

fn pattern(len: usize, seed: u64) -> Aligned {
    let mut rng = Rng(seed);
    let mut buf = Aligned::zeroed(len);
    for chunk in buf.as_mut_slice().chunks_mut(8) {
        let x = rng.next().to_le_bytes();
        chunk.copy_from_slice(x.get(..chunk.len()).unwrap_or(&[]));
    }
    buf
}

/// The pattern bytes that belong at disk offset `at` (the pattern repeats every 4 MiB).
fn pattern_at(pattern: &[u8], at: u64, len: usize) -> &[u8] {
    let start = (at % pattern.len() as u64) as usize;
    pattern.get(start..start + len).unwrap_or(&[])
}

fn mb_per_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64().max(1e-9) / 1e6
}

/// Write back every dirty page of the system so the next run starts from the same state.
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Drop the page cache (root only). Returns false if it could not.
fn drop_caches() -> bool {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return false;
    }
    settle();
    fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("remove {}: {e}", path.display()).into()),
    }
}

fn best(runs: &[f64]) -> f64 {
    runs.iter().copied().fold(0.0, f64::max)
}

fn median(runs: &[f64]) -> f64 {
    let mut v = runs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v.get(n / 2).copied().unwrap_or(0.0),
        n => {
            (v.get(n / 2 - 1).copied().unwrap_or(0.0) + v.get(n / 2).copied().unwrap_or(0.0)) / 2.0
        }
    }
}

fn fmt_runs(runs: &[f64]) -> String {
    runs.iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join("/")
}

impl Bench {
    /// A new machine `name` with one disk `d0` of `size` bytes (any old one is removed
    /// first; it must be closed).
    fn fresh_machine(&self, name: &str, size: u64) -> Result<(Machine, Volume)> {
        let dir = self.site.machine_dir(name)?;
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| format!("remove {}: {e}", dir.display()))?;
        }
        self.site.create_disk(name, "d0", size, None)?;
        let m = self.site.open_machine(name)?;
        let v = m.volume("d0")?;
        Ok((m, v))
    }

    fn remove_machine(&self, name: &str) -> Result<()> {
        let dir = self.site.machine_dir(name)?;
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| format!("remove {}: {e}", dir.display()))?;
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------
    // (a) journal append, 64 KiB writes, fdatasync every 4 MiB.

    fn append_64k(&mut self) -> Result<Figure> {
        const NAME: &str = "journal append 64KiB, fdatasync every 4MiB";
        const CHUNK: u64 = 64 * KIB;
        const SYNC_EVERY: u64 = 4 * MIB;
        let total = if self.quick { 128 * MIB } else { GIB };
        let slices = if self.quick { 4 } else { 8 };
        let slice = total / slices;
        let disk_size = 2 * GIB;
        progress(&format!(
            "{NAME}: {} MiB each, in {slices} interleaved slices of {} MiB",
            total / MIB,
            slice / MIB
        ));
        // Each side writes its whole stream once, in slices taken in turn (baseline
        // first in even slices, engine first in odd ones), so a disk that slows down
        // over time (these are cloud disks) hurts both sides alike.
        remove_if_exists(&self.seq_plain)?;
        if let Some((m, _)) = self.seq.take() {
            m.close()?;
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&self.seq_plain)?;
        let (m, v) = self.fresh_machine("bench", disk_size)?;
        let (mut base, mut eng) = (Vec::new(), Vec::new());
        let (mut base_t, mut eng_t) = (Duration::ZERO, Duration::ZERO);
        for i in 0..slices {
            let (from, to) = (i * slice, (i + 1) * slice);
            for engine in [i % 2 == 1, i % 2 == 0] {
                settle();
                let t0 = Instant::now();
                let mut at = from;
                while at < to {
                    let data = pattern_at(self.pattern.as_slice(), at, CHUNK as usize);
                    if engine {
                        v.write(at, data)?;
                    } else {
                        f.write_all_at(data, at)?;
                    }
                    at += CHUNK;
                    if at % SYNC_EVERY == 0 {
                        if engine {
                            m.flush()?;
                        } else {
                            f.sync_data()?;
                        }
                    }
                }
                let t = t0.elapsed();
                if engine {
                    eng.push(mb_per_s(slice, t));
                    eng_t += t;
                } else {
                    base.push(mb_per_s(slice, t));
                    base_t += t;
                }
            }
        }
        drop(f);
        let st = m.status();
        self.seq = Some((m, v));
        self.seq_bytes = total;
        Ok(Figure::versus(
            NAME,
            median(&eng),
            median(&base),
            "MB/s",
            format!(
                "median of {slices} interleaved slices; engine {} vs plain {} MB/s; overall \
                 {:.0} vs {:.0} MB/s; journal {} MiB in {} sealed segments; floor 0.8x, aim 1.0x",
                fmt_runs(&eng),
                fmt_runs(&base),
                mb_per_s(total, eng_t),
                mb_per_s(total, base_t),
                st.journal_bytes / MIB,
                st.sealed_segments
            ),
        ))
    }

    // -----------------------------------------------------------------------------
    // (b) read (a)'s data back while it is still in the journal.

    fn read_sequential(&mut self) -> Result<Vec<Figure>> {
        const NAME: &str = "read journaled data 1MiB sequential";
        const BUF: usize = MIB as usize;
        let Some((m, v)) = self.seq.as_ref() else {
            return Err("figure (a) left no journal to read".into());
        };
        let total = self.seq_bytes;
        let mut aligned_buf = Aligned::zeroed(BUF);
        let buf = aligned_buf.as_mut_slice();
        let plain = File::open(&self.seq_plain)?;
        let read_plain = |buf: &mut [u8]| -> Result<Duration> {
            let t0 = Instant::now();
            let mut at = 0;
            while at < total {
                plain.read_exact_at(buf, at)?;
                at += BUF as u64;
            }
            Ok(t0.elapsed())
        };
        let read_engine = |buf: &mut [u8]| -> Result<Duration> {
            let t0 = Instant::now();
            let mut at = 0;
            while at < total {
                v.read(at, buf)?;
                at += BUF as u64;
            }
            Ok(t0.elapsed())
        };
        let extents = m.status().index_extents;
        progress(&format!(
            "{NAME}: {} MiB, {extents} extents, best of {}",
            total / MIB,
            self.reps
        ));

        // Cold: drop the page cache before every pass.
        let (mut base, mut eng) = (Vec::new(), Vec::new());
        let mut cold = true;
        for _ in 0..self.reps {
            cold &= drop_caches();
            base.push(mb_per_s(total, read_plain(buf)?));
            cold &= drop_caches();
            eng.push(mb_per_s(total, read_engine(buf)?));
        }
        let mut figs = vec![Figure::versus(
            NAME,
            best(&eng),
            best(&base),
            "MB/s",
            format!(
                "{}; best of {}; engine {} vs plain {} MB/s; {extents} index extents",
                if cold {
                    "page cache dropped before each pass"
                } else {
                    "WARM: could not drop the page cache (not root?)"
                },
                self.reps,
                fmt_runs(&eng),
                fmt_runs(&base)
            ),
        )];

        // Warm: one untimed pass of each fills the cache (and checks the engine returns
        // what was written), then timed passes.
        read_plain(buf)?;
        let mut at = 0;
        while at < total {
            v.read(at, buf)?;
            if &*buf != pattern_at(self.pattern.as_slice(), at, BUF) {
                return Err(format!("journal read at {at} returned the wrong data").into());
            }
            at += BUF as u64;
        }
        let (mut base, mut eng) = (Vec::new(), Vec::new());
        for _ in 0..self.reps {
            base.push(mb_per_s(total, read_plain(buf)?));
            eng.push(mb_per_s(total, read_engine(buf)?));
        }
        figs.push(Figure::versus(
            &format!("{NAME} (warm cache)"),
            best(&eng),
            best(&base),
            "MB/s",
            format!(
                "all in the page cache; best of {}; engine {} vs plain {} MB/s",
                self.reps,
                fmt_runs(&eng),
                fmt_runs(&base)
            ),
        ));
        Ok(figs)
    }

    // -----------------------------------------------------------------------------
    // (c) 4 KiB writes at random aligned offsets, each followed by a flush.

    fn random_4k(&mut self) -> Result<Figure> {
        const NAME: &str = "random 4KiB write + flush each";
        const BLOCK: u64 = 4 * KIB;
        let ops: usize = if self.quick { 1000 } else { 5000 };
        let rounds: usize = if self.quick { 4 } else { 10 };
        let per_round = ops / rounds;
        let region = 256 * MIB;
        progress(&format!(
            "{NAME}: {ops} ops each over {} MiB, in {rounds} interleaved rounds",
            region / MIB
        ));
        let mut rng = Rng(0x0ff5_e7c0_ffee_0042);
        let offsets: Vec<u64> = (0..per_round * rounds)
            .map(|_| rng.below(region / BLOCK) * BLOCK)
            .collect();
        let block =
            |i: usize| pattern_at(self.pattern.as_slice(), i as u64 * BLOCK, BLOCK as usize);

        // The plain file is preallocated by writing it in full (as fio lays out its
        // files), so its fdatasyncs write data only, no allocation metadata.
        let plain_path = self.dir.join("plain-rand.img");
        let plain = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&plain_path)?;
        let mut at = 0;
        while at < region {
            plain.write_all_at(pattern_at(self.pattern.as_slice(), at, PATTERN_BYTES), at)?;
            at += PATTERN_BYTES as u64;
        }
        plain.sync_all()?;
        let (m, v) = self.fresh_machine("rand", region)?;

        let (mut base, mut eng) = (Vec::new(), Vec::new());
        for (r, round) in offsets.chunks(per_round).enumerate() {
            let first = r * per_round;
            for engine in [r % 2 == 1, r % 2 == 0] {
                settle();
                let t0 = Instant::now();
                for (i, off) in round.iter().enumerate() {
                    if engine {
                        v.write(*off, block(first + i))?;
                        m.flush()?;
                    } else {
                        plain.write_all_at(block(first + i), *off)?;
                        plain.sync_data()?;
                    }
                }
                let rate = round.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9);
                if engine {
                    eng.push(rate)
                } else {
                    base.push(rate)
                }
            }
        }
        m.close()?;
        drop(plain);
        remove_if_exists(&plain_path)?;
        self.remove_machine("rand")?;
        Ok(Figure::versus(
            NAME,
            median(&eng),
            median(&base),
            "ops/s",
            format!(
                "one thread; median of {rounds} interleaved rounds of {per_round}; engine {} vs \
                 plain {} ops/s; plain file written in full first",
                fmt_runs(&eng),
                fmt_runs(&base)
            ),
        ))
    }

    // -----------------------------------------------------------------------------
    // (d) heap bytes of the index per journaled 4 KiB block.

    fn index_memory(&mut self) -> Result<Figure> {
        const NAME: &str = "index memory per journaled 4KiB block";
        const BLOCK: u64 = 4 * KIB;
        let n: u64 = if self.quick { 20_000 } else { 200_000 };
        // n distinct blocks, a random sample of 4n (a Fisher-Yates prefix). The index
        // never merges neighbours, so every write is one extent.
        let space = 4 * n;
        progress(&format!("{NAME}: {n} distinct random blocks"));
        let mut rng = Rng(0x1d3e_c0de_0000_0007);
        let mut blocks: Vec<u32> = (0..space as u32).collect();
        for i in 0..n as usize {
            let j = i + rng.below(space - i as u64) as usize;
            blocks.swap(i, j);
        }
        blocks.truncate(n as usize);
        blocks.shrink_to_fit();

        let (m, v) = self.fresh_machine("index", space * BLOCK)?;
        let before = live_bytes();
        let t0 = Instant::now();
        for (i, b) in blocks.iter().enumerate() {
            v.write(
                u64::from(*b) * BLOCK,
                pattern_at(self.pattern.as_slice(), i as u64 * BLOCK, BLOCK as usize),
            )?;
        }
        m.flush()?;
        let elapsed = t0.elapsed();
        let after = live_bytes();
        let st = m.status();
        let extents = st.index_extents.max(1);
        let grown = after.saturating_sub(before);
        m.close()?;
        self.remove_machine("index")?;
        Ok(Figure {
            name: NAME.to_string(),
            value: grown as f64 / extents as f64,
            baseline: 0.0,
            ratio: None,
            unit: "bytes per extent".to_string(),
            note: format!(
                "{grown} heap bytes for {} extents ({} writes, {} sealed segments, {:.1} s); \
                 requested sizes, malloc overhead not counted",
                st.index_extents,
                n,
                st.sealed_segments,
                elapsed.as_secs_f64()
            ),
        })
    }
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
