"""The gpt-oss model graph, once, for every engine.

    token ids ─▶ embedding ─▶ N × [ RMSNorm ─▶ QKV ─▶ RoPE + KV-cache write + attention (sinks; banded window
                                   on even layers) ─▶ out ─▶ +residual
                                   RMSNorm ─▶ router top-k ─▶ experts (SwiGLU) ─▶ +residual ]
              ─▶ RMSNorm ─▶ unembedding ─▶ logits

Each ``+residual`` runs fused with the RMSNorm after it (``add_rms_norm``: a block's output is the ``delta``
added to the residual stream by the next block's norm, or by the final one); only the first layer's
attention norm is a plain ``rms_norm``. The final add + norm runs on the logits rows only. RoPE and
attention are one fused op (``rope_attention``: the rotated keys go into the cache inside it).

Every tensor op goes through the backend that serves it (``ops[name]``); a fused op goes through
``fused_op`` (core/backend.py): fused where one backend serves all of its ops, composed op by op on
their own backends otherwise. The graph never branches on device. One call runs T tokens of S sequences
(core/batch.py): prefill and decode are the same path.
Sharded over ranks (core/parallel.py), the graph is the same: it runs this rank's heads and expert slices
and calls the collectives of ``self.comm`` where partial results meet (the identity in one process).

Shape legend: T tokens, S sequences, D hidden, V vocab, Hq/Hkv heads, d head_dim.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .backend import Backend, fused_op, parse_dtype
from .batch import Batch, KVCache
from .config import ModelConfig
from .parallel import SINGLE_PROCESS, Communicator, ExpertParallel, ShardPlan
from .rope import yarn_inv_freq
from .weights import ModelWeights


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    qkv: Any  # prepared by ops["linear"]
    sinks: torch.Tensor
    out: Any  # prepared by ops["linear"]
    sliding_window: int
    mlp_norm: torch.Tensor
    gate: Any  # prepared by ops["router"]
    experts: Any  # prepared by ops["experts"]


class GptOss:
    """A loaded model: prepared weights + the backends serving each op. Build with :func:`load_model`."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, ops: dict[str, Backend],
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 model_dir: str | Path | None = None, resolution: Any = None, progress: bool | None = None,
                 plan: ShardPlan | None = None, comm: Communicator | None = None):
        """``plan``/``comm``: one rank of a sharded model (core/parallel.py), ``weights`` being its shard."""
        self.config, self.ops, self.dtype, self.device = config, dict(ops), dtype, torch.device(device)
        self.plan, self.comm = plan, comm or SINGLE_PROCESS
        where = (plan.rank, plan.world_size) if plan is not None else (0, 1)
        if where != (self.comm.rank, self.comm.world_size):
            raise ValueError(f"weights sharded for rank {where[0]} of {where[1]}, with a communicator of rank "
                             f"{self.comm.rank} of {self.comm.world_size}")
        # This rank's heads (all of them in one process); whole experts per rank route tokens by all-to-all.
        self.num_heads = plan.num_heads if plan else config.num_attention_heads
        self.num_kv_heads = plan.num_kv_heads if plan else config.num_key_value_heads
        self.expert_parallel = (ExpertParallel(plan, self.comm, self.device)
                                if plan is not None and plan.sharding == "expert" else None)
        self.model_dir = None if model_dir is None else Path(model_dir)
        self.resolution = resolution  # how the ops were chosen (plugins' trace), for `mxmoe backends --explain`
        self._tokenizer = None
        # Norm scales and sinks are tiny: keep them in at least float32 (as gpt-oss does).
        small = torch.promote_types(dtype, torch.float32)
        lin, router, experts = ops["linear"], ops["router"], ops["experts"]

        self.embedding = weights.embedding.to(device=self.device, dtype=dtype)
        self.layers: list[_Layer] = []
        # Preparing is where checkpoint bytes are first read (moved to the device, converted, re-laid out).
        for i, b in enumerate(_progress(weights, progress, f"preparing {len(weights.blocks)} layers")):
            a, m = b.attn, b.mlp
            self.layers.append(_Layer(
                attn_norm=a.norm_scale.to(self.device, small),
                qkv=lin.prepare_linear(a.qkv_weight, a.qkv_bias, dtype, self.device),
                sinks=a.sinks.to(self.device, small),
                out=lin.prepare_linear(a.out_weight, a.out_bias, dtype, self.device),
                sliding_window=config.layer_sliding_window(i),
                mlp_norm=m.norm_scale.to(self.device, small),
                gate=router.prepare_linear(m.gate_weight, m.gate_bias, dtype, self.device),
                experts=experts.prepare_experts(m.mlp1, m.mlp2, dtype, self.device),
            ))
        self.norm = weights.norm_scale.to(self.device, small)
        self.unembedding = lin.prepare_linear(weights.unembedding, None, dtype, self.device)
        # RoPE angles in float64 only for the float64 oracle; float32 otherwise, as gpt-oss computes them.
        inv_freq, self.concentration = yarn_inv_freq(config, small)
        self.inv_freq = inv_freq.to(self.device)
        self.sm_scale = 1.0 / math.sqrt(config.head_dim)

    # ---- the graph ---------------------------------------------------------------------------------
    def forward(self, token_ids: torch.Tensor, batch: Batch, cache: KVCache,
                logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Run T new tokens of S sequences; returns logits (R, V) at ``logits_rows`` (default: each
        sequence's last new token, R = S). ``cache`` receives the new keys/values."""
        cfg, ops = self.config, self.ops
        T = token_ids.shape[0]
        Hq, Hkv, d = self.num_heads, self.num_kv_heads, cfg.head_dim  # this rank's heads
        Q, KV = Hq * d, Hkv * d
        norm, eps = ops["rms_norm"], cfg.rms_norm_eps
        add_rms_norm, rope_attention = fused_op(ops, "add_rms_norm"), fused_op(ops, "rope_attention")
        x = ops["embedding"].embedding(token_ids, self.embedding)  # (T, D): the residual stream
        delta = None  # (T, D): the last block's output, not yet added to x (the next norm adds it)
        for i, layer in enumerate(self.layers):
            # Attention block.
            if delta is None:
                h = norm.rms_norm(x, layer.attn_norm, eps)
            else:
                x, h = add_rms_norm(x, delta, layer.attn_norm, eps)
            qkv = ops["linear"].linear(h, layer.qkv)  # (T, Q + 2 KV)
            q = qkv[:, :Q].reshape(T, Hq, d)
            k = qkv[:, Q:Q + KV].reshape(T, Hkv, d)
            v = qkv[:, Q + KV:].reshape(T, Hkv, d)
            k_cache, v_cache = cache.layer(i)
            o = rope_attention(q, k, v, batch.positions, self.inv_freq, self.concentration, layer.sinks, k_cache,
                               v_cache, batch, layer.sliding_window, self.sm_scale)  # (T, Hq, d)
            delta = self.comm.all_reduce(ops["linear"].linear(o.reshape(T, Q), layer.out))  # sum over ranks' heads
            # MoE block.
            x, h = add_rms_norm(x, delta, layer.mlp_norm, eps)
            weights, indices = ops["router"].router(h, layer.gate, cfg.experts_per_token)  # (T, k) each
            if self.expert_parallel is None:  # all experts here, or a slice of each: sum over ranks' slices
                delta = self.comm.all_reduce(ops["experts"].experts(h, weights, indices, layer.experts,
                                                                    cfg.swiglu_alpha, cfg.swiglu_limit))
            else:  # whole experts on each rank: tokens go to their experts and back (all-to-all)
                delta = self.expert_parallel(ops["experts"], h, weights, indices, layer.experts, cfg.swiglu_alpha,
                                             cfg.swiglu_limit)
        if logits_rows is None:
            logits_rows = batch.cu_seqlens[1:] - 1
        # The last residual add and the final norm, on the selected rows only (row-wise: the same bits).
        if delta is None:
            x = norm.rms_norm(x[logits_rows], self.norm, eps)
        else:
            _, x = add_rms_norm(x[logits_rows], delta[logits_rows], self.norm, eps)
        # Each rank holds rows of the unembedding (padded to equal parts): gather, then drop the padding.
        return self.comm.all_gather(ops["linear"].linear(x, self.unembedding))[:, :cfg.vocab_size]  # (R, V)

    # ---- conveniences ------------------------------------------------------------------------------
    def new_cache(self, num_rows: int, cache_len: int) -> KVCache:
        cfg = self.config
        return KVCache.allocate(cfg.num_hidden_layers, num_rows, cache_len, self.num_kv_heads, cfg.head_dim,
                                self.dtype, self.device)

    def check_tokens(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.int64)
        if ids.ndim != 1 or ids.numel() == 0:
            raise ValueError(f"expected a non-empty 1-D sequence of token ids, found shape {tuple(ids.shape)}")
        bad = ((ids < 0) | (ids >= self.config.vocab_size)).nonzero()
        if bad.numel():
            pos = int(bad[0, 0])
            raise ValueError(f"token id {int(ids[pos])} at position {pos} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        return ids.to(self.device)

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits of every position of one sequence: (T,) ids → (T, V)."""
        ids = self.check_tokens(token_ids)
        T = ids.shape[0]
        batch = Batch.build([T], [0], [0], T, self.device)
        return self.forward(ids, batch, self.new_cache(1, T), logits_rows=torch.arange(T, device=self.device))

    def generate(self, prompt_ids: Sequence[int], max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop_tokens: Sequence[int] = (),
                 **engine_kwargs) -> Iterator[int]:
        """Stream generated token ids of one prompt through the generation engine (core/engine.py), in an
        engine sized for it; ``engine_kwargs`` as for :meth:`generate_batch`. Errors surface on iteration."""
        from .engine import SamplingParams, generate

        return generate(self, prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                         top_p=top_p, seed=seed, stop_tokens=tuple(stop_tokens)),
                        **engine_kwargs)

    def generate_batch(self, prompts: Sequence[Sequence[int]], params: Any = None, **engine_kwargs) -> list:
        """Complete several prompts as one batch (``params``: one ``SamplingParams`` for all, or one each);
        returns the finished ``Request`` objects (``token_ids``, ``finish_reason``, ``error``) in prompt order.
        ``engine_kwargs``: ``max_batch``, ``max_context``, ``max_step_tokens``, ``use_graphs``."""
        from .engine import generate_batch

        return generate_batch(self, prompts, params, **engine_kwargs)

    @property
    def tokenizer(self):
        """The o200k_harmony tokenizer, looked for next to the checkpoint first (core/tokenizer.py)."""
        if self._tokenizer is None:
            from .tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(model_dir=self.model_dir)
        return self._tokenizer


_PROGRESS_MIN_BYTES = 2**30


def _progress(weights: ModelWeights, enabled: bool | None, desc: str):
    """The blocks, with a progress bar on stderr when ``enabled`` (None: for checkpoints over 1 GiB, on a
    terminal)."""
    if enabled is None:
        size = sum(t.nbytes for t in (weights.embedding, weights.unembedding) if t is not None)
        size += sum(t.nbytes for b in weights.blocks for t in _tensors(b))
        enabled = size > _PROGRESS_MIN_BYTES and sys.stderr.isatty()
    if not enabled:
        return weights.blocks
    from tqdm import tqdm

    return tqdm(weights.blocks, desc=desc, unit="layer", file=sys.stderr)


def _tensors(block) -> list[torch.Tensor]:
    a, m = block.attn, block.mlp
    experts = [t for e in (m.mlp1, m.mlp2) for t in (e.blocks, e.scales, e.weight, e.bias) if t is not None]
    return [a.qkv_weight, a.out_weight, m.gate_weight, *experts]


def load_model(path: str | Path, backend: str | dict[str, str] | None = None, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, strict: bool = False,
               progress: bool | None = None, shard_experts: str | None = None) -> GptOss:
    """Load a checkpoint folder (original, Hugging Face MXFP4 or Hugging Face bf16 layout) onto engines.

    ``backend``: ``None``/``"auto"`` (best available for the device), a backend name (``"torch"``), or
    per-op overrides (``{"attention": "torch", "experts": "..."}`` or ``"attention=torch,experts=..."``).
    ``strict`` refuses any fallback. ``dtype`` is the activation dtype (default bfloat16, the
    checkpoint's own; float32/float64 for checking). Under torchrun (core/launch.py) every rank loads its
    shard, with experts split by ``shard_experts`` ("intermediate" or "expert"; core/parallel.py).
    """
    from mxmoe.plugins import resolve_backends

    from .checkpoint import load_checkpoint
    from .launch import current

    launch = current()
    if launch is not None:
        return launch.load_model(path, backend=backend, device=device, dtype=dtype, strict=strict, progress=progress,
                                 shard_experts=shard_experts)

    device = torch.device(device)
    dtype = parse_dtype(dtype or "bfloat16")
    config, weights, _layout = load_checkpoint(path)
    resolution = resolve_backends(backend, device=device, dtype=dtype, strict=strict, model_config=config)
    return GptOss(config, weights, resolution.ops, dtype=dtype, device=device, model_dir=path,
                  resolution=resolution, progress=progress)
