"""Known-bad engines: the reference with one realistic porting bug each. The conformance suite must fail
every one of them, naming the broken op (tests/test_conformance_meta.py).

Each class's ``BROKEN_OP`` is the op the failure message must name.
"""

from __future__ import annotations

import torch

from mxmoe.backends.reference import TorchBackend, _Experts
from mxmoe.core import mxfp4
from mxmoe.core.backend import Capabilities, Linear
from mxmoe.core.weights import ExpertLinear

_REF_CAPS = TorchBackend.capabilities


class _Bad(TorchBackend):
    version = "0.0.1-bad"
    BROKEN_OP = ""


# ---- attention ---------------------------------------------------------------------------------------

class SinksIgnored(_Bad):
    name = "bad-sinks-ignored"
    BROKEN_OP = "attention"

    def attention(self, q, k, v, sinks, *args, **kw):
        return super().attention(q, k, v, torch.full_like(sinks, -torch.inf), *args, **kw)


class WindowOffByOne(_Bad):
    """``p - j <= window`` instead of ``< window``: one key too many at the band's edge."""

    name = "bad-window-off-by-one"
    BROKEN_OP = "attention"

    def attention(self, q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale):
        return super().attention(q, k, v, sinks, k_cache, v_cache, batch, sliding_window + 1 if sliding_window else 0,
                                 sm_scale)


class WindowIgnored(_Bad):
    name = "bad-window-ignored"
    BROKEN_OP = "attention"

    def attention(self, q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale):
        return super().attention(q, k, v, sinks, k_cache, v_cache, batch, 0, sm_scale)


class SlotMappingIgnored(_Bad):
    """Writes and reads the cache as if every sequence were in row 0 (right only for a batch of one)."""

    name = "bad-slot-mapping"
    BROKEN_OP = "attention"

    def attention(self, q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale):
        from dataclasses import replace

        S = batch.num_seqs
        cache_len = k_cache.shape[1]
        fake = replace(batch, cache_rows=torch.zeros(S, dtype=torch.int64, device=q.device),
                       slot_mapping=batch.positions.clone())
        if S == 1 and int(batch.cache_rows[0]) == 0:
            fake = batch
        del cache_len
        return super().attention(q, k, v, sinks, k_cache, v_cache, fake, sliding_window, sm_scale)


# ---- rope --------------------------------------------------------------------------------------------

class RopeInterleaved(_Bad):
    name = "bad-rope-interleaved"
    BROKEN_OP = "rope"

    def rope(self, q, k, positions, inv_freq, concentration):
        angle = positions.to(inv_freq.dtype)[:, None] * inv_freq[None, :]
        cos = (angle.cos() * concentration).to(q.dtype)[:, None, :]
        sin = (angle.sin() * concentration).to(q.dtype)[:, None, :]

        def rotate(x):  # pairs (2i, 2i+1) — the GPT-J layout, not gpt-oss's halves
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)

        return rotate(q), rotate(k)


class RopeNoConcentration(_Bad):
    name = "bad-rope-no-yarn-concentration"
    BROKEN_OP = "rope"

    def rope(self, q, k, positions, inv_freq, concentration):
        return super().rope(q, k, positions, inv_freq, 1.0)


# ---- router ------------------------------------------------------------------------------------------

class RouterSoftmaxThenTopk(_Bad):
    name = "bad-router-softmax-all"
    BROKEN_OP = "router"

    def router(self, x, gate, top_k):
        probs = torch.softmax(self.linear(x, gate).float(), dim=-1)
        w, i = torch.topk(probs, top_k, dim=-1)
        return w.to(x.dtype), i


class RouterTiesHigh(_Bad):
    name = "bad-router-ties-high"
    BROKEN_OP = "router"

    def router(self, x, gate, top_k):
        logits = self.linear(x, gate)
        E = logits.shape[-1]
        flipped = logits.flip(-1)  # stable sort of the reversed row breaks ties toward the higher index
        values, idx = torch.sort(flipped, dim=-1, descending=True, stable=True)
        values, idx = values[:, :top_k], E - 1 - idx[:, :top_k]
        return torch.softmax(values, dim=-1), idx


# ---- experts -----------------------------------------------------------------------------------------

