//! The protection model: what a site is for a machine (its [`Role`]), the machine's
//! generation, whether it is fenced, and the [`State`] and [`Health`] that status
//! shows — derived in one place, [`status::derive`], from what is known about it.
//!
//! - **Role** is persisted with the machine at every site that holds it: in
//!   `machine.meta` (version 2) for primaries and test copies, implied by
//!   `replica.meta` for replicas.
//! - **Generation** is a number per machine, 1 when it is created, one more at every
//!   promotion (failover). Segments (header version 2), `Protect`, segments and
//!   resyncs on the wire, and both manifests carry it; a site refuses a lower
//!   generation than its own (`RefusalCode::Fenced`).
//! - **Fence**: a machine whose writes are refused (EROFS), persisted when a newer
//!   generation took it over, or set for a while by the command channel.

pub mod status;

use serde::{Deserialize, Serialize};

/// What a site is for one machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// It serves the disks writable and ships them.
    Primary,
    /// It receives them.
    Replica,
    /// An isolated writable copy made by a test failover.
    Test,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Test => "test",
        }
    }
}

/// Why a machine's writes are refused for good: a newer generation of it runs
/// elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// The site that holds the newer generation.
    pub by_site: [u8; 32],
    /// That generation.
    pub generation: u32,
    /// When this site learnt of it (ns since the epoch).
    pub at_ns: u64,
    pub reason: String,
}

/// Which failover made a machine what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverKind {
    /// Run at the primary: writes stopped, everything shipped, zero loss.
    Planned,
    /// Run at the target: the source is lost, promoted at a chosen point.
    Unplanned,
    /// An isolated writable copy of a point; replication goes on.
    Test,
}

impl FailoverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverKind::Planned => "planned",
            FailoverKind::Unplanned => "unplanned",
            FailoverKind::Test => "test",
        }
    }
}

/// A machine whose parents are a replica at a point (a promoted machine before its
/// fold, a test copy): no parent image files, nothing copied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    /// The replica of this site (`SITE/replicas/<replica>`).
    pub replica: String,
    /// The point's LSN: the machine's journal starts after it.
    pub lsn: u64,
    /// The point's time at the source (ns since the epoch).
    pub time_ns: u64,
}

/// A promotion not committed yet: the machine is `commit-pending`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub kind: FailoverKind,
    /// The replica's generation before the promotion (cancel restores it).
    pub from_generation: u32,
    /// The site the machine was replicated from.
    pub source_site: [u8; 32],
    /// When the failover started (ns since the epoch).
    pub started_ns: u64,
}

/// A planned failover under way at the primary: writes are fenced until it ends; a
/// primary that restarts with one asks the target how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// The target's site ID and address.
    pub target_site: [u8; 32],
    pub target: String,
    /// The generation the target is asked to promote to.
    pub generation: u32,
    /// The job that runs it.
    pub job: String,
    pub started_ns: u64,
}

/// A machine's state as status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Unprotected,
    InitialReplication,
    Protected,
    ResyncRequired,
    Resyncing,
    CommitPending,
    FailedOver,
    TestFailover,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Unprotected => "unprotected",
            State::InitialReplication => "initial-replication",
            State::Protected => "protected",
            State::ResyncRequired => "resync-required",
            State::Resyncing => "resyncing",
            State::CommitPending => "commit-pending",
            State::FailedOver => "failed-over",
            State::TestFailover => "test-failover",
        }
    }
}

/// Healthy, or what kind of attention the machine needs (always with a reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    Healthy,
    Warning,
    Critical,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(Role, State, Health, FailoverKind);
