"""What HF PEFT 0.21 makes of a LoRA adapter_config.json on a given list of modules, module by module.

A converter or a serving engine reads an adapter_config.json and must decide, for each module of
the model, whether it carries an adapter and with which r, alpha and scaling. `resolve_modules`
states PEFT's answer with the rules of refpeft.peft_config (checked against PEFT itself by the
`adapter_config` conformance family):

    saved       modules_to_save wraps the module or a module around it: a dotted prefix of the
                path (the path itself included) ends with an entry, a plain string test
                (refpeft.saved_modules.saved_module)
    targeted    refpeft.peft_config.targets: target_modules (a regular expression full-matched,
                or a list of names matched at a "." boundary, restricted by layers_to_transform /
                layers_pattern), minus exclude_modules, minus modules_to_save's regex rule
    r, alpha    rank_pattern / alpha_pattern: the first key K in file order with
                re.match(r"(.*\\.)?(K)$", path), else the config's r / lora_alpha
    scaling     alpha / r, or alpha / sqrt(r) with use_rslora (float64)
    method      "dora" with use_dora, else "lora"
    lora_bias   whether lora_B carries a bias (the config's lora_bias)
    base_bias_trained  whether the base layer's bias trains: bias == "all", or bias == "lora_only"
                and the module is targeted

A config PEFT refuses (layers_to_transform with a regular expression, lora_bias with DoRA, no
module targeted, ...) raises ConfigError. The modules are assumed to be linear layers with a bias:
"all-linear" and a missing target_modules (PEFT's per-architecture defaults) need the model's
layer types and architecture, so they are refused here.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from refpeft.errors import ConfigError
from refpeft.methods.lora import lora_scaling
from refpeft.peft_config import checked_config, config_method, pattern_value, targets
from refpeft.saved_modules import saved_module


def resolve_modules(config: Mapping[str, Any], paths: Iterable[str], *,
                    source: str = "adapter_config.json") -> dict[str, dict[str, Any]]:
    """{path: the module's resolved settings} (module docstring) for a LoRA adapter_config.json."""
    config = checked_config(dict(config), source=source)
    if config["peft_type"] != "LORA":
        raise ConfigError(f"{source}: resolve_modules reads LoRA configs, got peft_type {config['peft_type']!r}")
    if config.get("target_modules") in (None, "all-linear"):
        raise ConfigError(f"{source}: target_modules {config.get('target_modules')!r} depends on the model's "
                          "layer types and architecture; name the modules or give a regular expression")
    method = config_method(config, source=source).name
    entries = config.get("modules_to_save") or []
    resolved = {}
    for path in paths:
        saved = saved_module(f"{path}.weight", entries) is not None
        targeted = targets(config, path)
        if saved and targeted:
            raise ConfigError(f"{source}: module {path!r} is both targeted and saved by modules_to_save")
        record: dict[str, Any] = {"targeted": targeted, "saved": saved}
        if targeted:
            r, _ = pattern_value(config.get("rank_pattern") or {}, path, config["r"])
            alpha, _ = pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"])
            record.update(method=method, r=r, alpha=alpha,
                          scaling=lora_scaling(alpha, r, rslora=config.get("use_rslora", False)),
                          lora_bias=bool(config.get("lora_bias", False)))
        if not saved:
            bias = config.get("bias", "none")
            record["base_bias_trained"] = bias == "all" or (bias == "lora_only" and targeted)
        resolved[path] = record
    if not any(record["targeted"] for record in resolved.values()):
        raise ConfigError(f"{source}: target_modules selects none of the {len(resolved)} modules (PEFT refuses "
                          "an adapter without a target)")
    return resolved
