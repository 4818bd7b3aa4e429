"""Fusion cases past `cat`: refpeft and PEFT's add_weighted_adapter pass, wrong combinations fail naming the element."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest

from refpeft.conformance.fusion_families import DENSE_MERGES, FACTOR_MERGES, fusion_cases, sylvester_hadamard
from refpeft.conformance.vectors import read_case
from refpeft.fusion import dare_generator, merge_task_tensors
from refpeft_peers import Runner
from refpeft_peers.refpeft_self import run as refpeft_run
from tests.conformance_support import (COMMITTED, assert_every_case_passes, assert_fresh_draw_passes,
                                       assert_regenerated_byte_identically, assert_wrong_kernel_fails)

CASES = [c.name for c in fusion_cases()]
COMBINATIONS = (*FACTOR_MERGES, "svd", *(f"{name}_svd" for name in DENSE_MERGES))


def test_every_family_has_a_wrong_kernel():
    assert set(WRONG) == {f"fusion_{c}" for c in COMBINATIONS}


def test_every_combination_has_a_case_in_float32_and_float64():
    families = {read_case(COMMITTED, name).manifest["family"] + "/" + name.rsplit("-", 1)[1] for name in CASES}
    assert families == {f"fusion_{c}/{dtype}" for c in COMBINATIONS for dtype in ("float32", "float64")}


def test_the_specification_documents_every_combination():
    readme = (COMMITTED.parent / "README.md").read_text()
    section = readme.split("## Fusion combinations")[1].split("\n## ")[0]
    for combination in COMBINATIONS:
        assert f"`fusion_{combination}`" in section and f"`{combination}`" in section, combination
    assert "free signs" in section and "`delta` = B A" in section


def test_committed_vectors_regenerate_byte_identically(tmp_path):
    assert_regenerated_byte_identically(fusion_cases(), tmp_path)


def test_the_dare_masks_are_refpefts_seeded_draws_in_pefts_order():
    case = read_case(COMMITTED, "fusion-dare-ties-float32")
    rng, density = dare_generator(case.manifest["seed"], "layer"), case.manifest["options"]["density"]
    for side in ("A", "B"):
        for i in (1, 2, 3):
            mask = case.inputs[f"mask.{side}{i}"]
            assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
            assert np.array_equal(mask, rng.random(mask.shape) < density)


def test_the_dense_merges_mask_the_deltas_and_keep_every_singular_value():
    case = read_case(COMMITTED, "fusion-dare-ties-svd-float32")
    rng, density = dare_generator(case.manifest["seed"], "layer"), case.manifest["options"]["density"]
    for i in (1, 2, 3):
        assert np.array_equal(case.inputs[f"mask.delta{i}"], rng.random((24, 32)) < density)
    assert case.manifest["options"]["rank"] == 24 == np.linalg.matrix_rank(case.expected["delta"])


def test_pefts_weights_are_given_rounded_to_float32():
    p = read_case(COMMITTED, "fusion-linear-float64").manifest["parameters"]
    for w in p["weights_A"] + p["weights_B"]:
        assert float(np.float32(w)) == w
    assert [np.sign(w) for w in p["weights_A"]] == [1.0, -1.0, 1.0]


def test_the_svd_case_is_built_on_orthogonal_factors_and_truncates():
    case = read_case(COMMITTED, "fusion-svd-rank3-float32")
    B = np.concatenate([case.inputs["B1"], case.inputs["B2"]], axis=1).astype(np.float64)
    gram = B.T @ B
    assert np.array_equal(gram, np.diag(np.diag(gram)))                    # exactly orthogonal columns
    assert np.linalg.matrix_rank(case.expected["delta"]) == 3 < B.shape[1]
    assert np.array_equal(np.abs(sylvester_hadamard(16)), np.ones((16, 16)))


def test_refpeft_passes_every_fusion_case():
    assert_every_case_passes(Runner("refpeft", refpeft_run), CASES)


def test_peft_add_weighted_adapter_passes_every_fusion_case():
    pytest.importorskip("peft", reason="HF PEFT's add_weighted_adapter is the peer checked here")
    from refpeft_peers.peft_torch import implementations

    reports = assert_every_case_passes(implementations()[0], CASES)
    assert max(r.worst_ratio for r in reports if r.dtype == "float32") > 0.1


# ---------------------------------------------------------------- wrong combinations

def _factors(inputs: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    n = len([name for name in inputs if re.fullmatch(r"A\d+", name)])
    return [inputs[f"A{i}"] for i in range(1, n + 1)], [inputs[f"B{i}"] for i in range(1, n + 1)]


def _linear_weights_on_A_only(manifest: dict, inputs: dict) -> dict:
    """c_i on A, 1 on B: "the weighted sum" done per factor, without PEFT's sqrt split."""
    A, B = _factors(inputs)
    c = [w * s for w, s in zip(manifest["options"]["weights"], manifest["parameters"]["scalings"])]
    return {"A": sum(ci * a for ci, a in zip(c, A)), "B": sum(B)}


