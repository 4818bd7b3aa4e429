"""Shared cases for the ONNX export tests: random stacks of linear layers with LoRA/DoRA/VeRA adapters.

(Helpers for tests/test_export_*.py; the one test here checks the cases are what they claim.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("onnx", reason="the ONNX export tests need the `onnx` extra (onnx, onnxruntime)")
pytest.importorskip("onnxruntime", reason="the ONNX export tests need the `onnx` extra (onnx, onnxruntime)")

from refpeft.adapter import Adapter, ModuleAdapter  # noqa: E402

from refpeft_onnx.stack import BaseLinear, LinearStack  # noqa: E402

METHODS = ("lora", "dora", "vera")


@dataclass(frozen=True)
class StackCase:
    sizes: tuple[int, ...]     # k_1, d_1 = k_2, ..., d_L
    rank: int
    method: str
    bias: bool
    activation: str
    seed: int


@st.composite
def stack_cases(draw, *, methods: tuple[str, ...] = METHODS, max_features: int = 12, max_layers: int = 2,
                activations: tuple[str, ...] = ("relu", "gelu", "tanh")) -> StackCase:
    layers = draw(st.integers(1, max_layers))
    sizes = tuple(draw(st.lists(st.integers(1, max_features), min_size=layers + 1, max_size=layers + 1)))
    method = draw(st.sampled_from(methods))
    max_rank = 6 if method == "vera" else min(sizes)
    return StackCase(sizes=sizes, rank=draw(st.integers(1, max_rank)), method=method, bias=draw(st.booleans()),
                     activation=draw(st.sampled_from(activations)), seed=draw(st.integers(0, 2**32 - 1)))


def build_stack(case: StackCase) -> LinearStack:
    rng = np.random.default_rng(case.seed)
    layers = tuple(BaseLinear(f"layers.{i}", rng.standard_normal((d, k)) / np.sqrt(k),
                              0.1 * rng.standard_normal(d) if case.bias else None)
                   for i, (k, d) in enumerate(zip(case.sizes, case.sizes[1:])))
    return LinearStack(layers, activation=case.activation)


def build_adapter(stack: LinearStack, method: str, rank: int, *, seed: int, layers: tuple[str, ...] | None = None) -> Adapter:
    """A trained-looking adapter (B non-zero) of `method` and `rank` on `layers` (default: all)."""
    rng = np.random.default_rng(seed)
    chosen = [layer for layer in stack.layers if layers is None or layer.name in layers]
    if method == "vera":
        k_max, d_max = max(l.k for l in chosen), max(l.d for l in chosen)
        modules = {l.name: ModuleAdapter("vera", {"lambda_d": rng.uniform(0.5, 1.5, rank), "lambda_b": rng.standard_normal(l.d)})
                   for l in chosen}
        return Adapter(modules, vera_A=rng.standard_normal((rank, k_max)) / np.sqrt(k_max),
                       vera_B=rng.standard_normal((d_max, rank)) / np.sqrt(rank))
    modules = {}
    for l in chosen:
        r = min(rank, l.k, l.d)
        A = rng.standard_normal((r, l.k)) / np.sqrt(l.k)
        B = 0.5 * rng.standard_normal((l.d, r))
        alpha = float(rng.uniform(1.0, 16.0))
        magnitude = None
        if method == "dora":
            magnitude = np.linalg.norm(l.weight_rows, axis=1) * rng.uniform(0.7, 1.3, l.d)
        modules[l.name] = ModuleAdapter(method, {"A": A, "B": B, "magnitude": magnitude}, alpha=alpha)
    return Adapter(modules)


def build_case(case: StackCase) -> tuple[LinearStack, Adapter]:
    stack = build_stack(case)
    return stack, build_adapter(stack, case.method, case.rank, seed=case.seed + 1)


@settings(max_examples=20, deadline=None)
@given(stack_cases())
def test_cases_are_the_method_and_sizes_drawn(case: StackCase) -> None:
    stack, adapter = build_case(case)
    assert [(l.k, l.d) for l in stack.layers] == list(zip(case.sizes, case.sizes[1:]))
    assert adapter.method == case.method
    assert all((l.bias is not None) == case.bias for l in stack.layers)
