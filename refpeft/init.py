"""Initialisers: one variance-scaling rule, two random generators, exact on every machine.

The LoRA family draws its random matrices from a uniform or normal distribution whose width
comes from one rule, He/Kaiming's gain for a leaky-ReLU slope `a`:

    gain(a)  = sqrt(2 / (1 + a^2))
    bound    = gain(a) * sqrt(3 / fan_in)          # U(-bound, bound)

- PEFT's LoRA default (torch's nn.Linear default) is a = sqrt(5): gain = sqrt(1/3), so
  bound = 1 / sqrt(fan_in). This is *not* JAX's `kaiming_uniform` (which uses a = 0).
- VeRA's shared projections use a = 0: bound = sqrt(6 / fan_in).

Generators (the `generator` argument):
- "numpy" (default): NumPy's PCG64 `Generator` seeded with the given integer. The same seed gives
  the same float64 values on every machine and operating system.
- "torch-cpu": bit-for-bit what torch's CPU generator produces for `uniform_` on a float32 tensor
  after `torch.manual_seed(seed)`: MT19937 with `init_genrand(seed)`, one 32-bit draw per element
  in row-major order, `u = (draw & (2^24 - 1)) * 2^-24`, then a fused multiply-add in float32:
  value = float32(u * float32(hi - lo) + float32(lo)) with one rounding (checked against torch).
  Use it to reproduce PEFT's initialisations exactly (see `torch_cpu_uniform`). Normal draws are
  not reproducible this way, so "gaussian" is only offered with the "numpy" generator.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from refpeft.backend import float_dtype, from_numpy, numpy_namespace, round_to
from refpeft.errors import ConfigError

GENERATORS = ("numpy", "torch-cpu")


def kaiming_uniform_bound(fan_in: int, *, a: float = math.sqrt(5.0)) -> float:
    """Half-width of the Kaiming-uniform distribution: sqrt(2/(1+a^2)) * sqrt(3/fan_in)."""
    if fan_in < 1:
        raise ConfigError(f"fan_in must be at least 1, got {fan_in}")
    gain = math.sqrt(2.0 / (1.0 + a * a))
    return gain * math.sqrt(3.0 / fan_in)


def torch_cpu_uniform(shape: tuple[int, ...], low: float, high: float, *, seed: int | None = None,
                      bit_generator: np.random.MT19937 | None = None) -> np.ndarray:
    """float32 `U(low, high)` exactly as torch's CPU `Tensor.uniform_` after `manual_seed(seed)`.

    Pass `seed` for a fresh stream or `bit_generator` (from `torch_cpu_generator`) to continue
    one, as torch's global generator does across successive draws.
    """
    if (seed is None) == (bit_generator is None):
        raise ConfigError("give exactly one of seed or bit_generator")
    mt = bit_generator if bit_generator is not None else torch_cpu_generator(seed)
    count = math.prod(shape)
    draws = mt.random_raw(count).astype(np.uint64)  # one 32-bit word per element
    u = (draws & np.uint64((1 << 24) - 1)).astype(np.float64) * 2.0**-24
    # u * width is exact in float64 (24 + 24 bits), so one float64 add then the float32 cast
    # reproduces torch's fused multiply-add (matched on 10^6 draws against torch 2.13).
    width, offset = np.float64(np.float32(high - low)), np.float64(np.float32(low))
    return (u * width + offset).astype(np.float32).reshape(shape)


def torch_cpu_generator(seed: int) -> np.random.MT19937:
    """MT19937 seeded as torch's CPU generator is by `torch.manual_seed(seed)`."""
    mt = np.random.MT19937(0)
    mt._legacy_seeding(seed & 0xFFFFFFFF)
    return mt


def uniform(shape: tuple[int, ...], bound: float, *, seed: int, generator: str = "numpy") -> np.ndarray:
    """U(-bound, bound) of `shape` from the named generator (float64, or float32 for torch-cpu)."""
    if generator == "numpy":
        return np.random.default_rng(seed).uniform(-bound, bound, size=shape)
    if generator == "torch-cpu":
        return torch_cpu_uniform(shape, -bound, bound, seed=seed)
    raise ConfigError(f"unknown generator {generator!r}; choose one of {', '.join(GENERATORS)}")


def normal(shape: tuple[int, ...], std: float, *, seed: int) -> np.ndarray:
    """N(0, std^2) of `shape` from NumPy's PCG64 generator (float64)."""
    return np.random.default_rng(seed).normal(0.0, std, size=shape)


def as_parameter(values: np.ndarray, *, dtype: str, xp: Any | None) -> Any:
    """Host values as an array of namespace `xp` (NumPy when None) in float format `dtype`.

    bfloat16 on a namespace without it is emulated: float32 storage holding bfloat16 values.
    """
    xp = numpy_namespace() if xp is None else xp
    array = xp.astype(from_numpy(np.asarray(values), xp=xp), float_dtype(dtype, xp=xp))
    return round_to(array, dtype, xp=xp) if dtype == "bfloat16" else array
