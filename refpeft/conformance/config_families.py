"""Conformance family `adapter_config`: which modules a LoRA adapter_config.json adapts, and how.

JSON only: a case's inputs are the text of an adapter_config.json (`adapter_config`, a string:
the order of rank_pattern's and alpha_pattern's keys decides which applies, and a manifest's own
keys are sorted) and a model's module paths (`modules`); its one result is either `modules`, {path: record} as
refpeft.peft_resolve.resolve_modules states PEFT 0.21's rules, or `refused` = true for a config
PEFT refuses. The cases cover each rule where a converter goes wrong: list vs regex targets,
exclude_modules, layers_to_transform / layers_pattern (and where they do not apply), rank_pattern /
alpha_pattern key semantics and first-key precedence, rsLoRA, lora_bias, use_dora, the bias option
and modules_to_save. Every module is a linear layer with a bias.
"""

from __future__ import annotations

import json

from refpeft.conformance.case import Case, Vectors
from refpeft.errors import ConfigError
from refpeft.peft_resolve import resolve_modules

ATTENTION = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in "qkvo"]
MLP = [f"model.layers.{i}.mlp.{p}_proj" for i in range(3) for p in ("gate", "up", "down")]
LLAMA = ATTENTION + MLP + ["lm_head"]
# names that test the layer-index rule: an expert index after the layer's, a layer list at the root
ODD = ["model.layers.1.mlp.experts.0.w1", "model.layers.0.mlp.experts.1.w1", "h.0.attn.c_attn", "h.1.attn.c_attn",
       "model.layers.2.mlp.experts.1.w1", "transformer.h.1.attn.c_attn", "classifier.score", "score"]
LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16}

CONFIGS = [
    ("list-targets", {**LORA, "target_modules": ["q_proj", "v_proj"]}, LLAMA),
    ("regex-target", {**LORA, "target_modules": r".*\.layers\.[02]\.self_attn\.(q|k)_proj"}, LLAMA),
    ("regex-is-full-match", {**LORA, "target_modules": r"q_proj|.*mlp\.up_proj|c_attn"}, LLAMA + ODD),
    ("exclude-list", {**LORA, "target_modules": ["q_proj", "down_proj", "c_attn"],
                      "exclude_modules": ["layers.1.self_attn.q_proj", "attn.c_attn"]}, LLAMA + ODD),
    ("exclude-regex", {**LORA, "target_modules": ["q_proj", "k_proj"], "exclude_modules": r".*\.layers\.2\..*"}, LLAMA),
    ("layers-to-transform", {**LORA, "target_modules": ["q_proj", "w1", "c_attn", "model.layers.1.mlp.down_proj"],
                             "layers_to_transform": [0, 1]}, LLAMA + ODD),
    ("layers-pattern", {**LORA, "target_modules": ["v_proj", "c_attn"], "layers_to_transform": 1,
                        "layers_pattern": ["h", "layers"]}, LLAMA + ODD),
    ("rank-alpha-pattern", {**LORA, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                            "rank_pattern": {"proj": 64, "q_proj": 4, "model.layers.0.self_attn.q_proj": 16,
                                             r"layers\.2\..*_proj": 2},
                            "alpha_pattern": {"v_proj": 32, r"^model\.layers\.1\.self_attn\.k_proj": 3,
                                              r"layers.2.self_attn.o_proj": 1.5}}, ATTENTION),
    ("rslora-patterns", {**LORA, "r": 16, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "up_proj"],
                         "rank_pattern": {"up_proj": 2}, "alpha_pattern": {"layers.1.self_attn.q_proj": 5}}, LLAMA),
    ("lora-bias-lora-only", {**LORA, "r": 4, "lora_alpha": 4, "target_modules": ["o_proj", "down_proj"],
                             "lora_bias": True, "bias": "lora_only"}, LLAMA),
    ("dora-bias-all", {**LORA, "target_modules": ["gate_proj", "up_proj"], "use_dora": True, "bias": "all",
                       "rank_pattern": {"gate_proj": 2}}, LLAMA),
    ("modules-to-save", {**LORA, "target_modules": r".*(q_proj|lm_head|score)", "modules_to_save": ["lm_head", "score"]},
     LLAMA + ODD),
    ("refused-layers-with-regex", {**LORA, "target_modules": r".*q_proj", "layers_to_transform": [0]}, LLAMA),
    ("refused-layers-pattern-alone", {**LORA, "target_modules": ["q_proj"], "layers_pattern": "layers"}, LLAMA),
    ("refused-dora-lora-bias", {**LORA, "target_modules": ["q_proj"], "use_dora": True, "lora_bias": True}, LLAMA),
    ("refused-no-target", {**LORA, "target_modules": ["q_proj"], "exclude_modules": r".*q_proj"}, LLAMA),
]


def adapter_config_cases() -> list[Case]:
    """One case per entry of CONFIGS, named config-LABEL (dtype float64: the scaling's precision)."""
    return [Case(f"config-{label}", "adapter_config", "float64", 1000 + i, {"modules": len(modules)})
            for i, (label, _, modules) in enumerate(CONFIGS)]


def adapter_config_vectors(case: Case) -> Vectors:
    """Inputs adapter_config and modules (JSON, CONFIGS' entry of the case); the result `modules` or `refused`."""
    config, modules = next((c, m) for label, c, m in CONFIGS if case.name == f"config-{label}")
    text = json.dumps(config, indent=2)                     # the file's text, keys in CONFIGS' order
    inputs = {"adapter_config": text, "modules": modules}
    try:
        expected = {"modules": resolve_modules(json.loads(text), modules, source=case.name)}
    except ConfigError:
        expected = {"refused": True}
    return Vectors(inputs, expected, {})


SUMMARY = ("per module path: targeted, saved and (targeted) method, r, alpha, scaling, lora_bias, (not saved) "
           "base_bias_trained, as PEFT 0.21 applies the adapter_config.json; or refused = true where PEFT refuses it")
