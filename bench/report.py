#!/usr/bin/env python3
"""Reads bench-results/*.json (Google Benchmark), prints one table per bench executable with the
median time, throughput counters, and speed-ups against the baselines measured in the same run
(naive_eigen, flash), and plots throughput against sequence length to throughput.png."""
import glob
import json
import os
import re
import sys

BASELINES = ("naive_eigen", "flash_dense")


def load(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}, {}  # no benchmark of that executable matched the filter: Google Benchmark wrote nothing
    rows = {}
    for b in data.get("benchmarks", []):
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        name = b.get("run_name", b["name"])
        if name.endswith("/manual_time"):
            name = name[: -len("/manual_time")]
        rows[name] = b
    return data.get("context", {}), rows


def ms(b):
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b.get("time_unit", "ns")]
    return b["real_time"] * scale


def split(name):
    family, _, args = name.partition("/")
    return family, args


def fmt(x, digits=1):
    return "" if x is None else f"{x:.{digits}f}"


def table(title, ctx, rows):
    print(f"\n### {title}  ({ctx.get('cpu_model', '?')}, simd {ctx.get('attnkit_simd_arch', '?')})")
    by_key = {}
    for name, b in rows.items():
        fam, args = split(name)
        by_key.setdefault(args, {})[fam] = b
    head = ["benchmark", "ms", "GFLOP/s", "% FMA peak", "GB/s", "% read bw"] + [f"x {b}" for b in BASELINES]
    lines = []
    for name, b in rows.items():
        fam, args = split(name)
        line = [name, fmt(ms(b), 3), fmt(b.get("GFLOPs")), fmt(b.get("pct_peak")), fmt(b.get("GBs")), fmt(b.get("pct_bw"))]
        for base in BASELINES:
            other = by_key.get(args, {}).get(base)
            line.append(fmt(ms(other) / ms(b), 2) if other is not None and fam != base else "")
        lines.append(line)
    widths = [max(len(str(r[i])) for r in [head] + lines) for i in range(len(head))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in lines:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")


def plot(results, out_png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not found: no plot written")
        return
    series = {}
    for path in results:
        _, rows = load(path)
        for name, b in rows.items():
            m = re.search(r"/N:(\d+)", name)
            metric = "GFLOPs" if "GFLOPs" in b else "GBs" if "GBs" in b else None
            if not m or metric is None:
                continue
            label = re.sub(r"/N:\d+", "", name) + (" [GB/s]" if metric == "GBs" else "")
            series.setdefault(label, []).append((int(m.group(1)), b[metric]))
    if not series:
        return
    fig, ax = plt.subplots(figsize=(11, 7))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("GFLOP/s (GB/s where marked)")
    ax.set_title("attnkit throughput against sequence length")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    print(f"\nplot: {out_png}")


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "bench-results"
    results = sorted(glob.glob(os.path.join(d, "*.json")))
    if not results:
        sys.exit(f"no JSON results in {d}")
    for path in results:
        ctx, rows = load(path)
        if rows:
            table(os.path.basename(path)[:-5], ctx, rows)
    plot(results, os.path.join(d, "throughput.png"))


if __name__ == "__main__":
    main()
