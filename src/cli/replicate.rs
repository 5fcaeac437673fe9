//! `replog protect`, `replog restore`.

use replog::identity;

use replog::jobs::{JobHandle, JobKind};
use replog::replica::store::Replicas;
use replog::replication::protocol::Message;
use replog::replication::relationship::Relationship;
use replog::replication::shipper::Link;
use replog::{Error, Result, Site};
use std::path::Path;

/// `replog protect`'s settings of the relationship beyond its target.
pub struct Settings<'a> {
    pub retention: &'a str,
    pub app_retention: &'a str,
    pub rpo: Option<&'a str>,
    pub bandwidth: Option<&'a str>,
    pub bandwidth_schedule: Option<&'a str>,
}

impl Settings<'_> {
    /// Every flag checked, each error naming its flag, before anything is tried.
    fn check(&self) -> Result<()> {
        use replog::replication::relationship::parse_retention;
        if let Some(r) = self.rpo {
            parse_retention("--rpo", r)?;
        }
        if let Some(b) = self.bandwidth {
            replog::replication::bandwidth::parse_rate(b)?;
        }
        if let Some(s) = self.bandwidth_schedule {
            replog::replication::bandwidth::Schedule::parse(s)?;
        }
        let every = parse_retention("--retention", self.retention)?;
        let app = parse_retention("--app-retention", self.app_retention)?;
        if app < every {
            return Err(Error::InvalidInput(format!(
                "--app-retention {} is shorter than --retention {}",
                self.app_retention, self.retention
            )));
        }
        Ok(())
    }

    /// The relationship toward `target` (site `target_id`) with these settings.
    fn relationship(&self, target: &str, target_id: String) -> Relationship {
        Relationship {
            target: target.to_string(),
            target_id,
            retention: Some(self.retention.to_string()),
            app_retention: Some(self.app_retention.to_string()),
            rpo: self.rpo.map(str::to_string),
            bandwidth: self.bandwidth.map(str::to_string),
            bandwidth_schedule: self.bandwidth_schedule.map(str::to_string),
            paused: false,
        }
    }
}

pub fn protect(site: &Path, machine: &str, target: &str, settings: Settings<'_>) -> Result<()> {
    Site::read_config(site)?;
    settings.check()?;
    let dir = site.join(replog::site::MACHINES_DIR).join(machine);
    replog::names::validate_name("machine", machine)?;
    let storage = replog::storage::FileStorage;
    let manifest = replog::Machine::read_manifest(&storage, &dir).map_err(|_| {
        Error::NotFound(format!("site {} has no machine {machine}", site.display()))
    })?;
    if let Some(r) = Relationship::load(site, machine)? {
        return Err(Error::AlreadyExists(format!(
            "{machine} is already protected toward {}",
            r.target
        )));
    }
    let me = identity::Identity::load(site)?.id();
    // From here on it is a job: each check a step, the end state verified.
    let mut job = JobHandle::start(site, JobKind::Protect, Some(machine))?;
    let done = protect_steps(&mut job, site, machine, target, &settings, &manifest, me);
    match done {
        Ok((detail, rel)) => {
            let serve_runs = replog::control::serve_running(site);
            let finished = job.finish(|| {
                match Relationship::load(site, machine)? {
                    Some(back) if back == rel => {}
                    _ => {
                        return Err(Error::InvalidInput(
                            "the relationship does not read back as recorded".into(),
                        ))
                    }
                }
                Ok(if serve_runs {
                    "the relationship reads back; the running serve is shipping".into()
                } else {
                    "the relationship reads back; shipping starts with `replog serve`".into()
                })
            })?;
            println!("{detail} (job {})", finished.id);
            Ok(())
        }
        Err(e) => {
            job.fail(&e);
            Err(e)
        }
    }
}

