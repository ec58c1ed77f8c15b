"""OpenAI requests ⇄ harmony: prompts in, one streaming parser per reply out.

In: the request's messages or items become a harmony conversation — the system message carries the
reasoning effort and the date, system/developer texts become the developer message's instructions,
function tools its ``functions`` namespace, assistant tool calls ``to=functions.NAME`` commentary
messages and tool results ``functions.NAME`` messages — rendered for completion. ``tool_choice`` is
honoured in the prompt: ``none`` leaves the tools out, a named function pre-fills the assistant header
``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>``, ``required`` pre-fills it up
to ``to=functions.`` (the model picks the name).

Out: :class:`Reply` feeds the generated tokens to a lenient :class:`StreamParser` and turns its events
into output items — ``reasoning`` (the analysis channel, and any assistant text whose channel is
missing or unknown: a damaged header may hide reasoning), ``message`` (final / commentary text for
the user) and ``tool_call`` — each opened, extended by text deltas, closed. Guarantees:

* analysis text only ever lands in reasoning items, also when the reply is cut by the token limit or
  a stop string (the parser classifies a message at its header, before any of its text is shown);
* no special-token text reaches the client: special tokens inside content are dropped before the
  parser sees them, and any ``<|name|>`` of a special token left in text (a recovered header) is cut
  out, also across deltas;
* stop strings apply to the user-visible text (message items), which never includes the stop string;
* malformed output never raises: what could be parsed is returned, ``issues`` says what was wrong.
"""

from __future__ import annotations

import datetime
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from ..harmony import (DeveloperContent, Message, Renderer, ResponseFormat, Role, StreamParser, SystemContent,
                       TextContent, ToolDescription)
from ..harmony.messages import Author, is_user_visible
from ..harmony.parser import State
from ..tokenizer import CALL, CHANNEL, CONSTRAIN, END, ENDOFTEXT, MESSAGE, RETURN, SPECIAL_TOKENS, START
from .protocol import (AssistantMessage, ChatCompletionRequest, DeveloperMessage, FunctionCallItem,
                       FunctionCallOutputItem, InputMessage, ReasoningItem, ResponsesRequest, SystemMessage,
                       ToolMessage, UserMessage, bad_request, chat_messages, check_effort, response_items, text_of)

STOP_TOKENS = (RETURN, CALL, ENDOFTEXT)  # where the engine stops a reply
_CONTENT_ENDS = {START, END, RETURN, CALL, ENDOFTEXT}  # the special tokens that mean something inside content
MAX_ISSUES = 100  # format issues listed per reply (a stream of garbage is not echoed back whole)
_NOT_TOOLS = {"assistant", "user", "all", "system", "developer"}  # recipients that are people, not tools
_SPECIAL_TEXT = re.compile(r"<\|[A-Za-z0-9_]{1,32}\|>")
_SPECIAL_START = re.compile(r"<(\|[A-Za-z0-9_]{0,32}\|?)?")  # what may still grow into a special token's name
_LONGEST_SPECIAL = max(len(s) for s in SPECIAL_TOKENS)
CHAT_PART_TYPES = ("text",)
RESPONSES_PART_TYPES = ("input_text", "output_text", "text")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---- in: requests → prompts -------------------------------------------------------------------------

@dataclass
class Prompt:
    tokens: list[int]  # what the engine is given: the rendered conversation, then ``prefix``
    prefix: list[int]  # forced assistant-header tokens after <|start|>assistant (tool_choice)
    tools_allowed: bool  # whether a tool call in the reply is one (tool_choice none: it is not)
    messages: list[Message] = field(default_factory=list)


@dataclass
class ToolChoice:
    mode: str  # "auto", "none", "required" or "function"
    name: Optional[str] = None


