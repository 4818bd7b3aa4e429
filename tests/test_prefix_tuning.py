"""Prefix tuning (refpeft.model.prefix_tuning in refpeft.model.decoder) against PEFT's PREFIX_TUNING in float64.

The float64 peer is transformers + PEFT with tests/test_model_decoder.py's patch removing
transformers' float32 casts, on a left-padded batch; the loss is a float64 cross-entropy of its
logits. Finite differences check the prefix table's gradient through the decoder (attention's
backward w.r.t. the past keys and values) and the reparameterisation MLP's.
"""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.errors import ConfigError, InputError, ShapeError
from refpeft.model.config import config_from_dict
from refpeft.model.decoder import Model, backward, forward, loss_and_gradients
from refpeft.model.generate import generate
from refpeft.model.prefix_tuning import (prefix_init, prefix_table, prefix_table_backward, read_prefix_tuning,
                                         write_prefix_tuning)
from tests.support import vjp_check
from tests.test_prompt_tuning import PROMPTS, cached_logits, peft_greedy_recomputed
from tests.test_model_decoder import TINY, float64_transformers, padded_batch, peer_model, refpeft_model, rel_err

torch = pytest.importorskip("torch", reason="transformers + PEFT on torch are the peers checked here")
peft = pytest.importorskip("peft")

K = 3
FAMILY = {"llama-gqa-llama3": "llama", "qwen2-bias": "qwen2", "qwen3-qk-norm": "qwen3"}


def _peft_prefix(base, *, projection: bool, seed: int = 3):
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K, prefix_projection=projection,
                                     encoder_hidden_size=24 if projection else None)
    model = peft.get_peft_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_encoder["default"].parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return model.to(torch.float64)


def _encoder_params(peer) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in peer.prompt_encoder["default"].named_parameters()}


def _peer_loss_and_logits(peer, family, ids, mask, labels):
    with float64_transformers(family):
        logits = peer(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        V = logits.shape[-1]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V),
                                                 torch.from_numpy(labels[:, 1:]).reshape(-1))
        loss.backward()
    return loss, logits.detach().numpy()


@pytest.mark.parametrize("projection", [False, True], ids=["table", "mlp"])
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_logits_loss_and_every_gradient_equal_peft(name, projection):
    base = peer_model(name)
    weights = refpeft_model(base).weights
    peer = _peft_prefix(base, projection=projection)
    ids, mask, labels = padded_batch(TINY["vocab_size"])
    loss, theirs = _peer_loss_and_logits(peer, FAMILY[name], ids, mask, labels)
    params = _encoder_params(peer)
    assert ("transform.2.weight" in params) == projection
    table, cache = prefix_table(params)
    model = Model(config_from_dict(base.config.to_dict()), weights, prefix=table)
    ours_loss, ours, grads = loss_and_gradients(model, ids, labels, attention_mask=mask)
    assert ours.shape == theirs.shape                                    # no logits for the virtual tokens
    real = mask == 1
    assert rel_err(ours[real], theirs[real]) < 1e-10
    assert abs(float(ours_loss) - float(loss)) <= 1e-10 * float(loss)
    assert set(grads) == {"prompt_embeddings"}
    encoder_grads = prefix_table_backward(grads["prompt_embeddings"], cache)
    theirs_grads = {n: p.grad.numpy() for n, p in peer.prompt_encoder["default"].named_parameters()}
    assert set(encoder_grads) == set(theirs_grads)
    for n, g in theirs_grads.items():
        assert rel_err(encoder_grads[n], g) < 1e-9, n


def test_the_prefix_gradient_matches_finite_differences():
    model = refpeft_model(peer_model("llama-gqa-llama3"))
    ids, mask, _ = padded_batch(TINY["vocab_size"])
    table = 0.5 * prefix_init(model.config, K, seed=1)["embedding.weight"]
    logits, tape, _ = forward(Model(model.config, model.weights, prefix=table), ids, attention_mask=mask)
    dy = np.random.default_rng(0).standard_normal(logits.shape)
    grads = backward(Model(model.config, model.weights, prefix=table), dy, tape)

    def f(prefix):
        return forward(Model(model.config, model.weights, prefix=prefix), ids, attention_mask=mask)[0]

    vjp_check(f, {"prefix": table}, {"prefix": grads["prompt_embeddings"]}, dy)


