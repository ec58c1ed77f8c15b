"""What one kernel boundary costs in the decode graph: a chain of N dependent tiny kernels in one CUDA graph.

A decode step of the 20b model is ~240 kernels, most of them far from any bandwidth limit, so the cost of a
boundary (the predecessor's drain, the launch, the wait, the first dependent load) bounds what fewer kernels (a
persistent kernel per layer) could save. Each kernel here waits for its predecessor (pdl.wait_for_predecessor, as
the engine's kernels do), reads one value its predecessor wrote and writes it back plus one, from program 0 of a
grid of P programs (the others only wait). Timed: the median of graph replays over N kernels, per kernel, with and
without PDL (launch_pdl), for P = 1, 132 (one program per SM) and 1440 (the MoE gemv grid at batch 1).

    source tests/benchmarks/gpu/setup.sh && python3 tests/benchmarks/gpu/pdl_chain.py

Writes $OUT/pdl_chain.txt. ``--dry-run`` on a CPU (TRITON_INTERPRET=1) runs a short chain once and checks it.
"""

from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

from mxmoe.backends.triton_engine.pdl import wait_for_predecessor


@triton.jit
def _step_kernel(x_ptr, GDC: tl.constexpr):
    wait_for_predecessor(GDC)
    if tl.program_id(0) == 0:
        tl.store(x_ptr, tl.load(x_ptr) + 1)


def chain(x: torch.Tensor, n: int, programs: int, pdl: bool) -> None:
    opts = dict(GDC=True, launch_pdl=True) if pdl else dict(GDC=False)
    for _ in range(n):
        _step_kernel[(programs,)](x, **opts)


def main() -> None:
    dry = "--dry-run" in sys.argv
    device = "cpu" if dry else "cuda"
    x = torch.zeros(1, dtype=torch.int32, device=device)
    if dry:
        chain(x, 5, 3, False)
        assert int(x) == 5
        print("dry run: 5 steps, x = 5")
        return
    out = os.environ.get("OUT") or "/tmp/pdl_chain"
    os.makedirs(out, exist_ok=True)
    n = 240
    lines = [f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}: a chain of "
             f"{n} dependent kernels in one CUDA graph, median of 50 replays, per kernel"]
    for programs in (1, 132, 1440):
        for pdl in (False, True):
            chain(x, 2, programs, pdl)  # compile
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                chain(x, n, programs, pdl)
            x.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert int(x) == n, f"the chain lost steps: x = {int(x)}, expected {n}"
            times = []
            for _ in range(50):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3 / n)
            times.sort()
            lines.append(f"programs {programs:5d}  pdl {'on ' if pdl else 'off'}  {times[len(times) // 2]:.2f} us a "
                         f"kernel (min {times[0]:.2f})")
            print(lines[-1], flush=True)
    open(os.path.join(out, "pdl_chain.txt"), "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
