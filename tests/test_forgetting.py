"""Losses that keep what the base knew: distillation from the frozen base (refpeft.model.distillation)
and elastic weight consolidation (refpeft.train.ewc), against torch's autograd and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.errors import ConfigError, InputError
from refpeft.model.decoder import Model
from refpeft.model.distillation import distillation_backward, distillation_forward
from refpeft.train.ewc import diagonal_fisher, ewc_penalty, fisher_names
from tests.support import vjp_check
from tests.test_model_decoder import TINY, float64_transformers, padded_batch, peer_model, refpeft_model, rel_err

torch = pytest.importorskip("torch", reason="torch's autograd is the peer checked here")


def _logits(seed: int, b: int = 2, s: int = 5, V: int = 11):
    rng = np.random.default_rng(seed)
    return 3 * rng.standard_normal((b, s, V)), 3 * rng.standard_normal((b, s, V)), rng.integers(0, 2, (b, s))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.5, 1.0, 2.0, 4.0]))
def test_distillation_equals_torch_kl_div_and_its_autograd(seed, T):
    z, zb, counted = _logits(seed)
    counted[0, 0] = 1
    loss, cache = distillation_forward(z, zb, temperature=T, counted=counted)
    dz = distillation_backward(np.asarray(1.0), cache)
    tz = torch.tensor(z, requires_grad=True)
    per_row = torch.nn.functional.kl_div(torch.log_softmax(tz / T, -1), torch.log_softmax(torch.tensor(zb) / T, -1),
                                         log_target=True, reduction="none").sum(-1)
    theirs = (per_row * torch.tensor(counted)).sum() * T**2 / counted.sum()
    theirs.backward()
    assert abs(float(loss) - float(theirs)) <= 1e-12 * max(1.0, abs(float(theirs)))
    assert np.max(np.abs(dz - tz.grad.numpy())) <= 1e-12 * max(1.0, np.max(np.abs(tz.grad.numpy())))


def test_distillation_is_zero_at_the_base_and_its_gradient_matches_finite_differences():
    z, zb, counted = _logits(1)
    loss, cache = distillation_forward(zb, zb, temperature=2.0, counted=counted)
    assert abs(float(loss)) < 1e-15 and np.max(np.abs(distillation_backward(1.0, cache))) < 1e-15
    _, cache = distillation_forward(z, zb, temperature=2.0, counted=counted)
    dy = np.asarray(0.7)
    vjp_check(lambda logits: distillation_forward(logits, zb, temperature=2.0, counted=counted)[0],
              {"logits": z}, {"logits": distillation_backward(dy, cache)}, dy)


def test_distillation_refuses_bad_input():
    z, zb, _ = _logits(2)
    with pytest.raises(ConfigError, match="temperature must be a positive number"):
        distillation_forward(z, zb, temperature=0.0)
    with pytest.raises(InputError, match="no row counts"):
        distillation_forward(z, zb, counted=np.zeros(z.shape[:2]))


def _lora(model: Model, seed: int, rslora: bool = False) -> Adapter:
    rng = np.random.default_rng(seed)
    modules = {}
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        d, k = model.weights[f"{path}.weight"].shape
        modules[path] = ModuleAdapter("lora", {"A": rng.standard_normal((3, k)), "B": rng.standard_normal((d, 3))},
                                      alpha=6.0, rslora=rslora)
    return Adapter(modules)


@pytest.mark.parametrize("rslora", [False, True])
def test_the_ewc_penalty_gradient_matches_finite_differences(rslora):
    base = refpeft_model(peer_model("llama-gqa-llama3"))
    adapter = _lora(base, 3, rslora)
    rng = np.random.default_rng(4)
    fisher = {name: rng.random(base.weights[name].shape) for name in fisher_names(Model(base.config, base.weights,
                                                                                        adapter))}
    _, grads = ewc_penalty(Model(base.config, base.weights, adapter), fisher, 0.3)
    for path, module in adapter.modules.items():
        def penalty(A, B, path=path, module=module):
            changed = Adapter({**adapter.modules, path: module.replace(A=A, B=B)})
            return np.asarray(ewc_penalty(Model(base.config, base.weights, changed), fisher, 0.3)[0])

        vjp_check(penalty, {"A": module.A, "B": module.B}, {"A": grads[f"{path}.A"], "B": grads[f"{path}.B"]},
                  np.asarray(1.0))


def test_full_fine_tuning_penalty_and_gradient():
    base = refpeft_model(peer_model("llama-tied"))
    rng = np.random.default_rng(5)
    moved = {n: w + 0.01 * rng.standard_normal(w.shape) for n, w in base.weights.items()}
    fisher = {n: rng.random(w.shape) for n, w in base.weights.items()}
    value, grads = ewc_penalty(Model(base.config, moved), fisher, 2.0, reference=base.weights)
    direct = sum(np.sum(fisher[n] * (moved[n] - base.weights[n]) ** 2) for n in fisher)
    assert abs(float(value) - direct) <= 1e-12 * direct
    assert all(np.allclose(grads[n], 2.0 * fisher[n] * (moved[n] - base.weights[n]), rtol=0, atol=0) for n in fisher)
    with pytest.raises(ConfigError, match="needs the base weights"):
        ewc_penalty(Model(base.config, moved), fisher, 2.0)


def test_the_fisher_is_the_mean_squared_per_example_gradient_of_torch():
    peer = peer_model("qwen2-bias")
    base = refpeft_model(peer)
    ids, mask, labels = padded_batch(TINY["vocab_size"])
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    ours = diagonal_fisher(base, [(ids[e:e + 1], labels[e:e + 1], mask[e:e + 1]) for e in range(2)], names)
    params = dict(peer.named_parameters())
    squares = {n: 0.0 for n in names}
    for e in range(2):
        peer.zero_grad()
        with float64_transformers("qwen2"):
            logits = peer(torch.from_numpy(ids[e:e + 1]), attention_mask=torch.from_numpy(mask[e:e + 1])).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], torch.from_numpy(labels[e, 1:]))
            loss.backward()
        for n in names:
            squares[n] = squares[n] + params[n].grad.numpy() ** 2
    for n in names:
        assert rel_err(ours[n], squares[n] / 2) < 1e-9, n


def test_ewc_refuses_methods_it_has_no_derivation_for():
    base = refpeft_model(peer_model("llama-tied"))
    path = "model.layers.0.self_attn.q_proj"
    d, k = base.weights[f"{path}.weight"].shape
    dora = ModuleAdapter("dora", {"A": np.ones((2, k)), "B": np.zeros((d, 2)), "magnitude": np.ones(d)}, alpha=2.0)
    with pytest.raises(ConfigError, match="derived for lora"):
        fisher_names(Model(base.config, base.weights, Adapter({path: dora})))


def test_a_step_with_every_term_has_the_gradients_of_torch_and_peft():
    """task + alpha KD(T) + lambda_p prior + EWC, differentiated by torch through PEFT's LoRA (float64 peer)."""
    from refpeft.model.config import config_from_dict
    from refpeft.train.data import Batch, Example, TokenDataset, micro_batch
    from refpeft.train.objective import Forgetting, micro_batch_terms, prior_terms, step_penalty
    from tests.test_model_decoder import _peft_adapter, _refpeft_adapter

    base = peer_model("qwen2-bias")
    weights = refpeft_model(base).weights
    peer = _peft_adapter(base, "lora")
    adapter = _refpeft_adapter(peer, "lora")
    model = Model(config_from_dict(base.config.to_dict()), weights, adapter)
    ids, mask, labels = padded_batch(TINY["vocab_size"])
    prior_ids, _, _ = padded_batch(TINY["vocab_size"], seed=7)
    prior = TokenDataset(tuple(Example(row, row.copy(), f"line {i}") for i, row in enumerate(prior_ids)), pad_id=0,
                         block_size=16)
    rng = np.random.default_rng(8)
    fisher = {name: rng.random(weights[name].shape) for name in fisher_names(model)}
    settings_ = Forgetting(distill=0.4, temperature=2.0, ewc=3.0, fisher=fisher, prior=prior, prior_weight=0.7)
    terms, grads = micro_batch_terms(model, Batch(ids, labels, mask), settings_, loss_weight=1.0, count=1)
    prior_t, prior_g = prior_terms(model, settings_, position=0, size=2, count=1, seed=0)
    penalty_t, penalty_g = step_penalty(model, settings_)
    ours = {n: grads[n] + prior_g[n] + penalty_g[n] for n in grads}

    prior_batch = micro_batch(prior, start=0, size=2, seed=2)
    V = TINY["vocab_size"]
    with float64_transformers("qwen2"):
        logits = peer(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        task = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), torch.from_numpy(labels[:, 1:]).reshape(-1))
        with peer.disable_adapter(), torch.no_grad():
            base_logits = peer(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        real = torch.from_numpy(mask).to(torch.float64)
        kl = torch.nn.functional.kl_div(torch.log_softmax(logits / 2.0, -1), torch.log_softmax(base_logits / 2.0, -1),
                                        log_target=True, reduction="none").sum(-1)
        kd = (kl * real).sum() * 4.0 / real.sum()
        p_logits = peer(torch.from_numpy(prior_batch.ids), attention_mask=torch.from_numpy(prior_batch.attention_mask)).logits
        prior_loss = torch.nn.functional.cross_entropy(p_logits[:, :-1].reshape(-1, V),
                                                       torch.from_numpy(prior_batch.labels[:, 1:]).reshape(-1))
        penalty = 0.0
        for path, module in adapter.modules.items():
            layer = peer.get_submodule(f"base_model.model.{path}")
            delta = module.scaling * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            penalty = penalty + 0.5 * 3.0 * (torch.from_numpy(fisher[f"{path}.weight"]) * delta**2).sum()
        total = task + 0.4 * kd + 0.7 * prior_loss + penalty
        total.backward()
    assert abs(terms["task"] + terms["distill"] + prior_t["prior"] + penalty_t["ewc"] - float(total)) <= 1e-10 * float(total)
    for n, p in peer.named_parameters():
        if p.requires_grad:
            path = n.removeprefix("base_model.model.").split(".lora_")[0]
            tensor = {"lora_A": "A", "lora_B": "B"}[n.split(".")[-3]]
            assert rel_err(ours[f"{path}.{tensor}"], p.grad.numpy()) < 1e-9, n


def test_rehearsal_mixes_a_fixed_share_of_general_examples_deterministically():
    from refpeft.train.data import Example, TokenDataset
    from refpeft.train.objective import Forgetting, step_batches

    def dataset(first: int, n: int) -> TokenDataset:
        return TokenDataset(tuple(Example(np.asarray([first + i, 1]), np.asarray([first + i, 1]), f"{i}")
                                  for i in range(n)), pad_id=0, block_size=8)

    task, general = dataset(100, 12), dataset(500, 5)
    settings_ = Forgetting(rehearsal=general, rehearsal_fraction=0.5)
    steps = [step_batches(task, settings_, position=p, size=4, count=2, seed=3) for p in (0, 8)]
    assert steps[0][0].ids.tolist() == step_batches(task, settings_, position=0, size=4, count=2, seed=3)[0].ids.tolist()
    for batches in steps:
        for batch in batches:
            firsts = batch.ids[:, 0]
            assert np.sum(firsts >= 500) == 2 and np.sum((firsts >= 100) & (firsts < 500)) == 2
    seen = {int(i) for batches in steps for b in batches for i in b.ids[:, 0] if i >= 500}
    assert len(seen) >= 4                                        # the general stream moves on from batch to batch


def test_train_command_with_every_term_reports_them_and_distillation_keeps_the_base(tmp_path, capsys):
    import json

    from refpeft.cli import main
    from tests.test_train_command import RECORDS
    from refpeft.model.config import config_from_dict
    from refpeft.model.weights import save_model_folder
    from tests.test_train_data import WORDS, word_tokenizer

    folder = tmp_path / "base"
    peer = peer_model("llama-gqa-llama3")
    weights = {n: t.detach().numpy().copy() for n, t in peer.state_dict().items() if not n.endswith("inv_freq")}
    save_model_folder(folder, config_from_dict(peer.config.to_dict()), weights)
    word_tokenizer().backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "<|im_end|>",
                                                              "unk_token": "<unk>"}))
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    (folder / "general.txt").write_text(" ".join(WORDS * 6))
    common = ["train", str(folder), "--data", str(folder / "data.jsonl"), "--steps", "12", "--lr", "0.05",
              "--batch-size", "2", "--rank", "4", "--dtype", "float64", "--general", str(folder / "general.txt"),
              "--block-size", "8", "--targets", "q_proj,v_proj,down_proj"]
    drifts = {}
    for name, extra in (("plain", []), ("kept", ["--distill", "20", "--ewc", "50", "--rehearsal-fraction", "0.5",
                                                 "--prior", str(folder / "data.jsonl"), "--prior-weight", "0.5"])):
        assert main([*common, *extra, "-o", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        drifts[name] = float(out.split("KL(base || trained) = ")[1].split()[0])
        if name == "kept":
            assert all(f"{term} " in out for term in ("task", "distill", "prior", "ewc"))
    assert drifts["kept"] < 0.5 * drifts["plain"], drifts
