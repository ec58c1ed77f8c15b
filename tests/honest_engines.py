"""Honest engines that compute differently from the reference (the suite must pass them: a false failure is
the worst bug a certification suite can have).

``TiledOnlineSoftmax``: attention the way flash kernels do it, over key tiles with a running max and
denominator (the sink seeds both), probabilities rounded to the activation dtype before P·V, fp32
accumulators. ``GatheredExperts``: MoE by sorting (token, slot) pairs per expert, one GEMM per expert in
fp32 with intermediates stored in the activation dtype, routing weights applied and summed in fp32.
"""

from __future__ import annotations

import torch

from mxmoe.backends.reference import TorchBackend


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


HONEST_ENGINES = [TiledOnlineSoftmax, GatheredExperts, BothHonest]
