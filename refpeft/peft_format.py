"""HF PEFT adapter files, read and written without torch: adapter_model.safetensors + adapter_config.json.

What PEFT 0.21 writes (`save_pretrained`; keys carry no adapter name; <p> is a module path such
as "model.layers.0.self_attn.q_proj", the name of the adapted linear layer in the base model):

    base_model.model.<p>.lora_A.weight          (r, k)   LoRA and DoRA
    base_model.model.<p>.lora_B.weight          (d, r)
    base_model.model.<p>.lora_B.bias            (d,)     lora_bias=True, added as s * bias
    base_model.model.<p>.lora_magnitude_vector  (d,)     use_dora=True (no ".weight" suffix)
    base_model.model.<p>.vera_lambda_d          (r,)     VeRA
    base_model.model.<p>.vera_lambda_b          (d,)
    base_model.model.<p>.ia3_l                  (d, 1)   IA3, output scaling; (1, k) on feedforward_modules
    base_model.vera_A, base_model.vera_B        (r, k_max), (d_max, r)   VeRA with save_projection=True
    base_model.model.<p>.base_layer.bias        (d,)     bias="lora_only"/"all"/"vera_only": the
                                                         trained bias of an adapted layer
    base_model.model.<q>.bias                   any      bias="all": the bias of any other module q
    base_model.model.<t>                        any      modules_to_save: tensor t of a module trained in
                                                         full, by its checkpoint name ("lm_head.weight";
                                                         refpeft.saved_modules)
    base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta
                                                (n, H)   trainable_token_indices: the rows' values
                                                         (refpeft.model.trainable_tokens)

A TRAINABLE_TOKENS folder (trainable tokens alone) reads as an Adapter without modules, and such an
Adapter is written as one (refpeft.model.trainable_tokens: read_trainable_tokens, write_trainable_tokens).

Which tensors a module has, and their key suffixes, come from its method's row of the method
table. adapter_config.json gives the rest (refpeft.peft_config: options, patterns, the method).
VeRA projections that were not saved are regenerated bit for bit from `projection_prng_key` with
refpeft.methods.vera.vera_projections, which needs the base's layer sizes (k_max is not recorded).

Reading checks everything at the boundary and names the file and key of each problem: a missing
or unreadable file (adapter_model.bin is refused: it is a pickle, and refpeft never unpickles),
corrupt or truncated safetensors (refpeft.checkpoint), invalid JSON, unsupported config options
(named), missing and unexpected keys, non-float dtypes, shapes that disagree with each other or
with the base model, ranks that disagree with the config, and non-finite values.

Writing produces files PEFT loads with `PeftModel.from_pretrained`. Each file is written atomically (refpeft.io); the weights go first, so an
interrupted save leaves either the old pair, or new weights with the old config, which reading
then refuses (their ranks or keys disagree) instead of loading a mix.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.backend import FLOAT_NAMES, to_numpy
from refpeft.checkpoint import FLOAT_DTYPES, SafetensorsFile
from refpeft.errors import ConfigError, DTypeError, FormatError, NonFiniteError, ShapeError
from refpeft.init import as_parameter
from refpeft.io import atomic_write_bytes, read_json_object, write_safetensors
from refpeft.methods import method_spec, peft_methods
from refpeft.methods.linear import LinearShape
from refpeft.model.trainable_tokens import (EMBED, check_token_indices, is_tokens_folder, lora_token_tensors,
                                            read_trainable_tokens, split_lora_tokens, write_trainable_tokens)
from refpeft.peft_config import ALPHA_KEYS, CONFIG_NAME, config_method, feedforward, pattern_value, peft_config, \
    read_config, targets
from refpeft.peft_shapes import (ADAPTED_BIAS_SUFFIX, PREFIX, check_adapter, fit_to_base, module_shape,
                                 module_suffixes, tensor_key)
from refpeft.saved_modules import (EMBEDDING, TIED_HEAD, check_saved_against_base, excluded_from_targets,
                                   saved_module, select_saved)

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
# Per-module tensors: tensor name -> key suffix after "base_model.model.<p>.", and the adapter-wide
# tensors' keys, as the method table gives them.
# Optional per-module tensors and the adapter_config.json flag that says they are saved.
OPTIONAL_FLAGS = {"bias": "lora_bias"}

CONVERT_PICKLE = (
    "refpeft never unpickles files. Convert it where torch and peft are installed, e.g.\n"
    "    python -c \"import torch, safetensors.torch as st; "
    "st.save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors', "
    "metadata={'format': 'pt'})\"\n"
    "or load it with PeftModel.from_pretrained and save it again with save_pretrained "
    "(safetensors is PEFT's default)."
)

def read_peft_adapter(directory: str | os.PathLike, *, base_shapes: Mapping[str, LinearShape] | None = None,
                      dtype: str | None = None) -> Adapter:
    """Read a PEFT adapter directory into an Adapter, checking every tensor against the config.

    base_shapes: the base model's layer sizes by module path (`SafetensorsFile.linear_shapes`); when
    given, every adapted layer must be present with those sizes, and a VeRA adapter saved without
    its projections gets them regenerated from `projection_prng_key` (without base_shapes they
    stay None). dtype: None keeps each tensor's file dtype (bfloat16 becomes float32 holding the
    same values, refpeft's emulation); a float name casts every tensor to it.
    Raises FormatError, ConfigError, ShapeError, RankError, DTypeError or NonFiniteError, each
    naming the file and the key.
    """
    if dtype is not None and dtype not in FLOAT_NAMES:
        raise DTypeError(f"unknown float format {dtype!r}; choose one of {', '.join(FLOAT_NAMES)}")
    folder = _adapter_folder(directory)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if is_tokens_folder(read_json_object(config_path)):
        indices, values, config = read_trainable_tokens(folder)
        values = values if dtype is None else as_parameter(values, dtype=dtype, xp=None)
        return Adapter({}, config=config, token_indices=tuple(indices), token_values=values)
    config = read_config(config_path)
    checkpoint = SafetensorsFile(weights_path)
    tensors = {name: _read_checked(checkpoint, name, dtype=dtype) for name in checkpoint.keys()}
    tensors, tokens = split_lora_tokens(config, tensors, source=weights_path)
    adapter = replace(_adapter_from_tensors(config, tensors, source=weights_path), **tokens)
    if base_shapes is not None:
        adapter = fit_to_base(adapter, base_shapes, source=weights_path, dtype=dtype)
    return adapter


def checkpoint_shapes(base: SafetensorsFile) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the header, with a tied head's "lm_head.weight" (the embedding's shape)
    where the checkpoint stores the embedding and no head: PEFT saves a tied lm_head's own copy."""
    shapes = {name: base.info(name).shape for name in base.keys()}
    if TIED_HEAD not in shapes and EMBEDDING in shapes:
        shapes[TIED_HEAD] = shapes[EMBEDDING]
    return shapes


