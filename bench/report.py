#!/usr/bin/env python3
"""Merges our bench rows with the peers' into one table, JSON and a ratio plot.

Usage: report.py --out DIR ours1.json [ours2.json ...] peers.json
Ratios: ours / copy ceiling for memory-bound kernels (bytes over time, both in this run), and
peer time / our time for each peer (above 1 means we are faster). FlashInfer (its fastest path that
matched our output) also gets its own GB/s and TFLOP/s on the same bytes and FLOPs as ours. A peer
with no time shows why in its ratio cell (not installed, n/a (not prebuilt), MISMATCH, ...).
"""
import argparse
import json
import os


def load(path):
    try:
        return json.load(open(path))
    except FileNotFoundError:
        return []


def short_status(status):
    """The table cell for a peer with no time: what kept it out, in a word or two."""
    if not status or status == "ok":
        return None
    if "does not match" in status or status.startswith("MISMATCH"):
        return "MISMATCH"
    for head in ("n/a (not prebuilt)", "not installed", "unsupported", "skipped", "no check"):
        if status.startswith(head):
            return head
    return status[:24]


def merge(ours, peers):
    """One table row per bench row of ours, with each peer's time, ratio and status."""
    peers = {(p["name"], p["dtype"]): p for p in peers}
    table = []
    for r in ours:
        p = peers.get((r["name"], r["dtype"]), {})
        t = r["ours_ms"]
        row = {
            "shape": r["name"], "dtype": r["dtype"], "kernel": r.get("kernel"), "bytes": r["bytes"],
            "flops": r.get("flops", 0),
            "ours_ms": t,
            "ours_gbps": r["bytes"] / (t * 1e-3) / 1e9,
            "ours_tflops": r.get("flops", 0) / (t * 1e-3) / 1e12,
            "ratio_to_copy": r.get("ratio_to_copy"),
        }
        for key, val in p.items():
            if key.endswith("_ms") and isinstance(val, (int, float)) and val:
                row[key] = val
                row["ratio_vs_" + key[:-3]] = val / t
            elif key.endswith("_status") or key.endswith("_ok") or key.endswith("_path"):
                row[key] = val
            elif key == "flashinfer_paths":
                row[key] = val
        fi = row.get("flashinfer_ms")
        if fi:
            row["flashinfer_gbps"] = r["bytes"] / (fi * 1e-3) / 1e9
            row["flashinfer_tflops"] = r.get("flops", 0) / (fi * 1e-3) / 1e12
        table.append(row)
    return table


def columns(table):
    cols = ["shape", "dtype", "bytes", "flops", "ours_ms", "ours_gbps", "ours_tflops", "ratio_to_copy"]
    # a peer with a time in some row, or only a status (FlashInfer not installed: still a column)
    peer_names = sorted({k[:-3] for row in table for k in row if k.endswith("_ms") and k not in cols}
                        | {k[:-7] for row in table for k in row if k.endswith("_status")})
    extra = []
    for name in peer_names:
        extra += [name + "_ms", "ratio_vs_" + name]
        if name == "flashinfer":
            extra += ["flashinfer_gbps", "flashinfer_tflops", "flashinfer_path"]
    return cols, extra


def cell(row, col):
    v = row.get(col)
    if v is None and col.startswith("ratio_vs_"):
        v = short_status(row.get(col[len("ratio_vs_"):] + "_status"))
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def notes(table):
    """Every status that is not "ok", once per distinct message with the rows it applies to."""
    seen = {}
    for row in table:
        for k, v in row.items():
            if k.endswith("_status") and v != "ok":
                seen.setdefault((k, v), []).append(f"{row['shape']} {row['dtype']}")
    out = []
    for (k, v), rows in seen.items():
        where = "all rows" if len(rows) == len(table) and len(table) > 1 else ", ".join(rows)
        out.append(f"note: {k} = {v} ({where})")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    *ours_files, peers_file = args.files
    ours = [r for f in ours_files for r in load(f)]
    table = merge(ours, load(peers_file))
    cols, extra = columns(table)
    cols += extra
    print("\n" + " | ".join(cols))
    for row in table:
        print(" | ".join(cell(row, c) for c in cols))
    for line in notes(table):
        print(line)
    os.makedirs(args.out, exist_ok=True)
    json.dump(table, open(os.path.join(args.out, "bench-results.json"), "w"), indent=1)
    print(f"wrote {os.path.join(args.out, 'bench-results.json')}")
    try:
        plot(table, [c for c in extra if c.startswith("ratio_vs_")], args.out)
    except Exception as e:  # a plot is a convenience: the table and JSON are the record
        print(f"report: no plot ({type(e).__name__}: {e})")


def plot(table, ratio_series, out_dir):
    """bench-ratios.png: the ratios per shape on top; below, ours beside FlashInfer in GB/s for the
    memory-bound rows (KV write, decode, mixed) and in TFLOP/s for prefill."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        print(f"report: no plot ({e})")
        return
    labels = [f"{r['shape']} {r['dtype']}" for r in table]
    series = ["ratio_to_copy"] + ratio_series
    fig = plt.figure(figsize=(max(10, len(table) * 1.2), 10))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.2, 1])
    ax = fig.add_subplot(grid[0, :])
    width = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        ax.bar([x + i * width for x in range(len(table))], [r.get(s) or 0 for r in table], width, label=s)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(table))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("ratio (ours / ceiling, peer time / our time)")
    ax.legend(fontsize=8)
    panels = [
        ("GB/s (KV write, decode, mixed)", "gbps", [r for r in table if r.get("kernel") != "prefill"]),
        ("TFLOP/s (prefill)", "tflops", [r for r in table if r.get("kernel") == "prefill"]),
    ]
    for col, (title, unit, rows) in enumerate(panels):
        axp = fig.add_subplot(grid[1, col])
        xs = range(len(rows))
        axp.bar([x - 0.2 for x in xs], [r.get("ours_" + unit) or 0 for r in rows], 0.4, label="ours")
        axp.bar([x + 0.2 for x in xs], [r.get("flashinfer_" + unit) or 0 for r in rows], 0.4, label="FlashInfer")
        axp.set_xticks(list(xs))
        axp.set_xticklabels([f"{r['shape']} {r['dtype']}" for r in rows], rotation=30, ha="right", fontsize=7)
        axp.set_title(title, fontsize=9)
        axp.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "bench-ratios.png"), dpi=110)
    plt.close(fig)
    print(f"wrote {os.path.join(out_dir, 'bench-ratios.png')}")

if __name__ == "__main__":
    main()
