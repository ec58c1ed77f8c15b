"""The conformance suite on the reference engine: every case passes in float32 and bfloat16 (each case one
pytest test, derandomized), the report and its schema, the CLI's exit codes, waivers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mxmoe.backends.reference import TorchBackend
from mxmoe.conformance import Status, run_suite
from mxmoe.conformance.report import SCHEMA_PATH, Report, console_table, markdown, schema_text, write
from mxmoe.conformance.testing import case_params, check_case
from mxmoe.core.cli import main as cli_main

sys.path.insert(0, str(Path(__file__).parent))
import bad_engines  # noqa: E402,F401


@pytest.mark.parametrize("case", case_params(TorchBackend, dtypes=["float32", "bfloat16"]))
def test_reference_passes(case):
    r = check_case(TorchBackend, case)
    assert r.status == Status.PASS, r.message
    if not case.exact and r.ratio is not None:
        assert r.ratio <= 1.0


def test_schema_file_is_up_to_date():
    assert SCHEMA_PATH.read_text() == schema_text(), "run: python -m mxmoe.conformance.report"


def test_report_json_markdown_console(tmp_path):
    report = run_suite(TorchBackend, levels=["L0", "L1"], dtypes=["float32"], seed=123,
                       case_filter=["L0/*", "L1/rms_norm/*", "L1/experts/mxfp4_dequant_mlp1*"])
    assert report.summary.passed
    assert report.run.seed == 123 and not report.run.derandomize
    j, m = write(report, tmp_path / "cert")
    again = Report.model_validate_json(j.read_text())
    assert again.capabilities_sha256 == report.capabilities_sha256
    assert again.backend.name == "torch" and again.backend_api_version
    data = json.loads(j.read_text())
    case = next(c for c in data["cases"] if c["id"].startswith("L1/rms_norm"))
    assert case["status"] == "PASS" and case["bound"] > 0 and case["observed"] is not None
    assert "CONFORMS" in m.read_text() and "L1/rms_norm/random@float32" in markdown(report)
    assert "CONFORMS" in console_table(report)


def test_cli_exit_codes(tmp_path, capsys):
    assert cli_main(["conformance", "--backend", "torch", "--level", "L0", "--dtype", "float32", "-q",
                     "--report", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r.json").exists() and (tmp_path / "r.md").exists()
    bad = "bad_engines:RopeInterleaved"
    assert cli_main(["conformance", "--backend", bad, "--level", "L1", "--dtype", "float32", "--case", "L1/rope/*",
                     "-q", "--seed", "7"]) == 1
    out = capsys.readouterr().out
    assert "rope" in out and "DOES NOT CONFORM" in out and "--seed 7" in out


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
    class NoSinks(TorchBackend):
        name = "no-sinks"
        capabilities = TorchBackend.capabilities.model_copy(update={"attention_sinks": False})

        def attention(self, q, k, v, sinks, *a, **kw):
            from mxmoe.core.backend import NotSupported
            raise NotSupported(self.name, "attention sinks")

    r = run_suite(NoSinks, levels=["L1"], dtypes=["float32"], seed=1, case_filter=["L1/attention/prefill*"])
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
    import torch

    class Noisy(TorchBackend):
        name = "noisy"

        def linear(self, x, layer):
            y = super().linear(x, layer)
            return y + torch.rand_like(y) * 1e-7 * y.abs()

    r = run_suite(Noisy, levels=["L3"], dtypes=["float32"], seed=1, case_filter=["L3/model/determinism*"])
    assert r.cases[0].status == Status.FAIL and "determinism" in r.cases[0].message


def _registered():
    from mxmoe.plugins import discover

    reg = discover()
    return [pytest.param(name, id=name) for name in sorted(reg.classes)]


@pytest.mark.parametrize("name", _registered())
def test_every_registered_backend_conforms_on_cpu(name):
    """Every engine the plugin system finds (built-ins and installed plugins) certifies where it runs.
    (A Triton engine runs here under TRITON_INTERPRET=1: the suite's shapes are small.)"""
    from mxmoe.conformance.cli import resolve_backend

    cls, _ = resolve_backend(name)
    probe = cls().probe("cpu")
    if "cpu" not in cls.capabilities.devices or not probe.available:
        pytest.skip(f"{name} does not run on this CPU: {probe.reason or 'cpu not claimed'}")
    dtypes = [d for d in ("float32",) if d in cls.capabilities.dtypes] or [cls.capabilities.dtypes[0]]
    report = run_suite(cls, levels=["L0", "L1", "L2", "L3"], dtypes=dtypes, derandomize=True, check_registration=True)
    problems = [(c.id, c.message[:200]) for c in report.cases if c.status not in (Status.PASS, Status.NOT_SUPPORTED)]
    assert report.summary.passed, problems
