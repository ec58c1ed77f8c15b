"""The fused op ``rope_attention`` (Backend API 1.2, issue 11): RoPE + the KV-cache write + attention.

* core: ``fused_op`` calls the fused method where one backend serves both ops and composes ``rope`` and
  ``attention`` on their own backends otherwise (per-op selection mixing engines); the base class's default
  composes the engine's own ops and checks the union of both ops' claims first.
* triton (backends/triton_engine/attention.py): the one-kernel decode path against the composition of the
  engine's own rope and attention kernels (bit for bit under the interpreter when the splits are merged by
  the merge kernel, within a last-bit difference when the last split merges them) and against the float64
  reference; the caches afterwards; outputs NaN-poisoned first, caches NaN where nothing was written.
* the graph: a decode step through the triton engine runs the fused kernel, and its logits match the
  reference engine's.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py), so shapes are small and key
blocks tiny (16). Attention bound as tests/test_triton_attention.py: 2u(|o| + M) + 1e-5 in bf16, with the
float64 oracle run on the rotated q and k the rope kernel gives (the fused kernel rotates bit for bit as it
does: checked through the cache it writes).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

from mxmoe.backends.reference import TorchBackend
from mxmoe.core.backend import FUSED_OPS, OPS, Backend, NotSupported, fused_op
from mxmoe.core.batch import Batch
from mxmoe.core.config import preset
from mxmoe.core.rope import yarn_inv_freq

sys.path.insert(0, str(Path(__file__).parent))

BF16, F64 = torch.bfloat16, torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
U = 2.0 ** -8
REF = TorchBackend()


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops on 2 shared cores (FACTS.md)
    yield
    torch.set_num_threads(old)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, NaN included (caches are NaN where nothing was written)."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.cpu().view(ints), b.cpu().view(ints))


@dataclasses.dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    inv_freq: torch.Tensor
    concentration: float
    sinks: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    batch: Batch
    window: int
    sm_scale: float

    def args(self, k_cache=None, v_cache=None):
        return (self.q, self.k, self.v, self.positions, self.inv_freq, self.concentration, self.sinks,
                self.k_cache if k_cache is None else k_cache, self.v_cache if v_cache is None else v_cache,
                self.batch, self.window, self.sm_scale)


def make_case(new_lens, past_lens, rows, *, num_rows, Hq=8, Hkv=2, d=64, window=0, dtype=BF16, seed=0,
              slack=3, strided=True, device=DEVICE) -> Case:
    """Fresh random inputs. q, k, v are views into one (T, Q + 2 KV) tensor, as the graph slices its QKV
    layer's output (strided rows); caches NaN except each sequence's cached prefix."""
    g = gen(seed)
    cache_len = max(p + n for p, n in zip(past_lens, new_lens)) + slack
    batch = Batch.build(new_lens, past_lens, rows, cache_len, device=device)
    T = sum(new_lens)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    if strided:
        qkv = rnd(T, (Hq + 2 * Hkv) * d)
        q = qkv[:, :Hq * d].reshape(T, Hq, d)
        k = qkv[:, Hq * d:(Hq + Hkv) * d].reshape(T, Hkv, d)
        v = qkv[:, (Hq + Hkv) * d:].reshape(T, Hkv, d)
    else:
        q, k, v = rnd(T, Hq, d), rnd(T, Hkv, d), rnd(T, Hkv, d)
    kc = torch.full((num_rows, cache_len, Hkv, d), float("nan"), dtype=dtype, device=device)
    vc = torch.full_like(kc, float("nan"))
    for r, p in zip(rows, past_lens):
        kc[r, :p], vc[r, :p] = rnd(p, Hkv, d), rnd(p, Hkv, d)
    inv_freq, conc = yarn_inv_freq(preset("gpt-oss-20b", head_dim=d), torch.float32)
    sinks = torch.randn(Hq, generator=g).to(device)
    return Case(q, k, v, batch.positions, inv_freq.to(device), conc, sinks, kc, vc, batch, window, d ** -0.5)


# ---- core: the helper the graph calls, and the base class's default -------------------------------------

class Spy(TorchBackend):
    """The reference, logging which ops and fused ops it runs."""

    name = "spy-torch"

    def __init__(self):
        self.calls: list[str] = []

    def rope(self, *a):
        self.calls.append("rope")
        return super().rope(*a)

    def attention(self, *a):
        self.calls.append("attention")
        return super().attention(*a)

    def rope_attention(self, *a):
        self.calls.append("rope_attention")
        return super().rope_attention(*a)


def test_fused_ops_name_the_ops_they_fuse():
    assert FUSED_OPS == {"add_rms_norm": ("rms_norm",), "rope_attention": ("rope", "attention")}
    assert all(op in OPS for ops in FUSED_OPS.values() for op in ops)


def test_fused_op_runs_fused_on_one_backend_and_composes_across_backends():
    c = make_case([1, 1, 4], [5, 0, 9], [2, 0, 1], num_rows=3, dtype=torch.float32, device="cpu")
    one = Spy()
    fn = fused_op({op: one for op in OPS}, "rope_attention")
    assert fn == one.rope_attention
    out_one = fn(*c.args(c.k_cache.clone(), c.v_cache.clone()))
    assert one.calls == ["rope_attention", "rope", "attention"]  # the default composes its own ops
    rope_from, attention_from = Spy(), Spy()
    ops = {op: REF for op in OPS} | {"rope": rope_from, "attention": attention_from}
    kc, vc = c.k_cache.clone(), c.v_cache.clone()
    out_mixed = fused_op(ops, "rope_attention")(*c.args(kc, vc))
    assert rope_from.calls == ["rope"] and attention_from.calls == ["attention"]  # each op on its own backend
    # The same bits as the composition written out, and as the fused default on one backend.
    kc2, vc2 = c.k_cache.clone(), c.v_cache.clone()
    q, k = REF.rope(c.q, c.k, c.positions, c.inv_freq, c.concentration)
    want = REF.attention(q, k, c.v, c.sinks, kc2, vc2, c.batch, c.window, c.sm_scale)
    assert same_bits(out_mixed, want) and same_bits(out_one, want)
    assert same_bits(kc, kc2) and same_bits(vc, vc2)
    # add_rms_norm: one op, always the backend's own method.
    assert fused_op(ops, "add_rms_norm") == REF.add_rms_norm


def test_default_rope_attention_checks_both_ops_claims_first():
    c = make_case([1], [3], [0], num_rows=1, dtype=torch.float32, device="cpu")

    def narrowed(**update):
        return type("Narrow", (TorchBackend,), dict(name="narrow", capabilities=TorchBackend.capabilities.model_copy(
            update=update)))()

    no_rope = narrowed(ops=tuple(o for o in OPS if o != "rope"))
    no_attention = narrowed(ops=tuple(o for o in OPS if o != "attention"))
    no_window = narrowed(sliding_window=False)
    short = narrowed(max_context=3)
    windowed = dataclasses.replace(c, window=2)
    for engine, case, why in ((no_rope, c, "rope"), (no_attention, c, "attention"), (no_window, windowed, "sliding"),
                              (short, c, "context"), (narrowed(head_dims=(128,)), c, "head_dim")):
        kc = case.k_cache.clone()
        with pytest.raises(NotSupported, match=why):
            engine.rope_attention(*case.args(kc, case.v_cache.clone()))
        assert same_bits(kc, case.k_cache), "refused after writing the cache"
    assert no_window.rope_attention(*c.args(c.k_cache.clone(), c.v_cache.clone())).shape == c.q.shape


# ---- triton ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def A():
    pytest.importorskip("triton")
    from mxmoe.backends.triton_engine import interpreting

    if DEVICE == "cpu" and not interpreting():
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set")
    from mxmoe.backends.triton_engine import attention

    return attention


@pytest.fixture(scope="module")
def engine(A):
    from mxmoe.backends.triton_engine import TritonBackend

    return TritonBackend()


BLOCK_N = dict(block_n=16) if INTERPRET else {}


def composed(A, c: Case, num_splits=None):
    """The engine's rope kernel, its cache write, its split-KV decode (+ merge kernel): today's 3-4 kernels."""
    kc, vc = c.k_cache.clone(), c.v_cache.clone()
    q, k = A.rope(c.q, c.k, c.positions, c.inv_freq, c.concentration)
    A.kv_cache_write(k, c.v, kc, vc, c.batch.slot_mapping)
    out = A.decode_attention(q, kc, vc, c.sinks, c.batch, c.window, c.sm_scale, num_splits=num_splits, **BLOCK_N)
    return out, kc, vc, q, k


def fused(A, c: Case, **kw):
    kc, vc = c.k_cache.clone(), c.v_cache.clone()
    out = torch.full(c.q.shape, float("nan"), dtype=c.q.dtype, device=c.q.device)  # poisoned
    A.rope_decode_attention(*c.args(kc, vc), out=out, **{**BLOCK_N, **kw})
    return out, kc, vc


def oracle(c: Case, q: torch.Tensor, k: torch.Tensor):
    """(output, M = the same attention over |v|), float64 on the CPU, on the given (rotated) q and k."""
    def f(t):
        return t.detach().cpu().double()

    batch = Batch(*(f(x).long() if isinstance(x, torch.Tensor) else x for x in dataclasses.astuple(c.batch)))
    ref = REF.attention(f(q), f(k), f(c.v), f(c.sinks), f(c.k_cache), f(c.v_cache), batch, c.window, c.sm_scale)
    mag = REF.attention(f(q), f(k), f(c.v).abs(), f(c.sinks), f(c.k_cache), f(c.v_cache).abs(), batch, c.window,
                        c.sm_scale)
    return ref, mag


def assert_close(out, ref, mag):
    out = out.detach().cpu().double()
    assert torch.isfinite(out).all(), "non-finite output (an unwritten element or a poisoned key was read)"
    bound = 2 * U * (ref.abs() + mag) + 1e-5
    worst = ((out - ref).abs() / bound).max().item()
    assert worst <= 1.0, f"{worst:.2f}x the bound"


def ulps_apart(a, b):
    return (a.cpu().view(torch.int16).int() - b.cpu().view(torch.int16).int()).abs()


# Several decode sequences of different lengths in permuted rows (row 0 not first, a spare NaN row), one at its
# first token; windows crossed (positions past the window, at it, below it).
DECODE = [
    dict(past=[40, 0, 7, 130], rows=[3, 1, 0, 2], num_rows=5, window=0, Hq=8, Hkv=2),
    dict(past=[127, 128, 150, 3], rows=[2, 4, 1, 0], num_rows=5, window=128, Hq=8, Hkv=2),
    dict(past=[30, 9, 1], rows=[1, 2, 0], num_rows=4, window=8, Hq=8, Hkv=4),
]


@pytest.mark.parametrize("spec", DECODE, ids=["nowindow", "window128", "window8-gqa2"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fused_decode_is_the_composition_bit_for_bit(A, spec, num_splits):
    c = make_case([1] * len(spec["past"]), spec["past"], spec["rows"], num_rows=spec["num_rows"],
                  window=spec["window"], Hq=spec["Hq"], Hkv=spec["Hkv"], seed=num_splits)
    want, kc_want, vc_want, q_rot, k_rot = composed(A, c, num_splits)
    # The merge kernel (the composition's): every bit the same; the last split merging in-kernel: the same sums
    # in another order (a last-bit difference at most, rarely).
    got, kc, vc = fused(A, c, num_splits=num_splits, merge="kernel")
    assert same_bits(kc, kc_want) and same_bits(vc, vc_want), "cache differs from rope + kv_cache_write"
    if INTERPRET:
        assert same_bits(got, want)
    else:
        assert ulps_apart(got, want).max() <= 1
    got_p, kc_p, vc_p = fused(A, c, num_splits=num_splits, merge="program")
    assert same_bits(kc_p, kc_want) and same_bits(vc_p, vc_want)
    diff = ulps_apart(got_p, want)
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01
    ref, mag = oracle(c, q_rot, k_rot)
    assert_close(got_p, ref, mag)
    if num_splits > 1:  # the in-kernel merge left its counters at 0 for the next launch
        assert int(A._COUNTERS[str(torch.device(DEVICE))].abs().sum()) == 0


def test_fused_decode_with_the_default_splits_and_the_engine(A, engine):
    """The engine's op (defaults: splits from the batch, merge by the last split) against the float64
    reference run on the kernel's own rotated q and k, and against the composition."""
    c = make_case([1] * 4, [70, 2, 33, 0], [2, 0, 3, 1], num_rows=4, window=0, seed=5)
    kc, vc = c.k_cache.clone(), c.v_cache.clone()
    got = engine.rope_attention(*c.args(kc, vc))
    want, kc_want, vc_want, q_rot, k_rot = composed(A, c)
    assert same_bits(kc, kc_want) and same_bits(vc, vc_want)
    assert ulps_apart(got, want).max() <= 1
    assert_close(got, *oracle(c, q_rot, k_rot))
    # Only the new tokens' slots changed: the rotated keys (the rope kernel's, bit for bit) at slot_mapping.
    slots = c.batch.slot_mapping
    flat_kc, flat_before = kc.view(-1, *kc.shape[2:]), c.k_cache.view(-1, *kc.shape[2:])
    assert same_bits(flat_kc[slots], k_rot)
    keep = torch.ones(flat_kc.shape[0], dtype=torch.bool, device=kc.device)
    keep[slots] = False
    assert same_bits(flat_kc[keep], flat_before[keep])


