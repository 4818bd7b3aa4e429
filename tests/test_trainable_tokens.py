"""Trainable tokens (refpeft.model.trainable_tokens) against PEFT in float64, alone and beside LoRA.

The peer is PEFT's TrainableTokensConfig / LoraConfig(trainable_token_indices=...) on the float64
tiny decoders of tests/test_model_decoder.py with random values in trainable_tokens_delta (and in
lora_B); logits, the loss and the gradient of the delta (and of LoRA's tensors) equal refpeft's.
The tied model checks that the head follows the replaced rows and that the delta's gradient has
both parts. Files go both ways; a token index outside the vocabulary is refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from refpeft.errors import ConfigError, InputError
from refpeft.io import read_safetensors, write_safetensors
from refpeft.model.decoder import loss_and_gradients
from refpeft.model.trainable_tokens import (EMBED, KEY, LORA_KEY, read_trainable_tokens, tokens_backward, tokens_init,
                                            with_tokens, write_trainable_tokens)
from refpeft.peft_format import read_peft_adapter
from tests.test_model_decoder import TINY, float64_transformers, padded_batch, peer_model, refpeft_model, rel_err

torch = pytest.importorskip("torch", reason="PEFT on torch is the peer")
peft = pytest.importorskip("peft")

V = TINY["vocab_size"]


def _indices(ids):
    return [int(ids[0, 0]), int(ids[1, 3]), 17, 40]        # two that the batch reads, two only the tied head sees


def _peer(name, indices, lora: bool):
    config = (peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], trainable_token_indices=indices) if lora
              else peft.TrainableTokensConfig(token_indices=indices))
    peer = peft.get_peft_model(peer_model(name), config)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in peer.named_parameters():
            if "trainable_tokens_delta" in n or "lora_B" in n:
                p.copy_(0.3 * torch.randn_like(p))
    return peer


def _delta(peer):
    return next(p for n, p in peer.named_parameters() if "trainable_tokens_delta" in n)


def _peer_loss(peer, family, ids, mask, labels):
    with float64_transformers(family):
        logits = peer(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), torch.from_numpy(labels[:, 1:]).reshape(-1))
        loss.backward()
    return logits.detach().numpy(), float(loss)


def _lora_adapter(peer, folder):
    """The peer's LoRA tensors read by refpeft: its folder without the token adapter's key and indices."""
    peer.save_pretrained(folder)
    tensors, _ = read_safetensors(folder / "adapter_model.safetensors")
    write_safetensors(folder / "adapter_model.safetensors", {k: v for k, v in tensors.items() if k != LORA_KEY})
    config = json.loads((folder / "adapter_config.json").read_text())
    config["trainable_token_indices"] = None
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return read_peft_adapter(folder)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("name", ["llama-tied", "llama-gqa-llama3"])
def test_logits_loss_and_delta_gradient_equal_peft(name, lora, tmp_path):
    ids, mask, labels = padded_batch(V)
    indices = _indices(ids)
    peer = _peer(name, indices, lora)
    theirs, their_loss = _peer_loss(peer, "llama", ids, mask, labels)
    adapter = _lora_adapter(peer, tmp_path / "lora") if lora else None
    values = _delta(peer).detach().numpy().copy()
    model = with_tokens(refpeft_model(peer_model(name), adapter), indices, values)
    loss, ours, grads = loss_and_gradients(model, ids, labels, attention_mask=mask, train_base=[EMBED])
    rows = mask == 1
    assert rel_err(ours[rows], theirs[rows]) < 1e-10
    assert abs(float(loss) - their_loss) <= 1e-10 * their_loss
    assert rel_err(tokens_backward(grads[EMBED], indices), _delta(peer).grad.numpy()) < 1e-9
    if lora:
        lora_grads = {n: p.grad.numpy() for n, p in peer.named_parameters() if "lora_B" in n}
        for key, g in lora_grads.items():
            path = key.removeprefix("base_model.model.").split(".lora_B")[0]
            assert rel_err(grads[f"{path}.B"], g) < 1e-9


def test_tied_head_follows_the_replaced_rows():
    """Rows the batch never reads still change the tied model's logits, and get a gradient from the head."""
    ids, mask, labels = padded_batch(V)
    base = refpeft_model(peer_model("llama-tied"))
    indices = [i for i in (17, 40) if i not in set(ids.ravel().tolist())]
    values = tokens_init(base.weights[EMBED], indices)
    moved = with_tokens(base, indices, values + 0.5)
    _, before, _ = loss_and_gradients(with_tokens(base, indices, values), ids, labels, attention_mask=mask)
    _, after, grads = loss_and_gradients(moved, ids, labels, attention_mask=mask, train_base=[EMBED])
    assert np.array_equal(before, loss_and_gradients(base, ids, labels, attention_mask=mask)[1])   # init: no change
    assert not np.allclose(before[..., indices], after[..., indices])
    assert np.all(np.abs(tokens_backward(grads[EMBED], indices)) > 0)


@pytest.mark.parametrize("name", ["llama-tied", "llama-gqa-llama3"])
def test_peft_files_in_and_out(name, tmp_path):
    ids, mask, labels = padded_batch(V)
    indices = _indices(ids)
    peer = _peer(name, indices, lora=False)
    peer.save_pretrained(tmp_path / "peft")
    read_indices, values, _ = read_trainable_tokens(tmp_path / "peft")
    assert read_indices == indices and np.array_equal(values, _delta(peer).detach().numpy())

    tied = refpeft_model(peer_model(name)).config.tie_word_embeddings
    write_trainable_tokens(tmp_path / "ours", indices, 2.0 * values, tied=tied)
    loaded = peft.PeftModel.from_pretrained(peer_model(name), tmp_path / "ours").to(torch.float64)
    assert np.array_equal(_delta(loaded).detach().numpy(), 2.0 * values)        # a float64 base: loaded as is
    with float64_transformers("llama"), torch.no_grad():
        theirs = loaded(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    ours = loss_and_gradients(with_tokens(refpeft_model(peer_model(name)), indices,
                                          _delta(loaded).detach().numpy()), ids, labels, attention_mask=mask)[1]
    assert rel_err(ours[mask == 1], theirs[mask == 1]) < 1e-10


def test_bad_indices_are_refused():
    W = refpeft_model(peer_model("llama-tied")).weights[EMBED]
    with pytest.raises(InputError, match=f"token index {V} is outside the vocabulary"):
        tokens_init(W, [3, V])
    with pytest.raises(ConfigError, match="token indices repeat"):
        tokens_init(W, [3, 3])
    assert KEY.endswith("embed_tokens.trainable_tokens_delta")


def test_the_embedding_with_token_rows_is_built_once_per_model(monkeypatch):
    """A tied head reads the embedding too, and generation runs forward once per token: the rows are
    put in place once per model, not on every read."""
    import refpeft.model.decoder as decoder
    from refpeft.adapter import Adapter
    from refpeft.demo_model import BASE_DIR
    from refpeft.model.generate import generate
    from refpeft.model.load import load_model

    config, weights, _ = load_model(BASE_DIR)
    assert config.tie_word_embeddings
    rows = np.asarray(weights["model.embed_tokens.weight"][[5, 7]]) * 2.0
    model = decoder.Model(config, weights, adapter=Adapter({}, token_indices=(5, 7), token_values=rows))
    calls = []
    real = decoder.tokens_forward
    monkeypatch.setattr(decoder, "tokens_forward", lambda *a: calls.append(1) or real(*a))
    generate(model, [[1, 5, 9, 7]], max_new_tokens=4)
    assert len(calls) == 1
