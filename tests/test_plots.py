"""refpeft.plots: the text summary, a PNG written with matplotlib, and the extra named without it."""

from __future__ import annotations

import numpy as np
import pytest

import refpeft.plots as plots
from refpeft.errors import ConfigError

SPECTRA = {"layers.0.q_proj": np.array([3.0, 2.0, 1.0]), "layers.0.v_proj": np.array([1.0, 0.0])}


def test_format_spectra_reports_ranks_and_energy():
    text = plots.format_spectra(SPECTRA, fractions=(0.9, 0.99))
    assert "layers.0.q_proj: r(90%) = 2, r(99%) = 3" in text
    assert "layers.0.v_proj: r(90%) = 1, r(99%) = 1" in text
    assert "E(r) = 0.6429 0.9286 1.0000" in text


def test_plot_spectra_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is part of the test extra")
    out = plots.plot_spectra(SPECTRA, tmp_path / "spectra.png", title="t")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ConfigError, match="no LoRA/DoRA layers"):
        plots.plot_spectra({}, tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_without_matplotlib_the_error_names_the_extra(tmp_path, monkeypatch):
    real = plots.importlib.util.find_spec
    monkeypatch.setattr(plots.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(ConfigError, match=r"refpeft\[plot\]"):
        plots.plot_spectra(SPECTRA, tmp_path / "spectra.png")
    assert not (tmp_path / "spectra.png").exists()
