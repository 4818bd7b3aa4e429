"""Prefix tuning / P-tuning v2 (PEFT's PREFIX_TUNING): k trained keys and values in front of every layer's attention.

Li & Liang 2021, "Prefix-Tuning"; Liu et al. 2022, "P-Tuning v2". Letters of refpeft.model.decoder;
L layers, kvh key/value heads, k virtual tokens, t = kvh D (PEFT's token_dim for a GQA model: it sets
token_dim = head_dim * num_key_value_heads and num_attention_heads = num_key_value_heads).

The trained table T (k, L 2 t) is PEFT's prompt_encoder.embedding.weight, or, with prefix_projection,
the output of its reparameterisation MLP on an embedding E (k, t) (refpeft.model.encoder_mlp):

    T = tanh(E W0^T + b0) W2^T + b2            # "transform.0" (e, t), "transform.2" (L 2 t, e); e = encoder_hidden_size

PEFT's get_prompt views T per batch row as (k, 2L, kvh, D) and permutes it to (2L, kvh, k, D):

    Tp = permute(reshape(T, (k, 2L, kvh, D)), (1, 2, 0, 3))             # (2L, kvh, k, D)
    K_i = Tp[2i], V_i = Tp[2i + 1]  broadcast over the batch             # (b, kvh, k, D) each

and hands them to transformers as a DynamicCache, so layer i's attention runs on
keys concat(K_i, rope(k_i)) and values concat(V_i, v_i): the prefix is not rotated (it enters the
cache after rope), the attention mask gains k ones in front (PEFT concatenates them), and the
real tokens take positions k .. k + s - 1 (transformers numbers them from the cache's length;
PEFT adds k to position_ids it is given). The virtual tokens have no queries and no logits.

Backward. Attention's backward already returns dk, dv for every key, the prefix's included
(refpeft.model.attention: dk = dS^T q D^-0.5, dv = P^T dO, summed over each kv head's g query
heads), so the prefix's part is their first k key positions, with no rope to undo:

    dK_i = dk_i[:, :, :k],  dV_i = dv_i[:, :, :k]                         # (b, kvh, k, D)
    dTp[2i] = sum over the batch of dK_i,  dTp[2i + 1] = ... of dV_i      # the broadcast's adjoint
    dT = reshape(permute(dTp, (2, 0, 1, 3)), (k, L 2 t))                  # the view's inverse

and, with the MLP, dT goes through encoder_mlp's backward to dE, dW0, db0, dW2, db2. PEFT runs
the encoder on every batch row and sums; the rows are equal, so this is the same sum taken first.

Files (refpeft.model.prompt_files): PEFT saves T itself as "prompt_embeddings" (k, L 2 t), the
MLP's output when prefix_projection is on, and loads it into a plain embedding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from refpeft.backend import namespace
from refpeft.errors import ConfigError, ShapeError
from refpeft.init import kaiming_uniform_bound, normal, uniform
from refpeft.model.config import ModelConfig
from refpeft.model.encoder_mlp import MLPCache, mlp_backward, mlp_forward
from refpeft.model.prompt_files import read_prompt_learning, write_prompt_learning

PEFT_TYPE = "PREFIX_TUNING"
TRANSFORM = "transform"


@dataclass(frozen=True)
class PrefixCache:
    shape: tuple[int, int, int, int]    # (k, 2L, kvh, D)


@dataclass(frozen=True)
class TableCache:
    mlp: MLPCache | None                # None: the table is the embedding itself


def prefix_width(config: ModelConfig) -> int:
    """L 2 t, the table's columns: every layer's keys and values of one virtual token."""
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim


def prefix_forward(table: Any, batch: int, config: ModelConfig) -> tuple[list[tuple[Any, Any]], PrefixCache]:
    """Each layer's (K_i, V_i), (b, kvh, k, D) each, from the table T (k, L 2 t) (module docstring)."""
    xp = namespace(table)
    L, kvh, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    if len(table.shape) != 2 or table.shape[1] != prefix_width(config):
        raise ShapeError(f"the prefix table has shape {tuple(table.shape)}, expected (k, layers 2 kv_heads head_dim) "
                         f"= (k, {prefix_width(config)})")
    k = int(table.shape[0])
    tp = xp.permute_dims(xp.reshape(table, (k, 2 * L, kvh, D)), (1, 2, 0, 3))           # (2L, kvh, k, D)
    past = [tuple(xp.broadcast_to(tp[2 * i + j, ...][None, ...], (batch, kvh, k, D)) for j in (0, 1))
            for i in range(L)]
    return past, PrefixCache(shape=(k, 2 * L, kvh, D))


