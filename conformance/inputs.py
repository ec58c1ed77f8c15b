"""Inputs: hypothesis draws (shapes, scales, a value seed) → tensors, and random canonical weights.

Values come from a ``torch.Generator`` seeded by the draw, generated in float64, then rounded once to
what the engine receives (the canonical bfloat16 for weights, the engine's dtype for activations);
the oracle gets those same values upcast exactly.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from mxmoe.core import mxfp4
from mxmoe.core.weights import AttentionWeights, ExpertLinear, MLPWeights

F64 = torch.float64
SEEDS = st.integers(min_value=0, max_value=2 ** 31 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` and back to float64: the exact values an engine in ``dtype`` receives."""
    return t.to(dtype).to(F64)


def canonical(t: torch.Tensor) -> torch.Tensor:
    """Dense weights as checkpoints hold them: bfloat16."""
    return t.to(torch.bfloat16)


def random_experts(g: torch.Generator, E: int, N: int, K: int, scale: float, dense: bool = False,
                   bias_scale: float = 0.1) -> ExpertLinear:
    """One expert linear layer (E, N, K): MXFP4 (quantized from Gaussians) or dense bfloat16."""
    w = randn(g, E, N, K, scale=scale)
    bias = canonical(randn(g, E, N, scale=bias_scale))
    if dense:
        return ExpertLinear(bias=bias, weight=canonical(w))
    blocks, scales = mxfp4.quantize(w.float())
    return ExpertLinear(bias=bias, blocks=blocks, scales=scales)


def dense_of(e: ExpertLinear) -> torch.Tensor:
    return e.dense(F64)


