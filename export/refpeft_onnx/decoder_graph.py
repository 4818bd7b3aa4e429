"""The ONNX graph of a whole decoder (refpeft.model): KV cache in, logits and KV cache out, as onnxruntime-genai runs it.

Inputs and outputs (onnxruntime-genai's names; b batch, s new tokens, p past tokens, t = p + s):

    input_ids (b, s) int64     attention_mask (b, t) int64     position_ids (b, s) int64
    past_key_values.{i}.key / .value (b, kv heads, p, D)        per layer i
    -> logits (b, s, V)        present.{i}.key / .value (b, kv heads, t, D)   = concat(past, new)

The body is refpeft.model.decoder's forward op by op (its docstring has the letters), in standard
ONNX ops:

    e = Gather(embed_tokens, input_ids)
    rmsnorm(x)   = w * (x * 1 / sqrt(mean(x * x) + eps))                    # ReduceMean over H
    rope(x)      = x cos + concat(-x2, x1) sin,  cos/sin = Gather(cos_cache / sin_cache, position_ids)
    attention    = softmax(q k^T D^-0.5 + M) v,   M = 0 where allowed, else finfo.min
                   allowed[b, i, j] = (j <= p + i) and attention_mask[b, j] == 1
                   grouped-query: q (b, h, s, D) viewed as (b, kv heads, g, s, D) against k, v (b, kv heads, 1, t, D)
    swiglu(g, u) = g * sigmoid(g) * u
    linear(x)    = refpeft_onnx.graph's merged or unmerged layer (the adapter branch with swappable
                   inputs named "{module path}.lora_A_t" ..., refpeft_onnx.adapter_files)

float16 graphs keep the RMSNorm statistics and the softmax in float32 (as transformers does), and
cast their results back. The cos/sin tables (max positions x D) are computed in float64 from
refpeft.model.rope and rounded once to the graph's dtype.

Prompt learning (PEFT's prompt tuning, P-tuning, prefix tuning; refpeft_onnx.prefix_graph): every
layer attends over a prefix of k keys and values in front of its past and new ones, the mask allows
them, and position_ids are shifted by k; present.* stay without the prefix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto

from refpeft import __version__
from refpeft.adapter import Adapter
from refpeft.errors import ConfigError
from refpeft.methods import method_spec
from refpeft.model.decoder import Model, dense_weight
from refpeft.model.rope import rope_inverse_frequencies, rope_tables
from refpeft.model.weights import LazyTensors
from refpeft.quant import QuantState4bit

from refpeft_onnx.builder import DEFAULT_OPSET, ExternalData, GraphBuilder
from refpeft_onnx.graph import merged_linear, refuse_nf4_merge, unmerged_linear, vera_projections
from refpeft_onnx.nf4 import NF4_OPS
from refpeft_onnx.prefix_graph import PrefixNodes, PromptAdapter, mask_dtype, split_prompt_adapters
from refpeft_onnx.stack import BaseLinear, as_float64, with_nf4

FORMS = ("merged", "unmerged")
INPUT_NAMES = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
               "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
OUTPUT_NAMES = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
# Branch kinds a module may carry for several adapters at once: LoRA adapters run on a DoRA branch
# with its rescale left at the default 1.
WIDER_BRANCH = {frozenset({"low-rank", "low-rank-rescaled"}): "low-rank-rescaled"}


@dataclass(frozen=True)
class DecoderBranches:
    """What the unmerged graph holds for a set of adapters: each adapted module's method (the widest
    branch any adapter needs there) and which layers' biases adapters train."""

    methods: dict[str, str]
    biases: frozenset[str]


