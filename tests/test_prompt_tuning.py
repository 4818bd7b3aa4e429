"""Prompt tuning (refpeft.model.prompt_tuning in refpeft.model.decoder) against PEFT's PROMPT_TUNING in float64.

The float64 peer is transformers + PEFT with tests/test_model_decoder.py's patch removing
transformers' float32 casts; the loss is a float64 cross-entropy of its logits with the virtual
positions' labels at -100, as PEFT prefixes them. Finite differences check dP on a tiny model.
"""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.errors import ConfigError, InputError, ShapeError
from refpeft.model.config import config_from_dict
from refpeft.model.decoder import Model, backward, forward, loss_and_gradients
from refpeft.model.generate import Sampling, decode_step, generate, prefill
from refpeft.model.prompt_tuning import prompt_init, read_prompt_tuning, write_prompt_tuning
from tests.support import vjp_check
from tests.test_model_decoder import TINY, float64_transformers, padded_batch, peer_model, refpeft_model, rel_err

torch = pytest.importorskip("torch", reason="transformers + PEFT on torch are the peers checked here")
peft = pytest.importorskip("peft")

K = 4


def _peft_prompt(base, seed: int = 3):
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K))
    torch.manual_seed(seed)
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(0.5 * torch.randn(K, TINY["hidden_size"]))
    return model.to(torch.float64)


@pytest.mark.parametrize("name", ["llama-gqa-llama3", "qwen2-bias", "qwen3-qk-norm"])
def test_logits_loss_and_prompt_gradient_equal_peft(name):
    family = {"llama-gqa-llama3": "llama", "qwen2-bias": "qwen2", "qwen3-qk-norm": "qwen3"}[name]
    base = peer_model(name)
    weights = refpeft_model(base).weights
    peer = _peft_prompt(base)
    ids, mask, labels = padded_batch(TINY["vocab_size"])
    with float64_transformers(family):
        theirs = peer(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        full_labels = np.concatenate([np.full((2, K), -100), labels], axis=1)
        V = TINY["vocab_size"]
        loss = torch.nn.functional.cross_entropy(theirs[:, :-1].reshape(-1, V),
                                                 torch.from_numpy(full_labels[:, 1:]).reshape(-1))
        loss.backward()
    prompt = peer.prompt_encoder["default"].embedding.weight
    model = Model(config_from_dict(base.config.to_dict()), weights, prompt=prompt.detach().numpy().copy())
    ours_loss, ours, grads = loss_and_gradients(model, ids, labels, attention_mask=mask)
    assert ours.shape == (2, K + ids.shape[1], V)                       # PEFT returns the virtual positions too
    real = np.concatenate([np.ones((2, K), bool), mask == 1], axis=1)
    assert rel_err(ours[real], theirs.detach().numpy()[real]) < 1e-10
    assert abs(float(ours_loss) - float(loss)) <= 1e-10 * float(loss)
    assert set(grads) == {"prompt_embeddings"} and rel_err(grads["prompt_embeddings"], prompt.grad.numpy()) < 1e-9


def test_the_prompt_gradient_matches_finite_differences():
    model = refpeft_model(peer_model("llama-tied"))
    ids, mask, labels = padded_batch(TINY["vocab_size"])
    P = prompt_init(model.weights["model.embed_tokens.weight"], K, init="SAMPLE_VOCAB", seed=1)
    prompted = Model(model.config, model.weights, prompt=P)
    logits, tape, _ = forward(prompted, ids, attention_mask=mask)
    dy = np.random.default_rng(0).standard_normal(logits.shape)
    grads = backward(prompted, dy, tape)

    def f(prompt):
        return forward(Model(model.config, model.weights, prompt=prompt), ids, attention_mask=mask)[0]

    vjp_check(f, {"prompt": P}, {"prompt": grads["prompt_embeddings"]}, dy)


PROMPTS = [[5, 17, 3, 42, 8, 23, 11], [9, 30, 2], [14, 1, 55, 7, 60]]      # lengths 7, 3, 5: left padding


def peft_greedy_recomputed(peer, family: str, prompts, *, max_new_tokens: int, prefix_k: int = 0, pad: int = 0):
    """Greedy decoding by PEFT's forward on the whole left-padded sequence at every step (no cache).

    PEFT 0.21.2's own generate cannot be the peer under transformers 5.24: the model's cache argument is
    now `cache`, PEFT's prepare_inputs_for_generation still reads and writes `past_key_values`, so it
    re-injects the virtual tokens at every step and drops a prefix. Its forward is correct (the tests
    above). Prompt tuning: PEFT drops position_ids, so the model numbers 0 .. k + t - 1. Prefix: the
    positions transformers' generate gives the real tokens (cumsum(mask) - 1), which PEFT shifts by k."""
    s = max(len(p) for p in prompts)
    ids = np.asarray([[pad] * (s - len(p)) + p for p in prompts])
    mask = np.asarray([[0] * (s - len(p)) + [1] * len(p) for p in prompts])
    new, steps = [[] for _ in prompts], []
    with float64_transformers(family), torch.no_grad():
        for _ in range(max_new_tokens):
            kwargs = {}
            if prefix_k:
                kwargs["position_ids"] = torch.from_numpy(np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0))
            logits = peer(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kwargs).logits
            steps.append(logits[:, -1].numpy())
            chosen = logits[:, -1].argmax(-1).numpy()
            for row, token in enumerate(chosen):
                new[row].append(int(token))
            ids = np.concatenate([ids, chosen[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=mask.dtype)], axis=1)
    return new, steps


