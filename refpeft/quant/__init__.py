"""4-bit quantisation as bitsandbytes does it: NF4/FP4 codebooks, blockwise codes and packing, double
quantisation of the absmax, and the state-dict layout bitsandbytes and transformers read and write.

    codebooks   the 16-value tables, their decision thresholds, the 8-bit dynamic map
    blockwise   quantize_blockwise_4bit / dequantize_blockwise_4bit (codes, absmax, packing)
    double      quantize_absmax / dequantize_absmax (the nested 8-bit absmax)
    state       QuantState4bit, quantize_4bit / dequantize_4bit (a whole weight)
    chunked     quantize_4bit_chunked / quantization_error (a weight a few blocks at a time)
    bnb_layout  to_state_dict / from_state_dict, save_quantized / load_quantized (safetensors)
    torch_sum   torch_cpu_mean: torch's CPU float32 mean in its own order (bnb-cpu's offset)
    torchao_nf4 quantize_nf4_torchao / dequantize_nf4_torchao (torchao's NF4Tensor)

`rounding="bnb-cuda"` (default) reproduces bitsandbytes' CUDA kernels, `rounding="bnb-cpu"` its
0.50 CPU code; docs/quantization.md lists where the two differ.
"""

from refpeft.quant.bnb_layout import from_state_dict, load_quantized, save_quantized, to_state_dict
from refpeft.quant.blockwise import dequantize_blockwise_4bit, quantize_blockwise_4bit
from refpeft.quant.double import NestedAbsmax, dequantize_absmax, quantize_absmax
from refpeft.quant.state import QuantState4bit, bits_per_parameter, dequantize_4bit, quantize_4bit

__all__ = [
    "NestedAbsmax",
    "QuantState4bit",
    "bits_per_parameter",
    "dequantize_4bit",
    "dequantize_absmax",
    "dequantize_blockwise_4bit",
    "from_state_dict",
    "load_quantized",
    "quantize_4bit",
    "quantize_absmax",
    "quantize_blockwise_4bit",
    "save_quantized",
    "to_state_dict",
]
