"""Tiny random Llamas and PEFT adapter folders written by transformers and PEFT themselves (imports torch).

Shared by the ONNX decoder tests: tests/test_export_decoder.py, test_export_prompt_learning.py,
test_export_attach.py and test_artifact_check.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import peft
import torch
import transformers


class TwoLinears(torch.nn.Module):
    """Two stacked linear layers with biases, q (k -> k2) then v (k2 -> d); by default 12 -> 8 -> 6, sizes
    with several block and Kronecker splits."""

    def __init__(self, k: int = 12, k2: int = 8, d: int = 6):
        super().__init__()
        self.q, self.v = torch.nn.Linear(k, k2), torch.nn.Linear(k2, d)

    def forward(self, x):
        return self.v(self.q(x))


def tiny_llama(config: Mapping[str, Any], *, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A random LlamaForCausalLM in eval mode with random RMSNorm weights (not ones, which hide mistakes)."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


def scrambled(name: str, p: torch.Tensor) -> None:
    """A trained-looking adapter tensor: N(0, 0.3^2), around 1 for a DoRA magnitude."""
    p.copy_(0.3 * torch.randn_like(p) + (1.0 if "magnitude" in name else 0.0))


def write_adapters(root: Path, base: transformers.PreTrainedModel, configs: Mapping[str, Callable[[], Any]], *,
                   perturb: Callable[[str, torch.Tensor], None] = scrambled,
                   visit: Callable[[str, Any], None] | None = None, first_seed: int = 10) -> None:
    """root/NAME for each PEFT config, saved by PEFT: each adapter on `base` (unloaded again after; a
    prompt-learning adapter wraps `base` and leaves it as it is), its trainable tensors set by `perturb`
    (torch seeded first_seed, first_seed + 1, ...); `visit(name, adapted model)` runs before the unload."""
    for i, (name, make) in enumerate(configs.items()):
        torch.manual_seed(first_seed + i)
        config = make()
        adapted = peft.get_peft_model(base, config)
        with torch.no_grad():
            for tensor_name, p in adapted.named_parameters():
                if p.requires_grad:
                    perturb(tensor_name, p)
        adapted.save_pretrained(root / name)
        if visit is not None:
            visit(name, adapted.eval())
        if not config.is_prompt_learning:
            base = adapted.unload()


def write_base_and_adapters(root: Path, config: Mapping[str, Any], configs: Mapping[str, Callable[[], Any]],
                            **options: Any) -> transformers.PreTrainedModel:
    """root/base, tiny_llama(config) saved by transformers, and root/NAME for each PEFT config
    (write_adapters with `options`); the base model, as write_adapters leaves it."""
    base = tiny_llama(config)
    base.save_pretrained(root / "base")
    write_adapters(root, base, configs, **options)
    return base
