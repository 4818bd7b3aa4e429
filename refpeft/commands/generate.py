"""`refpeft generate`: continue a prompt with a model folder or GGUF file, optionally through a PEFT adapter."""

from __future__ import annotations

import argparse

from refpeft.commands import options

HELP = "continue a prompt with a base model (HF folder or GGUF), optionally with a PEFT adapter"

DESCRIPTION = """\
Loads BASE (a Hugging Face model folder with tokenizer.json, or a .gguf file) and prints the
continuation of --prompt, computed by refpeft's decoder with a KV cache (refpeft.model.generate).
With --adapter, the PEFT adapter directory is read and checked against the model (every adapted
module must be one of its linear layers, of the right size; every saved module, PEFT's
modules_to_save, one of its modules) and runs unmerged on top of it. A PROMPT_TUNING or P_TUNING
folder's virtual tokens go in front of the prompt, a PREFIX_TUNING folder's keys and values are
every layer's initial cache, as PEFT's generate means them (refpeft.model.generate).

Decoding is greedy unless a sampling option is given; sampling takes transformers' defaults
(temperature 1, top-k 50, top-p 1), applied in transformers' order, and draws from NumPy's
generator seeded with --seed (so it is reproducible, but not torch's draws). Generation stops at
the tokenizer's eos token or after --max-new-tokens. By default the prompt is sent as a user
message through the model's chat template when it has one (--no-chat sends the raw text).
Exit status 2 and a message on a missing or unreadable model or adapter, an adapter whose
modules the model lacks, or a prompt longer than the model's positions.

With --onnx DIR (a folder written by `refpeft export --base MODEL ...`), the decode loop runs in
onnxruntime-genai instead (refpeft_onnx.genai_run): refpeft encodes the prompt with the folder's
tokenizer and chat template, genai generates, and --adapter NAME picks one of the folder's
adapters/NAME.onnx_adapter files (none: the base, or the merged adapter). Sampling then draws
from genai's own generator, seeded with --seed.
"""

SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "seed": 0}   # transformers' generate defaults


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", metavar="BASE", nargs="?",
                   help="model folder (config.json, safetensors, tokenizer.json) or .gguf file")
    p.add_argument("--onnx", metavar="DIR", help="generate through onnxruntime-genai from a folder `refpeft export` wrote")
    p.add_argument("--adapter", metavar="DIR|NAME",
                   help="PEFT adapter directory; with --onnx, the name of one of the folder's adapters")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate at most (32)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (the default)")
    p.add_argument("--temperature", type=float, metavar="T", help="sample, dividing the logits by T (1.0)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely tokens (50; 0: all)")
    p.add_argument("--top-p", type=float, metavar="P", help="sample from the smallest set holding probability P (1.0)")
    p.add_argument("--seed", type=options.seed, metavar="S", help="seed of the sampling generator (0)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="send the prompt through the chat template (default: when the tokenizer has one)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="compute precision (float32)")
    p.set_defaults(func=run, command="generate")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from refpeft.errors import ConfigError
    from refpeft.model import load
    from refpeft.model.adapted import with_adapter
    from refpeft.model.decoder import Model
    from refpeft.model.generate import Sampling, generate, prompt_ids

    chosen = {name: getattr(args, name) for name in SAMPLING_DEFAULTS if getattr(args, name) is not None}
    if args.greedy and chosen:
        flags = ", ".join("--" + n.replace("_", "-") for n in chosen)
        raise ConfigError(f"--greedy takes no sampling options (got {flags})")
    if (args.base is None) == (args.onnx is None):
        raise ConfigError("give either BASE (a model folder or .gguf file) or --onnx DIR, not both or neither")
    if args.onnx is not None:
        return run_onnx(args, chosen)
    config, weights, tokenizer = load.load_model(args.base, dtype=args.dtype)
    if tokenizer is None:
        raise ConfigError(f"{args.base}: the model has no tokenizer (tokenizer.json) to encode the prompt with")
    model = Model(config, weights)
    if args.adapter is not None:
        model = with_prompt_learning(model, args.adapter, dtype=args.dtype) or \
            with_adapter(model, args.adapter, dtype=args.dtype)
    sampling, rng = None, None
    if chosen:
        options = {**SAMPLING_DEFAULTS, **chosen}
        sampling = Sampling(temperature=options["temperature"], top_k=options["top_k"], top_p=options["top_p"])
        rng = np.random.default_rng(options["seed"])
    ids = prompt_ids(tokenizer, args.prompt, chat=args.chat)
    [new] = generate(model, [ids], max_new_tokens=args.max_new_tokens, sampling=sampling, rng=rng,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(new, skip_special_tokens=True))
    return 0


def with_prompt_learning(model, directory: str, *, dtype: str):
    """`model` with the PROMPT_TUNING / P_TUNING virtual tokens or PREFIX_TUNING table of `directory`,
    read by its kind's reader (refpeft.model.prompt_methods) into the field the kind fills; None when
    the folder holds another kind of adapter."""
    from dataclasses import replace
    from pathlib import Path

    from refpeft.backend import namespace
    from refpeft.io import read_json_object
    from refpeft.model.prompt_methods import prompt_method_of_type

    config_file = Path(directory) / "adapter_config.json"
    if not config_file.is_file():
        return None                                    # with_adapter names what is missing
    row = prompt_method_of_type(read_json_object(config_file).get("peft_type"))
    if row is None:
        return None
    table, _ = row.read(directory)
    xp_table = namespace(model.weights["model.embed_tokens.weight"]).asarray(table.astype(dtype))
    return replace(model, **{row.fills: xp_table})


def run_onnx(args: argparse.Namespace, chosen: dict) -> int:
    """The continuation through onnxruntime-genai (refpeft_onnx.genai_run)."""
    from refpeft.commands.export import require_onnx
    from refpeft.model.generate import prompt_ids
    from refpeft.model.tokenizer import tokenizer_from_folder

    require_onnx()
    from refpeft_onnx.genai_run import GenaiModel, GenaiSampling

    tokenizer = tokenizer_from_folder(args.onnx)
    model = GenaiModel(args.onnx)
    sampling = GenaiSampling(**{**SAMPLING_DEFAULTS, **chosen}) if chosen else None
    ids = prompt_ids(tokenizer, args.prompt, chat=args.chat)
    new = model.generate(ids, max_new_tokens=args.max_new_tokens, adapter=args.adapter, sampling=sampling,
                         eos_token_id=tokenizer.eos_token_id)
    print(tokenizer.decode(new, skip_special_tokens=True))
    return 0
