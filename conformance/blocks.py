"""Level 2: the attention block and the MoE block (the model's own sequence of ops, one layer) against
the float64 oracle. Bounds per output row from simulated honest engines (tolerances.NoisyOracle),
as at level 3.

Shape legend: T tokens, D hidden, Hq/Hkv heads, d head_dim.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from mxmoe.core.batch import Batch, KVCache
from mxmoe.core.rope import yarn_inv_freq

from . import tolerances as tol
from .case import Case, Ctx, Outcome, Profile
from .inputs import F64, SEEDS, generator, randn, random_model, rounded
from .model import tiny_config
from .ops import batch_to


def _attention_block(be, cfg, w, x, batch, cache: KVCache, window, dtype, device):
    """x (T, D) → x + attention(x), exactly as core/model.py runs it."""
    small = torch.promote_types(dtype, torch.float32)
    T = x.shape[0]
    Hq, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv_l = be.prepare_linear(w.qkv_weight, w.qkv_bias, dtype, device)
    out_l = be.prepare_linear(w.out_weight, w.out_bias, dtype, device)
    inv_freq, conc = yarn_inv_freq(cfg, small)
    h = be.rms_norm(x, w.norm_scale.to(device, small), cfg.rms_norm_eps)
    qkv = be.linear(h, qkv_l)
    q = qkv[:, :cfg.q_dim].reshape(T, Hq, d)
    k = qkv[:, cfg.q_dim:cfg.q_dim + cfg.kv_dim].reshape(T, Hkv, d)
    v = qkv[:, cfg.q_dim + cfg.kv_dim:].reshape(T, Hkv, d)
    q, k = be.rope(q, k, batch.positions, inv_freq.to(device), conc)
    kc, vc = cache.layer(0)
    o = be.attention(q, k, v, w.sinks.to(device, small), kc, vc, batch, window, 1 / math.sqrt(d))
    return x + be.linear(o.reshape(T, Hq * d), out_l)


def _moe_block(be, cfg, w, x, dtype, device):
    small = torch.promote_types(dtype, torch.float32)
    gate = be.prepare_linear(w.gate_weight, w.gate_bias, dtype, device)
    experts = be.prepare_experts(w.mlp1, w.mlp2, dtype, device)
    h = be.rms_norm(x, w.norm_scale.to(device, small), cfg.rms_norm_eps)
    weights, indices = be.router(h, gate, cfg.experts_per_token)
    return x + be.experts(h, weights, indices, experts, cfg.swiglu_alpha, cfg.swiglu_limit)


def _run(ctx: Ctx, p: dict, which: str) -> Outcome:
    g = generator(p["seed"])
    cfg = tiny_config(num_hidden_layers=1, sliding_window=p.get("window", 8), num_experts=p.get("E", 8),
                      experts_per_token=p.get("k", 2))
    weights = random_model(cfg, p["seed"], expert_bias_scale=p.get("bias_scale", 0.1)).blocks[0]
    past, new = p["past"], p["new"]
    S = len(new)
    rows = list(range(S))[::-1]
    cache_len = max(a + b for a, b in zip(past, new)) + 2
    batch = Batch.build(new, past, rows, cache_len)
    T = batch.num_tokens
    x = rounded(randn(g, T, cfg.hidden_size), ctx.dtype)
    window = cfg.sliding_window if p.get("windowed", True) else 0

    def cache(dtype, device):
        c = KVCache.allocate(1, S, cache_len, cfg.num_key_value_heads, cfg.head_dim, F64, "cpu")
        gk = generator(p["seed"] + 1)
        for r, n in zip(rows, past):
            c.k[0, r, :n] = rounded(randn(gk, n, cfg.num_key_value_heads, cfg.head_dim), ctx.dtype)
            c.v[0, r, :n] = rounded(randn(gk, n, cfg.num_key_value_heads, cfg.head_dim), ctx.dtype)
        return KVCache(c.k.to(device, dtype), c.v.to(device, dtype))

    def run(be, dtype, device):
        xin = x.to(device, dtype)
        if which == "attention":
            return _attention_block(be, cfg, weights.attn, xin, batch_to(batch, device), cache(dtype, device),
                                    window, dtype, device)
        return _moe_block(be, cfg, weights.mlp, xin, dtype, device)

    with tol.RoutingRecorder(ctx.engine) as rec:
        out = ctx.call(f"{which} block", run, ctx.engine, ctx.dtype, ctx.device)
    ctx.check_tensor(f"{which} block", out, (T, cfg.hidden_size))
    # Routing held fixed: the oracle uses the engine's experts (an honest engine may resolve a near-tie
    # either way), checked to be a top-k within the router-logit bound; see tolerances.py.
    forced = tol.valid_routing(rec.calls, cfg.num_experts) if which == "moe" else None
    oracle = tol.routed_oracle(forced)
    ref, bound, rbound = tol.composed_bound(lambda be: run(be, F64, torch.device("cpu")), oracle, ctx.dtype,
                                            p["seed"], cfg.hidden_size)
    problem, flips = tol.routing_check(oracle, rbound)
    c = tol.compare(out, ref, bound[:, None])
    o = Outcome(f"{which} block", c["observed"], c["bound"], c["ratio"], where=f"(token, channel){c['index']}",
                metrics={"max_abs_err": c["max_abs_err"], **({"routing_near_ties": flips} if which == "moe" else {})})
    if problem:
        o.message = problem
    elif o.ratio > 1:
        o.message = (f"error {o.observed:.3g} exceeds the bound {o.bound:.3g} (x{o.ratio:.3g}) at {o.where}"
                     + (f" ({c['note']})" if c["note"] else "") + "; run level L1 to find the op")
    return o


def run_attention_block(ctx: Ctx, p: dict) -> Outcome:
    return _run(ctx, p, "attention")


def run_moe_block(ctx: Ctx, p: dict) -> Outcome:
    return _run(ctx, p, "moe")


def _d(**kw):
    return st.fixed_dictionaries({**kw, "seed": SEEDS})


def cases(dtype: str, profile: Profile) -> list[Case]:
    dt = (f"dtype:{dtype}",)
    att_req = ("op:rms_norm", "op:linear", "op:rope", "op:attention", "sinks", "sliding_window") + dt
    moe_req = ("op:rms_norm", "op:router", "op:experts", "mxfp4") + dt
    lens = st.lists(st.tuples(st.integers(0, 20), st.integers(1, 12)), min_size=1, max_size=3)
    return [
        Case("L2", "block", "attention", run_attention_block,
             lambda pr: _d(seqs=lens, windowed=st.booleans()).map(
                 lambda p: {**p, "past": [a for a, _ in p["seqs"]], "new": [b for _, b in p["seqs"]]}),
             (dict(past=[0, 9, 3], new=[13, 1, 6], windowed=True, seed=0),
              dict(past=[0], new=[20], windowed=False, seed=1),
              dict(past=[13], new=[1], windowed=True, seed=2)),  # one decode token (the single-token path)
             att_req, dtype, "norm → qkv → RoPE → attention (window 8 / none, sinks, GQA, varlen) → out → residual",
             max_examples=3),
        Case("L2", "block", "moe", run_moe_block,
             lambda pr: _d(new=st.lists(st.integers(1, 24), min_size=1, max_size=2), E=st.sampled_from([4, 8]),
                           k=st.sampled_from([1, 2, 4])).map(lambda p: {**p, "past": [0] * len(p["new"])}),
             (dict(past=[0, 0], new=[16, 5], E=8, k=2, seed=0), dict(past=[0], new=[6], E=4, k=4, seed=1),
              dict(past=[0], new=[12], E=8, k=2, bias_scale=1.0, seed=2)),  # O(1) expert biases
             moe_req, dtype, "norm → router top-k → MXFP4 experts (SwiGLU) → residual", max_examples=3),
    ]
