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
and the indices are LoraConfig's trainable_token_indices.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from refpeft.backend import namespace
from refpeft.errors import ConfigError, FormatError, InputError, ShapeError
from refpeft.io import atomic_write_bytes, read_json_object, read_safetensors, write_safetensors
from refpeft.model.decoder import Model

PEFT_TYPE = "TRAINABLE_TOKENS"
EMBED = "model.embed_tokens.weight"
KEY = "base_model.model.model.embed_tokens.trainable_tokens_delta"
TIED_HEAD_KEY = "base_model.model.lm_head.trainable_tokens_delta"
LORA_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


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


def with_tokens(model: Model, indices: Sequence[int], values: Any) -> Model:
    """The model whose embedding (and tied head) is W' (module docstring); train it with
    train_base=[EMBED] and keep tokens_backward of that gradient."""
    return replace(model, weights={**model.weights, EMBED: tokens_forward(model.weights[EMBED], indices, values)})


def read_trainable_tokens(directory: str | os.PathLike) -> tuple[list[int], np.ndarray, dict[str, Any]]:
    """(indices, R, config) of a PEFT TRAINABLE_TOKENS folder."""
    folder = Path(directory)
    config = read_json_object(folder / "adapter_config.json")
    if config.get("peft_type") != PEFT_TYPE:
        raise ConfigError(f"{folder}: peft_type is {config.get('peft_type')!r}, not {PEFT_TYPE!r}")
    tensors, _ = read_safetensors(folder / "adapter_model.safetensors")
    if KEY not in tensors:
        raise FormatError(f"{folder / 'adapter_model.safetensors'}: no {KEY!r} tensor (it has {sorted(tensors)[:3]})")
    indices, values = [int(i) for i in config.get("token_indices") or []], tensors[KEY]
    if values.ndim != 2 or values.shape[0] != len(indices):
        raise ShapeError(f"{folder}: {KEY} has shape {values.shape}, the config names {len(indices)} tokens")
    return indices, values, config


def write_trainable_tokens(directory: str | os.PathLike, indices: Sequence[int], values: Any, *, tied: bool,
                           base_model: str | None = None) -> Path:
    """R as a PEFT TRAINABLE_TOKENS folder (module docstring), each file written atomically."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    values = np.ascontiguousarray(np.asarray(values))
    tensors = {KEY: values, **({TIED_HEAD_KEY: values} if tied else {})}
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    config = {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "token_indices": [int(i) for i in indices],
              "target_modules": "model.embed_tokens", "init_weights": True, "inference_mode": True,
              "base_model_name_or_path": base_model}
    atomic_write_bytes(folder / "adapter_config.json", (json.dumps(config, indent=2) + "\n").encode())
    return folder
