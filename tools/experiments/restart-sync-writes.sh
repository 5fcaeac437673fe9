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
. "$(dirname "$0")/common.sh"
spares() { find "$D/site/machines/vm1/journal" -name '*.spare' | wc -l; }
stop_serve; rm -rf "$D"; mkdir -p "$D/mnt"
make_site
start_serve
write_1g "$D/mnt/vm1/bench.img"
wait_merged
for r in 1 2 3; do
  stop_serve
  before=$(spares)
  start_serve
  iops=$(fio --name=s --filename="$D/mnt/vm1/bench.img" --rw=randwrite --bs=4k --size=256M \
    --fdatasync=1 --ioengine=psync --runtime=10 --time_based --output-format=json |
    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))')
  echo "restart $r: $before spares on disk at the restart; 4 KiB randwrite + fdatasync: $iops IOPS"
done
stop_serve; rm -rf "$D"
