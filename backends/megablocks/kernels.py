"""Portable Triton grouped GEMMs of the dropless MoE (no TMA, no warp specialisation, no wgmma: plain
``tl.load``/``tl.dot``, so the same source compiles for NVIDIA and AMD GPUs and runs in the interpreter).

    moe_mlp1_swiglu: rows gathered from x by token (the gather is the operand load), times their expert's
                     gate and linear rows, SwiGLU in the epilogue           → h (P, I)
    moe_mlp2:        h times the expert's mlp2, + bias, × routing weight, stored at the pair's row → y (P, D)

One program computes BLOCK_M sorted rows of one expert × BLOCK_N outputs. The tile list (expert, first row,
end row per tile) is built on the device from the histogram; the grid is its upper bound
cdiv(P, BLOCK_M) + min(E, P), surplus programs return at once, so nothing waits on the host.

Each kernel sits beside its plain-PyTorch reference (same signature, ``*_ref``); moe.py has the whole layer.

Shape legend: T tokens, P = T·k sorted (token, expert) rows, E experts, D hidden, I intermediate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mxmoe.backends.reference import swiglu

from .moe import Routing, grouped_linear

# The interpreter computes tl.dot on bf16 operands wrongly (FACTS.md): convert the operands to float32 there.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class TileSchedule:
    """Which sorted rows each program of a grouped GEMM covers: tile t is rows
    start[t]:min(start[t] + block_m, end[t]) of expert expert[t]; tiles past the last real one have expert -1."""

    expert: torch.Tensor  # (num_tiles,) int32
    start: torch.Tensor  # (num_tiles,) int32
    end: torch.Tensor  # (num_tiles,) int32: one past the expert's last row
    num_tiles: int  # cdiv(P, block_m) + min(E, P): an upper bound known on the host
    block_m: int


def tile_schedule(routing: Routing, block_m: int | None = None) -> TileSchedule:
    """The tiles of ``routing``'s expert segments, built on the device from the histogram (no host sync)."""
    block_m = block_m or _block_m(routing)
    E, P = routing.num_experts, routing.num_rows
    num_tiles = triton.cdiv(P, block_m) + min(E, P)
    tiles = (routing.counts + block_m - 1) // block_m  # (E,)
    tile_end = tiles.cumsum(0)  # (E,) one past each expert's last tile
    t = torch.arange(num_tiles, device=routing.counts.device)
    e = torch.searchsorted(tile_end, t, right=True)  # expert of tile t; E past the end
    valid = e < E
    e = e.clamp(max=E - 1)
    first = tile_end[e] - tiles[e]
    start = routing.offsets[e] + (t - first) * block_m
    end = routing.offsets[e + 1]
    return TileSchedule(torch.where(valid, e, -1).to(torch.int32), start.to(torch.int32), end.to(torch.int32),
                        num_tiles, block_m)


def _block_m(routing: Routing) -> int:
    # Rows per expert on average: decode batches give a handful, so small tiles waste less of each MMA.
    per_expert = routing.num_rows / routing.num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64


