"""The backend layer: namespaces, the dtype policy, boundary checks, NumPy conversion."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from refpeft.backend import (
    UNIT_ROUNDOFF,
    dtype_name,
    float_dtype,
    namespace,
    numpy_namespace,
    require_finite,
    round_to,
    to_numpy,
)
from refpeft.errors import DTypeError, NamespaceError, NonFiniteError
from support import BACKENDS, BACKEND_IDS


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_round_trip_through_numpy(backend):
    a = np.arange(6.0).reshape(2, 3)
    x = backend(a)
    xp = namespace(x)
    assert dtype_name(x.dtype, xp=xp) == "float64"
    np.testing.assert_array_equal(to_numpy(x), a)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_bfloat16_rounding_is_round_to_nearest_even(backend):
    values = np.array([1.0, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-9, -3.14159, 1e-3], dtype=np.float32)
    x = backend(values)
    rounded = to_numpy(round_to(x, "bfloat16", xp=namespace(x)))
    np.testing.assert_array_equal(rounded, values.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert rounded[1] == 1.0 and rounded[2] == 1.0 + 2.0**-6  # ties to even, both ways


def test_unit_roundoff_matches_the_formats():
    for name in ("float64", "float32", "float16"):
        assert UNIT_ROUNDOFF[name] == float(np.finfo(name).eps) / 2
    assert UNIT_ROUNDOFF["bfloat16"] == float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps) / 2


def test_refusals_name_the_problem():
    xp = numpy_namespace()
    with pytest.raises(DTypeError, match="unknown float format 'float8'"):
        float_dtype("float8", xp=xp)
    with pytest.raises(NamespaceError, match="expected an array, got list"):
        namespace([1.0, 2.0])
    with pytest.raises(NonFiniteError, match="w holds 2 non-finite"):
        require_finite("w", np.array([np.inf, 0.0, np.nan]), xp=xp)
    with pytest.raises(DTypeError, match="not a floating dtype"):
        dtype_name(np.dtype(np.int32), xp=xp)
