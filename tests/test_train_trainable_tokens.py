"""`refpeft train --trainable-tokens`: LoRA + trainable-token folders and TRAINABLE_TOKENS folders, against PEFT.

- The gradient of the token rows of an Adapter carrying them (Adapter.token_values, the decoder's
  TOKENS gradient) equals torch + PEFT autograd of LoraConfig(trainable_token_indices=...) in float64,
  read from the folder PEFT wrote (which so loads in refpeft with equal logits), tied head or not.
- `refpeft train --trainable-tokens` beside LoRA, and alone (--method trainable-tokens), writes a
  folder PeftModel.from_pretrained loads with refpeft's logits; `refpeft generate --adapter` on it
  continues a prompt as PEFT's greedy argmax does; --stop-after/--resume gives the same rows.
- A token outside the vocabulary (id or unknown token) exits with status 2 and writes nothing;
  combining, merging and ONNX export refuse an adapter with rows (they do not carry them yet).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from refpeft.cli import main
from refpeft.io import read_safetensors
from refpeft.model.config import config_from_dict
from refpeft.model.decoder import loss_and_gradients
from refpeft.model.generate import prompt_ids
from refpeft.model.load import load_model
from refpeft.model.trainable_tokens import EMBED, KEY, LORA_KEY, TOKENS
from refpeft.model.weights import save_model_folder
from refpeft.peft_format import read_peft_adapter
from tests.test_model_decoder import _float64_inv_freq, float64_transformers, padded_batch, peer_model, rel_err, \
    refpeft_model
from tests.test_train_command import RECORDS, refpeft_logits
from tests.test_train_data import word_tokenizer

torch = pytest.importorskip("torch", reason="PEFT on torch is the peer")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V = 61
NAMES = ["llama-gqa-llama3", "llama-tied"]


@pytest.fixture(scope="module", params=NAMES)
def base(request, tmp_path_factory):
    """A tiny float64 Llama folder (tied head or not) with a word-level tokenizer and instruction data."""
    folder = tmp_path_factory.mktemp(request.param)
    peer = peer_model(request.param)
    config = config_from_dict(peer.config.to_dict())
    weights = {n: t.detach().numpy().copy() for n, t in peer.state_dict().items()
               if not n.endswith("inv_freq") and not (config.tie_word_embeddings and n == "lm_head.weight")}
    save_model_folder(folder, config, weights)
    word_tokenizer().backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "<|im_end|>",
                                                              "unk_token": "<unk>"}))
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return folder


def train_args(base, out, *extra):
    return ["train", str(base), "--data", str(base / "data.jsonl"), "--steps", "3", "--rank", "4", "--alpha", "8",
            "--lr", "5e-2", "--batch-size", "2", "--block-size", "32", "--dtype", "float64", "--seed", "1",
            "-o", str(out), *extra]


def hf_model(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager")
    _float64_inv_freq(model, "llama")
    return model.eval()


def peer_logits(peer, ids, mask):
    with float64_transformers("llama"), torch.no_grad():
        return peer(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def the_ids(folder):
    """Tokens of the data (so the embedding rows get a gradient) and one the tied head alone sees."""
    tokenizer = load_model(folder)[2]
    return [tokenizer.backend.token_to_id("sky"), tokenizer.backend.token_to_id("blue"), 40]


@pytest.mark.parametrize("name", NAMES)
def test_token_row_gradients_equal_peft(name, tmp_path):
    ids, mask, labels = padded_batch(V)
    indices = [int(ids[0, 0]), int(ids[1, 3]), 17, 40]
    peer = peft.get_peft_model(peer_model(name), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                 trainable_token_indices=indices))
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in peer.named_parameters():
            if "trainable_tokens_delta" in n or "lora_B" in n:
                p.copy_(0.3 * torch.randn_like(p))
    peer.save_pretrained(tmp_path / "peft")
    with float64_transformers("llama"):
        logits = peer(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), torch.from_numpy(labels[:, 1:]).reshape(-1)
                                          ).backward()
    adapter = read_peft_adapter(tmp_path / "peft")
    assert adapter.token_indices == tuple(indices) and len(adapter.modules) == 4
    loss, ours, grads = loss_and_gradients(refpeft_model(peer_model(name), adapter), ids, labels, attention_mask=mask)
    rows = mask == 1
    assert rel_err(ours[rows], logits.detach().numpy()[rows]) < 1e-10
    delta = next(p for n, p in peer.named_parameters() if "trainable_tokens_delta" in n)
    assert EMBED not in grads and rel_err(grads[TOKENS], delta.grad.numpy()) < 1e-9
    for n, p in peer.named_parameters():
        if "lora_B" in n:
            path = n.removeprefix("base_model.model.").split(".lora_B")[0]
            assert rel_err(grads[f"{path}.B"], p.grad.numpy()) < 1e-9


def test_lora_with_tokens_trains_and_loads_in_peft(base, tmp_path, capsys):
    out = tmp_path / "run"
    indices = the_ids(base)
    tokens = f"sky,{indices[1]},{indices[2]}"                # a token, an id, an id
    assert main(train_args(base, out, "--trainable-tokens", tokens)) == 0
    assert "and 3 trainable token rows" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == indices
    tensors, _ = read_safetensors(out / "adapter_model.safetensors")
    assert LORA_KEY in tensors and KEY not in tensors
    model_config, weights, _ = load_model(base, dtype="float64")
    moved = np.any(tensors[LORA_KEY] != weights[EMBED][indices], axis=1)
    assert moved.tolist() == [True, True, model_config.tie_word_embeddings]   # 40: a gradient from a tied head only
    peer = peft.PeftModel.from_pretrained(hf_model(base), out).eval()
    ids, mask, _ = padded_batch(V)
    rows = mask.astype(bool)
    adapter = read_peft_adapter(out)
    assert rel_err(refpeft_logits(base, adapter, ids, mask)[rows], peer_logits(peer, ids, mask)[rows]) < 1e-10

    tokenizer = load_model(base)[2]
    prompt = prompt_ids(tokenizer, "what colour is the sky", chat=False)
    sequence = list(prompt)
    for _ in range(4):                                                    # PEFT's greedy continuation
        logits = peer_logits(peer, np.asarray([sequence]), np.ones((1, len(sequence)), dtype=np.int64))
        sequence.append(int(np.argmax(logits[0, -1])))
        if sequence[-1] == tokenizer.eos_token_id:
            break
    assert main(["generate", str(base), "--adapter", str(out), "--prompt", "what colour is the sky", "--no-chat",
                 "--max-new-tokens", "4", "--dtype", "float64"]) == 0
    expected = tokenizer.decode(sequence[len(prompt):], skip_special_tokens=True)
    assert capsys.readouterr().out.strip() == expected.strip()


def test_tokens_alone_load_in_peft_and_resume(base, tmp_path, capsys):
    out, split = tmp_path / "alone", tmp_path / "split"
    extra = ("--method", "trainable-tokens", "--trainable-tokens", ",".join(map(str, the_ids(base))), "--steps", "4")
    assert main(train_args(base, out, *extra)) == 0
    assert "3 trainable token rows" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "TRAINABLE_TOKENS" and config["token_indices"] == the_ids(base)
    peer = peft.PeftModel.from_pretrained(hf_model(base), out).eval()
    ids, mask, _ = padded_batch(V)
    rows = mask.astype(bool)
    adapter = read_peft_adapter(out)
    assert not adapter.modules
    assert rel_err(refpeft_logits(base, adapter, ids, mask)[rows], peer_logits(peer, ids, mask)[rows]) < 1e-10
    assert main(train_args(base, split, *extra, "--stop-after", "2")) == 0
    assert main(train_args(base, split, *extra, "--resume")) == 0
    a, _ = read_safetensors(out / "adapter_model.safetensors")
    b, _ = read_safetensors(split / "adapter_model.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("tokens, message", [(f"3,{V}", f"token index {V} is outside the vocabulary"),
                                             ("3,-1", "token index -1 is outside the vocabulary"),
                                             ("3,zebra-stripes", "neither a token id nor a token"),
                                             ("3,3", "token indices repeat")])
def test_bad_token_indices_are_refused(base, tmp_path, capsys, tokens, message):
    out = tmp_path / "bad"
    assert main(train_args(base, out, "--trainable-tokens", tokens)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_combining_merging_and_export_refuse_token_rows(tmp_path):
    """They do not carry the rows yet, so an adapter with rows is refused rather than silently cut."""
    from refpeft.adapter import Adapter, ModuleAdapter
    from refpeft.checkpoint import SafetensorsFile, merge_into_checkpoint
    from refpeft.errors import ConfigError
    from refpeft.fusion import combine_adapters
    from refpeft.io import write_safetensors

    rng = np.random.default_rng(0)
    module = ModuleAdapter("lora", {"A": rng.normal(size=(2, 8)), "B": rng.normal(size=(8, 2))})
    adapter = Adapter({"linear": module}, token_indices=(1, 2), token_values=rng.normal(size=(2, 8)))
    with pytest.raises(ConfigError, match="trains embedding rows"):
        combine_adapters([adapter, adapter], [0.5, 0.5])
    write_safetensors(tmp_path / "base.safetensors", {"linear.weight": rng.normal(size=(8, 8)),
                                                      EMBED: rng.normal(size=(5, 8))})
    with pytest.raises(ConfigError, match="trains embedding rows"):
        merge_into_checkpoint(adapter, SafetensorsFile(tmp_path / "base.safetensors"), tmp_path / "merged.safetensors")
    assert not (tmp_path / "merged.safetensors").exists()
    onnx_stack = pytest.importorskip("refpeft_onnx.stack")
    with pytest.raises(ConfigError, match="trains embedding rows"):
        onnx_stack.check_adapter(onnx_stack.single_layer(rng.normal(size=(8, 8))), adapter)
