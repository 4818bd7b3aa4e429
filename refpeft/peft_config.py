"""HF PEFT's adapter_config.json: the options refpeft reads, checks and writes, and PEFT's matching rules.

A config names its peft_type ("LORA", "VERA") and the flags that pick a method of it (use_dora);
the method table (refpeft.methods) says which. LoRA: s = lora_alpha / r (lora_alpha / sqrt(r) with
use_rslora); a module's r and alpha come from `rank_pattern` / `alpha_pattern` when a key matches
it, PEFT's `get_pattern_key` rule: the first key K (in file order) for which the regular
expression `(.*\\.)?(K)$` matches the module path from its start (`re.match`), so "q_proj" matches
every q_proj and "layers\\.0\\.q_proj" one of them. Every pattern is matched within a time bound
(refpeft.patterns): one that backtracks catastrophically is refused, not waited for. VeRA: one r
for all modules, `projection_prng_key` seeds the projections when they are not saved.

Reading refuses invalid JSON and unsupported options (named, with what they would mean) and checks
every value's type and range. `modules_to_save` (whole modules trained in full) follows PEFT's
rules in refpeft.saved_modules, and `targets` leaves out the modules it selects, as PEFT does.
Writing is exact rather than pretty: `target_modules` is a regular expression matching exactly the
adapted paths (PEFT full-matches a string against each module name), r and lora_alpha are the
most common values and `rank_pattern` / `alpha_pattern` name each other module by "^" and its
escaped full path, so a key selects exactly its own module; `modules_to_save` names each saved
module by its full path.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from refpeft.adapter import Adapter
from refpeft.errors import ConfigError
from refpeft.io import read_json_object
from refpeft.methods import method_spec, peft_methods
from refpeft.methods.spec import Method
from refpeft.patterns import MATCH_SECONDS, check_pattern, matches
from refpeft.peft_options import (ALPHA_KEYS, BASE_REWRITING_INITS, IGNORED_OPTIONS, PASSTHROUGH, PEFT_TYPES,
                                  UNSUPPORTED_OPTIONS)
from refpeft.saved_modules import check_adapter_saved, check_saved_entries, excluded_from_targets, written_entries

CONFIG_NAME = "adapter_config.json"


def pattern_value(patterns: Mapping[str, Any], path: str, default: Any) -> tuple[Any, str | None]:
    """A module's value from a rank_pattern/alpha_pattern, PEFT's `get_pattern_key` rule.

    Returns (value, the matching key) or (default, None): the first key K in order for which
    `(.*\\.)?(K)$` matches the whole path (K is a regular expression).
    """
    for key in patterns:
        if matches(_key_pattern(key), path, mode="match", where=f"pattern key {key!r}"):
            return patterns[key], key
    return default, None


def _key_pattern(key: str) -> str:
    """The regular expression PEFT's get_pattern_key matches a rank_pattern / alpha_pattern key as."""
    return rf"(.*\.)?({key})$"


def targets(config: Mapping[str, Any], path: str) -> bool:
    """Whether PEFT's `target_modules` (minus `exclude_modules` and `modules_to_save`) selects the module `path`.

    A string is a regular expression full-matched against the path; a list selects a path equal
    to an entry, or ending in "." + entry within `layers_to_transform` (`_in_layers`). "all-linear" selects every linear layer and so cannot be
    judged from the adapter alone (True).
    """
    if excluded_from_targets(path, config.get("modules_to_save") or []):
        return False
    excluded = config.get("exclude_modules")
    if isinstance(excluded, str) and matches(excluded, path, mode="fullmatch", where="exclude_modules"):
        return False
    if isinstance(excluded, list) and any(path == e or path.endswith("." + e) for e in excluded):
        return False
    target = config.get("target_modules")
    if target == "all-linear" or target is None:
        return True
    if isinstance(target, str):
        return matches(target, path, mode="fullmatch", where="target_modules")
    if path in target:               # named in full: PEFT applies no layer restriction
        return True
    return any(path.endswith("." + t) for t in target) and _in_layers(config, path)


