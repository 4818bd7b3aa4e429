"""Conformance families for PEFT's add_weighted_adapter combinations past `cat` (refpeft.fusion).

The factor merges (`fusion_linear`, `fusion_ties`, `fusion_magnitude_prune`, `fusion_dare_linear`,
`fusion_dare_ties`) combine n LoRA adapters of one rank r on one layer: A_i (r, k), B_i (d, r), each
with its scale s_i = alpha_i / r and weight w_i. With c_i = w_i s_i, PEFT merges the A's with
weights sign(c_i) sqrt|c_i| and the B's with sqrt|c_i|, both rounded to float32 (PEFT holds them in
`torch.tensor(list)`); the case gives them as `parameters.weights_A` / `weights_B` (float64 values
of those float32 numbers), to be used as given. Each of the two stacks T_1..T_n goes through:

    magnitude prune  (ties, magnitude_prune) keep the int(density * size) largest |T_i| entries
    random prune     (dare_*) T_i * mask_i / density, mask_i given: `mask.A<i>` / `mask.B<i>` (0 or 1)
    linear, magnitude_prune, dare_linear:  sum_i c_i T_i
    ties, dare_ties:  sigma = +1 where sum_i T_i >= 0 (after pruning) else -1, and
                      sum_i c_i T_i [sign T_i == sigma] / max(1, #{i : sign T_i == sigma})

DARE's masks are drawn (in the generator) by refpeft.fusion.dare_generator(seed, "layer"), U[0, 1) <
density, A_1..A_n then B_1..B_n: what `refpeft fuse --seed` draws; PEFT's are torch.bernoulli's.
Every step is elementwise or a sum over n, so the expected values are computed on plain float64 and
are machine-independent; the generator refuses a draw whose kept set or majority sign is not
decided robustly in the case's precision (a magnitude tie at the pruning threshold, a sign sum
within its rounding bound of 0).

The dense merges (`fusion_ties_svd`, `fusion_magnitude_prune_svd`, `fusion_dare_linear_svd`,
`fusion_dare_ties_svd`) apply the same merges to the deltas s_i B_i A_i with the weights w_i, then an
SVD at full rank min(d, k), so the expected delta is the merged matrix (`fusion_dense_vectors`).

`fusion_svd` is `svd`: Delta = sum_i w_i s_i B_i A_i and its best rank-`options.rank` approximation.
Singular vectors have free signs, so the result compared is the product `delta` = B A (d, k), not
the factors. The case's factors are built on Sylvester-Hadamard rows and columns (exactly
orthogonal), so the truncated SVD of Delta is known in closed form and the expected delta is exact;
the bound is derived in `svd_delta_bound`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from refpeft.conformance.case import Case, Family, Vectors, draw, exact_inputs, plain_results
from refpeft.conformance.exact import exact_sum
from refpeft.errors import ConfigError
from refpeft.fusion import dare_generator, merge_task_tensors
from refpeft.methods.lora import lora_scaling
from refpeft.tolerance import Bounded, Precision, FLOAT64, divide, exact, matmul, multiply, row_sum, scale

FACTOR_MERGES = ("linear", "ties", "magnitude_prune", "dare_linear", "dare_ties")
DENSE_MERGES = ("ties", "magnitude_prune", "dare_linear", "dare_ties")          # fusion_<merge>_svd
_TASK_MERGE = {"linear": "task_arithmetic", "ties": "ties", "magnitude_prune": "magnitude_prune",
               "dare_linear": "task_arithmetic", "dare_ties": "ties"}


def _f32(value: float) -> float:
    return float(np.float32(value))


def factor_weights(case: Case) -> tuple[list[float], list[float], list[float]]:
    """(s_i, PEFT's weights for the A's, for the B's) of a factor-merge case, the weights rounded to float32."""
    scalings = [lora_scaling(alpha, case.sizes["r"]) for alpha in case.options["alphas"]]
    c = [w * s for w, s in zip(case.options["weights"], scalings)]
    return scalings, [_f32(math.copysign(math.sqrt(abs(ci)), ci)) for ci in c], [_f32(math.sqrt(abs(ci))) for ci in c]


def _factor_inputs(case: Case) -> dict[str, np.ndarray]:
    """A1..An, B1..Bn, and for DARE the masks (module docstring)."""
    s, n = case.sizes, len(case.options["alphas"])
    rng = np.random.default_rng(case.seed)
    inputs = {}
    for i in range(1, n + 1):
        inputs[f"A{i}"] = draw(rng, (s["r"], s["k"]), dtype=case.dtype, scale=0.25)
        inputs[f"B{i}"] = draw(rng, (s["d"], s["r"]), dtype=case.dtype, scale=0.5)
    if case.family.startswith("fusion_dare"):      # the factors' masks, or (dense merges) the deltas'
        masks = dare_generator(case.seed, "layer")
        shapes = {f"delta{i}": (s["d"], s["k"]) for i in range(1, n + 1)} if case.family.endswith("_svd") else \
            {f"{side}{i}": inputs[f"{side}{i}"].shape for side in ("A", "B") for i in range(1, n + 1)}
        for name, shape in shapes.items():
            inputs[f"mask.{name}"] = (masks.random(shape) < case.options["density"]).astype(case.dtype)
    return inputs


def _pruned(case: Case, tensors: list[Bounded], merge: str, masks: list[np.ndarray] | None,
            p: Precision) -> list[Bounded]:
    """Each T_i after the merge's pruning, with its error; refuses a kept set (or, for DARE-TIES, a kept
    entry's sign) that the error in precision p could change."""
    density = case.options.get("density", 1.0)
    if masks is not None:
        if merge == "dare_ties" and any(np.any(m.astype(bool) & (np.abs(t.value) <= t.error) & (t.error > 0))
                                        for t, m in zip(tensors, masks)):
            raise ConfigError(f"case {case.name}: a kept entry's sign is not decided in {p.storage}; change its seed")
        return [scale(Bounded(t.value * m, t.error * m), density, p, divide=True) for t, m in zip(tensors, masks)]
    if merge not in ("ties", "magnitude_prune"):
        return tensors
    out = []
    for t in tensors:
        order = np.argsort(-np.abs(t.value).ravel(), kind="stable")
        count = int(density * order.size)
        low, high = (np.abs(t.value) - t.error).ravel(), (np.abs(t.value) + t.error).ravel()
        if 0 < count < order.size and not low[order[:count]].min() > high[order[count:]].max():
            raise ConfigError(f"case {case.name}: the kept set at density {density} is not decided in {p.storage} "
                              "(a tie, or magnitudes within rounding); change its seed")
        keep = np.zeros(order.size)
        keep[order[:count]] = 1.0
        keep = keep.reshape(t.value.shape)
        out.append(Bounded(t.value * keep, t.error * keep))
    return out


def _merged(case: Case, tensors: list[Bounded], weights: list[float], merge: str, masks: list[np.ndarray] | None,
            p: Precision) -> Bounded:
    """The task merge of T_1..T_n (module docstring) with its error bound in precision p."""
    pruned = _pruned(case, tensors, merge, masks, p)
    stack = Bounded(np.stack([t.value for t in pruned]), np.stack([t.error for t in pruned]))
    weighted = multiply(stack, exact(np.reshape(weights, (-1,) + (1,) * (stack.value.ndim - 1))), p)
    if merge not in ("ties", "dare_ties"):
        return row_sum(weighted, p)
    sums = row_sum(stack, p)                                 # the sign election's sum, as computed
    if np.any((np.abs(sums.value) <= sums.error) & (sums.error > 0)):
        raise ConfigError(f"case {case.name}: a majority sign is not decided in {p.storage}; change its seed")
    if case.options.get("majority_sign_method", "total") != "total":
        raise ConfigError("the conformance cases elect signs by total")
    agree = (np.sign(stack.value) == np.where(sums.value >= 0, 1.0, -1.0)).astype(np.float64)
    kept = row_sum(multiply(weighted, exact(agree), p), p)
    return divide(kept, exact(np.maximum(agree.sum(axis=0), 1.0)), p)


def _expected_merge(tensors: list[Any], weights: list[float], merge: str, masks: list[np.ndarray] | None,
                    density: float | None) -> Any:
    """refpeft.fusion.merge_task_tensors on the exact T_i; DARE with the given masks (its random prune
    applied here, then its merge with nothing more to prune)."""
    if masks is not None:
        tensors = [(t * m) / density for t, m in zip(tensors, masks)]
        return merge_task_tensors(tensors, weights, method="ties" if merge == "dare_ties" else "task_arithmetic",
                                  **({"density": 1.0} if merge == "dare_ties" else {}))
    options = {"density": density} if merge in ("ties", "magnitude_prune") else {}
    return merge_task_tensors(tensors, weights, method=_TASK_MERGE[merge], **options)


def fusion_factor_vectors(case: Case) -> Vectors:
    """A (r, k) and B (d, r) of a factor merge (module docstring); bounds from refpeft.tolerance's algebra."""
    inputs = _factor_inputs(case)
    n = len(case.options["alphas"])
    scalings, weights_A, weights_B = factor_weights(case)
    merge = case.family.removeprefix("fusion_")
    expected, bounds = {}, {}
    for side, weights in (("A", weights_A), ("B", weights_B)):
        tensors = [inputs[f"{side}{i}"].astype(np.float64) for i in range(1, n + 1)]
        masks = [inputs[f"mask.{side}{i}"] for i in range(1, n + 1)] if merge.startswith("dare") else None
        expected[side] = _expected_merge(tensors, weights, merge, masks, case.options.get("density"))
        bounds[side] = sum(_merged(case, [exact(t) for t in tensors], weights, merge, masks, p).error
                           for p in (Precision(case.dtype), FLOAT64))
    parameters = {"scalings": scalings, "weights_A": weights_A, "weights_B": weights_B, "fused_alpha": case.sizes["r"]}
    return Vectors(inputs, plain_results(expected), plain_results(bounds), parameters)


# ---------------------------------------------------------------- the dense merges (*_svd) at full rank

def fusion_dense_vectors(case: Case) -> Vectors:
    """delta of `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd` at rank min(d, k).

    PEFT forms each Delta_i = s_i B_i A_i, merges the Delta_i with the float32 weights w_i (the task merge
    of the factor families, on (d, k) tensors; DARE's masks `mask.delta<i>`), and keeps the top
    `options.rank` SVD terms. At rank min(d, k) nothing is cut, so the expected delta is the merged M
    itself, and (no projection to perturb) a correct implementation is off by: the merge's elementwise
    error e_M, the SVD's backward error (d + k) u (||M||_F + ||e_M||_F) (the LAPACK constant assumed, as
    in `svd_delta_bound`), and 2 gamma_{r+1} (||M||_F + ||e_M||_F) for forming U_r S_r Vh_r (each entry
    of U S Vh is at most sigma_1). Rounded up to 20 significant bits like the svd bound.
    """
    from refpeft.conformance.families import round_up

    s, o = case.sizes, case.options
    if o["rank"] != min(s["d"], s["k"]):
        raise ConfigError(f"case {case.name}: the dense merges are checked at rank min(d, k) = {min(s['d'], s['k'])}")
    inputs = _factor_inputs(case)
    n, merge = len(o["alphas"]), case.family.removeprefix("fusion_").removesuffix("_svd")
    scalings = [lora_scaling(alpha, s["r"]) for alpha in o["alphas"]]
    weights = [_f32(w) for w in o["weights"]]
    masks = [inputs[f"mask.delta{i}"] for i in range(1, n + 1)] if merge.startswith("dare") else None
    e = exact_inputs({name: a for name, a in inputs.items() if not name.startswith("mask.")})
    deltas = [e[f"B{i}"] @ e[f"A{i}"] * scalings[i - 1] for i in range(1, n + 1)]
    expected = plain_results({"delta": _expected_merge(deltas, weights, merge, masks, o.get("density"))})

    def bound(p: Precision) -> Any:
        formed = [matmul(exact(e[f"B{i}"]), exact(e[f"A{i}"]), p, scale=scalings[i - 1]) for i in range(1, n + 1)]
        M = _merged(case, formed, weights, merge, masks, p)
        size = math.sqrt(float(exact_sum(M.value ** 2))) + math.sqrt(float(exact_sum(M.error ** 2)))
        return np.asarray(M.error) + (s["d"] + s["k"]) * p.u * size + 2.0 * p.gamma(o["rank"] + 1) * size

    parameters = {"scalings": scalings, "weights": weights, "fused_alpha": o["rank"]}
    return Vectors(inputs, expected, {"delta": round_up(bound(Precision(case.dtype)) + bound(FLOAT64))}, parameters)


# ---------------------------------------------------------------- svd

def sylvester_hadamard(n: int) -> np.ndarray:
    """The n x n Sylvester-Hadamard matrix (n a power of two): entries +-1, H H^T = n I."""
    H = np.ones((1, 1))
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])
    if H.shape[0] != n:
        raise ConfigError(f"a Sylvester-Hadamard matrix needs a power of two, got {n}")
    return H


