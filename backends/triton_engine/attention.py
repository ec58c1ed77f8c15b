"""Attention with learned sinks, sliding window, GQA and a caller-owned KV cache (one row per sequence), in Triton.

Three kernels and a merge, each beside its plain-PyTorch reference:

* ``kv_cache_write``: the new tokens' keys/values into the caller's cache at ``batch.slot_mapping``.
* ``prefill_attention``: flash-attention over varlen sequences (cached + new keys, causal, window),
  online softmax in float32 with exp2, the sink as the initial running max / normaliser.
* ``decode_attention``: one new token per sequence, split-KV ("flash-decoding"): one program per
  (sequence, KV head, split) serves the KV head's whole query group, reading each key once; a merge
  kernel combines the splits and adds the sink once, in the same (base-2) log base.
* ``rope_decode_attention``: the decode step fused into one kernel (``Backend.rope_attention``, API 1.2):
  RoPE of q and k in registers (as ops.py's rope kernel, bit for bit), the cache write, the split-KV
  decode with the new key from registers, and the merge by the last split to finish (an atomic counter
  elects it; it sums in split order, so results do not depend on which one it is).

Everything is CUDA-graph capturable: grids depend only on host-side shapes and the batch's host maxima,
which may be upper bounds; programs find their real extent in the device tensors (cu_seqlens,
positions, context_lens). The semantics are those of ``Backend.attention`` and ``Backend.rope_attention``
(core/backend.py).

Shape legend: T new tokens, S sequences, Hq/Hkv query/KV heads, G = Hq/Hkv, d head_dim,
R cache rows, C cache_len, P decode splits.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mxmoe.backends.triton_engine.pdl import launch_options, wait_for_predecessor
from mxmoe.backends.triton_engine.sync import last_to_arrive
from mxmoe.core.batch import Batch

from .ops import rope, rope_ref

LOG2E = 1.4426950408889634  # 1/ln(2): exp(x) = exp2(x * LOG2E)
_INT32_MAX = 2**31 - 1


def _interpreting() -> bool:
    # Triton's CPU interpreter computes tl.dot on bf16 operands wrongly (FACTS.md): dots go through fp32 there.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_FP32, INPUT_PRECISION): float32 activations get IEEE float32 dots, never TF32."""
    dot_fp32 = _interpreting() or dtype == torch.float32
    return dot_fp32, "ieee" if dot_fp32 else "tf32"  # "tf32" is ignored for 16-bit operands


def _bf16_rtne(dtype: torch.dtype) -> bool:
    # The interpreter (triton 3.9) converts float32 -> bf16 by truncation, ignoring fp_downcast_rounding; the
    # GPU rounds to nearest even. Rounding by hand there keeps CPU runs on the GPU's numerics.
    return _interpreting() and dtype == torch.bfloat16


@triton.jit
def _to_bf16_rtne(x):
    # float32 -> bf16, round to nearest even, by bits: the conversion after it is then exact.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


# ================================================================================================
# KV-cache write
# ================================================================================================

# T tokens, BLOCK_H of the Hkv heads, d head_dim: k[t], v[t] -> cache[row, pos] with slot = row * C + pos
@triton.jit
def _kv_cache_write_kernel(K, V, K_cache, V_cache, Slot_mapping, cache_len,
                           stride_k_t, stride_k_h, stride_v_t, stride_v_h,
                           stride_kc_r, stride_kc_l, stride_kc_h, stride_vc_r, stride_vc_l, stride_vc_h,
                           NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                           BF16_RTNE: tl.constexpr, GDC: tl.constexpr = False):
    wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    slot = tl.load(Slot_mapping + pid_t).to(tl.int64)
    if slot < 0:  # a padding token (vLLM's convention): nothing to write
        return
    row = slot // cache_len
    pos = slot % cache_len
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_h = (offs_h < NUM_KV_HEADS)[:, None]
    t = pid_t.to(tl.int64)
    k = tl.load(K + t * stride_k_t + offs_h[:, None] * stride_k_h + offs_d[None, :], mask=mask_h)
    v = tl.load(V + t * stride_v_t + offs_h[:, None] * stride_v_h + offs_d[None, :], mask=mask_h)
    # row * stride_r can pass 2^31 elements in a cache of many rows: int64 (row is int64).
    kc_ptrs = K_cache + row * stride_kc_r + pos * stride_kc_l + offs_h[:, None] * stride_kc_h + offs_d[None, :]
    vc_ptrs = V_cache + row * stride_vc_r + pos * stride_vc_l + offs_h[:, None] * stride_vc_h + offs_d[None, :]
    if BF16_RTNE:
        k = _to_bf16_rtne(k.to(tl.float32))
        v = _to_bf16_rtne(v.to(tl.float32))
    tl.store(kc_ptrs, k.to(K_cache.dtype.element_ty), mask=mask_h)
    tl.store(vc_ptrs, v.to(V_cache.dtype.element_ty), mask=mask_h)


