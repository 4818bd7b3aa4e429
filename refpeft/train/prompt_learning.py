"""What a prompt-learning run trains: an encoder's tensors, whose output is the decoder's prompt or prefix.

Every prompt-learning method is one encoder E -> out, with PEFT's tensor names (one row each of the
table in refpeft.model.prompt_methods, which this module asks):

    prompt     (PROMPT_TUNING)  out = P = embedding.weight                       -> Model.prompt (k, H)
    p-tuning   (P_TUNING)       out = P = mlp_head(lstm_head?(embedding.weight))  -> Model.prompt
                                (refpeft.model.p_tuning)
    prefix     (PREFIX_TUNING)  out = T = embedding.weight, or transform(embedding.weight) with
                                --projection (refpeft.model.prefix_tuning)        -> Model.prefix (k, L 2 t)

The decoder returns d(out) as "prompt_embeddings" (refpeft.model.decoder); the encoder's backward
turns it into each tensor's gradient. That backward is linear in d(out) (the tensors fixed within
a step), so the step's summed d(out) goes through it once (`encoder_gradients`, in
refpeft.train.loop). The trained tensors are named "prompt_encoder.<PEFT name>"
("prompt_encoder.embedding.weight"); `with_encoder` puts new values in and recomputes out.

PEFT saves out itself as "prompt_embeddings", never the encoder (refpeft.model.prompt_files), so
the final folder holds out; a checkpoint holds the encoder's tensors (to resume training them).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from refpeft.backend import from_numpy, namespace, to_numpy
from refpeft.errors import ConfigError
from refpeft.io import read_safetensors, write_safetensors
from refpeft.model.decoder import Model
from refpeft.model.prompt_methods import PromptMethod, prompt_method, prompt_method_of

PREFIX = "prompt_encoder."
ENCODER_FILE = "prompt_encoder.safetensors"


def new_prompt_learning(model: Model, method: str, *, k: int, init: str = "RANDOM", text_ids: list[int] | None = None,
                        projection: bool = False, encoder: str = "MLP", encoder_hidden_size: int | None = None,
                        seed: int = 0) -> Model:
    """The model with a freshly initialised encoder of `method` (a CLI name of refpeft.model.prompt_methods;
    PEFT's inits: refpeft.model.prompt_tuning, p_tuning, prefix_tuning) in the embedding's dtype and
    namespace, and its output in place."""
    row = prompt_method(method)
    if model.adapter is not None:
        raise ConfigError(f"{method} tuning trains virtual tokens on a frozen base, not beside an adapter")
    embed = model.weights["model.embed_tokens.weight"]
    params = row.init(model, k, init=init, text_ids=text_ids, projection=projection, encoder=encoder,
                      encoder_hidden_size=encoder_hidden_size, seed=seed)
    xp = namespace(embed)
    params = {name: xp.astype(from_numpy(np.asarray(v), xp=xp, like=embed), embed.dtype) for name, v in params.items()}
    blank = replace(model, prompt=None, prefix=None, prompt_encoder=None)
    return _with_output(blank, params, row)


def encoder_parameters(model: Model) -> dict[str, Any]:
    """The encoder's tensors by the trained names ("prompt_encoder.<PEFT name>")."""
    return {PREFIX + name: value for name, value in model.prompt_encoder.items()}


def with_encoder(model: Model, params: Mapping[str, Any]) -> Model:
    """The model with the encoder's tensors replaced (trained names) and its output recomputed."""
    return _with_output(model, {name[len(PREFIX):]: value for name, value in params.items()},
                        prompt_method_of(model))


def encoder_gradients(model: Model, grads: Mapping[str, Any]) -> dict[str, Any]:
    """The decoder's gradients with d(out) ("prompt_embeddings") replaced by the encoder's tensors'
    gradients (trained names); unchanged for a model without an encoder."""
    if model.prompt_encoder is None:
        return dict(grads)
    rest = {name: g for name, g in grads.items() if name != "prompt_embeddings"}
    row = prompt_method_of(model)
    inner = row.encode_backward(grads["prompt_embeddings"], row.encode(model.prompt_encoder)[1])
    return {**rest, **{PREFIX + name: g for name, g in inner.items()}}


def write_prompt_folder(directory: str | os.PathLike, model: Model, *, base_model: str | None = None) -> Path:
    """The encoder's output as the PEFT folder of its method (refpeft.model.prompt_files)."""
    return prompt_method_of(model).write(directory, model, base_model=base_model)


def save_encoder(path: str | os.PathLike, model: Model) -> None:
    """The encoder's tensors (trained names, their own dtype) as one safetensors file, for a checkpoint."""
    write_safetensors(path, {name: np.ascontiguousarray(to_numpy(v)) for name, v in encoder_parameters(model).items()})


def read_encoder(path: str | os.PathLike) -> dict[str, np.ndarray]:
    return read_safetensors(path)[0]


def _with_output(model: Model, params: dict[str, Any], row: PromptMethod) -> Model:
    """The model holding the encoder's tensors and their output in the field the method fills."""
    return replace(model, prompt_encoder=params, **{row.fills: row.encode(params)[0]})