def _svd_inputs(case: Case) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """A_i rows = a_j g_j^T, B_i columns = b_j h_j, every (h_j, g_j) a distinct Hadamard column / row pair
    (j over all adapters' ranks), b_j drawn in [1/2, 1) and a_j = options.row_scales[j]; also returns
    B_cat's column scales b and A_cat's rows' c_j a_j (c_j = w_i s_i) in float64."""
    s, o = case.sizes, case.options
    rng = np.random.default_rng(case.seed)
    Hd, Hk = sylvester_hadamard(s["d"]), sylvester_hadamard(s["k"])
    inputs, b, ca, j = {}, [], [], 0
    for i, (r, alpha, w) in enumerate(zip(s["ranks"], o["alphas"], o["weights"]), start=1):
        bj = (rng.random(r) * 0.5 + 0.5).astype(case.dtype)
        aj = np.asarray(o["row_scales"][j:j + r], dtype=case.dtype)
        inputs[f"A{i}"] = (aj[:, None] * Hk[j:j + r, :]).astype(case.dtype)
        inputs[f"B{i}"] = (Hd[:, j:j + r] * bj[None, :]).astype(case.dtype)
        b += bj.astype(np.float64).tolist()
        ca += (aj.astype(np.float64) * (_f32(w) * lora_scaling(alpha, r))).tolist()
        j += r
    return inputs, np.asarray(b), np.asarray(ca)


