"""Choosing a backend for each op, and saying why.

Where the choice comes from, first found wins (the whole spec is taken from that one source):

1. the ``spec`` argument (the CLI's ``--backend``, ``load_model(backend=...)``);
2. the environment variable ``MXMOE_BACKEND``;
3. the config file: ``config_file``, else ``$MXMOE_CONFIG``, else ``./mxmoe.toml`` if it exists::

       [backend]
       default = "auto"          # or a backend name
       strict = true             # refuse any fallback
       [backend.ops]             # per-op overrides (ops or op groups)
       attention = "torch"
       moe = "compile"

4. ``auto``.

A spec is ``auto``, a backend name, per-op overrides, or a default followed by overrides:
``"torch"``, ``"attention=compile,moe=torch"``, ``"torch,attention=compile"``, or the same as a dict
(``{"default": "torch", "attention": "compile"}``). Keys are the ops of
:data:`mxmoe.core.backend.OPS` or the groups of :data:`OP_GROUPS`; an op named explicitly wins over its
group. ``auto`` picks, per op, the available backend with the highest declared priority. A tie is never
settled silently: a built-in engine wins a tie with a plugin's (an engine subclassing the reference
inherits its priority), ties among plugins go by name with a :class:`BackendTieWarning`, and the trace
says which rule decided.

A requested name that no plugin registers is always an error (:class:`BackendSelectionError`, listing
the registered names and any plugin that failed to load). Strict mode (``strict=True``, ``MXMOE_STRICT=1``
or ``strict = true`` in the config; any of them suffices) raises it too when a requested, registered
backend cannot serve an op. Otherwise such an op falls back to the best available backend, with a
:class:`BackendFallbackWarning` (one line per op) and a warning in the trace.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from mxmoe.core.backend import OPS, Backend, NotSupported, Probe, dtype_name, parse_dtype

from .discovery import BUILTIN, BackendInfo, PluginInfo, Registry, _truthy, discover

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

log = logging.getLogger("mxmoe.plugins")

ENV_BACKEND = "MXMOE_BACKEND"
ENV_CONFIG = "MXMOE_CONFIG"
ENV_STRICT = "MXMOE_STRICT"
DEFAULT_CONFIG = "mxmoe.toml"
AUTO = "auto"

# Op groups usable as keys of a spec.
OP_GROUPS: dict[str, tuple[str, ...]] = {
    "moe": ("router", "experts"),
    "attn": ("attention",),
    "norm": ("rms_norm",),
}

_GROUPS_TEXT = ", ".join(f"{g}={'+'.join(ops)}" for g, ops in OP_GROUPS.items())

RejectionKind = Literal["unknown", "api_version", "duplicate", "invalid", "error", "unavailable",
                        "not_supported", "not_requested", "lower_priority", "priority_tie"]


class SpecError(ValueError):
    """A malformed backend spec or config file (the message names the source, the key and the value)."""


class BackendSelectionError(RuntimeError):
    """No backend can serve an op, or (strict mode) a requested one cannot. The message holds the trace."""

    def __init__(self, message: str, resolution: "Resolution"):
        super().__init__(f"{message}\n\n{resolution.explain()}")
        self.resolution = resolution


class BackendFallbackWarning(UserWarning):
    """A requested backend could not serve an op, which runs on another one (non-strict mode)."""


class BackendTieWarning(UserWarning):
    """Under ``auto``, plugin backends of equal priority could serve an op: settled by name order."""


class Rejection(BaseModel):
    """Why one backend does not serve one op."""

    model_config = ConfigDict(extra="forbid")

    backend: str
    kind: RejectionKind
    reason: str


class OpDecision(BaseModel):
    """The trace of one op: who serves it, why, and why each other backend does not."""

    model_config = ConfigDict(extra="forbid")

    op: str
    backend: str | None  # None only inside a BackendSelectionError
    requested: str  # "auto" or a backend name
    reason: str
    fallback: bool = False
    warning: str | None = None
    rejected: list[Rejection] = []


class BackendSpec(BaseModel):
    """A parsed selection: a default (``auto`` or a name) and per-op names (groups already expanded)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    default: str = AUTO
    ops: dict[str, str] = {}

    def requested(self, op: str) -> str:
        return self.ops.get(op, self.default)

    def __str__(self) -> str:
        parts = [self.default] + [f"{op}={name}" for op, name in self.ops.items()]
        return ",".join(parts)


