"""ONNX export of PEFT prompt-learning adapters (refpeft_onnx.prefix_graph) run by ONNX Runtime and onnxruntime-genai.

A tiny random Llama (GQA, untied head) is saved by transformers, with PROMPT_TUNING, P_TUNING (MLP
encoder) and PREFIX_TUNING (with projection) adapters trained-looking and saved by PEFT itself.
Each is exported the way a user would (`refpeft export ADAPTER --base MODEL -o DIR`): the export's
own verification already compares ONNX Runtime's logits with refpeft's float64 decoder running the
adapter as PEFT does (one call and cached calls, a left-padded row); here the written folder's
logits are compared again, and the 24-token greedy continuation through onnxruntime-genai must
equal refpeft's greedy decode with the adapter (refpeft.model.generate, checked against PEFT in
tests/test_generate_prompt_learning_command.py), merged and unmerged (switching adapters, and none).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from refpeft.cli import main
from refpeft.commands.generate import with_prompt_learning
from refpeft.errors import ConfigError
from refpeft.model.decoder import Model, forward
from refpeft.model.generate import generate
from refpeft.model.load import load_model
from refpeft.model.prompt_tuning import write_prompt_tuning

ort = pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'refpeft[onnx]'")
og = pytest.importorskip("onnxruntime_genai", reason="the onnx extra: pip install 'refpeft[onnx]'")
torch = pytest.importorskip("torch", reason="PEFT on torch writes the adapter folders")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from refpeft_onnx.adapter_files import read_onnx_adapter  # noqa: E402
from refpeft_onnx.decoder_export import export_decoder, load_base, read_adapters  # noqa: E402
from refpeft_onnx.decoder_verify import float64_model, random_batch, reference_logits, run_cached  # noqa: E402
from refpeft_onnx.genai_run import GenaiModel  # noqa: E402
from refpeft_onnx.prefix_graph import PREFIX_NAMES  # noqa: E402
from tests.peft_peers import tiny_llama, write_adapters, write_base_and_adapters  # noqa: E402
from tests.test_export_decoder import PROMPT, TINY  # noqa: E402

NEW_TOKENS = 24
ADAPTER_CONFIGS = {
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "ptuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                encoder_reparameterization_type="MLP", encoder_hidden_size=16),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True,
                                              encoder_hidden_size=16),
}


def _perturb(name: str, p: torch.Tensor) -> None:
    """Trained-looking encoder tensors: N(0, 1) weights make each method's prompt change the continuation."""
    p.copy_(torch.randn_like(p))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt-learning")
    write_base_and_adapters(root, TINY, ADAPTER_CONFIGS, perturb=_perturb)
    return root


def _refpeft_greedy(folders, adapter: str | None) -> list[int]:
    config, weights, _ = load_model(folders / "base")
    model = Model(config, weights)
    if adapter is not None:
        model = with_prompt_learning(model, str(folders / adapter), dtype="float32")
    [new] = generate(model, [PROMPT], max_new_tokens=NEW_TOKENS)
    return new


@pytest.fixture(scope="module")
def expected(folders):
    tokens = {adapter: _refpeft_greedy(folders, adapter) for adapter in [None, *ADAPTER_CONFIGS]}
    assert len({tuple(t) for t in tokens.values()}) == len(tokens)   # every adapter changes the text
    return tokens


def _written_logits_agree(out, model, adapter, feeds=None) -> None:
    """The written model.onnx's cached logits equal refpeft's float64 decoder with `adapter`, within the bound."""
    model64 = float64_model(model)
    adapted = model64 if adapter is None else adapter.on(model64)
    ids, mask, positions = random_batch(model.config.vocab_size, seed=5)
    if adapted.prompt is not None:                                   # PEFT numbers the pads too
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    expected, bound = reference_logits(adapted, ids, mask, positions, dtype="float32")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = run_cached(session, ids, mask, positions, feeds or {}, model, "float32")
    real = mask == 1
    assert np.max(np.abs(logits[real] - expected[real])) <= bound
    assert np.max(np.abs(expected[real])) > 100 * bound              # the bound is far below the logits


@pytest.mark.parametrize("name", sorted(ADAPTER_CONFIGS))
def test_a_merged_export_runs_the_adapter_in_ort_and_genai(folders, expected, tmp_path, name):
    out = tmp_path / name
    assert main(["export", str(folders / name), "--base", str(folders / "base"), "-o", str(out)]) == 0
    model, _ = load_base(folders / "base")
    [adapter] = read_adapters(model, [str(folders / name)]).values()
    _written_logits_agree(out, model, adapter)
    assert GenaiModel(out).generate(PROMPT, max_new_tokens=NEW_TOKENS) == expected[name]


