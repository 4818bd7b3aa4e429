"""refpeft.fusion against HF PEFT's add_weighted_adapter on torch CPU, float64, same adapters and weights.

Every combination type PEFT 0.21 offers is compared on the combined delta weight of each layer:
element-wise combinations exactly (to matmul rounding), the svd family on reconstructed deltas
(singular vectors carry a sign freedom). DARE's random drop is the one step that cannot agree by
itself: PEFT draws it with torch.bernoulli on torch's global generator. The test hands PEFT the
masks refpeft draws (its documented `dare_generator` stream, U[0,1) < density, PEFT's tensor order),
so everything around the drop is compared exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PEFT comparison needs torch (conformance extra)")
peft = pytest.importorskip("peft", reason="the PEFT comparison needs peft (conformance extra)")

from refpeft.adapter import Adapter, ModuleAdapter  # noqa: E402
from refpeft.fusion import COMBINATIONS, DENSE_MERGES, FACTOR_MERGES, combine_adapters, dare_generator  # noqa: E402

LAYERS = {"lin0": (24, 40), "lin1": (32, 20)}   # path -> (d, k)
RANK = 4
ALPHAS = {"math": 8.0, "code": 16.0, "chat": 4.0}
WEIGHTS = [0.7, -0.35, 1.3]
DENSITY = 0.6
SEED = 11


class TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for path, (d, k) in LAYERS.items():
            setattr(self, path, torch.nn.Linear(k, d, dtype=torch.float64))

    def forward(self, x):  # pragma: no cover - never run, PEFT only needs the modules
        return x


def adapters(*, rslora: bool = False) -> dict[str, Adapter]:
    rng = np.random.default_rng(3)
    return {name: Adapter(modules={path: ModuleAdapter("lora", {"A": rng.standard_normal((RANK, k)) / np.sqrt(k), "B": rng.standard_normal((d, RANK))}, alpha=alpha, rslora=rslora)
                                   for path, (d, k) in LAYERS.items()})
            for name, alpha in ALPHAS.items()}


def peft_model(named: dict[str, Adapter], *, rslora: bool = False):
    model = None
    for name, adapter in named.items():
        config = peft.LoraConfig(r=RANK, lora_alpha=ALPHAS[name], target_modules=list(LAYERS),
                                 init_lora_weights=False, use_rslora=rslora)
        if model is None:
            model = peft.get_peft_model(TwoLayers(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        for path, module in adapter.modules.items():
            layer = getattr(model.base_model.model, path)
            layer.lora_A[name].weight.data = torch.from_numpy(module.A.copy())
            layer.lora_B[name].weight.data = torch.from_numpy(module.B.copy())
    return model


def dare_masks_for_peft(monkeypatch, tensors_per_layer: int) -> None:
    """Make torch.bernoulli return refpeft's DARE masks, layer by layer in PEFT's module order."""
    generators = iter([dare_generator(SEED, path) for path in LAYERS])
    state = {"calls": 0, "rng": None}

    def bernoulli(p, *args, **kwargs):
        if state["calls"] % tensors_per_layer == 0:
            state["rng"] = next(generators)
        state["calls"] += 1
        density = float(p.reshape(-1)[0])
        keep = state["rng"].random(tuple(p.shape)) < density
        return torch.from_numpy(keep.astype(np.float64)).to(p.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)


def peft_deltas(model, name: str) -> dict[str, np.ndarray]:
    return {path: getattr(model.base_model.model, path).get_delta_weight(name).detach().numpy()
            for path in LAYERS}


def refpeft_deltas(adapter: Adapter) -> dict[str, np.ndarray]:
    return {path: m.scaling * (m.B @ m.A) for path, m in adapter.modules.items()}


def options(combination: str) -> dict:
    kwargs = {}
    if combination in ("ties", "dare_linear", "dare_ties", "magnitude_prune") or combination in DENSE_MERGES:
        kwargs["density"] = DENSITY
    if "svd" in combination:
        kwargs["svd_rank"] = RANK + 2
    return kwargs


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_combined_delta_equals_peft(combination, monkeypatch):
    named = adapters()
    model = peft_model(named)
    if combination.startswith("dare"):
        per_layer = 2 * len(named) if combination in FACTOR_MERGES else len(named)   # A's then B's, or deltas
        dare_masks_for_peft(monkeypatch, per_layer)
    kwargs = options(combination)
    model.add_weighted_adapter(list(named), WEIGHTS, "fused", combination_type=combination, **kwargs)
    ours, reports = combine_adapters(list(named.values()), WEIGHTS, combination=combination,
                                     rank=kwargs.get("svd_rank"), density=kwargs.get("density"),
                                     seed=SEED, weight_dtype="float32")
    expected = peft_deltas(model, "fused")
    for path, delta in refpeft_deltas(ours).items():
        scale = np.abs(expected[path]).max()
        tol = 1e-10 if "svd" in combination else 1e-13     # svd: two SVD routes, same truncation
        assert np.abs(delta - expected[path]).max() <= tol * scale, (path, np.abs(delta - expected[path]).max() / scale)
        assert ours.modules[path].r == model.peft_config["fused"].r


def test_peft_rounds_weights_to_float32():
    """A finding: PEFT's weights go through torch.tensor(list) (float32), so 0.7 is used as float32(0.7)."""
    named = adapters()
    model = peft_model(named)
    model.add_weighted_adapter(list(named), WEIGHTS, "fused", combination_type="svd", svd_rank=RANK)
    exact, _ = combine_adapters(list(named.values()), WEIGHTS, combination="svd", rank=RANK)
    rounded, _ = combine_adapters(list(named.values()), WEIGHTS, combination="svd", rank=RANK, weight_dtype="float32")
    expected = peft_deltas(model, "fused")["lin0"]
    scale = np.abs(expected).max()
    off_exact = np.abs(refpeft_deltas(exact)["lin0"] - expected).max() / scale
    off_rounded = np.abs(refpeft_deltas(rounded)["lin0"] - expected).max() / scale
    assert off_rounded < 1e-10 < 1e-9 < off_exact < 1e-6


def test_peft_rslora_fusion_is_scaled_by_sqrt_rank():
    """A finding (PEFT issues 3449/3761): the fused adapter keeps use_rslora with r = alpha, scaling sqrt(r)."""
    named = adapters(rslora=True)
    model = peft_model(named, rslora=True)
    model.add_weighted_adapter(list(named), WEIGHTS, "fused", combination_type="cat")
    ours, _ = combine_adapters(list(named.values()), WEIGHTS, combination="cat")
    fused_rank = RANK * len(named)
    for path, delta in refpeft_deltas(ours).items():
        np.testing.assert_allclose(peft_deltas(model, "fused")[path], np.sqrt(fused_rank) * delta, rtol=1e-12, atol=1e-13)


def test_peft_loads_the_fused_adapter_refpeft_writes(tmp_path):
    from refpeft.peft_format import write_peft_adapter

    named = adapters()
    fused, _ = combine_adapters(list(named.values()), WEIGHTS, combination="svd", rank=RANK + 1)
    write_peft_adapter(tmp_path / "fused", fused)
    model = peft.PeftModel.from_pretrained(TwoLayers(), str(tmp_path / "fused"), adapter_name="fused")
    for path, delta in refpeft_deltas(fused).items():
        np.testing.assert_allclose(peft_deltas(model, "fused")[path], delta, rtol=0, atol=1e-14 * np.abs(delta).max())
