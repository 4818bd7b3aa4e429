"""A Llama-family decoder: the ops of refpeft.model wired into transformers' LlamaForCausalLM.

Letters: b batch, s sequence, H hidden, h query heads, g = h / kv heads, D head_dim, I the MLP's
intermediate size, V vocabulary. Forward (transformers' names for every weight; "linear" is
x W^T + b, or a method's adapted layer when the adapter names that module):

    e   = embed_tokens[ids]                                       # (b, s, H)
    per layer i (p = "model.layers.{i}"):
        n   = rmsnorm(e, p.input_layernorm)                       # (b, s, H)
        q   = linear(n, p.self_attn.q_proj)  -> (b, h, s, D)      k, v likewise with h / g heads
        q,k = rmsnorm(q, p.self_attn.q_norm), rmsnorm(k, ...)     # Qwen3 only, per head
        q,k = rope(q), rope(k)                                    # cos/sin of the positions
        a   = attention(q, k, v, mask) -> (b, s, h D)             # causal, GQA, padding mask
        e   = e + linear(a, p.self_attn.o_proj)
        m   = rmsnorm(e, p.post_attention_layernorm)
        e   = e + linear(swiglu(linear(m, gate_proj), linear(m, up_proj)), p.mlp.down_proj)
    logits = linear(rmsnorm(e, model.norm), lm_head)              # lm_head = embed_tokens when tied

Backward runs the same list in reverse: each op's own backward (refpeft.model.*), each linear
layer's backward (the base's dx = dy W, and dW = dy^T x when the weight is trained; an adapted
layer's is its method's backward from the method table), and the residual stream adds the
gradients of both branches (de = de + d(branch input)). A frozen base layer's tape entry keeps no
x (dx = dy W does not read it), and its products run on rows flattened to 2-D (one matmul each).
Gradients are returned by name: the adapter's as "<module path>.<tensor>"
("model.layers.0.self_attn.q_proj.A"), the base weights' by their checkpoint names.

Which base tensors are trained is a set of checkpoint names (`trained_tensors`): every weight
for full fine-tuning (train_base=True), any chosen ones, and always the adapter's saved modules
(PEFT's modules_to_save, refpeft.saved_modules). A saved module's tensors replace the base's in
forward (`Model.weight`), and its gradients are returned under the same names. With tied
embeddings the head multiplies by the embedding and its dW adds to "model.embed_tokens.weight";
a saved "lm_head.weight" is a head of its own, and a saved embedding leaves the head on the
frozen base embedding (PEFT's deep copies). An adapter's trainable token rows replace rows of the
embedding (and so of a tied head) and are trained through its gradient, returned as their own
(refpeft.model.trainable_tokens).

Prompt learning: `prompt` (k, H) is put in front of e (refpeft.model.prompt_tuning; P-tuning's
encoder computes one, refpeft.model.p_tuning); `prefix` is every layer's past keys and values
(refpeft.model.prefix_tuning), its gradient attention's dk, dv at the past key positions. Both
are returned as "prompt_embeddings", the name PEFT saves them under. Bottleneck adapters (`bottleneck`)
replace the two residual additions of a layer (refpeft.model.bottleneck_adapters).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Iterable, Mapping

from refpeft.adapter import Adapter
from refpeft.backend import namespace
from refpeft.errors import ConfigError, InputError
from refpeft.methods.linear import flatten_rows
from refpeft.methods.qlora import base_weight, quantize_base
from refpeft.model.attention import attention_backward, attention_forward
from refpeft.model.bottleneck_adapters import BottleneckAdapters, residual_add, residual_add_backward
from refpeft.model.config import ModelConfig
from refpeft.model.embedding import embedding_backward, embedding_forward
from refpeft.model.loss import causal_lm_loss_backward, causal_lm_loss_forward
from refpeft.model.mlp import swiglu_backward, swiglu_forward
from refpeft.model.prefix_tuning import prefix_backward, prefix_forward
from refpeft.model.prompt_tuning import prompt_backward, prompt_forward, prompt_labels, prompt_mask
from refpeft.model.rmsnorm import rms_norm_backward, rms_norm_forward
from refpeft.model.rope import rope_backward, rope_forward, rope_inverse_frequencies, rope_tables
from refpeft.quant.state import QuantState4bit
from refpeft.model.trainable_tokens import EMBED, check_adapter_tokens, has_tokens, token_gradients, tokens_forward
from refpeft.saved_modules import check_adapter_saved, check_entries, check_saved_against_base, written_entries

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


@dataclass(frozen=True)
class Model:
    """A decoder's config and weights (transformers' names), with an optional adapter on its linear layers."""

    config: ModelConfig
    weights: Mapping[str, Any]
    adapter: Adapter | None = None
    # Per-method forward options, by method name: {"dora": {"gradient": "exact"}} (default: PEFT's detached).
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Prompt tuning's virtual-token embeddings P (k, H), put in front of every sequence
    # (refpeft.model.prompt_tuning); trained as "prompt_embeddings".
    prompt: Any = None
    # Prefix tuning's per-layer keys and values as PEFT's table T (k, layers 2 kv_heads head_dim), the past
    # of every layer (refpeft.model.prefix_tuning); trained as "prompt_embeddings", PEFT's name for it.
    prefix: Any = None
    # The tensors (PEFT's names) of the encoder that computes `prompt` or `prefix` while they train
    # (refpeft.train.prompt_learning); the decoder reads only prompt / prefix.
    prompt_encoder: Mapping[str, Any] | None = None
    # Bottleneck adapters in the residual stream (refpeft.model.bottleneck_adapters), trained by their full names.
    bottleneck: BottleneckAdapters | None = None

    def linear_paths(self) -> list[str]:
        """Every linear layer's module path, in model order (the targets an adapter may name)."""
        return [name[: -len(".weight")] for name in self.weights if name.endswith("_proj.weight")] + \
            ([] if self.config.tie_word_embeddings else ["lm_head"])

    @property
    def saved(self) -> Mapping[str, Any]:
        """The adapter's saved modules by checkpoint name (PEFT's modules_to_save), or none."""
        return {} if self.adapter is None else self.adapter.saved_modules

    def weight(self, name: str) -> Any:
        """Base tensor `name` as the model uses it: the adapter's saved copy, or the stored tensor (the
        embedding with the adapter's trainable token rows in place: refpeft.model.trainable_tokens)."""
        if name == EMBED and has_tokens(self.adapter):
            return self._embedding_with_tokens
        return self.saved[name] if name in self.saved else self.weights[name]

    @cached_property
    def _embedding_with_tokens(self) -> Any:
        """The embedding with the token rows in place, made once per model: the embedding and a tied
        head read it in every forward, and generation runs one forward per token."""
        return tokens_forward(self.weights[EMBED], self.adapter.token_indices, self.adapter.token_values)

    def bias(self, path: str) -> Any:
        """The bias of linear layer `path` as the model uses it, or None."""
        name = f"{path}.bias"
        return self.saved[name] if name in self.saved else self.weights.get(name)

    def head_name(self) -> str | None:
        """The checkpoint name the output layer's weight is trained under: "lm_head.weight", the tied
        "model.embed_tokens.weight", or None for a tied head whose embedding is a saved copy (the head
        keeps the frozen base embedding, as PEFT's copy leaves it)."""
        if not self.config.tie_word_embeddings or "lm_head.weight" in self.saved:
            return "lm_head.weight"
        return None if "model.embed_tokens.weight" in self.saved else "model.embed_tokens.weight"

    def head_weight(self) -> Any:
        name = self.head_name()
        return self.weights["model.embed_tokens.weight"] if name is None else self.weight(name)

    def linear_weight(self, path: str) -> Any:
        """The weight of linear layer `path`: an array, or a QuantState4bit (a QLoRA base)."""
        return self.head_weight() if path == "lm_head" else self.weight(f"{path}.weight")


