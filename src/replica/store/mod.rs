//! A replica's store at the target: every segment received is verified like the
//! source's own recovery would verify it, stored gap-free and exactly once,
//! encrypted, durable — and only then acknowledged. Below the segments lie the
//! replica parent images, kept as encrypted fixed-size chunks.
//!
//! Every object goes through the [`ReplicaBackend`] (`SITE/replicas/` by default).
//! The objects of machine `<m>`:
//!
//! ```text
//! <m>/replica.meta             manifest: source site, machine id, disks, generation
//! <m>/received                 last segment stored (LSN, seq): a watermark file
//! <m>/parent.meta              what the parent chunks hold (ParentMark)
//! <m>/retention.meta           how long points are kept (Retention)
//! <m>/segments/<seq>.seg.enc   encrypted segments (see crypt.rs)       — segments.rs
//! <m>/segments/<seq>.idx.enc   each one's records and points (SegmentIndex)
//! <m>/parent/<disk>/<n>.enc    parent chunk n of disk id <disk>: bytes   — chunks.rs
//!                              n*256KiB.. of the disk; missing = zeroes
//! <m>/hashes/<disk>/<p>.enc    hash page p: the BLAKE3 hashes of the 4 KiB pieces — hashes.rs
//!                              of parent chunks p*64..p*64+64, for resyncs
//! <m>/initial                  initial-copy progress (chunks, position, done)
//! <m>/pins/, <m>/merge.lock    readers' pins (see pin.rs)
//! <m>/damaged                  why the replica needs a resync (text)
//! <m>/patches/<n>.{data,idx}.enc  a resync's chunks, on top of the parent  — patches.rs
//!                              until the compactor folds them
//! <m>/resync.meta              a resync under way (see resync_apply.rs)
//! <m>/dropped                  what that resync lost of the replica's own bytes (text)
//! <m>/scrub.meta               how far the scrub got, what it last found (scrub.rs)
//! ```
//!
//! Order for a new segment: verify it, write its index and then the segment (each
//! atomically and durably), then persist `received`. A crash between the segment and
//! `received` leaves one segment past the mark; opening the store for writing
//! verifies it and takes it in, or removes it if it does not verify. Readers
//! (restore, views, the target compactor) open the store read-only and never look
//! past the mark.
//!
//! The initial copy is written straight into the parent chunks (read, overlay,
//! encrypt, put), then its position is persisted: a resent chunk after a crash
//! overlays the same bytes again.

mod chunks;
pub(crate) mod hashes;
mod patches;
mod segments;

pub use chunks::ChunkEditor;

use super::backend::{DirBackend, ReplicaBackend};
use super::crypt::ReplicaKey;
use crate::error::{Error, Result};
use crate::format::meta::{self, body_exact, DiskEntry, Watermark, KIND_REPLICA_MANIFEST};
use crate::names::validate_name;
use crate::storage::FileStorage;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const REPLICAS_DIR: &str = "replicas";
pub(crate) const MANIFEST: &str = "replica.meta";
const RECEIVED: &str = "received";
const PARENT_MARK: &str = "parent.meta";
const RETENTION: &str = "retention.meta";
const INITIAL: &str = "initial";
const DAMAGED: &str = "damaged";
const PROMOTED: &str = "promoted.meta";
pub(crate) const PINS: &str = "pins";
pub(crate) const MERGE_LOCK: &str = "merge.lock";
/// Held by a maintenance pass of a replica (`maintain::pass`) and by its removal.
const PASS_LOCK: &str = "pass.lock";

/// Bytes per parent chunk. Smaller chunks rewrite less when scattered blocks change (a
/// merge or a resync rewrites every chunk it touches) but make more files; 256 KiB
/// measured a resync with 1% of blocks changed 1.4x faster than 1 MiB, and restore
/// no slower (see tools/bench).
pub const CHUNK_BYTES: u64 = 256 << 10;

/// The replica was promoted by a failover (`SITE/replicas/<m>/promoted.meta`): from
/// then on the receiver refuses the older generation as fenced, and the replica's
/// compactor and scrub stand still (every point stays for a change of point), until
/// the failover is cancelled (the record goes) or committed (the replica goes once
/// the promoted machine no longer stands on it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    pub kind: crate::protection::FailoverKind,
    /// The promoted machine's generation; the replica's was `from_generation`.
    pub generation: u32,
    pub from_generation: u32,
    /// The point promoted (its LSN).
    pub lsn: u64,
    /// When (ns since the epoch).
    pub at_ns: u64,
    /// This site's ID (who holds the newer generation).
    pub site: [u8; 32],
    /// Committed: no way back; the points are gone for `replog points`.
    pub committed: bool,
}

