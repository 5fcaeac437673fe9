#!/bin/bash
# Depth-1 sequential writes through a replog mount against a plain file, before and
# after churning through the page cache (docs/FUSE.md, "What the full run adds before
# the fio group"). Run as root from the project's root after
# `cargo build --release --bins`; uses DIR (default /tmp/churn), removed at the end.
#
# Each round: wait for the journal to be merged, then 1 GiB of 1 MiB O_DIRECT writes
# (psync, end_fsync) to the plain file and then to the mount. Rounds: two before; two
# after writing 40,000 files of 128 KiB and deleting every other one; two after
# dropping the caches with those files still there; two after reading them back; two
# after removing them.
set -eu
R=${R:-$PWD/target/release/replog}
D=${DIR:-/tmp/churn}
. "$(dirname "$0")/common.sh"
stop_serve; rm -rf "$D"; mkdir -p "$D/mnt"
make_site
truncate -s 2G "$D/plain.img"
start_serve
fiojob() {
  fio --name=b --filename="$1" --rw=write --bs=1M --size=1G --direct=1 --ioengine=psync \
    --end_fsync=1 --output-format=json |
    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["bw_bytes"]/1e6))'
}
round() {
  wait_merged
  p=$(fiojob "$D/plain.img"); v=$(fiojob "$D/mnt/vm1/bench.img")
  echo "$1: plain $p MB/s, replog $v MB/s, ratio $(python3 -c "print(round($v/$p, 2))")"
}
fiojob "$D/plain.img" >/dev/null; fiojob "$D/mnt/vm1/bench.img" >/dev/null
round before; round before
mkdir -p "$D/churn"
python3 - "$D/churn" <<'PY'
import os, sys
buf = os.urandom(128 << 10)
for i in range(40000):
    with open(os.path.join(sys.argv[1], str(i)), "wb") as f:
        f.write(buf)
PY
sync; find "$D/churn" -name '*[02468]' -delete; sync
round churned; round churned
drop_caches
round "churned, caches dropped"; round "churned, caches dropped"
cat "$D"/churn/* >/dev/null
round "churned, read back"; round "churned, read back"
rm -rf "$D/churn"; sync
round removed; round removed
stop_serve; rm -rf "$D"
