"""Inputs: hypothesis draws (shapes, scales, a value seed) → tensors, and random canonical weights.

Values come from a ``torch.Generator`` seeded by the draw, generated in float64, then rounded once to
what the engine receives (the canonical bfloat16 for weights, the engine's dtype for activations);
the oracle gets those same values upcast exactly.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from mxmoe.core import mxfp4
from mxmoe.core.weights import ExpertLinear

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
