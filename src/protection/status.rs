//! What `replog status` shows for each machine a site holds — primaries, test copies
//! and replicas — derived in one place, [`derive`], from the facts about it: its
//! manifest (role, generation, fence), its journal, its relationship and resync
//! record, the live state of its shipping loop when `serve` runs, and for a replica
//! its marks, newest point, resync and scrub.
//!
//! A running `serve` writes the site's status to `SITE/status.json` four times a
//! second; `replog status` reads that file while `serve` holds the site, and derives
//! the same from the files otherwise (with `serve_running: false`).

use super::{Health, Role, State};
use crate::replica::store::ReplicaStore;
use crate::replication::relationship::Relationship;
use crate::replication::resync_schedule::SourceResync;
use crate::volume::JournalStatus;
use serde::{Deserialize, Serialize};

pub const STATUS_FILE: &str = "status.json";

/// How long `replog status` waits for a starting serve's first `status.json`.
pub const STATUS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineStatus {
    pub name: String,
    pub role: Role,
    pub state: State,
    pub generation: u32,
    pub health: Health,
    pub reason: String,
    pub lag_seconds: Option<f64>,
    /// Primaries protected with an RPO: its length (lag beyond it is a Warning,
    /// beyond twice it Critical).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_seconds: Option<f64>,
    pub journal_bytes: u64,
    /// Bytes of merged journal segments kept to be written again (disk the journal
    /// holds beside `journal_bytes`).
    #[serde(default)]
    pub journal_spare_bytes: u64,
    pub progress: Option<f64>,
    pub last_point: Option<PointRef>,
    /// Primaries: the target replicated to.
    pub target: Option<String>,
    /// Primaries: the newest LSN the target acknowledged.
    pub acked_lsn: Option<u64>,
    /// Primaries: the newest LSN written; replicas: the newest received.
    pub last_lsn: u64,
    /// A resync under way or last finished: chunks compared of all, chunks and bytes
    /// sent.
    #[serde(default)]
    pub resync: Option<ResyncCounters>,
    /// Replicas: the source site's ID.
    #[serde(default)]
    pub source: Option<String>,
    /// Replicas: the scrub's last complete round and what it found.
    #[serde(default)]
    pub scrub: Option<ScrubSummary>,
    /// A failed-over primary: where it went (the site that runs the newer generation;
    /// `target` is that site's address).
    #[serde(default)]
    pub failed_over_to: Option<FailedOverTo>,
    /// A reprotect under way (primaries): its stage and what is left to send.
    #[serde(default)]
    pub reprotect: Option<ReprotectCounters>,
    /// Primaries: shipping paused by an operator (`replog pause`).
    #[serde(default)]
    pub paused: bool,
}

/// A reprotect under way, as its shipping loop sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReprotectCounters {
    /// `seed` (the target makes its older copy the replica), `delta` (the blocks that
    /// differ travel), `caught up` (shipping; waiting for the target to check a
    /// point's digests).
    pub stage: String,
    /// Bytes of blocks that differ sent, of all (a full copy's bytes at an alternate
    /// location).
    pub bytes_sent: u64,
    pub bytes_total: u64,
    /// 4 KiB blocks left to send.
    pub blocks_left: u64,
    /// The orphan point the old primary kept, if it kept one.
    pub orphan: Option<String>,
}