def routing(g: torch.Generator, T: int, E: int, k: int, mode: str = "random",
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (T, k) in ``dtype``, indices (T, k) int64, distinct per row) as a router would give them."""
    if mode == "one_expert":  # every token's first choice is the same expert
        rest = torch.stack([torch.randperm(E - 1, generator=g)[:k - 1] for _ in range(T)]) if k > 1 \
            else torch.empty(T, 0, dtype=torch.int64)
        target = int(torch.randint(E, (1,), generator=g))
        rest = rest + (rest >= target).long()
        idx = torch.cat((torch.full((T, 1), target, dtype=torch.int64), rest), dim=1)
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.softmax(randn(g, T, k), dim=-1).to(dtype)
    return w, idx


def random_model(config, seed: int, logit_scale: float = 2.0, expert_bias_scale: float = 0.1):
    """Random canonical weights for ``config`` (bf16 dense, MXFP4 experts), deterministic in ``seed``.

    Scales keep activations O(1) through the blocks and logits with a spread of about ``logit_scale``,
    so greedy decoding has clear winners as well as near-ties.
    """
    from mxmoe.core.weights import AttentionWeights, BlockWeights, MLPWeights, ModelWeights

    g = generator(seed)
    c = config
    D, Q, KV = c.hidden_size, c.q_dim, c.kv_dim

    def norm() -> torch.Tensor:
        return canonical(1.0 + randn(g, D, scale=0.1))

    blocks = []
    for _ in range(c.num_hidden_layers):
        attn = AttentionWeights(norm_scale=norm(), qkv_weight=canonical(randn(g, Q + 2 * KV, D, scale=D ** -0.5)),
                                qkv_bias=canonical(randn(g, Q + 2 * KV, scale=0.1)),
                                sinks=canonical(randn(g, c.num_attention_heads)),
                                out_weight=canonical(randn(g, D, Q, scale=Q ** -0.5)),
                                out_bias=canonical(randn(g, D, scale=0.1)))
        mlp = MLPWeights(norm_scale=norm(), gate_weight=canonical(randn(g, c.num_experts, D, scale=D ** -0.5)),
                         gate_bias=canonical(randn(g, c.num_experts, scale=0.1)),
                         mlp1=random_experts(g, c.num_experts, 2 * c.intermediate_size, D, 2 * D ** -0.5,
                                             bias_scale=expert_bias_scale),
                         mlp2=random_experts(g, c.num_experts, D, c.intermediate_size, c.intermediate_size ** -0.5,
                                             bias_scale=expert_bias_scale))
        blocks.append(BlockWeights(attn, mlp))
    return ModelWeights(embedding=canonical(randn(g, c.vocab_size, D)), blocks=blocks, norm_scale=norm(),
                        unembedding=canonical(randn(g, c.vocab_size, D, scale=logit_scale * D ** -0.5)))


# ---- real-sized weights (gpt-oss's own dimensions), made cheaply -------------------------------------------
#
# Gaussians quantized to MXFP4 cost seconds per expert at gpt-oss's sizes (128 experts × 25M values for
# 120b); the real-shape cases draw the packed bytes directly instead: uniform E2M1 codes (RMS 2.93) and
# per-block scales around the power of two that gives the wanted RMS. Dense weights of the true vocabulary
# (580M values) come from int8 integers times a power of two, exact in bfloat16.

E2M1_RMS = math.sqrt(sum(v * v for v in mxfp4.E2M1_VALUES) / 16)  # of uniformly drawn codes


def random_experts_packed(g: torch.Generator, E: int, N: int, K: int, scale: float,
                          bias_scale: float = 0.1) -> ExpertLinear:
    """MXFP4 experts (E, N, K) drawn as bytes: values of RMS about ``scale``, scales within ±1 of it."""
    base = mxfp4.SCALE_BIAS + round(math.log2(scale / E2M1_RMS))
    blocks = torch.randint(256, (E, N, K // 32, 16), generator=g, dtype=torch.uint8)
    scales = (torch.randint(-1, 2, (E, N, K // 32), generator=g, dtype=torch.int16) + base).to(torch.uint8)
    return ExpertLinear(bias=canonical(randn(g, E, N, scale=bias_scale)), blocks=blocks, scales=scales)


def random_dense_exact(g: torch.Generator, N: int, K: int, scale: float) -> torch.Tensor:
    """(N, K) bfloat16 with RMS about ``scale``: int8 integers times a power of two (exact in bf16)."""
    step = 2.0 ** round(math.log2(scale / 73.9))  # 73.9: RMS of a uniform int8
    return torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8).to(torch.bfloat16).mul_(step)


@functools.lru_cache(maxsize=1)
def real_attention_weights(config, seed: int) -> AttentionWeights:
    """One layer's attention weights at ``config``'s sizes (cached: every dtype of a run reuses them)."""
    g = generator(seed)
    D, Q, KV = config.hidden_size, config.q_dim, config.kv_dim
    return AttentionWeights(norm_scale=canonical(1.0 + randn(g, D, scale=0.1)),
                            qkv_weight=canonical(randn(g, Q + 2 * KV, D, scale=D ** -0.5)),
                            qkv_bias=canonical(randn(g, Q + 2 * KV, scale=0.1)),
                            sinks=canonical(randn(g, config.num_attention_heads)),
                            out_weight=canonical(randn(g, D, Q, scale=Q ** -0.5)),
                            out_bias=canonical(randn(g, D, scale=0.1)))


@functools.lru_cache(maxsize=2)  # gpt-oss-20b's and 120b's
def real_mlp_weights(config, seed: int, favoured: int = 0) -> MLPWeights:
    """One layer's router and MXFP4 experts at ``config``'s sizes (cached). ``favoured`` > 0: the router's
    biases favour that many experts spread over the whole index range (first and last included), so a
    prompt of hundreds of tokens reaches expert indices up to E-1 while the float64 oracle dequantizes
    only those experts."""
    g = generator(seed)
    E, D, I = config.num_experts, config.hidden_size, config.intermediate_size
    gate_bias = randn(g, E, scale=0.1)
    if favoured:
        chosen = torch.linspace(0, E - 1, favoured).round().long()
        gate_bias[chosen] += 8.0
    return MLPWeights(norm_scale=canonical(1.0 + randn(g, D, scale=0.1)),
                      gate_weight=canonical(randn(g, E, D, scale=D ** -0.5)), gate_bias=canonical(gate_bias),
                      mlp1=random_experts_packed(g, E, 2 * I, D, 2 * D ** -0.5),
                      mlp2=random_experts_packed(g, E, D, I, I ** -0.5))


@dataclass
class CachedExperts(ExpertLinear):
    """An MXFP4 :class:`ExpertLinear` that keeps each expert's dequantized weight (bfloat16, exact) once made,
    so the oracle and the simulated engines of one case dequantize each expert once, not once per run.
    Only for scales below 253, where bfloat16 holds every value (checked)."""

    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.is_mxfp4 or int(self.scales.max()) >= 253:
            raise ValueError("CachedExperts holds MXFP4 experts whose scales stay below 253")

    @classmethod
    def of(cls, e: ExpertLinear, dtype: torch.dtype = F64) -> "CachedExperts":
        return cls(bias=e.bias.to(dtype), blocks=e.blocks, scales=e.scales)

    def expert_weight(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        w = self._cache.get(e)
        if w is None:
            w = self._cache[e] = mxfp4.dequantize(self.blocks[e], self.scales[e], torch.bfloat16)
        return w.to(dtype)
