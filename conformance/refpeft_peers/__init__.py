"""refpeft_peers: the conformance runners, real implementations wrapped in the check protocol.

This import package lives in conformance/ beside the vectors it checks, installed with refpeft
(see refpeft.conformance.check for the protocol); it is the only place the peers are imported.

Each runner module exposes `implementations() -> list[Runner]` (refpeft.conformance.report's
`Runner`, re-exported here): one per device it can use (CPU, and CUDA when present), or raises
`NotInstalled` when its peer is missing. The peers are imported only inside these modules, only
when a report runs them: refpeft's core never imports them, and refpeft.conformance never imports
this package (the CLI verb loads the runners and hands them to the report).
A runner's `known_deviations` maps case names to the conformance/FINDINGS.md entry that explains
why that case is expected to fail; the report shows them and does not count them as failures.
"""

from __future__ import annotations

import importlib

from refpeft.conformance.report import Runner

__all__ = ["RUNNER_MODULES", "NotInstalled", "Runner", "load_runners", "require"]

RUNNER_MODULES = ("refpeft_self", "peft_torch", "bitsandbytes_cpu", "onnxruntime", "adapters_library")


class NotInstalled(Exception):
    """The peer a runner needs is not importable here."""


def load_runners(modules: tuple[str, ...] = RUNNER_MODULES) -> tuple[list[Runner], dict[str, str]]:
    """Every runner that can run here, and for each module that cannot, the reason."""
    runners, missing = [], {}
    for module in modules:
        try:
            runners.extend(importlib.import_module(f"refpeft_peers.{module}").implementations())
        except NotInstalled as exc:
            missing[module] = str(exc)
    return runners, missing


def require(*modules: str) -> None:
    """Raise NotInstalled unless every module imports."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken install (missing shared library) counts as not installed
            raise NotInstalled(f"{module} is not importable ({type(exc).__name__}: {exc})") from None
