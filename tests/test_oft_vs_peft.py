"""OFT against HF PEFT on torch CPU in float64: outputs, every parameter's gradient, merges, files both ways."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.methods import method_spec
from refpeft.methods.oft import oft_backward, oft_forward, oft_merge
from refpeft.peft_format import read_peft_adapter, write_peft_adapter
from support import assert_close
from tests.peft_peers import TwoLinears

PATHS = ("q", "v")
VARIANTS = {   # name -> (PEFT config options, refpeft's forward options)
    "neumann": ({}, {"cayley": "neumann"}),
    "exact": ({"use_cayley_neumann": False}, {"cayley": "exact"}),
    "neumann-3-terms": ({"num_cayley_neumann_terms": 3}, {"cayley": "neumann", "terms": 3}),
    "block-share": ({"block_share": True}, {"cayley": "neumann"}),
    "coft": ({"coft": True, "eps": 1e-2}, {"cayley": "neumann", "coft": True, "eps": 1e-2}),
}


def peft_model(options: dict, seed: int = 0):
    torch.manual_seed(seed)
    config = peft.OFTConfig(r=0, oft_block_size=4, target_modules=list(PATHS), init_weights=False, **options)
    model = peft.get_peft_model(TwoLinears().double(), config)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn_like(p))     # random, non-initial rotations
    return model


def layer(model, path):
    return getattr(model.base_model.model, path)


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_gradients_and_merges_equal_peft(variant):
    peft_options, options = VARIANTS[variant]
    model = peft_model(peft_options)
    V = {p: layer(model, p).oft_R["default"].weight.detach().numpy().copy() for p in PATHS}
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    y = model(x)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()

    h, caches = x.detach().numpy(), {}
    for p in PATHS:
        base = layer(model, p).base_layer
        h, caches[p] = oft_forward(h, base.weight.detach().numpy(), V[p], bias=base.bias.detach().numpy(), **options)
    assert_close(h, y.detach().numpy(), rtol=1e-10)
    g = dy.numpy()
    for p in reversed(PATHS):
        grads = oft_backward(g, caches[p])
        assert_close(grads.doft_R, layer(model, p).oft_R["default"].weight.grad.numpy(), rtol=1e-10)
        g = grads.dx
    assert_close(g, x.grad.numpy(), rtol=1e-10)

    merge_options = {n: v for n, v in options.items() if n in ("cayley", "terms")}
    W0 = {p: layer(model, p).base_layer.weight.detach().numpy().copy() for p in PATHS}
    model.merge_adapter()
    for p in PATHS:
        assert_close(oft_merge(W0[p], caches[p].V, **merge_options), layer(model, p).base_layer.weight.detach().numpy(),
                     rtol=1e-10)


def _refpeft_outputs(adapter: Adapter, model, x: np.ndarray) -> np.ndarray:
    h = x
    for p in PATHS:
        base, m = layer(model, p).base_layer, adapter.modules[p]
        h, _ = m.spec.forward(h, base.weight.detach().numpy(), m, bias=base.bias.detach().numpy())
    return h


@pytest.mark.parametrize("variant", ["neumann", "block-share"])
def test_peft_saved_folders_read_with_equal_outputs(variant, tmp_path):
    model = peft_model(VARIANTS[variant][0])
    model.save_pretrained(tmp_path)
    adapter = read_peft_adapter(tmp_path)
    assert adapter.method == "oft"
    x = torch.randn(4, 12, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x).numpy()
    assert_close(_refpeft_outputs(adapter, model, x.numpy()), expected, rtol=1e-10)


@pytest.mark.parametrize("method", ["oft"])
def test_refpeft_written_folders_load_in_peft_with_equal_outputs(method, tmp_path):
    rng = np.random.default_rng(3)
    adapter = Adapter(modules={"q": ModuleAdapter(method, {"oft_R": 0.3 * rng.standard_normal((3, 6))}),
                               "v": ModuleAdapter(method, {"oft_R": 0.3 * rng.standard_normal((2, 6))})})
    write_peft_adapter(tmp_path, adapter)
    torch.manual_seed(1)
    base = TwoLinears().double()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    for p in PATHS:
        assert_close(layer(loaded, p).oft_R["default"].weight.detach().numpy(), adapter.modules[p].oft_R, rtol=0.0)
    x = torch.randn(4, 12, dtype=torch.float64)
    with torch.no_grad():
        expected = loaded(x).numpy()
    assert_close(_refpeft_outputs(adapter, loaded, x.numpy()), expected, rtol=1e-10)
    assert method_spec(method).parameter_count(12, 8, adapter.modules["q"]) == 18


def test_coft_and_other_neumann_lengths_are_refused_on_read(tmp_path):
    from refpeft.errors import ConfigError

    peft_model({"num_cayley_neumann_terms": 3}).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="num_cayley_neumann_terms"):
        read_peft_adapter(tmp_path)
