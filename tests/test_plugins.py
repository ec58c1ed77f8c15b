"""The plugin system: hookspecs, discovery through real entry points, allow/block lists, API versions,
capabilities, selection (auto, names, per-op overrides; strict vs fallback; CLI > env > config) and the
trace, and ``mxmoe backends``.

The dummy plugins of tests/plugins_fixtures are found the way installed plugins are: each gets a
``*.dist-info`` folder with an ``entry_points.txt`` on ``sys.path``.
"""

from __future__ import annotations

import inspect
import json
import typing
import warnings
from pathlib import Path

import pytest
import torch

import mxmoe.plugins as plugins
from mxmoe.backends.reference import TorchBackend
from mxmoe.core.backend import BACKEND_API_VERSION, OPS, Backend, Capabilities, NotSupported
from mxmoe.core.cli import main as cli_main
from mxmoe.plugins import (BackendFallbackWarning, BackendSelectionError, SpecError, api_compatible,
                           backend_status, discover, hookspecs, parse_spec, resolve_backends)

FIXTURES = Path(__file__).parent / "plugins_fixtures"
ENV_VARS = ("MXMOE_BACKEND", "MXMOE_CONFIG", "MXMOE_STRICT", "MXMOE_PLUGINS", "MXMOE_DISABLE_PLUGINS",
            "MXMOE_DISABLE_PLUGIN_AUTOLOAD")

# distribution name -> (entry-point name, module)
DUMMIES = {
    "mxmoe-dummy-importerror": ("importerror", "mxmoe_dummy_importerror"),
    "mxmoe-dummy-oldapi": ("oldapi", "mxmoe_dummy_oldapi"),
    "mxmoe-dummy-proberaises": ("proberaises", "mxmoe_dummy_proberaises"),
    "mxmoe-dummy-nothing": ("nothing", "mxmoe_dummy_nothing"),
    "mxmoe-dummy-empty": ("empty", "mxmoe_dummy_empty"),
    "mxmoe-dummy-hookraises": ("hookraises", "mxmoe_dummy_hookraises"),
    "mxmoe-dummy-duplicate": ("duplicate", "mxmoe_dummy_duplicate"),
    "mxmoe-dummy-fast": ("fast", "mxmoe_dummy_fast"),
    # What our own pyproject declares for the built-ins: must not register them a second time.
    "mxmoe-dummy-builtin-again": ("builtin", "mxmoe.backends"),
}


