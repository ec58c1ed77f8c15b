"""The MoE dot kernels with the weights decoded straight into bf16 (moe._slot_bf16) on a GPU, against the defaults.

On the lent GPU machine, from the repository root:

    source tests/benchmarks/gpu/setup.sh && python3 tests/benchmarks/gpu/moe_bf16.py

1. Correctness: tests/test_triton_moe.py on the GPU (it covers the bf16 decode: scale bytes 0/1, NaN scales, the
   float64 oracle), then at the real shapes (D = I = 2880, k = 4) every variant timed below against
   ``moe_mxfp4_ref``.
2. The device's copy bandwidth, measured in the same run.
3. Timings (median of CUDA-graph replays, the L2 refilled with clean data before each, as moe_kernels.py does):
   T = 1 (E = 32 and 128): the default gemv kernels; T = 4, 8: the gemv and the routed dot path (SWAP and not);
   T = 64: the routed dot path with the old decode (DEQ_BF16 off) and the new one, SWAP and not; T = 2048: the
   in-register prefill path with the new decode (SWAP and not) against the workspace path (moe_prefill.py).
   (Run 1 also timed a "pairs" path, the dot kernels with one tile per (token, slot) pair and no routing: 95.8 us
   at T = 1 against the gemv's 34.6; removed since, see NOTES-moe.md run 4.)

Table to stdout and $OUT/moe_bf16.txt, every row also in $OUT/moe_bf16.json.
``--sweep64``: only the routed dot path at T = 64 over tiles of the bf16-decode SWAP kernels (mlp1 and mlp2 side by
side), then the best pair against the default at T = 8, 16, 32 and at E = 128.
``--dry-run``: the code paths on a CPU under TRITON_INTERPRET=1 at tiny shapes (timings mean nothing).
"""

from __future__ import annotations

import json
import os
import sys
import time

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import gpu_common  # noqa: E402 - beside this script
from mxmoe.backends.triton_engine import moe  # noqa: E402
from mxmoe.backends.triton_engine.moe_prefill import moe_prefill_dequant  # noqa: E402

START = time.time()
BUDGET_S = 1e9 if DRY else 400  # later cases are skipped past this
DEV = "cpu" if DRY else "cuda"
D = I = 64 if DRY else 2880
K = 4
ALPHA, LIMIT = 1.702, 7.0
OUT = os.environ.get("OUT") or "/tmp/moe_bf16_out"
os.makedirs(OUT, exist_ok=True)
TXT = open(os.path.join(OUT, "moe_bf16.txt"), "w")
ROWS: list[dict] = []


def log(*args):
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    TXT.write(line + "\n")
    TXT.flush()


def layer(E: int) -> moe.MoEWeights:
    w = gpu_common.moe_layer(E, D, I, DEV)
    assert w.small_scales  # scale bytes 117..121: the bf16 decode applies
    return w


def routing(T: int, E: int, g):
    idx = torch.stack([torch.randperm(E, device=DEV, generator=g)[:K] for _ in range(T)])
    return torch.softmax(torch.randn(T, K, device=DEV, generator=g), dim=-1).to(torch.bfloat16), idx


