"""BOFT: gradients (through the butterfly product and the Cayley transform) vs finite differences, orthogonality and
butterfly structure of the rotation, merge properties, PEFT's configuration checks, files through the method table."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.errors import ConfigError, ShapeError
from refpeft.methods import method_spec
from refpeft.methods.boft import (boft_backward, boft_delta_weight, boft_forward, boft_init, boft_layout, boft_merge,
                                  boft_parameter_count, boft_permutation, boft_rotation_matrix, boft_shape,
                                  boft_unmerge)
from refpeft.peft_format import read_peft_adapter, write_peft_adapter
from support import BACKENDS, BACKEND_IDS, assert_close, one_layer_llama, vjp_check

FAST = settings(max_examples=30, deadline=None)


@dataclass(frozen=True)
class BoftCase:
    batch: tuple[int, ...]
    N: int                 # butterfly factors
    D: int                 # blocks, a multiple of 2^(N - 1)
    H: int                 # block size, even when N > 1
    d: int
    bias: bool
    fan_in_fan_out: bool
    seed: int

    @property
    def k(self) -> int:
        return self.D * self.H

    def arrays(self, scale: float = 0.3) -> dict:
        rng = np.random.default_rng(self.seed)
        return {"x": rng.standard_normal((*self.batch, self.k)),
                "W0": rng.standard_normal((self.k, self.d) if self.fan_in_fan_out else (self.d, self.k)),
                "boft_R": scale * rng.standard_normal((self.N, self.D, self.H, self.H)),
                "boft_s": 1.0 + 0.3 * rng.standard_normal((self.d, 1)), "bias": rng.standard_normal(self.d),
                "dy": rng.standard_normal((*self.batch, self.d))}


@st.composite
def boft_cases(draw, *, max_factors: int = 3) -> BoftCase:
    N = draw(st.integers(1, max_factors))
    H = draw(st.sampled_from([2, 4]) if N > 1 else st.integers(1, 5))
    return BoftCase(batch=tuple(draw(st.lists(st.integers(1, 3), max_size=2))), N=N, H=H,
                    D=2 ** (N - 1) * draw(st.integers(1, 2 if N > 1 else 4)), d=draw(st.integers(1, 6)),
                    bias=draw(st.booleans()), fan_in_fan_out=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


@FAST
@given(boft_cases())
def test_boft_gradients_match_finite_differences_through_the_butterfly_and_cayley(case):
    a = case.arrays()
    bias = a["bias"] if case.bias else None

    def f(x, boft_R, boft_s, bias=None):
        return boft_forward(x, a["W0"], boft_R, boft_s, bias=bias, fan_in_fan_out=case.fan_in_fan_out)[0]

    _, cache = boft_forward(a["x"], a["W0"], a["boft_R"], a["boft_s"], bias=bias, fan_in_fan_out=case.fan_in_fan_out,
                            bias_trainable=case.bias)
    g = boft_backward(a["dy"], cache)
    inputs = {"x": a["x"], "boft_R": a["boft_R"], "boft_s": a["boft_s"]}
    wanted = {"x": g.dx, "boft_R": g.dboft_R, "boft_s": g.dboft_s}
    if case.bias:
        inputs["bias"], wanted["bias"] = bias, g.dbias
    vjp_check(f, inputs, wanted, a["dy"], tol=1e-7)


@FAST
@given(boft_cases(max_factors=4), st.floats(0.01, 3.0))
def test_the_butterfly_rotation_is_orthogonal_to_rounding(case, size):
    B = boft_rotation_matrix(case.arrays(scale=size)["boft_R"], case.k)
    assert_close(B.T @ B, np.eye(case.k), rtol=1e-13 * case.N * (1 + size) ** 2)


@FAST
@given(boft_cases(max_factors=4))
def test_the_rotation_mixes_inputs_only_within_butterfly_chunks(case):
    """N factors reach H 2^(N-1) inputs: B is block-diagonal with blocks of that size, and dense in them."""
    B = boft_rotation_matrix(case.arrays()["boft_R"], case.k)
    reach = case.H * 2 ** (case.N - 1)
    chunk = np.arange(case.k) // reach
    assert (B[chunk[:, None] != chunk[None, :]] == 0).all()
    assert case.H == 1 or (B[chunk[:, None] == chunk[None, :]] != 0).all()


@pytest.mark.parametrize("N,D,H", [(2, 4, 2), (3, 4, 4), (4, 8, 2), (1, 3, 5)])
def test_each_factor_pairs_halves_of_blocks_h_2_to_the_j_minus_1_apart(N, D, H):
    k = D * H
    assert (boft_permutation(k, D, H, 0, N) == np.arange(k)).all()            # P_0 = I
    for j in range(1, N):
        perm = boft_permutation(k, D, H, j, N)
        assert sorted(perm) == list(range(k))
        for block in np.argsort(perm).reshape(D, H):     # x P = x[:, perm^-1]: the inputs block i rotates together
            first, second = block[: H // 2], block[H // 2:]
            assert (second - first == H * 2 ** (j - 1)).all() and (np.diff(first) == 1).all()


@FAST
@given(boft_cases())
def test_merged_forward_equals_unmerged(case):
    a = case.arrays()
    bias = a["bias"] if case.bias else None
    options = {"fan_in_fan_out": case.fan_in_fan_out}
    y, _ = boft_forward(a["x"], a["W0"], a["boft_R"], a["boft_s"], bias=bias, **options)
    W = boft_merge(a["W0"], a["boft_R"], a["boft_s"], **options)
    R0, s1 = boft_init(case.k, case.d, block_size=case.H, n_butterfly_factor=case.N)
    y_merged, _ = boft_forward(a["x"], W, R0, s1, bias=bias, **options)
    assert_close(y_merged, y, rtol=1e-12)
    assert_close(boft_delta_weight(a["W0"], a["boft_R"], a["boft_s"], **options), W - a["W0"], rtol=0.0)


@FAST
@given(boft_cases())
def test_unmerge_undoes_merge(case):
    a = case.arrays()
    options = {"fan_in_fan_out": case.fan_in_fan_out}
    W = boft_merge(a["W0"], a["boft_R"], a["boft_s"], **options)
    assert_close(boft_unmerge(W, a["boft_R"], a["boft_s"], **options), a["W0"], rtol=1e-12)
    assert not np.allclose(W, a["W0"])


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_forward_backward_and_merge_run_on_every_backend(backend):
    case = BoftCase(batch=(2,), N=2, D=4, H=2, d=3, bias=True, fan_in_fan_out=False, seed=1)
    a = case.arrays()
    y, cache = boft_forward(a["x"], a["W0"], a["boft_R"], a["boft_s"], bias=a["bias"])
    g = boft_backward(a["dy"], cache)
    args = {n: backend(a[n]) for n in ("x", "W0", "boft_R", "boft_s", "bias", "dy")}
    y_b, cache_b = boft_forward(args["x"], args["W0"], args["boft_R"], args["boft_s"], bias=args["bias"])
    g_b = boft_backward(args["dy"], cache_b)
    assert_close(y_b, y, rtol=1e-14, like=args["x"])
    assert_close(g_b.dboft_R, g.dboft_R, rtol=1e-13, like=args["boft_R"])
    assert_close(g_b.dboft_s, g.dboft_s, rtol=1e-13, like=args["boft_s"])
    assert_close(g_b.dx, g.dx, rtol=1e-13, like=args["x"])
    assert_close(boft_merge(args["W0"], args["boft_R"], args["boft_s"]), boft_merge(a["W0"], a["boft_R"], a["boft_s"]),
                 rtol=1e-14, like=args["W0"])


def test_initial_boft_is_the_identity_and_counts_its_parameters():
    rng = np.random.default_rng(0)
    x, W0 = rng.standard_normal((3, 16)), rng.standard_normal((5, 16))
    boft_R, boft_s = boft_init(16, 5, block_size=2, n_butterfly_factor=3)
    assert boft_R.shape == (3, 8, 2, 2) and boft_s.shape == (5, 1)
    assert boft_parameter_count(16, 5, block_size=2, n_butterfly_factor=3) == boft_R.size + boft_s.size == 101
    assert boft_init(16, 5, block_size=0, block_num=2)[0].shape == (1, 2, 8, 8)
    assert_close(boft_forward(x, W0, boft_R, boft_s)[0], x @ W0.T, rtol=1e-15)


def test_only_the_skew_part_of_boft_r_acts_and_its_symmetric_part_gets_no_gradient():
    case = BoftCase(batch=(4,), N=2, D=2, H=4, d=3, bias=False, fan_in_fan_out=False, seed=2)
    a = case.arrays()
    symmetric = np.random.default_rng(3).standard_normal(a["boft_R"].shape)
    symmetric = symmetric + np.swapaxes(symmetric, -1, -2)
    y, cache = boft_forward(a["x"], a["W0"], a["boft_R"], a["boft_s"])
    assert_close(boft_forward(a["x"], a["W0"], a["boft_R"] + symmetric, a["boft_s"])[0], y, rtol=1e-14)
    dR = boft_backward(a["dy"], cache).dboft_R
    assert_close(dR, -np.swapaxes(dR, -1, -2), rtol=0.0)


@pytest.mark.parametrize("k,options,message", [
    (10, {"block_size": 4}, "boft_block_size = 4 does not divide"),
    (10, {"block_size": 0, "block_num": 4}, "boft_block_num = 4 does not divide"),
    (16, {"block_size": 4, "block_num": 4}, "exactly one of"),
    (16, {"block_size": 0, "block_num": 0}, "exactly one of"),
    (16, {"block_size": 4, "n_butterfly_factor": 0}, "positive integer"),
    (16, {"block_size": 4, "n_butterfly_factor": 4}, "too large"),        # 4 blocks: at most 3 factors
    (16, {"block_size": 0, "block_num": 8, "n_butterfly_factor": 5}, "too large"),
    (12, {"block_size": 4, "n_butterfly_factor": 2}, "too large"),        # 3 blocks: odd
    (12, {"block_size": 3, "n_butterfly_factor": 2}, "must be even"),
    (16, {"block_size": 2.0}, "non-negative integer"),
])
def test_peft_configuration_checks_are_config_errors(k, options, message):
    with pytest.raises(ConfigError, match=message):
        boft_shape(k, **options)
    with pytest.raises(ConfigError, match=message):
        boft_init(k, 3, **options)


def test_bad_tensor_shapes_raise_shape_errors():
    x, W0 = np.ones((2, 12)), np.ones((3, 12))
    with pytest.raises(ShapeError, match="4-D"):
        boft_forward(x, W0, np.zeros((3, 4, 4)), np.ones((3, 1)))
    with pytest.raises(ShapeError, match="does not divide"):
        boft_forward(x, W0, np.zeros((1, 2, 5, 5)), np.ones((3, 1)))
    with pytest.raises(ShapeError, match="cover 8 inputs, the layer has k = 12"):
        boft_forward(x, W0, np.zeros((1, 2, 4, 4)), np.ones((3, 1)))
    with pytest.raises(ShapeError, match="must be even"):
        boft_layout(12, np.zeros((2, 4, 3, 3)))
    with pytest.raises(ShapeError, match="boft_s must have shape"):
        boft_forward(x, W0, np.zeros((1, 3, 4, 4)), np.ones(3))
    with pytest.raises(ConfigError, match="dropout"):
        method_spec("boft").forward(x, W0, ModuleAdapter("boft", {"boft_R": np.zeros((1, 3, 4, 4)),
                                                                  "boft_s": np.ones((3, 1))}), dropout_mask=np.ones(12))


def test_the_table_row_runs_the_method_and_peft_files_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    modules = {"q": ModuleAdapter("boft", {"boft_R": 0.3 * rng.standard_normal((2, 4, 2, 2)),
                                           "boft_s": 1 + 0.1 * rng.standard_normal((6, 1))}),
               "v": ModuleAdapter("boft", {"boft_R": 0.3 * rng.standard_normal((2, 2, 2, 2)),
                                           "boft_s": 1 + 0.1 * rng.standard_normal((3, 1))})}
    spec = method_spec("boft")
    x, W0 = rng.standard_normal((2, 8)), rng.standard_normal((6, 8))
    y, cache = spec.forward(x, W0, modules["q"])
    assert_close(x @ spec.merge(W0, modules["q"]).T, y, rtol=1e-12)
    assert spec.backward(rng.standard_normal(y.shape), cache).dboft_s.shape == (6, 1)
    assert (modules["q"].in_features, modules["q"].out_features) == (8, 6)
    assert spec.parameter_count(8, 6, modules["q"]) == 2 * 4 * 4 + 6
    fresh = spec.init_modules({"q": W0}, ranks={"q": 4}, alphas={"q": 1.0})[0]["q"]
    assert fresh.r == 4 and fresh.boft_R.shape == (1, 2, 4, 4)
    assert_close(spec.merge(W0, fresh), W0, rtol=0.0)                     # PEFT's init: the identity
    write_peft_adapter(tmp_path, Adapter(modules))
    back = read_peft_adapter(tmp_path)
    assert back.method == "boft" and back.config["boft_block_size"] == 2 and back.config["boft_n_butterfly_factor"] == 2
    for path, m in modules.items():
        for name in ("boft_R", "boft_s"):
            assert np.array_equal(getattr(back.modules[path], name), getattr(m, name))


def test_peft_files_need_one_factor_count_and_one_block_size_or_number(tmp_path):
    rng = np.random.default_rng(6)
    def m(shape: tuple[int, ...], d: int) -> ModuleAdapter:
        return ModuleAdapter("boft", {"boft_R": rng.standard_normal(shape), "boft_s": np.ones((d, 1))})

    write_peft_adapter(tmp_path / "by-number", Adapter({"q": m((1, 2, 4, 4), 3), "v": m((1, 2, 3, 3), 3)}))
    config = read_peft_adapter(tmp_path / "by-number").config
    assert (config["boft_block_size"], config["boft_block_num"]) == (0, 2)
    with pytest.raises(ConfigError, match="one boft_n_butterfly_factor"):
        write_peft_adapter(tmp_path / "mixed", Adapter({"q": m((1, 4, 2, 2), 3), "v": m((2, 4, 2, 2), 3)}))
    with pytest.raises(ConfigError, match="one boft_n_butterfly_factor"):
        write_peft_adapter(tmp_path / "mixed", Adapter({"q": m((1, 4, 2, 2), 3), "v": m((1, 2, 3, 3), 3)}))


def test_checkpoint_merging_in_row_blocks_computes_the_forward(tmp_path):
    """Merging a checkpoint streams blocks of output rows: boft_s is sliced with them (the row's per_output)."""
    from refpeft.checkpoint import SafetensorsFile, merge_into_checkpoint
    from refpeft.io import write_safetensors

    rng = np.random.default_rng(7)
    W0, b = rng.standard_normal((7, 8)), rng.standard_normal(7)
    module = ModuleAdapter("boft", {"boft_R": 0.3 * rng.standard_normal((2, 4, 2, 2)),
                                    "boft_s": 1 + 0.3 * rng.standard_normal((7, 1))})
    write_safetensors(tmp_path / "base.safetensors", {"l.weight": W0, "l.bias": b})
    merge_into_checkpoint(Adapter({"l": module}), SafetensorsFile(tmp_path / "base.safetensors"),
                          tmp_path / "out.safetensors", block_elements=16)       # 2 rows a block
    W = SafetensorsFile(tmp_path / "out.safetensors").read("l.weight")
    assert module.r == 2                  # the block size: at least 2 rows a block, so 3 blocks of 7 rows
    x = rng.standard_normal((3, 8))
    assert_close(x @ W.T + b, method_spec("boft").forward(x, W0, module, bias=b)[0], rtol=1e-13)


def test_onnx_export_is_merged_only_and_agrees_with_the_reference():
    pytest.importorskip("onnxruntime")
    from refpeft_onnx.graph import build_model
    from refpeft_onnx.stack import single_layer
    from refpeft_onnx.verify import verify_model

    rng = np.random.default_rng(8)
    stack = single_layer(rng.standard_normal((6, 8)), rng.standard_normal(6))
    adapter = Adapter({"linear": ModuleAdapter("boft", {"boft_R": 0.3 * rng.standard_normal((2, 4, 2, 2)),
                                                        "boft_s": 1 + 0.1 * rng.standard_normal((6, 1))})})
    report = verify_model(build_model(stack, adapter, form="merged"), stack, adapter)
    assert report.passed, report.summary()
    with pytest.raises(ConfigError, match="no unmerged ONNX branch"):
        build_model(stack, adapter, form="unmerged")


def test_whole_model_gradients_through_boft_layers_match_finite_differences():
    from refpeft.model.decoder import Model, backward, forward

    rng = np.random.default_rng(9)
    config, weights = one_layer_llama(rng, vocab_size=19, hidden_size=8, intermediate_size=16)
    paths = {"v_proj": "model.layers.0.self_attn.v_proj", "down_proj": "model.layers.0.mlp.down_proj"}
    tensors = {}
    for short, path in paths.items():
        d, k = weights[path + ".weight"].shape
        tensors[f"{short}_R"] = 0.3 * rng.standard_normal((2, k // 2, 2, 2))
        tensors[f"{short}_s"] = 1 + 0.3 * rng.standard_normal((d, 1))
    ids, dy = rng.integers(0, 19, size=(2, 4)), rng.standard_normal((2, 4, 19))

    def run(**t):
        modules = {path: ModuleAdapter("boft", {"boft_R": t[f"{short}_R"], "boft_s": t[f"{short}_s"]})
                   for short, path in paths.items()}
        model = Model(config, weights, Adapter(modules))
        return model, forward(model, ids)

    model, (logits, tape, _) = run(**tensors)
    grads = backward(model, dy, tape)
    wanted = {f"{short}_{n}": grads[f"{path}.boft_{n}"] for short, path in paths.items() for n in ("R", "s")}
    vjp_check(lambda **t: run(**t)[1][0], tensors, wanted, dy)
