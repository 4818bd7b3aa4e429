"""IA3 against HF PEFT on torch CPU (float64): outputs, gradients, merges, PEFT's files both ways, the whole decoder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.errors import ShapeError
from refpeft.methods.ia3 import ia3_backward, ia3_forward, ia3_merge, ia3_merge_bias, ia3_unmerge
from refpeft.model.config import config_from_dict
from refpeft.model.decoder import Model, check_adapter_targets, loss_and_gradients
from refpeft.peft_format import read_peft_adapter, write_peft_adapter

torch = pytest.importorskip("torch", reason="PEFT on torch is the peer checked here")
peft = pytest.importorskip("peft")

from tests.test_model_decoder import TINY, float64_transformers, padded_batch, peer_model, rel_err  # noqa: E402


class TwoLayers(torch.nn.Module):
    """A q layer (output scaling, with a bias) feeding a feed-forward layer ff (input scaling, with a bias)."""

    def __init__(self, k: int = 6, h: int = 5, d: int = 4):
        super().__init__()
        self.q = torch.nn.Linear(k, h, dtype=torch.float64)
        self.ff = torch.nn.Linear(h, d, dtype=torch.float64)

    def forward(self, x):
        return self.ff(torch.tanh(self.q(x)))


def peft_pair(seed: int = 0):
    torch.manual_seed(seed)
    base = TwoLayers()
    config = peft.IA3Config(target_modules=["q", "ff"], feedforward_modules=["ff"], init_ia3_weights=False)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.copy_(1.0 + 0.4 * torch.randn_like(p))              # random l, not ones
    return model


def layer_tensors(model, name: str):
    layer = dict(model.named_modules())[f"base_model.model.{name}"]
    base = layer.get_base_layer()
    return (base.weight.detach().numpy().copy(), base.bias.detach().numpy().copy(),
            layer.ia3_l["default"].detach().numpy().copy(), layer)


def test_outputs_and_gradients_equal_peft():
    model = peft_pair()
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((2, 3, 6)), rng.standard_normal((2, 3, 4))
    xt = torch.from_numpy(x).requires_grad_(True)
    y = model(xt)
    (y * torch.from_numpy(dy)).sum().backward()
    Wq, bq, lq, q = layer_tensors(model, "q")
    Wf, bf, lf, ff = layer_tensors(model, "ff")
    assert lq.shape == (5, 1) and lf.shape == (1, 5)
    h, cq = ia3_forward(x, Wq, lq, bias=bq)
    t = np.tanh(h)
    ours, cf = ia3_forward(t, Wf, lf, bias=bf)
    assert rel_err(ours, y.detach().numpy()) < 1e-10
    gf = ia3_backward(dy, cf)
    gq = ia3_backward(gf.dx * (1 - t**2), cq)
    assert rel_err(gf.dl, ff.ia3_l["default"].grad.numpy()) < 1e-10
    assert rel_err(gq.dl, q.ia3_l["default"].grad.numpy()) < 1e-10
    assert rel_err(gq.dx, xt.grad.numpy()) < 1e-10


def test_merge_equals_peft_and_peft_unmerge_is_off_by_its_epsilon():
    model = peft_pair(seed=2)
    before = {name: layer_tensors(model, name) for name in ("q", "ff")}
    model.merge_adapter()
    for name, (W0, b0, l, layer) in before.items():
        base = layer.get_base_layer()
        assert np.array_equal(base.weight.detach().numpy(), ia3_merge(W0, l))       # one product each: exact
        assert np.array_equal(base.bias.detach().numpy(), ia3_merge_bias(b0, l))    # q scales b, ff leaves it
        assert np.array_equal(ia3_unmerge(ia3_merge(W0, l), l), W0) or \
            np.max(np.abs(ia3_unmerge(ia3_merge(W0, l), l) - W0) / np.abs(W0)) <= 2.3e-16
    with pytest.warns(UserWarning, match="inaccurate"):
        model.unmerge_adapter()
    W0, _, l, layer = before["q"]
    drift = np.max(np.abs(layer.get_base_layer().weight.detach().numpy() - W0) / np.abs(W0))
    assert 1e-10 < drift < 1e-7     # PEFT divides by l + 1e-8 (refpeft.methods.ia3, docs/ia3.md)


def test_peft_saved_folder_reads_and_refpeft_written_folder_loads(tmp_path):
    model = peft_pair(seed=3)
    model.save_pretrained(tmp_path / "peft")
    adapter = read_peft_adapter(tmp_path / "peft")
    for name in ("q", "ff"):
        _, _, l, _ = layer_tensors(model, name)
        assert adapter.modules[name].method == "ia3" and np.array_equal(adapter.modules[name].l, l)
    write_peft_adapter(tmp_path / "ours", adapter)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and "r" not in config and "bias" not in config
    torch.manual_seed(0)
    base = TwoLayers()
    base.load_state_dict({k.replace("base_model.model.", "").replace(".base_layer", ""): v
                          for k, v in model.state_dict().items() if "ia3_l" not in k})
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "ours")
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((3, 6)))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.base_model.model.ff.is_feedforward and not loaded.base_model.model.q.is_feedforward


def test_a_side_that_disagrees_with_feedforward_modules_is_refused(tmp_path):
    model = peft_pair(seed=5)
    model.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "feedforward_modules": ["q", "ff"]}))
    with pytest.raises(ShapeError, match="ia3_l has shape \\(5, 1\\), which scales the layer's outputs"):
        read_peft_adapter(tmp_path / "a")


@pytest.mark.parametrize("name", ["llama-gqa-llama3", "qwen2-bias"])
def test_decoder_loss_and_gradients_equal_peft(name, tmp_path):
    family = FAMILIES_OF[name]
    base = peer_model(name)
    weights = {n: t.detach().numpy().copy() for n, t in base.state_dict().items() if not n.endswith("inv_freq")}
    config = peft.IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                            init_ia3_weights=False)
    torch.manual_seed(7)
    peer = peft.get_peft_model(base, config)
    with torch.no_grad():
        for n, p in peer.named_parameters():
            if "ia3_l" in n:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    peer.save_pretrained(tmp_path)
    ids, mask, labels = padded_batch(TINY["vocab_size"])
    with float64_transformers(family):
        logits = peer(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        V = TINY["vocab_size"]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), torch.from_numpy(labels[:, 1:]).reshape(-1))
        loss.backward()
    adapter = read_peft_adapter(tmp_path)
    model = Model(config_from_dict(base.config.to_dict()), weights, Adapter(adapter.modules))
    check_adapter_targets(model)
    ours_loss, _, grads = loss_and_gradients(model, ids, labels, attention_mask=mask)
    assert abs(float(ours_loss) - float(loss)) <= 1e-10 * float(loss)
    checked = 0
    for n, p in peer.named_parameters():
        if p.requires_grad:
            path = n.removeprefix("base_model.model.").split(".ia3_l")[0]
            assert rel_err(grads[f"{path}.l"], p.grad.numpy()) < 1e-9, n
            checked += 1
    assert checked == len(grads) == 3 * TINY["num_hidden_layers"]


FAMILIES_OF = {"llama-gqa-llama3": "llama", "qwen2-bias": "qwen2"}


def test_checkpoint_bias_merge_and_training_init_follow_peft():
    from refpeft.checkpoint import merged_bias
    from refpeft.train.adapters import new_adapter
    from tests.test_model_decoder import refpeft_model

    model = peft_pair(seed=6)
    before = {name: layer_tensors(model, name) for name in ("q", "ff")}
    adapter = Adapter({name: ModuleAdapter("ia3", {"l": l}) for name, (_, _, l, _) in before.items()})
    model.merge_adapter()
    for name, (_, b0, _, layer) in before.items():
        assert np.array_equal(merged_bias(adapter, name, b0), layer.get_base_layer().bias.detach().numpy())
    fresh = new_adapter(refpeft_model(peer_model("llama-gqa-llama3")), method="ia3",
                        targets=["k_proj", "v_proj", "down_proj"])
    shapes = {p.rsplit(".", 1)[-1]: m.l.shape for p, m in fresh.modules.items()}
    assert shapes == {"k_proj": (16, 1), "v_proj": (16, 1), "down_proj": (1, TINY["intermediate_size"])}
    assert all(np.all(m.l == 1.0) for m in fresh.modules.values())
