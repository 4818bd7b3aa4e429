"""The model an exported graph computes: a stack of linear layers, each optionally adapted, with activations.

    h_0 = x                                            # (..., k_1)
    h_l = act(layer_l(h_{l-1}))    for l = 1 .. L-1
    y   = layer_L(h_{L-1})                             # (..., d_L)  no activation after the last layer

    layer_l(h) = h W_l^T + b_l + (the adapter's branch, when the adapter names layer l)

The branch is refpeft's own forward of the module's method (its table row's `forward`), evaluated in
float64: that is the reference every exported graph is checked against. A layer may hold its frozen
weight as NF4 (a refpeft.quant QuantState4bit): its `weight` is then refpeft's dequantised weight
(float32 values f32(code * absmax)), exactly what the 4-bit graph computes with, so the reference
of a 4-bit graph is refpeft's dequantised matmul (refpeft_onnx.nf4.quantize_stack builds these).

Base files: a safetensors file with `<layer>.weight` (d, k) and optional `<layer>.bias` (d,)
(PyTorch state-dict names; (k, d) for layers listed as fan_in_fan_out), and the layer order and
activation in its metadata under `refpeft.stack` (JSON `{"layers": [...], "activation": "relu",
"fan_in_fan_out": [...]}`), or given by the caller.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.backend import to_numpy
from refpeft.checkpoint import SafetensorsFile
from refpeft.errors import ConfigError, FormatError, ShapeError
from refpeft.io import metadata_json, require_float, write_safetensors
from refpeft.methods.linear import base_forward, linear_shape
from refpeft.quant import QuantState4bit, dequantize_blockwise_4bit, from_state_dict
from refpeft.quant.bnb_layout import quantized_prefixes
from refpeft.quant.state import absmax_values

# Activations between layers (ONNX Relu, Gelu with approximate="none", Tanh; identity adds no node).
ACTIVATIONS = ("relu", "gelu", "tanh", "identity")
STACK_METADATA_KEY = "refpeft.stack"


@dataclass(frozen=True)
class BaseLinear:
    """One frozen linear layer: y = x W^T + b."""

    name: str                     # module path, as the adapter names it ("layers.0")
    weight: np.ndarray            # (d, k); (k, d) with fan_in_fan_out. NF4: the dequantised weight
    bias: np.ndarray | None = None  # (d,)
    fan_in_fan_out: bool = False
    nf4: QuantState4bit | None = None  # the 4-bit weight (refpeft.quant), (d, k), NF4

    @property
    def k(self) -> int:
        return linear_shape(self.weight, fan_in_fan_out=self.fan_in_fan_out).k

    @property
    def d(self) -> int:
        return linear_shape(self.weight, fan_in_fan_out=self.fan_in_fan_out).d

    @property
    def weight_rows(self) -> np.ndarray:
        """W as (d, k), whatever the storage layout."""
        return self.weight.T if self.fan_in_fan_out else self.weight


@dataclass(frozen=True)
class LinearStack:
    """Layers applied in order, `activation` between consecutive layers."""

    layers: tuple[BaseLinear, ...]
    activation: str = "relu"

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("a stack needs at least one layer")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ConfigError(f"layer names must be unique, got {names}")
        for prev, nxt in zip(self.layers, self.layers[1:]):
            if prev.d != nxt.k:
                raise ShapeError(f"layer {prev.name!r} has {prev.d} outputs but {nxt.name!r} takes {nxt.k} inputs")

    @property
    def in_features(self) -> int:
        return self.layers[0].k

    @property
    def out_features(self) -> int:
        return self.layers[-1].d

    def layer(self, name: str) -> BaseLinear:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ConfigError(f"no layer named {name!r}; the stack has {[l.name for l in self.layers]}")


def single_layer(weight: Any, bias: Any = None, *, name: str = "linear", fan_in_fan_out: bool = False) -> LinearStack:
    """A one-layer stack (the shape of `refpeft demo`'s model)."""
    return LinearStack((BaseLinear(name, as_float64(weight), None if bias is None else as_float64(bias), fan_in_fan_out),))


def check_adapter(stack: LinearStack, adapter: Adapter | None) -> None:
    """Every adapted module must be a layer of the stack, with the layer's sizes and layout."""
    if adapter is None:
        return
    if adapter.saved_modules:
        raise ConfigError(f"the adapter saves whole modules ({', '.join(adapter.saved_module_paths)}, PEFT's "
                          "modules_to_save); ONNX export does not carry them")
    if adapter.token_values is not None:
        raise ConfigError("the adapter trains embedding rows (trainable tokens); ONNX export does not carry them")
    names = {layer.name for layer in stack.layers}
    unknown = sorted(set(adapter.modules) - names)
    if unknown:
        raise ConfigError(f"the adapter names module(s) {unknown} that are not layers of the base {sorted(names)}")
    for name, module in adapter.modules.items():
        layer = stack.layer(name)
        if module.fan_in_fan_out != layer.fan_in_fan_out:
            raise ConfigError(f"{name}: the adapter says fan_in_fan_out={module.fan_in_fan_out}, "
                              f"the base layer {layer.fan_in_fan_out}")
        k, d = module.in_features, module.out_features
        if (k is not None and k != layer.k) or (d is not None and d != layer.d):
            shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in module.tensors.items())
            raise ShapeError(f"{name}: {shapes} do not fit a layer with k = {layer.k} inputs and d = {layer.d} outputs")
        missing = [n for n in module.spec.shared if n not in adapter.shared]
        if missing:
            raise ConfigError(f"{name}: a {module.method} adapter needs its shared tensors {' and '.join(missing)}")
        if module.bias is not None:
            raise ConfigError(f"{name}: a LoRA bias (lora_bias=True) is not exported (refpeft's lora_forward has none)")


