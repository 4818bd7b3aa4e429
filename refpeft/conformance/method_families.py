"""Conformance families for the methods past LoRA, DoRA and VeRA, made by one code path over the method table.

Each entry of `METHOD_CONFORMANCE` (IA3, LoHa, LoKr, OFT, AdaLoRA) gives three families,
`<method>_forward`, `<method>_backward` and `<method>_merge`. A case draws, from PCG64 seeded
with its seed, in this order: x (..., k), W0 (d, k), [bias (d)], the module's tensors by the
names of the method's table row (`Method.tensors` / `optional`: `l`, `hada_w1_a`, `lokr_w2_b`,
`oft_R`, `lora_E`, ...), [dropout_mask (..., k)], [dy (..., d)]. The expected results come from
the row itself on ExactArray inputs (every reduction correctly rounded, refpeft.conformance.exact):

    forward   y, _ = row.forward(x, W0, module, bias=..., dropout_mask=...)
    backward  dx and d<name> for each trainable tensor the module has (and dbias when a bias is
              given: it counts as trainable), from row.backward(dy, cache): L = sum(y * dy)
    merge     W = row.merge(W0, module), in W0's (d, k) layout

and the bounds from the method module's own `*_bound` functions in the case's precision (plus
refpeft's float64 error), each covering refpeft's order and PEFT's. A scaled method records the
scale its row applies as `parameters.scaling` (LoHa's is alpha / r rounded to float32, as PEFT
holds it; AdaLoRA's c / (ranknum + 1e-5) with ranknum = r).

A new method joins with one `MethodConformance` entry (its row, a function drawing its tensors, and
its module's bounds in the calling convention below) and a line of `method_cases`; the families, the
runners (refpeft_self, peft_torch's `peft_methods`) and the tests pick it up from the entry. AdaLoRA's row is not in refpeft.methods.METHODS yet
(refpeft.methods.adalora says why), so its module is a plain record of the attributes its row reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from refpeft.adapter import ModuleAdapter
from refpeft.conformance.case import Case, Family, Vectors, draw, exact_inputs, plain_results
from refpeft.methods import METHODS
from refpeft.methods.adalora import ADALORA, adalora_backward_bound, adalora_forward_bound, adalora_merge_bound, \
    adalora_scaling
from refpeft.methods.ia3 import ia3_backward_bound, ia3_forward_bound, ia3_l_shape, ia3_merge_bound
from refpeft.methods.linear import LinearShape, dropout_mask
from refpeft.methods.loha import FACTOR_NAMES as LOHA_FACTORS, loha_backward_bound, loha_forward_bound, \
    loha_merge_bound, loha_scaling
from refpeft.methods.lokr import lokr_backward_bound, lokr_forward_bound, lokr_layout, lokr_merge_bound
from refpeft.methods.oft_bounds import oft_backward_bound, oft_forward_bound, oft_merge_bound
from refpeft.methods.spec import Method


@dataclass(frozen=True)
class MethodConformance:
    """One method's cases: its table row, its tensors' draw, and its bounds in one calling convention.

    draw(case, rng) -> the module's tensors by table name, in the case's dtype
    scaling(case) -> the scale the row applies (None for unscaled methods)
    forward_bound(x, W0, tensors, case, *, bias, dropout_mask, dtype) -> bound on y
    backward_bound(dy, x, W0, tensors, case, *, dropout_mask, bias_trainable, dtype) -> {dx, d<name>, dbias}
    merge_bound(W0, tensors, case, *, dtype) -> bound on W
    """

    row: Method
    draw: Callable[[Case, np.random.Generator], dict[str, np.ndarray]]
    scaling: Callable[[Case], float | None]
    forward_bound: Callable[..., Any]
    backward_bound: Callable[..., Any]
    merge_bound: Callable[..., Any]

    def module(self, tensors: dict[str, Any], case: Case) -> Any:
        """The row's module over `tensors` (a ModuleAdapter when the row is in the method table)."""
        alpha, rank = case.options.get("alpha", 8.0), case.sizes.get("r")
        if METHODS.get(self.row.name) is self.row:
            return ModuleAdapter(self.row.name, tensors, alpha=alpha, rank=rank)
        return SimpleNamespace(**tensors, tensors=tensors, alpha=alpha, rank=rank, fan_in_fan_out=False)