def svd_delta_bound(b: np.ndarray, ca: np.ndarray, inputs: dict[str, Any], case: Case, p: Precision) -> float:
    """A bound on every entry of |delta_hat - T_r(Delta)| for an implementation computing in precision p.

    Delta = sum_j (c_j a_j b_j) h_j g_j^T has singular values sigma_j = |c_j a_j b_j| sqrt(d k) and
    singular vectors h_j / sqrt(d), g_j / sqrt(k). The implementation forms Delta (PEFT: each s_i B_i A_i,
    times w_i, summed; elementwise bound e1 from refpeft.tolerance) or works on the stacked factors
    (refpeft), and takes an SVD that is the exact SVD of Delta + E2 with ||E2||_2 <= p(d, k) u
    ||B_cat||_F ||A_cat||_F (backward stability; LAPACK's "modestly growing" p(d, k) is the one
    constant not derived here: taken as d + k). With ||E||_2 <= ||e1||_F + ||E2||_2 and the gap
    g = sigma_r - sigma_{r+1}, Weyl and Wedin's sin-theta theorem give, for the projector P~ onto
    the computed top-r left singular subspace and T_r(M) = P M,

        ||T_r(Delta + E) - T_r(Delta)||_2 <= ||P~ E|| + ||(P~ - P) Delta|| <= ||E|| (1 + sigma_1 / (g - ||E||)),

    a bound on every entry. Forming U_r S_r and multiplying by V_r^T adds at most
    2 gamma_{r+1} sum_{j kept} sigma_j / sqrt(d k) per entry (|u| = 1/sqrt(d), |v| = 1/sqrt(k)).
    """
    d, k, rank = case.sizes["d"], case.sizes["k"], case.options["rank"]
    sigma = np.sort(np.abs(ca * b))[::-1] * math.sqrt(d * k)
    n = len(case.sizes["ranks"])
    deltas = []
    for i, (r, alpha, w) in enumerate(zip(case.sizes["ranks"], case.options["alphas"], case.options["weights"]), 1):
        BA = matmul(exact(inputs[f"B{i}"]), exact(inputs[f"A{i}"]), p, scale=lora_scaling(alpha, r))
        deltas.append(multiply(BA, exact(np.asarray(_f32(w))), p))
    formed = row_sum(Bounded(np.stack([t.value for t in deltas]), np.stack([t.error for t in deltas])), p) \
        if n > 1 else deltas[0]
    e1 = math.sqrt(float(exact_sum(formed.error ** 2)))
    factors = math.sqrt(float(exact_sum(b ** 2)) * d) * math.sqrt(float(exact_sum(ca ** 2)) * k)   # ||B_cat|| ||A_cat||
    E = e1 + (d + k) * p.u * (factors + e1)
    gap = sigma[rank - 1] - sigma[rank] - E
    if gap <= 0:
        raise ConfigError(f"case {case.name}: the singular value gap at rank {rank} does not exceed the error")
    return E * (1.0 + sigma[0] / gap) + 2.0 * p.gamma(rank + 1) * float(sigma[:rank].sum()) / math.sqrt(d * k)


