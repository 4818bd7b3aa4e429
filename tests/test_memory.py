"""The memory calculator: parameter counts of known models, bytes against real quantised states, the CLI."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from refpeft.commands import memory as memory_command
from refpeft.errors import ConfigError
from refpeft.methods.lora import lora_parameter_count
from refpeft.memory import LINEARS, PRESETS, ModelShape, memory_table, quantized_bytes
from refpeft.quant.bnb_layout import to_state_dict
from refpeft.quant.state import quantize_4bit


@pytest.mark.parametrize("name,count", [("llama-2-7b", 6_738_415_616), ("llama-3-8b", 8_030_261_248),
                                        ("mistral-7b", 7_241_732_096)])
def test_parameter_counts_of_published_models(name, count):
    assert PRESETS[name].parameters() == count


def test_llama2_7b_lora_rank16_on_all_linears():
    rows = {r.method: r for r in memory_table(PRESETS["llama-2-7b"], rank=16)}
    assert rows["lora"].trainable == 39_976_960  # what PEFT's print_trainable_parameters reports
    assert rows["full"].total > rows["lora"].total > rows["qlora"].total


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 128), (33, 70), (256, 4096)])
def test_quantized_bytes_equal_the_stored_state_dict(shape, double_quant):
    state = quantize_4bit(np.ones(shape, dtype=np.float32), double_quant=double_quant)
    tensors = to_state_dict(state)
    record = next(k for k in tensors if "quant_state" in k)
    stored = sum(a.nbytes for k, a in tensors.items() if k != record) + (4 if double_quant else 0)  # + offset
    codes, constants = quantized_bytes(int(np.prod(shape)), blocksize=64, double_quant=double_quant)
    assert codes + constants == stored


def test_adapter_is_the_sum_of_lora_parameter_counts():
    model = ModelShape(hidden=96, intermediate=256, layers=3, vocab=1000, kv=32)
    rows = {r.method: r for r in memory_table(model, rank=4, targets=("q_proj", "down_proj"))}
    shapes = model.linear_shapes()
    expected = 3 * sum(lora_parameter_count(shapes[t][1], shapes[t][0], 4) for t in ("q_proj", "down_proj"))
    assert rows["lora"].trainable == rows["qlora"].trainable == expected
    assert rows["lora"].adapter == rows["lora"].gradients == 4 * expected
    assert rows["lora"].optimizer == 8 * expected
    quantized = 3 * sum(d * k for d, k in shapes.values())
    assert rows["qlora"].weights == quantized // 2 + (model.parameters() - quantized) * 2


def test_refusals():
    model = PRESETS["llama-2-7b"]
    with pytest.raises(ConfigError, match="targets"):
        memory_table(model, rank=8, targets=("lm_head",))
    with pytest.raises(ConfigError, match="blocksize"):
        memory_table(model, rank=8, blocksize=48)
    with pytest.raises(ConfigError, match="rank"):
        memory_table(model, rank=0)


def test_cli_prints_the_table(capsys):
    parser = argparse.ArgumentParser()
    memory_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["memory", "--hidden", "512", "--intermediate", "1024", "--layers", "2", "--vocab",
                              "1000", "--rank", "8", "--targets", ",".join(LINEARS[:2])])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert all(word in out for word in ("full", "lora", "qlora", "optimizer", "GiB"))
    with pytest.raises(ConfigError):
        memory_command.run(parser.parse_args(["memory", "--hidden", "512"]))
