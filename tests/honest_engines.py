"""Honest engines that compute differently from the reference (the suite must pass them: a false failure is
the worst bug a certification suite can have).

``TiledOnlineSoftmax``: attention the way flash kernels do it, over key tiles with a running max and
denominator (the sink seeds both), probabilities rounded to the activation dtype before P·V, fp32
accumulators. ``GatheredExperts``: MoE by sorting (token, slot) pairs per expert, one GEMM per expert in
fp32 with intermediates stored in the activation dtype, routing weights applied and summed in fp32.
``StaticShapes``: every op without a host synchronisation (CUDA-graph capturable): attention over whole
cache rows with masks, experts gathered per slot from weights dequantized at load.

``NARROW_ENGINES``: the reference with narrower claims and nothing else (what an engine written for
gpt-oss's shapes claims). The base class enforces the claims, so they must certify, with NOT_SUPPORTED rows
where their claims end. ``EXPECT_REFUSED`` names, for each, case ids (globs) that must be NOT_SUPPORTED.
"""

from __future__ import annotations

import torch

from mxmoe.backends.reference import TorchBackend
from mxmoe.core.backend import Experts
from mxmoe.core.weights import ExpertLinear

_CAPS = TorchBackend.capabilities


def _swiglu(h, alpha, limit):
    g = h[..., 0::2].clamp(max=limit)
    lin = h[..., 1::2].clamp(min=-limit, max=limit)
    return g * torch.sigmoid(alpha * g) * (lin + 1)


class TiledOnlineSoftmax(TorchBackend):
    name = "honest-tiled-online-softmax"
    version = "0.0.1"
    TILE = 32

    def attention(self, q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale):
        if q.dtype == torch.float64:
            return super().attention(q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale)
        T, Hq, d = q.shape
        Hkv = k.shape[1]
        G = Hq // Hkv
        k_cache.view(-1, Hkv, d)[batch.slot_mapping] = k.to(k_cache.dtype)
        v_cache.view(-1, Hkv, d)[batch.slot_mapping] = v.to(v_cache.dtype)
        f32 = torch.float32
        out = torch.empty_like(q)
        for start, end, row, ctx in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist(),
                                        batch.cache_rows.tolist(), batch.context_lens.tolist()):
            n = end - start
            qg = q[start:end].to(f32).reshape(n, Hkv, G, d)
            pos = batch.positions[start:end].reshape(n, 1, 1, 1)
            run_max = sinks.to(f32).reshape(1, Hkv, G, 1).expand(n, Hkv, G, 1).clone()
            denom = torch.ones(n, Hkv, G, 1, dtype=f32, device=q.device)
            acc = torch.zeros(n, Hkv, G, d, dtype=f32, device=q.device)
            lo = 0
            if sliding_window:  # skip tiles wholly outside every query's window
                lo = max(0, int(batch.positions[start:end].min()) - sliding_window + 1) // self.TILE * self.TILE
            for j0 in range(lo, ctx, self.TILE):
                j1 = min(ctx, j0 + self.TILE)
                s = torch.einsum("nhgd,bhd->nhgb", qg, k_cache[row, j0:j1].to(f32)) * sm_scale
                kp = torch.arange(j0, j1, device=q.device).reshape(1, 1, 1, -1)
                ok = kp <= pos
                if sliding_window:
                    ok = ok & (pos - kp < sliding_window)
                s = s.masked_fill(~ok, float("-inf"))
                new_max = torch.maximum(run_max, s.amax(-1, keepdim=True))
                p = torch.exp(s - new_max)
                scale = torch.exp(run_max - new_max)
                denom = denom * scale + p.sum(-1, keepdim=True)
                p16 = p.to(q.dtype).to(f32)  # P in the activation dtype for the P·V product
                acc = acc * scale + torch.einsum("nhgb,bhd->nhgd", p16, v_cache[row, j0:j1].to(f32))
                run_max = new_max
            out[start:end] = (acc / denom).reshape(n, Hq, d).to(q.dtype)
        return out


