#!/usr/bin/env bash
# A/B run of one dynakv binary: a 3-node `dynakv dev` cluster on free-ish 127.0.0.1 ports,
# workload a (zipfian, buffered) then workload w, 50 clients, 1 KiB values; prints ops/s and
# p99/p99.9 per operation. Run it for each binary in turn, on a quiet machine.
#   scripts/bench-ab.sh target/release/dynakv LABEL
# DURABILITY=fsync runs both workloads with fsync'd writes (default: buffered); DEV_ARGS adds
# arguments to `dynakv dev` (e.g. DEV_ARGS="--runtime per-node").
set -euo pipefail
DURABILITY=${DURABILITY:-buffered}
read -r -a DEV_EXTRA <<<"${DEV_ARGS:-}"
BIN=$1
LABEL=${2:-run}
WORK=$(mktemp -d)
# shellcheck source=lib/ports.sh
source "$(dirname "$0")/lib/ports.sh"
PORT=$(free_port 3)
trap 'kill ${DEV_PID:-} 2>/dev/null; wait ${DEV_PID:-} 2>/dev/null; rm -rf "$WORK"' EXIT
start_dev "$BIN" "$PORT" "$WORK/dev" "$WORK/dev.log" "${DEV_EXTRA[@]}"
sleep 3
URLS=("${DEV_URLS[@]}")
"$BIN" bench "${URLS[@]}" --json --workload a --distribution zipfian --concurrency 50 \
    --value-size 1024 --records 100000 --ops 200000 --durability "$DURABILITY" >"$WORK/a.json"
"$BIN" bench "${URLS[@]}" --json --workload w --concurrency 50 --value-size 1024 \
    --records 100000 --ops 150000 --skip-load --durability "$DURABILITY" >"$WORK/w.json"
for w in a w; do
    /usr/bin/python3 -c "
import json, sys
d = json.load(open('$WORK/$w.json'))
ops = {k: (round(v['p99_ms'], 1), round(v['p999_ms'], 1)) for k, v in d.items() if isinstance(v, dict) and 'p99_ms' in v}
cpu = d.get('server_cpu_us_per_op')
cpu = 'server cpu %.0f us/op' % cpu if cpu is not None else 'server cpu not measured'
print('$LABEL', '$DURABILITY', '$w', int(d['throughput_ops_per_sec']), 'ops/s; p99/p99.9 ms', ops, cpu)"
done
