"""Where a PEFT adapter's tensors live and whether their shapes fit: key names, checks against
each other and PEFT's config (`check_adapter`), and against a base model's layers (`fit_to_base`,
which also regenerates VeRA's projections a file did not save). refpeft.peft_format reads and
writes the files with these."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Mapping

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.errors import RankError, ShapeError
from refpeft.methods import METHODS, method_spec
from refpeft.methods.linear import LinearShape
from refpeft.methods.loha import LOHA
from refpeft.methods.lokr import LOKR
from refpeft.methods.vera import VERA, largest_layer, vera_projections
from refpeft.peft_config import CONFIG_NAME, pattern_value
from refpeft.saved_modules import check_adapter_saved

PREFIX = "base_model.model."
ADAPTED_BIAS_SUFFIX = "base_layer.bias"
FACTORS = ("A", "B")   # a low-rank factor pair, (r, k) and (d, r); every other per-module tensor is 1-D
MATRICES = (*FACTORS, "l")   # ... but IA3's l, which keeps PEFT's (d, 1) / (1, k): its shape says which side it scales
MATRICES += (*LOHA.tensors, *LOKR.optional, "oft_R")   # and LoHa's and LoKr's factors and OFT's oft_R, all 2-D
MATRICES += ("boft_s",)   # BOFT's (d, 1) scale; its boft_R is (factors, blocks, H, H):
NDIM = {"boft_R": 4}


def tensor_key(path: str, field: str) -> str:
    """The PEFT file key of ModuleAdapter field `field` of module `path`."""
    return f"{PREFIX}{path}.{module_suffixes()[field]}"


def module_suffixes() -> dict[str, str]:
    """Every method's per-module tensor name -> key suffix, as the method table holds them now."""
    return {name: suffix for m in METHODS.values() for name, suffix in m.suffixes().items()}


def check_adapter(adapter: Adapter, *, config: Mapping[str, Any], source: str | os.PathLike) -> None:
    """Shapes and ranks of every module against each other and against `config` (PEFT's fields).

    Errors name `source` and the PEFT key of the offending tensor.
    """
    for path, m in adapter.modules.items():
        key = lambda field: f"{source}: {tensor_key(path, field)}"  # noqa: E731
        spec = m.spec
        for name, tensor in m.tensors.items():           # the factor pair is 2-D, every other tensor a vector
            _require_ndim(tensor, NDIM.get(name, 2 if name in MATRICES else 1), key(name))
        if set(FACTORS) <= set(m.tensors) and m.B.shape[1] != m.A.shape[0]:
            raise RankError(f"{key('B')} has shape {tuple(m.B.shape)}: its rank {m.B.shape[1]} disagrees "
                            f"with lora_A's {m.A.shape[0]}")
        expected_r, r_key = pattern_value(config.get("rank_pattern") or {}, path, config.get("r"))
        if "r" in config and expected_r != 0 and m.r != expected_r:   # IA3 has no rank; OFT's r = 0: from oft_block_size
            named = next((n for n in m.tensors if n not in spec.per_output), next(iter(m.tensors)))
            origin = f"rank_pattern[{r_key!r}]" if r_key is not None else "r"
            raise RankError(f"{key(named)} has rank {m.r} but {CONFIG_NAME} gives {origin} = {expected_r} for "
                            f"module {path!r} (shape {tuple(m.tensors[named].shape)})")
        d = m.out_features
        for name in spec.per_output:
            if name in m.tensors and name not in MATRICES:
                _require_shape(m.tensors[name], (d,), key(name), f"one value per output of the layer (d = {d})")
        if path in adapter.base_biases:
            _require_shape(adapter.base_biases[path], (d,), f"{source}: {PREFIX}{path}.{ADAPTED_BIAS_SUFFIX}",
                           f"one value per output of the layer (d = {d})")
    if adapter.shared:
        _check_projections(adapter, config["r"], source=source)
    check_adapter_saved(adapter.modules, adapter.saved_modules, adapter.base_biases, source=source)


def module_shape(module: ModuleAdapter) -> LinearShape | None:
    """(k, d) of an adapted layer as far as the adapter alone tells: VeRA files do not record k."""
    if module.A is not None:
        return LinearShape(k=module.A.shape[1], d=module.B.shape[0])
    if module.in_features is not None and module.out_features is not None:   # tensors that give both (LoHa, LoKr)
        return LinearShape(k=module.in_features, d=module.out_features)
    return None


