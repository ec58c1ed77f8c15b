"""Generation: small pure functions (sampling) and ``mxmoe generate``, a thin client of the engine.

The step loop itself — batching, KV-cache rows, chunked prefill, CUDA graphs — is core/engine.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

if TYPE_CHECKING:
    from .model import GptOss


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """(S, V) logits → (S,) token ids. temperature 0 is greedy (ties to the lowest id); otherwise softmax at
    ``temperature`` restricted to the smallest set of tokens whose probability reaches ``top_p``."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"expected temperature >= 0 and 0 < top_p <= 1, found {temperature}, {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    S = logits.shape[0]
    uniform = torch.rand(S, generator=generator, device=logits.device)
    full = lambda v: torch.full((S,), v, dtype=torch.float32, device=logits.device)  # noqa: E731
    return sample_rows(logits, full(temperature), full(top_p) if top_p < 1 else None, uniform)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor | None,
                uniform: torch.Tensor) -> torch.Tensor:
    """Each row with its own settings, by device ops: (R, V) logits, (R,) temperature, (R,) top_p (None: no
    nucleus), (R,) uniform draws in [0, 1) → (R,) ids. Rows at temperature 0 take the argmax; the others
    invert the CDF of softmax(logits / temperature), restricted to the top-p nucleus, at their draw — so a
    row's token depends only on its logits and its draw, never on the other rows."""
    greedy = logits.argmax(dim=-1)
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits.float() / t[:, None], dim=-1)  # (R, V)
    if top_p is not None:
        # The nucleus is found in sorted order (stable: ties keep the lower id first on every device); a token
        # is kept if the mass strictly before it is < top_p, so the top token always survives, and every
        # token when top_p is 1 (as if no nucleus were asked for: a row's draw never depends on the others').
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        keep = (sorted_probs.cumsum(dim=-1) - sorted_probs < top_p[:, None]) | (top_p[:, None] >= 1)
        probs = probs * torch.empty_like(keep).scatter_(-1, order, keep)
    # Invert the CDF in vocabulary order at the row's draw: the first index whose cdf exceeds u * total
    # (zero-probability tokens never do). u * total may round up to the total itself: clamp to the first
    # index reaching the total, a token that has mass.
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = uniform.to(cdf.dtype)[:, None] * total
    last = (cdf < total).sum(dim=-1, keepdim=True)
    drawn = torch.minimum(torch.searchsorted(cdf, target, right=True), last).squeeze(-1)
    return torch.where(temperature > 0, drawn, greedy)


def generate(model: "GptOss", prompt_ids: Sequence[int], max_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stop_tokens: Sequence[int] = (),
             **engine_kwargs) -> Iterator[int]:
    """Stream up to ``max_tokens`` new token ids after ``prompt_ids`` (through core/engine.py). A stop token is
    yielded, then ends the stream. Sampling is reproducible for a given ``seed`` (on a given device)."""
    from .engine import SamplingParams, generate as engine_generate

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            stop_tokens=tuple(stop_tokens))
    return engine_generate(model, prompt_ids, params, **engine_kwargs)


# ---- CLI -------------------------------------------------------------------------------------------

