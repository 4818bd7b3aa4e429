"""LoRA initialisations that rewrite the base weight: PiSSA, OLoRA, LoftQ, and the rank-2r conversion back.

Each takes the frozen weight W (d, k) and the rank r, and returns the initial factors A (r, k),
B (d, r) with the base weight that replaces W. The first two keep the model exactly as it was:

    W = W_res + s B A                                        (to rounding)

    PiSSA  (Meng et al. 2024)   W = U S V^T (SVD, singular values descending)
                                A = sqrt(S_r / s) V_r^T,   B = U_r sqrt(S_r / s)
                                so s B A = U_r S_r V_r^T, the best rank-r approximation, and
                                W_res = W - U_r S_r V_r^T holds the minor singular directions.
                                PEFT divides S_r by s before the square roots, as here.
    pissa_niter_K               U_r, S_r, V_r from randomised subspace iteration instead (Halko et al.
                                2009, Alg. 4.4 with q = r and no oversampling, as torch.svd_lowrank):
                                Y = W Omega, Omega ~ N(0, 1) (k, r); then K times Q = qr(W^T Q),
                                Q = qr(W Q) (W^T in place of W when d < k, as torch does). Then
                                s B A = Q Q^T W, a projection. Omega comes from NumPy's generator with
                                an explicit seed; PEFT's comes from torch's global generator, so the
                                factors are not torch's bit for bit. Both converge to exact PiSSA:
                                with rho = sigma_{r+1} / sigma_r and theta the largest principal
                                angle between range(Q) and U_r (theta_0: between range(Omega) and V_r),
                                  Q Q^T W - U_r S_r V_r^T = -(I - QQ^T) U_r S_r V_r^T + QQ^T U_o S_o V_o^T
                                  ||.||_2 <= (sigma_1 + sigma_{r+1}) sin(theta_K)
                                          <= (sigma_1 + sigma_{r+1}) rho^(2K+1) tan(theta_0)
                                (U_o S_o V_o^T: the other singular triples; subspace iteration: each
                                W or W^T step shrinks tan(theta) by rho).
    OLoRA  (Buyukakyuz 2024)    W = Q R (thin QR, Householder), A = R_r (first r rows), B = Q_r
                                (first r columns), W_res = W - s Q_r R_r. Q_r R_r = Q_r Q_r^T W, the
                                projection of W on the span of its first r columns: sign-free, whatever
                                signs the QR picks. Not divided by s (PEFT does not).

    LoftQ  (Li et al. 2023)     alternate an NF4 quantisation of what the adapter does not hold and a
                                rank-r SVD of what the quantisation misses, num_iter times:
                                  res_0 = W
                                  for t = 1..T:  Q_t = quant(res_{t-1});  L R = svd_r(W - deq(Q_t))
                                                 res_t = W - L R      (not formed after the last)
                                A = R = sqrt(S_r) V_r^T, B = L = U_r sqrt(S_r), W_res = deq(Q_T).
                                PEFT's loftq_init does not divide by s: W ~ deq(Q_T) + B A, so the
                                initial model W_res + s B A absorbs the quantisation error only when
                                s = 1 (alpha = r, or alpha = sqrt(r) with rsLoRA). refpeft keeps
                                PEFT's factors and says so; `initial_error` measures the whole error.

Numbers: refpeft computes in W's dtype (float64 stays float64). PEFT computes PiSSA and OLoRA in
float32 whatever the weight's dtype and refuses float64 weights; LoftQ's quantiser sees float32, as
bitsandbytes does: the residual is cast to float32 before quantisation and the dequantised weight
cast back. NF4 here is refpeft.quant's (blocksize 64, no double quantisation: PEFT's
`compress_statistics=False`), with `rounding=` naming the bitsandbytes implementation reproduced.
Only 4-bit NF4 is offered (PEFT's num_bits=8 int8 path is not).

The rank-2r conversion (PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)`):
a trained adapter A, B on W_res, initialised at A0, B0, is on the original W the plain LoRA

    delta = s B A - s B0 A0 = s' [B | -B0] [A ; A0],   r' = 2r,   alpha' = 2 alpha (s' = s)
                                                        (rsLoRA: alpha' = sqrt(2) alpha)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.backend import check_float_array, dtype_name, from_numpy, namespace
from refpeft.errors import ConfigError, RankError, ShapeError
from refpeft.init import normal
from refpeft.methods.linear import LinearShape, check_rank
from refpeft.methods.lora import LORA, lora_delta_weight
from refpeft.quant.state import dequantize_4bit, quantize_4bit

# PEFT's init_lora_weights values handled here; "pissa_niter_K" for any K >= 0 as well.
BASE_INITS = ("pissa", "olora", "loftq")
LOFTQ_BLOCKSIZE = 64       # bitsandbytes' Params4bit default, which PEFT's loftq_init uses


@dataclass(frozen=True)
class BaseRewrite:
    """An initialisation that changes the base: the factors and the weight that replaces W."""

    A: Any          # (r, k)
    B: Any          # (d, r)
    base: Any       # (d, k), or (k, d) with fan_in_fan_out: W_res (PiSSA, OLoRA) or deq(Q_T) (LoftQ)
    quant_state: Any = None   # LoftQ: the last iteration's QuantState4bit of the base


def pissa_init(W: Any, r: int, *, scaling: float, niter: int | None = None, seed: int = 0,
               fan_in_fan_out: bool = False) -> BaseRewrite:
    """PiSSA: A = sqrt(S_r/s) V_r^T, B = U_r sqrt(S_r/s), base W - s B A (module docstring).

    niter=None is the exact SVD (PEFT's "pissa"); an integer K is "pissa_niter_K", the randomised
    subspace iteration with Omega drawn from NumPy's generator seeded by `seed`.
    """
    xp, Wt = _weight(W, r, fan_in_fan_out=fan_in_fan_out)
    _check_scaling(scaling)
    if niter is None:
        U, S, Vh = xp.linalg.svd(Wt, full_matrices=False)
        Ur, Sr, Vhr = U[:, :r], S[:r], Vh[:r, :]
    else:
        Ur, Sr, Vhr = svd_lowrank(Wt, r, niter=niter, seed=seed)
    root = xp.sqrt(Sr / scaling)                               # (r,)
    A = root[:, None] * Vhr                                    # (r, k)
    B = Ur * root[None, :]                                     # (d, r)
    return BaseRewrite(A=A, B=B, base=_residual(W, A, B, scaling, fan_in_fan_out))


def svd_lowrank(W: Any, r: int, *, niter: int, seed: int) -> tuple[Any, Any, Any]:
    """U (d, r), S (r,), V^T (r, k) of Q Q^T W by torch.svd_lowrank's algorithm (q = r), seeded Omega."""
    xp = namespace(W)
    if type(niter) is not int or niter < 0:
        raise ConfigError(f"niter must be a non-negative integer, got {niter!r}")
    wide = W.shape[0] < W.shape[1]
    M = xp.permute_dims(W, (1, 0)) if wide else W              # tall (m, n), m >= n
    Mt = xp.permute_dims(M, (1, 0))
    omega = xp.astype(from_numpy(normal((M.shape[1], r), 1.0, seed=seed), xp=xp, like=W), W.dtype)   # (n, r)
    Q = _orthonormal(M @ omega, xp=xp)                         # (m, r)
    for _ in range(niter):
        Q = _orthonormal(M @ _orthonormal(Mt @ Q, xp=xp), xp=xp)
    U, S, Vh = xp.linalg.svd(xp.permute_dims(Q, (1, 0)) @ M, full_matrices=False)   # (r, r), (r,), (r, n)
    U = Q @ U                                                  # (m, r)
    if wide:                                                   # M = W^T = U S Vh  ->  W = Vh^T S U^T
        return xp.permute_dims(Vh, (1, 0)), S, xp.permute_dims(U, (1, 0))
    return U, S, Vh


def olora_init(W: Any, r: int, *, scaling: float, fan_in_fan_out: bool = False) -> BaseRewrite:
    """OLoRA: W = Q R, A = R_r, B = Q_r, base W - s B A (module docstring)."""
    xp, Wt = _weight(W, r, fan_in_fan_out=fan_in_fan_out)
    _check_scaling(scaling)
    Q, R = xp.linalg.qr(Wt)                                    # (d, min(d, k)), (min(d, k), k)
    A, B = R[:r, :], Q[:, :r]
    return BaseRewrite(A=A, B=B, base=_residual(W, A, B, scaling, fan_in_fan_out))


def loftq_init(W: Any, r: int, *, num_iter: int = 1, rounding: str = "bnb-cuda",
               fan_in_fan_out: bool = False) -> BaseRewrite:
    """LoftQ with NF4 (module docstring): A = R, B = L from the last residual, base = deq(Q_T).

    As PEFT's loftq_init the factors ignore the scaling s: the initial model's error is
    `initial_error(W, result, scaling=s)`, smallest for s = 1.
    """
    xp, Wt = _weight(W, r, fan_in_fan_out=fan_in_fan_out)
    if type(num_iter) is not int or num_iter < 1:
        raise ConfigError(f"loftq num_iter must be a positive integer, got {num_iter!r}")
    dtype = W.dtype
    residual = Wt
    for t in range(num_iter):
        state = quantize_4bit(xp.astype(residual, xp.float32), quant_type="nf4", blocksize=LOFTQ_BLOCKSIZE,
                              double_quant=False, rounding=rounding)
        dequantized = xp.astype(dequantize_4bit(state), dtype)            # (d, k)
        U, S, Vh = xp.linalg.svd(Wt - dequantized, full_matrices=False)
        root = xp.sqrt(S[:r])
        B, A = U[:, :r] * root[None, :], root[:, None] * Vh[:r, :]        # L (d, r), R (r, k)
        if t + 1 < num_iter:
            residual = Wt - B @ A
    base = xp.permute_dims(dequantized, (1, 0)) if fan_in_fan_out else dequantized
    return BaseRewrite(A=A, B=B, base=base, quant_state=state)


def initial_error(W: Any, init: BaseRewrite, *, scaling: float, fan_in_fan_out: bool = False) -> float:
    """||W - (base + s B A)||_F: how far the initialised model is from the original weight."""
    xp = namespace(W)
    merged = init.base + lora_delta_weight(init.A, init.B, scaling=scaling, fan_in_fan_out=fan_in_fan_out)
    return float(xp.linalg.vector_norm(W - merged))


def init_from_base(W: Any, r: int, *, init: str, scaling: float, seed: int = 0, loftq_iter: int = 1,
                   rounding: str = "bnb-cuda", fan_in_fan_out: bool = False) -> BaseRewrite:
    """Dispatch PEFT's init_lora_weights name: "pissa", "pissa_niter_K", "olora" or "loftq"."""
    niter = parse_pissa_niter(init)
    if init == "pissa" or niter is not None:
        return pissa_init(W, r, scaling=scaling, niter=niter, seed=seed, fan_in_fan_out=fan_in_fan_out)
    if init == "olora":
        return olora_init(W, r, scaling=scaling, fan_in_fan_out=fan_in_fan_out)
    if init == "loftq":
        return loftq_init(W, r, num_iter=loftq_iter, rounding=rounding, fan_in_fan_out=fan_in_fan_out)
    raise ConfigError(f"unknown base-rewriting init {init!r}; choose one of {', '.join(BASE_INITS)} "
                      "or pissa_niter_K")


def parse_pissa_niter(init: str) -> int | None:
    """K of "pissa_niter_K"; None for any other name. A malformed K is refused, as PEFT does."""
    if not isinstance(init, str) or not init.startswith("pissa_niter_"):
        return None
    match = re.fullmatch(r"pissa_niter_(\d+)", init)
    if match is None:
        raise ConfigError(f"init_lora_weights should be 'pissa' or 'pissa_niter_K' (K >= 0), got {init!r}")
    return int(match.group(1))


def to_plain_lora(A: Any, B: Any, A0: Any, B0: Any, *, alpha: float, rslora: bool = False) -> tuple[Any, Any, float]:
    """(A', B', alpha') of the rank-2r LoRA on the original base: s' B' A' = s B A - s B0 A0."""
    xp = namespace(A, B, A0, B0)
    if A.shape != A0.shape or B.shape != B0.shape:
        raise ShapeError(f"trained factors A {tuple(A.shape)}, B {tuple(B.shape)} differ from the initial "
                         f"A0 {tuple(A0.shape)}, B0 {tuple(B0.shape)}")
    # r' = 2r; s' = alpha' / r' = alpha / r needs alpha' = 2 alpha, alpha' / sqrt(2r) needs sqrt(2) alpha.
    return (xp.concat([A, A0], axis=0), xp.concat([B, -B0], axis=1),
            alpha * math.sqrt(2.0) if rslora else 2.0 * alpha)


def convert_to_plain_lora(trained: Adapter, initial: Adapter) -> Adapter:
    """A PiSSA/OLoRA/LoftQ-initialised adapter, trained, as a plain rank-2r LoRA on the original base.

    `initial` holds the factors as initialised (A0, B0) for the same modules. DoRA and other
    methods are refused: only LoRA's update is a difference of two products.
    """
    if set(trained.modules) != set(initial.modules):
        raise ConfigError(f"the initial adapter's modules {sorted(initial.modules)} differ from the trained "
                          f"adapter's {sorted(trained.modules)}")
    modules = {}
    for path, module in trained.modules.items():
        start = initial.modules[path]
        if module.spec is not LORA or start.spec is not LORA:
            raise ConfigError(f"{path}: only LoRA converts to a plain LoRA, got {module.method}/{start.method}")
        if (module.alpha, module.rslora) != (start.alpha, start.rslora):
            raise ConfigError(f"{path}: alpha/rslora changed between the initial and the trained adapter")
        A, B, alpha = to_plain_lora(module.A, module.B, start.A, start.B, alpha=module.alpha, rslora=module.rslora)
        modules[path] = ModuleAdapter("lora", {**module.tensors, "A": A, "B": B}, alpha=alpha,
                                      rslora=module.rslora, fan_in_fan_out=module.fan_in_fan_out)
    config = {k: v for k, v in trained.config.items() if k != "init_lora_weights"}
    return replace(trained, modules=modules, config=config)


def _weight(W: Any, r: int, *, fan_in_fan_out: bool) -> tuple[Any, Any]:
    """The namespace and W in (d, k) layout, checked: a float matrix with r <= min(d, k)."""
    xp = namespace(W)
    check_float_array("W", W, xp=xp)
    if W.ndim != 2:
        raise ShapeError(f"W must be a matrix, got shape {tuple(W.shape)}")
    Wt = xp.permute_dims(W, (1, 0)) if fan_in_fan_out else W
    if dtype_name(W.dtype, xp=xp) not in ("float32", "float64"):
        raise ConfigError(f"base-rewriting inits factorise in float32 or float64, got {dtype_name(W.dtype, xp=xp)}")
    check_rank(r, LinearShape(k=Wt.shape[1], d=Wt.shape[0]))
    if r > min(Wt.shape):       # PEFT allows it for plain LoRA, but a factorisation has only min(d, k) terms
        raise RankError(f"rank r = {r} exceeds min(d, k) = {min(Wt.shape)} of the weight {tuple(Wt.shape)}")
    return xp, Wt


def _residual(W: Any, A: Any, B: Any, scaling: float, fan_in_fan_out: bool) -> Any:
    return W - lora_delta_weight(A, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out)


def _check_scaling(scaling: float) -> None:
    if not (math.isfinite(scaling) and scaling > 0):
        raise ConfigError(f"scaling must be a positive finite number, got {scaling!r}")


def _orthonormal(X: Any, *, xp: Any) -> Any:
    return xp.linalg.qr(X)[0]
