//! Reprotect, the old primary's half: a site asked to hold a newer generation of a
//! machine that is its own makes that machine a replica seeded from its own disks, so
//! that only what differs travels, and keeps its last state as an `orphan` point
//! (see docs/DESIGN.md, "Reprotect and failback").
//!
//! Order, each step durable before the next (a restart goes on from the last):
//!
//! 1. the fence (if the machine did not know yet that it was failed over);
//! 2. `replicas/<m>/seed.meta` (kind 11): the tail, the orphan to keep, state
//!    `seeding` at disk 0, byte 0;
//! 3. the replica's marks and manifest (chain after the sender's base, its generation);
//! 4. every non-zero 4 KiB block of the machine's disks as they read now into
//!    encrypted parent chunks, the position in `seed.meta` every 64 MiB;
//! 5. state `seeded`; then `machines/<m>` renamed to `orphans/<m>/<id>` (or removed
//!    when nothing was written after the point); state `orphan kept`.

use super::Host;
use crate::error::{Error, Result};
use crate::format::meta::{self, DiskEntry, Watermark};
use crate::identity::SiteId;
use crate::replica::store::{ChunkEditor, ReplicaManifest, Replicas};
use crate::replication::protocol::{Held, OrphanReport, RefusalCode};
use crate::storage::{FileStorage, Storage};
use crate::volume::{ChangedMap, Machine, MANIFEST_FILE};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where a site keeps the orphan points of its machines: `orphans/<m>/<id>/`.
pub const ORPHANS_DIR: &str = "orphans";
const SEED: &str = "seed.meta";
/// What an orphan point is (JSON, `OrphanReport`), in its directory.
const ORPHAN_INFO: &str = "orphan.json";
/// Bytes scanned between two persisted seeding positions.
const SEED_STEP: u64 = 64 << 20;
/// Most runs a tail is sent with (coarser granules beyond).
const MAX_TAIL_RUNS: usize = 100_000;

/// How far a seeding got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeedState {
    Seeding { disk: u32, offset: u64 },
    Seeded,
    OrphanKept,
}

/// `replicas/<m>/seed.meta`: a replica seeded from this site's own copy of the
/// machine by a reprotect from `source_site` at `generation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seed {
    pub source_site: [u8; 32],
    pub generation: u32,
    pub from_generation: u32,
    /// The promoted point: histories diverged after it.
    pub since: u64,
    pub tail: Vec<(u32, u64, u64)>,
    pub covered: bool,
    pub orphan: Option<OrphanReport>,
    pub state: SeedState,
    /// Bytes of data written into the parent chunks.
    pub seeded_bytes: u64,
    /// The LSN of the first point after the copy that matched its digests.
    pub verified: Option<u64>,
}

/// What the sender asks (the fields of `Message::Reprotect`).
#[derive(Debug, Clone)]
pub struct Request {
    pub peer: SiteId,
    pub machine: String,
    pub machine_id: u64,
    pub generation: u32,
    pub since: u64,
    pub foreign_upto: Option<u64>,
    pub disks: Vec<(String, u64)>,
    pub base: Watermark,
    pub probe: bool,
}

/// The answer (the fields of `Message::ReprotectState`), and whether a replica
/// appeared (its loop must start).
#[derive(Debug, Clone)]
pub struct Answer {
    pub held: Held,
    pub generation: u32,
    pub seed: Option<Seed>,
    /// This call created the replica (a store of the machine cached before is stale).
    pub created: bool,
}

pub fn read_seed(replicas: &Replicas, machine: &str) -> Result<Option<Seed>> {
    let key = format!("{machine}/{SEED}");
    let Some(b) = replicas.backend().get(&key)? else {
        return Ok(None);
    };
    let bad = |what: String| Error::corruption(replicas.backend().locate(&key), 0, what);
    let (_, body) = meta::decode(meta::KIND_SEED, &b).map_err(|e| bad(e.what))?;
    meta::body_exact(body)
        .map(Some)
        .ok_or_else(|| bad("reprotect seed body does not decode".into()))
}

