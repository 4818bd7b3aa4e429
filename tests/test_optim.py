"""Adam/AdamW/LoRA+: torch.optim's trajectory, functional state, LoRA+ groups, state files."""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.errors import ConfigError, FormatError, ShapeError
from refpeft.optim import (
    AdamState,
    adam,
    adam_step,
    adamw,
    load_adam_state,
    loraplus_groups,
    save_adam_state,
    single_group,
)
from support import BACKENDS, BACKEND_IDS, assert_close

HYPER_SETS = [
    ("adam", dict(lr=1e-2)),
    ("adam", dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.05)),
    ("adamw", dict(lr=1e-2)),
    ("adamw", dict(lr=5e-2, betas=(0.5, 0.9), weight_decay=0.3, amsgrad=True)),
    ("adamw", dict(lr=1e-3, betas=(0.95, 0.9999), eps=1e-10, weight_decay=0.0)),
]


def _gradients(rng, shapes, steps):
    return [{n: rng.standard_normal(s) for n, s in shapes.items()} for _ in range(steps)]


@pytest.mark.parametrize("kind,hyper", HYPER_SETS)
def test_trajectory_equals_torch_optim(kind, hyper):
    torch = pytest.importorskip("torch", reason="torch is in the conformance extra")
    rng = np.random.default_rng(0)
    shapes = {"layer.lora_A": (4, 7), "layer.lora_B": (5, 4), "layer.bias": (5,)}
    params = {n: rng.standard_normal(s) for n, s in shapes.items()}
    grads = _gradients(rng, shapes, 20)

    tparams = {n: torch.tensor(p, requires_grad=True) for n, p in params.items()}
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    opt = cls(list(tparams.values()), **hyper)
    config = (adam if kind == "adam" else adamw)(**hyper)
    state, groups = AdamState(), single_group(params, config)
    for g in grads:
        for n, t in tparams.items():
            t.grad = torch.tensor(g[n])
        opt.step()
        params, state = adam_step(params, g, state, groups)
    for n, t in tparams.items():
        assert_close(params[n], t.detach().numpy(), rtol=1e-12)
        assert_close(state.exp_avg_sq[n], opt.state[t]["exp_avg_sq"].numpy(), rtol=1e-12)


def test_loraplus_groups_match_peft_rates():
    torch = pytest.importorskip("torch", reason="torch is in the conformance extra")
    pytest.importorskip("peft", reason="peft is in the conformance extra")
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["0", "2"], bias="all"))
    opt = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                    loraplus_weight_decay=0.01)
    expected = {}
    names = {id(p): n for n, p in peft_model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            expected[names[id(p)]] = (group["lr"], group["weight_decay"])
    params = {n: np.zeros(tuple(p.shape)) for n, p in peft_model.named_parameters() if p.requires_grad}
    groups = loraplus_groups(params, adamw(lr=1e-3), lr_ratio=16, loraplus_weight_decay=0.01)
    ours = {n: (g.config.lr, g.config.weight_decay) for g in groups for n in g.names}
    assert ours == expected


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_step_is_functional_and_keeps_namespace(backend):
    rng = np.random.default_rng(1)
    params = {"A": backend(rng.standard_normal((3, 4)))}
    grads = {"A": backend(rng.standard_normal((3, 4)))}
    before = np.array(params["A"], copy=True) if backend.name.startswith("numpy") else None
    new, state = adam_step(params, grads, AdamState(), single_group(params, adamw(lr=0.1)))
    assert state.step == {"A": 1}
    if before is not None:
        np.testing.assert_array_equal(params["A"], before)
    # Adam's first step has size lr |g| / (|g| + eps) against the gradient's sign (m/sqrt(v) = sign g),
    # after AdamW's decoupled decay shrinks the parameter by lr * weight_decay (0.1 * 0.01).
    g = np.asarray(grads["A"])
    expected = np.asarray(params["A"]) * (1 - 0.1 * 0.01) - 0.1 * g / (np.abs(g) + 1e-8)
    assert_close(new["A"], expected, rtol=1e-9, like=params["A"])  # also the input's namespace and dtype


def test_parameters_without_gradient_are_skipped():
    params = {"A": np.ones((2, 2)), "B": np.ones((2, 2))}
    new, state = adam_step(params, {"A": np.ones((2, 2))}, AdamState(), single_group(params, adam(lr=0.1)))
    assert new["B"] is params["B"] and "B" not in state.step


def test_state_round_trips_through_safetensors(tmp_path):
    rng = np.random.default_rng(2)
    params = {"x.lora_A": rng.standard_normal((2, 3)), "x.lora_B": rng.standard_normal((4, 2))}
    groups = loraplus_groups(params, adamw(lr=1e-2, amsgrad=True), lr_ratio=4)
    state = AdamState()
    for _ in range(3):
        params, state = adam_step(params, {n: rng.standard_normal(p.shape) for n, p in params.items()}, state, groups)
    save_adam_state(tmp_path / "state.safetensors", state, groups)
    loaded, loaded_groups = load_adam_state(tmp_path / "state.safetensors")
    assert loaded.step == state.step and loaded_groups == groups
    for kind in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        for n in params:
            np.testing.assert_array_equal(getattr(loaded, kind)[n], getattr(state, kind)[n])


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="betas"):
        adam(betas=(1.0, 0.999))
    with pytest.raises(ConfigError, match="lr_ratio"):
        loraplus_groups({"a": np.ones(2)}, adam(), lr_ratio=0)
    params = {"A": np.ones((2, 2))}
    with pytest.raises(ShapeError, match="gradient of A"):
        adam_step(params, {"A": np.ones((2, 3))}, AdamState(), single_group(params, adam()))
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(FormatError, match="junk.safetensors"):
        load_adam_state(tmp_path / "junk.safetensors")
