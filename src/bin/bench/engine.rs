//! The engine's own figures: journal append, journaled reads, 4 KiB random writes
//! with a flush each, index memory — each against a plain file in the same run.

use super::*;

impl Bench {
    /// A new machine `name` with one disk `d0` of `size` bytes (any old one is removed
    /// first; it must be closed).
    pub(crate) fn fresh_machine(&self, name: &str, size: u64) -> Result<(Machine, Volume)> {
        let dir = self.site.machine_dir(name)?;
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| format!("remove {}: {e}", dir.display()))?;
        }
        self.site.create_disk(name, "d0", size, None)?;
        let m = self.site.open_machine(name)?;
        let v = m.volume("d0")?;
        Ok((m, v))
    }

    pub(crate) fn remove_machine(&self, name: &str) -> Result<()> {
        let dir = self.site.machine_dir(name)?;
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| format!("remove {}: {e}", dir.display()))?;
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------
    // (a) journal append, 64 KiB writes, fdatasync every 4 MiB.

    pub(crate) fn append_64k(&mut self) -> Result<Figure> {
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
        Ok(Figure::paired(
            NAME,
            &eng,
            &base,
            "MB/s",
            format!(
                "ratio: median of the {slices} slices' ratios (each engine slice against the \
                 plain slice next to it: this disk changes speed several-fold mid-run); engine \
                 {} vs plain {} MB/s; overall {:.0} vs {:.0} MB/s; journal {} MiB in {} sealed \
                 segments; floor 0.8x, aim 1.0x",
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

    pub(crate) fn read_sequential(&mut self) -> Result<Vec<Figure>> {
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

    pub(crate) fn random_4k(&mut self) -> Result<Figure> {
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

    pub(crate) fn index_memory(&mut self) -> Result<Figure> {
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
