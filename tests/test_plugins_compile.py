"""The out-of-tree plugin plugins/mxmoe-compile, installed into this environment as a real distribution:
discovered through its entry point, listed, selectable per op, and serving the model — logits of every
per-op combination of ``torch`` and ``compile`` match the reference, and generation is unchanged.

The first compiled call of each op costs seconds (inductor on the CPU); shapes are tiny and the compiled
functions are shared by every model of the process, so the whole file takes about 20–40 s cold.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import itertools
import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from mxmoe.core.backend import OPS
from mxmoe.plugins import backend_status, discover, resolve_backends

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugins" / "mxmoe-compile"
DIST = "mxmoe-compile"


def _installed() -> bool:
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    return any(ep.group == "mxmoe" and ep.name == "compile" for ep in dist.entry_points)


@pytest.fixture(scope="session")
def compile_plugin():
    """Install plugins/mxmoe-compile (editable, no deps, offline) unless some install of it is present."""
    if not _installed():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "-e", str(PLUGIN_DIR)], check=True)
        importlib.invalidate_caches()
        assert _installed()
    if importlib.util.find_spec("mxmoe_compile") is None:
        # An editable install is activated by a .pth file, which Python reads at start-up only: read the
        # new one now, as `site` would have.
        purelib = sysconfig.get_paths()["purelib"]
        for pth in sorted(Path(purelib).glob("__editable__*mxmoe_compile*.pth")):
            site.addpackage(purelib, pth.name, None)
        importlib.invalidate_caches()
    return importlib.import_module("mxmoe_compile")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in ("MXMOE_BACKEND", "MXMOE_CONFIG", "MXMOE_STRICT", "MXMOE_PLUGINS", "MXMOE_DISABLE_PLUGINS",
                "MXMOE_DISABLE_PLUGIN_AUTOLOAD", "MXMOE_COMPILE_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


def test_discovered_through_its_entry_point(compile_plugin):
    reg = discover(refresh=True)
    p = next(p for p in reg.plugins if p.name == "compile")
    assert p.status == "loaded" and p.distribution == DIST and p.backends == ["compile"]
    assert reg.manager.get_plugin("compile") is compile_plugin
    info = reg.info("compile")
    assert info.usable and info.cls == "mxmoe_compile.backend:CompileBackend" and info.plugin == "compile"
    assert reg.classes["compile"].__module__ == "mxmoe_compile.backend"


def test_listed_by_the_cli_in_a_fresh_process(compile_plugin):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MXMOE_")}
    out = subprocess.run([sys.executable, "-m", "mxmoe.core.cli", "backends", "--json", "--explain", "--backend",
                          "torch,attention=compile"], capture_output=True, text=True, env=env, check=True).stdout
    data = json.loads(out)
    row = next(r for r in data["backends"] if r["name"] == "compile")
    assert row["available"] and row["distribution"] == DIST and row["api_version"] == ">=1.0,<2"
    assert row["capabilities"]["determinism"] == "run_to_run"
    assert data["resolution"]["ops"]["attention"] == "compile" and data["resolution"]["ops"]["experts"] == "torch"


def test_blocked_and_not_chosen_by_auto(compile_plugin, monkeypatch):
    res = resolve_backends(None, device="cpu", dtype="float32")
    assert {b.name for b in res.ops.values()} == {"torch"}  # priority 5 < 10: opt-in only
    assert any(r.backend == "compile" and r.kind == "lower_priority" for r in res.decision("attention").rejected)
    monkeypatch.setenv("MXMOE_DISABLE_PLUGINS", DIST)
    assert "compile" not in discover().classes
    with pytest.raises(Exception, match="compile.*not registered.*blocked"):
        resolve_backends("compile", device="cpu", dtype="float32", strict=True)


def test_probe_says_what_is_missing(compile_plugin, monkeypatch):
    from mxmoe_compile import backend as cb

    b = cb.CompileBackend()
    assert b.probe("cpu").available
    monkeypatch.setattr(cb.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    probe = b.probe("cpu")
    assert not probe.available and "C++ compiler" in probe.reason
    monkeypatch.setenv("MXMOE_COMPILE_BACKEND", "aot_eager")  # needs no compiler
    assert b.probe("cpu").available
    monkeypatch.setenv("MXMOE_COMPILE_BACKEND", "no-such-backend")
    assert "not a torch.compile backend" in b.probe("cpu").reason
    rows = backend_status(discover(), device="cpu", dtype="float32")
    assert not next(r for r in rows if r["name"] == "compile")["available"]


@pytest.fixture(scope="module")
def tiny():
    from mxmoe.core.checkpoint import random_weights
    from mxmoe.core.config import preset

    cfg = preset("tiny", vocab_size=512)
    return cfg, random_weights(cfg, seed=3)


def build(tiny, spec, strict=True):
    from mxmoe.core.model import GptOss

    cfg, weights = tiny
    res = resolve_backends(spec, device="cpu", dtype=torch.float32, strict=strict, model_config=cfg)
    return GptOss(cfg, weights, res.ops, dtype=torch.float32, resolution=res)


def test_every_per_op_combination_matches_the_reference(compile_plugin, tiny):
    ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(0))  # > sliding window 8
    ref = build(tiny, "torch").logits(ids)
    assert {b.name for b in build(tiny, "compile").ops.values()} == {"compile"}
    checked = 0
    for choice in itertools.product(("torch", "compile"), repeat=len(OPS)):
        spec = dict(zip(OPS, choice))
        model = build(tiny, spec)
        assert {op: b.name for op, b in model.ops.items()} == spec
        torch.testing.assert_close(model.logits(ids), ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{spec}: {m}")
        checked += 1
    assert checked == 2 ** len(OPS)


def test_generation_unchanged_through_the_plugin(compile_plugin, tiny):
    prompt = [5, 17, 301, 42, 9, 250, 7, 77, 123, 4, 11]
    want = list(build(tiny, "torch").generate(prompt, max_tokens=8))
    for spec in ("compile", "torch,attention=compile,moe=compile"):
        assert list(build(tiny, spec).generate(prompt, max_tokens=8)) == want, spec


def test_compiles_the_reference_math_instead_of_copying_it(compile_plugin, tiny, monkeypatch):
    """The per-sequence attention and the one-expert MLP are written once, in the reference, which uses them
    itself; the plugin compiles those very functions."""
    import mxmoe.backends.reference as ref
    from mxmoe_compile import backend as cb

    assert cb._sequence_attention.fn is ref.attention_one_sequence and cb._expert_mlp.fn is ref.expert_mlp
    for fn in (ref.attention_one_sequence, ref.expert_mlp, ref.swiglu):
        assert fn.__doc__ and not fn.__name__.startswith("_")
    assert not hasattr(cb, "_Experts") and not hasattr(cb, "swiglu")  # no private imports, no copied math
    calls = []
    for name in ("attention_one_sequence", "expert_mlp"):
        real = getattr(ref, name)
        monkeypatch.setattr(ref, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    build(tiny, "torch").logits(torch.arange(10))
    assert {"attention_one_sequence", "expert_mlp"} <= set(calls)  # the reference itself uses them
