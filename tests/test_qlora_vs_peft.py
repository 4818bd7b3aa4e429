"""Peer: refpeft's bfloat16 QLoRA against HF PEFT's LoRA on a bitsandbytes Linear4bit base (torch CPU).

The base is quantised by bitsandbytes; refpeft reads it through the state-dict layout, so both sides
multiply by the same 4-bit weight. The tolerance is derived, not guessed: both sides round at the
same points, so they can differ only through float32 summation order (|err| <= gamma_k |a||b| per
product, u = 2^-24), which may flip a bfloat16 rounding of the result (one ulp, <= 2^-7 |y|).
Each check reports its worst error as a fraction of that bound.
"""

from __future__ import annotations

import numpy as np
import pytest

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the conformance extra) provides the 4-bit base")
torch = pytest.importorskip("torch", reason="PEFT runs on torch")
peft = pytest.importorskip("peft", reason="HF PEFT is the peer under test")

from refpeft.backend import to_numpy  # noqa: E402
from refpeft.quant.bnb_layout import from_state_dict  # noqa: E402
from refpeft.methods.qlora import base_weight, qlora_backward, qlora_forward  # noqa: E402

U32 = 2.0**-24
BF16_ULP = 2.0**-7  # one bfloat16 ulp, relative to the value


def gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


class _Model(torch.nn.Module):
    def __init__(self, k: int, d: int, quant_type: str, loaded_in_4bit: bool = True):
        super().__init__()
        self.proj = bnb.nn.Linear4bit(k, d, bias=True, compute_dtype=torch.bfloat16, quant_type=quant_type,
                                      compress_statistics=True)
        self.is_loaded_in_4bit = loaded_in_4bit  # transformers sets it; PEFT then picks its bnb LoRA layer

    def forward(self, x):
        return self.proj(x)


def peft_qlora(k, d, r, alpha, quant_type, seed, loaded_in_4bit=True):
    torch.manual_seed(seed)
    model = _Model(k, d, quant_type, loaded_in_4bit)
    W = (torch.randn(d, k) * 0.05).to(torch.bfloat16)
    model.proj.weight = bnb.nn.Params4bit(W, requires_grad=False, quant_type=quant_type, compress_statistics=True,
                                          blocksize=64)
    model.proj.bias = torch.nn.Parameter(torch.randn(d).to(torch.bfloat16), requires_grad=False)
    model = model.to("cpu")  # bitsandbytes quantises here
    state_dict = {key: to_numpy(v) for key, v in model.proj.state_dict().items()}
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"],
                                                         lora_dropout=0.0))
    layer = wrapped.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(d, r) * 0.1)
    return wrapped, layer, state_dict


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("k,d,r,batch", [(128, 64, 4, (10,)), (256, 96, 8, (2, 5))])
def test_forward_and_backward_equal_peft_on_linear4bit(quant_type, k, d, r, batch):
    wrapped, layer, state_dict = peft_qlora(k, d, r, alpha=16, quant_type=quant_type, seed=k + d)
    assert type(layer).__module__ == "peft.tuners.lora.bnb"
    A_t, B_t = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x_t = torch.randn(*batch, k).to(torch.bfloat16).requires_grad_(True)
    dy_t = torch.randn(*batch, d).to(torch.bfloat16)
    y_t = wrapped(x_t)
    y_t.backward(dy_t)

    state = from_state_dict({key: v for key, v in state_dict.items() if key.startswith("weight")})
    bias = state_dict["bias"].astype(np.float32)
    x, dy = x_t.detach().float().numpy(), dy_t.float().numpy()
    A, B = A_t.detach().numpy(), B_t.detach().numpy()
    s = 16 / r
    y, cache = qlora_forward(x, state, A, B, scaling=s, bias=bias)
    grads = qlora_backward(dy, cache)

    W0 = base_weight(state).astype(np.float64)
    x2, g2 = x.reshape(-1, k).astype(np.float64), dy.reshape(-1, d).astype(np.float64)
    n = x2.shape[0]
    y_bound = BF16_ULP * np.abs(y_t.detach().float().numpy()).reshape(-1, d) + \
        2 * gamma(k + r) * (np.abs(x2) @ np.abs(W0).T + s * (np.abs(x2) @ np.abs(A).T) @ np.abs(B).T)
    dx_bound = BF16_ULP * np.abs(x_t.grad.float().numpy()).reshape(-1, k) + \
        2 * gamma(d + r) * (np.abs(g2) @ np.abs(W0) + s * (np.abs(g2) @ np.abs(B)) @ np.abs(A))
    xa_abs = np.abs(x2) @ np.abs(A).T
    dB_bound = 2 * gamma(n + k) * s * np.abs(g2).T @ xa_abs
    dA_bound = 2 * gamma(n + d) * s * (np.abs(g2) @ np.abs(B)).T @ np.abs(x2)

    def fraction(ours, theirs, bound):
        err = np.abs(np.asarray(ours, dtype=np.float64).reshape(bound.shape) - np.asarray(theirs, np.float64).reshape(bound.shape))
        return float(np.max(err / np.maximum(bound, np.finfo(np.float64).tiny)))

    assert fraction(y, y_t.detach().float().numpy(), y_bound) <= 1.0
    assert fraction(grads.dx, x_t.grad.float().numpy(), dx_bound) <= 1.0
    assert fraction(grads.dA, A_t.grad.numpy(), dA_bound) <= 1.0
    assert fraction(grads.dB, B_t.grad.numpy(), dB_bound) <= 1.0
    assert grads.dbias is None


def test_peft_generic_layer_rounds_once_where_the_bnb_layer_rounds_twice():
    """FINDINGS F-9: without `is_loaded_in_4bit` PEFT wraps Linear4bit in its generic Linear, which adds
    the float32 adapter output to the bf16 base before one rounding; its bnb layer rounds the adapter
    output to bf16 first. refpeft's "bfloat16" precision is the bnb layer's (what transformers users get)."""
    wrapped, layer, state_dict = peft_qlora(128, 64, 4, alpha=8, quant_type="nf4", seed=1, loaded_in_4bit=False)
    assert type(layer).__module__ == "peft.tuners.lora.layer"
    x_t = torch.randn(32, 128).to(torch.bfloat16)
    with torch.no_grad():
        y_generic = wrapped(x_t).float().numpy()
    state = from_state_dict({key: v for key, v in state_dict.items() if key.startswith("weight")})
    y, _ = qlora_forward(x_t.float().numpy(), state, layer.lora_A["default"].weight.detach().numpy(),
                         layer.lora_B["default"].weight.detach().numpy(), scaling=2.0,
                         bias=state_dict["bias"].astype(np.float32))
    differ = np.count_nonzero(y != y_generic)
    assert 0 < differ and np.max(np.abs(y - y_generic) / np.abs(y_generic).max()) <= BF16_ULP
