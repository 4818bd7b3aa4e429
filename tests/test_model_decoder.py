"""The whole decoder against transformers + PEFT on torch CPU in float64, and its gradients against finite differences.

Stock transformers is not float64 end to end (conformance/FINDINGS.md): LlamaRMSNorm computes in
float32 (`hidden_states.to(torch.float32)`), the rotary inverse frequencies and cos/sin are
float32 (`dtype=torch.float`, `.float()`), eager attention's softmax runs in float32. The float64
peer here is transformers with exactly those casts removed by `float64_transformers` (a test-side
patch of those three functions, each transformers' own code less the cast); that the patch
changes nothing else is checked by comparing it with stock transformers in float32, where the
casts are no-ops: the logits are bit-identical.
"""

from __future__ import annotations


import numpy as np
import pytest

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.model.config import config_from_dict
from refpeft.model.decoder import Model, check_adapter_targets, forward, loss_and_gradients
from refpeft.model.loss import causal_lm_loss_forward
from tests.support import vjp_check

torch = pytest.importorskip("torch", reason="transformers on torch is the peer checked here")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
FAMILIES = {
    "llama-gqa-llama3": ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 16})),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "mistral": ("mistral", dict(sliding_window=None)),
    "qwen2-bias": ("qwen2", dict(use_sliding_window=False)),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=8, use_sliding_window=False)),
}
from refpeft_peers.transformers_float64 import float64_transformers  # noqa: E402
from refpeft_peers.transformers_float64 import float64_inv_freq as _float64_inv_freq  # noqa: E402


def peer_model(name: str, *, seed: int = 0, dtype=torch.float64):
    family, extra = FAMILIES[name]
    config = transformers.AutoConfig.for_model(family, **{**TINY, **extra}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():                                           # random norms and biases, not ones and zeros
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if n.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    if dtype == torch.float64:
        _float64_inv_freq(model, family)
    return model


def refpeft_model(peer, adapter: Adapter | None = None) -> Model:
    config = config_from_dict(peer.config.to_dict())
    weights = {n: t.detach().numpy().copy() for n, t in peer.state_dict().items()
               if not n.endswith("inv_freq") and not (config.tie_word_embeddings and n == "lm_head.weight")}
    model = Model(config, weights, adapter)
    check_adapter_targets(model)
    return model


def padded_batch(vocab: int, *, seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(2, 9))
    mask = np.ones((2, 9), dtype=np.int64)
    mask[1, :3] = 0                                                 # left padding in the second row
    labels = np.where(mask == 1, ids, -100)
    labels[0, :2] = -100
    # The first real token of the padded row is predicted from a padding position, a query row with
    # every key masked. Its output is the mean of v in both; its gradient differs (FINDINGS.md:
    # autograd differentiates softmax as if the mask were absent, while fl(qk + min) = min makes the
    # computed output constant in q and k). The gradient tests leave that token out of the loss.
    labels[1, 3] = -100
    return ids, mask, labels


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_and_loss_equal_float64_transformers(name):
    family = FAMILIES[name][0]
    peer = peer_model(name)
    ids, mask, labels = padded_batch(TINY["vocab_size"])
    with float64_transformers(family), torch.no_grad():
        expected = peer(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    logits, _, _ = forward(refpeft_model(peer), ids, attention_mask=mask)
    rows = mask.astype(bool)                                       # padded query rows are not outputs anyone uses
    assert rel_err(logits[rows], expected[rows]) < 1e-10
    loss, _ = causal_lm_loss_forward(logits, labels)
    peer_loss = torch.nn.functional.cross_entropy(torch.from_numpy(expected[:, :-1]).reshape(-1, TINY["vocab_size"]),
                                                  torch.from_numpy(labels[:, 1:]).reshape(-1), ignore_index=-100)
    assert abs(float(loss) - float(peer_loss)) <= 1e-10 * abs(float(peer_loss))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_the_float64_patch_changes_nothing_in_float32(family):
    name = next(n for n, (f, _) in FAMILIES.items() if f == family)
    peer = peer_model(name, dtype=torch.float32)
    ids, mask, _ = padded_batch(TINY["vocab_size"])
    with torch.no_grad():
        stock = peer(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        with float64_transformers(family):
            patched = peer(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    assert torch.equal(stock, patched)


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHOD_CONFIGS = {
    "lora": dict(use_rslora=False),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
    "lora-patterns": dict(rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 5}, alpha_pattern={"v_proj": 3.0}),
}


def _peft_adapter(peer, method: str, *, seed: int = 3):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), lora_dropout=0.0,
                             init_lora_weights=False, **METHOD_CONFIGS[method])
    torch.manual_seed(seed)
    model = peft.get_peft_model(peer, config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn_like(p) + (1.0 if "magnitude" in n else 0.0))
    return model


def _refpeft_adapter(peft_model, method: str) -> Adapter:
    modules = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            path = name.removeprefix("base_model.model.")
            tensors = {"A": module.lora_A["default"].weight.detach().numpy().copy(),
                       "B": module.lora_B["default"].weight.detach().numpy().copy()}
            if module.use_dora["default"]:
                tensors["magnitude"] = module.lora_magnitude_vector["default"].weight.detach().numpy().copy()
            modules[path] = ModuleAdapter("dora" if "magnitude" in tensors else "lora", tensors,
                                          alpha=module.lora_alpha["default"], rslora=bool(module.use_rslora["default"]))
    return Adapter(modules)


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
@pytest.mark.parametrize("name", ["llama-gqa-llama3", "qwen2-bias", "qwen3-qk-norm"])
def test_adapter_gradients_equal_peft(name, method):
    family = FAMILIES[name][0]
    base = peer_model(name)
    weights = refpeft_model(base).weights                           # copied before PEFT wraps the layers
    peer = _peft_adapter(base, method)
    ids, mask, labels = padded_batch(TINY["vocab_size"])
    with float64_transformers(family):
        logits = peer(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        V = TINY["vocab_size"]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), torch.from_numpy(labels[:, 1:]).reshape(-1))
        loss.backward()
    adapter = _refpeft_adapter(peer, method)
    model = Model(config_from_dict(base.config.to_dict()), weights, adapter)
    check_adapter_targets(model)
    ours_loss, _, grads = loss_and_gradients(model, ids, labels, attention_mask=mask)
    assert abs(float(ours_loss) - float(loss)) <= 1e-10 * float(loss)
    checked = 0
    for n, p in peer.named_parameters():
        if not p.requires_grad:
            continue
        path = n.removeprefix("base_model.model.").split(".lora_")[0]
        kind = "lora_" + n.split(".lora_")[1].split(".")[0]
        tensor = {"lora_A": "A", "lora_B": "B", "lora_magnitude_vector": "magnitude"}[kind]
        assert rel_err(grads[f"{path}.{tensor}"], p.grad.numpy()) < 1e-9, n
        checked += 1
    assert checked == len(grads) > 0


