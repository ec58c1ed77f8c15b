"""Whole-model A/B of MoE gemv configs: `mxmoe bench` decode at batch 1 (gpt-oss-20b shapes, random weights, the
triton engine's CUDA-graph decode step) with ``moe.CONFIGS["gemv"]`` set to each variant in turn, one process each,
on one GPU, the default first and again last (drift). Kernel timings alone (moe_mma.py, moe_kernels.py) leave out
what the decode graph changes: programmatic dependent launch overlapping neighbours, no per-graph replay cost,
whatever the previous kernel left in L2.

    source tests/benchmarks/gpu/setup.sh && python3 tests/benchmarks/gpu/moe_engine_ab.py [VARIANT ...]

Writes $OUT/moe_engine_ab.txt (the bench output of every variant) and $OUT/bench.jsonl (its records). (Its first
run, h200-2026-12-02-moe-engine-ab.txt, ran every variant in one process.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mxmoe.backends.triton_engine import moe

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


# One variant per process (as tests/benchmarks/gpu/pdl_order.sh): moe.CONFIGS["gemv"] set, then the mxmoe CLI.
_CHILD = ("import json, sys; from mxmoe.backends.triton_engine import moe; "
          "moe.CONFIGS['gemv'] = json.loads(sys.argv[1]); from mxmoe.core import cli; sys.exit(cli.main(sys.argv[2:]))")


def bench(label: str, cfg: dict, profile: bool, argv_tail: list[str] | None = None) -> str:
    argv = argv_tail or (["bench", "--shape", "gpt-oss-20b", "--backend", "triton", "--peer", "none", "--scenario",
                          "decode-b1", "--context", "1024", "--results", os.path.join(OUT, "bench.jsonl")]
                         + (["--profile"] if profile else []))
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg), *argv], capture_output=True, text=True)
    text = f"==== {label}: CONFIGS['gemv'] = {cfg}\n" + r.stdout + r.stderr[-2000:] + f"(exit {r.returncode})\n"
    print(text, flush=True)
    with open(os.path.join(OUT, "moe_engine_ab.txt"), "a") as f:
        f.write(text)
    return text


def main() -> None:
    names = sys.argv[1:] or list(VARIANTS)
    for i, name in enumerate(names):
        bench(name, VARIANTS[name], profile=i == 0 or name.startswith("mma"))
    bench("default (again)", VARIANTS["default"], profile=False)


if __name__ == "__main__":
    main()
