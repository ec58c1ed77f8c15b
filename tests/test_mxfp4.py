"""MXFP4 format: mxmoe.core.mxfp4 checked against oracles written here from the OCP MX v1.0 rules.

The oracles use Python ints, math.ldexp and exact Fractions only, never the module's tables.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxmoe.core import mxfp4

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EXTREME_SCALES = [0, 1, 2, 64, 125, 126, 127, 128, 129, 200, 251, 252, 253, 254, 255]


# ---------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------


def e2m1_decode(code: int) -> float:
    """E2M1 from its bits: s ee m, exponent bias 1, ee == 0 subnormal."""
    sign = -1.0 if code & 0b1000 else 1.0
    exp = (code >> 1) & 0b11
    man = code & 0b1
    mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2)
    return math.copysign(mag, sign)


def oracle_dequantize(block_bytes: list[int], scale: int) -> list[float]:
    """One block (16 byte ints, one scale int) -> 32 float64 values, exact."""
    codes = []
    for byte in block_bytes:
        codes += [byte & 0xF, byte >> 4]  # low nibble is the earlier element
    if scale == 0xFF:
        return [math.nan] * 32
    return [math.ldexp(e2m1_decode(c), scale - 127) for c in codes]


GRID = [Fraction(e2m1_decode(c)) for c in range(8)]  # magnitudes, index = code


def oracle_quantize_block(vals: list[float]) -> tuple[int, list[int]]:
    """OCP MX v1.0 with the module's documented choices for zero / NaN / inf blocks."""
    if any(math.isnan(v) or math.isinf(v) for v in vals):
        return 0xFF, [0] * 32
    amax = max(abs(v) for v in vals)
    if amax == 0:
        shared = -127
    else:
        shared = _floor_log2(Fraction(amax))
        shared = min(max(shared - 2, -127), 127)
    scale = Fraction(2) ** shared
    codes = []
    for v in vals:
        a = Fraction(abs(v)) / scale
        # nearest grid point; ties to the even code (mantissa bit 0); beyond 6 nearest is 6
        best = min(range(8), key=lambda c: (abs(GRID[c] - a), c & 1))
        codes.append(best | (8 if math.copysign(1.0, v) < 0 else 0))
    return shared + 127, codes


def _floor_log2(q: Fraction) -> int:
    e = q.numerator.bit_length() - q.denominator.bit_length()
    while Fraction(2) ** e > q:
        e -= 1
    while Fraction(2) ** (e + 1) <= q:
        e += 1
    return e


def bits_equal(got: torch.Tensor, want: list[float]) -> None:
    """got (any float dtype) equals the float64 list exactly, incl. the sign of zero and NaN places."""
    g = got.double().flatten().tolist()
    assert len(g) == len(want)
    for i, (a, b) in enumerate(zip(g, want)):
        if math.isnan(b):
            assert math.isnan(a), (i, a, b)
        else:
            assert a == b and math.copysign(1, a) == math.copysign(1, b), (i, a, b)


def expected_in(dtype: torch.dtype, want: list[float]) -> list[float]:
    """float32/bf16 have the same exponent range: exact products below 2^128, +-inf from there."""
    if dtype == torch.float64:
        return want
    return [math.copysign(math.inf, v) if abs(v) >= 2.0**128 else v for v in want]


# ---------------------------------------------------------------------------------------------
# Constants and packing
# ---------------------------------------------------------------------------------------------


def test_constants_match_the_bits():
    assert mxfp4.VALUES_PER_BLOCK == 32 and mxfp4.BYTES_PER_BLOCK == 16
    assert mxfp4.SCALE_BIAS == 127 and mxfp4.SCALE_NAN == 0xFF
    for code in range(16):
        want = e2m1_decode(code)
        got = mxfp4.E2M1_VALUES[code]
        assert got == want and math.copysign(1, got) == math.copysign(1, want), code


