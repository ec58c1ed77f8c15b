"""Level 1: every op against the float64 oracle, with derived per-element bounds (tolerances.py).

Shape legend: T tokens, D hidden, K/N a linear layer's in/out features, E experts, k experts per
token, I intermediate, Hq/Hkv heads, d head_dim, L keys.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from hypothesis import strategies as st

from mxmoe.core import mxfp4
from mxmoe.core.backend import FUSED_OPS, Experts
from mxmoe.core.batch import Batch
from mxmoe.core.config import preset
from mxmoe.core.rope import yarn_inv_freq
from mxmoe.core.weights import ExpertLinear

from . import tolerances as tol
from .case import Case, CaseFailure, Ctx, Limits, Outcome, Profile
from .inputs import (SEEDS, F64, CachedExperts, canonical, generator, randn, random_dense_exact, random_experts,
                     random_experts_packed, rounded, routing)

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


# ---- add_rms_norm (a fused part of op "rms_norm", API 1.2) -----------------------------------------

_DELTA_SCALES = {"small": 2.0 ** -10, "same": 1.0, "large": 2.0 ** 10}  # |delta| relative to the row of x


def run_add_rms_norm(ctx: Ctx, p: dict) -> Outcome:
    """The residual add + RMSNorm against the composition of reference ops: ``s`` must be exactly x + delta
    rounded once to the dtype (one correctly rounded add: an engine that adds in float32 and rounds once
    gets it bit for bit), ``h`` the RMSNorm of that rounded ``s`` within rms_norm's bound. ``delta``:
    "small"/"same"/"large" magnitudes relative to x's row (large: x is mostly rounded away in s, so a norm
    of x instead of s is far off), or "cancel" (delta ≈ -x: s is the small difference, exact in the dtype)."""
    g = generator(p["seed"])
    T, D = p["T"], p["D"]
    top = 1e3 if ctx.dtype == torch.float16 else 1e6  # keeps x + delta finite in float16
    rows = 10.0 ** (torch.rand(T, 1, generator=g, dtype=F64) * 6 - 3)  # rows of x from 1e-3 to 1e3
    x = rounded(randn(g, T, D) * rows, ctx.dtype)
    if p["delta"] == "cancel":
        delta = rounded(-x * (1 + randn(g, T, D, scale=2.0 ** -6)), ctx.dtype)
    else:
        delta = rounded(randn(g, T, D) * (rows * _DELTA_SCALES[p["delta"]]).clamp(max=top), ctx.dtype)
    scale = randn(g, D, scale=0.5).add(1.0).to(ctx.small_dtype).to(F64)
    res = ctx.call("add_rms_norm", ctx.engine.add_rms_norm, ctx.to_engine(x), ctx.to_engine(delta),
                   ctx.to_engine(scale, ctx.small_dtype), 1e-5)
    if not (isinstance(res, tuple) and len(res) == 2):
        raise CaseFailure(Outcome("add_rms_norm", 0, 0, math.inf, message="must return an (s, h) pair"), p)
    so = ctx.check_tensor("add_rms_norm", res[0], (T, D), what="s (the sum)")
    ho = ctx.check_tensor("add_rms_norm", res[1], (T, D), what="h (the norm)")
    s_ref = rounded(x + delta, ctx.dtype)  # exact in float64, then one rounding
    h_ref = ctx.oracle.rms_norm(s_ref, scale, 1e-5)
    o_s = _outcome("add_rms_norm", so, s_ref, torch.zeros(()), "s")
    if not o_s.passed:
        o_s.message = (f"s = x + delta is not the sum rounded once to {ctx.dtype}: {o_s.where} is off by "
                       f"{o_s.observed:.6g} (bit-exact required)")
    return _worst(o_s, _outcome("add_rms_norm", ho, h_ref, tol.rms_norm_bound(h_ref, ctx.dtype), "h"))


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
    if p.get("chunked"):
        return run_wide_linear(ctx, p)
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


def run_wide_linear(ctx: Ctx, p: dict) -> Outcome:
    """A layer too wide for a float64 copy (the unembedding: N = 201088): the oracle and the bound are
    computed 16384 output rows at a time. Weights are int8 integers times a power of two (exact in bf16)."""
    g = generator(p["seed"])
    T, K, N = p["T"], p["K"], p["N"]
    x = rounded(randn(g, T, K), ctx.dtype)
    w = _wide_weight(p["seed"], N, K)
    layer = ctx.call("linear", ctx.engine.prepare_linear, w, None, ctx.dtype, ctx.device)
    out = ctx.call("linear", ctx.engine.linear, ctx.to_engine(x), layer)
    ctx.check_tensor("linear", out, (T, N))
    del layer
    out = out.to("cpu", F64)
    worst = None
    for n0 in range(0, N, 16384):
        wc = w[n0:n0 + 16384]
        ref = ctx.oracle.linear(x, ctx.oracle.prepare_linear(wc, None, F64, "cpu"))
        o = _outcome("linear", out[:, n0:n0 + 16384], ref, tol.linear_bound(x, wc.to(F64), None, ref, ctx.dtype),
                     K=K, N=N)
        if o.where.startswith("output[") and o.ratio > 0:  # report the column in the whole layer
            t, n = (int(v) for v in o.where[len("output["):].split("]")[0].split(","))
            o.where = f"output[{t}, {n + n0}]" + o.where.split("]", 1)[1]
        if worst is None or o.ratio > worst.ratio:
            worst = o
    return worst


@functools.lru_cache(maxsize=1)
def _wide_weight(seed: int, N: int, K: int) -> torch.Tensor:
    return random_dense_exact(generator(seed + 1), N, K, 1 / math.sqrt(K))  # every dtype of a run reuses it


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
    if p.get("v_const"):
        # Every key carries the same value vector: the output is that vector times the mass the keys take
        # from the sink, so it shows the softmax normaliser alone (no P·V cancellation to hide in).
        c = rounded(randn(g, 1, Hkv, d), ctx.dtype)
        v = c.expand(T, Hkv, d).clone()
        for r, n in zip(rows, past):
            vc[r, :n] = c[0]
    sinks = randn(g, Hq, scale=p["sink_scale"]).add(p.get("sink_shift", 0.0)).to(ctx.small_dtype).to(F64)
    sm_scale = 1 / math.sqrt(d)

    ekc, evc = ctx.to_engine(kc), ctx.to_engine(vc)
    out = ctx.call("attention", ctx.engine.attention, ctx.to_engine(q), ctx.to_engine(k), ctx.to_engine(v),
                   ctx.to_engine(sinks, ctx.small_dtype), ekc, evc, batch_to(batch, ctx.device), window, sm_scale)
    ctx.check_tensor("attention", out, (T, Hq, d))
    okc, ovc = kc.clone(), vc.clone()
    ref = ctx.oracle.attention(q, k, v, sinks, okc, ovc, batch, window, sm_scale)
    # The caller owns the cache: the new keys/values must land exactly at slot_mapping, nowhere else.
    for name, got, want, new_kv in (("k_cache", ekc, okc, k), ("v_cache", evc, ovc, v)):
        if _cache_as_expected(got, kc if name == "k_cache" else vc, new_kv, batch.slot_mapping):
            continue
        c = tol.compare(got, want, torch.zeros(()))
        if c["ratio"] > 0:
            idx = c["index"]
            return Outcome("attention", c["observed"], 0.0, math.inf, where=f"{name}{idx}",
                           message=f"{name} after the call differs from the slot_mapping write at "
                                   f"(row, position, head, channel)={idx} ({c['note'] or 'wrong value'}): "
                                   "new keys/values must be written at batch.slot_mapping")
    bound = tol.attention_bound(q, okc, ovc, sinks, batch, window, sm_scale, ref, ctx.dtype)
    return _outcome("attention", out, ref, bound, "(token, head, channel)", keys=max(a + b for a, b in p["seqs"]))


def _cache_as_expected(got: torch.Tensor, before: torch.Tensor, new: torch.Tensor, slots: torch.Tensor) -> bool:
    """Bitwise: ``got`` (engine dtype) is ``before`` with ``new`` written at ``slots`` (both exact in that
    dtype). The fast path of the cache check; on a mismatch the element-wise comparison says where."""
    want = before.to(got.dtype)
    want.view(-1, *want.shape[2:])[slots] = new.to(got.dtype)
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[got.element_size()]
    return torch.equal(got.cpu().view(ints), want.view(ints))


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
                 mlp2: ExpertLinear, alpha: float, limit: float, exact: bool = False,
                 exact_hidden: bool = False) -> Outcome:
    T, D = x.shape
    prepared = ctx.call("experts", ctx.engine.prepare_experts, mlp1, mlp2, ctx.dtype, ctx.device)
    out = ctx.call("experts", ctx.engine.experts, ctx.to_engine(x), ctx.to_engine(weights), idx.to(ctx.device),
                   prepared, alpha, limit)
    ctx.check_tensor("experts", out, (T, D))
    if not exact and all(e.is_mxfp4 and int(e.scales.max()) < 253 for e in (mlp1, mlp2)):
        # The oracle and the bound read each expert's float64 weights from one cache (what the reference's
        # prepare_experts would hold on the CPU, dequantized once instead of twice).
        mlp1, mlp2 = CachedExperts.of(mlp1), CachedExperts.of(mlp2)
        ref_prep = Experts(mlp1, mlp2, F64)
    else:
        ref_prep = ctx.oracle.prepare_experts(mlp1, mlp2, F64, "cpu")
    ref = ctx.oracle.experts(x, weights, idx, ref_prep, alpha, limit)
    if exact:
        return _outcome("experts", out, rounded(ref, ctx.dtype), torch.zeros(()), "(token, channel)")
    if exact_hidden:
        bound = tol.experts_exact_hidden_bound(x, idx, mlp1, mlp2, alpha, limit, ref, ctx.dtype)
    else:
        bound = tol.experts_bound(x, weights, idx, mlp1, mlp2, alpha, limit, ref, ctx.dtype)
    return _outcome("experts", out, ref, bound, "(token, channel)")


def run_experts(ctx: Ctx, p: dict) -> Outcome:
    """``packed``: MXFP4 bytes drawn directly (gpt-oss's widths). ``gate_shift``: every gate pre-activation
    moved far below -swiglu_limit and mlp2's bias zero, so the output is made of gate·σ(α·gate) at very
    negative gates (~1e-11): a gate clamped from below as well (to -limit) is off by ~5e-5, far outside
    even the bfloat16 bound."""
    g = generator(p["seed"])
    T, D, I, E, k = p["T"], p["D"], p["I"], p["E"], p["k"]
    dense = p["format"] == "dense"
    bs = p.get("bias_scale", 0.1)
    if p.get("packed"):
        mlp1 = random_experts_packed(g, E, 2 * I, D, p["w_scale"] / math.sqrt(D), bias_scale=bs)
        mlp2 = random_experts_packed(g, E, D, I, 1 / math.sqrt(I), bias_scale=bs)
    else:
        mlp1 = random_experts(g, E, 2 * I, D, p["w_scale"] / math.sqrt(D), dense, bias_scale=bs)
        mlp2 = random_experts(g, E, D, I, 1 / math.sqrt(I), dense, bias_scale=bs)
    if "gate_shift" in p:
        mlp1.bias[:, 0::2] = canonical(mlp1.bias[:, 0::2].to(F64) + p["gate_shift"])
        mlp2.bias.zero_()
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
    every_byte = p["scale_range"] == "all"
    E, D, I = 2, 128 if every_byte else 64, 32
    lo, hi = (0, 255) if every_byte else p["scale_range"]
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
        if every_byte:
            # Each of the 256 blocks gets its own scale byte: 0 (2^-127) and 1 (2^-126), 253 and 254 (2^127),
            # 255 (NaN). Codes are capped per scale so every dequantized weight is finite in float32/bfloat16
            # (at 254 only |v| <= 1.5): what overflows is the output 32·v, the same way in every honest order
            # of operations. At bytes 0 and 1 the weights are kept normal (|v| >= 2^-126, or 0): bf16 GEMMs may
            # flush subnormal operands (oneDNN on the CPU does, the reference included), so bit-exactness
            # through a matmul cannot be asked of them; a decoder that gets byte 0 or 1 wrong still shows.
            scales2 = torch.randperm(256, generator=g).to(torch.uint8).reshape(E, D, I // 32)
            per_value = scales2.repeat_interleave(32, dim=-1)
            cap = torch.full_like(per_value, 7)  # largest magnitude code: 6.0
            cap[per_value == 253], cap[per_value == 254] = 5, 3  # 3.0 · 2^126 and 1.5 · 2^127
            mag = torch.minimum(codes2 & 7, cap)
            low = ((per_value == 0) & (mag > 0) & (mag < 4)) | ((per_value == 1) & (mag == 1))
            mag = torch.where(low, mag + 3, mag).clamp(max=7)  # 0.5..1.5 · 2^-127 -> 2..4 · 2^-127
            codes2 = (codes2 & 8) | mag
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


def run_experts_reduction(ctx: Ctx, p: dict) -> Outcome:
    """One long reduction inside the experts, every other step exact, so fp32 accumulation is checkable
    through the whole op (bf16 accumulation across K tiles is caught, as for linear/long_reduction).

    ``mlp1``: D = K long, random; mlp2 a 0/1 selection (y_d = SwiGLU_(d mod I)): the output is SwiGLU of
    mlp1's dot products, with no second sum to hide their error in. ``mlp2``: tokens one-hot, mlp1's gate
    rows 32 (σ(1.702·32) = 1) and linear rows E2M1 values · ½ with swiglu_limit 64, so SwiGLU = 32·(v + 1)
    is exact in every dtype; mlp2 random with I = K long, bias 0, routing weight 1: only mlp2's
    accumulation and one rounding of its result are left, and the bound says so
    (tolerances.experts_exact_hidden_bound: bf16 and fp16 accumulation are both caught).
    """
    g = generator(p["seed"])
    K, E, T = p["K"], 2, 8
    idx = (torch.arange(T) * E // T)[:, None]  # tokens split between the two experts, k = 1
    weights = torch.ones(T, 1, dtype=F64)
    if p["target"] == "mlp1":
        D, I = K, 64
        mlp1 = random_experts(g, E, 2 * I, D, 2 / math.sqrt(D))
        codes2 = torch.zeros((E, D, I), dtype=torch.uint8)
        codes2[:, torch.arange(D), torch.arange(D) % I] = 2  # E2M1 code of 1.0
        mlp2 = ExpertLinear(bias=canonical(torch.zeros(E, D, dtype=F64)), blocks=mxfp4.pack(codes2),
                            scales=torch.full((E, D, I // 32), 127, dtype=torch.uint8))
        x = rounded(randn(g, T, D), ctx.dtype)
        return _run_experts(ctx, x, weights, idx, mlp1, mlp2, 1.702, 7.0)
    D, I = 64, K
    codes1 = torch.zeros((E, 2 * I, D), dtype=torch.uint8)
    codes1[:, 0::2] = 6  # 4.0 · 2^3 = 32 on every gate row
    codes1[:, 1::2] = _fp4_codes(g, (E, I, D))
    scales1 = torch.full((E, 2 * I, D // 32), 127 + 3, dtype=torch.uint8)
    scales1[:, 1::2] = 126
    mlp1 = ExpertLinear(bias=canonical(torch.zeros(E, 2 * I, dtype=F64)), blocks=mxfp4.pack(codes1), scales=scales1)
    mlp2 = random_experts(g, E, D, I, 1 / math.sqrt(I), bias_scale=0.0)
    x = torch.zeros(T, D, dtype=F64)
    x[torch.arange(T), torch.arange(T)] = 1.0
    return _run_experts(ctx, x, weights, idx, mlp1, mlp2, 1.702, 64.0, exact_hidden=True)


def run_native_footprint(ctx: Ctx, p: dict) -> Outcome:
    """``mxfp4="native"`` says the experts stay 4-bit: the tensors reachable from what ``prepare_experts``
    returns (and, on CUDA, the memory it allocates) must stay within twice the packed bytes plus the
    biases; bfloat16 copies of the weights take 3.8x the packed bytes."""
    g = generator(p["seed"])
    E, D, I = p["E"], p["D"], p["I"]
    mlp1 = random_experts_packed(g, E, 2 * I, D, 2 / math.sqrt(D))
    mlp2 = random_experts_packed(g, E, D, I, 1 / math.sqrt(I))
    packed = sum(t.nbytes for e in (mlp1, mlp2) for t in (e.blocks, e.scales))
    limit = 2 * packed + 4 * E * (2 * I + D) * 4
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(ctx.device)
        before = torch.cuda.memory_allocated(ctx.device)
    prepared = ctx.call("experts", ctx.engine.prepare_experts, mlp1, mlp2, ctx.dtype, ctx.device)
    held = _tensor_bytes(prepared)
    if cuda:
        torch.cuda.synchronize(ctx.device)
        held = max(held, torch.cuda.memory_allocated(ctx.device) - before)
    o = Outcome("experts", float(held), float(limit), held / limit, where="prepared experts (bytes)",
                metrics=dict(packed_bytes=packed, bf16_bytes=2 * E * 3 * I * D, prepared_bytes=held))
    if o.ratio > 1:
        o.message = (f"claims mxfp4='native' but the prepared experts hold {held} bytes, {held / packed:.2f}x "
                     f"the {packed} packed MXFP4 bytes (bfloat16 copies would be {2 * E * 3 * I * D})")
    return o


def _tensor_bytes(obj, seen: set | None = None, depth: int = 0) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` through attributes and containers."""
    seen = set() if seen is None else seen
    if depth > 8 or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        st_ = obj.untyped_storage()
        key = ("storage", obj.device, st_.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return st_.nbytes()
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif isinstance(obj, (str, bytes, int, float, bool, type(None), torch.dtype, torch.device)):
        return 0
    else:
        items = list(getattr(obj, "__dict__", {}).values())
        items += [getattr(obj, n) for n in getattr(type(obj), "__slots__", ()) if hasattr(obj, n)]
    return sum(_tensor_bytes(i, seen, depth + 1) for i in items)


# ---- the grid ------------------------------------------------------------------------------------

def _d(**kw):
    return st.fixed_dictionaries({**kw, "seed": SEEDS})


def _attention_seq_strategy(max_past: int, max_new: int, max_seqs: int):
    seq = st.tuples(st.integers(0, max_past), st.integers(1, max_new))
    return st.lists(seq, min_size=1, max_size=max_seqs)


def _mixed_contexts(seed: int, S: int, most: int) -> list[tuple[int, int]]:
    """S decode sequences (one new token each) with cached lengths spread over [0, most - 1]."""
    g = generator(seed)
    past = torch.randint(0, max(most, 1), (S,), generator=g).tolist()
    past[0] = most - 1  # the longest allowed
    if S > 1:
        past[1] = 0  # a first token
    return [(n, 1) for n in past]


def cases(dtype: str, lim: Limits | tuple[int, ...], profile: Profile) -> list[Case]:
    """The level-1 grid for one dtype, drawn inside ``lim`` (an engine's :class:`Limits`; a tuple of head
    dims stands for an engine that claims everything else)."""
    if not isinstance(lim, Limits):
        from mxmoe.core.backend import Capabilities

        lim = Limits.of(Capabilities(head_dims=tuple(lim), max_experts=None))
    dt_req = (f"dtype:{dtype}",)
    W = GPT_OSS.sliding_window  # 128
    out: list[Case] = []

    def add(op, name, run, strategy, examples=(), requires=(), description="", exact=False, real_shape=False,
            max_examples=None):
        # A fused op (add_rms_norm) is claimed with the op it belongs to.
        out.append(Case("L1", op, name, run, strategy, tuple(examples),
                        (f"op:{FUSED_OPS.get(op, op)}",) + dt_req + tuple(requires),
                        dtype, description, exact, max_examples, real_shape))

    add("embedding", "gather", run_embedding,
        lambda pr: _d(V=st.integers(2, 4096), D=st.sampled_from([32, 64, 2880]), T=st.integers(2, 64)),
        [dict(V=201088, D=64, T=16, seed=0)], exact=True, description="embedding lookup is a bit-exact gather")
    add("rms_norm", "random", run_rms_norm,
        lambda pr: _d(T=st.integers(1, 32), D=st.sampled_from([32, 64, 2880])),
        [dict(T=4, D=2880, seed=0), dict(T=64, D=2880, seed=1)],
        description="rows from 1e-3 to 1e3 in magnitude; float32 inside, rounded once: within half an ulp")
    add("add_rms_norm", "random", run_add_rms_norm,
        lambda pr: _d(T=st.integers(1, 64), D=st.sampled_from([32, 64, 2880]),
                      delta=st.sampled_from(["small", "same", "large", "cancel"])),
        [dict(T=1, D=2880, delta="large", seed=0), dict(T=64, D=2880, delta="same", seed=1),
         dict(T=5, D=64, delta="cancel", seed=2), dict(T=3, D=32, delta="small", seed=3)],
        description="residual add + RMSNorm (fused; the default composes them): s = x + delta bit-exact (one "
                    "rounding), h = rms_norm(s) within half an ulp; deltas from 2^-10 to 2^10 of x's rows and "
                    "cancelling ones; decode (T = 1) and T = 64 at D = 2880")

    # RoPE positions stay below the claimed context (an engine may tabulate cos/sin up to it).
    pos = lim.contexts(64, 4096, lim.max_context)
    for d in lim.head_dims:
        add("rope", f"yarn_d{d}", run_rope,
            lambda pr, d=d: _d(T=st.integers(1, 64), Hq=st.sampled_from([2, 8, 64]), Hkv=st.sampled_from([1, 2, 8]),
                               d=st.just(d), max_pos=st.sampled_from(pos)).filter(lambda p: p["Hq"] >= p["Hkv"]),
            [dict(T=16, Hq=8, Hkv=2, d=d, max_pos=pos[-1], seed=0),
             dict(T=1, Hq=64, Hkv=8, d=d, max_pos=min(8192, pos[-1]), seed=1)],  # one token: the decode path
            requires=[f"head_dim:{d}", f"context:{pos[-1]}"],
            description=f"YaRN frequencies and concentration, halves (not interleaved), positions up to {pos[-1]}")
    if lim.outside_head_dim:
        d = lim.outside_head_dim
        add("rope", f"refuses_head_dim_{d}", run_rope, None, [dict(T=4, Hq=8, Hkv=2, d=d, max_pos=64, seed=0)],
            requires=[f"head_dim:{d}"], description=f"head_dim {d} is not claimed: must raise NotSupported")

    add("linear", "random", run_linear,
        lambda pr: _d(T=st.integers(1, 16), K=st.sampled_from([33, 64, 100, 2880]),
                      N=st.sampled_from([1, 32, 128, 129, 1000]), bias=st.booleans()),
        [dict(T=4, K=2880, N=64, bias=True, seed=0)])
    add("linear", "odd_tails", run_linear, None,
        [dict(T=5, K=100, N=1000, bias=True, seed=0), dict(T=3, K=2880, N=5120, bias=True, seed=1),  # QKV
         dict(T=2, K=4096, N=2880, bias=True, seed=2), dict(T=7, K=2881, N=257, bias=False, seed=3),
         dict(T=1, K=33, N=1, bias=True, seed=4)],
        description="widths that are not multiples of a kernel tile: N 1000, 257, 1; K 100, 2881; gpt-oss's QKV "
                    "(5120 x 2880) and output (2880 x 4096) layers")
    add("linear", "long_reduction", run_linear,
        lambda pr: _d(T=st.just(8), K=st.just(pr.big_k), N=st.just(64), bias=st.just(False)),
        [dict(T=8, K=profile.big_k, N=64, bias=False, seed=1)],
        description="K in the thousands: fp32 accumulation is required, bf16 accumulation is caught")
    add("linear", "unembedding", run_linear, None,
        [dict(T=3, K=2880, N=201088, bias=False, chunked=True, seed=0)], real_shape=True,
        description="the unembedding at gpt-oss's true vocabulary (201088 x 2880, N not a multiple of 256)")

    hkv_pairs = [(2, 1), (8, 1), (8, 2), (16, 8), (64, 8)]
    heads = st.sampled_from(hkv_pairs)
    win_req = ["sliding_window"]
    for d in lim.head_dims:
        hd = (f"head_dim:{d}",)
        base = dict(d=d, q_scale=1.0, sink_scale=1.0, window=0)

        def att(name, examples, strategy, requires=(), description="", real_shape=False, context=None):
            ctx_req = (f"context:{context}",) if context else ()
            add("attention", f"{name}_d{d}", run_attention, strategy, examples,
                hd + ("sinks",) + ctx_req + tuple(requires), description, real_shape=real_shape)

        def sdraw(d, seqs, q_scale=st.just(1.0), sink_scale=st.just(1.0), window=st.just(0), **kw):
            return _d(d=st.just(d), hk=heads, seqs=seqs, q_scale=q_scale, sink_scale=sink_scale, window=window,
                      **kw).map(lambda p: {**{k: v for k, v in p.items() if k != "hk"}, "Hq": p["hk"][0],
                                           "Hkv": p["hk"][1]})

        att("prefill", [dict(base, Hq=8, Hkv=1, seqs=[(0, 37)], seed=0), dict(base, Hq=4, Hkv=4, seqs=[(0, 1)], seed=1),
                        dict(base, Hq=64, Hkv=8, seqs=[(0, 45), (0, 19)], seed=2),  # gpt-oss's heads, groups of 8
                        dict(base, Hq=16, Hkv=8, seqs=[(0, 33)], seed=3)],
            lambda pr, d=d: sdraw(d, _attention_seq_strategy(0, 48, 3), q_scale=st.sampled_from([0.5, 1.0, 3.0]),
                                  sink_scale=st.sampled_from([0.0, 1.0, 4.0])),
            description="causal GQA prefill with sinks, no window, up to gpt-oss's 64/8 heads; KV length 1")
        att("decode", [dict(base, Hq=8, Hkv=2, seqs=[(1, 1), (0, 1), (40, 1)], seed=0),
                       dict(base, Hq=8, Hkv=8, seqs=_mixed_contexts(5, 20, 64), seed=1)],  # 20 sequences
            lambda pr, d=d: sdraw(d, _attention_seq_strategy(64, 1, 24), q_scale=st.sampled_from([0.5, 1.0, 3.0]),
                                  sink_scale=st.sampled_from([0.0, 1.0])),
            description="one new token per sequence over cached keys, batches of up to 24 sequences (KV lengths 0 "
                        "and 1 cached included)")
        most = min(2048, lim.max_context)
        att("decode_batch", [dict(base, Hq=64, Hkv=8, seqs=_mixed_contexts(7, 64, most), seed=0),
                             dict(base, Hq=64, Hkv=8, seqs=_mixed_contexts(8, 33, min(600, most)), seed=1),
                             dict(base, Hq=64, Hkv=8, seqs=_mixed_contexts(9, 1, most), seed=2)],
            None, real_shape=True, context=most,
            description=f"decode batches of 64, 33 and 1 sequences at gpt-oss's 64/8 heads, mixed contexts up to {most}")
        att("decode_batch_windowed", [dict(base, window=W, Hq=64, Hkv=8, seqs=_mixed_contexts(10, 64, most), seed=0)],
            None, requires=win_req, real_shape=True, context=most,
            description="a decode batch of 64 sequences with gpt-oss's 128-token window")
        att("chunked_prefill", [dict(base, Hq=8, Hkv=2, seqs=[(20, 7), (3, 12)], seed=0)],
            lambda pr, d=d: sdraw(d, _attention_seq_strategy(40, 16, 3)),
            description="several new tokens on top of cached ones, varlen batch")
        att("chunked_prefill_windowed", [dict(base, window=8, Hq=8, Hkv=2, seqs=[(20, 7), (3, 12)], seed=0)],
            lambda pr, d=d: sdraw(d, _attention_seq_strategy(40, 16, 3), window=st.just(8)), requires=win_req,
            description="chunked prefill with a window of 8")
        LS = min(16384, lim.max_context)
        att("long_sum", [dict(base, Hq=8, Hkv=1, seqs=[(LS - 1, 1), (LS // 8, 1)], v_const=True, seed=0)],
            None, context=LS,
            description=f"every key the same value vector, up to {LS} keys: the output is the softmax normaliser's "
                        "alone (summed in bf16 it is caught)")
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
            lambda pr, d=d: sdraw(d, st.lists(st.tuples(st.integers(W - 3, W + 3), st.integers(1, 4)), min_size=1,
                                              max_size=3), q_scale=st.sampled_from([1.0, 3.0]), window=st.just(W)),
            requires=win_req, description="window 128 exactly at and across the boundary, prefill and decode")
        att("window_small", [dict(base, window=4, Hq=4, Hkv=2, seqs=[(0, 9), (6, 3)], seed=0)],
            lambda pr, d=d: _d(d=st.just(d), Hq=st.just(4), Hkv=st.sampled_from([1, 2]),
                               seqs=_attention_seq_strategy(12, 10, 3), q_scale=st.just(1.0), sink_scale=st.just(1.0),
                               window=st.integers(1, 6)),
            requires=win_req, description="windows of 1..6 tokens, including window 1 (self only)")
        L = min(profile.long_context, lim.max_context)
        for windowed in (False, True):
            sfx, w = ("_windowed", W) if windowed else ("", 0)
            att(f"long_context{sfx}", [dict(base, window=w, Hq=8, Hkv=2, seqs=[(L - 1, 1), (L - 33, 32)], seed=0)],
                lambda pr, d=d, w=w, L=L: sdraw(d, st.lists(st.tuples(st.integers(L // 2, L - 8), st.integers(1, 8)),
                                                            min_size=1, max_size=2), window=st.just(w)),
                requires=win_req if windowed else (), context=L,
                description=f"contexts of up to {L} keys" + (", windowed" if windowed else ""))
        # Long decode: one query row over thousands of keys (split-KV / long-context kernels), past gpt-oss's
        # initial_context_length (4096), GQA with several KV heads. One query row keeps the oracle cheap. The
        # longest claimed context runs here when it is at most 32768; beyond, in the real-shape case.
        LD = lim.contexts(*profile.long_decode, *([lim.max_context] if lim.max_context <= 32768 else []))
        LD = LD or [lim.max_context]
        for windowed in (False, True):
            sfx, w = ("_windowed", W) if windowed else ("", 0)
            ld = []
            for i, n in enumerate(LD):
                ld.append(dict(base, window=w, Hq=8, Hkv=2, seqs=[(n - 1, 1), (n // 2, 1)], seed=10 + i))
                if i == 0 and not windowed:  # gpt-oss's heads
                    ld.append(dict(base, window=w, Hq=64, Hkv=8, seqs=[(n - 1, 1)], seed=20 + i))
            att(f"long_decode{sfx}", ld, None, requires=win_req if windowed else (), context=max(LD),
                description=f"one new token over {', '.join(map(str, LD))} cached keys, GQA"
                            + (", windowed" if windowed else ""))
        # Past 32768 keys (16-bit index arithmetic breaks there), up to the claimed maximum (gpt-oss: 131072).
        LR = lim.contexts(32768 + 300, lim.max_context)
        if LR and LR[-1] > 32768:
            LR = [n for n in LR if n > 32768]
            for windowed in (False, True):
                sfx, w = ("_windowed", W) if windowed else ("", 0)
                att(f"long_decode_real{sfx}",
                    [dict(base, window=w, Hq=8, Hkv=1, seqs=[(n - 1, 1)], seed=30 + i) for i, n in enumerate(LR)],
                    None, requires=win_req if windowed else (), context=max(LR), real_shape=True,
                    description=f"one new token over {', '.join(map(str, LR))} cached keys (past 32k, up to the "
                                "claimed maximum), 8 query heads on one KV head" + (", windowed" if windowed else ""))
        if lim.outside_context:
            n = lim.outside_context
            add("attention", f"refuses_context_{n}_d{d}", run_attention, None,
                [dict(base, Hq=8, Hkv=1, seqs=[(n - 1, 1)], slack=0, seed=0)], requires=hd + (f"context:{n}",),
                description=f"a context of {n} keys is not claimed: must raise NotSupported")
    if lim.outside_head_dim:
        d = lim.outside_head_dim
        add("attention", f"refuses_head_dim_{d}", run_attention, None,
            [dict(d=d, q_scale=1.0, sink_scale=1.0, window=0, Hq=8, Hkv=2, seqs=[(0, 5)], seed=0)],
            requires=[f"head_dim:{d}"], description=f"head_dim {d} is not claimed: must raise NotSupported")

    E_all = lim.experts(4, 8, 32, 128)
    k_all = lim.top_k(1, 2, 3, 4)
    Emax, kmax = max(E_all), max(k_all)
    kE = min(4, lim.max_top_k, lim.max_experts)  # k equal to the number of experts
    route_req = [f"experts:{Emax}", f"experts_per_token:{kmax}"]
    add("router", "random", run_router,
        lambda pr: _d(T=st.integers(1, 32), D=st.sampled_from([64, 2880]), E=st.sampled_from(E_all),
                      k=st.sampled_from(k_all)).filter(lambda p: p["k"] <= p["E"]),
        [dict(T=16, D=2880, E=max(lim.experts(4, 32)), k=kmax, seed=0), dict(T=8, D=64, E=Emax, k=kmax, seed=1)],
        requires=route_req,
        description=f"top-k then softmax over the chosen k, up to {Emax} experts; near-ties within the logit bound "
                    "may go either way")
    add("router", "ties", run_router,
        lambda pr: _d(T=st.integers(1, 16), D=st.sampled_from([8, 32]), E=st.sampled_from(lim.experts(4, 8, 32)),
                      k=st.sampled_from(k_all), ties=st.just(True)).filter(lambda p: p["k"] <= p["E"]),
        [dict(T=16, D=8, E=max(lim.experts(4, 8)), k=min(3, kmax), ties=True, seed=0)], requires=route_req,
        exact=True, description="exactly tied logits: lower expert index first")
    add("router", "topk_eq_experts", run_router,
        lambda pr: _d(T=st.integers(1, 8), D=st.just(64), E=st.just(kE), k=st.just(kE)),
        [dict(T=4, D=64, E=kE, k=kE, seed=0)], requires=[f"experts:{kE}", f"experts_per_token:{kE}"],
        description="k equal to the number of experts")
    if lim.outside_experts:
        n = lim.outside_experts
        add("router", f"refuses_experts_{n}", run_router, None, [dict(T=4, D=64, E=n, k=min(2, kmax), seed=0)],
            requires=[f"experts:{n}"], description=f"{n} experts are not claimed: must raise NotSupported")
    if lim.outside_top_k:
        n = lim.outside_top_k
        add("router", f"refuses_top{n}", run_router, None, [dict(T=4, D=64, E=max(n, 8), k=n, seed=0)],
            requires=[f"experts_per_token:{n}"], description=f"top-{n} routing is not claimed: must raise NotSupported")

    fmt_req = {"mxfp4": ("mxfp4",), "dense": ("dense_experts",)}
    moe_fmt = lim.expert_format  # the format of the cases that test something else than the format
    base_e = dict(w_scale=1.0, x_scale=1.0, routing="random")
    for fmt in ("mxfp4", "dense"):
        ex = dict(base_e, T=12, D=64, I=64, E=max(lim.experts(4, 8)), k=min(2, kmax), format=fmt, seed=0)
        add("experts", f"random_{fmt}", run_experts,
            lambda pr, fmt=fmt: _d(T=st.integers(1, 24), D=st.sampled_from([64, 96, 128, 160]),
                                   I=st.sampled_from([32, 64, 96, 160]), E=st.sampled_from(E_all),
                                   k=st.sampled_from(lim.top_k(1, 2, 4)), format=st.just(fmt),
                                   w_scale=st.sampled_from([0.5, 1.0, 2.0]), x_scale=st.just(1.0),
                                   routing=st.just("random")).filter(lambda p: p["k"] <= p["E"]),
            [ex, dict(ex, T=2, E=max(lim.experts(4, 32)), k=kmax, seed=1), dict(ex, bias_scale=1.0, seed=2),
             dict(ex, T=20, D=96, I=160, E=Emax, k=kmax, seed=3)],  # widths off the power-of-two tiles
            requires=fmt_req[fmt] + tuple(route_req),
            description=f"MoE layer, up to {Emax} experts, D and I of 96/160; includes experts that receive no "
                        "tokens (E > T·k)")
    for target in ("mlp1", "mlp2"):
        add("experts", f"long_reduction_{target}", run_experts_reduction,
            lambda pr, target=target: _d(target=st.just(target), K=st.just(pr.big_k)),
            [dict(target=target, K=profile.big_k, seed=0)], requires=("mxfp4", "experts:2"), real_shape=True,
            description=f"{target}'s reduction over K = {profile.big_k} with every other step exact: fp32 "
                        "accumulation is required, bf16 accumulation is caught")
    add("experts", "real_width", run_experts, None,
        [dict(base_e, T=4, D=2880, I=2880, E=2, k=min(2, kmax), format="mxfp4", packed=True, seed=0)],
        requires=("mxfp4", "experts:2", f"experts_per_token:{min(2, kmax)}"), real_shape=True,
        description="gpt-oss's widths D = I = 2880 (K tails of 64 past a 128 tile; mlp1 N = 5760), few experts")
    add("experts", "swiglu_clamp", run_experts,
        lambda pr: _d(T=st.integers(1, 16), D=st.just(64), I=st.just(64), E=st.just(max(lim.experts(2, 4))),
                      k=st.just(min(2, kmax)), format=st.just(moe_fmt), w_scale=st.sampled_from([8.0, 16.0]),
                      x_scale=st.sampled_from([2.0, 4.0]), routing=st.just("random")),
        [dict(T=8, D=64, I=64, E=max(lim.experts(2, 4)), k=min(2, kmax), format=moe_fmt, w_scale=16.0, x_scale=4.0,
              routing="random", seed=0)],
        requires=fmt_req[moe_fmt], description="activations far beyond ±7: the gate and linear clamps matter")
    add("experts", "swiglu_negative_gate", run_experts,
        lambda pr: _d(T=st.integers(1, 16), D=st.just(64), I=st.just(64), E=st.just(max(lim.experts(2, 4))),
                      k=st.just(min(2, kmax)), format=st.just(moe_fmt), w_scale=st.sampled_from([1.0, 2.0]),
                      x_scale=st.just(1.0), routing=st.just("random"), gate_shift=st.sampled_from([-12.0, -16.0])),
        [dict(T=12, D=64, I=64, E=max(lim.experts(2, 4)), k=min(2, kmax), format=moe_fmt, w_scale=2.0, x_scale=1.0,
              routing="random", gate_shift=-16.0, seed=0)],
        requires=fmt_req[moe_fmt],
        description="every gate far below -7, mlp2 bias 0: the gate is clamped above only (a clamp below as well "
                    "is off by ~5e-5 on outputs of ~1e-11)")
    add("experts", "one_expert", run_experts,
        lambda pr: _d(T=st.integers(1, 32), D=st.just(64), I=st.just(64), E=st.just(max(lim.experts(8))),
                      k=st.sampled_from(lim.top_k(1, 2)), format=st.just(moe_fmt), w_scale=st.just(1.0),
                      x_scale=st.just(1.0), routing=st.just("one_expert")),
        [dict(T=32, D=64, I=64, E=max(lim.experts(8)), k=1, format=moe_fmt, w_scale=1.0, x_scale=1.0,
              routing="one_expert", seed=0),
         dict(T=300, D=64, I=64, E=Emax, k=kmax, format=moe_fmt, w_scale=1.0, x_scale=1.0, routing="one_expert",
              seed=1)],  # a 300-token prompt on one expert: more than one token tile
        requires=fmt_req[moe_fmt] + tuple(route_req),
        description=f"every token routed to the same expert, up to 300 tokens ({Emax} experts)")
    add("experts", "topk_eq_experts", run_experts,
        lambda pr: _d(T=st.integers(1, 8), D=st.just(64), I=st.just(32), E=st.just(kE), k=st.just(kE),
                      format=st.just(moe_fmt), w_scale=st.just(1.0), x_scale=st.just(1.0), routing=st.just("random")),
        [dict(T=4, D=64, I=32, E=kE, k=kE, format=moe_fmt, w_scale=1.0, x_scale=1.0, routing="random", seed=0)],
        requires=fmt_req[moe_fmt] + (f"experts:{kE}", f"experts_per_token:{kE}"),
        description="k equal to the number of experts")
    if lim.outside_experts:
        n = lim.outside_experts
        add("experts", f"refuses_experts_{n}", run_experts, None,
            [dict(base_e, T=4, D=64, I=32, E=n, k=min(2, kmax), format=moe_fmt, seed=0)],
            requires=fmt_req[moe_fmt] + (f"experts:{n}",),
            description=f"{n} experts are not claimed: must raise NotSupported")
    if lim.outside_top_k:
        n = lim.outside_top_k
        add("experts", f"refuses_top{n}", run_experts, None,
            [dict(base_e, T=4, D=64, I=32, E=max(n, 8), k=n, format=moe_fmt, seed=0)],
            requires=fmt_req[moe_fmt] + (f"experts_per_token:{n}",),
            description=f"top-{n} routing is not claimed: must raise NotSupported")
    E4 = max(lim.experts(4))
    add("experts", "e8m0_nan", run_experts,
        lambda pr: _d(T=st.integers(4, 16), D=st.just(64), I=st.just(64), E=st.just(E4), k=st.just(min(2, kmax)),
                      format=st.just("mxfp4"), w_scale=st.just(1.0), x_scale=st.just(1.0), routing=st.just("random"),
                      nan_scales=st.just(True)),
        [dict(T=16, D=64, I=64, E=E4, k=min(2, kmax), format="mxfp4", w_scale=1.0, x_scale=1.0, routing="random",
              nan_scales=True, seed=0)],
        requires=["mxfp4", f"experts:{E4}"],
        description="E8M0 scale 0xFF is NaN: exactly the outputs that use the block are NaN")
    E8 = max(lim.experts(8))
    add("experts", "mxfp4_native_footprint", run_native_footprint, None, [dict(E=E8, D=512, I=512, seed=0)],
        requires=["mxfp4", "mxfp4:native", f"experts:{E8}"],
        description="mxfp4='native': the prepared experts stay about the packed size (not widened to bf16)")

    # Bit-exact dequantization: the scale range keeps every intermediate exact in the dtype.
    wide = dtype != "float16"
    for target in ("mlp1", "mlp2"):
        rng = (122, 130) if target == "mlp1" else ((127 - 40, 127 + 40) if wide else (127 - 10, 127 + 5))
        add("experts", f"mxfp4_dequant_{target}", run_mxfp4_exact,
            lambda pr, target=target, rng=rng: _d(target=st.just(target), scale_range=st.just(rng)),
            [dict(target=target, scale_range=rng, seed=0)], requires=["mxfp4", "experts:2"], exact=True,
            description="bit-exact MXFP4 dequantization: every nibble, low nibble first, E8M0 bias 127")
    if wide:
        for name, rng in (("low", (2, 14)), ("high", (240, 252))):
            add("experts", f"mxfp4_scale_extremes_{name}", run_mxfp4_exact,
                lambda pr, rng=rng: _d(target=st.just("mlp2"), scale_range=st.just(rng)),
                [dict(target="mlp2", scale_range=rng, seed=0)], requires=["mxfp4", "experts:2"], exact=True,
                description="E8M0 scales near the ends of the range (down to 2^-125, up to overflow to inf)")
        add("experts", "mxfp4_e8m0_every_byte", run_mxfp4_exact,
            lambda pr: _d(target=st.just("mlp2"), scale_range=st.just("all")),
            [dict(target="mlp2", scale_range="all", seed=0)], requires=["mxfp4", "experts:2"], exact=True,
            description="every E8M0 byte 0..255 in one layer: 0 and 1 (subnormal values), 253, 254, 255 = NaN")
    return out
