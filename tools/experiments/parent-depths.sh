#!/bin/bash
# Sequential 1 MiB O_DIRECT reads at depth 4 and 16 through the mount against fio
# reading the parent image itself, for each replog binary given (A/B of two builds:
# pass them alternated, e.g. `old new old new`): a 1 GiB write through the mount,
# merged, then per depth two rounds (caches dropped before each read). Prints MB/s and
# latency, and the bytes serve's direct reads took from its read-ahead and from the
# disk. Run as root from the project's root; uses DIR (default /tmp/parent-depths),
# removed at the end. A binary given as PATH:nohuge is run with REPLOG_NO_HUGE=1 (read
# only by builds that had that temporary switch).
set -eu
D=${DIR:-/tmp/parent-depths}
. "$(dirname "$0")/common.sh"
port=$((20000 + RANDOM % 20000))
fio_read() {
  drop_caches
  fio --name=r --filename="$1" --rw=read --bs=1M --size=1G --direct=1 --ioengine=libaio \
    --iodepth="$2" --readonly --output-format=json |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["jobs"][0]["read"]; p=r["clat_ns"]["percentile"]; print("%5.0f MB/s (median %.2f ms, p99 %.1f ms)" % (r["bw_bytes"]/1e6, p["50.000000"]/1e6, p["99.000000"]/1e6))'
}
for b in "$@"; do
  R=${b%:nohuge}
  if [ "$R" != "$b" ]; then export REPLOG_NO_HUGE=1; else unset REPLOG_NO_HUGE; fi
  stop_serve; rm -rf "$D"; mkdir -p "$D/mnt"
  make_site
  start_serve --metrics "127.0.0.1:$port"
  write_1g "$D/mnt/vm1/bench.img"
  wait_merged
  P="$D/site/machines/vm1/disks/bench.img"
  for depth in 4 16; do
    for r in 1 2; do
      echo "$b depth $depth: parent $(fio_read "$P" "$depth") mount $(fio_read "$D/mnt/vm1/bench.img" "$depth")"
    done
  done
  curl -s "http://127.0.0.1:$port/metrics" | grep "^replog_direct_read_bytes_total" | tr '\n' ' '; echo
done
stop_serve; rm -rf "$D"
