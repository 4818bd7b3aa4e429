"""The prompt-learning methods as one table: each kind's CLI name, peft_type, Model field and functions.

Every prompt-learning method is an encoder E -> out (refpeft.train.prompt_learning) whose output
fills one field of refpeft.model.decoder's Model:

    name       peft_type       fills    encoder                                         module
    prompt     PROMPT_TUNING   prompt   out = embedding.weight                          prompt_tuning
    p-tuning   P_TUNING        prompt   out = mlp_head(lstm_head?(embedding.weight))    p_tuning
    prefix     PREFIX_TUNING   prefix   out = embedding.weight, or transform(...)       prefix_tuning

The train command, generate and the prompt-learning trainer ask this table (by CLI name, by
peft_type, or by what a model holds) instead of comparing the names. A row's functions:

    init(model, k, ...)          the encoder's tensors by PEFT's names, as PEFT initialises them (NumPy)
    encode(params)               (out, cache): the encoder's forward
    encode_backward(dout, cache) each encoder tensor's gradient from d(out)
    read(directory)              (out, adapter_config) of a PEFT folder of the kind (prompt_files)
    write(directory, model, ...) the model's out as a PEFT folder of the kind
    count(h, L, t, k, ...)       the trainable parameters (the encoder's tensors), for refpeft.memory

`fills == "prefix"` also says the logits keep the base's positions (a prefix adds keys and values,
no positions with logits), so the base's logits can be compared with them (distillation, drift).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from refpeft.backend import to_numpy
from refpeft.errors import ConfigError
from refpeft.model.p_tuning import (PEFT_TYPE as P_TUNING, encoder_type, p_tuning_backward, p_tuning_forward,
                                    p_tuning_init, p_tuning_parameter_count, read_p_tuning, write_p_tuning)
from refpeft.model.prefix_tuning import (PEFT_TYPE as PREFIX_TUNING, TRANSFORM, prefix_init, prefix_parameter_count,
                                         prefix_table, prefix_table_backward, read_prefix_tuning, write_prefix_tuning)
from refpeft.model.prompt_tuning import (INITS, PEFT_TYPE as PROMPT_TUNING, prompt_init, prompt_parameter_count,
                                         read_prompt_tuning, write_prompt_tuning)


@dataclass(frozen=True)
class PromptMethod:
    """One prompt-learning kind (module docstring)."""

    name: str                                   # the CLI's --method
    peft_type: str                              # adapter_config.json's peft_type
    fills: str                                  # the Model field its output fills: "prompt" or "prefix"
    init: Callable[..., dict[str, np.ndarray]]
    encode: Callable[[Mapping[str, Any]], tuple[Any, Any]]
    encode_backward: Callable[[Any, Any], dict[str, Any]]
    read: Callable[[str | os.PathLike], tuple[np.ndarray, dict[str, Any]]]
    write: Callable[..., Path]
    owns: Callable[[Mapping[str, Any]], bool]   # whether an encoder's tensors (of a model filling `fills`) are its
    count: Callable[..., int]                   # trainable parameters: (hidden, layers, kv width, k, **options)

    @property
    def keeps_positions(self) -> bool:
        """True when the logits are the base's positions (a prefix), so base logits compare with them."""
        return self.fills == "prefix"


def _prompt_init(model: Any, k: int, *, init: str = "RANDOM", text_ids: list[int] | None = None,
                 seed: int = 0, **_: Any) -> dict[str, np.ndarray]:
    if init not in INITS:
        raise ConfigError(f"the prompt init must be one of {', '.join(i.lower() for i in INITS)}, got {init!r}")
    embed = to_numpy(model.weights["model.embed_tokens.weight"])
    return {"embedding.weight": prompt_init(embed, k, init=init, text_ids=text_ids, seed=seed)}


def _write_prompt(directory: str | os.PathLike, model: Any, *, base_model: str | None = None) -> Path:
    c = model.config
    return write_prompt_tuning(directory, to_numpy(model.prompt), num_attention_heads=c.num_attention_heads,
                               num_layers=c.num_hidden_layers, base_model=base_model)


