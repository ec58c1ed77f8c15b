"""Tensor and expert parallelism: what each rank holds, and the collectives the graph calls.

One model runs across W ranks (processes, one device each). What a rank holds (:class:`ShardPlan`):

    attention   whole KV groups: the rank's KV heads with the query heads that read them (qkv rows, sinks, the
                out projection's columns); the out projection's partial sums meet in ONE all-reduce a block.
    experts     "intermediate" (default): a slice of EVERY expert's intermediate dimension (mlp1 rows, mlp2
                columns), cut on MXFP4 block boundaries; ONE all-reduce per MoE block.
                "expert": whole experts; the tokens go to their experts' ranks and back by all-to-all.
    vocabulary  the unembedding's rows (logits all-gathered); embedding, norms and router are replicated.

The graph (core/model.py) is the same graph: it runs this rank's heads and expert slices through the same
ops and calls the collectives of a :class:`Communicator` where partial results meet. In one process the
communicator is :data:`SINGLE_PROCESS`, whose collectives are the identity, so nothing changes there.
An engine may bring its own collectives: a backend whose ``communicator(rank, world_size, device)``
returns a :class:`Communicator` (core/backend.py) is used instead of :class:`TorchDistributed`.

Why "intermediate" is the default: at batch 1 a decode step reads the k routed experts' weights, and
reading weights is the whole cost. Split by intermediate dimension, every rank reads 1/W of each routed
expert, so the step's expert time falls as 1/W on every rank, for one all-reduce of a (T, D) vector.
Split by expert, the k experts of a token sit on at most k ranks: the busiest rank reads whole experts
(no speed-up at all when they share a rank) and the step pays four collectives with a host sync. Whole
experts per rank serve throughput instead: at large batches each rank runs its experts on every token
routed to them (bigger, denser matmuls, no slicing, no padding), and tokens travel rather than
activations being summed — select it with ``experts="expert"`` (``--shard-experts expert``).

Shape legend: T tokens, D hidden, I intermediate, E experts, k experts per token, V vocab, Hq/Hkv heads,
G = Hq/Hkv query heads per KV head, d head_dim, W ranks, P (token, expert) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from . import mxfp4
from .config import ModelConfig
from .weights import AttentionWeights, BlockWeights, ExpertLinear, MLPWeights, ModelWeights

EXPERT_SHARDINGS = ("intermediate", "expert")
ExpertSharding = Literal["intermediate", "expert"]
_BLOCK = mxfp4.VALUES_PER_BLOCK  # 32: MXFP4 slices start and end on a block
_ONE_SCALE = mxfp4.SCALE_BIAS  # E8M0 127 = 2^0: the scale byte of padded blocks (their values are +0)


class ParallelError(RuntimeError):
    """A collective failed: another rank failed or stopped answering. The message says which rank saw it."""


class ShardingError(ValueError):
    """A model that cannot be split over this many ranks (the message says why and which sizes work)."""


# ---- the communication interface ----------------------------------------------------------------

@runtime_checkable
class Communicator(Protocol):
    """The collectives the graph calls. Every rank calls the same ones in the same order."""

    rank: int
    world_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the ranks, on every rank (may reuse ``x``'s memory)."""
        ...

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``x`` (the same shape on every rank), concatenated along ``dim`` in rank order."""
        ...

    def all_to_all(self, x: torch.Tensor, send_counts: Sequence[int],
                   recv_counts: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Rows of ``x`` (split in rank order by ``send_counts``) go to those ranks; returns the rows received,
        in rank order, and how many came from each rank (exchanged first when ``recv_counts`` is None)."""
        ...


class SingleProcess:
    """One rank: every collective is the identity (the graph is exactly the single-process graph)."""

    rank = 0
    world_size = 1

    def all_reduce(self, x):
        return x

    def all_gather(self, x, dim=-1):
        return x

    def all_to_all(self, x, send_counts, recv_counts=None):
        return x, list(send_counts)


SINGLE_PROCESS = SingleProcess()


