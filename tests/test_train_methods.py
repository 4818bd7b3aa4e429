"""`refpeft train` for LoHa, LoKr, OFT and BOFT against torch + PEFT (float64, a tiny random Llama).

- Gradients: at random (trained-looking) adapter tensors, the decoder's gradient of every trained
  tensor equals torch autograd through PEFT's LoHaModel / LoKrModel / OFTModel / BOFTModel on
  transformers' Llama, to 1e-9 relative, on a padded batch with prompt labels -100.
- The loop: 6 optimiser steps from PEFT's init (refpeft.train.loop: accumulation over 2 micro-batches,
  clipping that takes effect, AdamW with decay, warm-up + cosine) equal the same loop in torch
  (tests/test_train_loop.py's `torch_training`): every tensor to 1e-9 relative, every loss to 1e-12.
- The command: `refpeft train --method loha|lokr|oft|boft` writes a folder that
  `PeftModel.from_pretrained` loads with the logits refpeft computes (1e-10 relative); LoKr's
  --decompose-both / --decompose-factor reach the folder's shapes and PEFT rebuilds them.
- An init option a method does not take is refused, naming the method.

BOFT runs with one butterfly factor: PEFT's CPU path silently drops any other (docs/boft.md).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from refpeft.cli import main
from refpeft.errors import ConfigError
from refpeft.model.decoder import loss_and_gradients
from refpeft.peft_format import read_peft_adapter
from refpeft.train.adapters import TRAINING_METHODS, new_adapter, trainable_parameters, with_parameters
from refpeft.train.loop import train
from tests.test_model_decoder import TINY, float64_transformers, padded_batch, peer_model, refpeft_model, rel_err
from tests.test_train_command import assert_resume_writes_the_same, base_folder, hf_model, peer_logits, \
    refpeft_logits, train_args  # noqa: F401
from tests.test_train_loop import run_config, torch_training, toy_dataset

torch = pytest.importorskip("torch", reason="torch + PEFT is the peer checked here")
peft = pytest.importorskip("peft")

NAME, FAMILY = "llama-gqa-llama3", "llama"
TARGETS = ["q_proj", "v_proj", "down_proj"]
# method -> (--rank: r, or the block size of OFT / BOFT; init options; PEFT's config of the same adapter)
CASES = {
    "loha": (2, {}, lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=TARGETS)),
    "lokr": (2, {"decompose_factor": 4}, lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=TARGETS,
                                                                 decompose_factor=4)),
    "lokr-both": (2, {"decompose_both": True}, lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=TARGETS,
                                                                       decompose_both=True)),
    "oft": (4, {}, lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=TARGETS)),
    "boft": (4, {}, lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=TARGETS)),
}


def method_of(case: str) -> str:
    return case.split("-")[0]


def refpeft_start(case: str):
    rank, options, _ = CASES[case]
    base = refpeft_model(peer_model(NAME))
    adapter = new_adapter(base, method=method_of(case), targets=TARGETS, rank=rank, alpha=3.0, seed=5,
                          init_options=options)
    return replace(base, adapter=adapter)


def peer_start(case: str, model):
    """PEFT's model of the case with refpeft's tensors copied in, and its parameters by refpeft's names
    (PEFT's parameter name less "base_model.model." and ".default" is "<path>.<the row's key suffix>")."""
    peer = peft.get_peft_model(peer_model(NAME), CASES[case][2]()).to(torch.float64)
    peft_params = {n.removeprefix("base_model.model.").replace(".default", ""): p
                   for n, p in peer.named_parameters() if p.requires_grad}
    params = trainable_parameters(model)
    suffixes = TRAINING_METHODS[method_of(case)][0].suffixes()
    named = {}
    for name in params:
        path, _, tensor = name.rpartition(".")
        named[name] = peft_params.pop(f"{path}.{suffixes[tensor]}")
    assert not peft_params, sorted(peft_params)[:3]              # PEFT trains nothing refpeft does not
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(torch.from_numpy(np.asarray(params[name])))
    return peer, named


def scrambled(model, seed: int = 7):
    """The model with trained-looking adapter tensors: N(0, 0.2^2), around 1 for BOFT's output scale."""
    rng = np.random.default_rng(seed)
    params = {n: 0.2 * rng.standard_normal(p.shape) + (1.0 if n.endswith("boft_s") else 0.0)
              for n, p in trainable_parameters(model).items()}
    return with_parameters(model, params)


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_equal_peft_autograd(case):
    model = scrambled(refpeft_start(case))
    peer, named = peer_start(case, model)
    ids, mask, labels = padded_batch(TINY["vocab_size"])
    loss, _, grads = loss_and_gradients(model, ids, labels, attention_mask=mask)
    with float64_transformers(FAMILY):
        logits = peer(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    theirs = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, TINY["vocab_size"]),
                                               torch.from_numpy(labels[:, 1:]).reshape(-1))
    theirs.backward()
    assert abs(float(loss) - float(theirs)) <= 1e-12 * float(theirs)
    assert set(grads) == set(named)
    for name, p in named.items():
        assert float(np.abs(grads[name]).max()) > 0, name         # every tensor takes part
        assert rel_err(grads[name], p.grad.numpy()) < 1e-9, name