pub(crate) fn write_seed(replicas: &Replicas, machine: &str, s: &Seed) -> Result<()> {
    let body = postcard::to_stdvec(s).map_err(|e| Error::InvalidInput(e.to_string()))?;
    replicas.backend().put(
        &format!("{machine}/{SEED}"),
        &meta::encode(meta::KIND_SEED, &body),
    )
}

/// A refusal the sender is told with its code.
fn refuse(code: RefusalCode, message: String) -> Error {
    Error::Refused {
        peer: String::new(),
        code,
        message,
    }
}

fn fenced(why: String) -> Error {
    refuse(RefusalCode::Fenced, why)
}

/// Answer a `Reprotect` (see the module documentation).
pub fn answer(host: &dyn Host, req: &Request) -> Result<Answer> {
    crate::names::validate_name("machine", &req.machine)?;
    let site = host.site();
    let replicas = host.replicas();
    let me = crate::identity::Identity::load(site.path())?.id();
    if req.peer == me {
        return Err(refuse(
            RefusalCode::Fatal,
            "a machine cannot be reprotected toward its own site".into(),
        ));
    }
    let dir = site.machine_dir(&req.machine)?;
    if let Some(seed) = read_seed(replicas, &req.machine)? {
        if seed.source_site != req.peer.0 {
            return Err(refuse(
                RefusalCode::NotOwner,
                format!(
                    "this site's replica of {} was seeded for site {}",
                    req.machine,
                    SiteId(seed.source_site)
                ),
            ));
        }
        if seed.generation > req.generation {
            return Err(fenced(format!(
                "this site holds {} at generation {}; the sender's {} is older",
                req.machine, seed.generation, req.generation
            )));
        }
        if seed.generation == req.generation {
            if req.probe {
                return Ok(Answer {
                    held: Held::Seeded,
                    generation: seed.generation,
                    seed: Some(seed),
                    created: false,
                });
            }
            let created = matches!(seed.state, SeedState::Seeding { .. });
            let seed = go_on(host, req, seed)?;
            return Ok(Answer {
                held: Held::Seeded,
                generation: seed.generation,
                seed: Some(seed),
                created,
            });
        }
        return Err(refuse(
            RefusalCode::Fatal,
            format!(
                "this site holds a replica of {} seeded for generation {}; the sender is at {}",
                req.machine, seed.generation, req.generation
            ),
        ));
    }
    if replicas.has(&req.machine) {
        let store = replicas.open_readonly(&req.machine)?;
        let man = store.manifest();
        if man.source_site != req.peer.0 || man.machine_id != req.machine_id {
            return Err(refuse(
                RefusalCode::NotOwner,
                format!(
                    "this site holds a replica of {} from another site or machine (site {})",
                    req.machine,
                    SiteId(man.source_site)
                ),
            ));
        }
        if man.generation > req.generation {
            return Err(fenced(format!(
                "this site holds {} at generation {}; the sender's {} is older",
                req.machine, man.generation, req.generation
            )));
        }
        return Ok(Answer {
            held: Held::Replica,
            generation: man.generation,
            seed: None,
            created: false,
        });
    }
    if !dir.join(MANIFEST_FILE).exists() {
        return Ok(Answer {
            held: Held::Nothing,
            generation: 0,
            seed: None,
            created: false,
        });
    }
    let man = Machine::read_manifest(&FileStorage, &dir)?;
    if man.machine_id != req.machine_id {
        return Err(refuse(
            RefusalCode::NotOwner,
            format!(
                "this site's machine {} is another machine than the sender's",
                req.machine
            ),
        ));
    }
    if man.generation > req.generation {
        return Err(fenced(format!(
            "this site holds {} at generation {}, newer than the sender's {}: it was \
             failed over here",
            req.machine, man.generation, req.generation
        )));
    }
    if man.generation == req.generation {
        return Err(refuse(
            RefusalCode::Fatal,
            format!(
                "this site runs {} at the sender's generation {}: both cannot be primaries",
                req.machine, req.generation
            ),
        ));
    }
    if man.base.is_some() || man.pending.is_some() || man.role != crate::protection::Role::Primary {
        return Err(refuse(
            RefusalCode::Fatal,
            format!(
                "this site's {} is not a plain primary (a failover of it is pending here, or it \
             is a test copy): settle that first",
                req.machine
            ),
        ));
    }
    if req.disks.len() != man.disks.len()
        || req
            .disks
            .iter()
            .zip(&man.disks)
            .any(|((n, s), d)| *n != d.name || *s != d.size)
    {
        return Err(refuse(
            RefusalCode::Fatal,
            format!(
                "the sender's disks of {} are not this site's ({} disks)",
                req.machine,
                man.disks.len()
            ),
        ));
    }
    if req.probe {
        return Ok(Answer {
            held: Held::OldPrimary,
            generation: man.generation,
            seed: None,
            created: false,
        });
    }
    // 1. Fenced first: the newer generation exists, whatever happens next.
    host.close(&req.machine)?;
    let machine = site.open_machine(&req.machine)?;
    if !machine.failed_over() {
        machine.persist_fence(crate::protection::Fence {
            by_site: req.peer.0,
            generation: req.generation,
            at_ns: crate::format::now_ns(),
            reason: "reprotected toward this site".into(),
        })?;
    }
    let tail = machine.records_after(req.since)?;
    let watermark = machine.status().watermark.lsn;
    let covered = watermark <= req.since || req.foreign_upto.is_some_and(|f| f >= watermark);
    let mut tail_map = ChangedMap::new(req.since, None, man.disks.len());
    for (d, o, l) in &tail.ranges {
        tail_map.add(*d, *o, *l);
    }
    let tail_map = tail_map.coarsened_to(MAX_TAIL_RUNS);
    let mut ranges = Vec::new();
    for d in &man.disks {
        for (o, l) in tail_map.ranges(d.id, d.size) {
            ranges.push((d.id, o, l));
        }
    }
    let last = tail.last_lsn.max(watermark);
    let orphan = (last > req.since).then(|| OrphanReport {
        id: format!("orphan-g{}-{last}", man.generation),
        first_lsn: req.since + 1,
        last_lsn: last,
        bytes: tail_map.bytes(),
        first_ns: tail.first_ns.unwrap_or(0),
        last_ns: tail.last_ns,
    });
    drop(machine);
    let seed = Seed {
        source_site: req.peer.0,
        generation: req.generation,
        from_generation: man.generation,
        since: req.since,
        tail: ranges,
        covered,
        orphan,
        state: SeedState::Seeding { disk: 0, offset: 0 },
        seeded_bytes: 0,
        verified: None,
    };
    // 2.
    write_seed(replicas, &req.machine, &seed)?;
    let seed = go_on(host, req, seed)?;
    Ok(Answer {
        held: Held::Seeded,
        generation: seed.generation,
        seed: Some(seed),
        created: true,
    })
}

