# Shared by the scripts in tools/experiments (sourced, not run). They set R (the
# replog binary) and D (their directory) before sourcing it: a site at $D/site with
# machine vm1, served with its mount at $D/mnt.

# Create the site and a 2 GiB disk vm1/bench.
make_site() {
  "$R" init "$D/site" >/dev/null
  "$R" disk create "$D/site" vm1/bench --size $((2 << 30)) >/dev/null
}

# Serve the site (its log appended to $D/serve.log) until the disk is mounted; any
# arguments are passed to serve.
start_serve() {
  REPLOG_LOG=warn "$R" serve "$D/site" --mount "$D/mnt" "$@" 2>>"$D/serve.log" &
  for _ in $(seq 100); do [ -e "$D/mnt/vm1/bench.img" ] && break; sleep 0.1; done
}

# Stop the serve (SIGTERM, waiting for it) and detach its mount if it is left.
stop_serve() {
  pkill -f "serve $D/site" || true
  for _ in $(seq 100); do pgrep -f "serve $D/site" >/dev/null || break; sleep 0.1; done
  umount "$D/mnt" 2>/dev/null || true
}

# Wait (at most 60 s) until the journal holds at most one segment: merged.
wait_merged() {
  for _ in $(seq 600); do
    j=$("$R" status "$D/site" --json |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["machines"][0]["journal_bytes"])')
    [ "$j" -le $((64 << 20)) ] && return
    sleep 0.1
  done
}

# Write 1 GiB to FILE in 1 MiB direct writes (libaio, depth 4), fsynced at the end.
write_1g() {
  fio --name=w --filename="$1" --rw=write --bs=1M --size=1G --direct=1 --ioengine=libaio \
    --iodepth=4 --end_fsync=1 >/dev/null
}

# Write back and drop the page cache.
drop_caches() {
  sync; echo 3 >/proc/sys/vm/drop_caches
}

# Read 1 GiB of FILE in 1 MiB direct reads (libaio, depth 16); prints "N MB/s (median
# X ms, p99 Y ms)".
fio_read16() {
  fio --name=r --filename="$1" --rw=read --bs=1M --size=1G --direct=1 --ioengine=libaio \
    --iodepth=16 --readonly --output-format=json |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["jobs"][0]["read"]; p=r["clat_ns"]["percentile"]; print("%.0f MB/s (median %.1f ms, p99 %.1f ms)" % (r["bw_bytes"]/1e6, p["50.000000"]/1e6, p["99.000000"]/1e6))'
}

# fio_read16 with the caches dropped first.
read16() {
  drop_caches; fio_read16 "$1"
}

# A fresh site served (any arguments passed to serve), with 1 GiB written to its disk
# and to a plain file beside it ($D/plain.img), and merged.
setup_written() {
  stop_serve; rm -rf "$D"; mkdir -p "$D/mnt"
  make_site
  truncate -s 2G "$D/plain.img"
  start_serve "$@"
  for f in "$D/plain.img" "$D/mnt/vm1/bench.img"; do write_1g "$f"; done
  wait_merged
}
