"""Check and time the triton engine's attention kernels at gpt-oss shapes (Hq 64, Hkv 8, d 64, bf16) on a GPU.

On the lent GPU machine, from the repository root:

    source tests/benchmarks/gpu/setup.sh && python3 tests/benchmarks/gpu/attention_kernels.py

1. Correctness against ``attention_ref`` (float32 on the GPU, on the same bf16 inputs; the bound of
   tests/test_triton_attention.py): varlen prefill with cached prefixes, decode with mixed contexts
   (past 32,768 keys), windows, sinks large/small, host maxima as upper bounds, a cache of many rows
   (offsets past 2^31 elements), the cache slots written, and a CUDA graph captured once with
   max_context_len = cache_len and replayed as contexts change.
2. Timing: decode batch 1 at 1k/8k/33k/128k context (window 0 and 128), batch 64 at mixed ~1k contexts,
   prefill of one 2k prompt and of 8 x 512; the full op in a CUDA graph (inputs rotated so the KV cache
   is not served from L2), eager, a per-kernel breakdown and a sweep of block sizes / stages / splits;
   bars: torch's scaled_dot_product_attention (best of its backends, without sinks: an easier problem)
   and the reference engine (TorchBackend.attention).

3. The fused decode op (``rope_decode_attention``: RoPE + cache write + split-KV decode + merge in one kernel,
   the triton engine's ``rope_attention`` at decode): correctness against today's composition (rope kernel,
   cache write, split + merge kernels) and the float32 reference at the 20b shape (mixed contexts, windows,
   host maxima as upper bounds, batch 64, rows past 2^31 elements, both merge modes), a CUDA graph captured
   once and replayed as contexts change, and timings at batch 1 and 64, context 1k and 8k, window 0 and 128:
   fused (one kernel; merge by the last split), fused with the merge kernel (two), and the 3-4 kernels of
   today, with a small sweep of block size / splits for the fused kernel.

Full table to $OUT/attention.txt (+ attention.json); a short table printed last.
``--dry-run``: runs the script's code paths on a CPU under TRITON_INTERPRET=1 at tiny shapes.
``--fused``: only part 3 (and the graph floor), for a short run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback

DRY = "--dry-run" in sys.argv
FUSED_ONLY = "--fused" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

from mxmoe.backends.reference import TorchBackend  # noqa: E402
from mxmoe.backends.triton_engine import attention as A  # noqa: E402
from mxmoe.backends.triton_engine import ops as O  # noqa: E402
from mxmoe.core.batch import Batch  # noqa: E402
from mxmoe.core.config import preset  # noqa: E402
from mxmoe.core.rope import yarn_inv_freq  # noqa: E402

START = time.time()
BUDGET_S = 200 if DRY else 225  # the run's limit is 300 s with setup; stop timing sweeps before it
DEV = "cpu" if DRY else "cuda"
HQ, HKV, D = (8, 1, 64) if DRY else (64, 8, 64)
SCALE = D ** -0.5
COPY_TBS, BF16_TFLOPS = 4.26, 781.0  # FACTS.md: measured ceilings of this H200 (d2d copy, bf16 matmul)
U_BF16 = 2.0 ** -8

OUT = os.environ.get("OUT") or "/tmp/attention_out"
os.makedirs(OUT, exist_ok=True)
LOG = open(os.path.join(OUT, "attention.txt"), "w")
RESULTS: dict = {"checks": {}, "timings": {}, "fused": {}, "errors": []}


def log(*args):
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    LOG.write(line + "\n")
    LOG.flush()


def left() -> float:
    return BUDGET_S - (time.time() - START)


def guarded(name):
    """Run a section; log (not raise) its failure so one broken case does not lose the whole run."""
    def wrap(fn):
        def run(*a, **kw):
            try:
                return fn(*a, **kw)
            except Exception as e:  # noqa: BLE001 - report everything, keep going
                log(f"!! {name}: {type(e).__name__}: {e}")
                LOG.write(traceback.format_exc())
                RESULTS["errors"].append(f"{name}: {type(e).__name__}: {e}")
                return None
        return run
    return wrap


# ---- inputs -----------------------------------------------------------------------------------------

def make_case(new_lens, past_lens, rows, num_rows, cache_len, window, *, sink_shift=0.0, seed=0, poison=True,
              empty_rows=False):
    """Fresh random bf16 inputs; caches NaN except each sequence's cached prefix (or, with empty_rows, left
    uninitialised except the rows used: a cache of many rows stays cheap)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    T = sum(new_lens)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=DEV).to(torch.bfloat16)

    shape = (num_rows, cache_len, HKV, D)
    if empty_rows:
        kc, vc = torch.empty(shape, dtype=torch.bfloat16, device=DEV), torch.empty(shape, dtype=torch.bfloat16,
                                                                                   device=DEV)
    else:
        fill = float("nan") if poison else 0.0
        kc = torch.full(shape, fill, dtype=torch.bfloat16, device=DEV)
        vc = torch.full(shape, fill, dtype=torch.bfloat16, device=DEV)
    for r, p in zip(rows, past_lens):
        if empty_rows or poison:
            kc[r], vc[r] = float("nan"), float("nan")
        kc[r, :p], vc[r, :p] = rnd(p, HKV, D), rnd(p, HKV, D)
    batch = Batch.build(new_lens, past_lens, rows, cache_len, device=DEV)
    sinks = torch.randn(HQ, generator=g, device=DEV) + sink_shift
    return dict(q=rnd(T, HQ, D), k=rnd(T, HKV, D), v=rnd(T, HKV, D), sinks=sinks, k_cache=kc, v_cache=vc,
                batch=batch, window=window)


