"""Running the grid: claim check, hypothesis-driven inputs, engine vs oracle, status per case.

For each case: if the manifest does not claim what the case needs, the engine must raise
``NotSupported`` (→ NOT_SUPPORTED; numbers instead → FAIL); a claimed *property* that is not claimed
(determinism, CUDA graphs, 4-bit experts) is simply not checked (NOT_SUPPORTED). Otherwise the case's
explicit examples run first, then hypothesis draws (``derandomize=True`` for certification: a fixed
stream that every rerun repeats; otherwise ``seed``, printed so any failure replays with ``--seed``).
The first failing draw stops the case (no shrinking unless asked: every draw runs the engine).

Block and model cases (L2, L3) of an engine that claims only some of their ops (megablocks: attention,
router, experts; many engines: experts alone) run as users run such an engine, next to another for the
rest: the ops it does not claim are served by the COMPANION, the reference engine in the case's dtype on
the same device (case.serving). The engine must then claim only the tokens of its own ops (dtype, head dim,
experts, ...); the result names the companion's ops. An engine that claims none of a case's ops, or all of
them, is checked as before (refuse / run alone). Properties stay the engine's claims: the companion claims
bitwise determinism (it hides no nondeterminism) but not CUDA-graph capture, so cuda_graph_decode never
runs with it.

NOT_RUN (never a pass, and the report is then no certificate): real-shape cases under
``shapes="small"`` (allowed off CUDA only: a way to check an engine that runs in the Triton
interpreter), cases that need another device (CUDA graphs on a CPU), and every case after the first
failure under ``fail_fast``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import fnmatch
import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from hypothesis import HealthCheck, Phase, Verbosity, example, given, settings
from hypothesis import seed as hyp_seed

from mxmoe.core.backend import BACKEND_API_VERSION, Backend, dtype_name, parse_dtype

from . import SUITE_VERSION
from .case import (PROFILES, PROPERTY_TOKENS, Case, CaseFailure, Ctx, EngineCrash, EngineRefused, Limits, NotRun,
                   Outcome, Profile, Status, describe, serving, unclaimed)
from .report import (BackendIdentity, CaseResult, Companion, Report, RunSettings, Summary, capabilities_hash,
                     environment, summarize)

LEVELS = ("L0", "L1", "L2", "L3", "L4")
DEFAULT_LEVELS = ("L0", "L1", "L2", "L3")  # L4 needs real weights
PASSING = (Status.PASS, Status.NOT_SUPPORTED, Status.WAIVED)
SHAPES = ("all", "small")  # "small": real-shape cases are not run (NOT_RUN); refused on CUDA devices


class WaiverError(ValueError):
    pass


def load_waivers(path: str | Path | None) -> dict[str, str]:
    """A waiver file: JSON ``{"waivers": [{"case": ID_OR_GLOB, "reason": TEXT}, ...]}`` (or ``{ID: reason}``).
    Every waiver needs a non-empty reason."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WaiverError(f"waiver file {path}: {e}") from None
    items = data.get("waivers", data) if isinstance(data, dict) else data
    if isinstance(items, dict):
        items = [{"case": k, "reason": v} for k, v in items.items()]
    out = {}
    for i, w in enumerate(items):
        if not isinstance(w, dict) or not isinstance(w.get("case"), str) or not str(w.get("reason") or "").strip():
            raise WaiverError(f"waiver file {path}: entry {i} needs a 'case' and a non-empty 'reason', found {w!r}")
        out[w["case"]] = str(w["reason"]).strip()
    return out


def _waiver(waivers: dict[str, str], case_id: str) -> str | None:
    for pattern, reason in waivers.items():
        if pattern == case_id or fnmatch.fnmatchcase(case_id, pattern):
            return reason
    return None


def build_grid(engine: Backend, *, levels: Sequence[str], dtypes: Sequence[str], profile: Profile,
               check_registration: bool = False, weights_path: str | None = None) -> list[Case]:
    from . import blocks, interface, model, ops, real_weights

    lim = Limits.of(engine.capabilities)  # every case draws inside the engine's claims
    grid: list[Case] = []
    if "L0" in levels:
        grid += interface.cases(engine, dtypes, profile, check_registration)
    for dt in dtypes:
        if "L1" in levels:
            grid += ops.cases(dt, lim, profile)
        if "L2" in levels:
            grid += blocks.cases(dt, profile, lim)
        if "L3" in levels:
            grid += model.cases(dt, profile, lim)
        if "L4" in levels:
            grid += real_weights.cases(dt, profile, weights_path)
    return grid


def not_run(case: Case, reason: str, replay: str = "") -> CaseResult:
    """The result of a case that was not run, saying why."""
    return CaseResult(id=case.id, level=case.level, op=case.op, name=case.name, dtype=case.dtype,
                      description=case.description, requires=list(case.requires), status=Status.NOT_RUN,
                      message=f"not run: {reason}", exact=case.exact, real_shape=case.real_shape, replay=replay)