/// What the replica parent chunks hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentMark {
    /// Every record with an LSN <= `lsn` is in the parent chunks; the chain goes on
    /// with segment `seq + 1`.
    pub lsn: u64,
    pub seq: u64,
    /// The recovery point the parent stands for, when it is one (after a merge; the
    /// initial copy is not).
    pub point: Option<IndexedPoint>,
    /// A merge toward (LSN, seq) is under way: points before that LSN are gone, and
    /// each parent chunk is somewhere between `lsn` and it (replaying the chain from
    /// `seq + 1` over any of those states gives the same result).
    pub merging_to: Option<(u64, u64)>,
    /// A resynchronisation is rewriting the parent (see resync_apply.rs): no point
    /// can be opened until it ends.
    pub resyncing: bool,
    /// Points before this LSN are not consistent (the chunks a resync took were read
    /// at various times after its base) and are never offered.
    pub valid_from: u64,
    /// Patch files 1..=patches (a resync's chunks) lie on top of the parent chunks,
    /// below the segments, until the target compactor folds them in.
    pub patches: u64,
}

impl ParentMark {
    /// Decode a parent mark of `version`. Version 1 is any of the layouts development
    /// builds wrote under it (dcea4b2: no `received_ns` in the point, no resync
    /// fields; 9c13afe: with `received_ns`; 1f7c5c7: + `resyncing`, `valid_from`;
    /// 7fb0b33 … f501a4c: + `patches`, the layout of version 2): tried newest first,
    /// each must consume the body exactly.
    fn decode_version(version: u16, body: &[u8]) -> Option<ParentMark> {
        if version >= 2 {
            return body_exact(body);
        }
        if let Some(m) = body_exact::<ParentMark>(body) {
            return Some(m);
        }
        #[derive(Deserialize)]
        struct Resync {
            lsn: u64,
            seq: u64,
            point: Option<IndexedPoint>,
            merging_to: Option<(u64, u64)>,
            resyncing: bool,
            valid_from: u64,
        }
        if let Some(m) = body_exact::<Resync>(body) {
            return Some(ParentMark {
                lsn: m.lsn,
                seq: m.seq,
                point: m.point,
                merging_to: m.merging_to,
                resyncing: m.resyncing,
                valid_from: m.valid_from,
                patches: 0,
            });
        }
        #[derive(Deserialize)]
        struct Received {
            lsn: u64,
            seq: u64,
            point: Option<IndexedPoint>,
            merging_to: Option<(u64, u64)>,
        }
        if let Some(m) = body_exact::<Received>(body) {
            return Some(ParentMark {
                lsn: m.lsn,
                seq: m.seq,
                point: m.point,
                merging_to: m.merging_to,
                ..Default::default()
            });
        }
        #[derive(Deserialize)]
        struct FirstPoint {
            lsn: u64,
            time_ns: u64,
            app: bool,
            digests: Option<Vec<u64>>,
        }
        #[derive(Deserialize)]
        struct First {
            lsn: u64,
            seq: u64,
            point: Option<FirstPoint>,
            merging_to: Option<(u64, u64)>,
        }
        body_exact::<First>(body).map(|m| ParentMark {
            lsn: m.lsn,
            seq: m.seq,
            // No receive time was kept: retention counts the point's age from 0,
            // so it expires at once unless it is the newest (which is always kept).
            point: m.point.map(|p| IndexedPoint {
                lsn: p.lsn,
                time_ns: p.time_ns,
                app: p.app,
                digests: p.digests,
                received_ns: 0,
            }),
            merging_to: m.merging_to,
            ..Default::default()
        })
    }
}

/// Sequence numbers from here on name patch files where a segment's number would go
/// (segment numbers stay below 2^62): patch `n` is `PATCH_SEQ + n`.
pub const PATCH_SEQ: u64 = 1 << 62;

/// How long a replica keeps recovery points (set by the source's relationship).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Every point younger than this is kept.
    pub window_ms: u64,
    /// App-consistent points younger than this are kept (at least `window_ms`).
    pub app_window_ms: u64,
}

impl Default for Retention {
    fn default() -> Self {
        use crate::replication::relationship::{DEFAULT_APP_RETENTION_MS, DEFAULT_RETENTION_MS};
        Retention {
            window_ms: DEFAULT_RETENTION_MS,
            app_window_ms: DEFAULT_APP_RETENTION_MS,
        }
    }
}

/// One record of a stored segment, as its index lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedRecord {
    pub lsn: u64,
    pub disk: u32,
    /// A zero (discard) record; otherwise a write whose payload is at `payload_at`
    /// in the segment's plain bytes.
    pub zero: bool,
    pub offset: u64,
    pub length: u64,
    pub payload_at: u64,
}

/// One recovery point in a stored segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedPoint {
    pub lsn: u64,
    /// The source's clock at the point.
    pub time_ns: u64,
    pub app: bool,
    pub digests: Option<Vec<u64>>,
    /// This site's clock when the segment holding the point was stored: retention
    /// ages points by it, so a source clock that is off cannot expire history early
    /// or keep it for ever.
    pub received_ns: u64,
}

/// A point of a stored segment that belongs to a plan point (`replog plan
/// checkpoint`): its LSN and the plan point's ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanTag {
    pub lsn: u64,
    pub id: u64,
}

