"""Trainable tokens (PEFT's TRAINABLE_TOKENS, and LoraConfig's trainable_token_indices): only chosen embedding rows learn.

Letters of refpeft.model.decoder; n chosen token ids t_1 .. t_n (distinct, < V). PEFT's
TrainableTokensLayer holds `trainable_tokens_delta` R (n, H), which despite its name is the rows'
*values*, not a difference: it starts as a copy of the embedding's rows (init_weights=True) and the
layer multiplies by

    W' = index_copy(W, t, R)          # row t_j of W replaced by R_j; every other row W's own   (V, H)

in the embedding lookup (e = W'[ids]) and, with tied embeddings, in the head (logits = n W'^T):
PEFT wraps the tied lm_head with the same R. Backward: W' depends on R only through the chosen
rows, so

    dR = dW'[t]                       # (n, H): the rows of the embedding's (and tied head's) dW'

where dW' is the decoder's gradient of the embedding weight (the lookup's scatter-add, plus the
tied head's dy^T x): the decoder trains "model.embed_tokens.weight" of the model whose embedding
is W' (`with_tokens`), and `tokens_backward` keeps its chosen rows. Nothing else of W learns.

Files: PEFT saves R as "base_model.model.model.embed_tokens.trainable_tokens_delta" (and, tied,
the same values again as "base_model.model.lm_head.trainable_tokens_delta"), with
adapter_config.json's peft_type TRAINABLE_TOKENS, token_indices [t_1, ...] and target_modules
"model.embed_tokens". Beside LoRA the key is "...embed_tokens.token_adapter.trainable_tokens_delta"
and the indices are LoraConfig's trainable_token_indices: a list (the input embedding), or a dict
{module: indices} of which refpeft reads the one-entry form naming the input embedding. There PEFT
saves R once: the tied lm_head's wrapper shares the embedding's R and saves nothing of its own
(TrainableTokensWrapper.adapter_state_dict returns {} for a tied adapter).

In refpeft an adapter carries the rows as `Adapter.token_indices` and `Adapter.token_values` (R),
beside its modules (LoRA + tokens) or alone (modules empty: a TRAINABLE_TOKENS folder). The
decoder multiplies by W' wherever it reads the embedding (`Model.weight`) and, when the adapter
has rows, trains "model.embed_tokens.weight" and returns `tokens_backward` of its gradient under
the name TOKENS (`token_gradients`), the name the optimiser and refpeft.train.adapters use.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from refpeft.backend import namespace, to_numpy
from refpeft.errors import ConfigError, FormatError, InputError, ShapeError
from refpeft.io import atomic_write_bytes, read_json_object, write_safetensors

if TYPE_CHECKING:                     # the decoder imports this module: no import of it at run time
    from refpeft.adapter import Adapter
    from refpeft.model.decoder import Model

PEFT_TYPE = "TRAINABLE_TOKENS"
EMBED = "model.embed_tokens.weight"
KEY = "base_model.model.model.embed_tokens.trainable_tokens_delta"
TIED_HEAD_KEY = "base_model.model.lm_head.trainable_tokens_delta"
LORA_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
TOKENS = "model.embed_tokens.trainable_tokens_delta"     # R's name among the trained tensors and gradients


def check_token_indices(indices: Sequence[int], vocab_size: int) -> list[int]:
    """The indices as ints; InputError for one outside the vocabulary, ConfigError for none or a repeat."""
    indices = [int(i) for i in indices]
    if not indices:
        raise ConfigError("trainable tokens need at least one token index")
    bad = [i for i in indices if not 0 <= i < vocab_size]
    if bad:
        raise InputError(f"token index {bad[0]} is outside the vocabulary (0 .. {vocab_size - 1})")
    if len(set(indices)) != len(indices):
        raise ConfigError(f"token indices repeat: {sorted(i for i in set(indices) if indices.count(i) > 1)[:3]}")
    return indices


def tokens_init(W: Any, indices: Sequence[int]) -> Any:
    """R (n, H) = a copy of W's chosen rows (PEFT's init_weights=True)."""
    xp = namespace(W)
    return xp.take(W, xp.asarray(check_token_indices(indices, W.shape[0])), axis=0)


def tokens_forward(W: Any, indices: Sequence[int], values: Any) -> Any:
    """W' = index_copy(W, t, R) (module docstring), without writing into W."""
    xp = namespace(W, values)
    V = W.shape[0]
    indices = check_token_indices(indices, V)
    if tuple(values.shape) != (len(indices), W.shape[1]):
        raise ShapeError(f"trainable token values have shape {tuple(values.shape)}, expected ({len(indices)}, "
                         f"{W.shape[1]})")
    position = np.zeros(V, dtype=np.int64)
    position[indices] = np.arange(len(indices))
    chosen = np.zeros((V, 1), dtype=bool)
    chosen[indices] = True
    source = xp.take(xp.astype(values, W.dtype), xp.asarray(position), axis=0)            # (V, H): R_j at row t_j
    return xp.where(xp.asarray(chosen), source, W)


