"""Blocks (L2) and the model (L3) for engines that serve only some ops: the ops they do not claim are served by
the companion (the reference engine, same dtype and device), as users run such engines next to another.

An honest experts-only engine certifies its blocks and models with the companion's ops listed; known-bad
experts-only engines fail there (not only at L1); an engine that claims none of a case's ops still has to
refuse it; claims of the engine's own ops (dtype, properties) are still enforced; engines that claim every op
run alone, exactly as before."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mxmoe.backends.reference import TorchBackend
from mxmoe.conformance import Status, run_suite
from mxmoe.conformance.case import PROFILES, serving
from mxmoe.conformance.report import markdown, write
from mxmoe.conformance.runner import build_grid
from mxmoe.core.backend import OPS

sys.path.insert(0, str(Path(__file__).parent))
import bad_engines  # noqa: E402
import honest_engines  # noqa: E402

_CAPS = TorchBackend.capabilities
EXPERTS_ONLY = _CAPS.model_copy(update={"ops": ("experts",)})
SMALL_L23 = ["L2/block/attention", "L2/block/attention_windowed", "L2/block/moe", "L3/model/*"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # many small float64 ops (see test_conformance)
    yield
    torch.set_num_threads(n)


def _only_experts(base, name, **claims):
    """``base`` (an engine class) claiming the experts op alone (and ``claims``)."""
    return type(name, (base,), {"name": "companion-test-" + name.lower(),
                                "capabilities": EXPERTS_ONLY.model_copy(update=claims)})


# Honest: the gathered-experts engine (sorted by expert, fp32 GEMMs, intermediates in the activation dtype).
GatheredExpertsOnly = _only_experts(honest_engines.GatheredExperts, "GatheredExpertsOnly")
# Honest, and it keeps neither sinks nor windows (tokens of attention, which the companion serves).
ExpertsOnlyNoAttentionClaims = _only_experts(TorchBackend, "ExpertsOnlyNoAttentionClaims", attention_sinks=False,
                                             sliding_window=False, head_dims=(64,))


class SlotWeightsReversed(TorchBackend):
    """Known-bad: the routing weights applied to the wrong slots (slot j gets slot k-1-j's weight)."""

    name = "companion-test-slot-weights-reversed"
    capabilities = EXPERTS_ONLY

    def experts(self, x, expert_weights, expert_indices, experts, swiglu_alpha, swiglu_limit):
        return super().experts(x, expert_weights.flip(-1), expert_indices, experts, swiglu_alpha, swiglu_limit)


NoMlp2BiasOnly = _only_experts(bad_engines.ExpertsNoMlp2Bias, "NoMlp2BiasOnly")


def _by_id(report):
    return {c.id.split("@")[0]: c for c in report.cases}


def test_honest_experts_only_engine_passes_blocks_and_models_with_the_companion(tmp_path):
    report = run_suite(GatheredExpertsOnly, levels=["L2", "L3"], dtypes=["float32", "bfloat16"], derandomize=True,
                       shapes="small")
    bad = [(c.id, c.status, c.message[:200]) for c in report.cases if c.status in (Status.FAIL, Status.ERROR)]
    assert report.summary.passed, bad
    small = [c for c in report.cases if not c.real_shape]
    for c in small:
        if c.name.startswith("attention"):  # no op of the attention block is claimed: refused, as before
            assert c.status == Status.NOT_SUPPORTED and c.companion is None and "op 'attention'" in c.unclaimed
            assert "raised NotSupported" in c.message
        elif c.name == "cuda_graph_decode":  # a property the engine does not claim: not checked
            assert c.status == Status.NOT_SUPPORTED and "not checked" in c.message
        else:
            assert c.status == Status.PASS and c.ratio is not None and c.ratio <= 1, (c.id, c.message)
            want = ["rms_norm", "router"] if c.level == "L2" else [op for op in OPS if op != "experts"]
            assert c.companion is not None and c.companion.ops == want and c.companion.backend == "torch", c.id
    assert {c.name for c in small if c.status == Status.PASS} >= {"moe", "logits", "incremental_decode",
                                                                   "batch_vs_alone", "greedy", "determinism",
                                                                   "determinism_fresh_model"}
    # The real-shape MoE layers are NOT_RUN under shapes="small", and record no companion (they did not run).
    assert all(c.status == Status.NOT_RUN for c in report.cases if c.real_shape)
    # The report says which ops came from the companion: JSON, markdown.
    j, m = write(report, tmp_path / "r")
    data = json.loads(j.read_text())
    assert data["schema_version"] == "1.2.0"
    moe = next(c for c in data["cases"] if c["id"] == "L2/block/moe@float32")
    assert moe["companion"] == {"backend": "torch", "version": TorchBackend.version, "ops": ["rms_norm", "router"]}
    assert next(c for c in data["cases"] if c["id"] == "L2/block/attention@float32")["companion"] is None
    md = m.read_text()
    assert "companion: rms_norm, router (torch)" in md
    assert "companion: embedding, rms_norm, linear, rope, attention, router (torch)" in md
    assert "| companion | `torch`" in md


def test_tokens_of_companion_ops_are_not_the_engines():
    """Sinks, windows and head dims belong to attention: an experts-only engine that claims none of them still
    runs (and passes) the model; the tokens of its own op (dtype, experts, top-k, format) it must claim."""
    eng = ExpertsOnlyNoAttentionClaims()
    grid = build_grid(eng, levels=["L3"], dtypes=["float32"], profile=PROFILES["smoke"])
    logits = next(c for c in grid if c.name == "logits")
    s = serving(logits, eng.capabilities, _CAPS, "cpu")
    assert s.companion_ops == tuple(op for op in OPS if op != "experts")
    attention_tokens = ("sinks", "sliding_window", "head_dim", "op:rms_norm", "op:router")
    assert not any(t.startswith(attention_tokens) for t in s.requires), s.requires
    assert "op:experts" in s.requires and "dtype:float32" in s.requires and "mxfp4" in s.requires
    assert any(t.startswith("experts:") for t in s.requires) and any(t.startswith("experts_per_token:")
                                                                   for t in s.requires)
    assert "sinks" in logits.requires and "op:rms_norm" in logits.requires  # the case needs them (from the companion)
    report = run_suite(ExpertsOnlyNoAttentionClaims, levels=["L3"], dtypes=["float32"], derandomize=True,
                       profile="smoke", case_filter=["L3/model/logits"])
    assert [c.status for c in report.cases] == [Status.PASS], [c.message for c in report.cases]


@pytest.mark.parametrize("engine", [SlotWeightsReversed, NoMlp2BiasOnly], ids=lambda e: e.name)
def test_bad_experts_only_engines_fail_blocks_and_models(engine):
    for dtype in ("float32", "bfloat16"):
        report = run_suite(engine, levels=["L2", "L3"], dtypes=[dtype], derandomize=True, profile="smoke",
                           case_filter=["L2/block/moe", "L3/model/logits", "L3/model/incremental_decode"])
        by = _by_id(report)
        assert not report.summary.passed
        for cid in ("L2/block/moe", "L3/model/logits"):
            c = by[cid]
            assert c.status == Status.FAIL and c.companion is not None, (dtype, cid, c.status, c.ratio, c.message)
            assert "experts" not in c.companion.ops


def test_an_engine_that_claims_none_of_a_cases_ops_must_still_refuse():
    """The refusal check is unchanged: claiming none of a block's ops, the engine alone is asked for all of them
    and must raise NotSupported; one that returns numbers fails."""
    Unchecking = type("Unchecking", (TorchBackend,), {"name": "companion-test-unchecking", "enforce_claims": False,
                                                      "capabilities": EXPERTS_ONLY})
    report = run_suite(Unchecking, levels=["L2"], dtypes=["float32"], derandomize=True, profile="smoke",
                       case_filter=["L2/block/attention", "L2/block/moe"])
    by = _by_id(report)
    att = by["L2/block/attention"]
    assert att.status == Status.FAIL and att.companion is None
    assert "returned numbers instead of raising NotSupported" in att.message
    assert by["L2/block/moe"].status == Status.PASS and by["L2/block/moe"].companion.ops == ["rms_norm", "router"]


def test_the_engines_own_claims_still_hold_with_a_companion():
    # dtype: an experts-only engine claiming bfloat16 alone must refuse a float32 block (it does, in its op).
    Bf16 = _only_experts(TorchBackend, "Bf16ExpertsOnly", dtypes=("bfloat16",))
    report = run_suite(Bf16, levels=["L2"], dtypes=["float32"], derandomize=True, profile="smoke",
                       case_filter=["L2/block/moe"])
    c = report.cases[0]
    assert c.status == Status.NOT_SUPPORTED and c.unclaimed == "dtype float32", c.unclaimed
    assert f"backend {Bf16.name!r} does not support dtype float32" in c.message, c.message
    # determinism: the engine's claim, checked with the (bitwise-deterministic) companion serving the rest.

    class NoisyExperts(TorchBackend):
        name = "companion-test-noisy-experts"
        capabilities = EXPERTS_ONLY.model_copy(update={"determinism": "run_to_run"})

        def experts(self, *a):
            y = super().experts(*a)
            return y + torch.rand_like(y) * 1e-6 * y.abs()

    report = run_suite(NoisyExperts, levels=["L3"], dtypes=["float32"], derandomize=True, profile="smoke",
                       case_filter=["L3/model/determinism*"])
    by = _by_id(report)
    assert by["L3/model/determinism"].status == Status.FAIL and "determinism" in by["L3/model/determinism"].message
    assert by["L3/model/determinism_fresh_model"].status == Status.NOT_SUPPORTED  # claims run_to_run only
    none = _only_experts(TorchBackend, "NoDeterminism", determinism="none")
    report = run_suite(none, levels=["L3"], dtypes=["float32"], derandomize=True, profile="smoke",
                       case_filter=["L3/model/determinism"])
    assert report.cases[0].status == Status.NOT_SUPPORTED and "not checked" in report.cases[0].message


def test_a_companion_never_makes_an_engine_capturable():
    """cuda_graph_decode needs the engine's claim, and the companion (not capturable) never serves it: an
    experts-only engine claiming CUDA graphs gets the case as before (refused off its ops; NOT_RUN on a CPU)."""
    Graphs = _only_experts(TorchBackend, "GraphsExpertsOnly", cuda_graphs=True)
    eng = Graphs()
    case = next(c for c in build_grid(eng, levels=["L3"], dtypes=["float32"], profile=PROFILES["smoke"])
                if c.name == "cuda_graph_decode")
    for device in ("cpu", "cuda"):
        s = serving(case, eng.capabilities, _CAPS, device)
        assert s.companion_ops == () and s.requires == case.requires and "CUDA-graph capture" in s.note
    report = run_suite(Graphs, levels=["L3"], dtypes=["float32"], derandomize=True, profile="smoke",
                       case_filter=["L3/model/cuda_graph_decode"])
    c = report.cases[0]
    assert c.status == Status.NOT_RUN and c.companion is None and "companion cannot serve" in c.unclaimed


def _triton():
    from mxmoe.backends.triton_engine import TritonBackend

    return TritonBackend


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_engines_that_claim_every_op_run_alone(name):
    """Full engines: the same requirements as before, no companion (their results are unchanged)."""
    eng = (TorchBackend if name == "torch" else _triton())()
    grid = build_grid(eng, levels=["L2", "L3"], dtypes=list(eng.capabilities.dtypes), profile=PROFILES["quick"])
    assert grid and all(c.companion for c in grid)
    for c in grid:
        s = serving(c, eng.capabilities, _CAPS, eng.capabilities.devices[0])
        assert s.companion_ops == () and s.requires == c.requires, c.id
    if name == "torch":
        report = run_suite(TorchBackend, levels=["L2", "L3"], dtypes=["float32"], derandomize=True, profile="smoke",
                           case_filter=["L2/block/moe", "L3/model/logits"])
        assert report.summary.passed and all(c.companion is None for c in report.cases)
        assert "companion" not in markdown(report)


def test_megablocks_blocks_and_models_pass_on_the_cpu():
    from mxmoe.backends.megablocks import MegaBlocksBackend

    if "attention" in MegaBlocksBackend.capabilities.ops:
        pytest.skip("megablocks claims attention here (a GPU): this checks its CPU claims")
    report = run_suite(MegaBlocksBackend, levels=["L2", "L3"], dtypes=["float32", "bfloat16"], derandomize=True,
                       profile="smoke", shapes="small", case_filter=SMALL_L23)
    assert report.summary.passed, [(c.id, c.message[:200]) for c in report.cases]
    by = {c.id: c for c in report.cases}
    for dt in ("float32", "bfloat16"):
        moe = by[f"L2/block/moe@{dt}"]
        assert moe.status == Status.PASS and moe.companion.ops == ["rms_norm"]
        for name in ("logits", "incremental_decode", "batch_vs_alone", "greedy", "determinism",
                     "determinism_fresh_model"):
            c = by[f"L3/model/{name}@{dt}"]
            assert c.status == Status.PASS, (c.id, c.message)
            assert c.companion.ops == ["embedding", "rms_norm", "linear", "rope", "attention"]
        assert by[f"L2/block/attention@{dt}"].status == Status.NOT_SUPPORTED  # none of its ops on a CPU
