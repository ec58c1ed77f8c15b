"""The generation engine: the one step loop behind every client (generate, chat, bench, serve).

    submit(prompt, params) ─▶ FIFO queue ─▶ a free row of the KV-cache pool (num_rows × cache_len)
        each step: ONE varlen Batch = decode tokens of running requests + prefill chunks of new ones,
                   at most ``max_step_tokens`` tokens (chunked prefill: a long prompt never stalls decode)
        ─▶ GptOss.forward ─▶ per-request sampling ─▶ stream the token / finish (stop, length, cancel) ─▶ free the row

Pure-decode steps run through :class:`DecodeStep`: replayed from CUDA graphs captured once per
batch-size bucket when the model is on CUDA and every op's backend claims ``cuda_graphs``, eagerly
otherwise (the reference engine's attention calls ``.tolist()``, a host sync, so it never claims them).
Prefill and mixed steps are always eager. The graphs live here, never in the model (STYLE.md).

Isolation: a request's tokens never depend on its neighbours. Every op treats the batch's sequences
independently, so greedy output equals running alone (up to rounding that changes with the batch's
shape); sampled requests each own a ``torch.Generator`` whose uniforms (one per generated token, drawn
ahead in blocks) are theirs alone, so a seed reproduces the same tokens whatever else runs. A bad request (an id outside the
vocabulary, a prompt longer than a cache row, bad sampling parameters) fails alone, at submission,
with ``finish_reason == "error"`` and a message in ``Request.error``.

Sizing: rows and cache length come from ``max_batch`` / ``max_context`` or, by default, from the
model's context limit (``initial_context_length × rope_scaling_factor``, and any backend's
``max_context``) and the memory left on the device after the weights (:func:`pool_size`).

Sliding-window layers keep ALL their keys, not only the last ``sliding_window``: the Backend's
attention contract (core/backend.py) addresses key j of a sequence at slot ``row * cache_len + j`` in
every layer, and the cache is one tensor for all layers (core/batch.py). A ring buffer for the even
layers would halve gpt-oss's cache, but needs per-layer cache lengths and modulo addressing in every
engine's attention — an interface change (a minor API version and a capability), left for later.

Threads: the engine is single-threaded; ``Request.cancel()`` only sets a flag that the next step
honours, so it may be called from another thread.

Shape legend: B decode sequences (one token each), S sequences, T tokens, R sampled rows, V vocab.
"""

from __future__ import annotations

import heapq
import itertools
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from .batch import Batch, KVCache
from .generate import sample_rows

if TYPE_CHECKING:
    from .model import GptOss

DEFAULT_MAX_BATCH = 64  # rows when memory allows more (as vLLM's scheduler caps its batch)
DEFAULT_MAX_STEP_TOKENS = 2048  # per-step token budget (chunked prefill), vLLM's default too
CACHE_MEMORY_FRACTION = 0.9  # of the memory left after the weights; the rest is headroom for activations
# Coarse activation headroom per token of a step (hidden states, QKV, expert intermediates, in fp32 with
# a few copies alive at once): subtracted from the memory left before sizing the cache.
_ACTIVATION_FLOATS_PER_TOKEN_PER_HIDDEN = 64

FINISH_REASONS = ("stop", "length", "cancelled", "error")
# Sampled requests draw their uniforms from their own generator in blocks of this many, kept per row on the
# device: a step gathers one per row instead of launching one draw per request.
UNIFORM_BLOCK = 128


# ---- requests ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops. temperature 0 is greedy (ties to the lowest id)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed (recorded in Request.seed)
    stop_tokens: tuple[int, ...] = ()  # a stop token is emitted, then the request finishes ("stop")

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))

    def problem(self) -> str | None:
        """Why these parameters are invalid, or None."""
        if self.max_tokens < 0:
            return f"max_tokens must be >= 0, found {self.max_tokens}"
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            return f"expected temperature >= 0 and 0 < top_p <= 1, found {self.temperature}, {self.top_p}"
        return None


