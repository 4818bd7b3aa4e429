"""refpeft.peft_resolve: each module's settings as PEFT 0.21 applies a LoRA config (peer: tests/test_conformance_config.py)."""

from __future__ import annotations

import math

import pytest

from refpeft.errors import ConfigError
from refpeft.peft_resolve import resolve_modules

PATHS = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj", "lm_head"]


def test_patterns_override_r_and_alpha_and_rslora_scales_by_the_square_root():
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "up_proj"],
              "rank_pattern": {"up_proj": 4}, "alpha_pattern": {r"layers\.1\..*": 2}}
    out = resolve_modules(config, PATHS)
    assert [(m.get("r"), m.get("alpha")) for m in out.values()] == [(16, 8), (16, 2), (4, 8), (None, None)]
    assert out["model.layers.0.mlp.up_proj"]["scaling"] == 8 / math.sqrt(4) != 8 / 4
    assert out["lm_head"] == {"targeted": False, "saved": False, "base_bias_trained": False}


def test_saved_modules_are_not_targeted_and_the_bias_option_follows_the_target():
    config = {"peft_type": "LORA", "target_modules": ".*(q_proj|lm_head)", "modules_to_save": ["lm_head"],
              "bias": "lora_only"}
    out = resolve_modules(config, PATHS)
    assert out["lm_head"] == {"targeted": False, "saved": True}
    assert [out[p]["base_bias_trained"] for p in PATHS[:3]] == [True, True, False]


@pytest.mark.parametrize("config, message", [
    ({"target_modules": ["k_proj"]}, "selects none"),
    ({"target_modules": "all-linear"}, "layer types"),
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "regular expression"),
    ({"target_modules": ["q_proj"], "use_dora": True, "lora_bias": True}, "lora_bias with use_dora"),
])
def test_configs_peft_refuses_are_refused(config, message):
    with pytest.raises(ConfigError, match=message):
        resolve_modules({"peft_type": "LORA", **config}, PATHS)
