"""refpeft.checkpoint: safetensors one tensor at a time, read and written.

Specification: every file the safetensors package writes reads back bit for bit (bfloat16 too);
streamed writes are files the safetensors package reads; every defect of a header or of the data
section is a FormatError naming the file; an interrupted write leaves the previous file intact
and no temporary file behind; merging a LoRA adapter changes exactly the adapted weights.
"""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.checkpoint import SafetensorsFile, merge_into_checkpoint, write_safetensors_streaming
from refpeft.errors import DTypeError, FormatError, NonFiniteError, OutputError, RefpeftError
from refpeft.methods.lora import lora_merge

TENSORS = {
    "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
    "b": np.array([1.5, -2.0], dtype=np.float64),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "scalar": np.array(7, dtype=np.int64),
}


def _write(path, tensors=TENSORS, metadata=None):
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)
    return path


def test_reads_what_safetensors_writes(tmp_path):
    f = SafetensorsFile(_write(tmp_path / "x.safetensors", metadata={"format": "pt"}))
    assert set(f.keys()) == set(TENSORS) and f.metadata == {"format": "pt"}
    for name, array in TENSORS.items():
        read = f.read(name)
        assert read.dtype == array.dtype and read.shape == array.shape
        np.testing.assert_array_equal(read, array)
        assert not read.flags.writeable


def test_bfloat16_round_trips_and_reads_as_float32(tmp_path):
    torch = pytest.importorskip("torch", reason="torch writes the bfloat16 reference file")
    from safetensors.torch import save_file

    values = torch.randn(5, 7).to(torch.bfloat16)
    save_file({"w": values}, str(tmp_path / "bf16.safetensors"))
    f = SafetensorsFile(tmp_path / "bf16.safetensors")
    assert f.info("w").dtype == "BF16" and f.read("w").dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(f.read_float("w"), values.float().numpy())
    assert f.read_float("w").dtype == np.float32
    write_safetensors_streaming(tmp_path / "copy.safetensors", [("w", "BF16", (5, 7))], f.read)
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "copy.safetensors"))["w"], values)


def test_streamed_write_is_a_standard_file(tmp_path):
    source = SafetensorsFile(_write(tmp_path / "x.safetensors"))
    entries = [(k, source.info(k).dtype, source.info(k).shape) for k in source.keys()]
    write_safetensors_streaming(tmp_path / "y.safetensors", entries, source.read, metadata={"k": "v"})
    loaded = safetensors.numpy.load_file(str(tmp_path / "y.safetensors"))
    for name, array in TENSORS.items():
        np.testing.assert_array_equal(loaded[name], array)
    assert SafetensorsFile(tmp_path / "y.safetensors").metadata == {"k": "v"}


def test_interrupted_write_keeps_the_previous_file(tmp_path):
    target = _write(tmp_path / "out.safetensors")
    before = target.read_bytes()

    def produce(name):
        if name == "second":
            raise KeyboardInterrupt  # the user pressing Ctrl-C half way
        return np.ones(1000, dtype=np.float32)

    with pytest.raises(KeyboardInterrupt):
        write_safetensors_streaming(target, [("first", "F32", (1000,)), ("second", "F32", (1000,))], produce)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_a_produced_tensor_must_match_its_declaration(tmp_path):
    with pytest.raises(FormatError, match="'w'"):
        write_safetensors_streaming(tmp_path / "o.safetensors", [("w", "F32", (2,))],
                                    lambda name: np.zeros(3, dtype=np.float32))
    assert list(tmp_path.iterdir()) == []


def _raw(header: dict, data: bytes) -> bytes:
    return _raw_header(json.dumps(header).encode()) + data


def _raw_header(encoded: bytes) -> bytes:
    return struct.pack("<Q", len(encoded)) + encoded


