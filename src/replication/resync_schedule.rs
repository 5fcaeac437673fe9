//! Resynchronisation at the source: when it is needed, when it may run, and what an
//! interrupted one had chosen.
//!
//! `SITE/machines/<m>/resync.toml` says a resync is required (and why) and, once one
//! has started, its base (the LSN and segment after which the chain continues) and
//! chunk size, so a `serve` restarted mid-resync resumes the same one. Its position and
//! counters live at the target (`replica::resync_apply`). `replog resync SITE MACHINE --now`
//! leaves `resync.now` next to it: the next pass starts at once, window or not.
//!
//! Triggers (see `run.rs`): the target reports a broken chain or a diverged replica;
//! unshipped journal reaches `replication.resync_threshold_percent` of the machine's
//! disk size (the hold is then let go, so the compactor keeps the journal bounded);
//! the source's history is behind the target's; a disk changed while replog was not
//! running (`Machine::changed_offline`).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Bytes of disk compared per batch (one round trip, one persisted position).
pub const BATCH_BYTES: u64 = 64 << 20;

const FILE: &str = "resync.toml";
/// The first line of `resync.toml` since format 2 (format 1 had no header line; its
/// fields were the same, and it is read as they are).
const HEADER: &str = "# replog resync state, format 2";
const NOW: &str = "resync.now";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceResync {
    /// Why a resync is required (for status).
    pub reason: String,
    /// Chosen when the resync starts: (LSN, segment).
    pub base: Option<(u64, u64)>,
    pub chunk_bytes: u64,
}

fn dir(site: &Path, machine: &str) -> Result<PathBuf> {
    crate::names::validate_name("machine", machine)?;
    Ok(site.join(crate::site::MACHINES_DIR).join(machine))
}

impl SourceResync {
    pub fn load(site: &Path, machine: &str) -> Result<Option<SourceResync>> {
        let p = dir(site, machine)?.join(FILE);
        match std::fs::read_to_string(&p) {
            Ok(t) => {
                if t.starts_with("# replog resync state") && !t.starts_with(HEADER) {
                    return Err(Error::Unsupported {
                        path: p,
                        what: format!(
                            "{:?}: this build reads resync state formats 1 and 2",
                            t.lines().next().unwrap_or("")
                        ),
                    });
                }
                toml::from_str(&t)
                    .map(Some)
                    .map_err(|e| Error::InvalidInput(format!("{}: {e}", p.display())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", &p, e)),
        }
    }

    pub fn save(&self, site: &Path, machine: &str) -> Result<()> {
        let p = dir(site, machine)?.join(FILE);
        let body = toml::to_string(self).map_err(|e| Error::InvalidInput(e.to_string()))?;
        crate::storage::write_atomic(
            &crate::storage::FileStorage,
            &p,
            format!("{HEADER}\n{body}").as_bytes(),
        )
    }

    /// Record that a resync is required (keeping a base already chosen).
    pub fn require(site: &Path, machine: &str, reason: &str) -> Result<()> {
        let mut s = Self::load(site, machine)?.unwrap_or_default();
        if s.reason != reason {
            s.reason = reason.to_string();
            s.save(site, machine)?;
        }
        Ok(())
    }

    pub fn clear(site: &Path, machine: &str) -> Result<()> {
        let d = dir(site, machine)?;
        crate::storage::remove_durably(&crate::storage::FileStorage, &d, &[FILE, NOW])
    }
}

/// Ask for a resync of `machine` now (`replog resync --now`).
pub fn request_now(site: &Path, machine: &str) -> Result<()> {
    let d = dir(site, machine)?;
    if !d.join(crate::volume::MANIFEST_FILE).exists() {
        return Err(Error::NotFound(format!(
            "site {} has no machine {machine}",
            site.display()
        )));
    }
    crate::storage::write_atomic(&crate::storage::FileStorage, &d.join(NOW), b"now\n")
}

/// Whether `replog resync --now` asked for one.
pub fn requested_now(site: &Path, machine: &str) -> bool {
    dir(site, machine).is_ok_and(|d| d.join(NOW).exists())
}

/// When resyncs may start by themselves: local hours `from..to` (wrapping past
/// midnight, e.g. 18..8) every day, and all day on Saturdays and Sundays if
/// `weekends`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from_hour: u32,
    pub to_hour: u32,
    pub weekends: bool,
}

impl Window {
    /// Parse "HH:MM-HH:MM" (minutes must be 00) or "always" / "never".
    pub fn parse(text: &str, weekends: bool) -> Result<Window> {
        match text {
            "always" => {
                return Ok(Window {
                    from_hour: 0,
                    to_hour: 24,
                    weekends,
                })
            }
            "never" => {
                return Ok(Window {
                    from_hour: 0,
                    to_hour: 0,
                    weekends: false,
                })
            }
            _ => {}
        }
        let bad = || {
            Error::InvalidInput(format!(
                "resync window {text:?}: use HH:00-HH:00 (local time), \"always\" or \"never\""
            ))
        };
        let (a, b) = text.split_once('-').ok_or_else(bad)?;
        let hour = |t: &str| -> Result<u32> {
            let (h, m) = t.trim().split_once(':').ok_or_else(bad)?;
            let h: u32 = h.parse().map_err(|_| bad())?;
            if m != "00" || h > 24 {
                return Err(bad());
            }
            Ok(h)
        };
        Ok(Window {
            from_hour: hour(a)?,
            to_hour: hour(b)?,
            weekends,
        })
    }

    /// Whether local `hour` (0-23) on weekday `wday` (0 = Sunday) is inside.
    pub fn contains(&self, wday: u32, hour: u32) -> bool {
        if self.weekends && (wday == 0 || wday == 6) {
            return true;
        }
        if self.from_hour <= self.to_hour {
            hour >= self.from_hour && hour < self.to_hour
        } else {
            hour >= self.from_hour || hour < self.to_hour
        }
    }

    /// Whether now, in local time, is inside.
    pub fn open_now(&self) -> bool {
        let (wday, minute) = local_now();
        self.contains(wday, minute / 60)
    }
}

/// (weekday, minute of the day) now, local time (Sunday is 0). Also what bandwidth
/// schedules are read against.
pub(crate) fn local_now() -> (u32, u32) {
    // SAFETY: time/localtime_r fill plain structs we own.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return (1, 12 * 60);
        }
        (tm.tm_wday as u32, (tm.tm_hour * 60 + tm.tm_min) as u32)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn windows_wrap_midnight_and_cover_weekends() {
        let w = Window::parse("18:00-08:00", true).unwrap();
        assert!(w.contains(3, 19) && w.contains(3, 2) && !w.contains(3, 12));
        assert!(w.contains(0, 12) && w.contains(6, 12));
        let office = Window::parse("09:00-17:00", false).unwrap();
        assert!(office.contains(2, 9) && !office.contains(2, 17) && !office.contains(0, 3));
        assert!(Window::parse("always", false).unwrap().contains(2, 13));
        assert!(!Window::parse("never", false).unwrap().contains(0, 13));
        for bad in ["", "18-08", "18:30-08:00", "25:00-01:00", "x"] {
            assert!(Window::parse(bad, true).is_err(), "{bad}");
        }
    }
}