def kv_cache_write_ref(k, v, k_cache, v_cache, slot_mapping):
    """k, v (T, Hkv, d) into k_cache/v_cache (R, C, Hkv, d) at flat slots ``row * C + pos``; slots < 0 skipped."""
    R, C, Hkv, d = k_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache[slots // C, slots % C] = k[keep].to(k_cache.dtype)
    v_cache[slots // C, slots % C] = v[keep].to(v_cache.dtype)


def kv_cache_write(k, v, k_cache, v_cache, slot_mapping):
    """Triton version of :func:`kv_cache_write_ref` (same signature); writes the caches in place."""
    T, Hkv, d = k.shape
    _check_cache(k_cache, v_cache, Hkv, d)
    if v.shape != k.shape or slot_mapping.shape != (T,):
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} and slot_mapping {tuple(slot_mapping.shape)} "
                         "must be (T, Hkv, d), (T, Hkv, d), (T,)")
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    if T == 0:
        return
    block_h = min(triton.next_power_of_2(Hkv), max(1, 2048 // d))  # up to 2048 elements a program
    grid = (T, triton.cdiv(Hkv, block_h))
    _kv_cache_write_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping, k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=Hkv, HEAD_DIM=d, BLOCK_H=block_h, BF16_RTNE=_bf16_rtne(k_cache.dtype),
        num_warps=1 if block_h * d <= 512 else 4, **launch_options(k))


# ================================================================================================
# The online-softmax step shared by prefill and decode (log base 2 throughout)
# ================================================================================================

# M query rows, N keys, d head_dim: fold one block of keys into the running (acc, l, m)
@triton.jit
def _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, allowed, MASKED: tl.constexpr,
                         DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr):
    if DOT_FP32:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    # qk_scale = sm_scale * log2(e): scores are in base-2 units, so exp2 below is the softmax's exp.
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # (M, N)
    if MASKED:
        s = tl.where(allowed, s, float("-inf"))
    # m_i starts at the (finite) sink, so m_new is finite and fully masked rows give p = 0, never NaN.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # P is rounded to the activations' dtype for the P.V product, as on the GPU's tensor cores.
    if BF16_RTNE:
        p = _to_bf16_rtne(p)
    else:
        p = p.to(v.dtype)
    if DOT_FP32:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


# ================================================================================================
# Prefill (varlen, chunked: new tokens attend to their sequence's cached + new keys)
# ================================================================================================

# M query rows (tokens of one sequence, one query head), N keys per block, d head_dim
@triton.jit
def _prefill_kernel(Q, K_cache, V_cache, Sinks, Out, Cu_seqlens, Positions, Context_lens, Cache_rows, qk_scale,
                    stride_q_t, stride_q_h, stride_kc_r, stride_kc_l, stride_kc_h,
                    stride_vc_r, stride_vc_l, stride_vc_h, stride_o_t, stride_o_h,
                    GROUP: tl.constexpr, SLIDING_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr):
    # Query heads vary fastest: the G heads of one KV group run side by side and share its keys in L2.
    pid_h = tl.program_id(0)
    # Last query blocks first: under the causal mask they have the most keys (shorter tail of the launch).
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    pid_s = tl.program_id(2)
    seq_start = tl.load(Cu_seqlens + pid_s)
    seq_len = (tl.load(Cu_seqlens + pid_s + 1) - seq_start).to(tl.int32)
    if pid_m * BLOCK_M >= seq_len:  # the grid is sized by the host's max_seqlen, an upper bound
        return
    ctx = tl.load(Context_lens + pid_s).to(tl.int32)
    row = tl.load(Cache_rows + pid_s).to(tl.int64)
    kvh = pid_h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < seq_len
    tok = seq_start + offs_m  # int64
    q_pos = tl.load(Positions + tok, mask=mask_m, other=0).to(tl.int32)
    q = tl.load(Q + tok[:, None] * stride_q_t + pid_h * stride_q_h + offs_d[None, :], mask=mask_m[:, None],
                other=0.0)
    pos_min = tl.min(tl.where(mask_m, q_pos, 2147483647), 0)
    pos_max = tl.max(tl.where(mask_m, q_pos, -1), 0)

    # Keys [lo, hi) matter to some row of this block; keys [f_lo, f_hi) to every row, so whole blocks of
    # those need no mask. Blocks outside [lo, hi) (past the diagonal, before the window) are never read.
    hi = tl.minimum(ctx, pos_max + 1)
    if SLIDING_WINDOW > 0:
        lo = tl.maximum(pos_min - SLIDING_WINDOW + 1, 0)
        f_lo = tl.minimum(tl.maximum(pos_max - SLIDING_WINDOW + 1, lo), hi)
    else:
        lo = 0
        f_lo = 0
    f_hi = tl.maximum(tl.minimum(pos_min + 1, hi), f_lo)
    mid_end = f_lo + (f_hi - f_lo) // BLOCK_N * BLOCK_N

    k_base = K_cache + row * stride_kc_r + kvh * stride_kc_h  # int64: many rows pass 2^31 elements
    v_base = V_cache + row * stride_vc_r + kvh * stride_vc_h
    # The sink is the softmax's initial running max (m) and normaliser (l = exp2(sink - m) = 1).
    sink = tl.load(Sinks + pid_h).to(tl.float32) * 1.4426950408889634  # log2(e): base-2 units
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
    l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if SLIDING_WINDOW > 0:  # the band's lower edge: keys some rows' windows have already left
        for start_n in range(lo, f_lo, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < f_lo
            k = tl.load(k_base + offs_n[:, None] * stride_kc_l + offs_d[None, :], mask=mask_n[:, None], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vc_l + offs_d[None, :], mask=mask_n[:, None], other=0.0)
            allowed = (mask_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
                       & (q_pos[:, None] - offs_n[None, :] < SLIDING_WINDOW))
            acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, allowed, True,
                                                 DOT_FP32, INPUT_PRECISION, BF16_RTNE)
    for start_n in range(f_lo, mid_end, BLOCK_N):  # every row sees every key: no mask
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[:, None] * stride_kc_l + offs_d[None, :])
        v = tl.load(v_base + offs_n[:, None] * stride_vc_l + offs_d[None, :])
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, None, False,
                                             DOT_FP32, INPUT_PRECISION, BF16_RTNE)
    for start_n in range(mid_end, hi, BLOCK_N):  # the diagonal (and whatever the window cuts in it)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi  # keys at or past ctx are unwritten slots (NaN in a poisoned cache): never loaded
        k = tl.load(k_base + offs_n[:, None] * stride_kc_l + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vc_l + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        allowed = mask_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if SLIDING_WINDOW > 0:
            allowed = allowed & (q_pos[:, None] - offs_n[None, :] < SLIDING_WINDOW)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, allowed, True,
                                             DOT_FP32, INPUT_PRECISION, BF16_RTNE)

    out = acc / l_i[:, None]
    if BF16_RTNE:
        out = _to_bf16_rtne(out)
    o_ptrs = Out + tok[:, None] * stride_o_t + pid_h * stride_o_h + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None])


