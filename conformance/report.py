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

SCHEMA_VERSION = "1.0.0"
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
    status: Status
    message: str = ""
    observed: float | None = Field(None, description="error of the worst element (largest observed/bound)")
    bound: float | None = Field(None, description="the derived bound at that element")
    ratio: float | None = Field(None, description="observed/bound; > 1 fails")
    exact: bool = False
    metrics: dict[str, Any] = Field(default_factory=dict)
    examples_run: int = 0
    failing_example: dict[str, Any] | None = None
    replay: str = Field("", description="command line that replays this case")
    waiver_reason: str | None = None
    duration_s: float = 0.0


class Summary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    counts: dict[str, int]
    passed: bool = Field(description="every claimed case passed (WAIVED allowed); the exit code is 0 iff true")
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


def console_table(report: Report, show: str = "all") -> str:
    """Plain-text table; ``show="problems"`` lists only non-PASS cases."""
    rows = [c for c in report.cases if show == "all" or c.status != Status.PASS]
    head = ("case", "status", "observed", "bound", "ratio", "note")
    data = [(c.id, c.status.value, _num(c.observed), _num(c.bound), _num(c.ratio),
             _short(c.message or c.waiver_reason or "", 80)) for c in rows]
    widths = [max([len(h)] + [len(r[i]) for r in data]) for i, h in enumerate(head)]
    widths[-1] = min(widths[-1], 80)
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in data]
    s = report.summary
    out.append("")
    out.append(f"{report.backend.name} {report.backend.version} on {report.run.device} "
               f"({', '.join(report.run.dtypes)}; levels {','.join(report.run.levels)}): "
               + ", ".join(f"{k} {v}" for k, v in s.counts.items() if v)
               + f" in {s.duration_s:.1f}s -> {'CONFORMS' if s.passed else 'DOES NOT CONFORM'}")
    return "\n".join(out)


def markdown(report: Report) -> str:
    s = report.summary
    b = report.backend
    lines = [f"# mxmoe conformance: `{b.name}` {b.version}", "",
             f"**Result: {'CONFORMS' if s.passed else 'DOES NOT CONFORM'}** — "
             + ", ".join(f"{k} {v}" for k, v in s.counts.items()) + f" ({s.duration_s:.1f} s)", "",
             "| | |", "| --- | --- |",
             f"| suite | {report.suite_version} (report schema {report.schema_version}) |",
             f"| backend | `{b.cls}`, API range `{b.api_version}`, mxmoe backend API {report.backend_api_version} |",
             f"| capabilities sha256 | `{report.capabilities_sha256[:16]}…` |",
             f"| device | {report.environment.device} ({report.environment.device_name}) |",
             f"| software | Python {report.environment.python}, torch {report.environment.torch}, "
             f"{report.environment.platform} |",
             f"| run | levels {', '.join(report.run.levels)}; dtypes {', '.join(report.run.dtypes)}; profile "
             f"{report.run.profile}; " + ("derandomized (certification)" if report.run.derandomize
                                          else f"seed {report.run.seed}") + " |",
             f"| created | {report.created} |", ""]
    problems = [c for c in report.cases if c.status not in (Status.PASS, Status.NOT_SUPPORTED)]
    if problems:
        lines += ["## Problems", ""]
        for c in problems:
            lines.append(f"* **{c.status.value}** `{c.id}`: {c.message or ''}"
                         + (f" — waived: {c.waiver_reason}" if c.waiver_reason else ""))
            if c.failing_example:
                lines.append(f"  * failing example: `{json.dumps(c.failing_example)}`")
            if c.replay:
                lines.append(f"  * replay: `{c.replay}`")
        lines.append("")
    lines += ["## Cases", "", "| case | status | observed | bound | ratio | examples | note |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for c in report.cases:
        note = (c.message or c.waiver_reason or c.description or "").replace("|", "\\|")
        lines.append(f"| `{c.id}` | {c.status.value} | {_num(c.observed)} | {_num(c.bound)} | {_num(c.ratio)} | "
                     f"{c.examples_run} | {_short(note, 140)} |")
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
    SCHEMA_PATH.write_text(schema_text())
    print(f"wrote {SCHEMA_PATH}")