def dense_weight(model: Model, path: str) -> Any:
    """The weight linear layer `path` multiplies by: the stored array, or a 4-bit base's dequantised
    bfloat16 values in the embedding's dtype."""
    W = model.linear_weight(path)
    if not isinstance(W, QuantState4bit):
        return W
    embed = model.weights["model.embed_tokens.weight"]
    return namespace(embed).astype(base_weight(W, precision="float64"), embed.dtype)


def quantize_linear_layers(model: Model, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                           rounding: str = "bnb-cuda") -> Model:
    """The model with every projection's weight stored as bitsandbytes stores a QLoRA base (the
    embedding, norms and lm_head stay as they are, bitsandbytes' default): refpeft.methods.qlora's
    quantize_base, the weight rounded to bfloat16 and then to 4 bits. The layer then multiplies
    by the dequantised bfloat16 values held in the model's dtype: QLoRA's "float64" oracle
    precision (refpeft.methods.qlora), which PEFT + bitsandbytes round further in bfloat16."""
    weights = dict(model.weights)
    for path in model.linear_paths():
        if path != "lm_head":
            weights[f"{path}.weight"] = quantize_base(weights[f"{path}.weight"], quant_type=quant_type,
                                                      blocksize=blocksize, double_quant=double_quant, rounding=rounding)
    return replace(model, weights=weights)


