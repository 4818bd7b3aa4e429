"""Bottleneck adapters (refpeft.methods.bottleneck, refpeft.model.bottleneck_adapters) against AdapterHub's `adapters`.

The peer pins transformers ~= 4.57, so it runs in its own environment: REFPEFT_ADAPTERS_PYTHON names
that environment's python (.ci/run builds it from conformance/requirements-adapters.txt), which runs
refpeft_peers/adapters_bottleneck.py on job folders of safetensors written here. Without it these
tests skip, and under REFPEFT_REQUIRE_PEERS=1 (CI) the skip is a failure (tests/conftest.py).

Checked in float64: one adapter layer as the decoder layer calls it (output, d(sub-block output),
d(residual), the four gradients; 1e-12 relative), and a whole tiny Llama with Houlsby's and
Pfeiffer's defaults and with changed options (logits and loss 1e-10, adapter gradients 1e-9); the
peer's own config dict for each architecture parses to refpeft's config, and the library places its
adapters at exactly refpeft's module paths.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from refpeft.methods.bottleneck import TENSORS, block_backward, block_forward, bottleneck_config
from refpeft.model.bottleneck_adapters import (BottleneckAdapters, adapter_paths, bottleneck_adapters,
                                               init_bottleneck_adapters)
from refpeft.model.config import config_from_dict
from refpeft.model.decoder import Model, loss_and_gradients

safetensors_numpy = pytest.importorskip("safetensors.numpy")

LLAMA = dict(vocab_size=61, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
             rope_theta=10000.0)
CASES = {   # name: (architecture, BnConfig options)
    "houlsby": ("double_seq_bn", {}),
    "pfeiffer": ("seq_bn", {}),
    "pfeiffer-rf4-leave-out-scaled-tanh": ("seq_bn", dict(reduction_factor=4, leave_out=[0], scaling=0.5,
                                                          non_linearity="tanh")),
    "houlsby-relu-rf8": ("double_seq_bn", dict(reduction_factor=8, non_linearity="relu")),
}
LAYER_CASES = [("houlsby", "model.layers.0.attention_adapters"), ("houlsby", "model.layers.1.output_adapters"),
               ("pfeiffer", "model.layers.0.output_adapters"),
               ("pfeiffer-rf4-leave-out-scaled-tanh", "model.layers.1.output_adapters")]


def _runner() -> Path:
    spec = importlib.util.find_spec("refpeft_peers")
    return Path(list(spec.submodule_search_locations)[0]) / "adapters_bottleneck.py"


def _base_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """A random tiny Llama (transformers' names): N(0, 0.15^2) matrices, norms around 1."""
    rng = np.random.default_rng(seed)
    H, I, V = LLAMA["hidden_size"], LLAMA["intermediate_size"], LLAMA["vocab_size"]
    D = H // LLAMA["num_attention_heads"]
    kv = LLAMA["num_key_value_heads"] * D
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(LLAMA["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
                       f"{p}.self_attn.q_proj.weight": (H, H), f"{p}.self_attn.k_proj.weight": (kv, H),
                       f"{p}.self_attn.v_proj.weight": (kv, H), f"{p}.self_attn.o_proj.weight": (H, H),
                       f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.up_proj.weight": (I, H),
                       f"{p}.mlp.down_proj.weight": (H, I)})
    return {n: 1.0 + 0.3 * rng.standard_normal(s) if n.endswith("norm.weight") else 0.15 * rng.standard_normal(s)
            for n, s in shapes.items()}


def _adapters(name: str, *, seed: int = 5) -> BottleneckAdapters:
    """Trained-looking adapters (N(0, 0.3^2) everywhere, biases too) at the config's places."""
    architecture, options = CASES[name]
    config = bottleneck_config(architecture, **{k: tuple(v) if k == "leave_out" else v for k, v in options.items()})
    fresh = init_bottleneck_adapters(LLAMA["num_hidden_layers"], LLAMA["hidden_size"], config).tensors()
    rng = np.random.default_rng(seed)
    tensors = {n: 0.3 * rng.standard_normal(a.shape) for n, a in fresh.items()}
    return bottleneck_adapters(config, tensors, num_layers=LLAMA["num_hidden_layers"], hidden=LLAMA["hidden_size"])


def _batch(seed: int = 1):
    """Two rows, the second left-padded; its first real token's label is left out (tests/test_model_decoder.py
    says why: a query row with every key masked)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, LLAMA["vocab_size"], size=(2, 9))
    mask = np.ones((2, 9), dtype=np.int64)
    mask[1, :3] = 0
    labels = np.where(mask == 1, ids, -100)
    labels[0, :2] = -100
    labels[1, 3] = -100
    return ids, mask, labels


def _layer_inputs(seed: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((2, 5, LLAMA["hidden_size"])) for k in ("o", "r", "dy")}


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """Every job's outputs from one run of the peer's python: {job name: (outputs, peer.json)}."""
    python = os.environ.get("REFPEFT_ADAPTERS_PYTHON")
    if not python:
        pytest.skip("REFPEFT_ADAPTERS_PYTHON is not set: the adapters library (AdapterHub) runs in its own "
                    "environment, see conformance/requirements-adapters.txt")
    assert Path(python).is_file(), f"REFPEFT_ADAPTERS_PYTHON={python} is not a file"
    root = tmp_path_factory.mktemp("adapters-jobs")
    base = _base_weights()
    ids, mask, labels = _batch()
    jobs = {}
    for name, (architecture, options) in CASES.items():
        jobs[f"model:{name}"] = ({"mode": "model"}, {**base, "ids": ids, "attention_mask": mask, "labels": labels},
                                 name)
    for name, module in LAYER_CASES:
        jobs[f"layer:{name}:{module}"] = ({"mode": "layer", "module": module}, {**base, **_layer_inputs()}, name)
    folders = []
    for j, (job, (request, inputs, name)) in enumerate(jobs.items()):
        architecture, options = CASES[name]
        folder = root / f"job{j}"
        folder.mkdir()
        (folder / "request.json").write_text(json.dumps({**request, "architecture": architecture, "options": options,
                                                         "llama": LLAMA}))
        tensors = {**inputs, **_adapters(name).tensors()}
        safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                    folder / "inputs.safetensors")
        folders.append(folder)
    done = subprocess.run([python, str(_runner()), *map(str, folders)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return {job: (safetensors_numpy.load_file(folder / "outputs.safetensors"),
                  json.loads((folder / "peer.json").read_text())) for job, folder in zip(jobs, folders)}


@pytest.mark.parametrize("name,module", LAYER_CASES)
def test_one_adapter_layer_equals_adapters(peer, name, module):
    theirs, _ = peer[f"layer:{name}:{module}"]
    adapters = _adapters(name)
    x = _layer_inputs()
    e, cache = block_forward(x["o"], x["r"], adapters.modules[module], adapters.config)
    do, dr, grads = block_backward(x["dy"], cache)
    assert _rel(e, theirs["y"]) < 1e-12
    assert _rel(do, theirs["do"]) < 1e-12 and _rel(dr, theirs["dr"]) < 1e-12
    for field, suffix in TENSORS.items():
        assert _rel(grads[field], theirs[f"grad.{module}.{suffix}"]) < 1e-12, suffix


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_whole_model_equals_adapters(peer, name):
    theirs, info = peer[f"model:{name}"]
    adapters = _adapters(name)
    model = Model(config_from_dict({**LLAMA, "model_type": "llama"}), _base_weights(), bottleneck=adapters)
    ids, mask, labels = _batch()
    loss, logits, grads = loss_and_gradients(model, ids, labels, attention_mask=mask)
    rows = mask.astype(bool)                                   # padded query rows are outputs no one uses
    assert _rel(logits[rows], theirs["logits"][rows]) < 1e-10
    assert abs(float(loss) - float(theirs["loss"][0])) <= 1e-10 * abs(float(theirs["loss"][0]))
    assert set(grads) == set(adapters.tensors())
    for n, g in grads.items():
        assert _rel(g, theirs[f"grad.{n}"]) < 1e-9, n
    # The library's own config for this architecture and options is refpeft's, and it placed its adapters
    # at refpeft's module paths (the runner maps names one to one, so the sets are equal).
    assert bottleneck_config(info["config"]) == adapters.config
    placed = sorted({n.split(".adapters.")[0] for n in info["adapter_tensors"]})
    assert placed == sorted(adapter_paths(LLAMA["num_hidden_layers"], adapters.config))
