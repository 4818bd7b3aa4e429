"""What a prompt-learning run trains: an encoder's tensors, whose output is the decoder's prompt or prefix.

Every prompt-learning method is one encoder E -> out, with PEFT's tensor names:

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
from refpeft.model.p_tuning import p_tuning_backward, p_tuning_forward, p_tuning_init, write_p_tuning
from refpeft.model.prefix_tuning import prefix_init, prefix_table, prefix_table_backward, write_prefix_tuning
from refpeft.model.prompt_tuning import INITS, prompt_init, write_prompt_tuning

PROMPT_METHODS = ("prompt", "p-tuning", "prefix")
PREFIX = "prompt_encoder."
ENCODER_FILE = "prompt_encoder.safetensors"


def prompt_method(model: Model) -> str | None:
    """The model's prompt-learning method (PROMPT_METHODS), or None when it trains none."""
    params = model.prompt_encoder
    if params is None:
        return None
    if model.prefix is not None:
        return "prefix"
    return "p-tuning" if "mlp_head.0.weight" in params else "prompt"


def new_prompt_learning(model: Model, method: str, *, k: int, init: str = "RANDOM", text_ids: list[int] | None = None,
                        projection: bool = False, encoder: str = "MLP", seed: int = 0) -> Model:
    """The model with a freshly initialised encoder of `method` (PEFT's inits: refpeft.model.prompt_tuning,
    p_tuning, prefix_tuning) in the embedding's dtype and namespace, and its output in place."""
    if method not in PROMPT_METHODS:
        raise ConfigError(f"unknown prompt-learning method {method!r}; choose one of {', '.join(PROMPT_METHODS)}")
    if model.adapter is not None:
        raise ConfigError(f"{method} tuning trains virtual tokens on a frozen base, not beside an adapter")
    embed = model.weights["model.embed_tokens.weight"]
    if method == "prompt":
        if init not in INITS:
            raise ConfigError(f"the prompt init must be one of {', '.join(i.lower() for i in INITS)}, got {init!r}")
        params = {"embedding.weight": prompt_init(to_numpy(embed), k, init=init, text_ids=text_ids, seed=seed)}
    elif method == "p-tuning":
        params = p_tuning_init(model.config.hidden_size, k, encoder=encoder, seed=seed)
    else:
        params = prefix_init(model.config, k, projection=projection, seed=seed)
    xp = namespace(embed)
    params = {name: xp.astype(from_numpy(np.asarray(v), xp=xp, like=embed), embed.dtype) for name, v in params.items()}
    blank = replace(model, prompt=None, prefix=None, prompt_encoder=None)
    return _with_output(blank, params, prefix=method == "prefix")


def encoder_parameters(model: Model) -> dict[str, Any]:
    """The encoder's tensors by the trained names ("prompt_encoder.<PEFT name>")."""
    return {PREFIX + name: value for name, value in model.prompt_encoder.items()}


def with_encoder(model: Model, params: Mapping[str, Any]) -> Model:
    """The model with the encoder's tensors replaced (trained names) and its output recomputed."""
    return _with_output(model, {name[len(PREFIX):]: value for name, value in params.items()},
                        prefix=model.prefix is not None)


def encoder_gradients(model: Model, grads: Mapping[str, Any]) -> dict[str, Any]:
    """The decoder's gradients with d(out) ("prompt_embeddings") replaced by the encoder's tensors'
    gradients (trained names); unchanged for a model without an encoder."""
    if model.prompt_encoder is None:
        return dict(grads)
    rest = {name: g for name, g in grads.items() if name != "prompt_embeddings"}
    dout = grads["prompt_embeddings"]
    method, params = prompt_method(model), model.prompt_encoder
    if method == "prompt":
        inner = {"embedding.weight": dout}
    elif method == "p-tuning":
        inner = p_tuning_backward(dout, p_tuning_forward(params)[1])
    else:
        inner = prefix_table_backward(dout, prefix_table(params)[1])
    return {**rest, **{PREFIX + name: g for name, g in inner.items()}}


def write_prompt_folder(directory: str | os.PathLike, model: Model, *, base_model: str | None = None) -> Path:
    """The encoder's output as the PEFT folder of its method (refpeft.model.prompt_files)."""
    method, c = prompt_method(model), model.config
    if method == "prefix":
        return write_prefix_tuning(directory, to_numpy(model.prefix), c, base_model=base_model,
                                   prefix_projection="transform.0.weight" in model.prompt_encoder)
    prompt = to_numpy(model.prompt)
    if method == "prompt":
        return write_prompt_tuning(directory, prompt, num_attention_heads=c.num_attention_heads,
                                   num_layers=c.num_hidden_layers, base_model=base_model)
    encoder = "LSTM" if "lstm_head.weight_ih_l0" in model.prompt_encoder else "MLP"
    return write_p_tuning(directory, prompt, num_attention_heads=c.num_attention_heads,
                          num_layers=c.num_hidden_layers, encoder=encoder, base_model=base_model)


def save_encoder(path: str | os.PathLike, model: Model) -> None:
    """The encoder's tensors (trained names, their own dtype) as one safetensors file, for a checkpoint."""
    write_safetensors(path, {name: np.ascontiguousarray(to_numpy(v)) for name, v in encoder_parameters(model).items()})


def read_encoder(path: str | os.PathLike) -> dict[str, np.ndarray]:
    return read_safetensors(path)[0]


def _with_output(model: Model, params: dict[str, Any], *, prefix: bool) -> Model:
    if prefix:
        return replace(model, prompt_encoder=params, prefix=prefix_table(params)[0])
    out = p_tuning_forward(params)[0] if "mlp_head.0.weight" in params else params["embedding.weight"]
    return replace(model, prompt_encoder=params, prompt=out)
