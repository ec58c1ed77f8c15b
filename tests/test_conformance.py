"""The conformance suite on the reference engine: every case passes in float32 and bfloat16 (each case one
pytest test, derandomized), the real-shape cases (slow), the report and its schema, the CLI's exit codes,
fail-fast, the small-shape run that is no certificate, waivers; and what a vendor trips over (issue 8,
part 4): claims enforced by the base class, ties under ``auto``, the public prepared-experts type."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mxmoe.backends.reference import TorchBackend
from mxmoe.conformance import Status, run_suite
from mxmoe.conformance.report import SCHEMA_PATH, Report, console_table, markdown, schema_text, write
from mxmoe.conformance.testing import case_params, cases, check_case
from mxmoe.core.backend import OPS, Backend, Capabilities, Experts, NotSupported
from mxmoe.core.cli import main as cli_main

sys.path.insert(0, str(Path(__file__).parent))
import bad_engines  # noqa: E402,F401
import honest_engines  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Many small float64 ops: a second intra-op thread only waits on the first (and stalls for a whole
    # scheduler slice whenever the CPU is shared).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("case", case_params(TorchBackend, dtypes=["float32", "bfloat16"], shapes="small"))
def test_reference_passes(case):
    r = check_case(TorchBackend, case)
    assert r.status in (Status.PASS, Status.NOT_SUPPORTED), r.message
    if r.status == Status.NOT_SUPPORTED:  # only properties the reference does not claim
        assert "not checked" in r.message and any(t in r.unclaimed for t in ("4-bit", "CUDA-graph")), r.message
    if not case.exact and r.ratio is not None:
        assert r.ratio <= 1.0


# The cases at gpt-oss's real sizes (one layer of 20b and 120b, the true vocabulary, 64-sequence decode
# batches, contexts past 32k, experts at 2880 and 4096+ reductions). Two run by default (~10 s of CPU);
# the rest, about 2 minutes of CPU in bfloat16, with MXMOE_CONFORMANCE_FULL=1 (and on every GPU run of
# `mxmoe conformance`, where they always run).
FULL = os.environ.get("MXMOE_CONFORMANCE_FULL", "") == "1"
_REAL = case_params(TorchBackend, levels=["L1", "L2"], dtypes=["bfloat16"], shapes="real")
_REAL_DEFAULT = {"L2/block/attention_gpt-oss@bfloat16", "L1/attention/long_decode_real_windowed_d64@bfloat16"}


@pytest.mark.parametrize("case", [p for p in _REAL if p.id in _REAL_DEFAULT])
def test_reference_passes_real_shapes_sample(case):
    r = check_case(TorchBackend, case)
    assert r.status == Status.PASS and r.ratio is not None and r.ratio <= 1.0, r.message


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="the real-shape certification of the reference (~2 min of CPU): "
                                     "set MXMOE_CONFORMANCE_FULL=1")
@pytest.mark.parametrize("case", [p for p in _REAL if p.id not in _REAL_DEFAULT])
def test_reference_passes_real_shapes(case):
    r = check_case(TorchBackend, case)
    assert r.status == Status.PASS, r.message
    assert r.ratio is not None and r.ratio <= 1.0


def test_real_shape_cases_exist_for_both_models():
    ids = {c.id for c in cases(TorchBackend, levels=["L1", "L2"], dtypes=["bfloat16"], shapes="real")}
    for want in ("L2/block/moe_gpt-oss-20b@bfloat16", "L2/block/moe_gpt-oss-120b@bfloat16",
                 "L2/block/attention_gpt-oss@bfloat16", "L2/block/attention_windowed_gpt-oss@bfloat16",
                 "L1/linear/unembedding@bfloat16", "L1/attention/decode_batch_d64@bfloat16",
                 "L1/attention/long_decode_real_d64@bfloat16", "L1/attention/long_decode_real_windowed_d64@bfloat16"):
        assert want in ids, sorted(ids)
    long = next(c for c in cases(TorchBackend, levels=["L1"], dtypes=["bfloat16"], shapes="real")
                if c.name == "long_decode_real_d64")
    assert [e["seqs"][0][0] + 1 for e in long.examples] == [33068, 131072]  # past 32k, up to gpt-oss's maximum
    moe = next(c for c in cases(TorchBackend, levels=["L2"], dtypes=["bfloat16"], shapes="real")
               if c.name == "moe_gpt-oss-120b")
    assert "experts:128" in moe.requires and moe.examples[0]["new"] == [300]


def test_every_op_of_the_interface_has_level_1_cases():
    """An op the interface gains (a fused op, say) must come with cases, or no engine could claim it (L0's
    claims_exercised would fail)."""
    grid = cases(TorchBackend, levels=["L1"], dtypes=["float32"])
    for op in OPS:
        assert any(c.op == op and f"op:{op}" in c.requires for c in grid), op


def test_schema_file_is_up_to_date():
    assert SCHEMA_PATH.read_text() == schema_text(), "run: python -m mxmoe.conformance.report"


def test_report_json_markdown_console(tmp_path):
    report = run_suite(TorchBackend, levels=["L0", "L1"], dtypes=["float32"], seed=123,
                       case_filter=["L0/*", "L1/rms_norm/*", "L1/experts/mxfp4_dequant_mlp1*"])
    assert report.summary.passed and not report.summary.certified
    assert report.run.seed == 123 and not report.run.derandomize
    assert set(report.summary.levels) == {"L0", "L1"} and report.summary.levels["L1"].duration_s > 0
    assert report.summary.levels["L1"].counts == {"PASS": 2}
    j, m = write(report, tmp_path / "cert")
    again = Report.model_validate_json(j.read_text())
    assert again.capabilities_sha256 == report.capabilities_sha256
    assert again.backend.name == "torch" and again.backend_api_version
    data = json.loads(j.read_text())
    case = next(c for c in data["cases"] if c["id"].startswith("L1/rms_norm"))
    assert case["status"] == "PASS" and case["bound"] > 0 and case["observed"] is not None
    assert data["summary"]["levels"]["L1"]["duration_s"] > 0
    md = m.read_text()
    assert "CONFORMS, NOT CERTIFIED" in md and "L1/rms_norm/random@float32" in markdown(report)
    assert "## Levels" in md and "| L1 |" in md and "seeded run" in md
    table = console_table(report)
    assert "CONFORMS, NOT CERTIFIED" in table and "per level: L0" in table and "L1 " in table


def test_cli_exit_codes_fail_fast_and_level_times(tmp_path, capsys):
    assert cli_main(["conformance", "--backend", "torch", "--level", "L0", "--dtype", "float32", "-q",
                     "--report", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r.json").exists() and (tmp_path / "r.md").exists()
    assert "L0" in json.loads((tmp_path / "r.json").read_text())["summary"]["levels"]
    capsys.readouterr()
    bad = "bad_engines:RopeInterleaved"
    assert cli_main(["conformance", "--backend", bad, "--level", "L1", "--dtype", "float32", "--case", "L1/rope/*",
                     "--case", "L1/linear/*", "-q", "--seed", "7", "--fail-fast", "--report",
                     str(tmp_path / "ff")]) == 1
    out = capsys.readouterr().out
    assert "rope" in out and "DOES NOT CONFORM" in out and "--seed 7" in out and "per level: L1" in out
    data = json.loads((tmp_path / "ff.json").read_text())
    statuses = [(c["id"].split("/")[1], c["status"]) for c in data["cases"]]
    assert statuses[0] == ("rope", "FAIL") and {s for _, s in statuses[1:]} == {"NOT_RUN"}, statuses
    assert len(statuses) > 2 and all(op == "linear" for op, _ in statuses[1:])
    assert "--fail-fast stopped the run after L1/rope/yarn_d64@float32 failed" in data["cases"][1]["message"]
    assert data["run"]["fail_fast"] is True


def test_small_shapes_run_is_not_a_certificate():
    """--shapes small: the real-shape cases are NOT_RUN (never PASS) and the summary says NOT CERTIFIED, even
    derandomized with the full profile; with every case run, the same filter-free run would be CERTIFIED."""
    r = run_suite(TorchBackend, levels=["L1"], dtypes=["float32"], derandomize=True, profile="full", shapes="small",
                  case_filter=["L1/linear/*"])
    by = {c.name: c for c in r.cases}
    assert by["unembedding"].status == Status.NOT_RUN and by["unembedding"].real_shape
    assert "shapes='small'" in by["unembedding"].message
    assert by["odd_tails"].status == Status.PASS
    assert r.summary.passed and not r.summary.certified and r.summary.verdict == "CONFORMS, NOT CERTIFIED"
    why = " ".join(r.summary.not_certified_because)
    assert "1 real-shape cases excluded by --shapes small" in why and "case filter" in why and "L0" in why
    assert "NOT CERTIFIED" in markdown(r) and "## Not run" in markdown(r)
    with pytest.raises(ValueError, match="real-shape cases always run"):
        run_suite(TorchBackend, levels=["L1"], device="cuda", shapes="small")


def test_a_certificate_covers_every_claimed_dtype_and_runs_split_by_dtype_merge():
    from mxmoe.conformance.report import merge

    def part(dt, **kw):
        return run_suite(TorchBackend, levels=["L0", "L1"], dtypes=[dt], derandomize=True,
                         case_filter=["L0/*", "L1/rms_norm/*"], **kw)

    a, b = part("float32"), part("bfloat16")
    assert a.summary.passed and "claimed dtypes not run: float64, bfloat16, float16" in a.summary.not_certified_because
    m = merge([a, b])
    assert m.run.dtypes == ["float32", "bfloat16"] and m.summary.passed
    assert sum(c.id == "L0/interface/identity" for c in m.cases) == 1  # the dtype-free checks once
    assert {c.id for c in m.cases if c.level == "L1"} == {"L1/rms_norm/random@float32", "L1/rms_norm/random@bfloat16"}
    assert "claimed dtypes not run: float64, float16" in m.summary.not_certified_because
    assert m.summary.levels["L1"].counts == {"PASS": 2}
    with pytest.raises(ValueError, match="overlapping"):
        merge([a, part("float32")])
    with pytest.raises(ValueError, match="differ"):
        merge([a, part("float64", profile="full")])


def test_cuda_graph_case_is_not_run_off_cuda_and_not_checked_when_unclaimed():
    r = run_suite(honest_engines.StaticShapes, levels=["L3"], dtypes=["float32"], derandomize=True,
                  case_filter=["L3/model/cuda_graph_decode"])
    assert [c.status for c in r.cases] == [Status.NOT_RUN] and "CUDA graphs need a CUDA device" in r.cases[0].message
    assert not r.summary.certified and r.summary.verdict != "CERTIFIED"
    r = run_suite(TorchBackend, levels=["L3"], dtypes=["float32"], derandomize=True,
                  case_filter=["L3/model/cuda_graph_decode"])
    assert [c.status for c in r.cases] == [Status.NOT_SUPPORTED] and "not checked" in r.cases[0].message


def test_waivers_turn_failures_into_waived(tmp_path):
    waivers = tmp_path / "waivers.json"
    waivers.write_text(json.dumps({"waivers": [{"case": "L1/rope/*", "reason": "vendor bug #12, fixed in 2.1"}]}))
    r = run_suite(bad_engines.RopeInterleaved, levels=["L1"], dtypes=["float32"], seed=1, case_filter=["L1/rope/*"],
                  waivers=waivers)
    assert r.summary.passed and {c.status for c in r.cases} == {Status.WAIVED}
    assert r.cases[0].waiver_reason == "vendor bug #12, fixed in 2.1"
    waivers.write_text(json.dumps({"waivers": [{"case": "L1/rope/*", "reason": ""}]}))
    with pytest.raises(ValueError, match="reason"):
        run_suite(TorchBackend, levels=["L0"], waivers=waivers)


def test_unclaimed_capability_is_not_supported_not_pass():
    r = run_suite(honest_engines.NoSinks, levels=["L1"], dtypes=["float32"], seed=1,
                  case_filter=["L1/attention/prefill*"])
    assert [c.status for c in r.cases] == [Status.NOT_SUPPORTED]
    assert r.summary.passed and r.summary.counts["PASS"] == 0


def test_crash_is_error_with_the_exception_text():
    class Crashy(TorchBackend):
        name = "crashy"

        def rms_norm(self, x, scale, eps):
            raise RuntimeError("kernel launch failed")

    r = run_suite(Crashy, levels=["L1"], dtypes=["float32"], seed=1, case_filter=["L1/rms_norm/*"])
    assert r.cases[0].status == Status.ERROR and "kernel launch failed" in r.cases[0].message
    assert not r.summary.passed


def test_nondeterminism_is_caught():
    class Noisy(TorchBackend):
        name = "noisy"

        def linear(self, x, layer):
            y = super().linear(x, layer)
            return y + torch.rand_like(y) * 1e-7 * y.abs()

    r = run_suite(Noisy, levels=["L3"], dtypes=["float32"], seed=1, case_filter=["L3/model/determinism*"])
    assert [c.status for c in r.cases] == [Status.FAIL, Status.FAIL], [c.message for c in r.cases]
    assert all("determinism" in c.message for c in r.cases)


# ---- what a vendor trips over (issue 8, part 4) -----------------------------------------------------------

def test_the_base_class_enforces_every_claim_it_can_see():
    """A subclass that only narrows its capabilities refuses outside them in every op and prepare_* method:
    the claims are stated once."""
    class Narrow(TorchBackend):
        name = "narrow"
        capabilities = TorchBackend.capabilities.model_copy(update=dict(
            dtypes=("bfloat16",), head_dims=(64,), sliding_window=False, max_context=100, max_experts=4,
            max_experts_per_token=2, mxfp4="none"))

    b, bf = Narrow(), torch.bfloat16
    from mxmoe.conformance.inputs import generator, random_experts
    from mxmoe.core.batch import Batch

    x32 = torch.randn(3, 64)
    refused = {
        "embedding": lambda: b.embedding(torch.tensor([0, 1]), torch.randn(4, 64)),
        "rms_norm": lambda: b.rms_norm(x32, torch.ones(64), 1e-5),
        "linear": lambda: b.linear(x32, b.prepare_linear(torch.randn(8, 64).bfloat16(), None, bf, "cpu")),
        "prepare_linear": lambda: b.prepare_linear(torch.randn(8, 64).bfloat16(), None, torch.float32, "cpu"),
        "rope": lambda: b.rope(torch.randn(3, 2, 16, dtype=bf), torch.randn(3, 1, 16, dtype=bf), torch.arange(3),
                               torch.ones(8), 1.0),
        "router experts": lambda: b.router(x32.bfloat16(), b.prepare_linear(torch.randn(8, 64).bfloat16(), None, bf,
                                                                               "cpu"), 2),
        "router top-k": lambda: b.router(x32.bfloat16(), b.prepare_linear(torch.randn(4, 64).bfloat16(), None, bf,
                                                                             "cpu"), 3),
        "prepare_experts mxfp4": lambda: b.prepare_experts(random_experts(generator(0), 2, 64, 64, 0.1),
                                                           random_experts(generator(1), 2, 64, 32, 0.1), bf, "cpu"),
        "prepare_experts count": lambda: b.prepare_experts(random_experts(generator(0), 8, 64, 64, 0.1, True),
                                                           random_experts(generator(1), 8, 64, 32, 0.1, True), bf,
                                                           "cpu"),
    }
    q = torch.randn(5, 2, 64, dtype=bf)
    kv = torch.randn(5, 1, 64, dtype=bf)

    def attend(window=0, past=0):
        batch = Batch.build([5], [past], [0], past + 5)
        cache = torch.zeros(1, past + 5, 1, 64, dtype=bf)
        return b.attention(q, kv, kv, torch.zeros(2), cache, cache.clone(), batch, window, 0.125)

    refused["attention window"] = lambda: attend(window=4)
    refused["attention context"] = lambda: attend(past=96)
    for what, call in refused.items():
        with pytest.raises(NotSupported):
            call()
            pytest.fail(f"{what}: no NotSupported")
    assert attend().shape == (5, 2, 64)  # inside the claims it runs
    # An op calling another op of the same engine (the reference's router calls linear) is checked once.
    gate = b.prepare_linear(torch.randn(4, 64).bfloat16(), None, bf, "cpu")
    w, i = b.router(x32.bfloat16(), gate, 2)
    assert w.shape == i.shape == (3, 2)


def test_prepared_experts_have_a_public_type():
    from mxmoe.conformance.inputs import generator, random_experts

    prepared = TorchBackend().prepare_experts(random_experts(generator(0), 2, 64, 64, 0.1),
                                              random_experts(generator(1), 2, 64, 32, 0.1), torch.float32, "cpu")
    assert isinstance(prepared, Experts) and prepared.num_experts == 2
    with pytest.raises(ValueError, match="experts"):
        Experts(random_experts(generator(0), 2, 64, 64, 0.1), random_experts(generator(1), 3, 64, 32, 0.1),
                torch.float32)


def _registry_with(*extra):
    """The discovered registry plus ``extra`` (cls, plugin) backends, as if installed by plugins."""
    import copy

    from mxmoe.plugins import discover
    from mxmoe.plugins.discovery import BackendInfo

    reg = copy.copy(discover())
    reg.infos, reg.classes = list(reg.infos), dict(reg.classes)
    for cls, plugin in extra:
        reg.infos.append(BackendInfo(name=cls.name, version=cls.version, plugin=plugin, cls=f"x:{cls.__name__}",
                                     api_version=cls.api_version, api_compatible=True, priority=cls.priority,
                                     capabilities=cls.capabilities))
        reg.classes[cls.name] = cls
    return reg


def test_auto_ties_go_to_the_builtins_and_are_never_silent():
    from mxmoe.plugins import resolve_backends

    class Vendor(TorchBackend):  # inherits priority 10, name sorts before "torch"
        name = "aaa-vendor"

    res = resolve_backends(None, registry=_registry_with((Vendor, "vendor")), dtype="float32")
    d = res.decision("rms_norm")
    assert d.backend == "torch" and "built-in engines win ties" in d.reason and "aaa-vendor" in d.reason
    assert any(r.backend == "aaa-vendor" and r.kind == "priority_tie" for r in d.rejected)

    class Other(Backend):
        name = "aab-other"
        priority = 10
        capabilities = Capabilities(ops=("rms_norm",))

        def rms_norm(self, x, scale, eps):
            return x

    class Third(Other):
        name = "aac-third"

    reg = _registry_with((Vendor, "vendor"), (Other, "other"), (Third, "third"))
    reg.infos = [i for i in reg.infos if i.name != "torch"]
    reg.classes.pop("torch")
    from mxmoe.plugins.selection import BackendTieWarning

    with pytest.warns(BackendTieWarning, match="tie settled by name order"):
        res = resolve_backends(None, registry=reg, dtype="float32")
    d = res.decision("rms_norm")
    assert d.backend == "aaa-vendor" and "tie settled by name order" in d.reason and d.warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_backends("torch", dtype="float32")  # no tie, no warning


def _registered():
    from mxmoe.plugins import discover

    return [pytest.param(name, id=name) for name in sorted(discover().classes)]


@pytest.mark.parametrize("name", _registered())
def test_every_registered_backend_conforms_on_cpu(name):
    """Every engine the plugin system finds (built-ins and installed plugins) conforms where it runs: the
    interface (L0) and whole tiny models through every op (L3), at the small shapes. The per-op levels are
    each engine's own tests' (test_reference_passes here, tests/test_triton_engine.py, ...): an engine run
    by the Triton interpreter takes tens of minutes for L1-L2 on two CPU cores, and minutes for L3 even with
    the explicit examples alone (the smoke profile, used here). Not a certificate: the
    real-shape cases are NOT_RUN (they are certified on the GPU, and for the reference also in
    test_reference_passes_real_shapes)."""
    from mxmoe.conformance.cli import resolve_backend

    cls, _ = resolve_backend(name)
    probe = cls().probe("cpu")
    if "cpu" not in cls.capabilities.devices or not probe.available:
        pytest.skip(f"{name} does not run on this CPU: {probe.reason or 'cpu not claimed'}")
    dtypes = [d for d in ("float32",) if d in cls.capabilities.dtypes] or [cls.capabilities.dtypes[0]]
    report = run_suite(cls, levels=["L0", "L3"], dtypes=dtypes, derandomize=True, check_registration=True,
                       shapes="small", profile="smoke")
    problems = [(c.id, c.message[:200]) for c in report.cases if c.status in (Status.FAIL, Status.ERROR)]
    assert report.summary.passed, problems
    assert not report.summary.certified
