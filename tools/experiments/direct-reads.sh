#!/bin/bash
# The slow first read at depth 16 and serve --direct-reads (docs/FUSE.md, "The slow
# first read, explained"): for each variant (--cached-reads, serve's default before
# 2026-12-06, then --direct-reads), a 1 GiB write through the mount and one to a plain
# file, merged, then two rounds of 1 MiB reads at depth 16 (libaio, O_DIRECT, caches dropped before each), the plain
# file beside the mount. Each read prints fio's figures, the disk's requests
# (/proc/diskstats), the machine's system and steal time (/proc/stat) and serve's own
# system time, in seconds. Run as root from the project's root after
# `cargo build --release --bins`; uses DIR (default /tmp/direct-reads), removed at the
# end.
set -eu
R=${REPLOG:-$PWD/target/release/replog}
D=${DIR:-/tmp/direct-reads}
. "$(dirname "$0")/common.sh"
dev=$(lsblk -no PKNAME "$(findmnt -no SOURCE -T "${D%/*}")" 2>/dev/null || true)
dev=${dev:-vda}
hz=$(getconf CLK_TCK)
# reads, sectors read, ms reading; system, steal ticks; serve's stime ticks
counters() {
  awk -v d="$dev" '$3==d {printf "%s %s %s ", $4, $6, $7}' /proc/diskstats
  awk '/^cpu /{printf "%s %s ", $4, $9}' /proc/stat
  awk '{print $15}' "/proc/$(pgrep -f "serve $D/site" | head -1)/stat"
}
# read16 (common.sh), with the counters read around the read (after the drop).
counted_read16() {
  local a b fio
  drop_caches
  a=$(counters)
  fio=$(fio_read16 "$1")
  b=$(counters)
  python3 - "$a" "$b" "$fio" "$hz" <<'PY'
import sys
a, b = (list(map(int, x.split())) for x in sys.argv[1:3])
d = [y - x for x, y in zip(a, b)]
hz = int(sys.argv[4])
print(f"{sys.argv[3]}; disk {d[0]} reads of {d[1] * 512 / max(d[0], 1) / 1024:.0f} KiB, "
      f"{d[2] / max(d[0], 1):.1f} ms each; system {d[3] / hz:.2f} s, steal {d[4] / hz:.2f} s, "
      f"serve's system time {d[5] / hz:.2f} s")
PY
}
for variant in --cached-reads --direct-reads; do
  setup_written "$variant"
  echo "serve $variant:"
  for r in 1 2; do
    echo "  round $r plain: $(counted_read16 "$D/plain.img")"
    echo "  round $r mount: $(counted_read16 "$D/mnt/vm1/bench.img")"
  done
done
stop_serve; rm -rf "$D"
