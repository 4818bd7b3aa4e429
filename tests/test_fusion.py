"""refpeft.fusion and refpeft.spectrum as specifications: exactness, optimality, memory, energy."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.backend import to_numpy
from refpeft.errors import ConfigError, RankError
from refpeft.fusion import combine_adapters, combine_modules, dare_generator, merge_task_tensors
from refpeft.methods.lora import lora_forward
from refpeft.spectrum import energy_curve, factored_svd, product_norm, rank_for_energy, singular_values
from tests.support import BACKEND_IDS, BACKENDS, assert_close


def layer_adapters(d: int, k: int, ranks, *, seed: int = 0, alphas=None, xp_array=np.asarray):
    rng = np.random.default_rng(seed)
    alphas = alphas or [2.0 * r for r in ranks]
    return [ModuleAdapter("lora", {"A": xp_array(rng.standard_normal((r, k))), "B": xp_array(rng.standard_normal((d, r)))}, alpha=a) for r, a in zip(ranks, alphas)]


def weighted_delta(modules, weights) -> np.ndarray:
    """The explicit d x k weighted sum, formed on purpose as the specification."""
    return sum(w * m.scaling * (to_numpy(m.B) @ to_numpy(m.A)) for m, w in zip(modules, weights))


def reconstructed(m: ModuleAdapter) -> np.ndarray:
    return m.scaling * (to_numpy(m.B) @ to_numpy(m.A))


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_cat_forward_is_the_weighted_sum_of_forwards(backend):
    rng = np.random.default_rng(1)
    d, k, weights = 20, 30, [0.5, -1.25, 2.0]
    modules = layer_adapters(d, k, [3, 5, 2], xp_array=backend)
    x, W0, bias = (backend(rng.standard_normal(s)) for s in ((4, 7, k), (d, k), (d,)))
    fused, report = combine_modules(modules, weights, combination="cat")
    base, _ = lora_forward(x, W0, modules[0].A, modules[0].B * 0.0, scaling=1.0, bias=bias)
    expected = to_numpy(base) + sum(
        w * (to_numpy(lora_forward(x, W0, m.A, m.B, scaling=m.scaling, bias=bias)[0]) - to_numpy(base))
        for m, w in zip(modules, weights))
    y, _ = lora_forward(x, W0, fused.A, fused.B, scaling=fused.scaling, bias=bias)
    assert_close(y, expected, rtol=1e-12, like=x)
    assert fused.r == 10 and fused.scaling == 1.0
    assert report.error <= 1e-12 * report.norm and report.optimal_error == 0.0


@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 40), k=st.integers(2, 40), ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       target=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_svd_fusion_is_the_truncated_svd_of_the_formed_delta(d, k, ranks, target, seed):
    ranks = [min(r, d, k) for r in ranks]
    weights = list(np.random.default_rng(seed).uniform(-2, 2, len(ranks)))
    modules = layer_adapters(d, k, ranks, seed=seed)
    fused, report = combine_modules(modules, weights, combination="svd", rank=target)
    delta = weighted_delta(modules, weights)
    U, S, Vh = np.linalg.svd(delta, full_matrices=False)
    r = min(target, sum(ranks), d, k)
    truncated = (U[:, :r] * S[:r]) @ Vh[:r]
    assume_gap = r == len(S) or S[r - 1] - S[r] > 1e-6 * S[0]   # the truncation is unique
    if assume_gap:
        assert np.abs(reconstructed(fused) - truncated).max() <= 1e-10 * max(S[0], 1e-300)
    assert fused.r == r
    np.testing.assert_allclose(report.optimal_error, np.sqrt(np.sum(S[r:] ** 2)), rtol=1e-9, atol=1e-12 * S[0])
    np.testing.assert_allclose(report.error, np.linalg.norm(delta - reconstructed(fused)), rtol=1e-8, atol=1e-12 * S[0])
    np.testing.assert_allclose(report.norm, np.linalg.norm(delta), rtol=1e-12)


def test_svd_fusion_never_holds_a_d_by_k_array():
    d = k = 2048
    modules = layer_adapters(d, k, [8, 8, 8, 8], seed=2)
    tracemalloc.start()
    fused, report = combine_modules(modules, [0.25, 0.5, -0.5, 1.0], combination="svd", rank=8)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    dense_bytes = d * k * 8                        # one float64 d x k delta: 32 MiB
    factor_bytes = (d + k) * 32 * 8                # the stacked factors B_cat, A_cat: 1 MiB
    assert peak < dense_bytes / 4 and peak < 8 * factor_bytes, f"peak {peak / 2**20:.2f} MiB"  # seen: 5.3 MiB
    assert fused.r == 8 and report.error <= report.optimal_error * (1 + 1e-9)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_svd_fusion_on_every_backend(backend):
    weights = [1.5, -0.5]
    reference, _ = combine_modules(layer_adapters(12, 9, [3, 4]), weights, combination="svd", rank=3)
    modules = layer_adapters(12, 9, [3, 4], xp_array=backend)
    fused, _ = combine_modules(modules, weights, combination="svd", rank=3)
    assert_close(fused.A, to_numpy(fused.A), rtol=0, like=modules[0].A)   # the input's namespace and dtype
    np.testing.assert_allclose(reconstructed(fused), reconstructed(reference), rtol=0, atol=1e-12 * np.abs(reconstructed(reference)).max())


def test_linear_has_cross_terms_and_the_report_shows_them():
    modules = layer_adapters(16, 16, [4, 4], seed=5)
    weights = [1.0, 1.0]
    fused, report = combine_modules(modules, weights, combination="linear")
    assert report.error > 1.5 * report.optimal_error      # far from the best rank-4 adapter
    single, alone = combine_modules(modules[:1], [0.7], combination="linear")
    np.testing.assert_allclose(reconstructed(single), weighted_delta(modules[:1], [0.7]), rtol=1e-12)
    assert alone.error <= 1e-12 * alone.norm


def test_energy_curve_and_rank_for_energy_are_minimal():
    modules = layer_adapters(30, 25, [6, 6], seed=7)
    S = np.linalg.svd(weighted_delta(modules, [1.0, 0.3]), compute_uv=False)
    fused, _ = combine_modules(modules, [1.0, 0.3], combination="cat")
    S_factored = singular_values(fused.A, fused.B)
    np.testing.assert_allclose(S_factored, S[:12], rtol=1e-11, atol=1e-12 * S[0])
    E = energy_curve(S_factored)
    assert np.all(np.diff(E) >= 0) and E[-1] == 1.0
    for fraction in (0.5, 0.9, 0.95, 0.999, 1.0):
        r = rank_for_energy(S_factored, fraction)
        assert E[r - 1] >= fraction and (r == 1 or E[r - 2] < fraction)
    compressed, report = combine_modules(modules, [1.0, 0.3], combination="svd", energy=0.9)
    assert compressed.r == rank_for_energy(S_factored, 0.9)
    assert 1.0 - report.discarded_energy >= 0.9


def test_zero_spectrum_has_nothing_to_keep():
    S = np.zeros(4)
    assert np.all(energy_curve(S) == 1.0) and rank_for_energy(S, 0.95) == 0


def test_factored_svd_and_product_norm_match_the_formed_product():
    rng = np.random.default_rng(9)
    A, B = rng.standard_normal((5, 70)), rng.standard_normal((50, 5))
    svd = factored_svd(A, B, scaling=0.5)
    np.testing.assert_allclose((svd.U * svd.S) @ svd.Vh, 0.5 * B @ A, atol=1e-12 * np.abs(B @ A).max())
    np.testing.assert_allclose(svd.U.T @ svd.U, np.eye(5), atol=1e-13)
    assert product_norm(B, A) == pytest.approx(np.linalg.norm(B @ A), rel=1e-13)


def test_magnitude_prune_keeps_the_largest_entries():
    t = np.random.default_rng(0).standard_normal((7, 9))
    pruned = merge_task_tensors([t], [1.0], method="magnitude_prune", density=0.3)
    kept = pruned != 0
    assert kept.sum() == int(0.3 * t.size)
    assert np.abs(t[kept]).min() > np.abs(t[~kept]).max()


def test_dare_keeps_a_seeded_fraction_and_rescales():
    t = np.random.default_rng(0).standard_normal((200, 100))
    pruned = merge_task_tensors([t], [1.0], method="dare_linear", density=0.25, rng=dare_generator(3, "q"))
    kept = pruned != 0
    assert abs(kept.mean() - 0.25) < 0.01
    np.testing.assert_array_equal(pruned[kept], t[kept] / 0.25)
    again = merge_task_tensors([t], [1.0], method="dare_linear", density=0.25, rng=dare_generator(3, "q"))
    np.testing.assert_array_equal(pruned, again)


def test_ties_keeps_only_the_elected_sign():
    t1, t2, t3 = np.array([3.0, -1.0, 2.0]), np.array([-1.0, -2.0, 2.0]), np.array([-1.0, 4.0, 0.0])
    merged = merge_task_tensors([t1, t2, t3], [1.0, 1.0, 1.0], method="ties", density=1.0)
    # entry 0: total +1 -> keep 3 alone; entry 1: total +1 -> keep 4; entry 2: +: mean of 2, 2 (the 0 is no vote)
    np.testing.assert_array_equal(merged, [3.0, 4.0, 2.0])


def test_combine_adapters_layer_by_layer():
    first = Adapter(modules={"q": layer_adapters(8, 6, [2])[0], "v": layer_adapters(8, 6, [2], seed=1)[0]})
    second = Adapter(modules={"q": layer_adapters(8, 6, [3], seed=2)[0]})
    fused, reports = combine_adapters([first, second], [1.0, 2.0], combination="cat")
    assert fused.modules["q"].r == 5 and fused.modules["v"].r == 2
    np.testing.assert_allclose(reconstructed(fused.modules["v"]), weighted_delta([first.modules["v"]], [1.0]), rtol=1e-13)
    assert set(reports) == {"q", "v"}


def test_bad_requests_are_refused():
    modules = layer_adapters(8, 6, [2, 3])
    with pytest.raises(RankError, match="equal ranks"):
        combine_modules(modules, [1.0, 1.0], combination="linear")
    with pytest.raises(ConfigError, match="unknown combination"):
        combine_modules(modules, [1.0, 1.0], combination="average")
    with pytest.raises(ConfigError, match="svd family"):
        combine_modules(modules, [1.0, 1.0], combination="cat", rank=2)
    with pytest.raises(ConfigError, match="density"):
        combine_modules(modules, [1.0, 1.0], combination="ties_svd")
    with pytest.raises(ConfigError, match="give a seed"):
        combine_modules(modules, [1.0, 1.0], combination="dare_linear_svd", density=0.5)
    with pytest.raises(ConfigError, match="2 adapters and 1 weights"):
        combine_modules(modules, [1.0], combination="cat")
    dora = ModuleAdapter("dora", {"A": modules[0].A, "B": modules[0].B, "magnitude": np.ones(8)})
    with pytest.raises(ConfigError, match="dora"):
        combine_modules([dora, modules[0]], [1.0, 1.0], combination="cat")


def test_fuse_command_writes_the_combination_and_its_report(tmp_path, capsys):
    from refpeft.cli import main
    from refpeft.peft_format import read_peft_adapter, write_peft_adapter

    named = []
    for i, seed in enumerate((1, 2, 3)):
        modules = {p: layer_adapters(12, 10, [3], seed=seed + 10 * j)[0] for j, p in enumerate(("q_proj", "v_proj"))}
        write_peft_adapter(tmp_path / f"in{i}", Adapter(modules=modules))
        named.append(read_peft_adapter(tmp_path / f"in{i}"))
    args = ["fuse", *(str(tmp_path / f"in{i}") for i in range(3)), "--weights", "0.5", "-1", "2",
            "--combination", "svd", "--rank", "4", "-o", str(tmp_path / "out")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "q_proj" in printed and "optimal error" in printed
    written = read_peft_adapter(tmp_path / "out")
    expected, _ = combine_adapters(named, [0.5, -1.0, 2.0], combination="svd", rank=4)
    for path, m in expected.modules.items():
        np.testing.assert_allclose(reconstructed(written.modules[path]), reconstructed(m), rtol=1e-12, atol=1e-13)
        assert written.modules[path].r == 4 and written.modules[path].scaling == 1.0
    assert main(["fuse", str(tmp_path / "in0"), "--combination", "ties", "-o", str(tmp_path / "bad")]) == 2
    assert "density" in capsys.readouterr().err


def test_inspect_spectrum_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot draws with matplotlib (test extra)")
    from refpeft.cli import main
    from refpeft.peft_format import write_peft_adapter

    write_peft_adapter(tmp_path / "adapter", Adapter(modules={"q_proj": layer_adapters(12, 10, [4])[0]}))
    assert main(["inspect", str(tmp_path / "adapter"), "--spectrum", "--plot", str(tmp_path / "spectra.png")]) == 0
    printed = capsys.readouterr().out
    assert "r(90%)" in printed and "E(r)" in printed
    assert (tmp_path / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("method", ["ties", "dare_ties", "magnitude_prune"])
def test_task_merges_on_every_backend(backend, method):
    rng = np.random.default_rng(4)
    tensors = [rng.standard_normal((5, 6)) for _ in range(3)]
    weights = [0.5, -1.0, 2.0]
    options = dict(method=method, density=0.4, majority_sign_method="frequency")
    expected = merge_task_tensors(tensors, weights, rng=dare_generator(1, "x"), **options)
    merged = merge_task_tensors([backend(t) for t in tensors], weights, rng=dare_generator(1, "x"), **options)
    assert_close(merged, expected, rtol=1e-15, like=backend(tensors[0]))
