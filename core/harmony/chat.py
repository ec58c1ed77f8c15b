"""``mxmoe chat``: a terminal chat with gpt-oss in the harmony format.

Interactive: type a message, the reply streams back: only what is meant for the user (the final channel,
and commentary addressed to no tool); ``--show-analysis`` also prints the reasoning, dimmed (or prefixed
``[analysis]`` when not on a terminal). A tool call shows as ``[call NAME]``. ``/reset`` starts over,
``/exit``, Ctrl-D or Ctrl-C at the prompt quit; Ctrl-C during a reply stops that reply. Earlier turns are
kept as their final answers only (harmony drops the reasoning of completed turns). A turn that would not
fit the model's context (with --max-tokens) is refused, and the chat goes on.

Non-interactive (``--conversation CONV.json``): render the conversation for completion, generate one reply,
parse it leniently and print ``{"messages", "tool_calls", "issues", "stop_token", "truncated"}`` as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Callable, TextIO

from ..cli import (ContextLimitError, UsageError, check_context, check_sampling, config_context_limit,
                   context_limit_source)
from ..tokenizer import CALL, RETURN
from .messages import Conversation, DeveloperContent, Message, Role, SystemContent, is_user_visible
from .parser import StreamParser
from .render import Renderer
from .tools import extract_tool_calls

STOP_TOKENS = (RETURN, CALL)
DEFAULT_REPLY_TOKENS = 1024  # most tokens of a reply when --max-tokens is not given (less where the context ends)
_DIM, _RESET = "\033[2m", "\033[0m"


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat", help="chat with a gpt-oss checkpoint in the harmony format",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", required=True, help="checkpoint folder (original or Hugging Face)")
    p.add_argument("--reasoning", choices=["low", "medium", "high"], default="medium",
                   help="reasoning effort written in the system message (default: %(default)s)")
    p.add_argument("--system", metavar="TEXT", default=None,
                   help="model identity line of the system message (default: harmony's)")
    p.add_argument("--developer", metavar="TEXT", default=None, help="developer instructions")
    p.add_argument("--date", default=None, help="current date for the system message (default: today)")
    p.add_argument("--show-analysis", action="store_true",
                   help="also print what is not meant for the user: the reasoning (analysis channel), messages "
                        "with a missing or unknown channel and tool-call arguments, dimmed (prefixed [analysis] "
                        "when not on a terminal)")
    p.add_argument("--conversation", metavar="CONV.json", default=None,
                   help="non-interactive: reply to this conversation (openai-harmony JSON; - for stdin) and "
                        "print the parsed reply as JSON. A system (and --developer) message is added when the "
                        "conversation has none.")
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"most tokens per reply; refused when the conversation and that many tokens do not fit the "
                        f"model's context (default: up to {DEFAULT_REPLY_TOKENS}, as the context leaves room)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--backend", default=None, help="engine or per-op overrides (see `mxmoe generate --help`)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--dtype", default=None, help="activation dtype (default: the backend's)")
    p.set_defaults(func=_cli_chat)


def preamble(reasoning: str = "medium", identity: str | None = None, developer: str | None = None,
             date: str | None = None) -> list[Message]:
    """The system message (and a developer message when there are instructions) that start a chat."""
    system = SystemContent(reasoning_effort=reasoning,
                           conversation_start_date=date or datetime.date.today().isoformat())
    if identity is not None:
        system.model_identity = identity
    msgs = [Message.create(Role.SYSTEM, system)]
    if developer:
        msgs.append(Message.create(Role.DEVELOPER, DeveloperContent(instructions=developer)))
    return msgs


class ChatSession:
    """One conversation with a model: renders, generates, parses (a new parser for every reply)."""

    def __init__(self, model, messages: list[Message], *, max_tokens: int | None = DEFAULT_REPLY_TOKENS,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None):
        from ..engine import context_limit

        self.model = model
        self.tok = model.tokenizer
        self.renderer = Renderer(self.tok)
        self.messages = list(messages)
        self.max_tokens = max_tokens  # None: up to DEFAULT_REPLY_TOKENS, as the context leaves room
        self.context_limit = context_limit(model)
        self.sampling = dict(temperature=temperature, top_p=top_p, seed=seed)

    def reply_tokens(self, prompt_len: int) -> int:
        """The most tokens the next reply may have after a prompt of ``prompt_len`` tokens. Raises
        :class:`ContextLimitError` (before any compute) when they do not fit the model's context: a given
        ``max_tokens`` must fit whole; without one, the reply gets the room left, up to DEFAULT_REPLY_TOKENS."""
        where = context_limit_source(self.model.config, self.context_limit)
        if self.max_tokens is not None:
            check_context([prompt_len], self.max_tokens, self.context_limit, where, what="the conversation")
            return self.max_tokens
        room = self.context_limit - prompt_len
        if room < 1:
            raise ContextLimitError(f"the conversation has {prompt_len} tokens, which leaves no room for a reply in "
                                    f"the model's context of {self.context_limit} tokens{where}")
        return min(DEFAULT_REPLY_TOKENS, room)

    def reply(self, on_delta: Callable | None = None) -> StreamParser:
        """Generate the assistant's next reply; ``on_delta`` sees each parser event as it happens. The parser
        is returned even when interrupted (KeyboardInterrupt propagates after the stream is closed). Raises
        :class:`ContextLimitError` when the reply would not fit the context (see :meth:`reply_tokens`)."""
        prompt = self.renderer.render_for_completion(self.messages)
        max_tokens = self.reply_tokens(len(prompt))
        parser = StreamParser(self.tok, Role.ASSISTANT, strict=False)
        stream = self.model.generate(prompt, stop_tokens=STOP_TOKENS, max_tokens=max_tokens, **self.sampling)
        try:
            for token in stream:
                for delta in parser.process(token):
                    if on_delta is not None:
                        on_delta(delta)
                if parser.done:
                    break
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        for delta in parser.process_eos():
            if on_delta is not None:
                on_delta(delta)
        return parser


def _result_json(parser: StreamParser) -> dict:
    return {"messages": [m.to_dict() for m in parser.messages],
            "tool_calls": [c.model_dump() for c in extract_tool_calls(parser.messages)],
            "issues": [i.to_dict() for i in parser.issues],
            "stop_token": parser.stop_token,
            "truncated": parser.truncated}  # ended inside a message: the parser's meaning


def _load(args):
    from ..model import load_model

    return load_model(args.model, backend=args.backend, device=args.device, dtype=args.dtype)


def _check_args(args: argparse.Namespace) -> None:
    """Everything that can be judged without the model (core/cli.py checks --device and --dtype)."""
    check_sampling(args.max_tokens, args.temperature, args.top_p)
    if args.max_tokens == 0:
        raise UsageError("--max-tokens 0: a reply needs at least one token")


def _check_first_prompt(args: argparse.Namespace, messages: list[Message]) -> None:
    """Before the weights are prepared (minutes for a large model): the checkpoint is validated from its
    headers, and the first prompt is measured against the context its config allows."""
    from ..checkpoint import load_checkpoint
    from ..tokenizer import load_tokenizer

    config = load_checkpoint(args.model)[0]
    limit = config_context_limit(config)
    n = len(Renderer(load_tokenizer(model_dir=args.model)).render_for_completion(messages))
    where = context_limit_source(config, limit)
    if args.max_tokens is not None:
        check_context([n], args.max_tokens, limit, where, what="the conversation")
    elif n >= limit:
        raise ContextLimitError(f"the conversation has {n} tokens, which leaves no room for a reply in the model's "
                                f"context of {limit} tokens{where}")


def _cli_chat(args: argparse.Namespace) -> int:
    _check_args(args)
    head = preamble(args.reasoning, args.system, args.developer, args.date)
    if args.conversation is not None:
        try:
            text = sys.stdin.read() if args.conversation == "-" else open(args.conversation, encoding="utf-8").read()
            conv = Conversation.from_json(text)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read {args.conversation}: {e}") from None
        messages = conv.messages
        if not any(m.author.role == Role.SYSTEM for m in messages):
            messages = head + messages
        _check_first_prompt(args, messages)
        session = ChatSession(_load(args), messages, max_tokens=args.max_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed)
        print(json.dumps(_result_json(session.reply()), ensure_ascii=False, indent=2))
        return 0
    _check_first_prompt(args, head)
    session = ChatSession(_load(args), head, max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed)
    return interactive(session, head, show_analysis=args.show_analysis)


class _Printer:
    """Streams deltas to the terminal. What is meant for the user (:func:`is_user_visible`) is printed plain;
    with ``show_analysis``, the assistant's other text (reasoning, a missing or unknown channel, tool-call
    arguments) is printed too, dimmed on a terminal, else after an ``[analysis]`` label. A tool call is
    always noted as ``[call NAME]``."""

    def __init__(self, out: TextIO, show_analysis: bool):
        self.out, self.show_analysis = out, show_analysis
        self.color = out.isatty()

    def __call__(self, delta) -> None:
        call = delta.recipient is not None and Role(delta.role) == Role.ASSISTANT
        reply = is_user_visible(delta)
        # Not meant for the user, shown on request: is_user_visible(…, True) adds the other channels, and
        # a call's arguments are the assistant's too.
        extra = not reply and self.show_analysis and (is_user_visible(delta, True) or call)
        if delta.kind == "header":
            if call:
                self.out.write(f"\n[call {delta.recipient}] ")
            elif extra and not self.color:
                self.out.write("[analysis] ")
        elif delta.kind == "content":
            if reply:
                self.out.write(delta.text)
            elif extra:
                self.out.write(f"{_DIM}{delta.text}{_RESET}" if self.color else delta.text)
        elif delta.kind == "end" and (reply or extra or call):
            self.out.write("\n")
        self.out.flush()


def interactive(session: ChatSession, head: list[Message], show_analysis: bool = False,
                input_fn: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    prompt = "you> " if sys.stdin.isatty() else ""
    print("mxmoe chat — /reset to start over, /exit or Ctrl-D to quit, Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input_fn(prompt)
        except EOFError:
            out.write("\n" if prompt else "")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.messages = list(head)
            print("[conversation reset]", file=sys.stderr)
            continue
        session.messages.append(Message.create(Role.USER, line))
        try:
            parser = session.reply(_Printer(out, show_analysis))
        except ContextLimitError as e:  # nothing was generated: the question goes, the session stays usable
            session.messages.pop()
            print(f"[{e}; /reset starts over]", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            out.write("\n")
            print("[reply interrupted]", file=sys.stderr)
            session.messages.pop()  # the unanswered question goes too
            continue
        finals = [m for m in parser.messages if m.channel == "final"]
        calls = extract_tool_calls(parser.messages)
        if calls:
            print(f"[the model called {', '.join(c.recipient for c in calls)}; mxmoe chat runs no tools]",
                  file=sys.stderr)
        if finals:
            session.messages.extend(finals)  # earlier turns keep their answers, not their reasoning
        else:
            print("[no final answer in this reply" + (" (cut off inside a message)" if parser.truncated else "")
                  + "]", file=sys.stderr)
            session.messages.pop()
        for issue in parser.issues:
            print(f"[format issue at token {issue.position}: {issue.reason}]", file=sys.stderr)
