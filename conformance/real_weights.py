"""Level 4 (optional): real weights. Harmony prompts, greedy continuations compared with the reference engine.

A real checkpoint (gpt-oss-20b: 13 GB) is too large for the float64 CPU oracle of levels 1-3, so the
reference engine runs here in float32 on the engine's device. Bounds are still derived, not guessed:

* the reference in bfloat16 against the reference in float32 measures, per logits row, how far an honest
  bfloat16 implementation of this very model and prompt lands (deviation D, the max over the vocabulary);
* first-order rounding analysis makes that deviation proportional to the unit roundoff, so an honest
  engine in dtype ``dt`` is allowed ``B = SAFETY_COMPOSED · D · (u(dt) + u(float32)) / u(bfloat16)`` per row,
  the ``u(float32)`` term covering the float32 oracle's own rounding;
* the engine generates greedily from the rendered prompt; each of its tokens, teacher-forced through the
  oracle, must have an oracle logit within ``2B`` of that step's best (a token that loses by more cannot
  come from honest rounding — the same rule as level 3). The exact-agreement rate is reported too.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from mxmoe.core.backend import OPS
from mxmoe.core.checkpoint import load_checkpoint
from mxmoe.core.model import GptOss

from . import tolerances as tol
from .case import Case, Ctx, Outcome, Profile
from .model import MODEL_REQUIRES

# Harmony conversations, as users send them: a plain question, developer instructions with high reasoning
# effort, and a function tool (the model may answer with a call).
PROMPTS = {
    "question": dict(reasoning="low", developer=None, tools=False,
                     user="What is the capital of France? Answer in one word."),
    "instructions": dict(reasoning="high", developer="Answer in French, as briefly as possible.", tools=False,
                         user="Combien font 17 fois 23 ?"),
    "tool": dict(reasoning="medium", developer="You help with the weather.", tools=True,
                 user="Quel temps fait-il à Tokyo ?"),
}
WEATHER_TOOL = {"name": "get_weather", "description": "Current weather of a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}


def render_prompt(tokenizer, name: str) -> list[int]:
    from mxmoe.core.harmony import DeveloperContent, Message, Renderer, Role, SystemContent, ToolDescription

    p = PROMPTS[name]
    # A fixed date keeps the prompt (and so the certificate) the same from day to day.
    msgs = [Message.create(Role.SYSTEM, SystemContent(reasoning_effort=p["reasoning"],
                                                      conversation_start_date="2026-01-01"))]
    if p["developer"] or p["tools"]:
        dev = DeveloperContent(instructions=p["developer"])
        if p["tools"]:
            dev = dev.with_function_tools([ToolDescription(**WEATHER_TOOL)])
        msgs.append(Message.create(Role.DEVELOPER, dev))
    msgs.append(Message.create(Role.USER, p["user"]))
    return Renderer(tokenizer).render_for_completion(msgs)


@functools.lru_cache(maxsize=1)
def _checkpoint(path: str):
    return load_checkpoint(path)  # (config, canonical weights, layout), memory-mapped


def _model(path: str, ops: dict, dtype: torch.dtype, device: torch.device) -> GptOss:
    config, weights, _ = _checkpoint(path)
    return GptOss(config, weights, ops, dtype=dtype, device=device, model_dir=path)


def _teacher_forced(model: GptOss, ids: list[int]) -> torch.Tensor:
    return model.logits(ids).to("cpu", torch.float64)


def run_harmony_greedy(ctx: Ctx, p: dict) -> Outcome:
    path, name, n_new = p["weights"], p["prompt"], p["new"]
    reference = type(ctx.oracle)()
    oracle = _model(path, {op: reference for op in OPS}, torch.float32, ctx.device)
    engine = ctx.call("model", _model, path, {op: ctx.engine for op in OPS}, ctx.dtype, ctx.device)
    tok = oracle.tokenizer
    prompt = render_prompt(tok, name)
    stops = [tok.special("<|return|>"), tok.special("<|call|>")]
    gen = ctx.call("model", lambda: list(engine.generate(prompt, max_tokens=n_new, stop_tokens=stops)))
    V = oracle.config.vocab_size
    if not gen or len(gen) > n_new or any(not (0 <= t < V) for t in gen):
        return Outcome("model", 0, 0, math.inf, message=f"{name}: generated {gen}, expected 1..{n_new} valid ids")
    seq = prompt + gen
    ref = _teacher_forced(oracle, seq)
    honest_bf16 = _teacher_forced(_model(path, {op: reference for op in OPS}, torch.bfloat16, ctx.device), seq)
    deviation = (honest_bf16 - ref).abs().amax(dim=-1)  # (T,)
    scale = (tol.u(ctx.dtype) + tol.u(torch.float32)) / tol.u(torch.bfloat16)
    bound = tol.SAFETY_COMPOSED * deviation * scale + tol.floor(ctx.dtype, oracle.config.hidden_size)
    n = len(gen)
    steps = ref[len(prompt) - 1:len(prompt) - 1 + n]  # the logits that chose each generated token
    b = bound[len(prompt) - 1:len(prompt) - 1 + n]
    chosen = steps[torch.arange(n), torch.tensor(gen)]
    gap = steps.max(dim=-1).values - chosen
    agree = float((steps.argmax(-1) == torch.tensor(gen)).double().mean())
    ratio = gap / (2 * b)
    i = int(ratio.argmax())
    from mxmoe.core.harmony import parse_tokens

    parsed = parse_tokens(tok, gen)  # lenient: reports, never raises on model output
    o = Outcome("model", float(gap[i]), float(2 * b[i]), float(ratio[i]), where=f"{name}: generated token {i}",
                metrics=dict(agreement=agree, tokens=n, prompt_tokens=len(prompt), max_gap=float(gap.max()),
                             honest_bf16_deviation=float(deviation.max()),
                             reply_text=tok.decode(gen)[:500], reply_issues=len(parsed.issues)))
    if o.ratio > 1:
        o.message = (f"harmony greedy ({name}): token {i} ({gen[i]!r} = {tok.decode([gen[i]])!r}) has a reference "
                     f"logit {float(gap[i]):.3g} below the best ({int(steps[i].argmax())}), beyond 2x the derived "
                     f"bound {float(2 * b[i]):.3g}; agreement {agree:.0%}")
    return o


def cases(dtype: str, profile: Profile, path: str | None) -> list[Case]:
    if not path:
        raise ValueError("level L4 needs real weights: pass --weights DIR (a gpt-oss checkpoint folder)")
    if not Path(path).is_dir():
        raise ValueError(f"level L4: --weights {path}: not a directory")
    return [Case("L4", "model", f"harmony_greedy_{name}", run_harmony_greedy,
                 examples=(dict(weights=str(path), prompt=name, new=profile.generate_tokens),),
                 requires=MODEL_REQUIRES + (f"dtype:{dtype}",), dtype=dtype,
                 description=f"harmony prompt {name!r}: greedy continuation vs the reference engine (float32)")
            for name in PROMPTS]
