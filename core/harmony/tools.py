"""Tool calls: the built-in tool namespaces gpt-oss was trained with, structured calls out of parsed
assistant messages, and tool results back in as tool messages.

A call is an assistant message with a recipient (``to=functions.get_weather``). The model emits it in a
few shapes, all read the same: the recipient in the role part of the header
(``<|start|>assistant to=functions.f<|channel|>commentary``) or after the channel
(``<|channel|>commentary to=functions.f <|constrain|>json``), on the commentary or the analysis channel
(built-in tools are usually called from analysis), with or without ``<|constrain|>json``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Callable, Optional

from pydantic import BaseModel

from .messages import Author, Message, Role, TextContent, ToolNamespaceConfig, ToolDescription

# Recipients that address a person, not a tool.
_NOT_TOOLS = {"assistant", "user", "all", "system", "developer"}

# The built-in tool descriptions are prompt text gpt-oss was trained on; they must be word-for-word.
_BROWSER_DESCRIPTION = (
    "Tool for browsing.\n"
    "The `cursor` appears in brackets before each browsing display: `[{cursor}]`.\n"
    "Cite information from the tool using the following format:\n"
    "`【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.\n"
    "Do not quote more than 10 words directly from the tool output.\n"
    "sources=web (default: web)")

_PYTHON_DESCRIPTION = (
    "Use this tool to execute Python code in your chain of thought. The code will not be shown to the user. "
    "This tool should be used for internal reasoning, but not for code that is intended to be visible to the "
    "user (e.g. when creating plots, tables, or files).\n\n"
    "When you send a message containing Python code to python, it will be executed in a stateful Jupyter "
    "notebook environment. python will respond with the output of the execution or time out after 120.0 "
    "seconds. The drive at '/mnt/data' can be used to save and persist user files. Internet access for this "
    "session is UNKNOWN. Depends on the cluster.")


def browser_namespace() -> ToolNamespaceConfig:
    """The ``browser`` tool section (search / open / find)."""
    return ToolNamespaceConfig(name="browser", description=_BROWSER_DESCRIPTION, tools=[
        ToolDescription(
            name="search",
            description="Searches for information related to `query` and displays `topn` results.",
            parameters={"type": "object",
                        "properties": {"query": {"type": "string"},
                                       "topn": {"type": "number", "default": 10},
                                       "source": {"type": "string"}},
                        "required": ["query"]}),
        ToolDescription(
            name="open",
            description=(
                "Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, showing "
                "`num_lines` lines.\n"
                "Valid link ids are displayed with the formatting: `【{id}†.*】`.\n"
                "If `cursor` is not provided, the most recent page is implied.\n"
                "If `id` is a string, it is treated as a fully qualified URL associated with `source`.\n"
                "If `loc` is not provided, the viewport will be positioned at the beginning of the document or "
                "centered on the most relevant passage, if available.\n"
                "Use this function without `id` to scroll to a new location of an opened page."),
            parameters={"type": "object",
                        "properties": {"id": {"type": ["number", "string"], "default": -1},
                                       "cursor": {"type": "number", "default": -1},
                                       "loc": {"type": "number", "default": -1},
                                       "num_lines": {"type": "number", "default": -1},
                                       "view_source": {"type": "boolean", "default": False},
                                       "source": {"type": "string"}}}),
        ToolDescription(
            name="find",
            description="Finds exact matches of `pattern` in the current page, or the page given by `cursor`.",
            parameters={"type": "object",
                        "properties": {"pattern": {"type": "string"}, "cursor": {"type": "number", "default": -1}},
                        "required": ["pattern"]}),
    ])


def python_namespace() -> ToolNamespaceConfig:
    """The ``python`` tool section (code goes in the message body, not as JSON arguments)."""
    return ToolNamespaceConfig(name="python", description=_PYTHON_DESCRIPTION, tools=[])


def function_tools(tools: list[dict[str, Any]]) -> ToolNamespaceConfig:
    """The ``functions`` namespace from OpenAI-style tool dicts (``{"type": "function", "function": {...}}``)
    or plain ``{"name", "description", "parameters"}`` dicts."""
    out = []
    for t in tools:
        f = t.get("function", t)
        out.append(ToolDescription(name=f["name"], description=f.get("description", ""),
                                   parameters=f.get("parameters")))
    return ToolNamespaceConfig(name="functions", tools=out)


class ToolCall(BaseModel):
    """A structured call. ``arguments`` is the raw text the model wrote (JSON for functions, code for
    python); ``parsed`` is its JSON value when it parses, and ``error`` says why not otherwise."""

    id: str
    recipient: str  # "functions.get_weather", "browser.search", "python"
    namespace: str
    name: str
    arguments: str
    parsed: Optional[Any] = None
    error: Optional[str] = None
    channel: Optional[str] = None
    content_type: Optional[str] = None

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI chat-completions ``tool_calls`` entry (function name without the namespace for
        ``functions.*``)."""
        name = self.name if self.namespace == "functions" else self.recipient
        return {"id": self.id, "type": "function", "function": {"name": name, "arguments": self.arguments}}


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _parse_arguments(text: str) -> tuple[Any, str | None]:
    stripped = text.strip()
    if stripped.startswith("```"):  # a fenced block: ```json\n{...}\n```
        stripped = stripped.strip("`")
        stripped = stripped[stripped.find("\n") + 1:] if "\n" in stripped else stripped
    if not stripped:
        return {}, None
    try:
        return json.loads(stripped), None
    except json.JSONDecodeError as e:
        # models sometimes add text after a complete object: keep the first JSON value
        start = min((i for i in (stripped.find("{"), stripped.find("[")) if i >= 0), default=-1)
        if start >= 0:
            try:
                value, _ = json.JSONDecoder().raw_decode(stripped[start:])
                return value, f"extra text around the JSON arguments ({e.msg})"
            except json.JSONDecodeError:
                pass
        return None, f"arguments are not valid JSON: {e.msg} at char {e.pos}"