class RequestError(ValueError):
    """A request that failed on its own (bad input); the message says why."""


class Request:
    """One prompt being completed: its tokens so far, how it finished, its row while it runs.

    Read ``token_ids`` / ``finish_reason`` / ``error``; ``on_token(request, token)`` (if given) is
    called for each token as it is generated. ``logits_processor(request, logits)`` (if given) gets this
    request's next-token logits (V,) on the device before each sampling and returns the logits to sample
    from (same shape; e.g. -inf outside a grammar's allowed tokens); it may change them in place. Build with
    :meth:`Engine.submit`.
    """

    _ids = itertools.count()

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams,
                 on_token: Callable[["Request", int], None] | None = None,
                 logits_processor: Callable[["Request", torch.Tensor], torch.Tensor] | None = None):
        self.id = next(Request._ids)
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.params = params
        self.on_token = on_token
        self.logits_processor = logits_processor
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None  # one of FINISH_REASONS once done
        self.error: str | None = None
        self.seed: int | None = None
        self.row: int | None = None  # KV-cache row while running
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._cancel = False
        self._past = 0  # tokens of this request whose keys/values are in its cache row
        self._prompt: torch.Tensor | None = None  # (P,) int64 on the model's device
        self._generator: torch.Generator | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefilled(self) -> int:
        """Tokens of the prompt whose keys/values are in the cache so far (a long prompt is prefilled in chunks)."""
        return min(self._past, self.prompt_len)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop this request; the engine frees its row at the start of its next step (thread-safe)."""
        self._cancel = True

    def __repr__(self) -> str:
        state = self.finish_reason or ("running" if self.row is not None else "waiting")
        return f"Request(id={self.id}, prompt_len={self.prompt_len}, tokens={len(self.token_ids)}, {state})"


# ---- sizing --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PoolSize:
    rows: int  # KV-cache rows for requests (at most this many run at once)
    cache_len: int  # tokens per row: prompt + generated tokens of one request
    max_step_tokens: int  # token budget of one step


def context_limit(model: "GptOss") -> int:
    """Most positions the model serves: YaRN's extended context, or less where a backend says so."""
    cfg = model.config
    limit = int(cfg.initial_context_length * cfg.rope_scaling_factor)
    for backend in set(model.ops.values()):
        if backend.capabilities.max_context is not None:
            limit = min(limit, backend.capabilities.max_context)
    return limit


def kv_bytes_per_token(model: "GptOss") -> int:
    """Bytes of keys + values one token takes in the cache, over all layers."""
    cfg = model.config
    elem = torch.empty((), dtype=model.dtype).element_size()
    heads = getattr(model, "num_kv_heads", cfg.num_key_value_heads)  # this rank's, when sharded (rank 0 holds most)
    return 2 * cfg.num_hidden_layers * heads * cfg.head_dim * elem


