"""Generation (refpeft.model.generate) on tiny random decoders in float64: the KV cache against
recomputing the sequence, greedy decoding against transformers' `generate(do_sample=False)` (with
the float64 patch of tests/test_model_decoder.py, also with a PEFT LoRA adapter and left-padded
batches), the sampling filters against transformers' logits processors, and the sampler's
distribution. SmolLM2 and the `refpeft generate` command are in tests/test_model_smollm2.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.errors import ConfigError, InputError
from refpeft.model.decoder import Model, forward
from refpeft.model.generate import Sampling, decode_step, generate, next_token_scores, prefill, sample_tokens
from tests.support import BACKEND_IDS, BACKENDS, assert_close
from tests.test_model_decoder import FAMILIES, TINY, _peft_adapter, _refpeft_adapter, float64_transformers, \
    peer_model, refpeft_model

torch = pytest.importorskip("torch", reason="transformers on torch is the peer checked here")
transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 3, 42, 8, 23, 11], [9, 30, 2], [14, 1, 55, 7, 60]]      # lengths 7, 3, 5: left padding


def _recomputed_greedy(model: Model, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding by the definition: a full forward over the whole sequence for every token."""
    ids, rows = list(prompt), []
    for _ in range(steps):
        logits, _, _ = forward(model, np.asarray([ids]))
        rows.append(logits[0, -1])
        ids.append(int(np.argmax(logits[0, -1])))
    return ids[len(prompt):], rows


@pytest.mark.parametrize("name", ["llama-gqa-llama3", "qwen3-qk-norm"])
def test_cached_steps_equal_recomputing_the_sequence(name):
    model = refpeft_model(peer_model(name))
    for prompt in PROMPTS:
        expected, rows = _recomputed_greedy(model, prompt, 8)
        z, state = prefill(model, np.asarray([prompt]))
        for step, token in enumerate(expected):
            assert_close(z[0], rows[step], rtol=1e-12)
            z, state = decode_step(model, np.asarray([token]), state)
        assert generate(model, [prompt], max_new_tokens=8) == [expected]


def test_a_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = refpeft_model(peer_model("llama-gqa-llama3"))
    batch = generate(model, PROMPTS, max_new_tokens=10, pad_token_id=0)
    assert batch == [generate(model, [p], max_new_tokens=10)[0] for p in PROMPTS]
    # the cached logits of a padded row equal those of its prompt alone (padding is masked exactly)
    z, state = prefill(model, np.asarray([[0] * 4 + PROMPTS[1]]), attention_mask=np.asarray([[0] * 4 + [1] * 3]))
    alone, alone_state = prefill(model, np.asarray([PROMPTS[1]]))
    for token in (4, 33):
        assert_close(z, alone, rtol=1e-12)
        z, state = decode_step(model, np.asarray([token]), state)
        alone, alone_state = decode_step(model, np.asarray([token]), alone_state)


