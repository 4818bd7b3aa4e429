"""`refpeft memory --method prompt|p-tuning|prefix|trainable-tokens`: the trainable parameters it counts are
the ones PEFT makes trainable (get_nb_trainable_parameters) for the same config on a tiny Llama, and the
formulas of docs/memory.md; the bytes follow from the count."""

from __future__ import annotations

import pytest

from refpeft.cli import main
from refpeft.errors import ConfigError
from refpeft.memory import ADAM_STATE_BYTES, ModelShape, token_method_row
from refpeft.model.config import config_from_dict
from refpeft.model.p_tuning import p_tuning_init
from refpeft.model.prefix_tuning import prefix_init

# GQA with a head_dim that is not hidden / heads: PEFT's prefix token_dim is kv_heads x head_dim = 24, not 32.
LLAMA = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=12, max_position_embeddings=64, tie_word_embeddings=False)
DIMS = ["--hidden", "32", "--intermediate", "48", "--layers", "3", "--vocab", "61", "--kv", "24"]

CASES = {  # name -> (PEFT config factory arguments, refpeft memory options)
    "prompt": (("PromptTuningConfig", dict(num_virtual_tokens=5)), ["--method", "prompt", "--virtual-tokens", "5"]),
    "p-tuning-mlp": (("PromptEncoderConfig", dict(num_virtual_tokens=4)),
                     ["--method", "p-tuning", "--virtual-tokens", "4"]),
    "p-tuning-mlp-wide": (("PromptEncoderConfig", dict(num_virtual_tokens=4, encoder_hidden_size=20)),
                          ["--method", "p-tuning", "--virtual-tokens", "4", "--encoder-hidden", "20"]),
    "p-tuning-lstm": (("PromptEncoderConfig", dict(num_virtual_tokens=3, encoder_reparameterization_type="LSTM",
                                                   encoder_hidden_size=10, encoder_num_layers=3)),
                      ["--method", "p-tuning", "--virtual-tokens", "3", "--encoder", "lstm", "--encoder-hidden", "10",
                       "--encoder-layers", "3"]),
    "prefix": (("PrefixTuningConfig", dict(num_virtual_tokens=6)), ["--method", "prefix", "--virtual-tokens", "6"]),
    "prefix-projection": (("PrefixTuningConfig", dict(num_virtual_tokens=6, prefix_projection=True,
                                                      encoder_hidden_size=14)),
                          ["--method", "prefix", "--virtual-tokens", "6", "--projection", "--encoder-hidden", "14"]),
    "trainable-tokens": (("TrainableTokensConfig", dict(token_indices=[1, 5, 9, 30], target_modules=["embed_tokens"])),
                         ["--method", "trainable-tokens", "--tokens", "4"]),
}


def _cli_trainable(capsys, options) -> int:
    assert main(["memory", *DIMS, *options]) == 0
    last = capsys.readouterr().out.splitlines()[-2]          # the --method row, above the footnote
    return int(last.split()[-1].replace(",", ""))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_the_count_is_what_peft_trains(capsys, name, tied):
    pytest.importorskip("torch", reason="PEFT on torch is the peer")
    peft = pytest.importorskip("peft")
    from tests.peft_peers import tiny_llama

    (factory, kwargs), options = CASES[name]
    config = getattr(peft, factory)(task_type="CAUSAL_LM", **kwargs)
    model = peft.get_peft_model(tiny_llama({**LLAMA, "tie_word_embeddings": tied}), config)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert _cli_trainable(capsys, options + (["--tied-embeddings"] if tied else [])) == trainable


def test_the_documented_formulas():
    shape = ModelShape(hidden=32, intermediate=48, layers=3, vocab=61, kv=24)
    h, L, t, k = 32, 3, 24, 5

    def count(method, **options):
        return token_method_row(shape, method, tokens=k, **options).trainable

    assert count("prompt") == k * h
    assert count("trainable-tokens") == k * h
    assert count("prefix") == L * k * 2 * t
    e = 7
    assert count("prefix", projection=True, encoder_hidden_size=e) == k * t + t * e + e + e * L * 2 * t + L * 2 * t
    assert count("p-tuning", encoder_hidden_size=e) == k * h + (h * e + e) + (e * e + e) + (e * h + h)
    lstm = 2 * (4 * e * (h + e) + 8 * e) + 2 * (4 * e * (2 * e + e) + 8 * e)       # two bidirectional layers
    mlp = (2 * e * 2 * e + 2 * e) + (2 * e * h + h)
    assert count("p-tuning", encoder="LSTM", encoder_hidden_size=e) == k * h + lstm + mlp


@pytest.mark.parametrize("method, options, init", [
    ("p-tuning", dict(encoder="LSTM", encoder_hidden_size=6, encoder_num_layers=3),
     lambda c: p_tuning_init(c.hidden_size, 5, encoder="LSTM", encoder_hidden_size=6, encoder_num_layers=3)),
    ("p-tuning", {}, lambda c: p_tuning_init(c.hidden_size, 5)),
    ("prefix", dict(projection=True, encoder_hidden_size=9),
     lambda c: prefix_init(c, 5, projection=True, encoder_hidden_size=9)),
    ("prefix", {}, lambda c: prefix_init(c, 5)),
])
def test_the_count_is_the_size_of_the_tensors_refpeft_trains(method, options, init):
    config = config_from_dict({**LLAMA, "model_type": "llama"})
    shape = ModelShape(hidden=32, intermediate=48, layers=3, vocab=61, kv=24)
    tensors = init(config)
    assert token_method_row(shape, method, tokens=5, **options).trainable == sum(v.size for v in tensors.values())


def test_bytes_follow_the_count_and_bad_input_is_refused(capsys):
    shape = ModelShape(hidden=32, intermediate=48, layers=3, vocab=61, kv=24)
    row = token_method_row(shape, "prefix", tokens=4, precision="float16", adapter_precision="float32")
    assert row.weights == 2 * shape.parameters() and row.adapter == row.gradients == 4 * row.trainable
    assert row.optimizer == ADAM_STATE_BYTES * row.trainable and row.constants == 0
    with pytest.raises(ConfigError, match="unknown method 'lora'"):
        token_method_row(shape, "lora", tokens=4)
    with pytest.raises(ConfigError, match="positive integer"):
        token_method_row(shape, "prompt", tokens=0)
    assert main(["memory", *DIMS, "--method", "prompt", "--tokens", "3"]) == 2
    assert "--tokens N gives trainable-tokens' row count" in capsys.readouterr().err
    assert main(["memory", *DIMS, "--method", "trainable-tokens"]) == 2
