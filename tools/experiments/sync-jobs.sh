#!/bin/bash
# 4 KiB random writes with an fdatasync each, 1 and 4 jobs, through the mount served
# by default and with --direct-io, a plain file beside each (docs/FUSE.md, "Do four
# jobs' fsyncs share fdatasyncs at all?"). Per mode: a fresh site, 1 GiB written and
# merged first (so the journal writes into spare segments), then 8 s fio runs; with
# COUNT=1 also the serve's fdatasync calls during a 4-job run (perf stat). Run as root
# from the project's root after `cargo build --release --bins`; REPLOG=path measures
# another build; uses DIR (default /tmp/sync-jobs), removed at the end.
set -eu
R=${REPLOG:-$PWD/target/release/replog}
D=${DIR:-/tmp/sync-jobs}
. "$(dirname "$0")/common.sh"
run() {
  fio --name=s --filename="$1" --rw=randwrite --bs=4k --size=256M --fdatasync=1 \
    --ioengine=psync --runtime=8 --time_based --numjobs="$2" --group_reporting \
    --output-format=json |
    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))'
}
for round in 1 2; do
  for mode in default direct-io; do
    stop_serve; rm -rf "$D"; mkdir -p "$D/mnt"
    make_site
    if [ "$mode" = direct-io ]; then start_serve --direct-io; else start_serve; fi
    write_1g "$D/mnt/vm1/bench.img"; wait_merged
    [ -e "$D/plain.img" ] || write_1g "$D/plain.img"
    for j in 1 4; do
      p=$(run "$D/plain.img" "$j")
      counting=
      if [ "${COUNT:-0}" = 1 ] && [ "$j" = 4 ]; then
        pid=$(pgrep -f "serve $D/site" | head -1)
        perf stat -e syscalls:sys_enter_fdatasync -p "$pid" -- sleep 8 2>&1 |
          awk '/sys_enter_fdatasync/ {print "  serve fdatasyncs in 8 s: " $1}' &
        counting=$!
      fi
      m=$(run "$D/mnt/vm1/bench.img" "$j")
      # Only the count (the serve runs in the background too).
      [ -z "$counting" ] || wait "$counting"
      echo "round $round $mode jobs=$j: mount $m plain $p IOPS, ratio $(python3 -c "print(round($m/$p,3))")"
    done
  done
done
stop_serve; rm -rf "$D"
