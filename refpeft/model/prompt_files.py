"""PEFT's prompt-learning folders (PROMPT_TUNING, P_TUNING, PREFIX_TUNING) in and out.

PEFT saves one tensor for every prompt-learning method, "prompt_embeddings" (k, width): what its
prompt encoder computes for the k virtual tokens (get_prompt_embedding_to_save), not the encoder's
own parameters. Prompt tuning's is its embedding P (k, H); P-tuning's the prompt encoder's output
(k, H); prefix tuning's the per-layer keys and values table (k, L 2 token_dim), the MLP's output
when prefix_projection is on. PeftModel.from_pretrained loads it in inference mode, where each
encoder is a plain embedding holding that tensor, so a folder never carries an MLP or LSTM.
adapter_config.json names the method (peft_type) and num_virtual_tokens; a decoder has
num_transformer_submodules 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from refpeft.errors import ConfigError, FormatError, ShapeError
from refpeft.io import atomic_write_bytes, read_json_object, read_safetensors, write_safetensors

TENSOR = "prompt_embeddings"


def read_prompt_learning(directory: str | os.PathLike, *, peft_type: str,
                         width: Callable[[dict], int | None]) -> tuple[np.ndarray, dict[str, Any]]:
    """The saved tensor (k, width(config)) and the config of a PEFT `peft_type` folder; FormatError /
    ConfigError / ShapeError naming what is wrong. width(config) None: the config does not say."""
    folder = Path(directory)
    config = read_json_object(folder / "adapter_config.json")
    if config.get("peft_type") != peft_type:
        raise ConfigError(f"{folder}: peft_type is {config.get('peft_type')!r}, not {peft_type!r}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise ConfigError(f"{folder}: num_transformer_submodules {config['num_transformer_submodules']} is for "
                          "encoder-decoder models; a decoder has 1")
    tensors, _ = read_safetensors(folder / "adapter_model.safetensors")
    if TENSOR not in tensors:
        raise FormatError(f"{folder / 'adapter_model.safetensors'}: no {TENSOR!r} tensor "
                          f"(it has {sorted(tensors)[:4]})")
    prompt = tensors[TENSOR]
    k, dim = config.get("num_virtual_tokens"), width(config)
    if prompt.ndim != 2 or prompt.shape[0] != k or (dim is not None and prompt.shape[1] != dim):
        raise ShapeError(f"{folder}: {TENSOR} has shape {prompt.shape}, the config says ({k}, {dim})")
    return prompt, config


def write_prompt_learning(directory: str | os.PathLike, prompt: Any, config: dict[str, Any]) -> Path:
    """The tensor as "prompt_embeddings" and `config` (with task_type CAUSAL_LM, num_virtual_tokens,
    one transformer submodule, inference mode added) as a PEFT folder, each file written atomically."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    prompt = np.ascontiguousarray(np.asarray(prompt))
    if prompt.ndim != 2:
        raise ShapeError(f"{TENSOR} must be (num_virtual_tokens, width), got shape {prompt.shape}")
    write_safetensors(folder / "adapter_model.safetensors", {TENSOR: prompt})
    config = {"task_type": "CAUSAL_LM", "num_virtual_tokens": int(prompt.shape[0]), "num_transformer_submodules": 1,
              "inference_mode": True, **config}
    atomic_write_bytes(folder / "adapter_config.json", (json.dumps(config, indent=2) + "\n").encode())
    return folder
