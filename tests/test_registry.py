"""refpeft.registry as a specification: a mixed batch equals each row run alone with its adapter."""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.backend import to_numpy
from refpeft.errors import ConfigError, ShapeError
from refpeft.registry import BASE, LAYER, AdapterRegistry
from tests.support import BACKEND_IDS, BACKENDS, assert_close

D, K, R = 6, 5, 2


def layer_modules(backend=np.asarray, *, seed: int = 0) -> dict[str, ModuleAdapter]:
    rng = np.random.default_rng(seed)
    normal = lambda *shape: backend(rng.standard_normal(shape))  # noqa: E731
    return {
        "math": ModuleAdapter("lora", {"A": normal(R, K), "B": normal(D, R)}, alpha=4.0),
        "code": ModuleAdapter("lora", {"A": normal(3, K), "B": normal(D, 3)}, alpha=3.0, rslora=True),
        "dora": ModuleAdapter("dora", {"A": normal(R, K), "B": normal(D, R), "magnitude": backend(rng.uniform(1, 2, D))}, alpha=2.0),
    }


def vera_adapter(backend=np.asarray) -> Adapter:
    rng = np.random.default_rng(5)
    module = ModuleAdapter("vera", {"lambda_d": backend(rng.standard_normal(4)), "lambda_b": backend(rng.standard_normal(D))})
    return Adapter(modules={LAYER: module}, vera_A=backend(rng.standard_normal((4, K + 3))),
                   vera_B=backend(rng.standard_normal((D + 2, 4))))


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_mixed_batch_equals_each_row_alone(backend):
    rng = np.random.default_rng(1)
    registry = AdapterRegistry.for_layer(layer_modules(backend)).add("vera", vera_adapter(backend))
    x, W0, bias = backend(rng.standard_normal((7, 3, K))), backend(rng.standard_normal((D, K))), backend(rng.standard_normal(D))
    names = ["math", BASE, "code", "math", "dora", "vera", "code"]
    y = registry.forward(x, W0, bias=bias, adapter_names=names)
    x_np = to_numpy(x)
    for row, name in enumerate(names):
        alone = registry.activate(name).forward(backend(x_np[row:row + 1]), W0, bias=bias)
        assert_close(backend(to_numpy(y)[row:row + 1]), alone, rtol=1e-14)
    assert_close(y, to_numpy(y), rtol=0, like=x)   # the input's namespace and dtype


def test_active_adapter_switching():
    rng = np.random.default_rng(2)
    modules = layer_modules()
    registry = AdapterRegistry.for_layer(modules)
    x, W0 = rng.standard_normal((4, K)), rng.standard_normal((D, K))
    assert registry.active == BASE
    np.testing.assert_array_equal(registry.forward(x, W0), x @ W0.T)
    math = modules["math"]
    on = registry.activate("math")
    np.testing.assert_allclose(on.forward(x, W0), x @ W0.T + math.scaling * (x @ math.A.T) @ math.B.T, rtol=1e-13)
    assert registry.active == BASE        # switching returns a new registry
    assert on.remove("math").active == BASE and on.remove("code").active == "math"


def test_adapters_over_a_model_by_path():
    rng = np.random.default_rng(3)
    q = ModuleAdapter("lora", {"A": rng.standard_normal((R, K)), "B": rng.standard_normal((D, R))})
    trained_bias = rng.standard_normal(D)
    registry = AdapterRegistry().add("only_q", Adapter(modules={"q": q}, base_biases={"q": trained_bias}))
    x, W0, bias = rng.standard_normal((2, K)), rng.standard_normal((D, K)), rng.standard_normal(D)
    mixed = registry.forward(x, W0, path="v", bias=bias, adapter_names=["only_q", BASE])
    np.testing.assert_allclose(mixed, x @ W0.T + bias, rtol=1e-14)   # the adapter does not touch layer v
    on_q = registry.activate("only_q").forward(x, W0, path="q", bias=bias)
    np.testing.assert_allclose(on_q, x @ W0.T + trained_bias + q.scaling * (x @ q.A.T) @ q.B.T, rtol=1e-13)


