"""Reports of singular spectra, per layer: a text summary and a matplotlib figure (spectra + energy);
and the LoRA paper's subspace-similarity heatmaps (refpeft.analysis).

Both take {module path: singular values} as refpeft.spectrum.adapter_spectra returns, and use the
energy curve E(r) and `rank_for_energy` of refpeft.spectrum (the math lives there). matplotlib is
imported only when a figure is drawn (it is the `plot` extra, not a core dependency), with the
non-interactive Agg backend, so plotting works on machines without a display.
"""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from refpeft.backend import to_numpy
from refpeft.errors import ConfigError
from refpeft.io import atomic_write_bytes
from refpeft.spectrum import energy_curve, rank_for_energy

FRACTIONS = (0.90, 0.95, 0.99)


def format_spectra(spectra: Mapping[str, Any], *, fractions: Sequence[float] = FRACTIONS, shown: int = 8) -> str:
    """Per layer: the rank keeping each energy fraction, then the leading singular values and E(r)."""
    lines = ["singular spectra (s B A, on factors) and energy E(r) = sum_{i<=r} S_i^2 / sum S_i^2:"]
    for path, S in spectra.items():
        values = np.asarray(to_numpy(S), dtype=np.float64)
        E = np.asarray(to_numpy(energy_curve(S)), dtype=np.float64)
        ranks = ", ".join(f"r({f:.0%}) = {rank_for_energy(S, f)}" for f in fractions)
        more = " ..." if values.size > shown else ""
        lines.append(f"  {path}: {ranks}")
        lines.append("    S    = " + " ".join(f"{v:.4g}" for v in values[:shown]) + more)
        lines.append("    E(r) = " + " ".join(f"{e:.4f}" for e in E[:shown]) + more)
    return "\n".join(lines)


def plot_spectra(spectra: Mapping[str, Any], path: str | os.PathLike, *, fractions: Sequence[float] = FRACTIONS,
                 title: str | None = None) -> Path:
    """Write a PNG: singular values per layer (log scale) and the energy curves with the fractions marked."""
    if not spectra:
        raise ConfigError("no LoRA/DoRA layers to plot")
    plt = _pyplot()
    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, S in spectra.items():
        values = np.asarray(to_numpy(S), dtype=np.float64)
        ranks = np.arange(1, values.size + 1)
        ax_s.semilogy(ranks, np.maximum(values, np.finfo(np.float64).tiny), marker=".", label=name)
        ax_e.plot(ranks, np.asarray(to_numpy(energy_curve(S)), dtype=np.float64), marker=".", label=name)
    for f in fractions:
        ax_e.axhline(f, color="grey", linestyle=":", linewidth=0.8)
        ax_e.annotate(f"{f:.0%}", (1, f), color="grey", fontsize=8, va="bottom")
    ax_s.set(xlabel="index i", ylabel="singular value S_i", title="singular values of s B A")
    ax_e.set(xlabel="rank r", ylabel="E(r)", title="energy kept by rank r", ylim=(0, 1.02))
    if len(spectra) <= 12:
        ax_e.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    return _save_png(plt, fig, path)


def plot_similarity(grids: Mapping[str, Any], path: str | os.PathLike, *, labels: tuple[str, str],
                    title: str | None = None) -> Path:
    """Write a PNG: one heatmap of phi(A1, A2, i, j) per layer (rows i, columns j), as the LoRA paper's figure 3."""
    if not grids:
        raise ConfigError("no layers to plot")
    plt = _pyplot()
    columns = min(len(grids), 4)
    rows = -(-len(grids) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.2 * rows), squeeze=False)
    for ax, (name, grid) in zip(axes.flat, grids.items()):
        values = np.asarray(to_numpy(grid), dtype=np.float64)
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="upper",
                          extent=(0.5, values.shape[1] + 0.5, values.shape[0] + 0.5, 0.5))
        ax.set(xlabel=f"j ({labels[1]})", ylabel=f"i ({labels[0]})", title=name)
        ax.title.set_fontsize(7)
        fig.colorbar(image, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[len(grids):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save_png(plt, fig, path)


def require_matplotlib() -> None:
    """ConfigError saying what to install when matplotlib (the `plot` extra) is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("drawing a plot needs matplotlib, which is not installed: pip install 'refpeft[plot]'")


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(plt: Any, fig: Any, path: str | os.PathLike) -> Path:
    """Lay out `fig`, write it atomically to `path` as a PNG and close it."""
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, png.getvalue())
