"""The adapter artifact checker (refpeft_onnx.artifact_check, `refpeft conformance onnx`) on right and wrong artifacts.

A tiny random Llama saved by transformers (head_dim 16, so the genai model builder's CPU attention
runs it too) with PEFT adapters saved by PEFT: a LoRA on all seven projections with a rank and an
alpha pattern (per-module scales 4, 2 and 0.75), and a DoRA. refpeft's own unmerged exports must
pass; each defect a converter could make, written into a copy of refpeft's .onnx_adapter file,
must fail and be named by the hypothesis that fits, and only by it.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

from refpeft.cli import main
from refpeft.errors import FormatError

pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'refpeft[onnx]'")
torch = pytest.importorskip("torch", reason="transformers + PEFT on torch write the artifacts checked here")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from refpeft_onnx.adapter_files import read_onnx_adapter, write_onnx_adapter  # noqa: E402
from refpeft_onnx.artifact_check import check_artifacts, name_key  # noqa: E402
from tests.peft_peers import tiny_llama, write_adapters  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=96, rms_norm_eps=1e-6, tie_word_embeddings=False)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False,
                                    rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\.mlp\.down_proj": 3.0}),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                                    init_lora_weights=False),
}


def _save_tokenizer(folder):
    """A word-level tokenizer, so that tools which insist on one (the genai model builder) find it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(TINY["vocab_size"])}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", bos_token="t1",
                                         eos_token="t2").save_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """base/, lora/, dora/ written by transformers and PEFT; onnx-NAME/ by `refpeft export --unmerged`."""
    root = tmp_path_factory.mktemp("artifacts")
    base = tiny_llama(TINY)
    base.save_pretrained(root / "base")
    _save_tokenizer(root / "base")
    write_adapters(root, base, ADAPTER_CONFIGS)
    for name in ADAPTER_CONFIGS:
        assert main(["export", str(root / name), "--base", str(root / "base"), "--unmerged",
                     "-o", str(root / f"onnx-{name}")]) == 0
    return root


def _check(folders, name, tensors=None, tmp_path=None):
    """Check refpeft's export of adapter `name`, with its .onnx_adapter replaced by `tensors` when given."""
    adapter_file = folders / f"onnx-{name}" / "adapters" / f"{name}.onnx_adapter"
    if tensors is not None:
        adapter_file = write_onnx_adapter(tmp_path / "wrong.onnx_adapter", tensors)
    return check_artifacts(folders / f"onnx-{name}" / "model.onnx", adapter_file, folders / name, folders / "base")


def _tensors(folders, name):
    return read_onnx_adapter(folders / f"onnx-{name}" / "adapters" / f"{name}.onnx_adapter")


@pytest.mark.parametrize("name", sorted(ADAPTER_CONFIGS))
def test_refpeft_own_unmerged_exports_pass(folders, name, capsys):
    model = folders / f"onnx-{name}"
    assert main(["conformance", "onnx", str(model / "model.onnx"), str(model / "adapters" / f"{name}.onnx_adapter"),
                 "--peft", str(folders / name), "--base", str(folders / "base")]) == 0
    assert "AGREES with the PEFT adapter" in capsys.readouterr().out


def _diagnosed(report, expected: str) -> None:
    assert not report.passed and not report.result.fits
    assert report.diagnosis and all(h.startswith(expected) for h in report.diagnosis), report.format()


def test_a_scale_left_at_one_is_named(folders, tmp_path):
    tensors = {n: np.ones_like(v) if n.endswith(".lora_scaling") else v for n, v in _tensors(folders, "lora").items()}
    _diagnosed(_check(folders, "lora", tensors, tmp_path), "scale not folded")


def test_a_scale_folded_into_B_and_kept_as_an_input_is_named(folders, tmp_path):
    tensors = _tensors(folders, "lora")
    twice = {n: v * tensors[n.replace(".lora_B_t", ".lora_scaling")] if n.endswith(".lora_B_t") else v
             for n, v in tensors.items()}
    _diagnosed(_check(folders, "lora", twice, tmp_path), "scale folded twice")


