"""PEFT's modules_to_save end to end: files, the decoder, gradients, training and the commands, against PEFT.

Specification (the peer is transformers + PEFT in float64, tests/test_model_decoder.py):
- Files PEFT's `save_pretrained` writes with LoRA + modules_to_save ("lm_head"; "embed_tokens" and
  "lm_head" on a tied model, where PEFT's copies untie them; "norm", which PEFT's suffix rule
  extends to every layer's norms and Qwen3's q/k norms; whole modules, "mlp" and a biased
  "k_proj") read into refpeft with the saved tensors under their checkpoint names, and the
  model's logits equal PEFT's to 1e-10; the gradient of every trained tensor, saved copies
  included, equals PEFT's to 1e-9.
- refpeft writes the keys PEFT writes and a config naming exactly the saved modules; the files
  read back exactly and load in `PeftModel.from_pretrained` with equal logits.
- A few training steps of LoRA + modules_to_save (AdamW with Trainer's decay groups; LoRA+) equal
  torch + PEFT to 1e-9; a resumed run equals a straight one bit for bit.
- `refpeft train --modules-to-save`, `generate --adapter`, `inspect` and `merge` carry them; the
  merged checkpoint equals PEFT's merge_and_unload.
- Refused, by name: a saved key the config does not name, an entry without tensors,
  ensure_weight_tying, a module both adapted and saved, saved tensors the base lacks or shapes
  it disagrees with, an incomplete module, a 4-bit module, merging into a tied checkpoint.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.checkpoint import SafetensorsFile, merge_into_checkpoint
from refpeft.cli import main
from refpeft.model.adapted import with_adapter
from refpeft.errors import ConfigError, FormatError, ShapeError
from refpeft.io import read_safetensors, write_safetensors
from refpeft.model.config import config_from_dict
from refpeft.model.decoder import Model, check_adapter_targets, forward, loss_and_gradients, quantize_linear_layers
from refpeft.model.load import load_model
from refpeft.peft_format import CONFIG_NAME, WEIGHTS_NAME, peft_tensors, read_peft_adapter, write_peft_adapter
from refpeft.train.adapters import new_adapter, trainable_parameters, with_parameters
from refpeft.train.checkpoints import resume
from refpeft.train.loop import train
from tests.test_model_decoder import TINY, FAMILIES, float64_transformers, padded_batch, peer_model, refpeft_model, \
    rel_err
from tests.test_train_command import base_folder, hf_model, peer_logits, refpeft_logits, train_args  # noqa: F401
from tests.test_train_loop import run_config, toy_dataset, torch_training

torch = pytest.importorskip("torch", reason="transformers + PEFT on torch is the peer")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V = TINY["vocab_size"]
LAYERS = range(TINY["num_hidden_layers"])
NORMS = ["model.norm.weight"] + [f"model.layers.{i}.{n}.weight" for i in LAYERS
                                 for n in ("input_layernorm", "post_attention_layernorm")]
# (model, targets, modules_to_save, the checkpoint names PEFT saves)
CASES = {
    "lm_head": ("llama-gqa-llama3", ["q_proj", "v_proj"], ["lm_head"], ["lm_head.weight"]),
    "tied-lm_head": ("llama-tied", ["q_proj", "v_proj"], ["lm_head"], ["lm_head.weight"]),
    "tied-embed": ("llama-tied", ["q_proj", "v_proj"], ["embed_tokens"], ["model.embed_tokens.weight"]),
    "tied-both": ("llama-tied", ["v_proj"], ["embed_tokens", "lm_head"],
                  ["lm_head.weight", "model.embed_tokens.weight"]),
    "qwen2-norm-k_proj": ("qwen2-bias", ["q_proj", "down_proj"], ["norm", "k_proj"],
                          NORMS + [f"model.layers.{i}.self_attn.k_proj.{t}" for i in LAYERS
                                   for t in ("weight", "bias")]),
    "qwen3-norm-mlp": ("qwen3-qk-norm", ["q_proj", "o_proj"], ["norm", "mlp"],
                       NORMS + [f"model.layers.{i}.self_attn.{n}_norm.weight" for i in LAYERS for n in "qk"]
                       + [f"model.layers.{i}.mlp.{p}.weight" for i in LAYERS
                          for p in ("gate_proj", "up_proj", "down_proj")]),
}


def saved_name(peft_name: str) -> str | None:
    """A PEFT parameter of a saved copy -> its checkpoint name; None for other parameters."""
    if ".modules_to_save.default." not in peft_name:
        return None
    module, tensor = peft_name.removeprefix("base_model.model.").split(".modules_to_save.default.")
    return f"{module}.{tensor}"


def peer_name(peft_name: str) -> str:
    """Any trained PEFT parameter -> refpeft's gradient name."""
    saved = saved_name(peft_name)
    if saved is not None:
        return saved
    path, kind = peft_name.removeprefix("base_model.model.").split(".lora_")      # "A.default.weight"
    return f"{path}.{kind.split('.')[0]}"


