"""Canonical weights: what every checkpoint layout loads into, named after the original checkpoint.

Tensors stay exactly as stored (memory-mapped bf16 dense weights, MXFP4 expert bytes untouched);
each backend converts them once, in ``prepare_*``, into the layout its kernels want.

Shape legend: V vocab, D hidden_size, I intermediate_size, E experts, Hq/Hkv query/KV heads,
d head_dim, Q = Hq*d, KV = Hkv*d.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import mxfp4


@dataclass
class ExpertLinear:
    """One linear layer of every expert: ``y = W_e x + b_e`` with ``W_e`` of shape (N, K).

    Either MXFP4 (``blocks`` (E, N, K/32, 16) uint8 + ``scales`` (E, N, K/32) uint8 E8M0) or dense
    (``weight`` (E, N, K), the Hugging Face bf16 layout after transposing to (N, K) per expert).
    """

    bias: torch.Tensor  # (E, N)
    blocks: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.weight is None) == (self.blocks is None and self.scales is None):
            raise ValueError("ExpertLinear needs either MXFP4 blocks+scales or a dense weight, not both/neither")
        if self.weight is None and (self.blocks is None or self.scales is None):
            raise ValueError("ExpertLinear in MXFP4 needs both blocks and scales")

    @property
    def is_mxfp4(self) -> bool:
        return self.blocks is not None

    @property
    def num_experts(self) -> int:
        return self.bias.shape[0]

    @property
    def out_features(self) -> int:  # N
        return self.bias.shape[1]

    @property
    def in_features(self) -> int:  # K
        if self.weight is not None:
            return self.weight.shape[2]
        return self.blocks.shape[2] * mxfp4.VALUES_PER_BLOCK

    def expert_weight(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert ``e``'s weight (N, K) in ``dtype``, dequantized on the fly (exact for bf16 and wider)."""
        if self.weight is not None:
            # Contiguous like a dequantized weight, so both layouts take the same matmul path and give
            # bit-identical results (HF stores experts transposed; ``weight`` is a view of that).
            return self.weight[e].to(dtype).contiguous()
        return mxfp4.dequantize(self.blocks[e], self.scales[e], dtype)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """All experts dense (E, N, K). Memory-hungry: for writers and tests, not for inference."""
        if self.weight is not None:
            return self.weight.to(dtype)
        return mxfp4.dequantize(self.blocks, self.scales, dtype)


@dataclass
class AttentionWeights:
    norm_scale: torch.Tensor  # (D,)
    qkv_weight: torch.Tensor  # (Q + 2 KV, D): q, k, v rows concatenated
    qkv_bias: torch.Tensor  # (Q + 2 KV,)
    sinks: torch.Tensor  # (Hq,) learned per-head logit of the "sink" that absorbs attention mass
    out_weight: torch.Tensor  # (D, Q)
    out_bias: torch.Tensor  # (D,)


@dataclass
class MLPWeights:
    norm_scale: torch.Tensor  # (D,)
    gate_weight: torch.Tensor  # (E, D) router
    gate_bias: torch.Tensor  # (E,)
    mlp1: ExpertLinear  # N = 2I (gate and linear rows interleaved), K = D
    mlp2: ExpertLinear  # N = D, K = I


@dataclass
class BlockWeights:
    attn: AttentionWeights
    mlp: MLPWeights


@dataclass
class ModelWeights:
    embedding: torch.Tensor  # (V, D)
    blocks: list[BlockWeights] = field(default_factory=list)
    norm_scale: torch.Tensor | None = None  # (D,)
    unembedding: torch.Tensor | None = None  # (V, D)
