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
    if engine is bad_engines.WindowDroppedSplitKV:
        assert [c.name for c in failed] == ["long_decode_d64"]
    if engine in (bad_engines.ExpertsNoMlp1Bias, bad_engines.ExpertsNoMlp2Bias):  # not blamed on dequantization
        assert not any("dequant" in c.name or "scale_extremes" in c.name for c in failed)


@pytest.mark.slow
@pytest.mark.parametrize("engine", bad_engines.BAD_ENGINES, ids=lambda e: e.name)
def test_bad_engine_whole_suite(engine):
    report = run_suite(engine, levels=["L0", "L1", "L2", "L3"], dtypes=[DTYPE.get(engine, "float32")], derandomize=True)
    assert not report.summary.passed
    l1 = [c for c in report.cases if c.level in ("L0", "L1") and c.status != Status.PASS and c.status != Status.NOT_SUPPORTED]
    assert l1 and all(c.op == engine.BROKEN_OP for c in l1), [(c.id, c.message[:100]) for c in l1]


# ---- level 2/3 bounds in bfloat16: tight enough to catch bugs, loose enough for honest engines ------------

@pytest.mark.parametrize("engine", [bad_engines.RopeDecodeOffByOne, bad_engines.ExpertsNoMlp2Bias,
                                    bad_engines.ExpertsNoMlp1Bias], ids=lambda e: e.name)
def test_composed_levels_catch_bugs_in_bfloat16(engine):
    report = run_suite(engine, levels=["L2", "L3"], dtypes=["bfloat16"], derandomize=True,
                       case_filter=["L2/block/*", "L3/model/logits", "L3/model/incremental_decode"])
    failed = {c.level for c in report.cases if c.status == Status.FAIL}
    assert failed == {"L2", "L3"}, [(c.id, c.status, c.ratio) for c in report.cases]


def test_bfloat16_model_bounds_are_meaningful():
    import math

    from mxmoe.backends.reference import TorchBackend

    report = run_suite(TorchBackend, levels=["L3"], dtypes=["bfloat16"], derandomize=True,
                       case_filter=["L3/model/logits", "L3/model/greedy"])
    assert report.summary.passed
    logits = next(c for c in report.cases if c.name == "logits")
    assert logits.metrics["kl_bound_at_worst"] < 0.1 * math.log(512)  # far below KL's ceiling ln(V)
    assert logits.bound < 0.25 * logits.metrics["logit_scale"]
    greedy = next(c for c in report.cases if c.name == "greedy")
    assert greedy.bound < 0.5 * logits.metrics["logit_scale"]


import honest_engines  # noqa: E402


@pytest.mark.parametrize("engine", honest_engines.HONEST_ENGINES, ids=lambda e: e.name)
def test_honest_alternative_engines_conform(engine):
    report = run_suite(engine, levels=["L1", "L2", "L3"], dtypes=["float32", "bfloat16"], derandomize=True,
                       case_filter=["L1/attention/*", "L1/experts/*", "L2/*", "L3/model/logits",
                                    "L3/model/incremental_decode"])
    assert report.summary.passed, [(c.id, c.message[:200]) for c in report.cases if c.status != Status.PASS]
    assert max(c.ratio or 0 for c in report.cases) < 0.5
