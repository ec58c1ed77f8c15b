"""Harmony renderer: conversation → o200k_harmony token ids, token-for-token what openai-harmony renders.

A message is ``<|start|>{header}<|message|>{content}{end}``; the header is the author (``role``,
``role:name``, or a tool's name alone), `` to={recipient}``, ``<|channel|>{channel}`` and
`` {content_type}`` (``<|constrain|>`` as the special token); ``end`` is ``<|call|>`` for an assistant
message with a recipient, else ``<|end|>``. History rules (openai-harmony's): when the last assistant
message of the conversation is on the final channel, analysis messages before the first final message
are dropped; a tool-call chain (no final yet) keeps its analysis. ``<|return|>`` is never stored in
history: it is rendered only for the last final message of a training example.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from ..tokenizer import CALL, CHANNEL, CONSTRAIN, END, MESSAGE, RETURN, START, Tokenizer
from .messages import (Conversation, DeveloperContent, Message, Role, SystemContent, TextContent,
                       ToolDescription, ToolNamespaceConfig)

_CONSTRAIN_TEXT = "<|constrain|>"


class RenderError(ValueError):
    """A conversation that cannot be rendered (the message names the message index and the problem)."""


# --- text helpers ------------------------------------------------------------------------------------

def _lines(text: str) -> list[str]:
    # Rust's str::lines(): split on "\n", drop one trailing empty line, strip a "\r" right before a "\n".
    parts = text.split("\n")
    last = parts.pop()
    lines = [p[:-1] if p.endswith("\r") else p for p in parts]
    return lines + [last] if last else lines


def _comment_block(text: str | None) -> str:
    return "".join(f"// {line}\n" for line in _lines(text or ""))


def _json_compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _is_enum(schema: dict) -> bool:
    enum = schema.get("enum")
    return isinstance(enum, list) and len(enum) > 0


def _default_text(schema: dict, enum_bare: bool = True) -> str:
    # A string default is written raw (no escaping) in quotes; an enum's string default is written bare
    # (``enum_bare``, object properties) or as JSON (the generic oneOf path). Measured on openai-harmony.
    value = schema["default"]
    if isinstance(value, str):
        if not _is_enum(schema):
            return f'"{value}"'
        return value if enum_bare else _json_compact(value)
    return _json_compact(value)


def _nullable(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("nullable") is True


# --- JSON schema → TypeScript (the way harmony writes function signatures) ---------------------------

def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """A JSON schema as the TypeScript-like type harmony puts in ``type f = (_: …) => any;``.

    Supported: object (properties, required, descriptions, titles, string examples, defaults), string
    (with string enums), number/integer, boolean, arrays (``T[]``, ``Array<any>``), type unions
    (``"type": [..]``), ``nullable``, ``oneOf``. Anything else (``$ref``, ``anyOf``, ``const``, …) is ``any``,
    as in openai-harmony.
    """
    if not isinstance(schema, dict):
        return "any"
    if isinstance(schema.get("oneOf"), list):
        return _one_of_to_typescript(schema["oneOf"], indent)
    kind = schema.get("type")
    if isinstance(kind, list):
        names = ["number" if k == "integer" else k for k in kind if isinstance(k, str)]
        return " | ".join(names) if names else "any"
    if kind == "object":
        return _object_to_typescript(schema, indent)
    if kind == "string":
        # Only the string members are written; an enum with none (``[1, 2]``, ``[null]``) is a plain
        # string, as openai-harmony writes it (measured), not an empty type.
        members = [v for v in schema["enum"] if isinstance(v, str)] if _is_enum(schema) else []
        return " | ".join(f'"{v}"' for v in members) if members else "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        if "items" in schema:
            return schema_to_typescript(schema["items"], indent) + "[]"
        return "Array<any>"
    return "any"


def _one_of_to_typescript(variants: list, indent: str, parent_desc: str | None = None,
                          parent_desc_shown: bool = False, in_property: bool = False) -> str:
    """A ``oneOf`` as `` | A // note`` lines. openai-harmony has two paths for it, measured to differ: for an
    object property (``in_property``) an enum's string default is written bare, elsewhere as JSON."""
    out = []
    for i, variant in enumerate(variants):
        text = schema_to_typescript(variant, indent + "   ")
        if _nullable(variant) and "null" not in text:
            text += " | null"
        trailing = []
        if isinstance(variant, dict):
            desc = variant.get("description")
            # openai-harmony's de-duplication against the property's own description (measured).
            if isinstance(desc, str) and desc != parent_desc and not (i == 0 and parent_desc_shown):
                trailing.append(desc)
            if "default" in variant:
                trailing.append(f"default: {_default_text(variant, enum_bare=in_property)}")
        out.append(f"\n{indent} | {text}" + (f" // {' '.join(trailing)}" if trailing else ""))
    return "".join(out)


