"""export_forward cases for every ONNX branch kind: ONNX Runtime passes, a runtime written from the README passes,
a wrong branch per kind fails naming the case and the element."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="exported-graph cases need the onnx extra")
pytest.importorskip("onnxruntime", reason="exported-graph cases need the onnx extra")

from refpeft.conformance.catalogue import CASES  # noqa: E402
from refpeft.conformance.check import Unsupported, check_directory  # noqa: E402
from refpeft.conformance.export_families import BRANCH_PREFIX  # noqa: E402
from refpeft.conformance.generate import generate  # noqa: E402
from refpeft.conformance.report import run_report  # noqa: E402
from refpeft.conformance.vectors import read_case  # noqa: E402
from refpeft.methods import method_spec  # noqa: E402
from refpeft_onnx.branches import BRANCHES  # noqa: E402
from refpeft_peers import Runner  # noqa: E402

COMMITTED = Path(__file__).resolve().parent.parent / "conformance" / "vectors"
EXPORT = [c for c in CASES if c.family == "export_forward"]
NAMES = [c.name for c in EXPORT]
UNMERGED = [c.name for c in EXPORT if c.options["form"] == "unmerged"]


def _kind(manifest: dict) -> str:
    return method_spec(manifest["options"]["method"]).onnx_branch


def test_every_branch_kind_and_both_ia3_sides_have_unmerged_and_merged_cases():
    kinds = {(method_spec(c.options["method"]).onnx_branch, c.options["form"]) for c in EXPORT}
    assert kinds == {(kind, form) for kind in BRANCHES for form in ("merged", "unmerged")}
    ia3 = {c.options["feedforward"] for c in EXPORT if c.options["method"] == "ia3"}
    assert ia3 == {False, True}
    for name in UNMERGED:   # the branch's swappable inputs ship with the case, under the branch's own names
        case = read_case(COMMITTED, name)
        given = {n.removeprefix(BRANCH_PREFIX) for n in case.inputs if n.startswith(BRANCH_PREFIX)}
        assert given == set(BRANCHES[_kind(case.manifest)].inputs), name
        assert all(case.inputs[BRANCH_PREFIX + n].dtype == np.float32 for n in given)


def test_committed_export_vectors_regenerate_byte_identically(tmp_path):
    generate(tmp_path, cases=EXPORT)
    for name in NAMES:
        for suffix in (".json", ".safetensors"):
            assert (tmp_path / f"{name}{suffix}").read_bytes() == (COMMITTED / f"{name}{suffix}").read_bytes(), name


def test_onnx_runtime_runs_every_exported_graph_within_its_bound():
    from refpeft_peers.onnxruntime import implementations

    runner = implementations()[0]
    reports = check_directory(runner.run, COMMITTED, implementation=runner.name, names=NAMES)
    assert [r.status for r in reports] == ["pass"] * len(NAMES), [(r.case, r.message) for r in reports]
    assert min(r.worst_ratio for r in reports) > 1e-3, sorted((r.worst_ratio, r.case) for r in reports)[:3]


def test_the_documentation_names_every_branch_input():
    readme = (COMMITTED.parent / "README.md").read_text()
    section = readme.split("## Exported graphs")[1].split("\n## ")[0]
    for kind, branch in BRANCHES.items():
        assert f"`{kind}`" in section, kind
        for name in branch.inputs:
            assert f"`branch.{name}`" in section, (kind, name)


# ---------------------------------------------------------------- a runtime written from conformance/README.md

def _readme_branch(manifest: dict, inputs: dict, *, wrong: str | None = None) -> dict:
    """y of an unmerged case from x, W0, [bias] and the branch.* inputs alone, in float32, as the
    README's "Exported graphs" section writes each kind; `wrong` names one deliberate mistake."""
    if manifest["options"]["form"] != "unmerged" or manifest["options"].get("nf4_blocksize"):
        raise Unsupported("unmerged float bases only")
    x, W0 = inputs["x"], inputs["W0"]
    b = inputs.get("bias", np.zeros(W0.shape[0], np.float32))
    t = {n.removeprefix(BRANCH_PREFIX): v for n, v in inputs.items() if n.startswith(BRANCH_PREFIX)}
    kind, k, d = _kind(manifest), W0.shape[1], W0.shape[0]
    if kind == "ia3-scaling":
        l_in = np.ones(k, np.float32) if wrong == "ia3-output-only" else t["ia3_input_scale"]
        if wrong == "ia3-bias-unscaled":
            return {"y": ((x * l_in) @ W0.T) * t["ia3_output_scale"] + b}
        return {"y": ((x * l_in) @ W0.T + b) * t["ia3_output_scale"]}
    if kind == "rotation":
        R = t["oft_rotation"]
        if wrong == "oft-transposed":
            R = np.swapaxes(R, -1, -2)
        m, bs = R.shape[0], R.shape[-1]
        blocks = x.reshape(-1, k // bs, 1, bs) @ (R if m > 1 else R[0])
        return {"y": blocks.reshape(x.shape) @ W0.T + b}
    if kind == "kronecker":
        w1, w2_t, s = t["lokr_w1"], t["lokr_w2_t"], t["lokr_scaling"]
        if wrong == "lokr-swapped":
            delta = np.kron(w2_t.T, w1)
            return {"y": x @ W0.T + (x @ delta.T) * s + b}
        X = x.reshape(-1, k // w2_t.shape[0], w2_t.shape[0])
        Y = w1 @ (X @ w2_t)
        return {"y": x @ W0.T + Y.reshape(*x.shape[:-1], d) * s + b}
    if kind == "shared-projections":
        a_t, b_t = inputs["vera_A"][:, :k].T, inputs["vera_B"][:d, :].T
        return {"y": x @ W0.T + t["vera_lambda_b"] * ((t["vera_lambda_d"] * (x @ a_t)) @ b_t) + b}
    v = ((x @ t["lora_A_t"]) * t["lora_scaling"]) @ t["lora_B_t"]
    if kind == "low-rank":
        return {"y": x @ W0.T + v + b}
    if kind == "low-rank-rescaled":
        return {"y": t["dora_scale"] * (x @ W0.T + v) + b}
    if wrong == "prediag-scales-the-sum":
        return {"y": (x @ W0.T + v) * t["prediag_D"] + b}
    return {"y": (x @ W0.T) * t["prediag_D"] + v + b}


def test_a_runtime_written_from_the_readme_passes_every_unmerged_float_case():
    reports = check_directory(_readme_branch, COMMITTED, implementation="readme", names=UNMERGED)
    ran = [r for r in reports if r.status != "unsupported"]
    assert [r.status for r in ran] == ["pass"] * len(ran) and len(ran) >= 10, [(r.case, r.message) for r in reports]
    assert {_kind(read_case(COMMITTED, r.case).manifest) for r in ran} == set(BRANCHES)


WRONG = {  # mistake -> the case it must fail
    "ia3-bias-unscaled": "export-ia3-output-unmerged-float32",
    "ia3-output-only": "export-ia3-input-unmerged-float32",
    "oft-transposed": "export-oft-unmerged-float32",
    "lokr-swapped": "export-lokr-unmerged-float32",
    "prediag-scales-the-sum": "export-prediag-unmerged-float32",
}


@pytest.mark.parametrize("mistake", sorted(WRONG))
def test_a_wrong_branch_fails_naming_the_case_and_element(mistake):
    case = WRONG[mistake]
    out = io.StringIO()
    runner = Runner("wrong-branch", lambda m, i: _readme_branch(m, i, wrong=mistake))
    assert run_report(COMMITTED, runners=[runner], names=[case], out=out) is False
    line = next(line for line in out.getvalue().splitlines() if line.startswith(case))
    assert " fail " in line
    found = re.search(r"y: worst at \[([\d, ]+)\]: .*error/bound ([0-9.e+]+|inf)\)", line)
    assert found and float(found.group(2)) > 10.0, line
