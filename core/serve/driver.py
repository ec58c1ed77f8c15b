"""The engine's step loop in one background thread, bridged to asyncio.

    handler (event loop) ──submit──▶ inbox ──▶ engine thread: Engine.submit, Engine.step, ...
           ▲                                      │ after each step: new tokens / finishes of every request
           └──── asyncio.Queue per request ◀──────┘ (one loop.call_soon_threadsafe per step and loop)

The engine (core/engine.py) is single-threaded: only this thread calls ``submit`` and ``step``;
handlers talk to it through :class:`Ticket` (``events()`` to read, ``cancel()`` to stop — the flag is
honoured at the start of the next step, which frees the row). Admission is bounded: at most
``rows + max_queue`` requests are in flight, past that :class:`QueueFull` (the server's 429).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import defaultdict
from typing import TYPE_CHECKING, AsyncIterator, Sequence

if TYPE_CHECKING:
    from ..engine import Engine, Request, SamplingParams
    from .metrics import ServerMetrics

log = logging.getLogger("mxmoe.serve")
_DRIVEN: "weakref.WeakSet[Engine]" = weakref.WeakSet()  # engines a running driver owns (one thread each)


class QueueFull(Exception):
    """Every row is busy and the waiting queue is full."""


class ShuttingDown(Exception):
    """The server is draining: no new requests."""


class Ticket:
    """One request's side of the bridge: its events arrive on the event loop it was submitted from.

    ``events()`` yields ``("tokens", [ids])`` as they are generated, then one ``("done", (finish_reason,
    error))``: the engine's reason (stop, length, cancelled; error when the engine refused the request),
    "shutdown" (cut off by a closing server) or "failed" (the engine itself failed; ``error`` says how)."""

    def __init__(self, driver: "Driver", prompt_ids: Sequence[int], params: "SamplingParams",
                 loop: asyncio.AbstractEventLoop):
        self.driver = driver
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request: Request | None = None  # the engine's, once the engine thread submitted it
        self.created = time.perf_counter()
        self.finish_reason: str | None = None
        self.cancelled = False
        self.sent = 0  # tokens handed to the loop (engine thread only)
        self.last_token_at: float | None = None

    async def events(self) -> AsyncIterator[tuple[str, object]]:
        while True:
            kind, payload = await self.queue.get()
            yield kind, payload
            if kind == "done":
                return

    def cancel(self) -> None:
        """Stop generating (thread-safe, idempotent); the ticket still gets its "done" event."""
        if self.cancelled:
            return
        self.cancelled = True
        if self.request is not None:
            self.request.cancel()
        self.driver._wake()


class Driver:
    """Runs ``engine`` in a daemon thread (module docstring). ``start()`` it, ``close()`` it."""

    def __init__(self, engine: "Engine", *, max_queue: int | None = None, metrics: "ServerMetrics | None" = None):
        self.engine = engine
        self.rows = engine.num_rows
        self.cache_len = engine.cache_len
        self.max_queue = 4 * self.rows if max_queue is None else max_queue
        self.metrics = metrics
        self._cond = threading.Condition()
        self._inbox: list[Ticket] = []
        self._live: set[Ticket] = set()  # submitted, not yet done (guarded by _cond)
        self._active: list[Ticket] = []  # in the engine (engine thread only)
        self._outbox: dict = defaultdict(list)  # event loop → deliveries of this step (engine thread only)
        self._stop = False
        self._draining = False
        self._deadline: float | None = None  # draining: cancel what still runs at this time
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None  # what killed the loop, if anything did
        self.running = 0  # requests holding a row, after the last step
        self.waiting = 0  # requests waiting for a row (or for the engine thread)
        self.steps = 0

    # ---- the handlers' side ------------------------------------------------------------------------
    def start(self) -> "Driver":
        if self.engine in _DRIVEN:
            raise RuntimeError("this engine is already driven by another running server: an engine is single-threaded")
        _DRIVEN.add(self.engine)
        self._thread = threading.Thread(target=self._run, name="mxmoe-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.failure is None

    @property
    def draining(self) -> bool:
        return self._draining

    def submit(self, prompt_ids: Sequence[int], params: "SamplingParams",
               loop: asyncio.AbstractEventLoop | None = None) -> Ticket:
        ticket = Ticket(self, prompt_ids, params, loop or asyncio.get_running_loop())
        with self._cond:
            if self._draining or self._stop:
                raise ShuttingDown("the server is shutting down")
            if self.failure is not None:
                raise ShuttingDown(f"the engine stopped: {self.failure!r}")
            if len(self._live) >= self.rows + self.max_queue:
                raise QueueFull(f"all {self.rows} rows are busy and {self.max_queue} requests are waiting")
            self._live.add(ticket)
            self._inbox.append(ticket)
            self.waiting += 1
            self._cond.notify()
        return ticket

    @property
    def in_flight(self) -> int:
        return len(self._live)

    def drain(self, grace: float) -> None:
        """Refuse new requests; cancel those still running after ``grace`` seconds (thread-safe)."""
        with self._cond:
            if not self._draining:
                self._draining = True
                self._deadline = time.perf_counter() + max(grace, 0.0)
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ---- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # never die silently: fail what is in flight, say why
            log.exception("the engine loop stopped")
            self.failure = e
            with self._cond:
                tickets = list(self._live)
            for t in tickets:
                self._post({t.loop: [(t, ("done", ("failed", f"the engine stopped: {e!r}")))]})
            with self._cond:
                self._live.clear()
        finally:
            _DRIVEN.discard(self.engine)

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._inbox and not self._stop and not engine.has_work:
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
                stop = self._stop
                expired = self._deadline is not None and time.perf_counter() >= self._deadline
            for t in inbox:
                if t.cancelled or stop:
                    self._finish(t, "cancelled" if t.cancelled else "shutdown", None)
                    continue
                t.request = engine.submit(t.prompt_ids, t.params)
                if t.cancelled:  # cancelled while being submitted
                    t.request.cancel()
                self._active.append(t)
            if stop or expired:  # closing, or draining past the grace period: the rest is cut off
                for t in self._active:
                    t.request.cancel()
            if engine.has_work:
                start = time.perf_counter()
                try:
                    stepped = engine.step()
                except Exception as e:
                    self._step_failed(e)
                    continue
                self.steps += 1
                if self.metrics is not None and stepped:
                    self.metrics.observe_step(len(stepped), time.perf_counter() - start)
            self._publish(shutdown=stop or expired)
            if stop and not self._active and not engine.has_work:
                return

    def _step_failed(self, e: Exception) -> None:
        # A failing step (a backend error): fail every request in flight, reap them, keep serving the next ones.
        log.exception("an engine step failed; failing the %d requests in flight", len(self._active))
        for t in self._active:
            t.request.cancel()
        self.engine.step()  # reaps the cancelled requests before any forward call (if this raises, _run fails all)
        for t in self._active:
            self._finish(t, "failed", f"the engine failed: {e!r}")
        self._active = []
        self._flush()

    def _publish(self, shutdown: bool) -> None:
        now = time.perf_counter()
        still = []
        for t in self._active:
            r = t.request
            n = len(r.token_ids)
            if n > t.sent:
                new = r.token_ids[t.sent:n]
                self._queue(t, ("tokens", new))
                if self.metrics is not None:
                    if t.sent == 0:
                        self.metrics.observe_first_token(now - t.created)
                    elif t.last_token_at is not None:
                        for _ in new:
                            self.metrics.observe_inter_token((now - t.last_token_at) / len(new))
                t.sent, t.last_token_at = n, now
            if r.done:
                reason = r.finish_reason
                if reason == "cancelled" and shutdown and not t.cancelled:
                    reason = "shutdown"
                self._finish(t, reason, r.error)
            else:
                still.append(t)
        self._active = still
        running = sum(1 for t in still if t.request.row is not None)
        self.running, self.waiting = running, len(self._live) - running
        self._flush()

    def _queue(self, t: Ticket, item) -> None:
        self._outbox[t.loop].append((t, item))

    def _finish(self, t: Ticket, reason: str, error: str | None) -> None:
        t.finish_reason = reason
        self._queue(t, ("done", (reason, error)))
        with self._cond:
            self._live.discard(t)
        if self.metrics is not None:
            self.metrics.observe_finish(reason, len(t.prompt_ids), t.sent, time.perf_counter() - t.created)

    def _flush(self) -> None:
        if self._outbox:
            out, self._outbox = self._outbox, defaultdict(list)
            self._post(out)

    @staticmethod
    def _post(out: dict) -> None:
        for loop, items in out.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _deliver(items) -> None:
    for t, item in items:
        t.queue.put_nowait(item)
