//! The loop `serve` keeps for each replica it holds: every `interval`, one pass of the
//! target compactor (`compact.rs`) and one budget of the scrub (`scrub.rs`).

use super::store::Replicas;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes the scrub checks per pass.
pub const SCRUB_BUDGET: u64 = 64 << 20;

/// A running maintenance loop of one replica; stops when told or dropped.
#[derive(Debug)]
pub struct ReplicaLoop {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ReplicaLoop {
    pub fn spawn(replicas: Replicas, machine: String, interval: Duration) -> ReplicaLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("replica-{machine}"))
                .spawn(move || {
                    let mut next = Instant::now() + interval;
                    while !stop.load(Ordering::Acquire) {
                        if Instant::now() < next {
                            std::thread::sleep(Duration::from_millis(50).min(interval));
                            continue;
                        }
                        next = Instant::now() + interval;
                        pass(&replicas, &machine);
                    }
                })
                .ok()
        };
        ReplicaLoop { stop, thread }
    }

    /// Stop after the pass in progress.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ReplicaLoop {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One compaction pass and one scrub budget.
pub fn pass(replicas: &Replicas, machine: &str) {
    if !replicas.has(machine) {
        return;
    }
    // Not beside a removal (a committed failover's fold): it waits for this pass, or
    // this pass for it — and then finds no replica.
    let _pass = match replicas.pass_lock(machine) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(machine, "replica maintenance lock: {e}");
            return;
        }
    };
    if !replicas.has(machine) {
        return;
    }
    // Promoted by a failover: every point stays as it is (a change of point may
    // need any of them) until the failover is cancelled or committed.
    match replicas.open_readonly(machine).and_then(|s| s.promotion()) {
        Ok(None) => {}
        Ok(Some(_)) => return,
        Err(e) => {
            tracing::error!(machine, "replica promotion record: {e}");
            return;
        }
    }
    let now = crate::format::now_ns();
    if let Err(e) = super::compact::compact_replica(replicas, machine, now) {
        tracing::error!(machine, "replica compaction: {e}");
    }
    if let Err(e) = super::scrub::scrub_replica(replicas, machine, SCRUB_BUDGET) {
        tracing::error!(machine, "replica scrub: {e}");
    }
    if let Err(e) = replicas.backend().collect(machine) {
        tracing::warn!(machine, "replica store collection: {e}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::format::meta::{DiskEntry, Watermark};
    use crate::replica::backend::DirBackend;
    use crate::replica::crypt::ReplicaKey;
    use crate::replica::store::ReplicaManifest;
    use crate::storage::MemStorage;

    #[test]
    fn a_pass_and_a_removal_wait_for_each_other() {
        let backend = Arc::new(DirBackend::new(Arc::new(MemStorage::new()), "/r"));
        let replicas = Replicas::new(backend, ReplicaKey::from_bytes([5u8; 32]));
        let manifest = ReplicaManifest {
            source_site: [1; 32],
            machine_id: 2,
            disks: vec![DiskEntry {
                id: 0,
                name: "os".into(),
                size: 1 << 20,
            }],
            base_lsn: 0,
            base_seq: 0,
            generation: 1,
        };
        replicas
            .create("vm1", manifest, Watermark::default())
            .unwrap();
        // A pass takes the lock: it waits while another holds it.
        let held = replicas.pass_lock("vm1").unwrap();
        std::thread::scope(|s| {
            let pass_under_way = s.spawn(|| pass(&replicas, "vm1"));
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                !pass_under_way.is_finished(),
                "a pass ran while the lock was held"
            );
            drop(held);
            pass_under_way.join().unwrap();
        });
        // A pass holds its lock (here, this test does): the removal waits for it.
        let held = replicas.pass_lock("vm1").unwrap();
        std::thread::scope(|s| {
            let removal = s.spawn(|| replicas.remove("vm1"));
            std::thread::sleep(Duration::from_millis(300));
            assert!(replicas.has("vm1"), "removed while a pass held its lock");
            assert!(!removal.is_finished());
            drop(held);
            removal.join().unwrap().unwrap();
        });
        assert!(!replicas.has("vm1"));
        // A pass after the removal finds nothing to do (and writes nothing).
        pass(&replicas, "vm1");
        assert!(!replicas.has("vm1"));
    }
}
