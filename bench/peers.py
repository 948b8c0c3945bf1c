#!/usr/bin/env python3
"""Times the peers of our kernels on the same shapes, in the same run, on the same GPU.

Reads the JSON rows our bench binaries wrote (each names its kernel and shape) and, for each row:
  kv_write       torch device-to-device copy of the same K/V bytes (the bandwidth ceiling) and
                 torch's own scatter into the paged cache (index assignment through the slots)
  decode/prefill torch SDPA with the flash backend and with the cuDNN backend on the dense
                 (un-paged) equivalent, bottom-right causal, GQA through enable_gqa; and torch
                 FlexAttention's paged attention (flex_paged: PagedAttention page table over a
                 paged K/V cache with page_size = our block_size and shuffled pages, compiled
                 flex_attention with a bottom-right causal block mask converted to physical pages)
                 and FlashInfer's paged kernels on the same page size and shuffled page tables
                 (flashinfer_peer.py: tensor-core and CUDA-core decode, FA3 and FA2 prefill,
                 BatchPOD for mixed batches; optional, a row says so when FlashInfer is absent)
Every attention peer is first run on the inputs of our request 0 (written by our bench with
--check-dir) and must match our output rows within the acceptance tolerance before it is timed: a
fast answer that differs is reported as a mismatch, not as a time.

Usage: peers.py --json OUT ours1.json [ours2.json ...]
"""
import argparse
import json
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashinfer_peer

WARMUP, ITERS = 10, 100
# GPU clock cycles per second assumed when a spin is sized in seconds: at least the SM clock of the
# GPUs benched (1.98 GHz on the H100 and H200), so a spin lasts at least as long as intended.
SPIN_CYCLES_PER_S = 2.0e9
# The spin covers the host's enqueueing of the timed calls with this much to spare, up to a second.
SPIN_MARGIN, SPIN_EXTRA_S, SPIN_MAX_S = 1.5, 1e-3, 1.0
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
# Timed runs whose spin did not cover the host's enqueueing (reported after each row, see main).
_spin_short = {"count": 0}


def median_ms(fn, warmup=WARMUP, iters=ITERS):
    """Median device time of one call among `iters` calls that run back to back, the way our Rust
    benches time ours (an event pair around each call, no gap between calls).

    The peers' launches are Python (FlashInfer's run(), SDPA), slower to enqueue than a short
    kernel runs, so each timed batch is queued behind one GPU spin that outlasts the host's
    enqueueing of the whole batch (timed in the warm-up, which is the same loop): the events then
    measure device time only. Why not a spin before every call, as the bench did until the
    thirty-fifth session: on a power-capped card each spin is a millisecond of low power that the
    next call spends at a higher clock, so compute-bound peers were timed in a state our back-to-back
    launches never reach (FlashInfer's FA3 on causal 2 x 8192: 1.901 ms that way, 2.079 ms back to
    back, in one H100 run; docs/PERFORMANCE.md)."""
    sleep = getattr(torch.cuda, "_sleep", None)

    def batch(n, spin_s):
        if sleep is not None and spin_s > 0:
            sleep(int(spin_s * SPIN_CYCLES_PER_S))
        t0 = time.perf_counter()
        times = []
        for _ in range(n):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            times.append((s, e))
        host_s = time.perf_counter() - t0
        torch.cuda.synchronize()
        return times, host_s

    _, host_s = batch(warmup, 0)
    spin_s = min(SPIN_MARGIN * host_s * iters / max(warmup, 1) + SPIN_EXTRA_S, SPIN_MAX_S)
    times, host_s = batch(iters, spin_s)
    if sleep is not None and host_s > spin_s:
        _spin_short["count"] += 1
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


FLEX_ROW_BUDGET_S = 90.0  # a row whose flex peer (compiles included) takes longer stops the rest
_flex = {"fn": None, "skip": None}


def _flex_compiled():
    if _flex["fn"] is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # every shape (and every mask closure) is its own compile: never fall back to eager
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
        if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
            torch._dynamo.config.fail_on_recompile_limit_hit = True
        _flex["fn"] = torch.compile(flex_attention, dynamic=False)
    return _flex["fn"]


