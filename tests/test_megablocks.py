"""The megablocks engine: conformance (the engine alone, and its MoE inside the model graph), greedy generation
against the torch engine, skewed routing at prefill sizes with no token dropped, both weight modes, and the
portable Triton grouped GEMMs (interpreter on a CPU) against their PyTorch references."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mxmoe.backends.megablocks import MegaBlocksBackend, moe
from mxmoe.backends.reference import TorchBackend
from mxmoe.conformance import Status
from mxmoe.conformance.testing import case_params, check_case
from mxmoe.core import mxfp4
from mxmoe.core.backend import OPS, NotSupported
from mxmoe.core.checkpoint import write_random_checkpoint
from mxmoe.core.config import preset
from mxmoe.core.model import load_model
from mxmoe.core.weights import ExpertLinear
from mxmoe.plugins import BackendFallbackWarning, BackendSelectionError, resolve_backends

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
# The interpreter evaluates SwiGLU's sigmoid with numpy, which warns when exp(-αg) overflows to inf (the
# result, 0, is right).
interpreter_exp = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
ALPHA, LIMIT = 1.702, 7.0


@pytest.fixture(autouse=True)
def _few_threads():
    # Many small ops on a shared 2-core machine: intra-op threads only oversubscribe it (FACTS.md).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class MegaBlocksOnTorch(MegaBlocksBackend):
    """megablocks' router and experts, the reference's other ops inside one engine: the MoE path inside levels 2
    and 3 with every op claimed (the suite's companion now does the same for the engine alone; this keeps the
    cases running without the companion's selection logic in the way)."""

    name = "megablocks-on-torch"
    capabilities = MegaBlocksBackend.capabilities.model_copy(update=dict(
        ops=OPS, head_dims=None, attention_sinks=True, sliding_window=True))
    _ref = TorchBackend()

    def embedding(self, *a):
        return self._ref.embedding(*a)

    def rms_norm(self, *a):
        return self._ref.rms_norm(*a)

    def linear(self, *a):
        return self._ref.linear(*a)

    def rope(self, *a):
        return self._ref.rope(*a)

    def attention(self, *a):
        return self._ref.attention(*a)


def _assert_passes(engine, case):
    r = check_case(engine, case)
    # NOT_SUPPORTED only where a claim ends (an unclaimed op, dtype, bitwise determinism, ...); else PASS.
    assert r.status == Status.PASS or (r.status == Status.NOT_SUPPORTED and r.unclaimed), (case.id, r.message)
    return r


# ---- conformance -------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", case_params(MegaBlocksBackend, dtypes=["float32", "bfloat16"], shapes="small"))
def test_conformance_engine(case):
    _assert_passes(MegaBlocksBackend(kernel="torch"), case)


_COMPOSED = [p for p in case_params(MegaBlocksOnTorch, levels=["L2", "L3"], dtypes=["float32", "bfloat16"],
                                        shapes="small")]


@pytest.mark.parametrize("case", _COMPOSED)
def test_conformance_moe_inside_the_model(case):
    _assert_passes(MegaBlocksOnTorch(kernel="torch"), case)


def _experts_cases(dtypes, names=None):
    return [p for p in case_params(MegaBlocksBackend, levels=["L1"], dtypes=dtypes, shapes="small")
            if p.values[0].op == "experts" and (names is None or any(n in p.values[0].name for n in names))]


@pytest.mark.parametrize("case", _experts_cases(["float32", "bfloat16"]))
def test_conformance_experts_workspace_and_grouped_mm(case):
    for engine in (MegaBlocksBackend(kernel="torch", weight_mode="workspace"),
                   MegaBlocksBackend(kernel="grouped_mm", weight_mode="resident")):
        _assert_passes(engine, case)


@needs_triton
@interpreter_exp
@pytest.mark.parametrize("case", _experts_cases(["bfloat16"], names=("random_mxfp4", "swiglu_clamp", "one_expert",
                                                                     "e8m0_nan", "mxfp4_dequant_mlp1"))
                         + [p for p in _COMPOSED if p.values[0].name == "moe"])
def test_conformance_triton_kernel(case):
    engine = (MegaBlocksOnTorch if case.level == "L2" else MegaBlocksBackend)(kernel="triton")
    _assert_passes(engine, case)


# ---- the engine as data, and selection ---------------------------------------------------------------

def test_declaration():
    caps = MegaBlocksBackend.capabilities
    assert MegaBlocksBackend.priority == (40 if torch.version.hip else 4)
    assert set(caps.ops) >= {"router", "experts"} and set(caps.dtypes) == {"float32", "bfloat16"}
    assert caps.mxfp4 == "dequantized" and caps.dense_experts and set(caps.devices) == {"cpu", "cuda"}
    # Said plainly until it has run there: docstring, notes, probe.
    assert "not yet run on amd" in MegaBlocksBackend.__doc__.lower()
    assert "not run on amd" in MegaBlocksBackend.notes.lower()
    assert "not run on AMD" in MegaBlocksBackend().probe("cpu").reason
    if not torch.cuda.is_available():
        assert "attention" not in caps.ops
        from mxmoe.core.batch import Batch

        q, kv, cache = torch.randn(1, 4, 64), torch.randn(1, 1, 64), torch.zeros(1, 2, 1, 64)
        with pytest.raises(NotSupported, match="attention"):
            MegaBlocksBackend().attention(q, kv, kv, torch.zeros(4), cache, cache.clone(),
                                          Batch.build([1], [0], [0], 2), 0, 0.125)


def test_imports_and_serves_without_triton():
    import subprocess
    import sys

    code = """
import sys
sys.modules["triton"] = None  # as if not installed
import torch
from mxmoe.backends.megablocks import MegaBlocksBackend
from mxmoe.core import mxfp4
from mxmoe.core.weights import ExpertLinear
assert "triton" not in str(MegaBlocksBackend().probe("cpu").reason)
assert not MegaBlocksBackend(kernel="triton").probe("cpu").available
e = MegaBlocksBackend()
def lin(n, k):
    blocks, scales = mxfp4.quantize(torch.randn(2, n, k))
    return ExpertLinear(bias=torch.zeros(2, n, dtype=torch.bfloat16), blocks=blocks, scales=scales)
layer = e.prepare_experts(lin(64, 32), lin(32, 32), torch.bfloat16, "cpu")
out = e.experts(torch.randn(3, 32).bfloat16(), torch.ones(3, 1).bfloat16(), torch.tensor([[0], [1], [1]]), layer,
                1.702, 7.0)
assert out.shape == (3, 32) and torch.isfinite(out).all() and e.kernel_for("cpu", torch.bfloat16) == "torch"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_refuses_unclaimed_and_bad_settings():
    mb = MegaBlocksBackend()
    with pytest.raises(NotSupported, match="float64"):
        mb.prepare_linear(torch.randn(4, 8), None, torch.float64, "cpu")
    with pytest.raises(NotSupported, match="rms_norm"):
        mb.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="weight_mode"):
        MegaBlocksBackend(weight_mode="half")
    with pytest.raises(ValueError, match="kernel"):
        MegaBlocksBackend(kernel="cublas")


def test_selection_by_name_and_auto():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = resolve_backends("megablocks", device="cpu", dtype="bfloat16")
    assert {res.ops["router"].name, res.ops["experts"].name} == {"megablocks"}
    assert res.ops["embedding"].name != "megablocks"
    assert any(issubclass(w.category, BackendFallbackWarning) for w in seen)
    with pytest.raises(BackendSelectionError):
        resolve_backends("megablocks", device="cpu", strict=True)
    if not torch.version.hip:  # auto: never megablocks off ROCm
        assert resolve_backends("auto", device="cpu").ops["experts"].name != "megablocks"


# ---- greedy generation against the torch engine --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    cfg = preset("tiny", vocab_size=512, num_experts=8, experts_per_token=2)
    out = {}
    for layout in ("hf", "hf-bf16"):
        d = tmp_path_factory.mktemp(layout)
        write_random_checkpoint(d, cfg, layout, seed=11)
        out[layout] = d
    return out


@pytest.mark.parametrize("layout", ["hf", "hf-bf16"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_greedy_equals_torch_engine(tiny_checkpoints, layout, dtype, monkeypatch):
    prompt = [5, 77, 301, 2, 9, 140, 33, 480, 12, 7, 250, 64]
    ref = load_model(tiny_checkpoints[layout], backend="torch", dtype=dtype)
    expected = list(ref.generate(prompt, max_tokens=12))
    for mode in ("resident", "workspace"):
        monkeypatch.setenv("MXMOE_MEGABLOCKS_WEIGHTS", mode)
        model = load_model(tiny_checkpoints[layout], backend="moe=megablocks", dtype=dtype, strict=True)
        mb = model.ops["experts"]
        assert mb.name == "megablocks" and model.ops["router"] is mb
        # Dense (bf16) checkpoints are taken as they are: resident whatever the knob says.
        assert mb.weight_mode == ("resident" if layout == "hf-bf16" else mode)
        assert list(model.generate(prompt, max_tokens=12)) == expected
        # The torch kernel is the reference's arithmetic in another order of rows: bit-identical logits.
        assert torch.equal(model.logits(prompt + expected), ref.logits(prompt + expected))


def test_load_by_name_falls_back_for_other_ops(tiny_checkpoints):
    with pytest.warns(BackendFallbackWarning):
        model = load_model(tiny_checkpoints["hf"], backend="megablocks", dtype="bfloat16")
    assert model.ops["experts"].name == "megablocks" and model.ops["attention"].name != "megablocks"
    ref = load_model(tiny_checkpoints["hf"], backend="torch", dtype="bfloat16")
    assert list(model.generate([1, 2, 3], max_tokens=6)) == list(ref.generate([1, 2, 3], max_tokens=6))


# ---- skewed routing at prefill sizes: no token dropped ---------------------------------------------------

def _random_layer(seed: int, E: int, D: int, I: int, dense: bool = False):
    g = torch.Generator().manual_seed(seed)

    def lin(N, K):
        w = torch.randn(E, N, K, generator=g, dtype=torch.float64) / math.sqrt(K)
        bias = (0.1 * torch.randn(E, N, generator=g, dtype=torch.float64)).to(torch.bfloat16)
        if dense:
            return ExpertLinear(bias=bias, weight=w.to(torch.bfloat16))
        blocks, scales = mxfp4.quantize(w.float())
        return ExpertLinear(bias=bias, blocks=blocks, scales=scales)

    return lin(2 * I, D), lin(D, I)


def _routing(kind: str, T: int, E: int, k: int, g: torch.Generator):
    if kind == "all_on_one":  # every token's first choice is expert 3; the rest of the slots on 0..k-2
        idx = torch.cat([torch.full((T, 1), 3), torch.arange(k - 1).expand(T, k - 1) + (torch.arange(k - 1) >= 3)],
                        dim=1)
    elif kind == "one_each":  # T == E: token t on expert t only (plus fixed others when k > 1)
        idx = torch.stack([(torch.arange(T) + j) % E for j in range(k)], dim=1)
    elif kind == "few_experts":  # only experts 0 and E-1 receive tokens
        idx = torch.stack([torch.zeros(T, dtype=torch.int64), torch.full((T,), E - 1)], dim=1)[:, :k]
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    return w, idx.to(torch.int64)


def _reference(x, w, idx, mlp1, mlp2, dtype):
    ref = TorchBackend()
    return ref.experts(x, w.to(dtype), idx, ref.prepare_experts(mlp1, mlp2, dtype, "cpu"), ALPHA, LIMIT)


@pytest.mark.parametrize("kind,T,E,k", [("all_on_one", 3000, 8, 1), ("all_on_one", 2048, 8, 2),
                                        ("one_each", 32, 32, 1), ("one_each", 16, 16, 4),
                                        ("few_experts", 1500, 16, 2), ("random", 2500, 32, 4)])
def test_skewed_routing_drops_nothing(kind, T, E, k):
    D, I = 64, 32
    g = torch.Generator().manual_seed(T + E + k)
    mlp1, mlp2 = _random_layer(T + k, E, D, I)
    w, idx = _routing(kind, T, E, k, g)
    x = torch.randn(T, D, generator=g).to(torch.bfloat16)
    expected = _reference(x, w, idx, mlp1, mlp2, torch.bfloat16)
    for mode in ("resident", "workspace"):
        mb = MegaBlocksBackend(kernel="torch", weight_mode=mode)
        out = mb.experts(x, w.to(torch.bfloat16), idx, mb.prepare_experts(mlp1, mlp2, torch.bfloat16, "cpu"),
                         ALPHA, LIMIT)
        assert torch.equal(out, expected), (kind, mode)
    # Every token got its k experts: its row differs from the same token with one slot's weight zeroed.
    r = moe.sort_by_expert(w, idx, E)
    assert r.counts.sum() == T * k and torch.equal(torch.sort(r.pair).values, torch.arange(T * k))
    assert torch.equal(torch.bincount(r.token, minlength=T), torch.full((T,), k))


@pytest.mark.parametrize("kind,T,E,k", [("all_on_one", 2048, 8, 2), ("one_each", 16, 16, 4),
                                        ("few_experts", 700, 16, 2)])
def test_skewed_routing_other_kernels(kind, T, E, k):
    """grouped_mm and (interpreted) triton against the float64 reference at prefill sizes."""
    D, I = 64, 32
    g = torch.Generator().manual_seed(7 * T + k)
    mlp1, mlp2 = _random_layer(T, E, D, I)
    w, idx = _routing(kind, T, E, k, g)
    x = torch.randn(T, D, generator=g).to(torch.bfloat16)
    exact = _reference(x.double(), w.to(torch.bfloat16).double(), idx, mlp1, mlp2, torch.float64)
    honest = _reference(x, w, idx, mlp1, mlp2, torch.bfloat16).double()
    kernels = ["grouped_mm"] + (["triton"] if HAS_TRITON else [])
    for kernel in kernels:
        mb = MegaBlocksBackend(kernel=kernel, weight_mode="resident")
        out = mb.experts(x, w.to(torch.bfloat16), idx, mb.prepare_experts(mlp1, mlp2, torch.bfloat16, "cpu"),
                         ALPHA, LIMIT).double()
        # Within a few times the torch kernel's own error, per token (a dropped pair is off by a whole expert).
        scale = exact.abs().amax(dim=1, keepdim=True)
        allowed = 4 * (honest - exact).abs().amax(dim=1, keepdim=True) + 2 ** -7 * scale
        assert ((out - exact).abs() <= allowed).all(), kernel


# ---- weight modes ------------------------------------------------------------------------------------------

def test_workspace_is_shared_across_layers_and_never_stale():
    """Two layers through one workspace, alternating, with disjoint experts routed: outputs stay the
    resident ones bit for bit (a stale or unwritten workspace row would show: it starts NaN)."""
    D, I, E, T, k = 64, 32, 8, 40, 2
    layers = [_random_layer(s, E, D, I) for s in (1, 2)]
    ws_engine = MegaBlocksBackend(kernel="torch", weight_mode="workspace")
    res_engine = MegaBlocksBackend(kernel="torch", weight_mode="resident")
    ws = [ws_engine.prepare_experts(a, b, torch.bfloat16, "cpu") for a, b in layers]
    res = [res_engine.prepare_experts(a, b, torch.bfloat16, "cpu") for a, b in layers]
    assert ws_engine.weight_mode == "workspace" and res_engine.weight_mode == "resident"
    assert ws_engine.workspace.nbytes == moe.dense_bytes(*layers[0], torch.bfloat16)  # one layer's worth
    assert ws_engine.memory()["layer_bytes"] < res_engine.memory()["layer_bytes"] / 3  # MXFP4 is ~4.25 bits
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(T, D, generator=g).to(torch.bfloat16)
        w = torch.softmax(torch.randn(T, k, generator=g), -1).to(torch.bfloat16)
        lo = step % 2 * 4  # experts 0-3 on even steps, 4-7 on odd ones
        idx = torch.stack([torch.randperm(4, generator=g)[:k] + lo for _ in range(T)])
        for layer in range(2):
            a = ws_engine.experts(x, w, idx, ws[layer], ALPHA, LIMIT)
            b = res_engine.experts(x, w, idx, res[layer], ALPHA, LIMIT)
            assert torch.equal(a, b), (step, layer)


def test_auto_mode_follows_free_memory(tiny_checkpoints):
    from mxmoe.core.checkpoint import load_checkpoint
    from mxmoe.core.model import GptOss

    config, weights, _ = load_checkpoint(tiny_checkpoints["hf"])
    m = weights.blocks[0].mlp
    need = moe.dense_bytes(m.mlp1, m.mlp2, torch.bfloat16)
    total = 10 * need

    class SmallDevice(MegaBlocksBackend):
        """A device on which the first layer fits (itself + the workspace + the reserve) and the second not."""

        def device_memory(self, device):
            fits = 2 * need + int(moe.RESERVE_FRACTION * total) + 1
            return (fits if not self.layer_modes else fits - need, total)

    engine = SmallDevice(kernel="torch")
    ref = TorchBackend()
    ops = {op: (engine if op in ("router", "experts") else ref) for op in OPS}
    model = GptOss(config, weights, ops, dtype=torch.bfloat16)
    assert engine.layer_modes == ["resident", "workspace"] and engine.weight_mode.startswith("mixed (1 of 2")
    assert engine.memory()["workspace_bytes"] > 0
    expected = GptOss(config, weights, {op: ref for op in OPS}, dtype=torch.bfloat16)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    assert torch.equal(model.logits(ids), expected.logits(ids))


def test_choose_mode():
    gib = 2 ** 30
    assert moe.choose_mode(10 * gib, 10 * gib, (100 * gib, 141 * gib)) == "resident"
    assert moe.choose_mode(10 * gib, 10 * gib, (30 * gib, 141 * gib)) == "workspace"  # 15% reserve + workspace
    assert moe.choose_mode(10 * gib, 10 * gib, None) == "resident"
    free, total = moe.device_memory(torch.device("cpu"))
    assert 0 < free <= total


def test_resident_dequantization_is_bit_exact():
    mlp1, mlp2 = _random_layer(5, 4, 64, 32)
    mlp1.scales[1, 3, 0] = mxfp4.SCALE_NAN  # NaN block: NaN survives exactly where it belongs
    mlp1.scales[2, 5, 1] = 0  # 2^-127: subnormal products
    for dtype in (torch.bfloat16, torch.float32):
        layer = MegaBlocksBackend(weight_mode="resident").prepare_experts(mlp1, mlp2, dtype, "cpu")
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        for got, lin in ((layer.w1, mlp1), (layer.w2, mlp2)):
            want = mxfp4.dequantize(lin.blocks, lin.scales, dtype)
            assert got.isnan().any() == (lin is mlp1) and torch.equal(got.view(bits), want.view(bits))


# ---- the Triton kernels against their references (interpreter on a CPU) -------------------------------

def test_tile_schedule_covers_every_row_once():
    pytest.importorskip("triton")
    from mxmoe.backends.megablocks.kernels import tile_schedule

    g = torch.Generator().manual_seed(3)
    for T, E, k, bm in ((1, 32, 4, 16), (37, 8, 2, 16), (300, 4, 1, 64), (64, 128, 4, 16)):
        w = torch.rand(T, k, generator=g)
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        r = moe.sort_by_expert(w, idx, E)
        s = tile_schedule(r, bm)
        covered = torch.zeros(T * k, dtype=torch.int64)
        for e, a, b in zip(s.expert.tolist(), s.start.tolist(), s.end.tolist()):
            if e < 0:
                continue
            rows = torch.arange(a, min(a + bm, b))
            assert rows.numel() > 0 and (r.expert[rows] == e).all()
            covered[rows] += 1
        assert (covered == 1).all() and s.num_tiles >= int((s.expert >= 0).sum())


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,k,D,I", [(1, 8, 4, 64, 32), (45, 8, 2, 80, 40), (30, 4, 1, 96, 72)])
def test_triton_kernels_match_references(dtype, T, E, k, D, I):
    """Each kernel beside its reference (same signature), outputs NaN-poisoned first; D, I off the tiles."""
    from mxmoe.backends.megablocks import kernels

    g = torch.Generator().manual_seed(T * 31 + D)
    x = torch.randn(T, D, generator=g).to(dtype)
    w1 = (torch.randn(E, 2 * I, D, generator=g) / math.sqrt(D)).to(dtype)
    b1 = (0.3 * torch.randn(E, 2 * I, generator=g)).to(dtype)
    w2 = (torch.randn(E, D, I, generator=g) / math.sqrt(I)).to(dtype)
    b2 = (0.3 * torch.randn(E, D, generator=g)).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, generator=g), -1).to(dtype)
    r = moe.sort_by_expert(w, idx, E)
    s = kernels.tile_schedule(r, 16)
    h = kernels.moe_mlp1_swiglu(x, w1, b1, r, ALPHA, LIMIT, s, out=torch.full((T * k, I), math.nan, dtype=dtype),
                                block_n=32, block_k=32)
    # The references in float64 on the same (rounded) operands: the kernels accumulate in float32 and round
    # once when they store, so they must land within an ulp of the output dtype (plus float32 sums); an ulp,
    # not half: the interpreter converts float32 to bfloat16 by truncation, the GPU to nearest.
    r64 = moe.sort_by_expert(w.double(), idx, E)
    h_ref = kernels.moe_mlp1_swiglu_ref(x.double(), w1.double(), b1.double(), r64, ALPHA, LIMIT)
    u = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -23
    assert ((h.double() - h_ref).abs() <= u * h_ref.abs() + 1e-5 * h_ref.abs().max()).all()
    y = kernels.moe_mlp2(h, w2, b2, r, s, out=torch.full((T * k, D), math.nan), block_n=32, block_k=32)
    y_ref = kernels.moe_mlp2_ref(h.double(), w2.double(), b2.double(), r64)
    assert not y.isnan().any()
    assert ((y.double() - y_ref).abs() <= 1e-5 * (y_ref.abs() + y_ref.abs().max())).all()


@needs_triton
@pytest.mark.parametrize("new_lens,past_lens", [([5, 3], [0, 4]), ([1, 1], [7, 2])])  # prefill, decode
def test_attention_goes_to_the_portable_kernel(new_lens, past_lens):
    """Where attention is claimed (a GPU), it is the triton engine's portable kernel: checked here through a
    subclass that claims it on the CPU (the kernel then runs in the interpreter), against the reference."""
    from mxmoe.core.batch import Batch

    class WithAttention(MegaBlocksBackend):
        name = "megablocks-attention"
        capabilities = MegaBlocksBackend.capabilities.model_copy(update=dict(
            ops=("attention", "router", "experts"), head_dims=(64,), attention_sinks=True, sliding_window=True))

    g = torch.Generator().manual_seed(sum(new_lens))
    Hq, Hkv, d, C = 4, 2, 64, 16
    batch = Batch.build(new_lens, past_lens, [1, 0], C)
    T = batch.num_tokens
    q, k, v = (torch.randn(T, h, d, generator=g).to(torch.bfloat16) for h in (Hq, Hkv, Hkv))
    sinks = torch.randn(Hq, generator=g)
    past = torch.randn(2, 2, C, Hkv, d, generator=g).to(torch.bfloat16)  # earlier tokens' keys/values
    outs = []
    for engine in (WithAttention(), TorchBackend()):
        kc, vc = past[0].clone(), past[1].clone()
        outs.append((engine.attention(q, k, v, sinks, kc, vc, batch, 4, d ** -0.5).float(), kc))
    (got, got_cache), (want, want_cache) = outs
    assert torch.equal(got_cache, want_cache)  # the new keys written where the slot mapping says
    assert torch.allclose(got, want, atol=2 ** -6, rtol=2 ** -6)
