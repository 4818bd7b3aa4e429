"""Checkpoints of a training run, written atomically and read back into the exact state they hold.

Layout, under the run's directory:

    checkpoints/step-000005/
        adapter/                  the trained adapter as a PEFT folder (refpeft.peft_format.write_peft_adapter),
        model/                    or, for full fine-tuning, a model folder (refpeft.model.weights.save_model_folder)
        prompt_encoder.safetensors  or, for prompt learning, the encoder's tensors (refpeft.train.prompt_learning)
        optimizer.safetensors     moments, step counts and parameter groups (refpeft.optim.save_adam_state)
        trainer_state.json        format, step, data_position, the TrainingConfig, the data's fingerprint
    checkpoints/latest.json       {"checkpoint": "step-000005"}

Atomicity: a checkpoint is written into a fresh hidden folder (each file itself atomic, refpeft.io)
that is renamed to step-N only when complete; then latest.json is replaced atomically; then older
step folders are removed. An interruption at any point leaves latest.json naming a complete
checkpoint (or no latest.json at all), never a half-written one.

Exactness: arrays are stored in their own dtype (float64 stays float64) and every other quantity
is an integer, so `resume` rebuilds the TrainingState bit for bit, and the run continues as if it
had never stopped. `resume` refuses a checkpoint whose settings, data, trained tensors (names,
shapes, dtypes, method, alpha, VeRA projections) or optimiser groups differ from this run's,
naming the first difference.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from refpeft.backend import dtype_name, from_numpy, namespace, to_numpy
from refpeft.errors import ConfigError, FormatError
from refpeft.io import atomic_write_bytes, read_json_object, usual_permissions
from refpeft.model.decoder import Model
from refpeft.model.weights import load_model_folder, save_model_folder
from refpeft.optim import ParamGroup, load_adam_state, save_adam_state
from refpeft.peft_format import read_peft_adapter, write_peft_adapter
from refpeft.train.adapters import optimizer_groups, trainable_parameters, with_parameters
from refpeft.train.prompt_learning import ENCODER_FILE, read_encoder, save_encoder
from refpeft.train.state import TrainingConfig, TrainingState

STATE_FORMAT = "refpeft-training-state/1"
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"


def save_checkpoint(directory: str | os.PathLike, state: TrainingState, config: TrainingConfig,
                    groups: list[ParamGroup], *, data_fingerprint: str, keep: int = 1) -> Path:
    """Write `state` as checkpoints/step-N under `directory` (module docstring); returns its folder."""
    root = Path(directory) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for abandoned in root.glob(".step-*"):       # staging folders of a save that was killed outright
        shutil.rmtree(abandoned, ignore_errors=True)
    name = f"step-{state.step:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        model = state.model
        if model.prompt_encoder is not None:
            save_encoder(staging / ENCODER_FILE, model)
        elif model.adapter is None:
            save_model_folder(staging / "model", model.config, dict(model.weights))
        else:
            write_peft_adapter(staging / "adapter", model.adapter, tied_embeddings=model.config.tie_word_embeddings)
        save_adam_state(str(staging / "optimizer.safetensors"), state.adam, groups)
        record = {"format": STATE_FORMAT, "step": state.step, "data_position": state.data_position,
                  "mode": _mode(model), "config": _plain(config),
                  "data_fingerprint": data_fingerprint}
        atomic_write_bytes(staging / "trainer_state.json", (json.dumps(record, indent=2) + "\n").encode())
        final = root / name
        if final.exists():                    # left by an interrupted save that never reached latest.json
            shutil.rmtree(final)
        usual_permissions(staging)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_directory(root)
    atomic_write_bytes(root / LATEST, (json.dumps({"checkpoint": name}) + "\n").encode())
    older = sorted(p for p in root.glob("step-*") if p.name != name)
    for stale in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The folder latest.json names, or None when the run directory has no checkpoint."""
    root = Path(directory) / CHECKPOINTS
    if not (root / LATEST).is_file():
        return None
    name = read_json_object(root / LATEST).get("checkpoint")
    if not isinstance(name, str) or not (root / name / "trainer_state.json").is_file():
        raise FormatError(f"{root / LATEST}: names {name!r}, which is not a complete checkpoint folder")
    return root / name


