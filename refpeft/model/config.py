"""The shape of a Llama-family decoder, read from (and written to) a Hugging Face `config.json`.

One frozen `ModelConfig` covers the four families refpeft runs; they differ only in these fields
(transformers' modeling_{llama,mistral,qwen2,qwen3}.py, 5.x):

    family    q/k/v bias         o_proj bias        mlp bias     q/k norm   head_dim default
    llama     attention_bias     attention_bias     mlp_bias     no         hidden / heads
    mistral   no                 no                 no           no         hidden / heads
    qwen2     always             no                 no           no         hidden / heads
    qwen3     attention_bias     attention_bias     no           yes        128 (Qwen3Config)

Every layer is pre-norm RMSNorm -> grouped-query attention with rotary embedding -> residual,
RMSNorm -> SwiGLU (`down(silu(gate(x)) * up(x))`) -> residual; `hidden_act` must be "silu".

Rotary parameters are stored two ways in the wild, and both are read, as transformers 5 does in
`RotaryEmbeddingConfigMixin.convert_rope_params_to_dict` (modeling_rope_utils.py):
  - transformers 4 style: top-level `rope_theta` and `rope_scaling` (None, or a dict with
    `rope_type` (older files: `type`) and the type's parameters);
  - transformers 5 style: `rope_parameters = {"rope_type", "rope_theta", ...}`.
`rope_scaling` wins over `rope_parameters` when both are given; `rope_theta` inside the dict wins
over the top-level one; the default is 10000. Supported types: "default" and "llama3" (factor,
low_freq_factor, high_freq_factor, original_max_position_embeddings, the last defaulting to
max_position_embeddings as transformers' `standardize_rope_params` does). Any other type, a
per-layer (nested) dict or a partial_rotary_factor other than 1 is a ConfigError.

Sliding-window attention is not implemented, so a window that could ever cut the context is
refused: Mistral applies `sliding_window` whenever it is set; Qwen2/Qwen3 only with
`use_sliding_window`. A window >= max_position_embeddings never masks anything (transformers masks
key j for query i when i - j >= window) and is kept, so an all-full-attention model loads.

Missing optional keys take the defaults of the family's transformers config class. Every number is
checked: sizes are positive integers, heads divide evenly into key-value groups, head_dim is even
(rotary pairs), eps and theta are positive finite floats, token ids lie in [0, vocab_size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from refpeft.errors import ConfigError

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = ("default", "llama3")
DEFAULT_ROPE_THETA = 10_000.0  # RotaryEmbeddingConfigMixin.default_theta
# Defaults of the transformers config classes for keys a config.json may leave out.
_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768, "qwen3": 32768}
_SPECIAL_IDS = {"llama": (1, 2), "mistral": (1, 2), "qwen2": (None, None), "qwen3": (None, None)}
_KV_HEADS = {"llama": None, "mistral": 8, "qwen2": 32, "qwen3": 32}  # None: as many as attention heads
_QWEN3_HEAD_DIM = 128
_QWEN_SLIDING_WINDOW = 4096


@dataclass(frozen=True)
class Llama3RopeScaling:
    """rope_type "llama3" (Llama 3.1): how the inverse frequencies are rescaled (see refpeft.model.rope)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """A decoder's hyper-parameters under transformers' names; checked on construction."""

    model_type: str                  # one of SUPPORTED_FAMILIES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None   # None: rope_type "default"
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool             # q, k and v projections have biases
    o_proj_bias: bool                # the output projection has a bias
    mlp_bias: bool                   # gate, up and down projections have biases
    qk_norm: bool                    # per-head RMSNorm on q and k before rotary (Qwen3)
    sliding_window: int | None = None    # a window that never masks (>= max positions), or None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_FAMILIES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported; refpeft loads "
                              f"{', '.join(SUPPORTED_FAMILIES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            _positive_int(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even (rotary embedding rotates pairs), got {self.head_dim}")
        _positive_float("rms_norm_eps", self.rms_norm_eps)
        _positive_float("rope_theta", self.rope_theta)
        for name in ("tie_word_embeddings", "attention_bias", "o_proj_bias", "mlp_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; the SwiGLU MLP uses 'silu'")
        if self.rope_scaling is not None:
            s = self.rope_scaling
            for name in ("factor", "low_freq_factor", "high_freq_factor"):
                _positive_float(f"rope llama3 {name}", getattr(s, name))
            _positive_int("rope llama3 original_max_position_embeddings", s.original_max_position_embeddings)
            if not s.high_freq_factor > s.low_freq_factor:
                raise ConfigError(f"rope llama3 high_freq_factor ({s.high_freq_factor}) must exceed "
                                  f"low_freq_factor ({s.low_freq_factor})")
        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window)
            if self.sliding_window < self.max_position_embeddings:
                raise ConfigError(
                    f"sliding_window {self.sliding_window} is smaller than max_position_embeddings "
                    f"{self.max_position_embeddings}: sliding-window attention is not implemented in refpeft "
                    "(set sliding_window to null, or use_sliding_window to false, for full attention)")
        eos = self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)
        for name, value in (("pad_token_id", self.pad_token_id), ("bos_token_id", self.bos_token_id),
                            *(("eos_token_id", e) for e in eos)):
            if value is not None and (type(value) is not int or not 0 <= value < self.vocab_size):
                raise ConfigError(f"{name} must be a token id in [0, {self.vocab_size}), got {value!r}")

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else "llama3"

    def rope_parameters(self) -> dict[str, Any]:
        """transformers 5's `rope_parameters` dict; also the keywords of rope_inverse_frequencies."""
        params: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            s = self.rope_scaling
            params.update(factor=s.factor, low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                          original_max_position_embeddings=s.original_max_position_embeddings)
        return params


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a parsed config.json; ConfigError for anything unsupported or invalid."""
    if not isinstance(d, dict):
        raise ConfigError(f"a model config must be a JSON object, got {type(d).__name__}")
    family = d.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(f"model_type {family!r} is not supported; refpeft loads {', '.join(SUPPORTED_FAMILIES)}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in d:
            raise ConfigError(f"{family} config has no {key!r}")
    heads = _positive_int("num_attention_heads", d["num_attention_heads"])
    hidden = _positive_int("hidden_size", d["hidden_size"])
    head_dim = d.get("head_dim")
    if head_dim is None:
        if family == "qwen3":
            head_dim = _QWEN3_HEAD_DIM
        elif hidden % heads:
            raise ConfigError(f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) "
                              "and the config gives no head_dim")
        else:
            head_dim = hidden // heads
    max_positions = d.get("max_position_embeddings", _MAX_POSITIONS[family])
    bias = d.get("attention_bias", False)
    bos, eos = _SPECIAL_IDS[family]
    eos_id = d.get("eos_token_id", eos)
    return ModelConfig(
        model_type=family,
        vocab_size=d["vocab_size"],
        hidden_size=hidden,
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=_or(d.get("num_key_value_heads", _KV_HEADS[family]), heads),
        head_dim=head_dim,
        rms_norm_eps=_number("rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
        **_rope(d, max_positions),
        max_position_embeddings=max_positions,
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        attention_bias={"llama": bias, "mistral": False, "qwen2": True, "qwen3": bias}[family],
        o_proj_bias={"llama": bias, "mistral": False, "qwen2": False, "qwen3": bias}[family],
        mlp_bias=d.get("mlp_bias", False) if family == "llama" else False,
        qk_norm=family == "qwen3",
        sliding_window=_sliding_window(d, family),
        pad_token_id=d.get("pad_token_id"),
        bos_token_id=d.get("bos_token_id", bos),
        eos_token_id=tuple(eos_id) if isinstance(eos_id, list) else eos_id,
        hidden_act=d.get("hidden_act", "silu"),
    )


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """A config.json dict that transformers (4.5x and 5.x) and `config_from_dict` read back as `config`.

    rope is written both ways: `rope_theta`/`rope_scaling` for transformers 4 and `rope_parameters`
    for 5 (which reads `rope_scaling` first; both say the same)."""
    family = config.model_type
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_scaling is None
        else {k: v for k, v in config.rope_parameters().items() if k != "rope_theta"},
        "rope_parameters": config.rope_parameters(),
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
    }
    expected_bias = {"mistral": (False, False), "qwen2": (True, False)}.get(family)
    if expected_bias is not None and (config.attention_bias, config.o_proj_bias) != expected_bias:
        raise ConfigError(f"{family} has q/k/v bias {expected_bias[0]} and o_proj bias {expected_bias[1]} "
                          f"fixed by its architecture; this config says {config.attention_bias}, {config.o_proj_bias}")
    if family in ("llama", "qwen3"):
        if config.attention_bias != config.o_proj_bias:
            raise ConfigError(f"{family}'s attention_bias covers q, k, v and o_proj together; this config "
                              f"says q/k/v {config.attention_bias}, o_proj {config.o_proj_bias}")
        d["attention_bias"] = config.attention_bias
    if config.mlp_bias and family != "llama":
        raise ConfigError(f"{family} has no mlp_bias option (only llama does)")
    if family == "llama":
        d["mlp_bias"] = config.mlp_bias
    if config.qk_norm != (family == "qwen3"):
        raise ConfigError(f"q/k norm is {'always' if family == 'qwen3' else 'never'} present in {family}")
    if family == "mistral":
        d["sliding_window"] = config.sliding_window
    elif family in ("qwen2", "qwen3"):
        d["use_sliding_window"] = config.sliding_window is not None
        d["sliding_window"] = config.sliding_window
        d["max_window_layers"] = config.num_hidden_layers
    return d


def _rope(d: dict[str, Any], max_positions: Any) -> dict[str, Any]:
    """rope_theta and rope_scaling from either config style (see the module docstring)."""
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"rope_parameters / rope_scaling must be an object, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"per-layer rope parameters ({', '.join(params)}) are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"rope_type {rope_type!r} is not supported; refpeft implements {', '.join(ROPE_TYPES)}")
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(f"partial_rotary_factor {partial!r} is not supported (rotary on the whole head only)")
    theta = _number("rope_theta", params.get("rope_theta", d.get("rope_theta", DEFAULT_ROPE_THETA)))
    if rope_type == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if key not in params:
            raise ConfigError(f"rope_type 'llama3' needs {key!r}, which the config does not give")
    return {"rope_theta": theta, "rope_scaling": Llama3RopeScaling(
        factor=_number("rope llama3 factor", params["factor"]),
        low_freq_factor=_number("rope llama3 low_freq_factor", params["low_freq_factor"]),
        high_freq_factor=_number("rope llama3 high_freq_factor", params["high_freq_factor"]),
        original_max_position_embeddings=params.get("original_max_position_embeddings", max_positions))}


def _sliding_window(d: dict[str, Any], family: str) -> int | None:
    """The window transformers would apply (None for full attention)."""
    if family == "mistral":
        return d.get("sliding_window", 4096)
    if family in ("qwen2", "qwen3") and d.get("use_sliding_window", False):
        return d.get("sliding_window", _QWEN_SLIDING_WINDOW)
    return None


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _positive_int(name: str, value: Any) -> int:
    if type(value) is not int or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _number(name: str, value: Any) -> float:
    if type(value) not in (int, float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    return float(value)


def _positive_float(name: str, value: Any) -> None:
    if type(value) is not float or not math.isfinite(value) or value <= 0.0:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
