"""``torch`` — the reference engine: plain PyTorch, the executable specification of every op.

Readable top to bottom, CPU or CUDA, float64 for the conformance oracle, float32 for checking, bf16
for speed. MXFP4 experts stay packed and are dequantized per use, one expert at a time, so a
gpt-oss-20b checkpoint runs on a CPU without ever holding all experts in bf16.

Shape legend: T tokens, S sequences, D hidden, E experts, k experts per token, N/K a linear layer's
out/in features, Hq/Hkv query/KV heads, d head_dim, L keys of one sequence.
"""

from __future__ import annotations

import torch

from mxmoe.core.backend import Backend, Capabilities, Experts, Linear, Probe
from mxmoe.core.batch import Batch
from mxmoe.core.weights import ExpertLinear


class TorchBackend(Backend):
    name = "torch"
    version = "0.1.0"
    api_version = ">=1.0,<2"
    priority = 10  # lowest of the built-ins: always available, never fast
    capabilities = Capabilities(
        devices=("cpu", "cuda"),
        dtypes=("float64", "float32", "bfloat16", "float16"),
        head_dims=None,
        attention_sinks=True,
        sliding_window=True,
        mxfp4="dequantized",
        dense_experts=True,
        cuda_graphs=False,  # data-dependent loops over sequences and experts (host syncs)
        determinism="bitwise",
        sharded=True,  # every op works on whatever heads, expert slices or token subsets it is given
    )

    def probe(self, device=None):
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            return Probe(False, "no CUDA device (torch.cuda.is_available() is False)")
        return Probe(True)

    # The bodies of the loops over sequences and experts (module functions below), as attributes so an
    # engine built on this one (the ``compile`` plugin) can substitute its own versions of the math.
    @staticmethod
    def attention_one_sequence(*args):
        return attention_one_sequence(*args)

    @staticmethod
    def expert_mlp(*args):
        return expert_mlp(*args)

    # ---- weights -----------------------------------------------------------------------------------
    # (The claims above are enforced by the base class before every op and prepare_*: see Backend.)
    def prepare_linear(self, weight, bias, dtype, device):
        return Linear(weight.to(device=device, dtype=dtype),
                      None if bias is None else bias.to(device=device, dtype=dtype))

    def prepare_experts(self, mlp1: ExpertLinear, mlp2: ExpertLinear, dtype, device):
        # Packed bytes (or dense weights) move to the device as they are; dequantization happens per use.
        def move(e: ExpertLinear) -> ExpertLinear:
            to = (lambda t: None if t is None else t.to(device))
            return ExpertLinear(bias=e.bias.to(device=device, dtype=dtype), blocks=to(e.blocks),
                                scales=to(e.scales), weight=to(e.weight))
        return Experts(move(mlp1), move(mlp2), dtype)

    # ---- ops ---------------------------------------------------------------------------------------
    def embedding(self, token_ids, weight):
        return weight[token_ids]

    def rms_norm(self, x, scale, eps):
        t = x.to(torch.promote_types(x.dtype, torch.float32))
        t = t * torch.rsqrt(t.pow(2).mean(dim=-1, keepdim=True) + eps)
        return (t * scale.to(t.dtype)).to(x.dtype)

    def linear(self, x, layer: Linear):
        return torch.nn.functional.linear(x, layer.weight, layer.bias)

    def rope(self, q, k, positions, inv_freq, concentration):
        angle = positions.to(inv_freq.dtype)[:, None] * inv_freq[None, :]  # (T, d/2)
        cos = (angle.cos() * concentration).to(q.dtype)[:, None, :]
        sin = (angle.sin() * concentration).to(q.dtype)[:, None, :]

        def rotate(x: torch.Tensor) -> torch.Tensor:  # (T, H, d): halves, not interleaved pairs
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

        return rotate(q), rotate(k)

    def attention(self, q, k, v, sinks, k_cache, v_cache, batch: Batch, sliding_window, sm_scale):
        T, Hq, d = q.shape
        Hkv = k.shape[1]
        # Write the new keys/values where the caller says, then read each sequence's keys back.
        k_cache.view(-1, Hkv, d)[batch.slot_mapping] = k.to(k_cache.dtype)
        v_cache.view(-1, Hkv, d)[batch.slot_mapping] = v.to(v_cache.dtype)
        compute = torch.promote_types(q.dtype, torch.float32)  # softmax in at least float32
        out = torch.empty_like(q)
        # One sequence at a time (attention_one_sequence, below, holds the math).
        for start, end, row, ctx in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist(),
                                        batch.cache_rows.tolist(), batch.context_lens.tolist()):
            o = self.attention_one_sequence(q[start:end].to(compute), k_cache[row, :ctx].to(compute),
                                            v_cache[row, :ctx].to(compute), sinks, batch.positions[start:end],
                                            sliding_window, sm_scale)
            out[start:end] = o.to(q.dtype)
        return out

    def router(self, x, gate: Linear, top_k):
        logits = self.linear(x, gate)  # (T, E)
        # Ties go to the lower expert index: a stable sort guarantees it (torch.topk does not; on the CPU with
        # torch 2.13 it breaks ties either way).
        values, indices = torch.sort(logits, dim=-1, descending=True, stable=True)
        values, indices = values[:, :top_k], indices[:, :top_k]
        return torch.softmax(values, dim=-1), indices

    def experts(self, x, expert_weights, expert_indices, experts: Experts, swiglu_alpha, swiglu_limit):
        T, D = x.shape
        out = torch.zeros(T, D, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        xc = x.to(experts.dtype)
        # Loop over the experts that received tokens; dequantize each one's weights just for this use
        # (expert_mlp, below, holds the math).
        for e in torch.unique(expert_indices).tolist():
            token, slot = torch.nonzero(expert_indices == e, as_tuple=True)
            y = self.expert_mlp(xc[token], experts.mlp1.expert_weight(e, experts.dtype), experts.mlp1.bias[e],
                                experts.mlp2.expert_weight(e, experts.dtype), experts.mlp2.bias[e],
                                swiglu_alpha, swiglu_limit)  # (n, D)
            out.index_add_(0, token, (y * expert_weights[token, slot, None]).to(out.dtype))
        return out.to(x.dtype)


_Experts = Experts  # the old private name of mxmoe.core.backend.Experts


# ---- the math of one sequence / one expert (also compiled by the ``compile`` plugin) ------------------

def attention_one_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                           q_positions: torch.Tensor, sliding_window: int, sm_scale: float) -> torch.Tensor:
    """Causal attention with sinks for one sequence, in the dtype of ``q`` (the compute dtype).

    q (n, Hq, d): the sequence's new queries; k, v (L, Hkv, d): all its keys/values, position 0 first;
    sinks (Hq,); q_positions (n,): the queries' positions. Query i sees key j when j <= pos_i and, with
    a sliding window W > 0, pos_i - j < W. Returns (n, Hq, d).
    """
    Hq, Hkv = q.shape[1], k.shape[1]
    # GQA: query head h reads KV head h // (Hq / Hkv).
    k = k.repeat_interleave(Hq // Hkv, dim=1)  # (L, Hq, d)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q, k) * sm_scale  # (Hq, n, L)
    q_pos = q_positions[:, None]  # (n, 1)
    k_pos = torch.arange(k.shape[0], device=q.device)[None, :]  # (1, L)
    allowed = k_pos <= q_pos
    if sliding_window:
        allowed &= q_pos - k_pos < sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    # The sink is one extra logit per head that takes probability mass but contributes no value.
    sink = sinks.to(q.dtype)[:, None, None].expand(Hq, q.shape[0], 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    return torch.einsum("hnl,lhd->nhd", probs, v)


def expert_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
               alpha: float, limit: float) -> torch.Tensor:
    """One expert on the n tokens routed to it: x (n, D) → mlp2(swiglu(mlp1(x))) (n, D).

    w1 (2I, D), b1 (2I,): mlp1, gate and linear rows interleaved; w2 (D, I), b2 (D,): mlp2.
    """
    h = torch.nn.functional.linear(x, w1, b1)  # (n, 2I)
    h = swiglu(h, alpha, limit)  # (n, I)
    return torch.nn.functional.linear(h, w2, b2)  # (n, D)


def swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU on interleaved rows: h[..., 0::2] is the gate, h[..., 1::2] the linear half."""
    gate, lin = h[..., 0::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    lin = lin.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (lin + 1)
