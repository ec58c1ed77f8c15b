"""The generation engine (core/engine.py) on a tiny random checkpoint, on the CPU.

Oracles: teacher-forced full forwards of the model (no engine, no cache reuse) for greedy output, and
each request run alone for seeded sampling. Requests of different lengths join and leave at different
steps, share steps with prefill chunks under a small token budget, queue for rows, get cancelled or fail.
"""

from __future__ import annotations

import pytest
import torch

from mxmoe.core import engine as engine_mod
from mxmoe.core.batch import Batch
from mxmoe.core.checkpoint import write_random_checkpoint
from mxmoe.core.config import preset
from mxmoe.core.engine import (DecodeStep, Engine, RequestError, SamplingParams, context_limit, decode_buckets,
                               kv_bytes_per_token, pool_size)
from mxmoe.core.model import load_model

V = 512  # a small vocabulary keeps the unembedding (and the tests) fast


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Many small ops: intra-op threads only oversubscribe a shared CPU (FACTS.md).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-engine")
    write_random_checkpoint(d, preset("tiny", vocab_size=V), "original", seed=11)
    return load_model(d, backend="torch", dtype="float32")


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_oracle(model, prompt: list[int], n: int, stop: tuple[int, ...] = ()) -> list[int]:
    """Greedy continuation by full forwards over the whole sequence each time (no engine, no cache reuse)."""
    seq, out = list(prompt), []
    for _ in range(n):
        t = int(model.logits(seq)[-1].argmax())
        out.append(t)
        seq.append(t)
        if t in stop:
            break
    return out


class Recorder:
    """Wraps model.forward: remembers each step's sequence lengths."""

    def __init__(self, model, monkeypatch):
        self.steps: list[list[int]] = []
        inner = model.forward

        def forward(token_ids, batch, cache, logits_rows=None):
            cu = batch.cu_seqlens.tolist()
            assert batch.num_tokens == token_ids.shape[0] == cu[-1]
            self.steps.append([b - a for a, b in zip(cu, cu[1:])])
            return inner(token_ids, batch, cache, logits_rows)

        monkeypatch.setattr(model, "forward", forward)


# ---- the batch built by device ops ---------------------------------------------------------------

def test_device_built_batch_equals_the_list_built_one():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        S = int(torch.randint(1, 6, (1,), generator=g))
        new = torch.randint(1, 9, (S,), generator=g)
        past = torch.randint(0, 20, (S,), generator=g)
        rows = torch.randperm(8, generator=g)[:S]
        want = Batch.build(new.tolist(), past.tolist(), rows.tolist(), 40)
        got = Batch.from_lens(new, past, rows, 40, num_tokens=int(new.sum()), max_seqlen=want.max_seqlen,
                              max_context_len=want.max_context_len)
        for f in ("positions", "cu_seqlens", "context_lens", "cache_rows", "slot_mapping"):
            assert torch.equal(getattr(got, f), getattr(want, f)), f


# ---- isolation ---------------------------------------------------------------------------------------

PROMPT_LENS = (3, 11, 25, 7, 14)
MAX_TOKENS = (6, 9, 4, 8, 5)


def test_greedy_requests_joining_and_leaving_give_their_tokens_alone(model, monkeypatch):
    prompts = [ids(n, seed=100 + i) for i, n in enumerate(PROMPT_LENS)]
    want = [greedy_oracle(model, p, k) for p, k in zip(prompts, MAX_TOKENS)]
    # Request 3 stops on a token it generates (its 3rd): it leaves early, by "stop".
    stop3 = want[3][2]
    want[3] = want[3][:want[3].index(stop3) + 1]
    params = [SamplingParams(max_tokens=k) for k in MAX_TOKENS]
    params[3] = SamplingParams(max_tokens=MAX_TOKENS[3], stop_tokens=(stop3,))

    rec = Recorder(model, monkeypatch)
    eng = Engine(model, max_batch=2, max_context=40, max_step_tokens=8)
    reqs = [eng.submit(p, sp) for p, sp in zip(prompts[:3], params[:3])]
    queued = []
    for _ in range(3):
        eng.step()
        queued.append(eng.free_rows == 0 and len(eng._waiting) > 0)
    reqs += [eng.submit(p, sp) for p, sp in zip(prompts[3:], params[3:])]  # join later
    eng.run()

    for i, (r, w) in enumerate(zip(reqs, want)):
        assert r.token_ids == w, f"request {i}"
        assert r.error is None
    assert [r.finish_reason for r in reqs] == ["length", "length", "length", "stop", "length"]
    assert all(sum(s) <= 8 for s in rec.steps), rec.steps  # the token budget holds in every step
    # The schedule really mixed things: requests queued for rows, a decode token shared a step with a
    # prefill chunk, and the 25-token prompt was prefilled in several chunks.
    assert any(queued)
    assert any(1 in s and max(s) > 1 for s in rec.steps), rec.steps
    assert sum(1 for s in rec.steps if any(n > 1 for n in s)) > len(PROMPT_LENS)
    assert eng.free_rows == 2 and not eng.has_work