@dataclass
class Tape:
    """What backward needs, recorded by forward in order: (op, cache) pairs and the settings."""

    entries: list[tuple[str, Any]] = field(default_factory=list)
    trained: frozenset[str] = frozenset()      # base tensors whose gradients backward returns (checkpoint names)


class _Discarded(list):
    """The entries of a tape that records nothing (forward(..., record=False))."""

    def append(self, entry: Any) -> None:
        pass


def trained_tensors(model: Model, train_base: bool | Iterable[str] = False) -> frozenset[str]:
    """The base tensors a pass trains: the adapter's saved modules, plus every weight (train_base=True)
    or the named ones."""
    names = set(model.saved) | ({EMBED} if has_tokens(model.adapter) else set())     # token rows: from dW'
    if train_base is True:
        return frozenset(names | set(model.weights))
    chosen = set(train_base or ())
    unknown = sorted(chosen - set(model.weights) - names)
    if unknown:
        raise ConfigError(f"train_base names {unknown[:3]}, which are not tensors of this model")
    return frozenset(names | chosen)


def check_adapter_targets(model: Model) -> None:
    """Every adapted module must be a linear layer of the model, of its size."""
    if model.adapter is None:
        return
    paths = set(model.linear_paths()) | {"lm_head"}         # tied or not: PEFT adapts a tied lm_head too
    for path, module in model.adapter.modules.items():
        if path not in paths:
            near = sorted(p for p in paths if p.split(".")[-1] == path.split(".")[-1])[:3]
            raise ConfigError(f"the adapter targets {path!r}, which is not a linear layer of this "
                              f"{model.config.model_type} model" + (f" (for example {near})" if near else ""))
        W = model.linear_weight(path)
        k, d = module.in_features, module.out_features                # None: the module does not tell (VeRA's k, IA3)
        if (d is not None and d != W.shape[0]) or (k is not None and k != W.shape[1]):
            raise ConfigError(f"the adapter's {path!r} adapts a {module.out_features} x {k} layer; the model's is "
                              f"{W.shape[0]} x {W.shape[1]}")
    saved = model.adapter.saved_modules
    check_adapter_tokens(model.adapter, vocab_size=model.config.vocab_size, hidden_size=model.config.hidden_size,
                         saved=saved, source="the adapter")
    if saved:
        shapes = {name: tuple(model.weights[name].shape) for name in model.weights}
        if model.config.tie_word_embeddings:
            shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
        check_saved_against_base(saved, shapes, source="the adapter")
        check_adapter_saved(model.adapter.modules, saved, model.adapter.base_biases, source="the adapter")
        check_entries(written_entries(saved), shapes)
        quantized = sorted(n for n in saved if isinstance(model.weights.get(n), QuantState4bit))
        if quantized:
            raise ConfigError(f"the adapter saves {quantized[:3]}, stored in 4 bits in this model: a quantised "
                              "layer is frozen, it cannot be trained in full")


