"""FlashInfer as a benchmark peer: its paged kernels on our shapes, page size and shuffled pages.

FlashInfer is optional. When `import flashinfer` fails, every row says so and the other peers run
as before. It is found the usual way (a pip install) or through PYTHONPATH (the bundle's run.sh
unpacks a prebuilt copy there).

Paths timed per row kind (each planned once outside the timing, its run() timed):
  decode   decode_tc    BatchDecodeWithPagedKVCacheWrapper, use_tensor_cores=True
           decode_cc    the same wrapper on CUDA cores
  prefill  prefill_fa3  BatchPrefillWithPagedKVCacheWrapper, backend="fa3" (Hopper)
           prefill_fa2  the same wrapper, backend="fa2"
  mixed    pod          BatchPODWithPagedKVCacheWrapper: prefills and decodes in one launch
           prefill_fa3  the whole ragged batch as one paged prefill launch
The row's FlashInfer time is its fastest path whose output matched ours.

Every path first runs with our request 0's inputs in its request 0 (the check file our bench
wrote) and must match our output rows within the acceptance tolerance; a path that does not is
reported loudly and its time is not used.

A path whose kernel module FlashInfer would have to compile first (no ahead-of-time build and none
in its JIT cache: f16 with the prebuilt bf16 set, other head sizes, soft-cap) is reported as
"n/a (not prebuilt)" instead of compiling for minutes, unless PAGED_ATTN_FLASHINFER_JIT=1.

The helpers above the torch section are plain Python (no torch, no FlashInfer) so that
bench/test_peers.py can test them on any machine.
"""
import os
import random
import sys

JIT_ENV = "PAGED_ATTN_FLASHINFER_JIT"
NOT_PREBUILT = "n/a (not prebuilt)"
PATHS = {
    "decode": ("decode_tc", "decode_cc"),
    "prefill": ("prefill_fa3", "prefill_fa2"),
    "mixed": ("pod", "prefill_fa3"),
}
# Split-KV partial results live here; 128 MiB is FlashInfer's recommendation, this leaves room for
# the long single-sequence decode splits.
WORKSPACE_BYTES = 512 << 20


# ---------------------------------------------------------------------------------------------
# Plain Python helpers (tested by bench/test_peers.py without torch)
# ---------------------------------------------------------------------------------------------

def pages_needed(kv_len, block_size):
    """Pages holding kv_len tokens; a sequence always has at least one token."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if kv_len <= 0:
        raise ValueError(f"kv_len must be positive, got {kv_len}")
    return (kv_len + block_size - 1) // block_size


def shuffled_block_table(kv_lens, block_size, seed):
    """Block-table rows laid out the way our bench lays out its own: a pool a quarter larger than
    needed (plus 64) shuffled once, each request taking its pages from the pool in turn, so pages
    are non-contiguous and in random order. Returns (rows, num_blocks)."""
    need = sum(pages_needed(kv, block_size) for kv in kv_lens)
    num_blocks = need + need // 4 + 64
    pool = list(range(num_blocks))
    random.Random(seed).shuffle(pool)
    rows, at = [], 0
    for kv in kv_lens:
        n = pages_needed(kv, block_size)
        rows.append(pool[at:at + n])
        at += n
    return rows, num_blocks


def paged_kv_args(rows, kv_lens, block_size):
    """Our block-table rows (each may be padded past its last page, as our padded table is) and
    sequence lengths -> FlashInfer's CSR page table: (kv_indptr, kv_indices, kv_last_page_len),
    lists of ints. kv_last_page_len counts the tokens in each request's last page (1..block_size).
    """
    if len(rows) != len(kv_lens):
        raise ValueError(f"{len(rows)} block-table rows for {len(kv_lens)} sequences")
    indptr, indices, last = [0], [], []
    for r, (row, kv) in enumerate(zip(rows, kv_lens)):
        n = pages_needed(kv, block_size)
        if len(row) < n:
            raise ValueError(f"row {r} has {len(row)} pages, {kv} tokens need {n}")
        page_ids = list(row[:n])
        if any(p < 0 for p in page_ids):
            raise ValueError(f"row {r} names a negative page")
        indices.extend(page_ids)
        indptr.append(len(indices))
        last.append(kv - (n - 1) * block_size)
    return indptr, indices, last


def qo_indptr(q_lens):
    """Row offsets of each request's queries in the packed query tensor."""
    out = [0]
    for q in q_lens:
        if q <= 0:
            raise ValueError(f"query length must be positive, got {q}")
        out.append(out[-1] + q)
    return out


