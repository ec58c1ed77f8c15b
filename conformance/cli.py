"""``mxmoe conformance``: certify an engine. Exit status 0 only when every claimed case passes."""

from __future__ import annotations

import argparse
import importlib
import sys

from .runner import DEFAULT_LEVELS, LEVELS, WaiverError


def resolve_backend(name: str):
    """A registered backend name (through the plugin system), or ``module:Class``. Returns (class, distribution)."""
    if ":" in name:
        mod, _, attr = name.partition(":")
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj, None
    from mxmoe.plugins import discover

    reg = discover()
    cls = reg.classes.get(name)
    if cls is None:
        info = reg.info(name)
        known = ", ".join(sorted(reg.classes)) or "none"
        why = f": {info.problem}" if info is not None and info.problem else ""
        raise SystemExit(f"mxmoe conformance: no usable backend named {name!r}{why} (registered: {known}; "
                         "or pass module:Class)")
    info = reg.info(name)
    return cls, (info.distribution if info else None)


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "conformance", help="run the conformance suite on an engine and write its certificate",
        description="Run the mxmoe conformance suite: every claimed capability of the engine is compared with "
                    "the reference engine in float64 on the CPU, within derived bounds, and every claim's "
                    "limit is checked from the other side (NotSupported). Exit status 0 when no case fails "
                    "(WAIVED allowed), 1 when one does, 2 for a usage error; the report says CERTIFIED only "
                    "when nothing was left out (--certify, every default level, no --case, no NOT_RUN). "
                    "Times per level are printed and written to the report.")
    p.add_argument("--backend", required=True, help="registered backend name, or module:Class")
    p.add_argument("--device", default="cpu", help="device to run the engine on (default cpu)")
    p.add_argument("--level", default=",".join(DEFAULT_LEVELS),
                   help=f"comma-separated levels among {','.join(LEVELS)} (default {','.join(DEFAULT_LEVELS)}; "
                        "L4 needs --weights)")
    p.add_argument("--dtype", default=None, help="comma-separated dtypes (default: every claimed dtype)")
    p.add_argument("--report", default=None, help="write PATH.json and PATH.md (or report.json/.md in a folder)")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (printed; replays a failure)")
    p.add_argument("--certify", "--derandomize", dest="derandomize", action="store_true",
                   help="certification mode: derandomized inputs (the same on every run) and the full profile")
    p.add_argument("--profile", choices=("quick", "full", "smoke"), default=None,
                   help="sizes and example counts (default: full with --certify, else quick; smoke: the quick "
                        "sizes, explicit examples only)")
    p.add_argument("--waivers", default=None, help="JSON waiver file: [{case, reason}, ...]")
    p.add_argument("--case", action="append", default=None, help="only cases whose id matches (glob; repeatable)")
    p.add_argument("--weights", default=None,
                   help="checkpoint folder for level L4 (harmony prompts, greedy continuations vs the reference "
                        "engine in float32 on the same device)")
    p.add_argument("--shrink", action="store_true", help="let hypothesis shrink a failing example (slower)")
    p.add_argument("--fail-fast", action="store_true",
                   help="stop at the first FAIL or ERROR (the remaining cases are reported NOT_RUN)")
    p.add_argument("--shapes", choices=("all", "small"), default="all",
                   help="all (default): every case, including one layer of gpt-oss-20b/120b at the real sizes, "
                        "the true vocabulary, 64-sequence decode batches and contexts past 32k; small: leave "
                        "the real-shape cases out (NOT_RUN; the report then says NOT CERTIFIED). For engines "
                        "that run on a CPU only in an interpreter (TRITON_INTERPRET=1); refused on CUDA, "
                        "where the real shapes always run")
    p.add_argument("--show", choices=("all", "problems"), default="all", help="console table rows")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-case progress lines")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from .report import console_table, write
    from .runner import run_suite

    cls, dist = resolve_backend(args.backend)
    levels = [lv.strip().upper() for lv in args.level.split(",") if lv.strip()]
    if "L4" in levels and not args.weights:
        print("mxmoe conformance: level L4 compares greedy continuations of harmony prompts on real weights: "
              "pass --weights DIR", file=sys.stderr)
        return 2
    dtypes = [d.strip() for d in args.dtype.split(",")] if args.dtype else None
    profile = args.profile or ("full" if args.derandomize else "quick")

    def progress(r):
        if not args.quiet:
            print(f"{r.status.value:13s} {r.id}  ({r.duration_s:.2f}s)", file=sys.stderr, flush=True)

    try:
        report = run_suite(cls, levels=levels, dtypes=dtypes, device=args.device, profile=profile,
                           derandomize=args.derandomize, seed=args.seed, waivers=args.waivers, case_filter=args.case,
                           check_registration=":" not in args.backend, weights_path=args.weights,
                           shrink=args.shrink, progress=progress, distribution=dist, shapes=args.shapes,
                           fail_fast=args.fail_fast)
    except (WaiverError, ValueError) as e:
        print(f"mxmoe conformance: {e}", file=sys.stderr)
        return 2
    print(console_table(report, args.show))
    if not report.run.derandomize:
        print(f"seed {report.run.seed} (replay with --seed {report.run.seed})")
    if args.report:
        j, m = write(report, args.report)
        print(f"report: {j} and {m}")
    return 0 if report.summary.passed else 1
