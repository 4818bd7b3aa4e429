"""Conformance suite: reproducible vectors, the committed set is current, peers pass, a wrong implementation fails."""

from __future__ import annotations

import io
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from refpeft.cli import main
from refpeft.conformance.catalogue import CASES
from refpeft.conformance.check import Summary, Unsupported, check_directory, load_implementation
from refpeft.conformance.exact import exact_array, exact_matmul, exact_sum, exact_vector_norm
from refpeft.conformance.families import FAMILIES, missing_requirements
from refpeft.conformance.generate import generate
from refpeft.conformance.report import run_report
from refpeft_peers import Runner
from refpeft_peers.refpeft_self import run as refpeft_run
from refpeft.conformance.vectors import read_case, read_index
from refpeft.errors import ConfigError, FormatError

COMMITTED = Path(__file__).resolve().parent.parent / "conformance" / "vectors"


# cases this environment can generate (exported-graph cases need the onnx extra)
GENERABLE = [c for c in CASES if not missing_requirements(c)]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("vectors")
    generate(directory, cases=GENERABLE)
    return directory


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_committed_vectors_equal_freshly_generated_ones(fresh):
    committed, generated = _files(COMMITTED), _files(fresh)
    if len(GENERABLE) == len(CASES):
        assert sorted(committed) == sorted(generated), "case files differ: run `refpeft conformance generate`"
    else:   # without the onnx extra: the index differs, every case file generated must match
        generated.pop("index.json")
    stale = [name for name in generated if committed.get(name) != generated[name]]
    assert not stale, f"committed vectors are out of date: {stale[:5]}"


def test_generate_twice_is_byte_identical(tmp_path):
    families = {}
    for case in GENERABLE:   # one case of each family
        families.setdefault(case.family, case)
    subset = list(families.values())
    generate(tmp_path / "one", cases=subset)
    generate(tmp_path / "two", cases=subset)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_every_family_has_a_case_and_the_set_is_small():
    assert {c.family for c in CASES} == set(FAMILIES)
    assert len({c.name for c in CASES}) == len(CASES)
    size = sum(p.stat().st_size for p in COMMITTED.iterdir())
    assert size < 8 * 2**20, f"committed vectors take {size / 2**20:.1f} MiB"


def test_manifest_describes_every_tensor(fresh):
    for name in read_index(fresh):
        case = read_case(fresh, name)
        m = case.manifest
        assert set(m["inputs"]) == set(case.inputs) and set(m["results"]) == set(case.expected)
        for result, spec in m["results"].items():
            assert (spec["check"] == "bound") == (result in case.bounds)
            if spec["check"] == "json":                 # a JSON value in the manifest, no tensor
                assert case.expected[result] == spec["value"] and "tensor" not in spec
                continue
            assert list(case.expected[result].shape) == spec["shape"]
        for inp, spec in m["inputs"].items():
            if "json" in spec:
                assert case.inputs[inp] == spec["json"] and "tensor" not in spec
                continue
            assert str(case.inputs[inp].dtype) == spec["dtype"]
            if m["method"] not in ("quant", "qlora") and not spec["dtype"].startswith("int"):
                # 4-bit states (uint8 codes, float32 scales), QLoRA's float32 adapters and the slot
                # indices of multi-adapter batches (int32) keep their dtypes
                assert spec["dtype"] == m["dtype"], (name, inp)


def test_refpeft_in_low_precision_passes_every_case():
    reports = check_directory(refpeft_run, COMMITTED, implementation="refpeft")
    bad = [(r.case, r.status, r.message) for r in reports if r.status not in ("pass", "unsupported")]
    assert not bad


def test_peft_passes_every_expected_case_and_the_bounds_are_tight():
    pytest.importorskip("peft", reason="HF PEFT is the peer checked here")
    from refpeft_peers.peft_torch import implementations

    runner = implementations()[0]
    reports = check_directory(runner.run, COMMITTED, implementation=runner.name,
                              known_deviations=runner.known_deviations)
    assert Summary.of(reports).ok, [(r.case, r.message) for r in reports if r.status in ("fail", "error")]
    # tightness: on every float32 case PEFT uses more than 1/1000 of the rigorous bound (4e-3 measured)
    f32 = {r.case: r.worst_ratio for r in reports if r.dtype == "float32" and r.status == "pass"}
    assert len(f32) >= 30 and min(f32.values()) > 1e-3, sorted(f32.items(), key=lambda item: item[1])[:3]


