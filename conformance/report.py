"""The certificate: a JSON report with a published schema (report_schema.json), a Markdown summary, and
a console table.

``python -m mxmoe.conformance.report`` rewrites report_schema.json from :class:`Report`; a test checks
that the file is up to date.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .case import Status

SCHEMA_VERSION = "1.2.0"  # 1.1: NOT_RUN, per-level summaries, certified/verdict, shapes, fail_fast; 1.2: companion
SCHEMA_PATH = Path(__file__).with_name("report_schema.json")


class BackendIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    api_version: str = Field(description="range of the backend API the engine was written for")
    cls: str = Field(description="module:QualName of the backend class")
    distribution: str | None = None


class Environment(BaseModel):
    """Hardware and software fingerprint of the machine the run happened on."""

    model_config = ConfigDict(extra="forbid")

    python: str
    platform: str
    machine: str
    processor: str
    torch: str
    cuda: str | None = None
    device: str
    device_name: str
    packages: dict[str, str] = {}
    hostname_sha256: str = Field(description="hash of the host name (identifies reruns without revealing it)")


class RunSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    levels: list[str]
    dtypes: list[str]
    device: str
    profile: str
    derandomize: bool = Field(description="certification mode: hypothesis's fixed derandomized stream")
    seed: int | None = Field(description="hypothesis seed (replay with --seed); None when derandomized")
    examples_per_case: int
    waivers_file: str | None = None
    shapes: str = Field("all", description="'all', or 'small': the real-shape cases were left out (NOT_RUN)")
    fail_fast: bool = False
    case_filter: list[str] | None = Field(None, description="--case patterns: only part of the grid ran")


class Companion(BaseModel):
    """The backend that served the ops a block or model case needs and the engine does not claim."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field(description="its name (the reference engine, 'torch')")
    version: str
    ops: list[str] = Field(description="the ops it served; the engine served the case's others")

    def __str__(self) -> str:
        return f"companion: {', '.join(self.ops)} ({self.backend})"


class CaseResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="level/op/name@dtype")
    level: str
    op: str
    name: str
    dtype: str | None = None
    description: str = ""
    requires: list[str] = Field(default_factory=list, description="claim tokens the case needs")
    unclaimed: str | None = Field(None, description="what the manifest does not claim (then the case checks refusal)")
    companion: Companion | None = Field(None, description="blocks and model: the ops served by the companion "
                                                          "(the reference engine, same dtype and device) because "
                                                          "the engine does not claim them; None: the engine alone")
    status: Status
    message: str = ""
    observed: float | None = Field(None, description="error of the worst element (largest observed/bound)")
    bound: float | None = Field(None, description="the derived bound at that element")
    ratio: float | None = Field(None, description="observed/bound; > 1 fails")
    exact: bool = False
    real_shape: bool = Field(False, description="at gpt-oss's real sizes")
    metrics: dict[str, Any] = Field(default_factory=dict)
    examples_run: int = 0
    failing_example: dict[str, Any] | None = None
    replay: str = Field("", description="command line that replays this case")
    waiver_reason: str | None = None
    duration_s: float = 0.0


class LevelSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    counts: dict[str, int]
    duration_s: float = Field(description="seconds spent in this level's cases")


class Summary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    counts: dict[str, int]
    passed: bool = Field(description="no case failed or errored (WAIVED allowed; NOT_RUN is not a failure but "
                                     "leaves certified false); the exit code is 0 iff true")
    certified: bool = Field(False, description="passed, and nothing was left out: every default level, the full "
                                               "grid, derandomized, full profile, no NOT_RUN case")
    verdict: str = Field("", description="CERTIFIED; CONFORMS, NOT CERTIFIED; DOES NOT CONFORM; or NOTHING RAN "
                                         "(every case NOT_RUN)")
    not_certified_because: list[str] = Field(default_factory=list, description="why a passing run is no certificate")
    levels: dict[str, LevelSummary] = Field(default_factory=dict, description="counts and time per level")
    duration_s: float


class Report(BaseModel):
    """A conformance run of one engine: what it claims, where it ran, and every case's result."""

    model_config = ConfigDict(extra="forbid")

    schema_version: str = SCHEMA_VERSION
    kind: Literal["mxmoe-conformance-report"] = "mxmoe-conformance-report"
    suite_version: str
    mxmoe_version: str
    backend_api_version: str
    created: str
    backend: BackendIdentity
    capabilities: dict[str, Any]
    capabilities_sha256: str = Field(description="sha256 of the capabilities' canonical JSON (sorted keys)")
    environment: Environment
    run: RunSettings
    summary: Summary
    cases: list[CaseResult]


