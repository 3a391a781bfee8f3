#!/usr/bin/python3
"""Table and plots from the results of scripts/bench-compare.sh.

Usage: bench-report.py DIR   (prints a Markdown report; writes DIR/*.png)
"""

import csv
import glob
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def redis_results(out):
    rows = {}
    try:
        with open(os.path.join(out, "redis.csv")) as f:
            for row in csv.DictReader(f):
                rows[row["test"]] = row
    except OSError:
        pass
    return rows


def fmt_lat(op):
    if not op or not op.get("count"):
        return "-"
    return f'{op["p50_ms"]:.2f} / {op["p99_ms"]:.2f} / {op["p999_ms"]:.2f}'


def main():
    out = sys.argv[1]
    machine = load(os.path.join(out, "machine.json")) or {}
    redis = redis_results(out)
    redis_set = float(redis["SET"]["rps"]) if "SET" in redis else None
    redis_get = float(redis["GET"]["rps"]) if "GET" in redis else None
    redis_ref = (redis_set + redis_get) / 2 if redis_set and redis_get else None

    print(f"Machine: {machine.get('cpus')} CPUs ({machine.get('model')}), "
          f"{machine.get('mem_gib')} GiB, Linux {machine.get('kernel')}, {machine.get('date')}")
    print()
    print("| System | Setup | ops/s | vs Redis | read p50 / p99 / p99.9 ms | update p50 / p99 / p99.9 ms | errors |")
    print("|---|---|---:|---:|---|---|---:|")
    for name in ("SET", "GET"):
        if name in redis:
            r = redis[name]
            lat = f'{float(r["p50_latency_ms"]):.2f} / {float(r["p99_latency_ms"]):.2f} / -'
            print(f"| Redis {name} | redis-benchmark -c 50 -d 1024 | {float(r['rps']):.0f} | 1.00 | "
                  f"{lat if name == 'GET' else '-'} | {lat if name == 'SET' else '-'} | 0 |")
    runs = [
        ("dynakv 3 nodes", "dev, N=3 R=2 W=2, buffered, workload a", "dev3-a-buffered.json"),
        ("dynakv 3 nodes", "same, --client-routing", "dev3-a-routing.json"),
        ("dynakv 3 nodes", "same, fsync per write", "dev3-a-fsync.json"),
        ("dynakv 3 nodes", "buffered, writes only (workload w)", "dev3-w-buffered.json"),
        ("dynakv 1 node", "memory engine, workload a", "single-memory.json"),
        ("etcd 3 members", "v3 JSON gateway, writes only (workload w)", "etcd-w.json"),
        ("etcd 3 members", "v3 JSON gateway, workload a", "etcd-a.json"),
    ]
    results = {}
    for system, setup, file in runs:
        r = load(os.path.join(out, file))
        if not r:
            continue
        results[file] = r
        ratio = f'{r["throughput_ops_per_sec"] / redis_ref:.2f}' if redis_ref else "-"
        errors = r.get("errors", 0) + r.get("unavailable", 0)
        print(f'| {system} | {setup} | {r["throughput_ops_per_sec"]:.0f} | {ratio} | '
              f'{fmt_lat(r.get("read"))} | {fmt_lat(r.get("update"))} | {errors} |')
    print()
    print("All runs: 50 clients, 1 KiB values, zipfian keys over 100k records unless said.")
    print("vs Redis: ops/s over the mean of Redis SET and GET ops/s from the same run.")

    print()
    print("Targets:")
    dev = results.get("dev3-a-buffered.json")
    if dev and redis_ref:
        ratio = dev["throughput_ops_per_sec"] / redis_ref
        worst = max(dev["read"].get("p999_ms", 0), dev["update"].get("p999_ms", 0))
        print(f"- 3-node buffered workload a: {ratio:.0%} of Redis (target 50%), "
              f"p99.9 {worst:.1f} ms (target 10 ms)")
    single = results.get("single-memory.json")
    if single and redis_ref:
        print(f"- 1 node memory workload a: {single['throughput_ops_per_sec'] / redis_ref:.0%} of Redis (target 70%)")
    dw, ew = results.get("dev3-w-buffered.json"), results.get("etcd-w.json")
    if dw and ew:
        print(f"- writes vs etcd: {dw['throughput_ops_per_sec'] / ew['throughput_ops_per_sec']:.2f}x "
              f"(target 3x); p99.9 {dw['update']['p999_ms']:.1f} ms vs {ew['update']['p999_ms']:.1f} ms")
    routed = results.get("dev3-a-routing.json")
    if dev and routed:
        print(f"- client routing: {routed['throughput_ops_per_sec']:.0f} vs {dev['throughput_ops_per_sec']:.0f} ops/s; "
              f"update p99.9 {routed['update']['p999_ms']:.1f} vs {dev['update']['p999_ms']:.1f} ms")

    over = load(os.path.join(out, "overload.json"))
    if over:
        print()
        print(f'Overload (offered {over["offered_rate"]:.0f} ops/s, twice the closed-loop maximum, '
              f'latency from each operation\'s due time): served {over["throughput_ops_per_sec"]:.0f} ops/s, '
              f'{over["unavailable"]} answered 503 ({fmt_lat(over.get("unavailable_latency"))} ms), '
              f'accepted reads {fmt_lat(over.get("read"))} ms, updates {fmt_lat(over.get("update"))} ms '
              f'(from sending, without the generator\'s backlog: {fmt_lat(over.get("accepted_service"))} ms), '
              f'{over["errors"]} other errors.')

    print()
    print("| Value size | ops/s | read p99.9 ms | update p99.9 ms |")
    print("|---:|---:|---:|---:|")
    sizes = []
    for path in sorted(glob.glob(os.path.join(out, "value-*.json")),
                       key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0])):
        r = load(path)
        if r:
            sizes.append(r)
            print(f'| {r["value_size"]} B | {r["throughput_ops_per_sec"]:.0f} | '
                  f'{r["read"].get("p999_ms", "-")} | {r["update"].get("p999_ms", "-")} |')

    print()
    print("| Keys (1 node, durable engine) | ops/s | read p99.9 ms | update p99.9 ms | RSS MiB | disk MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for path in sorted(glob.glob(os.path.join(out, "keys-*.json")),
                       key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0])):
        r = load(path)
        keys = int(path.rsplit("-", 1)[1].split(".")[0])
        rss = load(os.path.join(out, f"rss-{keys}.json")) or {}
        if r:
            print(f'| {keys} | {r["throughput_ops_per_sec"]:.0f} | {r["read"].get("p999_ms", "-")} | '
                  f'{r["update"].get("p999_ms", "-")} | {rss.get("rss_kib", 0) / 1024:.0f} | '
                  f'{rss.get("disk_kib", 0) / 1024:.0f} |')

    sweep = []
    for path in glob.glob(os.path.join(out, "sweep-*.json")):
        r = load(path)
        if r:
            sweep.append(r)
    sweep.sort(key=lambda r: r["offered_rate"])
    if sweep:
        print()
        print("| Offered ops/s | served ops/s | read p50 / p99 / p99.9 ms | update p50 / p99 / p99.9 ms |")
        print("|---:|---:|---|---|")
        for r in sweep:
            print(f'| {r["offered_rate"]:.0f} | {r["throughput_ops_per_sec"]:.0f} | '
                  f'{fmt_lat(r.get("read"))} | {fmt_lat(r.get("update"))} |')

    plot(out, redis, results, sweep, sizes)


