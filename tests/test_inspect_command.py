"""refpeft.commands.inspect: `refpeft inspect` prints a PEFT adapter's modules, one row each.

Specification: each row's "d x k" is the layer's size; VeRA files do not record k, so without --base
the row shows the bound the saved projections give (<= k_max) or "?", and with --base it shows the
base layer's exact input size, as the command's help promises.
"""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy

from refpeft import cli
from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.methods.linear import LinearShape
from refpeft.methods.vera import vera_projections
from refpeft.peft_format import write_peft_adapter

# Layer sizes (d outputs, k inputs): the largest k is 12, so saved projections bound every k by 12.
SIZES = {"model.q": (6, 4), "model.up": (12, 6), "model.down": (6, 12)}


def vera_adapter() -> Adapter:
    rng = np.random.default_rng(0)
    vera_A, vera_B = vera_projections(LinearShape(k=12, d=12), 2, seed=7, dtype="float32")
    modules = {path: ModuleAdapter("vera", {"lambda_d": rng.standard_normal(2).astype(np.float32),
                                            "lambda_b": rng.standard_normal(d).astype(np.float32)})
               for path, (d, k) in SIZES.items()}
    return Adapter(modules=modules, vera_A=vera_A, vera_B=vera_B, config={"projection_prng_key": 7})


@pytest.fixture
def files(tmp_path):
    base = {f"{path}.weight": np.zeros((d, k), dtype=np.float32) for path, (d, k) in SIZES.items()}
    safetensors.numpy.save_file(base, str(tmp_path / "base.safetensors"))
    write_peft_adapter(tmp_path / "saved", vera_adapter())
    write_peft_adapter(tmp_path / "seed", vera_adapter(), save_projection=False)
    return tmp_path


def sizes(output: str) -> dict[str, str]:
    """The "d x k" cell of each module row."""
    rows = [line.split() for line in output.splitlines() if line.startswith("model.")]
    return {row[0]: " ".join(row[2:5]) for row in rows}


@pytest.mark.parametrize("adapter", ["saved", "seed"])
def test_base_gives_vera_its_input_sizes(files, adapter, capsys):
    assert cli.main(["inspect", str(files / adapter), "--base", str(files / "base.safetensors")]) == 0
    assert sizes(capsys.readouterr().out) == {path: f"{d} x {k}" for path, (d, k) in SIZES.items()}


def test_without_base_vera_shows_the_bound_or_unknown(files, capsys):
    assert cli.main(["inspect", str(files / "saved")]) == 0
    assert set(sizes(capsys.readouterr().out).values()) == {"6 x <=12", "12 x <=12"}
    assert cli.main(["inspect", str(files / "seed")]) == 0
    assert set(sizes(capsys.readouterr().out).values()) == {"6 x ?", "12 x ?"}


def test_trainable_token_rows_are_listed_and_counted(tmp_path, capsys):
    """A folder of token rows alone (PEFT's TRAINABLE_TOKENS) and LoRA beside rows both show the rows."""
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((3, 8)).astype(np.float32)
    alone = Adapter(modules={}, token_indices=(5, 9, 2), token_values=rows)
    write_peft_adapter(tmp_path / "tokens", alone, tied_embeddings=False)
    assert cli.main(["inspect", str(tmp_path / "tokens")]) == 0
    out = capsys.readouterr().out
    assert "(embedding rows only), 0 modules" in out
    assert "trainable tokens: 3 rows of the embedding (ids 5, 9, 2), values 3 x 8" in out
    assert "total: 0 adapter parameters + 24 values of trainable token rows" in out