# ---- the verdict ------------------------------------------------------------------------------------

_LEVELS = ("L0", "L1", "L2", "L3", "L4")
_DEFAULT_LEVELS = ("L0", "L1", "L2", "L3")
_PASSING = (Status.PASS, Status.NOT_SUPPORTED, Status.WAIVED)


def summarize(report: Report) -> Report:
    """``report`` with its summary (counts, per-level times, passed, certified, verdict) computed from its
    cases and settings. Passed: no FAIL or ERROR. Certified: passed, and nothing left out (see
    :func:`not_certified_because`)."""
    cases, run = report.cases, report.run
    counts = {s.value: sum(c.status == s for c in cases) for s in Status}
    levels = {lv: LevelSummary(counts={s.value: n for s in Status if (n := sum(c.status == s for c in cases
                                                                                if c.level == lv))},
                               duration_s=sum(c.duration_s for c in cases if c.level == lv))
              for lv in _LEVELS if any(c.level == lv for c in cases)}
    ran = any(c.status in _PASSING for c in cases)
    failed = any(c.status not in _PASSING + (Status.NOT_RUN,) for c in cases)
    passed = ran and not failed
    why = not_certified_because(cases, run, report.capabilities) if passed else []
    certified = passed and not why
    verdict = ("CERTIFIED" if certified else "CONFORMS, NOT CERTIFIED" if passed
               else "DOES NOT CONFORM" if failed else "NOTHING RAN")
    summary = Summary(counts=counts, passed=passed, certified=certified, verdict=verdict, not_certified_because=why,
                      levels=levels, duration_s=report.summary.duration_s)
    return report.model_copy(update={"summary": summary})


def not_certified_because(cases: list[CaseResult], run: RunSettings, capabilities: dict[str, Any]) -> list[str]:
    """Why a run whose cases all passed is still no certificate (empty: it is one): cases NOT_RUN, levels,
    claimed dtypes or parts of the grid left out, a seeded (not derandomized) run, a profile other than full."""
    why = []
    skipped = [c for c in cases if c.status == Status.NOT_RUN]
    if skipped:
        small = run.shapes == "small"
        real = sum(c.real_shape for c in skipped) if small else 0
        parts = [f"{real} real-shape cases excluded by --shapes small"] if real else []
        other = [c for c in skipped if not (c.real_shape and small)]
        if other:
            reasons = sorted({c.message.removeprefix("not run: ") for c in other})
            parts.append(f"{len(other)} cases could not run here ({'; '.join(reasons)})")
        why.append(f"{len(skipped)} cases NOT_RUN: " + "; ".join(parts))
    missing = [lv for lv in _DEFAULT_LEVELS if lv not in run.levels]
    if missing:
        why.append(f"levels {', '.join(missing)} not run")
    unrun = [d for d in capabilities.get("dtypes", ()) if d not in run.dtypes]
    if unrun:
        why.append(f"claimed dtypes not run: {', '.join(unrun)}")
    if run.case_filter:
        why.append("a case filter selected part of the grid")
    if not run.derandomize:
        why.append("seeded run (certification uses --certify: derandomized inputs)")
    if run.profile != "full":
        why.append(f"the {run.profile!r} profile (certification uses the full profile)")
    return why


def merge(reports: list[Report]) -> Report:
    """One report from runs of the same engine on the same machine that split the claimed dtypes between
    them (e.g. to fit a time limit): the cases side by side, the summary recomputed. Refuses reports that
    differ in anything but their dtypes, cases and times, or that overlap in dtypes."""
    if not reports:
        raise ValueError("nothing to merge")
    first = reports[0]

    def key(r: Report) -> tuple:
        env = r.environment.model_dump(exclude={"packages"})
        run = r.run.model_dump(exclude={"dtypes", "seed"})
        return (r.suite_version, r.schema_version, r.backend_api_version, r.backend.model_dump(),
                r.capabilities_sha256, json.dumps(env, sort_keys=True), json.dumps(run, sort_keys=True))

    for r in reports[1:]:
        if key(r) != key(first):
            raise ValueError(f"cannot merge: the runs differ in more than their dtypes ({first.run.dtypes} vs "
                             f"{r.run.dtypes}): engine, capabilities, suite, machine and settings must be the same")
    dtypes = [d for r in reports for d in r.run.dtypes]
    if len(set(dtypes)) != len(dtypes):
        raise ValueError(f"cannot merge: overlapping dtypes {dtypes}")
    # Cases of no dtype (the interface checks of L0) ran in every part: kept once, if they agree.
    cases, seen = [], {}
    for c in (c for r in reports for c in r.cases):
        if c.id in seen:
            if c.dtype is not None or c.status != seen[c.id].status:
                raise ValueError(f"cannot merge: case {c.id} is {seen[c.id].status.value} in one run and "
                                 f"{c.status.value} in another")
            continue
        seen[c.id] = c
        cases.append(c)
    run = first.run.model_copy(update={"dtypes": dtypes})
    summary = first.summary.model_copy(update={"duration_s": sum(r.summary.duration_s for r in reports)})
    merged = first.model_copy(update={"run": run, "cases": cases, "summary": summary,
                                      "created": max(r.created for r in reports)})
    return summarize(merged)