def decoder_layers(model: Model, *, trained_biases: Mapping[str, object] | None = None) -> Mapping[str, BaseLinear]:
    """Every linear layer of `model` as a frozen BaseLinear (module path -> layer), made when it is
    looked up (the weights may be read lazily: refpeft.model.weights.LazyTensors); 4-bit bases keep
    their NF4 state and `weight` is its dequantised float32 values (refpeft_onnx.stack.with_nf4).
    trained_biases: an adapter's trained base biases (PEFT's bias="lora_only"/"all"), in place of the model's."""
    def layer(path: str) -> BaseLinear:
        W = model.linear_weight(path)
        bias = (trained_biases or {}).get(path, model.bias(path))
        bias = None if bias is None else as_float64(bias)
        if isinstance(W, QuantState4bit):       # with_nf4 puts the dequantised values in place of the placeholder
            return with_nf4(BaseLinear(path, np.broadcast_to(np.float32(0.0), tuple(W.shape)), bias), W)
        return BaseLinear(path, dense_weight(model, path), bias)

    paths = model.linear_paths() + (["lm_head"] if model.config.tie_word_embeddings else [])
    return LazyTensors(paths, layer)


def branches(adapters: Mapping[str, Adapter]) -> DecoderBranches:
    """The branches an unmerged graph needs to run every adapter in `adapters` (by name)."""
    kinds: dict[str, dict[str, str]] = {}
    for name, adapter in adapters.items():
        if adapter.saved_modules:
            raise ConfigError(f"adapter {name!r} saves whole modules ({', '.join(adapter.saved_module_paths)}, "
                              "PEFT's modules_to_save); an unmerged graph cannot swap them")
        if adapter.token_values is not None:
            raise ConfigError(f"adapter {name!r} trains embedding rows (trainable tokens); an unmerged graph cannot "
                              "swap them")
        for path, module in adapter.modules.items():
            kinds.setdefault(path, {})[method_spec(module.method).onnx_branch] = module.method
    methods = {}
    for path, found in kinds.items():
        if len(found) == 1:
            methods[path] = next(iter(found.values()))
        elif frozenset(found) in WIDER_BRANCH:
            methods[path] = found[WIDER_BRANCH[frozenset(found)]]
        else:
            raise ConfigError(f"{path}: adapters of kinds {sorted(found.values())} cannot share one swappable "
                              "branch; export them in separate graphs")
    _check_shared_projections(adapters)
    biases = frozenset(path for adapter in adapters.values() for path in adapter.base_biases)
    return DecoderBranches(methods, biases)


def _check_shared_projections(adapters: Mapping[str, Adapter]) -> None:
    """VeRA's projections are graph constants: every VeRA adapter of one graph must share them."""
    shared = [(name, a) for name, a in adapters.items() if a.vera_A is not None]
    for name, adapter in shared[1:]:
        first_name, first = shared[0]
        same = all(np.array_equal(as_float64(getattr(first, t)), as_float64(getattr(adapter, t)))
                   for t in ("vera_A", "vera_B"))
        if not same:
            raise ConfigError(f"VeRA adapters {first_name!r} and {name!r} have different shared projections "
                              "(another projection_prng_key); one unmerged graph holds one pair")


