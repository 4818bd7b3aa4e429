"""pytest configuration: hypothesis runs a fixed set of examples under CI (CI=true).

Locally, hypothesis explores new examples on every run (and keeps failures in .hypothesis/);
in CI the examples are derandomized so a landing never depends on the draw.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
