"""Error bounds, derived rather than guessed: how far an *honest* engine may land from the float64 oracle.

The oracle is the reference engine run in float64 on the CPU, on exactly the inputs the engine got
(inputs are generated, rounded once to the engine's dtype, and upcast exactly for the oracle), so the
only differences an honest engine may show are its own rounding errors. We bound them per output
element, from the float64 operands, with the standard model of floating-point arithmetic
``fl(a ∘ b) = (a ∘ b)(1 + δ), |δ| ≤ u``.

Unit roundoffs ``u`` (half an ulp of 1): float64 2^-53, float32 2^-24, float16 2^-11, bfloat16 2^-8.
An engine working in dtype ``dt`` stores activations in ``dt`` (``u_dt``) and accumulates reductions in
at least float32 (``u_acc`` = u(float32) for 16-bit dtypes, ``u_dt`` otherwise). TF32 is not float32: an
engine that uses it must not claim float32.

Reductions (dot products, sums) of length K. Worst case (Higham, *Accuracy and Stability of Numerical
Algorithms*, §3.1) ``|fl(Σ a_i b_i) - Σ a_i b_i| ≤ γ_K Σ|a_i b_i|`` with ``γ_K ≈ K u``, for any order.
That worst case is so loose at K in the thousands that it would hide an engine that accumulates in
bfloat16; we use the probabilistic bound of Higham & Mary (SIAM J. Sci. Comput. 41(5), 2019):
with rounding errors independent and mean-zero, ``γ̃_K = λ √K u`` holds with probability at least
``1 - 2 exp(-λ²(1-u)²/2)``: ``LAMBDA = 8`` gives a failure probability below 3e-14 per element, and we
take ``min(K, λ√K)`` so that short reductions keep the deterministic bound.

Per op (M = the same computation on absolute values, the "magnitude" pass; every term also
multiplied by ``SAFETY``):

* linear ``y = x Wᵀ + b``: ``2 u_dt (|y| + |b|)`` (the result, and possibly the product before the bias,
  rounded to ``dt``) ``+ γ̃_K u_acc M`` with ``M = |x||W|ᵀ + |b|``.
* rms_norm: ``½ulp_dt(y) + SAFETY (γ̃_D + 4) u_acc |y|``: the interface promises the whole computation
  in at least float32 and one rounding to ``dt`` at the end, so an honest result is the correctly rounded
  float32 one (half an ulp of ``dt``, not ``SAFETY`` × ``u_dt``) plus float32's own errors: the mean of
  squares (γ̃_D, halved by the square root), rsqrt, the products. An engine that keeps the mean of squares
  or the normalised value in bf16 lands up to ¾ ulp away and fails (the simulated engines of levels 2 and
  3 still round twice, ``rms_norm_noise``: slack there, the promise is enforced at level 1).
* add_rms_norm (fused, API 1.2): ``s = x + delta`` bit-exact, bound 0 — one correctly rounded add of two
  values of ``dt`` (an engine that adds in float32 and rounds to bf16/fp16 once gets the same bits:
  float32's 24 bits ≥ 2p + 2 make the double rounding harmless); ``h`` as rms_norm of the rounded ``s``.
* rope: per rotated pair ``(x1, x2)`` with angle θ: ``(4 u_dt + (2|θ| + 4) u_acc) c (|x1| + |x2|)``:
  cos/sin rounded to ``dt``, two products and a sum in ``dt``; the angle ``p·f`` computed in float32
  is off by ``u|θ|`` (twice that, for a conversion on the way) and cos/sin are 1-Lipschitz.
* attention (per query, head, channel): a score error ``δs_j ≤ (u_dt + γ̃_d) s·Σ|q||k_j| + u_acc|s_j|``
  moves the output by ``Σ_j p_j δs_j |v_j - o|`` (first-order derivative of softmax-weighted averages,
  bounded by ``Σ_j p_j δs_j (|v_j| + |o|)``), plus rounding P to ``dt`` and the P·V accumulation
  ``(u_dt + γ̃_L) Σ_j p_j |v_j|``, plus the output ``(u_dt + 8 u_acc)|o|`` (normalisation, exp).
* experts: the first-order propagation through each chosen expert: ``δh`` from the mlp1 dot product
  (as linear), through SwiGLU's derivatives (evaluated at the clamped point: conservative), ``δs =
  |∂s/∂g| δg + |∂s/∂l| δl + (2 u_dt + 4 u_acc)|s|``, through mlp2 (``|W2| δs`` + its own dot-product
  error), then the weighted sum over k in ``dt`` ``(k + 1) u_dt Σ_k |w_k y_k|``.
* exact ops: embedding is a gather, MXFP4 dequantization is exact in bfloat16 and wider (every E2M1
  value times every E8M0 power of two is representable, see core/mxfp4.py): bound 0, bit-exact.

An absolute floor ``(K + 1) · tiny(dt)`` covers underflow to subnormals.

Blocks and the model (levels 2, 3) compose many ops; instead of pushing formulas through the graph
we *simulate* honest engines: :class:`NoisyOracle` is the float64 reference with rounding errors injected
where an engine makes them, each ± its per-element bound above divided by SAFETY (random signs, sizes in
[½, 1]; the simulation propagates every perturbation through the real computation, so the first-order
safety factor is not needed), plus the rounding of the residual stream. Attention and the experts are
perturbed *inside* (scores, P, P·V; mlp1 output, SwiGLU output, mlp2 output, weighted sum), not by
injecting their worst-case output bound: that bound sums |W|·|δ| over the reduction as if every error
were aligned, which in bfloat16 made the composed bounds ~50x above honest errors (L2 moe bound 2.9 vs 0.05
observed) and let dropped biases and decode-only RoPE bugs through.

Routing is held fixed. An honest engine may resolve a near-tie of the router's top-k either way, and one
flip moves a row by a whole expert's output, so (1) the engine's router choices are recorded and
teacher-forced into the oracle (weights always the oracle's softmax of its own logits at those experts),
(2) the simulated engines use those same experts and perturb only the router logits at them (the
weights), and (3) the forced choices are checked to be a top-k honest rounding can produce: no
unchosen expert's oracle logit may exceed a chosen one's by more than 2x the router-logit bound
(SAFETY_COMPOSED x the largest logit deviation of the simulations). A larger gap is reported as routing
divergence (the router, or an op before it, is wrong). The bound of a block/model output row is then
``SAFETY_COMPOSED`` × the largest deviation seen over ``NOISY_DRAWS`` simulated engines. Model-level
thresholds derived from that logit bound B (per row) are in :func:`kl_bound`.

SAFETY is 2: the per-op bounds are already upper bounds (an honest engine's observed error is usually
10-100× below them); the factor absorbs second-order terms the first-order analysis drops.
"""

