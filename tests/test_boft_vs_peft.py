"""BOFT against HF PEFT on torch CPU in float64: outputs, every trainable tensor's gradient, merges, files both ways.

PEFT runs butterfly factors (boft_n_butterfly_factor > 1) only with its CUDA extension fbd_cuda, a block-diagonal
kernel; without it (any CPU install) it falls back to one factor. `fake_fbd` stands in for that kernel with torch's
block_diag on CPU, so PEFT's own permutation and butterfly code runs with N > 1; test_the_fake_kernel_is_block_diag
checks the stand-in against torch.block_diag and autograd.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.methods.boft import boft_backward, boft_forward, boft_merge, boft_permutation, boft_unmerge
from refpeft.peft_format import read_peft_adapter, write_peft_adapter
from support import assert_close

torch = pytest.importorskip("torch", reason="PEFT on torch is the peer")
peft = pytest.importorskip("peft")
boft_layer = pytest.importorskip("peft.tuners.boft.layer")

from tests.peft_peers import TwoLinears  # noqa: E402

PATHS = ("q", "v")


class FakeFbd:
    """fbd_cuda's forward and backward (peft/tuners/boft/fbd/fbd_cuda_kernel.cu) on CPU: (z, D, H, H) blocks
    to z block-diagonal (D H, D H) matrices, and the diagonal blocks of the gradient back."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*torch.unbind(b)) for b in blocks])]

    @staticmethod
    def backward(grad_output, blocks):
        z, D, H, _ = blocks.shape
        g = grad_output.reshape(z, D, H, D, H)
        return [torch.stack([g[:, i, :, i, :] for i in range(D)], dim=1)]


@contextmanager
def fake_fbd():
    saved = boft_layer._FBD_CUDA
    boft_layer._FBD_CUDA = FakeFbd
    try:
        yield
    finally:
        boft_layer._FBD_CUDA = saved


@dataclass(frozen=True)
class PeerCase:
    N: int
    H: int
    D1: int
    D2: int
    d: int
    batch: tuple[int, ...]
    bias: str              # PEFT's bias option: "none" or "boft_only" (the adapted layers' biases train)
    seed: int


@st.composite
def peer_cases(draw) -> PeerCase:
    N = draw(st.integers(1, 3))
    unit = 2 ** (N - 1)
    return PeerCase(N=N, H=draw(st.sampled_from([2, 4]) if N > 1 else st.integers(1, 4)),
                    D1=unit * draw(st.integers(1, 2)), D2=unit * draw(st.integers(1, 2)), d=draw(st.integers(1, 5)),
                    batch=tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))),
                    bias=draw(st.sampled_from(["none", "boft_only"])), seed=draw(st.integers(0, 2**31 - 1)))


