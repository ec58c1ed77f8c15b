"""Check and time the triton engine's dense GEMV (backends/triton_engine/linear.py) against cuBLAS on a GPU.

On the lent GPU machine, from the repository root (one call, < 100 s of GPU time with compilation):

    source tests/benchmarks/gpu/setup.sh && python3 tests/benchmarks/gpu/dense_gemv.py

Shapes (gpt-oss, bf16): QKV 5120 x 2880 (+ bias), output 2880 x 4096 (+ bias), router logits 32 x 2880 (20b) and
128 x 2880 (120b) (+ bias), unembedding 201088 x 2880 (no bias); T = 1, 2, 4, 8, 64 tokens.

1. Compilation first, in parallel worker processes (``linear.compile_ahead`` fills Triton's on-disk cache with
   exactly what the launches below use; a miss only costs time).
2. Ceiling: device-to-device copy bandwidth, measured in this run (read + write, as FACTS.md).
3. Per (shape, T): every candidate config (the default of ``CONFIGS`` first) checked against a float64 oracle
   (bound: one rounding to bf16 + fp32 sums over K terms, as tests/test_triton_linear.py), then timed next to
   ``torch.nn.functional.linear`` (cuBLAS): CUDA-graph replay of 20 back-to-back launches, each on its own copy of
   W (so no launch finds W in L2; the unembedding cycles through 3 copies, 2.3 GB apart), preceded by a READ of a
   512 MB buffer (so L2 holds no dirty lines to write back; triton's do_bench zeroes its buffer instead); median of
   7 replays / 20. Bytes = W + x + bias + y, each once.
4. The winners: per shape and per shape class (summed over the class's shapes) the ``CONFIGS`` line, and the
   ``GEMV_MAX_T`` line (the largest T bucket up to which gemv beat cuBLAS at every bucket).

Order: T = 1 for every shape, then T = 64, 2, 4, 8; past the time budget the rest is skipped (said in the table).
Output: $OUT/dense_gemv.txt (+ dense_gemv.json; OUT defaults to ./out); the summary is printed last.
``--dry-run``: the same code paths on a CPU under TRITON_INTERPRET=1 at tiny shapes (timings meaningless).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import sys
import time
import traceback

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from mxmoe.backends.triton_engine import linear as L  # noqa: E402

START = time.time()
BUDGET_S = 1e9 if DRY else 95  # GPU time of the whole script; later cases are skipped past it
DEV = "cpu" if DRY else "cuda"
DTYPE = torch.bfloat16
U_BF16 = 2.0 ** -8
LAUNCHES = 20  # per CUDA graph: launch gaps amortized as inside a decode-step graph
REPLAYS = 7
# name, shape class, N, K, bias (real shapes; tiny ones under --dry-run keep the class by name)
SHAPES = [("qkv", "qkv", 5120, 2880, True), ("out", "out", 2880, 4096, True),
          ("router-20b", "router", 32, 2880, True), ("router-120b", "router", 128, 2880, True),
          ("unembed", "unembed", 201088, 2880, False)]
if DRY:
    SHAPES = [("qkv", "qkv", 96, 72, True), ("out", "out", 40, 104, True), ("router-20b", "router", 8, 72, True),
              ("router-120b", "router", 16, 72, True), ("unembed", "unembed", 300, 40, False)]
T_ORDER = (1, 64, 2, 4, 8)
F, D = L.fma, L.dot


def candidates(cls: str, T: int) -> list[dict]:
    """The sweep of one (shape class, T): the current default first."""
    if T > 8:
        c = [D(64, 128, 2, 4, 4), D(128, 128, 2, 8, 3), D(128, 64, 4, 8, 4), D(64, 64, 4, 4, 5)]
        if cls == "router":
            c = [D(32, 128, 8, 4, 3), D(16, 128, 12, 4, 3), D(32, 256, 4, 4, 3)]
        elif cls == "unembed":
            c = [D(128, 128, 1, 8, 3), D(64, 128, 1, 4, 4)]
    elif cls == "router":
        c = [F(8, 256, 4), F(8, 256, 12), F(4, 256, 12), F(16, 128, 12), D(16, 128, 12, 4, 3)]
    elif cls == "unembed":
        c = [F(16, 512, 1), F(32, 256, 1), D(128, 128, 1, 4, 3)] + ([F(16, 512, 1, 4, 1)] if T == 1 else [])
        if T >= 4:
            c = [F(16, 256, 1), F(8, 256, 1), D(128, 128, 1, 4, 3), D(64, 256, 1, 4, 3)]
    elif T <= 2:  # qkv, out
        c = [F(16, 512, 1), F(16, 512, 2), F(8, 512, 2), F(8, 256, 4), F(32, 256, 1), F(16, 256, 2),
             F(32, 512, 2, 8), D(64, 128, 2, 4, 4), D(64, 128, 4, 4, 4), D(128, 128, 4, 4, 3), D(64, 256, 2, 4, 3)]
        if T == 1:  # prefetching carries the bf16 tiles through the loop: +60% instructions at T = 1, +110% at T = 2
            c += [F(16, 512, 1, 4, 1), F(16, 512, 2, 4, 1)]
    else:
        c = [F(16, 256, 1), F(16, 256, 2), F(8, 256, 2), F(8, 512, 2), D(64, 128, 2, 4, 4), D(128, 128, 4, 4, 3),
             D(64, 256, 2, 4, 3), D(64, 128, 4, 4, 4)]
    default = L.CONFIGS[cls][L.t_bucket(T)]
    return [default] + [x for x in c if x != default]


# ---- output ------------------------------------------------------------------------------------------------------

OUT = os.environ.get("OUT") or "./out"
LOG = None
RESULTS: dict = {"ceiling": {}, "cases": {}, "errors": [], "skipped": []}
SUMMARY: list[str] = []


def log(*args):
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    LOG.write(line + "\n")
    LOG.flush()


def left() -> float:
    return BUDGET_S - (time.time() - START)


def guarded(label, fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - one failing variant must not stop the run
        msg = f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        log("ERROR", msg)
        RESULTS["errors"].append(msg + "\n" + traceback.format_exc()[-2000:])
        return None


# ---- 1. compile ahead, in parallel processes -------------------------------------------------------------------------

def _compile_worker(jobs):
    # Runs in a spawned process: fills Triton's on-disk cache. Returns (compiled, errors).
    import torch as _torch

    from mxmoe.backends.triton_engine import linear as _L
    interpret = os.environ.get("TRITON_INTERPRET") == "1"  # the dry run: nothing to compile, check the configs
    if not interpret:
        _torch.cuda.init()
    done, errors = 0, []
    for T, N, K, has_bias, cfg in jobs:
        try:
            if interpret:
                _L.check_config(cfg, T, _torch.bfloat16)
            else:
                _L.compile_ahead(T, N, K, _torch.bfloat16, _torch.bfloat16 if has_bias else None, cfg)
            done += 1
        except Exception as e:  # noqa: BLE001 - reported by the parent
            errors.append(f"{_L.config_name(cfg)} T={T}: {type(e).__name__}: {str(e)[:200]}")
    return done, errors


def precompile():
    jobs, seen = [], set()
    for _, cls, N, K, bias in SHAPES:
        for T in T_ORDER:
            for cfg in candidates(cls, T):
                # Triton specializes ints on == 1 and on divisibility by 16, and on the constexprs (BLOCK_T from T):
                # one job per compiled variant
                block_t = L.check_config(cfg, T, DTYPE)[0]
                key = (T == 1, T % 16 == 0, block_t, N % 16 == 0, K % 16 == 0, bias, L.config_code(cfg))
                if key not in seen:
                    seen.add(key)
                    jobs.append((T, N, K, bias, cfg))
    workers = 2 if DRY else max(1, min(len(jobs), (os.cpu_count() or 2) - 2, 14))
    t = time.time()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        res = pool.map(_compile_worker, [jobs[i::workers] for i in range(workers)])
    done = sum(r[0] for r in res)
    for r in res:
        for e in r[1]:
            log("ERROR compile", e)
            RESULTS["errors"].append("compile " + e)
    log(f"compiled {done}/{len(jobs)} kernel variants in {workers} processes in {time.time() - t:.1f} s")
    SUMMARY.append(f"compile ahead: {done}/{len(jobs)} variants, {time.time() - t:.0f} s")


# ---- timing --------------------------------------------------------------------------------------------------------

_FLUSH: list = []


def bench_us(launch, copies: int) -> float:
    """µs per launch: median over replays of a CUDA graph of LAUNCHES calls launch(i) (i-th on copy i % copies),
    each replay after a read of 512 MB."""
    if DRY:
        t = time.perf_counter()
        launch(0)
        return (time.perf_counter() - t) * 1e6
    if not _FLUSH:
        _FLUSH.append(torch.ones(256 << 20, dtype=torch.float16, device=DEV))
    for i in range(copies):  # compile / allocate outside the capture
        launch(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(LAUNCHES):
            launch(i)
    graph.replay()  # once untimed
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(REPLAYS)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(REPLAYS)]
    for i in range(REPLAYS):
        _FLUSH[0].sum()  # reads 512 MB: evicts W, leaves nothing to write back
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3 / LAUNCHES


def copy_ceiling():
    n = (64 << 20) if DRY else (1 << 30)  # 2 GB of bf16 (1 GiB elements) each way
    src = torch.randn(n // 64, 64, device=DEV).to(DTYPE).reshape(-1)
    dst = torch.empty_like(src)
    if DRY:
        t = time.perf_counter()
        dst.copy_(src)
        us = (time.perf_counter() - t) * 1e6
    else:
        dst.copy_(src)
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(10)]
        for s, e in ev:
            s.record()
            dst.copy_(src)
            e.record()
        torch.cuda.synchronize()
        us = statistics.median(s.elapsed_time(e) for s, e in ev) * 1e3
    nbytes = 2 * src.numel() * src.element_size()
    RESULTS["ceiling"] = dict(us=round(us, 1), bytes=nbytes, TBps=round(nbytes / us / 1e6, 3))
    log(f"ceiling: d2d copy {nbytes / 1e9:.1f} GB (read + write): {us:.1f} us, {nbytes / us / 1e6:.3f} TB/s")
    SUMMARY.append(f"d2d copy: {nbytes / us / 1e6:.2f} TB/s")
    del src, dst


# ---- 2. check + time one shape -----------------------------------------------------------------------------------

def check(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> tuple[float, float]:
    """(max error / bound, |out - ref| / |ref|); NaN counts as failing."""
    o = out.double()
    if o.isnan().any():
        return float("inf"), float("inf")
    err = (o - ref).abs()
    return (err / bound).max().item(), (err.norm() / ref.norm()).item()


def prepare(name: str, cls: str, N: int, K: int, has_bias: bool) -> dict:
    """A shape's weight copies, bias and float64 oracle inputs."""
    if not DRY:
        assert L.shape_class(N, K) == cls, (name, L.shape_class(N, K), cls)
    g = torch.Generator(device=DEV).manual_seed(N + K)
    w_bytes = N * K * 2
    copies = 2 if DRY else 3 if w_bytes > (1 << 30) else LAUNCHES  # no launch of a graph finds its W in L2
    Ws = [(torch.randn(N, K, device=DEV, generator=g) * K ** -0.5).to(DTYPE) for _ in range(copies)]
    b = (torch.randn(N, device=DEV, generator=g) * 0.5).to(DTYPE) if has_bias else None
    Wd = Ws[0].double()
    return dict(name=name, cls=cls, N=N, K=K, Ws=Ws, b=b, Wd=Wd, Wd_abs=Wd.abs(), g=g)