def _tool_choice(raw: Any, tools: list[ToolDescription], named_shape: str) -> ToolChoice:
    """``tool_choice`` of either API (``named_shape`` "chat": {"type", "function": {"name"}}; "responses":
    {"type", "name"})."""
    if raw is None:
        choice = ToolChoice("auto" if tools else "none")
    elif isinstance(raw, str):
        if raw not in ("none", "auto", "required"):
            raise bad_request(f"Invalid value for 'tool_choice': {raw!r}. Supported values are: 'none', 'auto', "
                              f"'required' or a named function.", "tool_choice")
        choice = ToolChoice(raw)
    elif isinstance(raw, dict) and raw.get("type") == "function":
        name = raw.get("function", {}).get("name") if named_shape == "chat" else raw.get("name")
        if named_shape == "chat" and not isinstance(raw.get("function"), dict):
            name = None
        if not isinstance(name, str):
            where = "tool_choice.function.name" if named_shape == "chat" else "tool_choice.name"
            raise bad_request(f"Missing required parameter: '{where}'.", where, "missing_required_parameter")
        choice = ToolChoice("function", name)
    else:
        raise bad_request("Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
                          "{'type': 'function', ...} naming a function.", "tool_choice")
    if choice.mode in ("required", "function") and not tools:
        raise bad_request(f"Invalid value for 'tool_choice': {choice.mode!r} needs tools, and none were given.",
                          "tool_choice")
    if choice.mode == "function" and choice.name not in {t.name for t in tools}:
        raise bad_request(f"Invalid value for 'tool_choice': no tool named {choice.name!r} among the tools.",
                          "tool_choice")
    return choice


def _check_unique(tools: list[ToolDescription]) -> None:
    seen = set()
    for i, t in enumerate(tools):
        if t.name in seen:
            raise bad_request(f"Invalid value for 'tools[{i}]': a second function named {t.name!r}.",
                              f"tools[{i}].function.name")
        seen.add(t.name)


