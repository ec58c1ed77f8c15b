"""Streaming parser: agreement with openai-harmony, lenient mode never raises, strict mode raises only
HarmonyParseError, UTF-8 buffering, round trips, and tool calls."""

from __future__ import annotations


import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _harmony_oracle as O
from mxmoe.core.harmony.messages import Message
from mxmoe.core.harmony.parser import HarmonyParseError, StreamParser, parse_tokens
from mxmoe.core.harmony.render import Renderer
from mxmoe.core.harmony.tools import extract_tool_calls, tool_result_message
from mxmoe.core.tokenizer import CALL, CHANNEL, CONSTRAIN, END, MESSAGE, RETURN, START

oh = O.oh
_SETTINGS = settings(max_examples=O.examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tok():
    return O.tokenizer()


@st.composite
def completion(draw):
    """What the model writes after ``<|start|>assistant``: analysis/commentary messages, then a final answer
    or a tool call (recipient with or without <|constrain|>json, on commentary or analysis)."""
    msgs = draw(st.lists(O.assistant_message(allow_call=False, channels=("analysis", "commentary")), max_size=3))
    last = draw(O.assistant_message())
    if last.recipient is None and last.content_type is not None:
        last.content_type = None
    msgs.append(last)
    enc = O.oracle()
    ids = []
    for m in msgs:
        ids += enc.render(m)
    assert ids[:2] == [START, 173781]  # <|start|>assistant
    ids = ids[2:]
    if last.recipient is None and last.channel == "final" and draw(st.booleans()):
        ids[-1] = RETURN
    return msgs, ids


@_SETTINGS
@given(completion())
def test_parse_completion_matches_oracle(tok, sample):
    msgs, ids = sample
    theirs = [m.to_dict() for m in O.oracle().parse_messages_from_completion_tokens(ids, oh.Role.ASSISTANT)]
    for strict in (True, False):
        result = parse_tokens(tok, ids, "assistant", strict=strict)
        assert [m.to_dict() for m in result.messages] == theirs
        assert result.issues == []
    assert theirs == [m.to_dict() for m in msgs]


@_SETTINGS
@given(O.conversation())
def test_parse_rendered_conversation_matches_oracle(tok, conv):
    """A whole rendered conversation read back (role=None): text messages come back as harmony reads them."""
    enc = O.oracle()
    ids = enc.render_conversation(conv, oh.RenderConversationConfig(auto_drop_analysis=False))
    ours = parse_tokens(tok, ids, None, strict=False)
    try:
        theirs = [m.to_dict() for m in enc.parse_messages_from_completion_tokens(ids, None)]
    except Exception:
        return  # the oracle rejects some (e.g. user:name headers); lenient mode must still not raise
    # (O.assistant_message gives a content type only with a recipient: harmony would read
    # "<|channel|>x json" without one as recipient "json")
    assert [m.to_dict() for m in ours.messages] == theirs


@_SETTINGS
@given(completion(), st.data())
def test_streaming_deltas_rebuild_messages(tok, sample, data):
    _, ids = sample
    ids = ids[:data.draw(st.integers(0, len(ids)))]  # truncated anywhere
    parser = StreamParser(tok, "assistant")
    deltas = []
    for t in ids:
        deltas += parser.process(t)
    deltas += parser.process_eos()
    whole = parse_tokens(tok, ids, "assistant")
    texts = {}
    for d in deltas:
        if d.kind == "content":
            texts[d.message_index] = texts.get(d.message_index, "") + d.text
    assert [texts.get(i, "") for i in range(len(parser.messages))] == [m.text for m in parser.messages]
    assert [m.to_dict() for m in parser.messages] == [m.to_dict() for m in whole.messages]
    ends = [d for d in deltas if d.kind == "end"]
    assert [(d.channel, d.recipient, d.content_type) for d in ends] == \
        [(m.channel, m.recipient, m.content_type) for m in parser.messages]


_TOKEN = st.one_of(st.sampled_from([START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL, 199998, 199999, 200100,
                                    201087, 173781, 12606, 815, 17196, 1721, 316, 28, 44580, 4108]),
                   st.integers(0, 201087), st.integers(0, 255))


@settings(max_examples=O.examples(300), deadline=None)
@given(st.lists(_TOKEN, max_size=60), st.sampled_from(["assistant", None, "user"]))
def test_random_streams_lenient_never_raises_strict_raises_only_its_error(tok, ids, role):
    parser = StreamParser(tok, role)
    for t in ids:
        parser.process(t)
    parser.process_eos()
    for i in parser.issues:
        assert isinstance(i.reason, str) and 0 <= i.position <= len(ids)
    try:
        parse_tokens(tok, ids, role, strict=True)
    except HarmonyParseError as e:
        assert 0 <= e.position <= len(ids) and e.reason


@settings(max_examples=O.examples(100), deadline=None)
@given(completion(), st.data())
def test_truncated_and_corrupted_streams(tok, sample, data):
    _, ids = sample
    ids = list(ids)
    for _ in range(data.draw(st.integers(0, 3))):
        if ids:
            ids[data.draw(st.integers(0, len(ids) - 1))] = data.draw(_TOKEN)
    ids = ids[:data.draw(st.integers(0, len(ids)))]
    result = parse_tokens(tok, ids, "assistant", strict=False)  # must not raise
    assert all(isinstance(m, Message) for m in result.messages)


def test_utf8_split_across_tokens_is_buffered(tok):
    data = "é😀日".encode()
    ids = [tok.encoding.encode_single_token(bytes([b])) for b in data]  # one token per byte
    parser = StreamParser(tok, "assistant")
    parser.feed([CHANNEL, *tok.encode("final"), MESSAGE])
    texts = [d.text for t in ids for d in parser.process(t) if d.kind == "content"]
    assert texts == ["é", "😀", "日"]
    parser.process(RETURN)
    assert parser.messages[0].text == "é😀日" and parser.done and parser.stop_token == RETURN


def test_invalid_utf8(tok):
    bad = [tok.encoding.encode_single_token(b) for b in (b"a", b"\xff", b"\xe6")]
    ids = [CHANNEL, *tok.encode("final"), MESSAGE, *bad, END]
    result = parse_tokens(tok, ids)
    assert result.messages[0].text == "a\ufffd\ufffd"
    assert len(result.issues) == 2
    with pytest.raises(HarmonyParseError, match="invalid UTF-8"):
        parse_tokens(tok, ids, strict=True)


@pytest.mark.parametrize("text, expected", [
    ("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{}<|call|>",
     dict(channel="commentary", recipient="functions.get_weather", content_type="<|constrain|>json")),
    (" to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{}<|call|>",
     dict(channel="commentary", recipient="functions.get_weather", content_type="<|constrain|>json")),
    ("<|channel|>analysis to=browser.search code<|message|>{}<|call|>",
     dict(channel="analysis", recipient="browser.search", content_type="code")),
    ("<|channel|>commentary to=functions.f<|constrain|>json<|message|>{}<|call|>",
     dict(channel="commentary", recipient="functions.f", content_type="<|constrain|>json")),
    ("<|channel|>commentary json<|message|>{}<|end|>", dict(channel="commentary", recipient=None, content_type="json")),
])
def test_header_variants(tok, text, expected):
    result = parse_tokens(tok, tok.encode(text, allowed_special="all"), strict=True)
    m = result.messages[0]
    assert dict(channel=m.channel, recipient=m.recipient, content_type=m.content_type) == expected


@pytest.mark.parametrize("text, reason", [
    ("<|channel|>final<|message|>a<|start|>assistant<|channel|>final<|message|>b<|return|>", "before <|end|>"),
    ("<|channel|><|message|>a<|end|>", "without a channel name"),
    ("<|channel|>final<|message|>a<|end|>junk<|channel|>final<|message|>b<|end|>", "expected <|start|>"),
    ("<|channel|>final<|message|>a<|end|><|end|>", "<|end|> outside a message"),
    ("<|channel|>final<|message|>a<|message|>b<|end|>", "inside content"),
    ("<|channel|>final<|message|>a<|return|>more", "after the stream stopped"),
    ("<|channel|>final<|end|>", "before <|message|>"),
    ("<|channel|>final to=a to=b<|message|>x<|end|>", "second recipient"),
])
def test_malformed_lenient_recovers_strict_reports(tok, text, reason):
    ids = tok.encode(text, allowed_special="all")
    result = parse_tokens(tok, ids, continue_after_stop=False)
    assert any(reason in i.reason for i in result.issues), result.issues
    assert "".join(m.text for m in result.messages)  # the text is kept
    with pytest.raises(HarmonyParseError, match=reason.replace("|", r"\|")) as info:
        parse_tokens(tok, ids, strict=True, continue_after_stop=False)
    assert 0 <= info.value.position <= len(ids)


def test_stop_tokens_stop_the_stream(tok):
    parser = StreamParser(tok, "assistant")
    parser.feed(tok.encode("<|channel|>commentary to=functions.f<|message|>{}<|call|>", allowed_special="all"))
    assert parser.done and parser.stop_token == CALL
    parser.process(START)  # ignored, flagged
    assert len(parser.messages) == 1 and "after the stream stopped" in parser.issues[-1].reason


def test_truncated_message_is_closed(tok):
    ids = tok.encode("<|channel|>final<|message|>Hello wor", allowed_special="all")
    result = parse_tokens(tok, ids, strict=True)
    assert result.truncated and result.messages[0].text == "Hello wor"
    with pytest.raises(HarmonyParseError, match="inside a message header"):
        parse_tokens(tok, tok.encode("<|channel|>fin", allowed_special="all"), strict=True)


@_SETTINGS
@given(completion())
def test_parse_then_render_round_trips(tok, sample):
    msgs, ids = sample
    renderer = Renderer(tok)
    parsed = parse_tokens(tok, ids, "assistant").messages
    again = []
    for m in parsed:
        again += renderer.render_message(m)
    again = again[2:]
    if ids[-1] == RETURN:
        again[-1] = RETURN
    assert again == ids
    if not any("<|" in m.text for m in parsed):  # text that looks like a special token decodes ambiguously
        assert tok.encode(tok.decode(ids), allowed_special="all") == ids


def test_tool_calls_and_results(tok):
    text = ("<|channel|>analysis<|message|>Need weather.<|end|>"
            "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
            '{"city": "Paris"}<|call|>')
    parsed = parse_tokens(tok, tok.encode(text, allowed_special="all")).messages
    ids = iter(["call_1"])
    [call] = extract_tool_calls(parsed, id_factory=lambda: next(ids))
    assert (call.id, call.namespace, call.name, call.parsed, call.error) == \
        ("call_1", "functions", "get_weather", {"city": "Paris"}, None)
    assert call.to_openai()["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    result = tool_result_message(call, {"temp": 21})
    rendered = tok.decode(Renderer(tok).render_message(result))
    assert rendered == ('<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>'
                        '{"temp": 21}<|end|>')
    # variants: recipient in the role part, analysis channel, python code, broken JSON
    text = ("<|channel|>analysis to=python code<|message|>print(1)<|call|>")
    [py] = extract_tool_calls(parse_tokens(tok, tok.encode(text, allowed_special="all")).messages)
    assert (py.namespace, py.name, py.arguments, py.parsed) == ("python", "python", "print(1)", None)
    text = ' to=functions.f<|channel|>analysis<|message|>{"a": 1} trailing<|call|>'
    [f] = extract_tool_calls(parse_tokens(tok, tok.encode(text, allowed_special="all")).messages)
    assert f.parsed == {"a": 1} and "extra text" in f.error
    text = "<|channel|>commentary to=functions.f<|message|>{not json<|call|>"
    [g] = extract_tool_calls(parse_tokens(tok, tok.encode(text, allowed_special="all")).messages)
    assert g.parsed is None and "not valid JSON" in g.error


def test_one_meaning_of_truncated(tok):
    """"truncated" is the parser's: the stream ended inside a message. Chat's JSON says the same."""
    from mxmoe.core.harmony.chat import _result_json

    cases = {"<|channel|>analysis<|message|>think<|end|>": False,  # no stop token, but between messages
             "<|channel|>final<|message|>Hello wor": True,  # cut off in content
             "<|channel|>final<|message|>Hi<|return|>": False,
             "<|channel|>fin": True}  # cut off in a header
    for text, truncated in cases.items():
        ids = tok.encode(text, allowed_special="all")
        parser = StreamParser(tok, "assistant", strict=False)
        parser.feed(ids)
        parser.process_eos()
        parser.process_eos()  # a second end of stream changes nothing
        assert parser.truncated is truncated, text
        assert parse_tokens(tok, ids, strict=False).truncated is truncated, text
        assert _result_json(parser)["truncated"] is truncated, text


# ---- what a user meets (issue 13): damaged headers, calls without a recipient, strict wording, bounds ----

_RECOVERY_WORDS = ("kept as", "kept its", "ignored", "replaced by", "dropped", "read as", "is closed", "stops")


@pytest.mark.parametrize("text, role, channel, recipient, content", [
    ("<|channel|>analysis secret plan<|end|>", "assistant", "analysis", None, "secret plan"),
    ("<|start|>assistant<|channel|>analysis secret<|end|>", None, "analysis", None, "secret"),
    ("<|channel|>analysis thinking about it", "assistant", "analysis", None, "thinking about it"),  # cut off
    ('<|channel|>commentary to=functions.f {"a": 1}<|call|>', "assistant", "commentary", "functions.f", '{"a": 1}'),
    ("<|channel|>analysis" + " word" * 300 + "<|end|>", "assistant", "analysis", None, "word" + " word" * 299),
    ("hello there<|end|>", "assistant", None, None, "hello there"),  # no channel at all: none is made up
    ("<|channel|>commentary to=functions.f<|call|>", "assistant", "commentary", "functions.f", ""),  # no arguments
    ("<|channel|>analysis<|end|>", "assistant", None, None, "<|channel|>analysis"),  # nothing to hide: kept whole
])
def test_damaged_header_keeps_its_channel(tok, text, role, channel, recipient, content):
    """A header broken off before <|message|> keeps its channel (so reasoning stays hidden); its other
    words become the content, and the problem is an issue naming the kept channel."""
    from mxmoe.core.harmony.messages import is_user_visible

    ids = tok.encode(text, allowed_special="all")
    result = parse_tokens(tok, ids, role)
    m = result.messages[0]
    assert (m.channel, m.recipient, m.text) == (channel, recipient, content)
    assert result.issues, "the damage is reported"
    assert ("kept its channel" in result.issues[0].reason) is (channel is not None), result.issues[0].reason
    assert not is_user_visible(m)  # analysis, a tool call, or no channel: never printed as the reply
    with pytest.raises(HarmonyParseError):
        parse_tokens(tok, ids, role, strict=True)
    # streaming says the same at the header as the finished message does
    parser = StreamParser(tok, role)
    deltas = parser.feed(ids) + parser.process_eos()
    headers = [d for d in deltas if d.kind == "header" and d.message_index == 0]
    assert [(d.channel, d.recipient) for d in headers] == [(channel, recipient)]


def test_damaged_analysis_never_reaches_the_user(tok):
    """What mxmoe chat prints without --show-analysis: the final answer only, even when the analysis
    message's header is damaged or its channel is unknown."""
    from mxmoe.core.harmony.messages import is_user_visible

    text = ("<|channel|>analysis my secret reasoning<|end|>"
            "<|start|>assistant<|channel|>thoughts<|message|>more secrets<|end|>"
            "<|start|>assistant<|message|>no channel secret<|end|>"
            "<|start|>assistant<|channel|>final<|message|>The answer.<|return|>")
    parser = StreamParser(tok, "assistant")
    shown = "".join(d.text for d in parser.feed(tok.encode(text, allowed_special="all"))
                    if d.kind == "content" and is_user_visible(d))
    assert shown == "The answer."
    assert [is_user_visible(m) for m in parser.messages] == [False, False, False, True]
    shown_all = "".join(d.text for d in parse_tokens(tok, tok.encode(text, allowed_special="all")).messages
                        if is_user_visible(d, show_analysis=True))
    assert shown_all == "my secret reasoningmore secretsno channel secretThe answer."


@pytest.mark.parametrize("role, channel, recipient, visible, with_analysis", [
    ("assistant", "final", None, True, True),
    ("assistant", "commentary", None, True, True),  # a preamble meant for the user
    ("assistant", "analysis", None, False, True),
    ("assistant", None, None, False, True),  # missing channel
    ("assistant", "thoughts", None, False, True),  # unknown channel
    ("assistant", "commentary", "functions.get_weather", False, False),  # a tool call
    ("assistant", "final", "functions.f", False, False),
    ("assistant", "analysis", "python", False, False),
    ("user", "final", None, False, False),  # the model writing the user's part
    ("tool", "commentary", None, False, False),
])
def test_is_user_visible(role, channel, recipient, visible, with_analysis):
    from mxmoe.core.harmony.messages import is_user_visible

    name = "functions.get_weather" if role == "tool" else None
    m = Message.create(role, "x", name=name, channel=channel, recipient=recipient)
    assert is_user_visible(m) is visible
    assert is_user_visible(m, show_analysis=True) is with_analysis


def test_call_without_recipient_is_an_issue(tok):
    ids = tok.encode("<|channel|>commentary<|message|>do it<|call|>", allowed_special="all")
    result = parse_tokens(tok, ids)
    assert [m.text for m in result.messages] == ["do it"] and result.stop_token == CALL
    assert [(i.position, i.token) for i in result.issues] == [(len(ids) - 1, CALL)]
    assert "<|call|> ends a message without a recipient" in result.issues[0].reason
    assert extract_tool_calls(result.messages) == []
    with pytest.raises(HarmonyParseError) as info:
        parse_tokens(tok, ids, strict=True)
    assert str(info.value) == f"token {len(ids) - 1} ({CALL} '<|call|>'): <|call|> ends a message without a recipient"
    # with a recipient it is a call, and no issue
    ok = tok.encode("<|channel|>commentary to=functions.f<|message|>{}<|call|>", allowed_special="all")
    assert parse_tokens(tok, ok).issues == [] and len(extract_tool_calls(parse_tokens(tok, ok).messages)) == 1


def test_strict_errors_name_the_position_and_only_the_problem(tok):
    with pytest.raises(HarmonyParseError) as info:
        parse_tokens(tok, [-1, *tok.encode("hi")], strict=True)
    assert str(info.value) == "token 0: not a token id: -1" and info.value.position == 0
    good = tok.encode("<|channel|>final<|message|>", allowed_special="all")
    with pytest.raises(HarmonyParseError) as info:
        parse_tokens(tok, [*good, 10**9], strict=True)
    assert str(info.value) == f"token {len(good)}: not a token id: {10**9}"
    cut = tok.encode("<|channel|>fin", allowed_special="all")
    with pytest.raises(HarmonyParseError) as info:
        parse_tokens(tok, cut, strict=True)
    assert str(info.value) == f"end of stream after {len(cut)} tokens: stream ended inside a message header"
    assert (info.value.position, info.value.token) == (len(cut), None)
    # the lenient parser says how it recovered; the strict one only what is wrong
    for text in ["<|channel|>final<|message|>a<|start|>assistant<|channel|>final<|message|>b<|return|>",
                 "<|channel|>final<|message|>a<|end|>junk<|channel|>final<|message|>b<|end|>",
                 "<|channel|>final<|message|>a<|end|><|end|>", "<|channel|>final<|message|>a<|message|>b<|end|>",
                 "<|channel|>final<|message|>a<|return|>more", "<|channel|>final<|end|>", "<|channel|>analysis x",
                 "<|return|>", "<|channel|>final<|start|>x"]:
        ids = tok.encode(text, allowed_special="all")
        lenient = parse_tokens(tok, ids, continue_after_stop=False).issues
        with pytest.raises(HarmonyParseError) as info:
            parse_tokens(tok, ids, strict=True, continue_after_stop=False)
        assert any(w in lenient[0].reason for w in _RECOVERY_WORDS), lenient[0].reason
        assert not any(w in str(info.value) for w in _RECOVERY_WORDS), str(info.value)
        assert lenient[0].reason.startswith(info.value.reason) and info.value.position == lenient[0].position
    bad = [tok.encoding.encode_single_token(b"\xff")]
    with pytest.raises(HarmonyParseError) as info:
        parse_tokens(tok, [*good, *bad], strict=True)
    assert str(info.value) == f"token {len(good)} ({bad[0]} {tok.decode(bad)!r}): invalid UTF-8 in content"


def test_issue_list_of_one_parse_is_bounded(tok):
    from mxmoe.core.harmony.parser import MAX_ISSUES

    head = tok.encode("<|channel|>final<|message|>", allowed_special="all")
    bad = [tok.encoding.encode_single_token(bytes([b])) for b in (0xFF, 0xC0, 0x80)]
    n = 200_000
    result = parse_tokens(tok, head + [bad[i % 3] for i in range(n)])
    # every byte is a problem, and so is the missing <|end|>: n + 1 in all, MAX_ISSUES listed
    assert len(result.issues) == MAX_ISSUES + 1
    assert all("invalid UTF-8" in i.reason for i in result.issues[:MAX_ISSUES])
    omitted = n + 1 - MAX_ISSUES
    last = result.issues[-1]
    assert result.omitted_issues == omitted and result.to_dict()["omitted_issues"] == omitted
    assert last.reason.startswith(f"{omitted} more issue(s) from token {len(head) + MAX_ISSUES} to token "
                                  f"{len(head) + n}, not listed"), last.reason
    assert result.messages[0].text == "\ufffd" * n  # the text itself is all kept
    small = parse_tokens(tok, head + bad[:1] + [END])
    assert len(small.issues) == 1 and small.omitted_issues == 0
