//! The target side of a replication session: checks who speaks, opens or creates the
//! machine's replica, assembles segment chunks, stores each whole segment through the
//! replica store (verify, encrypt, fsync) and only then acknowledges it.
//!
//! One [`Session`] per connection, one method per message. A frame that does not
//! decode, a message out of place, a chunk out of order, a segment that fails
//! verification or breaks the chain: an `Error` message with a [`RefusalCode`] goes
//! back (`Error::refusal_code` maps store errors to codes, so the source's
//! `Error::class` decides retry, resync or stop), the session closes, and nothing of
//! that segment is stored.

use super::protocol::{self, read_frame, write_frame, FrameError, Message, RefusalCode, MAX_CHUNK};
use crate::error::Error;
use crate::format::meta::{DiskEntry, Watermark};
use crate::identity::SiteId;
use crate::replica::store::{ReplicaManifest, ReplicaStore, Replicas};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A replica store shared by the sessions of one machine, and the session that owns
/// it: the newest Protect takes it over (under the store's lock), so an older
/// session still draining what its dead or reconnected sender sent is refused at its
/// next message instead of writing behind the new one's position.
#[derive(Debug)]
struct Slot {
    store: Mutex<ReplicaStore>,
    owner: AtomicU64,
}
type SharedStore = Arc<Slot>;

impl Slot {
    /// A slot for `store` that no session owns yet.
    fn new(store: ReplicaStore) -> SharedStore {
        Arc::new(Slot {
            store: Mutex::new(store),
            owner: AtomicU64::new(0),
        })
    }
}

/// The store of `slot`, locked, while session `token` owns it.
fn lock_owned<'s>(
    slot: &'s Slot,
    token: u64,
    name: &str,
) -> Result<parking_lot::MutexGuard<'s, ReplicaStore>, Refusal> {
    let st = slot.store.lock();
    if slot.owner.load(Ordering::SeqCst) != token {
        return Err((
            RefusalCode::Busy,
            format!("a newer session for {name} took this one over"),
        ));
    }
    Ok(st)
}

/// A whole segment to verify, encrypt, store and acknowledge (on the store thread
/// while the session reads the next one).
struct StoreJob {
    slot: SharedStore,
    token: u64,
    name: String,
    generation: u32,
    seq: u64,
    bytes: Vec<u8>,
    /// Read back ahead of a planned failover's check once stored.
    warm: Option<Arc<crate::replica::warm::WarmSet>>,
}

impl StoreJob {
    /// Store the segment: its Ack, and the buffer back for the next segment (a fresh
    /// 64 MiB buffer per segment cost page faults and zeroing on every page).
    fn run(mut self, target: &Target) -> (Result<Message, Refusal>, Vec<u8>) {
        let r = self.store(target);
        (r, self.bytes)
    }

    fn store(&mut self, target: &Target) -> Result<Message, Refusal> {
        let mut st = lock_owned(&self.slot, self.token, &self.name)?;
        check_promotion(&st, &self.name, self.generation)?;
        // Promoted, committed and folded since the session began: the promotion
        // record went with the replica, the machine it became is here (without this,
        // the segment would start the removed replica's keys again).
        target.check_not_a_machine_here(&self.name, self.generation)?;
        let lsn = match st
            .receive_framed(self.seq, &mut self.bytes)
            .map_err(refusal)?
        {
            crate::replica::store::Receipt::Stored { lsn }
            | crate::replica::store::Receipt::Duplicate { lsn } => lsn,
        };
        drop(st);
        if let Some(w) = &self.warm {
            w.push(self.seq);
        }
        crate::failover::reprotect::verify_after_segment(&target.replicas, &self.name, self.seq)
            .map_err(refusal)?;
        Ok(ack(&self.name, lsn))
    }
}

/// Session tokens (0 is nobody's).
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);
/// Why a session ends: the code the peer is told, and the reason.
type Refusal = (RefusalCode, String);

/// The largest segment a target assembles in memory.
pub const MAX_SEGMENT: u64 = 1 << 30;
/// Room reserved for a segment as it starts to arrive, at most (a default segment is
/// 64 MiB).
const RESERVE_MAX: usize = 256 << 20;
/// Initial-copy bytes a session holds before it stores them.
const BASE_BATCH: usize = 16 << 20;
/// Hashes one `ResyncHashRequest` may ask for.
pub const MAX_HASHES: u64 = 1 << 16;
/// Bytes of differing chunks one resync batch may carry.
const MAX_RESYNC_BATCH: usize = 256 << 20;

/// Refused when a failover promoted the replica past `generation`: the sender is
/// the old primary, fenced.
fn check_promotion(st: &ReplicaStore, machine: &str, generation: u32) -> Result<(), Refusal> {
    match st.promotion().map_err(refusal)? {
        Some(p) if p.generation > generation => Err((
            RefusalCode::Fenced,
            format!(
                "{machine} was failed over to site {} at {} ({} failover, generation {}{}); \
                 the sender's generation {generation} is fenced",
                SiteId(p.site),
                crate::format::rfc3339(p.at_ns),
                p.kind,
                p.generation,
                if p.committed {
                    ", committed"
                } else {
                    ", not committed yet"
                }
            ),
        )),
        _ => Ok(()),
    }
}

/// A store error as the source is told it.
fn refusal(e: Error) -> Refusal {
    (e.refusal_code(), e.to_string())
}

fn protocol_error(what: impl Into<String>) -> Refusal {
    (RefusalCode::Protocol, what.into())
}

/// What a target site needs to receive replicas.
#[derive(Debug)]
pub struct Target {
    pub me: SiteId,
    replicas: Replicas,
    /// One open store per machine; a second session for the same machine waits.
    stores: Mutex<HashMap<String, SharedStore>>,
    /// Told the name of every replica created (serve starts its loops, the mount
    /// shows it).
    on_new: Option<NewReplicaHook>,
    /// The site directory, when this target is a site's (its machines are checked:
    /// a machine promoted here is never taken as a replica again).
    site: Option<std::path::PathBuf>,
    /// Carries out a planned failover's promotion (serve's registry).
    on_promote: Option<PromoteHook>,
    /// Promotions under way and primaries asked to shut down.
    failovers: Arc<Failovers>,
    /// Answers a reprotect toward this site (serve's registry).
    on_reprotect: Option<ReprotectHook>,
}

type ReprotectFn = dyn Fn(
        &crate::failover::reprotect::Request,
    ) -> crate::error::Result<crate::failover::reprotect::Answer>
    + Send
    + Sync;

struct ReprotectHook(Box<ReprotectFn>);

impl std::fmt::Debug for ReprotectHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReprotectHook")
    }
}

/// Failovers of a target's replicas as its receiver sees them: promotions under way
/// (a Protect of the machine meanwhile is told to wait: the promotion may still be
/// undone, so the sender is not fenced yet), and primaries asked to shut down for
/// a failover (`replog failover --shutdown-source`): told so at their next Protect.
#[derive(Debug, Default)]
pub struct Failovers {
    promoting: Mutex<std::collections::HashSet<String>>,
    /// Machine → whether its primary was told.
    shutdown: Mutex<HashMap<String, bool>>,
}