def prefix_backward(dpast: list[tuple[Any, Any]], cache: PrefixCache) -> Any:
    """dT (k, L 2 t) from each layer's (dK_i, dV_i), (b, kvh, k, D) each."""
    xp = namespace(dpast[0][0])
    dtp = xp.stack([xp.sum(d, axis=0) for pair in dpast for d in pair])               # (2L, kvh, k, D)
    k = cache.shape[0]
    return xp.reshape(xp.permute_dims(dtp, (2, 0, 1, 3)), (k, -1))


def prefix_table(params: Mapping[str, Any]) -> tuple[Any, TableCache]:
    """T from the encoder's tensors by PEFT's names: "embedding.weight" alone, or with the "transform.*" MLP."""
    if "embedding.weight" not in params:
        raise ConfigError(f"the prefix encoder has no embedding.weight (it has {sorted(params)[:4]})")
    E = params["embedding.weight"]
    if f"{TRANSFORM}.0.weight" not in params:
        return E, TableCache(mlp=None)
    T, cache = mlp_forward(E, params, name=TRANSFORM, activation="tanh")
    return T, TableCache(mlp=cache)


def prefix_table_backward(dT: Any, cache: TableCache) -> dict[str, Any]:
    """The encoder's gradients by PEFT's names from dT (k, L 2 t)."""
    if cache.mlp is None:
        return {"embedding.weight": dT}
    dE, grads = mlp_backward(dT, cache.mlp)
    return {"embedding.weight": dE, **grads}


def prefix_init(config: ModelConfig, k: int, *, projection: bool = False, encoder_hidden_size: int | None = None,
                zero: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """The encoder's tensors as PEFT initialises them (float64, NumPy's generator): the embedding
    N(0, 1) (torch.nn.Embedding); the MLP's Linear layers U(-1/sqrt(in), 1/sqrt(in)) for weight and
    bias (torch.nn.Linear's Kaiming-uniform with a = sqrt(5)); init_weights="zero" (zero=True) zeroes
    the table, or the MLP's last layer."""
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"num_virtual_tokens must be a positive integer, got {k!r}")
    t, width = config.num_key_value_heads * config.head_dim, prefix_width(config)
    if not projection:
        return {"embedding.weight": np.zeros((k, width)) if zero else normal((k, width), 1.0, seed=seed)}
    e = t if encoder_hidden_size is None else encoder_hidden_size
    params = {"embedding.weight": normal((k, t), 1.0, seed=seed)}
    for j, (fan_in, out) in enumerate(((t, e), (e, width))):
        bound = kaiming_uniform_bound(fan_in)
        params[f"{TRANSFORM}.{2 * j}.weight"] = uniform((out, fan_in), bound, seed=seed + 2 * j + 1)
        params[f"{TRANSFORM}.{2 * j}.bias"] = uniform((out,), bound, seed=seed + 2 * j + 2)
    if zero:
        params[f"{TRANSFORM}.2.weight"], params[f"{TRANSFORM}.2.bias"] = np.zeros((width, e)), np.zeros(width)
    return params


def prefix_parameter_count(num_layers: int, token_dim: int, k: int, *, projection: bool = False,
                           encoder_hidden_size: int | None = None) -> int:
    """Trainable parameters of prefix tuning, t = token_dim (kv heads x head_dim), e = encoder_hidden_size (t):
    the table, k L 2 t; with the reparameterisation MLP, k t + (t e + e) + (e L 2 t + L 2 t)."""
    width = num_layers * 2 * token_dim
    if not projection:
        return k * width
    e = token_dim if encoder_hidden_size is None else encoder_hidden_size
    return k * token_dim + (token_dim * e + e) + (e * width + width)


def read_prefix_tuning(directory: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """T (k, L 2 t) and the config of a PEFT PREFIX_TUNING folder."""
    def width(config: dict) -> int | None:
        if config.get("num_layers") is None or config.get("token_dim") is None:
            return None
        return config["num_layers"] * 2 * config["token_dim"]

    return read_prompt_learning(directory, peft_type=PEFT_TYPE, width=width)


def write_prefix_tuning(directory: str | os.PathLike, table: Any, config: ModelConfig, *,
                        base_model: str | None = None, prefix_projection: bool = False,
                        encoder_hidden_size: int | None = None) -> Path:
    """T as a PEFT PREFIX_TUNING folder; PEFT loads it into a plain embedding whatever prefix_projection says."""
    t = config.num_key_value_heads * config.head_dim
    if np.shape(table)[-1] != prefix_width(config):
        raise ShapeError(f"the prefix table has shape {np.shape(table)}, expected (k, {prefix_width(config)})")
    return write_prompt_learning(directory, table, {
        "peft_type": PEFT_TYPE, "token_dim": t, "num_attention_heads": config.num_key_value_heads,
        "num_layers": config.num_hidden_layers, "prefix_projection": prefix_projection,
        "encoder_hidden_size": t if encoder_hidden_size is None else encoder_hidden_size,
        "base_model_name_or_path": base_model})