def test_seeded_sampling_is_the_same_whatever_else_runs(model, monkeypatch):
    monkeypatch.setattr(engine_mod, "UNIFORM_BLOCK", 3)  # requests draw several blocks of uniforms
    prompts = [ids(n, seed=200 + i) for i, n in enumerate(PROMPT_LENS)]
    params = [SamplingParams(max_tokens=k, temperature=1.0, top_p=0.8 if i % 2 else 1.0, seed=7 + i)
              for i, k in enumerate(MAX_TOKENS)]
    params[2] = SamplingParams(max_tokens=MAX_TOKENS[2])  # a greedy request among sampled ones
    alone = [list(model.generate(p, max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p,
                                 seed=sp.seed)) for p, sp in zip(prompts, params)]
    eng = Engine(model, max_batch=3, max_context=40, max_step_tokens=6)
    together = eng.generate(prompts, params)
    assert [r.token_ids for r in together] == alone
    # Reversed arrival order: other neighbours, other rows, other steps; the same tokens.
    eng2 = Engine(model, max_batch=2, max_context=40, max_step_tokens=5)
    assert [r.token_ids for r in eng2.generate(prompts[::-1], params[::-1])][::-1] == alone
    # The test is not vacuous: sampling at temperature 1 departs from greedy.
    greedy = [greedy_oracle(model, p, sp.max_tokens) for p, sp in zip(prompts, params)]
    assert sum(a != g for a, g in zip(alone, greedy)) >= 3
    assert alone[2] == greedy[2]


def test_long_prefill_is_chunked_and_never_stalls_decode(model, monkeypatch):
    eng = Engine(model, max_batch=2, max_context=64, max_step_tokens=4)
    short = eng.submit(ids(2, seed=300), SamplingParams(max_tokens=20))
    eng.step()  # prefill of the short prompt: it is decoding from now on
    long = eng.submit(ids(30, seed=301), SamplingParams(max_tokens=3))
    rec = Recorder(model, monkeypatch)
    while long.first_token_at is None:
        before = len(short.token_ids)
        eng.step()
        assert len(short.token_ids) == before + 1  # one decode token in every step of the long prefill
    assert len(rec.steps) == 10  # 30 tokens, 3 per step beside the decode token
    assert all(s[0] == 1 and sum(s) <= 4 for s in rec.steps), rec.steps
    eng.run()
    assert long.token_ids == greedy_oracle(model, long.prompt_ids, 3)
    assert short.token_ids == greedy_oracle(model, short.prompt_ids, 20)
    # Alone, a prompt longer than the budget spends whole steps in prefill, with nothing to sample.
    eng = Engine(model, max_batch=1, max_context=16, max_step_tokens=4)
    r = eng.submit(ids(10, seed=302), SamplingParams(max_tokens=3))
    assert [len(eng.step()) for _ in range(3)] == [0, 0, 1] and len(r.token_ids) == 1
    eng.run()
    assert r.token_ids == greedy_oracle(model, r.prompt_ids, 3)


# ---- leaving: cancel, errors, length ----------------------------------------------------------------