impl Failovers {
    /// Ask machine `machine`'s primary to shut down at its next contact.
    pub fn request_shutdown(&self, machine: &str) {
        self.shutdown.lock().insert(machine.to_string(), false);
    }

    /// Stop asking; whether the primary had been told.
    pub fn withdraw_shutdown(&self, machine: &str) -> bool {
        self.shutdown.lock().remove(machine).unwrap_or(false)
    }

    /// A request not told yet: marked told.
    fn deliver_shutdown(&self, machine: &str) -> bool {
        match self.shutdown.lock().get_mut(machine) {
            Some(told @ false) => {
                *told = true;
                true
            }
            _ => false,
        }
    }

    fn promoting(&self, machine: &str) -> bool {
        self.promoting.lock().contains(machine)
    }
}

/// Marks a promotion under way while it lives.
struct Promoting<'a>(&'a Failovers, String);

impl<'a> Promoting<'a> {
    fn start(f: &'a Failovers, machine: &str) -> Promoting<'a> {
        f.promoting.lock().insert(machine.to_string());
        Promoting(f, machine.to_string())
    }
}

impl Drop for Promoting<'_> {
    fn drop(&mut self) {
        self.0.promoting.lock().remove(&self.1);
    }
}

/// What a target calls to promote a replica for a planned failover: (machine, LSN,
/// generation) → Ok once the promoted machine is open and verified; on Err nothing
/// was promoted.
pub type PromoteFn = dyn Fn(&str, u64, u32) -> crate::error::Result<()> + Send + Sync;

struct PromoteHook(Box<PromoteFn>);

impl std::fmt::Debug for PromoteHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PromoteHook")
    }
}

/// What a target calls when it creates a replica.
struct NewReplicaHook(Box<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for NewReplicaHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NewReplicaHook")
    }
}

impl Target {
    pub fn new(me: SiteId, replicas: Replicas) -> Self {
        Target {
            me,
            replicas,
            stores: Mutex::new(HashMap::new()),
            on_new: None,
            site: None,
            on_promote: None,
            failovers: Arc::default(),
            on_reprotect: None,
        }
    }

    /// Run `f` on `machine`'s replica store with no session writing it meanwhile,
    /// under the lock of its slot in the table of stores: the slot a session made, or
    /// one made here the way a session makes it (so a session that comes meanwhile
    /// waits for `f` on that slot, and sessions of other machines do not wait).
    /// Whether `machine` is of this site (promoted here, read without a slot) is
    /// checked first: the caller keeps a promotion from starting meanwhile (serve's
    /// registry holds the machine's `changing` lock, as a promotion does).
    pub fn with_store<T>(
        &self,
        machine: &str,
        f: impl FnOnce(&ReplicaStore) -> crate::error::Result<T>,
    ) -> crate::error::Result<T> {
        // A machine of this site (promoted here) gets no sessions, and its replica is
        // not opened for receiving (nor is a slot cached from before the promotion
        // used).
        if self.machine_here(machine).is_some() {
            return f(&self.replicas.open_readonly(machine)?);
        }
        loop {
            let mut stores = self.stores.lock();
            match stores.get(machine).cloned() {
                Some(slot) => {
                    drop(stores);
                    let store = slot.store.lock();
                    // A reprotect may have replaced the slot meanwhile: use the one the
                    // table holds now (nothing takes the table, then a slot's lock).
                    let current = self
                        .stores
                        .lock()
                        .get(machine)
                        .is_some_and(|s| Arc::ptr_eq(s, &slot));
                    if current {
                        return f(&store);
                    }
                }
                None => {
                    let slot = Slot::new(self.replicas.open(machine)?);
                    // Locked before anyone can see it: nobody waits on it yet, so the
                    // table's lock is not held while waiting for a slot's.
                    let store = slot.store.lock();
                    stores.insert(machine.to_string(), slot.clone());
                    drop(stores);
                    return f(&store);
                }
            }
        }
    }

    /// Answer reprotects toward this site with `f` (seed a replica from this site's
    /// own copy of the machine).
    pub fn on_reprotect(
        mut self,
        f: impl Fn(
                &crate::failover::reprotect::Request,
            ) -> crate::error::Result<crate::failover::reprotect::Answer>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        self.on_reprotect = Some(ReprotectHook(Box::new(f)));
        self
    }

    /// Share the failover state with `f` (serve's registry asks primaries to shut
    /// down through it).
    pub fn with_failovers(mut self, f: Arc<Failovers>) -> Self {
        self.failovers = f;
        self
    }

    /// Promote replicas for planned failovers with `f`.
    pub fn on_promote(
        mut self,
        f: impl Fn(&str, u64, u32) -> crate::error::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.on_promote = Some(PromoteHook(Box::new(f)));
        self
    }

    /// This target is the site at `path`.
    pub fn at_site(mut self, path: &std::path::Path) -> Self {
        self.site = Some(path.to_path_buf());
        self
    }

    /// The directory of `machine` if it is a machine of this site (promoted here, or
    /// its own).
    fn machine_here(&self, machine: &str) -> Option<std::path::PathBuf> {
        let dir = self
            .site
            .as_ref()?
            .join(crate::site::MACHINES_DIR)
            .join(machine);
        dir.join(crate::volume::MANIFEST_FILE)
            .exists()
            .then_some(dir)
    }

    /// Machine `machine` is a machine of this site (promoted here, or its own):
    /// refused — fenced when this site's generation is newer than the sender's.
    fn check_not_a_machine_here(&self, machine: &str, generation: u32) -> Result<(), Refusal> {
        let Some(dir) = self.machine_here(machine) else {
            return Ok(());
        };
        let m = crate::volume::Machine::read_manifest(&crate::storage::FileStorage, &dir)
            .map_err(refusal)?;
        if m.generation > generation {
            return Err((
                RefusalCode::Fenced,
                format!(
                    "{machine} was failed over to this site (generation {}); the sender's \
                     generation {generation} is fenced",
                    m.generation
                ),
            ));
        }
        Err((
            RefusalCode::NotOwner,
            format!("{machine} is a machine of this site, not a replica"),
        ))
    }

    /// Call `f` with the machine's name whenever a new replica is created.
    pub fn on_new_replica(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.on_new = Some(NewReplicaHook(Box::new(f)));
        self
    }

    /// Run one session with `peer` (already authenticated by TLS) until it ends, one
    /// message at a time: a segment is stored before the next frame is read.
    pub fn session(&self, stream: &mut (impl Read + Write), peer: SiteId) {
        self.session_with(stream, peer, |_| false)
    }

    /// [`Target::session`] over a TLS stream: a segment is stored while the next
    /// one arrives (the sender keeps several unacknowledged).
    pub fn session_tls(
        &self,
        stream: &mut crate::replication::transport::ServerStream,
        peer: SiteId,
    ) {
        self.session_with(stream, peer, crate::replication::transport::input_ready)
    }

