#!/usr/bin/env bash
# Runs Basho's Riak Python client (PyPI package `riak`, its HTTP transport) unchanged against a
# dynakv node: ping, store/fetch JSON, siblings and their resolution, user metadata,
# server-made keys, delete, key and bucket listing, bucket properties, preflist.
# The client predates Python 3.10; scripts/riak_python_client_check.py shims the stdlib names
# it imports (collections.Iterable, namedtuple(verbose=)), not the protocol.
# Usage: scripts/riak-python-client-check.sh   (builds the release binary, uses port 18500)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p dynakv
VENV=${VENV:-target/riak-venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q riak
DATA=$(mktemp -d)
target/release/dynakv dev --nodes 1 --http-port 18500 --data-dir "$DATA" >"$DATA/dev.log" 2>&1 &
DEV=$!
trap 'kill -INT $DEV 2>/dev/null; wait $DEV 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 100); do curl -sf http://127.0.0.1:18500/ping >/dev/null && break; sleep 0.1; done
"$VENV/bin/python" scripts/riak_python_client_check.py 18500
