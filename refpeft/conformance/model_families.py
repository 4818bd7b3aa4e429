"""Conformance family `model_lora`: a whole tiny Llama with a LoRA or DoRA adapter, its logits, loss and gradients.

A case is refpeft.model's decoder (transformers' LlamaForCausalLM, refpeft/model/decoder.py) at a
tiny random size: the config as JSON (`config`, a transformers config.json), every base weight by
its checkpoint name (`model.layers.0.self_attn.q_proj.weight`, ...), the LoRA factors of each
targeted linear layer (`<module path>.lora_A` (r, k), `<module path>.lora_B` (d, r), PEFT's layout;
with options.method "dora" also `<module path>.lora_magnitude_vector` (d)), token ids, an attention
mask (left padding) and labels (-100 = ignored), all int32. Float inputs are in the case's dtype
(float64, float32, bfloat16: the same draws rounded once). Results:

    logits (b, t, V)                 forward with the adapter
    loss   (1,)                      transformers' causal-LM loss: mean over the labelled positions
                                     of -log softmax(logits[:, :-1])[labels[:, 1:]]
    grad.<module path>.lora_A / .lora_B (/ .lora_magnitude_vector)   d loss / d tensor, every adapted layer

Expected results: refpeft's decoder on ExactArray inputs (refpeft.conformance.exact: every matmul
and sum correctly rounded, elementwise ops and libm's exp/log/sin/cos/sqrt as NumPy computes them
in float64), so the bytes do not depend on the BLAS.

Bounds. Error algebra (refpeft.tolerance) composed through a whole decoder is vacuous, so these
bounds come from refpeft.rounding's probabilistic model instead (Higham & Mary 2019, measured by
noise injection): per result, B = 2 max |y_noisy - y64| over RUNS float64 runs with noise of the
case dtype's unit roundoff (2^-53, 2^-24, 2^-8) injected at every rounding op, one scalar for the
whole result. An implementation computing in that dtype errs by at most B under that model and the
float64 reference by less, so the stored bound is 2 B, broadcast to the result's shape. It is a
probabilistic bound, not a rigorous one: `parameters.bound_model` says so in every manifest.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.backend import UNIT_ROUNDOFF
from refpeft.conformance.bf16_families import bfloat16_values
from refpeft.conformance.case import Case, Vectors, draw
from refpeft.conformance.exact import exact_array, plain
from refpeft.methods import method_spec
from refpeft.methods.lora import lora_scaling
from refpeft.model.config import config_from_dict
from refpeft.model.decoder import Model, check_adapter_targets, loss_and_gradients
from refpeft.rounding import Noisy, noisy

INDEX_DTYPE = "int32"
IGNORE_INDEX = -100
RUNS = 4               # injected runs per case (refpeft.rounding's default is 2; more runs, a safer maximum)
NOISE_SEED = 0
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BOUND_MODEL = ("probabilistic: 2 B per result, B = 2 max |y_noisy - y64| over RUNS noise-injected float64 runs "
               "(refpeft.rounding, unit roundoff U); one scalar per result")
UNITS = {"float64": "2^-53", "float32": "2^-24", "bfloat16": "2^-8"}
FLOATS = tuple(UNITS)


def model_config(case: Case) -> dict[str, Any]:
    """The transformers config.json of the case's tiny Llama."""
    s = case.sizes
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": s["vocab"], "hidden_size": s["hidden"], "intermediate_size": s["intermediate"],
            "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv_heads"], "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": case.options.get("tied", False),
            "attention_bias": False, "mlp_bias": False}


