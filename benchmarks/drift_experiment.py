"""How far does a LoRA fine-tune drift from its base, and how much do distillation, EWC and rehearsal hold it back?

The base is `refpeft demo`'s built-in tiny Llama (refpeft/demo_base), pretrained on plain-sentence
chats about made-up objects. The task is the demo's skill (refpeft.demo_model): answer a fact
question in one JSON format, trained on the JSON chats about --train-objects objects. Four runs
of `refpeft train`'s loop (refpeft.train.loop.train with refpeft.train.objective.Forgetting), the
same steps, seed, learning rate and adapter (LoRA r 8 on q, v, o, down_proj), differing only in
the forgetting term:

    plain         the task loss alone
    distill       + alpha KL(base || adapted) at temperature T on the batch's tokens
    ewc           + lambda/2 sum F (s B A)^2, the Fisher F of the base on the general reference set
    rehearsal     a fraction f of every batch replaced by general reference chats

General text is the base's own pretraining chats (refpeft.demo_base.world.pretraining_chats), a
random --general chats of them: the first nine tenths are the reference set (EWC's Fisher, the
rehearsal stream), the last tenth is held out. Reported per run:

    task exact    greedy answers to --questions JSON questions about held-out objects equal to the
                  expected JSON (the skill, on facts the task data never showed)
    task loss     mean loss on the held-out objects' JSON chats
    knowledge     the same questions asked plainly, answered with the exact pretrained sentence (the
                  base's own behaviour: what forgetting destroys)
    drift         KL(base || trained) per token on the held-out general chats (refpeft.train.objective.drift)

Run (about five minutes on a busy 2-core CPU; docs/forgetting.md holds its table):
    python benchmarks/drift_experiment.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from refpeft.demo_base import world as w  # noqa: E402
from refpeft.demo_model import BASE_DIR, Question, greedy_answers, load_world, score, training_chats  # noqa: E402
from refpeft.model.decoder import Model, loss_and_gradients  # noqa: E402
from refpeft.model.load import load_model  # noqa: E402
from refpeft.train.adapters import new_adapter  # noqa: E402
from refpeft.train.data import TokenDataset, instruction_dataset, pad_batch  # noqa: E402
from refpeft.train.ewc import diagonal_fisher, fisher_names  # noqa: E402
from refpeft.train.loop import train  # noqa: E402
from refpeft.train.objective import Forgetting, drift  # noqa: E402
from refpeft.train.state import TrainingConfig  # noqa: E402

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def _dataset(chats, tokenizer, block_size: int) -> TokenDataset:
    return instruction_dataset([json.dumps({"messages": c}) for c in chats], tokenizer, block_size=block_size)


def _mean_loss(model: Model, data: TokenDataset, batch: int = 32) -> float:
    total, count = 0.0, 0
    for start in range(0, len(data), batch):
        part = pad_batch(list(data.examples[start:start + batch]), pad_id=data.pad_id)
        n = int(np.sum(part.labels[:, 1:] != -100))
        total += float(loss_and_gradients(model, part.ids, part.labels, attention_mask=part.attention_mask)[0]) * n
        count += n
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-objects", type=int, default=32)
    parser.add_argument("--questions", type=int, default=64, help="held-out questions scored")
    parser.add_argument("--general", type=int, default=400, help="general chats (reference + held out)")
    parser.add_argument("--distill", type=float, default=1.0, help="alpha")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--ewc", type=float, default=1e10,
                        help="lambda (this base's Fisher is ~1e-11: docs/forgetting.md)")
    parser.add_argument("--ewc-examples", type=int, default=32)
    parser.add_argument("--rehearsal-fraction", type=float, default=0.25)
    args = parser.parse_args()
    started = time.perf_counter()

    config, weights, tokenizer = load_model(BASE_DIR, dtype="float32")
    base = Model(config, weights)
    block = min(config.max_position_embeddings, 128)
    world = load_world()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(world))
    things = [world[i] for i in order[:args.train_objects]]
    held = [world[i] for i in order[args.train_objects:]]
    questions = [Question(t, kind) for kind in w.FACTS for t in held][:args.questions]
    task = _dataset(training_chats(things), tokenizer, block)
    task_held = _dataset([w.json_chat(q.thing, q.kind) for q in questions], tokenizer, block)
    corpus = w.pretraining_chats(world)
    general_all = _dataset([corpus[i] for i in rng.permutation(len(corpus))[:args.general]], tokenizer, block)
    keep = len(general_all) // 10
    reference = TokenDataset(general_all.examples[:-keep], pad_id=general_all.pad_id, block_size=block)
    held_out = TokenDataset(general_all.examples[-keep:], pad_id=general_all.pad_id, block_size=block)

    adapter = new_adapter(base, method="lora", targets=TARGETS, rank=8, alpha=16.0, seed=args.seed)
    model = replace(base, adapter=adapter)
    fisher = diagonal_fisher(model, [(e.ids[None, :], e.labels[None, :], None)
                                     for e in reference.examples[:args.ewc_examples]], fisher_names(model))
    runs = {
        "plain LoRA": None,
        f"+ distillation (alpha {args.distill:g}, T {args.temperature:g})":
            Forgetting(distill=args.distill, temperature=args.temperature),
        f"+ EWC (lambda {args.ewc:g}, {args.ewc_examples} examples)": Forgetting(ewc=args.ewc, fisher=fisher),
        f"+ rehearsal (fraction {args.rehearsal_fraction:g})":
            Forgetting(rehearsal=reference, rehearsal_fraction=args.rehearsal_fraction),
    }
    settings = TrainingConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              warmup_steps=max(1, args.steps // 10), schedule="cosine", seed=args.seed)
    plain_expected = [w.sentence_answer(q.thing, q.kind) for q in questions]

    def measure(trained: Model) -> tuple[float, float, float, float]:
        exact = score(greedy_answers(trained, tokenizer, [q.text for q in questions]), questions).rate("exact")
        plain = greedy_answers(trained, tokenizer, [q.plain_text for q in questions])
        knows = sum(a == e for a, e in zip(plain, plain_expected)) / len(questions)
        kl = drift(trained, held_out, limit=len(held_out)) if trained.adapter is not None else 0.0
        return exact, _mean_loss(trained, task_held), knows, kl

    rows = {"base (no adapter)": measure(base)}
    for name, forgetting in runs.items():
        rows[name] = measure(train(model, task, settings, forgetting=forgetting).model)

    print(f"LoRA r 8 on {', '.join(TARGETS)} of refpeft's demo base; {args.steps} steps, batch {args.batch_size}, "
          f"lr {args.lr:g}, seed {args.seed}; task: {len(task)} JSON chats about {args.train_objects} objects; "
          f"scored on {len(questions)} questions about held-out objects; drift on {len(held_out)} held-out general "
          f"chats\n")
    print("| run | task exact | task loss | knowledge kept | drift KL (nats/token) |\n|---|---|---|---|---|")
    for name, (exact, loss, knows, kl) in rows.items():
        print(f"| {name} | {exact:.1%} | {loss:.3f} | {knows:.1%} | {kl:.4f} |")
    trained_rows = {n: r for n, r in rows.items() if n != "base (no adapter)"}
    least = min(trained_rows, key=lambda n: trained_rows[n][3])
    print(f"\nleast drift: {least} ({trained_rows[least][3]:.4f} nats/token; plain LoRA "
          f"{trained_rows['plain LoRA'][3]:.4f}); {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
