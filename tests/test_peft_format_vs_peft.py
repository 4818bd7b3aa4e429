"""PEFT adapter files against HF PEFT itself (torch CPU, float64): both directions of the round trip.

- PEFT -> refpeft: adapters saved by PEFT's `save_pretrained` (LoRA with rank/alpha patterns,
  lora_bias and trained base biases, rsLoRA, DoRA, VeRA with and without saved projections) on a
  model with target layers of different shapes load into refpeft and give the same layer outputs
  to 1e-12, and `refpeft merge` gives PEFT's `merge_and_unload` weights.
- refpeft -> PEFT: adapters written by refpeft load with `PeftModel.from_pretrained` onto a small
  Llama built locally from a transformers config (no hub) and give the same model outputs as the
  base model with refpeft's merged weights.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PEFT round trips need torch (conformance extra)")
peft = pytest.importorskip("peft", reason="the PEFT round trips need peft (conformance extra)")
transformers = pytest.importorskip("transformers", reason="the refpeft -> PEFT round trip builds a transformers model")

from safetensors.torch import save_file  # noqa: E402

from refpeft.adapter import Adapter, ModuleAdapter  # noqa: E402
from refpeft.checkpoint import SafetensorsFile, merge_into_checkpoint  # noqa: E402
from refpeft.methods.dora import dora_forward  # noqa: E402
from refpeft.methods.linear import LinearShape  # noqa: E402
from refpeft.methods.lora import lora_forward  # noqa: E402
from refpeft.peft_format import read_peft_adapter, read_peft_adapter_with_base, write_peft_adapter  # noqa: E402
from refpeft.methods.vera import largest_layer, vera_forward, vera_projections  # noqa: E402
from tests.support import assert_close  # noqa: E402

TOL = 1e-12


class Toy(torch.nn.Module):
    """Three targets of different shapes, one without a bias, one nested."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.ModuleDict({"q": torch.nn.Linear(16, 24), "v": torch.nn.Linear(16, 8, bias=False)})
        self.out = torch.nn.Linear(24, 12)

    def forward(self, x):
        return self.out(torch.tanh(self.enc["q"](x))) + self.enc["v"](x).sum(-1, keepdim=True)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every trainable adapter tensor (and trained bias) non-trivial values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3 + (1.0 if "magnitude" in name else 0.0))


CONFIGS = {
    "lora-patterns-bias": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "out"],
                                                  rank_pattern={"out": 2}, alpha_pattern={"enc.v": 3},
                                                  bias="lora_only"),
    "lora-lora_bias": lambda: peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q", "out"], lora_bias=True),
    "rslora": lambda: peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q", "v", "out"], use_rslora=True),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "out"], use_dora=True),
    "dora-rslora": lambda: peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q", "v", "out"], use_dora=True,
                                           use_rslora=True, rank_pattern={"q": 4}),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["q", "v", "out"], save_projection=True,
                                    projection_prng_key=3),
    "vera-regenerated": lambda: peft.VeraConfig(r=4, target_modules=["q", "v", "out"], save_projection=False,
                                                projection_prng_key=11),
}


def _peft_saved(name: str, tmp_path):
    torch.manual_seed(0)
    base = Toy()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(base, CONFIGS[name]())
    _randomize(model, seed=1)
    model.save_pretrained(tmp_path / "adapter")
    base_file = tmp_path / "base.safetensors"
    save_file({k: v.double() for k, v in base_state.items()}, str(base_file))
    return model.double().eval(), base_file


def _refpeft_layer(adapter: Adapter, path: str, x: np.ndarray, base: SafetensorsFile) -> np.ndarray:
    """The adapted layer's output computed by refpeft from the file's tensors and the base weights."""
    m = adapter.modules[path]
    W0 = base.read_float(f"{path}.weight")
    bias = adapter.base_biases.get(path, base.read_float(f"{path}.bias") if f"{path}.bias" in base else None)
    bias = None if bias is None else np.asarray(bias, dtype=np.float64)
    f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    if m.method == "vera":
        y, _ = vera_forward(x, W0, f64(adapter.vera_A), f64(adapter.vera_B), f64(m.lambda_d), f64(m.lambda_b), bias=bias)
    elif m.method == "dora":
        y, _ = dora_forward(x, W0, f64(m.A), f64(m.B), f64(m.magnitude), scaling=m.scaling, bias=bias)
    else:
        y, _ = lora_forward(x, W0, f64(m.A), f64(m.B), scaling=m.scaling, bias=bias)
    if m.bias is not None:  # lora_bias: lora_B's own bias, scaled with the branch
        y = y + m.scaling * f64(m.bias)
    return y


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_peft_saved_adapter_gives_peft_layer_outputs(name, tmp_path):
    model, base_file = _peft_saved(name, tmp_path)
    base = SafetensorsFile(base_file)
    adapter = read_peft_adapter_with_base(tmp_path / "adapter", base)
    layers = dict(model.base_model.model.named_modules())
    assert set(adapter.modules) == {p for p in ("enc.q", "enc.v", "out") if p in layers and hasattr(layers[p], "base_layer")}
    for seed, path in enumerate(adapter.modules):
        k = base.info(f"{path}.weight").shape[1]
        x = np.random.default_rng(seed).standard_normal((2, 5, k))
        with torch.no_grad():
            expected = layers[path](torch.from_numpy(x)).numpy()
        assert_close(_refpeft_layer(adapter, path, x, base), expected, rtol=TOL)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_refpeft_merge_equals_peft_merge_and_unload(name, tmp_path):
    model, base_file = _peft_saved(name, tmp_path)
    base = SafetensorsFile(base_file)
    adapter = read_peft_adapter_with_base(tmp_path / "adapter", base)
    merge_into_checkpoint(adapter, base, tmp_path / "merged.safetensors")
    merged = SafetensorsFile(tmp_path / "merged.safetensors")
    expected = model.merge_and_unload().state_dict()
    assert set(merged.keys()) == set(expected)
    for key in merged.keys():
        assert_close(merged.read_float(key), expected[key].numpy(), rtol=TOL)


