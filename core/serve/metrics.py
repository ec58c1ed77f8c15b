"""Prometheus metrics in the text exposition format (version 0.0.4), written here: a handful of
counters, gauges and histograms needs no client library.

Updated from the event loop (HTTP requests) and from the engine thread (steps, tokens, latencies),
hence one lock.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

# Latency buckets (seconds), from a fast GPU decode step to a slow CPU prefill.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(x: float) -> str:
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) < 2**53):
        return str(int(x))
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, labels
        self.lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help, labels=()):
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0}

    def inc(self, amount: float = 1, *labels: str) -> None:
        with self.lock:
            self.values[labels] = self.values.get(labels, 0) + amount

    def render(self) -> list[str]:
        with self.lock:
            items = sorted(self.values.items())
        return self.header() + [f"{self.name}{_labels(self.labels, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name, help, read: Callable[[], float]):
        super().__init__(name, help)
        self.read = read

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_number(self.read())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, buckets):
        super().__init__(name, help)
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        with self.lock:
            for i, edge in enumerate(self.buckets):
                if value <= edge:
                    self.counts[i] += 1
            self.sum += value
            self.count += 1

    def render(self) -> list[str]:
        with self.lock:
            counts, total, n = list(self.counts), self.sum, self.count
        lines = self.header()
        lines += [f'{self.name}_bucket{{le="{_number(edge)}"}} {c}' for edge, c in zip(self.buckets, counts)]
        lines += [f'{self.name}_bucket{{le="+Inf"}} {n}', f"{self.name}_sum {_number(total)}",
                  f"{self.name}_count {n}"]
        return lines


class ServerMetrics:
    """What ``/metrics`` shows. ``queue`` and ``running`` read the driver's live counts."""

    def __init__(self, queue: Callable[[], float] = lambda: 0, running: Callable[[], float] = lambda: 0):
        p = "mxmoe_"
        self.http = Counter(p + "http_requests_total", "HTTP requests by endpoint and status code",
                            ("endpoint", "status"))
        self.finished = Counter(p + "requests_finished_total", "Generation requests by how they finished",
                                ("finish_reason",))
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens of finished requests")
        self.generation_tokens = Counter(p + "generation_tokens_total", "Tokens generated")
        self.steps = Counter(p + "engine_steps_total", "Engine steps that produced tokens")
        self.queue = Gauge(p + "queue_length", "Requests waiting for a KV-cache row", lambda: queue())
        self.running = Gauge(p + "requests_running", "Requests holding a KV-cache row", lambda: running())
        self.batch = Histogram(p + "batch_size", "Requests that got a token in one engine step", BATCH_BUCKETS)
        self.step_time = Histogram(p + "step_duration_seconds", "Duration of one engine step", LATENCY_BUCKETS)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "From a request's arrival to its first token",
                              LATENCY_BUCKETS)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Between consecutive tokens of one request",
                             LATENCY_BUCKETS)
        self.e2e = Histogram(p + "request_duration_seconds", "From a request's arrival to its end", LATENCY_BUCKETS)
        self._all = [self.http, self.finished, self.prompt_tokens, self.generation_tokens, self.steps, self.queue,
                     self.running, self.batch, self.step_time, self.ttft, self.itl, self.e2e]

    # -- engine thread --
    def observe_step(self, batch: int, seconds: float) -> None:
        self.steps.inc()
        self.batch.observe(batch)
        self.step_time.observe(seconds)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def observe_finish(self, reason: str, prompt_tokens: int, tokens: int, seconds: float) -> None:
        self.finished.inc(1, reason)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(tokens)
        self.e2e.observe(seconds)

    # -- event loop --
    def observe_http(self, endpoint: str, status: int) -> None:
        self.http.inc(1, endpoint, str(status))

    def render(self) -> str:
        return "\n".join(line for m in self._all for line in m.render()) + "\n"
