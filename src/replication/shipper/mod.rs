//! The source side of replication: ship a machine's sealed segments to its target,
//! in order, and move the watermark hold to what the target acknowledged — only then
//! may the compactor merge (and delete) a segment.
//!
//! A pass ([`Shipper::ship_once`]) connects and greets ([`Link`]), announces the
//! machine (Protect → Protected), finishes initial replication if the target says it
//! is not done (`initial.rs`: the parents frozen at the replica's base, copied from
//! where the target's persisted position says), then ships every sealed segment the
//! target lacks (`delta.rs`). A resynchronisation is its own pass
//! (`resync_session.rs`).

mod delta;
mod initial;
mod resync_session;

pub use resync_session::ResyncReport;

use super::protocol::{self, read_frame, FrameError, Message};
use super::transport::{self, net_error, ClientStream};
use crate::error::{Error, Result};
use crate::format::meta::Watermark;
use crate::holds::WatermarkHold;
use crate::identity::SiteId;
use crate::volume::Machine;
use std::borrow::Cow;
use std::io::{IoSlice, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// Ships one machine to one target.
pub struct Shipper {
    site: PathBuf,
    target: String,
    /// Keeps every segment the target has not acknowledged.
    hold: WatermarkHold,
    acked_lsn: u64,
    progress: Option<Box<Progress>>,
    /// Flags that give up a pass between chunks (the loop's stop, its pause).
    stop: Vec<Arc<AtomicBool>>,
    /// Whether the target's initial copy is complete, as it said at the last
    /// handshake of this process (or as this process completed it); None before one.
    copy_complete: Option<bool>,
    /// What the target keeps: (every point, app-consistent points), in ms.
    retention: (u64, u64),
    /// Where a resync reports its counters as it goes (status shows them).
    resync_counters: Option<Box<ResyncCounterSink>>,
    /// Told every acknowledged LSN as it arrives (status shows it; a long pass would
    /// otherwise show its progress only at its end).
    on_ack: Option<Box<AckSink>>,
    /// What the target answered to the last `Reprotect` (a machine keeping a
    /// changed-block map sends one before every `Protect`).
    reprotect: Option<ReprotectView>,
    on_reprotect: Option<Box<ReprotectSink>>,
    /// The machine's bandwidth limit, shared by every link this shipper opens.
    limiter: Arc<crate::replication::bandwidth::Limiter>,
    /// The site ID the target must present (the relationship's), when known.
    target_id: Option<crate::identity::SiteId>,
    /// A pass while the machine has a planned failover's intent says `PromoteSoon`
    /// (false for a pass that only asks how a failover whose answer was lost ended).
    announce_promotion: bool,
}

/// Called with each LSN the target acknowledges.
pub type AckSink = dyn Fn(u64) + Send + Sync;

/// Called with the target's answer to each `Reprotect`.
pub type ReprotectSink = dyn Fn(&ReprotectView) + Send + Sync;

/// The target's `ReprotectState`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReprotectView {
    pub held: protocol::Held,
    pub generation: u32,
    pub tail: Vec<(u32, u64, u64)>,
    pub covered: bool,
    pub seeded_bytes: u64,
    pub orphan: Option<protocol::OrphanReport>,
    pub verified: Option<u64>,
}

impl std::fmt::Debug for Shipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Shipper(to {}, acked LSN {})",
            self.target, self.acked_lsn
        )
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShipReport {
    pub segments: usize,
    pub bytes: u64,
    pub acked_lsn: u64,
    /// Bytes of parent data sent by initial replication in this pass.
    pub initial_bytes: u64,
    /// Initial replication finished in this pass.
    pub initial_completed: bool,
}

/// What the target answered to Protect.
struct Protected {
    lsn: u64,
    seq: u64,
    initial_done: bool,
    resume: (u32, u64),
    diverged: Option<String>,
    /// The source's watermark announced in Protect.
    base: Watermark,
}

/// Called with (bytes of the disks scanned, total bytes of the disks).
pub type Progress = dyn Fn(u64, u64) + Send + Sync;

/// Called with a resync's counters as it goes.
pub type ResyncCounterSink = dyn Fn(crate::protection::status::ResyncCounters) + Send + Sync;

