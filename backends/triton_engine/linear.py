"""Dense layers of the ``triton`` engine at small batch: ``y = x W^T + b`` reading W once, in one kernel.

At decode time a dense layer is a GEMV: T = 1..64 token rows against a weight W (N, K) that must stream from
HBM once. cuBLAS gets there in two kernels on gpt-oss's QKV and output projections (a split-K GEMV and a
separate reduce); ``gemv`` does it in one: every program owns BLOCK_N output rows (all T tokens) and one of
SPLIT_K ranges of K, and when K is split the last program of a tile to finish (an atomic counter,
sync.last_to_arrive) sums the fp32 partials in split order, adds the bias and rounds once to x's dtype. Results are
therefore bitwise repeatable whichever program finishes last. Two inner products, chosen by the config:

* ``fma`` (T <= 8): CUDA-core FMAs. A K step multiplies x and W as [BK/VEC, BN, BT, VEC] tiles (VEC = 16
  bytes of elements, one vector load) and sums over the VEC axis, which lies inside one thread: the loop carries
  per-thread partial sums [BK/VEC, BN, BT] and the only cross-thread reduction is the one after the loop.
  PREFETCH=1 loads the next step's tiles before this step's FMAs.
* ``dot`` (tensor cores): W as the wide operand of ``tl.dot`` (swap AB: [BN, BK] x [BK, BT], BT >= 16
  tokens padded), loads pipelined by Triton over ``num_stages``.

``linear_ref`` is the specification (fp32 accumulation, the bias added in fp32, one rounding). ``linear`` is
the policy the engine calls: ``gemv`` where the sweep (tests/benchmarks/gpu/dense_gemv.py) found it faster than
``torch.nn.functional.linear`` (cuBLAS), cuBLAS elsewhere.

Shape legend: T tokens (BT padded to a power of two), N outputs, K inputs, S = SPLIT_K ranges of K.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mxmoe.backends.triton_engine import pdl
from mxmoe.backends.triton_engine.pdl import launch_options, wait_for_predecessor
from mxmoe.backends.triton_engine.sync import last_to_arrive

# The interpreter's tl.dot on bf16 operands returns wrong values (FACTS.md): feed it fp32 there.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter (triton 3.9) also truncates fp32 -> bf16 instead of rounding to nearest even: round by hand there.
_ROUND_BY_HAND = tl.constexpr(_INTERPRET)

# The fma product loads its first K step's weights (static data, pdl.py) before the PDL wait, so that they are in
# flight while the predecessor finishes: gpt-oss-20b decode at batch 1 1.95-1.98 ms a step against 2.02-2.13 without,
# alternated in one session on the H200 (tests/benchmarks/gpu/pdl_order.sh). The first two K steps (the default, as
# certified): 1.86, 1.86, 1.99, 1.86 ms against 1.98, 1.88, 1.87, 1.86 for one, alternated in a later session
# (pdl_order.sh norm): no difference beyond the spread of identical runs. (QKV's fma(16, 512) program then spills 24
# bytes to the stack in the offline sm_90 SASS, at 255 registers.)
# MXMOE_TRITON_GEMV_EARLY_W=0: none; =1: one step. Read at launch.
EARLY_W = int(os.environ.get("MXMOE_TRITON_GEMV_EARLY_W", "2"))
if EARLY_W not in (0, 1, 2):
    raise ValueError(f"MXMOE_TRITON_GEMV_EARLY_W must be 0, 1 or 2 (K steps loaded before the wait), got {EARLY_W}")

MAX_TOKENS = 64  # gemv takes up to this many rows; past it a layer is a matrix product (cuBLAS)
FMA_MAX_BLOCK_T = 8  # the fma product keeps BT partial sums per thread and row: ~140-250 registers at 8
VECTOR_BYTES = 16  # one 128-bit load per thread and row per K vector


# ---- the plain-PyTorch specification -------------------------------------------------------------------------

def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(T, K) x (N, K) (+ (N,)) → (T, N) in x.dtype: fp32 products and sums, the bias added in fp32, one rounding."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---- kernel helpers --------------------------------------------------------------------------------------------

@triton.jit
def _cast(v, dtype: tl.constexpr):
    # fp32 -> dtype, rounding to nearest even (by hand in the interpreter, which truncates to bf16).
    if _ROUND_BY_HAND and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    return v.to(dtype)


@triton.jit
def _load_step(x_ptrs, w_ptrs, offs_k, k0, k_hi, MASKED: tl.constexpr):
    # The x and W tiles of the K step at k0 (x_ptrs, w_ptrs at k = 0); offs_k: the K offsets broadcast to the
    # tiles' rank ([BKV, 1, 1, VEC] for the fma product, [1, BK] for the dot one). MASKED: only k0 + offs_k < k_hi.
    if MASKED:
        mask_k = k0 + offs_k < k_hi
        xt = tl.load(x_ptrs + k0, mask=mask_k, other=0.0)
        wt = tl.load(w_ptrs + k0, mask=mask_k, other=0.0)
    else:
        xt = tl.load(x_ptrs + k0)
        wt = tl.load(w_ptrs + k0)
    return xt, wt


@triton.jit
def _fma_step(acc, xt, wt):
    # acc [BKV, BN, BT] += sum over VEC (inside each thread) of x * w, both [BKV, BN, BT, VEC].
    return acc + tl.sum(xt.to(tl.float32) * wt.to(tl.float32), axis=3)


@triton.jit
def _fma_loop(x_ptr, stride_x_t, w_ptr, stride_w_n, tok, rows, k_lo, k_hi,
              BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
              PREFETCH: tl.constexpr, GDC: tl.constexpr, EARLY_W: tl.constexpr):
    # Sums over K in [k_lo, k_hi) → [BN, BT] fp32. Whole steps unmasked, then one masked step for the tail.
    # Layout (checked in the sm_90 TTGIR/SASS): x and W are both loaded at the product's full shape
    # [BKV, BN, BT, VEC], x broadcast over the rows and W over the tokens by zero strides. Both loads then get the
    # same layout: VEC (one 16-byte vector) inside a thread, then (Triton orders equally contiguous dimensions by
    # index) the threads of a warp along BKV (contiguous vectors of one row), warps along BKV and then the rows,
    # every thread holding all BT tokens of its rows; addresses repeated inside a thread are loaded once. Loaded
    # as 3-d tiles and broadcast, one of them went through shared memory (convert_layout, barriers) every step;
    # with the tokens before the rows, warps were spread over tokens and each loaded the whole W tile.
    BKV: tl.constexpr = BLOCK_K // VEC
    offs_k = tl.arange(0, BKV)[:, None] * VEC + tl.arange(0, VEC)[None, :]  # [BKV, VEC]
    offs_k4 = offs_k[:, None, None, :]  # at the tiles' rank
    zero_n = tl.zeros([BLOCK_N], tl.int32)
    zero_t = tl.zeros([BLOCK_T], tl.int64)
    x_ptrs = (x_ptr + k_lo + offs_k4 + zero_n[None, :, None, None]
              + tok[None, None, :, None] * stride_x_t)
    w_ptrs = (w_ptr + k_lo + offs_k4 + rows.to(tl.int64)[None, :, None, None] * stride_w_n
              + zero_t[None, None, :, None])
    acc = tl.zeros([BKV, BLOCK_N, BLOCK_T], tl.float32)
    n_full = tl.maximum(k_hi - k_lo, 0) // BLOCK_K
    done = 0  # whole steps done before the loop
    if EARLY_W > 0 and not PREFETCH:
        # Steps 0 (and 1 when EARLY_W = 2), masked to the split's range (which may be shorter), with their weights
        # loaded before the PDL wait.
        m0 = offs_k4 < k_hi - k_lo
        w0 = tl.load(w_ptrs, mask=m0, other=0.0)
        if EARLY_W > 1:
            m1 = offs_k4 + BLOCK_K < k_hi - k_lo
            w1 = tl.load(w_ptrs + BLOCK_K, mask=m1, other=0.0)
        wait_for_predecessor(GDC)
        acc = _fma_step(acc, tl.load(x_ptrs, mask=m0, other=0.0), w0)
        done = 1
        if EARLY_W > 1:
            acc = _fma_step(acc, tl.load(x_ptrs + BLOCK_K, mask=m1, other=0.0), w1)
            done = 2
    else:
        wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written
    if PREFETCH:
        if n_full > 0:
            xn, wn = _load_step(x_ptrs, w_ptrs, offs_k4, 0, 0, False)
            for i in range(n_full):
                xt, wt = xn, wn
                # the next step's tiles are in flight during this step's FMAs (the last step reloads itself)
                xn, wn = _load_step(x_ptrs, w_ptrs, offs_k4, tl.minimum(i + 1, n_full - 1) * BLOCK_K, 0, False)
                acc = _fma_step(acc, xt, wt)
    else:
        for i in range(done, n_full):
            xt, wt = _load_step(x_ptrs, w_ptrs, offs_k4, i * BLOCK_K, 0, False)
            acc = _fma_step(acc, xt, wt)
    k_tail = tl.maximum(n_full, done) * BLOCK_K  # (a split shorter than the early steps was all in them)
    if k_lo + k_tail < k_hi:
        xt, wt = _load_step(x_ptrs, w_ptrs, offs_k4, k_tail, k_hi - k_lo, True)
        acc = _fma_step(acc, xt, wt)
    return tl.sum(acc, axis=0)


@triton.jit
def _dot_step(acc, xt, wt, DOT_F32: tl.constexpr):
    # acc [BN, BT] += w [BN, BK] @ x^T [BK, BT]: W is the wide (M) operand, the tokens the narrow one.
    if DOT_F32:
        return tl.dot(wt.to(tl.float32), tl.trans(xt.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(wt, tl.trans(xt), acc)


@triton.jit
def _dot_loop(x_ptr, stride_x_t, w_ptr, stride_w_n, tok, rows, k_lo, k_hi,
              BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_x_t + k_lo + offs_k[None, :]
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_w_n + k_lo + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
    n_full = tl.maximum(k_hi - k_lo, 0) // BLOCK_K
    for i in range(n_full):
        xt, wt = _load_step(x_ptrs, w_ptrs, offs_k[None, :], i * BLOCK_K, 0, False)
        acc = _dot_step(acc, xt, wt, DOT_F32)
    k_tail = n_full * BLOCK_K
    if k_lo + k_tail < k_hi:
        xt, wt = _load_step(x_ptrs, w_ptrs, offs_k[None, :], k_tail, k_hi - k_lo, True)
        acc = _dot_step(acc, xt, wt, DOT_F32)
    return acc


# ---- the kernel ------------------------------------------------------------------------------------------------

# y[t, n] = sum_k x[t, k] W[n, k] + b[n] for BN rows n of W, all T tokens, K range pid_s of SPLIT_K.
# part: [SPLIT_K, T, N] fp32 partials; cnt: [cdiv(N, BN)] int32 counters at 0 (used only when SPLIT_K > 1).
@triton.jit
def _gemv_kernel(x_ptr, stride_x_t, w_ptr, stride_w_n, b_ptr, y_ptr, stride_y_t, part_ptr, cnt_ptr,
                 T, N, K,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, VEC: tl.constexpr,
                 PREFETCH: tl.constexpr, GDC: tl.constexpr = False, EARLY_STATIC: tl.constexpr = False,
                 EARLY_W: tl.constexpr = 1):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    # Rows past N and tokens past T read the last one again (loads stay unmasked); their outputs are not stored.
    rows = tl.minimum(offs_n, N - 1)
    tok = tl.minimum(offs_t, T - 1)
    if HAS_BIAS and EARLY_STATIC:  # static: loaded while the predecessor finishes (pdl.EARLY_STATIC)
        bias = tl.load(b_ptr + rows).to(tl.float32)
    if USE_DOT:
        wait_for_predecessor(GDC)  # PDL (pdl.py): before any activation is read or written (_fma_loop waits itself)
    # K range of this split: whole steps of BK, the last split the shortest (possibly empty).
    per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_s * per
    k_hi = tl.minimum(k_lo + per, K)
    if USE_DOT:
        acc = _dot_loop(x_ptr, stride_x_t, w_ptr, stride_w_n, tok, rows, k_lo, k_hi,
                        BLOCK_T, BLOCK_N, BLOCK_K, DOT_F32)
    else:
        acc = _fma_loop(x_ptr, stride_x_t, w_ptr, stride_w_n, tok, rows, k_lo, k_hi,
                        BLOCK_T, BLOCK_N, BLOCK_K, VEC, PREFETCH, GDC, EARLY_W)
    # acc: [BN, BT] sums of this split.
    mask_y = (offs_n < N)[:, None] & (offs_t < T)[None, :]
    y_ptrs = y_ptr + offs_n[:, None] + offs_t[None, :] * stride_y_t
    if SPLIT_K == 1:
        if HAS_BIAS:
            if not EARLY_STATIC:
                bias = tl.load(b_ptr + rows).to(tl.float32)
            acc += bias[:, None]
        tl.store(y_ptrs, _cast(acc, y_ptr.dtype.element_ty), mask=mask_y)
    else:
        part_ptrs = part_ptr + rows[:, None] + offs_t[None, :] * N
        tl.store(part_ptrs + pid_s * T * N, acc, mask=mask_y)
        cnt_ptrs = cnt_ptr + pid_n
        if last_to_arrive(cnt_ptrs, SPLIT_K):
            y = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
            for s in tl.static_range(SPLIT_K):  # split order, whichever program came last
                y += tl.load(part_ptrs + s * T * N, mask=mask_y, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                if not EARLY_STATIC:
                    bias = tl.load(b_ptr + rows).to(tl.float32)
                y += bias[:, None]
            tl.store(y_ptrs, _cast(y, y_ptr.dtype.element_ty), mask=mask_y)
            tl.store(cnt_ptrs, 0)  # ready for the next launch (and the next graph replay)


# ---- configs and policy ------------------------------------------------------------------------------------------

def fma(BLOCK_N: int, BLOCK_K: int, SPLIT_K: int = 1, num_warps: int = 4, PREFETCH: int = 0) -> dict:
    """A config of the CUDA-core product (T <= 8)."""
    return dict(DOT=False, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SPLIT_K=SPLIT_K, num_warps=num_warps,
                PREFETCH=PREFETCH)


def dot(BLOCK_N: int, BLOCK_K: int, SPLIT_K: int = 1, num_warps: int = 4, num_stages: int = 3) -> dict:
    """A config of the tensor-core product (BLOCK_N >= 16; tokens padded to >= 16)."""
    return dict(DOT=True, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SPLIT_K=SPLIT_K, num_warps=num_warps,
                num_stages=num_stages)


def config_name(cfg: dict) -> str:
    if cfg["DOT"]:
        return (f"dot(BN{cfg['BLOCK_N']} BK{cfg['BLOCK_K']} S{cfg['SPLIT_K']} w{cfg['num_warps']} "
                f"st{cfg['num_stages']})")
    return f"fma(BN{cfg['BLOCK_N']} BK{cfg['BLOCK_K']} S{cfg['SPLIT_K']} w{cfg['num_warps']} pf{cfg['PREFETCH']})"


def config_code(cfg: dict) -> str:
    """The config as the call that makes it (what a CONFIGS line holds), trailing defaults left out."""
    if cfg["DOT"]:
        name, args, defaults = "dot", [cfg["SPLIT_K"], cfg["num_warps"], cfg["num_stages"]], [1, 4, 3]
    else:
        name, args, defaults = "fma", [cfg["SPLIT_K"], cfg["num_warps"], cfg["PREFETCH"]], [1, 4, 0]
    while args and args[-1] == defaults[len(args) - 1]:
        args.pop()
    return f"{name}({', '.join(str(a) for a in [cfg['BLOCK_N'], cfg['BLOCK_K'], *args])})"


T_BUCKETS = (1, 2, 4, 8, 64)  # a T uses the config of the smallest bucket >= T


def shape_class(N: int, K: int) -> str:
    """gpt-oss's dense layers by shape: router logits (N <= 256), unembedding (N >= 32768), QKV (N > K), output."""
    if N <= 256:
        return "router"
    if N >= 32768:
        return "unembed"
    return "qkv" if N > K else "out"


