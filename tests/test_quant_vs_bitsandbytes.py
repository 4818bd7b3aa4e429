"""Peers: refpeft's 4-bit quantisation against bitsandbytes on CPU ("bnb-cpu") and ONNX Runtime ("bnb-cuda").

Byte identity of packed codes, bit identity of absmax, nested codes, nested absmax and the
dequantised values, on hypothesis-generated tensors (tests/quant_cases.py). Known peer
defects (conformance/FINDINGS.md) are asserted as such, not skipped.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the conformance extra) is the peer under test")
torch = pytest.importorskip("torch", reason="bitsandbytes needs torch")
F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes.functional holds the 4-bit API")

from refpeft.quant.blockwise import quantize_blockwise_4bit  # noqa: E402
from refpeft.quant.bnb_layout import from_state_dict, to_state_dict  # noqa: E402
from refpeft.quant.codebooks import NF4_CODE, dynamic_map, fp4_code  # noqa: E402
from refpeft.quant.double import NestedAbsmax, dequantize_absmax, quantize_absmax  # noqa: E402
from refpeft.quant.state import QuantState4bit, dequantize_4bit, quantize_4bit  # noqa: E402
from refpeft.quant.torch_sum import torch_cpu_mean  # noqa: E402
from tests.quant_cases import EXAMPLES, build, quant_cases  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bits(a) -> np.ndarray:
    """The raw bits of a float32 array, so that -0.0 != +0.0 and NaN == NaN."""
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def as_torch(x: np.ndarray, dtype: str):
    return torch.from_numpy(x).to(TORCH_DTYPES[dtype])


def avx512_dequant_defect(shape: tuple[int, ...], blocksize: int) -> bool:
    """bnb 0.50 CPU dequantize_4bit indexes absmax per row on its AVX-512 path (FINDINGS.md F-6)."""
    last = shape[-1]
    return (torch.backends.cpu.get_cpu_capability() == "AVX512" and len(shape) > 1 and last % 16 == 0
            and 16 <= blocksize < 2048 and last % blocksize != 0)


@SETTINGS
@given(case=quant_cases(), quant_type=st.sampled_from(["nf4", "fp4"]))
def test_packed_bytes_absmax_and_values_equal_bnb_cpu(case, quant_type):
    x = build(case)
    packed, absmax = quantize_blockwise_4bit(x, quant_type=quant_type, blocksize=case.blocksize, rounding="bnb-cpu")
    P, S = F.quantize_4bit(as_torch(x, case.dtype), blocksize=case.blocksize, quant_type=quant_type)
    assert packed.shape == tuple(P.shape) and np.array_equal(packed, P.numpy())
    assert np.array_equal(bits(absmax), bits(S.absmax.numpy()))
    if avx512_dequant_defect(case.shape, case.blocksize):
        return  # covered by test_bnb_cpu_avx512_dequantize_defect
    ours = dequantize_4bit(QuantState4bit(packed=packed, absmax=absmax, shape=case.shape, dtype=case.dtype,
                                          blocksize=case.blocksize, quant_type=quant_type))
    theirs = F.dequantize_4bit(P, S).float().numpy()
    # values only: bnb returns 1-D weights as (1, n) and transposes when n <= 2 (FINDINGS.md F-8)
    # == ignores the sign of zero: bnb's CPU paths disagree on FP4 code 8 (FINDINGS.md F-5)
    assert np.array_equal(np.asarray(ours, dtype=np.float32).ravel(), theirs.ravel())


@settings(max_examples=max(EXAMPLES, 1000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=quant_cases(blocksizes=(32, 64, 128), max_n=2**15))
def test_double_quantisation_equals_bnb_cpu(case):
    """Offset, nested codes, nested absmax and dequantised absmax all bit-identical: the offset is
    torch's float32 mean in torch's order (refpeft.quant.torch_sum; these absmaxes have < 32768
    entries, so torch's thread count plays no part)."""
    x = build(case)
    P, S = F.quantize_4bit(as_torch(x, case.dtype), blocksize=case.blocksize, quant_type="nf4",
                           compress_statistics=True)
    state = quantize_4bit(x, blocksize=case.blocksize, double_quant=True, rounding="bnb-cpu")
    nested = state.absmax
    offset = S.offset.item()
    if not np.isfinite(offset):  # bnb's float32 sum overflows for huge weights (FINDINGS F-12)
        _, absmax = quantize_blockwise_4bit(x, blocksize=case.blocksize, rounding="bnb-cpu")
        with np.errstate(over="ignore"):
            assert np.isfinite(nested.offset) and np.sum(absmax, dtype=np.float32) == np.inf
        return
    assert bits(nested.offset) == bits(offset)
    assert np.array_equal(nested.codes, S.absmax.numpy())
    assert np.array_equal(bits(nested.nested_absmax), bits(S.state2.absmax.numpy()))
    theirs = (F.dequantize_blockwise(S.absmax, S.state2) + S.offset).numpy()
    assert np.array_equal(bits(dequantize_absmax(nested)), bits(theirs))


def test_double_quantisation_offset_depends_on_torch_threads_past_32768_blocks():
    """FINDINGS F-7: with >= 32768 blocks torch splits absmax.mean() across its threads; refpeft's
    default is the one-thread order, and torch_cpu_mean(absmax, threads=T) matches a T-thread run."""
    x = build_weight((2048, 1024), "float32", seed=5)           # 65,536 blocks of 32
    _, absmax = quantize_blockwise_4bit(x, blocksize=32, rounding="bnb-cpu")
    offsets = {}
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            _, S = F.quantize_4bit(torch.from_numpy(x), blocksize=32, quant_type="nf4", compress_statistics=True)
        finally:
            torch.set_num_threads(before)
        offsets[threads] = S.offset.item()
        assert torch_cpu_mean(absmax, threads=threads) == offsets[threads]
    assert quantize_absmax(absmax, rounding="bnb-cpu").offset == offsets[1]


def test_nested_table_equals_bnb_cpu_on_a_fine_grid():
    """Every one of bnb's 65,536 LUT bins is hit: 2^20 + 1 evenly spaced values in [-1, 1]."""
    v = np.linspace(-1.0, 1.0, 2**20 + 1).astype(np.float32)
    q, state = F.quantize_blockwise(torch.from_numpy(v.copy()), blocksize=256)
    ours = quantize_absmax(v, rounding="bnb-cpu", offset=0.0)
    assert np.array_equal(ours.codes, q.numpy())
    assert np.array_equal(bits(ours.nested_absmax), bits(state.absmax.numpy()))


def test_codebooks_equal_bnb():
    assert np.array_equal(np.asarray(dynamic_map(), dtype=np.float32), F.create_dynamic_map().numpy())
    assert np.array_equal(np.asarray(NF4_CODE, dtype=np.float32), F.get_4bit_type("nf4", device="cpu").numpy())
    python_fp4 = F.get_4bit_type("fp4", device="cpu").numpy()
    assert np.array_equal(bits(fp4_code(negative_zero=False)), bits(python_fp4))
    assert np.array_equal(np.asarray(fp4_code(), dtype=np.float32), python_fp4)  # equal up to the zero's sign


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_state_dict_bytes_equal_bnb_and_load_both_ways(quant_type, double_quant, dtype):
    x = build_weight((96, 200), dtype)
    P, S = F.quantize_4bit(as_torch(x, dtype), blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    theirs = {f"weight.{k}": v.numpy() for k, v in S.as_dict(packed=True).items()} | {"weight": P.numpy()}
    weight = x.astype(np.float16) if dtype == "float16" else x  # bfloat16: emulated in float32
    state = quantize_4bit(weight, quant_type=quant_type, blocksize=64, double_quant=double_quant,
                          rounding="bnb-cpu", dtype=dtype)
    ours = to_state_dict(state)
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        assert ours[key].tobytes() == theirs[key].tobytes(), key
    # bitsandbytes reads ours ...
    qs = F.QuantState.from_dict({k[len("weight."):]: torch.from_numpy(v) for k, v in ours.items() if k != "weight"},
                                device=torch.device("cpu"))
    from_bnb = F.dequantize_4bit(torch.from_numpy(ours["weight"]), qs).float().numpy()
    # ... and refpeft reads theirs
    from_refpeft = np.asarray(dequantize_4bit(from_state_dict(theirs)), dtype=np.float32)
    assert np.array_equal(from_bnb, from_refpeft)


def build_weight(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return torch.from_numpy(x).to(TORCH_DTYPES[dtype]).float().numpy()


def test_quant_state_record_is_bnb_json():
    x = build_weight((128, 320), "bfloat16")
    P, S = F.quantize_4bit(as_torch(x, "bfloat16"), blocksize=64, quant_type="nf4", compress_statistics=True)
    record = json.loads(bytes(S.as_dict(packed=True)["quant_state.bitsandbytes__nf4"].numpy()).decode())
    assert list(record) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                            "nested_offset"]


def test_bnb_cpu_avx512_dequantize_defect():
    """FINDINGS.md F-6: wrong values whenever shape[-1] % blocksize != 0 on the AVX-512 path."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the defect lives in bitsandbytes' AVX-512 code path; this CPU has none")
    x = build_weight((256, 320), "float32")
    P, S = F.quantize_4bit(torch.from_numpy(x), blocksize=128, quant_type="nf4")
    theirs = F.dequantize_4bit(P, S).numpy()
    ours = np.asarray(dequantize_4bit(quantize_4bit(x, blocksize=128, rounding="bnb-cpu")))
    assert np.max(np.abs(ours - x)) < 0.5          # refpeft: within the quantisation error
    assert np.max(np.abs(theirs - ours)) > 1.0     # bnb: blocks scaled by other blocks' absmax


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_fp4_cpu_sign_of_tiny_values_is_reversed_from_cuda(quant_type):
    """FINDINGS.md F-3: |xn| <= 1/384 takes the opposite FP4 sign bit on bnb 0.50 CPU."""
    x = np.array([1.0, -0.001, 0.001, 0.0] * 8, dtype=np.float32)
    P, _ = F.quantize_4bit(torch.from_numpy(x), blocksize=32, quant_type=quant_type)
    cpu, _ = quantize_blockwise_4bit(x, quant_type=quant_type, blocksize=32, rounding="bnb-cpu")
    cuda, _ = quantize_blockwise_4bit(x, quant_type=quant_type, blocksize=32, rounding="bnb-cuda")
    assert np.array_equal(cpu, P.numpy())
    if quant_type == "fp4":
        assert list(cpu[:2, 0]) == [0x30, 0x80] and list(cuda[:2, 0]) == [0x38, 0x00]
    else:
        assert np.array_equal(cpu, cuda)


# ONNX Runtime's bnb4 quantizer: the CUDA decision trees compiled for the CPU.
@SETTINGS
@given(case=quant_cases(blocksizes=(32, 64, 128, 256), max_n=2**14),
       quant_type=st.sampled_from(["nf4", "fp4"]))
def test_bnb_cuda_equals_onnxruntime_except_all_zero_blocks(case, quant_type):
    ort = pytest.importorskip("onnxruntime.capi._pybind_state", reason="ONNX Runtime is the CUDA-semantics oracle")
    x = build(case)
    n = x.size
    dst = np.zeros((n + 1) // 2, dtype=np.uint8)
    absmax_ort = np.zeros(-(-n // case.blocksize), dtype=np.float32)
    ort.quantize_matmul_bnb4(dst, np.ascontiguousarray(x.reshape(1, n)), absmax_ort, case.blocksize,
                             {"fp4": 0, "nf4": 1}[quant_type], 1, n)
    packed, absmax = quantize_blockwise_4bit(x, quant_type=quant_type, blocksize=case.blocksize)
    assert np.array_equal(bits(absmax), bits(absmax_ort))
    zero_block = np.repeat(absmax == 0, case.blocksize)[: n + n % 2].reshape(-1, 2)[:, 0]
    # odd n: ONNX Runtime quantises the missing partner as a literal 0.0, CUDA as 0.0 * (1/absmax),
    # which is NaN (code 0) when 1/absmax overflows (absmax <= 2^-128): FINDINGS F-2
    partner = np.zeros_like(zero_block)
    partner[-1] = n % 2 == 1 and 0 < absmax[-1] <= 2.0**-128
    same = ~zero_block & ~partner
    assert np.array_equal(packed[same, 0], dst[same])
    # all-zero blocks: CUDA's 0 * inf = NaN gives code 0; ONNX Runtime multiplies by 0 instead
    assert np.all(packed[zero_block, 0] == 0)
    assert np.all(dst[zero_block] == (0x77 if quant_type == "nf4" else 0x00))
    if partner[-1]:
        assert packed[-1, 0] & 15 == 0 and dst[-1] & 15 == (7 if quant_type == "nf4" else 0)
        assert packed[-1, 0] >> 4 == dst[-1] >> 4


def test_dynamic_map_sha256():
    data = np.asarray(dynamic_map(), dtype="<f4").tobytes()
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(F.create_dynamic_map().numpy().astype("<f4").tobytes()).hexdigest()


def test_nested_state_from_bnb_dequantises_identically():
    x = build_weight((64, 4096), "float32", seed=3)
    P, S = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4", compress_statistics=True)
    state = QuantState4bit(packed=P.numpy(), absmax=NestedAbsmax(codes=S.absmax.numpy(),
                                                                 nested_absmax=S.state2.absmax.numpy(),
                                                                 offset=S.offset.item()),
                           shape=(64, 4096), dtype="float32", blocksize=64, quant_type="nf4")
    assert np.array_equal(bits(dequantize_4bit(state)), bits(F.dequantize_4bit(P, S).numpy()))