# ---------------------------------------------------------------- the methods' draws

def _ia3_tensors(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """l in [1/2, 3/2): (1, k) with options.feedforward (input scaling), else (d, 1)."""
    shape = ia3_l_shape(LinearShape(k=case.sizes["k"], d=case.sizes["d"]), feedforward=case.options["feedforward"])
    return {"l": (rng.random(shape) + 0.5).astype(case.dtype)}


def _loha_tensors(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    d, k, r = case.sizes["d"], case.sizes["k"], case.sizes["r"]
    return {name: draw(rng, (d, r) if name.endswith("_a") else (r, k), dtype=case.dtype, scale=0.5)
            for name in LOHA_FACTORS}


def _lokr_tensors(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The factors PEFT builds for (k, d, r, options.decompose_both): each full or a low-rank pair."""
    s = case.sizes
    lay = lokr_layout(s["k"], s["d"], s["r"], decompose_both=case.options.get("decompose_both", False))
    tensors = {}
    for i, (shape, low) in (("1", (lay.w1, lay.w1_low_rank)), ("2", (lay.w2, lay.w2_low_rank))):
        parts = {"_a": (shape[0], s["r"]), "_b": (s["r"], shape[1])} if low else {"": shape}
        tensors.update({f"lokr_w{i}{suffix}": draw(rng, sub, dtype=case.dtype, scale=0.5)
                        for suffix, sub in parts.items()})
    return tensors


def _oft_tensors(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """oft_R (k / b, b (b - 1) / 2), b = sizes.block_size; small entries, where the Neumann series converges."""
    b = case.sizes["block_size"]
    return {"oft_R": draw(rng, (case.sizes["k"] // b, b * (b - 1) // 2), dtype=case.dtype, scale=0.125)}


def _adalora_tensors(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """lora_A (r, k), lora_E (r, 1) with the triplets in options.pruned set to 0 (the rank mask), lora_B (d, r)."""
    d, k, r = case.sizes["d"], case.sizes["k"], case.sizes["r"]
    A = draw(rng, (r, k), dtype=case.dtype, scale=0.25)
    E = draw(rng, (r, 1), dtype=case.dtype)
    E[case.options.get("pruned", []), 0] = 0
    return {"lora_A": A, "lora_E": E, "lora_B": draw(rng, (d, r), dtype=case.dtype, scale=0.5)}


def _loha_scaling(case: Case) -> float:
    return loha_scaling(case.options["alpha"], case.sizes["r"])


def _lokr_scaling(case: Case) -> float:
    return case.options["alpha"] / case.sizes["r"]


def _adalora_scaling(case: Case) -> float:
    return adalora_scaling(case.options["alpha"], float(case.sizes["r"]), case.sizes["r"])


def _unscaled(case: Case) -> None:
    return None


def _conformance(row: Method, draw: Callable[[Case, np.random.Generator], dict[str, np.ndarray]],
                 factors: Callable[[dict[str, Any]], tuple[Any, ...]], forward: Callable[..., Any],
                 backward: Callable[..., Any], merge: Callable[..., Any], *,
                 scaling: Callable[[Case], float] | None = None, dropout: bool = False) -> MethodConformance:
    """The entry whose bounds are the method's own, called as

        forward(x, W0, *factors(t), [scaling], [dropout_mask], bias, dtype)
        backward(dy, x, W0, *factors(t), [scaling], [dropout_mask], bias_trainable, dtype)
        merge(W0, *factors(t), [scaling], dtype)

    with scaling=scaling(case) for a scaled method and the case's dropout_mask where `dropout`."""
    def extra(case: Case, kw: dict[str, Any], *, masked: bool) -> dict[str, Any]:
        scaled = {} if scaling is None else {"scaling": scaling(case)}
        return {**scaled, "dropout_mask": kw["dropout_mask"]} if dropout and masked else scaled

    return MethodConformance(
        row, draw, scaling or _unscaled,
        lambda x, W0, t, case, **kw: forward(x, W0, *factors(t), **extra(case, kw, masked=True), bias=kw["bias"],
                                             dtype=kw["dtype"]),
        lambda dy, x, W0, t, case, **kw: backward(dy, x, W0, *factors(t), **extra(case, kw, masked=True),
                                                  bias_trainable=kw["bias_trainable"], dtype=kw["dtype"]),
        lambda W0, t, case, **kw: merge(W0, *factors(t), **extra(case, kw, masked=False), dtype=kw["dtype"]))


METHOD_CONFORMANCE: dict[str, MethodConformance] = {m.row.name: m for m in (
    _conformance(METHODS["ia3"], _ia3_tensors, lambda t: (t["l"],), ia3_forward_bound, ia3_backward_bound,
                 ia3_merge_bound),
    _conformance(METHODS["loha"], _loha_tensors, lambda t: tuple(t[name] for name in LOHA_FACTORS),
                 loha_forward_bound, loha_backward_bound, loha_merge_bound, scaling=_loha_scaling),
    _conformance(METHODS["lokr"], _lokr_tensors, lambda t: (t,), lokr_forward_bound, lokr_backward_bound,
                 lokr_merge_bound, scaling=_lokr_scaling),
    _conformance(METHODS["oft"], _oft_tensors, lambda t: (t["oft_R"],), oft_forward_bound, oft_backward_bound,
                 oft_merge_bound),
    _conformance(ADALORA, _adalora_tensors, lambda t: (t["lora_A"], t["lora_E"], t["lora_B"]),
                 adalora_forward_bound, adalora_backward_bound, adalora_merge_bound, scaling=_adalora_scaling,
                 dropout=True),
)}


# ---------------------------------------------------------------- the generic families

def method_inputs(case: Case) -> tuple[MethodConformance, dict[str, np.ndarray], list[str]]:
    """The method's entry, the case's inputs (module docstring's order) and the module's tensor names."""
    method, direction = case.family.rsplit("_", 1)
    entry = METHOD_CONFORMANCE[method]
    s, o = case.sizes, case.options
    rng = np.random.default_rng(case.seed)
    batch, k, d = tuple(s.get("batch", ())), s["k"], s["d"]
    inputs = {"x": draw(rng, (*batch, k), dtype=case.dtype), "W0": draw(rng, (d, k), dtype=case.dtype, scale=0.25)}
    if o.get("bias", False):
        inputs["bias"] = draw(rng, (d,), dtype=case.dtype)
    tensors = entry.draw(case, rng)
    inputs.update(tensors)
    if o.get("dropout", 0.0):
        inputs["dropout_mask"] = dropout_mask((*batch, k), o["dropout"], seed=case.seed, dtype=case.dtype)
    if direction == "backward":
        inputs["dy"] = draw(rng, (*batch, d), dtype=case.dtype)
    if direction == "merge":
        inputs = {name: a for name, a in inputs.items() if name not in ("x", "bias", "dropout_mask")}
    return entry, inputs, list(tensors)


def method_results(case: Case, inputs: dict[str, Any]) -> dict[str, Any]:
    """Run the method's table row on a case's inputs (any float arrays): y, the gradients, or W."""
    entry = METHOD_CONFORMANCE[case.family.rsplit("_", 1)[0]]
    direction, row = case.family.rsplit("_", 1)[1], entry.row
    tensors = {name: inputs[name] for name in row.suffixes() if name in inputs}
    module = entry.module(tensors, case)
    if direction == "merge":
        return {"W": row.merge(inputs["W0"], module)}
    common = dict(bias=inputs.get("bias"), dropout_mask=inputs.get("dropout_mask"))
    if direction == "forward":
        return {"y": row.forward(inputs["x"], inputs["W0"], module, **common)[0]}
    trainable = "bias" in inputs
    _, cache = row.forward(inputs["x"], inputs["W0"], module, bias_trainable=trainable, **common)
    g = row.backward(inputs["dy"], cache)
    grads = ["dx", *(f"d{name}" for name in row.trainable if name in tensors), *(["dbias"] if trainable else [])]
    return {name: getattr(g, name) for name in grads}


def method_vectors(case: Case) -> Vectors:
    """Expected results (`method_results` on ExactArray inputs) and bounds of a `<method>_<direction>` case."""
    entry, inputs, names = method_inputs(case)
    direction = case.family.rsplit("_", 1)[1]
    e = exact_inputs(inputs)
    expected = plain_results(method_results(case, e))
    tensors, dtype = {name: e[name] for name in names}, case.dtype
    scaling = entry.scaling(case)
    parameters = {} if scaling is None else {"scaling": scaling}
    if direction == "merge":
        bounds = {"W": entry.merge_bound(e["W0"], tensors, case, dtype=dtype)}
    elif direction == "forward":
        bounds = {"y": entry.forward_bound(e["x"], e["W0"], tensors, case, bias=e.get("bias"),
                                           dropout_mask=e.get("dropout_mask"), dtype=dtype)}
    else:
        bounds = entry.backward_bound(e["dy"], e["x"], e["W0"], tensors, case, dropout_mask=e.get("dropout_mask"),
                                      bias_trainable="bias" in inputs, dtype=dtype)
    return Vectors(inputs, expected, plain_results({name: bounds[name] for name in expected}), parameters)


def manifest_case(manifest: dict[str, Any]) -> Case:
    """The Case a manifest was made from (what a runner needs to call `method_results`)."""
    return Case(manifest["case"], manifest["family"], manifest["dtype"], manifest["seed"], manifest["sizes"],
                manifest["options"])


_SUMMARIES = {
    "forward": "y = the method's layer on x (W0, [bias], the module's tensors by PEFT name; see "
               "conformance/README.md \"Methods past LoRA\")",
    "backward": "dx and d<tensor> of every trainable tensor (and dbias when a bias is given) of sum(y * dy), y as "
                "the method's forward",
    "merge": "W = W0 with the method's update folded in, W0's (d, k) layout",
}

METHOD_FAMILIES: tuple[Family, ...] = tuple(
    Family(f"{name}_{direction}", name, f"{entry.row.name}: {summary}", method_vectors)
    for name, entry in METHOD_CONFORMANCE.items() for direction, summary in _SUMMARIES.items())


def method_cases() -> list[Case]:
    """Every method in both precisions: forward, backward (with a bias) and merge of each variant."""
    small = {"batch": [2, 3], "k": 32, "d": 24}
    variants = [
        ("ia3", "output", small, {"feedforward": False, "bias": True}),
        ("ia3", "input", small, {"feedforward": True, "bias": True}),
        ("loha", "basic", {**small, "r": 4}, {"alpha": 8.0, "bias": True}),
        ("lokr", "full", {**small, "r": 4}, {"alpha": 8.0, "bias": True}),
        ("lokr", "low-rank-w2", {**small, "r": 2}, {"alpha": 4.0, "bias": True}),
        ("lokr", "decompose-both", {**small, "r": 1}, {"alpha": 2.0, "decompose_both": True, "bias": True}),
        ("oft", "neumann", {**small, "block_size": 4}, {"bias": True}),
        ("adalora", "pruned", {**small, "r": 4}, {"alpha": 8.0, "pruned": [1], "bias": True}),
        ("adalora", "pruned-dropout", {**small, "r": 4}, {"alpha": 8.0, "pruned": [0, 2], "dropout": 0.25}),
    ]
    cases = []
    for seed, (method, label, sizes, options) in enumerate(variants, start=1200):
        for dtype in ("float32", "float64"):
            for direction in ("forward", "backward", "merge"):
                if direction == "merge":
                    if "dropout" in options:
                        continue
                    merge_sizes = {key: v for key, v in sizes.items() if key != "batch"}
                    merge_options = {key: v for key, v in options.items() if key != "bias"}
                    cases.append(Case(f"{method}-merge-{label}-{dtype}", f"{method}_merge", dtype, seed, merge_sizes,
                                      merge_options))
                else:
                    cases.append(Case(f"{method}-{direction}-{label}-{dtype}", f"{method}_{direction}", dtype, seed,
                                      sizes, options))
    return cases