DEFECTS = {
    "empty file": b"",
    "short length": b"\x01\x02",
    "header longer than file": struct.pack("<Q", 10**6) + b"{}",
    "header not json": struct.pack("<Q", 4) + b"{{{{",
    "header not an object": _raw([1, 2], b""),
    "unknown dtype": _raw({"w": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    "negative shape": _raw({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)),
    "span disagrees with shape": _raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)),
    "truncated data": _raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(5)),
    "trailing bytes": _raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(9)),
    "overlap": _raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "v": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)),
    "gap": _raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)),
    "bad metadata": _raw({"__metadata__": {"a": 1}}, b""),
    "extra entry field": _raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 0}}, bytes(4)),
    # Empty tensors whose other sizes NumPy cannot make (ValueError on reading, before the check).
    "dimension past 2^63": _raw({"w": {"dtype": "F32", "shape": [2**63, 0], "data_offsets": [0, 0]}}, b""),
    "sizes past 2^63 bytes": _raw({"w": {"dtype": "F32", "shape": [2**62, 4, 0], "data_offsets": [0, 0]}}, b""),
    "more dimensions than NumPy has": _raw({"w": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, bytes(4)),
    # Deeper than Python's recursion limit (RecursionError from json.loads, before the check).
    "deeply nested header": _raw_header(b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "integer of 5000 digits": _raw_header(b'{"x":' + b"7" * 5000 + b"}"),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_defects_are_format_errors_naming_the_file(defect, tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(DEFECTS[defect])
    with pytest.raises(FormatError, match="bad.safetensors"):
        SafetensorsFile(path)


def test_every_header_defect_reads_as_a_format_error(tmp_path):
    # What reading a file with these headers raised before they were checked: ValueError, RecursionError.
    for defect in ("dimension past 2^63", "sizes past 2^63 bytes", "deeply nested header", "integer of 5000 digits"):
        path = tmp_path / "bad.safetensors"
        path.write_bytes(DEFECTS[defect])
        with pytest.raises(FormatError, match="larger than an array can be|nested too deeply|not valid JSON"):
            SafetensorsFile(path).read("w")


def test_an_onnx_or_gguf_file_is_named_for_what_it_is(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x08\x12\x07refpeft:\x10\x0a")
    (tmp_path / "model.bin").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(16))
    with pytest.raises(FormatError, match="an ONNX model, not a safetensors file"):
        SafetensorsFile(tmp_path / "model.onnx")
    with pytest.raises(FormatError, match="a GGUF model, not a safetensors file"):
        SafetensorsFile(tmp_path / "model.bin")


def test_merge_refuses_an_output_linked_to_the_base(tmp_path):
    base, _ = _lora_base(tmp_path)
    before = base.path.read_bytes()
    adapter = Adapter(modules={"l1": ModuleAdapter("lora", {"A": np.ones((2, 5)), "B": np.ones((6, 2))})})
    (tmp_path / "hard.safetensors").hardlink_to(base.path)
    (tmp_path / "soft.safetensors").symlink_to(base.path)
    for name in ("hard.safetensors", "soft.safetensors"):
        with pytest.raises(OutputError, match="overwrite the input"):
            merge_into_checkpoint(adapter, base, tmp_path / name)
    assert base.path.read_bytes() == before


def test_missing_file_and_missing_tensor(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        SafetensorsFile(tmp_path / "absent.safetensors")
    f = SafetensorsFile(_write(tmp_path / "x.safetensors"))
    with pytest.raises(FormatError, match="'nope' is missing"):
        f.read("nope")
    with pytest.raises(DTypeError, match="'scalar'"):
        f.read_float("scalar")


def test_linear_shapes_follow_the_layout(tmp_path):
    f = SafetensorsFile(_write(tmp_path / "x.safetensors"))
    assert list(f.linear_shapes(["a", "absent"])) == ["a"]  # paths without a weight are left out
    shape = f.linear_shapes(["a"])["a"]
    assert (shape.d, shape.k) == (3, 4)
    swapped = f.linear_shapes(["a"], fan_in_fan_out=True)["a"]
    assert (swapped.d, swapped.k) == (4, 3)


def _lora_base(tmp_path, dtype=np.float32):
    rng = np.random.default_rng(0)
    tensors = {"l1.weight": rng.standard_normal((6, 5)).astype(dtype), "l1.bias": rng.standard_normal(6).astype(dtype),
               "l2.weight": rng.standard_normal((4, 6)).astype(dtype), "norm": np.ones(6, dtype=dtype),
               "ids": np.arange(3)}
    return SafetensorsFile(_write(tmp_path / "base.safetensors", tensors, metadata={"format": "pt"})), tensors


def test_merge_changes_exactly_the_adapted_weights(tmp_path):
    base, tensors = _lora_base(tmp_path)
    rng = np.random.default_rng(1)
    module = ModuleAdapter("lora", {"A": rng.standard_normal((2, 5)), "B": rng.standard_normal((6, 2)), "bias": rng.standard_normal(6)}, alpha=4.0)
    report = merge_into_checkpoint(Adapter(modules={"l1": module}), base, tmp_path / "out.safetensors")
    out = SafetensorsFile(tmp_path / "out.safetensors")
    assert out.keys() == base.keys() and out.metadata == {"format": "pt"}
    assert (report.merged_weights, report.changed_biases, report.tensors) == (1, 1, 5)
    expected = lora_merge(tensors["l1.weight"].astype(np.float64), module.A, module.B, scaling=2.0).astype(np.float32)
    np.testing.assert_array_equal(out.read("l1.weight"), expected)
    np.testing.assert_array_equal(out.read("l1.bias"),
                                  (tensors["l1.bias"].astype(np.float64) + 2.0 * module.bias).astype(np.float32))
    for key in ("l2.weight", "norm", "ids"):
        np.testing.assert_array_equal(out.read(key), tensors[key])


def test_merge_refusals_leave_no_output(tmp_path):
    base, tensors = _lora_base(tmp_path)
    rng = np.random.default_rng(1)
    cases = [
        (Adapter(modules={"l9": ModuleAdapter("lora", {"A": rng.standard_normal((2, 5)), "B": rng.standard_normal((6, 2))})}),
         FormatError, "'l9.weight' is missing"),
        (Adapter(modules={"l2": ModuleAdapter("lora", {"A": rng.standard_normal((2, 6)), "B": rng.standard_normal((4, 2)), "bias": np.zeros(4)})}), FormatError, "'l2.bias' is missing"),
        (Adapter(modules={"l1": ModuleAdapter("lora", {"A": np.full((1, 5), 1e30), "B": np.full((6, 1), 1e30)})}),
         NonFiniteError, "l1.weight.*overflow"),
    ]
    for adapter, error, message in cases:
        with pytest.raises(error, match=message):
            merge_into_checkpoint(adapter, base, tmp_path / "out.safetensors")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]
    with pytest.raises(RefpeftError, match="overwrite"):
        merge_into_checkpoint(cases[0][0], base, tmp_path / "base.safetensors")


@pytest.mark.parametrize("method", ["lora", "lora-fan_in_fan_out", "dora", "dora-fan_in_fan_out", "vera"])
def test_merging_by_blocks_of_rows_equals_merging_whole_layers(method, tmp_path):
    from dataclasses import replace

    from tests.test_peft_format import SHAPES, lora_adapter, vera_adapter

    adapter = vera_adapter() if method == "vera" else lora_adapter(dora=method.startswith("dora"))
    fif = method.endswith("fan_in_fan_out")
    if fif:
        adapter = replace(adapter, modules={p: replace(m, fan_in_fan_out=True) for p, m in adapter.modules.items()})
    rng = np.random.default_rng(4)
    tensors = {f"{p}.weight": rng.standard_normal((s.k, s.d) if fif else (s.d, s.k)) for p, s in SHAPES.items()}
    base = SafetensorsFile(_write(tmp_path / "base.safetensors", tensors))
    merge_into_checkpoint(adapter, base, tmp_path / "rows.safetensors", block_elements=1)  # one row per block
    merge_into_checkpoint(adapter, base, tmp_path / "whole.safetensors", block_elements=10**9)
    rows, changed = SafetensorsFile(tmp_path / "rows.safetensors"), SafetensorsFile(tmp_path / "whole.safetensors")
    for key in tensors:  # the same sums; a BLAS may order a block's dot products differently in the last bit
        np.testing.assert_allclose(rows.read(key), changed.read(key), rtol=1e-14, atol=1e-14)
    assert all(not np.array_equal(changed.read(k), tensors[k]) for k in tensors)


def test_bfloat16_checkpoints_merge_to_the_nearest_bfloat16(tmp_path):
    torch = pytest.importorskip("torch", reason="torch writes the bfloat16 base checkpoint")
    from safetensors.torch import save_file

    W0 = torch.randn(16, 12).to(torch.bfloat16)
    save_file({"l.weight": W0, "l.bias": torch.zeros(16, dtype=torch.bfloat16)}, str(tmp_path / "base.safetensors"))
    rng = np.random.default_rng(2)
    module = ModuleAdapter("lora", {"A": rng.standard_normal((3, 12)), "B": rng.standard_normal((16, 3))}, alpha=3.0)
    merge_into_checkpoint(Adapter(modules={"l": module}), SafetensorsFile(tmp_path / "base.safetensors"),
                          tmp_path / "out.safetensors")
    merged = SafetensorsFile(tmp_path / "out.safetensors").read("l.weight")
    assert merged.dtype == ml_dtypes.bfloat16
    exact = lora_merge(W0.double().numpy(), module.A, module.B, scaling=1.0)
    # within half a bfloat16 ulp (2^-8 relative), plus float32's rounding on the way (see docs/peft_files.md)
    assert np.all(np.abs(merged.astype(np.float64) - exact) <= np.abs(exact) * (2.0**-8 + 2.0**-23))


def test_the_streaming_writer_holds_one_produced_tensor_at_a_time(tmp_path):
    """merge's memory bound: when the next tensor is produced, the previous one is gone."""
    import gc
    import weakref

    from refpeft.checkpoint import write_safetensors_streaming

    alive = []

    def produce(name: str) -> np.ndarray:
        gc.collect()
        assert [ref() is None for ref in alive] == [True] * len(alive), f"{name}: an earlier tensor is still held"
        array = np.full((64, 64), float(len(alive)), dtype=np.float32)
        alive.append(weakref.ref(array))
        return array

    entries = [(f"t{i}", "F32", (64, 64)) for i in range(4)]
    write_safetensors_streaming(tmp_path / "out.safetensors", entries, produce)
    assert len(alive) == 4
