"""MoE expert LoRA cases: refpeft and PEFT pass, an expert-minor-A kernel fails naming the case and element."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from refpeft.conformance.check import check_directory
from refpeft.conformance.generate import generate
from refpeft.conformance.moe_families import moe_lora_cases
from refpeft.conformance.vectors import read_case, read_index
from refpeft_peers.refpeft_self import run as refpeft_run
from tests.conformance_support import assert_wrong_kernel_fails

COMMITTED = Path(__file__).resolve().parent.parent / "conformance" / "vectors"
MOE = [name for name in read_index(COMMITTED) if name.startswith("moe-")]


def test_the_catalogue_covers_forward_backward_merge_both_layouts_and_half_dtypes():
    assert {n.split("-")[1] for n in MOE} == {"forward", "backward", "merge"}
    assert {n.rsplit("-", 1)[1] for n in MOE} == {"float32", "float16", "bfloat16"}
    case = read_case(COMMITTED, "moe-forward-in-out-float32")
    E, inn, out = (case.manifest["sizes"][k] for k in ("experts", "in", "out"))
    assert case.inputs["W"].shape == (E, inn, out)
    assert str(case.inputs["top_k_index"].dtype) == "int32" and E - 1 not in case.inputs["top_k_index"]


def test_committed_vectors_regenerate_byte_identically(tmp_path):
    generate(tmp_path, cases=moe_lora_cases())
    for name in MOE:
        for suffix in (".json", ".safetensors"):
            assert (tmp_path / f"{name}{suffix}").read_bytes() == (COMMITTED / f"{name}{suffix}").read_bytes(), name


def test_refpeft_passes_every_moe_case():
    reports = check_directory(refpeft_run, COMMITTED, implementation="refpeft", names=MOE)
    assert [r.status for r in reports] == ["pass"] * len(MOE), [(r.case, r.message) for r in reports]


def test_peft_target_parameters_on_qwen3_moe_experts_pass():
    pytest.importorskip("peft", reason="HF PEFT's ParamWrapper is the peer checked here")
    pytest.importorskip("transformers")
    from refpeft_peers.peft_torch import implementations

    runner = implementations()[0]
    reports = check_directory(runner.run, COMMITTED, implementation=runner.name, names=MOE)
    assert [r.status for r in reports] == ["pass"] * len(MOE), [(r.case, r.message) for r in reports]
    assert max(r.worst_ratio for r in reports) > 0.1                  # the bounds are not loose


def _expert_minor_A(manifest: dict, inputs: dict) -> dict:
    """A kernel that reads A like B, expert-minor (A_e = A[e::E]) instead of rows e*r..e*r+r-1."""
    E, r = manifest["sizes"]["experts"], manifest["sizes"]["r"]
    A = inputs["A"]
    as_if_major = np.concatenate([A[e::E] for e in range(E)], axis=0)   # A_e placed where the kernel reads it
    out = refpeft_run(manifest, {**inputs, "A": as_if_major})
    if "dA" in out:   # the gradient goes back to the rows the kernel read
        dA = np.empty_like(out["dA"])
        for e in range(E):
            dA[e::E] = out["dA"][e * r:(e + 1) * r]
        out["dA"] = dA
    return out


@pytest.mark.parametrize("case, results", [
    ("moe-forward-out-in-float32", ("y",)),
    ("moe-backward-out-in-bfloat16", ("dx", "dA", "dB", "dtop_k_weights")),
    ("moe-merge-in-out-float32", ("W_merged",)),
])
def test_an_expert_minor_A_kernel_fails_naming_the_case_and_element(case, results):
    assert_wrong_kernel_fails(_expert_minor_A, case, results)
