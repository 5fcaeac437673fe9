//! A machine's replication relationship, `SITE/machines/<m>/relationship.toml`:
//!
//! ```text
//! # replog relationship, format 2
//! target = "10.0.0.2:7000"
//! target_id = "<the target site's ID, 64 hex digits>"
//! retention = "24h"          # optional: keep every recovery point this long
//! app_retention = "72h"      # optional: keep app-consistent points this long
//! rpo = "30s"                # optional: lag beyond it is Warning, beyond twice Critical
//! bandwidth = "50MiB/s"      # optional: what shipping may send
//! bandwidth_schedule = "Mon-Fri 08:00-18:00=10MiB/s, *=unlimited"   # optional
//! paused = true              # optional: `replog pause`; nothing ships until `replog resume`
//! ```
//!
//! Format 2 added `rpo`, `bandwidth` and `bandwidth_schedule`, format 3 `paused`;
//! older files are read the same (they have none of them). A file is written as the
//! oldest format that holds what it says (format 3 only while paused), so a build
//! that predates a key it does not use still reads the file.
//!
//! Written atomically by `replog protect` (a running `serve` picks it up within a
//! second), `replog bandwidth` (its next shipping pass) and `replog pause` / `resume`
//! (through a running serve, under the machine's lock, or offline).

use crate::error::{Error, Result};
use crate::identity::SiteId;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const FILE: &str = "relationship.toml";
/// How long a target keeps every recovery point unless the relationship says: 24 h.
pub const DEFAULT_RETENTION_MS: u64 = 24 * 3600 * 1000;
/// How long it keeps app-consistent points: 72 h.
pub const DEFAULT_APP_RETENTION_MS: u64 = 72 * 3600 * 1000;
const MAGIC: &str = "# replog relationship, format ";
/// The newest format this build reads (and writes, when the file needs it).
pub const FORMAT: u32 = 3;

/// `Default` is no relationship anyone can use (no target): a base for struct
/// updates that name the target and its ID.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relationship {
    pub target: String,
    pub target_id: String,
    /// How long the target keeps every recovery point (humantime; default 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
    /// How long the target keeps app-consistent points (default 72h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_retention: Option<String>,
    /// The recovery point objective (humantime): lag beyond it is a Warning, beyond
    /// twice it Critical (Azure Site Recovery's RPO threshold). None: no alert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo: Option<String>,
    /// The most the sender sends per second (`50MiB/s`; default unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<String>,
    /// Rates by local time over `bandwidth` (`Mon-Fri 08:00-18:00=10MiB/s,
    /// *=unlimited`; see `replication::bandwidth`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_schedule: Option<String>,
    /// An operator paused shipping (`replog pause`): a serve ships nothing of the
    /// machine, initial copy and resync included, until `replog resume`; its journal
    /// is kept (and grows) meanwhile.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

/// Parse a retention such as "24h" or "90s" into milliseconds.
pub fn parse_retention(what: &str, text: &str) -> Result<u64> {
    let d = humantime::parse_duration(text).map_err(|e| {
        Error::InvalidInput(format!("{what} {text:?}: {e} (use e.g. 24h, 90m, 30s)"))
    })?;
    let ms = d.as_millis();
    if ms == 0 || ms > u128::from(u64::MAX / 1_000_000) {
        return Err(Error::InvalidInput(format!(
            "{what} {text:?} is out of range"
        )));
    }
    Ok(ms as u64)
}

fn path(site: &Path, machine: &str) -> Result<PathBuf> {
    crate::names::validate_name("machine", machine)?;
    Ok(site
        .join(crate::site::MACHINES_DIR)
        .join(machine)
        .join(FILE))
}

impl Relationship {
    pub fn target_id(&self) -> Result<SiteId> {
        SiteId::parse(&self.target_id)
    }

    /// The bandwidth limit's settings.
    pub fn bandwidth(&self) -> Result<crate::replication::bandwidth::Settings> {
        use crate::replication::bandwidth::{parse_rate, Schedule, Settings};
        Ok(Settings {
            base: match &self.bandwidth {
                Some(r) => parse_rate(r)?,
                None => None,
            },
            schedule: self
                .bandwidth_schedule
                .as_deref()
                .map(Schedule::parse)
                .transpose()?,
        })
    }

    /// The RPO in seconds, if one is set (and parses).
    pub fn rpo_seconds(&self) -> Option<f64> {
        let t = self.rpo.as_deref()?;
        parse_retention("rpo", t).ok().map(|ms| ms as f64 / 1000.0)
    }