/// Steps 3–5 from where `seed` stands.
fn go_on(host: &dyn Host, req: &Request, mut seed: Seed) -> Result<Seed> {
    let site = host.site();
    let replicas = host.replicas();
    let name = &req.machine;
    let dir = site.machine_dir(name)?;
    if let SeedState::Seeding { disk, offset } = seed.state {
        host.close(name)?;
        let machine = site.open_machine(name)?;
        // 3.
        if !replicas.has(name) {
            let manifest = ReplicaManifest {
                source_site: req.peer.0,
                machine_id: req.machine_id,
                disks: machine
                    .disks()
                    .into_iter()
                    .enumerate()
                    .map(|(i, (name, size))| DiskEntry {
                        id: i as u32,
                        name,
                        size,
                    })
                    .collect(),
                base_lsn: req.base.lsn,
                base_seq: req.base.segment_seq,
                generation: req.generation,
            };
            replicas.create(name, manifest, req.base)?;
        }
        // 4.
        copy_disks(replicas, name, &machine, &mut seed, (disk, offset))?;
        machine.close()?;
        seed.state = SeedState::Seeded;
        write_seed(replicas, name, &seed)?;
        crate::failpoint::hit("reprotect:seeded");
    }
    if seed.state == SeedState::Seeded {
        // 5.
        if dir.join(MANIFEST_FILE).exists() {
            host.close(name)?;
            match &seed.orphan {
                Some(o) => {
                    let to = orphan_dir(site.path(), name, &o.id)?;
                    let parent = to.parent().map(Path::to_path_buf).unwrap_or_default();
                    FileStorage.create_dir_all(&parent)?;
                    if to.exists() {
                        std::fs::remove_dir_all(&to).map_err(|e| Error::io("remove", &to, e))?;
                    }
                    std::fs::rename(&dir, &to).map_err(|e| Error::io("rename", &dir, e))?;
                    crate::storage::write_atomic(
                        &FileStorage,
                        &to.join(ORPHAN_INFO),
                        serde_json::to_string_pretty(o)
                            .map_err(|e| Error::InvalidInput(e.to_string()))?
                            .as_bytes(),
                    )?;
                    FileStorage.sync_dir(&parent)?;
                }
                None => std::fs::remove_dir_all(&dir).map_err(|e| Error::io("remove", &dir, e))?,
            }
            if let Some(p) = dir.parent() {
                FileStorage.sync_dir(p)?;
            }
        }
        seed.state = SeedState::OrphanKept;
        write_seed(replicas, name, &seed)?;
    }
    Ok(seed)
}

