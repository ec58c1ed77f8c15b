"""Tensor-core decode kernels for the MXFP4 MoE at a few tokens (the ``gemv`` path's fast variant, CUDA sm80+).

The gemv kernels of moe.py multiply on CUDA cores: per weight value a conversion to fp32 and an FFMA on top of
the 4-bit decode, ~4-5 instructions a value, which left them instruction- and latency-bound at 1.5-1.7 TB/s on
the H200 (NOTES-moe.md). Here the decoded weights go straight into ``mma.sync.m16n8k16`` (bf16 operands, fp32
accumulators): the 16 x 8 x 16 product takes 128 weight values a warp per instruction, so what is left per value
is the decode itself (shifts, masks and one bf16x2 multiply by the block scale, as ``moe._slot_bf16``).

On the H200 they are correct but not faster where it counts: on the words as every other kernel reads them, slower
than the portable kernels in every tile tried (mlp1 23.0 us vs 21.4, mlp2 19.8 vs 14.6 at one token); on a tiled
copy of the words (``TILED``, measurement only) with mlp2's K split over programs (``SPLIT``) the op is 4% faster
alone, yet the decode step with them is 25% slower (NOTES-moe.md, sessions 5-6). ``moe.CONFIGS`` does not select
them; ``CONFIG`` below and tests/benchmarks/gpu/moe_mma.py keep them measurable.

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
    def _woff(blk, TILED: gl.constexpr):
        # Word offset of block blk within a row: rows of words, or (TILED) tiles of 4 blocks x 16 rows (tile_words).
        if TILED:
            return (blk >> 2) * 256 + (blk & 3) * 4
        else:
            return blk * 4

    @gluon.jit
    def _load_w(w_rows, s_rows, c, offs_q, offs_w, nq, TILED: gl.constexpr):
        # Chunk c's words [4, BM, 4] and scale bytes [4, BM]; with nq < 4 (the last chunk) blocks q >= nq are zeros.
        blk = c * 4 + offs_q
        wq = gl.expand_dims(gl.expand_dims(_woff(blk, TILED), 1), 2) + gl.expand_dims(gl.expand_dims(offs_w, 0), 1)
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
    def _load_wb(w_rows, s_rows, blk, offs_w, MASKED: gl.constexpr, NB, TILED: gl.constexpr):
        # As _load_w for lane q's block blk[q] (any blocks; zeros past NB if MASKED).
        wq = gl.expand_dims(gl.expand_dims(_woff(blk, TILED), 1), 2) + gl.expand_dims(gl.expand_dims(offs_w, 0), 1)
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
                     B_L: gl.constexpr, TILED: gl.constexpr):
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
            w0, s0 = _load_wb(w_rows, s_rows, b, offs_w, False, NB, TILED)
            w1, s1 = _load_wb(w_rows, s_rows, b + 1, offs_w, False, NB, TILED)
            w2, s2 = _load_wb(w_rows, s_rows, b + 2, offs_w, False, NB, TILED)
            w3, s3 = _load_wb(w_rows, s_rows, b + 3, offs_w, False, NB, TILED)
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
                w, sc = _load_wb(w_rows, s_rows, groups * 16 + offs_q * 4 + j, offs_w, True, NB, TILED)
                xw = _load_xb(x_row, groups * 16 + offs_qx * 4 + j, offs_c, offs_v, True, NB)
                acc = _mma_chunk(acc, w, sc, xw, A_L, B_L)
        return acc

    @gluon.jit
    def _mma_chunk(acc, words, scales, xw, A_L: gl.constexpr, B_L: gl.constexpr):
        return mma_v2(_a_operand(words, scales, A_L), _b_operand(xw, B_L), acc)

    @gluon.jit
    def _k_loop(w_rows, s_rows, x_row, NB, acc, LW: gl.constexpr, LX: gl.constexpr, A_L: gl.constexpr,
                B_L: gl.constexpr, PREFETCH: gl.constexpr, UNROLL: gl.constexpr, TILED: gl.constexpr):
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
                wa, sa = _load_w(w_rows, s_rows, 2 * c2, offs_q, offs_w, 4, TILED)
                xa = _load_x(x_row, 2 * c2, offs_c, offs_qx, offs_v, 4)
                wb, sb = _load_w(w_rows, s_rows, 2 * c2 + 1, offs_q, offs_w, 4, TILED)
                xb = _load_x(x_row, 2 * c2 + 1, offs_c, offs_qx, offs_v, 4)
                acc = _mma_chunk(acc, wa, sa, xa, A_L, B_L)
                acc = _mma_chunk(acc, wb, sb, xb, A_L, B_L)
            done = full - full % 2
        elif PREFETCH:
            if full > 0:
                words, scales = _load_w(w_rows, s_rows, 0, offs_q, offs_w, 4, TILED)
                xw = _load_x(x_row, 0, offs_c, offs_qx, offs_v, 4)
                for c in range(1, full):
                    nwords, nscales = _load_w(w_rows, s_rows, c, offs_q, offs_w, 4, TILED)
                    nxw = _load_x(x_row, c, offs_c, offs_qx, offs_v, 4)
                    acc = _mma_chunk(acc, words, scales, xw, A_L, B_L)
                    words, scales, xw = nwords, nscales, nxw
                acc = _mma_chunk(acc, words, scales, xw, A_L, B_L)
            done = full
        for c in range(done, full):
            words, scales = _load_w(w_rows, s_rows, c, offs_q, offs_w, 4, TILED)
            xw = _load_x(x_row, c, offs_c, offs_qx, offs_v, 4)
            acc = _mma_chunk(acc, words, scales, xw, A_L, B_L)
        nq = NB - 4 * full
        if nq > 0:  # the last, partial chunk
            words, scales = _load_w(w_rows, s_rows, full, offs_q, offs_w, nq, TILED)
            xw = _load_x(x_row, full, offs_c, offs_qx, offs_v, nq)
            acc = _mma_chunk(acc, words, scales, xw, A_L, B_L)
        return acc

    @gluon.jit
    def _k_loop_async(w_rows, s_rows, x_row, NB, c_lo, c_hi, acc, LW: gl.constexpr, LX: gl.constexpr,
                      A_L: gl.constexpr, B_L: gl.constexpr, STAGES: gl.constexpr, TILED: gl.constexpr,
                      ABLATE: gl.constexpr = 0):
        # _k_loop over chunks c_lo .. c_hi - 1 (a split of K, or all of it) with the weights streamed through a ring
        # of STAGES chunks in shared memory by cp.async: STAGES - 1 chunks in flight while one is decoded, at no
        # register cost (each lane reads back only what it copied). The scale bytes and activations (1/16 of the
        # bytes, and L2-resident) are loaded one chunk ahead.
        # ABLATE (timing probes of tests/benchmarks/gpu/moe_mma.py, wrong results): bit 1 loads the first chunk's
        # scale bytes only, bit 2 its activations only, 8 only streams the words (XOR-folded, no decode, no MMA).
        BM: gl.constexpr = acc.shape[0]
        nb = gl.minimum(NB, 4 * c_hi)  # blocks at or past nb are zeros (the split's end, or K's)
        CW: gl.constexpr = 256 if TILED else 16  # words from one chunk of a row to the next
        ring = gl.allocate_shared_memory(gl.int32, [STAGES, 4, BM, 4], gl.SwizzledSharedLayout(1, 1, 1, [2, 0, 1]))
        offs_q = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, LW)))
        offs_w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW)))
        offs_qx = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, LX)))
        offs_v = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, LX)))
        offs_c = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, LX)))
        wp = w_rows + gl.expand_dims(gl.expand_dims(offs_q * 4, 1), 2) + gl.expand_dims(gl.expand_dims(offs_w, 0), 1)
        for st in gl.static_range(STAGES - 1):
            async_copy.async_copy_global_to_shared(
                ring.index(st), wp + CW * (c_lo + st),
                mask=gl.expand_dims(gl.expand_dims((c_lo + st) * 4 + offs_q < nb, 1), 2))
            async_copy.commit_group()
        sq = gl.expand_dims(offs_q, 1)
        scales = gl.load(s_rows + sq + 4 * c_lo, mask=sq + 4 * c_lo < nb, other=127)
        xq = (gl.expand_dims(gl.expand_dims(offs_c * 0, 1), 2) + gl.expand_dims(gl.expand_dims(offs_qx * 16, 0), 2)
              + gl.expand_dims(gl.expand_dims(offs_v, 0), 1))  # a chunk's activation pairs, as in _load_x
        xm = gl.expand_dims(gl.expand_dims(offs_qx, 0), 2)
        xw = gl.load(x_row + xq + 64 * c_lo, mask=xm + 4 * c_lo < nb, other=0)
        probe = gl.zeros([4, BM, 4], gl.int32, LW)
        for i in range(c_hi - c_lo):
            c = c_lo + i
            nxt = c + STAGES - 1
            async_copy.async_copy_global_to_shared(ring.index((i + STAGES - 1) % STAGES), wp + CW * nxt,
                                                   mask=gl.expand_dims(gl.expand_dims(nxt * 4 + offs_q < nb, 1), 2))
            async_copy.commit_group()
            nscales, nxw = scales, xw
            if (ABLATE & 9) == 0:
                nsq = sq + 4 * (c + 1)
                nscales = gl.load(s_rows + nsq, mask=nsq < nb, other=127)
            if (ABLATE & 10) == 0:
                nxw = gl.load(x_row + xq + 64 * (c + 1), mask=xm + 4 * (c + 1) < nb, other=0)
            async_copy.wait_group(STAGES - 1)
            words = ring.index(i % STAGES).load(LW)
            if ABLATE & 8:
                probe = probe ^ words
            else:
                acc = _mma_chunk(acc, words.to(gl.uint32, bitcast=True), scales, xw, A_L, B_L)
            scales, xw = nscales, nxw
        async_copy.wait_group(0)
        if ABLATE & 8:
            folded = gl.sum(gl.sum(probe, 2), 0).to(gl.float32)
            acc = acc + gl.expand_dims(gl.convert_layout(folded, gl.SliceLayout(1, acc.type.layout)), 1)
        return acc

    @gluon.jit
    def _split_chunks(NB, SPLIT: gl.constexpr):
        # This program's chunks of 4 blocks, c_lo .. c_hi - 1: split program_id(2) of SPLIT equal ranges (the last
        # ones may be short or empty).
        nc = (NB + 3) // 4
        per = (nc + SPLIT - 1) // SPLIT
        c_lo = gl.program_id(2) * per
        return c_lo, gl.minimum(nc, c_lo + per)

    @gluon.jit
    def _split_sum(v, part_ptr, cnt_ptr, group, pid_s, SPLIT: gl.constexpr, L1: gl.constexpr):
        # K split in SPLIT programs: each stores its row sums v [BM] as partial pid_s of its group (one output tile of
        # one pair); the last of the group to arrive (sync.last_to_arrive) sums the SPLIT partials in split order,
        # so the result does not depend on which program came last, and puts the counter back to 0 for the next
        # launch. Returns (the sums, True) in that program, (v, False) in the others.
        BM: gl.constexpr = v.shape[0]
        offs = gl.arange(0, BM, layout=L1)
        base = part_ptr + group * (SPLIT * BM) + offs
        gl.store(base + pid_s * BM, v)
        gl.thread_barrier()
        arrived = gl.atomic_add(cnt_ptr + group, 1, sem="acq_rel")
        last = arrived == SPLIT - 1
        if last:
            v = gl.load(base, cache_modifier=".cg")
            for s in gl.static_range(1, SPLIT):
                v += gl.load(base + s * BM, cache_modifier=".cg")
            gl.store(cnt_ptr + group, 0)
        return v, last

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
                         h_ptr, stride_h_p, part_ptr, cnt_ptr,
                         NB, I, TOP_K, alpha, limit,
                         NT: gl.constexpr, NW: gl.constexpr, PREFETCH: gl.constexpr, UNROLL: gl.constexpr,
                         STAGES: gl.constexpr, TILED: gl.constexpr, SPLIT: gl.constexpr, GDC: gl.constexpr,
                         ABLATE: gl.constexpr = 0):
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
        if TILED:  # tiles of 8 outputs' gate rows then their linear rows (tile_words); strides in blocks
            rows = e * stride_w_e + (o // 8) * stride_w_n + (((r // 8) % 2) * 8 + o % 8) * 4
        else:
            rows = e * stride_w_e + ((r // 8) % 2) * stride_w_h + o * stride_w_n
        w_rows = w_ptr + gl.expand_dims(gl.expand_dims(rows * 4, 0), 2)
        s_rows = s_ptr + gl.expand_dims(e * stride_s_e + ((r // 8) % 2) * stride_s_h + o * stride_s_n, 0)
        x_row = x_ptr + (p // TOP_K) * stride_x_t * 16
        acc = gl.zeros([BM, 8], gl.float32, MMA)
        if UNROLL == 4:
            acc = _k_loop_span(w_rows, s_rows, x_row, NB, acc, LW, LX, A_L, B_L, TILED)
        elif STAGES:
            c_lo, c_hi = _split_chunks(NB, SPLIT)
            acc = _k_loop_async(w_rows, s_rows, x_row, NB, c_lo, c_hi, acc, LW, LX, A_L, B_L, STAGES, TILED, ABLATE)
        else:
            acc = _k_loop(w_rows, s_rows, x_row, NB, acc, LW, LX, A_L, B_L, PREFETCH, UNROLL, TILED)
        offs_o = pid_n * (BM // 2) + gl.arange(0, BM // 2, layout=L1)
        mo = offs_o < I
        v = _column0(acc, L1)
        if SPLIT > 1:  # only the last program of the split writes
            v, last = _split_sum(v, part_ptr, cnt_ptr, p * gl.num_programs(1) + pid_n, gl.program_id(2), SPLIT, L1)
            mo = mo & last
        L2: gl.constexpr = gl.BlockedLayout([1, 1, 1], [1, 1, 32], [1, 1, NW], [2, 1, 0])
        v = gl.convert_layout(gl.reshape(v, [BM // 16, 2, 8]), L2)  # [tile, gate/linear, output]
        gate, lin = gl.split(gl.permute(v, [0, 2, 1]))
        gate = gl.convert_layout(gl.reshape(gate, [BM // 2]), L1)
        lin = gl.convert_layout(gl.reshape(lin, [BM // 2]), L1)
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
                         y_ptr, stride_y_p, part_ptr, cnt_ptr,
                         NB, D,
                         NT: gl.constexpr, NW: gl.constexpr, PREFETCH: gl.constexpr, UNROLL: gl.constexpr,
                         STAGES: gl.constexpr, TILED: gl.constexpr, SPLIT: gl.constexpr, GDC: gl.constexpr,
                         ABLATE: gl.constexpr = 0):
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
        if TILED:
            rows = e * stride_w_e + (n // 16) * stride_w_n + (n % 16) * 4
        else:
            rows = e * stride_w_e + n * stride_w_n
        w_rows = w_ptr + gl.expand_dims(gl.expand_dims(rows * 4, 0), 2)
        s_rows = s_ptr + gl.expand_dims(e * stride_s_e + n * stride_s_n, 0)
        x_row = h_ptr + p * stride_h_p * 16
        acc = gl.zeros([BM, 8], gl.float32, MMA)
        if UNROLL == 4:
            acc = _k_loop_span(w_rows, s_rows, x_row, NB, acc, LW, LX, A_L, B_L, TILED)
        elif STAGES:
            c_lo, c_hi = _split_chunks(NB, SPLIT)
            acc = _k_loop_async(w_rows, s_rows, x_row, NB, c_lo, c_hi, acc, LW, LX, A_L, B_L, STAGES, TILED, ABLATE)
        else:
            acc = _k_loop(w_rows, s_rows, x_row, NB, acc, LW, LX, A_L, B_L, PREFETCH, UNROLL, TILED)
        offs = pid_n * BM + gl.arange(0, BM, layout=L1)
        mo = offs < D
        v = _column0(acc, L1)
        if SPLIT > 1:  # only the last program of the split writes
            v, last = _split_sum(v, part_ptr, cnt_ptr, p * gl.num_programs(1) + pid_n, gl.program_id(2), SPLIT, L1)
            mo = mo & last
        weight = gl.load(ew_ptr + p + offs * 0).to(gl.float32)
        y = (v + gl.load(b_ptr + e * stride_b_e + offs, mask=mo, other=0.0)) * weight
        gl.store(y_ptr + p * stride_y_p * 32 + offs, y, mask=mo)


def _word_strides(t: torch.Tensor, n: int) -> list[int]:
    return [s // 4 for s in t.stride()[:n]]  # in 32-value blocks (4 words): rows start 16-byte aligned


def tile_words(w) -> tuple[torch.Tensor, torch.Tensor]:
    """The layers' words re-laid out in tiles (``TILED`` configs): every chunk of 4 blocks of a 16-row MMA tile is 1 KB
    of contiguous memory (each warp load then covers whole DRAM bursts of one tile instead of 64 bytes of each of 8
    rows). mlp1 (E, I/8, chunks, 2, 8, 4, 4): 8 outputs' gate rows, then their linear rows; mlp2 (E, D/16, chunks,
    16, 4, 4). K is padded with zero blocks to whole chunks. A second copy of the experts: for measurement."""
    E, _, I, W1 = w.w1.shape
    D = w.w2.shape[1]
    nb1, nb2 = W1 // 4, w.w2.shape[2] // 4
    c1, c2 = triton.cdiv(nb1, 4), triton.cdiv(nb2, 4)
    w1 = torch.nn.functional.pad(w.w1.view(E, 2, I, nb1, 4), (0, 0, 0, 4 * c1 - nb1))
    w1 = w1.view(E, 2, I // 8, 8, c1, 4, 4).permute(0, 2, 4, 1, 3, 5, 6).contiguous()
    w2 = torch.nn.functional.pad(w.w2.view(E, D, nb2, 4), (0, 0, 0, 4 * c2 - nb2))
    w2 = w2.view(E, D // 16, 16, c2, 4, 4).permute(0, 1, 3, 2, 4, 5).contiguous()
    return w1, w2


def _tiled(w):
    if "mma_tiled" not in w.scratch:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():  # the copy would replay each step
            raise RuntimeError("moe_mma: TILED configs need one eager call before a CUDA graph captures them")
        w.scratch["mma_tiled"] = tile_words(w)
    return w.scratch["mma_tiled"]


def _split_args(cfg, w, idx, tiles, device) -> tuple[int, list]:
    """SPLIT and the (partials, counters) arguments of a launch: K split SPLIT ways (the cp.async loop only)."""
    split = int(cfg.get("SPLIT", 1))
    if split == 1:
        return 1, [w.b1, w.b1]  # placeholders: the kernels read neither without a split
    if split < 1 or not cfg.get("STAGES"):
        raise ValueError(f"moe gemv mma config {cfg}: SPLIT > 1 needs the cp.async loop (STAGES > 0)")
    from mxmoe.backends.triton_engine import moe  # (moe imports this module)
    P = idx.numel()
    part = moe._buffer((P * tiles * split * 16 * cfg["NT"] * cfg["NW"],), torch.float32, device)
    return split, [part, moe._counters(w, P * tiles, idx.shape[1], device)]


def _options(cfg) -> dict:
    return dict(NT=cfg["NT"], NW=cfg["NW"], PREFETCH=int(cfg.get("PREFETCH", 1)), UNROLL=int(cfg.get("UNROLL", 1)),
                STAGES=int(cfg.get("STAGES", 0)), TILED=bool(cfg.get("TILED", False)),
                ABLATE=int(cfg.get("ABLATE", 0)), num_warps=cfg["NW"])


def launch_mlp1_mma(x, idx, w, h, cfg, alpha, limit):
    """h (P, I) = SwiGLU(mlp1) per (token, slot) pair; x (T, D) bf16, idx (T, k) int64, w: moe.MoEWeights."""
    P, (T, D), I = idx.numel(), x.shape, w.intermediate
    opts = _options(cfg)
    if opts["TILED"]:
        w1t = _tiled(w)[0]
        w1_args = [w1t, w1t.stride(0) // 4, 0, w1t.stride(1) // 4]
    else:
        w1_args = [w.w1, *_word_strides(w.w1, 3)]
    tiles = triton.cdiv(I, 8 * cfg["NT"] * cfg["NW"])
    split, split_args = _split_args(cfg, w, idx, tiles, x.device)
    grid = (P, tiles, split)
    _mlp1_mma_kernel[grid](
        x.view(torch.int32), D // 32, idx, *w1_args, w.s1, *w.s1.stride()[:3], w.b1, *w.b1.stride()[:2],
        h, I // 32, *split_args, D // 32, I, idx.shape[1], alpha, limit, SPLIT=split, **opts, **launch_options(x, grid))


def launch_mlp2_mma(h, idx, ew, w, y, cfg):
    """y (P, D) fp32 = the pairs' weighted mlp2 rows (for moe.launch_sum_slots)."""
    P, D, I = idx.numel(), w.hidden, w.intermediate
    opts = _options(cfg)
    if opts["TILED"]:
        w2t = _tiled(w)[1]
        w2_args = [w2t, w2t.stride(0) // 4, w2t.stride(1) // 4]
    else:
        w2_args = [w.w2, *_word_strides(w.w2, 2)]
    tiles = triton.cdiv(D, 16 * cfg["NT"] * cfg["NW"])
    split, split_args = _split_args(cfg, w, idx, tiles, h.device)
    grid = (P, tiles, split)
    _mlp2_mma_kernel[grid](
        h.view(torch.int32), I // 32, idx, ew, *w2_args, w.s2, *w.s2.stride()[:2], w.b2, w.b2.stride(0),
        y, D // 32, *split_args, I // 32, D, SPLIT=split, **opts, **launch_options(h, grid))
