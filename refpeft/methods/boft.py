"""BOFT for a linear layer: OFT with a butterfly product of block-diagonal rotations (Liu et al. 2024, 2311.06243).

BOFT as HF PEFT 0.21.2 computes it for nn.Linear (`tuners/boft/layer.py`, `Linear.forward`, `get_delta_weight`).
Letters: k inputs, d outputs, N = boft_n_butterfly_factor factors, D = boft_block_num blocks of H =
boft_block_size (D H = k), n rows of x. The trained tensors are `boft_R` (N, D, H, H), full square matrices
of which only the skew part counts, and `boft_s` (d, 1), a scale per output.

    S_{j,i} = (A_{j,i} - A_{j,i}^T) / 2          A = boft_R, j < N factors, i < D blocks   # (N, D, H, H)
    R_{j,i} = (I - S_{j,i}) (I + S_{j,i})^{-1}   PEFT's cayley_batch: solve(I + S, I - S, left=False)
    M_j     = P_j diag(R_{j,0}, ..., R_{j,D-1}) P_j^T                                       # (k, k)
    B       = M_{N-1} ... M_1 M_0                PEFT: butterfly_oft_mat = M_j @ butterfly_oft_mat, j = 1..N-1
    x'      = x B                                                                           # (n, k)
    h       = x' W0^T,   y = s * h + b           (s = boft_s broadcast over rows; the bias is not scaled)

R is orthogonal for any skew S (to rounding), so each M_j and B are. This is OFT's "exact" Cayley transform
(refpeft.methods.oft.oft_rotation) on the skew part of a full matrix, where OFT builds S from b (b - 1) / 2
numbers. PEFT has no Neumann variant for BOFT.

The permutations (PEFT's `block_butterfly_perm`, stored as P_j[c, perm_j[c]] = 1): P_0 = I; for j >= 1 the
inputs are cut into chunks of H 2^j, each chunk into 2^(j+1) halves of H / 2, and perm_j lists, within each
chunk, the even-numbered halves then the odd-numbered ones. So block i of factor j mixes the halves that
lie H 2^(j-1) apart: the butterfly. With N = 1, BOFT is OFT (one block-diagonal factor). As row-vector maps,
x P = x[:, perm^{-1}] and x P^T = x[:, perm], so

    x M_j   = ((x[:, perm_j^{-1}]) diag(R_j))[:, perm_j]       x M_j^T = ((x[:, perm_j^{-1}]) diag(R_j)^T)[:, perm_j]

and no k x k matrix is formed (PEFT forms B and multiplies x by it; the difference is rounding).

Merge (PEFT's `merge`): W' = diag(s) W0 B^T, so x W'^T = s * (x B W0^T), the unmerged forward without b.
Unmerge (PEFT's `unmerge`): W0 = diag(1 / s) W' B, using B^T as B's inverse (B orthogonal to rounding) and
multiplying by the reciprocal 1 / s, as PEFT does (`orig_weight * (1 / boft_s)`).

Backward, for dy (n, d): with u_j the permuted input of factor j's blocks and g the gradient flowing back,

    ds   = sum over rows of dy * h                                                      # (d, 1)
    g    = (s * dy) W0                                     dL/dx'                      # (n, k)
    for j = 0 .. N-1 (the reverse of the forward's N-1 .. 0):
        g_w   = g[:, perm_j^{-1}]                          dL/d(u_j diag(R_j)), as x M_j ends with [:, perm_j]
        G_j,i = u_{j,i}^T g_{w,i}                          dL/dR_{j,i}, i-th H-wide slices # (H, H)
        g     = ((g_w) diag(R_j)^T)[:, perm_j]             dL/d(input of factor j)
    dx   = g

(so dx = dL/dx' B^T), then through the Cayley transform (OFT's exact backward, refpeft.methods.oft)

    dS   = -(I + R)^T G (I - S)^{-1},     dA = (dS - dS^T) / 2      (the symmetric part of A gets none)

`boft_dropout` (PEFT's MultiplicativeDropoutLayer: in training, blocks of one random factor replaced by I)
is not modelled: refpeft's BOFT is PEFT's with boft_dropout = 0 or in eval mode. PEFT's Linear refuses
fan_in_fan_out (BOFT has no Conv1D layer); refpeft keeps the layout option as its other methods do.
Init (PEFT's init_weights=True): A = 0, s = 1, so B = I and the layer starts as the base layer.

PEFT's butterfly factors need its CUDA extension (fbd_cuda): where it does not build (any CPU-only
install), PEFT sets boft_n_butterfly_factor to 1 with a warning and the layer is plain OFT, so a file saved
there has (1, D, H, H) tensors whatever the config says, and a file with N > 1 does not load there.
refpeft reads N, D and H from the tensor's shape and computes every N on any backend.

Error bounds: like OFT's exact variant (refpeft.methods.oft), the Cayley solve has no a-priori bound here;
refpeft compares BOFT with PEFT in float64 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from refpeft.adapter import ModuleAdapter
from refpeft.backend import check_float_array, dtype_name, namespace
from refpeft.errors import ConfigError, ShapeError
from refpeft.init import as_parameter
from refpeft.methods.linear import base_forward, base_input_grad, check_linear_inputs, flatten_rows, linear_shape
from refpeft.methods.oft import _blocks, _unblocks, oft_rotation, oft_rotation_backward
from refpeft.methods.spec import Method


def boft_shape(k: int, *, block_size: int = 4, block_num: int = 0, n_butterfly_factor: int = 1) -> tuple[int, int, int]:
    """(N, D, H) of boft_R for a layer of k inputs, with PEFT's checks (BOFTConfig and update_layer) as ConfigErrors."""
    for name, value in (("boft_block_size", block_size), ("boft_block_num", block_num),
                        ("boft_n_butterfly_factor", n_butterfly_factor)):
        if type(value) is not int or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    if (block_size == 0) == (block_num == 0):
        raise ConfigError(f"give exactly one of boft_block_size ({block_size}) and boft_block_num ({block_num}): "
                          "their product is the layer's in_features")
    if n_butterfly_factor < 1:
        raise ConfigError(f"boft_n_butterfly_factor must be a positive integer, got {n_butterfly_factor}")
    given, name = (block_size, "boft_block_size") if block_size else (block_num, "boft_block_num")
    if k % given != 0:
        raise ConfigError(f"{name} = {given} does not divide the layer's in_features k = {k}")
    H = block_size or k // block_num
    D = k // H
    if n_butterfly_factor > 1:
        halvings = 2 ** (n_butterfly_factor - 1)
        if D % halvings != 0:
            raise ConfigError(f"boft_n_butterfly_factor = {n_butterfly_factor} is too large for {D} blocks of "
                              f"{H} (k = {k}): the block number must be a multiple of 2^(factor - 1) = {halvings}")
        if H % 2 != 0:
            raise ConfigError(f"with boft_n_butterfly_factor = {n_butterfly_factor} > 1 the block size must be even, "
                              f"got {H} (k = {k})")
    return n_butterfly_factor, D, H