    fn session_with<S: Read + Write>(
        &self,
        stream: &mut S,
        peer: SiteId,
        input_ready: fn(&mut S) -> bool,
    ) {
        let mut session = Session {
            target: self,
            peer,
            current: None,
            assembling: None,
            spare: Vec::new(),
            frame: Vec::new(),
            resync_chunks: Vec::new(),
            resync_held: 0,
            hash_cache: None,
            peer_features: 0,
            token: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
            base_pending: Vec::new(),
            base_pending_bytes: 0,
            base_cursor: None,
            base_frames: Arc::default(),
            warming: None,
            promote_soon: false,
        };
        WIRE_FAULTS
            .with(|f| *f.borrow_mut() = crate::replication::wire_fault::WireFaults::from_env());
        let ended = session.run(stream, input_ready);
        // The session's segment buffers go back for the next session or reader.
        crate::storage::pool::give(std::mem::take(&mut session.spare));
        if let Some(a) = session.assembling.take() {
            crate::storage::pool::give(a.bytes);
        }
        WIRE_FAULTS.with(|f| *f.borrow_mut() = None);
        match ended {
            Ok(()) => tracing::debug!("replication session with {peer} ended"),
            Err((code, why)) => {
                tracing::warn!(
                    "replication session with {peer} closed ({}): {why}",
                    code.as_str()
                );
                let _ = write_frame(stream, &Message::Error { code, message: why });
                let _ = stream.flush();
            }
        }
    }

    /// The store of `machine`, opened once (or created from `protect` when this site
    /// has no replica of it yet).
    fn store_for(&self, peer: SiteId, protect: &ProtectRequest) -> Result<SharedStore, Refusal> {
        // A machine of this site (promoted here) is never a replica again, even if
        // a store of it is still cached from before.
        self.check_not_a_machine_here(&protect.machine, protect.generation)?;
        // Under the table's lock, so two sessions never open the same store twice.
        let mut stores = self.stores.lock();
        if let Some(s) = stores.get(&protect.machine) {
            return Ok(s.clone());
        }
        let store = match self.replicas.open(&protect.machine) {
            Ok(s) => s,
            Err(Error::NotFound(_)) => {
                let manifest = ReplicaManifest {
                    source_site: peer.0,
                    machine_id: protect.machine_id,
                    disks: protect
                        .disks
                        .iter()
                        .enumerate()
                        .map(|(i, (name, size))| DiskEntry {
                            id: i as u32,
                            name: name.clone(),
                            size: *size,
                        })
                        .collect(),
                    base_lsn: protect.base_lsn,
                    base_seq: protect.base_seq,
                    generation: protect.generation,
                };
                let base = Watermark {
                    lsn: protect.base_lsn,
                    segment_seq: protect.base_seq,
                };
                let created = self
                    .replicas
                    .create(&protect.machine, manifest, base)
                    .map_err(refusal)?;
                if let Some(f) = &self.on_new {
                    (f.0)(&protect.machine);
                }
                created
            }
            Err(e) => return Err(refusal(e)),
        };
        let store = Slot::new(store);
        stores.insert(protect.machine.clone(), store.clone());
        Ok(store)
    }
}

/// The fields of a `Protect`.
struct ProtectRequest {
    machine: String,
    machine_id: u64,
    generation: u32,
    disks: Vec<(String, u64)>,
    base_lsn: u64,
    base_seq: u64,
    retention_ms: u64,
    app_retention_ms: u64,
}

/// A segment being assembled from its chunks.
struct Assembly {
    seq: u64,
    len: u64,
    /// [`crate::replica::crypt::HEADER_LEN`] bytes of room, then what arrived.
    bytes: Vec<u8>,
}

/// One connection from a source.
struct Session<'a> {
    target: &'a Target,
    peer: SiteId,
    /// The machine this session protects (set by Protect) and its generation.
    current: Option<(String, SharedStore, u32)>,
    assembling: Option<Assembly>,
    /// A stored segment's buffer, for the next one to be assembled in.
    spare: Vec<u8>,
    /// Every frame's body is read into this buffer, which keeps its room for the next
    /// (grown as bytes arrive, by doubling: at most about twice a maximum frame) —
    /// except an initial-copy chunk's, which is kept as the chunk's buffer and replaced
    /// by one from [`Session::base_frames`].
    frame: Vec<u8>,
    /// The differing chunks of the resync batch in flight (applied at its end).
    resync_chunks: Vec<(u32, u64, Vec<u8>)>,
    resync_held: usize,
    /// Chunk hashes of the last range asked for: the detail requests that follow a
    /// group request fall inside it.
    hash_cache: Option<(u32, u64, Vec<[u8; 32]>)>,
    /// The feature bits of the peer's Hello.
    peer_features: u64,
    /// This session's token (see [`Slot`]).
    token: u64,
    /// Initial-copy chunks received, checked and not stored yet (at most
    /// [`BASE_BATCH`] bytes).
    base_pending: Vec<BaseChunk>,
    base_pending_bytes: usize,
    /// Where the initial copy stands after every chunk checked so far, stored or not
    /// (none until the first chunk after the last flush).
    base_cursor: Option<crate::replica::store::BaseCursor>,
    /// The frame buffers of initial-copy chunks stored, given back by the batches that
    /// stored them, for the next frames to be read into (at most [`FRAMES_KEPT`]
    /// bytes of room).
    base_frames: Arc<Mutex<Vec<Vec<u8>>>>,
    /// A planned failover of this session's machine has begun (`PromoteSoon`): the
    /// segments read ahead for its check, which each one stored from now on joins.
    warming: Option<Arc<crate::replica::warm::WarmSet>>,
    /// `PromoteSoon` arrived in this session (once only).
    promote_soon: bool,
}

/// Room of initial-copy frame buffers a session keeps for its next frames, at most
/// (a batch's worth and one more being read).
const FRAMES_KEPT: usize = 2 * BASE_BATCH + MAX_CHUNK;

/// One initial-copy chunk: its bytes are `buf[at]` — the frame's body it arrived in,
/// kept as it is (no copy; `frame`), or the bytes a compressed one unpacked to.
struct BaseChunk {
    disk: u32,
    offset: u64,
    buf: Vec<u8>,
    at: std::ops::Range<usize>,
    frame: bool,
}

impl BaseChunk {
    /// The chunk's bytes (`at` is made from `buf`, so always inside it).
    fn bytes(&self) -> &[u8] {
        debug_assert!(self.at.end <= self.buf.len());
        self.buf.get(self.at.clone()).unwrap_or(&[])
    }
}