def fusion_svd_vectors(case: Case) -> Vectors:
    """delta = B A of PEFT's `svd` combination at rank options.rank: the top singular terms of Delta, exactly."""
    from refpeft.conformance.families import round_up

    inputs, b, ca = _svd_inputs(case)
    rank = case.options["rank"]
    kept = np.argsort(-np.abs(ca * b), kind="stable")[:rank]
    n = len(case.sizes["ranks"])
    e = exact_inputs({"B": np.concatenate([inputs[f"B{i}"] for i in range(1, n + 1)], axis=1),
                      "A": np.concatenate([inputs[f"A{i}"] for i in range(1, n + 1)], axis=0)})
    row_weights = np.concatenate([np.full(r, _f32(w) * lora_scaling(alpha, r)) for r, alpha, w in
                                  zip(case.sizes["ranks"], case.options["alphas"], case.options["weights"])])
    A_weighted = e["A"] * row_weights[:, None]
    delta = e["B"][:, kept] @ A_weighted[kept, :]
    bound = svd_delta_bound(b, ca, inputs, case, Precision(case.dtype)) + svd_delta_bound(b, ca, inputs, case, FLOAT64)
    expected = plain_results({"delta": delta})
    parameters = {"scalings": [lora_scaling(alpha, r) for r, alpha in zip(case.sizes["ranks"], case.options["alphas"])],
                  "weights": [_f32(w) for w in case.options["weights"]], "fused_alpha": rank}
    return Vectors(inputs, expected, {"delta": round_up(np.full(expected["delta"].shape, bound))}, parameters)


