"""Prompt learning in the decoder graph: PEFT's virtual tokens and prefixes as every layer's prefix keys and values.

Letters of refpeft_onnx.decoder_graph; L layers, kvh key/value heads, k virtual tokens.

Why one form serves all three methods. The decoder is causal, so a position's keys and values in
every layer depend only on the positions before it (refpeft.model.generate says why a KV cache is
exact). PEFT's PROMPT_TUNING and P_TUNING put k virtual tokens P (k, H) in front of the sequence
(P-tuning's encoder output is P itself once trained: PEFT saves and loads only P), at positions
0 .. k - 1; they see only each other, never the real tokens or the padding after them. So each
layer's keys and values of those k positions are constants, the same for every batch row:

    K_i, V_i = layer i's (keys, values) of refpeft.model.decoder.forward on P alone     # (kvh, k, D), after rope

computed once in float64 and rounded once to the graph's dtype. Their hidden states and logits
matter to no real token (PEFT's logits at the virtual positions are not the model's output).
PREFIX_TUNING gives the same thing directly: K_i, V_i are its table's slices
(refpeft.model.prefix_tuning.prefix_forward), never rotated. In all three cases the real tokens
then attend over

    keys   = concat(K_i broadcast over the batch, past keys, new keys)     # (b, kvh, k + t, D)
    mask   = concat(ones (b, k), attention_mask)                          # the prefix is always allowed
    positions = position_ids + k                                           # the real tokens sit after it

and present.{i}.key/value stay concat(past, new), without the prefix: onnxruntime-genai feeds
present back as the next call's past, so the prefix enters each call once. k is the prefix
input's length (Shape of prefix.0.key), so it is read from the graph, not fixed in it.

Positions with left padding. The graph adds k to the position_ids it is fed, which is exactly
refpeft's (and PEFT's) prefix tuning: given positions are shifted by k. For prompt tuning PEFT
drops position_ids and numbers the whole padded sequence 0 .. k + s - 1, so a padded row's real
tokens sit later than they would alone; feeding position_ids = 0 .. s - 1 over the padded row
(pads included) reproduces that, and feeding each row's own count (genai, a batch of one)
reproduces the unpadded run. refpeft_onnx.decoder_verify feeds each method its own numbering.

Forms. Merged: K_i, V_i are initializers. Unmerged: they are swappable inputs prefix.{i}.key /
prefix.{i}.value (kvh, prefix_length, D) with empty defaults (k = 0: the base model), and each
adapter's .onnx_adapter file holds its K_i, V_i under those names, so onnxruntime-genai switches
prompt adapters (and none) on one session.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from refpeft.errors import ConfigError
from refpeft.model.decoder import Model, forward
from refpeft.model.prefix_tuning import prefix_forward
from refpeft.model.prompt_methods import PromptMethod

from refpeft_onnx.builder import DTYPES, GraphBuilder, to_graph_dtype

PREFIX_NAMES = ("prefix.%d.key", "prefix.%d.value")


@dataclass(frozen=True)
class PromptAdapter:
    """A PEFT prompt-learning adapter: its saved table (float64) and every layer's prefix keys and values.

    method: its row of refpeft.model.prompt_methods (PROMPT_TUNING, P_TUNING or PREFIX_TUNING); table:
    what it fills, P (k, H) or the prefix table T (k, L 2 kvh D); keys_values: per layer (K_i, V_i),
    (kvh, k, D) each, float64 (module docstring)."""

    method: PromptMethod
    table: np.ndarray
    keys_values: tuple[tuple[np.ndarray, np.ndarray], ...]

    @property
    def peft_type(self) -> str:
        return self.method.peft_type

    @property
    def length(self) -> int:
        return int(self.table.shape[0])

    def on(self, model: Model) -> Model:
        """`model` (no adapter of its own) with this prompt or prefix, as refpeft's decoder runs it."""
        return replace(model, **{self.method.fills: self.table})


def prompt_adapter(model64: Model, method: PromptMethod, table: np.ndarray) -> PromptAdapter:
    """The PromptAdapter of `table` on the float64 base `model64` (refpeft_onnx.decoder_verify.float64_model)."""
    table = np.asarray(table, dtype=np.float64)
    adapter = PromptAdapter(method, table, ())
    if method.keeps_positions:                                       # a prefix: its table's slices
        presents, _ = prefix_forward(table, 1, model64.config)
    else:                                                            # virtual tokens: P alone through the base
        empty = np.zeros((1, 0), dtype=np.int64)                     # (the decoder prepends P to no token)
        _, _, presents = forward(adapter.on(model64), empty, record=False)
    keys_values = tuple((np.asarray(K)[0], np.asarray(V)[0]) for K, V in presents)
    return replace(adapter, keys_values=keys_values)