def plot(out, redis, results, sweep, sizes):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib missing: no plots)")
        return
    labels, values = [], []
    for name in ("SET", "GET"):
        if name in redis:
            labels.append(f"Redis {name}")
            values.append(float(redis[name]["rps"]))
    names = {
        "dev3-a-buffered.json": "dynakv 3n a",
        "dev3-a-routing.json": "dynakv 3n a\nrouted",
        "dev3-a-fsync.json": "dynakv 3n a\nfsync",
        "dev3-w-buffered.json": "dynakv 3n w",
        "single-memory.json": "dynakv 1n\nmemory",
        "etcd-w.json": "etcd 3m w",
        "etcd-a.json": "etcd 3m a",
    }
    for file, label in names.items():
        if file in results:
            labels.append(label)
            values.append(results[file]["throughput_ops_per_sec"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar(labels, values, color="steelblue")
    ax.set_ylabel("ops/s")
    ax.set_title("Throughput, 50 clients, 1 KiB values (one run)")
    plt.xticks(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "throughput.png"), dpi=100)
    plt.close(fig)

    if sweep:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        x = [r["offered_rate"] for r in sweep]
        for op, style in (("read", "-"), ("update", "--")):
            for q, color in (("p50_ms", "green"), ("p99_ms", "orange"), ("p999_ms", "red")):
                y = [r[op].get(q, float("nan")) for r in sweep]
                ax.plot(x, y, style, marker="o", color=color, label=f"{op} {q[:-3]}")
        ax.set_yscale("log")
        ax.set_xlabel("offered ops/s (fixed rate, open loop; served ops/s in the table)")
        ax.set_ylabel("latency ms (from due time)")
        ax.set_title("dynakv 3-node dev cluster, workload a, buffered: latency against load")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "latency-vs-load.png"), dpi=100)
        plt.close(fig)

    if sizes:
        fig, ax1 = plt.subplots(figsize=(8, 4.5))
        xs = [r["value_size"] for r in sizes]
        ax1.plot(xs, [r["throughput_ops_per_sec"] for r in sizes], marker="o", color="steelblue",
                 label="ops/s")
        ax1.set_xscale("log")
        ax1.set_xlabel("value size (bytes)")
        ax1.set_ylabel("ops/s")
        ax2 = ax1.twinx()
        ax2.plot(xs, [r["update"].get("p999_ms", float("nan")) for r in sizes], marker="s",
                 color="red", label="update p99.9")
        ax2.plot(xs, [r["read"].get("p999_ms", float("nan")) for r in sizes], marker="^",
                 color="orange", label="read p99.9")
        ax2.set_ylabel("p99.9 ms")
        ax1.set_title("dynakv 3-node dev cluster, workload a: cost of value size")
        fig.legend(fontsize=8, loc="upper center")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "value-size.png"), dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    main()
