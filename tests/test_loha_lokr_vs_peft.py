"""LoHa and LoKr against HF PEFT on torch CPU in float64: outputs, every factor's gradient, init, factor sizes, files."""

from __future__ import annotations

import copy

import numpy as np
import peft
import pytest
import torch
from peft.tuners.lokr.layer import factorization

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.methods import method_spec
from refpeft.methods.loha import loha_init
from refpeft.methods.lokr import lokr_factorization, lokr_init
from refpeft.peft_format import read_peft_adapter, write_peft_adapter
from tests.peft_peers import TwoLinears

PATHS = ("q", "v")
CONFIGS = {
    "loha": lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=list(PATHS), rank_pattern={"v": 3},
                                    alpha_pattern={"v": 5}, init_weights=False),
    "lokr": lambda: peft.LoKrConfig(r=1, alpha=3, target_modules=list(PATHS), init_weights=False),
    "lokr-both": lambda: peft.LoKrConfig(r=1, alpha=3, target_modules=list(PATHS), decompose_both=True,
                                         alpha_pattern={"q": 2}, init_weights=False),
    "lokr-factor": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=list(PATHS), decompose_factor=2,
                                           decompose_both=True, init_weights=False),
}


def peft_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = peft.get_peft_model(TwoLinears().double(), CONFIGS[name]())
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(0.5 * torch.randn_like(p))     # random, non-initial factors
    return model


def refpeft_modules(model) -> dict[str, ModuleAdapter]:
    """The adapter's modules read straight off the PEFT layers (names, r, alpha as PEFT holds them)."""
    out = {}
    for path in PATHS:
        layer = getattr(model.base_model.model, path)
        method = "loha" if hasattr(layer, "hada_w1_a") else "lokr"
        tensors = {n: getattr(layer, n)["default"].detach().numpy().copy() for n in method_spec(method).suffixes()
                   if "default" in getattr(layer, n)}
        out[path] = ModuleAdapter(method, tensors, alpha=float(layer.alpha["default"]), rank=layer.r["default"])
    return out


def refpeft_forward(modules, base: TwoLinears, x: np.ndarray, dy: np.ndarray):
    """y and (dx, {path.tensor: gradient}) through both layers with refpeft's forward / backward."""
    caches, h = [], x
    for path in PATHS:
        layer = getattr(base, path)
        m = modules[path]
        h, cache = m.spec.forward(h, layer.weight.detach().numpy(), m, bias=layer.bias.detach().numpy())
        caches.append((path, m, cache))
    grads, g = {}, dy
    for path, m, cache in reversed(caches):
        out = m.spec.backward(g, cache)
        grads.update({f"{path}.{n}": getattr(out, f"d{n}") for n in m.tensors})
        g = out.dx
    return h, g, grads


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_every_factor_gradient_equal_peft(name):
    model = peft_model(name)
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((4, 12)), rng.standard_normal((4, 6))
    xt = torch.tensor(x, requires_grad=True)
    yt = model(xt)
    (yt * torch.tensor(dy)).sum().backward()
    modules = refpeft_modules(model)
    y, dx, grads = refpeft_forward(modules, model.base_model.model, x, dy)
    assert rel(y, yt.detach().numpy()) < 1e-10
    assert rel(dx, xt.grad.numpy()) < 1e-10
    expected = {f"{path}.{n}": getattr(getattr(model.base_model.model, path), n)["default"].grad.numpy()
                for path in PATHS for n in modules[path].tensors}
    assert set(grads) == set(expected) and len(grads) >= 4
    for key in expected:
        assert rel(grads[key], expected[key]) < 1e-10, key
    if name == "lokr-both":                       # decompose_both: q's w1 is low-rank, v's stays full
        assert "lokr_w1_a" in modules["q"].tensors and "lokr_w1" in modules["v"].tensors


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_equals_peft_merge(name):
    model = peft_model(name, seed=3)
    modules = refpeft_modules(model)
    W0s = {p: getattr(model.base_model.model, p).weight.detach().numpy().copy() for p in PATHS}
    merged = copy.deepcopy(model).merge_and_unload()
    for p in PATHS:
        W = modules[p].spec.merge(W0s[p], modules[p])
        assert rel(W, getattr(merged, p).weight.detach().numpy()) < 1e-12
        assert rel(modules[p].spec.unmerge(W, modules[p]), W0s[p]) < 1e-14


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_files_read_and_refpeft_files_load_in_peft(name, tmp_path):
    model = peft_model(name, seed=5)
    model.save_pretrained(tmp_path / "peft")
    adapter = read_peft_adapter(tmp_path / "peft")
    x = np.random.default_rng(2).standard_normal((3, 12))
    expected = model(torch.tensor(x)).detach().numpy()
    base = model.base_model.model
    y = refpeft_forward(adapter.modules, base, x, np.zeros((3, 6)))[0]
    assert rel(y, expected) < 1e-10
    # written back by refpeft, with each factor changed, and loaded by PEFT on a fresh copy of the base
    changed = Adapter({p: m.replace(**{n: 1.5 * t for n, t in m.tensors.items()}) for p, m in adapter.modules.items()},
                      config=adapter.config)
    write_peft_adapter(tmp_path / "ours", changed)
    fresh = copy.deepcopy(model).unload()
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    theirs = loaded(torch.tensor(x)).detach().numpy()
    assert rel(theirs, refpeft_forward(changed.modules, base, x, np.zeros((3, 6)))[0]) < 1e-10
    assert rel(theirs, expected) > 1e-3            # the changed factors made it through


@pytest.mark.parametrize("dimension", [1, 2, 6, 7, 12, 36, 64, 96, 127, 128, 250, 256, 360, 768, 1000, 4096, 5120])
@pytest.mark.parametrize("factor", [-1, 1, 2, 3, 4, 5, 8, 16, 100])
def test_lokr_factor_sizes_equal_peft_factorization(dimension, factor):
    assert lokr_factorization(dimension, factor) == factorization(dimension, factor)


def test_lokr_factor_sizes_equal_peft_for_every_small_dimension():
    pairs = [(n, f) for n in range(1, 400) for f in (-1, 2, 3, 7, 12)]
    assert all(lokr_factorization(n, f) == factorization(n, f) for n, f in pairs)


@pytest.mark.parametrize("method,config", [
    ("loha", dict(r=3, alpha=4)),
    ("lokr", dict(r=1, alpha=4)),
    ("lokr", dict(r=1, alpha=4, decompose_both=True)),
    ("lokr", dict(r=8, alpha=4)),                         # r large: both factors full
])
def test_init_equals_peft_bit_for_bit(method, config):
    torch.manual_seed(7)
    make = peft.LoHaConfig if method == "loha" else peft.LoKrConfig
    base = torch.nn.Sequential(torch.nn.Linear(12, 8))
    torch.manual_seed(7)
    layer = peft.get_peft_model(base, make(target_modules=["0"], **config)).base_model.model[0]
    theirs = {n: getattr(layer, n)["default"].detach().numpy() for n in method_spec(method).suffixes()
              if "default" in getattr(layer, n)}
    if method == "loha":
        ours = dict(zip(method_spec("loha").tensors, loha_init(12, 8, 3, seed=7, generator="torch-cpu",
                                                               dtype="float32")))
    else:
        ours = lokr_init(12, 8, config["r"], decompose_both=config.get("decompose_both", False), seed=7,
                         generator="torch-cpu", dtype="float32")
    assert set(ours) == set(theirs)
    for n in ours:
        np.testing.assert_array_equal(ours[n], theirs[n], err_msg=n)
