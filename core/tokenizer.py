"""o200k_harmony: the tokenizer of gpt-oss (o200k_base plus the harmony special tokens).

The o200k_base vocabulary (``o200k_base.tiktoken``, 3.6 MB) is found offline, first hit wins:

1. ``vocab_path`` passed to :func:`load_tokenizer` (a file, or a folder holding ``o200k_base.tiktoken``);
2. ``model_dir/o200k_base.tiktoken`` (or ``model_dir/original/o200k_base.tiktoken``);
3. ``$MXMOE_O200K_PATH`` (a file, or a folder holding ``o200k_base.tiktoken``);
4. ``$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken`` (what openai-harmony and tiktoken-rs read);
5. tiktoken's download cache (``$TIKTOKEN_CACHE_DIR``, ``$DATA_GYM_CACHE_DIR`` or ``<tmp>/data-gym-cache``);
6. mxmoe's own cache (``$MXMOE_CACHE_DIR`` or ``$XDG_CACHE_HOME/mxmoe`` or ``~/.cache/mxmoe``);
7. the ``bpe-openai`` package, which ships a gzipped copy (``pip install bpe-openai``).

Every candidate is checked against the sha256 tiktoken expects for o200k_base. A file that the user
pointed at (1–4) and that does not match raises :class:`VocabHashMismatch`; a stale cache entry is
skipped. A verified copy is kept in mxmoe's cache so that :func:`vocab_dir` can give tools that want a
folder (openai-harmony: ``TIKTOKEN_ENCODINGS_BASE``) one.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import AbstractSet, Literal

import tiktoken

O200K_FILENAME = "o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# tiktoken caches downloads under sha1(url); the url is the one tiktoken_ext.openai_public uses.
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
ENV_VOCAB_PATH = "MXMOE_O200K_PATH"
ENV_CACHE_DIR = "MXMOE_CACHE_DIR"

# Harmony special tokens (ids fixed by the o200k_harmony encoding).
STARTOFTEXT = 199998
ENDOFTEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012
N_MERGEABLE = 199998  # ranks 0..199997 are byte-pair merges; every id above is special
VOCAB_SIZE = 201088  # = ModelConfig.vocab_size

_NAMED_SPECIALS = {
    "<|startoftext|>": STARTOFTEXT,
    "<|endoftext|>": ENDOFTEXT,
    "<|return|>": RETURN,
    "<|constrain|>": CONSTRAIN,
    "<|channel|>": CHANNEL,
    "<|start|>": START,
    "<|end|>": END,
    "<|message|>": MESSAGE,
    "<|call|>": CALL,
}


def _special_tokens() -> dict[str, int]:
    named_ids = set(_NAMED_SPECIALS.values())
    # Every other id above the merges is "<|reserved_N|>"; o200k_base's <|endofprompt|> (200018) is
    # one of them in o200k_harmony, as in openai-harmony.
    reserved = {f"<|reserved_{i}|>": i for i in range(ENDOFTEXT + 1, VOCAB_SIZE) if i not in named_ids}
    return {**_NAMED_SPECIALS, **reserved}


SPECIAL_TOKENS: dict[str, int] = _special_tokens()


# o200k_base's pre-tokenisation regex: the string tiktoken_ext.openai_public builds inside o200k_base().
# It is not exposed as a constant there, and calling o200k_base() would download the vocabulary.
O200K_PAT_STR = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])


class VocabError(Exception):
    """The o200k_base vocabulary could not be found or is not the expected file."""


class VocabNotFound(VocabError, FileNotFoundError):
    """No o200k_base vocabulary in any of the searched places (the message lists them and the fix)."""


class VocabHashMismatch(VocabError, ValueError):
    """A file offered as o200k_base.tiktoken has the wrong sha256."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_dir() -> Path:
    """mxmoe's cache folder (``$MXMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mxmoe``, else ``~/.cache/mxmoe``)."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mxmoe"


def _tiktoken_cache_dir() -> Path | None:
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None  # "" disables tiktoken's cache
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _as_file(path: Path) -> Path:
    return path / O200K_FILENAME if path.is_dir() else path


def _candidates(vocab_path, model_dir) -> Iterable[tuple[str, Path, bool]]:
    """(description, path, strict): strict candidates raise on a hash mismatch, others are skipped."""
    if vocab_path is not None:
        yield "the vocab_path argument", _as_file(Path(vocab_path)), True
    if model_dir is not None:
        for sub in (Path(model_dir), Path(model_dir) / "original"):
            yield f"the model folder ({sub})", sub / O200K_FILENAME, True
    if os.environ.get(ENV_VOCAB_PATH):
        yield f"${ENV_VOCAB_PATH}", _as_file(Path(os.environ[ENV_VOCAB_PATH])), True
    if os.environ.get("TIKTOKEN_ENCODINGS_BASE"):
        yield "$TIKTOKEN_ENCODINGS_BASE", Path(os.environ["TIKTOKEN_ENCODINGS_BASE"]) / O200K_FILENAME, True
    tiktoken_cache = _tiktoken_cache_dir()
    if tiktoken_cache is not None:
        yield "tiktoken's cache", tiktoken_cache / hashlib.sha1(O200K_URL.encode()).hexdigest(), False
    yield "mxmoe's cache", cache_dir() / O200K_FILENAME, False


def _bpe_openai_copy() -> Path | None:
    try:
        import importlib.resources as resources

        ref = resources.files("bpe_openai") / "data" / (O200K_FILENAME + ".gz")
    except ImportError:  # ModuleNotFoundError is one
        return None
    path = Path(str(ref))
    return path if path.is_file() else None


def _write_cache(data: bytes) -> Path | None:
    """Store a verified copy as ``<cache>/o200k_base.tiktoken`` (atomic rename); None if not writable."""
    target = cache_dir() / O200K_FILENAME
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{O200K_FILENAME}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError:
        return None
    return target


def _not_found_message(searched: list[str]) -> str:
    return (
        "o200k_base vocabulary (o200k_base.tiktoken) not found; gpt-oss's tokenizer o200k_harmony needs it.\n"
        "Searched:\n  " + "\n  ".join(searched) + "\n"
        "Fix it with one of:\n"
        "  pip install bpe-openai            (ships a verified copy; mxmoe finds it automatically)\n"
        f"  export {ENV_VOCAB_PATH}=/path/to/o200k_base.tiktoken\n"
        f"  (the file must have sha256 {O200K_SHA256}; it is published at {O200K_URL})"
    )


def locate_vocab(vocab_path: str | os.PathLike | None = None,
                 model_dir: str | os.PathLike | None = None) -> tuple[Path, bytes]:
    """Find the o200k_base vocabulary (search order in the module docstring) and return
    ``(path, contents)`` with the contents' sha256 verified; ``contents`` are always the plain,
    uncompressed file. ``path`` says where they came from: a plain file, except when they came from
    bpe-openai's gzipped copy and mxmoe's cache could not be written, when it is that ``.gz`` file
    (use ``contents``, not ``path``, to read the vocabulary; :func:`vocab_dir` gives a plain file).

    Raises :class:`VocabHashMismatch` for a user-given file with the wrong hash and
    :class:`VocabNotFound` (listing what was searched and how to fix it) when nothing is found.
    """
    searched = []
    for what, path, strict in _candidates(vocab_path, model_dir):
        searched.append(f"{what}: {path}")
        if not path.is_file():
            if strict and what == "the vocab_path argument":
                raise VocabNotFound(f"vocab_path {path} does not exist.\n" + _not_found_message(searched))
            continue
        data = path.read_bytes()
        digest = _sha256(data)
        if digest == O200K_SHA256:
            return path, data
        if strict:
            raise VocabHashMismatch(
                f"{path} (from {what}) is not o200k_base.tiktoken: sha256 {digest}, expected {O200K_SHA256}. "
                "Point it at an unmodified copy (e.g. `pip install bpe-openai` and unset the variable).")
    packaged = _bpe_openai_copy()
    searched.append(f"the bpe-openai package: {packaged or 'not installed'}")
    if packaged is not None:
        data = gzip.decompress(packaged.read_bytes())
        digest = _sha256(data)
        if digest != O200K_SHA256:
            raise VocabHashMismatch(f"{packaged} decompresses to sha256 {digest}, expected {O200K_SHA256}; "
                                    "reinstall bpe-openai (pip install --force-reinstall bpe-openai).")
        cached = _write_cache(data)
        return (cached or packaged), data
    raise VocabNotFound(_not_found_message(searched))


def vocab_dir(vocab_path: str | os.PathLike | None = None, model_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding a verified ``o200k_base.tiktoken`` — what ``TIKTOKEN_ENCODINGS_BASE`` wants
    (openai-harmony, tiktoken-rs). Copies the located file into mxmoe's cache when needed."""
    path, data = locate_vocab(vocab_path, model_dir)
    if path.name == O200K_FILENAME:
        return path.parent
    cached = _write_cache(data)
    if cached is None:
        raise VocabError(f"cannot write {cache_dir() / O200K_FILENAME}; set ${ENV_CACHE_DIR} to a writable folder")
    return cached.parent


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    import base64

    ranks = {}
    for line in data.splitlines():
        if not line:
            continue
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


