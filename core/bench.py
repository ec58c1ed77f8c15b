"""``mxmoe bench``: engines side by side on gpt-oss shapes, every figure beside the device's own limits.

One reproducible command measures, in the same run:

* the device's limits: copy bandwidth (a large device-to-device copy, read + write bytes) and matmul
  throughput in the benchmark's dtype (8192³ on a GPU);
* scenarios on each engine given with ``--backend`` (and Hugging Face transformers as a peer):
  batch-1 decode at each ``--context``, batched decode at each ``--batch``, prefill of one prompt and of
  a batch of prompts, time to first token, model load/build time, peak device memory and peak RSS;
* for every figure its fraction of the limit that bounds it: a decode step against the bytes it must
  read (attention weights, the routed experts at the routing observed during the step, unembedding,
  KV cache at the context, router, norms), a prefill against the FLOPs it must do.

Models need no files: ``--shape`` builds random canonical weights with the real shapes directly on the
device (MXFP4 experts as random bytes with E8M0 scales in a narrow band, so activations stay O(1)),
one layer at a time, each prepared by the engine before the next is made. Results go to the console
and, as JSON lines with date, device, versions and git commit, to a results file.

Shape legend: B sequences in a decode step, C context (cached keys), T tokens, S sequences of a
prefill, D hidden, I intermediate, E experts, k experts per token, V vocab, Hq/Hkv heads, d head_dim.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import mxfp4
from .backend import dtype_name, parse_dtype
from .batch import Batch, KVCache
# Private helpers of checkpoint.py, so the band of random scales and the hf-bf16 name map exist once.
from .checkpoint import _flat_group, _fp4_scale_exponent, _groups, _to_layout, load_checkpoint
from .config import ModelConfig, preset
from .weights import AttentionWeights, BlockWeights, ExpertLinear, MLPWeights, ModelWeights

SHAPES = ("gpt-oss-20b", "gpt-oss-120b", "tiny")
SCENARIOS = ("decode-b1", "decode-batch", "prefill", "prefill-batch", "ttft", "load", "memory")
PEERS = ("auto", "transformers", "none")
RESULTS_DIR = Path("tests/benchmarks/results")
RESULTS_NAME = "bench.jsonl"
FALLBACK_RESULTS = Path("mxmoe-bench.jsonl")
GIB = 2**30


# ---- random weights with the real shapes, made on the device ----------------------------------------
# The same recipe as core/checkpoint.py's random writer (linear ~ N(0, 1/fan_in), embedding N(0, 1),
# biases N(0, 0.02²), sinks N(0, 1), norm scales U(0.8, 1.2), experts random E2M1 bytes with E8M0
# scales 2^(e0 + {-1, 0, 1})), but drawn by a generator on the device, so a 120b-shaped model takes
# seconds and never exists on the host.

def _generator(device: torch.device, seed: int, part: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + part) % 2**63)
    return g


class _RandomBlocks(Sequence[BlockWeights]):
    """``ModelWeights.blocks`` made on demand: block i is drawn (on the device, seeded by (seed, i)) when it
    is asked for and held by no one here, so preparing layer by layer never holds the canonical weights
    of the whole model next to the engine's prepared copy."""

    def __init__(self, config: ModelConfig, device: torch.device, seed: int):
        self.config, self.device, self.seed = config, device, seed

    def __len__(self) -> int:
        return self.config.num_hidden_layers

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"layer {i} of {len(self)}")
        return _random_block(self.config, self.device, _generator(self.device, self.seed, 3 + i % len(self)))


