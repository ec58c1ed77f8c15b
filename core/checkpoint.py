"""Checkpoints: read the three published gpt-oss layouts into canonical weights; write them, random.

Layouts (DESIGN.md, "Checkpoint formats to read"):

* ``original`` — the ``original/`` folder of the published models: original ``config.json`` and
  ``model.safetensors`` with tensors named ``block.N.…`` (these names are the canonical ones).
* ``hf`` — the Hugging Face repository root: HF ``config.json`` with ``quantization_config`` mxfp4,
  sharded ``model-0000x-of-0000y.safetensors`` + ``model.safetensors.index.json``, experts as
  ``mlp.experts.{gate_up_proj,down_proj}_{blocks,scales}``.
* ``hf-bf16`` — the same with experts dequantized: ``mlp.experts.gate_up_proj`` (E, D, 2I) and
  ``down_proj`` (E, I, D), what fine-tuning tools save.

Loading memory-maps every file and returns views of it: MXFP4 experts stay bytes, HF dense experts are
transposed views; only HF's separate q/k/v projections are concatenated (a copy). Everything is
validated before returning. Shape legend as in weights.py.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import mxfp4
from .config import ConfigError, ModelConfig, load_config, preset, PRESETS
from .safetensors_io import CheckpointError, SafetensorsFile, save_file, write_streaming
from .weights import AttentionWeights, BlockWeights, ExpertLinear, MLPWeights, ModelWeights

__all__ = ["CheckpointError", "LAYOUTS", "detect_layout", "load_checkpoint", "random_weights",
           "write_checkpoint", "write_random_checkpoint", "register_cli"]

LAYOUTS = ("original", "hf", "hf-bf16")
INDEX_FILE = "model.safetensors.index.json"
ORIGINAL_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30  # HF writes ~4.6 GB shards; smaller keeps the streaming writer's memory low
DENSE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PROGRESS_MIN_BYTES = 2**30  # progress=None shows a bar for checkpoints larger than this, on a terminal

log = logging.getLogger("mxmoe.checkpoint")

# ---- name maps: the only place where checkpoint tensor names appear ------------------------------
# Shapes are written with the letters of weights.py's legend; _DIM_NAMES says which config keys they
# come from, so errors can say why a shape was expected.

@dataclass(frozen=True)
class _Tensor:
    name: str  # canonical = original name; "{i}" is the layer
    shape: tuple[str, ...]
    kind: str  # "dense" (bf16/fp16/fp32) or "u8" (MXFP4 bytes)
    init: str  # how random_weights fills it (see _random_chunks)


_GLOBAL_HEAD = [_Tensor("embedding.weight", ("V", "D"), "dense", "embedding")]
_BLOCK = [
    _Tensor("block.{i}.attn.norm.scale", ("D",), "dense", "norm"),
    _Tensor("block.{i}.attn.qkv.weight", ("Q+2*KV", "D"), "dense", "linear"),
    _Tensor("block.{i}.attn.qkv.bias", ("Q+2*KV",), "dense", "bias"),
    _Tensor("block.{i}.attn.sinks", ("H",), "dense", "sinks"),
    _Tensor("block.{i}.attn.out.weight", ("D", "Q"), "dense", "linear"),
    _Tensor("block.{i}.attn.out.bias", ("D",), "dense", "bias"),
    _Tensor("block.{i}.mlp.norm.scale", ("D",), "dense", "norm"),
    _Tensor("block.{i}.mlp.gate.weight", ("E", "D"), "dense", "linear"),
    _Tensor("block.{i}.mlp.gate.bias", ("E",), "dense", "bias"),
    _Tensor("block.{i}.mlp.mlp1_weight.blocks", ("E", "2*I", "D/32", "16"), "u8", "fp4"),
    _Tensor("block.{i}.mlp.mlp1_weight.scales", ("E", "2*I", "D/32"), "u8", "scale"),
    _Tensor("block.{i}.mlp.mlp1_bias", ("E", "2*I"), "dense", "bias"),
    _Tensor("block.{i}.mlp.mlp2_weight.blocks", ("E", "D", "I/32", "16"), "u8", "fp4"),
    _Tensor("block.{i}.mlp.mlp2_weight.scales", ("E", "D", "I/32"), "u8", "scale"),
    _Tensor("block.{i}.mlp.mlp2_bias", ("E", "D"), "dense", "bias"),
]
_GLOBAL_TAIL = [_Tensor("norm.scale", ("D",), "dense", "norm"),
                _Tensor("unembedding.weight", ("V", "D"), "dense", "linear")]
# Canonical names of dense experts (hf-bf16 only): ExpertLinear.weight, (E, N, K).
_DENSE_EXPERTS = {"block.{i}.mlp.mlp1_weight": ("E", "2*I", "D"), "block.{i}.mlp.mlp2_weight": ("E", "D", "I")}


@dataclass(frozen=True)
class _HFTensor:
    name: str  # HF name
    shape: tuple[str, ...]
    kind: str
    canonical: str  # the canonical name it is (part of)
    part: str = ""  # "q"/"k"/"v": rows of qkv; "T": experts' weight transposed (E, K, N); "": identical
    layouts: tuple[str, ...] = ("hf", "hf-bf16")


_HF_GLOBAL_HEAD = [_HFTensor("model.embed_tokens.weight", ("V", "D"), "dense", "embedding.weight")]
_HF_BLOCK = [
    _HFTensor("model.layers.{i}.input_layernorm.weight", ("D",), "dense", "block.{i}.attn.norm.scale"),
    _HFTensor("model.layers.{i}.self_attn.q_proj.weight", ("Q", "D"), "dense", "block.{i}.attn.qkv.weight", "q"),
    _HFTensor("model.layers.{i}.self_attn.k_proj.weight", ("KV", "D"), "dense", "block.{i}.attn.qkv.weight", "k"),
    _HFTensor("model.layers.{i}.self_attn.v_proj.weight", ("KV", "D"), "dense", "block.{i}.attn.qkv.weight", "v"),
    _HFTensor("model.layers.{i}.self_attn.q_proj.bias", ("Q",), "dense", "block.{i}.attn.qkv.bias", "q"),
    _HFTensor("model.layers.{i}.self_attn.k_proj.bias", ("KV",), "dense", "block.{i}.attn.qkv.bias", "k"),
    _HFTensor("model.layers.{i}.self_attn.v_proj.bias", ("KV",), "dense", "block.{i}.attn.qkv.bias", "v"),
    _HFTensor("model.layers.{i}.self_attn.sinks", ("H",), "dense", "block.{i}.attn.sinks"),
    _HFTensor("model.layers.{i}.self_attn.o_proj.weight", ("D", "Q"), "dense", "block.{i}.attn.out.weight"),
    _HFTensor("model.layers.{i}.self_attn.o_proj.bias", ("D",), "dense", "block.{i}.attn.out.bias"),
    _HFTensor("model.layers.{i}.post_attention_layernorm.weight", ("D",), "dense", "block.{i}.mlp.norm.scale"),
    _HFTensor("model.layers.{i}.mlp.router.weight", ("E", "D"), "dense", "block.{i}.mlp.gate.weight"),
    _HFTensor("model.layers.{i}.mlp.router.bias", ("E",), "dense", "block.{i}.mlp.gate.bias"),
    _HFTensor("model.layers.{i}.mlp.experts.gate_up_proj_blocks", ("E", "2*I", "D/32", "16"), "u8",
              "block.{i}.mlp.mlp1_weight.blocks", layouts=("hf",)),
    _HFTensor("model.layers.{i}.mlp.experts.gate_up_proj_scales", ("E", "2*I", "D/32"), "u8",
              "block.{i}.mlp.mlp1_weight.scales", layouts=("hf",)),
    _HFTensor("model.layers.{i}.mlp.experts.gate_up_proj", ("E", "D", "2*I"), "dense",
              "block.{i}.mlp.mlp1_weight", "T", layouts=("hf-bf16",)),
    _HFTensor("model.layers.{i}.mlp.experts.gate_up_proj_bias", ("E", "2*I"), "dense", "block.{i}.mlp.mlp1_bias"),
    _HFTensor("model.layers.{i}.mlp.experts.down_proj_blocks", ("E", "D", "I/32", "16"), "u8",
              "block.{i}.mlp.mlp2_weight.blocks", layouts=("hf",)),
    _HFTensor("model.layers.{i}.mlp.experts.down_proj_scales", ("E", "D", "I/32"), "u8",
              "block.{i}.mlp.mlp2_weight.scales", layouts=("hf",)),
    _HFTensor("model.layers.{i}.mlp.experts.down_proj", ("E", "I", "D"), "dense",
              "block.{i}.mlp.mlp2_weight", "T", layouts=("hf-bf16",)),
    _HFTensor("model.layers.{i}.mlp.experts.down_proj_bias", ("E", "D"), "dense", "block.{i}.mlp.mlp2_bias"),
]
_HF_GLOBAL_TAIL = [_HFTensor("model.norm.weight", ("D",), "dense", "norm.scale"),
                   _HFTensor("lm_head.weight", ("V", "D"), "dense", "unembedding.weight")]

_DIM_NAMES = {"V": "vocab_size", "D": "hidden_size", "I": "intermediate_size", "E": "num_experts",
              "H": "num_attention_heads", "Q": "num_attention_heads*head_dim",
              "KV": "num_key_value_heads*head_dim"}
_HF_DIM_NAMES = {**_DIM_NAMES, "E": "num_local_experts"}


def _dims(config: ModelConfig) -> dict[str, int]:
    return {"V": config.vocab_size, "D": config.hidden_size, "I": config.intermediate_size,
            "E": config.num_experts, "H": config.num_attention_heads, "Q": config.q_dim, "KV": config.kv_dim}


def _eval_dim(expr: str, dims: dict[str, int]) -> int:
    """One dimension written as a sum of products/quotients of letters and integers ("Q+2*KV", "D/32")."""
    total = 0
    for term in expr.split("+"):
        value = 1
        for op, factor in re.findall(r"([*/]?)\s*(\w+)", "*" + term):
            n = int(factor) if factor.isdigit() else dims[factor]
            value = value * n if op == "*" else value // n
        total += value
    return total


def _eval_shape(shape: tuple[str, ...], dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(_eval_dim(s, dims) for s in shape)


def _describe_shape(shape: tuple[str, ...], names: dict[str, str]) -> str:
    return ", ".join(re.sub(r"[A-Z]+", lambda m: names[m.group(0)], s) for s in shape)


@dataclass(frozen=True)
class _Expected:
    name: str
    shape: tuple[int, ...]
    why: str  # "num_attention_heads*head_dim, hidden_size"
    kind: str

    def dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.uint8,) if self.kind == "u8" else DENSE_DTYPES


def _group_names(layout: str, group: int | str) -> list[tuple[_Tensor | _HFTensor, str]]:
    """(spec, concrete name) of one group: "head", a layer index, or "tail", in file order."""
    if layout == "original":
        specs: list = {"head": _GLOBAL_HEAD, "tail": _GLOBAL_TAIL}.get(group, _BLOCK)  # type: ignore[arg-type]
    else:
        specs = {"head": _HF_GLOBAL_HEAD, "tail": _HF_GLOBAL_TAIL}.get(group, _HF_BLOCK)  # type: ignore[arg-type]
        specs = [s for s in specs if layout in s.layouts]
    i = group if isinstance(group, int) else -1
    return [(s, s.name.format(i=i)) for s in specs]


def _groups(config: ModelConfig) -> list[int | str]:
    return ["head", *range(config.num_hidden_layers), "tail"]


def expected_tensors(config: ModelConfig, layout: str) -> dict[str, _Expected]:
    """Every tensor a checkpoint of ``layout`` must hold for ``config``, with shape and dtype kind."""
    dims = _dims(config)
    names = _DIM_NAMES if layout == "original" else _HF_DIM_NAMES
    out: dict[str, _Expected] = {}
    for group in _groups(config):
        for spec, name in _group_names(layout, group):
            out[name] = _Expected(name, _eval_shape(spec.shape, dims), _describe_shape(spec.shape, names), spec.kind)
    return out


# ---- canonical flat dict (original names) ↔ ModelWeights ------------------------------------------

def _weights_from_flat(config: ModelConfig, t: dict[str, torch.Tensor]) -> ModelWeights:
    def experts(i: int, n: int) -> ExpertLinear:
        p = f"block.{i}.mlp.mlp{n}_weight"
        if p in t:
            return ExpertLinear(bias=t[f"block.{i}.mlp.mlp{n}_bias"], weight=t[p])
        return ExpertLinear(bias=t[f"block.{i}.mlp.mlp{n}_bias"], blocks=t[p + ".blocks"], scales=t[p + ".scales"])

    blocks = []
    for i in range(config.num_hidden_layers):
        b = f"block.{i}."
        attn = AttentionWeights(norm_scale=t[b + "attn.norm.scale"], qkv_weight=t[b + "attn.qkv.weight"],
                                qkv_bias=t[b + "attn.qkv.bias"], sinks=t[b + "attn.sinks"],
                                out_weight=t[b + "attn.out.weight"], out_bias=t[b + "attn.out.bias"])
        mlp = MLPWeights(norm_scale=t[b + "mlp.norm.scale"], gate_weight=t[b + "mlp.gate.weight"],
                         gate_bias=t[b + "mlp.gate.bias"], mlp1=experts(i, 1), mlp2=experts(i, 2))
        blocks.append(BlockWeights(attn=attn, mlp=mlp))
    return ModelWeights(embedding=t["embedding.weight"], blocks=blocks, norm_scale=t["norm.scale"],
                        unembedding=t["unembedding.weight"])


def _flat_group(weights: ModelWeights, group: int | str) -> dict[str, torch.Tensor]:
    """Canonical tensors of one group of ``weights`` (dense experts under ``…mlpN_weight``)."""
    if group == "head":
        return {"embedding.weight": weights.embedding}
    if group == "tail":
        return {"norm.scale": weights.norm_scale, "unembedding.weight": weights.unembedding}
    blk, b = weights.blocks[group], f"block.{group}."
    a, m = blk.attn, blk.mlp
    out = {b + "attn.norm.scale": a.norm_scale, b + "attn.qkv.weight": a.qkv_weight, b + "attn.qkv.bias": a.qkv_bias,
           b + "attn.sinks": a.sinks, b + "attn.out.weight": a.out_weight, b + "attn.out.bias": a.out_bias,
           b + "mlp.norm.scale": m.norm_scale, b + "mlp.gate.weight": m.gate_weight, b + "mlp.gate.bias": m.gate_bias}
    for n, lin in ((1, m.mlp1), (2, m.mlp2)):
        out[f"{b}mlp.mlp{n}_bias"] = lin.bias
        if lin.is_mxfp4:
            out[f"{b}mlp.mlp{n}_weight.blocks"] = lin.blocks
            out[f"{b}mlp.mlp{n}_weight.scales"] = lin.scales
        else:
            out[f"{b}mlp.mlp{n}_weight"] = lin.weight
    return out


def _to_layout(config: ModelConfig, layout: str, group: int | str,
               flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical tensors of a group → the tensors a ``layout`` file stores (in file order)."""
    out: dict[str, torch.Tensor] = {}
    q, kv = config.q_dim, config.kv_dim
    for spec, name in _group_names(layout, group):
        if isinstance(spec, _Tensor) or spec.part == "":
            src = spec.name.format(i=group) if isinstance(spec, _Tensor) else spec.canonical.format(i=group)
            if src not in flat:
                raise CheckpointError(f"cannot write layout {layout!r}: tensor {name!r} needs MXFP4 experts, "
                                      "found dense ones (quantizing is lossy and not done here)")
            out[name] = flat[src]
            continue
        canonical = spec.canonical.format(i=group)
        if spec.part in "qkv":
            start = {"q": 0, "k": q, "v": q + kv}[spec.part]
            out[name] = flat[canonical][start:start + (q if spec.part == "q" else kv)]
        else:  # "T": dense experts, from MXFP4 (exact in bf16) or as they are
            if canonical in flat:
                out[name] = flat[canonical].transpose(1, 2)  # the writer makes it contiguous (one copy)
            else:
                # Straight into the (E, K, N) tensor the file stores, one expert at a time: peak memory
                # is that tensor plus one expert's dequantized (N, K) and its int32 indices, and the
                # result is already contiguous, so the writer copies nothing more.
                blocks, scales = flat[canonical + ".blocks"], flat[canonical + ".scales"]
                experts, n, k = blocks.shape[0], blocks.shape[1], blocks.shape[2] * mxfp4.VALUES_PER_BLOCK
                dense = torch.empty((experts, k, n), dtype=torch.bfloat16, device=blocks.device)
                for e in range(experts):
                    dense[e] = mxfp4.dequantize(blocks[e], scales[e], torch.bfloat16).T
                out[name] = dense
    return out


