"""Benchmark: the reference engine on a gpt-oss-20b-shaped checkpoint — peak memory and seconds per token.

On the CPU this shows the `torch` engine runs gpt-oss-20b within 16 GiB of resident memory (MXFP4 experts
memory-mapped and dequantized per use, never all at once). Writes a random checkpoint with gpt-oss-20b's
shapes (MXFP4 experts, ~13 GB, original layout) unless --model is given, loads it with the `torch`
backend in bfloat16, runs a prompt and a few decode steps, and reports peak resident memory (and peak
GPU memory on CUDA), prefill time and seconds per decode step. Results are appended to
tests/benchmarks/results/reference.jsonl with date, device and versions.

    python tests/benchmarks/bench_reference.py [--device cpu|cuda] [--model DIR] [--workdir /tmp] [--tokens 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from mxmoe.core.batch import Batch
from mxmoe.core.checkpoint import write_random_checkpoint
from mxmoe.core.config import preset
from mxmoe.core.model import load_model

RESULTS = Path(__file__).parent / "results" / "reference.jsonl"
GIB = 1024**3


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="existing checkpoint folder (default: write a random gpt-oss-20b-shaped one)")
    ap.add_argument("--workdir", default=tempfile.gettempdir(), help="where to write the random checkpoint")
    ap.add_argument("--keep", action="store_true", help="keep the random checkpoint afterwards")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4, help="decode steps to time")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results", default=str(RESULTS), help="JSON-lines file to append the result to")
    args = ap.parse_args()

    model_dir, written = args.model, False
    write_s = None
    if model_dir is None:
        model_dir = os.path.join(args.workdir, "mxmoe-bench-gpt-oss-20b")
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            t0 = time.perf_counter()
            write_random_checkpoint(model_dir, preset("gpt-oss-20b"), "original", seed=0)
            write_s = time.perf_counter() - t0
            written = True
            print(f"wrote random gpt-oss-20b-shaped checkpoint in {write_s:.1f} s", flush=True)
    rss_before_load = peak_rss_bytes()
    t0 = time.perf_counter()
    device = torch.device(args.device)
    model = load_model(model_dir, backend="torch", device=device, dtype="bfloat16")
    load_s = time.perf_counter() - t0
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    cache = model.new_cache(1, args.prompt_len + args.tokens)
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model.forward(prompt, Batch.build([args.prompt_len], [0], [0], cache.cache_len, device), cache)
        sync()
        prefill_s = time.perf_counter() - t0
        step_s = []
        tok = logits.argmax(-1)
        for i in range(args.tokens):
            t0 = time.perf_counter()
            logits = model.forward(tok, Batch.build([1], [args.prompt_len + i], [0], cache.cache_len, device), cache)
            tok = logits.argmax(-1)
            sync()
            step_s.append(time.perf_counter() - t0)
            print(f"decode step {i}: {step_s[-1]:.2f} s, peak RSS {peak_rss_bytes() / GIB:.2f} GiB", flush=True)
    if not torch.isfinite(logits).all():
        print("non-finite logits!", file=sys.stderr)
        return 1
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "benchmark": "reference_gpt-oss-20b",
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "backend": "torch", "dtype": "bfloat16",
        "checkpoint_write_s": write_s, "load_s": round(load_s, 2),
        "prompt_len": args.prompt_len, "prefill_s": round(prefill_s, 2),
        "decode_s_per_token_median": round(statistics.median(step_s), 2),
        "decode_s_per_token": [round(s, 2) for s in step_s],
        "peak_rss_gib": round(peak_rss_bytes() / GIB, 2),
        "rss_before_load_gib": round(rss_before_load / GIB, 2),
        "cpu_limit_gib": 16,
        "peak_gpu_gib": (round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None),
    }
    print(json.dumps(result, indent=2))
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as f:
        f.write(json.dumps(result) + "\n")
    if written and not args.keep:
        shutil.rmtree(model_dir)
    return 0 if device.type != "cpu" or result["peak_rss_gib"] <= 16 else 2


if __name__ == "__main__":
    sys.exit(main())
