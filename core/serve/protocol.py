"""Requests of the OpenAI API as pydantic models, and errors in OpenAI's shape.

Chat Completions (``POST /v1/chat/completions``) and Responses (``POST /v1/responses``) bodies are
validated strictly (JSON types are not coerced: ``"max_tokens": "5"`` is an error), unknown fields are
rejected, and every problem becomes an :class:`APIError`: a 4xx status and
``{"error": {"message", "type", "param", "code"}}``, ``param`` naming the field as OpenAI does
(``messages[0].content``). Messages and input items are validated one by one with the model their
``role`` / ``type`` selects, so an error names the element and never pydantic's union labels.

Fields that OpenAI defines but this server cannot honour (``logprobs``, ``n > 1``, penalties,
non-text formats) are accepted only at their neutral values; anything else is a 400 that says so,
never a silent no-op.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_LENGTH = 256  # characters per stop string; longer ones are a mistake, not a stop
MAX_TOOLS = 128  # as OpenAI
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
REASONING_EFFORTS = ("low", "medium", "high")


# ---- errors ----------------------------------------------------------------------------------------

class APIError(Exception):
    """An error reply: ``status`` and OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (NaN and Infinity are not JSON: rejected)."""

    def no_constants(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(raw, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({e}). The body must be a JSON "
                            f"object; see https://platform.openai.com/docs/api-reference.",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, found {_json_kind(data)}.",
                       code="invalid_json")
    return data


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _param(prefix: str, loc: tuple) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def validate(model: type[BaseModel], data: Any, prefix: str = "") -> Any:
    """``model`` validated from ``data``; the first problem becomes a 400 naming its field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param(prefix, tuple(err["loc"])) or None
        kind, found = err["type"], err.get("input")
        if kind == "missing":
            raise APIError(400, f"Missing required parameter: '{param}'.", param=param,
                           code="missing_required_parameter") from None
        if kind == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: '{param}'.", param=param,
                           code="unknown_parameter") from None
        if kind.endswith("_type") or kind in ("model_attributes_type", "dict_type", "list_type"):
            expected = err["msg"].removeprefix("Input should be ").removeprefix("a valid ")
            raise APIError(400, f"Invalid type for '{param}': expected {expected}, but got {_json_kind(found)} "
                                f"instead.", param=param, code="invalid_type") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"Invalid value for '{param}': {msg}", param=param, code="invalid_value") from None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ---- shared pieces ---------------------------------------------------------------------------------

def check_parameters_schema(schema: Any, where: str) -> None:
    """A function's ``parameters``: a JSON schema of an object, as OpenAI requires (raises ValueError)."""
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be a JSON schema object, found {_json_kind(schema)}")
    kind = schema.get("type", "object")
    if kind != "object":
        raise ValueError(f"{where} must be a JSON schema with type 'object', found type {kind!r}")
    props = schema.get("properties", {})
    if not isinstance(props, dict) or not all(isinstance(v, dict) for v in props.values()):
        raise ValueError(f"{where}.properties must be an object mapping each name to a JSON schema")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ValueError(f"{where}.required must be an array of strings")
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as e:  # pragma: no cover - a parsed JSON body always serialises
        raise ValueError(f"{where} is not JSON: {e}") from None


def _check_tool_name(name: str) -> str:
    if not TOOL_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid function name: use 1-64 letters, digits, '_' or '-'")
    return name


