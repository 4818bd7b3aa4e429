"""SORA for a linear layer: scale and orthogonally rotate the frozen weight's rows, beside a LoRA update.

SORA (scaling and orthogonal rotation adaptation, the "weight conditioning" family with Pre-Diag,
refpeft.methods.prediag) trains a per-output scale s (d,), a rotation R (d, d) and LoRA's A, B:

    W' = diag(s) R W0 + c B A                   # (d, k)   c = alpha / r (alpha / sqrt(r) with rsLoRA)

No library (HF PEFT included) provides it: refpeft's code is checked by float64 finite differences and
properties only (tests/test_sora.py), and its table row has peft_type None (no PEFT files).

Parameterisation, and why:
- R rotates the *outputs* (it multiplies W0 from the left, in W0's (d, k) layout): the complement of
  OFT, which rotates the inputs. R is block-diagonal, diag(R_1, ..., R_nb) with nb = d / b blocks of
  size b, each the exact Cayley transform of a skew-symmetric Q_i: R_i = (I - Q_i)(I + Q_i)^{-1}, Q_i
  built from b (b - 1) / 2 trained numbers per block (`sora_R` (nb, b (b - 1) / 2), OFT's storage and
  OFT's code: refpeft.methods.oft). The exact transform keeps R orthogonal for *any* Q (to rounding),
  which the property tests check; the Cayley map reaches every rotation without a -1 eigenvalue and
  is smooth, so training needs no re-orthogonalisation. Blocks keep the count at d (b - 1) / 2 rather
  than d (d - 1) / 2 (b = d is one full rotation).
- s is per output row, not one scalar: a scalar is the special case s = c 1, and with R = I SORA *is*
  Pre-Diag (D = s), which the tests check; the rotation then only redistributes directions, the
  scale their lengths (DoRA's magnitude/direction split, applied to W0 rather than to W0 + B A).

Forward (PyTorch layout, rows flattened to n; z_i, u_i: the b-wide column slices of z, u):

    z   = x W0^T                                # (n, d)
    u_i = z_i R_i^T                             # (n, b)   u = z R^T
    y   = u * s + b + c (dropout(x) A^T) B^T    # (n, d)   Pre-Diag's head with D = s, z -> u

Backward, for dy (n, d): Pre-Diag's head gives ds, dA, dB, du = dy * s and the adapter part of dx;
then

    G_i  = du_i^T z_i                           # (b, b)   dL/dR_i
    dz_i = du_i R_i                             # (n, b)
    dx   = dz W0 + dx_adapter                   # (n, k)
    dQ_i = -(I + R_i)^T G_i (I - Q_i)^{-1}      # OFT's exact-Cayley backward (refpeft.methods.oft)
    dsora_R[i, (p, q)] = dQ_i[p, q] - dQ_i[q, p]

Merge, in W0's (d, k) layout: W = diag(s) R W0 + c B A. Unmerge: W0 = R^T diag(1/s) (W - c B A),
using R^{-1} = R^T (exact Cayley); NonFiniteError when s has zeros.
Init: s = 1, sora_R = 0 (R = I), A Kaiming-uniform, B = 0: W' = W0 exactly at start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from refpeft.adapter import ModuleAdapter
from refpeft.backend import check_float_array, dtype_name, namespace
from refpeft.errors import ConfigError, ShapeError
from refpeft.init import as_parameter
from refpeft.methods.linear import base_forward, base_input_grad, flatten_rows, linear_shape, weight_rows
from refpeft.methods.lora import lora_delta_weight, lora_parameter_count
from refpeft.methods.oft import _blocks, _times_blocks, oft_block_size, oft_rotation, oft_rotation_backward, \
    oft_rotation_matrix, oft_skew, oft_skew_basis
from refpeft.methods.prediag import PrediagCache, check_head_inputs, check_row_scale, in_layout, prediag_head, \
    prediag_head_backward, prediag_head_bound, prediag_init, refuse_zero_scales
from refpeft.methods.spec import Method
from refpeft.tolerance import Bounded, Precision, add, exact, matmul, multiply, output_bound, rows, transpose, \
    with_reference


def sora_blocks(d: int, V: Any) -> int:
    """nb = d / b, the rotation's blocks; ShapeError unless b divides d and sora_R has d / b rows."""
    if len(V.shape) != 2:
        raise ShapeError(f"sora_R must be 2-D (blocks, b (b - 1) / 2), got shape {tuple(V.shape)}")
    b = oft_block_size(V.shape[1])
    if d % b != 0 or V.shape[0] != d // b:
        raise ShapeError(f"sora_R has shape {tuple(V.shape)}: block size {b}, {V.shape[0]} blocks; a layer with "
                         f"d = {d} outputs needs b to divide d and d / b rows")
    return d // b