def test_fused_decode_float32_and_contiguous_inputs(A):
    c = make_case([1] * 3, [20, 5, 50], [0, 2, 1], num_rows=3, window=16, dtype=torch.float32, strided=False, seed=6)
    want, kc_want, vc_want, q_rot, k_rot = composed(A, c, 2)
    got, kc, vc = fused(A, c, num_splits=2)
    assert same_bits(kc, kc_want) and same_bits(vc, vc_want)
    ref, mag = oracle(c, q_rot, k_rot)
    err = ((got.cpu().double() - ref).abs() / (1e-5 * (ref.abs() + mag) + 1e-6)).max().item()
    assert torch.isfinite(got).all() and err <= 1.0


def test_padding_repeats_of_a_sequence_and_padding_slots(A):
    """DecodeStep pads a bucket by repeating sequence 0 (same token, row, position): both write the same
    values to the same slot and get the same output. A slot of -1 (a padding token) is not written."""
    c = make_case([1] * 3, [12, 40, 12], [1, 0, 1], num_rows=3, seed=7, strided=False)
    c.q[2], c.k[2], c.v[2] = c.q[0], c.k[0], c.v[0]
    want, kc_want, vc_want, _, _ = composed(A, c, 2)
    got, kc, vc = fused(A, c, num_splits=2)
    assert same_bits(kc, kc_want) and same_bits(vc, vc_want) and same_bits(got[2], got[0])
    assert ulps_apart(got, want).max() <= 1
    pad = dataclasses.replace(c, batch=dataclasses.replace(c.batch, slot_mapping=torch.tensor(
        [-1, c.batch.slot_mapping[1].item(), -1], device=c.q.device)))
    _, kc, vc = fused(A, pad, num_splits=2)
    assert same_bits(kc[1], c.k_cache[1]) and same_bits(vc[1], c.v_cache[1])  # row 1: only padding tokens
    assert not same_bits(kc[0], c.k_cache[0])  # sequence 1 (row 0) was written