def test_the_reparameterisation_gradient_matches_finite_differences():
    config = refpeft_model(peer_model("llama-tied")).config
    params = prefix_init(config, K, projection=True, encoder_hidden_size=5, seed=2)
    table, cache = prefix_table(params)
    dy = np.random.default_rng(1).standard_normal(table.shape)
    grads = prefix_table_backward(dy, cache)
    assert set(grads) == set(params)
    vjp_check(lambda **p: prefix_table(p)[0], params, grads, dy)


def test_peft_files_in_and_out(tmp_path):
    base = peer_model("llama-gqa-llama3")
    model = refpeft_model(base)
    peer = _peft_prefix(base, projection=True)
    peer.save_pretrained(tmp_path / "peft")
    table, config = read_prefix_tuning(tmp_path / "peft")                # PEFT saves the MLP's output
    assert np.allclose(table, prefix_table(_encoder_params(peer))[0], rtol=0, atol=1e-13)
    assert config["prefix_projection"] is True and config["num_virtual_tokens"] == K
    # PEFT loads into a float32 embedding (torch's default dtype) before .to(float64): float32 values load exactly
    table = 2.0 * table.astype(np.float32).astype(np.float64)
    write_prefix_tuning(tmp_path / "ours", table, model.config)
    loaded = peft.PeftModel.from_pretrained(peer_model("llama-gqa-llama3"), tmp_path / "ours").to(torch.float64)
    assert np.array_equal(loaded.prompt_encoder["default"].embedding.weight.detach().numpy(), table)
    ids, mask, _ = padded_batch(TINY["vocab_size"])
    with float64_transformers("llama"), torch.no_grad():
        theirs = loaded(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    ours = forward(Model(model.config, model.weights, prefix=table), ids, attention_mask=mask)[0]
    assert rel_err(ours[mask == 1], theirs[mask == 1]) < 1e-10


def test_given_positions_are_shifted_by_the_prefix_as_peft_shifts_them():
    model = refpeft_model(peer_model("llama-tied"))
    prefixed = Model(model.config, model.weights, prefix=prefix_init(model.config, K, seed=4)["embedding.weight"])
    ids = np.asarray([[3, 5, 8, 1]])
    default = forward(prefixed, ids)[0]
    assert np.array_equal(forward(prefixed, ids, position_ids=np.arange(4)[None, :])[0], default)
    assert not np.allclose(forward(prefixed, ids, position_ids=np.arange(1, 5)[None, :])[0], default)


@pytest.mark.parametrize("name", ["llama-gqa-llama3", "qwen2-bias"])
def test_greedy_generation_equals_peft_recomputed(name):
    family = FAMILY[name]
    base = peer_model(name)
    weights = refpeft_model(base).weights
    peer = _peft_prefix(base, projection=False)
    table = peer.prompt_encoder["default"].embedding.weight.detach().numpy().copy()
    model = Model(config_from_dict(base.config.to_dict()), weights, prefix=table)
    for prompts in (PROMPTS[:1], PROMPTS):                               # one prompt; a left-padded batch
        theirs, their_logits = peft_greedy_recomputed(peer, family, prompts, max_new_tokens=10, prefix_k=K)
        assert generate(model, prompts, max_new_tokens=10, pad_token_id=0) == theirs
        assert rel_err(np.stack(cached_logits(model, prompts, theirs)), np.stack(their_logits)) < 1e-10
    assert theirs != generate(Model(model.config, weights), PROMPTS, max_new_tokens=10, pad_token_id=0)


def test_bad_input_is_refused(tmp_path):
    model = refpeft_model(peer_model("llama-tied"))
    table = np.zeros((K, 4))
    with pytest.raises(ShapeError, match="the prefix table has shape"):
        forward(Model(model.config, model.weights, prefix=table), np.asarray([[1, 2]]))
    long = prefix_init(model.config, TINY["max_position_embeddings"], seed=0)["embedding.weight"]
    with pytest.raises(InputError, match="exceed the model's max_position_embeddings"):
        forward(Model(model.config, model.weights, prefix=long), np.asarray([[1, 2]]))
    table = prefix_init(model.config, K)["embedding.weight"]
    with pytest.raises(ConfigError, match="not both"):
        forward(Model(model.config, model.weights, prompt=np.zeros((K, TINY["hidden_size"])), prefix=table),
                np.asarray([[1, 2]]))
    with pytest.raises(InputError, match="after 3 virtual tokens"):
        generate(Model(model.config, model.weights, prefix=table), [[1] * 60], max_new_tokens=3)   # 65 > 64 positions
    with pytest.raises(ConfigError, match="peft_type is 'PROMPT_TUNING'"):
        (tmp_path / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
        read_prefix_tuning(tmp_path)
