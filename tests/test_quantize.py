"""quantize.py: int8 weight-only layers stay close to the float ones, a quantized checkpoint round-trips, S3D on a
quantized model is exactly that model's AR output, and unsupported formats or devices give one-line errors."""
import subprocess
import sys

import pytest
import torch

import quantize
import s3d
from model import load_heads, load_model, new_heads
from tests.conftest import ROOT

HEADS = ROOT / "heads" / "smollm2-135m-instruct.safetensors"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_stays_within_one_percent(dtype):
    """Relative error of an int8 weight-only linear (one scale per output channel) against the same layer unquantized,
    at the embedded default's shapes: below 1 %."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(576, 1536, bias=False).to(dtype)])
    model.tok_embeddings, model.output = torch.nn.Embedding(8, 576), torch.nn.Linear(576, 8, bias=False)
    model.output.weight = model.tok_embeddings.weight  # tied, so the output head stays float
    x = torch.randn(5, 576, dtype=dtype)
    reference = model.layers[0](x).float()
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=quantize.quantized_layers(model))
    assert type(model.layers[0].weight).__name__ == "Int8Tensor" and type(model.output.weight) is torch.nn.Parameter
    error = ((model.layers[0](x).float() - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.01


def test_quantized_checkpoint_roundtrip_and_memory(convert_tiny, tmp_path):
    _, folder = convert_tiny("LlamaForCausalLM", tie_word_embeddings=True)
    model = load_model(folder)
    before = quantize.memory_breakdown(model)["weights"]
    quantize.quantize(model, "int8")
    path = quantize.quantized_path(folder, "int8")
    quantize.save_quantized(model, path)
    # the blocks' linear maps are now 1 byte per weight plus a scale per row; embeddings (tied output) stay float32
    linear = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.") and n.endswith(".weight")
                 and p.dim() == 2)
    assert quantize.memory_breakdown(model)["weights"] < before - 2.5 * linear
    loaded = quantize.load_quantized(load_model(folder), path)
    prompt, pos = torch.tensor([list(range(3, 20))]), torch.arange(17)
    for m in (model, loaded):
        m.setup_caches(1, 32)
    with torch.no_grad():
        assert torch.equal(model(prompt, pos), loaded(prompt, pos))
    assert loaded.quantization == "int8" and loaded.output.weight is loaded.tok_embeddings.weight
    _, other = convert_tiny("MistralForCausalLM")
    with pytest.raises(quantize.CheckpointError, match="quantized from other weights"):
        quantize.load_quantized(load_model(other), path)


def test_compiled_int8_equals_eager(convert_tiny):
    _, folder = convert_tiny("LlamaForCausalLM")
    model = quantize.quantize(load_model(folder), "int8")
    prompt = list(range(3, 15))
    with torch.no_grad():
        eager = s3d.ar_generate(model, prompt, 12).tokens
        assert s3d.ar_generate(model, prompt, 12, compile=True).tokens == eager


def test_s3d_on_the_quantized_default_is_its_ar_output(default_checkpoint):
    """Draft and verify share the int8 weights and the adapters stay float: greedy S3D == greedy AR of the same
    quantized model, with the shipped heads, and the heads really draft (some are accepted)."""
    from tokenizer import Tokenizer

    tok = Tokenizer(default_checkpoint)
    model = quantize.quantize(load_model(default_checkpoint), "int8")
    model.set_heads(load_heads(HEADS, model.config))
    assert type(model.heads.mask_embeddings) is torch.nn.Parameter  # not quantized
    assert all(type(p) is torch.nn.Parameter for p in model.heads.parameters())
    accepted = []
    for text in ("Name three prime numbers.", "Write a haiku about autumn."):
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))
        with torch.no_grad():
            ar = s3d.ar_generate(model, prompt, 32, eos_ids=tok.eos_ids).tokens
            spec = s3d.speculative_generate(model, prompt, 32, draft="s3d", eos_ids=tok.eos_ids)
        assert spec.tokens == ar
        accepted += spec.accepted
    assert sum(accepted) > 0


def test_int4_on_cpu_names_the_alternative():
    with pytest.raises(quantize.QuantizeError, match="on a CPU use --quantize int8"):
        quantize.check_supported("int4", torch.device("cpu"))
    with pytest.raises(quantize.QuantizeError, match="unknown quantization 'int3'"):
        quantize.check_supported("int3", torch.device("cpu"))


@pytest.mark.parametrize("script,args,pattern", [
    ("generate.py", ("--quantize", "int3"), "argument --quantize: invalid choice: 'int3'"),
    ("generate.py", ("--quantize", "int4", "--device", "cpu"), "int4 weight-only needs a CUDA GPU"),
    ("quantize.py", ("--mode", "int4", "--device", "cpu"), "int4 weight-only needs a CUDA GPU"),
    ("quantize.py", (), "choose --mode int8|int4"),
])
def test_cli_errors(script, args, pattern, default_checkpoint):
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert pattern in proc.stderr.strip().splitlines()[-1]


@CUDA
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_s3d_on_a_quantized_model_on_cuda(convert_tiny, mode):
    _, folder = convert_tiny("LlamaForCausalLM", hidden_size=256, intermediate_size=512, num_attention_heads=4)
    model = quantize.quantize(load_model(folder, "cuda", torch.bfloat16), mode, groupsize=32)
    model.set_heads(new_heads(model, (2, 4), 3, 4))
    prompt = list(range(3, 20))
    with torch.no_grad():
        ar = s3d.ar_generate(model, prompt, 24).tokens
        for compile in (False, True):
            assert s3d.speculative_generate(model, prompt, 24, draft="s3d", compile=compile).tokens == ar
            assert s3d.speculative_generate(model, prompt, 24, draft="skip", skip=(2, 4), compile=compile).tokens == ar
