"""Harmony chat format: messages, renderer, streaming parser (openai-harmony compatible).

``messages`` (the pydantic model, in openai-harmony's JSON shape), ``render`` (conversation → token ids),
``parser`` (token ids → messages, streaming, strict or lenient), ``tools`` (built-in tool namespaces, tool
calls and results), ``cli`` / ``chat`` (``mxmoe harmony render|parse``, ``mxmoe chat``).
openai-harmony itself is only a test oracle: nothing here imports it.
"""

from .messages import (Author, ChannelConfig, Conversation, DeveloperContent, Message, ReasoningEffort,
                       ResponseFormat, Role, SystemContent, TextContent, ToolDescription, ToolNamespaceConfig)
from .parser import Delta, HarmonyParseError, Issue, ParseResult, StreamParser, parse_tokens
from .render import Renderer, RenderError, schema_to_typescript
from .tools import (ToolCall, browser_namespace, extract_tool_calls, function_tools, python_namespace,
                    tool_result_message)

__all__ = ["Author", "ChannelConfig", "Conversation", "DeveloperContent", "Message", "ReasoningEffort",
           "ResponseFormat", "Role", "SystemContent", "TextContent", "ToolDescription", "ToolNamespaceConfig",
           "Delta", "HarmonyParseError", "Issue", "ParseResult", "StreamParser", "parse_tokens", "Renderer",
           "RenderError", "schema_to_typescript", "ToolCall", "browser_namespace", "extract_tool_calls",
           "function_tools", "python_namespace", "tool_result_message"]
