"""Known-bad engines: the reference with one realistic porting bug each. The conformance suite must fail
every one of them, naming the broken op (tests/test_conformance_meta.py).

Each class's ``BROKEN_OP`` is the op the failure message must name; ``DTYPES`` the dtypes the bug shows
in (most in float32; precision bugs only in 16-bit dtypes); ``REAL_SHAPE`` whether only the real-shape
cases (gpt-oss's sizes) can see it.
"""

from __future__ import annotations

import torch

import torch.nn.functional as F

import mxmoe.backends.reference as reference
from mxmoe.backends.reference import TorchBackend
from mxmoe.core import mxfp4
from mxmoe.core.backend import Capabilities, Experts, Linear
from mxmoe.core.weights import ExpertLinear

_REF_CAPS = TorchBackend.capabilities


class _Bad(TorchBackend):
    version = "0.0.1-bad"
    BROKEN_OP = ""
    DTYPES = ("float32",)
    REAL_SHAPE = False


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
        if kind == "gate_both":
            gate = gate.clamp(min=-limit, max=limit)
            lin = lin.clamp(min=-limit, max=limit)
        elif kind != "no_clamp":
            gate = gate.clamp(max=limit)
            lin = lin.clamp(min=-limit, max=limit)
        plus = 0.0 if kind == "no_plus_one" else 1.0
        return gate * torch.sigmoid(alpha * gate) * (lin + plus)
    return f


class _SwigluBug(_Bad):
    BROKEN_OP = "experts"
    KIND = ""

    def expert_mlp(self, x, w1, b1, w2, b2, alpha, limit):  # the reference's loop body, with another SwiGLU
        return F.linear(_swiglu_variant(self.KIND)(F.linear(x, w1, b1), alpha, limit), w2, b2)


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
        return Experts(conv(mlp1), conv(mlp2), dtype)


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
    DTYPES = ("bfloat16", "float16")

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
    DTYPES = ("bfloat16",)

    def rms_norm(self, x, scale, eps):
        return super().rms_norm(x, scale, eps).float()


class _ChecksByHand(_Bad):
    """Turned the base class's enforcement off and checks every claim by hand in each op."""

    enforce_claims = False

    def prepare_linear(self, weight, bias, dtype, device):
        self.check_claims(None, device=device, dtype=dtype)
        return super().prepare_linear(weight, bias, dtype, device)

    def prepare_experts(self, mlp1, mlp2, dtype, device):
        self.check_claims("experts", device=device, dtype=dtype, num_experts=mlp1.num_experts,
                          expert_format="mxfp4" if mlp1.is_mxfp4 else "dense")
        return super().prepare_experts(mlp1, mlp2, dtype, device)

    def embedding(self, token_ids, weight):
        self.check_claims("embedding", weight)
        return super().embedding(token_ids, weight)

    def rms_norm(self, x, scale, eps):
        self.check_claims("rms_norm", x)
        return super().rms_norm(x, scale, eps)

    def rope(self, q, k, *args):
        self.check_claims("rope", q, head_dim=q.shape[-1])
        return super().rope(q, k, *args)

    def attention(self, q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale):
        self.check_claims("attention", q, head_dim=q.shape[-1], sinks=True, sliding_window=sliding_window,
                          context=self.context_checked(batch))
        return super().attention(q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale)

    def context_checked(self, batch):
        return batch.max_context_len

    def router(self, x, gate, top_k):
        self.check_claims("router", x, num_experts=gate.weight.shape[0], top_k=top_k)
        return super().router(x, gate, top_k)

    def experts(self, x, w, idx, experts, *args):
        self.check_claims("experts", x, num_experts=experts.num_experts, top_k=idx.shape[-1])
        return super().experts(x, w, idx, experts, *args)


class UnclaimedReturnsNumbers(_ChecksByHand):
    """Claims no float16, but its dense layers run it anyway: the hand-written check was forgotten there."""

    name = "bad-unclaimed-numbers"
    BROKEN_OP = "linear"
    capabilities = Capabilities(**{**_REF_CAPS.model_dump(), "dtypes": ("float64", "float32", "bfloat16")})

    def prepare_linear(self, weight, bias, dtype, device):
        return Linear(weight.to(device=device, dtype=dtype), None if bias is None else bias.to(device=device, dtype=dtype))


