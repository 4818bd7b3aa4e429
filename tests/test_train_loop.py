"""refpeft.train.loop against the same loop written in torch + PEFT, and exact resumption.

- THE KEY CHECK: 20 float64 optimiser steps of LoRA on a tiny random Llama (hidden 32, 2 layers,
  vocabulary 61; padded batches with prompt labels -100), AdamW with warm-up + cosine, clipping at
  a norm the gradients exceed, accumulation over 2 micro-batches, equal the loop written in torch:
  PEFT's LoraModel on transformers (the float64 peer of tests/test_model_decoder.py),
  `(loss / G).backward()`, `clip_grad_norm_`, `torch.optim.AdamW`, transformers'
  `get_cosine_schedule_with_warmup`: every adapter tensor to 1e-9 relative after 20 steps, the
  loss of every step to 1e-12, the learning rate of every step exactly. Variants cover DoRA with
  LoRA+ and token-weighted accumulation, rsLoRA with the linear schedule, VeRA, and full fine-tuning
  (with transformers' Trainer's weight-decay groups).
- 10 steps straight equal 5 steps, a checkpoint, `resume` and 5 more, bit for bit (adapter tensors
  and optimiser moments), for LoRA, VeRA and full fine-tuning.
- A save that fails half-way leaves the previous checkpoint as the latest; resuming with changed
  settings or data is refused, naming what changed.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from refpeft.errors import ConfigError
from refpeft.train import checkpoints
from refpeft.train.adapters import new_adapter, trainable_parameters
from refpeft.train.checkpoints import latest_checkpoint, resume
from refpeft.train.data import Example, TokenDataset, micro_batch
from refpeft.train.loop import train
from refpeft.train.state import TrainingConfig
from tests.test_model_decoder import TINY, float64_transformers, peer_model, refpeft_model, rel_err

torch = pytest.importorskip("torch", reason="torch + PEFT is the peer checked here")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer  # noqa: E402

NAME, FAMILY = "llama-gqa-llama3", "llama"
TARGETS = ["q_proj", "v_proj", "down_proj"]
PEER_TENSORS = {"lora_A": "A", "lora_B": "B", "lora_magnitude_vector": "magnitude", "vera_lambda_d": "lambda_d",
                "vera_lambda_b": "lambda_b"}


def toy_dataset(count: int = 7, *, seed: int = 4) -> TokenDataset:
    """Sequences of 5..12 tokens whose first 1..3 labels are -100 (a prompt), so batches are padded."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        ids = rng.integers(0, TINY["vocab_size"], size=int(rng.integers(5, 13)))
        labels = ids.copy()
        labels[: int(rng.integers(1, 4))] = -100
        examples.append(Example(ids=ids, labels=labels, source=f"toy {i}"))
    return TokenDataset(tuple(examples), pad_id=0, block_size=12)


CASES = {
    "lora-adamw-cosine": dict(method="lora", config=dict(schedule="cosine")),
    "dora-loraplus-tokens": dict(method="dora", config=dict(schedule="cosine", loraplus_ratio=4.0,
                                                            accumulation="tokens")),
    "rslora-linear": dict(method="rslora", config=dict(schedule="linear")),
    "vera-constant": dict(method="vera", config=dict(schedule="constant", lr=5e-2)),
    "full-cosine": dict(method="full", config=dict(schedule="cosine", lr=2e-3)),
}


def run_config(**changes) -> TrainingConfig:
    settings = dict(steps=20, batch_size=2, grad_accum=2, lr=2e-2, weight_decay=0.01, warmup_steps=4,
                    schedule="cosine", max_grad_norm=0.05, seed=3)
    return TrainingConfig(**{**settings, **changes})


def refpeft_start(method: str):
    base = refpeft_model(peer_model(NAME))
    if method == "full":
        return base
    return replace(base, adapter=new_adapter(base, method=method, targets=TARGETS, rank=4, alpha=8.0, seed=11))


def peer_start(method: str, model):
    """The peer with refpeft's initial tensors, and its trained parameters keyed by refpeft's names."""
    peer = peer_model(NAME)
    if method == "full":
        return peer, dict(peer.named_parameters())
    if method == "vera":
        config = peft.VeraConfig(r=4, target_modules=TARGETS, vera_dropout=0.0, projection_prng_key=0)
    else:
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
                                 use_dora=method == "dora", use_rslora=method == "rslora")
    peer = peft.get_peft_model(peer, config).to(torch.float64)
    named = {}
    for n, p in peer.named_parameters():
        if p.requires_grad:
            path, kind = next((n.split(f".{k}")[0], k) for k in PEER_TENSORS if f".{k}" in n)
            named[f"{path.removeprefix('base_model.model.')}.{PEER_TENSORS[kind]}"] = p
    params = trainable_parameters(model)
    assert set(named) == set(params)
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(torch.from_numpy(np.asarray(params[name])))
        if method == "vera":                                      # PEFT's float32 projections, cast
            assert np.array_equal(peer.base_model.vera_A["default"].numpy(), model.adapter.vera_A)
            assert np.array_equal(peer.base_model.vera_B["default"].numpy(), model.adapter.vera_B)
    return peer, named


