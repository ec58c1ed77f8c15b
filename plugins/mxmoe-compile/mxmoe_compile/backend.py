"""``compile`` — the reference engine's ops run through ``torch.compile``.

Pure ops are the reference methods, compiled whole. Attention and the experts keep the reference's
loop over sequences / experts in Python (it is data-dependent) and compile each iteration's body: the
reference's own public functions ``attention_one_sequence`` and ``expert_mlp`` (see
mxmoe/backends/reference.py), so the math is written once.

Shape legend: T tokens, D hidden, d head_dim, Hq/Hkv query/KV heads, n tokens of one sequence (or
routed to one expert), L keys of one sequence, I intermediate.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Any, Callable

import torch

from mxmoe.backends.reference import TorchBackend, attention_one_sequence, expert_mlp
from mxmoe.core.backend import Probe

ENV_COMPILER = "MXMOE_COMPILE_BACKEND"  # the torch.compile backend; default "inductor"

_REF = TorchBackend()


def compiler() -> str:
    return os.environ.get(ENV_COMPILER, "").strip() or "inductor"


class _Compiled:
    """``torch.compile(fn)``, made on first call so that importing this plugin never fails."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn, self.compiled, self.backend = fn, None, None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None or self.backend != compiler():
            self.backend = compiler()
            # dynamic: one graph for every number of tokens, so prefill and decode share it.
            self.compiled = torch.compile(self.fn, backend=self.backend, dynamic=True)
        return self.compiled(*args)


# ---- the compiled pieces ---------------------------------------------------------------------------
_embedding = _Compiled(_REF.embedding)
_rms_norm = _Compiled(_REF.rms_norm)
_linear = _Compiled(_REF.linear)
_rope = _Compiled(_REF.rope)
_router = _Compiled(_REF.router)


# The body of the reference's loops, one sequence / one expert at a time.
_sequence_attention = _Compiled(attention_one_sequence)
_expert_mlp = _Compiled(expert_mlp)


class CompileBackend(TorchBackend):
    name = "compile"
    version = "0.1.0"
    api_version = ">=1.0,<2"
    priority = 5  # below the reference: compiling costs seconds per op, so it is chosen by name only
    # Same claims as the reference, except that fused kernels round differently (not bitwise).
    capabilities = TorchBackend.capabilities.model_copy(update={"determinism": "run_to_run"})

    def probe(self, device: torch.device | str | None = None) -> Probe:
        try:
            from torch._dynamo import is_dynamo_supported

            if not is_dynamo_supported():
                return Probe(False, "torch.compile (dynamo) is not supported on this Python/platform")
        except Exception as e:  # a broken torch install is a reason, not a crash
            return Probe(False, f"torch.compile unusable: {type(e).__name__}: {e}")
        kind = torch.device(device or "cpu").type
        if kind == "cuda" and not torch.cuda.is_available():
            return Probe(False, "no CUDA device")
        backend = compiler()
        if backend != "inductor":
            from torch._dynamo import list_backends

            if backend not in list_backends(exclude_tags=()):
                return Probe(False, f"{ENV_COMPILER}={backend!r} is not a torch.compile backend")
            return Probe(True, f"torch.compile backend {backend!r}")
        if kind == "cpu":
            cxx = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)]
            if not cxx:
                return Probe(False, "inductor needs a C++ compiler on the CPU and none was found (set CXX or "
                                    f"install g++), or set {ENV_COMPILER}=aot_eager")
            return Probe(True, f"torch.compile with inductor, C++ compiler {cxx[0]}")
        if kind == "cuda" and importlib.util.find_spec("triton") is None:
            return Probe(False, "inductor needs triton on CUDA and it is not installed")
        return Probe(True, f"torch.compile with inductor on {kind}")

    # Attention and the experts: the reference's loops, with each iteration's body compiled.
    @staticmethod
    def attention_one_sequence(*args):
        return _sequence_attention(*args)

    @staticmethod
    def expert_mlp(*args):
        return _expert_mlp(*args)

    # ---- ops (weights are prepared exactly as the reference does) ---------------------------------
    def embedding(self, token_ids, weight):
        return _embedding(token_ids, weight)

    def rms_norm(self, x, scale, eps):
        return _rms_norm(x, scale, eps)

    def linear(self, x, layer):
        return _linear(x, layer)

    def rope(self, q, k, positions, inv_freq, concentration):
        return _rope(q, k, positions, inv_freq, concentration)

    def router(self, x, gate, top_k):
        return _router(x, gate, top_k)
