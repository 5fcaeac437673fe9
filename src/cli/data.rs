//! `replog write`, `replog read`: bytes in and out of a disk through the engine.

use replog::names::{parse_disk_ref, parse_size};
use replog::{Error, Result, Site};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

const CHUNK: usize = 4 << 20;

pub fn write(
    path: &Path,
    disk: &str,
    offset: u64,
    input: Option<&Path>,
    zero: Option<&str>,
) -> Result<()> {
    let (machine, disk) = parse_disk_ref(disk)?;
    let site = Site::open(path)?;
    let m = site.open_machine(&machine)?;
    let vol = m.volume(&disk)?;
    let mut written = 0u64;
    if let Some(z) = zero {
        let len = parse_size(z)?;
        vol.write_zeroes(offset, len)?;
        written = len;
    } else {
        let mut src: Box<dyn Read> = match input {
            None => {
                return Err(Error::InvalidInput(
                    "give --input FILE (or -) or --zero LEN".into(),
                ))
            }
            Some(p) if p == Path::new("-") => Box::new(std::io::stdin()),
            Some(p) => Box::new(File::open(p).map_err(|e| Error::Io {
                op: "open",
                path: p.into(),
                source: e,
            })?),
        };
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = read_full(&mut src, &mut buf).map_err(|e| Error::Io {
                op: "read",
                path: "input".into(),
                source: e,
            })?;
            if n == 0 {
                break;
            }
            vol.write(offset + written, buf.get(..n).unwrap_or(&[]))?;
            written += n as u64;
        }
    }
    let lsn = m.flush()?;
    m.close()?;
    println!("wrote {written} bytes to {machine}/{disk} at offset {offset}; durable at LSN {lsn}");
    Ok(())
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(buf.get_mut(n..).unwrap_or(&mut [])) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

pub fn read(
    path: &Path,
    disk: &str,
    offset: u64,
    length: Option<&str>,
    output: Option<&Path>,
) -> Result<()> {
    let (machine, disk) = parse_disk_ref(disk)?;
    let site = Site::open(path)?;
    let m = site.open_machine(&machine)?;
    let vol = m.volume(&disk)?;
    let len = match length {
        Some(l) => parse_size(l)?,
        None => vol.size().saturating_sub(offset),
    };
    let mut out_file = match output {
        Some(p) => {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)
                .map_err(|e| Error::Io {
                    op: "create",
                    path: p.into(),
                    source: e,
                })?;
            f.set_len(len).map_err(|e| Error::Io {
                op: "set length of",
                path: p.into(),
                source: e,
            })?;
            Some((f, p))
        }
        None => None,
    };
    let mut stdout = std::io::stdout().lock();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(CHUNK);
        let chunk = buf.get_mut(..n).unwrap_or(&mut []);
        vol.read(offset + done, chunk)?;
        match &mut out_file {
            Some((f, p)) => {
                // Sparse output: all-zero 4 KiB blocks stay holes.
                for (i, block) in chunk.chunks(4096).enumerate() {
                    if block.iter().any(|b| *b != 0) {
                        f.write_all_at(block, done + (i * 4096) as u64)
                            .map_err(|e| Error::Io {
                                op: "write",
                                path: (*p).into(),
                                source: e,
                            })?;
                    }
                }
            }
            None => stdout.write_all(chunk).map_err(|e| Error::Io {
                op: "write",
                path: "stdout".into(),
                source: e,
            })?,
        }
        done += n as u64;
    }
    Ok(())
}
