"""QLoRA on the whole model: every projection stored as bitsandbytes' NF4 (double quantised), adapters on top.

Specifications:
- The 4-bit model computes exactly what the same model computes with each projection's weight
  replaced by its dequantised bfloat16 values (refpeft.methods.qlora's "float64" precision), with
  and without an adapter, and its adapter gradients are the same.
- The stored state is what refpeft.methods.qlora.quantize_base makes (bitsandbytes' bytes, checked
  per layer against bitsandbytes in tests/test_quant_vs_bitsandbytes.py).
- Adapter gradients through the 4-bit model match finite differences; a 4-bit base cannot be
  fine-tuned in full (a clear error).
"""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.adapter import Adapter
from refpeft.errors import ConfigError
from refpeft.methods.qlora import base_weight
from refpeft.model.config import config_from_dict
from refpeft.model.decoder import Model, backward, forward, loss_and_gradients, quantize_linear_layers
from refpeft.model.weights import expected_shapes
from refpeft.quant.state import QuantState4bit
from refpeft.train.adapters import new_adapter
from tests.support import vjp_check

CONFIG = config_from_dict({"model_type": "qwen2", "vocab_size": 29, "hidden_size": 64, "intermediate_size": 128,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                           "max_position_embeddings": 32, "tie_word_embeddings": False, "use_sliding_window": False})


def base_model() -> Model:
    rng = np.random.default_rng(0)
    weights = {n: (1.0 + 0.1 * rng.standard_normal(s)) if n.endswith("norm.weight") else 0.2 * rng.standard_normal(s)
               for n, s in expected_shapes(CONFIG).items()}
    return Model(CONFIG, weights)


def dequantised(model: Model) -> Model:
    weights = {n: np.asarray(base_weight(w, precision="float64")) if isinstance(w, QuantState4bit) else w
               for n, w in model.weights.items()}
    return Model(model.config, weights, model.adapter)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_four_bit_model_is_the_model_on_its_dequantised_weights(method):
    q = quantize_linear_layers(base_model())
    stored = [w for w in q.weights.values() if isinstance(w, QuantState4bit)]
    assert len(stored) == 7 * CONFIG.num_hidden_layers and all(w.nested for w in stored)
    q = Model(q.config, q.weights, new_adapter(dequantised(q), method=method, targets="all-linear", rank=4))
    rng = np.random.default_rng(1)
    trained = Adapter({p: m.replace(B=rng.standard_normal(m.B.shape)) for p, m in q.adapter.modules.items()})
    q = Model(q.config, q.weights, trained)
    ids = rng.integers(0, CONFIG.vocab_size, size=(2, 7))
    loss_q, logits_q, grads_q = loss_and_gradients(q, ids, ids)
    loss_d, logits_d, grads_d = loss_and_gradients(dequantised(q), ids, ids)
    assert np.array_equal(logits_q, logits_d) and float(loss_q) == float(loss_d)
    assert grads_q.keys() == grads_d.keys() and all(np.array_equal(grads_q[k], grads_d[k]) for k in grads_q)
    assert not np.allclose(logits_q, forward(Model(CONFIG, base_model().weights, trained), ids)[0])  # 4 bits differ


def test_adapter_gradients_through_the_four_bit_model_match_finite_differences():
    q = quantize_linear_layers(base_model())
    adapter = new_adapter(dequantised(q), method="lora", targets=["v_proj"], rank=2)
    rng = np.random.default_rng(2)
    path = next(iter(adapter.modules))
    module = adapter.modules[path].replace(B=rng.standard_normal(adapter.modules[path].B.shape))
    ids = rng.integers(0, CONFIG.vocab_size, size=(1, 5))
    dy = rng.standard_normal((1, 5, CONFIG.vocab_size))

    def run(A, B):
        model = Model(q.config, q.weights, Adapter({path: module.replace(A=A, B=B)}))
        return model, forward(model, ids)

    model, (logits, tape, _) = run(module.A, module.B)
    g = backward(model, dy, tape)
    vjp_check(lambda A, B: run(A, B)[1][0], {"A": module.A, "B": module.B},
              {"A": g[f"{path}.A"], "B": g[f"{path}.B"]}, dy)


def test_a_four_bit_base_is_not_fine_tuned_in_full():
    q = quantize_linear_layers(base_model())
    with pytest.raises(ConfigError, match="stored in 4 bits"):
        forward(q, np.zeros((1, 3), dtype=np.int64), train_base=True)