def perturbed(manifest: dict, inputs: dict) -> dict | None:
    """refpeft with one wrong element per result: the kind of bug a conformance suite must catch."""
    out = refpeft_run(manifest, inputs)
    wrong = {}
    for name, value in out.items():
        value = np.array(value, copy=True)
        flat = value.reshape(-1)
        if value.dtype.kind == "f":
            flat[0] = flat[0] * (1 + 1e-3) + 1e-3
        else:
            flat[0] ^= 1
        wrong[name] = value
    return wrong


def test_a_perturbed_implementation_fails_with_a_clear_report():
    runner = Runner("perturbed", perturbed)
    names = [c.name for c in CASES if c.family in ("lora_forward", "adam_step")][:4]
    out = io.StringIO()
    assert run_report(COMMITTED, runners=[runner], names=names, out=out) is False
    text = out.getvalue()
    assert "UNEXPECTED FAILURES" in text
    for name in names:
        line = next(line for line in text.splitlines() if line.startswith(name))
        assert " fail " in line
        ratio = float(line.split()[3])
        assert ratio > 1.0


def test_check_command_runs_an_implementation_given_as_module_function(capsys):
    case = "lora-forward-basic-float32"
    assert main(["conformance", "check", "--impl", "refpeft_peers.refpeft_self:run",
                 "--vectors", str(COMMITTED), "--case", case]) == 0
    assert "pass" in capsys.readouterr().out
    assert main(["conformance", "check", "--impl", "test_conformance:perturbed",
                 "--vectors", str(COMMITTED), "--case", case]) == 1
    assert "fail" in capsys.readouterr().out


def test_unsupported_and_crashing_implementations_are_reported_not_raised():
    def unsupported(manifest, inputs):
        raise Unsupported("not my method")

    def crashing(manifest, inputs):
        raise RuntimeError("boom")

    names = ["lora-forward-basic-float32"]
    assert check_directory(unsupported, COMMITTED, implementation="u", names=names)[0].status == "unsupported"
    report = check_directory(crashing, COMMITTED, implementation="c", names=names)[0]
    assert report.status == "error" and "boom" in report.message
    missing = check_directory(lambda m, i: {}, COMMITTED, implementation="m", names=names)[0]
    assert missing.status == "fail" and "not returned" in missing.message


def test_known_deviation_is_shown_and_not_counted_as_failure():
    names = ["lora-forward-basic-float32"]
    reports = check_directory(perturbed, COMMITTED, implementation="p", names=names,
                              known_deviations={names[0]: "FINDINGS.md#example"})
    assert reports[0].status == "known-deviation" and Summary.of(reports).ok