def test_prefill_and_mixed_batches_compose_the_kernels(A, engine):
    """Anything but one new token per sequence runs the rope kernel, then attention (cache write + prefill)."""
    c = make_case([12, 5, 1], [0, 13, 5], [1, 2, 0], num_rows=3, window=8, seed=8)
    kc, vc = c.k_cache.clone(), c.v_cache.clone()
    got = engine.rope_attention(*c.args(kc, vc))
    kc2, vc2 = c.k_cache.clone(), c.v_cache.clone()
    q, k = A.rope(c.q, c.k, c.positions, c.inv_freq, c.concentration)
    want = A.attention(q, k, c.v, c.sinks, kc2, vc2, c.batch, c.window, c.sm_scale)
    assert same_bits(got, want) and same_bits(kc, kc2) and same_bits(vc, vc2)
    assert_close(got, *oracle(c, q, k))


def test_fused_decode_refuses_what_it_cannot_do(A, engine):
    c = make_case([2, 1], [3, 4], [0, 1], num_rows=2, seed=9)
    with pytest.raises(ValueError, match="one new token"):
        A.rope_decode_attention(*c.args())
    d = make_case([1], [3], [0], num_rows=1, seed=9)
    with pytest.raises(ValueError, match="merge"):
        A.rope_decode_attention(*d.args(), merge="atomic")
    with pytest.raises(ValueError, match="one dtype"):
        A.rope_decode_attention(*dataclasses.replace(d, k=d.k.float()).args())
    with pytest.raises(NotSupported):  # float32 is not claimed by the engine: the base class refuses
        engine.rope_attention(*make_case([1], [3], [0], num_rows=1, dtype=torch.float32).args())