/// A session with a peer site, greeted: frames in and out, and the errors they become
/// (a refusal, the network, authentication, a protocol violation), each naming the
/// peer.
pub struct Link {
    stream: ClientStream,
    peer: String,
    peer_id: SiteId,
    /// The feature bits the peer's `Hello` announced.
    peer_features: u64,
    /// The machine's bandwidth limit, which every frame sent waits for.
    limiter: Option<Arc<crate::replication::bandwidth::Limiter>>,
    /// Faults injected into the frames sent (tests only: `REPLOG_WIRE_FAULTS`).
    faults: Option<crate::replication::wire_fault::WireFaults>,
}

/// Bytes a bandwidth-limited link writes at a time (see [`Link::limit`]).
const LIMITED_PIECE: usize = 64 << 10;

impl Link {
    /// Connect to `addr` as `site`, exchange `Hello`s (the peer's must name the site
    /// its certificate says and speak this protocol version with the features needed).
    pub fn connect(site: &Path, addr: &str) -> Result<Link> {
        let (stream, peer_id, me) = transport::connect(site, addr, Duration::from_secs(10))?;
        let mut link = Link {
            stream,
            peer: addr.to_string(),
            peer_id,
            peer_features: 0,
            limiter: None,
            faults: crate::replication::wire_fault::WireFaults::from_env(),
        };
        link.send(&protocol::hello(me.0))?;
        match link.recv()? {
            Message::Hello {
                site_id,
                protocol,
                features,
                required,
                ..
            } => {
                if SiteId(site_id) != peer_id {
                    return Err(Error::Auth {
                        peer: link.peer.clone(),
                        why: "its Hello names another site than its certificate".into(),
                        by_peer: false,
                    });
                }
                protocol::check_hello(protocol, features, required).map_err(|what| {
                    Error::Incompatible {
                        peer: link.peer.clone(),
                        what,
                    }
                })?;
                link.peer_features = features;
            }
            other => return Err(link.unexpected("Hello", &other)),
        }
        Ok(link)
    }

    /// The peer's site ID (from its certificate).
    pub fn peer_id(&self) -> SiteId {
        self.peer_id
    }

    /// The feature bits the peer announced.
    pub fn peer_features(&self) -> u64 {
        self.peer_features
    }

    /// Send every frame from now on through `limiter` (a machine's bandwidth limit).
    pub fn limit(&mut self, limiter: Arc<crate::replication::bandwidth::Limiter>) {
        self.limiter = Some(limiter);
    }

    /// Send and flush.
    pub fn send(&mut self, m: &Message) -> Result<()> {
        self.send_opt(m, true)
    }

    /// Send without flushing (more follows at once; the last one flushes).
    pub fn send_more(&mut self, m: &Message) -> Result<()> {
        self.send_opt(m, false)
    }

    /// Send a message whose byte payload is kept apart ([`protocol::encode_head`]:
    /// `head` with its `bytes` empty), without copying the payload into a frame;
    /// flushed if `flush` (else more follows at once).
    pub fn send_payload(&mut self, head: &Message, payload: &[u8], flush: bool) -> Result<()> {
        match protocol::encode_head(head, payload) {
            Ok(frame) => self.send_frame(&frame, payload, flush),
            Err(e) => Err(self.frame_error("send to", e)),
        }
    }

    fn send_opt(&mut self, m: &Message, flush: bool) -> Result<()> {
        match protocol::encode(m) {
            Ok(frame) => self.send_frame(&frame, &[], flush),
            Err(e) => Err(self.frame_error("send to", e)),
        }
    }

