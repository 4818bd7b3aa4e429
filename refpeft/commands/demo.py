"""`refpeft demo`: fine-tune a LoRA adapter on a tiny pretrained Llama (or, with --layer, on one linear layer)."""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from typing import Any

from refpeft.commands import options
from refpeft.backend import FLOAT_NAMES
from refpeft.demo import GRADIENT_TOLERANCE as LAYER_GRADIENT_TOLERANCE
from refpeft.demo import METHODS, DemoConfig, DemoReport, resolved, run_demo
from refpeft.demo_model import BASE_HELDOUT, GRADIENT_TOLERANCE, TARGET, ModelDemoConfig, ModelDemoReport, Scores
from refpeft.errors import ConfigError

HELP = "fine-tune a LoRA adapter that teaches a tiny pretrained Llama to answer in JSON (--layer: one layer)"

DESCRIPTION = """\
Fine-tunes a LoRA adapter on the tiny Llama that ships inside refpeft (pretrained by
`python -m refpeft.demo_base.build` on facts about made-up objects, answering in sentences) to
answer fact questions in one JSON format asked for through the chat template:

    what colour is the tonem? answer in json.  ->  {"object": "tonem", "colour": "yellow"}

It trains on the JSON answers about some objects and scores greedy answers about the others, whose
facts the base knows from pretraining but never saw in JSON: the held-out exact-match rate before
and after, with samples. On the way it checks the adapter's hand-written gradients through the whole
model against float64 finite differences. Exit status 1 if the gradient check fails or (on the
built-in base) held-out exact match stays below 90%.

--base PATH runs the same fine-tune on another model folder or GGUF file (SmolLM2, for one; use a
small --steps): it learns the format, but the facts are the tiny base's, which it never learned.

--layer runs the one-layer demo instead: a frozen linear layer whose targets hide a low-rank delta,
which the adapter (--method lora, dora, vera or qlora) has to recover; it reports the loss, the
captured share of the delta, a gradient check and parameter counts, and with the onnx extra
exports the adapter and serves it in ONNX Runtime. Exit status 1 if a gradient check fails or the
loss does not fall 100x.
"""