/// The records and points of one stored segment (`<seq>.idx.enc`, postcard, in field
/// order), so points can be listed and a point's image mapped without decrypting
/// every segment. Index version 2 (the encrypted file's header) added `plan_points`;
/// version 1 is the same without it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentIndex {
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub sealed_ns: u64,
    pub records: Vec<IndexedRecord>,
    pub points: Vec<IndexedPoint>,
    pub plan_points: Vec<PlanTag>,
}

impl SegmentIndex {
    /// Decode an index body of `version` (each layout must consume the body exactly).
    pub fn decode(version: u16, body: &[u8]) -> Option<SegmentIndex> {
        if version >= 2 {
            return body_exact(body);
        }
        #[derive(Deserialize)]
        struct V1 {
            first_lsn: u64,
            last_lsn: u64,
            sealed_ns: u64,
            records: Vec<IndexedRecord>,
            points: Vec<IndexedPoint>,
        }
        body_exact::<V1>(body).map(|v| SegmentIndex {
            first_lsn: v.first_lsn,
            last_lsn: v.last_lsn,
            sealed_ns: v.sealed_ns,
            records: v.records,
            points: v.points,
            plan_points: Vec::new(),
        })
    }

    /// The body to store and its index version: version 1 (the layout before plan
    /// points, which older builds read) when the segment holds no plan point.
    pub fn encode(&self) -> Result<(u16, Vec<u8>)> {
        #[derive(Serialize)]
        struct V1<'a> {
            first_lsn: u64,
            last_lsn: u64,
            sealed_ns: u64,
            records: &'a [IndexedRecord],
            points: &'a [IndexedPoint],
        }
        let body = if self.plan_points.is_empty() {
            postcard::to_stdvec(&V1 {
                first_lsn: self.first_lsn,
                last_lsn: self.last_lsn,
                sealed_ns: self.sealed_ns,
                records: &self.records,
                points: &self.points,
            })
        } else {
            postcard::to_stdvec(self)
        }
        .map_err(|e| Error::InvalidInput(e.to_string()))?;
        Ok((if self.plan_points.is_empty() { 1 } else { 2 }, body))
    }

    /// The plan point that the point at `lsn` belongs to.
    pub fn plan_point_at(&self, lsn: u64) -> Option<u64> {
        self.plan_points.iter().find(|t| t.lsn == lsn).map(|t| t.id)
    }
}

/// How far initial replication got (persisted after every chunk).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitialProgress {
    /// Base chunks stored.
    pub chunks: u64,
    /// Where the next chunk may start: disk and byte offset.
    pub disk: u32,
    pub offset: u64,
    /// Every disk has been copied.
    pub done: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaManifest {
    pub source_site: [u8; 32],
    pub machine_id: u64,
    pub disks: Vec<DiskEntry>,
    /// The chain starts after this LSN and segment (what the initial copy stands for).
    pub base_lsn: u64,
    pub base_seq: u64,
    /// The generation of the machine this replica holds (see `crate::protection`).
    pub generation: u32,
}

impl ReplicaManifest {
    /// Version 1 had no generation: every machine was at its first.
    fn decode_version(version: u16, body: &[u8]) -> Option<ReplicaManifest> {
        if version >= 2 {
            return body_exact(body);
        }
        #[derive(Deserialize)]
        struct V1 {
            source_site: [u8; 32],
            machine_id: u64,
            disks: Vec<DiskEntry>,
            base_lsn: u64,
            base_seq: u64,
        }
        body_exact::<V1>(body).map(|m| ReplicaManifest {
            source_site: m.source_site,
            machine_id: m.machine_id,
            disks: m.disks,
            base_lsn: m.base_lsn,
            base_seq: m.base_seq,
            generation: 1,
        })
    }
}

/// What happened to a segment handed to [`ReplicaStore::receive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// Stored now; everything up to `lsn` is durable here.
    Stored { lsn: u64 },
    /// Stored before (a resend); nothing changed.
    Duplicate { lsn: u64 },
}

/// Whether the site at `site` holds a replica of `machine` (in `SITE/replicas/` or
/// its object store; no key needed, nothing created; false if it cannot say).
pub fn held_at(site: &Path, machine: &str) -> bool {
    holds_replica(site, machine).unwrap_or(false)
}

/// [`held_at`], saying why it cannot tell (a bad name, a store it cannot reach).
pub fn holds_replica(site: &Path, machine: &str) -> Result<bool> {
    validate_name("machine", machine)?;
    let backend: Arc<dyn ReplicaBackend> = match backend_at(site)? {
        Some(b) => b,
        None => Arc::new(DirBackend::new(
            Arc::new(FileStorage),
            site.join(REPLICAS_DIR),
        )),
    };
    backend.exists(&format!("{machine}/{MANIFEST}"))
}