def boft_layout(k: int, boft_R: Any) -> tuple[int, int, int]:
    """(N, D, H) of a boft_R tensor for a layer of k inputs; ShapeError when it cannot be PEFT's."""
    if len(boft_R.shape) != 4 or boft_R.shape[2] != boft_R.shape[3]:
        raise ShapeError(f"boft_R must be 4-D (factors, blocks, block size, block size), got {tuple(boft_R.shape)}")
    N, D, H, _ = (int(n) for n in boft_R.shape)
    try:
        layout = boft_shape(k, block_size=H, n_butterfly_factor=N)
    except ConfigError as exc:
        raise ShapeError(f"boft_R has shape {tuple(boft_R.shape)}: {exc}") from None
    if layout[1] != D:
        raise ShapeError(f"boft_R has shape {tuple(boft_R.shape)}: {D} blocks of {H} cover {D * H} inputs, "
                         f"the layer has k = {k}")
    return layout


def boft_permutation(k: int, D: int, H: int, j: int, N: int) -> np.ndarray:
    """perm_j (k,): P_j[c, perm_j[c]] = 1 (module docstring), PEFT's block_butterfly_perm(k, D / 2^j, H / 2, N - 1)."""
    if N == 1:
        return np.arange(k)
    halves = 2 ** (j + 1)                                        # H / 2-wide pieces per chunk of H 2^j
    order = np.concatenate([np.arange(0, halves, 2), np.arange(1, halves, 2)])
    within = (order[:, None] * (H // 2) + np.arange(H // 2)).reshape(-1)  # (H 2^j,)
    return (np.arange(0, k, H * 2 ** j)[:, None] + within).reshape(-1)


def boft_init(k: int, d: int, *, block_size: int = 4, block_num: int = 0, n_butterfly_factor: int = 1,
              dtype: str = "float64", xp: Any = None) -> tuple[Any, Any]:
    """(boft_R, boft_s) = (0 (N, D, H, H), 1 (d, 1)): PEFT's init_weights=True (B = I, s = 1)."""
    N, D, H = boft_shape(k, block_size=block_size, block_num=block_num, n_butterfly_factor=n_butterfly_factor)
    return (as_parameter(np.zeros((N, D, H, H)), dtype=dtype, xp=xp), as_parameter(np.ones((d, 1)), dtype=dtype, xp=xp))


def boft_rotations(boft_R: Any) -> tuple[Any, Any]:
    """(S, R), both (N, D, H, H): the skew parts of boft_R and their (exact) Cayley transforms."""
    xp = namespace(boft_R)
    S = 0.5 * (boft_R - xp.matrix_transpose(boft_R))
    N, D, H, _ = boft_R.shape
    R = oft_rotation(xp.reshape(S, (N * D, H, H)), cayley="exact")
    return S, xp.reshape(R, (N, D, H, H))


def _permutations(k: int, N: int, D: int, H: int, *, xp: Any) -> list[tuple[Any, Any]]:
    """[(perm_j, perm_j^{-1})] for j < N, as index arrays of namespace xp."""
    pairs = []
    for j in range(N):
        perm = boft_permutation(k, D, H, j, N)
        pairs.append((xp.asarray(perm, dtype=xp.int64), xp.asarray(np.argsort(perm), dtype=xp.int64)))
    return pairs


def _butterfly(X: Any, R: Any, *, transpose: bool, xp: Any) -> tuple[Any, list[Any]]:
    """X B (transpose=False: factors N-1 .. 0) or X B^T (factors 0 .. N-1 with R^T), X (n, k); also the
    permuted, blocked inputs u_j (D, n, H) of each factor, by j."""
    N, D, H, _ = R.shape
    inputs: list[Any] = [None] * N
    perms = _permutations(X.shape[1], N, D, H, xp=xp)
    for j in (range(N) if transpose else reversed(range(N))):
        perm, inverse = perms[j]
        inputs[j] = _blocks(xp.take(X, inverse, axis=1), D, xp=xp)                          # (D, n, H)  u_j
        Rj = xp.matrix_transpose(R[j, ...]) if transpose else R[j, ...]
        X = xp.take(_unblocks(xp.matmul(inputs[j], Rj), xp=xp), perm, axis=1)             # (n, k)
    return X, inputs


@dataclass(frozen=True)
class BoftCache:
    """What `boft_backward` needs: the permuted inputs of each factor, S, R, h = x B W0^T and the frozen weight."""

    x: Any                 # (..., k)
    inputs: list           # N arrays (D, n, H): u_j, factor j's blocked, permuted input
    S: Any                 # (N, D, H, H)
    R: Any                 # (N, D, H, H)
    h: Any                 # (n, d)   the base output of the rotated input, before s and b
    W0: Any
    boft_s: Any            # (d, 1)
    fan_in_fan_out: bool
    bias_trainable: bool


@dataclass(frozen=True)
class BoftGrads:
    """Gradients of the loss with respect to the input, boft_R and boft_s."""

    dx: Any           # (..., k)
    dboft_R: Any      # (N, D, H, H)
    dboft_s: Any      # (d, 1)
    dbias: Any        # (d,) or None when the bias is frozen or absent


def boft_forward(x: Any, W0: Any, boft_R: Any, boft_s: Any, *, bias: Any = None, fan_in_fan_out: bool = False,
                 bias_trainable: bool = False) -> tuple[Any, BoftCache]:
    """y = s * (x B W0^T) + b with B the butterfly product of Cayley rotations (module docstring)."""
    xp, shape = check_linear_inputs(x, W0, bias=bias, fan_in_fan_out=fan_in_fan_out, boft_R=boft_R, boft_s=boft_s)
    boft_layout(shape.k, boft_R)
    if tuple(boft_s.shape) != (shape.d, 1):
        raise ShapeError(f"boft_s must have shape (d, 1) = ({shape.d}, 1), got {tuple(boft_s.shape)}")
    if bias_trainable and bias is None:
        raise ConfigError("bias_trainable=True needs a bias")
    S, R = boft_rotations(boft_R)                                                             # (N, D, H, H)
    xr, inputs = _butterfly(flatten_rows(x, xp=xp), R, transpose=False, xp=xp)               # (n, k)  x B
    h = base_forward(xr, W0, None, fan_in_fan_out=fan_in_fan_out, xp=xp)                      # (n, d)
    y = h * xp.reshape(boft_s, (shape.d,))
    y = y if bias is None else y + bias
    cache = BoftCache(x=x, inputs=inputs, S=S, R=R, h=h, W0=W0, boft_s=boft_s, fan_in_fan_out=fan_in_fan_out,
                      bias_trainable=bias_trainable)
    return xp.reshape(y, (*x.shape[:-1], shape.d)), cache


def boft_backward(dy: Any, cache: BoftCache) -> BoftGrads:
    """dx, dboft_R, dboft_s (and dbias when trainable), back through the butterfly product and the Cayley transform."""
    xp = namespace(dy, cache.x)
    d = cache.boft_s.shape[0]
    check_float_array("dy", dy, xp=xp, shape=(*cache.x.shape[:-1], d))
    N, D, H, _ = cache.R.shape
    g2 = flatten_rows(dy, xp=xp)                                                              # (n, d)
    ds = xp.reshape(xp.sum(g2 * cache.h, axis=0), (d, 1))                                     # (d, 1)
    g = base_input_grad(g2 * xp.reshape(cache.boft_s, (d,)), cache.W0, fan_in_fan_out=cache.fan_in_fan_out, xp=xp)
    G = []                                                                                    # dL/dR_j, by j
    for j, (perm, inverse) in enumerate(_permutations(g.shape[1], N, D, H, xp=xp)):   # forward ran N-1 .. 0
        gw = _blocks(xp.take(g, inverse, axis=1), D, xp=xp)                                   # (D, n, H)
        G.append(xp.matmul(xp.matrix_transpose(cache.inputs[j]), gw))                         # (D, H, H)
        g = xp.take(_unblocks(xp.matmul(gw, xp.matrix_transpose(cache.R[j, ...])), xp=xp), perm, axis=1)
    dS = oft_rotation_backward(xp.reshape(xp.stack(G), (N * D, H, H)), xp.reshape(cache.S, (N * D, H, H)),
                               xp.reshape(cache.R, (N * D, H, H)), cayley="exact")
    dS = xp.reshape(dS, (N, D, H, H))
    dbias = xp.sum(g2, axis=0) if cache.bias_trainable else None
    return BoftGrads(dx=xp.reshape(g, cache.x.shape), dboft_R=0.5 * (dS - xp.matrix_transpose(dS)), dboft_s=ds,
                     dbias=dbias)


def boft_rotation_matrix(boft_R: Any, k: int) -> Any:
    """B (k, k), PEFT's butterfly_oft_mat (get_delta_weight's first value; forms k x k, merging does not)."""
    xp = namespace(boft_R)
    boft_layout(k, boft_R)
    return _butterfly(xp.eye(k, dtype=boft_R.dtype), boft_rotations(boft_R)[1], transpose=False, xp=xp)[0]


def _rescaled_rotation(W: Any, boft_R: Any, boft_s: Any, *, fan_in_fan_out: bool, inverse: bool) -> Any:
    """diag(s) W B^T (merge) or diag(1 / s) W B (unmerge), in W's layout."""
    xp = namespace(W, boft_R, boft_s)
    check_float_array("W", W, xp=xp)
    check_float_array("boft_R", boft_R, xp=xp)
    check_float_array("boft_s", boft_s, xp=xp)
    shape = linear_shape(W, fan_in_fan_out=fan_in_fan_out)
    boft_layout(shape.k, boft_R)
    if tuple(boft_s.shape) != (shape.d, 1):
        raise ShapeError(f"boft_s must have shape (d, 1) = ({shape.d}, 1), got {tuple(boft_s.shape)}")
    rows = xp.matrix_transpose(W) if fan_in_fan_out else W                                    # (d, k)
    rotated = _butterfly(rows, boft_rotations(boft_R)[1], transpose=not inverse, xp=xp)[0]    # W B^T or W B
    out = rotated * (1.0 / boft_s) if inverse else rotated * boft_s                          # PEFT: * (1 / s)
    return xp.matrix_transpose(out) if fan_in_fan_out else out


def boft_merge(W0: Any, boft_R: Any, boft_s: Any, *, fan_in_fan_out: bool = False) -> Any:
    """diag(s) W0 B^T in W0's layout (PEFT: W'^T = B W0^T, then rows times s); the bias is unchanged."""
    return _rescaled_rotation(W0, boft_R, boft_s, fan_in_fan_out=fan_in_fan_out, inverse=False)


def boft_unmerge(W: Any, boft_R: Any, boft_s: Any, *, fan_in_fan_out: bool = False) -> Any:
    """diag(1 / s) W B, as PEFT unmerges: B^T taken as B's inverse, and the reciprocal of s."""
    return _rescaled_rotation(W, boft_R, boft_s, fan_in_fan_out=fan_in_fan_out, inverse=True)


def boft_delta_weight(W0: Any, boft_R: Any, boft_s: Any, *, fan_in_fan_out: bool = False) -> Any:
    """boft_merge(W0) - W0: the additive change, for callers that sum deltas."""
    return boft_merge(W0, boft_R, boft_s, fan_in_fan_out=fan_in_fan_out) - W0


def boft_parameter_count(k: int, d: int, *, block_size: int = 4, block_num: int = 0,
                         n_butterfly_factor: int = 1) -> int:
    """Trainable entries as PEFT counts them: N D H^2 + d = N k H + d (the skew parts hold N k (H - 1) / 2)."""
    N, D, H = boft_shape(k, block_size=block_size, block_num=block_num, n_butterfly_factor=n_butterfly_factor)
    return N * D * H * H + d


# --- the method table's row (refpeft.methods.spec) ----------------------------------------------------------


def _forward(x: Any, W0: Any, m: Any, *, shared: Any = None, bias: Any = None, dropout_mask: Any = None,
             bias_trainable: bool = False) -> tuple[Any, BoftCache]:
    if dropout_mask is not None:
        raise ConfigError("BOFT has no input dropout in PEFT (boft_dropout is not modelled); pass dropout_mask=None")
    return boft_forward(x, W0, m.boft_R, m.boft_s, bias=bias, fan_in_fan_out=m.fan_in_fan_out,
                        bias_trainable=bias_trainable)


def _branch(W0: Any, m: Any, *, shared: Any = None) -> tuple[Any, ...]:
    raise ConfigError("BOFT rotates the input and rescales the output: it has no additive branch to export "
                      "unmerged; export it merged")


def _init_modules(W0s: Mapping[str, Any], *, ranks: Mapping[str, int], alphas: Mapping[str, float], seed: int = 0,
                  generator: str = "numpy") -> tuple[dict, dict, dict]:
    """PEFT's init (boft_R = 0, boft_s = 1), block size ranks[path], one butterfly factor, on each layer W0 (d, k)."""
    modules = {}
    for path, W0 in W0s.items():
        xp = namespace(W0)
        shape = linear_shape(W0, fan_in_fan_out=False)
        boft_R, boft_s = boft_init(shape.k, shape.d, block_size=ranks[path], dtype=dtype_name(W0.dtype, xp=xp), xp=xp)
        modules[path] = ModuleAdapter("boft", {"boft_R": boft_R, "boft_s": boft_s})
    return modules, {}, {}


def _config_options(modules: Mapping[str, Any], config: Mapping[str, Any]) -> dict:
    """PEFT's adapter-wide boft_block_size (or boft_block_num) and boft_n_butterfly_factor for these modules."""
    shapes = {tuple(int(n) for n in m.boft_R.shape[:3]) for m in modules.values()}
    factors, nums, sizes = ({s[i] for s in shapes} for i in range(3))
    if len(factors) != 1 or (len(sizes) != 1 and len(nums) != 1):
        raise ConfigError("PEFT stores one boft_n_butterfly_factor and one boft_block_size (or boft_block_num) per "
                          f"adapter, but the modules have (factors, blocks, block size) {sorted(shapes)}")
    by_size = len(sizes) == 1
    return {"boft_block_size": sizes.pop() if by_size else 0, "boft_block_num": 0 if by_size else nums.pop(),
            "boft_n_butterfly_factor": factors.pop(), "boft_dropout": 0.0, "init_weights": True}


# PEFT's BOFT has no r; the row's rank is the block size H, which init_modules takes from `ranks`.
BOFT = Method(
    name="boft", summary="butterfly product of block-diagonal Cayley rotations of the input, output scaling (BOFT)",
    peft_type="BOFT", peft_flags={}, tensors={"boft_R": "boft_R", "boft_s": "boft_s"},
    trainable=("boft_R", "boft_s"), per_output=("boft_s",), scaled=False, mergeable=True, onnx_branch="merged-only",
    rank=lambda m: int(m.boft_R.shape[2]), out_features=lambda m: int(m.boft_s.shape[0]),
    in_features=lambda m: int(m.boft_R.shape[1] * m.boft_R.shape[2]),
    forward=_forward, backward=boft_backward,
    delta_weight=lambda W0, m, *, shared=None: boft_delta_weight(W0, m.boft_R, m.boft_s,
                                                                 fan_in_fan_out=m.fan_in_fan_out),
    merge=lambda W0, m, *, shared=None: boft_merge(W0, m.boft_R, m.boft_s, fan_in_fan_out=m.fan_in_fan_out),
    unmerge=lambda W, m, *, shared=None: boft_unmerge(W, m.boft_R, m.boft_s, fan_in_fan_out=m.fan_in_fan_out),
    parameter_count=lambda k, d, m: int(np.prod(m.boft_R.shape)) + int(m.boft_s.shape[0]),
    branch_values=_branch, init_modules=_init_modules, config_options=_config_options)
