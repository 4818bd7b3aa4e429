"""Text from an exported folder through onnxruntime-genai: greedy or sampled, with any of its adapters or none.

refpeft encodes the prompt itself (refpeft.model.tokenizer, the folder's tokenizer.json and chat
template) and hands genai token ids, so the ids are the ones refpeft's and transformers' generate
see; genai runs the decode loop (its KV cache, its search) and refpeft decodes the new ids.
Sampling uses genai's own generator (seeded by `seed`), so sampled text is reproducible through
genai but not equal to refpeft's NumPy draws.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from refpeft.errors import ConfigError, FormatError

from refpeft_onnx.genai_files import ADAPTERS_FOLDER, CONFIG_FILE


@dataclass(frozen=True)
class GenaiSampling:
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0


class GenaiModel:
    """An exported folder loaded once in onnxruntime-genai, with every adapter file in adapters/."""

    def __init__(self, folder: str | os.PathLike) -> None:
        import onnxruntime_genai as og

        self.folder = Path(folder)
        if not (self.folder / CONFIG_FILE).is_file():
            raise FormatError(f"{self.folder}: no {CONFIG_FILE}; export a model with `refpeft export BASE -o DIR`")
        try:
            self.model = og.Model(str(self.folder))
        except RuntimeError as exc:
            raise FormatError(f"{self.folder}: onnxruntime-genai cannot load it ({exc})") from None
        self.config = json.loads((self.folder / CONFIG_FILE).read_text(encoding="utf-8"))
        files = sorted((self.folder / ADAPTERS_FOLDER).glob("*.onnx_adapter"))
        self.adapter_names = [f.stem for f in files]
        self.adapters = og.Adapters(self.model) if files else None
        for f in files:
            self.adapters.load(str(f), f.stem)

    def generate(self, ids: Sequence[int], *, max_new_tokens: int, adapter: str | None = None,
                 sampling: GenaiSampling | None = None, eos_token_id: int | Sequence[int] | None = None) -> list[int]:
        """The new token ids after `ids` (greedy unless `sampling`), stopping after eos or max_new_tokens."""
        import onnxruntime_genai as og

        if adapter is not None and adapter not in self.adapter_names:
            raise ConfigError(f"no adapter {adapter!r} in {self.folder / ADAPTERS_FOLDER}; it has "
                              f"{self.adapter_names or 'none'}")
        context = self.config["model"]["context_length"]
        if len(ids) + max_new_tokens > context:
            raise ConfigError(f"{len(ids)} prompt tokens + {max_new_tokens} new ones exceed the model's "
                              f"{context} positions")
        params = og.GeneratorParams(self.model)
        options: dict[str, Any] = {"max_length": len(ids) + max_new_tokens, "do_sample": sampling is not None}
        if sampling is not None:
            options.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                           random_seed=sampling.seed)
        params.set_search_options(**options)
        generator = og.Generator(self.model, params)
        if adapter is not None:
            generator.set_active_adapter(self.adapters, adapter)
        generator.append_tokens(np.asarray([list(ids)], dtype=np.int32))
        eos = set([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        new: list[int] = []
        while not generator.is_done() and len(new) < max_new_tokens:
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
            if new[-1] in eos:
                break
        return new
