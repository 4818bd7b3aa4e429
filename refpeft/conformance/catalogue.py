"""The case catalogue: every committed conformance case, by name.

Sizes are small on purpose (the whole set is a few MB and regenerates in seconds) but not
trivial: reductions of 16 to 128 terms, batches with two leading dimensions, ranks 1 to 16, and
each option of each method in at least one case. float32 is the precision peers are checked in;
float64 cases check the oracle's own precision (PEFT in float64 agrees to ~1e-16); float16 cases
check half-precision paths with float32 accumulation; bfloat16 QLoRA cases check the mixed
bfloat16/float32 computation of bitsandbytes' Linear4bit under PEFT.
"""

from __future__ import annotations

from refpeft.conformance.families import Case
from refpeft.conformance.bf16_families import bf16_layer_cases
from refpeft.conformance.bottleneck_families import bottleneck_cases
from refpeft.conformance.config_families import adapter_config_cases
from refpeft.conformance.fusion_families import fusion_cases
from refpeft.conformance.method_families import method_cases
from refpeft.conformance.model_families import model_lora_cases
from refpeft.conformance.moe_families import moe_lora_cases

SMALL = {"batch": [2, 3], "k": 32, "d": 24, "r": 4}
WIDE = {"batch": [16], "k": 128, "d": 96, "r": 16}


def _lora() -> list[Case]:
    cases = []
    variants = [
        ("basic", SMALL, {"alpha": 8.0}),
        ("bias-dropout", SMALL, {"alpha": 16.0, "bias": True, "dropout": 0.25}),
        ("rslora-fan-in-fan-out", SMALL, {"alpha": 8.0, "rslora": True, "fan_in_fan_out": True, "bias": True}),
        ("rank1", {"batch": [5], "k": 16, "d": 8, "r": 1}, {"alpha": 1.0}),
        ("wide", WIDE, {"alpha": 32.0, "bias": True}),
    ]
    for seed, (label, sizes, options) in enumerate(variants):
        for dtype in ("float32", "float64"):
            for family in ("lora_forward", "lora_backward"):
                direction = family.split("_")[1]
                cases.append(Case(f"lora-{direction}-{label}-{dtype}", family, dtype, 100 + seed, sizes, options))
    cases.append(Case("lora-forward-basic-float16", "lora_forward", "float16", 100, SMALL, {"alpha": 8.0}))
    cases.append(Case("lora-backward-basic-float16", "lora_backward", "float16", 100, SMALL, {"alpha": 8.0}))
    for seed, (label, options) in enumerate([("merge", {"alpha": 8.0}),
                                             ("merge-fan-in-fan-out", {"alpha": 8.0, "fan_in_fan_out": True}),
                                             ("unmerge", {"alpha": 8.0, "unmerge": True}),
                                             ("merge-rslora", {"alpha": 16.0, "rslora": True})]):
        for dtype in ("float32", "float64") + (("float16",) if label == "merge" else ()):
            cases.append(Case(f"lora-{label}-{dtype}", "lora_merge", dtype, 200 + seed, SMALL, options))
    return cases


def _dora_vera() -> list[Case]:
    cases = []
    dora = [
        ("basic", SMALL, {"alpha": 8.0}),
        ("bias-dropout", SMALL, {"alpha": 16.0, "bias": True, "dropout": 0.25}),
        ("rslora-fan-in-fan-out", SMALL, {"alpha": 8.0, "rslora": True, "fan_in_fan_out": True}),
        ("exact-gradient", SMALL, {"alpha": 8.0, "bias": True, "gradient": "exact"}),
    ]
    vera = [
        ("basic", {**SMALL, "r": 8}, {}),
        ("bias-dropout", {**SMALL, "r": 8}, {"bias": True, "dropout": 0.25}),
        ("fan-in-fan-out", {**SMALL, "r": 8}, {"fan_in_fan_out": True}),
    ]
    seed = 500
    for method, variants in (("dora", dora), ("vera", vera)):
        for label, sizes, options in variants:
            dtypes = ("float32", "float64", "float16") if label == "basic" else ("float32", "float64")
            for dtype in dtypes:
                families = ["backward"] if options.get("gradient") == "exact" else ["forward", "backward"]
                for direction in families:
                    cases.append(Case(f"{method}-{direction}-{label}-{dtype}", f"{method}_{direction}", dtype, seed,
                                      sizes, options))
            seed += 1
        _, sizes, options = variants[0]                  # merges use the basic variant's sizes and options
        for dtype in ("float32", "float64", "float16"):
            cases.append(Case(f"{method}-merge-{dtype}", f"{method}_merge", dtype, seed, sizes, options))
            cases.append(Case(f"{method}-merge-fan-in-fan-out-{dtype}", f"{method}_merge", dtype, seed + 1, sizes,
                              {**options, "fan_in_fan_out": True}))
            if dtype != "float16":
                cases.append(Case(f"{method}-unmerge-{dtype}", f"{method}_merge", dtype, seed + 2, sizes,
                                  {**options, "unmerge": True}))
        seed += 3
    return cases


