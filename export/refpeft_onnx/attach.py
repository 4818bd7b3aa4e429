"""Attach PEFT adapters to someone else's ONNX export of the base: find each adapted layer, insert the unmerged branch.

Given an ONNX decoder exported elsewhere (torch.onnx, optimum, the onnxruntime-genai model builder)
and the base it was exported from (refpeft.model.load), each module an adapter adapts is found
in the graph by its weight, the value the base holds, not its name (exporters rename freely:
torch.onnx's TorchScript exporter calls q_proj's weight "onnx::MatMul_707"; the genai builder
fuses q, k and v into one "qkv_proj" MatMul):

    an initializer equal to W^T (k, d) feeding a MatMul as its second input        y = x W^T
    an initializer equal to W (d, k) reaching a MatMul through Transpose, or a Gemm with transB = 1
    a column block [o, o + d) of a wider initializer (k, D)     (fused projections: y[..., o:o+d] = x W^T)

Equality is exact for a float32 graph and after rounding W to float16 for a float16 one; a weight
found twice (two equal layers) or not at all is an error naming the module. The MatMul's output y
is then renamed and the layer's branch (refpeft_onnx.graph.unmerged_linear, the same nodes and
swappable inputs as refpeft's own unmerged export) computes the name y had, so every consumer (a
bias Add, the next op) reads the adapted value; a fused block is sliced out, adapted and
concatenated back. Biases after the MatMul stay where they are, so DoRA's rescale g multiplies
x W0^T + v before the bias, as PEFT computes it, and Pre-Diag's D scales x W0^T alone.

Every branch that starts from the MatMul's output attaches: low-rank (LoRA, rsLoRA, LoHa as its
rank-r^2 Khatri-Rao factors), low-rank-rescaled (DoRA), row-scaled-low-rank (Pre-Diag),
shared-projections (VeRA) and kronecker (LoKr). IA3's input scale and OFT's rotation transform the
MatMul's input, which the foreign graph has already multiplied: unmerged_linear refuses them with a
ConfigError (given `base`), as it refuses merged-only methods (BOFT, SORA).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from refpeft.adapter import Adapter
from refpeft.errors import ConfigError, FormatError

from refpeft_onnx.builder import GraphBuilder
from refpeft_onnx.graph import unmerged_linear, vera_projections
from refpeft_onnx.decoder_graph import branches
from refpeft_onnx.stack import BaseLinear

FLOAT_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}


@dataclass(frozen=True)
class Site:
    """Where one linear layer lives in a foreign graph: the node computing x W^T and the columns of its output."""

    node: onnx.NodeProto
    x: str                  # the node's activation input
    y: str                  # its output
    offset: int             # the layer's first column in y (0 unless fused)
    width: int              # y's last dimension (d unless fused)


def find_sites(model: onnx.ModelProto, layers: Mapping[str, BaseLinear], dtype: str) -> dict[str, Site]:
    """The graph site of every layer in `layers` (module path -> BaseLinear), found by its weight's value."""
    values = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    np_dtype = np.float32 if dtype == "float32" else np.float16
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, tensor in values.items():
        if len(tensor.dims) == 2:
            by_shape.setdefault(tuple(tensor.dims), []).append(name)
    cache: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = numpy_helper.to_array(values[name])
        return cache[name]

    sites = {}
    for path, layer in layers.items():
        wt = np.ascontiguousarray(layer.weight_rows.T.astype(np_dtype))                # (k, d)
        found = []
        for shape, names in by_shape.items():
            for name in names:
                found += _matches(name, shape, value, wt, consumers)
        if not found:
            raise ConfigError(f"{path}: no MatMul of the graph multiplies by this layer's weight ({wt.shape[1]} x "
                              f"{wt.shape[0]}, as W^T, W or a block of a fused weight); was the model exported "
                              "from this base, in this dtype, unquantised?")
        if len(found) > 1:
            raise ConfigError(f"{path}: the layer's weight appears {len(found)} times in the graph; cannot tell "
                              "which MatMul is this layer")
        sites[path] = found[0]
    return sites


def _matches(name: str, shape: tuple[int, ...], value, wt: np.ndarray, consumers) -> list[Site]:
    k, d = wt.shape
    found = []
    if shape == (d, k) and np.array_equal(value(name), wt.T):                          # W, transposed in the graph
        for node in consumers.get(name, []):
            if node.op_type == "Transpose":
                found += [Site(n, n.input[0], n.output[0], 0, d) for n in consumers.get(node.output[0], [])
                          if n.op_type == "MatMul" and n.input[1] == node.output[0]]
            elif node.op_type == "Gemm" and _attribute(node, "transB") == 1 and node.input[1] == name:
                found.append(Site(node, node.input[0], node.output[0], 0, d))
    if shape[0] == k and shape[1] >= d:                                                # W^T or a block of it
        full = value(name)
        for offset in np.flatnonzero((full[0] == wt[0, 0]))[:: 1]:
            if offset + d <= shape[1] and np.array_equal(full[:, offset:offset + d], wt):
                found += [Site(n, n.input[0], n.output[0], int(offset), shape[1]) for n in consumers.get(name, [])
                          if n.op_type in ("MatMul", "Gemm") and n.input[1] == name and not _attribute(n, "transB")]
    return found


