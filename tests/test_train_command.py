"""`refpeft train` end to end, and its adapters against PEFT.

- On a tiny Llama folder written by save_model_folder, with a word-level tokenizer.json built in
  the test, `refpeft train` runs a few float64 steps on instruction JSONL (LoRA, rsLoRA, DoRA,
  VeRA) and writes a PEFT folder that `PeftModel.from_pretrained` loads with the same logits as
  refpeft (the float64 peer of tests/test_model_decoder.py, 1e-10); a progress bar shows the loss
  and tokens/s.
- An adapter trained by PEFT in torch loads in refpeft with the same logits.
- --stop-after then --resume writes the same adapter, bit for bit, as one uninterrupted run.
- --method full writes a model folder; text data packs into blocks.
- Bad input (a missing data file, an unknown target, an unsupported method, a bad JSONL line, a
  run directory in use, nothing to resume, a bad dtype) exits with status 2, says what is wrong,
  and writes nothing.
"""

from __future__ import annotations

import json
import numpy as np
import pytest

from refpeft.cli import main
from refpeft.io import read_safetensors
from refpeft.model.config import config_from_dict
from refpeft.model.decoder import Model, forward
from refpeft.model.load import load_model
from refpeft.model.weights import save_model_folder
from refpeft.peft_format import read_peft_adapter
from tests.test_model_decoder import _float64_inv_freq, float64_transformers, padded_batch, peer_model, rel_err
from tests.test_train_data import WORDS, word_tokenizer

torch = pytest.importorskip("torch", reason="PEFT on torch is the peer")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

NAME, FAMILY = "llama-gqa-llama3", "llama"
RECORDS = [{"instruction": "name a colour", "output": "red"},
           {"instruction": "what colour is the sky", "output": "the sky is blue"},
           {"messages": [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello there"}]},
           {"instruction": "one two three", "input": "four five", "output": "six seven eight nine ten"},
           {"instruction": "what colour are the sky and sea", "output": "both are blue"}]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny float64 Llama (the decoder tests' random weights) with a word-level tokenizer."""
    folder = tmp_path_factory.mktemp("base")
    peer = peer_model(NAME)
    config = config_from_dict(peer.config.to_dict())
    weights = {n: t.detach().numpy().copy() for n, t in peer.state_dict().items() if not n.endswith("inv_freq")}
    save_model_folder(folder, config, weights)
    word_tokenizer().backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "<|im_end|>",
                                                              "unk_token": "<unk>"}))
    data = folder / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    (folder / "text.txt").write_text(" ".join(WORDS * 3))
    return folder


def train_args(base, out, *extra):
    return ["train", str(base), "--data", str(base / "data.jsonl"), "--steps", "3", "--rank", "4", "--alpha", "8",
            "--lr", "2e-2", "--batch-size", "2", "--grad-accum", "2", "--warmup", "1", "--schedule", "cosine",
            "--block-size", "32", "--dtype", "float64", "--seed", "1", "-o", str(out), *extra]


def assert_resume_writes_the_same(base, tmp_path, *extra):
    """`refpeft train ... --stop-after 2` (no adapter written yet), then `--resume`, writes the adapter
    one uninterrupted run writes, bit for bit (tmp_path/straight and tmp_path/split)."""
    assert main(train_args(base, tmp_path / "straight", *extra)) == 0
    assert main(train_args(base, tmp_path / "split", *extra, "--stop-after", "2")) == 0
    assert not (tmp_path / "split" / "adapter_model.safetensors").exists()
    assert main(train_args(base, tmp_path / "split", *extra, "--resume")) == 0
    a, _ = read_safetensors(tmp_path / "straight" / "adapter_model.safetensors")
    b, _ = read_safetensors(tmp_path / "split" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def hf_model(base):
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64, attn_implementation="eager")
    _float64_inv_freq(model, FAMILY)
    return model.eval()


def refpeft_logits(base, adapter, ids, mask):
    config, weights, _ = load_model(base, dtype="float64")
    return forward(Model(config, weights, adapter), ids, attention_mask=mask)[0]


def peer_logits(peer, ids, mask):
    with float64_transformers(FAMILY), torch.no_grad():
        return peer(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "vera"])