def _from_layout(config: ModelConfig, layout: str, t: dict[str, torch.Tensor],
                 qkv_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a ``layout`` checkpoint (validated) → canonical flat dict; with ``qkv_rows`` (ascending
    rows of the canonical qkv), only those rows of every qkv weight and bias, read without the others."""
    if layout == "original":
        if qkv_rows is not None:
            t = {name: x[qkv_rows] if ".attn.qkv." in name else x for name, x in t.items()}
        return t
    flat: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for group in _groups(config):
        for spec, name in _group_names(layout, group):
            canonical = spec.canonical.format(i=group)
            if spec.part == "":
                flat[canonical] = t[name]
            elif spec.part == "T":
                flat[canonical] = t[name].transpose(1, 2)  # a view: (E, K, N) → (E, N, K)
            else:
                parts.setdefault(canonical, {})[spec.part] = t[name]
    if qkv_rows is not None:  # each part's own rows, before the concatenation (q, k, v rows ascending)
        q, kv = config.q_dim, config.kv_dim
        bounds = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
        for p in parts.values():
            for part, (lo, hi) in bounds.items():
                p[part] = p[part][qkv_rows[(qkv_rows >= lo) & (qkv_rows < hi)] - lo]
    for canonical, p in parts.items():
        dtype = p["q"].dtype
        flat[canonical] = torch.cat([p["q"], p["k"].to(dtype), p["v"].to(dtype)])  # the one copy at load
    return flat


# ---- detection and loading ---------------------------------------------------------------------

def _weight_files(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("*.safetensors") if p.is_file())


@dataclass
class _Listing:
    """What :func:`_resolve` read to tell the layout, handed on so that :func:`_check` reads nothing twice:
    the index's weight_map (sharded checkpoints) or the opened files (the others)."""
    weight_map: dict[str, str] | None
    files: dict[str, SafetensorsFile] | None


def _resolve(path: str | Path) -> tuple[Path, str, _Listing]:
    """(directory holding the weights, layout, what was read to tell it)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: expected a checkpoint directory (config.json + *.safetensors), "
                              f"found {'a file' if root.exists() else 'nothing'}")
    d = root
    if not _weight_files(root) and not (root / INDEX_FILE).exists():
        if (root / "original").is_dir() and _weight_files(root / "original"):
            d = root / "original"
        else:
            raise CheckpointError(f"{root}: expected *.safetensors weight files (or an original/ folder with "
                                  "them), found none")
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d}: expected config.json beside the weights, found none")
    if (d / INDEX_FILE).exists():
        listing = _Listing(_read_index(d), None)
        names = list(listing.weight_map)
    else:
        listing = _Listing(None, {p.name: SafetensorsFile(p) for p in _weight_files(d)})
        names = [n for f in listing.files.values() for n in f.tensors]
    if any(n.startswith("block.") or n == "embedding.weight" for n in names):
        layout = "original"
    elif any(n.endswith("mlp.experts.gate_up_proj_blocks") for n in names):
        layout = "hf"
    elif any(n.endswith("mlp.experts.gate_up_proj") for n in names):
        layout = "hf-bf16"
    else:
        raise CheckpointError(f"{d}: expected tensors named block.N.… (original) or model.layers.N.… with "
                              "mlp.experts.gate_up_proj[_blocks] (Hugging Face), found "
                              f"{', '.join(sorted(names)[:5]) or 'no tensors'}")
    return d, layout, listing


def detect_layout(path: str | Path) -> str:
    """"original", "hf" (MXFP4 experts) or "hf-bf16" (dense experts), from the tensor names.

    An HF repository root whose weights are only in ``original/`` is read as "original"."""
    return _resolve(path)[1]


def _read_index(d: Path) -> dict[str, str]:
    p = d / INDEX_FILE
    try:
        index = json.loads(p.read_text())
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: expected JSON with a weight_map of tensor name → shard file, "
                              f"found text that is not valid JSON ({e})") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{p}: expected a JSON object (with a weight_map), found {type(index).__name__}")
    if "weight_map" not in index:
        raise CheckpointError(f"{p}: weight_map: expected an object (tensor name → shard file), found no "
                              f"weight_map (keys: {', '.join(map(repr, index)) or 'none'})")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{p}: weight_map: expected an object, found {type(weight_map).__name__} "
                              "(it maps tensor names to shard files)")
    for tname, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{p}: weight_map[{tname!r}]: expected a shard file name (a string), "
                                  f"found {type(shard).__name__} {shard!r}")
    return weight_map


def _is_plain_file_name(name: str) -> bool:
    """A name of a file directly inside a folder: no separator, not absolute, not "." or ".."."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and Path(name).name == name


def _load_config(d: Path, layout: str) -> ModelConfig:
    path = d / "config.json"
    try:
        raw = json.loads(path.read_text())
        config = load_config(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    is_hf = "model_type" in raw or "architectures" in raw
    if layout == "original" and is_hf:
        raise CheckpointError(f"{path}: the tensors are in the original layout (block.N.…), so expected an "
                              "original config.json, found a Hugging Face one (model_type/architectures)")
    if layout != "original":
        if not is_hf:
            raise CheckpointError(f"{path}: the tensors are in the Hugging Face layout (model.layers.N.…), so "
                                  "expected a Hugging Face config.json (model_type 'gpt_oss'), found an original one")
        method = (raw.get("quantization_config") or {}).get("quant_method")
        if layout == "hf" and method != "mxfp4":
            raise CheckpointError(f"{path}: the experts are MXFP4 (…_blocks/_scales tensors), so expected "
                                  f"quantization_config.quant_method 'mxfp4', found {method!r}")
        if layout == "hf-bf16" and method is not None:
            raise CheckpointError(f"{path}: the experts are dense (gate_up_proj/down_proj), so expected no "
                                  f"quantization_config, found quant_method {method!r}")
    return config


def _check(d: Path, config: ModelConfig, layout: str, listing: _Listing) -> dict[str, SafetensorsFile]:
    """Open every file and check every tensor against the config; returns tensor name → file."""
    problems: list[str] = []
    files: dict[str, SafetensorsFile] = {}
    where: dict[str, SafetensorsFile] = {}
    if listing.weight_map is not None:
        weight_map = listing.weight_map
        for tname, shard in weight_map.items():
            if not _is_plain_file_name(shard):
                problems.append(f"{d / INDEX_FILE}: tensor {tname!r}: expected a shard file name inside {d} "
                                f"(no folder, not absolute), found {shard!r}")
                continue
            if shard not in files:
                if not (d / shard).is_file():
                    problems.append(f"{INDEX_FILE}: tensor {tname!r}: expected its shard {shard!r} in {d}, "
                                    "found no such file")
                    continue
                files[shard] = SafetensorsFile(d / shard)
            if tname not in files[shard].tensors:
                problems.append(f"{INDEX_FILE}: tensor {tname!r}: expected in {shard}, found not there")
        for shard, f in files.items():
            for tname in f.tensors:
                if weight_map.get(tname) != shard:
                    problems.append(f"{shard}: tensor {tname!r}: expected in weight_map of {INDEX_FILE} "
                                    f"under this shard, found {weight_map.get(tname)!r}")
    else:
        files = dict(listing.files or {})
    for fname, f in files.items():
        for tname in f.tensors:
            if tname in where and where[tname] is not f:
                problems.append(f"{fname}: tensor {tname!r}: expected once, found also in {where[tname].path.name}")
            where.setdefault(tname, f)

    expected = expected_tensors(config, layout)
    src = "config.json"
    for name, exp in expected.items():
        if name not in where:
            problems.append(f"{', '.join(files) or d}: tensor {name!r}: expected shape {exp.shape} ({exp.why} "
                            f"from {src}), found no such tensor")
            continue
        info = where[name].tensors[name]
        fname = where[name].path.name
        if info.shape != exp.shape:
            problems.append(f"{fname}: tensor {name!r}: expected shape {exp.shape} ({exp.why} from {src}), "
                            f"found {info.shape}")
        if info.dtype not in exp.dtypes():
            problems.append(f"{fname}: tensor {name!r}: expected dtype "
                            f"{' or '.join(str(t).removeprefix('torch.') for t in exp.dtypes())}, "
                            f"found {str(info.dtype).removeprefix('torch.')}")
    for name, f in where.items():
        if name not in expected:
            info = f.tensors[name]
            problems.append(f"{f.path.name}: tensor {name!r}: expected no such tensor in a {layout!r} checkpoint "
                            f"of {config.num_hidden_layers} layers, found one ({info.shape}, "
                            f"{str(info.dtype).removeprefix('torch.')})")
    if problems:
        shown = problems[:20] + ([f"… and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError(f"{d}: not a valid {layout!r} checkpoint:\n  " + "\n  ".join(shown)
                              if len(problems) > 1 else problems[0])
    return where


def load_checkpoint(path: str | Path, qkv_rows: Callable[[ModelConfig], torch.Tensor] | None = None
                    ) -> tuple[ModelConfig, ModelWeights, str]:
    """Read a checkpoint directory in any of the three layouts → (config, canonical weights, layout).

    Tensors are zero-copy views of the memory-mapped files (experts stay MXFP4 when stored so); only
    HF's q/k/v are concatenated. Nothing is read here beyond headers and index: the bytes are read
    when the tensors are first used. Everything is validated first: a bad checkpoint raises
    :class:`CheckpointError` naming the file, the tensor, what was expected and what was found.

    ``qkv_rows(config)``: the rows of every layer's qkv weight and bias to keep (ascending; a tensor-parallel
    rank's heads, core/parallel.py): only those are read, in every layout."""
    return _load(path, qkv_rows)[:3]


def _load(path: str | Path, qkv_rows: Callable[[ModelConfig], torch.Tensor] | None = None
          ) -> tuple[ModelConfig, ModelWeights, str, Path, dict[str, SafetensorsFile]]:
    """:func:`load_checkpoint`, plus the weights' directory and tensor name → file."""
    d, layout, listing = _resolve(path)
    config = _load_config(d, layout)
    where = _check(d, config, layout, listing)
    tensors = {name: f.get(name) for name, f in where.items()}
    rows = None if qkv_rows is None else qkv_rows(config)
    weights = _weights_from_flat(config, _from_layout(config, layout, tensors, rows))
    return config, weights, layout, d, where


# ---- random weights ------------------------------------------------------------------------------
# Scales keep a random model's activations O(1), so its logits are neither flat nor one-hot:
# linear weights ~ N(0, 1/fan_in); embedding rows ~ N(0, 1); biases ~ N(0, 0.02²); sinks ~ N(0, 1);
# norm scales ~ U(0.8, 1.2). MXFP4 experts: uniformly random bytes (E2M1 codes, r.m.s. ≈ 2.93) with
# E8M0 scales 2^(e0 + {-1, 0, 1}), e0 chosen so that the r.m.s. weight is ≈ 1/sqrt(fan_in)
# (gpt-oss-20b: fan-in 2880 → scales 2^-9 … 2^-7).

_E2M1_RMS = math.sqrt(sum(v * v for v in mxfp4.E2M1_VALUES) / 16)  # ≈ 2.93
_SCALE_SPREAD_RMS = math.sqrt((0.25 + 1 + 4) / 3)  # r.m.s. of 2^{-1,0,1}
_CHUNK_ELEMS = 2**24  # tensors are generated in row chunks of at most this many elements


def _seed_of(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _fp4_scale_exponent(fan_in: int) -> int:
    return round(math.log2(1 / (math.sqrt(fan_in) * _E2M1_RMS * _SCALE_SPREAD_RMS)))


def _random_chunks(spec: _Tensor, name: str, shape: tuple[int, ...], seed: int) -> Iterator[torch.Tensor]:
    """Tensor ``name`` of a random model, in row chunks; the same chunks whoever asks (seeded per chunk)."""
    row = math.prod(shape[1:])
    rows_per_chunk = max(1, _CHUNK_ELEMS // max(row, 1))
    for c, r0 in enumerate(range(0, shape[0], rows_per_chunk)):
        g = torch.Generator().manual_seed(_seed_of(seed, name, c))
        cshape = (min(rows_per_chunk, shape[0] - r0), *shape[1:])
        if spec.init == "fp4":
            yield torch.randint(0, 256, cshape, dtype=torch.uint8, generator=g)
        elif spec.init == "scale":
            fan_in = cshape[-1] * mxfp4.VALUES_PER_BLOCK
            e0 = _fp4_scale_exponent(fan_in) + mxfp4.SCALE_BIAS
            yield torch.randint(e0 - 1, e0 + 2, cshape, generator=g).to(torch.uint8)
        elif spec.init == "norm":
            yield (torch.rand(cshape, generator=g) * 0.4 + 0.8).to(torch.bfloat16)
        else:
            std = {"embedding": 1.0, "sinks": 1.0, "bias": 0.02}.get(spec.init) or 1 / math.sqrt(shape[-1])
            yield torch.randn(cshape, generator=g, dtype=torch.bfloat16).mul_(std)


def _random_group(config: ModelConfig, seed: int, group: int | str) -> dict[str, torch.Tensor]:
    dims = _dims(config)
    out = {}
    for spec, name in _group_names("original", group):
        shape = _eval_shape(spec.shape, dims)
        out[name] = torch.cat(list(_random_chunks(spec, name, shape, seed)))
    return out


def random_weights(config: ModelConfig, seed: int = 0) -> ModelWeights:
    """A random model (bf16 dense, MXFP4 experts), the same for the same config and seed; its
    activations stay O(1) (see the scales above). Holds the whole model: for large configs write
    it with :func:`write_random_checkpoint` instead, which streams."""
    flat: dict[str, torch.Tensor] = {}
    for group in _groups(config):
        flat.update(_random_group(config, seed, group))
    return _weights_from_flat(config, flat)


# ---- writing -------------------------------------------------------------------------------------

def _config_json(config: ModelConfig, layout: str) -> dict[str, Any]:
    if layout == "original":
        return config.original_dict()
    return config.to_hf_dict(quantized=layout == "hf")


# A writer's temporary folder is named after what it writes and who writes it, ``.OUT.tmp-PID@HOST-XXXXXXXX``
# (beside a new OUT; ``.checkpoint.tmp-…`` inside an existing empty one), so that the next writer to the
# same place can tell a folder left by a killed writer (removed) from one that is still being written.
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "localhost"
_IN_PLACE_NAME = "checkpoint"


def _tmp_prefix(name: str) -> str:
    return f".{name}.tmp-{os.getpid()}@{_HOST}-"


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists is checked
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _clear_stale(folder: Path, name: str, target: Path | str) -> None:
    """Deal with the temporary folders ``.{name}.tmp-*`` in ``folder`` that earlier writers of ``target``
    left: remove those whose writer no longer runs (killed, so it could not clean up), refuse when one
    still runs, and warn about those whose writer cannot be told (another host, an older mxmoe)."""
    pattern = re.compile(rf"\.{re.escape(name)}\.tmp-(?:(\d+)@([A-Za-z0-9._-]+)-)?[A-Za-z0-9_]+")
    for p in sorted(folder.iterdir()):
        m = pattern.fullmatch(p.name)
        if m is None or not p.is_dir() or p.is_symlink():
            continue
        pid, host = m.group(1), m.group(2)
        if pid is None or host != _HOST or os.name != "posix":
            where = f"pid {pid} on {host}" if pid else "an older mxmoe"
            log.warning(f"{p}: a temporary folder left by a writer of {target} ({where}); cannot tell whether it "
                        "still runs, so it is left alone: remove it once no writer of that checkpoint runs")
        elif _process_runs(int(pid)):
            raise CheckpointError(f"{target}: another writer (pid {pid}) is writing it now, into {p}; wait for it "
                                  "to finish, or remove that folder if no such writer runs")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done = "could not remove" if p.exists() else "removed"
            log.warning(f"{p}: {done} the temporary folder of an earlier writer of {target} (pid {pid}, no longer "
                        "running: it was killed before it could clean up)")


@contextlib.contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    """A temporary directory whose files become ``path``'s on success; removed on failure.

    A new ``path``: the temporary directory is a sibling, renamed to ``path`` at the end, so the
    checkpoint appears complete or not at all. An existing empty ``path`` (the current folder, say) is
    kept, since renaming over it would leave whoever sits in it in a deleted folder: the temporary
    directory is made inside it and its files moved out at the end, config.json last (without it the
    folder is no checkpoint). Temporary folders of earlier writers killed while writing to the same
    place are removed first (see :func:`_clear_stale`)."""
    given = path
    path = Path(path).resolve()  # "." (or "x/..") has no name and no usable parent until resolved
    existing = path.exists()
    if existing and not path.is_dir():
        raise CheckpointError(f"{given}: expected a new or empty directory to write the checkpoint into, "
                              f"found a file ({path})")
    try:
        if existing:
            _clear_stale(path, _IN_PLACE_NAME, given)
            entries = sorted(p.name for p in path.iterdir())
            if entries:
                shown = ", ".join(entries[:5]) + (f", … ({len(entries)} entries)" if len(entries) > 5 else "")
                raise CheckpointError(f"{given}: expected a new or empty directory to write the checkpoint into, "
                                      f"found an existing non-empty one (holding {shown})")
            tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(_IN_PLACE_NAME), dir=path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            _clear_stale(path.parent, path.name, given)
            tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path.name), dir=path.parent))
    except (FileExistsError, NotADirectoryError) as e:  # a file where a parent folder should be
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), e.filename)
        raise CheckpointError(f"{given}: cannot create the checkpoint directory there: {blocker} is a file, "
                              "not a directory") from None
    except PermissionError as e:
        raise CheckpointError(f"{given}: cannot create the checkpoint directory there ({e})") from None
    moved: list[Path] = []
    try:
        yield tmp
        # mkdtemp and the safetensors writer create private (0700/0600) entries; give the usual ones.
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        if existing:
            for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
                os.replace(f, path / f.name)
                moved.append(path / f.name)
            tmp.rmdir()
        else:
            tmp.chmod(0o777 & ~umask)
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for f in moved:
            f.unlink(missing_ok=True)
        raise