def cached_logits(model, prompts, new, *, pad: int = 0):
    """refpeft's next-token logits (b, V) at every step of a KV-cached decode fed the tokens `new`."""
    s = max(len(p) for p in prompts)
    ids = np.asarray([[pad] * (s - len(p)) + p for p in prompts])
    mask = np.asarray([[0] * (s - len(p)) + [1] * len(p) for p in prompts])
    z, state = prefill(model, ids, attention_mask=mask)
    steps = [z]
    for t in range(len(new[0]) - 1):
        z, state = decode_step(model, np.asarray([row[t] for row in new]), state)
        steps.append(z)
    return steps


@pytest.mark.parametrize("name", ["llama-gqa-llama3", "qwen2-bias"])
def test_greedy_generation_equals_peft_recomputed(name):
    family = {"llama-gqa-llama3": "llama", "qwen2-bias": "qwen2"}[name]
    base = peer_model(name)
    weights = refpeft_model(base).weights
    peer = _peft_prompt(base)
    model = Model(config_from_dict(base.config.to_dict()), weights,
                  prompt=peer.prompt_encoder["default"].embedding.weight.detach().numpy().copy())
    for prompts in (PROMPTS[:1], PROMPTS):                               # one prompt; a left-padded batch
        theirs, their_logits = peft_greedy_recomputed(peer, family, prompts, max_new_tokens=10)
        assert generate(model, prompts, max_new_tokens=10, pad_token_id=0) == theirs
        assert rel_err(np.stack(cached_logits(model, prompts, theirs)), np.stack(their_logits)) < 1e-10
    assert theirs != generate(Model(model.config, weights), PROMPTS, max_new_tokens=10, pad_token_id=0)


def test_sampling_with_virtual_tokens_follows_the_cached_logits():
    model = refpeft_model(peer_model("llama-tied"))
    P = prompt_init(model.weights["model.embed_tokens.weight"], K, init="SAMPLE_VOCAB", seed=1)
    prompted = Model(model.config, model.weights, prompt=P)
    greedy = generate(prompted, PROMPTS, max_new_tokens=6, pad_token_id=0)
    top_1 = generate(prompted, PROMPTS, max_new_tokens=6, pad_token_id=0, sampling=Sampling(top_k=1),
                     rng=np.random.default_rng(0))
    assert top_1 == greedy
    first = generate(prompted, PROMPTS, max_new_tokens=6, pad_token_id=0, sampling=Sampling(),
                     rng=np.random.default_rng(7))
    assert first == generate(prompted, PROMPTS, max_new_tokens=6, pad_token_id=0, sampling=Sampling(),
                             rng=np.random.default_rng(7))


def test_peft_files_in_and_out(tmp_path):
    base = peer_model("llama-gqa-llama3")
    weights = refpeft_model(base).weights
    peer = _peft_prompt(base)
    peer.save_pretrained(tmp_path / "peft")
    prompt, config = read_prompt_tuning(tmp_path / "peft")
    assert np.array_equal(prompt, peer.prompt_encoder["default"].embedding.weight.detach().numpy())
    assert config["num_virtual_tokens"] == K
    write_prompt_tuning(tmp_path / "ours", 2.0 * prompt, num_attention_heads=TINY["num_attention_heads"],
                        num_layers=TINY["num_hidden_layers"])
    loaded = peft.PeftModel.from_pretrained(peer_model("llama-gqa-llama3"), tmp_path / "ours").to(torch.float64)
    ids = np.asarray([[5, 7, 11, 13]])
    with float64_transformers("llama"), torch.no_grad():
        theirs = loaded(input_ids=torch.from_numpy(ids)).logits.numpy()
    model = Model(config_from_dict(base.config.to_dict()), weights, prompt=2.0 * prompt)
    assert rel_err(forward(model, ids)[0], theirs) < 1e-10


def test_bad_input_is_refused(tmp_path):
    model = refpeft_model(peer_model("llama-tied"))
    with pytest.raises(ShapeError, match="prompt embeddings have shape"):
        forward(Model(model.config, model.weights, prompt=np.zeros((K, 3))), np.asarray([[1, 2]]))
    prompted = Model(model.config, model.weights, prompt=np.zeros((K, TINY["hidden_size"])))
    with pytest.raises(ConfigError, match="position_ids with prompt tuning"):
        forward(prompted, np.asarray([[1, 2]]), position_ids=np.asarray([[0, 1]]))
    with pytest.raises(InputError, match="after 4 virtual tokens"):
        generate(prompted, [[1] * 58], max_new_tokens=4)                # 4 + 58 + 4 - 1 = 65 > 64 positions
    with pytest.raises(ConfigError, match="prompt_tuning_init must be one of"):
        prompt_init(model.weights["model.embed_tokens.weight"], K, init="WORDS")
    with pytest.raises(ConfigError, match="peft_type is 'LORA'"):
        (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
        read_prompt_tuning(tmp_path)