def build_decoder(model: Model, adapters: Mapping[str, Adapter | PromptAdapter] | None = None, *, form: str = "merged",
                  dtype: str = "float32", nf4_ops: str = "bnb4", opset: int = DEFAULT_OPSET,
                  external: ExternalData | None = None) -> onnx.ModelProto:
    """The ONNX decoder of `model` (its own adapter is ignored; pass adapters by name); with
    `external`, its large initializers are streamed to that file as they are made.

    form "merged": exactly one adapter (or none), folded into the weights by its method's merge.
    form "unmerged": a swappable branch on every module any adapter adapts; no adapter fed gives
    the base, each adapter's .onnx_adapter file (refpeft_onnx.decoder_export) gives that adapter.
    Prompt-learning adapters (refpeft_onnx.prefix_graph.PromptAdapter) take the same two forms as
    a prefix of keys and values (initializers, or swappable inputs); they are not mixed with others.
    """
    if form not in FORMS:
        raise ConfigError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if model.bottleneck is not None:
        raise ConfigError("the model carries bottleneck adapters (Houlsby/Pfeiffer), which the ONNX decoder does not "
                          "build: exporting it would silently leave them out")
    if nf4_ops not in NF4_OPS:
        raise ConfigError(f"nf4_ops must be one of {', '.join(NF4_OPS)}, got {nf4_ops!r}")
    adapters = dict(adapters or {})
    if form == "merged" and len(adapters) > 1:
        raise ConfigError(f"a merged graph folds in one adapter, got {len(adapters)}: {sorted(adapters)}")
    prompts = split_prompt_adapters(adapters)
    prefix = PrefixPlan(next(iter(prompts.values()), None) if form == "merged" else None) if prompts else None
    if prompts:
        adapters = {}
    merged = next(iter(adapters.values())) if form == "merged" and adapters else None
    layers = decoder_layers(model, trained_biases=None if merged is None else merged.base_biases)
    plan = DecoderBranches({}, frozenset()) if form == "merged" else branches(adapters)
    _check_targets(layers, adapters, merged)
    g = GraphBuilder(dtype, external)
    body = _DecoderBody(g, model, layers, merged=merged, plan=plan, adapters=adapters, nf4_ops=nf4_ops, prefix=prefix)
    outputs = body.build()
    metadata = {"refpeft.version": __version__, "refpeft.graph": "decoder", "refpeft.form": form,
                "refpeft.dtype": dtype, "refpeft.opset": str(opset), "refpeft.model_type": model.config.model_type,
                "refpeft.branches": json.dumps(plan.methods), "refpeft.adapter_inputs": json.dumps(g.swappable_names),
                "refpeft.nf4_ops": nf4_ops if any(l.nf4 is not None for l in layers.values()) else "none",
                "refpeft.prefix": "none" if prefix is None else "merged" if prefix.merged else "swappable"}
    return g.model(outputs, opset=opset, name="refpeft_decoder", metadata=metadata)


def _check_targets(layers: Mapping[str, BaseLinear], adapters: Mapping[str, Adapter], merged: Adapter | None) -> None:
    for name, adapter in adapters.items():
        unknown = sorted(set(adapter.modules) - set(layers))
        if unknown:
            raise ConfigError(f"adapter {name!r} adapts {unknown[:3]}, which are not linear layers of the model")
        for path, module in adapter.modules.items():
            if module.bias is not None:
                raise ConfigError(f"{path}: a LoRA bias (lora_bias=True) is not exported")
            if merged is not None:
                refuse_nf4_merge(layers[path], module, merged)


@dataclass(frozen=True)
class PrefixPlan:
    """A graph with prompt learning's prefix: `merged`'s keys and values as initializers, or (None) swappable inputs."""

    merged: PromptAdapter | None


