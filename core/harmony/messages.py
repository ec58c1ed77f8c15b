"""Harmony message model (pydantic), in the JSON shape openai-harmony's ``Conversation.to_json()`` writes.

A conversation is ``{"messages": [message, ...]}``; a message is ::

    {"role": "assistant", "name": null, "content": [{"type": "text", "text": "..."}],
     "channel": "commentary", "recipient": "functions.get_weather", "content_type": "<|constrain|>json"}

``content`` may also be a plain string (shorthand for one text part). System and developer messages carry
a ``system_content`` / ``developer_content`` part. In JSON, a missing system field means "not rendered"
(as in openai-harmony's renderer); in Python, :class:`SystemContent` defaults to what gpt-oss expects.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class Role(str, Enum):
    SYSTEM = "system"
    DEVELOPER = "developer"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


ROLES = {r.value for r in Role}
CHANNELS = ("analysis", "commentary", "final")
CONSTRAIN_JSON = "<|constrain|>json"


class ReasoningEffort(str, Enum):
    # openai-harmony's JSON spells these capitalised; the prompt says "Reasoning: low".
    LOW = "Low"
    MEDIUM = "Medium"
    HIGH = "High"

    @classmethod
    def parse(cls, value: "str | ReasoningEffort") -> "ReasoningEffort":
        if isinstance(value, ReasoningEffort):
            return value
        try:
            return cls(str(value).capitalize())
        except ValueError:
            raise ValueError(f"reasoning effort must be low, medium or high, got {value!r}") from None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Author(_Model):
    role: Role
    name: Optional[str] = None


class ToolDescription(_Model):
    """One function: ``parameters`` is a JSON schema (rendered as a TypeScript type), or None for ``()``."""

    name: str
    description: str = ""
    parameters: Optional[dict[str, Any]] = None


class ToolNamespaceConfig(_Model):
    """A tool namespace (``functions``, ``browser``, ``python``, …) as the prompt's ``## name`` section."""

    name: str
    description: Optional[str] = None
    tools: list[ToolDescription] = Field(default_factory=list)


class ChannelConfig(_Model):
    valid_channels: list[str]
    channel_required: bool = True

    @classmethod
    def require_channels(cls, channels: list[str]) -> "ChannelConfig":
        return cls(valid_channels=list(channels), channel_required=True)


class TextContent(_Model):
    type: Literal["text"] = "text"
    text: str


class SystemContent(_Model):
    type: Literal["system_content"] = "system_content"
    model_identity: Optional[str] = "You are ChatGPT, a large language model trained by OpenAI."
    reasoning_effort: Optional[ReasoningEffort] = ReasoningEffort.MEDIUM
    conversation_start_date: Optional[str] = None
    knowledge_cutoff: Optional[str] = "2024-06"
    channel_config: Optional[ChannelConfig] = Field(
        default_factory=lambda: ChannelConfig.require_channels(list(CHANNELS)))
    tools: Optional[dict[str, ToolNamespaceConfig]] = None

    @field_validator("reasoning_effort", mode="before")
    @classmethod
    def _effort(cls, v):
        return None if v is None else ReasoningEffort.parse(v)

    def with_tools(self, ns: ToolNamespaceConfig) -> "SystemContent":
        self.tools = {**(self.tools or {}), ns.name: ns}
        return self


class ResponseFormat(_Model):
    """A named output format for the developer message's ``# Response Formats`` section (harmony docs;
    openai-harmony 0.0.8 does not render it)."""

    name: str
    description: Optional[str] = None
    schema_: dict[str, Any] = Field(alias="schema")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class DeveloperContent(_Model):
    type: Literal["developer_content"] = "developer_content"
    instructions: Optional[str] = None
    tools: Optional[dict[str, ToolNamespaceConfig]] = None
    response_formats: Optional[list[ResponseFormat]] = None

    def with_tools(self, ns: ToolNamespaceConfig) -> "DeveloperContent":
        self.tools = {**(self.tools or {}), ns.name: ns}
        return self

    def with_function_tools(self, tools: list[ToolDescription]) -> "DeveloperContent":
        return self.with_tools(ToolNamespaceConfig(name="functions", tools=list(tools)))


Content = Union[TextContent, SystemContent, DeveloperContent]


def _content_from_dict(raw: Any) -> Content:
    if isinstance(raw, str):
        return TextContent(text=raw)
    if not isinstance(raw, dict):
        raise ValueError(f"content part must be an object or a string, got {type(raw).__name__}")
    kind = raw.get("type", "text")
    if kind == "text":
        return TextContent(**raw)
    body = {k: v for k, v in raw.items() if k != "type"}
    if kind == "system_content":
        # openai-harmony renders a missing field as absent (None), not as the Python default.
        fields = ("model_identity", "reasoning_effort", "conversation_start_date", "knowledge_cutoff",
                  "channel_config", "tools")
        return SystemContent(**{**{f: None for f in fields}, **body})
    if kind == "developer_content":
        return DeveloperContent(**body)
    raise ValueError(f"unknown content type {kind!r} (expected text, system_content or developer_content)")