def sora_init(k: int, d: int, r: int, b: int, *, seed: int = 0, generator: str = "numpy", dtype: str = "float64",
              xp: Any = None) -> tuple[Any, Any, Any, Any]:
    """(A, B, s, sora_R): LoRA's init, s = 1 (d,), sora_R = 0 (d / b, b (b - 1) / 2), so W' = W0."""
    if type(b) is not int or b < 2 or d % b != 0:
        raise ConfigError(f"SORA's block size must be an integer >= 2 dividing d = {d}, got {b!r}")
    A, B, s = prediag_init(k, d, r, seed=seed, generator=generator, dtype=dtype, xp=xp)
    return A, B, s, as_parameter(np.zeros((d // b, b * (b - 1) // 2)), dtype=dtype, xp=xp)


def sora_rotation(V: Any) -> tuple[Any, Any]:
    """(Q, R), each (nb, b, b): the skew blocks and their exact Cayley rotations."""
    Q = oft_skew(V, xp=namespace(V))
    return Q, oft_rotation(Q, cayley="exact")


@dataclass(frozen=True)
class SoraCache:
    """What `sora_backward` needs: Pre-Diag's head cache (its z is u = z R^T), z, Q, R."""

    head: PrediagCache
    z: Any                 # (n, d)      x W0^T before the rotation
    Q: Any                 # (nb, b, b)
    R: Any                 # (nb, b, b)


@dataclass(frozen=True)
class SoraGrads:
    """Gradients of the loss with respect to the input and each trainable tensor."""

    dx: Any          # (..., k)
    dA: Any          # (r, k)
    dB: Any          # (d, r)
    dsora_s: Any     # (d,)
    dsora_R: Any     # (nb, b (b - 1) / 2)
    dbias: Any       # (d,) or None


def sora_forward(x: Any, W0: Any, A: Any, B: Any, s: Any, V: Any, *, scaling: float, bias: Any = None,
                 dropout_mask: Any = None, fan_in_fan_out: bool = False,
                 bias_trainable: bool = False) -> tuple[Any, SoraCache]:
    """y = (x W0^T R^T) * s + b + c (dropout(x) A^T) B^T; see the module docstring."""
    xp, shape = check_head_inputs(x, W0, A, B, s, bias=bias, dropout_mask=dropout_mask, fan_in_fan_out=fan_in_fan_out,
                                  bias_trainable=bias_trainable, scale_name="sora_s", sora_R=V)
    sora_blocks(shape.d, V)                                                       # V's blocks tile d
    Q, R = sora_rotation(V)                                                       # (nb, b, b)
    z = base_forward(flatten_rows(x, xp=xp), W0, None, fan_in_fan_out=fan_in_fan_out, xp=xp)   # (n, d)
    u = _times_blocks(z, xp.matrix_transpose(R), xp=xp)                                       # (n, d)  z R^T
    y, xa = prediag_head(u, x, A, B, s, scaling=scaling, bias=bias, dropout_mask=dropout_mask, xp=xp)
    head = PrediagCache(x=x, dropout_mask=dropout_mask, z=u, xa=xa, W0=W0, A=A, B=B, D=s, scaling=scaling,
                        fan_in_fan_out=fan_in_fan_out, bias_trainable=bias_trainable)
    return xp.reshape(y, (*x.shape[:-1], shape.d)), SoraCache(head=head, z=z, Q=Q, R=R)


def sora_backward(dy: Any, cache: SoraCache) -> SoraGrads:
    """dx, dA, dB, dsora_s, dsora_R (and dbias when trainable) from dy = dL/dy; see the module docstring."""
    head = cache.head
    xp = namespace(dy, head.x)
    check_float_array("dy", dy, xp=xp, shape=(*head.x.shape[:-1], head.D.shape[0]))
    g2 = flatten_rows(dy, xp=xp)                                                  # (n, d)
    du, ds, dA, dB, dx_adapter = prediag_head_backward(g2, head, xp=xp)
    nb, b = cache.R.shape[0], cache.R.shape[-1]
    dub = _blocks(du, nb, xp=xp)                                                  # (nb, n, b)
    G = xp.matmul(xp.matrix_transpose(dub), _blocks(cache.z, nb, xp=xp))          # (nb, b, b)  dL/dR_i
    dz = _times_blocks(du, cache.R, xp=xp)                                        # (n, d)
    dQ = oft_rotation_backward(G, cache.Q, cache.R, cayley="exact")               # (nb, b, b)
    dV = xp.matmul(xp.reshape(dQ, (nb, b * b)), xp.matrix_transpose(oft_skew_basis(b, dtype=dQ.dtype, xp=xp)))
    dx = base_input_grad(dz, head.W0, fan_in_fan_out=head.fan_in_fan_out, xp=xp)
    dx += dx_adapter                                                              # in place into the fresh product
    dbias = xp.sum(g2, axis=0) if head.bias_trainable else None
    return SoraGrads(dx=xp.reshape(dx, head.x.shape), dA=dA, dB=dB, dsora_s=ds, dsora_R=dV, dbias=dbias)


def _rotate_rows(W: Any, V: Any, *, fan_in_fan_out: bool, inverse: bool) -> Any:
    """R W (or R^T W with inverse=True) for W in its layout, block by block; returned as (d, k)."""
    xp = namespace(W, V)
    check_float_array("W", W, xp=xp)
    check_float_array("sora_R", V, xp=xp)
    shape = linear_shape(W, fan_in_fan_out=fan_in_fan_out)
    nb = sora_blocks(shape.d, V)
    _, R = sora_rotation(V)
    R = xp.matrix_transpose(R) if inverse else R
    Wb = xp.reshape(weight_rows(W, fan_in_fan_out=fan_in_fan_out, xp=xp), (nb, -1, shape.k))   # (nb, b, k)
    return xp.reshape(xp.matmul(R, Wb), (shape.d, shape.k))


def _in_layout(W_rows: Any, *, fan_in_fan_out: bool, xp: Any) -> Any:
    return xp.matrix_transpose(W_rows) if fan_in_fan_out else W_rows


def sora_merge(W0: Any, A: Any, B: Any, s: Any, V: Any, *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """W = diag(s) R W0 + c B A in W0's layout."""
    delta = lora_delta_weight(A, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out)
    xp = namespace(W0, s)
    check_float_array("W0", W0, xp=xp, shape=tuple(delta.shape))
    check_row_scale("sora_s", s, B.shape[0])
    RW = _in_layout(_rotate_rows(W0, V, fan_in_fan_out=fan_in_fan_out, inverse=False), fan_in_fan_out=fan_in_fan_out, xp=xp)
    return RW * in_layout(s, fan_in_fan_out=fan_in_fan_out) + delta


def sora_unmerge(W: Any, A: Any, B: Any, s: Any, V: Any, *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """W0 = R^T diag(1/s) (W - c B A); NonFiniteError when s has zeros."""
    delta = lora_delta_weight(A, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out)
    xp = namespace(W, s)
    check_float_array("W", W, xp=xp, shape=tuple(delta.shape))
    check_row_scale("sora_s", s, B.shape[0])
    refuse_zero_scales("sora_s", s, xp=xp)
    unscaled = (W - delta) / in_layout(s, fan_in_fan_out=fan_in_fan_out)
    return _in_layout(_rotate_rows(unscaled, V, fan_in_fan_out=fan_in_fan_out, inverse=True),
                      fan_in_fan_out=fan_in_fan_out, xp=xp)


def sora_delta_weight(W0: Any, A: Any, B: Any, s: Any, V: Any, *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """W - W0, in W0's layout (forms the d x k product, for summing deltas)."""
    return sora_merge(W0, A, B, s, V, scaling=scaling, fan_in_fan_out=fan_in_fan_out) - W0


def sora_parameter_count(k: int, d: int, r: int, b: int, *, bias: bool = False) -> int:
    """Trainable entries: r (d + k) for A, B; d for s; (d / b) b (b - 1) / 2 = d (b - 1) / 2 for R."""
    return lora_parameter_count(k, d, r, bias=bias) + d + (d // b) * b * (b - 1) // 2


# --- error bounds (composed from refpeft.tolerance's algebra; docs/tolerance.md) ---------------
# The exact Cayley transform is a LAPACK solve, which the algebra has no rule for: R's error is
# *measured* (R evaluated in float32 against float64) and carried as R's error, not derived a priori.
# The product with the d x d block-diagonal R is bounded as a full d-long sum (zeros off the blocks):
# valid for any order, looser than gamma_b.


def _measured_rotation(V: Any, d: int, dtype: str) -> Bounded:
    if dtype not in ("float32", "float64"):
        raise ConfigError(f"SORA's bounds measure R's error in float32 or float64, not {dtype!r}")
    R64 = oft_rotation_matrix(np.asarray(V, dtype=np.float64), d, cayley="exact")
    R_low = oft_rotation_matrix(np.asarray(V, dtype=dtype), d, cayley="exact").astype(np.float64)
    return Bounded(R64, np.abs(R_low - R64))


def sora_forward_bound(x: Any, W0: Any, A: Any, B: Any, s: Any, V: Any, *, scaling: float, bias: Any = None,
                       dropout_mask: Any = None, fan_in_fan_out: bool = False, dtype: str = "float32",
                       accumulation: str | None = None, model: str = "rigorous") -> Any:
    """Per-element bound on |y_computed - y| for SORA's forward in `dtype` (R's own error measured)."""
    d = linear_shape(W0, fan_in_fan_out=fan_in_fan_out).d
    R = _measured_rotation(V, d, dtype)

    def chain(p: Precision) -> Bounded:
        z = matmul(rows(exact(x)), exact(W0) if fan_in_fan_out else transpose(exact(W0)), p)
        return prediag_head_bound(matmul(z, transpose(R), p), x, A, B, s, scaling=scaling, bias=bias,
                                  dropout_mask=dropout_mask, p=p)

    return output_bound(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def sora_merge_bound(W0: Any, A: Any, B: Any, s: Any, V: Any, *, scaling: float, fan_in_fan_out: bool = False,
                     dtype: str = "float32", accumulation: str | None = None, model: str = "rigorous") -> Any:
    """Per-element bound on the merged diag(s) R W0 + c B A in `dtype`, W0's layout (R's error measured)."""
    d = linear_shape(W0, fan_in_fan_out=fan_in_fan_out).d
    R = _measured_rotation(V, d, dtype)

    def chain(p: Precision) -> Bounded:
        W_rows = transpose(exact(W0)) if fan_in_fan_out else exact(W0)
        merged = add(multiply(matmul(R, W_rows, p), exact(np.asarray(s)[:, None]), p),
                     matmul(exact(B), exact(A), p, scale=scaling), p)                # (d, k)
        return transpose(merged) if fan_in_fan_out else merged

    return with_reference(chain, Precision(dtype, accumulation, model))


# --- the method table's row (refpeft.methods.spec): refpeft-only, no PEFT files ------------------


def _module_forward(x: Any, W0: Any, m: Any, *, shared: Any = None, bias: Any = None, dropout_mask: Any = None,
                    bias_trainable: bool = False) -> tuple[Any, SoraCache]:
    return sora_forward(x, W0, m.A, m.B, m.sora_s, m.sora_R, scaling=m.scaling, bias=bias, dropout_mask=dropout_mask,
                        fan_in_fan_out=m.fan_in_fan_out, bias_trainable=bias_trainable)


def _module_init(W0s: Mapping[str, Any], *, ranks: Mapping[str, int], alphas: Mapping[str, float], seed: int = 0,
                 generator: str = "numpy", block_size: int = 2, **unused: Any) -> tuple[dict, dict, dict]:
    """Fresh SORA modules on the layers W0s (d, k), rotation blocks of `block_size`: layer i from seed + i."""
    modules = {}
    for i, (path, W0) in enumerate(W0s.items()):
        xp = namespace(W0)
        A, B, s, V = sora_init(int(W0.shape[1]), int(W0.shape[0]), ranks[path], block_size, seed=seed + i,
                               generator=generator, dtype=dtype_name(W0.dtype, xp=xp), xp=xp)
        modules[path] = ModuleAdapter("sora", {"A": A, "B": B, "sora_s": s, "sora_R": V}, alpha=alphas[path])
    return modules, {}, {}


def _no_branch(W0: Any, m: Any, *, shared: Any = None) -> tuple[Any, ...]:
    raise ConfigError("SORA rotates and rescales the frozen weight's outputs: it has no additive branch to export "
                      "unmerged; export it merged")


def _options(m: Any) -> dict:
    return {"scaling": m.scaling, "fan_in_fan_out": m.fan_in_fan_out}


SORA = Method(
    name="sora", summary="per-row scale and block Cayley rotation of W0 beside a LoRA update: diag(s) R W0 + c B A "
                         "(refpeft only)",
    peft_type=None, peft_flags={},
    tensors={"A": "lora_A.weight", "B": "lora_B.weight", "sora_s": "sora_s", "sora_R": "sora_R"},
    trainable=("A", "B", "sora_s", "sora_R"), per_output=("B", "sora_s"), scaled=True, mergeable=True,
    onnx_branch="merged-only",
    rank=lambda m: int(m.A.shape[0]), out_features=lambda m: int(m.B.shape[0]), in_features=lambda m: int(m.A.shape[1]),
    forward=_module_forward, backward=sora_backward,
    delta_weight=lambda W0, m, *, shared=None: sora_delta_weight(W0, m.A, m.B, m.sora_s, m.sora_R, **_options(m)),
    merge=lambda W0, m, *, shared=None: sora_merge(W0, m.A, m.B, m.sora_s, m.sora_R, **_options(m)),
    unmerge=lambda W, m, *, shared=None: sora_unmerge(W, m.A, m.B, m.sora_s, m.sora_R, **_options(m)),
    parameter_count=lambda k, d, m: lora_parameter_count(k, d, m.r) + d + int(m.sora_R.shape[0] * m.sora_R.shape[1]),
    branch_values=_no_branch, init_modules=_module_init,
)