def _transformers_greedy(peer, family: str, prompts, *, max_new_tokens: int, eos=None, pad: int = 0):
    """transformers' generate(do_sample=False) on left-padded prompts: each row's new tokens, cut after eos."""
    s = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (s - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (s - len(p)) + [1] * len(p) for p in prompts])
    with float64_transformers(family), torch.no_grad():
        out = peer.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                            eos_token_id=eos, pad_token_id=pad, top_k=None, top_p=None, temperature=None)
    rows = []
    for row in out[:, s:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        rows.append(row)
    return rows


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_greedy_equals_transformers_generate(name):
    family = FAMILIES[name][0]
    peer = peer_model(name)
    model = refpeft_model(peer)
    theirs = _transformers_greedy(peer, family, PROMPTS, max_new_tokens=12)
    assert generate(model, PROMPTS, max_new_tokens=12, pad_token_id=0) == theirs
    eos = theirs[0][4]                                         # a token the first row makes: it stops there
    theirs = _transformers_greedy(peer, family, PROMPTS, max_new_tokens=12, eos=eos)
    ours = generate(model, PROMPTS, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert ours == theirs and ours[0][-1] == eos and len(ours[0]) <= 5


def test_greedy_with_a_lora_adapter_equals_peft_generate():
    base = peer_model("qwen2-bias")
    weights = refpeft_model(base).weights                      # copied before PEFT wraps the layers
    peer = _peft_adapter(base, "lora")
    model = Model(refpeft_model(base).config, weights, _refpeft_adapter(peer, "lora"))
    theirs = _transformers_greedy(peer, "qwen2", PROMPTS, max_new_tokens=10)
    assert generate(model, PROMPTS, max_new_tokens=10, pad_token_id=0) == theirs
    assert theirs != generate(Model(model.config, weights), PROMPTS, max_new_tokens=10, pad_token_id=0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.name in ("numpy-readonly", "array-api-strict")],
                         ids=[n for n in BACKEND_IDS if n in ("numpy-readonly", "array-api-strict")])
def test_generation_runs_on_every_array_backend(backend):
    model = refpeft_model(peer_model("llama-gqa-llama3"))
    other = Model(model.config, {n: backend(w) for n, w in model.weights.items()})
    sampling = Sampling(temperature=0.7, top_k=10, top_p=0.9)
    for kwargs in ({}, {"sampling": sampling}):
        expected = generate(model, PROMPTS, max_new_tokens=6, rng=np.random.default_rng(0), **kwargs)
        assert generate(other, PROMPTS, max_new_tokens=6, rng=np.random.default_rng(0), **kwargs) == expected


# ---------------------------------------------------------------------------- sampling

SAMPLINGS = [Sampling(), Sampling(temperature=0.7), Sampling(top_k=5), Sampling(top_p=0.8),
             Sampling(temperature=1.3, top_k=20, top_p=0.9), Sampling(temperature=0.5, top_k=1),
             Sampling(top_p=0.0), Sampling(top_k=500)]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=repr)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_filters_equal_transformers_logits_processors(sampling, dtype):
    from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, \
        TopKLogitsWarper, TopPLogitsWarper

    processors = LogitsProcessorList(
        ([TemperatureLogitsWarper(float(sampling.temperature))] if sampling.temperature != 1.0 else [])
        + ([TopKLogitsWarper(sampling.top_k)] if sampling.top_k else [])
        + ([TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1.0 else []))
    rng = np.random.default_rng(11)
    z = (3.0 * rng.standard_normal((4, 200))).astype(dtype)
    z[1, 50:60] = z[1, 7]                                      # a tie, at the top-k cut for some k
    z[2] = np.round(z[2])                                      # many ties
    theirs = processors(torch.zeros((4, 1), dtype=torch.long), torch.from_numpy(z.copy())).numpy()
    ours = next_token_scores(z, sampling)
    assert ours.dtype == z.dtype
    for row in range(z.shape[0]):
        kept, kept_theirs = ~np.isneginf(ours[row]), ~np.isneginf(theirs[row])
        assert kept.sum() >= 1
        # Equal logits tied at the top-p cut are kept or dropped by sort order, and torch.sort is not
        # stable: there only the kept values (as a multiset) must agree, elsewhere the very tokens.
        if len(np.unique(z[row])) == z.shape[1] or sampling.top_p == 1.0:
            np.testing.assert_array_equal(kept, kept_theirs)
            np.testing.assert_array_equal(ours[row][kept], theirs[row][kept])
        else:
            np.testing.assert_array_equal(np.sort(ours[row][kept]), np.sort(theirs[row][kept_theirs]))


def test_sampled_tokens_follow_the_filtered_softmax():
    rng = np.random.default_rng(0)
    z = np.array([[2.0, 1.0, 0.5, -1.0, 0.0, 1.5]])
    sampling = Sampling(temperature=0.8, top_k=4)
    scores = next_token_scores(z, sampling)
    p = np.exp(scores[0] - scores[0].max())
    p /= p.sum()
    n = 20000
    draws = np.array([sample_tokens(scores, [u])[0] for u in rng.random(n)])
    frequencies = np.bincount(draws, minlength=6) / n
    assert np.all(frequencies[p == 0] == 0)                    # filtered tokens are never drawn
    assert np.max(np.abs(frequencies - p)) < 5 * np.sqrt(0.25 / n)   # 5 sigma of a binomial frequency
    assert sample_tokens(scores, [0.0]) == [int(np.flatnonzero(p)[0])]
    assert sample_tokens(scores, [np.nextafter(1.0, 0.0)]) == [int(np.flatnonzero(p)[-1])]


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = refpeft_model(peer_model("mistral"))
    sampling = Sampling(temperature=1.5, top_p=0.95)
    first = generate(model, PROMPTS, max_new_tokens=8, sampling=sampling, rng=np.random.default_rng(5))
    assert first == generate(model, PROMPTS, max_new_tokens=8, sampling=sampling, rng=np.random.default_rng(5))
    assert first != generate(model, PROMPTS, max_new_tokens=8, sampling=sampling, rng=np.random.default_rng(6))
    greedy = generate(model, PROMPTS, max_new_tokens=8)
    top_1 = generate(model, PROMPTS, max_new_tokens=8, sampling=Sampling(top_k=1), rng=np.random.default_rng(0))
    assert top_1 == greedy


# ---------------------------------------------------------------------------- bad input

def test_bad_input_is_refused():
    model = refpeft_model(peer_model("llama-tied"))
    limit = TINY["max_position_embeddings"]
    with pytest.raises(InputError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(InputError, match="list of token-id lists"):
        generate(model, [], max_new_tokens=2)
    with pytest.raises(InputError, match="prompt 0 must be a list of token ids"):
        generate(model, ["hello"], max_new_tokens=2)
    with pytest.raises(InputError, match=f"{limit + 1} tokens, more than the model's max_position_embeddings"):
        generate(model, [[1] * (limit + 1)], max_new_tokens=1)
    with pytest.raises(InputError, match=f"need {limit + 1} positions"):
        generate(model, [[1] * 60], max_new_tokens=6)
    assert len(generate(model, [[1] * 60], max_new_tokens=5)[0]) == 5    # exactly the last position
    with pytest.raises(InputError, match=r"ids\[0, 1\] = 61 is outside \[0, 61\)"):
        generate(model, [[1, 61]], max_new_tokens=1)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=-1)
    assert generate(model, [[1], [2, 3]], max_new_tokens=0) == [[], []]
    with pytest.raises(ConfigError, match="explicit random generator"):
        generate(model, [[1]], max_new_tokens=1, sampling=Sampling())
    with pytest.raises(ConfigError, match="eos_token_id"):
        generate(model, [[1]], max_new_tokens=1, eos_token_id="</s>")
    for bad, match in ((dict(temperature=0.0), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
                       (dict(top_p=1.5), "top_p")):
        with pytest.raises(ConfigError, match=match):
            Sampling(**bad)


def test_an_adapter_file_with_trained_biases_generates_as_peft(tmp_path):
    # `refpeft generate --adapter`'s reader: PEFT's bias="lora_only" saves the adapted layers' trained
    # biases, which replace the base model's own (qwen2's q/k/v biases).
    from refpeft.model.adapted import with_adapter

    peft = pytest.importorskip("peft")
    base = peer_model("qwen2-bias")
    model = refpeft_model(base)
    peer = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     bias="lora_only", lora_dropout=0.0, init_lora_weights=False))
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in peer.named_parameters():
            if "lora_" in n or n.endswith("base_layer.bias"):
                p.add_(0.3 * torch.randn_like(p))
    peer.save_pretrained(tmp_path)
    adapted = with_adapter(model, str(tmp_path), dtype="float64")
    assert len(adapted.adapter.base_biases) == 2 * TINY["num_hidden_layers"]
    theirs = _transformers_greedy(peer, "qwen2", PROMPTS, max_new_tokens=10)
    assert generate(adapted, PROMPTS, max_new_tokens=10, pad_token_id=0) == theirs
    without_biases = Model(adapted.config, model.weights, adapted.adapter)
    assert generate(without_biases, PROMPTS, max_new_tokens=10, pad_token_id=0) != theirs


def test_a_forward_that_records_nothing_gives_the_same_logits_and_keeps_no_weights():
    model = refpeft_model(peer_model("llama-gqa-llama3"))
    ids = np.asarray([PROMPTS[0]])
    recorded, tape, past = forward(model, ids)
    unrecorded, empty, past2 = forward(model, ids, record=False)
    assert np.array_equal(recorded, unrecorded) and len(tape.entries) > 0 and list(empty.entries) == []
    assert all(np.array_equal(a, b) for kv, kv2 in zip(past, past2) for a, b in zip(kv, kv2))
