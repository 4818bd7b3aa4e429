"""`refpeft train --init pissa|olora|loftq` (refpeft.train.base_init): the rewritten base, the saved plain LoRA, PEFT.

- PiSSA and OLoRA: after 3 float64 steps the saved folder is a plain rank-2r LoRA whose logits on
  the original base equal those of the trained rank-r adapter (the checkpoint's) on the rewritten
  base, that base computed here from its own definition (PiSSA: the minor singular triples of W;
  OLoRA: W - s Q_r Q_r^T W); PEFT loads the folder on the original base with the same logits.
- At the start the rewritten model is the base model; --stop-after/--resume gives the same folder.
- LoftQ (with --nf4): a rank-r LoRA and the LoftQ base beside it, whose adapted weights hold at
  most 16 values per block of 64 (an NF4 code times the block's absmax); PEFT loads the pair with
  refpeft's logits.
- Inits that do not apply (DoRA, LoftQ without --nf4, PiSSA on a 4-bit base, a bad name) exit 2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from refpeft.cli import main
from refpeft.model.decoder import Model, forward
from refpeft.model.load import load_model
from refpeft.peft_format import read_peft_adapter
from refpeft.train.adapters import new_adapter
from refpeft.train.base_init import rewrite_base
from tests.test_model_decoder import padded_batch, rel_err
from tests.test_train_command import assert_resume_writes_the_same, base_folder, hf_model, peer_logits, \
    train_args  # noqa: F401 (base_folder: a fixture)

torch = pytest.importorskip("torch", reason="PEFT on torch is the peer")
peft = pytest.importorskip("peft")

TARGETS = ("--targets", "q_proj,v_proj,up_proj")
RANK, SCALING = 4, 8.0 / 4                 # train_args: --rank 4 --alpha 8


def rewritten(W, init):
    """The base weight each init leaves, from its definition (not from refpeft.methods.lora_init)."""
    if init == "pissa":
        U, S, Vt = np.linalg.svd(W, full_matrices=False)
        return (U[:, RANK:] * S[RANK:]) @ Vt[RANK:]                       # the minor singular triples
    Q = np.linalg.qr(W)[0][:, :RANK]
    return W - SCALING * Q @ (Q.T @ W)                                    # OLoRA: W - s Q_r Q_r^T W


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_plain_lora_on_the_original_base_equals_the_trained_adapter(base_folder, tmp_path, init):  # noqa: F811
    out = tmp_path / init
    assert main(train_args(base_folder, out, *TARGETS, "--init", init)) == 0
    saved = read_peft_adapter(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 * RANK and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    trained = read_peft_adapter(out / "checkpoints" / "step-000003" / "adapter")
    assert {m.r for m in trained.modules.values()} == {RANK} and len(saved.modules) == len(trained.modules) == 6
    for m in saved.modules.values():                                      # [B | -B0]: training moved B
        assert not np.allclose(m.B[:, :RANK], -m.B[:, RANK:])
    model_config, weights, _ = load_model(base_folder, dtype="float64")
    residual = {**weights, **{f"{p}.weight": rewritten(weights[f"{p}.weight"], init) for p in trained.modules}}
    ids, mask, _ = padded_batch(61)
    rows = mask.astype(bool)
    ours = forward(Model(model_config, weights, saved), ids, attention_mask=mask)[0]
    on_rewritten = forward(Model(model_config, residual, trained), ids, attention_mask=mask)[0]
    assert rel_err(ours[rows], on_rewritten[rows]) < 1e-10
    peer = peft.PeftModel.from_pretrained(hf_model(base_folder), out).eval()
    assert rel_err(ours[rows], peer_logits(peer, ids, mask)[rows]) < 1e-10


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_the_rewritten_model_starts_as_the_base(base_folder, init):  # noqa: F811
    model_config, weights, _ = load_model(base_folder, dtype="float64")
    base = Model(model_config, weights)
    adapter = new_adapter(base, method="lora", targets=["q_proj", "v_proj", "up_proj"], rank=RANK, alpha=8.0)
    model, initial = rewrite_base(Model(model_config, weights, adapter), init=init, seed=3)
    assert all(not np.array_equal(model.weights[f"{p}.weight"], weights[f"{p}.weight"]) for p in initial.modules)
    ids, mask, _ = padded_batch(61)
    rows = mask.astype(bool)
    before = forward(base, ids, attention_mask=mask)[0]
    assert rel_err(forward(model, ids, attention_mask=mask)[0][rows], before[rows]) < 1e-12


def test_stop_and_resume_with_pissa_write_the_same_adapter(base_folder, tmp_path):  # noqa: F811
    assert_resume_writes_the_same(base_folder, tmp_path, *TARGETS, "--init", "pissa", "--steps", "4")


def test_loftq_saves_a_lora_for_its_quantised_base(base_folder, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "loftq"
    assert main(train_args(base_folder, out, *TARGETS, "--init", "loftq", "--nf4", "--steps", "2")) == 0
    assert "LoftQ: the adapter is for the LoftQ base" in capsys.readouterr().out
    adapter = read_peft_adapter(out)
    assert {m.r for m in adapter.modules.values()} == {RANK}
    model_config, original, _ = load_model(base_folder, dtype="float64")
    _, loftq, _ = load_model(out / "loftq_base", dtype="float64")
    for path in adapter.modules:
        W = loftq[f"{path}.weight"]
        assert not np.array_equal(W, original[f"{path}.weight"])
        blocks = W.reshape(-1, 64)
        assert max(len(np.unique(block)) for block in blocks) <= 16          # NF4: 16 codes x one absmax
    ids, mask, _ = padded_batch(61)
    rows = mask.astype(bool)
    ours = forward(Model(model_config, loftq, adapter), ids, attention_mask=mask)[0]
    peer = peft.PeftModel.from_pretrained(hf_model(out / "loftq_base"), out).eval()
    assert rel_err(ours[rows], peer_logits(peer, ids, mask)[rows]) < 1e-10


@pytest.mark.parametrize("extra, message", [
    (("--init", "pissa", "--method", "dora"), "initialises LoRA (--method lora or rslora)"),
    (("--init", "loftq"), "use it with --nf4"),
    (("--init", "olora", "--nf4"), "only 'loftq' initialises for a quantised base"),
    (("--init", "svd"), "unknown init 'svd'"),
    (("--init", "pissa", "--distill", "0.5"), "--distill compare with the base"),
])
def test_inits_that_do_not_apply_are_refused(base_folder, tmp_path, capsys, extra, message):  # noqa: F811
    out = tmp_path / "bad"
    assert main(train_args(base_folder, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
