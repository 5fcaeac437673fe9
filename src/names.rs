//! Validation of names and sizes that come from the command line or the network.
//!
//! A name becomes a path component inside the site directory, so it must never be
//! able to escape it or confuse a tool: only ASCII letters, digits, `.`, `_` and `-`,
//! not starting with `.` or `-`, at most [`MAX_NAME_LEN`] bytes. That rules out `/`,
//! `..`, NUL and every control character.

use crate::error::{Error, Result};

pub const MAX_NAME_LEN: usize = 64;
/// Disks are sized in whole 512-byte sectors.
pub const SECTOR: u64 = 512;
/// The largest disk replog accepts: 64 TiB.
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// Check a machine, disk or site name.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::InvalidInput(format!(
            "invalid {what} name {name:?}: {why} (use 1 to {MAX_NAME_LEN} ASCII letters, \
             digits, '.', '_' or '-', not starting with '.' or '-')"
        )))
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("too long");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("starts with '.' or '-'");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(&format!("character {c:?} is not allowed"));
    }
    Ok(())
}

/// Parse `MACHINE/DISK`.
pub fn parse_disk_ref(s: &str) -> Result<(String, String)> {
    let Some((m, d)) = s.split_once('/') else {
        return Err(Error::InvalidInput(format!(
            "{s:?} is not MACHINE/DISK (for example vm1/os)"
        )));
    };
    validate_name("machine", m)?;
    validate_name("disk", d)?;
    Ok((m.to_string(), d.to_string()))
}

/// Parse a size such as `4096`, `512K`, `64M`, `10G`, `1T` (binary units; an optional
/// `iB`/`B` suffix is accepted) and check it is a usable disk size.
pub fn parse_disk_size(s: &str) -> Result<u64> {
    let size = parse_size(s)?;
    validate_disk_size(size)?;
    Ok(size)
}

pub fn validate_disk_size(size: u64) -> Result<()> {
    if size == 0 {
        return Err(Error::InvalidInput("disk size must be positive".into()));
    }
    if !size.is_multiple_of(SECTOR) {
        return Err(Error::InvalidInput(format!(
            "disk size {size} is not a multiple of the {SECTOR}-byte sector"
        )));
    }
    if size > MAX_DISK_SIZE {
        return Err(Error::InvalidInput(format!(
            "disk size {size} is above the maximum of {MAX_DISK_SIZE} bytes (64 TiB)"
        )));
    }
    Ok(())
}

/// Parse a byte count with an optional binary unit.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| Error::InvalidInput(format!("{s:?} is not a size (try 4096, 64M, 10G)")))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| Error::InvalidInput(format!("size {s:?} is too large")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_refused() {
        for bad in [
            "",
            "..",
            ".",
            "a/b",
            "../x",
            "a\0b",
            "a\nb",
            "-rf",
            ".hidden",
            "é",
            &"x".repeat(65),
        ] {
            assert!(validate_name("disk", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["os", "vm1", "data-01", "a.b_c", &"x".repeat(64)] {
            validate_name("disk", good).unwrap();
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_disk_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_disk_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_disk_size("4096").unwrap(), 4096);
        for bad in [
            "0",
            "-1",
            "100",
            "1.5G",
            "G",
            "65T",
            "99999999999999999999",
            "1E",
        ] {
            assert!(parse_disk_size(bad).is_err(), "{bad:?} accepted");
        }
    }
}