    /// (every point, app-consistent points) retention in milliseconds.
    pub fn retention_ms(&self) -> Result<(u64, u64)> {
        let w = match &self.retention {
            Some(t) => parse_retention("retention", t)?,
            None => DEFAULT_RETENTION_MS,
        };
        let a = match &self.app_retention {
            Some(t) => parse_retention("app_retention", t)?,
            None => DEFAULT_APP_RETENTION_MS,
        };
        Ok((w, a.max(w)))
    }

    /// The relationship of `machine`, if it is protected.
    pub fn load(site: &Path, machine: &str) -> Result<Option<Relationship>> {
        let p = path(site, machine)?;
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io("read", &p, e))?;
        match Self::parse(&p, &text) {
            Ok(r) => Ok(Some(r)),
            Err(mut problems) => Err(problems.swap_remove(0)),
        }
    }

    /// Every problem of the relationship file `text` (at `path`), each located (file,
    /// line, key); empty when it is good.
    pub fn problems(path: &Path, text: &str) -> Vec<Error> {
        Self::parse(path, text).err().unwrap_or_default()
    }

    /// The relationship in `text` (at `path`), or every problem of it, located (at
    /// least one).
    fn parse(path: &Path, text: &str) -> std::result::Result<Relationship, Vec<Error>> {
        crate::config::read_format(path, text, MAGIC, FORMAT).map_err(|e| vec![e])?;
        let at = crate::config::TomlAt { file: path, text };
        let r: Relationship = toml::from_str(text).map_err(|e| vec![at.parse_error(&e)])?;
        let mut out = Vec::new();
        let port_ok = r
            .target
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            out.push(at.value_error("target", &format!("{:?} is not HOST:PORT", r.target)));
        }
        if let Err(e) = r.target_id() {
            out.push(at.value_error("target_id", &e.to_string()));
        }
        if let Some(b) = &r.bandwidth {
            if let Err(e) = crate::replication::bandwidth::parse_rate(b) {
                out.push(at.value_error("bandwidth", &e.to_string()));
            }
        }
        if let Some(s) = &r.bandwidth_schedule {
            if let Err(e) = crate::replication::bandwidth::Schedule::parse(s) {
                out.push(at.value_error("bandwidth_schedule", &e.to_string()));
            }
        }
        for (key, v) in [
            ("retention", &r.retention),
            ("app_retention", &r.app_retention),
            ("rpo", &r.rpo),
        ] {
            if let Some(t) = v {
                if let Err(e) = parse_retention(key, t) {
                    out.push(at.value_error(key, &e.to_string()));
                }
            }
        }
        if out.is_empty() {
            Ok(r)
        } else {
            Err(out)
        }
    }

    /// Where `machine`'s relationship file is.
    pub fn path_of(site: &Path, machine: &str) -> Result<PathBuf> {
        path(site, machine)
    }

    /// The file's text, as `save` writes it (format line first: the oldest format
    /// that holds every key it has).
    pub fn to_toml(&self) -> Result<String> {
        let body = toml::to_string(self).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let format = if self.paused { 3 } else { 2 };
        Ok(format!("{MAGIC}{format}\n{body}"))
    }

    /// Change `machine`'s relationship in place with `f` (None: not protected, `f` not
    /// called). Read, changed and written under an flock on `relationship.toml.lock`
    /// beside it, so two changes of different keys (`replog bandwidth`, `replog
    /// pause`) never lose one another.
    pub fn update<T>(
        site: &Path,
        machine: &str,
        f: impl FnOnce(&mut Relationship) -> Result<T>,
    ) -> Result<Option<T>> {
        let p = path(site, machine)?;
        if !p.exists() {
            return Ok(None);
        }
        let lock_path = p.with_extension("toml.lock");
        let _lock = crate::storage::Storage::lock(&crate::storage::FileStorage, &lock_path, true)?;
        let Some(mut rel) = Self::load(site, machine)? else {
            return Ok(None);
        };
        let before = rel.clone();
        let out = f(&mut rel)?;
        if rel != before {
            rel.save(site, machine)?;
        }
        Ok(Some(out))
    }

    pub fn save(&self, site: &Path, machine: &str) -> Result<()> {
        crate::storage::write_atomic(
            &crate::storage::FileStorage,
            &path(site, machine)?,
            self.to_toml()?.as_bytes(),
        )
    }
}

/// `SITE/machines/<m>/copied.toml`, the copy mark: the relationship (the target's
/// ID, the machine's generation) whose initial copy a shipping pass saw complete at
/// the target:
///
/// ```text
/// # replog copy mark, format 1
/// target_id = "<the target site's ID>"
/// generation = 3
/// ```
///
/// A loop that has not reached its target since it started (paused, or the target
/// unreachable) reads it to know that the journal it keeps is a delta over a
/// complete copy: past the resync threshold a resync is then required and the
/// journal merged, as in a loop that has shipped. A mark of another target or
/// generation (a relationship since replaced) says nothing. Older builds do not read
/// it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyMark {
    pub target_id: String,
    pub generation: u32,
}

