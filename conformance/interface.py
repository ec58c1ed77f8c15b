"""Level 0: the interface. Identity, API version, a valid capability manifest, a probe that answers,
registration under the engine's name, every claim exercised by some case, and unclaimed dtypes and
devices refused with ``NotSupported``. (The other side of every other claim — head dims, window,
sinks, context, experts, top-k, expert formats, ops — is checked by the level-1..3 cases that need it.)"""

from __future__ import annotations

import math
import re

import torch

from mxmoe.core.backend import OPS, Backend, Capabilities, NotSupported, Probe

from .case import Case, Ctx, EngineCrash, Limits, Outcome, Profile, claim_tokens

KNOWN_DTYPES = ("float64", "float32", "bfloat16", "float16")
KNOWN_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "npu", "meta")


def _ok(what: str = "") -> Outcome:
    return Outcome("interface", 0.0, 0.0, 0.0, metrics={"checked": what} if what else {})


def _bad(msg: str) -> Outcome:
    return Outcome("interface", 0.0, 0.0, math.inf, message=msg)


def cases(engine: Backend, dtypes, profile: Profile, check_registration: bool) -> list[Case]:
    out: list[Case] = []

    def add(name, run, description, requires=(), examples=()):
        out.append(Case("L0", "interface", name, run, None, tuple(examples), tuple(requires), None, description))

    def identity(ctx: Ctx, _):
        e = ctx.engine
        if not isinstance(e.name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", e.name or ""):
            return _bad(f"name {e.name!r} must be a lower-case identifier ([a-z0-9][a-z0-9_.-]*)")
        if not isinstance(e.version, str) or not e.version:
            return _bad(f"version {e.version!r} must be a non-empty string")
        if e.name == Backend.name:
            return _bad("name is still the base class's 'abstract'")
        return _ok(f"{e.name} {e.version}")

    def api_version(ctx: Ctx, _):
        from mxmoe.plugins import api_compatible

        ok, why = api_compatible(ctx.engine.api_version)
        return _ok(ctx.engine.api_version) if ok else _bad(why)

    def manifest(ctx: Ctx, _):
        caps = ctx.engine.capabilities
        if not isinstance(caps, Capabilities):
            return _bad(f"capabilities is a {type(caps).__name__}, not mxmoe.core.backend.Capabilities")
        try:
            again = Capabilities.model_validate_json(caps.model_dump_json())
        except Exception as e:  # noqa: BLE001
            return _bad(f"capabilities do not survive a JSON round trip: {e}")
        if again != caps:
            return _bad("capabilities change in a JSON round trip")
        problems = [f"unknown op {o!r}" for o in caps.ops if o not in OPS]
        problems += [f"unknown dtype {d!r}" for d in caps.dtypes if d not in KNOWN_DTYPES]
        problems += [f"unknown device type {d!r}" for d in caps.devices if d not in KNOWN_DEVICES]
        problems += [f"head_dim {h} must be a positive even number" for h in caps.head_dims or () if h <= 0 or h % 2]
        for field in ("max_experts", "max_experts_per_token", "max_context"):
            v = getattr(caps, field)
            if v is not None and v <= 0:
                problems.append(f"{field}={v} must be positive")
        if not caps.ops:
            problems.append("claims no ops")
        if not caps.dtypes:
            problems.append("claims no dtypes")
        if "experts" in caps.ops and caps.mxfp4 == "none" and not caps.dense_experts:
            problems.append("claims the experts op but neither MXFP4 nor dense experts")
        if caps.cuda_graphs and "cuda" not in caps.devices:
            problems.append("claims cuda_graphs but not the cuda device")
        return _bad("; ".join(problems)) if problems else _ok(", ".join(caps.ops))

    def probe(ctx: Ctx, _):
        try:
            p = ctx.engine.probe(ctx.device)
        except Exception as e:  # noqa: BLE001
            return _bad(f"probe({ctx.device}) raised {type(e).__name__}: {e} (it must answer, not raise)")
        if not isinstance(p, Probe):
            return _bad(f"probe returned {type(p).__name__}, not mxmoe.core.backend.Probe")
        if ctx.device.type not in ctx.engine.capabilities.devices:
            return _bad(f"the device under test {ctx.device.type!r} is not claimed "
                        f"(claims {', '.join(ctx.engine.capabilities.devices)})")
        if not p.available:
            return _bad(f"probe says unavailable on {ctx.device}: {p.reason}")
        return _ok(p.reason or "available")

    def registration(ctx: Ctx, _):
        from mxmoe.plugins import discover

        reg = discover()
        info = reg.info(ctx.engine.name)
        if info is None:
            return _bad(f"no plugin registers a backend named {ctx.engine.name!r} (entry-point group 'mxmoe')")
        if not info.usable:
            return _bad(f"registered but refused: {info.problem}")
        cls = reg.classes.get(ctx.engine.name)
        if cls is not None and not isinstance(ctx.engine, cls):
            return _bad(f"the name {ctx.engine.name!r} is registered by {info.cls}, not by this class")
        return _ok(f"plugin {info.plugin}")

    def claims_exercised(ctx: Ctx, _):
        # Every claim (op, dtype, feature, head dim) must be needed by at least one case of the grid.
        from .runner import DEFAULT_LEVELS, build_grid

        caps = ctx.engine.capabilities
        grid = build_grid(ctx.engine, levels=[lv for lv in DEFAULT_LEVELS if lv != "L0"],
                          dtypes=list(caps.dtypes), profile=profile)
        used = {tok for c in grid for tok in c.requires}
        missing = [t for t in claim_tokens(caps) if t not in used]
        if missing:
            return _bad("claims that no case exercises: " + ", ".join(missing))
        return _ok(f"{len(claim_tokens(caps))} claims, {len(grid)} cases")

    def unclaimed_device(ctx: Ctx, _):
        # Tensors on the "meta" device (no engine claims it; it exists everywhere) must be refused by every
        # claimed op that takes tensors or a device from the caller.
        caps = ctx.engine.capabilities
        dt = ctx.dtype
        meta = torch.device("meta")
        calls = []
        if "embedding" in caps.ops:
            calls.append(("embedding", lambda: ctx.engine.embedding(torch.zeros(2, dtype=torch.int64, device=meta),
                                                                    torch.empty(8, 64, dtype=dt, device=meta))))
        if "rms_norm" in caps.ops:
            calls.append(("rms_norm", lambda: ctx.engine.rms_norm(torch.empty(2, 64, dtype=dt, device=meta),
                                                                  torch.empty(64, device=meta), 1e-5)))
            calls.append(("add_rms_norm", lambda: ctx.engine.add_rms_norm(
                torch.empty(2, 64, dtype=dt, device=meta), torch.empty(2, 64, dtype=dt, device=meta),
                torch.empty(64, device=meta), 1e-5)))
        if "linear" in caps.ops or "router" in caps.ops:
            calls.append(("prepare_linear", lambda: ctx.engine.prepare_linear(
                torch.zeros(8, 64, dtype=torch.bfloat16), None, dt, meta)))
        if "experts" in caps.ops:
            from .inputs import generator, random_experts

            g = generator(0)
            dense = caps.mxfp4 == "none"
            m1, m2 = random_experts(g, 2, 64, 32, 0.1, dense), random_experts(g, 2, 32, 32, 0.1, dense)
            calls.append(("prepare_experts", lambda: ctx.engine.prepare_experts(m1, m2, dt, meta)))
        for name, call in calls:
            try:
                call()
            except NotSupported:
                continue
            except Exception as e:  # noqa: BLE001
                raise EngineCrash(name, e) from e
            return _bad(f"{name} on the unclaimed device 'meta' returned instead of raising NotSupported")
        return _ok(", ".join(n for n, _ in calls) + " refuse device 'meta'")

    add("identity", identity, "name, version")
    add("api_version", api_version, "the API range includes this mxmoe's backend API")
    add("manifest", manifest, "capabilities are a valid, JSON-serialisable Capabilities")
    add("probe", probe, "probe() answers, and says available on the device under test")
    if check_registration:
        add("registration", registration, "discoverable by name through the plugin system")
    add("claims_exercised", claims_exercised, "every claimed op/dtype/feature/bound is exercised by some case")
    if "meta" not in engine.capabilities.devices:
        add("refuses_unclaimed_device", unclaimed_device, "tensors on an unclaimed device ('meta') raise NotSupported")

    # Unclaimed dtypes: the first case of each op, in that dtype, must be refused.
    from . import ops

    lim = Limits.of(engine.capabilities)
    for dt in KNOWN_DTYPES:
        if dt in engine.capabilities.dtypes:
            continue
        seen = set()
        for c in ops.cases(dt, lim, profile):
            if c.real_shape or not c.examples:
                continue
            if c.op in seen or c.exact and c.op == "experts":
                continue
            seen.add(c.op)
            out.append(Case("L0", c.op, f"refuses_{c.name}", c.run, None, c.examples[:1], c.requires, dt,
                            f"unclaimed dtype {dt}: must raise NotSupported"))
    return out
