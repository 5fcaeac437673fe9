#!/usr/bin/env python3
"""CPU time per replog round of `replog-bench --only initial` (or any group whose
target sessions run as threads named `replication-ses`), from a system-wide profile:

    perf record -a -F 499 -o P.perf target/release/replog-bench --no-fuse --only initial --dir D
    tools/experiments/cpu-by-round.py P.perf [499]

A round is a burst of `replication-ses` samples (gaps over 0.3 s split them; rsync's
rounds in between have none). For each it prints the burst's length and the CPU-ms of
the target's session threads (`ses`: the session and the store/hash threads it starts)
and of the bench's own threads (`bench`: the source's reader and shipper). Used for
docs/DESIGN.md, "Hash pages" (the initial copy in place): steadier than wall time."""
import collections
import re
import subprocess
import sys

path = sys.argv[1]
hz = float(sys.argv[2]) if len(sys.argv) > 2 else 499.0
out = subprocess.run(["perf", "script", "-i", path, "-F", "comm,tid,time"],
                     capture_output=True, text=True, check=True).stdout
rows = []
for line in out.splitlines():
    m = re.match(r"\s*(.+?)\s+(\d+)\s+([\d.]+):", line)
    if m:
        rows.append((m.group(1), float(m.group(3))))
ts = sorted(t for c, t in rows if c.startswith("replication-ses"))
if not ts:
    sys.exit("no replication-ses samples")
bursts, start, prev = [], ts[0], ts[0]
for t in ts[1:]:
    if t - prev > 0.3:
        bursts.append((start, prev))
        start = t
    prev = t
bursts.append((start, prev))
for a, b in bursts:
    if b - a < 0.3:
        continue
    count = collections.Counter(c for c, t in rows if a <= t <= b)
    print("%.2f s: ses %.0f CPU-ms, bench %.0f CPU-ms" % (
        b - a, count.get("replication-ses", 0) * 1000 / hz,
        count.get("replog-bench", 0) * 1000 / hz))
