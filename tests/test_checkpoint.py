"""Checkpoints: the three layouts round-trip, Hugging Face reads ours, tensors are mapped, bad input is named."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mxmoe.core import checkpoint as ck
from mxmoe.core import mxfp4
from mxmoe.core.checkpoint import CheckpointError
from mxmoe.core.config import preset

CONFIG = preset("tiny", vocab_size=512)
SHARD = 100_000  # bytes: small enough that the tiny HF checkpoints are written in several shards


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """One random model (seed 0), streamed in every layout."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for layout in ck.LAYOUTS:
        out[layout] = root / layout
        ck.write_random_checkpoint(out[layout], CONFIG, layout, seed=0, max_shard_bytes=SHARD)
    return out


@pytest.fixture(scope="module")
def reference() -> ck.ModelWeights:
    return ck.random_weights(CONFIG, seed=0)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _flat(w: ck.ModelWeights) -> dict[str, torch.Tensor]:
    """Every canonical tensor, experts dense in float32."""
    out = {"embedding": w.embedding, "norm": w.norm_scale, "unembedding": w.unembedding}
    for i, b in enumerate(w.blocks):
        for k, v in vars(b.attn).items():
            out[f"{i}.attn.{k}"] = v
        for k in ("norm_scale", "gate_weight", "gate_bias"):
            out[f"{i}.mlp.{k}"] = getattr(b.mlp, k)
        for n, lin in (("mlp1", b.mlp.mlp1), ("mlp2", b.mlp.mlp2)):
            out[f"{i}.{n}.bias"] = lin.bias
            out[f"{i}.{n}.weight"] = lin.dense(torch.float32)
    return out


def _assert_same(a: ck.ModelWeights, b: ck.ModelWeights) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].shape == fb[k].shape and torch.equal(fa[k].float(), fb[k].float()), k


# ---- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ck.LAYOUTS)
def test_streamed_random_checkpoint_loads_as_random_weights(written, reference, layout):
    config, weights, found = ck.load_checkpoint(written[layout])
    assert found == layout == ck.detect_layout(written[layout])
    assert config == CONFIG
    _assert_same(weights, reference)
    mlp1 = weights.blocks[1].mlp.mlp1
    if layout == "hf-bf16":
        assert not mlp1.is_mxfp4 and mlp1.weight.dtype == torch.bfloat16
        # dense experts are exactly the dequantized MXFP4 ones
        ref = reference.blocks[1].mlp.mlp1
        assert torch.equal(mlp1.weight, mxfp4.dequantize(ref.blocks, ref.scales, torch.bfloat16))
    else:
        assert mlp1.is_mxfp4 and mlp1.blocks.dtype == torch.uint8
        assert torch.equal(mlp1.blocks, reference.blocks[1].mlp.mlp1.blocks)


@pytest.mark.parametrize("layout", ck.LAYOUTS)
def test_write_checkpoint_round_trip(tmp_path, reference, layout):
    ck.write_checkpoint(tmp_path / "w", CONFIG, reference, layout, max_shard_bytes=SHARD)
    config, weights, found = ck.load_checkpoint(tmp_path / "w")
    assert (config, found) == (CONFIG, layout)
    _assert_same(weights, reference)
    # loaded weights write back to the same bytes (hf-bf16 → hf-bf16; MXFP4 layouts → any)
    ck.write_checkpoint(tmp_path / "again", config, weights, layout, max_shard_bytes=SHARD)
    for f in sorted((tmp_path / "w").iterdir()):
        assert f.read_bytes() == (tmp_path / "again" / f.name).read_bytes(), f.name