def _in_layers(config: Mapping[str, Any], path: str) -> bool:
    """PEFT's `layers_to_transform` rule (check_target_module_exists, list targets only): the path's
    layer index is the number after the first `<layers_pattern>.` (`(?:^|.*?\\.)P\\.(\\d+)\\.`, each
    pattern P in order, the first that matches), or without layers_pattern after the first
    `<prefix>.<name>.` (`.*?\\.[^.]*\\.(\\d+)\\.`: the first number, not an expert's further in);
    a path without one is not selected. An empty list selects every layer, as in PEFT."""
    wanted = config.get("layers_to_transform")
    if wanted is None or wanted == []:
        return True
    patterns = config.get("layers_pattern") or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    for regex_ in regexes:
        found = check_pattern(regex_, where="layers_pattern").match(path, timeout=MATCH_SECONDS)
        if found:
            index = int(found.group("idx"))
            return index == wanted if isinstance(wanted, int) else index in wanted
    return False


def feedforward(config: Mapping[str, Any], path: str) -> bool:
    """Whether IA3's `feedforward_modules` selects module `path` (its l scales the inputs), PEFT's
    `_check_target_module_feedforward`: a string is full-matched as a regular expression, a list
    selects a path that ends with an entry (a plain suffix test, without the "." that targets need)."""
    chosen = config.get("feedforward_modules")
    if isinstance(chosen, str):
        return matches(chosen, path, mode="fullmatch", where="feedforward_modules")
    return any(path.endswith(entry) for entry in chosen or [])


def peft_config(adapter: Adapter, *, save_projection: bool = True) -> dict[str, Any]:
    """The adapter_config.json PEFT needs to rebuild exactly `adapter`'s modules (see module docstring)."""
    if not adapter.modules:
        raise ConfigError("the adapter has no modules")
    if len(adapter.methods) != 1:
        raise ConfigError(f"PEFT stores one method per adapter: these modules mix {sorted(adapter.methods)}")
    spec = method_spec(adapter.method)
    if adapter.token_values is not None and spec.peft_type != "LORA":
        raise ConfigError(f"PEFT keeps trainable token rows beside LoRA only (LoraConfig.trainable_token_indices), "
                          f"not {spec.name}")
    modules = adapter.modules
    fan_in_fan_out = _one_value({p: m.fan_in_fan_out for p, m in modules.items()}, "fan_in_fan_out")
    config: dict[str, Any] = {k: adapter.config[k] for k in PASSTHROUGH if k in adapter.config}
    config.update(
        inference_mode=True,
        target_modules="(?:" + "|".join(re.escape(p) for p in sorted(modules)) + ")",
        fan_in_fan_out=fan_in_fan_out,
        bias=_bias_option(adapter, spec.peft_type),
    )
    if adapter.saved_modules:
        check_adapter_saved(modules, adapter.saved_modules, adapter.base_biases, source="the adapter")
        config["modules_to_save"] = written_entries(adapter.saved_modules)
    config.update(spec.peft_flags)
    if spec.peft_type == "IA3":          # no r, no bias option; feedforward_modules names the input-scaled layers
        if adapter.base_biases:
            raise ConfigError("PEFT's IA3 has no bias option: these trained base biases cannot be saved with it")
        del config["bias"]
        inputs = sorted(p for p, m in modules.items() if m.in_features is not None)
        config.update(peft_type="IA3", init_ia3_weights=True,
                      feedforward_modules="(?:" + "|".join(re.escape(p) for p in inputs) + ")" if inputs else [])
        return config
    if spec.peft_type == "VERA":
        if not save_projection and "projection_prng_key" not in adapter.config:
            raise ConfigError("save_projection=False needs Adapter.config['projection_prng_key'], the seed the "
                              "projections were drawn from")
        config.update(peft_type="VERA", r=_one_value({p: m.r for p, m in modules.items()}, "VeRA rank r"),
                      save_projection=save_projection,
                      projection_prng_key=int(adapter.config.get("projection_prng_key", 0)),
                      d_initial=adapter.config.get("d_initial", 0.1),
                      vera_dropout=adapter.config.get("vera_dropout", 0.0))
        return config
    if spec.peft_type in ("OFT", "BOFT"):      # no r or alpha: the row's config_options give the shape keys
        config.update(peft_type=spec.peft_type, **spec.config_options(modules, adapter.config))
        return config
    ranks = {p: m.r for p, m in modules.items()}
    alphas = {p: _plain_number(m.alpha) for p, m in modules.items()}
    r, alpha = _most_common(ranks), _most_common(alphas)
    if spec.peft_type in ("LOHA", "LOKR"):      # PEFT's LycorisConfig: no bias or fan_in_fan_out option
        if adapter.base_biases or fan_in_fan_out:
            raise ConfigError(f"PEFT's {spec.peft_type} has no bias or fan_in_fan_out option: these trained base "
                              "biases or transposed weights cannot be saved with it")
        del config["bias"], config["fan_in_fan_out"]
        config.update(peft_type=spec.peft_type, r=r, alpha=alpha, rank_pattern=_patterns(ranks, r),
                      alpha_pattern=_patterns(alphas, alpha), init_weights=True, rank_dropout=0.0,
                      module_dropout=0.0, use_effective_conv2d=False)
        config.update(spec.config_options(modules, adapter.config) if spec.config_options else {})
        return config
    has_bias = any(m.bias is not None for m in modules.values())
    if has_bias and config.get("use_dora"):
        raise ConfigError("PEFT does not support lora_bias with DoRA")
    config.update(peft_type="LORA", r=r, lora_alpha=alpha, rank_pattern=_patterns(ranks, r),
                  alpha_pattern=_patterns(alphas, alpha),
                  use_rslora=_one_value({p: m.rslora for p, m in modules.items()}, "rslora"),
                  lora_bias=has_bias, init_lora_weights=_init_lora_weights(adapter.config),
                  lora_dropout=adapter.config.get("lora_dropout", 0.0))
    if adapter.token_values is not None:          # the input embedding's rows (refpeft.model.trainable_tokens)
        config["trainable_token_indices"] = list(adapter.token_indices)
    return config