def test_full_fine_tuning_gradients_equal_torch():
    peer = peer_model("qwen2-bias")
    ids, mask, labels = padded_batch(TINY["vocab_size"])
    with float64_transformers("qwen2"):
        logits = peer(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        V = TINY["vocab_size"]
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), torch.from_numpy(labels[:, 1:]).reshape(-1)).backward()
    _, _, grads = loss_and_gradients(refpeft_model(peer), ids, labels, attention_mask=mask, train_base=True)
    for n, p in peer.named_parameters():
        assert rel_err(grads[n], p.grad.numpy()) < 1e-9, n
    assert len(grads) == len(list(peer.parameters()))


def test_a_frozen_linear_layer_keeps_no_input_on_the_tape():
    # Memory: dx = dy W needs no x; only a trained weight's dW = dy^T x does.
    peer = peer_model("llama-gqa-llama3")
    ids, mask, _ = padded_batch(TINY["vocab_size"])
    path = "model.layers.0.self_attn.q_proj"
    W = peer.state_dict()[path + ".weight"].numpy()
    adapter = Adapter({path: ModuleAdapter("lora", {"A": np.ones((2, W.shape[1])), "B": np.zeros((W.shape[0], 2))},
                                           alpha=2.0)})
    model = refpeft_model(peer, adapter)
    for train_base, kept in ((False, set()), ({"model.layers.1.mlp.up_proj.weight"}, {"model.layers.1.mlp.up_proj"})):
        _, tape, _ = forward(model, ids, attention_mask=mask, train_base=train_base)
        linear = {kind.split(":", 1)[1]: cache[0] for kind, cache in tape.entries if kind.startswith("linear:")}
        assert len(linear) == 2 * 7 - 1 + 1                        # every projection but the adapted one, lm_head
        assert {p for p, x in linear.items() if x is not None} == kept


def test_exact_dora_and_full_gradients_match_finite_differences():
    peer = peer_model("qwen3-qk-norm")
    base = refpeft_model(peer)
    rng = np.random.default_rng(5)
    ids, mask, labels = padded_batch(TINY["vocab_size"])
    path = "model.layers.1.self_attn.v_proj"
    W = base.weights[path + ".weight"]
    module = ModuleAdapter("dora", {"A": 0.3 * rng.standard_normal((3, W.shape[1])),
                                    "B": 0.3 * rng.standard_normal((W.shape[0], 3)),
                                    "magnitude": np.linalg.norm(W, axis=1) * rng.uniform(0.8, 1.2, W.shape[0])},
                           alpha=6.0)
    dy = rng.standard_normal((2, 9, TINY["vocab_size"]))
    from refpeft.model.decoder import backward

    def run(A, B, magnitude, norm):
        weights = {**base.weights, "model.layers.0.self_attn.k_norm.weight": norm}
        m = Model(base.config, weights, Adapter({path: module.replace(A=A, B=B, magnitude=magnitude)}),
                  method_options={"dora": {"gradient": "exact"}})
        return forward(m, ids, attention_mask=mask, train_base=True)

    inputs = {"A": module.A, "B": module.B, "magnitude": module.magnitude,
              "norm": base.weights["model.layers.0.self_attn.k_norm.weight"]}
    logits, tape, _ = run(**inputs)
    model = Model(base.config, {**base.weights}, Adapter({path: module}), method_options={"dora": {"gradient": "exact"}})
    g = backward(model, dy, tape)
    grads = {"A": g[path + ".A"], "B": g[path + ".B"], "magnitude": g[path + ".magnitude"],
             "norm": g["model.layers.0.self_attn.k_norm.weight"]}
    vjp_check(lambda **kw: run(**kw)[0], inputs, grads, dy, tol=1e-7)