def split_pod(seqs):
    """Request indices of a mixed batch: (prefills, decodes), each in batch order. A decode has one
    query row; POD runs the two groups side by side in one launch."""
    prefills = [i for i, (q, _) in enumerate(seqs) if q > 1]
    decodes = [i for i, (q, _) in enumerate(seqs) if q == 1]
    return prefills, decodes


def summarize(paths):
    """The row's FlashInfer result from its paths ({name: {"ms": float|None, "status": str}}):
    (ms, path, status). ms is the fastest path that ran and matched ours. The status is "ok", or
    names what kept the others from counting, mismatches first (they must never pass quietly)."""
    ok = {n: p["ms"] for n, p in paths.items() if p.get("status") == "ok" and p.get("ms")}
    bad = {n: p.get("status", "?") for n, p in paths.items() if p.get("status") != "ok"}
    mismatch = {n: s for n, s in bad.items() if "does not match" in s}
    if ok:
        best = min(ok, key=ok.get)
        if mismatch:
            detail = "; ".join(f"{n} {s}" for n, s in mismatch.items())
            return ok[best], best, f"ok ({best}), but MISMATCH: {detail}"
        return ok[best], best, "ok"
    if mismatch:
        return None, None, "MISMATCH: " + "; ".join(f"{n} {s}" for n, s in mismatch.items())
    statuses = set(bad.values())
    if len(statuses) == 1:
        return None, None, statuses.pop()
    return None, None, "; ".join(f"{n}: {s}" for n, s in bad.items()) or "no path"


