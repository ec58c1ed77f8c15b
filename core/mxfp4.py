"""MXFP4, the OCP Microscaling v1.0 FP4 format of the gpt-oss expert weights: the one spec in mxmoe.

A block is 32 values that share one power-of-two scale; it is stored as 16 bytes of elements plus
one scale byte.

* Element: E2M1, 4 bits ``s ee m`` (bit 3 sign, bits 2-1 exponent with bias 1, bit 0 mantissa).
  ``ee = 0`` is subnormal: ``(-1)^s * m * 0.5``; otherwise ``(-1)^s * 2^(ee-1) * (1 + m/2)``.
  Magnitudes are {0, 0.5, 1, 1.5, 2, 3, 4, 6}; there is no Inf or NaN, and -0 exists (code 8).
* Scale: E8M0, an unsigned biased exponent ``2^(byte - 127)``, byte 0..254 (2^-127 .. 2^127);
  0xFF is NaN and makes the whole block NaN. There is no zero and no sign.
* Packing: element 2i of a block sits in the LOW nibble of byte i, element 2i+1 in the high
  nibble (``byte = code[2i] | code[2i+1] << 4``). Blocks run along the last (input, K) axis, so
  a (N, K) weight is stored as blocks (N, K/32, 16) uint8 and scales (N, K/32) uint8.
* Value of element j of a block: ``E2M1(code_j) * 2^(scale - 127)``.

Every element times every scale has at most two significant bits and an exponent in
[-128, 129]; float32 and bfloat16 (same 8-bit exponent, subnormals down to 2^-149 / 2^-133)
hold all of them exactly except the ones >= 2^128, which overflow to +-inf (only scales 253 and
254 can produce those: 4 * 2^126, 2 * 2^127, ...). ``dequantize`` is therefore bit-exact.
"""

from __future__ import annotations

import math

import torch

VALUES_PER_BLOCK = 32  # E2M1 values sharing one E8M0 scale
BYTES_PER_BLOCK = 16  # 32 FP4 values, two per byte, low nibble first
SCALE_BIAS = 127  # E8M0 exponent bias
SCALE_NAN = 0xFF  # E8M0 encoding of NaN
SCALE_EXP_MIN = -SCALE_BIAS  # byte 0 -> 2^-127
SCALE_EXP_MAX = 0xFE - SCALE_BIAS  # byte 254 -> 2^127
E2M1_EMAX = 2  # exponent of the largest E2M1 binade: 6 = 1.5 * 2^2 (emax_elem in the OCP spec)
E2M1_MAX = 6.0  # largest E2M1 magnitude; quantize saturates here

# Index = 4-bit code. Bit 3 is the sign, so the second half mirrors the first (with -0.0).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Dtypes that hold every E2M1 value and every E8M0 power of two exactly, so dequantize can work in
# them directly; any other dtype (float16: 2^127 overflows it) goes through float32 and one rounding.
_EXACT_DTYPES = (torch.bfloat16, torch.float32, torch.float64)
# Integer dtype as wide as two values: lets one gather move a byte's two decoded values at once.
_PAIR_INT = {2: torch.int32, 4: torch.int64}

