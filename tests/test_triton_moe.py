"""The triton engine's MXFP4 MoE kernels (backends/triton_engine/moe.py).

Checked against the ``torch`` engine's experts op in float64 on the same canonical MXFP4 weights (the
oracle), and against ``moe_mxfp4_ref`` (the kernels' plain-PyTorch spec). On a CPU the kernels run in the
Triton interpreter (tests/conftest.py), so shapes are small; on a CUDA machine the same tests run on the GPU.

Error bound for bf16 activations, per output element d of token t (u = 2^-8, bf16's unit roundoff): the
kernels round SwiGLU(h) to bf16 where they store it, and the output once; every sum is fp32. So
    |out - ref| <= u |ref| + u sum_s |w_s| sum_i |W2_e[d, i]| |h_si| + fp32 slack,
which the oracle computes exactly (``_oracle``). A wrong decode, a lost block or a missing bias breaks it.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the triton engine's kernels need the triton package")

from mxmoe.backends.reference import TorchBackend  # noqa: E402
from mxmoe.backends.triton_engine import moe, moe_mma  # noqa: E402
from mxmoe.core import mxfp4  # noqa: E402
from mxmoe.core.backend import NotSupported  # noqa: E402
from mxmoe.core.weights import ExpertLinear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALPHA, LIMIT = 1.702, 7.0
U_BF16 = 2.0 ** -8
# Small tiles so that the interpreter is quick and N/K tails occur (K steps of 2 or 4 blocks = 64 or 128 values),
# each kernel variant once: gemv with and without prefetching, products with joined lanes (JOIN) and with split
# ones.
SMALL = {
    "gemv": dict(path="gemv", mlp1=dict(BLOCK_N=32, BLOCK_B=2, num_warps=4, PREFETCH=1),
                 mlp2=dict(BLOCK_N=64, BLOCK_B=2, num_warps=4, PREFETCH=2)),
    "gemv_loop": dict(path="gemv", mlp1=dict(BLOCK_N=32, BLOCK_B=2, num_warps=4, PREFETCH=0),
                      mlp2=dict(BLOCK_N=64, BLOCK_B=2, num_warps=4, PREFETCH=0)),
    # The activation-stationary kernels (STATIONARY): lanes on K blocks. "gemv_st": mlp1 K split 2 ways in chunks of
    # 4 lanes (D = 160: 4 blocks + 1 block, the second chunk 3/4 masked), mlp2 split 4 ways (empty splits) with the
    # k-sum fused; "gemv_st1": one split, chunks of 2 blocks with the next one prefetched, mlp2 split 2 ways and
    # summed without fusing; "gemv_st2": no split, mlp1 one chunk of 8 lanes, mlp2 a loop of 2-block chunks.
    "gemv_st": dict(path="gemv", mlp1=dict(STATIONARY=True, BLOCK_N=32, BLOCK_B=4, num_warps=4, SPLIT_K=2),
                    mlp2=dict(STATIONARY=True, BLOCK_N=64, BLOCK_B=4, num_warps=4, SPLIT_K=4, FUSE_SUM=True)),
    "gemv_st1": dict(path="gemv", mlp1=dict(STATIONARY=True, BLOCK_N=32, BLOCK_B=2, num_warps=4, SPLIT_K=1,
                                            PREFETCH=1),
                     mlp2=dict(STATIONARY=True, BLOCK_N=64, BLOCK_B=1, num_warps=4, SPLIT_K=2, PREFETCH=1)),
    "gemv_st2": dict(path="gemv", mlp1=dict(STATIONARY=True, BLOCK_N=64, BLOCK_B=8, num_warps=4, SPLIT_K=1),
                     mlp2=dict(STATIONARY=True, BLOCK_N=32, BLOCK_B=2, num_warps=4, SPLIT_K=1)),
    "gemv_st_real": dict(path="gemv", **moe.GEMV_ST),
    "gemv_portable": dict(path="gemv", **moe.GEMV_PORTABLE),  # the default tiles  # the tiles proposed for the H200 (32 lanes, 3 splits)
    "dot": dict(path="dot", BLOCK_T=16, mlp1=dict(BLOCK_N=64, BLOCK_B=4, num_warps=4, JOIN=False),
                mlp2=dict(BLOCK_N=64, BLOCK_B=4, num_warps=4, JOIN=False)),
    # Joined lanes with bf16 activations and scale bytes <= 128: the weights decoded straight into bf16
    # (moe._slot_bf16).
    "dot_bf16": dict(path="dot", BLOCK_T=16, mlp1=dict(BLOCK_N=64, BLOCK_B=2, num_warps=4, JOIN=True),
                     mlp2=dict(BLOCK_N=64, BLOCK_B=4, num_warps=4, JOIN=True)),
    # SWAP: the tokens as the products' A operand, the decoded weights as B (through shared memory on GPUs).
    "dot_swap": dict(path="dot", BLOCK_T=16, mlp1=dict(BLOCK_N=64, BLOCK_B=4, num_warps=4, JOIN=False, SWAP=True),
                     mlp2=dict(BLOCK_N=32, BLOCK_B=4, num_warps=4, JOIN=False, SWAP=True)),
    "prefill": dict(path="prefill", BLOCK_T=32, mlp1=dict(BLOCK_N=64, BLOCK_B=2, num_warps=4, JOIN=True),
                    mlp2=dict(BLOCK_N=64, BLOCK_B=2, num_warps=4, JOIN=True)),
    # The tensor-core gemv kernels (moe_mma.py; Gluon, CUDA only): two chunks per iteration / the next chunk
    # prefetched, 16-row tiles past N, partial last chunks; and the best tiles of the H200 sweep.
    "gemv_mma": dict(path="gemv", mlp1=dict(MMA=True, NT=1, NW=2, UNROLL=2, PREFETCH=0),
                     mlp2=dict(MMA=True, NT=2, NW=1, UNROLL=1, PREFETCH=1)),
    "gemv_mma_real": dict(path="gemv", **moe_mma.CONFIG),
    # K split over programs (the last of a tile sums the partials), with empty splits at these K; tiled words.
    "gemv_mma_split": dict(path="gemv", mlp1=dict(MMA=True, NT=1, NW=1, STAGES=3, SPLIT=3, TILED=True),
                           mlp2=dict(MMA=True, NT=1, NW=2, STAGES=2, SPLIT=4)),
}
# moe_mma's kernels have no interpreter: on a CPU the "mma" configs would run the portable fallback instead.
MMA_ONLY_ON_CUDA = pytest.mark.skipif(DEVICE != "cuda", reason="Gluon (tensor-core) kernels run on CUDA only; "
                                      "test_mma_configs_fall_back_where_gluon_cannot_run covers the CPU")


@pytest.fixture(autouse=True)
def _one_thread_and_poison(monkeypatch):
    # Many tiny numpy/torch ops: extra intra-op threads only fight over the CI's two cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(moe, "_POISON_BUFFERS", True)  # intermediates start as NaN: reading unwritten rows shows
    yield
    torch.set_num_threads(threads)


def _experts(seed: int, E: int, D: int, I: int) -> tuple[ExpertLinear, ExpertLinear]:
    """Canonical MXFP4 experts quantized from Gaussians (fan-in scaled), bf16 biases."""
    g = torch.Generator().manual_seed(seed)

    def layer(N, K):
        w = torch.randn(E, N, K, generator=g) * K ** -0.5
        blocks, scales = mxfp4.quantize(w)
        bias = (torch.randn(E, N, generator=g) * 0.1).to(torch.bfloat16)
        return ExpertLinear(bias=bias, blocks=blocks, scales=scales)

    return layer(2 * I, D), layer(D, I)


def _routing(seed: int, T: int, E: int, k: int, experts: list[int] | None = None):
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts if experts is not None else list(range(E)))
    idx = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    return w, idx


def _oracle(mlp1: ExpertLinear, mlp2: ExpertLinear, x, ew, idx, limit: float = LIMIT):
    """(torch engine in float64, the error bound above) for bf16 kernels."""
    tb = TorchBackend()
    ref = tb.experts(x.double(), ew.double(), idx, tb.prepare_experts(mlp1, mlp2, torch.float64, "cpu"),
                     ALPHA, limit)
    # |W2| |h| per pair, in float64, for the bound.
    w1, w2 = mlp1.dense(torch.float64), mlp2.dense(torch.float64)
    spread = torch.zeros_like(ref)
    for t in range(x.shape[0]):
        for s in range(idx.shape[1]):
            e = int(idx[t, s])
            hh = x[t].double() @ w1[e].T + mlp1.bias[e].double()
            gate, lin = hh[0::2].clamp(max=limit), hh[1::2].clamp(-limit, limit)
            h = gate * torch.sigmoid(ALPHA * gate) * (lin + 1)
            spread[t] += abs(float(ew[t, s])) * (w2[e].abs() @ h.abs() + mlp2.bias[e].double().abs())
    return ref, spread


def _check(out: torch.Tensor, ref: torch.Tensor, spread: torch.Tensor, u: float = U_BF16):
    out = out.double().cpu()
    assert not out.isnan().any(), "NaN in the output (an unwritten element or a read of unwritten memory)"
    bound = u * ref.abs() + u * spread + 2.0 ** -20 * spread
    err = (out - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.2f}x the bound; max abs error {err.max().item():.3e}"


def _run(x, ew, idx, w, variant, limit: float = LIMIT):
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=DEVICE)
    res = moe.moe_mxfp4(x.to(DEVICE), ew.to(DEVICE), idx.to(DEVICE), w, ALPHA, limit, path=SMALL[variant]["path"],
                        config=SMALL[variant], out=out)
    assert res is out
    return out.cpu()


# ---- layout ---------------------------------------------------------------------------------------------

def test_words_roundtrip_and_exact_decode_of_every_code_and_scale():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (3, 5, 96), generator=g, dtype=torch.uint8)
    words = moe.pack_words(codes)
    assert words.shape == (3, 5, 12) and words.dtype == torch.int32
    assert torch.equal(moe.unpack_words(words), codes)
    # Every code under every interesting scale byte: the words decode to exactly what core.mxfp4 says.
    all_codes = torch.arange(16, dtype=torch.uint8).repeat(2)[None, :]  # one block holding each code twice
    for s in (0, 1, 2, 126, 127, 200, 240, 241, 253, 254, 255):
        scales = torch.full((1, 1), s, dtype=torch.uint8)
        got = moe.dequantize_words(moe.pack_words(all_codes), scales, torch.float64)
        want = mxfp4.dequantize(mxfp4.pack(all_codes), scales, torch.float64)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_prepare_rejects_dense_experts_and_odd_shapes():
    mlp1, mlp2 = _experts(2, 2, 64, 32)
    dense1 = ExpertLinear(bias=mlp1.bias, weight=mlp1.dense(torch.bfloat16))
    with pytest.raises(NotSupported):
        moe.prepare_moe_weights(dense1, mlp2, torch.bfloat16, DEVICE)
    with pytest.raises(NotSupported):
        moe.prepare_moe_weights(mlp1, mlp2, torch.float16, DEVICE)
    with pytest.raises(NotSupported):
        moe.prepare_moe_weights(mlp2, mlp1, torch.bfloat16, DEVICE)  # swapped: shapes do not chain


def test_prepared_layout_is_the_canonical_weights():
    mlp1, mlp2 = _experts(3, 3, 64, 32)
    w = moe.prepare_moe_weights(mlp1, mlp2, torch.bfloat16, DEVICE)
    dense1 = mlp1.dense(torch.float32)
    for e in range(3):
        torch.testing.assert_close(moe.dequantize_words(w.w1[e, 0].cpu(), w.s1[e, 0].cpu(), torch.float32),
                                   dense1[e, 0::2], rtol=0, atol=0)
        torch.testing.assert_close(moe.dequantize_words(w.w1[e, 1].cpu(), w.s1[e, 1].cpu(), torch.float32),
                                   dense1[e, 1::2], rtol=0, atol=0)
        torch.testing.assert_close(moe.dequantize_words(w.w2[e].cpu(), w.s2[e].cpu(), torch.float32),
                                   mlp2.dense(torch.float32)[e], rtol=0, atol=0)
    torch.testing.assert_close(w.b1[:, 0].cpu(), mlp1.bias.float()[:, 0::2], rtol=0, atol=0)
    assert not w.big_scales


# ---- routing ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,E,k,block_t,pool", [(37, 8, 4, 16, None), (9, 40, 4, 4, None), (50, 16, 2, 16, [3, 5]),
                                                 (1, 32, 4, 16, None)])
def test_routing_kernel_matches_stable_sort(T, E, k, block_t, pool):
    _, idx = _routing(T + E, T, E, k, pool)
    order, tiles = moe.moe_routing(idx.to(DEVICE), E, block_t)
    want_order, want_tiles = moe.moe_routing_ref(idx, E, block_t)
    assert torch.equal(order.cpu(), want_order)
    assert torch.equal(tiles.cpu(), want_tiles)
    assert tiles.shape[1] == T * k // block_t + min(E, T * k)


# ---- the op --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,T,D,I,k", [("gemv", 1, 160, 64, 4), ("gemv_loop", 2, 160, 96, 2),
                                           ("gemv", 4, 192, 64, 4),
                                           ("gemv_st", 1, 160, 64, 4), ("gemv_st", 2, 96, 96, 2),
                                           ("gemv_st1", 2, 160, 96, 2), ("gemv_st2", 8, 96, 64, 2),
                                           ("gemv_st_real", 1, 160, 64, 4),
                                           ("dot", 5, 96, 64, 4), ("dot", 20, 64, 96, 4), ("prefill", 3, 64, 96, 4),
                                           ("dot_bf16", 20, 96, 96, 4), ("dot_swap", 20, 96, 96, 4),
                                           ("dot_swap", 3, 160, 64, 2),
                                           pytest.param("gemv_mma", 1, 160, 64, 4, marks=MMA_ONLY_ON_CUDA),
                                           pytest.param("gemv_mma", 4, 96, 224, 2, marks=MMA_ONLY_ON_CUDA),
                                           pytest.param("gemv_mma", 8, 352, 96, 4, marks=MMA_ONLY_ON_CUDA),
                                           pytest.param("gemv_mma_real", 2, 160, 96, 4, marks=MMA_ONLY_ON_CUDA),
                                           pytest.param("gemv_mma_real", 1, 2880, 2880, 4,
                                                        marks=MMA_ONLY_ON_CUDA),
                                           pytest.param("gemv_mma_split", 1, 160, 64, 4, marks=MMA_ONLY_ON_CUDA),
                                           pytest.param("gemv_mma_split", 8, 352, 96, 2, marks=MMA_ONLY_ON_CUDA)])
def test_paths_match_the_torch_engine(path, T, D, I, k):
    E = 8
    mlp1, mlp2 = _experts(10 + T, E, D, I)
    w = moe.prepare_moe_weights(mlp1, mlp2, torch.bfloat16, DEVICE)
    assert w.small_scales  # Gaussians quantize to scale bytes < 128: the bf16 decode is what dot_bf16/dot_swap run
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, D, generator=g).to(torch.bfloat16)
    ew, idx = _routing(T, T, E, k)
    ref, spread = _oracle(mlp1, mlp2, x, ew, idx)
    out = _run(x, ew, idx, w, path)
    _check(out, ref, spread)
    # The spec on the same prepared weights agrees within the same bound.
    spec = moe.moe_mxfp4_ref(x.to(DEVICE), ew.to(DEVICE), idx.to(DEVICE), w, ALPHA, LIMIT)
    _check(spec, ref, spread)


def test_prefill_tiles_one_hot_expert_and_idle_experts():
    # 40 tokens, every one's first choice the same expert (3 tiles of 16 there), only 4 of 16 experts used.
    E, k, T, D, I = 16, 2, 40, 96, 64
    mlp1, mlp2 = _experts(5, E, D, I)
    w = moe.prepare_moe_weights(mlp1, mlp2, torch.bfloat16, DEVICE)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    ew, idx = _routing(7, T, E, k, experts=[1, 6, 9])
    idx[:, 0] = 12
    for path in ("prefill", "dot"):
        ref, spread = _oracle(mlp1, mlp2, x, ew, idx)
        _check(_run(x, ew, idx, w, path), ref, spread)


def test_float32_activations_are_not_rounded():
    E, k, D, I = 4, 2, 64, 64
    mlp1, mlp2 = _experts(8, E, D, I)
    w = moe.prepare_moe_weights(mlp1, mlp2, torch.float32, DEVICE)
    for path, T in (("gemv", 3), ("gemv_st", 2), ("gemv_st1", 2), ("dot", 6)):
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
        ew, idx = _routing(T, T, E, k)
        ref, spread = _oracle(mlp1, mlp2, x, ew, idx)
        # fp32 throughout (fp32 dots with ieee precision): only accumulation-order rounding, ~K * 2^-24.
        _check(_run(x, ew, idx, w, path), ref, spread, u=2.0 ** -17)
        spec = moe.moe_mxfp4_ref(x.to(DEVICE), ew.to(DEVICE), idx.to(DEVICE), w, ALPHA, LIMIT)
        _check(spec, ref, spread, u=2.0 ** -17)


def _extreme_inputs(scale_bytes: list[int], seed: int):
    """mlp1 column blocks 0..n-1 with scale byte ``scale_bytes[b]`` in every row of every expert, block n normal.

    The activations are scaled per block so that every extreme block contributes visibly (1e-2..1) to mlp1's
    outputs, and a scale decoded wrongly or flushed to zero shows: under bytes 0 and 1 by 2^119 (more would
    overflow fp32 partial sums where the float64 oracle does not); under byte 254 only 4 codes of the block
    are kept, with |E2M1| <= 1.5 (2 * 2^127 is beyond fp32/bf16; the oracle holds it in float64), against
    activations of magnitude 2^-126..2^-124 (normal bf16).
    """
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
            codes[:, :, b, :4] &= 0b1011  # drop the top magnitude bit: |E2M1| <= 1.5
            x[:, b] = torch.sign(x[:, b]) * (1 + x[:, b].abs().clamp(max=3)) * 2.0 ** -126
        else:
            x[:, b] *= 2.0 ** 119
    mlp1 = ExpertLinear(bias=mlp1.bias, blocks=mxfp4.pack(codes.reshape(E, 2 * I, D)), scales=scales)
    x = x.reshape(T, D).to(torch.bfloat16)
    ew, idx = _routing(seed, T, E, k)
    return mlp1, mlp2, x, ew, idx


@pytest.mark.parametrize("scale_bytes", [[0, 1], [0, 1, 254]])
@pytest.mark.parametrize("path", ["gemv", "gemv_st", "dot", "dot_swap",
                                  pytest.param("gemv_mma", marks=MMA_ONLY_ON_CUDA)])
def test_e8m0_extreme_scales(scale_bytes, path):
    mlp1, mlp2, x, ew, idx = _extreme_inputs(scale_bytes, 20 + len(scale_bytes))
    w = moe.prepare_moe_weights(mlp1, mlp2, torch.bfloat16, DEVICE)
    assert w.big_scales == (254 in scale_bytes)  # both scaling variants of the kernels are exercised
    assert w.small_scales == (254 not in scale_bytes)  # bytes 0 and 1 through the bf16 decode of "dot_swap"
    ref, spread = _oracle(mlp1, mlp2, x, ew, idx)
    assert ref.isfinite().all()
    _check(_run(x, ew, idx, w, path), ref, spread)


@pytest.mark.parametrize("path", ["gemv", "gemv_st", "dot", "dot_swap"])
def test_nan_scale_poisons_exactly_the_affected_outputs(path):
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
    out = torch.full((T, D), 0.0, dtype=torch.bfloat16, device=DEVICE)
    moe.moe_mxfp4(x.to(DEVICE), ew.to(DEVICE), idx.to(DEVICE), w, ALPHA, LIMIT, path=SMALL[path]["path"],
                  config=SMALL[path], out=out)
    nan = out.isnan().cpu()
    want = torch.zeros(T, D, dtype=torch.bool)
    want[idx[:, 0] == 1] = True
    want[idx[:, 0] == 2, 5] = True
    assert torch.equal(nan, want)
    ref = TorchBackend().experts(x.double(), ew.double(), idx,
                                 TorchBackend().prepare_experts(mlp1, mlp2, torch.float64, "cpu"), ALPHA, LIMIT)
    assert torch.equal(ref.isnan(), want)  # the oracle agrees on where NaN goes


def test_dot_configs_that_triton_miscompiles_are_refused():
    # On a GPU, joined lanes with BLOCK_N < 64 (MMAv2) computed wrong values on the H200 (triton 3.6): refused.
    with pytest.raises(ValueError):
        moe.check_dot_config(dict(BLOCK_N=32, BLOCK_B=2, JOIN=True), interpret=False)
    assert moe.check_dot_config(dict(BLOCK_N=32, BLOCK_B=2, JOIN=True), interpret=True)  # the interpreter is right
    assert not moe.check_dot_config(dict(BLOCK_N=32, BLOCK_B=4, JOIN=False), interpret=False)
    with pytest.raises(ValueError):
        moe.check_dot_config(dict(BLOCK_N=64, BLOCK_B=2, JOIN=False), interpret=False)
    for path in ("dot", "prefill"):
        for layer in ("mlp1", "mlp2"):
            moe.check_dot_config(moe.CONFIGS[path][layer], interpret=False)


def test_default_path_of_a_long_prefill_is_the_workspace_path():
    """bf16 at >= 64 pairs per expert: moe_mxfp4's default goes through moe_prefill.py (dequantized workspace +
    grouped GEMMs), within the same bound of the float64 oracle; fp32 stays on the in-register path."""
    T, E, k, D, I = 70, 2, 2, 64, 32
    assert moe.choose_path(T, k, E) == "prefill_dequant"
    mlp1, mlp2 = _experts(77, E, D, I)
    w = moe.prepare_moe_weights(mlp1, mlp2, torch.bfloat16, DEVICE)
    g = torch.Generator().manual_seed(77)
    x = torch.randn(T, D, generator=g).to(torch.bfloat16)
    ew, idx = _routing(77, T, E, k)
    ref, spread = _oracle(mlp1, mlp2, x, ew, idx)
    out = moe.moe_mxfp4(x.to(DEVICE), ew.to(DEVICE), idx.to(DEVICE), w, ALPHA, LIMIT)
    _check(out, ref, spread)


def test_default_path_choice_depends_on_shapes_only():
    assert moe.choose_path(1, 4, 32) == "gemv"
    assert moe.choose_path(moe.GEMV_MAX_TOKENS + 1, 4, 32) == "dot"
    assert moe.choose_path(2048, 4, 32) == "prefill_dequant"  # 256 pairs per expert
    assert moe.choose_path(2048, 4, 128) == "prefill_dequant"  # 64: the threshold
    assert moe.choose_path(2047, 4, 128) == "prefill"
    assert moe.choose_path(moe.DOT_MAX_TOKENS + 1, 4, 128) == "prefill"
    mlp1, mlp2 = _experts(40, 4, 64, 32)
    w = moe.prepare_moe_weights(mlp1, mlp2, torch.bfloat16, DEVICE)
    empty = moe.moe_mxfp4(torch.zeros(0, 64, dtype=torch.bfloat16, device=DEVICE),
                          torch.zeros(0, 2, device=DEVICE), torch.zeros(0, 2, dtype=torch.int64, device=DEVICE),
                          w, ALPHA, LIMIT)
    assert empty.shape == (0, 64)


@pytest.mark.parametrize("fused,unfused,bad", [
    ("gemv_st", "gemv_st1", dict(STATIONARY=True, BLOCK_N=32, BLOCK_B=2, num_warps=4, PREFETCH=2, SPLIT_K=2)),
    ("gemv_st", "gemv_st1", dict(BLOCK_N=32, BLOCK_B=2, num_warps=4, PREFETCH=0, SPLIT_K=2)),  # removed family
    pytest.param("gemv_mma_split", "gemv_mma", dict(MMA=True, NT=1, NW=1, SPLIT=2, STAGES=0),  # no cp.async loop
                 marks=MMA_ONLY_ON_CUDA)])
def test_split_kernels_leave_counters_at_zero_and_repeat_bitwise(fused, unfused, bad):
    # The K-split kernels' last program per tile resets its counter: a second call (as a CUDA-graph replay would)
    # must see all counters at 0 and give the same bits; the unfused and fused mlp2 agree to fp32 rounding.
    E, k, T, D, I = 6, 2, 2, 96, 64
    mlp1, mlp2 = _experts(50, E, D, I)
    w = moe.prepare_moe_weights(mlp1, mlp2, torch.bfloat16, DEVICE)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(51)).to(torch.bfloat16)
    ew, idx = _routing(52, T, E, k)
    first = _run(x, ew, idx, w, fused)
    (counters,) = [v for key, v in w.scratch.items() if key[0] == "counters"]  # keyed by "cuda:0" on a GPU
    assert counters.numel() >= T * k * 2 and not counters.any()
    assert torch.equal(_run(x, ew, idx, w, fused), first)
    assert not counters.any()
    ref, spread = _oracle(mlp1, mlp2, x, ew, idx)
    _check(first, ref, spread)
    _check(_run(x, ew, idx, w, unfused), ref, spread)
    assert not counters.any()
    with pytest.raises(ValueError):
        moe.moe_mxfp4(x.to(DEVICE), ew.to(DEVICE), idx.to(DEVICE), w, ALPHA, LIMIT, path="gemv",
                      config=dict(mlp1=bad, mlp2=SMALL["gemv"]["mlp2"]))


def test_gemv_family_is_chosen_by_config_keys():
    assert moe.gemv_family(SMALL["gemv"]["mlp1"]) == "base"
    assert moe.gemv_family(SMALL["gemv_st"]["mlp2"]) == "stationary"  # SPLIT_K with STATIONARY
    with pytest.raises(ValueError, match="STATIONARY"):  # SPLIT_K alone named the removed split family
        moe.gemv_family(dict(BLOCK_N=32, BLOCK_B=8, num_warps=4, PREFETCH=2, SPLIT_K=4))
    for layer in ("mlp1", "mlp2"):
        assert moe.gemv_family(moe.CONFIGS["gemv"][layer]) in ("base", "stationary")
        assert moe.gemv_family(moe_mma.CONFIG[layer]) == "mma"


def test_mma_configs_fall_back_where_gluon_cannot_run():
    # moe_mma.available() names the reason; the gemv path then runs GEMV_PORTABLE's kernels, bitwise the same as
    # asking for them.
    E, k, T, D, I = 4, 2, 2, 96, 64
    mlp1, mlp2 = _experts(40, E, D, I)
    w = moe.prepare_moe_weights(mlp1, mlp2, torch.bfloat16, DEVICE)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(41)).to(torch.bfloat16)
    assert "float32" in moe_mma.available(x.float().to(DEVICE), True) or DEVICE != "cuda"
    assert moe_mma.available(x.to(DEVICE), False) is not None  # scale bytes > 128: no bf16 decode
    if DEVICE != "cuda":
        assert "CUDA" in moe_mma.available(x, True)
        ew, idx = _routing(42, T, E, k)
        ref, spread = _oracle(mlp1, mlp2, x, ew, idx)
        SMALL["_portable"] = dict(path="gemv", **moe.GEMV_PORTABLE)
        try:
            portable = _run(x, ew, idx, w, "_portable")
        finally:
            del SMALL["_portable"]
        fallback = _run(x, ew, idx, w, "gemv_mma")
        _check(fallback, ref, spread)
        assert torch.equal(fallback, portable)


# ---- exactness at the bottom of the range (issue 11: the interpreter's conversions of subnormals) ----------------

def _exact_subnormal_inputs(T: int):
    """Inputs with every step exact and outputs at 0 or in bf16's subnormal range (the recipe of the conformance
    suite's mxfp4_exact cases, conformance/ops.py): token t is one-hot at channel j = t; mlp1's gate row i holds
    32 at column i (so gate_j = 32, sigma(1.702 * 32) = 1 in fp32 and float64 with swiglu_limit 64, and every
    other gate is 0), its linear row i holds L_i in {-1, -0.5, 0, 0.5, 1, 1.5} at column i, so h = 32 (L_j + 1) at
    channel j (exactly 0 for L_j = -1) and exactly 0 elsewhere; mlp2 at E8M0 bytes 0 and 1 (2^-127, 2^-126) with
    |E2M1| >= 2 resp. 1
    (normal weights: some GEMMs flush subnormal operands), half of them 0; both slots weigh 2^-8, all biases are 0.
    Every output is then 2^-8 * sum_slots h * W2[d, j]: 0 or a few-bit multiple of 2^-133 below ~2^-124."""
    E, D, I, k = 2, 64, 32, 2
    g = torch.Generator().manual_seed(60 + T)
    codes1 = torch.zeros(E, 2 * I, D, dtype=torch.uint8)
    scales1 = torch.full((E, 2 * I, D // 32), 127, dtype=torch.uint8)
    rows = torch.arange(I)
    codes1[:, 2 * rows, rows] = 6  # 4.0 * 2^3 = 32
    scales1[:, 0::2] = 127 + 3
    lin_codes = torch.tensor([0b1010, 0b1001, 0, 1, 2, 3])  # -1, -0.5, 0, 0.5, 1, 1.5
    codes1[:, 2 * rows + 1, rows] = lin_codes[torch.randint(6, (E, I), generator=g)].to(torch.uint8)
    codes1[:, 1, 0] = 0b1010  # token 0's channel has L = -1 on both experts: its h and output row are exactly 0
    scales2 = torch.randint(0, 2, (E, D, 1), generator=g, dtype=torch.uint8)
    mag = torch.randint(4, 8, (E, D, I), generator=g, dtype=torch.uint8)  # |E2M1| 2..6: normal at both bytes
    mag = torch.where(torch.rand(E, D, I, generator=g) < 0.5, torch.zeros_like(mag), mag)
    codes2 = mag | (torch.randint(0, 2, (E, D, I), generator=g, dtype=torch.uint8) << 3)
    zero1, zero2 = torch.zeros(E, 2 * I, dtype=torch.bfloat16), torch.zeros(E, D, dtype=torch.bfloat16)
    mlp1 = ExpertLinear(bias=zero1, blocks=mxfp4.pack(codes1), scales=scales1)
    mlp2 = ExpertLinear(bias=zero2, blocks=mxfp4.pack(codes2), scales=scales2)
    x = torch.zeros(T, D, dtype=torch.bfloat16)
    x[torch.arange(T), torch.arange(T)] = 1.0
    idx = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], dim=1)[:, :k]
    ew = torch.full((T, k), 2.0 ** -8, dtype=torch.bfloat16)
    return mlp1, mlp2, x, ew, idx


@pytest.mark.parametrize("path", ["gemv", "gemv_st", "dot", "dot_bf16", "dot_swap", "prefill"])
def test_exact_zeros_and_subnormal_outputs(path):
    # Bitwise equal to the float64 oracle, which is exact here: the interpreter once returned 1.17e-38 (bf16 bits
    # 0x007F) for exact zeros, from rounding by hand into an fp32 subnormal and its conversion of subnormals.
    T = 6
    mlp1, mlp2, x, ew, idx = _exact_subnormal_inputs(T)
    w = moe.prepare_moe_weights(mlp1, mlp2, torch.bfloat16, DEVICE)
    assert not w.big_scales
    ref, _ = _oracle(mlp1, mlp2, x, ew, idx, limit=64.0)
    assert torch.equal(ref.to(torch.bfloat16).double(), ref)  # exact in bf16 by construction
    subnormal = (ref != 0) & (ref.abs() < 2.0 ** -126)
    assert subnormal.sum() >= 20 and (ref == 0).sum() >= 100 and (ref[0] == 0).all()
    out = _run(x, ew, idx, w, path, limit=64.0)
    assert torch.equal(out.double(), ref), (
        f"{int((out.double() != ref).sum())} outputs differ, e.g. {out[out.double() != ref][:4].tolist()}")


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the interpreter's bf16 -> fp32 conversion; subnormal GEMM "
                                             "operands are not claimed on GPUs (the conformance suite avoids them)")
@pytest.mark.parametrize("path", ["dot", "prefill"])
def test_subnormal_bf16_activations_in_the_products(path):
    # bf16 activations below 2^-126 read into the tensor-core products exactly (the interpreter's bf16 -> fp32
    # conversion turned them into wrong values): x ~ 2^-130, weights ~ 2^100 (bytes 227..229), biases 0, so the
    # whole output comes from those activations. (The gemv kernels scale partial sums by 2^-14 and lose bits for
    # activations this small, as moe.py says; their tests use normal activations.)
    E, k, T, D, I = 4, 2, 5, 64, 32
    mlp1, mlp2 = _experts(70, E, D, I)
    g = torch.Generator().manual_seed(71)
    scales1 = torch.randint(227, 230, mlp1.scales.shape, generator=g, dtype=torch.uint8)
    mlp1 = ExpertLinear(bias=torch.zeros_like(mlp1.bias), blocks=mlp1.blocks, scales=scales1)
    mlp2 = ExpertLinear(bias=torch.zeros_like(mlp2.bias), blocks=mlp2.blocks, scales=mlp2.scales)
    x = (torch.randn(T, D, generator=g) * 2.0 ** -130).to(torch.bfloat16)
    assert (x.abs() < 2.0 ** -126).float().mean() > 0.9
    ew, idx = _routing(72, T, E, k)
    w = moe.prepare_moe_weights(mlp1, mlp2, torch.bfloat16, DEVICE)
    ref, spread = _oracle(mlp1, mlp2, x, ew, idx)
    assert ref.abs().max() > 1e-9  # made of those activations alone (no bias)
    _check(_run(x, ew, idx, w, path), ref, spread)


def test_routing_reads_non_contiguous_ids_as_their_values():
    """A (T, k) view with other strides (a transpose's) gives the tables of its values, not of its storage."""
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(10)]).to(DEVICE)
    view = idx.t().contiguous().t()
    assert not view.is_contiguous() and torch.equal(view, idx)
    order, tiles = moe.moe_routing(view, 8, 4)
    ref_order, ref_tiles = moe.moe_routing_ref(idx, 8, 4)
    assert torch.equal(order.cpu(), ref_order.cpu()) and torch.equal(tiles.cpu(), ref_tiles.cpu())


def test_epilogue_operands_loaded_early_give_the_same_bits(monkeypatch):
    # pdl.EARLY_STATIC (on by default): the default gemv kernels load their expert's bias and
    # routing weight before the K loop instead of after it; the same bits either way.
    from mxmoe.backends.triton_engine import pdl

    E, k, T, D, I = 8, 4, 2, 160, 96
    mlp1, mlp2 = _experts(61, E, D, I)
    w = moe.prepare_moe_weights(mlp1, mlp2, torch.bfloat16, DEVICE)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(62)).to(torch.bfloat16)
    ew, idx = _routing(63, T, E, k)
    monkeypatch.setattr(pdl, "EARLY_STATIC", False)
    default = _run(x, ew, idx, w, "gemv_portable")
    monkeypatch.setattr(pdl, "EARLY_STATIC", True)
    early = _run(x, ew, idx, w, "gemv_portable")
    assert torch.equal(early, default)
    ref, spread = _oracle(mlp1, mlp2, x, ew, idx)
    _check(early, ref, spread)
