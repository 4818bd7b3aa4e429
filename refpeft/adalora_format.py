"""HF PEFT's AdaLoRA adapter files (peft_type "ADALORA"), read and written without torch.

What PEFT 0.21.2 writes (`save_pretrained`; <p> a module path, no adapter name in keys):

    base_model.model.<p>.lora_A     (r_p, k)    the kept right singular vectors
    base_model.model.<p>.lora_E     (r_p, 1)    the kept singular values
    base_model.model.<p>.lora_B     (d, r_p)    the kept left singular vectors
    adapter_config.json rank_pattern {"<p>.lora_E": [init_r booleans]}: the final masks

ranknum is not saved: it is init_r on load (PEFT's resize_modules_by_rank_pattern copies the init_r
layer's ranknum into the pruned one), so s = lora_alpha / (init_r + 1e-5) keeps its training value.
r_p is the number of true entries of the module's mask, or init_r when rank_pattern does not name it
(saved before the final allocation: masked singular values are then stored as zeros). Writing prunes
full init_r tensors by the masks exactly as PEFT's resize_state_dict_by_rank_pattern does.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from refpeft.backend import to_numpy
from refpeft.checkpoint import SafetensorsFile
from refpeft.errors import ConfigError, FormatError, NonFiniteError, ShapeError
from refpeft.io import atomic_write_bytes, read_json_object, write_safetensors
from refpeft.methods.adalora import TENSOR_NAMES, adalora_scaling, check_adalora_factors
from refpeft.methods.adalora_allocator import AdaloraSchedule
from refpeft.peft_options import ADALORA_OPTIONS, IGNORED_OPTIONS, UNSUPPORTED_OPTIONS

PREFIX = "base_model.model."
WEIGHTS_NAME, CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"


@dataclass(frozen=True)
class AdaloraAdapter:
    """An AdaLoRA adapter as PEFT saves it: per module (A, E, B) as stored, and the config's values."""

    modules: dict[str, tuple[Any, Any, Any]]            # {path: (A (r_p, k), E (r_p, 1), B (d, r_p))}
    lora_alpha: float
    init_r: int
    rank_pattern: dict[str, list[bool]] | None = None   # {path: init_r booleans}
    config: dict[str, Any] = field(default_factory=dict)

    def scaling(self, path: str) -> float:
        """s of module `path`: c / (init_r + 1e-5), c = lora_alpha, or the module's stored rank when <= 0."""
        return adalora_scaling(self.lora_alpha, float(self.init_r), int(self.modules[path][0].shape[0]))


def read_adalora_adapter(directory: str | os.PathLike) -> AdaloraAdapter:
    """Read and check a PEFT AdaLoRA directory: options, masks, keys, shapes against the masks, finite values."""
    folder = Path(directory)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FormatError(f"{path}: no such file")
    config = read_json_object(config_path)
    init_r, alpha, patterns = _checked_config(config, config_path)
    checkpoint = SafetensorsFile(weights_path)
    tensors: dict[str, dict[str, np.ndarray]] = {}
    for key in checkpoint.keys():
        path, _, name = key[len(PREFIX):].rpartition(".")
        if not key.startswith(PREFIX) or name not in TENSOR_NAMES:
            raise FormatError(f"{weights_path}: unexpected key {key!r} (AdaLoRA keys are {PREFIX}<p>.lora_A, "
                              "lora_E, lora_B)")
        array = checkpoint.read_float(key)
        if not np.all(np.isfinite(array)):
            raise NonFiniteError(f"{weights_path}: {key} holds non-finite values")
        tensors.setdefault(path, {})[name] = array
    modules = {}
    for path, found in tensors.items():
        missing = [n for n in TENSOR_NAMES if n not in found]
        if missing:
            keys = ", ".join(f"{PREFIX}{path}.{n}" for n in missing)
            raise FormatError(f"{weights_path}: module {path!r} lacks {keys}")
        A, E, B = (found[n] for n in TENSOR_NAMES)
        check_adalora_factors(A, E, B, d=B.shape[0] if B.ndim == 2 else -1, k=A.shape[-1])
        mask = patterns.get(path)
        want = init_r if mask is None else sum(mask)
        if A.shape[0] != want:
            origin = f"rank_pattern[{path + '.lora_E'!r}] keeps {want}" if mask is not None else f"init_r = {want}"
            raise ShapeError(f"{weights_path}: {PREFIX}{path}.lora_A has rank {A.shape[0]} but {CONFIG_NAME}'s "
                             f"{origin}")
        modules[path] = (A, E, B)
    unknown = sorted(set(patterns) - set(modules))
    if unknown:
        raise FormatError(f"{config_path}: rank_pattern names modules without tensors: {unknown}")
    return AdaloraAdapter(modules, alpha, init_r, patterns or None, config)


