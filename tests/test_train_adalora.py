"""`refpeft train --method adalora` against PEFT's AdaLoraModel trained in torch (float64, a tiny random Llama).

- THE KEY CHECK: 8 optimiser steps (init_r 4 -> target_r 2, tinit 2, tfinal 2, deltaT 1; 2 micro-batches
  per step, clipping that takes effect, AdamW with decay, warm-up + cosine) of refpeft's loop equal the
  same loop in torch: PEFT's model with its orthogonality term in the loss (AdaLoraModel.forward),
  `clip_grad_norm_`, AdamW, the schedule, then `update_and_allocate(step)` before zero_grad, as PEFT's
  docstring prescribes. The loss of every step (the orthogonality term included) to 1e-12, the
  allocator's masks after every step equal PEFT's rank_pattern (and pruned something), the final
  tensors to 1e-9 relative, with the pruned singular values exactly 0 in both.
- The folder refpeft writes (the final rank_pattern, tensors pruned) loads in PEFT with the logits
  of the trained refpeft model (1e-10 relative); `refpeft train --method adalora` writes such a folder
  end to end, and refuses what an AdaLoRA run does not take.

The peer's ranknum is frozen: PEFT 0.21.2 marks it trainable by accident (refpeft.methods.adalora),
while its files reset it to init_r on load; refpeft keeps it fixed.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from refpeft.adalora_format import read_adalora_adapter
from refpeft.adapter import Adapter
from refpeft.cli import main
from refpeft.errors import ConfigError
from refpeft.methods.adalora import ADALORA, TENSOR_NAMES
from refpeft.methods.adalora_allocator import AdaloraSchedule
from refpeft.model.decoder import Model, forward
from refpeft.model.load import load_model
from refpeft.methods.adalora import AdaloraModule
from refpeft.train.adalora_training import AdaloraTraining, write_adalora_folder
from refpeft.train.adapters import new_adapter, trainable_parameters
from refpeft.train.data import micro_batch
from refpeft.train.loop import train
from tests.test_model_decoder import TINY, float64_transformers, padded_batch, peer_model, refpeft_model, rel_err
from tests.test_train_command import base_folder, hf_model, peer_logits, train_args  # noqa: F401
from tests.test_train_loop import run_config, toy_dataset

torch = pytest.importorskip("torch", reason="torch + PEFT is the peer checked here")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

NAME, FAMILY = "llama-gqa-llama3", "llama"
TARGETS = ["q_proj", "v_proj", "down_proj"]
SCHEDULE = AdaloraSchedule(init_r=4, target_r=2, total_step=8, tinit=2, tfinal=2, deltaT=1)
TRAINING = AdaloraTraining(SCHEDULE, orth_reg_weight=0.3)
ALPHA = 8.0


def causal_lm_loss(logits, labels, vocab_size, **kwargs):
    """transformers' causal-LM loss (shift, mean over labels != -100) without its float32 upcast."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab_size), labels[:, 1:].reshape(-1))


def starts():
    """refpeft's fresh AdaLoRA model, and PEFT's with the same tensors (by refpeft's names) and ranknum frozen."""
    base = refpeft_model(peer_model(NAME))
    model = replace(base, adapter=new_adapter(base, method="adalora", targets=TARGETS, rank=SCHEDULE.init_r,
                                              alpha=ALPHA, seed=3))
    s = SCHEDULE
    config = peft.AdaLoraConfig(init_r=s.init_r, target_r=s.target_r, total_step=s.total_step, tinit=s.tinit,
                                tfinal=s.tfinal, deltaT=s.deltaT, beta1=s.beta1, beta2=s.beta2, lora_alpha=ALPHA,
                                lora_dropout=0.0, orth_reg_weight=TRAINING.orth_reg_weight, target_modules=TARGETS,
                                task_type="CAUSAL_LM")   # PeftModelForCausalLM: through AdaLoraModel.forward
    peer = peft.get_peft_model(peer_model(NAME), config)
    peer.base_model.model.loss_function = causal_lm_loss
    named = {}
    for n, p in peer.named_parameters():
        if ".ranknum." in n:
            p.requires_grad_(False)
        elif p.requires_grad:
            named[n.removeprefix("base_model.model.").removesuffix(".default")] = p
    params = trainable_parameters(model)
    assert set(named) == set(params)
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(torch.from_numpy(np.asarray(params[name])))
    return model, peer, named


