"""The Backend interface: what an engine declares (identity, capabilities) and the ops it implements.

The model graph (core/model.py) calls only these ops, each through the backend that serves it; engines
never see the graph. Every op takes a varlen batch (core/batch.py): T tokens of S sequences flattened.

Shape legend: T tokens, S sequences, D hidden, V vocab, E experts, k experts per token,
Hq/Hkv query/KV heads, d head_dim.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from .batch import Batch
from .weights import ExpertLinear

# Semantic version of this interface. A backend declares the range it was written for
# (``Backend.api_version``, e.g. ">=1.0,<2"); a major bump means an incompatible change.
# 1.1: the base class enforces the claims (Backend.check_claims), the public prepared-experts type
# ``Experts``, RMSNorm rounded once.
# 1.2: optional fused ops, each spanning one or more existing ops and composed from them by default (engines
# written for 1.0/1.1 run unchanged, with the same results): ``add_rms_norm`` (the residual add + the next RMSNorm,
# op "rms_norm") and ``rope_attention`` (RoPE + the KV-cache write + attention, ops "rope" and "attention"). The
# graph calls a fused op through :func:`fused_op`: the fused method when one backend serves all of its ops, else
# the composition of each op on its own backend. Also the ``sharded`` claim and the optional
# ``Backend.communicator`` (an engine's own collectives) for tensor/expert parallelism (core/parallel.py).
BACKEND_API_VERSION = "1.2.0"

# The ops an engine may serve; per-op overrides name these. A fused op spans one or more of them: it runs fused
# only where one backend serves all of them, and is claimed with them.
OPS: tuple[str, ...] = ("embedding", "rms_norm", "linear", "rope", "attention", "router", "experts")
# Fused ops (API 1.2) → the ops each fuses, in the order the composition calls them.
FUSED_OPS: dict[str, tuple[str, ...]] = {"add_rms_norm": ("rms_norm",), "rope_attention": ("rope", "attention")}


class NotSupported(Exception):
    """Raised when a backend is asked for something it does not claim (op, dtype, device, shape, ...)."""

    def __init__(self, backend: str, what: str):
        super().__init__(f"backend {backend!r} does not support {what}")
        self.backend = backend
        self.what = what


class Capabilities(BaseModel):
    """What a backend claims, as data. Anything not claimed must raise :class:`NotSupported`.

    The base class enforces every claim it can see from an op's arguments (see
    :meth:`Backend.check_claims`), so an engine states its limits once, here.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ops: tuple[str, ...] = OPS
    devices: tuple[str, ...] = ("cpu",)  # torch device types: "cpu", "cuda" (ROCm builds report "cuda" too)
    dtypes: tuple[str, ...] = ("float32",)  # activation dtypes: "float64", "float32", "bfloat16", ...
    head_dims: tuple[int, ...] | None = None  # None = any
    attention_sinks: bool = True  # False: refuses attention (gpt-oss always passes sinks)
    sliding_window: bool = True  # False: refuses attention with a non-zero window
    # How MXFP4 experts are computed: "native" keeps them 4-bit (prepared weights stay about the packed size),
    # "dequantized" may widen them, "none" refuses MXFP4 experts.
    mxfp4: Literal["native", "dequantized", "none"] = "none"
    dense_experts: bool = True  # accepts experts stored dense (the Hugging Face bf16 layout)
    max_experts: int | None = None  # experts per layer (router width); None = any
    max_experts_per_token: int | None = None  # top-k; None = any
    max_context: int | None = None  # keys one sequence attends to (cached + new), and positions below it
    cuda_graphs: bool = False  # decode ops are capturable (no host sync, static shapes)
    # Runs as one rank of a sharded model (core/parallel.py): ops take this rank's heads (any count), expert
    # slices (any intermediate width that is a multiple of 32, zero-padded) or expert subsets with top-1 rows.
    sharded: bool = False
    # "run_to_run": the same inputs twice give the same bits; "bitwise": also in a freshly prepared model.
    determinism: Literal["bitwise", "run_to_run", "none"] = "run_to_run"


@dataclass(frozen=True)
class Probe:
    """Result of :meth:`Backend.probe`: usable here or not, and why."""

    available: bool
    reason: str = ""


