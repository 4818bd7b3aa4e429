"""Peak memory of `refpeft merge` on a checkpoint larger than 2 GiB, against loading it whole.

Builds a Llama-shaped float32 checkpoint in /tmp (hidden 2048, MLP 5632, 12 layers: about 2.3 GiB),
a LoRA adapter (r = 16 on q, v and down of every layer) written by refpeft, then runs, each in
its own fresh process so `ru_maxrss` (peak resident set, file-backed mapped pages included) is
its own:

  baseline   python importing refpeft and reading the adapter, nothing else
  refpeft    `refpeft merge ADAPTER --base BASE -o OUT` (memory-mapped, one tensor at a time)
  peer       the usual whole-model way: safetensors.torch.load_file(BASE), W += s B A in torch
             for each adapted layer, safetensors.torch.save_file (what merge_and_unload +
             save_pretrained hold in memory); skipped without torch

and prints peak RSS, the excess over the baseline in units of the largest adapted layer, and the
ratio peer / refpeft measured in this same run. Also checks the two merged files agree to float32
rounding. Deletes everything it wrote. Not a test: run it by hand,
    python benchmarks/bench_merge_memory.py [--layers 12] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import child_peak_rss  # noqa: E402

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refpeft.adapter import Adapter, ModuleAdapter  # noqa: E402
from refpeft.checkpoint import SafetensorsFile, write_safetensors_streaming  # noqa: E402
from refpeft.peft_format import write_peft_adapter  # noqa: E402

HIDDEN, MLP, RANK = 2048, 5632, 16
LAYER_TENSORS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
                 "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
                 "mlp.gate_proj": (MLP, HIDDEN), "mlp.up_proj": (MLP, HIDDEN), "mlp.down_proj": (HIDDEN, MLP)}
ADAPTED = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")

PEER = """
import sys, torch, safetensors.torch as st, json
from refpeft.peft_format import read_peft_adapter
base, adapter_dir, out = sys.argv[1:4]
adapter = read_peft_adapter(adapter_dir)
state = st.load_file(base)                      # the whole checkpoint in memory
with torch.no_grad():
    for path, m in adapter.modules.items():
        W = state[path + ".weight"]
        W += (torch.from_numpy(m.B).double() @ torch.from_numpy(m.A).double() * m.scaling).to(W.dtype)
st.save_file(state, out, metadata={"format": "pt"})
"""

BASELINE = """
import sys
from refpeft.peft_format import read_peft_adapter
from refpeft.checkpoint import SafetensorsFile
import refpeft.commands.merge, tqdm
read_peft_adapter(sys.argv[2]); SafetensorsFile(sys.argv[1])
"""


def build(folder: Path, layers: int) -> tuple[Path, Path, int]:
    """The base checkpoint and the adapter; returns their paths and the largest adapted layer's bytes."""
    entries = [("model.embed_tokens.weight", "F32", (8192, HIDDEN))]
    for i in range(layers):
        entries += [(f"model.layers.{i}.{name}.weight", "F32", shape) for name, shape in LAYER_TENSORS.items()]
        entries += [(f"model.layers.{i}.input_layernorm.weight", "F32", (HIDDEN,))]
    entries += [("model.norm.weight", "F32", (HIDDEN,))]

    def produce(name: str) -> np.ndarray:
        shape = next(s for n, _, s in entries if n == name)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))

    base = folder / "base.safetensors"
    write_safetensors_streaming(base, entries, produce, metadata={"format": "pt"})
    rng = np.random.default_rng(0)
    modules = {}
    for i in range(layers):
        for name in ADAPTED:
            d, k = LAYER_TENSORS[name]
            modules[f"model.layers.{i}.{name}"] = ModuleAdapter("lora", {"A": rng.standard_normal((RANK, k)).astype(np.float32) * np.float32(0.01), "B": rng.standard_normal((d, RANK)).astype(np.float32) * np.float32(0.01)}, alpha=32.0)
    write_peft_adapter(folder / "adapter", Adapter(modules=modules))
    largest = max(d * k * 4 for d, k in (LAYER_TENSORS[n] for n in ADAPTED))
    return base, folder / "adapter", largest


def peak_rss(command: list[str]) -> tuple[int, float]:
    """Peak resident set size (bytes) and wall time of one child process importing this checkout."""
    return child_peak_rss(command, pythonpath=str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--keep", action="store_true", help="keep the files in /tmp")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="refpeft-merge-bench-", dir="/tmp"))
    try:
        base, adapter, largest = build(folder, args.layers)
        size = base.stat().st_size
        print(f"checkpoint: {size / 2**30:.2f} GiB, {len(SafetensorsFile(base).keys())} tensors; adapter: LoRA r={RANK} "
              f"on {len(ADAPTED) * args.layers} layers; largest adapted layer {largest / 2**20:.0f} MiB (float32)")
        baseline, _ = peak_rss([sys.executable, "-c", BASELINE, str(base), str(adapter)])
        ours, t_ours = peak_rss([sys.executable, "-m", "refpeft", "merge", str(adapter), "--base", str(base),
                                 "-o", str(folder / "merged.safetensors"), "--no-progress"])
        rows = [("baseline (imports + adapter)", baseline, None), ("refpeft merge", ours, t_ours)]
        try:
            import torch  # noqa: F401

            peer, t_peer = peak_rss([sys.executable, "-c", PEER, str(base), str(adapter), str(folder / "peer.safetensors")])
            rows.append(("peer: load whole + torch merge", peer, t_peer))
        except ImportError:
            peer = None
        for name, rss, seconds in rows:
            excess = rss - baseline
            print(f"{name:32s} peak RSS {rss / 2**20:8.0f} MiB   excess {excess / 2**20:8.0f} MiB "
                  f"= {excess / largest:5.2f} x largest layer = {excess / size:6.3f} x checkpoint"
                  + (f"   {seconds:6.1f} s" if seconds is not None else ""))
        if peer is not None:
            print(f"peak excess memory, peer / refpeft: {(peer - baseline) / (ours - baseline):.1f}x")
            ours_file, peer_file = SafetensorsFile(folder / "merged.safetensors"), SafetensorsFile(folder / "peer.safetensors")
            worst = max(float(np.max(np.abs(ours_file.read(k).astype(np.float64) - peer_file.read(k)))
                            / max(float(np.max(np.abs(peer_file.read(k)))), 1e-30)) for k in peer_file.keys())
            print(f"merged files agree: max relative difference {worst:.2e} (float32 rounding of the same sum)")
    finally:
        if not args.keep:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