def run_case(sh: dict, T: int):
    name, cls, N, K, Ws, b = sh["name"], sh["cls"], sh["N"], sh["K"], sh["Ws"], sh["b"]
    copies = len(Ws)
    case = f"{name} T={T}"
    x = torch.randn(T, K, device=DEV, generator=sh["g"]).to(DTYPE)
    ref = x.double() @ sh["Wd"].T
    spread = x.double().abs() @ sh["Wd_abs"].T
    if b is not None:
        ref += b.double()
        spread += b.double().abs()
    bound = U_BF16 * ref.abs() + (1 + U_BF16) * (K + 16) * 2.0 ** -24 * spread
    nbytes = N * K * 2 + T * K * 2 + T * N * 2 + (N * 2 if b is not None else 0)
    rows = {}
    RESULTS["cases"][case] = dict(shape=name, cls=cls, N=N, K=K, T=T, bytes=nbytes, rows=rows)
    # cuBLAS, the bar
    e, rel = check(torch.nn.functional.linear(x, Ws[0], b), ref, bound)
    us = guarded(f"{case} cuBLAS", bench_us, lambda i: torch.nn.functional.linear(x, Ws[i % copies], b), copies)
    if us:
        rows["cuBLAS"] = dict(us=us, TBps=nbytes / us / 1e6, err=e, rel=rel, ok=e <= 1.0)
        log(f"{case:<18} {'F.linear (cuBLAS)':<36} {us:8.2f} us  {nbytes / us / 1e6:6.3f} TB/s  "
            f"err/bound {e:6.3f}  rel {rel:.1e}")
    if cls == "router":  # for comparison: the fused router kernel of ops.py (logits + top-4 + softmax, one launch)
        guarded(f"{case} ops.router", _time_fused_router, case, x, Ws, b, rows, nbytes)
    for cfg in candidates(cls, T):
        if left() < 0:
            RESULTS["skipped"].append(f"{case} {L.config_name(cfg)}")
            continue
        code = L.config_code(cfg)
        out = torch.full((T, N), float("nan"), dtype=DTYPE, device=DEV)
        if guarded(f"{case} {code}", L.gemv, x, Ws[0], b, cfg, out=out) is None:
            continue
        e, rel = check(out, ref, bound)
        ok = e <= 1.0
        if not ok:
            log(f"{case:<18} {L.config_name(cfg):<36} WRONG: err/bound {e:.3g}, rel {rel:.2e}")
            RESULTS["errors"].append(f"{case} {code}: err/bound {e:.3g}")
        out2 = torch.empty_like(out)
        us = guarded(f"{case} {code}", bench_us, lambda i: L.gemv(x, Ws[i % copies], b, cfg, out=out2), copies)
        if us is None:
            continue
        default = cfg == L.CONFIGS[cls][L.t_bucket(T)]
        rows[code] = dict(us=us, TBps=nbytes / us / 1e6, err=e, rel=rel, ok=ok, default=default, cfg=cfg)
        log(f"{case:<18} {L.config_name(cfg):<36} {us:8.2f} us  {nbytes / us / 1e6:6.3f} TB/s  "
            f"err/bound {e:6.3f}  rel {rel:.1e}{'  (default)' if default else ''}{'' if ok else '  WRONG'}")
    best = _best(rows)
    if best:
        cb = rows.get("cuBLAS", {}).get("us")
        fused = rows.get("ops.router", {}).get("us")
        dflt = [r["us"] for r in rows.values() if r.get("default")]
        SUMMARY.append(f"{case:<18} best {best[0]:<26} {best[1]['us']:8.2f} us {best[1]['TBps']:5.2f} TB/s"
                       + (f" | default {dflt[0]:8.2f} us" if dflt else "")
                       + (f" | cuBLAS {cb:8.2f} us ({cb / best[1]['us']:.2f}x)" if cb else "")
                       + (f" | ops.router {fused:.2f} us" if fused else ""))