/// What went wrong reaching a target, said for the person at the keyboard; decided
/// by kind.
fn explain_link(site: &Path, target: &str, me: identity::SiteId, e: Error) -> Error {
    match e {
        Error::Auth { why, .. } if why.contains(&me.to_string()) => {
            Error::InvalidInput(format!("{target} is this site ({me}): choose another site"))
        }
        Error::Auth {
            why, by_peer: true, ..
        } => Error::InvalidInput(format!(
            "the target at {target} refused this site ({why}); run `replog trust <target \
             site> {me}` there"
        )),
        Error::Auth { why, .. } => Error::InvalidInput(format!(
            "this site does not trust the target at {target} ({why}); run `replog trust {} \
             <the target's ID>` here (the target prints its ID with `replog id`)",
            site.display()
        )),
        Error::Net { source, .. } => {
            Error::InvalidInput(format!("the target at {target} is not reachable: {source}"))
        }
        other => other,
    }
}

/// `replog reprotect`: replicate a promoted, committed machine toward `target` — its
/// old primary (only what differs travels) or any other site (a full copy). The
/// checks and the relationship are this command's steps; serve's shipping loop goes
/// on with the job (seed, delta, orphan kept, caught up), which this command waits
/// for when serve runs and `wait`.
pub fn reprotect(
    site: &Path,
    machine: &str,
    target: &str,
    settings: Settings<'_>,
    wait: bool,
) -> Result<()> {
    Site::read_config(site)?;
    settings.check()?;
    replog::names::validate_name("machine", machine)?;
    let dir = site.join(replog::site::MACHINES_DIR).join(machine);
    let storage = replog::storage::FileStorage;
    let manifest = replog::Machine::read_manifest(&storage, &dir).map_err(|_| {
        Error::NotFound(format!("site {} has no machine {machine}", site.display()))
    })?;
    if manifest.fence.is_some() {
        return Err(Error::InvalidInput(format!(
            "{machine} was failed over away from this site (it is fenced here): reprotect it \
             where it was promoted"
        )));
    }
    if manifest.pending.is_some() || manifest.base.is_some() {
        return Err(Error::InvalidInput(format!(
            "{machine}'s failover is not committed: run `replog commit {} {machine}` first",
            site.display()
        )));
    }
    if manifest.role != replog::protection::Role::Primary {
        return Err(Error::InvalidInput(format!(
            "{machine} is a {} here, not a primary",
            manifest.role
        )));
    }
    if let Some(r) = Relationship::load(site, machine)? {
        return Err(Error::AlreadyExists(format!(
            "{machine} is already protected toward {}",
            r.target
        )));
    }
    let me = identity::Identity::load(site)?.id();
    let mut job = JobHandle::start(site, JobKind::Reprotect, Some(machine))?;
    let steps = (|| -> Result<Relationship> {
        let explain = |e: Error| explain_link(site, target, me, e);
        job.step(&format!(
            "reach the target at {target} (mutual TLS, both sites trusted)"
        ));
        let mut link = Link::connect(site, target).map_err(explain)?;
        let peer = link.peer_id();
        if peer == me {
            return Err(Error::InvalidInput(format!(
                "{target} is this site ({me}): choose another site"
            )));
        }
        if link.peer_features() & replog::replication::protocol::FEATURE_REPROTECT == 0 {
            return Err(Error::InvalidInput(format!(
                "the target at {target} runs a replog that cannot reprotect (no reprotect feature)"
            )));
        }
        job.progress(format!("target site {peer}"));
        job.step("check what the target holds of the machine");
        let map = replog::volume::ChangedMap::load(&storage, &dir)?;
        let w = replog::Machine::read_watermark(&storage, &dir)?;
        link.send(&Message::Reprotect {
            machine: machine.to_string(),
            machine_id: manifest.machine_id,
            generation: manifest.generation,
            since: map.as_ref().map_or(0, |m| m.since),
            foreign_upto: map.as_ref().and_then(|m| m.foreign_upto),
            disks: manifest
                .disks
                .iter()
                .map(|d| (d.name.clone(), d.size))
                .collect(),
            base_lsn: w.lsn,
            base_seq: w.segment_seq,
            probe: true,
        })
        .map_err(explain)?;
        use replog::replication::protocol::{Held, RefusalCode};
        let held = match link.recv() {
            Ok(Message::ReprotectState {
                held, generation, ..
            }) => (held, generation),
            Ok(other) => return Err(link.unexpected("ReprotectState", &other)),
            Err(Error::Refused {
                code: RefusalCode::Fenced,
                message,
                ..
            }) => {
                return Err(Error::InvalidInput(format!(
                    "the target at {target} holds a newer generation of {machine} than this \
                     site's {} ({message}): replicating toward it would be split brain",
                    manifest.generation
                )))
            }
            Err(e) => return Err(explain(e)),
        };
        job.progress(match held {
            (Held::Nothing, _) => format!(
                "it holds no copy of {machine}: an alternate location, the initial replication \
                 copies every disk"
            ),
            (Held::OldPrimary, g) => format!(
                "it holds generation {g} of {machine} (the old primary): it becomes the replica, \
                 only what differs travels{}",
                if map.is_none() {
                    "; this machine keeps no changed-block map, so chunk checksums decide"
                } else {
                    ""
                }
            ),
            (_, g) => format!("it holds a replica of {machine} at generation {g}"),
        });
        if map.is_none() && held.0 == Held::OldPrimary {
            // Without a map only a resync can tell what differs: start one with a
            // fresh map (empty) so the copy is seeded, then compared.
            replog::volume::ChangedMap::new(w.lsn, None, manifest.disks.len())
                .save(&storage, &dir)?;
            replog::replication::resync_schedule::SourceResync::require(
                site,
                machine,
                "reprotect without a changed-block map: compare every chunk",
            )?;
            replog::replication::resync_schedule::request_now(site, machine)?;
        }
        job.step("record the relationship");
        let relationship = settings.relationship(target, peer.to_string());
        // serve's shipping loop goes on with this job.
        job.hand_over()?;
        replog::control::run(
            site,
            &replog::control::Request::Protect {
                machine: machine.to_string(),
                relationship: relationship.clone(),
            },
        )?;
        Ok(relationship)
    })();
    if let Err(e) = steps {
        job.fail(&e);
        return Err(e);
    }
    let id = job.id().to_string();
    drop(job);
    if !wait || !replog::control::serve_running(site) {
        println!(
            "{machine}: relationship toward {target} recorded; the reprotect goes on {} (job {id})",
            if replog::control::serve_running(site) {
                "in serve"
            } else {
                "when `replog serve` starts"
            }
        );
        return Ok(());
    }
    wait_for_job(site, &id)
}