def run_case(case: Case, ctx: Ctx, *, derandomize: bool, seed: int, shrink: bool = False,
             replay: str = "", shapes: str = "all") -> CaseResult:
    t0 = time.perf_counter()
    if case.real_shape and shapes == "small":
        return not_run(case, "a real-shape case, excluded by shapes='small' (--shapes small)", replay)
    caps = ctx.engine.capabilities
    serve = serving(case, caps, ctx.companion.capabilities, ctx.device.type)
    ctx = dataclasses.replace(ctx, companion_ops=serve.companion_ops)
    missing = [m for m in (unclaimed(caps, tok) for tok in serve.requires) if m]
    res = CaseResult(id=case.id, level=case.level, op=case.op, name=case.name, dtype=case.dtype,
                     description=case.description, requires=list(case.requires), status=Status.PASS,
                     exact=case.exact, real_shape=case.real_shape, replay=replay)
    if serve.companion_ops:
        res.companion = Companion(backend=ctx.companion.name, version=str(ctx.companion.version),
                                  ops=list(serve.companion_ops))
    if missing:
        res.unclaimed = ", ".join(missing) + (f" ({serve.note})" if serve.note else "")
        draw = case.examples[0] if case.examples else {}
        props = [m for tok in serve.requires if tok in PROPERTY_TOKENS and (m := unclaimed(caps, tok))]
        if props:  # a property, not a call: nothing to refuse
            res.status, res.message = Status.NOT_SUPPORTED, f"not claimed ({', '.join(props)}): not checked"
            res.duration_s = time.perf_counter() - t0
            return res
        try:
            case.run(ctx, draw)
            res.status = Status.FAIL
            res.message = (f"{case.op}: not claimed ({res.unclaimed}) but returned numbers instead of raising "
                           "NotSupported")
        except EngineRefused as e:
            res.status = Status.NOT_SUPPORTED
            res.message = f"not claimed ({res.unclaimed}); {e}"
        except CaseFailure as e:
            res.status = Status.FAIL
            res.message = (f"{case.op}: not claimed ({res.unclaimed}) but returned numbers instead of raising "
                           f"NotSupported (and they are wrong: {describe(e.outcome)})")
        except EngineCrash as e:
            res.status = Status.ERROR
            res.message = f"not claimed ({res.unclaimed}); crashed instead of raising NotSupported: {e}"
        except NotRun as e:
            res.status, res.message = Status.NOT_RUN, f"not run: {e}"
        res.examples_run = 1
        res.duration_s = time.perf_counter() - t0
        return res

    records: list[tuple[dict, Outcome]] = []

    def body(draw: dict) -> None:
        o = case.run(ctx, draw)
        records.append((draw, o))
        if not o.passed:
            raise CaseFailure(o, draw)

    try:
        if case.strategy is None or ctx.profile.examples == 0:
            for draw in case.examples or ({},):
                body(draw)
        else:
            test = given(draw=case.strategy(ctx.profile))(body)
            for ex in reversed(case.examples):
                test = example(draw=ex)(test)
            phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
            test = settings(max_examples=min(ctx.profile.examples, case.max_examples or 10 ** 6), derandomize=derandomize, database=None,
                            deadline=None, phases=phases, suppress_health_check=list(HealthCheck),
                            verbosity=Verbosity.quiet, report_multiple_bugs=False, print_blob=False)(test)
            if not derandomize:
                test = hyp_seed(seed)(test)
            test()
        if records:
            worst = max((o for _, o in records), key=lambda o: o.ratio)
            res.observed, res.bound, res.ratio = worst.observed, worst.bound, worst.ratio
            res.metrics = worst.metrics
    except NotRun as e:
        res.status, res.message = Status.NOT_RUN, f"not run: {e}"
    except CaseFailure as e:
        o = e.outcome
        res.status = Status.FAIL
        res.message = describe(o)
        res.observed, res.bound = o.observed, o.bound
        res.ratio = o.ratio if math.isfinite(o.ratio) else None
        res.metrics = o.metrics
        res.failing_example = e.draw or (records[-1][0] if records else None)
    except EngineRefused as e:
        res.status = Status.FAIL
        res.message = f"claimed, but {e}"
        res.failing_example = records[-1][0] if records else None
    except EngineCrash as e:
        res.status = Status.ERROR
        res.message = f"{e}\n{e.tb}"
    except Exception as e:  # noqa: BLE001 — hypothesis's Flaky (nondeterministic engine) and suite bugs
        res.status = Status.ERROR
        res.message = f"{case.op}: {type(e).__name__}: {e}"
    res.examples_run = len(records)
    res.duration_s = time.perf_counter() - t0
    return res


def resolve_instance(backend: Backend | type[Backend]) -> Backend:
    return backend() if isinstance(backend, type) else backend


