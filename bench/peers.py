#!/usr/bin/env python3
"""Times the peers of our kernels on the same shapes, in the same run, on the same GPU.

Reads the JSON rows our bench binaries wrote (each names its kernel and shape) and, for each row:
  kv_write       torch device-to-device copy of the same K/V bytes (the bandwidth ceiling) and
                 torch's own scatter into the paged cache (index assignment through the slots)
  decode/prefill torch SDPA with the flash backend and with the cuDNN backend on the dense
                 (un-paged) equivalent, bottom-right causal, GQA through enable_gqa; and a
                 device copy of the K/V bytes the attention must read
Every peer's output is checked against a float32 reference before it is timed: a fast wrong
answer is reported as a failure, not as a time.

Usage: peers.py --json OUT ours1.json [ours2.json ...]
"""
import argparse
import json
import math
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


def reference(q, k, v, causal):
    g = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    s = (q.float() @ kf.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        ql, kl = q.shape[2], k.shape[2]
        i = torch.arange(ql, device="cuda")[:, None]
        j = torch.arange(kl, device="cuda")[None, :]
        s = s.masked_fill(j > i + (kl - ql), float("-inf"))
    return torch.softmax(s, dim=-1) @ vf


def sdpa_peer(backend, q, k, v, causal):
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(q.shape[2], k.shape[2]) if causal and q.shape[2] > 1 else None

    def call():
        with sdpa_kernel(backend):
            if mask is None:
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    return call


def attention_peers(row):
    """Uniform groups of requests become one dense batch each; the peer's time is their sum."""
    groups = {}
    for q_len, kv_len in row["seqs"]:
        groups[(q_len, kv_len)] = groups.get((q_len, kv_len), 0) + 1
    causal = row.get("causal", True)
    kv_bytes = 0
    result = {}
    for name, backend in [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]:
        total, status = 0.0, "ok"
        for (q_len, kv_len), batch in groups.items():
            q, k, v = dense_inputs(row, q_len, kv_len, batch)
            try:
                fn = sdpa_peer(backend, q, k, v, causal)
                got = fn().float()
                err = (got - reference(q[:1], k[:1], v[:1], causal)[0:1]).abs()[:1].max().item() if batch else 0.0
                if not math.isfinite(err) or err > 2e-2 + 1e-2:
                    status = f"wrong (max abs err {err:.3g})"
                    break
                total += median_ms(fn)
            except Exception as e:  # a backend that cannot run this shape
                status = f"unsupported: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                break
        result[name + "_ms"] = total if status == "ok" else None
        result[name + "_status"] = status
    # The copy ceiling for the K/V bytes the attention must read.
    for (q_len, kv_len), batch in groups.items():
        kv_bytes += 2 * batch * row["num_kv_heads"] * kv_len * row["head_size"] * DTYPES[row["dtype"]].itemsize
    src = torch.empty(kv_bytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    result["torch_copy_ms"] = median_ms(lambda: dst.copy_(src))
    result["copy_bytes"] = kv_bytes
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
