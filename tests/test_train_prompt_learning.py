"""`refpeft train --method prompt|p-tuning|prefix` (refpeft.train.prompt_learning) end to end.

- Each method's encoder (prompt tuning random / text init, P-tuning MLP / LSTM, prefix tuning with
  and without the MLP) trains a few float64 steps on the tiny Llama of tests/test_train_command.py;
  the loss over the data falls from the initial encoder's (the same seed rebuilds it), and the written
  folder loads in PEFT's PeftModel.from_pretrained with logits equal to refpeft's (1e-10). PEFT loads
  the tensor into a float32 embedding before .to(float64), so both sides use its float32 values.
- The encoder's gradients (encoder_gradients: the decoder's d(prompt) through the encoder's
  backward) match finite differences of the logits.
- --stop-after then --resume writes the same folder as one run (the encoder's tensors, not only
  its output, are checkpointed).
- Options that do not apply are refused with exit status 2.
"""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.cli import main
from refpeft.io import read_safetensors
from refpeft.model.decoder import Model, backward, forward, loss_and_gradients
from refpeft.model.load import load_model, load_tokenizer
from refpeft.train.data import pad_batch, read_dataset
from refpeft.train.prompt_learning import encoder_gradients, encoder_parameters, new_prompt_learning, with_encoder
from tests.support import vjp_check
from tests.test_model_decoder import TINY, padded_batch, peer_model, refpeft_model, rel_err
from tests.test_train_command import base_folder, hf_model, peer_logits, train_args  # noqa: F401 (fixture)

torch = pytest.importorskip("torch", reason="PEFT on torch is the peer")
peft = pytest.importorskip("peft")

RUNS = {  # name -> (method, extra options, new_prompt_learning's options)
    "prompt-random": ("prompt", (), {}),
    "prompt-text": ("prompt", ("--prompt-init", "text", "--prompt-init-text", "the sky is blue"), {"init": "TEXT"}),
    "p-tuning-mlp": ("p-tuning", (), {}),
    "p-tuning-lstm": ("p-tuning", ("--encoder", "lstm"), {"encoder": "LSTM"}),
    "prefix": ("prefix", (), {}),
    "prefix-projection": ("prefix", ("--projection",), {"projection": True}),
}


def _prompt_args(base, out, name, *extra):
    method, options, _ = RUNS[name]
    return train_args(base, out, "--method", method, "--virtual-tokens", "3", "--steps", "6", "--lr", "5e-2",
                      *options, *extra)


def _data_loss(model, base):
    tokenizer = load_tokenizer(base)
    data = read_dataset(base / "data.jsonl", tokenizer, block_size=32)
    batch = pad_batch(list(data.examples), pad_id=data.pad_id)
    return float(loss_and_gradients(model, batch.ids, batch.labels, attention_mask=batch.attention_mask)[0])


@pytest.mark.parametrize("name", list(RUNS))
def test_trained_virtual_tokens_lower_the_loss_and_load_in_peft(base_folder, tmp_path, capsys, name):  # noqa: F811
    out = tmp_path / "run"
    assert main(_prompt_args(base_folder, out, name)) == 0
    method, _, init = RUNS[name]
    assert f"wrote {out}: {method} tuning's 3 virtual tokens" in capsys.readouterr().out
    saved = read_safetensors(out / "adapter_model.safetensors")[0]["prompt_embeddings"]
    config, weights, tokenizer = load_model(base_folder, dtype="float64")
    text_ids = tokenizer.encode("the sky is blue") if init.get("init") == "TEXT" else None
    start = new_prompt_learning(Model(config, weights), method, k=3, seed=1, text_ids=text_ids, **init)
    field = "prefix" if method == "prefix" else "prompt"
    trained = Model(config, weights, **{field: saved})
    assert _data_loss(trained, base_folder) < _data_loss(start, base_folder) - 1e-3

    peer = peft.PeftModel.from_pretrained(hf_model(base_folder), out).to(torch.float64).eval()
    theirs_tensor = peer.prompt_encoder["default"].embedding.weight.detach().numpy()
    assert np.array_equal(theirs_tensor, saved.astype(np.float32).astype(np.float64))
    ids, mask, _ = padded_batch(61)
    ours = forward(Model(config, weights, **{field: theirs_tensor}), ids, attention_mask=mask)[0]
    theirs = peer_logits(peer, ids, mask)
    rows = mask == 1 if method == "prefix" else np.concatenate([np.ones((2, 3), bool), mask == 1], axis=1)
    assert ours.shape == theirs.shape and rel_err(ours[rows], theirs[rows]) < 1e-10


@pytest.mark.parametrize("method, options", [("p-tuning", {"encoder": "LSTM"}), ("p-tuning", {}),
                                             ("prefix", {"projection": True}), ("prompt", {})])
def test_encoder_gradients_match_finite_differences(method, options):
    base = refpeft_model(peer_model("llama-tied"))
    model = new_prompt_learning(base, method, k=2, seed=4, **options)   # seed 3 puts a ReLU kink within h
    ids, mask, _ = padded_batch(TINY["vocab_size"])
    logits, tape, _ = forward(model, ids, attention_mask=mask)
    dy = np.random.default_rng(0).standard_normal(logits.shape)
    grads = encoder_gradients(model, backward(model, dy, tape))
    params = encoder_parameters(model)
    assert set(grads) == set(params)
    names = {name: name.replace(".", "_") for name in params}

    def f(**values):
        return forward(with_encoder(model, {n: values[names[n]] for n in params}), ids, attention_mask=mask)[0]

    vjp_check(f, {names[n]: v for n, v in params.items()}, {names[n]: g for n, g in grads.items()}, dy)


def test_stop_and_resume_write_the_same_virtual_tokens(base_folder, tmp_path):  # noqa: F811
    extra = ("--steps", "4")
    assert main(_prompt_args(base_folder, tmp_path / "straight", "p-tuning-lstm", *extra)) == 0
    assert main(_prompt_args(base_folder, tmp_path / "split", "p-tuning-lstm", *extra, "--stop-after", "2")) == 0
    assert not (tmp_path / "split" / "adapter_model.safetensors").exists()
    assert main(_prompt_args(base_folder, tmp_path / "split", "p-tuning-lstm", *extra, "--resume")) == 0
    a = read_safetensors(tmp_path / "straight" / "adapter_model.safetensors")[0]["prompt_embeddings"]
    b = read_safetensors(tmp_path / "split" / "adapter_model.safetensors")[0]["prompt_embeddings"]
    assert np.array_equal(a, b)


@pytest.mark.parametrize("name, change, message", [
    ("prompt-random", ("--modules-to-save", "lm_head"), "--modules-to-save do not apply to --method prompt"),
    ("p-tuning-mlp", ("--distill", "0.5"), "--distill do not apply to --method p-tuning"),
    ("prompt-random", ("--prompt-init", "vocab"), "the prompt init must be one of"),
    ("p-tuning-mlp", ("--encoder", "gru"), "encoder_reparameterization_type must be one of"),
    ("prompt-random", ("--virtual-tokens", "0"), "num_virtual_tokens must be a positive integer"),
])
def test_options_that_do_not_apply_exit_2(base_folder, tmp_path, capsys, name, change, message):  # noqa: F811
    out = tmp_path / "out"
    assert main(_prompt_args(base_folder, out, name, *change)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()
