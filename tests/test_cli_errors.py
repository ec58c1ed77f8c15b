"""What a user meets when something is wrong (issue 13, items 1-4 and chat's printing rule of item 7).

Every user error prints one message, ``mxmoe COMMAND: …``, and exits with status 2, before any model is
loaded where it can be judged without one; ``--debug`` / ``MXMOE_DEBUG=1`` add the traceback; a real bug
keeps its traceback. Most checks call ``mxmoe.core.cli.main`` in-process (capsys); a few run the CLI in a
subprocess where the printed form is the point (the traceback, the one-line warnings).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mxmoe.core import cli
from mxmoe.core.checkpoint import write_random_checkpoint
from mxmoe.core.cli import main
from mxmoe.core.config import preset
from mxmoe.plugins import BackendFallbackWarning, BackendSelectionError, discover, resolve_backends

FIXTURES = Path(__file__).parent / "plugins_fixtures"
LIMIT = 256 * 4  # the tiny preset's context: initial_context_length × rope_scaling_factor
LIMIT_TEXT = "the model's context of 1024 tokens (initial_context_length 256 × rope_scaling_factor 4.0)"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in list(os.environ):
        if var.startswith("MXMOE_"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)  # no stray ./mxmoe.toml


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops on a shared CPU (FACTS.md)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny preset with the real vocabulary (the CLI encodes and decodes text)."""
    d = tmp_path_factory.mktemp("tiny")
    write_random_checkpoint(d, preset("tiny"), "original", seed=3)
    return d


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, Path]:
    """Checkpoint folders that cannot be loaded, each with one problem (a small vocabulary: small files)."""
    root = tmp_path_factory.mktemp("broken")
    good = root / "good"
    write_random_checkpoint(good, preset("tiny", vocab_size=512), "original", seed=4)

    def copy(name: str) -> Path:
        d = root / name
        shutil.copytree(good, d)
        return d

    def rewrite(name: str, edit) -> Path:
        d = copy(name)
        tensors = load_file(d / "model.safetensors")
        edit(tensors)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        return d

    out = {"missing": root / "no-such-folder", "empty": root / "empty", "a file": root / "a-file"}
    out["empty"].mkdir()
    out["a file"].write_text("not a checkpoint")
    out["no config.json"] = copy("no-config")
    (out["no config.json"] / "config.json").unlink()
    out["truncated"] = copy("truncated")
    data = (out["truncated"] / "model.safetensors").read_bytes()
    (out["truncated"] / "model.safetensors").write_bytes(data[:-100])
    out["missing tensor"] = rewrite("missing-tensor", lambda t: t.pop("block.1.attn.sinks"))
    name = "block.0.attn.qkv.weight"
    out["misshapen tensor"] = rewrite("misshapen", lambda t: t.update({name: t[name][:, :32].contiguous()}))
    out["config not JSON"] = copy("config-not-json")
    (out["config not JSON"] / "config.json").write_text("{")
    out["config key"] = copy("config-key")
    cfg = json.loads((out["config key"] / "config.json").read_text())
    cfg["num_expert"] = cfg.pop("num_experts")
    (out["config key"] / "config.json").write_text(json.dumps(cfg))
    return out


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc: int, err: str, command: str, *phrases: str) -> None:
    assert rc == 2, err
    assert err.startswith(f"mxmoe {command}: "), err
    assert "Traceback" not in err, err
    for p in phrases:
        assert p in err, f"{p!r} not in {err!r}"


def _no_loading(monkeypatch):
    """Fail the test if a model gets loaded (weights prepared onto engines)."""
    import mxmoe.core.model as model_mod

    def refuse(*a, **kw):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(model_mod, "load_model", refuse)


# ---- item 1: one message and exit 2 for every user error --------------------------------------------

