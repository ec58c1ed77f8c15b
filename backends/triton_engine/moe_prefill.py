"""A second MoE prefill path of the ``triton`` engine: dequantize the routed experts, then grouped bf16 GEMMs.

``moe_prefill_dequant`` computes what ``moe.moe_mxfp4`` (and its spec ``moe.moe_mxfp4_ref``) computes, with
the same signature. The ``prefill`` path of moe.py decodes the 4-bit values in registers right before each
tensor-core product, and the decode is not overlapped with the product (136 TFLOP/s at T = 2048 on the H200,
NOTES-moe.md). At prefill sizes each expert's weights serve hundreds of tokens, so here they are first
expanded once into a bf16 workspace by a bandwidth-bound kernel, and the products then read bf16 tiles
from global memory the way the Triton matmul tutorial does: Triton pipelines those loads through shared
memory and the tensor-core product reads both operands from there (wgmma on Hopper).

    routing (pairs sorted by expert, tiles of BLOCK_M pairs of one expert, on the device: moe.moe_routing's tables,
             built by moe_routing_parallel below, or by moe.moe_routing itself)
    for each chunk of <= CHUNK_EXPERTS experts:
        dequantize mlp1 of the chunk's experts that got tokens    → workspace (C, 2I, D) bf16
        mlp1 GEMM: token rows gathered in the A load, + bias, SwiGLU in the epilogue → h (P, I), sorted rows
        dequantize mlp2 of the same experts, into the same workspace → (C, D, I) bf16
        mlp2 GEMM: + bias, × routing weight in the epilogue → y (P, D) fp32, one row per (token, slot) pair
    moe.launch_sum_slots: out[t] = the sum of y's k rows of token t, in slot order (deterministic)

No host synchronisation: experts without tokens are skipped inside the kernels (a scan of the tile list),
tiles of experts outside the chunk return at once, and every grid depends only on the shapes. Each output
element is written by exactly one program and every sum runs in a fixed order: results repeat bitwise.

The workspace is CHUNK_EXPERTS x 2I x D bf16: 1.06 GB at gpt-oss sizes (D = I = 2880), whether the layer
has 32 experts (20b: one chunk) or 128 (120b: four chunks, each reusing it). mlp1's workspace rows are the
gate rows (0..I-1) then the linear rows (I..2I-1), as in ``MoEWeights.w1``; the mlp1 GEMM reads them
interleaved (gate, linear, gate, ...) into one product and splits the accumulator in the epilogue.

Why not the megablocks engine's grouped GEMM (backends/megablocks/kernels.py): its structure is the same (a
tile list, gathered A rows, SwiGLU / weighted-scatter epilogues), but it is built to be portable and to serve
its own engine: it takes megablocks' ``Routing`` and ``TileSchedule`` (torch sort + searchsorted), canonical
(E, 2I) biases, K masks on every step, two products over strided gate/linear rows, and defaults for portability
(BLOCK_M <= 64 picked from the routing, 64 x 64 tiles, 4 warps); a chunk of experts would need a schedule
rebuilt per chunk, and it is another engine's code to change. These kernels read moe.py's routing tables and
``MoEWeights`` as they are, drop the K masks when BLOCK_K divides K, skip other chunks' tiles in place, and
expose the Hopper tiles (128 x 256 x 64 at 8 warps, 3-4 stages) that the GPU script sweeps.

Shape legend: T tokens, k slots per token, P = T*k (token, slot) pairs, E experts, C experts per chunk,
D hidden, I intermediate, R rows of a layer (2I or D), K its inputs (D or I), NB = K/32 scale blocks.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mxmoe.backends.triton_engine import moe as _moe
from mxmoe.backends.triton_engine.moe import MoEWeights, _cast, _store_tiles  # shared device helpers
from mxmoe.core.backend import NotSupported

# The interpreter's tl.dot on bf16 operands returns wrong values (FACTS.md): feed it fp32 there.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Test hook: fill h, y and the workspace with NaN, so that a read of anything no kernel wrote shows up.
_POISON_BUFFERS = False

CHUNK_EXPERTS = 32  # experts dequantized at a time: bounds the workspace (C x 2I x D bf16)

# Tile shapes (BLOCK_M pairs of one expert per tile, BLOCK_N outputs, BLOCK_K inputs per step). mlp1's
# BLOCK_N counts interleaved gate and linear columns (BLOCK_N / 2 SwiGLU outputs) when FUSED, else each of
# the two products has BLOCK_N / 2 columns. Dequant: BLOCK_R rows x BLOCK_B blocks per step, ROWS rows per
# program. The winners of tests/benchmarks/gpu/moe_prefill.py on the H200 (2026-12-01, triton 3.6; table in
# tests/benchmarks/results/h200-2026-12-01-moe-prefill.txt): mlp1 444 TFLOP/s, mlp2 409 TFLOP/s at T = 2048.
CONFIG = dict(
    BLOCK_M=128,
    dequant=dict(BLOCK_R=8, BLOCK_B=16, ROWS=64, num_warps=4),
    mlp1=dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4, FUSED=True),
    mlp2=dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4),
)
# fp32 activations multiply in fp32 (FMAs, not tensor cores): tiles small enough not to spill registers (sm_90
# compile: 64 x 64 x 16 at 4 warps holds in ~230 registers; 64 x 128 x 32 spills kilobytes a thread).
CONFIG_F32 = dict(
    BLOCK_M=64,
    dequant=CONFIG["dequant"],
    mlp1=dict(BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=3, FUSED=True),
    mlp2=dict(BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=3),
)


def _buffer(shape, dtype, device) -> torch.Tensor:
    if _POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ---- shared device helpers ------------------------------------------------------------------------------------



@triton.jit
def _expert_has_tokens(tiles_ptr, MAX_TILES, e, BLOCK_TILES: tl.constexpr):
    # Whether some tile of the routing table (moe.moe_routing: expert, start, end per tile) holds pairs of
    # expert e: the per-expert counts are not materialised, and the table is small (P/BLOCK_M + E entries).
    found = 0
    for t0 in range(0, MAX_TILES, BLOCK_TILES):
        offs_t = t0 + tl.arange(0, BLOCK_TILES)
        mask_t = offs_t < MAX_TILES
        te = tl.load(tiles_ptr + offs_t, mask=mask_t, other=-1)
        ts = tl.load(tiles_ptr + MAX_TILES + offs_t, mask=mask_t, other=0)
        tn = tl.load(tiles_ptr + 2 * MAX_TILES + offs_t, mask=mask_t, other=0)
        found += tl.sum(((te == e) & (ts < tn)).to(tl.int32), axis=0)
    return found > 0


# ---- 0. routing in parallel ----------------------------------------------------------------------------------------
#
# The same tables as moe.moe_routing (and moe.moe_routing_ref), built by many programs instead of one: that kernel
# walks all P pairs twice in one program (113-118 us at T = 2048, E = 32 on the H200, NOTES-moe.md), here each pass
# over the pairs is split into chunks of BP pairs. (1) per-chunk counts per expert; (2) one small program: prefix
# sums over experts and chunks give each (chunk, expert) its first sorted position, and the tile list; (3) each
# chunk places its pairs at that position plus their rank among the chunk's pairs of the same expert. Positions
# follow pair order within an expert, as a stable sort's: no atomics, the same tables on every run.

# BP pairs of one chunk x BE experts, one-hot.
@triton.jit
def _route_count_kernel(idx_ptr, P, counts_ptr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_e = tl.arange(0, BLOCK_E)
    ex = tl.load(idx_ptr + offs_p, mask=offs_p < P, other=-1).to(tl.int32)
    counts = tl.sum((ex[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + pid * BLOCK_E + offs_e, counts)


# One program: BC chunks x BE experts per step; BM tile slots per step.
@triton.jit
def _route_scan_kernel(counts_ptr, NUM_CHUNKS, E, first_ptr, tiles_ptr, MAX_TILES,
                       BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_e = tl.arange(0, BLOCK_E)
    totals = tl.zeros([BLOCK_E], tl.int32)
    for c0 in range(0, NUM_CHUNKS, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        ptrs = counts_ptr + offs_c[:, None] * BLOCK_E + offs_e[None, :]
        totals += tl.sum(tl.load(ptrs, mask=(offs_c < NUM_CHUNKS)[:, None], other=0), axis=0)
    starts = tl.cumsum(totals, axis=0) - totals  # first sorted position of each expert
    seen = starts
    for c0 in range(0, NUM_CHUNKS, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = (offs_c < NUM_CHUNKS)[:, None]
        counts = tl.load(counts_ptr + offs_c[:, None] * BLOCK_E + offs_e[None, :], mask=mask_c, other=0)
        first = tl.cumsum(counts, axis=0) - counts + seen[None, :]  # after the earlier chunks' pairs of e
        tl.store(first_ptr + offs_c[:, None] * BLOCK_E + offs_e[None, :], first, mask=mask_c)
        seen += tl.sum(counts, axis=0)
    _store_tiles(tiles_ptr, MAX_TILES, totals, starts, offs_e, E, BLOCK_T, BLOCK_M)  # the same table as moe.py's


@triton.jit
def _route_place_kernel(idx_ptr, P, first_ptr, order_ptr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_e = tl.arange(0, BLOCK_E)
    mask_p = offs_p < P
    ex = tl.load(idx_ptr + offs_p, mask=mask_p, other=-1).to(tl.int32)
    onehot = (ex[:, None] == offs_e[None, :]).to(tl.int32)  # [BP, BE]
    rank = tl.cumsum(onehot, axis=0) - onehot  # earlier pairs of the same expert in this chunk
    first = tl.load(first_ptr + pid * BLOCK_E + offs_e)
    pos = tl.sum(onehot * (rank + first[None, :]), axis=1)
    tl.store(order_ptr + pos, offs_p, mask=mask_p)


def moe_routing_parallel(expert_indices: torch.Tensor, num_experts: int, block_t: int):
    """``moe.moe_routing``'s tables (pairs sorted stably by expert; tiles of ``block_t`` pairs of one expert,
    M = P // block_t + min(E, P) slots), from three launches that spread the pairs over many programs.
    Its plain-PyTorch reference is ``moe.moe_routing_ref`` (same signature)."""
    P = expert_indices.numel()
    max_tiles = P // block_t + min(num_experts, P)
    device = expert_indices.device
    order = torch.empty(P, dtype=torch.int32, device=device)
    tiles = torch.empty(3, max_tiles, dtype=torch.int32, device=device)
    block_e = triton.next_power_of_2(num_experts)
    block_p = max(16, min(triton.next_power_of_2(P), 8192 // block_e))  # one-hot tiles of <= 8192 elements
    chunks = triton.cdiv(P, block_p)
    counts = torch.empty(chunks, block_e, dtype=torch.int32, device=device)
    first = torch.empty(chunks, block_e, dtype=torch.int32, device=device)
    idx = expert_indices.contiguous()
    _route_count_kernel[(chunks,)](idx, P, counts, BLOCK_P=block_p, BLOCK_E=block_e, num_warps=4)
    _route_scan_kernel[(1,)](counts, chunks, num_experts, first, tiles, max_tiles, BLOCK_T=block_t,
                             BLOCK_C=max(1, min(triton.next_power_of_2(chunks), 8192 // block_e)), BLOCK_E=block_e,
                             BLOCK_M=max(16, min(triton.next_power_of_2(max_tiles), 8192 // block_e)), num_warps=4)
    _route_place_kernel[(chunks,)](idx, P, first, order, BLOCK_P=block_p, BLOCK_E=block_e, num_warps=4)
    return order, tiles


# ---- 1. dequantization into the workspace ------------------------------------------------------------------------

@triton.jit
def _slot_pairs(w, m_lo, m_hi, SLOT: tl.constexpr):
    # w [BR, BB, 4] uint32 words (moe.pack_words layout); m_lo, m_hi [BR, BB, 1] fp32: the block scale as two
    # factors. Returns slot SLOT of each word, elements 8*SLOT + 2*word and + 1 of each block, as the bits of
    # two bf16 values in one uint32 (the even element in the low half, as in memory).
    # The shifts put the code's sign, exponent and mantissa bits where fp16 has them: the fp16 number is then
    # exactly E2M1 * 2^-14 (subnormal for the codes +-0.5 and 0), widened to fp32 exactly.
    if SLOT == 3:
        p = w & 0x8E008E00
    elif SLOT == 2:
        p = (w << 3) & 0x8E008E00
    elif SLOT == 1:
        p = ((w << 6) & 0x0E000E00) | ((w << 2) & 0x80008000)
    else:
        p = ((w << 9) & 0x0E000E00) | ((w << 1) & 0x80008000)
    lo = (p & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (p >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    # E2M1 * 2^-14 * 2^(s-127) in two exact multiplies (one rounding at most: to fp32's subnormals or to inf,
    # as core.mxfp4.dequantize rounds). The product is a bf16 value (two significant bits, exponent in bf16's
    # range or inf/NaN), so its upper 16 bits are its bf16 bits: no conversion, which also keeps bf16
    # subnormals right in the interpreter (its fp32 -> bf16 cast flushes them).
    lo = (lo * m_lo * m_hi).to(tl.uint32, bitcast=True)
    hi = (hi * m_lo * m_hi).to(tl.uint32, bitcast=True)
    return (hi & 0xFFFF0000) | (lo >> 16)


@triton.jit
def _dequant_step(w, s, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    # w [BR, BB, 4] int32 words, s [BR, BB] uint8 E8M0 -> [BR, BB * 16] uint32: bf16 pairs in element order.
    w = w.to(tl.uint32, bitcast=True)
    s = s.to(tl.int32)[:, :, None]
    # 2^(s-127) / 2^-14 = 2^(s-113) is a normal fp32 up to s = 240; larger bytes (valid, never seen in real
    # checkpoints) take a second factor 2^(s-240) <= 2^14, and 255 is NaN, so every byte is exact.
    m_lo = ((tl.minimum(s, 240) + 14) << 23).to(tl.float32, bitcast=True)
    m_hi = ((tl.maximum(s, 240) - 240 + 127) << 23).to(tl.float32, bitcast=True)
    m_hi = tl.where(s == 255, float("nan"), m_hi)
    v01 = tl.join(_slot_pairs(w, m_lo, m_hi, 0), _slot_pairs(w, m_lo, m_hi, 1))
    v23 = tl.join(_slot_pairs(w, m_lo, m_hi, 2), _slot_pairs(w, m_lo, m_hi, 3))
    v = tl.join(v01, v23)  # [BR, BB, word, a, c]: slot a + 2c
    # Pair 4*slot + word of each block (elements 8*slot + 2*word, +1): dims (c, a, word), word fastest.
    v = tl.permute(v, (0, 1, 4, 3, 2))
    return tl.reshape(v, [BLOCK_R, BLOCK_B * 16])


# One program: ROWS rows of one expert of the chunk (BR rows x BB blocks of 32 values per step), all K;
# out_ptr is the int32 view of the bf16 workspace (pairs of values), strides in pairs.
@triton.jit
def _dequant_kernel(w_ptr, stride_w_e, stride_w_r,
                    s_ptr, stride_s_e, stride_s_r,
                    out_ptr, stride_o_e, stride_o_r,
                    tiles_ptr, MAX_TILES, first_expert, R, NB,
                    BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr, ROWS: tl.constexpr, BLOCK_TILES: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_e = tl.program_id(1)
    e = first_expert + pid_e
    if not _expert_has_tokens(tiles_ptr, MAX_TILES, e, BLOCK_TILES):
        return  # its workspace slot is never read
    e64 = e.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_b = tl.arange(0, BLOCK_B)
    offs_w = tl.arange(0, 4)
    offs_v = tl.arange(0, BLOCK_B * 16)
    K2 = NB * 16  # bf16 pairs per row
    # Row strides of the words arrive in 32-value blocks (4 words): the compiler then knows that rows start
    # 16-byte aligned and issues 16-byte loads.
    w_base = w_ptr + e64 * stride_w_e * 4
    s_base = s_ptr + e64 * stride_s_e
    o_base = out_ptr + pid_e.to(tl.int64) * stride_o_e
    for r0 in range(pid_r * ROWS, tl.minimum(pid_r * ROWS + ROWS, R), BLOCK_R):
        rows = r0 + offs_r
        mask_r = rows < R
        for b0 in range(0, NB, BLOCK_B):
            blk = b0 + offs_b
            mask = mask_r[:, None] & (blk < NB)[None, :]
            w_ptrs = w_base + rows[:, None, None] * stride_w_r * 4 + blk[None, :, None] * 4 + offs_w[None, None, :]
            w = tl.load(w_ptrs, mask=mask[:, :, None], other=0)
            s = tl.load(s_base + rows[:, None] * stride_s_r + blk[None, :], mask=mask, other=127)
            v = _dequant_step(w, s, BLOCK_R, BLOCK_B)
            cols = b0 * 16 + offs_v
            o_ptrs = o_base + rows[:, None] * stride_o_r + cols[None, :]
            tl.store(o_ptrs, v.to(tl.int32, bitcast=True), mask=mask_r[:, None] & (cols < K2)[None, :])


def dequantize_experts_ref(words, scales, tiles, first_expert: int, out) -> torch.Tensor:
    """Plain-PyTorch spec of :func:`dequantize_experts` (host syncs)."""
    C = out.shape[0]
    used = set()
    for e, start, end in tiles.T.tolist():
        if start < end:
            used.add(e)
    for c in range(C):
        e = first_expert + c
        if e in used and e < words.shape[0]:
            out[c] = _moe.dequantize_words(words[e], scales[e], out.dtype)
    return out


def dequantize_experts(words, scales, tiles, first_expert: int, out, cfg=None) -> torch.Tensor:
    """Experts first_expert .. first_expert + C - 1 that some tile of ``tiles`` routes pairs to, decoded
    exactly (as ``moe.dequantize_words``): words (E, R, K/8) int32 + scales (E, R, K/32) uint8 → out[c] =
    expert first_expert + c, (C, R, K) bf16. The slots of experts without pairs are left as they were."""
    cfg = cfg or CONFIG["dequant"]
    E, R, W = words.shape
    C, K = out.shape[0], W * 8
    if scales.shape != (E, R, K // 32) or out.shape[1:] != (R, K) or out.dtype != torch.bfloat16:
        raise ValueError(f"dequantize_experts: words {tuple(words.shape)}, scales {tuple(scales.shape)}, "
                         f"out {tuple(out.shape)} {out.dtype}")
    if words.stride(2) != 1 or scales.stride(2) != 1 or out.stride(2) != 1 or words.stride(1) % 4 or out.stride(1) % 2:
        raise ValueError("dequantize_experts: rows must be contiguous (words in whole blocks)")
    C = min(C, E - first_expert)
    if C <= 0:
        return out
    max_tiles = tiles.shape[1]
    rows = cfg["ROWS"]
    if rows % cfg["BLOCK_R"]:
        raise ValueError(f"dequantize_experts: ROWS {rows} is not a multiple of BLOCK_R {cfg['BLOCK_R']}")
    _dequant_kernel[(triton.cdiv(R, rows), C)](
        words, words.stride(0) // 4, words.stride(1) // 4, scales, scales.stride(0), scales.stride(1),
        out.view(torch.int32), out.stride(0) // 2, out.stride(1) // 2, tiles, max_tiles, first_expert, R, K // 32,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_B=cfg["BLOCK_B"], ROWS=rows,
        BLOCK_TILES=min(1024, triton.next_power_of_2(max_tiles)), num_warps=cfg["num_warps"])
    return out


# ---- 2. grouped GEMMs over the workspace ---------------------------------------------------------------------------

@triton.jit
def _tile_of_chunk(tiles_ptr, MAX_TILES, pid_m, first_expert, num_experts):
    # (expert, start, end) of tile slot pid_m, and whether it is a real tile of an expert of this chunk.
    e = tl.load(tiles_ptr + pid_m)
    start = tl.load(tiles_ptr + MAX_TILES + pid_m)
    end = tl.load(tiles_ptr + 2 * MAX_TILES + pid_m)
    mine = (start < end) & (e >= first_expert) & (e < first_expert + num_experts)
    return e, start, end, mine


@triton.jit
def _f32(v):
    # v.to(fp32), by moving the bits for bf16: exact for subnormals too (the interpreter's cast flushes them).
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def _mma(a, b, acc, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(_f32(a), _f32(b), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _swiglu(gate, lin, alpha, limit):
    # Clamps by where(), not minimum(): NaN must propagate as in torch.clamp.
    gate = tl.where(gate > limit, limit, gate)
    lin = tl.where(lin > limit, limit, tl.where(lin < -limit, -limit, lin))
    return gate / (1.0 + tl.exp(-alpha * gate)) * (lin + 1.0)


# One tile of BM sorted pairs of one expert x BN columns of mlp1 (FUSED: BN/2 gate and BN/2 linear columns,
# interleaved, in one product; else two products of BN/2 columns). acc [BM, BN] = X[tokens] [BM, D] @ W^T.
@triton.jit
def _mlp1_grouped_kernel(x_ptr, stride_x_t, order_ptr, tiles_ptr, MAX_TILES,
                         ws_ptr, stride_ws_e, stride_ws_n,
                         b_ptr, stride_b_e, stride_b_h,
                         h_ptr, stride_h_r,
                         first_expert, num_experts, D, I, TOP_K, alpha, limit,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_K: tl.constexpr, FUSED: tl.constexpr, DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)  # fastest: the N tiles of one row tile run together and share its A rows
    pid_m = tl.program_id(1)
    e, start, end, mine = _tile_of_chunk(tiles_ptr, MAX_TILES, pid_m, first_expert, num_experts)
    if not mine:
        return
    HALF: tl.constexpr = BLOCK_N // 2
    offs_m = start + tl.arange(0, BLOCK_M)
    rows = tl.minimum(offs_m, end - 1)  # rows past the tile's end read its last row again (not stored)
    tok = (tl.load(order_ptr + rows) // TOP_K).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_x_t + offs_k[None, :]  # the gather: each row reads its token
    ws = ws_ptr + (e - first_expert).to(tl.int64) * stride_ws_e
    if FUSED:
        # Column j: SwiGLU output pid_n*HALF + j//2 of the gate rows (j even) or the linear rows (j odd).
        offs_j = tl.arange(0, BLOCK_N)
        half = offs_j % 2
        out_i = tl.minimum(pid_n * HALF + offs_j // 2, I - 1)  # columns past I read row I-1 (not stored)
        b_ptrs = ws + (half * I + out_i)[None, :] * stride_ws_n + offs_k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                mask_k = offs_k < D - k0
                a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=mask_k[:, None], other=0.0)
            acc = _mma(a, b, acc, DOT_F32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        bias = tl.load(b_ptr + e.to(tl.int64) * stride_b_e + half * stride_b_h + out_i)
        gate, lin = tl.split(tl.reshape(acc + bias[None, :], [BLOCK_M, HALF, 2]))
    else:
        out_i = tl.minimum(pid_n * HALF + tl.arange(0, HALF), I - 1)
        bg_ptrs = ws + out_i[None, :] * stride_ws_n + offs_k[:, None]
        bl_ptrs = bg_ptrs + I * stride_ws_n
        acc_g = tl.zeros([BLOCK_M, HALF], tl.float32)
        acc_l = tl.zeros([BLOCK_M, HALF], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                bg = tl.load(bg_ptrs)
                bl = tl.load(bl_ptrs)
            else:
                mask_k = offs_k < D - k0
                a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
                bg = tl.load(bg_ptrs, mask=mask_k[:, None], other=0.0)
                bl = tl.load(bl_ptrs, mask=mask_k[:, None], other=0.0)
            acc_g = _mma(a, bg, acc_g, DOT_F32)
            acc_l = _mma(a, bl, acc_l, DOT_F32)
            a_ptrs += BLOCK_K
            bg_ptrs += BLOCK_K
            bl_ptrs += BLOCK_K
        b_row = b_ptr + e.to(tl.int64) * stride_b_e + out_i
        gate = acc_g + tl.load(b_row)[None, :]
        lin = acc_l + tl.load(b_row + stride_b_h)[None, :]
    h = _swiglu(gate, lin, alpha, limit)
    offs_i = pid_n * HALF + tl.arange(0, HALF)
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_h_r + offs_i[None, :]
    tl.store(h_ptrs, _cast(h, h_ptr.dtype.element_ty), mask=(offs_m < end)[:, None] & (offs_i < I)[None, :])


# One tile of BM sorted pairs of one expert x BN outputs: y[pair] = w_pair * (h W2^T + b2), fp32, for the k-sum.
@triton.jit
def _mlp2_grouped_kernel(h_ptr, stride_h_r, order_ptr, tiles_ptr, MAX_TILES, ew_ptr,
                         ws_ptr, stride_ws_e, stride_ws_n,
                         b_ptr, stride_b_e,
                         y_ptr, stride_y_p,
                         first_expert, num_experts, I, D,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_K: tl.constexpr, DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e, start, end, mine = _tile_of_chunk(tiles_ptr, MAX_TILES, pid_m, first_expert, num_experts)
    if not mine:
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    rows = tl.minimum(offs_m, end - 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.minimum(offs_n, D - 1)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h_r + offs_k[None, :]
    b_ptrs = ws_ptr + (e - first_expert).to(tl.int64) * stride_ws_e + cols[None, :] * stride_ws_n + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            mask_k = offs_k < I - k0
            a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_k[:, None], other=0.0)
        acc = _mma(a, b, acc, DOT_F32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    pair = tl.load(order_ptr + rows).to(tl.int64)
    weight = tl.load(ew_ptr + pair).to(tl.float32)
    y = (acc + tl.load(b_ptr + e.to(tl.int64) * stride_b_e + cols)[None, :]) * weight[:, None]
    y_ptrs = y_ptr + pair[:, None] * stride_y_p + offs_n[None, :]
    tl.store(y_ptrs, y, mask=(offs_m < end)[:, None] & (offs_n < D)[None, :])


def _swiglu_ref(gate, lin, alpha, limit):
    gate = gate.clamp(max=limit)
    lin = lin.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (lin + 1)


def _chunk_tiles(tiles, first_expert: int, num_experts: int):
    for e, start, end in tiles.T.tolist():
        if start < end and first_expert <= e < first_expert + num_experts:
            yield e, start, end


def mlp1_grouped_ref(x, order, tiles, k: int, ws, b1, first_expert: int, h, cfg, alpha, limit) -> torch.Tensor:
    """Plain-PyTorch spec of :func:`mlp1_grouped` (fp32 arithmetic, host syncs)."""
    I = b1.shape[2]
    for e, start, end in _chunk_tiles(tiles, first_expert, ws.shape[0]):
        tok = order[start:end].long() // k
        g = x[tok].float() @ ws[e - first_expert, :I].float().T + b1[e, 0]
        lin = x[tok].float() @ ws[e - first_expert, I:].float().T + b1[e, 1]
        h[start:end] = _swiglu_ref(g, lin, alpha, limit).to(h.dtype)
    return h


def mlp1_grouped(x, order, tiles, k: int, ws, b1, first_expert: int, h, cfg, alpha, limit) -> torch.Tensor:
    """h[r] = SwiGLU(x[token of sorted pair r] @ W1_e^T + b1_e) for the tiles of experts first_expert ..
    first_expert + C - 1, whose bf16 mlp1 is ws[e - first_expert] (C, 2I, D): rows 0..I-1 gate, I..2I-1
    linear. x (T, D); b1 (E, 2, I) fp32; h (P, I) in x's dtype (rows of other experts untouched)."""
    T, D = x.shape
    C, N, _ = ws.shape
    I = N // 2
    if ws.shape[2] != D or b1.shape[1:] != (2, I) or h.shape[1] != I or h.dtype != x.dtype:
        raise ValueError(f"mlp1_grouped: x {tuple(x.shape)}, ws {tuple(ws.shape)}, b1 {tuple(b1.shape)}, "
                         f"h {tuple(h.shape)} {h.dtype}")
    if x.stride(1) != 1 or ws.stride(2) != 1 or b1.stride(2) != 1 or h.stride(1) != 1:
        raise ValueError("mlp1_grouped: rows must be contiguous")
    fused = bool(cfg.get("FUSED", True))
    if cfg["BLOCK_N"] < 32 or cfg["BLOCK_K"] < 16:
        raise ValueError(f"mlp1_grouped config {cfg}: BLOCK_N >= 32 and BLOCK_K >= 16 (tl.dot shapes)")
    max_tiles = tiles.shape[1]
    block_m = cfg["BLOCK_M"]
    _mlp1_grouped_kernel[(triton.cdiv(I, cfg["BLOCK_N"] // 2), max_tiles)](
        x, x.stride(0), order, tiles, max_tiles, ws, ws.stride(0), ws.stride(1), b1, b1.stride(0), b1.stride(1),
        h, h.stride(0), first_expert, C, D, I, k, alpha, limit,
        BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], EVEN_K=D % cfg["BLOCK_K"] == 0,
        FUSED=fused, DOT_F32=_INTERPRET or x.dtype != torch.bfloat16,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return h


def mlp2_grouped_ref(h, order, tiles, ew, ws, b2, first_expert: int, y, cfg) -> torch.Tensor:
    """Plain-PyTorch spec of :func:`mlp2_grouped` (fp32 arithmetic, host syncs)."""
    for e, start, end in _chunk_tiles(tiles, first_expert, ws.shape[0]):
        pair = order[start:end].long()
        out = h[start:end].float() @ ws[e - first_expert].float().T + b2[e]
        y[pair] = out * ew.reshape(-1)[pair].float()[:, None]
    return y


def mlp2_grouped(h, order, tiles, ew, ws, b2, first_expert: int, y, cfg) -> torch.Tensor:
    """y[pair of sorted row r] = w_pair * (h[r] @ W2_e^T + b2_e), fp32, for the tiles of experts first_expert ..
    first_expert + C - 1, whose bf16 mlp2 is ws[e - first_expert] (C, D, I). ew (T, k) routing weights;
    b2 (E, D) fp32; y (P, D) fp32 (rows of other experts untouched)."""
    P, I = h.shape
    C, D, _ = ws.shape
    if ws.shape[2] != I or b2.shape[1] != D or y.shape != (P, D) or y.dtype != torch.float32:
        raise ValueError(f"mlp2_grouped: h {tuple(h.shape)}, ws {tuple(ws.shape)}, b2 {tuple(b2.shape)}, "
                         f"y {tuple(y.shape)} {y.dtype}")
    if h.stride(1) != 1 or ws.stride(2) != 1 or b2.stride(1) != 1 or y.stride(1) != 1 or not ew.is_contiguous():
        raise ValueError("mlp2_grouped: rows must be contiguous")
    if cfg["BLOCK_N"] < 16 or cfg["BLOCK_K"] < 16:
        raise ValueError(f"mlp2_grouped config {cfg}: BLOCK_N and BLOCK_K >= 16 (tl.dot shapes)")
    max_tiles = tiles.shape[1]
    _mlp2_grouped_kernel[(triton.cdiv(D, cfg["BLOCK_N"]), max_tiles)](
        h, h.stride(0), order, tiles, max_tiles, ew, ws, ws.stride(0), ws.stride(1), b2, b2.stride(0),
        y, y.stride(0), first_expert, C, I, D,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], EVEN_K=I % cfg["BLOCK_K"] == 0,
        DOT_F32=_INTERPRET or h.dtype != torch.bfloat16, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


# ---- the public op ------------------------------------------------------------------------------------------------

def workspace_elements(w: MoEWeights, chunk_experts: int = CHUNK_EXPERTS) -> int:
    """bf16 elements of the workspace for layer ``w``: min(E, chunk) experts of mlp1 (2I x D), reused for mlp2."""
    return min(w.num_experts, chunk_experts) * 2 * w.intermediate * w.hidden


def moe_prefill_dequant(x, expert_weights, expert_indices, w: MoEWeights, swiglu_alpha: float, swiglu_limit: float,
                        *, config: dict | None = None, out: torch.Tensor | None = None,
                        workspace: torch.Tensor | None = None, chunk_experts: int = CHUNK_EXPERTS,
                        routing: str = "parallel") -> torch.Tensor:
    """Mixture of the chosen MXFP4 experts, as ``moe.moe_mxfp4`` (same arguments, same result up to fp32
    summation order): (T, D) → (T, D) in x.dtype. No host synchronisation.

    ``config`` overrides :data:`CONFIG` (:data:`CONFIG_F32` for fp32 x; keys BLOCK_M, dequant, mlp1, mlp2);
    ``out`` may be given (T, D) in x.dtype; ``workspace`` (>= :func:`workspace_elements` bf16 elements,
    contiguous) is allocated per call if not given (from the caching allocator: 1.06 GB at gpt-oss sizes);
    ``routing``: "parallel" (:func:`moe_routing_parallel`) or "moe" (``moe.moe_routing``, one program), the
    same tables.
    """
    T, D = x.shape
    k = expert_indices.shape[1]
    if D != w.hidden or expert_indices.shape[0] != T or expert_weights.shape != expert_indices.shape:
        raise ValueError(f"moe_prefill_dequant: x {tuple(x.shape)}, weights {tuple(expert_weights.shape)}, "
                         f"indices {tuple(expert_indices.shape)} for experts of hidden size {w.hidden}")
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise NotSupported("triton", f"MoE activations in {x.dtype} (bfloat16 or float32)")
    if chunk_experts < 1:
        raise ValueError(f"moe_prefill_dequant: chunk_experts {chunk_experts} < 1")
    if routing not in ("parallel", "moe"):
        raise ValueError(f"moe_prefill_dequant: routing {routing!r} (parallel or moe)")
    cfg = dict(CONFIG if x.dtype == torch.bfloat16 else CONFIG_F32, **(config or {}))
    block_m = cfg["BLOCK_M"]
    mlp1_cfg = dict(cfg["mlp1"], BLOCK_M=block_m)
    mlp2_cfg = dict(cfg["mlp2"], BLOCK_M=block_m)
    x = x.contiguous()
    idx = expert_indices.contiguous()
    ew = expert_weights.contiguous()
    if out is None:
        out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    elif out.shape != (T, D) or out.dtype != x.dtype or out.stride() != (D, 1):
        raise ValueError(f"moe_prefill_dequant: out must be a contiguous ({T}, {D}) {x.dtype} tensor")
    if T == 0:
        return out
    E, I = w.num_experts, w.intermediate
    C = min(E, chunk_experts)
    need = C * 2 * I * D
    if workspace is None:
        workspace = _buffer((need,), torch.bfloat16, x.device)
    elif workspace.dtype != torch.bfloat16 or workspace.numel() < need or not workspace.is_contiguous():
        raise ValueError(f"moe_prefill_dequant: workspace must be contiguous bf16 with >= {need} elements")
    ws1 = workspace[:need].view(C, 2 * I, D)
    ws2 = workspace[:C * D * I].view(C, D, I)
    w1, s1 = w.w1.view(E, 2 * I, D // 8), w.s1.view(E, 2 * I, D // 32)
    h = _buffer((T * k, I), x.dtype, x.device)  # SwiGLU(mlp1) per sorted pair, in x's dtype
    y = _buffer((T * k, D), torch.float32, x.device)  # weighted mlp2 rows per pair
    order, tiles = (moe_routing_parallel if routing == "parallel" else _moe.moe_routing)(idx, E, block_m)
    for first in range(0, E, C):
        # Stream order makes the reuse safe: mlp1's GEMM has read the workspace before mlp2's dequant writes it.
        dequantize_experts(w1, s1, tiles, first, ws1, cfg["dequant"])
        mlp1_grouped(x, order, tiles, k, ws1, w.b1, first, h, mlp1_cfg, swiglu_alpha, swiglu_limit)
        dequantize_experts(w.w2, w.s2, tiles, first, ws2, cfg["dequant"])
        mlp2_grouped(h, order, tiles, ew, ws2, w.b2, first, y, mlp2_cfg)
    _moe.launch_sum_slots(y, out, k)
    return out


def moe_prefill_dequant_ref(x, expert_weights, expert_indices, w: MoEWeights, swiglu_alpha, swiglu_limit):
    """The spec: ``moe.moe_mxfp4_ref`` (float32 arithmetic, SwiGLU(h) rounded to x's dtype)."""
    return _moe.moe_mxfp4_ref(x, expert_weights, expert_indices, w, swiglu_alpha, swiglu_limit)
