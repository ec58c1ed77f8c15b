"""openai-harmony as the test oracle, plus hypothesis strategies that build conversations with its own API.

Conversations are generated as openai-harmony objects and handed to mxmoe through ``Conversation.to_json()``,
so every comparison also checks that we read the JSON shape users already have.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import strategies as st

from mxmoe.core.tokenizer import load_tokenizer, vocab_dir

oh = pytest.importorskip("openai_harmony")
os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(vocab_dir()))

_ENC = None


def examples(n: int) -> int:
    """Hypothesis example count; MXMOE_HYPOTHESIS_SCALE=10 runs ten times as many (for a soak)."""
    return int(n * float(os.environ.get("MXMOE_HYPOTHESIS_SCALE", "1")))


def oracle():
    global _ENC
    if _ENC is None:
        _ENC = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    return _ENC


def tokenizer():
    return load_tokenizer()


# --- text ------------------------------------------------------------------------------------------------

_SPICE = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|call|>", "<|return|>", "<|constrain|>",
          "to=", "\n", "\n\n", "  ", "→", "日本語", "😀", "é", "\r\n", '"', "{", "}", "//", "\t"]

text = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(st.sampled_from(_SPICE), st.text(max_size=6)), max_size=8).map("".join),
)
short_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
ident = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)

# --- JSON schemas (the shapes function tools use) --------------------------------------------------------

_desc = st.one_of(st.none(), st.sampled_from(["", "The city", "line one\nline two", "Ünïcode “quotes”"]), short_text)
_scalar_default = st.one_of(st.integers(-1000, 1000), st.booleans(), st.none(), short_text,
                            st.sampled_from([0.5, -2.25, 1.0]))


def _with_common(schema_st):
    @st.composite
    def build(draw):
        schema = dict(draw(schema_st))
        if (d := draw(_desc)) is not None:
            schema["description"] = d
        if draw(st.integers(0, 5)) == 0:
            schema["default"] = draw(_scalar_default)
        if draw(st.integers(0, 6)) == 0:
            schema["nullable"] = draw(st.booleans())
        if draw(st.integers(0, 8)) == 0:
            schema["title"] = draw(short_text)
        if draw(st.integers(0, 8)) == 0:
            schema["examples"] = draw(st.lists(st.one_of(short_text, st.integers()), min_size=1, max_size=3))
        return schema
    return build()


_leaf = _with_common(st.one_of(
    st.just({"type": "string"}),
    st.lists(st.sampled_from(["celsius", "fahrenheit", "a b", "ü"]), min_size=1, max_size=3, unique=True)
    .map(lambda e: {"type": "string", "enum": e}),
    st.sampled_from([{"type": "number"}, {"type": "integer"}, {"type": "boolean"}, {"type": "array"},
                     {"type": ["string", "null"]}, {"type": ["integer", "string"]}, {}, {"$ref": "#/x"},
                     {"anyOf": [{"type": "string"}]}, {"type": "null"}]),
))


def _extend(children):
    obj = st.builds(
        lambda props, req: {"type": "object", "properties": props,
                            **({"required": [k for k in props if k in req]} if req is not None else {})},
        st.dictionaries(ident, children, max_size=4),
        st.one_of(st.none(), st.sets(ident, max_size=4)),
    )
    arr = st.builds(lambda items: {"type": "array", "items": items}, children)
    one_of = st.builds(lambda vs: {"oneOf": vs}, st.lists(children, min_size=1, max_size=3))
    return _with_common(st.one_of(obj, arr, one_of))


schema = st.recursive(_leaf, _extend, max_leaves=8)
parameters = st.one_of(
    st.none(),
    st.builds(lambda props, req: {"type": "object", "properties": props, "required": sorted(req & set(props))},
              st.dictionaries(ident, schema, max_size=5), st.sets(ident, max_size=3)),
    schema,
)
tool_description = st.builds(oh.ToolDescription.new, ident, st.one_of(st.just(""), short_text, text), parameters)


@st.composite
def namespace(draw, name=None):
    which = draw(st.sampled_from(["browser", "python", "custom"])) if name is None else "custom"
    if which == "browser":
        return oh.ToolNamespaceConfig.browser()
    if which == "python":
        return oh.ToolNamespaceConfig.python()
    return oh.ToolNamespaceConfig(name=name or draw(ident), description=draw(st.one_of(st.none(), text)),
                                  tools=draw(st.lists(tool_description, max_size=3)))


# --- system / developer / messages -----------------------------------------------------------------------

@st.composite
def system_content(draw):
    sc = oh.SystemContent.new()
    if draw(st.booleans()):
        return sc.with_reasoning_effort(draw(st.sampled_from(list(oh.ReasoningEffort))))
    sc.model_identity = draw(st.one_of(st.none(), st.just("You are a helpful assistant."), text))
    sc.reasoning_effort = draw(st.one_of(st.none(), st.sampled_from(list(oh.ReasoningEffort))))
    sc.conversation_start_date = draw(st.one_of(st.none(), st.just("2025-08-05"), short_text))
    sc.knowledge_cutoff = draw(st.one_of(st.none(), st.just("2024-06")))
    sc.channel_config = draw(st.one_of(
        st.none(),
        st.builds(oh.ChannelConfig, valid_channels=st.lists(st.sampled_from(["analysis", "commentary", "final"]),
                                                            max_size=3),
                  channel_required=st.booleans())))
    for ns in draw(st.lists(namespace(), max_size=2, unique_by=lambda n: n.name)):
        sc = sc.with_tools(ns)
    return sc


@st.composite
def developer_content(draw):
    dc = oh.DeveloperContent.new()
    if (instr := draw(st.one_of(st.none(), text))) is not None:
        dc = dc.with_instructions(instr)
    if draw(st.booleans()):
        dc = dc.with_function_tools(draw(st.lists(tool_description, max_size=3)))
    if draw(st.integers(0, 3)) == 0:
        dc = dc.with_tools(draw(namespace(name=draw(ident))))
    return dc


recipient = st.sampled_from(["functions.get_weather", "functions.lookup_order", "browser.search", "browser.open",
                             "python"])


@st.composite
def assistant_message(draw, allow_call=True, channels=("analysis", "commentary", "final")):
    m = oh.Message.from_role_and_content(oh.Role.ASSISTANT, draw(text)).with_channel(draw(st.sampled_from(channels)))
    if allow_call and draw(st.integers(0, 2)) == 0:
        m = m.with_recipient(draw(recipient))
        ct = draw(st.sampled_from([None, "<|constrain|>json", "code", "json"]))
        if ct is not None:
            m = m.with_content_type(ct)
    return m


@st.composite
def tool_message(draw):
    name = draw(recipient)
    return oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, name), draw(text)) \
        .with_channel("commentary").with_recipient("assistant")


# Pieces that BPE would merge across a part boundary ("the " + "weather" is not "the weather").
_PART_EDGES = st.sampled_from(["What is the ", "weather today?", " ", "a", "b ", "\n", "é", "日本"])


@st.composite
def multi_part_message(draw):
    """A message whose content is several text parts (openai-harmony tokenizes each part on its own)."""
    role = draw(st.sampled_from([oh.Role.USER, oh.Role.ASSISTANT, oh.Role.DEVELOPER]))
    parts = draw(st.lists(st.one_of(_PART_EDGES, text), min_size=2, max_size=3))
    m = oh.Message(author=oh.Author(role=role), content=[oh.TextContent(text=t) for t in parts])
    if role == oh.Role.ASSISTANT:
        m = m.with_channel(draw(st.sampled_from(["analysis", "commentary", "final"])))
    return m


@st.composite
def any_message(draw):
    kind = draw(st.sampled_from(["user", "assistant", "assistant", "tool", "user_named", "developer_text",
                                 "multi_part"]))
    if kind == "multi_part":
        return draw(multi_part_message())
    if kind == "user":
        return oh.Message.from_role_and_content(oh.Role.USER, draw(text))
    if kind == "user_named":
        return oh.Message.from_author_and_content(oh.Author.new(oh.Role.USER, draw(ident)), draw(text))
    if kind == "tool":
        return draw(tool_message())
    if kind == "developer_text":
        return oh.Message.from_role_and_content(oh.Role.DEVELOPER, draw(text))
    return draw(assistant_message())


@st.composite
def conversation(draw):
    msgs = []
    if draw(st.booleans()):
        msgs.append(oh.Message.from_role_and_content(oh.Role.SYSTEM, draw(system_content())))
    if draw(st.booleans()):
        msgs.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, draw(developer_content())))
    msgs += draw(st.lists(any_message(), max_size=8))
    return oh.Conversation.from_messages(msgs)
