"""Dropless MoE (MegaBlocks' dMoE) in plain PyTorch: the megablocks engine's CPU path and the specification
of its Triton kernels (kernels.py), plus the weight layouts: experts dequantized at load, or per layer into a
reusable workspace.

    (token, slot) pairs ─sort by expert─▶ histogram + prefix sums ─▶ rows gathered expert-contiguous
      ─▶ grouped matmul mlp1 (+ bias) ─▶ SwiGLU ─▶ grouped matmul mlp2 (+ bias) ─▶ × routing weight
      ─▶ scattered back to (token, slot) ─▶ Σ over each token's slots

No capacity factor: every pair gets its row, so no token is ever dropped, however skewed the routing.

Shape legend: T tokens, k experts per token, P = T·k (token, expert) pairs, E experts, D hidden,
I intermediate, N/K a linear layer's out/in features.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from mxmoe.backends.reference import swiglu
from mxmoe.core import mxfp4
from mxmoe.core.weights import ExpertLinear

WeightMode = Literal["resident", "workspace"]
Kernel = Literal["torch", "grouped_mm", "triton"]

# Under ``auto``, a layer's experts are dequantized at load only while this share of the device's memory
# stays free afterwards (KV cache, activations, the workspace if later layers need it).
RESERVE_FRACTION = 0.15
# Routed experts dequantized per call into the workspace are done this many at a time (bounds the
# temporary that core/mxfp4.dequantize allocates).
DEQUANT_CHUNK = 8


# ---- routing: sort, histogram, prefix sums ---------------------------------------------------------------

@dataclass(frozen=True)
class Routing:
    """The (token, slot) pairs of one experts call, sorted by expert (row p of the sorted order).

    Within a token, slots are taken in ascending expert id, so summing a token's slots in slot order adds
    its experts in the order the reference engine does (lowest expert first): the torch path is
    bit-identical to it.
    """

    pair: torch.Tensor  # (P,) int64: sorted row p holds pair pair[p] = t·k + j (j-th lowest expert of token t)
    token: torch.Tensor  # (P,) int64: token of sorted row p
    expert: torch.Tensor  # (P,) int64: expert of sorted row p, non-decreasing
    weight: torch.Tensor  # (P,) routing weight of sorted row p (the router's dtype)
    counts: torch.Tensor  # (E,) int64: rows per expert (the histogram)
    offsets: torch.Tensor  # (E+1,) int64: expert e owns sorted rows offsets[e]:offsets[e+1] (prefix sums)
    num_tokens: int
    top_k: int

    @property
    def num_rows(self) -> int:
        return self.num_tokens * self.top_k

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]


def sort_by_expert(expert_weights: torch.Tensor, expert_indices: torch.Tensor, num_experts: int) -> Routing:
    """(T, k) weights and distinct expert ids per token → :class:`Routing`. No host synchronisation."""
    T, k = expert_indices.shape
    idx, order = expert_indices.sort(dim=1)  # ids are distinct per token: no ties to break
    w = expert_weights.gather(1, order)
    flat = idx.reshape(-1)  # (P,) pair t·k + j → its expert
    # Stable: within an expert, rows stay in token order (as the reference's nonzero() lists them).
    pair = torch.argsort(flat, stable=True)
    # scatter_add_ rather than bincount: bincount sizes its output from the data (a host sync on CUDA),
    # and an out-of-range id raises here instead of growing the histogram.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offsets = F.pad(counts.cumsum(0), (1, 0))
    return Routing(pair=pair, token=pair // k, expert=flat[pair], weight=w.reshape(-1)[pair], counts=counts,
                   offsets=offsets, num_tokens=T, top_k=k)


def combine(y: torch.Tensor, routing: Routing, out_dtype: torch.dtype) -> torch.Tensor:
    """Weighted expert outputs of the pairs, (P, D) indexed by pair (t·k + j), float32 → (T, D) ``out_dtype``.

    Each token's slots are summed in slot order, starting from +0 (as the reference's index_add_ into
    zeros), in float32: deterministic, no atomics.
    """
    T, k = routing.num_tokens, routing.top_k
    by_token = y.view(T, k, -1)
    out = torch.zeros(T, y.shape[1], dtype=torch.float32, device=y.device)
    for j in range(k):
        out += by_token[:, j]
    return out.to(out_dtype)


# ---- grouped matmul: the plain-PyTorch reference and the torch._grouped_mm path ------------------------

def grouped_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Expert-contiguous rows times their expert: x (P, K), w (E, N, K), b (E, N) → (P, N) in x's dtype.

    Loops over the experts that received rows, one ``F.linear`` on each contiguous segment (a host sync
    for the segment bounds). Rows of expert e are offsets[e]:offsets[e+1].
    """
    out = x.new_empty(x.shape[0], w.shape[1])
    bounds = routing.offsets.tolist()
    for e in range(routing.num_experts):
        start, end = bounds[e], bounds[e + 1]
        if start < end:
            out[start:end] = F.linear(x[start:end], w[e], b[e])
    return out


