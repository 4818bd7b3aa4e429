"""P-tuning (refpeft.model.p_tuning through refpeft.model.decoder's prompt) against PEFT's P_TUNING in float64.

The float64 peer is transformers + PEFT with tests/test_model_decoder.py's patch removing
transformers' float32 casts, on a left-padded batch; the loss is a float64 cross-entropy with the
virtual positions' labels at -100, as PEFT prefixes them. Finite differences check the MLP and
LSTM encoders' backward.
"""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.errors import ConfigError
from refpeft.model.config import config_from_dict
from refpeft.model.decoder import Model, forward, loss_and_gradients
from refpeft.model.p_tuning import (p_tuning_backward, p_tuning_forward, p_tuning_init, read_p_tuning,
                                    write_p_tuning)
from tests.support import vjp_check
from tests.test_model_decoder import TINY, float64_transformers, padded_batch, peer_model, refpeft_model, rel_err

torch = pytest.importorskip("torch", reason="transformers + PEFT on torch are the peers checked here")
peft = pytest.importorskip("peft")

K = 3
FAMILY = {"llama-gqa-llama3": "llama", "qwen2-bias": "qwen2"}


def _peft_p_tuning(base, encoder: str, seed: int = 3):
    config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=K, encoder_hidden_size=20,
                                      encoder_reparameterization_type=encoder)
    model = peft.get_peft_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_encoder["default"].parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return model.to(torch.float64)


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_logits_loss_and_every_gradient_equal_peft(name, encoder):
    base = peer_model(name)
    weights = refpeft_model(base).weights
    peer = _peft_p_tuning(base, encoder)
    ids, mask, labels = padded_batch(TINY["vocab_size"])
    V = TINY["vocab_size"]
    with float64_transformers(FAMILY[name]):
        theirs = peer(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        full_labels = np.concatenate([np.full((2, K), -100), labels], axis=1)
        loss = torch.nn.functional.cross_entropy(theirs[:, :-1].reshape(-1, V),
                                                 torch.from_numpy(full_labels[:, 1:]).reshape(-1))
        loss.backward()
    named = dict(peer.prompt_encoder["default"].named_parameters())
    P, cache = p_tuning_forward({n: p.detach().numpy().copy() for n, p in named.items()})
    model = Model(config_from_dict(base.config.to_dict()), weights, prompt=P)
    ours_loss, ours, grads = loss_and_gradients(model, ids, labels, attention_mask=mask)
    real = np.concatenate([np.ones((2, K), bool), mask == 1], axis=1)
    assert rel_err(ours[real], theirs.detach().numpy()[real]) < 1e-10
    assert abs(float(ours_loss) - float(loss.detach())) <= 1e-10 * float(loss.detach())
    encoder_grads = p_tuning_backward(grads["prompt_embeddings"], cache)
    assert set(encoder_grads) == set(named)
    for n, p in named.items():
        assert rel_err(encoder_grads[n], p.grad.numpy()) < 1e-9, n


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_the_encoder_gradients_match_finite_differences(encoder):
    params = p_tuning_init(6, K, encoder=encoder, encoder_hidden_size=5, seed=1)
    P, cache = p_tuning_forward(params)
    dy = np.random.default_rng(0).standard_normal(P.shape)
    grads = p_tuning_backward(dy, cache)
    assert set(grads) == set(params)
    vjp_check(lambda **p: p_tuning_forward(p)[0], params, grads, dy)


def test_peft_files_in_and_out(tmp_path):
    base = peer_model("llama-gqa-llama3")
    model = refpeft_model(base)
    peer = _peft_p_tuning(base, "MLP")
    peer.save_pretrained(tmp_path / "peft")
    prompt, config = read_p_tuning(tmp_path / "peft")                  # PEFT saves the encoder's output
    named = {n: p.detach().numpy() for n, p in peer.prompt_encoder["default"].named_parameters()}
    assert np.allclose(prompt, p_tuning_forward(named)[0], rtol=0, atol=1e-13)
    assert config["encoder_reparameterization_type"] == "MLP"
    # PEFT loads into a float32 embedding (torch's default dtype) before .to(float64): float32 values load exactly
    prompt = 2.0 * prompt.astype(np.float32).astype(np.float64)
    write_p_tuning(tmp_path / "ours", prompt, num_attention_heads=TINY["num_attention_heads"],
                   num_layers=TINY["num_hidden_layers"])
    loaded = peft.PeftModel.from_pretrained(peer_model("llama-gqa-llama3"), tmp_path / "ours").to(torch.float64)
    ids = np.asarray([[5, 7, 11, 13]])
    with float64_transformers("llama"), torch.no_grad():
        theirs = loaded(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert rel_err(forward(Model(model.config, model.weights, prompt=prompt), ids)[0], theirs) < 1e-10


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="encoder_reparameterization_type must be one of"):
        p_tuning_init(6, K, encoder="GRU")
    with pytest.raises(ConfigError, match="no embedding.weight"):
        p_tuning_forward({"mlp_head.0.weight": np.zeros((2, 2))})
    with pytest.raises(ConfigError, match="peft_type is 'PREFIX_TUNING'"):
        (tmp_path / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
        read_p_tuning(tmp_path)