def test_trained_adapter_loads_in_peft_with_equal_logits(base_folder, tmp_path, capsys, method):
    out = tmp_path / "run"
    assert main(train_args(base_folder, out, "--method", method, "--targets", "q_proj,v_proj,up_proj")) == 0
    captured = capsys.readouterr()
    assert "loss=" in captured.err and "tok_s=" in captured.err and "3/3" in captured.err
    assert f"wrote {out}: a {'lora' if method == 'rslora' else method} adapter of 6 modules" in captured.out
    adapter = read_peft_adapter(out)
    trained = [m.lambda_b if method == "vera" else m.B for m in adapter.modules.values()]
    assert all(np.any(t != 0) for t in trained)                    # every module left its zero init
    peer = peft.PeftModel.from_pretrained(hf_model(base_folder), out).eval()
    ids, mask, _ = padded_batch(61)
    rows = mask.astype(bool)
    assert rel_err(refpeft_logits(base_folder, adapter, ids, mask)[rows], peer_logits(peer, ids, mask)[rows]) < 1e-10


@pytest.mark.parametrize("dora", [False, True])
def test_peft_trained_adapter_loads_in_refpeft(base_folder, tmp_path, dora):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=dora, target_modules=["k_proj", "o_proj", "down_proj"])
    peer = peft.get_peft_model(hf_model(base_folder), config)
    optimizer = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=1e-2)
    ids, mask, labels = padded_batch(61)
    for _ in range(2):
        with float64_transformers(FAMILY):
            logits = peer(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 61), torch.from_numpy(labels[:, 1:]).reshape(-1)
                                          ).backward()
        optimizer.step()
        optimizer.zero_grad()
    peer.save_pretrained(tmp_path / "peft")
    adapter = read_peft_adapter(tmp_path / "peft")
    assert adapter.method == ("dora" if dora else "lora") and len(adapter.modules) == 6
    rows = mask.astype(bool)
    ours = refpeft_logits(base_folder, adapter, ids, mask)
    assert rel_err(ours[rows], peer_logits(peer.eval(), ids, mask)[rows]) < 1e-10


def test_stop_and_resume_write_the_same_adapter(base_folder, tmp_path):
    assert_resume_writes_the_same(base_folder, tmp_path, "--steps", "4", "--loraplus-ratio", "4",
                                  "--accumulation", "tokens")


def test_full_fine_tuning_on_packed_text(base_folder, tmp_path):
    out = tmp_path / "full"
    text = str(base_folder / "text.txt")
    assert main(train_args(base_folder, out, "--method", "full", "--data", text, "--block-size", "8")) == 0
    config, weights, _ = load_model(out, dtype="float64")
    _, before, _ = load_model(base_folder, dtype="float64")
    assert config == load_model(base_folder)[0]
    assert all(not np.array_equal(weights[n], before[n]) for n in weights)


@pytest.mark.parametrize("change, message", [
    (("--data", "missing.jsonl"), "--data missing.jsonl: no such file"),
    (("--targets", "q_proj,qkv_proj"), "target 'qkv_proj' matches no linear layer"),
    (("--method", "sora"), "unsupported adapter method 'sora'"),
    (("--data", "BAD"), "bad.jsonl: line 2: expected 'messages', or 'instruction' and 'output'"),
    (("--resume",), "has no checkpoint to continue from"),
    (("--dtype", "float16"), "--dtype must be float32 or float64"),
    (("--schedule", "step"), "unknown learning-rate schedule 'step'"),
    (("--rank-pattern", "q_proj:2"), "--rank-pattern: expected KEY=VALUE"),
    (("--nf4", "--method", "full"), "--nf4 stores a frozen 4-bit base"),
])
def test_bad_input_exits_2_and_writes_nothing(base_folder, tmp_path, capsys, change, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    change = tuple(str(bad) if c == "BAD" else c for c in change)
    out = tmp_path / "out"
    assert main(train_args(base_folder, out, *change)) == 2
    err = capsys.readouterr().err
    assert err.startswith("refpeft train: error:") and message in err, err
    assert not out.exists()


def test_a_finished_run_is_not_overwritten(base_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(base_folder, out)) == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    assert main(train_args(base_folder, out, "--lr", "1e-3")) == 2
    assert "already holds a training run; pass --resume" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_qlora_run_trains_an_adapter_on_a_four_bit_base(base_folder, tmp_path, capsys):
    """--nf4: every projection stored as bitsandbytes' NF4; the adapter trained on it differs from the
    one trained on the float base (the base it saw is the 4-bit one), and loads as a plain adapter."""
    runs = {}
    for name, extra in (("nf4", ("--nf4",)), ("float", ())):
        assert main(train_args(base_folder, tmp_path / name, *extra)) == 0
        runs[name] = read_peft_adapter(tmp_path / name)
    assert runs["nf4"].modules.keys() == runs["float"].modules.keys()
    for path, m in runs["nf4"].modules.items():
        assert np.any(m.B != 0) and not np.array_equal(m.B, runs["float"].modules[path].B)