class _BackendSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: str = AUTO
    strict: bool = False
    ops: dict[str, str] = {}


@dataclass
class Resolution:
    """The outcome of :func:`resolve_backends`: the backend instance serving each op, and the trace."""

    ops: dict[str, Backend]
    trace: list[OpDecision]
    spec: BackendSpec
    source: str  # where the spec came from
    strict: bool
    device: str
    dtype: str
    config_file: str | None = None
    warnings: list[str] = field(default_factory=list)
    plugins: list[PluginInfo] = field(default_factory=list)

    @property
    def backends(self) -> dict[str, Backend]:
        """The distinct backends in use, by name."""
        return {b.name: b for b in self.ops.values()}

    def decision(self, op: str) -> OpDecision:
        return next(d for d in self.trace if d.op == op)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (what ``mxmoe backends --explain --json`` prints)."""
        return {
            "spec": str(self.spec), "source": self.source, "strict": self.strict, "device": self.device,
            "dtype": self.dtype, "config_file": self.config_file,
            "ops": {op: b.name for op, b in self.ops.items()},
            "trace": [d.model_dump() for d in self.trace],
            "warnings": list(self.warnings),
            "plugin_problems": [p.model_dump() for p in self.plugins if p.status == "failed" or p.reason],
        }

    def explain(self) -> str:
        """The trace as text, one block per op."""
        lines = [f"backend spec {str(self.spec)!r} from {self.source}; device {self.device}, dtype {self.dtype}, "
                 f"{'strict' if self.strict else 'fallback allowed'}"]
        for d in self.trace:
            head = f"{d.op:<10} -> {d.backend or '(none)'}"
            lines.append(f"{head}  ({d.reason})")
            if d.warning:
                lines.append(f"{'':<14}WARNING: {d.warning}")
            for r in d.rejected:
                lines.append(f"{'':<14}{r.backend}: {r.kind}: {r.reason}")
        problems = [p for p in self.plugins if p.status == "failed" or p.reason]
        if problems:
            lines.append("plugin problems:")
            for p in problems:
                lines.append(f"  {p.name} ({p.distribution or '?'}): {p.status}: {p.reason}")
        return "\n".join(lines)


# ---- specs and sources -----------------------------------------------------------------------------

def parse_spec(spec: str | Mapping[str, str] | BackendSpec | None, source: str = "spec") -> BackendSpec:
    """``None``/``"auto"``, ``"name"``, ``"op=name,..."``, ``"name,op=name,..."`` or a dict → BackendSpec."""
    if isinstance(spec, BackendSpec):
        return spec
    if spec is None:
        return BackendSpec()
    default: str | None = None
    pairs: list[tuple[str, str]] = []
    if isinstance(spec, str):
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            if "=" in part:
                key, _, value = part.partition("=")
                if "=" in value:
                    raise SpecError(f"{source}: {part!r}: expected op=name (one '=' per override, overrides "
                                    "separated by commas)")
                pairs.append((key.strip(), value.strip()))
            elif default is not None:
                raise SpecError(f"{source}: {spec!r} names two defaults ({default!r} and {part!r}); "
                                "write per-op overrides as op=name")
            else:
                default = part
    elif isinstance(spec, Mapping):
        pairs = [(str(k), v) for k, v in spec.items()]
    else:
        raise SpecError(f"{source}: expected a string or a mapping, found {type(spec).__name__}")

    ops: dict[str, str] = {}
    explicit: dict[str, str] = {}
    for key, value in pairs:
        if not isinstance(value, str) or not value.strip():
            raise SpecError(f"{source}: {key}={value!r}: expected a backend name or 'auto'")
        key, value = key.strip().lower(), value.strip().lower()
        if key == "default":
            default = value
        elif key in OP_GROUPS:
            ops.update({op: value for op in OP_GROUPS[key]})
        elif key in OPS:
            explicit[key] = value
        else:
            raise SpecError(f"{source}: unknown op {key!r}; expected one of {', '.join(OPS)}, a group "
                            f"({_GROUPS_TEXT}) or 'default'")
    ops.update(explicit)  # an op named explicitly wins over its group
    return BackendSpec(default=(default or AUTO).lower(), ops={op: ops[op] for op in OPS if op in ops})


def find_config(config_file: str | os.PathLike | None = None) -> Path | None:
    """The config file in effect: the argument, else ``$MXMOE_CONFIG``, else ``./mxmoe.toml`` if present."""
    if config_file is not None:
        return Path(config_file)
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG])
    local = Path.cwd() / DEFAULT_CONFIG
    return local if local.is_file() else None


def load_config(path: Path) -> tuple[BackendSpec | None, bool]:
    """Read the ``[backend]`` table of a TOML file → (spec or None when absent, strict)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SpecError(f"config file {path}: {e}") from None
    section = data.get("backend")
    if section is None:
        return None, False
    if not isinstance(section, dict):
        hint = f' (write: [backend] then default = "{section}")' if isinstance(section, str) else ""
        raise SpecError(f"config file {path}: [backend] must be a table, found {type(section).__name__} "
                        f"{section!r}{hint}")
    try:
        cfg = _BackendSection.model_validate(section)
    except ValidationError as e:
        errs = "; ".join(f"backend.{'.'.join(map(str, err['loc']))}: {err['msg']} (found {err.get('input')!r})"
                         for err in e.errors())
        raise SpecError(f"config file {path}: {errs}") from None
    spec = parse_spec({"default": cfg.default, **cfg.ops}, source=f"config file {path} [backend]")
    return spec, cfg.strict


