"""`refpeft train`'s defaults fit the base: the data block defaults to 256 tokens or whatever of the
model's positions the virtual tokens leave, whichever is smaller (the demo base has 128)."""

from __future__ import annotations

import json

from refpeft import demo_model
from refpeft.cli import main
from refpeft.model.config import config_from_dict

BASE = demo_model.BASE_DIR


def _chats(tmp_path):
    train, _ = demo_model.split_world(demo_model.load_world(), demo_model.ModelDemoConfig())
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in demo_model.training_chats(train)[:16]))
    return path


def test_the_default_block_fits_a_base_with_fewer_positions(tmp_path):
    positions = config_from_dict(json.loads((BASE / "config.json").read_text())).max_position_embeddings
    assert positions < 256
    data = _chats(tmp_path)
    assert main(["train", str(BASE), "--data", str(data), "-o", str(tmp_path / "lora"), "--steps", "1"]) == 0
    assert main(["train", str(BASE), "--data", str(data), "-o", str(tmp_path / "prefix"), "--steps", "1",
                 "--method", "prefix", "--virtual-tokens", "8"]) == 0
    # A block the user asks for is still checked against the positions.
    assert main(["train", str(BASE), "--data", str(data), "-o", str(tmp_path / "long"), "--steps", "1",
                 "--block-size", str(positions + 1)]) == 2