def _random_block(cfg: ModelConfig, device: torch.device, g: torch.Generator) -> BlockWeights:
    D, I, E, Hq = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_attention_heads
    QKV = cfg.q_dim + 2 * cfg.kv_dim

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16).mul_(std)

    def norm() -> torch.Tensor:
        return (torch.rand((D,), generator=g, device=device) * 0.4 + 0.8).to(torch.bfloat16)

    def experts(n: int, k: int) -> ExpertLinear:  # (E, N, K) in MXFP4
        blocks = torch.randint(0, 256, (E, n, k // mxfp4.VALUES_PER_BLOCK, mxfp4.BYTES_PER_BLOCK),
                               dtype=torch.uint8, generator=g, device=device)
        e0 = _fp4_scale_exponent(k) + mxfp4.SCALE_BIAS
        scales = torch.randint(e0 - 1, e0 + 2, (E, n, k // mxfp4.VALUES_PER_BLOCK), dtype=torch.uint8,
                               generator=g, device=device)
        return ExpertLinear(bias=normal((E, n), 0.02), blocks=blocks, scales=scales)

    attn = AttentionWeights(norm_scale=norm(), qkv_weight=normal((QKV, D), D**-0.5), qkv_bias=normal((QKV,), 0.02),
                            sinks=normal((Hq,), 1.0), out_weight=normal((D, cfg.q_dim), cfg.q_dim**-0.5),
                            out_bias=normal((D,), 0.02))
    mlp = MLPWeights(norm_scale=norm(), gate_weight=normal((E, D), D**-0.5), gate_bias=normal((E,), 0.02),
                     mlp1=experts(2 * I, D), mlp2=experts(D, I))
    return BlockWeights(attn=attn, mlp=mlp)


def random_weights_on_device(config: ModelConfig, device: torch.device | str, seed: int = 0) -> ModelWeights:
    """Random canonical weights (bf16 dense, MXFP4 experts) with ``config``'s shapes, drawn on ``device``;
    the blocks are made when read (see :class:`_RandomBlocks`), the same for the same seed."""
    device = torch.device(device)
    V, D = config.vocab_size, config.hidden_size
    g = _generator(device, seed, 0)
    embedding = torch.randn((V, D), generator=g, device=device, dtype=torch.bfloat16)
    g = _generator(device, seed, 1)
    norm = (torch.rand((D,), generator=g, device=device) * 0.4 + 0.8).to(torch.bfloat16)
    g = _generator(device, seed, 2)
    unembedding = torch.randn((V, D), generator=g, device=device, dtype=torch.bfloat16).mul_(D**-0.5)
    return ModelWeights(embedding=embedding, blocks=_RandomBlocks(config, device, seed),  # type: ignore[arg-type]
                        norm_scale=norm, unembedding=unembedding)


# ---- what a step must read and compute --------------------------------------------------------------

def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def expert_bytes(config: ModelConfig, dtype: torch.dtype, dense_dtype: torch.dtype | None = None) -> int:
    """Bytes of one expert's weights (mlp1 + mlp2) and biases: MXFP4 packed values + E8M0 scales, or, with
    ``dense_dtype``, dense values as stored; biases at the activation ``dtype``."""
    D, I = config.hidden_size, config.intermediate_size
    values = 2 * I * D + D * I
    if dense_dtype is None:
        weight = values // mxfp4.VALUES_PER_BLOCK * (mxfp4.BYTES_PER_BLOCK + 1)  # 16 value bytes + 1 scale byte
    else:
        weight = values * _elem(dense_dtype)
    return weight + (2 * I + D) * _elem(dtype)


def keys_read(config: ModelConfig, layer: int, context: int) -> int:
    """Keys a query at position ``context`` (the ``context + 1``-th token) attends to in ``layer``."""
    w = config.layer_sliding_window(layer)
    return min(context + 1, w) if w else context + 1


def decode_bytes(config: ModelConfig, dtype: torch.dtype, batch: int, context: int,
                 experts_per_layer: Sequence[int], dense_experts: torch.dtype | None = None) -> dict[str, int]:
    """The bytes one decode step of ``batch`` sequences at position ``context`` must read at least: every
    weight it touches once (the experts actually routed to: ``experts_per_layer[l]`` distinct ones in
    layer l; MXFP4, or dense as stored in ``dense_experts``), each sequence's visible keys and values, the
    embedding rows; dense weights at the activation ``dtype``. Activations are not counted."""
    cfg, es = config, _elem(dtype)
    small = _elem(torch.promote_types(dtype, torch.float32))  # norm scales and sinks (core/model.py)
    D, E, V, L = cfg.hidden_size, cfg.num_experts, cfg.vocab_size, cfg.num_hidden_layers
    QKV = cfg.q_dim + 2 * cfg.kv_dim
    if len(experts_per_layer) != L:
        raise ValueError(f"experts_per_layer has {len(experts_per_layer)} entries for {L} layers")
    out = {
        "attention": L * (QKV * D + QKV + D * cfg.q_dim + D) * es,
        "experts": sum(experts_per_layer) * expert_bytes(cfg, dtype, dense_experts),
        "router": L * (E * D + E) * es,
        "kv_cache": sum(batch * keys_read(cfg, layer, context) * 2 * cfg.kv_dim * es for layer in range(L)),
        "unembedding": V * D * es,
        "embedding": batch * D * es,
        "norms_sinks": ((2 * L + 1) * D + L * cfg.num_attention_heads) * small,
    }
    out["total"] = sum(out.values())
    return out


def attention_pairs(config: ModelConfig, layer: int, new: int, past: int = 0) -> int:
    """(query, key) pairs a sequence of ``new`` tokens after ``past`` cached ones computes in ``layer``."""
    w = config.layer_sliding_window(layer)
    return sum(min(p + 1, w) if w else p + 1 for p in range(past, past + new))


def prefill_flops(config: ModelConfig, seq_lens: Sequence[int]) -> dict[str, int]:
    """FLOPs a prefill of sequences of ``seq_lens`` tokens must do: 2 × active weights × tokens for the
    linear layers (k experts a token), 4·Hq·d per visible (query, key) pair for attention (QKᵀ and PV,
    causal, banded on windowed layers), and the unembedding for each sequence's last token only (the
    logits a prefill returns). Biases, norms, RoPE and softmax are not counted."""
    cfg = config
    D, I, E, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.experts_per_token
    L = cfg.num_hidden_layers
    per_token = (cfg.q_dim + 2 * cfg.kv_dim) * D + D * cfg.q_dim + E * D + k * (2 * I * D + D * I)
    T = sum(seq_lens)
    pairs = sum(attention_pairs(cfg, layer, n) for layer in range(L) for n in seq_lens)
    out = {"linear": 2 * L * per_token * T,
           "attention": 4 * cfg.num_attention_heads * cfg.head_dim * pairs,
           "unembedding": 2 * len(seq_lens) * cfg.vocab_size * D}
    out["total"] = sum(out.values())
    return out


def model_bytes(config: ModelConfig, dtype: torch.dtype, dense_experts: torch.dtype | None = None) -> int:
    """Bytes of all weights (experts MXFP4 or dense at ``dtype``)."""
    full = decode_bytes(config, dtype, 1, 0, [config.num_experts] * config.num_hidden_layers, dense_experts)
    return full["total"] - full["kv_cache"] - full["embedding"] + config.vocab_size * config.hidden_size * _elem(dtype)


# ---- the device -------------------------------------------------------------------------------------

class _Device:
    """Everything device-specific the harness does, in one place (CUDA branches kept here)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peaks(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        with contextlib.suppress(OSError):  # Linux: "5" resets the peak RSS (VmHWM) of this process
            Path("/proc/self/clear_refs").write_text("5")

    def peak_bytes(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def allocated_bytes(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def total_bytes(self) -> int | None:
        return torch.cuda.get_device_properties(self.device).total_memory if self.cuda else None

    def free_bytes(self) -> int:
        if self.cuda:
            return torch.cuda.mem_get_info(self.device)[0]
        return _meminfo("MemAvailable") or 0

    def release(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    @functools.cached_property
    def info(self) -> dict[str, Any]:
        """Name, driver, memory, ... of the device (asked once: the driver query runs nvidia-smi)."""
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                    "memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count,
                    "driver": _nvidia_driver(), "cuda": torch.version.cuda, "hip": torch.version.hip}
        return {"type": self.device.type, "name": _cpu_name(), "cores": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "memory_bytes": (_meminfo("MemTotal") or None),
                "driver": None}


def _meminfo(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (since the last reset where Linux allows one)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    with contextlib.suppress(OSError):
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    return None


# ---- the limits, measured at the start of the run --------------------------------------------------

@dataclass
class Limits:
    copy_bytes_per_s: float  # read + write bytes of a large device-to-device copy, best of the repeats
    matmul_flops_per_s: float  # n³ matmul in ``matmul_dtype``, best of the repeats
    copy_bytes: int
    matmul_n: int
    matmul_dtype: str
    copy_median_bytes_per_s: float = 0.0
    matmul_median_flops_per_s: float = 0.0


def measure_limits(dev: _Device, dtype: torch.dtype, quick: bool = False) -> Limits:
    if dev.cuda:
        nbytes, n, repeats = GIB, 8192, 10
    else:
        nbytes, n, repeats = (16 * 2**20, 512, 5) if quick else (256 * 2**20, 1024, 5)
    src = torch.ones(nbytes, dtype=torch.uint8, device=dev.device)
    dst = torch.empty_like(src)
    copy_s = _timed(lambda: dst.copy_(src), dev, warmup=2, repeats=repeats)
    del src, dst
    mm_dtype = dtype if dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64) else torch.bfloat16
    a = torch.randn((n, n), device=dev.device, dtype=mm_dtype)
    b = torch.randn((n, n), device=dev.device, dtype=mm_dtype)
    mm_s = _timed(lambda: a @ b, dev, warmup=2, repeats=repeats)
    del a, b
    dev.release()
    flops = 2 * n**3
    return Limits(copy_bytes_per_s=2 * nbytes / min(copy_s), matmul_flops_per_s=flops / min(mm_s),
                  copy_bytes=nbytes, matmul_n=n, matmul_dtype=dtype_name(mm_dtype),
                  copy_median_bytes_per_s=2 * nbytes / statistics.median(copy_s),
                  matmul_median_flops_per_s=flops / statistics.median(mm_s))


def _timed(fn: Callable[[], Any], dev: _Device, warmup: int, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls, each ended by a device sync."""
    for _ in range(warmup):
        fn()
    dev.sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        dev.sync()
        times.append(time.perf_counter() - t0)
    return times


# ---- observing the routing of a step ---------------------------------------------------------------

class _RoutingRecorder:
    """Stands in for the backend serving ``experts`` during one step and records, per layer, the distinct
    experts the router sent that step's tokens to; delegates everything to the real backend."""

    def __init__(self, backend: Any):
        self._backend = backend
        self.layers: list[list[int]] = []

    def experts(self, x, expert_weights, expert_indices, experts, swiglu_alpha, swiglu_limit):
        self.layers.append(sorted(set(expert_indices.flatten().tolist())))
        return self._backend.experts(x, expert_weights, expert_indices, experts, swiglu_alpha, swiglu_limit)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


@contextlib.contextmanager
def record_routing(model: Any) -> Iterator[_RoutingRecorder]:
    """While open, ``model.forward`` records the experts each layer routes to (``recorder.layers``)."""
    real = model.ops["experts"]
    recorder = _RoutingRecorder(real)
    model.ops["experts"] = recorder
    try:
        yield recorder
    finally:
        model.ops["experts"] = real


# ---- the engines under test ------------------------------------------------------------------------

def _decode_inputs(config: ModelConfig, batch: int, context: int, dtype: torch.dtype, device: torch.device,
                   seed: int) -> tuple[torch.Tensor, Iterator[tuple[int, torch.Tensor, torch.Tensor]]]:
    """Token ids (B,) and, per layer, random keys and values (B, C, Hkv, d) of the C cached positions:
    the same for every engine given the same seed."""
    g = _generator(device, seed, 10_000 + batch * 100_003 + context)
    ids = torch.randint(0, config.vocab_size, (batch,), generator=g, device=device)

    def kv() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        shape = (batch, context, config.num_key_value_heads, config.head_dim)
        for layer in range(config.num_hidden_layers):
            k = torch.randn(shape, generator=g, device=device, dtype=dtype)
            v = torch.randn(shape, generator=g, device=device, dtype=dtype)
            yield layer, k, v

    return ids, kv()


def _prompt_ids(config: ModelConfig, seq_lens: Sequence[int], device: torch.device, seed: int) -> torch.Tensor:
    g = _generator(device, seed, 20_000 + len(seq_lens) * 100_003 + sum(seq_lens))
    return torch.randint(0, config.vocab_size, (sum(seq_lens),), generator=g, device=device)


def decode_step_class() -> tuple[Any, str]:
    """core/engine.py's ``DecodeStep`` and a note, or (None, why not): then GptOss.forward is timed."""
    try:
        from . import engine
    except ModuleNotFoundError as e:
        if e.name == f"{__package__}.engine":
            return None, "GptOss.forward (no core/engine.py)"
        return None, f"GptOss.forward (core/engine.py failed to import: {e})"
    except Exception as e:  # a broken engine module is reported in every record, not hidden
        return None, f"GptOss.forward (core/engine.py failed to import: {type(e).__name__}: {e})"
    cls = getattr(engine, "DecodeStep", None)
    return (cls, "DecodeStep") if cls is not None else (None, "GptOss.forward (no engine.DecodeStep)")


@dataclass
class _DecodeSetup:
    step: Callable[[], torch.Tensor]  # one decode step → logits (B, V)
    routing: list[list[int]] | None  # distinct experts per layer, observed on this engine
    path: str  # what is timed
    first_logits: torch.Tensor | None = None  # (B, V) of the step at position C that showed the routing


class MxmoeSubject:
    """An mxmoe model (GptOss) on the engines of one ``--backend`` spec."""

    kind = "mxmoe"

    def __init__(self, label: str, model: Any, spec: str | None, build_s: float):
        self.label, self.model, self.spec, self.build_s = label, model, spec, build_s
        self.config, self.device, self.dtype = model.config, model.device, model.dtype
        self.ops = {op: b.name for op, b in model.ops.items()}
        self._ttft_cache: KVCache | None = None

    def decode(self, batch: int, context: int, seed: int) -> _DecodeSetup:
        model, cfg = self.model, self.config
        cache = model.new_cache(batch, context + 1)  # NaN-filled: position C stays NaN unless the step writes it
        ids, kv = _decode_inputs(cfg, batch, context, self.dtype, self.device, seed)
        if _sharded(model):  # each rank's cache holds its own heads: fill the context by a prefill on every rank
            n = batch * context
            model.forward(_prompt_ids(cfg, [context] * batch, self.device, seed),
                          Batch.build([context] * batch, [0] * batch, list(range(batch)), cache.cache_len, self.device),
                          cache, logits_rows=torch.tensor([n - 1], device=self.device))
        else:
            for layer, k, v in kv:
                cache.k[layer, :, :context] = k
                cache.v[layer, :, :context] = v
        positions = torch.full((batch,), context, dtype=torch.int64, device=self.device)
        rows = torch.arange(batch, dtype=torch.int64, device=self.device)
        meta = Batch.build([1] * batch, [context] * batch, list(range(batch)), cache.cache_len, self.device)
        # Routing of this step, seen eagerly (a graph-captured step takes the same inputs to the same experts).
        with record_routing(model) as rec:
            first = model.forward(ids, meta, cache)
        decode_step, path = decode_step_class()
        if decode_step is not None:
            stepper = decode_step(model, cache)
            path += " (CUDA graphs)" if stepper.uses_graphs else " (no graphs)"
            return _DecodeSetup(lambda: stepper(ids, positions, rows), rec.layers, path, first)
        return _DecodeSetup(lambda: model.forward(ids, meta, cache), rec.layers, path, first)

    def prefill(self, seq_lens: Sequence[int], seed: int) -> Callable[[], torch.Tensor]:
        n, S = max(seq_lens), len(seq_lens)
        cache = self.model.new_cache(S, n)
        meta = Batch.build(list(seq_lens), [0] * S, list(range(S)), n, self.device)
        ids = _prompt_ids(self.config, seq_lens, self.device, seed)
        return lambda: self.model.forward(ids, meta, cache)

    def first_token(self, prompt: list[int]) -> int:
        """A warm engine's time to first token: host ids → device, prefill into a cache row held from the
        previous request, greedy sample, the token id back on the host."""
        n = len(prompt)
        if self._ttft_cache is None or self._ttft_cache.cache_len < n:
            self._ttft_cache = self.model.new_cache(1, n)
        ids = torch.tensor(prompt, dtype=torch.int64).to(self.device)
        meta = Batch.build([n], [0], [0], self._ttft_cache.cache_len, self.device)
        return int(self.model.forward(ids, meta, self._ttft_cache).argmax(-1)[0])

    def close(self) -> None:
        self.model = self._ttft_cache = None


class TransformersSubject:
    """Hugging Face ``GptOssForCausalLM`` (eager, experts dequantized to bf16) on the same weights, decoding
    with its own KV cache (``DynamicCache``)."""

    kind = "peer"

    def __init__(self, model: Any, config: ModelConfig, dtype: torch.dtype, device: torch.device, build_s: float):
        import transformers

        self.label = f"transformers {transformers.__version__}"
        self.hf, self.config, self.dtype, self.device, self.build_s = model, config, dtype, device, build_s
        self.ops = {"all": "transformers GptOssForCausalLM (eager)"}
        self.spec = None

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.hf.config)  # sliding-window layers keep only their window
        except TypeError:  # older releases: one kind of layer
            return DynamicCache()

    def decode(self, batch: int, context: int, seed: int) -> _DecodeSetup:
        cache = self._new_cache()
        ids, kv = _decode_inputs(self.config, batch, context, self.dtype, self.device, seed)
        for layer, k, v in kv:  # the same values as the mxmoe engines' caches, in HF's (B, Hkv, C, d)
            cache.update(k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), layer)
        ids = ids[:, None]
        state = {"pos": context}

        def step() -> torch.Tensor:
            # The cache grows by one token a step (HF has no overwrite-in-place decode); steps run at
            # positions C, C+1, ...: a few tokens more context than the mxmoe engines see.
            pos = torch.tensor([state["pos"]], device=self.device)
            state["pos"] += 1
            out = self.hf(input_ids=ids, position_ids=pos.expand(batch, 1), use_cache=True, logits_to_keep=1,
                          **self._cache_kwargs(cache, pos))
            return out.logits[:, -1]

        routing, first = self._routing(step)
        return _DecodeSetup(step, routing, "GptOssForCausalLM.forward + DynamicCache (grows a token a step)", first)

    def _cache_kwargs(self, cache: Any, pos: torch.Tensor) -> dict[str, Any]:
        # transformers renamed past_key_values to cache (5.2x) and dropped cache_position; say what this one takes.
        names = inspect.signature(self.hf.model.forward).parameters
        kwargs = {"cache" if "cache" in names else "past_key_values": cache}
        if "cache_position" in names:
            kwargs["cache_position"] = pos
        return kwargs

    def _routing(self, step: Callable[[], torch.Tensor]) -> tuple[list[list[int]] | None, torch.Tensor]:
        """Run ``step`` once with hooks on the routers: (distinct experts per layer or None, its logits)."""
        layers: list[list[int]] = []

        def hook(_module, _inputs, output):
            found = [t for t in (output if isinstance(output, tuple) else (output,))
                     if isinstance(t, torch.Tensor) and not t.is_floating_point()]
            if found:
                layers.append(sorted(set(found[-1].flatten().tolist())))

        handles = [layer.mlp.router.register_forward_hook(hook) for layer in self.hf.model.layers]
        try:
            logits = step()
        finally:
            for h in handles:
                h.remove()
        return (layers if len(layers) == self.config.num_hidden_layers else None), logits

    def prefill(self, seq_lens: Sequence[int], seed: int) -> Callable[[], torch.Tensor]:
        if len(set(seq_lens)) != 1:
            raise ValueError("the transformers peer prefills batches of equal-length prompts only")
        ids = _prompt_ids(self.config, seq_lens, self.device, seed).view(len(seq_lens), seq_lens[0])
        return lambda: self.hf(input_ids=ids, use_cache=True, logits_to_keep=1).logits[:, -1]

    def first_token(self, prompt: list[int]) -> int:
        """The same for the peer (its own fresh DynamicCache, as each request gets one)."""
        ids = torch.tensor([prompt], dtype=torch.int64).to(self.device)
        return int(self.hf(input_ids=ids, use_cache=True, logits_to_keep=1).logits[0, -1].argmax())

    def close(self) -> None:
        self.hf = None