def torch_training(method: str, peer, named, dataset: TokenDataset, config: TrainingConfig):
    """The loop in torch, as transformers' Trainer runs it; returns (losses, lrs) per step."""
    if config.loraplus_ratio is not None:
        optimizer = create_loraplus_optimizer(
            peer, torch.optim.AdamW, lr=config.lr, loraplus_lr_ratio=config.loraplus_ratio,
            loraplus_weight_decay=config.weight_decay, betas=config.betas, eps=config.eps)
    else:
        decay = set(transformers.Trainer.get_decay_parameter_names(None, peer))
        groups = [{"params": [p for n, p in peer.named_parameters() if p.requires_grad and n in decay],
                   "weight_decay": config.weight_decay},
                  {"params": [p for n, p in peer.named_parameters() if p.requires_grad and n not in decay],
                   "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas,
                                      eps=config.eps)
    make = {"cosine": transformers.get_cosine_schedule_with_warmup,
            "linear": transformers.get_linear_schedule_with_warmup}.get(config.schedule)
    scheduler = make(optimizer, config.warmup_steps, config.steps) if make else \
        transformers.get_constant_schedule_with_warmup(optimizer, config.warmup_steps)
    params = list(named.values())
    V = TINY["vocab_size"]
    losses, lrs, position = [], [], 0
    for _ in range(config.steps):
        batches = [micro_batch(dataset, start=position + j * config.batch_size, size=config.batch_size,
                               seed=config.seed) for j in range(config.grad_accum)]
        position += config.grad_accum * config.batch_size
        items = sum(b.targets for b in batches)
        total = 0.0
        for b in batches:
            with float64_transformers(FAMILY):
                logits = peer(torch.from_numpy(b.ids), attention_mask=torch.from_numpy(b.attention_mask)).logits
            targets = torch.from_numpy(b.labels[:, 1:]).reshape(-1)
            if config.accumulation == "mean":
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), targets) / config.grad_accum
            else:
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), targets,
                                                         reduction="sum") / items
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses, lrs


@pytest.mark.parametrize("case", list(CASES))
def test_twenty_steps_equal_torch_and_peft(case):
    method, config = CASES[case]["method"], run_config(**CASES[case]["config"])
    dataset = toy_dataset()
    model = refpeft_start(method)
    peer, named = peer_start(method, model)
    reports = []
    final = train(model, dataset, config, progress=reports.append)
    losses, lrs = torch_training(method, peer, named, dataset, config)
    assert [r.lr for r in reports] == lrs                          # the same floats, step by step
    assert lrs[0] == 0.0 and max(lrs) == config.lr
    for ours, theirs in zip([r.loss for r in reports], losses):
        assert abs(ours - theirs) <= 1e-12 * abs(theirs)
    assert any(r.grad_norm > config.max_grad_norm for r in reports)   # clipping took effect
    trained = trainable_parameters(final.model)
    start = trainable_parameters(model)
    for name, p in named.items():
        theirs = p.detach().numpy()
        assert rel_err(trained[name], theirs) < 1e-9, name
        assert not np.array_equal(trained[name], start[name]) or method == "vera", name   # everything moved
    assert losses[-1] < losses[0]


def assert_same_state(a, b):
    pa, pb = trainable_parameters(a.model), trainable_parameters(b.model)
    assert set(pa) == set(pb) and all(np.array_equal(pa[n], pb[n]) for n in pa)
    assert a.step == b.step and a.data_position == b.data_position and a.adam.step == b.adam.step
    for kind in ("exp_avg", "exp_avg_sq"):
        x, y = getattr(a.adam, kind), getattr(b.adam, kind)
        assert set(x) == set(y) and all(np.array_equal(x[n], y[n]) for n in x)


@pytest.mark.parametrize("method", ["lora", "vera", "full"])
def test_resume_continues_bit_for_bit(method, tmp_path):
    config = run_config(steps=10, **({"loraplus_ratio": 8.0} if method == "lora" else {}))
    dataset = toy_dataset()
    model = refpeft_start(method)
    straight = train(model, dataset, config)
    first = train(model, dataset, config, checkpoint_dir=tmp_path, stop_after=5)
    assert first.step == 5 and latest_checkpoint(tmp_path).name == "step-000005"
    fresh = refpeft_start(method)                                 # a new process: a fresh adapter, then the checkpoint
    resumed = resume(tmp_path, fresh, config, data_fingerprint=dataset.fingerprint())
    assert_same_state(resumed, first)
    second = train(fresh, dataset, config, state=resumed, checkpoint_dir=tmp_path, save_every=5)
    assert_same_state(second, straight)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step-000010"]


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config, dataset, model = run_config(steps=4), toy_dataset(), refpeft_start("lora")
    train(model, dataset, config, checkpoint_dir=tmp_path, stop_after=2)

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "save_adam_state", broken)
    with pytest.raises(KeyboardInterrupt):
        train(model, dataset, config, state=resume(tmp_path, model, config, data_fingerprint=dataset.fingerprint()),
              checkpoint_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step-000002"]
    assert resume(tmp_path, model, config, data_fingerprint=dataset.fingerprint()).step == 2


def test_resume_refuses_changed_settings_data_or_adapter(tmp_path):
    config, dataset, model = run_config(steps=4), toy_dataset(), refpeft_start("lora")
    train(model, dataset, config, checkpoint_dir=tmp_path, stop_after=2)
    with pytest.raises(ConfigError, match="lr = 0.02; this run asks for 0.03"):
        resume(tmp_path, model, replace(config, lr=3e-2), data_fingerprint=dataset.fingerprint())
    with pytest.raises(ConfigError, match="other data"):
        resume(tmp_path, model, config, data_fingerprint=toy_dataset(seed=5).fingerprint())
    other = replace(model, adapter=new_adapter(model, method="lora", targets=["q_proj"], rank=4, alpha=8.0))
    with pytest.raises(ConfigError, match="adapts"):
        resume(tmp_path, other, config, data_fingerprint=dataset.fingerprint())
    with pytest.raises(ConfigError, match="'adapter' training"):
        resume(tmp_path, replace(model, adapter=None), config, data_fingerprint=dataset.fingerprint())
