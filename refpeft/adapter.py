"""Adapters as data: one module's trained tensors, and a named set of modules (a whole adapter).

A `ModuleAdapter` holds what one adapted linear layer learned, in PyTorch's layout, for any
method: LoRA (A, B), DoRA (A, B, magnitude) or VeRA (lambda_d, lambda_b; the shared projections
live once on the `Adapter`). An `Adapter` maps module paths ("model.layers.0.q_proj") to them,
so file formats (refpeft.peft_format), fusion (refpeft.fusion) and export all speak one type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from refpeft.lora import lora_scaling

METHODS = ("lora", "dora", "vera")


@dataclass(frozen=True)
class ModuleAdapter:
    """One adapted linear layer's trained tensors and hyper-parameters."""

    A: Any = None             # (r, k)  LoRA/DoRA
    B: Any = None             # (d, r)  LoRA/DoRA
    alpha: float = 8.0        # LoRA/DoRA: scaling alpha / r (or alpha / sqrt(r) with rslora)
    rslora: bool = False
    magnitude: Any = None     # (d,)    DoRA's m
    lambda_d: Any = None      # (r,)    VeRA
    lambda_b: Any = None      # (d,)    VeRA
    bias: Any = None          # (d,)    the adapter's own bias, added as s * bias (PEFT's lora_bias=True: lora_B.bias)
    fan_in_fan_out: bool = False

    @property
    def method(self) -> str:
        if self.lambda_d is not None:
            return "vera"
        return "dora" if self.magnitude is not None else "lora"

    @property
    def r(self) -> int:
        return int((self.A if self.A is not None else self.lambda_d).shape[0])

    @property
    def scaling(self) -> float:
        """s = alpha / r (alpha / sqrt(r) with rsLoRA); VeRA has no scaling (1.0)."""
        return 1.0 if self.method == "vera" else lora_scaling(self.alpha, self.r, rslora=self.rslora)


@dataclass(frozen=True)
class Adapter:
    """A named adapter: its modules by path, and for VeRA the shared projections."""

    modules: dict[str, ModuleAdapter]
    vera_A: Any = None        # (r, k_max) VeRA's shared frozen projection
    vera_B: Any = None        # (d_max, r)
    config: dict[str, Any] = field(default_factory=dict)  # the source's own config, kept for round trips
    # Trained biases that replace the frozen layers' own (PEFT's bias="lora_only"/"all"), by module
    # path; with "all" this includes modules without an adapter (layer norms, say).
    base_biases: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        methods = {m.method for m in self.modules.values()}
        return methods.pop() if len(methods) == 1 else "mixed"
