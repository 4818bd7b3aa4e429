"""Adapters as data: one module's trained tensors, and a named set of modules (a whole adapter).

A `ModuleAdapter` holds what one adapted linear layer learned, in PyTorch's layout, and says which
method it belongs to: `method` is a key of the method table (refpeft.methods.METHODS) and
`tensors` holds that method's per-module tensors by the names its table row gives (LoRA: A, B and
an optional bias; DoRA: A, B, magnitude; VeRA: lambda_d, lambda_b). `module.A` reads
`module.tensors["A"]`; an optional tensor the module lacks reads as None. An `Adapter` maps module
paths ("model.layers.0.q_proj") to them, so file formats (refpeft.peft_format), fusion
(refpeft.fusion), checkpoint merging and export all speak one type. Modules of one adapter may
mix methods (PEFT's LoRA files with DoRA on some modules only); each module says its own.
Besides the adapted modules an Adapter may carry trained base tensors: biases (`base_biases`,
PEFT's bias="lora_only"/"all"), whole modules trained in full (`saved_modules`, PEFT's
`modules_to_save`: refpeft.saved_modules) and chosen rows of the embedding (`token_indices`,
`token_values`: PEFT's trainable tokens, refpeft.model.trainable_tokens), which are also an adapter
on their own (no modules: PEFT's TRAINABLE_TOKENS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from refpeft.errors import ConfigError


@dataclass(frozen=True)
class ModuleAdapter:
    """One adapted linear layer: its method, its tensors by name, and its hyper-parameters."""

    method: str                       # a key of refpeft.methods.METHODS
    tensors: Mapping[str, Any]        # the method's tensors by name: A (r, k), B (d, r), magnitude (d,), ...
    alpha: float = 8.0                # scaled methods: s = alpha / r (alpha / sqrt(r) with rslora)
    rslora: bool = False
    fan_in_fan_out: bool = False
    rank: int | None = None           # the config's r, for methods whose tensors may not show it (LoKr, full factors)

    def __post_init__(self) -> None:
        spec = self.spec
        missing = [name for name in spec.tensors if self.tensors.get(name) is None]
        unknown = [name for name, value in self.tensors.items() if value is not None and name not in spec.suffixes()]
        if missing or unknown:
            raise ConfigError(f"a {self.method} module has tensors {', '.join(spec.tensors)}"
                              + (f" (optional: {', '.join(spec.optional)})" if spec.optional else "")
                              + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else ""))
        object.__setattr__(self, "tensors", {k: v for k, v in self.tensors.items() if v is not None})

    def __getattr__(self, name: str) -> Any:
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        from refpeft.methods import METHODS

        if any(name in m.suffixes() for m in METHODS.values()):
            return None                                  # a method's tensor this module does not have
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def spec(self) -> Any:
        """The method's row of the method table (refpeft.methods.spec.Method)."""
        from refpeft.methods import method_spec

        return method_spec(self.method)

    @property
    def r(self) -> int:
        return self.spec.rank(self)

    @property
    def out_features(self) -> int:
        """d, the adapted layer's outputs."""
        return self.spec.out_features(self)

    @property
    def in_features(self) -> int | None:
        """k, the adapted layer's inputs; None where the module's tensors do not tell (VeRA's)."""
        return self.spec.in_features(self)

    @property
    def scaling(self) -> float:
        """s = alpha / r (alpha / sqrt(r) with rsLoRA) for scaled methods; 1.0 for the others (VeRA)."""
        from refpeft.methods.lora import lora_scaling

        return lora_scaling(self.alpha, self.r, rslora=self.rslora) if self.spec.scaled else 1.0

    def replace(self, **tensors: Any) -> "ModuleAdapter":
        """The same module with some tensors replaced (a trained step, a cast)."""
        return ModuleAdapter(self.method, {**self.tensors, **tensors}, alpha=self.alpha, rslora=self.rslora,
                             fan_in_fan_out=self.fan_in_fan_out, rank=self.rank)


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
    # Fully trained copies of whole base modules (PEFT's modules_to_save), by the checkpoint name of each
    # tensor ("lm_head.weight", "model.norm.weight"): they replace the base's tensors (refpeft.saved_modules).
    saved_modules: dict[str, Any] = field(default_factory=dict)
    # Trainable tokens (PEFT's trainable_token_indices / TRAINABLE_TOKENS): the embedding's rows t_j are
    # replaced by token_values R (n, H), the rows' values (refpeft.model.trainable_tokens); None: no rows.
    token_indices: tuple[int, ...] = ()
    token_values: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_indices", tuple(int(i) for i in self.token_indices))
        if (self.token_values is None) != (not self.token_indices):
            raise ConfigError("trainable tokens need both their indices and their values (token_indices, token_values)")
        if self.token_values is not None and tuple(self.token_values.shape[:1]) != (len(self.token_indices),):
            raise ConfigError(f"{len(self.token_indices)} trainable token indices but values of shape "
                              f"{tuple(self.token_values.shape)}")

    @property
    def shared(self) -> dict[str, Any]:
        """The adapter-wide frozen tensors by name, as the methods' `shared` argument takes them."""
        return {name: value for name, value in (("vera_A", self.vera_A), ("vera_B", self.vera_B)) if value is not None}

    @property
    def saved_module_paths(self) -> list[str]:
        """The modules the saved tensors belong to ("lm_head" for "lm_head.weight"), sorted."""
        return sorted({name.rpartition(".")[0] for name in self.saved_modules})

    @property
    def methods(self) -> set[str]:
        """The methods its modules use (one for a PEFT file, possibly several for a mixed batch)."""
        return {m.method for m in self.modules.values()}

    @property
    def method(self) -> str:
        methods = self.methods
        return methods.pop() if len(methods) == 1 else "mixed"