def prefix_feeds(adapter: PromptAdapter, dtype: str) -> dict[str, np.ndarray]:
    """The unmerged graph's prefix inputs for `adapter` (its .onnx_adapter tensors), rounded once to `dtype`."""
    np_dtype = DTYPES[dtype][0]
    feeds = {}
    for i, pair in enumerate(adapter.keys_values):
        for template, value in zip(PREFIX_NAMES, pair):
            feeds[template % i] = np.ascontiguousarray(to_graph_dtype(value, np_dtype, name=template % i))
    return feeds


def split_prompt_adapters(adapters: Mapping[str, object]) -> dict[str, PromptAdapter]:
    """The prompt adapters among `adapters` (by name); ConfigError when they are mixed with others."""
    prompts = {name: a for name, a in adapters.items() if isinstance(a, PromptAdapter)}
    if prompts and len(prompts) != len(adapters):
        others = sorted(set(adapters) - set(prompts))
        raise ConfigError(f"prompt-learning adapters ({', '.join(sorted(prompts))}) and adapters of linear layers "
                          f"({', '.join(others)}) cannot share one export: PEFT runs one method at a time; "
                          "export them in separate folders")
    return prompts


class PrefixNodes:
    """The prefix's nodes in one decoder graph (module docstring): its inputs or initializers, the
    shifted positions, the widened mask and each layer's attended keys and values."""

    def __init__(self, g: GraphBuilder, model: Model, merged: PromptAdapter | None, ids: str) -> None:
        """The prefix of `merged` as initializers, or (None) as swappable inputs; ids: the graph's input_ids."""
        c = model.config
        self.g = g
        self.names = []
        for i in range(c.num_hidden_layers):
            pair = []
            for j, template in enumerate(PREFIX_NAMES):
                name = template % i
                if merged is not None:
                    pair.append(g.const(name, merged.keys_values[i][j]))
                else:
                    empty = np.zeros((c.num_key_value_heads, 0, c.head_dim))
                    pair.append(g.swappable(name, empty, [c.num_key_value_heads, "prefix_length", c.head_dim]))
            self.names.append(tuple(pair))
        self.k = g.op("Shape", [self.names[0][0]], "prefix.k", start=1, end=2)              # (1,) int64
        b = g.op("Shape", [ids], "prefix.b", start=0, end=1)
        self.batch = g.op("Concat", [b, g.const("prefix.ones_3", np.ones(3, np.int64))], "prefix.batch_shape",
                          axis=0)                                                            # (b, 1, 1, 1)

    def positions(self, position_ids: str) -> str:
        """position_ids + k: the real tokens' positions after the prefix."""
        return self.g.op("Add", [position_ids, self.k], "prefix.position_ids")

    def mask(self, additive: str) -> str:
        """concat(0 (b, 1, 1, s, k), M) over the keys: every query may see the whole prefix."""
        g = self.g
        lead = g.op("Shape", [additive], "prefix.mask_lead", start=0, end=4)
        shape = g.op("Concat", [lead, self.k], "prefix.mask_shape", axis=0)
        zero = g.const("prefix.open", np.asarray(0.0, mask_dtype(g)), cast=False)
        zeros = g.op("Expand", [zero, shape], "prefix.mask_open")                         # (b, 1, 1, s, k)
        return g.op("Concat", [zeros, additive], "prefix.additive", axis=-1)

    def keys_values(self, i: int, keys: str, values: str) -> tuple[str, str]:
        """concat(K_i, keys), concat(V_i, values) over positions, K_i, V_i broadcast over the batch."""
        g, out = self.g, []
        for prefix, kv, kind in zip(self.names[i], (keys, values), ("key", "value")):
            row = g.op("Unsqueeze", [prefix, g.shared("axes_0", np.asarray([0], np.int64))],
                       f"prefix.{i}.{kind}_row")                                             # (1, kvh, k, D)
            wide = g.op("Expand", [row, self.batch], f"prefix.{i}.{kind}_batch")                    # (b, kvh, k, D)
            out.append(g.op("Concat", [wide, kv], f"prefix.{i}.{kind}_attended", axis=2))
        return out[0], out[1]


def mask_dtype(g: GraphBuilder) -> type:
    """The additive mask's dtype: float32 in float16 graphs (their softmax runs in float32)."""
    return np.float32 if g.dtype == "float16" else g.np_dtype
