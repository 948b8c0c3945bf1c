#!/usr/bin/env python3
"""Tests of the bench scripts' plain-Python parts, runnable with python3 alone (no torch, no GPU):
the FlashInfer page-table conversion and result summary (flashinfer_peer.py), the report's merge,
table and JSON (report.py on synthetic rows), and the peers' timing protocol (peers.median_ms
against a stand-in for torch.cuda). `cargo xtask test` runs this file.

Usage: python3 bench/test_peers.py    (prints one PASS or FAIL line at the end)
"""
import contextlib
import json
import os
import py_compile
import random
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import flashinfer_peer as fp  # noqa: E402  (after the path tweak)
import report  # noqa: E402


@contextlib.contextmanager
def stand_in_modules(modules, fresh=()):
    """`modules` ({name: module}) in sys.modules, and the modules named in `fresh` dropped so that
    they import again against them; on exit sys.modules holds what it held before for every name."""
    names = list(modules) + [n for n in fresh if n not in modules]
    saved = {k: sys.modules.get(k) for k in names}
    sys.modules.update(modules)
    for name in fresh:
        sys.modules.pop(name, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class PageTable(unittest.TestCase):
    def test_hand_example(self):
        # 33 tokens in pages 5, 3, 9 (one token in the last), 16 tokens in page 7 (full)
        self.assertEqual(fp.paged_kv_args([[5, 3, 9], [7]], [33, 16], 16),
                         ([0, 3, 4], [5, 3, 9, 7], [1, 16]))

    def test_padded_rows_use_only_their_pages(self):
        # our table is padded to the widest row: the padding must not reach FlashInfer
        self.assertEqual(fp.paged_kv_args([[5, 3, 9, 0, 0], [7, 0, 0, 0, 0]], [40, 1], 16),
                         ([0, 3, 4], [5, 3, 9, 7], [8, 1]))

    def test_bad_tables_are_errors(self):
        with self.assertRaises(ValueError):
            fp.paged_kv_args([[1]], [17], 16)  # 17 tokens need 2 pages
        with self.assertRaises(ValueError):
            fp.paged_kv_args([[1], [2]], [16], 16)  # two rows, one length
        with self.assertRaises(ValueError):
            fp.paged_kv_args([[-1]], [4], 16)
        with self.assertRaises(ValueError):
            fp.paged_kv_args([[1]], [0], 16)
        with self.assertRaises(ValueError):
            fp.paged_kv_args([[1]], [4], 0)

    def test_every_token_maps_back_to_our_slot(self):
        rng = random.Random(7)
        for _ in range(200):
            bs = rng.choice([1, 8, 16, 32])
            kv_lens = [rng.randint(1, 300) for _ in range(rng.randint(1, 6))]
            rows, num_blocks = fp.shuffled_block_table(kv_lens, bs, rng.random())
            width = max(len(r) for r in rows)
            padded = [r + [0] * (width - len(r)) for r in rows]
            indptr, indices, last = fp.paged_kv_args(padded, kv_lens, bs)
            self.assertEqual(len(indptr), len(kv_lens) + 1)
            for r, kv in enumerate(kv_lens):
                n = indptr[r + 1] - indptr[r]
                self.assertEqual((n - 1) * bs + last[r], kv)  # FlashInfer's length is ours
                self.assertTrue(1 <= last[r] <= bs)
                for j in range(kv):  # token j: our slot = FlashInfer's page * bs + offset
                    ours = rows[r][j // bs] * bs + j % bs
                    theirs = indices[indptr[r] + j // bs] * bs + j % bs
                    self.assertEqual(ours, theirs)
            self.assertTrue(all(0 <= p < num_blocks for p in indices))


class ShuffledTable(unittest.TestCase):
    def test_like_our_bench(self):
        kv_lens = [4096] * 64
        rows, num_blocks = fp.shuffled_block_table(kv_lens, 16, "decode b64 x 4096/bf16")
        need = 64 * 256
        self.assertEqual(num_blocks, need + need // 4 + 64)  # bench_attention's pool
        pages = [p for r in rows for p in r]
        self.assertEqual(len(pages), need)
        self.assertEqual(len(set(pages)), need)  # no page shared
        self.assertTrue(all(0 <= p < num_blocks for p in pages))
        # shuffled: not one contiguous run in any request
        self.assertTrue(all(r != list(range(r[0], r[0] + len(r))) for r in rows))

    def test_deterministic_per_seed(self):
        a = fp.shuffled_block_table([100, 37], 16, "x")
        self.assertEqual(a, fp.shuffled_block_table([100, 37], 16, "x"))
        self.assertNotEqual(a, fp.shuffled_block_table([100, 37], 16, "y"))


class Batches(unittest.TestCase):
    def test_qo_indptr(self):
        self.assertEqual(fp.qo_indptr([1, 1, 1024, 1024]), [0, 1, 2, 1026, 2050])
        with self.assertRaises(ValueError):
            fp.qo_indptr([1, 0])

    def test_split_pod_of_the_mixed_shape(self):
        seqs = [(1, 2048)] * 64 + [(1024, 1024)] * 2
        prefills, decodes = fp.split_pod(seqs)
        self.assertEqual(prefills, [64, 65])
        self.assertEqual(decodes, list(range(64)))

    def test_paths_per_kernel(self):
        self.assertIn("decode_tc", fp.PATHS["decode"])
        self.assertIn("prefill_fa3", fp.PATHS["prefill"])
        self.assertIn("pod", fp.PATHS["mixed"])
        self.assertNotIn("kv_write", fp.PATHS)


class Summary(unittest.TestCase):
    def test_fastest_matched_path(self):
        paths = {"decode_tc": {"ms": 0.25, "status": "ok"}, "decode_cc": {"ms": 0.31, "status": "ok"}}
        self.assertEqual(fp.summarize(paths), (0.25, "decode_tc", "ok"))

    def test_mismatch_never_counts_and_is_named(self):
        paths = {"pod": {"ms": None, "status": "does not match ours (max abs diff 0.5)"},
                 "prefill_fa3": {"ms": 0.4, "status": "ok"}}
        ms, path, status = fp.summarize(paths)
        self.assertEqual((ms, path), (0.4, "prefill_fa3"))
        self.assertIn("MISMATCH", status)
        self.assertIn("pod", status)
        ms, path, status = fp.summarize({"pod": paths["pod"]})
        self.assertIsNone(ms)
        self.assertTrue(status.startswith("MISMATCH"))

    def test_all_not_prebuilt(self):
        paths = {"decode_tc": {"ms": None, "status": fp.NOT_PREBUILT},
                 "decode_cc": {"ms": None, "status": fp.NOT_PREBUILT}}
        self.assertEqual(fp.summarize(paths), (None, None, fp.NOT_PREBUILT))

    def test_mixed_failures_are_listed(self):
        paths = {"prefill_fa3": {"ms": None, "status": fp.NOT_PREBUILT},
                 "prefill_fa2": {"ms": None, "status": "unsupported: RuntimeError: x"}}
        ms, _, status = fp.summarize(paths)
        self.assertIsNone(ms)
        self.assertIn("prefill_fa3: n/a", status)
        self.assertIn("prefill_fa2: unsupported", status)


class Jit(unittest.TestCase):
    def test_env(self):
        self.assertFalse(fp.jit_allowed({}))
        self.assertFalse(fp.jit_allowed({fp.JIT_ENV: "0"}))
        self.assertTrue(fp.jit_allowed({fp.JIT_ENV: "1"}))

    def test_status_of(self):
        self.assertEqual(fp.status_of(fp.NotPrebuilt("m")), fp.NOT_PREBUILT)

        class MissingJITCacheError(RuntimeError):
            pass

        self.assertEqual(fp.status_of(MissingJITCacheError("m")), fp.NOT_PREBUILT)
        try:  # wrapped by a caller
            try:
                raise fp.NotPrebuilt("m")
            except fp.NotPrebuilt as e:
                raise RuntimeError("plan failed") from e
        except RuntimeError as e:
            self.assertEqual(fp.status_of(e), fp.NOT_PREBUILT)
        self.assertEqual(fp.status_of(ValueError("bad\nshape")), "unsupported: ValueError: shape")

    def test_guard_refuses_builds_of_unbuilt_modules(self):
        class Spec:  # the shape of FlashInfer's JitSpec: build() compiles, jit_library_path is its .so
            name = "mod"
            jit_library_path = os.path.join(tempfile.gettempdir(), "no-such-dir-xyz", "mod.so")

            def build(self):
                return "built"

            def build_and_load(self):
                return self.build()

        import types
        core = types.ModuleType("flashinfer.jit.core")
        core.JitSpec = Spec
        jit = types.ModuleType("flashinfer.jit")
        jit.core = core
        with stand_in_modules({"flashinfer": types.ModuleType("flashinfer"), "flashinfer.jit": jit,
                               "flashinfer.jit.core": core}):
            fp._install_jit_guard(None)
            with self.assertRaises(fp.NotPrebuilt):
                Spec().build()
            with tempfile.NamedTemporaryFile(suffix=".so") as so:  # already in the JIT cache: allowed
                s = Spec()
                s.jit_library_path = so.name
                self.assertEqual(s.build(), "built")

            class Later(Spec):  # a kind of spec FlashInfer defines after the guard went in
                def build(self):
                    return "built later"

            with self.assertRaises(fp.NotPrebuilt):
                Later().build_and_load()


def ours_rows():
    def row(kernel, name, dtype, ms, bytes_, flops, seqs):
        return {"kernel": kernel, "name": name, "dtype": dtype, "num_heads": 32, "num_kv_heads": 8,
                "head_size": 128, "block_size": 16, "causal": True, "seqs": seqs, "bytes": bytes_,
                "flops": flops, "ours_ms": ms, "copy_ms": ms * 0.4, "ratio_to_copy": 0.84,
                "num_splits": 1, "check_file": "", "check_rows": 1}
    return [
        row("decode", "decode b64 x 4096", "bf16", 0.30, 1_074_790_400, 4.29e9, [[1, 4096]] * 64),
        row("decode", "decode b64 x 4096", "f16", 0.30, 1_074_790_400, 4.29e9, [[1, 4096]] * 64),
        row("prefill", "prefill causal 8 x 2048", "bf16", 0.80, 335_544_320, 2.75e11, [[2048, 2048]] * 8),
        row("mixed", "mixed 64 decodes + 2 x 1024", "bf16", 0.25, 579_862_528, 1.93e10,
            [[1, 2048]] * 64 + [[1024, 1024]] * 2),
    ]


def peers_rows():
    base = {"sdpa_flash_ms": 0.4, "sdpa_flash_status": "ok", "sdpa_cudnn_ms": 0.28,
            "sdpa_cudnn_status": "ok", "flex_paged_ms": 0.5, "flex_paged_status": "ok"}
    return [
        {"name": "decode b64 x 4096", "dtype": "bf16", "kernel": "decode", **base,
         "flashinfer_ms": 0.255, "flashinfer_status": "ok", "flashinfer_path": "decode_tc",
         "flashinfer_paths": {"decode_tc": {"ms": 0.255, "status": "ok"}}},
        {"name": "decode b64 x 4096", "dtype": "f16", "kernel": "decode", **base,
         "flashinfer_ms": None, "flashinfer_status": fp.NOT_PREBUILT, "flashinfer_path": None},
        {"name": "prefill causal 8 x 2048", "dtype": "bf16", "kernel": "prefill", **base,
         "flashinfer_ms": 0.652, "flashinfer_status": "ok", "flashinfer_path": "prefill_fa3"},
        {"name": "mixed 64 decodes + 2 x 1024", "dtype": "bf16", "kernel": "mixed", **base,
         "flashinfer_ms": None, "flashinfer_path": None,
         "flashinfer_status": "MISMATCH: pod does not match ours (max abs diff 0.5)"},
    ]


class Report(unittest.TestCase):
    def run_report(self, ours, peers):
        with tempfile.TemporaryDirectory() as tmp:
            o, p = os.path.join(tmp, "ours.json"), os.path.join(tmp, "peers.json")
            for path, rows in ((o, ours), (p, peers)):
                with open(path, "w") as f:
                    json.dump(rows, f)
            out = os.path.join(tmp, "out")
            proc = subprocess.run([sys.executable, os.path.join(HERE, "report.py"), "--out", out, o, p],
                                  capture_output=True, text=True)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            with open(os.path.join(out, "bench-results.json")) as f:
                return proc.stdout, json.load(f)

    def test_flashinfer_column(self):
        stdout, table = self.run_report(ours_rows(), peers_rows())
        header = [l for l in stdout.splitlines() if l.startswith("shape |")][0].split(" | ")
        for col in ("flashinfer_ms", "ratio_vs_flashinfer", "flashinfer_gbps", "flashinfer_tflops",
                    "flashinfer_path", "ratio_vs_sdpa_cudnn"):
            self.assertIn(col, header)
        by = {(r["shape"], r["dtype"]): r for r in table}
        d = by[("decode b64 x 4096", "bf16")]
        self.assertAlmostEqual(d["ratio_vs_flashinfer"], 0.255 / 0.30)  # their time / ours
        self.assertAlmostEqual(d["flashinfer_gbps"], 1_074_790_400 / 0.255e-3 / 1e9)
        self.assertEqual(d["flashinfer_path"], "decode_tc")
        self.assertIn("decode_tc", d["flashinfer_paths"])
        p = by[("prefill causal 8 x 2048", "bf16")]
        self.assertAlmostEqual(p["flashinfer_tflops"], 2.75e11 / 0.652e-3 / 1e12)
        self.assertNotIn("ratio_vs_flashinfer", by[("decode b64 x 4096", "f16")])
        lines = stdout.splitlines()
        f16 = [l for l in lines if l.startswith("decode b64 x 4096 | f16")][0].split(" | ")
        self.assertEqual(f16[header.index("ratio_vs_flashinfer")], fp.NOT_PREBUILT)
        mixed = [l for l in lines if l.startswith("mixed")][0].split(" | ")
        self.assertEqual(mixed[header.index("ratio_vs_flashinfer")], "MISMATCH")
        self.assertTrue(any(l.startswith("note: flashinfer_status = MISMATCH") for l in lines))

    def test_flashinfer_absent(self):
        peers = peers_rows()
        for p in peers:
            for k in [k for k in p if k.startswith("flashinfer")]:
                del p[k]
            p["flashinfer_ms"] = None
            p["flashinfer_status"] = "not installed (ModuleNotFoundError: No module named 'flashinfer')"
        stdout, table = self.run_report(ours_rows(), peers)
        header = [l for l in stdout.splitlines() if l.startswith("shape |")][0].split(" | ")
        self.assertIn("ratio_vs_flashinfer", header)  # the column stays and says why it is empty
        row = [l for l in stdout.splitlines() if l.startswith("prefill")][0].split(" | ")
        self.assertEqual(row[header.index("ratio_vs_flashinfer")], "not installed")
        self.assertIn("(all rows)", stdout)
        self.assertAlmostEqual(table[0]["ratio_vs_sdpa_cudnn"], 0.28 / 0.30)

    def test_short_status(self):
        self.assertIsNone(report.short_status("ok"))
        self.assertEqual(report.short_status("does not match ours (max abs diff 1)"), "MISMATCH")
        self.assertEqual(report.short_status("unsupported: X: y"), "unsupported")


class Compiles(unittest.TestCase):
    def test_scripts_compile(self):
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("peers.py", "report.py", "flashinfer_peer.py", "test_peers.py"):
                py_compile.compile(os.path.join(HERE, name), cfile=os.path.join(tmp, name + "c"), doraise=True)


def _import_peers_with_fake_torch(log, elapsed):
    """peers.py imported against a stand-in torch whose CUDA calls append to `log`; event pairs
    report the durations in `elapsed`, in order."""
    import importlib
    import types

    durations = iter(elapsed)

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            log.append("record")

        def elapsed_time(self, end):
            return next(durations)

    cuda = types.SimpleNamespace(Event=Event, synchronize=lambda: log.append("sync"),
                                 _sleep=lambda cycles: log.append(("sleep", cycles)))
    torch = types.ModuleType("torch")
    torch.cuda = cuda
    nn = types.ModuleType("torch.nn")
    functional = types.ModuleType("torch.nn.functional")
    attention = types.ModuleType("torch.nn.attention")
    attention.SDPBackend = types.SimpleNamespace(FLASH_ATTENTION=0, CUDNN_ATTENTION=1)
    attention.sdpa_kernel = None
    torch.bfloat16 = torch.float16 = torch.float32 = None
    with stand_in_modules({"torch": torch, "torch.nn": nn, "torch.nn.functional": functional,
                           "torch.nn.attention": attention}, fresh=["peers"]):
        return importlib.import_module("peers")


class Timing(unittest.TestCase):
    def test_one_spin_per_timed_run_and_the_median(self):
        log = []
        elapsed = [5.0, 1.0, 3.0, 2.0, 4.0]
        peers = _import_peers_with_fake_torch(log, elapsed)
        ms = peers.median_ms(lambda: log.append("call"), warmup=2, iters=5)
        self.assertEqual(ms, 3.0)
        # warm-up: two calls with no spin, then a sync; the timed run: one spin, then five calls
        # back to back, each between its own two events, then a sync
        warm = ["record", "call", "record"] * 2 + ["sync"]
        self.assertEqual(log[:len(warm)], warm)
        timed = log[len(warm):]
        self.assertEqual(timed[0][0], "sleep")
        self.assertEqual(timed[1:], ["record", "call", "record"] * 5 + ["sync"])

    def test_the_spin_outlasts_the_hosts_enqueueing(self):
        import time

        log = []
        peers = _import_peers_with_fake_torch(log, [1.0] * 10)

        def slow_call():  # 2 ms of host time per call
            log.append("call")
            end = time.perf_counter() + 0.002
            while time.perf_counter() < end:
                pass

        peers.median_ms(slow_call, warmup=2, iters=10)
        cycles = [e[1] for e in log if isinstance(e, tuple)]
        self.assertEqual(len(cycles), 1)
        # ten calls of at least 2 ms each: the spin must cover 20 ms of enqueueing, at the fastest clock
        self.assertGreaterEqual(cycles[0] / peers.SPIN_CYCLES_PER_S, 0.020)
        self.assertEqual(peers._spin_short["count"], 0)

    def test_a_run_that_outlasts_its_spin_is_counted(self):
        import time

        log = []
        peers = _import_peers_with_fake_torch(log, [1.0] * 10)
        calls = {"n": 0}

        def slower_after_warmup():  # fast in the warm-up, 5 ms a call after it
            calls["n"] += 1
            if calls["n"] > 2:
                end = time.perf_counter() + 0.005
                while time.perf_counter() < end:
                    pass

        peers.median_ms(slower_after_warmup, warmup=2, iters=10)
        self.assertEqual(peers._spin_short["count"], 1)


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=1).result
    ok = result.wasSuccessful() and result.testsRun > 0
    print(f"bench/test_peers.py: {'PASS' if ok else 'FAIL'} ({result.testsRun} tests, "
          f"{len(result.failures)} failures, {len(result.errors)} errors)")
    sys.exit(0 if ok else 1)