def forward(model: Model, ids: Any, *, attention_mask: Any = None, position_ids: Any = None,
            past: list[tuple[Any, Any]] | None = None, train_base: bool | Iterable[str] = False,
            record: bool = True) -> tuple[Any, Tape, list]:
    """logits (b, s, V) of token ids (b, s); the tape for `backward`; each layer's (keys, values).

    attention_mask (b, past + s) of 0/1 as transformers takes it; position_ids default to
    past + 0 .. s - 1 (transformers' default, also with left padding). past: the keys and values
    of earlier positions (generation); backward returns no gradient for a given past. When none is
    given, a model's prefix is the past, and its gradient is returned; the mask and positions are
    then the s tokens' own, as PEFT takes them (it puts k ones in front of the mask and adds k to
    given positions: refpeft.model.prefix_tuning). train_base: True for
    every base weight, or the checkpoint names of those to train (`trained_tensors`). record=False
    keeps nothing for a backward (generation, evaluation): each layer's weights and activations can
    go as soon as the next layer starts, and the returned tape is empty.
    """
    c = model.config
    xp = namespace(model.weights["model.embed_tokens.weight"])
    if len(ids.shape) != 2:
        raise InputError(f"token ids have shape {tuple(ids.shape)}, expected (batch, sequence)")
    b, s = ids.shape
    if model.prompt is not None and model.prefix is not None:
        raise ConfigError("a model has prompt tuning's virtual tokens or a prefix, not both (PEFT trains one "
                          "prompt-learning method at a time)")
    tape = Tape(entries=[] if record else _Discarded(), trained=trained_tensors(model, train_base))
    if model.prefix is not None and past is None:
        table = xp.astype(model.prefix, model.weights["model.embed_tokens.weight"].dtype)   # PEFT casts it too
        past, cache = prefix_forward(table, b, c)                                      # L x (K_i, V_i)
        tape.entries.append(("prefix", cache))                                          # first: popped last
        attention_mask = prompt_mask(attention_mask, int(model.prefix.shape[0]))
        if position_ids is not None:                                                    # PEFT adds k to them
            position_ids = position_ids + int(model.prefix.shape[0])
    offset = 0 if past is None else past[0][0].shape[2]
    k = 0 if model.prompt is None or past is not None else int(model.prompt.shape[0])    # virtual tokens
    if offset + k + s > c.max_position_embeddings:
        raise InputError(f"{offset + k + s} positions exceed the model's max_position_embeddings "
                         f"({c.max_position_embeddings})")
    if k and position_ids is not None:
        raise ConfigError("position_ids with prompt tuning: the virtual tokens take positions 0 .. k - 1 and the "
                          "sequence the ones after them; leave position_ids out")
    dtype = model.weights["model.embed_tokens.weight"].dtype
    if position_ids is None:
        position_ids = xp.broadcast_to(xp.arange(offset, offset + k + s, dtype=xp.int64)[None, :], (b, k + s))
    inv = rope_inverse_frequencies(c.head_dim, **c.rope_parameters(), dtype="float64", xp=xp)
    cos, sin = (xp.astype(t, dtype) for t in rope_tables(position_ids, inv))
    e, cache = embedding_forward(ids, model.weight("model.embed_tokens.weight"))
    tape.entries.append(("embedding", cache))
    if k:
        e, cache = prompt_forward(e, model.prompt)                                         # (b, k + s, H)
        tape.entries.append(("prompt", cache))
        attention_mask = prompt_mask(attention_mask, k)
    presents = []
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        e, present = _layer_forward(model, p, e, cos, sin, attention_mask, None if past is None else past[i], tape)
        presents.append(present)
    n, cache = rms_norm_forward(e, model.weight("model.norm.weight"), eps=c.rms_norm_eps)
    tape.entries.append(("norm:model.norm", cache))
    logits = _linear(model, "lm_head", n, tape)
    return logits, tape, presents


def loss_and_gradients(model: Model, ids: Any, labels: Any, *, attention_mask: Any = None,
                       train_base: bool | Iterable[str] = False,
                       num_items_in_batch: float | None = None) -> tuple[Any, Any, dict]:
    """The causal-LM loss (transformers' semantics), the logits and the gradient of every trained tensor."""
    logits, tape, _ = forward(model, ids, attention_mask=attention_mask, train_base=train_base)
    if model.prompt is not None:
        labels = prompt_labels(labels, int(model.prompt.shape[0]))
    loss, cache = causal_lm_loss_forward(logits, labels, num_items_in_batch=num_items_in_batch)
    xp = namespace(logits)
    dlogits = causal_lm_loss_backward(xp.asarray(1.0, dtype=logits.dtype), cache)
    return loss, logits, backward(model, dlogits, tape)


