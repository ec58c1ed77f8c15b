"""``triton`` — the engine for NVIDIA GPUs: its own Triton kernels, MXFP4 experts kept 4-bit.

Which file holds what:

* ``ops.py`` — embedding gather, RMSNorm and the fused residual add + RMSNorm (``add_rms_norm``, Backend API
  1.2), YaRN RoPE, the router's top-k + softmax, each beside its reference;
* ``linear.py`` — a GEMV for the dense layers at few tokens (one launch, no split-K reduce kernel);
* ``moe.py`` — the MXFP4 expert MLP (W4A16, SwiGLU fused), weights re-laid out once at load;
* ``attention.py`` — attention with sinks, sliding window and GQA over the caller's KV cache, and RoPE + the
  cache write + decode attention fused in one kernel (``rope_attention``, Backend API 1.2).

Dense layers (QKV, output, router logits, unembedding) run ``linear.gemv`` where it beat cuBLAS on the H200
(up to 8 tokens; QKV at 1: ``linear.GEMV_MAX_T``), ``torch.nn.functional.linear`` (cuBLAS) elsewhere.

This module imports without triton (the kernel modules are imported on first use), so registration
never breaks where triton is missing: ``probe`` says why the engine is unavailable instead.
On a CPU the kernels run only in Triton's interpreter (``TRITON_INTERPRET=1``, set before import: that
is how CI checks them); the engine then claims the CPU, and takes a priority below the reference so that
``auto`` never picks the (very slow) interpreter over a real engine.
"""

from __future__ import annotations

import os

import torch

from mxmoe.core.backend import Backend, Capabilities, Linear, NotSupported, Probe
from mxmoe.core.weights import ExpertLinear

