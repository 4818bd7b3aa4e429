"""Regular expressions from users' files and options, matched within a time bound.

adapter_config.json's target_modules, exclude_modules, rank_pattern and alpha_pattern, the
entries of modules_to_save and quantize's --include / --exclude are regular expressions refpeft
matches against module and tensor names. Python's `re` backtracks: a crafted pattern takes time
exponential in the name's length (`(a|aa)+$` doubles per character) and realistic ones with nested
quantifiers take seconds per name. So they are matched with the `regex` package, which has `re`'s
syntax and semantics (its default VERSION0), avoids most of that backtracking, and stops a match
after a timeout: a pattern that needs more than MATCH_SECONDS for one name is refused with a
ConfigError naming the pattern and the name. A pattern must also compile under `re`, so refpeft
accepts exactly the patterns PEFT (which uses `re`) accepts.
"""

from __future__ import annotations

import re
from functools import lru_cache

import regex

from refpeft.errors import ConfigError

MATCH_SECONDS = 0.5  # per name; a plain pattern matches a module path in microseconds
MODES = ("match", "fullmatch", "search")  # as re: from the start, the whole name, anywhere


def check_pattern(pattern: str, *, where: str) -> regex.Pattern:
    """`pattern` compiled; ConfigError naming `where` unless it is a valid regular expression for
    both `re` and `regex`."""
    try:
        return _compiled(pattern)
    except (re.error, regex.error) as exc:
        raise ConfigError(f"{where}: {pattern!r} is not a valid regular expression ({exc})") from None


def matches(pattern: str, name: str, *, mode: str, where: str) -> bool:
    """Whether `pattern` matches `name` (`mode` as re.match, re.fullmatch or re.search), within
    MATCH_SECONDS; ConfigError naming `where` if the pattern is invalid or needs longer."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    try:
        return getattr(check_pattern(pattern, where=where), mode)(name, timeout=MATCH_SECONDS) is not None
    except TimeoutError:
        raise ConfigError(f"{where}: the regular expression {pattern!r} took more than {MATCH_SECONDS} s to "
                          f"match {name!r} (catastrophic backtracking); simplify it") from None


@lru_cache(maxsize=512)
def _compiled(pattern: str) -> regex.Pattern:
    re.compile(pattern)  # PEFT compiles with re: refuse what it refuses
    return regex.compile(pattern)
