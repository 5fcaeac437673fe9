//! Initial replication: copy the parent images, frozen at the replica's base by the
//! watermark hold, from where the target's persisted position says — data regions
//! only (SEEK_DATA/SEEK_HOLE), and within them only 4 KiB blocks that are not all
//! zero, LZ4 on the wire.

use super::{Link, Protected, Shipper};
use crate::error::{Error, Result};
use crate::replication::protocol::{Message, MAX_CHUNK};
use crate::volume::Machine;

impl Shipper {
    /// Bring the replica's initial copy to its end; returns the parent bytes sent.
    pub(super) fn initial_replication(
        &self,
        link: &mut Link,
        machine: &Machine,
        p: &Protected,
    ) -> Result<u64> {
        // The parents must stand exactly for the replica's base while they are
        // copied: hold there, let a running merge finish, and check.
        self.hold.set(p.lsn);
        machine.wait_for_merge();
        let frozen = machine.status().watermark;
        if frozen.lsn != p.lsn {
            // A resync needs a complete copy to compare with, and this copy can go on
            // only from parents at its base: nothing retries its way out (it was a
            // resync that cleared itself and this error again, for ever).
            return Err(Error::Unmendable(format!(
                "the target's initial copy of {} is based on LSN {} but this source's \
                 parents stand for LSN {}, so it can neither go on nor be resynchronised; \
                 remove the replica at the target (its serve stopped: SITE/replicas/{}, \
                 or the replica's objects in its S3 bucket) so that a new initial copy \
                 starts, then `replog resync --now` here",
                machine.name(),
                p.lsn,
                frozen.lsn,
                machine.name()
            )));
        }
        let seeded = self
            .reprotect
            .as_ref()
            .filter(|r| r.held == crate::replication::protocol::Held::Seeded)
            .cloned();
        let sent = match &seeded {
            Some(r) => self.delta_copy(link, machine, p.resume, r)?,
            None => self.initial_copy(link, machine, p.resume)?,
        };
        if machine.status().watermark != frozen {
            return Err(Error::BrokenChain(
                "the parents changed during the initial copy".into(),
            ));
        }
        link.send(&Message::InitialDone {
            machine: machine.name().to_string(),
        })?;
        match link.recv()? {
            Message::Ack { .. } => {}
            other => return Err(link.unexpected("Ack", &other)),
        }
        if seeded.is_some() {
            // A point to check the seeded replica against, shipped in this pass.
            machine.checkpoint()?;
            machine.seal()?;
        }
        if let Some(r) = seeded.filter(|r| !r.covered) {
            // The old primary merged writes neither journal still names: compare
            // every chunk (a resync, at once).
            let why = format!(
                "reprotect toward {}: the old primary's journal and this site's map do not \
                 cover everything it wrote after LSN {}{}",
                self.target,
                machine.changed_map().map_or(0, |m| m.since),
                r.orphan
                    .as_ref()
                    .map(|o| format!(" (orphan {})", o.id))
                    .unwrap_or_default()
            );
            crate::replication::resync_schedule::SourceResync::require(
                &self.site,
                machine.name(),
                &why,
            )?;
            crate::replication::resync_schedule::request_now(&self.site, machine.name())?;
        }
        Ok(sent)
    }

    /// A reprotect's copy over a replica seeded from the old primary's own disks:
    /// only the 4 KiB blocks that differ — what this machine changed since the point
    /// (its map) and what the old primary wrote after it (its tail) — from the frozen
    /// parents, zero blocks too, from `resume` on. Returns the data bytes sent.
    fn delta_copy(
        &self,
        link: &mut Link,
        machine: &Machine,
        resume: (u32, u64),
        r: &super::ReprotectView,
    ) -> Result<u64> {
        let mut want = machine.changed_map().ok_or_else(|| {
            Error::InvalidInput(format!(
                "{} keeps no changed-block map: a reprotect over a seeded replica needs one",
                machine.name()
            ))
        })?;
        for (d, o, l) in &r.tail {
            want.add(*d, *o, *l);
        }
        let disks = machine.disks();
        let runs: Vec<(u32, u64, u64)> = disks
            .iter()
            .enumerate()
            .flat_map(|(i, (_, size))| {
                want.ranges(i as u32, *size)
                    .into_iter()
                    .map(move |(o, l)| (i as u32, o, l))
            })
            .collect();
        let total: u64 = runs.iter().map(|r| r.2).sum();
        let mut done: u64 = 0;
        let mut sent = 0u64;
        let mut buf = vec![0u8; MAX_CHUNK];
        for (disk, start, len) in runs {
            let end = start + len;
            if (disk, end) <= resume {
                done += len;
                continue;
            }
            let parent = machine
                .parent(disk as usize)
                .ok_or_else(|| Error::NotFound(format!("disk {disk}")))?;
            let mut at = if disk == resume.0 {
                start.max(resume.1)
            } else {
                start
            };
            done += at - start;
            while at < end {
                self.stopping()?;
                let n = ((end - at) as usize).min(MAX_CHUNK);
                let chunk = buf.get_mut(..n).unwrap_or(&mut []);
                parent.read_exact_at(chunk, at)?;
                let (compressed, bytes) = super::pack(chunk);
                let head = Message::InitialChunk {
                    machine: machine.name().to_string(),
                    generation: machine.generation(),
                    disk,
                    offset: at,
                    compressed,
                    bytes: Vec::new(),
                };
                link.send_payload(&head, &bytes, true)?;
                sent += n as u64;
                at += n as u64;
                done += n as u64;
                if sent >= 1 << 20 {
                    crate::failpoint::hit("reprotect:delta-sent");
                }
                if let Some(p) = &self.progress {
                    p(done, total);
                }
            }
        }
        if let Some(p) = &self.progress {
            p(total, total);
        }
        Ok(sent)
    }

