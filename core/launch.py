"""Running under torchrun: one process per rank; rank 0 runs the command, the other ranks follow it.

    torchrun --nproc-per-node N -m mxmoe.core.cli generate|chat|serve|bench ...

    rank 0    runs the command as in one process (parses, prints, serves, samples). Its model is a
              :class:`ShardedGptOss`: every new KV cache and every forward step is first broadcast to the others.
    rank r>0  runs :meth:`Launch.follow`: loads its shard when told, allocates the caches it is told to, runs the
              same forward steps (its collectives meet rank 0's inside the graph), and exits when rank 0 does.

Only rank 0 prints or listens: the others never see the command line. Messages from rank 0 are a small
pickled header on a gloo group, plus, for a step, one int64 tensor (token ids and the Batch's tensors) on
the model's device (NCCL on GPUs); each header also names the models and caches rank 0 has dropped since,
which the followers drop too:

    load     every rank loads its shard (core/parallel.py) from the checkpoint (or random weights, for
             `mxmoe bench --shape`); then all say whether it worked, and rank 0 raises the first failure
    cache    a KV cache of the rank's own KV heads
    forward  one step (the packed tensor follows)
    noop     rank 0 has been idle for a quarter of the timeout (a server waiting for requests): followers
             waiting longer than the timeout would give up
    exit     the command ended; followers exit with status 0

Failures never hang: a rank whose code raises prints ``mxmoe: rank R of W failed: ...`` and exits at once
(status 1). The others see their next collective fail — at once when the connection closes (gloo), else
after ``MXMOE_DIST_TIMEOUT`` seconds (default 600) — and exit with a message saying that another rank
failed; torchrun then stops every rank and reports the first failure. A failure inside a step on rank 0
cannot be told to the followers (they are inside the step's collectives): rank 0 exits at once instead.

Device: a CUDA model of rank r runs on ``cuda:LOCAL_RANK``. Expert sharding: ``--shard-experts`` (or
``$MXMOE_SHARD_EXPERTS``): "intermediate" (default) or "expert" (core/parallel.py says when each is better).
CUDA graphs are not used while sharded (each step's broadcast and collectives are not captured).
"""

from __future__ import annotations

import datetime
import itertools
import os
import sys
import threading
import time
import traceback
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .backend import OPS, dtype_name, parse_dtype
from .batch import Batch, KVCache
from .model import GptOss
from .parallel import EXPERT_SHARDINGS, Communicator, ParallelError, ShardPlan, ShardingError, TorchDistributed

ENV_TIMEOUT = "MXMOE_DIST_TIMEOUT"
ENV_SHARD_EXPERTS = "MXMOE_SHARD_EXPERTS"
DEFAULT_TIMEOUT_S = 600.0

_current: "Launch | None" = None


class ShardLoadError(ParallelError):
    """A rank other than 0 could not load its shard (the message has its error)."""


def current() -> "Launch | None":
    """This process's launch, when it is one rank of several (None in a single process)."""
    return _current


def init_from_env(environ: Any = None) -> "Launch | None":
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``); None when this is the only process. Idempotent."""
    global _current
    environ = os.environ if environ is None else environ
    if _current is not None:
        return _current
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    rank = int(environ["RANK"])
    local_rank = int(environ.get("LOCAL_RANK", rank))
    _current = Launch(rank, world, local_rank, timeout_s=timeout_from_env(environ))
    return _current


def timeout_from_env(environ: Any = None) -> float:
    environ = os.environ if environ is None else environ
    text = environ.get(ENV_TIMEOUT, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ShardingError(f"${ENV_TIMEOUT}={text!r}: expected a positive number of seconds")
    return value


def _sharding_from_env() -> str:
    value = os.environ.get(ENV_SHARD_EXPERTS, "").strip() or "intermediate"
    if value not in EXPERT_SHARDINGS:
        raise ShardingError(f"${ENV_SHARD_EXPERTS}={value!r}: expected one of {', '.join(EXPERT_SHARDINGS)}")
    return value


@dataclass
class _KeyedCache(KVCache):
    """A KV cache of a sharded model on rank 0: its key names the followers' caches of the same rows."""

    key: int = -1


