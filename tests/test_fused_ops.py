"""Fused ops through the Backend interface (API 1.2, issue 11 item 2): ``add_rms_norm`` and the one-kernel
router of the triton engine.

* The graph in core now hands each residual add to the next norm (``add_rms_norm``); for the reference
  engine (the base class's default composes ``x + delta`` and ``rms_norm``) the logits and the KV cache
  must be bit-identical to the unfused graph, written out below from the same ops.
* The base class checks the claims of the default (op "rms_norm") before computing anything.
* Triton kernels (``ops.add_rms_norm``, ``ops.router``) against the float64 reference engine and their
  PyTorch twins, in the interpreter when there is no GPU (small shapes), outputs poisoned first.
* The suite catches known-bad fused engines through the whole model too (level 3), not only at level 1
  (tests/test_conformance_meta.py runs their level-1 cases with the other known-bad engines).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from mxmoe.backends.reference import TorchBackend
from mxmoe.conformance import Status, run_suite
from mxmoe.conformance.inputs import random_model
from mxmoe.core.backend import OPS, Backend, Capabilities, Linear, NotSupported
from mxmoe.core.batch import Batch
from mxmoe.core.config import preset
from mxmoe.core.model import GptOss

sys.path.insert(0, str(Path(__file__).parent))
import bad_engines  # noqa: E402

BF16, F64 = torch.bfloat16, torch.float64
U = 2.0 ** -8  # bf16: one ulp of 1
REF = TorchBackend()


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops on 2 shared cores (FACTS.md)
    yield
    torch.set_num_threads(old)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the graph: bit-identical to the unfused one for engines that keep the default ------------------------

def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, NaN included (the KV caches are NaN where nothing was written)."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def unfused_forward(m: GptOss, token_ids, batch, cache, logits_rows=None) -> torch.Tensor:
    """core/model.py's graph as it was before add_rms_norm (API 1.1): every residual add in the graph."""
    cfg, ops = m.config, m.ops
    T = token_ids.shape[0]
    Hq, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = ops["embedding"].embedding(token_ids, m.embedding)
    for i, layer in enumerate(m.layers):
        h = ops["rms_norm"].rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
        qkv = ops["linear"].linear(h, layer.qkv)
        q = qkv[:, :cfg.q_dim].reshape(T, Hq, d)
        k = qkv[:, cfg.q_dim:cfg.q_dim + cfg.kv_dim].reshape(T, Hkv, d)
        v = qkv[:, cfg.q_dim + cfg.kv_dim:].reshape(T, Hkv, d)
        q, k = ops["rope"].rope(q, k, batch.positions, m.inv_freq, m.concentration)
        kc, vc = cache.layer(i)
        o = ops["attention"].attention(q, k, v, layer.sinks, kc, vc, batch, layer.sliding_window, m.sm_scale)
        x = x + ops["linear"].linear(o.reshape(T, Hq * d), layer.out)
        h = ops["rms_norm"].rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps)
        w, idx = ops["router"].router(h, layer.gate, cfg.experts_per_token)
        x = x + ops["experts"].experts(h, w, idx, layer.experts, cfg.swiglu_alpha, cfg.swiglu_limit)
    if logits_rows is None:
        logits_rows = batch.cu_seqlens[1:] - 1
    x = ops["rms_norm"].rms_norm(x[logits_rows], m.norm, cfg.rms_norm_eps)
    return ops["linear"].linear(x, m.unembedding)


class CountingTorch(TorchBackend):
    """The reference, counting how the graph calls the norms (and the rows of each fused call)."""

    name = "counting-torch"

    def __init__(self):
        self.plain, self.fused = 0, []

    def rms_norm(self, x, scale, eps):
        self.plain += 1
        return super().rms_norm(x, scale, eps)

    def add_rms_norm(self, x, delta, scale, eps):
        self.fused.append(x.shape[0])
        return super().add_rms_norm(x, delta, scale, eps)


