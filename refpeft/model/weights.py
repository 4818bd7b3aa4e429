"""A Hugging Face model folder, read and written one tensor at a time.

A folder holds `config.json` (refpeft.model.config) and the weights, either in one
`model.safetensors` or in shards listed by `model.safetensors.index.json`:

    {"metadata": {...}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors", ...}}

Tensor names are exactly transformers' (`expected_shapes` lists them, in model order):

    model.embed_tokens.weight                          (V, h)
    model.layers.{i}.input_layernorm.weight            (h,)
    model.layers.{i}.self_attn.q_proj.weight           (H * D, h)     + .bias (H * D,)   if q/k/v bias
    model.layers.{i}.self_attn.k_proj.weight           (K * D, h)     + .bias (K * D,)
    model.layers.{i}.self_attn.v_proj.weight           (K * D, h)     + .bias (K * D,)
    model.layers.{i}.self_attn.o_proj.weight           (h, H * D)     + .bias (h,)       if o_proj bias
    model.layers.{i}.self_attn.{q,k}_norm.weight       (D,)                               Qwen3
    model.layers.{i}.post_attention_layernorm.weight   (h,)
    model.layers.{i}.mlp.{gate,up}_proj.weight         (I, h)         + .bias (I,)       if mlp_bias
    model.layers.{i}.mlp.down_proj.weight              (h, I)         + .bias (h,)
    model.norm.weight                                  (h,)
    lm_head.weight                                     (V, h)         absent when tie_word_embeddings

V vocab, h hidden, H heads, K key-value heads, D head_dim, I intermediate size; linear weights are
torch's (out, in). Before any data is read, every shard's header is checked against that list: a
missing or mis-shaped tensor, an unknown one, or a tensor in two shards is a FormatError naming the
tensor and its file. Ignored, as transformers ignores them: `...rotary_emb.inv_freq` buffers (old
checkpoints saved them; they are recomputed from the config) and `lm_head.weight` when embeddings are
tied (transformers overwrites it with the embedding).

Reading: `safetensors.safe_open(..., framework="numpy")` maps each file and copies out one tensor
at a time; bfloat16 arrives as ml_dtypes.bfloat16 (refpeft.io registers it with NumPy) and, like
float16, converts to float32 and float64 exactly. A float64 checkpoint read as float32 is rounded
to nearest. Writing goes through refpeft.io's atomic writes: an interrupted save leaves no partial
file, and nothing is written unless every tensor is present with its shape.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np
import safetensors

from refpeft.backend import numpy_namespace, to_numpy
from refpeft.errors import ConfigError, DTypeError, FormatError
from refpeft.io import atomic_write_bytes, write_safetensors  # importing refpeft.io registers bfloat16 with NumPy
from refpeft.model.config import ModelConfig, config_from_dict, config_to_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
COMPUTE_DTYPES = ("float32", "float64")
STORE_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64), "float16": np.dtype(np.float16),
                "bfloat16": np.dtype(ml_dtypes.bfloat16)}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a model with `config` holds, transformers' name -> shape, in model order."""
    h, inter, d = config.hidden_size, config.intermediate_size, config.head_dim
    q_rows, kv_rows = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        for name, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            shapes[f"{p}.self_attn.{name}_proj.weight"] = (rows, h)
            if config.attention_bias:
                shapes[f"{p}.self_attn.{name}_proj.bias"] = (rows,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (h, q_rows)
        if config.o_proj_bias:
            shapes[f"{p}.self_attn.o_proj.bias"] = (h,)
        if config.qk_norm:
            shapes[f"{p}.self_attn.q_norm.weight"] = (d,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (d,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        for name, shape in (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter))):
            shapes[f"{p}.mlp.{name}_proj.weight"] = shape
            if config.mlp_bias:
                shapes[f"{p}.mlp.{name}_proj.bias"] = shape[:1]
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def is_ignored(name: str, config: ModelConfig) -> bool:
    """Tensors a checkpoint may hold that are not weights of the model (see the module docstring)."""
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")


def read_config(folder: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a model folder's config.json (FormatError if missing or not JSON)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FormatError(f"{path}: no such file (a model folder needs a config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from None
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


class LazyTensors(Mapping):
    """Tensors by name, each made by `read(name)` when it is looked up and not kept: weights seen
    through a conversion (float64, noise, a dequantised layer) without holding them all at once."""

    def __init__(self, names: list[str], read: Callable[[str], Any]) -> None:
        self.names, self.read = names, read

    def __getitem__(self, name: str) -> Any:
        if name not in self.names:
            raise KeyError(name)
        return self.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def load_model_folder(folder: str | os.PathLike, *, dtype: str = "float32",
                      xp: Any = None) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, weights) of a model folder: weights maps transformers' names to `dtype` arrays of `xp`.

    Every header is checked first (module docstring); then the tensors are read one at a time.
    """
    xp = numpy_namespace() if xp is None else xp
    target = _compute_dtype(dtype)
    config = read_config(folder)
    located = locate_tensors(folder, config)
    read: dict[str, Any] = {}
    for path in dict.fromkeys(located.values()):  # each file opened once, its tensors read one by one
        with _open(path) as f:
            for name in (n for n, p in located.items() if p == path):
                try:
                    array = f.get_tensor(name)
                except Exception as exc:
                    raise FormatError(f"{path}: tensor {name!r} cannot be read ({exc})") from None
                read[name] = xp.asarray(array.astype(target, copy=False))
    return config, {name: read[name] for name in located}


def locate_tensors(folder: str | os.PathLike, config: ModelConfig) -> dict[str, Path]:
    """Which file holds each expected tensor (model order), after checking every header against config."""
    expected = expected_shapes(config)
    found: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for path in _weight_files(Path(folder)):
        with _open(path) as f:
            for name in f.keys():
                if name in found:
                    raise FormatError(f"{path}: tensor {name!r} is also in {found[name][0].name}")
                view = f.get_slice(name)
                found[name] = (path, tuple(view.get_shape()), view.get_dtype())
    for name, (path, shape, code) in found.items():
        if is_ignored(name, config):
            continue
        if name not in expected:
            raise FormatError(f"{path}: unexpected tensor {name!r} with shape {shape}: not a weight of a "
                              f"{config.model_type} model with this config.json")
        if shape != expected[name]:
            raise FormatError(f"{path}: tensor {name!r} has shape {shape}, the config implies {expected[name]}")
        if code not in FLOAT_CODES:
            raise FormatError(f"{path}: tensor {name!r} has dtype {code}; expected one of {', '.join(FLOAT_CODES)}")
    missing = [name for name in expected if name not in found]
    if missing:
        where = ", ".join(sorted({p.name for p, _, _ in found.values()})) or "no weight file"
        raise FormatError(f"{Path(folder)}: tensor {missing[0]!r} (shape {expected[missing[0]]}) is missing from "
                          f"{where}" + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))
    return {name: found[name][0] for name in expected}


def save_model_folder(folder: str | os.PathLike, config: ModelConfig, weights: dict[str, Any], *,
                      dtype: str | None = None) -> Path:
    """Write config.json and model.safetensors (one file, atomically) that transformers loads.

    weights: transformers' name -> array of any namespace, exactly `expected_shapes(config)`.
    dtype: "float32", "float64", "float16" or "bfloat16" to store in (rounded to nearest); None keeps
    each array's dtype. Everything is checked before anything is written.
    """
    target = Path(folder)
    if (target / INDEX_NAME).exists():
        raise ConfigError(f"{target / INDEX_NAME} exists: the folder holds a sharded model that the "
                          f"single {WEIGHTS_NAME} would contradict; write to another folder")
    if dtype is not None and dtype not in STORE_DTYPES:
        raise DTypeError(f"cannot store weights as {dtype!r}; choose one of {', '.join(STORE_DTYPES)}")
    expected = expected_shapes(config)
    for name in weights:
        if name not in expected:
            raise FormatError(f"weights hold {name!r}, which is not a tensor of this {config.model_type} model")
    arrays = {}
    for name, shape in expected.items():
        if name not in weights:
            raise FormatError(f"weights lack {name!r} (shape {shape})")
        array = to_numpy(weights[name])
        if tuple(array.shape) != shape:
            raise FormatError(f"weights[{name!r}] has shape {tuple(array.shape)}, the config implies {shape}")
        if array.dtype.name not in STORE_DTYPES:
            raise DTypeError(f"weights[{name!r}] has dtype {array.dtype}; expected a float dtype")
        arrays[name] = array if dtype is None else array.astype(STORE_DTYPES[dtype])
    text = json.dumps(config_to_dict(config), indent=2) + "\n"
    write_safetensors(target / WEIGHTS_NAME, arrays, metadata={"format": "pt"})
    atomic_write_bytes(target / CONFIG_NAME, text.encode("utf-8"))
    return target


def _compute_dtype(dtype: str) -> np.dtype:
    if dtype not in COMPUTE_DTYPES:
        raise DTypeError(f"models load in {' or '.join(COMPUTE_DTYPES)}, not {dtype!r}")
    return np.dtype(dtype)


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the shards its index names, or model.safetensors."""
    index = folder / INDEX_NAME
    if not index.is_file():
        single = folder / WEIGHTS_NAME
        if not single.is_file():
            raise FormatError(f"{folder}: neither {WEIGHTS_NAME} nor {INDEX_NAME} is there")
        return [single]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise FormatError(f"{index}: not an index with a weight_map ({exc})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError(f"{index}: weight_map must map tensor names to file names")
    files = []
    for file_name in dict.fromkeys(weight_map.values()):
        if Path(file_name).name != file_name or file_name in ("", ".", ".."):
            raise FormatError(f"{index}: shard {file_name!r} is not a file name inside the folder")
        if not (folder / file_name).is_file():
            raise FormatError(f"{index}: shard {file_name!r} is missing from {folder}")
        files.append(folder / file_name)
    # The shards' headers are the truth; the index must agree with them.
    with_names = {}
    for path in files:
        with _open(path) as f:
            with_names.update({name: path.name for name in f.keys()})
    for name, file_name in weight_map.items():
        if with_names.get(name) != file_name:
            raise FormatError(f"{index}: maps tensor {name!r} to {file_name}, which does not hold it")
    return files


@contextmanager
def _open(path: Path) -> Iterator[Any]:
    """safetensors.safe_open, with a file it cannot parse turned into a FormatError naming it."""
    try:
        handle = safetensors.safe_open(str(path), framework="numpy")
    except Exception as exc:  # safetensors raises several foreign types for corrupt files
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None
    with handle as f:
        yield f
