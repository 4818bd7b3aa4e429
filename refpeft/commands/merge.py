"""`refpeft merge`: fold a PEFT adapter into a safetensors checkpoint, one layer at a time."""

from __future__ import annotations

import argparse
import sys

HELP = "merge a PEFT adapter (LoRA, DoRA, VeRA) into a safetensors checkpoint, layer by layer"

DESCRIPTION = """\
Reads a HF PEFT adapter directory (adapter_model.safetensors + adapter_config.json) and a base
checkpoint (one .safetensors file), and writes a checkpoint of the same tensors with every
adapted weight replaced by its merged value: W0 + s B A (LoRA), diag(m / ||W0 + s B A||)(W0 + s B A)
(DoRA), W0 + (lambda_b B)(lambda_d A) (VeRA). Merging is done in float64 and rounded once to the
checkpoint's dtype. Biases change where the adapter trained them (lora_bias, bias="lora_only"),
and the tensors of modules saved in full (PEFT's modules_to_save) are replaced by the trained
copies, as PEFT's merge_and_unload keeps them.

The base is memory-mapped and processed one tensor at a time, so peak memory stays near the size
of the largest adapted layer whatever the size of the model. The output is written to a
temporary file and renamed into place: an interrupted merge leaves no partial file. Module paths
in the adapter must match the checkpoint's tensor names ("<path>.weight").
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("merge", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="PEFT adapter directory")
    p.add_argument("--base", required=True, metavar="MODEL.safetensors", help="base checkpoint (one safetensors file)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors", help="merged checkpoint to write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.set_defaults(func=run, command="merge")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from refpeft.checkpoint import SafetensorsFile, merge_into_checkpoint
    from refpeft.io import check_outputs
    from refpeft.peft_format import read_peft_adapter_with_base

    check_outputs([args.output], inputs=[args.adapter, args.base])
    base = SafetensorsFile(args.base)
    adapter = read_peft_adapter_with_base(args.adapter, base)
    total = sum(base.info(key).nbytes for key in base.keys())
    with tqdm(total=total, desc="merging", unit="B", unit_scale=True, disable=args.no_progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        report = merge_into_checkpoint(adapter, base, args.output, progress=lambda name, nbytes: bar.update(nbytes))
    print(f"refpeft merge: {adapter.method} adapter with {len(adapter.modules)} modules merged into {args.base}: "
          f"{report.merged_weights} weights and {report.changed_biases} biases changed"
          + (f", {report.saved_tensors} tensors of saved modules written" if report.saved_tensors else "")
          + f", {report.tensors} tensors, "
          f"{report.bytes_written / 2**20:.1f} MiB written to {args.output}")
    return 0