from __future__ import annotations

import math

import torch

UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8}
LAMBDA = 8.0  # probabilistic rounding-error constant (Higham & Mary 2019): P(fail) < 2e^(-λ²/2) per element
SAFETY = 2.0  # second-order terms dropped by the first-order analysis
SAFETY_COMPOSED = 4.0  # blocks/model: × the largest deviation of NOISY_DRAWS simulated honest engines
NOISY_DRAWS = 3

F64 = torch.float64


def u(dtype: torch.dtype) -> float:
    """Unit roundoff of ``dtype``."""
    return UNIT_ROUNDOFF[dtype]


def u_acc(dtype: torch.dtype) -> float:
    """Unit roundoff of the accumulator an honest engine uses for ``dtype``: at least float32."""
    return min(u(dtype), u(torch.float32))


def gamma(k: int, dtype: torch.dtype) -> float:
    """Relative error of a length-``k`` reduction accumulated in ``u_acc(dtype)`` (see module docstring)."""
    k = max(int(k), 1)
    return min(float(k), LAMBDA * math.sqrt(k)) * u_acc(dtype)


def floor(dtype: torch.dtype, k: int = 1) -> float:
    return (k + 1) * torch.finfo(dtype).tiny


_PRECISION = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}  # significand bits


def half_ulp(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` at each |y| (float64): the largest error of one correct rounding."""
    p = _PRECISION[dtype]
    e = torch.frexp(y.abs()).exponent.to(F64) - 1  # floor(log2|y|)
    emin = math.log2(torch.finfo(dtype).tiny)
    return torch.exp2(torch.clamp(e, min=emin) - p)


# ---- per-op bounds: float64 operands in, per-element bound (float64, shape of the output) out ----------

def linear_bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """y (T, N) = x (T, K) wᵀ (N, K) + b (N,)."""
    K = x.shape[-1]
    absb = b.abs() if b is not None else torch.zeros((), dtype=F64)
    mag = _mag(x, w.abs().float()) + absb
    return SAFETY * (2 * u(dtype) * (y.abs() + absb) + gamma(K, dtype) * mag) + floor(dtype, K)


def rms_norm_bound(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One rounding to ``dtype`` of a result computed in at least float32 (the interface's promise)."""
    D = y.shape[-1]
    f32 = (gamma(D, torch.float32) + 4 * u(torch.float32)) if dtype != F64 else (gamma(D, F64) + 4 * u(F64))
    return half_ulp(y, dtype) + SAFETY * f32 * y.abs() + floor(dtype, D)


def rms_norm_noise(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the simulated engines of levels 2/3 inject: up to two roundings of the output, plus float32's."""
    D = y.shape[-1]
    return SAFETY * (2 * u(dtype) + (gamma(D, dtype) + 4 * u_acc(dtype))) * y.abs() + floor(dtype, D)


def rope_bound(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, concentration: float,
               dtype: torch.dtype) -> torch.Tensor:
    """x (T, H, d) the input; bound for each output element of the rotated x."""
    theta = (positions.to(F64)[:, None] * inv_freq.to(F64)[None, :]).abs()  # (T, d/2)
    x1, x2 = x.chunk(2, dim=-1)
    mag = concentration * (x1.abs() + x2.abs())  # (T, H, d/2)
    eps = 4 * u(dtype) + (2 * theta[:, None, :] + 4) * u_acc(dtype)
    half = SAFETY * eps * mag + floor(dtype, 4)
    return torch.cat((half, half), dim=-1)


def _sequences(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch, sliding_window: int,
               sm_scale: float):
    """Per sequence of the batch: (start, end, ctx, values (L, Hkv, d), unmasked scores (Hq, n, L), their
    magnitude Σ|q||k|·scale, the causal/window mask (n, L)) — what attention_bound and the simulated
    honest attention both start from. GQA by grouping (query head h reads KV head h // G), never by
    repeating the keys: a 64-sequence decode batch at gpt-oss's heads stays cheap."""
    Hq, Hkv = q.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    for start, end, row, ctx in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist(),
                                    batch.cache_rows.tolist(), batch.context_lens.tolist()):
        n = end - start
        qs = q[start:end].reshape(n, Hkv, G, -1)  # (n, Hkv, G, d)
        ks = k_cache[row, :ctx]  # (L, Hkv, d)
        vs = v_cache[row, :ctx]
        scores = torch.einsum("nkgd,lkd->kgnl", qs, ks).reshape(Hq, n, ctx) * sm_scale  # (Hq, n, L)
        # Magnitudes (bounds only) in float32: a relative error of 1e-6 in a bound is immaterial.
        smag = torch.einsum("nkgd,lkd->kgnl", qs.abs().float(), ks.abs().float()).reshape(Hq, n, ctx).to(F64)
        smag *= sm_scale * (1 + 2 ** -10)
        q_pos = batch.positions[start:end].cpu()[:, None]
        k_pos = torch.arange(ctx)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window:
            allowed &= q_pos - k_pos < sliding_window
        yield start, end, ctx, vs, scores, smag, allowed


def _pv(p: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
    """Σ_l p (Hq, n, L) · vs (L, Hkv, d) → (Hq, n, d), query head h reading KV head h // (Hq / Hkv)."""
    Hq, n, L = p.shape
    Hkv, d = vs.shape[1], vs.shape[2]
    return torch.einsum("kgnl,lkd->kgnd", p.reshape(Hkv, Hq // Hkv, n, L), vs).reshape(Hq, n, d)


def attention_bound(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor,
                    batch, sliding_window: int, sm_scale: float, out: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """q (T, Hq, d), caches (rows, cache_len, Hkv, d) after the write, out (T, Hq, d): all float64."""
    T, Hq, d = q.shape
    ud, ua = u(dtype), u_acc(dtype)
    bound = torch.empty_like(out)
    for start, end, ctx, vs, scores, smag, allowed in _sequences(q, k_cache, v_cache, batch, sliding_window,
                                                                 sm_scale):
        scores = scores.masked_fill(~allowed, float("-inf"))
        sink = sinks.to(F64)[:, None, None].expand(Hq, end - start, 1)
        p_all = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)
        p, p_sink = p_all[..., :-1], p_all[..., -1:]  # (Hq, n, L), (Hq, n, 1)
        ds = (ud + gamma(d, dtype)) * smag + ua * scores.abs().nan_to_num(posinf=0.0)  # (Hq, n, L)
        ds = ds.masked_fill(~allowed, 0.0)
        ds_sink = ud * sinks.to(F64).abs()[:, None, None]  # a sink kept in dt
        pds = p * ds
        o = out[start:end].permute(1, 0, 2)  # (Hq, n, d)
        av = vs.abs()
        first = _pv(pds, av) + (pds.sum(-1, keepdim=True) + p_sink * ds_sink) * o.abs()
        pv = _pv(p, av)
        L = max(int(ctx), 1)
        b = first + (ud + gamma(L, dtype)) * pv + (ud + 8 * ua) * o.abs()
        bound[start:end] = (SAFETY * b + floor(dtype, L + d)).permute(1, 0, 2)
    return bound


def swiglu_parts(h: torch.Tensor, alpha: float, limit: float):
    """(s, ds/dg, ds/dl) of gpt-oss SwiGLU on interleaved h (..., 2I), derivatives at the clamped point."""
    g = h[..., 0::2].clamp(max=limit)
    lin = h[..., 1::2].clamp(min=-limit, max=limit)
    sig = torch.sigmoid(alpha * g)
    s = g * sig * (lin + 1)
    dg = (sig * (1 + alpha * g * (1 - sig))).abs() * (lin + 1).abs()
    dl = (g * sig).abs()
    return s, dg, dl


def experts_bound(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, mlp1, mlp2, alpha: float,
                  limit: float, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (T, D); weights/indices (T, k) float64/int64; mlp1 (E, 2I, D), mlp2 (E, D, I): ExpertLinear layers
    (read one expert at a time, in float64: real-sized layers never exist dense)."""
    T, D = x.shape
    k = indices.shape[1]
    I = mlp2.in_features
    ud, ua = u(dtype), u_acc(dtype)
    acc = torch.zeros_like(out)
    wy = torch.zeros_like(out)
    idx = indices.cpu()
    for e in torch.unique(idx).tolist():
        token, slot = torch.nonzero(idx == e, as_tuple=True)
        xe = x[token]  # (n, D)
        W1, B1 = mlp1.expert_weight(e, F64), mlp1.bias[e].to(F64)  # (2I, D), (2I,)
        h = xe @ W1.T + B1
        del W1
        dh = 2 * ud * (h.abs() + B1.abs()) + gamma(D, dtype) * (_mag(xe, mlp1, e) + B1.abs())
        s, dg, dl = swiglu_parts(h, alpha, limit)
        ds = dg * dh[:, 0::2] + dl * dh[:, 1::2] + (2 * ud + 4 * ua) * s.abs()
        W2, B2 = mlp2.expert_weight(e, F64), mlp2.bias[e].to(F64)  # (D, I), (D,)
        y = s @ W2.T + B2
        del W2
        A2 = mlp2.expert_weight(e, torch.float32).abs()
        mag2 = _mag(s, A2) + B2.abs()
        dy = _mag(ds, A2) + 2 * ud * (y.abs() + B2.abs()) + gamma(I, dtype) * mag2
        wk = weights[token, slot, None].abs().to(F64)
        acc.index_add_(0, token, wk * dy)
        wy.index_add_(0, token, wk * y.abs())
    b = acc + (k + 1) * ud * wy + ud * out.abs()
    return SAFETY * b + floor(dtype, D + I)


def experts_exact_hidden_bound(x: torch.Tensor, indices: torch.Tensor, mlp1, mlp2, alpha: float, limit: float,
                               out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """For inputs that make everything but mlp2's reduction exact in every dtype — SwiGLU exact, one expert per
    token with weight 1, mlp2's bias 0 — an honest engine rounds mlp2's float32 sum to ``dtype`` once (the
    weight, the bias and the sum over one expert are exact) and adds only float32's accumulation error:
    ``½ulp`` (+2^-6 of it) plus that. Accumulating in a 16-bit dtype (bf16 or fp16) lands ulps away."""
    assert indices.shape[1] == 1 and not bool(mlp2.bias.any()), "needs k = 1 and a zero mlp2 bias"
    I = mlp2.in_features
    mag = torch.zeros_like(out)
    idx = indices[:, 0].cpu()
    for e in torch.unique(idx).tolist():
        token = torch.nonzero(idx == e)[:, 0]
        h = x[token] @ mlp1.expert_weight(e, F64).T + mlp1.bias[e].to(F64)
        s = swiglu_parts(h, alpha, limit)[0]
        mag[token] = _mag(s, mlp2.expert_weight(e, torch.float32).abs())
    return (1 + 2 ** -6) * half_ulp(out, dtype) + SAFETY * gamma(I, torch.float32 if dtype != F64 else F64) * mag \
        + floor(dtype, I)


def _mag(a: torch.Tensor, w, e: int | None = None) -> torch.Tensor:
    """|a| @ |W|ᵀ for bounds, in float32 (rounded up by 2^-10: its own relative error is far below that).
    ``w``: a weight (N, K) already made non-negative in float32, or an ExpertLinear and the expert ``e``."""
    if e is not None:
        w = w.expert_weight(e, torch.float32).abs()
    return (a.abs().float() @ w.T).to(F64) * (1 + 2 ** -10)


def kl_bound(logit_bound_row: torch.Tensor) -> torch.Tensor:
    """KL(p_oracle ‖ p_engine) per row when every logit of the row is off by at most B (the row's max bound).

    With δ = engine - oracle logits, KL = log E_p[e^δ] - E_p[δ] ≤ (2B)²/8 = B²/2 by Hoeffding's lemma
    (δ lies in an interval of width 2B).
    """
    return logit_bound_row.pow(2) / 2


def compare(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> dict:
    """Observed error vs bound, element-wise; NaN must match NaN, ±inf must match exactly.

    Returns ``ratio`` (max over elements of err/bound; inf when an element with bound 0 differs or NaNs
    disagree), the worst element's ``observed``/``bound``/``index``, and ``max_abs_err``.
    """
    o = out.detach().to("cpu", F64)
    r = ref.detach().to("cpu", F64)
    if o.shape != r.shape:
        return dict(ratio=math.inf, observed=math.inf, bound=0.0, max_abs_err=math.inf, index=None,
                    note=f"shape {tuple(o.shape)}, expected {tuple(r.shape)}")
    nan_o, nan_r = torch.isnan(o), torch.isnan(r)
    if not torch.equal(nan_o, nan_r):
        bad = (nan_o != nan_r).nonzero()[0].tolist()
        what = "NaN where the oracle has a number" if bool(nan_o[tuple(bad)]) else "a number where the oracle has NaN"
        return dict(ratio=math.inf, observed=math.inf, bound=0.0, max_abs_err=math.inf, index=bad,
                    note=f"{what} at {bad}")
    inf_r = torch.isinf(r) | torch.isinf(o)
    if inf_r.any() and not torch.equal(o[inf_r], r[inf_r]):
        bad = (inf_r & (o != r)).nonzero()[0].tolist()
        return dict(ratio=math.inf, observed=math.inf, bound=0.0, max_abs_err=math.inf, index=bad,
                    note=f"infinity mismatch at {bad}: {o[tuple(bad)].item()} vs {r[tuple(bad)].item()}")
    ok = ~(nan_r | inf_r)
    if not ok.any():
        return dict(ratio=0.0, observed=0.0, bound=0.0, max_abs_err=0.0, index=None, note="")
    err = torch.where(ok, (o - r).abs(), torch.zeros_like(o))
    bnd = bound.detach().to("cpu", F64).expand_as(err)
    bnd = torch.where(ok, bnd.nan_to_num(nan=0.0), torch.ones_like(err))
    ratio = torch.where(err == 0, torch.zeros_like(err),
                        torch.where(bnd > 0, err / bnd.clamp_min(1e-300), torch.full_like(err, math.inf)))
    flat = int(ratio.argmax())
    idx = list(torch.unravel_index(torch.tensor(flat), ratio.shape))
    idx = [int(i) for i in idx]
    return dict(ratio=float(ratio.reshape(-1)[flat]), observed=float(err.reshape(-1)[flat]),
                bound=float(bnd.reshape(-1)[flat]), max_abs_err=float(err.max()), index=idx, note="")


# ---- simulated honest engines, for composed computations (levels 2, 3) --------------------------------

def _routed_oracle_class():
    from mxmoe.backends.reference import TorchBackend

    class RoutedOracle(TorchBackend):
        """The float64 reference whose router can be *teacher-forced*: ``forced`` holds one (T, k) int64
        tensor per router call (in call order; rows of -1, or calls beyond the list, keep the oracle's own
        top-k). Every router call's exact logits and chosen experts are recorded in ``calls``. The weights
        are always the softmax of the oracle's own logits at the chosen experts (as level 1's router check)."""

        name = "routed-oracle"

        def __init__(self, forced: list | None = None):
            self.forced = forced
            self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

        def _choose(self, logits: torch.Tensor, top_k: int) -> torch.Tensor:
            _, own = torch.sort(logits, dim=-1, descending=True, stable=True)
            idx = own[:, :top_k]
            i = len(self.calls)
            if self.forced is not None and i < len(self.forced) and self.forced[i] is not None:
                f = self.forced[i]
                if f.shape == idx.shape:
                    idx = torch.where((f >= 0).all(-1, keepdim=True), f.to(idx.device), idx)
            return idx

        def _logits(self, x, gate, exact):
            return exact

        def router(self, x, gate, top_k):
            exact = TorchBackend.linear(self, x, gate)
            logits = self._logits(x, gate, exact)
            idx = self._choose(exact, top_k)
            self.calls.append((logits, idx))
            return self._weights(torch.softmax(torch.gather(logits, 1, idx), dim=-1)), idx

        def _weights(self, w):
            return w

    return RoutedOracle


def routed_oracle(forced: list | None = None):
    """A float64 oracle with teacher-forced routing (see RoutedOracle)."""
    return _routed_oracle_class()(forced)


def _noisy_oracle_class():
    from mxmoe.backends.reference import TorchBackend

    RoutedOracle = _routed_oracle_class()

    class NoisyOracle(RoutedOracle):
        """The float64 reference with each op's output moved by ± its own derived bound for ``dtype``.

        Not an engine anyone runs: a model of how far an honest ``dtype`` engine may drift, used to
        derive block- and model-level bounds (see the module docstring). Routing is held fixed: the
        experts are those of ``forced`` (the reference run's choices); only the router's logits at those
        experts (hence the weights) are perturbed.
        """

        name = "noisy-oracle"

        def __init__(self, dtype: torch.dtype, seed: int, forced: list | None = None):
            super().__init__(forced)
            self.sim_dtype = dtype
            self.gen = torch.Generator().manual_seed(seed)

        def _noise(self, out: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
            # The per-op bounds carry SAFETY for the second-order terms a first-order analysis drops; the
            # simulation propagates every perturbation through the real computation, so it uses bound/SAFETY.
            bound = bound / SAFETY
            r = torch.rand(out.shape, generator=self.gen, dtype=F64) * 0.5 + 0.5
            sign = torch.randint(0, 2, out.shape, generator=self.gen).to(F64) * 2 - 1
            return out + (bound * r * sign).nan_to_num(0.0)

        def rms_norm(self, x, scale, eps):
            y = super().rms_norm(x, scale, eps)
            # + the engine's residual stream, rounded to dt at every add: a relative error of y.
            return self._noise(y, rms_norm_noise(y, self.sim_dtype) + u(self.sim_dtype) * y.abs())

        def linear(self, x, layer):
            y = super().linear(x, layer)
            return self._noise(y, linear_bound(x, layer.weight, layer.bias, y, self.sim_dtype))

        def rope(self, q, k, positions, inv_freq, concentration):
            qo, ko = super().rope(q, k, positions, inv_freq, concentration)
            return (self._noise(qo, rope_bound(q, positions, inv_freq, concentration, self.sim_dtype)),
                    self._noise(ko, rope_bound(k, positions, inv_freq, concentration, self.sim_dtype)))

        def attention(self, q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale):
            # Rounding errors injected where an engine makes them (scores, P, the P·V sum, the output),
            # each ± its own per-element bound, then propagated by the softmax itself.
            o = super().attention(q, k, v, sinks, k_cache, v_cache, batch, sliding_window, sm_scale)
            dt = self.sim_dtype
            ud, ua = u(dt), u_acc(dt)
            T, Hq, d = q.shape
            out = torch.empty_like(o)
            for start, end, ctx, vs, scores, smag, allowed in _sequences(q, k_cache, v_cache, batch,
                                                                         sliding_window, sm_scale):
                scores = self._noise(scores, SAFETY * ((ud + gamma(d, dt)) * smag + ua * scores.abs()))
                scores = scores.masked_fill(~allowed, float("-inf"))
                sk = sinks.to(F64)[:, None, None].expand(Hq, end - start, 1)
                sk = self._noise(sk, SAFETY * ud * sk.abs())
                p = torch.softmax(torch.cat((scores, sk), dim=-1), dim=-1)[..., :-1]
                p = self._noise(p, SAFETY * ud * p)
                acc = _pv(p, vs)
                pv = _pv(p, vs.abs())
                acc = self._noise(acc, SAFETY * (gamma(max(int(ctx), 1), dt) * pv + (ud + 8 * ua) * acc.abs()))
                out[start:end] = acc.permute(1, 0, 2) + floor(dt, ctx + d)
            return out

        def _logits(self, x, gate, logits):
            return self._noise(logits, linear_bound(x, gate.weight, gate.bias, logits, self.sim_dtype))

        def _weights(self, w):
            return self._noise(w, SAFETY * 2 * u(self.sim_dtype) * w)

        def experts(self, x, expert_weights, expert_indices, experts, swiglu_alpha, swiglu_limit):
            # Each chosen expert's mlp1 output, SwiGLU output, mlp2 output and the weighted sum, each moved by
            # ± its per-element bound (experts_bound's terms) and propagated through the real computation.
            dt = self.sim_dtype
            ud, ua = u(dt), u_acc(dt)
            T, D = x.shape
            I = experts.mlp2.in_features
            out = torch.zeros(T, D, dtype=F64)
            mag = torch.zeros(T, D, dtype=F64)
            idx = expert_indices.cpu()
            # A simulated 16-bit engine's products may be computed in float32: their rounding (~1e-7) is far
            # inside the noise injected for it (>= 2^-11 relative), and real-sized layers run twice as fast.
            work = torch.float32 if u(dt) >= u(torch.float16) else F64
            for e in torch.unique(idx).tolist():  # one expert's weights at a time (real sizes never fit dense)
                token, slot = torch.nonzero(idx == e, as_tuple=True)
                xe = x[token]
                W1, B1 = experts.mlp1.expert_weight(e, work), experts.mlp1.bias[e].to(F64)
                h = (xe.to(work) @ W1.T).to(F64) + B1
                A1 = W1.abs() if work == torch.float32 else experts.mlp1.expert_weight(e, torch.float32).abs()
                h = self._noise(h, SAFETY * (2 * ud * (h.abs() + B1.abs()) + gamma(D, dt) * (
                    _mag(xe, A1) + B1.abs())))
                del W1, A1
                s = swiglu_parts(h, swiglu_alpha, swiglu_limit)[0]
                s = self._noise(s, SAFETY * (2 * ud + 4 * ua) * s.abs())
                W2, B2 = experts.mlp2.expert_weight(e, work), experts.mlp2.bias[e].to(F64)
                y = (s.to(work) @ W2.T).to(F64) + B2
                A2 = W2.abs() if work == torch.float32 else experts.mlp2.expert_weight(e, torch.float32).abs()
                y = self._noise(y, SAFETY * (2 * ud * (y.abs() + B2.abs()) + gamma(I, dt) * (
                    _mag(s, A2) + B2.abs())))
                del W2, A2
                wy = expert_weights[token, slot, None].to(F64) * y
                out.index_add_(0, token, wy)
                mag.index_add_(0, token, wy.abs())
            k = expert_indices.shape[1]
            return self._noise(out, SAFETY * ((k + 1) * ud * mag + ud * out.abs())) + floor(dt, D + I)

    return NoisyOracle


def noisy_oracle(dtype: torch.dtype, seed: int, forced: list | None = None):
    """A :class:`NoisyOracle` simulating an honest engine in ``dtype`` (float64, CPU), routing as ``forced``."""
    return _noisy_oracle_class()(dtype, seed, forced)


class RoutingRecorder:
    """Records the experts an engine's ``router`` picks, call by call (a context manager that wraps the
    engine instance's ``router``; the engine is otherwise untouched)."""

    def __init__(self, engine):
        self.engine = engine
        self.calls: list[torch.Tensor] = []

    def __enter__(self):
        had = "router" in vars(self.engine)
        self._saved = vars(self.engine).get("router") if had else None
        inner = self.engine.router

        def router(x, gate, top_k):
            res = inner(x, gate, top_k)
            try:
                self.calls.append(res[1].detach().to("cpu", torch.int64))
            except Exception:  # noqa: BLE001 — malformed output: the comparison reports it
                self.calls.append(None)
            return res

        self.engine.router = router
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            self.engine.router = self._saved
        else:
            del self.engine.router
        return False


def assemble_routing(calls: list, layers: int, token_rows: list[list[int]], rows: int, k: int) -> list | None:
    """Engine router calls (``layers`` per forward, forwards in order) → one (rows, k) forcing tensor per
    layer of an oracle forward over ``rows`` tokens; ``token_rows[f]`` maps forward ``f``'s tokens to
    oracle rows (-1: no counterpart). Rows the engine never routed stay -1 (the oracle's own choice).
    None when the calls do not fit (the comparison then runs unforced)."""
    if len(calls) != layers * len(token_rows):
        return None
    out = [torch.full((rows, k), -1, dtype=torch.int64) for _ in range(layers)]
    for c, idx in enumerate(calls):
        f, layer = divmod(c, layers)
        m = torch.tensor(token_rows[f], dtype=torch.int64)
        if idx is None or idx.shape != (len(m), k):
            return None
        keep = m >= 0
        out[layer][m[keep]] = idx[keep]
    return out


def valid_routing(forced: list | None, num_experts: int) -> list | None:
    """Drop forcing rows that are not k distinct experts in range (the comparison will show them)."""
    if forced is None:
        return None
    out = []
    for f in forced:
        if f is None:
            out.append(None)
            continue
        ok = (f >= 0).all(-1) & (f < num_experts).all(-1)
        s = f.sort(-1).values
        ok &= (s[:, 1:] != s[:, :-1]).all(-1) if f.shape[1] > 1 else torch.ones_like(ok)
        out.append(torch.where(ok[:, None], f, torch.full_like(f, -1)))
    return out


def composed_bound(run, ref_oracle, dtype: torch.dtype, seed: int, floor_k: int):
    """Simulate NOISY_DRAWS honest ``dtype`` engines with routing held at ``ref_oracle``'s choices.

    ``run(backend) -> (R, N)`` output rows. Returns (bound per row (R,), router-logit bound per router call
    (T,) each): SAFETY_COMPOSED × the largest deviation from the reference run seen over the draws.
    """
    ref = run(ref_oracle)
    forced = [idx for _, idx in ref_oracle.calls]
    dev = torch.zeros(ref.shape[0], dtype=F64)
    rdev = [torch.zeros(lg.shape[0], dtype=F64) for lg, _ in ref_oracle.calls]
    for i in range(NOISY_DRAWS):
        n = noisy_oracle(dtype, seed * 1000 + i, forced)
        out = run(n)
        dev = torch.maximum(dev, (out - ref).abs().amax(dim=-1))
        for j, ((lg, _), (lr, _)) in enumerate(zip(n.calls, ref_oracle.calls)):
            rdev[j] = torch.maximum(rdev[j], (lg - lr).abs().amax(dim=-1))
    bound = SAFETY_COMPOSED * dev + floor(dtype, floor_k)
    rbound = [SAFETY_COMPOSED * r + floor(dtype, floor_k) for r in rdev]
    return ref, bound, rbound


def routing_check(ref_oracle, rbound: list[torch.Tensor], labels=None) -> tuple[str, int]:
    """The experts the oracle was forced to use (the engine's) must be a top-k that honest rounding can
    produce: no unchosen expert's oracle logit may beat a chosen one's by more than 2× the router-logit
    bound (each logit may move by the bound). Returns (problem or "", rows where the engine's choice
    differs from the oracle's own top-k, i.e. near-ties resolved the other way)."""
    flips = 0
    for j, ((lg, idx), b) in enumerate(zip(ref_oracle.calls, rbound)):
        k = idx.shape[1]
        own = torch.sort(lg, dim=-1, descending=True, stable=True).indices[:, :k]
        differs = (own.sort(-1).values != idx.sort(-1).values).any(-1)
        flips += int(differs.sum())
        chosen = torch.zeros_like(lg, dtype=torch.bool).scatter_(1, idx, True)
        if bool(chosen.all()):
            continue
        worst_chosen = lg.masked_fill(~chosen, math.inf).min(-1).values
        best_other = lg.masked_fill(chosen, -math.inf).max(-1).values
        gap = best_other - worst_chosen
        bad = gap > 2 * b
        if bad.any():
            t = int((gap / (2 * b)).argmax())
            where = labels[t] if labels else f"token {t}"
            return (f"routing diverged at layer {j}, {where}: the engine chose experts {idx[t].tolist()} but an "
                    f"unchosen expert's oracle logit is {float(gap[t]):.3g} above a chosen one, beyond 2x the "
                    f"router-logit bound {float(2 * b[t]):.3g} (the router, or an op before it, is wrong; run levels "
                    "L1/L2 to find the op)", flips)
    return "", flips
