"""refpeft's own exception types: every bad input is refused at the boundary with one of these.

Each class also derives from the built-in exception a Python user would expect (`ValueError`,
`TypeError`), so `except ValueError` keeps working, while `except RefpeftError` catches them all.
"""


class RefpeftError(Exception):
    """Base class of every error refpeft raises on purpose."""


class ShapeError(RefpeftError, ValueError):
    """An array has the wrong number of dimensions or a size that disagrees with another array."""


class RankError(RefpeftError, ValueError):
    """An adapter rank is not a positive integer, or exceeds min(d, k)."""


class DTypeError(RefpeftError, TypeError):
    """An array has a dtype refpeft does not compute in (integers, bools, complex, unknown names)."""


class NonFiniteError(RefpeftError, ValueError):
    """An input holds NaN or infinity."""


class NamespaceError(RefpeftError, TypeError):
    """Arrays from two different array libraries were mixed, or an object is not an array."""


class ConfigError(RefpeftError, ValueError):
    """A hyper-parameter or option is out of range or unsupported."""


class FormatError(RefpeftError, ValueError):
    """A file is missing, truncated, corrupt, or disagrees with its own metadata."""


class InputError(RefpeftError, ValueError):
    """An input's values are outside their domain: a token id outside the vocabulary, a label that is
    neither a class index nor the ignore index, an attention mask holding values other than 0 and 1."""


class OutputError(RefpeftError, OSError):
    """An output cannot be written: its path is a folder or lies under a file, the file system
    refuses it (read-only, full), another run is writing it, or it would replace an input."""
