"""The unmerged branches, one per `Method.onnx_branch` kind: swappable inputs, ONNX nodes, error bound.

Every branch turns a layer's input h (..., k) into its output (..., d) around the frozen product
h W0^T. Its adapter tensors are graph inputs with initializer defaults ({layer}.{input}, ONNX
Runtime's adapter convention); the defaults give the base layer. Letters: s the scaling, b the
bias (added where PEFT adds it), r a symbolic rank axis; shapes at the line ends.

    "low-rank"            LoRA, rsLoRA; LoHa as its Khatri-Rao factors (rank r^2, refpeft.methods.loha)
        inputs  lora_A_t (k, r)  lora_B_t (r, d)  lora_scaling (1,)      default r = 0, s = 1
        y = h W0^T + ((h A^T) s) B^T + b
    "low-rank-rescaled"   DoRA (its fixed per-row g = m / ||W0 + s B A||, refpeft.methods.dora)
        inputs  the low-rank ones, and dora_scale (d,)                   default g = 1
        y = g * (h W0^T + ((h A^T) s) B^T) + b
    "row-scaled-low-rank" Pre-Diag (refpeft.methods.prediag: W' = diag(D) W0 + s B A)
        inputs  the low-rank ones, and prediag_D (d,)                    default D = 1
        y = (h W0^T) * D + ((h A^T) s) B^T + b
    "shared-projections"  VeRA: A^T, B^T are slices of the adapter-wide projections, graph constants
        inputs  vera_lambda_d (r,)  vera_lambda_b (d,)                   default lambda_b = 0
        y = h W0^T + lambda_b * ((lambda_d * (h A^T)) B^T) + b
    "ia3-scaling"         IA3 (refpeft.methods.ia3), both of its sides in one branch
        inputs  ia3_input_scale (k,)  ia3_output_scale (d,)              default ones
        y = ((h * l_in) W0^T + b) * l_out
        an output-scaling module (PEFT's l (d, 1), k/v projections) ships l_in = 1, l_out = l;
        an input-scaling one (l (1, k), feedforward_modules) ships l_in = l, l_out = 1: the factor
        of 1 is exact, so each computes PEFT's own expression, and either kind swaps in per run.
    "rotation"            OFT (refpeft.methods.oft): h's b-wide slices times the blocks of diag(R)
        inputs  oft_rotation (m, b, b), m = k / b blocks (or 1, shared)  default m = k, b = 1: ones
        h_blocks = Reshape(h, (n, k / b, 1, b));  h' = Reshape(MatMul(h_blocks, R), h's shape)
        y = h' W0^T + b
        R is the Cayley transform of oft_R's skew blocks, computed once in float64 when the adapter
        file is written (refpeft.methods.oft.oft_rotation, the row's variant: PEFT's Neumann series,
        or the exact solve): exact up to one rounding to the graph dtype, and cheap (m b^3). In the
        graph the Neumann series would cost T - 2 batched b x b products per run and the exact
        variant needs a matrix inverse, which standard ONNX has no op for. m and b are symbolic
        axes, so adapters of any block size share a session.
    "kronecker"           LoKr (refpeft.methods.lokr): kron(w1, w2) applied without forming it
        inputs  lokr_w1 (d1, k1)  lokr_w2_t (k2, d2)  lokr_scaling (1,)  default w1 = 0 (d, 1), w2_t = 0 (k, 1)
        X = Reshape(h, (n, k / k2, k2));  Y = MatMul(w1, MatMul(X, w2^T))  # (n, d1, d2)
        y = h W0^T + Reshape(Y, (..., d)) * s + b
        low-rank factors (lokr_w1_a lokr_w1_b) are multiplied out in float64 when the file is written;
        d1, k1, d2, k2 are symbolic axes, so any factorisation (decompose_factor) swaps in.

"merged-only" (SORA, whose rotation of W0's outputs is no branch) and any other kind have no
unmerged graph: refpeft_onnx.graph says so when one is asked for.

Each kind's `bound` is the error of exactly these nodes in refpeft.tolerance's algebra (every
input tensor stored once in the graph dtype, each MatMul a dot product of its inner length, each
Add/Mul one rounding), for refpeft_onnx.verify.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from refpeft.tolerance import Bounded, Precision, add, matmul, multiply, stored

from refpeft_onnx.builder import GraphBuilder
from refpeft_onnx.stack import BaseLinear, as_float64

# (g, h, layer, names, *, base_of, add_bias, vera_t) -> the layer's output value name
Builder = Callable[..., str]
# (h, layer, values, p, *, base_of, add_bias, adapter) -> Bounded output, values in the inputs' order
Bound = Callable[..., Bounded]


@dataclass(frozen=True)
class Branch:
    """One branch kind: its swappable inputs (names after "{layer}."), its nodes, its error bound."""

    inputs: tuple[str, ...]
    build: Builder
    bound: Bound


# ---------------------------------------------------------------- the low-rank family (LoRA, DoRA, Pre-Diag, LoHa)

LOW_RANK = ("lora_A_t", "lora_B_t", "lora_scaling")


def _low_rank_build(extra: str | None) -> Builder:
    def build(g: GraphBuilder, h: str, layer: BaseLinear, names: tuple[str, ...], *, base_of, add_bias,
              **unused: Any) -> str:
        name, k, d = layer.name, layer.k, layer.d
        base = base_of(h)                                                                    # (..., d)
        a_t = g.swappable(names[0], np.zeros((k, 0)), [k, f"{name}.rank"])
        b_t = g.swappable(names[1], np.zeros((0, d)), [f"{name}.rank", d])
        s = g.swappable(names[2], np.ones(1), [1])
        xa = g.op("MatMul", [h, a_t], f"{name}.xa")                                          # (..., r)
        scaled = g.op("Mul", [xa, s], f"{name}.scaled_xa")                                   # s xa: r columns, not d
        v = g.op("MatMul", [scaled, b_t], f"{name}.branch")                                  # (..., d)
        if extra == "prediag_D":
            base = g.op("Mul", [base, g.swappable(names[3], np.ones(d), [d])], f"{name}.prediag")
        total = g.op("Add", [base, v], f"{name}.sum")
        if extra == "dora_scale":
            total = g.op("Mul", [g.swappable(names[3], np.ones(d), [d]), total], f"{name}.dora")
        return add_bias(total)

    return build


def _low_rank_bound(extra: str | None) -> Bound:
    def bound(h: Bounded, layer: BaseLinear, values: list[np.ndarray], p: Precision, *, base_of, add_bias,
              **unused: Any) -> Bounded:
        base = base_of(h)
        scaled = multiply(matmul(h, stored(values[0], p), p), stored(values[2], p), p)      # s (h A^T)
        v = matmul(scaled, stored(values[1], p), p)                                          # (s xa) B^T
        if extra == "prediag_D":
            base = multiply(base, stored(values[3], p), p)
        total = add(base, v, p)
        if extra == "dora_scale":
            total = multiply(stored(values[3], p), total, p)
        return add_bias(total)

    return bound


# ---------------------------------------------------------------- VeRA

def _vera_build(g: GraphBuilder, h: str, layer: BaseLinear, names: tuple[str, ...], *, base_of, add_bias,
                vera_t: tuple[str, str, int], **unused: Any) -> str:
    name, k, d = layer.name, layer.k, layer.d
    base = base_of(h)
    lambda_d = g.swappable(names[0], np.zeros(vera_t[2]), [vera_t[2]])
    lambda_b = g.swappable(names[1], np.zeros(d), [d])
    starts, k_end, d_end, axis0, axis1 = (g.const(f"{name}.slice.{s}", np.asarray(v, dtype=np.int64))
                                          for s, v in (("start", [0]), ("k", [k]), ("d", [d]),
                                                       ("axis0", [0]), ("axis1", [1])))
    a_t = g.op("Slice", [vera_t[0], starts, k_end, axis0], f"{name}.vera_A_t")              # (k, r)
    b_t = g.op("Slice", [vera_t[1], starts, d_end, axis1], f"{name}.vera_B_t")              # (r, d)
    xa = g.op("MatMul", [h, a_t], f"{name}.xa")                                              # (..., r)
    scaled = g.op("Mul", [xa, lambda_d], f"{name}.lambda_d_xa")
    v = g.op("Mul", [g.op("MatMul", [scaled, b_t], f"{name}.xb"), lambda_b], f"{name}.branch")
    return add_bias(g.op("Add", [base, v], f"{name}.sum"))


def _vera_bound(h: Bounded, layer: BaseLinear, values: list[np.ndarray], p: Precision, *, base_of, add_bias,
                adapter: Any, **unused: Any) -> Bounded:
    A_t, B_t = as_float64(adapter.vera_A)[:, : layer.k].T, as_float64(adapter.vera_B)[: layer.d, :].T
    scaled = multiply(matmul(h, stored(A_t, p), p), stored(values[0], p), p)                 # lambda_d * xa
    v = multiply(matmul(scaled, stored(B_t, p), p), stored(values[1], p), p)
    return add_bias(add(base_of(h), v, p))


# ---------------------------------------------------------------- IA3

def _ia3_build(g: GraphBuilder, h: str, layer: BaseLinear, names: tuple[str, ...], *, base_of, add_bias,
               **unused: Any) -> str:
    l_in = g.swappable(names[0], np.ones(layer.k), [layer.k])
    l_out = g.swappable(names[1], np.ones(layer.d), [layer.d])
    scaled = g.op("Mul", [h, l_in], f"{layer.name}.ia3_input")                              # (..., k)
    return g.op("Mul", [add_bias(base_of(scaled)), l_out], f"{layer.name}.ia3_output")      # (..., d)


def _times(P: Bounded, l: np.ndarray, p: Precision) -> Bounded:
    """P * l; a factor of exactly 1 everywhere rounds nothing (IEEE: x * 1 = x)."""
    return P if np.all(l == 1.0) else multiply(P, stored(l, p), p)


def _ia3_bound(h: Bounded, layer: BaseLinear, values: list[np.ndarray], p: Precision, *, base_of, add_bias,
               **unused: Any) -> Bounded:
    return _times(add_bias(base_of(_times(h, values[0], p))), values[1], p)


# ---------------------------------------------------------------- OFT

def _i64(g: GraphBuilder, name: str, values: list[int]) -> str:
    return g.shared(f"branch.{name}", np.asarray(values, dtype=np.int64))


def _rotation_build(g: GraphBuilder, h: str, layer: BaseLinear, names: tuple[str, ...], *, base_of, add_bias,
                    **unused: Any) -> str:
    name, k = layer.name, layer.k
    b_axis = f"{name}.oft_block_size"
    R = g.swappable(names[0], np.ones((k, 1, 1)), [f"{name}.oft_blocks", b_axis, b_axis])  # (m, b, b)
    b = g.op("Shape", [R], f"{name}.oft_b", start=2, end=3)                                  # (1,) int64
    blocks = g.op("Div", [g.const(f"{name}.oft_k", np.asarray([k], np.int64)), b], f"{name}.oft_nb")   # k / b
    target = g.op("Concat", [_i64(g, "minus_one", [-1]), blocks, _i64(g, "one", [1]), b], f"{name}.oft_shape",
                  axis=0)
    x_blocks = g.op("Reshape", [h, target], f"{name}.oft_x_blocks")                          # (n, k / b, 1, b)
    rotated = g.op("MatMul", [x_blocks, R], f"{name}.oft_x_rotated")                        # (n, k / b, 1, b)
    x_r = g.op("Reshape", [rotated, g.op("Shape", [h], f"{name}.oft_x_shape")], f"{name}.oft_x")   # (..., k)
    return add_bias(base_of(x_r))


def _rotation_bound(h: Bounded, layer: BaseLinear, values: list[np.ndarray], p: Precision, *, base_of, add_bias,
                    **unused: Any) -> Bounded:
    R = values[0]                                                                            # (m, b, b)
    b = R.shape[-1]
    pieces = [matmul(Bounded(h.value[:, i * b:(i + 1) * b], h.error[:, i * b:(i + 1) * b]),
                     stored(R[0 if R.shape[0] == 1 else i], p), p) for i in range(layer.k // b)]
    rotated = Bounded(np.concatenate([q.value for q in pieces], axis=-1),
                      np.concatenate([q.error for q in pieces], axis=-1))                    # (n, k)
    return add_bias(base_of(rotated))


# ---------------------------------------------------------------- LoKr

def _kronecker_build(g: GraphBuilder, h: str, layer: BaseLinear, names: tuple[str, ...], *, base_of, add_bias,
                     **unused: Any) -> str:
    name, k, d = layer.name, layer.k, layer.d
    base = base_of(h)
    w1 = g.swappable(names[0], np.zeros((d, 1)), [f"{name}.lokr_d1", f"{name}.lokr_k1"])    # (d1, k1)
    w2_t = g.swappable(names[1], np.zeros((k, 1)), [f"{name}.lokr_k2", f"{name}.lokr_d2"])  # (k2, d2)
    s = g.swappable(names[2], np.ones(1), [1])
    k2 = g.op("Shape", [w2_t], f"{name}.lokr_k2_size", start=0, end=1)                            # (1,) int64
    k1 = g.op("Div", [g.const(f"{name}.lokr_k", np.asarray([k], np.int64)), k2], f"{name}.lokr_k1_size")
    X = g.op("Reshape", [h, g.op("Concat", [_i64(g, "minus_one", [-1]), k1, k2], f"{name}.lokr_x_shape", axis=0)],
             f"{name}.lokr_X")                                                                # (n, k1, k2)
    Z = g.op("MatMul", [X, w2_t], f"{name}.lokr_Z")                                           # (n, k1, d2)
    Y = g.op("MatMul", [w1, Z], f"{name}.lokr_Y")                                             # (n, d1, d2)
    leading = g.op("Shape", [h], f"{name}.lokr_leading", start=0, end=-1)
    out_shape = g.op("Concat", [leading, g.const(f"{name}.lokr_d", np.asarray([d], np.int64))],
                     f"{name}.lokr_y_shape", axis=0)
    v = g.op("Mul", [g.op("Reshape", [Y, out_shape], f"{name}.lokr_y"), s], f"{name}.branch")   # (..., d)
    return add_bias(g.op("Add", [base, v], f"{name}.sum"))


def _view(P: Bounded, f: Callable[[np.ndarray], np.ndarray]) -> Bounded:
    """A reshape or transpose of a bounded quantity (no rounding)."""
    return Bounded(f(P.value), f(P.error))


def _kronecker_bound(h: Bounded, layer: BaseLinear, values: list[np.ndarray], p: Precision, *, base_of, add_bias,
                     **unused: Any) -> Bounded:
    w1, w2_t, s = values
    (d1, k1), d2 = w1.shape, w2_t.shape[1]
    Z = matmul(_view(h, lambda a: a.reshape(-1, k1, w2_t.shape[0])), stored(w2_t, p), p)     # (n, k1, d2)
    Yt = matmul(_view(Z, lambda a: a.transpose(0, 2, 1)), stored(w1.T, p), p)                # (n, d2, d1) = (w1 Z)^T
    v = multiply(_view(Yt, lambda a: a.transpose(0, 2, 1).reshape(-1, d1 * d2)), stored(s, p), p)
    return add_bias(add(base_of(h), v, p))


BRANCHES: dict[str, Branch] = {
    "low-rank": Branch(LOW_RANK, _low_rank_build(None), _low_rank_bound(None)),
    "low-rank-rescaled": Branch((*LOW_RANK, "dora_scale"), _low_rank_build("dora_scale"), _low_rank_bound("dora_scale")),
    "row-scaled-low-rank": Branch((*LOW_RANK, "prediag_D"), _low_rank_build("prediag_D"), _low_rank_bound("prediag_D")),
    "shared-projections": Branch(("vera_lambda_d", "vera_lambda_b"), _vera_build, _vera_bound),
    "ia3-scaling": Branch(("ia3_input_scale", "ia3_output_scale"), _ia3_build, _ia3_bound),
    "rotation": Branch(("oft_rotation",), _rotation_build, _rotation_bound),
    "kronecker": Branch(("lokr_w1", "lokr_w2_t", "lokr_scaling"), _kronecker_build, _kronecker_bound),
}
