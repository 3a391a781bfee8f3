#!/usr/bin/env bash
# Builds the previous release of dynakv (the last commit speaking peer protocol version 3,
# before data types, secondary indexes and expiry changed the peer messages) for the rolling
# upgrade test (crates/dynakv/tests/upgrade.rs): its source is exported from this repository's
# history (git archive, so the clone needs that commit) into target/previous/src, and built
# there with its own Cargo.lock into target/previous/target. Prints the executable's path.
#
#   scripts/build-previous-release.sh          # build (or reuse) it
#   DYNAKV_PREVIOUS_BIN=$(scripts/build-previous-release.sh | tail -n 1) cargo test -p dynakv --test upgrade
set -euo pipefail
cd "$(dirname "$0")/.."

# Peer protocol version 3: the release before issue 21 (its stop landed and passed CI).
PREVIOUS_COMMIT=9e2d5d793913b642d9df7d477d17db5556074302
root="target/previous"
src="$root/src"
bin="$root/target/release/dynakv"

if ! git cat-file -e "${PREVIOUS_COMMIT}^{commit}" 2>/dev/null; then
  echo "error: commit $PREVIOUS_COMMIT (the previous release) is not in this clone's history;" >&2
  echo "       fetch the full history (git fetch --unshallow) and run this again" >&2
  exit 1
fi
if [ "$(cat "$src/.commit" 2>/dev/null || true)" != "$PREVIOUS_COMMIT" ]; then
  rm -rf "$src"
  mkdir -p "$src"
  git archive "$PREVIOUS_COMMIT" | tar -x -C "$src"
  echo "$PREVIOUS_COMMIT" > "$src/.commit"
fi
echo "building the previous release ($PREVIOUS_COMMIT) in $src" >&2
(cd "$src" && CARGO_TARGET_DIR="$PWD/../target" cargo build --release --locked -p dynakv >&2)
"$bin" --version >&2
echo "$PWD/$bin"