def memory_left(device: torch.device) -> int:
    """Bytes free on ``device`` now (after the weights were loaded): CUDA's free memory, or the host's
    available memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pool_size(model: "GptOss", max_batch: int | None = None, max_context: int | None = None,
              max_step_tokens: int | None = None, extra_rows: int = 0) -> PoolSize:
    """Rows, cache length and step budget of an engine's pool; ``None`` picks a default:

    * ``max_context``: the model's :func:`context_limit` (shrunk to fit memory when ``max_batch`` is
      given), never more than that limit;
    * ``max_batch``: as many rows as fit in :data:`CACHE_MEMORY_FRACTION` of the memory left, at most
      :data:`DEFAULT_MAX_BATCH`;
    * ``max_step_tokens``: :data:`DEFAULT_MAX_STEP_TOKENS`, at least ``max_batch`` (every running
      request decodes one token a step).

    ``extra_rows`` are allocated besides (the CUDA-graph scratch row). Raises ValueError when the
    arguments are out of range or when not even one row fits.
    """
    limit = context_limit(model)
    for name, value in (("max_batch", max_batch), ("max_context", max_context),
                        ("max_step_tokens", max_step_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value}: expected a positive integer")
    if max_context is not None and max_context > limit:
        raise ValueError(f"max_context={max_context} exceeds the model's context limit of {limit} tokens")
    per_token = kv_bytes_per_token(model)
    step_tokens = max_step_tokens or max(DEFAULT_MAX_STEP_TOKENS, max_batch or 0)
    headroom = step_tokens * _ACTIVATION_FLOATS_PER_TOKEN_PER_HIDDEN * model.config.hidden_size * 4
    free = memory_left(model.device)
    budget = int(free * CACHE_MEMORY_FRACTION) - headroom
    where = f"{model.device.type} memory left after the weights"

    def gib(n: float) -> str:
        return f"{n / 2**30:.2f} GiB"

    if max_context is None and max_batch is not None:
        fit_tokens = budget // (per_token * (max_batch + extra_rows)) if budget > 0 else 0
        max_context = min(limit, fit_tokens)
        if max_context < 1:
            raise ValueError(f"max_batch={max_batch} rows of KV cache do not fit: {gib(max(free, 0))} of {where}, "
                             f"{gib(per_token)} per cached token a row; lower --max-batch")
    cache_len = max_context or limit
    row = per_token * cache_len
    if max_batch is None:
        fit_rows = budget // row - extra_rows if budget > 0 else 0
        if fit_rows < 1:
            raise ValueError(f"one KV-cache row of {cache_len} tokens needs {gib(row)} but only {gib(max(free, 0))} "
                             f"of {where} (less activation headroom) is available; lower --max-context")
        max_batch = min(DEFAULT_MAX_BATCH, fit_rows)
    elif (max_batch + extra_rows) * row > max(budget, 0):
        raise ValueError(f"{max_batch} KV-cache rows of {cache_len} tokens need {gib((max_batch + extra_rows) * row)} "
                         f"but only {gib(max(free, 0))} of {where} (less activation headroom) is available; "
                         f"lower --max-batch or --max-context")
    step_tokens = max_step_tokens or max(DEFAULT_MAX_STEP_TOKENS, max_batch)
    if step_tokens < max_batch:
        raise ValueError(f"max_step_tokens={step_tokens} must be at least max_batch={max_batch}: every running "
                         f"request decodes one token each step")
    return PoolSize(rows=max_batch, cache_len=cache_len, max_step_tokens=step_tokens)


# ---- one decode step, from CUDA graphs where the backends allow -------------------------------------

def cuda_graphs_unsupported(model: "GptOss") -> str | None:
    """Why decode steps of ``model`` cannot be captured in CUDA graphs, or None when they can."""
    if model.device.type != "cuda":
        return f"the model is on {model.device.type}, not CUDA"
    if getattr(getattr(model, "comm", None), "world_size", 1) > 1:
        return "the model is sharded across ranks (each step is broadcast to them first; core/launch.py)"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    bad = sorted({f"{op} ({b.name})" for op, b in model.ops.items() if not b.capabilities.cuda_graphs})
    if bad:
        return f"these ops' backends do not claim cuda_graphs: {', '.join(bad)}"
    return None


def decode_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes a graph is captured for: 1, 2, 4, ... below ``max_batch``, then ``max_batch``."""
    out = []
    b = 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return tuple(out)


