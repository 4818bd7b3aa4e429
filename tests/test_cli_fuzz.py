"""A fuzz test of the command line (hypothesis, bounded): every verb over good, broken and hostile inputs.

For each drawn command line, `refpeft.cli.main` must end with status 0, 1 or 2 (argparse's usage
errors exit 2 too) and raise nothing else; take less than TIME_LIMIT seconds; leave every input
byte for byte as it was; leave no temporary file behind; and on a non-zero status write no output.
FUZZ_EXAMPLES raises the number of command lines for a longer local run.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.cli import main
from refpeft.io import write_safetensors
from refpeft.peft_format import write_peft_adapter

TIME_LIMIT = 60.0
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, Path]:
    return make_pool(tmp_path_factory.mktemp("fuzz"))


def make_pool(root: Path) -> dict[str, Path]:
    """Inputs of every kind in `root`: valid, truncated, garbage, empty, a folder, missing, hostile JSON."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 6)).astype(np.float32)
    write_safetensors(root / "base.safetensors", {"layer.weight": W, "layer.bias": np.zeros(8, np.float32)})
    adapter = Adapter({"layer": ModuleAdapter("lora", {"A": rng.standard_normal((2, 6)), "B": rng.standard_normal((8, 2))},
                                              alpha=4.0)})
    write_peft_adapter(root / "adapter", adapter)
    write_peft_adapter(root / "adapter2", adapter)
    data = (root / "base.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "garbage.bin").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (root / "empty").write_bytes(b"")
    (root / "folder").mkdir()
    hostile = root / "hostile"
    hostile.mkdir()
    (hostile / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 1e999, "target_modules": "(a+)+$", '
                                                 '"lora_alpha": ' + "[" * 5000 + "]" * 5000 + "}")
    (hostile / "adapter_model.safetensors").write_bytes(data)
    return {"base": root / "base.safetensors", "adapter": root / "adapter", "adapter2": root / "adapter2",
            "truncated": root / "truncated.safetensors", "garbage": root / "garbage.bin", "empty": root / "empty",
            "folder": root / "folder", "hostile": hostile, "missing": root / "missing", "root": root}


BROKEN = ["truncated", "garbage", "empty", "folder", "hostile", "missing"]
ADAPTERS = st.sampled_from(["adapter"] * 4 + ["adapter2"] * 2 + ["base"] + BROKEN)     # mostly valid, often not
BASES = st.sampled_from(["base"] * 5 + ["adapter"] + BROKEN)
NUMBERS = st.one_of(st.integers(-10, 300), st.sampled_from(["-1", "0", "1e400", "nan", "inf", "x", "99999999999999"]))


@st.composite
def command_lines(draw) -> list[str]:
    """A verb with file slots (names in the pool) and option values, some valid, many not."""
    verb = draw(st.sampled_from(["inspect", "merge", "quantize", "export", "export-adapter", "fuse", "memory",
                                 "conformance", "generate", "attach"]))
    a = lambda: "{" + draw(ADAPTERS) + "}"  # noqa: E731
    b = lambda: "{" + draw(BASES) + "}"  # noqa: E731
    n = lambda: str(draw(NUMBERS))  # noqa: E731
    small = lambda: str(draw(st.one_of(st.integers(1, 64), st.sampled_from(["0", "-4", "x", "1e400"]))))  # noqa: E731
    lines = {
        "inspect": [a(), *draw(st.sampled_from([[], ["--spectrum"], ["--base", b()]]))],
        "merge": [a(), "--base", b(), "-o", "{out}.safetensors"],
        "quantize": [b(), "-o", "{out}.safetensors", "--blocksize", draw(st.sampled_from(["64", "32", n()])),
                     *draw(st.sampled_from([[], ["--double-quant"], ["--include", "("], ["--include", "layer"]]))],
        "export": [a(), "--base", b(), "-o", "{out}.onnx", *draw(st.sampled_from([[], ["--unmerged"], ["--dtype", "float16"],
                                                                                  ["--nf4", "--blocksize", n()]]))],
        "export-adapter": [a(), "--base", b(), "-o", "{out}.onnx_adapter"],
        "fuse": [a(), a(), "--weights", n(), n(), "-o", "{out}", "--combination",
                 draw(st.sampled_from(["linear", "cat", "svd", "ties", "nonsense"]))],
        "memory": ["--hidden", small(), "--intermediate", small(), "--layers", small(), "--vocab", small(),
                   "--rank", small()],
        "conformance": ["check", "--vectors", "{" + draw(st.sampled_from(BROKEN)) + "}", "--impl",
                        draw(st.sampled_from(["refpeft_no_such_module:run", "os.path:join", "x"]))],
        "generate": [b(), "--prompt", draw(st.text(max_size=20)), "--max-new-tokens", n()],
        "attach": [b(), a(), "--base", b(), "-o", "{out}"],
    }
    return [verb, *lines[verb]]


def _snapshot(pool: dict[str, Path]) -> dict[str, str]:
    digest = {}
    for path in pool["root"].rglob("*"):
        if path.is_file():
            digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])
@given(line=command_lines())
def test_no_command_line_raises_hangs_destroys_or_leaves_debris(pool, tmp_path_factory, line, capsys):
    out = tmp_path_factory.mktemp("out") / "result"
    argv = [a.format(out=out, **{k: v for k, v in pool.items() if k != "root"}) for a in line]
    before = _snapshot(pool)
    started = time.perf_counter()
    try:
        status = main(argv)
    except SystemExit as exc:                                 # argparse: --help, usage errors
        status = exc.code if isinstance(exc.code, int) else 2
    elapsed = time.perf_counter() - started
    capsys.readouterr()
    assert status in (0, 1, 2), (argv, status)
    assert elapsed < TIME_LIMIT, (argv, elapsed)
    assert _snapshot(pool) == before, argv                   # no input changed
    debris = [p.name for p in out.parent.rglob("*") if ".tmp" in p.name or ".refpeft-" in p.name]
    assert debris == [], (argv, debris)
    if status != 0:
        assert not any(out.parent.iterdir()), (argv, sorted(p.name for p in out.parent.iterdir()))
