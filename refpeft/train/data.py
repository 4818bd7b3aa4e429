"""Training data: text packed into blocks, or instruction/chat JSONL with the loss on the responses only.

Two sources, chosen by the file name (`read_dataset`):

  plain text (any name not ending in .jsonl)
      The whole file is one document: ids = tokenizer.encode(text) (with the special tokens the
      tokenizer adds, as `tokenizer(text)` does), cut into floor(n / block_size) blocks of
      block_size tokens; the remainder is dropped (transformers' run_clm `group_texts`).
      labels = ids: every position is a target (the causal-LM loss shifts the labels itself).

  JSONL (one JSON object a line; blank lines are skipped), either
      {"instruction": I, "input": X (optional), "output": O}   -> messages
          [{"role": "user", "content": I or I + "\n\n" + X}, {"role": "assistant", "content": O}]
      {"messages": [{"role": ..., "content": ...}, ...]}        the last message must be the
          assistant's: it is the response; everything before it (earlier assistant turns too)
          is the prompt.
      The conversation is rendered through the tokenizer's chat template (refpeft.model.tokenizer)
      and tokenised without added special tokens, as `apply_chat_template(..., tokenize=True)`
      does (the template writes them). With
          prompt = template(messages[:-1], add_generation_prompt=True),  full = template(messages),
      prompt must be a prefix of full, and a token is a target when it holds any character of
      full[len(prompt):] (the response and what the template writes after it, e.g. <|im_end|>);
      every other label is -100. Sequences are cut to block_size tokens (from the right); a line
      whose response then has no target left is skipped and listed in `TokenDataset.skipped`.

Batches (`micro_batch`): examples are taken from a stream that visits the dataset once per epoch
in a shuffled order, `numpy.random.default_rng([seed, epoch]).permutation(n)`, so stream position
p is example order(p // n)[p % n]: a run's data position is one integer, and a resumed run reads
the same examples. A micro-batch pads its rows on the right to its longest row with the pad id
(the tokenizer's pad token, else its eos, else 0); padding has attention_mask 0 and label -100.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from refpeft.errors import ConfigError, FormatError, InputError

IGNORE_INDEX = -100  # the label transformers' loss ignores


@dataclass(frozen=True)
class Example:
    """One training sequence: token ids and labels (IGNORE_INDEX where not a target), and where it came from."""

    ids: np.ndarray       # (s,) int64
    labels: np.ndarray    # (s,) int64
    source: str           # "block 3", "line 17"


@dataclass(frozen=True)
class TokenDataset:
    """Tokenised examples, the pad id batches use, and the JSONL lines left out (response beyond block_size)."""

    examples: tuple[Example, ...]
    pad_id: int
    block_size: int
    skipped: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.examples)

    def fingerprint(self) -> str:
        """sha256 over every example's ids and labels and the pad id: a resumed run checks it sees the same data."""
        h = hashlib.sha256(f"pad={self.pad_id};block={self.block_size};n={len(self.examples)}".encode())
        for e in self.examples:
            h.update(np.ascontiguousarray(e.ids, dtype="<i8").tobytes())
            h.update(np.ascontiguousarray(e.labels, dtype="<i8").tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class Batch:
    """A padded micro-batch, the decoder's inputs (NumPy int64)."""

    ids: np.ndarray             # (b, s)
    labels: np.ndarray          # (b, s)  IGNORE_INDEX on prompts and padding
    attention_mask: np.ndarray  # (b, s)  1 on tokens, 0 on padding

    @property
    def tokens(self) -> int:
        """Tokens the model reads (padding excluded): the numerator of tokens/s."""
        return int(self.attention_mask.sum())

    @property
    def targets(self) -> int:
        """Counted targets, labels[:, 1:] != -100 (the loss shifts): transformers' num_items_in_batch."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def read_dataset(path: str | os.PathLike, tokenizer: Any, *, block_size: int) -> TokenDataset:
    """The dataset of a text file or a .jsonl file (module docstring); FormatError naming the file or line."""
    source = Path(path)
    if not source.is_file():
        raise FormatError(f"{source}: no such data file")
    if tokenizer is None:
        raise ConfigError("the base model has no tokenizer (tokenizer.json), so text data cannot be tokenised")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{source}: not UTF-8 text ({exc})") from None
    if source.suffix.lower() == ".jsonl":
        return instruction_dataset(text.splitlines(), tokenizer, block_size=block_size, source=str(source))
    return packed_text_dataset(text, tokenizer, block_size=block_size)


def packed_text_dataset(text: str, tokenizer: Any, *, block_size: int) -> TokenDataset:
    """floor(n / block_size) blocks of the text's n token ids, labels = ids (module docstring)."""
    _check_block_size(block_size)
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)                       # (n,)
    count = ids.shape[0] // block_size
    if count == 0:
        raise InputError(f"the text has {ids.shape[0]} tokens, fewer than one block of {block_size}; "
                         "use a smaller block size or more text")
    blocks = ids[: count * block_size].reshape(count, block_size)                  # (count, block_size)
    examples = tuple(Example(ids=b.copy(), labels=b.copy(), source=f"block {i}") for i, b in enumerate(blocks))
    return TokenDataset(examples, pad_id=pad_id(tokenizer), block_size=block_size)


