"""Verification of a decoder graph before it is written: ONNX Runtime's logits against refpeft's, with and without the cache.

For each run (merged: the adapter; unmerged: no adapter fed, then each adapter's tensors fed as
inputs), random token ids go through the graph twice:

- whole: every token in one call, with an empty past (past_sequence_length 0);
- cached: the same tokens in chunks, each call fed the previous call's present.* as its past, the
  way onnxruntime-genai decodes.

The batch has two rows, the second left-padded (attention_mask 0 on its first tokens, position ids
counting from its first real token, as transformers' and genai's generation give them). Every
chunk's logits at real tokens are compared with refpeft.model.decoder.forward in float64 on the same
ids, mask and positions (padding queries attend to nothing real and are not compared):

    |logits_ort - logits_64| <= B(u_graph)

Prompt-learning adapters (refpeft_onnx.prefix_graph) are compared with refpeft's decoder running
them as PEFT does: the virtual tokens P prepended (prompt tuning, P-tuning), or the prefix table as
every layer's past (prefix tuning), each fed the positions it numbers the padded row with (PEFT's
prompt tuning counts the pads: 0 .. s - 1 over the row, shifted by k in the graph).

B is refpeft.rounding's first-order probabilistic bound for the graph's dtype (Monte Carlo
arithmetic over refpeft's own forward): a derived estimate of how far any evaluation in that
precision drifts from the exact result, not a worst case (a 30-layer worst case is vacuous).
"""

from __future__ import annotations

import os
from dataclasses import replace
from functools import partial
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import onnx

from refpeft.adapter import Adapter
from refpeft.model.decoder import Model, forward
from refpeft.model.weights import LazyTensors
from refpeft.rounding import rounding_bound
from refpeft.tolerance import compare

from refpeft_onnx.builder import DTYPES
from refpeft_onnx.decoder_graph import INPUT_NAMES, OUTPUT_NAMES, decoder_layers
from refpeft_onnx.graph import graph_metadata
from refpeft_onnx.prefix_graph import PromptAdapter
from refpeft_onnx.stack import as_float64
from refpeft_onnx.verify import Check, VerificationError, VerificationReport, session

CHUNKS = (4, 2, 1)        # the cached run's calls: 4 tokens, then 2, then 1
ONE_BY_ONE = (4, 1, 1, 1)  # for graphs made elsewhere (GroupQueryAttention takes one new token per row with a past)
PADDING = 2               # left padding of the batch's second row