def grouped_linear_grouped_mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Same contract as :func:`grouped_linear`, through ``torch._grouped_mm`` (one launch, no host sync)."""
    ends = routing.offsets[1:].to(torch.int32)
    y = torch._grouped_mm(x, w.transpose(1, 2), offs=ends)  # w per expert (K, N), column-major
    return y + b[routing.expert]


def grouped_mm_usable(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether ``torch._grouped_mm`` serves this device and dtype here (checked by running it once)."""
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no torch._grouped_mm"
    if device.type == "cuda" and dtype != torch.bfloat16:
        return False, "torch._grouped_mm on CUDA takes bfloat16 only"
    try:
        x = torch.ones(3, 16, dtype=dtype, device=device)
        w = torch.ones(2, 16, 16, dtype=dtype, device=device)
        y = torch._grouped_mm(x, w.transpose(1, 2), offs=torch.tensor([1, 3], dtype=torch.int32, device=device))
        if not bool((y == 16).all()):
            return False, "torch._grouped_mm gave wrong numbers on a probe"
    except Exception as e:  # noqa: BLE001 — any failure means "not here", with the reason
        return False, f"torch._grouped_mm failed on {device.type}/{dtype}: {type(e).__name__}: {e}"
    return True, ""


# ---- the whole layer -------------------------------------------------------------------------------------

def dropless_moe(x: torch.Tensor, expert_weights: torch.Tensor, expert_indices: torch.Tensor,
                 w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                 swiglu_alpha: float, swiglu_limit: float, kernel: Kernel = "torch",
                 routing: Routing | None = None) -> torch.Tensor:
    """(T, D) → (T, D) = Σ_k w_tk · mlp2_e(SwiGLU(mlp1_e(x_t))) with every (token, expert) pair computed.

    w1 (E, 2I, D) gate/linear rows interleaved, b1 (E, 2I), w2 (E, D, I), b2 (E, D), all in x's dtype.
    ``kernel``: "torch" (a loop over non-empty experts), "grouped_mm" (torch._grouped_mm) or "triton"
    (kernels.py: gather fused into mlp1, SwiGLU into its epilogue, weights and scatter into mlp2's).
    """
    T, D = x.shape
    if routing is None:
        routing = sort_by_expert(expert_weights, expert_indices, w1.shape[0])
    if kernel == "triton":
        from .kernels import moe_mlp1_swiglu, moe_mlp2, tile_schedule

        schedule = tile_schedule(routing)
        h = moe_mlp1_swiglu(x, w1, b1, routing, swiglu_alpha, swiglu_limit, schedule)  # (P, I)
        y = moe_mlp2(h, w2, b2, routing, schedule)  # (P, D) float32, weighted, indexed by pair
        return combine(y, routing, x.dtype)
    linear = grouped_linear_grouped_mm if kernel == "grouped_mm" else grouped_linear
    xs = x[routing.token]  # (P, D) expert-contiguous
    h = swiglu(linear(xs, w1, b1, routing), swiglu_alpha, swiglu_limit)  # (P, I)
    y = linear(h, w2, b2, routing)  # (P, D)
    weighted = (y * routing.weight[:, None]).to(torch.float32)  # rounded like the reference's, then widened
    by_pair = torch.empty_like(weighted)
    by_pair[routing.pair] = weighted  # the scatter back to (token, slot)
    return combine(by_pair, routing, x.dtype)


# ---- weights: dequantized at load, or per layer into a workspace ------------------------------------------