def hf_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the transformers peer's weights (experts dequantized, everything at ``dtype``)."""
    return model_bytes(config, dtype, dense_experts=dtype)


def build_transformers(config: ModelConfig, weights: ModelWeights, dtype: torch.dtype,
                       device: torch.device) -> Any:
    """``GptOssForCausalLM`` in memory from canonical weights, through core/config.py's HF config mapping
    and the hf-bf16 name map of core/checkpoint.py: built on the meta device, then each group of tensors
    (moved to ``device``, experts dequantized there) assigned in place, so the peer exists once."""
    from transformers import GptOssConfig, GptOssForCausalLM

    hf_config = GptOssConfig.from_dict(config.to_hf_dict(quantized=False))
    hf_config._attn_implementation = "eager"  # sinks need the eager path (no sdpa for gpt-oss)
    with torch.device("meta"):
        hf = GptOssForCausalLM(hf_config)
    hf.requires_grad_(False).eval()
    expected, assigned = set(hf.state_dict()), set()
    for group in _groups(config):
        flat = {name: t.to(device) for name, t in _flat_group(weights, group).items()}
        tensors = {name: t.to(device=device, dtype=dtype).contiguous()
                   for name, t in _to_layout(config, "hf-bf16", group, flat).items()}
        del flat
        hf.load_state_dict(tensors, strict=False, assign=True)
        assigned |= set(tensors)
        del tensors
    if expected - assigned:
        raise RuntimeError(f"transformers peer: no weights for {sorted(expected - assigned)[:5]}")
    # Non-persistent buffers (RoPE frequencies) were made on the meta device: make them again.
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config).to(device)
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"transformers peer: tensors left on the meta device: {left[:5]}")
    return hf