@pytest.mark.parametrize("case", list(CASES))
def test_training_steps_equal_torch_and_peft(case):
    config = run_config(steps=6, warmup_steps=2, max_grad_norm=0.01)
    dataset = toy_dataset()
    model = refpeft_start(case)
    peer, named = peer_start(case, model)
    reports = []
    final = train(model, dataset, config, progress=reports.append)
    losses, lrs = torch_training(method_of(case), peer, named, dataset, config)
    assert [r.lr for r in reports] == lrs
    for ours, theirs in zip([r.loss for r in reports], losses):
        assert abs(ours - theirs) <= 1e-12 * abs(theirs)
    assert any(r.grad_norm > config.max_grad_norm for r in reports)    # clipping took effect
    trained, start = trainable_parameters(final.model), trainable_parameters(model)
    for name, p in named.items():
        assert rel_err(trained[name], p.detach().numpy()) < 1e-9, name
        assert not np.array_equal(trained[name], start[name]), name     # everything moved


@pytest.mark.parametrize("method, extra", [
    ("loha", ()), ("lokr", ("--decompose-factor", "4")), ("lokr", ("--decompose-both", "--rank", "1")),
    ("oft", ("--rank", "4")), ("boft", ("--rank", "4")),
])
def test_command_writes_a_folder_peft_loads_with_equal_logits(base_folder, tmp_path, capsys,  # noqa: F811
                                                              method, extra):
    out = tmp_path / "run"
    assert main(train_args(base_folder, out, "--method", method, "--targets", "q_proj,v_proj,up_proj", *extra)) == 0
    assert f"wrote {out}: a {method} adapter of 6 modules" in capsys.readouterr().out
    adapter = read_peft_adapter(out)
    assert adapter.method == method
    if method == "lokr":                                          # the options reach the folder
        config = json.loads((out / "adapter_config.json").read_text())
        assert (config["decompose_both"], config["decompose_factor"]) == \
            (("--decompose-both" in extra), 4 if "--decompose-factor" in extra else -1)
        assert all((m.lokr_w1_a is not None) == config["decompose_both"] for m in adapter.modules.values())
    peer = peft.PeftModel.from_pretrained(hf_model(base_folder), out).eval()
    ids, mask, _ = padded_batch(61)
    rows = mask.astype(bool)
    assert rel_err(refpeft_logits(base_folder, adapter, ids, mask)[rows], peer_logits(peer, ids, mask)[rows]) < 1e-10


def test_an_init_option_the_method_does_not_take_is_refused():
    base = refpeft_model(peer_model(NAME))
    with pytest.raises(ConfigError, match="decompose_factor does not apply to loha"):
        new_adapter(base, method="loha", targets=TARGETS, rank=2, init_options={"decompose_factor": 2})
    with pytest.raises(ConfigError, match="ranks does not apply to lokr"):
        new_adapter(base, method="lokr", targets=TARGETS, rank=2, init_options={"ranks": {}})


@pytest.mark.parametrize("method, extra", [("lokr", ("--rank", "1", "--decompose-both")), ("boft", ("--rank", "4"))])
def test_stop_and_resume_write_the_same_adapter(base_folder, tmp_path, method, extra):  # noqa: F811
    """Checkpoints hold these adapters exactly: stopping after 2 of 4 steps and resuming writes the
    adapter one uninterrupted run writes, bit for bit."""
    assert_resume_writes_the_same(base_folder, tmp_path, "--method", method, *extra, "--steps", "4")