class DecodeStep:
    """One decode step for B <= cache.num_rows sequences (one new token each) over `cache`, replayed from CUDA
    graphs captured once per batch-size bucket (1, 2, 4, ..., num_rows) when on CUDA and every op's backend claims
    Capabilities.cuda_graphs (use_graphs None = that rule; False = eager; True = graphs or a clear error).

    The step's ids, positions, cache rows, slot mapping and context lengths live in static device buffers
    updated in place by device ops (no host sync, in or around the captured graph). A bucket's padding
    rows (B < bucket) go to ``scratch_row`` (token 0 at position 0: written, then read, by padding only)
    when one is given; otherwise they repeat sequence 0 exactly (same token, position and row), so they
    write the very values sequence 0 writes. Graphs are captured with ``max_context_len = cache_len``
    (kernels are correct when the Batch's host maxima are upper bounds). The logits returned by a graph
    replay are a static buffer: use them before the next call.
    """

    def __init__(self, model: "GptOss", cache: KVCache, use_graphs: bool | None = None, *,
                 scratch_row: int | None = None):
        why_not = cuda_graphs_unsupported(model)
        if use_graphs and why_not:
            raise ValueError(f"CUDA graphs were asked for, but {why_not}")
        self.model, self.cache = model, cache
        self.uses_graphs: bool = why_not is None if use_graphs is None else bool(use_graphs)
        if scratch_row is not None and not 0 <= scratch_row < cache.num_rows:
            raise ValueError(f"scratch_row={scratch_row} is not a row of the cache ({cache.num_rows} rows)")
        self.scratch_row = scratch_row
        self.max_batch = cache.num_rows - (scratch_row is not None)
        if self.max_batch < 1:
            raise ValueError("the cache has no row for a sequence besides the scratch row")
        self.buckets = decode_buckets(self.max_batch)
        n, dev = self.buckets[-1], model.device
        with torch.inference_mode():
            zeros = lambda: torch.zeros(n, dtype=torch.int64, device=dev)  # noqa: E731
            self._tokens, self._positions, self._rows, self._slots, self._context = (zeros() for _ in range(5))
            self._cu = torch.arange(n + 1, dtype=torch.int64, device=dev)  # one new token per sequence
        self._batches = {b: self._batch(b) for b in self.buckets}
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pad_eagerly = False  # tests: run the padded buckets eagerly, as the graphs would
        if self.uses_graphs:
            self._capture()

    def _batch(self, b: int) -> Batch:
        return Batch(positions=self._positions[:b], cu_seqlens=self._cu[:b + 1], context_lens=self._context[:b],
                     cache_rows=self._rows[:b], slot_mapping=self._slots[:b], max_seqlen=1,
                     max_context_len=self.cache.cache_len)

    def bucket(self, B: int) -> int:
        """Smallest captured batch size holding B sequences."""
        if not 1 <= B <= self.max_batch:
            raise ValueError(f"a decode step takes 1..{self.max_batch} sequences, got {B}")
        return next(b for b in self.buckets if b >= B)

    def __call__(self, token_ids: torch.Tensor, positions: torch.Tensor, cache_rows: torch.Tensor) -> torch.Tensor:
        """(B,) int64 device tensors: each sequence's new token, its position, its cache row → logits (B, V)."""
        B = token_ids.shape[0]
        b = self.bucket(B)
        with torch.inference_mode():
            if not (self.uses_graphs or self._pad_eagerly):  # eager: exactly B rows, no padding
                positions = positions.to(torch.int64)
                batch = Batch(positions=positions, cu_seqlens=self._cu[:B + 1], context_lens=positions + 1,
                              cache_rows=cache_rows, slot_mapping=cache_rows * self.cache.cache_len + positions,
                              max_seqlen=1, max_context_len=self.cache.cache_len)
                return self.model.forward(token_ids, batch, self.cache)
            self._stage(token_ids, positions, cache_rows, b)
            if not self.uses_graphs:
                return self._forward(b)[:B]
            graph, logits = self._graphs[b]
            graph.replay()
            return logits[:B]

    def _stage(self, token_ids: torch.Tensor, positions: torch.Tensor, cache_rows: torch.Tensor, b: int) -> None:
        """Write the step's inputs and their padding up to bucket ``b`` into the static buffers (device ops)."""
        B = token_ids.shape[0]
        self._tokens[:B].copy_(token_ids)
        self._positions[:B].copy_(positions)
        self._rows[:B].copy_(cache_rows)
        if b > B:
            if self.scratch_row is not None:
                self._tokens[B:b].zero_()
                self._positions[B:b].zero_()
                self._rows[B:b].fill_(self.scratch_row)
            else:  # repeat sequence 0: the same slot receives the same keys/values
                self._tokens[B:b].copy_(self._tokens[:1].expand(b - B))
                self._positions[B:b].copy_(self._positions[:1].expand(b - B))
                self._rows[B:b].copy_(self._rows[:1].expand(b - B))
        torch.add(self._positions[:b], 1, out=self._context[:b])
        torch.mul(self._rows[:b], self.cache.cache_len, out=self._slots[:b])
        self._slots[:b].add_(self._positions[:b])

    def _forward(self, b: int) -> torch.Tensor:
        return self.model.forward(self._tokens[:b], self._batches[b], self.cache)

    def _capture(self) -> None:
        """Warm up, then capture one graph per bucket, largest first, sharing one memory pool (graphs run
        one at a time; each keeps its logits buffer alive, so no capture reuses another's output)."""
        cache = self.cache
        with torch.inference_mode():
            # Warm-up runs execute: they write position 0 of rows 0..b-1 (or of the scratch row). Save and
            # restore those slots so that capturing never disturbs a cache already in use.
            saved = cache.k[:, :, 0].clone(), cache.v[:, :, 0].clone()
            n = self.buckets[-1]
            self._tokens.zero_()
            self._positions.zero_()
            if self.scratch_row is not None:
                self._rows.fill_(self.scratch_row)
            else:
                torch.arange(n, out=self._rows)
            self._context.fill_(1)
            torch.mul(self._rows, cache.cache_len, out=self._slots)
            stream = torch.cuda.Stream(self.model.device)
            stream.wait_stream(torch.cuda.current_stream(self.model.device))
            with torch.cuda.stream(stream):  # lazy initialisation (cuBLAS handles, Triton compiles) off-graph
                for b in self.buckets:
                    for _ in range(2):
                        self._forward(b)
            torch.cuda.current_stream(self.model.device).wait_stream(stream)
            pool = None
            try:
                for b in reversed(self.buckets):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        logits = self._forward(b)
                    pool = graph.pool()
                    self._graphs[b] = (graph, logits)
            except RuntimeError as e:
                raise RuntimeError(f"capturing a decode step of {b} sequences in a CUDA graph failed (an op that "
                                   f"claims cuda_graphs synchronised with the host or allocated dynamically?): "
                                   f"{e}") from e
            finally:
                cache.k[:, :, 0] = saved[0]
                cache.v[:, :, 0] = saved[1]
            torch.cuda.synchronize(self.model.device)