def peer_training(peer, named, dataset, config):
    """PEFT's AdaLoRA loop in torch; (loss, rank_pattern {path: [bool]} or None) per step."""
    params = list(named.values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    out, position, G = [], 0, config.grad_accum
    for step in range(config.steps):
        total = 0.0
        for j in range(G):
            b = micro_batch(dataset, start=position + j * config.batch_size, size=config.batch_size, seed=config.seed)
            with float64_transformers(FAMILY):
                loss = peer(input_ids=torch.from_numpy(b.ids), attention_mask=torch.from_numpy(b.attention_mask),
                            labels=torch.from_numpy(b.labels)).loss / G    # the orthogonality term included
            loss.backward()
            total += float(loss.detach())
        position += G * config.batch_size
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        peer.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        pattern = peer.peft_config["default"].rank_pattern
        out.append((total, None if pattern is None else
                    {k.removeprefix("model.").removesuffix(".lora_E.default"): [bool(v) for v in m]
                     for k, m in pattern.items()}))
    return out


def test_training_trajectory_and_masks_equal_peft():
    config = run_config(steps=SCHEDULE.total_step, warmup_steps=2, max_grad_norm=0.05)
    dataset = toy_dataset()
    model, peer, named = starts()
    theirs = peer_training(peer, named, dataset, config)
    state, reports = None, []
    for step in range(1, config.steps + 1):                 # one step at a time, to see the masks after each
        state = train(model, dataset, config, state=state, stop_after=step, progress=reports.append, adalora=TRAINING)
        loss, pattern = theirs[step - 1]
        report = reports[-1]
        assert abs(report.loss - loss) <= 1e-12 * abs(loss), step
        assert report.terms["orthogonality"] > 0
        ours = state.adalora.rank_pattern
        assert (ours is None) == (pattern is None), step
        if ours is not None:
            assert {p.removeprefix("model."): [bool(b) for b in m] for p, m in ours.items()} == pattern, step
    assert any(r.grad_norm > config.max_grad_norm for r in reports)          # clipping took effect
    patterns = [json.dumps(p, sort_keys=True) for _, p in theirs if p is not None]
    assert len(patterns) == config.steps - SCHEDULE.tinit - 1                 # masked from step tinit + 1 on
    final = state.adalora.rank_pattern
    assert sum(int(np.sum(m)) for m in final.values()) <= SCHEDULE.target_r * len(final) < SCHEDULE.init_r * len(final)
    trained = trainable_parameters(state.model)
    for name, p in named.items():
        assert rel_err(trained[name], p.detach().numpy()) < 1e-9, name
    for path, mask in final.items():                        # pruned singular values are exactly zero in both
        E = trained[f"{path}.lora_E"].reshape(-1)
        assert np.all(E[~np.asarray(mask)] == 0) and np.all(E[np.asarray(mask)] != 0)
        assert np.array_equal(E == 0, named[f"{path}.lora_E"].detach().numpy().reshape(-1) == 0)


def test_written_folder_loads_in_peft_with_equal_logits(tmp_path):
    config = run_config(steps=SCHEDULE.total_step, warmup_steps=2)
    model, _, _ = starts()
    state = train(model, toy_dataset(), config, adalora=TRAINING)
    write_adalora_folder(tmp_path, state.model, state.adalora, TRAINING)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {f"{p}.lora_E": [bool(b) for b in m] for p, m in state.adalora.rank_pattern.items()}
    loaded = peft.PeftModel.from_pretrained(peer_model(NAME), tmp_path).eval()
    ids, mask, _ = padded_batch(TINY["vocab_size"])
    rows = mask.astype(bool)
    ours = forward(state.model, ids, attention_mask=mask)[0]
    assert rel_err(ours[rows], peer_logits(loaded, ids, mask)[rows]) < 1e-10
    # and refpeft reads the pruned folder back to the same logits
    again = forward(replace(state.model, adapter=modules_of(read_adalora_adapter(tmp_path))), ids,
                    attention_mask=mask)[0]
    assert rel_err(again[rows], ours[rows]) < 1e-12


def modules_of(read) -> Adapter:
    """The decoder's adapter of a read AdaLoRA folder: its pruned tensors, ranknum = init_r."""
    return Adapter({p: AdaloraModule(ADALORA.name, dict(zip(TENSOR_NAMES, t)), alpha=read.lora_alpha,
                                     rank=read.init_r) for p, t in read.modules.items()})


def adalora_args(base, out, *extra):
    return train_args(base, out, "--method", "adalora", "--targets", "q_proj,v_proj,up_proj", "--steps", "6",
                      "--rank", "4", "--target-r", "2", "--tinit", "1", "--tfinal", "2", "--orth-reg-weight", "0.2",
                      *extra)


def test_command_writes_an_adalora_folder_peft_loads(base_folder, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert main(adalora_args(base_folder, out)) == 0
    assert f"wrote {out}: an adalora adapter of 6 modules, " in capsys.readouterr().out
    read = read_adalora_adapter(out)
    assert read.init_r == 4 and len(read.rank_pattern) == 6
    assert sum(sum(m) for m in read.rank_pattern.values()) <= 2 * 6
    peer = peft.PeftModel.from_pretrained(hf_model(base_folder), out).eval()
    ids, mask, _ = padded_batch(61)
    rows = mask.astype(bool)
    config, weights, _ = load_model(base_folder, dtype="float64")
    ours = forward(Model(config, weights, modules_of(read)), ids, attention_mask=mask)[0]
    assert rel_err(ours[rows], peer_logits(peer, ids, mask)[rows]) < 1e-10


@pytest.mark.parametrize("extra, message", [
    (("--save-every", "2"), "--method adalora does not take --save-every"),
    (("--loraplus-ratio", "4"), "does not take --loraplus-ratio"),
    (("--target-r", "5"), "target_r = 5 is larger than init_r = 4"),
    (("--rank-pattern", "q_proj=2"), "rank_pattern does not apply"),
    (("--decompose-factor", "2"), "init_options does not apply"),
])
def test_command_refuses_what_adalora_does_not_take(base_folder, tmp_path, capsys, extra, message):  # noqa: F811
    out = tmp_path / "out"
    assert main(adalora_args(base_folder, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()


def test_the_loop_refuses_checkpoints_and_a_wrong_total_step(tmp_path):
    model, _, _ = starts()
    with pytest.raises(ConfigError, match="AdaLoRA run is not checkpointed"):
        train(model, toy_dataset(), run_config(steps=SCHEDULE.total_step), checkpoint_dir=tmp_path, adalora=TRAINING)
    with pytest.raises(ConfigError, match=r"total_step \(8\) must be the run's steps \(9\)"):
        train(model, toy_dataset(), run_config(steps=9), adalora=TRAINING)
    assert not any(tmp_path.iterdir())
