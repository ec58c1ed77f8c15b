"""What the GPU kernel scripts of this folder share: random MXFP4 experts in the real format, and the timing rule.

Timing (``bench_us``): the median of CUDA-graph replays (as decode runs in the engine), each preceded by a read of
a 512 MB buffer, so that the 50-60 MB L2 holds none of the weights under test and no dirty lines (triton's
``do_bench`` zeroes its flush buffer instead, and the write-back of those lines then competes with the kernel under
test: the first MoE run measured that way, NOTES-moe.md). With ``dry`` (a script's ``--dry-run`` on a CPU) one
eager call is timed, which means nothing but runs the code path.
"""

from __future__ import annotations

import time

import torch

from mxmoe.backends.triton_engine import moe
from mxmoe.core.weights import ExpertLinear

_FLUSH: list = []
_LAYERS: dict = {}


def random_mxfp4(E: int, N: int, K: int, g: torch.Generator, device) -> ExpertLinear:
    """E experts (N, K): uniform random codes (every code, +-0.5 included), scale bytes 117..121 (weights ~ 2^-8 ..
    6 * 2^-6: activations stay O(1)), bf16 biases."""
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, device=device, generator=g)
    scales = torch.randint(117, 122, (E, N, K // 32), dtype=torch.uint8, device=device, generator=g)
    bias = (torch.randn(E, N, device=device, generator=g) * 0.1).to(torch.bfloat16)
    return ExpertLinear(bias=bias, blocks=blocks, scales=scales)


def moe_layer(E: int, D: int, I: int, device) -> moe.MoEWeights:
    """One layer of E random MXFP4 experts (mlp1 (2I, D), mlp2 (D, I), seed E) prepared for the triton kernels in
    bf16; made once per shape and kept."""
    key = (E, D, I, str(device))
    if key not in _LAYERS:
        g = torch.Generator(device=device).manual_seed(E)
        _LAYERS[key] = moe.prepare_moe_weights(random_mxfp4(E, 2 * I, D, g, device), random_mxfp4(E, D, I, g, device),
                                               torch.bfloat16, device)
    return _LAYERS[key]


def bench_us(fn, *, dry: bool = False, reps: int | None = None, budget_s: float = 0.02, max_reps: int = 100) -> float:
    """Median us of one call of ``fn``, replayed from a CUDA graph with the L2 refilled with clean data first.
    ``reps`` replays, or as many as fit in ``budget_s`` (10 .. ``max_reps``)."""
    if dry:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    if not _FLUSH:
        _FLUSH.append(torch.ones(256 << 20, dtype=torch.float16, device="cuda"))
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    t0 = time.perf_counter()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    once = (time.perf_counter() - t0) / 3
    reps = reps or int(min(max_reps, max(10, budget_s / max(once, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        _FLUSH[0].sum()  # reads 512 MB: evicts the weights, leaves nothing to write back
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    del graph
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2] * 1e3