const COPY_FILE: &str = "copied.toml";
const COPY_MAGIC: &str = "# replog copy mark, format ";
const COPY_FORMAT: u32 = 1;

impl CopyMark {
    fn path(site: &Path, machine: &str) -> Result<PathBuf> {
        Ok(path(site, machine)?.with_file_name(COPY_FILE))
    }

    /// Whether the mark says the initial copy toward `rel`'s target is complete for
    /// `generation` (a missing or unreadable mark: no, and the latter is logged).
    pub fn holds(site: &Path, machine: &str, rel: &Relationship, generation: u32) -> bool {
        let want = CopyMark {
            target_id: rel.target_id.clone(),
            generation,
        };
        match Self::load(site, machine) {
            Ok(m) => m.as_ref() == Some(&want),
            Err(e) => {
                tracing::warn!(machine, "{e}");
                false
            }
        }
    }

    pub fn load(site: &Path, machine: &str) -> Result<Option<CopyMark>> {
        let p = Self::path(site, machine)?;
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", &p, e)),
        };
        crate::config::read_format(&p, &text, COPY_MAGIC, COPY_FORMAT)?;
        let at = crate::config::TomlAt {
            file: &p,
            text: &text,
        };
        toml::from_str(&text)
            .map(Some)
            .map_err(|e| at.parse_error(&e))
    }

    /// Record that the initial copy toward `rel`'s target is complete for
    /// `generation` (atomically; nothing is written if the mark says so already; a
    /// mark of a newer format is left alone, as the error says; a damaged one is
    /// written over).
    pub fn record(site: &Path, machine: &str, rel: &Relationship, generation: u32) -> Result<()> {
        let mark = CopyMark {
            target_id: rel.target_id.clone(),
            generation,
        };
        match Self::load(site, machine) {
            Ok(Some(m)) if m == mark => return Ok(()),
            // Written by a newer build: left alone.
            Err(e @ Error::Unsupported { .. }) => return Err(e),
            // Absent, of another relationship, or damaged: written (again).
            _ => {}
        }
        let body = toml::to_string(&mark).map_err(|e| Error::InvalidInput(e.to_string()))?;
        crate::storage::write_atomic(
            &crate::storage::FileStorage,
            &Self::path(site, machine)?,
            format!("{COPY_MAGIC}{COPY_FORMAT}\n{body}").as_bytes(),
        )
    }

    /// Remove the mark (the target said its copy is not complete), durably.
    pub fn clear(site: &Path, machine: &str) -> Result<()> {
        let p = Self::path(site, machine)?;
        let dir = p.parent().unwrap_or(site);
        crate::storage::remove_durably(&crate::storage::FileStorage, dir, &[COPY_FILE])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Two writers changing different keys at once (`replog bandwidth`, `replog
    /// pause`) never lose one another's change.
    #[test]
    fn concurrent_updates_of_different_keys_keep_both() {
        let site = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(site.path().join("machines/vm1")).unwrap();
        Relationship {
            target: "b:7000".into(),
            target_id: "ab".repeat(32),
            ..Default::default()
        }
        .save(site.path(), "vm1")
        .unwrap();
        // Each writer counts in its key: a change lost to the other shows as a count
        // short of the rounds.
        let count = |v: &Option<String>, unit: &str| -> u32 {
            v.as_deref()
                .and_then(|t| t.strip_suffix(unit))
                .map_or(0, |n| n.parse().unwrap())
        };
        let rounds = 300;
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..rounds {
                    Relationship::update(site.path(), "vm1", |r| {
                        r.rpo = Some(format!("{}s", count(&r.rpo, "s") + 1));
                        r.paused = !r.paused;
                        Ok(())
                    })
                    .unwrap();
                }
            });
            s.spawn(|| {
                for _ in 0..rounds {
                    Relationship::update(site.path(), "vm1", |r| {
                        r.bandwidth = Some(format!("{}MiB/s", count(&r.bandwidth, "MiB/s") + 1));
                        Ok(())
                    })
                    .unwrap();
                }
            });
        });
        let r = Relationship::load(site.path(), "vm1").unwrap().unwrap();
        assert_eq!(count(&r.rpo, "s"), rounds, "{r:?}");
        assert_eq!(count(&r.bandwidth, "MiB/s"), rounds, "{r:?}");
        assert!(!r.paused, "{r:?}");
        // Not protected: f is not called.
        let none = Relationship::update(site.path(), "vm2", |_| -> Result<()> { panic!("called") });
        assert!(matches!(none, Ok(None)), "{none:?}");
    }
}