class TorchDistributed:
    """:class:`Communicator` over a ``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs).

    A failed collective (a peer that died, or a timeout) raises :class:`ParallelError` naming this rank;
    ``timeout_s`` (the group's, for the message) says how long a silent rank is waited for."""

    def __init__(self, group: Any = None, timeout_s: float | None = None):
        import torch.distributed as dist

        self._dist, self.group, self.timeout_s = dist, group, timeout_s
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)

    def _failed(self, what: str, e: Exception) -> ParallelError:
        silent = "stopped answering" + (f" for {self.timeout_s:g} s" if self.timeout_s else "")
        return ParallelError(f"rank {self.rank} of {self.world_size}: {what} failed: another rank failed, was "
                             f"stopped or {silent} (its own message says why): {e}")

    def all_reduce(self, x):
        x = x.contiguous()
        try:
            self._dist.all_reduce(x, group=self.group)
        except RuntimeError as e:
            raise self._failed("all_reduce", e) from None
        return x

    def all_gather(self, x, dim=-1):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        try:
            self._dist.all_gather(parts, x, group=self.group)
        except RuntimeError as e:
            raise self._failed("all_gather", e) from None
        return torch.cat(parts, dim=dim)

    def all_to_all(self, x, send_counts, recv_counts=None):
        send_counts = [int(n) for n in send_counts]
        try:
            if recv_counts is None:
                # For NCCL the counts travel on the device; the host needs them to size the receive (one sync).
                send = torch.tensor(send_counts, dtype=torch.int64, device=x.device)
                recv = torch.empty_like(send)
                self._dist.all_to_all_single(recv, send, group=self.group)
                recv_counts = recv.tolist()
            recv_counts = [int(n) for n in recv_counts]
            out = x.new_empty((sum(recv_counts), *x.shape[1:]))
            self._dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=self.group)
        except RuntimeError as e:
            raise self._failed("all_to_all", e) from None
        return out, recv_counts


# ---- what each rank holds -------------------------------------------------------------------------

def _even_range(n: int, parts: int, i: int) -> tuple[int, int]:
    """Part ``i`` of ``n`` items cut into ``parts`` contiguous runs whose sizes differ by at most one
    (the larger ones first)."""
    base, extra = divmod(n, parts)
    start = i * base + min(i, extra)
    return start, start + base + (i < extra)


