#!/bin/bash
# Sequential 1 MiB O_DIRECT reads at depth 1, 4 and 16 through the mount against a
# plain file on the same disk, for each serve variant given (default: serve's
# default, then --direct-reads): a 1 GiB write to each, merged, then for each depth
# two rounds (caches dropped before each read, the plain file first). Prints MB/s and
# latency per read, and for the mount the bytes serve's direct reads took from its
# read-ahead and from the disk (serve --metrics). Run as root from the project's root
# after `cargo build --release --bins`; uses DIR (default /tmp/read-depths), removed at
# the end. Variants are one serve argument each ("default" for none).
set -eu
R=${REPLOG:-$PWD/target/release/replog}
D=${DIR:-/tmp/read-depths}
. "$(dirname "$0")/common.sh"
port=$((20000 + RANDOM % 20000))
fio_read() {
  fio --name=r --filename="$1" --rw=read --bs=1M --size=1G --direct=1 --ioengine=libaio \
    --iodepth="$2" --readonly --output-format=json |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["jobs"][0]["read"]; p=r["clat_ns"]["percentile"]; print("%5.0f MB/s (median %.1f ms, p99 %.1f ms)" % (r["bw_bytes"]/1e6, p["50.000000"]/1e6, p["99.000000"]/1e6))'
}
direct_bytes() {
  curl -s "http://127.0.0.1:$port/metrics" |
    awk '/^replog_direct_read_bytes_total/ {split($1, a, "\""); printf "%s %.0f MiB ", a[2], $2 / 1048576}'
}
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(default --direct-reads)
for variant in "${variants[@]}"; do
  args=(--metrics "127.0.0.1:$port")
  [ "$variant" = default ] || args+=("$variant")
  setup_written "${args[@]}"
  echo "serve $variant:"
  for depth in 1 4 16; do
    for r in 1 2; do
      drop_caches; p=$(fio_read "$D/plain.img" "$depth")
      drop_caches; m=$(fio_read "$D/mnt/vm1/bench.img" "$depth")
      echo "  depth $depth round $r: plain $p; mount $m; $(direct_bytes)"
    done
  done
done
stop_serve; rm -rf "$D"
