#!/usr/bin/env bash
# HTTP pipelining A/B: one 3-node `dynakv dev`, workload a (buffered, zipfian, 1 KiB) at
# several clients x pipeline depths, alternated ROUNDS times (default 2).
#   scripts/bench-pipeline.sh target/release/dynakv
# SPECS="50:1 50:4" picks the clients:depth points (default 50:1 50:4 10:5 200:1).
set -euo pipefail
BIN=$1
# shellcheck source=lib/ports.sh
source "$(dirname "$0")/lib/ports.sh"
WORK=$(mktemp -d)
PORT=$(free_port 3)
trap 'kill ${DEV_PID:-} 2>/dev/null; wait ${DEV_PID:-} 2>/dev/null; rm -rf "$WORK"' EXIT
start_dev "$BIN" "$PORT" "$WORK/dev" "$WORK/dev.log"
sleep 3
"$BIN" bench "${DEV_URLS[@]}" --json --workload a --concurrency 50 --records 100000 \
    --ops 50000 --durability buffered >/dev/null 2>&1
read -r -a POINTS <<<"${SPECS:-50:1 50:4 10:5 200:1}"
for _ in $(seq "${ROUNDS:-2}"); do
    for point in "${POINTS[@]}"; do
        clients=${point%:*} depth=${point#*:}
        "$BIN" bench "${DEV_URLS[@]}" --json --workload a --distribution zipfian \
            --concurrency "$clients" --pipeline "$depth" --value-size 1024 --records 100000 \
            --ops 150000 --skip-load --durability buffered 2>/dev/null >"$WORK/r.json"
        /usr/bin/python3 -c "
import json
d = json.load(open('$WORK/r.json'))
ops = {k: (round(v['p50_ms'], 2), round(v['p999_ms'], 1)) for k, v in d.items() if isinstance(v, dict) and 'p999_ms' in v}
print('clients $clients depth $depth:', int(d['throughput_ops_per_sec']), 'ops/s,',
      d.get('unavailable'), 'unavailable,', d.get('errors'), 'errors; p50/p99.9 ms', ops,
      'server us/op', round(d.get('server_cpu_us_per_op') or 0, 1))"
    done
done
