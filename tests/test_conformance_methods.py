"""Cases for IA3, LoHa, LoKr, OFT and AdaLoRA: refpeft and PEFT pass, a wrong kernel per method fails naming the element."""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.conformance.method_families import METHOD_CONFORMANCE, method_cases
from refpeft.conformance.vectors import read_case, read_index
from refpeft_peers import Runner
from refpeft_peers.refpeft_self import run as refpeft_run
from tests.conformance_support import (COMMITTED, assert_every_case_passes, assert_fresh_draw_passes,
                                       assert_regenerated_byte_identically, assert_wrong_kernel_fails)

FAMILIES = {f"{name}_{direction}" for name in METHOD_CONFORMANCE for direction in ("forward", "backward", "merge")}
CASES = [c.name for c in method_cases()]


def test_every_method_has_forward_backward_and_merge_in_float32_and_float64():
    committed = {read_case(COMMITTED, name).manifest["family"] + "/" + name.rsplit("-", 1)[1]
                 for name in read_index(COMMITTED) if name in CASES}
    assert committed == {f"{family}/{dtype}" for family in FAMILIES for dtype in ("float32", "float64")}
    assert set(METHOD_CONFORMANCE) >= {"ia3", "loha", "lokr", "oft", "adalora"}


def test_the_variants_cover_both_ia3_placements_lokr_layouts_and_the_adalora_mask():
    ia3 = {read_case(COMMITTED, f"ia3-forward-{p}-float32").inputs["l"].shape for p in ("output", "input")}
    assert ia3 == {(24, 1), (1, 32)}
    lokr = {label: set(read_case(COMMITTED, f"lokr-forward-{label}-float32").inputs) - {"x", "W0", "bias"}
            for label in ("full", "low-rank-w2", "decompose-both")}
    assert lokr == {"full": {"lokr_w1", "lokr_w2"}, "low-rank-w2": {"lokr_w1", "lokr_w2_a", "lokr_w2_b"},
                    "decompose-both": {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}}
    E = read_case(COMMITTED, "adalora-backward-pruned-dropout-float32").inputs["lora_E"][:, 0]
    assert list(np.flatnonzero(E == 0)) == [0, 2]


def test_the_specification_documents_every_method_and_its_tensors():
    readme = (COMMITTED.parent / "README.md").read_text()
    section = readme.split("## Methods past LoRA")[1].split("\n## ")[0]
    for name, entry in METHOD_CONFORMANCE.items():
        assert f"| `{name}` |" in section, name
        for tensor in entry.row.suffixes():
            assert f"`{tensor}`" in section, (name, tensor)


def test_committed_vectors_regenerate_byte_identically(tmp_path):
    assert_regenerated_byte_identically(method_cases(), tmp_path)


def test_refpeft_passes_every_method_case():
    assert_every_case_passes(Runner("refpeft", refpeft_run), CASES)


def test_peft_layers_pass_every_method_case():
    pytest.importorskip("peft", reason="HF PEFT's layers are the peer checked here")
    from refpeft_peers.peft_torch import implementations

    reports = assert_every_case_passes(implementations()[0], CASES)
    for family in FAMILIES:     # each family's bounds are used, not vacuous
        worst = max(r.worst_ratio for r in reports if read_case(COMMITTED, r.case).manifest["family"] == family)
        assert worst > 0.01, family


# ---------------------------------------------------------------- wrong kernels, one per family

def _ia3_bias_unscaled(manifest: dict, inputs: dict) -> dict:
    """Output scaling that forgets the bias is scaled too: y = (x W0^T) * l + b, so dl misses b, dbias = sum dy."""
    out = refpeft_run(manifest, {**inputs, "bias": np.zeros_like(inputs["bias"])})
    if "y" in out:
        out["y"] = out["y"] + inputs["bias"]
    if "dbias" in out:
        out["dbias"] = inputs["dy"].reshape(-1, inputs["dy"].shape[-1]).sum(axis=0)
    return out


def _ia3_merge_returns_delta(manifest: dict, inputs: dict) -> dict:
    """The update W0 * (l - 1) where the merged weight W0 * l is asked."""
    return {"W": inputs["W0"] * (inputs["l"] - 1)}


