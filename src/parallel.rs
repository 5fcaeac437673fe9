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
    let mut refs: Vec<&T> = items.iter().collect();
    map_mut(&mut refs, |t| f(t))
}

/// [`map`] with each item lent to `f` mutably (each thread has a run of its own).
pub fn map_mut<T: Send, U: Send>(
    items: &mut [T],
    f: impl Fn(&mut T) -> Result<U> + Sync,
) -> Result<Vec<U>> {
    let workers = workers(items.len());
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
