"""The AdapterHub `adapters` library's bottleneck adapters on a tiny float64 Llama: a script for its own environment.

`adapters` 1.3 pins transformers ~= 4.57 while the other peers run on transformers 5, so it gets a
virtual environment of its own (conformance/requirements-adapters.txt) and this file is run there as
a script, never imported by refpeft or the tests:

    $REFPEFT_ADAPTERS_PYTHON adapters_bottleneck.py JOB_DIR [JOB_DIR ...]
    $REFPEFT_ADAPTERS_PYTHON adapters_bottleneck.py --serve

Each JOB_DIR (one process runs them all: torch imports once) holds request.json and
inputs.safetensors (no pickles either way); with --serve the process reads one JOB_DIR per line
from stdin and answers each with one line on stdout starting with REPLY: "ok", or "error" and the
exception (refpeft_peers.adapters_library keeps one such process for a whole report):

    request.json   {"mode": "layer" | "block" | "model", "architecture": "seq_bn" | "double_seq_bn",
                    "options": {BnConfig fields}, "llama": {LlamaConfig fields},
                    "module": "model.layers.0.output_adapters"   (modes "layer", "block"),
                    "dtype": "float64" (default) | "float32"}
    inputs         the base's tensors by transformers' names (not in mode "block"), the adapter's by
                   refpeft's names (the library's less "adapters.<name>."), and for modes "layer" and
                   "block" o, r and optionally dy (b, s, H), for mode "model" ids, attention_mask, labels (b, s)

and gets outputs.safetensors and peer.json (the library's own config dict for the adapter,
the versions, the adapter tensor names it made). Mode "layer": the adapter layer's output
y = layer(o, r) as the decoder layer calls it (`BottleneckLayer.forward(o, r, None)`), do, dr and
the adapter's gradients of sum(y * dy) (forward only without dy). Mode "block" is mode "layer"
on a model whose base weights are left at their random init (the layer never reads them), in the
request's dtype, with only the named module's adapter tensors given.
Mode "model": logits, the float64 shifted cross-entropy
(transformers' loss upcasts to float32, so it is computed here in float64 with torch's
cross_entropy, ignore_index -100, mean) and the adapter's gradients of that loss; transformers
runs with its float32 casts removed (refpeft_peers.transformers_float64, beside this file; the
adapters library binds eager attention by import, so its copy is swapped too).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import adapters
import safetensors.torch
import torch
import transformers
from adapters.models.llama import modeling_llama as adapters_llama

NAME = "bottleneck"


def _float64_patch():
    spec = importlib.util.spec_from_file_location("transformers_float64", Path(__file__).with_name(
        "transformers_float64.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peer_name(name: str) -> str:
    """refpeft's "model.layers.0.output_adapters.adapter_up.weight" -> the library's parameter name."""
    path, _, rest = name.partition("_adapters.")
    return f"{path}_adapters.adapters.{NAME}.{rest}"


def _build(request: dict, inputs: dict, f64) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]:
    dtype = getattr(torch, request.get("dtype", "float64"))
    config = transformers.LlamaConfig(**request["llama"], attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    block = request["mode"] == "block"
    if not block:
        base = {n: t for n, t in inputs.items() if n in model.state_dict()}
        missing, unexpected = model.load_state_dict(base, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        f64.float64_inv_freq(model, "llama")
    adapters.init(model)
    bn = adapters.AdapterConfig.load(request["architecture"], **request.get("options", {}))
    model.add_adapter(NAME, config=bn)
    model.train_adapter(NAME)                               # freezes the base, activates the adapter
    model.to(dtype).eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    given = {n: t for n, t in inputs.items() if "_adapters." in n}
    names = {_peer_name(n) for n in given}
    assert names <= set(params) if block else names == set(params), (sorted(given), sorted(params))
    with torch.no_grad():
        for n, t in given.items():
            params[_peer_name(n)].copy_(t)
    return model, params


def run_job(job: Path) -> None:
    request = json.loads((job / "request.json").read_text())
    inputs = safetensors.torch.load_file(job / "inputs.safetensors")
    f64 = _float64_patch()
    model, params = _build(request, inputs, f64)
    out = {}
    if request["mode"] in ("layer", "block"):
        parent, _, location = request["module"].rpartition(".")
        layer = model.get_submodule(parent)                                  # LlamaDecoderLayerWithAdapters
        o, r = (inputs[k].clone().requires_grad_(True) for k in ("o", "r"))
        y = getattr(layer, location)(o, r, None)
        out["y"] = y.detach()
        if "dy" in inputs:
            (y * inputs["dy"]).sum().backward()
            out.update(do=o.grad, dr=r.grad)
    else:
        with f64.float64_transformers("llama"):
            saved = adapters_llama.eager_attention_forward
            adapters_llama.eager_attention_forward = transformers.models.llama.modeling_llama.eager_attention_forward
            try:
                logits = model(input_ids=inputs["ids"], attention_mask=inputs["attention_mask"]).logits
            finally:
                adapters_llama.eager_attention_forward = saved
        V = logits.shape[-1]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), inputs["labels"][:, 1:].reshape(-1),
                                                 ignore_index=-100)
        loss.backward()
        out.update(logits=logits.detach(), loss=loss.detach().reshape(1))
    names = {_peer_name(n): n for n in inputs if "_adapters." in n}
    out.update({f"grad.{names[n]}": p.grad for n, p in params.items() if p.grad is not None})   # "layer": its own
    safetensors.torch.save_file({k: v.contiguous() for k, v in out.items()}, job / "outputs.safetensors")
    adapter_config = model.adapters_config.get(NAME)
    (job / "peer.json").write_text(json.dumps({
        "config": adapter_config.to_dict(), "adapter_tensors": sorted(params),
        "versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__}}, indent=1))


REPLY = "refpeft-adapters-job:"


def serve(lines, out) -> None:
    """Run the job folder named on each line; answer REPLY ok, or REPLY error and the exception."""
    for line in lines:
        try:
            run_job(Path(line.strip()))
            print(f"{REPLY} ok", file=out, flush=True)
        except Exception as exc:  # reported to the runner, which reports the case as an error
            print(f"{REPLY} error {type(exc).__name__}: {exc}".replace("\n", " "), file=out, flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve(sys.stdin, sys.stdout)
    else:
        for folder in sys.argv[1:]:
            run_job(Path(folder))
