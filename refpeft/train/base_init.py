"""Training from a LoRA init that rewrites the base (PiSSA, OLoRA, LoftQ): the run's start and what it saves.

PEFT's init_lora_weights="pissa" / "pissa_niter_K" / "olora" / "loftq" (refpeft.methods.lora_init)
replaces each adapted layer's frozen weight W and starts A, B from a factorisation of it:

    PiSSA, OLoRA   A0, B0 from W;   W_res = W - s B0 A0;   the model starts exactly as the base
    LoftQ          A0, B0 and Q_T alternating NF4 and SVD; the base becomes the 4-bit Q_T

`rewrite_base` does this at the start of a run for every module of a LoRA adapter and returns the
adapter as initialised (A0, B0) with the model. Training then moves A, B on the rewritten base. A
resumed run rewrites the base again (each init is a pure function of W, r, s and the seed) and
loads the trained A, B from its checkpoint over it.

What is saved:

    PiSSA, OLoRA   the trained A, B on W_res are on the original W the
                   rank-2r LoRA  s' [B | -B0] [A ; A0] = s B A - s B0 A0  (refpeft.methods.lora_init.
                   convert_to_plain_lora), since W_res + s B A = W + s B A - s B0 A0. This is what
                   PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) writes: a
                   plain LoRA for the unchanged base, with no init_lora_weights to replay.
    LoftQ          no such conversion exists (W - deq(Q_T) is not of low rank), so, as PEFT's LoftQ
                   recipe does, the adapter is saved as a plain rank-r LoRA for the LoftQ base, and
                   that base is saved beside it (`loftq_base_weights`: W with every adapted
                   projection replaced by deq(Q_T)) for loading in 4 bits. LoftQ is an init for a
                   quantised base: refpeft takes it only with --nf4, where the adapted layers
                   multiply by Q_T itself (NF4, block 64, no double quantisation, as PEFT's
                   loftq_init quantises) and the other projections by the usual QLoRA NF4 base.

PiSSA and OLoRA factorise a float weight: they are refused on a 4-bit base (PEFT's QPiSSA, which
re-quantises W_res, is not reproduced), on a tied lm_head (rewriting it would rewrite the embedding)
and for methods other than LoRA (the rank-2r difference needs LoRA's product form).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from refpeft.adapter import Adapter
from refpeft.backend import namespace
from refpeft.errors import ConfigError
from refpeft.methods import method_spec
from refpeft.methods.lora_init import BASE_INITS, init_from_base, parse_pissa_niter
from refpeft.model.decoder import Model
from refpeft.quant.state import QuantState4bit, dequantize_4bit

LOFTQ = "loftq"


def check_init(init: str) -> str:
    """`init` if it names a base-rewriting init PEFT has (BASE_INITS or pissa_niter_K)."""
    if init not in BASE_INITS and parse_pissa_niter(init) is None:
        raise ConfigError(f"unknown init {init!r}; choose one of {', '.join(BASE_INITS)} or pissa_niter_K")
    return init


def rewrite_base(model: Model, *, init: str, seed: int = 0,
                 original: Mapping[str, Any] | None = None) -> tuple[Model, Adapter]:
    """(the model with A0, B0 in its LoRA modules and each adapted weight rewritten, the adapter as
    initialised) for PEFT's init `init` (module docstring).

    original: the float weights before --nf4 quantised them; LoftQ needs them (and a 4-bit base),
    PiSSA and OLoRA need a float base and read model.weights. seed: pissa_niter_K's Omega (module i
    draws from seed + i)."""
    check_init(init)
    adapter = model.adapter
    if adapter is None or not adapter.modules:
        raise ConfigError(f"init {init!r} initialises LoRA modules: the run has none")
    lora = method_spec("lora")
    modules, weights = {}, dict(model.weights)
    for i, (path, module) in enumerate(adapter.modules.items()):
        if module.spec is not lora:
            raise ConfigError(f"init {init!r} is a LoRA init (PEFT's init_lora_weights), not one for {module.method}")
        if path == "lm_head" and model.config.tie_word_embeddings:
            raise ConfigError(f"init {init!r} rewrites the weight of lm_head, which is tied to the embedding here")
        name = f"{path}.weight"
        quantized = isinstance(model.weights[name], QuantState4bit)
        if init == LOFTQ and not quantized:
            raise ConfigError(f"init 'loftq' initialises an adapter for a 4-bit base, and {path} is not stored in 4 "
                              "bits: use it with --nf4 (which leaves lm_head unquantised)")
        if init != LOFTQ and quantized:
            raise ConfigError(f"init {init!r} rewrites a float weight; {path} is stored in 4 bits (--nf4): only "
                              "'loftq' initialises for a quantised base")
        W = model.weights[name] if init != LOFTQ else (original or {}).get(name)
        if W is None:
            raise ConfigError(f"init 'loftq' needs {name} before quantisation (original)")
        result = init_from_base(W, module.r, init=init, scaling=module.scaling, seed=seed + i,
                                fan_in_fan_out=module.fan_in_fan_out)
        modules[path] = module.replace(A=result.A, B=result.B)
        weights[name] = result.quant_state if init == LOFTQ else result.base
    initial = replace(adapter, modules=modules)
    return replace(model, weights=weights, adapter=initial), initial


def loftq_base_weights(model: Model, original: Mapping[str, Any]) -> dict[str, Any]:
    """LoftQ: the float checkpoint of the LoftQ base, `original` with each adapted projection replaced by
    deq(Q_T) in the original's dtype (what PEFT's loftq_init leaves in the weight, saved by its recipe)."""
    weights = dict(original)
    for path in model.adapter.modules:
        name = f"{path}.weight"
        weights[name] = namespace(original[name]).astype(dequantize_4bit(model.weights[name]), original[name].dtype)
    return weights
