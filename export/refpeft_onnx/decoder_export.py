"""Export a whole decoder with PEFT adapters as a folder onnxruntime-genai runs, verified before it appears.

    OUT/model.onnx                   the decoder graph (refpeft_onnx.decoder_graph); its initializers go to
                                     model.onnx.data when the model passes 2 GiB (one protobuf's limit)
    OUT/genai_config.json            refpeft_onnx.genai_files
    OUT/tokenizer.json, tokenizer_config.json
    OUT/adapters/NAME.onnx_adapter   unmerged graphs: one file per adapter, its tensors under the
                                     graph's swappable input names (refpeft_onnx.adapter_files; a
                                     prompt-learning adapter's prefix keys and values,
                                     refpeft_onnx.prefix_graph)

Everything is written into a hidden staging folder beside OUT; the graph is checked there
(onnx.checker, then refpeft_onnx.decoder_verify against refpeft's float64 decoder), and only a
graph that passes is renamed to OUT. Otherwise the staging folder is removed: nothing is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import onnx

from refpeft.adapter import Adapter
from refpeft.errors import ConfigError, OutputError
from refpeft.io import read_json_object, usual_permissions
from refpeft.model import load
from refpeft.model.adapted import with_adapter
from refpeft.model.decoder import Model, quantize_linear_layers
from refpeft.model.prompt_methods import prompt_method_of_type
from refpeft.model.tokenizer import Tokenizer

from refpeft_onnx.adapter_files import check_against_model, write_onnx_adapter
from refpeft_onnx.attach import attach, graph_dtype
from refpeft_onnx.builder import DEFAULT_OPSET, ExternalData
from refpeft_onnx.decoder_graph import build_decoder, decoder_layers
from refpeft_onnx.decoder_verify import float64_model, require_passed, verify_decoder
from refpeft_onnx.exporter import PROTOBUF_LIMIT, read_model
from refpeft_onnx.genai_files import ADAPTERS_FOLDER, MODEL_FILE, write_genai_config, write_tokenizer
from refpeft_onnx.prefix_graph import PromptAdapter, prefix_feeds, prompt_adapter, split_prompt_adapters

EXTERNAL_FILE = MODEL_FILE + ".data"   # the weights, beside model.onnx
from refpeft_onnx.verify import VerificationError, VerificationReport, layer_feeds


@dataclass(frozen=True)
class DecoderExport:
    folder: Path
    adapter_files: dict[str, Path]
    report: VerificationReport
    seconds: float


def is_model_base(path: str | os.PathLike) -> bool:
    """A model folder (config.json) or a GGUF file, as opposed to a safetensors stack of linear layers."""
    p = Path(path)
    return (p.is_dir() and (p / "config.json").is_file()) or p.suffix == ".gguf"


def load_base(path: str | os.PathLike, *, nf4_blocksize: int | None = None,
              double_quant: bool = True) -> tuple[Model, Tokenizer | None]:
    """The base decoder in float32 (NF4 projections with nf4_blocksize, as `refpeft train --nf4` holds them)."""
    config, weights, tokenizer = load.load_model(path, dtype="float32")
    model = Model(config, weights)
    if nf4_blocksize is not None:
        model = quantize_linear_layers(model, blocksize=nf4_blocksize, double_quant=double_quant)
    return model, tokenizer


def read_adapters(model: Model, specs: Sequence[str]) -> dict[str, Adapter | PromptAdapter]:
    """PEFT adapter folders by name: each spec is DIR (named after the folder) or NAME=DIR. A
    PROMPT_TUNING, P_TUNING or PREFIX_TUNING folder (read by its kind's reader,
    refpeft.model.prompt_methods) becomes a PromptAdapter, its prefix keys and values computed on
    the float64 base."""
    adapters: dict[str, Adapter | PromptAdapter] = {}
    model64 = None
    for spec in specs:
        name, _, folder = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"adapter name {name!r} (from {spec!r}) must be letters, digits, '-', '_' or '.'")
        if name in adapters:
            raise ConfigError(f"two adapters are named {name!r}; name them with NAME=DIR")
        config_file = Path(folder) / "adapter_config.json"
        peft_type = read_json_object(config_file).get("peft_type") if config_file.is_file() else None
        method = prompt_method_of_type(peft_type)
        if method is None:                          # with_adapter names what is missing or wrong
            adapters[name] = with_adapter(model, folder, dtype="float32").adapter
            continue
        model64 = model64 or float64_model(model)
        adapters[name] = prompt_adapter(model64, method, method.read(folder)[0])
    split_prompt_adapters(adapters)
    return adapters


def export_decoder(out: str | os.PathLike, model: Model, tokenizer: Tokenizer | None,
                   adapters: Mapping[str, Adapter | PromptAdapter] | None = None, *, form: str = "merged",
                   dtype: str = "float32",
                   nf4_ops: str = "bnb4", opset: int = DEFAULT_OPSET,
                   inputs: Sequence[str | os.PathLike] = ()) -> DecoderExport:
    """Build, write to staging, verify and publish the folder `out` (module docstring).

    inputs: the paths the model and adapters came from; `out` may not be one of them or inside one.
    """
    started = time.perf_counter()
    target = _check_output(out, inputs)
    adapters = dict(adapters or {})

    def build(staging: Path) -> onnx.ModelProto:      # the weights go straight to model.onnx.data
        external = ExternalData(staging / EXTERNAL_FILE)
        try:
            return build_decoder(model, adapters, form=form, dtype=dtype, nf4_ops=nf4_ops, opset=opset,
                                 external=external)
        finally:
            external.close()

    virtual_tokens = max((a.length for a in split_prompt_adapters(adapters).values()), default=0)

    def extras(staging: Path) -> None:
        write_genai_config(staging, model.config, tokenizer, virtual_tokens=virtual_tokens)
        if tokenizer is not None:
            write_tokenizer(staging, tokenizer)

    return _publish(target, build, model, adapters, form=form, dtype=dtype, extras=extras, started=started)


def attach_adapters(out: str | os.PathLike, onnx_model: str | os.PathLike, model: Model,
                    adapters: Mapping[str, Adapter], *, inputs: Sequence[str | os.PathLike] = ()) -> DecoderExport:
    """`onnx_model` (the base exported elsewhere) with every adapter's unmerged branch attached
    (refpeft_onnx.attach), verified like an export and written to the folder `out` with one
    .onnx_adapter per adapter; the files beside `onnx_model` (genai_config.json, the tokenizer) are
    copied along, so a genai folder stays one."""
    started = time.perf_counter()
    if split_prompt_adapters(dict(adapters)):
        raise ConfigError("prompt-learning adapters change the attention of every layer; they are exported with "
                          "the model (`refpeft export ADAPTER --base MODEL -o DIR`), not attached to a graph made "
                          "elsewhere")
    source = Path(onnx_model)
    target = _check_output(out, [*inputs, source])
    foreign = read_model(source)
    dtype = graph_dtype(foreign)

    def build(staging: Path) -> onnx.ModelProto:
        return attach(foreign, decoder_layers(model), adapters)

    def extras(staging: Path) -> None:
        for sibling in source.parent.iterdir():
            if sibling.is_file() and not sibling.name.startswith((source.name, ".")):
                shutil.copyfile(sibling, staging / sibling.name)

    return _publish(target, build, model, adapters, form="unmerged", dtype=dtype, extras=extras,
                    started=started, checker=False)


def export_decoder_adapter(path: str | os.PathLike, onnx_model: str | os.PathLike, model: Model,
                           adapter: Adapter | PromptAdapter) -> Path:
    """One more .onnx_adapter for a decoder already exported unmerged (or attached): `adapter`'s
    tensors under the graph's input names and in its dtype, checked against its inputs first."""
    proto = read_model(onnx_model)
    feeds = _adapter_feeds(proto, model, {"adapter": adapter}, graph_dtype(proto))
    return write_onnx_adapter(path, feeds["adapter"])