def text_of(content: Any, where: str, part_types: tuple[str, ...]) -> str:
    """The text of message content: a string, or an array of text parts of ``part_types``."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"Invalid type for '{where}': expected a string or an array of content parts, but got "
                          f"{_json_kind(content)} instead.", where, "invalid_type")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise bad_request(f"Invalid type for '{at}': expected an object, but got {_json_kind(part)} instead.",
                              at, "invalid_type")
        kind = part.get("type")
        if kind not in part_types:
            raise bad_request(f"Invalid value for '{at}.type': {kind!r}; this server takes text only "
                              f"({', '.join(part_types)}).", f"{at}.type")
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request(f"Invalid type for '{at}.text': expected a string, but got {_json_kind(text)} instead.",
                              f"{at}.text", "invalid_type")
        texts.append(text)
    return "".join(texts)


def check_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad_request(f"Invalid type for 'stop': expected a string or an array of strings, but got "
                          f"{_json_kind(stop)} instead.", "stop", "invalid_type")
    if len(items) > MAX_STOP_STRINGS:
        raise bad_request(f"Invalid value for 'stop': at most {MAX_STOP_STRINGS} stop strings, found {len(items)}.",
                          "stop")
    for s in items:
        if not s or len(s) > MAX_STOP_LENGTH:
            raise bad_request(f"Invalid value for 'stop': each stop string must have 1 to {MAX_STOP_LENGTH} "
                              f"characters, found {len(s)}.", "stop")
    return tuple(items)


class _Sampling(_Model):
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if v is not None and not (math.isfinite(v) and 0 <= v <= 2):
            raise ValueError(f"temperature must be between 0 and 2, found {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        if v is not None and not (math.isfinite(v) and 0 < v <= 1):
            raise ValueError(f"top_p must be greater than 0 and at most 1, found {v}")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v):
        if v is not None and not -2**63 <= v < 2**64:
            raise ValueError(f"seed must fit in 64 bits, found {v}")
        return v


def _check_metadata(v: Optional[dict]) -> Optional[dict]:
    if v is not None:
        if len(v) > 16 or not all(isinstance(k, str) and isinstance(x, str) and len(k) <= 64 and len(x) <= 512
                                  for k, x in v.items()):
            raise ValueError("metadata must map at most 16 keys (<= 64 characters) to strings (<= 512 characters)")
    return v


# ---- Chat Completions ------------------------------------------------------------------------------

class FunctionDefinition(_Model):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return _check_tool_name(v)

    @field_validator("parameters")
    @classmethod
    def _schema(cls, v):
        if v is not None:
            check_parameters_schema(v, "parameters")
        return v


class ChatTool(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class StreamOptions(_Model):
    include_usage: Optional[bool] = None
    include_obfuscation: Optional[bool] = None  # the client may send it; nothing is obfuscated here


class ChatCompletionRequest(_Sampling):
    model: str
    messages: list[Any] = Field(min_length=1)  # each validated by its role (chat_messages)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    stop: Any = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    tools: Optional[list[ChatTool]] = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Any = None
    parallel_tool_calls: Optional[bool] = None
    reasoning_effort: Optional[str] = None
    response_format: Optional[dict[str, Any]] = None
    n: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None
    user: Optional[str] = None
    metadata: Optional[dict[str, Any]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        return _check_metadata(v)

    def check_unsupported(self) -> None:
        """Fields accepted only at their neutral value (module docstring)."""
        if self.n not in (None, 1):
            raise bad_request("Invalid value for 'n': this server generates one choice per request (n = 1).", "n")
        if self.logprobs or self.top_logprobs:
            raise bad_request("logprobs are not supported by this server.",
                              "logprobs" if self.logprobs else "top_logprobs")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise bad_request(f"Invalid value for '{name}': penalties are not supported by this server "
                                  f"(only 0).", name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server.", "logit_bias")
        if self.response_format is not None:
            kind = self.response_format.get("type")
            if kind not in ("text", "json_schema"):
                raise bad_request(f"Invalid value for 'response_format.type': {kind!r}; this server takes 'text' "
                                  f"or 'json_schema' (written into the prompt as a harmony response format).",
                                  "response_format.type")


class ChatTextPart(_Model):
    type: Literal["text"]
    text: str


class ChatToolCallFunction(_Model):
    name: str
    arguments: str


class ChatToolCall(_Model):
    id: str
    type: Literal["function"]
    function: ChatToolCallFunction


class _ChatMessage(_Model):
    name: Optional[str] = None


class SystemMessage(_ChatMessage):
    role: Literal["system"]
    content: Any


class DeveloperMessage(_ChatMessage):
    role: Literal["developer"]
    content: Any


class UserMessage(_ChatMessage):
    role: Literal["user"]
    content: Any


class AssistantMessage(_ChatMessage):
    role: Literal["assistant"]
    content: Any = None
    reasoning_content: Optional[str] = None  # this server's (and vLLM's) reasoning field, sent back in history
    reasoning: Optional[str] = None  # the same, as some clients spell it
    tool_calls: Optional[list[ChatToolCall]] = None
    refusal: Optional[str] = None


class ToolMessage(_ChatMessage):
    role: Literal["tool"]
    content: Any
    tool_call_id: str


CHAT_ROLES = {"system": SystemMessage, "developer": DeveloperMessage, "user": UserMessage,
              "assistant": AssistantMessage, "tool": ToolMessage}
ChatMessage = Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage]


def chat_messages(raw: list[Any]) -> list[ChatMessage]:
    out = []
    for i, m in enumerate(raw):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"Invalid type for '{at}': expected an object, but got {_json_kind(m)} instead.", at,
                              "invalid_type")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"Invalid value for '{at}.role': {role!r}. Supported values are: "
                              f"{', '.join(repr(r) for r in CHAT_ROLES)}.", f"{at}.role")
        msg = validate(CHAT_ROLES[role], m, at)
        if role == "assistant" and msg.content is None and not msg.tool_calls:
            raise bad_request(f"Invalid value for '{at}.content': an assistant message needs content or tool_calls.",
                              f"{at}.content")
        out.append(msg)
    return out


# ---- Responses -------------------------------------------------------------------------------------

class ResponsesFunctionTool(_Model):
    type: Literal["function"]
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return _check_tool_name(v)

    @field_validator("parameters")
    @classmethod
    def _schema(cls, v):
        if v is not None:
            check_parameters_schema(v, "parameters")
        return v


class ReasoningConfig(_Model):
    effort: Optional[str] = None
    summary: Optional[str] = None
    generate_summary: Optional[str] = None


class ResponsesRequest(_Sampling):
    model: str
    input: Any = None  # a string or an array of items (response_items)
    instructions: Optional[str] = None
    previous_response_id: Optional[str] = None
    store: Optional[bool] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    reasoning: Optional[ReasoningConfig] = None
    tools: Optional[list[Any]] = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Any = None
    parallel_tool_calls: Optional[bool] = None
    max_output_tokens: Optional[int] = None
    max_tool_calls: Optional[int] = None
    text: Optional[dict[str, Any]] = None
    truncation: Optional[Literal["auto", "disabled"]] = None
    metadata: Optional[dict[str, Any]] = None
    include: Optional[list[str]] = None
    user: Optional[str] = None
    background: Optional[bool] = None
    service_tier: Optional[str] = None
    top_logprobs: Optional[int] = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        return _check_metadata(v)

    def check_unsupported(self) -> None:
        if self.background:
            raise bad_request("background responses are not supported by this server.", "background")
        if self.top_logprobs:
            raise bad_request("logprobs are not supported by this server.", "top_logprobs")
        fmt = (self.text or {}).get("format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_schema")):
            raise bad_request("Invalid value for 'text.format': this server takes {'type': 'text'} or a "
                              "json_schema format (written into the prompt as a harmony response format).",
                              "text.format")

    def function_tools(self) -> list[ResponsesFunctionTool]:
        out = []
        for i, t in enumerate(self.tools or []):
            at = f"tools[{i}]"
            if not isinstance(t, dict):
                raise bad_request(f"Invalid type for '{at}': expected an object, but got {_json_kind(t)} instead.",
                                  at, "invalid_type")
            if t.get("type") != "function":
                raise bad_request(f"Invalid value for '{at}.type': {t.get('type')!r}; this server runs function "
                                  f"tools only ('function').", f"{at}.type")
            out.append(validate(ResponsesFunctionTool, t, at))
        return out


class InputMessage(_Model):
    type: Optional[Literal["message"]] = None
    role: Literal["user", "system", "developer", "assistant"]
    content: Any
    id: Optional[str] = None
    status: Optional[str] = None
    phase: Optional[str] = None


class FunctionCallItem(_Model):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: Optional[str] = None
    status: Optional[str] = None
    namespace: Optional[str] = None


class FunctionCallOutputItem(_Model):
    type: Literal["function_call_output"]
    call_id: str
    output: Any
    id: Optional[str] = None
    status: Optional[str] = None


class ReasoningText(_Model):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Model):
    type: Literal["reasoning"]
    id: Optional[str] = None
    summary: list[ReasoningText] = Field(default_factory=list)
    content: Optional[list[ReasoningText]] = None
    encrypted_content: Optional[str] = None
    status: Optional[str] = None


ITEM_TYPES = {"message": InputMessage, "function_call": FunctionCallItem,
              "function_call_output": FunctionCallOutputItem, "reasoning": ReasoningItem}
InputItem = Union[InputMessage, FunctionCallItem, FunctionCallOutputItem, ReasoningItem]


def response_items(raw: Any, where: str = "input") -> list[InputItem]:
    """Input items: a string is one user message."""
    if raw is None:
        return []
    if isinstance(raw, str):
        return [InputMessage(role="user", content=raw)]
    if not isinstance(raw, list):
        raise bad_request(f"Invalid type for '{where}': expected a string or an array of items, but got "
                          f"{_json_kind(raw)} instead.", where, "invalid_type")
    out = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"Invalid type for '{at}': expected an object, but got {_json_kind(item)} instead.", at,
                              "invalid_type")
        kind = item.get("type", "message")
        if kind not in ITEM_TYPES:
            raise bad_request(f"Invalid value for '{at}.type': {kind!r}. Supported values are: "
                              f"{', '.join(repr(k) for k in ITEM_TYPES)}.", f"{at}.type")
        if kind == "message" and item.get("role") not in ("user", "system", "developer", "assistant"):
            raise bad_request(f"Invalid value for '{at}.role': {item.get('role')!r}. Supported values are: 'user', "
                              f"'system', 'developer' and 'assistant'.", f"{at}.role")
        out.append(validate(ITEM_TYPES[kind], item, at))
    return out


def check_effort(effort: Optional[str], param: str) -> Optional[str]:
    if effort is None:
        return None
    if effort not in REASONING_EFFORTS:
        raise bad_request(f"Invalid value for '{param}': {effort!r}. Supported values are: 'low', 'medium' and "
                          f"'high'.", param)
    return effort


def check_limit(value: Optional[int], param: str, most: int) -> Optional[int]:
    """A token limit: 1 ≤ value ≤ ``most`` (the server's context per request)."""
    if value is None:
        return None
    if not 1 <= value <= most:
        raise bad_request(f"Invalid value for '{param}': {value}; expected an integer from 1 to {most} (this "
                          f"server's context length).", param)
    return value
