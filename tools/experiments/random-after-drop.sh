#!/bin/bash
# Does a random reader through the mount gain from memory the page cache just let go?
# (The hypothesis for random reads measuring 1.55-1.58x by default against 1.90-1.98x
# with --cached-reads, docs/FUSE.md.) A 1 GiB write through the mount, merged, and a
# plain file beside it; then per round 4 KiB O_DIRECT random reads at depth 16 for 8 s
# on the mount with the caches dropped 5 s before, on the mount right after 2 GiB of
# page cache (the parent and the plain file read whole) was dropped, and on the plain
# file. Run as root from the project's root after `cargo build --release --bins`; uses
# DIR (default /tmp/random-after-drop), removed at the end.
set -eu
R=${REPLOG:-$PWD/target/release/replog}
D=${DIR:-/tmp/random-after-drop}
. "$(dirname "$0")/common.sh"
setup_written
P="$D/site/machines/vm1/disks/bench.img"
rr() { fio --name=r --filename="$1" --rw=randread --bs=4k --size=1G --direct=1 --ioengine=libaio --iodepth=16 --runtime=8 --time_based --readonly --output-format=terse --terse-version=3 | awk -F';' '{printf "%d", $8}'; }
for r in 1 2 3; do
  drop_caches; sleep 5
  a=$(rr "$D/mnt/vm1/bench.img")
  dd if="$P" of=/dev/null bs=1M count=1024 status=none; dd if="$D/plain.img" of=/dev/null bs=1M count=1024 status=none
  drop_caches
  b=$(rr "$D/mnt/vm1/bench.img")
  drop_caches; sleep 5
  c=$(rr "$D/plain.img")
  echo "round $r: mount after 5 s idle $a IOPS; mount right after 2 GiB of page cache was dropped $b IOPS; plain file $c IOPS"
done
stop_serve; rm -rf "$D"