# P rows, D in-features (K), I = half of mlp1's 2I out-features; one program: BLOCK_M rows × BLOCK_N of I.
@triton.jit
def _moe_mlp1_swiglu_kernel(x_ptr, w_ptr, b_ptr, h_ptr, row_token_ptr,
                            tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                            D, I, alpha, limit,
                            stride_x_t, stride_x_d, stride_w_e, stride_w_n, stride_w_k, stride_b_e, stride_b_n,
                            stride_h_p, stride_h_i,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert < 0:  # beyond the last tile: the grid is an upper bound, known without a host sync
        return
    row_start = tl.load(tile_start_ptr + pid_m)
    row_end = tl.load(tile_end_ptr + pid_m)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    # The gather: each sorted row reads its token's activations straight from x.
    token = tl.load(row_token_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel i comes from rows 2i (gate), 2i+1 (linear)
    mask_n = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * stride_x_t + offs_k[None, :] * stride_x_d
    w_base = w_ptr + expert.to(tl.int64) * stride_w_e  # int64: E·2I·D passes 2^31 at gpt-oss-120b
    wg_ptrs = w_base + (2 * offs_n)[None, :] * stride_w_n + offs_k[:, None] * stride_w_k
    wl_ptrs = wg_ptrs + stride_w_n
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_l = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(D, BLOCK_K)):
        mask_k = offs_k < D - k * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        wl = tl.load(wl_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_FP32:
            acc_g = tl.dot(a.to(tl.float32), wg.to(tl.float32), acc_g, input_precision="ieee")
            acc_l = tl.dot(a.to(tl.float32), wl.to(tl.float32), acc_l, input_precision="ieee")
        else:
            acc_g = tl.dot(a, wg, acc_g)
            acc_l = tl.dot(a, wl, acc_l)
        x_ptrs += BLOCK_K * stride_x_d
        wg_ptrs += BLOCK_K * stride_w_k
        wl_ptrs += BLOCK_K * stride_w_k
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_b_e + (2 * offs_n) * stride_b_n
    gate = acc_g + tl.load(b_ptrs, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    lin = acc_l + tl.load(b_ptrs + stride_b_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    # gpt-oss SwiGLU; NaN must survive the clamps (an E8M0 NaN scale poisons exactly its outputs).
    gate = tl.minimum(gate, limit, propagate_nan=tl.PropagateNan.ALL)
    lin = tl.clamp(lin, -limit, limit, propagate_nan=tl.PropagateNan.ALL)
    out = gate * tl.sigmoid(alpha * gate) * (lin + 1.0)
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_h_p + offs_n[None, :] * stride_h_i
    tl.store(h_ptrs, out.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def moe_mlp1_swiglu_ref(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, routing: Routing, alpha: float,
                        limit: float) -> torch.Tensor:
    """x (T, D), w1 (E, 2I, D), b1 (E, 2I) → h (P, I) = SwiGLU(mlp1 of each sorted row's token)."""
    return swiglu(grouped_linear(x[routing.token], w1, b1, routing), alpha, limit)


def moe_mlp1_swiglu(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, routing: Routing, alpha: float,
                    limit: float, schedule: TileSchedule | None = None, out: torch.Tensor | None = None,
                    block_n: int = 64, block_k: int = 64, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    E, N, D = w1.shape
    if x.shape[1] != D or N % 2 or b1.shape != (E, N) or routing.num_experts != E:
        raise ValueError(f"moe_mlp1_swiglu: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, b1 {tuple(b1.shape)}, "
                         f"{routing.num_experts} experts routed")
    I = N // 2
    P = routing.num_rows
    h = torch.empty(P, I, dtype=x.dtype, device=x.device) if out is None else out
    if h.shape != (P, I) or h.dtype != x.dtype:
        raise ValueError(f"moe_mlp1_swiglu: out {tuple(h.shape)} {h.dtype}, expected {(P, I)} {x.dtype}")
    if P == 0:
        return h
    s = schedule or tile_schedule(routing)
    grid = (s.num_tiles, triton.cdiv(I, block_n))
    _moe_mlp1_swiglu_kernel[grid](
        x, w1, b1, h, routing.token.to(torch.int32), s.expert, s.start, s.end, D, I, float(alpha), float(limit),
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2), b1.stride(0), b1.stride(1),
        h.stride(0), h.stride(1),
        BLOCK_M=s.block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_FP32=_INTERPRET or x.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages)
    return h


# P rows, I in-features (K), D out-features; one program: BLOCK_M rows × BLOCK_N of D, stored at their pairs.
@triton.jit
def _moe_mlp2_kernel(h_ptr, w_ptr, b_ptr, y_ptr, row_weight_ptr, row_pair_ptr,
                     tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                     I, D,
                     stride_h_p, stride_h_i, stride_w_e, stride_w_n, stride_w_k, stride_b_e, stride_b_n,
                     stride_y_p, stride_y_d,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert < 0:
        return
    row_start = tl.load(tile_start_ptr + pid_m)
    row_end = tl.load(tile_end_ptr + pid_m)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_h_p + offs_k[None, :] * stride_h_i
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_w_e + offs_n[None, :] * stride_w_n + offs_k[:, None] * stride_w_k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(I, BLOCK_K)):
        mask_k = offs_k < I - k * BLOCK_K
        a = tl.load(h_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        h_ptrs += BLOCK_K * stride_h_i
        w_ptrs += BLOCK_K * stride_w_k
    bias = tl.load(b_ptr + expert.to(tl.int64) * stride_b_e + offs_n * stride_b_n, mask=mask_n, other=0.0)
    weight = tl.load(row_weight_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    y = (acc + bias.to(tl.float32)[None, :]) * weight[:, None]
    # The scatter: row p goes to its pair's row t·k + j; the combine sums each token's k rows in order.
    pair = tl.load(row_pair_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    y_ptrs = y_ptr + pair[:, None] * stride_y_p + offs_n[None, :] * stride_y_d
    tl.store(y_ptrs, y, mask=mask_m[:, None] & mask_n[None, :])


def moe_mlp2_ref(h: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, routing: Routing) -> torch.Tensor:
    """h (P, I) sorted rows, w2 (E, D, I), b2 (E, D) → (P, D) float32 indexed by pair: weight · mlp2(h)."""
    y = grouped_linear(h, w2, b2, routing).to(torch.float32) * routing.weight.to(torch.float32)[:, None]
    out = torch.empty_like(y)
    out[routing.pair] = y
    return out


def moe_mlp2(h: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, routing: Routing,
             schedule: TileSchedule | None = None, out: torch.Tensor | None = None, block_n: int = 64,
             block_k: int = 64, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    E, D, I = w2.shape
    P = routing.num_rows
    if h.shape != (P, I) or b2.shape != (E, D) or routing.num_experts != E:
        raise ValueError(f"moe_mlp2: h {tuple(h.shape)}, w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}, "
                         f"{P} rows of {routing.num_experts} experts")
    y = torch.empty(P, D, dtype=torch.float32, device=h.device) if out is None else out
    if y.shape != (P, D) or y.dtype != torch.float32:
        raise ValueError(f"moe_mlp2: out {tuple(y.shape)} {y.dtype}, expected {(P, D)} float32")
    if P == 0:
        return y
    s = schedule or tile_schedule(routing)
    grid = (s.num_tiles, triton.cdiv(D, block_n))
    _moe_mlp2_kernel[grid](
        h, w2, b2, y, routing.weight, routing.pair.to(torch.int32), s.expert, s.start, s.end, I, D,
        h.stride(0), h.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), b2.stride(0), b2.stride(1),
        y.stride(0), y.stride(1),
        BLOCK_M=s.block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_FP32=_INTERPRET or h.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages)
    return y
