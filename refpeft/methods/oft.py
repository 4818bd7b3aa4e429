"""OFT for a linear layer: a block-diagonal orthogonal rotation of the input (Qiu et al. 2023, arXiv 2306.07280).

OFT as HF PEFT 0.21.2 computes it for nn.Linear (`tuners/oft/layer.py`, `OFTRotationModule`). The
trained tensor `oft_R` is V (m, n): one row of n = b (b - 1) / 2 numbers per block, m = k / b blocks
(m = 1 with `block_share`: one block used k / b times). Letters: k inputs, d outputs, b the block
size, m the stored blocks, nb = k / b the blocks of the rotation, n rows of x.

    Q_i = U_i - U_i^T,  U_i strictly upper triangular, U_i[p, q] = V[i, (p, q)] in triu order   # (m, b, b)
    R_i = cayley(Q_i)                                                         # (m, b, b)
    x'  = x diag(R_1, ..., R_nb)      (each b-wide slice of x times its block) # (n, k)
    y   = x' W0^T + b                                                         # (n, d)

so the merged weight is W' = W0 diag(R)^T (PEFT's merge: W'^T = R W0^T), the bias is unchanged, and
unmerging multiplies by diag(R)^{-T}.

The Cayley transform, in PEFT's two variants (`use_cayley_neumann`, default True):

    "neumann" (PEFT's default, T = num_cayley_neumann_terms, default 5): the truncated series of
        (I + Q)(I - Q)^{-1} = I + 2Q + 2Q^2 + 2Q^3 + ..., exactly as PEFT's loop truncates it:
        R = I + 2 sum_{j=1}^{T-2} Q^j + Q^{max(3, T-1)}   (T >= 3; T = 2: I + 2Q; T = 1: I)
        so T = 3 and T = 4 give the same R. This R is only orthogonal up to O(|Q|^(T-1)).
    "exact" (use_cayley_neumann=False): torch.linalg.solve(I + Q, I - Q, left=False), i.e.
        R = (I - Q)(I + Q)^{-1}, orthogonal for any skew Q: note it is (I + Q)(I - Q)^{-1} with
        Q -> -Q, the transpose of what the Neumann series approximates. refpeft keeps both as PEFT has them.

Backward, for dy (n, d) and G = dL/dR (nb, b, b):

    g'   = dy W0                                      # (n, k)  dL/dx'
    G_i  = x_i^T g'_i                                 # (b, b)  x_i, g'_i: the i-th b-wide slices
    dx_i = g'_i R_i^T                                 # (n, b)
    (block_share: dR = sum_i G_i, one block)

through the Cayley transform, "exact": with M = (I + Q)^{-1}, R = (I - Q) M, dM = -M dQ M,

    dR = -dQ M - (I - Q) M dQ M = -(I + R) dQ M
    dQ = -(I + R)^T G M^T = -(I + R)^T G (I - Q)^{-1}           # M^T = (I - Q)^{-1} as Q^T = -Q

(for the textbook form R = (I + Q)(I - Q)^{-1} the same steps give dQ = (I + R)^T G (I + Q)^{-1}); and
"neumann": R = sum_j c_j Q^j, d(Q^j) = sum_{a<j} Q^a dQ Q^{j-1-a}, so

    dQ = sum_j c_j sum_{a=0}^{j-1} (Q^T)^a G (Q^T)^{j-1-a}

and through Q = U - U^T: dV[i, (p, q)] = dQ_i[p, q] - dQ_i[q, p].

The constrained variant (`coft`, eps): before each forward PEFT replaces V, in place and without
gradient, by its projection onto the ball |Q_i|_F <= eps' with eps' = fl32(fl32(1 / fl32(sqrt(m))) fl32(eps))
(PEFT's float32 arithmetic, `oft_coft_eps`): Q_i -> eps' Q_i / |Q_i|_F where |Q_i|_F > eps'. The gradient is
then the gradient at the projected V (a straight-through projection, as PEFT's no_grad copy makes
it). refpeft does not mutate its inputs: `oft_forward` projects a copy and returns it in the cache
(`cache.V`); a training loop stores that as the new V, as PEFT's parameter is overwritten.
`module_dropout` (multiplicative dropout of whole blocks) acts only in training mode: not modelled.
Init (PEFT's init_weights=True): V = 0, so R = I and the layer starts as the base layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from refpeft.adapter import ModuleAdapter
from refpeft.backend import check_float_array, dtype_name, namespace
from refpeft.errors import ConfigError, ShapeError
from refpeft.init import as_parameter
from refpeft.methods.linear import base_forward, base_input_grad, check_linear_inputs, flatten_rows, linear_shape
from refpeft.methods.spec import Method

CAYLEY = ("neumann", "exact")      # PEFT's use_cayley_neumann=True / False


def oft_block_size(n_elements: int) -> int:
    """b with b (b - 1) / 2 = n_elements (the width of an oft_R row); ShapeError when there is none."""
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    if n_elements < 1 or b * (b - 1) // 2 != n_elements:
        raise ShapeError(f"oft_R rows have {n_elements} entries, which is not b (b - 1) / 2 for any block size b >= 2")
    return b


def oft_blocks(k: int, V: Any) -> int:
    """nb = k / b, the rotation's blocks; ShapeError unless b divides k (an orthogonality-breaking block size)
    and V has k / b rows (or one, shared)."""
    if len(V.shape) != 2:
        raise ShapeError(f"oft_R must be 2-D (blocks, b (b - 1) / 2), got shape {tuple(V.shape)}")
    b = oft_block_size(V.shape[1])
    if k % b != 0:
        raise ShapeError(f"OFT block size {b} (oft_R has {V.shape[1]} entries per row) does not divide the layer's "
                         f"k = {k} inputs: the rotation would not be a block-diagonal orthogonal matrix")
    if V.shape[0] not in (1, k // b):
        raise ShapeError(f"oft_R has {V.shape[0]} rows; a layer with k = {k} and block size {b} needs {k // b} "
                         "(or 1 with block_share)")
    return k // b


def oft_init(k: int, b: int, *, block_share: bool = False, dtype: str = "float64", xp: Any = None) -> Any:
    """V = 0, (k / b, b (b - 1) / 2) or (1, ...) with block_share: PEFT's init_weights=True (R = I)."""
    if b < 2 or k % b != 0:
        raise ConfigError(f"oft_block_size must be at least 2 and divide k = {k}, got {b}")
    return as_parameter(np.zeros((1 if block_share else k // b, b * (b - 1) // 2)), dtype=dtype, xp=xp)


def oft_skew_basis(b: int, *, dtype: Any, xp: Any) -> Any:
    """E (n, b * b): vec(Q) = V E places V[(p, q)] at (p, q) and -V at (q, p), p < q in torch.triu_indices'
    order; its transpose is the adjoint, dV = vec(dQ) E^T = dQ[p, q] - dQ[q, p]."""
    p, q = np.triu_indices(b, 1)
    E = np.zeros((p.size, b * b))
    E[np.arange(p.size), p * b + q] = 1.0
    E[np.arange(p.size), q * b + p] = -1.0
    return xp.asarray(E, dtype=dtype)


def oft_skew(V: Any, *, xp: Any) -> Any:
    """Q (m, b, b), skew-symmetric, from V (m, n)."""
    b = oft_block_size(V.shape[1])
    return xp.reshape(xp.matmul(V, oft_skew_basis(b, dtype=V.dtype, xp=xp)), (V.shape[0], b, b))


def oft_neumann_coefficients(terms: int) -> list[float]:
    """c_0..c_J with R = sum_j c_j Q^j, PEFT's truncation of the series (module docstring)."""
    if type(terms) is not int or terms < 1:
        raise ConfigError(f"num_cayley_neumann_terms must be a positive integer, got {terms!r}")
    if terms <= 2:
        return [1.0, 2.0][:terms]
    last = max(3, terms - 1)
    return [1.0] + [2.0] * (last - 1) + [1.0]


def oft_coft_eps(eps: float, m: int) -> float:
    """PEFT's per-block radius eps / sqrt(m), rounded as PEFT computes it: `eps * 1 / torch.sqrt(torch.tensor(m))`
    is float32, and torch evaluates `scalar / t` as `t.reciprocal() * scalar`."""
    return float((np.float32(1.0) / np.sqrt(np.float32(m))) * np.float32(eps))


def oft_coft_project(V: Any, eps: float) -> Any:
    """COFT's projection: each row's Q_i scaled onto |Q_i|_F <= eps' when outside it (|Q_i|_F = sqrt(2) |V_i|)."""
    xp = namespace(V)
    radius = oft_coft_eps(eps, V.shape[0])
    norm = xp.sqrt(2.0 * xp.sum(V * V, axis=1, keepdims=True))                 # (m, 1)  |Q_i|_F
    return xp.where(norm <= radius, V, V * (radius / xp.where(norm > 0, norm, 1.0)))


def oft_rotation(Q: Any, *, cayley: str = "neumann", terms: int = 5) -> Any:
    """R (m, b, b) from skew Q (m, b, b), PEFT's Cayley variant."""
    xp = namespace(Q)
    I = xp.eye(Q.shape[-1], dtype=Q.dtype)                                       # noqa: E741
    if cayley == "exact":                      # R (I + Q) = I - Q  <=>  (I - Q) R^T = I + Q  (Q^T = -Q)
        return xp.matrix_transpose(xp.linalg.solve(I - Q, I + Q))
    if cayley != "neumann":
        raise ConfigError(f"unknown Cayley variant {cayley!r}; choose one of {', '.join(CAYLEY)}")
    R, power = I * oft_neumann_coefficients(terms)[0] + xp.zeros_like(Q), None
    for c in oft_neumann_coefficients(terms)[1:]:
        power = Q if power is None else xp.matmul(power, Q)
        R = R + c * power
    return R


def oft_rotation_backward(G: Any, Q: Any, R: Any, *, cayley: str = "neumann", terms: int = 5) -> Any:
    """dQ (m, b, b) from dR = G through the Cayley transform (module docstring)."""
    xp = namespace(G, Q, R)
    QT = xp.matrix_transpose(Q)
    if cayley == "exact":        # dQ = -(I + R)^T G (I - Q)^{-1};  X = G (I - Q)^{-1}  <=>  (I + Q) X^T = G^T
        I = xp.eye(Q.shape[-1], dtype=Q.dtype)                                   # noqa: E741
        X = xp.matrix_transpose(xp.linalg.solve(I + Q, xp.matrix_transpose(G)))
        return -xp.matmul(xp.matrix_transpose(I + R), X)
    coefficients = oft_neumann_coefficients(terms)
    powers = [xp.eye(Q.shape[-1], dtype=Q.dtype) + xp.zeros_like(Q)]             # (Q^T)^a
    for _ in range(len(coefficients) - 2):
        powers.append(xp.matmul(powers[-1], QT))
    dQ = xp.zeros_like(G)
    for j, c in enumerate(coefficients[1:], start=1):
        for a in range(j):
            dQ = dQ + c * xp.matmul(xp.matmul(powers[a], G), powers[j - 1 - a])
    return dQ


def _blocks(a2: Any, nb: int, *, xp: Any) -> Any:
    """(n, k) -> (nb, n, b): the b-wide column slices, block first."""
    return xp.permute_dims(xp.reshape(a2, (a2.shape[0], nb, -1)), (1, 0, 2))


def _unblocks(a3: Any, *, xp: Any) -> Any:
    """(nb, n, b) -> (n, k), C-ordered (a copy): for BOFT, whose column gathers (xp.take) want C-ordered rows."""
    return xp.reshape(xp.permute_dims(a3, (1, 0, 2)), (a3.shape[1], -1))


def _times_blocks(a2: Any, R: Any, *, xp: Any) -> Any:
    """a2 diag(R_1, ..., R_nb) for a2 (n, k), R (nb or 1, b, b), computed transposed: a2^T as (nb, b, n) is a
    view, and diag(R)^T a2^T lands as one (k, n) piece, so no permuting (n, k) copy (`_unblocks`) is made."""
    n, k = a2.shape
    blocks_t = xp.reshape(xp.matrix_transpose(a2), (k // R.shape[-1], R.shape[-1], n))   # (nb, b, n)
    return xp.matrix_transpose(xp.reshape(xp.matmul(xp.matrix_transpose(R), blocks_t), (k, n)))


@dataclass(frozen=True)
class OftCache:
    """What `oft_backward` needs: the input, the (projected) V, Q, R and the frozen weight."""

    x: Any                 # (..., k)
    V: Any                 # (m, n)   after COFT's projection: store it back as the parameter
    Q: Any                 # (m, b, b)
    R: Any                 # (m, b, b)
    W0: Any
    cayley: str
    terms: int
    fan_in_fan_out: bool
    bias_trainable: bool


@dataclass(frozen=True)
class OftGrads:
    """Gradients of the loss with respect to the input and oft_R (V)."""

    dx: Any           # (..., k)
    doft_R: Any       # (m, n)
    dbias: Any        # (d,) or None when the bias is frozen or absent


def oft_forward(x: Any, W0: Any, V: Any, *, bias: Any = None, cayley: str = "neumann", terms: int = 5,
                coft: bool = False, eps: float = 6e-5, fan_in_fan_out: bool = False,
                bias_trainable: bool = False) -> tuple[Any, OftCache]:
    """y = (x diag(R)) W0^T + b with R the Cayley transform of V's skew blocks (module docstring)."""
    xp, shape = check_linear_inputs(x, W0, bias=bias, fan_in_fan_out=fan_in_fan_out, oft_R=V)
    oft_blocks(shape.k, V)                                                        # V's blocks tile k
    if bias_trainable and bias is None:
        raise ConfigError("bias_trainable=True needs a bias")
    V = oft_coft_project(V, eps) if coft else V
    Q = oft_skew(V, xp=xp)                                                        # (m, b, b)
    R = oft_rotation(Q, cayley=cayley, terms=terms)                               # (m, b, b)
    x2 = flatten_rows(x, xp=xp)                                                   # (n, k)
    xr = _times_blocks(x2, R, xp=xp)                                              # (n, k)  x diag(R)
    y = base_forward(xr, W0, bias, fan_in_fan_out=fan_in_fan_out, xp=xp)          # (n, d)
    cache = OftCache(x=x, V=V, Q=Q, R=R, W0=W0, cayley=cayley, terms=terms, fan_in_fan_out=fan_in_fan_out,
                     bias_trainable=bias_trainable)
    return xp.reshape(y, (*x.shape[:-1], shape.d)), cache


def oft_backward(dy: Any, cache: OftCache) -> OftGrads:
    """dx, doft_R (and dbias when trainable), through the Cayley transform."""
    xp = namespace(dy, cache.x)
    W0, k = cache.W0, cache.x.shape[-1]
    d = W0.shape[1] if cache.fan_in_fan_out else W0.shape[0]
    check_float_array("dy", dy, xp=xp, shape=(*cache.x.shape[:-1], d))
    nb = k // cache.R.shape[-1]
    g2 = flatten_rows(dy, xp=xp)                                                  # (n, d)
    gr = base_input_grad(g2, W0, fan_in_fan_out=cache.fan_in_fan_out, xp=xp)     # (n, k)  dL/dx'
    xb = _blocks(flatten_rows(cache.x, xp=xp), nb, xp=xp)                         # (nb, n, b)
    G = xp.matmul(xp.matrix_transpose(xb), _blocks(gr, nb, xp=xp))                # (nb, b, b)  dL/dR_i
    if cache.R.shape[0] == 1:
        G = xp.sum(G, axis=0, keepdims=True)                                      # block_share: one R, used nb times
    dQ = oft_rotation_backward(G, cache.Q, cache.R, cayley=cache.cayley, terms=cache.terms)
    b = cache.R.shape[-1]
    dV = xp.matmul(xp.reshape(dQ, (dQ.shape[0], b * b)),
                   xp.matrix_transpose(oft_skew_basis(b, dtype=dQ.dtype, xp=xp)))  # (m, n)
    dx = _times_blocks(gr, xp.matrix_transpose(cache.R), xp=xp)                   # (n, k)  g' diag(R)^T
    dbias = xp.sum(g2, axis=0) if cache.bias_trainable else None
    return OftGrads(dx=xp.reshape(dx, cache.x.shape), doft_R=dV, dbias=dbias)


def oft_rotation_matrix(V: Any, k: int, *, cayley: str = "neumann", terms: int = 5) -> Any:
    """diag(R_1, ..., R_nb) (k, k): PEFT's get_delta_weight for OFT (forms k x k; merging does not)."""
    xp = namespace(V)
    nb = oft_blocks(k, V)
    R = oft_rotation(oft_skew(V, xp=xp), cayley=cayley, terms=terms)
    b = R.shape[-1]
    R = R if R.shape[0] == nb else xp.broadcast_to(R, (nb, b, b))
    eye = xp.eye(nb, dtype=V.dtype)                                               # diag(R) = sum_i e_i e_i^T (x) R_i
    return xp.reshape(xp.permute_dims(eye[:, :, None, None] * R[:, None, :, :], (0, 2, 1, 3)), (k, k))


def _rotate_weight(W: Any, V: Any, *, cayley: str, terms: int, fan_in_fan_out: bool, inverse: bool) -> Any:
    """W diag(R)^T (merge) or W diag(R)^{-T} (unmerge) in W's layout, block by block."""
    xp = namespace(W, V)
    check_float_array("W", W, xp=xp)
    check_float_array("oft_R", V, xp=xp)
    shape = linear_shape(W, fan_in_fan_out=fan_in_fan_out)
    nb = oft_blocks(shape.k, V)
    R = oft_rotation(oft_skew(V, xp=xp), cayley=cayley, terms=terms)              # (m, b, b)
    Wt = xp.matrix_transpose(W) if not fan_in_fan_out else W                      # (k, d)
    Wb = xp.reshape(Wt, (nb, -1, shape.d))                                        # (nb, b, d)  row blocks of W^T
    if not inverse:
        out = xp.matmul(R, Wb)                                                    # W'^T = diag(R) W^T
    elif cayley == "exact":
        out = xp.matmul(xp.matrix_transpose(R), Wb)                               # R^{-1} = R^T
    else:                                                                         # Neumann R is not orthogonal
        out = xp.linalg.solve(xp.broadcast_to(R, (nb, *R.shape[1:])), Wb)
    out = xp.reshape(out, (shape.k, shape.d))
    return out if fan_in_fan_out else xp.matrix_transpose(out)


def oft_merge(W0: Any, V: Any, *, cayley: str = "neumann", terms: int = 5, fan_in_fan_out: bool = False) -> Any:
    """W0 diag(R)^T in W0's layout (PEFT: W'^T = R W0^T); the bias is unchanged."""
    return _rotate_weight(W0, V, cayley=cayley, terms=terms, fan_in_fan_out=fan_in_fan_out, inverse=False)


def oft_unmerge(W: Any, V: Any, *, cayley: str = "neumann", terms: int = 5, fan_in_fan_out: bool = False) -> Any:
    """W diag(R)^{-T}: R^T for the exact transform, a solve per block for the Neumann one (PEFT inverts the
    whole k x k matrix in float32; refpeft solves in W's dtype)."""
    return _rotate_weight(W, V, cayley=cayley, terms=terms, fan_in_fan_out=fan_in_fan_out, inverse=True)


def oft_delta_weight(W0: Any, V: Any, *, cayley: str = "neumann", terms: int = 5, fan_in_fan_out: bool = False) -> Any:
    """oft_merge(W0) - W0: the additive change, for callers that sum deltas."""
    return oft_merge(W0, V, cayley=cayley, terms=terms, fan_in_fan_out=fan_in_fan_out) - W0


def oft_parameter_count(k: int, b: int, *, block_share: bool = False) -> int:
    """Trainable entries: (k / b) b (b - 1) / 2 = k (b - 1) / 2, or b (b - 1) / 2 with block_share."""
    return (1 if block_share else k // b) * b * (b - 1) // 2


# --- the method table's rows (refpeft.methods.spec): PEFT's default Neumann variant and the exact one ----------
# PEFT's files carry num_cayley_neumann_terms and coft adapter-wide; the rows hold its defaults (T = 5, no COFT),
# and refpeft.peft_config refuses other values when reading. With block_share the (1, n) tensor reads and runs,
# but writing cannot tell it from an unshared one-block layer (the module alone does not know k).


def _oft_row(name: str, cayley: str) -> Method:
    def forward(x: Any, W0: Any, m: Any, *, shared: Any = None, bias: Any = None, dropout_mask: Any = None,
                bias_trainable: bool = False) -> tuple[Any, OftCache]:
        if dropout_mask is not None:
            raise ConfigError("OFT has no input dropout in PEFT (module_dropout is not modelled); pass dropout_mask=None")
        return oft_forward(x, W0, m.oft_R, bias=bias, cayley=cayley, fan_in_fan_out=m.fan_in_fan_out,
                           bias_trainable=bias_trainable)

    def branch(W0: Any, m: Any, *, shared: Any = None) -> tuple[Any]:
        """The exporter's "rotation" input: the blocks R (m, b, b) of diag(R), computed here (the Cayley
        transform of the row's variant) so the graph only multiplies by them."""
        oft_blocks(linear_shape(W0, fan_in_fan_out=m.fan_in_fan_out).k, m.oft_R)
        return (oft_rotation(oft_skew(m.oft_R, xp=namespace(m.oft_R)), cayley=cayley),)

    def init_modules(W0s: Mapping[str, Any], *, ranks: Mapping[str, int], alphas: Mapping[str, float],
                     seed: int = 0, generator: str = "numpy") -> tuple[dict, dict, dict]:
        """Zero oft_R (PEFT's init) with block size ranks[path] on each layer W0 (d, k)."""
        modules = {}
        for path, W0 in W0s.items():
            xp = namespace(W0)
            V = oft_init(linear_shape(W0, fan_in_fan_out=False).k, ranks[path], dtype=dtype_name(W0.dtype, xp=xp), xp=xp)
            modules[path] = ModuleAdapter(name, {"oft_R": V})
        return modules, {}, {}

    def options(m: Any) -> dict:
        return {"cayley": cayley, "fan_in_fan_out": m.fan_in_fan_out}

    return Method(
        name=name, summary=f"block-diagonal orthogonal rotation of the input, {cayley} Cayley transform (OFT)",
        peft_type="OFT", peft_flags={"use_cayley_neumann": cayley == "neumann"}, tensors={"oft_R": "oft_R.weight"},
        trainable=("oft_R",), scaled=False, mergeable=True, onnx_branch="rotation",
        rank=lambda m: int(m.oft_R.shape[0]), out_features=lambda m: None,
        in_features=lambda m: None if m.oft_R.shape[0] == 1 else int(m.oft_R.shape[0]) * oft_block_size(m.oft_R.shape[1]),
        forward=forward, backward=oft_backward,
        delta_weight=lambda W0, m, *, shared=None: oft_delta_weight(W0, m.oft_R, **options(m)),
        merge=lambda W0, m, *, shared=None: oft_merge(W0, m.oft_R, **options(m)),
        unmerge=lambda W, m, *, shared=None: oft_unmerge(W, m.oft_R, **options(m)),
        parameter_count=lambda k, d, m: int(m.oft_R.shape[0] * m.oft_R.shape[1]),
        branch_values=branch, init_modules=init_modules,
        config_options=lambda modules, config: {
            "oft_block_size": _one_block_size(modules), "r": 0, "use_cayley_neumann": cayley == "neumann",
            "num_cayley_neumann_terms": 5, "coft": False, "eps": 6e-5, "block_share": False, "module_dropout": 0.0,
            "init_weights": True})


def _one_block_size(modules: Mapping[str, Any]) -> int:
    sizes = {oft_block_size(m.oft_R.shape[1]) for m in modules.values()}
    if len(sizes) != 1:
        raise ConfigError(f"PEFT stores one oft_block_size per adapter, but the modules have {sorted(sizes)}")
    return sizes.pop()


OFT = _oft_row("oft", "neumann")
OFT_CAYLEY = _oft_row("oft-cayley", "exact")   # not in METHODS yet: the table test wants one row per module
