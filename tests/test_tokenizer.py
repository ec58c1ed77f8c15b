"""o200k_harmony tokenizer: vocabulary search, hash checks, and token-for-token agreement with openai-harmony."""

from __future__ import annotations

import gzip
import hashlib
import os
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mxmoe.core import tokenizer as tk
from mxmoe.core.tokenizer import (
    O200K_FILENAME,
    O200K_SHA256,
    VocabHashMismatch,
    VocabNotFound,
    load_tokenizer,
    vocab_dir,
)

_SEARCH_VARS = ("MXMOE_O200K_PATH", "TIKTOKEN_ENCODINGS_BASE", "TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR",
                "MXMOE_CACHE_DIR")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def harmony_enc():
    openai_harmony = pytest.importorskip("openai_harmony")
    with pytest.MonkeyPatch.context() as mp:  # restored after this module's tests
        mp.setenv("TIKTOKEN_ENCODINGS_BASE", str(vocab_dir()))
        yield openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.fixture(scope="module")
def vocab_bytes():
    return tk.locate_vocab()[1]


@pytest.fixture()
def isolated(monkeypatch, tmp_path):
    """No vocabulary anywhere: search variables point at empty folders and bpe-openai is unimportable."""
    for var in _SEARCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.setenv("MXMOE_CACHE_DIR", str(tmp_path / "mxmoe-cache"))
    monkeypatch.setitem(sys.modules, "bpe_openai", None)
    return tmp_path


def test_constants_and_specials(tok):
    assert tok.vocab_size == 201088
    assert (tok.START, tok.END, tok.MESSAGE, tok.CHANNEL, tok.CONSTRAIN, tok.RETURN, tok.CALL) == (
        200006, 200007, 200008, 200005, 200003, 200002, 200012)
    assert tok.special("<|startoftext|>") == 199998 and tok.special("endoftext") == 199999
    assert tok.special("<|reserved_201087|>") == 201087 and tok.special("reserved_200018") == 200018
    assert tok.is_special(199998) and tok.is_special(201087) and not tok.is_special(199997)
    assert tok.decode([200006, 200008]) == "<|start|><|message|>"
    with pytest.raises(KeyError):
        tok.special("<|endofprompt|>")  # o200k_base's id 200018 is a reserved token in o200k_harmony
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([201088])


def test_special_text_is_ordinary_unless_allowed(tok):
    assert tok.encode("<|start|>") != [200006]
    assert tok.encode("<|start|>", allowed_special={"<|start|>"}) == [200006]
    assert tok.encode("a<|call|>", allowed_special="all") == tok.encode("a") + [200012]


def test_special_tokens_match_openai_harmony(tok, harmony_enc):
    # openai-harmony 0.0.8 also defines <|reserved_201088|>, one past the model's 201088-row embedding;
    # mxmoe leaves it out (an id the model cannot take).
    assert set(tok.special_tokens) == harmony_enc.special_tokens_set - {"<|reserved_201088|>"}
    for name, i in tok.special_tokens.items():
        assert harmony_enc.encode(name, allowed_special="all") == [i] == tok.encode(name, allowed_special="all")
        assert harmony_enc.decode([i]) == tok.decode([i]) == name
        assert harmony_enc.is_special_token(i)
    for i in (0, 1000, 199997):
        assert not harmony_enc.is_special_token(i) and not tok.is_special(i)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80))
def test_random_text_matches_openai_harmony(tok, harmony_enc, text):
    ids = tok.encode(text)
    assert ids == harmony_enc.encode(text, disallowed_special=())
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|call|>", "<|return|>",
                                 "<|constrain|>", "<|reserved_200100|>", "analysis", " json", "\n", "ü"]), max_size=12))
def test_mixed_special_text_matches_openai_harmony(tok, harmony_enc, parts):
    text = "".join(parts)
    assert tok.encode(text, allowed_special="all") == harmony_enc.encode(text, allowed_special="all")


def test_search_order_explicit_and_model_dir(isolated, vocab_bytes):
    model = isolated / "model"
    (model / "original").mkdir(parents=True)
    (model / "original" / O200K_FILENAME).write_bytes(vocab_bytes)
    path, _ = tk.locate_vocab(model_dir=model)
    assert path == model / "original" / O200K_FILENAME
    explicit = isolated / "elsewhere.tiktoken"
    explicit.write_bytes(vocab_bytes)
    assert tk.locate_vocab(vocab_path=explicit, model_dir=model)[0] == explicit
    # a folder is accepted where a file is, and vocab_dir() hands out a folder named the way harmony wants
    assert tk.locate_vocab(vocab_path=model / "original")[0] == model / "original" / O200K_FILENAME
    folder = vocab_dir(vocab_path=explicit)
    assert hashlib.sha256((folder / O200K_FILENAME).read_bytes()).hexdigest() == O200K_SHA256
    assert folder == isolated / "mxmoe-cache"
    assert load_tokenizer(vocab_path=explicit).encode("hello") == [24912]