/// Where a failed-over primary went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedOverTo {
    /// The site ID that holds the newer generation.
    pub site: String,
    pub generation: u32,
    /// When this site learnt of it (RFC 3339).
    pub at: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncCounters {
    /// Chunks compared before this run started (an interrupted resync resumed).
    pub resumed_from: u64,
    pub chunks_compared: u64,
    pub chunks_total: u64,
    pub chunks_sent: u64,
    pub bytes_sent: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointRef {
    pub lsn: u64,
    pub time: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubSummary {
    /// When the last round that covered every object ended (RFC 3339), if one did.
    pub last_full: Option<String>,
    /// Objects it checked.
    pub objects: u64,
    /// What it found (None: every object authenticated).
    pub found: Option<String>,
    /// Objects checked in the round under way.
    pub in_progress: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteStatus {
    pub site: String,
    pub machines: Vec<MachineStatus>,
    /// When this status was taken (ns since the epoch): everything that happened before
    /// it is reflected in it.
    #[serde(default)]
    pub as_of_ns: u64,
    /// What is wrong with the site as a whole (its certificate ending soon).
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl SiteStatus {
    /// The status a running `serve` keeps in `SITE/status.json`. A serve that holds
    /// the site but has not written it yet (it writes it once its machines are open,
    /// before it mounts) is waited for, up to [`STATUS_WAIT`], then
    /// named as starting.
    pub fn load(site: &std::path::Path) -> crate::Result<SiteStatus> {
        let p = site.join(STATUS_FILE);
        let waited = std::time::Instant::now();
        let text = loop {
            match std::fs::read_to_string(&p) {
                Ok(text) => break text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if waited.elapsed() >= STATUS_WAIT {
                        return Err(crate::Error::Busy(format!(
                            "serve holds {} but has not written its status yet (it is \
                             starting: opening its machines); try again in a moment",
                            site.display()
                        )));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(crate::Error::io("read", &p, e)),
            }
        };
        serde_json::from_str(&text)
            .map_err(|e| crate::Error::corruption(&p, e.column() as u64, e.to_string()))
    }
}

/// What status says about a site's identity: its ID and when its certificate ends,
/// read once (serve holds the site, and a rotation needs it).
#[derive(Debug, Clone)]
pub struct IdentityFacts {
    pub id: String,
    /// When the certificate ends (seconds since the epoch), or why it is not known.
    end: std::result::Result<i64, String>,
}

impl IdentityFacts {
    pub fn load(site: &std::path::Path) -> IdentityFacts {
        match crate::identity::Identity::load(site) {
            Ok(me) => IdentityFacts {
                id: me.id().to_string(),
                end: me.not_after().map_err(|e| e.to_string()),
            },
            Err(e) => IdentityFacts {
                id: String::new(),
                end: Err(e.to_string()),
            },
        }
    }

    /// The site-wide warnings now: the certificate ending soon, or not readable.
    pub fn warnings(&self, site: &std::path::Path) -> Vec<String> {
        match &self.end {
            Ok(end) => {
                let now = crate::format::now_ns() / 1_000_000_000;
                crate::identity::expiry_warning(site, *end, i64::try_from(now).unwrap_or(i64::MAX))
                    .into_iter()
                    .collect()
            }
            Err(e) => vec![format!("the site identity: {e}")],
        }
    }
}

/// The live state of a machine's shipping loop.
#[derive(Debug, Clone)]
pub struct ShipView {
    pub state: State,
    pub health: Health,
    pub reason: String,
    pub progress: Option<f64>,
    pub acked_lsn: u64,
    pub target: String,
    pub resync: Option<ResyncCounters>,
    pub reprotect: Option<ReprotectCounters>,
    /// An operator paused shipping (`ShipLoop::view` sets it: the loop's own status
    /// says so only once a pass has seen it).
    pub paused: bool,
}

/// What is known about a primary (or test copy) machine.
pub struct PrimaryFacts<'a> {
    pub role: Role,
    pub generation: u32,
    pub journal: &'a JournalStatus,
    /// Why its writes are refused, if they are.
    pub fenced: Option<String>,
    /// The persisted fence: a newer generation took it over.
    pub failed_over: bool,
    /// That fence: where it went.
    pub fence: Option<Box<crate::protection::Fence>>,
    pub relationship: Option<&'a Relationship>,
    pub resync: Option<&'a SourceResync>,
    /// The shipping loop, when serve runs one.
    pub ship: Option<&'a ShipView>,
    pub lag_seconds: Option<f64>,
    pub serve_running: bool,
    /// Stands on a replica point (a promoted machine before its fold, a test copy).
    pub base: Option<crate::protection::Base>,
    /// A failover not committed yet.
    pub pending: Option<crate::protection::Pending>,
}

/// What is known about a replica.
pub struct ReplicaFacts<'a> {
    pub store: &'a ReplicaStore,
    pub now_ns: u64,
}

pub enum Facts<'a> {
    Primary(PrimaryFacts<'a>),
    Replica(ReplicaFacts<'a>),
}

/// The one derivation of what status shows.
pub fn derive(name: &str, facts: &Facts<'_>) -> MachineStatus {
    match facts {
        Facts::Primary(f) => primary(name, f),
        Facts::Replica(f) => replica(name, f),
    }
}

fn point_ref(lsn: u64, time_ns: u64) -> PointRef {
    PointRef {
        lsn,
        time: crate::format::rfc3339(time_ns),
    }
}

fn primary(name: &str, f: &PrimaryFacts<'_>) -> MachineStatus {
    let j = f.journal;
    let mut st = MachineStatus {
        name: name.to_string(),
        role: f.role,
        state: State::Unprotected,
        generation: f.generation,
        health: Health::Healthy,
        reason: "not protected; journal healthy".into(),
        lag_seconds: None,
        rpo_seconds: None,
        journal_bytes: j.journal_bytes,
        journal_spare_bytes: j.spare_bytes,
        progress: None,
        last_point: j.last_point.map(|p| point_ref(p.lsn, p.time_ns)),
        target: f.relationship.map(|r| r.target.clone()),
        acked_lsn: None,
        last_lsn: j.last_lsn,
        resync: None,
        source: None,
        scrub: None,
        reprotect: None,
        paused: false,
        failed_over_to: f.fence.as_ref().map(|x| FailedOverTo {
            site: crate::identity::SiteId(x.by_site).to_string(),
            generation: x.generation,
            at: crate::format::rfc3339(x.at_ns),
        }),
    };
    if st.last_point.is_none() {
        // Nothing written since the failover: the point it stands on.
        st.last_point = f.base.as_ref().map(|b| point_ref(b.lsn, b.time_ns));
    }
    if f.role == Role::Test {
        st.state = State::TestFailover;
        st.reason = match &f.base {
            Some(b) => format!(
                "a test copy of {} at pt-{}: writable, isolated from replication",
                b.replica, b.lsn
            ),
            None => "a test copy: writable, isolated from replication".into(),
        };
    }
    if let (Some(p), Some(b)) = (&f.pending, &f.base) {
        st.state = State::CommitPending;
        st.reason = format!(
            "{} failover at pt-{} (generation {} → {}): commit pending — `replog commit`, \
             or `replog failover --change-point`{}",
            p.kind,
            b.lsn,
            p.from_generation,
            f.generation,
            if p.kind == crate::protection::FailoverKind::Unplanned {
                " or `--cancel`"
            } else {
                ""
            }
        );
    }
    match (f.ship, f.relationship) {
        (Some(l), _) => {
            st.state = l.state;
            st.health = l.health;
            st.reason = l.reason.clone();
            st.progress = l.progress;
            st.target = Some(l.target.clone());
            st.acked_lsn = Some(l.acked_lsn);
            st.resync = l.resync;
            st.reprotect = l.reprotect.clone();
            st.lag_seconds = f.lag_seconds;
            st.rpo_seconds = f.relationship.and_then(Relationship::rpo_seconds);
            if let (Some(lag), Some(rpo)) = (st.lag_seconds, st.rpo_seconds) {
                let (level, what) = if lag > 2.0 * rpo {
                    (Health::Critical, "more than twice the RPO")
                } else if lag > rpo {
                    (Health::Warning, "over the RPO")
                } else {
                    (Health::Healthy, "")
                };
                if level > Health::Healthy && level >= st.health {
                    st.reason = format!(
                        "replication lag {lag:.1} s is {what} of {rpo} s; {}",
                        st.reason
                    );
                    st.health = level;
                }
            }
            // A loop an operator paused says so, stopped or not (a stopped loop's
            // reason is what stopped it; a loop started paused has not run a pass).
            // Paused is a Warning: nothing reaches the target meanwhile.
            if l.paused {
                st.paused = true;
                say_paused(&mut st.reason, &l.target);
                st.health = st.health.max(Health::Warning);
                if f.resync.is_some() {
                    st.state = State::ResyncRequired;
                }
            }
        }
        (None, Some(r)) => {
            st.state = State::Protected;
            st.health = Health::Warning;
            st.reason = format!(
                "protected toward {}, but `replog serve` is not running",
                r.target
            );
            if let Some(req) = f.resync {
                st.state = State::ResyncRequired;
                st.reason = format!("resync required: {}", req.reason);
                if !f.serve_running {
                    st.reason.push_str("; `replog serve` is not running");
                }
            }
            if r.paused {
                st.paused = true;
                say_paused(&mut st.reason, &r.target);
            }
        }
        (None, None) => {}
    }
    if f.failed_over {
        st.state = State::FailedOver;
    }
    if let Some(why) = &f.fenced {
        st.health = st.health.max(Health::Warning);
        st.reason = format!("writes refused: {why}");
    }
    if let Some(p) = &j.poisoned {
        // What stopped the loop as well, when it says more than the damage (a mend the
        // target refused names what the operator can do), and that shipping is paused.
        let loop_reason = std::mem::take(&mut st.reason);
        let mut reason = p.clone();
        if st.health == Health::Critical
            && !loop_reason.is_empty()
            && !loop_reason.contains(p.as_str())
        {
            reason = format!("{reason}; {loop_reason}");
        }
        let paused = match (f.ship, f.relationship) {
            (Some(l), _) => l.paused.then_some(l.target.as_str()),
            (None, Some(r)) => r.paused.then_some(r.target.as_str()),
            (None, None) => None,
        };
        if let Some(target) = paused {
            say_paused(&mut reason, target);
        }
        st.reason = reason;
        st.health = Health::Critical;
    }
    st
}

/// Add to `reason` that shipping to `target` is paused, unless it says so already.
fn say_paused(reason: &mut String, target: &str) {
    let phrase = crate::replication::run::paused_reason(target);
    if reason.contains(&phrase) {
        return;
    }
    *reason = if reason.is_empty() {
        phrase
    } else {
        format!("{reason}; {phrase}")
    };
}

fn replica(name: &str, f: &ReplicaFacts<'_>) -> MachineStatus {
    let s = f.store;
    let newest = crate::replica::points::newest(s).ok().flatten();
    let received = s.received();
    let mut st = MachineStatus {
        name: name.to_string(),
        role: Role::Replica,
        state: State::Protected,
        generation: s.generation(),
        health: Health::Healthy,
        reason: String::new(),
        rpo_seconds: None,
        lag_seconds: newest
            .as_ref()
            .map(|p| f.now_ns.saturating_sub(p.time_ns) as f64 / 1e9),
        journal_bytes: 0,
        journal_spare_bytes: 0,
        progress: None,
        last_point: newest.as_ref().map(|p| point_ref(p.lsn, p.time_ns)),
        target: None,
        acked_lsn: None,
        last_lsn: received.lsn,
        resync: None,
        source: Some(crate::identity::SiteId(s.manifest().source_site).to_string()),
        scrub: None,
        failed_over_to: None,
        reprotect: None,
        paused: false,
    };
    let source = st.source.clone().unwrap_or_default();
    st.reason = format!("receiving from {source}");
    if let Ok(scrub) = s.scrub_state() {
        st.scrub = Some(ScrubSummary {
            last_full: scrub.last_full_ns.map(crate::format::rfc3339),
            objects: scrub.last_full_checked,
            found: scrub.last_found.clone().or(scrub.found.clone()),
            in_progress: scrub.checked,
        });
    }
    let total: u64 = s.manifest().disks.iter().map(|d| d.size).sum();
    if !s.initial().done {
        st.state = State::InitialReplication;
        st.health = Health::Warning;
        let before: u64 = s
            .manifest()
            .disks
            .iter()
            .take(s.initial().disk as usize)
            .map(|d| d.size)
            .sum();
        st.progress = (total > 0).then(|| (before + s.initial().offset) as f64 / total as f64);
        st.reason = format!("initial replication from {source}");
        return st;
    }
    match s.resync_progress() {
        Ok(Some(p)) => {
            let chunks = s
                .manifest()
                .disks
                .iter()
                .map(|d| d.size.div_ceil(p.chunk_bytes.max(1)))
                .sum::<u64>();
            st.state = State::Resyncing;
            st.health = Health::Warning;
            st.progress = (chunks > 0).then(|| p.compared as f64 / chunks as f64);
            st.resync = Some(ResyncCounters {
                resumed_from: 0,
                chunks_compared: p.compared,
                chunks_total: chunks,
                chunks_sent: p.sent_chunks,
                bytes_sent: p.sent_bytes,
            });
            st.reason = format!("being resynchronised with {source}");
            return st;
        }
        Ok(None) => {}
        Err(e) => {
            st.health = Health::Critical;
            st.reason = format!("resync state unreadable: {e}");
            return st;
        }
    }
    match s.damage() {
        Ok(Some(why)) => {
            st.state = State::ResyncRequired;
            st.health = Health::Warning;
            st.reason = format!("{why}; the source resynchronises at its next contact");
        }
        Ok(None) => {}
        Err(e) => {
            st.health = Health::Critical;
            st.reason = format!("damage record unreadable: {e}");
        }
    }
    st
}

/// The status of a primary of an open site as it is on disk (no serve, or before
/// its loop started): facts gathered from the site's files.
pub fn offline_primary(
    site: &std::path::Path,
    m: &crate::volume::Machine,
) -> crate::error::Result<MachineStatus> {
    let rel = Relationship::load(site, m.name())?;
    let resync = SourceResync::load(site, m.name())?;
    let journal = m.status();
    Ok(derive(
        m.name(),
        &Facts::Primary(PrimaryFacts {
            role: m.role(),
            generation: m.generation(),
            journal: &journal,
            fenced: m.fenced(),
            failed_over: m.failed_over(),
            fence: m.fence_record().map(Box::new),
            relationship: rel.as_ref(),
            resync: resync.as_ref(),
            ship: None,
            lag_seconds: None,
            serve_running: false,
            base: m.base(),
            pending: m.pending(),
        }),
    ))
}

/// The status of every replica `replicas` holds (those that do not open are shown
/// Critical, with the reason).
pub fn replicas_status(replicas: &crate::replica::store::Replicas) -> Vec<MachineStatus> {
    let now = crate::format::now_ns();
    let mut out = Vec::new();
    for name in replicas.machines().unwrap_or_default() {
        match replicas.open_readonly(&name) {
            Ok(store) => out.push(derive(
                &name,
                &Facts::Replica(ReplicaFacts {
                    store: &store,
                    now_ns: now,
                }),
            )),
            Err(e) => out.push(MachineStatus {
                name: name.clone(),
                role: Role::Replica,
                state: State::Protected,
                generation: 0,
                health: Health::Critical,
                reason: format!("the replica does not open: {e}"),
                lag_seconds: None,
                rpo_seconds: None,
                journal_bytes: 0,
                journal_spare_bytes: 0,
                progress: None,
                last_point: None,
                target: None,
                acked_lsn: None,
                last_lsn: 0,
                resync: None,
                source: None,
                scrub: None,
                failed_over_to: None,
                reprotect: None,
                paused: false,
            }),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A starting serve's first status is waited for; one that never comes is named
    /// as starting (Busy), not as a missing file; a damaged one is reported.
    #[test]
    fn status_waits_for_a_starting_serve_then_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let doc = SiteStatus {
            site: "abc".into(),
            machines: Vec::new(),
            as_of_ns: 7,
            warnings: Vec::new(),
        };
        let text = serde_json::to_string(&doc).unwrap();
        let p = dir.path().join(STATUS_FILE);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            std::fs::write(p, text).unwrap();
        });
        assert_eq!(SiteStatus::load(dir.path()).unwrap().as_of_ns, 7);
        writer.join().unwrap();

        let empty = tempfile::tempdir().unwrap();
        let e = SiteStatus::load(empty.path()).unwrap_err();
        assert!(matches!(e, crate::Error::Busy(_)), "{e:?}");
        assert!(e.to_string().contains("starting"), "{e}");

        std::fs::write(dir.path().join(STATUS_FILE), "{").unwrap();
        assert!(matches!(
            SiteStatus::load(dir.path()),
            Err(crate::Error::Corruption { .. })
        ));
    }

    fn journal(poisoned: Option<&str>) -> JournalStatus {
        JournalStatus {
            sealed_segments: 0,
            journal_bytes: 0,
            spare_bytes: 0,
            active_seq: 1,
            last_lsn: 10,
            durable_lsn: 10,
            watermark: Default::default(),
            index_extents: 0,
            last_point: None,
            poisoned: poisoned.map(str::to_string),
        }
    }

    fn view(state: State, health: Health, reason: &str, paused: bool) -> ShipView {
        ShipView {
            state,
            health,
            reason: reason.into(),
            progress: None,
            acked_lsn: 0,
            target: "b:7000".into(),
            resync: None,
            reprotect: None,
            paused,
        }
    }

    /// The facts of a healthy primary vm1 of generation 1 whose journal is `j`, with
    /// no relationship, no loop, and serve running: a base for struct updates.
    fn facts(j: &JournalStatus) -> PrimaryFacts<'_> {
        PrimaryFacts {
            role: Role::Primary,
            generation: 1,
            journal: j,
            fenced: None,
            failed_over: false,
            fence: None,
            relationship: None,
            resync: None,
            ship: None,
            lag_seconds: None,
            serve_running: true,
            base: None,
            pending: None,
        }
    }

    fn status(
        j: &JournalStatus,
        ship: &ShipView,
        resync: Option<&SourceResync>,
        failed_over: bool,
    ) -> MachineStatus {
        derive(
            "vm1",
            &Facts::Primary(PrimaryFacts {
                failed_over,
                resync,
                ship: Some(ship),
                ..facts(j)
            }),
        )
    }

    #[test]
    fn a_paused_loop_says_so_once_whatever_stopped_it() {
        let pending = SourceResync {
            reason: "the source's journal is damaged".into(),
            ..Default::default()
        };
        let healthy = journal(None);
        // Stopped by a Critical error, then paused: both are said.
        let stopped = view(
            State::Protected,
            Health::Critical,
            "the target refused",
            true,
        );
        let st = status(&healthy, &stopped, None, false);
        assert_eq!(
            st.reason, "the target refused; shipping to b:7000 is paused",
            "{st:?}"
        );
        // Started paused in a stopped one's place, a resync pending: not an initial copy.
        let fresh = view(
            State::InitialReplication,
            Health::Warning,
            "connecting to b:7000",
            true,
        );
        let st = status(&healthy, &fresh, Some(&pending), false);
        assert_eq!(st.state, State::ResyncRequired, "{st:?}");
        assert!(
            st.reason.ends_with("shipping to b:7000 is paused"),
            "{st:?}"
        );
        // A running loop that says it is paused, the journal damaged: said once.
        let running = view(
            State::Protected,
            Health::Critical,
            "shipping to b:7000 is paused",
            true,
        );
        let st = status(
            &journal(Some("segment 3 is damaged")),
            &running,
            Some(&pending),
            false,
        );
        assert_eq!(st.reason.matches("is paused").count(), 1, "{st:?}");
        assert!(st.reason.starts_with("segment 3 is damaged"), "{st:?}");
        assert_eq!(st.health, Health::Critical);
        // Failed over stays failed over.
        let st = status(
            &journal(Some("segment 3 is damaged")),
            &fresh,
            Some(&pending),
            true,
        );
        assert_eq!(st.state, State::FailedOver, "{st:?}");
        // Not paused: nothing is added.
        let st = status(
            &healthy,
            &view(
                State::Protected,
                Health::Critical,
                "the target refused",
                false,
            ),
            None,
            false,
        );
        assert_eq!(st.reason, "the target refused");
        // A healthy loop, paused: a Warning.
        let st = status(
            &healthy,
            &view(
                State::Protected,
                Health::Healthy,
                "shipping to b:7000 is paused",
                true,
            ),
            None,
            false,
        );
        assert_eq!(st.health, Health::Warning, "{st:?}");
        assert!(st.paused);
    }

    /// With no serve, the relationship says whether shipping is paused.
    #[test]
    fn a_paused_relationship_says_so_with_no_serve() {
        let rel = |paused| Relationship {
            target: "b:7000".into(),
            target_id: "ab".repeat(32),
            paused,
            ..Default::default()
        };
        let at_rest = |r: &Relationship, j: &JournalStatus| {
            derive(
                "vm1",
                &Facts::Primary(PrimaryFacts {
                    relationship: Some(r),
                    serve_running: false,
                    ..facts(j)
                }),
            )
        };
        let st = at_rest(&rel(true), &journal(None));
        assert!(
            st.reason.ends_with("; shipping to b:7000 is paused"),
            "{st:?}"
        );
        assert_eq!(st.health, Health::Warning);
        assert!(st.paused);
        let st = at_rest(&rel(false), &journal(None));
        assert!(!st.reason.contains("paused"), "{st:?}");
        assert!(!st.paused);
        // Damaged: the damage first, the pause once.
        let st = at_rest(&rel(true), &journal(Some("segment 3 is damaged")));
        assert_eq!(
            st.reason, "segment 3 is damaged; shipping to b:7000 is paused",
            "{st:?}"
        );
    }
}