def read_peft_adapter_with_base(directory: str | os.PathLike, base: SafetensorsFile, *,
                                dtype: str | None = None) -> Adapter:
    """`read_peft_adapter` checked against the base checkpoint `base` (layer sizes from its header)."""
    adapter = read_peft_adapter(directory, dtype=dtype)
    shapes = base.linear_shapes(adapter.modules, fan_in_fan_out=bool(adapter.config.get("fan_in_fan_out")))
    source = f"{_adapter_folder(directory) / WEIGHTS_NAME} (base {base.path})"
    check_saved_against_base(adapter.saved_modules, checkpoint_shapes(base), source=source)
    if adapter.token_values is not None:
        vocab, hidden = base.info(EMBED).shape
        check_token_indices(adapter.token_indices, vocab)
        if adapter.token_values.shape[1] != hidden:
            raise ShapeError(f"{source}: the trainable token rows are {adapter.token_values.shape[1]} wide, the "
                             f"base's embedding {hidden}")
    return fit_to_base(adapter, shapes, source=source, dtype=dtype)


def write_peft_adapter(directory: str | os.PathLike, adapter: Adapter, *, save_projection: bool = True,
                       tied_embeddings: bool | None = None) -> Path:
    """Write `adapter` as a PEFT adapter directory (weights, then config, each atomically).

    LoRA and DoRA modules are written as peft_type "LORA" (all modules one method: PEFT's use_dora
    is per config), VeRA as "VERA" with the projections saved unless save_projection=False (then
    Adapter.config must hold the `projection_prng_key` they were drawn from). Arrays keep their
    dtype. Returns the directory. Methods PEFT does not have (Pre-Diag, SORA) are refused.
    Trainable token rows go beside LoRA modules (trainable_token_indices); an adapter of rows alone
    is a TRAINABLE_TOKENS folder, which for a tied head holds the rows twice: tied_embeddings
    (the base's tie_word_embeddings) must then be given.
    """
    if not adapter.modules and adapter.token_values is not None:
        if tied_embeddings is None:
            raise ConfigError("a trainable-tokens folder saves the rows for a tied head too: pass tied_embeddings")
        _check_values(to_numpy(adapter.token_values), key="trainable_tokens_delta", source=directory)
        return write_trainable_tokens(directory, adapter.token_indices, adapter.token_values, tied=tied_embeddings,
                                      base_model=adapter.config.get("base_model_name_or_path"))
    foreign = sorted({m.method for m in adapter.modules.values() if m.spec.peft_type is None})
    if foreign:
        raise ConfigError(f"{', '.join(foreign)} adapters have no PEFT file format (PEFT has no such method); "
                          "keep them as refpeft objects or merge them into the weights")
    folder = Path(directory)
    source, config_path = adapter_files(folder)
    config = peft_config(adapter, save_projection=save_projection)
    tensors = peft_tensors(adapter, save_projection=save_projection)
    check_adapter(adapter, config=config, source=source)
    for key, array in tensors.items():
        _check_values(array, key=key, source=source)
    created = not folder.exists()
    try:
        write_safetensors(source, tensors, metadata={"format": "pt"})
        atomic_write_bytes(config_path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    except BaseException:
        if created and folder.is_dir() and not any(folder.iterdir()):   # a full disk leaves no empty folder
            folder.rmdir()
        raise
    return folder


def adapter_files(directory: str | os.PathLike) -> tuple[Path, Path]:
    """The weights and the config file of a PEFT adapter directory."""
    return Path(directory) / WEIGHTS_NAME, Path(directory) / CONFIG_NAME


def peft_tensors(adapter: Adapter, *, save_projection: bool = True) -> dict[str, np.ndarray]:
    """The adapter_model.safetensors content: PEFT's key for each tensor (NumPy arrays).

    With lora_bias on some modules only, the others get a zero bias (PEFT's lora_bias is per
    config, and a zero bias changes nothing)."""
    has_bias = any(m.bias is not None for m in adapter.modules.values())
    tensors: dict[str, np.ndarray] = {}
    for path, module in adapter.modules.items():
        for field, suffix in module.spec.suffixes().items():
            value = getattr(module, field)
            if field == "bias" and value is None and has_bias:
                value = np.zeros(module.out_features, dtype=to_numpy(module.B).dtype)
            if value is not None:
                tensors[f"{PREFIX}{path}.{suffix}"] = to_numpy(value)
    for path, bias in adapter.base_biases.items():
        suffix = ADAPTED_BIAS_SUFFIX if path in adapter.modules else "bias"
        tensors[f"{PREFIX}{path}.{suffix}"] = to_numpy(bias)
    for name, value in adapter.saved_modules.items():
        tensors[PREFIX + name] = to_numpy(value)
    tensors.update(lora_token_tensors(adapter))
    shared = method_spec(adapter.method).shared if len(adapter.methods) == 1 else {}
    if shared and save_projection:
        if set(adapter.shared) != set(shared):
            raise ConfigError(f"save_projection=True needs the adapter's {' and '.join(shared)} (read the adapter "
                              "with base_shapes to regenerate them)")
        for field, key in shared.items():
            tensors[key] = to_numpy(adapter.shared[field])
    return tensors


# --- reading ------------------------------------------------------------------------------------


def _adapter_folder(directory: str | os.PathLike) -> Path:
    path = Path(directory)
    if path.is_file():
        if path.name == PICKLE_NAME or path.suffix in (".bin", ".pt", ".pth", ".pkl"):
            raise FormatError(f"{path}: a pickle file. {CONVERT_PICKLE}")
        path = path.parent
    if not path.is_dir():
        raise FormatError(f"{path}: no such adapter directory")
    if not (path / WEIGHTS_NAME).is_file():
        if (path / PICKLE_NAME).is_file():
            raise FormatError(f"{path / PICKLE_NAME}: a pickle file, and {WEIGHTS_NAME} is absent. {CONVERT_PICKLE}")
        raise FormatError(f"{path / WEIGHTS_NAME}: no such file (a PEFT adapter directory holds {WEIGHTS_NAME} "
                          f"and {CONFIG_NAME})")
    if not (path / CONFIG_NAME).is_file():
        raise FormatError(f"{path / CONFIG_NAME}: no such file")
    return path


def _read_checked(checkpoint: SafetensorsFile, name: str, *, dtype: str | None) -> np.ndarray:
    """One adapter tensor in memory: floating, finite, optionally cast."""
    info = checkpoint.info(name)
    if info.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"{checkpoint.path}: {name} has dtype {info.dtype}; adapter tensors are floating "
                         f"({', '.join(FLOAT_DTYPES)})")
    array = checkpoint.read_float(name)
    _check_values(array, key=name, source=checkpoint.path)
    return array if dtype is None else as_parameter(array, dtype=dtype, xp=None)