def read_config(path: Path) -> dict[str, Any]:
    return checked_config(read_json_object(path), source=path)


def checked_config(config: dict[str, Any], *, source: str | os.PathLike) -> dict[str, Any]:
    """An adapter_config.json's contents checked as `read_config` checks a file (defaults filled in place)."""
    path = source
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPES:
        raise ConfigError(f"{path}: peft_type {peft_type!r} is not supported; refpeft reads "
                          f"{', '.join(sorted(PEFT_TYPES))} adapters")
    # Each method's own flags (use_dora, ...) are options of its peft_type too.
    known = PEFT_TYPES[peft_type] | IGNORED_OPTIONS | {flag for m in peft_methods(peft_type) for flag in m.peft_flags}
    for option, value in config.items():
        if option in known or value in (None, False, [], {}):
            continue
        what = UNSUPPORTED_OPTIONS.get(option)
        raise ConfigError(f"{path}: option {option!r} = {value!r} is not supported"
                          + (f" ({what})" if what else " (not a PEFT 0.21 option refpeft knows)"))
    _check_config_values(config, path)
    return config


def _check_config_values(config: dict[str, Any], path: Path) -> None:
    def positive_int(name: str, value: Any) -> None:
        if type(value) is not int or value < 1:
            raise ConfigError(f"{path}: {name} must be a positive integer, got {_shown(value)}")

    def number(name: str, value: Any) -> None:
        if type(value) not in (int, float) or not _finite_float64(value):
            raise ConfigError(f"{path}: {name} must be a finite number within float64's range, got {_shown(value)}")

    def flag(name: str) -> None:
        if type(config.get(name, False)) is not bool:
            raise ConfigError(f"{path}: {name} must be true or false, got {config[name]!r}")

    if config["peft_type"] == "OFT":          # r = 0 with oft_block_size is PEFT's default; the tensors give both
        if config.get("coft") or config.get("num_cayley_neumann_terms", 5) != 5:
            raise ConfigError(f"{path}: refpeft reads OFT with coft false and num_cayley_neumann_terms 5, got "
                              f"coft={config.get('coft')!r}, num_cayley_neumann_terms={config.get('num_cayley_neumann_terms')!r}")
    else:
        positive_int("r", config.get("r", 8 if config["peft_type"] in ALPHA_KEYS else 256))
    for name in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "save_projection", "decompose_both"):
        flag(name)
    if config.get("modules_to_save") is not None:
        check_saved_entries(config["modules_to_save"], where=str(path))
        if config["modules_to_save"] and config.get("ensure_weight_tying"):
            raise ConfigError(f"{path}: ensure_weight_tying with modules_to_save (one trained embedding copy shared "
                              "with a tied output layer) is not supported; refpeft reads PEFT's default, "
                              "ensure_weight_tying false, where each saved module is a copy of its own")
    for name in ("target_modules", "exclude_modules"):
        value = config.get(name)
        if value is None:
            continue
        if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise ConfigError(f"{path}: {name} must be a string or a list of strings, got {value!r}")
        if isinstance(value, str):
            check_pattern(value, where=f"{path}: {name}")
    _check_layer_options(config, path)
    if config["peft_type"] in ALPHA_KEYS:
        config.setdefault("r", 8)
        config.setdefault(ALPHA_KEYS[config["peft_type"]], 8)
        number(ALPHA_KEYS[config["peft_type"]], config[ALPHA_KEYS[config["peft_type"]]])
        factor = config.get("decompose_factor", -1)
        if type(factor) is not int or not (factor == -1 or factor > 0):
            raise ConfigError(f"{path}: decompose_factor must be -1 or a positive integer, got {_shown(factor)}")
        for name, check in (("rank_pattern", positive_int), ("alpha_pattern", number)):
            patterns = config.get(name) or {}
            if not isinstance(patterns, dict):
                raise ConfigError(f"{path}: {name} must be an object, got {patterns!r}")
            for key, value in patterns.items():
                check_pattern(_key_pattern(key), where=f"{path}: {name} key {key!r}")
                check(f"{name}[{key!r}]", value)
        bias = config.get("bias", "none")
        if bias not in ("none", "lora_only", "all"):
            raise ConfigError(f"{path}: bias must be 'none', 'lora_only' or 'all', got {bias!r}")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
            raise ConfigError(
                f"{path}: init_lora_weights = {init!r} rewrites the base weights, so these A and B only apply "
                "to that rewritten base. Convert the adapter to a plain LoRA first with PEFT's "
                "save_pretrained(..., path_initial_model_for_weight_conversion=...) or refpeft's "
                "refpeft.methods.lora_init.convert_to_plain_lora")
        if config.get("lora_bias") and config.get("use_dora"):
            raise ConfigError(f"{path}: lora_bias with use_dora is not a combination PEFT supports")
    elif config["peft_type"] == "BOFT":           # no r: boft_R's shape gives factors, blocks and block size
        sizes = {n: config.get(n, d) for n, d in (("boft_block_size", 4), ("boft_block_num", 0))}
        if any(type(v) is not int or v < 0 for v in sizes.values()) or list(sizes.values()).count(0) != 1:
            raise ConfigError(f"{path}: BOFT needs exactly one of boft_block_size and boft_block_num, a positive "
                              f"integer (PEFT's BOFTConfig), got {sizes}")
        positive_int("boft_n_butterfly_factor", config.get("boft_n_butterfly_factor", 1))
        if config.get("bias", "none") not in ("none", "boft_only", "all"):
            raise ConfigError(f"{path}: bias must be 'none', 'boft_only' or 'all', got {config['bias']!r}")
    elif config["peft_type"] == "IA3":
        chosen = config.get("feedforward_modules")
        if chosen is not None and not (isinstance(chosen, str) or
                                       (isinstance(chosen, list) and all(isinstance(v, str) for v in chosen))):
            raise ConfigError(f"{path}: feedforward_modules must be a string or a list of strings, got {chosen!r}")
        if isinstance(chosen, str):
            check_pattern(chosen, where=f"{path}: feedforward_modules")
        target = config.get("target_modules")
        if isinstance(chosen, list) and isinstance(target, list) and not set(chosen) <= set(target):
            raise ConfigError(f"{path}: feedforward_modules {chosen!r} must be a subset of target_modules {target!r} "
                              "(PEFT refuses it too)")
    else:
        config.setdefault("r", 256)
        config.setdefault("save_projection", True)
        config.setdefault("projection_prng_key", 0)
        if type(config["projection_prng_key"]) is not int:
            raise ConfigError(f"{path}: projection_prng_key must be an integer, got {config['projection_prng_key']!r}")
        if config.get("bias", "none") not in ("none", "vera_only", "all"):
            raise ConfigError(f"{path}: bias must be 'none', 'vera_only' or 'all', got {config['bias']!r}")