def _time_fused_router(case, x, Ws, b, rows, nbytes):
    from mxmoe.backends.triton_engine import ops
    if not hasattr(ops, "router") or x.shape[0] > getattr(ops, "ROUTER_FUSED_MAX_TOKENS", 0):
        return
    us = bench_us(lambda i: ops.router(x, Ws[i % len(Ws)], b, 4), len(Ws))
    rows["ops.router"] = dict(us=us, TBps=nbytes / us / 1e6, ok=None)
    log(f"{case:<18} {'ops.router (logits+top-4, fused)':<36} {us:8.2f} us  {nbytes / us / 1e6:6.3f} TB/s  "
        f"(not a linear: no check, not a candidate)")


def _best(rows: dict):
    good = [(k, r) for k, r in rows.items() if k not in ("cuBLAS", "ops.router") and r["ok"]]
    return min(good, key=lambda kr: kr[1]["us"]) if good else None


# ---- 3. the lines to paste ------------------------------------------------------------------------------------------

def winners():
    log("\n==== winners (lines for backends/triton_engine/linear.py) ====")
    classes: dict = {}
    for case, c in RESULTS["cases"].items():
        classes.setdefault(c["cls"], {}).setdefault(c["T"], []).append(c)
    for name, *_ in SHAPES:  # per shape
        picks = {}
        for case, c in RESULTS["cases"].items():
            if c["shape"] == name and _best(c["rows"]):
                picks[c["T"]] = _best(c["rows"])[0]
        if picks:
            log(f"# {name}: " + ", ".join(f"{t}: {picks[t]}" for t in sorted(picks)))
    config_lines, max_t = [], {}
    for cls in L.CONFIGS:
        line, wins = dict(L.CONFIGS[cls]), {}
        for T, cases in sorted(classes.get(cls, {}).items()):
            # the config with the least total time over the class's shapes, among those right on all of them
            common = set.intersection(*(set(k for k, r in c["rows"].items()
                                            if k not in ("cuBLAS", "ops.router") and r["ok"])
                                        for c in cases))
            if not common:
                continue
            pick = min(common, key=lambda k: sum(c["rows"][k]["us"] for c in cases))
            line[L.t_bucket(T)] = cases[0]["rows"][pick]["cfg"]
            gemv_us = sum(c["rows"][pick]["us"] for c in cases)
            cub = [c["rows"].get("cuBLAS", {}).get("us") for c in cases]
            wins[T] = None if None in cub else gemv_us < sum(cub)
        config_lines.append(f'    "{cls}": {{' + ", ".join(f"{t}: {L.config_code(line[t])}" for t in L.T_BUCKETS)
                            + "},")
        limit = 0
        for T in L.T_BUCKETS:
            if wins.get(T) is None:  # not measured: keep what was proved so far
                break
            if not wins[T]:
                break
            limit = T
        max_t[cls] = limit if wins else L.GEMV_MAX_T[cls]
    log("CONFIGS = {")
    for ln in config_lines:
        log(ln)
    log("}")
    log("GEMV_MAX_T = {" + ", ".join(f'"{k}": {v}' for k, v in max_t.items()) + "}")
    SUMMARY.extend(["CONFIGS = {", *config_lines, "}", "GEMV_MAX_T = {" +
                    ", ".join(f'"{k}": {v}' for k, v in max_t.items()) + "}"])


