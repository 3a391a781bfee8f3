#!/usr/bin/env bash
# Runs Basho's Riak Python client (PyPI package `riak`, unchanged) against a 3-node
# `dynakv dev` cluster, once over its HTTP transport and once over Protocol Buffers: ping,
# store/fetch JSON, siblings and their resolution, user metadata, server-made keys, delete,
# key and bucket listing, bucket properties, bucket types, preflist, and data types
# (counters, sets, maps, hll), secondary indexes and expiry.
# The client predates Python 3.10; scripts/riak_python_client_check.py shims the stdlib names
# it imports (collections.Iterable, namedtuple(verbose=)), not the protocol.
# Usage: scripts/riak-python-client-check.sh   (builds the release binary; free 127.0.0.1 ports)
# Exit status 3: the client could not be installed (no route to PyPI); anything else non-zero
# is a failed check.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/ports.sh
source scripts/lib/ports.sh
cargo build --release -q -p dynakv
VENV=${VENV:-target/riak-venv}
if ! { [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"; } ||
    ! "$VENV/bin/pip" install -q riak; then
    echo "cannot install the riak client from PyPI" >&2
    exit 3
fi
DATA=$(mktemp -d)
HTTP=$(free_port 3)
PB=$((HTTP + 2000))
trap 'kill -INT ${DEV_PID:-} 2>/dev/null; wait ${DEV_PID:-} 2>/dev/null; rm -rf "$DATA"' EXIT
start_dev target/release/dynakv "$HTTP" "$DATA/dev" "$DATA/dev.log"
for _ in $(seq 300); do grep -q 'press Ctrl-C' "$DATA/dev.log" && break; sleep 0.2; done
# A bucket type for the check, activated once every member has it (as `riak admin
# bucket-type` is used).
target/release/dynakv admin --url "http://127.0.0.1:$HTTP" bucket-type create pytype \
    '{"props":{"n_val":2,"allow_mult":false}}' >/dev/null
for _ in $(seq 100); do
    target/release/dynakv admin --url "http://127.0.0.1:$HTTP" bucket-type activate pytype \
        >/dev/null 2>&1 && break
    sleep 0.2
done
# Data type buckets: a type per data type.
for dt in counter set map hll; do
    target/release/dynakv admin --url "http://127.0.0.1:$HTTP" bucket-type create "py${dt}s" \
        "{\"props\":{\"datatype\":\"$dt\"}}" >/dev/null
    for _ in $(seq 100); do
        target/release/dynakv admin --url "http://127.0.0.1:$HTTP" bucket-type activate \
            "py${dt}s" >/dev/null 2>&1 && break
        sleep 0.2
    done
done
# Activation spreads by gossip: wait until every node serves the types.
for k in 0 1 2; do
    for t in pytype pycounters pysets pymaps pyhlls; do
        for _ in $(seq 100); do
            target/release/dynakv admin --url "http://127.0.0.1:$((HTTP + k))" bucket-type \
                status "$t" 2>/dev/null | grep -q '"active": true' && break
            sleep 0.2
        done
    done
done
"$VENV/bin/python" scripts/riak_python_client_check.py http "$HTTP" $((HTTP + 1)) $((HTTP + 2))
"$VENV/bin/python" scripts/riak_python_client_check.py pbc "$PB" $((PB + 1)) $((PB + 2))