/// Wait for job `id` (run by serve) to end, showing its newest step on a terminal;
/// Ok only when it succeeded.
fn wait_for_job(site: &Path, id: &str) -> Result<()> {
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(std::time::Duration::from_millis(200));
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    loop {
        let j = replog::jobs::get(site, id)?;
        if let Some(s) = j.steps.last() {
            bar.set_message(format!(
                "{}: {}",
                s.name,
                s.detail.clone().unwrap_or_default()
            ));
        }
        if j.state.ended() {
            bar.finish_and_clear();
            for s in &j.steps {
                println!("{}: {}", s.name, s.detail.clone().unwrap_or_default());
            }
            return if j.state == replog::jobs::JobState::Succeeded {
                println!("reprotected (job {id})");
                Ok(())
            } else {
                Err(Error::InvalidInput(format!(
                    "the reprotect failed: {} (job {id})",
                    j.error.unwrap_or_default()
                )))
            };
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The steps of `replog protect` once its arguments are good: reach and greet the
/// target, check its room, record the relationship (through the running serve, which
/// starts shipping, or offline).
#[allow(clippy::too_many_arguments)]
fn protect_steps(
    job: &mut JobHandle,
    site: &Path,
    machine: &str,
    target: &str,
    settings: &Settings<'_>,
    manifest: &replog::format::meta::Manifest,
    me: identity::SiteId,
) -> Result<(String, Relationship)> {
    let dir = site.join(replog::site::MACHINES_DIR).join(machine);
    let explain = |e: Error| explain_link(site, target, me, e);
    job.step(&format!(
        "reach the target at {target} (mutual TLS, both sites trusted)"
    ));
    let mut link = Link::connect(site, target).map_err(explain)?;
    let peer = link.peer_id();
    job.progress(format!("target site {peer}"));
    job.step("check the room at the target");
    link.send(&Message::Probe).map_err(explain)?;
    let free = match link.recv().map_err(explain)? {
        Message::Room { free_bytes } => free_bytes,
        other => return Err(link.unexpected("Room", &other)),
    };
    // Room for the data the disks hold now (holes and zeros are not sent) plus the
    // journal.
    let mut need = 0u64;
    for d in &manifest.disks {
        let img = dir.join("disks").join(format!("{}.img", d.name));
        need += std::os::unix::fs::MetadataExt::blocks(
            &std::fs::metadata(&img).map_err(|e| Error::io("stat", &img, e))?,
        ) * 512;
    }
    if free < need {
        return Err(Error::InvalidInput(format!(
            "the target has {free} bytes free; {machine} needs at least {need}"
        )));
    }
    job.progress(format!("{free} bytes free, {need} needed"));
    job.step("record the relationship");
    let relationship = settings.relationship(target, peer.to_string());
    let reply = replog::control::run(
        site,
        &replog::control::Request::Protect {
            machine: machine.to_string(),
            relationship: relationship.clone(),
        },
    )?;
    Ok((
        format!("{} (target site {peer})", reply.detail.unwrap_or_default()),
        relationship,
    ))
}

pub fn restore(site: &Path, machine: &str, at: &str, out: &Path, json: bool) -> Result<()> {
    if at.starts_with("orphan-") {
        return restore_orphan(site, machine, at, out, json);
    }
    let store = Replicas::local(site)?.open_readonly(machine)?;
    // Resolve and pin the point before anything is written to OUT.
    let image = replog::replica::replay::PointImage::open(store, at)?;
    let mut job = JobHandle::start(site, JobKind::Restore, Some(machine))?;
    job.step(&format!(
        "open {} (LSN {}) and map every disk",
        image.point().id(),
        image.point().lsn
    ));
    job.step(&format!("write the images into {}", out.display()));
    let bar = if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(1);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "restoring {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    };
    let progress = parking_lot::Mutex::new((job, std::time::Instant::now()));
    let written = replog::replica::restore::restore(&image, out, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
        let mut g = progress.lock();
        if g.1.elapsed() >= std::time::Duration::from_secs(1) {
            g.1 = std::time::Instant::now();
            g.0.progress(format!("{done} of {total} bytes"));
        }
    });
    bar.finish_and_clear();
    let mut job = progress.into_inner().0;
    let r = match written {
        Ok(r) => r,
        Err(e) => {
            job.fail(&e);
            return Err(e);
        }
    };
    job.progress(format!("{} bytes written", r.bytes_written));
    let point = image.point();
    let finished = job.finish(|| {
        Ok(if r.verified {
            format!(
                "every image matches the source's digest at {} (nothing is kept otherwise)",
                point.id()
            )
        } else {
            format!(
                "{} carries no digests (written before protection kept them): every byte \
                 read was authenticated, the images could not be compared with the source",
                point.id()
            )
        })
    })?;
    if json {
        let doc = serde_json::json!({
            "machine": machine,
            "point": point.id(),
            "lsn": r.lsn,
            "time": (point.time_ns > 0).then(|| replog::format::rfc3339(point.time_ns)),
            "images": r.images,
            "bytes": r.bytes_written,
            "verified": r.verified,
            "job": finished.id,
        });
        println!("{doc}");
    } else {
        for p in &r.images {
            println!("{}", p.display());
        }
        println!(
            "restored {machine} at {} (LSN {}) into {}",
            point.id(),
            r.lsn,
            out.display()
        );
        if r.verified {
            println!("every disk matches the source's digest at that point");
        } else {
            println!(
                "warning: this point carries no digests (written before protection kept them); \
                 the images were not verified"
            );
        }
    }
    Ok(())
}

/// Restore an orphan point (the old primary's own last state, kept by a reprotect).
fn restore_orphan(site: &Path, machine: &str, id: &str, out: &Path, json: bool) -> Result<()> {
    let mut job = JobHandle::start(site, JobKind::Restore, Some(machine))?;
    job.step(&format!("write orphan point {id} into {}", out.display()));
    let (images, bytes) = match replog::failover::reprotect::restore_orphan(site, machine, id, out)
    {
        Ok(x) => x,
        Err(e) => {
            job.fail(&e);
            return Err(e);
        }
    };
    let finished = job.finish(|| {
        Ok(format!(
            "{} image(s), {bytes} bytes: the old primary's disks as it left them (an orphan \
             point carries no digests to compare with)",
            images.len()
        ))
    })?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "machine": machine, "point": id, "images": images, "bytes": bytes,
                "verified": false, "job": finished.id,
            })
        );
    } else {
        for p in &images {
            println!("{}", p.display());
        }
        println!(
            "restored {machine} at orphan point {id} into {}",
            out.display()
        );
    }
    Ok(())
}

