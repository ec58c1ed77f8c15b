"""The building blocks of the suite: a :class:`Case` (one row of the grid), the context it runs in, and
the exceptions that turn into statuses.

A case names the op under test, the capabilities it needs (``requires``: claim tokens, see
:func:`unclaimed`), a hypothesis strategy over its shapes and values, explicit examples (the
boundaries that must always run) and a ``run(ctx, draw) -> Outcome`` that calls the engine and the
oracle on the same inputs and compares them with a derived bound.

Cases are built per engine (:class:`Limits`): every draw lies inside the engine's claims (head dims,
context, expert count, top-k, expert format), and each bounded claim's other side gets its own case
whose input lies just outside it (the engine must raise ``NotSupported``). Cases at gpt-oss's real
sizes are marked ``real_shape``: one layer of gpt-oss-20b/120b, the 201088-token vocabulary, 64-sequence
decode batches at 64/8 heads, contexts past 32k, and the experts at D = I = 2880 or with reductions of
4096+ (a GPU runs them in seconds, the float64 oracle on a CPU in about a minute per dtype; an engine run
by the Triton interpreter would take hours, hence ``shapes="small"``).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

import torch

from mxmoe.core.backend import OPS, Backend, Capabilities, NotSupported, dtype_name


class Status(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    NOT_SUPPORTED = "NOT_SUPPORTED"  # not claimed, and the engine correctly raised NotSupported
    WAIVED = "WAIVED"  # failed (or errored), but the vendor's waiver file gives a reason
    ERROR = "ERROR"  # the engine crashed
    NOT_RUN = "NOT_RUN"  # not run, and the message says why (never a pass: the run is then no certificate)


@dataclass(frozen=True)
class Profile:
    """Sizes and example counts. ``quick`` for pytest, ``full`` for certification runs, ``smoke`` the quick
    sizes with the explicit examples only."""

    name: str
    examples: int  # hypothesis examples per case (besides the explicit ones)
    long_context: int  # keys in the long-context attention case
    big_k: int  # reduction length of the long linear case
    model_tokens: int  # prompt tokens per sequence at level 3
    generate_tokens: int
    long_decode: tuple[int, ...] = (4096,)  # keys of the long-decode attention examples (one query row)


QUICK = Profile("quick", examples=3, long_context=300, big_k=4096, model_tokens=24, generate_tokens=8,
                long_decode=(4100,))
FULL = Profile("full", examples=12, long_context=1024, big_k=8192, model_tokens=48, generate_tokens=24,
               long_decode=(4100, 8192, 32768))
# The quick sizes, explicit examples only (no hypothesis draws): for engines that are slow to run here (an
# interpreter), as a smoke test of every case.
SMOKE = Profile("smoke", examples=0, long_context=300, big_k=4096, model_tokens=24, generate_tokens=8,
                long_decode=(4100,))
PROFILES = {"quick": QUICK, "full": FULL, "smoke": SMOKE}

# What the suite draws at most when a claim is unbounded: gpt-oss's own limits.
MODEL_MAX_CONTEXT = 131072  # initial_context_length 4096 × rope_scaling_factor 32
SUITE_MAX_EXPERTS = 128  # gpt-oss-120b
SUITE_MAX_TOP_K = 4  # experts_per_token of both models
# Claims that are properties, not calls: unclaimed means "not checked" (NOT_SUPPORTED without a refusal).
PROPERTY_TOKENS = ("determinism", "determinism:bitwise", "cuda_graphs", "mxfp4:native")


@dataclass(frozen=True)
class Limits:
    """What the grid may draw for one engine: inside its claims, capped at gpt-oss's sizes, and the first
    values just outside each bounded claim (None when the claim is unbounded)."""

    head_dims: tuple[int, ...]  # head dims of the op cases (each claimed one; 64 when any is claimed)
    model_head_dim: int  # head dim of the block and model configs
    max_context: int
    max_experts: int
    max_top_k: int
    expert_format: str  # "mxfp4" or "dense": how block and model cases store their experts
    sliding_window: bool
    outside_head_dim: int | None
    outside_context: int | None
    outside_experts: int | None
    outside_top_k: int | None

    @classmethod
    def of(cls, caps: Capabilities) -> "Limits":
        claimed = tuple(sorted(set(caps.head_dims))) if caps.head_dims else None
        outside_d = None if claimed is None else next(d for d in (16, 32, 64, 128, 256, 2 * max(claimed))
                                                      if d not in claimed)

        def cap(v: int | None, most: int) -> int:
            return most if v is None else max(1, min(v, most))

        return cls(head_dims=claimed or (64,), model_head_dim=min(claimed) if claimed else 16,
                   max_context=cap(caps.max_context, MODEL_MAX_CONTEXT),
                   max_experts=cap(caps.max_experts, SUITE_MAX_EXPERTS),
                   max_top_k=min(cap(caps.max_experts_per_token, SUITE_MAX_TOP_K), cap(caps.max_experts, 10 ** 6)),
                   expert_format="mxfp4" if caps.mxfp4 != "none" or not caps.dense_experts else "dense",
                   sliding_window=caps.sliding_window, outside_head_dim=outside_d,
                   outside_context=None if caps.max_context is None else caps.max_context + 1,
                   outside_experts=None if caps.max_experts is None else caps.max_experts + 1,
                   outside_top_k=None if caps.max_experts_per_token is None else caps.max_experts_per_token + 1)

    def experts(self, *values: int) -> list[int]:
        """The expert counts among ``values`` inside the claim (the claim's maximum when none is)."""
        inside = [v for v in values if v <= self.max_experts]
        return inside or [self.max_experts]

    def top_k(self, *values: int) -> list[int]:
        inside = [v for v in values if v <= self.max_top_k]
        return inside or [self.max_top_k]

    def contexts(self, *values: int) -> list[int]:
        return sorted({v for v in values if v <= self.max_context})



@dataclass
class Outcome:
    """What one example of a case measured: the worst element's observed error and its bound."""

    op: str  # the op the comparison blames
    observed: float
    bound: float
    ratio: float  # observed / bound at the worst element (inf: bound 0 and a difference)
    where: str = ""  # which output and element
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""  # set when the failure is not a plain numeric excess (wrong index, dtype, ...)

    @property
    def passed(self) -> bool:
        return self.ratio <= 1.0 and not self.message


class CaseFailure(Exception):
    """A comparison failed: carries the outcome and the draw that produced it."""

    def __init__(self, outcome: Outcome, draw: dict):
        super().__init__(describe(outcome))
        self.outcome, self.draw = outcome, draw


class NotRun(Exception):
    """Raised by a case that cannot run here (a CUDA-graph case on a CPU): status NOT_RUN, with the reason."""


class EngineRefused(Exception):
    def __init__(self, op: str, err: NotSupported):
        super().__init__(f"{op}: raised NotSupported: {err}")
        self.op, self.err = op, err


class EngineCrash(Exception):
    def __init__(self, op: str, err: BaseException):
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=-3))
        super().__init__(f"{op}: {type(err).__name__}: {err}")
        self.op, self.err, self.tb = op, err, tb


