"""Quantization (checkpoint.py's torchao calls, its w8a8, and the quantize.py program): int8 weight-only layers stay
close to the float ones, a quantized checkpoint round-trips, w8a8 is int8 weights times rows rounded to 8 bits, S3D
on a quantized model is exactly that model's AR output, and unsupported formats or devices give one-line errors."""
import subprocess
import sys

import pytest
import torch

import checkpoint
import s3d
import spec_bench
from checkpoint import load_model
from heads import load_heads, new_heads
from tests.conftest import ROOT
from test_s3d import with_trained_looking_heads

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

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=checkpoint.quantized_layers(model))
    assert type(model.layers[0].weight).__name__ == "Int8Tensor" and type(model.output.weight) is torch.nn.Parameter
    error = ((model.layers[0](x).float() - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.01


def test_quantized_checkpoint_roundtrip_and_memory(convert_tiny, tmp_path):
    _, folder = convert_tiny("LlamaForCausalLM", tie_word_embeddings=True)
    model = load_model(folder)
    before = checkpoint.memory_breakdown(model)["weights"]
    checkpoint.quantize(model, "int8")
    path = checkpoint.quantized_path(folder, "int8", dtype=torch.float32)
    assert path.name == "model-int8-float32.pt" and checkpoint.quantized_path(folder, "int8").name == "model-int8.pt"
    checkpoint.save_quantized(model, path)
    # the blocks' linear maps are now 1 byte per weight plus a scale per row; embeddings (tied output) stay float32
    linear = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.") and n.endswith(".weight")
                 and p.dim() == 2)
    assert checkpoint.memory_breakdown(model)["weights"] < before - 2.5 * linear
    loaded = checkpoint.load_quantized(load_model(folder), path)
    prompt, pos = torch.tensor([list(range(3, 20))]), torch.arange(17)
    for m in (model, loaded):
        m.setup_caches(1, 32)
    with torch.no_grad():
        assert torch.equal(model(prompt, pos), loaded(prompt, pos))
    assert loaded.quantization == "int8" and loaded.output.weight is loaded.tok_embeddings.weight
    _, other = convert_tiny("MistralForCausalLM")
    with pytest.raises(checkpoint.CheckpointError, match="quantized from other weights"):
        checkpoint.load_quantized(load_model(other), path)
    with pytest.raises(checkpoint.CheckpointError, match="holds weights for torch.float32 activations, not torch.bfloat16"):
        checkpoint.load_quantized(load_model(folder, dtype=torch.bfloat16), path)


@pytest.mark.autotune
def test_compiled_int8_equals_eager(convert_tiny):
    _, folder = convert_tiny("LlamaForCausalLM")
    model = checkpoint.quantize(load_model(folder), "int8")
    prompt = list(range(3, 15))
    with torch.no_grad():
        eager = s3d.ar_generate(model, prompt, 12).tokens
        assert s3d.ar_generate(model, prompt, 12, compile=True).tokens == eager


def test_int8_draft_copies_of_a_quantized_model_are_lossless(convert_tiny):
    """The draft's int8 copies (Draft.int8) on an int8 model are its dequantized weights with the adapters folded
    in, rounded again per output channel, and greedy S3D is still exactly that model's AR output."""
    from heads import int8_per_channel

    _, folder = convert_tiny("LlamaForCausalLM")
    model = checkpoint.quantize(load_model(folder), "int8")
    heads = new_heads(model, (1, 2), 3, 4)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.05)
    model.set_heads(heads)
    prompt = list(range(3, 15))
    with torch.no_grad():
        ar = s3d.ar_generate(model, prompt, 20).tokens
        assert s3d.speculative_generate(model, prompt, 20, s3d.Draft("s3d", 3, int8=True)).tokens == ar
    adapter, layer = heads.adapters["0"]["w2"], model.layers[0].feed_forward.w2
    assert heads.int8 and adapter.weight_int8 is not None
    folded = layer.weight.dequantize().float() + adapter.B @ adapter.A
    assert torch.equal(adapter.weight_int8, int8_per_channel(folded)[0])


