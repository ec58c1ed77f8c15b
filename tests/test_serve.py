"""`mxmoe serve` (core/serve/): the OpenAI API over HTTP, driven on loopback by the official `openai` client.

A tiny random float32 checkpoint writes gibberish, so replies whose shape matters are forced: the test engine
below replaces the sampled token by a chosen harmony sequence for requests whose prompt contains a marker
(chosen tokens through the real engine, parser and HTTP stack; nothing depends on luck). Oracles: the
harmony renderer for prompts (itself checked against openai-harmony), the forced token sequences for replies,
and OpenAI's documented shapes, read back through the official client's own types.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import openai
import pytest
import torch
import uvicorn

from mxmoe.core.checkpoint import write_random_checkpoint
from mxmoe.core.config import preset
from mxmoe.core.engine import Engine
from mxmoe.core.harmony import DeveloperContent, Message, Renderer, Role, SystemContent, ToolDescription
from mxmoe.core.model import load_model
from mxmoe.core.serve.app import make_app
from mxmoe.core.serve.convert import Reply, TextFilter, _result_message

DATE = "2026-01-01"  # the system message's date, fixed so prompts can be compared token for token
MAX_CONTEXT = 384
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops on a shared 2-core machine (FACTS.md)
    yield
    torch.set_num_threads(n)


class ScriptedEngine(Engine):
    """The real engine, with two test controls: ``scripts`` (marker → token ids) forces the tokens of any
    request whose prompt text contains the marker, then lets the model go on; ``gate`` (an Event) holds
    every step while cleared. ``prompts`` records every submitted prompt."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.scripts: dict[str, list[int]] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.prompts: list[list[int]] = []
        self.requests: list = []
        self.fail_next_step = False
        self._script_of: dict[int, list[int] | None] = {}

    def submit(self, prompt_ids, params=None, on_token=None, logits_processor=None):
        self.prompts.append(list(prompt_ids))
        self.requests.append(super().submit(prompt_ids, params, on_token, self._force_script))
        return self.requests[-1]

    def step(self):
        self.gate.wait()
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("a backend broke")
        return super().step()

    def _script(self, r) -> list[int] | None:
        if r.id not in self._script_of:
            text = self.model.tokenizer.decode(r.prompt_ids)
            self._script_of[r.id] = next((s for m, s in self.scripts.items() if m in text), None)
        return self._script_of[r.id]

    def _force_script(self, r, logits):  # the engine's public per-request logits hook
        script = self._script(r)
        if script is not None and len(r.token_ids) < len(script):
            forced = torch.full_like(logits, float("-inf"))
            forced[script[len(r.token_ids)]] = 0.0  # the only finite logit: greedy or sampled, it is chosen
            return forced
        return logits

    def prompt_with(self, marker: str) -> list[int]:
        return next(p for p in reversed(self.prompts) if marker in self.model.tokenizer.decode(p))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-serve")
    write_random_checkpoint(d, preset("tiny"), "original", seed=5)
    return load_model(d, backend="torch", dtype="float32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An app served by uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def raw(self, method: str, path: str, body=None, headers=None):
        """(status, headers, parsed JSON or text) of one request; ``body`` is sent as is (bytes/str) or as JSON."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return resp.status, dict(resp.getheaders()), parsed

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@contextmanager
def serving(engine, **kwargs):
    kwargs.setdefault("date", DATE)
    srv = Server(make_app(engine, model_name="tiny", **kwargs))
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def engine(model):
    return ScriptedEngine(model, max_batch=4, max_context=MAX_CONTEXT)


@pytest.fixture(scope="module")
def server(engine):
    with serving(engine) as srv:
        yield srv


@pytest.fixture
def client(server):
    return server.client()


@pytest.fixture
def tok(model):
    return model.tokenizer


def harmony(tok, text: str) -> list[int]:
    """Tokens of harmony text, special tokens included."""
    return tok.encode(text, allowed_special="all")


def expected_prompt(tok, messages: list[Message], effort="medium", instructions=None, tools=None) -> list[int]:
    """The prompt the server must render: harmony's system message (effort, date), a developer message
    with the instructions and tools when there are any, then the conversation."""
    head = [Message.create(Role.SYSTEM, SystemContent(reasoning_effort=effort, conversation_start_date=DATE))]
    if instructions or tools:
        dev = DeveloperContent(instructions=instructions)
        if tools:
            dev.with_function_tools(tools)
        head.append(Message.create(Role.DEVELOPER, dev))
    return Renderer(tok).render_for_completion(head + messages)


def no_special_text(*texts) -> None:
    for t in texts:
        if t:
            assert "<|" not in t and "|>" not in t, t
            assert not any(name in t for name in ("<|start|>", "<|end|>", "<|message|>", "<|channel|>")), t


REASONING_THEN_ANSWER = ("<|channel|>analysis<|message|>The user greets; answer briefly.<|end|>"
                         "<|start|>assistant<|channel|>final<|message|>Hello there, friend!<|return|>")


# ---- pieces without HTTP ---------------------------------------------------------------------------

def test_text_filter_cuts_special_names_and_stop_strings_across_deltas():
    f = TextFilter(["STOP"])
    out = [f.push(p) for p in ["Hel", "lo <|", "end|", "> wor", "ld ST", "OP and more"]]
    assert "".join(out) == "Hello  world "
    assert f.stopped and f.matched == "STOP" and f.flush() == ""
    g = TextFilter()
    assert g.push("a <|re") == "a " and g.push("served_200100|>b") == "b" and g.flush() == ""
    h = TextFilter(["xyz"])
    assert h.push("ab x") == "ab " and h.push("y") == "" and h.flush() == "xy"  # a held tail comes out at the end
    assert TextFilter._scrub("<|st<|end|>art|>x") == "x"  # cutting one name must not leave another


def test_reply_keeps_analysis_out_of_content_however_it_ends(tok):
    tokens = harmony(tok, REASONING_THEN_ANSWER)
    for cut in range(1, len(tokens) + 1):  # cut off after every token, and run to the end
        reply = Reply(tok)
        events = [e for t in tokens[:cut] for e in reply.push(t)]
        events += reply.finish("length" if cut < len(tokens) else "stop")
        assert "The user" not in reply.text("message") and "greets" not in reply.text("message")
        assert "Hello" not in reply.text("reasoning")
        assert "".join(e.text for e in events if e.item.kind == "message") == reply.text("message")
        no_special_text(reply.text("message"), reply.text("reasoning"))
        assert reply.finish_reason == ("length" if cut < len(tokens) else "stop")
    assert reply.text("message") == "Hello there, friend!"
    assert reply.text("reasoning") == "The user greets; answer briefly."
    assert reply.reasoning_tokens == len(harmony(tok, "<|channel|>analysis<|message|>The user greets; answer "
                                                      "briefly.<|end|>"))


def test_reply_never_raises_on_random_token_streams(tok):
    g = torch.Generator().manual_seed(0)
    structural = [tok.special(n) for n in ("start", "end", "message", "channel", "constrain", "return", "call",
                                           "endoftext")] + [200100, 200200]
    words = harmony(tok, "analysis final commentary to=functions.f assistant user json hello {}")
    for _ in range(200):
        n = int(torch.randint(1, 40, (1,), generator=g))
        pool = structural + words
        tokens = [pool[int(i)] for i in torch.randint(0, len(pool), (n,), generator=g)]
        reply = Reply(tok, stop=["hello"])
        for t in tokens:
            reply.push(t)
        reply.finish("length")
        assert reply.finish_reason in ("stop", "length", "tool_calls")
        for item in reply.items:
            no_special_text(item.text, item.name)
        assert all(i.done for i in reply.items)


# ---- Chat Completions ------------------------------------------------------------------------------

def test_chat_separates_reasoning_from_content(engine, client, tok):
    engine.scripts["marker-chat-1"] = harmony(tok, REASONING_THEN_ANSWER)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi marker-chat-1"}],
                                       max_tokens=100, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == "Hello there, friend!"
    assert choice.message.reasoning_content == "The user greets; answer briefly."
    assert choice.message.tool_calls is None and choice.message.role == "assistant"
    n = len(engine.scripts["marker-chat-1"])
    assert r.usage.completion_tokens == n and r.usage.total_tokens == r.usage.prompt_tokens + n
    prompt = engine.prompt_with("marker-chat-1")
    assert r.usage.prompt_tokens == len(prompt)
    assert prompt == expected_prompt(tok, [Message.create(Role.USER, "hi marker-chat-1")])
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl")


def test_chat_stream_matches_the_whole_reply(engine, client, tok):
    engine.scripts["marker-chat-2"] = harmony(tok, REASONING_THEN_ANSWER)
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "marker-chat-2"}], max_tokens=100,
                  temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert reasoning == whole.choices[0].message.reasoning_content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed, not one lump


def test_chat_tool_call_round_trip(engine, client, tok):
    call = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
            "to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>")
    engine.scripts["marker-tool-1"] = harmony(tok, call)
    messages = [{"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Weather in Paris? marker-tool-1"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL], max_tokens=100,
                                       temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.reasoning_content == "Need the weather."
    [tc] = choice.message.tool_calls
    assert tc.type == "function" and tc.function.name == "get_weather"
    assert json.loads(tc.function.arguments) == {"city": "Paris"} and tc.id
    tool = ToolDescription(name="get_weather", description="Current weather in a city",
                           parameters=WEATHER_TOOL["function"]["parameters"])
    assert engine.prompt_with("marker-tool-1") == expected_prompt(
        tok, [Message.create(Role.USER, "Weather in Paris? marker-tool-1")], instructions="Be terse.", tools=[tool])

    # The same call streamed: id and name first, then the arguments in pieces.
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL],
                                                 max_tokens=100, temperature=0, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and deltas[0].index == 0
    assert "".join(d.function.arguments or "" for d in deltas) == tc.function.arguments
    assert len(deltas) > 2 and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(not (c.choices and c.choices[0].delta.content) for c in chunks[1:])

    # Round trip: the call and its result go back in; the model answers.
    engine.scripts["marker-tool-1"] = harmony(tok, "<|channel|>final<|message|>It is 20 C in Paris.<|return|>")
    messages += [{"role": "assistant", "content": None, "reasoning_content": "Need the weather.",
                  "tool_calls": [tc.model_dump()]},
                 {"role": "tool", "tool_call_id": tc.id, "content": '{"temp_c": 20}'}]
    r2 = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL], max_tokens=100,
                                        temperature=0)
    assert r2.choices[0].message.content == "It is 20 C in Paris." and r2.choices[0].finish_reason == "stop"
    history = [Message.create(Role.USER, "Weather in Paris? marker-tool-1"),
               Message.create(Role.ASSISTANT, "Need the weather.", channel="analysis"),
               Message.create(Role.ASSISTANT, '{"city": "Paris"}', channel="commentary",
                              recipient="functions.get_weather", content_type="<|constrain|>json"),
               _result_message("get_weather", '{"temp_c": 20}')]
    prompt = engine.prompt_with("temp_c")
    assert prompt == expected_prompt(tok, history, instructions="Be terse.", tools=[tool])
    text = tok.decode(prompt)
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{\"temp_c\": 20}<|end|>" in text
    assert "to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>" in text


def test_tool_choice_shapes_the_prompt(engine, client, tok):
    engine.scripts["marker-choice"] = harmony(tok, '{"city": "Oslo"}<|call|>')
    base = dict(model="tiny", messages=[{"role": "user", "content": "marker-choice"}], tools=[WEATHER_TOOL],
                max_tokens=30, temperature=0)
    named = client.chat.completions.create(**base, tool_choice={"type": "function",
                                                                "function": {"name": "get_weather"}})
    prefix = harmony(tok, "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>")
    assert engine.prompt_with("marker-choice")[-len(prefix):] == prefix
    [tc] = named.choices[0].message.tool_calls
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Oslo"}
    assert named.choices[0].finish_reason == "tool_calls"
    # With tool_choice none the tools are not in the prompt, and a call the model writes anyway is no call.
    engine.scripts["marker-choice"] = harmony(tok, "<|channel|>commentary to=functions.get_weather<|message|>{}<|call|>")
    none = client.chat.completions.create(**base, tool_choice="none")
    assert "get_weather" not in tok.decode(engine.prompt_with("marker-choice"))
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "stop"
    assert none.choices[0].message.content == ""
    client.chat.completions.create(**base, tool_choice="required")
    assert tok.decode(engine.prompt_with("marker-choice")).endswith(
        "<|start|>assistant<|channel|>commentary to=functions.")
    # The Responses spelling of a named choice.
    engine.scripts["marker-choice"] = harmony(tok, '{"city": "Oslo"}<|call|>')
    r = client.responses.create(model="tiny", input="marker-choice", max_output_tokens=30, temperature=0,
                                tools=[{"type": "function", **WEATHER_TOOL["function"]}],
                                tool_choice={"type": "function", "name": "get_weather"})
    assert engine.prompt_with("marker-choice")[-len(prefix):] == prefix
    assert [(o.type, o.name, o.arguments) for o in r.output] == [("function_call", "get_weather", '{"city": "Oslo"}')]


def test_response_formats_are_written_into_the_developer_message(engine, client, tok):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "marker-format"}],
                                   max_tokens=1, response_format={"type": "json_schema", "json_schema": {
                                       "name": "reply", "description": "The reply.", "schema": schema}})
    text = tok.decode(engine.prompt_with("marker-format"))
    assert "# Response Formats\n\n## reply\n\n// The reply.\n" + json.dumps(schema, separators=(",", ":")) in text
    client.responses.create(model="tiny", input="marker-format-2", max_output_tokens=1,
                            text={"format": {"type": "json_schema", "name": "reply", "schema": schema}})
    assert "## reply" in tok.decode(engine.prompt_with("marker-format-2"))


def test_reasoning_effort_reaches_the_system_message(engine, client, tok):
    for effort in ("low", "high", None):
        marker = f"marker-effort-{effort}"
        extra = {} if effort is None else {"reasoning_effort": effort}
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": marker}], max_tokens=1,
                                       **extra)
        system = tok.decode(engine.prompt_with(marker)).split("<|end|>")[0]
        assert f"Reasoning: {effort or 'medium'}" in system
    client.responses.create(model="tiny", input="marker-effort-resp", reasoning={"effort": "high"},
                            max_output_tokens=1)
    assert "Reasoning: high" in tok.decode(engine.prompt_with("marker-effort-resp")).split("<|end|>")[0]


def test_cut_off_output_keeps_analysis_out_of_content(engine, client, tok):
    script = engine.scripts["marker-cut"] = harmony(tok, REASONING_THEN_ANSWER)
    head = len(harmony(tok, "<|channel|>analysis<|message|>"))
    upto_analysis = head + 3  # three tokens into the reasoning
    ask = dict(model="tiny", messages=[{"role": "user", "content": "marker-cut"}], temperature=0)
    r = client.chat.completions.create(**ask, max_tokens=upto_analysis)
    c = r.choices[0]
    assert c.finish_reason == "length" and c.message.content == ""
    assert c.message.reasoning_content == tok.decode(script[head:upto_analysis])
    chunks = list(client.chat.completions.create(**ask, max_tokens=upto_analysis, stream=True))
    assert not any(ch.choices[0].delta.content for ch in chunks if ch.choices)
    assert chunks[-1].choices[0].finish_reason == "length"
    # Cut inside the answer: what was said so far, and "length".
    answer = script.index(tok.special("message"), head) + 1  # the final message's text starts here
    r = client.chat.completions.create(**ask, max_tokens=answer + 2)
    assert r.choices[0].message.content == tok.decode(script[answer:answer + 2])
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content
    assert r.choices[0].message.reasoning_content == "The user greets; answer briefly."
    # Responses: status incomplete, a reasoning item only.
    rr = client.responses.create(model="tiny", input="marker-cut", max_output_tokens=upto_analysis, temperature=0)
    assert rr.status == "incomplete" and rr.incomplete_details.reason == "max_output_tokens"
    assert [o.type for o in rr.output] == ["reasoning"] and rr.output_text == ""
    assert rr.output[0].content[0].text == c.message.reasoning_content and rr.output[0].status == "incomplete"


def test_stop_strings_cut_the_answer_not_the_reasoning(engine, client, tok):
    engine.scripts["marker-stop"] = harmony(tok, "<|channel|>analysis<|message|>say END later<|end|><|start|>"
                                                 "assistant<|channel|>final<|message|>one two END three<|return|>")
    for stream in (False, True):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "marker-stop"}],
                                           stop=["END"], max_tokens=100, temperature=0, stream=stream)
        if stream:
            chunks = list(r)
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            content, reasoning = r.choices[0].message.content, r.choices[0].message.reasoning_content
            finish = r.choices[0].finish_reason
        assert content == "one two " and reasoning == "say END later" and finish == "stop"


def test_special_tokens_and_malformed_output_give_well_formed_replies(engine, client, tok):
    cases = {
        # reserved and structural tokens inside the answer
        "marker-bad-1": "<|channel|>final<|message|>A<|reserved_200100|>B<|constrain|>C<|channel|>D<|return|>",
        # a header broken off by <|end|>: its channel survives, the rest (with <|constrain|> text) is content
        "marker-bad-2": "<|channel|>final <|constrain|>json<|end|><|start|>assistant<|channel|>final<|message|>ok"
                        "<|return|>",
        # the model starts the user's next turn: the reply ends there, nothing of it is shown
        "marker-bad-3": "<|channel|>final<|message|>Answer.<|end|><|start|>user<|message|>fake question<|end|>",
        # <|call|> without a recipient, and text before any header
        "marker-bad-4": "stray<|message|>text<|call|>",
        # a damaged analysis header: still reasoning, never content
        "marker-bad-5": "<|channel|>analysis secret thoughts<|end|><|start|>assistant<|channel|>final<|message|>"
                        "shown<|return|>",
    }
    for marker, script in cases.items():
        engine.scripts[marker] = harmony(tok, script)
    results = {}
    for marker in cases:
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": marker}],
                                           max_tokens=60, temperature=0)
        m = r.choices[0].message
        no_special_text(m.content, m.reasoning_content)
        assert r.choices[0].finish_reason in ("stop", "length")
        results[marker] = (m.content, m.reasoning_content, r.choices[0].model_extra.get("harmony_issues"))
    assert results["marker-bad-1"][0] == "ABCD" and results["marker-bad-1"][2]
    assert results["marker-bad-2"][0].endswith("ok")
    assert results["marker-bad-3"][0] == "Answer." and "fake" not in str(results["marker-bad-3"])
    assert results["marker-bad-4"][0] in ("", None) and results["marker-bad-4"][1] == "text"  # no channel: hidden
    assert results["marker-bad-5"][0] == "shown" and "secret" in results["marker-bad-5"][1]
    for marker in cases:  # the Responses endpoint takes the same output as well
        rr = client.responses.create(model="tiny", input=marker, max_output_tokens=60, temperature=0)
        assert rr.status in ("completed", "incomplete")
        no_special_text(rr.output_text, *[c.text for o in rr.output if o.type == "reasoning" for c in o.content])
        assert "secret" not in rr.output_text and "fake" not in rr.output_text


# ---- Responses -------------------------------------------------------------------------------------

def test_responses_reply_and_stream_events(engine, client, tok):
    engine.scripts["marker-resp-1"] = harmony(tok, REASONING_THEN_ANSWER)
    r = client.responses.create(model="tiny", input="marker-resp-1", instructions="Be kind.", temperature=0,
                                max_output_tokens=100)
    assert r.status == "completed" and r.object == "response" and r.incomplete_details is None
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "The user greets; answer briefly."
    assert r.output_text == "Hello there, friend!" and r.output[1].status == "completed"
    assert r.usage.output_tokens == len(engine.scripts["marker-resp-1"])
    assert r.usage.input_tokens == len(engine.prompt_with("marker-resp-1"))
    assert engine.prompt_with("marker-resp-1") == expected_prompt(
        tok, [Message.create(Role.USER, "marker-resp-1")], instructions="Be kind.")
    events = list(client.responses.create(model="tiny", input="marker-resp-1", instructions="Be kind.",
                                          temperature=0, max_output_tokens=100, stream=True))
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    squeezed = [t for i, t in enumerate(types) if i == 0 or t != types[i - 1]]  # runs of deltas as one
    assert squeezed == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == r.output_text and events[-1].response.output_text == r.output_text
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == \
        r.output[0].content[0].text


def test_responses_tool_call_round_trip_with_previous_response(engine, client, tok):
    engine.scripts["marker-resp-tool"] = harmony(
        tok, "<|channel|>analysis<|message|>Call it.<|end|><|start|>assistant to=functions.get_weather"
             "<|channel|>commentary <|constrain|>json<|message|>{\"city\":\"Rome\"}<|call|>")
    tool = {"type": "function", **WEATHER_TOOL["function"]}
    r1 = client.responses.create(model="tiny", input="Rome? marker-resp-tool", tools=[tool], temperature=0,
                                 max_output_tokens=100)
    assert [o.type for o in r1.output] == ["reasoning", "function_call"] and r1.status == "completed"
    call = r1.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Rome"} and call.call_id
    # Streamed, the call's arguments arrive as deltas, then done with the name.
    events = list(client.responses.create(model="tiny", input="Rome? marker-resp-tool", tools=[tool],
                                          temperature=0, max_output_tokens=100, stream=True))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert args == call.arguments and done[0].arguments == call.arguments and done[0].name == "get_weather"

    engine.scripts["marker-resp-tool"] = harmony(tok, "<|channel|>final<|message|>Sunny in Rome.<|return|>")
    r2 = client.responses.create(model="tiny", previous_response_id=r1.id, tools=[tool], temperature=0,
                                 max_output_tokens=100,
                                 input=[{"type": "function_call_output", "call_id": call.call_id,
                                         "output": '{"sky": "clear"}'}])
    assert r2.output_text == "Sunny in Rome." and r2.previous_response_id == r1.id
    t = ToolDescription(name="get_weather", description="Current weather in a city", parameters=tool["parameters"])
    history = [Message.create(Role.USER, "Rome? marker-resp-tool"),
               Message.create(Role.ASSISTANT, "Call it.", channel="analysis"),
               Message.create(Role.ASSISTANT, '{"city":"Rome"}', channel="commentary",
                              recipient="functions.get_weather", content_type="<|constrain|>json"),
               _result_message("get_weather", '{"sky": "clear"}')]
    assert engine.prompt_with('"sky"') == expected_prompt(tok, history, tools=[t])
    # A third turn chains on the second: the whole conversation, reasoning of finished turns dropped.
    engine.scripts["marker-resp-tool"] = harmony(tok, "<|channel|>final<|message|>You are welcome.<|return|>")
    r3 = client.responses.create(model="tiny", previous_response_id=r2.id, input="thanks", tools=[tool],
                                 max_output_tokens=20, temperature=0)
    assert r3.output_text == "You are welcome."
    third = tok.decode(engine.prompt_with("thanks"))
    assert "Sunny in Rome." in third and '{"sky": "clear"}' in third and "Call it." not in third
    got = client.responses.retrieve(r2.id)
    assert got.id == r2.id and got.output_text == "Sunny in Rome."
    # Not stored: not retrievable, not a previous response.
    r4 = client.responses.create(model="tiny", input="x", store=False, max_output_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny", previous_response_id=r4.id, input="y", max_output_tokens=1)


# ---- the rest of the API ---------------------------------------------------------------------------

def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, _, body = server.raw("GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["max_context"] == MAX_CONTEXT
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "m"}], max_tokens=2)
    status, headers, text = server.raw("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for family in ("mxmoe_http_requests_total", "mxmoe_requests_finished_total", "mxmoe_prompt_tokens_total",
                   "mxmoe_generation_tokens_total", "mxmoe_queue_length", "mxmoe_requests_running",
                   "mxmoe_batch_size", "mxmoe_time_to_first_token_seconds", "mxmoe_inter_token_latency_seconds"):
        assert f"# TYPE {family} " in text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(samples['mxmoe_http_requests_total{endpoint="/v1/chat/completions",status="200"}']) >= 1
    assert float(samples["mxmoe_generation_tokens_total"]) >= 2
    assert float(samples["mxmoe_time_to_first_token_seconds_count"]) >= 1
    assert float(samples["mxmoe_inter_token_latency_seconds_count"]) >= 1


def test_api_key(model):
    with serving(ScriptedEngine(model, max_batch=1, max_context=128), api_key="sekret") as srv:
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong").models.list()
        status, _, body = srv.raw("GET", "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        status, _, body = srv.raw("POST", "/v1/chat/completions", {"model": "tiny", "messages": []})
        assert status == 401  # before the body is even looked at
        assert srv.raw("GET", "/metrics")[0] == 401
        assert srv.raw("GET", "/health")[0] == 200
        good = srv.client("sekret")
        assert good.models.list().data[0].id == "tiny"
        r = good.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1)
        assert r.usage.completion_tokens == 1
        assert srv.raw("GET", "/metrics", headers={"Authorization": "Bearer sekret"})[0] == 200


USER = [{"role": "user", "content": "hi"}]
BAD_CHAT = [  # (body, status, param)
    ({"model": "nope", "messages": USER}, 404, "model"),
    ({"messages": USER}, 400, "model"),
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": "hi"}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": "tiny", "messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages[0].content[0].type"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x", "mood": "happy"}]}, 400, "messages[0].mood"),
    ({"model": "tiny", "messages": [{"role": "tool", "content": "x", "tool_call_id": "call_1"}]}, 400,
     "messages[0].tool_call_id"),
    ({"model": "tiny", "messages": [{"role": "assistant"}]}, 400, "messages[0].content"),
    ({"model": "tiny", "messages": USER, "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "tiny", "messages": USER, "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "messages": USER, "max_tokens": 10**12}, 400, "max_tokens"),
    ({"model": "tiny", "messages": USER, "max_completion_tokens": MAX_CONTEXT}, 400, "max_completion_tokens"),
    ({"model": "tiny", "messages": USER, "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": USER, "temperature": 7}, 400, "temperature"),
    ({"model": "tiny", "messages": USER, "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "messages": USER, "seed": 2**70}, 400, "seed"),
    ({"model": "tiny", "messages": USER, "stream": "yes"}, 400, "stream"),
    ({"model": "tiny", "messages": USER, "n": 3}, 400, "n"),
    ({"model": "tiny", "messages": USER, "logprobs": True}, 400, "logprobs"),
    ({"model": "tiny", "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "messages": USER, "stop": 3}, 400, "stop"),
    ({"model": "tiny", "messages": USER, "wat": 1}, 400, "wat"),
    ({"model": "tiny", "messages": USER, "reasoning_effort": "extreme"}, 400, "reasoning_effort"),
    ({"model": "tiny", "messages": USER, "tools": [{"type": "retrieval"}]}, 400, "tools[0].type"),
    ({"model": "tiny", "messages": USER, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, 400,
     "tools[0].function.name"),
    ({"model": "tiny", "messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string"}}}]}, 400, "tools[0].function.parameters"),
    ({"model": "tiny", "messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": 5}}}}]}, 400, "tools[0].function.parameters"),
    ({"model": "tiny", "messages": USER, "tools": [{"type": "function", "function": {"name": "f",
                                                                                   "parameters": []}}]}, 400,
     "tools[0].function.parameters"),
    ({"model": "tiny", "messages": USER, "tools": [WEATHER_TOOL, WEATHER_TOOL]}, 400, "tools[1].function.name"),
    ({"model": "tiny", "messages": USER, "tools": [WEATHER_TOOL], "tool_choice": {
        "type": "function", "function": {"name": "other"}}}, 400, "tool_choice"),
    ({"model": "tiny", "messages": USER, "tool_choice": "required"}, 400, "tool_choice"),
    ({"model": "tiny", "messages": USER, "tool_choice": "sometimes"}, 400, "tool_choice"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "word " * MAX_CONTEXT}]}, 400, "messages"),
    ({"model": "tiny", "messages": USER, "max_tokens": MAX_CONTEXT - 10}, 400, "max_tokens"),
]


@pytest.mark.parametrize("body,status,param", BAD_CHAT, ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD_CHAT)])
def test_bad_chat_requests_get_openai_errors(server, body, status, param):
    got, _, reply = server.raw("POST", "/v1/chat/completions", body)
    assert got == status, reply
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    assert err["param"] == param, err


BAD_RESPONSES = [
    ({"model": "tiny", "input": 5}, 400, "input"),
    ({"model": "tiny"}, 400, "input"),
    ({"model": "tiny", "input": [{"type": "picture"}]}, 400, "input[0].type"),
    ({"model": "tiny", "input": [{"role": "wizard", "content": "x"}]}, 400, "input[0].role"),
    ({"model": "tiny", "input": [{"type": "function_call_output", "call_id": "nope", "output": "1"}]}, 400,
     "input[0].call_id"),
    ({"model": "tiny", "input": "x", "previous_response_id": "resp_missing"}, 404, "previous_response_id"),
    ({"model": "tiny", "input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"model": "tiny", "input": "x", "reasoning": {"effort": "max"}}, 400, "reasoning.effort"),
    ({"model": "tiny", "input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"model": "tiny", "input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]},
     400, "tools[0].parameters"),
    ({"model": "other", "input": "x"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD_RESPONSES,
                         ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD_RESPONSES)])
def test_bad_responses_requests_get_openai_errors(server, body, status, param):
    got, _, reply = server.raw("POST", "/v1/responses", body)
    assert got == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["param"] == param


def test_malformed_bodies_and_routes(model, server):
    for raw in (b"{not json", b"[1, 2]", b'{"model": NaN}', "\u00e9".encode("latin-1")):
        status, _, reply = server.raw("POST", "/v1/chat/completions", raw)
        assert status == 400 and reply["error"]["code"] == "invalid_json", raw
    status, _, reply = server.raw("POST", "/v1/nothing", {})
    assert status == 404 and set(reply["error"]) == {"message", "type", "param", "code"}
    status, _, reply = server.raw("GET", "/v1/chat/completions")
    assert status == 405 and reply["error"]["message"]
    with serving(ScriptedEngine(model, max_batch=1, max_context=128), max_body_bytes=2000) as small:
        big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}
        status, _, reply = small.raw("POST", "/v1/chat/completions", big)
        assert status == 413 and reply["error"]["code"] == "request_too_large"
        assert small.raw("POST", "/v1/chat/completions", {"model": "tiny", "messages": USER, "max_tokens": 1})[0] == 200
    # Nothing bad left a trace: the server still answers.
    assert server.raw("GET", "/health")[1] is not None and server.raw("GET", "/health")[0] == 200


# ---- limits, disconnects, isolation ----------------------------------------------------------------

def test_full_queue_gets_429_then_work_resumes(model):
    engine = ScriptedEngine(model, max_batch=1, max_context=128)
    with serving(engine, max_queue=1) as srv:
        engine.gate.clear()  # hold every step: the first request takes the row, the second waits
        results = []

        def ask():
            results.append(srv.client().chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "q"}], max_tokens=3, temperature=0))

        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.time() + 20
        while srv.app.state.driver.in_flight < 2:
            assert time.time() < deadline
            time.sleep(0.02)
        status, headers, reply = srv.raw("POST", "/v1/chat/completions",
                                         {"model": "tiny", "messages": USER, "max_tokens": 1})
        assert status == 429 and reply["error"]["type"] == "rate_limit_error" and headers.get("retry-after")
        with pytest.raises(openai.RateLimitError):
            srv.client().chat.completions.create(model="tiny", messages=USER, max_tokens=1)
        engine.gate.set()
        for t in threads:
            t.join(60)
        assert [r.usage.completion_tokens for r in results] == [3, 3]
        assert srv.raw("POST", "/v1/chat/completions", {"model": "tiny", "messages": USER, "max_tokens": 1})[0] == 200


def test_client_disconnect_frees_the_row(model):
    engine = ScriptedEngine(model, max_batch=2, max_context=MAX_CONTEXT)
    with serving(engine) as srv:
        for path, body in (("/v1/chat/completions", {"model": "tiny", "messages": USER, "stream": True}),
                           ("/v1/responses", {"model": "tiny", "input": "hi", "stream": True}),
                           ("/v1/chat/completions", {"model": "tiny", "messages": USER})):
            sock = socket.create_connection(("127.0.0.1", srv.port))
            data = json.dumps({**body, "max_tokens" if "messages" in body else "max_output_tokens": 300})
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(data)}\r\n\r\n{data}".encode())
            deadline = time.time() + 20
            while not engine.requests or not engine.requests[-1].token_ids:  # it is generating
                assert time.time() < deadline
                time.sleep(0.01)
            request = engine.requests[-1]
            # Hold the steps, so that nothing is sent while the client goes: the random model's text is inside
            # a header, which the server holds back anyway. Only the disconnect itself can stop the request.
            engine.gate.clear()
            time.sleep(0.1)
            sock.close()
            time.sleep(0.3)
            engine.gate.set()
            deadline = time.time() + 20
            while srv.app.state.driver.in_flight or engine.free_rows != engine.num_rows:
                assert time.time() < deadline, f"{path}: the request was not cancelled"
                time.sleep(0.02)
            assert request.finish_reason == "cancelled", path
            assert len(request.token_ids) < 200, path  # stopped at once, not when a chunk was next due
        _, _, text = srv.raw("GET", "/metrics")
        assert 'mxmoe_requests_finished_total{finish_reason="cancelled"} 3' in text


def test_a_request_is_not_changed_by_its_neighbours(model, client, server):
    ask = dict(model="tiny", max_tokens=12, temperature=0)
    alone = client.chat.completions.create(messages=[{"role": "user", "content": "iso-a " * 30}], **ask)
    sampled = dict(model="tiny", messages=[{"role": "user", "content": "other " * 90}], max_tokens=20,
                   temperature=1.5, top_p=0.5, seed=3, stop=["e"])
    sampled_alone = client.chat.completions.create(**sampled)
    out = {}

    def run(name, **kw):
        out[name] = server.client().chat.completions.create(**kw)

    threads = [threading.Thread(target=run, args=("a",), kwargs=dict(
                   messages=[{"role": "user", "content": "iso-a " * 30}], **ask)),
               threading.Thread(target=run, args=("b",), kwargs=sampled),
               threading.Thread(target=run, args=("c",), kwargs=dict(
                   model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5, temperature=1.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out["a"].choices[0].message == alone.choices[0].message
    assert out["a"].usage == alone.usage
    assert out["b"].choices[0].message == sampled_alone.choices[0].message  # the same seed, the same draws


def test_an_engine_failure_fails_the_requests_in_flight_and_not_the_server(model):
    engine = ScriptedEngine(model, max_batch=2, max_context=128)
    with serving(engine) as srv:
        engine.fail_next_step = True
        status, _, reply = srv.raw("POST", "/v1/chat/completions", {"model": "tiny", "messages": USER})
        assert status == 500 and reply["error"]["code"] == "engine_error" and "a backend broke" in reply["error"]["message"]
        assert srv.raw("GET", "/health")[0] == 200
        r = srv.client().chat.completions.create(model="tiny", messages=USER, max_tokens=2)
        assert r.usage.completion_tokens == 2 and engine.free_rows == engine.num_rows


def test_drain_finishes_requests_in_flight_and_refuses_new_ones(model):
    engine = ScriptedEngine(model, max_batch=2, max_context=128)
    with serving(engine) as srv:
        engine.gate.clear()
        done = []
        t = threading.Thread(target=lambda: done.append(srv.client().chat.completions.create(
            model="tiny", messages=USER, max_tokens=5, temperature=0)))
        t.start()
        deadline = time.time() + 20
        while srv.app.state.driver.in_flight < 1:
            assert time.time() < deadline
            time.sleep(0.02)
        srv.app.state.driver.drain(60)  # what SIGTERM does, with a minute of grace
        status, _, reply = srv.raw("POST", "/v1/chat/completions", {"model": "tiny", "messages": USER})
        assert status == 503 and reply["error"]["code"] == "shutting_down"
        status, _, health = srv.raw("GET", "/health")
        assert status == 503 and health["status"] == "shutting_down"
        engine.gate.set()
        t.join(60)
        assert done[0].choices[0].finish_reason == "length" and done[0].usage.completion_tokens == 5


# ---- mxmoe serve: the command, its key and a clean shutdown ------------------------------------------

def test_mxmoe_serve_command_and_sigterm(tmp_path):
    port = free_port()
    env = {**os.environ, "MXMOE_API_KEY": "k-123", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mxmoe.core.cli", "serve", "--port", str(port), "--max-batch",
                             "2", "--max-context", "512", "--dtype", "float32", "--shutdown-grace", "0",
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "mxmoe serve did not come up"
            time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k-123", max_retries=0, timeout=60)
        assert c.models.list().data[0].id == "mxmoe-tiny-random"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()
        stream = c.chat.completions.create(model="mxmoe-tiny-random", messages=USER, max_tokens=300, stream=True,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           tools=[WEATHER_TOOL], temperature=0)
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError) as info:  # the stream is cut off with an error event, not dropped
            for _ in stream:
                pass
        assert "shut down" in str(info.value)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
