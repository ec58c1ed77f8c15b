"""Tensor-core decode kernels for the MXFP4 MoE at a few tokens (the ``gemv`` path's fast variant, CUDA sm80+).

The gemv kernels of moe.py multiply on CUDA cores: per weight value a conversion to fp32 and an FFMA on top of
the 4-bit decode, ~4-5 instructions a value, which left them instruction- and latency-bound at 1.5-1.7 TB/s on
the H200 (NOTES-moe.md). Here the decoded weights go straight into ``mma.sync.m16n8k16`` (bf16 operands, fp32
accumulators): the 16 x 8 x 16 product takes 128 weight values a warp per instruction, so what is left per value
is the decode itself (shifts, masks and one bf16x2 multiply by the block scale, as ``moe._slot_bf16``).

On the H200 they are correct but slower than the portable kernels in every tile tried (mlp1 23.0 us vs 21.4,
mlp2 19.8 vs 14.6 at one token): ``moe.CONFIGS`` does not select them; ``CONFIG`` below and
tests/benchmarks/gpu/moe_mma.py keep them measurable (NOTES-moe.md, session 5: what was measured, what is next).

The kernels are written in Gluon (Triton's layout-explicit dialect) because the point is that no value moves
between threads: every lane loads, from global memory, exactly the words and activations its MMA fragments need.
That works with the weights in the layout moe.py already keeps (``pack_words``), through a free choice: a dot
product may sum over K in any order, as long as both operands use the same one. Within a chunk of four 32-value
blocks, lane q (0..3) of every group of four lanes takes all 32 values of block q, for both operands:

* the A operand (weights, [M rows, K]): a lane's fragment is rows g and g + 8 and, per 16-wide K step, positions
  ``2q, 2q+1, 2q+8, 2q+9``; over the chunk's 8 steps that is 32 positions, mapped to the 32 values of block q of
  each of its two rows: 16 contiguous bytes (one 128-bit load) and one scale byte a row;
* the B operand (activations, [K, 8 columns], every column the pair's token): the same 32 positions of block q of
  the token's row, 64 contiguous bytes.

The order: in-chunk K position kk = 64 j1 + 32 j0 + 16 w1 + 8 w0 + 2q + e for the element 8j + 2w + e of block q
that slot j = 2 j1 + j0 of word w = 2 w1 + w0 decodes (e the 16-bit lane); the kernels express it as a join /
permute / reshape of the loaded tiles, and ``convert_layout(..., assert_trivial=True)`` makes the compiler prove
that it moves no data. mlp1 puts an output's gate row at tile row g and its linear row at g + 8, so a lane holds
both accumulators of one SwiGLU input. Column 0 of the result is the pair's row.

Gluon has no interpreter: these kernels run on CUDA only, where ``available()`` says so, and were checked on the
H200 (tests/test_triton_moe.py, tests/benchmarks/gpu/moe_mma.py) against ``moe_mxfp4_ref`` and the float64 oracle.
Elsewhere (and for fp32 activations or scale bytes > 128) an "mma" config runs moe.GEMV_PORTABLE's kernels.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

try:  # Gluon ships with triton >= 3.5; the engine runs without it (the gemv kernels)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
    from triton.language.extra import cuda as _cuda
    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the installed triton
    gluon = None
    _IMPORT_ERROR = exc

from mxmoe.backends.triton_engine.pdl import launch_options

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tile choices: NT 16-row MMA tiles per warp, NW warps (a program covers 16 * NT * NW rows of W); UNROLL 4 gives each
# lane 4 consecutive blocks per group (_k_loop_span), STAGES > 0 streams the weights through a cp.async ring
# (_k_loop_async), PREFETCH 1 loads the next chunk first. The best of the H200 sweep (tests/benchmarks/gpu/moe_mma.py,
# 2026-12-02), still slower than moe.GEMV_PORTABLE (mlp1 23.0 us vs 21.4, mlp2 19.8 vs 14.6 at T = 1): not the
# default; NOTES-moe.md (session 5) says what was measured and what is next.
CONFIG = dict(mlp1=dict(MMA=True, NT=1, NW=1, UNROLL=1, PREFETCH=0, STAGES=4),
              mlp2=dict(MMA=True, NT=1, NW=2, UNROLL=4, PREFETCH=0, STAGES=0))


@functools.cache
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def available(x: torch.Tensor, small_scales: bool) -> str | None:
    """None if these kernels can run on x's device for bf16 activations; else why not (a sentence)."""
    if _IMPORT_ERROR is not None:
        return f"triton has no Gluon ({_IMPORT_ERROR})"
    if _INTERPRET or not x.is_cuda:
        return "Gluon kernels run on CUDA devices only"
    if os.environ.get("MXMOE_TRITON_MMA", "1") == "0":
        return "turned off by MXMOE_TRITON_MMA=0"
    if x.dtype != torch.bfloat16:
        return f"activations in {x.dtype} (these kernels take bfloat16)"
    if not small_scales:
        return "scale bytes above 128 (the bf16 decode needs 2^(s-1) to be a normal bf16)"
    if not _capable(x.device.index if x.device.index is not None else torch.cuda.current_device()):
        return "compute capability below 8.0 (no bf16 mma.sync)"
    return None