def _check_layer_options(config: dict[str, Any], path: str | os.PathLike) -> None:
    """layers_to_transform (an int or a list of them) and layers_pattern (a string or a list of them),
    refused where PEFT's LoraConfig refuses them: with a regular-expression target_modules (which
    they would not restrict), and layers_pattern without layers_to_transform."""
    layers, pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    if layers is not None and not (type(layers) is int or (isinstance(layers, list) and
                                                            all(type(i) is int for i in layers))):
        raise ConfigError(f"{path}: layers_to_transform must be an integer or a list of integers, got {_shown(layers)}")
    if pattern is not None and not (isinstance(pattern, str) or (isinstance(pattern, list) and
                                                                 all(isinstance(p, str) for p in pattern))):
        raise ConfigError(f"{path}: layers_pattern must be a string or a list of strings, got {_shown(pattern)}")
    for name, value in (("layers_to_transform", layers), ("layers_pattern", pattern)):
        if value is not None and isinstance(config.get("target_modules"), str):
            raise ConfigError(f"{path}: {name} cannot be used when target_modules is a regular expression "
                              "(PEFT refuses it: the pattern alone selects the modules)")
    if pattern and layers is None:
        raise ConfigError(f"{path}: layers_pattern needs layers_to_transform (PEFT refuses it too)")