# ---- the plan of a run -----------------------------------------------------------------------------

@dataclass
class Plan:
    shape: str | None
    model_dir: str | None
    device: torch.device
    dtype: torch.dtype
    backends: list[str | None]
    scenarios: list[str]
    contexts: list[int]
    batches: list[int]
    batch_context: int
    prefill_len: int
    prefill_batch: tuple[int, int]
    repeats: int
    warmup: int
    peer: str
    profile: bool
    seed: int
    strict: bool
    quick: bool
    results: Path | None
    plot: Path | None

    def command(self) -> str:
        """The command that repeats this run's measurements (with every default spelled out)."""
        words = ["mxmoe", "bench"]
        words += ["--model", self.model_dir] if self.model_dir else ["--shape", str(self.shape)]
        words += ["--device", str(self.device), "--dtype", dtype_name(self.dtype)]
        for spec in self.backends:
            words += ["--backend", spec] if spec is not None else []
        words += ["--scenario", ",".join(self.scenarios), "--context", ",".join(map(str, self.contexts)),
                  "--batch", ",".join(map(str, self.batches)), "--batch-context", str(self.batch_context),
                  "--prefill-len", str(self.prefill_len), "--prefill-batch", "x".join(map(str, self.prefill_batch)),
                  "--repeats", str(self.repeats), "--warmup", str(self.warmup), "--peer", self.peer,
                  "--seed", str(self.seed)]
        words += ["--profile"] * self.profile + ["--strict"] * self.strict
        return " ".join(words)


class BenchError(Exception):
    """Bad input to ``mxmoe bench`` (message for the user, exit status 2)."""