def _dare_without_rescale(manifest: dict, inputs: dict) -> dict:
    """DARE's drop without the 1 / density rescale of the kept entries."""
    density = manifest["options"]["density"]
    out = {}
    for side, weights in (("A", manifest["parameters"]["weights_A"]), ("B", manifest["parameters"]["weights_B"])):
        T = [inputs[f"{side}{i}"] * inputs[f"mask.{side}{i}"] for i in (1, 2, 3)]
        out[side] = sum(w * t for w, t in zip(weights, T))
    assert density < 1
    return out


def _prune_keeps_smallest(manifest: dict, inputs: dict) -> dict:
    """magnitude_prune keeping the smallest |entries| (an argsort in the wrong direction)."""
    density = manifest["options"]["density"]
    out = {}
    for side, weights in (("A", manifest["parameters"]["weights_A"]), ("B", manifest["parameters"]["weights_B"])):
        total = 0
        for i, w in enumerate(weights, start=1):
            t = inputs[f"{side}{i}"]
            keep = np.argsort(np.abs(t).ravel())[:int(density * t.size)]
            pruned = np.zeros(t.size, dtype=t.dtype)
            pruned[keep] = t.ravel()[keep]
            total = total + w * pruned.reshape(t.shape)
        out[side] = total
    return out


def _svd_keeps_the_smallest(manifest: dict, inputs: dict) -> dict:
    """Truncation to the r smallest non-zero singular values instead of the r largest."""
    A, B = _factors(inputs)
    s, w = manifest["parameters"]["scalings"], manifest["parameters"]["weights"]
    delta = sum(wi * si * b.astype(np.float64) @ a.astype(np.float64) for wi, si, a, b in zip(w, s, A, B))
    U, S, Vh = np.linalg.svd(delta)
    r, nonzero = manifest["options"]["rank"], int(np.sum(S > 1e-6 * S[0]))
    kept = slice(nonzero - r, nonzero)
    return {"delta": (U[:, kept] * S[kept]) @ Vh[kept]}


def _ties_without_sign_election(manifest: dict, inputs: dict) -> dict:
    """TIES as magnitude pruning plus a plain weighted sum: the sign election and disjoint mean left out."""
    p, density = manifest["parameters"], manifest["options"]["density"]
    return {side: merge_task_tensors([inputs[f"{side}{i}"] for i in (1, 2, 3)], p[f"weights_{side}"],
                                     method="magnitude_prune", density=density) for side in ("A", "B")}


def _factors_instead_of_deltas(manifest: dict, inputs: dict) -> dict:
    """A `*_svd` merge done on the factors (the plain combination of that name), not on the deltas."""
    plain = copy.deepcopy(manifest)
    plain["family"] = manifest["family"].removesuffix("_svd")
    plain["options"].pop("rank")
    out = refpeft_run(plain, inputs)
    return {"delta": out["B"] @ out["A"]}


WRONG = {  # family -> (kernel, case, results that must fail)
    "fusion_linear": (_linear_weights_on_A_only, "fusion-linear-float32", ("A", "B")),
    "fusion_ties": (_ties_without_sign_election, "fusion-ties-float32", ("A", "B")),
    "fusion_magnitude_prune": (_prune_keeps_smallest, "fusion-magnitude-prune-float32", ("A", "B")),
    "fusion_dare_linear": (_dare_without_rescale, "fusion-dare-linear-float64", ("A", "B")),
    "fusion_dare_ties": (_dare_without_rescale, "fusion-dare-ties-float32", ("A", "B")),
    "fusion_svd": (_svd_keeps_the_smallest, "fusion-svd-rank3-float32", ("delta",)),
    **{f"fusion_{name}_svd": (_factors_instead_of_deltas, f"fusion-{name.replace('_', '-')}-svd-float32", ("delta",))
       for name in DENSE_MERGES},
}


@pytest.mark.parametrize("family", sorted(WRONG))
def test_a_wrong_combination_fails_naming_the_case_and_element(family):
    kernel, case, results = WRONG[family]
    assert_wrong_kernel_fails(kernel, case, results, family=family)


@pytest.mark.parametrize("label", ["fusion-ties", "fusion-dare-ties", "fusion-svd-rank3", "fusion-magnitude-prune-svd",
                                   "fusion-dare-ties-svd"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_bounds_hold_for_refpeft_and_peft_in_float32_on_fresh_draws(label, seed, tmp_path):
    assert_fresh_draw_passes(fusion_cases(), label, seed, tmp_path)
