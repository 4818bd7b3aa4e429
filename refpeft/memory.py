"""Training memory of a decoder-only transformer: full fine-tuning vs LoRA vs QLoRA (vs token methods), in bytes.

The formulas (derived in docs/memory.md) count what lives in memory for the whole run; activations,
the KV cache and framework workspaces depend on batch and sequence length and are left out.

A model is L identical blocks of seven linear layers (PyTorch layout, W is (out, in)):
q_proj (h, h), k_proj (kv, h), v_proj (kv, h), o_proj (h, h), gate_proj (f, h), up_proj (f, h),
down_proj (h, f); two norms (h each) per block, a final norm (h), embeddings (V, h) and an
untied lm_head (V, h). h = hidden size, f = intermediate size, kv = key/value width (h without GQA).

For each method, with b(p) the bytes of precision p (bfloat16/float16 2, float32 4):
- weights:   full/LoRA: every parameter at b(precision). QLoRA: the targeted block linears as 4-bit
             codes (n/2 bytes each, n rounded up to even), everything else at b(precision).
- constants: QLoRA only, per quantised weight of n elements with c = ceil(n / blocksize) blocks:
             4c bytes (float32 absmax); with double quantisation c + 4 ceil(c / 256) + 4 (8-bit
             codes, nested absmax, offset); plus the maps bitsandbytes stores (16 + 256 floats).
- adapter:   r (d + k) per adapted (d, k) linear, at b(adapter precision) (float32 by default, as PEFT).
             Methods that train tokens on the frozen base instead (`token_method_row`): prompt tuning
             k h; P-tuning k h plus its encoder (MLP or LSTM, as PEFT builds it); prefix tuning
             L k 2 t (t = kv, PEFT's token_dim) plus the reparameterisation MLP with prefix_projection
             (counted by refpeft.model.prompt_methods); trainable tokens n h.
- gradients: one per trainable parameter, in the trainable parameters' precision.
- optimiser: AdamW's two moments in float32, 8 bytes per trainable parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refpeft.errors import ConfigError
from refpeft.model.prompt_methods import PROMPT_METHODS, prompt_method
from refpeft.quant.blockwise import BLOCKSIZES
from refpeft.quant.double import NESTED_BLOCKSIZE

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("full", "lora", "qlora")
TRAINABLE_TOKENS = "trainable-tokens"      # PEFT's TRAINABLE_TOKENS: n embedding rows of h
ADAM_STATE_BYTES = 8  # two float32 moments per trainable parameter
QUANT_MAP_BYTES = 16 * 4
NESTED_MAP_BYTES = 256 * 4


@dataclass(frozen=True)
class ModelShape:
    """The dimensions the memory formulas need."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv: int | None = None          # key/value width; None means hidden (no grouped-query attention)
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "vocab", "kv"):
            value = getattr(self, name)
            if not (value is None and name == "kv") and (type(value) is not int or value < 1):
                raise ConfigError(f"the model's {name} size must be a positive integer, got {value!r}")

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear layer in one block."""
        h, f, kv = self.hidden, self.intermediate, self.kv or self.hidden
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}

    def parameters(self) -> int:
        per_block = sum(d * k for d, k in self.linear_shapes().values()) + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_block + self.hidden + embeddings


PRESETS = {
    "llama-2-7b": ModelShape(hidden=4096, intermediate=11008, layers=32, vocab=32000),
    "llama-2-13b": ModelShape(hidden=5120, intermediate=13824, layers=40, vocab=32000),
    "llama-3-8b": ModelShape(hidden=4096, intermediate=14336, layers=32, vocab=128256, kv=1024),
    "mistral-7b": ModelShape(hidden=4096, intermediate=14336, layers=32, vocab=32000, kv=1024),
}


@dataclass(frozen=True)
class MemoryRow:
    """Bytes of one method's training state."""

    method: str
    weights: int
    constants: int
    adapter: int
    gradients: int
    optimizer: int
    trainable: int

    @property
    def total(self) -> int:
        return self.weights + self.constants + self.adapter + self.gradients + self.optimizer


