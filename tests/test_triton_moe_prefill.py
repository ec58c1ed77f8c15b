"""The dequantize-then-GEMM MoE prefill path (backends/triton_engine/moe_prefill.py).

Oracles: the ``torch`` engine's experts op in float64 on the same canonical MXFP4 weights (with the error bound
of tests/test_triton_moe.py: the path rounds SwiGLU(h) to bf16 where it stores it and the output once; every sum
is fp32), ``moe.moe_mxfp4_ref`` (the kernels' plain-PyTorch spec) and, for the dequantization kernel,
``moe.dequantize_words`` bit for bit. On a CPU the kernels run in the Triton interpreter (tests/conftest.py),
so shapes are small and tiles tiny (tails in every dimension: T, N and K not multiples of the blocks).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the triton engine's kernels need the triton package")

from mxmoe.backends.reference import TorchBackend  # noqa: E402
from mxmoe.backends.triton_engine import moe, moe_prefill as mp  # noqa: E402
from mxmoe.core import mxfp4  # noqa: E402
from mxmoe.core.weights import ExpertLinear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALPHA, LIMIT = 1.702, 7.0
U_BF16 = 2.0 ** -8
# Tiny tiles, rows in tiles of 16 pairs. SMALL: K steps of 32 (no K tail); TAILS and UNFUSED: K steps of 64, so
# K = 96 or 160 ends in a masked half step, and N tiles (64 SwiGLU outputs or 64 mlp2 outputs) that do not divide
# I = 96 or D = 160. Dequant steps of 32 rows x 4 blocks (a block tail at K = 96 or 160) over 64-row programs (the
# interpreter's cost is per step; test_dequant_* covers row tails and smaller steps).
SMALL = dict(BLOCK_M=16, dequant=dict(BLOCK_R=32, BLOCK_B=4, ROWS=64, num_warps=4),
             mlp1=dict(BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2, FUSED=True),
             mlp2=dict(BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2))
TAILS = dict(SMALL, mlp1=dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=2, FUSED=True),
             mlp2=dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2))
UNFUSED = dict(TAILS, mlp1=dict(TAILS["mlp1"], FUSED=False))


@pytest.fixture(autouse=True)
def _one_thread_and_poison(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny numpy/torch ops: extra intra-op threads only fight over CI's two cores
    monkeypatch.setattr(mp, "_POISON_BUFFERS", True)  # h, y and the workspace start as NaN
    yield
    torch.set_num_threads(threads)


def _experts(seed: int, E: int, D: int, I: int) -> tuple[ExpertLinear, ExpertLinear]:
    g = torch.Generator().manual_seed(seed)

    def layer(N, K):
        w = torch.randn(E, N, K, generator=g) * K ** -0.5
        blocks, scales = mxfp4.quantize(w)
        return ExpertLinear(bias=(torch.randn(E, N, generator=g) * 0.1).to(torch.bfloat16), blocks=blocks,
                            scales=scales)

    return layer(2 * I, D), layer(D, I)


def _routing(seed: int, T: int, E: int, k: int, experts: list[int] | None = None):
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts if experts is not None else list(range(E)))
    idx = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)])
    return torch.softmax(torch.randn(T, k, generator=g), dim=-1), idx


def _oracle(mlp1, mlp2, x, ew, idx):
    """The torch engine in float64, and sum_s |w_s| (|W2_e| |h_s| + |b2_e|) per output for the error bound."""
    tb = TorchBackend()
    ref = tb.experts(x.double(), ew.double(), idx, tb.prepare_experts(mlp1, mlp2, torch.float64, "cpu"), ALPHA, LIMIT)
    w1, w2 = mlp1.dense(torch.float64), mlp2.dense(torch.float64)
    spread = torch.zeros_like(ref)
    for t in range(x.shape[0]):
        for s in range(idx.shape[1]):
            e = int(idx[t, s])
            hh = x[t].double() @ w1[e].T + mlp1.bias[e].double()
            gate, lin = hh[0::2].clamp(max=LIMIT), hh[1::2].clamp(-LIMIT, LIMIT)
            h = gate * torch.sigmoid(ALPHA * gate) * (lin + 1)
            spread[t] += abs(float(ew[t, s])) * (w2[e].abs() @ h.abs() + mlp2.bias[e].double().abs())
    return ref, spread


def _check(out, ref, spread, u: float = U_BF16):
    out = out.double().cpu()
    assert not out.isnan().any(), "NaN in the output (an unwritten element or a read of unwritten memory)"
    bound = u * ref.abs() + u * spread + 2.0 ** -20 * spread
    worst = ((out - ref).abs() / bound).max().item()
    assert worst <= 1.0, f"error {worst:.2f}x the bound; max abs error {(out - ref).abs().max().item():.3e}"


def _run(x, ew, idx, w, config=SMALL, chunk=mp.CHUNK_EXPERTS):
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=DEVICE)
    res = mp.moe_prefill_dequant(x.to(DEVICE), ew.to(DEVICE), idx.to(DEVICE), w, ALPHA, LIMIT, config=config,
                                 out=out, chunk_experts=chunk)
    assert res is out
    return out.cpu()


def _case(seed, E, k, T, D, I, experts=None, dtype=torch.bfloat16):
    mlp1, mlp2 = _experts(seed, E, D, I)
    w = moe.prepare_moe_weights(mlp1, mlp2, dtype, DEVICE)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    ew, idx = _routing(seed + 2, T, E, k, experts)
    return mlp1, mlp2, w, x, ew, idx


# ---- 0. routing -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,E,k,block_t,pool", [(37, 8, 4, 16, None), (9, 40, 4, 4, None), (50, 16, 2, 16, [3, 5]),
                                                 (1, 32, 4, 16, None), (700, 4, 4, 128, None), (100, 32, 4, 16, None),
                                                 (70, 128, 4, 64, None)])
def test_parallel_routing_matches_the_stable_sort(T, E, k, block_t, pool):
    # The last three spread the pairs over several chunks (2048, 256, 64 pairs a chunk; 2, 2 and 5 chunks).
    _, idx = _routing(T + E, T, E, k, pool)
    order, tiles = mp.moe_routing_parallel(idx.to(DEVICE), E, block_t)
    want_order, want_tiles = moe.moe_routing_ref(idx, E, block_t)
    assert torch.equal(order.cpu(), want_order)
    assert torch.equal(tiles.cpu(), want_tiles)


# ---- 1. the dequantization kernel -------------------------------------------------------------------------------

SCALE_BYTES = (0, 1, 2, 100, 126, 127, 128, 200, 240, 241, 252, 253, 254, 255)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16).cpu()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, at scale 253/254
def test_dequant_is_bit_exact_for_every_code_and_scale_and_skips_idle_experts():
    # Expert 0: each row is every code twice under one scale byte per block, rows cycle through the bytes
    # (E8M0 extremes: 0 and 1 make bf16 subnormals, 253/254 overflow to inf, 255 is NaN); experts 1..3 random.
    E, R, K = 4, 21, 96  # R and K/32 not multiples of the tile (8 rows x 2 blocks, 16 rows per program)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (E, R, K), generator=g, dtype=torch.uint8)
    codes[0] = torch.arange(16, dtype=torch.uint8).repeat(R, K // 16)
    scales = torch.randint(110, 140, (E, R, K // 32), generator=g, dtype=torch.uint8)
    sb = torch.tensor(SCALE_BYTES, dtype=torch.uint8)
    scales[0] = sb[torch.arange(R * (K // 32)) % len(sb)].reshape(R, K // 32)
    words = moe.pack_words(codes).to(DEVICE)
    scales = scales.to(DEVICE)
    # Tiles route pairs to experts 0 and 2 only (plus an unused slot start = end = 0 naming expert 0 and one
    # naming expert 3 with no rows, which must not count).
    tiles = torch.tensor([[0, 2, 0, 3], [0, 5, 0, 7], [5, 9, 0, 7]], dtype=torch.int32, device=DEVICE)
    out = torch.full((E, R, K), 7.0, dtype=torch.bfloat16, device=DEVICE)  # a sentinel in every slot
    mp.dequantize_experts(words, scales, tiles, 0, out, dict(BLOCK_R=8, BLOCK_B=2, ROWS=16, num_warps=4))
    want = mp.dequantize_experts_ref(words, scales, tiles, 0, torch.full_like(out, 7.0))
    for e in (0, 2):
        direct = moe.dequantize_words(words[e], scales[e], torch.bfloat16)
        assert torch.equal(want[e].isnan(), direct.isnan())
        assert torch.equal(out[e].isnan().cpu(), direct.isnan().cpu())
        keep = ~direct.isnan().cpu()
        assert torch.equal(_bits(out[e])[keep], _bits(direct)[keep]), f"expert {e} differs"
    assert out[0].isnan().any() and out[0].isinf().any() and (out[0].abs() < 2.0 ** -126).any()
    assert (out[1] == 7).all() and (out[3] == 7).all(), "experts without pairs must be skipped"
    # A chunk that starts at expert 2 with room for 3 (expert 4 does not exist): slot 0 = expert 2.
    out2 = torch.full((3, R, K), 7.0, dtype=torch.bfloat16, device=DEVICE)
    mp.dequantize_experts(words, scales, tiles, 2, out2, dict(BLOCK_R=16, BLOCK_B=4, ROWS=32, num_warps=4))
    assert torch.equal(_bits(out2[0]), _bits(out[2])) and (out2[1:] == 7).all()


def test_dequant_rejects_bad_shapes():
    words = torch.zeros(2, 8, 12, dtype=torch.int32, device=DEVICE)
    scales = torch.zeros(2, 8, 3, dtype=torch.uint8, device=DEVICE)
    tiles = torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError):
        mp.dequantize_experts(words, scales, tiles, 0, torch.empty(2, 8, 64, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError):
        mp.dequantize_experts(words, scales, tiles, 0, torch.empty(2, 8, 96, dtype=torch.float32, device=DEVICE))
    with pytest.raises(ValueError):
        mp.dequantize_experts(words, scales, tiles, 0, torch.empty(2, 8, 96, dtype=torch.bfloat16, device=DEVICE),
                              dict(BLOCK_R=16, BLOCK_B=2, ROWS=24, num_warps=4))


# ---- 2. the GEMMs against their specs ----------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [True, False])
def test_grouped_gemms_match_their_specs_on_one_chunk(fused):
    # Chunk of experts 2..4 of 6: tiles of other experts must be left alone (their rows stay NaN).
    E, k, T, D, I = 6, 2, 11, 160, 96  # K and N tails (see TAILS)
    mlp1, mlp2, w, x, ew, idx = _case(60, E, k, T, D, I)
    x, ew, idx = x.to(DEVICE), ew.to(DEVICE), idx.to(DEVICE)
    cfg = TAILS if fused else UNFUSED
    order, tiles = moe.moe_routing(idx, E, cfg["BLOCK_M"])
    first, C = 2, 3
    ws1 = torch.stack([moe.dequantize_words(w.w1[e].reshape(2 * I, -1), w.s1[e].reshape(2 * I, -1), torch.bfloat16)
                       for e in range(first, first + C)])
    ws2 = torch.stack([moe.dequantize_words(w.w2[e], w.s2[e], torch.bfloat16) for e in range(first, first + C)])
    m1 = dict(cfg["mlp1"], BLOCK_M=cfg["BLOCK_M"])
    m2 = dict(cfg["mlp2"], BLOCK_M=cfg["BLOCK_M"])
    h = mp.mlp1_grouped(x, order, tiles, k, ws1, w.b1, first, torch.full((T * k, I), float("nan"),
                        dtype=torch.bfloat16, device=DEVICE), m1, ALPHA, LIMIT)
    h_ref = mp.mlp1_grouped_ref(x, order, tiles, k, ws1, w.b1, first, torch.full_like(h, float("nan")), m1, ALPHA,
                                LIMIT)
    assert torch.equal(h.isnan(), h_ref.isnan()) and h.isnan().any() and not h.isnan().all()
    mine = ~h_ref.isnan()
    # Both fp32 sums, rounded to bf16 once: at most one bf16 ulp apart.
    torch.testing.assert_close(h[mine].float(), h_ref[mine].float(), rtol=2 * U_BF16, atol=1e-6)
    h = torch.where(h.isnan(), torch.randn_like(h.float()).to(h.dtype), h)  # rows of other experts: any values
    y = mp.mlp2_grouped(h, order, tiles, ew, ws2, w.b2, first, torch.full((T * k, D), float("nan"),
                        device=DEVICE), m2)
    y_ref = mp.mlp2_grouped_ref(h, order, tiles, ew, ws2, w.b2, first, torch.full_like(y, float("nan")), m2)
    assert torch.equal(y.isnan(), y_ref.isnan()) and y.isnan().any() and not y.isnan().all()
    torch.testing.assert_close(y[~y.isnan()], y_ref[~y_ref.isnan()], rtol=1e-5, atol=1e-5)


# ---- 3. the op --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config,chunk,T,D,I", [(SMALL, 32, 13, 96, 64), (TAILS, 32, 7, 160, 96),
                                                (UNFUSED, 3, 9, 96, 96)])
def test_op_matches_the_torch_engine_and_the_spec(config, chunk, T, D, I):
    E, k = 8, 4  # chunk 3: three chunks (3 + 3 + 2 experts) share the workspace
    mlp1, mlp2, w, x, ew, idx = _case(10 + T, E, k, T, D, I)
    ref, spread = _oracle(mlp1, mlp2, x, ew, idx)
    out = _run(x, ew, idx, w, config, chunk)
    _check(out, ref, spread)
    spec = mp.moe_prefill_dequant_ref(x.to(DEVICE), ew.to(DEVICE), idx.to(DEVICE), w, ALPHA, LIMIT)
    _check(spec, ref, spread)
    # The same as the existing prefill path to bf16 rounding of the two (both within the bound of the oracle).
    torch.testing.assert_close(out.float(), spec.cpu().float(), rtol=4 * U_BF16,
                               atol=4 * U_BF16 * ref.abs().max().item())


@pytest.mark.parametrize("shape", ["one_expert", "idle_experts", "one_token_each"])
def test_skewed_routing(shape):
    E, D, I = 8, 64, 64
    if shape == "one_expert":  # every pair on expert 5: 3 tiles of 16 there, the rest idle
        T, k = 40, 1
        mlp1, mlp2, w, x, ew, idx = _case(70, E, k, T, D, I)
        idx[:] = 5
    elif shape == "idle_experts":  # first choice expert 6 for all, the others from {1, 3}: 5 of 8 experts idle
        T, k = 21, 2
        mlp1, mlp2, w, x, ew, idx = _case(71, E, k, T, D, I, experts=[1, 3])
        idx[:, 0] = 6
    else:  # T = E tokens, one pair per expert
        T, k = E, 1
        mlp1, mlp2, w, x, ew, idx = _case(72, E, k, T, D, I)
        idx[:, 0] = torch.randperm(E, generator=torch.Generator().manual_seed(73))
    ref, spread = _oracle(mlp1, mlp2, x, ew, idx)
    _check(_run(x, ew, idx, w, SMALL, chunk=3), ref, spread)


def test_float32_activations_are_not_rounded():
    E, k, T, D, I = 4, 2, 6, 64, 64
    mlp1, mlp2, w, x, ew, idx = _case(80, E, k, T, D, I, dtype=torch.float32)
    ref, spread = _oracle(mlp1, mlp2, x, ew, idx)
    _check(_run(x, ew, idx, w, config=None), ref, spread, u=2.0 ** -17)  # CONFIG_F32; fp32 summation order only


def test_default_tiles():
    # moe_prefill.CONFIG as it is (128 x 256 tiles, far larger than these shapes: every mask and clamp at work).
    E, k, T, D, I = 4, 2, 5, 64, 96
    mlp1, mlp2, w, x, ew, idx = _case(85, E, k, T, D, I)
    ref, spread = _oracle(mlp1, mlp2, x, ew, idx)
    _check(_run(x, ew, idx, w, config=None), ref, spread)


def _extreme_inputs(scale_bytes: list[int], seed: int):
    """mlp1 column blocks 0..n-1 with scale byte ``scale_bytes[b]`` in every row (see tests/test_triton_moe.py):
    activations scaled so that each extreme block contributes visibly; under 254 only small codes remain."""
    nb = len(scale_bytes) + 1
    E, k, T, D, I = 4, 2, 3, 32 * nb, 64
    mlp1, mlp2 = _experts(seed, E, D, I)
    g = torch.Generator().manual_seed(seed + 1)
    codes = mxfp4.unpack(mlp1.blocks).reshape(E, 2 * I, nb, 32)
    scales = mlp1.scales.clone()
    x = torch.randn(T, nb, 32, generator=g)
    for b, s in enumerate(scale_bytes):
        scales[:, :, b] = s
        if s == 254:
            codes[:, :, b, 4:] = 0
            codes[:, :, b, :4] &= 0b1011
            x[:, b] = torch.sign(x[:, b]) * (1 + x[:, b].abs().clamp(max=3)) * 2.0 ** -126
        else:
            x[:, b] *= 2.0 ** 119
    mlp1 = ExpertLinear(bias=mlp1.bias, blocks=mxfp4.pack(codes.reshape(E, 2 * I, D)), scales=scales)
    ew, idx = _routing(seed, T, E, k)
    return mlp1, mlp2, x.reshape(T, D).to(torch.bfloat16), ew, idx


@pytest.mark.parametrize("scale_bytes", [[0, 1], [0, 1, 254]])
def test_e8m0_extreme_scales(scale_bytes):
    mlp1, mlp2, x, ew, idx = _extreme_inputs(scale_bytes, 20 + len(scale_bytes))
    w = moe.prepare_moe_weights(mlp1, mlp2, torch.bfloat16, DEVICE)
    ref, spread = _oracle(mlp1, mlp2, x, ew, idx)
    assert ref.isfinite().all()
    _check(_run(x, ew, idx, w), ref, spread)


def test_nan_scale_poisons_exactly_the_affected_outputs():
    E, k, T, D, I = 4, 1, 6, 64, 64
    mlp1, mlp2 = _experts(30, E, D, I)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(31)).to(torch.bfloat16)
    ew, idx = _routing(32, T, E, k)
    idx[:, 0] = torch.tensor([0, 1, 2, 0, 3, 1])
    s1, s2 = mlp1.scales.clone(), mlp2.scales.clone()
    s1[1, 6, 1] = 255  # expert 1, gate row of output 3, second block: NaN in h -> every output of its tokens
    s2[2, 5, 0] = 255  # expert 2, output row 5: NaN there only
    mlp1 = ExpertLinear(bias=mlp1.bias, blocks=mlp1.blocks, scales=s1)
    mlp2 = ExpertLinear(bias=mlp2.bias, blocks=mlp2.blocks, scales=s2)
    w = moe.prepare_moe_weights(mlp1, mlp2, torch.bfloat16, DEVICE)
    out = torch.zeros(T, D, dtype=torch.bfloat16, device=DEVICE)
    mp.moe_prefill_dequant(x.to(DEVICE), ew.to(DEVICE), idx.to(DEVICE), w, ALPHA, LIMIT, config=SMALL, out=out)
    want = torch.zeros(T, D, dtype=torch.bool)
    want[idx[:, 0] == 1] = True
    want[idx[:, 0] == 2, 5] = True
    assert torch.equal(out.isnan().cpu(), want)
    ref = TorchBackend().experts(x.double(), ew.double(), idx,
                                 TorchBackend().prepare_experts(mlp1, mlp2, torch.float64, "cpu"), ALPHA, LIMIT)
    assert torch.equal(ref.isnan(), want)  # the oracle agrees on where NaN goes
    assert not out[~want.to(DEVICE)].isnan().any()


def test_repeats_bitwise_with_a_given_workspace_and_checks_arguments():
    E, k, T, D, I = 6, 2, 10, 64, 64
    mlp1, mlp2, w, x, ew, idx = _case(90, E, k, T, D, I)
    first = _run(x, ew, idx, w, chunk=4)
    via_moe = mp.moe_prefill_dequant(x.to(DEVICE), ew.to(DEVICE), idx.to(DEVICE), w, ALPHA, LIMIT, config=SMALL,
                                     chunk_experts=4, routing="moe")
    assert torch.equal(via_moe.cpu(), first)  # the same tables from moe.moe_routing
    ws = torch.full((mp.workspace_elements(w, 4),), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    again = mp.moe_prefill_dequant(x.to(DEVICE), ew.to(DEVICE), idx.to(DEVICE), w, ALPHA, LIMIT, config=SMALL,
                                   workspace=ws, chunk_experts=4)
    assert torch.equal(again.cpu(), first)
    ref, spread = _oracle(mlp1, mlp2, x, ew, idx)
    _check(first, ref, spread)
    args = (x.to(DEVICE), ew.to(DEVICE), idx.to(DEVICE), w, ALPHA, LIMIT)
    with pytest.raises(ValueError):  # too small a workspace
        mp.moe_prefill_dequant(*args, config=SMALL, workspace=ws[:-1], chunk_experts=4)
    with pytest.raises(ValueError):
        mp.moe_prefill_dequant(x[:, :32].to(DEVICE), *args[1:], config=SMALL)
    with pytest.raises(ValueError):
        mp.moe_prefill_dequant(*args, config=SMALL, out=torch.empty(T, D, device=DEVICE))  # fp32 out for bf16 x
    empty = mp.moe_prefill_dequant(torch.zeros(0, D, dtype=torch.bfloat16, device=DEVICE),
                                   torch.zeros(0, k, device=DEVICE),
                                   torch.zeros(0, k, dtype=torch.int64, device=DEVICE), w, ALPHA, LIMIT)
    assert empty.shape == (0, D)