# ---- resolution ------------------------------------------------------------------------------------

@dataclass
class _Candidate:
    info: BackendInfo
    instance: Backend | None = None
    problem: Rejection | None = None  # device-wide: cannot serve any op here
    probe: Probe | None = None


def probe_backend(backend: Backend, device: torch.device | str | None) -> Probe:
    """``backend.probe(device)``, with an exception turned into "unavailable" and its reason."""
    try:
        result = backend.probe(device)
    except (Exception, SystemExit) as e:
        return Probe(False, f"probe raised {type(e).__name__}: {e}")
    if not isinstance(result, Probe):
        return Probe(False, f"probe returned {type(result).__name__}, expected mxmoe.core.backend.Probe")
    return result


def _candidates(registry: Registry, device: torch.device, dtype: torch.dtype,
                sharded: bool = False) -> list[_Candidate]:
    out = []
    for info in registry.infos:
        c = _Candidate(info)
        out.append(c)
        if not info.usable:
            c.problem = Rejection(backend=info.name, kind=info.problem_kind or "invalid", reason=info.problem)
            continue
        cls = registry.classes[info.name]
        try:
            c.instance = cls()
        except (Exception, SystemExit) as e:
            c.problem = Rejection(backend=info.name, kind="error",
                                  reason=f"constructor raised {type(e).__name__}: {e}")
            continue
        try:
            c.instance.check(device=device, dtype=dtype)
        except NotSupported as e:
            c.problem = Rejection(backend=info.name, kind="not_supported", reason=str(e))
            continue
        except (Exception, SystemExit) as e:  # a plugin's bug: this backend is out, the process goes on
            c.problem = Rejection(backend=info.name, kind="error", reason=f"check raised {type(e).__name__}: {e}")
            continue
        if sharded and not getattr(c.instance.capabilities, "sharded", False):
            c.problem = Rejection(backend=info.name, kind="not_supported",
                                  reason=f"backend {info.name!r} does not claim it can run sharded across ranks "
                                         "(capabilities.sharded is False)")
            continue
        c.probe = probe_backend(c.instance, device)
        if not c.probe.available:
            c.problem = Rejection(backend=info.name, kind="unavailable",
                                  reason=c.probe.reason or "probe says unavailable (no reason given)")
    # Highest priority first; at equal priority the built-ins, then by name (see _tie_note).
    out.sort(key=lambda c: (-c.info.priority, c.info.plugin != BUILTIN, c.info.name))
    return out


def _op_problem(c: _Candidate, op: str, model_config: Any) -> Rejection | None:
    if c.problem is not None:
        return c.problem
    assert c.instance is not None
    try:
        c.instance.check(op=op)
        if model_config is not None:
            _check_model(c.instance, op, model_config)
    except NotSupported as e:
        return Rejection(backend=c.info.name, kind="not_supported", reason=str(e))
    except (Exception, SystemExit) as e:  # a plugin's bug: this backend does not serve the op
        return Rejection(backend=c.info.name, kind="error",
                         reason=f"check for {op!r} raised {type(e).__name__}: {e}")
    return None