def write_dist(root: Path, dist: str, entry_points: dict[str, str], version: str = "0.1") -> None:
    """A minimal installed distribution: what pip leaves in site-packages, as importlib.metadata reads it."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[mxmoe]\n{lines}")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    # Only the dummies and the built-ins here; the out-of-tree plugin has its own tests.
    monkeypatch.setenv("MXMOE_DISABLE_PLUGINS", "mxmoe-compile")
    monkeypatch.chdir(tmp_path)  # no stray ./mxmoe.toml


@pytest.fixture(scope="module")
def dummy_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    for dist, (ep, module) in DUMMIES.items():
        write_dist(root, dist, {ep: module})
    return root


@pytest.fixture
def dummies(monkeypatch, dummy_site):
    """The dummy plugins, installed (their dist-info and their modules on sys.path)."""
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.syspath_prepend(str(dummy_site))
    yield
    discover(refresh=True)  # forget them


def plugin(registry, name):
    return next(p for p in registry.plugins if p.name == name)


def status(rows, name):
    return next(r for r in rows if r["name"] == name)


# ---- hookspecs ---------------------------------------------------------------------------------------

def test_hookspecs_are_prefixed_typed_and_documented():
    specs = [f for name, f in vars(hookspecs).items() if name.startswith("mxmoe_")]
    assert {f.__name__ for f in specs} >= {"mxmoe_register_backends", "mxmoe_resolution_done"}
    for f in specs:
        doc = inspect.getdoc(f)
        assert "Called" in doc and "firstresult" in doc and (":return" in doc or ":param" in doc), f.__name__
        hints = typing.get_type_hints(f, vars(hookspecs) | {"Backend": Backend, "Resolution": plugins.Resolution})
        assert "return" in hints, f.__name__
        assert set(inspect.signature(f).parameters) <= set(hints), f.__name__


def test_builtins_register_through_the_same_hook():
    reg = discover(refresh=True)
    builtin = plugin(reg, "builtin")
    assert builtin.status == "loaded" and builtin.distribution == "mxmoe"
    assert builtin.backends == ["torch", "triton", "megablocks"]  # the reference first
    assert reg.classes["torch"] is TorchBackend
    # the hook, called through pluggy like any plugin's
    assert [TorchBackend, reg.classes["triton"], reg.classes["megablocks"]] in reg.manager.hook.mxmoe_register_backends()
    import mxmoe.backends

    assert reg.manager.get_plugin("builtin") is mxmoe.backends


# ---- discovery and its error paths -------------------------------------------------------------------

def test_dummy_plugins_are_discovered_and_their_failures_reported(dummies, caplog):
    reg = discover()
    names = [i.name for i in reg.infos]
    assert names.count("torch") == 2  # the built-in and the refused duplicate
    assert [p.name for p in reg.plugins].count("builtin") == 1  # the built-ins' entry point is skipped

    failed = plugin(reg, "importerror")
    assert failed.status == "failed" and failed.distribution == "mxmoe-dummy-importerror"
    assert "ImportError" in failed.reason and "libdummy.so.1" in failed.reason
    assert "libdummy.so.1" in caplog.text  # a user sees it, the process goes on

    old = reg.info("oldapi")
    assert not old.api_compatible and old.problem_kind == "api_version"
    assert ">=0.1,<1" in old.problem and BACKEND_API_VERSION in old.problem
    assert "oldapi" not in reg.classes

    empty = plugin(reg, "empty")  # allowed by the hookspec: a note, not a problem
    assert empty.status == "loaded" and empty.note == "registers no backends" and not empty.reason
    assert "ValueError: cannot read my own config" in plugin(reg, "hookraises").reason
    dup = [i for i in reg.infos if i.name == "torch" and i.plugin == "duplicate"][0]
    assert dup.problem_kind == "duplicate" and "builtin" in dup.problem
    assert reg.classes["torch"] is TorchBackend

    rows = backend_status(reg, device="cpu", dtype="float32")
    probe = status(rows, "proberaises")
    assert not probe["available"] and "probe raised RuntimeError: driver exploded" in probe["reason"]
    nothing = status(rows, "nothing")
    assert not nothing["available"] and nothing["unavailable_kind"] == "not_supported"
    assert status(rows, "fast")["available"] and status(rows, "torch")["available"]
    assert not status(rows, "oldapi")["available"]
    json.dumps(rows)  # JSON-serialisable as it is


def test_auto_still_works_with_broken_plugins_and_trace_says_why(dummies):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto never falls back: no warning
        res = resolve_backends(None, device="cpu", dtype=torch.float32)
    chosen = {op: b.name for op, b in res.ops.items()}
    assert chosen == {op: "fast" if op in ("attention", "rms_norm") else "torch" for op in OPS}
    kinds = {r.backend: r.kind for r in res.decision("experts").rejected}
    assert kinds == {"fast": "not_supported", "oldapi": "api_version", "proberaises": "unavailable",
                     "nothing": "not_supported", "torch": "duplicate",
                     "triton": "not_supported",  # bfloat16 only
                     "megablocks": "lower_priority"}
    attn = {r.backend: r for r in res.decision("attention").rejected}
    assert attn["torch"].kind == "lower_priority" and "100" in attn["torch"].reason
    assert "driver exploded" in attn["proberaises"].reason
    text = res.explain()
    assert "importerror" in text and "libdummy.so.1" in text
    json.dumps(res.to_dict())
    # one instance per backend class, shared by its ops
    assert res.ops["attention"] is res.ops["rms_norm"] and res.ops["linear"] is res.ops["experts"]


def test_resolution_hook_observes(dummies):
    import mxmoe_dummy_fast

    mxmoe_dummy_fast.RESOLUTIONS.clear()
    res = resolve_backends("auto", device="cpu", dtype=torch.float32)
    assert mxmoe_dummy_fast.RESOLUTIONS == [res]


def test_allow_list(dummies, monkeypatch):
    monkeypatch.setenv("MXMOE_PLUGINS", "fast, mxmoe-dummy-oldapi")  # entry-point or distribution name
    reg = discover()
    loaded = {p.name for p in reg.plugins if p.status == "loaded"}
    assert loaded == {"builtin", "fast", "oldapi"}
    assert plugin(reg, "importerror").status == "not_allowed"
    assert "MXMOE_PLUGINS" in plugin(reg, "nothing").reason


def test_block_list_wins(dummies, monkeypatch):
    monkeypatch.setenv("MXMOE_PLUGINS", "fast,oldapi")
    monkeypatch.setenv("MXMOE_DISABLE_PLUGINS", "mxmoe_dummy_fast,mxmoe-compile")  # normalised like a dist name
    reg = discover()
    assert plugin(reg, "fast").status == "blocked" and "MXMOE_DISABLE_PLUGINS" in plugin(reg, "fast").reason
    assert reg.manager.is_blocked("fast")
    assert plugin(reg, "oldapi").status == "loaded"
    assert "fast" not in reg.classes


def test_disable_autoload(dummies, monkeypatch):
    monkeypatch.setenv("MXMOE_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = discover()
    assert [p.name for p in reg.plugins if p.status == "loaded"] == ["builtin"]
    assert plugin(reg, "fast").status == "autoload_disabled"
    assert set(reg.classes) == {"torch", "triton", "megablocks"}  # the built-ins only
    monkeypatch.setenv("MXMOE_PLUGINS", "fast")  # named explicitly: still loaded
    reg = discover()
    assert {p.name for p in reg.plugins if p.status == "loaded"} == {"builtin", "fast"}


# ---- versions and capabilities -----------------------------------------------------------------------

@pytest.mark.parametrize("spec, ok", [(">=1.0,<2", True), ("~=1.0", True), ("==1.*", True), (">=1.1", False),
                                      (">=2", False), ("<1", False), ("not a spec", False)])
def test_api_version_ranges(spec, ok):
    compatible, why = api_compatible(spec, "1.0.0")
    assert compatible is ok
    if not ok:
        assert spec in why
    assert api_compatible(">=1.0,<2", "2.0.0")[0] is False


def test_capabilities_are_data_and_unclaimed_raises():
    caps = TorchBackend.capabilities
    assert Capabilities.model_validate_json(caps.model_dump_json()) == caps
    assert set(Capabilities.model_fields) >= {"devices", "dtypes", "head_dims", "attention_sinks", "sliding_window",
                                              "mxfp4", "max_experts", "max_experts_per_token", "max_context",
                                              "cuda_graphs", "determinism"}
    b = TorchBackend()
    with pytest.raises(NotSupported, match="device 'meta'"):
        b.check(device="meta")
    with pytest.raises(NotSupported, match="dtype int8"):
        b.check(dtype=torch.int8)


def test_model_limits_are_checked(dummies):
    from mxmoe.core.config import preset

    cfg = preset("tiny", vocab_size=512, head_dim=32, hidden_size=128)
    res = resolve_backends(None, device="cpu", dtype="float32", model_config=cfg)
    assert res.ops["attention"].name == "torch"  # fast claims head dims 16 and 64 only
    why = {r.backend: r for r in res.decision("attention").rejected}["fast"]
    assert why.kind == "not_supported" and "head_dim 32" in why.reason
    assert res.ops["rms_norm"].name == "fast"


# ---- specs and their sources -------------------------------------------------------------------------

def test_parse_spec():
    assert parse_spec(None).default == "auto" and parse_spec(None).ops == {}
    assert parse_spec("torch").default == "torch"
    s = parse_spec("torch, attention=compile ,moe=x")
    assert s.default == "torch" and s.ops == {"attention": "compile", "router": "x", "experts": "x"}
    s = parse_spec({"moe": "a", "experts": "b", "default": "c"})  # the op named explicitly wins
    assert s.ops == {"router": "a", "experts": "b"} and s.default == "c"
    assert parse_spec("Attention=Torch").ops == {"attention": "torch"}
    with pytest.raises(SpecError, match="unknown op 'mlp'"):
        parse_spec("mlp=torch")
    with pytest.raises(SpecError, match="two defaults"):
        parse_spec("torch,compile")
    with pytest.raises(SpecError, match="expected a backend name"):
        parse_spec("attention=")


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_cli_env_config_auto(dummies, monkeypatch, tmp_path):
    kw = dict(device="cpu", dtype="float32")
    assert resolve_backends(**kw).source == "default"
    assert resolve_backends(**kw).ops["attention"].name == "fast"  # auto
    write_config(tmp_path / "mxmoe.toml", '[backend]\ndefault = "torch"\n[backend.ops]\nnorm = "fast"\n')
    res = resolve_backends(**kw)  # ./mxmoe.toml
    assert res.source.startswith("config file") and res.ops["attention"].name == "torch"
    assert res.ops["rms_norm"].name == "fast"
    other = write_config(tmp_path / "other.toml", '[backend.ops]\nattention = "torch"\n')
    monkeypatch.setenv("MXMOE_CONFIG", str(other))  # MXMOE_CONFIG beats ./mxmoe.toml
    res = resolve_backends(**kw)
    assert res.config_file == str(other) and res.ops["attention"].name == "torch"
    assert res.ops["rms_norm"].name == "fast"  # default auto
    monkeypatch.setenv("MXMOE_BACKEND", "torch")  # env beats config
    res = resolve_backends(**kw)
    assert res.source == "environment MXMOE_BACKEND" and {b.name for b in res.ops.values()} == {"torch"}
    res = resolve_backends("attention=fast", **kw)  # the argument beats all
    assert res.source == "argument" and res.ops["attention"].name == "fast" and res.ops["rms_norm"].name == "fast"
    assert resolve_backends("torch", config_file=tmp_path / "mxmoe.toml", **kw).config_file.endswith("mxmoe.toml")


def test_config_errors_name_file_and_key(tmp_path):
    bad = write_config(tmp_path / "bad.toml", '[backend]\ndefualt = "torch"\n')
    with pytest.raises(SpecError, match=r"bad\.toml.*backend\.defualt"):
        resolve_backends(config_file=bad)
    with pytest.raises(SpecError, match="does not exist"):
        resolve_backends(config_file=tmp_path / "missing.toml")
    bad_op = write_config(tmp_path / "op.toml", '[backend.ops]\nmlp = "torch"\n')
    with pytest.raises(SpecError, match="unknown op 'mlp'"):
        resolve_backends(config_file=bad_op)
    # other tables belong to other tools
    assert resolve_backends(config_file=write_config(tmp_path / "ok.toml", "[server]\nport = 1\n")).source == "default"


# ---- strict vs fallback ------------------------------------------------------------------------------

def test_fallback_warns_and_is_traced(dummies):
    with pytest.warns(BackendFallbackWarning, match="falling back to") as record:
        res = resolve_backends("torch,attention=proberaises,experts=oldapi", device="cpu", dtype="float32")
    assert len(record) == 2
    assert res.ops["attention"].name == "fast" and res.ops["experts"].name == "torch"  # best available
    attn = res.decision("attention")
    assert attn.fallback and "driver exploded" in attn.warning
    assert any(r.backend == "torch" and r.kind == "lower_priority" for r in attn.rejected)
    experts = res.decision("experts")
    assert experts.fallback and ">=0.1,<1" in experts.warning and BACKEND_API_VERSION in experts.warning
    assert not res.decision("linear").fallback
    assert any(r.backend == "fast" and r.kind == "not_requested" for r in res.decision("rms_norm").rejected)


@pytest.mark.parametrize("how", ["argument", "env", "config"])
def test_strict_refuses_fallback(dummies, monkeypatch, tmp_path, how):
    kw = dict(device="cpu", dtype="float32")
    if how == "argument":
        kw["strict"] = True
    elif how == "env":
        monkeypatch.setenv("MXMOE_STRICT", "1")
    else:
        kw["config_file"] = write_config(tmp_path / "s.toml", "[backend]\nstrict = true\n")
    with pytest.raises(BackendSelectionError) as err:
        resolve_backends("experts=oldapi,attention=importerror", **kw)
    msg = str(err.value)
    assert "experts: backend 'oldapi' cannot serve it: api_version" in msg and ">=0.1,<1" in msg
    assert "attention: backend 'importerror' is not registered" in msg and "libdummy.so.1" in msg  # the reason
    assert "rms_norm   -> fast" in msg  # the trace comes with the error
    assert err.value.resolution.decision("experts").backend is None
    # what strict mode accepts
    assert resolve_backends("experts=torch", **kw).ops["experts"].name == "torch"


def test_unservable_op_is_an_error_even_without_strict():
    with pytest.raises(BackendSelectionError, match="no backend can serve it") as err:
        resolve_backends("auto", device="meta", dtype="float32")
    assert "device 'meta'" in str(err.value)


def test_load_model_path_uses_resolution(tmp_path, monkeypatch):
    """``load_model`` goes through resolve_backends with the env var, and keeps the resolution."""
    checkpoint = pytest.importorskip("mxmoe.core.checkpoint")
    from mxmoe.core.config import preset
    from mxmoe.core.model import load_model

    cfg = preset("tiny", vocab_size=512, num_hidden_layers=1)
    checkpoint.write_random_checkpoint(tmp_path / "ckpt", cfg, "original", seed=0)
    monkeypatch.setenv("MXMOE_BACKEND", "torch,attention=torch")
    m = load_model(tmp_path / "ckpt", dtype="float32")
    assert m.resolution.source == "environment MXMOE_BACKEND"
    assert set(m.resolution.backends) == {"torch"}
    assert m.logits([1, 2, 3]).shape == (3, 512)


# ---- the CLI -----------------------------------------------------------------------------------------

def test_cli_lists_backends_as_json(dummies, capsys):
    assert cli_main(["backends", "--json", "--dtype", "float32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend_api_version"] == BACKEND_API_VERSION
    torch_row = status(out["backends"], "torch")
    assert torch_row["available"] and torch_row["api_version"] == ">=1.0,<2" and torch_row["version"]
    assert torch_row["capabilities"]["mxfp4"] == "dequantized"
    assert not status(out["backends"], "proberaises")["available"]
    plugs = {p["name"]: p for p in out["plugins"]}
    assert plugs["importerror"]["status"] == "failed" and "libdummy" in plugs["importerror"]["reason"]
    assert "resolution" not in out


def test_cli_explain(dummies, capsys):
    assert cli_main(["backends", "--explain", "--dtype", "float32", "--backend", "torch,norm=fast"]) == 0
    text = capsys.readouterr().out
    assert "proberaises" in text and "driver exploded" in text and "INCOMPATIBLE" in text
    assert "rms_norm   -> fast  (requested by argument)" in text
    assert "attention  -> torch" in text and "fast: not_requested" in text

    assert cli_main(["backends", "--explain", "--json", "--strict", "--backend", "oldapi"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert "oldapi" in out["error"] and out["resolution"]["strict"]
    assert out["resolution"]["trace"][0]["backend"] is None


def test_cli_help_documents_env(capsys):
    with pytest.raises(SystemExit):
        cli_main(["backends", "--help"])
    text = capsys.readouterr().out
    for var in ENV_VARS:
        assert var in text
    assert "moe = router+experts" in text


# ---- review fixes: plugins that misbehave never stop the process ------------------------------------

_BACKEND_SRC = """
from mxmoe.backends.reference import TorchBackend
from mxmoe.plugins import hookimpl

