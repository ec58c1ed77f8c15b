"""Renderer: token-for-token equality with openai-harmony on generated conversations, plus fixed examples."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _harmony_oracle as O
from mxmoe.core.harmony.messages import (Conversation, DeveloperContent, Message, ReasoningEffort, ResponseFormat,
                                         SystemContent, ToolDescription)
from mxmoe.core.harmony.render import Renderer, RenderError, schema_to_typescript
from mxmoe.core.harmony.tools import browser_namespace, python_namespace

oh = O.oh
_SETTINGS = settings(max_examples=O.examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def renderer():
    return Renderer(O.tokenizer())


def _ours(conv_oh) -> Conversation:
    return Conversation.from_json(conv_oh.to_json())


@_SETTINGS
@given(O.conversation(), st.booleans())
def test_render_conversation_matches_oracle(renderer, conv, drop):
    enc = O.oracle()
    cfg = oh.RenderConversationConfig(auto_drop_analysis=drop)
    ours = _ours(conv)
    assert renderer.render_conversation(ours, auto_drop_analysis=drop) == enc.render_conversation(conv, cfg)
    assert renderer.render_for_completion(ours, auto_drop_analysis=drop) == \
        enc.render_conversation_for_completion(conv, oh.Role.ASSISTANT, cfg)
    assert renderer.render_for_training(ours, auto_drop_analysis=drop) == \
        enc.render_conversation_for_training(conv, cfg)


@settings(max_examples=O.examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(O.tool_description, min_size=1, max_size=3))
def test_function_tool_schemas_match_oracle(renderer, tools):
    dev = oh.DeveloperContent.new().with_instructions("x").with_function_tools(tools)
    conv = oh.Conversation.from_messages([oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new()),
                                          oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev)])
    assert renderer.render_conversation(_ours(conv)) == O.oracle().render_conversation(conv)


@_SETTINGS
@given(st.lists(O.any_message(), min_size=1, max_size=6), st.sampled_from(list(oh.Role)))
def test_next_role_and_single_messages_match_oracle(renderer, msgs, role):
    enc = O.oracle()
    conv = oh.Conversation.from_messages(msgs)
    assert renderer.render_for_completion(_ours(conv), role.value) == \
        enc.render_conversation_for_completion(conv, role)
    for m in msgs:
        assert renderer.render_message(Message.from_dict(json.loads(m.to_json()))) == enc.render(m)


def test_known_prompt(renderer):
    conv = Conversation(messages=[
        Message.create("system", SystemContent(conversation_start_date="2025-06-28", reasoning_effort="high")),
        Message.create("developer", DeveloperContent(instructions="Answer in French.").with_function_tools([
            ToolDescription(name="get_weather", description="Gets the weather",
                            parameters={"type": "object", "properties": {"city": {"type": "string"}},
                                        "required": ["city"]})])),
        Message.create("user", "Quel temps fait-il à Paris ?"),
    ])
    text = renderer.tok.decode(renderer.render_for_completion(conv))
    assert text.startswith("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
                           "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: high\n\n")
    assert "Channel must be included for every message.\nCalls to these tools must go to the commentary channel: " \
           "'functions'.<|end|>" in text
    assert "type get_weather = (_: {\ncity: string,\n}) => any;" in text
    assert text.endswith("<|start|>user<|message|>Quel temps fait-il à Paris ?<|end|><|start|>assistant")


def test_builtin_namespaces_match_oracle(renderer):
    for ours, theirs in ((browser_namespace(), oh.ToolNamespaceConfig.browser()),
                         (python_namespace(), oh.ToolNamespaceConfig.python())):
        assert ours.model_dump() == theirs.model_dump()
        conv = oh.Conversation.from_messages([oh.Message.from_role_and_content(
            oh.Role.SYSTEM, oh.SystemContent.new().with_tools(theirs))])
        mine = Conversation(messages=[Message.create("system", SystemContent().with_tools(ours))])
        assert renderer.render_conversation(mine) == O.oracle().render_conversation(conv)


def test_history_rules(renderer):
    def a(text, channel, **kw):
        return Message.create("assistant", text, channel=channel, **kw)
    finished = [Message.create("user", "q1"), a("think1", "analysis"), a("ans1", "final"),
                Message.create("user", "q2"), a("think2", "analysis"), a("ans2", "final")]
    text = renderer.tok.decode(renderer.render_for_completion(finished))
    assert "think1" not in text and "ans1" in text  # reasoning of the earlier completed turn is dropped
    chain = [Message.create("user", "q"), a("think", "analysis"),
             a('{"city":"Paris"}', "commentary", recipient="functions.get_weather", content_type="<|constrain|>json"),
             Message.create("tool", "sunny", name="functions.get_weather", channel="commentary",
                            recipient="assistant")]
    text = renderer.tok.decode(renderer.render_for_completion(chain))
    assert "think" in text and text.count("<|call|>") == 1  # kept inside a tool-call chain
    train = renderer.tok.decode(renderer.render_for_training(finished))
    assert train.endswith("ans2<|return|>") and "ans1<|end|>" in train


def test_reasoning_effort_spellings():
    assert SystemContent(reasoning_effort="low").reasoning_effort == ReasoningEffort.LOW
    assert SystemContent(reasoning_effort="High").reasoning_effort == ReasoningEffort.HIGH
    with pytest.raises(ValueError):
        SystemContent(reasoning_effort="extreme")


def test_render_errors(renderer):
    with pytest.raises(RenderError, match="tool message needs author name"):
        renderer.render_conversation([Message.create("tool", "x")])
    with pytest.raises(RenderError, match="system content may only appear"):
        renderer.render_conversation([Message.create("user", SystemContent())])


def test_response_formats_section(renderer):
    dev = DeveloperContent(instructions="Be brief.", response_formats=[
        ResponseFormat(name="answer", description="The reply", schema={"type": "object"})])
    text = renderer.tok.decode(renderer.render_conversation([Message.create("developer", dev)]))
    assert text == ("<|start|>developer<|message|># Instructions\n\nBe brief.\n\n# Response Formats\n\n"
                    "## answer\n\n// The reply\n{\"type\":\"object\"}<|end|>")
    again = Conversation.from_json(Conversation(messages=[Message.create("developer", dev)]).to_json())
    assert again.messages[0].content[0] == dev


def test_schema_to_typescript_examples():
    assert schema_to_typescript({"type": "array", "items": {"type": "integer"}}) == "number[]"
    assert schema_to_typescript({"type": "string", "enum": ["a", "b"]}) == '"a" | "b"'
    assert schema_to_typescript({"type": "object", "properties": {"x": {"type": "string", "default": "y"}}}) == \
        '{\nx?: string, // default: "y"\n}'
    assert schema_to_typescript({"$ref": "#/defs/x"}) == "any"


def test_runtime_does_not_import_openai_harmony():
    import subprocess
    import sys

    code = ("import sys, mxmoe.core.harmony, mxmoe.core.harmony.cli, mxmoe.core.harmony.chat; "
            "assert 'openai_harmony' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_multi_part_content_is_tokenized_part_by_part(renderer):
    """openai-harmony encodes each text part on its own: BPE merges never cross a part boundary."""
    conv = oh.Conversation.from_messages([oh.Message(author=oh.Author(role=oh.Role.USER), content=[
        oh.TextContent(text="What is the "), oh.TextContent(text="weather today?")])])
    ours = _ours(conv)
    expected = O.oracle().render_conversation(conv)
    assert renderer.render_conversation(ours) == expected
    assert renderer.render_message(ours.messages[0]) == O.oracle().render(conv.messages[0])
    # (the joined text tokenizes differently, which is why this case matters)
    joined = Conversation(messages=[Message.create("user", "What is the weather today?")])
    assert renderer.render_conversation(joined) != expected


@pytest.mark.parametrize("content, found", [("null", "found null"), ("3", "found int 3"), ("2.5", "found float"),
                                            ('{"text": "x"}', "found dict")])
def test_bad_content_is_a_value_error_naming_the_message(content, found):
    text = '{"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": %s}]}' % content
    with pytest.raises(ValueError, match=f"message 1: content must be a string or a list of content parts, {found}"):
        Conversation.from_json(text)


def test_bad_role_names_the_message():
    with pytest.raises(ValueError, match=r"message 1: author: role: Input should be .*'user'.* \(found 'wizard'\)"):
        Conversation.from_json('[{"role": "user", "content": "a"}, {"role": "wizard", "content": "x"}]')
    with pytest.raises(ValueError, match="message 0: content part 1: text: Input should be a valid string"):
        Conversation.from_json('[{"role": "user", "content": ["a", {"type": "text", "text": 3}]}]')


@pytest.mark.parametrize("schema", [
    {"type": "string", "enum": [1, 2]},
    {"type": "string", "enum": [None]},
    {"type": "string", "enum": []},
    {"type": "string", "enum": ["a", 1]},
    {"type": "string", "enum": [1], "nullable": True},
    {"type": "object", "properties": {"x": {"type": "string", "enum": [1, 2], "default": "z"}}},
    {"type": "object", "properties": {"x": {"oneOf": [{"type": "string", "enum": [3], "default": "q"}]}}},
    {"oneOf": [{"type": "string", "enum": [True]}, {"type": "number"}]},
    {"type": "array", "items": {"type": "string", "enum": [1.5]}},
])
def test_string_enum_without_string_members_is_string(renderer, schema):
    """An enum with no string members is written ``string``, as openai-harmony writes it (never ``(_: )``)."""
    tool = oh.ToolDescription.new("f", "d", parameters=schema)
    dev = oh.DeveloperContent.new().with_function_tools([tool])
    conv = oh.Conversation.from_messages([oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev)])
    expected = O.oracle().render_conversation(conv)
    assert renderer.render_conversation(_ours(conv)) == expected
    text = renderer.tok.decode(expected)
    assert "(_: )" not in text and "| \n" not in text and ":  " not in text
    if schema.get("enum") is not None and not any(isinstance(v, str) for v in schema["enum"]):
        assert schema_to_typescript(schema).startswith("string")