def _chunk_range(n: int, parts: int, i: int) -> tuple[int, int, int]:
    """(start, stop, chunk): part ``i`` of ``n`` items in equal chunks of ``ceil(n / parts)``; the last
    parts are short (or empty) and padded up to ``chunk``."""
    chunk = -(-n // parts)
    start = min(i * chunk, n)
    return start, min(start + chunk, n), chunk


@dataclass(frozen=True)
class ShardPlan:
    """What rank ``rank`` of ``world_size`` holds of a model (ranges are [start, stop) in global indices).

    * ``q_heads`` / ``kv_heads``: its attention heads. With W <= Hkv, the KV groups (a KV head and its G
      query heads) are dealt out in contiguous runs: when W does not divide Hkv the first ranks hold one
      group more (more attention work there, nothing else changes; the KV cache is per rank). With W > Hkv,
      each KV head is replicated on W/Hkv ranks, each holding G/(W/Hkv) of its query heads (needs W a
      multiple of Hkv and G a multiple of W/Hkv). Any other W is refused: it would split a query head's
      group from its KV head (see :func:`head_split`).
    * ``intermediate``: (start, stop, width) of the intermediate dimension I ("intermediate" sharding):
      equal widths of ceil(I/32/W) MXFP4 blocks, so every cut falls on a block; a rank whose real slice is
      short is padded with zero weights up to ``width`` (zero rows of mlp1, zero columns of mlp2: their
      SwiGLU output and their product are exactly 0). All of I for "expert" sharding.
    * ``experts``: the experts it holds whole ("expert" sharding: contiguous runs, sizes differing by at
      most one); all of them for "intermediate".
    * ``vocab``: (start, stop, rows) of the unembedding, padded with zero rows to ``rows`` (ceil(V/W)) so
      the logits all-gather has equal parts; the padded logits are cut off after it.
    """

    rank: int
    world_size: int
    sharding: ExpertSharding
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int, int]
    experts: tuple[int, int]
    expert_starts: tuple[int, ...]  # first expert of every rank, and E at the end ("expert" sharding)
    vocab: tuple[int, int, int]

    @classmethod
    def make(cls, config: ModelConfig, rank: int, world_size: int,
             sharding: ExpertSharding = "intermediate") -> "ShardPlan":
        if sharding not in EXPERT_SHARDINGS:
            raise ShardingError(f"expert sharding {sharding!r}: expected one of {', '.join(EXPERT_SHARDINGS)}")
        if not 0 <= rank < world_size:
            raise ShardingError(f"rank {rank} is not in 0..{world_size - 1}")
        q_heads, kv_heads = head_split(config, rank, world_size)
        E, I = config.num_experts, config.intermediate_size
        if sharding == "intermediate":
            b0, b1, blocks = _chunk_range(I // _BLOCK, world_size, rank)
            intermediate = (b0 * _BLOCK, b1 * _BLOCK, blocks * _BLOCK)
            experts, starts = (0, E), (0, E)
        else:
            if E < world_size:
                raise ShardingError(f"{E} experts cannot be split over {world_size} ranks by expert (a rank would "
                                    f"hold none); use the intermediate sharding or at most {E} ranks")
            intermediate = (0, I, I)
            experts = _even_range(E, world_size, rank)
            starts = tuple(_even_range(E, world_size, r)[0] for r in range(world_size)) + (E,)
        return cls(rank=rank, world_size=world_size, sharding=sharding, q_heads=q_heads, kv_heads=kv_heads,
                   intermediate=intermediate, experts=experts, expert_starts=starts,
                   vocab=_chunk_range(config.vocab_size, world_size, rank))

    @property
    def num_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    def qkv_rows(self, config: ModelConfig) -> torch.Tensor:
        """Rows of the canonical qkv weight (Q + 2 KV, D) this rank holds: its q heads, then its k and v heads."""
        d, Q, KV = config.head_dim, config.q_dim, config.kv_dim
        (q0, q1), (k0, k1) = self.q_heads, self.kv_heads
        return torch.cat([torch.arange(q0 * d, q1 * d), Q + torch.arange(k0 * d, k1 * d),
                          Q + KV + torch.arange(k0 * d, k1 * d)])

    def shard(self, config: ModelConfig, weights: ModelWeights, qkv_selected: bool = False,
              copy: bool = False) -> ModelWeights:
        """This rank's part of ``weights``: views of the (memory-mapped) tensors where no padding is needed, so
        nothing else is ever read. ``qkv_selected``: the qkv weights already hold only :meth:`qkv_rows`
        (``load_checkpoint(qkv_rows=...)`` read them so). ``copy``: every cut is its own copy (for weights made
        in memory, whose whole layers must not stay alive through views). Blocks are cut when accessed."""
        v0, v1, rows = self.vocab
        unembedding = _pad(weights.unembedding[v0:v1], 0, rows)
        return ModelWeights(embedding=weights.embedding,
                            blocks=_ShardedBlocks(self, config, weights.blocks, qkv_selected, copy),
                            norm_scale=weights.norm_scale, unembedding=unembedding.clone() if copy else unembedding)

    def shard_block(self, config: ModelConfig, block: BlockWeights, qkv_selected: bool = False,
                    copy: bool = False) -> BlockWeights:
        """This rank's part of one block (see :meth:`shard`)."""
        out = self._shard_block(config, block, qkv_selected)
        if copy:
            out = _copied(out)
        return out

    def _shard_block(self, config: ModelConfig, block: BlockWeights, qkv_selected: bool) -> BlockWeights:
        a, m = block.attn, block.mlp
        d = config.head_dim
        (q0, q1) = self.q_heads
        if qkv_selected:
            qkv_weight, qkv_bias = a.qkv_weight, a.qkv_bias
        else:
            rows = self.qkv_rows(config)
            qkv_weight, qkv_bias = a.qkv_weight[rows], a.qkv_bias[rows]
        first = self.rank == 0  # biases added after a sum over ranks belong to one rank only
        attn = AttentionWeights(norm_scale=a.norm_scale, qkv_weight=qkv_weight, qkv_bias=qkv_bias,
                                sinks=a.sinks[q0:q1], out_weight=a.out_weight[:, q0 * d:q1 * d],
                                out_bias=a.out_bias if first else torch.zeros_like(a.out_bias))
        e0, e1 = self.experts
        j0, j1, width = self.intermediate
        mlp1 = _expert_rows(_expert_slice(m.mlp1, e0, e1), 2 * j0, 2 * j1, 2 * width)  # gate/linear interleaved
        mlp2 = _expert_cols(_expert_slice(m.mlp2, e0, e1), j0, j1, width)
        if self.sharding == "intermediate" and not first:
            mlp2 = replace(mlp2, bias=torch.zeros_like(mlp2.bias))
        mlp = MLPWeights(norm_scale=m.norm_scale, gate_weight=m.gate_weight, gate_bias=m.gate_bias, mlp1=mlp1,
                         mlp2=mlp2)
        return BlockWeights(attn=attn, mlp=mlp)


def head_split(config: ModelConfig, rank: int, world_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(query heads, KV heads) of ``rank``, as [start, stop) ranges; see :class:`ShardPlan`."""
    Hq, Hkv = config.num_attention_heads, config.num_key_value_heads
    G = Hq // Hkv
    if world_size <= Hkv:
        k0, k1 = _even_range(Hkv, world_size, rank)
        return (k0 * G, k1 * G), (k0, k1)
    share = world_size // Hkv  # ranks holding one KV head
    if world_size % Hkv or G % share:
        ok = [w for w in range(1, 2 * Hq + 1) if w <= Hkv or (w % Hkv == 0 and G % (w // Hkv) == 0)]
        raise ShardingError(f"{Hkv} KV heads (each read by {G} query heads) cannot be split over {world_size} ranks: "
                            f"a rank must hold whole KV groups (at most {Hkv} ranks), or each KV head is replicated "
                            f"on W/{Hkv} ranks that divide its {G} query heads; world sizes that work: "
                            f"{', '.join(map(str, ok))}")
    k0 = rank // share
    q0 = k0 * G + (rank % share) * (G // share)
    return (q0, q0 + G // share), (k0, k0 + 1)


class _ShardedBlocks(Sequence[BlockWeights]):
    """A model's blocks, each cut to this rank's part when accessed (so padding copies live one layer at a time)."""

    def __init__(self, plan: ShardPlan, config: ModelConfig, blocks: Sequence[BlockWeights], qkv_selected: bool,
                 copy: bool):
        self._plan, self._config, self._blocks = plan, config, blocks
        self._qkv_selected, self._copy = qkv_selected, copy

    def __len__(self) -> int:
        return len(self._blocks)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._plan.shard_block(self._config, self._blocks[i], self._qkv_selected, self._copy)


def _copied(block: BlockWeights) -> BlockWeights:
    def own(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.clone()

    def experts(e: ExpertLinear) -> ExpertLinear:
        return ExpertLinear(bias=own(e.bias), blocks=own(e.blocks), scales=own(e.scales), weight=own(e.weight))

    a, m = block.attn, block.mlp
    attn = AttentionWeights(*(own(getattr(a, f)) for f in ("norm_scale", "qkv_weight", "qkv_bias", "sinks",
                                                              "out_weight", "out_bias")))
    mlp = MLPWeights(norm_scale=own(m.norm_scale), gate_weight=own(m.gate_weight), gate_bias=own(m.gate_bias),
                     mlp1=experts(m.mlp1), mlp2=experts(m.mlp2))
    return BlockWeights(attn=attn, mlp=mlp)


# ---- slicing and padding MXFP4 (or dense) experts ---------------------------------------------------

def _pad(t: torch.Tensor, dim: int, size: int, fill: int = 0) -> torch.Tensor:
    """``t`` padded with ``fill`` along ``dim`` to ``size``: ``t`` itself (a view: nothing is read) when it
    already has that size, else one copy of it (only this rank's part) followed by the padding."""
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, torch.full(shape, fill, dtype=t.dtype, device=t.device)], dim=dim)


def _expert_slice(e: ExpertLinear, e0: int, e1: int) -> ExpertLinear:
    if (e0, e1) == (0, e.num_experts):
        return e
    cut = (lambda t: None if t is None else t[e0:e1])
    return ExpertLinear(bias=e.bias[e0:e1], blocks=cut(e.blocks), scales=cut(e.scales), weight=cut(e.weight))


def _expert_rows(e: ExpertLinear, r0: int, r1: int, rows: int) -> ExpertLinear:
    """Output rows [r0, r1) of every expert, padded with zero rows (zero weights and bias) to ``rows``."""
    def cut(t: torch.Tensor | None, fill: int = 0) -> torch.Tensor | None:
        return None if t is None else _pad(t[:, r0:r1], 1, rows, fill)

    return ExpertLinear(bias=cut(e.bias), blocks=cut(e.blocks), scales=cut(e.scales, _ONE_SCALE),
                        weight=cut(e.weight))


def _expert_cols(e: ExpertLinear, c0: int, c1: int, cols: int) -> ExpertLinear:
    """Input columns [c0, c1) of every expert (whole MXFP4 blocks), padded with zero columns to ``cols``."""
    if e.weight is not None:  # dense (E, N, K): no block constraint, but cut alike
        return replace(e, weight=_pad(e.weight[:, :, c0:c1], 2, cols))
    if c0 % _BLOCK or c1 % _BLOCK or cols % _BLOCK:
        raise ShardingError(f"MXFP4 columns [{c0}, {c1}) padded to {cols}: not on {_BLOCK}-value block boundaries")
    b0, b1, nb = c0 // _BLOCK, c1 // _BLOCK, cols // _BLOCK
    return replace(e, blocks=_pad(e.blocks[:, :, b0:b1], 2, nb), scales=_pad(e.scales[:, :, b0:b1], 2, nb, _ONE_SCALE))


# ---- the MoE block with whole experts per rank ------------------------------------------------------

class ExpertParallel:
    """The MoE block when each rank holds whole experts (``plan.experts``): tokens travel to their experts.

    The activations are replicated (attention is tensor-parallel), so each rank dispatches its own 1/W of
    the tokens: every (token, expert) pair of those goes by all-to-all to the rank holding the expert, which
    runs its experts on what it received (the engine's ``experts`` op, one expert per row, weighted); the
    results come back by the reverse all-to-all, are summed per token, and an all-gather gives every rank
    the whole (T, D) output again."""

    def __init__(self, plan: ShardPlan, comm: Communicator, device: torch.device | str):
        self.plan, self.comm = plan, comm
        starts = torch.tensor(plan.expert_starts)
        E = int(starts[-1])
        # owner[e]: the rank holding expert e; local[e]: its index among that rank's experts.
        owner = torch.bucketize(torch.arange(E), starts[1:], right=True)
        self.owner = owner.to(device)
        self.local = (torch.arange(E) - starts[owner]).to(device)

    def __call__(self, backend: Any, x: torch.Tensor, expert_weights: torch.Tensor, expert_indices: torch.Tensor,
                 experts: Any, swiglu_alpha: float, swiglu_limit: float) -> torch.Tensor:
        comm, W = self.comm, self.comm.world_size
        T, D = x.shape
        k = expert_indices.shape[1]
        t0, t1, chunk = _chunk_range(T, W, comm.rank)
        n = t1 - t0
        flat = expert_indices[t0:t1].reshape(-1)  # (n k,)
        token = torch.arange(n, device=x.device).repeat_interleave(k)  # (n k,)
        order = torch.argsort(self.owner[flat], stable=True)  # pairs grouped by destination rank
        flat, token = flat[order], token[order]
        send_counts = torch.bincount(self.owner[flat], minlength=W).tolist()  # host sync: the split sizes
        # Rows to send: the token's activations, and (local expert, routing weight) in float64 (exact for both).
        meta = torch.stack([self.local[flat].to(torch.float64),
                            expert_weights[t0:t1].reshape(-1)[order].to(torch.float64)], dim=1)  # (P, 2)
        x_recv, recv_counts = comm.all_to_all(x[t0:t1][token], send_counts)
        meta_recv, _ = comm.all_to_all(meta, send_counts, recv_counts)
        y = backend.experts(x_recv, meta_recv[:, 1:].to(expert_weights.dtype), meta_recv[:, :1].to(torch.int64),
                            experts, swiglu_alpha, swiglu_limit)  # (P_received, D), weighted
        y_back, _ = comm.all_to_all(y, recv_counts, send_counts)  # (P, D) in send order
        out = torch.zeros(chunk, D, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        out.index_add_(0, token, y_back.to(out.dtype))
        return comm.all_gather(out.to(x.dtype), dim=0)[:T]


def shard_bytes(weights: ModelWeights) -> int:
    """Bytes of the tensors of ``weights`` (a sharded model's blocks are cut on access, one at a time)."""
    total = sum(t.nbytes for t in (weights.embedding, weights.unembedding, weights.norm_scale) if t is not None)
    for b in weights.blocks:
        a, m = b.attn, b.mlp
        total += sum(t.nbytes for t in (a.norm_scale, a.qkv_weight, a.qkv_bias, a.sinks, a.out_weight, a.out_bias,
                                        m.norm_scale, m.gate_weight, m.gate_bias))
        total += sum(t.nbytes for e in (m.mlp1, m.mlp2) for t in (e.bias, e.blocks, e.scales, e.weight)
                     if t is not None)
    return total


def describe(plan: ShardPlan, config: ModelConfig) -> str:
    """One line: what this rank holds."""
    (q0, q1), (k0, k1) = plan.q_heads, plan.kv_heads
    j0, j1, width = plan.intermediate
    e0, e1 = plan.experts
    v0, v1, rows = plan.vocab
    experts = (f"intermediate [{j0}, {j1}) of {config.intermediate_size}" + (f" padded to {width}" if j1 - j0 < width
                                                                            else "")
               if plan.sharding == "intermediate" else f"experts [{e0}, {e1}) of {config.num_experts}")
    return (f"rank {plan.rank} of {plan.world_size}: query heads [{q0}, {q1}), KV heads [{k0}, {k1}); {experts}; "
            f"vocabulary rows [{v0}, {v1})" + (f" padded to {rows}" if v1 - v0 < rows else ""))


__all__ = ["Communicator", "EXPERT_SHARDINGS", "ExpertParallel", "ParallelError", "SINGLE_PROCESS", "ShardPlan",
           "ShardingError", "SingleProcess", "TorchDistributed", "describe", "head_split", "shard_bytes"]
