#!/usr/bin/python3
"""Per-operation cost table from perf-script output collapsed with `inferno-collapse-perf --all`.

Usage: cost-table.py FOLDED US_PER_OP
Each sample is charged to the subsystem of the nearest frame (from the leaf up) that belongs to
one; kernel, allocator and memcpy/memcmp leaves are charged to the code that called them and also
counted apart."""
import sys
OWNERS = [
    ("anti-entropy index (hashing, index writes)", ["AaeTrees::observe", "merkle::", "blake3"]),
    ("storage engine reads (fjall get)", ["Keyspace::get", "Tree::get_internal", "Storage>::get"]),
    ("buffered writes and the flusher's drain into fjall", ["BufferedStorage", "WriteBatch::commit", "Memtable::insert", "fjall::batch"]),
    ("fjall flush and compaction threads", ["fjall::flush", "fjall::compaction", "lsm_tree::compaction", "fjall::worker_pool", "lsm_tree::table::writer"]),
    ("object decode, merge, encode", ["dynakv_core::object", "dynakv_core::version", "Replica::merge", "dynakv_core::replica"]),
    ("request machines (quorum, ring, coordinator)", ["dynakv_core::request", "dynakv_core::quorum", "dynakv_core::coordinator", "dynakv_core::ring", "requests::Driver", "requests::send"]),
    ("peer transport (frames, encryption, serve dispatch)", ["transport::", "link::", "aes_gcm", "ring_core", "view::peer", "serve::serve", "dynakv_core::serve", "dynakv_core::message", "postcard", "serde"]),
    ("HTTP (hyper, axum, handlers, auth, limits)", ["hyper::", "axum::", "tower::", "http_serve", "dynakv_server::http", "auth::", "load_limit", "http::"]),
    ("runtime (tokio scheduling, timers, epoll)", ["tokio::"]),
]
folded, us = sys.argv[1], float(sys.argv[2])
totals = {name: 0 for name, _ in OWNERS}
totals["other"] = 0
kernel = alloc = copies = total = 0
for line in open(folded):
    stack, n = line.rsplit(" ", 1)
    n = int(n)
    total += n
    frames = stack.split(";")
    leaf = frames[-1]
    if leaf.endswith("_[k]"):
        kernel += n
    elif "mi_" in leaf or "mimalloc" in leaf:
        alloc += n
    elif "memcpy" in leaf or "memmove" in leaf or "memcmp" in leaf:
        copies += n
    owner = None
    # The nearest owner that is not the runtime: every task runs under the runtime's frames,
    # so only what no subsystem's frame is above (scheduling, epoll, parking) is the runtime's.
    for frame in reversed(frames):
        for name, keys in OWNERS[:-1]:
            if any(k in frame for k in keys):
                owner = name
                break
        if owner:
            break
    if owner is None and any("tokio::" in f for f in frames):
        owner = OWNERS[-1][0]
    if owner is None and "blake3" in leaf:
        owner = OWNERS[0][0]
    totals[owner or "other"] += n
print("| Where | share of server CPU | µs per operation |")
print("|---|---:|---:|")
for name, count in sorted(totals.items(), key=lambda kv: -kv[1]):
    print(f"| {name} | {100 * count / total:.1f}% | {us * count / total:.1f} |")
print(f"| *of all the above: in the kernel* | {100 * kernel / total:.1f}% | {us * kernel / total:.1f} |")
print(f"| *of all the above: in the allocator* | {100 * alloc / total:.1f}% | {us * alloc / total:.1f} |")
print(f"| *of all the above: memcpy/memcmp* | {100 * copies / total:.1f}% | {us * copies / total:.1f} |")