def test_compiled_int8_with_bfloat16_activations_runs_on_int8_weights(convert_tiny):
    """What makes int8 fast under compile on a CPU: Inductor rewrites every quantized linear map into its
    weight-only int8 GEMM (the weights stay one byte each) instead of folding float copies of them into the graph."""
    from torch._dynamo.utils import counters

    _, folder = convert_tiny("LlamaForCausalLM")
    model = checkpoint.quantize(load_model(folder, dtype=torch.bfloat16), "int8")
    model.setup_caches(1, 32)

    def forward(model, tokens, input_pos):
        return model(tokens, input_pos)

    counters.clear()
    tokens, pos = torch.tensor([[5]]), torch.tensor([3])
    with torch.no_grad():
        eager = forward(model, tokens, pos).float()
        compiled = s3d.compiled(forward, "cpu")(model, tokens, pos).float()
    linear_maps = sum(type(p).__name__ == "Int8Tensor" for p in model.parameters())
    assert linear_maps >= 5 * model.config.n_layer and counters["inductor"]["woq_matcher_count"] == linear_maps
    assert ((compiled - eager).norm() / eager.norm()).item() < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_s3d_on_the_quantized_default_is_its_ar_output(default_checkpoint, dtype):
    """Draft and verify share the int8 weights and the adapters stay float: greedy S3D == greedy AR of the same
    quantized model, with the shipped heads, and the heads really draft (some are accepted). With bfloat16
    activations, up to ties: where S3D leaves AR's answer, the target's two logits are within spec_bench.TIE_ULPS
    rounding steps (a 1-token and a 5-token forward round differently)."""
    from tokenizer import Tokenizer

    tok = Tokenizer(default_checkpoint)
    model = checkpoint.quantize(load_model(default_checkpoint, dtype=dtype), "int8")
    model.set_heads(load_heads(HEADS, model.config))
    assert type(model.heads.mask_embeddings) is torch.nn.Parameter  # not quantized
    assert all(type(p) is torch.nn.Parameter for p in model.heads.parameters())
    accepted = []
    for text in ("Name three prime numbers.", "Write a haiku about autumn.", "What is a KV cache?"):
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))
        with torch.no_grad():
            ar = s3d.ar_generate(model, prompt, 48, eos_ids=tok.eos_ids).tokens
            spec = s3d.speculative_generate(model, prompt, 48, s3d.Draft("s3d", 4), eos_ids=tok.eos_ids)
            if dtype == torch.float32 or spec.tokens == ar:
                assert spec.tokens == ar
            else:
                i = spec_bench.first_difference(spec.tokens, ar)
                assert spec_bench.gap_in_ulps(model, prompt, ar, i, spec.tokens[i]) <= spec_bench.TIE_ULPS
        accepted += spec.accepted
    assert sum(accepted) > 0


def test_int4_on_cpu_names_the_alternative():
    with pytest.raises(checkpoint.UsageError, match="on a CPU use --quantize int8"):
        checkpoint.check_quantization("int4", torch.device("cpu"))
    with pytest.raises(checkpoint.UsageError, match="unknown quantization 'int3'"):
        checkpoint.check_quantization("int3", torch.device("cpu"))


