#!/usr/bin/env bash
# Side-by-side performance run (issue 6): dynakv against Redis and a 3-member etcd cluster on
# this machine, in one run, then a table (stdout and $OUT/table.md) and PNG plots ($OUT/*.png).
#
#   scripts/bench-compare.sh            # the full run (about 15 minutes on 2 cores)
#   QUICK=1 scripts/bench-compare.sh    # fewer operations, smaller key counts (about 5 minutes)
#   KEYS_10M=1 scripts/bench-compare.sh # also the 10M-key point (long: ~30 GB written)
#
# Installs redis-server, etcd-server and python3-matplotlib from Debian's packages when they
# are missing (needs root or sudo). Every server listens on 127.0.0.1 ports chosen free at
# start, and everything started is stopped on exit. Results: $OUT (default target/bench-compare).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/target/bench-compare}
QUICK=${QUICK:-0}
KEYS_10M=${KEYS_10M:-0}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/dynakv-bench.XXXXXX)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    sleep 1
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

log() { echo "== $*" >&2; }

need_packages=()
command -v redis-server >/dev/null || need_packages+=(redis-server redis-tools)
command -v etcd >/dev/null || need_packages+=(etcd-server)
/usr/bin/python3 -c 'import matplotlib' 2>/dev/null || need_packages+=(python3-matplotlib)
if [ ${#need_packages[@]} -gt 0 ]; then
    log "installing ${need_packages[*]}"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${need_packages[@]}"
fi
# Debian starts the packaged services; they must not share the machine with the measurement.
for service in redis-server etcd; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
        systemctl stop "$service" || true
    fi
done

log "building"
cargo build --release -p dynakv >&2
DYNAKV=$ROOT/target/release/dynakv

# shellcheck source=lib/ports.sh
source "$ROOT/scripts/lib/ports.sh"

wait_http() { # url
    for _ in $(seq 1 200); do
        curl -sf "$1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "no answer from $1" >&2
    return 1
}

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

if [ "$QUICK" = 1 ]; then
    OPS=60000; RECORDS=100000; SWEEP_SECS=5; BIG_RECORDS=1000; KEYS_1M=300000
else
    OPS=200000; RECORDS=100000; SWEEP_SECS=10; BIG_RECORDS=2000; KEYS_1M=1000000
fi
BENCH_COMMON=(--distribution zipfian --value-size 1024 --json)
A50=(--workload a --concurrency 50)

machine() {
    echo "{\"cpus\": $(nproc), \"model\": \"$(awk -F: '/model name/ {gsub(/^ +/, "", $2); print $2; exit}' /proc/cpuinfo)\", \"mem_gib\": $(awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo), \"kernel\": \"$(uname -r)\", \"date\": \"$(date -u +%FT%TZ)\"}"
}
machine >"$OUT/machine.json"

# --- Redis, the reference -------------------------------------------------------------
log "redis"
RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
sleep 1
redis-benchmark -h 127.0.0.1 -p "$RPORT" -c 50 -d 1024 -n "$OPS" -t set,get --csv >"$OUT/redis.csv"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

# --- dynakv: 3-node dev cluster, durable engine --------------------------------------
log "dynakv dev, 3 nodes"
DPORT=$(free_port 3)
"$DYNAKV" dev --nodes 3 --http-port "$DPORT" --pb-port $((DPORT + 2000)) --data-dir "$WORK/dev" \
    >"$WORK/dev.log" 2>&1 &
DEV_PID=$!
PIDS+=($DEV_PID)
for k in 0 1 2; do wait_http "http://127.0.0.1:$((DPORT + k))/ping"; done
sleep 3
URLS=(--url "http://127.0.0.1:$DPORT" --url "http://127.0.0.1:$((DPORT + 1))" --url "http://127.0.0.1:$((DPORT + 2))")
"$DYNAKV" bench "${URLS[@]}" "${BENCH_COMMON[@]}" "${A50[@]}" --records "$RECORDS" --ops "$OPS" \
    --durability buffered >"$OUT/dev3-a-buffered.json"
"$DYNAKV" bench "${URLS[@]}" "${BENCH_COMMON[@]}" "${A50[@]}" --records "$RECORDS" --ops "$OPS" --skip-load \
    --durability buffered --client-routing >"$OUT/dev3-a-routing.json"
"$DYNAKV" bench "${URLS[@]}" "${BENCH_COMMON[@]}" "${A50[@]}" --records "$RECORDS" --ops "$OPS" --skip-load \
    --durability fsync >"$OUT/dev3-a-fsync.json"
"$DYNAKV" bench "${URLS[@]}" "${BENCH_COMMON[@]}" --concurrency 50 --workload w --records "$RECORDS" --ops "$OPS" \
    --skip-load --durability buffered >"$OUT/dev3-w-buffered.json"
log "one client"
"$DYNAKV" bench "${URLS[@]}" "${BENCH_COMMON[@]}" --workload a --concurrency 1 --records "$RECORDS" \
    --ops $((OPS / 10)) --skip-load --durability buffered >"$OUT/dev3-a-one-client.json"
MAX=$(/usr/bin/python3 -c "import json; print(int(json.load(open('$OUT/dev3-a-buffered.json'))['throughput_ops_per_sec']))")
log "load sweep (closed-loop max $MAX ops/s)"
for pct in 20 40 50 60 80 100 120; do
    rate=$((MAX * pct / 100))
    "$DYNAKV" bench "${URLS[@]}" "${BENCH_COMMON[@]}" --workload a --concurrency 200 --records "$RECORDS" \
        --ops $((rate * SWEEP_SECS)) --rate "$rate" --skip-load --durability buffered \
        >"$OUT/sweep-$pct.json"
done
log "overload: twice the sustainable rate"
rate=$((MAX * 2))
"$DYNAKV" bench "${URLS[@]}" "${BENCH_COMMON[@]}" --workload a --concurrency 1000 --records "$RECORDS" \
    --ops $((rate * SWEEP_SECS)) --rate "$rate" --duration-secs $((SWEEP_SECS + 5)) --skip-load \
    --durability buffered >"$OUT/overload.json"
log "value sizes"
for size in 100 1024 16384 262144; do
    records=$RECORDS
    [ "$size" -ge 16384 ] && records=$BIG_RECORDS
    "$DYNAKV" bench "${URLS[@]}" --workload a --concurrency 50 --json --value-size "$size" \
        --records "$records" --ops $((OPS / 4)) --bucket "vs$size" --durability buffered \
        >"$OUT/value-$size.json"
done
echo "{\"dev_process_rss_kib\": $(rss_kib $DEV_PID)}" >"$OUT/dev3-rss.json"
kill $DEV_PID; wait $DEV_PID 2>/dev/null || true

# --- dynakv: one node, memory engine -------------------------------------------------
log "dynakv, one node, memory engine"
SPORT=$(free_port); SPEER=$(free_port)
"$DYNAKV" server --name solo --http "127.0.0.1:$SPORT" --peer "127.0.0.1:$SPEER" \
    --data-dir "$WORK/solo-mem" --storage memory >"$WORK/solo-mem.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$SPORT/ping"
"$DYNAKV" bench --url "http://127.0.0.1:$SPORT" "${BENCH_COMMON[@]}" "${A50[@]}" --records "$RECORDS" \
    --ops "$OPS" >"$OUT/single-memory.json"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

# --- dynakv: one node, durable engine, key counts and RSS ---------------------------
counts=("$RECORDS" "$KEYS_1M")
[ "$KEYS_10M" = 1 ] && counts+=(10000000)
for keys in "${counts[@]}"; do
    log "dynakv, one node, durable engine, $keys keys"
    SPORT=$(free_port); SPEER=$(free_port)
    rm -rf "$WORK/solo-disk"
    "$DYNAKV" server --name solo --http "127.0.0.1:$SPORT" --peer "127.0.0.1:$SPEER" \
        --data-dir "$WORK/solo-disk" >"$WORK/solo-disk.log" 2>&1 &
    SOLO=$!
    PIDS+=($SOLO)
    wait_http "http://127.0.0.1:$SPORT/ping"
    "$DYNAKV" bench --url "http://127.0.0.1:$SPORT" "${BENCH_COMMON[@]}" "${A50[@]}" --records "$keys" \
        --ops "$OPS" --durability buffered >"$OUT/keys-$keys.json"
    echo "{\"keys\": $keys, \"rss_kib\": $(rss_kib $SOLO), \"disk_kib\": $(du -sk "$WORK/solo-disk" | cut -f1)}" \
        >"$OUT/rss-$keys.json"
    kill $SOLO; wait $SOLO 2>/dev/null || true
done

# --- etcd, 3 members -----------------------------------------------------------------
log "etcd, 3 members"
declare -a EC EP
for i in 1 2 3; do EC[$i]=$(free_port); EP[$i]=$(free_port); done
CLUSTER="e1=http://127.0.0.1:${EP[1]},e2=http://127.0.0.1:${EP[2]},e3=http://127.0.0.1:${EP[3]}"
for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$WORK/etcd$i" \
        --listen-client-urls "http://127.0.0.1:${EC[$i]}" --advertise-client-urls "http://127.0.0.1:${EC[$i]}" \
        --listen-peer-urls "http://127.0.0.1:${EP[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${EP[$i]}" \
        --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token dynakv-bench \
        >"$WORK/etcd$i.log" 2>&1 &
    PIDS+=($!)
done
for i in 1 2 3; do wait_http "http://127.0.0.1:${EC[$i]}/health"; done
EURLS=(--url "http://127.0.0.1:${EC[1]}" --url "http://127.0.0.1:${EC[2]}" --url "http://127.0.0.1:${EC[3]}")
"$DYNAKV" bench --target etcd "${EURLS[@]}" "${BENCH_COMMON[@]}" --concurrency 50 --workload w --records "$RECORDS" \
    --ops "$OPS" >"$OUT/etcd-w.json"
"$DYNAKV" bench --target etcd "${EURLS[@]}" "${BENCH_COMMON[@]}" "${A50[@]}" --records "$RECORDS" \
    --ops "$OPS" --skip-load >"$OUT/etcd-a.json"

log "report"
/usr/bin/python3 "$ROOT/scripts/bench-report.py" "$OUT" | tee "$OUT/table.md"
