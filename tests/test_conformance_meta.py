"""Meta-tests: the suite fails every known-bad engine (tests/bad_engines.py), naming the broken op,
while the reference passes the same cases."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mxmoe.conformance import Status, run_suite

sys.path.insert(0, str(Path(__file__).parent))
import bad_engines  # noqa: E402

# The dtype each bug shows in: most in float32; a wrong output dtype and bf16 accumulation in bfloat16.
DTYPE = {bad_engines.WrongOutputDtype: "bfloat16", bad_engines.AccumulateBf16: "bfloat16"}


@pytest.mark.parametrize("engine", bad_engines.BAD_ENGINES, ids=lambda e: e.name)
def test_bad_engine_is_caught(engine):
    op = engine.BROKEN_OP
    # L0 plus the broken op's level-1 cases (the whole grid runs in the slow test below).
    report = run_suite(engine, levels=["L0", "L1"], dtypes=[DTYPE.get(engine, "float32")], derandomize=True,
                       case_filter=["L0/*", f"L1/{op}/*"])
    failed = [c for c in report.cases if c.status in (Status.FAIL, Status.ERROR)]
    assert not report.summary.passed, f"{engine.name} passed the suite"
    assert failed and all(c.status == Status.FAIL for c in failed), [(c.id, c.message) for c in failed]
    assert all(op in c.message and c.op == op for c in failed), [(c.id, c.message) for c in failed]


@pytest.mark.slow
@pytest.mark.parametrize("engine", bad_engines.BAD_ENGINES, ids=lambda e: e.name)
def test_bad_engine_whole_suite(engine):
    report = run_suite(engine, levels=["L0", "L1", "L2", "L3"], dtypes=[DTYPE.get(engine, "float32")], derandomize=True)
    assert not report.summary.passed
    l1 = [c for c in report.cases if c.level in ("L0", "L1") and c.status != Status.PASS and c.status != Status.NOT_SUPPORTED]
    assert l1 and all(c.op == engine.BROKEN_OP for c in l1), [(c.id, c.message[:100]) for c in l1]