CHECKPOINT_CASES = {  # what the message must say (the folder's name, or the file's)
    "missing": ("no-such-folder", "found nothing"),
    "empty": ("empty", "expected *.safetensors weight files"),
    "a file": ("a-file", "found a file"),
    "no config.json": ("no-config", "expected config.json beside the weights"),
    "truncated": ("model.safetensors", "truncated"),
    "missing tensor": ("model.safetensors", "tensor 'block.1.attn.sinks'", "found no such tensor"),
    "misshapen tensor": ("model.safetensors", "tensor 'block.0.attn.qkv.weight'", "found (128, 32)"),
    "config not JSON": ("config-not-json/config.json", "not valid JSON"),
    "config key": ("config-key/config.json", "unknown key 'num_expert'"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_checkpoint_is_one_message_and_exit_2(broken, capsys, monkeypatch, command, case):
    _no_loading(monkeypatch)
    path = broken[case]
    rc, _, err = run(capsys, command, "--model", str(path), "--max-tokens", "2")
    assert_user_error(rc, err, command, *CHECKPOINT_CASES[case])
    assert err.count("\n") <= 3, err  # a message, not a report


@pytest.mark.parametrize("case", ["missing", "truncated", "config key"])
def test_serve_reports_a_bad_checkpoint_the_same_way(broken, capsys, case):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    rc, _, err = run(capsys, "serve", "--model", str(broken[case]), "--port", "0")
    assert_user_error(rc, err, "serve", *CHECKPOINT_CASES[case])


def test_inspect_and_generate_print_the_same_message(broken, capsys):
    for case in ("truncated", "misshapen tensor"):
        rc_i, _, err_i = run(capsys, "checkpoint", "inspect", str(broken[case]))
        rc_g, _, err_g = run(capsys, "generate", "--model", str(broken[case]))
        assert rc_i == rc_g == 2
        assert err_i.removeprefix("mxmoe checkpoint inspect: ") == err_g.removeprefix("mxmoe generate: ")


@pytest.mark.parametrize("how, phrase", [
    (["--backend", "attention="], "attention='': expected a backend name"),
    (["--backend", "nosuchengine"], "no engine named 'nosuchengine'"),
    (["--backend", "torch,attention=torch=x"], "'attention=torch=x': expected op=name"),
    ({"MXMOE_BACKEND": "garbage"}, "requested by environment MXMOE_BACKEND"),
    ({"./mxmoe.toml": '[backend]\ndefualt = "torch"\n'}, "backend.defualt"),
    ({"MXMOE_CONFIG": "missing.toml"}, "missing.toml does not exist"),
    ({"MXMOE_CONFIG": "bad.toml", "bad.toml": "[backend\n"}, "bad.toml"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_backend_spec_or_config_is_one_message_and_exit_2(tiny, capsys, monkeypatch, tmp_path, command, how,
                                                              phrase):
    argv = [command, "--model", str(tiny), "--max-tokens", "2"]
    if isinstance(how, list):
        argv += how
    else:
        for key, value in how.items():
            if key.startswith("MXMOE_"):
                monkeypatch.setenv(key, value)
            else:
                (tmp_path / key).write_text(value)
    rc, _, err = run(capsys, *argv)
    assert_user_error(rc, err, command, phrase)


def _absent_cuda() -> tuple[str, str]:
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.device_count()}", "CUDA device(s)"
    return "cuda", "no CUDA device here"


@pytest.mark.parametrize("flags, phrase", [
    (["--dtype", "fp33"], "--dtype 'fp33': unknown dtype 'fp33'; expected one of float64, float32, bfloat16"),
    (["--device", "nosuch"], "--device 'nosuch': not a torch device"),
    (["--device", _absent_cuda()[0]], _absent_cuda()[1]),
])
@pytest.mark.parametrize("command", ["generate", "chat", "serve", "conformance"])
def test_bad_device_or_dtype_is_found_before_the_checkpoint(capsys, tmp_path, command, flags, phrase):
    """Checked centrally, before the command runs: the missing checkpoint folder is not even looked at."""
    model = ["--backend", "torch"] if command == "conformance" else ["--model", str(tmp_path / "nothing")]
    rc, _, err = run(capsys, command, *model, *flags)
    assert_user_error(rc, err, command, phrase)


def test_a_command_exiting_with_a_message_exits_2(capsys):
    rc, _, err = run(capsys, "conformance", "--backend", "nosuch")
    assert rc == 2 and err.startswith("mxmoe conformance: no usable backend named 'nosuch'") and "Traceback" not in err


def test_debug_shows_the_traceback_of_a_user_error(broken, capsys, monkeypatch):
    path = str(broken["missing"])
    for argv in (["generate", "--model", path, "--debug"], ["--debug", "generate", "--model", path]):
        rc, _, err = run(capsys, *argv)
        assert rc == 2 and "Traceback" in err and "CheckpointError" in err
        assert err.rstrip().splitlines()[-1].startswith("mxmoe generate: ")
    monkeypatch.setenv("MXMOE_DEBUG", "1")
    rc, _, err = run(capsys, "chat", "--model", path)
    assert rc == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("mxmoe chat: ")


def test_a_bug_is_not_a_user_error(tiny, monkeypatch):
    import mxmoe.core.checkpoint as checkpoint

    def bug(path):
        raise RuntimeError("a bug in the loader")

    monkeypatch.setattr(checkpoint, "load_checkpoint", bug)
    with pytest.raises(RuntimeError, match="a bug in the loader"):
        main(["generate", "--model", str(tiny)])
    with pytest.raises(RuntimeError, match="a bug in the loader"):
        main(["chat", "--model", str(tiny)])


def _mxmoe(*args: str, code: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MXMOE_")}
    argv = [sys.executable, "-c", code] if code else [sys.executable, "-m", "mxmoe.core.cli", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**base, **(env or {})})


def test_subprocess_user_error_has_no_traceback_and_a_bug_has_one(tmp_path):
    missing = str(tmp_path / "nothing")
    r = _mxmoe("generate", "--model", missing, "--max-tokens", "2")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"mxmoe generate: {missing}: expected a checkpoint directory (config.json + *.safetensors), " \
                       "found nothing\n"
    bug = ("import mxmoe.core.checkpoint as c\n"
           "def load(path): raise ZeroDivisionError('a real bug')\n"
           "c.load_checkpoint = load\n"
           "from mxmoe.core.cli import main\n"
           f"raise SystemExit(main(['generate', '--model', {missing!r}]))\n")
    r = _mxmoe(code=bug)
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
    assert r.stderr.rstrip().endswith("ZeroDivisionError: a real bug")


# ---- item 2: a misspelled engine is an error; a known, unavailable one falls back with one line per op ------

@pytest.fixture
def dummy_plugins(monkeypatch, tmp_path_factory):
    """Two installed dummy plugins: one that fails to import, one whose engine is unavailable here."""
    site = tmp_path_factory.mktemp("site")
    for dist, ep, module in (("mxmoe-dummy-importerror", "importerror", "mxmoe_dummy_importerror"),
                             ("mxmoe-dummy-proberaises", "proberaises", "mxmoe_dummy_proberaises")):
        info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[mxmoe]\n{ep} = {module}\n")
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.syspath_prepend(str(site))
    yield site
    discover(refresh=True)


def test_unregistered_engine_is_an_error_listing_the_registered_ones(tiny, capsys, monkeypatch):
    rc, _, err = run(capsys, "generate", "--model", str(tiny), "--backend", "nosuchengine")
    registered = sorted(discover().classes)
    assert_user_error(rc, err, "generate", "backend 'nosuchengine' (requested by argument) is not registered",
                      f"registered engines: {', '.join(registered)}")
    assert "torch" in registered and err.count("\n") == 1, err  # once, not once per op
    # the same from the library, with or without strict mode; an override names its ops
    for strict in (False, True):
        with pytest.raises(BackendSelectionError, match="no engine named 'garbage'"):
            resolve_backends("garbage", strict=strict)
    with pytest.raises(BackendSelectionError, match=r"requested by argument for attention\) is not registered"):
        resolve_backends("attention=nosuch")


def test_unregistered_engine_says_why_a_known_plugin_did_not_load(tiny, dummy_plugins, capsys):
    rc, _, err = run(capsys, "generate", "--model", str(tiny), "--backend", "importerror")
    assert_user_error(rc, err, "generate", "backend 'importerror' (requested by argument) is not registered",
                      "plugin 'importerror' (mxmoe-dummy-importerror) is not loaded (failed): cannot load "
                      "'mxmoe_dummy_importerror'",
                      "ImportError: libdummy.so.1: cannot open shared object file")
    # a name of no plugin at all: the plugins that failed to load are named as possible sources
    with pytest.raises(BackendSelectionError, match=r"plugins that failed to load \(one may register it\): "
                                                    r"importerror \(mxmoe-dummy-importerror\)"):
        resolve_backends("fastt")


def test_known_unavailable_engine_falls_back_with_a_warning_per_op(dummy_plugins):
    with pytest.warns(BackendFallbackWarning) as record:
        res = resolve_backends("proberaises", dtype="float32")
    assert {b.name for b in res.ops.values()} == {"torch"}
    messages = [str(w.message) for w in record]
    assert len(messages) == 7 and all("\n" not in m for m in messages)
    assert all("backend 'proberaises' cannot serve it: unavailable: probe raised RuntimeError: driver exploded; "
               "falling back to 'torch'" in m for m in messages)


def test_strict_mode_refuses_the_fallback_in_one_line_for_the_ops_alike(tiny, dummy_plugins, capsys):
    rc, _, err = run(capsys, "generate", "--model", str(tiny), "--backend", "proberaises", "--strict")
    assert_user_error(rc, err, "generate", "cannot choose a backend for every op:\n  embedding, rms_norm, linear, "
                      "rope, attention, router, experts: backend 'proberaises' cannot serve it: unavailable: probe "
                      "raised RuntimeError: driver exploded\n", "`mxmoe backends --explain`")


def test_fallback_warnings_print_one_line_per_op_without_source_lines(tiny, dummy_plugins):
    r = _mxmoe("generate", "--model", str(tiny), "--backend", "proberaises", "--raw", "--prompt", "Hi",
               "--max-tokens", "1", "--dtype", "float32",
               env={"PYTHONPATH": os.pathsep.join([str(dummy_plugins), str(FIXTURES)])})
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if "warning" in line.lower()]
    assert len(warned) == 7, r.stderr
    for line in warned:
        assert line.startswith("mxmoe generate: warning: op '") and line.endswith("falling back to 'torch'"), line
    assert ".py:" not in r.stderr and "warnings.warn" not in r.stderr and "resolve_backends(" not in r.stderr


# ---- item 3: arguments checked before the model loads -------------------------------------------------------

@pytest.mark.parametrize("flags, phrase", [
    (["--max-tokens", "-1"], "--max-tokens -1: expected an integer >= 0"),
    (["--temperature", "-0.5"], "--temperature -0.5: expected a finite number >= 0"),
    (["--temperature", "nan"], "--temperature nan: expected a finite number >= 0"),
    (["--temperature", "inf"], "--temperature inf: expected a finite number >= 0"),
    (["--top-p", "0"], "--top-p 0.0: expected a number in (0, 1]"),
    (["--top-p", "1.5"], "--top-p 1.5: expected a number in (0, 1]"),
    (["--top-p", "nan"], "--top-p nan: expected a number in (0, 1]"),
    (["--max-batch", "0"], "--max-batch 0: expected a positive integer"),
    (["--max-context", "-3"], "--max-context -3: expected a positive integer"),
    (["--max-step-tokens", "0"], "--max-step-tokens 0: expected a positive integer"),
    (["--max-batch", "4", "--max-step-tokens", "2"], "--max-step-tokens 2 is less than --max-batch 4"),
    (["--cuda-graphs", "on", "--device", "cpu"], "CUDA graphs were asked for, but the model is on cpu"),
    (["--prompts", "no-such-file.txt"], "cannot read --prompts no-such-file.txt"),
])
def test_generate_arguments_are_checked_before_anything_is_read(tmp_path, capsys, flags, phrase):
    # The checkpoint folder does not exist: the message is about the argument, so it was judged first.
    rc, _, err = run(capsys, "generate", "--model", str(tmp_path / "not-read"), *flags)
    assert_user_error(rc, err, "generate", phrase)


@pytest.mark.parametrize("flags, phrase", [
    (["--max-tokens", "-1"], "--max-tokens -1: expected an integer >= 0"),
    (["--max-tokens", "0"], "--max-tokens 0: a reply needs at least one token"),
    (["--temperature", "nan"], "--temperature nan: expected a finite number >= 0"),
    (["--top-p", "0"], "--top-p 0.0: expected a number in (0, 1]"),
    (["--conversation", "no-such.json"], "cannot read no-such.json"),
])
def test_chat_arguments_are_checked_before_anything_is_read(tmp_path, capsys, flags, phrase):
    rc, _, err = run(capsys, "chat", "--model", str(tmp_path / "not-read"), *flags)
    assert_user_error(rc, err, "chat", phrase)


# ---- item 4: context limits -----------------------------------------------------------------------------------

def test_a_prompt_longer_than_the_context_is_refused_before_loading(tiny, capsys, monkeypatch):
    _no_loading(monkeypatch)
    long = " word" * 16000  # 16k tokens on a model of 1k positions
    rc, _, err = run(capsys, "generate", "--model", str(tiny), "--raw", "--prompt", long)
    assert_user_error(rc, err, "generate", "the prompt has 16000 tokens; with --max-tokens 64 that is 16064 "
                      f"positions, more than {LIMIT_TEXT}; the prompt alone leaves no room")
    rc, _, err = run(capsys, "generate", "--model", str(tiny), "--raw", "--prompt", "Hi", "--prompt", long,
                     "--prompt", long[:20000])
    assert_user_error(rc, err, "generate", "prompt 2 of 3 has 16000 tokens", "(2 prompts are too long)")


def test_max_tokens_past_the_context_is_refused_with_the_numbers(tiny, capsys, monkeypatch):
    from mxmoe.core.tokenizer import load_tokenizer

    _no_loading(monkeypatch)
    n = len(load_tokenizer().encode("Hi"))
    rc, _, err = run(capsys, "generate", "--model", str(tiny), "--raw", "--prompt", "Hi", "--max-tokens", "100000000")
    assert_user_error(rc, err, "generate", f"the prompt has {n} tokens; with --max-tokens 100000000 that is "
                      f"{n + 100000000} positions, more than {LIMIT_TEXT}; use --max-tokens {LIMIT - n} or less")
    rc, _, err = run(capsys, "generate", "--model", str(tiny), "--max-context", str(LIMIT + 1))
    assert_user_error(rc, err, "generate", f"--max-context {LIMIT + 1}: more than {LIMIT_TEXT}")
    rc, _, err = run(capsys, "chat", "--model", str(tiny), "--max-tokens", "100000000")
    assert_user_error(rc, err, "chat", "the conversation has", "with --max-tokens 100000000",
                      f"more than {LIMIT_TEXT}")


def test_exactly_the_context_is_accepted(tiny, capsys):
    from mxmoe.core.tokenizer import load_tokenizer

    n = len(load_tokenizer().encode("Hi"))
    # the prompt plus every token asked for fills the context exactly: allowed (and stopped early here)
    argv = ["generate", "--model", str(tiny), "--raw", "--prompt", "Hi", "--dtype", "float32", "--backend", "torch"]
    rc, _, err = run(capsys, *argv, "--max-tokens", str(LIMIT - n), "--max-context", "4")
    assert rc == 0, err
    rc, _, err = run(capsys, *argv, "--max-tokens", str(LIMIT - n + 1), "--max-context", "4")
    assert_user_error(rc, err, "generate", f"that is {LIMIT + 1} positions")


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """Tiny, with a context of 4096 positions and a small vocabulary (fast logits)."""
    from mxmoe.core.model import load_model

    d = tmp_path_factory.mktemp("tiny-4k")
    write_random_checkpoint(d, preset("tiny", vocab_size=512, initial_context_length=1024), "original", seed=5)
    return load_model(d, backend="torch", dtype="float32")


def test_engine_sizes_its_cache_by_the_context_not_by_max_tokens(long_model):
    from mxmoe.core.engine import SamplingParams, context_limit, engine_for

    limit = context_limit(long_model)
    assert limit == 4096
    eng = engine_for(long_model, [[1, 2, 3]], [SamplingParams(max_tokens=100_000_000)])
    assert eng.cache_len == limit and eng.cache.k.shape[2] == limit  # not 100M positions
    eng = engine_for(long_model, [[1, 2, 3]], [SamplingParams(max_tokens=5)])
    assert eng.cache_len == 3 + 5 - 1  # the job's own need, when it is smaller


def test_a_long_prompt_is_prefilled_in_chunks_of_the_step_budget(long_model, monkeypatch):
    """Attention memory per step is (step budget × context), never (prompt × prompt): a 3000-token prompt
    runs as two forward calls under the default budget of 2048 tokens, and gives the unchunked answer."""
    from mxmoe.core import engine as engine_mod

    prompt = torch.randint(0, 512, (3000,), generator=torch.Generator().manual_seed(6)).tolist()
    with torch.inference_mode():
        want = int(long_model.logits(prompt)[-1].argmax())  # one full forward: the oracle
    sizes = []
    inner = long_model.forward

    def forward(token_ids, batch, cache, logits_rows=None):
        sizes.append(int(token_ids.shape[0]))
        return inner(token_ids, batch, cache, logits_rows)

    monkeypatch.setattr(long_model, "forward", forward)
    assert list(long_model.generate(prompt, max_tokens=1)) == [want]
    assert sizes == [engine_mod.DEFAULT_MAX_STEP_TOKENS, 3000 - engine_mod.DEFAULT_MAX_STEP_TOKENS]


@pytest.fixture(scope="module")
def tiny_model(tiny):
    from mxmoe.core.model import load_model

    return load_model(tiny, backend="torch", dtype="float32")


def test_chat_refuses_a_turn_past_the_context_and_goes_on(tiny_model, capsys, monkeypatch):
    from mxmoe.core.harmony.chat import DEFAULT_REPLY_TOKENS, ChatSession, interactive, preamble

    head = preamble(date="2025-01-01")
    session = ChatSession(tiny_model, head, max_tokens=900, temperature=0.0)
    generated = []
    monkeypatch.setattr(tiny_model, "generate", lambda *a, **kw: generated.append(1) or iter(()))
    lines = iter([" word" * 200, "/exit"])
    out = io.StringIO()
    assert interactive(session, head, input_fn=lambda _: next(lines), out=out) == 0
    err = capsys.readouterr().err
    assert "with --max-tokens 900 that is" in err and f"more than {LIMIT_TEXT}" in err and "/reset starts over" in err
    assert generated == [] and session.messages == head  # nothing computed; the question was dropped
    # Without --max-tokens a reply gets what the context leaves, up to the default.
    session = ChatSession(tiny_model, head, max_tokens=None)
    assert session.reply_tokens(10) == min(DEFAULT_REPLY_TOKENS, LIMIT - 10)
    assert session.reply_tokens(LIMIT - 1) == 1
    with pytest.raises(cli.ContextLimitError, match="leaves no room for a reply"):
        session.reply_tokens(LIMIT)


# ---- item 7: mxmoe chat prints only what is meant for the user ---------------------------------------------

REPLY = ("<|channel|>analysis my secret reasoning<|end|>"  # a damaged header: still analysis
         "<|start|>assistant<|channel|>thoughts<|message|>unknown channel secret<|end|>"
         "<|start|>assistant<|message|>no channel secret<|end|>"
         "<|start|>assistant<|channel|>commentary<|message|>Let me check.<|end|>"
         "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
         '{"city": "Paris"}<|end|>'
         "<|start|>assistant<|channel|>final<|message|>The answer.<|return|>")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _printed(show_analysis: bool, terminal: bool = False) -> str:
    from mxmoe.core.harmony.chat import _Printer
    from mxmoe.core.harmony.parser import StreamParser
    from mxmoe.core.tokenizer import load_tokenizer

    tok = load_tokenizer()
    parser = StreamParser(tok, "assistant", strict=False)
    out = _Terminal() if terminal else io.StringIO()  # not a terminal: no colours, labels instead
    printer = _Printer(out, show_analysis)
    for delta in parser.feed(tok.encode(REPLY, allowed_special="all")) + parser.process_eos():
        printer(delta)
    return out.getvalue()


def test_chat_prints_only_the_reply_without_show_analysis():
    text = _printed(show_analysis=False)
    assert text == "Let me check.\n\n[call functions.get_weather] \nThe answer.\n"
    assert "secret" not in text and "Paris" not in text


def test_chat_show_analysis_labels_what_is_not_the_reply():
    assert _printed(show_analysis=True) == ("[analysis] my secret reasoning\n[analysis] unknown channel secret\n"
                                            "[analysis] no channel secret\nLet me check.\n\n"
                                            '[call functions.get_weather] {"city": "Paris"}\nThe answer.\n')
    # on a terminal, dimmed instead of labelled; the reply itself stays plain
    dim, reset = "\033[2m", "\033[0m"
    text = _printed(show_analysis=True, terminal=True)
    assert "[analysis]" not in text and f"{dim}my secret reasoning{reset}\n" in text
    assert text.endswith("\nThe answer.\n") and f"{dim}The answer." not in text
    assert _printed(show_analysis=False, terminal=True) == _printed(show_analysis=False)