/// `replog accept-loss`: without `yes`, list what would be given up (nothing
/// changes); with it, give it up through the site's serve (under the receiver's lock
/// on the replica) or offline.
pub fn accept_loss(site: &Path, machine: &str, yes: bool, json: bool) -> Result<()> {
    use replog::replica::resync_apply::{bytes_of, listed_losses, GivenUp};
    replog::site::Site::read_config(site)?;
    if !replog::replica::store::holds_replica(site, machine)? {
        return Err(Error::NotFound(format!(
            "this site holds no replica of {machine}"
        )));
    }
    let (ranges, job): (Vec<GivenUp>, Option<String>) = if yes {
        let reply = replog::control::run(
            site,
            &replog::control::Request::AcceptLoss {
                machine: machine.into(),
            },
        )?;
        (reply.given_up.unwrap_or_default(), reply.job)
    } else {
        let store = Replicas::local(site)?.open_readonly(machine)?;
        (listed_losses(&store)?, None)
    };
    let bytes = bytes_of(&ranges);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "machine": machine,
                "given_up": yes,
                "job": job,
                "bytes": bytes,
                "ranges": ranges,
            })
        );
        return Ok(());
    }
    match &job {
        Some(id) => println!(
            "{machine}: gave up {bytes} bytes in {} range(s) no copy of which was left (job {id}):",
            ranges.len()
        ),
        None => println!(
            "{machine}: the replica lists {bytes} bytes in {} range(s) no copy of which is left:",
            ranges.len()
        ),
    }
    for r in &ranges {
        println!("  {r}");
    }
    if job.is_some() {
        println!(
            "the replica serves them as zeroes (older bytes where a fold stopped); `replog \
             resync SOURCE-SITE {machine} --now` at the source, its serve running, starts \
             its stopped loop again and mends its damage with them"
        );
    } else {
        println!(
            "given up (--yes), the replica serves them as zeroes (older bytes where a fold \
             stopped), and the source's resync writes those over its own copy of every \
             range it asks for — all of them, where its damage was found at open"
        );
    }
    Ok(())
}

