"""How a step's tokens are laid out: many sequences flattened into one varlen batch, and the KV cache.

Every op works on T tokens in total from S sequences, flattened (FlashAttention's "varlen" layout).
Prefill and decode are the same call: a decode step is a batch whose sequences have one new token.
The caller owns the KV cache (preallocated, one row per sequence slot) and says, through
``slot_mapping``, where each new token's keys and values go — so a decode step has static shapes and
needs no host synchronisation, and a server can mix requests of different lengths in one launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Batch:
    """Metadata of one forward step. T = new tokens in total, S = sequences."""

    positions: torch.Tensor  # (T,) int64: position of each new token within its sequence
    cu_seqlens: torch.Tensor  # (S+1,) int64: new tokens of sequence s are rows cu_seqlens[s]:cu_seqlens[s+1]
    context_lens: torch.Tensor  # (S,) int64: keys sequence s attends to after this step (cached + new)
    cache_rows: torch.Tensor  # (S,) int64: KV-cache row owned by sequence s
    slot_mapping: torch.Tensor  # (T,) int64: flat cache slot (row * cache_len + position) of each new token
    max_seqlen: int  # host-side maxima, for kernels that size their grids statically
    max_context_len: int

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @staticmethod
    def build(new_lens: Sequence[int], past_lens: Sequence[int], cache_rows: Sequence[int], cache_len: int,
              device: torch.device | str = "cpu") -> "Batch":
        """Batch for sequences that have ``past_lens[s]`` tokens cached and ``new_lens[s]`` new ones."""
        if not (len(new_lens) == len(past_lens) == len(cache_rows)):
            raise ValueError("new_lens, past_lens and cache_rows must have one entry per sequence")
        if any(n <= 0 for n in new_lens):
            raise ValueError(f"every sequence needs at least one new token, got new_lens={list(new_lens)}")
        ends = [p + n for p, n in zip(past_lens, new_lens)]
        if max(ends) > cache_len:
            raise ValueError(f"sequence of {max(ends)} tokens does not fit the KV cache of length {cache_len}")
        positions = [p + i for p, n in zip(past_lens, new_lens) for i in range(n)]
        slots = [r * cache_len + p + i for r, p, n in zip(cache_rows, past_lens, new_lens) for i in range(n)]
        cu = [0]
        for n in new_lens:
            cu.append(cu[-1] + n)

        def t(xs: Sequence[int]) -> torch.Tensor:
            return torch.tensor(list(xs), dtype=torch.int64, device=device)

        return Batch(positions=t(positions), cu_seqlens=t(cu), context_lens=t(ends), cache_rows=t(cache_rows),
                     slot_mapping=t(slots), max_seqlen=max(new_lens), max_context_len=max(ends))

    @staticmethod
    def from_lens(new_lens: torch.Tensor, past_lens: torch.Tensor, cache_rows: torch.Tensor, cache_len: int,
                  num_tokens: int, max_seqlen: int, max_context_len: int) -> "Batch":
        """:meth:`build` from (S,) int64 tensors already on the device, by device ops (no per-token Python
        lists, no host sync). The caller states T = ``num_tokens`` = sum(new_lens) and the host maxima
        (upper bounds are fine) and guarantees what :meth:`build` checks."""
        S = new_lens.shape[0]
        dev = new_lens.device
        cu = torch.zeros(S + 1, dtype=torch.int64, device=dev)
        torch.cumsum(new_lens, 0, out=cu[1:])
        seq = torch.repeat_interleave(torch.arange(S, device=dev), new_lens, output_size=num_tokens)  # (T,)
        positions = past_lens[seq] + torch.arange(num_tokens, device=dev) - cu[seq]
        return Batch(positions=positions, cu_seqlens=cu, context_lens=past_lens + new_lens, cache_rows=cache_rows,
                     slot_mapping=cache_rows[seq] * cache_len + positions, max_seqlen=max_seqlen,
                     max_context_len=max_context_len)


@dataclass
class KVCache:
    """Keys and values of every layer: (num_layers, num_rows, cache_len, Hkv, d), owned by the caller."""

    k: torch.Tensor
    v: torch.Tensor

    @staticmethod
    def allocate(num_layers: int, num_rows: int, cache_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> "KVCache":
        shape = (num_layers, num_rows, cache_len, num_kv_heads, head_dim)
        # NaN-filled: a kernel that reads a slot it never wrote poisons the output instead of hiding.
        return KVCache(torch.full(shape, float("nan"), dtype=dtype, device=device),
                       torch.full(shape, float("nan"), dtype=dtype, device=device))

    @property
    def cache_len(self) -> int:
        return self.k.shape[2]

    @property
    def num_rows(self) -> int:
        return self.k.shape[1]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]
