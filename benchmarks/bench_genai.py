"""SmolLM2-135M exported by refpeft, decoded by onnxruntime-genai on the CPU: tokens/s per form, export time and memory.

    python benchmarks/bench_genai.py [--rank 16] [--new-tokens 64] [--rounds 3]

Exports (each `refpeft export` in its own process, so its peak resident memory is its own):
    merged     a rank-r LoRA on all seven projections folded into the float32 weights
    unmerged   the same adapter as swappable inputs, served from adapters/lora.onnx_adapter
    base       the float32 model alone (the peer of the NF4 row)
    nf4        the 4-bit NF4 base (MatMulBnb4, double quantisation) with the LoRA unmerged on top

Decoding: greedy, a chat prompt, --new-tokens tokens, through onnxruntime-genai in this process;
each figure is the best of --rounds runs. The unmerged branch costs r (d + k) multiply-adds per
token and adapted layer against the base's d k per layer (and the LM head's H V); the target is an
unmerged overhead of at most twice that FLOP share plus 10%. Export memory target: peak below twice
the largest tensor plus the graph's size. Run it on an idle machine; it prints the versions.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from refpeft.model import load
from refpeft.model.decoder import Model
from refpeft.model.generate import prompt_ids
from refpeft.peft_format import write_peft_adapter
from refpeft.train.adapters import new_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support import require_smollm2

    import onnxruntime
    import onnxruntime_genai
    from refpeft_onnx.genai_run import GenaiModel

    gguf = require_smollm2()
    config, weights, tokenizer = load.load_model(gguf, dtype="float32")
    model = Model(config, weights)
    print(f"SmolLM2-135M-Instruct, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"onnxruntime {onnxruntime.__version__}, onnxruntime-genai {onnxruntime_genai.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapter = new_adapter(model, method="lora", targets=TARGETS, rank=args.rank, alpha=2 * args.rank)
        rng = np.random.default_rng(0)
        adapter = type(adapter)({p: m.replace(B=0.02 * rng.standard_normal(m.B.shape).astype(np.float32))
                                 for p, m in adapter.modules.items()}, config=adapter.config)
        write_peft_adapter(root / "lora", adapter)
        exports = {"merged": [str(root / "lora")], "unmerged": [str(root / "lora"), "--unmerged"],
                   "base": [], "nf4": [str(root / "lora"), "--unmerged", "--nf4"]}
        print(f"{'export':10s} {'seconds':>8s} {'peak MiB':>9s} {'model.onnx MiB':>15s}")
        for name, extra in exports.items():
            seconds, peak = _export(gguf, root / name, extra)
            size = sum(f.stat().st_size for f in (root / name).glob("model.onnx*")) / 2**20
            print(f"{name:10s} {seconds:8.1f} {peak:9.0f} {size:15.0f}")
        largest = max(np.asarray(w).nbytes for w in weights.values()) / 2**20
        print(f"largest tensor {largest:.0f} MiB; memory target: peak < 2 x largest + model.onnx")
        ids = prompt_ids(tokenizer, "Write a short poem about the sea.")
        rates = {}
        for name, adapter_name in (("merged", None), ("unmerged", "lora"), ("base", None), ("nf4", "lora")):
            genai = GenaiModel(root / name)
            best = 0.0
            for _ in range(args.rounds):
                start = time.perf_counter()
                new = genai.generate(ids, max_new_tokens=args.new_tokens, adapter=adapter_name)
                best = max(best, len(new) / (time.perf_counter() - start))
            rates[name] = best
            print(f"{name:10s} {best:8.1f} tokens/s ({len(new)} tokens)")
        share = _flop_share(config, args.rank)
        overhead = rates["merged"] / rates["unmerged"] - 1.0
        print(f"unmerged overhead {100 * overhead:.1f}% vs the adapter's FLOP share {100 * share:.2f}% "
              f"(target <= {100 * (2 * share + 0.10):.1f}%)")
        print(f"nf4 / float32 base: {rates['nf4'] / rates['base']:.2f}x the tokens/s")


def _export(gguf: Path, out: Path, extra: list[str]) -> tuple[float, float]:
    """Seconds and peak resident MiB of one `refpeft export` process."""
    command = [sys.executable, "-m", "refpeft", "export", *extra, "--base", str(gguf), "-o", str(out)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed ({status})")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def _flop_share(config, rank: int) -> float:
    """The LoRA branch's multiply-adds per token as a fraction of the base's (projections and LM head)."""
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    base = config.num_hidden_layers * sum(k * d for k, d in shapes) + h * config.vocab_size
    branch = config.num_hidden_layers * sum(rank * (k + d) for k, d in shapes)
    return branch / base


if __name__ == "__main__":
    main()
