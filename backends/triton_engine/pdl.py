"""Programmatic dependent launch (PDL) for the ``triton`` engine's decode kernels (Hopper and later).

A decode step is ~240 small kernels in one CUDA graph; between two of them the GPU drains the first grid, then
launches and ramps up the next (~0.7 us a kernel on the H200, 0.16 ms a step). With PDL a kernel is launched
while its predecessor still runs: every program first signals that its own dependents may launch
(``griddepcontrol.launch_dependents``), then waits until the predecessor grid has completed and its writes are
visible (``griddepcontrol.wait``), and only then reads or writes anything. Static data (weights) may be read
before the wait. The rule that keeps this correct: **a kernel launched with ``launch_pdl`` calls
:func:`wait_for_predecessor` before touching any activation, cache or output** (its predecessor completes only
after passing its own wait, so the ordering holds along the whole chain). Kernels launched without PDL are
ordered by the stream as usual, whatever they follow.

Measured on the H200 (tests/benchmarks/results/h200-2026-12-02-pdl.txt): gpt-oss-20b decode at batch 1 2.01 ms a
step with PDL, 2.14 ms without, in the same run. (Prefetching the dense GEMVs' weights into L2 before the wait was
slower, 2.26-2.31 ms, and was dropped, as was a prefetch kernel that brought the next dense layer's weights into
L2 after its predecessor, while attention or the add + norm ran: 2.18-2.27 ms against 1.88-1.97, the small
kernels' own loads likely queued behind it, not measured; loading the first K step of them into registers before the
wait is faster, linear.EARLY_W; signalling the dependents after the wait instead of before it, a switch tried once,
was not: 2.08 ms against 2.02-2.07, tests/benchmarks/results/h200-2026-12-02-pdl-order.txt.)

``launch_options(t)`` is what a launcher adds to a kernel call: ``GDC=True`` (the kernel's constexpr that compiles
the wait in) and ``launch_pdl=True`` on a CUDA device of compute capability >= 9.0 outside the interpreter, else
``GDC=False`` alone. ``MXMOE_TRITON_PDL=0`` turns it off (for comparisons). Launchers of grids that can be large
pass their grid (``launch_options(t, grid)``): ``MXMOE_TRITON_PDL_MAX_PROGRAMS=n`` launches grids of n programs or more
without PDL, an experiment not yet measured in the decode step (default 0: no limit). In a graph of 240 dependent
tiny kernels on the H200, a boundary took 0.50 us with PDL and 0.79 without for grids of 1-132 programs, but 2.14
with and 1.39 without for 1440 (tests/benchmarks/gpu/pdl_chain.py, results/h200-2026-12-02-pdl-chain.txt); the MoE
gemv kernels have 720-1440 programs at batch 1, the unembedding 6284.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda as _cuda

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Static data (norm scales, biases) loaded before the wait by the kernels that take an EARLY_STATIC constexpr
# (ops._add_rms_norm_kernel, linear._gemv_kernel), so that a likely L2 miss overlaps the predecessor's tail instead
# of following the kernel's reduction; the default MoE gemv kernels (moe.py) load their routed expert's bias and
# routing weight right after the wait (they depend on the routing), under the K loop instead of after it. Offline
# SASS (triton 3.6, sm_90): without it the add + RMSNorm kernel issues the scale loads only after its two reduction
# barriers. gpt-oss-20b decode at batch 1 on the H200: 1.90, 1.90 ms a step with it against 1.94, 1.93 without,
# alternated in one session (tests/benchmarks/gpu/pdl_order.sh next). MXMOE_TRITON_EARLY_STATIC=0: without.
# Read at launch.
EARLY_STATIC = os.environ.get("MXMOE_TRITON_EARLY_STATIC", "1") != "0"


@functools.cache
def _enabled(device_index: int) -> bool:
    if _INTERPRET or os.environ.get("MXMOE_TRITON_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


# Grids of at least this many programs are launched without PDL (0: every grid with PDL). Read at launch.
MAX_PROGRAMS = int(os.environ.get("MXMOE_TRITON_PDL_MAX_PROGRAMS", "0"))


def pdl_for(device_index: int, programs: int | None) -> bool:
    """Whether a grid of ``programs`` programs (None: not given) on CUDA device ``device_index`` uses PDL."""
    return _enabled(device_index) and not (MAX_PROGRAMS > 0 and programs is not None and programs >= MAX_PROGRAMS)


def launch_options(t: torch.Tensor, grid: tuple[int, ...] | None = None) -> dict:
    """Keyword arguments for a kernel launch whose inputs live where ``t`` does, on ``grid`` where the launcher
    gives it (see the module docstring)."""
    programs = None if grid is None else math.prod(grid)
    if t.is_cuda and pdl_for(t.device.index if t.device.index is not None else torch.cuda.current_device(), programs):
        return dict(GDC=True, launch_pdl=True)
    return dict(GDC=False)


@triton.jit
def wait_for_predecessor(GDC: tl.constexpr):
    # Let the next kernel launch now (it waits in turn), then wait for the previous one.
    if GDC:
        _cuda.gdc_launch_dependents()
        _cuda.gdc_wait()