def prefill_attention(q, k_cache, v_cache, sinks, batch: Batch, sliding_window: int, sm_scale: float, *,
                      out: torch.Tensor | None = None, block_m: int | None = None, block_n: int | None = None,
                      num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Attention of every new token over its sequence's cache (already written). Returns out (T, Hq, d)."""
    T, Hq, d = q.shape
    Hkv = _check_attention(q, k_cache, v_cache, sinks, batch)
    q, sinks = _last_dim_contiguous(q), sinks.contiguous()
    out = _output(q, out)
    S = batch.num_seqs
    if T == 0 or S == 0:
        return out
    dot_fp32, precision = _dot_flags(q.dtype)
    if _interpreting():
        cfg = (16, 16, 4, 1)
    elif q.dtype == torch.float32:  # IEEE float32 dots: no tensor cores, and twice the shared memory
        cfg = (64, 32, 4, 3)
    elif d <= 64 and not sliding_window:
        cfg = (128, 64, 8, 3)  # H200 sweep (NOTES-attention.md): best for the 2k prompt, 2% off at 8 x 512
    else:
        # With a window every block is masked band work: smaller query blocks waste fewer keys (H200: 46 us
        # for M64 vs 59 us for M128 on a 2k prompt with W = 128). d = 128: not measured yet.
        cfg = (64, 64, 4, 3)
    block_m, block_n = block_m or cfg[0], block_n or cfg[1]
    num_warps, num_stages = num_warps or cfg[2], num_stages or cfg[3]
    # Fewer query blocks than max_seqlen / BLOCK_M would be wrong; more are harmless (they exit).
    grid = (Hq, triton.cdiv(batch.max_seqlen, block_m), S)
    _prefill_kernel[grid](
        q, k_cache, v_cache, sinks, out, batch.cu_seqlens, batch.positions, batch.context_lens, batch.cache_rows,
        sm_scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        GROUP=Hq // Hkv, SLIDING_WINDOW=int(sliding_window), HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision, BF16_RTNE=_bf16_rtne(q.dtype),
        num_warps=num_warps, num_stages=num_stages)
    return out


@triton.jit
def _split_band(pos, ctx, pid_p, num_splits, SLIDING_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    # The band of keys a query at pos sees, [lo, hi), and the blocks [block_start, block_end) of it that split
    # pid_p takes. The splits share the band as evenly as the *real* length allows (the grid's split count comes
    # from host maxima that may only be upper bounds).
    hi = tl.minimum(ctx, pos + 1)
    if SLIDING_WINDOW > 0:
        lo = tl.maximum(pos - SLIDING_WINDOW + 1, 0)
    else:
        lo = 0
    num_blocks = tl.cdiv(hi - lo, BLOCK_N)
    blocks_per_split = tl.cdiv(num_blocks, num_splits)
    block_start = pid_p * blocks_per_split
    return lo, hi, block_start, tl.minimum(block_start + blocks_per_split, num_blocks)


@triton.jit
def _finish_split(acc, l_i, m_i, sink, Out, M_part, L_part, Acc_part, token, pid_s, pid_p, heads, mask_g, offs_d,
                  stride_o_t, stride_o_h, stride_ml_s, stride_ml_h, stride_acc_s, stride_acc_h, stride_acc_p,
                  ONE_SPLIT: tl.constexpr, BF16_RTNE: tl.constexpr):
    # One split's end: with ONE_SPLIT normalise here (the sink's mass included) and write the output; else store
    # the split's running max, normaliser and accumulator for the merge.
    if ONE_SPLIT:
        out = _round_to(acc / (l_i + tl.math.exp2(sink - m_i))[:, None], Out.dtype.element_ty, BF16_RTNE)
        tl.store(Out + token * stride_o_t + heads[:, None] * stride_o_h + offs_d[None, :], out, mask=mask_g[:, None])
    else:
        ml_offs = pid_s * stride_ml_s + heads * stride_ml_h + pid_p
        tl.store(M_part + ml_offs, m_i, mask=mask_g)
        tl.store(L_part + ml_offs, l_i, mask=mask_g)
        acc_ptrs = (Acc_part + pid_s * stride_acc_s + heads[:, None] * stride_acc_h + pid_p * stride_acc_p
                    + offs_d[None, :])
        tl.store(acc_ptrs, acc, mask=mask_g[:, None])


# ================================================================================================
# Decode (one new token per sequence): split-KV, then merge
# ================================================================================================

# G query heads of one KV head (padded to G_PAD >= 16 rows for tl.dot), N keys per block, d head_dim
@triton.jit
def _decode_split_kernel(Q, K_cache, V_cache, Sinks, Out, M_part, L_part, Acc_part,
                         Cu_seqlens, Positions, Context_lens, Cache_rows, qk_scale,
                         stride_q_t, stride_q_h, stride_kc_r, stride_kc_l, stride_kc_h,
                         stride_vc_r, stride_vc_l, stride_vc_h, stride_o_t, stride_o_h,
                         stride_ml_s, stride_ml_h, stride_acc_s, stride_acc_h, stride_acc_p, num_splits,
                         GROUP: tl.constexpr, G_PAD: tl.constexpr, SLIDING_WINDOW: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr,
                         DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
                         GDC: tl.constexpr = False):
    wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written
    pid_s = tl.program_id(0)
    pid_kvh = tl.program_id(1)
    pid_p = tl.program_id(2)
    token = tl.load(Cu_seqlens + pid_s)
    if tl.load(Cu_seqlens + pid_s + 1) == token:  # a sequence without a new token: nothing to attend
        return
    pos = tl.load(Positions + token).to(tl.int32)
    ctx = tl.load(Context_lens + pid_s).to(tl.int32)
    row = tl.load(Cache_rows + pid_s).to(tl.int64)

    lo, hi, block_start, block_end = _split_band(pos, ctx, pid_p, num_splits, SLIDING_WINDOW, BLOCK_N)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_g = offs_g < GROUP
    heads = pid_kvh * GROUP + offs_g
    q = tl.load(Q + token * stride_q_t + heads[:, None] * stride_q_h + offs_d[None, :], mask=mask_g[:, None],
                other=0.0)
    # Every split starts its running max at the sink (finite: no NaN from all-masked blocks) with l = 0;
    # the sink's own mass exp2(sink - m) is added once, by the merge (or below when there is one split).
    sink = tl.load(Sinks + heads, mask=mask_g, other=0.0).to(tl.float32) * 1.4426950408889634
    m_i = sink
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, HEAD_DIM], dtype=tl.float32)

    k_base = K_cache + row * stride_kc_r + pid_kvh * stride_kc_h  # int64: many rows pass 2^31 elements
    v_base = V_cache + row * stride_vc_r + pid_kvh * stride_vc_h
    for b in range(block_start, block_end):
        offs_n = lo + b * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        k = tl.load(k_base + offs_n[:, None] * stride_kc_l + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vc_l + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, mask_n[None, :], True,
                                             DOT_FP32, INPUT_PRECISION, BF16_RTNE)

    _finish_split(acc, l_i, m_i, sink, Out, M_part, L_part, Acc_part, token, pid_s, pid_p, heads, mask_g, offs_d,
                  stride_o_t, stride_o_h, stride_ml_s, stride_ml_h, stride_acc_s, stride_acc_h, stride_acc_p,
                  DIRECT, BF16_RTNE)


