"""Many adapters over one frozen base: named adapters, the active one, and mixed batches.

A served model keeps one copy of its frozen weights and any number of adapters. For a layer with
frozen W0, b and an adapter named a (LoRA shown; DoRA and VeRA alike, through their own modules):

    active adapter a     y = x W0^T + b + s_a (x A_a^T) B_a^T             refpeft.methods.lora.lora_forward
    no adapter           y = x W0^T + b                                    the name "__base__", as in PEFT
    mixed batch          row j of the batch uses adapter names[j]:
                         y_j = x_j W0^T + b + s_{n_j} (x_j A_{n_j}^T) B_{n_j}^T

The mixed batch groups the rows by name (in order of first appearance), runs each group through
its method's forward (lora_forward, dora_forward, vera_forward: the registry adds no math of its
own), and puts the rows back in place with one gather. Nothing is merged: each row costs one base
product plus its own adapter's thin products, the work of PEFT's `_mixed_batch_forward` (which
computes the base once for the whole batch and adds each group's adapter output to its rows).
A "row" is an entry of the first axis, so a (batch, sequence, k) input gives each sequence one name.

Training on a mixed batch (`forward_with_cache` / `backward`): the loss is a sum over rows, so
each adapter's gradients come from its own rows only, and each group's backward is its method's
(lora_backward, dora_backward, vera_backward) on those rows:

    dL/dA_a = (gradients of lora_backward on the rows named a)      likewise dB_a, dmagnitude_a, ...
    dL/dx_j = the backward of row j's own layer                      base rows: dy_j W0

Choices:
- An adapter that does not adapt the layer at `path` leaves its rows with the base output (PEFT
  skips it the same way). An adapter's trained base bias (PEFT's bias="lora_only"/"all",
  Adapter.base_biases) replaces the frozen bias for its rows only.
- DoRA rows are allowed: DoRA's column norm does not depend on x, so rows stay independent
  (PEFT refuses DoRA in mixed batches; refpeft's result equals running each row alone).
- A LoRA module with its own bias (lora_bias=True) is refused: lora_forward has no adapter bias.
- The registry is a frozen value: `add`, `remove` and `activate` return a new registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.backend import from_numpy, namespace
from refpeft.errors import ConfigError, ShapeError
from refpeft.methods import method_spec
from refpeft.methods.linear import base_forward, base_input_grad, check_linear_inputs, flatten_rows

BASE = "__base__"
LAYER = "layer"   # the module path of a registry built for a single layer (`for_layer`)


@dataclass(frozen=True)
class MixedCache:
    """What `AdapterRegistry.backward` needs: each group's name, rows and its method's own cache."""

    groups: tuple[tuple[str, tuple[int, ...], Any], ...]   # (name, rows, cache or None for the base)
    method: dict[str, str]                                  # name -> "lora" / "dora" / "vera"
    x_shape: tuple[int, ...]
    W0: Any
    fan_in_fan_out: bool


@dataclass(frozen=True)
class MixedGrads:
    """dL/dx for the whole batch, and each adapter's gradients (its method's Grads) by name."""

    dx: Any                   # (..., k)
    adapters: dict[str, Any]  # name -> LoraGrads / DoraGrads / VeraGrads


@dataclass(frozen=True)
class AdapterRegistry:
    """Named adapters over one base model, and the name of the active one (BASE for none)."""

    adapters: Mapping[str, Adapter] = field(default_factory=dict)
    active: str = BASE

    @classmethod
    def for_layer(cls, modules: Mapping[str, ModuleAdapter]) -> "AdapterRegistry":
        """A registry over a single layer: each named module becomes an adapter of the path LAYER."""
        registry = cls()
        for name, module in modules.items():
            registry = registry.add(name, Adapter(modules={LAYER: module}))
        return registry

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.adapters)

    def add(self, name: str, adapter: Adapter) -> "AdapterRegistry":
        """A registry that also holds `adapter` under `name` (a new name, not BASE)."""
        if name == BASE:
            raise ConfigError(f"{BASE!r} is reserved for the base model without adapter")
        if name in self.adapters:
            raise ConfigError(f"an adapter named {name!r} is already registered; remove it first")
        for path, module in adapter.modules.items():
            if module.bias is not None:
                raise ConfigError(f"adapter {name!r}, layer {path}: a LoRA bias (lora_bias=True) is not supported")
        return replace(self, adapters={**self.adapters, name: adapter})

    def remove(self, name: str) -> "AdapterRegistry":
        """A registry without `name`; the base becomes active if `name` was."""
        self._require(name)
        rest = {n: a for n, a in self.adapters.items() if n != name}
        return replace(self, adapters=rest, active=BASE if self.active == name else self.active)

    def activate(self, name: str) -> "AdapterRegistry":
        """A registry whose active adapter is `name` (BASE for the plain base model)."""
        if name != BASE:
            self._require(name)
        return replace(self, active=name)

    def forward(self, x: Any, W0: Any, *, path: str = LAYER, bias: Any = None, fan_in_fan_out: bool = False,
                adapter_names: Sequence[str] | None = None) -> Any:
        """The layer at `path` on x (..., k): with the active adapter, or row by row with adapter_names.

        adapter_names: one name per entry of x's first axis (BASE for none), PEFT's mixed batch.
        """
        if adapter_names is None:
            y, _ = self._forward_one(self.active, x, W0, path=path, bias=bias, fan_in_fan_out=fan_in_fan_out)
            return y
        y, _ = self.forward_with_cache(x, W0, path=path, bias=bias, fan_in_fan_out=fan_in_fan_out,
                                       adapter_names=adapter_names)
        return y

    def forward_with_cache(self, x: Any, W0: Any, *, adapter_names: Sequence[str], path: str = LAYER,
                           bias: Any = None, fan_in_fan_out: bool = False) -> tuple[Any, MixedCache]:
        """The mixed-batch output and the cache `backward` needs (each group's own method cache)."""
        xp, _ = check_linear_inputs(x, W0, bias=bias, fan_in_fan_out=fan_in_fan_out)
        names = list(adapter_names)
        if len(x.shape) < 2 or len(names) != x.shape[0]:
            raise ShapeError(f"adapter_names has {len(names)} names for x of shape {tuple(x.shape)}: "
                             "give one name per entry of the first axis")
        for name in dict.fromkeys(names):
            if name != BASE:
                self._require(name)
        rows_of: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            rows_of.setdefault(name, []).append(row)
        outputs, groups, methods = [], [], {}
        for name, rows in rows_of.items():
            y_rows, cache = self._forward_one(name, _rows(x, rows, xp=xp), W0, path=path, bias=bias,
                                              fan_in_fan_out=fan_in_fan_out)
            outputs.append(y_rows)
            groups.append((name, tuple(rows), cache))
            if cache is not None:
                methods[name] = self.adapters[name].modules[path].method
        y = _restore_order(outputs, [g[1] for g in groups], xp=xp)
        return y, MixedCache(groups=tuple(groups), method=methods, x_shape=tuple(x.shape), W0=W0,
                             fan_in_fan_out=fan_in_fan_out)

    def backward(self, dy: Any, cache: MixedCache) -> MixedGrads:
        """dL/dx and every used adapter's gradients from dy = dL/dy of a mixed batch (module doc)."""
        xp = namespace(dy, cache.W0)
        if tuple(dy.shape[:-1]) != cache.x_shape[:-1]:
            raise ShapeError(f"dy has shape {tuple(dy.shape)}, expected ({', '.join(map(str, cache.x_shape[:-1]))}, d)")
        dxs, grads = [], {}
        for name, rows, method_cache in cache.groups:
            dy_rows = _rows(dy, rows, xp=xp)
            if method_cache is None:                                      # base rows: dx = dy W0
                dx = base_input_grad(flatten_rows(dy_rows, xp=xp), cache.W0, fan_in_fan_out=cache.fan_in_fan_out,
                                     xp=xp)
                dxs.append(xp.reshape(dx, (len(rows), *cache.x_shape[1:])))
            else:
                grads[name] = method_spec(cache.method[name]).backward(dy_rows, method_cache)
                dxs.append(grads[name].dx)
        return MixedGrads(dx=_restore_order(dxs, [g[1] for g in cache.groups], xp=xp), adapters=grads)

    def _forward_one(self, name: str, x: Any, W0: Any, *, path: str, bias: Any,
                     fan_in_fan_out: bool) -> tuple[Any, Any]:
        """The layer with adapter `name` (or the base) on all of x, and its method's cache (None: base)."""
        adapter = None if name == BASE else self._require(name)
        if adapter is None or path not in adapter.modules:
            xp, shape = check_linear_inputs(x, W0, bias=bias, fan_in_fan_out=fan_in_fan_out)
            y = base_forward(flatten_rows(x, xp=xp), W0, bias, fan_in_fan_out=fan_in_fan_out, xp=xp)
            return xp.reshape(y, (*x.shape[:-1], shape.d)), None
        m = adapter.modules[path]
        if m.fan_in_fan_out != fan_in_fan_out:
            raise ConfigError(f"adapter {name!r}, layer {path}: fan_in_fan_out={m.fan_in_fan_out} but the base "
                              f"weight is given with fan_in_fan_out={fan_in_fan_out}")
        b = adapter.base_biases.get(path, bias)
        return m.spec.forward(x, W0, m, shared=adapter.shared, bias=b)

    def _require(self, name: str) -> Adapter:
        if name not in self.adapters:
            known = ", ".join(self.adapters) or "none"
            raise ConfigError(f"no adapter named {name!r} (registered: {known}; {BASE!r} means no adapter)")
        return self.adapters[name]


def _rows(x: Any, rows: Sequence[int], *, xp: Any) -> Any:
    """x's entries `rows` along the first axis."""
    return xp.take(x, from_numpy(np.asarray(rows, dtype=np.int64), xp=xp, like=x), axis=0)


def _restore_order(parts: list[Any], rows: list[Sequence[int]], *, xp: Any) -> Any:
    """The groups' outputs concatenated, then gathered back into the batch's row order."""
    order = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
    back = from_numpy(np.argsort(order, kind="stable").astype(np.int64), xp=xp, like=parts[0])
    return xp.take(xp.concat(parts, axis=0), back, axis=0)