    /// Write one frame, `head` and then `tail`.
    fn send_frame(&mut self, head: &[u8], tail: &[u8], flush: bool) -> Result<()> {
        let sent = if let Some(f) = &mut self.faults {
            // Wire faults (tests) see each frame whole.
            f.write(&mut self.stream, &[head, tail].concat())
        } else {
            match &self.limiter {
                // Paced in pieces, so a large frame at a low rate still reaches the
                // target as a steady trickle, never a silence longer than its read
                // timeout.
                Some(l) => head
                    .chunks(LIMITED_PIECE)
                    .chain(tail.chunks(LIMITED_PIECE))
                    .try_for_each(|piece| {
                        l.take(piece.len());
                        self.stream.write_all(piece)
                    }),
                None => write_all_parts(&mut self.stream, &[head, tail]),
            }
        }
        .and_then(|()| if flush { self.stream.flush() } else { Ok(()) })
        .map_err(|e| net_error("send to", &self.peer, e));
        match sent {
            // The peer may have refused something and closed: its Error frame, if it
            // got here, says why (and whether to retry) better than the broken pipe.
            // Acks of segments in flight may come before it (the delta sender keeps
            // several unacknowledged): read past them.
            Err(e @ (Error::Net { .. } | Error::Auth { .. })) => {
                for _ in 0..=delta::WINDOW + 1 {
                    match self.recv() {
                        Err(refusal @ Error::Refused { .. }) => return Err(refusal),
                        Ok(Message::Ack { .. }) => continue,
                        _ => break,
                    }
                }
                Err(e)
            }
            other => other,
        }
    }

    /// The next message; an `Error` frame becomes [`Error::Refused`].
    pub fn recv(&mut self) -> Result<Message> {
        match read_frame::<Message>(&mut self.stream) {
            Ok(Message::Error { code, message }) => Err(Error::Refused {
                peer: self.peer.clone(),
                code,
                message,
            }),
            Ok(m) => Ok(m),
            Err(e) => Err(self.frame_error("receive from", e)),
        }
    }

    fn frame_error(&self, op: &'static str, e: FrameError) -> Error {
        match e {
            // A cut connection is the network (retried), not the protocol.
            FrameError::Io(io) => net_error(op, &self.peer, io),
            // Another version in the greeting is another replog; later, in a frame
            // whose header (not covered by its checksum) was damaged, it is the
            // session that went wrong.
            FrameError::Version(_) if self.peer_features == 0 => Error::Incompatible {
                peer: self.peer.clone(),
                what: e.to_string(),
            },
            other => Error::protocol(&self.peer, other.to_string()),
        }
    }

    /// The peer answered `got` where `want` was due.
    pub fn unexpected(&self, want: &str, got: &Message) -> Error {
        Error::protocol(
            &self.peer,
            format!("expected {want}, got {}", message_name(got)),
        )
    }
}

/// How asking a target to promote ended.
#[derive(Debug)]
pub enum PromoteOutcome {
    /// The target promoted the replica: this site is fenced.
    Promoted,
    /// It did not (refused, or never asked): this site may take writes again.
    NotPromoted(Error),
    /// The connection failed after the request left: the next contact tells.
    Unknown(Error),
}

