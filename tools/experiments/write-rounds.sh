#!/bin/bash
# 1 GiB of 1 MiB O_DIRECT writes (libaio, DEPTH deep, default 4; end_fsync) to a plain
# file and then through a replog mount, ROUNDS times (default 3), the journal merged
# before each round, both sides written once first — the shape of the bench's fio
# write figures (docs/FUSE.md, "What bounds 1 MiB writes at depth 4"). Run as root from
# the project's root after `cargo build --release --bins`; any arguments go to serve;
# uses DIR (default /tmp/write-rounds), removed at the end.
set -eu
R=${R:-$PWD/target/release/replog}
D=${DIR:-/tmp/write-rounds}
DEPTH=${DEPTH:-4}
. "$(dirname "$0")/common.sh"
stop_serve; rm -rf "$D"; mkdir -p "$D/mnt"
make_site
truncate -s 2G "$D/plain.img"
start_serve "$@"
fiojob() {
  fio --name=b --filename="$1" --rw=write --bs=1M --size=1G --direct=1 --ioengine=libaio \
    --iodepth="$DEPTH" --end_fsync=1 --output-format=json |
    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["bw_bytes"]/1e6))'
}
fiojob "$D/plain.img" >/dev/null; fiojob "$D/mnt/vm1/bench.img" >/dev/null
for i in $(seq "${ROUNDS:-3}"); do
  wait_merged
  p=$(fiojob "$D/plain.img"); v=$(fiojob "$D/mnt/vm1/bench.img")
  echo "round $i: plain $p MB/s, replog $v MB/s, ratio $(python3 -c "print(round($v/$p, 2))")"
done
stop_serve; rm -rf "$D"
