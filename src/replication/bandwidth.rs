//! Bandwidth limits on the sender: a token bucket every frame a machine's shipper
//! sends goes through — initial replication, delta shipping, resync and reprotect
//! alike — at a rate from the relationship (`bandwidth = "50MiB/s"`) or its schedule
//! (`bandwidth_schedule = "Mon-Fri 08:00-18:00=10MiB/s, *=unlimited"`, local time;
//! the first rule that matches wins, no rule matching means `bandwidth`, or
//! unlimited).
//!
//! The bucket lets a frame larger than its burst through and goes into debt: the next
//! frames wait until the debt is paid, so the average rate holds whatever the frame
//! sizes. Each shipping pass takes the relationship's settings again, so a change
//! (`replog bandwidth`) applies without re-protecting.

use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// A rate in bytes per second; None is unlimited.
pub type Rate = Option<u64>;

/// Parse `10MiB/s`, `500KiB/s`, `1GB/s`, `800kB/s`, `12345/s` or `unlimited`. As for
/// network rates, `kB`/`MB`/`GB` are powers of ten and `KiB`/`MiB`/`GiB` of two
/// (unlike disk sizes, `names::parse_size`, where every unit is a power of two).
pub fn parse_rate(text: &str) -> Result<Rate> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let bad = || {
        Error::InvalidInput(format!(
            "rate {text:?}: use e.g. 10MiB/s, 500KiB/s, 1GB/s or unlimited"
        ))
    };
    let per_s = t.strip_suffix("/s").ok_or_else(bad)?;
    let digits = per_s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(per_s.len());
    let (num, unit) = per_s.split_at(digits);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let mult: f64 = match unit {
        "" | "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => return Err(bad()),
    };
    let bytes = n * mult;
    if !(1024.0..1e15).contains(&bytes) {
        return Err(Error::InvalidInput(format!(
            "rate {text:?} is out of range (at least 1KiB/s)"
        )));
    }
    Ok(Some(bytes as u64))
}

/// One rule of a schedule: on `days` (bit 0 Sunday … bit 6 Saturday), from minute
/// `from` to minute `to` of the day (wrapping midnight when `to <= from`), `rate`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    days: u8,
    from: u32,
    to: u32,
    rate: Rate,
}

/// A bandwidth schedule (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Schedule {
    rules: Vec<Rule>,
}

const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];

fn parse_days(text: &str) -> Option<u8> {
    let day = |d: &str| DAYS.iter().position(|x| x.eq_ignore_ascii_case(d));
    match text.split_once('-') {
        None => day(text).map(|d| 1 << d),
        Some((a, b)) => {
            let (a, b) = (day(a)?, day(b)?);
            let mut m = 0u8;
            let mut d = a;
            loop {
                m |= 1 << d;
                if d == b {
                    return Some(m);
                }
                d = (d + 1) % 7;
            }
        }
    }
}

fn parse_minute(t: &str) -> Option<u32> {
    let (h, m) = t.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
}

impl Schedule {
    /// Parse `WHEN=RATE, WHEN=RATE, …` where WHEN is `*`, `DAYS`, `HH:MM-HH:MM` or
    /// `DAYS HH:MM-HH:MM` (DAYS: `Mon`, `Mon-Fri`, `Sat-Sun`).
    pub fn parse(text: &str) -> Result<Schedule> {
        let mut rules = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = |why: &str| {
                Error::InvalidInput(format!(
                    "bandwidth schedule rule {part:?}: {why} (e.g. \"Mon-Fri 08:00-18:00=10MiB/s, \
                     *=unlimited\")"
                ))
            };
            let (when, rate) = part.split_once('=').ok_or_else(|| bad("no '=RATE'"))?;
            let rate = parse_rate(rate).map_err(|e| bad(&e.to_string()))?;
            let mut rule = Rule {
                days: 0x7f,
                from: 0,
                to: 24 * 60,
                rate,
            };
            for word in when.split_whitespace() {
                if word == "*" {
                    continue;
                }
                if let Some((a, b)) = word.split_once('-').filter(|(a, _)| a.contains(':')) {
                    rule.from = parse_minute(a).ok_or_else(|| bad("a bad time"))?;
                    rule.to = parse_minute(b).ok_or_else(|| bad("a bad time"))?;
                } else {
                    rule.days = parse_days(word).ok_or_else(|| bad("a bad day"))?;
                }
            }
            rules.push(rule);
        }
        if rules.is_empty() {
            return Err(Error::InvalidInput("an empty bandwidth schedule".into()));
        }
        Ok(Schedule { rules })
    }

    /// The rate of the first rule that matches weekday `wday` (0 Sunday) at `minute`
    /// of the day; None if no rule matches.
    pub fn rate_at(&self, wday: u32, minute: u32) -> Option<Rate> {
        self.rules.iter().find_map(|r| {
            let (day, min) = if r.to <= r.from && minute < r.to {
                // The part of a window that wrapped midnight, from the day before.
                ((wday + 6) % 7, minute)
            } else {
                (wday, minute)
            };
            let on = r.days & (1 << day) != 0;
            let inside = if r.to > r.from {
                (r.from..r.to).contains(&min)
            } else {
                min >= r.from || min < r.to
            };
            (on && inside).then_some(r.rate)
        })
    }
}

