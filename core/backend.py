"""The Backend interface: what an engine declares (identity, capabilities) and the ops it implements.

The model graph (core/model.py) calls only these ops, each through the backend that serves it; engines
never see the graph. Every op takes a varlen batch (core/batch.py): T tokens of S sequences flattened.

Shape legend: T tokens, S sequences, D hidden, V vocab, E experts, k experts per token,
Hq/Hkv query/KV heads, d head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from .batch import Batch
from .weights import ExpertLinear

# Semantic version of this interface. A backend declares the range it was written for
# (``Backend.api_version``, e.g. ">=1.0,<2"); a major bump means an incompatible change.
BACKEND_API_VERSION = "1.0.0"

# The ops an engine may serve; per-op overrides name these.
OPS: tuple[str, ...] = ("embedding", "rms_norm", "linear", "rope", "attention", "router", "experts")


class NotSupported(Exception):
    """Raised when a backend is asked for something it does not claim (op, dtype, device, shape, ...)."""

    def __init__(self, backend: str, what: str):
        super().__init__(f"backend {backend!r} does not support {what}")
        self.backend = backend
        self.what = what


class Capabilities(BaseModel):
    """What a backend claims, as data. Anything not claimed must raise :class:`NotSupported`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ops: tuple[str, ...] = OPS
    devices: tuple[str, ...] = ("cpu",)  # torch device types: "cpu", "cuda" (ROCm builds report "cuda" too)
    dtypes: tuple[str, ...] = ("float32",)  # activation dtypes: "float64", "float32", "bfloat16", ...
    head_dims: tuple[int, ...] | None = None  # None = any
    attention_sinks: bool = True
    sliding_window: bool = True
    mxfp4: Literal["native", "dequantized", "none"] = "none"  # how MXFP4 experts are computed
    dense_experts: bool = True  # accepts experts stored dense (the Hugging Face bf16 layout)
    max_experts: int | None = None
    max_experts_per_token: int | None = None
    max_context: int | None = None
    cuda_graphs: bool = False  # decode ops are capturable (no host sync, static shapes)
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


class Backend:
    """Base class of every engine. Subclasses set the class attributes and override the ops they claim.

    An op a backend does not override raises :class:`NotSupported` — the interface's way of saying
    "not offered", so the selection layer can route that op elsewhere.
    """

    name: ClassVar[str] = "abstract"
    version: ClassVar[str] = "0"
    api_version: ClassVar[str] = ">=1.0,<2"  # range of BACKEND_API_VERSION this engine was written for
    priority: ClassVar[int] = 0  # higher wins under ``auto``
    capabilities: ClassVar[Capabilities] = Capabilities()

    def probe(self, device: torch.device | str | None = None) -> Probe:
        """Can this engine run here? Must not raise for a missing dependency or device: say why instead."""
        return Probe(True)

    def check(self, *, op: str | None = None, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> None:
        """Raise :class:`NotSupported` unless the capabilities claim ``op`` on ``device`` in ``dtype``."""
        caps = self.capabilities
        if op is not None and op not in caps.ops:
            raise NotSupported(self.name, f"op {op!r} (claims {', '.join(caps.ops)})")
        if device is not None and torch.device(device).type not in caps.devices:
            raise NotSupported(self.name, f"device {torch.device(device).type!r} (claims {', '.join(caps.devices)})")
        if dtype is not None and dtype_name(dtype) not in caps.dtypes:
            raise NotSupported(self.name, f"dtype {dtype_name(dtype)} (claims {', '.join(caps.dtypes)})")

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
        """(T, D) → (T, D): ``x / sqrt(mean(x²) + eps) * scale``, computed in at least float32."""
        raise NotSupported(self.name, "op 'rms_norm'")

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
