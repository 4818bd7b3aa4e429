"""Combining LoRA adapters with weights: HF PEFT's `add_weighted_adapter`, exact and compressed.

For adapters i = 1..n on one layer, Delta_i = s_i B_i A_i, and weights w_i, the weighted sum is a
product of stacked factors (letters as in refpeft.methods.linear; R = sum_i r_i):

    Delta = sum_i w_i s_i B_i A_i = B_cat A_cat
    B_cat = [B_1 | B_2 | ... | B_n]                      (d, R)
    A_cat = [w_1 s_1 A_1 ; w_2 s_2 A_2 ; ... ]           (R, k)

Combinations, with the names and numbers of PEFT 0.21 (`tuners/lora/model.py`, `utils/merge_utils.py`):

  cat     A = A_cat, B = B_cat: exactly Delta, at rank R.                 Recommended: exact.
  svd     the best rank-r approximation of Delta (Eckart-Young), on the factors: QR of B_cat and
          A_cat^T, SVD of the small core (refpeft.spectrum.factored_svd); B = U_r S_r, A = Vh_r.
          PEFT forms the d x k Delta and takes its full SVD: the same result up to the signs of
          singular vectors, at O(d k) memory and O(d k min(d, k)) time. Recommended to compress.
  linear  (equal ranks) A and B are summed separately with c_i = w_i s_i:
              A = sum_i sign(c_i) sqrt|c_i| A_i,    B = sum_i sqrt|c_i| B_i
              B A = Delta + sum_{i != j} sqrt|c_i| sqrt|c_j| sign(c_j) B_i A_j
          The cross terms make it exact only for one adapter (PEFT issue 3004); it is kept under
          PEFT's name for compatibility, and the report says what the cross terms cost.
  ties, dare_linear, dare_ties, magnitude_prune
          as linear, with the task-vector merge of that name (below) on the stacks {A_i} and {B_i}.
  ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
          the task-vector merge on the formed deltas {s_i B_i A_i} (element-wise pruning needs the
          d x k matrices), then the truncated SVD of the dense result. `svd` is task arithmetic here.

Task-vector merges of tensors T_i with weights c_i (TIES: Yadav et al. 2023; DARE: Yu et al. 2024):

  magnitude prune   keep the int(density * size) entries of each T_i largest in |.|, zero the rest
  random prune      keep each entry with probability `density` and divide the kept ones by density
  task arithmetic   sum_i c_i T_i
  sign election     per entry, sigma = +1 if sum_i T_i >= 0 else -1 ("total"), or the same with
                    sum_i sign(T_i) ("frequency"); pruned tensors, before weighting
  disjoint merge    sum_i c_i T_i [sign T_i == sigma] / max(1, #{i : sign T_i == sigma})

  ties = magnitude prune + sign election + disjoint merge      magnitude_prune = magnitude prune + sum
  dare_ties = random prune + sign election + disjoint merge    dare_linear = random prune + sum
  A density >= 1 prunes nothing (and does not rescale), as in PEFT.

The result has rank r and alpha = r, so its scaling is 1, as PEFT's new adapter (r = lora_alpha =
new rank). Every layer gets a `CompressionReport` against the exact weighted sum Delta: the
measured error ||Delta - B A||_F (on factors, refpeft.spectrum.product_norm), the Eckart-Young
optimum for the result's rank, and the energy any adapter of that rank must discard.

Numeric choices, and where refpeft departs from PEFT on purpose:
- Weight rounding: PEFT keeps the weights of every combination but `cat` in `torch.tensor(list)`,
  i.e. torch's default float32, so w_i (svd family) or sqrt|w_i s_i| (the others) is rounded to
  float32 before use. weight_dtype="float32" reproduces it; the default "float64" uses the
  weights as given. `cat` multiplies by the Python floats in both, as (A_i * w_i) * s_i.
- DARE's random drop: PEFT calls torch.bernoulli on torch's global generator, which cannot be
  reproduced outside torch. refpeft needs an explicit seed: each layer draws from its own
  numpy.random.default_rng(SeedSequence([seed, crc32(module path)])) (`dare_generator`), keep mask
  U[0, 1) < density, tensors in PEFT's order (A_1..A_n then B_1..B_n; deltas 1..n for *_svd).
- Magnitude-pruning ties are broken by the lower flat index (a stable sort); torch.topk leaves
  the order of equal magnitudes unspecified.
- PEFT copies use_rslora from the first adapter, so with rsLoRA its fused adapter is scaled by
  sqrt(r) instead of 1 (issues 3449, 3761); refpeft's result has rslora=False and is exact.
- PEFT silently switches to `linear` when given one adapter; refpeft does what is asked, so `svd`
  on one adapter compresses it.
- A target rank above the number of singular values available (min(d, k, R)) is clipped to it:
  PEFT pads with zero singular values, which only adds parameters.
- svd_clamp (PEFT's `clamp`): the q-quantile (linear interpolation, torch.quantile's) of the
  entries of B and A, computed in float64, bounds both. It depends on the singular vectors' signs,
  which LAPACK implementations choose differently, so it is not comparable bit for bit.
- Sums over adapters run in adapter order in the adapters' dtype (PEFT promotes float16/bfloat16
  factors to float32 through its float32 weights).
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Sequence

import numpy as np

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.backend import from_numpy, namespace, same_dtype
from refpeft.errors import ConfigError, NonFiniteError, RankError
from refpeft.methods.lora import LORA, lora_delta_weight
from refpeft.spectrum import (
    CompressionReport,
    ThinSVD,
    choose_rank,
    compression_report,
    factored_svd,
    product_norm,
    thin_svd,
)

# combination -> the task-vector merge it applies
FACTOR_MERGES = {"linear": "task_arithmetic", "ties": "ties", "dare_linear": "dare_linear",
                 "dare_ties": "dare_ties", "magnitude_prune": "magnitude_prune"}
DENSE_MERGES = {"ties_svd": "ties", "dare_linear_svd": "dare_linear", "dare_ties_svd": "dare_ties",
                "magnitude_prune_svd": "magnitude_prune"}
COMBINATIONS = ("cat", "svd", *FACTOR_MERGES, *DENSE_MERGES)
TASK_MERGES = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")
WEIGHT_DTYPES = ("float64", "float32")


def combine_adapters(adapters: Sequence[Adapter], weights: Sequence[float], *, combination: str = "cat",
                     rank: int | None = None, energy: float | None = None, density: float | None = None,
                     majority_sign_method: str = "total", seed: int | None = None, clamp: float | None = None,
                     weight_dtype: str = "float64") -> tuple[Adapter, dict[str, CompressionReport]]:
    """The weighted combination of whole adapters, layer by layer, and each layer's report.

    A layer present in only some adapters combines those (PEFT skips the others). `seed` drives
    DARE's drop (required for dare_*); each layer draws from `dare_generator(seed, path)`.
    See `combine_modules` for the other options and the module doc for the math.
    """
    if len(adapters) != len(weights):
        raise ConfigError(f"got {len(adapters)} adapters but {len(weights)} weights")
    if not adapters:
        raise ConfigError("no adapters to combine")
    for i, adapter in enumerate(adapters):
        if adapter.base_biases:
            raise ConfigError(f"adapter {i} trains base biases ({', '.join(sorted(adapter.base_biases))}); "
                              "PEFT's add_weighted_adapter does not combine them and neither does refpeft")
        if adapter.saved_modules:
            raise ConfigError(f"adapter {i} saves whole modules ({', '.join(adapter.saved_module_paths)}, PEFT's "
                              "modules_to_save); refpeft does not combine them")
        if adapter.token_values is not None:
            raise ConfigError(f"adapter {i} trains embedding rows (trainable tokens); refpeft does not combine them")
    paths = list(dict.fromkeys(path for adapter in adapters for path in adapter.modules))
    modules, reports = {}, {}
    for path in paths:
        present = [(a.modules[path], w) for a, w in zip(adapters, weights) if path in a.modules]
        rng = None if seed is None else dare_generator(seed, path)
        modules[path], reports[path] = combine_modules(
            [m for m, _ in present], [w for _, w in present], combination=combination, rank=rank,
            energy=energy, density=density, majority_sign_method=majority_sign_method, rng=rng,
            clamp=clamp, weight_dtype=weight_dtype, path=path)
    config = dict(adapters[0].config)
    return Adapter(modules=modules, config=config), reports


def combine_modules(modules: Sequence[ModuleAdapter], weights: Sequence[float], *, combination: str = "cat",
                    rank: int | None = None, energy: float | None = None, density: float | None = None,
                    majority_sign_method: str = "total", rng: np.random.Generator | None = None,
                    clamp: float | None = None, weight_dtype: str = "float64",
                    path: str = "layer") -> tuple[ModuleAdapter, CompressionReport]:
    """The weighted combination of one layer's LoRA adapters, and what it cost (see the module doc).

    rank / energy: the target rank of the svd family, or the smallest rank keeping that fraction
    of the energy; default the largest input rank (PEFT's default). density: the fraction kept
    by the pruning combinations. rng: DARE's host generator. clamp: PEFT's svd_clamp quantile.
    `path` only names the layer in error messages.
    """
    _check_options(modules, weights, combination=combination, rank=rank, energy=energy, density=density,
                   majority_sign_method=majority_sign_method, clamp=clamp, weight_dtype=weight_dtype,
                   path=path)
    xp = namespace(*(m.A for m in modules), *(m.B for m in modules))
    same_dtype({f"{path} adapter {i} {name}": t for i, m in enumerate(modules) for name, t in (("A", m.A), ("B", m.B))})
    A_cat, B_cat = _stacked_factors(modules, weights, xp=xp)           # (R, k), (d, R)
    try:
        target = factored_svd(A_cat, B_cat)                            # Delta = B_cat A_cat
    except NonFiniteError:  # the weights scaled a factor, or its SVD's core, past the dtype's range
        raise NonFiniteError(f"{path}: the weighted factors overflow {A_cat.dtype}; scale the weights down") from None
    default_rank = max(m.r for m in modules)
    if combination == "cat":
        A, B = A_cat, B_cat
    elif combination == "svd":
        if weight_dtype == "float64":
            svd = target
        else:
            svd = factored_svd(*_stacked_factors(modules, [_rounded(w, weight_dtype) for w in weights], xp=xp))
        A, B = svd.truncate(choose_rank(svd.S, rank=rank, energy=energy, default=default_rank))
    elif combination in FACTOR_MERGES:
        A, B = _merge_factors(modules, weights, method=FACTOR_MERGES[combination], density=density,
                              majority_sign_method=majority_sign_method, rng=rng, weight_dtype=weight_dtype)
    else:
        deltas = [lora_delta_weight(m.A, m.B, scaling=m.scaling) for m in modules]   # n x (d, k), by necessity
        merged = merge_task_tensors(deltas, [_rounded(w, weight_dtype) for w in weights],
                                    method=DENSE_MERGES[combination], density=density,
                                    majority_sign_method=majority_sign_method, rng=rng)
        svd: ThinSVD = thin_svd(merged)
        A, B = svd.truncate(choose_rank(svd.S, rank=rank, energy=energy, default=default_rank))
    if clamp is not None:
        A, B = _clamp_factors(A, B, clamp, xp=xp)
    error = product_norm(xp.concat([B_cat, -B], axis=1), xp.concat([A_cat, A], axis=0))
    r = int(A.shape[0])
    report = compression_report(target.S, r, error=error)
    if not (math.isfinite(report.norm) and math.isfinite(report.error)):
        raise NonFiniteError(f"{path}: the weighted sum overflows {A_cat.dtype} (||Delta||_F = {report.norm:g}, "
                             f"error {report.error:g}); scale the weights down")
    fused = ModuleAdapter("lora", {"A": A, "B": B}, alpha=float(r), fan_in_fan_out=modules[0].fan_in_fan_out)
    return fused, report


def merge_task_tensors(tensors: Sequence[Any], weights: Sequence[float], *, method: str,
                       density: float | None = None, majority_sign_method: str = "total",
                       rng: np.random.Generator | None = None) -> Any:
    """One task-vector merge of same-shape tensors T_i with weights c_i (module doc, PEFT's merge_utils).

    method: task_arithmetic, ties, dare_linear, dare_ties or magnitude_prune.
    """
    if method not in TASK_MERGES:
        raise ConfigError(f"unknown merge {method!r}; choose one of {', '.join(TASK_MERGES)}")
    xp = namespace(*tensors)
    if method in ("ties", "magnitude_prune"):
        tensors = [_prune_by_magnitude(t, _density(density, method), xp=xp) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        if rng is None:
            raise ConfigError(f"{method} drops entries at random: give a seed (combine_adapters(seed=...), "
                              "refpeft fuse --seed) or a generator (rng=dare_generator(seed, path))")
        tensors = [_prune_at_random(t, _density(density, method), rng=rng, xp=xp) for t in tensors]
    stacked = xp.stack(list(tensors))                                        # (n, ...)
    c = from_numpy(np.asarray(weights, dtype=np.float64), xp=xp, like=stacked)
    c = xp.reshape(xp.astype(c, stacked.dtype), (len(weights),) + (1,) * (stacked.ndim - 1))
    weighted = stacked * c
    if method in ("ties", "dare_ties"):
        keep = xp.astype(_majority_sign_mask(stacked, majority_sign_method, xp=xp), stacked.dtype)
        kept = xp.sum(keep, axis=0)
        return xp.sum(weighted * keep, axis=0) / xp.where(kept < 1.0, xp.ones_like(kept), kept)
    return xp.sum(weighted, axis=0)


def dare_generator(seed: int, path: str) -> np.random.Generator:
    """The host generator of DARE's keep masks for the layer at `path`: one stream per (seed, layer)."""
    if int(seed) < 0:
        raise ConfigError(f"a DARE seed is an integer >= 0, got {seed}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(path.encode("utf-8"))]))


def _stacked_factors(modules: Sequence[ModuleAdapter], weights: Sequence[float], *, xp: Any) -> tuple[Any, Any]:
    """(A_cat, B_cat): A rows (A_i * w_i) * s_i, B columns B_i, so that B_cat A_cat = sum_i w_i s_i B_i A_i."""
    A_cat = xp.concat([(m.A * w) * m.scaling for m, w in zip(modules, weights)], axis=0)   # (R, k)
    B_cat = xp.concat([m.B for m in modules], axis=1)                                    # (d, R)
    return A_cat, B_cat


def _merge_factors(modules: Sequence[ModuleAdapter], weights: Sequence[float], *, method: str,
                   density: float | None, majority_sign_method: str, rng: np.random.Generator | None,
                   weight_dtype: str) -> tuple[Any, Any]:
    """PEFT's linear family: A and B merged separately with sign(c) sqrt|c| and sqrt|c|, c = w s."""
    weights_A, weights_B = [], []
    for m, w in zip(modules, weights):
        c = w * m.scaling
        sign = 1 if c >= 0 else -1
        weights_A.append(_rounded(math.sqrt(abs(c)) * sign, weight_dtype))
        weights_B.append(_rounded(math.sqrt(abs(c)), weight_dtype))
    options = dict(method=method, density=density, majority_sign_method=majority_sign_method, rng=rng)
    A = merge_task_tensors([m.A for m in modules], weights_A, **options)   # (r, k)
    B = merge_task_tensors([m.B for m in modules], weights_B, **options)   # (d, r)
    return A, B


def _prune_by_magnitude(t: Any, density: float, *, xp: Any) -> Any:
    """Keep the int(density * size) largest |entries| of t (lower flat index first among equals)."""
    if density >= 1.0:
        return t
    flat = xp.reshape(xp.abs(t), (-1,))
    keep_count = int(density * flat.shape[0])
    order = xp.argsort(flat, descending=True, stable=True)      # entries by decreasing magnitude
    position = xp.argsort(order, stable=True)                    # each entry's place in that order
    return t * xp.reshape(xp.astype(position < keep_count, t.dtype), t.shape)


def _prune_at_random(t: Any, density: float, *, rng: np.random.Generator, xp: Any) -> Any:
    """DARE: keep each entry with probability density (U[0,1) < density), rescale kept ones by 1/density."""
    if density >= 1.0:
        return t
    keep = rng.random(tuple(t.shape)) < density
    mask = xp.astype(from_numpy(keep.astype(np.float64), xp=xp, like=t), t.dtype)
    return (t * mask) / density


def _majority_sign_mask(stacked: Any, method: str, *, xp: Any) -> Any:
    """[sign T_i == sigma] with sigma = +1 where the total (or the sign count) is >= 0, else -1."""
    sign = xp.sign(stacked)
    magnitude = xp.sum(stacked if method == "total" else sign, axis=0)
    majority = xp.where(magnitude >= 0, xp.ones_like(magnitude), -xp.ones_like(magnitude))
    return sign == majority


def _clamp_factors(A: Any, B: Any, q: float, *, xp: Any) -> tuple[Any, Any]:
    """PEFT's svd_clamp: bound A and B by the q-quantile h of all their entries, to [-h, h]."""
    entries = xp.sort(xp.concat([xp.reshape(B, (-1,)), xp.reshape(A, (-1,))]))
    position = q * (entries.shape[0] - 1)
    below, above = math.floor(position), math.ceil(position)
    w = position - below
    low, high = float(entries[below]), float(entries[above])
    h = low + w * (high - low) if w < 0.5 else high - (high - low) * (1.0 - w)   # torch.lerp's two forms
    return xp.clip(A, -h, h), xp.clip(B, -h, h)


def _rounded(w: float, weight_dtype: str) -> float:
    """w as PEFT's float32 weight tensor holds it (weight_dtype="float32"), or unchanged."""
    return float(np.float32(w)) if weight_dtype == "float32" else float(w)


def _density(density: float | None, method: str) -> float:
    if density is None or not density >= 0.0:
        raise ConfigError(f"{method} needs a density in [0, 1] (the fraction of entries kept), got {density}")
    return density


def _check_options(modules: Sequence[ModuleAdapter], weights: Sequence[float], *, combination: str,
                   rank: int | None, energy: float | None, density: float | None, majority_sign_method: str,
                   clamp: float | None, weight_dtype: str, path: str) -> None:
    """Refuse what PEFT would refuse, and options that would be silently ignored."""
    if combination not in COMBINATIONS:
        raise ConfigError(f"unknown combination {combination!r}; choose one of {', '.join(COMBINATIONS)}")
    if not modules or len(modules) != len(weights):
        raise ConfigError(f"{path}: got {len(modules)} adapters and {len(weights)} weights")
    for i, (m, w) in enumerate(zip(modules, weights)):
        if m.spec is not LORA or m.bias is not None:
            raise ConfigError(f"{path}: adapter {i} is {m.method}{' with a bias' if m.bias is not None else ''}; "
                              "weighted combination is defined for plain LoRA factors (as in PEFT)")
        if not math.isfinite(w):
            raise ConfigError(f"{path}: weight {i} is {w}")
    shapes = {(int(m.B.shape[0]), int(m.A.shape[1])) for m in modules}
    if len(shapes) > 1:
        raise ConfigError(f"{path}: adapters disagree on the layer's (d, k): {sorted(shapes)}")
    compressing = combination == "svd" or combination in DENSE_MERGES
    if (rank is not None or energy is not None or clamp is not None) and not compressing:
        raise ConfigError(f"{combination} does not truncate: rank, energy and clamp apply to the svd family only")
    if combination in FACTOR_MERGES and len({m.r for m in modules}) > 1:
        raise RankError(f"{path}: {combination} needs equal ranks, got {[m.r for m in modules]} (use cat or svd)")
    merge = FACTOR_MERGES.get(combination) or DENSE_MERGES.get(combination)
    if merge in ("ties", "dare_ties") and majority_sign_method not in SIGN_METHODS:
        raise ConfigError(f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}, got {majority_sign_method!r}")
    if merge in ("ties", "dare_ties", "dare_linear", "magnitude_prune"):
        _density(density, combination)
    elif density is not None:
        raise ConfigError(f"{combination} does not prune: density applies to ties, dare_* and magnitude_prune")
    if clamp is not None and not 0.0 <= clamp <= 1.0:
        raise ConfigError(f"clamp is a quantile in [0, 1], got {clamp}")
    if weight_dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