def test_cancel_frees_the_row_for_the_next_request(model):
    eng = Engine(model, max_batch=1, max_context=40)
    a = eng.submit(ids(5, seed=400), SamplingParams(max_tokens=30))
    b = eng.submit(ids(6, seed=401), SamplingParams(max_tokens=4))
    c = eng.submit(ids(4, seed=402), SamplingParams(max_tokens=4))
    for _ in range(3):
        eng.step()
    assert len(a.token_ids) == 3 and a.row == 0 and b.row is None and eng.free_rows == 0
    a.cancel()
    c.cancel()  # still waiting: it never runs
    eng.step()
    assert a.finish_reason == "cancelled" and a.row is None and len(a.token_ids) == 3
    assert c.finish_reason == "cancelled" and c.token_ids == []
    assert b.row == 0 and len(b.token_ids) == 1  # took the freed row in the same step
    eng.run()
    assert b.token_ids == greedy_oracle(model, b.prompt_ids, 4)
    # Closing a stream early cancels its request and frees its row at once.
    d = eng.submit(ids(3, seed=403), SamplingParams(max_tokens=10))
    it = eng.stream(d)
    first = next(it)
    it.close()
    assert d.finish_reason == "cancelled" and d.token_ids == [first] and eng.free_rows == 1


def test_bad_requests_fail_alone(model):
    eng = Engine(model, max_batch=2, max_context=20, max_step_tokens=8)
    good = [ids(6, seed=500), ids(9, seed=501)]
    reqs = [eng.submit(good[0], SamplingParams(max_tokens=5)),
            eng.submit(ids(21, seed=502), SamplingParams(max_tokens=5)),  # longer than a row
            eng.submit([1, 2, V], SamplingParams(max_tokens=5)),  # an id outside the vocabulary
            eng.submit([], SamplingParams(max_tokens=5)),
            eng.submit(ids(4, seed=503), SamplingParams(max_tokens=5, temperature=1.0, top_p=0.0)),
            eng.submit(good[1], SamplingParams(max_tokens=5))]
    eng.run()
    assert [r.finish_reason for r in reqs] == ["length", "error", "error", "error", "error", "length"]
    assert "prompt of 21 tokens does not fit the KV cache: a row holds 20 tokens" in reqs[1].error
    assert f"token id {V} at position 2 is outside the vocabulary [0, {V})" in reqs[2].error
    assert "non-empty" in reqs[3].error
    assert "0 < top_p <= 1" in reqs[4].error
    assert all(r.token_ids == [] and r.row is None for r in reqs[1:5])
    assert reqs[0].token_ids == greedy_oracle(model, good[0], 5)
    assert reqs[5].token_ids == greedy_oracle(model, good[1], 5)
    with pytest.raises(RequestError, match="does not fit the KV cache"):
        list(eng.stream(reqs[1]))
    # The one-prompt API raises the request's own error, on iteration.
    with pytest.raises(ValueError, match=rf"token id {V} at position 2 is outside the vocabulary \[0, {V}\)"):
        list(model.generate([1, 2, V], max_tokens=3))
    with pytest.raises(ValueError, match="max_tokens must be >= 0"):
        list(model.generate([1, 2], max_tokens=-1))
    assert list(model.generate([1, 2], max_tokens=0)) == []


def test_a_full_row_ends_the_request_by_length(model):
    eng = Engine(model, max_batch=1, max_context=10)
    r = eng.submit(ids(8, seed=600), SamplingParams(max_tokens=10))
    exact = eng.submit(ids(10, seed=601), SamplingParams(max_tokens=10))  # fills the row: one token
    eng.run()
    # Keys of the prompt and of every generated token but the last must fit the row: 10 - 8 + 1 tokens.
    assert r.finish_reason == "length" and r.token_ids == greedy_oracle(model, r.prompt_ids, 3)
    assert exact.finish_reason == "length" and exact.token_ids == greedy_oracle(model, exact.prompt_ids, 1)


# ---- clients -----------------------------------------------------------------------------------------

def test_generate_batch_and_streaming_callbacks(model):
    prompts = [ids(n, seed=700 + n) for n in (4, 9, 2)]
    want = [greedy_oracle(model, p, 5) for p in prompts]
    done = model.generate_batch(prompts, SamplingParams(max_tokens=5))
    assert [r.token_ids for r in done] == want and all(r.finish_reason == "length" for r in done)
    each = [SamplingParams(max_tokens=n) for n in (1, 2, 3)]
    assert [r.token_ids for r in model.generate_batch(prompts, each, max_batch=1)] == [w[:n] for w, n in
                                                                                      zip(want, (1, 2, 3))]
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        model.generate_batch(prompts, each[:2])
    seen = []
    eng = Engine(model, max_batch=2, max_context=16)
    reqs = [eng.submit(p, SamplingParams(max_tokens=5), on_token=lambda r, t: seen.append((r.id, t)))
            for p in prompts]
    for t in eng.stream(reqs[1]):  # drives every request; yields only this one's tokens
        assert not torch.is_inference_mode_enabled()
    eng.run()
    assert [t for i, t in seen if i == reqs[1].id] == want[1]
    assert [[t for i, t in seen if i == r.id] for r in reqs] == want


