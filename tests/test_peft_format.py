"""refpeft.peft_format: PEFT adapter files, read and written without torch.

Specification: what refpeft writes it reads back exactly (every method, rank/alpha patterns,
biases, VeRA projections saved or regenerated); the pattern rule is PEFT's own; every defect is
refused with a refpeft error naming the file and the key; a pickle is never opened; an
interrupted write leaves the previous files; the CLI lists and merges adapters.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import safetensors.numpy

from refpeft import cli
from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.checkpoint import SafetensorsFile
from refpeft.errors import ConfigError, DTypeError, FormatError, NonFiniteError, RankError, ShapeError
from refpeft.methods.linear import LinearShape
from refpeft.peft_config import pattern_value, peft_config
from refpeft.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    read_peft_adapter,
    read_peft_adapter_with_base,
    write_peft_adapter,
)
from refpeft.methods.vera import largest_layer, vera_projections

SHAPES = {"model.layers.0.attn.q": LinearShape(k=8, d=8), "model.layers.0.attn.v": LinearShape(k=8, d=4),
          "model.layers.1.attn.q": LinearShape(k=8, d=8), "model.layers.0.mlp.down": LinearShape(k=12, d=8)}
RANKS = {"model.layers.0.attn.q": 4, "model.layers.0.attn.v": 2, "model.layers.1.attn.q": 4,
         "model.layers.0.mlp.down": 3}


def lora_adapter(*, dora: bool = False, rslora: bool = False, seed: int = 0, lora_bias: bool = False,
                 base_biases: bool = False) -> Adapter:
    rng = np.random.default_rng(seed)
    modules = {}
    for path, shape in SHAPES.items():
        r = RANKS[path]
        tensors = {"A": rng.standard_normal((r, shape.k)).astype(np.float32),
                   "B": rng.standard_normal((shape.d, r)).astype(np.float32),
                   "magnitude": rng.uniform(0.5, 2.0, shape.d).astype(np.float32) if dora else None,
                   "bias": rng.standard_normal(shape.d).astype(np.float32) if lora_bias and "v" not in path else None}
        modules[path] = ModuleAdapter("dora" if dora else "lora", tensors, alpha=16.0 if "mlp" in path else 8.0,
                                      rslora=rslora)
    biases = {"model.layers.0.attn.q": rng.standard_normal(8).astype(np.float32),
              "model.norm": rng.standard_normal(8).astype(np.float32)} if base_biases else {}
    return Adapter(modules=modules, base_biases=biases)


def vera_adapter(seed: int = 0) -> Adapter:
    rng = np.random.default_rng(seed)
    vera_A, vera_B = vera_projections(largest_layer(SHAPES.values()), 4, seed=21, dtype="float32")
    modules = {p: ModuleAdapter("vera", {"lambda_d": rng.standard_normal(4).astype(np.float32), "lambda_b": rng.standard_normal(s.d).astype(np.float32)}) for p, s in SHAPES.items()}
    return Adapter(modules=modules, vera_A=vera_A, vera_B=vera_B, config={"projection_prng_key": 21})


def assert_same_adapter(read: Adapter, written: Adapter) -> None:
    assert read.modules.keys() == written.modules.keys()
    for path, m in written.modules.items():
        got = read.modules[path]
        assert (got.method, got.r, got.alpha, got.rslora, got.scaling) == (m.method, m.r, m.alpha, m.rslora, m.scaling)
        for field in ("A", "B", "magnitude", "lambda_d", "lambda_b"):
            expected = getattr(m, field)
            if expected is None:
                assert getattr(got, field) is None
            else:
                np.testing.assert_array_equal(getattr(got, field), expected)
    for field in ("vera_A", "vera_B"):
        if getattr(written, field) is not None:
            np.testing.assert_array_equal(getattr(read, field), getattr(written, field))
    assert read.base_biases.keys() == written.base_biases.keys()
    for path, bias in written.base_biases.items():
        np.testing.assert_array_equal(read.base_biases[path], bias)


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "lora-biases"])
def test_lora_family_round_trip(kind, tmp_path):
    adapter = lora_adapter(dora=kind == "dora", rslora=kind == "rslora", lora_bias=kind == "lora-biases",
                           base_biases=kind == "lora-biases")
    write_peft_adapter(tmp_path, adapter)
    read = read_peft_adapter(tmp_path, base_shapes=SHAPES)
    assert_same_adapter(read, adapter)
    if kind == "lora-biases":  # PEFT's lora_bias is per config: modules without one get zeros
        np.testing.assert_array_equal(read.modules["model.layers.0.attn.v"].bias, np.zeros(4, np.float32))
        assert read.config["bias"] == "all"  # model.norm has no adapter


def test_written_config_uses_patterns_for_the_exceptions(tmp_path):
    config = peft_config(lora_adapter())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["rank_pattern"] == {r"^model\.layers\.0\.attn\.v": 2, r"^model\.layers\.0\.mlp\.down": 3}
    assert config["alpha_pattern"] == {r"^model\.layers\.0\.mlp\.down": 16}
    for path in SHAPES:
        assert pattern_value(config["rank_pattern"], path, config["r"])[0] == RANKS[path]


def test_vera_round_trip_with_and_without_saved_projections(tmp_path):
    adapter = vera_adapter()
    write_peft_adapter(tmp_path / "saved", adapter)
    assert_same_adapter(read_peft_adapter(tmp_path / "saved"), adapter)
    write_peft_adapter(tmp_path / "seed", adapter, save_projection=False)
    without_base = read_peft_adapter(tmp_path / "seed")
    assert without_base.vera_A is None and without_base.config["projection_prng_key"] == 21
    assert_same_adapter(read_peft_adapter(tmp_path / "seed", base_shapes=SHAPES), adapter)


def test_dtype_option_casts_every_tensor(tmp_path):
    write_peft_adapter(tmp_path, lora_adapter())
    read = read_peft_adapter(tmp_path, dtype="float64")
    assert all(m.A.dtype == np.float64 and m.B.dtype == np.float64 for m in read.modules.values())


@pytest.mark.parametrize("keys,path", [
    (["q_proj"], "model.layers.0.self_attn.q_proj"), (["layers.0.q"], "model.layers.0.q"),
    (["q"], "model.layers.0.attn.qq"), (["0.q", "q"], "model.layers.10.q"), (["attn\\.q", "q"], "a.attn.q"),
    (["layers\\.1\\.q"], "model.layers.11.q"), (["layers.1.*"], "model.layers.1.mlp.down"), ([".*down"], "x.down"),
])
def test_pattern_rule_is_peft_get_pattern_key(keys, path):
    other = pytest.importorskip("peft.utils.other", reason="checks the pattern rule against PEFT's own function")
    patterns = {key: i + 10 for i, key in enumerate(keys)}
    expected_key = other.get_pattern_key(patterns.keys(), path)
    assert pattern_value(patterns, path, 1) == ((patterns[expected_key], expected_key) if expected_key in patterns
                                                else (1, None))


# --- refusals ----------------------------------------------------------------------------------------


def _edit_tensors(folder, change):
    tensors = safetensors.numpy.load_file(str(folder / WEIGHTS_NAME))
    change(tensors)
    safetensors.numpy.save_file(tensors, str(folder / WEIGHTS_NAME))


def _edit_config(folder, change):
    config = json.loads((folder / CONFIG_NAME).read_text())
    change(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


Q = "base_model.model.model.layers.0.attn.q"

TENSOR_DEFECTS = {
    "missing key": (lambda t: t.pop(f"{Q}.lora_B.weight"), FormatError, f"missing key '{Q}.lora_B.weight'"),
    "extra key": (lambda t: t.update({f"{Q}.lora_C.weight": np.zeros(2, np.float32)}), FormatError,
                  f"unexpected key '{Q}.lora_C.weight'"),
    "not a peft key": (lambda t: t.update({"stray": np.zeros(2, np.float32)}), FormatError, "unexpected key 'stray'"),
    "rank against config": (lambda t: t.update({f"{Q}.lora_A.weight": np.zeros((3, 8), np.float32),
                                                f"{Q}.lora_B.weight": np.zeros((8, 3), np.float32)}),
                            RankError, f"{Q}.lora_A.weight has rank 3.*gives r = 4"),
    "rank against pattern": (lambda t: t.update({
        "base_model.model.model.layers.0.attn.v.lora_A.weight": np.zeros((4, 8), np.float32),
        "base_model.model.model.layers.0.attn.v.lora_B.weight": np.zeros((4, 4), np.float32)}),
        RankError, r"attn\.v\.lora_A\.weight has rank 4.*rank_pattern"),
    "B against A": (lambda t: t.update({f"{Q}.lora_B.weight": np.zeros((8, 3), np.float32)}), RankError,
                    f"{Q}.lora_B.weight has shape"),
    "conv factors": (lambda t: t.update({f"{Q}.lora_A.weight": np.zeros((4, 8, 1, 1), np.float32)}), ShapeError,
                     "conv"),
    "non-finite": (lambda t: t[f"{Q}.lora_A.weight"].__setitem__((0, 1), np.nan), NonFiniteError,
                   f"{Q}.lora_A.weight holds 1 non-finite"),
    "integer tensor": (lambda t: t.update({f"{Q}.lora_A.weight": np.zeros((4, 8), np.int32)}), DTypeError,
                       f"{Q}.lora_A.weight has dtype I32"),
    "embedding lora": (lambda t: t.update({"base_model.model.embed.lora_embedding_A": np.zeros((4, 8), np.float32)}),
                       ConfigError, "embedding"),
    "bias without bias option": (lambda t: t.update({f"{Q}.base_layer.bias": np.zeros(8, np.float32)}), FormatError,
                                 "bias = 'none'"),
    "lora_B bias without lora_bias": (lambda t: t.update({f"{Q}.lora_B.bias": np.zeros(8, np.float32)}),
                                      FormatError, "lora_bias false"),
    "magnitude without dora": (lambda t: t.update({f"{Q}.lora_magnitude_vector": np.ones(8, np.float32)}),
                               FormatError, "lora_magnitude_vector does not belong"),
}


@pytest.mark.parametrize("defect", sorted(TENSOR_DEFECTS))
def test_tensor_defects_name_file_and_key(defect, tmp_path):
    change, error, message = TENSOR_DEFECTS[defect]
    write_peft_adapter(tmp_path, lora_adapter())
    _edit_tensors(tmp_path, change)
    with pytest.raises(error, match=message) as raised:
        read_peft_adapter(tmp_path)
    assert WEIGHTS_NAME in str(raised.value)


CONFIG_DEFECTS = {
    "unsupported option": (lambda c: c.update(layer_replication=[[0, 1]]), "option 'layer_replication'"),
    "token indices without rows": (lambda c: c.update(trainable_token_indices=[1, 2]),
                                   "trainable_token_indices, but there is no"),
    "saved module without tensors": (lambda c: c.update(modules_to_save=["lm_head"]),
                                     "modules_to_save entry 'lm_head' selects no module with tensors"),
    "unknown option": (lambda c: c.update(use_magic=True), "option 'use_magic'"),
    "base-rewriting init": (lambda c: c.update(init_lora_weights="pissa_niter_4"), "pissa_niter_4"),
    "other method": (lambda c: c.update(peft_type="ADALORA"), "peft_type 'ADALORA'"),
    "bad rank": (lambda c: c.update(r=0), "r must be a positive integer"),
    "bad alpha": (lambda c: c.update(lora_alpha="8"), "lora_alpha must be a finite number"),
    "bad regex": (lambda c: c.update(rank_pattern={"(": 2}), "not a valid regular expression"),
    "regex valid only alone": (lambda c: c.update(alpha_pattern={"(?i)q": 2}), "not a valid regular expression"),
    "bad bias": (lambda c: c.update(bias="sometimes"), "bias must be"),
    "untargeted module": (lambda c: c.update(target_modules=["k_proj"]), "does not select it"),
    "dora without magnitudes": (lambda c: c.update(use_dora=True), "missing key.*lora_magnitude_vector"),
}


@pytest.mark.parametrize("defect", sorted(CONFIG_DEFECTS))
def test_config_defects_are_named(defect, tmp_path):
    change, message = CONFIG_DEFECTS[defect]
    write_peft_adapter(tmp_path, lora_adapter())
    _edit_config(tmp_path, change)
    with pytest.raises((ConfigError, FormatError), match=message):
        read_peft_adapter(tmp_path)


def test_vera_defects(tmp_path):
    write_peft_adapter(tmp_path, vera_adapter())
    _edit_config(tmp_path, lambda c: c.update(r=5))
    with pytest.raises(RankError, match="vera_lambda_d has rank 4 but"):
        read_peft_adapter(tmp_path)
    _edit_config(tmp_path, lambda c: c.update(r=4))
    _edit_tensors(tmp_path, lambda t: t.pop("base_model.vera_B"))
    with pytest.raises(FormatError, match="missing key 'base_model.vera_B'"):
        read_peft_adapter(tmp_path)


def test_sizes_are_checked_against_the_base(tmp_path):
    write_peft_adapter(tmp_path, lora_adapter())
    with pytest.raises(ShapeError, match="attn.q.*k = 8.*base layer.*k = 9"):
        read_peft_adapter(tmp_path, base_shapes={**SHAPES, "model.layers.0.attn.q": LinearShape(k=9, d=8)})
    with pytest.raises(ShapeError, match="has no linear layer 'model.layers.0.mlp.down.weight'"):
        read_peft_adapter(tmp_path, base_shapes={p: s for p, s in SHAPES.items() if "mlp" not in p})


def test_corrupt_files(tmp_path):
    write_peft_adapter(tmp_path, lora_adapter())
    (tmp_path / CONFIG_NAME).write_text("{ not json")
    with pytest.raises(FormatError, match=f"{CONFIG_NAME}: not valid JSON"):
        read_peft_adapter(tmp_path)
    write_peft_adapter(tmp_path, lora_adapter())
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[:-7])
    with pytest.raises(FormatError, match=f"{WEIGHTS_NAME}: truncated"):
        read_peft_adapter(tmp_path)
    with pytest.raises(FormatError, match="no such adapter directory"):
        read_peft_adapter(tmp_path / "absent")


class Trap:
    """Unpickling this runs code: the test fails if it ever happens."""

    def __reduce__(self):
        return (exec, ("open('UNPICKLED', 'w').write('!')",))


def test_pickles_are_refused_unopened(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.bin").write_bytes(pickle.dumps(Trap()))
    (tmp_path / "adapter" / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))

    def forbidden(*args, **kwargs):
        raise AssertionError("refpeft must never unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    for target in (tmp_path / "adapter", tmp_path / "adapter" / "adapter_model.bin"):
        with pytest.raises(FormatError, match="(?s)never unpickles.*safetensors") as raised:
            read_peft_adapter(target)
        assert "adapter_model.bin" in str(raised.value)
    assert not (tmp_path / "UNPICKLED").exists()


def test_write_refusals():
    mixed = Adapter(modules={**lora_adapter().modules, "x": ModuleAdapter("vera", {"lambda_d": np.ones(2), "lambda_b": np.ones(3)})})
    with pytest.raises(ConfigError, match="mix"):
        peft_config(mixed)
    modules = lora_adapter().modules
    first = next(iter(modules))
    with pytest.raises(ConfigError, match="rslora"):
        peft_config(Adapter(modules={**modules, first: ModuleAdapter("lora", {"A": modules[first].A, "B": modules[first].B}, rslora=True)}))
    vera = vera_adapter()
    with pytest.raises(ConfigError, match="projection_prng_key"):
        peft_config(Adapter(modules=vera.modules), save_projection=False)


def test_interrupted_write_keeps_the_previous_adapter(tmp_path, monkeypatch):
    write_peft_adapter(tmp_path, lora_adapter(seed=0))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr("refpeft.io.os.fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_peft_adapter(tmp_path, lora_adapter(seed=1))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# --- the command line --------------------------------------------------------------------------------


def test_inspect_lists_modules(tmp_path, capsys):
    write_peft_adapter(tmp_path, lora_adapter(dora=True))
    assert cli.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "LORA adapter (dora), 4 modules" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("model.layers.0.mlp.down"))
    # module, method, d, x, k, r, alpha, scaling, params = r (d + k) + d
    assert row == ["model.layers.0.mlp.down", "dora", "8", "x", "12", "3", "16", "5.33333", str(3 * 20 + 8)]
    total = sum(RANKS[p] * (s.d + s.k) + s.d for p, s in SHAPES.items())
    assert f"total: {total} adapter parameters" in out


def test_merge_command_and_its_errors(tmp_path, capsys):
    rng = np.random.default_rng(3)
    base = {f"{p}.weight": rng.standard_normal((s.d, s.k)).astype(np.float32) for p, s in SHAPES.items()}
    safetensors.numpy.save_file(base, str(tmp_path / "base.safetensors"))
    write_peft_adapter(tmp_path / "adapter", lora_adapter())
    out = tmp_path / "merged.safetensors"
    assert cli.main(["merge", str(tmp_path / "adapter"), "--base", str(tmp_path / "base.safetensors"), "-o", str(out),
                     "--no-progress"]) == 0
    assert "4 weights and 0 biases changed" in capsys.readouterr().out
    merged = SafetensorsFile(out)
    assert all(not np.array_equal(merged.read(k), base[k]) for k in base)

    del base["model.layers.0.mlp.down.weight"]
    safetensors.numpy.save_file(base, str(tmp_path / "small.safetensors"))
    assert cli.main(["merge", str(tmp_path / "adapter"), "--base", str(tmp_path / "small.safetensors"),
                     "-o", str(tmp_path / "never.safetensors"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert WEIGHTS_NAME in err and "model.layers.0.mlp.down.weight" in err
    assert not (tmp_path / "never.safetensors").exists()


def test_rank_pattern_keys_select_exactly_their_module(tmp_path):
    """"a.q" differs from the common rank, "b.a.q" does not: the key written for "a.q" must not
    also give "b.a.q" its rank (PEFT's rule matches a key at any dotted suffix)."""
    rng = np.random.default_rng(0)
    ranks = {"a.q": 2, "b.a.q": 4, "c.q": 4}
    modules = {p: ModuleAdapter("lora", {"A": rng.standard_normal((r, 6)).astype(np.float32),
                                         "B": rng.standard_normal((5, r)).astype(np.float32)})
               for p, r in ranks.items()}
    write_peft_adapter(tmp_path, Adapter(modules=modules))
    back = read_peft_adapter(tmp_path)
    assert {p: m.r for p, m in back.modules.items()} == ranks
