"""Streaming harmony parser: model tokens → messages, one token at a time.

One :class:`StreamParser` per request (no shared state). Each ``process(token)`` returns the
:class:`Delta` events that token produced: ``header`` once a message's author, channel, recipient and
content type are known (at ``<|message|>``), ``content`` for newly decoded text (incomplete UTF-8 is held
back until its last byte arrives), ``end`` when a message is complete. ``<|return|>`` and ``<|call|>``
stop the stream (``done``); ``<|end|>`` ends a message and the model goes on with the next one.

Header grammar (what gpt-oss emits; the first message of a completion has no ``<|start|>role`` because
the prompt ends with ``<|start|>assistant``)::

    <|start|> AUTHOR [" to=" RECIPIENT] [<|channel|> CHANNEL [" to=" RECIPIENT] [" " CONTENT_TYPE]] <|message|>

AUTHOR is a role (``assistant``), ``role:name``, or a tool's name (``functions.get_weather`` → role tool).
CONTENT_TYPE is a word such as ``code`` or ``json``, or ``<|constrain|>json``.

``strict=True`` raises :class:`HarmonyParseError` (position, token, reason) at the first malformed token.
``strict=False`` (lenient) never raises on model output: it recovers, keeps the text, and records each
problem as an :class:`Issue` (its reason says what was wrong, then how it was recovered). A header that
breaks off before ``<|message|>`` keeps what it said up to its channel (and a recipient right after it),
the rest becomes content: ``<|channel|>analysis text<|end|>`` is an analysis message "text", so reasoning
whose header is damaged stays reasoning. A stream cut off inside a message (max tokens) is not malformed:
the open message is closed by :meth:`StreamParser.process_eos` in both modes, with an issue noting it.
One parse records at most :data:`MAX_ISSUES` issues, then one more that counts the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Literal, Optional

from ..tokenizer import (CALL, CHANNEL, CONSTRAIN, END, ENDOFTEXT, MESSAGE, RETURN, START, VOCAB_SIZE,
                         Tokenizer)
from .messages import ROLES, Author, Message, Role, TextContent

MAX_HEADER_TOKENS = 256  # far above any real header; past it, lenient mode reads the tokens as content
MAX_ISSUES = 100  # issues listed per parse; a stream of garbage is summarised by a count, not 1e5 entries
STOP_TOKENS = (RETURN, CALL)
_CONSTRAIN_TEXT = "<|constrain|>"
_CHANNEL_TEXT = "<|channel|>"


class HarmonyParseError(ValueError):
    """A malformed token sequence (strict mode): ``position`` is the token's index in the stream (the
    number of tokens when the problem is the end of the stream, ``token`` None then)."""

    def __init__(self, position: int, token: object, reason: str, token_text: str | None = None, *,
                 at_end: bool = False):
        self.position, self.token, self.reason = position, token, reason
        if at_end:
            where = f"end of stream after {position} tokens"
        elif token_text is not None:
            where = f"token {position} ({token} {token_text!r})"
        else:  # not a token id: its value is in the reason
            where = f"token {position}"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class Issue:
    """Something wrong in the stream that lenient mode recovered from."""

    position: int
    token: Optional[int]
    reason: str
    message_index: Optional[int] = None

    def to_dict(self) -> dict:
        return {"position": self.position, "token": self.token, "reason": self.reason,
                "message_index": self.message_index}


@dataclass(frozen=True)
class Delta:
    kind: Literal["header", "content", "end"]
    message_index: int
    role: Role
    name: Optional[str] = None
    channel: Optional[str] = None
    recipient: Optional[str] = None
    content_type: Optional[str] = None
    text: str = ""


class State(str, Enum):
    EXPECT_START = "expect_start"
    HEADER = "header"
    CONTENT = "content"
    DONE = "done"


@dataclass
class _Header:
    author: Author
    channel: Optional[str] = None
    recipient: Optional[str] = None
    content_type: Optional[str] = None
    problems: list[str] = field(default_factory=list)


def parse_header(text: str, role: Role | None) -> _Header:
    """Read a header's text (between ``<|start|>`` and ``<|message|>``, special tokens as their names).
    ``role`` is the known role when the header has no author word (the first message of a completion),
    or None when the header starts with the author."""
    problems = []
    before, sep, after = text.partition(_CHANNEL_TEXT)
    if sep and _CHANNEL_TEXT in after:
        problems.append("more than one <|channel|> in the header")
        after = after.replace(_CHANNEL_TEXT, " ")
    words = before.replace(_CONSTRAIN_TEXT, " " + _CONSTRAIN_TEXT).split()
    if role is None:
        if not words or words[0].startswith("to=") or words[0].startswith(_CONSTRAIN_TEXT):
            problems.append("header has no author")
            author = Author(role=Role.ASSISTANT)
        else:
            author = _author(words.pop(0))
    else:
        author = Author(role=role)
    recipient: str | None = None
    rest: list[str] = []

    def take(ws: list[str]) -> None:
        nonlocal recipient
        for w in ws:
            if w.startswith("to="):
                if recipient is not None:
                    problems.append(f"second recipient {w!r} in the header")
                    continue
                recipient = w[3:]
                if not recipient:
                    problems.append("empty recipient (to=)")
            else:
                rest.append(w)

    take(words)
    channel = None
    if sep:
        cwords = after.replace(_CONSTRAIN_TEXT, " " + _CONSTRAIN_TEXT).split()
        if not cwords or cwords[0].startswith("to=") or cwords[0].startswith(_CONSTRAIN_TEXT):
            problems.append("<|channel|> without a channel name")
        else:
            channel = cwords.pop(0)
        take(cwords)
    # "<|constrain|> json" (split) is read as "<|constrain|>json"
    merged: list[str] = []
    for w in rest:
        if merged and merged[-1] == _CONSTRAIN_TEXT:
            merged[-1] += w
        else:
            merged.append(w)
    content_type = None
    if merged:
        if len(merged) > 1:
            problems.append(f"unexpected text in the header: {' '.join(merged)!r}")
        content_type = " ".join(merged)
    return _Header(author, channel, recipient, content_type, problems)


_CHANNEL_WORDS = re.compile(r"\s*(?P<channel>[^\s<]+)(?:\s+(?P<to>to=[^\s<]+))?\s?")


def recover_header(text: str, role: Role | None, fallback: Role) -> tuple[_Header, str]:
    """(header, content) of a header that broke off before ``<|message|>`` (lenient mode). Up to and
    including its channel name (and a ``to=`` recipient right after it) it is read as a header; the
    rest is the message's content, so a damaged analysis header still gives an analysis message. Without
    ``<|channel|>``, without a channel name after it, or with nothing after it (no text to hide or show,
    no recipient), all of the text is the content of a message with no channel, by ``role`` (or
    ``fallback`` when the header would have started with its author)."""
    before, sep, after = text.partition(_CHANNEL_TEXT)
    m = _CHANNEL_WORDS.match(after) if sep else None
    if (m is None or m.group("channel").startswith("to=")
            or (m.group("to") is None and not after[m.end():].strip())):
        return _Header(Author(role=role or fallback)), text
    header = parse_header(text[:len(before) + len(sep) + m.end()], role)
    return header, after[m.end():]


def _author(word: str) -> Author:
    if word in ROLES:
        return Author(role=Role(word))
    role, colon, name = word.partition(":")
    if colon and role in ROLES:
        return Author(role=Role(role), name=name)
    return Author(role=Role.TOOL, name=word)  # a tool speaks under its own name: functions.get_weather


class _Utf8:
    """Incremental UTF-8 decoding that holds back an incomplete tail and reports invalid bytes."""

    def __init__(self):
        self.pending = b""

    def feed(self, data: bytes) -> tuple[str, bool]:
        """(decoded text, whether invalid bytes were replaced by U+FFFD)."""
        data = self.pending + data
        out, bad = [], False
        while data:
            try:
                out.append(data.decode("utf-8"))
                data = b""
            except UnicodeDecodeError as e:
                out.append(data[:e.start].decode("utf-8"))
                if e.end == len(data) and e.reason == "unexpected end of data":
                    self.pending = data[e.start:]
                    return "".join(out), bad
                out.append("\ufffd")
                bad = True
                data = data[e.end:]
        self.pending = b""
        return "".join(out), bad

    def flush(self) -> tuple[str, bool]:
        if not self.pending:
            return "", False
        self.pending = b""
        return "\ufffd", True


class StreamParser:
    """Token-by-token harmony parser (module docstring). ``role`` is the role of the first message when
    the prompt ended with ``<|start|>{role}`` (completions), or None when the stream starts with
    ``<|start|>``."""

    def __init__(self, tokenizer: Tokenizer, role: Role | str | None = Role.ASSISTANT, *, strict: bool = False,
                 continue_after_stop: bool = False):
        self.tok = tokenizer
        self.strict = strict
        # True reads <|return|> / <|call|> as message ends and goes on (whole transcripts, tool chains)
        self.continue_after_stop = continue_after_stop
        self.messages: list[Message] = []
        self.issues: list[Issue] = []
        self.omitted_issues = 0  # issues past MAX_ISSUES: counted (in the last issue), not listed
        self.tokens: list[int] = []
        self.stop_token: int | None = None
        # True once process_eos() found the stream ending inside a message (content or header), e.g. cut
        # off at max tokens: the one meaning of "truncated" (ParseResult.truncated, chat's JSON).
        self.truncated = False
        self._next_role: Role | None = Role(role) if role is not None else None
        self._last_role: Role = self._next_role or Role.ASSISTANT
        self._header_tokens: list[int] = []
        self._header: _Header | None = None
        self._text: list[str] = []
        self._utf8 = _Utf8()
        self.state = State.HEADER if self._next_role is not None else State.EXPECT_START

    # --- public state ------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.state == State.DONE

    def _peek_header(self) -> _Header | None:
        if self._header is not None:
            return self._header
        if self.state == State.HEADER:
            return parse_header(self.tok.decode(self._header_tokens), self._next_role)
        return None

    @property
    def current_role(self) -> Role | None:
        h = self._peek_header()
        return h.author.role if h else None

    @property
    def current_channel(self) -> str | None:
        h = self._peek_header()
        return h.channel if h else None

    @property
    def current_recipient(self) -> str | None:
        h = self._peek_header()
        return h.recipient if h else None

    @property
    def current_content_type(self) -> str | None:
        h = self._peek_header()
        return h.content_type if h else None

    @property
    def current_content(self) -> str:
        return "".join(self._text)

    # --- driving -------------------------------------------------------------------------------------

    def feed(self, tokens: Iterable[int]) -> list[Delta]:
        out: list[Delta] = []
        for t in tokens:
            out += self.process(t)
        return out

    def process(self, token: int) -> list[Delta]:
        pos = len(self.tokens)
        self.tokens.append(token)
        if not isinstance(token, int) or not 0 <= token < VOCAB_SIZE:
            self._problem(pos, token if isinstance(token, int) else None, f"not a token id: {token!r}", "ignored")
            return []
        handler = {State.EXPECT_START: self._expect_start, State.HEADER: self._in_header,
                   State.CONTENT: self._in_content, State.DONE: self._after_done}[self.state]
        return handler(pos, token)

    def process_eos(self) -> list[Delta]:
        """End of stream. Closes a message cut off in its content; a header cut off is malformed."""
        pos = len(self.tokens)
        out: list[Delta] = []
        inside = self.state == State.CONTENT or (self.state == State.HEADER and bool(self._header_tokens))
        self.truncated = self.truncated or inside
        if self.state == State.CONTENT:
            self._issue(pos, None, "stream ended inside a message (no <|end|>, <|return|> or <|call|>)")
            out = self._finish_message(pos, None)
        elif self.state == State.HEADER and self._header_tokens:
            text = self.tok.decode(self._header_tokens)
            self._problem(pos, None, "stream ended inside a message header", self._recovery_note(text), at_end=True)
            out = self._recover(pos, text) + self._finish_message(pos, None)
        self.state = State.DONE
        return out

    # --- states --------------------------------------------------------------------------------------

    def _expect_start(self, pos: int, token: int) -> list[Delta]:
        if token == START:
            self._begin_header(None)
            return []
        if token in STOP_TOKENS or token == ENDOFTEXT:
            if token != ENDOFTEXT:
                self._problem(pos, token, "stop token outside a message", "the stream stops")
            self.stop_token = token
            self.state = State.DONE
            return []
        if token == END:
            self._problem(pos, token, "<|end|> outside a message", "ignored")
            return []
        self._problem(pos, token, "expected <|start|>",
                      f"read as the header of another {self._last_role.value} message")
        # lenient: the model left out <|start|>role; go on as if it repeated the last role
        self._begin_header(self._last_role)
        return self._in_header(pos, token)

    def _begin_header(self, role: Role | None) -> None:
        self._next_role = role
        self._header_tokens = []
        self._header = None
        self.state = State.HEADER

    def _in_header(self, pos: int, token: int) -> list[Delta]:
        if token == MESSAGE:
            return self._open_message(pos)
        if token in (END, RETURN, CALL, ENDOFTEXT) or token == START:
            text = self.tok.decode(self._header_tokens)
            name = self.tok.decode([token])
            if token == START:
                self._problem(pos, token, "<|start|> inside a header", f"dropped header {text!r}")
                self._begin_header(None)
                return []
            self._problem(pos, token, f"{name} before <|message|>", self._recovery_note(text))
            out = self._recover(pos, text)
            if token == CALL:
                self._check_call(pos)
            out += self._finish_message(pos, token)
            if token != END:
                self.stop_token = token
                if not (self.continue_after_stop and token in STOP_TOKENS):
                    self.state = State.DONE
            return out
        if self.tok.is_special(token) and token not in (CHANNEL, CONSTRAIN):
            self._problem(pos, token, f"unexpected special token {self.tok.decode([token])} in a header", "ignored")
            return []
        self._header_tokens.append(token)
        if len(self._header_tokens) > MAX_HEADER_TOKENS:
            text = self.tok.decode(self._header_tokens)
            self._problem(pos, token, f"header longer than {MAX_HEADER_TOKENS} tokens", self._recovery_note(text))
            return self._recover(pos, text)
        return []

    def _open_message(self, pos: int) -> list[Delta]:
        header = parse_header(self.tok.decode(self._header_tokens), self._next_role)
        for p in header.problems:
            self._problem(pos, MESSAGE, p)
        self._header = header
        self._start_content()
        return [self._header_delta("header")]

    def _start_content(self) -> None:
        self._text = []
        self._utf8 = _Utf8()
        self.state = State.CONTENT

    def _in_content(self, pos: int, token: int) -> list[Delta]:
        if token == END or token in STOP_TOKENS or token == ENDOFTEXT:
            if token == ENDOFTEXT:
                self._problem(pos, token, "<|endoftext|> inside a message", "read as its end")
            if token == CALL:
                self._check_call(pos)
            out = self._finish_message(pos, token)
            if token != END:
                self.stop_token = token
                if not (self.continue_after_stop and token in STOP_TOKENS):
                    self.state = State.DONE
            return out
        if token == START:
            self._problem(pos, token, "<|start|> before <|end|>", "the open message is closed")
            out = self._finish_message(pos, token)
            self._begin_header(None)
            return out
        if self.tok.is_special(token):
            self._problem(pos, token, f"special token {self.tok.decode([token])} inside content", "kept as text")
            return self._append(pos, token, self._utf8.flush()[0] + self.tok.decode([token]), False)
        text, bad = self._utf8.feed(self.tok.decode_bytes([token]))
        return self._append(pos, token, text, bad)

    def _after_done(self, pos: int, token: int) -> list[Delta]:
        self._problem(pos, token, "token after the stream stopped", "ignored")
        return []

    # --- helpers -------------------------------------------------------------------------------------

    def _recovery_note(self, text: str) -> str:
        header, _ = recover_header(text, self._next_role, self._last_role)
        if header.channel is None:
            return f"its text is kept as content: {text!r}"
        return f"kept its channel {header.channel!r}, the rest as content: {text!r}"

    def _recover(self, pos: int, text: str) -> list[Delta]:
        """Open the message a broken-off header (``text``) stands for (see :func:`recover_header`)."""
        header, content = recover_header(text, self._next_role, self._last_role)
        for p in header.problems:
            self._problem(pos, None, p)
        self._header = header
        self._start_content()
        out = [self._header_delta("header")]
        if content:
            self._text = [content]
            out.append(self._header_delta("content", content))
        return out

    def _check_call(self, pos: int) -> None:
        # <|call|> ends a tool call; without a recipient there is no tool to call, and the message would
        # pass for ordinary text: say so instead of letting the call vanish.
        h = self._header
        if h is not None and not (h.recipient or "").strip():
            self._problem(pos, CALL, "<|call|> ends a message without a recipient",
                          "read as the message's end (no tool is called)")

    def _append(self, pos: int, token: int | None, text: str, bad: bool) -> list[Delta]:
        if bad:
            self._problem(pos, token, "invalid UTF-8 in content", "replaced by U+FFFD")
        if not text:
            return []
        self._text.append(text)
        return [self._header_delta("content", text)]

    def _finish_message(self, pos: int, token: int | None) -> list[Delta]:
        """Close the open message at ``token`` (None: the end of the stream)."""
        tail, bad = self._utf8.flush()
        out = self._append(pos, token, tail, False)
        if bad:
            self._problem(pos, token, "message ended inside a UTF-8 sequence", "replaced by U+FFFD",
                          at_end=token is None)
        h = self._header
        assert h is not None
        self.messages.append(Message(author=h.author, content=[TextContent(text="".join(self._text))],
                                     channel=h.channel, recipient=h.recipient, content_type=h.content_type))
        out.append(self._header_delta("end", index=len(self.messages) - 1))
        self._last_role = h.author.role
        self._header = None
        self._text = []
        self._header_tokens = []
        self.state = State.EXPECT_START
        return out

    def _header_delta(self, kind, text: str = "", index: int | None = None) -> Delta:
        h = self._header
        return Delta(kind=kind, message_index=len(self.messages) if index is None else index,
                     role=h.author.role, name=h.author.name, channel=h.channel, recipient=h.recipient,
                     content_type=h.content_type, text=text)

    def _issue(self, pos: int, token: int | None, reason: str) -> None:
        if len(self.issues) < MAX_ISSUES:
            self.issues.append(Issue(pos, token, reason, len(self.messages)))
            return
        # Past the limit one last issue counts the rest; it is replaced, not appended to, as they come.
        self.omitted_issues += 1
        first = self.issues.pop().position if self.omitted_issues > 1 else pos
        self.issues.append(Issue(first, None, f"{self.omitted_issues} more issue(s) from token {first} to token "
                                              f"{pos}, not listed (at most {MAX_ISSUES} are)"))

    def _problem(self, pos: int, token: int | None, reason: str, recovery: str = "", *,
                 at_end: bool = False) -> None:
        """A malformed stream: strict mode raises ``reason``; lenient mode records it with the ``recovery``."""
        if self.strict:
            valid = token is not None and 0 <= token < VOCAB_SIZE
            raise HarmonyParseError(pos, token, reason, self.tok.decode([token]) if valid else None,
                                    at_end=at_end)
        self._issue(pos, token, f"{reason}; {recovery}" if recovery else reason)


@dataclass
class ParseResult:
    messages: list[Message]
    issues: list[Issue]
    stop_token: Optional[int]
    truncated: bool  # the stream ended inside a message (e.g. at max tokens)
    omitted_issues: int = 0  # issues past MAX_ISSUES, counted in the last one instead of listed

    def to_dict(self) -> dict:
        return {"messages": [m.to_dict() for m in self.messages], "issues": [i.to_dict() for i in self.issues],
                "omitted_issues": self.omitted_issues, "stop_token": self.stop_token, "truncated": self.truncated}


def parse_tokens(tokenizer: Tokenizer, tokens: Iterable[int], role: Role | str | None = Role.ASSISTANT, *,
                 strict: bool = False, continue_after_stop: bool = True) -> ParseResult:
    """Parse a whole token sequence: a completion (``role`` = the role its prompt ended with), or with
    ``role=None`` a rendered conversation. By default ``<|return|>``/``<|call|>`` end a message and
    parsing goes on, as openai-harmony's ``parse_messages_from_completion_tokens`` does."""
    parser = StreamParser(tokenizer, role, strict=strict, continue_after_stop=continue_after_stop)
    for t in tokens:
        parser.process(t)
    parser.process_eos()
    return ParseResult(parser.messages, parser.issues, parser.stop_token, parser.truncated, parser.omitted_issues)