def _write_p_tuning(directory: str | os.PathLike, model: Any, *, base_model: str | None = None) -> Path:
    c = model.config
    return write_p_tuning(directory, to_numpy(model.prompt), num_attention_heads=c.num_attention_heads,
                          num_layers=c.num_hidden_layers, encoder=encoder_type(model.prompt_encoder),
                          base_model=base_model)


def _write_prefix(directory: str | os.PathLike, model: Any, *, base_model: str | None = None) -> Path:
    return write_prefix_tuning(directory, to_numpy(model.prefix), model.config, base_model=base_model,
                               prefix_projection=f"{TRANSFORM}.0.weight" in model.prompt_encoder)


PROMPT_METHODS: dict[str, PromptMethod] = {m.name: m for m in (
    PromptMethod("prompt", PROMPT_TUNING, "prompt", init=_prompt_init,
                 encode=lambda params: (params["embedding.weight"], None),
                 encode_backward=lambda dout, cache: {"embedding.weight": dout},
                 read=read_prompt_tuning, write=_write_prompt, owns=lambda params: set(params) == {"embedding.weight"},
                 count=lambda h, L, t, k, **_: prompt_parameter_count(h, k)),
    PromptMethod("p-tuning", P_TUNING, "prompt",
                 init=lambda model, k, *, encoder="MLP", encoder_hidden_size=None, seed=0, **_: p_tuning_init(
                     model.config.hidden_size, k, encoder=encoder, encoder_hidden_size=encoder_hidden_size, seed=seed),
                 encode=p_tuning_forward, encode_backward=p_tuning_backward, read=read_p_tuning,
                 write=_write_p_tuning, owns=lambda params: "mlp_head.0.weight" in params,
                 count=lambda h, L, t, k, *, encoder="MLP", encoder_hidden_size=None, encoder_num_layers=2, **_:
                 p_tuning_parameter_count(h, k, encoder=encoder, encoder_hidden_size=encoder_hidden_size,
                                          encoder_num_layers=encoder_num_layers)),
    PromptMethod("prefix", PREFIX_TUNING, "prefix",
                 init=lambda model, k, *, projection=False, encoder_hidden_size=None, seed=0, **_: prefix_init(
                     model.config, k, projection=projection, encoder_hidden_size=encoder_hidden_size, seed=seed),
                 encode=prefix_table, encode_backward=prefix_table_backward, read=read_prefix_tuning,
                 write=_write_prefix, owns=lambda params: "embedding.weight" in params,
                 count=lambda h, L, t, k, *, projection=False, encoder_hidden_size=None, **_: prefix_parameter_count(
                     L, t, k, projection=projection, encoder_hidden_size=encoder_hidden_size)),
)}


def prompt_method(name: str) -> PromptMethod:
    """The row of CLI name `name`; ConfigError naming the choices otherwise."""
    if name not in PROMPT_METHODS:
        raise ConfigError(f"unknown prompt-learning method {name!r}; choose one of {', '.join(PROMPT_METHODS)}")
    return PROMPT_METHODS[name]


def prompt_method_of_type(peft_type: Any) -> PromptMethod | None:
    """The row whose PEFT peft_type is `peft_type`, or None (another kind of adapter)."""
    return next((m for m in PROMPT_METHODS.values() if m.peft_type == peft_type), None)


def prompt_method_of(model: Any) -> PromptMethod | None:
    """The row of the encoder `model` trains (the field its output fills and its tensors), or None."""
    params = model.prompt_encoder
    if params is None:
        return None
    rows = [m for m in PROMPT_METHODS.values() if getattr(model, m.fills) is not None and m.owns(params)]
    if len(rows) != 1:
        raise ConfigError(f"the prompt encoder's tensors ({sorted(params)[:4]}) match no single prompt-learning "
                          "method")
    return rows[0]


def virtual_tokens(model: Any) -> int:
    """k, the rows of the model's virtual tokens or prefix (the first k positions), or 0."""
    fields = dict.fromkeys(m.fills for m in PROMPT_METHODS.values())
    table = next((getattr(model, f) for f in fields if getattr(model, f) is not None), None)
    return 0 if table is None else int(table.shape[0])