/// Every non-zero 4 KiB block of `machine`'s disks, as they read now, into the
/// replica's parent chunks, from `from` on.
fn copy_disks(
    replicas: &Replicas,
    name: &str,
    machine: &Machine,
    seed: &mut Seed,
    from: (u32, u64),
) -> Result<()> {
    const BLOCK: usize = 4096;
    const SLICE: usize = 4 << 20;
    let store = replicas.open(name)?;
    let mut buf = vec![0u8; SLICE];
    for (i, (disk, size)) in machine
        .disks()
        .into_iter()
        .enumerate()
        .skip(from.0 as usize)
    {
        let vol = machine.volume(&disk)?;
        let mut pos = if i as u32 == from.0 { from.1 } else { 0 };
        let mut ed = ChunkEditor::new(&store);
        let mut since_saved = 0u64;
        while pos < size {
            let Some(data) = vol.seek(pos, true)? else {
                break;
            };
            if data >= size {
                break;
            }
            let hole = vol.seek(data, false)?.unwrap_or(size).min(size);
            let mut at = data;
            // Where the disk has been asked to read ahead to: a step's worth ahead of
            // the reads, so that it reads the next step while this one is written out
            // (the chunks' writes and the disk's reads overlap instead of taking
            // turns; a disk read long ago is not in the page cache).
            let mut ahead = at;
            while at < hole {
                if ahead < at + SEED_STEP / 2 {
                    let from = ahead.max(at);
                    let to = (at + SEED_STEP).min(hole);
                    // A hint: a failure only means the reads wait for the disk.
                    let _ = vol.prefetch(from, to - from);
                    ahead = to;
                }
                let n = ((hole - at) as usize).min(SLICE);
                let chunk = buf.get_mut(..n).unwrap_or(&mut []);
                vol.read(at, chunk)?;
                // Each run of non-zero blocks as one edit (a run over a whole chunk
                // replaces it without reading it).
                for run in crate::storage::nonzero_runs(chunk, BLOCK) {
                    let piece = chunk.get(run.clone()).unwrap_or(&[]);
                    ed.write(i as u32, at + run.start as u64, piece)?;
                    seed.seeded_bytes += piece.len() as u64;
                }
                at += n as u64;
                since_saved += n as u64;
                if since_saved >= SEED_STEP {
                    ed.finish()?;
                    ed = ChunkEditor::new(&store);
                    seed.state = SeedState::Seeding {
                        disk: i as u32,
                        offset: at,
                    };
                    write_seed(replicas, name, seed)?;
                    since_saved = 0;
                }
            }
            pos = hole;
        }
        ed.finish()?;
        seed.state = SeedState::Seeding {
            disk: i as u32 + 1,
            offset: 0,
        };
        write_seed(replicas, name, seed)?;
    }
    Ok(())
}

