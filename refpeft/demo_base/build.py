"""Build the demo's tiny base model from nothing: `python -m refpeft.demo_base.build [--out DIR]`.

Every step is seeded and uses refpeft's own code, so the folder in the package is one run of this
script: 10.7 minutes (wall clock) on a shared 2-core x86-64 machine, NumPy 2.4 float32 on one BLAS
thread; an earlier run of the same computation there gave byte-identical weights. BLAS kernels
round differently on other machines, so a rebuild elsewhere comes out close to the committed
weights, not necessarily bit for bit. The run ends answering all 384 fact questions (one per object
and fact) with the exact sentence; world.json records its settings and figures.

    world       refpeft.demo_base.world.make_world(OBJECTS, seed=WORLD_SEED): made-up objects, four
                facts each
    corpus      world.pretraining_chats: every distinct chat about every object (each fact question
                in each phrasing, and description requests, with each request suffix), answered in
                sentences, and a few json examples: OBJECTS x 90 + 120 chats
    tokenizer   word-level over the pieces of the corpus and of the demo's JSON chats (world.PIECE),
                after the ChatML special tokens; tokenizers' Fuse decoder (concatenation)
    model       a Llama (transformers' LlamaForCausalLM: RMSNorm, rotary embedding, grouped-query
                attention, SwiGLU, tied embeddings) of the sizes in ARCHITECTURE, initialised as
                transformers does (linear and embedding weights ~ N(0, 0.02^2), norm weights 1)
    training    refpeft.train.loop.train on the model without an adapter, which trains every weight
                (the decoder's train_base): AdamW, linear warm-up then cosine decay, clipping at norm
                1, the loss on the assistant's answers only (refpeft.train.data.response_labels)
    check       greedy answers to one question per object and fact must be the exact sentence

Writes into the folder (default: this package's): config.json and model.safetensors
(refpeft.model.weights.save_model_folder; transformers loads both), tokenizer.json,
tokenizer_config.json (special tokens and the ChatML chat template) and world.json (the objects and
their facts, which the demo's held-out questions are checked against, and this build's record).
"""

from __future__ import annotations

import os

# The model's matrices are small (96 wide): BLAS threads cost more to start than they give, and on
# a busy machine they spin. This must be set before NumPy loads its BLAS.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from refpeft.demo_base import world as w  # noqa: E402

BASE_DIR = Path(__file__).resolve().parent
OBJECTS = 96
WORLD_SEED, INIT_SEED, DATA_SEED = 0, 1, 2
ARCHITECTURE = dict(model_type="llama", hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0)
TRAINING = dict(steps=4000, batch_size=32, lr=5e-3, warmup_steps=100, schedule="cosine", weight_decay=0.01,
                max_grad_norm=1.0)


