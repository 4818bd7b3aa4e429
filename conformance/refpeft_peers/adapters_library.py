"""AdapterHub's `adapters` library (its own Python, REFPEFT_ADAPTERS_PYTHON) on the `bottleneck_*` cases.

The library pins transformers ~= 4.57, so it cannot be imported beside the other peers: this
runner keeps one process of that environment's python running adapters_bottleneck.py --serve
(beside this file) for the whole report and hands it one job folder per case (request.json and
inputs.safetensors in, outputs.safetensors back; no pickles). The job is the script's mode
"block": a one-layer Llama with the library's adapter ("double_seq_bn" or "seq_bn" with the case's
non_linearity, scaling and reduction factor H / m) added and trained, the case's four tensors
copied into `model.layers.0.output_adapters`, and that `BottleneckLayer` called as the decoder
layer calls it, layer(o, r, None), in the case's dtype (float32 cases run in float32); backward
is torch's autograd of sum(y * dy).

Without REFPEFT_ADAPTERS_PYTHON, or when it names no file, the runner is listed as not run.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from refpeft.conformance.bottleneck_families import FAMILIES, GRADIENTS
from refpeft.conformance.check import Unsupported
from refpeft.io import read_safetensors, write_safetensors
from refpeft.methods.bottleneck import TENSORS
from refpeft_peers import NotInstalled, Runner

ENVIRONMENT = "REFPEFT_ADAPTERS_PYTHON"
SCRIPT = Path(__file__).with_name("adapters_bottleneck.py")
REPLY = "refpeft-adapters-job:"             # adapters_bottleneck.REPLY (that script is never imported here)
MODULE = "model.layers.0.output_adapters"   # every architecture has an output adapter
FAMILY_NAMES = {family.name for family in FAMILIES}


class _Worker:
    """One `adapters_bottleneck.py --serve` process; its stderr goes to a file quoted when it dies."""

    def __init__(self, python: str, folder: Path) -> None:
        self.log = open(folder / "worker-stderr.txt", "w+")
        self.process = subprocess.Popen([python, str(SCRIPT), "--serve"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True)
        atexit.register(self.close)

    def run(self, job: Path) -> None:
        self.process.stdin.write(f"{job}\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith(REPLY):
                answer = line[len(REPLY):].strip()
                if answer != "ok":
                    raise RuntimeError(f"the adapters library failed: {answer}")
                return
        self.log.seek(0)
        raise RuntimeError(f"the adapters worker exited ({self.process.wait()}): {self.log.read()[-2000:]}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def _request(manifest: dict) -> dict:
    s, o = manifest["sizes"], manifest["options"]
    H = s["hidden"]
    llama = dict(vocab_size=8, hidden_size=H, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                 num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=False)
    options = dict(non_linearity=o["non_linearity"], scaling=o["scaling"], reduction_factor=H // s["bottleneck"])
    return {"mode": "block", "architecture": o["architecture"], "options": options, "llama": llama,
            "module": MODULE, "dtype": manifest["dtype"]}


def _runner(python: str):
    state: dict[str, object] = {}

    def run(manifest: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if manifest["family"] not in FAMILY_NAMES:
            raise Unsupported(f"the adapters library runner covers {sorted(FAMILY_NAMES)} only")
        if "worker" not in state:
            state["folder"] = tempfile.TemporaryDirectory(prefix="refpeft-adapters-")
            state["worker"] = _Worker(python, Path(state["folder"].name))
        job = Path(state["folder"].name) / manifest["case"]
        job.mkdir(exist_ok=True)
        (job / "request.json").write_text(json.dumps(_request(manifest)))
        tensors = {name: inputs[name] for name in ("o", "r", "dy") if name in inputs}
        tensors.update({f"{MODULE}.{suffix}": inputs[field] for field, suffix in TENSORS.items()})
        write_safetensors(job / "inputs.safetensors", tensors)
        state["worker"].run(job)
        out, _ = read_safetensors(job / "outputs.safetensors")
        wrong = {name: str(a.dtype) for name, a in out.items() if a.dtype != np.dtype(manifest["dtype"])}
        if wrong:
            raise RuntimeError(f"the adapters library computed in another dtype than the case's: {wrong}")
        if manifest["family"] == "bottleneck_forward":
            return {"y": out["y"]}
        return {"do": out["do"], "dr": out["dr"],
                **{GRADIENTS[field]: out[f"grad.{MODULE}.{suffix}"] for field, suffix in TENSORS.items()}}

    return run


def implementations() -> list[Runner]:
    python = os.environ.get(ENVIRONMENT)
    if not python:
        raise NotInstalled(f"{ENVIRONMENT} is not set (the adapters library runs in its own environment, "
                           "conformance/requirements-adapters.txt)")
    if not Path(python).is_file():
        raise NotInstalled(f"{ENVIRONMENT}={python} is not a file")
    return [Runner("adapters-torch-cpu", _runner(python))]