def _tie_note(op: str, chosen: _Candidate, tied: list[_Candidate]) -> tuple[str, str | None]:
    """How an ``auto`` tie at the top was settled: (trace note, warning or None). Built-in engines win ties
    (a plugin subclassing the reference inherits its priority and must not displace it by name); ties
    among plugins go by name, with a warning, since nothing says which one the user wants."""
    names = ", ".join(repr(c.info.name) for c in tied)
    if chosen.info.plugin == BUILTIN and all(c.info.plugin != BUILTIN for c in tied):
        return f"tied with {names} at priority {chosen.info.priority}: built-in engines win ties", None
    warning = (f"auto: {chosen.info.name!r} and {names} have the same priority {chosen.info.priority} and can all "
               f"serve {op!r}; tie settled by name order in favour of {chosen.info.name!r} (name one with "
               "--backend, or give them different priorities)")
    return f"tied with {names} at priority {chosen.info.priority}: tie settled by name order", warning


def _check_model(b: Backend, op: str, cfg: Any) -> None:
    """The model-dependent claims: head dims, sinks, window, expert counts, context."""
    caps = b.capabilities
    if op == "attention":
        if caps.head_dims is not None and cfg.head_dim not in caps.head_dims:
            raise NotSupported(b.name, f"head_dim {cfg.head_dim} (claims {caps.head_dims})")
        if not caps.attention_sinks:
            raise NotSupported(b.name, "attention sinks")
        if cfg.sliding_window and not caps.sliding_window:
            raise NotSupported(b.name, "sliding-window attention")
        context = int(cfg.initial_context_length * cfg.rope_scaling_factor)
        if caps.max_context is not None and caps.max_context < context:
            raise NotSupported(b.name, f"context {context} (claims at most {caps.max_context})")
    if op in ("router", "experts"):
        if caps.max_experts is not None and cfg.num_experts > caps.max_experts:
            raise NotSupported(b.name, f"{cfg.num_experts} experts (claims at most {caps.max_experts})")
        if caps.max_experts_per_token is not None and cfg.experts_per_token > caps.max_experts_per_token:
            raise NotSupported(b.name, f"top-{cfg.experts_per_token} routing "
                                       f"(claims at most {caps.max_experts_per_token})")


