"""The adapter_config.json options refpeft reads, per PEFT type, and those it ignores or refuses
(refpeft.peft_config checks a config against them)."""

# Config options refpeft reads, and those it refuses when set (value other than None/False/empty).
LORA_OPTIONS = {"peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "bias", "lora_bias",
                "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules", "init_lora_weights",
                "modules_to_save", "trainable_token_indices"}


VERA_OPTIONS = {"peft_type", "r", "projection_prng_key", "save_projection", "d_initial", "fan_in_fan_out", "bias",
                "target_modules", "init_weights", "modules_to_save"}


# Options that only shape training or which modules are targeted (the file's keys say which), or
# are bookkeeping: accepted and kept in Adapter.config.
IGNORED_OPTIONS = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                   "inference_mode", "lora_dropout", "vera_dropout", "layers_to_transform", "layers_pattern",
                   "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config",
                   "lora_ga_config", "runtime_config", "ensure_weight_tying"}


UNSUPPORTED_OPTIONS = {
    "layer_replication": "layers duplicated in the base model",
    "use_qalora": "QA-LoRA's pooled inputs", "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA", "arrow_config": "Arrow routing",
    "target_parameters": "LoRA on bare parameters (MoE experts)", "megatron_config": "Megatron parallel layers",
    "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA",
}
# init_lora_weights values that rewrite the base weights (PEFT's olora/pissa/corda/loftq/lora_ga/mica
# inits): the saved A, B only make sense on top of that rewritten base.
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")


IA3_OPTIONS = {"peft_type", "target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
               "modules_to_save", "init_ia3_weights"}


# LoHa and LoKr (PEFT's LycorisConfig): rank_dropout, module_dropout and rank_dropout_scale act only in
# training and init_weights only at creation, so any value reads; use_effective_conv2d concerns conv layers only.
LOHA_OPTIONS = {"peft_type", "r", "alpha", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
                "modules_to_save", "init_weights", "rank_dropout", "module_dropout", "use_effective_conv2d"}
LOKR_OPTIONS = LOHA_OPTIONS | {"decompose_both", "decompose_factor", "rank_dropout_scale"}


# OFT: module_dropout acts only in training; num_cayley_neumann_terms and coft are checked in _check_config_values.
OFT_OPTIONS = {"peft_type", "r", "oft_block_size", "target_modules", "exclude_modules", "modules_to_save", "init_weights",
               "module_dropout", "use_cayley_neumann", "num_cayley_neumann_terms", "coft", "eps", "block_share",
               "fan_in_fan_out", "bias"}
# BOFT: boft_dropout acts only in training; the tensors' shape gives the factors, blocks and block size.
BOFT_OPTIONS = {"peft_type", "boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "target_modules",
                "exclude_modules", "modules_to_save", "init_weights", "boft_dropout", "fan_in_fan_out", "bias"}


# AdaLoRA (PEFT's AdaLoraConfig, a LoraConfig): read by refpeft.adalora_format, not the generic reader,
# since its rank_pattern holds boolean masks. The schedule fields only drive training; r is unused.
ADALORA_OPTIONS = LORA_OPTIONS - {"use_dora", "use_rslora", "lora_bias", "alpha_pattern",
                                  "trainable_token_indices"} | {
    "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step"}


PEFT_TYPES = {"LORA": LORA_OPTIONS, "VERA": VERA_OPTIONS, "IA3": IA3_OPTIONS, "LOHA": LOHA_OPTIONS, "LOKR": LOKR_OPTIONS,
              "OFT": OFT_OPTIONS, "BOFT": BOFT_OPTIONS}
# The peft_types scaled by alpha / r, and the config key of their alpha.
ALPHA_KEYS = {"LORA": "lora_alpha", "LOHA": "alpha", "LOKR": "alpha"}


PASSTHROUGH = ("base_model_name_or_path", "revision", "task_type")