def _swiglu_variant(kind):
    def f(h, alpha, limit):
        gate, lin = h[..., 0::2], h[..., 1::2]
        if kind == "halves":  # gate | linear concatenated, as in some HF ports, not interleaved
            gate, lin = h.chunk(2, dim=-1)
        if kind != "no_clamp":
            gate = gate.clamp(max=limit)
            lin = lin.clamp(min=-limit, max=limit)
        plus = 0.0 if kind == "no_plus_one" else 1.0
        return gate * torch.sigmoid(alpha * gate) * (lin + plus)
    return f


class _SwigluBug(_Bad):
    BROKEN_OP = "experts"
    KIND = ""

    def experts(self, x, expert_weights, expert_indices, experts, swiglu_alpha, swiglu_limit):
        import mxmoe.backends.reference as ref

        orig = ref.swiglu
        ref.swiglu = _swiglu_variant(self.KIND)
        try:
            return super().experts(x, expert_weights, expert_indices, experts, swiglu_alpha, swiglu_limit)
        finally:
            ref.swiglu = orig


class SwigluNoClamp(_SwigluBug):
    name = "bad-swiglu-no-clamp"
    KIND = "no_clamp"


class SwigluNoPlusOne(_SwigluBug):
    name = "bad-swiglu-no-plus-one"
    KIND = "no_plus_one"


class SwigluHalves(_SwigluBug):
    name = "bad-swiglu-halves"
    KIND = "halves"


class _DequantBug(_Bad):
    """Dequantizes experts at load with a broken decoder."""

    BROKEN_OP = "experts"

    def decode(self, blocks, scales, dtype):
        raise NotImplementedError

    def prepare_experts(self, mlp1, mlp2, dtype, device):
        def conv(e: ExpertLinear) -> ExpertLinear:
            w = e.weight.to(dtype) if e.weight is not None else self.decode(e.blocks, e.scales, dtype)
            return ExpertLinear(bias=e.bias.to(device=device, dtype=dtype), weight=w.to(device))
        return _Experts(conv(mlp1), conv(mlp2), dtype)


class Mxfp4NibbleSwap(_DequantBug):
    name = "bad-mxfp4-nibble-swap"

    def decode(self, blocks, scales, dtype):
        swapped = ((blocks & 0x0F) << 4) | (blocks >> 4)
        return mxfp4.dequantize(swapped, scales, dtype)


class Mxfp4ScaleBias(_DequantBug):
    name = "bad-mxfp4-scale-bias"

    def decode(self, blocks, scales, dtype):
        # bias 128 instead of 127: every weight halved (0xFF stays NaN)
        return mxfp4.dequantize(blocks, scales, torch.float32).mul(0.5).to(dtype)


class AccumulateBf16(_Bad):
    """Keeps the linear layers' accumulator in the activation dtype across K tiles of 32."""

    name = "bad-accumulate-bf16"
    BROKEN_OP = "linear"

    def linear(self, x, layer: Linear):
        K = x.shape[-1]
        acc = torch.zeros(x.shape[0], layer.weight.shape[0], dtype=x.dtype, device=x.device)
        for k0 in range(0, K, 32):
            part = torch.nn.functional.linear(x[:, k0:k0 + 32].float(), layer.weight[:, k0:k0 + 32].float())
            acc = (acc.to(torch.bfloat16).float() + part).to(torch.bfloat16).to(x.dtype)
        return acc if layer.bias is None else acc + layer.bias


class WrongOutputDtype(_Bad):
    name = "bad-output-dtype"
    BROKEN_OP = "rms_norm"

    def rms_norm(self, x, scale, eps):
        return super().rms_norm(x, scale, eps).float()


class UnclaimedReturnsNumbers(_Bad):
    """Claims no float16, but runs it anyway instead of raising NotSupported."""

    name = "bad-unclaimed-numbers"
    BROKEN_OP = "linear"
    capabilities = Capabilities(**{**_REF_CAPS.model_dump(), "dtypes": ("float64", "float32", "bfloat16")})

    # Every op refuses float16 as it should — except the dense linear layer, which forgot the check.
    def prepare_linear(self, weight, bias, dtype, device):
        return Linear(weight.to(device=device, dtype=dtype), None if bias is None else bias.to(device=device, dtype=dtype))

    def embedding(self, token_ids, weight):
        self.check(dtype=weight.dtype)
        return super().embedding(token_ids, weight)

    def rms_norm(self, x, scale, eps):
        self.check(dtype=x.dtype)
        return super().rms_norm(x, scale, eps)

    def rope(self, q, k, *args):
        self.check(dtype=q.dtype)
        return super().rope(q, k, *args)

    def attention(self, q, *args):
        self.check(dtype=q.dtype)
        return super().attention(q, *args)

    def router(self, x, gate, top_k):
        self.check(dtype=x.dtype)
        return super().router(x, gate, top_k)


