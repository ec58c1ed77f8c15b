"""MXFP4 mixture-of-experts kernels of the ``triton`` engine (W4A16: 4-bit experts, bf16/fp32 activations).

``moe_mxfp4`` computes, for every token t, ``sum_k w_tk * mlp2_e(SwiGLU(mlp1_e(x_t)))`` with e = the k-th
chosen expert; ``moe_mxfp4_ref`` is the same function in plain PyTorch on the same prepared weights, the
readable specification of the kernels. Three paths, chosen from T alone (so a CUDA graph can capture
every launch):

* ``gemv`` (up to 8 tokens): no routing at all. Both layers run one program per (token, slot) pair and tile
  of output rows, streaming that pair's expert rows with the next K step's loads in flight while the
  current one is decoded (CUDA-core FMAs, no tensor cores): mlp1 gathers its token row and writes SwiGLU(h),
  mlp2 writes the weighted row w * (W2 h + b2) of the pair; a tiny kernel sums each token's k rows in a
  fixed order (deterministic, no atomics). A second family (configs with ``STATIONARY``, "activation-stationary
  variant") gives every lane of a warp its own K block, loads that block's activations once per chunk and
  streams the weight rows past them; it can split K over programs and fuse the k-sum into mlp2 (deterministic
  too: atomic counters only elect the program that sums, in fixed order).
* ``dot`` (up to 64 tokens: tiles of 16 tokens of one expert) and ``prefill`` (tiles of 128): device routing (a stable counting sort of
  the pairs by expert and a static-size tile list, one program), then grouped matrix products on tensor
  cores with the dequantized weights as the wide operand and a tile of one expert's tokens as the narrow
  one; mlp2 writes weighted per-pair rows and a tiny kernel sums each token's k rows. With bf16 activations
  and scale bytes <= 128 (every real checkpoint) the weights are decoded straight into bf16 (``_slot_bf16``:
  shifts and one bf16x2 multiply, no conversion instruction); with SWAP (the ``dot`` default) the tokens are
  the products' A operand and the decoded weights the B operand ([K, BN] tiles loaded as [BB, 4, BN], so no
  transpose), which the H200 ran 1.28x faster at T = 64 (NOTES-moe.md, run 4).

The weight layout (made once by ``prepare_moe_weights``) is chosen for the decoder in registers: every
32-value MXFP4 block is four 32-bit words, each holding 8 E2M1 codes with their magnitude and sign bits
where a shift and a mask turn two of them into the bits of two fp16 numbers at once (``pack_words``).
fp16 bits ``s 000ee m000000000`` are exactly ``E2M1 * 2^-14`` (``ee = 0`` lands on fp16 subnormals, as
it should); the ``2^14`` and the E8M0 block scale are applied once per block and row in the GEMV, per
value before the tensor-core product otherwise. Every sum is fp32; SwiGLU(h) is stored in x's dtype.
(The GEMV's partial sums are in units of 2^-14, so activations below ~2^-110 in magnitude would lose bits
to fp32 subnormals; activations of a normed model are nowhere near.)

Shape legend: T tokens, k slots per token, P = T*k (token, slot) pairs, E experts, D hidden, I
intermediate (mlp1: N = 2I, K = D; mlp2: N = D, K = I), NB = K/32 scale blocks per row, W = K/8 words.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from mxmoe.backends.triton_engine import moe_mma, pdl
from mxmoe.backends.triton_engine.pdl import launch_options, wait_for_predecessor
from mxmoe.backends.triton_engine.sync import last_to_arrive
from mxmoe.core import mxfp4
from mxmoe.core.backend import NotSupported
from mxmoe.core.weights import ExpertLinear

# The interpreter's tl.dot on bf16 operands returns wrong values (FACTS.md): feed it fp32 there.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter (triton 3.9) also truncates fp32 -> bf16 instead of rounding to nearest even, and converts
# subnormals wrongly both ways (it renormalizes their significand, then clamps the exponent to 0: fp32 1e-39 -> bf16
# 4.2e-39, 2^-130 -> 0, and the bits 0x00007FFF -> bf16 0x007F = 1.17e-38). So there the kernels convert between
# bf16 and fp32 by bits (_cast, _to_f32): the same values as the GPU's cvt.rn, subnormals included.
_ROUND_BY_HAND = tl.constexpr(_INTERPRET)
# Inline PTX where it saves instructions (the interpreter cannot run it); MXMOE_TRITON_NO_ASM=1 turns it off.
_USE_ASM = tl.constexpr(not _INTERPRET and os.environ.get("MXMOE_TRITON_NO_ASM", "0") != "1")

# Inside each 16-bit lane of a word, slot k (0..3) keeps its code's 3 magnitude bits from _MAG_BIT[k] up and
# its sign bit at _SIGN_BIT[k]. Slot 3 is already where fp16 wants it (magnitude at bits 9-11, sign at 15), slot 2
# is one shift away; slots 1 and 0 need a second shift for the sign. 11 integer ops decode 8 values.
_MAG_BIT = (0, 3, 6, 9)
_SIGN_BIT = (14, 13, 12, 15)

# Test hook: fill intermediate buffers with NaN so that a read of anything no kernel wrote shows up.
_POISON_BUFFERS = False


# ---- layout ------------------------------------------------------------------------------------------------

def pack_words(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes in element order (..., K) uint8, K % 32 == 0 → the kernels' words (..., K/8) int32.

    In block b (elements 32b .. 32b+31), element pair j (elements 32b+2j, 32b+2j+1) goes to word 4b + j % 4,
    slot j // 4: the even element in the word's low 16-bit lane, the odd one in the high lane. So for a
    fixed slot, the 4 words of a block hold 4 consecutive pairs: 8 consecutive activations.
    """
    *lead, K = codes.shape
    if K % mxfp4.VALUES_PER_BLOCK:
        raise ValueError(f"pack_words: K = {K} is not a multiple of {mxfp4.VALUES_PER_BLOCK}")
    c = codes.reshape(*lead, K // 32, 4, 4, 2).to(torch.int64)  # (..., block, slot, word, lane)
    mag, sign = c & 7, c >> 3
    word = torch.zeros(*lead, K // 32, 4, dtype=torch.int64, device=codes.device)
    for slot in range(4):
        for lane in range(2):
            word |= mag[..., slot, :, lane] << (_MAG_BIT[slot] + 16 * lane)
            word |= sign[..., slot, :, lane] << (_SIGN_BIT[slot] + 16 * lane)
    word = torch.where(word >= 2 ** 31, word - 2 ** 32, word)  # uint32 bits as int32
    return word.to(torch.int32).reshape(*lead, K // 8)


def unpack_words(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_words`: (..., K/8) int32 → E2M1 codes (..., K) uint8 in element order."""
    *lead, W = words.shape
    w = words.to(torch.int64).reshape(*lead, W // 4, 4) & 0xFFFFFFFF  # (..., block, word)
    codes = torch.empty(*lead, W // 4, 4, 4, 2, dtype=torch.int64, device=words.device)
    for slot in range(4):
        for lane in range(2):
            mag = (w >> (_MAG_BIT[slot] + 16 * lane)) & 7
            sign = (w >> (_SIGN_BIT[slot] + 16 * lane)) & 1
            codes[..., slot, :, lane] = mag | (sign << 3)
    return codes.to(torch.uint8).reshape(*lead, W * 8)


@dataclass
class MoEWeights:
    """One layer's experts in the kernels' layout; still 4.25 bits per weight (words + scale bytes)."""

    w1: torch.Tensor  # (E, 2, I, D/8) int32 words: [:, 0] the gate rows (canonical rows 0::2), [:, 1] linear rows
    s1: torch.Tensor  # (E, 2, I, D/32) uint8 E8M0
    b1: torch.Tensor  # (E, 2, I) float32
    w2: torch.Tensor  # (E, D, I/8) int32 words
    s2: torch.Tensor  # (E, D, I/32) uint8 E8M0
    b2: torch.Tensor  # (E, D) float32
    dtype: torch.dtype  # activation dtype the engine prepared for
    big_scales: bool = False  # some scale byte > 240 (or NaN): the kernels then scale in two steps
    small_scales: bool = False  # every scale byte <= 128: the dot kernels can decode straight into bf16 (_slot_bf16)
    scratch: dict = field(default_factory=dict, repr=False, compare=False)  # counters of the K-split gemv kernels

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    @property
    def hidden(self) -> int:  # D
        return self.w2.shape[1]

    @property
    def intermediate(self) -> int:  # I
        return self.w1.shape[2]


def prepare_moe_weights(mlp1: ExpertLinear, mlp2: ExpertLinear, dtype: torch.dtype, device) -> MoEWeights:
    """Canonical MXFP4 experts → :class:`MoEWeights` on ``device`` (once, at load).

    mlp1: N = 2I rows, gate and linear interleaved (row 2i gate, 2i+1 linear), K = D; mlp2: N = D, K = I.
    Dense experts raise :class:`NotSupported`: these kernels read MXFP4 only.
    """
    if not (mlp1.is_mxfp4 and mlp2.is_mxfp4):
        raise NotSupported("triton", "dense (bf16) experts: the MoE kernels read MXFP4 weights only")
    if dtype not in (torch.bfloat16, torch.float32):
        raise NotSupported("triton", f"MoE activations in {dtype} (bfloat16 or float32)")
    E, N1, D = mlp1.num_experts, mlp1.out_features, mlp1.in_features
    if N1 % 2 or mlp2.num_experts != E or mlp2.out_features != D or mlp2.in_features != N1 // 2:
        raise NotSupported("triton", f"experts mlp1 ({E}, {N1}, {D}) / mlp2 ({mlp2.num_experts}, "
                                     f"{mlp2.out_features}, {mlp2.in_features}): expected (E, 2I, D) / (E, D, I)")
    I = N1 // 2
    w1 = torch.empty(E, 2, I, D // 8, dtype=torch.int32, device=device)
    w2 = torch.empty(E, D, I // 8, dtype=torch.int32, device=device)
    for e in range(E):  # one expert at a time: the int64 temporaries stay small at gpt-oss-120b's size
        codes1 = mxfp4.unpack(mlp1.blocks[e].to(device)).view(I, 2, D)  # row 2i+h -> [i, h]
        w1[e] = pack_words(codes1).transpose(0, 1)
        w2[e] = pack_words(mxfp4.unpack(mlp2.blocks[e].to(device)))
    s1 = mlp1.scales.to(device).view(torch.uint8).reshape(E, I, 2, D // 32).transpose(1, 2).contiguous()
    b1 = mlp1.bias.to(device=device, dtype=torch.float32).reshape(E, I, 2).transpose(1, 2).contiguous()
    s2 = mlp2.scales.to(device).view(torch.uint8).contiguous()
    b2 = mlp2.bias.to(device=device, dtype=torch.float32).contiguous()
    big = bool((s1 > 240).any() or (s2 > 240).any())  # once, at load: a host sync is fine here
    small = bool((s1 <= 128).all() and (s2 <= 128).all())
    return MoEWeights(w1, s1, b1, w2, s2, b2, dtype, big, small)


# ---- the plain-PyTorch specification -------------------------------------------------------------------------

def dequantize_words(words: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., K/8) int32 words + (..., K/32) E8M0 → (..., K) ``dtype``, exactly (through core.mxfp4)."""
    blocks = mxfp4.pack(unpack_words(words))
    return mxfp4.dequantize(blocks, scales, dtype)


def _swiglu_ref(gate: torch.Tensor, lin: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate = gate.clamp(max=limit)
    lin = lin.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (lin + 1)


def moe_mxfp4_ref(x, expert_weights, expert_indices, w: MoEWeights, swiglu_alpha, swiglu_limit) -> torch.Tensor:
    """The kernels' function in plain PyTorch: float32 arithmetic, SwiGLU(h) rounded to x's dtype (where the
    kernels store it), one expert at a time. (T, D) → (T, D) in x.dtype."""
    T, D = x.shape
    out = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in torch.unique(expert_indices).tolist():
        token, slot = torch.nonzero(expert_indices == e, as_tuple=True)
        gate_w = dequantize_words(w.w1[e, 0], w.s1[e, 0], torch.float32)  # (I, D)
        lin_w = dequantize_words(w.w1[e, 1], w.s1[e, 1], torch.float32)
        gate = xf[token] @ gate_w.T + w.b1[e, 0]
        lin = xf[token] @ lin_w.T + w.b1[e, 1]
        h = _swiglu_ref(gate, lin, swiglu_alpha, swiglu_limit).to(x.dtype).float()  # (n, I)
        y = h @ dequantize_words(w.w2[e], w.s2[e], torch.float32).T + w.b2[e]  # (n, D)
        out.index_add_(0, token, y * expert_weights[token, slot, None].float())
    return out.to(x.dtype)


def moe_routing_ref(expert_indices: torch.Tensor, num_experts: int, block_t: int):
    """Routing tables in plain PyTorch (with host syncs): see :func:`moe_routing`."""
    flat = expert_indices.reshape(-1)
    P = flat.numel()
    order = torch.sort(flat, stable=True).indices.to(torch.int32)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    max_tiles = P // block_t + min(num_experts, P)
    tiles = torch.zeros(3, max_tiles, dtype=torch.int32)
    i, start = 0, 0
    for e, c in enumerate(counts):
        for s in range(start, start + c, block_t):
            tiles[:, i] = torch.tensor([e, s, min(s + block_t, start + c)])
            i += 1
        start += c
    return order, tiles.to(expert_indices.device)


# ---- shared device helpers ------------------------------------------------------------------------------------

@triton.jit
def _e8m0_to_f32(s):
    # 2^(s - 127) as fp32: the byte is the fp32 exponent field, except 0 (2^-127 is subnormal) and 255 (NaN).
    s = s.to(tl.int32)
    bits = tl.where(s == 0, 0x00400000, s << 23)
    bits = tl.where(s == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _scale_values(v, s, BIG_SCALES: tl.constexpr):
    # v (a value, or a sum of values times activations, decoded by _slot_f32 with EXACT=BIG_SCALES) times the
    # block scale 2^(s-127). Normally v is in units of 2^-14 (the fp16 bits) and one multiply by 2^(s-113)
    # applies both factors: a normal fp32 for every byte s <= 240 (its exponent field is s + 14). Layers with a
    # larger byte (never seen in real checkpoints, but valid MXFP4, NaN included; known at load, BIG_SCALES)
    # decode E2M1 exactly first, one multiply more per value, then take 2^(s-127).
    if BIG_SCALES:
        return v * _e8m0_to_f32(s)
    else:
        return v * ((s.to(tl.int32) + 14) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _slot_f32(w, SLOT: tl.constexpr, EXACT: tl.constexpr):
    # w: uint32 words. Returns the two values of slot SLOT (even element, odd element) as fp32 = E2M1 * 2^-14,
    # or E2M1 itself if EXACT.
    if SLOT == 3:
        p = w & 0x8E008E00
    elif SLOT == 2:
        p = (w << 3) & 0x8E008E00
    elif SLOT == 1:
        p = ((w << 6) & 0x0E000E00) | ((w << 2) & 0x80008000)
    else:
        p = ((w << 9) & 0x0E000E00) | ((w << 1) & 0x80008000)
    if _USE_ASM:
        # One cvt per half straight from the 32-bit register; through tl ops the compiler first repacks
        # halves of different words (a PRMT per pair).
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }",
            "=r,=r,r", [p], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        lo = (p & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (p >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    if EXACT:
        lo = lo * 16384.0
        hi = hi * 16384.0
    return lo, hi  # (the 2^14 is folded into the block scale by _scale_values)


@triton.jit
def _slot_bf16(w, s, SLOT: tl.constexpr):
    # w [..., 4] uint32 words, s [..., 1] E8M0 bytes <= 128 (MoEWeights.small_scales). Returns the two values of slot
    # SLOT of each word (even element, odd element) as bf16, exactly E2M1 * 2^(s-127), with no conversion
    # instruction: the shifts put each code's sign at bf16's bit 15 and its 3 magnitude bits (exponent, mantissa)
    # at bits 8-6, the lowest exponent bits, so the 16 bits are E2M1 * 2^-126 (a subnormal for +-0.5, as E2M1's
    # own subnormal); one bf16x2 multiply by 2^(s-1) then scales both values exactly (a normal bf16 for s <= 128).
    # About 2 integer/bf16 instructions per value, against ~4 on the fp16 -> fp32 -> bf16 route of _slot_f32.
    if SLOT == 3:
        q = ((w >> 3) & 0x01C001C0) | (w & 0x80008000)
    elif SLOT == 2:
        q = (w & 0x01C001C0) | ((w << 3) & 0x80008000)
    elif SLOT == 1:
        q = ((w << 3) & 0x01C001C0) | ((w << 2) & 0x80008000)
    else:
        q = ((w << 6) & 0x01C001C0) | ((w << 1) & 0x80008000)
    e = s.to(tl.uint32) + 126  # the bf16/fp32 exponent field of 2^(s-1)
    if _USE_ASM:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; mul.rn.bf16x2 t, $2, $3; mov.b32 {$0, $1}, t; }",
            "=h,=h,r,r", [q, (e << 7) | (e << 23)], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
    else:
        # The same products in fp32 (exact: they have two significant bits), whose upper halves are their bf16
        # bits (no fp32 -> bf16 conversion, which the interpreter gets wrong for subnormals).
        m = (e << 23).to(tl.float32, bitcast=True)
        lo = ((q << 16).to(tl.float32, bitcast=True) * m).to(tl.uint32, bitcast=True) >> 16
        hi = ((q & 0xFFFF0000).to(tl.float32, bitcast=True) * m).to(tl.uint32, bitcast=True) >> 16
        lo = lo.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        hi = hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return lo, hi


@triton.jit
def _load_x_pairs(x_ptr, offs, mask, X_BF16: tl.constexpr, MASKED: tl.constexpr):
    # offs: element-pair indices (pair m = elements 2m, 2m+1). bf16 rows are read as int32 pairs (x_ptr is the
    # int32 view) and split by shifts: bf16 is the upper half of an fp32.
    if X_BF16:
        if MASKED:
            pair = tl.load(x_ptr + offs, mask=mask, other=0)
        else:
            pair = tl.load(x_ptr + offs)
        pair = pair.to(tl.uint32, bitcast=True)
        even = (pair << 16).to(tl.float32, bitcast=True)
        odd = (pair & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        if MASKED:
            even = tl.load(x_ptr + 2 * offs, mask=mask, other=0.0)
            odd = tl.load(x_ptr + 2 * offs + 1, mask=mask, other=0.0)
        else:
            even = tl.load(x_ptr + 2 * offs)
            odd = tl.load(x_ptr + 2 * offs + 1)
    return even, odd


@triton.jit
def _load_x_bf16(x_ptr, offs, mask):
    # Element pairs (x_ptr: the int32 view of bf16 rows) split into the even and the odd bf16 values, by bits.
    pair = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    even = (pair & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    odd = (pair >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return even, odd


@triton.jit
def _cast(v, dtype: tl.constexpr):
    # v.to(dtype), rounding to nearest even also in the interpreter (see _ROUND_BY_HAND). There the bf16 is made
    # from the rounded upper half of the fp32 bits and never goes through the interpreter's conversion: an exact
    # 0 + 0x7FFF is an fp32 subnormal, which that conversion turned into bf16 1.17e-38 (the known conformance
    # failure of issue 11: zeros of SwiGLU and of the output came back as 1.17e-38, and times 2^125 as ~1).
    if _ROUND_BY_HAND and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(v != v, 0x7FC0, bits)  # NaN stays NaN (the carry could turn it into inf)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


@triton.jit
def _to_f32(v):
    # v.to(tl.float32); bf16 by bits in the interpreter (see _ROUND_BY_HAND; exact, subnormals included).
    if _ROUND_BY_HAND and v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return v.to(tl.float32)


@triton.jit
def _swiglu(gate, lin, alpha, limit):
    # Clamps by where(), not minimum(): NaN must propagate as in torch.clamp.
    gate = tl.where(gate > limit, limit, gate)
    lin = tl.where(lin > limit, limit, tl.where(lin < -limit, -limit, lin))
    return gate / (1.0 + tl.exp(-alpha * gate)) * (lin + 1.0)


@triton.jit
def _gemv_block_partial(w, x_ptr, x_offs, X_BF16: tl.constexpr, EXACT: tl.constexpr):
    # w [BN, BB, 4] uint32 words of BB blocks (32 values, 4 words each); x_offs [BB, 4]: pair index of slot 0 of
    # each word. Returns sum over each block's 32 values of E2M1 * 2^-14 (or E2M1 if EXACT) * x: [BN, BB].
    part = tl.zeros(w.shape, tl.float32)
    for slot in tl.static_range(4):
        xe, xo = _load_x_pairs(x_ptr, x_offs + 4 * slot, None, X_BF16, False)
        lo, hi = _slot_f32(w, slot, EXACT)
        part = part + lo * xe[None, :, :]  # one add per product: each becomes an FFMA
        part = part + hi * xo[None, :, :]
    return tl.sum(part, axis=2)


# ---- gemv path: one program per (token, slot) pair and tile of rows ---------------------------------------------------

@triton.jit
def _gemv_load(w_ptr, w_offs, stride_w_h, s_ptr, s_offs, stride_s_h, b0, offs_b, NB, TWO: tl.constexpr):
    # The words [BN, BB, 4] and scale bytes [BN, BB] of blocks b0 .. b0+BB-1 (of the gate and the linear rows if
    # TWO). Block indices are clamped instead of masked: past the last block the loads read it again (a valid
    # address) and _gemv_compute drops those blocks, so no load needs a predicate.
    blk = tl.minimum(b0 + offs_b, NB - 1)
    w_ptrs = w_ptr + w_offs + blk[None, :, None] * 4
    s_ptrs = s_ptr + s_offs + blk[None, :]
    wa = tl.load(w_ptrs)
    sa = tl.load(s_ptrs)
    if TWO:
        wb = tl.load(w_ptrs + stride_w_h * 4)
        sb = tl.load(s_ptrs + stride_s_h)
    else:
        wb = wa
        sb = sa
    return wa, sa, wb, sb


@triton.jit
def _gemv_compute(acc_a, acc_b, wa, sa, wb, sb, x_ptr, x_row, b0, offs_b, offs_w, NB,
                  X_BF16: tl.constexpr, BIG_SCALES: tl.constexpr, TWO: tl.constexpr):
    # acc [BN, BB] += scale * sum over each block of E2M1 * x, for the blocks b0 .. b0+BB-1 that exist.
    blk = tl.minimum(b0 + offs_b, NB - 1)
    x_offs = x_row + blk[:, None] * 16 + offs_w[None, :]  # pair index of slot 0 of each word
    keep = (b0 + offs_b < NB)[None, :]
    pa = _gemv_block_partial(wa.to(tl.uint32, bitcast=True), x_ptr, x_offs, X_BF16, BIG_SCALES)
    acc_a += tl.where(keep, _scale_values(pa, sa, BIG_SCALES), 0.0)
    if TWO:
        pb = _gemv_block_partial(wb.to(tl.uint32, bitcast=True), x_ptr, x_offs, X_BF16, BIG_SCALES)
        acc_b += tl.where(keep, _scale_values(pb, sb, BIG_SCALES), 0.0)
    return acc_a, acc_b


@triton.jit
def _gemv_rows(w_ptr, w_offs, stride_w_h, s_ptr, s_offs, stride_s_h, x_ptr, x_row, NB,
               BLOCK_B: tl.constexpr, X_BF16: tl.constexpr, BIG_SCALES: tl.constexpr, TWO: tl.constexpr,
               PREFETCH: tl.constexpr):
    # The K loop of one tile of rows (two tiles if TWO): returns the per-block sums [BN, BB].
    # PREFETCH = 1 or 2: the loads of the next one or two steps are issued before this step's decode and FMAs (a
    # software pipeline by hand: the compiler does not pipeline loads that feed no tl.dot), so every program keeps
    # weights in flight while it computes. Steps past the end reload the last one (cheap, from L2).
    offs_b = tl.arange(0, BLOCK_B)
    offs_w = tl.arange(0, 4)
    last = (tl.cdiv(NB, BLOCK_B) - 1) * BLOCK_B
    wa, sa, wb, sb = _gemv_load(w_ptr, w_offs, stride_w_h, s_ptr, s_offs, stride_s_h, 0, offs_b, NB, TWO)
    if PREFETCH >= 1:
        na, nsa, nb, nsb = _gemv_load(w_ptr, w_offs, stride_w_h, s_ptr, s_offs, stride_s_h,
                                      tl.minimum(BLOCK_B, last), offs_b, NB, TWO)
    if PREFETCH >= 2:
        ma, msa, mb, msb = _gemv_load(w_ptr, w_offs, stride_w_h, s_ptr, s_offs, stride_s_h,
                                      tl.minimum(2 * BLOCK_B, last), offs_b, NB, TWO)
    # The first step starts the accumulators, so that they take the layout of the step's result.
    acc_a, acc_b = _gemv_compute(0.0, 0.0, wa, sa, wb, sb, x_ptr, x_row, 0, offs_b, offs_w, NB, X_BF16, BIG_SCALES,
                                 TWO)
    for b0 in range(BLOCK_B, NB, BLOCK_B):
        if PREFETCH >= 2:
            wa, sa, wb, sb = na, nsa, nb, nsb
            na, nsa, nb, nsb = ma, msa, mb, msb
            ma, msa, mb, msb = _gemv_load(w_ptr, w_offs, stride_w_h, s_ptr, s_offs, stride_s_h,
                                          tl.minimum(b0 + 2 * BLOCK_B, last), offs_b, NB, TWO)
        elif PREFETCH >= 1:
            wa, sa, wb, sb = na, nsa, nb, nsb
            na, nsa, nb, nsb = _gemv_load(w_ptr, w_offs, stride_w_h, s_ptr, s_offs, stride_s_h,
                                          tl.minimum(b0 + BLOCK_B, last), offs_b, NB, TWO)
        else:
            wa, sa, wb, sb = _gemv_load(w_ptr, w_offs, stride_w_h, s_ptr, s_offs, stride_s_h, b0, offs_b, NB, TWO)
        acc_a, acc_b = _gemv_compute(acc_a, acc_b, wa, sa, wb, sb, x_ptr, x_row, b0, offs_b, offs_w, NB, X_BF16,
                                     BIG_SCALES, TWO)
    return acc_a, acc_b


# BN SwiGLU outputs (BN gate + BN linear rows) of one (token, slot) pair, BB blocks of 32 per K step.
@triton.jit
def _mlp1_gemv_kernel(x_ptr, stride_x_t, idx_ptr,
                      w_ptr, stride_w_e, stride_w_h, stride_w_n,
                      s_ptr, stride_s_e, stride_s_h, stride_s_n,
                      b_ptr, stride_b_e, stride_b_h,
                      h_ptr, stride_h_p,
                      NB, I, TOP_K, alpha, limit,
                      BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, X_BF16: tl.constexpr,
                      BIG_SCALES: tl.constexpr, PREFETCH: tl.constexpr, GDC: tl.constexpr = False):
    wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(idx_ptr + pid_p).to(tl.int64)
    tok = pid_p // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, I - 1)  # past the last row, read it again (the store drops those outputs)
    w_offs = rows[:, None, None] * stride_w_n * 4 + tl.arange(0, 4)[None, None, :]
    s_offs = rows[:, None] * stride_s_n
    acc_g, acc_l = _gemv_rows(w_ptr + e * stride_w_e * 4, w_offs, stride_w_h, s_ptr + e * stride_s_e, s_offs,
                              stride_s_h, x_ptr, tok * stride_x_t * 16, NB, BLOCK_B, X_BF16, BIG_SCALES, True,
                              PREFETCH)
    gate = tl.sum(acc_g, axis=1) + tl.load(b_ptr + e * stride_b_e + rows)
    lin = tl.sum(acc_l, axis=1) + tl.load(b_ptr + e * stride_b_e + stride_b_h + rows)
    h = _swiglu(gate, lin, alpha, limit)
    tl.store(h_ptr + pid_p * stride_h_p * 32 + offs_n, _cast(h, h_ptr.dtype.element_ty), mask=offs_n < I)


# BN outputs of one (token, slot) pair: y[pair] = w_pair * (W2 h_pair + b2), for the per-token sum.
@triton.jit
def _mlp2_gemv_kernel(h_ptr, stride_h_p, idx_ptr, ew_ptr,
                      w_ptr, stride_w_e, stride_w_n,
                      s_ptr, stride_s_e, stride_s_n,
                      b_ptr, stride_b_e,
                      y_ptr, stride_y_p,
                      NB, D,
                      BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, X_BF16: tl.constexpr,
                      BIG_SCALES: tl.constexpr, PREFETCH: tl.constexpr, GDC: tl.constexpr = False,
                      EARLY_STATIC: tl.constexpr = False):
    wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(idx_ptr + pid_p).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, D - 1)
    if EARLY_STATIC:  # the epilogue's operands loaded now, under the K loop (pdl.EARLY_STATIC)
        bias = tl.load(b_ptr + e * stride_b_e + rows)
        weight = _to_f32(tl.load(ew_ptr + pid_p))
    w_offs = rows[:, None, None] * stride_w_n * 4 + tl.arange(0, 4)[None, None, :]
    s_offs = rows[:, None] * stride_s_n
    acc, _ = _gemv_rows(w_ptr + e * stride_w_e * 4, w_offs, 0, s_ptr + e * stride_s_e, s_offs, 0, h_ptr,
                        pid_p * stride_h_p * 16, NB, BLOCK_B, X_BF16, BIG_SCALES, False, PREFETCH)
    if not EARLY_STATIC:
        bias = tl.load(b_ptr + e * stride_b_e + rows)
        weight = _to_f32(tl.load(ew_ptr + pid_p))
    y = (tl.sum(acc, axis=1) + bias) * weight
    tl.store(y_ptr + pid_p * stride_y_p * 32 + offs_n, y, mask=offs_n < D)


# ---- gemv path, K-split kernels: helpers of the activation-stationary kernels below ----------------------------------
#
# A config with SPLIT_K > 1 splits K over programs (fp32 partial sums); the last of a tile's programs to finish (an
# atomic counter) sums the partials in split order, and with FUSE_SUM (mlp2) the last of a token's k * SPLIT_K
# programs also sums the token's k slots in slot order and writes the output row, with no k-sum kernel. Every sum
# runs in a fixed order: results do not depend on which program finishes last. Counters start at 0 and their last
# program puts them back to 0, so a CUDA graph replays the kernels as they are. (An earlier family of split kernels,
# with the activations prefetched with the weights, lost to the base kernels in every H200 config and was removed:
# NOTES-moe.md, run 3.)

@triton.jit
def _x_split(p, X_BF16: tl.constexpr):
    # p: activation element pairs as one word (int32 of two bf16, or int64 of two fp32) -> (even, odd) fp32.
    if X_BF16:
        p = p.to(tl.uint32, bitcast=True)
        even = (p << 16).to(tl.float32, bitcast=True)
        odd = (p & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        p = p.to(tl.uint64, bitcast=True)
        even = (p & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        odd = (p >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    return even, odd


@triton.jit
def _split_k_range(pid_s, NB, BLOCK_B: tl.constexpr, SPLIT_K: tl.constexpr):
    # Blocks [b_lo, b_hi) of split pid_s: whole K steps of BB blocks each, the last split the shortest.
    per = tl.cdiv(tl.cdiv(NB, SPLIT_K), BLOCK_B) * BLOCK_B
    b_lo = pid_s * per
    return b_lo, tl.minimum(b_lo + per, NB)


# ---- gemv path, activation-stationary variant (config key STATIONARY): every lane owns K blocks ----------------------
#
# What stalls the base kernels (NOTES-moe.md): activations loaded from L1 inside each step, right before their FMAs,
# a block's activations per row (a warp spans 32 rows of one block). (The removed split kernels loaded them once per
# step, but their [BB, 4] activation tiles got a layout of their own, converted to the weights' layout through
# shared memory in every step: NOTES-moe.md, session 4.) Here a program (pair, tile of BN rows, K split) gives each
# lane one K block of a chunk of BB blocks and the warps the rows: word tiles [BB, BN, 4] whose threads run along
# the blocks (the 4 words of a block in one thread, lanes on the blocks, warps on the rows), and the activations
# are loaded through pointers broadcast over the rows, a tile of the words' very shape and so of their layout: they arrive in the registers of
# the lanes that use them. Per chunk a thread loads its block's 16 activation pair-words once (4 LDG.128),
# splits them once, and then streams the rows it owns in that block: per row one LDG.128 of words (32 values), one
# scale byte and 32 FFMAs after the decode, no activation load. Lanes past the program's K range are masked (their
# words and activations read as 0). The sum over the blocks (across lanes) is taken once per program, at the end;
# split partials and the fused k-sum as described above (sync.last_to_arrive).

@triton.jit
def _st_load(w_ptr, w_offs, stride_w_h, s_ptr, s_offs, stride_s_h, x_ptr, x_row, c0, offs_b, offs_w, b_hi,
             TWO: tl.constexpr):
    # Chunk c0 .. c0+BB-1 (blocks < b_hi only): words [BB, BN, 4] and scale bytes [BB, BN] (of the gate and linear
    # rows if TWO), and the activation pair-words of slots 0..3, [BB, BN, 4] but equal along the rows: loaded
    # through pointers broadcast over the rows, they take the words' layout (a [BB, 1, 4] tile would get a layout
    # of its own and a conversion through shared memory), and the compiler keeps one load per thread and slot
    # (4 LDG.128 a chunk in the sm_90 SASS, not one per row).
    blk = c0 + offs_b
    mask_w = (blk < b_hi)[:, None, None]
    mask_s = (blk < b_hi)[:, None]
    w_ptrs = w_ptr + w_offs + blk[:, None, None] * 4
    s_ptrs = s_ptr + s_offs + blk[:, None]
    wa = tl.load(w_ptrs, mask=mask_w, other=0)
    sa = tl.load(s_ptrs, mask=mask_s, other=127)
    if TWO:
        wb = tl.load(w_ptrs + stride_w_h * 4, mask=mask_w, other=0)
        sb = tl.load(s_ptrs + stride_s_h, mask=mask_s, other=127)
    else:
        wb = wa
        sb = sa
    x_ptrs = x_ptr + x_row + tl.broadcast_to(blk[:, None, None] * 16 + offs_w[None, None, :], w_ptrs.shape)
    x0 = tl.load(x_ptrs, mask=mask_w, other=0)
    x1 = tl.load(x_ptrs + 4, mask=mask_w, other=0)
    x2 = tl.load(x_ptrs + 8, mask=mask_w, other=0)
    x3 = tl.load(x_ptrs + 12, mask=mask_w, other=0)
    return wa, sa, wb, sb, x0, x1, x2, x3


@triton.jit
def _st_slot(part, w, xp, SLOT: tl.constexpr, X_BF16: tl.constexpr, EXACT: tl.constexpr):
    xe, xo = _x_split(xp, X_BF16)  # the same for every row of a thread: split once (CSE), shared by its rows
    lo, hi = _slot_f32(w, SLOT, EXACT)
    part = part + lo * xe
    return part + hi * xo


@triton.jit
def _st_block_sums(w, x0, x1, x2, x3, X_BF16: tl.constexpr, EXACT: tl.constexpr):
    # Words [BB, BN, 4] and the activations of their 4 slots -> [BB, BN]: sum over each block's 32 values of
    # E2M1 * 2^-14 (or E2M1 if EXACT) * x.
    w = w.to(tl.uint32, bitcast=True)
    xe, xo = _x_split(x0, X_BF16)
    lo, hi = _slot_f32(w, 0, EXACT)
    part = lo * xe + hi * xo  # starts the 4 accumulators (no zero fill)
    part = _st_slot(part, w, x1, 1, X_BF16, EXACT)
    part = _st_slot(part, w, x2, 2, X_BF16, EXACT)
    part = _st_slot(part, w, x3, 3, X_BF16, EXACT)
    return tl.sum(part, axis=2)


@triton.jit
def _st_compute(acc_a, acc_b, wa, sa, wb, sb, x0, x1, x2, x3, X_BF16: tl.constexpr, BIG_SCALES: tl.constexpr,
                TWO: tl.constexpr):
    # acc [BB, BN] += block scale * block sum, for one chunk.
    acc_a += _scale_values(_st_block_sums(wa, x0, x1, x2, x3, X_BF16, BIG_SCALES), sa, BIG_SCALES)
    if TWO:
        acc_b += _scale_values(_st_block_sums(wb, x0, x1, x2, x3, X_BF16, BIG_SCALES), sb, BIG_SCALES)
    return acc_a, acc_b


@triton.jit
def _st_rows(w_ptr, w_offs, stride_w_h, s_ptr, s_offs, stride_s_h, x_ptr, x_row, b_lo, b_hi,
             BLOCK_B: tl.constexpr, X_BF16: tl.constexpr, BIG_SCALES: tl.constexpr, TWO: tl.constexpr,
             PREFETCH: tl.constexpr):
    # The chunks of BB blocks in [b_lo, b_hi) (none if b_lo >= b_hi: the sums are then 0): [BB, BN] sums per lane.
    # PREFETCH 1: the next chunk's words and activations are loaded before this chunk's decode and FMAs (a chunk past
    # the end is all masked: no memory traffic).
    offs_b = tl.arange(0, BLOCK_B)
    offs_w = tl.arange(0, 4)
    wa, sa, wb, sb, x0, x1, x2, x3 = _st_load(w_ptr, w_offs, stride_w_h, s_ptr, s_offs, stride_s_h, x_ptr, x_row,
                                              b_lo, offs_b, offs_w, b_hi, TWO)
    if PREFETCH >= 1:
        na, nsa, nb, nsb, n0, n1, n2, n3 = _st_load(w_ptr, w_offs, stride_w_h, s_ptr, s_offs, stride_s_h, x_ptr,
                                                    x_row, b_lo + BLOCK_B, offs_b, offs_w, b_hi, TWO)
    # The first chunk starts the accumulators, so that they take the layout of its result.
    acc_a, acc_b = _st_compute(0.0, 0.0, wa, sa, wb, sb, x0, x1, x2, x3, X_BF16, BIG_SCALES, TWO)
    for c0 in range(b_lo + BLOCK_B, b_hi, BLOCK_B):
        if PREFETCH >= 1:
            wa, sa, wb, sb, x0, x1, x2, x3 = na, nsa, nb, nsb, n0, n1, n2, n3
            na, nsa, nb, nsb, n0, n1, n2, n3 = _st_load(w_ptr, w_offs, stride_w_h, s_ptr, s_offs, stride_s_h, x_ptr,
                                                        x_row, c0 + BLOCK_B, offs_b, offs_w, b_hi, TWO)
        else:
            wa, sa, wb, sb, x0, x1, x2, x3 = _st_load(w_ptr, w_offs, stride_w_h, s_ptr, s_offs, stride_s_h, x_ptr,
                                                      x_row, c0, offs_b, offs_w, b_hi, TWO)
        acc_a, acc_b = _st_compute(acc_a, acc_b, wa, sa, wb, sb, x0, x1, x2, x3, X_BF16, BIG_SCALES, TWO)
    return acc_a, acc_b


# BN SwiGLU outputs of one (token, slot) pair over split pid_s of K, lanes on K blocks. part: [P, SPLIT_K, 2, I]
# fp32 partials; cnt: [P, cdiv(I, BN)] int32 counters (both unused if SPLIT_K == 1).
@triton.jit
def _mlp1_gemv_st_kernel(x_ptr, stride_x_t, idx_ptr,
                         w_ptr, stride_w_e, stride_w_h, stride_w_n,
                         s_ptr, stride_s_e, stride_s_h, stride_s_n,
                         b_ptr, stride_b_e, stride_b_h,
                         h_ptr, stride_h_p, part_ptr, cnt_ptr,
                         NB, I, TOP_K, alpha, limit,
                         BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, SPLIT_K: tl.constexpr,
                         X_BF16: tl.constexpr, BIG_SCALES: tl.constexpr, PREFETCH: tl.constexpr,
                         GDC: tl.constexpr = False, EARLY_STATIC: tl.constexpr = False):
    wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    e = tl.load(idx_ptr + pid_p).to(tl.int64)
    tok = pid_p // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    rows = tl.minimum(offs_n, I - 1)  # past the last row, read it again (the stores drop those outputs)
    bias_ptrs = b_ptr + e * stride_b_e + rows
    if EARLY_STATIC and SPLIT_K == 1:  # the epilogue's biases loaded now, under the K loop (pdl.EARLY_STATIC)
        b_gate = tl.load(bias_ptrs)
        b_lin = tl.load(bias_ptrs + stride_b_h)
    w_offs = rows[None, :, None] * stride_w_n * 4 + tl.arange(0, 4)[None, None, :]  # [1, BN, 4]
    s_offs = rows[None, :] * stride_s_n
    b_lo, b_hi = _split_k_range(pid_s, NB, BLOCK_B, SPLIT_K)
    acc_g, acc_l = _st_rows(w_ptr + e * stride_w_e * 4, w_offs, stride_w_h, s_ptr + e * stride_s_e, s_offs,
                            stride_s_h, x_ptr, tok * stride_x_t * 16, b_lo, b_hi, BLOCK_B, X_BF16, BIG_SCALES, True,
                            PREFETCH)
    gate = tl.sum(acc_g, axis=0)  # across the lanes, once
    lin = tl.sum(acc_l, axis=0)
    h_ptrs = h_ptr + pid_p * stride_h_p * 32 + offs_n
    if SPLIT_K == 1:
        if not EARLY_STATIC:
            b_gate = tl.load(bias_ptrs)
            b_lin = tl.load(bias_ptrs + stride_b_h)
        h = _swiglu(gate + b_gate, lin + b_lin, alpha, limit)
        tl.store(h_ptrs, _cast(h, h_ptr.dtype.element_ty), mask=mask_n)
    else:
        part_ptrs = part_ptr + pid_p * SPLIT_K * 2 * I + rows
        tl.store(part_ptrs + pid_s * 2 * I, gate, mask=mask_n)
        tl.store(part_ptrs + pid_s * 2 * I + I, lin, mask=mask_n)
        cnt_ptrs = cnt_ptr + pid_p * tl.num_programs(1) + pid_n
        if last_to_arrive(cnt_ptrs, SPLIT_K):
            gate = tl.load(bias_ptrs)
            lin = tl.load(bias_ptrs + stride_b_h)
            for s in tl.static_range(SPLIT_K):  # split order, whichever program came last
                gate += tl.load(part_ptrs + s * 2 * I, cache_modifier=".cg")
                lin += tl.load(part_ptrs + s * 2 * I + I, cache_modifier=".cg")
            h = _swiglu(gate, lin, alpha, limit)
            tl.store(h_ptrs, _cast(h, h_ptr.dtype.element_ty), mask=mask_n)
            tl.store(cnt_ptrs, 0)  # ready for the next launch


# BN outputs of one (token, slot) pair over split pid_s of K, lanes on K blocks: y[pair] = w_pair * (W2 h + b2), or
# with FUSE_SUM out[tok] written by the last of the token's k * SPLIT_K programs.
@triton.jit
def _mlp2_gemv_st_kernel(h_ptr, stride_h_p, idx_ptr, ew_ptr,
                         w_ptr, stride_w_e, stride_w_n,
                         s_ptr, stride_s_e, stride_s_n,
                         b_ptr, stride_b_e,
                         y_ptr, stride_y_p, out_ptr, stride_o_t, part_ptr, cnt_ptr,
                         NB, D, TOP_K,
                         BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, SPLIT_K: tl.constexpr,
                         FUSE_SUM: tl.constexpr, X_BF16: tl.constexpr, BIG_SCALES: tl.constexpr,
                         PREFETCH: tl.constexpr, GDC: tl.constexpr = False):
    wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    e = tl.load(idx_ptr + pid_p).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    rows = tl.minimum(offs_n, D - 1)
    w_offs = rows[None, :, None] * stride_w_n * 4 + tl.arange(0, 4)[None, None, :]  # [1, BN, 4]
    s_offs = rows[None, :] * stride_s_n
    b_lo, b_hi = _split_k_range(pid_s, NB, BLOCK_B, SPLIT_K)
    acc, _ = _st_rows(w_ptr + e * stride_w_e * 4, w_offs, 0, s_ptr + e * stride_s_e, s_offs, 0, h_ptr,
                      pid_p * stride_h_p * 16, b_lo, b_hi, BLOCK_B, X_BF16, BIG_SCALES, False, PREFETCH)
    acc = tl.sum(acc, axis=0)
    if SPLIT_K == 1 and not FUSE_SUM:
        weight = _to_f32(tl.load(ew_ptr + pid_p))
        y = (acc + tl.load(b_ptr + e * stride_b_e + rows)) * weight
        tl.store(y_ptr + pid_p * stride_y_p * 32 + offs_n, y, mask=mask_n)
    else:
        tl.store(part_ptr + (pid_p * SPLIT_K + pid_s) * D + rows, acc, mask=mask_n)
        if FUSE_SUM:
            tok = pid_p // TOP_K
            cnt_ptrs = cnt_ptr + tok * tl.num_programs(1) + pid_n
            if last_to_arrive(cnt_ptrs, TOP_K * SPLIT_K):
                total = tl.zeros([BLOCK_N], tl.float32)
                for slot in range(TOP_K):  # slot order, then split order: whichever program came last
                    pair = tok * TOP_K + slot
                    ep = tl.load(idx_ptr + pair).to(tl.int64)
                    v = tl.load(b_ptr + ep * stride_b_e + rows)
                    for s in tl.static_range(SPLIT_K):
                        v += tl.load(part_ptr + (pair * SPLIT_K + s) * D + rows, cache_modifier=".cg")
                    total += v * _to_f32(tl.load(ew_ptr + pair))
                tl.store(out_ptr + tok * stride_o_t * 32 + offs_n, _cast(total, out_ptr.dtype.element_ty),
                         mask=mask_n)
                tl.store(cnt_ptrs, 0)
        else:
            cnt_ptrs = cnt_ptr + pid_p * tl.num_programs(1) + pid_n
            if last_to_arrive(cnt_ptrs, SPLIT_K):
                v = tl.load(b_ptr + e * stride_b_e + rows)
                for s in tl.static_range(SPLIT_K):
                    v += tl.load(part_ptr + (pid_p * SPLIT_K + s) * D + rows, cache_modifier=".cg")
                y = v * _to_f32(tl.load(ew_ptr + pid_p))
                tl.store(y_ptr + pid_p * stride_y_p * 32 + offs_n, y, mask=mask_n)
                tl.store(cnt_ptrs, 0)


# ---- routing: stable counting sort of the pairs by expert, and the tile list ----------------------------------------

# One program. BP pairs per step x BE experts one-hot; BM tile slots per step.
@triton.jit
def _store_tiles(tiles_ptr, MAX_TILES, counts, starts, offs_e, E, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    # The tile table from the per-expert pair counts and their starts in the sorted order (both [BLOCK_E]):
    # tiles of at most BLOCK_T pairs of one expert, in expert order; slots past the last tile get start = end = 0.
    # Shared by both routings (this module's one-program kernel, moe_prefill.py's parallel one).
    ntiles = (counts + BLOCK_T - 1) // BLOCK_T
    tiles_end = tl.cumsum(ntiles, axis=0)
    tiles_begin = tiles_end - ntiles
    for m0 in range(0, MAX_TILES, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        tile_e = tl.sum((tiles_end[None, :] <= offs_m[:, None]).to(tl.int32), axis=1)  # experts wholly before
        mine = (tile_e[:, None] == offs_e[None, :]).to(tl.int32)
        first = tl.sum(mine * starts[None, :], axis=1)
        count = tl.sum(mine * counts[None, :], axis=1)
        start = first + (offs_m - tl.sum(mine * tiles_begin[None, :], axis=1)) * BLOCK_T
        end = tl.minimum(start + BLOCK_T, first + count)
        valid = tile_e < E
        mask_m = offs_m < MAX_TILES
        tl.store(tiles_ptr + offs_m, tl.where(valid, tile_e, 0), mask=mask_m)
        tl.store(tiles_ptr + MAX_TILES + offs_m, tl.where(valid, start, 0), mask=mask_m)
        tl.store(tiles_ptr + 2 * MAX_TILES + offs_m, tl.where(valid, end, 0), mask=mask_m)


@triton.jit
def _routing_kernel(idx_ptr, P, E, order_ptr, tiles_ptr, MAX_TILES,
                    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                    GDC: tl.constexpr = False):
    wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], tl.int32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        ex = tl.load(idx_ptr + offs_p, mask=offs_p < P, other=-1).to(tl.int32)
        counts += tl.sum((ex[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    starts = tl.cumsum(counts, axis=0) - counts  # first sorted position of each expert
    # Second pass: position = start of the expert + pairs of that expert seen before (earlier chunks, then
    # earlier in this chunk), which keeps the sort stable.
    seen = starts
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        ex = tl.load(idx_ptr + offs_p, mask=mask_p, other=-1).to(tl.int32)
        onehot = (ex[:, None] == offs_e[None, :]).to(tl.int32)  # [BP, BE]
        rank = tl.cumsum(onehot, axis=0) - onehot
        pos = tl.sum(onehot * (rank + seen[None, :]), axis=1)
        tl.store(order_ptr + pos, offs_p, mask=mask_p)
        seen += tl.sum(onehot, axis=0)
    _store_tiles(tiles_ptr, MAX_TILES, counts, starts, offs_e, E, BLOCK_T, BLOCK_M)


def moe_routing(expert_indices: torch.Tensor, num_experts: int, block_t: int):
    """Pairs sorted by expert and tiles of ``block_t`` pairs of one expert, on the device, no host sync.

    Returns ``order`` (P,) int32: the pair ids (t*k + slot) sorted stably by expert; ``tiles`` (3, M) int32
    with M = P // block_t + min(E, P) (an upper bound on the tile count known from the shapes alone): per
    tile its expert and [start, end) into ``order``; unused slots have start = end = 0.
    """
    expert_indices = expert_indices.contiguous()  # the kernel reads the (T, k) ids as one flat run of P
    P = expert_indices.numel()
    max_tiles = P // block_t + min(num_experts, P)
    order = torch.empty(P, dtype=torch.int32, device=expert_indices.device)
    tiles = torch.empty(3, max_tiles, dtype=torch.int32, device=expert_indices.device)
    block_e = triton.next_power_of_2(num_experts)
    block_p = max(16, min(triton.next_power_of_2(P), 8192 // block_e))
    _routing_kernel[(1,)](expert_indices, P, num_experts, order, tiles, max_tiles,
                          BLOCK_T=block_t, BLOCK_P=block_p, BLOCK_E=block_e,
                          BLOCK_M=max(16, min(triton.next_power_of_2(max_tiles), 8192 // block_e)), num_warps=4,
                          **launch_options(expert_indices))
    return order, tiles


# ---- dot paths: grouped products on tensor cores ----------------------------------------------------------------------

@triton.jit
def _dot_slot(acc, w, s, x_ptr, x_offs, mask_x, SLOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
              BLOCK_B: tl.constexpr, X_BF16: tl.constexpr, DOT_F32: tl.constexpr, BIG_SCALES: tl.constexpr,
              JOIN: tl.constexpr, DEQ_BF16: tl.constexpr, SWAP: tl.constexpr):
    # acc [BN, BT] += slot SLOT of the words w [BN, BB, 4] (scale bytes s [BN, BB]) times the activations; with
    # SWAP acc is [BT, BN] and the tokens are the product's A operand (see _mlp1_dot_kernel).
    # The slot's values are activations 32b + 8*SLOT + (0..7) of block b, as (word, lane) pairs. JOIN: interleave
    # the two lanes back (join + reshape) and take those 8 activations straight from memory, one product with K =
    # BB*8; else two products with K = BB*4 (even lanes with even activations, odd with odd), the activations
    # read as element pairs and split with shifts, as in the gemv. DEQ_BF16 (bf16 activations, scale bytes <= 128;
    # JOIN, or SWAP with split lanes): the values are decoded straight into bf16 by _slot_bf16.
    if DEQ_BF16:
        if SWAP:  # w [BB, 4, BN], s [BB, BN]; split lanes, K = BB*4 (block, word) per product
            tl.static_assert(not JOIN, "SWAP needs JOIN=False")
            lo, hi = _slot_bf16(w, s[:, None, :], SLOT)
            xe, xo = _load_x_bf16(x_ptr, x_offs, mask_x)
            acc = _dot_acc(_to_dot(tl.reshape(xe, [BLOCK_T, BLOCK_B * 4]), DOT_F32),
                           _to_dot(tl.reshape(lo, [BLOCK_B * 4, BLOCK_N]), DOT_F32), acc, DOT_F32)
            acc = _dot_acc(_to_dot(tl.reshape(xo, [BLOCK_T, BLOCK_B * 4]), DOT_F32),
                           _to_dot(tl.reshape(hi, [BLOCK_B * 4, BLOCK_N]), DOT_F32), acc, DOT_F32)
        else:
            tl.static_assert(JOIN, "DEQ_BF16 without SWAP needs JOIN")
            lo, hi = _slot_bf16(w, s[:, :, None], SLOT)
            xs = tl.load(x_ptr + x_offs, mask=mask_x, other=0.0)  # [BT, BB, 8] elements
            xs = tl.trans(_to_dot(tl.reshape(xs, [BLOCK_T, BLOCK_B * 8]), DOT_F32))
            acc = _dot_acc(_to_dot(tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_B * 8]), DOT_F32), xs, acc, DOT_F32)
    else:
        acc = _dot_slot_f32(acc, w, s, x_ptr, x_offs, mask_x, SLOT, BLOCK_N, BLOCK_T, BLOCK_B, X_BF16, DOT_F32,
                            BIG_SCALES, JOIN)
    return acc


@triton.jit
def _dot_slot_f32(acc, w, s, x_ptr, x_offs, mask_x, SLOT: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr, X_BF16: tl.constexpr, DOT_F32: tl.constexpr,
                  BIG_SCALES: tl.constexpr, JOIN: tl.constexpr):
    # The fp16 -> fp32 decode (_slot_f32): fp32 activations, scale bytes > 128, or DEQ_BF16 off.
    lo, hi = _slot_f32(w, SLOT, BIG_SCALES)
    lo = _scale_values(lo, s[:, :, None], BIG_SCALES)
    hi = _scale_values(hi, s[:, :, None], BIG_SCALES)
    if JOIN:
        tl.static_assert(BLOCK_B * 8 >= 16, "tl.dot needs K >= 16")
        xs = tl.load(x_ptr + x_offs, mask=mask_x, other=0.0)  # [BT, BB, 8] elements
        xs = tl.trans(_to_dot(tl.reshape(xs, [BLOCK_T, BLOCK_B * 8]), DOT_F32))
        acc = _dot_acc(_to_dot(tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_B * 8]), DOT_F32), xs, acc, DOT_F32)
    else:
        tl.static_assert(BLOCK_B * 4 >= 16, "tl.dot needs K >= 16")
        xe, xo = _load_x_pairs(x_ptr, x_offs, mask_x, X_BF16, True)  # [BT, BB, 4] pairs
        xe = tl.trans(_to_dot(tl.reshape(xe, [BLOCK_T, BLOCK_B * 4]), DOT_F32))
        xo = tl.trans(_to_dot(tl.reshape(xo, [BLOCK_T, BLOCK_B * 4]), DOT_F32))
        acc = _dot_acc(_to_dot(tl.reshape(lo, [BLOCK_N, BLOCK_B * 4]), DOT_F32), xe, acc, DOT_F32)
        acc = _dot_acc(_to_dot(tl.reshape(hi, [BLOCK_N, BLOCK_B * 4]), DOT_F32), xo, acc, DOT_F32)
    return acc


@triton.jit
def _dot_step(acc, w, s, x_ptr, x_offs, mask_x, X_SLOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
              BLOCK_B: tl.constexpr, X_BF16: tl.constexpr, DOT_F32: tl.constexpr, BIG_SCALES: tl.constexpr,
              JOIN: tl.constexpr, DEQ_BF16: tl.constexpr, SWAP: tl.constexpr):
    # acc [BN, BT] ([BT, BN] with SWAP) += the BB blocks of words w [BN, BB, 4] ([BB, 4, BN] with SWAP) times
    # their activations, one slot at a time. (Joining the four slots into one product with K = BB*32 was tried:
    # triton 3.6 stages such operands through shared memory 16 bits at a time, or fails to compile them.)
    for slot in tl.static_range(4):
        acc = _dot_slot(acc, w, s, x_ptr, x_offs + X_SLOT * slot, mask_x, slot, BLOCK_N, BLOCK_T, BLOCK_B,
                        X_BF16, DOT_F32, BIG_SCALES, JOIN, DEQ_BF16, SWAP)
    return acc


@triton.jit
def _to_dot(v, DOT_F32: tl.constexpr):
    if DOT_F32:
        return _to_f32(v)
    else:
        return v.to(tl.bfloat16)


@triton.jit
def _dot_acc(a, b, acc, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _dot_zeros(BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, SWAP: tl.constexpr):
    if SWAP:
        z = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    else:
        z = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
    return z


@triton.jit
def _w_tiles(w_base, s_base, offs_n, stride_w_n, stride_s_n, offs_b, SWAP: tl.constexpr):
    # Pointers to the words [BN, BB, 4] and scale bytes [BN, BB] of a K step; with SWAP [BB, 4, BN] and [BB, BN],
    # so that the decoded slot reshapes into the [K, BN] operand with no transpose (see _dot_slot).
    offs_w = tl.arange(0, 4)
    if SWAP:
        w_ptrs = w_base + offs_n[None, None, :] * stride_w_n * 4 + offs_b[:, None, None] * 4 + offs_w[None, :, None]
        s_ptrs = s_base + offs_n[None, :] * stride_s_n + offs_b[:, None]
    else:
        w_ptrs = w_base + offs_n[:, None, None] * stride_w_n * 4 + offs_b[None, :, None] * 4 + offs_w[None, None, :]
        s_ptrs = s_base + offs_n[:, None] * stride_s_n + offs_b[None, :]
    return w_ptrs, s_ptrs


@triton.jit
def _w_masks(mask_n, mask_b, SWAP: tl.constexpr):
    if SWAP:
        mask_s = mask_b[:, None] & mask_n[None, :]
        mask_w = mask_s[:, None, :]
    else:
        mask_s = mask_n[:, None] & mask_b[None, :]
        mask_w = mask_s[:, :, None]
    return mask_w, mask_s


# One tile of BT pairs of one expert x BN SwiGLU outputs (BN gate + BN linear rows); BB blocks of 32 per K step.
# acc [BN, BT] = W [BN, K] @ X^T [K, BT]: weights are the wide operand, tokens the narrow one.
@triton.jit
def _mlp1_dot_kernel(x_ptr, stride_x_t, order_ptr, tiles_ptr, MAX_TILES,
                     w_ptr, stride_w_e, stride_w_h, stride_w_n,
                     s_ptr, stride_s_e, stride_s_h, stride_s_n,
                     b_ptr, stride_b_e, stride_b_h,
                     h_ptr, stride_h_r,
                     NB, I, TOP_K, alpha, limit,
                     BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr, X_BF16: tl.constexpr,
                     DOT_F32: tl.constexpr, BIG_SCALES: tl.constexpr, JOIN: tl.constexpr, DEQ_BF16: tl.constexpr,
                     SWAP: tl.constexpr, GDC: tl.constexpr = False):
    wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(tiles_ptr + MAX_TILES + pid_m)
    end = tl.load(tiles_ptr + 2 * MAX_TILES + pid_m)
    if start >= end:  # a tile slot past the real tile count
        return
    e = tl.load(tiles_ptr + pid_m).to(tl.int64)
    offs_r = start + tl.arange(0, BLOCK_T)
    mask_r = offs_r < end
    tok = tl.load(order_ptr + offs_r, mask=mask_r, other=0) // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    offs_b = tl.arange(0, BLOCK_B)
    offs_w = tl.arange(0, 4)
    wg_ptrs, sg_ptrs = _w_tiles(w_ptr + e * stride_w_e * 4, s_ptr + e * stride_s_e, offs_n, stride_w_n, stride_s_n,
                                offs_b, SWAP)
    if JOIN:  # element offsets of slot 0's 8 activations; slot k adds 8k
        x_offs = tok[:, None, None] * stride_x_t * 32 + offs_b[None, :, None] * 32 + tl.arange(0, 8)[None, None, :]
        X_SLOT: tl.constexpr = 8
        X_STEP: tl.constexpr = 32
    else:  # pair offsets of slot 0's 4 pairs; slot k adds 4k
        x_offs = tok[:, None, None] * stride_x_t * 16 + offs_b[None, :, None] * 16 + offs_w[None, None, :]
        X_SLOT: tl.constexpr = 4
        X_STEP: tl.constexpr = 16
    acc_g = _dot_zeros(BLOCK_N, BLOCK_T, SWAP)
    acc_l = _dot_zeros(BLOCK_N, BLOCK_T, SWAP)
    for b0 in range(0, NB, BLOCK_B):
        mask_b = b0 + offs_b < NB
        mask_w, mask_s = _w_masks(mask_n, mask_b, SWAP)
        mask_x = mask_r[:, None, None] & mask_b[None, :, None]
        wg = tl.load(wg_ptrs, mask=mask_w, other=0).to(tl.uint32, bitcast=True)
        wl = tl.load(wg_ptrs + stride_w_h * 4, mask=mask_w, other=0).to(tl.uint32, bitcast=True)
        sg = tl.load(sg_ptrs, mask=mask_s, other=127)
        sl = tl.load(sg_ptrs + stride_s_h, mask=mask_s, other=127)
        acc_g = _dot_step(acc_g, wg, sg, x_ptr, x_offs, mask_x, X_SLOT, BLOCK_N, BLOCK_T, BLOCK_B, X_BF16, DOT_F32,
                          BIG_SCALES, JOIN, DEQ_BF16, SWAP)
        acc_l = _dot_step(acc_l, wl, sl, x_ptr, x_offs, mask_x, X_SLOT, BLOCK_N, BLOCK_T, BLOCK_B, X_BF16, DOT_F32,
                          BIG_SCALES, JOIN, DEQ_BF16, SWAP)
        wg_ptrs += BLOCK_B * 4
        sg_ptrs += BLOCK_B
        x_offs += BLOCK_B * X_STEP
    if SWAP:
        acc_g = tl.trans(acc_g)
        acc_l = tl.trans(acc_l)
    gate = acc_g + tl.load(b_ptr + e * stride_b_e + offs_n, mask=mask_n, other=0.0)[:, None]
    lin = acc_l + tl.load(b_ptr + e * stride_b_e + stride_b_h + offs_n, mask=mask_n, other=0.0)[:, None]
    h = _swiglu(gate, lin, alpha, limit)
    h_ptrs = h_ptr + offs_r[None, :] * stride_h_r * 32 + offs_n[:, None]
    tl.store(h_ptrs, _cast(h, h_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_r[None, :])


# One tile of BT pairs of one expert x BN outputs; rows of h are the tile's sorted positions; writes weighted rows
# y[pair] = w_pair * (W2 h + b2) for the per-token sum.
@triton.jit
def _mlp2_dot_kernel(h_ptr, stride_h_r, order_ptr, tiles_ptr, MAX_TILES, ew_ptr,
                     w_ptr, stride_w_e, stride_w_n,
                     s_ptr, stride_s_e, stride_s_n,
                     b_ptr, stride_b_e,
                     y_ptr, stride_y_p,
                     NB, D,
                     BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr, X_BF16: tl.constexpr,
                     DOT_F32: tl.constexpr, BIG_SCALES: tl.constexpr, JOIN: tl.constexpr, DEQ_BF16: tl.constexpr,
                     SWAP: tl.constexpr, GDC: tl.constexpr = False):
    wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(tiles_ptr + MAX_TILES + pid_m)
    end = tl.load(tiles_ptr + 2 * MAX_TILES + pid_m)
    if start >= end:
        return
    e = tl.load(tiles_ptr + pid_m).to(tl.int64)
    offs_r = start + tl.arange(0, BLOCK_T)
    mask_r = offs_r < end
    pair = tl.load(order_ptr + offs_r, mask=mask_r, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    offs_b = tl.arange(0, BLOCK_B)
    offs_w = tl.arange(0, 4)
    w_ptrs, s_ptrs = _w_tiles(w_ptr + e * stride_w_e * 4, s_ptr + e * stride_s_e, offs_n, stride_w_n, stride_s_n,
                              offs_b, SWAP)
    if JOIN:
        x_offs = offs_r[:, None, None] * stride_h_r * 32 + offs_b[None, :, None] * 32 + tl.arange(0, 8)[None, None, :]
        X_SLOT: tl.constexpr = 8
        X_STEP: tl.constexpr = 32
    else:
        x_offs = offs_r[:, None, None] * stride_h_r * 16 + offs_b[None, :, None] * 16 + offs_w[None, None, :]
        X_SLOT: tl.constexpr = 4
        X_STEP: tl.constexpr = 16
    acc = _dot_zeros(BLOCK_N, BLOCK_T, SWAP)
    for b0 in range(0, NB, BLOCK_B):
        mask_b = b0 + offs_b < NB
        mask_w, mask_s = _w_masks(mask_n, mask_b, SWAP)
        wt = tl.load(w_ptrs, mask=mask_w, other=0).to(tl.uint32, bitcast=True)
        sc = tl.load(s_ptrs, mask=mask_s, other=127)
        mask_x = mask_r[:, None, None] & mask_b[None, :, None]
        acc = _dot_step(acc, wt, sc, h_ptr, x_offs, mask_x, X_SLOT, BLOCK_N, BLOCK_T, BLOCK_B, X_BF16, DOT_F32,
                        BIG_SCALES, JOIN, DEQ_BF16, SWAP)
        w_ptrs += BLOCK_B * 4
        s_ptrs += BLOCK_B
        x_offs += BLOCK_B * X_STEP
    if SWAP:
        acc = tl.trans(acc)
    weight = _to_f32(tl.load(ew_ptr + pair, mask=mask_r, other=0.0))
    y = (acc + tl.load(b_ptr + e * stride_b_e + offs_n, mask=mask_n, other=0.0)[:, None]) * weight[None, :]
    tl.store(y_ptr + pair[None, :] * stride_y_p * 32 + offs_n[:, None], y, mask=mask_n[:, None] & mask_r[None, :])


# out[t] = sum of the k rows y[t*k .. t*k+k-1]; BN outputs per program.
@triton.jit
def _sum_slots_kernel(y_ptr, stride_y_p, out_ptr, stride_o_t, D, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr,
                      GDC: tl.constexpr = False):
    wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    acc = tl.zeros([BLOCK_N], tl.float32)
    for slot in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (pid_t * TOP_K + slot) * stride_y_p * 32 + offs_n, mask=mask_n, other=0.0)
    tl.store(out_ptr + pid_t * stride_o_t * 32 + offs_n, _cast(acc, out_ptr.dtype.element_ty), mask=mask_n)


# ---- the public op ------------------------------------------------------------------------------------------------

# Tile shapes per path (BN rows of output, BB blocks of 32 per K step, BT tokens per tile): the fastest of the sweep
# on the H200 (tests/benchmarks/gpu/NOTES-moe.md, second run). The gemv path has two kernel families (see
# gemv_family): the base kernels (GEMV_BASE) and the activation-stationary ones (STATIONARY; GEMV_ST: the offline
# compile's leanest tiles, slower than the default on the H200). `moe_kernels.py --sweep-t1` measures them and
# prints the "gemv" line to put below.
GEMV_BASE = dict(mlp1=dict(BLOCK_N=8, BLOCK_B=16, num_warps=4, PREFETCH=2),
                 mlp2=dict(BLOCK_N=8, BLOCK_B=16, num_warps=4, PREFETCH=0))
GEMV_ST = dict(mlp1=dict(STATIONARY=True, BLOCK_N=16, BLOCK_B=32, num_warps=4, SPLIT_K=3),
               mlp2=dict(STATIONARY=True, BLOCK_N=16, BLOCK_B=32, num_warps=4, SPLIT_K=3, FUSE_SUM=True))
# The portable gemv kernels, the H200 sweep's winner of 2026-12-01 (NOTES-moe.md): mlp1 activation-stationary 21.9 us
# vs base 22.0, mlp2 base. They also run where a config of the tensor-core kernels (moe_mma.py) cannot.
GEMV_PORTABLE = dict(mlp1=dict(BLOCK_N=16, BLOCK_B=32, num_warps=4, PREFETCH=0, SPLIT_K=1, STATIONARY=True),
                     mlp2=dict(BLOCK_N=8, BLOCK_B=16, num_warps=4, PREFETCH=0))
CONFIGS = {
    # The gemv path. The tensor-core kernels of moe_mma.py (configs with MMA) are correct on the H200 but slower
    # than these in every tile tried on these words (2026-12-02: mlp1 23.0 us vs 21.4, mlp2 19.8 vs 14.6), and in the
    # decode step even on tiled words (2.65-2.70 ms vs 2.09-2.18; NOTES-moe.md, sessions 5-6): not the default.
    "gemv": GEMV_PORTABLE,
    # "dot": the H200 sweeps of 2026-12-02 (tests/benchmarks/gpu/moe_bf16.py, NOTES-moe.md run 4) at T = 64: the bf16
    # decode with SWAP, op 307.7 us against 392.7 for the previous default (BN128 JOIN, fp16 -> fp32 decode). With
    # fp32 activations (no bf16 decode) these tiles run the split-lane kernels.
    "dot": dict(BLOCK_T=16, mlp1=dict(BLOCK_N=64, BLOCK_B=4, num_warps=4, num_stages=3, JOIN=False, SWAP=True),
                mlp2=dict(BLOCK_N=64, BLOCK_B=4, num_warps=2, num_stages=4, JOIN=False, SWAP=True)),
    "prefill": dict(BLOCK_T=128, mlp1=dict(BLOCK_N=128, BLOCK_B=2, num_warps=8, num_stages=4, JOIN=True),
                    mlp2=dict(BLOCK_N=128, BLOCK_B=4, num_warps=8, num_stages=3, JOIN=False)),
}
# Measured at T = 8 (E = 32): gemv 180 us, dot 275 us; the gemv reads an expert once per pair routed to it
# (L2 catches part of the repeats), so past ~8 tokens the tiles of one expert's tokens win.
GEMV_MAX_TOKENS = 8
DOT_MAX_TOKENS = 64  # up to here tiles of 16 tokens of one expert (gpt-oss: <= ~16 tokens on an expert)


# From this many (token, expert) pairs per expert on average, prefill dequantizes the routed experts into a bf16
# workspace and runs grouped GEMMs on them (moe_prefill.py): on the H200 1.02x the in-register "prefill" path at
# 64 pairs per expert (T = 512, E = 32; 1.05x at T = 2048, E = 128), 1.79x at 256, 3.0x at 1024; 0.88x at 16.
PREFILL_DEQUANT_MIN_PAIRS_PER_EXPERT = 64


def choose_path(T: int, top_k: int, num_experts: int) -> str:
    """The path for T tokens: a function of the shapes alone, so it is fixed inside a CUDA graph."""
    if T <= GEMV_MAX_TOKENS:
        return "gemv"
    if T <= DOT_MAX_TOKENS:
        return "dot"
    return "prefill_dequant" if T * top_k >= PREFILL_DEQUANT_MIN_PAIRS_PER_EXPERT * num_experts else "prefill"


def _buffer(shape, dtype, device) -> torch.Tensor:
    if _POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# Launchers, one per kernel (the benchmark times them one by one). Row strides go to the kernels in 32-value
# blocks (4 words, 16 packed bytes): then the compiler knows that rows start 16-byte aligned and issues 16-byte
# loads. Activations of the gemv kernels are element pairs: the int32 view of bf16 rows, or fp32 rows.

def _pairs(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.bfloat16 else t


def _word_strides(t: torch.Tensor, n: int) -> list[int]:
    return [s // 4 for s in t.stride()[:n]]


def launch_mlp1_gemv(x, idx, w: MoEWeights, h, cfg, alpha, limit):
    P, (T, D), I = idx.numel(), x.shape, w.intermediate
    grid = (P, triton.cdiv(I, cfg["BLOCK_N"]))
    _mlp1_gemv_kernel[grid](
        _pairs(x), D // 32, idx, w.w1, *_word_strides(w.w1, 3), w.s1, *w.s1.stride()[:3], w.b1, *w.b1.stride()[:2],
        h, I // 32, D // 32, I, idx.shape[1], alpha, limit,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_B=cfg["BLOCK_B"], X_BF16=x.dtype == torch.bfloat16, BIG_SCALES=w.big_scales,
        PREFETCH=int(cfg.get("PREFETCH", 1)), num_warps=cfg["num_warps"], **launch_options(x, grid))


def launch_mlp2_gemv(h, idx, ew, w: MoEWeights, y, cfg):
    P, D, I = idx.numel(), w.hidden, w.intermediate
    grid = (P, triton.cdiv(D, cfg["BLOCK_N"]))
    _mlp2_gemv_kernel[grid](
        _pairs(h), I // 32, idx, ew, w.w2, *_word_strides(w.w2, 2), w.s2, *w.s2.stride()[:2], w.b2, w.b2.stride(0),
        y, D // 32, I // 32, D,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_B=cfg["BLOCK_B"], X_BF16=h.dtype == torch.bfloat16, BIG_SCALES=w.big_scales,
        PREFETCH=int(cfg.get("PREFETCH", 1)), EARLY_STATIC=pdl.EARLY_STATIC, num_warps=cfg["num_warps"],
        **launch_options(h, grid))


def gemv_family(cfg: dict) -> str:
    """The gemv kernels a layer config selects: "mma" (key MMA true: the tensor-core kernels of moe_mma.py, NT, NW,
    UNROLL, PREFETCH, STAGES), "stationary" (key STATIONARY true: lanes own K blocks, activations loaded once per chunk;
    SPLIT_K, PREFETCH 0/1, FUSE_SUM as below) or "base". SPLIT_K without STATIONARY named the split family, which
    was removed (it lost to the base kernels in every H200 config): refused."""
    if cfg.get("MMA", False):
        return "mma"
    if cfg.get("STATIONARY", False):
        return "stationary"
    if "SPLIT_K" in cfg or "FUSE_SUM" in cfg:
        raise ValueError(f"moe gemv config {cfg}: SPLIT_K and FUSE_SUM need STATIONARY=True (the split gemv "
                         "family was removed)")
    return "base"


def _split_pairs(t: torch.Tensor) -> torch.Tensor:
    # Element pairs as one word each: int32 for bf16 rows, int64 for fp32 rows (split by shifts in _x_split).
    return t.view(torch.int32) if t.dtype == torch.bfloat16 else t.view(torch.int64)


def _counters(w: MoEWeights, n: int, k: int, device) -> torch.Tensor:
    """n int32 counters at 0 for the K-split kernels, kept with the layer's weights (each kernel leaves them at 0).

    Made on first use, outside any CUDA-graph capture (a buffer allocated during a capture would belong to the
    graph's memory pool), large enough for every gemv batch (T <= GEMV_MAX_TOKENS) with BLOCK_N >= 8; a capture
    that needs more than an earlier eager call made is refused. One layer's kernels must not run on two streams
    at once (they would share counters)."""
    have = w.scratch.get(("counters", str(device)))
    if have is None or have.numel() < n:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("moe_mxfp4: the K-split gemv kernels need their counters made by one eager call "
                               "with these shapes before a CUDA graph captures them")
        most = GEMV_MAX_TOKENS * k * triton.cdiv(max(w.hidden, w.intermediate), 8)
        have = torch.zeros(max(n, most), dtype=torch.int32, device=device)
        w.scratch[("counters", str(device))] = have
    return have


def _check_st(cfg: dict):
    if cfg.get("SPLIT_K", 1) < 1 or cfg.get("PREFETCH", 0) not in (0, 1):
        raise ValueError(f"moe gemv stationary config {cfg}: SPLIT_K >= 1 and PREFETCH 0 or 1")


def launch_mlp1_gemv_st(x, idx, w: MoEWeights, h, cfg, alpha, limit):
    _check_st(cfg)
    P, (T, D), I, split = idx.numel(), x.shape, w.intermediate, cfg.get("SPLIT_K", 1)
    tiles = triton.cdiv(I, cfg["BLOCK_N"])
    part = _buffer((P, split, 2, I), torch.float32, x.device) if split > 1 else h
    cnt = _counters(w, P * tiles, idx.shape[1], x.device) if split > 1 else idx
    grid = (P, tiles, split)
    _mlp1_gemv_st_kernel[grid](
        _split_pairs(x), D // 32, idx, w.w1, *_word_strides(w.w1, 3), w.s1, *w.s1.stride()[:3], w.b1,
        *w.b1.stride()[:2], h, I // 32, part, cnt, D // 32, I, idx.shape[1], alpha, limit,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_B=cfg["BLOCK_B"], SPLIT_K=split, X_BF16=x.dtype == torch.bfloat16,
        BIG_SCALES=w.big_scales, PREFETCH=int(cfg.get("PREFETCH", 0)), EARLY_STATIC=pdl.EARLY_STATIC,
        num_warps=cfg["num_warps"], **launch_options(x, grid))


def launch_mlp2_gemv_st(h, idx, ew, w: MoEWeights, y, out, cfg):
    """y (P, D) fp32 weighted rows, or with cfg FUSE_SUM the output (T, D) itself (y unused, may be None)."""
    _check_st(cfg)
    P, D, I, split = idx.numel(), w.hidden, w.intermediate, cfg.get("SPLIT_K", 1)
    fuse = bool(cfg.get("FUSE_SUM", False))
    tiles = triton.cdiv(D, cfg["BLOCK_N"])
    direct = split == 1 and not fuse
    part = h if direct else _buffer((P, split, D), torch.float32, h.device)
    cnt = idx if direct else _counters(w, (idx.shape[0] if fuse else P) * tiles, idx.shape[1], h.device)
    y = out if y is None else y
    grid = (P, tiles, split)
    _mlp2_gemv_st_kernel[grid](
        _split_pairs(h), I // 32, idx, ew, w.w2, *_word_strides(w.w2, 2), w.s2, *w.s2.stride()[:2], w.b2,
        w.b2.stride(0), y, D // 32, out, D // 32, part, cnt, I // 32, D, idx.shape[1],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_B=cfg["BLOCK_B"], SPLIT_K=split, FUSE_SUM=fuse,
        X_BF16=h.dtype == torch.bfloat16, BIG_SCALES=w.big_scales, PREFETCH=int(cfg.get("PREFETCH", 0)),
        num_warps=cfg["num_warps"], **launch_options(h, grid))


def launch_mlp1_gemv_any(x, idx, w: MoEWeights, h, cfg, alpha, limit):
    """mlp1 through the gemv kernels that ``cfg`` selects (:func:`gemv_family`); an "mma" config runs
    GEMV_PORTABLE's kernels where moe_mma.available() says it cannot run."""
    fam = gemv_family(cfg)
    if fam == "mma":
        if moe_mma.available(x, w.small_scales) is None:
            moe_mma.launch_mlp1_mma(x, idx, w, h, cfg, alpha, limit)
            return
        cfg = GEMV_PORTABLE["mlp1"]
        fam = gemv_family(cfg)
    (launch_mlp1_gemv_st if fam == "stationary" else launch_mlp1_gemv)(x, idx, w, h, cfg, alpha, limit)


def launch_mlp2_gemv_any(h, idx, ew, w: MoEWeights, y, out, cfg) -> bool:
    """mlp2 through the gemv kernels that ``cfg`` selects; True if they wrote ``out`` (FUSE_SUM), else the
    weighted rows ``y`` for :func:`launch_sum_slots`."""
    fam = gemv_family(cfg)
    if fam == "mma":
        if moe_mma.available(h, w.small_scales) is None:
            moe_mma.launch_mlp2_mma(h, idx, ew, w, y, cfg)
            return False
        cfg = GEMV_PORTABLE["mlp2"]
        fam = gemv_family(cfg)
    if fam == "base":
        launch_mlp2_gemv(h, idx, ew, w, y, cfg)
        return False
    launch_mlp2_gemv_st(h, idx, ew, w, y, out, cfg)
    return bool(cfg.get("FUSE_SUM", False))


def check_dot_config(cfg: dict, interpret: bool = _INTERPRET) -> bool:
    """The JOIN flag of a dot-kernel config, after checking what triton 3.6 compiles correctly: the joined lanes
    (tl.join + reshape) as the A operand of an MMAv2 product (BLOCK_N < 64, where wgmma does not apply) gave wrong
    results on the H200 (NOTES-moe.md); split lanes (JOIN=False, BLOCK_B >= 4) were right there."""
    join = cfg.get("JOIN", True)
    if join and cfg["BLOCK_N"] < 64 and not interpret:
        raise ValueError(f"moe dot config {cfg}: JOIN needs BLOCK_N >= 64 on GPUs (use JOIN=False, BLOCK_B >= 4)")
    if not join and cfg["BLOCK_B"] < 4:
        raise ValueError(f"moe dot config {cfg}: JOIN=False needs BLOCK_B >= 4 (tl.dot needs K >= 16)")
    return join


def _deq_bf16(cfg: dict, join: bool, x: torch.Tensor, w: MoEWeights) -> bool:
    # Whether the dot kernels decode straight into bf16 (_slot_bf16): bf16 activations, joined lanes (or SWAP),
    # scale bytes <= 128 (checked at load); config key DEQ_BF16 (default on) turns it off for comparisons.
    return bool(cfg.get("DEQ_BF16", True) and (join or cfg.get("SWAP", False)) and x.dtype == torch.bfloat16
                and w.small_scales)


def _swap(cfg: dict, join: bool, x: torch.Tensor, w: MoEWeights) -> bool:
    # Config key SWAP (with the bf16 decode only): the tokens are the product's A operand and the decoded weights
    # its B operand, which the compiler stages through shared memory, so that on Hopper the tensor-core products
    # read both operands from there and run asynchronously with the next step's decode.
    if cfg.get("SWAP", False) and join:
        raise ValueError(f"moe dot config {cfg}: SWAP needs JOIN=False")
    return bool(cfg.get("SWAP", False)) and _deq_bf16(cfg, join, x, w)


def launch_mlp1_dot(x, order, tiles, k, w: MoEWeights, h, block_t, cfg, alpha, limit):
    D, I, max_tiles = w.hidden, w.intermediate, tiles.shape[1]
    join = check_dot_config(cfg)
    _mlp1_dot_kernel[(max_tiles, triton.cdiv(I, cfg["BLOCK_N"]))](
        x if join else _pairs(x), D // 32, order, tiles, max_tiles, w.w1, *_word_strides(w.w1, 3), w.s1, *w.s1.stride()[:3], w.b1,
        *w.b1.stride()[:2], h, I // 32, D // 32, I, k, alpha, limit,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_T=block_t, BLOCK_B=cfg["BLOCK_B"], X_BF16=x.dtype == torch.bfloat16,
        DOT_F32=_INTERPRET or x.dtype != torch.bfloat16, BIG_SCALES=w.big_scales, JOIN=join,
        DEQ_BF16=_deq_bf16(cfg, join, x, w), SWAP=_swap(cfg, join, x, w), num_warps=cfg["num_warps"],
        num_stages=cfg.get("num_stages", 3), **launch_options(x))


def launch_mlp2_dot(h, order, tiles, ew, w: MoEWeights, y, block_t, cfg):
    D, I, max_tiles = w.hidden, w.intermediate, tiles.shape[1]
    join = check_dot_config(cfg)
    _mlp2_dot_kernel[(max_tiles, triton.cdiv(D, cfg["BLOCK_N"]))](
        h if join else _pairs(h), I // 32, order, tiles, max_tiles, ew, w.w2, *_word_strides(w.w2, 2), w.s2, *w.s2.stride()[:2], w.b2,
        w.b2.stride(0), y, D // 32, I // 32, D,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_T=block_t, BLOCK_B=cfg["BLOCK_B"], X_BF16=h.dtype == torch.bfloat16,
        DOT_F32=_INTERPRET or h.dtype != torch.bfloat16, BIG_SCALES=w.big_scales, JOIN=join,
        DEQ_BF16=_deq_bf16(cfg, join, h, w), SWAP=_swap(cfg, join, h, w), num_warps=cfg["num_warps"],
        num_stages=cfg.get("num_stages", 3), **launch_options(h))


def launch_sum_slots(y, out, k):
    T, D = out.shape
    block = min(1024, triton.next_power_of_2(D))
    _sum_slots_kernel[(T, triton.cdiv(D, block))](y, D // 32, out, D // 32, D, TOP_K=k, BLOCK_N=block, num_warps=4,
        **launch_options(y))


def moe_mxfp4(x, expert_weights, expert_indices, w: MoEWeights, swiglu_alpha: float, swiglu_limit: float,
              *, path: str | None = None, config: dict | None = None, out: torch.Tensor | None = None):
    """Mixture of the chosen MXFP4 experts: (T, D) → (T, D) in x.dtype = Σ_k w_tk · mlp2_e(SwiGLU(mlp1_e(x_t))).

    x (T, D) bfloat16 or float32; expert_weights (T, k) (x's dtype or float32); expert_indices (T, k) int64 in
    [0, E). No host synchronisation; every grid depends only on T, k, E and the weights' shapes. ``path``
    ("gemv", "dot", "prefill", "prefill_dequant": moe_prefill.py) and ``config`` override the choice from T
    (tests, benchmarks); ``out`` may be given (T, D) in x.dtype.
    """
    T, D = x.shape
    k = expert_indices.shape[1]
    if D != w.hidden or expert_indices.shape[0] != T or expert_weights.shape != expert_indices.shape:
        raise ValueError(f"moe_mxfp4: x {tuple(x.shape)}, weights {tuple(expert_weights.shape)}, indices "
                         f"{tuple(expert_indices.shape)} for experts of hidden size {w.hidden}")
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise NotSupported("triton", f"MoE activations in {x.dtype} (bfloat16 or float32)")
    x = x.contiguous()
    idx = expert_indices.contiguous()
    ew = expert_weights.contiguous()
    if out is None:
        out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    elif out.shape != (T, D) or out.dtype != x.dtype or out.stride() != (D, 1):
        raise ValueError(f"moe_mxfp4: out must be a contiguous ({T}, {D}) {x.dtype} tensor")
    if T == 0:
        return out
    path = path or choose_path(T, k, w.num_experts)
    if path == "prefill_dequant" and x.dtype != torch.bfloat16:
        path = "prefill"  # the workspace GEMMs are bf16 tensor-core products; fp32 stays on the in-register path
    if path == "prefill_dequant":
        from .moe_prefill import moe_prefill_dequant  # imports this module: not at the top

        return moe_prefill_dequant(x, ew, idx, w, swiglu_alpha, swiglu_limit, config=config, out=out)
    cfg = config or CONFIGS[path]
    if path not in ("gemv", "dot", "prefill"):
        raise ValueError(f"moe_mxfp4: unknown path {path!r}")
    h = _buffer((T * k, w.intermediate), x.dtype, x.device)  # SwiGLU(mlp1) per pair, in x's dtype
    fused = (path == "gemv" and gemv_family(cfg["mlp2"]) != "base" and bool(cfg["mlp2"].get("FUSE_SUM", False)))
    y = None if fused else _buffer((T * k, D), torch.float32, x.device)  # weighted mlp2 rows per pair
    if path == "gemv":
        launch_mlp1_gemv_any(x, idx, w, h, cfg["mlp1"], swiglu_alpha, swiglu_limit)
        if launch_mlp2_gemv_any(h, idx, ew, w, y, out, cfg["mlp2"]):  # the token's last mlp2 program wrote out
            return out
    else:
        order, tiles = moe_routing(idx, w.num_experts, cfg["BLOCK_T"])
        launch_mlp1_dot(x, order, tiles, k, w, h, cfg["BLOCK_T"], cfg["mlp1"], swiglu_alpha, swiglu_limit)
        launch_mlp2_dot(h, order, tiles, ew, w, y, cfg["BLOCK_T"], cfg["mlp2"])
    launch_sum_slots(y, out, k)
    return out
