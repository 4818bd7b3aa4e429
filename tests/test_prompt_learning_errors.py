"""Bad input around prompt learning and the forgetting options, refused with refpeft's errors (exit status 2
at the command line, nothing written):

- k virtual tokens + the sequence beyond the model's max_position_embeddings, at train (the block size
  counts after the k positions) and at generate (prompt + new tokens after them);
- a token id outside the vocabulary: in the text of --prompt-init text, and in a prompt;
- --rehearsal-fraction outside [0, 1), or one that leaves a batch no task example.
"""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.cli import main
from refpeft.errors import ConfigError, InputError
from refpeft.model.decoder import Model
from refpeft.model.generate import generate
from refpeft.model.load import load_model
from refpeft.model.prefix_tuning import prefix_init, write_prefix_tuning
from refpeft.model.prompt_tuning import prompt_init
from refpeft.train.data import read_dataset
from refpeft.train.loop import train
from refpeft.train.objective import Forgetting, general_per_batch
from refpeft.train.prompt_learning import new_prompt_learning
from refpeft.train.state import TrainingConfig

pytest.importorskip("torch", reason="the tiny base folder is made from a transformers model")
from tests.test_train_command import base_folder, train_args  # noqa: E402, F401 (fixture)

MAX_POSITIONS = 64          # the tiny base's max_position_embeddings


def _refused(capsys, args, message, out) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()


@pytest.mark.parametrize("method", ["prompt", "p-tuning", "prefix"])
def test_virtual_tokens_and_block_beyond_the_positions_are_refused_at_train(base_folder, tmp_path, capsys,  # noqa: F811
                                                                            method):
    out = tmp_path / "out"
    args = train_args(base_folder, out, "--method", method, "--virtual-tokens", str(MAX_POSITIONS - 32 + 1))
    _refused(capsys, args, f"block size 32 after {MAX_POSITIONS - 31} virtual tokens exceeds the model's "
                           f"max_position_embeddings ({MAX_POSITIONS})", out)
    # one position fewer fits: the same run is accepted
    assert main(train_args(base_folder, out, "--method", method, "--virtual-tokens", str(MAX_POSITIONS - 32),
                           "--steps", "1")) == 0


def test_the_training_loop_refuses_them_before_any_step(base_folder):  # noqa: F811
    config, weights, tokenizer = load_model(base_folder, dtype="float64")
    model = new_prompt_learning(Model(config, weights), "prefix", k=40)
    data = read_dataset(base_folder / "data.jsonl", tokenizer, block_size=32)
    with pytest.raises(ConfigError, match="after 40 virtual tokens exceeds"):
        train(model, data, TrainingConfig(steps=1))


def test_virtual_tokens_beyond_the_positions_are_refused_at_generate(base_folder, tmp_path, capsys):  # noqa: F811
    config, weights, _ = load_model(base_folder, dtype="float64")
    folder = tmp_path / "prefix"
    write_prefix_tuning(folder, prefix_init(config, 50, seed=0)["embedding.weight"], config)
    args = ["generate", str(base_folder), "--adapter", str(folder), "--prompt", "say hello", "--no-chat",
            "--max-new-tokens", "20"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "after 50 virtual tokens" in err and "max_position_embeddings 64" in err, err
    model = Model(config, weights, prompt=np.zeros((MAX_POSITIONS, config.hidden_size)))
    with pytest.raises(InputError, match=f"after {MAX_POSITIONS} virtual tokens"):
        generate(model, [[1]], max_new_tokens=1)


def test_token_ids_outside_the_vocabulary_are_refused(base_folder, tmp_path, capsys):  # noqa: F811
    config, weights, _ = load_model(base_folder, dtype="float64")
    V = config.vocab_size
    embed = weights["model.embed_tokens.weight"]
    with pytest.raises(InputError, match=rf"the init text's token ids\[1\] = {V} is outside \[0, {V}\)"):
        prompt_init(embed, 4, init="TEXT", text_ids=[2, V])
    with pytest.raises(InputError, match=r"is outside \[0, "):
        prompt_init(embed, 4, init="TEXT", text_ids=[-1])
    for field, table in (("prompt", np.zeros((3, config.hidden_size))),
                         ("prefix", prefix_init(config, 3)["embedding.weight"])):
        with pytest.raises(InputError, match=rf"= {V} is outside \[0, {V}\)"):
            generate(Model(config, weights, **{field: table}), [[1, V]], max_new_tokens=2)


@pytest.mark.parametrize("fraction, batch, message", [
    ("1.5", "2", "the rehearsal fraction must be in [0, 1), got 1.5"),
    ("-0.25", "2", "the rehearsal fraction must be in [0, 1), got -0.25"),
    ("1", "2", "the rehearsal fraction must be in [0, 1), got 1.0"),
    ("0.8", "2", "a rehearsal fraction of 0.8 replaces all 2 examples of a batch"),
])
def test_a_rehearsal_fraction_outside_0_1_is_refused(base_folder, tmp_path, capsys, fraction, batch,  # noqa: F811
                                                     message):
    out = tmp_path / "out"
    args = train_args(base_folder, out, "--rehearsal-fraction", fraction, "--batch-size", batch,
                      "--general", str(base_folder / "text.txt"))
    _refused(capsys, args, message, out)
    # without --general too: the value is refused first, not the missing file
    _refused(capsys, train_args(base_folder, out, "--rehearsal-fraction", fraction, "--batch-size", batch),
             message, out)


def test_the_rehearsal_share_of_a_batch():
    assert [general_per_batch(0.5, b) for b in (1, 2, 3, 4)] == [0, 1, 2, 2]   # round half to even, as Python
    with pytest.raises(ConfigError, match="replaces all 1 examples"):
        general_per_batch(0.6, 1)
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\)"):
        Forgetting(rehearsal_fraction=True)
