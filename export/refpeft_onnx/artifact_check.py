"""Check someone else's adapter artifacts: an ONNX decoder and .onnx_adapter against refpeft's reference of PEFT's.

Given MODEL.onnx (made by anyone: refpeft, the onnxruntime-genai model builder, Olive), the
ADAPTER.onnx_adapter meant for it (or none: an adapter baked into the graph's weights), the PEFT
adapter folder it claims to represent and the base it was made from:

1. Structure. The file's tensors are matched to the graph's inputs by name, dtype and declared
   dims. A name the graph lacks is a defect (ONNX Runtime's add_active_adapter refuses it); it is
   renamed when its key (layer numbers, projection, factor: `name_key`) picks exactly one unfed
   input. A tensor whose shape fits the input only reversed is a defect (A or B transposed) and is
   fed transposed back. What cannot be fixed is left out and reported.
2. Logits. ONNX Runtime runs the graph on random token ids (batch 2, no padding, an empty past
   shaped from the graph's declared dims) with the file's tensors fed as inputs, exactly what
   add_active_adapter appends to a run's feeds. Every logit is compared with refpeft's float64
   decoder with the PEFT adapter (refpeft_onnx.decoder_verify.reference_logits) within B(u), the
   probabilistic rounding bound for the graph's dtype:   |logit_ort - logit_64| <= B(u).
3. Hypotheses, when that fails: each is a reference built as a faulty converter would have built
   it (or feeds fixed as it should have written them), compared the same way. One within its own
   bound is the diagnosis:
       no adapter applied                 the base alone
       scale not folded                   every scaled module with s = 1
       scale folded twice                 s^2 (s = alpha / r, alpha / sqrt(r) with rsLoRA)
       rank/alpha pattern ignored         s = lora_alpha / r of the config's top level everywhere
       DoRA magnitude dropped             DoRA modules as plain LoRA (same A, B, s)
       A/B transposed                     2-D tensors fed transposed where their transposes fit too
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import helper

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.errors import FormatError
from refpeft.methods.lora import lora_scaling
from refpeft.model.adapted import with_adapter
from refpeft.model.decoder import Model
from refpeft.tolerance import Comparison, compare

from refpeft_onnx.adapter_files import read_onnx_adapter
from refpeft_onnx.decoder_export import load_base
from refpeft_onnx.decoder_verify import float64_model, random_batch, reference_logits, with_float64_adapter
from refpeft_onnx.verify import session

DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids")
PAST_PREFIX = "past_key_values."
GRAPH_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.BFLOAT16: "bfloat16"}
# name_key: these tokens say nothing about which tensor a name is; these name the factor.
NAME_NOISE = {"model", "base_model", "weight", "MatMul", "default", "self_attn", "attn", "mlp"}
NAME_ROLES = {"lora_A": "A", "lora_A_t": "A", "lora_B": "B", "lora_B_t": "B", "lora_scaling": "scaling",
              "dora_scale": "magnitude", "lora_magnitude_vector": "magnitude"}
AS_PEFT_SAYS = "as the PEFT adapter says"


@dataclass(frozen=True)
class Hypothesis:
    """One reference (or one way of feeding the file) compared with ONNX Runtime's logits."""

    name: str
    comparison: Comparison | None       # None: it could not run (`note` says why)
    note: str = ""

    @property
    def fits(self) -> bool:
        return self.comparison is not None and self.comparison.passed


