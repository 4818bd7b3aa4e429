"""P-tuning (PEFT's P_TUNING): virtual tokens computed by a trained prompt encoder, prepended as prompt tuning's.

Liu et al. 2021, "GPT Understands, Too". Letters of refpeft.model.decoder; k virtual tokens, e the
encoder's hidden size (encoder_hidden_size, default H). PEFT's PromptEncoder on an embedding
E (k, H), tensors by PEFT's names (prompt_encoder.default.<name>), as get_prompt runs it:

    MLP  (encoder_reparameterization_type "MLP"):
        P = relu(relu(E W0^T + b0) W2^T + b2) W4^T + b4          # "mlp_head.0" (e, H), ".2" (e, e), ".4" (H, e)
    LSTM ("LSTM"):
        P = relu(lstm(E) W0^T + b0) W2^T + b2                   # "lstm_head.*": bidirectional, encoder_num_layers
                                                                 # "mlp_head.0" (2e, 2e), ".2" (H, 2e)

P (k, H) then enters the decoder exactly as prompt tuning's virtual tokens (refpeft.model.decoder's
`prompt`: prepended, mask ones, labels -100). PEFT runs the encoder once and repeats P over the
batch, so the decoder's dP (its "prompt_embeddings" gradient, already summed over the batch) is
the encoder's output gradient, and backward is the chain through the heads:

    dE, dW, db = mlp_backward(dP)                            (refpeft.model.encoder_mlp)
    LSTM: dZ, dW, db = mlp_backward(dP);  dE, d(lstm) = lstm_backward(dZ)   (refpeft.model.lstm)

Files (refpeft.model.prompt_files): PEFT saves P itself as "prompt_embeddings" (k, H), never the
encoder, and loads it into a plain embedding; a folder so read is a prompt-tuning prompt.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from refpeft.errors import ConfigError
from refpeft.init import kaiming_uniform_bound, normal, uniform
from refpeft.model.encoder_mlp import MLPCache, mlp_backward, mlp_forward
from refpeft.model.lstm import DIRECTIONS, LSTMCache, lstm_backward, lstm_forward
from refpeft.model.prompt_files import read_prompt_learning, write_prompt_learning

PEFT_TYPE = "P_TUNING"
ENCODERS = ("MLP", "LSTM")


@dataclass(frozen=True)
class PromptEncoderCache:
    mlp: MLPCache
    lstm: LSTMCache | None      # None: the MLP encoder


def encoder_type(params: Mapping[str, Any]) -> str:
    """"LSTM" when the tensors hold an lstm_head, else "MLP"."""
    return "LSTM" if "lstm_head.weight_ih_l0" in params else "MLP"


def p_tuning_forward(params: Mapping[str, Any]) -> tuple[Any, PromptEncoderCache]:
    """P (k, H) from the prompt encoder's tensors by PEFT's names (module docstring)."""
    if "embedding.weight" not in params:
        raise ConfigError(f"the prompt encoder has no embedding.weight (it has {sorted(params)[:4]})")
    x, lstm = params["embedding.weight"], None
    if encoder_type(params) == "LSTM":
        x, lstm = lstm_forward(x, params, name="lstm_head")                         # (k, 2e)
    P, mlp = mlp_forward(x, params, name="mlp_head", activation="relu")              # (k, H)
    return P, PromptEncoderCache(mlp=mlp, lstm=lstm)


def p_tuning_backward(dP: Any, cache: PromptEncoderCache) -> dict[str, Any]:
    """Every encoder tensor's gradient by PEFT's name from dP (k, H)."""
    dx, grads = mlp_backward(dP, cache.mlp)
    if cache.lstm is not None:
        dx, lstm_grads = lstm_backward(dx, cache.lstm)
        grads.update(lstm_grads)
    return {"embedding.weight": dx, **grads}


def p_tuning_init(hidden_size: int, k: int, *, encoder: str = "MLP", encoder_hidden_size: int | None = None,
                  encoder_num_layers: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """The encoder's tensors as PEFT initialises them (float64, NumPy's generator): the embedding N(0, 1),
    each Linear U(-1/sqrt(in), 1/sqrt(in)) for weight and bias (torch.nn.Linear's default), each LSTM
    tensor U(-1/sqrt(e), 1/sqrt(e)) (torch.nn.LSTM's default)."""
    if encoder not in ENCODERS:
        raise ConfigError(f"encoder_reparameterization_type must be one of {', '.join(ENCODERS)}, got {encoder!r}")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"num_virtual_tokens must be a positive integer, got {k!r}")
    H = hidden_size
    e = H if encoder_hidden_size is None else encoder_hidden_size
    params = {"embedding.weight": normal((k, H), 1.0, seed=seed)}
    shapes = [(H, e), (e, e), (e, H)] if encoder == "MLP" else [(2 * e, 2 * e), (2 * e, H)]
    for j, (fan_in, out) in enumerate(shapes):
        bound = kaiming_uniform_bound(fan_in)
        params[f"mlp_head.{2 * j}.weight"] = uniform((out, fan_in), bound, seed=seed + 2 * j + 1)
        params[f"mlp_head.{2 * j}.bias"] = uniform((out,), bound, seed=seed + 2 * j + 2)
    if encoder == "LSTM":
        bound, draw = 1 / math.sqrt(e), seed + 100
        for layer in range(encoder_num_layers):
            m = H if layer == 0 else 2 * e
            for suffix in DIRECTIONS:
                for w, shape in (("weight_ih", (4 * e, m)), ("weight_hh", (4 * e, e)), ("bias_ih", (4 * e,)),
                                 ("bias_hh", (4 * e,))):
                    draw += 1
                    params[f"lstm_head.{w}_l{layer}{suffix}"] = uniform(shape, bound, seed=draw)
    return params


def p_tuning_parameter_count(hidden_size: int, k: int, *, encoder: str = "MLP", encoder_hidden_size: int | None = None,
                             encoder_num_layers: int = 2) -> int:
    """Trainable parameters of the prompt encoder PEFT builds (p_tuning_init's tensors), e = encoder_hidden_size (H):

        MLP   k H + (H e + e) + (e e + e) + (e H + H)
        LSTM  k H + sum over layers l of 2 (4e (m_l + e) + 8e), m_0 = H, m_l = 2e after
              + (2e 2e + 2e) + (2e H + H)
    """
    if encoder not in ENCODERS:
        raise ConfigError(f"encoder_reparameterization_type must be one of {', '.join(ENCODERS)}, got {encoder!r}")
    H = hidden_size
    e = H if encoder_hidden_size is None else encoder_hidden_size
    if encoder == "MLP":
        return k * H + (H * e + e) + (e * e + e) + (e * H + H)
    lstm = sum(2 * (4 * e * ((H if layer == 0 else 2 * e) + e) + 8 * e) for layer in range(encoder_num_layers))
    return k * H + lstm + (2 * e * 2 * e + 2 * e) + (2 * e * H + H)


def read_p_tuning(directory: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """P (k, H) and the config of a PEFT P_TUNING folder."""
    return read_prompt_learning(directory, peft_type=PEFT_TYPE, width=lambda config: config.get("token_dim"))


def write_p_tuning(directory: str | os.PathLike, prompt: Any, *, num_attention_heads: int, num_layers: int,
                   encoder: str = "MLP", encoder_hidden_size: int | None = None,
                   base_model: str | None = None) -> Path:
    """P as a PEFT P_TUNING folder; PEFT loads it into a plain embedding whatever the encoder was."""
    H = int(np.shape(prompt)[1])
    return write_prompt_learning(directory, prompt, {
        "peft_type": PEFT_TYPE, "token_dim": H, "num_attention_heads": num_attention_heads, "num_layers": num_layers,
        "encoder_reparameterization_type": encoder,
        "encoder_hidden_size": H if encoder_hidden_size is None else encoder_hidden_size,
        "base_model_name_or_path": base_model})