def test_one_unmerged_export_switches_between_prompt_adapters_and_none(folders, expected, tmp_path):
    out = tmp_path / "unmerged"
    names = sorted(ADAPTER_CONFIGS)
    assert main(["export", *(str(folders / n) for n in names), "--base", str(folders / "base"), "--unmerged",
                 "-o", str(out)]) == 0
    model, _ = load_base(folders / "base")
    adapters = read_adapters(model, [str(folders / n) for n in names])
    c = model.config
    for name in names:
        tensors = read_onnx_adapter(out / "adapters" / f"{name}.onnx_adapter")
        k = adapters[name].length
        assert sorted(tensors) == sorted(t % i for i in range(c.num_hidden_layers) for t in PREFIX_NAMES)
        assert {v.shape for v in tensors.values()} == {(c.num_key_value_heads, k, c.head_dim)}
        _written_logits_agree(out, model, adapters[name], tensors)
    _written_logits_agree(out, model, None)
    context = json.loads((out / "genai_config.json").read_text())["model"]["context_length"]
    assert context == TINY["max_position_embeddings"] - max(a.length for a in adapters.values())
    genai = GenaiModel(out)
    for adapter in [*names, None, names[0]]:                 # back and forth, and to no adapter
        assert genai.generate(PROMPT, max_new_tokens=NEW_TOKENS, adapter=adapter) == expected[adapter], adapter


def test_a_float16_unmerged_export_is_verified_and_runs_in_genai(folders, expected, tmp_path, capsys):
    out = tmp_path / "fp16"
    assert main(["export", str(folders / "prefix"), str(folders / "prompt"), "--base", str(folders / "base"),
                 "--unmerged", "--dtype", "float16", "-o", str(out)]) == 0
    assert "agrees with the refpeft reference: 6 runs" in capsys.readouterr().out
    genai = GenaiModel(out)
    for adapter in ("prefix", "prompt"):
        tokens = genai.generate(PROMPT, max_new_tokens=NEW_TOKENS, adapter=adapter)
        # float16 rounding may flip a near tie, so only the opening tokens are held to float32's
        assert len(tokens) == NEW_TOKENS and tokens[:4] == expected[adapter][:4], adapter


def test_a_prompt_adapter_added_to_an_unmerged_export_later_runs_in_genai(folders, expected, tmp_path):
    out = tmp_path / "later"
    model, tokenizer = load_base(folders / "base")
    export_decoder(out, model, tokenizer, read_adapters(model, [str(folders / "prefix")]), form="unmerged")
    assert main(["export-adapter", str(folders / "ptuning"), "--base", str(folders / "base"),    # k = 3, not 5
                 "--model", str(out / "model.onnx"), "-o", str(out / "adapters" / "ptuning.onnx_adapter")]) == 0
    genai = GenaiModel(out)
    assert genai.generate(PROMPT, max_new_tokens=NEW_TOKENS, adapter="ptuning") == expected["ptuning"]
    assert genai.generate(PROMPT, max_new_tokens=NEW_TOKENS, adapter="prefix") == expected["prefix"]


def test_virtual_tokens_are_the_prefix_they_leave_in_the_cache(folders):
    """The claim the export rests on: refpeft's decoder with prompt tuning's P in front gives the
    real tokens the logits of the plain decoder whose past is P's keys and values (positions after k)."""
    model, _ = load_base(folders / "base")
    [adapter] = read_adapters(model, [str(folders / "prompt")]).values()
    model64, k = float64_model(model), adapter.length
    ids = np.asarray([PROMPT])
    with_prompt = forward(adapter.on(model64), ids, record=False)[0][:, k:]
    past = [(K[None], V[None]) for K, V in adapter.keys_values]
    as_past = forward(model64, ids, attention_mask=np.ones((1, k + ids.shape[1]), np.int64),
                      position_ids=np.arange(k, k + ids.shape[1])[None], past=past, record=False)[0]
    np.testing.assert_allclose(with_prompt, as_past, rtol=1e-12, atol=1e-12)


def test_prompt_and_lora_adapters_are_not_mixed(folders, tmp_path):
    lora = tmp_path / "lora"
    write_adapters(tmp_path, tiny_llama(TINY), {"lora": lambda: peft.LoraConfig(r=2, target_modules=["q_proj"])})

    model, tokenizer = load_base(folders / "base")
    with pytest.raises(ConfigError, match="cannot share one export"):
        read_adapters(model, [str(folders / "prompt"), str(lora)])
    with pytest.raises(ConfigError, match="merged graph folds in one adapter"):
        export_decoder(tmp_path / "x", model, tokenizer, read_adapters(model, [str(folders / "prompt"),
                                                                               str(folders / "prefix")]))
    assert not (tmp_path / "x").exists()


def test_a_prompt_folder_of_the_wrong_width_is_refused_and_nothing_written(folders, tmp_path, capsys):
    write_prompt_tuning(tmp_path / "narrow", np.zeros((3, 5)), num_attention_heads=4, num_layers=2)
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "narrow"), "--base", str(folders / "base"), "-o", str(out)]) == 2
    assert "prompt embeddings have shape (3, 5)" in capsys.readouterr().err and not out.exists()