def test_low_nibble_first_by_hand():
    codes = torch.zeros(32, dtype=torch.uint8)
    codes[0], codes[1] = 0x3, 0xA  # element 0 = +1.5, element 1 = -1.0
    codes[31] = 0x7  # element 31 = +6 -> high nibble of byte 15
    blocks = mxfp4.pack(codes)
    assert blocks.shape == (1, 16)
    assert blocks[0, 0].item() == 0xA3
    assert blocks[0, 15].item() == 0x70
    assert blocks[0, 1:15].eq(0).all()
    assert mxfp4.unpack(torch.tensor([[0xA3] + [0] * 15], dtype=torch.uint8))[:2].tolist() == [3, 10]
    vals = mxfp4.dequantize(blocks, torch.tensor([127], dtype=torch.uint8), torch.float32)
    assert vals[:2].tolist() == [1.5, -1.0] and vals[31].item() == 6.0


@SETTINGS
@given(shape=st.lists(st.integers(1, 3), min_size=0, max_size=2), nb=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip(shape, nb, seed):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, nb, 16), dtype=torch.uint8, generator=g)
    codes = mxfp4.unpack(blocks)
    assert codes.shape == (*shape, nb * 32) and codes.dtype == torch.uint8
    assert int(codes.max()) < 16
    assert torch.equal(mxfp4.pack(codes), blocks)
    # and against the oracle's nibble order, element by element
    flat_b = blocks.reshape(-1, 16).tolist()
    flat_c = codes.reshape(-1, 32).tolist()
    for bb, cc in zip(flat_b, flat_c):
        assert cc == [n for b in bb for n in (b & 0xF, b >> 4)]
    codes2 = torch.randint(0, 16, (*shape, nb * 32), dtype=torch.uint8, generator=g)
    assert torch.equal(mxfp4.unpack(mxfp4.pack(codes2)), codes2)


# ---------------------------------------------------------------------------------------------
# Dequantize: bit-exact against the oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_dequantize_exhaustive_every_byte_at_every_scale(dtype, device):
    # blocks[s, j] holds bytes 16j .. 16j+15, all with scale s: 256 x 256 (byte, scale) pairs.
    blocks = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(1, 16, 16).expand(256, 16, 16)
    scales = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(256, 1).expand(256, 16)
    got = mxfp4.dequantize(blocks.to(device), scales.to(device), dtype)
    assert got.dtype == dtype and got.shape == (256, 16 * 32)
    want = []
    for s in range(256):
        for j in range(16):
            want += oracle_dequantize(list(range(16 * j, 16 * j + 16)), s)
    bits_equal(got.cpu(), expected_in(dtype, want))


@SETTINGS
@given(
    data=st.data(),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    nb=st.integers(1, 4),
    dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float64]),
)
def test_dequantize_random_blocks(data, lead, nb, dtype):
    n = math.prod(lead) * nb
    byte_lists = data.draw(st.lists(st.lists(st.integers(0, 255), min_size=16, max_size=16), min_size=n, max_size=n))
    scale = st.one_of(st.sampled_from(EXTREME_SCALES), st.integers(0, 255))
    scale_list = data.draw(st.lists(scale, min_size=n, max_size=n))
    blocks = torch.tensor(byte_lists, dtype=torch.uint8).reshape(*lead, nb, 16)
    scales = torch.tensor(scale_list, dtype=torch.uint8).reshape(*lead, nb)
    got = mxfp4.dequantize(blocks, scales, dtype)
    assert got.shape == (*lead, nb * 32)
    want = [v for bb, s in zip(byte_lists, scale_list) for v in oracle_dequantize(bb, s)]
    bits_equal(got, expected_in(dtype, want))