def peft_model(k: int, k2: int, d: int, *, seed: int, **options):
    torch.manual_seed(seed)
    config = peft.BOFTConfig(target_modules=list(PATHS), init_weights=False, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # PEFT's notice when fbd_cuda does not build
        model = peft.get_peft_model(TwoLinears(k, k2, d).double(), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "boft_R" in name:
                p.copy_(0.3 * torch.randn_like(p))             # random, non-initial rotations
    return model


def layer(model, path):
    return getattr(model.base_model.model, path)


def numpy_of(t) -> np.ndarray:
    return t.detach().numpy().copy()


@settings(max_examples=25, deadline=None)
@given(peer_cases())
def test_outputs_gradients_and_merges_equal_peft(case):
    with fake_fbd():            # PEFT calls the kernel in every forward and merge
        _check_against_peft(case)


def _check_against_peft(case: PeerCase) -> None:
    model = peft_model(case.D1 * case.H, case.D2 * case.H, case.d, seed=case.seed, boft_block_size=case.H,
                       boft_n_butterfly_factor=case.N, bias=case.bias)
    tensors = {p: {n: numpy_of(getattr(layer(model, p), n)["default"]) for n in ("boft_R", "boft_s")} for p in PATHS}
    assert all(t["boft_R"].shape[0] == case.N for t in tensors.values())
    x = torch.randn(*case.batch, case.D1 * case.H, dtype=torch.float64, requires_grad=True)
    y = model(x)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()

    h, caches = numpy_of(x), {}
    trains_bias = case.bias == "boft_only"
    for p in PATHS:
        base = layer(model, p).base_layer
        h, caches[p] = boft_forward(h, numpy_of(base.weight), **tensors[p], bias=numpy_of(base.bias),
                                    bias_trainable=trains_bias)
    assert_close(h, numpy_of(y), rtol=1e-12)
    g = dy.numpy()
    for p in reversed(PATHS):
        grads, peer = boft_backward(g, caches[p]), layer(model, p)
        assert_close(grads.dboft_R, peer.boft_R["default"].grad.numpy(), rtol=1e-12)
        assert_close(grads.dboft_s, peer.boft_s["default"].grad.numpy(), rtol=1e-12)
        if trains_bias:
            assert_close(grads.dbias, peer.base_layer.bias.grad.numpy(), rtol=1e-12)
        g = grads.dx
    assert_close(g, x.grad.numpy(), rtol=1e-12)

    W0 = {p: numpy_of(layer(model, p).base_layer.weight) for p in PATHS}
    model.merge_adapter()
    merged = {p: numpy_of(layer(model, p).base_layer.weight) for p in PATHS}
    model.unmerge_adapter()
    for p in PATHS:
        assert_close(boft_merge(W0[p], **tensors[p]), merged[p], rtol=1e-12)
        assert_close(boft_unmerge(merged[p], **tensors[p]), numpy_of(layer(model, p).base_layer.weight), rtol=1e-12)


@pytest.mark.parametrize("k,D,H,N", [(16, 4, 4, 2), (32, 8, 4, 3), (16, 8, 2, 4), (12, 3, 4, 1)])
def test_permutations_are_peft_s(k, D, H, N):
    with fake_fbd():
        config = peft.BOFTConfig(target_modules=["q"], boft_block_size=H, boft_n_butterfly_factor=N)
        peer = peft.get_peft_model(TwoLinears(k, 4, 3).double(), config)
    P = layer(peer, "q").boft_P.numpy()
    for j in range(N):
        assert (P[j] == np.eye(k)[boft_permutation(k, D, H, j, N)]).all()       # P_j[c, perm_j[c]] = 1


def test_the_fake_kernel_is_block_diag():
    blocks = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    with fake_fbd():
        out = boft_layer.FastBlockDiag.apply(blocks)
        weights = torch.randn_like(out)
        (out * weights).sum().backward()
    expected = torch.stack([torch.block_diag(*torch.unbind(b)) for b in blocks.detach()])
    assert torch.equal(out.detach(), expected)
    reference = blocks.detach().clone().requires_grad_()
    (torch.stack([torch.block_diag(*torch.unbind(b)) for b in reference]) * weights).sum().backward()
    assert torch.equal(blocks.grad, reference.grad)


def test_peft_without_its_cuda_extension_falls_back_to_one_factor(tmp_path, monkeypatch):
    """A finding, written down in docs/boft.md: on CPU PEFT builds a BOFT layer with N = 1 whatever the config."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))     # PEFT tries to build fbd_cuda there
    model = peft_model(16, 8, 3, seed=0, boft_block_size=2, boft_n_butterfly_factor=3)
    assert tuple(layer(model, "q").boft_R["default"].shape) == (1, 8, 2, 2)
    assert model.peft_config["default"].boft_n_butterfly_factor == 3


def _refpeft_outputs(adapter: Adapter, model, x: np.ndarray, *, base_biases: dict | None = None) -> np.ndarray:
    """The two layers in refpeft: the peer's frozen weights, its biases or those given."""
    h = x
    for p in PATHS:
        base, m = layer(model, p).base_layer, adapter.modules[p]
        bias = (base_biases or {}).get(p, numpy_of(base.bias))
        h, _ = m.spec.forward(h, numpy_of(base.weight), m, bias=bias)
    return h


@pytest.mark.parametrize("N,bias", [(1, "none"), (2, "none"), (2, "boft_only")])
def test_peft_saved_folders_read_with_equal_outputs(N, bias, tmp_path):
    trained = bias == "boft_only"
    with fake_fbd():
        model = peft_model(16, 8, 6, seed=3, boft_block_size=2, boft_n_butterfly_factor=N, bias=bias)
        with torch.no_grad():
            for p in PATHS:
                layer(model, p).base_layer.bias.add_(float(trained))   # as if trained: only the file holds it
        model.save_pretrained(tmp_path)
        adapter = read_peft_adapter(tmp_path)
        assert adapter.method == "boft" and adapter.modules["q"].boft_R.shape == (N, 8, 2, 2)
        assert set(adapter.base_biases) == (set(PATHS) if trained else set())
        x = torch.randn(4, 16, dtype=torch.float64)
        with torch.no_grad():
            expected = model(x).numpy()
            for p in PATHS:
                layer(model, p).base_layer.bias.sub_(float(trained))   # back to the base model's biases
    got = _refpeft_outputs(adapter, model, x.numpy(), base_biases=adapter.base_biases)
    assert_close(got, expected, rtol=1e-12)


@pytest.mark.parametrize("N,trained_bias", [(1, False), (2, False), (2, True)])
def test_refpeft_written_folders_load_in_peft_with_equal_outputs(N, trained_bias, tmp_path):
    rng = np.random.default_rng(4)
    adapter = Adapter(modules={
        "q": ModuleAdapter("boft", {"boft_R": 0.3 * rng.standard_normal((N, 4, 4, 4)),
                                    "boft_s": 1 + 0.1 * rng.standard_normal((8, 1))}),
        "v": ModuleAdapter("boft", {"boft_R": 0.3 * rng.standard_normal((N, 2, 4, 4)),
                                    "boft_s": 1 + 0.1 * rng.standard_normal((6, 1))})},
        base_biases={"q": rng.standard_normal(8), "v": rng.standard_normal(6)} if trained_bias else {})
    write_peft_adapter(tmp_path, adapter)
    torch.manual_seed(1)
    with fake_fbd():
        loaded = peft.PeftModel.from_pretrained(TwoLinears(16, 8, 6).double(), tmp_path)
        for p in PATHS:
            for name in ("boft_R", "boft_s"):
                assert_close(numpy_of(getattr(layer(loaded, p), name)["default"]), getattr(adapter.modules[p], name),
                             rtol=0.0)
            if trained_bias:
                assert_close(numpy_of(layer(loaded, p).base_layer.bias), adapter.base_biases[p], rtol=0.0)
        x = torch.randn(4, 16, dtype=torch.float64)
        with torch.no_grad():
            expected = loaded(x).numpy()
    assert_close(_refpeft_outputs(adapter, loaded, x.numpy(), base_biases=adapter.base_biases), expected, rtol=1e-12)
