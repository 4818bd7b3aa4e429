"""`refpeft generate BASE --adapter DIR` with PEFT's PROMPT_TUNING, P_TUNING and PREFIX_TUNING folders,
against PeftModel.from_pretrained on the same folder in float64 (PEFT's forward, recomputed at every
step: tests/test_prompt_tuning.py says why not PEFT's generate)."""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.cli import main
from refpeft.commands.generate import with_prompt_learning
from refpeft.model.decoder import Model
from refpeft.model.generate import generate
from refpeft.model.generate import prompt_ids
from refpeft.model.load import load_model
from refpeft.model.p_tuning import write_p_tuning
from refpeft.model.prefix_tuning import prefix_init, write_prefix_tuning
from refpeft.model.prompt_tuning import write_prompt_tuning
from tests.test_prompt_tuning import peft_greedy_recomputed
from tests.test_train_command import FAMILY, base_folder, hf_model  # noqa: F401

torch = pytest.importorskip("torch", reason="PEFT on torch is the peer")
peft = pytest.importorskip("peft")

K, STEPS, TEXT = 3, 6, "say hello"


def _write(kind: str, folder, config):
    # Seeds whose continuations stay inside the word-level tokenizer's 36 ids (the model has 61) and
    # differ from the base model's, so the command can print them.
    rng = np.random.default_rng(1)
    if kind == "PREFIX_TUNING":
        table = 0.8 * prefix_init(config, K, seed=2)["embedding.weight"]
        return write_prefix_tuning(folder, table, config)
    prompt = rng.standard_normal((K, config.hidden_size))
    layout = dict(num_attention_heads=config.num_attention_heads, num_layers=config.num_hidden_layers)
    return (write_prompt_tuning if kind == "PROMPT_TUNING" else write_p_tuning)(folder, prompt, **layout)


@pytest.mark.parametrize("kind", ["PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"])
def test_generate_with_a_prompt_learning_folder_prints_what_peft_generates(base_folder, tmp_path, capsys,  # noqa: F811
                                                                          kind):
    config, weights, tokenizer = load_model(base_folder, dtype="float64")
    folder = _write(kind, tmp_path / "adapter", config)
    ids = prompt_ids(tokenizer, TEXT, chat=False)
    peer = peft.PeftModel.from_pretrained(hf_model(base_folder), folder).to(torch.float64)
    [theirs], _ = peft_greedy_recomputed(peer, FAMILY, [ids], max_new_tokens=STEPS,
                                         prefix_k=K if kind == "PREFIX_TUNING" else 0)
    model = with_prompt_learning(Model(config, weights), str(folder), dtype="float64")
    assert generate(model, [ids], max_new_tokens=STEPS) == [theirs]
    args = ["generate", str(base_folder), "--prompt", TEXT, "--no-chat", "--max-new-tokens", str(STEPS),
            "--dtype", "float64"]
    assert main(args) == 0
    base_text = capsys.readouterr().out
    assert main(args + ["--adapter", str(folder)]) == 0
    ours = capsys.readouterr().out
    eos = tokenizer.eos_token_id
    expected = theirs[: theirs.index(eos) + 1] if eos in theirs else theirs
    assert ours == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    assert ours != base_text                                    # the virtual tokens change the continuation


def test_a_prompt_learning_folder_of_the_wrong_width_is_refused(base_folder, tmp_path, capsys):  # noqa: F811
    write_prompt_tuning(tmp_path, np.zeros((K, 5)), num_attention_heads=4, num_layers=2)
    assert main(["generate", str(base_folder), "--adapter", str(tmp_path), "--prompt", TEXT, "--no-chat",
                 "--max-new-tokens", "2"]) == 2
    assert "prompt embeddings have shape (3, 5)" in capsys.readouterr().err
