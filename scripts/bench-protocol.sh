#!/usr/bin/env bash
# HTTP against Riak's PB API on the same cluster: one 3-node `dynakv dev`, workload a
# (zipfian over 100k keys, 1 KiB, 50 clients) and workload w, each run over HTTP and over PB
# in turn, ROUNDS times (default 2). DURABILITY=fsync for fsync'd writes (default buffered).
#   scripts/bench-protocol.sh target/release/dynakv
set -euo pipefail
BIN=$1
DURABILITY=${DURABILITY:-buffered}
# shellcheck source=lib/ports.sh
source "$(dirname "$0")/lib/ports.sh"
WORK=$(mktemp -d)
PORT=$(free_port 3)
trap 'kill ${DEV_PID:-} 2>/dev/null; wait ${DEV_PID:-} 2>/dev/null; rm -rf "$WORK"' EXIT
start_dev "$BIN" "$PORT" "$WORK/dev" "$WORK/dev.log"
sleep 3
PB=()
for k in 0 1 2; do PB+=(--pb "127.0.0.1:$((PORT + 2000 + k))"); done
"$BIN" bench "${DEV_URLS[@]}" --json --workload a --concurrency 50 --records 100000 \
    --ops 50000 --durability "$DURABILITY" >/dev/null 2>&1
for _ in $(seq "${ROUNDS:-2}"); do
    for workload in a w; do
        for protocol in http pb; do
            "$BIN" bench "${DEV_URLS[@]}" "${PB[@]}" --protocol "$protocol" --json \
                --workload "$workload" --distribution zipfian --concurrency 50 \
                --value-size 1024 --records 100000 --ops 150000 --skip-load \
                --durability "$DURABILITY" 2>/dev/null >"$WORK/r.json"
            /usr/bin/python3 -c "
import json
d = json.load(open('$WORK/r.json'))
ops = {k: (round(v['p50_ms'], 2), round(v['p999_ms'], 1)) for k, v in d.items() if isinstance(v, dict) and 'p999_ms' in v}
print('$workload $protocol:', int(d['throughput_ops_per_sec']), 'ops/s,', d.get('errors'), 'errors,',
      d.get('unavailable'), 'unavailable; p50/p99.9 ms', ops,
      'server us/op', round(d.get('server_cpu_us_per_op') or 0, 1),
      'generator us/op', round(d.get('generator_cpu_us_per_op') or 0, 1))"
        done
    done
done
