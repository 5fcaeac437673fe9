//! Locks on machine names: serve's registry makes changes to one machine at a time
//! (open, close, promote, commit, …) while changes to other machines go on beside
//! them — the failovers of a recovery plan's group run side by side.
//!
//! A change takes every name it touches (a test failover: the replica's name and
//! the copy's) at once, or waits until none of them is held, so two changes that
//! share a name never interleave and a change never holds one name while waiting
//! for another (no deadlock).

use parking_lot::{Condvar, Mutex};
use std::collections::BTreeSet;

#[derive(Debug, Default)]
pub struct NameLocks {
    held: Mutex<BTreeSet<String>>,
    freed: Condvar,
}

/// Names held until dropped.
#[derive(Debug)]
pub struct NamesHeld<'a> {
    locks: &'a NameLocks,
    names: Vec<String>,
}

impl NameLocks {
    /// Hold every name in `names`, waiting until none is held by another change.
    pub fn lock<S: AsRef<str>>(&self, names: &[S]) -> NamesHeld<'_> {
        let mut names: Vec<String> = names.iter().map(|n| n.as_ref().to_string()).collect();
        names.sort();
        names.dedup();
        let mut held = self.held.lock();
        while names.iter().any(|n| held.contains(n)) {
            self.freed.wait(&mut held);
        }
        held.extend(names.iter().cloned());
        NamesHeld { locks: self, names }
    }
}

impl Drop for NamesHeld<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock();
        for n in &self.names {
            held.remove(n);
        }
        drop(held);
        self.locks.freed.notify_all();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn changes_that_share_a_name_wait_and_others_go_on() {
        let locks = Arc::new(NameLocks::default());
        let a = locks.lock(&["db", "db-test"]);
        // Another machine: at once.
        drop(locks.lock(&["web"]));
        let entered = Arc::new(AtomicBool::new(false));
        let t = {
            let (locks, entered) = (locks.clone(), entered.clone());
            std::thread::spawn(move || {
                let _b = locks.lock(&["web", "db"]);
                entered.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst), "a held name was taken");
        // While it waits, `web` is not held by it (no hold-and-wait).
        drop(locks.lock(&["web"]));
        drop(a);
        t.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
        drop(locks.lock(&["db", "web", "db-test"]));
    }
}