/// Initial-copy chunks, checked, to store as one batch (on a thread of their own
/// while the next batch arrives).
struct BaseJob {
    slot: SharedStore,
    token: u64,
    name: String,
    items: Vec<BaseChunk>,
    /// Where the frame buffers go back to once the chunks are stored.
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl BaseJob {
    fn run(self) -> Result<(), Refusal> {
        let items: Vec<(u32, u64, &[u8])> = self
            .items
            .iter()
            .map(|c| (c.disk, c.offset, c.bytes()))
            .collect();
        let stored = lock_owned(&self.slot, self.token, &self.name)?
            .receive_base_batch(&items)
            .map_err(refusal);
        drop(items);
        let mut frames = self.frames.lock();
        let mut room: usize = frames.iter().map(Vec::capacity).sum();
        for c in self.items.into_iter().filter(|c| c.frame) {
            if room + c.buf.capacity() <= FRAMES_KEPT {
                room += c.buf.capacity();
                frames.push(c.buf);
            }
        }
        stored
    }
}

/// The Ack of the segment being stored, sent once it is stored.
type PendingStore<'s> = std::thread::ScopedJoinHandle<'s, (Result<Message, Refusal>, Vec<u8>)>;

/// A batch of initial-copy chunks being stored.
type BaseStore<'s> = std::thread::ScopedJoinHandle<'s, Result<(), Refusal>>;

/// Wait for the batch of initial-copy chunks being stored, if any.
fn finish_base(job: &mut Option<BaseStore<'_>>) -> Result<(), Refusal> {
    match job.take().map(|h| h.join()) {
        None => Ok(()),
        Some(Ok(stored)) => stored,
        Some(Err(_)) => Err((
            RefusalCode::Fatal,
            "storing initial-copy chunks panicked".into(),
        )),
    }
}

fn finish_store(
    pending: &mut Option<PendingStore<'_>>,
    spare: &mut Vec<u8>,
    s: &mut impl Write,
) -> Result<(), Refusal> {
    let Some(h) = pending.take() else {
        return Ok(());
    };
    let (ack, buf) = h.join().unwrap_or_else(|_| {
        (
            Err((RefusalCode::Fatal, "storing a segment panicked".into())),
            Vec::new(),
        )
    });
    crate::storage::pool::give(std::mem::replace(spare, buf));
    send(s, &ack?)
}

impl Session<'_> {
    /// Read and answer messages until the peer closes. A whole segment is stored on a
    /// thread of its own while the next one's chunks arrive; its Ack goes out before
    /// any other reply, and before this thread would wait for input that
    /// `input_ready` says is not there (the sender may be waiting for that Ack). So is
    /// each batch of initial-copy chunks, while the next batch arrives.
    fn run<S: Read + Write>(
        &mut self,
        s: &mut S,
        input_ready: fn(&mut S) -> bool,
    ) -> Result<(), Refusal> {
        self.hello(s)?;
        let target = self.target;
        std::thread::scope(|sc| {
            let mut pending: Option<PendingStore<'_>> = None;
            let mut base: Option<BaseStore<'_>> = None;
            let r = self.run_loop(s, input_ready, sc, (&mut pending, &mut base), target);
            // A store still running when the session failed: wait for it here (a
            // panic in it must not take the Error frame with it).
            if let Some(h) = pending.take() {
                let _ = h.join();
            }
            // A batch of the initial copy the store failed meanwhile says more than
            // what ended the loop (a damaged frame, a bad chunk): the source acts on
            // the store's refusal (no space: retry later).
            match (r, finish_base(&mut base)) {
                (Err(ended), Err(stored)) => {
                    tracing::warn!(
                        "session ended ({}: {}) while a batch of the initial copy failed",
                        ended.0.as_str(),
                        ended.1
                    );
                    Err(stored)
                }
                (r, _) => r,
            }
        })
    }