/// Write `parts` in order through TLS as one run of plaintext: rustls cuts records
/// across the parts, so a frame's head does not travel as a small record of its own
/// (`StreamOwned` writes only the first part of a vectored write; `Stream` all).
fn write_all_parts(stream: &mut ClientStream, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    let mut left = &mut slices[..];
    let mut tls = rustls::Stream::new(&mut stream.conn, &mut stream.sock);
    while !left.is_empty() {
        match tls.write_vectored(left) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut left, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A chunk as it travels: (compressed, bytes), the chunk itself when it is not
/// compressed. LZ4 only where it pays: a chunk whose first 64 KiB do not shrink by
/// 1/16 is sent as it is (LZ4 over incompressible data costs a core at about 1 GB/s
/// and saves nothing), and so is one LZ4 would not make smaller.
pub(crate) fn pack(chunk: &[u8]) -> (bool, Cow<'_, [u8]>) {
    const SAMPLE: usize = 64 << 10;
    if let Some(sample) = chunk.get(..SAMPLE) {
        if lz4_flex::block::compress(sample).len() > SAMPLE / 16 * 15 {
            return (false, Cow::Borrowed(chunk));
        }
    }
    let packed = lz4_flex::block::compress_prepend_size(chunk);
    if packed.len() >= chunk.len() {
        (false, Cow::Borrowed(chunk))
    } else {
        (true, Cow::Owned(packed))
    }
}

/// A message's name, for errors (its fields may be megabytes of data).
pub(crate) fn message_name(m: &Message) -> String {
    let full = format!("{m:?}");
    let name: String = full
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    name
}

impl Shipper {
    /// Start shipping `machine` from `site` to the target at `target`. From now on the
    /// compactor keeps every segment the target has not acknowledged.
    pub fn new(site: &Path, machine: &Machine, target: &str) -> Shipper {
        // Points from now on carry digests (a no-op when the machine keeps them). What
        // the journal holds from before is sealed and merged into the parents (as far
        // as holds allow: a machine already protected has one at what the target
        // lacks), so the initial copy covers it and every point shipped has digests.
        let fresh = !machine.keeps_digests();
        if let Err(e) = machine.keep_digests() {
            tracing::error!(machine = machine.name(), "digests: {e}");
        }
        if fresh {
            if let Err(e) = machine.seal().and_then(|_| machine.compact()) {
                tracing::warn!(machine = machine.name(), "merge before protection: {e}");
            }
        }
        let base = machine.status().watermark.lsn;
        Shipper {
            site: site.to_path_buf(),
            target: target.to_string(),
            hold: machine.hold_watermark(base),
            acked_lsn: base,
            progress: None,
            stop: Vec::new(),
            copy_complete: None,
            retention: (
                super::relationship::DEFAULT_RETENTION_MS,
                super::relationship::DEFAULT_APP_RETENTION_MS,
            ),
            resync_counters: None,
            on_ack: None,
            reprotect: None,
            on_reprotect: None,
            limiter: Arc::default(),
            target_id: None,
            announce_promotion: true,
        }
    }

    /// Whether a pass while the machine has a planned failover's intent tells the
    /// target a promotion follows (`PromoteSoon`: it reads ahead for its check). Off
    /// for a pass that only finds out how a failover whose answer was lost ended.
    pub fn announce_promotion(&mut self, on: bool) {
        self.announce_promotion = on;
    }

    /// Tell `f` the target's answer to every `Reprotect`.
    pub fn on_reprotect_state(&mut self, f: Box<ReprotectSink>) {
        self.on_reprotect = Some(f);
    }

    /// What the target said of the reprotect at the last handshake.
    pub fn reprotect_state(&self) -> Option<&ReprotectView> {
        self.reprotect.as_ref()
    }

    /// Ask the target what it holds of `machine` (promoted at the map's point) and,
    /// unless `probe`, have it seed its own older copy as the replica.
    pub fn reprotect_exchange(
        link: &mut Link,
        machine: &Machine,
        map: &crate::volume::ChangedMap,
        probe: bool,
    ) -> Result<ReprotectView> {
        let w = machine.status().watermark;
        link.send(&Message::Reprotect {
            machine: machine.name().to_string(),
            machine_id: machine.machine_id(),
            generation: machine.generation(),
            since: map.since,
            foreign_upto: map.foreign_upto,
            disks: machine.disks(),
            base_lsn: w.lsn,
            base_seq: w.segment_seq,
            probe,
        })?;
        match link.recv()? {
            Message::ReprotectState {
                held,
                generation,
                tail,
                covered,
                seeded_bytes,
                orphan,
                verified,
                ..
            } => Ok(ReprotectView {
                held,
                generation,
                tail,
                covered,
                seeded_bytes,
                orphan,
                verified,
            }),
            other => Err(link.unexpected("ReprotectState", &other)),
        }
    }

    /// Tell `sink` a resync's counters after every batch (chunks compared of all,
    /// chunks and bytes sent).
    pub fn report_resync_to(&mut self, sink: Box<ResyncCounterSink>) {
        self.resync_counters = Some(sink);
    }

    /// Tell `f` every LSN the target acknowledges, as it arrives.
    pub fn on_ack(&mut self, f: Box<AckSink>) {
        self.on_ack = Some(f);
    }

    pub fn site(&self) -> &Path {
        &self.site
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    /// Stop keeping the journal for the target (a resync will bring it along): the
    /// compactor may merge up to `lsn`.
    pub fn release_hold(&mut self, lsn: u64) {
        self.hold.set(lsn);
    }

    /// How long the target keeps points: (every point, app-consistent ones), in ms.
    pub fn set_retention(&mut self, every_ms: u64, app_ms: u64) {
        self.retention = (every_ms, app_ms.max(every_ms));
    }

    /// Ship only to a target presenting `id` (the relationship's `target_id`).
    pub fn expect_target(&mut self, id: crate::identity::SiteId) {
        self.target_id = Some(id);
    }

    /// Give up a pass (between chunks of an initial copy or a resync) once `stop` —
    /// or any other flag given here — is set; the pass fails as interrupted
    /// ([`is_interrupted`]).
    pub fn stop_on(&mut self, stop: Arc<AtomicBool>) {
        self.stop.push(stop);
    }

    fn stopping(&self) -> Result<()> {
        if self
            .stop
            .iter()
            .any(|s| s.load(std::sync::atomic::Ordering::Acquire))
        {
            return Err(Error::Net {
                op: "ship to",
                peer: self.target.clone(),
                source: std::io::Error::from(std::io::ErrorKind::Interrupted),
            });
        }
        Ok(())
    }

    /// Report initial-replication (and resync) progress to `f`.
    pub fn on_progress(&mut self, f: Box<Progress>) {
        self.progress = Some(f);
    }

    pub fn acked_lsn(&self) -> u64 {
        self.acked_lsn
    }

    /// Whether the target's initial copy is complete, as the last handshake of this
    /// process said (or this process completed it); None before any.
    pub fn target_copy_complete(&self) -> Option<bool> {
        self.copy_complete
    }

    /// Connect, greet and announce `machine`: the link and the target's answer.
    fn handshake(&mut self, machine: &Machine) -> Result<(Link, Protected)> {
        let mut link = Link::connect(&self.site, &self.target)?;
        // Another site answers at the target's address (its certificate changed, or a
        // different site was put there): never ship to it unasked.
        if let Some(want) = self.target_id {
            if link.peer_id() != want {
                return Err(Error::Auth {
                    peer: self.target.clone(),
                    why: format!(
                        "the site there presents ID {}, but {} replicates to ID {want}; if \
                         the target really changed, protect the machine again toward it",
                        link.peer_id(),
                        machine.name()
                    ),
                    by_peer: false,
                });
            }
        }
        // The bandwidth settings as they are now (`replog bandwidth` changes them in
        // place, with or without a serve): read once a pass, beside a TLS handshake.
        match crate::replication::relationship::Relationship::load(&self.site, machine.name()) {
            Ok(Some(rel)) => self.limiter.set(rel.bandwidth()?),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                machine = machine.name(),
                "relationship: {e}; the bandwidth limit stays as it was"
            ),
        }
        link.limit(self.limiter.clone());
        // Until a target has said in this process that its copy is complete, the
        // parents must not move under the base announced here: a target that starts
        // a new replica (its copy lost) bases it there, and the copy needs the
        // parents frozen at that base. So hold at the watermark and let a merge in
        // flight end before reading it (once per loop, and while a copy is under way;
        // before a reprotect's exchange too, which announces the same base).
        if self.copy_complete != Some(true) {
            loop {
                let w = machine.status().watermark;
                self.hold.set(w.lsn);
                machine.wait_for_merge();
                if machine.status().watermark == w {
                    break;
                }
            }
        }
        if let Some(map) = machine.changed_map() {
            if link.peer_features() & protocol::FEATURE_REPROTECT != 0 {
                let view = Self::reprotect_exchange(&mut link, machine, &map, false)?;
                if let Some(f) = &self.on_reprotect {
                    f(&view);
                }
                self.reprotect = Some(view);
            }
        }
        let w = machine.status().watermark;
        link.send(&Message::Protect {
            machine: machine.name().to_string(),
            machine_id: machine.machine_id(),
            generation: machine.generation(),
            disks: machine.disks(),
            base_lsn: w.lsn,
            base_seq: w.segment_seq,
            retention_ms: self.retention.0,
            app_retention_ms: self.retention.1,
        })?;
        match link.recv()? {
            // A target that holds a newer generation than ours took the machine over:
            // fenced, whatever its position says (never "ahead, so resync").
            Message::Protected { generation, .. } if generation > machine.generation() => {
                Err(Error::Refused {
                    peer: self.target.clone(),
                    code: crate::replication::protocol::RefusalCode::Fenced,
                    message: format!(
                        "the target holds generation {generation} of {}; this site's is {}",
                        machine.name(),
                        machine.generation()
                    ),
                })
            }
            Message::Protected {
                lsn,
                seq,
                initial_done,
                resume_disk,
                resume_offset,
                diverged,
                ..
            } => {
                crate::failpoint::hit("ship:protected");
                self.copy_complete = Some(initial_done);
                Ok((
                    link,
                    Protected {
                        lsn,
                        seq,
                        initial_done,
                        resume: (resume_disk, resume_offset),
                        diverged,
                        base: w,
                    },
                ))
            }
            other => Err(link.unexpected("Protected", &other)),
        }
    }

    /// A planned failover's last step: ask the target to promote `machine` at
    /// exactly `lsn` (everything up to it acknowledged, the machine fenced).
    pub fn promote_at_target(
        &mut self,
        machine: &Machine,
        lsn: u64,
        generation: u32,
    ) -> PromoteOutcome {
        let (mut link, p) = match self.handshake(machine) {
            Ok(x) => x,
            Err(e) => return PromoteOutcome::NotPromoted(e),
        };
        if p.lsn != lsn {
            return PromoteOutcome::NotPromoted(Error::BrokenChain(format!(
                "the target holds {} up to LSN {}, not {lsn}",
                machine.name(),
                p.lsn
            )));
        }
        if link.peer_features() & protocol::FEATURE_FAILOVER == 0 {
            return PromoteOutcome::NotPromoted(Error::Incompatible {
                peer: self.target.clone(),
                what: "the target's replog cannot carry out a planned failover (no failover \
                       feature)"
                    .into(),
            });
        }
        let sent = link.send(&Message::Promote {
            machine: machine.name().to_string(),
            machine_id: machine.machine_id(),
            generation,
            lsn,
        });
        if sent.is_ok() {
            crate::failpoint::hit("planned:after-promote-sent");
        }
        match sent.and_then(|()| link.recv()) {
            Ok(Message::Promoted {
                generation: g,
                lsn: l,
                ..
            }) if g == generation && l == lsn => PromoteOutcome::Promoted,
            Ok(other) => PromoteOutcome::Unknown(link.unexpected("Promoted", &other)),
            // The target refuses only what it did not do.
            Err(e @ Error::Refused { .. }) => PromoteOutcome::NotPromoted(e),
            Err(e) => PromoteOutcome::Unknown(e),
        }
    }

    /// Connect, protect, finish the initial copy if it is not done, and ship every
    /// sealed segment the target lacks.
    pub fn ship_once(&mut self, machine: &Machine) -> Result<ShipReport> {
        let (mut link, p) = self.handshake(machine)?;
        if let Some(why) = p.diverged {
            return Err(Error::BrokenChain(format!(
                "the target's replica diverged: {why}"
            )));
        }
        // The target's position must be a point of this machine's own history.
        let newest_seq = machine.sealed_segments().last().map(|g| g.seq).unwrap_or(0);
        if p.seq > newest_seq.max(p.base.segment_seq) || p.lsn > machine.status().last_lsn {
            return Err(Error::BrokenChain(format!(
                "the target's replica of {} is ahead of this source (segment {}, LSN \
                 {}): it holds another history",
                machine.name(),
                p.seq,
                p.lsn
            )));
        }
        let mut report = ShipReport {
            acked_lsn: p.lsn,
            ..Default::default()
        };
        if !p.initial_done {
            report.initial_bytes = self.initial_replication(&mut link, machine, &p)?;
            report.initial_completed = true;
            self.copy_complete = Some(true);
        }
        self.ship_segments(&mut link, machine, (p.lsn, p.seq), &mut report)?;
        Ok(report)
    }
}

/// Whether `e` is a pass given up because a flag given to [`Shipper::stop_on`] was
/// set (nothing failed).
pub fn is_interrupted(e: &Error) -> bool {
    matches!(e, Error::Net { source, .. } if source.kind() == std::io::ErrorKind::Interrupted)
}
