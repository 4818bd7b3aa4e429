"""Multi-adapter batch cases: refpeft and PEFT pass, and wrong serving kernels fail naming the case and element."""

from __future__ import annotations

import copy
import io
import re
from pathlib import Path

import numpy as np
import pytest

from refpeft.conformance.check import check_directory
from refpeft.conformance.report import run_report
from refpeft.conformance.vectors import read_case, read_index
from refpeft_peers import Runner
from refpeft_peers.refpeft_self import run as refpeft_run

COMMITTED = Path(__file__).resolve().parent.parent / "conformance" / "vectors"
MULTI = [name for name in read_index(COMMITTED) if name.startswith("multi-")]


def test_the_catalogue_covers_both_layouts_every_dtype_and_dora():
    assert {n.split("-")[1] for n in MULTI} == {"bgmv", "sgmv"}
    assert {n.rsplit("-", 1)[1] for n in MULTI} == {"float32", "float64", "float16", "bfloat16"}
    case = read_case(COMMITTED, "multi-bgmv-lora-dora-float32")
    assert case.manifest["options"]["methods"].count("dora") == 2
    slots = case.inputs["token_slots"]
    assert str(slots.dtype) == "int32" and set(slots.tolist()) == {-1, 0, 1, 2}
    # padding beyond each slot's rank is zero, and so are the rows of tokens without an adapter
    ranks = case.manifest["sizes"]["ranks"]
    for j, r in enumerate(ranks):
        assert not case.inputs["A_stack"][j, r:].any() and not case.inputs["B_stack"][j, :, r:].any()
    assert not case.expected["shrink"][slots == -1].any() and not case.expected["expand"][slots == -1].any()


def test_refpeft_passes_every_multi_adapter_case():
    reports = check_directory(refpeft_run, COMMITTED, implementation="refpeft", names=MULTI)
    assert [r.status for r in reports] == ["pass"] * len(MULTI), [(r.case, r.message) for r in reports]


def test_peft_mixed_batches_pass_and_refuse_dora():
    pytest.importorskip("peft", reason="HF PEFT's mixed batches are the peer checked here")
    from refpeft_peers.peft_torch import implementations

    runner = implementations()[0]
    reports = {r.case: r for r in check_directory(runner.run, COMMITTED, implementation=runner.name, names=MULTI)}
    for name, r in reports.items():
        if "dora" in name:
            assert r.status == "unsupported" and "refuses DoRA in mixed batches" in r.message
        else:
            assert r.status == "pass", (name, r.message)
    assert max(r.worst_ratio for r in reports.values() if r.status == "pass") > 0.1   # the bounds are not loose


def _rslora_as_plain_lora(manifest: dict, inputs: dict) -> dict:
    """A serving kernel that scales every slot by alpha / r, rsLoRA's slot too (vLLM's and TRT-LLM's old bug)."""
    wrong = copy.deepcopy(manifest)
    o, ranks = wrong["options"], wrong["sizes"]["ranks"]
    wrong["parameters"]["scalings"] = [alpha / r for alpha, r in zip(o["alphas"], ranks)]
    return refpeft_run(wrong, inputs)


def _negative_index_wraps(manifest: dict, inputs: dict) -> dict:
    """A kernel that indexes the stack with t_i directly: "no adapter" (-1) silently uses the last slot."""
    wrapped = dict(inputs)
    S = len(manifest["sizes"]["ranks"])
    wrapped["token_slots"] = np.where(inputs["token_slots"] < 0, S - 1, inputs["token_slots"]).astype(np.int32)
    return refpeft_run(manifest, wrapped)


def _dora_norm_over_outputs(manifest: dict, inputs: dict) -> dict:
    """DoRA with the norm taken over the output axis (columns of W0 + s B A), vLLM's test reference bug."""
    out = refpeft_run(manifest, inputs)
    slots = inputs["token_slots"].astype(np.int64)
    x, W0 = inputs["x"].astype(np.float64), inputs["W0"].astype(np.float64)
    base = x @ W0.T
    for j, method in enumerate(manifest["options"]["methods"]):
        if method != "dora":
            continue
        r, s = manifest["sizes"]["ranks"][j], manifest["parameters"]["scalings"][j]
        A, B = inputs["A_stack"][j, :r].astype(np.float64), inputs["B_stack"][j, :, :r].astype(np.float64)
        g = inputs["magnitude"][j] / np.linalg.norm(W0 + s * B @ A, axis=0)          # should be axis=1
        out["dora_scale"][j] = g
        rows = slots == j
        out["y"][rows] = base[rows] + inputs["bias"] + (g - 1) * base[rows] + g * out["expand"][rows]
    return out


@pytest.mark.parametrize("kernel, case, tokens_of_slot, results", [
    (_rslora_as_plain_lora, "multi-bgmv-lora-float32", 1, ("expand", "y")),
    (_negative_index_wraps, "multi-bgmv-lora-float16", -1, ("expand", "shrink", "y")),
    (_dora_norm_over_outputs, "multi-bgmv-lora-dora-float32", None, ("dora_scale", "y")),
])
def test_a_wrong_kernel_fails_naming_the_case_and_element(kernel, case, tokens_of_slot, results):
    out = io.StringIO()
    assert run_report(COMMITTED, runners=[Runner("wrong-kernel", kernel)], names=[case], out=out) is False
    line = next(line for line in out.getvalue().splitlines() if line.startswith(case))
    assert " fail " in line
    slots = read_case(COMMITTED, case).inputs["token_slots"]
    for result in results:
        found = re.search(rf"{result}: worst at \[(\d+), (\d+)\]: .*error/bound ([0-9.e+]+)\)", line)
        assert found, (result, line)
        row, ratio = int(found.group(1)), float(found.group(3))
        assert ratio > 10.0
        if result == "dora_scale":
            assert row in (1, 2)                        # a DoRA slot, not the LoRA slot 0
        elif tokens_of_slot is not None:
            assert slots[row] == tokens_of_slot         # the worst element is a token of the broken slot