    /// Copy the frozen parent images from `resume` on. A reader thread finds, reads and
    /// packs the data while this one sends what it packed before: the disk's reads
    /// overlap the link's encryption and writes instead of alternating with them.
    fn initial_copy(&self, link: &mut Link, machine: &Machine, resume: (u32, u64)) -> Result<u64> {
        let disks = machine.disks();
        let total: u64 = disks.iter().map(|(_, size)| size).sum();
        let mut parents = Vec::new();
        for (i, (_, size)) in disks.iter().enumerate().skip(resume.0 as usize) {
            let parent = machine
                .parent(i)
                .ok_or_else(|| Error::NotFound(format!("disk {i}")))?;
            let from = if i as u32 == resume.0 { resume.1 } else { 0 };
            parents.push(ParentScan {
                disk: i as u32,
                size: *size,
                from,
                parent,
            });
        }
        let scanned_before: u64 = disks
            .iter()
            .take(resume.0 as usize)
            .map(|(_, size)| size)
            .sum();
        std::thread::scope(|sc| {
            // Made in the scope: if sending fails, the receiver goes when this closure
            // returns, before the scope waits for the reader, and the reader's next
            // send fails instead of waiting for room.
            let (tx, rx) = crossbeam::channel::bounded(READ_AHEAD);
            sc.spawn(move || {
                // A panic is this pass's error, not the shipping thread's death (the
                // scope would panic again at its end).
                let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    read_parents(&parents, scanned_before, &tx)
                }))
                .unwrap_or_else(|_| {
                    Err(Error::InvalidInput(
                        "the initial copy's reader panicked".into(),
                    ))
                });
                let _ = tx.send(read.map(|()| Step::Done));
            });
            let mut sent = 0u64;
            let mut done = false;
            for step in rx {
                self.stopping()?;
                match step? {
                    Step::Done => done = true,
                    Step::Piece {
                        disk,
                        offset,
                        len,
                        compressed,
                        bytes,
                    } => {
                        let head = Message::InitialChunk {
                            machine: machine.name().to_string(),
                            generation: machine.generation(),
                            disk,
                            offset,
                            compressed,
                            bytes: Vec::new(),
                        };
                        link.send_payload(&head, &bytes, true)?;
                        sent += len;
                    }
                    Step::Scanned(at) => {
                        if let Some(p) = &self.progress {
                            p(at, total);
                        }
                    }
                }
            }
            if !done {
                return Err(Error::InvalidInput(
                    "the initial copy's reader stopped before the end".into(),
                ));
            }
            Ok(sent)
        })
    }
}

/// Pieces the initial copy's reader may have packed ahead of the sender (each at most
/// [`MAX_CHUNK`] bytes).
const READ_AHEAD: usize = 4;

/// One parent image for the initial copy's reader: scanned from `from` to `size`.
struct ParentScan {
    disk: u32,
    size: u64,
    from: u64,
    parent: std::sync::Arc<dyn crate::storage::StorageFile>,
}

/// What the initial copy's reader hands the sender.
enum Step {
    /// A run of non-zero blocks: `len` bytes at `offset` of `disk`, packed.
    Piece {
        disk: u32,
        offset: u64,
        len: u64,
        compressed: bool,
        bytes: Vec<u8>,
    },
    /// Everything before this many bytes of all disks is read (progress).
    Scanned(u64),
    /// Every disk is read: what came before is the whole copy.
    Done,
}