def call(c, fn=None, **kw):
    fn = fn or A.attention
    return fn(c["q"], c["k"], c["v"], c["sinks"], c["k_cache"], c["v_cache"], c["batch"], c["window"], SCALE,
              **kw)


# ---- 1. correctness -----------------------------------------------------------------------------------

def check(name, c, upper_bounds=None):
    kc_ref, vc_ref = c["k_cache"].clone(), c["v_cache"].clone()
    mag_kc, mag_vc = kc_ref.abs(), vc_ref.abs()  # before the write: the reference writes |v| itself
    A.kv_cache_write_ref(c["k"], c["v"], kc_ref, vc_ref, c["batch"].slot_mapping)  # what the caches must become
    if upper_bounds:
        c = dict(c, batch=dataclasses.replace(c["batch"], **upper_bounds))
    out = call(c)
    mag = A.attention_ref(c["q"], c["k"], c["v"].abs(), c["sinks"], mag_kc, mag_vc, c["batch"], c["window"], SCALE)
    # The oracle: attention_ref on float32 copies (it computes in float32 and returns the input dtype).
    ref32 = _ref_f32(c, kc_ref, vc_ref)
    bound = 2 * U_BF16 * (ref32.abs() + mag.float()) + 1e-5
    err = (out.float() - ref32).abs()
    finite = bool(torch.isfinite(out).all())
    worst = float((err / bound).max())
    rel = float((out.float() - ref32).norm() / ref32.norm())
    same_cache = bool(torch.equal(c["k_cache"].view(torch.int16), kc_ref.view(torch.int16))
                      and torch.equal(c["v_cache"].view(torch.int16), vc_ref.view(torch.int16)))
    ok = finite and worst <= 1.0 and same_cache
    RESULTS["checks"][name] = dict(ok=ok, finite=finite, worst_over_bound=worst, rel_fro=rel, cache_ok=same_cache)
    log(f"check {name:34s} {'PASS' if ok else 'FAIL'}  max err/bound {worst:.3f}  rel {rel:.2e}  "
        f"finite {finite}  cache {same_cache}")
    return ok


def _ref_f32(c, kc, vc):
    q = c["q"].float()
    out = A.attention_ref(q, c["k"].float(), c["v"].float(), c["sinks"], kc.float(), vc.float(), c["batch"],
                          c["window"], SCALE)
    return out


