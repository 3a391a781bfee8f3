#!/usr/bin/env bash
# CPU profile of a 3-node `dynakv dev` cluster under `dynakv bench` workload a (buffered, 50
# clients, 1 KiB values, zipfian over 100k keys): perf with DWARF call graphs on the dev
# process for 8 s in the middle of the run, then a flame graph (SVG) and the per-operation cost
# table (scripts/cost-table.py).
#
#   scripts/profile.sh [SERVER_BIN] [LABEL]     # default: target/release/dynakv, "profile"
#
# Needs perf (Debian's linux-perf) and inferno (`cargo install inferno`). Writes
# target/profile/LABEL.{svg,folded,md}. The cluster listens on free-ish 127.0.0.1 ports and is
# stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SBIN=${1:-$ROOT/target/release/dynakv}
LABEL=${2:-profile}
GEN=$ROOT/target/release/dynakv
OUT=$ROOT/target/profile
mkdir -p "$OUT"
for tool in perf inferno-collapse-perf inferno-flamegraph; do
    command -v "$tool" >/dev/null || { echo "$tool is missing (perf: apt-get install linux-perf; inferno: cargo install inferno)" >&2; exit 1; }
done
WORK=$(mktemp -d)
# shellcheck source=lib/ports.sh
source "$ROOT/scripts/lib/ports.sh"
PORT=$(free_port 3)
trap 'kill ${DEV_PID:-} 2>/dev/null; wait ${DEV_PID:-} 2>/dev/null; rm -rf "$WORK"' EXIT
start_dev "$SBIN" "$PORT" "$WORK/dev" "$WORK/dev.log"
PID=$DEV_PID
sleep 2
URLS=("${DEV_URLS[@]}")
"$GEN" bench "${URLS[@]}" --json --workload a --distribution zipfian --concurrency 50 --value-size 1024 \
    --records 100000 --ops 400000 --durability buffered >"$WORK/a.json" 2>/dev/null &
BENCH=$!
sleep 12
perf record -F 199 --call-graph dwarf,32768 -p "$PID" -o "$WORK/perf.data" -- sleep 8 >/dev/null 2>&1
wait $BENCH
US=$(/usr/bin/python3 -c "import json; print(json.load(open('$WORK/a.json'))['server_cpu_us_per_op'])")
perf script -i "$WORK/perf.data" 2>/dev/null | inferno-collapse-perf --all >"$OUT/$LABEL.folded"
inferno-flamegraph --title "dynakv 3-node dev, workload a, buffered, 50 clients: $LABEL" --width 1800 \
    --minwidth 1.5 --colors rust <"$OUT/$LABEL.folded" >"$OUT/$LABEL.svg"
/usr/bin/python3 "$ROOT/scripts/cost-table.py" "$OUT/$LABEL.folded" "$US" | tee "$OUT/$LABEL.md"
echo "server CPU $US us/op; flame graph $OUT/$LABEL.svg" >&2