def jit_allowed(env=None):
    """True when the user asked FlashInfer to compile what is not prebuilt."""
    env = os.environ if env is None else env
    return env.get(JIT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def status_of(exc):
    """A short status for an exception a path raised: "n/a (not prebuilt)" when FlashInfer wanted
    to compile a module (ours or its own JIT-disabled error, anywhere in the cause chain)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, NotPrebuilt) or type(seen).__name__ == "MissingJITCacheError":
            return NOT_PREBUILT
        seen = seen.__cause__ or seen.__context__
    lines = str(exc).strip().splitlines()
    return f"unsupported: {type(exc).__name__}: {(lines[-1] if lines else '')[:160]}"


class NotPrebuilt(RuntimeError):
    """Raised in place of a FlashInfer JIT build when JIT was not asked for."""


# ---------------------------------------------------------------------------------------------
# FlashInfer (torch and flashinfer imported only from here on, inside functions)
# ---------------------------------------------------------------------------------------------

_state = {"fi": None, "status": None, "workspace": None}


def _guard_builds(base):
    """Replaces the concrete build() of `base` and of every subclass defined so far with one that
    raises NotPrebuilt unless the module's library is already in FlashInfer's JIT cache (then the
    build is ninja's no-op). Idempotent; returns how many methods it replaced this time."""
    classes, todo = [], [base]
    while todo:
        cls = todo.pop()
        classes.append(cls)
        todo.extend(cls.__subclasses__())
    guarded = 0
    for cls in classes:
        orig = cls.__dict__.get("build")
        if orig is None or getattr(orig, "__isabstractmethod__", False) or getattr(orig, "_no_jit", False):
            continue

        def build(self, *args, _orig=orig, **kwargs):
            lib = getattr(self, "jit_library_path", None)
            if lib is not None and os.path.exists(str(lib)):
                return _orig(self, *args, **kwargs)
            raise NotPrebuilt(f"FlashInfer module {getattr(self, 'name', '?')} is not prebuilt "
                              f"(set {JIT_ENV}=1 to let FlashInfer compile it)")

        build._no_jit = True
        setattr(cls, "build", build)
        guarded += 1
    return guarded


def _install_jit_guard(fi):
    """Keeps FlashInfer from compiling: every JitSpec build raises NotPrebuilt unless the module is
    prebuilt (loaded without building) or already in its JIT cache. Kinds of JitSpec defined later
    (FlashInfer imports some lazily) are guarded when a module is first loaded through them.
    Returns a line for the log."""
    try:
        from flashinfer.jit import core
    except Exception:
        core = None
    base = getattr(core, "JitSpec", None) if core is not None else None
    if base is None:
        # No JitSpec to guard: ask FlashInfer itself (versions that know this variable refuse).
        os.environ.setdefault("FLASHINFER_DISABLE_JIT", "1")
        return "JIT refused through FLASHINFER_DISABLE_JIT"
    guarded = _guard_builds(base)
    load_fn = base.__dict__.get("build_and_load")
    if load_fn is not None and not getattr(load_fn, "_no_jit", False):
        def build_and_load(self, *args, _orig=load_fn, **kwargs):
            _guard_builds(base)
            return _orig(self, *args, **kwargs)

        build_and_load._no_jit = True
        base.build_and_load = build_and_load
    return f"JIT refused ({guarded} build methods guarded); {JIT_ENV}=1 allows it"


def load():
    """(flashinfer module or None, status line). Imported once per process."""
    if _state["status"] is None:
        try:
            import flashinfer as fi

            guard = "JIT allowed" if jit_allowed() else _install_jit_guard(fi)
            _state["fi"] = fi
            _state["status"] = f"flashinfer {getattr(fi, '__version__', '?')} from {os.path.dirname(fi.__file__)}; {guard}"
        except Exception as e:  # not installed, or a dependency missing: the column says so
            lines = str(e).strip().splitlines()
            _state["status"] = f"not installed ({type(e).__name__}: {(lines[-1] if lines else '')[:120]})"
    return _state["fi"], _state["status"]


def _workspace():
    import torch

    if _state["workspace"] is None:
        _state["workspace"] = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    return _state["workspace"]


class _Inputs:
    """One row's paged K/V cache (shuffled pages) and packed queries, with our request 0 inside."""

    def __init__(self, row, check, dtype):
        import torch

        self.seqs = [tuple(s) for s in row["seqs"]]
        self.h, self.hk, self.d = row["num_heads"], row["num_kv_heads"], row["head_size"]
        self.ps, self.dtype = row["block_size"], dtype
        self.causal = row.get("causal", True)
        self.soft_cap = row.get("soft_cap") or None
        self.q_lens = [q for q, _ in self.seqs]
        self.kv_lens = [kv for _, kv in self.seqs]
        self.rows, num_blocks = shuffled_block_table(self.kv_lens, self.ps, f"{row['name']}/{row['dtype']}")
        shape = (num_blocks, self.ps, self.hk, self.d)
        self.kc = torch.randn(shape, device="cuda", dtype=dtype)
        self.vc = torch.randn(shape, device="cuda", dtype=dtype)
        self.q = torch.randn(sum(self.q_lens), self.h, self.d, device="cuda", dtype=dtype)
        self.check_rows = 0
        self.ours = None
        if check is not None:
            cq, ck, cv, ours = check
            kv0, q0 = self.kv_lens[0], self.q_lens[0]
            pages = torch.tensor(self.rows[0], device="cuda", dtype=torch.int64)
            pos = torch.arange(kv0, device="cuda")
            self.kc[pages[pos // self.ps], pos % self.ps] = ck[0].transpose(0, 1).to(dtype)
            self.vc[pages[pos // self.ps], pos % self.ps] = cv[0].transpose(0, 1).to(dtype)
            self.check_rows = cq.shape[2]
            self.q[q0 - self.check_rows:q0] = cq[0].transpose(0, 1).to(dtype)
            self.ours = ours

    def tables(self, ids):
        """FlashInfer's page-table tensors for the requests `ids` (device int32)."""
        import torch

        indptr, indices, last = paged_kv_args([self.rows[i] for i in ids], [self.kv_lens[i] for i in ids], self.ps)
        qo = qo_indptr([self.q_lens[i] for i in ids])
        as_t = lambda xs: torch.tensor(xs, dtype=torch.int32, device="cuda")
        return as_t(qo), as_t(indptr), as_t(indices), as_t(last)

    def queries(self, ids):
        import torch

        if list(ids) == list(range(len(self.seqs))):
            return self.q
        starts = qo_indptr(self.q_lens)
        idx = torch.cat([torch.arange(starts[i], starts[i + 1], device="cuda") for i in ids])
        return self.q[idx].contiguous()

    def request0(self, out):
        """Our request 0's checked rows of `out` (request 0 first in its group), as [1, h, rows, d]."""
        q0, r = self.q_lens[0], self.check_rows
        return out[q0 - r:q0].transpose(0, 1).unsqueeze(0)


def _plan_decode(fi, x, tensor_cores):
    if any(q != 1 for q in x.q_lens):
        raise ValueError("decode path needs one query row per request")
    import torch

    ids = range(len(x.seqs))
    _, indptr, indices, last = x.tables(ids)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(_workspace(), "NHD", use_tensor_cores=tensor_cores)
    kw = {"logits_soft_cap": x.soft_cap} if x.soft_cap else {}
    w.plan(indptr, indices, last, x.h, x.hk, x.d, x.ps, q_data_type=x.dtype, kv_data_type=x.dtype, **kw)
    out = torch.empty_like(x.q)
    return lambda: w.run(x.q, (x.kc, x.vc), out=out), lambda res: res


def _plan_prefill(fi, x, backend):
    import torch

    ids = range(len(x.seqs))
    qo, indptr, indices, last = x.tables(ids)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(_workspace(), "NHD", backend=backend)
    kw = {"logits_soft_cap": x.soft_cap} if x.soft_cap else {}
    w.plan(qo, indptr, indices, last, x.h, x.hk, x.d, x.ps, causal=x.causal,
           q_data_type=x.dtype, kv_data_type=x.dtype, **kw)
    out = torch.empty_like(x.q)
    return lambda: w.run(x.q, (x.kc, x.vc), out=out), lambda res: res


def _plan_pod(fi, x):
    if x.soft_cap:
        raise ValueError("BatchPOD has no soft-cap")
    prefills, decodes = split_pod(x.seqs)
    if not prefills or not decodes:
        raise ValueError("POD needs both prefills and decodes in the batch")
    qo_p, indptr_p, indices_p, last_p = x.tables(prefills)
    qo_d, indptr_d, indices_d, last_d = x.tables(decodes)
    q_p, q_d = x.queries(prefills), x.queries(decodes)
    w = fi.BatchPODWithPagedKVCacheWrapper(_workspace(), "NHD")
    w.plan(qo_p, indptr_p, indices_p, last_p, qo_d, indptr_d, indices_d, last_d,
           num_qo_heads=x.h, num_kv_heads=x.hk, head_dim=x.d, page_size=x.ps,
           q_data_type=x.dtype, kv_data_type=x.dtype)
    # request 0 is the first of its group, so its rows sit where request0() looks
    pick = 1 if 0 in decodes else 0
    causal = x.causal
    return (lambda: w.run(q_p, (x.kc, x.vc), q_d, (x.kc, x.vc), causal_p=causal)), (lambda res: res[pick])


def _plan(fi, name, x):
    if name == "decode_tc":
        return _plan_decode(fi, x, True)
    if name == "decode_cc":
        return _plan_decode(fi, x, False)
    if name == "prefill_fa3":
        return _plan_prefill(fi, x, "fa3")
    if name == "prefill_fa2":
        return _plan_prefill(fi, x, "fa2")
    if name == "pod":
        return _plan_pod(fi, x)
    raise ValueError(f"unknown FlashInfer path {name}")


def loud(msg):
    """A mismatch must not scroll by: to stdout and stderr, framed."""
    line = "!" * 100
    for stream in (sys.stdout, sys.stderr):
        print(f"{line}\n!!! {msg}\n{line}", file=stream, flush=True)


def flashinfer_peer(row, check, timer, matches):
    """The FlashInfer fields of one attention row. `timer(fn)` returns fn's median device ms;
    `matches(got, want)` is the acceptance check the other peers use. Returns a dict:
    flashinfer_ms (fastest matched path or None), flashinfer_path, flashinfer_status and
    flashinfer_paths ({path: {"ms", "status", "max_abs_diff"}})."""
    fi, fi_status = load()
    if fi is None:
        return {"flashinfer_ms": None, "flashinfer_status": fi_status}
    import torch

    dtypes = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
    names = PATHS.get(row["kernel"], ())
    paths = {}
    x = None
    try:
        x = _Inputs(row, check, dtypes[row["dtype"]])
        for name in names:
            entry = {"ms": None, "status": "ok"}
            try:
                call, pick = _plan(fi, name, x)
                res = call()
                if x.ours is not None:
                    ok, err = matches(x.request0(pick(res)), x.ours)
                    entry["max_abs_diff"] = err
                    if not ok:
                        entry["status"] = f"does not match ours (max abs diff {err:.3g})"
                        loud(f"FlashInfer {name} on '{row['name']}' {row['dtype']} DOES NOT MATCH our output "
                             f"(max abs diff {err:.3g}): its time is not used")
                if entry["status"] == "ok":
                    entry["ms"] = timer(call)
                del call, res
            except Exception as e:  # not prebuilt, a shape the path cannot run, OOM
                entry["status"] = status_of(e)
            paths[name] = entry
            print(f"    flashinfer {name}: {entry['status']}"
                  + (f" {entry['ms']:.4f} ms" if entry["ms"] else ""), flush=True)
    except Exception as e:  # the inputs themselves (OOM)
        paths["inputs"] = {"ms": None, "status": status_of(e)}
    finally:
        del x
        torch.cuda.empty_cache()
    ms, path, status = summarize(paths) if paths else (None, None, "no FlashInfer path for this kernel")
    out = {"flashinfer_ms": ms, "flashinfer_status": status, "flashinfer_path": path, "flashinfer_paths": paths}
    if check is None:
        out["flashinfer_check"] = "no check file: FlashInfer was not compared with our output"
    return out
