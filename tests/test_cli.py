"""refpeft.cli: --version, help with no command, argparse's exit 2 for an unknown command, errors as exit 2."""

from __future__ import annotations

import pytest

from refpeft import __version__
from refpeft.cli import COMMANDS, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"refpeft {__version__}"


def test_no_command_prints_help_listing_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: refpeft")
    for name in COMMANDS:
        assert name.replace("_", "-") in out


def test_an_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-command"])
    assert exit_.value.code == 2
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err


def test_a_refpeft_error_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refpeft inspect: error:") and "missing.safetensors" in err
    assert "Traceback" not in err
