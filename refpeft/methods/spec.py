"""A method's row in the method table: what the rest of refpeft needs to know about it, in one record.

A method module (refpeft.methods.lora, .dora, .vera) holds the math: init, forward -> (y, cache),
backward -> grads, delta weight, merge, unmerge, parameter count, in that order. It ends with one
`Method` record that says, declaratively, what file formats, checkpoint merging, fusion, the
exporter, the conformance families, the model and the demo need, and gives them the math through
one calling convention over a `ModuleAdapter` (refpeft.adapter):

    y, cache = method.forward(x, W0, module, shared=..., bias=..., dropout_mask=...)
    dx, grads = method.backward(dy, cache)          # grads: {tensor name: gradient}
    W = method.merge(W0, module, shared=...)        # W0 + delta in W0's layout

`shared` holds the adapter-wide frozen tensors a method may use (VeRA's projections, by name);
methods that have none ignore it. refpeft.methods (the package) lists the methods by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Method:
    """One method, as the rest of refpeft reads it."""

    name: str                          # "lora": the key of the method table and ModuleAdapter.method
    summary: str                       # one line for listings (`refpeft inspect`)
    peft_type: str | None              # PEFT's peft_type of its files ("LORA", "VERA"); None: refpeft-only (prediag, sora)
    peft_flags: Mapping[str, Any]      # adapter_config.json keys that select it within peft_type
    tensors: Mapping[str, str]         # per-module tensor name -> PEFT key suffix after "base_model.model.<p>."
    trainable: tuple[str, ...]         # the tensors training updates
    scaled: bool                       # whether alpha / r (rsLoRA: alpha / sqrt(r)) scales the branch
    mergeable: bool                    # whether the branch folds into the weight (merge/unmerge exist)
    onnx_branch: str                   # the exporter's builder for its unmerged branch (export/, by this key)
    rank: Callable[[Any], int]                                   # module -> r
    out_features: Callable[[Any], int]                           # module -> d
    in_features: Callable[[Any], int | None]                     # module -> k, None when the module alone cannot tell
    forward: Callable[..., tuple[Any, Any]]                      # (x, W0, module, *, shared, bias, dropout_mask, ...) -> (y, cache)
    backward: Callable[[Any, Any], tuple[Any, dict[str, Any]]]   # (dy, cache) -> (dx, {tensor: grad})
    delta_weight: Callable[..., Any]                             # (W0, module, *, shared) -> delta, W0's layout
    merge: Callable[..., Any]                                    # (W0, module, *, shared) -> W
    unmerge: Callable[..., Any]                                  # (W, module, *, shared, **state) -> W0
    parameter_count: Callable[..., int]                          # (k, d, module) -> trainable entries
    branch_values: Callable[..., tuple[Any, ...]]                # (W0, module, *, shared) -> the onnx_branch's swappable inputs
    # (W0 by module path, *, ranks, alphas, seed, generator, **options) -> (modules, shared, adapter config):
    # fresh modules for those layers, initialised as PEFT initialises them
    init_modules: Callable[..., tuple[dict, dict, dict]]
    per_output: tuple[str, ...] = ()                             # tensors (module or shared) whose axis 0 is the d outputs
    shared: Mapping[str, str] = field(default_factory=dict)      # adapter-wide frozen tensors -> PEFT key
    optional: Mapping[str, str] = field(default_factory=dict)    # per-module tensors a module may have -> PEFT key suffix
    # (b0, module, *, unmerge=False) -> the merged layer's bias, for a method whose merge changes it (IA3's output
    # scaling: l * b); None: merging leaves the bias alone
    merge_bias: Callable[..., Any] | None = None
    # (modules by path, the adapter's config) -> the adapter_config.json keys PEFT needs to rebuild these modules'
    # shapes (LoKr's decompose_both, decompose_factor); None: the table's fields say it all
    config_options: Callable[..., dict] | None = None

    @property
    def rescaled(self) -> bool:
        """Whether a per-row magnitude rescales the layer's whole output (DoRA's m / ||W0 + s B A||)."""
        return "magnitude" in self.tensors

    def suffixes(self) -> dict[str, str]:
        """Every per-module tensor name -> PEFT key suffix, required ones first."""
        return {**self.tensors, **self.optional}
