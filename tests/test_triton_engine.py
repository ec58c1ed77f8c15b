"""The ``triton`` engine: its small-op kernels (backends/triton_engine/ops.py) against the float64 reference
engine, its probe and refusals, its registration, the conformance suite on it, and greedy generation
through it against the ``torch`` engine.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the
shapes are small. Oracle: ``TorchBackend`` in float64 on exactly the kernels' (bf16-rounded) inputs.
Bounds, bf16 outputs (u = 2^-8 is one ulp of 1, so rounding once to nearest costs at most u/2 relative):
the kernels compute in float32 and round once, so |out - ref| <= u/2 |ref| plus float32 error; the bounds
below allow u |ref| (twice the rounding) plus the float32 terms named at each test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mxmoe.backends.reference import TorchBackend
from mxmoe.conformance.testing import case_params, check_case
from mxmoe.core.backend import Capabilities, Linear, NotSupported
from mxmoe.core.batch import Batch, KVCache
from mxmoe.core.config import preset
from mxmoe.core.rope import yarn_inv_freq
from mxmoe.core.weights import ExpertLinear

pytest.importorskip("triton")
from mxmoe.backends.triton_engine import TritonBackend, interpreting  # noqa: E402
from mxmoe.backends.triton_engine import ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16 = torch.bfloat16
F64 = torch.float64
U = 2.0 ** -8  # bf16: one ulp of 1
REF = TorchBackend()
ENGINE = TritonBackend()
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(),
                                reason="no CUDA device and TRITON_INTERPRET is not set")


@pytest.fixture(autouse=True)
def _few_threads():
    # Many small ops on 2 shared cores: torch's intra-op threads only oversubscribe (FACTS.md).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bf16(t: torch.Tensor) -> torch.Tensor:
    """Round to bf16 and put on the device: the kernel's input, exactly."""
    return t.to(BF16).to(DEVICE)


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().to(F64)


def poison(shape, dtype=BF16) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def assert_within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    out = f64(out)
    assert torch.isfinite(out).all(), f"{what}: non-finite output (an element left unwritten?)"
    err = (out - ref).abs()
    ratio = (err / bound).max().item()
    worst = int((err / bound).argmax())
    assert ratio <= 1.0, (f"{what}: error {err.flatten()[worst].item():.3g} at flat index {worst} is "
                          f"{ratio:.2f}x the bound {bound.flatten()[worst].item():.3g}")


