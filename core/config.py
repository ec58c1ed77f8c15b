"""Model configuration: the keys of gpt-oss's original ``config.json``, validated.

``ModelConfig(**json.load(open("original/config.json")))`` works; Hugging Face ``config.json`` files
(model_type ``gpt_oss``) are read through :meth:`ModelConfig.from_hf_dict`, which maps HF names onto
ours — the only place where HF config names appear.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or dict that is not a valid gpt-oss config (the message names file, key, value)."""


class ModelConfig(BaseModel):
    """gpt-oss hyper-parameters. Field names equal the keys of the original ``config.json``;
    defaults are gpt-oss-20b's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_hidden_layers: int = 24
    num_experts: int = 32
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    swiglu_limit: float = 7.0
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    initial_context_length: int = 4096
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0
    rope_ntk_beta: float = 32.0
    # Not in the original config.json (constants of the architecture there); kept as fields so a
    # Hugging Face config that states them is checked rather than silently ignored.
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        def need(ok: bool, field: str, value: Any, expected: str) -> None:
            if not ok:
                raise ValueError(f"{field}={value!r}: expected {expected}")

        for name in ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
                     "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads"):
            need(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        need(self.experts_per_token <= self.num_experts, "experts_per_token", self.experts_per_token,
             f"at most num_experts={self.num_experts}")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
             self.num_attention_heads, f"a multiple of num_key_value_heads={self.num_key_value_heads} (GQA)")
        need(self.head_dim % 2 == 0, "head_dim", self.head_dim, "an even number (RoPE rotates pairs)")
        # MXFP4 packs 32 values of the reduction dimension per block, for both expert matmuls.
        need(self.hidden_size % 32 == 0, "hidden_size", self.hidden_size, "a multiple of 32 (MXFP4 block)")
        need(self.intermediate_size % 32 == 0, "intermediate_size", self.intermediate_size,
             "a multiple of 32 (MXFP4 block)")
        need(self.sliding_window >= 0, "sliding_window", self.sliding_window, "0 (off) or a positive window")
        need(self.rope_scaling_factor >= 1.0, "rope_scaling_factor", self.rope_scaling_factor, ">= 1")
        need(self.rope_ntk_beta > self.rope_ntk_alpha, "rope_ntk_beta", self.rope_ntk_beta,
             f"greater than rope_ntk_alpha={self.rope_ntk_alpha}")
        return self

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def layer_sliding_window(self, layer: int) -> int:
        """Window of layer ``layer`` (0 = full causal). gpt-oss alternates: even layers are banded."""
        return self.sliding_window if layer % 2 == 0 else 0

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        """Original-format dict → config, with errors that name the source and the key."""
        try:
            return cls(**data)
        except ValidationError as e:
            raise ConfigError(f"{source}: {_describe(e)}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Hugging Face ``GptOssConfig`` dict → config. Rejects what our graph does not implement."""
        def fail(msg: str) -> ConfigError:
            return ConfigError(f"{source}: {msg}")

        if data.get("model_type", "gpt_oss") != "gpt_oss":
            raise fail(f"model_type={data.get('model_type')!r}: expected 'gpt_oss'")
        rope = dict(data.get("rope_parameters") or data.get("rope_scaling") or {})
        if rope.get("rope_type", rope.get("type", "yarn")) != "yarn":
            raise fail(f"rope_scaling.rope_type={rope.get('rope_type')!r}: expected 'yarn'")
        if rope.get("truncate", False):
            raise fail("rope_scaling.truncate=true: gpt-oss uses the untruncated YaRN ramp")
        if data.get("attention_bias", True) is not True:
            raise fail("attention_bias=false: gpt-oss attention projections carry biases")
        if data.get("tie_word_embeddings", False):
            raise fail("tie_word_embeddings=true: gpt-oss has a separate unembedding")
        n_layers = data.get("num_hidden_layers", cls.model_fields["num_hidden_layers"].default)
        layer_types = data.get("layer_types")
        if layer_types is not None:
            expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
            if list(layer_types) != expected:
                raise fail("layer_types: expected sliding attention on even layers and full attention on odd "
                           f"layers ({n_layers} layers), found {layer_types}")
        mapped: dict[str, Any] = {}
        for hf_key, ours in _HF_KEYS.items():
            if hf_key in data and data[hf_key] is not None:
                mapped[ours] = data[hf_key]
        for hf_key, ours in _HF_ROPE_KEYS.items():
            if hf_key in rope:
                mapped[ours] = rope[hf_key]
        if "rope_theta" in rope:
            mapped["rope_theta"] = rope["rope_theta"]
        for hf_key, ours in (("num_local_experts", "num_experts"), ("num_experts_per_tok", "experts_per_token")):
            if ours in data and hf_key in data and data[ours] != data[hf_key]:
                raise fail(f"{ours}={data[ours]} disagrees with {hf_key}={data[hf_key]}")
        if data.get("sliding_window") is None and "sliding_window" in data:
            mapped["sliding_window"] = 0
        return cls.from_dict(mapped, source)

    def to_hf_dict(self, quantized: bool = True) -> dict[str, Any]:
        """The Hugging Face ``config.json`` of this model, as the published gpt-oss repositories write it."""
        d: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            # <|return|> and <|endoftext|> of o200k_harmony, when the vocabulary has them (test models may not).
            "eos_token_id": 200002 if self.vocab_size > 200002 else None,
            "pad_token_id": 199999 if self.vocab_size > 199999 else None,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "max_position_embeddings": int(self.initial_context_length * self.rope_scaling_factor),
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                            for i in range(self.num_hidden_layers)],
            "rope_scaling": {"rope_type": "yarn", "factor": self.rope_scaling_factor,
                             "beta_fast": self.rope_ntk_beta, "beta_slow": self.rope_ntk_alpha,
                             "original_max_position_embeddings": self.initial_context_length,
                             "truncate": False},
            "tie_word_embeddings": False,
            "use_cache": True,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.9,
        }
        for hf_key, ours in _HF_KEYS.items():
            d[hf_key] = getattr(self, ours)
        d["experts_per_token"] = self.experts_per_token
        d["initial_context_length"] = self.initial_context_length
        if quantized:
            d["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
            }
        return d

    def original_dict(self) -> dict[str, Any]:
        """The original ``config.json`` (only its 16 keys: the architecture constants stay implicit)."""
        d = self.model_dump()
        if d.pop("swiglu_alpha") != 1.702 or d.pop("rms_norm_eps") != 1e-5:
            raise ConfigError("the original config.json format cannot express swiglu_alpha/rms_norm_eps "
                              "other than gpt-oss's 1.702/1e-5")
        return d


