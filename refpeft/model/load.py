"""One entry point for a whole model: a Hugging Face model folder or a GGUF file -> (config, weights, tokenizer).

    folder/                         config.json, model.safetensors or model.safetensors.index.json
                                    + shards, tokenizer.json (+ tokenizer_config.json): refpeft.model.weights
                                    and refpeft.model.tokenizer
    file.gguf                       one file holding all three: refpeft.model.gguf_file

The weights come back as a plain dict from transformers' tensor names (refpeft.model.weights lists
them) to arrays of namespace `xp` (NumPy by default) in `dtype` ("float32" or "float64"). A folder
without tokenizer.json loads with tokenizer None (random test models have none). `load_tokenizer`
reads only the tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from refpeft.errors import FormatError
from refpeft.model.config import ModelConfig
from refpeft.model.tokenizer import Tokenizer, tokenizer_from_folder
from refpeft.model.weights import load_model_folder


def load_model(path: str | os.PathLike, *, dtype: str = "float32",
               xp: Any = None) -> tuple[ModelConfig, dict[str, Any], Tokenizer | None]:
    """(config, weights, tokenizer) of a model folder or a .gguf file (see the module docstring)."""
    source = Path(path)
    if source.is_dir():
        config, weights = load_model_folder(source, dtype=dtype, xp=xp)
        tokenizer = tokenizer_from_folder(source) if (source / "tokenizer.json").is_file() else None
        return config, weights, tokenizer
    if source.is_file():
        from refpeft.model.gguf_file import load_gguf  # imports the gguf package only when needed

        return load_gguf(source, dtype=dtype, xp=xp)
    raise FormatError(f"{source}: no such model folder or GGUF file")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Just the tokenizer of a model folder or a .gguf file (no weights are read)."""
    source = Path(path)
    if source.is_dir():
        return tokenizer_from_folder(source)
    if source.is_file():
        from refpeft.model.gguf_file import gguf_tokenizer, open_gguf

        return gguf_tokenizer(open_gguf(source), source=source)
    raise FormatError(f"{source}: no such model folder or GGUF file")
