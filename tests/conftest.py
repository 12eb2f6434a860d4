"""Shared fixtures: tiny random-weight transformers models of each supported family, converted with our script, and
the embedded default checkpoint (prepared by `make test`)."""
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "SmolLM2-135M-Instruct"

TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def hf_tiny_model(arch: str, **overrides):
    """A tiny transformers model of the given class with random weights (seeded), in fp32 eager attention."""
    import transformers

    config_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "MistralForCausalLM": transformers.MistralConfig,
                  "Qwen2ForCausalLM": transformers.Qwen2Config, "Phi3ForCausalLM": transformers.Phi3Config}[arch]
    config = config_cls(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them so they are tested too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture
def convert_tiny(tmp_path):
    """convert_tiny(arch, **config) -> (transformers model, our converted checkpoint folder)."""
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint

    def make(arch: str, **overrides):
        hf = hf_tiny_model(arch, **overrides)
        src = tmp_path / f"hf-{arch}"
        hf.save_pretrained(src)
        return hf, convert_hf_checkpoint(src, tmp_path / f"ours-{arch}")

    return make


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # (make test runs the files in parallel processes: they share the cores rather than oversubscribe)
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))
    config.addinivalue_line("markers", "autotune: compiled float32 and int8 CPU steps autotune their GEMMs, as they do "
                                       "outside the tests")


@pytest.fixture(autouse=True)
def cpu_autotune(request, monkeypatch):
    """Compiled float32 and int8 CPU steps autotune (s3d.CPU_AUTOTUNE) only in tests marked autotune: it adds
    seconds to every compile (15 of 26 for a tiny float32 model), and it only chooses among kernels that compute the
    same maps."""
    import s3d

    monkeypatch.setattr(s3d, "CPU_AUTOTUNE", request.node.get_closest_marker("autotune") is not None)


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    assert (DEFAULT_CHECKPOINT / "model.safetensors").is_file(), \
        "the embedded default model is missing: run `make test` (or scripts/convert_gguf.py --default)"
    return DEFAULT_CHECKPOINT


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from scripts.convert_gguf import find_default_gguf

    return find_default_gguf()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, default_checkpoint):
    """A 4-layer random-weight Llama with the default model's tokenizer and chat template."""
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint

    folder = tmp_path_factory.mktemp("tiny")
    hf_tiny_model("LlamaForCausalLM", vocab_size=49152, num_hidden_layers=4, max_position_embeddings=2048,
                  eos_token_id=2, bos_token_id=1, pad_token_id=2).save_pretrained(folder / "hf")
    out = convert_hf_checkpoint(folder / "hf", folder / "ours")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_checkpoint / name, out / name)
    return out