/// The settings of a limit: a base rate and a schedule over it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub base: Rate,
    pub schedule: Option<Schedule>,
}

impl Settings {
    /// The rate now.
    pub fn rate_now(&self) -> Rate {
        let (wday, minute) = super::resync_schedule::local_now();
        self.rate(wday, minute)
    }

    pub fn rate(&self, wday: u32, minute: u32) -> Rate {
        self.schedule
            .as_ref()
            .and_then(|s| s.rate_at(wday, minute))
            .unwrap_or(self.base)
    }
}

/// A machine's token bucket (shared by every link its shipper opens).
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    settings: Settings,
    /// Bytes that may go now (negative: a debt to wait off).
    tokens: f64,
    at: Instant,
    /// The rate in force, worked out at most once a second.
    rate: Rate,
    rate_at: Option<Instant>,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            state: Mutex::new(Bucket {
                settings: Settings::default(),
                tokens: 0.0,
                at: Instant::now(),
                rate: None,
                rate_at: None,
            }),
        }
    }
}

impl Limiter {
    /// Take up new settings (the bucket's state stays).
    pub fn set(&self, settings: Settings) {
        let mut b = self.state.lock();
        if b.settings != settings {
            b.settings = settings;
            b.rate_at = None;
        }
    }

    /// How long to wait before sending `bytes` at `now`; the bytes are counted.
    pub fn delay(&self, bytes: usize, now: Instant) -> Duration {
        let mut b = self.state.lock();
        if b.rate_at
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            b.rate = b.settings.rate_now();
            b.rate_at = Some(now);
        }
        let Some(rate) = b.rate else {
            b.tokens = 0.0;
            b.at = now;
            return Duration::ZERO;
        };
        let rate = rate as f64;
        // Up to a tenth of a second's worth (at least 64 KiB) saved up for a burst.
        let burst = (rate / 10.0).max(64.0 * 1024.0);
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at = now;
        b.tokens -= bytes as f64;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / rate)
        }
    }

    /// Wait as [`Limiter::delay`] says.
    pub fn take(&self, bytes: usize) {
        let d = self.delay(bytes, Instant::now());
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_rate("10MiB/s").unwrap(), Some(10 << 20));
        assert_eq!(parse_rate("500KiB/s").unwrap(), Some(500 << 10));
        assert_eq!(parse_rate("1GB/s").unwrap(), Some(1_000_000_000));
        assert_eq!(parse_rate("1.5MiB/s").unwrap(), Some(3 << 19));
        assert_eq!(parse_rate("unlimited").unwrap(), None);
        for bad in ["10MiB", "fast", "10XB/s", "0/s", "12/s", "/s", "-5MiB/s"] {
            assert!(parse_rate(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn schedules_pick_the_first_rule_that_matches_in_local_time() {
        let s =
            Schedule::parse("Mon-Fri 08:00-18:00=10MiB/s, Sat-Sun=1MiB/s, *=unlimited").unwrap();
        let (mon, sat, sun) = (1, 6, 0);
        assert_eq!(s.rate_at(mon, 9 * 60), Some(Some(10 << 20)));
        assert_eq!(s.rate_at(mon, 18 * 60), Some(None), "18:00 is outside");
        assert_eq!(s.rate_at(mon, 7 * 60 + 59), Some(None));
        assert_eq!(s.rate_at(sat, 9 * 60), Some(Some(1 << 20)));
        assert_eq!(s.rate_at(sun, 23 * 60), Some(Some(1 << 20)));
        // A window over midnight belongs to the day it starts on.
        let night = Schedule::parse("Fri 22:00-06:00=5MiB/s").unwrap();
        assert_eq!(night.rate_at(5, 23 * 60), Some(Some(5 << 20)));
        assert_eq!(night.rate_at(6, 60), Some(Some(5 << 20)), "Saturday 01:00");
        assert_eq!(
            night.rate_at(5, 60),
            None,
            "Friday 01:00 is Thursday's night"
        );
        // No rule matching: the base rate.
        let settings = Settings {
            base: Some(1 << 20),
            schedule: Some(night),
        };
        assert_eq!(settings.rate(2, 12 * 60), Some(1 << 20));
        for bad in ["", "Mon=", "Funday=1MiB/s", "Mon 25:00-26:00=1MiB/s", "*"] {
            assert!(Schedule::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_bucket_holds_the_average_rate_whatever_the_frame_sizes() {
        let l = Limiter::default();
        l.set(Settings {
            base: Some(10 << 20),
            schedule: None,
        });
        // 100 MiB in frames of 1 MiB and of 4 KiB, sent as soon as allowed: the
        // waits add up to 10 s (at 10 MiB/s), less the burst.
        let mut now = Instant::now();
        let mut waited = Duration::ZERO;
        for i in 0..200 {
            let n = if i % 2 == 0 { 1 << 20 } else { 4096 };
            let d = l.delay(n, now);
            waited += d;
            now += d;
        }
        let sent = 100.0 * (1 << 20) as f64 + 100.0 * 4096.0;
        let expect = sent / (10 << 20) as f64;
        let got = waited.as_secs_f64();
        assert!((got - expect).abs() < 0.2, "waited {got} s for {expect} s");
        // Unlimited: no wait at all.
        l.set(Settings::default());
        assert_eq!(l.delay(1 << 30, now), Duration::ZERO);
    }
}
