"""Whole-model A/B of MoE gemv configs: `mxmoe bench` decode at batch 1 (gpt-oss-20b shapes, random weights, the
triton engine's CUDA-graph decode step) with ``moe.CONFIGS["gemv"]`` set to each variant in turn, in one process
on one GPU, the default first and again last (drift). Kernel timings alone (moe_mma.py, moe_kernels.py) leave out
what the decode graph changes: programmatic dependent launch overlapping neighbours, no per-graph replay cost,
whatever the previous kernel left in L2.

    source tests/benchmarks/gpu/setup.sh && python3 tests/benchmarks/gpu/moe_engine_ab.py [VARIANT ...]

Writes $OUT/moe_engine_ab.txt (the bench output of every variant) and $OUT/bench.jsonl (its records).
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import sys

import torch

from mxmoe.backends.triton_engine import moe
from mxmoe.core import cli

OUT = os.environ.get("OUT") or "/tmp/moe_engine_ab"
os.makedirs(OUT, exist_ok=True)
MMA_TILED = dict(mlp1=dict(MMA=True, NT=1, NW=1, STAGES=2, TILED=True),
                 mlp2=dict(MMA=True, NT=1, NW=1, STAGES=2, TILED=True, SPLIT=4))
VARIANTS = {
    "default": moe.CONFIGS["gemv"],
    # the k-sum fused into mlp2 (one kernel less a layer): the activation-stationary mlp2 with FUSE_SUM
    "fused-sum": dict(mlp1=moe.GEMV_PORTABLE["mlp1"], mlp2=moe.GEMV_ST["mlp2"]),
    # the tensor-core kernels on tiled words (a second copy of the experts: measurement only)
    "mma-tiled": MMA_TILED,
    "mma-tiled-mlp1": dict(mlp1=MMA_TILED["mlp1"], mlp2=moe.GEMV_PORTABLE["mlp2"]),
}


def bench(label: str, cfg: dict, profile: bool) -> None:
    moe.CONFIGS["gemv"] = cfg
    argv = ["bench", "--shape", "gpt-oss-20b", "--backend", "triton", "--peer", "none", "--scenario", "decode-b1",
            "--context", "1024", "--results", os.path.join(OUT, "bench.jsonl")] + (["--profile"] if profile else [])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    text = f"==== {label}: CONFIGS['gemv'] = {cfg}\n" + buf.getvalue() + f"(exit {rc})\n"
    print(text, flush=True)
    with open(os.path.join(OUT, "moe_engine_ab.txt"), "a") as f:
        f.write(text)
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    names = sys.argv[1:] or list(VARIANTS)
    for i, name in enumerate(names):
        bench(name, VARIANTS[name], profile=i == 0 or name.startswith("mma"))
    bench("default (again)", VARIANTS["default"], profile=False)


if __name__ == "__main__":
    main()
