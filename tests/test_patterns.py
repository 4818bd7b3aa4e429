"""refpeft.patterns: users' regular expressions matched within a time bound.

Specification: a pattern matches as Python's `re` does (match, fullmatch, search); an invalid one
is a ConfigError naming where it came from; a pattern that backtracks catastrophically is refused
with a ConfigError within a small multiple of MATCH_SECONDS instead of running for minutes (with
`re`, `(a|aa)+$` on 60 a's and a b takes about 2^42 steps). The config readers and quantize use it.
"""

from __future__ import annotations

import re
import time

import pytest

from refpeft.errors import ConfigError
from refpeft.patterns import MATCH_SECONDS, check_pattern, matches
from refpeft.peft_config import pattern_value, targets

CATASTROPHIC = r"(a|aa)+$"
SLOW_NAME = "a" * 60 + "b"


@pytest.mark.parametrize("mode", ["match", "fullmatch", "search"])
@pytest.mark.parametrize("pattern, name", [(r"q_proj", "layers.0.q_proj"), (r".*\.(q|v)_proj", "layers.0.v_proj"),
                                           (r"layers\.0\..*", "layers.0.k_proj"), (r"(.*\.)?(q_proj)$", "q_proj"),
                                           (r"^lm_head", "model.lm_head")])
def test_matches_as_re_does(mode, pattern, name):
    assert matches(pattern, name, mode=mode, where="test") == (getattr(re, mode)(pattern, name) is not None)


def test_an_invalid_pattern_is_a_config_error_naming_its_source():
    with pytest.raises(ConfigError, match=r"quantize --include: '\(' is not a valid regular expression"):
        check_pattern("(", where="quantize --include")


def test_a_catastrophic_pattern_is_refused_in_bounded_time():
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="target_modules.*took more than"):
        matches(CATASTROPHIC, SLOW_NAME, mode="fullmatch", where="target_modules")
    assert time.perf_counter() - start < 10 * MATCH_SECONDS


@pytest.mark.parametrize("config", [{"target_modules": CATASTROPHIC}, {"exclude_modules": CATASTROPHIC},
                                    {"modules_to_save": [CATASTROPHIC]}])
def test_config_targets_refuse_a_catastrophic_pattern(config):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="took more than"):
        targets(config, SLOW_NAME)
    assert time.perf_counter() - start < 10 * MATCH_SECONDS


def test_rank_and_alpha_patterns_refuse_a_catastrophic_key():
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="took more than"):
        pattern_value({CATASTROPHIC: 4}, SLOW_NAME, 8)
    assert time.perf_counter() - start < 10 * MATCH_SECONDS