def test_dequantize_extreme_scales():
    six = torch.full((1, 16), 0x77, dtype=torch.uint8)  # all +6
    half = torch.full((1, 16), 0x91, dtype=torch.uint8)  # +0.5, -0.5
    s = lambda v: torch.tensor([v], dtype=torch.uint8)  # noqa: E731
    # scale 0 = 2^-127 (a subnormal in float32 and bf16): smallest product 0.5 * 2^-127 = 2^-128, exact
    assert mxfp4.dequantize(half, s(0), torch.float32)[:2].tolist() == [2.0**-128, -(2.0**-128)]
    assert mxfp4.dequantize(half, s(0), torch.bfloat16).double()[:2].tolist() == [2.0**-128, -(2.0**-128)]
    # scale 252: 6 * 2^125 = 1.5 * 2^127 is the largest finite product
    assert mxfp4.dequantize(six, s(252), torch.bfloat16)[0].item() == 1.5 * 2.0**127
    # scale 254 = 2^127: 6 * 2^127 overflows float32 and bf16 to inf; 0.5 * 2^127 does not; float64 holds all
    assert mxfp4.dequantize(six, s(254), torch.float32).isposinf().all()
    assert mxfp4.dequantize(six, s(254), torch.bfloat16).isposinf().all()
    assert mxfp4.dequantize(six, s(254), torch.float64)[0].item() == 6 * 2.0**127
    assert mxfp4.dequantize(half, s(254), torch.float32)[:2].tolist() == [2.0**126, -(2.0**126)]
    # 0xFF: NaN for the whole block whatever the codes, including code 0
    assert mxfp4.dequantize(torch.zeros(1, 16, dtype=torch.uint8), s(255), torch.bfloat16).isnan().all()


def test_dequantize_float16_is_float32_rounded_once():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (64, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 256, (64,), dtype=torch.uint8, generator=g)
    got = mxfp4.dequantize(blocks, scales, torch.float16)
    # The independent oracle's exact values, rounded once to float16 (float64 holds every product, and
    # what overflows float32 overflows float16 too, so this is also "float32 rounded once").
    exact = [v for bb, s in zip(blocks.tolist(), scales.tolist()) for v in oracle_dequantize(bb, s)]
    want = torch.tensor(exact, dtype=torch.float64).to(torch.float16)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="torch has no float8_e8m0fnu")