def test_a_corrupted_vector_file_is_refused(tmp_path):
    case = "lora-forward-basic-float32"
    for suffix in (".json", ".safetensors"):
        (tmp_path / f"{case}{suffix}").write_bytes((COMMITTED / f"{case}{suffix}").read_bytes())
    data = bytearray((tmp_path / f"{case}.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / f"{case}.safetensors").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="sha256"):
        read_case(tmp_path, case)


def test_load_implementation_refuses_bad_specs():
    for spec in ("nocolon", "no_such_module_xyz:f", "json:no_such_function"):
        with pytest.raises(ConfigError):
            load_implementation(spec)


def test_index_lists_every_case_with_its_manifest():
    index = json.loads((COMMITTED / "index.json").read_text())
    assert [e["case"] for e in index["cases"]] == [c.name for c in CASES]


# ---------------------------------------------------------------- the exact (machine-independent) reductions

def test_exact_matmul_is_the_correctly_rounded_product():
    rng = np.random.default_rng(0)
    P, Q = rng.standard_normal((4, 7)) * 1e3, rng.standard_normal((7, 3))
    truth = [[float(sum(Fraction(P[i, l]) * Fraction(Q[l, j]) for l in range(7))) for j in range(3)] for i in range(4)]
    assert np.array_equal(exact_matmul(P, Q), np.array(truth))


def test_exact_sum_and_norm_are_correctly_rounded():
    values = np.array([1e16, 1.0, -1e16, 1.0, 3e-17])
    assert exact_sum(values) == 2.0 + 3e-17
    v = np.array([3.0, 4.0, 1e-9])
    assert exact_vector_norm(v[None, :], axis=-1)[0] == math.sqrt(float(Fraction(3) ** 2 + 16 + Fraction(1e-9) ** 2))


def test_exact_array_refuses_machine_dependent_numpy_calls():
    a = exact_array(np.ones((2, 2)))
    with pytest.raises(ConfigError):
        np.dot(a, a)
    with pytest.raises(ConfigError):
        np.cumsum(a)
    assert type(a @ a).__name__ == "ExactArray"


def test_bitsandbytes_matches_every_bit_exact_case_of_its_semantics():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is the peer checked here")
    from refpeft_peers.bitsandbytes_cpu import implementations

    runner = implementations()[0]
    reports = check_directory(runner.run, COMMITTED, implementation=runner.name,
                              known_deviations=runner.known_deviations)
    assert Summary.of(reports).ok, [(r.case, r.message, r.differing_bytes) for r in reports if r.status != "pass"]
    assert sum(r.status == "pass" for r in reports) >= 8
    # each known deviation is real: the bytes differ (else the entry is stale and must go)
    assert all(r.status == "pass" or r.differing_bytes for r in reports if r.case in runner.known_deviations)


def test_onnxruntime_matches_the_cases_it_covers():
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is the peer checked here")
    from refpeft_peers.onnxruntime import implementations

    runner = implementations()[0]
    reports = check_directory(runner.run, COMMITTED, implementation=runner.name,
                              known_deviations=runner.known_deviations)
    assert Summary.of(reports).ok, [(r.case, r.message) for r in reports if r.status in ("fail", "error")]
    assert any(r.status == "pass" for r in reports)
    assert all(r.status == "known-deviation" for r in reports if r.case in runner.known_deviations)


def test_report_command_prints_a_table_and_a_summary(capsys):
    assert main(["conformance", "report", "--vectors", str(COMMITTED), "--runner", "refpeft_self",
                 "--case", "lora-forward-basic-float32", "--case", "nf4-quantize-bs64-bnb-cuda"]) == 0
    out = capsys.readouterr().out
    assert "== refpeft-numpy ==" in out and "nf4-quantize-bs64-bnb-cuda" in out and "all expected passes pass" in out
    assert main(["conformance", "report", "--runner", "no_such_runner"]) == 2


def test_check_reads_results_written_by_any_implementation(tmp_path, capsys):
    """The files-only protocol: NAME.safetensors of results; cases without a file are unsupported."""
    import safetensors.numpy

    case = read_case(COMMITTED, "lora-forward-basic-float32")
    results = refpeft_run(case.manifest, case.inputs)
    (tmp_path / f"{case.name}.safetensors").write_bytes(safetensors.numpy.save({"y": np.asarray(results["y"])}))
    assert main(["conformance", "check", "--results", str(tmp_path), "--vectors", str(COMMITTED)]) == 0
    out = capsys.readouterr().out
    assert case.name in out and "1 pass" in out and "unsupported" in out
    wrong = np.asarray(results["y"]).copy()
    wrong[0, 0, 0] += 1.0
    (tmp_path / f"{case.name}.safetensors").write_bytes(safetensors.numpy.save({"y": wrong}))
    assert main(["conformance", "check", "--results", str(tmp_path), "--vectors", str(COMMITTED),
                 "--case", case.name]) == 1
    assert "worst at [0, 0, 0]" in capsys.readouterr().out


def test_the_format_is_readable_from_the_specification_alone():
    """conformance/README.md is enough: JSON, SHA-256, the safetensors header, raw little-endian data."""
    import hashlib
    import struct

    index = json.loads((COMMITTED / "index.json").read_text())
    entry = next(e for e in index["cases"] if e["case"] == "lora-backward-bias-dropout-float32")
    manifest = json.loads((COMMITTED / entry["manifest"]).read_text())
    data = (COMMITTED / manifest["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest["sha256"] == entry["sha256"]
    (header_length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_length])
    assert header.pop("__metadata__") == {"format": "refpeft-conformance/1"}
    raw = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "U8": "u1"}

    def tensor(name: str) -> np.ndarray:
        info = header[name]
        begin, end = info["data_offsets"]
        return np.frombuffer(data[8 + header_length + begin: 8 + header_length + end],
                             dtype=raw[info["dtype"]]).reshape(info["shape"])

    inputs = {n: tensor(spec["tensor"]).astype(np.float64) for n, spec in manifest["inputs"].items()}
    s = manifest["parameters"]["scaling"]
    xd = inputs["x"] * inputs["dropout_mask"]
    g = s * inputs["dy"] @ inputs["B"]                         # the README's definition, by hand
    expected_dA = g.reshape(-1, g.shape[-1]).T @ xd.reshape(-1, xd.shape[-1])   # dA = g^T xd over all rows
    spec = manifest["results"]["dA"]
    err = np.abs(expected_dA - tensor(spec["tensor"]))
    assert spec["check"] == "bound" and np.all(err <= tensor(spec["bound"]))