@guarded("correctness")
def correctness():
    log("== correctness vs attention_ref (float32 on the device, same bf16 inputs; bound 2u(|o|+M)+1e-5)")
    def z(n):  # sizes: the real ones on the GPU, a 20th (at least 1) in the dry run
        return n if not DRY else max(1, n // 20)

    L = z(33_000)  # past 32,768 keys
    for W in (0, z(128)):
        check(f"prefill varlen W={W}", make_case([z(700), z(129), 1], [0, z(1000), L], [2, 0, 3], 4, L + 8, W,
                                                 seed=W))
        check(f"decode mixed W={W}", make_case([1] * 6, [0, 50, z(1000), z(4097), L, 63], [5, 1, 0, 4, 2, 3], 6,
                                               L + 8, W, seed=1 + W))
        check(f"decode sink-dominated W={W}", make_case([1] * 3, [10, z(1000), z(5000)], [0, 2, 1], 3, z(5000) + 8,
                                                        W, sink_shift=8.0, seed=2))
        check(f"decode bounds=cache_len W={W}", make_case([1] * 4, [3, z(700), z(2000), 17], [1, 0, 3, 2], 4, z(4096),
                                                          W, seed=3), upper_bounds=dict(max_context_len=z(4096)))
        check(f"prefill bounds W={W}", make_case([z(300), 33], [0, z(500)], [1, 0], 2, z(1024) + 40, W, seed=4),
              upper_bounds=dict(max_seqlen=z(1024), max_context_len=z(1024) + 40))
        check(f"decode batch 64 W={W}", make_case([1] * 64, [(37 * i) % z(1500) + 1 for i in range(64)],
                                                  list(range(63, -1, -1)), 64, z(1600), W, seed=5))
    # A cache of many rows: row 1099 of (1100, 4096, 8, 64) starts past 2^31 elements (int64 row offsets).
    rows = 1100 if not DRY else 4
    check("decode rows past 2^31 elements", make_case([1, 1], [z(4000), 77], [rows - 1, 5 % rows], rows, z(4096) + 80,
                                                     0, seed=6, empty_rows=True))
    check("prefill rows past 2^31 elements", make_case([z(200), 3], [z(3000), 77], [rows - 1, 5 % rows], rows,
                                                      z(4096) + 80, z(128), seed=7, empty_rows=True))
    torch.cuda.empty_cache() if not DRY else None


@guarded("cuda graph")
def graph_check():
    """Capture one decode step with max_context_len = cache_len; replay it as the contexts change."""
    if DRY:
        return
    log("== CUDA graph: capture once (max_context_len = cache_len), replay with other contexts")
    S, C, W = 4, 8192, 0
    rows = [2, 0, 3, 1]
    for W in (0, 128):
        c = make_case([1] * S, [5, 100, 3000, 64], rows, S, C, W, seed=9)
        static_batch = dataclasses.replace(c["batch"], max_context_len=C)
        c = dict(c, batch=static_batch)
        call(c)  # compile outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = call(c)
        oks = []
        gen = torch.Generator(device=DEV).manual_seed(10 + W)
        for past in ([6, 101, 3001, 65], [8000, 1, 4095, 300], [0, 8191, 17, 5000]):
            b = Batch.build([1] * S, past, rows, C, device=DEV)
            for name in ("positions", "cu_seqlens", "context_lens", "cache_rows", "slot_mapping"):
                getattr(static_batch, name).copy_(getattr(b, name))
            for key in ("q", "k", "v"):
                c[key].copy_(torch.randn(c[key].shape, generator=gen, device=DEV).to(torch.bfloat16))
            for r, p in zip(rows, past):  # fresh prefix, NaN past it: slots past the real context are never read
                c["k_cache"][r, :p] = torch.randn(p, HKV, D, generator=gen, device=DEV).to(torch.bfloat16)
                c["v_cache"][r, :p] = torch.randn(p, HKV, D, generator=gen, device=DEV).to(torch.bfloat16)
                c["k_cache"][r, p:], c["v_cache"][r, p:] = float("nan"), float("nan")
            kc, vc = c["k_cache"].clone(), c["v_cache"].clone()
            g.replay()
            ref = _ref_f32(dict(c, batch=b), kc, vc)
            mag = A.attention_ref(c["q"], c["k"], c["v"].abs(), c["sinks"], kc.abs(), vc.abs(), b, W, SCALE).float()
            worst = float(((out.float() - ref).abs() / (2 * U_BF16 * (ref.abs() + mag) + 1e-5)).max())
            oks.append(bool(torch.isfinite(out).all()) and worst <= 1.0)
            log(f"check graph replay W={W} past={past}: {'PASS' if oks[-1] else 'FAIL'} max err/bound {worst:.3f}")
        RESULTS["checks"][f"cuda graph replay W={W}"] = dict(ok=all(oks))
        del g


# ---- 2. timing ------------------------------------------------------------------------------------------

def _median_events(fn, reps):
    times = []
    for _ in range(reps):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        fn()
        en.record()
        en.synchronize()
        times.append(st.elapsed_time(en) * 1e3)
    return statistics.median(times)


def graph_us(fns, reps=15):
    """Median µs per call of fns (one callable per rotated input set) captured together in one CUDA graph."""
    if DRY:
        t = time.perf_counter()
        for f in fns[:1]:
            f()
        return (time.perf_counter() - t) * 1e6
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:  # warm-up: compilation and autotuning stay out of the capture
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    us = _median_events(g.replay, reps) / len(fns)
    del g
    return us


def eager_us(fn):
    if DRY:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


def rotated(new_lens, past_lens, window, bytes_per_set, seed):
    """Input sets whose KV caches together span >= 200 MB (4x the H200's 50 MB L2), at most 48."""
    n = 1 if DRY else max(1, min(48, math.ceil(200e6 / max(bytes_per_set, 1))))
    S = len(new_lens)
    cache_len = max(p + n_ for p, n_ in zip(past_lens, new_lens))
    return [make_case(new_lens, past_lens, list(range(S)), S, cache_len, window, seed=seed + i, poison=False)
            for i in range(n)]


def decode_bytes(past_lens, window):
    keys = sum(min(p + 1, window) if window else p + 1 for p in past_lens)
    return keys * HKV * D * 2 * 2  # K and V, bf16


def prefill_flops(new_lens, past_lens, window):
    vis = 0
    for n, p in zip(new_lens, past_lens):
        for pos in range(p, p + n):
            vis += min(pos + 1, window) if window else pos + 1
    return 4 * D * HQ * vis  # QK^T and PV, 2 flops a multiply-add


def sdpa_bar(new_lens, past_lens, window, n_sets, seed=0):
    """Best torch SDPA backend on the same problem without sinks (dense padded K/V per sequence), timed like
    ours: n_sets rotated input sets in one graph (the same share of the graph-launch floor)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    g = torch.Generator(device=DEV).manual_seed(seed)
    S, n, L = len(new_lens), max(new_lens), max(p + n_ for p, n_ in zip(past_lens, new_lens))
    if window and n == 1:
        L = min(L, window)  # decode with a window: slice the last W keys
    sets = [tuple(torch.randn(S, H, m, D, generator=g, device=DEV).to(torch.bfloat16)
                  for H, m in ((HQ, n), (HKV, L), (HKV, L))) for _ in range(n_sets)]
    mask, causal = None, False
    uniform = len(set(new_lens)) == 1 and len(set(past_lens)) == 1
    if n == 1 and not uniform:  # mixed contexts: padded keys masked off
        lens = torch.tensor([min(p + 1, window) if window else p + 1 for p in past_lens], device=DEV)
        mask = (torch.arange(L, device=DEV)[None, :] < lens[:, None])[:, None, None, :]
    elif n > 1 and (window or L != n):  # window, or a chunk after a cached prefix: an explicit mask
        qp = torch.arange(L - n, L, device=DEV)[:, None]
        kp = torch.arange(L, device=DEV)[None, :]
        mask = ((kp <= qp) & ((qp - kp < window) if window else True))[None, None]
    elif n > 1:
        causal = True
    best, which = float("inf"), None
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]
    for be in backends:
        for gqa in (True, False):
            try:
                def f(q, k, v, be=be, gqa=gqa):
                    if not gqa:
                        k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
                    with sdpa_kernel([be]):
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                              enable_gqa=gqa)
                f(*sets[0])
                us = graph_us([lambda t=t: f(*t) for t in sets]) if not DRY else eager_us(lambda: f(*sets[0]))
            except Exception:  # noqa: BLE001 - a backend that does not take this problem
                continue
            if us < best:
                best, which = us, f"{be.name.lower()}{'+gqa' if gqa else '+repeat'}"
            break  # enable_gqa worked: no need to time the repeated K/V
    return best, which


def ref_engine_us(c):
    ref = TorchBackend()

    def f():
        ref.attention(c["q"], c["k"], c["v"], c["sinks"], c["k_cache"], c["v_cache"], c["batch"], c["window"], SCALE)
    return eager_us(f)


def decode_case(name, past_lens, window):
    if left() < 20:
        log(f"-- {name}: skipped (time budget)")
        return
    S = len(past_lens)
    nbytes = decode_bytes(past_lens, window)
    sets = rotated([1] * S, past_lens, window, sum(p + 1 for p in past_lens) * HKV * D * 4, seed=100)
    r = dict(kind="decode", S=S, window=window, kv_bytes=nbytes, sets=len(sets))
    r["graph_us"] = graph_us([lambda c=c: call(c) for c in sets])
    r["tbs"] = nbytes / r["graph_us"] / 1e6
    r["eager_us"] = eager_us(lambda: call(sets[0]))
    # Per-kernel breakdown of the default configuration (graph-timed, same rotation).
    r["write_us"] = graph_us([lambda c=c: A.kv_cache_write(c["k"], c["v"], c["k_cache"], c["v_cache"],
                                                           c["batch"].slot_mapping) for c in sets])
    r["split_merge_us"] = graph_us([lambda c=c: A.decode_attention(c["q"], c["k_cache"], c["v_cache"], c["sinks"],
                                                                   c["batch"], window, SCALE) for c in sets])
    cfg0 = A.decode_num_splits(S, HKV, max(past_lens) + 1, window, 64, _sms())
    r["default_splits"] = cfg0
    sweep = {}
    for block_n, stages in ((64, 2), (64, 3), (64, 4), (128, 3)):
        for waves in (1, 2, 4, 8):
            if left() < 15:
                break
            ns = A.decode_num_splits(S, HKV, max(past_lens) + 1, window, block_n, _sms(), waves=waves,
                                     min_blocks=1)
            key = f"N{block_n} s{stages} P{ns}"
            if key in sweep:
                continue
            sweep[key] = graph_us([lambda c=c: A.decode_attention(
                c["q"], c["k_cache"], c["v_cache"], c["sinks"], c["batch"], window, SCALE, block_n=block_n,
                num_stages=stages, num_splits=ns) for c in sets])
            if DRY:
                break
    r["sweep"] = sweep
    if sweep:
        best = min(sweep, key=sweep.get)
        r["best_cfg"], r["best_us"] = best, sweep[best]
    r["sdpa_us"], r["sdpa_backend"] = sdpa_bar([1] * S, past_lens, window, len(sets))
    r["ref_engine_us"] = ref_engine_us(sets[0]) if S * max(past_lens) <= 200_000 else None
    RESULTS["timings"][name] = r
    log(f"-- {name}: graph {r['graph_us']:.1f} us ({r['tbs']:.2f} TB/s of KV, {r['sets']} sets), eager "
        f"{r['eager_us']:.1f} us; write {r['write_us']:.1f} + split/merge {r['split_merge_us']:.1f} us "
        f"(P={cfg0}); best {r.get('best_cfg')} {r.get('best_us', float('nan')):.1f} us; sdpa {r['sdpa_us']:.1f} "
        f"us ({r['sdpa_backend']}); ref engine {r['ref_engine_us']}")
    log("   sweep: " + ", ".join(f"{k}: {v:.1f}" for k, v in sorted(sweep.items(), key=lambda kv: kv[1])))
    del sets
    if not DRY:
        torch.cuda.empty_cache()


def prefill_case(name, new_lens, past_lens, window):
    if left() < 20:
        log(f"-- {name}: skipped (time budget)")
        return
    flops = prefill_flops(new_lens, past_lens, window)
    n_sets = 1 if DRY else 4  # 4 calls a graph: a quarter of the graph-launch floor in each number
    cases = [make_case(new_lens, past_lens, list(range(len(new_lens))), len(new_lens),
                       max(p + n for p, n in zip(past_lens, new_lens)), window, seed=200 + i, poison=False)
             for i in range(n_sets)]
    c = cases[0]
    r = dict(kind="prefill", S=len(new_lens), window=window, gflop=flops / 1e9, sets=n_sets)
    r["graph_us"] = graph_us([lambda c=c: call(c) for c in cases])
    r["eager_us"] = eager_us(lambda: call(c))
    r["tflops"] = flops / r["graph_us"] / 1e6
    sweep = {}
    for bm, bn, warps, stages in ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
                                  (128, 64, 4, 4), (64, 128, 4, 3), (128, 128, 8, 2)):
        if left() < 15:
            break
        key = f"M{bm} N{bn} w{warps} s{stages}"
        sweep[key] = graph_us([lambda c=c: A.prefill_attention(
            c["q"], c["k_cache"], c["v_cache"], c["sinks"], c["batch"], window, SCALE, block_m=bm, block_n=bn,
            num_warps=warps, num_stages=stages) for c in cases])
        if DRY:
            break
    r["sweep"] = sweep
    if sweep:
        best = min(sweep, key=sweep.get)
        r["best_cfg"], r["best_us"] = best, sweep[best]
        r["best_tflops"] = flops / sweep[best] / 1e6
    r["sdpa_us"], r["sdpa_backend"] = sdpa_bar(new_lens, past_lens, window, n_sets)
    r["ref_engine_us"] = ref_engine_us(c)
    RESULTS["timings"][name] = r
    log(f"-- {name}: graph {r['graph_us']:.1f} us ({r['tflops']:.0f} TFLOP/s, {r['gflop']:.1f} GFLOP), eager "
        f"{r['eager_us']:.1f} us; best {r.get('best_cfg')} {r.get('best_us', float('nan')):.1f} us; sdpa "
        f"{r['sdpa_us']:.1f} us ({r['sdpa_backend']}); ref engine {r['ref_engine_us']:.0f} us")
    log("   sweep: " + ", ".join(f"{k}: {v:.1f}" for k, v in sorted(sweep.items(), key=lambda kv: kv[1])))


_SMS = []


def _sms():
    if not _SMS:
        _SMS.append(A._num_sms(torch.device(DEV)))
    return _SMS[0]


@guarded("timing")
def timing():
    log("== timing (µs per call; graph = CUDA-graph replay, inputs rotated past L2; eager = triton do_bench)")
    W = 128 if not DRY else 20
    scale = 1 if not DRY else 0  # dry run: tiny contexts
    ctxs = [1024, 8192, 33_000, 131_072] if not DRY else [40, 90]
    gen = torch.Generator().manual_seed(0)
    mixed = [int(x) for x in torch.randint(512, 1536, (64,), generator=gen)] if not DRY else [30, 50, 7]
    order = []
    for L in ctxs:
        order.append((f"decode b1 ctx {L} W=0", [L - 1], 0))
    order.append(("decode b64 mixed~1k W=0", mixed, 0))
    order.append(("prefill 1x2048 W=0", ([2048] if scale else [40], [0]), 0))
    order.append(("prefill 8x512 W=0", ([512] * 8 if scale else [20] * 3, [0] * (8 if scale else 3)), 0))
    for L in ctxs[:3]:
        order.append((f"decode b1 ctx {L} W={W}", [L - 1], W))
    order.append((f"decode b64 mixed~1k W={W}", mixed, W))
    order.append((f"prefill 1x2048 W={W}", ([2048] if scale else [40], [0]), W))
    order.append((f"prefill 8x512 W={W}", ([512] * 8 if scale else [20] * 3, [0] * (8 if scale else 3)), W))
    order.append(("prefill chunk 512 after 4096 W=0", ([512] if scale else [20], [4096] if scale else [30]), 0))
    for name, spec, w in order:
        if name.startswith("decode"):
            guarded(name)(decode_case)(name, spec, w)
        else:
            guarded(name)(prefill_case)(name, spec[0], spec[1], w)


# ---- 3. the fused decode op (RoPE + cache write + split-KV decode + merge) ---------------------------------

_INV, _CONC = yarn_inv_freq(preset("gpt-oss-20b"), torch.float32)  # gpt-oss's YaRN frequencies (d = 64)
INV_FREQ = _INV.to(DEV)


def composed_call(c):
    """Today's path: the rope kernel, then attention() = cache write + split (+ merge): 3-4 kernels."""
    q, k = O.rope(c["q"], c["k"], c["batch"].positions, INV_FREQ, _CONC)
    return A.attention(q, k, c["v"], c["sinks"], c["k_cache"], c["v_cache"], c["batch"], c["window"], SCALE)


def fused_call(c, **kw):
    return A.rope_decode_attention(c["q"], c["k"], c["v"], c["batch"].positions, INV_FREQ, _CONC, c["sinks"],
                                   c["k_cache"], c["v_cache"], c["batch"], c["window"], SCALE, **kw)


def _ulps(a, b):
    """Largest distance in bf16 ulps between two bf16 tensors (NaN where both are NaN counts 0; a NaN on one side
    only counts as infinite)."""
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return float("inf")
    d = (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()
    d = torch.where(nan_a, torch.zeros_like(d), d)
    return int(d.max()) if d.numel() else 0


def check_fused(name, c, upper_bounds=None):
    kc0, vc0 = c["k_cache"].clone(), c["v_cache"].clone()
    ca = dict(c, k_cache=kc0.clone(), v_cache=vc0.clone())
    want = composed_call(ca)
    q_rot, k_rot = O.rope(c["q"], c["k"], c["batch"].positions, INV_FREQ, _CONC)
    # The oracle: attention_ref in float32 on the rope kernel's rotated q and k (the fused kernel rotates as it
    # does), same cache before the write.
    ref32 = A.attention_ref(q_rot.float(), k_rot.float(), c["v"].float(), c["sinks"], kc0.float(), vc0.float(),
                            c["batch"], c["window"], SCALE)
    mag = A.attention_ref(q_rot, k_rot, c["v"].abs(), c["sinks"], kc0.abs(), vc0.abs(), c["batch"], c["window"],
                          SCALE).float()
    bound = 2 * U_BF16 * (ref32.abs() + mag) + 1e-5
    batch = dataclasses.replace(c["batch"], **upper_bounds) if upper_bounds else c["batch"]
    ok_all = True
    for merge in A.MERGES:
        cb = dict(c, k_cache=kc0.clone(), v_cache=vc0.clone(), batch=batch)
        out = fused_call(cb, merge=merge)
        finite = bool(torch.isfinite(out).all())
        worst = float(((out.float() - ref32).abs() / bound).max())
        v_same = bool(torch.equal(cb["v_cache"].view(torch.int16), ca["v_cache"].view(torch.int16)))
        k_ulps = _ulps(cb["k_cache"], ca["k_cache"])  # the whole cache: untouched slots must be equal too
        k_exact = bool(torch.equal(cb["k_cache"].view(torch.int16), ca["k_cache"].view(torch.int16)))
        out_ulps = _ulps(out, want)
        ok = finite and worst <= 1.0 and v_same and k_ulps <= 1
        ok_all &= ok
        RESULTS["checks"][f"fused {name} merge={merge}"] = dict(
            ok=ok, finite=finite, worst_over_bound=worst, v_cache_bitwise=v_same, k_cache_max_ulps=k_ulps,
            k_cache_bitwise=k_exact, out_max_ulps_vs_composed=out_ulps)
        log(f"check fused {name:28s} merge={merge:7s} {'PASS' if ok else 'FAIL'}  max err/bound {worst:.3f}  "
            f"finite {finite}  v cache bitwise {v_same}  k cache {k_ulps} ulp (bitwise {k_exact})  "
            f"out vs composed {out_ulps} ulp")
    return ok_all


@guarded("fused correctness")
def fused_correctness():
    log("== fused decode (rope_decode_attention) vs today's kernels and attention_ref (float32, same bf16 inputs)")
    def z(n):
        return n if not DRY else max(1, n // 20)

    L = z(33_000)
    for W in (0, z(128)):
        check_fused(f"decode mixed W={W}", make_case([1] * 6, [0, 50, z(1000), z(4097), L, 63], [5, 1, 0, 4, 2, 3], 6,
                                                     L + 8, W, seed=11 + W))
        check_fused(f"sink-dominated W={W}", make_case([1] * 3, [10, z(1000), z(5000)], [0, 2, 1], 3, z(5000) + 8, W,
                                                       sink_shift=8.0, seed=12))
        check_fused(f"bounds=cache_len W={W}", make_case([1] * 4, [3, z(700), z(2000), 17], [1, 0, 3, 2], 4, z(4096),
                                                         W, seed=13), upper_bounds=dict(max_context_len=z(4096)))
        check_fused(f"batch 64 W={W}", make_case([1] * 64, [(37 * i) % z(1500) + 1 for i in range(64)],
                                                 list(range(63, -1, -1)), 64, z(1600), W, seed=14))
        check_fused(f"batch 1 ctx 8k W={W}", make_case([1], [z(8191)], [0], 1, z(8191) + 9, W, seed=15))
    rows = 1100 if not DRY else 4
    check_fused("rows past 2^31 elements", make_case([1, 1], [z(4000), 77], [rows - 1, 5 % rows], rows, z(4096) + 80,
                                                     0, seed=16, empty_rows=True))
    torch.cuda.empty_cache() if not DRY else None


@guarded("fused cuda graph")
def fused_graph_check():
    """Capture the fused op once (max_context_len = cache_len), replay it as contexts change; compare each replay
    with today's kernels run eagerly on a copy of the same inputs."""
    if DRY:
        return
    log("== fused decode in a CUDA graph: capture once (max_context_len = cache_len), replay with other contexts")
    S, C = 4, 8192
    rows = [2, 0, 3, 1]
    for W in (0, 128):
        for merge in A.MERGES:
            c = make_case([1] * S, [5, 100, 3000, 64], rows, S, C, W, seed=19)
            static_batch = dataclasses.replace(c["batch"], max_context_len=C)
            c = dict(c, batch=static_batch)
            fused_call(dict(c, k_cache=c["k_cache"].clone(), v_cache=c["v_cache"].clone()), merge=merge)  # compile
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = fused_call(c, merge=merge)
            oks = []
            gen = torch.Generator(device=DEV).manual_seed(20 + W)
            for past in ([6, 101, 3001, 65], [8000, 1, 4095, 300], [0, 8191, 17, 5000]):
                b = Batch.build([1] * S, past, rows, C, device=DEV)
                for name in ("positions", "cu_seqlens", "context_lens", "cache_rows", "slot_mapping"):
                    getattr(static_batch, name).copy_(getattr(b, name))
                for key in ("q", "k", "v"):
                    c[key].copy_(torch.randn(c[key].shape, generator=gen, device=DEV).to(torch.bfloat16))
                for r, p in zip(rows, past):
                    c["k_cache"][r, :p] = torch.randn(p, HKV, D, generator=gen, device=DEV).to(torch.bfloat16)
                    c["v_cache"][r, :p] = torch.randn(p, HKV, D, generator=gen, device=DEV).to(torch.bfloat16)
                    c["k_cache"][r, p:], c["v_cache"][r, p:] = float("nan"), float("nan")
                ca = dict(c, batch=b, k_cache=c["k_cache"].clone(), v_cache=c["v_cache"].clone())
                want = composed_call(ca)
                g.replay()
                ulps = _ulps(out, want)
                k_ulps = _ulps(c["k_cache"], ca["k_cache"])
                v_same = bool(torch.equal(c["v_cache"].view(torch.int16), ca["v_cache"].view(torch.int16)))
                oks.append(bool(torch.isfinite(out).all()) and ulps <= 2 and k_ulps <= 1 and v_same)
                log(f"check fused graph replay W={W} merge={merge} past={past}: {'PASS' if oks[-1] else 'FAIL'} "
                    f"out vs composed {ulps} ulp, k cache {k_ulps} ulp, v cache bitwise {v_same}")
            RESULTS["checks"][f"fused cuda graph replay W={W} merge={merge}"] = dict(ok=all(oks))
            del g


def fused_case(name, past_lens, window):
    if left() < 20:
        log(f"-- {name}: skipped (time budget)")
        return
    S = len(past_lens)
    nbytes = decode_bytes(past_lens, window)
    sets = rotated([1] * S, past_lens, window, sum(p + 1 for p in past_lens) * HKV * D * 4, seed=300)
    r = dict(kind="fused decode", S=S, window=window, kv_bytes=nbytes, sets=len(sets))
    r["composed_us"] = graph_us([lambda c=c: composed_call(c) for c in sets])  # rope + write + split (+ merge)
    r["rope_us"] = graph_us([lambda c=c: O.rope(c["q"], c["k"], c["batch"].positions, INV_FREQ, _CONC)
                             for c in sets])
    r["fused_us"] = graph_us([lambda c=c: fused_call(c) for c in sets])  # one kernel
    r["fused_merge_kernel_us"] = graph_us([lambda c=c: fused_call(c, merge="kernel") for c in sets])
    r["eager_composed_us"] = eager_us(lambda: composed_call(sets[0]))
    r["eager_fused_us"] = eager_us(lambda: fused_call(sets[0]))
    r["tbs"] = nbytes / r["fused_us"] / 1e6
    ns0 = A.decode_num_splits(S, HKV, max(past_lens) + 1, window, 64, _sms())
    r["default_splits"] = ns0
    sweep = {}
    for block_n in (64, 128):
        for waves in (1, 2, 4):
            if left() < 15:
                break
            ns = A.decode_num_splits(S, HKV, max(past_lens) + 1, window, block_n, _sms(), waves=waves,
                                     min_blocks=1)
            key = f"N{block_n} P{ns}"
            if key in sweep:
                continue
            sweep[key] = graph_us([lambda c=c: fused_call(c, block_n=block_n, num_splits=ns) for c in sets])
            if DRY:
                break
    r["sweep"] = sweep
    if sweep:
        best = min(sweep, key=sweep.get)
        r["best_cfg"], r["best_us"] = best, sweep[best]
    RESULTS["fused"][name] = r
    log(f"-- {name}: fused {r['fused_us']:.1f} us (1 kernel, P={ns0}; {r['tbs']:.2f} TB/s of KV), with the merge "
        f"kernel {r['fused_merge_kernel_us']:.1f} us, today's kernels {r['composed_us']:.1f} us (rope alone "
        f"{r['rope_us']:.1f}); eager {r['eager_fused_us']:.1f} vs {r['eager_composed_us']:.1f} us; best "
        f"{r.get('best_cfg')} {r.get('best_us', float('nan')):.1f} us; {r['sets']} sets")
    log("   sweep: " + ", ".join(f"{k}: {v:.1f}" for k, v in sorted(sweep.items(), key=lambda kv: kv[1])))
    del sets
    if not DRY:
        torch.cuda.empty_cache()


@guarded("fused timing")
def fused_timing():
    log("== fused decode timing (µs per call, CUDA-graph replay, inputs rotated past L2): 20b shape, one layer")
    W = 128 if not DRY else 20
    ctxs = [1024, 8192] if not DRY else [40, 90]
    for S in (1, 64) if not DRY else (1, 3):
        for L in ctxs:
            for w in (0, W):
                name = f"fused b{S} ctx {L} W={w}"
                guarded(name)(fused_case)(name, [L - 1] * S, w)


def fused_table():
    lines = ["", "== fused decode, short table (H200; µs per call of one layer's RoPE + cache write + attention; "
                 "CUDA-graph replay)",
             f"{'case':26s} {'fused':>7s} {'+merge k':>8s} {'today':>7s} {'saved':>7s} {'best (cfg)':>18s} "
             f"{'eager f/t':>13s}"]
    for name, r in RESULTS["fused"].items():
        best = f"{r.get('best_us', float('nan')):.1f} ({r.get('best_cfg', '-')})"
        lines.append(f"{name:26s} {r['fused_us']:7.1f} {r['fused_merge_kernel_us']:8.1f} {r['composed_us']:7.1f} "
                     f"{r['composed_us'] - r['fused_us']:7.1f} {best:>18s} "
                     f"{r['eager_fused_us']:6.0f}/{r['eager_composed_us']:<6.0f}")
    fused_checks = {k: v for k, v in RESULTS["checks"].items() if k.startswith("fused")}
    n_ok = sum(1 for v in fused_checks.values() if v.get("ok"))
    lines.append(f"fused checks: {n_ok}/{len(fused_checks)} PASS")
    for line in lines:
        log(line)


def short_table():
    lines = ["", f"== short table (H200; µs per call; CUDA-graph replay of several calls, floor "
                 f"{RESULTS.get('graph_floor_us', float('nan')):.1f} us a replay shared among them)",
             f"{'case':34s} {'ours':>8s} {'best cfg':>8s} {'rate':>14s} {'sdpa*':>8s} {'ref eng':>9s} {'vs sdpa':>8s}"]
    for name, r in RESULTS["timings"].items():
        rate = (f"{r['tbs']:.2f} TB/s" if r["kind"] == "decode" else f"{r['tflops']:.0f} TFLOP/s")
        ref = r.get("ref_engine_us")
        lines.append(f"{name:34s} {r['graph_us']:8.1f} {r.get('best_us', float('nan')):8.1f} {rate:>14s} "
                     f"{r['sdpa_us']:8.1f} {(f'{ref:.0f}' if ref else '-'):>9s} {r['sdpa_us'] / r['graph_us']:7.2f}x")
    n_ok = sum(1 for v in RESULTS["checks"].values() if v.get("ok"))
    lines.append(f"checks: {n_ok}/{len(RESULTS['checks'])} PASS; errors: {len(RESULTS['errors'])}")
    lines.append("* sdpa: torch scaled_dot_product_attention, best backend, WITHOUT sinks (an easier problem)")
    for line in lines:
        log(line)


def main():
    info = dict(torch=torch.__version__, triton=triton.__version__,
                device=torch.cuda.get_device_name() if not DRY else "cpu (interpreter)", sms=_sms() if not DRY else 0)
    RESULTS["env"] = info
    log("env", json.dumps(info))
    # What one graph replay costs around its work (launch latency between the events): each timing below
    # carries floor / (calls in its graph) of it.
    x = torch.zeros(16, device=DEV)
    RESULTS["graph_floor_us"] = graph_us([lambda: x.add_(1)])
    log(f"graph floor (one tiny kernel a replay): {RESULTS['graph_floor_us']:.1f} us")
    if not FUSED_ONLY:
        correctness()
        graph_check()
    fused_correctness()
    fused_graph_check()
    fused_timing()
    if not FUSED_ONLY:
        timing()
        short_table()
    fused_table()
    with open(os.path.join(OUT, "attention.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    log(f"total {time.time() - START:.0f} s")


if __name__ == "__main__":
    main()
