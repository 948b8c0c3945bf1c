#!/usr/bin/env python3
"""Times the peers of our kernels on the same shapes, in the same run, on the same GPU.

Reads the JSON rows our bench binaries wrote (each names its kernel and shape) and, for each row:
  kv_write       torch device-to-device copy of the same K/V bytes (the bandwidth ceiling) and
                 torch's own scatter into the paged cache (index assignment through the slots)
  decode/prefill torch SDPA with the flash backend and with the cuDNN backend on the dense
                 (un-paged) equivalent, bottom-right causal, GQA through enable_gqa
Every attention peer is first run on the inputs of our request 0 (written by our bench with
--check-dir) and must match our output rows within the acceptance tolerance before it is timed: a
fast answer that differs is reported as a mismatch, not as a time.

Usage: peers.py --json OUT ours1.json [ours2.json ...]
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

WARMUP, ITERS = 10, 100
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def median_ms(fn, warmup=WARMUP, iters=ITERS):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        times.append((s, e))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in times)
    return ms[len(ms) // 2]


def kv_write_peers(row):
    dt = DTYPES[row["dtype"]]
    n, h, d, bs = row["num_tokens"], row["num_kv_heads"], row["head_size"], row["block_size"]
    num_blocks = max(16384, (n + bs - 1) // bs)
    key = torch.randn(n, h, d, device="cuda", dtype=dt)
    value = torch.randn(n, h, d, device="cuda", dtype=dt)
    kc = torch.zeros(num_blocks * bs, h, d, device="cuda", dtype=dt)
    vc = torch.zeros_like(kc)
    blocks = torch.randperm(num_blocks, device="cuda")[: (n + bs - 1) // bs]
    t = torch.arange(n, device="cuda")
    slots = (blocks[t // bs] * bs + t % bs).to(torch.int64)

    def scatter():
        kc[slots] = key
        vc[slots] = value

    scatter()
    ok = torch.equal(kc[slots], key) and torch.equal(vc[slots], value)
    dk, dv = torch.empty_like(key), torch.empty_like(value)

    def copy():
        dk.copy_(key)
        dv.copy_(value)

    out = {"torch_copy_ms": median_ms(copy)}
    out["torch_scatter_ms"] = median_ms(scatter) if ok else None
    out["torch_scatter_ok"] = ok
    return out


def dense_inputs(row, q_len, kv_len, batch):
    dt = DTYPES[row["dtype"]]
    hq, hk, d = row["num_heads"], row["num_kv_heads"], row["head_size"]
    q = torch.randn(batch, hq, q_len, d, device="cuda", dtype=dt)
    k = torch.randn(batch, hk, kv_len, d, device="cuda", dtype=dt)
    v = torch.randn(batch, hk, kv_len, d, device="cuda", dtype=dt)
    return q, k, v


def sdpa_peer(backend, q, k, v, causal):
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(q.shape[2], k.shape[2]) if causal and q.shape[2] > 1 else None

    def call():
        with sdpa_kernel(backend):
            if mask is None:
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    return call


def load_check(row):
    """Request 0 of our run: its last rows of Q, its whole K and V, and our output rows (f32)."""
    import numpy as np

    rows, (_, kv_len) = row["check_rows"], row["seqs"][0]
    h, hk, d = row["num_heads"], row["num_kv_heads"], row["head_size"]
    data = np.fromfile(row["check_file"], dtype="<f4")
    sizes = [rows * h * d, kv_len * hk * d, kv_len * hk * d, rows * h * d]
    if data.size != sum(sizes):
        raise ValueError(f"{row['check_file']}: {data.size} floats, expected {sum(sizes)}")
    parts, at = [], 0
    for n in sizes:
        parts.append(torch.from_numpy(data[at:at + n].copy()).cuda())
        at += n
    dt = DTYPES[row["dtype"]]
    q = parts[0].view(1, rows, h, d).transpose(1, 2).to(dt)
    k = parts[1].view(1, kv_len, hk, d).transpose(1, 2).to(dt)
    v = parts[2].view(1, kv_len, hk, d).transpose(1, 2).to(dt)
    ours = parts[3].view(1, rows, h, d).transpose(1, 2)
    return q, k, v, ours


def matches(got, want):
    """The acceptance tolerance: |got - want| <= 2e-2 + 1e-2 |want| everywhere, and no NaN."""
    got = got.float()
    ok = torch.isfinite(got).all() and ((got - want).abs() <= 2e-2 + 1e-2 * want.abs()).all()
    return bool(ok), (got - want).abs().max().item()


def attention_peers(row):
    """Each peer is first run on request 0's inputs and must match our output rows; then it is
    timed on the dense equivalent of the whole batch (uniform groups of requests become one dense
    batch each; the peer's time is their sum)."""
    groups = {}
    for q_len, kv_len in row["seqs"]:
        groups[(q_len, kv_len)] = groups.get((q_len, kv_len), 0) + 1
    causal = row.get("causal", True)
    check = load_check(row) if row.get("check_rows") else None
    result = {}
    for name, backend in [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]:
        total, status = 0.0, "ok"
        try:
            if check is not None:
                q, k, v, ours = check
                ok, err = matches(sdpa_peer(backend, q, k, v, causal)(), ours)
                if not ok:
                    status = f"does not match ours (max abs diff {err:.3g})"
            if status == "ok":
                for (q_len, kv_len), batch in groups.items():
                    q, k, v = dense_inputs(row, q_len, kv_len, batch)
                    total += median_ms(sdpa_peer(backend, q, k, v, causal))
                    del q, k, v
        except Exception as e:  # a backend that cannot run this shape
            status = f"unsupported: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        result[name + "_ms"] = total if status == "ok" else None
        result[name + "_status"] = status
        torch.cuda.empty_cache()
    if check is None:
        result["check"] = "no check file: peers were not compared with our output"
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("ours", nargs="+")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"peers on {torch.cuda.get_device_name()} with torch {torch.__version__}")
    rows = []
    for path in args.ours:
        try:
            rows += json.load(open(path))
        except FileNotFoundError:
            print(f"peers: {path} missing (its bench failed?)", file=sys.stderr)
    out = []
    for row in rows:
        kind = row["kernel"]
        if kind == "kv_write":
            peers = kv_write_peers(row)
        elif kind in ("decode", "prefill", "mixed"):
            peers = attention_peers(row)
        else:
            continue
        out.append({"name": row["name"], "dtype": row["dtype"], "kernel": kind, **peers})
        print(f"  {row['name']:<36} {row['dtype']:<5} " + " ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in peers.items()))
        torch.cuda.empty_cache()
    json.dump(out, open(args.json, "w"), indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
