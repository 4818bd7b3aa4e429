"""REFPEFT_TEST_INSTALLED=1 (.ci/run): the tests import the installed refpeft, refpeft_onnx and
refpeft_peers, never the checkout; a session that would import the checkout stops, naming the path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"refpeft": ROOT / "refpeft", "refpeft_onnx": ROOT / "export" / "refpeft_onnx",
            "refpeft_peers": ROOT / "conformance" / "refpeft_peers"}

PROBE = '''
import refpeft, refpeft_onnx, refpeft_peers

def test_the_packages_come_from_the_installed_copy():
    print("IMPORTED", refpeft.__file__, refpeft_onnx.__file__, refpeft_peers.__file__)
'''


def _run(tmp_path: Path, site: Path) -> subprocess.CompletedProcess:
    """A probe session under the switch with the checkout's folders first on PYTHONPATH (as pyproject's
    pythonpath puts them) and `site` after them, run from outside the checkout."""
    (tmp_path / "test_probe.py").write_text(PROBE)
    path = [str(ROOT), str(ROOT / "export"), str(ROOT / "conformance"), str(site)]
    env = {**{k: v for k, v in os.environ.items() if k not in ("REFPEFT_REQUIRE_PEERS", "CI")},
           "REFPEFT_TEST_INSTALLED": "1", "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_an_installed_copy_is_imported_ahead_of_the_checkout(tmp_path):
    site = tmp_path / "site"
    for name in PACKAGES:                  # a stand-in for site-packages: each package, outside the checkout
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("")
    done = _run(tmp_path, site)
    assert done.returncode == 0, done.stdout + done.stderr
    imported = done.stdout.split("IMPORTED ")[1].split()[:3]
    assert imported == [str(site / name / "__init__.py") for name in PACKAGES]


def test_a_checkout_import_stops_the_session_naming_the_path(tmp_path):
    site = tmp_path / "site"                # linked into the checkout, as an editable install resolves
    site.mkdir()
    for name, folder in PACKAGES.items():
        (site / name).symlink_to(folder, target_is_directory=True)
    done = _run(tmp_path, site)
    assert done.returncode != 0
    for name, folder in PACKAGES.items():
        assert f"{name} is imported from the checkout ({folder / '__init__.py'})" in done.stdout + done.stderr


def test_running_from_inside_the_checkout_is_refused():
    import conftest

    assert any("run from inside the checkout" in p for p in conftest.checkout_imports(cwd=ROOT / "tests"))
    assert not any("inside the checkout" in p for p in conftest.checkout_imports(cwd=ROOT.parent))