class Launch:
    """One rank of a torchrun launch (module docstring). Rank 0 drives (``drives``); the others :meth:`follow`.

    Builds the process group itself unless one exists (tests make their own): gloo on CPUs, NCCL for CUDA
    tensors (``cpu:gloo,cuda:nccl``), and a gloo group for rank 0's messages."""

    def __init__(self, rank: int, world_size: int, local_rank: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S,
                 shard_experts: str | None = None):
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.world_size, self.local_rank, self.timeout_s = rank, world_size, local_rank, timeout_s
        self.shard_experts = shard_experts
        timeout = datetime.timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(local_rank % torch.cuda.device_count())
                backend = "cpu:gloo,cuda:nccl"
            else:
                backend = "gloo"
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        self.control = dist.new_group(backend="gloo", timeout=timeout)
        self._lock = threading.RLock()  # one message (and its step) at a time: the heartbeat thread takes it too
        self._keys = itertools.count()
        self._freed_models: list[int] = []  # appended by finalizers, sent with the next message
        self._freed_caches: list[int] = []
        self._last_sent = time.monotonic()
        self.broken = False  # a collective failed, or a step failed midway: the followers cannot be told
        self._why_broken = ""
        self.closed = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        if self.drives:
            self._heartbeat = threading.Thread(target=self._beat, name="mxmoe-heartbeat", daemon=True)
            self._heartbeat.start()

    @property
    def drives(self) -> bool:
        return self.rank == 0

    def device_for(self, device: torch.device | str) -> torch.device:
        """The device of this rank for a model asked to run on ``device``: CUDA models on cuda:LOCAL_RANK."""
        device = torch.device(device)
        if device.type == "cuda":
            return torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))
        return device

    # ---- loading (every rank) -----------------------------------------------------------------------
    def load_model(self, path: str | Path | None = None, *, random: tuple[dict, int] | None = None,
                   backend: Any = None, device: torch.device | str = "cpu", dtype: Any = None, strict: bool = False,
                   progress: bool | None = None, shard_experts: str | None = None) -> "ShardedGptOss":
        """Rank 0: every rank loads its shard of the checkpoint at ``path`` (or of random weights
        ``random = (config dict, seed)``, made on each device as `mxmoe bench --shape` does); returns rank 0's.
        Raises rank 0's own error if its load failed, else :class:`ShardLoadError` with the first other rank's."""
        if not self.drives:
            raise RuntimeError("only rank 0 loads models; the other ranks follow it (Launch.follow)")
        sharding = shard_experts or self.shard_experts or _sharding_from_env()
        if sharding not in EXPERT_SHARDINGS:
            raise ShardingError(f"expert sharding {sharding!r}: expected one of {', '.join(EXPERT_SHARDINGS)}")
        spec = dict(path=None if path is None else str(path), random=random, backend=backend,
                    device=torch.device(device).type, dtype=None if dtype is None else dtype_name(parse_dtype(dtype)),
                    strict=strict, sharding=sharding)
        with self.step():
            key = next(self._keys)
            self._send({"op": "load", "key": key, "spec": spec})
            model, error = self._load_local(key, spec, progress)
            failures = self._gather_status(error)
        if error is not None:
            raise error
        if failures:
            del model
            raise ShardLoadError(f"rank {failures[0][0]} of {self.world_size} could not load its shard: "
                                 f"{failures[0][1]}")
        weakref.finalize(model, self._freed_models.append, key)
        return model

    def _load_local(self, key: int, spec: dict, progress: bool | None) -> tuple["ShardedGptOss | None",
                                                                               BaseException | None]:
        from mxmoe.plugins import resolve_backends

        from .checkpoint import load_checkpoint
        from .config import ModelConfig

        try:
            device = self.device_for(spec["device"])
            dtype = parse_dtype(spec["dtype"] or "bfloat16")
            plans: list[ShardPlan] = []

            def plan_for(config) -> ShardPlan:
                if not plans:
                    plans.append(ShardPlan.make(config, self.rank, self.world_size, spec["sharding"]))
                return plans[0]

            if spec["path"] is not None:
                config, weights, _ = load_checkpoint(spec["path"], qkv_rows=lambda c: plan_for(c).qkv_rows(c))
                shard = plan_for(config).shard(config, weights, qkv_selected=True)
            else:
                from .bench import random_weights_on_device

                config_dict, seed = spec["random"]
                config = ModelConfig.from_dict(config_dict, "random weights")
                weights = random_weights_on_device(config, device, seed)
                # Each layer is made whole on the device and cut: copies, so the whole layer does not stay alive.
                shard = plan_for(config).shard(config, weights, copy=True)
            plan = plans[0]
            with warnings.catch_warnings():
                if not self.drives:  # fallback warnings are rank 0's to print
                    warnings.simplefilter("ignore")
                resolution = resolve_backends(spec["backend"], device=device, dtype=dtype, strict=spec["strict"],
                                              model_config=config, sharded=True)
            comm = self._communicator(resolution.ops, device)
            model = ShardedGptOss(self, key, config, shard, resolution.ops, dtype=dtype, device=device,
                                  model_dir=spec["path"], resolution=resolution,
                                  progress=progress if self.drives else False, plan=plan, comm=comm)
            return model, None
        except Exception as e:  # reported to every rank (rank 0 raises it); a follower goes on following
            return None, e

    def _communicator(self, ops: dict[str, Any], device: torch.device) -> Communicator:
        """The first engine (in op order) that brings its own collectives, else torch.distributed's."""
        for backend in dict.fromkeys(ops[op] for op in OPS if op in ops):
            comm = backend.communicator(self.rank, self.world_size, device)
            if comm is None:
                continue
            if not isinstance(comm, Communicator) or (comm.rank, comm.world_size) != (self.rank, self.world_size):
                raise ShardingError(f"backend {backend.name!r}: communicator() returned {comm!r}, expected a "
                                    f"Communicator of rank {self.rank} of {self.world_size}")
            return comm
        return TorchDistributed(timeout_s=self.timeout_s)

    def _gather_status(self, error: BaseException | None) -> list[tuple[int, str]]:
        """Every rank's load result; the failures of the other ranks, as (rank, message)."""
        mine = None if error is None else f"{type(error).__name__}: {error}"
        statuses: list[Any] = [None] * self.world_size
        try:
            self._dist.all_gather_object(statuses, mine, group=self.control)
        except RuntimeError as e:
            raise self._failed("gathering the ranks' load results", e) from None
        return [(r, s) for r, s in enumerate(statuses) if s is not None and r != self.rank]

    # ---- rank 0: messages ---------------------------------------------------------------------------
    @contextmanager
    def step(self) -> Iterator[None]:
        """Hold the group for one message and the collectives that follow it (a step, a load)."""
        with self._lock:
            if self.broken:
                raise ParallelError(f"rank {self.rank} of {self.world_size}: the group is down after an earlier "
                                    f"failure ({self._why_broken})")
            try:
                yield
            except BaseException as e:
                self._break(e)  # the followers may be inside this step's collectives: no message reaches them
                raise
            finally:
                self._last_sent = time.monotonic()

    def new_key(self) -> int:
        return next(self._keys)

    def send(self, header: dict, tensor: torch.Tensor | None = None) -> None:
        """Rank 0: a message to every follower (inside :meth:`step`), with the keys dropped since the last one."""
        self._send(header, tensor)

    def _send(self, header: dict, tensor: torch.Tensor | None = None) -> None:
        freed_models, self._freed_models = self._freed_models, []
        freed_caches, self._freed_caches = self._freed_caches, []
        header = {**header, "freed": (freed_models, freed_caches)}
        try:
            self._dist.broadcast_object_list([header], src=0, group=self.control)
            if tensor is not None:
                self._dist.broadcast(tensor, src=0)
        except RuntimeError as e:
            failure = self._failed(f"sending {header['op']!r} to the other ranks", e)
            self._break(failure)
            raise failure from None
        self._last_sent = time.monotonic()

    def _break(self, e: BaseException) -> None:
        if not self.broken:
            self.broken, self._why_broken = True, f"{type(e).__name__}: {e}"

    def _failed(self, what: str, e: Exception) -> ParallelError:
        return ParallelError(f"rank {self.rank} of {self.world_size}: {what} failed: another rank failed, was "
                             f"stopped or stopped answering for {self.timeout_s:g} s (its own message says why): {e}")

    def _beat(self) -> None:
        interval = self.timeout_s / 4
        while not self._stop.wait(min(interval, 5.0)):
            if time.monotonic() - self._last_sent < interval or not self._lock.acquire(blocking=False):
                continue
            try:
                if not (self.broken or self.closed):
                    self._send({"op": "noop"})
            except ParallelError:
                pass  # the main thread meets the same failure at its next collective, and reports it
            finally:
                self._lock.release()

    def finish(self, code: int) -> None:
        """Rank 0, at the end of the command: tell the followers to exit and leave the group. After a failure
        they cannot be told, so the process ends at once (their collectives fail when it is gone)."""
        self._stop.set()
        if self.broken or not self._lock.acquire(timeout=self.timeout_s):
            _hard_exit(code or 1)
        try:
            if not self.closed:
                self._send({"op": "exit", "code": int(code)})
        except ParallelError as e:
            print(f"mxmoe: {e}", file=sys.stderr)
            _hard_exit(code or 1)
        finally:
            self._lock.release()
        self.close()

    def close(self) -> None:
        global _current
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        try:
            self._dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving a group that is already gone
            pass
        if _current is self:
            _current = None

    # ---- ranks > 0 ----------------------------------------------------------------------------------
    def follow(self) -> int:
        """Ranks > 0: do what rank 0 says until it says exit (returns 0). Any failure prints one message
        and ends the process at once (status 1)."""
        models: dict[int, ShardedGptOss] = {}
        caches: dict[int, KVCache] = {}
        warnings.simplefilter("ignore")  # rank 0 prints what there is to say
        try:
            while True:
                box: list[Any] = [None]
                try:
                    self._dist.broadcast_object_list(box, src=0, group=self.control)
                except RuntimeError as e:
                    raise self._failed("waiting for rank 0", e) from None
                msg = box[0]
                dropped_models, dropped_caches = msg["freed"]
                for k in dropped_models:
                    models.pop(k, None)
                for k in dropped_caches:
                    caches.pop(k, None)
                op = msg["op"]
                if op == "exit":
                    break
                if op == "load":
                    model, error = self._load_local(msg["key"], msg["spec"], progress=False)
                    self._gather_status(error)
                    if model is not None:
                        models[msg["key"]] = model
                elif op == "cache":
                    with torch.inference_mode():
                        caches[msg["key"]] = models[msg["model"]].new_cache(msg["rows"], msg["cache_len"])
                elif op == "forward":
                    model = models[msg["model"]]
                    with torch.inference_mode():
                        packed = torch.empty(msg["numel"], dtype=torch.int64, device=model.device)
                        try:
                            self._dist.broadcast(packed, src=0)
                        except RuntimeError as e:
                            raise self._failed("receiving a step from rank 0", e) from None
                        token_ids, batch, logits_rows = _unpack(packed, msg["sizes"])
                        model.forward(token_ids, batch, caches[msg["cache"]], logits_rows)
                elif op != "noop":
                    raise RuntimeError(f"unknown message {op!r} from rank 0")
        except BaseException as e:  # noqa: BLE001 - one clear message, then the group comes down
            self.fail(e)
        self.close()
        return 0

    def fail(self, e: BaseException) -> None:
        """Print why this rank fails, then end the process at once (status 1): the others' collectives fail."""
        if isinstance(e, ParallelError):
            print(f"mxmoe: {e}", file=sys.stderr)
        else:
            print(f"mxmoe: rank {self.rank} of {self.world_size} failed: {type(e).__name__}: {e}", file=sys.stderr)
            if os.environ.get("MXMOE_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
                traceback.print_exception(e)
        _hard_exit(1)


def _hard_exit(code: int) -> None:
    """End the process now: after a failure, leaving the group politely could wait on ranks that are gone."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


# ---- the model on rank 0 ---------------------------------------------------------------------------

def _pack(token_ids: torch.Tensor, batch: Batch, logits_rows: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    parts = [token_ids, batch.positions, batch.cu_seqlens, batch.context_lens, batch.cache_rows, batch.slot_mapping,
             logits_rows]
    sizes = (token_ids.shape[0], batch.num_seqs, logits_rows.shape[0], batch.max_seqlen, batch.max_context_len)
    return torch.cat([p.reshape(-1).to(torch.int64) for p in parts]), sizes


def _unpack(packed: torch.Tensor, sizes: tuple) -> tuple[torch.Tensor, Batch, torch.Tensor]:
    T, S, R, max_seqlen, max_context_len = sizes
    ids, positions, cu, context, rows, slots, logits_rows = torch.split(packed, [T, T, S + 1, S, S, T, R])
    batch = Batch(positions=positions, cu_seqlens=cu, context_lens=context, cache_rows=rows, slot_mapping=slots,
                  max_seqlen=max_seqlen, max_context_len=max_context_len)
    return ids, batch, logits_rows


class ShardedGptOss(GptOss):
    """One rank's :class:`GptOss`. On rank 0, ``new_cache`` and ``forward`` first tell the followers to do the
    same (the graph itself is GptOss's: the collectives inside it meet the followers')."""

    def __init__(self, launch: Launch, key: int, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.launch, self.key = launch, key

    def new_cache(self, num_rows: int, cache_len: int) -> KVCache:
        if not self.launch.drives:
            return super().new_cache(num_rows, cache_len)
        with self.launch.step():
            key = self.launch.new_key()
            self.launch.send({"op": "cache", "model": self.key, "key": key, "rows": num_rows, "cache_len": cache_len})
            c = super().new_cache(num_rows, cache_len)
        cache = _KeyedCache(c.k, c.v, key)
        weakref.finalize(cache, self.launch._freed_caches.append, key)
        return cache

    def forward(self, token_ids: torch.Tensor, batch: Batch, cache: KVCache,
                logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        if not self.launch.drives:
            return super().forward(token_ids, batch, cache, logits_rows)
        if not isinstance(cache, _KeyedCache):
            raise ValueError("a sharded model runs on KV caches from its own new_cache() (each rank holds its heads' "
                             "part of them)")
        if logits_rows is None:
            logits_rows = batch.cu_seqlens[1:] - 1
        packed, sizes = _pack(token_ids, batch, logits_rows)
        with self.launch.step():
            self.launch.send({"op": "forward", "model": self.key, "cache": cache.key, "sizes": sizes,
                              "numel": packed.numel()}, packed)
            return super().forward(token_ids, batch, cache, logits_rows)


__all__ = ["DEFAULT_TIMEOUT_S", "ENV_SHARD_EXPERTS", "ENV_TIMEOUT", "Launch", "ShardLoadError", "ShardedGptOss",
           "current", "init_from_env", "timeout_from_env"]