# ---- the graph ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from mxmoe.conformance.inputs import random_model

    cfg = preset("tiny", head_dim=64, vocab_size=256)  # 2 layers: windowed and not
    return cfg, random_model(cfg, seed=4)


def test_graph_decode_runs_the_fused_kernel(A, engine, tiny, monkeypatch):
    """Rope + attention from the triton engine (the rest from the reference): the decode step calls the one-
    kernel path once a layer, prefill composes; logits within bf16 rounding of the all-reference graph."""
    from mxmoe.core.model import GptOss

    cfg, weights = tiny
    calls = []
    real = A.rope_decode_attention
    monkeypatch.setattr(A, "rope_decode_attention", lambda *a, **kw: calls.append(a[-3].num_seqs) or real(*a, **kw))
    ops = {op: REF for op in OPS} | {"rope": engine, "attention": engine}
    mixed = GptOss(cfg, weights, ops, dtype=BF16, device=DEVICE)
    ref = GptOss(cfg, weights, {op: REF for op in OPS}, dtype=torch.float32, device=DEVICE)
    ids = torch.randint(cfg.vocab_size, (12,), generator=gen(10)).to(DEVICE)
    step = torch.randint(cfg.vocab_size, (2,), generator=gen(11)).to(DEVICE)
    results = []
    for m in (mixed, ref):
        cache = m.new_cache(3, 24)
        first = m.forward(ids, Batch.build([9, 3], [0, 0], [2, 0], 24, DEVICE), cache)
        second = m.forward(step, Batch.build([1, 1], [9, 3], [2, 0], 24, DEVICE), cache)
        results.append((first.double().cpu(), second.double().cpu()))
    assert calls == [2] * cfg.num_hidden_layers, calls  # decode only, once a layer
    for got, want in zip(results[0], results[1]):
        scale = want.abs().max().item()
        assert torch.isfinite(got).all() and (got - want).abs().max().item() <= 0.05 * scale


