"""Level 2: the attention block and the MoE block (the model's own sequence of ops, one layer) against
the float64 oracle. Bounds per output row from simulated honest engines (tolerances.NoisyOracle),
as at level 3.

Small cases use the tiny config (head dim, expert count and top-k inside the engine's claims); the
real-shape cases run one layer of gpt-oss-20b and gpt-oss-120b at their true sizes (D 2880, 64/8 heads
× 64, 32 / 128 experts, top-4, I 2880) on prompts of hundreds of tokens.

An engine that claims only some of a block's ops runs next to the companion (the reference engine, in
the same dtype on the same device), which serves the others (case.serving, case.ops_for).

Shape legend: T tokens, D hidden, Hq/Hkv heads, d head_dim.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from hypothesis import strategies as st

from mxmoe.core.backend import OPS, Backend, Experts, fused_op
from mxmoe.core.batch import Batch, KVCache
from mxmoe.core.config import preset
from mxmoe.core.rope import yarn_inv_freq
from mxmoe.core.weights import ExpertLinear

from . import tolerances as tol
from .case import Case, Ctx, Limits, Outcome, Profile, ops_for
from .inputs import (F64, SEEDS, CachedExperts, generator, randn, random_model, real_attention_weights,
                     real_mlp_weights, rounded)
from .model import tiny_config
from .ops import batch_to


def _attention_block(ops: dict[str, Backend], cfg, w, x, batch, cache: KVCache, window, dtype, device):
    """x (T, D) → x + attention(x), exactly as core/model.py runs it; ``ops[name]`` serves op ``name``."""
    small = torch.promote_types(dtype, torch.float32)
    T = x.shape[0]
    Hq, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    lin = ops["linear"]
    qkv_l = lin.prepare_linear(w.qkv_weight, w.qkv_bias, dtype, device)
    out_l = lin.prepare_linear(w.out_weight, w.out_bias, dtype, device)
    inv_freq, conc = yarn_inv_freq(cfg, small)
    h = ops["rms_norm"].rms_norm(x, w.norm_scale.to(device, small), cfg.rms_norm_eps)
    qkv = lin.linear(h, qkv_l)
    q = qkv[:, :cfg.q_dim].reshape(T, Hq, d)
    k = qkv[:, cfg.q_dim:cfg.q_dim + cfg.kv_dim].reshape(T, Hkv, d)
    v = qkv[:, cfg.q_dim + cfg.kv_dim:].reshape(T, Hkv, d)
    kc, vc = cache.layer(0)
    # RoPE + attention as the graph calls them: fused where one backend serves both, else op by op.
    o = fused_op(ops, "rope_attention")(q, k, v, batch.positions, inv_freq.to(device), conc,
                                        w.sinks.to(device, small), kc, vc, batch, window, 1 / math.sqrt(d))
    return x + lin.linear(o.reshape(T, Hq * d), out_l)


def _moe_block(ops: dict[str, Backend], cfg, w, x, dtype, device, experts=None):
    """x (T, D) → x + moe(x), as core/model.py runs it (the gate prepared by the router's backend).
    ``experts``: already prepared (the float64 runs share one cache of dequantized experts)."""
    small = torch.promote_types(dtype, torch.float32)
    gate = ops["router"].prepare_linear(w.gate_weight, w.gate_bias, dtype, device)
    if experts is None:
        experts = ops["experts"].prepare_experts(w.mlp1, w.mlp2, dtype, device)
    h = ops["rms_norm"].rms_norm(x, w.norm_scale.to(device, small), cfg.rms_norm_eps)
    weights, indices = ops["router"].router(h, gate, cfg.experts_per_token)
    return x + ops["experts"].experts(h, weights, indices, experts, cfg.swiglu_alpha, cfg.swiglu_limit)


def _dense(e: ExpertLinear) -> ExpertLinear:
    return ExpertLinear(bias=e.bias, weight=e.dense(torch.bfloat16))  # exact: MXFP4 values fit bf16


def _config_and_weights(p: dict, which: str):
    if "preset" in p:  # one real layer
        cfg = preset(p["preset"], num_hidden_layers=1)
        if which == "attention":
            return cfg, real_attention_weights(cfg, p["seed"])
        return cfg, real_mlp_weights(cfg, p["seed"], p.get("favoured", 0))
    cfg = tiny_config(num_hidden_layers=1, sliding_window=p.get("window", 8), num_experts=p.get("E", 8),
                      experts_per_token=p.get("k", 2), head_dim=p.get("d", 16))
    block = random_model(cfg, p["seed"], expert_bias_scale=p.get("bias_scale", 0.1)).blocks[0]
    if which == "attention":
        return cfg, block.attn
    mlp = block.mlp
    if p.get("format") == "dense":
        mlp.mlp1, mlp.mlp2 = _dense(mlp.mlp1), _dense(mlp.mlp2)
    return cfg, mlp


def _run(ctx: Ctx, p: dict, which: str) -> Outcome:
    g = generator(p["seed"])
    cfg, weights = _config_and_weights(p, which)
    past, new = p["past"], p["new"]
    S = len(new)
    rows = list(range(S))[::-1]
    cache_len = max(a + b for a, b in zip(past, new)) + 2
    batch = Batch.build(new, past, rows, cache_len)
    T = batch.num_tokens
    x = rounded(randn(g, T, cfg.hidden_size), ctx.dtype)
    window = cfg.sliding_window if p.get("windowed", True) else 0
    # The float64 runs (oracle, simulated engines) of a real MoE layer read each expert once.
    shared = None
    if which == "moe" and "preset" in p and weights.mlp1.is_mxfp4:
        shared = Experts(CachedExperts.of(weights.mlp1), CachedExperts.of(weights.mlp2), F64)

    def cache(dtype, device):
        c = KVCache.allocate(1, S, cache_len, cfg.num_key_value_heads, cfg.head_dim, F64, "cpu")
        gk = generator(p["seed"] + 1)
        for r, n in zip(rows, past):
            c.k[0, r, :n] = rounded(randn(gk, n, cfg.num_key_value_heads, cfg.head_dim), ctx.dtype)
            c.v[0, r, :n] = rounded(randn(gk, n, cfg.num_key_value_heads, cfg.head_dim), ctx.dtype)
        return KVCache(c.k.to(device, dtype), c.v.to(device, dtype))

    def run(ops, dtype, device, experts=None):
        xin = x.to(device, dtype)
        if which == "attention":
            return _attention_block(ops, cfg, weights, xin, batch_to(batch, device), cache(dtype, device),
                                    window, dtype, device)
        return _moe_block(ops, cfg, weights, xin, dtype, device, experts)

    ops = ops_for(ctx)
    with tol.RoutingRecorder(ops["router"]) as rec:
        out = ctx.call(f"{which} block", run, ops, ctx.dtype, ctx.device)
    ctx.check_tensor(f"{which} block", out, (T, cfg.hidden_size))
    out = out.detach().to("cpu", F64)
    # Routing held fixed: the oracle uses the engine's experts (an honest engine may resolve a near-tie
    # either way), checked to be a top-k within the router-logit bound; see tolerances.py.
    forced = tol.valid_routing(rec.calls, cfg.num_experts) if which == "moe" else None
    oracle = tol.routed_oracle(forced)
    ref, bound, rbound = tol.composed_bound(lambda be: run({op: be for op in OPS}, F64, torch.device("cpu"), shared),
                                            oracle, ctx.dtype, p["seed"], cfg.hidden_size)
    problem, flips = tol.routing_check(oracle, rbound)
    c = tol.compare(out, ref, bound[:, None])
    o = Outcome(f"{which} block", c["observed"], c["bound"], c["ratio"], where=f"(token, channel){c['index']}",
                metrics={"max_abs_err": c["max_abs_err"], "tokens": T,
                         **({"routing_near_ties": flips} if which == "moe" else {})})
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


def cases(dtype: str, profile: Profile, lim: Limits | None = None) -> list[Case]:
    if lim is None:
        from mxmoe.core.backend import Capabilities

        lim = Limits.of(Capabilities(mxfp4="native"))
    dt = (f"dtype:{dtype}",)
    d = lim.model_head_dim
    att_req = ("op:rms_norm", "op:linear", "op:rope", "op:attention", "sinks", f"head_dim:{d}") + dt
    fmt = lim.expert_format
    fmt_req = ("mxfp4",) if fmt == "mxfp4" else ("dense_experts",)
    E_all = lim.experts(4, 8)
    k_all = lim.top_k(1, 2, 4)
    moe_req = ("op:rms_norm", "op:router", "op:experts", f"experts:{max(E_all)}",
               f"experts_per_token:{max(k_all)}") + fmt_req + dt
    lens = st.lists(st.tuples(st.integers(0, 20), st.integers(1, 12)), min_size=1, max_size=3)
    k2 = min(2, max(k_all))

    def seqs(windowed):
        return lambda pr: _d(seqs=lens, windowed=st.just(windowed), d=st.just(d)).map(
            lambda p: {**p, "past": [a for a, _ in p["seqs"]], "new": [b for _, b in p["seqs"]]})

    out = [
        Case("L2", "block", "attention", run_attention_block, seqs(False),
             (dict(past=[0], new=[20], windowed=False, d=d, seed=1),
              dict(past=[0, 9, 3], new=[13, 1, 6], windowed=False, d=d, seed=3),
              dict(past=[13], new=[1], windowed=False, d=d, seed=4)),  # one decode token (the single-token path)
             att_req, dtype, "norm → qkv → RoPE → attention (no window, sinks, GQA, varlen) → out → residual",
             max_examples=3),
        Case("L2", "block", "attention_windowed", run_attention_block, seqs(True),
             (dict(past=[0, 9, 3], new=[13, 1, 6], windowed=True, d=d, seed=0),
              dict(past=[13], new=[1], windowed=True, d=d, seed=2)),
             att_req + ("sliding_window",), dtype, "the attention block with a window of 8 (crossed)",
             max_examples=3),
        Case("L2", "block", "moe", run_moe_block,
             lambda pr: _d(new=st.lists(st.integers(1, 24), min_size=1, max_size=2), E=st.sampled_from(E_all),
                           k=st.sampled_from(k_all), format=st.just(fmt)).filter(lambda p: p["k"] <= p["E"]).map(
                 lambda p: {**p, "past": [0] * len(p["new"])}),
             (dict(past=[0, 0], new=[16, 5], E=max(E_all), k=k2, format=fmt, seed=0),
              dict(past=[0], new=[6], E=min(E_all), k=min(max(k_all), min(E_all)), format=fmt, seed=1),
              dict(past=[0], new=[12], E=max(E_all), k=k2, format=fmt, bias_scale=1.0, seed=2)),  # O(1) biases
             moe_req, dtype, f"norm → router top-k → {fmt} experts (SwiGLU) → residual", max_examples=3),
    ]
    # One layer of the real models. Attention is the same in gpt-oss-20b and 120b (D 2880, 64/8 heads × 64,
    # the 128-token window on even layers); the MoE layers differ in their expert count (32 / 128).
    real_att = ("op:rms_norm", "op:linear", "op:rope", "op:attention", "sinks", "head_dim:64",
                "context:300") + dt
    out += [
        Case("L2", "block", "attention_gpt-oss", run_attention_block, None,
             (dict(preset="gpt-oss-20b", past=[200], new=[100], windowed=False, seed=0),),
             real_att, dtype, "one real attention layer (odd: no window): 100 new tokens over 200 cached",
             real_shape=True),
        Case("L2", "block", "attention_windowed_gpt-oss", run_attention_block, None,
             (dict(preset="gpt-oss-20b", past=[0, 0], new=[256, 44], windowed=True, seed=1),),
             real_att + ("sliding_window",), dtype,
             "one real attention layer (even: window 128): a 256-token and a 44-token prompt", real_shape=True),
    ]
    for name, E, favoured in (("gpt-oss-20b", 32, 0), ("gpt-oss-120b", 128, 16)):
        req = ("op:rms_norm", "op:router", "op:experts", "mxfp4", f"experts:{E}", "experts_per_token:4") + dt
        note = (f"router biased towards {favoured} experts spread over 0..{E - 1}, so the float64 oracle "
                f"dequantizes only those" if favoured else "every expert receives tokens")
        out.append(Case("L2", "block", f"moe_{name}", run_moe_block, None,
                        (dict(preset=name, past=[0], new=[300], favoured=favoured, seed=0),),
                        req, dtype, f"one real MoE layer of {name} (D = I = 2880, {E} MXFP4 experts, top-4) on a "
                                    f"300-token prompt; {note}", real_shape=True))
    # Each block is checked as users run it: the ops the engine does not claim served by the companion.
    return [dataclasses.replace(c, companion=True) for c in out]