def make_plan(args: argparse.Namespace) -> Plan:
    quick = args.quick

    def pick(value, quick_value, default):
        return value if value is not None else (quick_value if quick else default)

    device_name = pick(args.device, "cpu", "cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device_name)
    except RuntimeError as e:
        raise BenchError(f"--device {device_name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {device_name}: no CUDA device here (torch.cuda.is_available() is False; "
                         f"torch {torch.__version__} built for CUDA {torch.version.cuda})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BenchError(f"--device {device_name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {device_name}: the harness times cpu and cuda devices")
    try:
        dtype = parse_dtype(args.dtype or "bfloat16")
    except ValueError as e:
        raise BenchError(f"--dtype: {e}") from None
    shape = None if args.model else pick(args.shape, "tiny", "gpt-oss-20b")
    if args.model and not Path(args.model).exists():
        raise BenchError(f"--model {args.model}: no such folder")
    scenarios = [s for s in SCENARIOS if s in (args.scenario or SCENARIOS)]
    plot = Path(args.plot) if args.plot else None
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib, which is not installed: pip install 'mxmoe[plot]' "
                         "(or pip install matplotlib)")
    return Plan(
        shape=shape, model_dir=args.model, device=device, dtype=dtype,
        backends=list(args.backend) if args.backend else (["torch"] if quick else [None]),
        scenarios=scenarios,
        contexts=pick(args.context, [32, 128], [1024, 8192]),
        batches=pick(args.batch, [2, 4], [8, 64]),
        batch_context=pick(args.batch_context, 32, 1024),
        prefill_len=pick(args.prefill_len, 64, 2048),
        prefill_batch=pick(args.prefill_batch, (2, 32), (8, 512)),
        repeats=pick(args.repeats, 3, 10), warmup=pick(args.warmup, 1, 3),
        peer=args.peer, profile=args.profile, seed=args.seed, strict=args.strict, quick=quick,
        results=None if args.no_results else _results_path(args.results), plot=plot)


def _results_path(given: str | None) -> Path:
    if given:
        return Path(given)
    return RESULTS_DIR / RESULTS_NAME if RESULTS_DIR.is_dir() else FALLBACK_RESULTS


# ---- running the scenarios on one subject ---------------------------------------------------------

def _summary(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": len(times)}


class Runner:
    """Runs the plan's scenarios on subjects and collects one record per (subject, scenario, parameters)."""

    def __init__(self, plan: Plan, dev: _Device, limits: Limits, config: ModelConfig,
                 dense_experts: torch.dtype | None,
                 log: Callable[[str], None]):
        self.plan, self.dev, self.limits, self.config = plan, dev, limits, config
        # Experts as the checkpoint stores them (None: MXFP4), the same floor for every engine and the peer
        # (which dequantizes them: its own choice, not the job's).
        self.dense_experts, self.log = dense_experts, log
        self.records: list[dict[str, Any]] = []
        self.first_routing: dict[tuple[int, int], list[list[int]]] = {}

    def _record(self, subject: Any, scenario: str, params: dict[str, Any], run: Callable[[], dict[str, Any]]) -> None:
        rec: dict[str, Any] = {"engine": subject.label, "engine_kind": subject.kind, "backend_spec": subject.spec,
                               "ops": subject.ops, "scenario": scenario, "params": params}
        try:
            with torch.inference_mode():
                rec["figures"] = run()
            rec["status"] = "ok"
        except Exception as e:  # one failing scenario must not hide the others' figures
            rec["status"] = f"error: {type(e).__name__}: {e}"
            rec["figures"] = {}
            self.log(f"  {scenario} {_params_text(params)}: {rec['status']}")
            traceback.print_exc(file=sys.stderr)
        finally:
            self.dev.release()
        if rec["status"] == "ok":
            self.log(f"  {_line(rec)}")
        self.records.append(rec)

    def run(self, subject: Any, allocated_after_build: int | None) -> None:
        p = self.plan
        if "load" in p.scenarios:
            self._record(subject, "load", {"source": p.model_dir or f"random {p.shape} on {p.device}"},
                         lambda: {"median_s": subject.build_s, "min_s": subject.build_s,
                                  "max_s": subject.build_s, "repeats": 1,
                                  "model_bytes": self.dev.allocated_bytes()})
        if "decode-b1" in p.scenarios:
            for c in p.contexts:
                self._record(subject, "decode-b1", {"batch": 1, "context": c}, lambda c=c: self._decode(subject, 1, c))
        if "decode-batch" in p.scenarios:
            for b in p.batches:
                self._record(subject, "decode-batch", {"batch": b, "context": p.batch_context},
                             lambda b=b: self._decode(subject, b, p.batch_context))
        if "prefill" in p.scenarios:
            self._record(subject, "prefill", {"batch": 1, "prompt_len": p.prefill_len},
                         lambda: self._prefill(subject, [p.prefill_len]))
        if "prefill-batch" in p.scenarios:
            s, n = p.prefill_batch
            self._record(subject, "prefill-batch", {"batch": s, "prompt_len": n},
                         lambda: self._prefill(subject, [n] * s))
        if "ttft" in p.scenarios:
            self._record(subject, "ttft", {"prompt_len": p.prefill_len}, lambda: self._ttft(subject, p.prefill_len))
        if p.profile:
            c = p.contexts[0]
            self._record(subject, "profile", {"of": "decode-b1", "batch": 1, "context": c},
                         lambda: self._profile(subject.decode(1, c, p.seed).step))
            self._record(subject, "profile", {"of": "prefill", "batch": 1, "prompt_len": p.prefill_len},
                         lambda: self._profile(subject.prefill([p.prefill_len], p.seed)))
        if "memory" in p.scenarios:
            total = self.dev.total_bytes()
            self._record(subject, "memory", {}, lambda: {
                "peak_device_bytes": self.dev.peak_bytes(), "device_bytes_after_build": allocated_after_build,
                "peak_rss_bytes": peak_rss_bytes(), "device_memory_bytes": total,
                "fraction_of_device_memory": (None if total is None else self.dev.peak_bytes() / total),
                "fraction_of_host_memory": _fraction(peak_rss_bytes(), _meminfo("MemTotal"))})

    def _decode(self, subject: Any, batch: int, context: int) -> dict[str, Any]:
        p, cfg, lim = self.plan, self.config, self.limits
        setup = subject.decode(batch, context, p.seed)
        routing, source = setup.routing, subject.label
        if routing is None:  # a peer whose router could not be observed: the first engine's routing
            routing, source = self.first_routing.get((batch, context)), "first engine"
        else:
            self.first_routing.setdefault((batch, context), routing)
        times = _timed(setup.step, self.dev, p.warmup, p.repeats)
        logits = setup.step()
        self.dev.sync()
        out = _summary(times)
        median = out["median_s"]
        out.update({"tokens_per_s": batch / median, "decode_path": setup.path,
                    "finite": bool(torch.isfinite(logits).all())})
        if routing is not None:
            nbytes = decode_bytes(cfg, subject.dtype, batch, context, [len(r) for r in routing],
                                  self.dense_experts)
            floor = nbytes["total"] / lim.copy_bytes_per_s
            out.update({"bytes": nbytes["total"], "bytes_breakdown": nbytes,
                        "experts_per_layer": [len(r) for r in routing], "experts_routed": routing,
                        "routing_from": source,
                        "achieved_bytes_per_s": nbytes["total"] / median,
                        "fraction_of_bandwidth": floor / median, "floor_s": floor,
                        "roofline_tokens_per_s": batch / floor})
        if not out["finite"]:
            raise FloatingPointError("non-finite logits after the timed steps")
        return out

    def _prefill(self, subject: Any, seq_lens: list[int]) -> dict[str, Any]:
        p, lim = self.plan, self.limits
        step = subject.prefill(seq_lens, p.seed)
        times = _timed(step, self.dev, p.warmup, p.repeats)
        finite = bool(torch.isfinite(step()).all())
        self.dev.sync()
        if not finite:
            raise FloatingPointError("non-finite logits")
        flops = prefill_flops(self.config, seq_lens)
        out = _summary(times)
        floor = flops["total"] / lim.matmul_flops_per_s
        out.update({"tokens": sum(seq_lens), "tokens_per_s": sum(seq_lens) / out["median_s"],
                    "flops": flops["total"], "flops_breakdown": flops,
                    "achieved_flops_per_s": flops["total"] / out["median_s"], "floor_s": floor,
                    "fraction_of_matmul": floor / out["median_s"], "finite": finite})
        return out

    def _ttft(self, subject: Any, n: int) -> dict[str, Any]:
        p = self.plan
        prompt = _prompt_ids(self.config, [n], self.dev.device, p.seed + 1).tolist()
        times = _timed(lambda: subject.first_token(prompt), self.dev, p.warmup, p.repeats)
        out = _summary(times)
        floor = prefill_flops(self.config, [n])["total"] / self.limits.matmul_flops_per_s
        out.update({"prompt_len": n, "floor_s": floor, "fraction_of_matmul": floor / out["median_s"]})
        return out

    def _profile(self, step: Callable[[], Any]) -> dict[str, Any]:
        return profile_step(step, self.dev, self.plan.warmup)


def _fraction(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def profile_step(step: Callable[[], Any], dev: _Device, warmup: int = 1, top: int = 12) -> dict[str, Any]:
    """torch.profiler over one call of ``step``: the top kernels (device time on a GPU, CPU ops' self time
    on a CPU) with their share of the total."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(max(1, warmup)):
        step()
    dev.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        dev.sync()
        wall = time.perf_counter() - t0

    def self_us(e) -> float:
        if dev.cuda:
            return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))
        return float(e.self_cpu_time_total)

    events = [e for e in prof.key_averages() if self_us(e) > 0]
    total = sum(self_us(e) for e in events)
    events.sort(key=self_us, reverse=True)
    rows = [{"name": e.key, "calls": int(e.count), "self_s": self_us(e) / 1e6, "share": self_us(e) / total}
            for e in events[:top]]
    return {"wall_s": wall, "timeline": "device kernels" if dev.cuda else "cpu ops (self time)",
            "total_self_s": total / 1e6, "kernels": len(events), "top": rows}


# ---- building the subjects -------------------------------------------------------------------------

def _sharded(model: Any) -> bool:
    """Whether ``model`` is one rank's shard of a torchrun launch (core/launch.py)."""
    return getattr(getattr(model, "comm", None), "world_size", 1) > 1


def _label(ops: dict[str, str]) -> str:
    names = list(ops.values())
    default = max(dict.fromkeys(names), key=names.count)  # ties: the first op's engine
    extra = [f"{op}={n}" for op, n in ops.items() if n != default]
    return ",".join([default, *extra])


def build_subject(plan: Plan, spec: str | None, dev: _Device, config: ModelConfig) -> MxmoeSubject:
    from mxmoe.plugins import resolve_backends

    from .launch import current
    from .model import GptOss, load_model

    t0 = time.perf_counter()
    with torch.no_grad():
        if plan.model_dir is not None:
            model = load_model(plan.model_dir, backend=spec, device=plan.device, dtype=plan.dtype, strict=plan.strict)
        elif current() is not None:  # under torchrun: every rank makes the same random weights and keeps its shard
            model = current().load_model(random=(config.model_dump(), plan.seed), backend=spec, device=plan.device,
                                         dtype=plan.dtype, strict=plan.strict)
        else:
            resolution = resolve_backends(spec, device=plan.device, dtype=plan.dtype, strict=plan.strict,
                                          model_config=config)
            weights = random_weights_on_device(config, plan.device, plan.seed)
            big = config.num_hidden_layers * expert_bytes(config, plan.dtype) * config.num_experts > GIB
            model = GptOss(config, weights, resolution.ops, dtype=plan.dtype, device=plan.device,
                           resolution=resolution, progress=big and sys.stderr.isatty())
            del weights
    dev.sync()
    build_s = time.perf_counter() - t0
    ops = {op: b.name for op, b in model.ops.items()}
    return MxmoeSubject(_label(ops), model, spec, build_s)


def _peer_plan(plan: Plan, dev: _Device, config: ModelConfig) -> str | None:
    """None if the transformers peer should run, else why not ("not installed", "skipped: ...")."""
    if plan.peer == "none":
        return "not requested (--peer none)"
    from .launch import current

    if current() is not None:
        return "skipped: a sharded (torchrun) run; the peer would hold the whole model on rank 0"
    if importlib.util.find_spec("transformers") is None:
        return "not installed (pip install transformers)"
    need = int(hf_bytes(config, plan.dtype) * 1.1) + 2 * GIB
    free = dev.free_bytes()
    if need > free:
        return f"skipped: needs {need / GIB:.1f} GiB, {free / GIB:.1f} GiB free on {plan.device}"
    return None


def build_peer(plan: Plan, dev: _Device, config: ModelConfig) -> TransformersSubject:
    t0 = time.perf_counter()
    with torch.no_grad():
        if plan.model_dir is not None:
            _, weights, _ = load_checkpoint(plan.model_dir)
        else:
            weights = random_weights_on_device(config, plan.device, plan.seed)  # the same weights (same seed)
        hf = build_transformers(config, weights, plan.dtype, plan.device)
        del weights
    dev.sync()
    return TransformersSubject(hf, config, plan.dtype, plan.device, time.perf_counter() - t0)


# ---- the run's header: what, where, which versions ------------------------------------------------

def _versions() -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__, "triton": version("triton"),
            "transformers": version("transformers"), "mxmoe": version("mxmoe"),
            "cuda_runtime": torch.version.cuda}


def git_commit() -> dict[str, Any]:
    """``$MXMOE_GIT_COMMIT`` when set (a copy of the tree whose own .git may be stale, as on a lent GPU
    machine), else the git commit of the mxmoe source this runs from (an editable checkout), else of the
    current directory's checkout if it is mxmoe's; and whether tracked files differ."""
    env = os.environ.get("MXMOE_GIT_COMMIT", "").strip()
    if env:
        return {"commit": env.removesuffix("-dirty"), "dirty": True if env.endswith("-dirty") else None}
    here = Path(__file__).resolve().parent.parent
    for root in (here, Path.cwd()):
        if not (root / "pyproject.toml").is_file() or 'name = "mxmoe"' not in (root / "pyproject.toml").read_text():
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=10)
            top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                                 text=True, timeout=10)
            if head.returncode == 0 and Path(top.stdout.strip()).resolve() == root.resolve():
                dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                       capture_output=True, text=True, timeout=30)
                return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    return {"commit": None, "dirty": None}


