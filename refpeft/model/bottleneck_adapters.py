"""Bottleneck adapters in the decoder: where the adapters library puts them in a Llama, forward and backward.

The math of one adapter and its two placements is refpeft.methods.bottleneck. In a Llama decoder
layer (adapters 1.3, models/llama/modeling_llama.py, `LlamaDecoderLayerWithAdapters.forward`),
the adapter layers replace the two residual additions (letters of refpeft.model.decoder):

    e = e + o_proj(attention(...))      ->  e = block(o_proj(...), e)   "model.layers.{i}.attention_adapters"
    e = e + down_proj(swiglu(...))      ->  e = block(down_proj(...), e)  "model.layers.{i}.output_adapters"

where block(o, r) is A(o) + r (Houlsby) or A(o + r) (Pfeiffer), `methods.bottleneck.block_forward`;
an addition with no adapter (Pfeiffer's attention, a layer in leave_out) stays e + o. Backward
pops the block's cache and returns (dr, do): the gradient into the residual stream and into the
sub-block's output (both de for a plain addition).

Tensor names are the adapters library's, less its adapter name:
"model.layers.{i}.output_adapters.adapter_down.0.weight" for its
"model.layers.{i}.output_adapters.adapters.<name>.adapter_down.0.weight"; gradients are returned
under the same names. The base is frozen (the library's train_adapter freezes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from refpeft.errors import ConfigError
from refpeft.methods.bottleneck import (TENSORS, BottleneckConfig, BottleneckParams, block_backward, block_forward,
                                        bottleneck_init, bottleneck_size)

LOCATIONS = {"attention": "attention_adapters", "output": "output_adapters"}


@dataclass(frozen=True)
class BottleneckAdapters:
    """One bottleneck adapter setup: its config and each placed adapter's tensors by module path."""

    config: BottleneckConfig
    modules: Mapping[str, BottleneckParams]     # "model.layers.0.output_adapters" -> its tensors

    def tensors(self) -> dict[str, Any]:
        """Every tensor by its full name (module docstring)."""
        return {f"{path}.{TENSORS[field]}": getattr(params, field)
                for path, params in self.modules.items() for field in TENSORS}


def adapter_paths(num_layers: int, config: BottleneckConfig) -> list[str]:
    """The module paths the config places an adapter at, in model order."""
    wanted = [LOCATIONS["attention"]] * config.mh_adapter + [LOCATIONS["output"]] * config.output_adapter
    return [f"model.layers.{i}.{name}" for i in range(num_layers) if i not in config.leave_out for name in wanted]


def init_bottleneck_adapters(num_layers: int, hidden: int, config: BottleneckConfig, *,
                             seed: int = 0) -> BottleneckAdapters:
    """Fresh adapters at every place the config names (methods.bottleneck.bottleneck_init, one seed pair each)."""
    paths = adapter_paths(num_layers, config)
    return BottleneckAdapters(config, {path: bottleneck_init(hidden, config, seed=seed + 2 * j)
                                       for j, path in enumerate(paths)})


def bottleneck_adapters(config: BottleneckConfig, tensors: Mapping[str, Any], *, num_layers: int,
                        hidden: int) -> BottleneckAdapters:
    """Adapters from tensors by full name; ConfigError unless they are exactly the config's places
    with (m, H) shapes for this model."""
    paths = adapter_paths(num_layers, config)
    expected = {f"{path}.{suffix}" for path in paths for suffix in TENSORS.values()}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise ConfigError(f"the bottleneck tensors do not fit the config: unexpected {extra[:3]}, "
                          f"missing {missing[:3]}")
    m = bottleneck_size(hidden, config)
    shapes = {"W_down": (m, hidden), "b_down": (m,), "W_up": (hidden, m), "b_up": (hidden,)}
    for name, array in tensors.items():
        field = next(f for f, suffix in TENSORS.items() if name.endswith(f".{suffix}"))
        if tuple(array.shape) != shapes[field]:
            raise ConfigError(f"{name} has shape {tuple(array.shape)}, expected {shapes[field]} (H = {hidden}, "
                              f"reduction_factor {config.reduction_factor})")
    return BottleneckAdapters(config, {path: BottleneckParams(**{f: tensors[f"{path}.{s}"] for f, s in TENSORS.items()})
                                       for path in paths})


def residual_add(adapters: BottleneckAdapters | None, layer: str, location: str, r: Any, o: Any,
                 entries: list) -> Any:
    """r + o, or the adapter block at `layer`'s `location` ("attention", "output") when there is one;
    the block's cache goes onto the tape."""
    path = f"{layer}.{LOCATIONS[location]}"
    if adapters is None or path not in adapters.modules:
        return r + o
    e, cache = block_forward(o, r, adapters.modules[path], adapters.config)    # DTypeError unless r's dtype
    entries.append((f"bottleneck:{path}", cache))
    return e


def residual_add_backward(de: Any, entries: list, grads: dict) -> tuple[Any, Any]:
    """(dr, do) of the addition whose adapter entry, if any, is on top of the tape; the adapter's
    gradients go into grads by full name."""
    if not entries or not entries[-1][0].startswith("bottleneck:"):
        return de, de
    kind, cache = entries.pop()
    path = kind.split(":", 1)[1]
    do, dr, g = block_backward(de, cache)
    for field, suffix in TENSORS.items():
        grads[f"{path}.{suffix}"] = g[field]
    return dr, do
