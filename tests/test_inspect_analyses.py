"""`refpeft inspect --compare / --amplification`: the LoRA paper's section 7 on adapters `refpeft train` made.

The subspace-similarity claim is the paper's (section 7.2): adapters of rank 8 and 64 trained on the
same task share their top input directions far beyond chance. Here both are trained by `refpeft
train` on the demo's chats with different seeds, and the same runs with a vanishing learning rate
(so A stays at its random init) are the control that lands at the random baseline max(i, j) / k.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from refpeft import demo_model
from refpeft.analysis import decomposition_change, random_subspace_similarity, subspace_similarity_grid
from refpeft.cli import main
from refpeft.errors import RankError, ShapeError
from refpeft.peft_format import read_peft_adapter

BASE = demo_model.BASE_DIR


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    config = demo_model.ModelDemoConfig()
    train, _ = demo_model.split_world(demo_model.load_world(), config)
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in demo_model.training_chats(train)))
    return path


def _train(chats, out, *, rank, seed, lr, steps):
    assert main(["train", str(BASE), "--data", str(chats), "-o", str(out), "--rank", str(rank), "--alpha",
                 str(2 * rank), "--targets", "q_proj,v_proj", "--steps", str(steps), "--lr", str(lr),
                 "--batch-size", "8", "--block-size", "128", "--seed", str(seed)]) == 0
    return read_peft_adapter(out)


def _phi(a8, a64):
    """Mean over the shared layers of phi(1, 1) and phi(8, 8), and k."""
    grids = [np.asarray(subspace_similarity_grid(np.asarray(a8.modules[p].tensors["A"], dtype=np.float64),
                                                 np.asarray(a64.modules[p].tensors["A"], dtype=np.float64)))
             for p in a8.modules]
    k = next(iter(a8.modules.values())).tensors["A"].shape[1]
    return np.mean([g[0, 0] for g in grids]), np.mean([g[7, 7] for g in grids]), k


def test_trained_rank_8_and_64_share_top_directions_far_above_chance(chats, tmp_path, capsys):
    trained = [_train(chats, tmp_path / f"r{r}", rank=r, seed=seed, lr=1e-2, steps=200) for r, seed in ((8, 1), (64, 2))]
    control = [_train(chats, tmp_path / f"c{r}", rank=r, seed=seed, lr=1e-12, steps=1) for r, seed in ((8, 1), (64, 2))]
    phi11, phi88, k = _phi(*trained)
    c11, c88, _ = _phi(*control)
    assert phi11 > 5 * random_subspace_similarity(k, 1, 1)
    assert phi88 > 2 * random_subspace_similarity(k, 8, 8)
    # The untrained A's (random inits) sit at the baseline: the overlap above is learned.
    assert c88 < 1.5 * random_subspace_similarity(k, 8, 8)
    assert c11 < phi11 / 3

    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "r8"), "--compare", str(tmp_path / "r64")]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("model.layers.") and "8 x 64" in line]
    assert len(rows) == len(trained[0].modules)
    printed11 = np.mean([float(r[5]) for r in rows])        # module, r1, x, r2, k, phi(1,1), random, phi(m,m), random
    assert printed11 == pytest.approx(phi11, abs=1e-4)
    assert all(float(r[6]) == pytest.approx(1 / k, abs=1e-4) for r in rows)


def test_amplification_command_prints_every_layer_with_its_inputs(chats, tmp_path, capsys):
    _train(chats, tmp_path / "a", rank=4, seed=0, lr=1e-2, steps=20)
    assert main(["inspect", str(tmp_path / "a"), "--base", str(BASE / "model.safetensors"), "--amplification"]) == 0
    out = capsys.readouterr().out
    table = out.split("magnitude/direction change (DoRA paper):\n")[1].splitlines()
    assert table[0].split()[:3] == ["module", "method", "||dW||_F"]
    for line in table[1:]:
        _, method, delta, projected, top, factor, dm, dd = line.split()
        assert method == "lora"
        assert float(factor) == pytest.approx(float(delta) / float(projected), rel=2e-3)
        assert float(projected) <= float(top) * (1 + 1e-3)      # W's own top directions hold the most
        assert float(dm) >= 0 and 0 <= float(dd) <= 2


def test_analysis_options_refuse_what_they_cannot_do(chats, tmp_path, capsys):
    _train(chats, tmp_path / "a", rank=4, seed=0, lr=1e-2, steps=2)
    assert main(["inspect", str(tmp_path / "a"), "--amplification"]) == 2
    assert "--base" in capsys.readouterr().err
    assert main(["train", str(BASE), "--data", str(chats), "-o", str(tmp_path / "ia3"), "--method", "ia3",
                 "--steps", "1", "--block-size", "128"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "a"), "--compare", str(tmp_path / "ia3")]) == 2
    assert re.search(r"no layer with low-rank factors", capsys.readouterr().err)


# ---------------------------------------------------------------- Delta M, Delta D (the DoRA paper)

def test_decomposition_change_of_a_pure_rescale_and_a_pure_turn():
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((6, 5))
    scaled = decomposition_change(W0, 1.5 * W0)
    assert scaled.direction_change == pytest.approx(0.0, abs=1e-15)
    assert scaled.magnitude_change == pytest.approx(0.5 * np.mean(np.linalg.norm(W0, axis=1)), rel=1e-14)
    # Turn every row by theta inside a plane containing it: the norms stay, cos = cos(theta).
    theta = 0.3
    ortho = rng.standard_normal((6, 5))
    ortho -= (np.sum(ortho * W0, axis=1) / np.sum(W0 * W0, axis=1))[:, None] * W0
    ortho *= (np.linalg.norm(W0, axis=1) / np.linalg.norm(ortho, axis=1))[:, None]
    turned = decomposition_change(W0, np.cos(theta) * W0 + np.sin(theta) * ortho)
    assert turned.magnitude_change == pytest.approx(0.0, abs=1e-14)
    assert turned.direction_change == pytest.approx(1 - np.cos(theta), rel=1e-12)


def test_decomposition_change_of_a_dora_merge_moves_magnitude_to_m():
    from refpeft.methods.dora import dora_merge

    rng = np.random.default_rng(1)
    W0, A, B = rng.standard_normal((7, 9)), rng.standard_normal((3, 9)), rng.standard_normal((7, 3))
    m = rng.uniform(0.5, 2.0, 7)
    change = decomposition_change(W0, dora_merge(W0, A, B, m, scaling=0.5))
    assert change.magnitude_change == pytest.approx(np.mean(np.abs(m - np.linalg.norm(W0, axis=1))), rel=1e-12)
    V = W0 + 0.5 * B @ A
    cos = np.sum(V * W0, axis=1) / (np.linalg.norm(V, axis=1) * np.linalg.norm(W0, axis=1))
    assert change.direction_change == pytest.approx(np.mean(1 - cos), rel=1e-12)


def test_decomposition_change_refuses_zero_rows_and_mismatched_shapes():
    W0 = np.ones((3, 4))
    with pytest.raises(RankError, match="zero"):
        decomposition_change(W0, np.vstack([np.ones((2, 4)), np.zeros((1, 4))]))
    with pytest.raises(ShapeError):
        decomposition_change(W0, np.ones((4, 3)))
