//! Memory for O_DIRECT transfers, in transparent huge pages where the kernel gives
//! them.
//!
//! An O_DIRECT read or write hands the device the buffer's pages as they are. A
//! buffer of 4 KiB pages that are not contiguous in physical memory is one segment
//! per page, and a virtio disk takes at most `max_segments` per request (254 on
//! the machines measured): the block layer splits a 1 MiB transfer in two requests
//! and an 8 MiB one in at least nine, and each request has its fixed cost in the
//! host. A buffer in one 2 MiB huge page is one segment (and a transfer of up to
//! `max_sectors_kb` one request: 4096 KiB on the machines measured). Measured on this VM
//! (docs/FUSE.md, "Huge pages for O_DIRECT buffers"): 1 MiB O_DIRECT reads at depth 4
//! from buffers of small pages issued 1382–2063 requests per GiB and ran at
//! 1.9–2.7 GB/s; from huge pages 1041 requests and 3.0–3.1 GB/s.
//!
//! A [`DirectBuf`] is an anonymous mapping whose used part starts on a 2 MiB
//! boundary and is advised `MADV_HUGEPAGE` (it takes effect where transparent huge
//! pages are `always` or `madvise`, the usual settings; elsewhere the buffer is small
//! pages, as a `Vec` would be). Its memory is whole huge pages whatever length it is
//! asked for, so a buffer is meant to be allocated once and used again
//! ([`DirectBuf::reuse`]).

use crate::error::{Error, Result};
use memmap2::{Advice, MmapMut};

/// A transparent huge page on x86-64 and most aarch64 kernels.
pub const HUGE_PAGE: usize = 2 << 20;

/// A buffer of whole huge pages for O_DIRECT transfers (module doc), of which the
/// first `len` bytes are in use.
pub struct DirectBuf {
    map: MmapMut,
    /// Where the huge pages start: the first 2 MiB boundary in the mapping.
    start: usize,
    /// Whole huge pages from `start`; at least `len`.
    room: usize,
    len: usize,
}

impl std::fmt::Debug for DirectBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectBuf")
            .field("len", &self.len)
            .field("room", &self.room)
            .finish()
    }
}

impl DirectBuf {
    /// A buffer of `len` bytes, zeroed, in whole huge pages. The memory is taken when
    /// first touched (by the first transfer into it).
    pub fn new(len: usize) -> Result<DirectBuf> {
        let room = len.max(1).div_ceil(HUGE_PAGE) * HUGE_PAGE;
        let mapped = room + HUGE_PAGE;
        let map = MmapMut::map_anon(mapped)
            .map_err(|e| Error::io("map memory for", "an O_DIRECT buffer", e))?;
        let start = (map.as_ptr() as usize).next_multiple_of(HUGE_PAGE) - map.as_ptr() as usize;
        // Refused only where the kernel has no transparent huge pages: small pages.
        if let Err(e) = map.advise_range(Advice::HugePage, start, room) {
            tracing::debug!("MADV_HUGEPAGE refused ({e}): O_DIRECT buffers in small pages");
        }
        Ok(DirectBuf {
            map,
            start,
            room,
            len,
        })
    }

    /// `buf` made `len` bytes long if its pages hold that many (its bytes are whatever
    /// it held), else a new buffer: how a buffer is used again.
    pub fn reuse(buf: Option<DirectBuf>, len: usize) -> Result<DirectBuf> {
        match buf {
            Some(mut b) if b.room >= len => {
                b.len = len;
                Ok(b)
            }
            _ => DirectBuf::new(len),
        }
    }

    /// The `len` bytes in use, starting on a 2 MiB boundary (so on any O_DIRECT
    /// alignment).
    pub fn as_slice(&self) -> &[u8] {
        // `new` maps `room` + a huge page with `start` below one and `reuse` keeps
        // `len <= room`, so the empty fallback below cannot happen (a fill into it
        // would read nothing, and serve zeros): asserted where tests run.
        debug_assert!(self.start + self.len <= self.map.len());
        self.map
            .get(self.start..self.start + self.len)
            .unwrap_or(&[])
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let (start, len) = (self.start, self.len);
        debug_assert!(start + len <= self.map.len());
        self.map.get_mut(start..start + len).unwrap_or(&mut [])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_is_whole_huge_pages_on_a_huge_page_boundary_and_zeroed() {
        for want in [2, 4096, HUGE_PAGE, HUGE_PAGE + 1, 8 << 20] {
            let mut b = DirectBuf::new(want).expect("map");
            assert!(b.room >= want && b.room.is_multiple_of(HUGE_PAGE), "{want}");
            assert!((b.as_slice().as_ptr() as usize).is_multiple_of(HUGE_PAGE));
            assert_eq!(b.as_slice().len(), want);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            let s = b.as_mut_slice();
            s[0] = 1;
            *s.last_mut().expect("not empty") = 2;
            assert_eq!(b.as_slice()[0], 1);
            assert_eq!(b.as_slice()[want - 1], 2);
        }
    }

    #[test]
    fn a_buffer_is_used_again_while_its_pages_hold_the_length_asked_for() {
        let mut b = DirectBuf::new(4096).expect("map");
        b.as_mut_slice()[0] = 7;
        let at = b.as_slice().as_ptr();
        let b = DirectBuf::reuse(Some(b), HUGE_PAGE).expect("reuse");
        assert_eq!((b.as_slice().as_ptr(), b.as_slice().len()), (at, HUGE_PAGE));
        assert_eq!(b.as_slice()[0], 7, "its bytes are what it held");
        let b = DirectBuf::reuse(Some(b), HUGE_PAGE + 1).expect("grow");
        assert_eq!(b.as_slice().len(), HUGE_PAGE + 1);
        assert!(b.as_slice().iter().all(|&x| x == 0), "a new buffer");
        assert_eq!(
            DirectBuf::reuse(None, 10).expect("new").as_slice().len(),
            10
        );
    }
}