def _attribute(node: onnx.NodeProto, name: str) -> int:
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), 0)


def graph_dtype(model: onnx.ModelProto) -> str:
    """float32 or float16: the element type of the graph's logits output."""
    elem = next((o.type.tensor_type.elem_type for o in model.graph.output if o.name == "logits"),
                model.graph.output[0].type.tensor_type.elem_type)
    if elem not in FLOAT_TYPES:
        raise FormatError(f"the graph's output has element type {onnx.TensorProto.DataType.Name(elem)}; adapters are "
                          "attached to float32 or float16 graphs")
    return FLOAT_TYPES[elem]


def attach(model: onnx.ModelProto, layers: Mapping[str, BaseLinear], adapters: Mapping[str, Adapter]) -> onnx.ModelProto:
    """A copy of `model` with the unmerged branch of every module any adapter adapts (decoder_graph.branches)."""
    dtype = graph_dtype(model)
    plan = branches(adapters)
    if plan.biases:
        raise ConfigError(f"adapters train base biases of {sorted(plan.biases)[:3]}; attaching swappable biases to a "
                          "foreign graph is not supported")
    sites = find_sites(model, {path: layers[path] for path in plan.methods}, dtype)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = GraphBuilder(dtype)
    vera = [a for a in adapters.values() if a.vera_A is not None]
    vera_t = vera_projections(g, vera[0]) if vera else None
    after: dict[str, list[onnx.NodeProto]] = {}          # a MatMul's output -> the branch nodes after it
    grouped: dict[str, list[tuple[Site, str]]] = {}
    for path, site in sites.items():
        grouped.setdefault(site.y, []).append((site, path))
    for y, group in grouped.items():
        first = len(g.nodes)
        _adapted_output(g, sorted(group, key=lambda item: item[0].offset), layers, plan.methods, vera_t)
        after[y] = g.nodes[first:]
    nodes = []                                            # each branch right after its MatMul: topological order
    for node in out.graph.node:
        branch = next((after[y] for y in node.output if y in after), None)
        if branch is not None:
            node.output[list(node.output).index(branch[-1].output[0])] = f"{branch[-1].output[0]}.refpeft_base"
        nodes += [node, *(branch or [])]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(g.initializers)
    out.graph.input.extend(g.inputs)
    return out


def _adapted_output(g: GraphBuilder, group: list[tuple[Site, str]], layers: Mapping[str, BaseLinear],
                    methods: Mapping[str, str], vera_t) -> None:
    """The nodes computing y (the MatMul's output, renamed {y}.refpeft_base) with the branches of the
    layers in `group` (sorted by offset): the whole output for one plain layer, else the fused output's
    column blocks, each layer's block adapted, concatenated back in order."""
    y = group[0][0].y
    base = f"{y}.refpeft_base"
    if len(group) == 1 and group[0][0].width == layers[group[0][1]].d:
        path = group[0][1]
        adapted = unmerged_linear(g, group[0][0].x, replace(layers[path], bias=None), methods[path], vera_t=vera_t,
                                  nf4_ops="standard", swappable_bias=False, base=base)
        g.op("Identity", [adapted], y)
        return
    pieces, column = [], 0
    for site, path in group:
        if site.offset > column:
            pieces.append(_columns(g, base, column, site.offset, f"{y}.columns_{column}"))
        layer = replace(layers[path], bias=None)
        block = _columns(g, base, site.offset, site.offset + layer.d, f"{path}.fused_block")
        pieces.append(unmerged_linear(g, site.x, layer, methods[path], vera_t=vera_t, nf4_ops="standard",
                                      swappable_bias=False, base=block))
        column = site.offset + layer.d
    if group[0][0].width > column:
        pieces.append(_columns(g, base, column, group[0][0].width, f"{y}.columns_{column}"))
    g.op("Concat", pieces, y, axis=-1)


def _columns(g: GraphBuilder, x: str, start: int, end: int, name: str) -> str:
    """x[..., start:end]."""
    bounds = [g.const(f"{name}.{label}", np.asarray([v], np.int64)) for label, v in
              (("start", start), ("end", end), ("axis", -1))]
    return g.op("Slice", [x, *bounds], name)
