"""Fuzzing the PEFT file boundary: corrupted configs, tensors and base checkpoints.

Specification: whatever is done to an adapter directory or a base checkpoint, reading it ends in
either a refpeft error (RefpeftError) or a correct load (the loaded tensors are exactly the file's,
as the safetensors package reads them), and `refpeft merge` exits with 0 and a complete checkpoint
or with 2 and no output file at all, never with a foreign exception or a partial or temporary file.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refpeft import cli
from refpeft.errors import RefpeftError
from refpeft.peft_format import CONFIG_NAME, WEIGHTS_NAME, peft_tensors, read_peft_adapter, write_peft_adapter
from tests.test_peft_format import SHAPES, lora_adapter, vera_adapter

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6) | st.sampled_from(["q", "(", "(?i)q", ".*", "all-linear", "LORA", "VERA", "lora_only", "pissa"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6)
config_keys = st.sampled_from(["peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "bias",
                               "lora_bias", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
                               "init_lora_weights", "projection_prng_key", "save_projection", "d_initial",
                               "modules_to_save", "layers_to_transform", "new_option"])
arrays = st.builds(
    lambda shape, dtype, fill, seed: _array(shape, dtype, fill, seed),
    st.lists(st.integers(0, 13), min_size=0, max_size=3), st.sampled_from(["float32", "float16", "float64", "int32"]),
    st.sampled_from(["normal", "nan", "inf", "huge", "zero"]), st.integers(0, 2**16))


def _array(shape, dtype, fill, seed):
    values = np.random.default_rng(seed).standard_normal(shape)
    if values.size:
        values.flat[0] = {"normal": values.flat[0], "nan": np.nan, "inf": np.inf, "huge": 1e300, "zero": 0.0}[fill]
    with np.errstate(all="ignore"):
        return values.astype(dtype)


@st.composite
def config_edits(draw):
    kind = draw(st.sampled_from(["set", "delete", "truncate", "garbage"]))
    key, value = draw(config_keys), draw(json_values)
    cut, garbage = draw(st.integers(0, 400)), draw(st.binary(max_size=40))

    def edit(folder: Path) -> None:
        path = folder / CONFIG_NAME
        if kind in ("set", "delete"):
            config = json.loads(path.read_text())
            config.pop(key, None) if kind == "delete" else config.__setitem__(key, value)
            path.write_text(json.dumps(config, allow_nan=True))
        elif kind == "truncate":
            path.write_bytes(path.read_bytes()[:cut])
        else:
            path.write_bytes(garbage)
    return edit


@st.composite
def tensor_edits(draw, name=WEIGHTS_NAME):
    kind = draw(st.sampled_from(["truncate", "flip", "replace", "delete", "add", "rename"]))
    position, byte = draw(st.floats(0, 1, exclude_max=True)), draw(st.integers(1, 255))
    array, index = draw(arrays), draw(st.integers(0, 10**6))
    new_key = draw(st.sampled_from(["base_model.model.model.layers.0.attn.q.lora_A.weight", "base_model.vera_A",
                                    "base_model.model.x.bias", "base_model.model.model.norm.base_layer.bias",
                                    "base_model.model.model.layers.0.attn.v.lora_magnitude_vector", "junk",
                                    "base_model.model.model.layers.0.attn.q.lora_embedding_A"]))

    def edit(folder: Path) -> None:
        path = folder / name
        data = path.read_bytes()
        if kind in ("truncate", "flip"):
            at = int(position * len(data))
            data = data[:at] if kind == "truncate" else data[:at] + bytes([data[at] ^ byte]) + data[at + 1:]
            path.write_bytes(data)
            return
        tensors = safetensors.numpy.load_file(str(path))
        keys = sorted(tensors)
        victim = keys[index % len(keys)]
        if kind == "replace":
            tensors[victim] = array
        elif kind == "delete":
            del tensors[victim]
        elif kind == "add":
            tensors[new_key] = array
        else:
            tensors[new_key] = tensors.pop(victim)
        safetensors.numpy.save_file(tensors, str(path))
    return edit


def _assert_loaded_exactly(folder: Path) -> None:
    """read_peft_adapter either refuses with a refpeft error or returns exactly the file's tensors."""
    try:
        adapter = read_peft_adapter(folder)
    except RefpeftError:
        return
    on_disk = safetensors.numpy.load_file(str(folder / WEIGHTS_NAME))
    loaded = peft_tensors(adapter, save_projection=adapter.vera_A is not None)
    assert loaded.keys() == on_disk.keys()
    for key, array in on_disk.items():
        np.testing.assert_array_equal(loaded[key], array)


def _assert_merge_complete_or_absent(folder: Path, base: Path) -> None:
    out = folder / "merged.safetensors"
    before = {p.name for p in folder.iterdir()}
    status = cli.main(["merge", str(folder / "adapter"), "--base", str(base), "-o", str(out), "--no-progress"])
    assert status in (0, 2)
    after = {p.name for p in folder.iterdir()}
    if status == 2:
        assert after == before  # no output, no temporary file
    else:
        assert after == before | {"merged.safetensors"}
        assert safetensors.numpy.load_file(str(out)).keys() == safetensors.numpy.load_file(str(base)).keys()


def _setup(root: Path, method: str) -> Path:
    adapter = lora_adapter(dora=method == "dora") if method != "vera" else vera_adapter()
    write_peft_adapter(root / "adapter", adapter, save_projection=method != "vera-seed")
    rng = np.random.default_rng(0)
    base = {f"{p}.weight": rng.standard_normal((s.d, s.k)).astype(np.float32) for p, s in SHAPES.items()}
    base["model.norm.bias"] = np.zeros(8, np.float32)
    safetensors.numpy.save_file(base, str(root / "base.safetensors"))
    return root / "base.safetensors"


methods = st.sampled_from(["lora", "dora", "vera", "vera-seed"])


def _corrupt_then_load_and_merge(method, edit):
    """Apply `edit` to a valid adapter: loading and merging must end in a refpeft error or a correct result."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = _setup(root, method)
        edit(root / "adapter")
        _assert_loaded_exactly(root / "adapter")
        _assert_merge_complete_or_absent(root, base)


@SETTINGS
@given(method=methods, edit=config_edits())
def test_corrupted_configs(method, edit):
    _corrupt_then_load_and_merge(method, edit)


@SETTINGS
@given(method=methods, edit=tensor_edits())
def test_corrupted_adapter_tensors(method, edit):
    _corrupt_then_load_and_merge(method, edit)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=methods, edit=tensor_edits(name="base.safetensors"))
def test_corrupted_base_checkpoints(method, edit):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = _setup(root, method)
        edit(root)
        _assert_merge_complete_or_absent(root, base)