_tables: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _dequant_tables(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(byte -> its two values, scale byte -> 2^(byte-127) or NaN), cached per dtype and device.

    Built from Python floats (exact) and cached so that dequantize does no host-to-device copy
    after the first call (which keeps it usable inside CUDA-graph capture).
    """
    key = (dtype, device)
    if key not in _tables:
        lo = [E2M1_VALUES[b & 0xF] for b in range(256)]
        hi = [E2M1_VALUES[b >> 4] for b in range(256)]
        pairs = torch.tensor(list(zip(lo, hi)), dtype=torch.float64).to(dtype)  # (256, 2), exact
        if dtype.itemsize in _PAIR_INT:
            # (256,) integers whose bytes are the two values in element order: a 1-D gather of
            # these is several times faster than gathering (256, 2) rows.
            pairs = pairs.view(_PAIR_INT[dtype.itemsize]).reshape(256)
        # math.ldexp is exact; float64 -> float32/bf16 keeps every power of two in [2^-127, 2^127]
        # (2^-127 is a subnormal in both).
        powers = [math.ldexp(1.0, s - SCALE_BIAS) for s in range(SCALE_NAN)] + [math.nan]
        scales = torch.tensor(powers, dtype=torch.float64).to(dtype)
        _tables[key] = (pairs.to(device), scales.to(device))
    return _tables[key]


def _as_scale_bytes(scales: torch.Tensor) -> torch.Tensor:
    # torch's float8_e8m0fnu has the same bits as the uint8 checkpoint scales.
    if scales.dtype != torch.uint8 and scales.dtype.itemsize == 1 and "e8m0" in str(scales.dtype):
        return scales.view(torch.uint8)
    return scales


def unpack(blocks: torch.Tensor) -> torch.Tensor:
    """Split packed bytes into 4-bit codes: (..., nb, 16) uint8 -> (..., nb*32) uint8 in 0..15.

    Low nibble first: byte i of a block holds element 2i in ``b & 0xF`` and 2i+1 in ``b >> 4``.
    """
    _check_blocks(blocks)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1)  # (..., nb, 16, 2)
    return codes.reshape(*blocks.shape[:-2], blocks.shape[-2] * VALUES_PER_BLOCK)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack`: (..., K) uint8 codes, K a multiple of 32 -> (..., K/32, 16) uint8.

    Only the low 4 bits of each code are stored.
    """
    if codes.dtype != torch.uint8:
        raise ValueError(f"pack: codes must be uint8, got {codes.dtype}")
    if codes.dim() < 1 or codes.shape[-1] % VALUES_PER_BLOCK:
        raise ValueError(f"pack: last dim of codes {tuple(codes.shape)} must be a multiple of {VALUES_PER_BLOCK}")
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // VALUES_PER_BLOCK, BYTES_PER_BLOCK, 2)
    return (pairs[..., 0] & 0x0F) | (pairs[..., 1] << 4)  # uint8 shift drops the code's high bits


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MXFP4 -> dense: blocks (..., nb, 16) uint8 and scales (..., nb) uint8 -> (..., nb*32) ``dtype``.

    Exact for bfloat16, float32 and float64: each result is the IEEE value of the exact product
    ``E2M1(code) * 2^(scale-127)``. Scale 0xFF gives NaN for the whole block. In bfloat16/float32
    the products >= 2^128 (codes +-2..6 at scale 254, +-4 and +-6 at scale 253) overflow to +-inf,
    as IEEE rounding says; float64 holds them. Other dtypes (float16) get the float32 result
    rounded once. Scales may also be ``torch.float8_e8m0fnu`` (same bits).

    Memory: at peak, the output plus a temporary int32 copy of the block bytes (4 bytes per byte:
    as large as the output in bf16, half of it in float32); float16 also briefly holds the float32
    result (twice its output) while rounding it.
    """
    _check_blocks(blocks)
    scales = _as_scale_bytes(scales)
    if scales.dtype != torch.uint8 or scales.shape != blocks.shape[:-1]:
        raise ValueError(
            f"dequantize: scales must be uint8 of shape blocks.shape[:-1] = {tuple(blocks.shape[:-1])}, "
            f"got {scales.dtype} {tuple(scales.shape)}"
        )
    if scales.device != blocks.device:
        raise ValueError(f"dequantize: blocks on {blocks.device} but scales on {scales.device}")
    compute = dtype if dtype in _EXACT_DTYPES else torch.float32
    pairs, powers = _dequant_tables(compute, blocks.device)
    lead, nb = blocks.shape[:-2], blocks.shape[-2]

    # int32 indices: index_select takes them, and they are half the size of int64.
    out = pairs.index_select(0, blocks.reshape(-1).to(torch.int32))
    out = out.view(compute) if out.dim() == 1 else out  # the int pairs back to values, in order
    out = out.view(*lead, nb, VALUES_PER_BLOCK)
    # A multiply by an exact power of two is exact (or +-inf, or NaN for scale 0xFF): no ldexp or
    # pow, whose internals could round or overflow, and no float64 intermediates.
    out.mul_(powers.index_select(0, scales.reshape(-1).to(torch.int32)).view(*lead, nb, 1))
    out = out.view(*lead, nb * VALUES_PER_BLOCK)
    return out if compute == dtype else out.to(dtype)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense -> MXFP4 by the OCP MX v1.0 rules: x (..., K), K a multiple of 32 -> (blocks, scales).

    Per block of 32 along the last axis:

    * shared exponent ``floor(log2(max|x|)) - 2`` (2 = emax of E2M1), clamped to [-127, 127];
      unclamped, the largest magnitude lands in [4, 8) before rounding, the top binade of E2M1
      (values above 6 saturate to 6);
    * each element ``x / 2^shared`` rounds to the nearest E2M1 value, ties to the even code
      (mantissa bit 0), saturating at +-6; the sign is kept, so -0.0 and small negatives give -0;
    * an all-zero block gets the smallest scale, byte 0 (2^-127): what the exponent rule gives in
      the limit max -> 0, and the choice that keeps quantize(dequantize(quantize(x))) ==
      quantize(x) when a tiny block rounds to all zeros;
    * a block holding a NaN gets scale 0xFF and all codes 0;
    * a block holding +-inf also gets scale 0xFF and all codes 0. The spec leaves Inf to the
      element format; E2M1 has no Inf, and no finite scale is large enough, so the only encoding
      that does not silently turn inf into a finite 6 * 2^e is the NaN scale (read as: the
      shared exponent of an infinite max overflows E8M0).

    Finite float32/bf16 input never needs scale > 252, so its dequantization never overflows.
    """
    if not x.is_floating_point():
        raise ValueError(f"quantize: x must be a floating tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % VALUES_PER_BLOCK:
        raise ValueError(f"quantize: last dim of x {tuple(x.shape)} must be a multiple of {VALUES_PER_BLOCK}")
    # float32 holds every bf16/fp16 value exactly; float64 input stays float64.
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    lead, nb = x.shape[:-1], x.shape[-1] // VALUES_PER_BLOCK
    xb = x.to(work).reshape(*lead, nb, VALUES_PER_BLOCK)

    amax = xb.abs().amax(dim=-1)  # (..., nb); NaN if the block has a NaN, inf if it has an inf
    special = ~torch.isfinite(amax)
    # frexp: amax = m * 2^e with m in [0.5, 1), so floor(log2(amax)) = e - 1, exactly (subnormals too).
    shared = torch.frexp(amax).exponent - 1 - E2M1_EMAX
    shared = torch.where(amax > 0, shared, SCALE_EXP_MIN).clamp_(SCALE_EXP_MIN, SCALE_EXP_MAX)
    shared = shared.masked_fill_(special, 0)  # any finite placeholder; the codes are zeroed below

    # x / 2^shared as a multiply by the exact power 2^-shared (both in [2^-127, 2^127]): exact
    # except where the quotient underflows, far below 0.25, where it rounds to 0 either way.
    _, powers = _dequant_tables(work, x.device)
    inv_scale = powers.index_select(0, (SCALE_BIAS - shared).reshape(-1).to(torch.int32)).view(*lead, nb, 1)
    a = xb.abs().mul_(inv_scale).masked_fill_(special.unsqueeze(-1), 0)  # no NaN/inf past here

    # Round to the E2M1 grid: its step is 2^(E-1) with E = clamp(floor(log2 a), 0, 2) (0.5 below 2,
    # 1 in [2, 4), 2 from 4 up). a / step is exact, and torch.round is half-to-even, which here is
    # the even code: the multiple a / step and the code have the same parity, the mantissa bit.
    binade = (torch.frexp(a).exponent - 1).clamp_(0, E2M1_EMAX)
    step = powers.index_select(0, (binade + SCALE_BIAS - 1).reshape(-1).to(torch.int32)).view(a.shape)
    q = torch.round(a / step).mul_(step).clamp_(max=E2M1_MAX)
    # Magnitude -> code: twice the value is an integer in {0, 1, 2, 3, 4, 6, 8, 12}.
    twice_to_code = torch.tensor([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], dtype=torch.uint8, device=x.device)
    codes = twice_to_code.index_select(0, (q * 2).reshape(-1).to(torch.int32)).view(a.shape)
    codes |= torch.signbit(xb).to(torch.uint8) << 3
    codes.masked_fill_(special.unsqueeze(-1), 0)

    scales = (shared + SCALE_BIAS).to(torch.uint8).masked_fill_(special, SCALE_NAN)
    return pack(codes.reshape(*lead, nb * VALUES_PER_BLOCK)), scales


def _check_blocks(blocks: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or blocks.dim() < 2 or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(
            f"MXFP4 blocks must be uint8 of shape (..., nblocks, {BYTES_PER_BLOCK}), "
            f"got {blocks.dtype} {tuple(blocks.shape)}"
        )
