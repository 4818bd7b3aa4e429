"""`refpeft train`: fine-tune an adapter, virtual tokens (prompt, P-tuning, prefix) or every weight; write a PEFT folder."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from refpeft.commands import options
from refpeft.errors import ConfigError

DEFAULT_BLOCK = 256       # --block-size when the model has at least that many positions left

HELP = ("train an adapter (LoRA, rsLoRA, DoRA, VeRA, IA3, LoHa, LoKr, OFT, BOFT, AdaLoRA), virtual tokens or the "
        "full model on text or instruction data")

DESCRIPTION = """\
Trains on BASE (a Hugging Face model folder with tokenizer.json, or a GGUF file) with refpeft's own
forward and backward passes, step for step what transformers' Trainer + PEFT compute: micro-batches
summed over --grad-accum, clipping by the global norm, AdamW (or LoRA+ with --loraplus-ratio) with
the learning rate scheduled as transformers' warm-up + constant/linear/cosine schedules.

--data: a text file (tokenised whole and packed into blocks of --block-size tokens), or a .jsonl
file of {"instruction", "input", "output"} or {"messages": [...]} lines rendered through the
tokenizer's chat template, with the loss on the response only (refpeft.train.data).

--modules-to-save lm_head (PEFT's modules_to_save) also trains the modules it names in full,
each starting as a copy of the base's, and saves them in the adapter.

--trainable-tokens 5,17,<|im_start|> (PEFT's trainable_token_indices) also trains those rows of the
embedding (a tied head follows them), each starting as the base's row; beside LoRA the folder is a
LoRA folder with trainable_token_indices, with --method trainable-tokens the rows alone are PEFT's
TRAINABLE_TOKENS folder (refpeft.model.trainable_tokens).

--init pissa, pissa_niter_K or olora (PEFT's init_lora_weights) starts each LoRA module from a
factorisation of its weight and trains it on the rewritten base W - s B0 A0; the folder written at
the end is the plain rank-2r LoRA s [B | -B0] [A ; A0] for the original BASE, as PEFT's
save_pretrained(path_initial_model_for_weight_conversion=...) converts it. --init loftq is an init
for a 4-bit base and needs --nf4: the adapted layers are LoftQ's NF4 weights, and the rank-r
adapter is written for the LoftQ base, saved in OUTPUT_DIR/loftq_base (refpeft.train.base_init).

--method loha, lokr, oft or boft trains PEFT's LoHa, LoKr, OFT or BOFT adapter (--rank is r, or
OFT's / BOFT's block size; LoKr takes --decompose-both and --decompose-factor; BOFT has one
butterfly factor). --method adalora trains PEFT's AdaLoRA: --rank init_r triplets per layer, the
orthogonality term --orth-reg-weight added to the loss, and after every step PEFT's
update_and_allocate prunes them towards --target-r by importance (--tinit, --tfinal, --delta-t,
--beta1, --beta2; total_step = --steps); the folder holds the final rank_pattern
(refpeft.train.adalora_training). An AdaLoRA run is not checkpointed (no --save-every, --resume).

--method prompt, p-tuning or prefix trains --virtual-tokens virtual tokens on the frozen base
(PEFT's PROMPT_TUNING, P_TUNING with --encoder mlp|lstm, PREFIX_TUNING with --projection) and
writes PEFT's folder of the method: the virtual tokens (or per-layer keys and values) themselves.

Writes OUTPUT_DIR/adapter_model.safetensors + adapter_config.json, which PEFT's
PeftModel.from_pretrained loads (--method full writes config.json + model.safetensors instead; the
tokenizer stays with BASE), and checkpoints in OUTPUT_DIR/checkpoints (every --save-every steps and
at the end) from which --resume continues the run exactly. Bad input (a missing file, an unknown target, an unsupported method) is refused with
exit status 2 before anything is written.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", metavar="BASE", help="model folder (config.json, safetensors, tokenizer.json) or .gguf file")
    p.add_argument("--data", required=True, metavar="FILE", help="training text, or .jsonl instruction/chat data")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT_DIR", help="folder for the adapter and checkpoints")
    a = p.add_argument_group("what to train")
    a.add_argument("--method", default="lora",
                   help="lora, rslora, dora, vera, ia3, loha, lokr, oft, boft, adalora, full, trainable-tokens, or "
                        "prompt, p-tuning, prefix (default lora)")
    a.add_argument("--targets", default="q_proj,v_proj",
                   help="comma-separated layer names as PEFT's target_modules, or all-linear (default q_proj,v_proj)")
    a.add_argument("--rank", type=int, default=8,
                   help="rank r; for oft and boft the block size (PEFT's oft_block_size / boft_block_size), for "
                        "adalora init_r (default 8)")
    a.add_argument("--alpha", type=float, default=16.0,
                   help="alpha; scaling alpha / r, rsLoRA alpha / sqrt(r) (default 16)")
    a.add_argument("--rank-pattern", default="", metavar="KEY=R,...", help="per-module ranks, PEFT's rank_pattern")
    a.add_argument("--alpha-pattern", default="", metavar="KEY=A,...", help="per-module alphas, PEFT's alpha_pattern")
    a.add_argument("--modules-to-save", default="", metavar="NAME,...",
                   help="modules trained in full and saved whole, PEFT's modules_to_save (e.g. lm_head)")
    a.add_argument("--trainable-tokens", default="", metavar="IDS",
                   help="also train these rows of the embedding, PEFT's trainable_token_indices: comma-separated "
                        "token ids or tokens of the tokenizer (e.g. 5,17,<|im_start|>); alone with --method "
                        "trainable-tokens (PEFT's TRAINABLE_TOKENS)")
    a.add_argument("--init", default=None, metavar="INIT",
                   help="pissa, pissa_niter_K, olora: PEFT's init_lora_weights that rewrites each adapted weight; "
                        "the saved adapter is converted to a plain rank-2r LoRA for the original base. loftq: "
                        "with --nf4 only (an init for a 4-bit base); saves a rank-r LoRA for the LoftQ base, "
                        "written to OUTPUT_DIR/loftq_base (refpeft.train.base_init)")
    a.add_argument("--decompose-both", action="store_true",
                   help="lokr: factor w1 into a low-rank product too (PEFT's decompose_both)")
    a.add_argument("--decompose-factor", type=int, default=-1, metavar="F",
                   help="lokr: the Kronecker factorisation's factor, PEFT's decompose_factor (default -1: balanced)")
    a.add_argument("--nf4", action="store_true",
                   help="QLoRA: store every projection as bitsandbytes' NF4 (block 64, double quantised) under the adapter")
    d = p.add_argument_group("AdaLoRA (--method adalora; PEFT's AdaLoraConfig, total_step = --steps)")
    d.add_argument("--target-r", type=int, default=8, help="the average rank the budget prunes to (default 8)")
    d.add_argument("--tinit", type=int, default=0, help="steps before pruning starts (default 0)")
    d.add_argument("--tfinal", type=int, default=0, help="final steps at the final rank pattern (default 0)")
    d.add_argument("--delta-t", type=int, default=1, help="steps between two allocations, PEFT's deltaT (default 1)")
    d.add_argument("--beta1", type=float, default=0.85, help="sensitivity smoothing (default 0.85)")
    d.add_argument("--beta2", type=float, default=0.85, help="uncertainty smoothing (default 0.85)")
    d.add_argument("--orth-reg-weight", type=float, default=0.5,
                   help="weight of the orthogonality term added to the loss (default 0.5)")
    v = p.add_argument_group("prompt learning (--method prompt, p-tuning, prefix; refpeft.train.prompt_learning)")
    v.add_argument("--virtual-tokens", type=int, default=8, metavar="K", help="virtual tokens k (default 8)")
    v.add_argument("--prompt-init", default="random",
                   help="prompt: random, sample-vocab or text, PEFT's prompt_tuning_init (default random)")
    v.add_argument("--prompt-init-text", default=None, metavar="TEXT", help="the text of --prompt-init text")
    v.add_argument("--projection", action="store_true", help="prefix: train through PEFT's reparameterisation MLP")
    v.add_argument("--encoder", default="mlp", help="p-tuning: the prompt encoder, mlp or lstm (default mlp)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, required=True, help="optimiser steps")
    o.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    o.add_argument("--batch-size", type=int, default=1, help="examples per micro-batch (default 1)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    o.add_argument("--accumulation", default="mean",
                   help="mean: each micro-batch's mean loss / G; tokens: every target token weighs the same "
                        "(transformers 5's Trainer) (default mean)")
    o.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    o.add_argument("--schedule", default="linear", help="constant, linear or cosine after the warm-up (default linear)")
    o.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip the global gradient norm; 0: no clipping (default 1)")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay (default 0)")
    o.add_argument("--loraplus-ratio", type=float, default=None, help="LoRA+: B matrices at lr * ratio")
    o.add_argument("--block-size", type=int, default=None,
                   help="tokens per text block / longest example (default 256, or the model's positions left after "
                        "any virtual tokens when fewer)")
    o.add_argument("--seed", type=options.seed, default=0, help="seed of the adapter's init and the data order (default 0)")
    o.add_argument("--dtype", default="float32", help="float32 or float64 (default float32)")
    k = p.add_argument_group("keeping what the base knew (refpeft.train.objective)")
    k.add_argument("--general", metavar="FILE", help="general text or .jsonl: the EWC reference set, the rehearsal "
                                                     "data and (its last examples, held out) the drift report")
    k.add_argument("--distill", type=float, default=0.0, metavar="ALPHA",
                   help="add ALPHA x KL(base || adapted) on the batch's tokens (default 0)")
    k.add_argument("--temperature", type=float, default=2.0, help="the distillation temperature T (default 2)")
    k.add_argument("--ewc", type=float, default=0.0, metavar="LAMBDA",
                   help="add the EWC penalty LAMBDA/2 sum F (change)^2, F from --general (default 0)")
    k.add_argument("--ewc-examples", type=int, default=32, metavar="N", help="examples for the Fisher (default 32)")
    k.add_argument("--rehearsal-fraction", type=float, default=0.0, metavar="F",
                   help="replace this fraction of every batch with --general examples (default 0)")
    k.add_argument("--prior", metavar="FILE", help="class-prior data: a second batch each micro-batch")
    k.add_argument("--prior-weight", type=float, default=0.0, metavar="LAMBDA", help="its weight (default 0)")
    r = p.add_argument_group("checkpoints")
    r.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default 0: only at the end)")
    r.add_argument("--resume", action="store_true", help="continue the run in OUTPUT_DIR from its latest checkpoint")
    r.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after step N (checkpointed), keeping the schedule of --steps; --resume continues")
    p.set_defaults(func=run, command="train")


def run(args: argparse.Namespace) -> int:
    from refpeft.model.decoder import Model, check_adapter_targets, quantize_linear_layers
    from refpeft.model.load import load_model
    from refpeft.train.adapters import FULL
    from refpeft.model.prompt_methods import PROMPT_METHODS, virtual_tokens
    from refpeft.train.checkpoints import latest_checkpoint, resume
    from refpeft.train.data import read_dataset
    from refpeft.train.state import TrainingConfig

    output = Path(args.output)
    config = TrainingConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                            weight_decay=args.weight_decay, warmup_steps=args.warmup, schedule=args.schedule,
                            max_grad_norm=args.max_grad_norm or None, loraplus_ratio=args.loraplus_ratio,
                            accumulation=args.accumulation, seed=args.seed)
    if args.dtype not in ("float32", "float64"):
        raise ConfigError(f"--dtype must be float32 or float64, got {args.dtype!r}")
    has_run = (output / "checkpoints").exists()
    if has_run and not args.resume:
        raise ConfigError(f"{output} already holds a training run; pass --resume to continue it, or choose another -o")
    if args.resume and latest_checkpoint(output) is None:
        raise ConfigError(f"--resume: {output} has no checkpoint to continue from")
    if not Path(args.data).is_file():
        raise ConfigError(f"--data {args.data}: no such file")
    model_config, weights, tokenizer = load_model(args.base, dtype=args.dtype)
    base = Model(model_config, weights)
    if args.nf4:
        if args.method == FULL:
            raise ConfigError("--nf4 stores a frozen 4-bit base: it trains an adapter, not --method full")
        base = quantize_linear_layers(base)
    if args.method == FULL and args.modules_to_save.strip():
        raise ConfigError("--modules-to-save trains whole modules next to an adapter; --method full trains every "
                          "weight already")
    if args.trainable_tokens.strip() and (args.method == FULL or args.method in PROMPT_METHODS):
        raise ConfigError(f"--trainable-tokens trains embedding rows beside LoRA or alone (--method "
                          f"trainable-tokens), not with --method {args.method}")
    if args.method in PROMPT_METHODS:
        model = _new_prompt_learning(base, args, tokenizer)
    else:
        model = base if args.method == FULL else replace(base, adapter=_new_adapter(base, args, tokenizer))
    initial = None
    if args.init is not None:
        model, initial = _rewrite_base(model, args, original=weights)
    check_adapter_targets(model)
    adalora = _adalora_training(model, args, output)
    if args.block_size is None:
        args.block_size = min(DEFAULT_BLOCK, model.config.max_position_embeddings - virtual_tokens(model))
    dataset = read_dataset(args.data, tokenizer, block_size=args.block_size)
    forgetting, held_out = forgetting_settings(args, model, tokenizer)
    state = resume(output, model, config, data_fingerprint=dataset.fingerprint()) if args.resume else None
    final, last = _train_with_progress(model, dataset, config, state=state, output=output, args=args,
                                       forgetting=forgetting, adalora=adalora)
    if final.step < config.steps:
        print(f"stopped after step {final.step} of {config.steps}; checkpoint in {latest_checkpoint(output)} "
              "(--resume continues)")
        return 0
    if adalora is not None:
        print(_write_adalora_result(final, output, adalora, source=args.base))
    else:
        print(_write_result(final.model, output, source=args.base, init=args.init, initial=initial,
                            original=weights))
    if last is not None and len(last.terms) > 1:
        print("  last step: " + ", ".join(f"{name} {value:.4f}" for name, value in last.terms.items()))
    if held_out is not None:
        from refpeft.train.objective import drift

        nats = drift(final.model, held_out, base_weights=None if final.model.adapter else weights)
        print(f"  drift from the base: KL(base || trained) = {nats:.4g} nats per token on {len(held_out)} held-out "
              f"--general examples")
    return 0


def forgetting_settings(args: argparse.Namespace, model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """(the Forgetting of the --general/--distill/... options or None, the held-out general examples or None)."""
    from refpeft.train.data import TokenDataset, read_dataset
    from refpeft.train.ewc import diagonal_fisher, fisher_names
    from refpeft.train.objective import Forgetting, general_per_batch

    general_per_batch(args.rehearsal_fraction, args.batch_size)     # refused before the general data is read
    general = held_out = None
    if args.general is not None:
        data = read_dataset(args.general, tokenizer, block_size=args.block_size)
        keep = max(1, len(data) // 10) if len(data) > 1 else 0           # the last tenth is held out for the drift
        general = TokenDataset(data.examples[:len(data) - keep], pad_id=data.pad_id, block_size=data.block_size)
        held_out = TokenDataset(data.examples[len(data) - keep:], pad_id=data.pad_id, block_size=data.block_size) \
            if keep else None
    needs_general = [flag for flag, on in (("--ewc", args.ewc), ("--rehearsal-fraction", args.rehearsal_fraction))
                     if on]
    if needs_general and general is None:
        raise ConfigError(f"{' and '.join(needs_general)} need general data: --general FILE")
    prior = None if args.prior is None else read_dataset(args.prior, tokenizer, block_size=args.block_size)
    if not (args.distill or args.ewc or args.rehearsal_fraction or args.prior_weight):
        return None, held_out
    fisher = None
    if args.ewc:
        names = fisher_names(model)
        examples = [(e.ids[None, :], e.labels[None, :], None) for e in general.examples[:args.ewc_examples]]
        fisher = diagonal_fisher(model, examples, names)
    settings = Forgetting(distill=args.distill, temperature=args.temperature, ewc=args.ewc, fisher=fisher,
                          rehearsal=general if args.rehearsal_fraction else None,
                          rehearsal_fraction=args.rehearsal_fraction, prior=prior, prior_weight=args.prior_weight,
                          base_weights=None if model.adapter is not None else dict(model.weights))
    return settings, held_out


def _new_prompt_learning(base: Any, args: argparse.Namespace, tokenizer: Any) -> Any:
    """The base with a fresh prompt-learning encoder (refpeft.train.prompt_learning), after refusing
    the options that do not apply to it."""
    from refpeft.model.prompt_methods import prompt_method
    from refpeft.train.prompt_learning import new_prompt_learning

    refused = [flag for flag, on in (("--modules-to-save", args.modules_to_save.strip()),
                                     ("--loraplus-ratio", args.loraplus_ratio is not None), ("--ewc", args.ewc))
               if on]
    if not prompt_method(args.method).keeps_positions:   # k positions in front of the logits: none of the base's
        refused += [flag for flag, on in (("--distill", args.distill), ("--general", args.general)) if on]
    if refused:
        raise ConfigError(f"{', '.join(refused)} do not apply to --method {args.method}")
    init = args.prompt_init.upper().replace("-", "_")
    if init != "TEXT" and args.prompt_init_text is not None:
        raise ConfigError("--prompt-init-text is the text of --prompt-init text")
    text_ids = None if init != "TEXT" else tokenizer.encode(args.prompt_init_text or "")
    return new_prompt_learning(base, args.method, k=args.virtual_tokens, init=init, text_ids=text_ids,
                               projection=args.projection, encoder=args.encoder.upper(), seed=args.seed)


def token_ids(text: str, tokenizer: Any, *, vocab_size: int) -> list[int]:
    """--trainable-tokens: each comma-separated item a token id, or a token of the tokenizer's
    vocabulary (its id); checked against the model's vocabulary (refpeft.model.trainable_tokens)."""
    from refpeft.model.trainable_tokens import check_token_indices

    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        return []
    ids = []
    for item in items:
        if item.lstrip("-").isdigit():
            ids.append(int(item))
        elif (found := tokenizer.backend.token_to_id(item)) is not None:
            ids.append(int(found))
        else:
            raise ConfigError(f"--trainable-tokens: {item!r} is neither a token id nor a token of the tokenizer")
    return check_token_indices(ids, vocab_size)


def _new_adapter(base: Any, args: argparse.Namespace, tokenizer: Any) -> Any:
    from refpeft.train.adapters import ALL_LINEAR, new_adapter

    names = args.targets.strip()
    targets = ALL_LINEAR if names == ALL_LINEAR else [t.strip() for t in names.split(",") if t.strip()]
    adapter = new_adapter(base, method=args.method, targets=targets, rank=args.rank, alpha=args.alpha,
                          rank_pattern=_pattern(args.rank_pattern, int, "--rank-pattern"),
                          alpha_pattern=_pattern(args.alpha_pattern, float, "--alpha-pattern"), seed=args.seed,
                          modules_to_save=[m.strip() for m in args.modules_to_save.split(",") if m.strip()],
                          trainable_tokens=token_ids(args.trainable_tokens, tokenizer,
                                                     vocab_size=base.config.vocab_size),
                          init_options={name: value for name, value, default in (
                              ("decompose_both", args.decompose_both, False),
                              ("decompose_factor", args.decompose_factor, -1)) if value != default})
    return replace(adapter, config={**adapter.config, "base_model_name_or_path": str(args.base),
                                    "task_type": "CAUSAL_LM"})


def _adalora_training(model: Any, args: argparse.Namespace, output: Path) -> Any:
    """The AdaloraTraining of an AdaLoRA run (refpeft.train.adalora_training), None for other methods;
    refuses the options an AdaLoRA run does not support."""
    from refpeft.methods.adalora_allocator import AdaloraSchedule
    from refpeft.train.adalora_training import AdaloraTraining, is_adalora

    if not is_adalora(model):
        return None
    refused = [flag for flag, on in (("--save-every", args.save_every), ("--stop-after", args.stop_after is not None),
                                     ("--resume", args.resume), ("--loraplus-ratio", args.loraplus_ratio is not None),
                                     ("--nf4", args.nf4), ("--accumulation tokens", args.accumulation == "tokens"))
               if on]
    if refused:
        raise ConfigError(f"--method adalora does not take {', '.join(refused)} (its allocator state is not "
                          "checkpointed; PEFT adds its orthogonality term per micro-batch loss)")
    if (output / "adapter_config.json").exists():
        raise ConfigError(f"{output} already holds an adapter; choose another -o")
    schedule = AdaloraSchedule(init_r=args.rank, target_r=args.target_r, total_step=args.steps, tinit=args.tinit,
                               tfinal=args.tfinal, deltaT=args.delta_t, beta1=args.beta1, beta2=args.beta2)
    return AdaloraTraining(schedule, orth_reg_weight=args.orth_reg_weight)


def _train_with_progress(model: Any, dataset: Any, config: Any, *, state: Any, output: Path,
                         args: argparse.Namespace, forgetting: Any, adalora: Any = None) -> tuple[Any, Any]:
    """The final state and the last step's report (None when no step ran)."""
    from tqdm import tqdm

    from refpeft.train.loop import train

    start = 0 if state is None else state.step
    reports = []
    with tqdm(total=config.steps, initial=start, desc="train", unit="step", file=sys.stderr) as bar:
        def progress(report: Any) -> None:
            bar.set_postfix(loss=f"{report.loss:.4f}", lr=f"{report.lr:.3g}", tok_s=f"{report.tokens_per_second:.0f}")
            bar.update(1)
            reports[:] = [report]

        final = train(model, dataset, config, state=state, checkpoint_dir=output if adalora is None else None,
                      save_every=args.save_every, stop_after=args.stop_after, progress=progress,
                      forgetting=forgetting, adalora=adalora)
    return final, (reports[0] if reports else None)


def _rewrite_base(model: Any, args: argparse.Namespace, *, original: Any) -> tuple[Any, Any]:
    """--init: the model with its LoRA modules initialised by PiSSA/OLoRA/LoftQ and the base rewritten,
    and the adapter as initialised (refpeft.train.base_init)."""
    from refpeft.methods.lora import LORA
    from refpeft.train.adapters import TRAINING_METHODS
    from refpeft.train.base_init import rewrite_base

    if TRAINING_METHODS.get(args.method, (None,))[0] is not LORA:
        raise ConfigError(f"--init {args.init} initialises LoRA (--method lora or rslora), not --method {args.method}")
    refused = [flag for flag, on in (("--distill", args.distill), ("--general", args.general)) if on]
    if refused:
        raise ConfigError(f"{', '.join(refused)} compare with the base, which --init {args.init} rewrites")
    return rewrite_base(model, init=args.init, seed=args.seed, original=original)


def _write_result(model: Any, output: Path, *, source: str, init: str | None = None, initial: Any = None,
                  original: Any = None) -> str:
    from refpeft.model.weights import save_model_folder
    from refpeft.peft_format import write_peft_adapter
    from refpeft.train.adapters import trainable_parameters

    count = sum(int(t.size) for t in trainable_parameters(model).values())
    note = ""
    if initial is not None:
        model, note = _base_init_result(model, output, init=init, initial=initial, original=original)
    if model.prompt_encoder is not None:
        from refpeft.model.prompt_methods import prompt_method_of, virtual_tokens
        from refpeft.train.prompt_learning import write_prompt_folder

        write_prompt_folder(output, model, base_model=source)
        k = virtual_tokens(model)
        return (f"wrote {output}: {prompt_method_of(model).name} tuning's {k} virtual tokens "
                f"({count} trained parameters) "
                f"on {source}, for PeftModel.from_pretrained")
    if model.adapter is None:
        save_model_folder(output, model.config, dict(model.weights))
        return f"wrote {output}: the fully fine-tuned model ({count} parameters trained), a model folder"
    write_peft_adapter(output, model.adapter, tied_embeddings=model.config.tie_word_embeddings)
    saved, rows = model.adapter.saved_module_paths, len(model.adapter.token_indices)
    if not model.adapter.modules:
        return (f"wrote {output}: {rows} trainable token rows ({count} trained parameters) on {source}, "
                "for PeftModel.from_pretrained")
    return (f"wrote {output}: a {model.adapter.method} adapter of {len(model.adapter.modules)} modules "
            + (f"and {len(saved)} saved in full ({', '.join(saved)}) " if saved else "")
            + (f"and {rows} trainable token rows " if rows else "")
            + f"({count} trained parameters) on {source}, for PeftModel.from_pretrained" + note)


def _write_adalora_result(final: Any, output: Path, adalora: Any, *, source: str) -> str:
    """Write PEFT's ADALORA folder of an AdaLoRA run (refpeft.train.adalora_training); a line saying what it is."""
    from refpeft.train.adalora_training import write_adalora_folder

    write_adalora_folder(output, final.model, final.adalora, adalora)
    modules = len(final.model.adapter.modules)
    total = adalora.schedule.init_r * modules
    pattern = None if final.adalora is None else final.adalora.rank_pattern
    kept = total if pattern is None else sum(int(sum(bool(b) for b in mask)) for mask in pattern.values())
    return (f"wrote {output}: an adalora adapter of {modules} modules, {kept} of {total} triplets kept "
            f"(its rank_pattern), on {source}, for PeftModel.from_pretrained")


def _base_init_result(model: Any, output: Path, *, init: str, initial: Any, original: Any) -> tuple[Any, str]:
    """The model whose adapter is saved after an --init run, and a line saying what it is (base_init)."""
    from refpeft.model.weights import save_model_folder
    from refpeft.methods.lora_init import convert_to_plain_lora
    from refpeft.train.base_init import LOFTQ, loftq_base_weights

    if init != LOFTQ:
        adapter = convert_to_plain_lora(model.adapter, initial)
        return replace(model, adapter=adapter), ("\n  saved as a plain LoRA of rank 2r for the original base "
                                                 "(PEFT's path_initial_model_for_weight_conversion)")
    folder = save_model_folder(output / "loftq_base", model.config, loftq_base_weights(model, original))
    adapter = replace(model.adapter, config={**model.adapter.config, "base_model_name_or_path": str(folder)})
    return replace(model, adapter=adapter), (f"\n  LoftQ: the adapter is for the LoftQ base in {folder} (load it in "
                                             "4 bits), as PEFT's LoftQ recipe saves it")


def _pattern(text: str, kind: type, option: str) -> dict[str, Any]:
    """"KEY=VALUE,KEY=VALUE" as a dict (PEFT's rank_pattern / alpha_pattern); {} when empty."""
    pattern = {}
    for item in (s.strip() for s in text.split(",") if s.strip()):
        key, sep, value = item.rpartition("=")
        try:
            pattern[key] = kind(value)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise ConfigError(f"{option}: expected KEY=VALUE items separated by commas, got {item!r}")
    return pattern
