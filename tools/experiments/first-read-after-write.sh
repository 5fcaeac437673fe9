#!/bin/bash
# Sequential 1 MiB reads at depth 16 (libaio, O_DIRECT, caches dropped before each)
# after a 1 GiB write through the mount, merged (docs/FUSE.md, "Sequential reads at
# depth 16, round by round"): two rounds reading the machine's parent image directly,
# then two through the mount, each beside the same read of a plain file. Run as root
# from the project's root after `cargo build --release --bins`; uses DIR (default
# /tmp/first-read), removed at the end.
set -eu
R=${REPLOG:-$PWD/target/release/replog}
D=${DIR:-/tmp/first-read}
. "$(dirname "$0")/common.sh"
setup_written
parent="$D/site/machines/vm1/disks/bench.img"
for r in 1 2; do echo "round $r: plain $(read16 "$D/plain.img"); parent read directly $(read16 "$parent")"; done
for r in 3 4; do echo "round $r: plain $(read16 "$D/plain.img"); through the mount $(read16 "$D/mnt/vm1/bench.img")"; done
stop_serve; rm -rf "$D"