def write_adalora_adapter(directory: str | os.PathLike, modules: Mapping[str, tuple[Any, Any, Any]], *,
                          schedule: AdaloraSchedule, lora_alpha: float, rank_pattern: Mapping[str, Any] | None = None,
                          orth_reg_weight: float = 0.5, fan_in_fan_out: bool = False) -> Path:
    """Write full init_r modules {path: (A, E, B)} as PEFT saves them: pruned by `rank_pattern`
    ({path: (init_r,) bool}, the allocator's final masks) when given. Weights first, then the config."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, pattern = {}, {}
    for path, (A, E, B) in modules.items():
        A, E, B = (to_numpy(t) for t in (A, E, B))
        check_adalora_factors(A, E, B, d=B.shape[0], k=A.shape[1])
        if A.shape[0] != schedule.init_r:
            raise ShapeError(f"module {path!r} has rank {A.shape[0]}; write the unpruned init_r = "
                             f"{schedule.init_r} tensors and pass the masks as rank_pattern")
        if rank_pattern is not None:
            keep = np.asarray(to_numpy(rank_pattern[path]), dtype=bool).reshape(-1)
            if keep.shape != (schedule.init_r,):
                raise ShapeError(f"rank_pattern[{path!r}] has {keep.size} entries, expected init_r = {schedule.init_r}")
            pattern[f"{path}.lora_E"] = [bool(b) for b in keep]
            A, E, B = A[keep], E[keep], B[:, keep]
        for name, t in zip(TENSOR_NAMES, (A, E, B)):
            tensors[f"{PREFIX}{path}.{name}"] = np.ascontiguousarray(t)
    s = schedule
    config = {"peft_type": "ADALORA", "inference_mode": True, "init_lora_weights": True, "bias": "none",
              "target_modules": "(?:" + "|".join(re.escape(p) for p in sorted(modules)) + ")",
              "fan_in_fan_out": fan_in_fan_out, "lora_alpha": _plain(lora_alpha), "lora_dropout": 0.0,
              "init_r": s.init_r, "target_r": s.target_r, "tinit": s.tinit, "tfinal": s.tfinal, "deltaT": s.deltaT,
              "beta1": s.beta1, "beta2": s.beta2, "total_step": s.total_step, "orth_reg_weight": orth_reg_weight,
              "rank_pattern": pattern or None}
    write_safetensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    atomic_write_bytes(folder / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return folder


def _checked_config(config: dict[str, Any], source: Path) -> tuple[int, float, dict[str, list[bool]]]:
    """(init_r, lora_alpha, {path: mask}) from an AdaLoRA config, refusing what refpeft does not read."""
    if config.get("peft_type") != "ADALORA":
        raise ConfigError(f"{source}: peft_type {config.get('peft_type')!r}; this reader takes ADALORA adapters")
    for option, value in config.items():
        if option not in ADALORA_OPTIONS | IGNORED_OPTIONS and value not in (None, False, [], {}):
            what = UNSUPPORTED_OPTIONS.get(option)
            raise ConfigError(f"{source}: option {option!r} = {value!r} is not supported"
                              + (f" ({what})" if what else " (not a PEFT 0.21 AdaLoRA option refpeft knows)"))
    init_r, alpha = config.get("init_r", 12), config.get("lora_alpha", 8)
    if type(init_r) is not int or init_r < 0:
        raise ConfigError(f"{source}: init_r must be a non-negative integer, got {init_r!r}")
    if type(alpha) not in (int, float) or not math.isfinite(alpha):
        raise ConfigError(f"{source}: lora_alpha must be a finite number, got {alpha!r}")
    if config.get("fan_in_fan_out"):
        raise ConfigError(f"{source}: fan_in_fan_out (Conv1D layers) is not read for AdaLoRA")
    raw = config.get("rank_pattern") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: rank_pattern must be an object, got {raw!r}")
    patterns = {}
    for key, mask in raw.items():
        if not key.endswith(".lora_E"):
            raise ConfigError(f"{source}: rank_pattern key {key!r} does not name a module's lora_E")
        if not (isinstance(mask, list) and len(mask) == init_r and all(type(b) is bool for b in mask)):
            raise ConfigError(f"{source}: rank_pattern[{key!r}] must be {init_r} booleans (init_r), got {mask!r}")
        patterns[key[: -len(".lora_E")]] = mask
    return init_r, float(alpha), patterns


def _plain(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)