/// Local state of an object-store replica store (locks, pins): `SITE/replica-state/`.
pub const REPLICA_STATE_DIR: &str = "replica-state";

/// The object-store backend of the site at `site`, if its `replica.store` names one
/// (None: replicas in `SITE/replicas/`). One per store in a process: the receiver,
/// the target compactor, scrub and failovers of one `serve` write through the same
/// one and never fence each other.
pub fn backend_at(site: &Path) -> Result<Option<Arc<dyn ReplicaBackend>>> {
    use crate::replica::objects::ObjectBackend;
    use parking_lot::Mutex;
    use std::collections::HashMap;
    use std::sync::{OnceLock, Weak};
    static SHARED: OnceLock<Mutex<HashMap<PathBuf, Weak<ObjectBackend>>>> = OnceLock::new();
    let config = crate::site::Site::read_config(site)?;
    if config.replica.store.is_empty() {
        return Ok(None);
    }
    let id = site.canonicalize().unwrap_or_else(|_| site.to_path_buf());
    let mut shared = SHARED.get_or_init(Default::default).lock();
    if let Some(b) = shared.get(&id).and_then(Weak::upgrade) {
        return Ok(Some(b));
    }
    let backend = Arc::new(object_backend(site, &config.replica)?);
    shared.retain(|_, w| w.strong_count() > 0);
    shared.insert(id, Arc::downgrade(&backend));
    Ok(Some(backend))
}

/// The bucket the replica settings `r` name.
pub fn object_store(
    r: &crate::config::ReplicaConfig,
) -> Result<crate::replica::objects::S3Objects> {
    use crate::replica::objects::{Credentials, S3Location, S3Objects};
    r.validate()?;
    S3Objects::new(
        &S3Location::parse(&r.store)?,
        &r.s3,
        Credentials::load(&r.s3.credentials_file)?,
    )
}

/// A new object-store backend for the replica settings `r` of the site at `site`.
pub fn object_backend(
    site: &Path,
    r: &crate::config::ReplicaConfig,
) -> Result<crate::replica::objects::ObjectBackend> {
    Ok(crate::replica::objects::ObjectBackend::new(
        Arc::new(object_store(r)?),
        DirBackend::new(Arc::new(FileStorage), site.join(REPLICA_STATE_DIR)),
        std::time::Duration::from_millis(r.s3.gc_grace_ms),
        r.s3.unfenced,
    ))
}

/// A target's replicas: where they are kept and the key that encrypts them.
#[derive(Clone, Debug)]
pub struct Replicas {
    backend: Arc<dyn ReplicaBackend>,
    key: ReplicaKey,
    /// Segments read ahead for planned failovers' checks (shared by the clones).
    warm: Arc<super::warm::Warm>,
}

impl Replicas {
    pub fn new(backend: Arc<dyn ReplicaBackend>, key: ReplicaKey) -> Self {
        Replicas {
            backend,
            key,
            warm: Arc::default(),
        }
    }

    /// Segments read ahead for planned failovers' checks.
    pub fn warm(&self) -> &Arc<super::warm::Warm> {
        &self.warm
    }

    /// The replicas of the site at `path` (in `SITE/replicas/`, or in the object store
    /// its `[replica] store` names; the site's replica key): no lock needed, restores
    /// read replicas while `serve` runs.
    pub fn local(path: &Path) -> Result<Self> {
        Replicas::local_on(Arc::new(FileStorage), path)
    }

    /// [`Replicas::local`], a directory store kept on `storage` (the site's).
    pub fn local_on(storage: Arc<dyn crate::storage::Storage>, path: &Path) -> Result<Self> {
        let key = crate::site::replica_key_at(path)?;
        Ok(match backend_at(path)? {
            Some(backend) => Replicas::new(backend, key),
            None => Replicas::new(
                Arc::new(DirBackend::new(storage, path.join(REPLICAS_DIR))),
                key,
            ),
        })
    }

    /// The replicas in `SITE/replicas/` of the site at `path`, with `key`.
    pub fn with_key(path: &Path, key: ReplicaKey) -> Self {
        Replicas::new(
            Arc::new(DirBackend::new(
                Arc::new(FileStorage),
                path.join(REPLICAS_DIR),
            )),
            key,
        )
    }

    pub fn backend(&self) -> &Arc<dyn ReplicaBackend> {
        &self.backend
    }

    pub fn key(&self) -> &ReplicaKey {
        &self.key
    }

    /// Whether a replica of `machine` is here (false if the store cannot say: see
    /// [`Replicas::holds`]).
    pub fn has(&self, machine: &str) -> bool {
        self.holds(machine).unwrap_or(false)
    }

    /// Whether a replica of `machine` is here; a store that cannot answer says so.
    /// A name that is not a machine's is held nowhere.
    pub fn holds(&self, machine: &str) -> Result<bool> {
        if validate_name("machine", machine).is_err() {
            return Ok(false);
        }
        self.backend.exists(&format!("{machine}/{MANIFEST}"))
    }

