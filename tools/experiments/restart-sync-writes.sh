#!/bin/bash
# 4 KiB random writes with an fdatasync each, for 10 s, right after each of three
# restarts of `replog serve` (docs/DESIGN.md, "Spare segment files"): the first
# restart follows a merged 1 GiB write, so the journal has spares to keep; the later
# ones follow only the 10 s runs, which leave fewer or none. Run as root from the
# project's root after `cargo build --release --bins`; REPLOG=path measures another
# build (alternate two builds to compare). Uses DIR (default /tmp/restart-sync),
# removed at the end.
set -eu
R=${REPLOG:-$PWD/target/release/replog}
D=${DIR:-/tmp/restart-sync}
stop() {
  pkill -f "serve $D/site" || true
  for _ in $(seq 100); do pgrep -f "serve $D/site" >/dev/null || break; sleep 0.1; done
  umount "$D/mnt" 2>/dev/null || true
}
start() {
  REPLOG_LOG=warn "$R" serve "$D/site" --mount "$D/mnt" 2>>"$D/serve.log" &
  for _ in $(seq 100); do [ -e "$D/mnt/vm1/bench.img" ] && break; sleep 0.1; done
}
spares() { find "$D/site/machines/vm1/journal" -name '*.spare' | wc -l; }
stop; rm -rf "$D"; mkdir -p "$D/mnt"
"$R" init "$D/site" >/dev/null
"$R" disk create "$D/site" vm1/bench --size $((2 << 30)) >/dev/null
start
fio --name=w --filename="$D/mnt/vm1/bench.img" --rw=write --bs=1M --size=1G --direct=1 \
  --ioengine=libaio --iodepth=4 --end_fsync=1 >/dev/null
for _ in $(seq 600); do
  j=$("$R" status "$D/site" --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["machines"][0]["journal_bytes"])')
  [ "$j" -le $((64 << 20)) ] && break
  sleep 0.1
done
for r in 1 2 3; do
  stop
  before=$(spares)
  start
  iops=$(fio --name=s --filename="$D/mnt/vm1/bench.img" --rw=randwrite --bs=4k --size=256M \
    --fdatasync=1 --ioengine=psync --runtime=10 --time_based --output-format=json |
    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))')
  echo "restart $r: $before spares on disk at the restart; 4 KiB randwrite + fdatasync: $iops IOPS"
done
stop; rm -rf "$D"