@pytest.fixture(scope="module")
def tiny_weights():
    cfg = preset("tiny", vocab_size=256)  # 2 layers: windowed and not
    return cfg, random_model(cfg, seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
def test_reference_graph_is_bit_identical_to_the_unfused_graph(tiny_weights, dtype):
    cfg, weights = tiny_weights
    m = GptOss(cfg, weights, {op: REF for op in OPS}, dtype=dtype)
    g = gen(1)
    # Two sequences, one with a cached past (a second call on the same cache), both longer than the window.
    prompt = [torch.randint(cfg.vocab_size, (n,), generator=g) for n in (13, 9)]
    for rows_all in (False, True):
        results = []
        for fwd in (m.forward, lambda *a, **kw: unfused_forward(m, *a, **kw)):
            cache = m.new_cache(2, 32)
            first = Batch.build([13, 9], [0, 0], [1, 0], 32)
            ids = torch.cat(prompt)
            rows = torch.arange(ids.shape[0]) if rows_all else None
            out1 = fwd(ids, first, cache, logits_rows=rows)
            step = Batch.build([1, 3], [13, 9], [1, 0], 32)
            step_ids = torch.randint(cfg.vocab_size, (4,), generator=gen(2))
            out2 = fwd(step_ids, step, cache, logits_rows=torch.arange(4) if rows_all else None)
            results.append((out1, out2, cache.k.clone(), cache.v.clone()))
        for got, want, what in zip(results[0], results[1], ("prefill logits", "decode logits", "k cache", "v cache")):
            assert got.dtype == dtype and same_bits(got, want), f"{what} differ from the unfused graph"
        assert torch.isfinite(results[0][0]).all() and results[0][0].abs().max() > 0


def test_graph_fuses_every_residual_add_and_the_last_on_the_logits_rows_only(tiny_weights):
    cfg, weights = tiny_weights
    spy = CountingTorch()
    m = GptOss(cfg, weights, {op: spy if op == "rms_norm" else REF for op in OPS}, dtype=torch.float32)
    ids = torch.randint(cfg.vocab_size, (10,), generator=gen(4))
    batch = Batch.build([6, 4], [0, 0], [0, 1], 16)
    logits = m.forward(ids, batch, m.new_cache(2, 16))
    L = cfg.num_hidden_layers
    # First attention norm plain; the other 2L - 1 norms and the final one take the residual add.
    assert len(spy.fused) == 2 * L and spy.fused == [10] * (2 * L - 1) + [2]
    assert spy.plain == 1 + 2 * L  # the default add_rms_norm composes rms_norm
    assert logits.shape == (2, cfg.vocab_size)


def test_default_add_rms_norm_checks_the_claims_first():
    class NoNorm(TorchBackend):
        name = "no-norm"
        capabilities = TorchBackend.capabilities.model_copy(update=dict(ops=tuple(o for o in OPS if o != "rms_norm")))

    class Bf16Only(TorchBackend):
        name = "bf16-only"
        capabilities = TorchBackend.capabilities.model_copy(update=dict(dtypes=("bfloat16",)))

    class Minimal(Backend):  # only the base class's default, an rms_norm, and claims of float32 on the CPU
        name = "minimal"
        capabilities = Capabilities(ops=("rms_norm",))

        def rms_norm(self, x, scale, eps):
            return REF.rms_norm(x, scale, eps)

    x, d, s = torch.randn(3, 64), torch.randn(3, 64), torch.ones(64)
    for engine, args in ((NoNorm(), (x, d)), (Bf16Only(), (x, d)), (Minimal(), (x.double(), d.double())),
                         (Minimal(), (x.to("meta"), d.to("meta")))):
        with pytest.raises(NotSupported, match="rms_norm|dtype|device"):
            engine.add_rms_norm(*args, s, 1e-5)
    got_s, got_h = Minimal().add_rms_norm(x, d, s, 1e-5)
    assert torch.equal(got_s, x + d) and torch.equal(got_h, REF.rms_norm(x + d, s, 1e-5))


def test_known_bad_fused_engine_fails_the_model_level_too():
    """The model graph calls add_rms_norm: a fused op that normalises x instead of x + delta breaks the logits
    (level 3), and the failure names the model, not another op."""
    report = run_suite(bad_engines.AddRmsNormOfX, levels=["L3"], dtypes=["float32"], derandomize=True,
                       case_filter=["L3/model/logits"])
    assert [c.status for c in report.cases] == [Status.FAIL], [(c.id, c.message[:200]) for c in report.cases]
    honest = run_suite(TorchBackend, levels=["L3"], dtypes=["float32"], derandomize=True,
                       case_filter=["L3/model/logits"])
    assert [c.status for c in honest.cases] == [Status.PASS]


# ---- the triton engine's kernels ------------------------------------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def tops():
    pytest.importorskip("triton")
    from mxmoe.backends.triton_engine import interpreting

    if DEVICE == "cpu" and not interpreting():
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set")
    from mxmoe.backends.triton_engine import ops

    return ops


@pytest.fixture(scope="module")
def engine(tops):
    from mxmoe.backends.triton_engine import TritonBackend

    return TritonBackend()


def poison(shape, dtype=BF16) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().to(F64)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in bf16 ulps, for finite values of one sign (bit patterns are ordered there)."""
    return (a.cpu().view(torch.int16).int() - b.cpu().view(torch.int16).int()).abs()


@pytest.mark.parametrize("T,D,delta_scale,block_d", [(1, 2880, 2.0 ** 10, None), (64, 2880, 1.0, None),
                                                      (5, 100, 2.0 ** -10, 32), (3, 64, "cancel", None)],
                         ids=["decode-2880-large-delta", "T64-2880", "two-pass-100", "cancel-64"])
def test_add_rms_norm_kernel(tops, engine, T, D, delta_scale, block_d):
    g = gen(T * 7 + D)
    rows = 10.0 ** (torch.rand(T, 1, generator=g, dtype=F64) * 6 - 3)
    x = (torch.randn(T, D, generator=g, dtype=F64) * rows).to(BF16)
    if delta_scale == "cancel":  # s = the small difference: exact in bf16
        delta = (-x.double() * (1 + torch.randn(T, D, generator=g, dtype=F64) * 2.0 ** -6)).to(BF16)
    else:
        delta = (torch.randn(T, D, generator=g, dtype=F64) * rows * delta_scale).to(BF16)
    scale = (1 + 0.5 * torch.randn(D, generator=g)).float()
    x, delta, scale = x.to(DEVICE), delta.to(DEVICE), scale.to(DEVICE)
    s, h = tops.add_rms_norm(x, delta, scale, 1e-5, out=(poison((T, D)), poison((T, D))), block_d=block_d)
    # s: PyTorch's own bf16 add, bit for bit.
    assert s.dtype == h.dtype == BF16 and torch.equal(s, x + delta), "s is not x + delta rounded once"
    # h: the float64 norm of the rounded s, within rms_norm's bound (half an ulp + float32 terms).
    ref = REF.rms_norm(f64(s), f64(scale), 1e-5)
    from mxmoe.conformance.tolerances import rms_norm_bound

    err = (f64(h) - ref).abs()
    assert torch.isfinite(f64(h)).all() and (err <= rms_norm_bound(ref, BF16)).all(), \
        f"h off by {(err / rms_norm_bound(ref, BF16)).max():.3g}x the bound"
    # Against its PyTorch twin: the same float32 math, one rounding (a last-bit difference at most, rarely).
    s_ref, h_ref = tops.add_rms_norm_ref(x, delta, scale, 1e-5)
    assert torch.equal(s, s_ref)
    diff = ulps_apart(h, h_ref)
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01
    s2, h2 = engine.add_rms_norm(x, delta, scale, 1e-5)
    assert torch.equal(s2, s) and (block_d is not None or torch.equal(h2, h))


def test_add_rms_norm_kernel_refuses_what_it_cannot_do(tops, engine):
    x = torch.randn(4, 64, device=DEVICE).to(BF16)
    with pytest.raises(ValueError, match="one dtype"):
        tops.add_rms_norm(x, x.float(), torch.ones(64, device=DEVICE), 1e-5)
    with pytest.raises(NotSupported):  # float32 is not claimed by the engine: the base class refuses
        engine.add_rms_norm(x.float(), x.float(), torch.ones(64, device=DEVICE), 1e-5)
    s, h = tops.add_rms_norm(x[:0], x[:0], torch.ones(64, device=DEVICE), 1e-5)
    assert s.shape == h.shape == (0, 64)


def _router_inputs(g, T, D, E, ties: bool):
    if ties:  # small integers: every logit exact in bf16; experts in groups of 4 equal rows
        x = torch.randint(-2, 3, (T, D), generator=g).to(F64)
        base = torch.randint(-1, 2, (E // 4, D), generator=g).to(F64)
        w = base.repeat_interleave(4, dim=0)[torch.randperm(E, generator=g)]
        b = torch.zeros(E, dtype=F64)
    else:
        x = torch.randn(T, D, generator=g, dtype=F64)
        w = torch.randn(E, D, generator=g, dtype=F64) / math.sqrt(D)
        b = torch.randn(E, generator=g, dtype=F64) * 0.1
    return x.to(BF16).to(DEVICE), w.to(BF16).to(DEVICE), b.to(BF16).to(DEVICE)


def _check_router(tops, x, w, b, k, exact: bool):
    T, E = x.shape[0], w.shape[0]
    weights, indices = tops.router(x, w, b, k, out=(poison((T, k)), torch.full((T, k), -1, dtype=torch.int64,
                                                                                  device=DEVICE)))
    assert weights.dtype == BF16 and indices.dtype == torch.int64
    idx = indices.cpu()
    assert ((idx >= 0) & (idx < E)).all() and (idx.sort(dim=1).values.diff(dim=1) > 0).all(), "not k distinct"
    ref_w, ref_i = REF.router(f64(x), Linear(f64(w), f64(b)), k)  # float64 oracle
    logits = f64(x) @ f64(w).T + f64(b)
    if exact:
        assert torch.equal(idx, ref_i), "top-k differs: ties must go to the lower index, order descending"
    else:
        # The kernel's logits are rounded to bf16 (as the reference's linear): a chosen expert may swap with
        # one whose exact logit is within that rounding (and the float32 sums' order) of it.
        lb = 2 * U * logits.abs() + 1e-4
        chosen = logits.gather(1, idx)
        others = logits.scatter(1, idx, float("-inf"))
        assert (others.amax(dim=1) <= chosen.amin(dim=1) + 2 * lb.amax(dim=1)).all(), "not the top-k"
        assert (chosen[:, :-1] >= chosen[:, 1:] - 2 * lb.amax(dim=1, keepdim=True)).all(), "not descending"
    # Weights: softmax of the float64 logits at the chosen experts; bf16 logits (u relative) + one rounding.
    sel = logits.gather(1, idx)
    want = torch.softmax(sel, dim=-1)
    spread = U * sel.abs().amax(dim=-1, keepdim=True)
    err = (f64(weights) - want).abs()
    assert torch.isfinite(f64(weights)).all() and (err <= U * want + 2 * spread * want + 1e-6).all()
    # Against its PyTorch twin (cuBLAS/CPU logits in bf16 + the reference top-k): the same experts wherever
    # the bf16 logits agree (exact inputs: everywhere), weights within a bf16 ulp.
    tw, ti = tops.router_ref(x, w, b, k)
    if exact:
        assert torch.equal(indices, ti) and ulps_apart(weights, tw).max() <= 1
    return weights, indices


@pytest.mark.parametrize("T,D,E", [(3, 2880, 32), (2, 2880, 128), (16, 64, 32), (5, 64, 128), (4, 100, 200)],
                         ids=lambda v: str(v))
def test_router_kernel_random(tops, T, D, E):
    x, w, b = _router_inputs(gen(T + D + E), T, D, E, ties=False)
    _check_router(tops, x, w, b, 4, exact=False)


@pytest.mark.parametrize("E", [32, 128])
def test_router_kernel_ties_go_to_the_lower_index(tops, E):
    T, D = 24, 32
    x, w, b = _router_inputs(gen(E), T, D, E, ties=True)
    logits = f64(x) @ f64(w).T
    assert all(bool((row.unique(return_counts=True)[1] > 1).any()) for row in logits)  # ties in every row
    _check_router(tops, x, w, b, 4, exact=True)


def test_router_kernel_rounds_the_logits_to_bf16_before_the_top_k(tops):
    """Logits 1 + b with b ∈ {0, 2^-12, 2^-10, 2^-9}: distinct in float32, all 1.0 in bf16 (half an ulp is
    2^-8), so the reference (bf16 logits) takes the lowest indices; a few experts at 1 + 2^-6 (exact) lead.
    A kernel choosing on float32 logits would take the largest b instead."""
    T, D, E, k = 6, 64, 32, 4
    g = gen(11)
    x = torch.zeros(T, D, dtype=F64)
    x[:, 0] = 1.0
    w = torch.zeros(E, D, dtype=F64)
    w[:, 0] = 1.0
    small = torch.tensor([0.0, 2.0 ** -12, 2.0 ** -10, 2.0 ** -9], dtype=F64)
    b = small[torch.randint(4, (E,), generator=g)]
    lead = torch.randperm(E, generator=g)[:2]
    b[lead] = 2.0 ** -6
    x, w, b = x.to(BF16).to(DEVICE), w.to(BF16).to(DEVICE), b.to(BF16).to(DEVICE)
    weights, indices = tops.router(x, w, b, k)
    want = REF.router(x.cpu(), Linear(w.cpu(), b.cpu()), k)[1]  # the torch engine in bf16
    assert torch.equal(indices.cpu(), want)
    fp32_choice = torch.sort(x.float().cpu() @ w.float().cpu().T + b.float().cpu(), dim=-1, descending=True,
                             stable=True).indices[:, :k]
    assert not torch.equal(fp32_choice, want)  # the case tells the two apart
    assert torch.equal(indices.cpu()[:, :2].sort(dim=1).values, lead.sort().values.expand(T, 2))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN rows, in numpy
def test_router_kernel_awkward_values_and_k_equal_to_e(tops):
    T, D, E, k = 5, 16, 8, 4
    x = torch.ones(T, D, dtype=BF16, device=DEVICE)
    w = torch.randint(-3, 4, (E, D), generator=gen(12)).to(BF16).to(DEVICE)
    b = torch.zeros(E, dtype=BF16, device=DEVICE)
    b[3] = float("nan")  # a NaN logit: the reference's sort puts it first
    w[5] = float("-inf")  # a -inf logit: last
    weights, indices = tops.router(x, w, b, k)
    tw, ti = tops.router_ref(x, w, b, k)
    assert torch.equal(indices, ti) and (indices[:, 0] == 3).all() and weights.isnan().all()
    # k = E: every expert, sorted; no bias.
    wk, ik = tops.router(x, w[:4].clone(), None, 4)
    assert torch.equal(ik, tops.router_ref(x, w[:4].clone(), None, 4)[1])


def test_engine_router_switches_to_cublas_above_the_fused_limit(tops, engine):
    """Up to ROUTER_FUSED_MAX_TOKENS tokens the one-kernel router, above it cuBLAS + the top-k kernel: the
    same experts and weights on exact inputs, either way."""
    n = tops.ROUTER_FUSED_MAX_TOKENS
    x, w, b = _router_inputs(gen(13), n + 1, 32, 32, ties=True)
    gate = engine.prepare_linear(w, b, BF16, DEVICE)
    big_w, big_i = engine.router(x, gate, 4)  # T = n + 1: cuBLAS logits + top-k
    small_w, small_i = engine.router(x[:n], gate, 4)  # T = n: one kernel
    assert torch.equal(big_i[:n], small_i) and ulps_apart(big_w[:n], small_w).max() <= 1
    fused = tops.router(x[:n], w, b, 4)
    assert torch.equal(fused[1], small_i) and torch.equal(fused[0], small_w)