    /// Remove the replica of `machine`, every object of it (a committed failover's
    /// replica, once nothing stands on it). Durable on return. Waits for the
    /// maintenance pass under way ([`Self::pass_lock`]): a merge writes parent chunks
    /// without holding `merge.lock`, and its writes landing after the removal would
    /// bring back part of the replica — chunk objects a later replica of the same
    /// name would take for its own.
    pub fn remove(&self, machine: &str) -> Result<()> {
        validate_name("machine", machine)?;
        let _pass = self.pass_lock(machine)?;
        self.backend.delete_prefix(machine)
    }

    /// The lock a maintenance pass of `machine`'s replica (compaction, scrub,
    /// collection) holds from start to end, and a removal while it removes: the two
    /// never overlap. Whoever takes it checks that the replica is still there.
    pub fn pass_lock(&self, machine: &str) -> Result<Box<dyn super::backend::Held>> {
        validate_name("machine", machine)?;
        self.backend.lock(&format!("{machine}/{PASS_LOCK}"))
    }

    /// The machines this site holds replicas of.
    pub fn machines(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for m in self.backend.list("")? {
            // An object store that fails here says so, rather than a short list.
            if self.holds(&m)? {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// Bytes free where replicas are kept.
    pub fn free_bytes(&self) -> u64 {
        self.backend.free_bytes()
    }

    /// Open for receiving (the serve that owns the site): a segment a crash left past
    /// the mark is taken in or removed.
    pub fn open(&self, machine: &str) -> Result<ReplicaStore> {
        let mut store = self.open_readonly(machine)?;
        store.reconcile()?;
        Ok(store)
    }

    /// Open for reading (restore, views, the target compactor): changes nothing and
    /// sees nothing past the `received` mark.
    pub fn open_readonly(&self, machine: &str) -> Result<ReplicaStore> {
        validate_name("machine", machine)?;
        let mut store = ReplicaStore {
            replicas: self.clone(),
            name: machine.to_string(),
            received: Watermark::default(),
            initial: InitialProgress::default(),
            parent: ParentMark::default(),
            retention: Retention::default(),
            manifest: ReplicaManifest {
                source_site: [0; 32],
                machine_id: 0,
                disks: Vec::new(),
                base_lsn: 0,
                base_seq: 0,
                generation: 1,
            },
        };
        let (version, manifest) = match store.read_meta_version(MANIFEST, KIND_REPLICA_MANIFEST)? {
            Some((v, body)) => (
                v,
                ReplicaManifest::decode_version(v, &body).ok_or_else(|| {
                    Error::corruption(
                        store.locate(MANIFEST),
                        24,
                        "replica manifest does not decode",
                    )
                })?,
            ),
            None => {
                return Err(Error::NotFound(format!(
                    "this site holds no replica of {machine}"
                )))
            }
        };
        if version == 1
            && !store.exists(PARENT_MARK)?
            && !store
                .replicas
                .backend
                .list(&store.key_of("base"))?
                .is_empty()
        {
            // Written before replica parents existed (fc86700 … dcea4b2): its initial
            // copy is in base/ chunks this build cannot read.
            return Err(Error::Unsupported {
                path: store.dir(),
                what: "a replica in layout 1 (base/ initial-copy chunks, written before \
                       recovery points); this build reads layout 2 (parent chunks, replica \
                       manifest version 1 or 2). Remove it and protect the machine again"
                    .into(),
            });
        }
        store.parent = ParentMark {
            lsn: manifest.base_lsn,
            seq: manifest.base_seq,
            ..Default::default()
        };
        store.manifest = manifest;
        store.refresh()?;
        Ok(store)
    }

    /// Start a replica of `machine` whose chain begins after `base` (the point the
    /// initial copy of the disks stands for: segments up to it are never sent).
    pub fn create(
        &self,
        machine: &str,
        manifest: ReplicaManifest,
        base: Watermark,
    ) -> Result<ReplicaStore> {
        validate_name("machine", machine)?;
        if self.holds(machine)? {
            return Err(Error::AlreadyExists(format!(
                "a replica of {machine} exists at {}",
                self.backend.locate(machine).display()
            )));
        }
        for d in &manifest.disks {
            validate_name("disk", &d.name)?;
            crate::names::validate_disk_size(d.size)?;
        }
        let b = &self.backend;
        // The marks first: the manifest, written last, says "created".
        b.put(&format!("{machine}/{RECEIVED}"), &base.encode())?;
        let parent = ParentMark {
            lsn: base.lsn,
            seq: base.segment_seq,
            ..Default::default()
        };
        b.put(
            &format!("{machine}/{PARENT_MARK}"),
            &meta::encode(meta::KIND_PARENT_MARK, &postcard_body(&parent)?),
        )?;
        b.put(
            &format!("{machine}/{MANIFEST}"),
            &meta::encode(KIND_REPLICA_MANIFEST, &postcard_body(&manifest)?),
        )?;
        self.open(machine)
    }
}

pub(crate) fn postcard_body<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(v).map_err(|e| Error::InvalidInput(e.to_string()))
}

/// One machine's replica.
#[derive(Debug)]
pub struct ReplicaStore {
    replicas: Replicas,
    name: String,
    manifest: ReplicaManifest,
    received: Watermark,
    initial: InitialProgress,
    parent: ParentMark,
    retention: Retention,
}

impl ReplicaStore {
    /// The key of `rel` in this replica (`<machine>/<rel>`).
    pub(crate) fn key_of(&self, rel: &str) -> String {
        format!("{}/{rel}", self.name)
    }

    /// Where `rel` of this replica lives, for messages.
    pub fn locate(&self, rel: &str) -> PathBuf {
        self.replicas.backend.locate(&self.key_of(rel))
    }

    pub(crate) fn backend(&self) -> &dyn ReplicaBackend {
        self.replicas.backend.as_ref()
    }

    pub(crate) fn exists(&self, rel: &str) -> Result<bool> {
        self.backend().exists(&self.key_of(rel))
    }

    /// A small metadata file of this replica, its version and body (None: absent).
    pub(crate) fn read_meta_version(&self, rel: &str, kind: u16) -> Result<Option<(u16, Vec<u8>)>> {
        let Some(b) = self.backend().get(&self.key_of(rel))? else {
            return Ok(None);
        };
        let (v, body) = meta::decode(kind, &b)
            .map_err(|e| Error::corruption(self.locate(rel), e.offset, e.what))?;
        Ok(Some((v, body.to_vec())))
    }

    /// A metadata file whose body has one layout at every version.
    pub(crate) fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        rel: &str,
        kind: u16,
    ) -> Result<Option<T>> {
        match self.read_meta_version(rel, kind)? {
            None => Ok(None),
            Some((_, body)) => body_exact(&body).map(Some).ok_or_else(|| {
                Error::corruption(
                    self.locate(rel),
                    meta::META_HEADER_LEN as u64,
                    format!("{} body does not decode", meta::kind_name(kind)),
                )
            }),
        }
    }

    pub(crate) fn write_meta<T: Serialize>(&self, rel: &str, kind: u16, v: &T) -> Result<()> {
        self.backend()
            .put(&self.key_of(rel), &meta::encode(kind, &postcard_body(v)?))
    }

    /// Read the marks again (a long-lived reader catching up with the receiver and
    /// the target compactor).
    pub fn refresh(&mut self) -> Result<()> {
        if let Some(b) = self.backend().get(&self.key_of(RECEIVED))? {
            self.received = Watermark::decode(&b)
                .map_err(|e| Error::corruption(self.locate(RECEIVED), e.offset, e.what))?;
        }
        if let Some(i) = self.read_meta(INITIAL, meta::KIND_INITIAL_PROGRESS)? {
            self.initial = i;
        }
        if let Some(p) = self.read_parent_mark()? {
            self.parent = p;
        }
        if let Some(r) = self.read_meta(RETENTION, meta::KIND_RETENTION)? {
            self.retention = r;
        }
        Ok(())
    }

    fn read_parent_mark(&self) -> Result<Option<ParentMark>> {
        match self.read_meta_version(PARENT_MARK, meta::KIND_PARENT_MARK)? {
            None => Ok(None),
            Some((v, body)) => ParentMark::decode_version(v, &body)
                .map(Some)
                .ok_or_else(|| {
                    Error::corruption(
                        self.locate(PARENT_MARK),
                        meta::META_HEADER_LEN as u64,
                        format!("replica parent mark version {v} does not decode"),
                    )
                }),
        }
    }

    /// The machine this replica holds.
    pub fn machine(&self) -> &str {
        &self.name
    }

    /// Where the replica lives, for messages.
    pub fn dir(&self) -> PathBuf {
        self.replicas.backend.locate(&self.name)
    }

    pub fn replicas(&self) -> &Replicas {
        &self.replicas
    }

    pub fn key(&self) -> &ReplicaKey {
        &self.replicas.key
    }

    /// What the parent chunks hold.
    pub fn parent(&self) -> &ParentMark {
        &self.parent
    }

    /// Persist a new parent mark (the target compactor).
    pub fn set_parent(&mut self, mark: ParentMark) -> Result<()> {
        self.write_meta(PARENT_MARK, meta::KIND_PARENT_MARK, &mark)?;
        self.parent = mark;
        Ok(())
    }

    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// Persist the retention the source asked for (when it changed).
    pub fn set_retention(&mut self, r: Retention) -> Result<()> {
        if r != self.retention || !self.exists(RETENTION)? {
            self.write_meta(RETENTION, meta::KIND_RETENTION, &r)?;
            self.retention = r;
        }
        Ok(())
    }

    pub fn manifest(&self) -> &ReplicaManifest {
        &self.manifest
    }

    /// The generation of the machine this replica holds.
    pub fn generation(&self) -> u32 {
        self.manifest.generation
    }

    /// The failover that promoted this replica, if one did.
    pub fn promotion(&self) -> Result<Option<Promotion>> {
        self.read_meta(PROMOTED, meta::KIND_PROMOTION)
    }

    /// Record (or, with None, remove) the promotion, durably.
    pub fn set_promotion(&self, p: Option<&Promotion>) -> Result<()> {
        match p {
            Some(p) => self.write_meta(PROMOTED, meta::KIND_PROMOTION, p),
            None => self.backend().delete(&[self.key_of(PROMOTED)]),
        }
    }

    /// The source speaks for a newer generation of the machine: record it (the
    /// replica then refuses the older one).
    pub fn set_generation(&mut self, generation: u32) -> Result<()> {
        if generation <= self.manifest.generation {
            return Ok(());
        }
        let manifest = ReplicaManifest {
            generation,
            ..self.manifest.clone()
        };
        self.write_meta(MANIFEST, KIND_REPLICA_MANIFEST, &manifest)?;
        self.manifest = manifest;
        Ok(())
    }

    /// The newest segment stored (LSN 0 / seq 0: none).
    pub fn received(&self) -> Watermark {
        self.received
    }

    /// Why this replica needs a resync, if damage was found in it (`damaged`, text).
    pub fn damage(&self) -> Result<Option<String>> {
        Ok(self
            .backend()
            .get(&self.key_of(DAMAGED))?
            .map(|b| String::from_utf8_lossy(&b).trim().to_string()))
    }

    /// Record damage found in this replica (the source will be told to resync).
    pub fn mark_damaged(&self, why: &str) -> Result<()> {
        self.backend().put(&self.key_of(DAMAGED), why.as_bytes())
    }

    /// The damage is mended (a resync ended).
    pub(crate) fn clear_damage(&self) -> Result<()> {
        self.backend().delete(&[self.key_of(DAMAGED)])
    }

    /// Set the received mark (a resync moves it back to its base).
    pub(crate) fn set_received(&mut self, w: Watermark) -> Result<()> {
        self.backend().put(&self.key_of(RECEIVED), &w.encode())?;
        self.received = w;
        Ok(())
    }

    pub fn initial(&self) -> InitialProgress {
        self.initial
    }

    fn save_initial(&mut self, p: InitialProgress) -> Result<()> {
        self.write_meta(INITIAL, meta::KIND_INITIAL_PROGRESS, &p)?;
        self.initial = p;
        Ok(())
    }

    /// Store one chunk of the initial copy: `data` is disk `disk` at `offset`. Chunks
    /// must come in disk order, each at or after the previous one's end.
    pub fn receive_base(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.receive_base_batch(&[(disk, offset, data)])
    }

    /// What the initial copy's next chunks are checked against: where it stands, and
    /// the disks' sizes. A target checks chunks with it while earlier ones are still
    /// being stored; an error if the copy is complete.
    pub fn base_cursor(&self) -> Result<BaseCursor> {
        if self.initial.done {
            return Err(Error::InvalidInput(
                "the initial copy is already complete".into(),
            ));
        }
        Ok(BaseCursor {
            at: self.base_position(),
            sizes: self.manifest.disks.iter().map(|d| d.size).collect(),
        })
    }

    /// The copy's persisted position (disk, offset).
    pub fn base_position(&self) -> (u32, u64) {
        (self.initial.disk, self.initial.offset)
    }

    /// Store chunks of the initial copy, in order (see [`Self::receive_base`]): one
    /// edit of the parent chunks they touch, then the position, durably. Every chunk
    /// is checked before anything is written.
    pub fn receive_base_batch(&mut self, items: &[(u32, u64, &[u8])]) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let mut cursor = self.base_cursor()?;
        for (disk, offset, data) in items {
            cursor.advance(*disk, *offset, data.len() as u64)?;
        }
        let at = cursor.at;
        let mut ed = ChunkEditor::new(self);
        for (disk, offset, data) in items {
            ed.write_borrowed(*disk, *offset, data)?;
        }
        ed.finish()?;
        self.save_initial(InitialProgress {
            chunks: self.initial.chunks + items.len() as u64,
            disk: at.0,
            offset: at.1,
            done: false,
        })
    }

