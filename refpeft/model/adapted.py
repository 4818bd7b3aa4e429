"""A model with a PEFT adapter directory on top, checked against the model's layers."""

from __future__ import annotations

import os

from refpeft.errors import ConfigError
from refpeft.methods.linear import LinearShape
from refpeft.model.decoder import Model, check_adapter_targets
from refpeft.peft_format import fit_to_base, read_peft_adapter


def with_adapter(model: Model, directory: str | os.PathLike, *, dtype: str) -> Model:
    """`model` with the PEFT adapter in `directory`, checked against its linear layers.

    The adapter's trained biases (PEFT's bias="lora_only"/"all") replace the model's own; its saved
    modules (PEFT's modules_to_save) are checked against the model's tensors and replace them in
    the decoder (refpeft.model.decoder.Model.weight).
    """
    adapter = read_peft_adapter(directory, dtype=dtype)
    check_adapter_targets(Model(model.config, model.weights, adapter))       # names the missing module
    shapes = {}
    for path in adapter.modules:
        W = model.linear_weight(path)
        shapes[path] = LinearShape(k=int(W.shape[1]), d=int(W.shape[0]))
    adapter = fit_to_base(adapter, shapes, source=directory, dtype=dtype)     # VeRA: regenerates projections
    weights = dict(model.weights)
    for path, bias in adapter.base_biases.items():
        if path + ".bias" not in weights:
            raise ConfigError(f"{directory}: the adapter trains a bias of {path!r}, which has none in this model")
        weights[path + ".bias"] = bias
    return Model(model.config, weights, adapter)