/// `replog points --remove ID`: remove an orphan point (only orphans).
pub fn remove_point(site: &Path, machine: &str, id: &str) -> Result<()> {
    replog::failover::reprotect::remove_orphan(site, machine, id)?;
    println!("orphan point {id} of {machine} removed");
    Ok(())
}

pub fn points(site: &Path, machine: &str, json: bool) -> Result<()> {
    let orphans = replog::failover::reprotect::orphans(site, machine)?;
    let replicas = Replicas::local(site)?;
    if !replicas.has(machine) && !orphans.is_empty() {
        return print_points(machine, &[], None, &orphans, json);
    }
    let store = replicas.open_readonly(machine)?;
    let points = replog::replica::points::list(&store)?;
    let resynced = (store.parent().valid_from > 0).then_some(store.parent().valid_from);
    if store.parent().resyncing && !json {
        println!("{machine}: a resynchronisation is under way; no point can be read until it ends");
    }
    print_points(machine, &points, resynced, &orphans, json)
}

fn print_points(
    machine: &str,
    points: &[replog::replica::points::ReplicaPoint],
    resynced: Option<u64>,
    orphans: &[replog::replication::protocol::OrphanReport],
    json: bool,
) -> Result<()> {
    let kind = |p: &replog::replica::points::ReplicaPoint| {
        if p.app_consistent {
            "app-consistent"
        } else {
            "crash-consistent"
        }
    };
    if json {
        let mut list: Vec<_> = points
            .iter()
            .map(|p| {
                serde_json::json!({
                    "id": p.id(),
                    "lsn": p.lsn,
                    "time": replog::format::rfc3339(p.time_ns),
                    "kind": kind(p),
                    "digests": p.digests.is_some(),
                    "plan_point": p.plan_point.map(replog::replica::points::plan_point_id),
                })
            })
            .collect();
        list.extend(orphans.iter().map(|o| {
            serde_json::json!({
                "id": o.id,
                "lsn": o.last_lsn,
                "time": (o.last_ns > 0).then(|| replog::format::rfc3339(o.last_ns)),
                "kind": "orphan",
                "digests": false,
                "first_lsn": o.first_lsn,
                "bytes": o.bytes,
            })
        }));
        println!(
            "{}",
            serde_json::json!({
                "machine": machine,
                "points": list,
                "resynced_before": resynced,
            })
        );
        return Ok(());
    }
    let n = points.len();
    let app = points.iter().filter(|p| p.app_consistent).count();
    println!("{machine}: {n} recovery point(s), {app} app-consistent");
    if let Some(lsn) = resynced {
        println!(
            "  (points before LSN {lsn} were removed by a resynchronisation: the replica \
             cannot be materialised at them any more)"
        );
    }
    let mut hidden = 0usize;
    for (i, p) in points.iter().enumerate() {
        // A long list is summarised for people (the oldest, the newest and every
        // app-consistent point); --json has every point.
        if n > 12 && (5..n - 5).contains(&i) && !p.app_consistent && p.plan_point.is_none() {
            hidden += 1;
            continue;
        }
        if hidden > 0 {
            println!("  … {hidden} more crash-consistent …");
            hidden = 0;
        }
        println!(
            "  {:<12} LSN {:>10}  {}  {}{}",
            p.id(),
            p.lsn,
            replog::format::rfc3339(p.time_ns),
            kind(p),
            p.plan_point
                .map(|id| format!(
                    ", plan point {}",
                    replog::replica::points::plan_point_id(id)
                ))
                .unwrap_or_default()
        );
    }
    for o in orphans {
        println!(
            "  {:<12} LSN {:>10}  {}  orphan (the old primary's own tail: LSN {}..={}, {} bytes; \
             removed only with --remove)",
            o.id,
            o.last_lsn,
            if o.last_ns > 0 {
                replog::format::rfc3339(o.last_ns)
            } else {
                "-".into()
            },
            o.first_lsn,
            o.last_lsn,
            o.bytes
        );
    }
    Ok(())
}