def tokens_backward(dW: Any, indices: Sequence[int]) -> Any:
    """dR = dW'[t] (n, H)."""
    xp = namespace(dW)
    return xp.take(dW, xp.asarray([int(i) for i in indices]), axis=0)


def with_tokens(model: "Model", indices: Sequence[int], values: Any) -> "Model":
    """The model whose embedding (and tied head) is W' (module docstring); train it with
    train_base=[EMBED] and keep tokens_backward of that gradient."""
    return replace(model, weights={**model.weights, EMBED: tokens_forward(model.weights[EMBED], indices, values)})


def has_tokens(adapter: "Adapter | None") -> bool:
    """Whether an adapter carries trainable token rows."""
    return adapter is not None and adapter.token_values is not None


def token_gradients(adapter: "Adapter | None", grads: dict[str, Any]) -> dict[str, Any]:
    """The decoder's gradients with the embedding's dW' replaced by dR = dW'[t] under TOKENS
    (module docstring); unchanged when the adapter has no rows."""
    if not has_tokens(adapter) or EMBED not in grads:
        return grads
    rows = tokens_backward(grads.pop(EMBED), adapter.token_indices)
    return {**grads, TOKENS: rows}


def check_adapter_tokens(adapter: "Adapter", *, vocab_size: int, hidden_size: int, saved: Mapping[str, Any],
                         source: Any) -> None:
    """An adapter's rows against a model: indices in the vocabulary, R of shape (n, H), and no saved
    copy of the embedding beside them (PEFT refuses an embedding in both modules_to_save and
    trainable_token_indices)."""
    if not has_tokens(adapter):
        return
    indices = check_token_indices(adapter.token_indices, vocab_size)
    if tuple(adapter.token_values.shape) != (len(indices), hidden_size):
        raise ShapeError(f"{source}: the trainable token rows have shape {tuple(adapter.token_values.shape)}, "
                         f"expected ({len(indices)}, {hidden_size}) for {len(indices)} tokens of a {hidden_size}-wide "
                         "embedding")
    if EMBED in saved:
        raise ConfigError(f"{source}: the embedding is both saved in full (modules_to_save) and given trainable "
                          "token rows; PEFT refuses this too: choose one")


def config_token_indices(value: Any, *, source: Any) -> list[int]:
    """LoraConfig's trainable_token_indices as a list: a list of ints, or {"<...>embed_tokens": [...]}."""
    if isinstance(value, dict):
        if len(value) != 1 or not next(iter(value)).endswith("embed_tokens"):
            raise ConfigError(f"{source}: trainable_token_indices {value!r}: refpeft reads token rows of the input "
                              "embedding only (a list, or one entry naming embed_tokens)")
        value = next(iter(value.values()))
    if not isinstance(value, list) or not value or not all(type(i) is int for i in value):
        raise ConfigError(f"{source}: trainable_token_indices must be a non-empty list of token ids, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{source}: trainable_token_indices repeat an index: {value!r}")
    return value