def header(plan: Plan, dev: _Device, config: ModelConfig, limits: Limits, run_id: str,
           dense_experts: torch.dtype | None = None) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": plan.command(),
        "device": dev.info,
        # The load average says whether other work shared the host (figures on a busy CPU are not comparable).
        "host": {"platform": platform.platform(), "cpu": _cpu_name(), "cores": os.cpu_count(),
                 "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "versions": _versions(),
        **git_commit(),
        "model": {"shape": plan.shape, "model_dir": plan.model_dir, "weights": "random" if plan.shape else "checkpoint",
                  "dtype": dtype_name(plan.dtype),
                  "experts": "mxfp4" if dense_experts is None else dtype_name(dense_experts),
                  "config": config.model_dump()},
        "limits": {"copy_bytes_per_s": limits.copy_bytes_per_s,
                   "copy_median_bytes_per_s": limits.copy_median_bytes_per_s,
                   "copy_bytes": limits.copy_bytes, "matmul_flops_per_s": limits.matmul_flops_per_s,
                   "matmul_median_flops_per_s": limits.matmul_median_flops_per_s, "matmul_n": limits.matmul_n,
                   "matmul_dtype": limits.matmul_dtype},
        "settings": {"repeats": plan.repeats, "warmup": plan.warmup, "seed": plan.seed, "quick": plan.quick},
        "parallel": _parallel_info(),
    }


def _parallel_info() -> dict[str, Any] | None:
    """Under torchrun: the ranks and the expert sharding (device figures and memory are rank 0's)."""
    from .launch import _sharding_from_env, current

    launch = current()
    if launch is None:
        return None
    return {"world_size": launch.world_size, "shard_experts": launch.shard_experts or _sharding_from_env(),
            "figures": "rank 0's device and memory; bytes and FLOPs are the whole model's"}


# ---- comparing, printing, recording ---------------------------------------------------------------

def add_ratios(records: list[dict[str, Any]]) -> None:
    """``speedup_vs_first`` (first engine's median time / this one's) on timed records, and
    ``memory_vs_first`` on memory records, against the first engine with a figure for the same case."""
    first: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec["status"] != "ok" or rec["scenario"] == "profile":
            continue
        key = rec["scenario"] + json.dumps(rec["params"], sort_keys=True)
        base = first.setdefault(key, rec)
        f, b = rec["figures"], base["figures"]
        if "median_s" in f:
            f["speedup_vs_first"] = b["median_s"] / f["median_s"] if f["median_s"] else None
        elif rec["scenario"] == "memory":
            mine = f.get("peak_device_bytes") or f["peak_rss_bytes"]
            theirs = b.get("peak_device_bytes") or b["peak_rss_bytes"]
            f["memory_vs_first"] = mine / theirs if theirs else None


def _params_text(params: dict[str, Any]) -> str:
    short = {"batch": "B", "context": "ctx", "prompt_len": "len"}
    return " ".join(f"{short.get(k, k)}={v}" for k, v in params.items() if k not in ("source", "of"))


def _si(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _ratio(x: float | None) -> str:
    if not x:
        return ""
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.2g}x"


def _pct(x: float) -> str:
    return f"{x:.1%}" if x >= 0.001 else f"{x * 100:.2g}%"


def _limit_text(f: dict[str, Any]) -> str:
    if "fraction_of_bandwidth" in f:
        return f"{_pct(f['fraction_of_bandwidth'])} of copy BW ({_si(f['bytes'], 'B')}/step)"
    if "flops" in f:
        return f"{_pct(f['fraction_of_matmul'])} of matmul ({_si(f['flops'], 'FLOP')})"
    if "fraction_of_matmul" in f:
        return f"{_pct(f['fraction_of_matmul'])} of compute floor"
    if f.get("fraction_of_device_memory") is not None:
        return f"{_pct(f['fraction_of_device_memory'])} of device memory"
    if f.get("fraction_of_host_memory") is not None:
        return f"{_pct(f['fraction_of_host_memory'])} of host memory"
    return ""