class Tokenizer:
    """o200k_harmony over tiktoken. ``encode`` never raises on text that looks like a special token:
    unless allowed, such text is encoded as ordinary text (what harmony does with message content)."""

    vocab_size = VOCAB_SIZE
    STARTOFTEXT = STARTOFTEXT
    ENDOFTEXT = ENDOFTEXT
    RETURN = RETURN
    CONSTRAIN = CONSTRAIN
    CHANNEL = CHANNEL
    START = START
    END = END
    MESSAGE = MESSAGE
    CALL = CALL

    def __init__(self, mergeable_ranks: dict[bytes, int], source: Path | None = None):
        if len(mergeable_ranks) != N_MERGEABLE or max(mergeable_ranks.values()) != N_MERGEABLE - 1:
            raise VocabError(f"expected {N_MERGEABLE} o200k_base ranks 0..{N_MERGEABLE - 1}, "
                             f"got {len(mergeable_ranks)}")
        self.source = source
        self._enc = tiktoken.Encoding(
            name="o200k_harmony",
            pat_str=O200K_PAT_STR,
            mergeable_ranks=mergeable_ranks,
            special_tokens=SPECIAL_TOKENS,
            explicit_n_vocab=VOCAB_SIZE,
        )
        self._id_to_special = {i: name for name, i in SPECIAL_TOKENS.items()}

    @property
    def encoding(self) -> tiktoken.Encoding:
        return self._enc

    def encode(self, text: str, allowed_special: Literal["all"] | AbstractSet[str] = frozenset()) -> list[int]:
        """Token ids of ``text``. Special-token text (``"<|start|>"``) becomes the special id only if it
        is in ``allowed_special`` (or that is ``"all"``); otherwise it is encoded as ordinary text."""
        return self._enc.encode(text, allowed_special=allowed_special, disallowed_special=())

    def encode_ordinary(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of ``ids`` (special ids as their ``<|name|>`` text); may be incomplete UTF-8."""
        for i in ids:
            if not 0 <= i < VOCAB_SIZE:
                raise ValueError(f"token id {i} out of range 0..{VOCAB_SIZE - 1}")
        return self._enc.decode_bytes(list(ids))

    def decode(self, ids: Sequence[int], errors: str = "replace") -> str:
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode_bytes([token_id])

    def special(self, name: str) -> int:
        """Id of a special token by name, with or without the ``<|…|>`` brackets: ``special("start")``."""
        key = name if name.startswith("<|") else f"<|{name}|>"
        try:
            return SPECIAL_TOKENS[key]
        except KeyError:
            raise KeyError(f"{name!r} is not an o200k_harmony special token") from None

    def special_name(self, token_id: int) -> str | None:
        return self._id_to_special.get(token_id)

    def is_special(self, token_id: int) -> bool:
        return N_MERGEABLE <= token_id < VOCAB_SIZE

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(SPECIAL_TOKENS)

    def __repr__(self) -> str:
        return f"Tokenizer(o200k_harmony, vocab_size={VOCAB_SIZE}, source={str(self.source)!r})"


_TOKENIZER: Tokenizer | None = None  # every verified vocabulary is the same file, so one instance serves all


def load_tokenizer(vocab_path: str | os.PathLike | None = None,
                   model_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Load o200k_harmony, locating and verifying the o200k_base vocabulary offline (module docstring).

    The vocabulary is located and verified on every call (errors stay visible); the parsed tokenizer
    is built once per process."""
    global _TOKENIZER
    path, data = locate_vocab(vocab_path, model_dir)
    if _TOKENIZER is None:
        _TOKENIZER = Tokenizer(_parse_ranks(data), source=path)
    return _TOKENIZER
