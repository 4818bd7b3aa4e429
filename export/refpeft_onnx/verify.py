"""Verification before writing: onnx.checker, then ONNX Runtime against refpeft within a derived bound.

A graph passes when
1. `onnx.checker.check_model(model, full_check=True)` accepts it (strict shape inference), and
2. on random inputs x (drawn in float64, rounded to the graph's dtype, so exactly representable),
   every run's output y_hat satisfies, element by element,

       |y_hat - y| <= beta,      y = refpeft's float64 reference (refpeft_onnx.stack.reference_forward)

   where beta is derived from the graph's own operations with refpeft.tolerance (Higham's gamma_n
   model, composed op by op; see that module): each initializer is the float64 value rounded once
   to the graph's dtype (`stored`), each MatMul is a dot product of length k (any order, any
   blocking, FMA or not), each Add/Mul rounds once. float16 graphs use float32 accumulation (ONNX
   Runtime's CPU and CUDA kernels accumulate half products in float32), so u = 2^-11 for storage.
   A check reports max |y_hat - y| / beta: <= 1 passes, and the number says how much of the
   rounding budget was used.

Runs checked: merged graphs with their feeds; unmerged graphs with no adapter fed (must give the
base model) and with the adapter's tensors fed as inputs (must give the adapted model); on every
available provider (CPU always; CUDA with TF32 off when onnxruntime-gpu sees a GPU); and, for
graphs of standard ops only, in onnx.reference.ReferenceEvaluator, an independent executor.

Activations are the one piece not derived from IEEE arithmetic: ONNX Runtime's Tanh and Gelu (erf)
are polynomial approximations (MLAS) with no published accuracy. They get the rule

    |f_rt(h_hat) - f(h)| <= L e + c u (|f(h)| + |h| + (L + 1) e) + eta

(L the Lipschitz constant: 1 for Relu and Tanh, 1.13 for Gelu, whose derivative peaks at 1.1289;
e the incoming error; eta half the smallest subnormal, for results that underflow) with c = 8 for
Tanh and Gelu: four times the worst measured on ONNX Runtime 1.32 CPU over a dense grid of float32
inputs (Tanh 2.3, Gelu 1.9 as multiples of u (|f| + |h|)), and c = 0 for Relu (exact).
tests/test_export_verify.py re-measures it, so a runtime that breaks the rule fails loudly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.errors import RefpeftError
from refpeft.tolerance import Bounded, Comparison, Precision, add, compare, exact, matmul, rows, stored, \
    with_reference

from refpeft_onnx.builder import DTYPES, to_graph_dtype
from refpeft_onnx.graph import bias_input_name, branch_values, graph_metadata, merged_weight, method_branch
from refpeft_onnx.stack import BaseLinear, LinearStack, activation, as_float64, as_float64_module, check_adapter, \
    reference_forward, with_trained_biases

# name -> (Lipschitz constant L, runtime accuracy c in units of u (|f| + |h|)); see the module docstring.
ACTIVATION_ERROR = {"relu": (1.0, 0.0), "identity": (1.0, 0.0), "tanh": (1.0, 8.0), "gelu": (1.13, 8.0)}
DEFAULT_SHAPES = ((1, 1), (2, 5))    # (batch, sequence) pairs run through every graph


class VerificationError(RefpeftError, ValueError):
    """An exported graph failed the checker or disagreed with the reference beyond the derived bound."""


# ---------------------------------------------------------------- the bound of each graph's computation

def activation_bound(P: Bounded, name: str, precision: Precision) -> Bounded:
    """f(P) for the stack's activation (rule in the module docstring)."""
    L, c = ACTIVATION_ERROR[name]
    value = activation(P.value, name)
    if c == 0.0:
        return Bounded(value, L * P.error)
    eta = float(np.finfo(precision.storage).smallest_subnormal) / 2
    error = L * P.error + c * precision.u * (np.abs(value) + np.abs(P.value) + (L + 1) * P.error) + eta
    return Bounded(value, error)


def _optional_stored(a: Any, p: Precision) -> Bounded | None:
    return None if a is None else stored(as_float64(a), p)


def _cast(P: Bounded, p: Precision) -> Bounded:
    """A Cast to the graph dtype rounds once, exactly as adding an exact zero does."""
    return add(P, exact(np.zeros_like(P.value)), p)


