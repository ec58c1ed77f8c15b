"""Level 4 (real weights): run here on a random checkpoint in a real layout with the real vocabulary."""

from __future__ import annotations

import pytest

from mxmoe.backends.reference import TorchBackend
from mxmoe.conformance import run_suite
from mxmoe.conformance.case import Status
from mxmoe.core.checkpoint import write_random_checkpoint
from mxmoe.core.cli import main
from mxmoe.core.config import preset

from bad_engines import RouterSoftmaxThenTopk, SinksIgnored


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("l4")
    write_random_checkpoint(d, preset("tiny"), "hf", seed=11)
    return str(d)


def test_reference_passes_level_4(weights):
    report = run_suite(TorchBackend, levels=["L4"], dtypes=["float32", "bfloat16"], weights_path=weights,
                       derandomize=True)
    assert [c.status for c in report.cases] == [Status.PASS] * 6, [c.message for c in report.cases]
    assert all(c.metrics["prompt_tokens"] > 30 and c.metrics["tokens"] >= 1 for c in report.cases)


@pytest.mark.parametrize("bad", [SinksIgnored, RouterSoftmaxThenTopk])
def test_wrong_engines_fail_level_4(weights, bad):
    report = run_suite(bad, levels=["L4"], dtypes=["float32"], weights_path=weights, derandomize=True)
    failed = [c for c in report.cases if c.status == Status.FAIL]
    assert failed and all("harmony greedy" in c.message for c in failed)
    assert not report.summary.passed


def test_level_4_without_weights_says_what_to_pass(capsys):
    assert main(["conformance", "--backend", "torch", "--level", "L4"]) == 2
    assert "pass --weights DIR" in capsys.readouterr().err
