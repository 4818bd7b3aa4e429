"""PiSSA, OLoRA, LoftQ and the rank-2r conversion (refpeft.methods.lora_init): properties, no peer."""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.errors import ConfigError, RankError, ShapeError
from refpeft.init import normal
from refpeft.methods.lora import lora_forward, lora_scaling
from refpeft.methods.lora_init import (
    convert_to_plain_lora,
    init_from_base,
    initial_error,
    loftq_init,
    olora_init,
    pissa_init,
    to_plain_lora,
)
from refpeft.quant.state import dequantize_4bit, quantize_4bit
from tests.support import BACKEND_IDS, BACKENDS, assert_close

EPS64 = np.finfo(np.float64).eps


def weight(d: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(d, k))


def gapped(d: int, k: int, r: int, *, rho: float, seed: int) -> np.ndarray:
    """W = U diag(S) V^T with sigma_{r+1} / sigma_r = rho and random singular vectors."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.normal(size=(d, min(d, k))))
    V, _ = np.linalg.qr(rng.normal(size=(k, min(d, k))))
    S = np.concatenate([np.linspace(3.0, 1.0, r), rho * np.linspace(1.0, 0.5, min(d, k) - r)])
    return (U * S) @ V.T


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_base_plus_adapter_is_the_original_weight(backend, init):
    W = backend(weight(9, 14, 0))
    result = init_from_base(W, 3, init=init, scaling=2.5, seed=4)
    assert_close(result.base + 2.5 * (result.B @ result.A), W, rtol=20 * EPS64, like=W)
    assert tuple(result.A.shape) == (3, 14) and tuple(result.B.shape) == (9, 3)


@pytest.mark.parametrize("shape", [(9, 14), (14, 9)])
def test_pissa_adapter_is_the_best_rank_r_approximation(shape):
    W, r, s = weight(*shape, 1), 4, 0.5
    result = pissa_init(W, r, scaling=s)
    S = np.linalg.svd(W, compute_uv=False)
    # Eckart-Young: the residual's Frobenius norm is that of the discarded singular values.
    assert np.linalg.norm(result.base) == pytest.approx(np.linalg.norm(S[r:]), rel=1e-12)
    # A A^T = B^T B = diag(S_r / s): the principal directions, split evenly between the factors.
    assert_close(result.A @ result.A.T, np.diag(S[:r] / s), rtol=1e-12, atol=1e-14)
    assert_close(result.B.T @ result.B, np.diag(S[:r] / s), rtol=1e-12, atol=1e-14)


def test_fan_in_fan_out_factorises_the_transposed_weight():
    W = weight(9, 14, 2)
    plain, stored = olora_init(W, 3, scaling=2.0), olora_init(W.T, 3, scaling=2.0, fan_in_fan_out=True)
    assert_close(stored.B @ stored.A, plain.B @ plain.A, rtol=1e-13)
    assert_close(stored.base, plain.base.T, rtol=1e-13)


def test_olora_adapter_projects_on_the_first_r_columns():
    W, r, s = weight(10, 12, 3), 4, 3.0
    result = olora_init(W, r, scaling=s)
    first = W[:, :r]
    projection = first @ np.linalg.lstsq(first, W, rcond=None)[0]      # P W, P onto span(W[:, :r])
    assert_close(result.B @ result.A, projection, rtol=1e-12)
    assert_close(result.B.T @ result.B, np.eye(r), rtol=0, atol=1e-14)
    assert_close(result.base, W - s * projection, rtol=1e-12)          # not divided by s, as PEFT


@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])
@pytest.mark.parametrize("niter", [0, 1, 3])
def test_randomised_pissa_within_its_subspace_iteration_bound(shape, niter):
    """||Q Q^T W - U_r S_r V_r^T||_2 <= (sigma_1 + sigma_{r+1}) rho^(2K+1) tan(theta_0) + rounding."""
    r, rho, seed = 4, 0.2, 7
    W = gapped(*shape, r, rho=rho, seed=11)
    exact, fast = pissa_init(W, r, scaling=1.0), pissa_init(W, r, scaling=1.0, niter=niter, seed=seed)
    M = W.T if shape[0] < shape[1] else W                               # tall orientation, as torch
    _, S, Vh = np.linalg.svd(M)
    omega, V = normal((M.shape[1], r), 1.0, seed=seed), Vh.T            # the seeded Omega it starts from
    tan0 = np.linalg.norm(V[:, r:].T @ omega @ np.linalg.inv(V[:, :r].T @ omega), 2)
    bound = (S[0] + S[r]) * (S[r] / S[r - 1]) ** (2 * niter + 1) * tan0 + 100 * EPS64 * S[0]
    error = np.linalg.norm(fast.B @ fast.A - exact.B @ exact.A, 2)
    assert error <= bound
    assert error > 1e-3 * bound or niter == 3          # the bound is not vacuous at small K


def test_randomised_pissa_is_fixed_by_its_seed():
    W = weight(12, 16, 5)
    a, b = pissa_init(W, 3, scaling=1.0, niter=1, seed=1), pissa_init(W, 3, scaling=1.0, niter=1, seed=1)
    other = pissa_init(W, 3, scaling=1.0, niter=1, seed=2)
    assert np.array_equal(a.B @ a.A, b.B @ b.A)
    assert not np.allclose(a.B @ a.A, other.B @ other.A, rtol=1e-3)


def quantisation_error(W: np.ndarray) -> float:
    state = quantize_4bit(W.astype(np.float32), quant_type="nf4", rounding="bnb-cpu")
    return float(np.linalg.norm(W - dequantize_4bit(state)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loftq_absorbs_quantisation_error_better_with_iterations(seed):
    W = np.random.default_rng(seed).normal(size=(64, 128)) * 0.05
    errors = [initial_error(W, loftq_init(W, 8, num_iter=t, rounding="bnb-cpu"), scaling=1.0) for t in (1, 2, 3, 5)]
    # One SVD of W - deq(Q(W)) already beats the plain NF4 base; each further alternation helps.
    assert errors[0] < 0.95 * quantisation_error(W)
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors


def test_loftq_base_is_a_dequantised_nf4_weight():
    W = weight(32, 64, 4).astype(np.float32)
    result = loftq_init(W, 4, num_iter=3, rounding="bnb-cpu")
    assert result.base.dtype == np.float32
    assert np.array_equal(result.base, dequantize_4bit(result.quant_state))
    # PEFT's factors ignore s: with s != 1 the initial model is further from W than with s = 1.
    assert initial_error(W, result, scaling=2.0) > initial_error(W, result, scaling=1.0)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_reproduces_the_trained_model_on_the_original_base(init, rslora):
    W, r, alpha = weight(8, 11, 6), 3, 5.0
    s = lora_scaling(alpha, r, rslora=rslora)
    start = init_from_base(W, r, init=init, scaling=s)
    rng = np.random.default_rng(9)
    A, B = start.A + 0.1 * rng.normal(size=start.A.shape), start.B + 0.1 * rng.normal(size=start.B.shape)
    A2, B2, alpha2 = to_plain_lora(A, B, start.A, start.B, alpha=alpha, rslora=rslora)
    assert A2.shape == (2 * r, 11) and B2.shape == (8, 2 * r)
    x = rng.normal(size=(4, 11))
    tuned = lora_forward(x, start.base, A, B, scaling=s)[0]
    converted = lora_forward(x, W, A2, B2, scaling=lora_scaling(alpha2, 2 * r, rslora=rslora))[0]
    assert_close(converted, tuned, rtol=1e-13)


def test_adapter_conversion_keeps_paths_and_drops_the_init_record():
    W = weight(6, 7, 8)
    start = pissa_init(W, 2, scaling=1.0)
    initial = Adapter({"q": ModuleAdapter("lora", {"A": start.A, "B": start.B}, alpha=2.0)},
                      config={"init_lora_weights": "pissa"})
    trained = Adapter({"q": initial.modules["q"].replace(A=start.A * 1.5)}, config=initial.config)
    plain = convert_to_plain_lora(trained, initial)
    assert plain.modules["q"].r == 4 and plain.modules["q"].alpha == 4.0
    assert "init_lora_weights" not in plain.config
    assert_close(plain.modules["q"].scaling * (plain.modules["q"].B @ plain.modules["q"].A),
                 0.5 * start.B @ start.A, rtol=1e-13)


def test_bad_inputs_are_refused_by_name():
    W = weight(5, 7, 0)
    with pytest.raises(RankError, match="exceeds min"):
        pissa_init(W, 6, scaling=1.0)
    with pytest.raises(ConfigError, match="pissa_niter_K"):
        init_from_base(W, 2, init="pissa_niter_two", scaling=1.0)
    with pytest.raises(ConfigError, match="unknown base-rewriting init 'corda'"):
        init_from_base(W, 2, init="corda", scaling=1.0)
    with pytest.raises(ConfigError, match="num_iter"):
        loftq_init(W, 2, num_iter=0)
    with pytest.raises(ConfigError, match="float16"):
        olora_init(W.astype(np.float16), 2, scaling=1.0)
    with pytest.raises(ConfigError, match="scaling"):
        olora_init(W, 2, scaling=0.0)
    with pytest.raises(ShapeError, match="differ from the initial"):
        to_plain_lora(np.ones((2, 7)), np.ones((5, 2)), np.ones((3, 7)), np.ones((5, 3)), alpha=1.0)
    dora = Adapter({"q": ModuleAdapter("dora", {"A": np.ones((2, 7)), "B": np.ones((5, 2)),
                                                "magnitude": np.ones(5)})})
    with pytest.raises(ConfigError, match="only LoRA converts"):
        convert_to_plain_lora(dora, dora)