@dataclass(frozen=True)
class ArtifactReport:
    model: str
    adapter: str | None
    dtype: str
    defects: tuple[str, ...]            # structural: names, dtypes, shapes (each a sentence)
    notes: tuple[str, ...]              # structural facts that are not wrong in themselves
    result: Hypothesis                  # the file as fed, against the PEFT adapter's reference
    hypotheses: tuple[Hypothesis, ...]  # tried only when `result` does not fit

    @property
    def passed(self) -> bool:
        return not self.defects and self.result.fits

    @property
    def diagnosis(self) -> list[str]:
        return [h.name for h in self.hypotheses if h.fits]

    def format(self) -> str:
        fed = f" with {self.adapter}" if self.adapter else " (no adapter file: the graph as it is)"
        lines = [f"{self.model}{fed}: a {self.dtype} graph, bound B(u) probabilistic (refpeft.rounding)"]
        lines += [f"  defect: {d}" for d in self.defects] + [f"  note: {n}" for n in self.notes]
        lines.append("  error / bound of each reference (<= 1 fits):")
        for h in (self.result, *self.hypotheses):
            ratio = f"{h.comparison.ratio:10.3g}" if h.comparison is not None else f"{'-':>10}"
            note = f"  ({h.note})" if h.note else ""
            lines.append(f"    {ratio}  {h.name}" + ("  <- fits" if h.fits else "") + note)
        if self.passed:
            lines.append(f"AGREES with the PEFT adapter: max|error| {self.result.comparison.max_error:.3g}")
        else:
            named = [*self.defects, *self.diagnosis]
            worst = self.result.comparison.describe() if self.result.comparison else self.result.note
            verdict = "; ".join(named) if named else f"unexplained: no hypothesis fits ({worst})"
            lines.append(f"DISAGREES with the PEFT adapter: {verdict}")
        return "\n".join(lines)


def check_artifacts(model: str | os.PathLike, adapter_file: str | os.PathLike | None, peft_dir: str | os.PathLike,
                    base: str | os.PathLike, *, seed: int = 0) -> ArtifactReport:
    """Run MODEL (+ the .onnx_adapter) in ONNX Runtime; name what disagrees with the PEFT adapter (module docstring)."""
    proto = _load_graph(model)
    inputs = graph_inputs(proto)
    dtype = graph_dtype(proto)
    base_model, _ = load_base(base)
    adapter = with_adapter(base_model, peft_dir, dtype="float32").adapter
    tensors = read_onnx_adapter(adapter_file) if adapter_file is not None else {}
    feeds, defects, notes = fit_to_inputs(tensors, inputs)

    ids, _, _ = random_batch(base_model.config.vocab_size, seed=seed)
    mask = np.ones_like(ids)
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
    runner = session(str(model))
    decoder = decoder_feeds(inputs, ids, mask, positions, base_model)
    base64 = float64_model(base_model)

    def against(name: str, reference: Adapter | None, logits: np.ndarray | str, note: str = "") -> Hypothesis:
        if isinstance(logits, str):
            return Hypothesis(name, None, logits)
        model64 = base64 if reference is None else with_float64_adapter(base64, reference)
        expected, bound = reference_logits(model64, ids, mask, positions, dtype=dtype)
        return Hypothesis(name, compare(logits, expected, bound), note)

    logits = _run(runner, {**decoder, **feeds})
    result = against(AS_PEFT_SAYS, adapter, logits)
    hypotheses = []
    if not result.fits:
        for name, reference in reference_hypotheses(adapter).items():
            hypotheses.append(against(name, reference, logits))
        transposed = transposed_ambiguous(feeds, inputs)
        if transposed:
            hypotheses.append(against("A/B transposed (fed transposed back where the shape cannot tell)", adapter,
                                      _run(runner, {**decoder, **feeds, **transposed}),
                                      note=f"{len(transposed)} tensors"))
    return ArtifactReport(str(model), None if adapter_file is None else str(adapter_file), dtype, tuple(defects),
                          tuple(notes), result, tuple(hypotheses))