@pytest.mark.parametrize("script,args,pattern", [
    ("generate.py", ("--quantize", "int3"), "argument --quantize: invalid choice: 'int3'"),
    ("generate.py", ("--quantize", "int4", "--device", "cpu"), "int4 weight-only needs a CUDA GPU"),
    ("quantize.py", ("--mode", "int4", "--device", "cpu"), "int4 weight-only needs a CUDA GPU"),
    ("quantize.py", (), "choose --mode int8|int4"),
    ("quantize.py", ("--mode", "w8a8"), "--mode w8a8 is made on load"),
    ("quantize.py", ("--perplexity", "--device", "tpu"), "unknown device 'tpu'"),
    ("quantize.py", ("--perplexity", "--text", "no-such.txt"), "cannot read --text no-such.txt: No such file"),
    ("quantize.py", ("--mode", "int8", "--llama_cpp"), "--llama_cpp measures perplexity: add --perplexity"),
])
def test_cli_errors(script, args, pattern, default_checkpoint):
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert pattern in proc.stderr.strip().splitlines()[-1]


def test_llama_cpp_perplexity_needs_llama_cpp(monkeypatch, capsys):
    import peers
    import quantize

    monkeypatch.setattr(peers, "llama_cpp_available", lambda: False)
    with pytest.raises(SystemExit) as exit:
        quantize.main(["--perplexity", "--llama_cpp"])
    assert exit.value.code == 2 and "--llama_cpp needs llama-cpp-python: make peers" in capsys.readouterr().err


@CUDA
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_s3d_on_a_quantized_model_on_cuda(convert_tiny, mode):
    _, folder = convert_tiny("LlamaForCausalLM", hidden_size=256, intermediate_size=512, num_attention_heads=4)
    model = checkpoint.quantize(load_model(folder, "cuda", torch.bfloat16), mode, groupsize=32)
    model.set_heads(new_heads(model, (2, 4), 3, 4))
    prompt = list(range(3, 20))
    with torch.no_grad():
        ar = s3d.ar_generate(model, prompt, 24).tokens
        for compile in (False, True):
            assert s3d.speculative_generate(model, prompt, 24, s3d.Draft("s3d", 3), compile=compile).tokens == ar
            assert s3d.speculative_generate(model, prompt, 24, s3d.Draft("skip", 3, (2, 4)), compile=compile).tokens == ar