def test_dequantize_accepts_e8m0_scales():
    blocks = torch.full((2, 16), 0x32, dtype=torch.uint8)
    scales = torch.tensor([120, 255], dtype=torch.uint8)
    assert torch.equal(
        mxfp4.dequantize(blocks, scales.view(torch.float8_e8m0fnu)).nan_to_num(),
        mxfp4.dequantize(blocks, scales).nan_to_num(),
    )


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="blocks"):
        mxfp4.dequantize(torch.zeros(2, 15, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scales"):
        mxfp4.dequantize(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(torch.zeros(2, 48))
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.pack(torch.zeros(2, 48, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------
# Quantize
# ---------------------------------------------------------------------------------------------

# Grid points and their midpoints (the ties) at scale 1, with a hair either side.
_SPECIAL_MAGS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 7.99]


@st.composite
def blocks_of_floats(draw, dtype=torch.float32):
    """(rows, nb*32) floats: per block a random binade, mixing ties, grid points, zeros and noise."""
    rows, nb = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    lo, hi = (-150, 124) if dtype == torch.float32 else (-1100, 1000)  # 8 * 2^124 < float32 max
    element = st.one_of(
        st.floats(-8, 8, width=32),
        st.sampled_from(_SPECIAL_MAGS).flatmap(lambda m: st.sampled_from([m, -m, m * (1 + 2**-20), m * (1 - 2**-20)])),
        st.just(0.0),
        st.just(-0.0),
    )
    vals = []
    for _ in range(rows * nb):
        e = draw(st.integers(lo, hi))
        vals += [math.ldexp(v, e) for v in draw(st.lists(element, min_size=32, max_size=32))]
    return torch.tensor(vals, dtype=torch.float64).to(dtype).reshape(rows, nb * 32)


def check_against_oracle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks, scales = mxfp4.quantize(x)
    assert blocks.shape == (*x.shape[:-1], x.shape[-1] // 32, 16) and blocks.dtype == torch.uint8
    assert scales.shape == (*x.shape[:-1], x.shape[-1] // 32) and scales.dtype == torch.uint8
    codes = mxfp4.unpack(blocks).reshape(-1, 32).tolist()
    for i, (row, s) in enumerate(zip(x.double().reshape(-1, 32).tolist(), scales.reshape(-1).tolist())):
        want_s, want_c = oracle_quantize_block(row)
        assert (s, codes[i]) == (want_s, want_c), (i, row)
    return blocks, scales


@SETTINGS
@given(x=blocks_of_floats())
def test_quantize_matches_oracle_float32(x):
    check_against_oracle(x)
    check_against_oracle(x.to(torch.bfloat16))


@SETTINGS
@given(x=blocks_of_floats(torch.float64))
def test_quantize_matches_oracle_float64(x):
    check_against_oracle(x)


def _block(vals: list[float], dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(vals + [0.0] * (32 - len(vals)), dtype=dtype)


def test_round_half_to_even_at_scale_one():
    # 6 pins the shared exponent to 0 (scale byte 127); grid 0, .5, 1, 1.5, 2, 3, 4, 6
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # the neighbour with mantissa bit 0
    for sign in (1.0, -1.0):
        for e in (0, -100, 100):  # same codes in any binade, the scale moves with it
            x = _block([6.0 * 2.0**e] + [sign * t * 2.0**e for t in ties])
            blocks, scales = mxfp4.quantize(x)
            assert scales.item() == 127 + e
            got = mxfp4.dequantize(blocks, scales, torch.float64)[1:8] / 2.0**e
            assert got.tolist() == [sign * w for w in want]
    # just past a tie goes the other way
    x = _block([6.0, 0.2500001, 2.5000002, 5.0000005])
    assert mxfp4.dequantize(*mxfp4.quantize(x), torch.float32)[1:4].tolist() == [0.5, 3.0, 6.0]


def test_saturation_and_shared_exponent():
    # max in [4, 8) before rounding: 7.9 rounds past 6 and saturates, scale stays 2^0
    blocks, scales = mxfp4.quantize(_block([7.9, -7.0, 5.9]))
    assert scales.item() == 127
    assert mxfp4.unpack(blocks)[:3].tolist() == [7, 15, 7]
    # 8 moves to the next scale: 8 = 4 * 2^1
    blocks, scales = mxfp4.quantize(_block([8.0, 1.0]))
    assert scales.item() == 128 and mxfp4.unpack(blocks)[:2].tolist() == [6, 1]  # 1 = 0.5 * 2^1
    # float64 beyond the E8M0 range clamps at scale 254 (2^127) and saturates at +-6
    blocks, scales = mxfp4.quantize(_block([2.0**200, -(2.0**131), 2.0**128], torch.float64))
    assert scales.item() == 254
    assert mxfp4.unpack(blocks)[:3].tolist() == [7, 15, 4]  # 2^128 = 2 * 2^127
    # tiny float64 clamps at scale 0 (2^-127): what does not reach 0.25 * 2^-127 becomes 0
    blocks, scales = mxfp4.quantize(_block([2.0**-130, 2.0**-128, -(2.0**-126)], torch.float64))
    assert scales.item() == 0
    assert mxfp4.unpack(blocks)[:3].tolist() == [0, 1, 12]
    # float32 max -> scale 252, and it dequantizes without overflow
    fmax = torch.finfo(torch.float32).max
    blocks, scales = mxfp4.quantize(_block([fmax, -fmax]))
    assert scales.item() == 252
    assert mxfp4.dequantize(blocks, scales, torch.float32)[:2].tolist() == [1.5 * 2.0**127, -1.5 * 2.0**127]


def test_zero_nan_inf_blocks():
    x = torch.stack([
        _block([]),  # all +0
        _block([-0.0, 0.0, -0.0]),
        _block([1.0, math.nan]),
        _block([1.0, math.inf]),
        _block([-math.inf]),
        _block([3.0]),
    ]).reshape(-1)
    blocks, scales = mxfp4.quantize(x)
    assert scales.tolist() == [0, 0, 255, 255, 255, 127 - 1]
    codes = mxfp4.unpack(blocks).reshape(6, 32)
    assert codes[0].eq(0).all() and codes[1, :3].tolist() == [8, 0, 8]
    assert codes[2:5].eq(0).all()  # NaN-scale blocks carry code 0 everywhere
    assert codes[5, 0].item() == 7  # 3 = 6 * 2^-1
    out = mxfp4.dequantize(blocks, scales, torch.float32).reshape(6, 32)
    assert out[2:5].isnan().all() and not out[[0, 1, 5]].isnan().any()


@SETTINGS
@given(x=blocks_of_floats())
def test_error_bound_and_shared_exponent_rule(x):
    blocks, scales = mxfp4.quantize(x)
    y = mxfp4.dequantize(blocks, scales, torch.float64)
    rows, outs = x.double().reshape(-1, 32).tolist(), y.reshape(-1, 32).tolist()
    for row, out, s in zip(rows, outs, scales.reshape(-1).tolist()):
        scale = Fraction(2) ** (s - 127)
        amax = max(abs(v) for v in row)
        if amax == 0:
            assert s == 0
            continue
        if s > 0:  # not clamped: the largest element lands in [4, 8) of the element grid
            assert 4 <= Fraction(amax) / scale < 8
        for v, q in zip(row, out):
            a = Fraction(abs(v)) / scale
            ulp = Fraction(1, 2) if a < 2 else (Fraction(1) if a < 4 else Fraction(2))
            err = abs(Fraction(q) - Fraction(v)) / scale
            if a <= 7:
                assert err <= ulp / 2, (v, q, s)
            else:  # saturated
                assert abs(Fraction(q)) / scale == 6


@pytest.mark.parametrize("device", DEVICES)
def test_representable_values_round_trip(device):
    g = torch.Generator().manual_seed(1)
    n = 512
    codes = torch.randint(0, 16, (n, 32), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 253, (n,), dtype=torch.uint8, generator=g)  # 253/254 may overflow float32
    # half the blocks carry a +-4 or +-6, which pins the scale: there the bytes round-trip too
    pin = torch.tensor([6, 7, 14, 15], dtype=torch.uint8)[torch.randint(0, 4, (n // 2,), generator=g)]
    codes[: n // 2, 0] = pin
    blocks = mxfp4.pack(codes.reshape(-1)).reshape(n, 16)
    x = mxfp4.dequantize(blocks.to(device), scales.to(device), torch.float32)
    b2, s2 = mxfp4.quantize(x)
    # values with at most two significant bits stay on the grid at the (possibly smaller) new scale
    assert torch.equal(mxfp4.dequantize(b2, s2, torch.float32).view(torch.int32), x.view(torch.int32))
    assert torch.equal(b2[: n // 2].cpu(), blocks[: n // 2]) and torch.equal(s2[: n // 2].cpu(), scales[: n // 2])


@SETTINGS
@given(
    x=st.one_of(blocks_of_floats(), blocks_of_floats(torch.float64)),
    out=st.sampled_from([torch.bfloat16, torch.float32]),
)
def test_quantize_dequantize_quantize_is_idempotent(x, out):
    b1, s1 = mxfp4.quantize(x)
    # float64 input may use scales 253/254, whose products overflow float32/bf16: decode those in float64
    dtype = torch.float64 if x.dtype == torch.float64 else out
    b2, s2 = mxfp4.quantize(mxfp4.dequantize(b1, s1, dtype))
    assert torch.equal(s1, s2) and torch.equal(b1, b2)


@pytest.mark.parametrize("device", DEVICES)
def test_large_expert_matches_per_block_oracle_sample(device):
    # a gpt-oss-20b mlp1 expert shape, checked on a random sample of blocks (speed)
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (5760, 90, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 140, (5760, 90), dtype=torch.uint8, generator=g)
    out = mxfp4.dequantize(blocks.to(device), scales.to(device)).cpu()
    assert out.shape == (5760, 2880) and out.dtype == torch.bfloat16
    for _ in range(50):
        r, b = torch.randint(0, 5760, (1,), generator=g).item(), torch.randint(0, 90, (1,), generator=g).item()
        bits_equal(out[r, b * 32 : (b + 1) * 32], oracle_dequantize(blocks[r, b].tolist(), scales[r, b].item()))