def reference_hypotheses(adapter: Adapter) -> dict[str, Adapter | None]:
    """The references a faulty converter would have matched (module docstring), those that differ from `adapter`."""
    scaled = {p: m for p, m in adapter.modules.items() if m.spec.scaled}
    found: dict[str, Adapter | None] = {"no adapter applied": None}
    if any(m.scaling != 1.0 for m in scaled.values()):
        found["scale not folded (s = 1)"] = rescaled(adapter, lambda m: 1.0)
        found["scale folded twice (s^2)"] = rescaled(adapter, lambda m: m.scaling ** 2)
    config = adapter.config
    if (config.get("rank_pattern") or config.get("alpha_pattern")) and "r" in config and "lora_alpha" in config:
        default = lora_scaling(float(config["lora_alpha"]), int(config["r"]), rslora=bool(config.get("use_rslora")))
        if any(m.scaling != default for m in scaled.values()):
            found[f"rank/alpha pattern ignored (s = {default:g} everywhere)"] = rescaled(adapter, lambda m: default)
    if any(m.spec.rescaled for m in adapter.modules.values()):
        found["DoRA magnitude dropped (DoRA modules as plain LoRA)"] = replace(adapter, modules={
            p: _as_lora(m) if m.spec.rescaled else m for p, m in adapter.modules.items()})
    return found


def rescaled(adapter: Adapter, scaling: Callable[[ModuleAdapter], float]) -> Adapter:
    """`adapter` with each scaled module's s replaced by scaling(module) (alpha = s r, rsLoRA off)."""
    return replace(adapter, modules={p: replace(m, alpha=scaling(m) * m.r, rslora=False) if m.spec.scaled else m
                                     for p, m in adapter.modules.items()})


def _as_lora(module: ModuleAdapter) -> ModuleAdapter:
    tensors = {name: module.tensors[name] for name in ("A", "B", "bias") if name in module.tensors}
    return ModuleAdapter("lora", tensors, alpha=module.alpha, rslora=module.rslora,
                         fan_in_fan_out=module.fan_in_fan_out)


# --- the graph's side -------------------------------------------------------------------------

def _load_graph(path: str | os.PathLike) -> onnx.ModelProto:
    if not Path(path).is_file():
        raise FormatError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:   # protobuf's DecodeError and friends
        raise FormatError(f"{path}: not a readable ONNX model ({exc})") from None
    names = {i.name for i in proto.graph.input}
    outputs = {o.name for o in proto.graph.output}
    if "input_ids" not in names or "logits" not in outputs:
        raise FormatError(f"{path}: not a decoder (it needs an input_ids input and a logits output; it has inputs "
                          f"{sorted(names)[:6]} and outputs {sorted(outputs)[:6]})")
    return proto


def graph_inputs(proto: onnx.ModelProto) -> dict[str, tuple[np.dtype, list[int | str], bool]]:
    """name -> (NumPy dtype, declared dims with symbolic ones as strings, has a default initializer)."""
    defaults = {t.name for t in proto.graph.initializer}
    found = {}
    for value in proto.graph.input:
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value or "?" for d in tensor.shape.dim]
        found[value.name] = (np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), dims, value.name in defaults)
    return found


def graph_dtype(proto: onnx.ModelProto) -> str:
    """The graph's compute dtype, read off its logits output."""
    elem = next(o for o in proto.graph.output if o.name == "logits").type.tensor_type.elem_type
    if elem not in GRAPH_DTYPES:
        raise FormatError(f"logits of element type {helper.tensor_dtype_to_string(elem)}: no bound for it")
    return GRAPH_DTYPES[elem]


def decoder_feeds(inputs: Mapping[str, tuple], ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                  model: Model) -> dict[str, np.ndarray]:
    """input_ids, attention_mask, position_ids (those the graph has) and an empty past of the declared dims."""
    c = model.config
    values = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    feeds = {name: values[name].astype(inputs[name][0]) for name in DECODER_INPUTS if name in inputs}
    for name, (dtype, dims, _) in inputs.items():
        if name.startswith(PAST_PREFIX):
            # (batch, kv heads, past, head_dim): symbolic sizes from the model's config, past 0
            shape = [ids.shape[0], c.num_key_value_heads, 0, c.head_dim]
            shape = [d if isinstance(d, int) and i != 2 else s for i, (d, s) in enumerate(zip(dims, shape))]
            feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds


def _run(runner, feeds: Mapping[str, np.ndarray]) -> np.ndarray | str:
    """ONNX Runtime's logits in float64, or why it refused to run."""
    try:
        return runner.run(["logits"], dict(feeds))[0].astype(np.float64)
    except Exception as exc:   # onnxruntime's Fail / InvalidArgument
        return f"ONNX Runtime refuses the run: {str(exc).splitlines()[0][:300]}"