def word_tokenizer(texts: list[str]):
    """A word-level refpeft Tokenizer over the pieces of `texts` (world.PIECE): ids in sorted order
    after the special tokens, decoding by concatenation, the ChatML template."""
    import tokenizers
    from tokenizers import Regex, decoders, pre_tokenizers

    from refpeft.model.tokenizer import CHATML_TEMPLATE, Tokenizer

    pieces = sorted({piece for text in texts for piece in re.findall(w.PIECE, text)})
    vocab = {token: i for i, token in enumerate([*w.SPECIAL_TOKENS, *pieces])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=w.SPECIAL_ROLES["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(w.PIECE), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(w.SPECIAL_TOKENS))
    return Tokenizer(backend, special_tokens=dict(w.SPECIAL_ROLES), chat_template=CHATML_TEMPLATE)


def tokenizer_config() -> dict:
    """tokenizer_config.json: the special tokens, nothing added to plain text, the ChatML template."""
    from refpeft.model.tokenizer import CHATML_TEMPLATE

    return {**w.SPECIAL_ROLES, "add_bos_token": False, "add_eos_token": False,
            "model_max_length": ARCHITECTURE["max_position_embeddings"], "chat_template": CHATML_TEMPLATE,
            "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}


def initial_weights(config, *, seed: int) -> dict[str, np.ndarray]:
    """transformers' `_init_weights` for a Llama: N(0, 0.02^2) matrices, RMSNorm weights 1 (float32)."""
    from refpeft.model.weights import expected_shapes

    rng = np.random.default_rng(seed)
    return {name: (np.ones(shape, np.float32) if len(shape) == 1
                   else (0.02 * rng.standard_normal(shape)).astype(np.float32))
            for name, shape in expected_shapes(config).items()}


def sentence_accuracy(model, tokenizer, world, *, suffix: str = "") -> tuple[float, list[str]]:
    """The share of questions (one per object and fact, first phrasing, + suffix) answered greedily
    with the exact sentence, and the wrong answers."""
    from refpeft.model.generate import generate, prompt_ids

    asked = [(thing, kind) for thing in world for kind in w.FACTS]
    right, wrong = 0, []
    for start in range(0, len(asked), 128):
        chunk = asked[start:start + 128]
        prompts = [prompt_ids(tokenizer, w.question(thing, kind, suffix=suffix), chat=True) for thing, kind in chunk]
        outputs = generate(model, prompts, max_new_tokens=24, eos_token_id=tokenizer.eos_token_id)
        for (thing, kind), out in zip(chunk, outputs):
            text = tokenizer.decode(out, skip_special_tokens=True)
            if text == w.sentence_answer(thing, kind):
                right += 1
            else:
                wrong.append(f"{w.question(thing, kind, suffix=suffix)} -> {text!r}")
    return right / len(asked), wrong


def build(out: Path, *, objects: int = OBJECTS, steps: int = TRAINING["steps"], log=sys.stderr) -> dict:
    """Run every step of the module docstring and write the folder; returns world.json's record."""
    import tokenizers

    from refpeft.model.config import config_from_dict
    from refpeft.model.decoder import Model
    from refpeft.model.weights import save_model_folder
    from refpeft.train.data import Example, TokenDataset, pad_id, response_labels
    from refpeft.train.loop import train
    from refpeft.train.state import TrainingConfig

    started = time.perf_counter()
    world = w.make_world(objects, seed=WORLD_SEED)
    chats = w.pretraining_chats(world)
    skill = [w.json_chat(world[0], kind) for kind in w.FACTS]
    tokenizer = word_tokenizer(["user\n", "assistant\n"] + [m["content"] for c in chats + skill for m in c])
    examples = tuple(Example(*response_labels(tokenizer, c, where=f"chat {i}"), source=f"chat {i}")
                     for i, c in enumerate(chats))
    dataset = TokenDataset(examples, pad_id=pad_id(tokenizer), block_size=ARCHITECTURE["max_position_embeddings"])
    token = {role: tokenizer.backend.token_to_id(text) for role, text in w.SPECIAL_ROLES.items()}
    config = config_from_dict({**ARCHITECTURE, "vocab_size": tokenizer.vocab_size, "bos_token_id": None,
                               "eos_token_id": token["eos_token"], "pad_token_id": token["pad_token"]})
    model = Model(config, initial_weights(config, seed=INIT_SEED))
    settings = TrainingConfig(**{**TRAINING, "steps": steps}, seed=DATA_SEED)
    print(f"corpus: {len(chats)} chats, {sum(e.ids.shape[0] for e in examples):,} tokens; vocabulary "
          f"{tokenizer.vocab_size}; model {sum(int(a.size) for a in model.weights.values()):,} parameters; "
          f"{steps} steps of {settings.batch_size} chats", file=log, flush=True)
    losses: list[float] = []
    tokens = [0]

    def report(step) -> None:
        losses.append(step.loss)
        tokens[0] += step.tokens
        if step.step % 250 == 0 or step.step == step.total:
            elapsed = time.perf_counter() - started
            print(f"step {step.step:5d}/{step.total}  loss {np.mean(losses[-100:]):.5f}  lr {step.lr:.2e}  "
                  f"{tokens[0] / elapsed:,.0f} tokens/s  {elapsed / 60:.1f} min", file=log, flush=True)

    trained = train(model, dataset, settings, progress=report).model
    accuracy, wrong = sentence_accuracy(trained, tokenizer, world)
    minutes = (time.perf_counter() - started) / 60
    record = {"objects": [asdict(thing) for thing in world],
              "build": {"command": "python -m refpeft.demo_base.build", "objects": objects,
                        "world_seed": WORLD_SEED, "init_seed": INIT_SEED, "data_seed": DATA_SEED,
                        "architecture": ARCHITECTURE, "training": {**TRAINING, "steps": steps},
                        "chats": len(chats), "tokens_per_epoch": int(sum(e.ids.shape[0] for e in examples)),
                        "final_loss": float(np.mean(losses[-100:])), "sentence_accuracy": accuracy,
                        "minutes": round(minutes, 1),
                        "versions": {"numpy": np.__version__, "tokenizers": tokenizers.__version__}}}
    out.mkdir(parents=True, exist_ok=True)
    save_model_folder(out, config, dict(trained.weights), dtype="float32")
    tokenizer.backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n", encoding="utf-8")
    (out / "world.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"answers {accuracy:.1%} of {len(world) * len(w.FACTS)} fact questions with the exact sentence; "
          f"{minutes:.1f} min; wrote {out}", file=log, flush=True)
    for line in wrong[:10]:
        print(f"  wrong: {line}", file=log)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refpeft.demo_base.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BASE_DIR, help="folder to write (default: the package's)")
    build(parser.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
