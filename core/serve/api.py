"""The endpoints' logic, free of the web framework: a request body in, a JSON reply or an SSE stream out.

    body ─▶ protocol (validate) ─▶ convert.PromptBuilder (harmony prompt) ─▶ Driver.submit (a Ticket)
         ─▶ tokens ─▶ convert.Reply (one parser per request) ─▶ chat.completion(.chunk) / response(+ events)

Limits are checked before anything is queued: the prompt must fit the server's context (a 400 at
once), a limit on output tokens must be between 1 and the context, and prompt + limit must fit. A full
queue is a 429, a draining server a 503. A reply the model garbled is still a 200 with what could be
parsed (``finish_reason`` / ``status`` say how it ended, ``harmony_issues`` what was wrong).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from ..engine import SamplingParams
from .convert import STOP_TOKENS, Event, Item, Prompt, PromptBuilder, Reply, new_id
from .driver import Driver, QueueFull, ShuttingDown, Ticket
from .protocol import (APIError, ChatCompletionRequest, FunctionCallItem, InputMessage, ReasoningItem,
                       ReasoningText, ResponsesRequest, check_limit, check_stop, validate)

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default (and gpt-oss's recommended setting)
MAX_STORED_RESPONSES = 1024  # responses kept for previous_response_id (oldest dropped first)


@dataclass
class JSONReply:
    status: int
    body: Any
    headers: Optional[dict[str, str]] = None


@dataclass
class Stream:
    """A text/event-stream reply; ``cancel`` is called when the client goes away."""

    chunks: AsyncIterator[bytes]
    cancel: Callable[[], None]


Receive = Callable[[], Awaitable[dict]]  # the ASGI receive channel (for http.disconnect)


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"{head}data: {text}\n\n".encode()


async def wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


class Service:
    """The OpenAI-compatible API over one driver (one engine, one model)."""

    def __init__(self, driver: Driver, tokenizer, model_name: str, *, builder: PromptBuilder,
                 default_temperature: float = DEFAULT_TEMPERATURE, max_stored: int = MAX_STORED_RESPONSES):
        self.driver = driver
        self.tok = tokenizer
        self.model_name = model_name
        self.builder = builder
        self.default_temperature = default_temperature
        self.created = int(time.time())
        self.max_stored = max_stored
        self.stored: OrderedDict[str, tuple[list[Any], dict]] = OrderedDict()  # id → (items, response)

    # ---- shared ------------------------------------------------------------------------------------
    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def _params(self, prompt: Prompt, limit: Optional[int], limit_param: str, temperature, top_p, seed,
                prompt_param: str) -> SamplingParams:
        context = self.driver.cache_len
        n = len(prompt.tokens)
        if n > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, your "
                                f"{prompt_param} resulted in {n} tokens.", param=prompt_param,
                           code="context_length_exceeded")
        if limit is not None and n + limit > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{n + limit} tokens ({n} in the messages, {limit} in the completion).",
                           param=limit_param, code="context_length_exceeded")
        return SamplingParams(max_tokens=limit if limit is not None else context,
                              temperature=self.default_temperature if temperature is None else temperature,
                              top_p=1.0 if top_p is None else top_p, seed=seed, stop_tokens=STOP_TOKENS)

    def _submit(self, prompt: Prompt, params: SamplingParams) -> Ticket:
        try:
            return self.driver.submit(prompt.tokens, params)
        except QueueFull as e:
            raise APIError(429, f"The server is at capacity ({e}); retry shortly.", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except ShuttingDown:
            raise APIError(503, "The server is shutting down.", type="server_error", code="shutting_down") from None

    @staticmethod
    async def _run(ticket: Ticket, reply: Reply, on_events: Callable[[list[Event]], None] | None = None,
                   receive: Receive | None = None) -> str:
        """Feed ``ticket``'s tokens to ``reply`` until it ends; returns the engine's finish reason. A client that
        disconnects (``receive``) cancels the request."""
        watcher = None
        if receive is not None:
            watcher = asyncio.ensure_future(wait_for_disconnect(receive))
            watcher.add_done_callback(lambda w: None if w.cancelled() else ticket.cancel())
        try:
            async for kind, payload in ticket.events():
                if kind == "tokens":
                    events: list[Event] = []
                    for t in payload:
                        events += reply.push(t)
                    if on_events is not None and events:
                        on_events(events)
                    if reply.done:
                        ticket.cancel()  # a stop string or another role's turn: the rest is not wanted
                        return "stop"
                else:
                    reason, error = payload
                    if reason == "error":  # refused by the engine (what validation let through)
                        raise APIError(400, f"The engine refused the request: {error}", code="invalid_request")
                    if reason == "failed":
                        raise APIError(500, f"The engine failed while serving the request: {error}",
                                       type="server_error", code="engine_error")
                    return reason
            return "cancelled"  # pragma: no cover - events() always ends with "done"
        finally:
            if watcher is not None:
                watcher.cancel()

    # ---- Chat Completions --------------------------------------------------------------------------
    async def chat(self, data: dict, receive: Receive | None = None) -> JSONReply | Stream:
        req: ChatCompletionRequest = validate(ChatCompletionRequest, data)
        self._check_model(req.model)
        req.check_unsupported()
        stop = check_stop(req.stop)
        context = self.driver.cache_len
        limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        limit = check_limit(req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
                            limit_param, context)
        prompt = self.builder.chat(req)
        params = self._params(prompt, limit, limit_param, req.temperature, req.top_p, req.seed, "messages")
        ticket = self._submit(prompt, params)
        reply = Reply(self.tok, prefix=prompt.prefix, stop=stop, tools_allowed=prompt.tools_allowed)
        cid, created = new_id("chatcmpl"), int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return Stream(self._chat_stream(ticket, reply, prompt, cid, created, include_usage), ticket.cancel)
        try:
            reason = await self._run(ticket, reply, receive=receive)
        finally:
            ticket.cancel()
        if reason == "shutdown":
            raise APIError(503, "The server shut down before the reply was complete.", type="server_error",
                           code="shutting_down")
        reply.finish(reason)
        message: dict[str, Any] = {"role": "assistant", "content": self._chat_content(reply), "refusal": None,
                                   "reasoning_content": reply.text("reasoning") or None}
        calls = [self._chat_tool_call(i) for i in reply.tool_calls()]
        if calls:
            message["tool_calls"] = calls
        choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None,
                                  "finish_reason": reply.finish_reason}
        if reply.issues:
            choice["harmony_issues"] = reply.issues
        body = {"id": cid, "object": "chat.completion", "created": created, "model": self.model_name,
                "system_fingerprint": None, "choices": [choice], "usage": self._chat_usage(prompt, reply)}
        return JSONReply(200, body)

    @staticmethod
    def _chat_content(reply: Reply) -> str | None:
        if any(i.kind == "message" for i in reply.items):
            return reply.text("message")
        return None if reply.tool_calls() else ""

    @staticmethod
    def _chat_tool_call(item: Item) -> dict:
        return {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.text}}

    @staticmethod
    def _chat_usage(prompt: Prompt, reply: Reply) -> dict:
        n, m = len(prompt.tokens), reply.num_tokens
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": reply.reasoning_tokens}}

    async def _chat_stream(self, ticket: Ticket, reply: Reply, prompt: Prompt, cid: str, created: int,
                           include_usage: bool) -> AsyncIterator[bytes]:
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                "system_fingerprint": None}
        tool_index: dict[int, int] = {}  # output item → index among tool calls

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            body = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            return sse(body)

        def chunks(events: list[Event]) -> list[bytes]:
            out = []
            for kind, index, item, text in _coalesce(events):
                if item.kind == "tool_call":
                    if kind == "start":
                        tool_index[index] = len(tool_index)
                        out.append(chunk({"tool_calls": [{"index": tool_index[index], "id": item.call_id,
                                                          "type": "function",
                                                          "function": {"name": item.name, "arguments": ""}}]}))
                    elif kind == "delta":
                        out.append(chunk({"tool_calls": [{"index": tool_index[index],
                                                          "function": {"arguments": text}}]}))
                elif kind == "delta":
                    out.append(chunk({"content" if item.kind == "message" else "reasoning_content": text}))
            return out

        queue: asyncio.Queue = asyncio.Queue()
        run = asyncio.ensure_future(self._run(ticket, reply, lambda ev: queue.put_nowait(chunks(ev))))
        run.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                batch = await queue.get()
                if batch is None:
                    break
                for c in batch:
                    yield c
            try:
                reason = run.result()
            except APIError as e:
                yield sse(e.body())
                yield sse("[DONE]")
                return
            if reason == "shutdown":
                yield sse(APIError(503, "The server shut down before the reply was complete.", type="server_error",
                                   code="shutting_down").body())
                yield sse("[DONE]")
                return
            for c in chunks(reply.finish(reason)):
                yield c
            yield chunk({}, reply.finish_reason)
            if include_usage:
                yield sse({**head, "choices": [], "usage": self._chat_usage(prompt, reply)})
            yield sse("[DONE]")
        finally:
            ticket.cancel()
            run.cancel()

    # ---- Responses ---------------------------------------------------------------------------------
    async def responses(self, data: dict, receive: Receive | None = None) -> JSONReply | Stream:
        req: ResponsesRequest = validate(ResponsesRequest, data)
        self._check_model(req.model)
        req.check_unsupported()
        previous: list[Any] = []
        if req.previous_response_id is not None:
            if req.previous_response_id not in self.stored:
                raise APIError(404, f"Previous response with id '{req.previous_response_id}' not found.",
                               param="previous_response_id", code="previous_response_not_found")
            previous = list(self.stored[req.previous_response_id][0])
        limit = check_limit(req.max_output_tokens, "max_output_tokens", self.driver.cache_len)
        prompt, items = self.builder.responses(req, previous)
        params = self._params(prompt, limit, "max_output_tokens", req.temperature, req.top_p, req.seed, "input")
        ticket = self._submit(prompt, params)
        reply = Reply(self.tok, prefix=prompt.prefix, tools_allowed=prompt.tools_allowed)
        rid, created = new_id("resp"), int(time.time())
        store = req.store is not False
        view = _ResponseView(self, req, rid, created, prompt, reply, store)
        if req.stream:
            return Stream(self._responses_stream(ticket, reply, view, items), ticket.cancel)
        try:
            reason = await self._run(ticket, reply, receive=receive)
        finally:
            ticket.cancel()
        if reason == "shutdown":
            raise APIError(503, "The server shut down before the reply was complete.", type="server_error",
                           code="shutting_down")
        reply.finish(reason)
        body = view.final()
        self._store(rid, items, reply, body, store)
        return JSONReply(200, body)

    def _store(self, rid: str, items: list[Any], reply: Reply, body: dict, store: bool) -> None:
        if not store:
            return
        history = list(items)
        for item in reply.items:
            if item.kind == "reasoning":
                history.append(ReasoningItem(type="reasoning", id=item.id, summary=[],
                                             content=[ReasoningText(type="reasoning_text", text=item.text)]))
            elif item.kind == "message":
                history.append(InputMessage(type="message", role="assistant", content=item.text, id=item.id,
                                            phase="commentary" if item.channel == "commentary" else None))
            else:
                history.append(FunctionCallItem(type="function_call", call_id=item.call_id, name=item.name,
                                                arguments=item.text, id=item.id))
        self.stored[rid] = (history, body)
        while len(self.stored) > self.max_stored:
            self.stored.popitem(last=False)

    def get_response(self, rid: str) -> JSONReply:
        if rid not in self.stored:
            raise APIError(404, f"Response with id '{rid}' not found.", param="response_id", code="not_found")
        return JSONReply(200, self.stored[rid][1])

    def delete_response(self, rid: str) -> JSONReply:
        if self.stored.pop(rid, None) is None:
            raise APIError(404, f"Response with id '{rid}' not found.", param="response_id", code="not_found")
        return JSONReply(200, {"id": rid, "object": "response", "deleted": True})

    async def _responses_stream(self, ticket: Ticket, reply: Reply, view: "_ResponseView",
                                items: list[Any]) -> AsyncIterator[bytes]:
        queue: asyncio.Queue = asyncio.Queue()
        run = asyncio.ensure_future(self._run(ticket, reply, lambda ev: queue.put_nowait(view.events(ev))))
        run.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            yield view.event("response.created", {"response": view.snapshot("in_progress")})
            yield view.event("response.in_progress", {"response": view.snapshot("in_progress")})
            while True:
                batch = await queue.get()
                if batch is None:
                    break
                for c in batch:
                    yield c
            try:
                reason = run.result()
            except APIError as e:
                yield view.event("response.failed", {"response": view.snapshot("failed", error=e)})
                return
            if reason == "shutdown":
                e = APIError(503, "The server shut down before the reply was complete.", type="server_error",
                             code="shutting_down")
                yield view.event("response.failed", {"response": view.snapshot("failed", error=e)})
                return
            for c in view.events(reply.finish(reason)):
                yield c
            body = view.final()
            self._store(view.rid, items, reply, body, view.store)
            yield view.event("response.completed" if body["status"] == "completed" else "response.incomplete",
                             {"response": body})
        finally:
            ticket.cancel()
            run.cancel()

    # ---- models ------------------------------------------------------------------------------------
    def models(self) -> JSONReply:
        return JSONReply(200, {"object": "list", "data": [self._model_card()]})

    def model(self, name: str) -> JSONReply:
        self._check_model(name)
        return JSONReply(200, self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mxmoe",
                "max_model_len": self.driver.cache_len}


def _coalesce(events: list[Event]) -> list[tuple[str, int, Item, str]]:
    """Events as (kind, index, item, text), consecutive deltas of one item merged into one."""
    out: list[tuple[str, int, Item, str]] = []
    for e in events:
        if e.kind == "delta" and out and out[-1][0] == "delta" and out[-1][1] == e.index:
            kind, index, item, text = out[-1]
            out[-1] = (kind, index, item, text + e.text)
        else:
            out.append((e.kind, e.index, e.item, e.text))
    return out


class _ResponseView:
    """One Responses reply as the API writes it: the response object and its stream events."""

    def __init__(self, service: Service, req: ResponsesRequest, rid: str, created: int, prompt: Prompt,
                 reply: Reply, store: bool):
        self.service, self.req, self.rid, self.created = service, req, rid, created
        self.prompt, self.reply, self.store = prompt, reply, store
        self.seq = 0

    def event(self, kind: str, body: dict) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **body}
        self.seq += 1
        return sse(data, event=kind)

    def _status(self) -> str:
        return "incomplete" if self.reply.finish_reason == "length" else "completed"

    @staticmethod
    def item(item: Item, status: str | None = None) -> dict:
        if status is None:
            status = "incomplete" if item.incomplete else ("completed" if item.done else "in_progress")
        if item.kind == "reasoning":
            return {"id": item.id, "type": "reasoning", "summary": [], "status": status,
                    "content": [{"type": "reasoning_text", "text": item.text}]}
        if item.kind == "message":
            out = {"id": item.id, "type": "message", "role": "assistant", "status": status,
                   "content": [{"type": "output_text", "text": item.text, "annotations": [], "logprobs": []}]}
            out["phase"] = "commentary" if item.channel == "commentary" else "final_answer"
            return out
        return {"id": item.id, "type": "function_call", "call_id": item.call_id, "name": item.name,
                "arguments": item.text, "status": status}

    def snapshot(self, status: str, error: APIError | None = None) -> dict:
        req, reply = self.req, self.reply
        effort = (req.reasoning.effort if req.reasoning else None) or self.service.builder.default_effort
        done = status in ("completed", "incomplete")
        body = {
            "id": self.rid, "object": "response", "created_at": self.created, "status": status,
            "model": self.service.model_name,
            "output": [self.item(i) for i in reply.items] if done else [],
            "error": None if error is None else {"code": error.code, "message": error.message},
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {}, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": effort, "summary": None}, "store": self.store,
            "temperature": self.service.default_temperature if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "text": req.text or {"format": {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.function_tools()],
            "truncation": req.truncation or "disabled", "user": req.user,
            "usage": None,
        }
        if done:
            n, m = len(self.prompt.tokens), reply.num_tokens
            body["usage"] = {"input_tokens": n, "input_tokens_details": {"cached_tokens": 0},
                             "output_tokens": m, "output_tokens_details": {"reasoning_tokens": reply.reasoning_tokens},
                             "total_tokens": n + m}
            if reply.issues:
                body["harmony_issues"] = reply.issues
        return body

    def final(self) -> dict:
        return self.snapshot(self._status())

    def events(self, events: list[Event]) -> list[bytes]:
        out = []
        for kind, index, item, text in _coalesce(events):
            base = {"output_index": index}
            if kind == "start":
                out.append(self.event("response.output_item.added", {**base, "item": self.item(item, "in_progress")}))
                if item.kind == "message":
                    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                    out.append(self.event("response.content_part.added",
                                          {"item_id": item.id, **base, "content_index": 0, "part": part}))
                elif item.kind == "reasoning":
                    out.append(self.event("response.content_part.added",
                                          {"item_id": item.id, **base, "content_index": 0,
                                           "part": {"type": "reasoning_text", "text": ""}}))
            elif kind == "delta":
                if item.kind == "message":
                    out.append(self.event("response.output_text.delta", {"item_id": item.id, **base, "content_index": 0,
                                                                         "delta": text, "logprobs": []}))
                elif item.kind == "reasoning":
                    out.append(self.event("response.reasoning_text.delta",
                                          {"item_id": item.id, **base, "content_index": 0, "delta": text}))
                else:
                    out.append(self.event("response.function_call_arguments.delta",
                                          {"item_id": item.id, **base, "delta": text}))
            else:  # end
                if item.kind == "message":
                    out.append(self.event("response.output_text.done", {"item_id": item.id, **base, "content_index": 0,
                                                                        "text": item.text, "logprobs": []}))
                    part = {"type": "output_text", "text": item.text, "annotations": [], "logprobs": []}
                    out.append(self.event("response.content_part.done",
                                          {"item_id": item.id, **base, "content_index": 0, "part": part}))
                elif item.kind == "reasoning":
                    out.append(self.event("response.reasoning_text.done",
                                          {"item_id": item.id, **base, "content_index": 0, "text": item.text}))
                    out.append(self.event("response.content_part.done",
                                          {"item_id": item.id, **base, "content_index": 0,
                                           "part": {"type": "reasoning_text", "text": item.text}}))
                else:
                    out.append(self.event("response.function_call_arguments.done",
                                          {"item_id": item.id, **base, "name": item.name, "arguments": item.text}))
                out.append(self.event("response.output_item.done", {**base, "item": self.item(item)}))
        return out


__all__ = ["JSONReply", "Service", "Stream", "sse"]
