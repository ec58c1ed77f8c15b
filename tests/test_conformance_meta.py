"""Meta-tests: the suite fails every known-bad engine (tests/bad_engines.py), naming the broken op, in the
dtypes its bug shows in; it certifies honest engines that compute differently (tests/honest_engines.py)
and honest engines with narrower claims, which get NOT_SUPPORTED rows where their claims end, never FAIL."""

from __future__ import annotations

import fnmatch
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from mxmoe.conformance import Status, run_suite
from mxmoe.core.backend import Backend

sys.path.insert(0, str(Path(__file__).parent))
import bad_engines  # noqa: E402
import honest_engines  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # many small float64 ops: a second intra-op thread only waits (see test_conformance)
    yield
    torch.set_num_threads(n)


def _failed(report):
    return [c for c in report.cases if c.status in (Status.FAIL, Status.ERROR)]


@pytest.mark.parametrize("engine,dtype", [(e, dt) for e in bad_engines.BAD_ENGINES for dt in e.DTYPES],
                         ids=lambda v: v if isinstance(v, str) else v.name)
def test_bad_engine_is_caught(engine, dtype):
    op = engine.BROKEN_OP
    # L0 plus the broken op's level-1 cases (the real-shape ones only for bugs that need gpt-oss's sizes).
    if engine.REAL_SHAPE:
        flt, shapes = ["L0/*", f"L1/{op}/*_real*", f"L1/{op}/long_reduction*"], "all"
    else:
        flt, shapes = ["L0/*", f"L1/{op}/*"], "small"
    report = run_suite(engine, levels=["L0", "L1"], dtypes=[dtype], derandomize=True, case_filter=flt, shapes=shapes)
    failed = _failed(report)
    assert not report.summary.passed, f"{engine.name} passed the suite"
    assert failed and all(c.status == Status.FAIL for c in failed), [(c.id, c.message) for c in failed]
    # (the L0 interface checks name the op in their message)
    assert all(op in c.message and c.op in (op, "interface") for c in failed), [(c.id, c.message) for c in failed]
    names = {c.name for c in failed if c.level == "L1"}
    if engine is bad_engines.WindowDroppedSplitKV:
        assert names == {"long_decode_windowed_d64"}
    if engine in (bad_engines.ExpertsNoMlp1Bias, bad_engines.ExpertsNoMlp2Bias):  # not blamed on dequantization
        assert not any("dequant" in n or "scale_extremes" in n or "every_byte" in n for n in names)
    if engine is bad_engines.RmsNormBf16SumSquares:  # the promise "computed in at least float32" is enforced
        assert names == {"random"}
    if engine is bad_engines.SwigluGateClampBothSides:
        assert "swiglu_negative_gate" in names
    if engine is bad_engines.E8M0ExponentBits:
        assert names == {"mxfp4_e8m0_every_byte"}  # bytes 0 and 255 only
    if engine is bad_engines.AttentionIndex16Bit:
        assert names <= {"long_decode_real_d64", "long_decode_real_windowed_d64"}
    if engine in (bad_engines.UnclaimedReturnsNumbers, bad_engines.UnclaimedContextReturnsNumbers):
        assert all("not claimed" in c.message and "instead of raising NotSupported" in c.message
                   or "returned instead of raising NotSupported" in c.message for c in failed)


def test_precision_bugs_pass_where_they_are_honest():
    """The 16-bit precision bugs are no bugs in float32 (they compute in the activation dtype): the bounds
    catch the broken promise, not the computation style."""
    for engine in (bad_engines.RmsNormBf16SumSquares, bad_engines.ExpertsAccumulateBf16,
                   bad_engines.AttentionDenominatorBf16, bad_engines.RopeAngleBf16):
        flt = {"experts": ["L1/experts/long_reduction*"], "attention": ["L1/attention/long_sum*"]}.get(
            engine.BROKEN_OP, [f"L1/{engine.BROKEN_OP}/*"])
        report = run_suite(engine, levels=["L1"], dtypes=["float32"], derandomize=True, case_filter=flt)
        assert report.summary.passed, (engine.name, [(c.id, c.message[:120]) for c in _failed(report)])


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MXMOE_CONFORMANCE_FULL", "") != "1",
                    reason="every bad engine through all of L0-L1 (~2 min of CPU): set MXMOE_CONFORMANCE_FULL=1")
@pytest.mark.parametrize("engine", [e for e in bad_engines.BAD_ENGINES if not e.REAL_SHAPE], ids=lambda e: e.name)
def test_bad_engine_whole_suite(engine):
    """Every level-0/1 case that does not pass blames the broken op (no false failures elsewhere)."""
    report = run_suite(engine, levels=["L0", "L1"], dtypes=[engine.DTYPES[0]], derandomize=True, shapes="small")
    assert not report.summary.passed
    # An engine that inherits the default add_rms_norm (API 1.2) composes it from its broken rms_norm.
    blamed = {engine.BROKEN_OP} | ({"add_rms_norm"} if engine.BROKEN_OP == "rms_norm"
                                   and engine.add_rms_norm is Backend.add_rms_norm else set())
    l1 = [c for c in report.cases if c.status in (Status.FAIL, Status.ERROR, Status.WAIVED)]
    assert l1 and all(c.op in blamed or c.op == "interface" and engine.BROKEN_OP in c.message
                      for c in l1), [(c.id, c.message[:100]) for c in l1]


# ---- level 2/3 bounds in bfloat16: tight enough to catch bugs, loose enough for honest engines ------------

