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
FLOAT64 = [name for name in MODEL if name.endswith("-float64")]
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8}


def test_the_catalogue_has_logits_loss_and_every_adapter_gradient():
    assert len(MODEL) == 8 and len(FLOAT64) == 4
    assert {read_case(COMMITTED, n).manifest["dtype"] for n in MODEL} == set(UNIT_ROUNDOFF)
    for name in MODEL:
        case = read_case(COMMITTED, name)
        dora = case.manifest["options"].get("method") == "dora"
        tensors = ("lora_A", "lora_B") + (("lora_magnitude_vector",) if dora else ())
        adapted = {n.rsplit(".", 1)[0] for n in case.inputs if n.endswith(".lora_A")}
        grads = {n for n in case.manifest["results"] if n.startswith("grad.")}
        assert grads == {f"grad.{p}.{t}" for p in adapted for t in tensors} and adapted
        floats = {str(a.dtype) for n, a in case.inputs.items() if n not in ("input_ids", "attention_mask", "labels")
                  and hasattr(a, "dtype")}
        assert floats == {case.manifest["dtype"]}, name
        assert {"logits", "loss"} <= set(case.manifest["results"])
        assert "probabilistic" in case.manifest["parameters"]["bound_model"]


def test_committed_vectors_regenerate_byte_identically(tmp_path):
    generate(tmp_path, cases=model_lora_cases())
    for name in MODEL:
        for suffix in (".json", ".safetensors"):
            assert (tmp_path / f"{name}{suffix}").read_bytes() == (COMMITTED / f"{name}{suffix}").read_bytes(), name


def test_the_bounds_are_a_few_hundred_roundings_of_the_magnitude_in_the_case_dtype():
    for name in MODEL:
        case = read_case(COMMITTED, name)
        u = UNIT_ROUNDOFF[case.manifest["dtype"]]
        for result, bound in case.bounds.items():
            scale = float(np.max(np.abs(case.expected[result])))
            assert 0 < float(np.max(bound)) <= 1e4 * u * max(scale, 1.0), (name, result)


def test_refpeft_passes_every_model_case():
    reports = check_directory(refpeft_run, COMMITTED, implementation="refpeft", names=MODEL)
    assert [r.status for r in reports] == ["pass"] * len(MODEL), [(r.case, r.message) for r in reports]


def test_transformers_with_peft_passes_in_every_dtype():
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
    scaled = {n: (np.asarray(a) * factor).astype(a.dtype) if n.endswith(".lora_B") else a for n, a in inputs.items()}
    out = refpeft_run(manifest, scaled)
    out.update({n: g * factor for n, g in out.items() if n.endswith(".lora_A")})   # only the logits are wrong
    return out


def _float32_loss(manifest: dict, inputs: dict) -> dict:
    """transformers' stock loss: the float64 logits upcast... down to float32 before the cross-entropy."""
    out = refpeft_run(manifest, inputs)
    out["loss"] = np.asarray(out["loss"], dtype=np.float32).astype(np.float64)
    return out


@pytest.mark.parametrize("wrong, result, names", [(_alpha_not_over_r, "logits", MODEL),
                                                  (_float32_loss, "loss", FLOAT64)])
def test_a_wrong_kernel_fails_naming_the_case_and_result(wrong, result, names):
    reports = check_directory(wrong, COMMITTED, implementation="wrong", names=names)
    assert [r.status for r in reports] == ["fail"] * len(names)
    for report in reports:
        failed = {c.name for c in report.results if not c.passed}
        assert result in failed, (report.case, failed)
