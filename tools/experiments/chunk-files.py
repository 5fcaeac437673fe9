#!/usr/bin/env python3
"""The file pattern of one initial-copy batch at the target, alone: 64 files of
256 KiB written from 8 threads, each fdatasynced, renamed into place, then the
directory fsynced (what `DirBackend::put_batch` does with a 16 MiB batch), against
one 16 MiB file written and fdatasynced. Used for docs/DESIGN.md, "Hash pages" (what
bounds the initial copy): run it on the file system the benchmarks use.

    tools/experiments/chunk-files.py DIR [ROUNDS]

Modes: `files` (as above), `direct` (final names written directly: no temporary
files, no renames), `files2` (two batches at once, 16 threads), `sfr` (every file
written and its writeback started with sync_file_range first, then all fdatasynced
from 8 threads: what `put_batch` does since 2026-12-06), `one` (one file).
Prints the median, min and max milliseconds per batch of each mode, alternated."""
import ctypes
import os
import shutil
import statistics
import sys
import threading
import time

CHUNK = 256 << 10
DIR = sys.argv[1]
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 12
DATA = os.urandom(64 * CHUNK)
LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
SYNC_FILE_RANGE_WRITE = 2


def batch(d, mode):
    par = 2 if mode == "files2" else 1
    direct = mode == "direct"
    late = mode == "sfr"

    def writer(first):
        for i in range(first, first + 8):
            name = os.path.join(d, f"{i}.enc" if direct else f"{i}.tmp")
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            k = i % 64
            os.pwrite(fd, DATA[k * CHUNK:(k + 1) * CHUNK], 0)
            if late:
                LIBC.sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(0),
                                     SYNC_FILE_RANGE_WRITE)
            else:
                os.fdatasync(fd)
            os.close(fd)

    def syncer(first):
        for i in range(first, first + 8):
            fd = os.open(os.path.join(d, f"{i}.tmp"), os.O_WRONLY)
            os.fdatasync(fd)
            os.close(fd)

    for work in (writer, syncer) if late else (writer,):
        threads = [threading.Thread(target=work, args=(t * 8,)) for t in range(8 * par)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if not direct:
        for i in range(64 * par):
            os.rename(os.path.join(d, f"{i}.tmp"), os.path.join(d, f"{i}.enc"))
    fd = os.open(d, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def one(d):
    fd = os.open(os.path.join(d, "one"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.pwrite(fd, DATA, 0)
    os.fdatasync(fd)
    os.close(fd)


times = {m: [] for m in ("files", "direct", "files2", "sfr", "one")}
os.makedirs(DIR, exist_ok=True)
for r in range(ROUNDS):
    for mode in times:
        d = os.path.join(DIR, f"{mode}-{r}")
        os.makedirs(d)
        t = time.perf_counter()
        if mode == "one":
            one(d)
        else:
            batch(d, mode)
        times[mode].append((time.perf_counter() - t) * 1e3)
shutil.rmtree(DIR)
for mode, v in times.items():
    print(f"{mode}: median {statistics.median(v):.1f} ms, min {min(v):.1f}, max {max(v):.1f} ({len(v)} batches)")
