"""``mxmoe harmony render|parse`` and ``mxmoe chat`` (non-interactive and interactive) end to end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

import _harmony_oracle as O
from mxmoe.core.cli import main
from mxmoe.core.harmony.messages import Conversation

oh = O.oh


def _conversation():
    dev = oh.DeveloperContent.new().with_instructions("Be brief.").with_function_tools([
        oh.ToolDescription.new("get_weather", "Weather for a city",
                               {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})])
    return oh.Conversation.from_messages([
        oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new().with_conversation_start_date("2025-01-01")),
        oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev),
        oh.Message.from_role_and_content(oh.Role.USER, "Météo à Paris ?"),
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, "Need the tool.").with_channel("analysis"),
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, '{"city":"Paris"}').with_channel("commentary")
        .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"),
        oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "functions.get_weather"), '{"t": 21}')
        .with_channel("commentary").with_recipient("assistant"),
    ])


def test_render_cli_matches_oracle(tmp_path, capsys):
    conv = _conversation()
    path = tmp_path / "conv.json"
    path.write_text(conv.to_json())
    assert main(["harmony", "render", str(path), "--for-completion", "--text"]) == 0
    out = capsys.readouterr().out.split("\n", 1)
    expected = O.oracle().render_conversation_for_completion(conv, oh.Role.ASSISTANT)
    assert json.loads(out[0]) == expected
    assert out[1].rstrip("\n") == O.oracle().decode(expected)
    assert main(["harmony", "render", str(path)]) == 0
    assert json.loads(capsys.readouterr().out) == O.oracle().render_conversation(conv)


def test_parse_cli(tmp_path, capsys):
    enc = O.oracle()
    conv = _conversation()
    ids = enc.render_conversation(conv, oh.RenderConversationConfig(auto_drop_analysis=False))
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(ids))
    assert main(["harmony", "parse", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["messages"] == [m.to_dict() for m in enc.parse_messages_from_completion_tokens(ids, None)]
    # system/developer contents come back as their rendered text; the rest round-trips exactly
    assert Conversation.from_dict(out).messages[2:] == Conversation.from_json(conv.to_json()).messages[2:]
    # a completion (no leading <|start|>), malformed: lenient warns, strict fails with the position
    tok = O.tokenizer()
    bad = tok.encode("<|channel|>final<|message|>hi<|end|><|end|>", allowed_special="all")
    path.write_text(json.dumps({"tokens": bad}))
    assert main(["harmony", "parse", str(path), "--issues"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["messages"][0]["content"][0]["text"] == "hi" and result["issues"][0]["position"] == 5
    assert main(["harmony", "parse", str(path), "--strict"]) == 1
    assert "token 5" in capsys.readouterr().err


def test_render_cli_rejects_bad_input(tmp_path, capsys):
    path = tmp_path / "conv.json"
    path.write_text('{"messages": [{"role": "wizard", "content": "x"}]}')
    assert main(["harmony", "render", str(path)]) == 2
    assert "cannot read" in capsys.readouterr().err


# --- chat against a tiny random checkpoint (gibberish text: these test the plumbing) ---------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("torch")
    try:
        from mxmoe.core.checkpoint import write_random_checkpoint
        from mxmoe.core.config import preset
    except ImportError as e:
        pytest.skip(f"checkpoint writer not available: {e}")
    path = tmp_path_factory.mktemp("tiny")
    write_random_checkpoint(str(path), preset("tiny"), "original", seed=0)
    return path


def _mxmoe(*args, **kw):
    return subprocess.run([sys.executable, "-m", "mxmoe.core.cli", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def test_chat_non_interactive(tiny_model, tmp_path):
    from mxmoe.core import load_model

    path = tmp_path / "conv.json"
    conv = oh.Conversation.from_messages([oh.Message.from_role_and_content(oh.Role.USER, "Hello!")])
    path.write_text(conv.to_json())
    run = _mxmoe("chat", "--model", str(tiny_model), "--conversation", str(path), "--max-tokens", "12",
                 "--temperature", "0", "--date", "2025-01-01", "--reasoning", "high", "--backend", "torch",
                 "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    reply = json.loads(run.stdout)
    assert set(reply) == {"messages", "tool_calls", "issues", "stop_token", "truncated"}
    Conversation.from_dict(reply)  # the messages are in harmony's JSON shape
    # the same prompt and greedy decoding, run here: the reply is what the model generated, parsed leniently
    model = load_model(str(tiny_model), backend="torch", device="cpu", dtype="float32")
    from mxmoe.core.harmony.chat import STOP_TOKENS, ChatSession, preamble

    session = ChatSession(model, preamble("high", date="2025-01-01") + Conversation.from_json(conv.to_json()).messages,
                          max_tokens=12, temperature=0.0)
    prompt = session.renderer.render_for_completion(session.messages)
    assert O.oracle().decode(prompt).endswith("<|start|>user<|message|>Hello!<|end|><|start|>assistant")
    tokens = list(model.generate(prompt, max_tokens=12, temperature=0.0, stop_tokens=STOP_TOKENS))
    assert len(tokens) <= 12
    assert all(t not in STOP_TOKENS for t in tokens[:-1])  # generation stops at <|return|> / <|call|>
    parser = session.reply()
    assert parser.tokens == tokens
    assert reply["stop_token"] == parser.stop_token
    # the subprocess parsed the same tokens the same way
    assert json.dumps(reply["messages"], ensure_ascii=False) == \
        json.dumps([m.to_dict() for m in parser.messages], ensure_ascii=False)
    # lenient parsing keeps all generated text (content or header text) somewhere in the messages or issues
    _assert_text_kept(model.tokenizer, tokens, reply)


def _assert_text_kept(tok, tokens, reply):
    """Every run of ordinary (non-special) generated tokens is found again in the reply: as message content,
    or, for header text, word by word in the header fields (``to=x`` as recipient ``x``), or in an issue."""
    kept = []
    for m in reply["messages"]:
        kept += [c.get("text", "") for c in m["content"]]
        kept += [m.get(k) or "" for k in ("name", "channel", "recipient", "content_type")]
    kept += [i["reason"] for i in reply["issues"]]
    blob = "\n".join(kept)
    runs, run = [], []
    for t in tokens + [None]:
        if t is None or tok.is_special(t):
            if run:
                runs.append(tok.decode(run))
            run = []
        else:
            run.append(t)
    assert runs, "the tiny model generated ordinary tokens"
    for text in runs:
        assert text in blob or all(w.split("=", 1)[-1] in blob for w in text.split()), (text, blob)


def test_chat_interactive_stdin_and_eof(tiny_model):
    run = _mxmoe("chat", "--model", str(tiny_model), "--max-tokens", "5", "--temperature", "0",
                 "--show-analysis", input="Hi there\n/reset\nSecond\n")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and "[conversation reset]" in run.stderr


def test_chat_interactive_ctrl_c_at_prompt(tiny_model):
    proc = subprocess.Popen([sys.executable, "-m", "mxmoe.core.cli", "chat", "--model", str(tiny_model)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        line = ""
        while "Ctrl-D" not in line and time.time() < deadline:  # the banner: the model is loaded
            line = proc.stderr.readline()
        assert "Ctrl-D" in line
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_chat_reply_interrupted_keeps_session_usable(tiny_model):
    from mxmoe.core import load_model
    from mxmoe.core.harmony.chat import ChatSession, interactive, preamble

    model = load_model(str(tiny_model), backend="torch", device="cpu", dtype="float32")
    session = ChatSession(model, preamble(date="2025-01-01"), max_tokens=8, temperature=0.0)
    real_generate = model.generate
    calls = {"n": 0}

    def generate_then_interrupt(*a, **kw):  # a Ctrl-C arriving mid-reply
        for i, t in enumerate(real_generate(*a, **kw)):
            if i == 3 and calls["n"] == 0:
                calls["n"] += 1
                raise KeyboardInterrupt
            yield t

    model.generate = generate_then_interrupt
    lines = iter(["first question", "second question"])

    def fake_input(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    import io

    out = io.StringIO()
    assert interactive(session, preamble(date="2025-01-01"), input_fn=fake_input, out=out) == 0
    assert [m.text for m in session.messages if m.author.role.value == "user"] in ([], ["second question"])
    assert calls["n"] == 1


@pytest.mark.parametrize("content", ["null", "7"])
def test_render_cli_bad_content_is_an_error_not_a_traceback(tmp_path, content):
    path = tmp_path / "conv.json"
    path.write_text('{"messages": [{"role": "user", "content": %s}]}' % content)
    run = _mxmoe("harmony", "render", str(path))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "message 0: content must be a string or a list of content parts" in run.stderr


def test_chat_conversation_bad_content_is_an_error_not_a_traceback(tmp_path):
    path = tmp_path / "conv.json"
    path.write_text('{"messages": [{"role": "user", "content": null}]}')
    run = _mxmoe("chat", "--model", str(tmp_path / "no-model"), "--conversation", str(path))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "message 0: content must be a string or a list of content parts, found null" in run.stderr