/// `FIFREEZE` / `FITHAW` (`_IOWR('X', 119, int)` / `_IOWR('X', 120, int)`).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// A file system frozen with FIFREEZE; thawed when dropped, whatever happened.
/// SIGINT, SIGTERM and SIGHUP are held back while it is frozen (delivered after the
/// thaw), so Ctrl-C cannot leave it frozen.
pub(super) struct Frozen {
    dir: std::fs::File,
    path: std::path::PathBuf,
    old_mask: libc::sigset_t,
}

impl Frozen {
    pub(super) fn freeze(path: &Path) -> Result<Frozen> {
        let dir = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
        // SAFETY: plain signal-mask calls on locally owned sigset_t values.
        let old_mask = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            old
        };
        use std::os::fd::AsRawFd;
        // SAFETY: FIFREEZE takes an int argument it ignores; the fd is valid.
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, 0) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            // SAFETY: restores the mask saved above.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
            return Err(Error::io("freeze (FIFREEZE)", path, err));
        }
        Ok(Frozen {
            dir,
            path: path.to_path_buf(),
            old_mask,
        })
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as above.
        let rc = unsafe { libc::ioctl(self.dir.as_raw_fd(), FITHAW as _, 0) };
        if rc != 0 {
            eprintln!(
                "replog: thaw (FITHAW) of {} failed: {}; run `fsfreeze -u {}`",
                self.path.display(),
                std::io::Error::last_os_error(),
                self.path.display()
            );
        }
        // SAFETY: restores the mask saved at freeze; held-back signals arrive now.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
    }
}