def verify_decoder(model: str | os.PathLike, reference: Model,
                   adapters: Mapping[str, Adapter | PromptAdapter] | None = None, *,
                   feeds: Mapping[str, Mapping[str, np.ndarray]] | None = None, form: str | None = None,
                   dtype: str | None = None, seed: int = 0,
                   providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> VerificationReport:
    """Check the decoder graph saved at `model`, built from `reference` (the base; its adapter is ignored).

    adapters: the merged graph's one adapter, or the unmerged graph's adapters by name; feeds: each
    unmerged adapter's graph inputs (its .onnx_adapter tensors), by adapter name. form and dtype
    default to the graph's refpeft metadata (give them for graphs made elsewhere). A graph without
    a position_ids input computes positions itself, so it gets an unpadded batch (where every
    convention agrees); one without past_key_values inputs gets no cached run.
    """
    meta = graph_metadata(onnx.load(str(model), load_external_data=False))
    form, dtype = form or meta["refpeft.form"], dtype or meta["refpeft.dtype"]
    adapters = dict(adapters or {})
    if form == "merged":
        runs = [("adapted" if adapters else "base", next(iter(adapters.values()), None), {})]
    else:
        runs = [("no adapter", None, {})] + [(f"adapter {name!r} fed as inputs", adapter, dict((feeds or {})[name]))
                                             for name, adapter in adapters.items()]
    base64 = float64_model(reference)
    checks = []
    for provider in providers:
        runner = session(str(model), provider)
        declared = {i.name for i in runner.get_inputs()}
        ours = "position_ids" in declared
        ids, mask, positions = random_batch(reference.config.vocab_size, seed=seed, padding=PADDING if ours else 0)
        real = mask == 1
        cached = partial(run_cached, chunks=CHUNKS if ours else ONE_BY_ONE)
        ways = {"whole": run_whole, **({"cached": cached} if INPUT_NAMES["past_key_names"] % 0 in declared else {})}
        for run, adapter, extra in runs:
            adapted = base64 if adapter is None else with_float64_adapter(base64, adapter)
            fed = positions
            if adapted.prompt is not None:               # PEFT's prompt tuning numbers the pads too
                fed = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
            expected, bound = reference_logits(adapted, ids, mask, fed, dtype=dtype)
            for how, way in ways.items():
                logits = way(runner, ids, mask, fed, extra, reference, dtype)
                checks.append(Check(f"{run}, {how}", provider, ids.shape, compare(logits[real], expected[real], bound)))
    return VerificationReport(tuple(checks), dtype, "probabilistic")


def float64_model(model: Model) -> Model:
    """The reference decoder in float64: every linear layer as the graph computes it (4-bit bases
    dequantised to float32 values, refpeft_onnx.decoder_graph.decoder_layers), no adapter. Each
    tensor is read and converted when forward looks it up (LazyTensors): with forward(...,
    record=False) the float64 model is never held whole."""
    layers = decoder_layers(model)
    tied = model.config.tie_word_embeddings

    def read(name: str) -> np.ndarray:
        path = name.removesuffix(".weight")
        linear = name.endswith(".weight") and path in layers and not (tied and path == "lm_head")
        return as_float64(layers[path].weight if linear else model.weights[name])

    return Model(model.config, LazyTensors(list(model.weights), read))


def with_float64_adapter(model64: Model, adapter: Adapter | PromptAdapter) -> Model:
    """`model64` with `adapter` in float64 on top, its trained base biases in place of the model's
    (a prompt adapter's virtual tokens or prefix: PromptAdapter.on)."""
    if isinstance(adapter, PromptAdapter):
        return adapter.on(model64)
    modules = {path: module.replace(**{n: as_float64(t) for n, t in module.tensors.items() if t is not None})
               for path, module in adapter.modules.items()}
    shared = {n: as_float64(getattr(adapter, n)) for n in ("vera_A", "vera_B") if getattr(adapter, n) is not None}
    biases = {f"{path}.bias": as_float64(b) for path, b in adapter.base_biases.items()}
    base = model64.weights
    weights = LazyTensors(list(dict.fromkeys([*base, *biases])), lambda n: biases[n] if n in biases else base[n])
    return Model(model64.config, weights, replace(adapter, modules=modules, **shared))


def random_batch(vocab_size: int, *, seed: int, padding: int = PADDING) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids (2, t), attention_mask (2, t), position_ids (2, t) for t = sum(CHUNKS); row 1 left-padded by `padding`."""
    t = sum(CHUNKS)
    ids = np.random.default_rng(seed).integers(0, vocab_size, size=(2, t), dtype=np.int64)
    mask = np.ones((2, t), dtype=np.int64)
    mask[1, :padding] = 0
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1).astype(np.int64)
    return ids, mask, positions


def reference_logits(model64: Model, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, *,
                     dtype: str) -> tuple[np.ndarray, float]:
    """refpeft's float64 logits and the bound B(u) of refpeft.rounding for a `dtype` evaluation.
    With virtual tokens (model64.prompt) the decoder numbers every position itself (0 .. k + s - 1,
    as PEFT's prompt tuning does), `positions` go unused, and only the real tokens' logits are returned."""
    k = 0 if model64.prompt is None else int(model64.prompt.shape[0])

    def run(wrap: Callable[[Any], Any]) -> Any:
        given = None if k else positions
        return forward(_wrapped(model64, wrap), ids, attention_mask=mask, position_ids=given, record=False)[0][:, k:]

    expected = np.asarray(run(lambda a: a))
    return expected, rounding_bound(run, dtype=dtype)


def _wrapped(model: Model, wrap: Callable[[Any], Any]) -> Model:
    weights = LazyTensors(list(model.weights), lambda name: wrap(model.weights[name]))
    adapter = model.adapter
    if adapter is not None:
        adapter = replace(adapter, modules={p: m.replace(**{n: wrap(t) for n, t in m.tensors.items() if t is not None})
                                            for p, m in adapter.modules.items()})
    tables = {name: wrap(getattr(model, name)) for name in ("prompt", "prefix") if getattr(model, name) is not None}
    return replace(model, weights=weights, adapter=adapter, **tables)


def empty_past(reference: Model, batch: int, dtype: str) -> dict[str, np.ndarray]:
    c = reference.config
    zeros = np.zeros((batch, c.num_key_value_heads, 0, c.head_dim), dtype=DTYPES[dtype][0])
    return {f"past_key_values.{i}.{kind}": zeros for i in range(c.num_hidden_layers) for kind in ("key", "value")}


def run_whole(runner: Any, ids, mask, positions, extra: Mapping[str, np.ndarray], reference: Model, dtype: str) -> np.ndarray:
    """One call over every token, with an empty past (the inputs the graph declares; the adapter's always)."""
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
             **empty_past(reference, ids.shape[0], dtype)}
    return runner.run([_logits_name(runner)], _declared(runner, feeds, extra))[0].astype(np.float64)


def _declared(runner: Any, feeds: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feeds` the graph declares as inputs (one made elsewhere may compute position ids itself), and `extra`."""
    declared = {i.name for i in runner.get_inputs()}
    return {**{name: value for name, value in feeds.items() if name in declared}, **extra}


def _logits_name(runner: Any) -> str:
    names = [o.name for o in runner.get_outputs()]
    return OUTPUT_NAMES["logits"] if OUTPUT_NAMES["logits"] in names else names[0]


def run_cached(runner: Any, ids, mask, positions, extra: Mapping[str, np.ndarray], reference: Model, dtype: str, *,
               chunks: tuple[int, ...] = CHUNKS) -> np.ndarray:
    """One call per chunk of tokens, each fed the previous call's present.* as its past; the logits concatenated."""
    past = empty_past(reference, ids.shape[0], dtype)
    names = [o.name for o in runner.get_outputs()]
    pieces, start = [], 0
    for size in chunks:
        end = start + size
        feeds = {"input_ids": ids[:, start:end], "attention_mask": mask[:, :end],
                 "position_ids": positions[:, start:end], **past}
        outputs = dict(zip(names, runner.run(names, _declared(runner, feeds, extra))))
        pieces.append(outputs[_logits_name(runner)].astype(np.float64))
        past = {name.replace("present.", "past_key_values."): value for name, value in outputs.items()
                if name.startswith("present.")}
        start = end
    return np.concatenate(pieces, axis=1)


def require_passed(report: VerificationReport) -> None:
    if not report.passed:
        worst = report.worst
        raise VerificationError(f"{report.summary()}; {worst.comparison.describe()}; refusing to write the model")