INSTALL_HINT = "pip install 'mxmoe[triton]'"
MIN_COMPUTE_CAPABILITY = (8, 0)  # bf16 tensor cores; the kernels use nothing newer


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to interpret kernels on the host (read as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


# Triton reads TRITON_INTERPRET when kernels are defined (at import); the claims follow the same moment.
_INTERPRET_AT_IMPORT = interpreting()


def _ops():
    from . import ops

    return ops


def _moe():
    from . import moe

    return moe


def _linear():
    from . import linear

    return linear


def _attention():
    from . import attention

    return attention


class TritonBackend(Backend):
    name = "triton"
    version = "0.1.0"
    api_version = ">=1.0,<2"
    # Above the reference (10) so that ``auto`` prefers it on CUDA; under the interpreter, below it.
    priority = 1 if _INTERPRET_AT_IMPORT else 30
    capabilities = Capabilities(
        devices=("cuda", "cpu") if _INTERPRET_AT_IMPORT else ("cuda",),
        dtypes=("bfloat16",),
        head_dims=(64,),  # gpt-oss; the attention kernels take powers of two 16..256, checked at 64
        attention_sinks=True,
        sliding_window=True,
        mxfp4="native",
        dense_experts=False,  # Hugging Face bf16 expert checkpoints: served by the torch engine
        cuda_graphs=True,  # every op is launched without a host synchronisation
        determinism="run_to_run",
    )

    def __init__(self) -> None:
        self._checked: set[tuple] = set()  # (op, device, dtype) already found claimed

    # ---- identity and claims -----------------------------------------------------------------------
    def probe(self, device: torch.device | str | None = None) -> Probe:
        try:
            return self._probe(device)
        except Exception as e:  # noqa: BLE001 — a probe answers, it never raises
            return Probe(False, f"probe failed: {type(e).__name__}: {e}")

    def _probe(self, device) -> Probe:
        try:
            import triton  # noqa: F401
        except ModuleNotFoundError:
            return Probe(False, f"triton not installed: {INSTALL_HINT}")
        except Exception as e:  # noqa: BLE001 — a broken install is a reason, not a crash
            return Probe(False, f"triton not importable ({type(e).__name__}: {e}): {INSTALL_HINT}")
        if device is None:
            device = "cpu" if interpreting() and not torch.cuda.is_available() else "cuda"
        device = torch.device(device)
        if device.type == "cpu":
            if not interpreting():
                return Probe(False, "on the CPU the kernels run only in Triton's interpreter: set "
                                    "TRITON_INTERPRET=1 (slow; for tests)")
            if "cpu" not in self.capabilities.devices:
                return Probe(False, "TRITON_INTERPRET=1 was set after mxmoe's triton engine was imported; "
                                    "set it before starting Python")
            return Probe(True, "Triton interpreter (TRITON_INTERPRET=1) on the CPU: slow, for checking")
        if device.type != "cuda":
            return Probe(False, f"device type {device.type!r} is not supported (NVIDIA CUDA GPUs only)")
        if not torch.cuda.is_available():
            return Probe(False, "no CUDA device (torch.cuda.is_available() is False)")
        if getattr(torch.version, "hip", None):
            return Probe(False, "ROCm GPU: this engine's kernels are written and checked for NVIDIA GPUs "
                                "(the megablocks engine serves ROCm)")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            return Probe(False, f"no CUDA device {index} ({torch.cuda.device_count()} present)")
        cc = tuple(torch.cuda.get_device_capability(index))
        if cc < MIN_COMPUTE_CAPABILITY:
            return Probe(False, f"compute capability {cc[0]}.{cc[1]} < "
                                f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]}")
        return Probe(True, f"{torch.cuda.get_device_name(index)}, compute capability {cc[0]}.{cc[1]}")

    def check(self, *, op=None, device=None, dtype=None) -> None:
        # Called by every op: remember what passed, so the per-call cost is one set lookup.
        key = (op, device.type if isinstance(device, torch.device) else device, dtype)
        if key in self._checked:
            return
        if device is not None and torch.device(device).type == "cpu" and "cpu" not in self.capabilities.devices:
            raise NotSupported(self.name, "device 'cpu' (claims cuda; the kernels run on a CPU only in Triton's "
                                          "interpreter: set TRITON_INTERPRET=1 before starting Python)")
        super().check(op=op, device=device, dtype=dtype)
        self._checked.add(key)

    def _check_head_dim(self, d: int) -> None:
        if d not in self.capabilities.head_dims:
            raise NotSupported(self.name, f"head_dim {d} (claims {', '.join(map(str, self.capabilities.head_dims))})")

    # ---- weights -----------------------------------------------------------------------------------
    def prepare_linear(self, weight, bias, dtype, device):
        self.check(op="linear", device=device, dtype=dtype)
        return Linear(weight.to(device=device, dtype=dtype).contiguous(),
                      None if bias is None else bias.to(device=device, dtype=dtype).contiguous())

    def prepare_experts(self, mlp1: ExpertLinear, mlp2: ExpertLinear, dtype, device):
        self.check(op="experts", device=device, dtype=dtype)
        if not (mlp1.is_mxfp4 and mlp2.is_mxfp4):
            raise NotSupported(self.name, "dense (bf16) experts: the kernels compute MXFP4 experts natively; "
                                          "load an MXFP4 checkpoint, or serve the experts with the torch engine")
        return _moe().prepare_moe_weights(mlp1, mlp2, dtype, device)

    # ---- ops ---------------------------------------------------------------------------------------
    def embedding(self, token_ids, weight):
        self.check(op="embedding", device=weight.device, dtype=weight.dtype)
        return _ops().embedding(token_ids, weight)

    def rms_norm(self, x, scale, eps):
        self.check(op="rms_norm", device=x.device, dtype=x.dtype)
        return _ops().rms_norm(x, scale, eps)

    def add_rms_norm(self, x, delta, scale, eps):
        self.check(op="rms_norm", device=x.device, dtype=x.dtype)
        return _ops().add_rms_norm(x, delta, scale, eps)

    def linear(self, x, layer: Linear):
        self.check(op="linear", device=x.device, dtype=x.dtype)
        return self._dense(x, layer)

    @staticmethod
    def _dense(x, layer: Linear):
        """The engine's GEMV for few tokens where it beat cuBLAS on the H200 (linear.GEMV_MAX_T), else cuBLAS.
        On the CPU (interpreter) always ``F.linear``: linear.py's kernels have their own interpreter tests."""
        if x.is_cuda:
            return _linear().linear(x, layer.weight, layer.bias)
        return torch.nn.functional.linear(x, layer.weight, layer.bias)

    def rope(self, q, k, positions, inv_freq, concentration):
        self.check(op="rope", device=q.device, dtype=q.dtype)
        self._check_head_dim(q.shape[-1])
        return _ops().rope(q, k, positions, inv_freq, concentration)

    def attention(self, q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale):
        self.check(op="attention", device=q.device, dtype=q.dtype)
        self._check_head_dim(q.shape[-1])
        return _attention().attention(q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale)

    def rope_attention(self, q, k, v, positions, inv_freq, concentration, sinks, k_cache, v_cache, batch,
                       sliding_window, sm_scale):
        # Ops "rope" and "attention" together (the base class checked the union of their claims): decode in one
        # kernel, prefill composed from the two ops' kernels.
        self.check(op="rope", device=q.device, dtype=q.dtype)
        self.check(op="attention", device=q.device, dtype=q.dtype)
        self._check_head_dim(q.shape[-1])
        return _attention().rope_attention(q, k, v, positions, inv_freq, concentration, sinks, k_cache, v_cache,
                                           batch, sliding_window, sm_scale)

    def router(self, x, gate: Linear, top_k):
        self.check(op="router", device=x.device, dtype=x.dtype)
        logits = self._dense(x, gate)  # (T, E) in x's dtype, as the reference rounds them before the top-k
        return _ops().topk_softmax(logits, top_k)

    def experts(self, x, expert_weights, expert_indices, experts, swiglu_alpha, swiglu_limit):
        self.check(op="experts", device=x.device, dtype=x.dtype)
        return _moe().moe_mxfp4(x, expert_weights, expert_indices, experts, swiglu_alpha, swiglu_limit)


__all__ = ["TritonBackend", "interpreting"]