def is_tool_call(message: Message) -> bool:
    return (message.author.role == Role.ASSISTANT and message.recipient is not None
            and message.recipient.strip() not in _NOT_TOOLS and message.recipient.strip() != "")


def tool_call_from_message(message: Message, call_id: str | None = None) -> ToolCall:
    recipient = (message.recipient or "").strip()
    namespace, _, name = recipient.partition(".")
    if not name:  # "python": the namespace is the tool
        name = namespace
    arguments = message.text
    parsed, error = (None, None)
    if namespace != "python" or (message.content_type or "").endswith("json"):
        parsed, error = _parse_arguments(arguments)
    return ToolCall(id=call_id or _new_call_id(), recipient=recipient, namespace=namespace, name=name,
                    arguments=arguments, parsed=parsed, error=error, channel=message.channel,
                    content_type=message.content_type)


def extract_tool_calls(messages: list[Message], id_factory: Callable[[], str] = _new_call_id) -> list[ToolCall]:
    """The tool calls among parsed messages, in order."""
    return [tool_call_from_message(m, id_factory()) for m in messages if is_tool_call(m)]


def tool_result_message(call: ToolCall | str, output: Any, channel: str | None = None) -> Message:
    """The tool message answering ``call`` (a :class:`ToolCall` or a recipient such as
    ``"functions.get_weather"``): ``<|start|>functions.get_weather to=assistant<|channel|>commentary…``.
    ``output`` that is not a string is written as JSON."""
    recipient = call.recipient if isinstance(call, ToolCall) else call
    if channel is None:
        channel = call.channel if isinstance(call, ToolCall) and call.channel else "commentary"
    text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
    return Message(author=Author(role=Role.TOOL, name=recipient), content=[TextContent(text=text)],
                   channel=channel, recipient="assistant")