# ---- the engine ------------------------------------------------------------------------------------

class Engine:
    """Continuous batching over a pool of KV-cache rows (see the module docstring).

    ``submit`` queues a request; ``step`` runs one forward call for everything that can run; ``stream``
    yields one request's tokens while driving the steps; ``generate`` runs a batch to completion.
    """

    def __init__(self, model: "GptOss", *, max_batch: int | None = None, max_context: int | None = None,
                 max_step_tokens: int | None = None, use_graphs: bool | None = None):
        self.model = model
        why_not = cuda_graphs_unsupported(model)
        if use_graphs and why_not:
            raise ValueError(f"CUDA graphs were asked for, but {why_not}")
        want_graphs = why_not is None if use_graphs is None else use_graphs
        # A scratch row takes the padding of partly filled graph buckets (not needed when every bucket is full).
        scratch = 1 if want_graphs and (max_batch is None or max_batch > 1) else 0
        size = pool_size(model, max_batch, max_context, max_step_tokens, extra_rows=scratch)
        self.num_rows, self.cache_len, self.max_step_tokens = size.rows, size.cache_len, size.max_step_tokens
        dev = model.device
        with torch.inference_mode():
            self.cache = model.new_cache(self.num_rows + scratch, self.cache_len)
            # Per-row state on the device, so that decode steps gather their inputs instead of building lists.
            self._next_token = torch.zeros(self.num_rows, dtype=torch.int64, device=dev)  # last sampled token
            self._row_len = torch.zeros(self.num_rows, dtype=torch.int64, device=dev)  # tokens cached in the row
            self._temperature = torch.zeros(self.num_rows, dtype=torch.float32, device=dev)
            self._top_p = torch.ones(self.num_rows, dtype=torch.float32, device=dev)
            self._uniform = torch.zeros(self.num_rows, UNIFORM_BLOCK, dtype=torch.float32, device=dev)
            self._draw = torch.zeros(self.num_rows, dtype=torch.int64, device=dev)  # next uniform of the row's block
        self.decode = DecodeStep(model, self.cache, use_graphs, scratch_row=self.num_rows if scratch else None)
        self._free = list(range(self.num_rows))  # a heap: the lowest free row first
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # in admission order (FIFO for prefill chunks)
        self._decode_key: tuple[int, ...] | None = None
        self._decode_rows: torch.Tensor | None = None
        self.steps = 0

    # ---- requests ----------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int] | torch.Tensor, params: SamplingParams | None = None,
               on_token: Callable[[Request, int], None] | None = None,
               logits_processor: Callable[[Request, torch.Tensor], torch.Tensor] | None = None) -> Request:
        """Queue a request (FIFO). A bad one comes back already finished with ``finish_reason == "error"``.
        ``on_token`` and ``logits_processor``: see :class:`Request`."""
        params = params or SamplingParams()
        ids = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
        req = Request(ids, params, on_token, logits_processor)
        problem = params.problem()
        if problem is None:
            try:
                req._prompt = self.model.check_tokens(ids)
            except (ValueError, TypeError, RuntimeError) as e:
                problem = str(e)
        if problem is None and req.prompt_len > self.cache_len:
            problem = (f"prompt of {req.prompt_len} tokens does not fit the KV cache: a row holds {self.cache_len} "
                       f"tokens (--max-context)")
        if problem is not None:
            req.error = problem
            self._finish(req, "error")
            return req
        if params.temperature > 0:
            req.seed = params.seed if params.seed is not None else torch.Generator().seed()
            req._generator = torch.Generator(device=self.model.device)
            req._generator.manual_seed(req.seed)
        if params.max_tokens == 0:
            self._finish(req, "length")
            return req
        self._waiting.append(req)
        return req

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def stream(self, request: Request) -> Iterator[int]:
        """Yield ``request``'s tokens as they come, running steps (for every request) as needed. Raises
        :class:`RequestError` if the request failed; closing the iterator early cancels the request."""
        sent = 0
        try:
            while True:
                while sent < len(request.token_ids):
                    sent += 1
                    yield request.token_ids[sent - 1]
                if request.done:
                    break
                steps = self.steps
                self.step()  # may sample nothing: a prefill chunk of a prompt longer than the step budget
                if self.steps == steps and not request.done:
                    raise RuntimeError(f"{request} made no progress")  # a scheduler bug, never a hang
            if request.error is not None:
                raise RequestError(request.error)
        finally:
            if not request.done:
                request.cancel()
                self._reap_cancelled()

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while self.has_work:
            self.step()

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Request]:
        """Submit every prompt (one SamplingParams for all, or one each), run them to the end, return them."""
        each = _params_per_prompt(params, len(prompts))
        reqs = [self.submit(p, sp) for p, sp in zip(prompts, each)]
        while not all(r.done for r in reqs):
            self.step()
        return reqs

    # ---- the step ----------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """One forward call over every request that can run now. Returns the requests that got a token."""
        self._reap_cancelled()
        with torch.inference_mode():  # per step, never across a yield: callers' code is not in it
            self._admit()
        if not self._running:
            return []
        budget = self.max_step_tokens
        decode = [r for r in self._running if r._past >= r.prompt_len]  # one token each: the last sampled
        budget -= len(decode)
        prefill: list[tuple[Request, int]] = []
        for r in self._running:  # prefill chunks in arrival order, while the budget lasts
            if budget == 0:
                break
            if r._past < r.prompt_len:
                n = min(r.prompt_len - r._past, budget)
                prefill.append((r, n))
                budget -= n
        with torch.inference_mode():
            if prefill:
                logits, sampled, rows = self._mixed_forward(decode, prefill)
            else:
                logits, sampled, rows = self._decode_forward(decode), decode, self._decode_rows
            tokens = self._sample(logits, sampled, rows)  # (R,) on the device
            self._next_token[rows] = tokens
            host = tokens.tolist()  # the one host sync of a step: tokens stream out and stop the requests
        self.steps += 1
        for r in decode:
            r._past += 1
        for r, n in prefill:
            r._past += n
        for r, t in zip(sampled, host):
            self._emit(r, t)
        return sampled

    def _decode_forward(self, decode: list[Request]) -> torch.Tensor:
        key = tuple(r.row for r in decode)
        if key != self._decode_key:  # the decode set changed: one small host→device copy
            self._decode_key = key
            self._decode_rows = torch.tensor(key, dtype=torch.int64, device=self.model.device)
        rows = self._decode_rows
        positions = self._row_len[rows]
        logits = self.decode(self._next_token[rows], positions, rows)  # (B, V)
        self._row_len[rows] = positions + 1
        return logits

    def _mixed_forward(self, decode: list[Request], prefill: list[tuple[Request, int]]):
        seqs = decode + [r for r, _ in prefill]
        S, D = len(seqs), len(decode)
        new = [1] * D + [n for _, n in prefill]
        past = [r._past for r in seqs]
        ends = list(itertools.accumulate(new))
        # Logits only where a token is sampled: every decode, and prefills whose last chunk this is.
        pick = [i for i, (r, p, n) in enumerate(zip(seqs, past, new)) if p + n >= r.prompt_len]
        sampled = [seqs[i] for i in pick]
        # With nothing to sample, still ask for one row (discarded): some engines dislike empty launches.
        logits_rows = [ends[i] - 1 for i in pick] or [ends[-1] - 1]
        # The step's metadata in one host→device copy: new lens, past lens, rows (S each), logits rows,
        # rows of the sampled sequences.
        meta = torch.tensor(new + past + [r.row for r in seqs] + logits_rows + [r.row for r in sampled],
                            dtype=torch.int64).to(self.model.device)
        new_t, past_t, rows_t = meta[:S], meta[S:2 * S], meta[2 * S:3 * S]
        parts = [r._prompt[r._past:r._past + n] for r, n in prefill]
        if decode:
            parts.insert(0, self._next_token[rows_t[:D]])
        token_ids = torch.cat(parts)  # (T,)
        batch = Batch.from_lens(new_t, past_t, rows_t, self.cache_len, num_tokens=ends[-1], max_seqlen=max(new),
                                max_context_len=max(p + n for p, n in zip(past, new)))
        logits = self.model.forward(token_ids, batch, self.cache,
                                    logits_rows=meta[3 * S:3 * S + len(logits_rows)])
        self._row_len[rows_t] = past_t + new_t
        return logits[:len(pick)], sampled, meta[3 * S + len(logits_rows):]

    def _sample(self, logits: torch.Tensor, sampled: list[Request], rows: torch.Tensor) -> torch.Tensor:
        for i, r in enumerate(sampled):  # per-request hooks first (a host call each; none in the common case)
            if r.logits_processor is not None:
                logits[i] = r.logits_processor(r, logits[i])
        draws = [r for r in sampled if r._generator is not None]
        if not draws:
            return logits.argmax(dim=-1)
        # The next uniform of each row's block, drawn ahead from the request's own generator: the same seed
        # gives the same draws whatever else is in the batch. Greedy rows take one too (unused, harmless).
        draw = self._draw[rows]
        uniform = self._uniform[rows, draw]
        self._draw[rows] = (draw + 1) % UNIFORM_BLOCK  # wraps exactly when _emit refills the block
        top_p = self._top_p[rows] if any(r.params.top_p < 1 for r in draws) else None
        return sample_rows(logits, self._temperature[rows], top_p, uniform)

    def _refill_uniforms(self, r: Request) -> None:
        with torch.inference_mode():
            self._uniform[r.row] = torch.rand(UNIFORM_BLOCK, generator=r._generator, device=self.model.device)
            self._draw[r.row] = 0

    def _emit(self, r: Request, token: int) -> None:
        r.token_ids.append(token)
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        if r.on_token is not None:
            r.on_token(r, token)
        if token in r.params.stop_tokens:
            self._finish(r, "stop")
        elif len(r.token_ids) >= r.params.max_tokens or r._past >= self.cache_len:
            # The next decode would write position r._past: past the row's end, the request is out of room.
            self._finish(r, "length")
        elif r._generator is not None and len(r.token_ids) % UNIFORM_BLOCK == 0:
            self._refill_uniforms(r)

    # ---- rows --------------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self._waiting and self._free:
            r = self._waiting.popleft()
            r.row = heapq.heappop(self._free)
            self._temperature[r.row] = r.params.temperature
            self._top_p[r.row] = r.params.top_p
            if r._generator is not None:
                self._refill_uniforms(r)
            self._running.append(r)

    def _reap_cancelled(self) -> None:
        for r in [r for r in self._waiting if r._cancel]:
            self._waiting.remove(r)
            self._finish(r, "cancelled")
        for r in [r for r in self._running if r._cancel]:
            self._finish(r, "cancelled")

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        r.finished_at = time.perf_counter()
        if r.row is not None:
            self._running.remove(r)
            heapq.heappush(self._free, r.row)
            r.row = None