def _export() -> list[Case]:
    """Exported graphs (ONNX Runtime runs them): merged and unmerged LoRA, DoRA, VeRA, NF4 bases, and
    each further branch kind (refpeft_onnx.branches): IA3 on either side, OFT, LoKr, Pre-Diag."""
    sizes = {"batch": [2, 3], "k": 64, "d": 32, "r": 4}
    unranked = {key: v for key, v in sizes.items() if key != "r"}
    variants = [
        ("lora-merged", {"method": "lora", "form": "merged", "alpha": 8.0, "bias": True}),
        ("lora-unmerged", {"method": "lora", "form": "unmerged", "alpha": 8.0, "bias": True}),
        ("rslora-unmerged", {"method": "lora", "form": "unmerged", "alpha": 8.0, "rslora": True}),
        ("dora-merged", {"method": "dora", "form": "merged", "alpha": 8.0}),
        ("dora-unmerged", {"method": "dora", "form": "unmerged", "alpha": 8.0, "bias": True}),
        ("vera-merged", {"method": "vera", "form": "merged"}),
        ("vera-unmerged", {"method": "vera", "form": "unmerged", "bias": True}),
        ("qlora-nf4-bnb4-unmerged", {"method": "lora", "form": "unmerged", "alpha": 8.0, "nf4_blocksize": 64}),
        ("qlora-nf4-standard-unmerged", {"method": "lora", "form": "unmerged", "alpha": 8.0, "nf4_blocksize": 64,
                                         "nf4_ops": "standard"}),
    ]
    cases = [Case(f"export-{label}-float32", "export_forward", "float32", 600 + i, sizes, options)
             for i, (label, options) in enumerate(variants)]
    branches = [   # (label, sizes, options): the kinds past low-rank, unmerged (their branch) and merged
        ("ia3-output", unranked, {"method": "ia3", "feedforward": False, "bias": True}),
        ("ia3-input", unranked, {"method": "ia3", "feedforward": True, "bias": True}),
        ("oft", {**unranked, "block_size": 8}, {"method": "oft", "bias": True}),
        ("lokr", {**sizes, "r": 2}, {"method": "lokr", "alpha": 4.0, "bias": True}),
        ("lokr-decompose-both", {**sizes, "r": 2}, {"method": "lokr", "alpha": 4.0, "decompose_both": True}),
        ("prediag", sizes, {"method": "prediag", "alpha": 8.0, "bias": True}),
    ]
    for seed, (label, s, options) in enumerate(branches, start=620):
        for form in ("unmerged", "merged"):
            cases.append(Case(f"export-{label}-{form}-float32", "export_forward", "float32", seed, s,
                              {**options, "form": form}))
    return cases


def _qlora() -> list[Case]:
    """bfloat16 QLoRA layers (4-bit base, float32 adapters), as bitsandbytes + PEFT compute them."""
    sizes = {"batch": [2, 5], "k": 128, "d": 64, "r": 4}
    return [Case(f"qlora-{direction}-{quant_type}-bfloat16", f"qlora_{direction}", "bfloat16", 800 + i,
                 sizes, {"alpha": 16.0, "quant_type": quant_type})
            for i, quant_type in enumerate(("nf4", "fp4")) for direction in ("forward", "backward")]


def _fusion() -> list[Case]:
    sizes = {"k": 32, "d": 24, "ranks": [4, 2]}
    options = {"alphas": [8.0, 4.0], "weights": [0.7, -0.3]}
    return [Case(f"fusion-cat-{dtype}", "fusion_cat", dtype, 700, sizes, options) for dtype in ("float32", "float64")]


