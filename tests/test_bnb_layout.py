"""The bitsandbytes state-dict layout: keys, JSON record, round trips through safetensors, refusals."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from refpeft.errors import DTypeError, FormatError
from refpeft.io import read_safetensors, write_safetensors
from refpeft.quant.bnb_layout import from_state_dict, load_quantized, save_quantized, to_state_dict
from refpeft.quant.state import dequantize_4bit, quantize_4bit


def weight(shape=(48, 100), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_keys_and_record(double_quant, quant_type):
    tensors = to_state_dict(quantize_4bit(weight(), quant_type=quant_type, double_quant=double_quant),
                            prefix="layer.weight")
    keys = {"layer.weight", "layer.weight.absmax", "layer.weight.quant_map",
            f"layer.weight.quant_state.bitsandbytes__{quant_type}"}
    if double_quant:
        keys |= {"layer.weight.nested_absmax", "layer.weight.nested_quant_map"}
    assert set(tensors) == keys
    assert tensors["layer.weight"].shape == (2400, 1) and tensors["layer.weight"].dtype == np.uint8
    assert tensors["layer.weight.absmax"].dtype == (np.uint8 if double_quant else np.float32)
    raw = bytes(tensors[f"layer.weight.quant_state.bitsandbytes__{quant_type}"])
    record = json.loads(raw)
    assert raw.decode() == json.dumps(record)  # default separators, as bitsandbytes writes it
    expected = ["quant_type", "blocksize", "dtype", "shape"]
    expected += ["nested_blocksize", "nested_dtype", "nested_offset"] if double_quant else []
    assert list(record) == expected and record["shape"] == [48, 100] and record["dtype"] == "float32"


@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_through_safetensors(tmp_path, double_quant):
    w = weight()
    bias = np.arange(48, dtype=np.float32)
    state = quantize_4bit(w, double_quant=double_quant)
    path = save_quantized(tmp_path / "model.safetensors", {"proj.weight": state}, {"proj.bias": bias})
    states, others = load_quantized(path)
    assert list(states) == ["proj.weight"] and list(others) == ["proj.bias"]
    assert np.array_equal(others["proj.bias"], bias)
    assert np.array_equal(dequantize_4bit(states["proj.weight"]), dequantize_4bit(state))
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write leaves no temporary behind


def test_bfloat16_weights_record_their_dtype():
    w = weight().astype(ml_dtypes.bfloat16).astype(np.float32)
    state = quantize_4bit(w, dtype="bfloat16")
    back = from_state_dict(to_state_dict(state))
    assert back.dtype == "bfloat16"
    decoded = dequantize_4bit(back)
    assert np.array_equal(decoded.astype(ml_dtypes.bfloat16).astype(np.float32), decoded)
    with pytest.raises(DTypeError, match="not bfloat16 numbers"):
        quantize_4bit(weight(), dtype="bfloat16")


def test_refusals_name_the_key(tmp_path):
    good = to_state_dict(quantize_4bit(weight(), double_quant=True))

    def broken(**changes):
        tensors = dict(good)
        for key, value in changes.items():
            if value is None:
                del tensors[key.replace("__", ".")]
            else:
                tensors[key.replace("__", ".")] = value
        return tensors

    with pytest.raises(FormatError, match="weight.nested_absmax' is missing"):
        from_state_dict(broken(weight__nested_absmax=None))
    with pytest.raises(FormatError, match="weight.absmax has dtype float32"):
        from_state_dict(broken(weight__absmax=good["weight.absmax"].astype(np.float32)))
    with pytest.raises(FormatError, match="weight has shape"):
        from_state_dict(broken(weight=good["weight"][:-1]))
    with pytest.raises(FormatError, match="quant_map"):
        from_state_dict(broken(weight__quant_map=good["weight.quant_map"] * 2))
    record_key = "weight.quant_state.bitsandbytes__nf4"
    tensors = dict(good)
    tensors[record_key] = np.frombuffer(b"{not json", dtype=np.uint8)
    with pytest.raises(FormatError, match="not a JSON record"):
        from_state_dict(tensors)
    tensors[record_key] = np.frombuffer(json.dumps({"quant_type": "nf4", "blocksize": 48, "dtype": "float32",
                                                    "shape": [48, 100]}).encode(), dtype=np.uint8)
    with pytest.raises(FormatError, match="blocksize 48"):
        from_state_dict(tensors)
    path = write_safetensors(tmp_path / "bad.safetensors", broken(weight__quant_map=None))
    with pytest.raises(FormatError, match=str(path.name)):
        load_quantized(path)


def test_file_holds_exactly_the_state_dict(tmp_path):
    state = quantize_4bit(weight(), double_quant=True)
    path = save_quantized(tmp_path / "w.safetensors", {"weight": state})
    tensors, _ = read_safetensors(path)
    expected = to_state_dict(state)
    assert set(tensors) == set(expected)
    assert all(tensors[k].tobytes() == expected[k].tobytes() for k in expected)


def test_quantize_command_writes_the_layout_and_refuses_non_finite(tmp_path, capsys):
    import argparse

    import safetensors.numpy

    from refpeft.commands import quantize as quantize_command
    from refpeft.errors import NonFiniteError

    parser = argparse.ArgumentParser()
    quantize_command.add_parser(parser.add_subparsers())
    rng = np.random.default_rng(0)
    weights = {"layers.0.q_proj.weight": rng.standard_normal((64, 96)).astype(ml_dtypes.bfloat16),
               "embed_tokens.weight": rng.standard_normal((10, 64)).astype(ml_dtypes.bfloat16),
               "norm.weight": np.ones(64, dtype=np.float32)}
    source = write_safetensors(tmp_path / "in.safetensors", weights)
    args = parser.parse_args(["quantize", str(source), str(tmp_path / "out.safetensors"), "--double-quant",
                              "--no-progress"])
    assert args.func(args) == 0
    assert "4.13" in capsys.readouterr().out  # bits per parameter: 4 + 8/64 + 32/(64*256) + a partial block
    states, others = load_quantized(tmp_path / "out.safetensors")  # a float32/uint8-only reader sees the layout
    assert list(states) == ["layers.0.q_proj.weight"] and set(others) == {"embed_tokens.weight", "norm.weight"}
    decoded = dequantize_4bit(states["layers.0.q_proj.weight"])
    original = weights["layers.0.q_proj.weight"].astype(np.float32)
    assert np.linalg.norm(decoded - original) / np.linalg.norm(original) < 0.12
    bad = dict(weights, **{"layers.0.q_proj.weight": np.full((4, 64), np.nan, dtype=np.float32)})
    bad_path = tmp_path / "bad.safetensors"
    safetensors.numpy.save_file({k: v.astype(np.float32) for k, v in bad.items()}, str(bad_path))
    args = parser.parse_args(["quantize", str(bad_path), str(tmp_path / "never.safetensors"), "--no-progress"])
    with pytest.raises(NonFiniteError, match="256 non-finite"):
        args.func(args)
    assert not (tmp_path / "never.safetensors").exists()