def _params_per_prompt(params, n: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{len(params)} SamplingParams for {n} prompts: give one for all or one each")
    return params


# ---- clients ---------------------------------------------------------------------------------------

def engine_for(model: "GptOss", prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], *,
               max_batch: int | None = None, max_context: int | None = None, max_step_tokens: int | None = None,
               use_graphs: bool | None = None) -> Engine:
    """An engine sized to a job (unless told otherwise): a row per prompt (as memory allows) and rows just
    long enough for the longest prompt plus its tokens, within the model's context limit."""
    if max_context is None:
        need = max((len(p) + max(sp.max_tokens - 1, 0) for p, sp in zip(prompts, params)), default=1)
        max_context = max(1, min(need, context_limit(model)))
    if max_batch is None:
        fit = pool_size(model, None, max_context, max_step_tokens).rows
        max_batch = max(1, min(len(prompts), fit))
    return Engine(model, max_batch=max_batch, max_context=max_context, max_step_tokens=max_step_tokens,
                  use_graphs=use_graphs)


def generate(model: "GptOss", prompt_ids: Sequence[int], params: SamplingParams | None = None,
             **engine_kwargs) -> Iterator[int]:
    """Stream one request's tokens through an engine sized for it (a generator: errors surface on iteration)."""
    params = params or SamplingParams()
    ids = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
    engine = engine_for(model, [ids], [params], **engine_kwargs)
    yield from engine.stream(engine.submit(ids, params))


def generate_batch(model: "GptOss", prompts: Sequence[Sequence[int]],
                   params: SamplingParams | Sequence[SamplingParams] | None = None, **engine_kwargs) -> list[Request]:
    """Complete every prompt in one engine; returns the finished requests in prompt order."""
    prompts = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]
    each = _params_per_prompt(params, len(prompts))
    return engine_for(model, prompts, each, **engine_kwargs).generate(prompts, each)
