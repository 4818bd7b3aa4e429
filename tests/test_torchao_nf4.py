"""Peer: refpeft.quant.torchao_nf4 against torchao 0.18's NF4Tensor on CPU, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from refpeft.errors import ShapeError
from refpeft.quant.blockwise import quantize_blockwise_4bit
from refpeft.quant.codebooks import NF4_CODE, TORCHAO_NF4_CODE
from refpeft.quant.torchao_nf4 import dequantize_nf4_torchao, quantize_nf4_torchao
from tests.quant_cases import EXAMPLES, build, torchao_cases

torch = pytest.importorskip("torch", reason="torchao needs torch")
nf4_tensor = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor",
                                 reason="torchao (0.18) is the peer under test")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bits(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.uint32)


@settings(max_examples=max(EXAMPLES, 1000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=torchao_cases())
def test_bytes_and_values_equal_torchao(drawn):
    case, scaler_block_size = drawn
    x = build(case)
    with torch.no_grad():
        theirs = nf4_tensor.to_nf4(torch.from_numpy(x).to(TORCH_DTYPES[case.dtype]), case.blocksize, scaler_block_size)
        weight = theirs.get_original_weight().float().numpy()
    ours = quantize_nf4_torchao(x, block_size=case.blocksize, scaler_block_size=scaler_block_size, dtype=case.dtype)
    assert np.array_equal(ours.quantized_data, theirs.quantized_data.numpy())
    assert np.array_equal(ours.quantized_scalers, theirs.quantized_scalers.numpy())
    assert np.array_equal(bits(ours.quantization_factor), bits(theirs.quantization_factor.float().numpy()))
    assert bits(ours.scaler_mean) == bits(theirs.scaler_mean.float().item())
    assert np.array_equal(bits(dequantize_nf4_torchao(ours)), bits(weight))  # NaN == NaN, -0 != +0


def test_table_is_nf4_to_four_decimals_and_matches_torchao():
    assert np.allclose(TORCHAO_NF4_CODE, NF4_CODE, atol=5e-5, rtol=0) and TORCHAO_NF4_CODE != NF4_CODE
    theirs = nf4_tensor.to_nf4(torch.ones(64 * 256, dtype=torch.float32)).nf4.numpy()
    assert np.array_equal(theirs, np.asarray(TORCHAO_NF4_CODE, dtype=np.float32))


def test_argmin_rounding_differs_from_bitsandbytes_thresholds():
    """Between torchao's midpoint (0.50165) and bitsandbytes' (0.5016634) the two NF4s part ways."""
    x = np.zeros(64 * 256, dtype=np.float32)
    x[0], x[1] = 1.0, 0.501655
    ours = quantize_nf4_torchao(x)
    packed, _ = quantize_blockwise_4bit(x, blocksize=64)
    assert ours.quantized_data[0] == 0xFD and packed[0, 0] == 0xFC  # code 13 (torchao) vs 12 (bnb)


def test_refuses_shapes_torchao_refuses():
    with pytest.raises(ShapeError, match="block_size"):
        quantize_nf4_torchao(np.ones(64 * 255, dtype=np.float32))
    with pytest.raises(ShapeError, match=r"\(2, 2, 4096\)"):
        quantize_nf4_torchao(np.ones((2, 2, 4096), dtype=np.float32))
