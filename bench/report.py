#!/usr/bin/env python3
"""Merges our bench rows with the peers' into one table, JSON and a ratio plot.

Usage: report.py --out DIR ours1.json [ours2.json ...] peers.json
Ratios: ours / copy ceiling for memory-bound kernels (bytes over time, both in this run), and
peer time / our time for each peer (above 1 means we are faster).
"""
import argparse
import json
import os


def load(path):
    try:
        return json.load(open(path))
    except FileNotFoundError:
        return []


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    *ours_files, peers_file = args.files
    ours = [r for f in ours_files for r in load(f)]
    peers = {(p["name"], p["dtype"]): p for p in load(peers_file)}
    table = []
    for r in ours:
        p = peers.get((r["name"], r["dtype"]), {})
        t = r["ours_ms"]
        row = {
            "shape": r["name"], "dtype": r["dtype"], "bytes": r["bytes"], "flops": r.get("flops", 0),
            "ours_ms": t,
            "ours_gbps": r["bytes"] / (t * 1e-3) / 1e9,
            "ours_tflops": r.get("flops", 0) / (t * 1e-3) / 1e12,
            "ratio_to_copy": r.get("ratio_to_copy"),
        }
        for key, val in p.items():
            if key.endswith("_ms") and isinstance(val, (int, float)) and val:
                row[key] = val
                row["ratio_vs_" + key[:-3]] = val / t
            elif key.endswith("_status") or key.endswith("_ok"):
                row[key] = val
        table.append(row)

    cols = ["shape", "dtype", "bytes", "flops", "ours_ms", "ours_gbps", "ours_tflops", "ratio_to_copy"]
    extra = sorted({k for row in table for k in row if k.startswith("ratio_vs_") or (k.endswith("_ms") and k not in cols)})
    cols += extra
    print("\n" + " | ".join(cols))
    for row in table:
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append("-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        print(" | ".join(cells))
    for row in table:
        for k, v in row.items():
            if k.endswith("_status") and v != "ok":
                print(f"note: {row['shape']} {row['dtype']}: {k} = {v}")
    os.makedirs(args.out, exist_ok=True)
    json.dump(table, open(os.path.join(args.out, "bench-results.json"), "w"), indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        labels = [f"{r['shape']} {r['dtype']}" for r in table]
        series = ["ratio_to_copy"] + [c for c in extra if c.startswith("ratio_vs_")]
        fig, ax = plt.subplots(figsize=(max(8, len(table) * 1.2), 5))
        width = 0.8 / max(1, len(series))
        for i, s in enumerate(series):
            ax.bar([x + i * width for x in range(len(table))], [r.get(s) or 0 for r in table], width, label=s)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(table))])
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ratio (ours / ceiling, peer time / our time)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "bench-ratios.png"), dpi=110)
        print(f"wrote {os.path.join(args.out, 'bench-results.json')} and bench-ratios.png")
    except Exception as e:
        print(f"report: no plot ({e})")


if __name__ == "__main__":
    main()
