"""adapter_config cases: refpeft and PEFT pass, and a converter's usual mistakes fail naming the case and module."""

from __future__ import annotations

import copy
import io
import json
import re
from pathlib import Path

import pytest

from refpeft.cli import main
from refpeft.conformance.check import check_directory, json_difference
from refpeft.conformance.report import run_report
from refpeft.conformance.vectors import read_case, read_index
from refpeft_peers import Runner
from refpeft_peers.refpeft_self import run as refpeft_run

COMMITTED = Path(__file__).resolve().parent.parent / "conformance" / "vectors"
CONFIG = [name for name in read_index(COMMITTED) if name.startswith("config-")]


def test_cases_are_json_only_and_keep_the_files_key_order():
    case = read_case(COMMITTED, "config-rank-alpha-pattern")
    assert case.manifest["results"]["modules"]["check"] == "json" and not case.bounds
    assert list(json.loads(case.inputs["adapter_config"])["rank_pattern"]) == [
        "proj", "q_proj", "model.layers.0.self_attn.q_proj", r"layers\.2\..*_proj"]
    modules = case.expected["modules"]
    # "proj" matches no path (a key matches at a "." boundary), the first matching key wins over a later exact one
    assert modules["model.layers.0.self_attn.q_proj"]["r"] == 4
    assert modules["model.layers.2.self_attn.k_proj"]["r"] == 2
    assert {n: read_case(COMMITTED, n).expected.get("refused") for n in CONFIG if "refused" in n} == \
        {n: True for n in CONFIG if "refused" in n}


def test_refpeft_and_peft_pass_every_config_case():
    pytest.importorskip("peft", reason="HF PEFT applying the config is the peer checked here")
    from refpeft_peers.peft_torch import implementations

    for impl in (refpeft_run, implementations()[0].run):
        reports = check_directory(impl, COMMITTED, implementation="impl", names=CONFIG)
        assert [r.status for r in reports] == ["pass"] * len(CONFIG), [(r.case, r.message) for r in reports]


def _dropping_alpha_pattern(manifest: dict, inputs: dict) -> dict:
    """A converter that ignores alpha_pattern (Olive's and vLLM's PEFT-helper bug)."""
    config = json.loads(inputs["adapter_config"])
    config.pop("alpha_pattern", None)
    return refpeft_run(manifest, {**inputs, "adapter_config": json.dumps(config)})


def _rank_keys_as_exact_names(manifest: dict, inputs: dict) -> dict:
    """A converter that applies a rank_pattern key only to the module whose full path equals it."""
    out = copy.deepcopy(refpeft_run(manifest, inputs))
    config = json.loads(inputs["adapter_config"])
    for path, record in out.get("modules", {}).items():
        if record["targeted"]:
            record["r"] = config.get("rank_pattern", {}).get(path, config["r"])
            alpha = record["alpha"]
            record["scaling"] = alpha / record["r"] ** (0.5 if config.get("use_rslora") else 1)
    return out


@pytest.mark.parametrize("resolver, case, module, field, value, expected", [
    (_dropping_alpha_pattern, "config-rank-alpha-pattern", "model.layers.0.self_attn.v_proj", "alpha", "16", "32"),
    (_dropping_alpha_pattern, "config-rslora-patterns", "model.layers.1.self_attn.q_proj", "alpha", "8", "5"),
    (_rank_keys_as_exact_names, "config-rank-alpha-pattern", "model.layers.0.self_attn.q_proj", "r", "16", "4"),
    (_rank_keys_as_exact_names, "config-dora-bias-all", "model.layers.0.mlp.gate_proj", "r", "8", "2"),
])
def test_a_wrong_resolver_fails_naming_the_case_module_and_field(resolver, case, module, field, value, expected):
    out = io.StringIO()
    assert run_report(COMMITTED, runners=[Runner("wrong-resolver", resolver)], names=[case], out=out) is False
    line = next(line for line in out.getvalue().splitlines() if line.startswith(case))
    assert " fail " in line
    assert re.search(rf"modules: at \['{re.escape(module)}'\]\['{field}'\]: {value}, expected {expected}", line), line


def test_json_values_compare_as_json_and_say_where_they_differ():
    assert json_difference({"a": [1, 2.0], "b": None}, {"a": [1.0, 2], "b": None}) is None
    assert json_difference({"a": {"x": True}}, {"a": {"x": 1}}) == "at ['a']['x']: True, expected 1"
    assert json_difference({"a": 1}, {"a": True}) == "at ['a']: 1, expected True"
    assert json_difference({"a": 1}, {"a": 1, "b": 2}) == "key 'b' missing"
    assert json_difference([1, 2], [1, 2, 3]) == "[1, 2], expected a list of 3"


def test_check_reads_json_results_written_by_any_implementation(tmp_path, capsys):
    case = read_case(COMMITTED, "config-layers-pattern")
    wrong = copy.deepcopy(case.expected)
    wrong["modules"]["h.1.attn.c_attn"]["targeted"] = False
    (tmp_path / "config-layers-pattern.json").write_text(json.dumps(wrong))
    assert main(["conformance", "check", "--results", str(tmp_path), "--vectors", str(COMMITTED),
                 "--case", "config-layers-pattern"]) == 1
    assert "at ['h.1.attn.c_attn']['targeted']: False, expected True" in capsys.readouterr().out