class UnclaimedContextReturnsNumbers(_ChecksByHand):
    """Claims at most 8192 keys, checks everything by hand but the context, and computes longer ones."""

    name = "bad-unclaimed-context-numbers"
    BROKEN_OP = "attention"
    capabilities = _REF_CAPS.model_copy(update={"max_context": 8192})

    def context_checked(self, batch):
        return None


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


# ---- bugs that live only at gpt-oss's sizes (issue 8, part 2) ----------------------------------------------

class GqaKvHeadsMod4(_Bad):
    """A kernel that packs the KV head into a 2-bit field: right up to 4 KV heads (gpt-oss has 8)."""

    name = "bad-gqa-kv-heads-mod-4"
    BROKEN_OP = "attention"

    def attention(self, *a):
        return _attend(*a, kv_of_head=lambda h, Hq, Hkv: (h // (Hq // Hkv)) % 4)


class DecodeTileDropsTail(_Bad):
    """Decode batches processed in tiles of 16 sequences, the grid computed as S // 16 (at least 1): the
    sequences past the last full tile get no output."""

    name = "bad-decode-tile-drops-tail"
    BROKEN_OP = "attention"

    def attention(self, q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale):
        out = super().attention(q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale)
        S = batch.num_seqs
        if batch.max_seqlen == 1 and S > 16:
            kept = max(1, S // 16) * 16
            out[kept:] = 0  # one token per sequence: token s belongs to sequence s
        return out


class AttentionIndex16Bit(_Bad):
    """Key offsets computed in 16-bit signed arithmetic: past 32767 keys they wrap (key j reads j - 32768)."""

    name = "bad-attention-index-16-bit"
    BROKEN_OP = "attention"
    REAL_SHAPE = True

    def attention(self, q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale):
        T, Hq, d = q.shape
        Hkv = k.shape[1]
        k_cache.view(-1, Hkv, d)[batch.slot_mapping] = k.to(k_cache.dtype)
        v_cache.view(-1, Hkv, d)[batch.slot_mapping] = v.to(v_cache.dtype)
        ct = torch.promote_types(q.dtype, torch.float32)
        out = torch.empty_like(q)
        for start, end, row, ctx in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist(),
                                        batch.cache_rows.tolist(), batch.context_lens.tolist()):
            keys = torch.arange(ctx) & 0x7FFF  # the wrapped offset
            o = reference.attention_one_sequence(q[start:end].to(ct), k_cache[row, keys].to(ct),
                                                 v_cache[row, keys].to(ct), sinks, batch.positions[start:end],
                                                 sliding_window, sm_scale)
            out[start:end] = o.to(q.dtype)
        return out


class ExpertIndex6Bit(_Bad):
    """The expert id kept in 6 bits when looking up weights: experts 64.. read experts 0.. (gpt-oss-120b has
    128)."""

    name = "bad-expert-index-6-bit"
    BROKEN_OP = "experts"

    def experts(self, x, expert_weights, expert_indices, experts, swiglu_alpha, swiglu_limit):
        return super().experts(x, expert_weights, expert_indices & 63, experts, swiglu_alpha, swiglu_limit)


class ExpertTokenTileDrop(_Bad):
    """At most one tile of 256 tokens per expert: the tokens after the first 256 routed to an expert are lost
    (a 300-token prompt on one expert)."""

    name = "bad-expert-token-tile-drop"
    BROKEN_OP = "experts"

    def experts(self, x, expert_weights, expert_indices, experts, swiglu_alpha, swiglu_limit):
        T, D = x.shape
        out = torch.zeros(T, D, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        xc = x.to(experts.dtype)
        for e in torch.unique(expert_indices).tolist():
            token, slot = torch.nonzero(expert_indices == e, as_tuple=True)
            token, slot = token[:256], slot[:256]
            y = reference.expert_mlp(xc[token], experts.mlp1.expert_weight(e, experts.dtype), experts.mlp1.bias[e],
                                     experts.mlp2.expert_weight(e, experts.dtype), experts.mlp2.bias[e],
                                     swiglu_alpha, swiglu_limit)
            out.index_add_(0, token, (y * expert_weights[token, slot, None]).to(out.dtype))
        return out.to(x.dtype)


class LinearNTailDropped(_Bad):
    """Output columns in tiles of 256; a partial last tile is never written (zeros) once N exceeds a tile."""

    name = "bad-linear-n-tail-dropped"
    BROKEN_OP = "linear"

    def linear(self, x, layer: Linear):
        y = super().linear(x, layer)
        N = y.shape[-1]
        if N > 256 and N % 256:
            y[:, N - N % 256:] = 0
        return y


class ExpertsKTailDropped(_Bad):
    """The experts' dot products loop over whole K tiles of 128 once K exceeds one tile, dropping the tail
    (gpt-oss's K = 2880 loses its last 64; 160 loses 32)."""

    name = "bad-experts-k-tail-dropped"
    BROKEN_OP = "experts"

    @staticmethod
    def expert_mlp(x, w1, b1, w2, b2, alpha, limit):
        def dot(a, w, b):
            K = a.shape[-1]
            k = K - K % 128 if K > 128 else K
            return F.linear(a[:, :k], w[:, :k], b)

        return dot(reference.swiglu(dot(x, w1, b1), alpha, limit), w2, b2)


class E8M0ExponentBits(_DequantBug):
    """Scales decoded by writing the byte into a float32's exponent field: byte 0 becomes 0.0 (not 2^-127)
    and 255 becomes +inf (not NaN); every other byte is right."""

    name = "bad-e8m0-exponent-bits"

    def decode(self, blocks, scales, dtype):
        w = mxfp4.dequantize(blocks, torch.full_like(scales, 127), torch.float32)  # element values, scale 1
        powers = torch.exp2(scales.to(torch.float32) - 127)
        powers = torch.where(scales == 0, 0.0, powers)
        powers = torch.where(scales == 255, torch.inf, powers)
        return (w.view(*scales.shape, 32) * powers[..., None]).reshape(w.shape).to(dtype)


# ---- precision promises broken (issue 8, part 3) -----------------------------------------------------------

class RmsNormBf16SumSquares(_Bad):
    """The mean of squares kept in the activation dtype (squares and their mean rounded to bf16)."""

    name = "bad-rms-norm-bf16-sum-squares"
    BROKEN_OP = "rms_norm"
    DTYPES = ("bfloat16", "float16")

    def rms_norm(self, x, scale, eps):
        ms = x.pow(2).mean(dim=-1, keepdim=True)  # in x's dtype
        t = x.float() * torch.rsqrt(ms.float() + eps)
        return (t * scale.float()).to(x.dtype)


class SwigluGateClampBothSides(_SwigluBug):
    """The gate clamped to ±limit (it is clamped above only)."""

    name = "bad-swiglu-gate-clamp-both-sides"
    KIND = "gate_both"
    DTYPES = ("float32", "bfloat16")


class ExpertsAccumulateBf16(_Bad):
    """The experts' dot products (mlp1 and mlp2) accumulated in the activation dtype across K tiles of 32."""

    name = "bad-experts-accumulate-bf16"
    BROKEN_OP = "experts"
    DTYPES = ("bfloat16", "float16")
    REAL_SHAPE = True  # the reductions of 4096+ that show it are real-shape cases

    @staticmethod
    def expert_mlp(x, w1, b1, w2, b2, alpha, limit):
        def dot(a, w, b):
            acc = torch.zeros(a.shape[0], w.shape[0], dtype=a.dtype, device=a.device)
            for k0 in range(0, a.shape[-1], 32):
                acc = (acc.float() + F.linear(a[:, k0:k0 + 32].float(), w[:, k0:k0 + 32].float())).to(a.dtype)
            return acc + b

        return dot(reference.swiglu(dot(x, w1, b1), alpha, limit), w2, b2)


class RopeAngleBf16(_Bad):
    """The rotation angle position · frequency computed in the activation dtype."""

    name = "bad-rope-angle-bf16"
    BROKEN_OP = "rope"
    DTYPES = ("bfloat16", "float16")

    def rope(self, q, k, positions, inv_freq, concentration):
        return super().rope(q, k, positions.to(q.dtype), inv_freq.to(q.dtype), concentration)


class AttentionDenominatorBf16(_Bad):
    """The softmax normaliser summed in the activation dtype, one tile of 32 keys at a time."""

    name = "bad-attention-denominator-bf16"
    BROKEN_OP = "attention"
    DTYPES = ("bfloat16",)

    def attention(self, q, *args):
        self.act_dtype = q.dtype  # the reference hands attention_one_sequence float32 (or float64) values
        return super().attention(q, *args)

    def attention_one_sequence(self, q, k, v, sinks, q_positions, sliding_window, sm_scale):
        Hq, Hkv = q.shape[1], k.shape[1]
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        s = torch.einsum("nhd,lhd->hnl", q, k) * sm_scale
        qp, kp = q_positions[:, None], torch.arange(k.shape[0], device=q.device)[None, :]
        ok = kp <= qp
        if sliding_window:
            ok &= qp - kp < sliding_window
        s = s.masked_fill(~ok, float("-inf"))
        m = torch.maximum(s.amax(-1, keepdim=True), sinks.to(q.dtype)[:, None, None])
        p = torch.exp(s - m)
        act = self.act_dtype
        denom = torch.exp(sinks.to(q.dtype)[:, None, None] - m).to(act)
        for j0 in range(0, p.shape[-1], 32):
            denom = (denom.to(q.dtype) + p[..., j0:j0 + 32].sum(-1, keepdim=True)).to(act)
        return torch.einsum("hnl,lhd->nhd", p / denom.to(q.dtype), v)


# ---- fused ops (API 1.2) ------------------------------------------------------------------------------------

class AddRmsNormOfX(_Bad):
    """The fused residual add + RMSNorm normalises x, not x + delta (the norm's input not updated)."""

    name = "bad-add-rms-norm-of-x"
    BROKEN_OP = "add_rms_norm"
    DTYPES = ("float32", "bfloat16")

    def add_rms_norm(self, x, delta, scale, eps):
        return x + delta, self.rms_norm(x, scale, eps)


class AddRmsNormSumFloat32(_Bad):
    """Keeps the residual stream in float32: s is returned unrounded (a float32 tensor)."""

    name = "bad-add-rms-norm-sum-float32"
    BROKEN_OP = "add_rms_norm"
    DTYPES = ("bfloat16",)

    def add_rms_norm(self, x, delta, scale, eps):
        s = x.float() + delta.float()
        return s, self.rms_norm(s, scale, eps).to(x.dtype)


class AddRmsNormOfUnroundedSum(_Bad):
    """Returns s rounded to x's dtype, but normalises the float32 sum it had before rounding."""

    name = "bad-add-rms-norm-unrounded-sum"
    BROKEN_OP = "add_rms_norm"
    DTYPES = ("bfloat16",)

    def add_rms_norm(self, x, delta, scale, eps):
        s = x.float() + delta.float()
        return s.to(x.dtype), self.rms_norm(s, scale, eps).to(x.dtype)


BAD_ENGINES = [SinksIgnored, WindowOffByOne, WindowIgnored, SlotMappingIgnored, RopeInterleaved, RopeNoConcentration,
               RouterSoftmaxThenTopk, RouterTiesHigh, SwigluNoClamp, SwigluNoPlusOne, SwigluHalves, Mxfp4NibbleSwap,
               Mxfp4ScaleBias, AccumulateBf16, WrongOutputDtype, UnclaimedReturnsNumbers, GqaModulo,
               WindowDroppedSplitKV, RopeDecodeOffByOne, ExpertsNoMlp1Bias, ExpertsNoMlp2Bias,
               # part 2: sizes
               GqaKvHeadsMod4, DecodeTileDropsTail, AttentionIndex16Bit, ExpertIndex6Bit, ExpertTokenTileDrop,
               LinearNTailDropped, ExpertsKTailDropped, E8M0ExponentBits,
               # part 3: precision
               RmsNormBf16SumSquares, SwigluGateClampBothSides, ExpertsAccumulateBf16, RopeAngleBf16,
               AttentionDenominatorBf16,
               # claims
               UnclaimedContextReturnsNumbers,
               # fused ops (API 1.2)
               AddRmsNormOfX, AddRmsNormSumFloat32, AddRmsNormOfUnroundedSum]


# ---- claims that only a GPU can check (tests/test_conformance_meta.py, on CUDA) -------------------------------

def _static_shapes():
    import honest_engines  # noqa: PLC0415 — tests/ is on sys.path wherever this module is

    return honest_engines.StaticShapes


class GraphHostSync(_static_shapes()):
    """Claims cuda_graphs, but its attention reads the longest context back to the host (``.item()``): fine
    eagerly, impossible to capture."""

    name = "bad-graph-host-sync"
    version = "0.0.1-bad"
    BROKEN_OP = "attention"

    def attention(self, q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale):
        longest = int(batch.context_lens.max())  # a host synchronisation
        assert longest <= k_cache.shape[1]
        return super().attention(q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale)


GPU_BAD_ENGINES = [GraphHostSync]