@dataclass
class Linear:
    """A dense layer ``y = x W^T + b`` as the reference engine keeps it (engines may use their own type)."""

    weight: torch.Tensor  # (N, K)
    bias: torch.Tensor | None  # (N,)


@dataclass
class Experts:
    """A layer's MoE experts as the reference engine keeps them: the canonical MXFP4 (or dense) layers on the
    engine's device, activations in ``dtype``.

    What ``prepare_experts`` returns is the engine's own business (each engine owns its layout and gets it
    back in ``experts``); this type is public so that engines built on the reference's layout need no
    private import.
    """

    mlp1: ExpertLinear  # (E, 2I, D): gate and linear rows interleaved
    mlp2: ExpertLinear  # (E, D, I)
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.mlp1.num_experts != self.mlp2.num_experts:
            raise ValueError(f"mlp1 has {self.mlp1.num_experts} experts and mlp2 {self.mlp2.num_experts}")

    @property
    def num_experts(self) -> int:
        return self.mlp1.num_experts


class Backend:
    """Base class of every engine. Subclasses set the class attributes and override the ops they claim.

    An op a backend does not override raises :class:`NotSupported` — the interface's way of saying
    "not offered", so the selection layer can route that op elsewhere. Fused ops (API 1.2:
    :meth:`add_rms_norm`, :meth:`rope_attention`; :data:`FUSED_OPS`) are the exception: optional, each
    spanning one or more ops, composed here from those ops by default; an engine overrides one to run it
    as fewer kernels. The graph reaches them through :func:`fused_op`.

    Claims are enforced here: every op and ``prepare_*`` method a subclass defines first checks its
    arguments against ``capabilities`` (:meth:`check_claims`: op, device, dtype, head dim, window, sinks,
    context, expert count, top-k, expert format) and raises :class:`NotSupported` outside them. The
    check reads only shapes, dtypes and host-side integers (no device synchronisation: CUDA graphs can
    capture it), and runs once per outer call (an op that calls another op of the same engine is not
    checked twice). A claim the arguments cannot show without a device read (the largest RoPE position)
    stays the engine's to check. ``enforce_claims = False`` turns this off for an engine that checks
    everything itself.
    """

    name: ClassVar[str] = "abstract"
    version: ClassVar[str] = "0"
    api_version: ClassVar[str] = ">=1.0,<2"  # range of BACKEND_API_VERSION this engine was written for
    priority: ClassVar[int] = 0  # higher wins under ``auto``; ties go to the built-in engines, then by name
    capabilities: ClassVar[Capabilities] = Capabilities()
    enforce_claims: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for op, guard in _GUARDS.items():
            fn = cls.__dict__.get(op)
            if callable(fn) and not isinstance(fn, (staticmethod, classmethod)) and not hasattr(fn, "__claims__"):
                setattr(cls, op, _enforcing(fn, guard))

    def probe(self, device: torch.device | str | None = None) -> Probe:
        """Can this engine run here? Must not raise for a missing dependency or device: say why instead."""
        return Probe(True)

    def check(self, *, op: str | None = None, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> None:
        """Raise :class:`NotSupported` unless the capabilities claim ``op`` on ``device`` in ``dtype``."""
        caps = self.capabilities
        if op is not None and op not in caps.ops:
            raise NotSupported(self.name, f"op {op!r} (claims {', '.join(caps.ops)})")
        kind = device.type if isinstance(device, torch.device) else None if device is None else torch.device(device).type
        if kind is not None and kind not in caps.devices:
            raise NotSupported(self.name, f"device {kind!r} (claims {', '.join(caps.devices)})")
        if dtype is not None and dtype_name(dtype) not in caps.dtypes:
            raise NotSupported(self.name, f"dtype {dtype_name(dtype)} (claims {', '.join(caps.dtypes)})")

    def check_claims(self, op: str | None, x: torch.Tensor | None = None, *, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None, head_dim: int | None = None, sliding_window: int = 0,
                     sinks: bool = False, context: int | None = None, num_experts: int | None = None,
                     top_k: int | None = None, expert_format: Literal["mxfp4", "dense"] | None = None) -> None:
        """Raise :class:`NotSupported` unless the capabilities claim this call: :meth:`check` (op, and the
        device and dtype of ``x`` or the ones given), then head dim, window, sinks, ``context`` keys,
        ``num_experts``, ``top_k`` and the expert storage format. ``op=None``: a dense layer, claimed when
        either ``linear`` or ``router`` is. Called by the base class before every op (see the class
        docstring); engines may call it for their own paths too."""
        caps = self.capabilities
        if x is not None:
            device, dtype = x.device, x.dtype
        if op is None and not ("linear" in caps.ops or "router" in caps.ops):
            raise NotSupported(self.name, f"dense layers (claims neither 'linear' nor 'router': {', '.join(caps.ops)})")
        self.check(op=op, device=device, dtype=dtype)
        if head_dim is not None and caps.head_dims is not None and head_dim not in caps.head_dims:
            raise NotSupported(self.name, f"head_dim {head_dim} (claims {', '.join(map(str, caps.head_dims))})")
        if sinks and not caps.attention_sinks:
            raise NotSupported(self.name, "attention sinks")
        if sliding_window and not caps.sliding_window:
            raise NotSupported(self.name, f"sliding-window attention (window {sliding_window})")
        if context is not None and caps.max_context is not None and context > caps.max_context:
            raise NotSupported(self.name, f"a context of {context} keys (claims at most {caps.max_context})")
        if num_experts is not None and caps.max_experts is not None and num_experts > caps.max_experts:
            raise NotSupported(self.name, f"{num_experts} experts (claims at most {caps.max_experts})")
        if top_k is not None and caps.max_experts_per_token is not None and top_k > caps.max_experts_per_token:
            raise NotSupported(self.name, f"top-{top_k} routing (claims at most {caps.max_experts_per_token})")
        if expert_format == "mxfp4" and caps.mxfp4 == "none":
            raise NotSupported(self.name, "MXFP4 experts (claims mxfp4='none')")
        if expert_format == "dense" and not caps.dense_experts:
            raise NotSupported(self.name, "dense (bf16) experts (claims dense_experts=False)")

    # ---- weight preparation: once, at load ---------------------------------------------------------
    def prepare_linear(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                       device: torch.device | str) -> Any:
        """Canonical dense weight (N, K) + bias (N,) → this engine's layout, passed back to ``linear``/``router``."""
        raise NotSupported(self.name, "dense linear layers")

    def prepare_experts(self, mlp1: ExpertLinear, mlp2: ExpertLinear, dtype: torch.dtype,
                        device: torch.device | str) -> Any:
        """Canonical expert weights (MXFP4 or dense) → this engine's layout, passed back to ``experts``."""
        raise NotSupported(self.name, "MoE experts")

    # ---- ops ---------------------------------------------------------------------------------------
    def embedding(self, token_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(T,) int64 ids, (V, D) table → (T, D) in the table's dtype."""
        raise NotSupported(self.name, "op 'embedding'")

    def rms_norm(self, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        """(T, D) → (T, D): ``x / sqrt(mean(x²) + eps) * scale``, computed in at least float32 (the mean of
        squares too, and the product with the float32 ``scale``) and rounded once, at the end, to x's dtype."""
        raise NotSupported(self.name, "op 'rms_norm'")

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and the next RMSNorm, fused (op "rms_norm"; API 1.2): x, delta (T, D) of one dtype
        → (s, h), both (T, D) in x's dtype: ``s = x + delta`` rounded once to x's dtype (exactly what
        ``x + delta`` gives in PyTorch), ``h = rms_norm(s, scale, eps)`` of that rounded ``s``.

        Optional: this default composes the two (``x + delta``, then :meth:`rms_norm`), so an engine that
        overrides only ``rms_norm`` gets the same bits as before the op existed."""
        return _compose_add_rms_norm(self, x, delta, scale, eps)

    def linear(self, x: torch.Tensor, layer: Any) -> torch.Tensor:
        """(T, K) → (T, N) with a layer from ``prepare_linear``."""
        raise NotSupported(self.name, "op 'linear'")

    def rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
             concentration: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q (T, Hq, d) and k (T, Hkv, d) by angle ``positions * inv_freq`` (YaRN frequencies, d/2),
        non-interleaved halves, cos/sin scaled by the YaRN ``concentration``."""
        raise NotSupported(self.name, "op 'rope'")

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, batch: Batch, sliding_window: int,
                  sm_scale: float) -> torch.Tensor:
        """Causal GQA attention with sinks over each sequence's cached + new keys.

        q (T, Hq, d); k, v (T, Hkv, d) are the new tokens' keys/values, written first into
        ``k_cache``/``v_cache`` (rows, cache_len, Hkv, d) at ``batch.slot_mapping``. Token at position p
        of sequence s attends to keys j ≤ p of that sequence, and only to p - j < ``sliding_window``
        when the window is non-zero. ``sinks`` (Hq,) adds one logit per head to the softmax
        denominator. Returns (T, Hq, d).
        """
        raise NotSupported(self.name, "op 'attention'")

    def rope_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       inv_freq: torch.Tensor, concentration: float, sinks: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, batch: Batch, sliding_window: int, sm_scale: float) -> torch.Tensor:
        """RoPE, then attention, fused (ops "rope" and "attention"; API 1.2): q (T, Hq, d) and k (T, Hkv, d)
        rotated as :meth:`rope` does (``positions``, ``inv_freq``, ``concentration``), then
        :meth:`attention` of the rotated q over the cache, into which the rotated k and v are written at
        ``batch.slot_mapping`` first. Returns (T, Hq, d); the caches hold the rotated keys afterwards.

        Optional: this default composes the two (:meth:`rope`, then :meth:`attention`), so an engine that
        overrides only those gets the same bits as before the op existed."""
        return _compose_rope_attention(self, self, q, k, v, positions, inv_freq, concentration, sinks, k_cache,
                                       v_cache, batch, sliding_window, sm_scale)

    def router(self, x: torch.Tensor, gate: Any, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, D) → (weights (T, k), indices (T, k) int64): top-k of the gate's logits, sorted descending
        (ties to the lower expert index), softmax over the chosen k."""
        raise NotSupported(self.name, "op 'router'")

    def experts(self, x: torch.Tensor, expert_weights: torch.Tensor, expert_indices: torch.Tensor,
                experts: Any, swiglu_alpha: float, swiglu_limit: float) -> torch.Tensor:
        """Mixture of the chosen experts: (T, D) → (T, D) = Σ_k w_tk · mlp2_e(SwiGLU(mlp1_e(x_t))).

        SwiGLU on mlp1's output h (2I): gate = h[0::2] clamped above at ``swiglu_limit``,
        linear = h[1::2] clamped to ±``swiglu_limit``; out = gate·σ(α·gate)·(linear + 1).
        """
        raise NotSupported(self.name, "op 'experts'")

    # ---- collectives (optional) ----------------------------------------------------------------------
    def communicator(self, rank: int, world_size: int, device: torch.device) -> Any:
        """This engine's own collectives for a sharded model (a :class:`mxmoe.core.parallel.Communicator`), or
        None (the default) for torch.distributed's. Called once per rank at load when the engine serves an op."""
        return None


# ---- fused ops: their compositions, and how the graph calls them --------------------------------------------

# Each composition takes the backends serving the fused op's ops (in FUSED_OPS order), then the op's arguments.
def _compose_add_rms_norm(norm: Backend, x: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + delta
    return s, norm.rms_norm(s, scale, eps)


def _compose_rope_attention(rope: Backend, attention: Backend, q, k, v, positions, inv_freq, concentration, sinks,
                            k_cache, v_cache, batch, sliding_window, sm_scale) -> torch.Tensor:
    q, k = rope.rope(q, k, positions, inv_freq, concentration)
    return attention.attention(q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale)


_COMPOSITIONS: dict[str, Callable[..., Any]] = {"add_rms_norm": _compose_add_rms_norm,
                                                 "rope_attention": _compose_rope_attention}


def fused_op(ops: dict[str, Backend], name: str) -> Callable[..., Any]:
    """How the graph calls fused op ``name`` (a key of :data:`FUSED_OPS`) given the backend serving each op
    (``ops``, as the model holds them): that backend's fused method when one backend serves all the op's
    ops (its own override, or the base class's default composing its own ops), otherwise the composition of
    the ops, each on the backend that serves it — so per-op selection (RoPE from one engine, attention from
    another) keeps working through the same graph. Cheap: call it per forward."""
    backends = [ops[op] for op in FUSED_OPS[name]]
    if all(b is backends[0] for b in backends):
        return getattr(backends[0], name)
    return functools.partial(_COMPOSITIONS[name], *backends)


# ---- claim enforcement (Backend.__init_subclass__) -----------------------------------------------------

def _num_experts(prepared: Any) -> int | None:
    """Experts in a prepared router gate or expert layer, when its type shows it (engines' own types may not)."""
    if isinstance(prepared, Experts):
        return prepared.num_experts
    if isinstance(prepared, Linear):
        return prepared.weight.shape[0]
    return None


def _format(*layers: ExpertLinear) -> Literal["mxfp4", "dense"]:
    return "mxfp4" if any(e.is_mxfp4 for e in layers) else "dense"


# One guard per op: the same parameters as the op, checking what they show against the claims.
_GUARDS: dict[str, Callable[..., None]] = {
    "prepare_linear": lambda self, weight, bias, dtype, device, *a, **kw: self.check_claims(
        None, device=device, dtype=dtype),
    "prepare_experts": lambda self, mlp1, mlp2, dtype, device, *a, **kw: self.check_claims(
        "experts", device=device, dtype=dtype, num_experts=mlp1.num_experts, expert_format=_format(mlp1, mlp2)),
    "embedding": lambda self, token_ids, weight, *a, **kw: self.check_claims("embedding", weight),
    "rms_norm": lambda self, x, *a, **kw: self.check_claims("rms_norm", x),
    "add_rms_norm": lambda self, x, *a, **kw: self.check_claims("rms_norm", x),  # a part of op "rms_norm"
    "linear": lambda self, x, *a, **kw: self.check_claims("linear", x),
    "rope": lambda self, q, *a, **kw: self.check_claims("rope", q, head_dim=q.shape[-1]),
    "attention": lambda self, q, k, v, sinks, k_cache, v_cache, batch, sliding_window, *a, **kw: self.check_claims(
        "attention", q, head_dim=q.shape[-1], sinks=sinks is not None, sliding_window=sliding_window,
        context=batch.max_context_len),
    "rope_attention": lambda *a, **kw: _check_rope_attention(*a, **kw),  # ops "rope" + "attention"
    "router": lambda self, x, gate, top_k, *a, **kw: self.check_claims(
        "router", x, num_experts=_num_experts(gate), top_k=top_k),
    "experts": lambda self, x, expert_weights, expert_indices, experts, *a, **kw: self.check_claims(
        "experts", x, num_experts=_num_experts(experts), top_k=expert_indices.shape[-1],
        expert_format=_format(experts.mlp1, experts.mlp2) if isinstance(experts, Experts) else None),
}


def _check_rope_attention(self: Backend, q, k, v, positions, inv_freq, concentration, sinks, k_cache, v_cache, batch,
                          sliding_window, *a, **kw) -> None:
    # The union of both ops' claims: each op's own guard, on the arguments that op receives.
    _GUARDS["rope"](self, q, k, positions, inv_freq, concentration)
    _GUARDS["attention"](self, q, k, v, sinks, k_cache, v_cache, batch, sliding_window)


_active = threading.local()  # ids of the engines inside a checked call, per thread


def _enforcing(fn: Callable[..., Any], guard: Callable[..., None]) -> Callable[..., Any]:
    """``fn`` (an op of a Backend subclass), checking its arguments against the claims first."""

    @functools.wraps(fn)
    def op(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enforce_claims or torch.compiler.is_compiling():
            return fn(self, *args, **kwargs)
        active = _active.__dict__.setdefault("ids", set())
        key = id(self)
        if key in active:  # an op called from another op (or through super()) of the same engine
            return fn(self, *args, **kwargs)
        guard(self, *args, **kwargs)
        active.add(key)
        try:
            return fn(self, *args, **kwargs)
        finally:
            active.discard(key)

    op.__claims__ = True  # type: ignore[attr-defined]
    return op


# The base class's default fused ops compose claimed ops; checked first too, so that an engine that does not
# claim all of a fused op's ops refuses it before computing anything (on an unclaimed device, say).
for _name in FUSED_OPS:
    setattr(Backend, _name, _enforcing(getattr(Backend, _name), _GUARDS[_name]))
del _name


_DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.bfloat16: "bfloat16",
                torch.float16: "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    aliases = {"fp64": "float64", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "double": "float64",
               "float": "float32", "half": "float16"}
    name = aliases.get(name, name)
    for dt, n in _DTYPE_NAMES.items():
        if n == name:
            return dt
    raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(_DTYPE_NAMES.values())}")
