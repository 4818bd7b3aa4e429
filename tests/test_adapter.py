"""refpeft.adapter: a module's tensors by the method table, its rank, sizes and scaling, and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.errors import ConfigError


def lora(r=4, k=10, d=6, **options):
    rng = np.random.default_rng(0)
    return ModuleAdapter("lora", {"A": rng.standard_normal((r, k)), "B": rng.standard_normal((d, r))}, **options)


def test_rank_and_sizes_come_from_the_tensors():
    m = lora(r=4, k=10, d=6)
    assert (m.r, m.in_features, m.out_features) == (4, 10, 6)
    assert m.A.shape == (4, 10) and m.B.shape == (6, 4)
    assert m.magnitude is None          # another method's tensor, absent here
    with pytest.raises(AttributeError, match="no_such_thing"):
        m.no_such_thing


@pytest.mark.parametrize(("alpha", "r", "rslora", "expected"), [(16.0, 4, False, 4.0), (16.0, 4, True, 8.0),
                                                                (8.0, 8, False, 1.0), (3.0, 9, True, 1.0)])
def test_scaling_is_alpha_over_r_or_over_sqrt_r(alpha, r, rslora, expected):
    assert lora(r=r, alpha=alpha, rslora=rslora).scaling == pytest.approx(expected, rel=1e-15)


def test_replace_swaps_tensors_and_keeps_the_rest():
    m = lora(alpha=16.0, rslora=True, fan_in_fan_out=True)
    A2 = np.zeros((4, 10))
    n = m.replace(A=A2)
    assert n.A is A2 and n.B is m.B and m.A is not A2           # the original is untouched
    assert (n.alpha, n.rslora, n.fan_in_fan_out, n.method) == (16.0, True, True, "lora")
    with pytest.raises(ConfigError, match="unknown"):
        m.replace(lambda_d=np.ones(6))


def test_missing_and_unknown_tensors_are_refused_by_name():
    with pytest.raises(ConfigError, match="missing.*'B'"):
        ModuleAdapter("lora", {"A": np.ones((2, 3))})
    with pytest.raises(ConfigError, match="unknown.*'C'"):
        ModuleAdapter("lora", {"A": np.ones((2, 3)), "B": np.ones((4, 2)), "C": np.ones(1)})
    ModuleAdapter("lora", {"A": np.ones((2, 3)), "B": np.ones((4, 2)), "bias": None})  # None: absent, allowed


def test_dora_needs_its_magnitude():
    with pytest.raises(ConfigError, match="magnitude"):
        ModuleAdapter("dora", {"A": np.ones((2, 3)), "B": np.ones((4, 2))})
    m = ModuleAdapter("dora", {"A": np.ones((2, 3)), "B": np.ones((4, 2)), "magnitude": np.ones(4)}, alpha=4.0)
    assert m.scaling == 2.0 and m.out_features == 4


def test_an_adapter_names_its_method_or_mixed():
    dora = ModuleAdapter("dora", {"A": np.ones((2, 3)), "B": np.ones((4, 2)), "magnitude": np.ones(4)})
    assert Adapter({"a": lora(), "b": lora()}).method == "lora"
    mixed = Adapter({"a": lora(), "b": dora})
    assert mixed.method == "mixed" and mixed.methods == {"lora", "dora"}
    saved = Adapter({}, saved_modules={"lm_head.weight": 0, "model.norm.weight": 0, "lm_head.bias": 0})
    assert saved.saved_module_paths == ["lm_head", "model.norm"]
    assert Adapter({}).shared == {} and set(Adapter({}, vera_A=1, vera_B=2).shared) == {"vera_A", "vera_B"}
