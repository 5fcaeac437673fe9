//! Helpers every figure uses: a PRNG, aligned buffers, patterns, timing and
//! statistics, page-cache control.

use super::*;

pub(crate) fn progress(msg: &str) {
    eprintln!("replog-bench: {msg}");
}

// ---------------------------------------------------------------------------------
// Helpers.

/// xorshift64*: a fixed, fast stream of pseudo-random numbers.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A page-aligned byte buffer. Buffers matter here: glibc returns large blocks at 16
/// bytes past a page boundary, and on these machines the kernel's copy between the
/// page cache and a buffer whose address is 16 bytes (mod 4096) past the file offset
/// runs 4-5x slower than any other alignment. Page-aligned buffers keep the
/// baselines honest.
pub(crate) struct Aligned {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    pub(crate) fn zeroed(len: usize) -> Aligned {
        let v = vec![0u8; len + 4096];
        let off = v.as_ptr().align_offset(4096).min(4096);
        Aligned { v, off, len }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        self.v.get(self.off..self.off + self.len).unwrap_or(&[])
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        self.v
            .get_mut(self.off..self.off + self.len)
            .unwrap_or(&mut [])
    }
}

pub(crate) fn pattern(len: usize, seed: u64) -> Aligned {
    let mut rng = Rng(seed);
    let mut buf = Aligned::zeroed(len);
    for chunk in buf.as_mut_slice().chunks_mut(8) {
        let x = rng.next().to_le_bytes();
        chunk.copy_from_slice(x.get(..chunk.len()).unwrap_or(&[]));
    }
    buf
}

/// The pattern bytes that belong at disk offset `at` (the pattern repeats every 4 MiB).
pub(crate) fn pattern_at(pattern: &[u8], at: u64, len: usize) -> &[u8] {
    let start = (at % pattern.len() as u64) as usize;
    pattern.get(start..start + len).unwrap_or(&[])
}

pub(crate) fn mb_per_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64().max(1e-9) / 1e6
}

/// Write back every dirty page of the system so the next run starts from the same state.
pub(crate) fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Drop the page cache (root only). Returns false if it could not.
pub(crate) fn drop_caches() -> bool {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return false;
    }
    settle();
    fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("remove {}: {e}", path.display()).into()),
    }
}

/// Directories removed (best effort) when this is dropped: a group's files, gone when
/// the group ends, so that a full run does not hold every group's data at once (it
/// filled the 48 GB free on this VM's disk once, and died at the last figure).
pub(crate) struct RemoveOnDrop(pub(crate) Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        remove_trees(&self.0);
    }
}

/// Remove `dirs` (best effort), never descending into a FUSE mount left behind (a
/// failed serve's): those are detached first.
pub(crate) fn remove_trees(dirs: &[PathBuf]) {
    for d in dirs {
        replog::frontend::detach_replog_mounts_under(d);
        let _ = std::fs::remove_dir_all(d);
    }
}

pub(crate) fn best(runs: &[f64]) -> f64 {
    runs.iter().copied().fold(0.0, f64::max)
}

pub(crate) fn median(runs: &[f64]) -> f64 {
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

pub(crate) fn fmt_runs(runs: &[f64]) -> String {
    runs.iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join("/")
}

impl Bench {
    /// A raw image of `size` bytes, `name` in the run directory: the MiBs for which
    /// `data(MiB number)` holds are pattern bytes (from offset `at * stride`), the rest
    /// holes; synced.
    pub(crate) fn raw_image(
        &self,
        name: &str,
        size: u64,
        stride: u64,
        data: impl Fn(u64) -> bool,
    ) -> Result<PathBuf> {
        let raw = self.dir.join(name);
        let f = OpenOptions::new().write(true).create_new(true).open(&raw)?;
        f.set_len(size)?;
        let mut at = 0;
        while at < size {
            if data(at / MIB) {
                f.write_all_at(
                    pattern_at(self.pattern.as_slice(), at * stride, MIB as usize),
                    at,
                )?;
            }
            at += MIB;
        }
        f.sync_all()?;
        Ok(raw)
    }
}
