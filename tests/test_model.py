"""The reference engine's model graph against Hugging Face transformers (the independent oracle), and its
own invariants: layouts agree, incremental decode = full forward, batched = alone.

Random checkpoints are written by mxmoe in the real on-disk layouts; transformers reads the Hugging Face
bf16 one with its own loader, so the oracle shares no code with us.
"""

from __future__ import annotations

import pytest
import torch

from mxmoe.core.batch import Batch
from mxmoe.core.checkpoint import write_random_checkpoint
from mxmoe.core.config import preset
from mxmoe.core.model import load_model

transformers = pytest.importorskip("transformers")

# Several shapes: both attention kinds (>= 2 layers), sequences longer than the window, more experts than
# top-k and top-k equal to the expert count, GQA and MQA, YaRN on and off, I != D.
CONFIGS = {
    "tiny": dict(vocab_size=512),
    "mqa-topk-all-noyarn": dict(vocab_size=300, num_hidden_layers=3, num_experts=4, experts_per_token=4,
                                num_attention_heads=4, num_key_value_heads=1, head_dim=32, hidden_size=96,
                                intermediate_size=64, sliding_window=5, rope_scaling_factor=1.0),
    "wide-experts": dict(vocab_size=1000, num_hidden_layers=2, num_experts=16, experts_per_token=4,
                         hidden_size=128, intermediate_size=160, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=16, sliding_window=16, rope_scaling_factor=8.0, swiglu_limit=1.5),
}
LAYOUTS = ("original", "hf", "hf-bf16")
SEQ_LEN = 40  # longer than every window above


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(config name, layout): dir}, the three layouts of one random model per config."""
    out = {}
    for name, overrides in CONFIGS.items():
        cfg = preset("tiny", **overrides)
        for layout in LAYOUTS:
            d = tmp_path_factory.mktemp(f"{name}-{layout}")
            write_random_checkpoint(d, cfg, layout, seed=sum(map(ord, name)))
            out[name, layout] = d
    return out


def random_ids(vocab: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def oracle_ignores(name: str, hf) -> str | None:
    """Why transformers cannot be the oracle for config ``name``, if it cannot (older releases hard-code
    the SwiGLU clamp at 7.0 instead of reading ``swiglu_limit``)."""
    limit = hf.model.layers[0].mlp.experts.limit
    if limit != hf.config.swiglu_limit:
        return (f"transformers {transformers.__version__} clamps SwiGLU at {limit}, ignoring "
                f"swiglu_limit={hf.config.swiglu_limit} of config {name!r}")
    return None


@pytest.fixture(scope="module")
def hf_logits(checkpoints):
    """Hugging Face logits (float32, eager attention) of one random sequence per config."""
    out = {}
    for name in CONFIGS:
        hf = transformers.GptOssForCausalLM.from_pretrained(checkpoints[name, "hf-bf16"], dtype=torch.float32,
                                                            attn_implementation="eager").eval()
        if reason := oracle_ignores(name, hf):
            out[name] = reason
            continue
        ids = random_ids(hf.config.vocab_size, SEQ_LEN, seed=1)
        with torch.no_grad():
            out[name] = ids, hf(ids[None]).logits[0]
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(checkpoints, hf_logits, name, layout):
    if isinstance(hf_logits[name], str):
        pytest.skip(hf_logits[name])
    ids, expected = hf_logits[name]
    model = load_model(checkpoints[name, layout], backend="torch", dtype="float32")
    got = model.logits(ids)
    assert got.shape == expected.shape
    assert expected.std() > 0.1  # a degenerate random model would make the comparison meaningless
    err = (got - expected).abs().max().item()
    assert err <= 1e-4, f"{name}/{layout}: max |logits - transformers| = {err:.3g}"


# The reference engine also runs on CUDA (checked on the lent H200; skipped, saying why, without a GPU).
ACCELERATORS = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                              reason="no CUDA device"))]


@pytest.mark.parametrize("device", ACCELERATORS)
@pytest.mark.parametrize("layout", ["original", "hf-bf16"])
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_on_accelerator_match_transformers(checkpoints, hf_logits, name, layout, device):
    if isinstance(hf_logits[name], str):
        pytest.skip(hf_logits[name])
    ids, expected = hf_logits[name]
    model = load_model(checkpoints[name, layout], backend="torch", device=device, dtype="float32")
    got = model.logits(ids).cpu()
    err = (got - expected).abs().max().item()
    assert err <= 1e-4, f"{name}/{layout} on {device}: max |logits - transformers| = {err:.3g}"


@pytest.mark.parametrize("name", CONFIGS)
def test_three_layouts_give_identical_logits(checkpoints, name):
    ids = random_ids(preset("tiny", **CONFIGS[name]).vocab_size, 24, seed=2)
    logits = [load_model(checkpoints[name, layout], backend="torch", dtype="float32").logits(ids)
              for layout in LAYOUTS]
    for layout, lg in zip(LAYOUTS[1:], logits[1:]):
        assert torch.equal(lg, logits[0]), f"{layout} differs from original"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_incremental_decode_equals_full_forward(checkpoints, dtype):
    model = load_model(checkpoints["tiny", "original"], backend="torch", dtype=dtype)
    window = model.config.sliding_window
    n = 3 * window + 3  # decode runs across the sliding-window boundary several times
    ids = random_ids(model.config.vocab_size, n, seed=3)
    full = model.logits(ids)
    cache = model.new_cache(1, n)
    prefill = window - 2
    steps = [model.forward(ids[:prefill], Batch.build([prefill], [0], [0], n), cache, torch.arange(prefill))]
    for t in range(prefill, n):
        steps.append(model.forward(ids[t:t + 1], Batch.build([1], [t], [0], n), cache))
    incremental = torch.cat(steps)
    tol = 1e-12 if dtype == "float64" else 1e-5
    assert (incremental - full).abs().max().item() <= tol


def test_batched_sequences_equal_each_alone(checkpoints):
    model = load_model(checkpoints["wide-experts", "hf"], backend="torch", dtype="float64")
    V = model.config.vocab_size
    lens, pasts = [5, 37, 1, 20], [0, 0, 0, 0]
    seqs = [random_ids(V, n, seed=10 + i) for i, n in enumerate(lens)]
    alone = [model.logits(s) for s in seqs]
    # One varlen call; cache rows deliberately out of order so row != sequence index.
    rows, cache_len = [2, 0, 3, 1], max(lens)
    cache = model.new_cache(4, cache_len)
    batch = Batch.build(lens, pasts, rows, cache_len)
    together = model.forward(torch.cat(seqs), batch, cache, logits_rows=torch.arange(sum(lens)))
    for i, (start, n) in enumerate(zip(batch.cu_seqlens[:-1].tolist(), lens)):
        assert (together[start:start + n] - alone[i]).abs().max().item() <= 1e-12, f"sequence {i}"


def test_batched_decode_step_matches_alone(checkpoints):
    model = load_model(checkpoints["tiny", "hf"], backend="torch", dtype="float64")
    V = model.config.vocab_size
    lens, rows = [3, 17, 9], [1, 2, 0]
    seqs = [random_ids(V, n + 1, seed=20 + i) for i, n in enumerate(lens)]  # prompt + one decode token
    cache_len = max(lens) + 1
    cache = model.new_cache(3, cache_len)
    model.forward(torch.cat([s[:-1] for s in seqs]), Batch.build(lens, [0, 0, 0], rows, cache_len), cache)
    step = model.forward(torch.stack([s[-1] for s in seqs]), Batch.build([1, 1, 1], lens, rows, cache_len), cache)
    for i, s in enumerate(seqs):
        assert (step[i] - model.logits(s)[-1]).abs().max().item() <= 1e-12, f"sequence {i}"


def test_generate_greedy_is_argmax_of_logits(checkpoints):
    model = load_model(checkpoints["tiny", "original"], backend="torch", dtype="float64")
    prompt = random_ids(model.config.vocab_size, 7, seed=4).tolist()
    out = list(model.generate(prompt, max_tokens=12))
    assert len(out) == 12
    seq = prompt + out
    logits = model.logits(seq)
    assert out == logits[len(prompt) - 1:-1].argmax(-1).tolist()


def test_generate_stops_and_seeds(checkpoints):
    model = load_model(checkpoints["tiny", "original"], backend="torch", dtype="float32")
    prompt = random_ids(model.config.vocab_size, 5, seed=5).tolist()
    a = list(model.generate(prompt, max_tokens=10, temperature=1.0, seed=123))
    b = list(model.generate(prompt, max_tokens=10, temperature=1.0, seed=123))
    assert a == b
    stop = a[3]
    c = list(model.generate(prompt, max_tokens=10, temperature=1.0, seed=123, stop_tokens=[stop]))
    assert c == a[:a.index(stop) + 1]


def test_bad_token_ids_are_reported(checkpoints):
    model = load_model(checkpoints["tiny", "original"], backend="torch", dtype="float32")
    with pytest.raises(ValueError, match=r"token id 512 at position 2 is outside the vocabulary \[0, 512\)"):
        model.logits([1, 2, 512])


def test_progress_bar_while_preparing_layers(checkpoints, capsys):
    load_model(checkpoints["tiny", "original"], backend="torch", dtype="float32", progress=True)
    assert "preparing 2 layers" in capsys.readouterr().err
    load_model(checkpoints["tiny", "original"], backend="torch", dtype="float32")  # small: no bar by default
    assert "preparing" not in capsys.readouterr().err