def test_per_op_selection_rope_from_torch_attention_from_triton(A, engine, tiny):
    """RoPE from the reference, attention from triton: the graph composes the two ops on their own backends
    (never a fused call), with the bits of the graph written out op by op (tests/test_fused_ops.py)."""
    from test_fused_ops import unfused_forward

    from mxmoe.backends.triton_engine import TritonBackend
    from mxmoe.core.model import GptOss

    class TritonSpy(TritonBackend):
        name = "triton-spy"

        def __init__(self):
            super().__init__()
            self.calls: list[str] = []

        def attention(self, *a):
            self.calls.append("attention")
            return super().attention(*a)

        def rope_attention(self, *a):
            self.calls.append("rope_attention")
            return super().rope_attention(*a)

    cfg, weights = tiny
    rope, attention = Spy(), TritonSpy()
    m = GptOss(cfg, weights, {op: REF for op in OPS} | {"rope": rope, "attention": attention}, dtype=BF16,
               device=DEVICE)
    ids = torch.randint(cfg.vocab_size, (7,), generator=gen(12)).to(DEVICE)
    step = torch.randint(cfg.vocab_size, (1,), generator=gen(13)).to(DEVICE)
    results = []
    for fwd in (m.forward, lambda *a: unfused_forward(m, *a)):
        cache = m.new_cache(1, 10)
        first = fwd(ids, Batch.build([7], [0], [0], 10, DEVICE), cache)
        second = fwd(step, Batch.build([1], [7], [0], 10, DEVICE), cache)  # decode: still composed
        results.append((first, second, cache.k.clone(), cache.v.clone()))
    L = cfg.num_hidden_layers
    assert rope.calls == ["rope"] * 4 * L and attention.calls == ["attention"] * 4 * L  # never the fused op
    for got, want in zip(*results):
        assert same_bits(got, want)
    assert torch.isfinite(results[0][1]).all()
