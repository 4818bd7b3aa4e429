"""The prompt-learning table (refpeft.model.prompt_methods): every row is found again from what it makes
(a model's encoder, a folder's peft_type), and its writer and reader round-trip the encoder's output
into the field the row fills, on the demo's built-in base (no torch needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refpeft.commands.generate import with_prompt_learning
from refpeft.demo_model import BASE_DIR
from refpeft.errors import ConfigError
from refpeft.model.decoder import Model
from refpeft.model.load import load_model
from refpeft.model.prompt_methods import (PROMPT_METHODS, prompt_method, prompt_method_of, prompt_method_of_type,
                                          virtual_tokens)
from refpeft.train.prompt_learning import new_prompt_learning

KINDS = [("prompt", {}), ("prompt", {"init": "SAMPLE_VOCAB"}), ("p-tuning", {}), ("p-tuning", {"encoder": "LSTM"}),
         ("prefix", {}), ("prefix", {"projection": True})]


@pytest.fixture(scope="module")
def base():
    config, weights, _ = load_model(BASE_DIR, dtype="float64")
    return Model(config, weights)


@pytest.mark.parametrize("name, options", KINDS)
def test_each_row_is_found_again_and_round_trips_its_folder(base, tmp_path, name, options):
    model = new_prompt_learning(base, name, k=4, seed=3, **options)
    row = prompt_method_of(model)
    assert row is prompt_method(name)
    out = getattr(model, row.fills)
    assert virtual_tokens(model) == 4 and out is not None
    assert all(getattr(model, m.fills) is None for m in PROMPT_METHODS.values() if m.fills != row.fills)
    assert sum(int(v.size) for v in model.prompt_encoder.values()) == row.count(
        base.config.hidden_size, base.config.num_hidden_layers,
        base.config.num_key_value_heads * base.config.head_dim, 4,
        **{key: value for key, value in options.items() if key != "init"})
    row.write(tmp_path, model, base_model="demo")
    peft_type = json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"]
    assert prompt_method_of_type(peft_type) is row
    table, _ = row.read(tmp_path)
    assert np.array_equal(table, out)
    loaded = with_prompt_learning(base, str(tmp_path), dtype="float64")
    assert np.array_equal(getattr(loaded, row.fills), out)


def test_unknown_kinds_are_refused_or_absent(base):
    with pytest.raises(ConfigError, match="unknown prompt-learning method 'lora'; choose one of prompt, p-tuning"):
        prompt_method("lora")
    assert prompt_method_of_type("LORA") is None
    assert prompt_method_of(base) is None and virtual_tokens(base) == 0
    assert [m.keeps_positions for m in PROMPT_METHODS.values()] == [False, False, True]
