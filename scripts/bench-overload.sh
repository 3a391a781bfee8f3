#!/bin/bash
# Overload A/B of the adaptive in-flight limit: three `dynakv server` processes joined into one
# cluster (fjall), a closed loop, then about twice the closed-loop maximum offered.
#
#   scripts/bench-overload.sh BINARY TARGET_MS [OUT_DIR]
#
# TARGET_MS is `overload_latency_target_ms` (0: the limit stays at max_in_flight_requests).
# Prints one line per phase; the JSON of each phase is kept in OUT_DIR (default a temp dir).
# Environment: RATE (default 15000), CONC (default 400), RECORDS (default 100000).
set -euo pipefail
B=${1:?binary}; T=${2:?target ms}; W=${3:-$(mktemp -d)}
RATE=${RATE:-15000}; CONC=${CONC:-400}; RECORDS=${RECORDS:-100000}
mkdir -p "$W"
printf 'max_in_flight_requests = 64\noverload_latency_target_ms = %s\n' "$T" >"$W/c.toml"
# shellcheck source=lib/ports.sh
source "$(dirname "$0")/lib/ports.sh"
P=$(free_port 3)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for i in 0 1 2; do
    J=(); [ "$i" -gt 0 ] && J=(--join "127.0.0.1:$((P + 1000))")
    RUST_LOG=${RUST_LOG:-info} "$B" server --name "n$i" --http "127.0.0.1:$((P + i))" \
        --peer "127.0.0.1:$((P + 1000 + i))" --data-dir "$W/d$i" --config "$W/c.toml" "${J[@]}" \
        >"$W/n$i.log" 2>&1 &
    PIDS+=($!)
    sleep 2
done
sleep 12
U=(--url "http://127.0.0.1:$P" --url "http://127.0.0.1:$((P + 1))" --url "http://127.0.0.1:$((P + 2))")
C=(--distribution zipfian --value-size 1024 --json --durability buffered --records "$RECORDS")
"$B" bench "${U[@]}" "${C[@]}" --workload a --concurrency 50 --ops 100000 >"$W/closed.json"
"$B" bench "${U[@]}" "${C[@]}" --workload a --concurrency "$CONC" --rate "$RATE" \
    --ops $((RATE * 20)) --duration-secs 25 --skip-load >"$W/over.json"
/usr/bin/python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
f = lambda o: f"{o['p50_ms']:.1f}/{o['p99_ms']:.1f}/{o['p999_ms']:.1f}" if o.get("count") else "-"
c = json.load(open(f"{w}/closed.json")); d = json.load(open(f"{w}/over.json"))
print(f"closed: {c['throughput_ops_per_sec']:.0f} ops/s, read {f(c['read'])}, update {f(c['update'])}")
answered = d["read"]["count"] + d["update"]["count"]
print(f"overload: {answered / d['elapsed_sec']:.0f} ops/s answered, {d['unavailable']} 503s, "
      f"accepted from sending {f(d['accepted_service'])}, from due time read {f(d['read'])} update {f(d['update'])}")
PY
