"""Peak memory of `refpeft quantize` on a checkpoint larger than 2 GiB, against loading it whole.

Builds a float32 checkpoint of 4096 x 4096 tensors (64 MiB each; 40 of them: 2.5 GiB) in /tmp,
then runs, each in its own fresh process so `ru_maxrss` (peak resident set, file-backed mapped
pages included) is its own:

  baseline   python importing refpeft's quantize command and reading the header, nothing else
  refpeft    `refpeft quantize BASE -o OUT` (memory-mapped, chunked, streamed to the file)
  whole      the way it was done before: read every tensor into memory, quantise each whole
             (refpeft.quant.quantize_4bit), write the output with safetensors' NumPy writer

and prints peak RSS and the excess over the baseline in units of the largest tensor (issue 17 asks
for at most 3x), plus wall time. Checks the two outputs are byte-identical tensor by tensor.
Deletes everything it wrote. Not a test: run it by hand,
    python benchmarks/bench_quantize_memory.py [--tensors 40] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import child_peak_rss  # noqa: E402

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refpeft.checkpoint import SafetensorsFile, write_safetensors_streaming  # noqa: E402

SHAPE = (4096, 4096)

BASELINE = """
import sys
import refpeft.cli, refpeft.commands.quantize, tqdm
from refpeft.checkpoint import SafetensorsFile
SafetensorsFile(sys.argv[1])
"""

WHOLE = """
import sys
from refpeft.io import read_safetensors, write_safetensors
from refpeft.quant import quantize_4bit, to_state_dict
tensors, _ = read_safetensors(sys.argv[1])                 # the whole checkpoint in memory
out = {}
for name, w in tensors.items():
    out.update(to_state_dict(quantize_4bit(w, double_quant=True), prefix=name))
write_safetensors(sys.argv[2], out)
"""


def build(folder: Path, count: int) -> Path:
    entries = [(f"model.layers.{i}.mlp.down_proj.weight", "F32", SHAPE) for i in range(count)]

    def produce(name: str) -> np.ndarray:
        rng = np.random.default_rng(int(name.split(".")[2]))
        return rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(0.02)

    return write_safetensors_streaming(folder / "base.safetensors", entries, produce, metadata={"format": "pt"})


def peak_rss(command: list[str]) -> tuple[int, float]:
    """Peak resident set size (bytes) and wall time of one child process importing this checkout."""
    return child_peak_rss(command, pythonpath=str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=40)
    parser.add_argument("--keep", action="store_true", help="keep the files in /tmp")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="refpeft-quantize-bench-", dir="/tmp"))
    try:
        base = build(folder, args.tensors)
        size, largest = base.stat().st_size, 4 * SHAPE[0] * SHAPE[1]
        print(f"checkpoint: {size / 2**30:.2f} GiB, {args.tensors} float32 tensors of {largest / 2**20:.0f} MiB")
        baseline, _ = peak_rss([sys.executable, "-c", BASELINE, str(base)])
        ours, t_ours = peak_rss([sys.executable, "-m", "refpeft", "quantize", str(base),
                                 "-o", str(folder / "q.safetensors"), "--double-quant", "--no-progress"])
        whole, t_whole = peak_rss([sys.executable, "-c", WHOLE, str(base), str(folder / "whole.safetensors")])
        for name, rss, seconds in [("baseline (imports + header)", baseline, None), ("refpeft quantize", ours, t_ours),
                                   ("whole: load all, quantise, save", whole, t_whole)]:
            excess = rss - baseline
            print(f"{name:32s} peak RSS {rss / 2**20:8.0f} MiB   excess {excess / 2**20:8.0f} MiB "
                  f"= {excess / largest:5.2f} x largest tensor = {excess / size:6.3f} x checkpoint"
                  + (f"   {seconds:6.1f} s" if seconds is not None else ""))
        ours_file, whole_file = SafetensorsFile(folder / "q.safetensors"), SafetensorsFile(folder / "whole.safetensors")
        same = sorted(ours_file.keys()) == sorted(whole_file.keys()) and all(
            np.array_equal(ours_file.read(k), whole_file.read(k)) for k in whole_file.keys())
        print(f"outputs identical tensor by tensor: {same}")
    finally:
        if not args.keep:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