def backward(model: Model, dlogits: Any, tape: Tape) -> dict[str, Any]:
    """Gradients of sum(logits * dlogits) for every trained tensor, by name (module docstring)."""
    c = model.config
    grads: dict[str, Any] = {}
    entries = list(tape.entries)
    d = _linear_backward(model, dlogits, entries.pop(), grads, tape)
    d = _norm_backward(d, entries.pop(), grads, tape)
    dpast = []                                                                         # each layer's (dK, dV)
    for i in reversed(range(c.num_hidden_layers)):
        d, dkv = _layer_backward(model, f"model.layers.{i}", d, entries, grads, tape)
        dpast.insert(0, dkv)
    name, cache = entries.pop()
    if name == "prompt":
        grads["prompt_embeddings"], d = prompt_backward(d, cache)
        name, cache = entries.pop()
    if "model.embed_tokens.weight" in tape.trained:
        _accumulate(grads, "model.embed_tokens.weight", embedding_backward(d, cache))
    if entries:                                                                        # ("prefix", cache)
        grads["prompt_embeddings"] = prefix_backward(dpast, entries.pop()[1])
    return token_gradients(model.adapter, grads)                                       # dR = dW'[t]


# --- one decoder layer ----------------------------------------------------------------------------


def _layer_forward(model: Model, p: str, e: Any, cos: Any, sin: Any, mask: Any, past: Any,
                   tape: Tape) -> tuple[Any, tuple[Any, Any]]:
    c, xp = model.config, namespace(e)
    b, s, _ = e.shape
    n, cache = rms_norm_forward(e, model.weight(f"{p}.input_layernorm.weight"), eps=c.rms_norm_eps)
    tape.entries.append((f"norm:{p}.input_layernorm", cache))
    heads = {}
    for name, count in (("q", c.num_attention_heads), ("k", c.num_key_value_heads), ("v", c.num_key_value_heads)):
        y = _linear(model, f"{p}.self_attn.{name}_proj", n, tape)
        heads[name] = xp.permute_dims(xp.reshape(y, (b, s, count, c.head_dim)), (0, 2, 1, 3))   # (b, heads, s, D)
    for name in ("q", "k"):
        if c.qk_norm:
            heads[name], cache = rms_norm_forward(heads[name], model.weight(f"{p}.self_attn.{name}_norm.weight"),
                                                  eps=c.rms_norm_eps)
            tape.entries.append((f"norm:{p}.self_attn.{name}_norm", cache))
        heads[name], cache = rope_forward(heads[name], cos, sin)
        tape.entries.append(("rope", cache))
    k, v = heads["k"], heads["v"]
    if past is not None:
        k, v = xp.concat([past[0], k], axis=2), xp.concat([past[1], v], axis=2)
    a, cache = attention_forward(heads["q"], k, v, attention_mask=mask)
    tape.entries.append(("attention", cache))
    a = xp.reshape(xp.permute_dims(a, (0, 2, 1, 3)), (b, s, c.num_attention_heads * c.head_dim))
    o = _linear(model, f"{p}.self_attn.o_proj", a, tape)
    e = residual_add(model.bottleneck, p, "attention", e, o, tape.entries)          # e + o, or a bottleneck
    m, cache = rms_norm_forward(e, model.weight(f"{p}.post_attention_layernorm.weight"), eps=c.rms_norm_eps)
    tape.entries.append((f"norm:{p}.post_attention_layernorm", cache))
    gate = _linear(model, f"{p}.mlp.gate_proj", m, tape)
    up = _linear(model, f"{p}.mlp.up_proj", m, tape)
    h, cache = swiglu_forward(gate, up)
    tape.entries.append(("swiglu", cache))
    o = _linear(model, f"{p}.mlp.down_proj", h, tape)
    return residual_add(model.bottleneck, p, "output", e, o, tape.entries), (k, v)


