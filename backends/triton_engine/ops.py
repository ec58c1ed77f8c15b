"""The triton engine's small ops: embedding gather, RMSNorm, residual add + RMSNorm (fused), YaRN RoPE, router
top-k + softmax, and the whole router (logits + top-k + softmax) in one kernel for few tokens.

Each Triton kernel's wrapper sits beside its plain-PyTorch reference with the same signature
(``rms_norm`` / ``rms_norm_ref``, ...); tests call both on the same inputs. Wrappers check, allocate,
launch: no host synchronisation, so every op can be captured in a CUDA graph. ``out`` (optional) is a
preallocated result, for callers that own their buffers (graph capture, tests that poison outputs).

Under ``TRITON_INTERPRET=1`` (CPU, tests) the interpreter converts float32 to bfloat16 by truncation,
not round-to-nearest-even as the GPU does; the kernels then round in software (``ROUND_BF16``).

Shape legend: T tokens, V vocab, D hidden, E experts, K experts per token, Hq/Hkv query/KV heads,
d head_dim, F = d/2 rotary frequencies.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mxmoe.backends.triton_engine import pdl
from mxmoe.backends.triton_engine.pdl import launch_options, wait_for_predecessor

# Triton decides at decoration time (module import) whether kernels are interpreted; so do we.
INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _round_bf16_in_software(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _out(out: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device: torch.device, what: str) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"{what}: out must be a contiguous {tuple(shape)} {dtype} tensor on {device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    return out


@triton.jit
def _rtne_bf16(x):
    """float32 → the nearest bfloat16 (ties to even), still held as float32 (exact when cast afterwards)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    y = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, y)  # NaN stays NaN (the carry could turn a NaN into an infinity)


# ---- embedding -----------------------------------------------------------------------------------

# ids (T,) into table (V, D) → out (T, D): one program per (token, BLOCK_D columns)
@triton.jit
def _embedding_kernel(ids_ptr, table_ptr, out_ptr, D, stride_table_v, stride_out_t, BLOCK_D: tl.constexpr,
                      GDC: tl.constexpr = False):
    wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    token = tl.load(ids_ptr + pid_t).to(tl.int64)  # V * D can exceed 2^31
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    row = tl.load(table_ptr + token * stride_table_v + offs_d, mask=mask_d)
    tl.store(out_ptr + pid_t.to(tl.int64) * stride_out_t + offs_d, row, mask=mask_d)


