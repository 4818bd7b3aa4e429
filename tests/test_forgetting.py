"""Losses that keep what the base knew: distillation from the frozen base (refpeft.model.distillation)
and elastic weight consolidation (refpeft.train.ewc), against torch's autograd and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.errors import ConfigError, InputError
from refpeft.model.decoder import Model
from refpeft.model.distillation import distillation_backward, distillation_forward
from refpeft.train.ewc import diagonal_fisher, ewc_penalty, fisher_names
from tests.support import vjp_check
from tests.test_model_decoder import TINY, float64_transformers, padded_batch, peer_model, refpeft_model, rel_err

torch = pytest.importorskip("torch", reason="torch's autograd is the peer checked here")


def _logits(seed: int, b: int = 2, s: int = 5, V: int = 11):
    rng = np.random.default_rng(seed)
    return 3 * rng.standard_normal((b, s, V)), 3 * rng.standard_normal((b, s, V)), rng.integers(0, 2, (b, s))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.5, 1.0, 2.0, 4.0]))
def test_distillation_equals_torch_kl_div_and_its_autograd(seed, T):
    z, zb, counted = _logits(seed)
    counted[0, 0] = 1
    loss, cache = distillation_forward(z, zb, temperature=T, counted=counted)
    dz = distillation_backward(np.asarray(1.0), cache)
    tz = torch.tensor(z, requires_grad=True)
    per_row = torch.nn.functional.kl_div(torch.log_softmax(tz / T, -1), torch.log_softmax(torch.tensor(zb) / T, -1),
                                         log_target=True, reduction="none").sum(-1)
    theirs = (per_row * torch.tensor(counted)).sum() * T**2 / counted.sum()
    theirs.backward()
    assert abs(float(loss) - float(theirs)) <= 1e-12 * max(1.0, abs(float(theirs)))
    assert np.max(np.abs(dz - tz.grad.numpy())) <= 1e-12 * max(1.0, np.max(np.abs(tz.grad.numpy())))


def test_distillation_is_zero_at_the_base_and_its_gradient_matches_finite_differences():
    z, zb, counted = _logits(1)
    loss, cache = distillation_forward(zb, zb, temperature=2.0, counted=counted)
    assert abs(float(loss)) < 1e-15 and np.max(np.abs(distillation_backward(1.0, cache))) < 1e-15
    _, cache = distillation_forward(z, zb, temperature=2.0, counted=counted)
    dy = np.asarray(0.7)
    vjp_check(lambda logits: distillation_forward(logits, zb, temperature=2.0, counted=counted)[0],
              {"logits": z}, {"logits": distillation_backward(dy, cache)}, dy)


def test_distillation_refuses_bad_input():
    z, zb, _ = _logits(2)
    with pytest.raises(ConfigError, match="temperature must be a positive number"):
        distillation_forward(z, zb, temperature=0.0)
    with pytest.raises(InputError, match="no row counts"):
        distillation_forward(z, zb, counted=np.zeros(z.shape[:2]))


def _lora(model: Model, seed: int, rslora: bool = False) -> Adapter:
    rng = np.random.default_rng(seed)
    modules = {}
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        d, k = model.weights[f"{path}.weight"].shape
        modules[path] = ModuleAdapter("lora", {"A": rng.standard_normal((3, k)), "B": rng.standard_normal((d, 3))},
                                      alpha=6.0, rslora=rslora)
    return Adapter(modules)


@pytest.mark.parametrize("rslora", [False, True])
def test_the_ewc_penalty_gradient_matches_finite_differences(rslora):
    base = refpeft_model(peer_model("llama-gqa-llama3"))
    adapter = _lora(base, 3, rslora)
    rng = np.random.default_rng(4)
    fisher = {name: rng.random(base.weights[name].shape) for name in fisher_names(Model(base.config, base.weights,
                                                                                        adapter))}
    _, grads = ewc_penalty(Model(base.config, base.weights, adapter), fisher, 0.3)
    for path, module in adapter.modules.items():
        def penalty(A, B, path=path, module=module):
            changed = Adapter({**adapter.modules, path: module.replace(A=A, B=B)})
            return np.asarray(ewc_penalty(Model(base.config, base.weights, changed), fisher, 0.3)[0])

        vjp_check(penalty, {"A": module.A, "B": module.B}, {"A": grads[f"{path}.A"], "B": grads[f"{path}.B"]},
                  np.asarray(1.0))


def test_full_fine_tuning_penalty_and_gradient():
    base = refpeft_model(peer_model("llama-tied"))
    rng = np.random.default_rng(5)
    moved = {n: w + 0.01 * rng.standard_normal(w.shape) for n, w in base.weights.items()}
    fisher = {n: rng.random(w.shape) for n, w in base.weights.items()}
    value, grads = ewc_penalty(Model(base.config, moved), fisher, 2.0, reference=base.weights)
    direct = sum(np.sum(fisher[n] * (moved[n] - base.weights[n]) ** 2) for n in fisher)
    assert abs(float(value) - direct) <= 1e-12 * direct
    assert all(np.allclose(grads[n], 2.0 * fisher[n] * (moved[n] - base.weights[n]), rtol=0, atol=0) for n in fisher)
    with pytest.raises(ConfigError, match="needs the base weights"):
        ewc_penalty(Model(base.config, moved), fisher, 2.0)


def test_the_fisher_is_the_mean_squared_per_example_gradient_of_torch():
    peer = peer_model("qwen2-bias")
    base = refpeft_model(peer)
    ids, mask, labels = padded_batch(TINY["vocab_size"])
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    ours = diagonal_fisher(base, [(ids[e:e + 1], labels[e:e + 1], mask[e:e + 1]) for e in range(2)], names)
    params = dict(peer.named_parameters())
    squares = {n: 0.0 for n in names}
    for e in range(2):
        peer.zero_grad()
        with float64_transformers("qwen2"):
            logits = peer(torch.from_numpy(ids[e:e + 1]), attention_mask=torch.from_numpy(mask[e:e + 1])).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], torch.from_numpy(labels[e, 1:]))
            loss.backward()
        for n in names:
            squares[n] = squares[n] + params[n].grad.numpy() ** 2
    for n in names:
        assert rel_err(ours[n], squares[n] / 2) < 1e-9, n


def test_ewc_refuses_methods_it_has_no_derivation_for():
    base = refpeft_model(peer_model("llama-tied"))
    path = "model.layers.0.self_attn.q_proj"
    d, k = base.weights[f"{path}.weight"].shape
    dora = ModuleAdapter("dora", {"A": np.ones((2, k)), "B": np.zeros((d, 2)), "magnitude": np.ones(d)}, alpha=2.0)
    with pytest.raises(ConfigError, match="derived for lora"):
        fisher_names(Model(base.config, base.weights, Adapter({path: dora})))