def peft_model(case: str, *, seed: int = 3):
    """The case's PEFT model with trained-looking tensors (LoRA random, saved copies moved off the base)."""
    name, targets, saved, _ = CASES[case]
    base = peer_model(name)
    weights = refpeft_model(base).weights                       # copied before PEFT wraps the modules
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False,
                             modules_to_save=saved)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                         # PEFT's tied-embedding warning
        model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(p + 0.1 * torch.randn_like(p) if saved_name(n) else 0.2 * torch.randn_like(p))
    return model, Model(config_from_dict(base.config.to_dict()), weights)


def peer_forward(peer, family: str, ids, mask):
    with float64_transformers(family):
        return peer(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_files_load_with_equal_logits(case, tmp_path):
    peer, base = peft_model(case)
    peer.save_pretrained(tmp_path)
    adapter = read_peft_adapter(tmp_path)
    assert sorted(adapter.saved_modules) == sorted(CASES[case][3])
    copies = {saved_name(n): p.detach().numpy() for n, p in peer.named_parameters() if saved_name(n)}
    for name, value in adapter.saved_modules.items():
        np.testing.assert_array_equal(value, copies[name])
        assert not np.array_equal(value, base.head_weight() if name == "lm_head.weight" else base.weights[name])
    model = replace(base, adapter=adapter)
    check_adapter_targets(model)
    ids, mask, _ = padded_batch(V)
    with torch.no_grad():
        expected = peer_forward(peer.eval(), FAMILIES[CASES[case][0]][0], ids, mask).numpy()
    rows = mask.astype(bool)
    assert rel_err(forward(model, ids, attention_mask=mask)[0][rows], expected[rows]) < 1e-10
    written = peft_tensors(adapter)                              # refpeft writes PEFT's keys, no more
    assert set(written) == set(read_safetensors(tmp_path / WEIGHTS_NAME)[0])


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_equal_peft(case, tmp_path):
    peer, base = peft_model(case)
    ids, mask, labels = padded_batch(V)
    logits = peer_forward(peer, FAMILIES[CASES[case][0]][0], ids, mask)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), torch.from_numpy(labels[:, 1:]).reshape(-1))
    loss.backward()
    peer.save_pretrained(tmp_path)
    model = replace(base, adapter=read_peft_adapter(tmp_path))
    ours, _, grads = loss_and_gradients(model, ids, labels, attention_mask=mask)
    assert abs(float(ours) - float(loss)) <= 1e-10 * float(loss)
    trained = {peer_name(n): p.grad.numpy() for n, p in peer.named_parameters() if p.requires_grad}
    assert set(grads) == set(trained) and set(CASES[case][3]) <= set(grads)
    worst = max(rel_err(grads[n], g) for n, g in trained.items())
    assert worst < 1e-9, worst


@pytest.mark.parametrize("case, method", [("lm_head", "lora"), ("lm_head", "vera"), ("tied-lm_head", "dora"),
                                          ("tied-embed", "lora"), ("qwen2-norm-k_proj", "lora")])
