"""bfloat16 layer cases in PEFT's rounding order: regenerate identically, PEFT matches them, wrong kernels fail."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from refpeft.conformance.bf16_families import bf16_layer_cases
from refpeft.conformance.check import check_directory
from refpeft.conformance.generate import generate
from refpeft.conformance.vectors import read_case, read_index
from refpeft_peers.refpeft_self import run as refpeft_run

COMMITTED = Path(__file__).resolve().parent.parent / "conformance" / "vectors"
BF16 = [name for name in read_index(COMMITTED) if "-bf16-" in name]


def _bf(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16, back in float32."""
    return np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def test_the_catalogue_has_forward_and_backward_of_each_method_all_inputs_bfloat16():
    assert {(n.split("-")[0], n.split("-")[2]) for n in BF16} == {
        (m, d) for m in ("lora", "dora", "vera") for d in ("forward", "backward")}
    for name in BF16:
        case = read_case(COMMITTED, name)
        assert {str(a.dtype) for a in case.inputs.values()} == {"bfloat16"}, name
        assert all(float(np.min(b)) > 0 for b in case.bounds.values()), name


def test_committed_vectors_regenerate_byte_identically(tmp_path):
    generate(tmp_path, cases=bf16_layer_cases())
    for name in BF16:
        for suffix in (".json", ".safetensors"):
            assert (tmp_path / f"{name}{suffix}").read_bytes() == (COMMITTED / f"{name}{suffix}").read_bytes(), name


def _qlora_order_lora_forward(manifest: dict, inputs: dict) -> dict | None:
    """A float32 NumPy LoRA forward in bitsandbytes' QLoRA order: the scaled branch rounded to bfloat16
    before the add (y = bf(base + bf(branch))), where PEFT adds the float32 branch and rounds once."""
    if manifest["family"] != "lora_bf16_forward":
        return None
    f = {n: np.asarray(a, dtype=np.float32) for n, a in inputs.items()}
    x = f["x"].reshape(-1, f["x"].shape[-1])
    base = _bf(x @ f["W0"].T + f.get("bias", 0))
    branch = _bf(((x @ f["A"].T) @ f["B"].T) * np.float32(manifest["parameters"]["scaling"]))
    return {"y": _bf(base + branch).reshape(*f["x"].shape[:-1], -1)}


def test_another_rounding_order_passes_within_the_bound_but_is_not_the_golden_order():
    lora = [n for n in BF16 if n.startswith("lora-bf16-forward")]
    reports = check_directory(_qlora_order_lora_forward, COMMITTED, implementation="qlora-order", names=lora)
    assert [r.status for r in reports] == ["pass"] * len(lora), [(r.case, r.message) for r in reports]
    assert max(r.worst_ratio for r in reports) > 0      # the golden values are PEFT's order, not any order


def test_refpeft_passes_every_bf16_case():
    reports = check_directory(refpeft_run, COMMITTED, implementation="refpeft", names=BF16)
    assert [r.status for r in reports] == ["pass"] * len(BF16), [(r.case, r.message) for r in reports]


def test_peft_bf16_layer_matches_y_and_dx_bit_for_bit():
    pytest.importorskip("peft", reason="HF PEFT is the peer checked here")
    from refpeft_peers.peft_bf16 import bf16_layer

    reports = check_directory(lambda m, i: bf16_layer(m, i, "cpu"), COMMITTED, implementation="peft", names=BF16)
    assert [r.status for r in reports] == ["pass"] * len(BF16), [(r.case, r.message) for r in reports]
    for report in reports:
        for result in report.results:
            # y and dx are PEFT's order exactly (torch 2.13 CPU); the float32 gradients differ by
            # summation order only, a few 1e-5 of the bound (measured)
            limit = 0.0 if result.name in ("y", "dx") else 1e-3
            assert result.ratio <= limit, (report.case, result.name, result.ratio)


def _dora_forward_kernel(manifest: dict, inputs: dict, *, norm_axis: int) -> dict | None:
    """A float32 NumPy kernel of the README's bf16 DoRA forward, with the norm over `norm_axis`."""
    if manifest["family"] != "dora_bf16_forward":
        return None
    f = {n: np.asarray(a, dtype=np.float32) for n, a in inputs.items()}
    s = np.float32(manifest["parameters"]["scaling"])
    x = f["x"].reshape(-1, f["x"].shape[-1])
    bias = f.get("bias")
    base = _bf(x @ f["W0"].T + (0 if bias is None else bias))
    nu = np.linalg.norm(f["W0"] + s * (f["B"] @ f["A"]), axis=norm_axis)
    g = f["magnitude"] / nu
    lr = (x @ f["A"].T) @ f["B"].T
    bo = base if bias is None else _bf(base - bias)
    y = _bf(base + ((g - 1) * bo + (g * lr) * s))
    return {"y": y.reshape(*f["x"].shape[:-1], -1)}


def test_an_independent_kernel_passes_and_a_norm_over_the_wrong_axis_fails_naming_the_element():
    dora = [n for n in BF16 if n.startswith("dora-bf16-forward")]
    right = check_directory(lambda m, i: _dora_forward_kernel(m, i, norm_axis=1), COMMITTED,
                            implementation="right", names=dora)
    assert [r.status for r in right] == ["pass"] * len(dora), [(r.case, r.message) for r in right]
    wrong = check_directory(lambda m, i: _dora_forward_kernel(m, i, norm_axis=0), COMMITTED,
                            implementation="wrong", names=dora)
    for report in wrong:               # square layers: the wrong norm has the right shape, fails by value
        assert report.status == "fail" and report.message.startswith("y: worst at ["), (report.case, report.message)


def test_a_kernel_scaling_by_alpha_instead_of_alpha_over_r_fails():
    def alpha_scaled(manifest: dict, inputs: dict) -> dict:
        wrong = {**manifest, "parameters": {**manifest["parameters"], "scaling": manifest["options"]["alpha"]}}
        return refpeft_run(wrong, inputs)

    lora = [n for n in BF16 if n.startswith("lora-")]
    reports = check_directory(alpha_scaled, COMMITTED, implementation="wrong", names=lora)
    assert [r.status for r in reports] == ["fail"] * len(lora)
    assert all("worst at [" in r.message for r in reports)