def quantized_bytes(n: int, *, blocksize: int, double_quant: bool) -> tuple[int, int]:
    """(codes, constants) in bytes of one 4-bit weight of n elements, as bitsandbytes stores it."""
    blocks = -(-n // blocksize)
    if double_quant:
        constants = blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4 + QUANT_MAP_BYTES + NESTED_MAP_BYTES
    else:
        constants = 4 * blocks + QUANT_MAP_BYTES
    return (n + 1) // 2, constants


def memory_table(model: ModelShape, *, rank: int, targets: tuple[str, ...] = LINEARS,
                 precision: str = "bfloat16", adapter_precision: str = "float32", blocksize: int = 64,
                 double_quant: bool = True) -> list[MemoryRow]:
    """One MemoryRow per method (full, lora, qlora) for `model`; see the module docstring."""
    unknown = [t for t in targets if t not in LINEARS]
    if unknown or not targets:
        raise ConfigError(f"targets must be a non-empty subset of {', '.join(LINEARS)}; got {list(targets)}")
    _check_precisions(precision, adapter_precision)
    if blocksize not in BLOCKSIZES:
        raise ConfigError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize}")
    if rank < 1:
        raise ConfigError(f"rank must be at least 1, got {rank}")
    shapes = model.linear_shapes()
    total = model.parameters()
    adapter = model.layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)
    quantized = codes = constants = 0
    for d, k in shapes.values():  # QLoRA quantises every block linear, adapted or not
        c, q = quantized_bytes(d * k, blocksize=blocksize, double_quant=double_quant)
        quantized += model.layers * d * k
        codes += model.layers * c
        constants += model.layers * q
    b, ba = BYTES[precision], BYTES[adapter_precision]
    full = MemoryRow("full", weights=total * b, constants=0, adapter=0, gradients=total * b,
                     optimizer=total * ADAM_STATE_BYTES, trainable=total)
    lora = _frozen_base_row("lora", model, adapter, precision=precision, adapter_precision=adapter_precision)
    qlora = MemoryRow("qlora", weights=codes + (total - quantized) * b, constants=constants, adapter=adapter * ba,
                      gradients=adapter * ba, optimizer=adapter * ADAM_STATE_BYTES, trainable=adapter)
    return [full, lora, qlora]


def token_method_row(model: ModelShape, method: str, *, tokens: int, precision: str = "bfloat16",
                     adapter_precision: str = "float32", **options: Any) -> MemoryRow:
    """The MemoryRow of a method that trains tokens on the frozen base (module docstring): a prompt-learning
    method of refpeft.model.prompt_methods with k = `tokens` virtual tokens and its `options` (encoder,
    encoder_hidden_size, encoder_num_layers, projection), or TRAINABLE_TOKENS with n = `tokens` rows."""
    if type(tokens) is not int or tokens < 1:
        raise ConfigError(f"the number of (virtual) tokens must be a positive integer, got {tokens!r}")
    _check_precisions(precision, adapter_precision)
    if method == TRAINABLE_TOKENS:
        trainable = tokens * model.hidden
    elif method in PROMPT_METHODS:
        trainable = prompt_method(method).count(model.hidden, model.layers, model.kv or model.hidden, tokens, **options)
    else:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join([*PROMPT_METHODS, TRAINABLE_TOKENS])}")
    return _frozen_base_row(method, model, trainable, precision=precision, adapter_precision=adapter_precision)


def _frozen_base_row(method: str, model: ModelShape, trainable: int, *, precision: str,
                     adapter_precision: str) -> MemoryRow:
    """The frozen base at b(precision) and `trainable` parameters at b(adapter precision), with AdamW."""
    ba = BYTES[adapter_precision]
    return MemoryRow(method, weights=model.parameters() * BYTES[precision], constants=0, adapter=trainable * ba,
                     gradients=trainable * ba, optimizer=trainable * ADAM_STATE_BYTES, trainable=trainable)


def _check_precisions(precision: str, adapter_precision: str) -> None:
    for name, p in {"precision": precision, "adapter_precision": adapter_precision}.items():
        if p not in BYTES:
            raise ConfigError(f"{name} must be one of {', '.join(BYTES)}, got {p!r}")


def format_table(rows: list[MemoryRow]) -> str:
    """The rows as a fixed-width table in GiB (and trainable parameters)."""
    gib = 2.0**30
    columns = ("weights", "constants", "adapter", "gradients", "optimizer", "total")
    width = max(8, *(len(row.method) + 1 for row in rows))
    lines = [f"{'method':<{width}}" + "".join(f"{c:>11}" for c in columns) + f"{'trainable':>16}"]
    for row in rows:
        values = [getattr(row, c) for c in columns]
        lines.append(f"{row.method:<{width}}" + "".join(f"{v / gib:>11.3f}" for v in values) + f"{row.trainable:>16,}")
    return "\n".join(lines) + "\n(GiB = 2^30 bytes; activations and KV cache excluded)"
