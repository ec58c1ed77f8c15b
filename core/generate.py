"""Generation: small pure functions (sample, decode step) and the streaming loop; ``mxmoe generate``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from .batch import Batch

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
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the mass strictly before it is < top_p (so the top token always survives).
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model: "GptOss", prompt_ids: Sequence[int], max_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stop_tokens: Sequence[int] = ()) -> Iterator[int]:
    """Stream up to ``max_tokens`` new token ids after ``prompt_ids``. A stop token is yielded, then ends the
    stream. Sampling is reproducible for a given ``seed`` (on a given device)."""
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, found {max_tokens}")
    ids = model.check_tokens(prompt_ids)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=model.device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    stops = set(int(t) for t in stop_tokens)
    n = ids.shape[0]
    # Inference mode around each step only, never across a ``yield``: the caller's code between tokens
    # must not run in it.
    with torch.inference_mode():
        cache = model.new_cache(1, n + max_tokens)
    # Prefill and decode are the same call: a batch of one sequence with n new tokens, then with one.
    past, new = 0, ids
    for _ in range(max_tokens):
        with torch.inference_mode():
            batch = Batch.build([new.shape[0]], [past], [0], cache.cache_len, model.device)
            logits = model.forward(new, batch, cache)  # (1, V)
            token = sample(logits, temperature, top_p, generator)  # (1,)
        past += new.shape[0]
        new = token
        t = int(token[0])
        yield t
        if t in stops:
            return


# ---- CLI -------------------------------------------------------------------------------------------

def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="stream a completion of a prompt",
        description="Load a gpt-oss checkpoint and stream a completion of --prompt, then print tokens/s. "
                    "Without --model, a tiny random checkpoint is written to a temporary folder and used "
                    "(its text is gibberish: it shows the pipeline works, not what the model says).")
    p.add_argument("--model", metavar="DIR",
                   help="checkpoint folder: original (config.json + model.safetensors with block.N.* tensors), "
                        "Hugging Face MXFP4 or Hugging Face bf16. Default: a tiny random checkpoint.")
    p.add_argument("--prompt", default="The capital of France is", help="text to complete (default: %(default)r)")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as plain text; by default it is rendered in the harmony chat format "
                        "gpt-oss expects (system message, then the prompt as the user's message, ending in "
                        "<|start|>assistant) and the raw reply, headers included, is streamed")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 is greedy decoding (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: sample from the smallest set of tokens whose probability reaches "
                        "this (default: %(default)s, off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    p.add_argument("--backend", default=None,
                   help="engine: 'auto', a backend name (see `mxmoe backends`), or per-op overrides such as "
                        "'attention=torch,experts=torch' (default: $MXMOE_BACKEND, then mxmoe.toml, then auto)")
    p.add_argument("--strict", action="store_true", help="refuse any backend fallback")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", default=None,
                   help="activation dtype: bfloat16 (default), float32, float64, float16")
    p.set_defaults(func=_cli_generate)


def _cli_generate(args: argparse.Namespace) -> int:
    import tempfile

    from .model import load_model

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
        model = load_model(model_dir, backend=args.backend, device=args.device, dtype=args.dtype,
                           strict=args.strict)
        tok = model.tokenizer
        if args.raw:
            prompt = tok.encode(args.prompt)
            stop = [tok.special("<|endoftext|>")]
        else:
            from .harmony import Message, Renderer, Role
            from .harmony.chat import preamble

            conversation = preamble() + [Message.create(Role.USER, args.prompt)]
            prompt = Renderer(tok).render_for_completion(conversation)
            stop = [tok.special("<|return|>"), tok.special("<|call|>"), tok.special("<|endoftext|>")]
        stream = model.generate(prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed, stop_tokens=stop)
        decoder = _Utf8Stream(tok)
        start = time.perf_counter()
        first = None
        n = 0
        for t in stream:
            n += 1
            if first is None:
                first = time.perf_counter()
            sys.stdout.write(decoder.push(t))
            sys.stdout.flush()
        end = time.perf_counter()
        sys.stdout.write(decoder.flush() + "\n")
        if n:
            decode_rate = (n - 1) / (end - first) if n > 1 and end > first else float("nan")
            print(f"[{n} tokens in {end - start:.2f} s: prompt of {len(prompt)} tokens processed in "
                  f"{first - start:.2f} s, then {decode_rate:.2f} tokens/s]", file=sys.stderr)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


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
