"""mxmoe.conformance — the suite every engine must pass, and the certificate it produces.

    from mxmoe.conformance import run_suite
    report = run_suite(MyBackend, levels=["L0", "L1"], device="cuda", derandomize=True)
    report.summary.passed

Levels: L0 interface, L1 ops, L2 blocks, L3 model (small random checkpoints), L4 real weights
(optional). The oracle is the reference engine in float64 on the CPU; bounds are derived in
:mod:`mxmoe.conformance.tolerances`. Every case draws inside the engine's claims, and each claim's
other side is checked with an input outside it. Cases at gpt-oss's real sizes (``real_shape``) always
run on a GPU; ``shapes="small"`` leaves them out elsewhere (NOT_RUN: no certificate). Command line:
``mxmoe conformance --backend NAME``.
"""

SUITE_VERSION = "1.2.0"  # 1.1: cases inside the claims and refusals outside, real shapes, NOT_RUN; 1.2: add_rms_norm

from .case import Case, Status  # noqa: E402
from .runner import DEFAULT_LEVELS, LEVELS, load_waivers, run_suite  # noqa: E402

__all__ = ["SUITE_VERSION", "Case", "Status", "DEFAULT_LEVELS", "LEVELS", "load_waivers", "run_suite"]
