//! Stable-toolchain fuzz driver: mutates valid segments (bit flips, field overwrites
//! with interesting values, truncations, insertions, removals, splices, with and
//! without repaired checksums) and runs [`replog_fuzz::check`] on each, for a given
//! time. Needs no nightly and no libFuzzer; see tools/fuzz/README.md.
//!
//! ```text
//! segment-mutate [--seconds N] [--seed S] [--artifacts DIR] [--keep-going]
//! segment-mutate --write-seeds DIR [--count N]     write valid segments (a corpus)
//! segment-mutate --replay FILE...                  run check() on saved inputs
//! ```
//!
//! Each crashing input is saved as `DIR/crash-<seed>-<iteration>` (default DIR
//! `artifacts/segment-mutate`), and the panic message and location are printed. Exit
//! status: 0 no crash, 1 crash found, 2 usage error.

use replog_fuzz::{check, mutate, valid_segment, Rng};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    seconds: u64,
    seed: u64,
    artifacts: PathBuf,
    keep_going: bool,
    write_seeds: Option<PathBuf>,
    count: usize,
    replay: Vec<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        seconds: 60,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        artifacts: PathBuf::from("artifacts/segment-mutate"),
        keep_going: false,
        write_seeds: None,
        count: 64,
        replay: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    fn value(it: &mut impl Iterator<Item = String>, name: &str) -> Result<String, String> {
        it.next().ok_or_else(|| format!("{name} needs a value"))
    }
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => a.seconds = value(&mut it, "--seconds")?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--seed" => a.seed = value(&mut it, "--seed")?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--artifacts" => a.artifacts = value(&mut it, "--artifacts")?.into(),
            "--keep-going" => a.keep_going = true,
            "--write-seeds" => a.write_seeds = Some(value(&mut it, "--write-seeds")?.into()),
            "--count" => a.count = value(&mut it, "--count")?.parse().map_err(|e| format!("--count: {e}"))?,
            "--replay" => {
                a.replay.extend(it.by_ref().map(PathBuf::from));
            }
            "-h" | "--help" => {
                return Err("usage: segment-mutate [--seconds N] [--seed S] [--artifacts DIR] [--keep-going]\n       \
                            segment-mutate --write-seeds DIR [--count N]\n       \
                            segment-mutate --replay FILE..."
                    .into())
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(a)
}

/// Where the last panic happened and what it said (set by the panic hook).
type LastPanic = Arc<Mutex<Option<(String, String)>>>;

fn install_hook() -> LastPanic {
    let last: LastPanic = Arc::new(Mutex::new(None));
    let l = last.clone();
    std::panic::set_hook(Box::new(move |info| {
        let loc = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if INSIDE_CHECK.with(|c| c.get()) {
            if let Ok(mut g) = l.lock() {
                *g = Some((loc, msg));
            }
        } else {
            eprintln!("segment-mutate itself panicked at {loc}: {msg}");
        }
    }));
    last
}

thread_local! {
    static INSIDE_CHECK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn run_one(data: &[u8], last: &LastPanic) -> Option<(String, String)> {
    INSIDE_CHECK.with(|c| c.set(true));
    let r = std::panic::catch_unwind(|| check(data));
    INSIDE_CHECK.with(|c| c.set(false));
    match r {
        Ok(()) => None,
        Err(_) => Some(
            last.lock()
                .ok()
                .and_then(|mut g| g.take())
                .unwrap_or_default(),
        ),
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };

    if let Some(dir) = &args.write_seeds {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("create {}: {e}", dir.display());
            return ExitCode::from(1);
        }
        let mut rng = Rng::new(args.seed);
        for i in 0..args.count {
            let p = dir.join(format!("seed-{i:04}.seg"));
            if let Err(e) = std::fs::write(&p, valid_segment(&mut rng)) {
                eprintln!("write {}: {e}", p.display());
                return ExitCode::from(1);
            }
        }
        println!("wrote {} valid segments to {}", args.count, dir.display());
        return ExitCode::SUCCESS;
    }

    let last = install_hook();

    if !args.replay.is_empty() {
        let mut crashed = false;
        for p in &args.replay {
            let data = match std::fs::read(p) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("read {}: {e}", p.display());
                    return ExitCode::from(2);
                }
            };
            match run_one(&data, &last) {
                None => println!("{}: ok ({} bytes)", p.display(), data.len()),
                Some((loc, msg)) => {
                    crashed = true;
                    println!("{}: PANIC at {loc}: {msg}", p.display());
                }
            }
        }
        return if crashed {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        };
    }

    println!("segment-mutate: seed {}, {} s", args.seed, args.seconds);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.seconds);
    let mut rng = Rng::new(args.seed);
    let mut iterations = 0u64;
    let mut bytes = 0u64;
    // Panic location -> (count, first input file).
    let mut crashes: BTreeMap<String, (u64, PathBuf, String)> = BTreeMap::new();
    let mut next_report = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let mut input = valid_segment(&mut rng);
        let other = valid_segment(&mut rng);
        mutate(&mut rng, &mut input, &other);
        iterations += 1;
        bytes += input.len() as u64;
        if let Some((loc, msg)) = run_one(&input, &last) {
            let entry = crashes.entry(loc.clone()).or_insert_with(|| {
                let _ = std::fs::create_dir_all(&args.artifacts);
                let p = args
                    .artifacts
                    .join(format!("crash-{}-{iterations}", args.seed));
                let _ = std::fs::write(&p, &input);
                println!(
                    "CRASH at {loc}: {msg}\n  input ({} bytes) saved as {}",
                    input.len(),
                    p.display()
                );
                (0, p, msg)
            });
            entry.0 += 1;
            if !args.keep_going {
                break;
            }
        }
        if Instant::now() >= next_report {
            println!(
                "  {iterations} inputs, {} distinct crash site(s)",
                crashes.len()
            );
            next_report += Duration::from_secs(10);
        }
    }
    println!(
        "done: {iterations} inputs ({:.1} MB) in {:.1} s, {} distinct crash site(s)",
        bytes as f64 / 1e6,
        start.elapsed().as_secs_f64(),
        crashes.len()
    );
    for (loc, (n, p, msg)) in &crashes {
        println!("  {loc}: {n} input(s), first {}: {msg}", p.display());
    }
    if crashes.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