def _check_values(array: np.ndarray, *, key: str, source: str | os.PathLike) -> None:
    if array.dtype.kind != "f":
        raise DTypeError(f"{source}: {key} has dtype {array.dtype}; adapter tensors are floating")
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise NonFiniteError(f"{source}: {key} holds {bad} non-finite value(s) (NaN or inf)")


def _split_keys(tensors: dict[str, np.ndarray], *, fields: tuple[str, ...], shared: Mapping[str, str], source: Path,
                bias: str, saved_entries: list[str]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray],
                                                                 dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Keys -> ({path: {field: array}}, {path: trained base bias}, {shared tensor name: array},
    {saved module's tensor name: array}); a key that a modules_to_save entry selects is a saved tensor."""
    suffixes = {module_suffixes()[f]: f for f in fields}
    modules: dict[str, dict[str, np.ndarray]] = {}
    biases: dict[str, tuple[str, np.ndarray]] = {}
    projections: dict[str, np.ndarray] = {}
    saved: dict[str, np.ndarray] = {}
    projection_fields = {key: field for field, key in shared.items()}
    for key, array in tensors.items():
        if "lora_embedding_A" in key or "lora_embedding_B" in key:
            raise ConfigError(f"{source}: {key}: LoRA on embedding layers is not supported (linear layers only)")
        if key in projection_fields:
            projections[projection_fields[key]] = array
            continue
        if not key.startswith(PREFIX):
            raise FormatError(f"{source}: unexpected key {key!r} (PEFT keys start with {PREFIX!r})")
        rest = key[len(PREFIX):]
        for suffix, field in suffixes.items():
            if rest.endswith("." + suffix):
                modules.setdefault(rest[: -len(suffix) - 1], {})[field] = array
                break
        else:
            if saved_module(rest, saved_entries) is not None:
                saved[rest] = array
            elif bias != "none" and rest.endswith("." + ADAPTED_BIAS_SUFFIX):
                biases[rest[: -len(ADAPTED_BIAS_SUFFIX) - 1]] = (key, array)
            elif bias == "all" and rest.endswith(".bias") and not rest.endswith(".lora_B.bias"):
                biases[rest[: -len(".bias")]] = (key, array)
            else:
                raise FormatError(f"{source}: unexpected key {key!r}" + _bias_hint(rest, bias))
    for path, (key, _) in biases.items():
        adapted = path in modules
        if adapted != key.endswith("." + ADAPTED_BIAS_SUFFIX):
            raise FormatError(f"{source}: unexpected key {key!r}: the bias of "
                              + (f"adapted module {path!r} is saved as {PREFIX}{path}.{ADAPTED_BIAS_SUFFIX}" if adapted
                                 else f"{path!r}, which has no adapter, is saved as {PREFIX}{path}.bias"))
    select_saved(saved, saved_entries, where=f"{source} ({CONFIG_NAME})")   # each entry selects a key
    return modules, {path: array for path, (_, array) in biases.items()}, projections, saved


def _bias_hint(rest: str, bias: str) -> str:
    if rest.endswith("." + module_suffixes()["bias"]):
        return f" (lora_B has a bias but {CONFIG_NAME} has lora_bias false, or the method is not LoRA)"
    if rest.endswith(".bias") and bias == "none":
        return f" (a bias, but {CONFIG_NAME} has bias = 'none')"
    for suffix in module_suffixes().values():
        if rest.endswith("." + suffix):
            return f" ({suffix} does not belong to this config's method)"
    if rest.endswith(".weight"):
        return f" (a whole module's tensor, as PEFT saves modules_to_save, but {CONFIG_NAME}'s modules_to_save " \
               "names no module of it)"
    return ""


def _require_fields(modules: dict[str, dict[str, np.ndarray]], required: tuple[str, ...], *, source: Path,
                    why: dict[str, str]) -> None:
    for path, found in modules.items():
        for field in required:
            if field not in found:
                raise FormatError(f"{source}: missing key {tensor_key(path, field)!r}"
                                  + (f" ({why[field]})" if field in why else "")
                                  + f"; module {path!r} has {', '.join(tensor_key(path, f) for f in found)}")


def _check_targets(config: dict[str, Any], paths: list[str], *, source: Path) -> None:
    for path in paths:
        if excluded_from_targets(path, config.get("modules_to_save") or []):
            raise FormatError(f"{source}: module {path!r} has adapter tensors but {CONFIG_NAME}'s modules_to_save "
                              f"{config['modules_to_save']!r} selects it, so PEFT saves it whole and adapts it not")
        if not targets(config, path):
            raise FormatError(f"{source}: module {path!r} has adapter tensors but {CONFIG_NAME}'s target_modules "
                              f"{config.get('target_modules')!r} does not select it, so PEFT would not load them")


def _adapter_from_tensors(config: dict[str, Any], tensors: dict[str, np.ndarray], *, source: Path) -> Adapter:
    """The Adapter a config and its file's tensors describe, every module of the config's method."""
    spec = config_method(config, source=source)
    # optional tensors with a flag (lora_bias) are there when it is set; those without (LoKr's) may be
    fields = tuple(spec.tensors) + tuple(f for f in spec.optional if config.get(OPTIONAL_FLAGS.get(f), f not in OPTIONAL_FLAGS))
    modules, base_biases, shared, saved = _split_keys(tensors, fields=fields, shared=spec.shared, source=source,
                                                      bias=config.get("bias", "none"),
                                                      saved_entries=config.get("modules_to_save") or [])
    flags = " and ".join(f"{flag} is true" for flag, value in spec.peft_flags.items() if value)
    plain = {name for m in peft_methods(spec.peft_type) if not any(m.peft_flags.values()) for name in m.tensors}
    why = {**{f: flags for f in spec.tensors if flags and f not in plain},
           **{f: f"{OPTIONAL_FLAGS[f]} is true" for f in spec.optional if f in OPTIONAL_FLAGS}}
    _require_fields(modules, tuple(f for f in fields if f not in spec.optional or f in OPTIONAL_FLAGS), source=source,
                    why=why)
    if not modules:
        raise FormatError(f"{source}: no {spec.name} tensors ({'/'.join(spec.tensors.values())}) found")
    if spec.shared and config["save_projection"]:
        for field, key in spec.shared.items():
            if field not in shared:
                raise FormatError(f"{source}: missing key {key!r} (save_projection is true)")
    elif shared:
        raise FormatError(f"{source}: unexpected key {spec.shared[next(iter(shared))]!r} (save_projection is false)")
    _check_targets(config, list(modules), source=source)

    def alpha(path: str) -> float:
        return float(pattern_value(config.get("alpha_pattern") or {}, path, config[ALPHA_KEYS[spec.peft_type]])[0]) \
            if spec.scaled else 8.0

    adapter = Adapter(
        modules={path: ModuleAdapter(spec.name, found, alpha=alpha(path), rslora=bool(config.get("use_rslora")),
                                     fan_in_fan_out=bool(config.get("fan_in_fan_out")),
                                     rank=pattern_value(config.get("rank_pattern") or {}, path, config.get("r"))[0])
                 for path, found in sorted(modules.items())},
        vera_A=shared.get("vera_A"), vera_B=shared.get("vera_B"), config=config, base_biases=base_biases,
        saved_modules=dict(sorted(saved.items())))
    check_adapter(adapter, config=config, source=source)
    if config.get("feedforward_modules") is not None:
        _check_feedforward(adapter, config, source=source)
    return adapter


def _check_feedforward(adapter: Adapter, config: Mapping[str, Any], *, source: Path) -> None:
    """IA3: each l's shape, (1, k) for input scaling or (d, 1) for output scaling, against the side
    `feedforward_modules` gives its module (PEFT builds the layer from the config, then loads l)."""
    for path, m in adapter.modules.items():
        if m.in_features is None and m.out_features is None:      # a 1 x 1 layer's (1, 1): either side
            continue
        inputs = m.in_features is not None
        if inputs != feedforward(config, path):
            raise ShapeError(f"{source}: {tensor_key(path, 'l')} has shape {tuple(m.l.shape)}, which scales the layer's "
                             f"{'inputs' if inputs else 'outputs'}, but {CONFIG_NAME}'s feedforward_modules "
                             f"{config['feedforward_modules']!r} {'does not select' if inputs else 'selects'} {path!r}")


# --- writing ------------------------------------------------------------------------------------


__all__ = ["read_peft_adapter", "read_peft_adapter_with_base", "checkpoint_shapes", "write_peft_adapter",
           "peft_tensors", "check_adapter", "fit_to_base", "tensor_key", "module_shape"]   # the last four: peft_shapes