class _DecoderBody:
    """Builds the nodes of one decoder graph in `g` (one instance per graph)."""

    def __init__(self, g: GraphBuilder, model: Model, layers: Mapping[str, BaseLinear], *, merged: Adapter | None,
                 plan: DecoderBranches, adapters: Mapping[str, Adapter], nf4_ops: str,
                 prefix: PrefixPlan | None = None) -> None:
        self.g, self.model, self.c, self.layers = g, model, model.config, layers
        self.merged, self.plan, self.nf4_ops = merged, plan, nf4_ops
        self.form = "unmerged" if plan.methods or plan.biases else "merged"
        vera = [a for a in adapters.values() if a.vera_A is not None]
        self.vera_t = vera_projections(g, vera[0]) if vera and merged is None else None
        self.prefix_plan, self.prefix = prefix, None
        # softmax and norm statistics run in float32 in float16 graphs
        self.stat_type = TensorProto.FLOAT

    def build(self) -> dict[str, list[int | str]]:
        c, g = self.c, self.g
        kv_shape = lambda length: ["batch_size", c.num_key_value_heads, length, c.head_dim]  # noqa: E731
        ids = g.input("input_ids", ["batch_size", "sequence_length"], TensorProto.INT64)
        mask = g.input("attention_mask", ["batch_size", "total_sequence_length"], TensorProto.INT64)
        positions = g.input("position_ids", ["batch_size", "sequence_length"], TensorProto.INT64)
        past = [tuple(g.input(INPUT_NAMES[f"past_{kind}_names"] % i, kv_shape("past_sequence_length"))
                      for kind in ("key", "value")) for i in range(c.num_hidden_layers)]
        embed = g.const("model.embed_tokens.weight", self.model.weight("model.embed_tokens.weight"))
        e = g.op("Gather", [embed, ids], "embeddings")                                     # (b, s, H)
        if self.prefix_plan is not None:
            self.prefix = PrefixNodes(g, self.model, self.prefix_plan.merged, ids)
            positions = self.prefix.positions(positions)
        cos, sin = self._rope_tables(positions)
        additive = self._additive_mask(ids, mask)
        if self.prefix is not None:
            additive = self.prefix.mask(additive)
        outputs: dict[str, list[int | str]] = {}
        for i in range(c.num_hidden_layers):
            e, present = self._layer(i, e, cos, sin, additive, past[i])
            outputs[present[0]] = kv_shape("total_sequence_length")
            outputs[present[1]] = kv_shape("total_sequence_length")
        n = self._rmsnorm(e, "model.norm")
        head = self._linear("lm_head", n, base=self._tied_head(n, embed))
        logits = g.op("Identity", [head], "logits")
        return {logits: ["batch_size", "sequence_length", c.vocab_size], **outputs}

    # --- pieces shared by every layer ---------------------------------------------------------------

    def _rope_tables(self, positions: str) -> tuple[str, str]:
        """cos, sin (b, 1, s, D): rows of float64 tables over every position, gathered by position_ids."""
        c, g = self.c, self.g
        inv = rope_inverse_frequencies(c.head_dim, **c.rope_parameters(), dtype="float64", xp=_numpy())
        cos, sin = rope_tables(np.arange(c.max_position_embeddings, dtype=np.int64)[None, :], inv)
        tables = []
        for name, table in (("cos", cos[0]), ("sin", sin[0])):
            rows = g.op("Gather", [g.const(f"{name}_cache", table), positions], f"rope.{name}")   # (b, s, D)
            tables.append(g.op("Unsqueeze", [rows, self._i64("axes_1", [1])], f"rope.{name}_heads"))
        return tables[0], tables[1]

    def _additive_mask(self, ids: str, mask: str) -> str:
        """M (b, 1, 1, s, t): 0 where query i may see key j (j <= p + i and attention_mask[b, j] == 1), else min."""
        g = self.g
        s = g.op("Shape", [ids], "mask.s", start=1, end=2)                                 # (1,) int64
        t = g.op("Shape", [mask], "mask.t", start=1, end=2)
        scalar = [g.op("Squeeze", [v, self._i64("axes_0", [0])], f"{v}_scalar") for v in (s, t)]
        p = g.op("Sub", [scalar[1], scalar[0]], "mask.p")
        one, zero = g.const("mask.one", np.asarray(1, np.int64)), g.const("mask.zero", np.asarray(0, np.int64))
        keys = g.op("Range", [zero, scalar[1], one], "mask.key_positions")                 # (t,)
        queries = g.op("Range", [p, scalar[1], one], "mask.query_positions")               # (s,)
        causal = g.op("LessOrEqual", [g.op("Unsqueeze", [keys, self._i64("axes_0", [0])], "mask.keys_row"),
                                      g.op("Unsqueeze", [queries, self._i64("axes_1", [1])], "mask.queries_col")],
                      "mask.causal")                                                       # (s, t)
        real = g.op("Equal", [mask, g.const("mask.real", np.asarray(1, np.int64))], "mask.real_tokens")   # (b, t)
        real = g.op("Unsqueeze", [real, self._i64("axes_1_2_3", [1, 2, 3])], "mask.real_b1111t")
        allowed = g.op("And", [causal, real], "mask.allowed")                              # (b, 1, 1, s, t)
        dtype = mask_dtype(g)
        return g.op("Where", [allowed, g.const("mask.open", np.asarray(0.0, dtype), cast=False),
                              g.const("mask.min", np.asarray(np.finfo(dtype).min, dtype), cast=False)], "mask.additive")

    def _i64(self, name: str, values: list[int]) -> str:
        return self.g.shared(name, np.asarray(values, dtype=np.int64))

    # --- one layer ---------------------------------------------------------------------------------------

    def _layer(self, i: int, e: str, cos: str, sin: str, additive: str, past: tuple[str, str]) -> tuple[str, tuple[str, str]]:
        c, g, p = self.c, self.g, f"model.layers.{i}"
        n = self._rmsnorm(e, f"{p}.input_layernorm")
        heads = {}
        for name, count in (("q", c.num_attention_heads), ("k", c.num_key_value_heads), ("v", c.num_key_value_heads)):
            y = self._linear(f"{p}.self_attn.{name}_proj", n)
            y = g.op("Reshape", [y, self._i64(f"heads_{count}", [0, 0, count, c.head_dim])], f"{p}.{name}_bshd")
            heads[name] = g.op("Transpose", [y], f"{p}.{name}_heads", perm=[0, 2, 1, 3])       # (b, heads, s, D)
        for name in ("q", "k"):
            if c.qk_norm:
                heads[name] = self._rmsnorm(heads[name], f"{p}.self_attn.{name}_norm")
            heads[name] = self._rope(heads[name], cos, sin, f"{p}.{name}")
        k = g.op("Concat", [past[0], heads["k"]], OUTPUT_NAMES["present_key_names"] % i, axis=2)   # (b, kv, t, D)
        v = g.op("Concat", [past[1], heads["v"]], OUTPUT_NAMES["present_value_names"] % i, axis=2)
        attended = (k, v) if self.prefix is None else self.prefix.keys_values(i, k, v)   # (b, kv, [k +] t, D)
        a = self._attention(heads["q"], *attended, additive, p)                            # (b, s, h D)
        e = g.op("Add", [e, self._linear(f"{p}.self_attn.o_proj", a)], f"{p}.attention_residual")
        m = self._rmsnorm(e, f"{p}.post_attention_layernorm")
        gate = self._linear(f"{p}.mlp.gate_proj", m)
        up = self._linear(f"{p}.mlp.up_proj", m)
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}.mlp.sigmoid")], f"{p}.mlp.silu")
        h = g.op("Mul", [silu, up], f"{p}.mlp.swiglu")
        return g.op("Add", [e, self._linear(f"{p}.mlp.down_proj", h)], f"{p}.mlp_residual"), (k, v)

    def _attention(self, q: str, k: str, v: str, additive: str, p: str) -> str:
        c, g = self.c, self.g
        group = c.num_attention_heads // c.num_key_value_heads
        q5 = g.op("Reshape", [q, self._i64("groups", [0, c.num_key_value_heads, group, -1, c.head_dim])],
                  f"{p}.q_groups")                                                          # (b, kv, g, s, D)
        k5 = g.op("Unsqueeze", [k, self._i64("axes_2", [2])], f"{p}.k_groups")               # (b, kv, 1, t, D)
        kt = g.op("Transpose", [k5], f"{p}.k_t", perm=[0, 1, 2, 4, 3])
        scores = g.op("Mul", [g.op("MatMul", [q5, kt], f"{p}.qk"),
                              g.const(f"{p}.attention_scaling", np.asarray(c.head_dim**-0.5))], f"{p}.scores")
        if g.dtype == "float16":
            scores = g.op("Cast", [scores], f"{p}.scores_float32", to=TensorProto.FLOAT)
        probs = g.op("Softmax", [g.op("Add", [scores, additive], f"{p}.masked_scores")], f"{p}.probs", axis=-1)
        if g.dtype == "float16":
            probs = g.op("Cast", [probs], f"{p}.probs_float16", to=g.onnx_dtype)
        v5 = g.op("Unsqueeze", [v, self._i64("axes_2", [2])], f"{p}.v_groups")
        out = g.op("MatMul", [probs, v5], f"{p}.attention")                                 # (b, kv, g, s, D)
        out = g.op("Reshape", [out, self._i64("heads_merged", [0, c.num_attention_heads, -1, c.head_dim])],
                   f"{p}.attention_heads")                                                  # (b, h, s, D)
        out = g.op("Transpose", [out], f"{p}.attention_bshd", perm=[0, 2, 1, 3])
        return g.op("Reshape", [out, self._i64("hidden", [0, 0, c.num_attention_heads * c.head_dim])],
                    f"{p}.attention_flat")

    def _rope(self, x: str, cos: str, sin: str, name: str) -> str:
        g, half = self.g, self.c.head_dim // 2
        x1 = g.op("Slice", [x, self._i64("zero", [0]), self._i64("half", [half]), self._i64("axis_3", [3])], f"{name}.x1")
        x2 = g.op("Slice", [x, self._i64("half", [half]), self._i64("head_dim", [2 * half]), self._i64("axis_3", [3])],
                  f"{name}.x2")
        rotated = g.op("Concat", [g.op("Neg", [x2], f"{name}.minus_x2"), x1], f"{name}.rotate_half", axis=3)
        return g.op("Add", [g.op("Mul", [x, cos], f"{name}.x_cos"), g.op("Mul", [rotated, sin], f"{name}.rot_sin")],
                    f"{name}.rope")

    def _rmsnorm(self, x: str, path: str) -> str:
        g = self.g
        x32 = x if g.dtype == "float32" else g.op("Cast", [x], f"{path}.x_float32", to=TensorProto.FLOAT)
        ms = g.op("ReduceMean", [g.op("Mul", [x32, x32], f"{path}.x2"), self._i64("axes_last", [-1])],
                  f"{path}.mean_x2", keepdims=1)
        eps = g.const(f"{path}.eps", np.asarray(self.c.rms_norm_eps, np.float32), cast=False)
        rstd = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, eps], f"{path}.ms_eps")], f"{path}.rms")],
                    f"{path}.rstd")
        xhat = g.op("Mul", [x32, rstd], f"{path}.xhat")
        if g.dtype != "float32":
            xhat = g.op("Cast", [xhat], f"{path}.xhat_{g.dtype}", to=g.onnx_dtype)
        return g.op("Mul", [g.const(f"{path}.weight", self.model.weight(f"{path}.weight")), xhat], f"{path}.out")

    # --- linear layers ------------------------------------------------------------------------------------

    def _tied_head(self, n: str, embed: str) -> str | None:
        """h E^T for a tied head, from the embedding initializer itself (not a second copy)."""
        if not self.c.tie_word_embeddings or (self.merged is not None and "lm_head" in self.merged.modules):
            return None
        return self.g.op("MatMul", [n, self.g.op("Transpose", [embed], "lm_head.weight_t", perm=[1, 0])], "lm_head.base")

    def _linear(self, path: str, h: str, *, base: str | None = None) -> str:
        layer = self.layers[path]
        if self.form == "merged":
            module = None if self.merged is None else self.merged.modules.get(path)
            return merged_linear(self.g, h, layer, module, self.merged, nf4_ops=self.nf4_ops, base=base)
        return unmerged_linear(self.g, h, layer, self.plan.methods.get(path), vera_t=self.vera_t,
                               nf4_ops=self.nf4_ops, swappable_bias=path in self.plan.biases, base=base)


def _numpy():
    from refpeft.backend import numpy_namespace

    return numpy_namespace()