def run_suite(backend: Backend | type[Backend], *, levels: Iterable[str] = DEFAULT_LEVELS,
              dtypes: Iterable[str | torch.dtype] | None = None, device: str | torch.device = "cpu",
              profile: str | Profile = "quick", derandomize: bool = False, seed: int | None = None,
              waivers: str | Path | dict[str, str] | None = None, case_filter: Sequence[str] | None = None,
              check_registration: bool = False, weights_path: str | None = None, shrink: bool = False,
              progress: Callable[[CaseResult], None] | None = None, distribution: str | None = None,
              shapes: str = "all", fail_fast: bool = False) -> Report:
    """Run the conformance suite on ``backend`` (a class or an instance) and return its :class:`Report`.

    ``shapes="small"`` leaves out the cases at gpt-oss's real sizes (reported NOT_RUN, so the report is no
    certificate): for engines that run on a CPU only in an interpreter. Refused on CUDA, where the real
    shapes always run. ``fail_fast``: stop at the first FAIL or ERROR (the rest are NOT_RUN)."""
    from mxmoe.backends.reference import TorchBackend

    t0 = time.perf_counter()
    engine = resolve_instance(backend)
    device = torch.device(device)
    caps = engine.capabilities
    levels = [lv.upper() for lv in levels]
    for lv in levels:
        if lv not in LEVELS:
            raise ValueError(f"unknown level {lv!r}; expected some of {', '.join(LEVELS)}")
    if shapes not in SHAPES:
        raise ValueError(f"unknown shapes {shapes!r}; expected one of {', '.join(SHAPES)}")
    if shapes == "small" and device.type == "cuda":
        raise ValueError("shapes='small' is for engines checked on a CPU (the Triton interpreter): on a CUDA device "
                         "the real-shape cases always run")
    if dtypes is None:
        dtypes = list(caps.dtypes)
    dtypes = [dtype_name(parse_dtype(d)) for d in dtypes]
    profile = PROFILES[profile] if isinstance(profile, str) else profile
    if seed is None and not derandomize:
        seed = random.SystemRandom().randrange(2 ** 31)
    waiver_map = waivers if isinstance(waivers, dict) else load_waivers(waivers)

    grid = build_grid(engine, levels=levels, dtypes=dtypes, profile=profile, check_registration=check_registration,
                      weights_path=weights_path)
    if case_filter:
        # A pattern matches the id with or without its @dtype suffix ("L1/experts/random_mxfp4").
        grid = [c for c in grid if any(fnmatch.fnmatchcase(c.id, pat) or fnmatch.fnmatchcase(c.id.split("@")[0], pat)
                                       for pat in case_filter)]
    oracle = TorchBackend()
    results: list[CaseResult] = []
    stopped: str | None = None
    for case in grid:
        dt = parse_dtype(case.dtype or dtypes[0] if dtypes else "float32")
        ctx = Ctx(engine=engine, oracle=oracle, dtype=dt, device=device, profile=profile)
        replay = (f"mxmoe conformance --backend {engine.name} --device {device.type} --case '{case.id}' "
                  f"--profile {profile.name} " + ("--certify" if derandomize else f"--seed {seed}"))
        if stopped:
            r = not_run(case, f"--fail-fast stopped the run after {stopped} failed", replay)
        else:
            r = run_case(case, ctx, derandomize=derandomize, seed=seed or 0, shrink=shrink, replay=replay,
                         shapes=shapes)
        if r.status in (Status.FAIL, Status.ERROR):
            reason = _waiver(waiver_map, r.id)
            if reason:
                r.status, r.waiver_reason = Status.WAIVED, reason
            elif fail_fast:
                stopped = r.id
        results.append(r)
        if progress:
            progress(r)

    cls = type(engine)
    caps_dump = caps.model_dump(mode="json")
    report = Report(
        suite_version=SUITE_VERSION, mxmoe_version=_mxmoe_version(), backend_api_version=BACKEND_API_VERSION,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        backend=BackendIdentity(name=engine.name, version=str(engine.version), api_version=engine.api_version,
                                cls=f"{cls.__module__}:{cls.__qualname__}", distribution=distribution),
        capabilities=caps_dump, capabilities_sha256=capabilities_hash(caps_dump),
        environment=environment(str(device)),
        run=RunSettings(levels=levels, dtypes=dtypes, device=str(device), profile=profile.name,
                        derandomize=derandomize, seed=None if derandomize else seed,
                        examples_per_case=profile.examples,
                        waivers_file=None if waivers is None or isinstance(waivers, dict) else str(waivers),
                        shapes=shapes, fail_fast=fail_fast, case_filter=list(case_filter) if case_filter else None),
        summary=Summary(counts={}, passed=False, duration_s=time.perf_counter() - t0),
        cases=results)
    return summarize(report)


def _mxmoe_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("mxmoe")
    except md.PackageNotFoundError:
        return "unknown"