def _line(rec: dict[str, Any]) -> str:
    f = rec["figures"]
    if rec["scenario"] == "memory":
        return (f"memory: peak device {_si(f['peak_device_bytes'], 'B')}, peak RSS {_si(f['peak_rss_bytes'], 'B')}"
                f"  {_limit_text(f)}")
    if rec["scenario"] == "profile":
        return f"profile {rec['params']['of']}: {_ms(f['wall_s'])}, {f['kernels']} distinct kernels/ops"
    tps = f" {f['tokens_per_s']:.4g} tok/s" if "tokens_per_s" in f else ""
    return (f"{rec['scenario']} {_params_text(rec['params'])}: {_ms(f['median_s'])} "
            f"({_ms(f['min_s'])}-{_ms(f['max_s'])}){tps}  {_limit_text(f)}")


def table(records: list[dict[str, Any]]) -> str:
    """The console table: one row per record (profiles are printed apart)."""
    head = ("scenario", "params", "engine", "median", "min-max", "tokens/s", "vs limit", "vs first")
    rows = []
    for rec in records:
        if rec["scenario"] == "profile":
            continue
        f = rec["figures"]
        if rec["status"] != "ok":
            rows.append((rec["scenario"], _params_text(rec["params"]), rec["engine"], rec["status"][:60],
                         "", "", "", ""))
        elif rec["scenario"] == "memory":
            rows.append(("memory", "", rec["engine"],
                         f"{_si(f['peak_device_bytes'], 'B')} dev" if f["peak_device_bytes"] is not None else "-",
                         f"RSS {_si(f['peak_rss_bytes'], 'B')}", "", _limit_text(f).split(" (")[0],
                         _ratio(f.get("memory_vs_first"))))
        else:
            rows.append((rec["scenario"], _params_text(rec["params"]), rec["engine"], _ms(f["median_s"]),
                         f"{_ms(f['min_s'])}-{_ms(f['max_s'])}",
                         f"{f['tokens_per_s']:.4g}" if "tokens_per_s" in f else "",
                         _limit_text(f).split(" (")[0],
                         _ratio(f.get("speedup_vs_first"))))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])


def profile_text(records: list[dict[str, Any]]) -> str:
    out = []
    for rec in records:
        if rec["scenario"] != "profile" or rec["status"] != "ok":
            continue
        f = rec["figures"]
        out.append(f"[{rec['engine']}] top of one {rec['params']['of']} step ({_params_text(rec['params'])}): "
                   f"wall {_ms(f['wall_s'])}, {f['timeline']} total {_ms(f['total_self_s'])}")
        for row in f["top"]:
            out.append(f"  {row['share']:6.1%}  {_ms(row['self_s']):>9}  {row['calls']:5d}x  {row['name'][:90]}")
    return "\n".join(out)