def main():
    global LOG
    os.makedirs(OUT, exist_ok=True)
    LOG = open(os.path.join(OUT, "dense_gemv.txt"), "w")
    import triton
    log(f"torch {torch.__version__} triton {triton.__version__} device "
        f"{torch.cuda.get_device_name() if not DRY else 'cpu (TRITON_INTERPRET=1, dry run)'}")
    guarded("precompile", precompile)
    guarded("copy ceiling", copy_ceiling)
    shapes = [sh for sh in (guarded(f"prepare {s[0]}", prepare, *s) for s in SHAPES) if sh]
    for T in T_ORDER:  # T-major: past the budget, the less important batch sizes go first
        for sh in shapes:
            if left() < 0:
                RESULTS["skipped"].append(f"{sh['name']} T={T}")
                log(f"{sh['name'] + ' T=' + str(T):<18} skipped: over the time budget")
                continue
            guarded(f"{sh['name']} T={T}", run_case, sh, T)
    guarded("winners", winners)
    log(f"\n==== summary ({time.time() - START:.0f} s) ====")
    for line in SUMMARY:
        log(line)
    if RESULTS["skipped"]:
        log(f"skipped (time budget): {len(RESULTS['skipped'])} cases/configs, first: {RESULTS['skipped'][0]}")
    if RESULTS["errors"]:
        log(f"{len(RESULTS['errors'])} errors (first: {RESULTS['errors'][0].splitlines()[0]})")
    with open(os.path.join(OUT, "dense_gemv.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)  # (configs as their dicts)
    LOG.close()


if __name__ == "__main__":
    main()
