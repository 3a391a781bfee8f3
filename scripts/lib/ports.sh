# Sourced by the benchmark scripts.
# free_port [SPAN]: a free 127.0.0.1 port, or, with SPAN > 1, a base port P with P+k,
# P+1000+k and P+2000+k free for k < SPAN (the layout of `dynakv dev`: HTTP, peers, PB).
free_port() {
    /usr/bin/python3 - "$@" <<'PY'
import random, socket, sys
span = int(sys.argv[1]) if len(sys.argv) > 1 else 1
for _ in range(1000):
    base = random.randint(20000, 39000)
    ports = [base + k for k in range(span)] + ([base + o + k for o in (1000, 2000) for k in range(span)] if span > 1 else [])
    socks = []
    try:
        for p in ports:
            s = socket.socket(); s.bind(("127.0.0.1", p)); socks.append(s)
        print(base); break
    except OSError:
        pass
    finally:
        for s in socks: s.close()
PY
}

# start_dev BIN PORT DATA_DIR LOG [DEV_ARGS...]: a 3-node `dynakv dev` in the background (its
# pid in DEV_PID), HTTP on PORT..PORT+2; returns once each node answers /ping (or after 20 s).
# DEV_URLS holds the three nodes' --url arguments for `dynakv bench`.
start_dev() {
    local bin=$1 port=$2 dir=$3 log=$4
    shift 4
    "$bin" dev --nodes 3 --http-port "$port" --pb-port $((port + 2000)) --data-dir "$dir" "$@" \
        >"$log" 2>&1 &
    DEV_PID=$!
    DEV_URLS=()
    for k in 0 1 2; do
        DEV_URLS+=(--url "http://127.0.0.1:$((port + k))")
        for _ in $(seq 100); do
            curl -sf "http://127.0.0.1:$((port + k))/ping" >/dev/null && break
            sleep 0.2
        done
    done
}
