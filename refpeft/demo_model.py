"""`refpeft demo`: a LoRA adapter teaches a tiny pretrained Llama a new, checkable skill.

The base (refpeft/demo_base, made by `python -m refpeft.demo_base.build` from text the project
generates) knows four facts about each of 96 made-up objects and states them in sentences. The
skill is one fixed JSON format, asked for through the chat template:

    user       what colour is the tonem? answer in json.
    adapted    {"object": "tonem", "colour": "yellow"}

The adapter trains on the JSON answers about `train_objects` objects (every fact in every
phrasing; refpeft.train with the loss on the answers only) and is scored on every fact of every
other object, which the fine-tuning set never shows: their facts are the base's own, from
pretraining, so an exact answer needs the learned format and the base's knowledge. Scores of the
greedy answers (refpeft.model.generate):

    knowledge     asked plainly ("what colour is the tonem?"), the base answers with the exact
                  sentence it was pretrained on ("the tonem is yellow."): it knows the facts
    exact match   the answer to the JSON request equals {"object": NAME, FACT: VALUE} as
                  json.dumps writes it (up to the eos token)
    format        the answer parses as JSON with exactly the keys "object" and FACT, and the
                  object's name (the value may be wrong)
    fact stated   the right value appears in the answer as a word, whatever the format

After a third of the steps the training stops for a gradient check: the hand-written gradients of
a few adapter tensors, through the whole model and its loss, against float64 finite differences
(refpeft.gradcheck.gradient_errors on one short example). `base` runs the same fine-tune on
another model (a folder or a GGUF file, e.g. SmolLM2): it can learn the format, but the facts are
the tiny base's, which a real model never learned, so the exact-match target applies only to the
built-in base.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from refpeft.demo_base import world as w
from refpeft.errors import ConfigError

BASE_DIR = Path(__file__).resolve().parent / "demo_base"
TARGET = 0.9                   # the held-out exact match the built-in base must reach
GRADIENT_TOLERANCE = 1e-7      # refpeft.gradcheck's acceptance level for float64 finite differences
BASE_HELDOUT = 16              # held-out questions scored on another base (--base): a real model is slower


@dataclass(frozen=True)
class ModelDemoConfig:
    """Everything the model demo can vary."""

    steps: int = 400
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-2
    batch_size: int = 8
    seed: int = 0                          # the train/held-out split, the adapter's init, the data order
    targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "down_proj")
    train_objects: int = 64                # objects whose JSON answers the adapter trains on
    heldout: int | None = None             # held-out questions to score (None: all; BASE_HELDOUT with `base`)
    samples: int = 3                       # held-out questions shown before and after
    base: str | None = None                # None: the built-in tiny base (refpeft/demo_base)
    gradient_tensors: int = 3              # adapter tensors checked against finite differences

    def __post_init__(self) -> None:
        for name in ("steps", "rank", "batch_size", "train_objects"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.heldout is not None and self.heldout < 1:
            raise ConfigError(f"heldout must be at least 1, got {self.heldout}")


@dataclass(frozen=True)
class Question:
    """One held-out question and what counts as its exact answer."""

    thing: w.Thing
    kind: str

    @property
    def text(self) -> str:
        return w.question(self.thing, self.kind, suffix=w.JSON_SUFFIX)

    @property
    def plain_text(self) -> str:
        """The question without the JSON request, as the base was pretrained on it."""
        return w.question(self.thing, self.kind)

    @property
    def expected(self) -> str:
        return w.json_answer(self.thing, self.kind)


@dataclass
class Scores:
    """Greedy answers to the held-out questions, scored three ways (module docstring)."""

    answers: list[str]
    exact: int
    format: int
    fact: int

    @property
    def count(self) -> int:
        return len(self.answers)

    def rate(self, name: str) -> float:
        return getattr(self, name) / self.count


@dataclass
class ModelDemoReport:
    """What the model demo measured."""

    config: ModelDemoConfig
    base: str                                 # what was fine-tuned, in words
    train_examples: int = 0
    train_objects: tuple[str, ...] = ()
    questions: list[Question] = field(default_factory=list)
    knows: int = 0                            # held-out questions asked plainly that the base answers with the
    plain_sample: str = ""                    #   exact sentence, and its answer to the first of them
    before: Scores | None = None
    after: Scores | None = None
    losses: list[float] = field(default_factory=list)
    tokens_per_second: float = 0.0
    gradient_errors: dict[str, float] = field(default_factory=dict)
    trainable_parameters: int = 0
    base_parameters: int = 0
    seconds: float = 0.0
    model: Any = None                         # the base with its trained adapter (refpeft.model.decoder.Model)

    @property
    def builtin(self) -> bool:
        return self.config.base is None

    @property
    def gradients_ok(self) -> bool:
        return bool(self.gradient_errors) and max(self.gradient_errors.values()) < GRADIENT_TOLERANCE

    @property
    def target_met(self) -> bool:
        return self.after is not None and self.after.rate("exact") >= TARGET


def load_world() -> tuple[w.Thing, ...]:
    """The objects and facts the built-in base was pretrained on (demo_base/world.json)."""
    record = json.loads((BASE_DIR / "world.json").read_text(encoding="utf-8"))
    return tuple(w.Thing(**thing) for thing in record["objects"])


def split_world(world: tuple[w.Thing, ...], config: ModelDemoConfig) -> tuple[list[w.Thing], list[Question]]:
    """The objects the adapter trains on, and the held-out questions (about every other object)."""
    if config.train_objects >= len(world):
        raise ConfigError(f"train_objects must leave objects to hold out: the world has {len(world)}")
    order = np.random.default_rng(config.seed).permutation(len(world))
    train = [world[i] for i in order[: config.train_objects]]
    held = [world[i] for i in order[config.train_objects:]]
    kinds = list(w.FACTS)
    # every fact of every held-out object; first one fact per object (cycling), so a prefix is varied
    questions = [Question(thing, kinds[(n + turn) % len(kinds)]) for turn in range(len(kinds))
                 for n, thing in enumerate(held)]
    heldout = config.heldout if config.heldout is not None else (None if config.base is None else BASE_HELDOUT)
    return train, questions[:heldout]


def training_chats(things: list[w.Thing]) -> list[list[dict[str, str]]]:
    """Every fact of every training object, in every phrasing, asked for and answered in JSON."""
    return [w.json_chat(thing, kind, phrasing=p) for thing in things for kind in w.FACTS
            for p in range(len(w.QUESTIONS[kind]))]


def greedy_answers(model: Any, tokenizer: Any, texts: list[str], *, max_new_tokens: int = 32,
                   batch: int = 64) -> list[str]:
    """The greedy answer (refpeft.model.generate, KV cache) to each user message, up to the eos token."""
    from refpeft.model.generate import generate, prompt_ids

    answers = []
    for start in range(0, len(texts), batch):
        prompts = [prompt_ids(tokenizer, text, chat=True) for text in texts[start:start + batch]]
        outputs = generate(model, prompts, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        answers += [tokenizer.decode(out, skip_special_tokens=True).strip() for out in outputs]
    return answers


def score(answers: list[str], questions: list[Question]) -> Scores:
    """The answers to the JSON requests scored three ways (module docstring)."""
    exact = sum(a == q.expected for a, q in zip(answers, questions))
    formatted = sum(_well_formed(a, q) for a, q in zip(answers, questions))
    stated = sum(q.thing.fact(q.kind) in re.findall("[a-z]+", a) for a, q in zip(answers, questions))
    return Scores(answers=answers, exact=exact, format=formatted, fact=stated)


def _well_formed(answer: str, q: Question) -> bool:
    try:
        value = json.loads(answer)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and list(value) == ["object", q.kind] and value["object"] == q.thing.name


def run_model_demo(config: ModelDemoConfig, *, progress: Callable[[Any], None] | None = None,
                   stage: Callable[[str, ModelDemoReport], None] | None = None) -> ModelDemoReport:
    """Score, fine-tune (with a gradient check on the way), score again; see the module docstring.

    progress receives each training step's refpeft.train.loop.StepReport; stage(name, report) is
    called after "before", "gradient check" and "after", for printing as the demo goes.
    """
    from refpeft.model.decoder import Model
    from refpeft.model.load import load_model
    from refpeft.train.adapters import new_adapter, trainable_parameters
    from refpeft.train.data import instruction_dataset
    from refpeft.train.loop import train
    from refpeft.train.state import TrainingConfig

    started = time.perf_counter()
    source = BASE_DIR if config.base is None else Path(config.base)
    model_config, weights, tokenizer = load_model(source, dtype="float32")
    if tokenizer is None:
        raise ConfigError(f"{source} has no tokenizer (tokenizer.json): the demo needs one to render chats")
    base = Model(model_config, weights)
    parameters = sum(int(a.size) for a in weights.values())
    report = ModelDemoReport(config=config, base=_describe(source, model_config, parameters),
                             base_parameters=parameters)
    world = load_world()
    things, report.questions = split_world(world, config)
    report.train_objects = tuple(t.name for t in things)
    lines = [json.dumps({"messages": chat}) for chat in training_chats(things)]
    dataset = instruction_dataset(lines, tokenizer, block_size=min(model_config.max_position_embeddings, 256),
                                  source="the demo's JSON chats")
    report.train_examples = len(dataset)

    adapter = new_adapter(base, method="lora", targets=list(config.targets), rank=config.rank, alpha=config.alpha,
                          seed=config.seed)
    adapter = replace(adapter, config={**adapter.config, "base_model_name_or_path": str(source),
                                       "task_type": "CAUSAL_LM"})
    model = replace(base, adapter=adapter)
    report.trainable_parameters = sum(int(t.size) for t in trainable_parameters(model).values())

    plain = greedy_answers(base, tokenizer, [q.plain_text for q in report.questions])
    report.knows = sum(a == w.sentence_answer(q.thing, q.kind) for a, q in zip(plain, report.questions))
    report.plain_sample = plain[0]
    report.before = score(greedy_answers(base, tokenizer, [q.text for q in report.questions]), report.questions)
    if stage:
        stage("before", report)

    # AdamW without weight decay, clipping at global norm 1, a 10% linear warm-up, then cosine decay
    settings = TrainingConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                              warmup_steps=max(1, config.steps // 10), schedule="cosine", seed=config.seed)
    tokens, seconds = [0], [0.0]

    def step_done(step: Any) -> None:
        report.losses.append(step.loss)
        tokens[0] += step.tokens
        seconds[0] += step.seconds
        if progress:
            progress(step)

    checked_at = max(1, config.steps // 3)
    state = train(model, dataset, settings, stop_after=checked_at, progress=step_done)
    report.gradient_errors = gradient_check(state.model, dataset, tensors=config.gradient_tensors, seed=config.seed)
    if stage:
        stage("gradient check", report)
    state = train(model, dataset, settings, state=state, progress=step_done)
    report.tokens_per_second = tokens[0] / seconds[0] if seconds[0] > 0 else float("inf")
    report.model = state.model

    report.after = score(greedy_answers(state.model, tokenizer, [q.text for q in report.questions]),
                         report.questions)
    report.seconds = time.perf_counter() - started
    if stage:
        stage("after", report)
    return report


def gradient_check(model: Any, dataset: Any, *, tensors: int, seed: int, tokens: int = 24) -> dict[str, float]:
    """Worst relative error of the hand-written gradients of `tensors` adapter tensors (spread over
    the model), against float64 finite differences of the causal-LM loss on one example cut to
    `tokens` tokens (refpeft.gradcheck.gradient_errors, two random directions each)."""
    from refpeft.gradcheck import gradient_errors
    from refpeft.model.decoder import loss_and_gradients
    from refpeft.train.adapters import trainable_parameters, with_parameters

    model64 = replace(model, weights={n: np.asarray(a, dtype=np.float64) for n, a in model.weights.items()})
    params = {n: np.asarray(a, dtype=np.float64) for n, a in trainable_parameters(model).items()}
    model64 = with_parameters(model64, params)
    names = list(params)
    chosen = [names[round(i * (len(names) - 1) / max(tensors - 1, 1))] for i in range(min(tensors, len(names)))]
    example = dataset.examples[0]
    ids, labels = example.ids[None, -tokens:], example.labels[None, -tokens:]

    def loss(**changed: np.ndarray) -> np.ndarray:
        return loss_and_gradients(with_parameters(model64, {**params, **changed}), ids, labels)[0]

    _, _, grads = loss_and_gradients(model64, ids, labels)
    return gradient_errors(loss, {n: params[n] for n in chosen}, {n: grads[n] for n in chosen}, np.asarray(1.0),
                           seed=seed)


def write_adapter(report: ModelDemoReport, out: str | Path) -> Path:
    """The trained adapter as a PEFT folder (adapter_model.safetensors + adapter_config.json)."""
    from refpeft.peft_format import write_peft_adapter

    return write_peft_adapter(out, report.model.adapter)


def _describe(source: Path, model_config: Any, parameters: int) -> str:
    c = model_config
    size = f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, vocabulary {c.vocab_size}, {parameters:,} parameters"
    if source == BASE_DIR:
        return f"the built-in tiny Llama: {size} (python -m refpeft.demo_base.build)"
    return f"{source.name}: {c.model_type}, {size}"