# HF config key → ours (keys whose HF name equals ours map to themselves).
_HF_KEYS = {
    "num_hidden_layers": "num_hidden_layers",
    "num_local_experts": "num_experts",
    "num_experts_per_tok": "experts_per_token",
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "swiglu_limit": "swiglu_limit",
    "head_dim": "head_dim",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "sliding_window": "sliding_window",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "swiglu_alpha": "swiglu_alpha",
}
# HF rope_scaling key → ours. YaRN's beta_slow/beta_fast are gpt-oss's NTK alpha/beta.
_HF_ROPE_KEYS = {
    "factor": "rope_scaling_factor",
    "beta_slow": "rope_ntk_alpha",
    "beta_fast": "rope_ntk_beta",
    "original_max_position_embeddings": "initial_context_length",
}


PRESETS: dict[str, ModelConfig] = {
    "gpt-oss-20b": ModelConfig(),
    "gpt-oss-120b": ModelConfig(num_hidden_layers=36, num_experts=128),
    # Small enough for float64 CPU tests, big enough to exercise every feature: two layers (both
    # attention kinds), more experts than top-k, GQA, YaRN. Use sliding_window smaller than test
    # sequences to cross the band. initial_context_length keeps YaRN's ramp start (low) above 0, where
    # the original formula and Hugging Face's clamped one agree, as they do for the real models.
    "tiny": ModelConfig(num_hidden_layers=2, num_experts=8, experts_per_token=2, vocab_size=201088,
                        hidden_size=64, intermediate_size=64, head_dim=16, num_attention_heads=4,
                        num_key_value_heads=2, sliding_window=8, initial_context_length=256,
                        rope_scaling_factor=4.0),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, with fields overridden (``preset("tiny", num_experts=4)``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name].model_dump(), **overrides}, f"preset {name!r} with overrides")


def load_config(path: str | Path) -> ModelConfig:
    """Read a ``config.json`` in either format (Hugging Face if it has ``model_type``/``architectures``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    if "model_type" in data or "architectures" in data or "num_local_experts" in data:
        return ModelConfig.from_hf_dict(data, str(path))
    return ModelConfig.from_dict(data, str(path))


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r} (value {err.get('input')!r}); known keys: "
                         f"{', '.join(ModelConfig.model_fields)}")
        else:
            parts.append(f"{loc}: {err['msg']} (found {err.get('input')!r})")
    return "; ".join(parts)
