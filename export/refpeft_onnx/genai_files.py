"""The files onnxruntime-genai reads next to model.onnx: genai_config.json and the tokenizer.

genai_config.json names the decoder's inputs and outputs (refpeft_onnx.decoder_graph's names), the
model's sizes and the default search options (greedy, transformers' defaults otherwise). The KV
cache grows by concatenation (present = concat(past, new)), so past_present_share_buffer is false.
A graph with prompt learning's prefix (refpeft_onnx.prefix_graph) shifts every position by its k
virtual tokens, so its context_length (and default max_length) is max_position_embeddings less
the largest k of its adapters.

The tokenizer is written as transformers saves a fast tokenizer: tokenizer.json (the `tokenizers`
serialisation, post-processor included) and tokenizer_config.json (special tokens, chat template),
which refpeft.model.tokenizer reads back. The chat template goes inside tokenizer_config.json, not
in a chat_template.jinja file: onnxruntime-genai 0.18 fails to open a model folder holding one
("Cannot know how to parse line"; conformance/FINDINGS.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from refpeft.io import atomic_write_bytes
from refpeft.model.config import ModelConfig
from refpeft.model.tokenizer import Tokenizer

from refpeft_onnx.decoder_graph import INPUT_NAMES, OUTPUT_NAMES

MODEL_FILE = "model.onnx"
CONFIG_FILE = "genai_config.json"
ADAPTERS_FOLDER = "adapters"


def genai_config(config: ModelConfig, tokenizer: Tokenizer | None, *, virtual_tokens: int = 0) -> dict[str, Any]:
    """genai_config.json's content for a decoder graph of `config` (virtual_tokens: the positions a prefix takes)."""
    context = config.max_position_embeddings - virtual_tokens
    eos = config.eos_token_id if config.eos_token_id is not None else (tokenizer and tokenizer.eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else (tokenizer and tokenizer.pad_token_id)
    bos = config.bos_token_id if config.bos_token_id is not None else (tokenizer and tokenizer.bos_token_id)
    eos = list(eos) if isinstance(eos, tuple) else eos
    decoder = {"session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
               "filename": MODEL_FILE, "head_size": config.head_dim, "hidden_size": config.hidden_size,
               "inputs": dict(INPUT_NAMES), "outputs": dict(OUTPUT_NAMES),
               "num_attention_heads": config.num_attention_heads, "num_hidden_layers": config.num_hidden_layers,
               "num_key_value_heads": config.num_key_value_heads}
    model = {"context_length": context, "decoder": decoder, "type": config.model_type,
             "vocab_size": config.vocab_size,
             **{k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)) if v is not None}}
    search = {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
              "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
              "temperature": 1.0, "top_k": 50, "top_p": 1.0}
    return {"model": model, "search": search}


def write_genai_config(folder: Path, config: ModelConfig, tokenizer: Tokenizer | None, *,
                       virtual_tokens: int = 0) -> Path:
    content = genai_config(config, tokenizer, virtual_tokens=virtual_tokens)
    return atomic_write_bytes(folder / CONFIG_FILE, (json.dumps(content, indent=2) + "\n").encode())


def write_tokenizer(folder: Path, tokenizer: Tokenizer) -> None:
    """tokenizer.json and tokenizer_config.json (module docstring)."""
    atomic_write_bytes(folder / "tokenizer.json", tokenizer.backend.to_str(pretty=True).encode())
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                **{name: token for name, token in tokenizer.special_tokens.items() if token is not None}}
    if tokenizer.chat_template is not None:
        settings["chat_template"] = tokenizer.chat_template
    atomic_write_bytes(folder / "tokenizer_config.json", (json.dumps(settings, indent=2) + "\n").encode())