# ---- found by review: subtler bugs ------------------------------------------------------------------

def _attend(q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale, kv_of_head=None, use_window=None):
    """Plain attention (writes the cache, one sequence at a time) with two hooks for bugs: which KV head a
    query head reads, and whether the window applies for a sequence of ``ctx`` keys."""
    T, Hq, d = q.shape
    Hkv = k.shape[1]
    k_cache.view(-1, Hkv, d)[batch.slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, Hkv, d)[batch.slot_mapping] = v.to(v_cache.dtype)
    ct = torch.promote_types(q.dtype, torch.float32)
    heads = torch.tensor([kv_of_head(h, Hq, Hkv) if kv_of_head else h // (Hq // Hkv) for h in range(Hq)])
    out = torch.empty_like(q)
    for start, end, row, ctx in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist(),
                                    batch.cache_rows.tolist(), batch.context_lens.tolist()):
        ks = k_cache[row, :ctx].to(ct)[:, heads]
        vs = v_cache[row, :ctx].to(ct)[:, heads]
        s = torch.einsum("nhd,lhd->hnl", q[start:end].to(ct), ks) * sm_scale
        qp = batch.positions[start:end][:, None]
        kp = torch.arange(ctx, device=q.device)[None, :]
        mask = kp <= qp
        if sliding_window and (use_window is None or use_window(ctx)):
            mask = mask & (qp - kp < sliding_window)
        s = torch.cat((s.masked_fill(~mask, float("-inf")), sinks.to(ct)[:, None, None].expand(Hq, end - start, 1)), -1)
        p = torch.softmax(s, dim=-1)[..., :-1]
        out[start:end] = torch.einsum("hnl,lhd->nhd", p, vs).to(q.dtype)
    return out


class GqaModulo(_Bad):
    """GQA head mapping h % Hkv instead of h // (Hq / Hkv) (right only when Hkv is 1 or Hq)."""

    name = "bad-gqa-modulo"
    BROKEN_OP = "attention"

    def attention(self, *a):
        return _attend(*a, kv_of_head=lambda h, Hq, Hkv: h % Hkv)


class WindowDroppedSplitKV(_Bad):
    """A 'split-KV' long-decode path (KV length > 1100) that forgets the sliding window."""

    name = "bad-window-split-kv"
    BROKEN_OP = "attention"

    def attention(self, *a):
        return _attend(*a, use_window=lambda ctx: ctx <= 1100)


class RopeDecodeOffByOne(_Bad):
    """The single-token (decode) RoPE path uses position + 1."""

    name = "bad-rope-decode-off-by-one"
    BROKEN_OP = "rope"

    def rope(self, q, k, positions, inv_freq, concentration):
        return super().rope(q, k, positions + 1 if positions.numel() == 1 else positions, inv_freq, concentration)


class _ExpertBiasDropped(_Bad):
    BROKEN_OP = "experts"
    LAYER = ""

    def prepare_experts(self, mlp1, mlp2, dtype, device):
        def zero(e: ExpertLinear) -> ExpertLinear:
            return ExpertLinear(bias=torch.zeros_like(e.bias), blocks=e.blocks, scales=e.scales, weight=e.weight)
        return super().prepare_experts(zero(mlp1) if self.LAYER == "mlp1" else mlp1,
                                       zero(mlp2) if self.LAYER == "mlp2" else mlp2, dtype, device)


class ExpertsNoMlp1Bias(_ExpertBiasDropped):
    name = "bad-experts-no-mlp1-bias"
    LAYER = "mlp1"


class ExpertsNoMlp2Bias(_ExpertBiasDropped):
    name = "bad-experts-no-mlp2-bias"
    LAYER = "mlp2"


BAD_ENGINES = [SinksIgnored, WindowOffByOne, WindowIgnored, SlotMappingIgnored, RopeInterleaved, RopeNoConcentration,
               RouterSoftmaxThenTopk, RouterTiesHigh, SwigluNoClamp, SwigluNoPlusOne, SwigluHalves, Mxfp4NibbleSwap,
               Mxfp4ScaleBias, AccumulateBf16, WrongOutputDtype, UnclaimedReturnsNumbers, GqaModulo,
               WindowDroppedSplitKV, RopeDecodeOffByOne, ExpertsNoMlp1Bias, ExpertsNoMlp2Bias]