class GatheredExperts(TorchBackend):
    name = "honest-gathered-experts"
    version = "0.0.1"

    def experts(self, x, expert_weights, expert_indices, experts, swiglu_alpha, swiglu_limit):
        if x.dtype == torch.float64:
            return super().experts(x, expert_weights, expert_indices, experts, swiglu_alpha, swiglu_limit)
        T, D = x.shape
        k = expert_indices.shape[1]
        dt = experts.dtype
        flat = expert_indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok, w = order // k, expert_weights.reshape(-1)[order].float()
        ys = torch.empty(T * k, D, dtype=dt, device=x.device)
        counts = torch.bincount(flat, minlength=experts.mlp1.num_experts).tolist()
        off = 0
        for e, c in enumerate(counts):
            if c:
                xs = x[tok[off:off + c]].float()
                h = (xs @ experts.mlp1.expert_weight(e, dt).float().T + experts.mlp1.bias[e].float()).to(dt)
                s = _swiglu(h.float(), swiglu_alpha, swiglu_limit).to(dt)
                ys[off:off + c] = (s.float() @ experts.mlp2.expert_weight(e, dt).float().T
                                   + experts.mlp2.bias[e].float()).to(dt)
                off += c
        out = torch.zeros(T, D, dtype=torch.float32, device=x.device)
        out.index_add_(0, tok, ys.float() * w[:, None])
        return out.to(x.dtype)


class BothHonest(TiledOnlineSoftmax, GatheredExperts):
    name = "honest-both"


class StaticShapes(TorchBackend):
    """No op synchronises with the host or sizes anything from device values: capturable in a CUDA graph.
    Attention reads each token's whole cache row (cache_len keys, masked); the experts are dequantized
    once at load and gathered per routing slot."""

    name = "honest-static-shapes"
    version = "0.0.1"
    capabilities = _CAPS.model_copy(update={"cuda_graphs": True, "determinism": "run_to_run"})

    def prepare_experts(self, mlp1, mlp2, dtype, device):
        def dense(e: ExpertLinear) -> ExpertLinear:
            return ExpertLinear(bias=e.bias.to(device, dtype), weight=e.dense(dtype).to(device))

        return Experts(dense(mlp1), dense(mlp2), dtype)

    def attention(self, q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale):
        T, Hq, d = q.shape
        Hkv, L = k.shape[1], k_cache.shape[1]
        k_cache.view(-1, Hkv, d)[batch.slot_mapping] = k.to(k_cache.dtype)
        v_cache.view(-1, Hkv, d)[batch.slot_mapping] = v.to(v_cache.dtype)
        ct = torch.promote_types(q.dtype, torch.float32)
        tok = torch.arange(T, device=q.device)
        seq = torch.searchsorted(batch.cu_seqlens[1:], tok, right=True)  # (T,) sequence of each token
        row = batch.cache_rows[seq]
        keys = torch.arange(L, device=q.device)[None, :]  # (1, L)
        pos = batch.positions[:, None]
        ok = keys <= pos
        if sliding_window:
            ok = ok & (pos - keys < sliding_window)
        G = Hq // Hkv
        kk = k_cache[row].to(ct)  # (T, L, Hkv, d)
        vv = torch.where(ok[:, :, None, None], v_cache[row].to(ct), 0.0)  # unwritten slots are NaN
        s = torch.einsum("thgd,tlhd->thgl", q.to(ct).view(T, Hkv, G, d), kk) * sm_scale
        s = s.masked_fill(~ok[:, None, None, :], float("-inf"))
        sink = sinks.to(ct).view(1, Hkv, G, 1).expand(T, Hkv, G, 1)
        p = torch.softmax(torch.cat((s, sink), dim=-1), dim=-1)[..., :-1]
        return torch.einsum("thgl,tlhd->thgd", p, vv).reshape(T, Hq, d).to(q.dtype)

    def experts(self, x, expert_weights, expert_indices, experts, swiglu_alpha, swiglu_limit):
        dt = experts.dtype
        ct = torch.promote_types(x.dtype, torch.float32)
        w1, b1 = experts.mlp1.weight, experts.mlp1.bias  # (E, 2I, D), (E, 2I)
        w2, b2 = experts.mlp2.weight, experts.mlp2.bias
        out = torch.zeros(x.shape, dtype=ct, device=x.device)
        xs = x.to(dt)
        for slot in range(expert_indices.shape[1]):  # k is static
            e = expert_indices[:, slot]
            h = (torch.einsum("tnd,td->tn", w1[e].to(ct), xs.to(ct)) + b1[e].to(ct)).to(dt)
            g, lin = h[..., 0::2].to(ct).clamp(max=swiglu_limit), h[..., 1::2].to(ct).clamp(-swiglu_limit, swiglu_limit)
            a = (g * torch.sigmoid(swiglu_alpha * g) * (lin + 1)).to(dt)
            y = (torch.einsum("tdi,ti->td", w2[e].to(ct), a.to(ct)) + b2[e].to(ct)).to(dt)
            out += expert_weights[:, slot, None].to(ct) * y.to(ct)
        return out.to(x.dtype)


