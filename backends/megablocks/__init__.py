"""``megablocks`` — dropless MoE over bf16 experts, the path for GPUs without FP4 matrix units (AMD Instinct).

MegaBlocks' dMoE without its capacity factor: (token, expert) pairs sorted by expert, histogram and prefix
sums, rows gathered expert-contiguous, a grouped matmul per expert, SwiGLU, a second grouped matmul with
biases, scattered back weighted by the routing weights (moe.py). No token is ever dropped.

* Weights: MXFP4 experts dequantized to the activation dtype exactly (core/mxfp4.py), either all at load
  ("resident") or, when they would not fit the device, per layer into a reusable workspace ("workspace":
  only the routed experts, before each call). ``auto`` decides per layer at load from free memory
  (moe.choose_mode); ``MegaBlocksBackend(weight_mode=...)`` or ``MXMOE_MEGABLOCKS_WEIGHTS`` forces one.
  The mode in use is ``engine.weight_mode`` (the Capabilities model has no field for it; ``notes`` says it too).
  Dense (Hugging Face bf16) experts are taken directly and always resident.
* Kernels: ``torch`` (a loop over non-empty experts; bit-identical to the reference engine), ``grouped_mm``
  (``torch._grouped_mm``, where this torch has it for the device and dtype, else the loop) and ``triton`` (kernels.py,
  portable Triton: no TMA, no warp specialisation, no wgmma). ``auto``: triton on a GPU when triton
  imports, torch otherwise; ``MegaBlocksBackend(kernel=...)`` or ``MXMOE_MEGABLOCKS_KERNEL`` forces one.
* Ops: router and experts; attention too on a GPU, through the triton engine's portable sinks +
  sliding-window kernel, when that module and triton are there. Every other op goes to another engine.

It has NOT run on AMD hardware: it is checked on CPUs (CI) and NVIDIA GPUs only.

This module imports without triton; kernels.py is imported only when the triton kernel is used.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import torch

from mxmoe.core import mxfp4
from mxmoe.core.backend import Backend, Capabilities, Linear, NotSupported, Probe, dtype_name
from mxmoe.core.weights import ExpertLinear

from . import moe

log = logging.getLogger("mxmoe.backends.megablocks")

ENV_WEIGHTS = "MXMOE_MEGABLOCKS_WEIGHTS"  # auto | resident | workspace
ENV_KERNEL = "MXMOE_MEGABLOCKS_KERNEL"  # auto | torch | grouped_mm | triton
WEIGHT_MODES = ("auto", "resident", "workspace")
KERNELS = ("auto", "torch", "grouped_mm", "triton")
_ATTENTION_MODULE = "mxmoe.backends.triton_engine.attention"
ROCM = torch.version.hip is not None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError, AttributeError):  # e.g. a module blocked by sys.modules[name] = None
        return False


# Attention is claimed only where the portable kernel can run: a GPU, triton, and the triton engine's module.
# Capabilities are class-level data, so this is decided once, at import.
_CLAIMS_ATTENTION = torch.cuda.is_available() and _has_module("triton") and _has_module(_ATTENTION_MODULE)

NOTES = ("dropless MoE (sort, grouped GEMM, scatter) over experts dequantized to bf16/float32; weight mode per "
         "layer (resident at load, or per-layer workspace when memory is short): see engine.weight_mode; "
         "NOT run on AMD hardware yet (checked on CPU and NVIDIA only)")


class MegaBlocksBackend(Backend):
    """The megablocks engine. ``weight_mode``: auto | resident | workspace; ``kernel``: auto | torch |
    grouped_mm | triton (defaults from ``MXMOE_MEGABLOCKS_WEIGHTS`` / ``MXMOE_MEGABLOCKS_KERNEL``, else auto).
    Not yet run on AMD hardware."""

    name = "megablocks"
    version = "0.1.0"
    api_version = ">=1.0,<2"
    # Built for ROCm, where there is no FP4 matrix unit and the triton engine's MXFP4 kernels are not
    # the path: there ``auto`` should prefer it (above triton's 30). Elsewhere it is for verification:
    # below the reference (10) and the compile plugin (5, no tie), so it serves only when asked for by name.
    priority = 40 if ROCM else 4
    notes = NOTES
    capabilities = Capabilities(
        ops=("attention", "router", "experts") if _CLAIMS_ATTENTION else ("router", "experts"),
        devices=("cpu", "cuda"),  # ROCm builds report "cuda" too
        dtypes=("float32", "bfloat16"),
        head_dims=(64,) if _CLAIMS_ATTENTION else None,  # the portable attention kernel's head dim
        attention_sinks=_CLAIMS_ATTENTION,
        sliding_window=_CLAIMS_ATTENTION,
        mxfp4="dequantized",
        dense_experts=True,
        cuda_graphs=False,  # the torch kernel and the workspace mode synchronise with the host
        determinism="bitwise",  # no atomics, a fixed order of sums: the same bits, also from a fresh load
    )

    def __init__(self, weight_mode: str | None = None, kernel: str | None = None):
        weight_mode = (weight_mode or os.environ.get(ENV_WEIGHTS) or "auto").strip().lower()
        kernel = (kernel or os.environ.get(ENV_KERNEL) or "auto").strip().lower()
        if weight_mode not in WEIGHT_MODES:
            raise ValueError(f"megablocks: weight_mode {weight_mode!r} (from the argument or ${ENV_WEIGHTS}); "
                             f"expected one of {', '.join(WEIGHT_MODES)}")
        if kernel not in KERNELS:
            raise ValueError(f"megablocks: kernel {kernel!r} (from the argument or ${ENV_KERNEL}); "
                             f"expected one of {', '.join(KERNELS)}")
        self.requested_weight_mode = weight_mode
        self.requested_kernel = kernel
        self.workspace = moe.Workspace()
        self.layer_modes: list[str] = []  # mode of each layer prepared by this instance, in order
        self._layer_bytes = 0
        self._workspace_only = False  # auto switched to the workspace: later layers follow
        self._kernels: dict[tuple, str] = {}

    # ---- what is in use -----------------------------------------------------------------------------
    @property
    def weight_mode(self) -> str:
        """"resident", "workspace", "mixed (n of m layers resident)", or "none" before any layer is prepared."""
        if not self.layer_modes:
            return "none"
        n = self.layer_modes.count("resident")
        if n == len(self.layer_modes):
            return "resident"
        if n == 0:
            return "workspace"
        return f"mixed ({n} of {len(self.layer_modes)} layers resident)"

    def memory(self) -> dict[str, Any]:
        """Bytes this instance holds for experts: per-layer weights (resident dense or packed) + workspace."""
        return {"weight_mode": self.weight_mode, "layers": len(self.layer_modes),
                "layers_resident": self.layer_modes.count("resident"), "layer_bytes": self._layer_bytes,
                "workspace_bytes": self.workspace.nbytes, "total_bytes": self._layer_bytes + self.workspace.nbytes}

    def kernel_for(self, device: torch.device | str, dtype: torch.dtype) -> str:
        """The grouped-GEMM kernel used on ``device`` in ``dtype`` (what ``auto`` resolves to)."""
        device = torch.device(device)
        key = (device.type, dtype)
        if key not in self._kernels:
            k = self.requested_kernel
            if k == "auto":
                k = "triton" if device.type == "cuda" and _has_module("triton") else "torch"
            elif k == "grouped_mm":
                ok, why = moe.grouped_mm_usable(device, dtype)
                if not ok:  # e.g. float32 on CUDA: the same op through the loop, never a refusal of a claim
                    log.warning("megablocks: kernel 'grouped_mm' not usable on %s in %s (%s); using 'torch'",
                                device.type, dtype_name(dtype), why)
                    k = "torch"
            elif k == "triton" and not _has_module("triton"):
                raise NotSupported(self.name, "kernel 'triton': triton is not installed")
            self._kernels[key] = k
        return self._kernels[key]

    # ---- availability -------------------------------------------------------------------------------
    def probe(self, device=None):
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            return Probe(False, "no CUDA/ROCm device (torch.cuda.is_available() is False)")
        if self.requested_kernel == "triton" and not _has_module("triton"):
            return Probe(False, "kernel 'triton' requested but triton is not installed")
        if self.requested_kernel == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
            return Probe(False, f"kernel 'grouped_mm' requested but torch {torch.__version__} has no _grouped_mm")
        where = "ROCm build" if ROCM else "not run on AMD hardware yet"
        return Probe(True, f"kernel {self.requested_kernel}, weights {self.requested_weight_mode} ({where})")

    # ---- weights ------------------------------------------------------------------------------------
    def prepare_linear(self, weight, bias, dtype, device):
        """The router's gate (the only dense layer this engine serves)."""
        self.check(op="router", device=device, dtype=dtype)
        return Linear(weight.to(device=device, dtype=dtype),
                      None if bias is None else bias.to(device=device, dtype=dtype))

    def prepare_experts(self, mlp1: ExpertLinear, mlp2: ExpertLinear, dtype, device) -> moe.MegaBlocksExperts:
        self.check(op="experts", device=device, dtype=dtype)
        device = torch.device(device)
        if mlp1.num_experts != mlp2.num_experts:
            raise NotSupported(self.name, f"mlp1 with {mlp1.num_experts} experts and mlp2 with {mlp2.num_experts}")
        if mlp1.out_features != 2 * mlp2.in_features or mlp2.out_features != mlp1.in_features:
            raise ValueError(f"megablocks: mlp1 ({mlp1.out_features}, {mlp1.in_features}) and mlp2 "
                             f"({mlp2.out_features}, {mlp2.in_features}) do not chain as (2I, D) and (D, I)")
        E = mlp1.num_experts
        b1 = mlp1.bias.to(device=device, dtype=dtype)
        b2 = mlp2.bias.to(device=device, dtype=dtype)
        mode = self._mode_for(mlp1, mlp2, dtype, device)
        if mode == "resident":
            layer = moe.MegaBlocksExperts("resident", dtype, E, b1, b2, w1=self._dense(mlp1, dtype, device),
                                          w2=self._dense(mlp2, dtype, device))
        else:
            def packed(e: ExpertLinear) -> ExpertLinear:
                return ExpertLinear(bias=e.bias, blocks=e.blocks.to(device), scales=e.scales.to(device))

            layer = moe.MegaBlocksExperts("workspace", dtype, E, b1, b2, mlp1=packed(mlp1), mlp2=packed(mlp2),
                                          workspace=self.workspace)
            # Allocated now, so that load-time memory is what inference needs (and a failure shows at load).
            for name, e in (("mlp1", mlp1), ("mlp2", mlp2)):
                self.workspace.get(name, (E, e.out_features, e.in_features), dtype, device)
        self.layer_modes.append(mode)
        self._layer_bytes += layer.nbytes
        return layer

    def _mode_for(self, mlp1: ExpertLinear, mlp2: ExpertLinear, dtype, device) -> str:
        if not (mlp1.is_mxfp4 and mlp2.is_mxfp4):
            return "resident"  # dense checkpoints are already bf16: nothing to save by packing
        if self.requested_weight_mode != "auto":
            return self.requested_weight_mode
        if self._workspace_only:
            return "workspace"
        need = moe.dense_bytes(mlp1, mlp2, dtype)
        mode = moe.choose_mode(need, need, self.device_memory(device))
        self._workspace_only = mode == "workspace"
        return mode

    def device_memory(self, device: torch.device) -> tuple[int, int] | None:
        """(free, total) bytes where the experts go (a method, so tests can pretend a small device)."""
        return moe.device_memory(device)

    @staticmethod
    def _dense(e: ExpertLinear, dtype, device) -> torch.Tensor:
        if e.weight is not None:
            return e.weight.to(device=device, dtype=dtype).contiguous()
        # Dequantized on the device (fast on a GPU; exact either way), one expert at a time so the
        # temporary stays one expert's size.
        out = torch.empty(e.num_experts, e.out_features, e.in_features, dtype=dtype, device=device)
        for i in range(e.num_experts):
            out[i] = mxfp4.dequantize(e.blocks[i].to(device), e.scales[i].to(device), dtype)
        return out

    # ---- ops ----------------------------------------------------------------------------------------
    def router(self, x, gate: Linear, top_k):
        self.check(op="router", device=x.device, dtype=x.dtype)
        logits = torch.nn.functional.linear(x, gate.weight, gate.bias)  # (T, E)
        # A stable sort breaks ties toward the lower expert index (torch.topk does not promise it).
        values, indices = torch.sort(logits, dim=-1, descending=True, stable=True)
        values, indices = values[:, :top_k], indices[:, :top_k]
        return torch.softmax(values, dim=-1), indices

    def experts(self, x, expert_weights, expert_indices, experts: moe.MegaBlocksExperts, swiglu_alpha,
                swiglu_limit):
        self.check(op="experts", device=x.device, dtype=x.dtype)
        if not isinstance(experts, moe.MegaBlocksExperts):
            raise NotSupported(self.name, f"experts prepared by another engine ({type(experts).__name__})")
        if x.dtype != experts.dtype:
            raise NotSupported(self.name, f"activations in {x.dtype} for experts prepared in {experts.dtype}")
        routing = moe.sort_by_expert(expert_weights, expert_indices, experts.num_experts)
        w1, w2 = experts.dense_weights(routing)
        return moe.dropless_moe(x, expert_weights, expert_indices, w1, experts.b1, w2, experts.b2, swiglu_alpha,
                                swiglu_limit, kernel=self.kernel_for(x.device, x.dtype), routing=routing)

    def attention(self, q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale):
        self.check(op="attention")
        self.check(device=q.device, dtype=q.dtype)
        if q.shape[-1] not in (self.capabilities.head_dims or ()):
            raise NotSupported(self.name, f"head_dim {q.shape[-1]} (claims {self.capabilities.head_dims})")
        import importlib

        # The triton engine's portable kernel where Triton can run it (a GPU, or its interpreter), else
        # that kernel's plain-PyTorch reference (same signature).
        kernels = importlib.import_module(_ATTENTION_MODULE)
        interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
        attention = kernels.attention if q.device.type == "cuda" or interpreting else kernels.attention_ref
        return attention(q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale)


__all__ = ["MegaBlocksBackend", "ENV_WEIGHTS", "ENV_KERNEL", "NOTES"]