def _check_projections(adapter: Adapter, r: int, *, source: str | os.PathLike,
                       shapes: Mapping[str, LinearShape] | None = None) -> None:
    A, B = adapter.vera_A, adapter.vera_B
    names = {f: f"{source}: {key}" for f, key in VERA.shared.items()}
    _require_ndim(A, 2, names["vera_A"])
    _require_ndim(B, 2, names["vera_B"])
    if A.shape[0] != r or B.shape[1] != r:
        raise RankError(f"{names['vera_A']} has shape {tuple(A.shape)} and vera_B {tuple(B.shape)}; "
                        f"{CONFIG_NAME} gives r = {r}, so expected (r, k_max) and (d_max, r)")
    for path, m in adapter.modules.items():
        if m.lambda_b.shape[0] > B.shape[0]:
            raise ShapeError(f"{names['vera_B']} has shape {tuple(B.shape)}: it covers {B.shape[0]} outputs, but "
                             f"{tensor_key(path, 'lambda_b')} has {m.lambda_b.shape[0]}")
        if shapes is not None and shapes[path].k > A.shape[1]:
            raise ShapeError(f"{names['vera_A']} has shape {tuple(A.shape)}: it covers {A.shape[1]} inputs, but "
                             f"module {path!r} has k = {shapes[path].k} in the base model")


def fit_to_base(adapter: Adapter, shapes: Mapping[str, LinearShape], *, source: str | os.PathLike,
                dtype: str | None = None) -> Adapter:
    """Check every module's sizes against the base model's layer sizes `shapes` (by module path)
    and regenerate a VeRA adapter's projections when the file did not save them (PEFT's
    `_find_dim`: k_max, d_max over the adapted layers; seed projection_prng_key). Errors name
    `source` and the key."""
    for path, m in adapter.modules.items():
        if path not in shapes:
            raise ShapeError(f"{source}: module {path!r} is adapted but the base model has no linear layer "
                             f"{path + '.weight'!r}")
        base = shapes[path]
        if m.in_features is None or m.out_features is None:   # the file does not record k (VeRA) or one side (IA3)
            named = next(n for n in (*m.spec.per_output, *m.spec.tensors) if n in m.spec.tensors)
            for size, wanted, side in ((m.out_features, base.d, "d = {} outputs"), (m.in_features, base.k, "k = {} inputs")):
                if size is not None and size != wanted:
                    raise ShapeError(f"{source}: {tensor_key(path, named)} has {size} entries but the base layer "
                                     f"has {side.format(wanted)}")
            continue
        if module_shape(m) != base:
            ours = module_shape(m)
            raise ShapeError(f"{source}: {', '.join(f'{tensor_key(path, n)} {tuple(t.shape)}' for n, t in m.tensors.items())} "
                             f"adapt a layer of k = {ours.k} inputs and d = {ours.d} outputs; "
                             f"the base layer {path + '.weight'!r} has k = {base.k}, d = {base.d}")
    if not method_spec(adapter.method).shared:
        return adapter
    r = adapter.config["r"]
    if adapter.vera_A is None:
        largest = largest_layer(shapes[p] for p in adapter.modules)
        vera_A, vera_B = vera_projections(largest, r, seed=adapter.config["projection_prng_key"],
                                          generator="torch-cpu", dtype=dtype or "float32")
        adapter = replace(adapter, vera_A=vera_A, vera_B=vera_B)
    _check_projections(adapter, r, source=source, shapes=shapes)
    return adapter


def _require_ndim(array: Any, ndim: int, where: str) -> None:
    if len(array.shape) != ndim:
        hint = " (only linear layers are supported; conv layers have 4-D factors)" if len(array.shape) == 4 else ""
        raise ShapeError(f"{where} has shape {tuple(array.shape)}, expected {ndim}-D{hint}")


def _require_shape(array: Any, shape: tuple[int, ...], where: str, what: str) -> None:
    if array is not None and tuple(array.shape) != shape:
        raise ShapeError(f"{where} has shape {tuple(array.shape)}, expected {shape}: {what}")