def read_trainable_tokens(directory: str | os.PathLike) -> tuple[list[int], np.ndarray, dict[str, Any]]:
    """(indices, R, config) of a PEFT TRAINABLE_TOKENS folder."""
    folder = Path(directory)
    config = read_json_object(folder / "adapter_config.json")
    if config.get("peft_type") != PEFT_TYPE:
        raise ConfigError(f"{folder}: peft_type is {config.get('peft_type')!r}, not {PEFT_TYPE!r}")
    from refpeft.checkpoint import SafetensorsFile      # it builds on refpeft.io

    checkpoint = SafetensorsFile(folder / "adapter_model.safetensors")
    tensors = {name: checkpoint.read_float(name) for name in checkpoint.keys()}     # bfloat16 -> float32, exact
    if KEY not in tensors:
        raise FormatError(f"{folder / 'adapter_model.safetensors'}: no {KEY!r} tensor (it has {sorted(tensors)[:3]})")
    unknown = sorted(set(tensors) - {KEY, TIED_HEAD_KEY})
    if unknown:
        raise FormatError(f"{folder / 'adapter_model.safetensors'}: unexpected key {unknown[0]!r} (a "
                          f"{PEFT_TYPE} folder holds {KEY} and, for a tied head, {TIED_HEAD_KEY})")
    indices = config_token_indices(config.get("token_indices"), source=folder / "adapter_config.json")
    values = tensors[KEY]
    if TIED_HEAD_KEY in tensors and not np.array_equal(tensors[TIED_HEAD_KEY], values):
        raise FormatError(f"{folder}: {TIED_HEAD_KEY} differs from {KEY}; refpeft reads a tied head that shares the "
                          "embedding's rows")
    if values.ndim != 2 or values.shape[0] != len(indices):
        raise ShapeError(f"{folder}: {KEY} has shape {values.shape}, the config names {len(indices)} tokens")
    if not np.all(np.isfinite(values)):
        raise FormatError(f"{folder}: {KEY} holds non-finite values (NaN or inf)")
    return indices, values, config


def write_trainable_tokens(directory: str | os.PathLike, indices: Sequence[int], values: Any, *, tied: bool,
                           base_model: str | None = None) -> Path:
    """R as a PEFT TRAINABLE_TOKENS folder (module docstring), each file written atomically."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    values = np.ascontiguousarray(to_numpy(values))
    tensors = {KEY: values, **({TIED_HEAD_KEY: values} if tied else {})}
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    config = {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "token_indices": [int(i) for i in indices],
              "target_modules": "model.embed_tokens", "init_weights": True, "inference_mode": True,
              "base_model_name_or_path": base_model}
    atomic_write_bytes(folder / "adapter_config.json", (json.dumps(config, indent=2) + "\n").encode())
    return folder


def is_tokens_folder(config: Mapping[str, Any]) -> bool:
    """Whether an adapter_config.json's contents describe a PEFT TRAINABLE_TOKENS folder."""
    return config.get("peft_type") == PEFT_TYPE


def split_lora_tokens(config: Mapping[str, Any], tensors: dict[str, Any], *,
                      source: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the LoRA file's other tensors, the Adapter fields of its token rows): LORA_KEY with the config's
    trainable_token_indices; a key without the indices or indices without the key is refused."""
    indices = config.get("trainable_token_indices")
    if indices is None:
        if LORA_KEY in tensors:
            raise FormatError(f"{source}: {LORA_KEY} holds trainable token rows, but adapter_config.json has no "
                              "trainable_token_indices")
        return tensors, {}
    indices = config_token_indices(indices, source=source)
    if LORA_KEY not in tensors:
        raise FormatError(f"{source}: adapter_config.json names trainable_token_indices, but there is no {LORA_KEY}")
    values = tensors[LORA_KEY]
    if values.ndim != 2 or values.shape[0] != len(indices):
        raise ShapeError(f"{source}: {LORA_KEY} has shape {tuple(values.shape)}, the config names {len(indices)} "
                         "tokens: expected (tokens, hidden size)")
    return ({k: v for k, v in tensors.items() if k != LORA_KEY},
            {"token_indices": tuple(indices), "token_values": values})


def lora_token_tensors(adapter: "Adapter") -> dict[str, np.ndarray]:
    """{LORA_KEY: R} for an adapter with rows beside its modules ({} without): PEFT saves R once, also
    for a tied head (module docstring)."""
    return {LORA_KEY: to_numpy(adapter.token_values)} if has_tokens(adapter) else {}
