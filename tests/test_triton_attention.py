"""The triton engine's attention kernels (backends/triton_engine/attention.py) against the reference engine.

Runs the kernels through Triton's CPU interpreter when there is no GPU (tests/conftest.py), so shapes are
small and block sizes tiny (16 keys/queries) to cross many block boundaries with short sequences.

Oracle: ``TorchBackend().attention`` in float64 on exactly the kernel's (bf16-rounded) inputs. Error bound
per element, bf16 (u = 2^-8, half an ulp of 1): the kernel rounds P to bf16 for the P.V product
(|δo| ≤ u Σ_j p_j |v_j| = u M, M the same attention over |v|) and rounds the output (≤ u |o|); scores and
accumulations are float32 (errors ~1e-6 relative, covered by the absolute term). Bound: 2 u (|o| + M) + 1e-5,
the factor 2 a safety margin. float32 activations: IEEE float32 dots, bound 1e-5 (|o| + M) + 1e-6.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from mxmoe.backends.reference import TorchBackend
from mxmoe.core.batch import Batch

triton = pytest.importorskip("triton")
A = pytest.importorskip("mxmoe.backends.triton_engine.attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tiny blocks in the interpreter (speed, many block boundaries); on a GPU the kernels' defaults.
BLOCKS = dict(block_m=16, block_n=16) if INTERPRET else {}
DECODE_BLOCKS = dict(block_n=16) if INTERPRET else {}


@pytest.fixture(autouse=True)
def _few_threads():
    # Many small ops on 2 shared cores: torch's intra-op threads only oversubscribe (FACTS.md).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@dataclasses.dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    sinks: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    batch: Batch
    window: int
    sm_scale: float


def make_case(new_lens, past_lens, rows, *, num_rows, cache_len, Hq, Hkv, d=64, window=0, sink_shift=0.0,
              dtype=torch.bfloat16, seed=0) -> Case:
    """Fresh random inputs; caches NaN-poisoned except each sequence's cached prefix."""
    g = torch.Generator().manual_seed(seed)
    batch = Batch.build(new_lens, past_lens, rows, cache_len, device=DEVICE)
    T = sum(new_lens)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    k_cache = torch.full((num_rows, cache_len, Hkv, d), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    for r, p in zip(rows, past_lens):
        k_cache[r, :p] = rnd(p, Hkv, d)
        v_cache[r, :p] = rnd(p, Hkv, d)
    sinks = (torch.randn(Hq, generator=g) + sink_shift).to(DEVICE)
    return Case(rnd(T, Hq, d), rnd(T, Hkv, d), rnd(T, Hkv, d), sinks, k_cache, v_cache, batch, window, d ** -0.5)


def oracle(c: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference output, M = the same attention over |v|), float64 on the CPU, on copies of the caches."""
    def f64(t):
        return t.detach().cpu().double()

    batch = Batch(*(f64(x).long() if isinstance(x, torch.Tensor) else x
                    for x in dataclasses.astuple(c.batch)))
    ref = TorchBackend().attention(f64(c.q), f64(c.k), f64(c.v), f64(c.sinks), f64(c.k_cache), f64(c.v_cache),
                                   batch, c.window, c.sm_scale)
    mag = TorchBackend().attention(f64(c.q), f64(c.k), f64(c.v).abs(), f64(c.sinks), f64(c.k_cache),
                                   f64(c.v_cache).abs(), batch, c.window, c.sm_scale)
    return ref, mag


def assert_close(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype) -> None:
    out = out.detach().cpu().double()
    assert torch.isfinite(out).all(), "non-finite output (an unwritten element or a poisoned key was read)"
    assert torch.isfinite(ref).all()
    if dtype == torch.float32:
        bound = 1e-5 * (ref.abs() + mag) + 1e-6
    else:
        u = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
        bound = 2 * u * (ref.abs() + mag) + 1e-5
    err = (out - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"max error {err.max().item():.3g}, {worst:.2f}x the bound"


def run_prefill(c: Case, **kw) -> torch.Tensor:
    A.kv_cache_write(c.k, c.v, c.k_cache, c.v_cache, c.batch.slot_mapping)
    out = torch.full_like(c.q, float("nan"))  # poisoned: every element must be written
    return A.prefill_attention(c.q, c.k_cache, c.v_cache, c.sinks, c.batch, c.window, c.sm_scale, out=out,
                               **{**BLOCKS, **kw})


def run_decode(c: Case, **kw) -> torch.Tensor:
    A.kv_cache_write(c.k, c.v, c.k_cache, c.v_cache, c.batch.slot_mapping)
    out = torch.full_like(c.q, float("nan"))
    return A.decode_attention(c.q, c.k_cache, c.v_cache, c.sinks, c.batch, c.window, c.sm_scale, out=out,
                              **{**DECODE_BLOCKS, **kw})


# ---- prefill -----------------------------------------------------------------------------------------

# Three sequences: a fresh prompt, a chunk after a cached prefix, one decode-like token riding along;
# cache rows out of order (and one row unused).
PREFILL = dict(new_lens=[37, 20, 1], past_lens=[0, 29, 50], rows=[2, 0, 3], num_rows=4, cache_len=96)


@pytest.mark.parametrize("Hq,Hkv", [(8, 1), (4, 2)])  # GQA groups of 8 (gpt-oss) and 2
@pytest.mark.parametrize("window", [0, 23])  # 23: the band starts mid-block and spans block boundaries
def test_prefill_matches_reference(Hq, Hkv, window):
    c = make_case(**PREFILL, Hq=Hq, Hkv=Hkv, window=window, seed=Hq + window)
    ref, mag = oracle(c)
    assert_close(run_prefill(c), ref, mag, torch.bfloat16)


@pytest.mark.parametrize("sink_shift", [8.0, -8.0])  # sink-dominated, and a sink that hardly matters
def test_prefill_sinks_large_and_small(sink_shift):
    c = make_case(**PREFILL, Hq=4, Hkv=2, window=23, sink_shift=sink_shift, seed=3)
    ref, mag = oracle(c)
    # The case must exercise what it says: the sink takes most (or almost none) of the mass.
    no_sink = make_case(**PREFILL, Hq=4, Hkv=2, window=23, sink_shift=-1e4, seed=3)
    ref_no_sink, _ = oracle(no_sink)
    ratio = (ref.norm() / ref_no_sink.norm()).item()
    assert (ratio < 0.05) if sink_shift > 0 else (ratio > 0.99)
    assert_close(run_prefill(c), ref, mag, torch.bfloat16)


def test_prefill_host_maxima_are_upper_bounds():
    c = make_case(**PREFILL, Hq=4, Hkv=2, window=0, seed=5)
    ref, mag = oracle(c)
    c.batch = dataclasses.replace(c.batch, max_seqlen=80, max_context_len=96)  # grid too large: must exit
    assert_close(run_prefill(c), ref, mag, torch.bfloat16)


def test_prefill_default_blocks_and_head_dim_128():
    # The wrapper's own block sizes (not the tests'), and d = 128.
    c = make_case([40, 9], [0, 70], [1, 0], num_rows=2, cache_len=80, Hq=4, Hkv=1, d=128, window=16, seed=6)
    ref, mag = oracle(c)
    A.kv_cache_write(c.k, c.v, c.k_cache, c.v_cache, c.batch.slot_mapping)
    out = torch.full_like(c.q, float("nan"))
    A.prefill_attention(c.q, c.k_cache, c.v_cache, c.sinks, c.batch, c.window, c.sm_scale, out=out)
    assert_close(out, ref, mag, torch.bfloat16)


def test_prefill_float32():
    c = make_case(**PREFILL, Hq=4, Hkv=2, window=23, dtype=torch.float32, seed=7)
    ref, mag = oracle(c)
    assert_close(run_prefill(c), ref, mag, torch.float32)


def test_prefill_past_32k_keys():
    # A chunk of new tokens at positions past 32,768 (a long cached prefix), window and no window.
    for window in (0, 100):
        c = make_case([20], [33_000], [0], num_rows=1, cache_len=33_100, Hq=2, Hkv=1, window=window, seed=8)
        ref, mag = oracle(c)
        assert_close(run_prefill(c, block_m=32, block_n=1024), ref, mag, torch.bfloat16)


# ---- decode --------------------------------------------------------------------------------------------

# Mixed contexts: 1 key, under a block, many blocks (more than one split), rows out of order.
DECODE = dict(new_lens=[1] * 5, past_lens=[0, 12, 69, 140, 33], rows=[4, 0, 2, 5, 1], num_rows=6,
              cache_len=160)


@pytest.mark.parametrize("Hq,Hkv", [(8, 1), (4, 2)])
@pytest.mark.parametrize("window", [0, 21])
@pytest.mark.parametrize("num_splits", [None, 1, 3])  # automatic, no merge, merge of uneven splits
def test_decode_matches_reference(Hq, Hkv, window, num_splits):
    c = make_case(**DECODE, Hq=Hq, Hkv=Hkv, window=window, seed=10 * Hq + window)
    ref, mag = oracle(c)
    assert_close(run_decode(c, num_splits=num_splits), ref, mag, torch.bfloat16)


def test_decode_splits_more_than_blocks():
    # More splits than a sequence has blocks: the surplus splits are empty and must merge as nothing.
    c = make_case(**DECODE, Hq=8, Hkv=1, window=0, seed=11)
    ref, mag = oracle(c)
    assert_close(run_decode(c, num_splits=16), ref, mag, torch.bfloat16)


@pytest.mark.parametrize("sink_shift", [8.0, -8.0])
def test_decode_sinks_large_and_small(sink_shift):
    # The sink must be added exactly once and in base 2 like the merge: twice, or in base e, is far off.
    c = make_case(**DECODE, Hq=8, Hkv=1, window=0, sink_shift=sink_shift, seed=12)
    ref, mag = oracle(c)
    assert_close(run_decode(c, num_splits=4), ref, mag, torch.bfloat16)


def test_decode_host_maxima_are_upper_bounds():
    # A CUDA graph is captured with max_context_len = cache_len and replayed as contexts grow.
    c = make_case(**DECODE, Hq=8, Hkv=1, window=0, seed=13)
    ref, mag = oracle(c)
    c.batch = dataclasses.replace(c.batch, max_context_len=160)
    assert_close(run_decode(c), ref, mag, torch.bfloat16)


def test_decode_float32():
    c = make_case(**DECODE, Hq=4, Hkv=2, window=21, dtype=torch.float32, seed=14)
    ref, mag = oracle(c)
    assert_close(run_decode(c, num_splits=3), ref, mag, torch.float32)


def test_decode_past_32k_keys():
    c = make_case([1, 1], [33_000, 40], [1, 0], num_rows=2, cache_len=33_001, Hq=8, Hkv=1, seed=15)
    ref, mag = oracle(c)
    assert_close(run_decode(c, block_n=1024, num_splits=5), ref, mag, torch.bfloat16)


def test_decode_cache_rows_past_2_31_elements():
    # Row 1090 of a (1100, 32768, 1, 64) cache starts past 2^31 elements: the row offset must be int64.
    # Only the rows used are ever touched, so the 4.7 GB the caches span stay virtual.
    R, C, Hkv, d, Hq = 1100, 32_768, 1, 64, 8
    rows, past = [1090, 3], [40, 10]
    g = torch.Generator().manual_seed(16)
    k_cache = torch.empty((R, C, Hkv, d), dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.empty_like(k_cache)
    for r, p in zip(rows, past):
        k_cache[r, :64] = float("nan")
        v_cache[r, :64] = float("nan")
        k_cache[r, :p] = torch.randn(p, Hkv, d, generator=g).bfloat16().to(DEVICE)
        v_cache[r, :p] = torch.randn(p, Hkv, d, generator=g).bfloat16().to(DEVICE)
    batch = Batch.build([1, 1], past, rows, C, device=DEVICE)
    q = torch.randn(2, Hq, d, generator=g).bfloat16().to(DEVICE)
    k = torch.randn(2, Hkv, d, generator=g).bfloat16().to(DEVICE)
    v = torch.randn(2, Hkv, d, generator=g).bfloat16().to(DEVICE)
    sinks = torch.randn(Hq, generator=g).to(DEVICE)
    out = A.attention(q, k, v, sinks, k_cache, v_cache, batch, 0, d ** -0.5)
    small = [torch.full((2, 64, Hkv, d), float("nan"), dtype=torch.bfloat16) for _ in range(2)]
    for i, (r, p) in enumerate(zip(rows, past)):
        small[0][i, :p + 1] = k_cache[r, :p + 1].cpu()
        small[1][i, :p + 1] = v_cache[r, :p + 1].cpu()
    assert torch.equal(small[0][0, 40], k[0].cpu()) and torch.equal(small[1][1, 10], v[1].cpu())
    c = Case(q, k, v, sinks, small[0], small[1], Batch.build([1, 1], past, [0, 1], 64), 0, d ** -0.5)
    ref, mag = oracle(c)
    assert_close(out, ref, mag, torch.bfloat16)


# ---- the op: dispatch, cache write --------------------------------------------------------------------

@pytest.mark.parametrize("new_lens,past_lens", [([1, 1, 1], [5, 60, 17]), ([9, 1, 30], [5, 60, 0])])
def test_attention_op_matches_reference_and_leaves_other_slots_untouched(new_lens, past_lens):
    c = make_case(new_lens, past_lens, [3, 1, 0], num_rows=5, cache_len=96, Hq=8, Hkv=2, window=16, seed=20)
    ref, mag = oracle(c)
    k_before, v_before = c.k_cache.clone(), c.v_cache.clone()
    out = A.attention(c.q, c.k, c.v, c.sinks, c.k_cache, c.v_cache, c.batch, c.window, c.sm_scale)
    assert_close(out, ref, mag, torch.bfloat16)
    # Exactly the slots of slot_mapping changed (to the new keys/values); every other slot, NaN or not,
    # is bitwise what it was.
    flat_k, flat_v = k_before.view(-1, 2, 64).clone(), v_before.view(-1, 2, 64).clone()
    flat_k[c.batch.slot_mapping] = c.k
    flat_v[c.batch.slot_mapping] = c.v
    assert torch.equal(c.k_cache.view(-1, 2, 64).view(torch.int16), flat_k.view(torch.int16))
    assert torch.equal(c.v_cache.view(-1, 2, 64).view(torch.int16), flat_v.view(torch.int16))


def test_kv_cache_write_strided_inputs_and_padding_slots():
    # k, v as views of a fused qkv projection (row stride > Hkv*d); slot -1 marks a padding token.
    g = torch.Generator().manual_seed(21)
    T, Hq, Hkv, d, R, C = 6, 8, 2, 64, 3, 10
    qkv = torch.randn(T, (Hq + 2 * Hkv) * d, generator=g).bfloat16().to(DEVICE)
    k = qkv[:, Hq * d:(Hq + Hkv) * d].view(T, Hkv, d)
    v = qkv[:, (Hq + Hkv) * d:].view(T, Hkv, d)
    slots = torch.tensor([2 * C + 7, 0, -1, C + 9, 2 * C + 8, 5], device=DEVICE)
    kc = torch.full((R, C, Hkv, d), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    vc = torch.full_like(kc, float("nan"))
    kc_ref, vc_ref = kc.clone(), vc.clone()
    A.kv_cache_write(k, v, kc, vc, slots)
    A.kv_cache_write_ref(k, v, kc_ref, vc_ref, slots)
    assert torch.equal(kc.view(torch.int16), kc_ref.view(torch.int16))
    assert torch.equal(vc.view(torch.int16), vc_ref.view(torch.int16))
    assert torch.equal(kc[1, 9], k[3]) and torch.equal(vc[0, 5], v[5])
    assert int(torch.isnan(kc).any(dim=(2, 3)).sum()) == R * C - 5  # 5 slots written, the padding token not


def test_attention_ref_matches_reference_engine():
    # The module's own plain-PyTorch version (used as the GPU script's oracle) is the reference's math.
    c = make_case(**PREFILL, Hq=8, Hkv=2, window=23, dtype=torch.float32, seed=22)
    ref, _ = oracle(c)
    out = A.attention_ref(c.q.double(), c.k.double(), c.v.double(), c.sinks.double(), c.k_cache.double(),
                          c.v_cache.double(), c.batch, c.window, c.sm_scale)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-12, atol=1e-12)


def test_unsupported_inputs_raise_clear_errors():
    c = make_case([3], [0], [0], num_rows=1, cache_len=8, Hq=4, Hkv=2, d=64, seed=23)
    with pytest.raises(ValueError, match="head_dim 48"):
        bad = make_case([3], [0], [0], num_rows=1, cache_len=8, Hq=4, Hkv=2, d=48, seed=23)
        A.attention(bad.q, bad.k, bad.v, bad.sinks, bad.k_cache, bad.v_cache, bad.batch, 0, 0.1)
    with pytest.raises(ValueError, match="KV cache is"):
        A.prefill_attention(c.q.float(), c.k_cache, c.v_cache, c.sinks, c.batch, 0, 0.1)
    with pytest.raises(ValueError, match="one new token"):
        A.decode_attention(c.q, c.k_cache, c.v_cache, c.sinks, c.batch, 0, 0.1)
    with pytest.raises(ValueError, match="sinks"):
        A.prefill_attention(c.q, c.k_cache, c.v_cache, c.sinks[:2], c.batch, 0, 0.1)