HONEST_ENGINES = [TiledOnlineSoftmax, GatheredExperts, BothHonest, StaticShapes]


# ---- narrower claims, stated once -------------------------------------------------------------------------

def _narrow(name: str, doc: str, **claims):
    return type(name, (TorchBackend,), {"name": "honest-" + name.lower(), "version": "0.0.1", "__doc__": doc,
                                        "capabilities": _CAPS.model_copy(update=claims)})


HeadDim64 = _narrow("HeadDim64", "Head dim 64 only (gpt-oss's).", head_dims=(64,))
MaxContext8192 = _narrow("MaxContext8192", "At most 8192 keys per sequence.", max_context=8192)
MaxExperts32 = _narrow("MaxExperts32", "At most 32 experts (gpt-oss-20b's).", max_experts=32)
Bf16Only = _narrow("Bf16Only", "bfloat16 activations only.", dtypes=("bfloat16",))
NoSlidingWindow = _narrow("NoSlidingWindow", "No sliding window.", sliding_window=False)
TopK2 = _narrow("TopK2", "At most 2 experts per token.", max_experts_per_token=2)
DenseExpertsOnly = _narrow("DenseExpertsOnly", "Experts stored dense only (no MXFP4).", mxfp4="none")
Mxfp4Only = _narrow("Mxfp4Only", "MXFP4 experts only (no dense bf16 experts).", dense_experts=False)
NoSinks = _narrow("NoSinks", "No attention sinks.", attention_sinks=False)
AttentionOnly = _narrow("AttentionOnly", "Serves the attention op alone.", ops=("attention",))
# What the triton engine claims (its code aside): bf16, head dim 64, MXFP4 only.
GptOssShaped = _narrow("GptOssShaped", "bf16, head dim 64, MXFP4 experts only, at most 8192 keys and 128 experts.",
                       dtypes=("bfloat16",), head_dims=(64,), dense_experts=False, max_context=8192, max_experts=128)

NARROW_ENGINES = [HeadDim64, MaxContext8192, MaxExperts32, Bf16Only, NoSlidingWindow, TopK2, DenseExpertsOnly,
                  Mxfp4Only, NoSinks, AttentionOnly, GptOssShaped]

# Case ids that must come out NOT_SUPPORTED (the other side of each claim), besides whatever else is.
EXPECT_REFUSED = {
    HeadDim64: ["L1/attention/refuses_head_dim_16*", "L1/rope/refuses_head_dim_16*"],
    MaxContext8192: ["L1/attention/refuses_context_8193*"],
    MaxExperts32: ["L1/router/refuses_experts_33*", "L1/experts/refuses_experts_33*"],
    Bf16Only: ["L0/rms_norm/refuses_random*", "L0/attention/refuses_prefill_d64*"],
    NoSlidingWindow: ["L1/attention/window_boundary*", "L2/block/attention_windowed*", "L3/model/logits*"],
    TopK2: ["L1/router/refuses_top3*", "L1/experts/refuses_top3*"],
    DenseExpertsOnly: ["L1/experts/random_mxfp4*", "L1/experts/mxfp4_dequant_mlp1*"],
    Mxfp4Only: ["L1/experts/random_dense*"],
    NoSinks: ["L1/attention/prefill*", "L2/block/attention@*", "L3/model/logits*"],
    AttentionOnly: ["L1/rms_norm/random*", "L1/experts/random_mxfp4*", "L2/block/moe*"],
    GptOssShaped: ["L0/rms_norm/refuses_random*", "L1/attention/refuses_head_dim_16*",
                   "L1/attention/refuses_context_8193*", "L1/experts/random_dense*"],
}
