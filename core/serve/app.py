"""The HTTP side: a FastAPI app over :class:`~mxmoe.core.serve.api.Service`, and uvicorn to run it.

FastAPI, Starlette and uvicorn are the optional ``serve`` extra, so they are imported where the app is
built, not when this module is (``mxmoe --help`` works without them).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/responses``, ``GET|DELETE /v1/responses/{id}``,
``GET /v1/models[/{model}]``, ``GET /health`` (no key needed), ``GET /metrics`` (Prometheus text).
With an API key every endpoint but ``/health`` wants ``Authorization: Bearer KEY``. Bodies larger than
``max_body_bytes`` are refused (413) before they are read whole. Every error is OpenAI's JSON shape.
"""

import asyncio
import hmac
import json
import logging
from typing import TYPE_CHECKING, Any

from .api import JSONReply, Service, Stream, wait_for_disconnect
from .protocol import APIError, parse_json_body

if TYPE_CHECKING:
    from .metrics import ServerMetrics

log = logging.getLogger("mxmoe.serve")

DEFAULT_MAX_BODY_BYTES = 8 * 2**20  # a 128k-token conversation is well under this
_ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/models", "/health", "/metrics")


def _endpoint(path: str) -> str:
    """A path as a metrics label (bounded: ids and unknown paths are folded)."""
    if path in _ENDPOINTS:
        return path
    for prefix in ("/v1/responses/", "/v1/models/"):
        if path.startswith(prefix):
            return prefix + "{id}"
    return "other"


def _error_bytes(status: int, message: str, code: str | None, type: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()


class _Gate:
    """ASGI middleware: the API key (all but /health) and the request counter, before any routing."""

    def __init__(self, app, api_key: str | None, metrics: "ServerMetrics | None"):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = _endpoint(scope["path"])
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and scope["path"] != "/health" and not self._authorized(scope):
                await self._reject(counting_send)
                return
            await self.app(scope, receive, counting_send)
        finally:
            if self.metrics is not None:
                self.metrics.observe_http(endpoint, status[0])

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                          self.api_key.encode())
        return False

    @staticmethod
    async def _reject(send) -> None:
        body = _error_bytes(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                            "invalid_api_key")
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def create_app(service: Service, *, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               metrics: "ServerMetrics | None" = None, close_driver: bool = True):
    """The FastAPI app. Its lifespan starts the service's driver (if not yet started) and, with
    ``close_driver``, stops it at shutdown."""
    import contextlib

    from fastapi import FastAPI, Request
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse

    driver = service.driver

    class SSEResponse(StreamingResponse):
        """An event stream that cancels its request when the client goes away, whether or not anything is
        being sent at that moment (the request may be prefilling, or inside a header the parser holds)."""

        def __init__(self, stream: Stream):
            super().__init__(stream.chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.cancel = stream.cancel

        async def __call__(self, scope, receive, send):
            gone = asyncio.ensure_future(wait_for_disconnect(receive))
            gone.add_done_callback(lambda w: None if w.cancelled() else self.cancel())
            try:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for chunk in self.body_iterator:
                    if gone.done():
                        break
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the connection broke while sending
                self.cancel()
            finally:
                gone.cancel()
                await self.body_iterator.aclose()

    def to_response(result: JSONReply | Stream):
        if isinstance(result, Stream):
            return SSEResponse(result)
        return JSONResponse(result.body, status_code=result.status, headers=result.headers)

    async def read_json(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        too_big = APIError(413, f"The request body exceeds this server's limit of {max_body_bytes} bytes.",
                           code="request_too_large")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body_bytes):
            raise too_big
        parts, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_big
            parts.append(chunk)
        return parse_json_body(b"".join(parts))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if driver._thread is None:
            driver.start()
        try:
            yield
        finally:
            if close_driver:
                driver.close()

    app = FastAPI(title="mxmoe", description="OpenAI-compatible API over mxmoe's generation engine",
                  docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        message = (f"Invalid URL ({request.method} {request.url.path})" if e.status_code == 404
                   else f"{e.detail} ({request.method} {request.url.path})")
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                       "code": code}}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):  # a bug here, never the model's output: say so, log it
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return JSONResponse({"error": {"message": f"Internal server error: {type(e).__name__}", "type": "server_error",
                                       "param": None, "code": "internal_error"}}, status_code=500)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return to_response(await service.chat(await read_json(request), request.receive))

    @app.post("/v1/responses")
    async def responses(request: Request):
        return to_response(await service.responses(await read_json(request), request.receive))

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        return to_response(service.get_response(response_id))

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        return to_response(service.delete_response(response_id))

    @app.get("/v1/models")
    async def models():
        return to_response(service.models())

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        return to_response(service.model(model))

    @app.get("/health")
    async def health():
        ok = driver.alive and not driver.draining
        status = "ok" if ok else ("shutting_down" if driver.draining else "engine_stopped")
        return JSONResponse({"status": status, "model": service.model_name, "running": driver.running,
                             "waiting": driver.waiting, "rows": driver.rows, "max_context": driver.cache_len},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        text = metrics.render() if metrics is not None else ""
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)
    return app


def run(app, driver, *, host: str = "127.0.0.1", port: int = 8000, shutdown_grace: float = 10.0,
        log_level: str = "info") -> int:
    """Serve ``app`` until SIGINT/SIGTERM. A signal stops new connections and requests; streams in flight
    get ``shutdown_grace`` seconds to finish, then are cut off with an error event; returns 0."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            driver.drain(shutdown_grace)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=int(shutdown_grace) + 5, lifespan="on")
    server = Server(config)
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler makes that a clean exit.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if server.started else 1


def make_app(engine, *, model_name: str, api_key: str | None = None, max_queue: int | None = None,
             max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, default_effort: str = "medium", date: str | None = None,
             default_temperature: float | None = None):
    """Everything over one engine: metrics, driver, prompt builder, service and app (``app.state`` holds
    ``service``, ``driver`` and ``metrics``). The driver starts with the app's lifespan."""
    from ..harmony import Renderer
    from .api import DEFAULT_TEMPERATURE
    from .convert import PromptBuilder
    from .driver import Driver
    from .metrics import ServerMetrics

    holder: dict = {}
    metrics = ServerMetrics(queue=lambda: holder["driver"].waiting, running=lambda: holder["driver"].running)
    driver = holder["driver"] = Driver(engine, max_queue=max_queue, metrics=metrics)
    tokenizer = engine.model.tokenizer
    builder = PromptBuilder(Renderer(tokenizer), default_effort=default_effort, date=date)
    service = Service(driver, tokenizer, model_name, builder=builder,
                      default_temperature=DEFAULT_TEMPERATURE if default_temperature is None else default_temperature)
    app = create_app(service, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    app.state.service, app.state.driver, app.state.metrics = service, driver, metrics
    return app