# ---- sizing ------------------------------------------------------------------------------------------

def test_pool_sizing_from_arguments_limits_and_memory(model, monkeypatch):
    eng = Engine(model, max_batch=3, max_context=50)
    assert (eng.num_rows, eng.cache_len) == (3, 50) and eng.cache.k.shape[1:3] == (3, 50)
    limit = context_limit(model)
    assert limit == 256 * 4  # tiny: initial_context_length × rope_scaling_factor
    size = pool_size(model)
    assert size.cache_len == limit and 1 <= size.rows <= engine_mod.DEFAULT_MAX_BATCH
    assert size.max_step_tokens >= size.rows
    with pytest.raises(ValueError, match="exceeds the model's context limit of 1024"):
        pool_size(model, max_context=limit + 1)
    with pytest.raises(ValueError, match="max_step_tokens=2 must be at least max_batch=4"):
        pool_size(model, max_batch=4, max_context=8, max_step_tokens=2)
    # Memory left decides the default rows (and the default context when the rows are given).
    row = kv_bytes_per_token(model) * limit
    headroom = pool_size.__globals__["_ACTIVATION_FLOATS_PER_TOKEN_PER_HIDDEN"] * model.config.hidden_size * 4 * \
        engine_mod.DEFAULT_MAX_STEP_TOKENS
    free = int((5.5 * row + headroom) / engine_mod.CACHE_MEMORY_FRACTION) + 1
    monkeypatch.setattr(engine_mod, "memory_left", lambda device: free)
    assert pool_size(model).rows == 5
    assert pool_size(model, extra_rows=1).rows == 4
    assert pool_size(model, max_batch=11).cache_len == int(5.5 * limit / 11)
    with pytest.raises(ValueError, match="6 KV-cache rows of 1024 tokens need"):
        pool_size(model, max_batch=6, max_context=limit)
    monkeypatch.setattr(engine_mod, "memory_left", lambda device: 1000)
    with pytest.raises(ValueError, match="one KV-cache row of 1024 tokens needs .* lower --max-context"):
        Engine(model)


# ---- decode steps and the CUDA-graph bookkeeping (no CUDA needed) ----------------------------------------

def _prefilled(model, lens, rows, num_rows, cache_len, seed):
    cache = model.new_cache(num_rows, cache_len)
    prompts = [ids(n, seed=seed + i) for i, n in enumerate(lens)]
    with torch.inference_mode():
        model.forward(torch.tensor(sum(prompts, [])), Batch.build(lens, [0] * len(lens), rows, cache_len), cache)
    return cache


def test_decode_buckets_and_graph_rule():
    assert decode_buckets(1) == (1,)
    assert decode_buckets(6) == (1, 2, 4, 6)
    assert decode_buckets(8) == (1, 2, 4, 8)
    assert decode_buckets(9) == (1, 2, 4, 8, 9)


def test_decode_step_eager_equals_the_forward(model):
    lens, rows = [5, 9, 3], [2, 0, 3]
    cache = _prefilled(model, lens, rows, 4, 16, seed=800)
    other = KVCacheCopy(cache)
    step = DecodeStep(model, cache)
    assert not step.uses_graphs and step.buckets == (1, 2, 4)
    with pytest.raises(ValueError, match="CUDA graphs were asked for, but the model is on cpu"):
        DecodeStep(model, cache, use_graphs=True)
    with pytest.raises(ValueError, match="CUDA graphs were asked for"):
        Engine(model, max_batch=2, max_context=8, use_graphs=True)
    tok = torch.tensor([7, 300, 42])
    got = step(tok, torch.tensor(lens), torch.tensor(rows))
    with torch.inference_mode():
        want = model.forward(tok, Batch.build([1, 1, 1], lens, rows, 16), other.cache)
    assert torch.equal(got, want)
    assert torch.equal(cache.k.nan_to_num(), other.cache.k.nan_to_num())