@pytest.mark.parametrize("engine", [bad_engines.RopeDecodeOffByOne, bad_engines.ExpertsNoMlp2Bias,
                                    bad_engines.ExpertsNoMlp1Bias], ids=lambda e: e.name)
def test_composed_levels_catch_bugs_in_bfloat16(engine):
    report = run_suite(engine, levels=["L2", "L3"], dtypes=["bfloat16"], derandomize=True,
                       case_filter=["L2/block/*", "L3/model/logits", "L3/model/incremental_decode"], shapes="small")
    failed = {c.level for c in report.cases if c.status == Status.FAIL}
    assert failed == {"L2", "L3"}, [(c.id, c.status, c.ratio) for c in report.cases]


def test_bfloat16_model_bounds_are_meaningful():
    from mxmoe.backends.reference import TorchBackend

    report = run_suite(TorchBackend, levels=["L3"], dtypes=["bfloat16"], derandomize=True,
                       case_filter=["L3/model/logits", "L3/model/greedy"])
    assert report.summary.passed
    logits = next(c for c in report.cases if c.name == "logits")
    assert logits.metrics["kl_bound_at_worst"] < 0.1 * math.log(512)  # far below KL's ceiling ln(V)
    assert logits.bound < 0.25 * logits.metrics["logit_scale"]
    greedy = next(c for c in report.cases if c.name == "greedy")
    assert greedy.bound < 0.5 * logits.metrics["logit_scale"]


# ---- honest engines ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", honest_engines.HONEST_ENGINES, ids=lambda e: e.name)
def test_honest_alternative_engines_conform(engine):
    report = run_suite(engine, levels=["L1", "L2", "L3"], dtypes=["float32", "bfloat16"], derandomize=True,
                       case_filter=["L1/attention/*", "L1/experts/*", "L2/*", "L3/model/logits",
                                    "L3/model/incremental_decode"], shapes="small")
    assert report.summary.passed, [(c.id, c.message[:200]) for c in _failed(report)]
    assert max(c.ratio or 0 for c in report.cases) < 0.5


# The levels each narrow engine runs (its claims' both sides live there); L1 long contexts are the costly part.
_NARROW_FILTER = {
    honest_engines.MaxContext8192: ["L0/*", "L1/attention/*", "L1/rope/*"],
    honest_engines.MaxExperts32: ["L0/*", "L1/router/*", "L1/experts/*", "L2/*", "L3/model/logits"],
    honest_engines.TopK2: ["L0/*", "L1/router/*", "L1/experts/*", "L2/*", "L3/model/logits"],
    honest_engines.DenseExpertsOnly: ["L0/*", "L1/experts/*", "L2/*", "L3/*"],
    honest_engines.Mxfp4Only: ["L0/*", "L1/experts/*", "L2/block/moe*", "L3/model/logits"],
    honest_engines.AttentionOnly: ["L0/*", "L1/*", "L2/*", "L3/model/logits"],
}


@pytest.mark.parametrize("engine", honest_engines.NARROW_ENGINES, ids=lambda e: e.name)
def test_narrow_claims_certify_with_not_supported_where_they_end(engine):
    """Claims narrowed in the manifest alone (the base class enforces them): every case drawn inside them
    passes, the other side of each is NOT_SUPPORTED (its input really lies outside: e.g. 8193 keys for
    max_context=8192), and no case FAILs. The real-shape cases are left out here (see test_conformance)."""
    caps = engine.capabilities
    dtype = "bfloat16" if "bfloat16" in caps.dtypes else caps.dtypes[0]
    report = run_suite(engine, levels=["L0", "L1", "L2", "L3"], dtypes=[dtype], derandomize=True, shapes="small",
                       case_filter=_NARROW_FILTER.get(engine))
    assert report.summary.passed, [(c.id, c.message[:200]) for c in _failed(report)]
    refused = [c.id for c in report.cases if c.status == Status.NOT_SUPPORTED]
    for pattern in honest_engines.EXPECT_REFUSED[engine]:
        assert any(fnmatch.fnmatchcase(i, pattern) for i in refused), (pattern, refused)
    ran = [c for c in report.cases if c.status == Status.PASS]
    assert ran, "nothing ran inside the claims"
    if engine is honest_engines.MaxContext8192:  # the claim's own boundary runs, and passes
        assert any(c.name == "long_decode_d64" and "context:8192" in c.requires for c in ran)
    if engine is honest_engines.MaxExperts32:
        assert any(c.name == "random" and c.op == "router" and "experts:32" in c.requires for c in ran)


# ---- CUDA graphs: only a GPU can check the claim (on a CPU the case is NOT_RUN, see test_conformance) --------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuda_graphs claim is checked on a CUDA device only")
def test_cuda_graph_claim_on_gpu():
    honest = run_suite(honest_engines.StaticShapes, levels=["L3"], dtypes=["float32", "bfloat16"], device="cuda",
                       derandomize=True, case_filter=["L3/model/cuda_graph_decode"])
    assert [c.status for c in honest.cases] == [Status.PASS] * 2, [c.message for c in honest.cases]
    bad = run_suite(bad_engines.GraphHostSync, levels=["L3"], dtypes=["float32"], device="cuda", derandomize=True,
                    case_filter=["L3/model/cuda_graph_decode"])
    assert [c.status for c in bad.cases] == [Status.ERROR] and not bad.summary.passed, [c.message for c in bad.cases]