def resolve_backends(spec: str | Mapping[str, str] | BackendSpec | None = None, *,
                     device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None,
                     strict: bool = False, config_file: str | os.PathLike | None = None,
                     model_config: Any = None, registry: Registry | None = None, sharded: bool = False) -> Resolution:
    """Give every op of :data:`mxmoe.core.backend.OPS` a backend; see the module docstring for the rules.

    :param spec: the selection, or ``None`` to take it from ``MXMOE_BACKEND``, the config file, or auto.
    :param device: where the model runs; backends that do not claim its type, or whose probe fails
        there, are not used.
    :param dtype: the activation dtype (default bfloat16).
    :param strict: refuse any fallback (also ``MXMOE_STRICT=1`` or ``strict = true`` in the config).
    :param config_file: a TOML file instead of ``$MXMOE_CONFIG`` / ``./mxmoe.toml``.
    :param model_config: a :class:`mxmoe.core.config.ModelConfig` whose head dim, expert counts and
        context are checked against the capabilities too.
    :param registry: the discovered plugins (default: :func:`mxmoe.plugins.discover`).
    :param sharded: the model runs sharded across ranks: only backends claiming ``sharded`` may serve.
    :return: a :class:`Resolution`; ``.ops`` maps each op to a backend instance (one per backend class).
    :raises BackendSelectionError: no backend can serve some op; a requested name is not registered; or,
        in strict mode, a requested backend cannot serve an op.
    :raises SpecError: the spec or the config file is malformed.
    """
    device = torch.device(device)
    dtype = parse_dtype(dtype or "bfloat16")
    registry = registry or discover()

    config_path = find_config(config_file)
    config_spec, config_strict = load_config(config_path) if config_path is not None else (None, False)
    if spec is not None:
        parsed, source = parse_spec(spec, "backend spec"), "argument"
    elif os.environ.get(ENV_BACKEND, "").strip():
        parsed, source = parse_spec(os.environ[ENV_BACKEND], ENV_BACKEND), f"environment {ENV_BACKEND}"
    elif config_spec is not None:
        parsed, source = config_spec, f"config file {config_path}"
    else:
        parsed, source = BackendSpec(), "default"
    strict = bool(strict) or _truthy(os.environ.get(ENV_STRICT, "")) or config_strict

    candidates = _candidates(registry, device, dtype, sharded)
    known = {c.info.name for c in candidates}
    res = Resolution(ops={}, trace=[], spec=parsed, source=source, strict=strict, device=str(device),
                     dtype=dtype_name(dtype), config_file=None if config_path is None else str(config_path),
                     plugins=registry.plugins)
    failures: list[tuple[str, str]] = []  # (op, why)
    unknown: dict[str, list[str]] = {}  # requested names no plugin registers → the ops asking for them
    for op in OPS:
        requested = parsed.requested(op)
        problems = {id(c): _op_problem(c, op, model_config) for c in candidates}
        able = [c for c in candidates if problems[id(c)] is None]
        best = able[0] if able else None
        decision = OpDecision(op=op, backend=None, requested=requested, reason="")
        chosen: _Candidate | None = None
        refused = False  # strict mode said no
        if requested == AUTO:
            chosen = best
            if chosen is not None:
                decision.reason = f"auto: highest priority ({chosen.info.priority}) of the backends able to serve it"
                tied = [c for c in able[1:] if c.info.priority == chosen.info.priority]
                if tied:
                    note, tie_warning = _tie_note(op, chosen, tied)
                    decision.reason += f"; {note}"
                    if tie_warning:
                        decision.warning = tie_warning
                        res.warnings.append(f"op {op!r}: {tie_warning}")
        else:
            # (a refused duplicate of the name is not the backend that was asked for)
            target = next((c for c in candidates if c.info.name == requested and c.info.problem_kind != "duplicate"),
                          None)
            if target is not None and problems[id(target)] is None:
                chosen = target
                decision.reason = f"requested by {source}"
            else:
                if target is None:
                    why = f"backend {requested!r} is not registered (known: {', '.join(sorted(known)) or 'none'})"
                    plugin = registry.plugin(requested)
                    if plugin is not None and plugin.status != "loaded":
                        why += f"; plugin {plugin.name!r} is {plugin.status}: {plugin.reason}"
                    unknown.setdefault(requested, []).append(op)
                else:
                    rej = problems[id(target)]
                    why = f"backend {requested!r} cannot serve it: {rej.kind}: {rej.reason}"
                # A name no plugin registers is an error even without strict mode: a typo must not quietly
                # run on another engine. Only a known engine that cannot serve the op here falls back.
                if strict or target is None:
                    refused = True
                    failures.append((op, why))
                    decision.reason = f"strict mode refuses a fallback: {why}" if strict else why
                elif best is not None:
                    chosen = best
                    decision.fallback = True
                    decision.warning = f"{why}; falling back to {best.info.name!r}"
                    decision.reason = f"fallback: {requested!r} requested by {source} cannot serve it"
                    res.warnings.append(f"op {op!r}: {decision.warning}")
        if chosen is not None:
            decision.backend = chosen.info.name
            res.ops[op] = chosen.instance
        elif not refused:
            failures.append((op, "no backend can serve it"))
            decision.reason = decision.reason or "no backend can serve it"
        for c in candidates:
            if chosen is not None and c is chosen:
                continue
            rej = problems[id(c)]
            if rej is None:
                if requested != AUTO and not decision.fallback:
                    rej = Rejection(backend=c.info.name, kind="not_requested",
                                    reason=f"{source} asks for {requested!r}")
                elif chosen is not None and c.info.priority == chosen.info.priority:
                    rule = ("built-in engines win ties" if chosen.info.plugin == BUILTIN and c.info.plugin != BUILTIN
                            else "tie settled by name order")
                    rej = Rejection(backend=c.info.name, kind="priority_tie",
                                    reason=f"priority {c.info.priority} ties with {chosen.info.name!r}: {rule}")
                else:
                    rej = Rejection(backend=c.info.name, kind="lower_priority",
                                    reason=f"priority {c.info.priority} < {chosen.info.priority} of "
                                           f"{chosen.info.name!r}" if chosen else f"priority {c.info.priority}")
            decision.rejected.append(rej)
        if requested != AUTO and requested not in known:
            decision.rejected.insert(0, Rejection(backend=requested, kind="unknown", reason="not registered"))
        res.trace.append(decision)

    if failures:
        raise BackendSelectionError(_failure_text(failures, unknown, source, known, registry), res)
    for w in res.warnings:
        tie = "tie settled by name order" in w
        warnings.warn(w, BackendTieWarning if tie else BackendFallbackWarning, stacklevel=2)
    _notify_resolution_done(registry, res)
    return res