def _adapter_feeds(proto: onnx.ModelProto, model: Model, adapters: Mapping[str, Adapter | PromptAdapter],
                   dtype: str) -> dict[str, dict]:
    """Each adapter's swappable-input tensors in `dtype`, checked against the graph's inputs."""
    layers = decoder_layers(model)
    feeds = {name: prefix_feeds(adapter, dtype) if isinstance(adapter, PromptAdapter)
             else layer_feeds(layers.__getitem__, adapter, dtype) for name, adapter in adapters.items()}
    for parameters in feeds.values():
        check_against_model(parameters, proto)
    return feeds


def _publish(target: Path, build: Callable[[Path], onnx.ModelProto], model: Model,
             adapters: Mapping[str, Adapter | PromptAdapter],
             *, form: str, dtype: str, extras: Callable[[Path], None], started: float,
             checker: bool = True) -> DecoderExport:
    """Build the graph into a staging folder beside `target` (`build(staging)`), check it (onnx.checker,
    unless `checker` is False: graphs made elsewhere may use ONNX Runtime's contrib ops, which it
    does not know) and verify it there, add the adapter files and `extras`, then rename the folder
    to `target` (removed on any failure)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        proto = build(staging)
        feeds = _adapter_feeds(proto, model, adapters, dtype) if form == "unmerged" else {}
        model_path = _save_model(proto, staging)
        del proto
        if checker:
            try:
                onnx.checker.check_model(str(model_path), full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
                raise VerificationError(f"onnx.checker refuses the graph: {exc}") from None
        report = verify_decoder(str(model_path), model, adapters, feeds=feeds, form=form, dtype=dtype)
        require_passed(report)
        extras(staging)
        files = {name: write_onnx_adapter(staging / ADAPTERS_FOLDER / f"{name}.onnx_adapter", parameters)
                 for name, parameters in feeds.items()}
        for folder in (staging, staging / ADAPTERS_FOLDER):
            if folder.is_dir():
                usual_permissions(folder)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = {name: target / ADAPTERS_FOLDER / path.name for name, path in files.items()}
    return DecoderExport(target, files, report, time.perf_counter() - started)


def _check_output(out: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> Path:
    target = Path(out)
    if target.exists():
        raise OutputError(f"{target}: the output folder exists; choose a new path (nothing is overwritten)")
    resolved = target.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source or source in resolved.parents:
            raise OutputError(f"{target}: the output would be inside the input {source}")
    if not target.parent.is_dir():
        raise OutputError(f"{target.parent}: no such folder to write {target.name} into")
    return target


def _save_model(proto: onnx.ModelProto, folder: Path) -> Path:
    """model.onnx; initializers held in the proto go to model.onnx.data when one protobuf cannot hold
    them (refpeft's own graphs are built with theirs there already)."""
    path = folder / MODEL_FILE
    external = proto.ByteSize() > PROTOBUF_LIMIT
    onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=EXTERNAL_FILE, size_threshold=ExternalData.THRESHOLD)
    return path

