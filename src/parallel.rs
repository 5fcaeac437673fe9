//! A map over a slice on up to four threads: what hashing, sealing and reading many
//! chunks share (more threads bought nothing on the machines measured, and the
//! work also waits on the disk).

use crate::error::{Error, Result};

/// Most threads [`map`] uses.
pub const MAX_WORKERS: usize = 4;

/// How many threads a job of `items` pieces gets: one per core, at most
/// [`MAX_WORKERS`], no more than there are pieces.
pub fn workers(items: usize) -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, MAX_WORKERS)
        .min(items)
}

/// `f` of every item, in order, on [`workers`] threads (each a run of consecutive
/// items); the first error wins.
pub fn map<T: Sync, U: Send>(items: &[T], f: impl Fn(&T) -> Result<U> + Sync) -> Result<Vec<U>> {
    map_on(workers(items.len()), items, f)
}

/// [`map`] with each item lent to `f` mutably (each thread has a run of its own).
pub fn map_mut<T: Send, U: Send>(
    items: &mut [T],
    f: impl Fn(&mut T) -> Result<U> + Sync,
) -> Result<Vec<U>> {
    map_mut_on(workers(items.len()), items, f)
}

/// [`map`] on `threads` threads whatever the cores (work that waits on the disk, not
/// the CPU: many small files written at once), no more than there are items.
pub fn map_on<T: Sync, U: Send>(
    threads: usize,
    items: &[T],
    f: impl Fn(&T) -> Result<U> + Sync,
) -> Result<Vec<U>> {
    let mut refs: Vec<&T> = items.iter().collect();
    map_mut_on(threads.min(items.len()), &mut refs, |t| f(t))
}

fn map_mut_on<T: Send, U: Send>(
    workers: usize,
    items: &mut [T],
    f: impl Fn(&mut T) -> Result<U> + Sync,
) -> Result<Vec<U>> {
    if workers <= 1 {
        return items.iter_mut().map(&f).collect();
    }
    let per = items.len().div_ceil(workers);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks_mut(per)
            .map(|part| s.spawn(move || part.iter_mut().map(f).collect::<Result<Vec<U>>>()))
            .collect();
        let mut out = Vec::with_capacity(handles.len() * per);
        for h in handles {
            out.extend(
                h.join().unwrap_or_else(|_| {
                    Err(Error::InvalidInput("worker thread panicked".into()))
                })?,
            );
        }
        Ok(out)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn results_come_in_order_and_an_error_wins() {
        let items: Vec<u64> = (0..1000).collect();
        assert_eq!(
            map(&items, |x| Ok(x * 2)).unwrap(),
            (0..1000).map(|x| x * 2).collect::<Vec<_>>()
        );
        let e = map(&items, |x| {
            if *x == 777 {
                Err(Error::InvalidInput("777".into()))
            } else {
                Ok(*x)
            }
        })
        .unwrap_err();
        assert!(e.to_string().contains("777"), "{e}");
        assert!(map(&[] as &[u64], |x| Ok(*x)).unwrap().is_empty());
    }

    #[test]
    fn map_on_uses_more_threads_than_cores_and_keeps_the_order() {
        let items: Vec<u64> = (0..100).collect();
        let threads = parking_lot::Mutex::new(std::collections::HashSet::new());
        let out = map_on(8, &items, |x| {
            threads.lock().insert(std::thread::current().id());
            Ok(x + 1)
        })
        .unwrap();
        assert_eq!(out, (1..101).collect::<Vec<_>>());
        assert_eq!(threads.lock().len(), 8);
        assert_eq!(map_on(8, &items[..3], |x| Ok(*x)).unwrap(), vec![0, 1, 2]);
        let e = map_on(8, &items, |x| {
            if *x == 63 {
                Err(Error::InvalidInput("63".into()))
            } else {
                Ok(*x)
            }
        })
        .unwrap_err();
        assert!(e.to_string().contains("63"), "{e}");
    }

    #[test]
    fn map_mut_changes_every_item_in_place() {
        let mut items: Vec<u64> = (0..1000).collect();
        let out = map_mut(&mut items, |x| {
            *x += 1;
            Ok(*x % 7)
        })
        .unwrap();
        assert_eq!(items, (1..1001).collect::<Vec<_>>());
        assert_eq!(out, (1..1001).map(|x| x % 7).collect::<Vec<_>>());
    }
}