def _layer_backward(model: Model, p: str, de: Any, entries: list, grads: dict, tape: Tape) -> tuple[Any, tuple]:
    """d(layer input) and (dK, dV) of the past keys and values: attention's dk, dv at the first
    sk - s key positions (after rope, so no rope to undo; refpeft.model.prefix_tuning)."""
    c, xp = model.config, namespace(de)
    b, s, _ = de.shape
    de, do = residual_add_backward(de, entries, grads)                                 # e = r + o, or a bottleneck
    dh = _linear_backward(model, do, entries.pop(), grads, tape)                      # down_proj
    sw = swiglu_backward(dh, entries.pop()[1])
    dm = _linear_backward(model, sw.dup, entries.pop(), grads, tape)                   # up_proj
    dm = dm + _linear_backward(model, sw.dgate, entries.pop(), grads, tape)            # gate_proj
    de = de + _norm_backward(dm, entries.pop(), grads, tape)                           # residual
    de, do = residual_add_backward(de, entries, grads)
    da = _linear_backward(model, do, entries.pop(), grads, tape)                       # o_proj
    da = xp.permute_dims(xp.reshape(da, (b, s, c.num_attention_heads, c.head_dim)), (0, 2, 1, 3))
    att = attention_backward(da, entries.pop()[1])
    n = att.dk.shape[2] - s                                                            # past keys
    d = {"q": att.dq, "k": att.dk[:, :, n:, :], "v": att.dv[:, :, n:, :]}
    for name in ("k", "q"):                                                            # reverse of q, k
        d[name] = rope_backward(d[name], entries.pop()[1])
        if c.qk_norm:
            d[name] = _norm_backward(d[name], entries.pop(), grads, tape)
    dn = None
    for name in ("v", "k", "q"):
        flat = xp.reshape(xp.permute_dims(d[name], (0, 2, 1, 3)), (b, s, -1))
        dx = _linear_backward(model, flat, entries.pop(), grads, tape)
        dn = dx if dn is None else dn + dx
    return de + _norm_backward(dn, entries.pop(), grads, tape), (att.dk[:, :, :n, :], att.dv[:, :, :n, :])


# --- linear layers and norms ----------------------------------------------------------------------


def _linear(model: Model, path: str, x: Any, tape: Tape) -> Any:
    """x W^T + b, or the adapted layer of the adapter's module `path` (its method's forward)."""
    if _weight_name(model, path) in tape.trained and isinstance(model.linear_weight(path), QuantState4bit):
        raise ConfigError(f"{path} is stored in 4 bits: a quantised base is frozen, it cannot be fine-tuned in full")
    W = dense_weight(model, path)
    bias = model.bias(path)
    module = None if model.adapter is None else model.adapter.modules.get(path)
    if module is not None:
        y, cache = module.spec.forward(x, W, module, shared=model.adapter.shared, bias=bias,
                                       **model.method_options.get(module.method, {}))
        tape.entries.append((f"adapted:{path}", cache))
        return y
    xp = namespace(x)
    y = xp.matmul(flatten_rows(x, xp=xp), xp.matrix_transpose(W))                     # (n, d): one 2-D product
    y = xp.reshape(y, (*x.shape[:-1], W.shape[0]))
    keep_x = _weight_name(model, path) in tape.trained                                 # only dW = dy^T x reads x
    tape.entries.append((f"linear:{path}", (x if keep_x else None, W, bias is not None)))
    return y if bias is None else y + bias


def _linear_backward(model: Model, dy: Any, entry: tuple[str, Any], grads: dict, tape: Tape) -> Any:
    kind, cache = entry
    op, path = kind.split(":", 1)
    if op == "adapted":
        module = model.adapter.modules[path]
        g = module.spec.backward(dy, cache)
        for name in module.spec.trainable:
            if name in module.tensors:                      # LoKr: each module has some of its factors
                _accumulate(grads, f"{path}.{name}", getattr(g, f"d{name}"))
        return g.dx
    x, W, has_bias = cache                                                             # x: None for a frozen W
    xp = namespace(dy)
    name = _weight_name(model, path)
    dy2 = flatten_rows(dy, xp=xp)                                                      # (n, d)
    if name in tape.trained:
        _accumulate(grads, name, xp.matmul(xp.matrix_transpose(dy2), flatten_rows(x, xp=xp)))  # dW = dy^T x
    if has_bias and f"{path}.bias" in tape.trained:
        _accumulate(grads, f"{path}.bias", xp.sum(dy2, axis=0))
    return xp.reshape(xp.matmul(dy2, W), (*dy.shape[:-1], W.shape[1]))                # dx = dy W


def _norm_backward(dy: Any, entry: tuple[str, Any], grads: dict, tape: Tape) -> Any:
    kind, cache = entry
    g = rms_norm_backward(dy, cache)
    name = f"{kind.split(':', 1)[1]}.weight"
    if name in tape.trained:
        _accumulate(grads, name, g.dweight)
    return g.dx


def _weight_name(model: Model, path: str) -> str | None:
    """The checkpoint name linear layer `path`'s weight is trained under (Model.head_name for the head)."""
    return model.head_name() if path == "lm_head" else f"{path}.weight"


def _accumulate(grads: dict, name: str, g: Any) -> None:
    grads[name] = g if name not in grads else grads[name] + g
