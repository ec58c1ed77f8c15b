"""GPU check and timings of the megablocks engine, for a lent GPU (the lead runs it; nothing here runs in CI).

    source tests/benchmarks/gpu/setup.sh && python3 tests/benchmarks/gpu/megablocks.py [--quick]
        [--skip correctness,timing,memory] [--conformance auto,torch,grouped_mm,triton [--conformance-shapes small]]

1. Correctness at gpt-oss-20b and gpt-oss-120b MoE shapes (D 2880, I 2880, 32 / 128 experts, top-4): every
   kernel (torch, grouped_mm, triton) and both weight modes, random and skewed routing (all tokens on one
   expert, one token per expert, a few experts only), against the reference engine in float64 on the same
   bf16 inputs; the bound per token is 4x the bf16 reference engine's own error + 2^-7 of the row's scale
   (a dropped (token, expert) pair is off by a whole expert's output).
2. Timings of the experts op (sort → grouped GEMMs → combine; router excluded), median of CUDA-event timings:
   decode T = 1, 8, 64 and prefill T = 512, 2048, 8192, each kernel and the reference engine side by side;
   at decode also the bandwidth of the routed experts' bf16 bytes.
3. Memory of each weight mode over --layers layers at both shapes (torch.cuda.memory_allocated), and what
   ``auto`` picks on this device.
4. ``--conformance KERNELS``: the conformance suite L0-L3 on the engine on cuda, once per kernel named.

Prints a table per part and appends one JSON line to tests/benchmarks/results/megablocks.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from mxmoe.backends.megablocks import MegaBlocksBackend, moe
from mxmoe.backends.reference import TorchBackend
from mxmoe.core.bench import git_commit
from mxmoe.core.weights import ExpertLinear

RESULTS = Path(__file__).resolve().parents[1] / "results" / "megablocks.jsonl"
SHAPES = {"gpt-oss-20b": dict(E=32, D=2880, I=2880, k=4), "gpt-oss-120b": dict(E=128, D=2880, I=2880, k=4)}
KERNELS = ("torch", "grouped_mm", "triton")
ALPHA, LIMIT = 1.702, 7.0
GIB = 2 ** 30


def random_layer(E: int, D: int, I: int, device, seed: int) -> tuple[ExpertLinear, ExpertLinear]:
    """MXFP4 experts made on the device: random nibbles, E8M0 scales in a narrow band around 1/sqrt(K)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def lin(N: int, K: int) -> ExpertLinear:
        blocks = torch.randint(0, 256, (E, N, K // 32, 16), generator=g, device=device, dtype=torch.uint8)
        centre = 127 - round(math.log2(math.sqrt(K))) - 1  # E2M1 magnitudes average ~2: weights ~ 1/sqrt(K)
        scales = torch.randint(centre - 1, centre + 2, (E, N, K // 32), generator=g, device=device,
                               dtype=torch.uint8)
        bias = (0.1 * torch.randn(E, N, generator=g, device=device)).to(torch.bfloat16)
        return ExpertLinear(bias=bias, blocks=blocks, scales=scales)

    return lin(2 * I, D), lin(D, I)


def routing(kind: str, T: int, E: int, k: int, device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "all_on_one":
        rest = torch.stack([torch.randperm(E - 1, generator=g)[:k - 1] for _ in range(T)])
        idx = torch.cat([torch.full((T, 1), 5), rest + (rest >= 5).long()], dim=1)
    elif kind == "one_each":
        idx = torch.stack([(torch.arange(T) + j) % E for j in range(k)], dim=1)
    elif kind == "few_experts":
        idx = torch.stack([torch.randperm(k + 1, generator=g)[:k] for _ in range(T)])
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, generator=g), dim=-1).to(torch.bfloat16)
    return w.to(device), idx.to(device)


def cuda_time(fn, reps: int, warmup: int = 3) -> float:
    """Median microseconds per call (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return statistics.median(times)


def check_correctness(device, shapes, token_counts) -> list[dict]:
    rows = []
    ref = TorchBackend()
    for shape_name in shapes:
        s = SHAPES[shape_name]
        E, D, I, k = s["E"], s["D"], s["I"], s["k"]
        mlp1, mlp2 = random_layer(E, D, I, device, seed=1)
        ref64 = ref.prepare_experts(mlp1, mlp2, torch.float64, device)
        ref16 = ref.prepare_experts(mlp1, mlp2, torch.bfloat16, device)
        engines = {(kern, mode): MegaBlocksBackend(kernel=kern, weight_mode=mode)
                   for kern in KERNELS for mode in ("resident", "workspace")}
        layers = {}
        for key, eng in engines.items():
            try:
                layers[key] = eng.prepare_experts(mlp1, mlp2, torch.bfloat16, device)
            except Exception as e:  # noqa: BLE001 — report, keep going
                rows.append(dict(shape=shape_name, kernel=key[0], mode=key[1], error=f"prepare: {e}"))
        for T, kind in token_counts:
            if kind == "one_each":
                T = E
            w, idx = routing(kind, T, E, k, device, seed=T)
            x = torch.randn(T, D, generator=torch.Generator(device=device).manual_seed(T), device=device)
            x = x.to(torch.bfloat16)
            exact = ref.experts(x.double(), w.double(), idx, ref64, ALPHA, LIMIT)
            honest = ref.experts(x, w, idx, ref16, ALPHA, LIMIT).double()
            scale = exact.abs().amax(dim=1, keepdim=True)
            honest_err = (honest - exact).abs().amax(dim=1, keepdim=True)
            allowed = 4 * honest_err + 2 ** -7 * scale
            for key, layer in layers.items():
                row = dict(shape=shape_name, kernel=key[0], mode=key[1], T=T, routing=kind)
                try:
                    out = engines[key].experts(x, w, idx, layer, ALPHA, LIMIT).double()
                    err = (out - exact).abs()
                    ratio = float((err / allowed).max())
                    row.update(ok=bool(torch.isfinite(out).all()) and ratio <= 1, ratio=round(ratio, 3),
                               max_err=float(err.max()), honest_max_err=float(honest_err.max()))
                except Exception as e:  # noqa: BLE001
                    row.update(ok=False, error=f"{type(e).__name__}: {e}")
                rows.append(row)
                print(f"  {shape_name:13s} {key[0]:10s} {key[1]:9s} T={T:5d} {kind:11s} "
                      + ("ERROR " + row["error"] if "error" in row else
                         f"{'ok ' if row['ok'] else 'BAD'} ratio {row['ratio']:.3f} max err {row['max_err']:.3g} "
                         f"(bf16 reference {row['honest_max_err']:.3g})"), flush=True)
        del layers, engines, ref64, ref16
        torch.cuda.empty_cache()
    return rows


def time_experts(device, shapes, decode_T, prefill_T, reps: int) -> list[dict]:
    rows = []
    for shape_name in shapes:
        s = SHAPES[shape_name]
        E, D, I, k = s["E"], s["D"], s["I"], s["k"]
        mlp1, mlp2 = random_layer(E, D, I, device, seed=2)
        ref = TorchBackend()
        candidates = {"reference": (ref, ref.prepare_experts(mlp1, mlp2, torch.bfloat16, device))}
        for kern in KERNELS:
            for mode in ("resident", "workspace"):
                eng = MegaBlocksBackend(kernel=kern, weight_mode=mode)
                try:
                    candidates[f"{kern}/{mode}"] = (eng, eng.prepare_experts(mlp1, mlp2, torch.bfloat16, device))
                except Exception as e:  # noqa: BLE001
                    print(f"  {shape_name} {kern}/{mode}: prepare failed: {e}")
        for T in list(decode_T) + list(prefill_T):
            w, idx = routing("random", T, E, k, device, seed=T)
            x = torch.randn(T, D, device=device).to(torch.bfloat16)
            routed = int(torch.unique(idx).numel())
            routed_bytes = routed * (2 * I * D + D * I) * 2  # bf16 weights the GEMMs must read
            line = [f"  {shape_name:13s} T={T:5d} ({routed:3d} experts routed)"]
            for name, (eng, layer) in candidates.items():
                n = reps if T <= 64 else max(3, reps // 4)
                try:
                    us = cuda_time(lambda: eng.experts(x, w, idx, layer, ALPHA, LIMIT), n)
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(shape=shape_name, engine=name, T=T, error=f"{type(e).__name__}: {e}"))
                    line.append(f"{name} ERROR")
                    continue
                row = dict(shape=shape_name, engine=name, T=T, us=round(us, 1), routed_experts=routed,
                           tokens_per_s=round(T / us * 1e6))
                if T in decode_T:
                    row["routed_bf16_TB_per_s"] = round(routed_bytes / us / 1e6, 3)
                rows.append(row)
                line.append(f"{name} {us:9.1f} us" + (f" ({row['routed_bf16_TB_per_s']:.2f} TB/s)"
                                                      if T in decode_T else ""))
            print(" | ".join(line), flush=True)
        del candidates
        torch.cuda.empty_cache()
    return rows


def measure_memory(device, shapes, layers: int) -> list[dict]:
    rows = []
    for shape_name in shapes:
        s = SHAPES[shape_name]
        packed = [random_layer(s["E"], s["D"], s["I"], device, seed=10 + i) for i in range(layers)]
        for mode in ("resident", "workspace", "auto"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            eng = MegaBlocksBackend(kernel="torch", weight_mode=mode)
            prepared = [eng.prepare_experts(a, b, torch.bfloat16, device) for a, b in packed]
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated(device) - before
            peak = torch.cuda.max_memory_allocated(device) - before
            rep = eng.memory()
            row = dict(shape=shape_name, mode=mode, layers=layers, weight_mode=eng.weight_mode,
                       held_gib=round(held / GIB, 3), peak_gib=round(peak / GIB, 3),
                       engine_report_gib=round(rep["total_bytes"] / GIB, 3),
                       workspace_gib=round(rep["workspace_bytes"] / GIB, 3),
                       per_layer_dense_gib=round(moe.dense_bytes(*packed[0], torch.bfloat16) / GIB, 3))
            rows.append(row)
            print(f"  {shape_name:13s} {mode:9s} -> {eng.weight_mode:9s}: holds {row['held_gib']:.2f} GiB for "
                  f"{layers} layers (workspace {row['workspace_gib']:.2f}), load peak {row['peak_gib']:.2f} GiB",
                  flush=True)
            del prepared, eng
        del packed
        torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    for shape_name, n_layers in (("gpt-oss-20b", 24), ("gpt-oss-120b", 36)):
        s = SHAPES[shape_name]
        per = 2 * s["E"] * (2 * s["I"] * s["D"] + s["D"] * s["I"])
        resident = 0
        for _ in range(n_layers):  # what auto would do on this device, from free memory alone
            if moe.choose_mode(per, per, (free - resident, total)) != "resident":
                break
            resident += per
        print(f"  auto on this device ({free / GIB:.0f} of {total / GIB:.0f} GiB free): {shape_name} would keep "
              f"{resident // per} of {n_layers} layers resident ({per / GIB:.2f} GiB each)")
        rows.append(dict(shape=shape_name, mode="auto-projection", layers=n_layers, layers_resident=resident // per,
                         free_gib=round(free / GIB, 1), total_gib=round(total / GIB, 1)))
    return rows


def run_conformance(device, kernels, shapes: str) -> list[dict]:
    from mxmoe.conformance import run_suite

    rows = []
    for kern in kernels:
        t0 = time.perf_counter()
        try:
            report = run_suite(MegaBlocksBackend(kernel=kern), levels=["L0", "L1", "L2", "L3"], device=device,
                               derandomize=True, shapes=shapes)
            counts = dict(report.summary.counts)
            bad = [f"{c.id}: {c.status.value}: {c.message[:200]}" for c in report.cases
                   if c.status.value not in ("PASS", "NOT_SUPPORTED", "WAIVED", "NOT_RUN")]
            rows.append(dict(kernel=kern, passed=bool(report.summary.passed), verdict=report.summary.verdict,
                             counts=counts, failures=bad, seconds=round(time.perf_counter() - t0, 1)))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(kernel=kern, passed=False, error=f"{type(e).__name__}: {e}"))
        print(f"  conformance kernel={kern}: {rows[-1]}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (about a minute)")
    ap.add_argument("--conformance", default="", metavar="KERNELS",
                    help="also run conformance L0-L3 on cuda with these kernels (comma-separated: auto, torch, "
                         "grouped_mm, triton); the float64 oracle runs on the CPU, so real shapes take minutes")
    ap.add_argument("--conformance-shapes", default="all", choices=("all", "small", "real"))
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: correctness,timing,memory")
    ap.add_argument("--layers", type=int, default=4, help="layers prepared for the memory figures")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA/ROCm device: this script is for a GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    import triton

    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "benchmark": "megablocks",
        "device": torch.cuda.get_device_name(device),
        **git_commit(),  # $MXMOE_GIT_COMMIT on a lent GPU, whose copy's .git may be stale
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                     "hip": torch.version.hip, "cuda": torch.version.cuda},
        "capabilities": MegaBlocksBackend.capabilities.model_dump(mode="json"),
        "grouped_mm": moe.grouped_mm_usable(device, torch.bfloat16),
    }
    print(f"megablocks on {result['device']}: {result['versions']}; grouped_mm usable: {result['grouped_mm']}")
    shapes = list(SHAPES)
    ok = True
    if "correctness" not in skip:
        print("correctness (vs the float64 reference engine on the same bf16 inputs):")
        sizes = [(1, "random"), (64, "random"), (0, "one_each"), (2048, "all_on_one")]
        if not args.quick:
            sizes += [(8, "random"), (512, "few_experts"), (4096, "random")]
        result["correctness"] = check_correctness(device, shapes, sizes)
        ok = all(r.get("ok") for r in result["correctness"])
    if "timing" not in skip:
        print("experts op timings (median us per call):")
        decode_T = (1, 8, 64)
        prefill_T = (512, 2048) if args.quick else (512, 2048, 8192)
        result["timing"] = time_experts(device, shapes, decode_T, prefill_T, 5 if args.quick else args.reps)
    if "memory" not in skip:
        print("memory by weight mode:")
        result["memory"] = measure_memory(device, shapes, 2 if args.quick else args.layers)
    if args.conformance:
        print("conformance L0-L3 on cuda:")
        kernels = [k.strip() for k in args.conformance.split(",") if k.strip()]
        result["conformance"] = run_conformance(device, kernels, args.conformance_shapes)
        ok = ok and all(r.get("passed") for r in result["conformance"])
    result["all_correct"] = ok
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"appended to {results}; all correct: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
