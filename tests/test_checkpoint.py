"""checkpoint.py: a saved checkpoint loads back exactly with its fingerprint, every kind of broken folder or
config is a CheckpointError naming the file, and outputs are checked first and written under a temporary name."""
import json
import os

import pytest
import torch

from checkpoint import (CheckpointError, UsageError, check_output, load_model, read_config, save_checkpoint,
                        weights_fingerprint, written_then_renamed)
from model import ModelArgs, Transformer


def tiny_state(seed=0):
    torch.manual_seed(seed)
    config = ModelArgs(block_size=64, vocab_size=32, n_layer=2, n_head=2, dim=16, intermediate_size=24, name="tiny")
    return Transformer(config).state_dict(), config


def test_save_and_load_roundtrip(tmp_path):
    state, config = tiny_state()
    save_checkpoint(state, config, tmp_path)
    model = load_model(tmp_path)
    assert model.config.fingerprint == weights_fingerprint(state) != ""
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert weights_fingerprint(tiny_state(seed=1)[0]) != model.config.fingerprint


@pytest.mark.parametrize("content,message", [
    ("{not json", "cannot read"),
    ("[1, 2]", "is not a JSON object"),
    (json.dumps({"architectures": ["LlamaForCausalLM"]}), "is a transformers config; convert it first"),
    (json.dumps({"architecture": "GPT2LMHeadModel"}), "unknown architecture 'GPT2LMHeadModel'"),
    (json.dumps({"architecture": "LlamaForCausalLM", "colour": "red"}), "unknown keys in"),
])
def test_broken_configs(tmp_path, content, message):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        read_config(tmp_path / "config.json")


def test_weights_that_do_not_match_the_config(tmp_path):
    state, config = tiny_state()
    save_checkpoint({k: v for k, v in state.items() if k != "norm.weight"}, config, tmp_path)
    with pytest.raises(CheckpointError, match="missing \\['norm.weight'\\]"):
        load_model(tmp_path)
    assert issubclass(CheckpointError, UsageError)  # the programs print both as one line


def test_a_write_that_fails_part_way_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with written_then_renamed(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]  # and no temporary file left
    with written_then_renamed(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".json"  # beside it (one rename), same format suffix
        tmp.write_text("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]


def test_a_symlink_is_replaced_not_written_through(tmp_path):
    target, link = tmp_path / "precious", tmp_path / "link"
    target.write_text("keep")
    link.symlink_to(target)
    with written_then_renamed(link) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "keep" and not link.is_symlink() and link.read_text() == "new"


def test_a_folder_is_replaced_whole(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "chat_template.jinja").write_text("the old model's")
    with pytest.raises(RuntimeError):
        with written_then_renamed(folder) as tmp:
            tmp.mkdir()
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError
    assert os.listdir(folder) == ["chat_template.jinja"] and os.listdir(tmp_path) == ["ckpt"]
    with written_then_renamed(folder) as tmp:
        tmp.mkdir()
        (tmp / "model.safetensors").write_text("new")
    assert os.listdir(folder) == ["model.safetensors"] and os.listdir(tmp_path) == ["ckpt"]


def test_outputs_are_checked_before_any_work(tmp_path):
    existing, inputs = tmp_path / "a.json", tmp_path / "prompts.jsonl"
    existing.write_text("{}")
    with pytest.raises(UsageError, match="--json .*a.json exists: pass --force"):
        check_output(existing, flag="--json")
    assert check_output(existing, force=True) == existing
    with pytest.raises(UsageError, match="is also an input of this run"):
        check_output(tmp_path / "x" / ".." / "prompts.jsonl", force=True, inputs=(None, inputs))
    assert check_output(tmp_path / "new" / "deeper" / "b.json") == tmp_path / "new" / "deeper" / "b.json"
    with pytest.raises(UsageError, match="is not a writable folder"):
        check_output(existing / "c.json")  # a file where a folder should be
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UsageError, match="cannot write .*locked is not a writable folder"):
            check_output(locked / "sub" / "d.json")


@pytest.mark.parametrize("change,message", [
    ({"n_layer": "30"}, "n_layer must be a whole number"),
    ({"dim": 0}, "dim must be a positive whole number"),
    ({"vocab_size": 10**12}, "vocab_size must be a whole number from 1"),
    ({"norm_eps": float("nan")}, "norm_eps must be a positive number"),
    ({"tie_embeddings": "yes"}, "tie_embeddings must be true or false"),
    ({"n_local_heads": 3}, "must be a multiple of n_local_heads"),
    ({"rope_scaling": {"factor": 8}}, "rope_scaling must be null or"),
])
def test_wrong_types_and_ranges_in_a_config(tmp_path, change, message):
    _, config = tiny_state()
    values = {k: v for k, v in vars(config).items()} | change
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(CheckpointError, match=message):
        read_config(tmp_path / "config.json")


def test_deep_json_and_integer_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_config(tmp_path / "config.json")
    state, config = tiny_state()
    save_checkpoint(state | {"norm.weight": state["norm.weight"].to(torch.int8)}, config, tmp_path)
    with pytest.raises(CheckpointError, match="norm.weight is int8 in .*expected floating-point weights"):
        load_model(tmp_path)
    save_checkpoint(state | {"norm.weight": torch.full_like(state["norm.weight"], float("nan"))}, config, tmp_path)
    with pytest.raises(CheckpointError, match="norm.weight in .*holds NaN or infinite values"):
        load_model(tmp_path)
