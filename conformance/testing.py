"""The same cases under pytest, for engine developers::

    # test_my_engine_conformance.py
    import pytest
    from mxmoe.conformance.testing import case_params, check_case
    from my_engine import MyBackend

    @pytest.mark.parametrize("case", case_params(MyBackend, levels=["L1"], dtypes=["bfloat16"]))
    def test_conformance(case):
        check_case(MyBackend, case, device="cuda")

Each case is one test (its id is the case id); a failure's assertion message is the suite's, with
the failing example and the seed to replay it. A case that cannot run here (a CUDA-graph case on a CPU)
is a pytest skip with the reason. The real-shape cases are in the grid where CUDA is available and left
out elsewhere, unless ``shapes`` says otherwise (see :func:`cases`).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from mxmoe.core.backend import Backend, dtype_name, parse_dtype

from .case import PROFILES, Case, Ctx, Status
from .runner import DEFAULT_LEVELS, build_grid, resolve_instance, run_case

# Seed for pytest runs: fixed unless MXMOE_CONFORMANCE_SEED says otherwise (then printed on failure).
SEED = int(os.environ.get("MXMOE_CONFORMANCE_SEED", "0"))


def cases(backend: Backend | type[Backend], levels: Sequence[str] = DEFAULT_LEVELS, dtypes: Sequence[str] | None = None,
          profile: str = "quick", shapes: str = "auto") -> list[Case]:
    """The grid for ``backend`` (inside its claims); ``shapes="small"`` without the real-shape cases,
    ``shapes="real"`` only those, ``"all"`` both; ``"auto"`` (default): all where CUDA is available, else
    small (on a CPU the real shapes take minutes for the reference and hours in an interpreter; run them on
    the CPU with ``shapes="all"`` or ``"real"`` explicitly)."""
    if shapes == "auto":
        shapes = "all" if torch.cuda.is_available() else "small"
    engine = resolve_instance(backend)
    dtypes = [dtype_name(parse_dtype(d)) for d in (dtypes or engine.capabilities.dtypes)]
    grid = build_grid(engine, levels=[lv.upper() for lv in levels], dtypes=dtypes, profile=PROFILES[profile])
    if shapes == "small":
        grid = [c for c in grid if not c.real_shape]
    elif shapes == "real":
        grid = [c for c in grid if c.real_shape]
    elif shapes != "all":
        raise ValueError(f"shapes must be 'all', 'small' or 'real', not {shapes!r}")
    return grid


def case_params(backend, levels=DEFAULT_LEVELS, dtypes=None, profile: str = "quick", shapes: str = "auto"):
    import pytest

    return [pytest.param(c, id=c.id) for c in cases(backend, levels, dtypes, profile, shapes)]


def check_case(backend: Backend | type[Backend], case: Case, device: str | torch.device = "cpu",
               profile: str = "quick", derandomize: bool = True, seed: int = SEED):
    """Run one case; raise AssertionError unless it passes (or is correctly refused as unclaimed)."""
    from mxmoe.backends.reference import TorchBackend

    engine = resolve_instance(backend)
    dtype = parse_dtype(case.dtype or engine.capabilities.dtypes[0])
    ctx = Ctx(engine=engine, oracle=TorchBackend(), dtype=dtype, device=torch.device(device), profile=PROFILES[profile])
    r = run_case(case, ctx, derandomize=derandomize, seed=seed)
    if r.status == Status.NOT_RUN:
        import pytest

        pytest.skip(f"{r.id}: {r.message}")
    if r.status not in (Status.PASS, Status.NOT_SUPPORTED):
        raise AssertionError(f"{r.id}: {r.status.value}: {r.message}\nfailing example: {r.failing_example}\n"
                             + ("derandomized" if derandomize else f"seed {seed}"))
    return r