def test_refpeft_written_adapters_load_in_peft(case, method, tmp_path):
    name, targets, saved, names = CASES[case]
    base = refpeft_model(peer_model(name))
    adapter = new_adapter(base, method=method, targets=targets, rank=4, alpha=8.0, modules_to_save=saved)
    start = trainable_parameters(replace(base, adapter=adapter))
    for n in names:                                              # the copies start as the base's tensors
        np.testing.assert_array_equal(start[n], base.head_weight() if n == "lm_head.weight" else base.weights[n])
    rng = np.random.default_rng(0)
    model = with_parameters(replace(base, adapter=adapter),
                            {n: p + 0.1 * rng.standard_normal(p.shape) for n, p in start.items()})
    write_peft_adapter(tmp_path, model.adapter)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["modules_to_save"] == sorted({n.rpartition(".")[0] for n in names})
    read = read_peft_adapter(tmp_path)                           # round trip: exactly what was written
    assert read.saved_modules.keys() == model.adapter.saved_modules.keys()
    assert all(np.array_equal(read.saved_modules[n], v) for n, v in model.adapter.saved_modules.items())
    keys = set(read_safetensors(tmp_path / WEIGHTS_NAME)[0])
    assert {k for k in keys if "lora_" not in k and "vera_" not in k} == {f"base_model.model.{n}" for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = peft.PeftModel.from_pretrained(peer_model(name), tmp_path).eval()
    ids, mask, _ = padded_batch(V)
    with torch.no_grad():
        expected = peer_forward(peer, FAMILIES[name][0], ids, mask).numpy()
    rows = mask.astype(bool)
    assert rel_err(forward(model, ids, attention_mask=mask)[0][rows], expected[rows]) < 1e-10


def test_train_base_selects_base_tensors():
    model = refpeft_model(peer_model("qwen2-bias"))
    ids, mask, labels = padded_batch(V)
    _, _, every = loss_and_gradients(model, ids, labels, attention_mask=mask, train_base=True)
    chosen = {"model.norm.weight", "model.layers.0.self_attn.k_proj.bias", "model.embed_tokens.weight"}
    _, _, some = loss_and_gradients(model, ids, labels, attention_mask=mask, train_base=chosen)
    assert set(some) == chosen and all(np.array_equal(some[n], every[n]) for n in chosen)
    assert set(every) == set(model.weights)
    with pytest.raises(ConfigError, match="not tensors of this model"):
        loss_and_gradients(model, ids, labels, attention_mask=mask, train_base={"model.nrm.weight"})


def trained_peer(name: str, targets, saved, model, *, loraplus: bool = False):
    """PEFT's model of the same adapter, with refpeft's initial tensors, and its parameters by refpeft's names."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, modules_to_save=saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = peft.get_peft_model(peer_model(name), config).to(torch.float64)
    named = {peer_name(n): p for n, p in peer.named_parameters() if p.requires_grad}
    params = trainable_parameters(model)
    assert set(named) == set(params)
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(torch.from_numpy(np.asarray(params[n])))
    return peer, named


@pytest.mark.parametrize("name, saved, changes", [
    ("llama-gqa-llama3", ["lm_head", "norm"], dict(schedule="cosine")),
    ("llama-tied", ["lm_head"], dict(schedule="linear", loraplus_ratio=4.0)),
    ("llama-gqa-llama3", ["embed_tokens", "norm"], dict(schedule="cosine", loraplus_ratio=4.0, accumulation="tokens")),
])
def test_training_steps_equal_torch_and_peft(name, saved, changes):
    targets = ["q_proj", "v_proj", "down_proj"]
    config = run_config(steps=8, lr=5e-3, **changes)
    dataset = toy_dataset()
    base = refpeft_model(peer_model(name))
    model = replace(base, adapter=new_adapter(base, method="lora", targets=targets, rank=4, alpha=8.0, seed=11,
                                              modules_to_save=saved))
    peer, named = trained_peer(name, targets, saved, model)
    reports = []
    final = train(model, dataset, config, progress=reports.append)
    losses, lrs = torch_training("lora", peer, named, dataset, config)
    assert [r.lr for r in reports] == lrs
    assert max(abs(r.loss - t) / abs(t) for r, t in zip(reports, losses)) <= 1e-12
    trained, start = trainable_parameters(final.model), trainable_parameters(model)
    worst = max(rel_err(trained[n], p.detach().numpy()) for n, p in named.items())
    assert worst < 1e-9, worst
    assert all(not np.array_equal(trained[n], start[n]) for n in final.model.adapter.saved_modules)


def test_resume_with_saved_modules_continues_bit_for_bit(tmp_path):
    config, dataset = run_config(steps=4), toy_dataset()
    base = refpeft_model(peer_model("llama-tied"))
    model = replace(base, adapter=new_adapter(base, method="lora", targets=["q_proj"], rank=4,
                                              modules_to_save=["lm_head"]))
    straight = train(model, dataset, config)
    train(model, dataset, config, checkpoint_dir=tmp_path, stop_after=2)
    state = resume(tmp_path, model, config, data_fingerprint=dataset.fingerprint())
    resumed = train(model, dataset, config, state=state)
    a, b = trainable_parameters(straight.model), trainable_parameters(resumed.model)
    assert set(a) == set(b) and all(np.array_equal(a[n], b[n]) for n in a)
    other = replace(base, adapter=new_adapter(base, method="lora", targets=["q_proj"], rank=4,
                                              modules_to_save=["embed_tokens"]))
    with pytest.raises(ConfigError, match="saves modules"):
        resume(tmp_path, other, config, data_fingerprint=dataset.fingerprint())


def test_commands_train_generate_inspect_and_merge(base_folder, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert main(train_args(base_folder, out, "--modules-to-save", "lm_head,model.norm")) == 0
    assert "and 2 saved in full (lm_head, model.norm)" in capsys.readouterr().out
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["modules_to_save"] == ["lm_head", "model.norm"]
    adapter = read_peft_adapter(out)
    _, weights, _ = load_model(base_folder, dtype="float64")
    assert not np.array_equal(adapter.saved_modules["lm_head.weight"], weights["lm_head.weight"])   # trained
    ids, mask, _ = padded_batch(V)
    rows = mask.astype(bool)
    ours = refpeft_logits(base_folder, adapter, ids, mask)
    peer = peft.PeftModel.from_pretrained(hf_model(base_folder), out).eval()
    assert rel_err(ours[rows], peer_logits(peer, ids, mask)[rows]) < 1e-10

    config_, weights_, _ = load_model(base_folder, dtype="float64")                # generate --adapter
    applied = with_adapter(Model(config_, weights_), str(out), dtype="float64")
    assert applied.adapter.saved_modules.keys() == {"lm_head.weight", "model.norm.weight"}
    assert rel_err(forward(applied, ids, attention_mask=mask)[0][rows], ours[rows]) == 0.0
    assert main(["generate", str(base_folder), "--adapter", str(out), "--prompt", "say hello", "--max-new-tokens", "3",
                 "--dtype", "float64"]) == 0

    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "saved in full (modules_to_save: lm_head, model.norm): lm_head.weight 61 x 32, model.norm.weight 32" in shown
    assert f"+ {61 * 32 + 32} values of saved modules" in shown

    merged = tmp_path / "merged" / "model.safetensors"
    merged.parent.mkdir()
    assert main(["merge", str(out), "--base", str(base_folder / "model.safetensors"), "-o", str(merged),
                 "--no-progress"]) == 0
    assert "2 tensors of saved modules written" in capsys.readouterr().out
    tensors, _ = read_safetensors(merged)
    for n, v in adapter.saved_modules.items():
        np.testing.assert_array_equal(tensors[n], v)
    (merged.parent / "config.json").write_text((base_folder / "config.json").read_text())
    config_m, weights_m, _ = load_model(merged.parent, dtype="float64")
    with torch.no_grad():
        unloaded = peer.merge_and_unload()
        expected = peer_logits(unloaded, ids, mask)
    assert rel_err(forward(Model(config_m, weights_m), ids, attention_mask=mask)[0][rows], expected[rows]) < 1e-10


# --- refusals -----------------------------------------------------------------------------------


def _edit_config(folder, change):
    path = folder / CONFIG_NAME
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("change, error, message", [
    (lambda c: c.update(modules_to_save=None), FormatError,
     "unexpected key 'base_model.model.lm_head.weight' .*modules_to_save names no module of it"),
    (lambda c: c.update(modules_to_save=["lm_head", "embed_tokens"]), ConfigError,
     "modules_to_save entry 'embed_tokens' selects no module with tensors"),
    (lambda c: c.update(ensure_weight_tying=True), ConfigError, "ensure_weight_tying with modules_to_save"),
    (lambda c: c.update(modules_to_save="lm_head"), ConfigError, "must be a list of module names"),
])
def test_file_defects_are_named(tmp_path, change, error, message):
    peer, _ = peft_model("lm_head")
    peer.save_pretrained(tmp_path)
    _edit_config(tmp_path, change)
    with pytest.raises(error, match=message) as raised:
        read_peft_adapter(tmp_path)
    assert str(tmp_path) in str(raised.value)


def _lora(W, r=2):
    rng = np.random.default_rng(0)
    return ModuleAdapter("lora", {"A": rng.standard_normal((r, W.shape[1])), "B": rng.standard_normal((W.shape[0], r))})


def test_model_checks_name_the_tensor():
    model = refpeft_model(peer_model("qwen2-bias"))
    q = "model.layers.0.self_attn.q_proj"
    modules = {q: _lora(model.weights[q + ".weight"])}
    norm = model.weights["model.norm.weight"]
    k = "model.layers.1.self_attn.k_proj"
    for saved, error, message in [
        ({"model.norm.weight": norm[:-1]}, ShapeError, r"model.norm.weight has shape \(31,\), the base's"),
        ({"model.nrm.weight": norm}, ShapeError, "the base model has no tensor 'model.nrm.weight'"),
        ({k + ".weight": model.weights[k + ".weight"]}, FormatError, f"saved module '{k}' lacks .*{k}.bias"),
        ({q + ".weight": model.weights[q + ".weight"], q + ".bias": model.weights[q + ".bias"]}, ConfigError,
         f"module '{q}' is adapted but also lies in a saved module"),
    ]:
        with pytest.raises(error, match=message):
            check_adapter_targets(replace(model, adapter=Adapter(modules, saved_modules=saved)))
    with pytest.raises(ConfigError, match="is adapted but also lies in a saved module"):
        write_peft_adapter("unused", Adapter({"lm_head": _lora(model.weights["lm_head.weight"])},
                                             saved_modules={"lm_head.weight": model.weights["lm_head.weight"]}))


def test_new_adapter_refusals():
    model = refpeft_model(peer_model("llama-gqa-llama3"))
    for saved, message in [(["lm_hed"], "entry 'lm_hed' selects no module"),
                           (["self_attn"], "is adapted but also lies in a saved module"),
                           ("lm_head", "a list of module names")]:
        with pytest.raises(ConfigError, match=message):
            new_adapter(model, method="lora", targets=["q_proj"], modules_to_save=saved)
    with pytest.raises(ConfigError, match="stored in 4 bits"):
        new_adapter(quantize_linear_layers(model), method="lora", targets=["q_proj"], modules_to_save=["down_proj"])


def test_merge_into_a_tied_checkpoint_is_refused(tmp_path):
    base = refpeft_model(peer_model("llama-tied"))
    path = tmp_path / "tied.safetensors"
    write_safetensors(path, {n: np.asarray(w) for n, w in base.weights.items()})
    for saved in (["lm_head"], ["embed_tokens"]):
        adapter = new_adapter(base, method="lora", targets=["q_proj"], modules_to_save=saved)
        with pytest.raises(FormatError, match="output layer is tied to its embedding"):
            merge_into_checkpoint(adapter, SafetensorsFile(path), tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_train_command_refuses_modules_to_save_with_full(base_folder, tmp_path, capsys):  # noqa: F811
    assert main(train_args(base_folder, tmp_path / "out", "--method", "full", "--modules-to-save", "lm_head")) == 2
    assert "--method full trains every weight already" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_onnx_export_refuses_saved_modules():
    stack_module = pytest.importorskip("refpeft_onnx.stack", reason="the onnx extra")
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 3))
    adapter = Adapter({"linear": _lora(W)}, saved_modules={"head.weight": rng.standard_normal((2, 4))})
    with pytest.raises(ConfigError, match=r"saves whole modules \(head, PEFT's modules_to_save\)"):
        stack_module.check_adapter(stack_module.single_layer(W), adapter)