DEFAULT_PROMPT = "The capital of France is"


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="complete one prompt (streamed) or several (one batch)",
        description="Load a gpt-oss checkpoint and complete --prompt (streamed as it is generated), then print "
                    "tokens/s and the time to first token. Several --prompt flags, or --prompts FILE, run as one "
                    "batch through the generation engine. Without --model, a tiny random checkpoint is written to "
                    "a temporary folder and used (its text is gibberish: it shows the pipeline works, not what "
                    "the model says). Exit status 1 when a prompt failed (its error is printed).")
    p.add_argument("--model", metavar="DIR",
                   help="checkpoint folder: original (config.json + model.safetensors with block.N.* tensors), "
                        "Hugging Face MXFP4 or Hugging Face bf16. Default: a tiny random checkpoint.")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help=f"text to complete; repeat for several prompts, run as one batch "
                        f"(default: {DEFAULT_PROMPT!r})")
    p.add_argument("--prompts", metavar="FILE", default=None,
                   help="read prompts from FILE, one per line (empty lines skipped; - for stdin), after any --prompt")
    p.add_argument("--json", action="store_true",
                   help="instead of streaming text, print one JSON object per prompt and line: prompt, token_ids, "
                        "text, finish_reason (stop, length, cancelled or error) and, on error, error")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as plain text; by default it is rendered in the harmony chat format "
                        "gpt-oss expects (system message, then the prompt as the user's message, ending in "
                        "<|start|>assistant) and the raw reply, headers included, is streamed")
    p.add_argument("--max-tokens", type=int, default=64,
                   help="most tokens to generate; a prompt plus this many must fit the model's context, or the "
                        "command refuses before loading the model (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 is greedy decoding (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: sample from the smallest set of tokens whose probability reaches "
                        "this (default: %(default)s, off)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for sampling; prompt i of a batch uses seed + i (default: random)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="KV-cache rows: most prompts generating at once, the others wait their turn "
                        "(default: one per prompt, as memory allows)")
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens per KV-cache row, prompt + completion (default: the longest prompt + --max-tokens, "
                        "within the model's context limit)")
    p.add_argument("--max-step-tokens", type=int, default=None,
                   help="token budget of one forward step; longer prompts are prefilled in chunks "
                        "(default: 2048, at least --max-batch)")
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="replay decode steps from CUDA graphs: auto = when on CUDA and every op's engine claims "
                        "cuda_graphs; on = that or an error; off = eager (default: %(default)s)")
    p.add_argument("--backend", default=None,
                   help="engine: 'auto', a backend name (see `mxmoe backends`), or per-op overrides such as "
                        "'attention=torch,experts=torch' (default: $MXMOE_BACKEND, then mxmoe.toml, then auto)")
    p.add_argument("--strict", action="store_true", help="refuse any backend fallback")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", default=None,
                   help="activation dtype: bfloat16 (default), float32, float64, float16")
    p.set_defaults(func=_cli_generate)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    from .cli import UsageError

    prompts = list(args.prompt or [])
    if args.prompts is not None:
        try:
            text = sys.stdin.read() if args.prompts == "-" else open(args.prompts, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --prompts {args.prompts}: {e}") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    return prompts or [DEFAULT_PROMPT]


def _check_args(args: argparse.Namespace) -> None:
    """Everything that can be judged without the model (core/cli.py checks --device and --dtype)."""
    from .cli import UsageError, check_positive, check_sampling

    check_sampling(args.max_tokens, args.temperature, args.top_p)
    check_positive(max_batch=args.max_batch, max_context=args.max_context, max_step_tokens=args.max_step_tokens)
    if args.max_batch is not None and args.max_step_tokens is not None and args.max_step_tokens < args.max_batch:
        raise UsageError(f"--max-step-tokens {args.max_step_tokens} is less than --max-batch {args.max_batch}: "
                         "every running prompt decodes one token each step")
    if args.cuda_graphs == "on" and torch.device(args.device).type != "cuda":
        raise UsageError(f"--cuda-graphs on: CUDA graphs were asked for, but the model is on "
                         f"{torch.device(args.device).type} (--device {args.device}); use --cuda-graphs auto or off")


def _encode(tok, texts: list[str], raw: bool) -> tuple[list[list[int]], tuple[int, ...]]:
    """The prompts' token ids and the stop tokens: plain text with --raw, else harmony chat prompts."""
    if raw:
        return [tok.encode(t) for t in texts], (tok.special("<|endoftext|>"),)
    from .harmony import Message, Renderer, Role
    from .harmony.chat import preamble

    renderer = Renderer(tok)
    prompts = [renderer.render_for_completion(preamble() + [Message.create(Role.USER, t)]) for t in texts]
    return prompts, (tok.special("<|return|>"), tok.special("<|call|>"), tok.special("<|endoftext|>"))


def _cli_generate(args: argparse.Namespace) -> int:
    import tempfile

    from .checkpoint import load_checkpoint
    from .cli import UsageError, check_context, config_context_limit, context_limit_source
    from .engine import SamplingParams, context_limit, engine_for
    from .model import load_model
    from .tokenizer import load_tokenizer

    _check_args(args)
    texts = _read_prompts(args)
    model_dir = args.model
    tmp = None
    if model_dir is None:
        from .checkpoint import write_random_checkpoint
        from .config import preset

        tmp = tempfile.TemporaryDirectory(prefix="mxmoe-tiny-")
        model_dir = tmp.name
        print(f"[no --model: writing a tiny random checkpoint to {model_dir}]", file=sys.stderr)
        write_random_checkpoint(model_dir, preset("tiny"), "original", seed=0)
    try:
        # Before the weights are prepared (minutes for a large model): the checkpoint is validated from its
        # headers, and the prompts are measured against the context its config allows.
        config, _weights, _layout = load_checkpoint(model_dir)
        limit = config_context_limit(config)
        if args.max_context is not None and args.max_context > limit:
            raise UsageError(f"--max-context {args.max_context}: more than the model's context of {limit} tokens"
                             f"{context_limit_source(config, limit)}")
        tok = load_tokenizer(model_dir=model_dir)
        prompts, stop = _encode(tok, texts, args.raw)
        empty = [i + 1 for i, p in enumerate(prompts) if not p]
        if empty:
            raise UsageError(f"prompt {empty[0]} is empty: nothing to complete")
        lens = [len(p) for p in prompts]
        check_context(lens, args.max_tokens, limit, context_limit_source(config, limit))
        model = load_model(model_dir, backend=args.backend, device=args.device, dtype=args.dtype,
                           strict=args.strict)
        limit = context_limit(model)  # an engine may claim less than the config allows
        check_context(lens, args.max_tokens, limit, context_limit_source(config, limit))
        params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                 seed=None if args.seed is None else args.seed + i, stop_tokens=stop)
                  for i in range(len(prompts))]
        graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
        try:
            engine = engine_for(model, prompts, params, max_batch=args.max_batch, max_context=args.max_context,
                                max_step_tokens=args.max_step_tokens, use_graphs=graphs)
        except ValueError as e:  # the pool does not fit in memory, or graphs cannot be captured here
            raise UsageError(str(e)) from None
        if len(prompts) == 1 and not args.json:
            return _stream_one(engine, tok, prompts[0], params[0])
        return _run_batch(engine, tok, texts, prompts, params, as_json=args.json)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _prefill_with_progress(engine, req, enabled: bool | None = None) -> None:
    """Run the steps that prefill ``req``'s prompt with a progress bar on stderr, when the prompt takes several
    steps (longer than the step budget) and ``enabled`` (None: stderr is a terminal); else nothing."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled or req.done or req.prompt_len <= engine.max_step_tokens:
        return
    from tqdm import tqdm

    with tqdm(total=req.prompt_len, desc="prefill", unit="tok", file=sys.stderr, leave=False,
              mininterval=0) as bar:  # a step is seconds long on a CPU: show each
        while not req.done and not req.token_ids:
            steps = engine.steps
            engine.step()
            bar.update(req.prefilled - bar.n)
            if engine.steps == steps:  # nothing ran (the request waits for a row): engine.stream handles it
                return


def _stream_one(engine, tok, prompt: list[int], params) -> int:
    decoder = _Utf8Stream(tok)
    start = time.perf_counter()
    req = engine.submit(prompt, params)
    _prefill_with_progress(engine, req)
    first = None
    n = 0
    try:
        for t in engine.stream(req):
            n += 1
            if first is None:
                first = time.perf_counter()
            sys.stdout.write(decoder.push(t))
            sys.stdout.flush()
    except ValueError as e:  # this request's own error (RequestError)
        print(f"mxmoe generate: {e}", file=sys.stderr)
        return 1
    end = time.perf_counter()
    sys.stdout.write(decoder.flush() + "\n")
    if n:
        decode_rate = (n - 1) / (end - first) if n > 1 and end > first else float("nan")
        print(f"[{n} tokens in {end - start:.2f} s: prompt of {len(prompt)} tokens, time to first token "
              f"{first - start:.2f} s, then {decode_rate:.2f} tokens/s]", file=sys.stderr)
    return 0


def _run_batch(engine, tok, texts: list[str], prompts: list[list[int]], params, as_json: bool) -> int:
    start = time.perf_counter()
    reqs = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    while engine.has_work:
        engine.step()
    end = time.perf_counter()
    failed = 0
    for i, (text, r) in enumerate(zip(texts, reqs)):
        completion = tok.decode(r.token_ids) if r.token_ids else ""
        failed += r.error is not None
        if as_json:
            obj = {"prompt": text, "token_ids": r.token_ids, "text": completion, "finish_reason": r.finish_reason}
            if r.error is not None:
                obj["error"] = r.error
            print(json.dumps(obj, ensure_ascii=False))
        else:
            print(f"=== prompt {i + 1}: {text!r} ({r.finish_reason}) ===")
            print(completion if r.error is None else f"error: {r.error}")
        if r.error is not None:
            print(f"mxmoe generate: prompt {i + 1}: {r.error}", file=sys.stderr)
    n = sum(len(r.token_ids) for r in reqs)
    ttfts = [r.first_token_at - start for r in reqs if r.first_token_at is not None]
    if n:
        print(f"[{len(reqs)} prompts, {n} tokens in {end - start:.2f} s: {n / (end - start):.2f} tokens/s in total; "
              f"time to first token {min(ttfts):.2f} s (median {statistics.median(ttfts):.2f} s); "
              f"{engine.steps} steps over {engine.num_rows} KV-cache rows]", file=sys.stderr)
    return 1 if failed else 0


class _Utf8Stream:
    """Decode a token stream to text without splitting multi-byte characters across tokens."""

    def __init__(self, tokenizer):
        self.tok, self.pending = tokenizer, b""

    def push(self, token: int) -> str:
        self.pending += self.tok.decode_bytes([token])
        try:
            text, self.pending = self.pending.decode("utf-8"), b""
            return text
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data":  # an incomplete character: wait for the next token
                text, self.pending = self.pending[:e.start].decode("utf-8"), self.pending[e.start:]
                return text
            text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
            return text

    def flush(self) -> str:
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text