def embedding(token_ids: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(T,) int ids, (V, D) table → (T, D) rows of the table, bit-exact. Ids must lie in [0, V)."""
    if token_ids.ndim != 1 or weight.ndim != 2 or weight.stride(1) != 1:
        raise ValueError(f"embedding: expected ids (T,) and a (V, D) table with unit column stride, got "
                         f"{tuple(token_ids.shape)} and {tuple(weight.shape)} strides {weight.stride()}")
    (T,), (V, D) = token_ids.shape, weight.shape
    out = _out(out, (T, D), weight.dtype, weight.device, "embedding")
    if T == 0:
        return out
    BLOCK_D = min(triton.next_power_of_2(D), 1024)
    grid = (T, triton.cdiv(D, BLOCK_D))
    _embedding_kernel[grid](token_ids, weight, out, D, weight.stride(0), out.stride(0), BLOCK_D=BLOCK_D,
        **launch_options(token_ids))
    return out


def embedding_ref(token_ids: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    y = weight[token_ids]
    return y if out is None else out.copy_(y)


# ---- RMSNorm -------------------------------------------------------------------------------------

# x (T, D), scale (D,) → out (T, D): one program per row; sum of squares and scaling in float32
@triton.jit
def _rms_norm_kernel(x_ptr, scale_ptr, out_ptr, D, eps, stride_x_t, stride_out_t,
                     BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr, GDC: tl.constexpr = False):
    wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written
    pid_t = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + pid_t * stride_x_t
    out_row = out_ptr + pid_t * stride_out_t
    sum_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        offs_d = start + tl.arange(0, BLOCK_D)
        x = tl.load(x_row + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
        sum_sq += x * x
    rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / D + eps)
    # Second pass over the row (one iteration for gpt-oss's D = 2880; the row is in L1/L2 by now).
    for start in range(0, D, BLOCK_D):
        offs_d = start + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        x = tl.load(x_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        y = (x * rstd) * scale  # the reference's order: normalise, then scale
        if ROUND_BF16:
            y = _rtne_bf16(y)
        tl.store(out_row + offs_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """(T, D) → (T, D) in x's dtype: ``x / sqrt(mean(x²) + eps) * scale``, computed in float32."""
    if x.ndim != 2 or scale.shape != (x.shape[1],) or x.stride(1) != 1 or scale.stride(0) != 1:
        raise ValueError(f"rms_norm: expected x (T, D) with unit column stride and scale (D,), got "
                         f"{tuple(x.shape)} strides {x.stride()} and {tuple(scale.shape)}")
    T, D = x.shape
    out = _out(out, (T, D), x.dtype, x.device, "rms_norm")
    if T == 0:
        return out
    BLOCK_D = min(triton.next_power_of_2(D), 4096)
    _rms_norm_kernel[(T,)](x, scale, out, D, float(eps), x.stride(0), out.stride(0), BLOCK_D=BLOCK_D,
                           ROUND_BF16=_round_bf16_in_software(x.dtype), num_warps=8 if BLOCK_D >= 2048 else 4,
                           **launch_options(x))
    return out


def rms_norm_ref(x: torch.Tensor, scale: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    t = x.to(torch.promote_types(x.dtype, torch.float32))
    t = t * torch.rsqrt(t.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = (t * scale.to(t.dtype)).to(x.dtype)
    return y if out is None else out.copy_(y)


# ---- residual add + RMSNorm (fused; Backend API 1.2) ---------------------------------------------

# x, delta (T, D), scale (D,) → s = x + delta, h = rms_norm(s) (T, D each): one program per row. The add is
# in float32 and rounded once to s's dtype: for two bf16 (or fp16) values that is the correctly rounded sum,
# the bits of PyTorch's ``x + delta`` (float32 has 24 ≥ 2·8 + 2 bits, so rounding twice is harmless). The
# norm reads the rounded s, as the composition does.
@triton.jit
def _as_dtype(v, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    # float32 v rounded to ``dtype`` (to nearest even, by hand where the interpreter truncates), held as float32.
    if ROUND_BF16:
        return _rtne_bf16(v)
    return v.to(dtype).to(tl.float32)


@triton.jit
def _rounded_sum(x_row, delta_row, offs_d, mask_d, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    s = (tl.load(x_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
         + tl.load(delta_row + offs_d, mask=mask_d, other=0.0).to(tl.float32))
    return _as_dtype(s, dtype, ROUND_BF16)


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, scale_ptr, s_ptr, h_ptr, D, eps,
                         stride_x_t, stride_delta_t, stride_s_t, stride_h_t,
                         BLOCK_D: tl.constexpr, ONE_PASS: tl.constexpr, ROUND_BF16: tl.constexpr,
                         GDC: tl.constexpr = False, EARLY_STATIC: tl.constexpr = False):
    if EARLY_STATIC and ONE_PASS:  # the scale is static: loaded while the predecessor finishes (pdl.EARLY_STATIC)
        scale = tl.load(scale_ptr + tl.arange(0, BLOCK_D), mask=tl.arange(0, BLOCK_D) < D, other=0.0).to(tl.float32)
    wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written
    pid_t = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + pid_t * stride_x_t
    delta_row = delta_ptr + pid_t * stride_delta_t
    s_row = s_ptr + pid_t * stride_s_t
    h_row = h_ptr + pid_t * stride_h_t
    if ONE_PASS:  # the whole row in registers (gpt-oss: D = 2880 ≤ BLOCK_D = 4096): read once, write twice
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        s = _rounded_sum(x_row, delta_row, offs_d, mask_d, s_ptr.dtype.element_ty, ROUND_BF16)
        tl.store(s_row + offs_d, s.to(s_ptr.dtype.element_ty), mask=mask_d)
        rstd = tl.rsqrt(tl.sum(s * s, axis=0) / D + eps)
        if not EARLY_STATIC:
            scale = tl.load(scale_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        # The reference's order: normalise, then scale.
        h = _as_dtype((s * rstd) * scale, h_ptr.dtype.element_ty, ROUND_BF16)
        tl.store(h_row + offs_d, h.to(h_ptr.dtype.element_ty), mask=mask_d)
    else:
        sum_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            offs_d = start + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            s = _rounded_sum(x_row, delta_row, offs_d, mask_d, s_ptr.dtype.element_ty, ROUND_BF16)
            tl.store(s_row + offs_d, s.to(s_ptr.dtype.element_ty), mask=mask_d)
            sum_sq += s * s
        rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / D + eps)
        # Second pass: s recomputed from x and delta (the same bits), not read back from s_ptr, which other
        # threads of this program wrote without a barrier.
        for start in range(0, D, BLOCK_D):
            offs_d = start + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            s = _rounded_sum(x_row, delta_row, offs_d, mask_d, s_ptr.dtype.element_ty, ROUND_BF16)
            scale = tl.load(scale_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            h = _as_dtype((s * rstd) * scale, h_ptr.dtype.element_ty, ROUND_BF16)
            tl.store(h_row + offs_d, h.to(h_ptr.dtype.element_ty), mask=mask_d)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, eps: float,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None,
                 block_d: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta (T, D) of one dtype, scale (D,) → (s, h) in x's dtype: ``s = x + delta`` rounded once,
    ``h = s / sqrt(mean(s²) + eps) * scale`` in float32, rounded once. ``out`` must not alias x or delta.
    ``block_d``: columns per step (default: the whole row up to 4096; tests force the two-pass path)."""
    if (x.ndim != 2 or delta.shape != x.shape or delta.dtype != x.dtype or scale.shape != (x.shape[1],)
            or x.stride(1) != 1 or delta.stride(1) != 1 or scale.stride(0) != 1):
        raise ValueError(f"add_rms_norm: expected x and delta (T, D) of one dtype with unit column stride and "
                         f"scale (D,), got {tuple(x.shape)} {x.dtype} strides {x.stride()}, {tuple(delta.shape)} "
                         f"{delta.dtype} strides {delta.stride()} and {tuple(scale.shape)}")
    T, D = x.shape
    s = _out(None if out is None else out[0], (T, D), x.dtype, x.device, "add_rms_norm s")
    h = _out(None if out is None else out[1], (T, D), x.dtype, x.device, "add_rms_norm h")
    if T == 0:
        return s, h
    BLOCK_D = block_d or min(triton.next_power_of_2(D), 4096)
    _add_rms_norm_kernel[(T,)](x, delta, scale, s, h, D, float(eps), x.stride(0), delta.stride(0), s.stride(0),
                               h.stride(0), BLOCK_D=BLOCK_D, ONE_PASS=D <= BLOCK_D,
                               ROUND_BF16=_round_bf16_in_software(x.dtype), num_warps=8 if BLOCK_D >= 2048 else 4,
                               EARLY_STATIC=pdl.EARLY_STATIC, **launch_options(x))
    return s, h


def add_rms_norm_ref(x: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, eps: float,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None,
                     block_d: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + delta
    h = rms_norm_ref(s, scale, eps)
    if out is None:
        return s, h
    return out[0].copy_(s), out[1].copy_(h)


# ---- RoPE (YaRN) ---------------------------------------------------------------------------------

# q (T, Hq, d), k (T, Hkv, d) → rotated copies: one program per (token, BLOCK_H of the Hq + Hkv heads),
# so q and k share one launch; halves of each head rotate (x1, x2 = x[:F], x[F:]), not interleaved pairs
@triton.jit
def _rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, inv_freq_ptr, concentration,
                 Hq, Hkv, F, stride_q_t, stride_q_h, stride_k_t, stride_k_h,
                 stride_qo_t, stride_qo_h, stride_ko_t, stride_ko_h,
                 BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr, ROUND_BF16: tl.constexpr):
    pid_t = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    offs_f = tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    # The angle exactly as the reference rounds it (one float32 product), then reduced to [-π, π] in
    # float64: fp32 sin/cos may be hardware approximations whose error grows with |angle|, and angles
    # reach ~1e5 at positions past 100k. 2π is split in three float32-exact parts (Triton may type a
    # Python float literal as float32), so that turns · part is exact in float64 for turns < 2^29.
    pos = tl.load(pos_ptr + pid_t).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)
    angle = (pos * inv_freq).to(tl.float64)
    turns = tl.floor(angle * 0.15915494 + 0.5)  # ≈ 1/(2π): any nearby integer will do
    reduced = angle - turns * 6.2831854820251465
    reduced = reduced - turns * -1.7484555314695172e-07
    reduced = (reduced - turns * -6.8604980400235275e-15).to(tl.float32)
    cos = (tl.cos(reduced) * concentration)[None, :]  # (1, BLOCK_F)
    sin = (tl.sin(reduced) * concentration)[None, :]

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    is_q = offs_h < Hq
    is_k = (offs_h >= Hq) & (offs_h < Hq + Hkv)
    mask_q = is_q[:, None] & mask_f[None, :]
    mask_k = is_k[:, None] & mask_f[None, :]
    q_ptrs = q_ptr + pid_t * stride_q_t + offs_h[:, None] * stride_q_h + offs_f[None, :]
    k_ptrs = k_ptr + pid_t * stride_k_t + (offs_h - Hq)[:, None] * stride_k_h + offs_f[None, :]
    x1 = tl.where(is_q[:, None], tl.load(q_ptrs, mask=mask_q, other=0.0),
                  tl.load(k_ptrs, mask=mask_k, other=0.0)).to(tl.float32)
    x2 = tl.where(is_q[:, None], tl.load(q_ptrs + F, mask=mask_q, other=0.0),
                  tl.load(k_ptrs + F, mask=mask_k, other=0.0)).to(tl.float32)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if ROUND_BF16:
        y1 = _rtne_bf16(y1)
        y2 = _rtne_bf16(y2)
    qo_ptrs = q_out_ptr + pid_t * stride_qo_t + offs_h[:, None] * stride_qo_h + offs_f[None, :]
    ko_ptrs = k_out_ptr + pid_t * stride_ko_t + (offs_h - Hq)[:, None] * stride_ko_h + offs_f[None, :]
    tl.store(qo_ptrs, y1.to(q_out_ptr.dtype.element_ty), mask=mask_q)
    tl.store(qo_ptrs + F, y2.to(q_out_ptr.dtype.element_ty), mask=mask_q)
    tl.store(ko_ptrs, y1.to(k_out_ptr.dtype.element_ty), mask=mask_k)
    tl.store(ko_ptrs + F, y2.to(k_out_ptr.dtype.element_ty), mask=mask_k)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, concentration: float,
         out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (T, Hq, d) and k (T, Hkv, d) by ``positions * inv_freq`` (F = d/2 frequencies), cos and sin
    times ``concentration``; halves, not interleaved. Computed in float32, rounded once to q's dtype."""
    T, Hq, d = q.shape
    Hkv = k.shape[1]
    F = d // 2
    if (k.shape != (T, Hkv, d) or d % 2 or positions.shape != (T,) or inv_freq.shape != (F,)
            or q.stride(2) != 1 or k.stride(2) != 1 or inv_freq.stride(0) != 1 or k.dtype != q.dtype):
        raise ValueError(f"rope: expected q (T, Hq, d), k (T, Hkv, d) of one dtype with unit channel stride, "
                         f"positions (T,), inv_freq (d/2,); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(positions.shape)}, {tuple(inv_freq.shape)}")
    q_out = _out(None if out is None else out[0], (T, Hq, d), q.dtype, q.device, "rope q")
    k_out = _out(None if out is None else out[1], (T, Hkv, d), k.dtype, k.device, "rope k")
    if T == 0:
        return q_out, k_out
    BLOCK_H = min(triton.next_power_of_2(Hq + Hkv), 16)
    grid = (T, triton.cdiv(Hq + Hkv, BLOCK_H))
    _rope_kernel[grid](q, k, q_out, k_out, positions, inv_freq, float(concentration), Hq, Hkv, F,
                       q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                       q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
                       BLOCK_H=BLOCK_H, BLOCK_F=triton.next_power_of_2(F),
                       ROUND_BF16=_round_bf16_in_software(q.dtype))
    return q_out, k_out


def rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, concentration: float,
             out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # As the kernel: float32 (or wider) throughout, one rounding at the end.
    compute = torch.promote_types(q.dtype, torch.float32)
    angle = positions.to(inv_freq.dtype)[:, None] * inv_freq[None, :]  # (T, F)
    cos = (angle.cos() * concentration).to(compute)[:, None, :]
    sin = (angle.sin() * concentration).to(compute)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.to(compute).chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    qr, kr = rotate(q), rotate(k)
    if out is None:
        return qr, kr
    return out[0].copy_(qr), out[1].copy_(kr)


# ---- router: top-k + softmax over the chosen k --------------------------------------------------------

# logits (T, E) → weights (T, K) in the output dtype, indices (T, K) int64: one program per BLOCK_T tokens
@triton.jit
def _topk_softmax_kernel(logits_ptr, weights_ptr, indices_ptr, T, E, stride_l_t, stride_w_t, stride_i_t,
                         K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                         ROUND_BF16: tl.constexpr, GDC: tl.constexpr = False):
    wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written
    pid_t = tl.program_id(0)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    mask_t = offs_t < T
    mask_e = offs_e < E
    logits = tl.load(logits_ptr + offs_t[:, None] * stride_l_t + offs_e[None, :],
                     mask=mask_t[:, None] & mask_e[None, :], other=0.0).to(tl.float32)
    logits = tl.where(mask_e[None, :], logits, float("-inf"))  # padding experts are never chosen
    # torch.sort (the reference) orders NaN above everything; keep a NaN logit chosen, and every index
    # in range, so that the expert kernels never see an index outside [0, E).
    key = tl.where(logits != logits, float("inf"), logits)
    free = mask_e[None, :] & (offs_t[:, None] >= 0)  # (BLOCK_T, BLOCK_E): not chosen yet
    values = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    indices = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for i in tl.static_range(K):
        best = tl.max(tl.where(free, key, float("-inf")), axis=1)  # (BLOCK_T,)
        # Ties go to the lower expert index: the smallest index among those equal to the maximum.
        ties = free & (key == best[:, None])
        choice = tl.min(tl.where(ties, offs_e[None, :], BLOCK_E), axis=1)  # (BLOCK_T,)
        chosen = offs_e[None, :] == choice[:, None]
        value = tl.sum(tl.where(chosen, logits, 0.0), axis=1)
        free = free & ~chosen
        values = tl.where(offs_k[None, :] == i, value[:, None], values)
        indices = tl.where(offs_k[None, :] == i, choice[:, None], indices)
    # Softmax over the K chosen logits; the first is their maximum.
    mask_k = offs_k < K
    top = tl.max(tl.where(mask_k[None, :], values, float("-inf")), axis=1)
    p = tl.where(mask_k[None, :], tl.exp(values - top[:, None]), 0.0)
    weights = p / tl.sum(p, axis=1)[:, None]
    if ROUND_BF16:
        weights = _rtne_bf16(weights)
    mask_out = mask_t[:, None] & mask_k[None, :]
    tl.store(weights_ptr + offs_t[:, None] * stride_w_t + offs_k[None, :],
             weights.to(weights_ptr.dtype.element_ty), mask=mask_out)
    tl.store(indices_ptr + offs_t[:, None] * stride_i_t + offs_k[None, :], indices.to(tl.int64), mask=mask_out)


def topk_softmax(logits: torch.Tensor, top_k: int,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, E) logits → (weights (T, k) in the logits' dtype, indices (T, k) int64): the k largest, sorted
    descending, ties to the lower index; softmax over the chosen k (in float32)."""
    if logits.ndim != 2 or logits.stride(1) != 1 or not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"topk_softmax: expected (T, E) logits with unit column stride and 1 <= k <= E, got "
                         f"{tuple(logits.shape)} strides {logits.stride()} and k={top_k}")
    T, E = logits.shape
    weights = _out(None if out is None else out[0], (T, top_k), logits.dtype, logits.device, "router weights")
    indices = _out(None if out is None else out[1], (T, top_k), torch.int64, logits.device, "router indices")
    if T == 0:
        return weights, indices
    BLOCK_E = triton.next_power_of_2(E)
    BLOCK_T = max(1, min(16, 4096 // BLOCK_E))
    _topk_softmax_kernel[(triton.cdiv(T, BLOCK_T),)](
        logits, weights, indices, T, E, logits.stride(0), weights.stride(0), indices.stride(0),
        K=top_k, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_K=triton.next_power_of_2(top_k),
        ROUND_BF16=_round_bf16_in_software(logits.dtype), **launch_options(logits))
    return weights, indices


def topk_softmax_ref(logits: torch.Tensor, top_k: int,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # torch.topk does not reliably break ties toward the lower index on the CPU (FACTS.md): sort stably.
    values, indices = torch.sort(logits, dim=-1, descending=True, stable=True)
    values, indices = values[:, :top_k], indices[:, :top_k]
    weights = torch.softmax(values.to(torch.promote_types(values.dtype, torch.float32)), dim=-1).to(logits.dtype)
    if out is None:
        return weights, indices
    return out[0].copy_(weights), out[1].copy_(indices)