def _shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every base weight's checkpoint name and shape, in checkpoint order."""
    H, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    D = H // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * D
    shapes = {"model.embed_tokens.weight": (V, H)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (H,), f"{p}.self_attn.q_proj.weight": (H, H),
                       f"{p}.self_attn.k_proj.weight": (kv, H), f"{p}.self_attn.v_proj.weight": (kv, H),
                       f"{p}.self_attn.o_proj.weight": (H, H), f"{p}.post_attention_layernorm.weight": (H,),
                       f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.up_proj.weight": (I, H),
                       f"{p}.mlp.down_proj.weight": (H, I)})
    shapes["model.norm.weight"] = (H,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def target_paths(case: Case) -> list[str]:
    """The module paths the adapter targets (options.targets: suffixes such as "q_proj"; "lm_head")."""
    targets = case.options["targets"]
    paths = [f"model.layers.{i}.{m}" for i in range(case.sizes["layers"]) for m in LAYER_LINEARS
             if m.split(".")[1] in targets]
    return paths + (["lm_head"] if "lm_head" in targets else [])


def adapter_keys(case_options: dict[str, Any]) -> dict[str, str]:
    """The method's tensors -> the suffix naming them after `<module path>.` (PEFT's key less ".weight")."""
    spec = method_spec(case_options.get("method", "lora"))
    return {name: key.removesuffix(".weight") for name, key in spec.tensors.items()}


def _in_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    """float64 draws rounded once to the case's dtype (bfloat16 through float32, stored as BF16)."""
    return bfloat16_values(a) if dtype == "bfloat16" else a.astype(dtype)


def model_inputs(case: Case) -> dict[str, Any]:
    """config (JSON), base weights, adapter tensors, input_ids, attention_mask, labels of a case."""
    s = case.sizes
    rng = np.random.default_rng(case.seed)
    config = model_config(case)
    inputs: dict[str, Any] = {"config": config}
    for name, shape in _shapes(config).items():
        if name.endswith("norm.weight"):               # norm gains near 1, not all ones (a swapped gain shows)
            inputs[name] = 1.0 + draw(rng, shape, dtype="float64", scale=0.25)
        else:
            inputs[name] = draw(rng, shape, dtype="float64", scale=1.0 if "embed" in name else 0.25)
    r, keys = s["r"], adapter_keys(case.options)
    for path in target_paths(case):
        d, k = inputs[f"{path}.weight"].shape if path != "lm_head" or not config["tie_word_embeddings"] else \
            inputs["model.embed_tokens.weight"].shape
        inputs[f"{path}.{keys['A']}"] = draw(rng, (r, k), dtype="float64", scale=0.25)
        inputs[f"{path}.{keys['B']}"] = draw(rng, (d, r), dtype="float64", scale=0.25)
        if "magnitude" in keys:                        # DoRA magnitudes in [1/2, 3/2)
            inputs[f"{path}.{keys['magnitude']}"] = rng.random(d) + 0.5
    inputs = {n: _in_dtype(a, case.dtype) if isinstance(a, np.ndarray) else a for n, a in inputs.items()}
    b, t = s["batch"], s["tokens"]
    ids = rng.integers(0, s["vocab"], size=(b, t))
    mask = np.ones((b, t), dtype=np.int64)
    mask[1, : s["padding"]] = 0                        # row 1 left-padded
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    labels[0, :2] = IGNORE_INDEX                       # some real tokens unlabelled too
    # The first real token of a padded row is predicted from a padding position (a query with every
    # key masked), whose gradient frameworks disagree on (FINDINGS.md); it is left out of the loss.
    labels[1, s["padding"]] = IGNORE_INDEX
    inputs.update(input_ids=ids.astype(INDEX_DTYPE), attention_mask=mask.astype(INDEX_DTYPE),
                  labels=labels.astype(INDEX_DTYPE))
    return inputs


def _computed(a: np.ndarray) -> np.ndarray:
    """bfloat16 inputs as float32 arrays holding their values (refpeft.backend's bfloat16 policy)."""
    return np.asarray(a, dtype=np.float32) if str(a.dtype) == "bfloat16" else a


def decoder(inputs: dict[str, Any], *, alpha: float, rslora: bool, method: str = "lora",
            wrap: Callable[[Any], Any] = lambda a: a) -> Model:
    """refpeft's Model of a case's inputs (each float tensor passed through `wrap`)."""
    config = config_from_dict(inputs["config"])
    keys = adapter_keys({"method": method})
    adapted = sorted({name.rsplit(".", 1)[0] for name in inputs if name.endswith(f".{keys['A']}")})
    skip = {"config", "input_ids", "attention_mask", "labels"}
    suffixes = tuple(f".{key}" for key in keys.values())
    weights = {n: wrap(_computed(a)) for n, a in inputs.items() if n not in skip and not n.endswith(suffixes)}
    modules = {p: ModuleAdapter(method, {name: wrap(_computed(inputs[f"{p}.{key}"])) for name, key in keys.items()},
                                alpha=alpha, rslora=rslora) for p in adapted}
    model = Model(config, weights, Adapter(modules))
    check_adapter_targets(model)
    return model


def run_case(inputs: dict[str, Any], *, alpha: float, rslora: bool, method: str = "lora",
             wrap: Callable[[Any], Any] = lambda a: a) -> dict[str, Any]:
    """logits, loss and grad.<path>.<tensor key> (lora_A, lora_B, lora_magnitude_vector) of the case."""
    model = decoder(inputs, alpha=alpha, rslora=rslora, method=method, wrap=wrap)
    keys = adapter_keys({"method": method})
    ids, mask, labels = (np.asarray(inputs[n], dtype=np.int64) for n in ("input_ids", "attention_mask", "labels"))
    loss, logits, grads = loss_and_gradients(model, ids, labels, attention_mask=mask)
    out = {"logits": logits, "loss": np.reshape(loss, (1,))}         # the loss as a (1,) tensor
    for name, g in sorted(grads.items()):
        path, tensor = name.rsplit(".", 1)
        out[f"grad.{path}.{keys[tensor]}"] = g
    return out


def case_options(options: dict[str, Any]) -> dict[str, Any]:
    """run_case's keyword options of a case's options."""
    return dict(alpha=options["alpha"], rslora=options.get("rslora", False), method=options.get("method", "lora"))


def _noisy_bounds(inputs: dict[str, Any], options: dict[str, Any], dtype: str) -> dict[str, np.ndarray]:
    """2 B(u) per result, u the dtype's unit roundoff (module docstring), from RUNS noise-injected runs."""
    common = case_options(options)
    inputs = {n: np.asarray(a, dtype=np.float64) if str(getattr(a, "dtype", "")) in FLOATS else a
              for n, a in inputs.items()}                                  # the runs are float64 (Noisy)
    reference = {n: np.asarray(a, dtype=np.float64) for n, a in run_case(inputs, **common).items()}
    deviation = {n: 0.0 for n in reference}
    saved = Noisy.u, Noisy.rng
    Noisy.u, Noisy.rng = UNIT_ROUNDOFF[dtype], np.random.default_rng(NOISE_SEED)
    try:
        for _ in range(RUNS):
            for n, a in run_case(inputs, wrap=noisy, **common).items():
                deviation[n] = max(deviation[n], float(np.max(np.abs(np.asarray(a, dtype=np.float64) - reference[n]))))
    finally:
        Noisy.u, Noisy.rng = saved
    return {n: np.full(reference[n].shape, 2.0 * (2.0 * deviation[n])) for n in reference}


def model_lora_vectors(case: Case) -> Vectors:
    inputs = model_inputs(case)
    o = case.options
    exact = run_case(inputs, wrap=exact_array, **case_options(o))
    expected = {n: np.ascontiguousarray(plain(a), dtype=np.float64) for n, a in exact.items()}
    bounds = _noisy_bounds(inputs, o, case.dtype)
    parameters = {"scaling": lora_scaling(o["alpha"], case.sizes["r"], rslora=o.get("rslora", False)),
                  "bound_model": BOUND_MODEL.replace("RUNS", str(RUNS)).replace("U", UNITS[case.dtype])}
    return Vectors(inputs, expected, bounds, parameters)


def model_lora_cases() -> list[Case]:
    """A 2-layer Llama (GQA 4/2 heads, H 32, I 48, V 61), 2 rows of 9 tokens, r = 4: LoRA in float64, float32
    and bfloat16, DoRA in float64 and float32."""
    sizes = {"vocab": 61, "hidden": 32, "intermediate": 48, "layers": 2, "heads": 4, "kv_heads": 2,
             "batch": 2, "tokens": 9, "padding": 3, "r": 4}
    qv = {"alpha": 8.0, "targets": ["q_proj", "v_proj"]}
    all_linear = {"alpha": 6.0, "rslora": True, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj", "lm_head"]}
    dora = {"alpha": 8.0, "method": "dora", "targets": ["q_proj", "v_proj", "down_proj"]}
    return [
        Case("model-llama-lora-qv-float64", "model_lora", "float64", 1200, sizes, qv),
        Case("model-llama-lora-all-linear-rslora-float64", "model_lora", "float64", 1201, sizes, all_linear),
        Case("model-llama-tied-lora-mlp-float64", "model_lora", "float64", 1202, sizes,
             {"alpha": 16.0, "tied": True, "targets": ["gate_proj", "up_proj", "down_proj"]}),
        Case("model-llama-lora-qv-float32", "model_lora", "float32", 1200, sizes, qv),
        Case("model-llama-lora-all-linear-rslora-float32", "model_lora", "float32", 1201, sizes, all_linear),
        Case("model-llama-lora-qv-bfloat16", "model_lora", "bfloat16", 1200, sizes, qv),
        Case("model-llama-dora-qv-down-float64", "model_lora", "float64", 1203, sizes, dora),
        Case("model-llama-dora-qv-down-float32", "model_lora", "float32", 1203, sizes, dora),
    ]


SUMMARY = ("logits, loss (mean causal-LM cross-entropy over labels[:, 1:] != -100) and grad.<path>.lora_A/B "
           "(and .lora_magnitude_vector with options.method dora) of "
           "transformers' LlamaForCausalLM with a PEFT LoRA (or DoRA) adapter (s = parameters.scaling) on the given "
           "weights; "
           "bounds probabilistic (parameters.bound_model)")
