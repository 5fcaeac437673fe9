//! A source machine in memory with three sealed segments, and its replica: what
//! the crash tests of the target side start from.

use replog::format::meta::{DiskEntry, Watermark};
use replog::format::segment::segment_name;
use replog::replica::store::{ReplicaManifest, Replicas};
use replog::storage::{MemStorage, OpenMode, Storage};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const OS: u64 = 1 << 20;
pub const DATA: u64 = 256 << 10;

/// The source: machine vm1 (os, data) in memory; its sealed segments and the disks
/// at every point (flushes and seals).
pub struct Source {
    pub machine_id: u64,
    pub segments: Vec<Vec<u8>>,
    pub at: BTreeMap<u64, Vec<Vec<u8>>>,
}

pub fn source() -> Source {
    let mem = MemStorage::new();
    let dir = Path::new("/src/vm1");
    super::create_machine(&mem, dir, &[OS, DATA]);
    let m = super::open(Arc::new(mem.clone()), dir, 64 << 20).expect("open");
    let mut model = vec![vec![0u8; OS as usize], vec![0u8; DATA as usize]];
    let mut at = BTreeMap::new();
    at.insert(0, model.clone());
    let mut seed = 1u64;
    for seg in 0..3 {
        for round in 0..3 {
            for w in 0..4u64 {
                seed += 1;
                let disk = (seed % 2) as usize;
                let size = if disk == 0 { OS } else { DATA };
                let len = 512 * (1 + (seed * 7 + w) % 40);
                let off = (seed * 104_729 + w * 7919) % (size - len);
                let v = m.volume(&format!("d{disk}")).expect("vol");
                if (seg + round + w) % 5 == 4 {
                    v.write_zeroes(off, len).expect("zero");
                    model[disk][off as usize..(off + len) as usize].fill(0);
                } else {
                    let data = super::pattern(seed, len as usize);
                    v.write(off, &data).expect("write");
                    model[disk][off as usize..(off + len) as usize].copy_from_slice(&data);
                }
            }
            let lsn = m.flush().expect("flush");
            at.insert(lsn, model.clone());
        }
        let last = m.seal().expect("seal").expect("sealed");
        at.insert(last, model.clone());
    }
    let segments = (1..=3)
        .map(|s| {
            let f = mem
                .open(
                    &dir.join("journal").join(segment_name(s)),
                    OpenMode::ReadOnly,
                )
                .expect("segment");
            replog::storage::read_all(f.as_ref(), 1 << 30).expect("read")
        })
        .collect();
    Source {
        machine_id: m.machine_id(),
        segments,
        at,
    }
}

pub fn manifest(src: &Source) -> ReplicaManifest {
    ReplicaManifest {
        source_site: [3u8; 32],
        machine_id: src.machine_id,
        disks: vec![
            DiskEntry {
                id: 0,
                name: "d0".into(),
                size: OS,
            },
            DiskEntry {
                id: 1,
                name: "d1".into(),
                size: DATA,
            },
        ],
        base_lsn: 0,
        base_seq: 0,
        generation: 1,
    }
}

/// Receive every segment of `src` into replica vm1 of `r` (created if missing),
/// going on from wherever an earlier receive stopped.
pub fn receive_all(r: &Replicas, src: &Source) -> replog::Result<()> {
    let mut st = match r.open("vm1") {
        Ok(s) => s,
        Err(replog::Error::NotFound(_)) => r.create("vm1", manifest(src), Watermark::default())?,
        Err(e) => return Err(e),
    };
    if !st.initial().done {
        st.finish_initial()?;
    }
    for (i, seg) in src.segments.iter().enumerate() {
        st.receive(i as u64 + 1, seg)?;
    }
    Ok(())
}