def t_bucket(T: int) -> int:
    for b in T_BUCKETS:
        if T <= b:
            return b
    raise ValueError(f"gemv: T = {T} tokens (at most {MAX_TOKENS})")


# Per shape class, the config of each T bucket: the winners of tests/benchmarks/gpu/dense_gemv.py on the H200
# (2026-12-01, torch 2.11 + triton 3.6; table in tests/benchmarks/results/h200-2026-12-01-dense-gemv.txt).
CONFIGS = {
    "router": {1: fma(8, 256, 12), 2: fma(8, 256, 12), 4: fma(4, 256, 12), 8: fma(4, 256, 12),
               64: dot(16, 128, 12)},
    "qkv": {1: fma(16, 512), 2: fma(16, 256, 2), 4: dot(128, 128, 4), 8: dot(64, 128, 2, 4, 4),
            64: dot(128, 128, 2, 8)},
    "out": {1: fma(8, 256, 4), 2: fma(8, 512, 2), 4: dot(64, 128, 4, 4, 4), 8: dot(64, 128, 4, 4, 4),
            64: dot(64, 128, 2, 4, 4)},
    "unembed": {1: fma(32, 256), 2: dot(128, 128), 4: dot(128, 128), 8: dot(128, 128), 64: dot(128, 128, 1, 8)},
}
# Per shape class, the largest T for which ``linear`` calls gemv (cuBLAS past it), as measured in the same run:
# router logits 1.6-2.0x cuBLAS up to T = 8, the output projection 1.1-1.3x (no split-K reduce kernel), QKV 1.04x
# at T = 1 only (cuBLAS wins from T = 2), the unembedding level (both at ~4.4 TB/s); cuBLAS wins every class at 64.
GEMV_MAX_T = {"router": 8, "qkv": 1, "out": 8, "unembed": 8}