# P splits (padded to P_PAD), d head_dim: one (sequence, query head)'s partial softmax states -> output
@triton.jit
def _decode_merge_kernel(Out, Sinks, M_part, L_part, Acc_part, Cu_seqlens,
                         stride_o_t, stride_o_h, stride_ml_s, stride_ml_h, stride_acc_s, stride_acc_h, stride_acc_p,
                         num_splits, P_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BF16_RTNE: tl.constexpr,
                         GDC: tl.constexpr = False):
    wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written
    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    token = tl.load(Cu_seqlens + pid_s)
    if tl.load(Cu_seqlens + pid_s + 1) == token:
        return
    offs_p = tl.arange(0, P_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_p = offs_p < num_splits
    ml_offs = pid_s * stride_ml_s + pid_h * stride_ml_h + offs_p
    m = tl.load(M_part + ml_offs, mask=mask_p, other=float("-inf"))  # base 2, each >= the sink
    l = tl.load(L_part + ml_offs, mask=mask_p, other=0.0)
    acc = tl.load(Acc_part + pid_s * stride_acc_s + pid_h * stride_acc_h + offs_p[:, None] * stride_acc_p
                  + offs_d[None, :], mask=mask_p[:, None], other=0.0)
    # The sink, in the same base-2 units as the splits' maxima, counted exactly once.
    sink = tl.load(Sinks + pid_h).to(tl.float32) * 1.4426950408889634
    m_all = tl.maximum(tl.max(m, 0), sink)
    w = tl.math.exp2(m - m_all)  # padded splits: exp2(-inf) = 0
    l_all = tl.sum(l * w, 0) + tl.math.exp2(sink - m_all)
    out = tl.sum(acc * w[:, None], 0) / l_all
    if BF16_RTNE:
        out = _to_bf16_rtne(out)
    tl.store(Out + token * stride_o_t + pid_h * stride_o_h + offs_d, out.to(Out.dtype.element_ty))


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: any small number exercises the split path
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, sliding_window: int,
                      block_n: int, num_sms: int, waves: int = 2, min_blocks: int = 5) -> int:
    """Splits per (sequence, KV head): enough programs to fill ``waves`` x the SMs, never more splits than
    the longest band has key blocks, and none for bands under ``min_blocks`` blocks (one program reads
    those faster than a merge launch costs). Host facts only (shapes, host maxima): a captured graph keeps it.

    H200 sweep (NOTES-attention.md): batch 1 with 8 KV heads -> 33 splits at 8k-131k context (within 3% of
    the best), 16 at 1k; batch 64 -> 1 (44 us vs 51 us with 2); window 128 -> 1 (3.1 us vs 4.3 us with 2).
    """
    band = min(max_context_len, sliding_window) if sliding_window > 0 else max_context_len
    max_blocks = max(1, triton.cdiv(band, block_n))
    if max_blocks < min_blocks:
        return 1
    want = triton.cdiv(waves * num_sms, max(1, num_seqs * num_kv_heads))
    return max(1, min(want, max_blocks))


