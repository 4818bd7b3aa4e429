"""PiSSA, OLoRA, LoftQ and the rank-2r conversion against PEFT 0.21.2 (imports torch, peft, bitsandbytes).

PEFT computes PiSSA and OLoRA in float32 and refuses float64 weights. To compare in float64, the
float64 tests run PEFT's own code with `torch.float32` read as float64 inside peft.tuners.lora.layer
(the `float64_peft` fixture): the same statements, promoted. Signs of singular vectors and of QR
columns are free, so products B A and the residual base are compared, and PiSSA's factors up to the
sign of each rank-one term. PEFT's loftq_init hard-codes the device "cuda"; `cpu_loftq` is that
function with the constant "cuda" read as "cpu", so bitsandbytes' CPU quantiser runs, which
refpeft reproduces as rounding="bnb-cpu".
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

import peft.tuners.lora.layer as peft_lora_layer  # noqa: E402
import peft.utils.loftq_utils as peft_loftq  # noqa: E402

from refpeft.adapter import Adapter, ModuleAdapter  # noqa: E402
from refpeft.errors import ConfigError  # noqa: E402
from refpeft.methods.lora import lora_forward  # noqa: E402
from refpeft.methods.lora_init import convert_to_plain_lora, init_from_base, loftq_init  # noqa: E402
from refpeft.peft_format import read_peft_adapter, write_peft_adapter  # noqa: E402
from tests.support import assert_close  # noqa: E402

R, ALPHA = 4, 6.0
SCALING = ALPHA / R


class _Float32IsFloat64:
    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@pytest.fixture
def float64_peft(monkeypatch):
    monkeypatch.setattr(peft_lora_layer, "torch", _Float32IsFloat64())


def cpu_loftq():
    fn = peft_loftq.loftq_init.__wrapped__
    code = fn.__code__.replace(co_consts=tuple("cpu" if c == "cuda" else c for c in fn.__code__.co_consts))
    return torch.no_grad()(types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__))


def network(dtype=torch.float64, *, seed=0, gap=None):
    """Linear(20, 12) -> ReLU -> Linear(12, 7); with `gap`, the first weight's sigma_5 / sigma_4 = gap."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(20, 12), torch.nn.ReLU(), torch.nn.Linear(12, 7)).to(dtype)
    if gap is not None:
        U, _, Vh = torch.linalg.svd(net[0].weight.detach().double(), full_matrices=False)
        S = torch.cat([torch.linspace(3.0, 1.0, R), gap * torch.linspace(1.0, 0.5, 12 - R)]).double()
        with torch.no_grad():
            net[0].weight.copy_((U * S) @ Vh)
    return net


def adapted(net, init, **options):
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0", "2"], init_lora_weights=init, **options)
    return peft.get_peft_model(copy.deepcopy(net), config)


def layer_state(model, name):
    layer = dict(model.named_modules())[f"base_model.model.{name}"]
    return {key: t.detach().numpy().astype(np.float64) for key, t in (
        ("A", layer.lora_A["default"].weight), ("B", layer.lora_B["default"].weight), ("base", layer.base_layer.weight))}


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_initial_factors_and_residual_equal_peft_in_float64(float64_peft, init):
    net = network()
    model = adapted(net, init)
    for name in ("0", "2"):
        W = getattr(net, name).weight.detach().numpy()
        ours, theirs = init_from_base(W, R, init=init, scaling=SCALING), layer_state(model, name)
        assert_close(ours.B @ ours.A, theirs["B"] @ theirs["A"], rtol=1e-10)
        assert_close(ours.base, theirs["base"], rtol=1e-10)
        if init == "pissa":        # each rank-one term up to its sign
            signs = np.sign(np.sum(ours.A * theirs["A"], axis=1))
            assert_close(ours.A * signs[:, None], theirs["A"], rtol=1e-10)
            assert_close(ours.B * signs[None, :], theirs["B"], rtol=1e-10)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_float32_peft_within_float32_rounding(init):
    """Unpatched PEFT (float32 SVD/QR) against refpeft's float64 factorisation of the same float32 W."""
    net = network(torch.float32, gap=0.1)
    ours = init_from_base(net[0].weight.detach().numpy().astype(np.float64), R, init=init, scaling=SCALING)
    theirs = layer_state(adapted(net, init), "0")
    assert_close(theirs["B"] @ theirs["A"], ours.B @ ours.A, rtol=1e-5)
    assert_close(theirs["base"], ours.base, rtol=1e-5)