def config_for(T: int, N: int, K: int) -> dict:
    return CONFIGS[shape_class(N, K)][t_bucket(T)]


def use_gemv(T: int, N: int, K: int) -> bool:
    """Whether ``linear`` runs ``gemv`` for T tokens through an (N, K) weight (a function of shapes alone, so it is
    fixed inside a CUDA graph)."""
    return 1 <= T <= GEMV_MAX_T[shape_class(N, K)]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The engine's dense layer: ``gemv`` where it beat cuBLAS (GEMV_MAX_T), ``F.linear`` elsewhere."""
    if x.dim() == 2 and use_gemv(x.shape[0], *weight.shape):
        return gemv(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


# ---- the wrapper ---------------------------------------------------------------------------------------------------

# Split-K scratch (fp32 partials, int32 counters at 0), one set per (device, N, T, SPLIT_K, BLOCK_N): the kernels of
# one stream run one after another, so every layer of a shape can share one set (24 QKV layers, one buffer), and
# each kernel leaves its counters at 0 for the next. Made by an eager call, outside any CUDA-graph capture, and
# never freed or replaced (a captured graph keeps their addresses).
_SCRATCH: dict = {}


def _scratch(store: dict, device, N: int, T: int, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    key = (str(device), N, T, cfg["SPLIT_K"], cfg["BLOCK_N"])
    have = store.get(key)
    if have is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"gemv: split-K scratch for N={N}, T={T}, {config_name(cfg)} must be made by one eager "
                               f"call with these shapes before a CUDA graph captures the kernel")
        part = torch.empty(cfg["SPLIT_K"], T, N, dtype=torch.float32, device=device)
        cnt = torch.zeros(triton.cdiv(N, cfg["BLOCK_N"]), dtype=torch.int32, device=device)
        have = store[key] = (part, cnt)
    return have


def check_config(cfg: dict, T: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_T, VEC) for cfg at T tokens of ``dtype``; ValueError for configs the kernel cannot run."""
    bn, bk, split = cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
    vec = VECTOR_BYTES * 8 // torch.finfo(dtype).bits
    if split < 1 or bn < 1 or bn & (bn - 1) or bk & (bk - 1):
        raise ValueError(f"gemv config {cfg}: BLOCK_N, BLOCK_K powers of two, SPLIT_K >= 1")
    if cfg["DOT"]:
        if bn < 16 or bk < 16:
            raise ValueError(f"gemv config {cfg}: the dot product needs BLOCK_N, BLOCK_K >= 16")
        return max(16, triton.next_power_of_2(T)), vec
    block_t = triton.next_power_of_2(T)
    if block_t > FMA_MAX_BLOCK_T:
        raise ValueError(f"gemv config {cfg}: the fma product takes at most {FMA_MAX_BLOCK_T} tokens (T = {T})")
    if bk < vec or cfg.get("PREFETCH", 0) not in (0, 1):
        raise ValueError(f"gemv config {cfg}: BLOCK_K >= {vec} ({dtype}), PREFETCH 0 or 1")
    return block_t, vec


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, cfg: dict | None = None, *,
         out: torch.Tensor | None = None, scratch: dict | None = None) -> torch.Tensor:
    """``x W^T + b`` for a few token rows: (T, K) x (N, K) (+ (N,)) → (T, N) in x.dtype, W read once, one kernel.

    x and weight bfloat16 (or float16, float32: both the same dtype), 1 <= T <= MAX_TOKENS, x rows contiguous,
    weight contiguous; bias any float dtype (summed in fp32). fp32 accumulation, one rounding. No host
    synchronisation; CUDA-graph capturable once an eager call with the same shapes and config has made the split-K
    scratch (kept in ``scratch``, by default a module-level store shared by every layer of a shape). ``cfg``: from
    :func:`fma` / :func:`dot`, default :func:`config_for`. ``out``: (T, N) contiguous in x.dtype.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv: x {tuple(x.shape)} and weight {tuple(weight.shape)}: expected (T, K) and (N, K)")
    (T, K), N = x.shape, weight.shape[0]
    if x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"gemv: x {x.dtype} and weight {weight.dtype}: one of bfloat16, float16, float32 for both")
    if not 1 <= T <= MAX_TOKENS:
        raise ValueError(f"gemv: T = {T} tokens (1 .. {MAX_TOKENS}; more is a matrix product)")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"gemv: bias {tuple(bias.shape)} for N = {N}")
    if x.stride(1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()  # a no-op for prepared layers
    if bias is not None:
        bias = bias.contiguous()
    if out is None:
        out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    elif out.shape != (T, N) or out.dtype != x.dtype or out.stride() != (N, 1):
        raise ValueError(f"gemv: out must be a contiguous ({T}, {N}) {x.dtype} tensor")
    cfg = cfg or config_for(T, N, K)
    meta = _meta(cfg, T, x.dtype, bias is not None)
    if cfg["SPLIT_K"] > 1:
        part, cnt = _scratch(_SCRATCH if scratch is None else scratch, x.device, N, T, cfg)
    else:
        part, cnt = out, out  # unused
    grid = _grid(N, cfg)
    _gemv_kernel[grid](
        x, x.stride(0), weight, weight.stride(0), bias if bias is not None else weight, out, out.stride(0), part, cnt,
        T, N, K, **meta, **launch_options(x, grid))
    return out


def _grid(N: int, cfg: dict) -> tuple[int, int]:
    return triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"]  # (row tiles, K splits)


def _meta(cfg: dict, T: int, dtype: torch.dtype, has_bias: bool) -> dict:
    # The kernel's constexprs and launch options for cfg (checked).
    block_t, vec = check_config(cfg, T, dtype)
    return dict(BLOCK_T=block_t, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=cfg["SPLIT_K"],
                HAS_BIAS=has_bias, USE_DOT=cfg["DOT"], DOT_F32=_INTERPRET or dtype == torch.float32, VEC=vec,
                PREFETCH=int(cfg.get("PREFETCH", 0)), EARLY_STATIC=pdl.EARLY_STATIC, EARLY_W=EARLY_W,
                num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 1))


def compile_ahead(T: int, N: int, K: int, dtype: torch.dtype, bias_dtype: torch.dtype | None, cfg: dict) -> None:
    """Compile (on a GPU, without launching) the kernel that ``gemv`` launches for contiguous x (T, K) and weight
    (N, K) of ``dtype`` and a bias of ``bias_dtype`` (None: no bias), so that processes can compile in parallel
    into Triton's on-disk cache (the benchmark does). Triton specializes on the same values ``gemv`` passes."""
    meta = _meta(cfg, T, dtype, bias_dtype is not None)
    part, cnt = (torch.float32, torch.int32) if cfg["SPLIT_K"] > 1 else (dtype, dtype)
    _gemv_kernel.warmup(dtype, K, dtype, K, bias_dtype or dtype, dtype, N, part, cnt, T, N, K, grid=(1,), **meta,
                        **launch_options(torch.empty(0, device="cuda"), _grid(N, cfg)))