    /// Mark the initial copy complete.
    pub fn finish_initial(&mut self) -> Result<()> {
        let p = InitialProgress {
            done: true,
            ..self.initial
        };
        self.save_initial(p)
    }

    /// Size of disk id `disk` of this replica.
    pub(crate) fn disk_size(&self, disk: u32) -> Result<u64> {
        self.manifest
            .disks
            .get(disk as usize)
            .map(|d| d.size)
            .ok_or_else(|| Error::InvalidInput(format!("no disk {disk} in this replica")))
    }
}

/// Where an initial copy stands, for checking its chunks in order
/// ([`ReplicaStore::base_cursor`]).
#[derive(Debug, Clone)]
pub struct BaseCursor {
    at: (u32, u64),
    sizes: Vec<u64>,
}

impl BaseCursor {
    /// Accept a chunk of `len` bytes at `offset` of `disk`: it must hold bytes, lie
    /// within the disk and at or after the end of the chunk before (an empty chunk
    /// would leave the position where it was, so a source could send them without
    /// end). An error changes nothing.
    pub fn advance(&mut self, disk: u32, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Err(Error::InvalidInput(format!(
                "an empty initial chunk for disk {disk} at {offset}"
            )));
        }
        let size = *self
            .sizes
            .get(disk as usize)
            .ok_or_else(|| Error::InvalidInput(format!("no disk {disk} in this replica")))?;
        let end = offset.saturating_add(len);
        if end > size {
            return Err(Error::OutOfRange {
                what: "initial copy chunk".into(),
                offset,
                end,
                size,
            });
        }
        if (disk, offset) < self.at {
            return Err(Error::BrokenChain(format!(
                "initial chunk for disk {disk} at {offset} is behind the copy's position"
            )));
        }
        self.at = (disk, end);
        Ok(())
    }
}

