"""Prefix tuning with distillation from the frozen base (`refpeft train --method prefix --distill`): one
micro-batch's gradients of task + alpha KD(T) w.r.t. the prefix encoder's tensors equal torch's
autograd through PEFT's PREFIX_TUNING model in float64, with and without the reparameterisation MLP.

The base of a prefix model is the decoder without the prefix (refpeft.train.objective.base_of); PEFT's
is its underlying transformers model (get_base_model), which prompt learning leaves untouched. The
prefix adds keys and values, no positions, so the two logits line up token for token.
"""

from __future__ import annotations

import pytest

from refpeft.model.config import config_from_dict
from refpeft.model.decoder import Model
from refpeft.train.data import Batch
from refpeft.train.objective import Forgetting, drift, micro_batch_terms
from refpeft.train.prompt_learning import encoder_gradients, new_prompt_learning, with_encoder
from tests.test_model_decoder import TINY, float64_transformers, padded_batch, peer_model, refpeft_model, rel_err

torch = pytest.importorskip("torch", reason="torch's autograd through PEFT is the peer")
peft = pytest.importorskip("peft")
from tests.test_train_command import base_folder, train_args  # noqa: E402, F401 (fixture)

ALPHA, T, K = 0.6, 2.0, 3


@pytest.mark.parametrize("projection", [False, True], ids=["table", "mlp"])
def test_prefix_with_distillation_has_the_gradients_of_torch_and_peft(projection):
    base = peer_model("llama-gqa-llama3")
    weights = refpeft_model(base).weights
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K, prefix_projection=projection,
                                     encoder_hidden_size=12 if projection else None)
    peer = peft.get_peft_model(base, config)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in peer.prompt_encoder["default"].parameters():
            p.copy_(0.5 * torch.randn_like(p))
    peer = peer.to(torch.float64)
    params = {n: p.detach().numpy().copy() for n, p in peer.prompt_encoder["default"].named_parameters()}

    blank = new_prompt_learning(Model(config_from_dict(base.config.to_dict()), weights), "prefix", k=K,
                                projection=projection, encoder_hidden_size=12 if projection else None)
    model = with_encoder(blank, {f"prompt_encoder.{n}": v for n, v in params.items()})
    ids, mask, labels = padded_batch(TINY["vocab_size"])
    terms, grads = micro_batch_terms(model, Batch(ids, labels, mask), Forgetting(distill=ALPHA, temperature=T),
                                     loss_weight=1.0, count=1)
    ours = encoder_gradients(model, grads)

    V = TINY["vocab_size"]
    with float64_transformers("llama"):
        logits = peer(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        task = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V),
                                                 torch.from_numpy(labels[:, 1:]).reshape(-1))
        with torch.no_grad():
            base_logits = peer.get_base_model()(input_ids=torch.from_numpy(ids),
                                                attention_mask=torch.from_numpy(mask)).logits
        real = torch.from_numpy(mask).to(torch.float64)
        kl = torch.nn.functional.kl_div(torch.log_softmax(logits / T, -1), torch.log_softmax(base_logits / T, -1),
                                        log_target=True, reduction="none").sum(-1)
        total = task + ALPHA * (kl * real).sum() * T**2 / real.sum()
        total.backward()
    assert terms["distill"] > 1e-3                                   # the prefix moved the logits: a real pull
    assert abs(terms["task"] + terms["distill"] - total.item()) <= 1e-10 * total.item()
    theirs = {f"prompt_encoder.{n}": p.grad.numpy() for n, p in peer.prompt_encoder["default"].named_parameters()}
    assert set(ours) == set(theirs)
    for name, g in theirs.items():
        assert rel_err(ours[name], g) < 1e-9, name


def test_a_prefix_model_drifts_from_the_decoder_without_its_prefix():
    """drift() takes a prefix model's base to be the decoder without the prefix: KL > 0 once a prefix is on."""
    from refpeft.train.data import Example, TokenDataset

    base = refpeft_model(peer_model("llama-gqa-llama3"))
    model = new_prompt_learning(base, "prefix", k=K, seed=1)
    ids, _, _ = padded_batch(TINY["vocab_size"])
    held_out = TokenDataset(tuple(Example(row, row.copy(), f"{i}") for i, row in enumerate(ids)), pad_id=0,
                            block_size=16)
    assert drift(model, held_out) > 1e-4



def test_train_command_runs_prefix_tuning_with_distillation_and_reports_the_drift(base_folder, tmp_path,  # noqa: F811
                                                                                  capsys):
    from refpeft.cli import main

    args = train_args(base_folder, tmp_path / "out", "--method", "prefix", "--virtual-tokens", "3", "--distill",
                      "0.5", "--general", str(base_folder / "text.txt"), "--steps", "2", "--block-size", "16")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "distill " in out and "KL(base || trained) = " in out, out