class Message(_Model):
    author: Author
    content: list[Content] = Field(default_factory=list)
    channel: Optional[str] = None
    recipient: Optional[str] = None
    content_type: Optional[str] = None

    @classmethod
    def create(cls, role: "Role | str", content: "str | Content | list[Content]" = "", *,
               name: str | None = None, channel: str | None = None, recipient: str | None = None,
               content_type: str | None = None) -> "Message":
        if isinstance(content, str):
            content = [TextContent(text=content)]
        elif not isinstance(content, list):
            content = [content]
        return cls(author=Author(role=Role(role), name=name), content=content, channel=channel,
                   recipient=recipient, content_type=content_type)

    @property
    def role(self) -> Role:
        return self.author.role

    @property
    def text(self) -> str:
        """The concatenated text parts."""
        return "".join(c.text for c in self.content if isinstance(c, TextContent))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.author.role.value, "name": self.author.name,
                               "content": [_content_to_dict(c) for c in self.content]}
        for key in ("channel", "recipient", "content_type"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Message":
        if not isinstance(data, dict):
            raise ValueError(f"a message must be a JSON object, got {type(data).__name__}")
        try:
            if "author" in data:  # also accept pydantic's own dump
                author = Author(**data["author"])
            else:
                author = Author(role=data.get("role"), name=data.get("name"))
        except ValidationError as e:
            raise ValueError(f"author: {_errors(e)}") from None
        except TypeError as e:  # "author" is not an object
            raise ValueError(f"author must be an object with a role, found {data['author']!r}") from None
        raw = data.get("content", [])
        if isinstance(raw, str):
            parts = [raw]
        elif isinstance(raw, list):
            parts = raw
        else:
            found = "null" if raw is None else f"{type(raw).__name__} {raw!r}"
            raise ValueError(f"content must be a string or a list of content parts, found {found}")
        content = []
        for j, part in enumerate(parts):
            try:
                content.append(_content_from_dict(part))
            except ValidationError as e:
                raise ValueError(f"content part {j}: {_errors(e)}") from None
            except (TypeError, ValueError) as e:
                raise ValueError(f"content part {j}: {e}") from None
        try:
            return cls(author=author, content=content, channel=data.get("channel"),
                       recipient=data.get("recipient"), content_type=data.get("content_type"))
        except ValidationError as e:
            raise ValueError(_errors(e)) from None


def _errors(e: ValidationError) -> str:
    """A pydantic error as one line: each field, what is wrong and what was found."""
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']} (found {err.get('input')!r})"
                     for err in e.errors())


def _content_to_dict(c: Content) -> dict[str, Any]:
    if isinstance(c, TextContent):
        return {"type": "text", "text": c.text}
    out = c.model_dump(exclude_none=True, by_alias=True, mode="json")
    out["type"] = c.type
    return out


class Conversation(_Model):
    messages: list[Message] = Field(default_factory=list)

    @classmethod
    def from_messages(cls, messages: list[Message]) -> "Conversation":
        return cls(messages=list(messages))

    def to_dict(self) -> dict[str, Any]:
        return {"messages": [m.to_dict() for m in self.messages]}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, **kwargs)

    @classmethod
    def from_dict(cls, data: Any) -> "Conversation":
        if isinstance(data, list):  # a bare list of messages
            data = {"messages": data}
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ValueError('a conversation must be {"messages": [...]} or a list of messages')
        messages = []
        for i, m in enumerate(data["messages"]):
            try:
                messages.append(Message.from_dict(m))
            except ValueError as e:
                raise ValueError(f"message {i}: {e}") from None
        return cls(messages=messages)

    @classmethod
    def from_json(cls, text: str) -> "Conversation":
        return cls.from_dict(json.loads(text))


def is_user_visible(message: Any, show_analysis: bool = False) -> bool:
    """Whether a chat shows ``message`` to the user as the reply: an assistant message without a
    recipient on the ``final`` or ``commentary`` channel. Never reasoning (``analysis``), a tool call
    (a recipient), a message of another role, or one whose channel is missing or unknown (a damaged
    header may hide reasoning there), unless ``show_analysis``, which also shows the assistant's
    messages without a recipient on any channel or none (dimmed, as reasoning). Works on a
    :class:`Message` and on the parser's ``Delta`` alike (``role``, ``channel``, ``recipient``), so a
    streaming printer decides at the header what a finished message would decide."""
    if Role(message.role) != Role.ASSISTANT or message.recipient is not None:
        return False
    return message.channel in ("final", "commentary") or show_analysis


def messages_to_json(messages: list[Message], **kwargs) -> str:
    return json.dumps([m.to_dict() for m in messages], ensure_ascii=False, **kwargs)