LAYER_ONLY = ("method", "loraplus_ratio", "dora_gradient", "dtype", "no_export")
MODEL_ONLY = ("base", "heldout")
HIDDEN = {"lora": "rank 4", "dora": "rank 4", "vera": "VeRA vectors on the shared projections",
          "qlora": "rank 4, NF4 base"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    model, layer = ModelDemoConfig(), DemoConfig()
    p = subparsers.add_parser("demo", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", action="store_true", help="run the one-layer demo (hidden low-rank delta) instead")
    p.add_argument("--rank", type=int, default=None,
                   help=f"adapter rank r (default {model.rank}; --layer: {layer.rank})")
    p.add_argument("--alpha", type=float, default=None,
                   help=f"LoRA alpha; scaling is alpha / r (default {model.alpha:g}; --layer: {layer.alpha:g})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimiser steps (default {model.steps}; --layer: {layer.steps})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak AdamW learning rate (default {model.lr:g}; --layer: {layer.lr:g})")
    p.add_argument("--seed", type=options.seed, default=None,
                   help="seed of the held-out split, the adapter's init and the data order (--layer: of the task "
                        "and the init) (default 0)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write the trained adapter as a PEFT folder to DIR (--layer: keep the exported ONNX "
                        "graphs and adapter file in DIR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    m = p.add_argument_group("the model demo")
    m.add_argument("--base", metavar="PATH", default=None,
                   help="fine-tune this model folder or .gguf file instead of the built-in tiny base")
    m.add_argument("--heldout", type=int, default=None, metavar="N",
                   help=f"score N held-out questions (default: all of them; with --base, {BASE_HELDOUT})")
    lay = p.add_argument_group("the one-layer demo (--layer)")
    lay.add_argument("--method", choices=sorted(METHODS), default=None, help=f"adapter method (default {layer.method})")
    lay.add_argument("--loraplus-ratio", type=float, default=None, metavar="RATIO",
                     help="use LoRA+ parameter groups: B learns RATIO times faster than A")
    lay.add_argument("--dora-gradient", choices=("detached", "exact"), default=None,
                     help="DoRA backward: the norm detached as in PEFT, or differentiated exactly (default detached)")
    lay.add_argument("--dtype", choices=FLOAT_NAMES, default=None,
                     help="training precision; bfloat16 is emulated in float32 (default: float64; "
                          "bfloat16 for qlora, computed as bitsandbytes + PEFT do)")
    lay.add_argument("--no-export", action="store_true", help="skip the ONNX export step")
    p.set_defaults(func=run, command="demo")


def run(args: argparse.Namespace) -> int:
    mode, other = ("--layer", MODEL_ONLY) if args.layer else ("the model demo", LAYER_ONLY)
    given = [name for name in other if getattr(args, name) not in (None, False)]
    if given:
        option = "--" + given[0].replace("_", "-")
        raise ConfigError(f"{option} does not apply to {mode}" + ("" if args.layer else " (it is a --layer option)"))
    if args.out:  # a file given as the folder is refused now, not after training
        from refpeft.io import check_outputs
        from refpeft.peft_format import adapter_files

        check_outputs(adapter_files(args.out), inputs=[args.base] if args.base else [])
    return run_layer(args) if args.layer else run_model(args)


# --- the model demo ---------------------------------------------------------------------------------


def run_model(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from refpeft.demo_model import run_model_demo, write_adapter

    chosen = {name: getattr(args, name) for name in ("rank", "alpha", "steps", "lr", "seed", "base", "heldout")}
    config = ModelDemoConfig(**{k: v for k, v in chosen.items() if v is not None})
    bar: list[Any] = []          # the progress bar, made at the first training step

    def say(line: str) -> None:
        if bar and not args.no_progress:
            tqdm.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def progress(step: Any) -> None:
        if not bar:
            bar.append(tqdm(total=step.total, desc="  training", unit="step", disable=args.no_progress,
                            file=sys.stderr, dynamic_ncols=True))
        bar[0].set_postfix(loss=f"{step.loss:.4f}", tok_s=f"{step.tokens_per_second:,.0f}")
        bar[0].update(1)
        if args.no_progress and (step.step % max(1, step.total // 5) == 0 or step.step == step.total):
            say(f"  step {step.step:4d}/{step.total}  loss {step.loss:.4f}  {step.tokens_per_second:,.0f} tokens/s")

    def stage(name: str, report: ModelDemoReport) -> None:
        for line in stage_lines(name, report):
            say(line)

    print(header(config), flush=True)
    report = run_model_demo(config, progress=progress, stage=stage)
    if bar:
        bar[0].close()
    for line in result_lines(report):
        print(line)
    if args.out:
        folder = write_adapter(report, args.out)
        print(f"  adapter      wrote {folder}: a PEFT folder (PeftModel.from_pretrained loads it on the base)")
    ok = report.gradients_ok and (report.target_met or not report.builtin)
    return 0 if ok else 1


def header(config: ModelDemoConfig) -> str:
    base = "the built-in tiny Llama" if config.base is None else config.base
    return f"refpeft demo: a LoRA adapter teaches {base} to answer in JSON"


def stage_lines(name: str, report: ModelDemoReport) -> list[str]:
    """What the demo prints as it reaches each stage (refpeft.demo_model.run_model_demo's `stage`)."""
    c, q = report.config, report.questions[0]
    if name == "before":
        held = len({q.thing.name for q in report.questions})
        share = report.trainable_parameters / report.base_parameters
        knows = report.knows / len(report.questions)
        return [f"  base         {report.base}",
                f"  skill        {q.text}  ->  {q.expected}",
                f"  data         {report.train_examples:,} JSON chats about {len(report.train_objects)} objects; "
                f"{_count(len(report.questions), 'held-out question')} about {_count(held, 'other object')}",
                f"  knowledge    asked plainly ({q.plain_text}), the base answers "
                f"{knows:.1%} of the held-out questions with the",
                f"               tiny base's pretraining sentence ({_short(report.plain_sample, 60)}): it "
                + ("knows those facts" if knows >= TARGET else "does not know those facts"),
                *score_lines("before", report.before, report),
                f"  adapter      LoRA r={c.rank}, alpha {c.alpha:g} on {', '.join(c.targets)}: "
                f"{report.trainable_parameters:,} parameters ({share:.1%} of the base)"]
    if name == "gradient check":
        worst = max(report.gradient_errors.values())
        verdict = "ok" if report.gradients_ok else "FAILED"
        names = ", ".join(re.sub(r"model\.layers\.(\d+)\.(self_attn|mlp)\.", r"layer \1 ", name)
                          for name in report.gradient_errors)
        return [f"  gradients    {verdict} after step {len(report.losses)}: worst relative error {worst:.1e} "
                f"(tolerance {GRADIENT_TOLERANCE:.0e}) against float64 finite",
                f"               differences of the loss, for {names}"]
    return []


def score_lines(when: str, scores: Scores, report: ModelDemoReport) -> list[str]:
    lines = [f"  {when:<12} held-out exact match {scores.rate('exact'):.1%} ({scores.exact}/{scores.count}), "
             f"JSON format {scores.rate('format'):.1%}, right fact stated {scores.rate('fact'):.1%}"]
    for q, answer in list(zip(report.questions, scores.answers))[: report.config.samples]:
        lines.append(f"                 {q.text}  ->  {_short(answer)}")
    return lines


def result_lines(report: ModelDemoReport) -> list[str]:
    losses = report.losses
    last = sum(losses[-10:]) / len(losses[-10:])
    lines = [f"  training     {_count(len(losses), 'step')} of {report.config.batch_size} chats: loss "
             f"{losses[0]:.3f} -> {last:.4f} (the last 10 steps), {report.tokens_per_second:,.0f} tokens/s",
             *score_lines("after", report.after, report)]
    before, after = report.before.rate("exact"), report.after.rate("exact")
    if report.builtin:
        verdict = "the target is met" if report.target_met else "TARGET MISSED"
        lines.append(f"  result       held-out exact match {before:.1%} -> {after:.1%}: {verdict} "
                     f"(at least {TARGET:.0%})")
    else:
        lines.append(f"  result       held-out exact match {before:.1%} -> {after:.1%}, JSON format "
                     f"{report.before.rate('format'):.1%} -> {report.after.rate('format'):.1%}")
        lines.append("               (the facts are the tiny base's, which this model never learned)")
    lines.append(f"  wall time    {report.seconds:.1f} s")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _short(text: str, width: int = 72) -> str:
    """A sample answer on one line, cut to `width` characters."""
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


# --- the one-layer demo (--layer) -------------------------------------------------------------------


def run_layer(args: argparse.Namespace) -> int:
    chosen = {name: getattr(args, name) for name in ("method", "rank", "alpha", "steps", "lr", "seed", "dtype",
                                                      "loraplus_ratio", "dora_gradient")}
    config = resolved(DemoConfig(**{k: v for k, v in chosen.items() if v is not None}))
    print(f"refpeft demo --layer: {config.method} r={config.rank} on a {config.d}x{config.k} layer (hidden delta: "
          f"{HIDDEN[config.method]}), {config.tokens} tokens, {config.dtype}")
    from tqdm import tqdm

    with tqdm(total=config.steps, desc="training", unit="step", disable=args.no_progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        def progress(step: int, loss: float) -> None:
            bar.update(1)
            if step % 10 == 0 or step == config.steps - 1:
                bar.set_postfix(loss=f"{loss:.3e}")

        report = run_demo(config, progress=progress)
    print(format_report(report))
    exported = True if args.no_export else export_step(report, args.out)
    return 0 if report.gradients_ok and report.loss_drop >= 100 and exported else 1


def export_step(report: DemoReport, out: str | None) -> bool:
    """Export the trained adapter to ONNX and check ONNX Runtime against refpeft; False if it disagrees."""
    try:
        from refpeft_onnx.demo import export_and_check, skip_reason
    except ImportError:
        print("  ONNX export      skipped: the exporter package refpeft_onnx is not installed")
        return True
    reason = skip_reason()
    if reason:
        print(f"  {reason}")
        return True
    with tempfile.TemporaryDirectory(prefix="refpeft-demo-") as tmp:
        lines = export_and_check(out or tmp, W0=report.frozen["W0"], bias=report.frozen["bias"],
                                 adapter=report.adapter())
    print("  ONNX export" + ("" if out else " (to a temporary directory; --out DIR keeps the files)"))
    for line in lines:
        print(f"    {line}")
    return not any("FAILED" in line for line in lines)


def format_report(report: DemoReport) -> str:
    grad_lines = ", ".join(f"d{name} {err:.1e}" for name, err in sorted(report.gradient_errors.items()))
    verdict = "ok" if report.gradients_ok else f"FAILED (tolerance {LAYER_GRADIENT_TOLERANCE:.0e})"
    share = report.trainable_parameters / report.full_parameters
    return "\n".join([
        f"  loss            {report.losses[0]:.4e} -> {report.losses[-1]:.4e}  ({report.loss_drop:.3g}x lower)",
        f"  captured energy {report.captured_energy:.6f}  of the hidden delta (1 = recovered exactly)",
        f"  gradient check  {verdict}: worst relative error vs finite differences: {grad_lines}",
        f"  parameters      {report.trainable_parameters:,} trainable vs {report.full_parameters:,} for full "
        f"fine-tuning ({share:.2%})",
        f"  wall time       {report.seconds:.2f} s",
    ])
