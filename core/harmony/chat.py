"""``mxmoe chat``: a terminal chat with gpt-oss in the harmony format.

Interactive: type a message, the reply streams back (``--show-analysis`` prints the reasoning dimmed);
``/reset`` starts over, ``/exit``, Ctrl-D or Ctrl-C at the prompt quit; Ctrl-C during a reply stops that
reply. Earlier turns are kept as their final answers only (harmony drops the reasoning of completed turns).

Non-interactive (``--conversation CONV.json``): render the conversation for completion, generate one reply,
parse it leniently and print ``{"messages", "tool_calls", "issues", "stop_token", "truncated"}`` as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Callable, TextIO

from ..tokenizer import CALL, RETURN
from .messages import Conversation, DeveloperContent, Message, Role, SystemContent
from .parser import StreamParser
from .render import Renderer
from .tools import extract_tool_calls

STOP_TOKENS = (RETURN, CALL)
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
    p.add_argument("--show-analysis", action="store_true", help="print the reasoning (analysis channel) dimmed")
    p.add_argument("--conversation", metavar="CONV.json", default=None,
                   help="non-interactive: reply to this conversation (openai-harmony JSON; - for stdin) and "
                        "print the parsed reply as JSON. A system (and --developer) message is added when the "
                        "conversation has none.")
    p.add_argument("--max-tokens", type=int, default=1024, help="most tokens per reply (default: %(default)s)")
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

    def __init__(self, model, messages: list[Message], *, max_tokens: int = 1024, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None):
        self.model = model
        self.tok = model.tokenizer
        self.renderer = Renderer(self.tok)
        self.messages = list(messages)
        self.sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)

    def reply(self, on_delta: Callable | None = None) -> StreamParser:
        """Generate the assistant's next reply; ``on_delta`` sees each parser event as it happens. The parser
        is returned even when interrupted (KeyboardInterrupt propagates after the stream is closed)."""
        prompt = self.renderer.render_for_completion(self.messages)
        parser = StreamParser(self.tok, Role.ASSISTANT, strict=False)
        stream = self.model.generate(prompt, stop_tokens=STOP_TOKENS, **self.sampling)
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


def _cli_chat(args: argparse.Namespace) -> int:
    head = preamble(args.reasoning, args.system, args.developer, args.date)
    if args.conversation is not None:
        try:
            text = sys.stdin.read() if args.conversation == "-" else open(args.conversation, encoding="utf-8").read()
            conv = Conversation.from_json(text)
        except (OSError, ValueError) as e:
            print(f"mxmoe chat: cannot read {args.conversation}: {e}", file=sys.stderr)
            return 2
        messages = conv.messages
        if not any(m.author.role == Role.SYSTEM for m in messages):
            messages = head + messages
        session = ChatSession(_load(args), messages, max_tokens=args.max_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed)
        print(json.dumps(_result_json(session.reply()), ensure_ascii=False, indent=2))
        return 0
    session = ChatSession(_load(args), head, max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed)
    return interactive(session, head, show_analysis=args.show_analysis)


class _Printer:
    """Streams deltas to the terminal: final text plain, analysis dimmed (when asked), tool calls noted."""

    def __init__(self, out: TextIO, show_analysis: bool):
        self.out, self.show_analysis = out, show_analysis
        self.color = out.isatty()
        self.current = None

    def __call__(self, delta) -> None:
        visible = delta.channel != "analysis" or self.show_analysis
        if delta.kind == "header" and visible:
            if delta.recipient:
                self.out.write(f"\n[call {delta.recipient}] ")
            elif delta.channel == "analysis" and not self.color:
                self.out.write("[analysis] ")
        elif delta.kind == "content" and visible:
            dim = delta.channel == "analysis" and self.color
            self.out.write(f"{_DIM}{delta.text}{_RESET}" if dim else delta.text)
        elif delta.kind == "end" and visible:
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