FUSION_FAMILIES: tuple[Family, ...] = (
    *(Family(f"fusion_{name}", "fusion", f"PEFT's `{name}` combination of LoRA adapters of one rank: A and B merged "
             "separately with parameters.weights_A / weights_B (see conformance/README.md \"Fusion\")",
             fusion_factor_vectors) for name in FACTOR_MERGES),
    Family("fusion_svd", "fusion", "delta = B A of PEFT's `svd` combination: the best rank-options.rank "
           "approximation of sum_i w_i s_i B_i A_i (the product, since singular vectors have free signs)",
           fusion_svd_vectors),
    *(Family(f"fusion_{name}_svd", "fusion", f"delta = B A of PEFT's `{name}_svd` combination at rank min(d, k): "
             f"the `{name}` merge of the deltas s_i B_i A_i (see conformance/README.md \"Fusion\")",
             fusion_dense_vectors) for name in DENSE_MERGES),
)


def fusion_cases() -> list[Case]:
    """Three rank-4 adapters for the factor and dense merges; two adapters (ranks 3, 2) on Hadamard factors for svd."""
    sizes = {"k": 32, "d": 24, "r": 4}
    base = {"alphas": [8.0, 16.0, 4.0], "weights": [0.7, -0.35, 1.3]}
    variants = {"linear": {}, "ties": {"density": 0.6, "majority_sign_method": "total"},
                "magnitude_prune": {"density": 0.5}, "dare_linear": {"density": 0.7},
                "dare_ties": {"density": 0.6, "majority_sign_method": "total"}}
    cases = [Case(f"fusion-{name.replace('_', '-')}-{dtype}", f"fusion_{name}", dtype, 710 + i, sizes,
                  {**base, **options}) for i, (name, options) in enumerate(variants.items())
             for dtype in ("float32", "float64")]
    svd = {"d": 16, "k": 32, "ranks": [3, 2]}
    svd_options = {"alphas": [8.0, 4.0], "weights": [0.75, -0.5], "rank": 3,
                   "row_scales": [1.0, 0.5, 0.0625, 0.9375, 0.125]}
    cases += [Case(f"fusion-svd-rank3-{dtype}", "fusion_svd", dtype, 720, svd, svd_options)
              for dtype in ("float32", "float64")]
    cases += [Case(f"fusion-{name.replace('_', '-')}-svd-{dtype}", f"fusion_{name}_svd", dtype, 730 + i, sizes,
                   {**base, **variants[name], "rank": min(sizes["d"], sizes["k"])})
              for i, name in enumerate(DENSE_MERGES) for dtype in ("float32", "float64")]
    return cases