def _object_to_typescript(schema: dict, indent: str) -> str:
    out = []
    if isinstance(schema.get("description"), str):
        out.append(f"{indent}// {schema['description']}\n")
    out.append("{\n")
    props = schema.get("properties")
    required = schema.get("required")
    required = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
    if isinstance(props, dict):
        for key, prop in props.items():
            prop = prop if isinstance(prop, dict) else {}
            is_one_of = isinstance(prop.get("oneOf"), list)
            if isinstance(prop.get("title"), str):
                out.append(f"{indent}// {prop['title']}\n{indent}//\n")
            if not is_one_of and isinstance(prop.get("description"), str):
                out.append(f"{indent}// {prop['description']}\n")
            examples = prop.get("examples")
            if isinstance(examples, list) and examples:
                out.append(f"{indent}// Examples:\n")
                out.extend(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
            optional = "" if key in required else "?"
            if is_one_of:
                # openai-harmony writes the property's description above it unless the first variant
                # carries the same one (measured; see _one_of_to_typescript for the variants' side).
                desc = prop.get("description") if isinstance(prop.get("description"), str) else None
                first = prop["oneOf"][0] if prop["oneOf"] and isinstance(prop["oneOf"][0], dict) else {}
                show_desc = desc is not None and first.get("description") != desc
                if show_desc:
                    out.append(f"{indent}// {desc}\n")
                if "default" in prop:
                    out.append(f"{indent}// default: {_default_text(prop)}\n")
                variants = _one_of_to_typescript(prop["oneOf"], indent, desc, show_desc, in_property=True)
                out.append(f"{indent}{key}{optional}:{variants}\n{indent},\n")
                continue
            text = schema_to_typescript(prop, indent + "    ")
            if _nullable(prop) and "null" not in text:
                text += " | null"
            out.append(f"{indent}{key}{optional}: {text},")
            if "default" in prop:
                out.append(f" // default: {_default_text(prop)}")
            out.append("\n")
    out.append(f"{indent}}}")
    return "".join(out)


def _tool_to_text(tool: ToolDescription) -> str:
    signature = "()" if tool.parameters is None else f"(_: {schema_to_typescript(tool.parameters)})"
    return f"{_comment_block(tool.description)}type {tool.name} = {signature} => any;\n\n"


def namespace_to_text(ns: ToolNamespaceConfig) -> str:
    """One ``## name`` section of a ``# Tools`` block."""
    if not ns.tools:  # a namespace without typed tools (python) is described in prose
        return f"## {ns.name}\n" + ("\n" + "\n".join(_lines(ns.description)) if ns.description else "")
    body = "".join(_tool_to_text(t) for t in ns.tools)
    return (f"## {ns.name}\n\n{_comment_block(ns.description)}namespace {ns.name} {{\n\n"
            f"{body}}} // namespace {ns.name}")


def _tools_section(tools: dict[str, ToolNamespaceConfig]) -> str:
    # Namespaces come sorted by key (openai-harmony keeps them in a BTreeMap); str order = UTF-8 byte order.
    return "# Tools\n\n" + "\n\n".join(namespace_to_text(tools[k]) for k in sorted(tools))


def system_text(content: SystemContent, has_function_tools: bool = False) -> str:
    sections = []
    head = []
    if content.model_identity is not None:
        head.append(content.model_identity)
    if content.knowledge_cutoff is not None:
        head.append(f"Knowledge cutoff: {content.knowledge_cutoff}")
    if content.conversation_start_date is not None:
        head.append(f"Current date: {content.conversation_start_date}")
    if head:
        sections.append("\n".join(head))
    if content.reasoning_effort is not None:
        sections.append(f"Reasoning: {content.reasoning_effort.value.lower()}")
    if content.tools:
        sections.append(_tools_section(content.tools))
    cc = content.channel_config
    if cc is not None and cc.valid_channels:
        line = f"# Valid channels: {', '.join(cc.valid_channels)}."
        if cc.channel_required:
            line += " Channel must be included for every message."
        if has_function_tools:
            line += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(line)
    return "\n\n".join(sections)


def developer_text(content: DeveloperContent) -> str:
    sections = []
    if content.instructions is not None:
        sections.append(f"# Instructions\n\n{content.instructions}")
    if content.tools:
        sections.append(_tools_section(content.tools))
    if content.response_formats:
        formats = "\n\n".join(f"## {f.name}\n\n{_comment_block(f.description)}{_json_compact(f.schema_)}"
                              for f in content.response_formats)
        sections.append(f"# Response Formats\n\n{formats}")
    return "\n\n".join(sections)


def has_function_tools(messages: Sequence[Message]) -> bool:
    """Whether a developer message declares tools in the ``functions`` namespace (the system prompt
    then says that calls go to the commentary channel)."""
    return any(isinstance(c, DeveloperContent) and c.tools and "functions" in c.tools
               and c.tools["functions"].tools for m in messages for c in m.content)


# --- the renderer -------------------------------------------------------------------------------------

class Renderer:
    """Renders messages and conversations to token ids with a given :class:`~mxmoe.core.tokenizer.Tokenizer`."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer

    def _text(self, text: str) -> list[int]:
        return self.tok.encode_ordinary(text)

    def header(self, message: Message, index: int | None = None) -> list[int]:
        """``<|start|>`` and the header up to (not including) ``<|message|>``."""
        author = message.author
        if author.role == Role.TOOL:
            if not author.name:
                raise RenderError(f"message {index}: a tool message needs author name (e.g. functions.get_weather)")
            who = author.name
        else:
            who = author.role.value + (f":{author.name}" if author.name is not None else "")
        if message.recipient is not None:
            who += f" to={message.recipient}"
        ids = [START, *self._text(who)]
        if message.channel is not None:
            ids += [CHANNEL, *self._text(message.channel)]
        if message.content_type is not None:
            if message.content_type.startswith(_CONSTRAIN_TEXT):
                ids += [*self._text(" "), CONSTRAIN, *self._text(message.content_type[len(_CONSTRAIN_TEXT):])]
            else:
                ids += self._text(" " + message.content_type)
        return ids

    def content_parts(self, message: Message, function_tools: bool = False, index: int | None = None) -> list[str]:
        """The text of each content part, in order (system/developer content rendered as text)."""
        parts = []
        for c in message.content:
            if isinstance(c, TextContent):
                parts.append(c.text)
            elif isinstance(c, SystemContent):
                if message.author.role != Role.SYSTEM:
                    raise RenderError(f"message {index}: system content may only appear in a system message")
                parts.append(system_text(c, function_tools))
            elif isinstance(c, DeveloperContent):
                if message.author.role != Role.DEVELOPER:
                    raise RenderError(f"message {index}: developer content may only appear in a developer message")
                parts.append(developer_text(c))
        return parts

    def content_text(self, message: Message, function_tools: bool = False, index: int | None = None) -> str:
        return "".join(self.content_parts(message, function_tools, index))

    def render_message(self, message: Message, *, function_tools: bool = False, end: int | None = None,
                       index: int | None = None) -> list[int]:
        """One message. ``end`` overrides the closing token (``RETURN`` for a training target)."""
        if end is None:
            end = CALL if message.author.role == Role.ASSISTANT and message.recipient is not None else END
        # Each content part is tokenized on its own, as openai-harmony does: BPE merges do not cross part
        # boundaries, so the ids differ from those of the joined text.
        body = [t for part in self.content_parts(message, function_tools, index) for t in self._text(part)]
        return [*self.header(message, index), MESSAGE, *body, end]

    def render_conversation(self, conversation: Conversation | Sequence[Message], *, auto_drop_analysis: bool = True,
                            for_training: bool = False) -> list[int]:
        """All messages, with harmony's history rules. ``for_training`` ends a last assistant final
        message with ``<|return|>`` (the target the model learns to stop with)."""
        messages = _messages(conversation)
        function_tools = has_function_tools(messages)
        kept = _kept(messages, auto_drop_analysis)
        ids: list[int] = []
        for pos, (i, m) in enumerate(kept):
            end = None
            if (for_training and pos == len(kept) - 1 and m.author.role == Role.ASSISTANT
                    and m.channel == "final"):
                end = RETURN
            ids += self.render_message(m, function_tools=function_tools, end=end, index=i)
        return ids

    def render_for_completion(self, conversation: Conversation | Sequence[Message],
                              next_role: Role | str = Role.ASSISTANT, *, auto_drop_analysis: bool = True) -> list[int]:
        """The prompt for the next turn: the conversation, then ``<|start|>{next_role}``."""
        ids = self.render_conversation(conversation, auto_drop_analysis=auto_drop_analysis)
        return ids + [START, *self._text(Role(next_role).value)]

    def render_for_training(self, conversation: Conversation | Sequence[Message], *,
                            auto_drop_analysis: bool = True) -> list[int]:
        return self.render_conversation(conversation, auto_drop_analysis=auto_drop_analysis, for_training=True)


def _messages(conversation: Conversation | Sequence[Message]) -> list[Message]:
    return list(conversation.messages if isinstance(conversation, Conversation) else conversation)


def _kept(messages: list[Message], auto_drop_analysis: bool) -> list[tuple[int, Message]]:
    """(index, message) pairs left after harmony's history rule (module docstring)."""
    pairs = list(enumerate(messages))
    last_assistant = next((m for m in reversed(messages) if m.author.role == Role.ASSISTANT), None)
    if not auto_drop_analysis or last_assistant is None or last_assistant.channel != "final":
        return pairs  # mid tool-call chain (or no reply yet): keep the reasoning
    first_final = next((i for i, m in pairs if m.channel == "final"), len(messages))
    return [(i, m) for i, m in pairs if not (i < first_final and m.channel == "analysis")]