def assert_matches_reference_kernel(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """The kernel against its PyTorch twin (same math in float32, one rounding): equal but for the rare
    element whose float32 value differs in the last bits right at a bf16 rounding boundary. Truncating
    instead of rounding to nearest (the interpreter's own float32 → bf16 cast) differs in ~half of them."""
    diff = (out.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
    assert diff.max().item() <= 1, f"{what}: kernel and reference differ by more than one bf16 ulp"
    assert (diff > 0).float().mean().item() <= 0.01, f"{what}: {(diff > 0).sum().item()} of {diff.numel()} differ"


# ---- embedding ---------------------------------------------------------------------------------------

def test_embedding_is_an_exact_gather():
    g = gen(0)
    V, D, T = 1000, 200, 17  # D not a multiple of the block
    table = bf16(torch.randn(V, D, generator=g))
    ids = torch.randint(V, (T,), generator=g)
    ids[0], ids[-1] = 0, V - 1
    ids = ids.to(DEVICE)
    out = ops.embedding(ids, table, out=poison((T, D)))
    assert torch.equal(f64(out), REF.embedding(ids.cpu(), f64(table)))
    assert torch.equal(ENGINE.embedding(ids, table), out)
    assert torch.equal(ops.embedding_ref(ids, table), out)


# ---- rms_norm ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("D", [64, 2880, 5000])  # 5000: more than one block of the row (4096)
def test_rms_norm_rows_of_very_different_magnitude(D):
    g = gen(D)
    T = 12
    rows = 10.0 ** (torch.rand(T, 1, generator=g, dtype=F64) * 8 - 4)  # 1e-4 … 1e4
    x = bf16(torch.randn(T, D, generator=g, dtype=F64) * rows)
    scale = (torch.randn(D, generator=g) * 0.5 + 1.0).to(DEVICE)  # float32, as the model keeps it
    out = ops.rms_norm(x, scale, 1e-5, out=poison((T, D)))
    assert out.dtype == BF16 and out.shape == (T, D)
    ref = REF.rms_norm(f64(x), f64(scale), 1e-5)
    # float32: the sum of squares over D (D u32 relative at worst, halved by the square root), the
    # products; rows of 1e-4 have mean(x²) ~ 1e-8, where eps = 1e-5 matters: the oracle has the same eps.
    bound = U * ref.abs() + (D * 2.0 ** -24 + 8 * 2.0 ** -24) * ref.abs() + 1e-30
    assert_within(out, ref, bound, "rms_norm")
    assert_matches_reference_kernel(out, ops.rms_norm_ref(x, scale, 1e-5), "rms_norm")
    assert torch.equal(ENGINE.rms_norm(x, scale, 1e-5), out)


def test_rms_norm_takes_a_strided_row_view():
    g = gen(1)
    base = bf16(torch.randn(6, 2 * 96, generator=g))
    x = base[:, 96:]  # rows 192 apart
    scale = torch.rand(96, generator=g).to(DEVICE) + 0.5
    out = ops.rms_norm(x, scale, 1e-6)
    assert_matches_reference_kernel(out, ops.rms_norm_ref(x.contiguous(), scale, 1e-6), "rms_norm (strided)")


def test_add_rms_norm_scale_loaded_before_the_wait_gives_the_same_bits(monkeypatch):
    # pdl.EARLY_STATIC (on by default): the scale is loaded before the PDL wait instead of after
    # the reduction; the same bits either way (one-pass rows, D <= 4096, as gpt-oss's 2880).
    from mxmoe.backends.triton_engine import pdl

    g = gen(3)
    x, delta = bf16(torch.randn(3, 2880, generator=g)), bf16(torch.randn(3, 2880, generator=g))
    scale = torch.rand(2880, generator=g).to(DEVICE) + 0.5
    monkeypatch.setattr(pdl, "EARLY_STATIC", False)
    s0, h0 = ops.add_rms_norm(x, delta, scale, 1e-5)
    monkeypatch.setattr(pdl, "EARLY_STATIC", True)
    s1, h1 = ops.add_rms_norm(x, delta, scale, 1e-5)
    assert torch.equal(s1, s0) and torch.equal(h1, h0)
    ref_s, ref_h = ops.add_rms_norm_ref(x, delta, scale, 1e-5)
    assert torch.equal(s1, ref_s)
    assert_matches_reference_kernel(h1, ref_h, "add_rms_norm (early scale)")


# ---- rope --------------------------------------------------------------------------------------------

def _qkv_views(g, T, Hq, Hkv, d):
    """q, k as the model hands them: views into one (T, (Hq + 2 Hkv) d) QKV output."""
    qkv = bf16(torch.randn(T, (Hq + 2 * Hkv) * d, generator=g))
    q = qkv[:, :Hq * d].reshape(T, Hq, d)
    k = qkv[:, Hq * d:(Hq + Hkv) * d].reshape(T, Hkv, d)
    return q, k


@pytest.mark.parametrize("d", [64, 16])  # 64: gpt-oss; 16: a small head the kernel serves too
def test_rope_yarn_at_positions_past_32k(d):
    g = gen(d)
    T, Hq, Hkv = 9, 8, 2
    cfg = preset("gpt-oss-20b", head_dim=d)
    inv_freq, conc = yarn_inv_freq(cfg, torch.float32)
    positions = torch.randint(32768, 131072, (T,), generator=g)
    positions[0], positions[1] = 0, 131071
    q, k = _qkv_views(g, T, Hq, Hkv, d)
    qo, ko = ops.rope(q, k, positions.to(DEVICE), inv_freq.to(DEVICE), conc, out=(poison((T, Hq, d)),
                                                                                 poison((T, Hkv, d))))
    for name, x, o in (("q", q, qo), ("k", k, ko)):
        x64 = f64(x)
        x1, x2 = x64.chunk(2, dim=-1)
        mag = conc * torch.cat((x1.abs() + x2.abs(),) * 2, dim=-1)
        # (1) Against the float64 math on the kernel's own float32 angle (positions·inv_freq rounded
        # once, as the reference rounds it): only bf16 rounding and float32 arithmetic remain.
        angle32 = (positions.float()[:, None] * inv_freq[None, :]).to(F64)
        cos, sin = (angle32.cos() * conc)[:, None, :], (angle32.sin() * conc)[:, None, :]
        exact = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        assert_within(o, exact, U * exact.abs() + 2.0 ** -20 * mag, f"rope {name} (fp32 angle)")
        # (2) Against the torch engine in float64 (exact angles): the float32 angle's rounding
        # (|angle| u32) moves each output by up to |angle| u32 · mag.
        ref = REF.rope(x64, x64, positions, inv_freq.to(F64), conc)[0]
        theta = (positions.to(F64)[:, None] * inv_freq.to(F64)[None, :]).abs()
        angle_err = torch.cat((theta, theta), dim=-1)[:, None, :] * 2.0 ** -23
        assert_within(o, ref, U * ref.abs() + (angle_err + 2.0 ** -20) * mag, f"rope {name} (float64 reference)")
        assert_matches_reference_kernel(o, ops.rope_ref(x, x, positions.to(DEVICE), inv_freq.to(DEVICE), conc)[0],
                                        f"rope {name}")
    if d in TritonBackend.capabilities.head_dims:  # the kernel takes any even d; the engine claims some
        qe, ke = ENGINE.rope(q, k, positions.to(DEVICE), inv_freq.to(DEVICE), conc)
        assert torch.equal(qe, qo) and torch.equal(ke, ko)


def test_rope_rotates_halves_not_pairs():
    # One frequency pair, angle π/2 at position 1: halves map (x1, x2) → (-x2, x1).
    d = 4
    q = bf16(torch.tensor([[[1.0, 2.0, 3.0, 4.0]]]))
    k = bf16(torch.tensor([[[5.0, 6.0, 7.0, 8.0]]]))
    inv_freq = torch.tensor([math.pi / 2, 0.0], device=DEVICE)
    qo, ko = ops.rope(q, k, torch.tensor([1], device=DEVICE), inv_freq, 1.0)
    assert torch.allclose(f64(qo), torch.tensor([[[-3.0, 2.0, 1.0, 4.0]]], dtype=F64), atol=1e-6)
    assert torch.allclose(f64(ko), torch.tensor([[[-7.0, 6.0, 5.0, 8.0]]], dtype=F64), atol=1e-6)


# ---- router ------------------------------------------------------------------------------------------

def _router_check(x, w, b, k, exact: bool):
    gate = ENGINE.prepare_linear(w, b, BF16, DEVICE)
    weights, indices = ENGINE.router(x, gate, k)
    assert weights.dtype == BF16 and indices.dtype == torch.int64 and weights.shape == indices.shape == (x.shape[0], k)
    ref_w, ref_i = REF.router(f64(x), Linear(f64(w), f64(b)), k)
    if exact:
        assert torch.equal(indices.cpu(), ref_i), "top-k differs: ties must go to the lower expert index"
    else:
        # Logits are rounded to bf16 before the top-k: an expert may swap with one whose exact logit is
        # within that rounding; all others must agree.
        logits = f64(x) @ f64(w).T + f64(b)
        chosen = logits.gather(1, indices.cpu())
        ref_chosen = logits.gather(1, ref_i)
        assert (chosen - ref_chosen).abs().max().item() <= 4 * U * logits.abs().max().item()
    # Softmax of the chosen logits: the engine's bf16 logits against the float64 ones (u relative each).
    logits_chosen = (f64(x) @ f64(w).T + f64(b)).gather(1, indices.cpu())
    ref_weights = torch.softmax(logits_chosen, dim=-1)
    spread = U * logits_chosen.abs().amax(dim=-1, keepdim=True)
    assert_within(weights, ref_weights, U * ref_weights + 2 * spread * ref_weights + 1e-6, "router weights")
    return weights, indices


def test_router_ties_go_to_the_lower_index():
    # Small integers: every logit is exact in bf16, and experts come in groups of 4 identical rows.
    g = gen(2)
    T, D, E, k = 40, 32, 128, 4
    x = torch.randint(-2, 3, (T, D), generator=g).to(F64)
    base = torch.randint(-1, 2, (E // 4, D), generator=g).to(F64)
    w = base.repeat_interleave(4, dim=0)[torch.randperm(E, generator=g)]
    b = torch.zeros(E, dtype=F64)
    logits = x @ w.T
    ties = sum(int((row.unique(return_counts=True)[1] > 1).any()) for row in logits)
    assert ties == T  # the case must exercise what it says
    _router_check(bf16(x), bf16(w), bf16(b), k, exact=True)


def test_router_random_logits():
    g = gen(3)
    T, D, E, k = 37, 64, 128, 4  # T not a multiple of the kernel's token block
    x = bf16(torch.randn(T, D, generator=g))
    w = bf16(torch.randn(E, D, generator=g) / math.sqrt(D))
    b = bf16(torch.randn(E, generator=g) * 0.1)
    _, indices = _router_check(x, w, b, k, exact=False)
    assert (indices.cpu().sort(dim=1).values.diff(dim=1) > 0).all()  # distinct experts


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the all -inf row, in numpy
def test_topk_softmax_kernel_matches_its_reference_on_awkward_logits():
    g = gen(4)
    T, E, k = 21, 32, 4
    logits = torch.randint(-3, 4, (T, E), generator=g).float()
    logits[0] = float("-inf")  # nothing to choose but -inf: still k distinct, lowest indices first
    logits[1, :E - 2] = float("-inf")  # fewer finite logits than k
    logits[2, 5] = float("nan")  # the reference's sort puts NaN first
    logits = bf16(logits)
    w, i = ops.topk_softmax(logits, k, out=(poison((T, k)), torch.full((T, k), -1, dtype=torch.int64, device=DEVICE)))
    # The reference on the CPU: torch.sort puts NaN first there (the kernel's order on every device), while on
    # CUDA it puts NaN last (seen on the H200: row 2 came back without expert 5).
    wr, ir = (t.to(logits.device) for t in ops.topk_softmax_ref(logits.cpu(), k))
    assert torch.equal(i, ir)
    assert ((i >= 0) & (i < E)).all()
    assert torch.equal(i[0].cpu(), torch.arange(k))
    finite = torch.isfinite(wr).all(dim=1)
    assert torch.equal(torch.isfinite(w).all(dim=1), finite) and not finite[0] and not finite[2]
    assert_within(w[finite], f64(wr[finite]), U * f64(wr[finite]) + 1e-6, "topk_softmax weights")
    # k == E: every expert, sorted
    w, i = ops.topk_softmax(logits[3:], E)
    assert torch.equal(i.cpu(), ops.topk_softmax_ref(logits[3:].cpu(), E)[1])


# ---- linear ------------------------------------------------------------------------------------------

def test_linear_is_the_reference_call():
    g = gen(5)
    x = bf16(torch.randn(5, 96, generator=g))
    w, b = torch.randn(48, 96, generator=g), torch.randn(48, generator=g)  # canonical float32 in, bf16 out
    layer = ENGINE.prepare_linear(w, b, BF16, DEVICE)
    assert layer.weight.dtype == BF16 and layer.weight.is_contiguous()
    out = ENGINE.linear(x, layer)
    ref = REF.linear(f64(x), REF.prepare_linear(bf16(w).cpu(), bf16(b).cpu(), F64, "cpu"))
    # bf16 output rounding, float32 accumulation over K = 96 terms.
    bound = U * ref.abs() + 96 * 2.0 ** -23 * (f64(x).abs() @ f64(layer.weight).abs().T) + 1e-6
    assert_within(out, ref, bound, "linear")


# ---- probe, claims, refusals ---------------------------------------------------------------------------

def test_probe_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ModuleNotFoundError
    p = TritonBackend().probe("cuda")
    assert not p.available and p.reason == "triton not installed: pip install 'mxmoe[triton]'"


def test_probe_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = TritonBackend().probe("cpu")
    assert not p.available and "TRITON_INTERPRET=1" in p.reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = TritonBackend().probe("cpu")
    if "cpu" in TritonBackend().capabilities.devices:  # imported under the interpreter (the CPU test run)
        assert p.available
    else:  # imported for a GPU: the interpreter cannot be switched on afterwards, and the reason says so
        assert not p.available and "before starting Python" in p.reason
    assert not TritonBackend().probe("mps").available


def test_programmatic_dependent_launch_only_on_hopper_and_later(monkeypatch):
    from mxmoe.backends.triton_engine import pdl
    assert pdl.launch_options(torch.zeros(1)) == {"GDC": False}  # CPU tensors (the interpreter): no PDL
    monkeypatch.setattr(pdl, "_INTERPRET", False)
    for cc, env, want in (((8, 0), "1", False), ((9, 0), "1", True), ((10, 0), "1", True), ((9, 0), "0", False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, cc=cc: cc)
        monkeypatch.setenv("MXMOE_TRITON_PDL", env)
        pdl._enabled.cache_clear()
        assert pdl._enabled(0) is want, (cc, env)
    pdl._enabled.cache_clear()


def test_large_grids_launch_without_pdl_only_when_asked(monkeypatch):
    # MXMOE_TRITON_PDL_MAX_PROGRAMS (pdl.MAX_PROGRAMS, default 0: no limit): grids of at least that many programs
    # are launched without PDL; grids of unknown size keep it.
    from mxmoe.backends.triton_engine import pdl

    monkeypatch.setattr(pdl, "_enabled", lambda index: True)
    monkeypatch.setattr(pdl, "MAX_PROGRAMS", 0)
    assert pdl.pdl_for(0, 10 ** 6) and pdl.pdl_for(0, None)
    monkeypatch.setattr(pdl, "MAX_PROGRAMS", 512)
    assert pdl.pdl_for(0, 511) and not pdl.pdl_for(0, 512) and pdl.pdl_for(0, None)
    monkeypatch.setattr(pdl, "_enabled", lambda index: False)
    assert not pdl.pdl_for(0, 1)


def _fake_cuda(monkeypatch, cc=(9, 0), available=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cc)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes the CUDA runtime; only where there is none")
def test_probe_cuda_reasons(monkeypatch):
    _fake_cuda(monkeypatch, available=False)
    p = TritonBackend().probe("cuda")
    assert not p.available and "no CUDA device" in p.reason
    _fake_cuda(monkeypatch, cc=(7, 5))
    p = TritonBackend().probe("cuda")
    assert not p.available and p.reason == "compute capability 7.5 < 8.0"
    _fake_cuda(monkeypatch, cc=(8, 0))
    assert TritonBackend().probe("cuda:0").available
    assert not TritonBackend().probe("cuda:3").available  # one device only
    _fake_cuda(monkeypatch)
    p = TritonBackend().probe("cuda")
    assert p.available and "9.0" in p.reason

    def broken(index=None):
        raise RuntimeError("CUDA driver version is insufficient")

    monkeypatch.setattr(torch.cuda, "get_device_capability", broken)
    p = TritonBackend().probe("cuda")  # answers, never raises
    assert not p.available and "CUDA driver version is insufficient" in p.reason


def test_capabilities_are_honest_data():
    caps = TritonBackend.capabilities
    assert Capabilities.model_validate_json(caps.model_dump_json()) == caps
    assert caps.dtypes == ("bfloat16",) and caps.mxfp4 == "native" and not caps.dense_experts
    assert caps.cuda_graphs and caps.attention_sinks and caps.sliding_window and caps.determinism == "run_to_run"
    assert 64 in caps.head_dims
    assert ("cpu" in caps.devices) == interpreting() and "cuda" in caps.devices
    assert TritonBackend.priority > TorchBackend.priority or interpreting()


def _unclaimed_head_dim() -> int:
    return next(d for d in (128, 96, 80, 48) if d not in TritonBackend.capabilities.head_dims)


def test_refusals_are_not_supported():
    g = gen(6)
    e = TritonBackend()
    x64 = torch.randn(4, 64, generator=g, dtype=F64).to(DEVICE)
    with pytest.raises(NotSupported, match="float64"):
        e.rms_norm(x64, torch.ones(64, device=DEVICE), 1e-5)
    with pytest.raises(NotSupported, match="float32"):
        e.prepare_linear(torch.randn(8, 64), None, torch.float32, DEVICE)
    with pytest.raises(NotSupported, match="float64"):
        e.embedding(torch.tensor([0], device=DEVICE), x64)
    # Dense (Hugging Face bf16) experts are not served.
    dense1 = ExpertLinear(bias=torch.zeros(2, 128), weight=torch.randn(2, 128, 64).to(BF16))
    dense2 = ExpertLinear(bias=torch.zeros(2, 64), weight=torch.randn(2, 64, 64).to(BF16))
    with pytest.raises(NotSupported, match="dense"):
        e.prepare_experts(dense1, dense2, BF16, DEVICE)
    # An unclaimed head dim, in rope and attention.
    d = _unclaimed_head_dim()
    T, Hq, Hkv = 3, 4, 2
    q, k, v = (bf16(torch.randn(T, h, d, generator=g)) for h in (Hq, Hkv, Hkv))
    with pytest.raises(NotSupported, match=f"head_dim {d}"):
        e.rope(q, k, torch.arange(T, device=DEVICE), torch.ones(d // 2, device=DEVICE), 1.0)
    cache = KVCache.allocate(1, 1, 8, Hkv, d, BF16, DEVICE)
    batch = Batch.build([T], [0], [0], 8, DEVICE)
    with pytest.raises(NotSupported, match=f"head_dim {d}"):
        e.attention(q, k, v, torch.zeros(Hq, device=DEVICE), *cache.layer(0), batch, 0, d ** -0.5)


# ---- registration and selection ------------------------------------------------------------------------

def _env_without_interpreter() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU-only process, whatever this machine has
    return env


def test_registered_and_listed_by_mxmoe_backends():
    res = subprocess.run([sys.executable, "-m", "mxmoe.core.cli", "backends", "--json"], capture_output=True,
                         text=True, env=_env_without_interpreter(), cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)["backends"]}
    t = rows["triton"]
    assert t["plugin"] == "builtin" and t["cls"] == "mxmoe.backends.triton_engine:TritonBackend"
    assert t["priority"] > rows["torch"]["priority"]
    assert t["capabilities"]["devices"] == ["cuda"]  # no interpreter: CUDA only
    assert not t["available"] and "TRITON_INTERPRET" in t["reason"]


def test_auto_on_cpu_does_not_pick_it_and_prefers_it_on_cuda():
    # Without the interpreter, in a fresh process: the CPU is not claimed; a (faked) sm90 GPU prefers triton.
    script = """
import json, torch
from mxmoe.plugins import resolve_backends
cpu = {op: b.name for op, b in resolve_backends(device="cpu", dtype="bfloat16").ops.items()}
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.current_device = lambda: 0
torch.cuda.get_device_capability = lambda index=None: (9, 0)
torch.cuda.get_device_name = lambda index=None: "Fake H200"
cuda = {op: b.name for op, b in resolve_backends(device="cuda", dtype="bfloat16").ops.items()}
print(json.dumps({"cpu": cpu, "cuda": cuda}))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=_env_without_interpreter(), cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(got["cpu"].values()) == {"torch"}
    assert set(got["cuda"].values()) == {"triton"}


def test_under_the_interpreter_auto_still_prefers_the_reference():
    from mxmoe.plugins import resolve_backends

    if not interpreting() or DEVICE != "cpu":
        pytest.skip("checks the interpreter's CPU claim")
    auto = resolve_backends(device="cpu", dtype="bfloat16")
    assert {b.name for b in auto.ops.values()} == {"torch"}
    named = resolve_backends("triton", device="cpu", dtype="bfloat16", strict=True)
    assert {b.name for b in named.ops.values()} == {"triton"}


# ---- the conformance suite on the engine ---------------------------------------------------------------
# L0 (the interface), L1 (every op) and L2 (the attention and MoE blocks), one test per case; L3 (whole tiny
# models) runs for every registered engine in tests/test_conformance.py::test_every_registered_backend_conforms_on_cpu.
# On a GPU: every case, real shapes included. Off CUDA the suite leaves out its real-shape cases, and in
# Triton's CPU interpreter the small grid still takes ~3 minutes of CPU; the cases below, 7-22 s each, each
# a variant of a case that runs or checked by the kernels' own tests, are skipped there (measured on the
# shared 2-core machine).
INTERPRETER_SKIPS = {
    "L1/attention/long_decode_d*": "split-KV decode over 4100 keys (long_decode_windowed, decode run)",
    "L1/attention/long_sum_d*": "a long exact sum over the keys (long_context_windowed runs)",
    "L1/experts/swiglu_clamp@*": "the clamps (in every random case; tests/test_triton_moe.py checks them)",
    "L1/experts/swiglu_negative_gate@*": "the gate clamped above only (tests/test_triton_moe.py checks the clamps)",
    "L1/experts/e8m0_nan@*": "NaN scales (tests/test_triton_moe.py checks where NaN goes)",
    "L1/experts/one_expert@*": "300 tokens on one expert (random_mxfp4 runs)",
    "L1/experts/topk_eq_experts@*": "k = E (random_mxfp4 runs; the router's k = E case runs)",
}


# Known failures under the interpreter, kept visible (strict xfail: the test fails as soon as it passes), by case
# id pattern. None now. (Until issue 11's fix of 2026-12-01 the five bit-exactness cases mxfp4_dequant_mlp*,
# mxfp4_scale_extremes_* and mxfp4_e8m0_every_byte were listed here: exact zeros came back as 1.17e-38, from
# moe.py rounding fp32 -> bf16 by hand into an fp32 subnormal (0 + 0x7FFF) that the interpreter then converted
# wrongly; the kernels now build the bf16 bits themselves there. The GPU was never affected.)
INTERPRETER_KNOWN_FAILURES: set[str] = set()


def _conformance_params():
    import fnmatch

    out = []
    for p in case_params(TritonBackend, levels=["L0", "L1", "L2"], dtypes=["bfloat16"]):
        why = next((w for pat, w in INTERPRETER_SKIPS.items() if fnmatch.fnmatchcase(p.id, pat)), None)
        on_interpreter = interpreting() and DEVICE == "cpu"
        if why and on_interpreter:
            p = pytest.param(*p.values, id=p.id, marks=pytest.mark.skip(
                reason=f"too slow for Triton's CPU interpreter, checked on the GPU: {why}"))
        elif on_interpreter and any(fnmatch.fnmatchcase(p.id, pat) for pat in INTERPRETER_KNOWN_FAILURES):
            p = pytest.param(*p.values, id=p.id, marks=pytest.mark.xfail(
                strict=True, reason="known: subnormal float32 outputs at the lowest E8M0 scales come out 0 "
                                    "(see INTERPRETER_KNOWN_FAILURES)"))
        out.append(p)
    return out


@pytest.mark.parametrize("case", _conformance_params())
def test_conformance(case):
    check_case(TritonBackend, case, device=DEVICE)


# ---- the whole engine: greedy generation against the torch engine ------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from mxmoe.core.checkpoint import write_random_checkpoint

    path = tmp_path_factory.mktemp("triton-tiny") / "ckpt"
    # tiny's shapes at gpt-oss's head dim (the one the engine claims)
    write_random_checkpoint(path, preset("tiny", head_dim=64), "original", seed=0)
    return path


def test_greedy_generation_matches_the_torch_engine(tiny_checkpoint):
    from mxmoe.core.model import load_model

    engine = load_model(tiny_checkpoint, backend="triton", device=DEVICE, dtype="bfloat16", strict=True)
    assert {b.name for b in engine.resolution.backends.values()} == {"triton"}
    ref = load_model(tiny_checkpoint, backend="torch", device=DEVICE, dtype="bfloat16")
    prompt = torch.randint(engine.config.vocab_size, (11,), generator=gen(8)).tolist()
    got = list(engine.generate(prompt, max_tokens=6))
    want = list(ref.generate(prompt, max_tokens=6))
    assert len(set(want)) > 3  # a continuation that tells engines apart, not one token repeated
    # The prefill logits, against the torch engine in float32 (bf16 rounding through 2 layers: ~1% of the
    # logits' scale here; a wrong op is off by their whole scale).
    ref32 = load_model(tiny_checkpoint, backend="torch", device=DEVICE, dtype="float32")
    lt, lr = f64(engine.logits(prompt)), f64(ref32.logits(prompt))
    scale = lr.abs().max().item()
    assert (lt - lr).abs().max().item() <= 0.05 * scale
    if got != want:
        # Legitimate only at a near-tie: where the tokens part, the float32 reference (teacher-forced on
        # the common prefix) must rate the two candidates within the engines' rounding of each other.
        i = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
        last = f64(ref32.logits(prompt + want[:i]))[-1]
        gap = (last[want[i]] - last[got[i]]).abs().item()
        assert gap <= 0.02 * scale, f"token {i}: triton chose {got[i]}, torch {want[i]}; logit gap {gap:.3g}"
