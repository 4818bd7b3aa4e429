"""End to end against HF PEFT: a PEFT-saved adapter, exported by `refpeft export`, run in ONNX Runtime,
gives PEFT's own output (torch, float64) within the float32 bound derived for the graph.

The model is a torch stack of nn.Linear layers with ReLU between them; PEFT adapts every layer
(LoRA, DoRA, VeRA, LoRA with bias="lora_only"; non-trivial weights), saves the adapter with `save_pretrained`; the base
weights are saved with `save_stack`. Nothing of refpeft's math is involved in the expected output.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_export_cases import StackCase, build_stack

torch = pytest.importorskip("torch", reason="torch is in the conformance extra")
peft = pytest.importorskip("peft", reason="peft is in the conformance extra")

import onnx  # noqa: E402

from refpeft.cli import main  # noqa: E402
from refpeft.tolerance import compare  # noqa: E402

from refpeft_onnx.adapter_files import read_onnx_adapter  # noqa: E402
from refpeft_onnx.exporter import load_inputs  # noqa: E402
from refpeft_onnx.stack import save_stack  # noqa: E402
from refpeft_onnx.verify import graph_bound, session  # noqa: E402


class Stack(torch.nn.Module):
    def __init__(self, stack):
        super().__init__()
        self.layers = torch.nn.ModuleList()
        for layer in stack.layers:
            linear = torch.nn.Linear(layer.k, layer.d, bias=layer.bias is not None).double()
            with torch.no_grad():
                linear.weight.copy_(torch.tensor(layer.weight))
                if layer.bias is not None:
                    linear.bias.copy_(torch.tensor(layer.bias))
            self.layers.append(linear)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def _peft_model(stack, method: str):
    names = [layer.name for layer in stack.layers]
    torch.manual_seed(0)
    if method == "vera":
        config = peft.VeraConfig(r=4, target_modules=names, save_projection=True)
    else:
        config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=names, init_lora_weights=False,
                                 use_dora=method == "dora", bias="lora_only" if method == "lora-trained-bias" else "none")
    model = peft.get_peft_model(Stack(stack), config)
    with torch.no_grad():   # make every trainable tensor non-trivial
        for name, p in model.named_parameters():
            if p.requires_grad and any(key in name for key in ("vera_lambda", "lora_magnitude", "base_layer.bias")):
                p.mul_(1.0 + 0.3 * torch.rand_like(p)).add_(0.1 * torch.randn_like(p))
    return model.eval()


STACK = StackCase((12, 10, 6), 1, "lora", True, "relu", 31)


def export_and_run(tmp_path, stack, model, form: str):
    """`model`'s adapter saved by PEFT and `stack` by save_stack, exported by `refpeft export --{form}` to
    tmp_path/m.onnx, run by ONNX Runtime (the .onnx_adapter's tensors fed, unmerged) on a fixed float32 x.

    Returns (x, ONNX Runtime's output, PEFT's output in float64, the loaded base, the loaded adapter)."""
    model.save_pretrained(tmp_path / "adapter")
    save_stack(tmp_path / "base.safetensors", stack)
    assert main(["export", str(tmp_path / "adapter"), "--base", str(tmp_path / "base.safetensors"),
                 "-o", str(tmp_path / "m.onnx"), f"--{form}"]) == 0
    x = np.random.default_rng(2).standard_normal((2, 3, 12)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.tensor(x, dtype=torch.float64)).numpy()
    feeds = {"x": x}
    if form == "unmerged":
        feeds.update(read_onnx_adapter(tmp_path / "m.onnx_adapter"))
    y = session(onnx.load(tmp_path / "m.onnx")).run(None, feeds)[0]
    base, adapter = load_inputs(tmp_path / "base.safetensors", tmp_path / "adapter")
    return x, y, expected, base, adapter


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "lora-trained-bias"])
@pytest.mark.parametrize("form", ["merged", "unmerged"])
def test_exported_peft_adapter_matches_peft(tmp_path, method, form) -> None:
    stack = build_stack(STACK)
    x, y, expected, base, adapter = export_and_run(tmp_path, stack, _peft_model(stack, method), form)
    assert bool(adapter.base_biases) == (method == "lora-trained-bias")
    result = compare(y, expected, graph_bound(base, adapter, x, form=form, dtype="float32"))
    assert result.passed, f"{method} {form}: {result.ratio:.3g} of the bound"
