"""Synchronisation between the programs of one kernel: the election of the last program to arrive.

Kernels that split a reduction over programs (split-K GEMVs, split-KV decode with the last-program merge) let the
last program of a group sum everyone's partials, in a fixed order, so that results do not depend on which program
finishes last. The group's int32 counter starts at 0 and that last program puts it back to 0, so a CUDA graph
replays the kernel as it is.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def last_to_arrive(counter, target):
    # Counts this program in at its group's counter; True for the last of ``target`` programs. The barrier orders
    # every thread's partial stores before the (release) atomic; the last program's reads of the others' partials
    # come after its (acquire) atomic and must go through L2 (loads with cache_modifier=".cg"), past any stale L1
    # line.
    tl.debug_barrier()
    arrived = tl.atomic_add(counter, 1, sem="acq_rel")
    return arrived == target - 1
