"""Whole-model cases (model_lora): regenerate identically, refpeft and transformers + PEFT pass, wrong kernels fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from refpeft.conformance.check import check_directory
from refpeft.conformance.generate import generate
from refpeft.conformance.model_families import model_lora_cases
from refpeft.conformance.vectors import read_case, read_index
from refpeft_peers.refpeft_self import run as refpeft_run

COMMITTED = Path(__file__).resolve().parent.parent / "conformance" / "vectors"
MODEL = [name for name in read_index(COMMITTED) if name.startswith("model-")]


def test_the_catalogue_has_logits_loss_and_every_adapter_gradient():
    assert len(MODEL) == 3
    for name in MODEL:
        case = read_case(COMMITTED, name)
        adapted = {n.rsplit(".", 1)[0] for n in case.inputs if n.endswith(".lora_A")}
        grads = {n for n in case.manifest["results"] if n.startswith("grad.")}
        assert grads == {f"grad.{p}.lora_{t}" for p in adapted for t in "AB"} and adapted
        assert {"logits", "loss"} <= set(case.manifest["results"])
        assert "probabilistic" in case.manifest["parameters"]["bound_model"]


def test_committed_vectors_regenerate_byte_identically(tmp_path):
    generate(tmp_path, cases=model_lora_cases())
    for name in MODEL:
        for suffix in (".json", ".safetensors"):
            assert (tmp_path / f"{name}{suffix}").read_bytes() == (COMMITTED / f"{name}{suffix}").read_bytes(), name


def test_the_bounds_are_a_few_hundred_float64_roundings_of_the_magnitude():
    u64 = 2.0**-53
    for name in MODEL:
        case = read_case(COMMITTED, name)
        for result, bound in case.bounds.items():
            scale = float(np.max(np.abs(case.expected[result])))
            assert 0 < float(np.max(bound)) <= 1e4 * u64 * max(scale, 1.0), (name, result)


def test_refpeft_passes_every_model_case():
    reports = check_directory(refpeft_run, COMMITTED, implementation="refpeft", names=MODEL)
    assert [r.status for r in reports] == ["pass"] * len(MODEL), [(r.case, r.message) for r in reports]


def test_transformers_with_peft_in_float64_passes():
    pytest.importorskip("peft", reason="transformers + PEFT is the peer checked here")
    pytest.importorskip("transformers")
    from refpeft_peers.peft_torch import implementations

    runner = implementations()[0]
    reports = check_directory(runner.run, COMMITTED, implementation=runner.name, names=MODEL)
    assert [r.status for r in reports] == ["pass"] * len(MODEL), [(r.case, r.message) for r in reports]


def _alpha_not_over_r(manifest: dict, inputs: dict) -> dict:
    """A converter that uses alpha as the scale (mlx-vlm's bug): B scaled by r (or sqrt r) too much."""
    r = manifest["sizes"]["r"]
    factor = np.sqrt(r) if manifest["options"].get("rslora") else r
    scaled = {n: np.asarray(a) * factor if n.endswith(".lora_B") else a for n, a in inputs.items()}
    out = refpeft_run(manifest, scaled)
    out.update({n: g * factor for n, g in out.items() if n.endswith(".lora_A")})   # only the logits are wrong
    return out


def _float32_loss(manifest: dict, inputs: dict) -> dict:
    """transformers' stock loss: the float64 logits upcast... down to float32 before the cross-entropy."""
    out = refpeft_run(manifest, inputs)
    out["loss"] = np.asarray(out["loss"], dtype=np.float32).astype(np.float64)
    return out


@pytest.mark.parametrize("wrong, result", [(_alpha_not_over_r, "logits"), (_float32_loss, "loss")])
def test_a_wrong_kernel_fails_naming_the_case_and_result(wrong, result):
    reports = check_directory(wrong, COMMITTED, implementation="wrong", names=MODEL)
    assert [r.status for r in reports] == ["fail"] * len(MODEL)
    for report in reports:
        failed = {c.name for c in report.results if not c.passed}
        assert result in failed, (report.case, failed)
