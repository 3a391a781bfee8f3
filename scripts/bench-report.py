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
        ("dynakv 3 nodes", "same, one client", "dev3-a-one-client.json"),
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
    targets(out, results, redis_ref)

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


def worst_p999(run):
    """The larger of a run's read and update p99.9, in ms."""
    return max(run.get(op, {}).get("p999_ms", 0) for op in ("read", "update"))


def targets(out, results, redis_ref):
    """Issue 19's targets, each with what this run measured and whether it was met."""
    rows = []

    def target(name, measured, met):
        rows.append((name, measured, "met" if met else "**not met**"))

    dev = results.get("dev3-a-buffered.json")
    if dev and redis_ref:
        ratio = dev["throughput_ops_per_sec"] / redis_ref
        p = worst_p999(dev)
        target("3 nodes, buffered, workload a, 50 clients: >= 0.3x Redis (goal 0.5x)",
               f"{ratio:.2f}x", ratio >= 0.3)
        target("same: p99.9 <= 10 ms", f"{p:.1f} ms", p <= 10)
    fsync = results.get("dev3-a-fsync.json")
    if fsync and redis_ref:
        ratio = fsync["throughput_ops_per_sec"] / redis_ref
        p = worst_p999(fsync)
        target("same with fsync'd writes: >= 0.15x Redis", f"{ratio:.2f}x", ratio >= 0.15)
        target("same with fsync'd writes: p99.9 <= 20 ms", f"{p:.1f} ms", p <= 20)
    half = load(os.path.join(out, "sweep-50.json"))
    if half:
        p = worst_p999(half)
        target(f"open loop at 50% of the closed-loop maximum ({half['offered_rate']:.0f} ops/s): "
               "p99.9 <= 5 ms from the due time", f"{p:.1f} ms", p <= 5)
    if dev and dev.get("server_cpu_us_per_op") is not None:
        cpu = dev["server_cpu_us_per_op"]
        gen = dev.get("generator_cpu_us_per_op")
        gen = f"; generator {gen:.1f} us/op" if gen is not None else ""
        target("server CPU per operation <= 60 us (3 nodes, buffered, workload a)",
               f"{cpu:.1f} us/op ({dev.get('server_cores', 0):.2f} cores){gen}", cpu <= 60)
    one = results.get("dev3-a-one-client.json")
    if one:
        get_us = one["read"].get("p50_ms", 0) * 1000
        put_us = one["update"].get("p50_ms", 0) * 1000
        target("one client: quorum get p50 <= 150 us", f"{get_us:.0f} us", get_us <= 150)
        target("one client: quorum put p50 <= 200 us", f"{put_us:.0f} us", put_us <= 200)
    single = results.get("single-memory.json")
    if single and redis_ref:
        ratio = single["throughput_ops_per_sec"] / redis_ref
        target("one node, memory engine, workload a: >= 0.7x Redis", f"{ratio:.2f}x", ratio >= 0.7)
    dw, ew = results.get("dev3-w-buffered.json"), results.get("etcd-w.json")
    if dw and ew:
        ratio = dw["throughput_ops_per_sec"] / ew["throughput_ops_per_sec"]
        dp, ep = dw["update"].get("p999_ms", 0), ew["update"].get("p999_ms", 0)
        target("writes (workload w, 3 nodes) >= 3x etcd's (3 members) at a lower p99.9",
               f"{ratio:.2f}x; p99.9 {dp:.1f} vs {ep:.1f} ms", ratio >= 3 and dp < ep)
    routed = results.get("dev3-a-routing.json")
    print("| Target (issue 19) | Measured | |")
    print("|---|---|---|")
    for name, measured, met in rows:
        print(f"| {name} | {measured} | {met} |")
    if dev and routed:
        print()
        print(f"Client routing: {routed['throughput_ops_per_sec']:.0f} vs {dev['throughput_ops_per_sec']:.0f} "
              f"ops/s; update p99.9 {routed['update']['p999_ms']:.1f} vs {dev['update']['p999_ms']:.1f} ms")


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
