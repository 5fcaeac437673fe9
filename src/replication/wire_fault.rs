//! Faults on the wire, for the tests of issue 17 (`tests/wire_faults.rs`).
//!
//! `REPLOG_WIRE_FAULTS=FILE` makes this process damage the frames it sends on
//! replication sessions — inside TLS, where the peer's protocol checks (not TLS's)
//! must catch them — while FILE holds a line `seed=S every=N [kinds=K,…]`: on average
//! one frame in N gets a fault, picked (seeded) among the kinds:
//!
//! | kind | the frame |
//! |---|---|
//! | `drop` | is not sent (the peer waits for it, or sees the next one out of place) |
//! | `delay` | is sent 20–200 ms late |
//! | `dup` | is sent twice |
//! | `trunc` | is cut short, then the connection is closed |
//! | `reorder` | is held back and sent after the next frame |
//! | `cut` | is not sent and the connection is closed |
//! | `flip` | has one byte flipped |
//!
//! FILE is read when a session starts (so a test turns faults on and off by writing
//! or removing it); every fault is logged (`wire fault: …`). While the variable is
//! set, sessions give up after [`FAULT_IO_TIMEOUT`] of silence instead of
//! `transport::IO_TIMEOUT`, so a dropped frame costs seconds. Unset (always, outside
//! tests), the cost is one environment lookup per session.

use std::io::{self, Write};
use std::time::Duration;

/// Read timeout of sessions while `REPLOG_WIRE_FAULTS` is set.
pub const FAULT_IO_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Drop,
    Delay,
    Dup,
    Trunc,
    Reorder,
    Cut,
    Flip,
}

const KINDS: [(&str, Kind); 7] = [
    ("drop", Kind::Drop),
    ("delay", Kind::Delay),
    ("dup", Kind::Dup),
    ("trunc", Kind::Trunc),
    ("reorder", Kind::Reorder),
    ("cut", Kind::Cut),
    ("flip", Kind::Flip),
];

/// The faults of one session (see the module documentation).
#[derive(Debug)]
pub struct WireFaults {
    rng: u64,
    every: u64,
    kinds: Vec<Kind>,
    /// A frame held back by `reorder`.
    held: Option<Vec<u8>>,
    sent: u64,
}

/// How long a session may be silent.
pub fn io_timeout() -> Duration {
    if std::env::var_os("REPLOG_WIRE_FAULTS").is_some() {
        FAULT_IO_TIMEOUT
    } else {
        super::transport::IO_TIMEOUT
    }
}

impl WireFaults {
    /// The faults for a session starting now, if `REPLOG_WIRE_FAULTS` names a file
    /// that holds a valid line.
    pub fn from_env() -> Option<WireFaults> {
        let path = std::env::var_os("REPLOG_WIRE_FAULTS")?;
        let text = std::fs::read_to_string(path).ok()?;
        let (mut seed, mut every, mut kinds) = (1u64, 0u64, KINDS.map(|k| k.1).to_vec());
        for word in text.split_whitespace() {
            match word.split_once('=') {
                Some(("seed", v)) => seed = v.parse().ok()?,
                Some(("every", v)) => every = v.parse().ok()?,
                Some(("kinds", v)) => {
                    kinds = v
                        .split(',')
                        .map(|k| KINDS.iter().find(|(n, _)| *n == k).map(|(_, k)| *k))
                        .collect::<Option<Vec<_>>>()?;
                }
                _ => return None,
            }
        }
        if every == 0 || kinds.is_empty() {
            return None;
        }
        // Sessions of one process differ: mix in a counter.
        static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(WireFaults {
            rng: (seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1,
            every,
            kinds,
            held: None,
            sent: 0,
        })
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Write `frame` to `w`, perhaps with a fault; an error closes the session.
    pub fn write(&mut self, w: &mut dyn Write, frame: &[u8]) -> io::Result<()> {
        self.sent += 1;
        let n = self.sent;
        let kind = if self.next().is_multiple_of(self.every) {
            let i = (self.next() % self.kinds.len() as u64) as usize;
            self.kinds.get(i).copied()
        } else {
            None
        };
        let cut = |what: &str| {
            tracing::warn!("wire fault: frame {n} {what}, connection closed");
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("wire fault: frame {n} {what}"),
            ))
        };
        match kind {
            None => {}
            Some(Kind::Drop) => {
                tracing::warn!("wire fault: frame {n} dropped");
                return Ok(());
            }
            Some(Kind::Delay) => {
                let ms = 20 + self.next() % 180;
                tracing::warn!("wire fault: frame {n} delayed {ms} ms");
                std::thread::sleep(Duration::from_millis(ms));
            }
            Some(Kind::Dup) => {
                tracing::warn!("wire fault: frame {n} sent twice");
                w.write_all(frame)?;
            }
            Some(Kind::Trunc) => {
                let keep = (self.next() % frame.len().max(1) as u64) as usize;
                w.write_all(frame.get(..keep).unwrap_or(&[]))?;
                w.flush()?;
                return cut(&format!("cut short after {keep} of {} bytes", frame.len()));
            }
            Some(Kind::Reorder) if self.held.is_none() => {
                tracing::warn!("wire fault: frame {n} held back, sent after the next");
                self.held = Some(frame.to_vec());
                return Ok(());
            }
            Some(Kind::Reorder) => {}
            Some(Kind::Cut) => return cut("not sent"),
            Some(Kind::Flip) => {
                let mut bad = frame.to_vec();
                let at = (self.next() % bad.len().max(1) as u64) as usize;
                if let Some(b) = bad.get_mut(at) {
                    *b ^= 0x20;
                }
                tracing::warn!("wire fault: frame {n} byte {at} flipped");
                w.write_all(&bad)?;
                return self.release_held(w);
            }
        }
        w.write_all(frame)?;
        self.release_held(w)
    }

    fn release_held(&mut self, w: &mut dyn Write) -> io::Result<()> {
        match self.held.take() {
            Some(h) => w.write_all(&h),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn faults(kinds: Vec<Kind>) -> WireFaults {
        WireFaults {
            rng: 7,
            every: 1,
            kinds,
            held: None,
            sent: 0,
        }
    }

    #[test]
    fn each_kind_does_what_it_says() {
        let mut out = Vec::new();
        faults(vec![Kind::Drop]).write(&mut out, b"abc").unwrap();
        assert!(out.is_empty());
        faults(vec![Kind::Dup]).write(&mut out, b"abc").unwrap();
        assert_eq!(out, b"abcabc");
        out.clear();
        let mut f = faults(vec![Kind::Reorder]);
        f.write(&mut out, b"one").unwrap();
        f.kinds = vec![Kind::Delay];
        f.every = u64::MAX; // no fault on the next frame
        f.write(&mut out, b"two").unwrap();
        assert_eq!(out, b"twoone");
        out.clear();
        assert!(faults(vec![Kind::Cut]).write(&mut out, b"abc").is_err());
        assert!(out.is_empty());
        assert!(faults(vec![Kind::Trunc])
            .write(&mut out, b"abcdef")
            .is_err());
        assert!(out.len() < 6);
        out.clear();
        faults(vec![Kind::Flip]).write(&mut out, b"abcdef").unwrap();
        assert_eq!(out.len(), 6);
        assert_ne!(out, b"abcdef");
    }
}
