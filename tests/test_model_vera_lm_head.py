"""The whole decoder with VeRA on all seven linear layers of every block, and with LoRA on the LM head
(tied and untied), against transformers + PEFT on torch CPU in float64 (the float64 patch and the
tiny random models of tests/test_model_decoder.py).

VeRA's layers differ in shape (q/o 32 x 32, k/v 16 x 32, gate/up 48 x 32, down 32 x 48), so each
slices its own corner of one shared pair of projections sized to the largest (PEFT's `_find_dim`):
vera_A (r, 48), vera_B (48, r). The adapter reaches refpeft through PEFT's own files
(`save_pretrained` with save_projection=True, read by refpeft.peft_format), so this also checks that
the file names the modules and projections as the decoder uses them. A tied LM head is the
embedding matrix; PEFT adapts it like any linear layer (its LoRA branch adds to the logits only).
"""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.model.config import config_from_dict
from refpeft.model.decoder import Model, check_adapter_targets, loss_and_gradients
from refpeft.peft_format import read_peft_adapter
from tests.test_model_decoder import FAMILIES, TARGETS, TINY, _refpeft_adapter, float64_transformers, padded_batch, \
    peer_model, refpeft_model, rel_err

torch = pytest.importorskip("torch", reason="transformers on torch is the peer checked here")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PEFT_NAMES = {"lora_A": "A", "lora_B": "B", "vera_lambda_d": "lambda_d", "vera_lambda_b": "lambda_b"}


def _peer_gradients(peer, family: str):
    """PEFT's loss and its trainable tensors' gradients by refpeft's name ("<module path>.<tensor>")."""
    ids, mask, labels = padded_batch(TINY["vocab_size"])
    with float64_transformers(family):
        logits = peer(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        V = TINY["vocab_size"]
        targets = torch.from_numpy(labels[:, 1:]).reshape(-1)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), targets)
        loss.backward()
    grads = {}
    for n, p in peer.named_parameters():
        if p.requires_grad:
            parts = n.removeprefix("base_model.model.").split(".")       # <path>.lora_A.default.weight
            at = next(i for i, part in enumerate(parts) if part in PEFT_NAMES)
            grads[".".join(parts[:at] + [PEFT_NAMES[parts[at]]])] = p.grad.numpy()
    return loss.item(), grads


def _assert_gradients_equal(model: Model, loss: float, expected: dict) -> float:
    ids, mask, labels = padded_batch(TINY["vocab_size"])
    ours_loss, _, grads = loss_and_gradients(model, ids, labels, attention_mask=mask)
    assert abs(float(ours_loss) - loss) <= 1e-10 * loss
    assert sorted(grads) == sorted(expected)
    errors = {name: rel_err(grads[name], g) for name, g in expected.items()}
    assert max(errors.values()) < 1e-9, max(errors.items(), key=lambda e: e[1])
    return max(errors.values())


@pytest.mark.parametrize("name", ["llama-gqa-llama3", "qwen2-bias", "qwen3-qk-norm"])
def test_vera_on_every_linear_layer_gradients_equal_peft(name, tmp_path):
    family = FAMILIES[name][0]
    base = peer_model(name)
    weights = refpeft_model(base).weights                           # copied before PEFT wraps the layers
    peer = peft.get_peft_model(base, peft.VeraConfig(r=4, target_modules=list(TARGETS), projection_prng_key=11,
                                                     save_projection=True, vera_dropout=0.0))
    torch.manual_seed(4)
    with torch.no_grad():                           # both vectors random (lambda_b = 0 would zero dlambda_d)
        for n, p in peer.named_parameters():
            if "vera_lambda" in n:
                p.copy_(0.5 * torch.randn_like(p))
    loss, expected = _peer_gradients(peer, family)
    peer.save_pretrained(tmp_path)
    adapter = read_peft_adapter(tmp_path, dtype="float64")
    assert adapter.method == "vera" and len(adapter.modules) == 7 * TINY["num_hidden_layers"]
    assert tuple(adapter.vera_A.shape) == (4, TINY["intermediate_size"])
    np.testing.assert_array_equal(adapter.vera_A, peer.base_model.vera_A["default"].numpy())
    np.testing.assert_array_equal(adapter.vera_B, peer.base_model.vera_B["default"].numpy())
    model = Model(config_from_dict(base.config.to_dict()), weights, adapter)
    check_adapter_targets(model)
    _assert_gradients_equal(model, loss, expected)


@pytest.mark.parametrize("targets", [["lm_head"], ["lm_head", "q_proj", "down_proj"]], ids="+".join)
@pytest.mark.parametrize("name", ["llama-gqa-llama3", "llama-tied"])
def test_lora_on_the_lm_head_gradients_equal_peft(name, targets):
    base = peer_model(name)
    weights = refpeft_model(base).weights
    peer = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                                     init_lora_weights=False))
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in peer.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn_like(p))
    loss, expected = _peer_gradients(peer, "llama")
    assert "lm_head.A" in expected and "lm_head.B" in expected
    model = Model(config_from_dict(base.config.to_dict()), weights, _refpeft_adapter(peer, "lora"))
    check_adapter_targets(model)
    _assert_gradients_equal(model, loss, expected)