class PromptBuilder:
    """Renders requests of both APIs to prompts (one per server: holds the renderer)."""

    def __init__(self, renderer: Renderer, default_effort: str = "medium", date: str | None = None):
        self.renderer = renderer
        self.tok = renderer.tok
        self.default_effort = default_effort
        self.date = date  # None: today's date, at each request

    def _head(self, effort: str | None, instructions: list[str], tools: list[ToolDescription], choice: ToolChoice,
              response_format: ResponseFormat | None) -> list[Message]:
        system = SystemContent(reasoning_effort=effort or self.default_effort,
                               conversation_start_date=self.date or datetime.date.today().isoformat())
        out = [Message.create(Role.SYSTEM, system)]
        dev = DeveloperContent(instructions="\n\n".join(instructions) if instructions else None)
        if tools and choice.mode != "none":
            dev.with_function_tools(tools)
        if response_format is not None:
            dev.response_formats = [response_format]
        if dev.instructions is not None or dev.tools or dev.response_formats:
            out.append(Message.create(Role.DEVELOPER, dev))
        return out

    def _render(self, messages: list[Message], choice: ToolChoice) -> Prompt:
        enc = self.tok.encode_ordinary
        if choice.mode == "function":
            prefix = [CHANNEL, *enc(f"commentary to=functions.{choice.name} "), CONSTRAIN, *enc("json"), MESSAGE]
        elif choice.mode == "required":
            prefix = [CHANNEL, *enc("commentary to=functions.")]
        else:
            prefix = []
        try:
            tokens = self.renderer.render_for_completion(messages)
        except ValueError as e:  # RenderError: a conversation that cannot be written in harmony
            raise bad_request(f"This conversation cannot be rendered: {e}", "messages") from None
        return Prompt(tokens + prefix, prefix, choice.mode != "none", messages)

    # -- Chat Completions --
    def chat(self, req: ChatCompletionRequest) -> Prompt:
        effort = check_effort(req.reasoning_effort, "reasoning_effort")
        tools = [ToolDescription(name=t.function.name, description=t.function.description or "",
                                 parameters=t.function.parameters) for t in req.tools or []]
        _check_unique(tools)
        choice = _tool_choice(req.tool_choice, tools, "chat")
        fmt = None
        if req.response_format is not None and req.response_format.get("type") == "json_schema":
            fmt = _response_format(req.response_format.get("json_schema"), "response_format.json_schema")
        instructions: list[str] = []
        history: list[Message] = []
        names: dict[str, str] = {}  # tool call id → function name
        for i, m in enumerate(chat_messages(req.messages)):
            at = f"messages[{i}]"
            if isinstance(m, (SystemMessage, DeveloperMessage)):
                instructions.append(text_of(m.content, f"{at}.content", CHAT_PART_TYPES))
            elif isinstance(m, UserMessage):
                history.append(Message.create(Role.USER, text_of(m.content, f"{at}.content", CHAT_PART_TYPES)))
            elif isinstance(m, AssistantMessage):
                reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
                if reasoning:
                    history.append(Message.create(Role.ASSISTANT, reasoning, channel="analysis"))
                text = "" if m.content is None else text_of(m.content, f"{at}.content", CHAT_PART_TYPES)
                if text:
                    # Text before a tool call is a preamble (commentary); otherwise the answer (final).
                    history.append(Message.create(Role.ASSISTANT, text,
                                                  channel="commentary" if m.tool_calls else "final"))
                for call in m.tool_calls or []:
                    names[call.id] = call.function.name
                    history.append(_call_message(call.function.name, call.function.arguments))
            elif isinstance(m, ToolMessage):
                if m.tool_call_id not in names:
                    raise bad_request(f"Invalid value for '{at}.tool_call_id': {m.tool_call_id!r} answers no "
                                      f"tool call of an earlier assistant message.", f"{at}.tool_call_id")
                text = text_of(m.content, f"{at}.content", CHAT_PART_TYPES)
                history.append(_result_message(names[m.tool_call_id], text))
        return self._render(self._head(effort, instructions, tools, choice, fmt) + history, choice)

    # -- Responses --
    def responses(self, req: ResponsesRequest, previous: list[Any]) -> tuple[Prompt, list[Any]]:
        """The prompt, and the conversation's items (``previous`` items, then this request's input)."""
        effort = check_effort(req.reasoning.effort if req.reasoning else None, "reasoning.effort")
        tools = [ToolDescription(name=t.name, description=t.description or "", parameters=t.parameters)
                 for t in req.function_tools()]
        _check_unique(tools)
        choice = _tool_choice(req.tool_choice, tools, "responses")
        fmt = None
        text_format = (req.text or {}).get("format")
        if isinstance(text_format, dict) and text_format.get("type") == "json_schema":
            fmt = _response_format(text_format, "text.format")
        items = previous + response_items(req.input)
        if not items:
            raise bad_request("Missing required parameter: 'input'.", "input", "missing_required_parameter")
        instructions = [req.instructions] if req.instructions else []
        history: list[Message] = []
        names: dict[str, str] = {}
        offset = len(previous)
        for i, item in enumerate(items):
            at = f"input[{i - offset}]"
            if isinstance(item, InputMessage):
                text = text_of(item.content, f"{at}.content", RESPONSES_PART_TYPES)
                if item.role in ("system", "developer"):
                    instructions.append(text)
                elif item.role == "user":
                    history.append(Message.create(Role.USER, text))
                else:
                    channel = "commentary" if item.phase == "commentary" else "final"
                    history.append(Message.create(Role.ASSISTANT, text, channel=channel))
            elif isinstance(item, ReasoningItem):
                parts = item.content if item.content else item.summary
                text = "".join(p.text for p in parts)
                if text:
                    history.append(Message.create(Role.ASSISTANT, text, channel="analysis"))
            elif isinstance(item, FunctionCallItem):
                names[item.call_id] = item.name
                history.append(_call_message(item.name, item.arguments))
            elif isinstance(item, FunctionCallOutputItem):
                if item.call_id not in names:
                    raise bad_request(f"Invalid value for '{at}.call_id': {item.call_id!r} answers no function_call "
                                      f"item before it.", f"{at}.call_id")
                output = item.output
                text = output if isinstance(output, str) else text_of(output, f"{at}.output", RESPONSES_PART_TYPES)
                history.append(_result_message(names[item.call_id], text))
        return self._render(self._head(effort, instructions, tools, choice, fmt) + history, choice), items


