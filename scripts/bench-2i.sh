#!/usr/bin/env bash
# Secondary index range queries on one 3-node `dynakv dev` (issue 21): RECORDS keys (default
# 100,000) written with the index entry n_int = the key's number, then range queries of
# RANGE terms (10 and 100) from uniform starting points, at 1 and 10 clients, next to plain
# gets of the same keys (the reference, same run).
#   scripts/bench-2i.sh target/release/dynakv
set -euo pipefail
BIN=$1
RECORDS=${RECORDS:-100000}
OPS=${OPS:-5000}
# shellcheck source=lib/ports.sh
source "$(dirname "$0")/lib/ports.sh"
WORK=$(mktemp -d)
PORT=$(free_port 3)
trap 'kill ${DEV_PID:-} 2>/dev/null; wait ${DEV_PID:-} 2>/dev/null; rm -rf "$WORK"' EXIT
start_dev "$BIN" "$PORT" "$WORK/dev" "$WORK/dev.log"
sleep 3
COMMON=(--json --bucket idx --records "$RECORDS" --distribution uniform --value-size 100
    --durability buffered)
"$BIN" bench "${DEV_URLS[@]}" "${COMMON[@]}" --workload w --ops 1 --concurrency 50 \
    --index-range 10 >/dev/null 2>"$WORK/load.err" || { cat "$WORK/load.err"; exit 1; }
report() {
    /usr/bin/python3 -c "
import json
d = json.load(open('$WORK/r.json'))
r = d.get('read', {})
print('$1:', int(d['throughput_ops_per_sec']), 'ops/s,', d.get('errors'), 'errors; read ms p50',
      round(r.get('p50_ms', 0), 2), 'p99', round(r.get('p99_ms', 0), 2), 'p99.9', round(r.get('p999_ms', 0), 2),
      'server us/op', round(d.get('server_cpu_us_per_op') or 0, 1))"
}
for clients in 1 10; do
    "$BIN" bench "${DEV_URLS[@]}" "${COMMON[@]}" --workload c --ops "$OPS" --skip-load \
        --concurrency "$clients" 2>/dev/null >"$WORK/r.json"
    report "get, $clients client(s)"
    for range in 10 100; do
        "$BIN" bench "${DEV_URLS[@]}" "${COMMON[@]}" --workload c --ops "$OPS" --skip-load \
            --concurrency "$clients" --index-range "$range" 2>/dev/null >"$WORK/r.json"
        report "range of $range, $clients client(s)"
    done
done