def _failure_text(failures: list[tuple[str, str]], unknown: dict[str, list[str]], source: str, known: set[str],
                  registry: Registry) -> str:
    """The head of a BackendSelectionError: each unregistered name once (with the registered names and any
    plugin that did not load), then the ops that cannot be served, those failing alike on one line."""
    named = []
    for name, ops in unknown.items():
        scope = "" if len(ops) == len(OPS) else f" for {', '.join(ops)}"
        text = (f"backend {name!r} (requested by {source}{scope}) is not registered: no engine named {name!r}; "
                f"registered engines: {', '.join(sorted(known)) or 'none'} (see `mxmoe backends`)")
        plugin = registry.plugin(name)
        if plugin is not None and plugin.status != "loaded":
            text += (f"; plugin {plugin.name!r} ({plugin.distribution or '?'}) is not loaded ({plugin.status}): "
                     f"{plugin.reason}")
        else:
            failed = [p for p in registry.plugins if p.status == "failed"]
            if failed:
                text += "; plugins that failed to load (one may register it): " + "; ".join(
                    f"{p.name} ({p.distribution or '?'}): {p.reason}" for p in failed)
        named.append(text)
    if len(failures) == sum(len(ops) for ops in unknown.values()):
        return "\n".join(named)
    by_reason: dict[str, list[str]] = {}
    for op, why in failures:
        by_reason.setdefault(why, []).append(op)
    lines = [f"{', '.join(ops)}: {why}" for why, ops in by_reason.items()]
    return "\n".join(named + ["cannot choose a backend for every op:\n  " + "\n  ".join(lines)])


def _notify_resolution_done(registry: Registry, res: Resolution) -> None:
    """Call every ``mxmoe_resolution_done`` implementation on its own, in pluggy's order.

    Not through ``hook.mxmoe_resolution_done(...)``: pluggy stops at the first implementation that
    raises (the others are never called) and lets SystemExit through. Observers must not break loading,
    nor each other.
    """
    kwargs = {"resolution": res}
    for impl in reversed(registry.manager.hook.mxmoe_resolution_done.get_hookimpls()):  # pluggy's call order
        if impl.hookwrapper or getattr(impl, "wrapper", False):
            log.warning("mxmoe plugin %r: a hook wrapper of mxmoe_resolution_done is not supported; ignored",
                        impl.plugin_name)
            continue
        try:
            impl.function(*[kwargs[name] for name in impl.argnames])
        except (Exception, SystemExit) as e:
            log.warning("mxmoe plugin %r: mxmoe_resolution_done raised %s: %s; ignored", impl.plugin_name,
                        type(e).__name__, e)


def backend_status(registry: Registry | None = None, device: torch.device | str = "cpu",
                   dtype: torch.dtype | str | None = None) -> list[dict[str, Any]]:
    """Every discovered backend with its declaration and, for ``device``/``dtype``, availability and reason."""
    registry = registry or discover()
    device = torch.device(device)
    dtype = parse_dtype(dtype or "bfloat16")
    by_name = {c.info.name: c for c in _candidates(registry, device, dtype)}
    out = []
    for info in registry.infos:
        c = by_name.get(info.name) if info.usable else None
        if c is None or c.info is not info:
            c = _Candidate(info, problem=Rejection(backend=info.name, kind=info.problem_kind or "invalid",
                                                   reason=info.problem))
        row = info.model_dump(mode="json")
        row["available"] = c.problem is None
        row["reason"] = c.problem.reason if c.problem else (c.probe.reason if c.probe else "")
        row["unavailable_kind"] = c.problem.kind if c.problem else None
        out.append(row)
    return out