@pytest.mark.parametrize("niter", [1, 2])
def test_randomised_pissa_agrees_with_peft_within_the_iteration_bound(float64_peft, niter):
    """Different Omegas (NumPy's vs torch's generator): both within (sigma_1 + sigma_5) rho^(2K+1) T of
    exact PiSSA, T = 1e3 a ceiling on tan(theta_0) that a Gaussian 20 x 4 Omega exceeds with
    probability about 1e-3 (sigma_min of its 4 x 4 part below ~1e-3; fixed seeds make the test exact)."""
    gap = 1e-2
    net = network(gap=gap)
    W = net[0].weight.detach().numpy()
    theirs = layer_state(adapted(net, f"pissa_niter_{niter}"), "0")
    ours = init_from_base(W, R, init=f"pissa_niter_{niter}", scaling=SCALING, seed=3)
    exact = init_from_base(W, R, init="pissa", scaling=SCALING)
    bound = (3.0 + gap) * gap ** (2 * niter + 1) * 1e3 + 1e-13
    for result in (ours.B @ ours.A, theirs["B"] @ theirs["A"]):
        assert np.linalg.norm(SCALING * (result - exact.B @ exact.A), 2) <= bound
    assert np.linalg.norm(ours.base - theirs["base"], 2) <= 2 * bound


@pytest.mark.parametrize("num_iter", [1, 2, 4])
def test_loftq_equals_peft_with_bitsandbytes_cpu_quantiser(num_iter):
    torch.manual_seed(num_iter)
    W = torch.randn(64, 128) * 0.05
    qweight, lora_A, lora_B = cpu_loftq()(W, num_bits=4, reduced_rank=8, num_iter=num_iter)
    ours = loftq_init(W.numpy(), 8, num_iter=num_iter, rounding="bnb-cpu")
    # Iteration 1 quantises W itself: bit for bit. Later ones quantise W - L R, whose float32 SVD
    # rounds differently in LAPACK and NumPy: the absmax of a block moves by an ulp, no code flips.
    assert_close(ours.base, qweight.numpy(), rtol=0 if num_iter == 1 else 2e-6)
    assert_close(ours.B @ ours.A, (lora_B @ lora_A).numpy(), rtol=5e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_equals_peft_save_pretrained(float64_peft, tmp_path, init):
    net = network()
    model = adapted(net, init)
    model.save_pretrained(tmp_path / "initial")
    initial = {n: layer_state(model, n) for n in ("0", "2")}
    torch.manual_seed(5)
    with torch.no_grad():                                           # "training"
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    trained = {n: layer_state(model, n) for n in ("0", "2")}
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))

    def as_adapter(states):
        return Adapter({n: ModuleAdapter("lora", {"A": s["A"], "B": s["B"]}, alpha=ALPHA) for n, s in states.items()})

    ours = convert_to_plain_lora(as_adapter(trained), as_adapter(initial))
    theirs = read_peft_adapter(tmp_path / "plain")
    x = torch.randn(5, 20, dtype=torch.float64)
    expected = model(x).detach().numpy()                            # residual base + trained adapter
    for name in ("0", "2"):
        assert theirs.modules[name].r == 2 * R and theirs.modules[name].alpha == ours.modules[name].alpha
        assert_close(ours.modules[name].A, theirs.modules[name].A, rtol=1e-15)
        assert_close(ours.modules[name].B, theirs.modules[name].B, rtol=1e-15)
    # The converted adapter on the ORIGINAL base reproduces the fine-tuned model.
    h = x.numpy()
    for name, act in (("0", lambda v: np.maximum(v, 0.0)), ("2", lambda v: v)):
        m, layer = ours.modules[name], getattr(net, name)
        h = act(lora_forward(h, layer.weight.detach().numpy(), m.A, m.B, scaling=m.scaling,
                             bias=layer.bias.detach().numpy())[0])
    assert_close(h, expected, rtol=1e-12)


def test_pissa_record_round_trips_through_peft(float64_peft, tmp_path):
    """refpeft writes init_lora_weights="pissa"; PEFT, loading it on the original base, rewrites the
    base as PiSSA does and gives refpeft's outputs. refpeft refuses to read it without conversion."""
    net = network()
    W = net[0].weight.detach().numpy()
    start = init_from_base(W, R, init="pissa", scaling=SCALING)
    A, B = start.A * 1.1, start.B + 0.01
    adapter = Adapter({"0": ModuleAdapter("lora", {"A": A, "B": B}, alpha=ALPHA)},
                      config={"init_lora_weights": "pissa"})
    write_peft_adapter(tmp_path / "a", adapter)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "a")
    x = np.random.default_rng(0).normal(size=(3, 20))
    expected = lora_forward(x, start.base, A, B, scaling=SCALING, bias=net[0].bias.detach().numpy())[0]
    assert_close(loaded.base_model.model[0](torch.from_numpy(x)).detach().numpy(), expected, rtol=1e-10)
    with pytest.raises(ConfigError, match="convert_to_plain_lora"):
        read_peft_adapter(tmp_path / "a")
