"""What a run trains: a fresh adapter on a model's linear layers (initialised as PEFT does), or every weight.

Targets are chosen as PEFT's `target_modules` chooses them: a list entry selects every linear
layer whose module path equals it or ends in "." + entry ("q_proj" selects
"model.layers.3.self_attn.q_proj"); a single string is a regular expression full-matched against
each path; "all-linear" selects every linear layer but the output layer (lm_head). Unlike PEFT,
which only refuses a list that matches nothing at all, every entry here must match at least one
layer (a typo is an error, not a silently smaller adapter). rank_pattern / alpha_pattern override
r / alpha per module with PEFT's rule (refpeft.peft_config.pattern_value: the first key K with
`(.*\\.)?(K)$` matching the path).

Initialisation (PEFT's `init_lora_weights=True` and VeRA's defaults):

    lora, rslora   A ~ U(-1/sqrt(k), 1/sqrt(k)) (Kaiming-uniform, a = sqrt(5)), B = 0;
                   s = alpha / r, or alpha / sqrt(r) for rslora   (refpeft.methods.lora.lora_init)
    dora           the same A and B, magnitude m = ||W0 + s B A|| = ||W0|| row norms (dora_init)
    vera           vera_A, vera_B from projection_prng_key on torch's CPU generator, sized to the
                   largest targeted layer (bit for bit PEFT's); lambda_d = d_initial, lambda_b = 0
    ia3            l = ones, (1, k) on layers named down_proj (PEFT's feed-forward default for these
                   decoders: input scaling), (d, 1) on the others; rank and alpha do not apply
    loha, lokr     PEFT's init_weights=True: one factor of each product zero, the others Kaiming-uniform
                   (refpeft.methods.loha / .lokr); LoKr's factor shapes from its init options
                   decompose_both and decompose_factor (PEFT's LoKrConfig names)
    oft, boft      R = I (oft_R = 0; boft_R = 0, boft_s = 1); the rank is the block size b (PEFT's
                   oft_block_size / boft_block_size), BOFT with one butterfly factor
    adalora        E = 0, A, B ~ N(0, 0.02^2); the rank is init_r (refpeft.train.adalora_training); no
                   rank or alpha pattern, saved modules or token rows

Method-specific init options (`init_options`) go to the row's `init_modules` by name; an option that
the row's init does not take is refused (the table answers which options a method has).

LoRA's A is drawn per module, module i (model order) from seed + i, on NumPy's generator or, with
generator="torch-cpu", exactly as PEFT draws one fresh layer after `torch.manual_seed(seed + i)`.
(PEFT's `get_peft_model` draws all modules from one continuing stream; reproducing that would need
lora_init to continue a generator instead of seeding one.)

`modules_to_save` (PEFT's, refpeft.saved_modules) adds whole base modules trained in full: every
module whose name ends with an entry ("lm_head", "embed_tokens", "norm" -> model.norm and each
layer's norms), each tensor initialised as a copy of the base's (a tied lm_head: a copy of the
embedding, which then trains apart from it, as PEFT's deep copy does). Every entry must select a
module, and no module may be both adapted and saved (PEFT silently leaves such a target unadapted).

The trained tensors travel as one flat dict keyed as the decoder's gradients are
(refpeft.model.decoder.loss_and_gradients): "<module path>.<tensor>" for an adapter's trainable
tensors (its method's `spec.trainable`: "model.layers.0.self_attn.q_proj.A"), and checkpoint names
for base tensors: an adapter's saved modules ("lm_head.weight"), or every weight for full
fine-tuning, where the model has no adapter. `trainable_parameters` and `with_parameters` map a
Model to and from it.

`trainable_tokens` (PEFT's trainable_token_indices, refpeft.model.trainable_tokens) adds chosen rows
of the embedding, beside the modules or alone (method TOKENS_ONLY: PEFT's TRAINABLE_TOKENS), each
starting as a copy of the base's row (PEFT's init_weights=True) and trained as
"model.embed_tokens.trainable_tokens_delta" (n, H), PEFT's name for the rows' values.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import replace
from typing import Any, Mapping, Sequence

from refpeft.adapter import Adapter
from refpeft.backend import namespace
from refpeft.errors import ConfigError
from refpeft.methods import METHODS
from refpeft.methods.adalora import ADALORA
from refpeft.methods.lora import LORA
from refpeft.model.decoder import Model, dense_weight
from refpeft.model.trainable_tokens import EMBED, LORA_KEY, TOKENS, has_tokens, tokens_init
from refpeft.optim import AdamConfig, ParamGroup, loraplus_groups
from refpeft.peft_config import pattern_value
from refpeft.patterns import matches
from refpeft.peft_format import PREFIX, tensor_key
from refpeft.quant.state import QuantState4bit
from refpeft.saved_modules import check_adapter_saved, select_saved
from refpeft.train.adalora_training import new_adalora_adapter
from refpeft.train.prompt_learning import encoder_parameters, with_encoder

# The adapters `refpeft train` makes: a training name -> (its method's row, its init options). Every row
# of the method table with a PEFT file type (a run writes PEFT's folder; Pre-Diag and SORA have none);
# rsLoRA is LoRA with s = alpha / sqrt(r). AdaLoRA's row is outside the method table
# (refpeft.methods.adalora): its modules carry the row (refpeft.train.adalora_training). FULL trains
# every weight and has no adapter.
TRAINING_METHODS = {**{name: (spec, {}) for name, spec in METHODS.items() if spec.peft_type is not None},
                    "rslora": (LORA, {"rslora": True}), "adalora": (ADALORA, {})}
FULL = "full"
TOKENS_ONLY = "trainable-tokens"        # no modules: only the trainable token rows (PEFT's TRAINABLE_TOKENS)
ALL_LINEAR = "all-linear"


def select_targets(model: Model, targets: Sequence[str] | str) -> list[str]:
    """The module paths the targets select, in model order (module docstring): a list of names, a
    regular expression full-matched against each path (PEFT's string form), or "all-linear"."""
    layers = model.linear_paths()
    if targets == ALL_LINEAR:
        return [p for p in layers if p != "lm_head"]
    if isinstance(targets, str):
        selected = [p for p in layers if matches(targets, p, mode="fullmatch", where="--targets")]
        if not selected:
            raise ConfigError(f"targets {targets!r} matches no linear layer path (such as {layers[0]!r})")
        return selected
    if not targets:
        raise ConfigError(f"targets must name at least one layer, or be {ALL_LINEAR!r}")
    names = sorted({p.rsplit(".", 1)[-1] for p in layers})
    chosen = set()
    for name in targets:
        matched = [p for p in layers if p == name or p.endswith("." + name)]
        if not matched:
            raise ConfigError(f"target {name!r} matches no linear layer of this {model.config.model_type} model; "
                              f"its linear layers are named {', '.join(names)}")
        chosen.update(matched)
    return [p for p in layers if p in chosen]


def new_adapter(model: Model, *, method: str, targets: Sequence[str] | str, rank: int = 8, alpha: float = 8.0,
                rank_pattern: Mapping[str, int] | None = None, alpha_pattern: Mapping[str, float] | None = None,
                seed: int = 0, generator: str = "numpy", projection_prng_key: int = 0,
                d_initial: float = 0.1, modules_to_save: Sequence[str] = (),
                trainable_tokens: Sequence[int] = (), init_options: Mapping[str, Any] | None = None) -> Adapter:
    """A freshly initialised adapter of `method` (a TRAINING_METHODS name) on the targeted layers,
    in the dtype and namespace of the model's weights: its method's `init_modules`, with copies of
    the modules `modules_to_save` selects and the rows `trainable_tokens` names (module docstring).
    Method TOKENS_ONLY: the rows alone (targets, rank and the rest do not apply)."""
    tokens = _token_rows(model, trainable_tokens)
    if method == TOKENS_ONLY:
        if not trainable_tokens:
            raise ConfigError(f"method {TOKENS_ONLY!r} trains token rows: name them (trainable_tokens)")
        if modules_to_save:
            raise ConfigError(f"method {TOKENS_ONLY!r} trains token rows only: modules_to_save does not apply")
        return Adapter({}, **tokens)
    if method not in TRAINING_METHODS:
        raise ConfigError(f"unsupported adapter method {method!r}; choose one of {', '.join(TRAINING_METHODS)} "
                          f"(or {FULL!r} fine-tuning)")
    spec, options = TRAINING_METHODS[method]
    name = spec.name
    if rank_pattern and spec.shared:
        raise ConfigError(f"{name} shares its projections across layers, so it has one rank for all layers: "
                          "rank_pattern does not apply")
    if alpha_pattern and not spec.scaled:
        raise ConfigError(f"{name} has no alpha (no alpha / r scaling): alpha_pattern does not apply")
    paths = select_targets(model, targets)
    if spec is ADALORA:
        return _adalora_adapter(model, paths, rank=rank, alpha=alpha, seed=seed, generator=generator,
                                refused={"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                                         "modules_to_save": modules_to_save, "trainable_tokens": trainable_tokens,
                                         "init_options": init_options})
    W0s = {p: dense_weight(model, p) for p in paths}
    ranks = {p: int(_pattern(rank_pattern, p, rank)) for p in paths}
    alphas = {p: float(_pattern(alpha_pattern, p, alpha)) for p in paths}
    if spec.shared:     # VeRA: projections from their own key, torch's generator (PEFT's)
        options = {**options, "projection_prng_key": projection_prng_key, "d_initial": d_initial}
    else:
        options = {**options, "seed": seed, "generator": generator}
    options = {**options, **_init_options(spec, init_options or {})}
    saved = saved_module_copies(model, modules_to_save)
    check_adapter_saved(paths, saved, {}, source="targets and modules_to_save")
    modules, shared, config = spec.init_modules(W0s, ranks=ranks, alphas=alphas, **options)
    if tokens and spec.peft_type != "LORA":
        raise ConfigError(f"trainable tokens go beside LoRA (PEFT's LoraConfig.trainable_token_indices), not {method}")
    return Adapter(modules, **shared, config=config, saved_modules=saved, **tokens)


def _adalora_adapter(model: Model, paths: list[str], *, rank: int, alpha: float, seed: int, generator: str,
                     refused: Mapping[str, Any]) -> Adapter:
    """AdaLoRA's fresh modules (refpeft.train.adalora_training): init_r = rank on every layer, alone."""
    given = [name for name, value in refused.items() if value]
    if given:
        raise ConfigError(f"adalora trains init_r triplets on each targeted layer and nothing else: "
                          f"{', '.join(given)} do{'es' if len(given) == 1 else ''} not apply")
    if generator != "numpy":
        raise ConfigError(f"AdaLoRA's init draws from NumPy's generator only, got generator={generator!r}")
    return new_adalora_adapter(model, paths, init_r=rank, alpha=alpha, seed=seed)


def _init_options(spec: Any, init_options: Mapping[str, Any]) -> dict[str, Any]:
    """The method-specific options for `spec.init_modules`, refusing any it does not take."""
    accepted = inspect.signature(spec.init_modules).parameters
    unknown = [name for name in init_options if name not in accepted or name in ("ranks", "alphas")]
    if unknown:
        raise ConfigError(f"{', '.join(unknown)} do{'es' if len(unknown) == 1 else ''} not apply to {spec.name} "
                          f"(its init takes {', '.join(n for n in accepted if n not in ('W0s', 'ranks', 'alphas'))})")
    return dict(init_options)


def _token_rows(model: Model, indices: Sequence[int]) -> dict[str, Any]:
    """Adapter fields of fresh trainable token rows: copies of the embedding's rows; {} for none."""
    if not indices:
        return {}
    return {"token_indices": tuple(indices), "token_values": tokens_init(model.weights[EMBED], indices)}


def saved_module_copies(model: Model, modules_to_save: Sequence[str]) -> dict[str, Any]:
    """Copies of the base tensors of every module `modules_to_save` selects, by checkpoint name
    (PEFT's rule: modules whose name ends with an entry; refpeft.saved_modules)."""
    if isinstance(modules_to_save, str):
        raise ConfigError(f"modules_to_save is a list of module names, got the string {modules_to_save!r}")
    tied = model.config.tie_word_embeddings
    names = list(model.weights) + (["lm_head.weight"] if tied else [])
    copies = {}
    for name in select_saved(names, list(modules_to_save), where="modules_to_save"):
        W = model.weights["model.embed_tokens.weight" if name not in model.weights else name]
        if isinstance(W, QuantState4bit):
            raise ConfigError(f"modules_to_save selects {name!r}, stored in 4 bits: a quantised layer is frozen, "
                              "it cannot be trained in full")
        copies[name] = namespace(W).asarray(W, copy=True)
    return copies


def full_fine_tuning(model: Model) -> bool:
    """Whether a run trains every weight: no adapter and no prompt-learning encoder."""
    return model.adapter is None and model.prompt_encoder is None


def trainable_parameters(model: Model) -> dict[str, Any]:
    """The trained tensors by the decoder's gradient names: the adapter's and its saved modules', a
    prompt-learning encoder's (refpeft.train.prompt_learning), or every weight when it has neither."""
    if model.prompt_encoder is not None:
        return encoder_parameters(model)
    if model.adapter is None:
        return dict(model.weights)
    params = {f"{path}.{name}": module.tensors[name]               # LoKr: each module has some of its factors
              for path, module in model.adapter.modules.items() for name in module.spec.trainable
              if name in module.tensors}
    tokens = {TOKENS: model.adapter.token_values} if has_tokens(model.adapter) else {}
    return {**params, **model.adapter.saved_modules, **tokens}


def with_parameters(model: Model, params: Mapping[str, Any]) -> Model:
    """The model with the trained tensors replaced by `params` (names as `trainable_parameters` gives them)."""
    expected = trainable_parameters(model)
    if set(params) != set(expected):
        unknown, missing = sorted(set(params) - set(expected)), sorted(set(expected) - set(params))
        raise ConfigError(f"parameters do not match the model's trained tensors (unknown {unknown[:3]}, "
                          f"missing {missing[:3]})")
    if model.prompt_encoder is not None:
        return with_encoder(model, params)
    if model.adapter is None:
        return replace(model, weights={**model.weights, **params})
    updates: dict[str, dict[str, Any]] = {}
    saved = model.adapter.saved_modules
    for name, value in params.items():
        if name not in saved and name != TOKENS:
            path, _, tensor = name.rpartition(".")
            updates.setdefault(path, {})[tensor] = value
    modules = {path: module.replace(**updates[path]) for path, module in model.adapter.modules.items()}
    return replace(model, adapter=replace(model.adapter, modules=modules, token_values=params.get(TOKENS),
                                          saved_modules={name: params[name] for name in saved}))


# transformers' Trainer (`get_decay_parameter_names`): no weight decay for biases and norm weights.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def optimizer_groups(model: Model, params: Mapping[str, Any], config: AdamConfig, *,
                     loraplus_ratio: float | None = None) -> list[ParamGroup]:
    """The optimiser's parameter groups, as transformers' Trainer and PEFT form them.

    Without LoRA+: Trainer's two groups, every tensor with config.weight_decay except those whose
    lower-cased name matches NO_DECAY_PATTERNS (biases, norm weights: only full fine-tuning has
    them), which get 0. With loraplus_ratio: PEFT's LoRA+ groups (refpeft.optim.loraplus_groups: B
    matrices and 1-D tensors at lr * ratio, config.weight_decay passed as PEFT's
    `loraplus_weight_decay`), which classify by PEFT's parameter names ("lora_B"), so each decoder
    name is looked up under its PEFT file key and the groups are mapped back. A saved module's
    tensor is PEFT's "<module>.modules_to_save.default.<tensor>" (a matrix joins the A group, a
    vector the B group); trainable token rows are PEFT's 2-D "token_adapter.trainable_tokens_delta"
    of no embedding layer, so the A group; the decoder's norms are RMSNorm, which PEFT's LoRA+ does
    not exempt from decay.
    """
    if loraplus_ratio is None:
        no_decay = [n for n in params if any(re.search(p, n.lower()) for p in NO_DECAY_PATTERNS)]
        decay = [n for n in params if n not in set(no_decay)]
        groups = [ParamGroup(names=tuple(decay), config=config),
                  ParamGroup(names=tuple(no_decay), config=replace(config, weight_decay=0.0))]
        return [g for g in groups if g.names]
    if model.adapter is None:
        raise ConfigError("LoRA+ sets the learning rates of adapter matrices; it does not apply to full fine-tuning")
    peft_names = {}
    for name in params:
        path, _, tensor = name.rpartition(".")
        if name in model.adapter.saved_modules:
            peft_names[f"{PREFIX}{path}.modules_to_save.default.{tensor}"] = name
        elif name == TOKENS:                    # a 2-D parameter of no embedding layer: the A group
            peft_names[LORA_KEY] = name
        else:
            peft_names[tensor_key(path, tensor)] = name
    groups = loraplus_groups({key: params[name] for key, name in peft_names.items()}, config, lr_ratio=loraplus_ratio,
                             loraplus_weight_decay=config.weight_decay, layer_norm_names=False)
    return [ParamGroup(names=tuple(peft_names[key] for key in g.names), config=g.config) for g in groups]


def _pattern(patterns: Mapping[str, Any] | None, path: str, default: Any) -> Any:
    return pattern_value(patterns or {}, path, default)[0]