def write_results(path: Path, head: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Append one JSON line per record, each carrying the run's header (date, device, versions, limits...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for rec in records:
            f.write(json.dumps(_finite({**head, **rec}), allow_nan=False) + "\n")


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def plot(path: Path, records: list[dict[str, Any]], limits: Limits, batch_context: int, title: str) -> None:
    """tokens/s against batch size per engine at ``batch_context``, with the bandwidth roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = [r for r in records if r["status"] == "ok" and r["scenario"] in ("decode-b1", "decode-batch")
              and r["params"]["context"] == batch_context]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    roof: dict[int, float] = {}
    for engine in dict.fromkeys(r["engine"] for r in decode):
        pts = sorted((r["params"]["batch"], r["figures"]["tokens_per_s"]) for r in decode if r["engine"] == engine)
        ax.plot([b for b, _ in pts], [t for _, t in pts], marker="o", label=engine)
        for r in decode:
            if r["engine"] == engine and "roofline_tokens_per_s" in r["figures"]:
                roof.setdefault(r["params"]["batch"], r["figures"]["roofline_tokens_per_s"])
    if roof:
        xs = sorted(roof)
        ax.plot(xs, [roof[b] for b in xs], "k--",
                label=f"roofline: bytes/step at {_si(limits.copy_bytes_per_s, 'B/s')} copy (observed routing)")
    ax.set_xscale("log", base=2)
    batches = sorted({r["params"]["batch"] for r in decode})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sequences per decode step)")
    ax.set_ylabel("decode tokens/s (all sequences)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the command -----------------------------------------------------------------------------------

def _check_backends(plan: Plan, config: ModelConfig) -> None:
    """Every --backend spec must resolve here, naming only registered engines, before anything is measured
    (bad input: exit status 2). A fallback for an op the named engine cannot serve is allowed: the records
    name the engine that served each op."""
    from mxmoe.plugins import BackendSelectionError, SpecError, resolve_backends

    for spec in plan.backends:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the build warns once more, where it matters
                res = resolve_backends(spec, device=plan.device, dtype=plan.dtype, strict=plan.strict,
                                       model_config=config)
        except (BackendSelectionError, SpecError) as e:
            raise BenchError(f"--backend {spec or '(default)'}: {e}") from None
        unknown = sorted({r.backend for d in res.trace for r in d.rejected if r.kind == "unknown"})
        if unknown:
            known = sorted({d.backend for d in res.trace if d.backend} | {r.backend for d in res.trace
                                                                         for r in d.rejected if r.kind != "unknown"})
            raise BenchError(f"--backend {spec}: no engine named {', '.join(map(repr, unknown))} is registered "
                             f"(known: {', '.join(known)}; see `mxmoe backends`)")


def run(plan: Plan, out=sys.stdout) -> int:
    """Run a plan: limits, every engine, the peer; print, record, plot. 0 if every scenario ran, 1 if not."""
    def log(msg: str) -> None:
        print(msg, file=out, flush=True)

    dev = _Device(plan.device)
    if plan.model_dir is not None:

        config, weights, _ = load_checkpoint(plan.model_dir)
        mlp1 = weights.blocks[0].mlp.mlp1
        dense_experts = None if mlp1.is_mxfp4 else mlp1.weight.dtype
        del weights
    else:
        config, dense_experts = preset(plan.shape), None
    _check_backends(plan, config)
    what = plan.model_dir or f"{plan.shape} (random weights)"
    log(f"mxmoe bench: {what}, {dtype_name(plan.dtype)}, on {dev.info['name']} ({plan.device})")
    limits = measure_limits(dev, plan.dtype, plan.quick)
    log(f"limits: copy {_si(limits.copy_bytes_per_s, 'B/s')} (read+write, {_si(limits.copy_bytes, 'B')} buffer), "
        f"{limits.matmul_dtype} matmul {_si(limits.matmul_flops_per_s, 'FLOP/s')} ({limits.matmul_n}^3)")
    head = header(plan, dev, config, limits, uuid.uuid4().hex[:12], dense_experts)  # dated when the run starts
    runner = Runner(plan, dev, limits, config, dense_experts, log)
    failed = False
    seen: dict[str, int] = {}
    for spec in plan.backends:
        dev.release()
        dev.reset_peaks()
        try:
            subject = build_subject(plan, spec, dev, config)
        except Exception as e:
            log(f"[{spec}] could not be built: {type(e).__name__}: {e}")
            runner.records.append({"engine": spec or "default", "engine_kind": "mxmoe", "backend_spec": spec,
                                   "ops": {}, "scenario": "load", "params": {},
                                   "status": f"error: {type(e).__name__}: {e}", "figures": {}})
            failed = True
            continue
        seen[subject.label] = seen.get(subject.label, 0) + 1
        if seen[subject.label] > 1:
            subject.label += f" #{seen[subject.label]}"
        log(f"[{subject.label}] built in {_ms(subject.build_s)} (spec {spec or 'default'}; ops "
            f"{', '.join(f'{k}={v}' for k, v in subject.ops.items())}; decode via {decode_step_class()[1]})")
        runner.run(subject, dev.allocated_bytes())
        subject.close()
        del subject
    dev.release()
    why_not = _peer_plan(plan, dev, config)
    if why_not is None:
        dev.reset_peaks()
        try:
            peer = build_peer(plan, dev, config)
            log(f"[{peer.label}] built in {_ms(peer.build_s)} (GptOssForCausalLM, eager, experts dequantized "
                f"to {dtype_name(plan.dtype)})")
            runner.run(peer, dev.allocated_bytes())
            peer.close()
            del peer
        except Exception as e:
            why_not = f"error: {type(e).__name__}: {e}"
            traceback.print_exc(file=sys.stderr)
        dev.release()
    if why_not is not None:
        failed = failed or (plan.peer == "transformers" and not why_not.startswith("not requested"))
        log(f"[transformers] {why_not}")
        runner.records.append({"engine": "transformers", "engine_kind": "peer", "backend_spec": None, "ops": {},
                               "scenario": "peer", "params": {}, "status": why_not, "figures": {}})
    records = runner.records
    add_ratios(records)
    log("")
    log(table(records))
    if plan.profile:
        log("")
        log(profile_text(records))
    if plan.results is not None:
        write_results(plan.results, head, records)
        log(f"\n{len(records)} records appended to {plan.results}")
    if plan.plot is not None:
        plot(plan.plot, records, limits, plan.batch_context,
             f"{what} {dtype_name(plan.dtype)} on {dev.info['name']}, context {plan.batch_context}")
        log(f"plot written to {plan.plot}")
    failed = failed or any(r["status"].startswith("error") for r in records)
    return 1 if failed else 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, found {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, found {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, found {text!r}")
    return value


def _batch_shape(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        s, n = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SEQUENCESxTOKENS such as 8x512, found {text!r}") from None
    if s <= 0 or n <= 0:
        raise argparse.ArgumentTypeError(f"expected positive SEQUENCESxTOKENS, found {text!r}")
    return s, n


def _scenarios(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if "all" in names:
        return list(SCENARIOS)
    bad = [s for s in names if s not in SCENARIOS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown scenario {', '.join(bad) or repr(text)}; "
                                         f"known: {', '.join(SCENARIOS)}, all")
    return names


class _Extend(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, (getattr(namespace, self.dest) or []) + list(values))


_EPILOG = """\
scenarios:
  decode-b1      batch-1 decode at each --context
  decode-batch   decode of --batch sequences, each at --batch-context
  prefill        one prompt of --prefill-len tokens
  prefill-batch  --prefill-batch prompts (SxN)
  ttft           time to first token of a warm engine: host ids in, prefill of --prefill-len tokens,
                 greedy sample, the token id back on the host
  load           model load (--model) or build (--shape: random weights made on the device) time
  memory         peak device memory and peak RSS of each engine
decode at context C: the KV cache holds random keys/values at positions < C and each timed step runs at
position C (the same inputs for every engine); warm-ups, then median/min/max over --repeats. The experts
the router picked in that step give the bytes the step must read.

results: one JSON line per engine and scenario, each with date, device, driver, versions, git commit,
the measured limits and the command that repeats the run, appended to --results; by default to
tests/benchmarks/results/bench.jsonl when that folder exists under the current directory, else to
./mxmoe-bench.jsonl. The commit is $MXMOE_GIT_COMMIT when set (SHA, '-dirty' suffix allowed), else the git checkout's.

exit status: 0 when every scenario ran, 1 when one failed (its record says why), 2 for bad input.
"""


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark engines side by side against the device's measured limits",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark gpt-oss on one or more engines in one run, side by side.\n\n"
                    "At the start the device's copy bandwidth and matmul throughput are measured; every decode\n"
                    "figure is also shown as a fraction of the bandwidth its bytes need (weights touched at the\n"
                    "observed routing, KV cache), every prefill figure as a fraction of the matmul throughput its\n"
                    "FLOPs need. Without --model, random weights with the real shapes are made on the device.",
        epilog=_EPILOG)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shape", choices=SHAPES, default=None,
                     help="random weights with these shapes, made on the device (default: gpt-oss-20b; tiny with "
                          "--quick)")
    src.add_argument("--model", metavar="DIR", help="a checkpoint folder to load instead (any layout mxmoe reads)")
    p.add_argument("--backend", action="append", metavar="SPEC",
                   help="engine to run, repeatable: a name (torch, triton, ...), 'auto', or per-op overrides such as "
                        "'attention=triton,experts=torch'; every scenario runs on each, with ratios to the first "
                        "(default: $MXMOE_BACKEND, then mxmoe.toml, then auto; torch with --quick)")
    p.add_argument("--scenario", action=_Extend, type=_scenarios, metavar="NAME[,NAME]",
                   help=f"scenarios to run, repeatable or comma-separated: {', '.join(SCENARIOS)}, all (default: all)")
    p.add_argument("--context", type=_int_list, metavar="C[,C]",
                   help="contexts of the batch-1 decode (default: 1024,8192; 32,128 with --quick)")
    p.add_argument("--batch", type=_int_list, metavar="B[,B]",
                   help="batch sizes of the batched decode (default: 8,64; 2,4 with --quick)")
    p.add_argument("--batch-context", type=_positive, metavar="C",
                   help="context of every sequence in the batched decode (default: 1024; 32 with --quick)")
    p.add_argument("--prefill-len", type=_positive, metavar="N",
                   help="prompt length of the prefill and time-to-first-token scenarios (default: 2048; 64 with "
                        "--quick)")
    p.add_argument("--prefill-batch", type=_batch_shape, metavar="SxN",
                   help="prompts x tokens of the batched prefill (default: 8x512; 2x32 with --quick)")
    p.add_argument("--repeats", type=_positive, help="timed runs of each scenario (default: 10; 3 with --quick)")
    p.add_argument("--warmup", type=_non_negative, help="untimed runs before them (default: 3; 1 with --quick)")
    p.add_argument("--device", help="torch device: cuda, cuda:1, cpu (default: cuda when present, else cpu; cpu "
                                    "with --quick)")
    p.add_argument("--dtype", help="activation dtype: bfloat16 (default), float16, float32")
    p.add_argument("--peer", choices=PEERS, default="auto",
                   help="Hugging Face transformers GptOssForCausalLM on the same weights (experts dequantized) as a "
                        "peer, decoding with its own KV cache: auto = when installed and the device has the memory "
                        "(default); transformers = the same, but a peer that cannot run (not installed, no memory) "
                        "makes the exit status 1; none = not run")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over one decode step (first --context) and one prefill: the top kernels "
                        "with their share of the step")
    p.add_argument("--results", metavar="PATH", help="JSON-lines file to append the records to (see below)")
    p.add_argument("--no-results", action="store_true", help="do not write a results file")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw decode tokens/s against batch size with the bandwidth roofline (needs matplotlib: "
                        "pip install 'mxmoe[plot]')")
    p.add_argument("--quick", action="store_true",
                   help="the tiny shape on the CPU with the torch engine and small scenarios: checks the harness "
                        "end to end in seconds (explicit flags still win)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)")
    p.add_argument("--strict", action="store_true", help="refuse any backend fallback")
    p.set_defaults(func=_cli_bench)


def _cli_bench(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
        return run(plan)
    except BenchError as e:
        print(f"mxmoe bench: {e}", file=sys.stderr)
        return 2
