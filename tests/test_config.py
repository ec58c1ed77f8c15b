from __future__ import annotations

import json

import pytest
import torch

from mxmoe.core.config import PRESETS, ConfigError, ModelConfig, load_config, preset
from mxmoe.core.rope import yarn_inv_freq

# gpt-oss-20b's original/config.json as published (keys and values).
ORIGINAL_20B = {
    "num_hidden_layers": 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088,
    "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
    "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
    "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
    "rope_ntk_alpha": 1, "rope_ntk_beta": 32,
}


def test_original_config_json_constructs_directly():
    assert ModelConfig(**ORIGINAL_20B) == PRESETS["gpt-oss-20b"]
    assert ModelConfig(**ORIGINAL_20B).original_dict() == ORIGINAL_20B  # 150000 == 150000.0


def test_transformers_default_config_is_gpt_oss_120b():
    transformers = pytest.importorskip("transformers")
    hf = transformers.GptOssConfig().to_dict()
    assert ModelConfig.from_hf_dict(hf) == PRESETS["gpt-oss-120b"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_round_trip_through_transformers(name):
    transformers = pytest.importorskip("transformers")
    cfg = PRESETS[name]
    d = cfg.to_hf_dict(quantized=False)
    hf = transformers.GptOssConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert ModelConfig.from_hf_dict(hf.to_dict()) == cfg
    assert ModelConfig.from_hf_dict(d) == cfg


def test_yarn_frequencies_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for cfg in (PRESETS["gpt-oss-20b"], preset("tiny"), preset("tiny", rope_scaling_factor=1.0)):
        d = cfg.to_hf_dict(quantized=False)
        hf = transformers.GptOssConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
        rope_type = hf.rope_parameters["rope_type"] if cfg.rope_scaling_factor > 1 else None
        ours, concentration = yarn_inv_freq(cfg)
        if rope_type is None:
            expected = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim))
            attention_factor = 1.0
        else:
            expected, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](hf)
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
        assert concentration == pytest.approx(attention_factor)


def test_unknown_key_names_it():
    with pytest.raises(ConfigError, match=r"cfg.json: unknown key 'num_expert'.*known keys: num_hidden_layers"):
        ModelConfig.from_dict({**ORIGINAL_20B, "num_expert": 3}, "cfg.json")


@pytest.mark.parametrize("key,value,expected", [
    ("experts_per_token", 40, "experts_per_token=40: expected at most num_experts=32"),
    ("num_key_value_heads", 7, "num_attention_heads=64: expected a multiple of num_key_value_heads=7"),
    ("hidden_size", 2881, "hidden_size=2881: expected a multiple of 32"),
    ("head_dim", 0, "head_dim=0: expected a positive integer"),
])
def test_inconsistent_values_name_field_value_and_expectation(key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        ModelConfig.from_dict({**ORIGINAL_20B, key: value}, "cfg.json")


def test_wrong_type_names_field():
    with pytest.raises(ConfigError, match=r"hidden_size: .*found 'big'"):
        ModelConfig.from_dict({**ORIGINAL_20B, "hidden_size": "big"})


def test_hf_config_rejects_what_the_graph_does_not_implement():
    d = PRESETS["tiny"].to_hf_dict()
    with pytest.raises(ConfigError, match="layer_types"):
        ModelConfig.from_hf_dict({**d, "layer_types": ["full_attention"] * 2})
    with pytest.raises(ConfigError, match="model_type='llama'"):
        ModelConfig.from_hf_dict({**d, "model_type": "llama"})
    with pytest.raises(ConfigError, match="num_experts=4 disagrees with num_local_experts=8"):
        ModelConfig.from_hf_dict({**d, "num_experts": 4})


def test_load_config_detects_format(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ORIGINAL_20B))
    (tmp_path / "b.json").write_text(json.dumps(PRESETS["gpt-oss-120b"].to_hf_dict()))
    (tmp_path / "c.json").write_text("{not json")
    assert load_config(tmp_path / "a.json") == PRESETS["gpt-oss-20b"]
    assert load_config(tmp_path / "b.json") == PRESETS["gpt-oss-120b"]
    with pytest.raises(ConfigError, match="c.json: not valid JSON"):
        load_config(tmp_path / "c.json")
    with pytest.raises(ConfigError, match="missing.json: no such file"):
        load_config(tmp_path / "missing.json")


def test_preset_overrides_are_validated():
    assert preset("tiny", num_experts=4).num_experts == 4
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ConfigError, match="experts_per_token"):
        preset("tiny", num_experts=1)
