"""``mxmoe harmony render|parse`` (see exactly what the model is sent and what it said) and ``mxmoe chat``."""

from __future__ import annotations

import argparse
import json
import sys

from .messages import Conversation, Role


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    h = subparsers.add_parser("harmony", help="render or parse the harmony chat format",
                              description="Inspect the harmony chat format gpt-oss is prompted in.")
    sub = h.add_subparsers(dest="harmony_command", metavar="ACTION", required=True)

    r = sub.add_parser("render", help="conversation JSON → token ids",
                       description="Print the o200k_harmony token ids of a conversation given in openai-harmony's "
                                   "JSON shape ({\"messages\": [...]}, as Conversation.to_json() writes it).")
    r.add_argument("conversation", metavar="CONV.json", help="conversation file, or - for stdin")
    r.add_argument("--for-completion", action="store_true",
                   help="end with <|start|>assistant: the prompt for the model's next reply")
    r.add_argument("--for-training", action="store_true",
                   help="end the last assistant final message with <|return|> (a training example)")
    r.add_argument("--next-role", default="assistant", choices=[x.value for x in Role],
                   help="role of the turn to complete with --for-completion (default: %(default)s)")
    r.add_argument("--keep-analysis", action="store_true",
                   help="keep analysis messages that harmony's history rule would drop")
    r.add_argument("--text", action="store_true", help="also print the decoded text (after the ids, to stdout)")
    r.add_argument("--text-only", action="store_true", help="print only the decoded text")
    r.set_defaults(func=_cli_render)

    p = sub.add_parser("parse", help="token ids JSON → messages JSON",
                       description="Parse token ids (a JSON list, or {\"tokens\": [...]}) and print the messages "
                                   "found, in openai-harmony's JSON shape. A sequence starting with <|start|> is "
                                   "read as a whole conversation; otherwise as a completion after "
                                   "<|start|>ROLE (--role).")
    p.add_argument("tokens", metavar="TOKENS.json", help="token file, or - for stdin")
    p.add_argument("--role", default=None, choices=[x.value for x in Role],
                   help="role of the first message when the ids do not start with <|start|> (default: assistant)")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 1) at the first malformed token instead of recovering")
    p.add_argument("--stop", action="store_true",
                   help="stop at the first <|return|> or <|call|> as a generating model does")
    p.add_argument("--issues", action="store_true",
                   help="print {messages, issues, stop_token, truncated} instead of the messages alone")
    p.set_defaults(func=_cli_parse)

    from . import chat

    chat.register_cli(subparsers)


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def _load_tokenizer():
    from ..tokenizer import load_tokenizer

    return load_tokenizer()


def _cli_render(args: argparse.Namespace) -> int:
    from .render import Renderer, RenderError

    try:
        conv = Conversation.from_json(_read(args.conversation))
    except (OSError, ValueError) as e:
        print(f"mxmoe harmony render: cannot read {args.conversation}: {e}", file=sys.stderr)
        return 2
    tok = _load_tokenizer()
    renderer = Renderer(tok)
    drop = not args.keep_analysis
    try:
        if args.for_completion:
            ids = renderer.render_for_completion(conv, args.next_role, auto_drop_analysis=drop)
        else:
            ids = renderer.render_conversation(conv, auto_drop_analysis=drop, for_training=args.for_training)
    except RenderError as e:
        print(f"mxmoe harmony render: {e}", file=sys.stderr)
        return 1
    if not args.text_only:
        print(json.dumps(ids))
    if args.text or args.text_only:
        print(tok.decode(ids))
    return 0


def _cli_parse(args: argparse.Namespace) -> int:
    from ..tokenizer import START
    from .parser import HarmonyParseError, parse_tokens

    try:
        data = json.loads(_read(args.tokens))
        ids = data["tokens"] if isinstance(data, dict) else data
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise ValueError("expected a JSON list of token ids or {\"tokens\": [...]}")
    except (OSError, ValueError, KeyError) as e:
        print(f"mxmoe harmony parse: cannot read {args.tokens}: {e}", file=sys.stderr)
        return 2
    role = args.role
    if role is None:
        role = None if ids and ids[0] == START else "assistant"
    try:
        result = parse_tokens(_load_tokenizer(), ids, role, strict=args.strict, continue_after_stop=not args.stop)
    except HarmonyParseError as e:
        print(f"mxmoe harmony parse: malformed at {e}", file=sys.stderr)
        return 1
    if args.issues:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
    else:
        print(json.dumps({"messages": [m.to_dict() for m in result.messages]}, ensure_ascii=False, indent=2))
        for issue in result.issues:
            print(f"warning: token {issue.position}: {issue.reason}", file=sys.stderr)
    return 0