/// `SITE/orphans/<machine>/<id>`, names checked.
pub fn orphan_dir(site: &Path, machine: &str, id: &str) -> Result<PathBuf> {
    crate::names::validate_name("machine", machine)?;
    crate::names::validate_name("orphan point", id)?;
    Ok(site.join(ORPHANS_DIR).join(machine).join(id))
}

/// The orphan points of `machine` at `site`, oldest first.
pub fn orphans(site: &Path, machine: &str) -> Result<Vec<OrphanReport>> {
    crate::names::validate_name("machine", machine)?;
    let dir = site.join(ORPHANS_DIR).join(machine);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut out: Vec<OrphanReport> = Vec::new();
    for e in rd.flatten() {
        let path = e.path().join(ORPHAN_INFO);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let o: OrphanReport = serde_json::from_str(&text)
            .map_err(|e| Error::corruption(&path, 0, format!("orphan point record: {e}")))?;
        if o.id == e.file_name().to_string_lossy() && e.path().join(MANIFEST_FILE).exists() {
            out.push(o);
        }
    }
    out.sort_by_key(|o| o.last_lsn);
    Ok(out)
}

/// Restore orphan point `id` of `machine` into `out` (`<disk>.img` each: the old
/// primary's disks as it left them, parents and journal; sparse). Returns the image
/// paths and the bytes written. Nothing is kept on an error.
pub fn restore_orphan(
    site: &Path,
    machine: &str,
    id: &str,
    out: &Path,
) -> Result<(Vec<PathBuf>, u64)> {
    let m = open_orphan(site, machine, id)?;
    let fs = FileStorage;
    let created = !out.exists();
    fs.create_dir_all(out)?;
    let mut partial = Vec::new();
    let done = (|| -> Result<u64> {
        let mut bytes = 0u64;
        let mut buf = vec![0u8; 4 << 20];
        for (disk, size) in m.disks() {
            let vol = m.volume(&disk)?;
            let p = out.join(format!("{disk}.img.partial"));
            partial.push(p.clone());
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| Error::io("remove", &p, e))?;
            }
            let f = fs.open(&p, crate::storage::OpenMode::CreateNew)?;
            f.set_len(size)?;
            let mut pos = 0;
            while let Some(data) = vol.seek(pos, true)?.filter(|d| *d < size) {
                let hole = vol.seek(data, false)?.unwrap_or(size).min(size);
                let mut at = data;
                while at < hole {
                    let n = ((hole - at) as usize).min(buf.len());
                    let chunk = buf.get_mut(..n).unwrap_or(&mut []);
                    vol.read(at, chunk)?;
                    for (i, block) in chunk.chunks(4096).enumerate() {
                        if block.iter().any(|v| *v != 0) {
                            f.write_at(&[block], at + (i * 4096) as u64)?;
                            bytes += block.len() as u64;
                        }
                    }
                    at += n as u64;
                }
                pos = hole;
            }
            f.sync_data()?;
        }
        Ok(bytes)
    })();
    let bytes = match done {
        Ok(b) => b,
        Err(e) => {
            for p in &partial {
                let _ = std::fs::remove_file(p);
            }
            if created {
                let _ = std::fs::remove_dir(out);
            }
            return Err(e);
        }
    };
    let mut images = Vec::new();
    for p in partial {
        let to = p.with_extension("");
        fs.rename(&p, &to)?;
        images.push(to);
    }
    fs.sync_dir(out)?;
    Ok((images, bytes))
}