def describe(o: Outcome) -> str:
    if o.message:
        return f"{o.op}: {o.message}"
    return (f"{o.op}: error {o.observed:.3g} exceeds the bound {o.bound:.3g} (x{o.ratio:.3g})"
            + (f" at {o.where}" if o.where else ""))


def _reference() -> Backend:
    from mxmoe.backends.reference import TorchBackend

    return TorchBackend()


@dataclass
class Ctx:
    """What a case's ``run`` works with: the engine under test, its dtype/device, and the oracle; in block and
    model cases also the companion that serves the ops the engine does not claim (see :func:`serving`)."""

    engine: Backend
    oracle: Backend  # the reference engine, run in float64 on the CPU
    dtype: torch.dtype
    device: torch.device
    profile: Profile
    companion: Backend = field(default_factory=_reference)  # the reference, in ``dtype`` on ``device``
    companion_ops: tuple[str, ...] = ()  # the ops it serves in this case (set by the runner)

    @property
    def small_dtype(self) -> torch.dtype:
        # What the model hands engines for norm scales, sinks, rope frequencies: at least float32.
        return torch.promote_types(self.dtype, torch.float32)

    def call(self, op: str, fn: Callable, *args, **kwargs):
        """Call the engine: NotSupported → :class:`EngineRefused`, any other exception → :class:`EngineCrash`."""
        try:
            return fn(*args, **kwargs)
        except NotSupported as e:
            raise EngineRefused(op, e) from e
        except (EngineRefused, EngineCrash, CaseFailure):
            raise
        except Exception as e:  # noqa: BLE001 — an engine bug of any kind is an ERROR, with its text
            raise EngineCrash(op, e) from e

    def to_engine(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return t.to(device=self.device, dtype=dtype or self.dtype)

    def check_tensor(self, op: str, out: Any, shape: tuple, dtype: torch.dtype | None = None,
                     what: str = "output") -> torch.Tensor:
        """The engine's output must be a tensor of the right shape, dtype and device."""
        dtype = dtype or self.dtype
        if not isinstance(out, torch.Tensor):
            raise CaseFailure(Outcome(op, 0, 0, float("inf"), message=f"{what} is {type(out).__name__}, not a tensor"), {})
        problems = []
        if tuple(out.shape) != tuple(shape):
            problems.append(f"shape {tuple(out.shape)}, expected {tuple(shape)}")
        if out.dtype != dtype:
            problems.append(f"dtype {dtype_name(out.dtype)}, expected {dtype_name(dtype)} (the claimed dtype under test)")
        if out.device.type != self.device.type:
            problems.append(f"device {out.device}, expected {self.device}")
        if problems:
            raise CaseFailure(Outcome(op, 0, 0, float("inf"), message=f"{what} has " + "; ".join(problems)), {})
        return out


@dataclass(frozen=True)
class Case:
    level: str  # "L0" .. "L4"
    op: str  # the op (or "interface", "block", "model") under test
    name: str
    run: Callable[[Ctx, dict], Outcome] = field(compare=False, repr=False)
    strategy: Callable[[Profile], Any] | None = field(default=None, compare=False, repr=False)  # → hypothesis strategy of draws
    examples: tuple[dict, ...] = ()  # explicit draws, always run first (boundaries)
    requires: tuple[str, ...] = ()  # claim tokens
    dtype: str | None = None  # activation dtype under test (None: dtype-independent)
    description: str = ""
    exact: bool = False  # bit-exact comparison (bound 0)
    max_examples: int | None = None  # cap on hypothesis draws (expensive cases)
    real_shape: bool = False  # at gpt-oss's real sizes (excluded by ``shapes="small"``, then NOT_RUN)
    companion: bool = False  # blocks and the model: ops the engine does not claim go to the companion

    @property
    def ops(self) -> tuple[str, ...]:
        """The ops the case calls (its ``op:NAME`` tokens)."""
        return tuple(t[3:] for t in self.requires if t.startswith("op:"))

    @property
    def id(self) -> str:
        base = f"{self.level}/{self.op}/{self.name}"
        return f"{base}@{self.dtype}" if self.dtype else base


def unclaimed(caps: Capabilities, token: str) -> str | None:
    """None when ``caps`` claims ``token``; otherwise a phrase naming what is not claimed.

    Tokens: ``op:NAME``, ``dtype:NAME``, ``device:TYPE``, ``sinks``, ``sliding_window``, ``mxfp4``,
    ``dense_experts``, ``head_dim:N``, ``experts:N``, ``experts_per_token:N``, ``context:N``, and the
    properties (:data:`PROPERTY_TOKENS`) ``determinism``, ``determinism:bitwise``, ``cuda_graphs``,
    ``mxfp4:native``.
    """
    kind, _, arg = token.partition(":")
    if kind == "op":
        return None if arg in caps.ops else f"op {arg!r}"
    if kind == "dtype":
        return None if arg in caps.dtypes else f"dtype {arg}"
    if kind == "device":
        return None if arg in caps.devices else f"device {arg}"
    if kind == "sinks":
        return None if caps.attention_sinks else "attention sinks"
    if kind == "sliding_window":
        return None if caps.sliding_window else "sliding-window attention"
    if kind == "mxfp4" and arg == "native":
        return None if caps.mxfp4 == "native" else f"MXFP4 experts kept 4-bit (claims mxfp4={caps.mxfp4!r})"
    if kind == "mxfp4":
        return None if caps.mxfp4 != "none" else "MXFP4 experts"
    if kind == "dense_experts":
        return None if caps.dense_experts else "dense (bf16) experts"
    if kind == "head_dim":
        return None if caps.head_dims is None or int(arg) in caps.head_dims else f"head_dim {arg}"
    if kind == "experts":
        return None if caps.max_experts is None or int(arg) <= caps.max_experts else f"{arg} experts"
    if kind == "experts_per_token":
        return None if caps.max_experts_per_token is None or int(arg) <= caps.max_experts_per_token \
            else f"{arg} experts per token"
    if kind == "determinism" and arg == "bitwise":
        return None if caps.determinism == "bitwise" else f"bitwise determinism (claims {caps.determinism!r})"
    if kind == "determinism":  # a property, not a call: unclaimed means "not checked"
        return None if caps.determinism != "none" else "determinism"
    if kind == "cuda_graphs":
        return None if caps.cuda_graphs else "CUDA-graph capture"
    if kind == "context":
        return None if caps.max_context is None or int(arg) <= caps.max_context else f"context of {arg} tokens"
    raise ValueError(f"unknown claim token {token!r}")


# ---- the companion: block and model cases of an engine that serves only some ops ---------------------------

# The ops whose calls a claim token limits (see Backend.check_claims): an engine must claim a token when it
# serves one of them. Not listed (dtype, device, the properties): every op, so the engine and the companion
# must both claim them; a property of the whole graph (CUDA-graph capture, determinism) is checked only
# where every backend serving the graph claims it.
TOKEN_OPS: dict[str, tuple[str, ...]] = {
    "sinks": ("attention",), "sliding_window": ("attention",),
    "head_dim": ("rope", "attention"), "context": ("rope", "attention"),  # a max_context covers RoPE positions
    "mxfp4": ("experts",), "dense_experts": ("experts",),
    "experts": ("router", "experts"), "experts_per_token": ("router", "experts"),
}


def token_ops(token: str) -> tuple[str, ...] | None:
    """The ops ``token`` limits (None: every op)."""
    kind, _, arg = token.partition(":")
    return (arg,) if kind == "op" else TOKEN_OPS.get(kind)


@dataclass(frozen=True)
class Serving:
    """Who serves a case's ops: the engine, and the companion for the ops the engine does not claim."""

    requires: tuple[str, ...]  # the claim tokens the engine must hold (the case's, less the companion's)
    companion_ops: tuple[str, ...] = ()
    note: str = ""  # why the companion is not used although the engine claims only some of the ops


def serving(case: Case, caps: Capabilities, companion: Capabilities, device: str) -> Serving:
    """How a case runs for an engine claiming ``caps``. Block and model cases (``case.companion``) of an
    engine that claims at least one but not all of their ops run with the companion (claiming
    ``companion``) serving the rest, when it claims what those ops need (their tokens, the dtype, the
    properties, the ``device`` type); the engine must then claim the tokens of its own ops only. Any other
    case needs every token from the engine (and, claiming none, must refuse)."""
    own = [op for op in case.ops if op in caps.ops]
    rest = tuple(op for op in case.ops if op not in caps.ops)
    if not case.companion or not own or not rest:
        return Serving(case.requires)

    def limits(token: str, ops) -> bool:
        owners = token_ops(token)
        return owners is None or any(op in ops for op in owners)

    gaps = [m for t in (f"device:{device}",) + case.requires if limits(t, rest) and (m := unclaimed(companion, t))]
    if gaps:
        return Serving(case.requires, note=f"the companion cannot serve {', '.join(rest)} ({', '.join(gaps)})")
    return Serving(tuple(t for t in case.requires if limits(t, own)), rest)


def ops_for(ctx: Ctx, engine: Backend | None = None) -> dict[str, Backend]:
    """The backend serving each op in a block or model case: the engine (or ``engine``, another instance of
    it), and the companion for ``ctx.companion_ops``."""
    engine = engine or ctx.engine
    return {op: ctx.companion if op in ctx.companion_ops else engine for op in OPS}


def claim_tokens(caps: Capabilities) -> list[str]:
    """Every token the manifest claims that a case can exercise (for L0's coverage check): features, head
    dims, each bounded claim at its (capped) maximum, and the claimed properties."""
    lim = Limits.of(caps)
    toks = [f"op:{o}" for o in caps.ops] + [f"dtype:{d}" for d in caps.dtypes]
    if caps.attention_sinks:
        toks.append("sinks")
    if caps.sliding_window:
        toks.append("sliding_window")
    if caps.mxfp4 != "none":
        toks.append("mxfp4")
    if caps.mxfp4 == "native":
        toks.append("mxfp4:native")
    if caps.dense_experts:
        toks.append("dense_experts")
    for h in caps.head_dims or ():
        toks.append(f"head_dim:{h}")
    if caps.max_experts is not None:
        toks.append(f"experts:{lim.max_experts}")
    if caps.max_experts_per_token is not None:
        toks.append(f"experts_per_token:{lim.max_top_k}")
    if caps.max_context is not None:
        toks.append(f"context:{lim.max_context}")
    if caps.cuda_graphs:
        toks.append("cuda_graphs")
    if caps.determinism != "none":
        toks.append("determinism")
    if caps.determinism == "bitwise":
        toks.append("determinism:bitwise")
    return toks
