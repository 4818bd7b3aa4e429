"""`refpeft inspect --compare` and `--amplification`: the LoRA paper's section 7 analyses, module by module.

The math is refpeft.analysis; this module picks each adapted layer's tensors and the base weight and
lays the numbers out as `refpeft inspect` tables (refpeft.commands.inspect.format_table).

    --compare OTHER   per layer both adapters adapt: phi(A1, A2, i, j) at (1, 1) and at (m, m),
                      m = min(r1, r2), each beside the random baseline max(i, j) / k; --plot draws the
                      whole grid per layer (the paper's figure 3)
    --amplification   per layer (needs --base): ||Delta W||_F, ||U^T W V||_F, ||U_W^T W V_W||_F and their
                      ratio for the low-rank update s B A (section 7.3), and for every mergeable method the
                      DoRA paper's magnitude change Delta M and direction change Delta D of the merged weight
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refpeft.analysis import (amplification_factor, decomposition_change, random_subspace_similarity,
                              subspace_similarity_grid)
from refpeft.errors import ConfigError

SIMILARITY_COLUMNS = [("module", "module"), ("r", "r1 x r2"), ("k", "k"), ("phi11", "phi(1,1)"),
                      ("random11", "random"), ("phimm", "phi(m,m)"), ("randommm", "random")]
AMPLIFICATION_COLUMNS = [("module", "module"), ("method", "method"), ("delta", "||dW||_F"),
                         ("projected", "||U^T W V||_F"), ("top", "||U_W^T W V_W||_F"), ("factor", "factor"),
                         ("dM", "delta M"), ("dD", "delta D")]


def low_rank_factors(module: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """A (r, k) and B (d, r) of a module whose method has the two factors (LoRA, DoRA, Pre-Diag), else None."""
    if not {"A", "B"} <= set(module.spec.tensors):
        return None
    return np.asarray(module.tensors["A"], dtype=np.float64), np.asarray(module.tensors["B"], dtype=np.float64)


def similarity_rows(adapter: Any, other: Any) -> tuple[list[dict[str, str]], dict[str, np.ndarray]]:
    """The --compare table rows and each layer's whole phi grid (for --plot), over the layers both
    adapters adapt with low-rank factors; ConfigError when there are none."""
    rows, grids = [], {}
    for path, module in adapter.modules.items():
        if path not in other.modules:
            continue
        mine, theirs = low_rank_factors(module), low_rank_factors(other.modules[path])
        if mine is None or theirs is None:
            continue
        A1, A2 = mine[0], theirs[0]
        grid = np.asarray(subspace_similarity_grid(A1, A2))
        k, m = A1.shape[1], min(grid.shape)
        grids[path] = grid
        rows.append({"module": path, "r": f"{A1.shape[0]} x {A2.shape[0]}", "k": str(k),
                     "phi11": f"{grid[0, 0]:.4f}", "random11": f"{random_subspace_similarity(k, 1, 1):.4f}",
                     "phimm": f"{grid[m - 1, m - 1]:.4f}", "randommm": f"{random_subspace_similarity(k, m, m):.4f}"})
    if not rows:
        raise ConfigError("the two adapters share no layer with low-rank factors A, B (LoRA, DoRA, Pre-Diag): "
                          "there is nothing to compare")
    return rows, grids


def amplification_rows(adapter: Any, base: Any) -> list[dict[str, str]]:
    """The --amplification table rows: each adapted layer's weight W0 from `base` (a SafetensorsFile)."""
    from refpeft.checkpoint import merged_weight

    flip = bool(adapter.config.get("fan_in_fan_out"))
    rows = []
    for path, module in adapter.modules.items():
        stored = np.asarray(base.read_float(f"{path}.weight"), dtype=np.float64)
        W0 = stored.T if flip else stored                                          # (d, k)
        row = {key: "-" for key, _ in AMPLIFICATION_COLUMNS}
        row.update(module=path, method=module.method)
        factors = low_rank_factors(module)
        if factors is not None:
            amp = amplification_factor(W0, *factors, scaling=module.scaling)
            row.update(delta=f"{amp.delta_norm:.4g}", projected=f"{amp.projected_norm:.4g}",
                       top=f"{amp.weight_top_norm:.4g}", factor=f"{amp.factor:.4g}")
        if module.spec.mergeable:
            W = merged_weight(module, stored, shared=adapter.shared)
            change = decomposition_change(W0, W.T if flip else W)
            row.update(dM=f"{change.magnitude_change:.4g}", dD=f"{change.direction_change:.4g}")
        rows.append(row)
    return rows