def decode_attention(q, k_cache, v_cache, sinks, batch: Batch, sliding_window: int, sm_scale: float, *,
                     out: torch.Tensor | None = None, block_n: int | None = None, num_splits: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Attention of one new token per sequence (batch.max_seqlen == 1) over its cache (already written)."""
    T, Hq, d = q.shape
    Hkv = _check_attention(q, k_cache, v_cache, sinks, batch)
    if batch.max_seqlen != 1:
        raise ValueError(f"decode_attention serves one new token per sequence, got max_seqlen={batch.max_seqlen}")
    q, sinks = _last_dim_contiguous(q), sinks.contiguous()
    out = _output(q, out)
    S = batch.num_seqs
    if T == 0 or S == 0:
        return out
    dot_fp32, precision = _dot_flags(q.dtype)
    G = Hq // Hkv
    if block_n is None:
        block_n = 16 if _interpreting() else (64 if q.dtype != torch.float32 else 32)
    if num_splits is None:
        num_splits = decode_num_splits(S, Hkv, batch.max_context_len, int(sliding_window), block_n,
                                       _num_sms(q.device))
    if num_splits > 1:
        # Partial softmax states of every (sequence, query head, split): m, l in base 2, acc unnormalised.
        m_part = torch.empty((S, Hq, num_splits), dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty((S, Hq, num_splits, d), dtype=torch.float32, device=q.device)
    else:
        m_part = l_part = acc_part = torch.empty((1, 1, 1, 1), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(S, Hkv, num_splits)](
        q, k_cache, v_cache, sinks, out, m_part, l_part, acc_part,
        batch.cu_seqlens, batch.positions, batch.context_lens, batch.cache_rows, sm_scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        m_part.stride(0), m_part.stride(1), acc_part.stride(0), acc_part.stride(1), acc_part.stride(2), num_splits,
        GROUP=G, G_PAD=max(16, triton.next_power_of_2(G)), SLIDING_WINDOW=int(sliding_window), HEAD_DIM=d,
        BLOCK_N=block_n, DIRECT=num_splits == 1, DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        BF16_RTNE=_bf16_rtne(q.dtype),
        num_warps=num_warps or 4, num_stages=num_stages or 3, **launch_options(q))
    if num_splits > 1:
        _decode_merge_kernel[(S, Hq)](
            out, sinks, m_part, l_part, acc_part, batch.cu_seqlens,
            out.stride(0), out.stride(1), m_part.stride(0), m_part.stride(1),
            acc_part.stride(0), acc_part.stride(1), acc_part.stride(2), num_splits,
            P_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=d, BF16_RTNE=_bf16_rtne(q.dtype),
            num_warps=1 if num_splits * d <= 2048 else 4, **launch_options(out))
    return out


# ================================================================================================
# RoPE + KV-cache write + decode, fused: one kernel a layer at decode (Backend.rope_attention)
# ================================================================================================

@triton.jit
def _rope_cos_sin(pos, Inv_freq, offs_f, concentration):
    # cos/sin of the angle pos * inv_freq[f], as ops._rope_kernel computes them (the same float32 product, the
    # same float64 range reduction with 2π in three float32-exact parts, then float32 cos/sin): the fused
    # kernel rotates q and k bit for bit as the rope op does. See ops._rope_kernel for why.
    inv_freq = tl.load(Inv_freq + offs_f).to(tl.float32)
    angle = (pos.to(tl.float32) * inv_freq).to(tl.float64)
    turns = tl.floor(angle * 0.15915494 + 0.5)  # ≈ 1/(2π): any nearby integer will do
    reduced = angle - turns * 6.2831854820251465
    reduced = reduced - turns * -1.7484555314695172e-07
    reduced = (reduced - turns * -6.8604980400235275e-15).to(tl.float32)
    return tl.cos(reduced) * concentration, tl.sin(reduced) * concentration


@triton.jit
def _rotate(x, x_partner, cos, sin, first_half):
    # Halves, not interleaved pairs: channel i < d/2 pairs with i + d/2. Written per channel as ops._rope_kernel
    # writes per half: y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin.
    x = x.to(tl.float32)
    x_partner = x_partner.to(tl.float32)
    return tl.where(first_half, x * cos - x_partner * sin, x * cos + x_partner * sin)


@triton.jit
def _round_to(x, dtype: tl.constexpr, BF16_RTNE: tl.constexpr):
    if BF16_RTNE:
        return _to_bf16_rtne(x)
    return x.to(dtype)


# G query heads of one KV head (padded to G_PAD >= 16 rows for tl.dot), N keys per block, d head_dim: the
# token's q and k rotated in registers, its k and v written to the cache (split 0), one split of the band
# (cached keys from the cache, the new key from registers), then the merge (MERGE 2: by the last split)
@triton.jit
def _rope_decode_kernel(Q, K, V, K_cache, V_cache, Sinks, Out, M_part, L_part, Acc_part, Counters,
                        Cu_seqlens, Positions, Rope_positions, Context_lens, Cache_rows, Slot_mapping, Inv_freq,
                        concentration, qk_scale, cache_len,
                        stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h,
                        stride_kc_r, stride_kc_l, stride_kc_h, stride_vc_r, stride_vc_l, stride_vc_h,
                        stride_o_t, stride_o_h, stride_ml_s, stride_ml_h, stride_acc_s, stride_acc_h, stride_acc_p,
                        num_splits,
                        GROUP: tl.constexpr, G_PAD: tl.constexpr, SLIDING_WINDOW: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MERGE: tl.constexpr, P_PAD: tl.constexpr,
                        DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
                        GDC: tl.constexpr = False):
    wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written
    pid_s = tl.program_id(0)
    pid_kvh = tl.program_id(1)
    pid_p = tl.program_id(2)
    token = tl.load(Cu_seqlens + pid_s)
    if tl.load(Cu_seqlens + pid_s + 1) == token:  # a sequence without a new token: nothing to do
        return
    pos = tl.load(Positions + token).to(tl.int32)
    ctx = tl.load(Context_lens + pid_s).to(tl.int32)
    row = tl.load(Cache_rows + pid_s).to(tl.int64)

    # RoPE in registers: every split rotates the (few) values it needs; nothing rotated goes through memory
    # but the cache write.
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_partner = (offs_d + HALF) % HEAD_DIM
    first_half = offs_d < HALF
    mask_g = offs_g < GROUP
    heads = pid_kvh * GROUP + offs_g
    cos, sin = _rope_cos_sin(tl.load(Rope_positions + token), Inv_freq, offs_d % HALF, concentration)
    q_ptrs = Q + token * stride_q_t + heads[:, None] * stride_q_h
    q = _rotate(tl.load(q_ptrs + offs_d[None, :], mask=mask_g[:, None], other=0.0),
                tl.load(q_ptrs + offs_partner[None, :], mask=mask_g[:, None], other=0.0),
                cos[None, :], sin[None, :], first_half[None, :])
    q = _round_to(q, Q.dtype.element_ty, BF16_RTNE)  # what the rope op would hand attention
    k_ptrs = K + token * stride_k_t + pid_kvh * stride_k_h
    k_new = _rotate(tl.load(k_ptrs + offs_d), tl.load(k_ptrs + offs_partner), cos, sin, first_half)
    k_new = _round_to(k_new, K.dtype.element_ty, BF16_RTNE).to(K_cache.dtype.element_ty)
    v_new = tl.load(V + token * stride_v_t + pid_kvh * stride_v_h + offs_d).to(V_cache.dtype.element_ty)
    if pid_p == 0:  # one program writes the new key/value (no split reads that slot: see the loop)
        slot = tl.load(Slot_mapping + token).to(tl.int64)
        if slot >= 0:  # (slot < 0: a padding token, vLLM's convention; nothing to write)
            row_w = slot // cache_len
            pos_w = slot % cache_len
            tl.store(K_cache + row_w * stride_kc_r + pos_w * stride_kc_l + pid_kvh * stride_kc_h + offs_d, k_new)
            tl.store(V_cache + row_w * stride_vc_r + pos_w * stride_vc_l + pid_kvh * stride_vc_h + offs_d, v_new)

    lo, hi, block_start, block_end = _split_band(pos, ctx, pid_p, num_splits, SLIDING_WINDOW, BLOCK_N)
    cached_hi = tl.minimum(hi, pos)  # keys before the new token's own: in the cache, written by earlier steps

    sink = tl.load(Sinks + heads, mask=mask_g, other=0.0).to(tl.float32) * 1.4426950408889634
    m_i = sink
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, HEAD_DIM], dtype=tl.float32)
    k_base = K_cache + row * stride_kc_r + pid_kvh * stride_kc_h  # int64: many rows pass 2^31 elements
    v_base = V_cache + row * stride_vc_r + pid_kvh * stride_vc_h
    for b in range(block_start, block_end):
        offs_n = lo + b * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        # The slot at pos is never loaded (split 0 may be writing it right now): its key/value come from
        # registers, exactly what is being written there.
        mask_c = (offs_n < cached_hi)[:, None]
        k = tl.load(k_base + offs_n[:, None] * stride_kc_l + offs_d[None, :], mask=mask_c, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vc_l + offs_d[None, :], mask=mask_c, other=0.0)
        is_new = (offs_n == pos)[:, None]
        k = tl.where(is_new, k_new[None, :], k)
        v = tl.where(is_new, v_new[None, :], v)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, mask_n[None, :], True,
                                             DOT_FP32, INPUT_PRECISION, BF16_RTNE)

    _finish_split(acc, l_i, m_i, sink, Out, M_part, L_part, Acc_part, token, pid_s, pid_p, heads, mask_g, offs_d,
                  stride_o_t, stride_o_h, stride_ml_s, stride_ml_h, stride_acc_s, stride_acc_h, stride_acc_p,
                  MERGE == 0, BF16_RTNE)
    if MERGE == 2:  # the last split of this (sequence, KV head) to finish merges them all, in split order
        counter = Counters + pid_s * tl.num_programs(1) + pid_kvh
        if last_to_arrive(counter, num_splits):
            _merge_group(Out, Sinks, M_part, L_part, Acc_part, token, pid_s, heads, mask_g,
                         stride_o_t, stride_o_h, stride_ml_s, stride_ml_h, stride_acc_s, stride_acc_h,
                         stride_acc_p, num_splits, G_PAD, P_PAD, HEAD_DIM, BF16_RTNE)
            tl.store(counter, 0)  # back to 0 for the next launch (every split of this launch has arrived)


# G_PAD query heads of one KV head, P splits (padded to P_PAD), d head_dim: the splits' partial softmax states
# -> the heads' outputs. Deterministic: the same sums in split order, whichever program runs it.
@triton.jit
def _merge_group(Out, Sinks, M_part, L_part, Acc_part, token, pid_s, heads, mask_g,
                 stride_o_t, stride_o_h, stride_ml_s, stride_ml_h, stride_acc_s, stride_acc_h, stride_acc_p,
                 num_splits, G_PAD: tl.constexpr, P_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BF16_RTNE: tl.constexpr):
    offs_p = tl.arange(0, P_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_gp = mask_g[:, None] & (offs_p < num_splits)[None, :]
    ml_offs = pid_s * stride_ml_s + heads[:, None] * stride_ml_h + offs_p[None, :]  # (G_PAD, P_PAD)
    m = tl.load(M_part + ml_offs, mask=mask_gp, other=float("-inf"), cache_modifier=".cg")  # base 2, >= the sink
    l = tl.load(L_part + ml_offs, mask=mask_gp, other=0.0, cache_modifier=".cg")
    # The sink, in the same base-2 units as the splits' maxima, counted exactly once.
    sink = tl.load(Sinks + heads, mask=mask_g, other=0.0).to(tl.float32) * 1.4426950408889634
    m_all = tl.maximum(tl.max(m, 1), sink)  # (G_PAD,)
    l_all = tl.sum(l * tl.math.exp2(m - m_all[:, None]), 1) + tl.math.exp2(sink - m_all)
    acc = tl.zeros([G_PAD, HEAD_DIM], dtype=tl.float32)
    acc_ptrs = Acc_part + pid_s * stride_acc_s + heads[:, None] * stride_acc_h + offs_d[None, :]
    for p in range(num_splits):  # (G_PAD, d) a split, pipelined loads; one head's P x d would not fit G heads
        w = tl.math.exp2(tl.load(M_part + pid_s * stride_ml_s + heads * stride_ml_h + p, mask=mask_g,
                                 other=float("-inf"), cache_modifier=".cg") - m_all)
        acc += tl.load(acc_ptrs + p * stride_acc_p, mask=mask_g[:, None], other=0.0, cache_modifier=".cg") * w[:, None]
    out = _round_to(acc / l_all[:, None], Out.dtype.element_ty, BF16_RTNE)
    tl.store(Out + token * stride_o_t + heads[:, None] * stride_o_h + offs_d[None, :], out, mask=mask_g[:, None])


# Counters of the in-kernel merge (int32, at 0 between launches: each launch's last programs put theirs back),
# one buffer per device shared by every layer (kernels of one stream run one after another). Made by an eager
# call, outside any CUDA-graph capture (a captured graph keeps its address), and never replaced.
_COUNTERS: dict[str, torch.Tensor] = {}
_MIN_COUNTERS = 8192  # (sequence, KV head) pairs: 1024 sequences at 8 KV heads


def _counters(device: torch.device, n: int) -> torch.Tensor:
    have = _COUNTERS.get(str(device))
    if have is None or have.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"rope_attention: the decode kernel's {n} merge counters must be made by one eager "
                               "call with at least this batch before a CUDA graph captures it")
        have = _COUNTERS[str(device)] = torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device)
    return have


MERGES = ("program", "kernel")  # who merges the splits: the last split program (one launch), or a merge kernel
# The default: the merge kernel. On the H200 (2026-12-01, CUDA-graph replay, 20b shape) it was faster in spite of
# the second launch: batch 1, 1k keys 8.1 us vs 9.0 (last program), 8k keys 14.3 vs 16.8; level at batch 64.
DEFAULT_MERGE = "kernel"


def rope_decode_attention(q, k, v, positions, inv_freq, concentration: float, sinks, k_cache, v_cache,
                          batch: Batch, sliding_window: int, sm_scale: float, *, out: torch.Tensor | None = None,
                          block_n: int | None = None, num_splits: int | None = None, merge: str = DEFAULT_MERGE,
                          num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """:func:`rope_attention_ref` for one new token per sequence (batch.max_seqlen == 1) in one kernel: RoPE of
    q and k in registers, the rotated k and v written into the caches at ``batch.slot_mapping``, split-KV
    attention reading the cached keys from the cache and the new one from registers, and (``merge="program"``)
    the splits merged by the last of them to finish; ``merge="kernel"`` leaves that to the merge kernel of
    :func:`decode_attention` (a second launch). The slot a new token is written to must not be read by
    another sequence of the batch (true when sequences own their cache rows, Batch's contract)."""
    T, Hq, d = q.shape
    Hkv = _check_attention(q, k_cache, v_cache, sinks, batch)
    if batch.max_seqlen != 1:
        raise ValueError(f"rope_decode_attention serves one new token per sequence, got max_seqlen={batch.max_seqlen}")
    if (k.shape != (T, Hkv, d) or v.shape != k.shape or positions.shape != (T,) or inv_freq.shape != (d // 2,)
            or k.dtype != q.dtype or v.dtype != q.dtype or batch.slot_mapping.shape != (T,)):
        raise ValueError(f"rope_attention: expected q (T, Hq, d), k and v (T, Hkv, d) of one dtype, positions and "
                         f"slot_mapping (T,), inv_freq (d/2,); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(positions.shape)}, {tuple(batch.slot_mapping.shape)}, "
                         f"{tuple(inv_freq.shape)}")
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    sinks, inv_freq = sinks.contiguous(), inv_freq.contiguous()
    out = _output(q, out)
    S = batch.num_seqs
    if T == 0 or S == 0:
        return out
    dot_fp32, precision = _dot_flags(q.dtype)
    G = Hq // Hkv
    if block_n is None:
        block_n = 16 if _interpreting() else (64 if q.dtype != torch.float32 else 32)
    if num_splits is None:
        num_splits = decode_num_splits(S, Hkv, batch.max_context_len, int(sliding_window), block_n,
                                       _num_sms(q.device))
    mode = 0 if num_splits == 1 else (2 if merge == "program" else 1)
    if num_splits > 1:
        m_part = torch.empty((S, Hq, num_splits), dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty((S, Hq, num_splits, d), dtype=torch.float32, device=q.device)
    else:
        m_part = l_part = acc_part = torch.empty((1, 1, 1, 1), dtype=torch.float32, device=q.device)
    counters = _counters(q.device, S * Hkv) if mode == 2 else m_part
    _rope_decode_kernel[(S, Hkv, num_splits)](
        q, k, v, k_cache, v_cache, sinks, out, m_part, l_part, acc_part, counters,
        batch.cu_seqlens, batch.positions, positions, batch.context_lens, batch.cache_rows, batch.slot_mapping,
        inv_freq, float(concentration), sm_scale * LOG2E, k_cache.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), out.stride(0), out.stride(1),
        m_part.stride(0), m_part.stride(1), acc_part.stride(0), acc_part.stride(1), acc_part.stride(2), num_splits,
        GROUP=G, G_PAD=max(16, triton.next_power_of_2(G)), SLIDING_WINDOW=int(sliding_window), HEAD_DIM=d,
        BLOCK_N=block_n, MERGE=mode, P_PAD=triton.next_power_of_2(num_splits), DOT_FP32=dot_fp32,
        INPUT_PRECISION=precision, BF16_RTNE=_bf16_rtne(q.dtype),
        num_warps=num_warps or 4, num_stages=num_stages or 3, **launch_options(q))
    if mode == 1:
        _decode_merge_kernel[(S, Hq)](
            out, sinks, m_part, l_part, acc_part, batch.cu_seqlens,
            out.stride(0), out.stride(1), m_part.stride(0), m_part.stride(1),
            acc_part.stride(0), acc_part.stride(1), acc_part.stride(2), num_splits,
            P_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=d, BF16_RTNE=_bf16_rtne(q.dtype),
            num_warps=1 if num_splits * d <= 2048 else 4, **launch_options(out))
    return out


# ================================================================================================
# The op
# ================================================================================================

def attention(q, k, v, sinks, k_cache, v_cache, batch: Batch, sliding_window: int, sm_scale: float) -> torch.Tensor:
    """Backend.attention (core/backend.py) in Triton: write k, v into the caches at ``batch.slot_mapping``,
    then causal GQA attention with sinks (and a sliding window when ``sliding_window`` > 0) of every new
    token over its sequence's cached + new keys. q (T, Hq, d); k, v (T, Hkv, d); caches (R, C, Hkv, d);
    sinks (Hq,). Returns (T, Hq, d) in q's dtype. Decode (batch.max_seqlen == 1) runs split-KV, anything
    else the varlen prefill kernel. No host synchronisation: capturable in a CUDA graph."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    kv_cache_write(k, v, k_cache, v_cache, batch.slot_mapping)
    if batch.max_seqlen == 1:
        return decode_attention(q, k_cache, v_cache, sinks, batch, sliding_window, sm_scale, out=out)
    return prefill_attention(q, k_cache, v_cache, sinks, batch, sliding_window, sm_scale, out=out)


def attention_ref(q, k, v, sinks, k_cache, v_cache, batch: Batch, sliding_window: int, sm_scale: float) -> torch.Tensor:
    """Plain PyTorch version of :func:`attention` (same signature): cache write, then per sequence the
    grouped-query softmax with the sink as one extra logit, in at least float32."""
    T, Hq, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    kv_cache_write_ref(k, v, k_cache, v_cache, batch.slot_mapping)
    compute = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    cu = batch.cu_seqlens.tolist()
    for s, (row, ctx) in enumerate(zip(batch.cache_rows.tolist(), batch.context_lens.tolist())):
        start, end = cu[s], cu[s + 1]
        if start == end:
            continue
        qs = q[start:end].to(compute).view(end - start, Hkv, G, d)  # (n, Hkv, G, d): grouped, no repeated K/V
        ks = k_cache[row, :ctx].to(compute)  # (L, Hkv, d)
        vs = v_cache[row, :ctx].to(compute)
        scores = torch.einsum("nkgd,lkd->kgnl", qs, ks) * sm_scale  # (Hkv, G, n, L)
        q_pos = batch.positions[start:end][:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window > 0:
            allowed &= q_pos - k_pos < sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        sink = sinks.to(compute).view(Hkv, G, 1, 1)
        m = torch.maximum(scores.amax(dim=-1, keepdim=True), sink)
        p = torch.exp(scores - m)
        denom = p.sum(dim=-1, keepdim=True) + torch.exp(sink - m)  # the sink: mass in the denominator only
        o = torch.einsum("kgnl,lkd->nkgd", p / denom, vs)
        out[start:end] = o.reshape(end - start, Hq, d).to(q.dtype)
    return out


def rope_attention(q, k, v, positions, inv_freq, concentration: float, sinks, k_cache, v_cache, batch: Batch,
                   sliding_window: int, sm_scale: float) -> torch.Tensor:
    """Backend.rope_attention (core/backend.py) in Triton: RoPE of q and k (``positions * inv_freq``, halves,
    cos/sin times ``concentration``), the rotated k and v written into the caches at ``batch.slot_mapping``,
    then :func:`attention` of the rotated q. Decode (batch.max_seqlen == 1, a host fact: no synchronisation)
    runs as one kernel (:func:`rope_decode_attention`); prefill and mixed batches compose the rope kernel
    (ops.py) and :func:`attention`. Capturable in a CUDA graph."""
    if batch.max_seqlen == 1:
        return rope_decode_attention(q, k, v, positions, inv_freq, concentration, sinks, k_cache, v_cache, batch,
                                     sliding_window, sm_scale)
    q, k = rope(q, k, positions, inv_freq, concentration)
    return attention(q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale)


def rope_attention_ref(q, k, v, positions, inv_freq, concentration: float, sinks, k_cache, v_cache, batch: Batch,
                       sliding_window: int, sm_scale: float) -> torch.Tensor:
    """Plain PyTorch version of :func:`rope_attention` (same signature): ``rope_ref``, then :func:`attention_ref`."""
    q, k = rope_ref(q, k, positions, inv_freq, concentration)
    return attention_ref(q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale)


# ---- checks shared by the wrappers ----------------------------------------------------------------

def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _output(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim, got "
                         f"{tuple(out.shape)} {out.dtype} stride {out.stride()}")
    return out


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, Hkv: int, d: int) -> None:
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim {d} not supported by the triton attention kernels (a power of two, 16..256; "
                         "64 and 128 are tested)")
    if k_cache.dim() != 4 or k_cache.shape[2:] != (Hkv, d) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache/v_cache must be (rows, cache_len, {Hkv}, {d}), got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache need a contiguous head dim (stride 1)")
    for c in (k_cache, v_cache):
        # Offsets inside one cache row are int32 in the kernels (the row's base is int64).
        if (c.shape[1] - 1) * c.stride(1) + (Hkv - 1) * c.stride(2) + d > _INT32_MAX:
            raise ValueError(f"one cache row of {c.shape[1]} x {Hkv} x {d} elements exceeds 2^31 elements")


def _check_attention(q, k_cache, v_cache, sinks, batch: Batch) -> int:
    T, Hq, d = q.shape
    Hkv = k_cache.shape[2] if k_cache.dim() == 4 else -1
    _check_cache(k_cache, v_cache, Hkv, d)
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q is {q.dtype} but the KV cache is {k_cache.dtype}")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype {q.dtype} not supported by the triton attention kernels")
    if sinks.shape != (Hq,):
        raise ValueError(f"sinks must be ({Hq},), got {tuple(sinks.shape)}")
    if batch.positions.shape != (T,):
        raise ValueError(f"batch has {batch.positions.shape[0]} tokens, q has {T}")
    return Hkv