def _response_format(raw: Any, where: str) -> ResponseFormat:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not isinstance(raw.get("schema"), dict):
        raise bad_request(f"Invalid value for '{where}': expected an object with a 'name' and a JSON 'schema'.", where)
    desc = raw.get("description")
    return ResponseFormat(name=raw["name"], description=desc if isinstance(desc, str) else None, schema=raw["schema"])


def _call_message(name: str, arguments: str) -> Message:
    return Message.create(Role.ASSISTANT, arguments, channel="commentary", recipient=f"functions.{name}",
                          content_type="<|constrain|>json")


def _result_message(name: str, text: str) -> Message:
    return Message(author=Author(role=Role.TOOL, name=f"functions.{name}"), content=[TextContent(text=text)],
                   channel="commentary", recipient="assistant")


# ---- out: tokens → output items ---------------------------------------------------------------------

class TextFilter:
    """Streams text with special-token names cut out and stop strings applied; holds back a tail that
    could still become either."""

    def __init__(self, stops: Iterable[str] = ()):
        self.stops = tuple(stops)
        self.buf = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string found

    @staticmethod
    def _scrub(text: str) -> str:
        while True:  # cutting one name out can join the text around it into another
            out = _SPECIAL_TEXT.sub(lambda m: "" if m.group() in SPECIAL_TOKENS else m.group(), text)
            if out == text:
                return out
            text = out

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buf = self._scrub(self.buf + text)
        hits = [(i, s) for i, s in ((self.buf.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            at, self.matched = min(hits)
            out, self.buf, self.stopped = self.buf[:at], "", True
            return out
        keep = 0
        for s in self.stops:  # the longest tail that begins a stop string
            for n in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if self.buf.endswith(s[:n]):
                    keep = n
                    break
        opening = self.buf.rfind("<", max(0, len(self.buf) - _LONGEST_SPECIAL))
        if opening >= 0 and _SPECIAL_START.fullmatch(self.buf, opening):  # "<", "<|", "<|reserved_2", ...
            keep = max(keep, len(self.buf) - opening)
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out


@dataclass
class Item:
    """One output item: ``kind`` is "reasoning", "message" or "tool_call"."""

    kind: str
    id: str
    text: str = ""
    name: Optional[str] = None  # tool calls: the function's name (without "functions.")
    call_id: Optional[str] = None
    recipient: Optional[str] = None
    channel: Optional[str] = None
    done: bool = False
    incomplete: bool = False  # cut off by the token limit


@dataclass(frozen=True)
class Event:
    """``kind``: "start" (an item opens), "delta" (``text`` is appended to it) or "end"."""

    kind: str
    index: int
    item: Item
    text: str = ""


class Reply:
    """One reply being generated (module docstring). ``push`` each token, then ``finish``; both return
    :class:`Event` lists. ``done`` turns True when the reply is complete before the engine stops it (a
    stop string, a turn of another role): the caller then cancels the request."""

    def __init__(self, tokenizer, *, prefix: Iterable[int] = (), stop: Iterable[str] = (),
                 tools_allowed: bool = True):
        self.tok = tokenizer
        self.parser = StreamParser(tokenizer, Role.ASSISTANT, strict=False)
        self.stops = tuple(stop)
        self.tools_allowed = tools_allowed
        self.items: list[Item] = []
        self.issues: list[str] = []
        self.done = False
        self.stop_string: str | None = None
        self.finish_reason: str | None = None
        self.num_tokens = 0  # generated tokens pushed (the prefix is prompt)
        self.reasoning_tokens = 0
        self._filter: TextFilter | None = None
        self._open: Item | None = None
        self._skipping = False  # inside a message of another role: ignored
        self._pending: list[Event] = []
        self._message_start = 0  # num_tokens when the parser's current message began (for reasoning_tokens)
        for t in prefix:  # the forced header is the model's too: parse it, its events come with the first push
            self._pending += self._process(t)

    # -- driving --
    def push(self, token: int) -> list[Event]:
        events, self._pending = self._pending, []
        if self.done:
            return events
        self.num_tokens += 1
        return events + self._process(token)

    def finish(self, engine_reason: str) -> list[Event]:
        """The engine stopped (``stop``, ``length``, ``cancelled``): close what is open, set ``finish_reason``."""
        events, self._pending = self._pending, []
        cut = engine_reason == "length" and not self.done
        first_cut = len(self.items) - (self._open is not None)  # the open item and any the parser recovers
        if not self.done:
            events += self._deltas(self.parser.process_eos())
        if self._open is not None:  # a message the parser had not closed (stopped by us)
            events += self._close()
        if cut:
            for item in self.items[first_cut:]:
                item.incomplete = True
        for issue in self.parser.issues:
            self._issue(issue.reason)
        if self.finish_reason is None:
            has_calls = any(i.kind == "tool_call" for i in self.items)
            if engine_reason == "length" and not self.done:
                self.finish_reason = "length"
            elif has_calls:
                self.finish_reason = "tool_calls"
            else:
                self.finish_reason = "stop"
        self.done = True
        return events

    # -- views --
    def text(self, kind: str) -> str:
        return "".join(i.text for i in self.items if i.kind == kind)

    def tool_calls(self) -> list[Item]:
        return [i for i in self.items if i.kind == "tool_call"]

    # -- internals --
    def _process(self, token: int) -> list[Event]:
        if self.parser.state == State.CONTENT and self.tok.is_special(token) and token not in _CONTENT_ENDS:
            # The parser would keep it as text; it is never text for the client.
            self._issue(f"special token {self.tok.decode([token])} inside content (dropped)")
            return []
        return self._deltas(self.parser.process(token))

    def _issue(self, reason: str) -> None:
        if len(self.issues) < MAX_ISSUES:
            self.issues.append(reason)

    def _deltas(self, deltas) -> list[Event]:
        out: list[Event] = []
        for d in deltas:
            if self.done:
                break
            if d.kind == "header":
                out += self._header(d)
            elif d.kind == "content":
                out += self._content(d.text)
            elif d.kind == "end":
                if self._skipping:
                    self._skipping = False
                elif self._open is not None:
                    out += self._close()
                self._message_start = self.num_tokens
        return out

    def _header(self, d) -> list[Event]:
        closed = self._close()  # nothing: the parser ends each message before the next header
        if d.role != Role.ASSISTANT:
            # The model began a turn for someone else (a user, a tool): its reply is over.
            self._issue(f"the model began a {d.role.value} message; the reply ends there")
            self._skipping = True
            self.done = True
            self.finish_reason = "stop"
            return closed
        recipient = (d.recipient or "").strip()
        if recipient and recipient not in _NOT_TOOLS and self.tools_allowed:
            namespace, _, name = recipient.partition(".")
            name = name if namespace == "functions" and name else recipient
            item = Item("tool_call", new_id("fc"), name=TextFilter._scrub(name), call_id=new_id("call"),
                        recipient=recipient, channel=d.channel)
            self._filter = TextFilter()
        elif is_user_visible(d) or (recipient in _NOT_TOOLS and d.channel in ("final", "commentary")):
            item = Item("message", new_id("msg"), channel=d.channel)
            self._filter = TextFilter(self.stops)
        else:  # analysis, or no/unknown channel (may be reasoning), or a tool call where tools are off
            item = Item("reasoning", new_id("rs"), channel=d.channel)
            self._filter = TextFilter()
        self._open = item
        self.items.append(item)
        return closed + [Event("start", len(self.items) - 1, item)]

    def _content(self, text: str) -> list[Event]:
        if self._skipping or self._open is None:
            return []
        out = self._filter.push(text)
        events = self._append(out)
        if self._filter.stopped:
            self.stop_string = self._filter.matched
            events += self._close()
            self.done = True
            self.finish_reason = "stop"
        return events

    def _append(self, text: str) -> list[Event]:
        if not text:
            return []
        self._open.text += text
        return [Event("delta", len(self.items) - 1, self._open, text)]

    def _close(self) -> list[Event]:
        item = self._open
        if item is None:
            return []
        events = self._append(self._filter.flush())
        item.done = True
        if item.kind == "reasoning":  # its header, text and end token
            self.reasoning_tokens += self.num_tokens - self._message_start
        self._open = self._filter = None
        return events + [Event("end", self.items.index(item), item)]
