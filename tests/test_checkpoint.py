"""checkpoint.py: a saved checkpoint loads back exactly with its fingerprint, and every kind of broken folder or
config is a CheckpointError naming the file."""
import json

import pytest
import torch

from checkpoint import CheckpointError, UsageError, load_model, read_config, save_checkpoint, weights_fingerprint
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
