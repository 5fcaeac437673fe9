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
