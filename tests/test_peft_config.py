"""refpeft.peft_config's matching rules against PEFT 0.21.2's, case by case (peers in tests/test_peft_resolve.py)."""

from __future__ import annotations

import pytest

from refpeft.errors import ConfigError
from refpeft.peft_config import checked_config, targets

Q = "model.layers.{}.self_attn.q_proj"


def test_layers_to_transform_selects_by_the_first_numbered_segment():
    config = {"target_modules": ["q_proj"], "layers_to_transform": [0, 2]}
    assert [targets(config, Q.format(i)) for i in range(3)] == [True, False, True]
    # an int is one layer; the first index counts, not an expert's index further in
    assert targets({"target_modules": ["w1"], "layers_to_transform": 1}, "model.layers.1.experts.0.w1")
    assert not targets({"target_modules": ["w1"], "layers_to_transform": 0}, "model.layers.1.experts.0.w1")
    # without layers_pattern, the index must follow a "<prefix>.<name>." : a root-level "h.0.q" has none
    assert not targets({"target_modules": ["q"], "layers_to_transform": [0]}, "h.0.q")


def test_layers_pattern_names_the_layer_list():
    config = {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": ["blocks", "layers"]}
    assert targets(config, "model.layers.1.self_attn.q_proj")
    assert targets(config, "blocks.1.q_proj")                     # at the start of the path too
    assert not targets(config, "model.h.1.q_proj")                # not a listed layer pattern


def test_layer_options_do_not_apply_to_a_regular_expression_and_are_refused_with_one():
    with pytest.raises(ConfigError, match="layers_to_transform .* target_modules is a regular expression"):
        checked_config({"peft_type": "LORA", "target_modules": ".*q_proj", "layers_to_transform": [0]}, source="c")
    with pytest.raises(ConfigError, match="layers_pattern needs layers_to_transform"):
        checked_config({"peft_type": "LORA", "target_modules": ["q"], "layers_pattern": "layers"}, source="c")
    with pytest.raises(ConfigError, match="layers_to_transform must be"):
        checked_config({"peft_type": "LORA", "target_modules": ["q"], "layers_to_transform": ["0"]}, source="c")


def test_a_path_named_in_full_is_targeted_whatever_its_layer():
    config = {"target_modules": ["q_proj", Q.format(1)], "layers_to_transform": [0]}
    assert targets(config, Q.format(1)) and targets(config, Q.format(0)) and not targets(config, Q.format(2))