if gluon is not None:

    @gluon.constexpr_function
    def _weight_layout(NT, NW):
        # Words [4 (q), BM rows, 4 (word)] where every lane holds the 16 bytes of block q of the rows its A fragments
        # cover: lane = q + 4 * (row % 8), row bit 3 in a register (the fragment's rows g and g + 8), warps on
        # 16-row tiles, then NT tiles per warp in registers, as NVMMADistributedLayout([2, 0], [NW, 1]) puts them.
        reg = [[0, 0, 1], [0, 0, 2], [0, 8, 0]] + [[0, 16 * NW * (1 << i), 0] for i in range(NT.bit_length() - 1)]
        lane = [[1, 0, 0], [2, 0, 0], [0, 1, 0], [0, 2, 0], [0, 4, 0]]
        warp = [[0, 16 * (1 << i), 0] for i in range(NW.bit_length() - 1)]
        return gl.DistributedLinearLayout(reg, lane, warp, [], [4, 16 * NT * NW, 4])

    @gluon.jit
    def _wait_for_predecessor(GDC: gl.constexpr):
        # pdl.wait_for_predecessor, for Gluon kernels.
        if GDC:
            _cuda.gdc_launch_dependents()
            _cuda.gdc_wait()

    @gluon.jit
    def _slot(w, e, SLOT: gl.constexpr):
        # moe._slot_bf16 for one slot of the words w: both 16-bit lanes' codes of SLOT placed at bf16's sign bit and
        # lowest exponent bits (E2M1 * 2^-126), then one bf16x2 multiply by 2^(s-1) (e: its bf16x2 bits).
        if SLOT == 3:
            q = ((w >> 3) & 0x01C001C0) | (w & 0x80008000)
        elif SLOT == 2:
            q = (w & 0x01C001C0) | ((w << 3) & 0x80008000)
        elif SLOT == 1:
            q = ((w << 3) & 0x01C001C0) | ((w << 2) & 0x80008000)
        else:
            q = ((w << 6) & 0x01C001C0) | ((w << 1) & 0x80008000)
        lo, hi = gl.inline_asm_elementwise(
            "{ .reg .b32 t; mul.rn.bf16x2 t, $2, $3; mov.b32 {$0, $1}, t; }",
            "=h,=h,r,r", [q, e], dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        return gl.join(lo, hi)  # [..., 2]: the 16-bit lane e last

    @gluon.jit
    def _a_operand(words, scales, A_L: gl.constexpr):
        # words [4 (q), BM, 4 (w)] uint32 and scale bytes [4, BM] (<= 128) -> the [BM, 128] bf16 A operand in the
        # chunk's K order kk = 64 j1 + 32 j0 + 16 w1 + 8 w0 + 2q + e (module docstring), with no data movement.
        s = scales.to(gl.uint32) + 126  # bf16 exponent field of 2^(s-1)
        e = gl.expand_dims((s << 7) | (s << 23), 2)
        v = gl.join(gl.join(_slot(words, e, 0), _slot(words, e, 1)),
                    gl.join(_slot(words, e, 2), _slot(words, e, 3)))  # [q, row, w, e, j0, j1]
        v = gl.reshape(v, [4, v.shape[1], 2, 2, 2, 2, 2])  # [q, row, w1, w0, e, j0, j1]
        v = gl.reshape(gl.permute(v, [1, 6, 5, 2, 3, 0, 4]), [v.shape[1], 128])
        return gl.convert_layout(v, A_L, assert_trivial=True)

    @gluon.jit
    def _b_operand(xw, B_L: gl.constexpr):
        # xw [8 (column), 4 (q), 16] int32: element pairs 2i, 2i+1 of block q -> the [128, 8] bf16 B operand with
        # kk = 16s + 8h + 2q + e for element 4s + 2h + e (element 8j + 2w + e of a block is what slot j of word w
        # decodes: s = 2j + w1, h = w0). Loaded as int32 so that registers carried across iterations stay whole.
        lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [xw],
                                           dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        v = gl.reshape(gl.join(lo, hi), [8, 4, 8, 2, 2])  # [column, q, s, h, e]
        v = gl.reshape(gl.permute(v, [2, 3, 1, 4, 0]), [128, 8])
        return gl.convert_layout(v, B_L, assert_trivial=True)

    @gluon.jit
    def _load_w(w_rows, s_rows, c, offs_q, offs_w, nq):
        # Chunk c's words [4, BM, 4] and scale bytes [4, BM]; with nq < 4 (the last chunk) blocks q >= nq are zeros.
        blk = c * 4 + offs_q
        wq = gl.expand_dims(gl.expand_dims(blk * 4, 1), 2) + gl.expand_dims(gl.expand_dims(offs_w, 0), 1)
        sq = gl.expand_dims(blk, 1)
        if nq < 4:
            mq = gl.expand_dims(offs_q < nq, 1)
            words = gl.load(w_rows + wq, mask=gl.expand_dims(mq, 2), other=0)
            scales = gl.load(s_rows + sq, mask=mq, other=127)
        else:
            words = gl.load(w_rows + wq)
            scales = gl.load(s_rows + sq)
        return words.to(gl.uint32, bitcast=True), scales

    @gluon.jit
    def _load_x(x_row, c, offs_c, offs_qx, offs_v, nq):
        # Chunk c's activations as int32 pairs [8, 4, 16]: block q of the token's row in every column (zeros past
        # the last block).
        xq = (gl.expand_dims(gl.expand_dims(offs_c * 0, 1), 2)
              + gl.expand_dims(gl.expand_dims((c * 4 + offs_qx) * 16, 0), 2)
              + gl.expand_dims(gl.expand_dims(offs_v, 0), 1))
        if nq < 4:
            x = gl.load(x_row + xq, mask=gl.expand_dims(gl.expand_dims(offs_qx < nq, 0), 2), other=0)
        else:
            x = gl.load(x_row + xq)
        return x

    @gluon.jit
    def _load_wb(w_rows, s_rows, blk, offs_w, MASKED: gl.constexpr, NB):
        # As _load_w for lane q's block blk[q] (any blocks; zeros past NB if MASKED).
        wq = gl.expand_dims(gl.expand_dims(blk * 4, 1), 2) + gl.expand_dims(gl.expand_dims(offs_w, 0), 1)
        sq = gl.expand_dims(blk, 1)
        if MASKED:
            mq = sq < NB
            words = gl.load(w_rows + wq, mask=gl.expand_dims(mq, 2), other=0)
            scales = gl.load(s_rows + sq, mask=mq, other=127)
        else:
            words = gl.load(w_rows + wq)
            scales = gl.load(s_rows + sq)
        return words.to(gl.uint32, bitcast=True), scales

    @gluon.jit
    def _load_xb(x_row, blk, offs_c, offs_v, MASKED: gl.constexpr, NB):
        xq = (gl.expand_dims(gl.expand_dims(offs_c * 0, 1), 2) + gl.expand_dims(gl.expand_dims(blk * 16, 0), 2)
              + gl.expand_dims(gl.expand_dims(offs_v, 0), 1))
        if MASKED:
            x = gl.load(x_row + xq, mask=gl.expand_dims(gl.expand_dims(blk < NB, 0), 2), other=0)
        else:
            x = gl.load(x_row + xq)
        return x

    @gluon.jit
    def _k_loop_span(w_rows, s_rows, x_row, NB, acc, LW: gl.constexpr, LX: gl.constexpr, A_L: gl.constexpr,
                     B_L: gl.constexpr):
        # _k_loop with each lane's blocks contiguous: in a group of 16 blocks lane q takes blocks 4q .. 4q + 3 (one
        # per sub-chunk, all four loaded before any is multiplied), so the 4 lanes of a row read 256 contiguous
        # bytes at once instead of 64 (DRAM row-buffer locality).
        offs_q = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, LW)))
        offs_w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW)))
        offs_qx = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, LX)))
        offs_v = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, LX)))
        offs_c = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, LX)))
        groups = NB // 16
        for g in range(groups):
            b = g * 16 + offs_q * 4
            bx = g * 16 + offs_qx * 4
            w0, s0 = _load_wb(w_rows, s_rows, b, offs_w, False, NB)
            w1, s1 = _load_wb(w_rows, s_rows, b + 1, offs_w, False, NB)
            w2, s2 = _load_wb(w_rows, s_rows, b + 2, offs_w, False, NB)
            w3, s3 = _load_wb(w_rows, s_rows, b + 3, offs_w, False, NB)
            x0 = _load_xb(x_row, bx, offs_c, offs_v, False, NB)
            x1 = _load_xb(x_row, bx + 1, offs_c, offs_v, False, NB)
            x2 = _load_xb(x_row, bx + 2, offs_c, offs_v, False, NB)
            x3 = _load_xb(x_row, bx + 3, offs_c, offs_v, False, NB)
            acc = _mma_chunk(acc, w0, s0, x0, A_L, B_L)
            acc = _mma_chunk(acc, w1, s1, x1, A_L, B_L)
            acc = _mma_chunk(acc, w2, s2, x2, A_L, B_L)
            acc = _mma_chunk(acc, w3, s3, x3, A_L, B_L)
        if NB > groups * 16:  # the last, partial group
            for j in gl.static_range(4):
                w, sc = _load_wb(w_rows, s_rows, groups * 16 + offs_q * 4 + j, offs_w, True, NB)
                xw = _load_xb(x_row, groups * 16 + offs_qx * 4 + j, offs_c, offs_v, True, NB)
                acc = _mma_chunk(acc, w, sc, xw, A_L, B_L)
        return acc

    @gluon.jit
    def _mma_chunk(acc, words, scales, xw, A_L: gl.constexpr, B_L: gl.constexpr):
        return mma_v2(_a_operand(words, scales, A_L), _b_operand(xw, B_L), acc)

    @gluon.jit
    def _k_loop(w_rows, s_rows, x_row, NB, acc, LW: gl.constexpr, LX: gl.constexpr, A_L: gl.constexpr,
                B_L: gl.constexpr, PREFETCH: gl.constexpr, UNROLL: gl.constexpr):
        # acc [BM, 8] += W [BM, K] @ X^T [K, 8] over the chunks of 4 blocks (every column of X is the pair's token).
        # More bytes in flight per warp: UNROLL 2 loads two chunks before multiplying either; PREFETCH 1 (with
        # UNROLL 1) loads the next chunk before multiplying the current one.
        offs_q = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, LW)))
        offs_w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW)))
        offs_qx = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, LX)))
        offs_v = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, LX)))
        offs_c = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, LX)))
        full = NB // 4
        done = 0
        if UNROLL == 2:
            for c2 in range(0, full // 2):
                wa, sa = _load_w(w_rows, s_rows, 2 * c2, offs_q, offs_w, 4)
                xa = _load_x(x_row, 2 * c2, offs_c, offs_qx, offs_v, 4)
                wb, sb = _load_w(w_rows, s_rows, 2 * c2 + 1, offs_q, offs_w, 4)
                xb = _load_x(x_row, 2 * c2 + 1, offs_c, offs_qx, offs_v, 4)
                acc = _mma_chunk(acc, wa, sa, xa, A_L, B_L)
                acc = _mma_chunk(acc, wb, sb, xb, A_L, B_L)
            done = full - full % 2
        elif PREFETCH:
            if full > 0:
                words, scales = _load_w(w_rows, s_rows, 0, offs_q, offs_w, 4)
                xw = _load_x(x_row, 0, offs_c, offs_qx, offs_v, 4)
                for c in range(1, full):
                    nwords, nscales = _load_w(w_rows, s_rows, c, offs_q, offs_w, 4)
                    nxw = _load_x(x_row, c, offs_c, offs_qx, offs_v, 4)
                    acc = _mma_chunk(acc, words, scales, xw, A_L, B_L)
                    words, scales, xw = nwords, nscales, nxw
                acc = _mma_chunk(acc, words, scales, xw, A_L, B_L)
            done = full
        for c in range(done, full):
            words, scales = _load_w(w_rows, s_rows, c, offs_q, offs_w, 4)
            xw = _load_x(x_row, c, offs_c, offs_qx, offs_v, 4)
            acc = _mma_chunk(acc, words, scales, xw, A_L, B_L)
        nq = NB - 4 * full
        if nq > 0:  # the last, partial chunk
            words, scales = _load_w(w_rows, s_rows, full, offs_q, offs_w, nq)
            xw = _load_x(x_row, full, offs_c, offs_qx, offs_v, nq)
            acc = _mma_chunk(acc, words, scales, xw, A_L, B_L)
        return acc

    @gluon.jit
    def _k_loop_async(w_rows, s_rows, x_row, NB, acc, LW: gl.constexpr, LX: gl.constexpr,
                      A_L: gl.constexpr, B_L: gl.constexpr, STAGES: gl.constexpr):
        # _k_loop with the weights streamed through a ring of STAGES chunks in shared memory by cp.async: STAGES - 1
        # chunks in flight while one is decoded, at no register cost (each lane reads back only what it copied). The
        # scale bytes and activations (1/16 of the bytes, and L2-resident) are loaded one chunk ahead.
        BM: gl.constexpr = acc.shape[0]
        NC = (NB + 3) // 4  # chunks
        ring = gl.allocate_shared_memory(gl.int32, [STAGES, 4, BM, 4], gl.SwizzledSharedLayout(1, 1, 1, [2, 0, 1]))
        offs_q = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, LW)))
        offs_w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW)))
        offs_qx = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, LX)))
        offs_v = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, LX)))
        offs_c = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, LX)))
        wp = w_rows + gl.expand_dims(gl.expand_dims(offs_q * 4, 1), 2) + gl.expand_dims(gl.expand_dims(offs_w, 0), 1)
        for st in gl.static_range(STAGES - 1):
            async_copy.async_copy_global_to_shared(ring.index(st), wp + 16 * st,
                                                   mask=gl.expand_dims(gl.expand_dims(st * 4 + offs_q < NB, 1), 2))
            async_copy.commit_group()
        sq = gl.expand_dims(offs_q, 1)
        scales = gl.load(s_rows + sq, mask=sq < NB, other=127)
        xq = (gl.expand_dims(gl.expand_dims(offs_c * 0, 1), 2) + gl.expand_dims(gl.expand_dims(offs_qx * 16, 0), 2)
              + gl.expand_dims(gl.expand_dims(offs_v, 0), 1))  # chunk 0's activation pairs, as in _load_x
        xm = gl.expand_dims(gl.expand_dims(offs_qx, 0), 2)
        xw = gl.load(x_row + xq, mask=xm < NB, other=0)
        for c in range(NC):
            nxt = c + STAGES - 1
            async_copy.async_copy_global_to_shared(ring.index(nxt % STAGES), wp + 16 * nxt,
                                                   mask=gl.expand_dims(gl.expand_dims(nxt * 4 + offs_q < NB, 1), 2))
            async_copy.commit_group()
            nsq = sq + 4 * (c + 1)
            nscales = gl.load(s_rows + nsq, mask=nsq < NB, other=127)
            nxw = gl.load(x_row + xq + 64 * (c + 1), mask=xm < NB - 4 * (c + 1), other=0)
            async_copy.wait_group(STAGES - 1)
            words = ring.index(c % STAGES).load(LW)
            acc = _mma_chunk(acc, words.to(gl.uint32, bitcast=True), scales, xw, A_L, B_L)
            scales, xw = nscales, nxw
        async_copy.wait_group(0)
        return acc

    @gluon.jit
    def _column0(acc, L1: gl.constexpr):
        # Column 0 of the accumulator (every column is the same token) as a [BM] tensor in the plain layout L1.
        col = gl.arange(0, 8, layout=gl.SliceLayout(0, acc.type.layout))
        return gl.convert_layout(gl.sum(gl.where(gl.expand_dims(col, 0) == 0, acc, 0.0), axis=1), L1)

    # One program: pair p = (token p // k, slot p % k) and 8 * NT * NW SwiGLU outputs: every 16-row MMA tile holds
    # the gate rows of 8 outputs (rows 0-7) and their linear rows (rows 8-15), so a lane's accumulators c0 and c2
    # are one output's gate and linear value. Writes h[p, outputs] = SwiGLU(x_t W1_e^T + b1_e) in h's dtype.
    @gluon.jit
    def _mlp1_mma_kernel(x_ptr, stride_x_t, idx_ptr,
                         w_ptr, stride_w_e, stride_w_h, stride_w_n,
                         s_ptr, stride_s_e, stride_s_h, stride_s_n,
                         b_ptr, stride_b_e, stride_b_h,
                         h_ptr, stride_h_p,
                         NB, I, TOP_K, alpha, limit,
                         NT: gl.constexpr, NW: gl.constexpr, PREFETCH: gl.constexpr, UNROLL: gl.constexpr,
                         STAGES: gl.constexpr, GDC: gl.constexpr):
        BM: gl.constexpr = 16 * NT * NW
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
        A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        B_L: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
        LW: gl.constexpr = _weight_layout(NT, NW)
        # activations [column, q, pair]: lane = q + 4 * column, a block's 16 element pairs each, every warp a copy
        LX: gl.constexpr = gl.BlockedLayout([1, 1, 16], [8, 4, 1], [1, 1, NW], [2, 1, 0])
        L1: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
        _wait_for_predecessor(GDC)
        p = gl.program_id(0)
        pid_n = gl.program_id(1)
        e = gl.load(idx_ptr + p).to(gl.int64)
        r = gl.arange(0, BM, layout=gl.SliceLayout(0, gl.SliceLayout(2, LW)))
        o = pid_n * (BM // 2) + (r // 16) * 8 + r % 8
        o = gl.where(o < I, o, 0)  # rows past the end read row 0; their outputs are not stored
        rows = e * stride_w_e + ((r // 8) % 2) * stride_w_h + o * stride_w_n
        w_rows = w_ptr + gl.expand_dims(gl.expand_dims(rows * 4, 0), 2)
        s_rows = s_ptr + gl.expand_dims(e * stride_s_e + ((r // 8) % 2) * stride_s_h + o * stride_s_n, 0)
        x_row = x_ptr + (p // TOP_K) * stride_x_t * 16
        acc = gl.zeros([BM, 8], gl.float32, MMA)
        if UNROLL == 4:
            acc = _k_loop_span(w_rows, s_rows, x_row, NB, acc, LW, LX, A_L, B_L)
        elif STAGES:
            acc = _k_loop_async(w_rows, s_rows, x_row, NB, acc, LW, LX, A_L, B_L, STAGES)
        else:
            acc = _k_loop(w_rows, s_rows, x_row, NB, acc, LW, LX, A_L, B_L, PREFETCH, UNROLL)
        L2: gl.constexpr = gl.BlockedLayout([1, 1, 1], [1, 1, 32], [1, 1, NW], [2, 1, 0])
        v = gl.convert_layout(gl.reshape(_column0(acc, L1), [BM // 16, 2, 8]), L2)  # [tile, gate/linear, output]
        gate, lin = gl.split(gl.permute(v, [0, 2, 1]))
        gate = gl.convert_layout(gl.reshape(gate, [BM // 2]), L1)
        lin = gl.convert_layout(gl.reshape(lin, [BM // 2]), L1)
        offs_o = pid_n * (BM // 2) + gl.arange(0, BM // 2, layout=L1)
        mo = offs_o < I
        gate = gate + gl.load(b_ptr + e * stride_b_e + offs_o, mask=mo, other=0.0)
        lin = lin + gl.load(b_ptr + e * stride_b_e + stride_b_h + offs_o, mask=mo, other=0.0)
        # SwiGLU as moe._swiglu: clamp, gate * sigmoid(alpha * gate) * (lin + 1)
        gate = gl.minimum(gate, limit)
        lin = gl.minimum(gl.maximum(lin, -limit), limit)
        h = gate / (1.0 + gl.exp(-alpha * gate)) * (lin + 1.0)
        gl.store(h_ptr + p * stride_h_p * 32 + offs_o, h.to(h_ptr.dtype.element_ty), mask=mo)

    # One program: pair p and 16 * NT * NW outputs; writes y[p, outputs] = w_p * (h_p W2_e^T + b2_e), fp32.
    @gluon.jit
    def _mlp2_mma_kernel(h_ptr, stride_h_p, idx_ptr, ew_ptr,
                         w_ptr, stride_w_e, stride_w_n,
                         s_ptr, stride_s_e, stride_s_n,
                         b_ptr, stride_b_e,
                         y_ptr, stride_y_p,
                         NB, D,
                         NT: gl.constexpr, NW: gl.constexpr, PREFETCH: gl.constexpr, UNROLL: gl.constexpr,
                         STAGES: gl.constexpr, GDC: gl.constexpr):
        BM: gl.constexpr = 16 * NT * NW
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
        A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        B_L: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
        LW: gl.constexpr = _weight_layout(NT, NW)
        LX: gl.constexpr = gl.BlockedLayout([1, 1, 16], [8, 4, 1], [1, 1, NW], [2, 1, 0])
        L1: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
        _wait_for_predecessor(GDC)
        p = gl.program_id(0)
        pid_n = gl.program_id(1)
        e = gl.load(idx_ptr + p).to(gl.int64)
        n = pid_n * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, gl.SliceLayout(2, LW)))
        n = gl.where(n < D, n, 0)
        w_rows = w_ptr + gl.expand_dims(gl.expand_dims((e * stride_w_e + n * stride_w_n) * 4, 0), 2)
        s_rows = s_ptr + gl.expand_dims(e * stride_s_e + n * stride_s_n, 0)
        acc = gl.zeros([BM, 8], gl.float32, MMA)
        if UNROLL == 4:
            acc = _k_loop_span(w_rows, s_rows, h_ptr + p * stride_h_p * 16, NB, acc, LW, LX, A_L, B_L)
        elif STAGES:
            acc = _k_loop_async(w_rows, s_rows, h_ptr + p * stride_h_p * 16, NB, acc, LW, LX, A_L, B_L, STAGES)
        else:
            acc = _k_loop(w_rows, s_rows, h_ptr + p * stride_h_p * 16, NB, acc, LW, LX, A_L, B_L, PREFETCH, UNROLL)
        offs = pid_n * BM + gl.arange(0, BM, layout=L1)
        mo = offs < D
        weight = gl.load(ew_ptr + p + offs * 0).to(gl.float32)
        y = (_column0(acc, L1) + gl.load(b_ptr + e * stride_b_e + offs, mask=mo, other=0.0)) * weight
        gl.store(y_ptr + p * stride_y_p * 32 + offs, y, mask=mo)


def _word_strides(t: torch.Tensor, n: int) -> list[int]:
    return [s // 4 for s in t.stride()[:n]]  # in 32-value blocks (4 words): rows start 16-byte aligned


def launch_mlp1_mma(x, idx, w, h, cfg, alpha, limit):
    """h (P, I) = SwiGLU(mlp1) per (token, slot) pair; x (T, D) bf16, idx (T, k) int64, w: moe.MoEWeights."""
    P, (T, D), I = idx.numel(), x.shape, w.intermediate
    nt, nw = cfg["NT"], cfg["NW"]
    _mlp1_mma_kernel[(P, triton.cdiv(I, 8 * nt * nw))](
        x.view(torch.int32), D // 32, idx, w.w1, *_word_strides(w.w1, 3), w.s1, *w.s1.stride()[:3], w.b1, *w.b1.stride()[:2],
        h, I // 32, D // 32, I, idx.shape[1], alpha, limit,
        NT=nt, NW=nw, PREFETCH=int(cfg.get("PREFETCH", 1)), UNROLL=int(cfg.get("UNROLL", 1)),
        STAGES=int(cfg.get("STAGES", 0)), num_warps=nw,
        **launch_options(x))


def launch_mlp2_mma(h, idx, ew, w, y, cfg):
    """y (P, D) fp32 = the pairs' weighted mlp2 rows (for moe.launch_sum_slots)."""
    P, D, I = idx.numel(), w.hidden, w.intermediate
    nt, nw = cfg["NT"], cfg["NW"]
    _mlp2_mma_kernel[(P, triton.cdiv(D, 16 * nt * nw))](
        h.view(torch.int32), I // 32, idx, ew, w.w2, *_word_strides(w.w2, 2), w.s2, *w.s2.stride()[:2], w.b2, w.b2.stride(0),
        y, D // 32, I // 32, D,
        NT=nt, NW=nw, PREFETCH=int(cfg.get("PREFETCH", 1)), UNROLL=int(cfg.get("UNROLL", 1)),
        STAGES=int(cfg.get("STAGES", 0)), num_warps=nw,
        **launch_options(h))