def _loha_pairs_swapped(manifest: dict, inputs: dict) -> dict:
    """(w2a w1b) ⊙ (w1a w2b): the a-factors of the two products exchanged."""
    out = refpeft_run(manifest, {**inputs, "hada_w1_a": inputs["hada_w2_a"], "hada_w2_a": inputs["hada_w1_a"]})
    if "dhada_w1_a" in out:
        out["dhada_w1_a"], out["dhada_w2_a"] = out["dhada_w2_a"], out["dhada_w1_a"]
    return out


def _lokr_w1_transposed(manifest: dict, inputs: dict) -> dict:
    """kron(w1^T, w2): the square factor w1 (4, 4) read in the other layout."""
    out = refpeft_run(manifest, {**inputs, "lokr_w1": inputs["lokr_w1"].T.copy()})
    if "dlokr_w1" in out:
        out["dlokr_w1"] = out["dlokr_w1"].T
    return out


def _oft_rotation_transposed(manifest: dict, inputs: dict) -> dict:
    """x diag(R)^T: the Cayley transform of -Q (= R^T for the exact transform), the classic transposition slip."""
    out = refpeft_run(manifest, {**inputs, "oft_R": -inputs["oft_R"]})
    if "doft_R" in out:
        out["doft_R"] = -out["doft_R"]
    return out


def _adalora_mask_ignored(manifest: dict, inputs: dict) -> dict:
    """B A (no Lambda): the singular values, and with them the pruning mask, left out."""
    out = refpeft_run(manifest, {**inputs, "lora_E": np.ones_like(inputs["lora_E"])})
    if "dlora_E" in out:
        out["dlora_E"] = np.zeros_like(inputs["lora_E"])
    return out


WRONG = {  # family -> (kernel, case, results that must fail)
    "ia3_forward": (_ia3_bias_unscaled, "ia3-forward-output-float32", ("y",)),
    "ia3_backward": (_ia3_bias_unscaled, "ia3-backward-output-float64", ("dl", "dbias")),
    "ia3_merge": (_ia3_merge_returns_delta, "ia3-merge-input-float32", ("W",)),
    "loha_forward": (_loha_pairs_swapped, "loha-forward-basic-float32", ("y",)),
    "loha_backward": (_loha_pairs_swapped, "loha-backward-basic-float32", ("dx", "dhada_w1_a", "dhada_w2_b")),
    "loha_merge": (_loha_pairs_swapped, "loha-merge-basic-float64", ("W",)),
    "lokr_forward": (_lokr_w1_transposed, "lokr-forward-full-float32", ("y",)),
    "lokr_backward": (_lokr_w1_transposed, "lokr-backward-full-float32", ("dx", "dlokr_w1", "dlokr_w2")),
    "lokr_merge": (_lokr_w1_transposed, "lokr-merge-full-float64", ("W",)),
    "oft_forward": (_oft_rotation_transposed, "oft-forward-neumann-float32", ("y",)),
    "oft_backward": (_oft_rotation_transposed, "oft-backward-neumann-float32", ("dx", "doft_R")),
    "oft_merge": (_oft_rotation_transposed, "oft-merge-neumann-float32", ("W",)),
    "adalora_forward": (_adalora_mask_ignored, "adalora-forward-pruned-float32", ("y",)),
    "adalora_backward": (_adalora_mask_ignored, "adalora-backward-pruned-dropout-float32",
                         ("dx", "dlora_A", "dlora_B", "dlora_E")),
    "adalora_merge": (_adalora_mask_ignored, "adalora-merge-pruned-float64", ("W",)),
}


def test_every_family_has_a_wrong_kernel():
    assert set(WRONG) == FAMILIES


@pytest.mark.parametrize("family", sorted(WRONG))
def test_a_wrong_kernel_fails_naming_the_case_and_element(family):
    kernel, case, results = WRONG[family]
    assert_wrong_kernel_fails(kernel, case, results, family=family)


# ---------------------------------------------------------------- the new backward bounds on fresh draws

@pytest.mark.parametrize("label", ["lokr-backward-full", "lokr-backward-decompose-both", "oft-backward-neumann",
                                   "adalora-backward-pruned-dropout"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_backward_bounds_hold_for_refpeft_and_peft_in_float32_on_fresh_draws(label, seed, tmp_path):
    """The derived backward bounds (LoKr, OFT, AdaLoRA) on draws other than the committed ones."""
    for report in assert_fresh_draw_passes(method_cases(), label, seed, tmp_path):
        assert report.worst_ratio > 1e-3, (report.implementation, report.message)
