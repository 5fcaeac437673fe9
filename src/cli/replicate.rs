//! `replog protect`, `replog restore`.

use replog::identity::{self, SiteId};

use replog::replica::store::ReplicaStore;
use replog::replication::protocol::{read_frame, write_frame, Message};
use replog::replication::relationship::Relationship;
use replog::replication::{receiver, transport};
use replog::{Error, Result, Site};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

pub fn protect(site: &Path, machine: &str, target: &str) -> Result<()> {
    Site::read_config(site)?;
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
    let (mut s, peer) =
        transport::connect(site, target, Duration::from_secs(10)).map_err(|e| match e {
            Error::Io { op, source, .. } if op.contains("TLS") => Error::InvalidInput(format!(
                "the target at {target} and this site do not trust each other ({source}); run \
             `replog trust` on both sites with the other's ID (`replog id`)"
            )),
            Error::Io { source, .. } => {
                Error::InvalidInput(format!("the target at {target} is not reachable: {source}"))
            }
            other => other,
        })?;
    let talk = |s: &mut transport::ClientStream, m: &Message| -> Result<Message> {
        write_frame(s, m).map_err(|e| Error::InvalidInput(e.to_string()))?;
        s.flush().map_err(|e| Error::io("send to", target, e))?;
        read_frame(s).map_err(|e| match e {
            // In TLS 1.3 the target's refusal of our certificate arrives on the first read.
            replog::replication::protocol::FrameError::Io(io)
                if io
                    .get_ref()
                    .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some()) =>
            {
                Error::InvalidInput(format!(
                    "the target at {target} refused this site ({io}); run `replog trust {} {me}` \
                     there",
                    "<target site>"
                ))
            }
            other => Error::InvalidInput(format!("target: {other}")),
        })
    };
    match talk(
        &mut s,
        &Message::Hello {
            site_id: me.0,
            software: receiver::software(),
        },
    )? {
        Message::Hello { site_id, .. } if SiteId(site_id) == peer => {}
        _ => {
            return Err(Error::InvalidInput(
                "the target did not identify itself".into(),
            ))
        }
    }
    let free = match talk(&mut s, &Message::Probe)? {
        Message::Room { free_bytes } => free_bytes,
        _ => {
            return Err(Error::InvalidInput(
                "the target did not say how much room it has".into(),
            ))
        }
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
    Relationship {
        target: target.to_string(),
        target_id: peer.to_string(),
    }
    .save(site, machine)?;
    println!(
        "{machine} is protected toward {target} (site {peer}); a running `replog serve {}` starts initial replication",
        site.display()
    );
    Ok(())
}

pub fn restore(site: &Path, machine: &str, at: &str, out: &Path, json: bool) -> Result<()> {
    let key = replog::site::replica_key_at(site)?;
    let store = ReplicaStore::open(site, machine, key)?;
    let bar = if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(1);
        b.set_style(
            indicatif::ProgressStyle::with_template("restoring {bar:40} {pos}/{len} pieces {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    };
    let lsn = replog::replica::points::resolve(&store, at)?;
    let r = replog::replica::restore::restore_at(&store, lsn, out, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    if json {
        let doc = serde_json::json!({
            "machine": machine,
            "lsn": r.lsn,
            "images": r.images,
        });
        println!("{doc}");
    } else {
        for p in &r.images {
            println!("{}", p.display());
        }
        println!("restored {machine} at LSN {} into {}", r.lsn, out.display());
    }
    Ok(())
}

pub fn points(site: &Path, machine: &str, json: bool) -> Result<()> {
    let key = replog::site::replica_key_at(site)?;
    let store = ReplicaStore::open(site, machine, key)?;
    let points = replog::replica::points::list(&store)?;
    let kind = |p: &replog::replica::points::ReplicaPoint| {
        if p.app_consistent {
            "app-consistent"
        } else {
            "crash-consistent"
        }
    };
    if json {
        let list: Vec<_> = points
            .iter()
            .map(|p| {
                serde_json::json!({
                    "id": p.id(),
                    "lsn": p.lsn,
                    "time": replog::format::rfc3339(p.time_ns),
                    "kind": kind(p),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"machine": machine, "points": list})
        );
        return Ok(());
    }
    let n = points.len();
    println!("{machine}: {n} recovery point(s)");
    for (i, p) in points.iter().enumerate() {
        // A long list is summarised for people; --json has every point.
        if n > 12 && (5..n - 5).contains(&i) {
            if i == 5 {
                println!("  … {} more …", n - 10);
            }
            continue;
        }
        println!(
            "  {:<12} LSN {:>10}  {}  {}",
            p.id(),
            p.lsn,
            replog::format::rfc3339(p.time_ns),
            kind(p)
        );
    }
    Ok(())
}