class Workspace:
    """Dense buffers shared by every workspace-mode layer of one engine instance: (E, N, K) per linear.

    A layer dequantizes its *routed* experts into it before each call; rows of unrouted experts hold another
    layer's (or no) weights and are never read (no rows point at them). NaN-filled when allocated, so a
    read of a slot nobody wrote shows.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        buf = self.buffers.get(key)
        if buf is None or any(a < b for a, b in zip(buf.shape, shape)):
            grown = tuple(max(a, b) for a, b in zip(buf.shape, shape)) if buf is not None else tuple(shape)
            self.buffers[key] = None  # free the old buffer before allocating the larger one
            buf = torch.full(grown, float("nan"), dtype=dtype, device=device)
            self.buffers[key] = buf
        return buf[:shape[0], :shape[1], :shape[2]]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values() if b is not None)


@dataclass
class MegaBlocksExperts:
    """One layer's experts as the megablocks engine keeps them (what ``prepare_experts`` returns).

    ``mode`` "resident": ``w1``/``w2`` dense in the activation dtype since load (MXFP4 dequantized exactly).
    ``mode`` "workspace": ``mlp1``/``mlp2`` stay MXFP4 on the device; each call dequantizes the routed
    experts into ``workspace`` (exactly, by core/mxfp4.dequantize) and multiplies there.
    """

    mode: WeightMode
    dtype: torch.dtype
    num_experts: int
    b1: torch.Tensor  # (E, 2I)
    b2: torch.Tensor  # (E, D)
    w1: torch.Tensor | None = None  # (E, 2I, D), resident
    w2: torch.Tensor | None = None  # (E, D, I), resident
    mlp1: ExpertLinear | None = None  # packed, workspace mode
    mlp2: ExpertLinear | None = None
    workspace: Workspace | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes this layer holds on its device (not counting the shared workspace)."""
        ts = [self.b1, self.b2, self.w1, self.w2]
        for e in (self.mlp1, self.mlp2):
            if e is not None:
                ts += [e.blocks, e.scales]
        return sum(t.nbytes for t in ts if t is not None)

    def dense_weights(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1, w2) dense (E, N, K) with at least the routed experts' rows valid."""
        if self.mode == "resident":
            return self.w1, self.w2
        assert self.mlp1 is not None and self.mlp2 is not None and self.workspace is not None
        device = self.b1.device
        w1 = self.workspace.get("mlp1", (self.num_experts, self.mlp1.out_features, self.mlp1.in_features),
                                self.dtype, device)
        w2 = self.workspace.get("mlp2", (self.num_experts, self.mlp2.out_features, self.mlp2.in_features),
                                self.dtype, device)
        # Only the experts that received rows (a host sync: this mode trades speed for memory).
        routed = torch.nonzero(routing.counts).flatten()
        for i in range(0, routed.numel(), DEQUANT_CHUNK):
            ids = routed[i:i + DEQUANT_CHUNK]
            for lin, ws in ((self.mlp1, w1), (self.mlp2, w2)):
                ws.index_copy_(0, ids, mxfp4.dequantize(lin.blocks[ids], lin.scales[ids], self.dtype))
        return w1, w2


def dense_bytes(mlp1: ExpertLinear, mlp2: ExpertLinear, dtype: torch.dtype) -> int:
    """Bytes of one layer's experts dense in ``dtype``."""
    size = torch.empty((), dtype=dtype).element_size()
    return size * sum(e.num_experts * e.out_features * e.in_features for e in (mlp1, mlp2))


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of the device's memory, or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    if device.type == "cpu":
        try:
            info = {}
            with open("/proc/meminfo") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    info[key] = int(rest.split()[0]) * 1024
            return info["MemAvailable"], info["MemTotal"]
        except (OSError, KeyError, ValueError, IndexError):
            pass
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
        except (ValueError, OSError, AttributeError):
            return None
    return None


def choose_mode(layer_bytes: int, workspace_bytes: int, memory: tuple[int, int] | None) -> WeightMode:
    """``auto``'s choice for one layer: resident while, after dequantizing it, the workspace (needed if a
    later layer does not fit) and RESERVE_FRACTION of the device would still be free; unknown memory → resident."""
    if memory is None:
        return "resident"
    free, total = memory
    return "resident" if layer_bytes + workspace_bytes + RESERVE_FRACTION * total <= free else "workspace"
