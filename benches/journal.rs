//! Criterion micro-benchmarks of the journal's write and read paths.
//!
//! - `volume_write_64k/{mem,file}`: `Volume::write` of 64 KiB at sequential offsets
//!   (acknowledged in the page cache, no flush), over `MemStorage` and over real files.
//!   Every 8 MiB the active segment is sealed and compacted outside the measurement,
//!   so memory and disk use stay bounded however many iterations criterion asks for,
//!   and no seal (fdatasync) falls inside the timed writes.
//! - `volume_read_64k/{mem,file}`: `Volume::read` of 64 KiB of data that is still in
//!   the journal (warm page cache for the file variant).
//!
//! The disk figures that matter (against plain-file baselines) are in
//! `src/bin/replog-bench.rs` (`tools/bench`); these track the engine's CPU cost per call.
//! Run `cargo bench --bench journal -- --quick` for a fast pass.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use replog::config::JournalConfig;
use replog::storage::{FileStorage, MemStorage, Storage};
use replog::{Machine, Volume};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHUNK: usize = 64 << 10;
/// Size of the benchmark disk; writes and reads wrap around inside it.
const DISK: u64 = 64 << 20;
/// Writes timed between two (untimed) seal + compaction steps: 8 MiB.
const WRITES_PER_ROUND: u64 = 128;
/// Larger than a round, so the journal never rotates (and syncs) inside one.
const SEGMENT: u64 = 64 << 20;

fn data() -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..CHUNK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A machine with one disk `d0` of [`DISK`] bytes in `dir` on `storage`.
fn machine(storage: Arc<dyn Storage>, dir: &Path, segment_bytes: u64) -> (Machine, Volume) {
    Machine::create(storage.as_ref(), dir).expect("create machine");
    Machine::add_disk(storage.as_ref(), dir, "d0", DISK, None).expect("add disk");
    let cfg = JournalConfig {
        segment_bytes,
        ..JournalConfig::default()
    };
    let m = Machine::open(storage, dir, "bench", cfg).expect("open machine");
    let v = m.volume("d0").expect("volume");
    (m, v)
}

/// A fresh directory for a file-backed machine, removed on drop.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new() -> Self {
        // Under target/, not /tmp (which may be tmpfs).
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("bench-tmp");
        std::fs::create_dir_all(&root).expect("create target/bench-tmp");
        Scratch(
            tempfile::Builder::new()
                .prefix("criterion-")
                .tempdir_in(root)
                .expect("tempdir"),
        )
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

/// Time `iters` 64 KiB writes on `v`, compacting (untimed) every 8 MiB.
fn timed_writes(m: &Machine, v: &Volume, buf: &[u8], iters: u64, at: &mut u64) -> Duration {
    let mut spent = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(WRITES_PER_ROUND);
        let t0 = Instant::now();
        for _ in 0..n {
            black_box(v.write(*at, buf).expect("write"));
            *at = (*at + CHUNK as u64) % DISK;
        }
        spent += t0.elapsed();
        left -= n;
        m.seal().expect("seal");
        m.compact().expect("compact");
    }
    spent
}

fn bench_write(c: &mut Criterion) {
    let buf = data();
    let mut g = c.benchmark_group("volume_write_64k");
    g.throughput(Throughput::Bytes(CHUNK as u64));

    // Criterion calls each routine many times (warm-up, then once per sample): set
    // the machines up once, outside.
    {
        let (m, v) = machine(Arc::new(MemStorage::new()), Path::new("/m"), SEGMENT);
        let mut at = 0;
        g.bench_function(BenchmarkId::from_parameter("mem"), |b| {
            b.iter_custom(|iters| timed_writes(&m, &v, &buf, iters, &mut at))
        });
    }
    {
        let dir = Scratch::new();
        let (m, v) = machine(Arc::new(FileStorage), &dir.path("m"), SEGMENT);
        let mut at = 0;
        g.bench_function(BenchmarkId::from_parameter("file"), |b| {
            b.iter_custom(|iters| timed_writes(&m, &v, &buf, iters, &mut at))
        });
    }
    g.finish();
}

fn bench_read(c: &mut Criterion) {
    let buf = data();
    let mut g = c.benchmark_group("volume_read_64k");
    g.throughput(Throughput::Bytes(CHUNK as u64));

    // The whole disk written once in 64 KiB records; segments large enough that
    // nothing is sealed, and no compaction: every read is served from the journal.
    let fill = |v: &Volume| {
        let mut at = 0;
        while at < DISK {
            v.write(at, &buf).expect("write");
            at += CHUNK as u64;
        }
    };
    let mut read_loop = |name: &str, v: &Volume| {
        let mut out = vec![0u8; CHUNK];
        let mut at = 0;
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                v.read(at, &mut out).expect("read");
                black_box(&out);
                at = (at + CHUNK as u64) % DISK;
            })
        });
    };

    {
        let (m, v) = machine(Arc::new(MemStorage::new()), Path::new("/m"), 256 << 20);
        fill(&v);
        m.flush().expect("flush");
        read_loop("mem", &v);
    }
    {
        let dir = Scratch::new();
        let (m, v) = machine(Arc::new(FileStorage), &dir.path("m"), 256 << 20);
        fill(&v);
        m.flush().expect("flush");
        read_loop("file", &v);
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_write, bench_read
}
criterion_main!(benches);