def test_vera_projections_regenerated_from_the_seed_equal_peft_buffers(tmp_path):
    model, base_file = _peft_saved("vera-regenerated", tmp_path)
    adapter = read_peft_adapter_with_base(tmp_path / "adapter", SafetensorsFile(base_file))
    buffers = model.base_model.vera_A["default"], model.base_model.vera_B["default"]
    np.testing.assert_array_equal(np.asarray(adapter.vera_A, dtype=np.float64), buffers[0].numpy())
    np.testing.assert_array_equal(np.asarray(adapter.vera_B, dtype=np.float64), buffers[1].numpy())


# --- refpeft -> PEFT --------------------------------------------------------------------------------

TARGETS = {  # module path suffix -> rank (different shapes: q 32x32, v 16x32, down 32x48)
    "self_attn.q_proj": 4, "self_attn.v_proj": 2, "mlp.down_proj": 3,
}


def _llama(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double().eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    return config, model


def _f32(rng: np.random.Generator, shape, scale=0.3, offset=0.0) -> np.ndarray:
    """float64 arrays holding float32 values, so PEFT's float32 adapter layers hold them exactly."""
    return (rng.standard_normal(shape) * scale + offset).astype(np.float32).astype(np.float64)


def _refpeft_adapter(method: str, base: SafetensorsFile, *, rslora: bool = False) -> Adapter:
    rng = np.random.default_rng(5)
    paths = [f"model.layers.{i}.{t}" for i in range(2) for t in TARGETS]
    shapes = base.linear_shapes(paths)
    modules = {}
    for path in paths:
        r, (k, d) = TARGETS[path.split(".", 3)[3]], (shapes[path].k, shapes[path].d)
        if method == "vera":
            modules[path] = ModuleAdapter("vera", {"lambda_d": _f32(rng, (4,)), "lambda_b": _f32(rng, (d,))})
        else:
            modules[path] = ModuleAdapter("dora" if method == "dora" else "lora", {"A": _f32(rng, (r, k)), "B": _f32(rng, (d, r)), "magnitude": _f32(rng, (d,), 0.1, 1.0) if method == "dora" else None}, alpha=2.0 * r if "v_proj" in path else 6.0, rslora=rslora)
    if method != "vera":
        return Adapter(modules=modules)
    vera_A, vera_B = vera_projections(largest_layer(shapes.values()), 4, seed=9, dtype="float64")
    return Adapter(modules=modules, vera_A=vera_A, vera_B=vera_B, config={"projection_prng_key": 9})


@pytest.mark.parametrize("method,save_projection,rslora", [("lora", True, False), ("lora", True, True),
                                                           ("dora", True, False), ("vera", True, False),
                                                           ("vera", False, False)])
def test_refpeft_written_adapter_loads_into_peft_with_the_same_outputs(method, save_projection, rslora, tmp_path):
    config, base_model = _llama(tmp_path)
    base = SafetensorsFile(tmp_path / "base.safetensors")
    adapter = _refpeft_adapter(method, base, rslora=rslora)
    write_peft_adapter(tmp_path / "adapter", adapter, save_projection=save_projection)
    assert read_peft_adapter(tmp_path / "adapter").modules.keys() == adapter.modules.keys()

    ids = torch.tensor([[1, 5, 9, 2, 33, 7], [4, 4, 60, 0, 12, 3]])
    with torch.no_grad():
        base_logits = base_model(input_ids=ids).logits.numpy()
    loaded = peft.PeftModel.from_pretrained(base_model, str(tmp_path / "adapter")).double().eval()
    with torch.no_grad():
        peft_logits = loaded(input_ids=ids).logits.numpy()

    merge_into_checkpoint(adapter, base, tmp_path / "merged.safetensors")
    merged_model = transformers.LlamaForCausalLM(config).double().eval()
    merged = SafetensorsFile(tmp_path / "merged.safetensors")
    merged_model.load_state_dict({k: torch.from_numpy(np.array(merged.read(k))) for k in merged.keys()})
    with torch.no_grad():
        refpeft_logits = merged_model(input_ids=ids).logits.numpy()
    assert np.max(np.abs(peft_logits - base_logits)) > 1e-3  # the adapter does change the output
    assert_close(refpeft_logits, peft_logits, rtol=1e-10)