def test_layouts_on_disk(written):
    hf, orig, bf16 = written["hf"], written["original"], written["hf-bf16"]
    assert sorted(p.name for p in orig.iterdir()) == ["config.json", "model.safetensors"]
    assert set(json.loads((orig / "config.json").read_text())) == set(CONFIG.original_dict())
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for s in shards for t in load_file(hf / s).values())
    assert json.loads((hf / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    assert "quantization_config" not in json.loads((bf16 / "config.json").read_text())
    # the streamed single file is a valid safetensors file for safetensors itself
    with safe_open(orig / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("block.1.mlp.mlp2_weight.blocks").shape == (8, 64, 2, 16)
        assert len(list(f.keys())) == 2 + 1 + 15 * CONFIG.num_hidden_layers


def test_repo_root_with_original_folder(written, tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(written["hf"] / "config.json", root / "config.json")
    shutil.copytree(written["original"], root / "original")
    assert ck.detect_layout(root) == "original"
    # ... but only when the root itself has no weights
    for f in written["hf"].iterdir():
        shutil.copy(f, root / f.name)
    assert ck.detect_layout(root) == "hf"


def test_random_weights_are_seeded_and_moderate():
    a, b, c = ck.random_weights(CONFIG, 0), ck.random_weights(CONFIG, 0), ck.random_weights(CONFIG, 1)
    _assert_same(a, b)
    assert not torch.equal(a.embedding, c.embedding)
    blk = a.blocks[0]
    assert blk.attn.qkv_weight.dtype == torch.bfloat16 and blk.mlp.mlp1.blocks.dtype == torch.uint8
    assert 0 < blk.attn.qkv_bias.abs().max() < 0.2 and blk.attn.sinks.unique().numel() == 4
    assert not torch.all(blk.attn.norm_scale == 1) and (blk.attn.norm_scale - 1).abs().max() <= 0.21
    # expert weights: r.m.s. ~ 1/sqrt(fan_in), so one expert maps O(1) inputs to O(1) outputs
    for lin, fan_in in ((blk.mlp.mlp1, CONFIG.hidden_size), (blk.mlp.mlp2, CONFIG.intermediate_size)):
        rms = lin.dense(torch.float32).pow(2).mean().sqrt().item()
        assert 0.5 < rms * fan_in**0.5 < 2, rms
    # logits of a random model are neither flat nor one-hot: unembed a normalised random state
    x = torch.randn(16, CONFIG.hidden_size, generator=torch.Generator().manual_seed(0))
    logits = x @ a.unembedding.float().T
    p = logits.softmax(-1)
    assert 0.5 < logits.std() < 3 and p.max() < 0.5


def test_fp4_scales_for_gpt_oss_20b_fan_in():
    # fan-in 2880 → E8M0 exponents 2^-9 … 2^-7 (bytes 118 … 120)
    assert ck._fp4_scale_exponent(2880) == -8


# ---- Hugging Face as the independent oracle of the layout -----------------------------------------

def _hf_model(path: Path, **kwargs):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.GptOssForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, output_loading_info=True, **kwargs)
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[k], (k, info[k])
    return model.state_dict()


def _ours_as_hf(w: ck.ModelWeights) -> dict[str, torch.Tensor]:
    q, kv = CONFIG.q_dim, CONFIG.kv_dim
    out = {"model.embed_tokens.weight": w.embedding, "model.norm.weight": w.norm_scale, "lm_head.weight": w.unembedding}
    for i, b in enumerate(w.blocks):
        p = f"model.layers.{i}."
        a, m = b.attn, b.mlp
        for j, (name, n) in enumerate((("q", q), ("k", kv), ("v", kv))):
            start = (0, q, q + kv)[j]
            out[p + f"self_attn.{name}_proj.weight"] = a.qkv_weight[start:start + n]
            out[p + f"self_attn.{name}_proj.bias"] = a.qkv_bias[start:start + n]
        out.update({p + "self_attn.sinks": a.sinks, p + "self_attn.o_proj.weight": a.out_weight,
                    p + "self_attn.o_proj.bias": a.out_bias, p + "input_layernorm.weight": a.norm_scale,
                    p + "post_attention_layernorm.weight": m.norm_scale, p + "mlp.router.weight": m.gate_weight,
                    p + "mlp.router.bias": m.gate_bias,
                    p + "mlp.experts.gate_up_proj": m.mlp1.dense(torch.float32).transpose(1, 2),
                    p + "mlp.experts.gate_up_proj_bias": m.mlp1.bias,
                    p + "mlp.experts.down_proj": m.mlp2.dense(torch.float32).transpose(1, 2),
                    p + "mlp.experts.down_proj_bias": m.mlp2.bias})
    return out


def test_transformers_loads_our_hf_bf16(written, reference):
    theirs = _hf_model(written["hf-bf16"])
    ours = _ours_as_hf(reference)
    assert theirs.keys() == ours.keys()
    for k, v in ours.items():
        assert theirs[k].shape == v.shape and torch.equal(theirs[k], v.float()), k


def test_transformers_dequantizes_our_hf_mxfp4(written, reference):
    transformers = pytest.importorskip("transformers")
    # On the CPU transformers cannot run MXFP4 natively; dequantize=True is its documented CPU path.
    theirs = _hf_model(written["hf"], quantization_config=transformers.Mxfp4Config(dequantize=True))
    ours = _ours_as_hf(reference)
    assert theirs.keys() == ours.keys()
    for k, v in ours.items():
        assert torch.equal(theirs[k].float(), v.float()), k


# ---- memory mapping -------------------------------------------------------------------------------

def _file_mappings() -> list[tuple[int, int, str]]:
    maps = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            maps.append((lo, hi, parts[5]))
    return maps


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc/self/maps")
@pytest.mark.parametrize("layout", ck.LAYOUTS)
def test_loaded_tensors_are_views_of_the_files(written, layout):
    _, w, _ = ck.load_checkpoint(written[layout])
    mlp2 = w.blocks[1].mlp.mlp2
    tensors = {"embedding": w.embedding, "unembedding": w.unembedding, "sinks": w.blocks[0].attn.sinks,
               "mlp2": mlp2.blocks if mlp2.is_mxfp4 else mlp2.weight}
    maps = _file_mappings()
    files = {}
    for what, t in tensors.items():
        ptr = t.data_ptr()
        files[what] = [Path(name) for lo, hi, name in maps if lo <= ptr < hi]
        assert files[what] and files[what][0].parent == written[layout].resolve(), (what, files[what])
    if layout == "hf-bf16":  # (E, I, D) on disk, (E, D, I) loaded: a transposed view, not a copy
        assert mlp2.weight.stride(1) == 1
    # the mapping is private: writing into a loaded tensor never changes the file
    before = files["embedding"][0].read_bytes()
    w.embedding[0, 0] += 1
    assert files["embedding"][0].read_bytes() == before


def test_safetensors_file_maps_without_copy(written):
    f = ck.SafetensorsFile(written["original"] / "model.safetensors")
    lo, hi = f.mapped_range()
    t = f.get("embedding.weight")
    assert lo <= t.data_ptr() < hi and t.data_ptr() + t.numel() * 2 <= hi


# ---- bad input: every error names the file, the tensor, what was expected and what was found --------

def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _error(path: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        ck.load_checkpoint(path)
    return str(e.value)


def _assert_names(msg: str, *parts: str) -> None:
    for p in parts:
        assert p in msg, f"{p!r} not in: {msg}"


def test_missing_tensor(written, tmp_path):
    d = _copy(written["original"], tmp_path)
    _rewrite(d / "model.safetensors", lambda t: t.pop("block.1.attn.sinks"))
    _assert_names(_error(d), "model.safetensors", "'block.1.attn.sinks'", "expected shape (4,)",
                  "num_attention_heads", "found no such tensor")


def test_extra_tensor(written, tmp_path):
    d = _copy(written["original"], tmp_path)
    _rewrite(d / "model.safetensors", lambda t: t.update({"block.2.attn.sinks": torch.zeros(4, dtype=torch.bfloat16)}))
    _assert_names(_error(d), "model.safetensors", "'block.2.attn.sinks'", "expected no such tensor",
                  "2 layers", "found one")


def test_wrong_shape(written, tmp_path):
    d = _copy(written["hf"], tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]
    _rewrite(d / shard, lambda t: t.update({name: t[name][:, :32].contiguous()}))
    _assert_names(_error(d), shard, repr(name), "expected shape (64, 64)",
                  "(num_attention_heads*head_dim, hidden_size from config.json)", "found (64, 32)")


def test_wrong_dtype(written, tmp_path):
    d = _copy(written["original"], tmp_path)
    name = "block.0.mlp.mlp1_weight.scales"
    _rewrite(d / "model.safetensors", lambda t: t.update({name: t[name].to(torch.int16)}))
    _assert_names(_error(d), "model.safetensors", repr(name), "expected dtype uint8", "found int16")


def test_truncated_file(written, tmp_path):
    d = _copy(written["original"], tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    # the last tensor in the file is the one cut off
    infos = ck.SafetensorsFile(written["original"] / "model.safetensors").tensors
    last = max(infos, key=lambda k: infos[k].begin)
    _assert_names(_error(d), "model.safetensors", repr(last), "expected its data at bytes", "truncated",
                  f"{len(data) - 100} bytes")
    f.write_bytes(data[:20])  # header cut
    _assert_names(_error(d), "model.safetensors", "expected a JSON header of", "found a file of only 20 bytes")


def test_index_points_at_missing_shard(written, tmp_path):
    d = _copy(written["hf"], tmp_path)
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.router.bias"
    (d / weight_map[name]).unlink()
    _assert_names(_error(d), "model.safetensors.index.json", repr(name),
                  f"expected its shard {weight_map[name]!r}", "found no such file")


def test_config_disagrees_with_tensors(written, tmp_path):
    d = _copy(written["hf"], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_local_experts"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    shard = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.0.mlp.router.weight"]
    _assert_names(_error(d), f"{shard}: tensor 'model.layers.0.mlp.router.weight': expected shape (4, 64) "
                  "(num_local_experts, hidden_size from config.json), found (8, 64)")


def test_unknown_config_key(written, tmp_path):
    d = _copy(written["original"], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_expert"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    _assert_names(_error(d), "config.json", "unknown key 'num_expert'", "known keys", "num_experts")


def test_config_format_must_match_layout(written, tmp_path):
    d = _copy(written["original"], tmp_path)
    shutil.copy(written["hf"] / "config.json", d / "config.json")
    _assert_names(_error(d), "config.json", "expected an original config.json", "found a Hugging Face one")


def test_write_is_atomic(tmp_path, reference):
    broken = ck.ModelWeights(embedding=reference.embedding, blocks=reference.blocks[:1],
                             norm_scale=reference.norm_scale, unembedding=reference.unembedding)
    with pytest.raises(CheckpointError, match="expected 2 blocks .num_hidden_layers from the config., found 1"):
        ck.write_checkpoint(tmp_path / "out", CONFIG, broken, "hf", max_shard_bytes=SHARD)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="non-empty"):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        ck.write_random_checkpoint(tmp_path / "full", CONFIG, "hf")


def test_dense_experts_cannot_be_written_as_mxfp4(written, tmp_path):
    _, w, _ = ck.load_checkpoint(written["hf-bf16"])
    with pytest.raises(CheckpointError, match="quantizing is lossy"):
        ck.write_checkpoint(tmp_path / "out", CONFIG, w, "original")


# ---- command line ---------------------------------------------------------------------------------

def test_cli_random_and_inspect(tmp_path, capsys):
    from mxmoe.core.cli import main

    out = tmp_path / "rand"
    assert main(["checkpoint", "random", "--preset", "tiny", "--format", "hf", "--seed", "3",
                 "--set", "vocab_size=256", "--set", "num_experts=4", "--max-shard-mb", "0.05", str(out)]) == 0
    config, w, layout = ck.load_checkpoint(out)
    assert (layout, config.vocab_size, config.num_experts) == ("hf", 256, 4)
    _assert_same(w, ck.random_weights(config, seed=3))
    assert len(list(out.glob("model-*.safetensors"))) > 1

    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(config.to_hf_dict()))
    assert main(["checkpoint", "random", "--config", str(cfg_file), "--set", "num_hidden_layers=1",
                 "--format", "original", str(tmp_path / "orig")]) == 0
    assert ck.load_checkpoint(tmp_path / "orig")[0].num_hidden_layers == 1

    capsys.readouterr()
    assert main(["checkpoint", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    _assert_names(text, "layout:    hf", f"tensors:   {3 + 19 * 2}", '"num_experts": 4', "MiB")

    assert main(["checkpoint", "random", "--set", "num_experts=x", str(tmp_path / "bad")]) == 2
    assert "num_experts" in capsys.readouterr().err and not (tmp_path / "bad").exists()


# ---- review fixes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../outside.safetensors", "/abs/outside.safetensors", "sub/x.safetensors", ".."])
def test_index_shard_must_be_a_file_name_inside_the_folder(written, tmp_path, bad):
    d = _copy(written["hf"], tmp_path)
    outside = tmp_path / "outside.safetensors"
    index = json.loads((d / ck.INDEX_FILE).read_text())
    name = "model.layers.0.mlp.router.bias"
    shutil.copy(d / index["weight_map"][name], outside)  # a readable file where ../ points
    index["weight_map"][name] = bad.replace("/abs/", f"{tmp_path}/")
    (d / ck.INDEX_FILE).write_text(json.dumps(index))
    _assert_names(_error(d), ck.INDEX_FILE, repr(name), "expected a shard file name inside",
                  repr(index["weight_map"][name]))


@pytest.mark.parametrize("weight_map, found", [([], "weight_map: expected an object, found list"),
                                                 (None, "weight_map: expected an object, found NoneType"),
                                                 ({"x": 3}, "found int")])
def test_bad_index_names_path_and_type(written, tmp_path, weight_map, found):
    d = _copy(written["hf"], tmp_path)
    (d / ck.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    _assert_names(_error(d), str(d / ck.INDEX_FILE), found)
    (d / ck.INDEX_FILE).write_text("[1]")
    _assert_names(_error(d), str(d / ck.INDEX_FILE), "expected a JSON object (with a weight_map), found list")
    (d / ck.INDEX_FILE).write_text("{")
    _assert_names(_error(d), str(d / ck.INDEX_FILE), "not valid JSON")
    (d / ck.INDEX_FILE).write_text("{}")
    _assert_names(_error(d), str(d / ck.INDEX_FILE), "weight_map: expected an object", "found no weight_map")


def _with(weights: ck.ModelWeights, **changes) -> ck.ModelWeights:
    """``weights`` with some tensors of block 0 replaced: attn_<field>= / mlp_<field>= / mlp1_<field>=."""
    import copy
    import dataclasses

    blocks = [copy.copy(b) for b in weights.blocks]
    b0 = blocks[0]
    attn, mlp = copy.copy(b0.attn), copy.copy(b0.mlp)
    mlp1 = copy.copy(mlp.mlp1)
    for key, value in changes.items():
        part, field = key.split("_", 1)
        setattr({"attn": attn, "mlp": mlp, "mlp1": mlp1}[part], field, value)
    mlp.mlp1 = mlp1
    blocks[0] = dataclasses.replace(b0, attn=attn, mlp=mlp)
    return dataclasses.replace(weights, blocks=blocks)


def _write_error(tmp_path: Path, weights: ck.ModelWeights, layout: str = "hf") -> str:
    with pytest.raises(CheckpointError) as e:
        ck.write_checkpoint(tmp_path / "out", CONFIG, weights, layout, max_shard_bytes=SHARD)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary folder
    return str(e.value)


def test_write_checkpoint_validates_weights(tmp_path, reference):
    qkv = reference.blocks[0].attn.qkv_weight
    _assert_names(_write_error(tmp_path, _with(reference, attn_qkv_weight=qkv[:, :32])),
                  "'block.0.attn.qkv.weight'", "expected shape (128, 64)", "found (128, 32)")
    _assert_names(_write_error(tmp_path, _with(reference, attn_sinks=torch.zeros(4, dtype=torch.int32))),
                  "'block.0.attn.sinks'", "expected dtype bfloat16 or float16 or float32", "found int32")
    scales = reference.blocks[0].mlp.mlp1.scales
    _assert_names(_write_error(tmp_path, _with(reference, mlp1_scales=scales.to(torch.int16)), "original"),
                  "'block.0.mlp.mlp1_weight.scales'", "expected dtype uint8", "found int16")
    # dense experts are checked against _DENSE_EXPERTS: (E, 2I, D)
    dense = reference.blocks[0].mlp.mlp1.dense(torch.bfloat16)
    bad = _with(reference, mlp1_blocks=None, mlp1_scales=None, mlp1_weight=dense[:, :, :32])
    _assert_names(_write_error(tmp_path, bad, "hf-bf16"), "'block.0.mlp.mlp1_weight'",
                  f"expected shape {tuple(dense.shape)}", f"found {(*dense.shape[:2], 32)}")


def test_hf_bf16_experts_are_dequantized_into_one_buffer(reference):
    flat = ck._flat_group(reference, 0)
    out = ck._to_layout(CONFIG, "hf-bf16", 0, flat)
    for hf, canonical in (("gate_up_proj", "mlp1_weight"), ("down_proj", "mlp2_weight")):
        t = out[f"model.layers.0.mlp.experts.{hf}"]
        assert t.is_contiguous() and t.dtype == torch.bfloat16  # written as is: no further copy
        want = mxfp4.dequantize(flat[f"block.0.mlp.{canonical}.blocks"], flat[f"block.0.mlp.{canonical}.scales"],
                                torch.bfloat16).transpose(1, 2)
        assert torch.equal(t, want)


def test_write_into_current_empty_folder(tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    ck.write_random_checkpoint(".", CONFIG, "original")
    assert sorted(p.name for p in Path.cwd().iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in here.iterdir()) == ["config.json", "model.safetensors"]
    assert ck.load_checkpoint(".")[2] == "original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]  # no temporary folder left beside it


def test_load_checkpoint_has_no_progress_parameter():
    import inspect

    assert "progress" not in inspect.signature(ck.load_checkpoint).parameters
    assert not hasattr(ck, "_progress_bar")


# ---- safetensors headers --------------------------------------------------------------------------

def _raw_file(path: Path, header, data: bytes = b"") -> Path:
    import struct

    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _header_error(path: Path, header, data: bytes = b"") -> str:
    from mxmoe.core.safetensors_io import read_header

    _raw_file(path, header, data)
    with pytest.raises(CheckpointError) as e:
        read_header(path)
    return str(e.value)


_GOOD = {"dtype": "U8", "shape": [2, 2], "data_offsets": [0, 4]}


@pytest.mark.parametrize("header, found", [
    (b"{not json", "expected a JSON header, found bytes that are not JSON"),
    ([1, 2], "expected a JSON object as header, found list"),
    ({"t": {**_GOOD, "dtype": "Q7"}}, "found 'Q7'"),
    ({"t": {**_GOOD, "dtype": ["U8"]}}, "found ['U8']"),
    ({"t": {**_GOOD, "data_offsets": [0, 3]}}, "expected data_offsets spanning 4 bytes"),
    ({"t": {**_GOOD, "data_offsets": [4, 0]}}, "found [4, 0]"),
    ({"t": {**_GOOD, "data_offsets": [0, 4, 8]}}, "data_offsets"),
    ({"t": {**_GOOD, "data_offsets": [0.0, 4.0]}}, "non-negative integers"),
    ({"t": {**_GOOD, "shape": [-2, -2]}}, "non-negative integers, found [-2, -2]"),
    ({"t": {**_GOOD, "shape": [2, 2.0]}}, "non-negative integers, found [2, 2.0]"),
    ({"t": {**_GOOD, "shape": [True, 4]}}, "non-negative integers"),
    ({"t": {**_GOOD, "shape": 4}}, "found 4"),
    ({"t": "x"}, "expected a header entry with dtype, shape and data_offsets, found 'x'"),
    ({"a": _GOOD, "b": {**_GOOD, "data_offsets": [2, 6]}}, "overlap"),
    ({"t": _GOOD, "__metadata__": [1]}, "__metadata__: expected an object of strings, found list"),
    ({"t": _GOOD, "__metadata__": {"format": 1}}, "__metadata__: expected an object of strings"),
])
def test_bad_safetensors_header(tmp_path, header, found):
    msg = _header_error(tmp_path / "original" / "model.safetensors", header, bytes(8))
    _assert_names(msg, str(Path("original") / "model.safetensors"), found)


def test_good_raw_header_reads(tmp_path):
    from mxmoe.core.safetensors_io import read_header

    path = _raw_file(tmp_path / "m.safetensors", {"a": _GOOD, "b": {**_GOOD, "data_offsets": [4, 8]},
                                                  "__metadata__": {"format": "pt"}}, bytes(8))
    tensors, meta = read_header(path)
    assert meta == {"format": "pt"} and [t.shape for t in tensors.values()] == [(2, 2), (2, 2)]


def test_write_streaming_errors_name_the_file(tmp_path):
    from mxmoe.core.safetensors_io import write_streaming

    path = tmp_path / "original" / "model.safetensors"
    path.parent.mkdir()
    with pytest.raises(ValueError, match=r"original/model\.safetensors: tensor 'x': produced torch.int8"):
        write_streaming(path, [("x", torch.uint8, (4,))], lambda n: iter([torch.zeros(4, dtype=torch.int8)]))
    with pytest.raises(ValueError, match=r"original/model\.safetensors: tensor 'x': produced 2 bytes, declared 4"):
        write_streaming(path, [("x", torch.uint8, (4,))], lambda n: iter([torch.zeros(2, dtype=torch.uint8)]))


# ---- what a user meets (issue 13): progress, nothing left behind, paths named ---------------------------

def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mxmoe.core.cli", "checkpoint", "random", *args],
                            stdout=subprocess.PIPE, **kw)


def test_progress_bar_counts_every_byte(tmp_path, monkeypatch):
    seen = {}

    @contextlib.contextmanager
    def bar(enabled, total, desc):
        seen[desc] = [enabled, total, 0]

        def update(n):
            seen[desc][2] += n
        yield update

    monkeypatch.setattr(ck, "_byte_bar", bar)
    for layout in ck.LAYOUTS:
        out = tmp_path / layout
        ck.write_random_checkpoint(out, CONFIG, layout, max_shard_bytes=SHARD, progress=True)
        on_disk = sum(i.nbytes for f in out.glob("*.safetensors") for i in ck.SafetensorsFile(f).tensors.values())
        assert seen[f"writing {layout}"] == [True, on_disk, on_disk], layout


def test_cli_shows_progress_on_a_terminal_and_is_quiet_otherwise(tmp_path):
    main_fd, term_fd = os.openpty()  # a terminal of unknown size, as some CI runners give
    proc = _cli("--format", "hf-bf16", str(tmp_path / "a"), stderr=term_fd)
    os.close(term_fd)
    seen = b""
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(main_fd)
    assert proc.wait(timeout=120) == 0
    text = seen.decode(errors="replace")
    assert "writing a: 100%" in text and "B/s" in text, text
    piped = _cli("--format", "hf-bf16", str(tmp_path / "b"), stderr=subprocess.PIPE, text=True)
    out, err = piped.communicate(timeout=120)
    assert piped.returncode == 0 and err == "" and out == f"wrote hf-bf16 checkpoint to {tmp_path / 'b'}\n"


def _start_big_write(out: Path) -> subprocess.Popen:
    """`mxmoe checkpoint random` of gpt-oss-20b's shapes (13 GB, minutes), once it has written 1 MiB."""
    proc = _cli("--preset", "gpt-oss-20b", "--format", "original", str(out), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        files = list(out.parent.glob(f".{out.name}.tmp-*/{ck.ORIGINAL_FILE}"))
        if files and files[0].stat().st_size > 2**20:
            return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the writer did not start writing: {proc.communicate()}")


def test_sigterm_during_random_removes_the_temporary_folder(tmp_path):
    proc = _start_big_write(tmp_path / "big")
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err == "mxmoe checkpoint random: stopped by SIGTERM; the partial checkpoint was removed\n"
    assert list(tmp_path.iterdir()) == []


def test_folder_of_a_killed_writer_is_removed_by_the_next_write(tmp_path, capsys):
    from mxmoe.core.cli import main

    out = tmp_path / "big"
    proc = _start_big_write(out)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.communicate(timeout=60)
    [left] = list(tmp_path.glob(".big.tmp-*"))
    assert left.name.startswith(f".big.tmp-{proc.pid}@")
    assert main(["checkpoint", "random", "--set", "vocab_size=512", str(out)]) == 0
    err = capsys.readouterr().err
    assert err == (f"mxmoe checkpoint random: {left}: removed the temporary folder of an earlier writer of {out} "
                   f"(pid {proc.pid}, no longer running: it was killed before it could clean up)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"] and ck.load_checkpoint(out)[2] == "hf"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_folders_of_running_or_unknown_writers(tmp_path, caplog):
    # a writer still running: refused, naming it
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = tmp_path / f".out.tmp-{sleeper.pid}@{ck._HOST}-abcd1234"
        live.mkdir()
        with pytest.raises(CheckpointError) as info:
            ck.write_random_checkpoint(tmp_path / "out", CONFIG, "original")
        assert str(info.value) == (f"{tmp_path / 'out'}: another writer (pid {sleeper.pid}) is writing it now, "
                                   f"into {live}; wait for it to finish, or remove that folder if no such writer runs")
    finally:
        sleeper.kill()
        sleeper.wait()
    ck.write_random_checkpoint(tmp_path / "out", CONFIG, "original")  # now it is gone: cleaned up
    assert not live.exists() and "removed the temporary folder" in caplog.text
    # writers that cannot be told (an older mxmoe, another host): warned about, left alone
    caplog.clear()
    older, other = tmp_path / ".two.tmp-k3j2h1g0", tmp_path / f".two.tmp-{_dead_pid()}@elsewhere-abcd1234"
    older.mkdir()
    other.mkdir()
    (tmp_path / ".twofold.tmp-1@x-y").mkdir()  # another checkpoint's: not looked at
    ck.write_random_checkpoint(tmp_path / "two", CONFIG, "original")
    assert older.exists() and other.exists() and ck.load_checkpoint(tmp_path / "two")[2] == "original"
    assert f"{older}: a temporary folder left by a writer of {tmp_path / 'two'} (an older mxmoe); cannot tell" \
        in caplog.text
    assert "(pid " in caplog.text and "on elsewhere); cannot tell" in caplog.text
    assert caplog.text.count("cannot tell") == 2
    # in an existing empty folder: a killed writer's folder there is removed, then the folder is empty
    here = tmp_path / "here"
    stale = here / f".checkpoint.tmp-{_dead_pid()}@{ck._HOST}-abcd1234"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    ck.write_random_checkpoint(here, CONFIG, "original")
    assert sorted(p.name for p in here.iterdir()) == ["config.json", "model.safetensors"]


def test_errors_about_the_output_place_name_it(tmp_path, capsys):
    from mxmoe.core.cli import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(CheckpointError) as info:
        ck.write_random_checkpoint(afile, CONFIG, "hf")
    assert str(info.value) == (f"{afile}: expected a new or empty directory to write the checkpoint into, "
                               f"found a file ({afile})")
    for below in (afile / "sub", afile / "sub" / "deeper"):
        with pytest.raises(CheckpointError) as info:
            ck.write_random_checkpoint(below, CONFIG, "hf")
        assert str(info.value) == f"{below}: cannot create the checkpoint directory there: {afile} is a file, " \
                                  "not a directory"
    full = tmp_path / "full"
    full.mkdir()
    for name in ("x", "y"):
        (full / name).write_text(name)
    with pytest.raises(CheckpointError, match=r"found an existing non-empty one \(holding x, y\)"):
        ck.write_random_checkpoint(full, CONFIG, "hf")
    assert main(["checkpoint", "random", str(afile / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mxmoe checkpoint random: {afile / 'sub'}: cannot create") and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "full"]