    fn run_loop<'scope, 'env, S: Read + Write>(
        &mut self,
        s: &mut S,
        input_ready: fn(&mut S) -> bool,
        sc: &'scope std::thread::Scope<'scope, 'env>,
        (pending, base): (
            &mut Option<PendingStore<'scope>>,
            &mut Option<BaseStore<'scope>>,
        ),
        target: &'env Target,
    ) -> Result<(), Refusal> {
        loop {
            if pending.is_some() && !input_ready(s) {
                finish_store(pending, &mut self.spare, s)?;
            }
            let mut body = std::mem::take(&mut self.frame);
            let read = protocol::read_frame_body(s, &mut body);
            // A segment chunk is read in place: its bytes are copied once, into the
            // segment assembled.
            if let Some(chunk) = read
                .is_ok()
                .then(|| protocol::segment_chunk_ref(&body))
                .flatten()
            {
                let job = chunk.map_err(frame_refusal).and_then(|c| {
                    self.flush_base(base)?;
                    self.on_segment_chunk(c)
                });
                self.frame = body;
                if let Some(job) = job? {
                    // One segment stored at a time, Acks in order.
                    finish_store(pending, &mut self.spare, s)?;
                    *pending = Some(sc.spawn(move || job.run(target)));
                }
                continue;
            }
            // So is an initial-copy chunk: its frame's body is kept as the chunk's
            // buffer until its batch is stored, and the next frame is read into a
            // buffer a stored batch gave back.
            if let Some(chunk) = read
                .is_ok()
                .then(|| protocol::initial_chunk_ref(&body))
                .flatten()
            {
                let head = chunk.map_err(frame_refusal).and_then(|c| {
                    let at = c
                        .bytes_at(&body)
                        .ok_or_else(|| protocol_error("initial chunk's bytes not at its end"))?;
                    let head = (c.machine.to_string(), c.generation, c.disk, c.offset);
                    Ok((head, c.compressed, at))
                });
                let ((machine, generation, disk, offset), compressed, at) = match head {
                    Ok(h) => h,
                    Err(e) => {
                        self.frame = body;
                        return Err(e);
                    }
                };
                // Everything else follows the segments before it.
                finish_store(pending, &mut self.spare, s)?;
                let chunk = (disk, offset, compressed, body, at);
                if let Some(job) = self.on_initial_chunk(&machine, generation, chunk)? {
                    // One batch stored at a time, in order.
                    finish_base(base)?;
                    *base = Some(sc.spawn(move || job.run()));
                }
                continue;
            }
            let msg = read.and_then(|()| protocol::decode_message::<Message>(&body));
            self.frame = body;
            let msg = match msg {
                Ok(m) => m,
                Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    // What arrived whole is kept: the sender resumes after it.
                    if let Err((code, why)) = finish_store(pending, &mut self.spare, s) {
                        tracing::warn!(
                            "the last segment of a session that ended was not stored \
                             ({}): {why}",
                            code.as_str()
                        );
                    }
                    return self.flush_base(base);
                }
                // After the greeting, another version in a frame header (which its
                // checksum does not cover) is a damaged frame, not another replog.
                Err(FrameError::Version(v)) => {
                    return Err((
                        RefusalCode::Protocol,
                        format!("a frame of protocol version {v} in a session of this one"),
                    ))
                }
                Err(e) => return Err(frame_refusal(e)),
            };
            // Everything else follows the segments before it.
            finish_store(pending, &mut self.spare, s)?;
            // Everything else sees the initial chunks before it stored.
            self.flush_base(base)?;
            if let Some(reply) = self.handle(msg)? {
                send(s, &reply)?;
            }
        }
    }

    /// The first message each way: the peer must name the site its certificate says,
    /// and speak this protocol version with the features needed.
    fn hello(&mut self, s: &mut (impl Read + Write)) -> Result<(), Refusal> {
        match read_frame::<Message>(s).map_err(frame_refusal)? {
            Message::Hello {
                site_id,
                protocol,
                features,
                required,
                ..
            } => {
                if site_id != self.peer.0 {
                    return Err((
                        RefusalCode::NotOwner,
                        "Hello names another site than its certificate".into(),
                    ));
                }
                protocol::check_hello(protocol, features, required)
                    .map_err(|why| (RefusalCode::Version, why))?;
                self.peer_features = features;
            }
            _ => return Err(protocol_error("expected Hello")),
        }
        send(s, &protocol::hello(self.target.me.0))
    }

    /// One message; the reply to send, if it has one.
    fn handle(&mut self, msg: Message) -> Result<Option<Message>, Refusal> {
        match msg {
            Message::Protect {
                machine,
                machine_id,
                generation,
                disks,
                base_lsn,
                base_seq,
                retention_ms,
                app_retention_ms,
            } => self
                .on_protect(ProtectRequest {
                    machine,
                    machine_id,
                    generation,
                    disks,
                    base_lsn,
                    base_seq,
                    retention_ms,
                    app_retention_ms,
                })
                .map(Some),
            // `run` takes every initial chunk itself (it stores them in batches on a
            // thread of their own).
            Message::InitialChunk { .. } => Err(protocol_error("initial chunk out of place")),
            Message::InitialDone { machine } => self.on_initial_done(&machine).map(Some),
            // `run` takes every segment chunk itself, decoded in place
            // (`protocol::segment_chunk_ref`), and stores whole segments on a thread
            // of their own.
            Message::SegmentChunk { .. } => Err(protocol_error("segment chunk out of place")),
            Message::ResyncStart {
                machine,
                generation,
                base_lsn,
                base_seq,
                chunk_bytes,
            } => self
                .on_resync_start(&machine, generation, base_lsn, base_seq, chunk_bytes)
                .map(Some),
            Message::ResyncHashRequest {
                machine,
                disk,
                first,
                count,
                group,
            } => self
                .on_hash_request(&machine, disk, first, count, group)
                .map(Some),
            Message::ResyncChunk {
                machine,
                disk,
                offset,
                compressed,
                bytes,
            } => self
                .on_resync_chunk(&machine, disk, offset, compressed, bytes)
                .map(|()| None),
            Message::ResyncBatchDone {
                machine,
                disk,
                next,
                compared,
                sent_chunks,
                sent_bytes,
            } => self
                .on_batch_done(&machine, disk, next, compared, sent_chunks, sent_bytes)
                .map(Some),
            Message::ResyncFetch {
                machine,
                disk,
                offset,
                len,
            } => self.on_fetch(&machine, disk, offset, len).map(Some),
            Message::ResyncDone {
                machine,
                valid_from,
            } => self.on_resync_done(&machine, valid_from).map(Some),
            Message::Promote {
                machine,
                machine_id,
                generation,
                lsn,
            } => self
                .on_promote(&machine, machine_id, generation, lsn)
                .map(Some),
            Message::Reprotect {
                machine,
                machine_id,
                generation,
                since,
                foreign_upto,
                disks,
                base_lsn,
                base_seq,
                probe,
            } => self
                .on_reprotect(crate::failover::reprotect::Request {
                    peer: self.peer,
                    machine,
                    machine_id,
                    generation,
                    since,
                    foreign_upto,
                    disks,
                    base: Watermark {
                        lsn: base_lsn,
                        segment_seq: base_seq,
                    },
                    probe,
                })
                .map(Some),
            Message::PromoteSoon {
                machine,
                generation,
            } => self.on_promote_soon(&machine, generation).map(|()| None),
            Message::Probe => Ok(Some(Message::Room {
                free_bytes: self.target.replicas.free_bytes(),
            })),
            Message::Error { code, message } => Err((code, format!("peer reported: {message}"))),
            other => Err(protocol_error(format!(
                "unexpected message {}",
                super::shipper::message_name(&other)
            ))),
        }
    }

    /// The store of the machine this session protects; `machine` must name it.
    fn store(&self, machine: &str, what: &str) -> Result<(&str, &SharedStore), Refusal> {
        match &self.current {
            None => Err(protocol_error(format!("{what} before Protect"))),
            Some((name, _, _)) if name != machine => Err(protocol_error(format!(
                "{what} for {machine} in a session for {name}"
            ))),
            Some((name, store, _)) => Ok((name, store)),
        }
    }

    /// The store of `slot`, locked, while this session owns it.
    fn lock<'s>(
        &self,
        slot: &'s Slot,
    ) -> Result<parking_lot::MutexGuard<'s, ReplicaStore>, Refusal> {
        let name = self
            .current
            .as_ref()
            .map_or("the machine", |c| c.0.as_str());
        lock_owned(slot, self.token, name)
    }

    /// The store, for a message that carries the generation: it must be the session's.
    fn store_at(
        &self,
        machine: &str,
        generation: u32,
        what: &str,
    ) -> Result<(&str, &SharedStore), Refusal> {
        let found = self.store(machine, what)?;
        match &self.current {
            Some((_, _, g)) if *g != generation => Err(protocol_error(format!(
                "{what} of generation {generation} in a session of generation {g}"
            ))),
            _ => Ok(found),
        }
    }

    /// A planned failover: the source is fenced and everything up to `lsn` was
    /// acknowledged in this session; promote at exactly `lsn` to `generation`.
    fn on_promote(
        &mut self,
        machine: &str,
        machine_id: u64,
        generation: u32,
        lsn: u64,
    ) -> Result<Message, Refusal> {
        let (name, store) = self.store(machine, "Promote")?;
        let (name, store) = (name.to_string(), store.clone());
        {
            let mut st = self.lock(&store)?;
            st.refresh().map_err(refusal)?;
            if st.manifest().machine_id != machine_id {
                return Err((
                    RefusalCode::NotOwner,
                    format!("this site's replica of {name} is of another machine"),
                ));
            }
            check_promotion(&st, &name, generation)?;
            if generation != st.generation() + 1 {
                return Err(protocol_error(format!(
                    "promote {name} to generation {generation}: the replica is at generation {}",
                    st.generation()
                )));
            }
            if st.received().lsn != lsn {
                return Err((
                    RefusalCode::BrokenChain,
                    format!(
                        "promote {name} at LSN {lsn}: the replica holds up to LSN {}",
                        st.received().lsn
                    ),
                ));
            }
        }
        let Some(hook) = &self.target.on_promote else {
            return Err((
                RefusalCode::Fatal,
                "this target cannot promote replicas (it is not a site's serve)".into(),
            ));
        };
        // The check reads the point's segments: into the buffers this session
        // assembled segments in, which the process has touched already.
        crate::storage::pool::give(std::mem::take(&mut self.spare));
        {
            let _under_way = Promoting::start(&self.target.failovers, &name);
            if let Err(e) = (hook.0)(&name, lsn, generation) {
                // Promoted meanwhile by another failover (an unplanned one that
                // overtook this request): the sender, at `generation - 1`, is fenced.
                check_promotion(&*self.lock(&store)?, &name, generation - 1)
                    .map_err(|(code, why)| (code, format!("{why} ({e})")))?;
                return Err(refusal(e));
            }
        }
        crate::failpoint::hit("promote:before-reply");
        Ok(Message::Promoted {
            machine: name,
            generation,
            lsn,
        })
    }

    /// A planned failover of the session's machine has begun: read ahead the
    /// segments its check will read — those stored past the parent's merge point, and
    /// each one stored from now on (`replica::warm`). Only where a promotion can
    /// follow, once per session.
    fn on_promote_soon(&mut self, machine: &str, generation: u32) -> Result<(), Refusal> {
        let (name, store) = self.store_at(machine, generation, "PromoteSoon")?;
        let (name, store) = (name.to_string(), store.clone());
        if self.promote_soon {
            return Err(protocol_error(format!(
                "a second PromoteSoon for {name} in one session"
            )));
        }
        self.promote_soon = true;
        if self.target.on_promote.is_none() {
            return Ok(());
        }
        let (from, to) = {
            let st = self.lock(&store)?;
            check_promotion(&st, &name, generation)?;
            (st.parent().seq, st.received().segment_seq)
        };
        let reader = self.target.replicas.open_readonly(&name).map_err(refusal)?;
        self.warming = self.target.replicas.warm().begin(reader, from + 1..=to);
        Ok(())
    }

    fn on_reprotect(
        &mut self,
        req: crate::failover::reprotect::Request,
    ) -> Result<Message, Refusal> {
        if req.base.segment_seq >= crate::format::segment::MAX_SEGMENT_SEQ
            || req.base.lsn >= crate::format::record::MAX_LSN
            || req.since >= crate::format::record::MAX_LSN
        {
            return Err(protocol_error("reprotect base or point out of range"));
        }
        if self.target.failovers.promoting(&req.machine) {
            return Err((
                RefusalCode::Busy,
                format!("a failover of {} is under way here", req.machine),
            ));
        }
        let Some(hook) = &self.target.on_reprotect else {
            return Err((
                RefusalCode::Fatal,
                "this target cannot take a reprotect (it is not a site's serve)".into(),
            ));
        };
        let a = (hook.0)(&req).map_err(refusal)?;
        if a.created {
            // A store cached from before the seeding (this site's replica of an
            // earlier stage, promoted since) does not know the new one: drop it, and
            // refuse whoever still holds it.
            if let Some(old) = self.target.stores.lock().remove(&req.machine) {
                old.owner.store(0, Ordering::SeqCst);
            }
        }
        let seed = a.seed.unwrap_or_else(|| crate::failover::reprotect::Seed {
            source_site: req.peer.0,
            generation: a.generation,
            from_generation: a.generation,
            since: req.since,
            tail: Vec::new(),
            covered: true,
            orphan: None,
            state: crate::failover::reprotect::SeedState::Seeding { disk: 0, offset: 0 },
            seeded_bytes: 0,
            verified: None,
        });
        Ok(Message::ReprotectState {
            machine: req.machine,
            held: a.held,
            generation: a.generation,
            tail: seed.tail,
            covered: seed.covered,
            seeded_bytes: seed.seeded_bytes,
            orphan: seed.orphan,
            verified: seed.verified,
        })
    }

    fn on_protect(&mut self, p: ProtectRequest) -> Result<Message, Refusal> {
        if p.base_seq >= crate::format::segment::MAX_SEGMENT_SEQ
            || p.base_lsn >= crate::format::record::MAX_LSN
        {
            return Err(protocol_error("base segment or LSN out of range"));
        }
        if p.retention_ms == 0 {
            return Err(protocol_error("retention of 0 ms"));
        }
        if self.target.failovers.promoting(&p.machine) {
            return Err((
                RefusalCode::Busy,
                format!("a failover of {} is under way here", p.machine),
            ));
        }
        let store = self.target.store_for(self.peer, &p)?;
        let reply = {
            let mut st = store.store.lock();
            // This session owns the store from here: an older one is refused at its
            // next message (its sender will find this position, not the other's).
            store.owner.store(self.token, Ordering::SeqCst);
            // Every Protect, not just the first: the replica must be this peer's machine.
            let man = st.manifest();
            if man.source_site != self.peer.0 || man.machine_id != p.machine_id {
                return Err((
                    RefusalCode::NotOwner,
                    format!(
                        "this site's replica of {} belongs to another site or machine",
                        p.machine
                    ),
                ));
            }
            check_promotion(&st, &p.machine, p.generation)?;
            if p.generation < st.generation() {
                return Err((
                    RefusalCode::Fenced,
                    format!(
                        "{} generation {} is older than this replica's generation {}: it \
                         was failed over",
                        p.machine,
                        p.generation,
                        st.generation()
                    ),
                ));
            }
            // Only to a primary that knows the request (an older one could not decode
            // the code); one that does not is failed over unplanned at the timeout.
            if self.peer_features & protocol::FEATURE_SHUTDOWN_REQUEST != 0
                && self.target.failovers.deliver_shutdown(&p.machine)
            {
                return Err((
                    RefusalCode::FailoverRequested,
                    format!(
                        "the target asks {}'s primary to shut down for a failover: fence \
                         writes, ship everything and have it promoted there (a planned \
                         failover)",
                        p.machine
                    ),
                ));
            }
            st.set_generation(p.generation).map_err(refusal)?;
            st.set_retention(crate::replica::store::Retention {
                window_ms: p.retention_ms,
                app_window_ms: p.app_retention_ms.max(p.retention_ms),
            })
            .map_err(refusal)?;
            let diverged = match st.resync_progress() {
                Ok(Some(_)) => Some("a resync is under way".to_string()),
                Ok(None) => st.damage().map_err(refusal)?,
                Err(e) => Some(format!("resync progress unreadable: {e}")),
            };
            let (w, init) = (st.received(), st.initial());
            Message::Protected {
                machine: p.machine.clone(),
                generation: st.generation(),
                lsn: w.lsn,
                seq: w.segment_seq,
                initial_done: init.done,
                resume_disk: init.disk,
                resume_offset: init.offset,
                free_bytes: self.target.replicas.free_bytes(),
                diverged,
            }
        };
        self.current = Some((p.machine, store, p.generation));
        self.assembling = None;
        Ok(reply)
    }

    /// One chunk of the initial copy (`(disk, offset, compressed, body, at)`: its
    /// bytes are `body[at]`, the frame's body it arrived in): checked now (a bad chunk
    /// is refused as itself), stored in batches — one edit of the parent chunks and
    /// one position write for many small chunks (a reprotect's delta is mostly single
    /// 4 KiB blocks). The body is kept as the chunk's buffer (the next frame is read
    /// into one a stored batch gave back), or, compressed, unpacked and left to be the
    /// session's frame buffer again. A full batch comes back as the job that stores it.
    fn on_initial_chunk(
        &mut self,
        machine: &str,
        generation: u32,
        (disk, offset, compressed, body, at): (u32, u64, bool, Vec<u8>, std::ops::Range<usize>),
    ) -> Result<Option<BaseJob>, Refusal> {
        let (name, store) = self.store_at(machine, generation, "initial chunk")?;
        let (name, store) = (name.to_string(), store.clone());
        let chunk = if compressed {
            let data = decompress(body.get(at).unwrap_or(&[]));
            self.frame = body;
            let buf = data?;
            let at = 0..buf.len();
            BaseChunk {
                disk,
                offset,
                buf,
                at,
                frame: false,
            }
        } else {
            self.frame = self.base_frames.lock().pop().unwrap_or_default();
            BaseChunk {
                disk,
                offset,
                buf: body,
                at,
                frame: true,
            }
        };
        let len = chunk.at.len();
        // Checked against where the chunks before it end, stored or not: the store
        // is not locked for it, so a batch being stored does not hold the next up.
        let mut cursor = match self.base_cursor.take() {
            Some(c) => c,
            None => self.lock(&store)?.base_cursor().map_err(refusal)?,
        };
        cursor.advance(disk, offset, len as u64).map_err(refusal)?;
        self.base_cursor = Some(cursor);
        self.base_pending_bytes += len;
        self.base_pending.push(chunk);
        if self.base_pending_bytes < BASE_BATCH {
            return Ok(None);
        }
        Ok(Some(self.take_batch(name, store)))
    }

    /// The chunks received and not stored yet, as the job that stores them.
    fn take_batch(&mut self, name: String, slot: SharedStore) -> BaseJob {
        self.base_pending_bytes = 0;
        BaseJob {
            slot,
            token: self.token,
            name,
            items: std::mem::take(&mut self.base_pending),
            frames: self.base_frames.clone(),
        }
    }

    /// Store the initial-copy chunks received and not stored yet, after the batch
    /// being stored: every chunk received is stored when this returns.
    fn flush_base(&mut self, job: &mut Option<BaseStore<'_>>) -> Result<(), Refusal> {
        finish_base(job)?;
        self.base_cursor = None;
        let stored = if self.base_pending.is_empty() {
            Ok(())
        } else {
            let Some((name, store, _)) = &self.current else {
                return Err(protocol_error("initial chunk before Protect"));
            };
            let (name, store) = (name.clone(), store.clone());
            self.take_batch(name, store).run()
        };
        // Every chunk received is stored (InitialDone, or anything else, comes next):
        // the bodies kept for the copy's next frames go.
        self.base_frames.lock().clear();
        stored
    }

    fn on_initial_done(&mut self, machine: &str) -> Result<Message, Refusal> {
        let (name, store) = self.store(machine, "InitialDone")?;
        let lsn = {
            let mut st = self.lock(store)?;
            st.finish_initial().map_err(refusal)?;
            st.received().lsn
        };
        Ok(ack(name, lsn))
    }

    /// A `SegmentChunk`: its bytes go into the segment being assembled; a whole
    /// segment comes back as the job that stores it.
    fn on_segment_chunk(
        &mut self,
        chunk: protocol::SegmentChunkRef<'_>,
    ) -> Result<Option<StoreJob>, Refusal> {
        let protocol::SegmentChunkRef {
            machine,
            generation,
            seq,
            segment_len,
            offset,
            compressed,
            bytes,
        } = chunk;
        let (name, store) = self.store_at(machine, generation, "segment")?;
        let (name, store) = (name.to_string(), store.clone());
        if segment_len > MAX_SEGMENT {
            return Err(protocol_error(format!(
                "segment of {segment_len} bytes is over the limit"
            )));
        }
        let unpacked;
        let data = if compressed {
            unpacked = decompress(bytes)?;
            &unpacked[..]
        } else {
            bytes
        };
        // The segment is assembled after room for its encrypted file's header, and
        // encrypted in place there (`ReplicaStore::receive_framed`).
        const ROOM: usize = crate::replica::crypt::HEADER_LEN;
        let a = match self.assembling.as_mut() {
            Some(a)
                if a.seq == seq
                    && a.len == segment_len
                    && (a.bytes.len() - ROOM) as u64 == offset =>
            {
                a
            }
            // The whole segment's room at once (its length is checked above): growing
            // by doubling copied and faulted in every segment several times.
            _ if offset == 0 => {
                // Bounded up front (a peer announcing a huge segment gets room as its
                // bytes arrive).
                let room =
                    ROOM + (segment_len as usize).min(RESERVE_MAX) + crate::replica::crypt::TAG_LEN;
                let mut bytes = std::mem::take(&mut self.spare);
                if bytes.capacity() < room {
                    crate::storage::pool::give(bytes);
                    bytes = crate::storage::pool::take(crate::storage::pool::room_for(room));
                }
                bytes.clear();
                bytes.reserve(room);
                bytes.resize(ROOM, 0);
                self.assembling.insert(Assembly {
                    seq,
                    len: segment_len,
                    bytes,
                })
            }
            _ => {
                return Err((
                    RefusalCode::BrokenChain,
                    format!("chunk at {offset} of segment {seq} out of order"),
                ))
            }
        };
        a.bytes.extend_from_slice(data);
        let got = (a.bytes.len() - ROOM) as u64;
        if got > segment_len {
            return Err(protocol_error(format!(
                "segment {seq} is longer than announced"
            )));
        }
        if got < segment_len {
            return Ok(None);
        }
        let whole = self.assembling.take().map(|a| a.bytes).unwrap_or_default();
        Ok(Some(StoreJob {
            slot: store,
            token: self.token,
            name,
            generation,
            seq,
            bytes: whole,
            warm: self.warming.clone(),
        }))
    }

    fn on_resync_start(
        &mut self,
        machine: &str,
        generation: u32,
        base_lsn: u64,
        base_seq: u64,
        chunk_bytes: u64,
    ) -> Result<Message, Refusal> {
        let (name, store) = self.store_at(machine, generation, "ResyncStart")?;
        if base_seq >= crate::format::segment::MAX_SEGMENT_SEQ
            || base_lsn >= crate::format::record::MAX_LSN
        {
            return Err(protocol_error("resync base out of range"));
        }
        let mut st = self.lock(store)?;
        check_promotion(&st, name, generation)?;
        let p = st
            .begin_resync(base_lsn, base_seq, chunk_bytes)
            .map_err(refusal)?;
        drop(st);
        let reply = resync_state(name, &p);
        self.resync_chunks.clear();
        self.resync_held = 0;
        self.hash_cache = None;
        Ok(reply)
    }

    fn on_hash_request(
        &mut self,
        machine: &str,
        disk: u32,
        first: u64,
        count: u64,
        group: u64,
    ) -> Result<Message, Refusal> {
        let (name, store) = self.store(machine, "ResyncHashRequest")?;
        if count > MAX_HASHES
            || group == 0
            || group > count.max(1)
            || first.checked_add(count).is_none()
        {
            return Err(protocol_error(format!(
                "{count} hashes in groups of {group} asked for"
            )));
        }
        let cached = match &self.hash_cache {
            Some((d, f, h)) if *d == disk && *f <= first && first + count <= f + h.len() as u64 => {
                let at = (first - f) as usize;
                h.get(at..at + count as usize).map(<[_]>::to_vec)
            }
            _ => None,
        };
        let name = name.to_string();
        let chunk_hashes = match cached {
            Some(h) => h,
            None => {
                let st = self.lock(store)?;
                let p = st
                    .resync_progress()
                    .map_err(refusal)?
                    .ok_or_else(|| protocol_error("no resync under way"))?;
                let h = st
                    .resync_hashes(
                        p.chunk_bytes,
                        disk,
                        first,
                        count,
                        protocol::chunk_hash_for(self.peer_features),
                    )
                    .map_err(refusal)?;
                drop(st);
                self.hash_cache = Some((disk, first, h.clone()));
                h
            }
        };
        Ok(Message::ResyncHashes {
            machine: name,
            disk,
            first,
            hashes: crate::chunk_hash::group_hashes(
                &chunk_hashes,
                group as usize,
                protocol::chunk_hash_for(self.peer_features),
            ),
        })
    }

    fn on_resync_chunk(
        &mut self,
        machine: &str,
        disk: u32,
        offset: u64,
        compressed: bool,
        bytes: Vec<u8>,
    ) -> Result<(), Refusal> {
        self.store(machine, "ResyncChunk")?;
        let data = if compressed {
            decompress(&bytes)?
        } else {
            bytes
        };
        self.resync_held += data.len();
        self.resync_chunks.push((disk, offset, data));
        if self.resync_held > MAX_RESYNC_BATCH {
            return Err(protocol_error("resync batch too large"));
        }
        Ok(())
    }

    fn on_batch_done(
        &mut self,
        machine: &str,
        disk: u32,
        next: u64,
        compared: u64,
        sent_chunks: u64,
        sent_bytes: u64,
    ) -> Result<Message, Refusal> {
        let (name, store) = self.store(machine, "ResyncBatchDone")?;
        let p = {
            let mut st = self.lock(store)?;
            let cur = st
                .resync_progress()
                .map_err(refusal)?
                .ok_or_else(|| protocol_error("no resync under way"))?;
            let p = crate::replica::resync_apply::ResyncProgress {
                disk,
                next,
                compared,
                sent_chunks,
                sent_bytes,
                ..cur
            };
            st.apply_resync(&self.resync_chunks, p).map_err(refusal)?;
            p
        };
        let reply = resync_state(name, &p);
        self.resync_chunks.clear();
        self.resync_held = 0;
        Ok(reply)
    }

    fn on_fetch(
        &mut self,
        machine: &str,
        disk: u32,
        offset: u64,
        len: u64,
    ) -> Result<Message, Refusal> {
        let (name, store) = self.store(machine, "ResyncFetch")?;
        if len > MAX_CHUNK as u64 {
            return Err(protocol_error(format!("fetch of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        self.lock(store)?
            .read_replica(disk, offset, &mut data)
            .map_err(refusal)?;
        Ok(Message::ResyncData {
            machine: name.to_string(),
            compressed: true,
            bytes: lz4_flex::block::compress_prepend_size(&data),
        })
    }

    fn on_resync_done(&mut self, machine: &str, valid_from: u64) -> Result<Message, Refusal> {
        let (name, store) = self.store(machine, "ResyncDone")?;
        let lsn = {
            let mut st = self.lock(store)?;
            st.finish_resync(valid_from).map_err(refusal)?;
            st.received().lsn
        };
        Ok(ack(name, lsn))
    }
}

/// A frame that does not decode, as the refusal the peer is told.
fn frame_refusal(e: FrameError) -> Refusal {
    let code = match e {
        FrameError::Version(_) => RefusalCode::Version,
        FrameError::Io(_) => RefusalCode::Unavailable,
        _ => RefusalCode::Protocol,
    };
    let why = match &e {
        // A read timeout shows as EAGAIN ("Resource temporarily unavailable"): say what
        // it is.
        FrameError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            format!(
                "no frame from the source for {} s: the session timed out",
                crate::replication::wire_fault::io_timeout().as_secs()
            )
        }
        _ => e.to_string(),
    };
    (code, why)
}

thread_local! {
    /// This thread's session's injected faults (tests only: `REPLOG_WIRE_FAULTS`).
    static WIRE_FAULTS: std::cell::RefCell<Option<crate::replication::wire_fault::WireFaults>> =
        const { std::cell::RefCell::new(None) };
}

fn send(s: &mut dyn Write, m: &Message) -> Result<(), Refusal> {
    let faulty = WIRE_FAULTS.with(|f| {
        let mut f = f.borrow_mut();
        let f = f.as_mut()?;
        Some(
            protocol::encode(m)
                .map_err(frame_refusal)
                .and_then(|frame| {
                    f.write(s, &frame)
                        .map_err(|e| (RefusalCode::Unavailable, e.to_string()))
                }),
        )
    });
    match faulty {
        Some(r) => r?,
        None => write_frame(s, m).map_err(frame_refusal)?,
    }
    s.flush()
        .map_err(|e| (RefusalCode::Unavailable, e.to_string()))
}

fn ack(machine: &str, lsn: u64) -> Message {
    Message::Ack {
        machine: machine.to_string(),
        lsn,
    }
}

fn resync_state(machine: &str, p: &crate::replica::resync_apply::ResyncProgress) -> Message {
    Message::ResyncState {
        machine: machine.to_string(),
        disk: p.disk,
        next: p.next,
        compared: p.compared,
        sent_chunks: p.sent_chunks,
        sent_bytes: p.sent_bytes,
    }
}

/// LZ4 block with a 4-byte little-endian size in front, at most [`MAX_CHUNK`] bytes.
fn decompress(bytes: &[u8]) -> Result<Vec<u8>, Refusal> {
    crate::format::lz4_unpack(bytes, MAX_CHUNK)
        .map_err(|e| protocol_error(format!("compressed chunk: {e}")))
}

#[cfg(test)]
mod tests {
    use super::Failovers;

    #[test]
    fn a_shutdown_request_is_delivered_once_to_its_machine_and_never_after_withdraw() {
        let f = Failovers::default();
        assert!(!f.deliver_shutdown("vm1"), "nothing asked yet");
        f.request_shutdown("vm1");
        assert!(!f.deliver_shutdown("vm2"), "another machine is not asked");
        assert!(f.deliver_shutdown("vm1"));
        assert!(!f.deliver_shutdown("vm1"), "told once only");
        assert!(
            f.withdraw_shutdown("vm1"),
            "the withdrawal says it was told"
        );
        assert!(!f.deliver_shutdown("vm1"), "not after the withdrawal");
        f.request_shutdown("vm1");
        assert!(!f.withdraw_shutdown("vm1"), "withdrawn before it was told");
        assert!(!f.deliver_shutdown("vm1"));
    }
}