def test_an_ignored_rank_and_alpha_pattern_is_named(folders, tmp_path):
    default = np.float32(8 / 4)                        # lora_alpha / r of the config's top level
    tensors = {n: np.full_like(v, default) if n.endswith(".lora_scaling") else v
               for n, v in _tensors(folders, "lora").items()}
    _diagnosed(_check(folders, "lora", tensors, tmp_path), "rank/alpha pattern ignored")


def test_a_dora_file_without_its_magnitude_is_named(folders, tmp_path):
    tensors = {n: v for n, v in _tensors(folders, "dora").items() if not n.endswith(".dora_scale")}
    report = _check(folders, "dora", tensors, tmp_path)
    _diagnosed(report, "DoRA magnitude dropped")
    assert any("keep their defaults" in note and "dora_scale" in note for note in report.notes)


def test_transposed_factors_are_a_defect_and_fit_transposed_back(folders, tmp_path, capsys):
    tensors = {n: np.ascontiguousarray(v.T) if n.endswith(("lora_A_t", "lora_B_t")) else v
               for n, v in _tensors(folders, "lora").items()}
    report = _check(folders, "lora", tensors, tmp_path)
    assert not report.passed and report.result.fits        # fed transposed back, the values are right
    assert any(d.startswith("A/B transposed") for d in report.defects)
    model = folders / "onnx-lora" / "model.onnx"
    assert main(["conformance", "onnx", str(model), str(tmp_path / "wrong.onnx_adapter"), "--peft",
                 str(folders / "lora"), "--base", str(folders / "base")]) == 2
    assert "DISAGREES with the PEFT adapter: A/B transposed" in capsys.readouterr().out


def test_names_that_are_not_the_graphs_inputs_are_a_defect(folders, tmp_path):
    # Olive's convert-adapters style: PEFT's module names, .weight, no _t
    tensors = {n.replace("_t", ".weight"): v for n, v in _tensors(folders, "lora").items()}
    report = _check(folders, "lora", tensors, tmp_path)
    assert not report.passed and report.result.fits
    assert any("not inputs of the graph" in d and "renamed" in d for d in report.defects)
    assert name_key("model.layers.1.self_attn.v_proj.lora_A.weight") == \
        name_key("model.layers.1.attn.v_proj.lora_A.MatMul.weight") == \
        name_key("model.layers.1.self_attn.v_proj.lora_A_t") == ("layers", "1", "v_proj", "A")


def test_no_adapter_fed_is_named(folders):
    report = check_artifacts(folders / "onnx-lora" / "model.onnx", None, folders / "lora", folders / "base")
    assert report.diagnosis == ["no adapter applied"]


def test_bad_inputs_are_refused_with_refpeft_errors(folders, tmp_path, capsys):
    model = folders / "onnx-lora" / "model.onnx"
    with pytest.raises(FormatError, match="no such file"):
        check_artifacts(model, tmp_path / "missing.onnx_adapter", folders / "lora", folders / "base")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), tmp_path / "identity.onnx")
    assert main(["conformance", "onnx", str(tmp_path / "identity.onnx"), "--peft", str(folders / "lora"),
                 "--base", str(folders / "base")]) == 2
    assert "not a decoder" in capsys.readouterr().err


def test_the_genai_model_builder_drops_doras_magnitude(folders, tmp_path):
    """conformance/FINDINGS.md G-5, G-6: the builder bakes the adapter into the graph; LoRA with rank and alpha
    patterns is right, DoRA comes out as plain LoRA."""
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx_ir")
    for name in ("lora", "dora"):
        out = tmp_path / f"builder-{name}"
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(folders / "base"),
                        "-i", str(folders / "base"), "-o", str(out), "-p", "fp32", "-e", "cpu",
                        "-c", str(tmp_path / "cache"), "--extra_options", f"adapter_path={folders / name}"],
                       cwd=tmp_path, check=True, capture_output=True)
        report = check_artifacts(out / "model.onnx", None, folders / name, folders / "base")
        if name == "lora":
            assert report.passed, report.format()
        else:
            _diagnosed(report, "DoRA magnitude dropped")