def flex_paged_group(row, q_len, kv_len, batch, check):
    """One uniform group of requests through FlexAttention's PagedAttention. Returns (call, out_fn)
    where call() runs the attention and out_fn() is the last output."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask

    dt = DTYPES[row["dtype"]]
    hq, hk, d, ps = row["num_heads"], row["num_kv_heads"], row["head_size"], row["block_size"]
    causal = row.get("causal", True)
    pages_per_seq = (kv_len + ps - 1) // ps
    n_pages = batch * pages_per_seq
    pa = PagedAttention(n_pages, ps, batch, device="cuda")
    order = list(range(n_pages))
    random.Random(1234 + batch + kv_len).shuffle(order)  # shuffled physical pages, like ours
    pa.empty_pages = order
    for b in range(batch):
        pa.reserve(torch.tensor(b, device="cuda"), torch.tensor(kv_len, device="cuda"))

    q, k, v = dense_inputs(row, q_len, kv_len, batch)
    if check is not None:  # request 0 is batch element 0 of its group: our check inputs
        cq, ck, cv, _ = check
        rows = cq.shape[2]
        q[0:1, :, q_len - rows:, :] = cq
        k[0:1] = ck
        v[0:1] = cv
    kc = torch.zeros(1, hk, n_pages * ps, d, device="cuda", dtype=dt)
    vc = torch.zeros_like(kc)
    batch_idx = torch.arange(batch, device="cuda")
    pos = torch.arange(kv_len, device="cuda").unsqueeze(0).expand(batch, kv_len)
    pa.assign(batch_idx, pos, k, v, kc, vc)
    del k, v

    off = kv_len - q_len  # bottom-right causal: query i sees key j iff j <= off + i

    def causal_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + off

    def all_mod(b, h, q_idx, kv_idx):
        return kv_idx < kv_len

    logical = create_block_mask(causal_mod if causal else all_mod, batch, None, q_len,
                                pages_per_seq * ps, device="cuda", BLOCK_SIZE=(128, ps))
    physical = pa.convert_logical_block_mask(logical, batch_idx)
    fn = _flex_compiled()
    opts = {"BLOCK_N": ps} if ps < 64 else None  # the kernel's KV tile must divide the page
    box = {}

    def call():
        box["out"] = fn(q, kc, vc, block_mask=physical, enable_gqa=True, kernel_options=opts)
        return box["out"]

    return call


def flex_paged_peer(row, check, groups):
    """FlexAttention paged attention. Request 0's group runs first with our check inputs as its
    batch element 0 (same compiled kernel and shape that is then timed), must match our rows."""
    if _flex["skip"]:
        return None, _flex["skip"]
    t0 = time.time()
    total, status = 0.0, "ok"
    first = tuple(row["seqs"][0])
    ordered = sorted(groups.items(), key=lambda g: g[0] != first)
    try:
        for (q_len, kv_len), batch in ordered:
            chk = check if (q_len, kv_len) == first else None
            call = flex_paged_group(row, q_len, kv_len, batch, chk)
            out = call()
            if chk is not None:
                rows = chk[0].shape[2]
                ok, err = matches(out[0:1, :, q_len - rows:, :], chk[3])
                if not ok:
                    status = f"does not match ours (max abs diff {err:.3g})"
                    break
            total += median_ms(call)
            del call, out
            torch.cuda.empty_cache()
            if time.time() - t0 > FLEX_ROW_BUDGET_S:
                raise TimeoutError(f"flex peer over {FLEX_ROW_BUDGET_S:.0f} s on this row")
    except Exception as e:  # unsupported shape, compile failure, OOM, budget
        msg = str(e).strip().splitlines()
        status = f"unsupported: {type(e).__name__}: {(msg[-1] if msg else '')[:160]}"
    spent = time.time() - t0
    if spent > FLEX_ROW_BUDGET_S:
        _flex["skip"] = (f"skipped: flex peer took {spent:.0f} s on '{row['name']}' {row['dtype']}"
                         f" (budget {FLEX_ROW_BUDGET_S:.0f} s a row)")
    torch.cuda.empty_cache()
    return (total if status == "ok" else None), status


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
    t0 = time.time()
    result["flex_paged_ms"], result["flex_paged_status"] = flex_paged_peer(row, check, groups)
    print(f"    flex_paged: {result['flex_paged_status']} in {time.time() - t0:.1f} s", flush=True)
    t0 = time.time()
    result.update(flashinfer_peer.flashinfer_peer(
        row, check, median_ms, matches))
    print(f"    flashinfer: {result['flashinfer_status']} in {time.time() - t0:.1f} s", flush=True)
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
    print(f"FlashInfer: {flashinfer_peer.load()[1]}", flush=True)
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
        if _spin_short["count"]:
            print(f"    note: {_spin_short['count']} timed runs outran their spin (the host enqueued more "
                  "slowly than in the warm-up): their calls may include host time", flush=True)
            _spin_short["count"] = 0
        out.append({"name": row["name"], "dtype": row["dtype"], "kernel": kind, **peers})
        print(f"  {row['name']:<36} {row['dtype']:<5} " + " ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in peers.items()
            if not isinstance(v, dict)), flush=True)
        torch.cuda.empty_cache()
        json.dump(out, open(args.json, "w"), indent=1)  # after every row: a killed run keeps its rows
    json.dump(out, open(args.json, "w"), indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
