//! Stable-toolchain fuzz driver for the protocol frames, encrypted-file headers and
//! metadata files (see `replog_fuzz::decoders`): generates valid inputs, mutates them
//! (with checksums repaired half the time) and checks each, for a number of
//! executions. See tools/fuzz/README.md.
//!
//! ```text
//! decoders-mutate --target frame|crypt|meta|config|plan|state|cert [--execs N] [--seed S] [--artifacts DIR]
//! decoders-mutate --target T --replay FILE...
//! ```
//!
//! Prints the executions, their rate and the crashes; a crashing input is saved as
//! `DIR/crash-<target>-<seed>-<n>` (default DIR `artifacts/decoders-mutate`). Exit
//! status: 0 no crash, 1 crash, 2 usage error.

use replog_fuzz::decoders::Target;
use replog_fuzz::{mutate_raw, Rng};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

type LastPanic = Arc<Mutex<Option<String>>>;

fn main() -> ExitCode {
    let mut target = None;
    let mut execs: u64 = 1_000_000;
    let mut seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut artifacts = PathBuf::from("artifacts/decoders-mutate");
    let mut replay = Vec::new();
    let mut seeds: Option<PathBuf> = None;
    let mut count: u64 = 16;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let r: Result<(), String> = match a.as_str() {
            "--target" => value("--target").and_then(|v| {
                target = Target::parse(&v);
                target.map(|_| ()).ok_or(format!("unknown target {v:?}"))
            }),
            "--execs" => value("--execs").and_then(|v| {
                execs = v.parse().map_err(|e| format!("--execs: {e}"))?;
                Ok(())
            }),
            "--seed" => value("--seed").and_then(|v| {
                seed = v.parse().map_err(|e| format!("--seed: {e}"))?;
                Ok(())
            }),
            "--artifacts" => value("--artifacts").map(|v| artifacts = v.into()),
            "--write-seeds" => value("--write-seeds").map(|v| seeds = Some(v.into())),
            "--count" => value("--count").and_then(|v| {
                count = v.parse().map_err(|e| format!("--count: {e}"))?;
                Ok(())
            }),
            "--replay" => {
                replay.extend(it.by_ref().map(PathBuf::from));
                Ok(())
            }
            _ => Err(format!(
                "unknown argument {a:?}; usage: decoders-mutate --target frame|crypt|meta|config|plan|state|cert \
                 [--execs N] [--seed S] [--artifacts DIR] [--replay FILE...] \
                 [--write-seeds DIR [--count N]]"
            )),
        };
        if let Err(e) = r {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    }
    let Some(target) = target else {
        eprintln!("--target frame|crypt|meta|config|plan|state|cert is required");
        return ExitCode::from(2);
    };
    if let Some(dir) = seeds {
        // Valid inputs, unmutated: the corpus kept in the repository.
        let mut rng = Rng::new(seed);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("{}: {e}", dir.display());
            return ExitCode::from(2);
        }
        for n in 0..count {
            let p = dir.join(format!("seed-{n:03}"));
            if let Err(e) = std::fs::write(&p, target.valid(&mut rng)) {
                eprintln!("{}: {e}", p.display());
                return ExitCode::from(2);
            }
        }
        println!("{count} seeds in {}", dir.display());
        return ExitCode::SUCCESS;
    }
    let last: LastPanic = Arc::new(Mutex::new(None));
    {
        let l = last.clone();
        std::panic::set_hook(Box::new(move |info| {
            let loc = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            if let Ok(mut g) = l.lock() {
                *g = Some(format!("{loc}: {msg}"));
            }
        }));
    }
    let run = |data: &[u8]| -> Option<String> {
        match std::panic::catch_unwind(|| target.check(data)) {
            Ok(()) => None,
            Err(_) => Some(
                last.lock()
                    .ok()
                    .and_then(|mut g| g.take())
                    .unwrap_or_default(),
            ),
        }
    };
    if !replay.is_empty() {
        let mut crashed = false;
        for p in &replay {
            let Ok(data) = std::fs::read(p) else {
                eprintln!("cannot read {}", p.display());
                return ExitCode::from(2);
            };
            match run(&data) {
                None => println!("{}: ok", p.display()),
                Some(why) => {
                    crashed = true;
                    println!("{}: PANIC at {why}", p.display());
                }
            }
        }
        return if crashed {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        };
    }
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    let mut crashes = 0u64;
    for n in 0..execs {
        let mut input = target.valid(&mut rng);
        if !rng.chance(8) {
            let other = target.valid(&mut rng);
            mutate_raw(&mut rng, &mut input, &other);
            if rng.chance(2) {
                target.fix_crcs(&mut input);
            }
        }
        if let Some(why) = run(&input) {
            crashes += 1;
            let _ = std::fs::create_dir_all(&artifacts);
            let p = artifacts.join(format!("crash-{target:?}-{seed}-{n}"));
            let _ = std::fs::write(&p, &input);
            println!("CRASH at {why}\n  input saved as {}", p.display());
            if crashes >= 10 {
                break;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "decoders-mutate {target:?}: seed {seed}, {execs} executions in {secs:.1} s ({:.0}/s), {crashes} crashes",
        execs as f64 / secs.max(1e-9)
    );
    if crashes > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
