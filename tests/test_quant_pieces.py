"""Blockwise 4-bit quantisation a piece at a time (refpeft.quant.blockwise.PIECE) gives the whole weight's bytes.

The definition and peer tests run again here with pieces of 4096 elements (the smallest piece
holding whole blocks of every block size), so that their weights span many pieces, cut at every
place a block, an odd element or a partial last block can fall; then every backend on a weight of
several pieces, and one weight larger than the real PIECE, against bitsandbytes.
"""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.backend import to_numpy
from refpeft.quant import blockwise
from refpeft.quant.state import dequantize_4bit, quantize_4bit
from tests.support import BACKEND_IDS, BACKENDS
from tests.test_quant_blockwise import (  # noqa: F401  (collected again here, under small pieces)
    test_codes_follow_the_threshold_definition,
    test_round_trip_error_is_within_half_the_widest_gap,
)
from tests.test_quant_vs_bitsandbytes import (  # noqa: F401
    F,
    bits,
    test_bnb_cuda_equals_onnxruntime_except_all_zero_blocks,
    test_packed_bytes_absmax_and_values_equal_bnb_cpu,
    torch,
)

PIECE = blockwise.PIECE
SMALL_PIECE = 4096


@pytest.fixture(autouse=True, scope="module")
def small_pieces():
    """Every test here sees PIECE = 4096 (module scope: hypothesis refuses function-scoped fixtures)."""
    assert SMALL_PIECE % max(blockwise.BLOCKSIZES) == 0 and SMALL_PIECE < PIECE
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blockwise, "PIECE", SMALL_PIECE)
        yield


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_every_backend_quantises_in_pieces_to_bitsandbytes_bytes(backend, quant_type):
    """Three pieces and a bit: an odd count, a partial last block, all-zero blocks either side of a cut."""
    x = np.random.default_rng(3).standard_normal(3 * SMALL_PIECE + 101).astype(np.float32)
    x[SMALL_PIECE - 64:SMALL_PIECE + 64] = 0.0
    state = quantize_4bit(backend(x), quant_type=quant_type, rounding="bnb-cpu")
    P, S = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type=quant_type)
    assert np.array_equal(to_numpy(state.packed), P.numpy())
    assert np.array_equal(bits(to_numpy(state.absmax)), bits(S.absmax.numpy()))
    # == ignores the sign of zero: bnb's CPU paths disagree on FP4 code 8 (FINDINGS.md F-5)
    assert np.array_equal(to_numpy(dequantize_4bit(state)), F.dequantize_4bit(P, S).numpy().ravel())


def test_a_weight_larger_than_a_real_piece_equals_bitsandbytes():
    """The real PIECE: float16 cast to float32 piece by piece, two cuts, an odd count."""
    x = np.random.default_rng(4).standard_normal(2 * PIECE + 77).astype(np.float16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blockwise, "PIECE", PIECE)
        for quant_type in ("nf4", "fp4"):
            state = quantize_4bit(x, quant_type=quant_type, rounding="bnb-cpu")
            P, S = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type=quant_type)
            assert np.array_equal(state.packed, P.numpy())
            assert np.array_equal(bits(state.absmax), bits(S.absmax.numpy()))
            theirs = F.dequantize_4bit(P, S).numpy().ravel()
            assert np.array_equal(dequantize_4bit(state), theirs)