def with_trained_biases(stack: LinearStack, adapter: Adapter | None) -> LinearStack:
    """The stack with the adapter's trained base biases (PEFT's bias="lora_only"/"all") in place of the frozen ones."""
    if adapter is None or not adapter.base_biases:
        return stack
    names = {layer.name for layer in stack.layers}
    unknown = sorted(set(adapter.base_biases) - names)
    if unknown:
        raise ConfigError(f"the adapter trains biases of {unknown}, which are not layers of the base {sorted(names)}")
    layers = tuple(replace(layer, bias=as_float64(adapter.base_biases[layer.name])) if layer.name in adapter.base_biases
                   else layer for layer in stack.layers)
    return replace(stack, layers=layers)


def as_float64(a: Any) -> np.ndarray:
    """A float64 NumPy copy of any array (the oracle's precision)."""
    return np.asarray(to_numpy(a), dtype=np.float64)


def layer_forward(h: np.ndarray, layer: BaseLinear, module: ModuleAdapter | None, *,
                  shared: Mapping[str, Any] | None = None) -> np.ndarray:
    """One layer in float64 by refpeft's own forward of the module's method (the base alone if None)."""
    W, ffo = as_float64(layer.weight), layer.fan_in_fan_out
    b = None if layer.bias is None else as_float64(layer.bias)
    if module is None:
        y = base_forward(np.reshape(h, (-1, layer.k)), W, b, fan_in_fan_out=ffo, xp=np)
        return np.reshape(y, (*h.shape[:-1], layer.d))
    return module.spec.forward(h, W, as_float64_module(module), shared=as_float64_shared(shared), bias=b)[0]


def as_float64_module(module: ModuleAdapter) -> ModuleAdapter:
    """The module with every tensor as a float64 NumPy array."""
    return module.replace(**{name: as_float64(a) for name, a in module.tensors.items()})


