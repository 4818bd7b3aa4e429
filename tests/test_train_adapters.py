"""refpeft.train.adapters: targets chosen as PEFT chooses them, PEFT's initialisations, the flat
parameter dict the decoder's gradients use, and the optimiser groups of Trainer and LoRA+.

- Target names select the same modules as PEFT's `target_modules` (lists and "all-linear"); a
  name matching no layer is refused, naming it and the layer names there are.
- A fresh LoRA adapter drawn with generator "torch-cpu" from one seed is bit for bit PEFT's layer
  after torch.manual_seed(seed); B = 0; DoRA's magnitude equals PEFT's; VeRA's shared projections
  are PEFT's bit for bit, lambda_d = d_initial, lambda_b = 0; rank and alpha patterns give each
  module PEFT's rank and scaling.
- trainable_parameters names exactly the gradients loss_and_gradients returns, and
  with_parameters puts them back.
- The groups: LoRA+ gives every tensor the learning rate and weight decay PEFT's
  create_loraplus_optimizer gives it; without LoRA+, the weight-decay split is transformers'
  Trainer's (`get_decay_parameter_names`) on the full model.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from refpeft.errors import ConfigError
from refpeft.model.decoder import loss_and_gradients
from refpeft.optim import adamw
from refpeft.train.adapters import new_adapter, optimizer_groups, select_targets, trainable_parameters, with_parameters
from tests.test_model_decoder import TINY, padded_batch, peer_model, refpeft_model

torch = pytest.importorskip("torch", reason="PEFT on torch is the peer")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer  # noqa: E402

NAME = "llama-gqa-llama3"
PEER_TENSORS = {"lora_A": "A", "lora_B": "B", "lora_magnitude_vector": "magnitude", "vera_lambda_d": "lambda_d",
                "vera_lambda_b": "lambda_b"}


def peft_names(peer) -> dict[str, str]:
    """PEFT's trainable parameter name -> refpeft's decoder name."""
    out = {}
    for n, p in peer.named_parameters():
        if p.requires_grad:
            kind = next(k for k in PEER_TENSORS if f".{k}" in n)
            out[n] = f"{n.split('.' + kind)[0].removeprefix('base_model.model.')}.{PEER_TENSORS[kind]}"
    return out


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["down_proj", "o_proj", "k_proj"],
                                     ["model.layers.1.mlp.up_proj", "lm_head"], "all-linear",
                                     r".*\.1\.self_attn\.(q|k)_proj"])
def test_targets_select_what_peft_selects(targets):
    base = refpeft_model(peer_model(NAME))
    peer = peft.get_peft_model(peer_model(NAME), peft.LoraConfig(r=2, target_modules=targets))
    theirs = [n.removeprefix("base_model.model.") for n, m in peer.named_modules() if hasattr(m, "lora_A")]
    assert select_targets(base, targets) == theirs


def test_unknown_targets_are_refused():
    base = refpeft_model(peer_model(NAME))
    with pytest.raises(ConfigError, match="target 'qkv_proj' matches no linear layer.*named down_proj, gate_proj"):
        select_targets(base, ["q_proj", "qkv_proj"])
    with pytest.raises(ConfigError, match="matches no linear layer path"):
        select_targets(base, r"layers\.7\..*")
    with pytest.raises(ConfigError, match="unsupported adapter method 'sora'"):
        new_adapter(base, method="sora", targets=["q_proj"])
    with pytest.raises(ConfigError, match="vera shares its projections across layers, so it has one rank"):
        new_adapter(base, method="vera", targets=["q_proj"], rank_pattern={"q_proj": 2})
    with pytest.raises(ConfigError, match=r"pattern key '\('.* is not a valid regular expression"):
        new_adapter(base, method="lora", targets=["q_proj"], rank_pattern={"(": 2})


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_and_dora_init_equal_peft(method):
    path, seed = "model.layers.1.self_attn.v_proj", 17
    base = refpeft_model(peer_model(NAME))
    ours = new_adapter(base, method=method, targets=[path], rank=4, alpha=6.0, seed=seed, generator="torch-cpu")
    peer = peer_model(NAME)
    torch.manual_seed(seed)
    peer = peft.get_peft_model(peer, peft.LoraConfig(r=4, lora_alpha=6, target_modules=[path],
                                                     use_dora=method == "dora"))
    module, layer = ours.modules[path], peer.get_submodule("base_model.model." + path)
    assert np.array_equal(module.A, layer.lora_A["default"].weight.detach().numpy())
    assert not np.any(module.B) and not torch.any(layer.lora_B["default"].weight)
    assert module.scaling == layer.scaling["default"]
    if method == "dora":
        peer_m = layer.lora_magnitude_vector["default"].weight.detach().numpy()
        assert np.allclose(module.magnitude, peer_m, rtol=1e-15, atol=0)
        assert np.allclose(module.magnitude, np.linalg.norm(base.weights[path + ".weight"], axis=1), rtol=1e-15)


def test_vera_init_equals_peft():
    base = refpeft_model(peer_model(NAME))
    ours = new_adapter(base, method="vera", targets=["q_proj", "down_proj"], rank=4, projection_prng_key=7)
    peer = peft.get_peft_model(peer_model(NAME), peft.VeraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                                  projection_prng_key=7))
    assert np.array_equal(ours.vera_A, peer.base_model.vera_A["default"].numpy())
    assert np.array_equal(ours.vera_B, peer.base_model.vera_B["default"].numpy())
    for path, module in ours.modules.items():
        assert np.all(module.lambda_d == 0.1) and not np.any(module.lambda_b) and module.lambda_b.shape[0] == \
            peer.get_submodule("base_model.model." + path).vera_lambda_b["default"].shape[0]
    assert ours.config == {"projection_prng_key": 7, "d_initial": 0.1}


def test_rank_and_alpha_patterns_follow_peft():
    patterns = dict(rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 5}, alpha_pattern={"v_proj": 3.0})
    base = refpeft_model(peer_model(NAME))
    ours = new_adapter(base, method="rslora", targets="all-linear", rank=4, alpha=8.0, **patterns)
    peer = peft.get_peft_model(peer_model(NAME), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                  use_rslora=True, **patterns))
    for path, module in ours.modules.items():
        layer = peer.get_submodule("base_model.model." + path)
        assert (module.r, module.scaling) == (layer.r["default"], layer.scaling["default"]), path


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "full"])
def test_parameters_are_named_as_the_decoder_gradients(method):
    base = refpeft_model(peer_model(NAME))
    model = base if method == "full" else replace(base, adapter=new_adapter(base, method=method, targets=["v_proj"],
                                                                            rank=2))
    ids, mask, labels = padded_batch(TINY["vocab_size"])
    _, _, grads = loss_and_gradients(model, ids, labels, attention_mask=mask, train_base=method == "full")
    params = trainable_parameters(model)
    assert set(params) == set(grads) and all(params[n].shape == grads[n].shape for n in grads)
    moved = {n: p + 1.0 for n, p in params.items()}
    back = trainable_parameters(with_parameters(model, moved))
    assert all(np.array_equal(back[n], moved[n]) for n in params)
    with pytest.raises(ConfigError, match="do not match"):
        with_parameters(model, {**moved, "extra.A": moved[next(iter(moved))]})


@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_loraplus_groups_equal_peft(method):
    base = refpeft_model(peer_model(NAME))
    model = replace(base, adapter=new_adapter(base, method=method, targets=["q_proj", "v_proj"], rank=4))
    config = peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]) if method == "vera" else \
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=method == "dora")
    peer = peft.get_peft_model(peer_model(NAME), config)
    optimizer = create_loraplus_optimizer(peer, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                          loraplus_weight_decay=0.05)
    names = peft_names(peer)
    by_param = {id(p): n for n, p in peer.named_parameters()}
    theirs = {names[by_param[id(p)]]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    groups = optimizer_groups(model, trainable_parameters(model), adamw(lr=1e-3, weight_decay=0.05),
                              loraplus_ratio=16.0)
    ours = {n: (g.config.lr, g.config.weight_decay) for g in groups for n in g.names}
    assert ours == theirs


@pytest.mark.parametrize("name", ["qwen2-bias", "qwen3-qk-norm"])              # biases; q/k norm weights
def test_full_fine_tuning_decay_groups_equal_trainer(name):
    peer = peer_model(name)
    model = refpeft_model(peer)
    groups = optimizer_groups(model, trainable_parameters(model), adamw(lr=1e-3, weight_decay=0.1))
    decayed = {n for g in groups if g.config.weight_decay == 0.1 for n in g.names}
    assert decayed == set(transformers.Trainer.get_decay_parameter_names(None, peer))
    assert len(groups) == 2 and {n for g in groups for n in g.names} == set(model.weights)
    with pytest.raises(ConfigError, match="LoRA\\+ .* does not apply to full fine-tuning"):
        optimizer_groups(model, trainable_parameters(model), adamw(), loraplus_ratio=2.0)