/// Read the parents' data regions (SEEK_DATA/SEEK_HOLE) in order, and hand on every
/// run of 4 KiB blocks that are not all zero. Returns when done (the caller then
/// hands on [`Step::Done`]), or when the sender is gone.
fn read_parents(
    parents: &[ParentScan],
    mut scanned_before: u64,
    tx: &crossbeam::channel::Sender<Result<Step>>,
) -> Result<()> {
    const BLOCK: usize = 4096;
    let mut buf = vec![0u8; MAX_CHUNK];
    // A closed channel means the sender stopped (and says why itself).
    let hand = |step: Step| tx.send(Ok(step)).is_ok();
    for p in parents {
        let mut pos = p.from;
        while pos < p.size {
            let Some(data) = p.parent.seek_data(pos)? else {
                break;
            };
            if data >= p.size {
                break;
            }
            let hole = p.parent.seek_hole(data)?.min(p.size);
            let mut at = data;
            while at < hole {
                let n = ((hole - at) as usize).min(MAX_CHUNK);
                let chunk = buf.get_mut(..n).unwrap_or(&mut []);
                p.parent.read_exact_at(chunk, at)?;
                // Each run of non-zero blocks.
                for run in crate::storage::nonzero_runs(chunk, BLOCK) {
                    let piece = chunk.get(run.clone()).unwrap_or(&[]);
                    let (compressed, bytes) = super::pack(piece);
                    let step = Step::Piece {
                        disk: p.disk,
                        offset: at + run.start as u64,
                        len: piece.len() as u64,
                        compressed,
                        bytes: bytes.into_owned(),
                    };
                    if !hand(step) {
                        return Ok(());
                    }
                }
                at += n as u64;
                if !hand(Step::Scanned(scanned_before + at)) {
                    return Ok(());
                }
            }
            pos = hole;
        }
        scanned_before += p.size;
        if !hand(Step::Scanned(scanned_before)) {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{FileStorage, MemStorage, OpenMode, Storage, StorageFile};
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// Bytes of 4 KiB block `i` where `fill(i)`, zeroes elsewhere.
    fn image(len: usize, fill: impl Fn(usize) -> bool) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        for (i, block) in bytes.chunks_mut(4096).enumerate() {
            if fill(i) {
                for (j, b) in block.iter_mut().enumerate() {
                    *b = (i * 31 + j * 7) as u8 | 1;
                }
            }
        }
        bytes
    }

    /// What the reader hands on, as the images it describes (zeroes where it sent
    /// nothing), and every progress figure in order. Pieces of a disk must come in
    /// order and never overlap (the target refuses a chunk behind its position).
    fn collect(parents: &[ParentScan], before: u64, sizes: &[usize]) -> (Vec<Vec<u8>>, Vec<u64>) {
        let (tx, rx) = crossbeam::channel::bounded(READ_AHEAD);
        std::thread::scope(|sc| {
            // The reader's end of the channel goes with it: the loop below ends when
            // the reader does.
            let reader = sc.spawn(move || read_parents(parents, before, &tx));
            let mut images: Vec<Vec<u8>> = sizes.iter().map(|s| vec![0u8; *s]).collect();
            let mut progress = Vec::new();
            let mut next = (0u32, 0u64);
            for step in rx {
                match step.expect("step") {
                    Step::Piece {
                        disk,
                        offset,
                        len,
                        compressed,
                        bytes,
                    } => {
                        assert!((disk, offset) >= next, "piece behind {next:?}");
                        next = (disk, offset + len);
                        let plain = if compressed {
                            lz4_flex::block::decompress_size_prepended(&bytes).expect("lz4")
                        } else {
                            bytes
                        };
                        assert_eq!(plain.len() as u64, len);
                        assert!(plain.chunks(4096).all(|b| b.iter().any(|x| *x != 0)));
                        let at = offset as usize;
                        images[disk as usize][at..at + plain.len()].copy_from_slice(&plain);
                    }
                    Step::Scanned(at) => progress.push(at),
                    Step::Done => panic!("the caller sends Done, not read_parents"),
                }
            }
            reader.join().expect("reader").expect("read");
            (images, progress)
        })
    }

    /// Every non-zero block of the parents arrives at its place, in order: 10 MiB in
    /// memory (a run crosses the reader's 8 MiB reads) and a real sparse file (its
    /// holes skipped by SEEK_DATA/SEEK_HOLE); progress only grows, to the whole size;
    /// a copy resumed inside a hole starts at its position.
    #[test]
    fn the_reader_hands_on_every_nonzero_block_and_its_progress() {
        let mem = MemStorage::new();
        mem.create_dir_all(Path::new("/")).expect("root");
        let sizes = [10 << 20, 8 << 20];
        let a = image(sizes[0], |i| i % 7 != 5 && !(300..320).contains(&i));
        assert!(a[(2047 << 12)..(2049 << 12)].iter().all(|x| *x != 0));
        let f = mem
            .open(Path::new("/a"), OpenMode::CreateNew)
            .expect("create");
        f.write_at(&[&a], 0).expect("write");
        // A sparse file: data in MiB 1, 2 (partly) and 6; holes elsewhere.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b");
        let b = image(sizes[1], |i| {
            (256..512).contains(&i) || (600..700).contains(&i) || (1536..1600).contains(&i)
        });
        let file = FileStorage::new()
            .open(&path, OpenMode::CreateNew)
            .expect("create");
        file.set_len(sizes[1] as u64).expect("size");
        for (from, to) in [(256usize, 512usize), (600, 700), (1536, 1600)] {
            file.write_at(&[&b[from << 12..to << 12]], (from << 12) as u64)
                .expect("write");
        }
        assert_eq!(
            file.seek_data(0).expect("seek"),
            Some(1 << 20),
            "no hole here"
        );
        let scan = |disk: u32, from: u64| ParentScan {
            disk,
            size: sizes[disk as usize] as u64,
            from,
            parent: if disk == 0 { f.clone() } else { file.clone() },
        };
        let (images, progress) = collect(&[scan(0, 0), scan(1, 0)], 0, &sizes);
        assert!(images[0] == a, "disk 0 differs");
        assert!(images[1] == b, "disk 1 differs");
        assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
        assert_eq!(progress.last(), Some(&((sizes[0] + sizes[1]) as u64)));

        // Resumed in the hole after MiB 2 of the second disk: only MiB 6 comes.
        let (images, progress) = collect(&[scan(1, 3 << 20)], sizes[0] as u64, &sizes);
        assert!(images[0].iter().all(|x| *x == 0));
        assert!(images[1][..3 << 20].iter().all(|x| *x == 0));
        assert!(
            images[1][3 << 20..] == b[3 << 20..],
            "the resumed part differs"
        );
        assert_eq!(progress.last(), Some(&((sizes[0] + sizes[1]) as u64)));
    }

    /// A file that counts its reads.
    #[derive(Debug)]
    struct Counted {
        inner: Arc<dyn StorageFile>,
        reads: AtomicU64,
    }

    impl StorageFile for Counted {
        fn path(&self) -> &Path {
            self.inner.path()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, bufs: &[&[u8]], offset: u64) -> Result<()> {
            self.inner.write_at(bufs, offset)
        }
        fn sync_data(&self) -> Result<()> {
            self.inner.sync_data()
        }
        fn set_len(&self, len: u64) -> Result<()> {
            self.inner.set_len(len)
        }
        fn len(&self) -> Result<u64> {
            self.inner.len()
        }
        fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
            self.inner.punch_hole(offset, len)
        }
    }

    /// When the sender stops while the reader waits for room (its link failed), the
    /// reader stops too, after the read it had made, instead of reading on.
    #[test]
    fn the_reader_stops_when_the_sender_is_gone() {
        let mem = MemStorage::new();
        mem.create_dir_all(Path::new("/")).expect("root");
        let f = mem
            .open(Path::new("/a"), OpenMode::CreateNew)
            .expect("create");
        f.write_at(&[&image(64 << 20, |_| true)], 0).expect("write");
        let counted = Arc::new(Counted {
            inner: f,
            reads: AtomicU64::new(0),
        });
        let scan = ParentScan {
            disk: 0,
            size: 64 << 20,
            from: 0,
            parent: counted.clone(),
        };
        let (tx, rx) = crossbeam::channel::bounded(1);
        std::thread::scope(|sc| {
            let reader = sc.spawn(move || read_parents(&[scan], 0, &tx));
            // The first piece; the reader then waits for room for its progress step.
            assert!(matches!(rx.recv().expect("a step"), Ok(Step::Piece { .. })));
            drop(rx);
            reader
                .join()
                .expect("reader")
                .expect("a gone sender is not an error");
        });
        let reads = counted.reads.load(Ordering::SeqCst);
        assert!(reads <= 2, "the reader went on: {reads} reads of 8 MiB");
    }
}