# --- the file's side --------------------------------------------------------------------------

def name_key(name: str) -> tuple[str, ...]:
    """What a tensor name says about its tensor: layer numbers, the projection and the factor, in order.

    'model.layers.1.self_attn.v_proj.lora_A.weight' (PEFT, Olive), 'model.layers.1.attn.v_proj.lora_A.MatMul.weight'
    (the genai builder) and 'model.layers.1.self_attn.v_proj.lora_A_t' (refpeft) all give
    ('layers', '1', 'v_proj', 'A').
    """
    tokens = [t for t in re.split(r"[./]", name) if t and t not in NAME_NOISE]
    return tuple(NAME_ROLES.get(t, t) for t in tokens)


def fits(shape: tuple[int, ...], dims: list[int | str]) -> bool:
    return len(shape) == len(dims) and all(not isinstance(d, int) or d == n for d, n in zip(dims, shape))


def fit_to_inputs(tensors: Mapping[str, np.ndarray], inputs: Mapping[str, tuple]
                  ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """The file's tensors as feeds for the graph: (feeds, defects, notes); step 1 of the module docstring."""
    defects, notes = [], []
    adapter_inputs = {n for n in inputs if n not in DECODER_INPUTS and not n.startswith(PAST_PREFIX)}
    unknown = sorted(set(tensors) - adapter_inputs)
    renamed = {}
    if unknown:
        free = {name_key(n): n for n in sorted(adapter_inputs - set(tensors))}
        keys = [name_key(n) for n in unknown]
        if len(set(keys)) == len(keys) and all(k in free for k in keys):
            renamed = {n: free[k] for n, k in zip(unknown, keys)}
            defects.append(f"{len(unknown)} tensor names are not inputs of the graph (e.g. {unknown[0]!r}); "
                           f"renamed by layer, projection and factor (e.g. to {renamed[unknown[0]]!r}) to run")
        else:
            defects.append(f"{len(unknown)} tensor names are not inputs of the graph and match none by layer, "
                           f"projection and factor: {unknown[:4]}{' ...' if len(unknown) > 4 else ''}; left out")
    feeds, transposed = {}, []
    for name, value in tensors.items():
        target = renamed.get(name, name)
        if target not in adapter_inputs:
            continue
        dtype, dims, _ = inputs[target]
        if value.dtype != dtype:
            defects.append(f"{name} is {value.dtype}, the graph's input {dtype}; cast to run")
            value = value.astype(dtype)
        if not fits(value.shape, dims):
            if value.ndim == 2 and fits(value.shape[::-1], dims):
                transposed.append(name)
                value = np.ascontiguousarray(value.T)
            else:
                defects.append(f"{name} has shape {value.shape}, the graph's input {dims}; left out")
                continue
        feeds[target] = value
    if transposed:
        defects.append(f"A/B transposed: {len(transposed)} tensors fit the graph's inputs only transposed "
                       f"(e.g. {transposed[0]!r}); fed transposed back")
    required = sorted(n for n in adapter_inputs - set(feeds) if not inputs[n][2])
    if required:
        defects.append(f"the graph requires inputs nothing feeds: {required[:4]}{' ...' if len(required) > 4 else ''}")
    unfed = sorted(n for n in adapter_inputs - set(feeds) if inputs[n][2])
    if tensors and unfed:
        notes.append(f"{len(unfed)} of the graph's optional adapter inputs keep their defaults "
                     f"(e.g. {unfed[0]!r})")
    return feeds, defects, notes


def transposed_ambiguous(feeds: Mapping[str, np.ndarray], inputs: Mapping[str, tuple]) -> dict[str, np.ndarray]:
    """The 2-D feeds whose transposes fit their inputs too (the declared dims cannot tell them apart), transposed."""
    return {name: np.ascontiguousarray(value.T) for name, value in feeds.items()
            if value.ndim == 2 and fits(value.shape[::-1], inputs[name][1])}