/// Record a recovery point of MACHINE: through the running serve when there is one,
/// else by opening the site. With `freeze`, the file system mounted there is frozen
/// around it (and always thawed).
pub fn checkpoint(
    site: &Path,
    machine: &str,
    app_consistent: bool,
    freeze: Option<&Path>,
    json: bool,
) -> Result<()> {
    replog::names::validate_name("machine", machine)?;
    Site::read_config(site)?;
    let req = replog::control::Request::Checkpoint {
        machine: machine.to_string(),
        app_consistent,
    };
    let frozen = freeze.map(Frozen::freeze).transpose()?;
    let done = (|| -> Result<(u64, u64)> {
        let reply = replog::control::run(site, &req)?;
        match (reply.lsn, reply.time_ns) {
            (Some(lsn), Some(t)) => Ok((lsn, t)),
            _ => Err(Error::InvalidInput(
                "the checkpoint was not recorded".into(),
            )),
        }
    })();
    drop(frozen); // thaw first, whatever happened
    let (lsn, time_ns) = done?;
    let kind = if app_consistent {
        "app-consistent"
    } else {
        "crash-consistent"
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "machine": machine,
                "id": format!("pt-{lsn}"),
                "lsn": lsn,
                "time": replog::format::rfc3339(time_ns),
                "kind": kind,
            })
        );
    } else {
        println!(
            "{machine}: {kind} point pt-{lsn} at {}{}",
            replog::format::rfc3339(time_ns),
            if freeze.is_some() {
                " (file system frozen around it)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Mark a resync of MACHINE required (and, with `now`, wanted at once); print what
/// the site said (a running serve also says what it did with a stopped loop).
pub fn resync(site: &Path, machine: &str, now: bool) -> Result<()> {
    let reply = replog::control::run(
        site,
        &replog::control::Request::Resync {
            machine: machine.to_string(),
            now,
        },
    )?;
    println!("{}", reply.detail.unwrap_or_default());
    Ok(())
}

/// `replog pause` (`pause`) or `replog resume`: through the running serve, or in the
/// relationship file when none runs; print what the site said.
pub fn pause(site: &Path, machine: &str, pause: bool) -> Result<()> {
    replog::names::validate_name("machine", machine)?;
    let machine = machine.to_string();
    let req = if pause {
        replog::control::Request::PauseShipping { machine }
    } else {
        replog::control::Request::ResumeShipping { machine }
    };
    let reply = replog::control::run(site, &req)?;
    println!("{}", reply.detail.unwrap_or_default());
    Ok(())
}

/// `replog bandwidth SITE MACHINE [RATE] [--schedule RULES]`: change the relationship's
/// limit in place (serve's next shipping pass takes it up).
pub fn bandwidth(
    site: &Path,
    machine: &str,
    rate: Option<&str>,
    schedule: Option<&str>,
) -> Result<()> {
    Site::read_config(site)?;
    let not_protected = || {
        Error::InvalidInput(format!(
            "{machine} is not protected: give --bandwidth to `replog protect`"
        ))
    };
    let describe = |rel: &Relationship| {
        format!(
            "{}{}",
            rel.bandwidth.as_deref().unwrap_or("unlimited"),
            rel.bandwidth_schedule
                .as_deref()
                .map(|s| format!(", schedule \"{s}\""))
                .unwrap_or_default()
        )
    };
    if rate.is_none() && schedule.is_none() {
        let rel = Relationship::load(site, machine)?.ok_or_else(not_protected)?;
        rel.bandwidth()?;
        println!("{machine}: {}", describe(&rel));
        return Ok(());
    }
    // Under the relationship's lock: a pause recorded meanwhile is kept.
    let rel = Relationship::update(site, machine, |rel| {
        if let Some(r) = rate {
            replog::replication::bandwidth::parse_rate(r)?;
            rel.bandwidth = (!r.eq_ignore_ascii_case("unlimited")).then(|| r.to_string());
        }
        if let Some(s) = schedule {
            rel.bandwidth_schedule = if s.trim().is_empty() {
                None
            } else {
                replog::replication::bandwidth::Schedule::parse(s)?;
                Some(s.to_string())
            };
        }
        Ok(rel.clone())
    })?
    .ok_or_else(not_protected)?;
    println!(
        "{machine}: bandwidth {} (the next shipping pass takes it up)",
        describe(&rel)
    );
    Ok(())
}
