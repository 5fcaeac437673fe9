//! What `replog status` shows for each machine: state, health with a reason, lag,
//! journal size, progress, last point. A running `serve` writes it to
//! `SITE/status.json` every second; `replog status` reads that file while `serve`
//! holds the site, and works it out from the files otherwise.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineStatus {
    pub name: String,
    pub role: String,
    pub state: String,
    pub health: String,
    pub reason: String,
    pub lag_seconds: Option<f64>,
    pub journal_bytes: u64,
    pub progress: Option<f64>,
    pub last_point: Option<PointRef>,
    pub target: Option<String>,
    pub acked_lsn: Option<u64>,
    pub last_lsn: u64,
    /// A resync under way or last finished: chunks compared of all, chunks and bytes
    /// sent.
    #[serde(default)]
    pub resync: Option<ResyncCounters>,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteStatus {
    pub site: String,
    pub machines: Vec<MachineStatus>,
    /// When this status was taken (ns since the epoch): everything that happened before
    /// it is reflected in it.
    #[serde(default)]
    pub as_of_ns: u64,
}

pub const STATUS_FILE: &str = "status.json";