def _base_bound(h: Bounded, layer: BaseLinear, p: Precision, *, nf4_ops: str, bias: bool) -> Bounded:
    """h W^T (+ b): float weights are stored rounded; an NF4 weight is exact in float32 (f32(code * absmax))."""
    b = _optional_stored(layer.bias, p) if bias else None
    Wt = layer.weight_rows.T                                                   # (k, d)
    if layer.nf4 is None:
        return matmul(h, stored(Wt, p), p, bias=b)
    if p.storage == "float32" or p.storage == "float64":
        return matmul(h, exact(Wt), p, bias=b)
    if nf4_ops == "bnb4":                      # float16 graph: h cast to float32, MatMulBnb4, cast back
        out = _cast(matmul(h, exact(Wt), Precision("float32", model=p.model)), p)
        return out if b is None else add(out, b, p)
    return matmul(h, stored(Wt, p), p, bias=b)  # the float32 weight cast to float16 in the graph


def _layer_bound(h: Bounded, layer: BaseLinear, module: ModuleAdapter | None, adapter: Adapter | None, p: Precision, *,
                 form: str, nf4_ops: str) -> Bounded:
    if module is None:
        return _base_bound(h, layer, p, nf4_ops=nf4_ops, bias=True)
    if form == "merged":
        W = merged_weight(layer, module, adapter)
        Wt = W if layer.fan_in_fan_out else W.T
        bias = layer.bias                                     # IA3's output scaling merges l * b (merge_bias)
        if bias is not None and module.spec.merge_bias is not None:
            bias = module.spec.merge_bias(as_float64(bias), as_float64_module(module))
        return matmul(h, stored(Wt, p), p, bias=_optional_stored(bias, p))
    values = list(branch_values(layer, module).values())
    b = _optional_stored(layer.bias, p)
    return method_branch(module.method).bound(
        h, layer, values, p, adapter=adapter,
        base_of=lambda x: _base_bound(x, layer, p, nf4_ops=nf4_ops, bias=False),
        add_bias=lambda total: total if b is None else add(total, b, p))


def graph_bound(stack: LinearStack, adapter: Adapter | None, x: Any, *, form: str, dtype: str,
                nf4_ops: str = "bnb4", model: str = "rigorous") -> np.ndarray:
    """beta: the per-element bound on |graph output - reference| for input x (..., k) (module docstring).

    model: refpeft.tolerance's error model, "rigorous" (every summation order, the default) or
      "probabilistic" (Higham & Mary's, about sqrt(k)/6 times tighter for long dot products).
    """
    x64 = as_float64(x)
    stack = with_trained_biases(stack, adapter)
    modules = {} if adapter is None else adapter.modules

    def chain(p: Precision) -> Bounded:
        h = rows(exact(x64))
        for i, layer in enumerate(stack.layers):
            h = _layer_bound(h, layer, modules.get(layer.name), adapter, p, form=form, nf4_ops=nf4_ops)
            if i < len(stack.layers) - 1:
                h = activation_bound(h, stack.activation, p)
        return h

    bound = with_reference(chain, Precision(dtype, model=model))
    return np.reshape(bound, (*x64.shape[:-1], stack.out_features))


# ---------------------------------------------------------------- running the graph

def available_providers() -> list[str]:
    """CUDA (when onnxruntime-gpu sees a GPU) and CPU, the providers every export is checked on."""
    import onnxruntime as ort

    present = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in present]