def instruction_dataset(lines: Iterable[str], tokenizer: Any, *, block_size: int,
                        source: str = "<jsonl>") -> TokenDataset:
    """One example per non-blank JSONL line, labels on the response only (module docstring)."""
    _check_block_size(block_size)
    examples, skipped = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        messages = chat_messages(_json_line(line, number=number, source=source), number=number, source=source)
        ids, labels = response_labels(tokenizer, messages, where=f"{source}: line {number}")
        ids, labels = ids[:block_size], labels[:block_size]
        if not np.any(labels[1:] != IGNORE_INDEX):         # position 0 is never a target
            skipped.append(number)
            continue
        examples.append(Example(ids=ids, labels=labels, source=f"line {number}"))
    if not examples:
        raise InputError(f"{source}: no example with a response within {block_size} tokens"
                         + (f" (lines {skipped[:5]} were cut before their response)" if skipped else " (no lines)"))
    return TokenDataset(tuple(examples), pad_id=pad_id(tokenizer), block_size=block_size, skipped=tuple(skipped))


def chat_messages(record: dict[str, Any], *, number: int, source: str = "<jsonl>") -> list[dict[str, str]]:
    """The conversation of one JSONL record: its "messages", or instruction/input/output as user + assistant."""
    where = f"{source}: line {number}"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise FormatError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise FormatError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if messages[-1]["role"] != "assistant":
            raise FormatError(f"{where}: the last message is the response and must have role 'assistant', "
                              f"not {messages[-1]['role']!r}")
        return [dict(m) for m in messages]
    if "instruction" in record and "output" in record:
        fields = {k: record.get(k, "") for k in ("instruction", "input", "output")}
        bad = [k for k, v in fields.items() if not isinstance(v, str)]
        if bad:
            raise FormatError(f"{where}: field {bad[0]!r} must be a string")
        prompt = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": fields["output"]}]
    raise FormatError(f"{where}: expected 'messages', or 'instruction' and 'output' (with an optional 'input'); "
                      f"the line has {sorted(record) or 'no fields'}")


def response_labels(tokenizer: Any, messages: list[dict[str, str]], *,
                    where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of the rendered conversation: labels are the ids on the response's tokens, -100 elsewhere."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages)
    if not full.startswith(prompt):
        raise FormatError(f"{where}: the chat template does not render the prompt (the conversation without its "
                          "last message, with the generation prompt) as a prefix of the whole conversation, so the "
                          "response cannot be located")
    encoding = tokenizer.backend.encode(full, add_special_tokens=False)
    ids = np.asarray(encoding.ids, dtype=np.int64)                                # (s,)
    ends = np.asarray([end for _, end in encoding.offsets], dtype=np.int64)       # (s,)  character offsets
    labels = np.where(ends > len(prompt), ids, IGNORE_INDEX)                      # a token holding a response character
    return ids, labels


def pad_id(tokenizer: Any) -> int:
    """The id padding uses: the pad token, else eos, else 0 (padding is masked, so its value never counts)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def stream_indices(count: int, *, start: int, size: int, seed: int) -> list[int]:
    """The dataset indices at stream positions start .. start + size - 1 (one shuffled pass per epoch)."""
    if count < 1:
        raise InputError("the dataset is empty")
    return [int(example_order(count, seed=seed, epoch=p // count)[p % count]) for p in range(start, start + size)]


@functools.lru_cache(maxsize=4)
def example_order(count: int, *, seed: int, epoch: int) -> np.ndarray:
    """Epoch `epoch`'s order of `count` examples: default_rng([seed, epoch]).permutation(count) (read-only)."""
    order = np.random.default_rng([seed, epoch]).permutation(count)
    order.setflags(write=False)
    return order


def micro_batch(dataset: TokenDataset, *, start: int, size: int, seed: int) -> Batch:
    """The `size` examples at stream positions start.. (see `stream_indices`), padded into one Batch."""
    return pad_batch([dataset.examples[i] for i in stream_indices(len(dataset), start=start, size=size, seed=seed)],
                     pad_id=dataset.pad_id)


def pad_batch(examples: list[Example], *, pad_id: int) -> Batch:
    """Right-pad the examples to the longest: ids with pad_id, labels with -100, attention_mask 0."""
    length = max(e.ids.shape[0] for e in examples)
    ids = np.full((len(examples), length), pad_id, dtype=np.int64)
    labels = np.full((len(examples), length), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(examples), length), dtype=np.int64)
    for row, e in enumerate(examples):
        n = e.ids.shape[0]
        ids[row, :n], labels[row, :n], mask[row, :n] = e.ids, e.labels, 1
    return Batch(ids=ids, labels=labels, attention_mask=mask)


def _json_line(line: str, *, number: int, source: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{source}: line {number} is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise FormatError(f"{source}: line {number} must be a JSON object, got {type(record).__name__}")
    return record


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 2:
        raise ConfigError(f"block_size must be an integer of at least 2 (a target needs a token before it), "
                          f"got {block_size!r}")
