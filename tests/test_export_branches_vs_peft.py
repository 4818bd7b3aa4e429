"""IA3, OFT and LoKr exported unmerged (and merged) from PEFT-saved adapters give PEFT's own output.

The model is a torch stack of nn.Linear layers with ReLU between them (test_export_vs_peft.Stack);
PEFT adapts every layer, every trainable tensor is moved off its initial value, and the adapter is
saved with `save_pretrained`. `refpeft export` writes the graph (and, unmerged, its .onnx_adapter
file); ONNX Runtime runs it with the file's tensors fed, and the output must equal PEFT's forward in
torch float64 within the float32 bound derived for the graph. Nothing of refpeft's math is involved
in the expected output. IA3 adapts one layer on each side (output scaling and, as a feed-forward
module, input scaling).
"""

from __future__ import annotations

import numpy as np
import pytest

from test_export_cases import build_stack

torch = pytest.importorskip("torch", reason="torch is in the conformance extra")
peft = pytest.importorskip("peft", reason="peft is in the conformance extra")

import onnx  # noqa: E402

from test_export_vs_peft import STACK, Stack, export_and_run  # noqa: E402

from refpeft.tolerance import compare  # noqa: E402

from refpeft_onnx.verify import graph_bound, session  # noqa: E402

CONFIGS = {
    "ia3": lambda names: peft.IA3Config(target_modules=names, feedforward_modules=names[1:], init_ia3_weights=True),
    "oft": lambda names: peft.OFTConfig(r=0, oft_block_size=2, target_modules=names, init_weights=True),
    "lokr": lambda names: peft.LoKrConfig(r=2, alpha=3, target_modules=names, init_weights=True),
}


def _peft_model(stack, method: str):
    torch.manual_seed(0)
    model = peft.get_peft_model(Stack(stack), CONFIGS[method]([layer.name for layer in stack.layers]))
    with torch.no_grad():   # PEFT's identity init, then every trainable tensor moved off it
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("form", ["unmerged", "merged"])
def test_exported_peft_adapter_matches_peft(tmp_path, method, form) -> None:
    stack = build_stack(STACK)
    model = _peft_model(stack, method)
    x, y, expected, base, adapter = export_and_run(tmp_path, stack, model, form)
    assert adapter.methods == {method}
    if method == "ia3":    # one layer of each side
        assert [m.l.shape for m in adapter.modules.values()] == [(10, 1), (1, 10)]
    bound = graph_bound(base, adapter, x, form=form, dtype="float32")
    result = compare(y, expected, bound)
    assert result.passed, f"{method} {form}: {result.ratio:.3g} of the bound"
    if form == "unmerged":   # and with no adapter fed, PEFT's base model (its adapter disabled)
        with torch.no_grad(), model.disable_adapter():
            plain = model(torch.tensor(x, dtype=torch.float64)).numpy()
        assert np.max(np.abs(plain - expected)) > np.max(bound)            # the adapter changes the output
        result = compare(session(onnx.load(tmp_path / "m.onnx")).run(None, {"x": x})[0], plain,
                         graph_bound(base, None, x, form=form, dtype="float32"))
        assert result.passed, f"{method} base: {result.ratio:.3g} of the bound"