def _multi_adapter() -> list[Case]:
    """Mixed batches over 3 slots of ranks 4, 2, 8 (slot 1 rsLoRA), some tokens without an adapter:
    LoRA only (PEFT's mixed batch runs these) and LoRA with DoRA slots (refpeft defines them)."""
    sizes = {"tokens": 12, "k": 32, "d": 24, "ranks": [4, 2, 8]}
    segments = {"segment_lengths": [2, 3, 1, 4, 2]}
    lora = {"methods": ["lora", "lora", "lora"], "alphas": [8.0, 4.0, 16.0], "rslora": [False, True, False],
            "bias": True}
    mixed = {**lora, "methods": ["lora", "dora", "dora"]}
    square = {**sizes, "d": 32}   # DoRA on a square layer: a norm over the wrong axis has the right shape
    sgmv = {"segment_slots": [-1, 0, 0, 1, 2]}
    variants = [("bgmv", "lora", sizes, lora, ("float32", "float64", "float16", "bfloat16")),
                ("bgmv", "lora-dora", square, mixed, ("float32", "float16", "bfloat16")),
                ("sgmv", "lora", {**sizes, **segments}, {**lora, **sgmv}, ("float32", "bfloat16")),
                ("sgmv", "lora-dora", {**square, **segments}, {**mixed, **sgmv}, ("float32",))]
    cases = []
    for seed, (layout, label, s, o, dtypes) in enumerate(variants, start=900):
        if layout == "sgmv":
            s = {key: value for key, value in s.items() if key != "tokens"}
        cases += [Case(f"multi-{layout}-{label}-{dtype}", f"multi_adapter_{layout}", dtype, seed, s, o)
                  for dtype in dtypes]
    return cases


def _adam() -> list[Case]:
    sizes = {"k": 32, "d": 24, "r": 4}
    variants = [
        ("adam-step1", {"lr": 1e-3}),
        ("adam-step5-l2", {"lr": 1e-2, "step": 5, "weight_decay": 0.1}),
        ("adamw-step3", {"lr": 1e-2, "step": 3, "weight_decay": 0.01, "adamw": True}),
        ("loraplus-adamw-step1", {"lr": 2e-4, "adamw": True, "loraplus_ratio": 16.0, "weight_decay": 0.01}),
        ("adam-step1270", {"lr": 1e-3, "step": 1270}),   # glibc's (1 - 0.999**t) ** 0.5 misses sqrt's rounding here
    ]
    return [Case(f"{label}-{dtype}", "adam_step", dtype, 300 + seed, sizes, options)
            for seed, (label, options) in enumerate(variants) for dtype in ("float32", "float64")]


def _quant() -> list[Case]:
    """Bit-exact 4-bit cases: each semantics (bnb-cuda, bnb-cpu) x NF4/FP4, partial blocks, double quant."""
    cases = []
    variants = [
        ("bs64", "float32", [24, 128], {"blocksize": 64, "zero_block": True}),
        ("bs32-partial", "float32", [7, 33], {"blocksize": 32}),
        ("bs128-float16", "float16", [8, 256], {"blocksize": 128}),
        ("double-bs32", "float32", [32, 512], {"blocksize": 32, "double_quant": True}),
        ("bs128-rows320", "float32", [4, 320], {"blocksize": 128}),   # rows do not start blocks (FINDINGS F-6)
    ]
    seed = 400
    for label, dtype, shape, options in variants:
        for quant_type in ("nf4", "fp4"):
            for rounding in ("bnb-cuda", "bnb-cpu"):
                opts = {**options, "quant_type": quant_type, "rounding": rounding}
                for family, verb in (("quantize_4bit", "quantize"), ("dequantize_4bit", "dequantize")):
                    cases.append(Case(f"{quant_type}-{verb}-{label}-{rounding}", family, dtype, seed, {"shape": shape}, opts))
                seed += 1
    return cases


CASES: tuple[Case, ...] = tuple(_lora() + _dora_vera() + _qlora() + bf16_layer_cases() + method_cases() + bottleneck_cases() + _fusion() + fusion_cases() + _export() + _multi_adapter() + moe_lora_cases() + adapter_config_cases() + model_lora_cases() + _adam() + _quant())
