"""``mxmoe serve``: an OpenAI-compatible HTTP server (Chat Completions and Responses) over the generation engine.

    protocol.py   the OpenAI request bodies (pydantic, strict) and errors in OpenAI's shape
    convert.py    requests → harmony prompts; tokens → output items (one streaming parser per request)
    driver.py     the engine's step loop in one thread, bridged to asyncio (a queue per request)
    api.py        the endpoints' logic: JSON replies and SSE streams, stored responses
    metrics.py    Prometheus text for /metrics
    app.py        FastAPI + uvicorn (the ``serve`` extra, imported only when a server is built)
    cli.py        ``mxmoe serve``
"""

from .cli import register_cli

__all__ = ["register_cli"]