def resume(directory: str | os.PathLike, model: Model, config: TrainingConfig, *,
           data_fingerprint: str) -> TrainingState:
    """The state saved in `directory`'s latest checkpoint, on `model` (the run's model with a freshly
    initialised adapter of the same shape, or none for full fine-tuning), checked against this run."""
    folder = latest_checkpoint(directory)
    if folder is None:
        raise FormatError(f"{Path(directory) / CHECKPOINTS}: no checkpoint to resume from")
    record = read_json_object(folder / "trainer_state.json")
    if record.get("format") != STATE_FORMAT:
        raise FormatError(f"{folder / 'trainer_state.json'}: not a refpeft training state "
                          f"(format {record.get('format')!r})")
    _same_config(record.get("config", {}), _plain(config), where=folder)
    if record.get("data_fingerprint") != data_fingerprint:
        raise ConfigError(f"{folder}: the checkpoint was trained on other data (or another tokenizer or block size)")
    mode = _mode(model)
    if record.get("mode") != mode:
        raise ConfigError(f"{folder}: the checkpoint is of {record.get('mode')!r} training, this run is {mode!r}")
    expected = trainable_parameters(model)
    xp = namespace(*expected.values())
    saved = _saved_parameters(folder, model)
    for name, value in expected.items():
        if name not in saved:
            raise ConfigError(f"{folder}: the checkpoint has no {name!r}; it trains another adapter than this run")
        ours, theirs = to_numpy(value), saved[name]
        if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
            raise ConfigError(f"{folder}: {name!r} is {theirs.dtype} {theirs.shape} in the checkpoint, this run's is "
                              f"{ours.dtype} {ours.shape}")
    if set(saved) != set(expected):
        raise ConfigError(f"{folder}: the checkpoint trains {sorted(set(saved) - set(expected))[:3]} too")
    adam, groups = load_adam_state(str(folder / "optimizer.safetensors"), xp=xp)
    if groups != optimizer_groups(model, expected, config.adam(), loraplus_ratio=config.loraplus_ratio):
        raise ConfigError(f"{folder}: the checkpoint's optimiser groups differ from this run's")
    params = {name: from_numpy(saved[name], xp=xp, like=value) for name, value in expected.items()}
    return TrainingState(model=with_parameters(model, params), adam=adam, step=int(record["step"]),
                         data_position=int(record["data_position"]))


def _saved_parameters(folder: Path, model: Model) -> dict[str, np.ndarray]:
    """The checkpoint's trained tensors by the decoder's names, after checking the adapter's settings."""
    if model.prompt_encoder is not None:
        return read_encoder(folder / ENCODER_FILE)
    if model.adapter is None:
        embed = model.weights["model.embed_tokens.weight"]
        _, weights = load_model_folder(folder / "model", dtype=dtype_name(embed.dtype, xp=namespace(embed)))
        return {name: to_numpy(w) for name, w in weights.items()}
    adapter = read_peft_adapter(folder / "adapter")
    if set(adapter.modules) != set(model.adapter.modules):
        differ = sorted(set(adapter.modules) ^ set(model.adapter.modules))
        raise ConfigError(f"{folder}: the checkpoint adapts {differ[:3]} differently from this run")
    for path, ours in model.adapter.modules.items():
        theirs = adapter.modules[path]
        for what in ("method", "alpha", "rslora"):
            if getattr(ours, what) != getattr(theirs, what):
                raise ConfigError(f"{folder}: module {path!r} has {what} {getattr(theirs, what)!r} in the checkpoint, "
                                  f"{getattr(ours, what)!r} in this run")
    for name, value in model.adapter.shared.items():
        if not np.array_equal(to_numpy(value), to_numpy(adapter.shared.get(name, np.empty(0)))):
            raise ConfigError(f"{folder}: the checkpoint's {name} differs from this run's")
    if set(adapter.saved_modules) != set(model.adapter.saved_modules):
        differ = sorted(set(adapter.saved_modules) ^ set(model.adapter.saved_modules))
        raise ConfigError(f"{folder}: the checkpoint saves modules {differ[:3]} differently from this run")
    if adapter.token_indices != model.adapter.token_indices:
        raise ConfigError(f"{folder}: the checkpoint trains token rows {list(adapter.token_indices)[:8]}, this run "
                          f"{list(model.adapter.token_indices)[:8]}")
    return {name: to_numpy(value) for name, value in trainable_parameters(replace(model, adapter=adapter)).items()}


def _mode(model: Model) -> str:
    return "prompt" if model.prompt_encoder is not None else "full" if model.adapter is None else "adapter"


def _plain(config: TrainingConfig) -> dict[str, Any]:
    """The config as JSON values (tuples become lists)."""
    return json.loads(json.dumps(asdict(config)))


def _same_config(saved: dict[str, Any], ours: dict[str, Any], *, where: Path) -> None:
    for key in sorted(set(saved) | set(ours)):
        if saved.get(key) != ours.get(key):
            raise ConfigError(f"{where}: the checkpoint was trained with {key} = {saved.get(key)!r}; this run asks for "
                              f"{ours.get(key)!r} (a resumed run must keep every setting)")


def _fsync_directory(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