def _write_groups(path: Path, groups: Iterator[dict[str, torch.Tensor]], max_shard_bytes: int,
                  on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Write HF shards from a stream of groups of layout tensors, flushing a shard when it would overflow;
    ``on_bytes(n)`` is told of each tensor's bytes once it is made."""
    shards: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, path / f".shard-{len(shards):05d}.safetensors")
            shards.append(list(pending))
            pending, pending_bytes = {}, 0

    for group in groups:
        for name, t in group.items():
            nbytes = t.numel() * t.element_size()
            if pending and pending_bytes + nbytes > max_shard_bytes:
                flush()
            pending[name] = t.contiguous()
            pending_bytes += nbytes
            on_bytes(nbytes)
        del group
    flush()
    n = len(shards)
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        os.replace(path / f".shard-{k:05d}.safetensors", path / final)
        weight_map.update({name: final for name in names})
        total += sum(i.nbytes for i in SafetensorsFile(path / final).tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _check_weights(config: ModelConfig, weights: ModelWeights) -> None:
    """Check ``weights`` against ``config`` before writing anything: the number of blocks, and the shape
    and dtype kind of every tensor (MXFP4 experts as in :func:`expected_tensors`, dense ones as in
    ``_DENSE_EXPERTS``). Raises :class:`CheckpointError` naming the tensor, expected and found."""
    src = "from the config"
    n = config.num_hidden_layers
    if len(weights.blocks) != n:
        raise CheckpointError(f"weights: expected {n} blocks (num_hidden_layers {src}), "
                              f"found {len(weights.blocks)}")
    expected = expected_tensors(config, "original")
    dims = _dims(config)
    for i in range(n):
        for pattern, shape in _DENSE_EXPERTS.items():
            for suffix in (".blocks", ".scales"):
                expected.pop(pattern.format(i=i) + suffix)
            name = pattern.format(i=i)
            # filled in below with whichever form the weights hold
            expected[name] = _Expected(name, _eval_shape(shape, dims), _describe_shape(shape, _DIM_NAMES), "dense")
    flat: dict[str, torch.Tensor] = {}
    for group in _groups(config):
        flat.update(_flat_group(weights, group))
    problems = []
    for name, exp in expected.items():
        if name in flat:
            checks = [(name, exp, flat[name])]
        elif name + ".blocks" in flat:  # MXFP4 experts: check their bytes, not the dense shape
            spec = {s.name.format(i=name.split(".")[1]): s for s in _BLOCK}
            checks = [(part, _Expected(part, _eval_shape(spec[part].shape, dims),
                                       _describe_shape(spec[part].shape, _DIM_NAMES), "u8"), flat[part])
                      for part in (name + ".blocks", name + ".scales")]
        else:
            checks = [(name, exp, None)]
        for tname, e, t in checks:
            if not isinstance(t, torch.Tensor):
                problems.append(f"weights: tensor {tname!r}: expected shape {e.shape} ({e.why} {src}), found "
                                f"{'none' if t is None else type(t).__name__}")
                continue
            if tuple(t.shape) != e.shape:
                problems.append(f"weights: tensor {tname!r}: expected shape {e.shape} ({e.why} {src}), "
                                f"found {tuple(t.shape)}")
            if t.dtype not in e.dtypes():
                problems.append(f"weights: tensor {tname!r}: expected dtype "
                                f"{' or '.join(str(d).removeprefix('torch.') for d in e.dtypes())}, "
                                f"found {str(t.dtype).removeprefix('torch.')}")
    if problems:
        shown = problems[:20] + ([f"… and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError("weights do not match the config:\n  " + "\n  ".join(shown)
                              if len(problems) > 1 else problems[0])


def write_checkpoint(path: str | Path, config: ModelConfig, weights: ModelWeights, layout: str,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write ``weights`` as a ``layout`` checkpoint directory, exactly as the published models are
    laid out ("original": config.json + model.safetensors; "hf"/"hf-bf16": config.json + shards +
    index). Atomic: the directory appears complete or not at all."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    _check_weights(config, weights)
    with _atomic_dir(Path(path)) as tmp:
        (tmp / "config.json").write_text(json.dumps(_config_json(config, layout), indent=2) + "\n")
        groups = (_to_layout(config, layout, g, _flat_group(weights, g)) for g in _groups(config))
        if layout == "original":
            tensors: dict[str, torch.Tensor] = {}
            for g in groups:
                tensors.update(g)
            save_file(tensors, tmp / ORIGINAL_FILE)
        else:
            _write_groups(tmp, groups, max_shard_bytes)


@contextlib.contextmanager
def _byte_bar(enabled: bool | None, total: int, desc: str) -> Iterator[Callable[[int], None]]:
    """``update(n)`` of a tqdm bar over ``total`` bytes on stderr when ``enabled`` (None: on a terminal,
    for more than PROGRESS_MIN_BYTES); a no-op otherwise, so that logs and pipes stay quiet."""
    if enabled is None:
        enabled = total > PROGRESS_MIN_BYTES and sys.stderr.isatty()
    if not enabled:
        yield lambda n: None
        return
    from tqdm import tqdm

    try:  # a terminal that reports no size (a bare pty) would get no bar at all from tqdm
        columns, lines = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        columns, lines = 0, 0
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              ncols=min(columns or 80, 120), nrows=lines or 24) as bar:
        yield bar.update


def _layout_bytes(config: ModelConfig, layout: str) -> int:
    """Bytes of the tensors of a random ``layout`` checkpoint (bf16 dense, u8 MXFP4)."""
    return sum(math.prod(e.shape) * (1 if e.kind == "u8" else 2) for e in expected_tensors(config, layout).values())


def write_random_checkpoint(path: str | Path, config: ModelConfig, layout: str, seed: int = 0,
                            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool | None = None) -> None:
    """Write ``random_weights(config, seed)`` as a ``layout`` checkpoint without holding the model:
    "original" streams one chunk at a time into its single file; HF layouts hold one shard at most.
    ``progress``: a bar over the bytes on stderr (True), none (False), or None: one for checkpoints over
    1 GiB when stderr is a terminal (gpt-oss-20b's shapes take minutes)."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    total = _layout_bytes(config, layout)
    with _atomic_dir(Path(path)) as tmp, _byte_bar(progress, total, f"writing {Path(path).name or path}") as bar:
        (tmp / "config.json").write_text(json.dumps(_config_json(config, layout), indent=2) + "\n")
        if layout == "original":
            dims = _dims(config)
            specs = {name: (spec, _eval_shape(spec.shape, dims))
                     for g in _groups(config) for spec, name in _group_names(layout, g)}
            entries = [(name, torch.uint8 if spec.kind == "u8" else torch.bfloat16, shape)
                       for name, (spec, shape) in specs.items()]
            write_streaming(tmp / ORIGINAL_FILE, entries,
                            lambda name: _random_chunks(specs[name][0], name, specs[name][1], seed), on_bytes=bar)
        else:
            groups = (_to_layout(config, layout, g, _random_group(config, seed, g)) for g in _groups(config))
            _write_groups(tmp, groups, max_shard_bytes, bar)


# ---- command line --------------------------------------------------------------------------------

def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CheckpointError(f"--set {item!r}: expected key=value (e.g. num_experts=4)")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


class _Terminated(BaseException):
    """SIGTERM/SIGHUP, raised where the writer is so that its temporary folder is cleaned up as after
    Ctrl-C (a BaseException: no ``except Exception`` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While writing: a termination signal raises :class:`_Terminated` instead of killing the process
    outright, which would leave a temporary folder of gigabytes behind."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return

    def handler(signum, frame):
        signal.signal(signum, signal.SIG_IGN)  # a second one must not cut the clean-up short
        raise _Terminated(signum)

    signums = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _cmd_random(args: argparse.Namespace) -> int:
    name = "mxmoe checkpoint random"
    notes = logging.StreamHandler(sys.stderr)  # stale temporary folders removed or found: say so, prefixed
    notes.setFormatter(logging.Formatter(f"{name}: %(message)s"))
    log.addHandler(notes)
    propagate, log.propagate = log.propagate, False
    try:
        with _signals_raise():
            overrides = _parse_set(args.set or [])
            if args.config:
                base = load_config(args.config).model_dump()
                config = ModelConfig.from_dict({**base, **overrides}, f"{args.config} with --set overrides")
            else:
                config = preset(args.preset, **overrides)
            write_random_checkpoint(args.out, config, args.format, args.seed, int(args.max_shard_mb * 2**20),
                                    progress=sys.stderr.isatty())
    except (CheckpointError, ConfigError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, …: the partial checkpoint is already removed
        print(f"{name}: cannot write {args.out}: {e}", file=sys.stderr)
        return 2
    except _Terminated as e:
        print(f"{name}: stopped by {signal.Signals(e.signum).name}; the partial checkpoint was removed",
              file=sys.stderr)
        return 128 + e.signum
    finally:
        log.removeHandler(notes)
        log.propagate = propagate
    print(f"wrote {args.format} checkpoint to {args.out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    try:
        config, _weights, layout, d, where = _load(args.dir)
    except CheckpointError as e:
        print(f"mxmoe checkpoint inspect: {e}", file=sys.stderr)
        return 2
    names = expected_tensors(config, layout)
    files = sorted({f.path.name for f in where.values()})
    size = sum((d / f).stat().st_size for f in files)
    print(f"directory: {d}")
    print(f"layout:    {layout}")
    print(f"files:     {', '.join(files)}")
    print(f"tensors:   {len(names)}")
    print(f"size:      {size / 2**20:.1f} MiB ({size} bytes)")
    print("config:    " + json.dumps(config.model_dump(), indent=2).replace("\n", "\n           "))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("checkpoint", help="write random checkpoints; inspect checkpoint folders",
                              description="Checkpoint tools: write seeded random gpt-oss checkpoints in any of "
                                          "the three published layouts, or inspect a checkpoint folder.")
    sub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)

    r = sub.add_parser("random", help="write a seeded random checkpoint (no download needed)",
                       description="Write a random gpt-oss checkpoint: bf16 dense weights, MXFP4 experts, "
                                   "activations of order 1. The same config and seed give the same weights "
                                   "in every layout. Large configs are streamed layer by layer.")
    r.add_argument("--preset", choices=list(PRESETS), default="tiny",
                   help="model size to start from (default: tiny); ignored when --config is given")
    r.add_argument("--config", metavar="PATH",
                   help="start from this config.json (original or Hugging Face format) instead of a preset")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a config field, original key names (e.g. --set vocab_size=512 "
                        "--set num_experts=4); VALUE is read as JSON, else as a string; repeatable")
    r.add_argument("--format", choices=list(LAYOUTS), default="hf",
                   help="layout to write: 'hf' (Hugging Face, MXFP4 experts, sharded + index), 'hf-bf16' "
                        "(Hugging Face, experts dequantized to bf16), 'original' (the original/ folder: "
                        "config.json + model.safetensors); default: hf")
    r.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    r.add_argument("--max-shard-mb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2**20, metavar="MB",
                   help="largest shard of the Hugging Face layouts, in MiB (default: %(default).0f); "
                        "a larger single tensor gets a shard of its own")
    r.add_argument("out", metavar="OUT", help="directory to create (must be new or empty)")
    r.set_defaults(func=_cmd_random)

    i = sub.add_parser("inspect", help="validate a checkpoint folder and print its layout, config and size",
                       description="Load (memory-mapped, fully validated) a checkpoint folder in any layout "
                                   "and print its layout, files, tensor count, size and config.")
    i.add_argument("dir", metavar="DIR", help="checkpoint directory (an HF repository root, its original/ "
                                              "folder, or a folder written by 'mxmoe checkpoint random')")
    i.set_defaults(func=_cmd_inspect)
