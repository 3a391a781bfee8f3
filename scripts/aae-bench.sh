#!/usr/bin/env bash
# Measures how long anti-entropy takes to restore a wiped node holding RECORDS keys (1 KiB
# values, N=3 on 3 nodes, so the node holds every key), and what that does to foreground
# latency: a fixed-concurrency workload-a run before the wipe (baseline) and one while the node
# is being restored. Usage: scripts/aae-bench.sh [RECORDS]   (default 100000)
set -euo pipefail
RECORDS=${1:-100000}
BIN=${BIN:-target/release/dynakv}
DIR=$(mktemp -d /tmp/dynakv-aae-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
start() { # name http peer [join]
  local join=()
  [ -n "${4:-}" ] && join=(--join "127.0.0.1:$4")
  "$BIN" server --name "$1" --http "127.0.0.1:$2" --peer "127.0.0.1:$3" --data-dir "$DIR/$1" "${join[@]}" >"$DIR/$1.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$2/ping" >/dev/null && return; sleep 0.1; done
  echo "node $1 did not start"; exit 1
}
settled() { curl -sf "http://127.0.0.1:$1/admin/ring" | grep -q '"settled":true'; }
start a1 18301 19301
start a2 18302 19302 19301
start a3 18303 19303 19301
until settled 18301 && settled 18302 && settled 18303 && [ "$(curl -s http://127.0.0.1:18301/admin/ring | grep -o '"node"' | wc -l)" -ge 3 ]; do sleep 0.5; done
URLS=(--url http://127.0.0.1:18301 --url http://127.0.0.1:18302)
echo "== load $RECORDS records"
"$BIN" bench "${URLS[@]}" --workload w --records "$RECORDS" --ops 0 --concurrency 32 2>&1 | grep -E "^load" || true
echo "== baseline: workload a, uniform, 20 clients, 30000 ops (a3 healthy)"
"$BIN" bench "${URLS[@]}" --skip-load --workload a --distribution uniform --records "$RECORDS" --ops 30000 --concurrency 20 --json 2>/dev/null
keys_on_a3() { curl -sf http://127.0.0.1:18303/admin/aae | python3 -c 'import json,sys; print(sum(p["keys"] for p in json.load(sys.stdin)["partitions"]))'; }
echo "== a3 holds $(keys_on_a3) keys; wiping it"
kill "${PIDS[2]}"; wait "${PIDS[2]}" 2>/dev/null || true
rm -rf "$DIR/a3"
START=$(date +%s.%N)
start a3 18303 19303 19301
( "$BIN" bench "${URLS[@]}" --skip-load --workload a --distribution uniform --records "$RECORDS" --ops 30000 --concurrency 20 --json 2>/dev/null > "$DIR/during.json" ) &
BENCH=$!
while true; do
  n=$(keys_on_a3 || echo 0)
  if [ "$n" -ge "$RECORDS" ]; then break; fi
  sleep 0.5
done
END=$(date +%s.%N)
echo "== anti-entropy restored $RECORDS keys on the wiped node in $(python3 -c "print(round($END-$START,1))") s"
wait $BENCH
echo "== during the restore: workload a, same settings"
cat "$DIR/during.json"