/// Remove orphan point `id` of `machine` (an operator's decision).
pub fn remove_orphan(site: &Path, machine: &str, id: &str) -> Result<()> {
    if !id.starts_with("orphan-") {
        return Err(Error::InvalidInput(format!(
            "{id} is not an orphan point: only orphan points are removed (the others go \
             by retention)"
        )));
    }
    let dir = orphan_dir(site, machine, id)?;
    if !dir.join(MANIFEST_FILE).exists() {
        return Err(Error::NotFound(format!(
            "{machine} has no orphan point {id}"
        )));
    }
    std::fs::remove_dir_all(&dir).map_err(|e| Error::io("remove", &dir, e))?;
    if let Some(p) = dir.parent() {
        FileStorage.sync_dir(p)?;
        let _ = std::fs::remove_dir(p);
    }
    Ok(())
}

/// Open orphan point `id` of `machine` read-only (its writes are fenced for good).
pub fn open_orphan(site: &Path, machine: &str, id: &str) -> Result<Machine> {
    let dir = orphan_dir(site, machine, id)?;
    if !dir.join(MANIFEST_FILE).exists() {
        return Err(Error::NotFound(format!(
            "{machine} has no orphan point {id}"
        )));
    }
    let storage: std::sync::Arc<dyn Storage> = std::sync::Arc::new(FileStorage);
    let m = Machine::open(
        storage,
        &dir,
        machine,
        crate::config::JournalConfig::default(),
    )?;
    if m.fenced().is_none() {
        return Err(Error::InvalidInput(format!(
            "orphan point {id} of {machine} is not fenced"
        )));
    }
    Ok(m)
}

/// After segment `seq` of `machine` was stored: the first point after a seeded
/// replica's copy is checked against its digests (every stored chunk read); a match
/// is recorded in `seed.meta`, a mismatch marks the replica damaged (the source
/// resyncs, and a later point is checked again).
pub fn verify_after_segment(replicas: &Replicas, machine: &str, seq: u64) -> Result<()> {
    let Some(mut seed) = read_seed(replicas, machine)? else {
        return Ok(());
    };
    if seed.state != SeedState::OrphanKept || seed.verified.is_some() {
        return Ok(());
    }
    let store = replicas.open_readonly(machine)?;
    if !store.initial().done || store.damage()?.is_some() {
        return Ok(());
    }
    let base = store.manifest().base_lsn;
    let index = store.segment_index(seq)?;
    let Some(point) = index
        .points
        .iter()
        .rev()
        .find(|p| p.lsn > base && p.digests.is_some())
    else {
        return Ok(());
    };
    let lsn = point.lsn;
    let image = crate::replica::replay::PointImage::open_exact(store, lsn)?;
    match super::verify::verify(&image) {
        Ok(v) if v.digests_matched => {
            seed.verified = Some(lsn);
            write_seed(replicas, machine, &seed)?;
            tracing::info!(
                machine,
                lsn,
                bytes = v.bytes,
                "the reprotected replica matches the source's digests"
            );
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) if e.is_corruption() => {
            tracing::error!(machine, "the reprotected replica does not match: {e}");
            image
                .store()
                .mark_damaged(&format!("after the reprotect's copy: {e}"))
        }
        Err(e) => Err(e),
    }
}

/// What a reprotect's "orphan kept" step says.
pub fn orphan_detail(o: Option<&crate::replication::protocol::OrphanReport>) -> String {
    match o {
        Some(o) => format!(
            "orphan point {}: LSN {}..={}, {} bytes written after the point{}",
            o.id,
            o.first_lsn,
            o.last_lsn,
            o.bytes,
            if o.first_ns > 0 {
                format!(
                    ", {} to {}",
                    crate::format::rfc3339(o.first_ns),
                    crate::format::rfc3339(o.last_ns)
                )
            } else {
                String::new()
            }
        ),
        None => "none: nothing was written after the point".into(),
    }
}
