"""Level 1: every op against the float64 oracle, with derived per-element bounds (tolerances.py).

Shape legend: T tokens, D hidden, K/N a linear layer's in/out features, E experts, k experts per
token, I intermediate, Hq/Hkv heads, d head_dim, L keys.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from hypothesis import strategies as st

from mxmoe.core import mxfp4
from mxmoe.core.batch import Batch
from mxmoe.core.config import preset
from mxmoe.core.rope import yarn_inv_freq
from mxmoe.core.weights import ExpertLinear

from . import tolerances as tol
from .case import Case, CaseFailure, Ctx, Outcome, Profile
from .inputs import SEEDS, F64, canonical, generator, randn, random_experts, rounded, routing

GPT_OSS = preset("gpt-oss-20b")


def _outcome(op: str, out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str = "output",
             **metrics) -> Outcome:
    c = tol.compare(out, ref, bound)
    where = f"{what}{c['index']}" if c["index"] is not None else what
    return Outcome(op, c["observed"], c["bound"], c["ratio"], where=where + (f" ({c['note']})" if c["note"] else ""),
                   metrics={"max_abs_err": c["max_abs_err"], **metrics})


def _worst(*outcomes: Outcome) -> Outcome:
    failed = [o for o in outcomes if o.message]
    return failed[0] if failed else max(outcomes, key=lambda o: o.ratio)


# ---- embedding -----------------------------------------------------------------------------------

def run_embedding(ctx: Ctx, p: dict) -> Outcome:
    g = generator(p["seed"])
    V, D, T = p["V"], p["D"], p["T"]
    table = canonical(randn(g, V, D))
    ids = torch.randint(V, (T,), generator=g)
    ids[0], ids[-1] = 0, V - 1
    out = ctx.call("embedding", ctx.engine.embedding, ids.to(ctx.device), ctx.to_engine(table))
    ctx.check_tensor("embedding", out, (T, D))
    ref = ctx.oracle.embedding(ids, table.to(F64))
    return _outcome("embedding", out, rounded(ref, ctx.dtype), torch.zeros(()), "row")


# ---- rms_norm ------------------------------------------------------------------------------------

def run_rms_norm(ctx: Ctx, p: dict) -> Outcome:
    g = generator(p["seed"])
    T, D = p["T"], p["D"]
    rows = 10.0 ** (torch.rand(T, 1, generator=g, dtype=F64) * 6 - 3)  # rows from 1e-3 to 1e3
    x = rounded(randn(g, T, D) * rows, ctx.dtype)
    scale = randn(g, D, scale=0.5).add(1.0).to(ctx.small_dtype).to(F64)
    out = ctx.call("rms_norm", ctx.engine.rms_norm, ctx.to_engine(x), ctx.to_engine(scale, ctx.small_dtype), 1e-5)
    ctx.check_tensor("rms_norm", out, (T, D))
    ref = ctx.oracle.rms_norm(x, scale, 1e-5)
    return _outcome("rms_norm", out, ref, tol.rms_norm_bound(ref, ctx.dtype))


# ---- rope ----------------------------------------------------------------------------------------

def run_rope(ctx: Ctx, p: dict) -> Outcome:
    g = generator(p["seed"])
    T, Hq, Hkv, d = p["T"], p["Hq"], p["Hkv"], p["d"]
    cfg = GPT_OSS.model_copy(update={"head_dim": d})
    inv_freq, conc = yarn_inv_freq(cfg, ctx.small_dtype)
    positions = torch.randint(p["max_pos"], (T,), generator=g)
    positions[0] = 0
    q = rounded(randn(g, T, Hq, d), ctx.dtype)
    k = rounded(randn(g, T, Hkv, d), ctx.dtype)
    out = ctx.call("rope", ctx.engine.rope, ctx.to_engine(q), ctx.to_engine(k), positions.to(ctx.device),
                   inv_freq.to(ctx.device), conc)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise CaseFailure(Outcome("rope", 0, 0, math.inf, message="must return a (q, k) pair"), p)
    qo = ctx.check_tensor("rope", out[0], (T, Hq, d), what="q")
    ko = ctx.check_tensor("rope", out[1], (T, Hkv, d), what="k")
    inv64 = inv_freq.to(F64)  # the engine's frequencies, exactly
    qr, kr = ctx.oracle.rope(q, k, positions, inv64, conc)
    return _worst(_outcome("rope", qo, qr, tol.rope_bound(q, positions, inv64, conc, ctx.dtype), "q"),
                  _outcome("rope", ko, kr, tol.rope_bound(k, positions, inv64, conc, ctx.dtype), "k"))


# ---- linear --------------------------------------------------------------------------------------

def _linear_layer(ctx: Ctx, op: str, w: torch.Tensor, b: torch.Tensor | None):
    engine_layer = ctx.call(op, ctx.engine.prepare_linear, w, b, ctx.dtype, ctx.device)
    oracle_layer = ctx.oracle.prepare_linear(w, b, F64, "cpu")
    return engine_layer, oracle_layer


def run_linear(ctx: Ctx, p: dict) -> Outcome:
    g = generator(p["seed"])
    T, K, N = p["T"], p["K"], p["N"]
    x = rounded(randn(g, T, K), ctx.dtype)
    w = canonical(randn(g, N, K, scale=1 / math.sqrt(K)))
    b = canonical(randn(g, N, scale=0.5)) if p["bias"] else None
    layer, ref_layer = _linear_layer(ctx, "linear", w, b)
    out = ctx.call("linear", ctx.engine.linear, ctx.to_engine(x), layer)
    ctx.check_tensor("linear", out, (T, N))
    ref = ctx.oracle.linear(x, ref_layer)
    w64, b64 = w.to(F64), None if b is None else b.to(F64)
    return _outcome("linear", out, ref, tol.linear_bound(x, w64, b64, ref, ctx.dtype), K=K)


# ---- attention -----------------------------------------------------------------------------------

def batch_to(batch: Batch, device: torch.device) -> Batch:
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def run_attention(ctx: Ctx, p: dict) -> Outcome:
    """``p["seqs"]``: (past, new) per sequence; cache rows are a permutation, so a kernel that ignores
    ``slot_mapping``/``cache_rows`` reads or writes the wrong row."""
    g = generator(p["seed"])
    Hq, Hkv, d, window = p["Hq"], p["Hkv"], p["d"], p["window"]
    past = [s[0] for s in p["seqs"]]
    new = [s[1] for s in p["seqs"]]
    S = len(new)
    rows = torch.randperm(S + 1, generator=g)[:S].tolist()  # one spare row stays NaN
    cache_len = max(a + b for a, b in zip(past, new)) + p.get("slack", 3)
    batch = Batch.build(new, past, rows, cache_len)
    T = batch.num_tokens
    kc = torch.full((S + 1, cache_len, Hkv, d), math.nan, dtype=F64)
    vc = torch.full_like(kc, math.nan)
    for r, n in zip(rows, past):  # what earlier steps wrote
        kc[r, :n] = rounded(randn(g, n, Hkv, d), ctx.dtype)
        vc[r, :n] = rounded(randn(g, n, Hkv, d), ctx.dtype)
    q = rounded(randn(g, T, Hq, d, scale=p["q_scale"]), ctx.dtype)
    k = rounded(randn(g, T, Hkv, d), ctx.dtype)
    v = rounded(randn(g, T, Hkv, d), ctx.dtype)
    sinks = randn(g, Hq, scale=p["sink_scale"]).add(p.get("sink_shift", 0.0)).to(ctx.small_dtype).to(F64)
    sm_scale = 1 / math.sqrt(d)

    ekc, evc = ctx.to_engine(kc), ctx.to_engine(vc)
    out = ctx.call("attention", ctx.engine.attention, ctx.to_engine(q), ctx.to_engine(k), ctx.to_engine(v),
                   ctx.to_engine(sinks, ctx.small_dtype), ekc, evc, batch_to(batch, ctx.device), window, sm_scale)
    ctx.check_tensor("attention", out, (T, Hq, d))
    okc, ovc = kc.clone(), vc.clone()
    ref = ctx.oracle.attention(q, k, v, sinks, okc, ovc, batch, window, sm_scale)
    # The caller owns the cache: the new keys/values must land exactly at slot_mapping, nowhere else.
    for name, got, want in (("k_cache", ekc, okc), ("v_cache", evc, ovc)):
        c = tol.compare(got, want, torch.zeros(()))
        if c["ratio"] > 0:
            idx = c["index"]
            return Outcome("attention", c["observed"], 0.0, math.inf, where=f"{name}{idx}",
                           message=f"{name} after the call differs from the slot_mapping write at "
                                   f"(row, position, head, channel)={idx} ({c['note'] or 'wrong value'}): "
                                   "new keys/values must be written at batch.slot_mapping")
    bound = tol.attention_bound(q, okc, ovc, sinks, batch, window, sm_scale, ref, ctx.dtype)
    return _outcome("attention", out, ref, bound, "(token, head, channel)", keys=max(a + b for a, b in p["seqs"]))


# ---- router --------------------------------------------------------------------------------------

def run_router(ctx: Ctx, p: dict) -> Outcome:
    g = generator(p["seed"])
    T, D, E, k = p["T"], p["D"], p["E"], p["k"]
    exact = p.get("ties", False)
    if exact:
        # Small integers: every product and partial sum is exact in bfloat16 and wider, in any order,
        # so tied logits are bitwise equal in every honest engine and the tie rule (lower index first) is
        # checkable. Experts come in groups of equal rows.
        x = torch.randint(-2, 3, (T, D), generator=g).to(F64)
        base = torch.randint(-1, 2, (max(E // 2, 1), D), generator=g).to(F64)
        w = base.repeat_interleave(2, dim=0)[:E] if E > 1 else base
        perm = torch.randperm(E, generator=g)
        w = w[perm]
        b = torch.zeros(E, dtype=F64)
    else:
        x = rounded(randn(g, T, D), ctx.dtype)
        w = randn(g, E, D, scale=1 / math.sqrt(D))
        b = randn(g, E, scale=0.1)
    w, b = canonical(w), canonical(b)
    gate, ref_gate = _linear_layer(ctx, "router", w, b)
    res = ctx.call("router", ctx.engine.router, ctx.to_engine(x), gate, k)
    if not (isinstance(res, tuple) and len(res) == 2):
        raise CaseFailure(Outcome("router", 0, 0, math.inf, message="must return (weights, indices)"), p)
    wo = ctx.check_tensor("router", res[0], (T, k), what="weights")
    io = ctx.check_tensor("router", res[1], (T, k), torch.int64, what="indices").cpu()
    w64, b64 = w.to(F64), b.to(F64)
    logits = x @ w64.T + b64  # (T, E) exact float64
    lb = torch.zeros_like(logits) if exact else tol.linear_bound(x, w64, b64, logits, ctx.dtype)
    ref_w, ref_i = ctx.oracle.router(x, ref_gate, k)
    for t in range(T):
        chosen = io[t].tolist()
        if len(set(chosen)) != k or min(chosen) < 0 or max(chosen) >= E:
            return Outcome("router", 0, 0, math.inf, where=f"token {t}",
                           message=f"token {t}: indices {chosen} are not {k} distinct experts in [0, {E})")
        if exact:
            if chosen != ref_i[t].tolist():
                return Outcome("router", 0, 0, math.inf, where=f"token {t}",
                               message=f"token {t}: chose experts {chosen}, expected {ref_i[t].tolist()} "
                                       f"(logits {logits[t, ref_i[t]].tolist()}; ties must go to the lower index, "
                                       "order descending)")
            continue
        lo = (logits[t] - lb[t])
        hi = (logits[t] + lb[t])
        others = [e for e in range(E) if e not in chosen]
        if others:
            best_other = max(others, key=lambda e: float(lo[e]))
            worst_chosen = min(chosen, key=lambda e: float(hi[e]))
            if lo[best_other] > hi[worst_chosen]:
                return Outcome("router", float(logits[t, best_other] - logits[t, worst_chosen]),
                               float(lb[t, best_other] + lb[t, worst_chosen]), math.inf, where=f"token {t}",
                               message=f"token {t}: chose expert {worst_chosen} (logit {float(logits[t, worst_chosen]):.6g}) "
                                       f"over expert {best_other} (logit {float(logits[t, best_other]):.6g}), a gap "
                                       "beyond rounding: not the top-k")
        for a, c in zip(chosen, chosen[1:]):
            if hi[a] < lo[c]:
                return Outcome("router", 0, 0, math.inf, where=f"token {t}",
                               message=f"token {t}: indices {chosen} not sorted by descending logit")
    sel = torch.gather(logits, 1, io)  # the oracle's logits of the engine's choice
    ref_weights = torch.softmax(sel, dim=-1)
    lb_sel = torch.gather(lb, 1, io).amax(dim=-1, keepdim=True)
    bound = 2 * ref_weights * lb_sel + tol.SAFETY * (2 * tol.u(ctx.dtype) + 4 * tol.u_acc(ctx.dtype)) * ref_weights \
        + tol.floor(ctx.dtype, k)
    return _outcome("router", wo, ref_weights, bound, "weights(token, slot)")


# ---- experts -------------------------------------------------------------------------------------

def _run_experts(ctx: Ctx, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, mlp1: ExpertLinear,
                 mlp2: ExpertLinear, alpha: float, limit: float, exact: bool = False) -> Outcome:
    T, D = x.shape
    prepared = ctx.call("experts", ctx.engine.prepare_experts, mlp1, mlp2, ctx.dtype, ctx.device)
    out = ctx.call("experts", ctx.engine.experts, ctx.to_engine(x), ctx.to_engine(weights), idx.to(ctx.device),
                   prepared, alpha, limit)
    ctx.check_tensor("experts", out, (T, D))
    ref_prep = ctx.oracle.prepare_experts(mlp1, mlp2, F64, "cpu")
    ref = ctx.oracle.experts(x, weights, idx, ref_prep, alpha, limit)
    if exact:
        return _outcome("experts", out, rounded(ref, ctx.dtype), torch.zeros(()), "(token, channel)")
    bound = tol.experts_bound(x, weights, idx, mlp1.dense(F64), mlp1.bias.to(F64), mlp2.dense(F64),
                              mlp2.bias.to(F64), alpha, limit, ref, ctx.dtype)
    return _outcome("experts", out, ref, bound, "(token, channel)")


def run_experts(ctx: Ctx, p: dict) -> Outcome:
    g = generator(p["seed"])
    T, D, I, E, k = p["T"], p["D"], p["I"], p["E"], p["k"]
    dense = p["format"] == "dense"
    bs = p.get("bias_scale", 0.1)
    mlp1 = random_experts(g, E, 2 * I, D, p["w_scale"] / math.sqrt(D), dense, bias_scale=bs)
    mlp2 = random_experts(g, E, D, I, 1 / math.sqrt(I), dense, bias_scale=bs)
    if p.get("nan_scales"):  # E8M0 0xFF: NaN blocks in one expert of each layer
        for lin in (mlp1, mlp2):
            e = int(torch.randint(E, (1,), generator=g))
            n = int(torch.randint(lin.scales.shape[1], (1,), generator=g))
            lin.scales[e, n, 0] = mxfp4.SCALE_NAN
    x = rounded(randn(g, T, D, scale=p["x_scale"]), ctx.dtype)
    weights, idx = routing(g, T, E, k, p["routing"], ctx.dtype)
    return _run_experts(ctx, x, weights.to(F64), idx, mlp1, mlp2, 1.702, p.get("limit", 7.0))


def _fp4_codes(g: torch.Generator, shape: tuple) -> torch.Tensor:
    return torch.randint(16, shape, generator=g, dtype=torch.uint8)


def run_mxfp4_exact(ctx: Ctx, p: dict) -> Outcome:
    """Bit-exact dequantization, seen through the experts op with inputs that make every step exact.

    Tokens are one-hot (x = e_j): mlp1's output is column j of W1 (one non-zero product, exact).
    Gate rows hold 32 and ``swiglu_limit`` is 64, so σ(1.702·32) is 1 in every precision and
    SwiGLU = 32·(linear + 1), exact for the scales used. mlp2 is a 0/1 selection matrix (or, to test
    mlp2, the gate rows select: gate_i = 32·x_i, linear rows 0, so SwiGLU is 32 · one-hot), so the result
    is 32 × one dequantized value: any nibble-order, sign, or scale-bias error shows up as a difference.
    All biases are zero, so a dropped bias cannot masquerade as a dequantization error.
    """
    g = generator(p["seed"])
    E, D, I = 2, 64, 32
    lo, hi = p["scale_range"]
    ones_code, code_4 = 2, 6  # E2M1 codes of 1.0 and 4.0

    def fp4(codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor) -> ExpertLinear:
        return ExpertLinear(bias=canonical(bias), blocks=mxfp4.pack(codes), scales=scales)

    # mlp1 (E, 2I, D): even (gate) rows 32 = 4·2^3, odd (linear) rows under test or identity.
    codes1 = torch.full((E, 2 * I, D), code_4, dtype=torch.uint8)
    scales1 = torch.full((E, 2 * I, D // 32), 127 + 3, dtype=torch.uint8)
    bias1 = torch.zeros(E, 2 * I, dtype=F64)
    codes2 = torch.zeros((E, D, I), dtype=torch.uint8)
    scales2 = torch.full((E, D, I // 32), 127, dtype=torch.uint8)
    if p["target"] == "mlp1":
        codes1[:, 1::2] = _fp4_codes(g, (E, I, D))
        scales1[:, 1::2] = torch.randint(lo, hi + 1, (E, I, D // 32), generator=g, dtype=torch.uint8)
        codes2[:, torch.arange(D), torch.arange(D) % I] = ones_code  # y_d = s_(d mod I)
        T = D
    else:
        # The gate selects: gate_i = 32·x_i, so SwiGLU is 32·(0 + 1) at the token's channel and 0·σ(0)·1 = 0
        # elsewhere; linear rows and every bias are 0 (a dropped bias changes nothing here).
        codes1[:, 0::2] = 0
        codes1[:, 2 * torch.arange(I), torch.arange(I)] = code_4
        codes1[:, 1::2] = 0
        scales1[:, 1::2] = 127
        codes2 = _fp4_codes(g, (E, D, I))
        scales2 = torch.randint(lo, hi + 1, (E, D, I // 32), generator=g, dtype=torch.uint8)
        T = I
    mlp1 = fp4(codes1.reshape(E, 2 * I, D), scales1, bias1)
    mlp2 = fp4(codes2, scales2, torch.zeros(E, D, dtype=F64))
    x = torch.zeros(T * E, D, dtype=F64)
    x[torch.arange(T * E), torch.arange(T * E) % T] = 1.0
    idx = (torch.arange(T * E) // T)[:, None]  # first T tokens on expert 0, the next on expert 1
    weights = torch.ones(T * E, 1, dtype=F64)
    o = _run_experts(ctx, x, weights, idx, mlp1, mlp2, 1.702, 64.0, exact=True)
    if not o.passed:
        o.message = (f"MXFP4 dequantization of {p['target']} is not bit-exact: {o.where} is off by "
                     f"{o.observed:.6g} (nibble order, sign, or E8M0 scale bias?). This exactness test also relies "
                     "on SwiGLU (gate clamp, sigmoid, the +1 of linear + 1; biases are all zero here): if the "
                     "experts/random cases fail too, look there first")
    return o


# ---- the grid ------------------------------------------------------------------------------------

def _d(**kw):
    return st.fixed_dictionaries({**kw, "seed": SEEDS})


def _attention_seq_strategy(max_past: int, max_new: int, max_seqs: int):
    seq = st.tuples(st.integers(0, max_past), st.integers(1, max_new))
    return st.lists(seq, min_size=1, max_size=max_seqs)


def cases(dtype: str, head_dims: tuple[int, ...], profile: Profile) -> list[Case]:
    """The level-1 grid for one dtype."""
    dt_req = (f"dtype:{dtype}",)
    W = GPT_OSS.sliding_window  # 128
    out: list[Case] = []

    def add(op, name, run, strategy, examples=(), requires=(), description="", exact=False):
        out.append(Case("L1", op, name, run, strategy, tuple(examples), (f"op:{op}",) + dt_req + tuple(requires),
                        dtype, description, exact))

    add("embedding", "gather", run_embedding,
        lambda pr: _d(V=st.integers(2, 4096), D=st.sampled_from([32, 64, 2880]), T=st.integers(2, 64)),
        [dict(V=201088, D=64, T=16, seed=0)], exact=True, description="embedding lookup is a bit-exact gather")
    add("rms_norm", "random", run_rms_norm,
        lambda pr: _d(T=st.integers(1, 32), D=st.sampled_from([32, 64, 2880])),
        [dict(T=4, D=2880, seed=0)], description="rows from 1e-3 to 1e3 in magnitude")
    for d in sorted(set(head_dims)):
        add("rope", f"yarn_d{d}", run_rope,
            lambda pr, d=d: _d(T=st.integers(1, 64), Hq=st.sampled_from([2, 8]), Hkv=st.sampled_from([1, 2]), d=st.just(d),
                               max_pos=st.sampled_from([64, 4096, 131072])),
            [dict(T=16, Hq=8, Hkv=2, d=d, max_pos=131072, seed=0),
             dict(T=1, Hq=8, Hkv=2, d=d, max_pos=8192, seed=1)],  # one token: the decode path
            requires=[f"head_dim:{d}"],
            description="YaRN frequencies and concentration, halves (not interleaved), positions up to 131072")
    add("linear", "random", run_linear,
        lambda pr: _d(T=st.integers(1, 16), K=st.sampled_from([64, 2880]), N=st.sampled_from([32, 128]),
                      bias=st.booleans()),
        [dict(T=4, K=2880, N=64, bias=True, seed=0)])
    add("linear", "long_reduction", run_linear,
        lambda pr: _d(T=st.just(8), K=st.just(pr.big_k), N=st.just(64), bias=st.just(False)),
        [dict(T=8, K=profile.big_k, N=64, bias=False, seed=1)],
        description="K in the thousands: fp32 accumulation is required, bf16 accumulation is caught")

    for d in sorted(set(head_dims)):
        hd = (f"head_dim:{d}",)
        base = dict(d=d, q_scale=1.0, sink_scale=1.0, window=0)

        def att(name, examples, strategy, requires=(), description=""):
            add("attention", f"{name}_d{d}", run_attention, strategy, examples, hd + ("sinks",) + tuple(requires),
                description)

        att("prefill", [dict(base, Hq=8, Hkv=1, seqs=[(0, 37)], seed=0), dict(base, Hq=4, Hkv=4, seqs=[(0, 1)], seed=1)],
            lambda pr, d=d: _d(d=st.just(d), Hq=st.sampled_from([2, 8]), Hkv=st.sampled_from([1, 2]),
                               seqs=_attention_seq_strategy(0, 48, 3), q_scale=st.sampled_from([0.5, 1.0, 3.0]),
                               sink_scale=st.sampled_from([0.0, 1.0, 4.0]), window=st.just(0)),
            description="causal GQA prefill with sinks, no window; KV length 1 (a one-token prompt)")
        att("decode", [dict(base, Hq=8, Hkv=2, seqs=[(1, 1), (0, 1), (40, 1)], seed=0)],
            lambda pr, d=d: _d(d=st.just(d), Hq=st.sampled_from([2, 8]), Hkv=st.sampled_from([1, 2]),
                               seqs=_attention_seq_strategy(64, 1, 4), q_scale=st.sampled_from([0.5, 1.0, 3.0]),
                               sink_scale=st.sampled_from([0.0, 1.0]), window=st.just(0)),
            description="one new token per sequence over cached keys (KV lengths 0 and 1 cached included)")
        att("chunked_prefill", [dict(base, Hq=8, Hkv=2, seqs=[(20, 7), (3, 12)], seed=0)],
            lambda pr, d=d: _d(d=st.just(d), Hq=st.sampled_from([2, 8]), Hkv=st.sampled_from([1, 2]),
                               seqs=_attention_seq_strategy(40, 16, 3), q_scale=st.just(1.0),
                               sink_scale=st.just(1.0), window=st.sampled_from([0, 8])),
            description="several new tokens on top of cached ones, varlen batch")
        att("sinks_dominant", [dict(base, Hq=4, Hkv=2, seqs=[(0, 20), (5, 1)], sink_scale=0.5, sink_shift=3.0, seed=0)],
            lambda pr, d=d: _d(d=st.just(d), Hq=st.just(4), Hkv=st.just(2), seqs=_attention_seq_strategy(16, 8, 2),
                               q_scale=st.just(0.5), sink_scale=st.just(0.5), sink_shift=st.sampled_from([2.0, 4.0]),
                               window=st.just(0)),
            description="large sinks absorb most of the mass: an engine that ignores sinks is far off")
        # The 128-token window of gpt-oss: a key at distance 127 is in, 128 is out.
        win = dict(base, window=W, Hq=8, Hkv=2)
        att("window_boundary", [dict(win, seqs=[(0, W + 2)], seed=0),  # prefill across the boundary
                                dict(win, seqs=[(W - 1, 1), (W, 1), (W + 1, 1)], seed=1),  # decode at / across
                                dict(win, seqs=[(W - 2, 4), (2 * W - 1, 2)], seed=2)],  # chunks straddling it
            lambda pr, d=d: _d(d=st.just(d), Hq=st.sampled_from([2, 8]), Hkv=st.sampled_from([1, 2]),
                               seqs=st.lists(st.tuples(st.integers(W - 3, W + 3), st.integers(1, 4)), min_size=1,
                                             max_size=3),
                               q_scale=st.sampled_from([1.0, 3.0]), sink_scale=st.just(1.0), window=st.just(W)),
            requires=["sliding_window"], description="window 128 exactly at and across the boundary, prefill and decode")
        att("window_small", [dict(base, window=4, Hq=4, Hkv=2, seqs=[(0, 9), (6, 3)], seed=0)],
            lambda pr, d=d: _d(d=st.just(d), Hq=st.just(4), Hkv=st.sampled_from([1, 2]),
                               seqs=_attention_seq_strategy(12, 10, 3), q_scale=st.just(1.0), sink_scale=st.just(1.0),
                               window=st.integers(1, 6)),
            requires=["sliding_window"], description="windows of 1..6 tokens, including window 1 (self only)")
        L = profile.long_context
        att("long_context", [dict(base, window=0, Hq=8, Hkv=2, seqs=[(L - 1, 1), (L - 33, 32)], seed=0),
                             dict(base, window=W, Hq=8, Hkv=2, seqs=[(L - 1, 1)], seed=1)],
            lambda pr, d=d: _d(d=st.just(d), Hq=st.just(8), Hkv=st.sampled_from([1, 2]),
                               seqs=st.lists(st.tuples(st.integers(pr.long_context // 2, pr.long_context - 8),
                                                       st.integers(1, 8)), min_size=1, max_size=2),
                               q_scale=st.just(1.0), sink_scale=st.just(1.0), window=st.sampled_from([0, W])),
            requires=["sliding_window", f"context:{L}"],
            description=f"contexts of up to {L} keys, full and windowed")
        # Long decode: one query row over thousands of keys (split-KV / long-context kernels), past gpt-oss's
        # initial_context_length (4096), GQA with several KV heads. One query row keeps the oracle cheap.
        LD = profile.long_decode
        ld = []
        for i, n in enumerate(LD):
            ld.append(dict(base, window=W, Hq=8, Hkv=2, seqs=[(n - 1, 1), (n // 2, 1)], seed=10 + i))
            ld.append(dict(base, window=0, Hq=64 if i == 0 else 8, Hkv=8 if i == 0 else 4, seqs=[(n - 1, 1)],
                           seed=20 + i))
        att("long_decode", ld, None, requires=["sliding_window", f"context:{max(LD)}"],
            description=f"one new token over {', '.join(map(str, LD))} cached keys, windowed and full, GQA")

    add("router", "random", run_router,
        lambda pr: _d(T=st.integers(1, 32), D=st.sampled_from([64, 2880]), E=st.sampled_from([4, 32, 128]),
                      k=st.sampled_from([1, 2, 4])),
        [dict(T=16, D=2880, E=32, k=4, seed=0)], requires=["experts:32", "experts_per_token:4"],
        description="top-k then softmax over the chosen k; near-ties within the logit bound may go either way")
    add("router", "ties", run_router,
        lambda pr: _d(T=st.integers(1, 16), D=st.sampled_from([8, 32]), E=st.sampled_from([4, 8, 32]),
                      k=st.sampled_from([1, 2, 3, 4]), ties=st.just(True)),
        [dict(T=16, D=8, E=8, k=3, ties=True, seed=0)], requires=["experts:32", "experts_per_token:4"],
        exact=True, description="exactly tied logits: lower expert index first")
    add("router", "topk_eq_experts", run_router,
        lambda pr: _d(T=st.integers(1, 8), D=st.just(64), E=st.just(4), k=st.just(4)),
        [dict(T=4, D=64, E=4, k=4, seed=0)], requires=["experts:4", "experts_per_token:4"],
        description="k equal to the number of experts")

    fmt_req = {"mxfp4": ("mxfp4",), "dense": ("dense_experts",)}
    for fmt in ("mxfp4", "dense"):
        ex = dict(T=12, D=64, I=64, E=8, k=2, format=fmt, w_scale=1.0, x_scale=1.0, routing="random", seed=0)
        add("experts", f"random_{fmt}", run_experts,
            lambda pr, fmt=fmt: _d(T=st.integers(1, 24), D=st.sampled_from([64, 128]), I=st.sampled_from([32, 64]),
                                   E=st.sampled_from([4, 8, 32]), k=st.sampled_from([1, 2, 4]), format=st.just(fmt),
                                   w_scale=st.sampled_from([0.5, 1.0, 2.0]), x_scale=st.just(1.0),
                                   routing=st.just("random")).filter(lambda p: p["k"] <= p["E"]),
            [ex, dict(ex, T=2, E=32, k=4, seed=1), dict(ex, bias_scale=1.0, seed=2)], requires=fmt_req[fmt] + ("experts:32", "experts_per_token:4"),
            description="MoE layer; includes experts that receive no tokens (E > T·k)")
    add("experts", "swiglu_clamp", run_experts,
        lambda pr: _d(T=st.integers(1, 16), D=st.just(64), I=st.just(64), E=st.just(4), k=st.just(2),
                      format=st.just("mxfp4"), w_scale=st.sampled_from([8.0, 16.0]), x_scale=st.sampled_from([2.0, 4.0]),
                      routing=st.just("random")),
        [dict(T=8, D=64, I=64, E=4, k=2, format="mxfp4", w_scale=16.0, x_scale=4.0, routing="random", seed=0)],
        requires=["mxfp4"], description="activations far beyond ±7: the gate and linear clamps matter")
    add("experts", "one_expert", run_experts,
        lambda pr: _d(T=st.integers(1, 32), D=st.just(64), I=st.just(64), E=st.just(8), k=st.sampled_from([1, 2]),
                      format=st.just("mxfp4"), w_scale=st.just(1.0), x_scale=st.just(1.0), routing=st.just("one_expert")),
        [dict(T=32, D=64, I=64, E=8, k=1, format="mxfp4", w_scale=1.0, x_scale=1.0, routing="one_expert", seed=0)],
        requires=["mxfp4"], description="every token routed to the same expert")
    add("experts", "topk_eq_experts", run_experts,
        lambda pr: _d(T=st.integers(1, 8), D=st.just(64), I=st.just(32), E=st.just(4), k=st.just(4),
                      format=st.just("mxfp4"), w_scale=st.just(1.0), x_scale=st.just(1.0), routing=st.just("random")),
        [dict(T=4, D=64, I=32, E=4, k=4, format="mxfp4", w_scale=1.0, x_scale=1.0, routing="random", seed=0)],
        requires=["mxfp4", "experts:4", "experts_per_token:4"], description="k equal to the number of experts")
    add("experts", "e8m0_nan", run_experts,
        lambda pr: _d(T=st.integers(4, 16), D=st.just(64), I=st.just(64), E=st.just(4), k=st.just(2),
                      format=st.just("mxfp4"), w_scale=st.just(1.0), x_scale=st.just(1.0), routing=st.just("random"),
                      nan_scales=st.just(True)),
        [dict(T=16, D=64, I=64, E=4, k=2, format="mxfp4", w_scale=1.0, x_scale=1.0, routing="random",
              nan_scales=True, seed=0)],
        requires=["mxfp4"], description="E8M0 scale 0xFF is NaN: exactly the outputs that use the block are NaN")

    # Bit-exact dequantization: the scale range keeps every intermediate exact in the dtype.
    wide = dtype != "float16"
    for target in ("mlp1", "mlp2"):
        rng = (122, 130) if target == "mlp1" else ((127 - 40, 127 + 40) if wide else (127 - 10, 127 + 5))
        add("experts", f"mxfp4_dequant_{target}", run_mxfp4_exact,
            lambda pr, target=target, rng=rng: _d(target=st.just(target), scale_range=st.just(rng)),
            [dict(target=target, scale_range=rng, seed=0)], requires=["mxfp4"], exact=True,
            description="bit-exact MXFP4 dequantization: every nibble, low nibble first, E8M0 bias 127")
    if wide:
        for name, rng in (("low", (2, 14)), ("high", (240, 252))):
            add("experts", f"mxfp4_scale_extremes_{name}", run_mxfp4_exact,
                lambda pr, rng=rng: _d(target=st.just("mlp2"), scale_range=st.just(rng)),
                [dict(target="mlp2", scale_range=rng, seed=0)], requires=["mxfp4"], exact=True,
                description="E8M0 scales at the ends of the range (down to 2^-125, up to overflow to inf)")
    return out