/// Any metadata file replog writes (the envelope of `format::meta`), decoded by its
/// kind and version: what `replog inspect FILE` shows, and what the fuzz targets
/// feed every decoder through.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaFile {
    MachineManifest(meta::Manifest),
    Watermark(Watermark),
    ReplicaManifest(ReplicaManifest),
    InitialProgress(InitialProgress),
    ParentMark(ParentMark),
    Retention(Retention),
    ResyncProgress(super::resync_apply::ResyncProgress),
    Scrub(super::scrub::ScrubState),
    Promotion(Promotion),
    ChangedMap(crate::volume::ChangedMap),
    Seed(crate::failover::reprotect::Seed),
    Damage(crate::volume::DamageList),
    /// A manifest object of a replica in an object store (`<m>/m/<seq>`).
    ObjectManifest(crate::replica::objects::Manifest),
}

/// Decode a metadata file whatever its kind; the kind and version come from its
/// envelope.
pub fn decode_meta_file(
    b: &[u8],
) -> std::result::Result<(u16, MetaFile), crate::format::DecodeError> {
    use crate::format::DecodeError;
    let kind = b
        .get(10..12)
        .map(|k| u16::from_le_bytes([k[0], k[1]]))
        .ok_or_else(|| DecodeError::new(0, "file is too short for a metadata envelope"))?;
    let bad = |what: &str| {
        DecodeError::new(
            meta::META_HEADER_LEN as u64,
            format!("{what} does not decode"),
        )
    };
    if kind == meta::KIND_MANIFEST {
        return Ok((kind, MetaFile::MachineManifest(meta::Manifest::decode(b)?)));
    }
    if kind == meta::KIND_WATERMARK {
        return Ok((kind, MetaFile::Watermark(Watermark::decode(b)?)));
    }
    if kind == meta::KIND_CHANGED {
        return Ok((
            kind,
            MetaFile::ChangedMap(crate::volume::ChangedMap::decode(b)?),
        ));
    }
    if kind == meta::KIND_DAMAGE {
        return Ok((
            kind,
            MetaFile::Damage(crate::volume::DamageList::decode(b)?),
        ));
    }
    if kind == meta::KIND_OBJECT_MANIFEST {
        let m = crate::replica::objects::Manifest::decode_file(b)?;
        return Ok((kind, MetaFile::ObjectManifest(m)));
    }
    let (version, body) = meta::decode(kind, b)?;
    let file = match kind {
        meta::KIND_REPLICA_MANIFEST => MetaFile::ReplicaManifest(
            ReplicaManifest::decode_version(version, body)
                .ok_or_else(|| bad("replica manifest"))?,
        ),
        meta::KIND_INITIAL_PROGRESS => {
            MetaFile::InitialProgress(body_exact(body).ok_or_else(|| bad("initial progress"))?)
        }
        meta::KIND_PARENT_MARK => MetaFile::ParentMark(
            ParentMark::decode_version(version, body).ok_or_else(|| bad("parent mark"))?,
        ),
        meta::KIND_RETENTION => {
            MetaFile::Retention(body_exact(body).ok_or_else(|| bad("retention"))?)
        }
        meta::KIND_RESYNC => MetaFile::ResyncProgress(
            super::resync_apply::ResyncProgress::decode_version(version, body)
                .ok_or_else(|| bad("resync progress"))?,
        ),
        meta::KIND_SCRUB => MetaFile::Scrub(body_exact(body).ok_or_else(|| bad("scrub state"))?),
        meta::KIND_PROMOTION => {
            MetaFile::Promotion(body_exact(body).ok_or_else(|| bad("promotion"))?)
        }
        meta::KIND_SEED => MetaFile::Seed(body_exact(body).ok_or_else(|| bad("reprotect seed"))?),
        other => {
            return Err(DecodeError::new(
                10,
                format!("unknown metadata kind {other}"),
            ))
        }
    };
    Ok((kind, file))
}