def _init_lora_weights(config: Mapping[str, Any]) -> bool | str:
    """True, or the PiSSA/OLoRA init the adapter records it was made with: PEFT then rewrites the
    original base the same way when it loads the file (refpeft.methods.lora_init). LoftQ's base is a
    quantised weight saved on its own, so its adapter is written as a plain LoRA on that base, as
    PEFT's LoftQ recipe saves it."""
    init = config.get("init_lora_weights", True)
    return init if isinstance(init, str) and init.lower().startswith(("pissa", "olora")) else True


def _finite_float64(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer past float64's range
        return False


def _shown(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: a message stays one readable line whatever the file holds."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def config_method(config: Mapping[str, Any], *, source: str | os.PathLike) -> Method:
    """The method table's row a config selects: a method of its peft_type whose flags the config
    sets as the method says, and no flag of another method of that type is set (use_dora)."""
    methods = peft_methods(config["peft_type"])
    flags = {flag for m in methods for flag in m.peft_flags}
    for spec in methods:
        if all(bool(config.get(flag)) == value for flag, value in spec.peft_flags.items()) and \
                all(not config.get(flag) or spec.peft_flags.get(flag) for flag in flags):
            return spec
    raise ConfigError(f"{source}: no refpeft method matches peft_type {config['peft_type']!r} with these options")


def _bias_option(adapter: Adapter, peft_type: str) -> str:
    if not adapter.base_biases:
        return "none"
    if set(adapter.base_biases) <= set(adapter.modules):
        return f"{peft_type.lower()}_only"                # PEFT's "lora_only", "vera_only"
    return "all"


def _one_value(values: dict[str, Any], name: str) -> Any:
    distinct = set(values.values())
    if len(distinct) != 1:
        raise ConfigError(f"PEFT stores one {name} per adapter, but the modules have {sorted(distinct)}")
    return distinct.pop()


def _most_common(values: dict[str, Any]) -> Any:
    return Counter(values.values()).most_common(1)[0][0]


def _plain_number(value: float) -> int | float:
    value = float(value)
    return int(value) if value.is_integer() else value


def _patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """{"^" + escaped full path: value} for the modules that differ from `default`.

    PEFT matches a key K as `re.match(r"(.*\\.)?(K)$", path)`, so a bare "a\\.q" also matches module
    "b.a.q"; the "^" inside the group only matches at the start of the path, so each key selects
    exactly its own module."""
    return {"^" + re.escape(p): values[p] for p in sorted(p for p, v in values.items() if v != default)}