def test_env_var_and_tiktoken_cache(isolated, monkeypatch, vocab_bytes):
    env_file = isolated / "via-env"
    env_file.write_bytes(vocab_bytes)
    monkeypatch.setenv("MXMOE_O200K_PATH", str(env_file))
    assert tk.locate_vocab()[0] == env_file
    monkeypatch.delenv("MXMOE_O200K_PATH")
    cache = isolated / "tiktoken-cache"
    cache.mkdir()
    entry = cache / hashlib.sha1(tk.O200K_URL.encode()).hexdigest()
    entry.write_bytes(vocab_bytes)
    assert tk.locate_vocab()[0] == entry


def test_bpe_openai_copy_is_found_and_cached(monkeypatch, tmp_path):
    pytest.importorskip("bpe_openai")
    for var in _SEARCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("MXMOE_CACHE_DIR", str(tmp_path / "cache"))
    path, data = tk.locate_vocab()
    assert path == tmp_path / "cache" / O200K_FILENAME and path.read_bytes() == data
    assert hashlib.sha256(data).hexdigest() == O200K_SHA256


def test_hash_mismatch(isolated, monkeypatch, vocab_bytes):
    bad = isolated / O200K_FILENAME
    bad.write_bytes(vocab_bytes[:-10])
    with pytest.raises(VocabHashMismatch, match=f"expected {O200K_SHA256}"):
        load_tokenizer(vocab_path=bad)
    with pytest.raises(VocabHashMismatch):
        tk.locate_vocab(model_dir=isolated)
    monkeypatch.setenv("MXMOE_O200K_PATH", str(bad))
    with pytest.raises(VocabHashMismatch, match="MXMOE_O200K_PATH"):
        load_tokenizer()
    monkeypatch.delenv("MXMOE_O200K_PATH")
    # a stale cache entry is skipped, not fatal
    cache = isolated / "mxmoe-cache"
    cache.mkdir()
    (cache / O200K_FILENAME).write_bytes(b"stale")
    with pytest.raises(VocabNotFound):
        load_tokenizer()


def test_not_found_message_says_what_to_do(isolated):
    with pytest.raises(VocabNotFound) as info:
        load_tokenizer(model_dir=isolated / "model")
    msg = str(info.value)
    assert "pip install bpe-openai" in msg and "MXMOE_O200K_PATH" in msg and O200K_SHA256 in msg
    assert str(isolated / "model" / O200K_FILENAME) in msg
    with pytest.raises(VocabNotFound, match="does not exist"):
        load_tokenizer(vocab_path=isolated / "missing.tiktoken")


def test_gzip_copy_hash_matches_facts():
    # FACTS.md: bpe-openai's gzipped copy decompresses to the file tiktoken expects.
    path = tk._bpe_openai_copy()
    if path is None:
        pytest.skip("bpe-openai not installed")
    assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() == O200K_SHA256


def test_harmony_fixture_restores_environment():
    # runs in a fresh interpreter: the module-scoped fixture must put TIKTOKEN_ENCODINGS_BASE back
    import subprocess
    import textwrap

    pytest.importorskip("openai_harmony")
    code = textwrap.dedent(f"""
        import os, sys, pytest
        os.environ.pop("TIKTOKEN_ENCODINGS_BASE", None)
        rc = pytest.main(["-q", "-p", "no:cacheprovider", {__file__!r}, "-k",
                          "test_special_tokens_match_openai_harmony"])
        assert rc == 0, rc
        sys.exit(3 if "TIKTOKEN_ENCODINGS_BASE" in os.environ else 0)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_ENCODINGS_BASE"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_gzip_copy_when_cache_is_not_writable(monkeypatch, tmp_path):
    # the documented exception: the contents are plain, the path is bpe-openai's .gz; vocab_dir says why it fails
    if tk._bpe_openai_copy() is None:
        pytest.skip("bpe-openai not installed")
    for var in _SEARCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("MXMOE_CACHE_DIR", str(tmp_path / "file" / "cache"))  # under a file: not writable
    path, data = tk.locate_vocab()
    assert path == tk._bpe_openai_copy() and path.suffix == ".gz"
    assert hashlib.sha256(data).hexdigest() == O200K_SHA256
    with pytest.raises(tk.VocabError, match="cannot write"):
        vocab_dir()
