"""refpeft.init: the variance-scaling bound, the distributions' moments, seeds, torch's CPU generator."""

from __future__ import annotations

import math

import numpy as np
import pytest

from refpeft.errors import ConfigError
from refpeft.init import as_parameter, kaiming_uniform_bound, normal, torch_cpu_generator, torch_cpu_uniform, uniform


@pytest.mark.parametrize(("fan_in", "a", "expected"), [(16, math.sqrt(5.0), 0.25), (100, math.sqrt(5.0), 0.1),
                                                       (24, 0.0, 0.5), (6, 0.0, 1.0)])
def test_kaiming_uniform_bound(fan_in, a, expected):
    """a = sqrt(5) (torch's nn.Linear, PEFT's LoRA A) gives 1/sqrt(fan_in); a = 0 gives sqrt(6/fan_in)."""
    assert kaiming_uniform_bound(fan_in, a=a) == pytest.approx(expected, rel=1e-15)
    with pytest.raises(ConfigError, match="fan_in"):
        kaiming_uniform_bound(0)


@pytest.mark.parametrize("generator", ["numpy", "torch-cpu"])
def test_uniform_has_the_moments_of_u_minus_b_b(generator):
    b, n = 0.3, 200_000
    v = uniform((400, 500), b, seed=7, generator=generator).astype(np.float64)
    assert v.shape == (400, 500) and np.all(np.abs(v) <= b)
    # mean 0 with sd b / sqrt(3 n); variance b^2 / 3 with sd b^2 sqrt(4 / (45 n)); 6 sigma each
    assert abs(v.mean()) < 6 * b / math.sqrt(3 * n)
    assert abs(v.var() - b * b / 3) < 6 * b * b * math.sqrt(4 / (45 * n))
    assert v.min() < -0.99 * b and v.max() > 0.99 * b  # it reaches both ends


def test_normal_has_the_moments_of_n_0_std2():
    std, n = 0.02, 200_000
    v = normal((n,), std, seed=3)
    assert abs(v.mean()) < 6 * std / math.sqrt(n)
    assert abs(v.std() / std - 1) < 6 / math.sqrt(2 * n)
    assert abs(np.mean(np.abs(v) < std) - 0.6827) < 0.01


@pytest.mark.parametrize("draw", [lambda seed: uniform((3, 4), 1.0, seed=seed),
                                  lambda seed: uniform((3, 4), 1.0, seed=seed, generator="torch-cpu"),
                                  lambda seed: normal((3, 4), 1.0, seed=seed)])
def test_a_seed_reproduces_its_values_and_another_seed_does_not(draw):
    assert np.array_equal(draw(0), draw(0))
    assert not np.array_equal(draw(0), draw(1))


def test_torch_cpu_uniform_matches_torch_rand_after_manual_seed_0():
    """torch.manual_seed(0); torch.rand(3) -> tensor([0.4963, 0.7682, 0.0885]) (torch's documented first draws)."""
    v = torch_cpu_uniform((3,), 0.0, 1.0, seed=0)
    assert v.dtype == np.float32
    assert np.allclose(v, [0.4963, 0.7682, 0.0885], atol=5e-5)


def test_torch_cpu_generator_continues_a_stream():
    mt = torch_cpu_generator(5)
    first, second = torch_cpu_uniform((4,), -1, 1, bit_generator=mt), torch_cpu_uniform((4,), -1, 1, bit_generator=mt)
    assert np.array_equal(torch_cpu_uniform((8,), -1, 1, seed=5), np.concatenate([first, second]))
    with pytest.raises(ConfigError, match="exactly one"):
        torch_cpu_uniform((2,), 0, 1)
    with pytest.raises(ConfigError, match="exactly one"):
        torch_cpu_uniform((2,), 0, 1, seed=1, bit_generator=mt)


def test_unknown_generator_is_refused_by_name():
    with pytest.raises(ConfigError, match="'mt'"):
        uniform((2,), 1.0, seed=0, generator="mt")


def test_as_parameter_rounds_to_the_named_format():
    values = np.array([1.0 + 2.0**-10, 1 / 3])
    assert as_parameter(values, dtype="float64", xp=None).dtype == np.float64
    bf = as_parameter(values, dtype="bfloat16", xp=None)
    assert bf.dtype == np.float32 and bf[0] == 1.0 and bf[1] != np.float32(1 / 3)
    assert abs(bf[1] - 1 / 3) <= 2.0**-9 / 3