def capabilities_hash(caps: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(caps, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def environment(device: str) -> Environment:
    import importlib.metadata as md

    import torch

    dev_name = platform.processor() or platform.machine()
    cuda = None
    if device.startswith("cuda") and torch.cuda.is_available():
        dev_name = torch.cuda.get_device_name(torch.device(device))
        cuda = torch.version.cuda or getattr(torch.version, "hip", None)
    pkgs = {}
    for name in ("mxmoe", "numpy", "triton", "hypothesis", "pydantic", "pluggy"):
        try:
            pkgs[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return Environment(python=sys.version.split()[0], platform=platform.platform(), machine=platform.machine(),
                       processor=platform.processor(), torch=torch.__version__, cuda=cuda, device=device,
                       device_name=dev_name, packages=pkgs,
                       hostname_sha256=hashlib.sha256(platform.node().encode()).hexdigest()[:16])


# ---- rendering -----------------------------------------------------------------------------------

def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}"


def _short(msg: str, n: int = 110) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= n else msg[:n - 1] + "…"


def _with_companion(c: CaseResult, note: str) -> str:
    """``note``, after "companion: OPS (BACKEND)" when the companion served some of the case's ops."""
    if c.companion is None:
        return note
    return f"{c.companion}; {note}" if note else str(c.companion)


def console_table(report: Report, show: str = "all") -> str:
    """Plain-text table; ``show="problems"`` lists only non-PASS cases."""
    rows = [c for c in report.cases if show == "all" or c.status != Status.PASS]
    head = ("case", "status", "observed", "bound", "ratio", "note")
    data = [(c.id, c.status.value, _num(c.observed), _num(c.bound), _num(c.ratio),
             _short(_with_companion(c, c.message or c.waiver_reason or ""), 80)) for c in rows]
    widths = [max([len(h)] + [len(r[i]) for r in data]) for i, h in enumerate(head)]
    widths[-1] = min(widths[-1], 80)
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in data]
    s = report.summary
    out.append("")
    out.append("per level: " + "; ".join(f"{lv} {ls.duration_s:.1f}s (" + ", ".join(f"{k} {v}" for k, v in
                                                                               ls.counts.items() if v) + ")"
                                         for lv, ls in s.levels.items()))
    out.append(f"{report.backend.name} {report.backend.version} on {report.run.device} "
               f"({', '.join(report.run.dtypes)}; levels {','.join(report.run.levels)}; shapes {report.run.shapes}): "
               + ", ".join(f"{k} {v}" for k, v in s.counts.items() if v)
               + f" in {s.duration_s:.1f}s -> {verdict(report)}")
    return "\n".join(out)


def verdict(report: Report) -> str:
    """One line: CERTIFIED, DOES NOT CONFORM, or CONFORMS, NOT CERTIFIED (and why)."""
    s = report.summary
    if s.certified:
        return "CERTIFIED"
    if not s.passed:
        return s.verdict or "DOES NOT CONFORM"
    return "CONFORMS, NOT CERTIFIED: " + "; ".join(s.not_certified_because)


def markdown(report: Report) -> str:
    s = report.summary
    b = report.backend
    lines = [f"# mxmoe conformance: `{b.name}` {b.version}", "",
             f"**Result: {verdict(report)}** — "
             + ", ".join(f"{k} {v}" for k, v in s.counts.items()) + f" ({s.duration_s:.1f} s)", "",
             "| | |", "| --- | --- |",
             f"| suite | {report.suite_version} (report schema {report.schema_version}) |",
             f"| backend | `{b.cls}`, API range `{b.api_version}`, mxmoe backend API {report.backend_api_version} |",
             f"| capabilities sha256 | `{report.capabilities_sha256[:16]}…` |",
             f"| device | {report.environment.device} ({report.environment.device_name}) |",
             f"| software | Python {report.environment.python}, torch {report.environment.torch}, "
             f"{report.environment.platform} |",
             f"| run | levels {', '.join(report.run.levels)}; dtypes {', '.join(report.run.dtypes)}; profile "
             f"{report.run.profile}; shapes {report.run.shapes}; " + ("derandomized (certification)"
                                                                      if report.run.derandomize
                                                                      else f"seed {report.run.seed}") + " |",
             f"| created | {report.created} |"]
    helped = [c for c in report.cases if c.companion is not None]
    if helped:
        names = sorted({f"`{c.companion.backend}` {c.companion.version}" for c in helped})
        lines.append(f"| companion | {', '.join(names)} (the reference engine, same dtype and device) served the "
                     f"ops the engine does not claim in {len(helped)} block/model cases (listed per case) |")
    lines += ["", "## Levels", "", "| level | time (s) | cases |", "| --- | ---: | --- |"]
    lines += [f"| {lv} | {ls.duration_s:.1f} | " + ", ".join(f"{k} {v}" for k, v in ls.counts.items() if v) + " |"
              for lv, ls in s.levels.items()]
    lines.append("")
    not_run = [c for c in report.cases if c.status == Status.NOT_RUN]
    if not_run:
        lines += ["## Not run (no certificate while any case is not run)", ""]
        lines += [f"* `{c.id}`: {c.message}" for c in not_run]
        lines.append("")
    problems = [c for c in report.cases if c.status not in (Status.PASS, Status.NOT_SUPPORTED, Status.NOT_RUN)]
    if problems:
        lines += ["## Problems", ""]
        for c in problems:
            lines.append(f"* **{c.status.value}** `{c.id}`: {_with_companion(c, c.message or '')}"
                         + (f" — waived: {c.waiver_reason}" if c.waiver_reason else ""))
            if c.failing_example:
                lines.append(f"  * failing example: `{json.dumps(c.failing_example)}`")
            if c.replay:
                lines.append(f"  * replay: `{c.replay}`")
        lines.append("")
    lines += ["## Cases", "", "| case | status | observed | bound | ratio | examples | time (s) | note |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for c in report.cases:
        note = _with_companion(c, c.message or c.waiver_reason or c.description or "").replace("|", "\\|")
        tag = " (real shape)" if c.real_shape else ""
        lines.append(f"| `{c.id}`{tag} | {c.status.value} | {_num(c.observed)} | {_num(c.bound)} | {_num(c.ratio)} | "
                     f"{c.examples_run} | {c.duration_s:.2f} | {_short(note, 140)} |")
    lines += ["", "## Capabilities", "", "```json", json.dumps(report.capabilities, indent=2), "```", ""]
    return "\n".join(lines)


def write(report: Report, path: str | Path) -> tuple[Path, Path]:
    """Write ``PATH.json`` and ``PATH.md`` (or, if ``path`` is a folder, ``report.json``/``report.md`` in it)."""
    path = Path(path)
    if path.is_dir() or str(path).endswith(("/", "\\")):
        path.mkdir(parents=True, exist_ok=True)
        base = path / "report"
    else:
        base = path.with_suffix("") if path.suffix in (".json", ".md") else path
        base.parent.mkdir(parents=True, exist_ok=True)
    j, m = base.with_name(base.name + ".json"), base.with_name(base.name + ".md")
    j.write_text(report.model_dump_json(indent=2) + "\n")
    m.write_text(markdown(report))
    return j, m


def schema() -> dict[str, Any]:
    s = Report.model_json_schema()
    s["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    s["$id"] = f"https://mxmoe.dev/schemas/conformance-report-{SCHEMA_VERSION}.json"
    return s


def schema_text() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    # python -m mxmoe.conformance.report                 rewrite report_schema.json
    # python -m mxmoe.conformance.report merge OUT A.json B.json ...   one certificate from runs split by dtype
    if len(sys.argv) > 1 and sys.argv[1] == "merge":
        out, paths = sys.argv[2], sys.argv[3:]
        merged = merge([Report.model_validate_json(Path(p).read_text()) for p in paths])
        j, m = write(merged, out)
        print(f"{verdict(merged)}; wrote {j} and {m}")
    else:
        SCHEMA_PATH.write_text(schema_text())
        print(f"wrote {SCHEMA_PATH}")