def routed_bytes(idx) -> tuple[int, int]:
    n = int(torch.unique(idx).numel())
    return n * 2 * I * (D // 2 + D // 32), n * D * (I // 2 + I // 32)


def bench_us(fn) -> float:
    return gpu_common.bench_us(fn, dry=DRY, reps=40)


def row(case: str, variant: str, us: float | None, nbytes: int | None = None, flops: float | None = None):
    if us is None:
        return None
    r = dict(case=case, variant=variant, us=round(us, 2))
    txt = f"{case:<14} {variant:<58} {us:9.2f} us"
    if nbytes:
        r["TBps"] = round(nbytes / us / 1e6, 3)
        txt += f" {nbytes / 1e6:7.1f} MB {nbytes / us / 1e6:6.3f} TB/s"
    if flops:
        r["TFLOPs"] = round(flops / us / 1e6, 1)
        txt += f" {flops / us / 1e6:6.1f} TFLOP/s"
    ROWS.append(r)
    log(txt)
    return us


def guarded(label, fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one failing variant must not stop the run
        log(f"ERROR {label}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        return None


def check(label, out, ref) -> bool:
    err = out.float() - ref.float()
    rel = (err.norm() / ref.float().norm()).item()
    mx = (err.abs().max() / ref.float().abs().max()).item()
    ok = bool(out.isfinite().all()) and rel < 1e-2 and mx < 3e-2
    log(f"check {label:<52}: norm rel {rel:.2e}, max rel {mx:.2e} {'ok' if ok else 'FAIL'}")
    ROWS.append(dict(check=label, norm_rel=rel, max_rel=mx, ok=ok))
    return ok


def dot_cfg(bn, bb, nw, ns, deq=True, swap=False):
    return dict(BLOCK_N=bn, BLOCK_B=bb, num_warps=nw, num_stages=ns, JOIN=not swap, DEQ_BF16=deq, SWAP=swap)


def name(c) -> str:
    return f"BN{c['BLOCK_N']} BB{c['BLOCK_B']} w{c['num_warps']} s{c['num_stages']}" + (
        "" if c.get("DEQ_BF16", True) else " old-decode") + (" swap" if c.get("SWAP") else "")


DOT64 = [(128, 4, 4, 3), (64, 4, 4, 3, True, True), (128, 4, 4, 3, True, True), (64, 8, 4, 3, True, True),
         (128, 4, 8, 3, True, True), (64, 4, 4, 4, True, True)]
if DRY:
    DOT64 = [(64, 2, 4, 2), (64, 4, 4, 2, True, True)]


def kernels_case(case, T, E, cfgs1, cfgs2, extra_old: bool = False):
    """Times mlp1 and mlp2 of the routed dot path with each config (pairs of cfgs1, cfgs2), after checking each
    config's op against the spec; returns the best config (each layer's fastest), timed as a whole op."""
    g = torch.Generator(device=DEV).manual_seed(100 + T + E)
    w = layer(E)
    x = torch.randn(T, D, device=DEV, generator=g).to(torch.bfloat16)
    ew, idx = routing(T, E, g)
    b1, b2 = routed_bytes(idx)
    flops = 2.0 * T * K * 3 * D * I
    h = torch.empty(T * K, I, dtype=torch.bfloat16, device=DEV)
    y = torch.empty(T * K, D, dtype=torch.float32, device=DEV)
    out = torch.empty(T, D, dtype=torch.bfloat16, device=DEV)
    ref = moe.moe_mxfp4_ref(x, ew, idx, w, ALPHA, LIMIT)
    path = "dot"
    order, tiles = moe.moe_routing(idx, E, 16)
    row(case, "routing BT16", guarded("routing", lambda: bench_us(lambda: moe.moe_routing(idx, E, 16))))
    best1, best2 = (1e9, None), (1e9, None)
    variants = [(c1, c2) for c1, c2 in zip(cfgs1, cfgs2)]
    if extra_old:
        variants += [(dict(c1, DEQ_BF16=False), dict(c2, DEQ_BF16=False)) for c1, c2 in variants[:2]]
    for c1, c2 in variants:
        if time.time() - START > BUDGET_S:
            log("(time budget: remaining variants skipped)")
            break
        cfg = dict(BLOCK_T=16, mlp1=c1, mlp2=c2)
        o = torch.full((T, D), float("nan"), dtype=torch.bfloat16, device=DEV)
        if guarded(f"{case} {cfg}", lambda: moe.moe_mxfp4(x, ew, idx, w, ALPHA, LIMIT, path=path, config=cfg, out=o)) \
                is None and not o.isfinite().all():
            continue
        if not check(f"{case} {path} {name(c1)} / {name(c2)}", o, ref):
            continue
        us1 = row(case, f"{path} mlp1 {name(c1)}", guarded("mlp1", lambda: bench_us(
            lambda: moe.launch_mlp1_dot(x, order, tiles, K, w, h, 16, c1, ALPHA, LIMIT))), b1,
            flops * 2 / 3)
        us2 = row(case, f"{path} mlp2 {name(c2)}", guarded("mlp2", lambda: bench_us(
            lambda: moe.launch_mlp2_dot(h, order, tiles, ew, w, y, 16, c2))), b2, flops / 3)
        if us1 and us1 < best1[0] and c1.get("DEQ_BF16", True):
            best1 = (us1, c1)
        if us2 and us2 < best2[0] and c2.get("DEQ_BF16", True):
            best2 = (us2, c2)
    row(case, "sum of k slots", guarded("sum", lambda: bench_us(lambda: moe.launch_sum_slots(y, out, K))))
    if best1[1] is None or best2[1] is None:
        return None
    cfg = dict(BLOCK_T=16, mlp1=best1[1], mlp2=best2[1])
    row(case, f"{path} op best (mlp1 {name(best1[1])} / mlp2 {name(best2[1])})", guarded("op", lambda: bench_us(
        lambda: moe.moe_mxfp4(x, ew, idx, w, ALPHA, LIMIT, path=path, config=cfg, out=out))), b1 + b2, flops)
    return cfg


def op_case(case, T, E, path, cfg=None):
    g = torch.Generator(device=DEV).manual_seed(300 + T + E)
    w = layer(E)
    x = torch.randn(T, D, device=DEV, generator=g).to(torch.bfloat16)
    ew, idx = routing(T, E, g)
    b1, b2 = routed_bytes(idx)
    out = torch.full((T, D), float("nan"), dtype=torch.bfloat16, device=DEV)
    fn = (lambda: moe_prefill_dequant(x, ew, idx, w, ALPHA, LIMIT, out=out)) if path == "prefill_dequant" else (
        lambda: moe.moe_mxfp4(x, ew, idx, w, ALPHA, LIMIT, path=path, config=cfg, out=out))
    if guarded(f"{case} {path}", fn) is None and not out.isfinite().all():
        return None
    label = path + (f" {name(cfg['mlp1'])} / {name(cfg['mlp2'])}" if cfg else " (default config)")
    if not check(f"{case} {label}", out, moe.moe_mxfp4_ref(x, ew, idx, w, ALPHA, LIMIT)):
        return None
    return row(case, f"op {label}", guarded("op", lambda: bench_us(fn)), b1 + b2, 2.0 * T * K * 3 * D * I)


# --sweep64: the dot kernels with the bf16 decode and SWAP at T = 64 (batch-64 decode), mlp1 and mlp2 tiles side by
# side (each list is one variant per row; the first row is the default of CONFIGS["dot"]).
SWEEP64_1 = [(64, 4, 4, 3), (64, 4, 4, 2), (64, 4, 4, 5), (32, 4, 4, 3), (32, 8, 4, 3), (64, 8, 8, 3), (64, 4, 8, 3),
             (32, 4, 2, 3), (128, 4, 4, 4), (128, 4, 8, 4), (64, 4, 2, 4), (32, 8, 2, 4)]
SWEEP64_2 = [(128, 4, 4, 3), (128, 4, 4, 4), (64, 4, 4, 4), (128, 4, 8, 3), (256, 4, 8, 3), (128, 8, 8, 3), (64, 8, 4, 3),
             (32, 4, 4, 3), (128, 4, 4, 2), (256, 4, 8, 4), (64, 4, 2, 4), (128, 8, 4, 3)]
if DRY:
    SWEEP64_1, SWEEP64_2 = SWEEP64_1[:2], SWEEP64_2[:2]


def sweep64():
    cfgs1 = [dot_cfg(*c, swap=True) for c in SWEEP64_1]
    cfgs2 = [dot_cfg(*c, swap=True) for c in SWEEP64_2]
    default_us = op_case("T=64 E=32", 64, 32, "dot")
    best = kernels_case("T=64 E=32", 64, 32, cfgs1, cfgs2)
    if best:
        log("best dot config at T=64:", json.dumps(best))
        best_us = op_case("T=64 E=32", 64, 32, "dot", best)  # the whole op again, next to the default's
        if default_us and best_us and best_us < default_us:
            with open(os.path.join(OUT, "dot_best.json"), "w") as f:  # e2e.sh's dot-winner part selects it
                json.dump(dict(config=best, us=best_us, default_us=default_us), f)
        for T in (16, 32):
            op_case(f"T={T} E=32", T, 32, "dot")
            op_case(f"T={T} E=32", T, 32, "dot", best)
        op_case("T=8 E=32", 8, 32, "gemv")
        op_case("T=8 E=32", 8, 32, "dot", best)
        op_case("T=64 E=128", 64, 128, "dot")
        op_case("T=64 E=128", 64, 128, "dot", best)


def main():
    log(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if not DRY else 'cpu'}")
    if "--sweep64" in sys.argv:
        sweep64()
        with open(os.path.join(OUT, "moe_bf16.json"), "w") as f:
            json.dump(ROWS, f, indent=1)
        log(f"done in {time.time() - START:.0f} s")
        return
    if not DRY:
        import pytest
        t = time.time()
        rc = pytest.main(["-q", "-p", "no:cacheprovider", "-rf", "tests/test_triton_moe.py"])
        log(f"pytest tests/test_triton_moe.py on cuda: exit {int(rc)} in {time.time() - t:.0f} s")
        src = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
        dst = torch.empty_like(src)
        row("ceiling", "device copy 1 GiB (read + write)", bench_us(lambda: dst.copy_(src)), 2 << 30)
        del src, dst
    for E in (32, 128):  # T = 1: the default gemv
        op_case(f"T=1 E={E}", 1, E, "gemv")
    for T in (4, 8):
        op_case(f"T={T} E=32", T, 32, "gemv")
        op_case(f"T={T} E=32", T, 32, "dot")
        op_case(f"T={T} E=32", T, 32, "dot", dict(BLOCK_T=16, mlp1=dot_cfg(64, 4, 4, 3, swap=True),
                                                  mlp2=dot_cfg(64, 4, 4, 3, swap=True)))
    # T = 64: the routed dot path, old decode against new.
    op_case("T=64 E=32", 64, 32, "dot")
    kernels_case("T=64 E=32", 64, 32, [dot_cfg(*c) for c in DOT64], [dot_cfg(*c) for c in DOT64], extra_old=True)
    # Prefill of 2k tokens: in-register path with the new decode against the workspace path.
    T = 64 if DRY else 2048
    op_case(f"T={T} E=32", T, 32, "prefill_dequant")
    for bt, c1, c2 in ((128, (128, 4, 8, 3, True, True), (128, 4, 8, 3, True, True)),
                       (128, (128, 4, 8, 2, True, True), (128, 4, 8, 4, True, True)),
                       (128, (64, 4, 4, 3, True, True), (128, 4, 4, 3, True, True)),
                       (64, (128, 4, 4, 3, True, True), (128, 4, 4, 3, True, True)),
                       (128, (128, 4, 8, 3), (128, 4, 8, 3)),
                       (256, (64, 4, 8, 3, True, True), (64, 4, 8, 3, True, True))):
        op_case(f"T={T} E=32", T, 32, "prefill", dict(BLOCK_T=bt, mlp1=dot_cfg(*c1), mlp2=dot_cfg(*c2)))
    with open(os.path.join(OUT, "moe_bf16.json"), "w") as f:
        json.dump(ROWS, f, indent=1)
    log(f"done in {time.time() - START:.0f} s")


if __name__ == "__main__":
    main()