class B(TorchBackend):
    name = {name!r}
    priority = {priority!r}
{body}

@hookimpl
def mxmoe_register_backends():
    return [B]
"""


@pytest.fixture
def install(monkeypatch, tmp_path):
    """install(dist, ep, module, source): an installed distribution whose entry point ``ep`` is ``module``."""
    import sys

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    monkeypatch.syspath_prepend(str(site_dir))
    modules = []

    def install(dist: str, ep: str, module: str, source: str) -> None:
        (site_dir / f"{module}.py").write_text(source)
        write_dist(site_dir, dist, {ep: module})
        modules.append(module)

    yield install
    if str(site_dir) in sys.path:
        sys.path.remove(str(site_dir))  # (monkeypatch restores sys.path later; rediscovering must not see it)
    for m in modules:
        sys.modules.pop(m, None)
    discover(refresh=True)


def backend_src(name: str, priority=50, body: str = "") -> str:
    return _BACKEND_SRC.format(name=name, priority=priority, body=body)


def test_same_entry_point_name_in_two_distributions(install, caplog):
    install("rv-a", "same", "mxmoe_rv_same_a", backend_src("samea"))
    install("rv-b", "same", "mxmoe_rv_same_b", backend_src("sameb"))
    reg = discover(refresh=True)
    same = [p for p in reg.plugins if p.name == "same"]
    assert [(p.distribution, p.status) for p in same] == [("rv-a", "loaded"), ("rv-b", "duplicate")]
    loaded, dup = same
    # the first keeps its plugin and its backends, attributed to the distribution it comes from
    assert loaded.backends == ["samea"] and reg.info("samea").distribution == "rv-a"
    assert reg.classes["samea"].__module__ == "mxmoe_rv_same_a"
    assert reg.manager.get_plugin("same").__name__ == "mxmoe_rv_same_a"
    assert "sameb" not in reg.classes and "mxmoe_rv_same_b" not in __import__("sys").modules
    assert "rv-a" in dup.reason and "rv-b" in dup.reason and "rv-b" in caplog.text
    res = resolve_backends("samea", device="cpu", dtype=torch.float32)
    assert {b.name for b in res.ops.values()} == {"samea"}


@pytest.mark.parametrize("attrs, why", [
    ({"priority": "high"}, "priority is 'high' (str), expected an int"),
    ({"priority": True}, "priority is True (bool), expected an int"),
    ({"priority": 1.5}, "priority is 1.5 (float), expected an int"),
    ({"version": 1}, "version is 1 (int), expected a str"),
    ({"api_version": 1.0}, "api_version is 1.0 (float), expected a str"),
])
def test_bad_declarations_are_refused_with_a_reason(install, capsys, attrs, why):
    body = "".join(f"    {k} = {v!r}\n" for k, v in attrs.items() if k != "priority")
    install("rv-decl", "decl", "mxmoe_rv_decl", backend_src("decl", attrs.get("priority", 50), body))
    reg = discover(refresh=True)
    info = reg.info("decl")
    assert info.problem_kind == "invalid" and why in info.problem and "decl" not in reg.classes
    res = resolve_backends(None, device="cpu", dtype=torch.float32)
    assert res.decision("linear").backend == "torch"
    assert {r.backend: r.kind for r in res.decision("linear").rejected}["decl"] == "invalid"
    assert cli_main(["backends", "--json"]) == 0
    assert status(json.loads(capsys.readouterr().out)["backends"], "decl")["reason"] == info.problem


def test_backend_names_must_be_lowercase(install):
    install("rv-upper", "upper", "mxmoe_rv_upper", backend_src("FastCUDA"))
    reg = discover(refresh=True)
    assert all(i.name.lower() != "fastcuda" for i in reg.infos) and not reg.plugin("upper").backends
    reason = reg.plugin("upper").reason
    assert "'FastCUDA'" in reason and "must be lowercase" in reason and "'fastcuda'" in reason


@pytest.mark.parametrize("exc", ["RuntimeError('boom in check')", "SystemExit('boom in check')"])
@pytest.mark.parametrize("when", ["device", "op"])
def test_check_that_raises_is_a_rejection_not_a_crash(install, exc, when):
    cond = "True" if when == "device" else "kw.get('op') == 'linear'"
    body = (f"    def check(self, **kw):\n        if {cond}:\n            raise {exc}\n"
            "        return super().check(**kw)\n")
    install("rv-check", "badcheck", "mxmoe_rv_check", backend_src("badcheck", 1000, body))
    discover(refresh=True)
    res = resolve_backends(None, device="cpu", dtype=torch.float32)
    assert res.decision("linear").backend == "torch"
    rej = {r.backend: r for r in res.decision("linear").rejected}["badcheck"]
    assert rej.kind == "error" and "boom in check" in rej.reason and exc.split("(")[0] in rej.reason
    if when == "op":
        assert res.decision("rms_norm").backend == "badcheck"  # only the op whose check raised is lost


def test_every_resolution_observer_is_called_and_none_stops_loading(caplog):
    import types

    from mxmoe.plugins import hookimpl

    seen = []

    def observer(name, action):
        mod = types.ModuleType(name)

        @hookimpl
        def mxmoe_resolution_done(resolution):
            seen.append(name)
            action()

        mod.mxmoe_resolution_done = mxmoe_resolution_done
        return mod

    def exit_():
        raise SystemExit(3)

    def boom():
        raise RuntimeError("observer broke")

    reg = discover(refresh=True)
    try:
        reg.manager.register(observer("obs_ok", lambda: None), name="obs_ok")
        reg.manager.register(observer("obs_exit", exit_), name="obs_exit")
        reg.manager.register(observer("obs_boom", boom), name="obs_boom")
        res = resolve_backends("torch", device="cpu", dtype=torch.float32, registry=reg)
    finally:
        discover(refresh=True)
    assert res.ops["linear"].name == "torch"
    assert sorted(seen) == ["obs_boom", "obs_exit", "obs_ok"]
    assert "SystemExit" in caplog.text and "observer broke" in caplog.text


def test_plugin_registering_nothing_is_a_note_not_a_problem(install, capsys):
    install("rv-none", "none", "mxmoe_rv_none",
            "from mxmoe.plugins import hookimpl\n\n@hookimpl\ndef mxmoe_register_backends():\n    return None\n")
    reg = discover(refresh=True)
    p = reg.plugin("none")
    assert p.status == "loaded" and p.note == "registers no backends" and p.reason == ""
    res = resolve_backends(None, device="cpu", dtype=torch.float32)
    assert all(q["name"] != "none" for q in res.to_dict()["plugin_problems"]) and "none" not in res.explain()
    assert cli_main(["backends"]) == 0
    out = capsys.readouterr().out
    problems, notes = out.split("plugin notes:")
    assert "none (rv-none): registers no backends" in notes and "rv-none" not in problems


@pytest.mark.parametrize("args, what", [(["--device", "cdua"], "--device 'cdua'"),
                                        (["--dtype", "fp33"], "--dtype 'fp33'")])
def test_cli_bad_device_or_dtype_is_an_error_not_a_traceback(capsys, args, what):
    assert cli_main(["backends", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {what}") and "Traceback" not in err


def test_config_backend_not_a_table(tmp_path, capsys):
    path = write_config(tmp_path / "bad.toml", 'backend = "torch"\n')
    with pytest.raises(SpecError, match=r"must be a table") as e:
        resolve_backends(None, config_file=path)
    assert str(path) in str(e.value) and "[backend] must be a table" in str(e.value)
    assert "_BackendSection" not in str(e.value)
    assert cli_main(["backends", "--explain", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "[backend] must be a table" in err and str(path) in err