def session(model: onnx.ModelProto | bytes | str, provider: str = "CPUExecutionProvider") -> Any:
    """An ONNX Runtime session on one provider; CUDA with TF32 off (TF32 rounds inputs to 10 bits)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3   # the expected "initializer appears in graph inputs" warnings
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    providers: list[Any] = [provider]
    if provider == "CUDAExecutionProvider":
        providers = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    return ort.InferenceSession(source, options, providers=providers)


def adapter_feeds(stack: LinearStack, adapter: Adapter, dtype: str) -> dict[str, np.ndarray]:
    """The unmerged graph's adapter inputs for `adapter`, in the graph's dtype (what .onnx_adapter files hold)."""
    check_adapter(stack, adapter)
    return layer_feeds(stack.layer, adapter, dtype)


def layer_feeds(layer_of: Callable[[str], BaseLinear], adapter: Adapter, dtype: str) -> dict[str, np.ndarray]:
    """`adapter`'s unmerged-graph inputs in `dtype`, each module's layer given by `layer_of(path)`."""
    np_dtype = DTYPES[dtype][0]
    feeds = {}
    for name, module in adapter.modules.items():
        for key, value in branch_values(layer_of(name), module).items():
            feeds[key] = np.ascontiguousarray(to_graph_dtype(value, np_dtype, name=key))
    for name, bias in adapter.base_biases.items():
        key = bias_input_name(name)
        feeds[key] = np.ascontiguousarray(to_graph_dtype(as_float64(bias), np_dtype, name=key))
    return feeds


@dataclass(frozen=True)
class Check:
    """One run of the graph compared with the reference."""

    run: str              # "adapted", "no adapter", "adapter fed as inputs"
    executor: str         # an ONNX Runtime provider, or "onnx.reference"
    shape: tuple[int, ...]
    comparison: Comparison


@dataclass(frozen=True)
class VerificationReport:
    checks: tuple[Check, ...]
    dtype: str
    bound_model: str = "rigorous"

    @property
    def passed(self) -> bool:
        return all(c.comparison.passed for c in self.checks)

    @property
    def worst(self) -> Check:
        return max(self.checks, key=lambda c: c.comparison.ratio)

    def summary(self) -> str:
        w = self.worst
        verdict = "agrees with" if self.passed else "DISAGREES with"
        return (f"ONNX Runtime {verdict} the refpeft reference: {len(self.checks)} runs, worst "
                f"max|error| {w.comparison.max_error:.3g} = {w.comparison.ratio:.3g} of the derived {self.dtype} "
                f"bound{'' if self.bound_model == 'rigorous' else ' (' + self.bound_model + ')'} "
                f"({w.run}, {w.executor}, x {w.shape})")


def verify_model(model: onnx.ModelProto, stack: LinearStack, adapter: Adapter | None = None, *,
                 shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES, seed: int = 0,
                 providers: list[str] | None = None, reference_evaluator: bool | None = None,
                 bound_model: str = "rigorous") -> VerificationReport:
    """Check `model` (built by refpeft_onnx.graph.build_model from `stack` and `adapter`); see the module docstring.

    Raises VerificationError when the checker refuses the model; otherwise returns the report
    (its `passed` says whether every run was within the bound). bound_model: see `graph_bound`.
    """
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise VerificationError(f"onnx.checker refuses the graph: {exc}") from None
    meta = graph_metadata(model)
    form, dtype, nf4_ops = meta["refpeft.form"], meta["refpeft.dtype"], meta["refpeft.nf4_ops"]
    runs: list[tuple[str, Adapter | None, bool]] = [("adapted" if adapter else "base", adapter, False)]
    if form == "unmerged":
        runs = [("no adapter", None, False)] + ([("adapter fed as inputs", adapter, True)] if adapter else [])
    executors = {p: session(model, p) for p in (providers or available_providers())}
    if reference_evaluator is None:
        reference_evaluator = all(node.domain == "" for node in model.graph.node)
    if reference_evaluator:
        from onnx.reference import ReferenceEvaluator

        executors["onnx.reference"] = ReferenceEvaluator(model)
    rng = np.random.default_rng(seed)
    checks = []
    for batch, sequence in shapes:
        x = rng.standard_normal((batch, sequence, stack.in_features)).astype(DTYPES[dtype][0])
        for run, run_adapter, feed_adapter in runs:
            feeds = {"x": x, **(adapter_feeds(stack, run_adapter, dtype) if feed_adapter else {})}
            expected = reference_forward(stack, run_adapter, x)
            bound = graph_bound(stack, run_adapter, x, form=form, dtype=dtype, nf4_ops=nf4_ops, model=bound_model)
            for executor, runner in executors.items():
                y = runner.run(None, feeds)[0]
                checks.append(Check(run, executor, x.shape, compare(y, expected, bound)))
    return VerificationReport(tuple(checks), dtype, bound_model)


def require_passed(report: VerificationReport) -> None:
    """Raise VerificationError (with the worst error and its fraction of the bound) unless every run passed."""
    if not report.passed:
        raise VerificationError(f"{report.summary()}; refusing to write the graph")