class KVCacheCopy:
    def __init__(self, cache):
        from mxmoe.core.batch import KVCache

        self.cache = KVCache(cache.k.clone(), cache.v.clone())


@pytest.mark.parametrize("scratch", [None, 5])
def test_padded_bucket_rows_are_harmless(model, scratch):
    """A graph replays a bucket's worth of rows: the padding (to the scratch row, or repeating sequence 0)
    must leave every real sequence's logits and cache exactly as an unpadded step does."""
    lens, rows = [5, 9, 3], [2, 0, 4]
    num_rows = 6
    cache = _prefilled(model, lens, rows, num_rows, 16, seed=900)
    plain = KVCacheCopy(cache).cache
    step = DecodeStep(model, cache, use_graphs=False, scratch_row=scratch)
    step._pad_eagerly = True  # run the bucket exactly as its graph would, eagerly
    assert step.max_batch == (5 if scratch is not None else 6)
    assert step.buckets == ((1, 2, 4, 5) if scratch is not None else (1, 2, 4, 6))
    tok, pos, row = torch.tensor([7, 300, 42]), torch.tensor(lens), torch.tensor(rows)
    got = step(tok, pos, row)
    assert got.shape == (3, V) and step.bucket(3) == 4
    # The static buffers: the step's rows, then the padding row.
    assert step._tokens[:3].tolist() == [7, 300, 42] and step._positions[:3].tolist() == lens
    pad = (0, 0, scratch) if scratch is not None else (7, 5, 2)
    assert (step._tokens[3].item(), step._positions[3].item(), step._rows[3].item()) == pad
    assert step._context[:4].tolist() == [p + 1 for p in lens] + [pad[1] + 1]
    assert step._slots[:4].tolist() == [r * 16 + p for r, p in zip(rows + [pad[2]], lens + [pad[1]])]
    want = DecodeStep(model, plain)(tok, pos, row)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    real = [r for r in range(num_rows) if r != scratch]
    torch.testing.assert_close(cache.k[:, real].nan_to_num(), plain.k[:, real].nan_to_num(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache.v[:, real].nan_to_num(), plain.v[:, real].nan_to_num(), rtol=1e-6, atol=1e-6)
    untouched = [r for r in real if r not in rows]
    assert cache.k[:, untouched].isnan().all()  # no padding wrote into rows nobody owns


def test_engine_with_padded_decode_buckets_matches_alone(model):
    prompts = [ids(n, seed=1000 + n) for n in (4, 7, 2)]
    max_tokens = (6, 3, 8)
    want = [greedy_oracle(model, p, k) for p, k in zip(prompts, max_tokens)]
    eng = Engine(model, max_batch=5, max_context=16)
    assert eng.decode.buckets == (1, 2, 4, 5)
    eng.decode._pad_eagerly = True  # decodes of 3 sequences run as the padded bucket of 4, as on CUDA
    done = eng.generate(prompts, [SamplingParams(max_tokens=k) for k in max_tokens])
    assert [r.token_ids for r in done] == want


def test_a_logits_processor_steers_its_request_alone(model):
    """The public per-request hook: a processor that bans each step's greedy choice gives the greedy
    continuation of the banned logits (checked by full forwards), sees only its own request's row, and leaves
    the request beside it in the same batch with its greedy tokens."""
    banned_prompt, plain_prompt = ids(7, seed=300), ids(5, seed=301)
    seen = []

    def ban_the_best(req, logits):
        seen.append((req.id, tuple(logits.shape)))
        logits[logits.argmax()] = float("-inf")
        return logits

    eng = Engine(model, max_batch=2, max_context=32)
    steered = eng.submit(banned_prompt, SamplingParams(max_tokens=4), logits_processor=ban_the_best)
    plain = eng.submit(plain_prompt, SamplingParams(max_tokens=4))
    eng.run()

    seq, want = list(banned_prompt), []
    for _ in range(4):
        logits = model.logits(seq)[-1].clone()
        logits[logits.argmax()] = float("-inf")
        want.append(int(logits.argmax()))
        seq.append(want[-1])
    assert steered.token_ids == want
    assert want != greedy_oracle(model, banned_prompt, 4)  # the hook changed something
    assert plain.token_ids == greedy_oracle(model, plain_prompt, 4)
    assert seen == [(steered.id, (model.config.vocab_size,))] * 4