class Payload:
    """Unpickling this runs a shell command: what a planted file could do if it were loaded with pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_in_a_quantized_file_never_runs(convert_tiny, tmp_path):
    _, folder = convert_tiny("LlamaForCausalLM")
    marker = tmp_path / "ran"
    path = checkpoint.quantized_path(folder, "int8", dtype=torch.float32)
    torch.save({"quantization": "int8", "state_dict": Payload(marker)}, path)
    with pytest.raises(checkpoint.CheckpointError, match="posix.system, which a weights file may not"):
        checkpoint.load_quantized(load_model(folder), path)
    assert not marker.exists()
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read"):
        checkpoint.load_quantized(load_model(folder), path)


def test_w8a8_is_int8_weights_times_rows_rounded_to_8_bits(convert_tiny):
    """--quantize w8a8: every linear map of the blocks, and the output head (tied here: the embeddings stay float),
    holds int8 weights and a scale per output channel, and multiplies each row rounded to 8 bits, a step per block of
    32 inputs; the model stays close to the float one."""
    from model import int8_per_channel, int8_rows, linear_map

    _, folder = convert_tiny("LlamaForCausalLM", tie_word_embeddings=True)
    reference = load_model(folder, dtype=torch.bfloat16)
    model = checkpoint.quantize(load_model(folder, dtype=torch.bfloat16), "w8a8")
    assert model.quantization == "w8a8" and model.tok_embeddings.weight.dtype == torch.bfloat16
    maps = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(maps) == 5 * model.config.n_layer + 1 and model.output in maps
    for layer, original in zip(maps, [m for m in reference.modules() if isinstance(m, torch.nn.Linear)]):
        weight, scale = int8_per_channel(original.weight)
        assert torch.equal(layer.weight, weight) and torch.equal(layer.scale, scale)
    assert checkpoint.memory_breakdown(model)["weights"] < 0.8 * checkpoint.memory_breakdown(reference)["weights"]
    x = torch.randn(3, model.config.dim, dtype=torch.bfloat16)
    x[:, 0] = 100  # (an input far larger than the rest takes the steps of its block only: 2 blocks of 32 here)
    rows, step = int8_rows(x)
    assert torch.equal(rows, rows.round()) and torch.equal(rows.abs().unflatten(-1, (2, 32)).amax(-1),
                                                             torch.full((3, 2), 127.0))
    assert torch.equal(step, (x.float().abs().unflatten(-1, (2, 32)).amax(-1) / 127).repeat_interleave(32, -1))
    wqkv = model.layers[0].attention.wqkv
    exact = ((rows.double() * step.double()) @ wqkv.weight.double().T) * wqkv.scale.double()
    assert torch.allclose(linear_map(x, wqkv.weight, wqkv.scale).double(), exact, rtol=0.02, atol=1e-3)
    prompt, pos = torch.tensor([list(range(3, 20))]), torch.arange(17)
    for m in (model, reference):
        m.setup_caches(1, 32)
    with torch.no_grad():
        ours, theirs = model(prompt, pos).float(), reference(prompt, pos).float()
    assert ((ours - theirs).norm() / theirs.norm()).item() < 0.05


def test_w8a8_s3d_is_its_ar_output_compiled(convert_tiny):
    """Compiled greedy S3D on w8a8 weights is that model's AR output. On a CPU with AVX512_VNNI every decode step's
    rows go to cpu_kernels' gemv_int8, exact sums of whole numbers: token for token, with no ties allowed (the
    heads draft with their own int8 copies and some of their tokens are accepted). Elsewhere, up to ties."""
    import model as model_py

    _, folder = convert_tiny("LlamaForCausalLM")
    model = with_trained_looking_heads(checkpoint.quantize(load_model(folder, dtype=torch.bfloat16), "w8a8"), (1, 3), 3)
    # attention in float32, as cli.load has it on a CPU without AMX: there decode steps attend with cpu_kernels'
    # attend, which computes each query row alone (the library's attention, with its GEMMs, need not give a row of 4
    # queries what it gives that row alone)
    model.attention_dtype = torch.float32
    accepted = []
    with torch.no_grad():
        for prompt in ([3, 14, 15, 92, 65], list(range(10, 40)), [7] * 12):
            ar = s3d.ar_generate(model, prompt, 24, compile=True).tokens
            spec = s3d.speculative_generate(model, prompt, 24, s3d.Draft("s3d", 3), compile=True)
            if model_py.DOT_INT8 or spec.tokens == ar:
                assert spec.tokens == ar
            else:
                i = spec_bench.first_difference(spec.tokens, ar)
                assert spec_bench.gap_in_ulps(model, prompt, ar, i, spec.tokens[i]) <= spec_bench.TIE_ULPS
            accepted += spec.accepted
        if model_py.DOT_INT8:  # and the logits themselves: each row of a 4-row forward is the 1-row step's, bit for bit,
            # and of a 12-row one (a tree's verify: two passes of gemv_int8 over the weights)
            forward = s3d.compiled(lambda m, x, pos, mask: m(x, pos, mask=mask), "cpu")
            # (40 sets of tokens: a step that rounds differently changes this tiny model's logits only now and then)
            pos, seed = len(prompt) + 24, torch.Generator().manual_seed(0)
            for width, sets in ((4, 40), (12, 12)):
                for tokens in torch.randint(0, model.config.vocab_size, (sets, 1, width), generator=seed):
                    rows = forward(model, tokens, torch.arange(pos, pos + width), s3d.causal_mask(model, pos, width))[0]
                    for i in range(width):
                        one = forward(model, tokens[:, i:i + 1], torch.arange(pos + i, pos + i + 1),
                                      s3d.causal_mask(model, pos + i, 1))
                        assert torch.equal(one[0, 0], rows[i]), (width, i)
    assert model.heads.int8 and sum(accepted) > 0
    s3d.release_compiled()