def as_float64_shared(shared: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """An adapter's shared tensors as float64 NumPy arrays."""
    return {name: as_float64(a) for name, a in (shared or {}).items()}


def activation(h: np.ndarray, name: str) -> np.ndarray:
    """The activation in float64: relu max(h, 0); gelu h Phi(h) (erf form, ONNX Gelu approximate="none")."""
    if name == "relu":
        return np.maximum(h, 0.0)
    if name == "gelu":
        from scipy.special import erf

        return 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
    if name == "tanh":
        return np.tanh(h)
    return h


def reference_forward(stack: LinearStack, adapter: Adapter | None, x: Any) -> np.ndarray:
    """The stack's output in float64 (refpeft's forward per layer); adapter None gives the base model."""
    check_adapter(stack, adapter)
    stack = with_trained_biases(stack, adapter)
    h = as_float64(x)
    modules = {} if adapter is None else adapter.modules
    shared = {} if adapter is None else adapter.shared
    for i, layer in enumerate(stack.layers):
        h = layer_forward(h, layer, modules.get(layer.name), shared=shared)
        if i < len(stack.layers) - 1:
            h = activation(h, stack.activation)
    return h


def with_nf4(layer: BaseLinear, state: QuantState4bit) -> BaseLinear:
    """The layer computing with a given NF4 state (quantised here or read from a bitsandbytes file)."""
    if state.quant_type != "nf4":
        raise ConfigError(f"{layer.name}: only NF4 weights are exported, got {state.quant_type}")
    if tuple(state.shape) != (layer.d, layer.k) or layer.fan_in_fan_out:
        raise ConfigError(f"{layer.name}: the 4-bit state has shape {tuple(state.shape)}, expected (d, k) = "
                          f"({layer.d}, {layer.k})")
    W = dequantized_weight(state)
    return replace(layer, weight=W.astype(np.float64), nf4=state)


def dequantized_weight(state: QuantState4bit) -> np.ndarray:
    """float32 f32(code * absmax), (d, k): what both graph variants multiply by (before any float16 cast)."""
    return np.asarray(dequantize_blockwise_4bit(state.packed, absmax_values(state), shape=state.shape,
                                                quant_type="nf4", blocksize=state.blocksize))


def load_stack(path: str | Path, *, layers: list[str] | None = None, activation: str | None = None) -> LinearStack:
    """A base model from safetensors (see the module docstring for names and metadata).

    `layers` (the order) and `activation` override the file's metadata; without either, a file
    with exactly one `*.weight` is a single layer. Weights stored as bitsandbytes 4-bit state dicts
    (refpeft.quant.bnb_layout: `<layer>.weight` uint8 plus its absmax and quant_state record) are
    read as NF4 layers.
    """
    base = SafetensorsFile(path)     # the header only: each tensor is read when a layer needs it
    tensors = _MappedTensors(base)
    stored = stack_metadata(base.metadata, source=path)
    weights = sorted(name[: -len(".weight")] for name in base.keys() if name.endswith(".weight"))
    order = layers or stored.get("layers")
    if order is None:
        if len(weights) != 1:
            raise FormatError(f"{path}: {len(weights)} weights ({weights}) and no layer order in the metadata "
                              f"key {STACK_METADATA_KEY!r}; give the order (--layers)")
        order = weights
    missing = [name for name in order if f"{name}.weight" not in base]
    if missing:
        raise FormatError(f"{path}: no weight for layer(s) {missing}; the file has {weights}")
    quantized = set(quantized_prefixes(dict.fromkeys(base.keys())))
    states = {name: from_state_dict(tensors, prefix=f"{name}.weight", source=str(path))
              for name in order if f"{name}.weight" in quantized}
    transposed = set(stored.get("fan_in_fan_out", []))

    def float64(key: str) -> np.ndarray:  # float8, integer and bool tensors are refused by name
        return np.asarray(require_float(tensors[key], name=key, source=path), dtype=np.float64)

    def layer(name: str) -> BaseLinear:
        bias = None if f"{name}.bias" not in base else float64(f"{name}.bias")
        if name in states:
            return with_nf4(BaseLinear(name, np.zeros(states[name].shape), bias), states[name])
        return BaseLinear(name, float64(f"{name}.weight"), bias, fan_in_fan_out=name in transposed)

    built = tuple(layer(name) for name in order)
    try:
        return LinearStack(built, activation=activation or stored.get("activation", "relu"))
    except (ConfigError, ShapeError) as error:
        if not layers:
            raise
        # Every layer given is in the file (checked above): what is wrong is the order --layers gives.
        raise type(error)(f"{path}: {error}; {_layers_hint(order, stored.get('layers') or weights)}") from None


def _layers_hint(order: list[str], file_layers: list[str]) -> str:
    """What an order given by --layers did to the file's layers: named one twice, left some out, or reordered them."""
    given = f"--layers {','.join(order)}"
    twice = sorted({name for name in order if order.count(name) > 1})
    left_out = [name for name in file_layers if name not in order]
    if twice:
        return f"{given} names {', '.join(twice)} more than once"
    if left_out:
        return f"{given} leaves out {', '.join(left_out)} (the file's layers, in order: {','.join(file_layers)})"
    return f"{given} reorders the file's layers ({','.join(file_layers)})"


class _MappedTensors(Mapping):
    """A safetensors file as a read-only mapping whose values are read (memory-mapped) on access."""

    def __init__(self, base: SafetensorsFile):
        self.base = base

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.base:
            raise KeyError(key)
        return self.base.read(key)

    def __iter__(self):
        return iter(self.base.keys())

    def __len__(self) -> int:
        return len(self.base.tensors)


def stack_metadata(metadata: Mapping[str, str], *, source: str | os.PathLike) -> dict[str, Any]:
    """The `refpeft.stack` metadata of a base file ({} when absent); FormatError naming the file and
    the value when it is not JSON or does not have the documented form."""
    if STACK_METADATA_KEY not in metadata:
        return {}
    stored = metadata_json(metadata, STACK_METADATA_KEY, source=source)
    where = f"{source}: metadata {STACK_METADATA_KEY!r}"
    if not isinstance(stored, dict):
        raise FormatError(f"{where} must be a JSON object, got {type(stored).__name__}")
    for key in ("layers", "fan_in_fan_out"):
        value = stored.get(key, [])
        if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
            raise FormatError(f"{where}: {key} must be a list of layer names, got {value!r}")
    activation = stored.get("activation", "relu")
    if activation not in ACTIVATIONS:
        raise FormatError(f"{where}: activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    return stored


def save_stack(path: str | Path, stack: LinearStack) -> Path:
    """Write a base model as safetensors (weights in their own dtype and layout), order in the metadata."""
    tensors: dict[str, np.ndarray] = {}
    for layer in stack.layers:
        tensors[f"{layer.name}.weight"] = layer.weight
        if layer.bias is not None:
            tensors[f"{layer.name}.bias"] = layer.bias
    meta = {STACK_METADATA_KEY: json.dumps({"layers": [l.name for l in stack.layers], "activation": stack.activation,
                                            "fan_in_fan_out": [l.name for l in stack.layers if l.fan_in_fan_out]})}
    return write_safetensors(path, tensors, metadata=meta)
