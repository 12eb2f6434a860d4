"""scripts/convert_hf_checkpoint.py and scripts/convert_gguf.py: an existing checkpoint folder is replaced only with
--force and then whole (nothing of the old model survives), and a conversion that fails leaves it untouched."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoint import UsageError
from conftest import hf_tiny_model
from scripts.convert_gguf import convert_gguf
from scripts.convert_hf_checkpoint import convert_hf_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def old_checkpoint(tmp_path):
    folder = tmp_path / "ours"
    folder.mkdir()
    (folder / "model.safetensors").write_text("the old weights")
    (folder / "chat_template.jinja").write_text("the old model's template")
    return folder


def test_an_existing_folder_is_replaced_only_with_force_and_whole(tmp_path, old_checkpoint):
    hf_tiny_model("LlamaForCausalLM").save_pretrained(tmp_path / "hf")
    with pytest.raises(UsageError, match="ours exists: pass --force"):
        convert_hf_checkpoint(tmp_path / "hf", old_checkpoint)
    assert (old_checkpoint / "model.safetensors").read_text() == "the old weights"
    convert_hf_checkpoint(tmp_path / "hf", old_checkpoint, force=True)
    assert not (old_checkpoint / "chat_template.jinja").exists()  # no leftover of the old model
    assert {"model.safetensors", "config.json"} <= set(os.listdir(old_checkpoint))
    assert sorted(os.listdir(tmp_path)) == ["hf", "ours"]  # no temporary folder left behind


def test_a_failed_conversion_leaves_the_old_folder_untouched(tmp_path, old_checkpoint):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 8}')
    with pytest.raises(UsageError):
        convert_hf_checkpoint(tmp_path / "hf", old_checkpoint, force=True)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(UsageError, match="cannot read GGUF file"):
        convert_gguf(broken, old_checkpoint, force=True)
    assert sorted(os.listdir(old_checkpoint)) == ["chat_template.jinja", "model.safetensors"]
    assert (old_checkpoint / "model.safetensors").read_text() == "the old weights"
    assert sorted(os.listdir(tmp_path)) == ["broken.gguf", "hf", "ours"]


def test_the_command_line_refuses_in_one_line(tmp_path, old_checkpoint):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_gguf.py"), "--gguf", str(tmp_path / "x.gguf"),
                           "--out_dir", str(old_checkpoint)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"convert_gguf.py: error: --out_dir {old_checkpoint} exists: pass --force to replace it"]


def test_a_planted_pickle_in_pytorch_weights_never_runs(tmp_path):
    import torch

    from test_quantize import Payload

    hf_tiny_model("LlamaForCausalLM").save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()  # the older format: a pickled pytorch_model.bin
    marker = tmp_path / "ran"
    torch.save({"model.embed_tokens.weight": Payload(marker)}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(UsageError, match="pytorch_model.bin refers to posix.system, which a weights file may not"):
        convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ours")
    assert not marker.exists()
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # nothing converted, no temporary folder left behind
