#!/usr/bin/env bash
# Data types on one 3-node `dynakv dev` (issue 21): counter increments and set adds (workload
# w: updates only; DIST keys, uniform by default, over RECORDS keys, 50 clients) over HTTP and
# over PB, next to plain 1 KiB puts (the reference, same cluster, same run), ROUNDS times
# (default 2). Each run uses a bucket of its own, so a set's size is what that run's adds
# made it (a set update costs in proportion to the set: its whole state is merged, stored and
# shipped to the replicas). DURABILITY=fsync for fsync'd writes (default buffered).
#   scripts/bench-datatypes.sh target/release/dynakv
set -euo pipefail
BIN=$1
DURABILITY=${DURABILITY:-buffered}
RECORDS=${RECORDS:-100000}
DIST=${DIST:-uniform}
OPS=${OPS:-100000}
# shellcheck source=lib/ports.sh
source "$(dirname "$0")/lib/ports.sh"
WORK=$(mktemp -d)
PORT=$(free_port 3)
trap 'kill ${DEV_PID:-} 2>/dev/null; wait ${DEV_PID:-} 2>/dev/null; rm -rf "$WORK"' EXIT
start_dev "$BIN" "$PORT" "$WORK/dev" "$WORK/dev.log"
sleep 3
PB=()
for k in 0 1 2; do PB+=(--pb "127.0.0.1:$((PORT + 2000 + k))"); done
# Warm up, and load the plain bucket's keys.
"$BIN" bench "${DEV_URLS[@]}" --json --workload w --concurrency 50 --records "$RECORDS" \
    --ops 20000 --durability "$DURABILITY" >/dev/null 2>&1
report() {
    /usr/bin/python3 -c "
import json
d = json.load(open('$WORK/r.json'))
ops = {k: (round(v['p50_ms'], 2), round(v['p999_ms'], 1)) for k, v in d.items() if isinstance(v, dict) and 'p999_ms' in v}
print('$1:', int(d['throughput_ops_per_sec']), 'ops/s,', d.get('errors'), 'errors,',
      d.get('unavailable'), 'unavailable; p50/p99.9 ms', ops,
      'server us/op', round(d.get('server_cpu_us_per_op') or 0, 1))"
}
RUN=0
for _ in $(seq "${ROUNDS:-2}"); do
    for protocol in http pb; do
        for what in plain counter set; do
            RUN=$((RUN + 1))
            ARGS=(--bucket "bench$RUN")
            [ "$what" != plain ] && ARGS+=(--datatype "$what")
            "$BIN" bench "${DEV_URLS[@]}" "${PB[@]}" --protocol "$protocol" --json \
                --workload w --distribution "$DIST" --concurrency 50 --value-size 1024 \
                --records "$RECORDS" --ops "$OPS" --skip-load --durability "$DURABILITY" \
                "${ARGS[@]}" 2>"$WORK/err" >"$WORK/r.json" || { cat "$WORK/err"; exit 1; }
            report "$what $protocol"
        done
    done
done