def test_mixed_batch_against_peft():
    torch = pytest.importorskip("torch", reason="the PEFT comparison needs torch (conformance extra)")
    peft = pytest.importorskip("peft", reason="the PEFT comparison needs peft (conformance extra)")
    modules = {n: m for n, m in layer_modules().items() if n != "dora"}   # PEFT refuses DoRA here

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(K, D, dtype=torch.float64)

        def forward(self, x):
            return self.lin(x)

    model = None
    for name, m in modules.items():
        config = peft.LoraConfig(r=m.r, lora_alpha=m.alpha, use_rslora=m.rslora, target_modules=["lin"])
        model = peft.get_peft_model(Net(), config, adapter_name=name) if model is None else model
        if name not in model.peft_config:
            model.add_adapter(name, config)
        model.base_model.model.lin.lora_A[name].weight.data = torch.from_numpy(m.A.copy())
        model.base_model.model.lin.lora_B[name].weight.data = torch.from_numpy(m.B.copy())
    model.eval()
    x = np.random.default_rng(4).standard_normal((5, 2, K))
    names = ["code", BASE, "math", "code", BASE]
    with torch.no_grad():
        expected = model(torch.from_numpy(x), adapter_names=names).numpy()
    layer = model.base_model.model.lin
    W0, bias = layer.base_layer.weight.detach().numpy(), layer.base_layer.bias.detach().numpy()
    y = AdapterRegistry.for_layer(modules).forward(x, W0, bias=bias, adapter_names=names)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-13 * np.abs(expected).max())


def test_bad_requests_are_refused():
    registry = AdapterRegistry.for_layer(layer_modules())
    x, W0 = np.ones((2, K)), np.ones((D, K))
    with pytest.raises(ConfigError, match="no adapter named 'chat'"):
        registry.activate("chat")
    with pytest.raises(ConfigError, match="no adapter named 'chat'"):
        registry.forward(x, W0, adapter_names=["chat", BASE])
    with pytest.raises(ShapeError, match="one name per entry"):
        registry.forward(x, W0, adapter_names=["math"])
    with pytest.raises(ConfigError, match="reserved"):
        registry.add(BASE, Adapter(modules={}))
    with pytest.raises(ConfigError, match="already registered"):
        registry.add("math", Adapter(modules={}))
    with pytest.raises(ConfigError, match="fan_in_fan_out"):
        registry.activate("math").forward(x, W0.T.copy(), fan_in_fan_out=True)


def test_mixed_batch_backward_matches_finite_differences():
    from tests.support import vjp_check

    rng = np.random.default_rng(6)
    base = layer_modules()
    vera = vera_adapter()
    x, W0, bias = rng.standard_normal((6, 2, K)), rng.standard_normal((D, K)), rng.standard_normal(D)
    names = ["math", "vera", BASE, "dora", "math", "code"]

    def registry_with(A_math, B_math, magnitude, lambda_b):
        modules = dict(base, math=ModuleAdapter("lora", {"A": A_math, "B": B_math}, alpha=4.0),
                       dora=ModuleAdapter("dora", {"A": base["dora"].A, "B": base["dora"].B, "magnitude": magnitude}, alpha=2.0))
        v = ModuleAdapter("vera", {"lambda_d": vera.modules[LAYER].lambda_d, "lambda_b": lambda_b})
        return AdapterRegistry.for_layer(modules).add("vera", Adapter(modules={LAYER: v}, vera_A=vera.vera_A,
                                                                      vera_B=vera.vera_B))

    inputs = dict(x=x, A_math=base["math"].A, B_math=base["math"].B, magnitude=base["dora"].magnitude,
                  lambda_b=vera.modules[LAYER].lambda_b)

    def f(x, A_math, B_math, magnitude, lambda_b):
        return registry_with(A_math, B_math, magnitude, lambda_b).forward(x, W0, bias=bias, adapter_names=names)

    registry = registry_with(*(inputs[n] for n in ("A_math", "B_math", "magnitude", "lambda_b")))
    y, cache = registry.forward_with_cache(x, W0, bias=bias, adapter_names=names)
    dy = rng.standard_normal(y.shape)
    grads = registry.backward(dy, cache)
    assert set(grads.adapters) == {"math", "code", "dora", "vera"}
    vjp_check(f, inputs, {"x": grads.dx, "A_math": grads.adapters["math"].dA, "B_math": grads.adapters["math"].dB,
                          "magnitude": grads.adapters["dora"].dmagnitude,
                          "lambda_b": grads.adapters["vera"].dlambda_b}, dy)
