"""The triton engine's dense GEMV (backends/triton_engine/linear.py).

Checked against a float64 oracle on the same inputs (and ``linear_ref``, the kernel's plain-PyTorch spec, against
the same oracle). On a CPU the kernel runs in the Triton interpreter (tests/conftest.py), so shapes are small and
chosen to leave tails: N = 37 rows (not a multiple of any tile), K = 200 (not a multiple of the K step) or K = 100
with SPLIT_K = 4 (two empty splits); on a CUDA machine the same tests run on the GPU.

Error bound per output element (u = unit roundoff of the output dtype, the one rounding; fp32 sums over at most
K + SPLIT_K terms):
    |out - ref| <= u |ref| + (1 + u) (K + 4) 2^-24 sum_k (|x_k| |W_nk|) + |b_n| ...
which the oracle computes in float64 (``_oracle``). A lost K step, a wrong row, a missing bias or a split summed
twice breaks it by orders of magnitude.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the triton engine's kernels need the triton package")

from mxmoe.backends.triton_engine import linear as L  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
U = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}

# Small tiles so that the interpreter is quick and every path has tails: fma unsplit / split 3 ways / prefetching,
# the tensor-core product unsplit and split.
CONFIGS = {
    "fma": L.fma(16, 64, 1),
    "fma_split": L.fma(8, 32, 3),
    "fma_prefetch": L.fma(16, 32, 2, 4, 1),
    "dot": L.dot(32, 64, 1),
    "dot_split": L.dot(16, 32, 2),
}


@pytest.fixture(autouse=True)
def _one_thread():
    # Many tiny numpy/torch ops: extra intra-op threads only fight over the CI's two cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(seed: int, T: int, N: int, K: int, dtype: torch.dtype, bias: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype)
    b = (torch.randn(N, generator=g) * 0.5).to(dtype) if bias else None
    return x, w, b


def _oracle(x, w, b):
    """(exact result in float64, sum |x||W| + |b| for the bound)."""
    xd, wd = x.double().cpu(), w.double().cpu()
    ref = xd @ wd.T
    spread = xd.abs() @ wd.abs().T
    if b is not None:
        ref = ref + b.double().cpu()
        spread = spread + b.double().cpu().abs()
    return ref, spread


def _check(out: torch.Tensor, x, w, b):
    ref, spread = _oracle(x, w, b)
    out = out.double().cpu()
    assert not out.isnan().any(), "NaN in the output (an element no program wrote)"
    u = U[x.dtype]
    bound = u * ref.abs() + (1 + u) * (x.shape[1] + 4) * 2.0 ** -24 * spread + 1e-30
    err = (out - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.2f}x the bound; max abs error {err.max().item():.3e}"


def _run(x, w, b, cfg, scratch=None):
    T, N = x.shape[0], w.shape[0]
    out = torch.full((T, N), float("nan"), dtype=x.dtype, device=DEVICE)  # poisoned: every element must be written
    res = L.gemv(x.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE), cfg, out=out, scratch=scratch)
    assert res is out
    return out.cpu()


# ---- the specification -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_ref_is_one_rounding_of_the_exact_result(dtype):
    x, w, b = _inputs(1, 5, 37, 200, dtype, True)
    y = L.linear_ref(x, w, b)
    assert y.dtype == dtype and y.shape == (5, 37)
    _check(y, x, w, b)


# ---- the kernel ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_gemv_matches_the_oracle(variant, dtype, bias, T):
    x, w, b = _inputs(10 * T + bias, T, 37, 200, dtype, bias)
    _check(_run(x, w, b, CONFIGS[variant]), x, w, b)


@pytest.mark.parametrize("T", [2, 4, 5, 6, 7])
def test_gemv_every_token_count_up_to_8(T):
    x, w, b = _inputs(T, T, 37, 200, torch.bfloat16, True)
    _check(_run(x, w, b, CONFIGS["fma_split"]), x, w, b)
    _check(_run(x, w, b, CONFIGS["dot"]), x, w, b)


@pytest.mark.parametrize("variant", ["fma_split", "dot_split"])
def test_gemv_empty_splits_and_k_shorter_than_a_step(variant):
    # K = 100 with BK = 32 and SPLIT_K = 4: splits of 32 values, the last one empty; K = 24 < BK: only a tail.
    cfg = dict(CONFIGS[variant], SPLIT_K=4)
    for K in (100, 24):
        x, w, b = _inputs(K, 3, 37, K, torch.bfloat16, True)
        _check(_run(x, w, b, cfg), x, w, b)


def test_gemv_k_not_a_multiple_of_the_vector_and_strided_rows():
    # K = 75 (not a multiple of 8 elements: the kernel's masks cut inside a 16-byte vector); x a column slice.
    x, w, b = _inputs(7, 4, 37, 75, torch.bfloat16, True)
    wide = torch.randn(4, 90).to(torch.bfloat16)
    wide[:, :75] = x
    xs = wide[:, :75]
    assert not xs.is_contiguous()
    for cfg in (CONFIGS["fma_split"], CONFIGS["dot"]):
        _check(_run(xs, w, b, cfg), x, w, b)


def test_gemv_fp16_and_a_bias_of_another_dtype():
    x, w, _ = _inputs(3, 2, 37, 200, torch.float16, False)
    b = torch.randn(37) * 0.5  # fp32 bias for fp16 weights
    _check(_run(x, w, b, CONFIGS["fma"]), x, w, b)
    _check(_run(x, w, b, CONFIGS["dot_split"]), x, w, b)


def test_gemv_sixty_four_tokens_on_the_tensor_core_product():
    x, w, b = _inputs(64, 64, 37, 100, torch.bfloat16, True)
    _check(_run(x, w, b, L.dot(32, 32, 2)), x, w, b)


@pytest.mark.parametrize("variant", ["fma_split", "dot_split", "fma"])
def test_gemv_is_bitwise_repeatable_and_leaves_its_counters_at_zero(variant):
    x, w, b = _inputs(5, 3, 37, 200, torch.bfloat16, True)
    scratch: dict = {}
    first = _run(x, w, b, CONFIGS[variant], scratch)
    second = _run(x, w, b, CONFIGS[variant], scratch)
    assert torch.equal(first, second)
    split = CONFIGS[variant]["SPLIT_K"] > 1
    assert len(scratch) == int(split)  # scratch only where K is split, made once
    for part, cnt in scratch.values():
        assert part.shape == (CONFIGS[variant]["SPLIT_K"], 3, 37)
        assert torch.count_nonzero(cnt.cpu()) == 0, "a counter was not put back to 0"


def test_gemv_layers_of_one_shape_share_the_split_scratch():
    # Two weights of the same shape, alternating: the shared partials and counters must not leak between them.
    scratch: dict = {}
    (x, w1, b1), (_, w2, b2) = _inputs(1, 2, 37, 200, torch.bfloat16, True), _inputs(2, 2, 37, 200, torch.bfloat16, True)
    for w, b in ((w1, b1), (w2, b2), (w1, b1)):
        _check(_run(x, w, b, CONFIGS["fma_split"], scratch), x, w, b)
    assert len(scratch) == 1


def test_gemv_default_configs_and_the_policy():
    x, w, b = _inputs(4, 2, 37, 200, torch.float32, True)  # fp32: F.linear on a CPU rounds bf16 twice
    out = L.gemv(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE))  # CONFIGS["router"][2]
    _check(out, x, w, b)
    _check(L.linear(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)), x, w, b)
    # past every class's limit: F.linear (cuBLAS on a GPU), the same function
    xb, wb, bb = _inputs(5, L.MAX_TOKENS + 1, 37, 64, torch.float32, True)
    assert not L.use_gemv(L.MAX_TOKENS + 1, 37, 64)
    _check(L.linear(xb.to(DEVICE), wb.to(DEVICE), bb.to(DEVICE)), xb, wb, bb)


def test_shape_classes_of_gpt_oss_and_every_default_config_is_runnable():
    assert [L.shape_class(n, k) for n, k in [(5120, 2880), (2880, 4096), (32, 2880), (128, 2880), (201088, 2880)]] \
        == ["qkv", "out", "router", "router", "unembed"]
    assert set(L.CONFIGS) == set(L.GEMV_MAX_T) == {"router", "qkv", "out", "unembed"}
    for cls, line in L.CONFIGS.items():
        assert tuple(line) == L.T_BUCKETS, cls
        lo = 1
        for bucket, cfg in line.items():
            for T in (lo, bucket):  # every T of the bucket: the smallest and the largest
                for dtype in (torch.bfloat16, torch.float32):
                    L.check_config(cfg, T, dtype)
            lo = bucket + 1
    assert [L.t_bucket(t) for t in (1, 2, 3, 5, 8, 9, 64)] == [1, 2, 4, 8, 8, 64, 64]


def test_gemv_rejects_what_it_cannot_compute():
    x, w, b = _inputs(1, 2, 37, 64, torch.bfloat16, True)
    with pytest.raises(ValueError, match="dtype|bfloat16"):
        L.gemv(x.float(), w, b)
    with pytest.raises(ValueError, match="tokens"):
        L.gemv(torch.zeros(L.MAX_TOKENS + 1, 64, dtype=torch.bfloat16), w, b)
    with pytest.raises(ValueError, match="fma"):
        L.gemv(torch.zeros(32, 64, dtype=torch.bfloat16), w, b, L.fma(16, 64))
    with pytest.raises(ValueError, match="bias"):
        L.gemv(x, w, b[:5])
    with pytest.raises(ValueError, match="expected"):
        L.gemv(x, w[:, :32], b)
    with pytest.raises(ValueError, match="dot"):
        L.gemv(x, w, b, L.dot(8, 64))
    with pytest.raises(ValueError, match="out"):
        L.gemv(x, w, b, out=torch.empty(2, 36, dtype=torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("variant", ["fma_split", "dot_split"])
def test_gemv_cuda_graph_replay_equals_eager(variant):
    cfg = CONFIGS[variant]
    x, w, b = (t.cuda() for t in _inputs(9, 3, 37, 200, torch.bfloat16, True))
    scratch: dict = {}
    eager = L.gemv(x, w, b, cfg, scratch=scratch).clone()  # makes the scratch outside the capture
    out = torch.empty_like(eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        L.gemv(x, w, b, cfg, out=out, scratch=scratch)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    with pytest.raises(RuntimeError, match="eager"):  # new shapes inside a capture: refused, not allocated there
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            L.gemv(x[:2], w, b, cfg, scratch=scratch)


@pytest.mark.parametrize("early", [1, 2])
@pytest.mark.parametrize("K", [40, 100, 200, 333])  # shorter than one step of a split, than two, longer
def test_weights_loaded_before_the_wait_give_the_same_bits(early, K, monkeypatch):
    # linear.EARLY_W: the fma product's first one or two K steps of weights loaded before the PDL wait; the same
    # products summed in the same order as without (EARLY_W = 0), for whole splits, short ones and a masked tail.
    x, w, b = _inputs(79 + K, 3, 37, K, torch.bfloat16, True)
    for cfg in (L.fma(16, 64, 1), L.fma(8, 32, 3)):
        monkeypatch.setattr(L, "EARLY_W", 0)
        plain = _run(x, w, b, cfg)
        monkeypatch.setattr(L, "EARLY_W", early)
        got = _run(x, w, b, cfg)
        assert torch.equal(got, plain), (K, L.config_name(cfg))
        _check(got, x, w, b)


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_bias_loaded_before_the_wait_gives_the_same_bits(variant, monkeypatch):
    # pdl.EARLY_STATIC (on by default): the bias is loaded at the kernel's start instead of in the
    # epilogue; the same values are added in the same order, so the result is bitwise the default's.
    from mxmoe.backends.triton_engine import pdl

    x, w, b = _inputs(77, 3, 37, 200, torch.bfloat16, True)
    monkeypatch.setattr(pdl, "EARLY_STATIC", False)
    default = _run(x, w, b, CONFIGS[variant])
    monkeypatch.setattr(pdl, "EARLY_STATIC", True)
    early = _run(x, w, b, CONFIGS[variant])
    assert torch.equal(early, default)
    _check(early, x, w, b)
