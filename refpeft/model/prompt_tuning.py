"""Prompt tuning (PEFT's PROMPT_TUNING): k trained virtual-token embeddings P in front of every sequence.

Forward, as PEFT's PeftModelForCausalLM computes it for a decoder (letters of refpeft.model.decoder;
k virtual tokens):

    e      = concat(P broadcast over the batch, embed_tokens[ids])     # (b, k + s, H)
    mask   = concat(ones (b, k), attention_mask)                       # (b, k + s), when a mask is given
    labels = concat(-100 (b, k), labels)                               # the virtual positions predict nothing
    logits = the decoder on e                                          # (b, k + s, V): PEFT returns them all

The virtual tokens take positions 0 .. k - 1 and the real ones k .. k + s - 1 (transformers numbers
an inputs_embeds sequence from 0, left padding or not). Only P trains; the base is frozen.

Backward: e's gradient de (b, k + s, H) splits at k:

    dP   = sum over the batch of de[:, :k]                              # (k, H)
    dx   = de[:, k:]                                                    # to the embedding's backward

PEFT's initialisations: "RANDOM" (torch.nn.Embedding's N(0, 1)), "SAMPLE_VOCAB" (rows of the
embedding at random token ids), "TEXT" (the embedding rows of a text's token ids, repeated or cut
to k). Files (refpeft.model.prompt_files): adapter_config.json (peft_type PROMPT_TUNING, num_virtual_tokens, token_dim,
num_transformer_submodules 1 for a decoder) and adapter_model.safetensors with "prompt_embeddings"
(k, H), as PEFT saves them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refpeft.backend import namespace
from refpeft.errors import ConfigError, ShapeError
from refpeft.model.checks import require_in_range
from refpeft.model.prompt_files import read_prompt_learning, write_prompt_learning

PEFT_TYPE = "PROMPT_TUNING"
INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class PromptCache:
    k: int          # virtual tokens


def prompt_init(embed: Any, k: int, *, init: str = "RANDOM", text_ids: list[int] | None = None,
                seed: int = 0) -> np.ndarray:
    """P (k, H) as PEFT initialises it (module docstring), in the embedding's dtype, NumPy's generator."""
    if init not in INITS:
        raise ConfigError(f"prompt_tuning_init must be one of {', '.join(INITS)}, got {init!r}")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"num_virtual_tokens must be a positive integer, got {k!r}")
    embed = np.asarray(embed)
    rng = np.random.default_rng(seed)
    if init == "RANDOM":
        return rng.standard_normal((k, embed.shape[1])).astype(embed.dtype)
    if init == "SAMPLE_VOCAB":
        return embed[rng.integers(0, embed.shape[0], size=k)].copy()
    if not text_ids:
        raise ConfigError("prompt_tuning_init TEXT needs the token ids of a non-empty text")
    ids = np.asarray((list(text_ids) * math.ceil(k / len(text_ids)))[:k])
    require_in_range("the init text's token ids", ids, 0, embed.shape[0], xp=namespace(ids))
    return embed[ids].copy()


def prompt_forward(e: Any, prompt: Any) -> tuple[Any, PromptCache]:
    """concat(P, e) over the sequence axis, P (k, H) shared by every row of e (b, s, H)."""
    xp = namespace(e, prompt)
    b, _, h = e.shape
    if len(prompt.shape) != 2 or prompt.shape[1] != h:
        raise ShapeError(f"prompt embeddings have shape {tuple(prompt.shape)}, expected (k, {h})")
    virtual = xp.broadcast_to(xp.astype(prompt, e.dtype)[None, ...], (b, prompt.shape[0], h))
    return xp.concat([virtual, e], axis=1), PromptCache(k=int(prompt.shape[0]))


def prompt_backward(de: Any, cache: PromptCache) -> tuple[Any, Any]:
    """(dP (k, H), the real tokens' de (b, s, H)) from de (b, k + s, H)."""
    xp = namespace(de)
    return xp.sum(de[:, :cache.k, :], axis=0), de[:, cache.k:, :]


def prompt_mask(attention_mask: Any, k: int) -> Any:
    """concat(ones (b, k), attention_mask), or None when there is no mask."""
    if attention_mask is None:
        return None
    xp = namespace(attention_mask)
    ones = xp.ones((attention_mask.shape[0], k), dtype=attention_mask.dtype)
    return xp.concat([ones, attention_mask], axis=1)


def prompt_labels(labels: Any, k: int) -> Any:
    """concat(-100 (b, k), labels): the virtual positions carry no loss."""
    xp = namespace(labels)
    return xp.concat([xp.full((labels.shape[0], k), IGNORE_INDEX, dtype=labels.dtype), labels], axis=1)


def prompt_parameter_count(hidden_size: int, k: int) -> int:
    """Trainable parameters of prompt tuning: P, k H."""
    return k * hidden_size


def read_prompt_tuning(directory: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """P and the config of a PEFT PROMPT_TUNING folder (refpeft.model.prompt_files)."""
    return read_prompt_learning(directory, peft_type=PEFT_TYPE, width=lambda config: config.get("token_dim"))


def write_prompt_tuning(directory: str | os.PathLike, prompt: Any, *, num_attention_heads: int, num_layers: int,
                        base_model: str | None = None, init: str = "RANDOM") -> Path:
    """P as a PEFT PROMPT_TUNING folder (refpeft.model.prompt_files)."""
    return write_prompt_learning(directory, prompt, {
        "peft_type": PEFT_TYPE, "token_dim": int(np.shape(prompt)[1]), "num_attention_heads": num_attention_heads,
        "num_layers": num_layers, "prompt_tuning_init": init, "base_model_name_or_path": base_model})
