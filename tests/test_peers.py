"""peers.py: the GGUF written for llama.cpp holds exactly our weights in the precision asked for (Q8_0: rounded
to 8 bits), with the source's tokenizer and chat template; llama.cpp (optional, `make peers`) answers our prompts as our float32 AR does."""
import gguf
import pytest
import torch
from safetensors.torch import load_file

import cli
import peers
import s3d
from scripts.convert_gguf import gguf_config, gguf_weights


def test_exported_gguf_holds_our_weights_in_that_precision(default_checkpoint, default_gguf, tmp_path):
    out = peers.export_gguf(default_gguf, tmp_path / "model-BF16.gguf", "BF16")
    reader, source = gguf.GGUFReader(out), gguf.GGUFReader(default_gguf)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
    assert {t.name for t in reader.tensors} == {t.name for t in source.tensors}
    assert all(t.tensor_type == (gguf.GGMLQuantizationType.F32 if len(t.shape) == 1 else gguf.GGMLQuantizationType.BF16)
               for t in reader.tensors)
    for key in ("tokenizer.ggml.tokens", "tokenizer.chat_template", "llama.block_count"):
        assert reader.fields[key].contents() == source.fields[key].contents()
    exported = gguf_weights(reader, gguf_config(reader, "exported"))
    ours = load_file(str(default_checkpoint / "model.safetensors"))
    assert exported.keys() == ours.keys()
    for name, weight in ours.items():
        assert torch.equal(exported[name], weight.bfloat16().float() if weight.dim() > 1 else weight), name


@pytest.mark.skipif(not peers.llama_cpp_available(), reason="llama.cpp is optional: make peers")
def test_llama_cpp_answers_as_our_float32_ar(default_checkpoint, default_gguf, tmp_path):
    """bench.py --methods llama.cpp drives llama.cpp on the same prompt tokens, greedy: in float32 its answer is
    ours token for token, and a second answer to the same prompt starts from an empty cache and is the same."""
    model, tok = cli.load(default_checkpoint, torch.device("cpu"), torch.float32)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}]))
    llm = peers.llama_cpp_model(default_gguf, "float32", 256, tmp_path)
    first, again = (peers.llama_cpp_generate(llm, prompt, 24, tok.eos_ids, s3d.GREEDY) for _ in range(2))
    assert first.tokens == s3d.ar_generate(model, prompt, 24, eos_ids=tok.eos_ids).tokens == again.tokens
    assert len(first.tokens) == 24 and first.decode_time > 0 and first.time_to_first_token > 0


@pytest.mark.skipif(not peers.llama_cpp_available(), reason="llama.cpp is optional: make peers")
def test_llama_cpp_perplexity_is_ours_in_float32(default_checkpoint, default_gguf, tmp_path):
    """quantize.py --perplexity --llama_cpp scores the same tokens in the same windows by llama.cpp's logits: on a
    float32 GGUF of our weights that is our float32 perplexity (to rounding), window after window."""
    model, tok = cli.load(default_checkpoint, torch.device("cpu"), torch.float32)
    tokens = tok.encode(cli.PERPLEXITY_TEXT.read_text())[:150]
    llm = peers.llama_cpp_model(default_gguf, "float32", 64, tmp_path, logits_all=True)
    theirs, ours = peers.llama_cpp_perplexity(llm, tokens, window=64), cli.perplexity(model, tokens, window=64)
    assert abs(theirs - ours) < 1e-3 * ours


def test_q8_0_export_is_our_weights_rounded_to_8_bits(default_checkpoint, default_gguf, tmp_path):
    """--quantize w8a8's peer: llama.cpp's Q8_0, every matrix in blocks of 32 int8 weights with a scale each, from
    the same weights (each within a rounding step of its block, whose scale is a float16)."""
    out = peers.export_gguf(default_gguf, tmp_path / "model-Q8_0.gguf", "Q8_0")
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    matrices = [t for t in reader.tensors if len(t.shape) > 1]
    assert matrices and all(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in matrices)
    exported = gguf_weights(reader, gguf_config(reader, "exported"))
    ours = load_file(str(default_checkpoint / "model.safetensors"))
    for name in ("layers.0.attention.wqkv.weight", "layers.29.feed_forward.w2.weight"):
        weight = ours[name].float()
        step = weight.view(-1, 32).abs().amax(1, keepdim=True) / 127  # each block's rounding step
        error = (exported[name].float() - weight).view(-1, 32).abs()
        assert (error <= 0.6 * step + 1e-6).all() and (error > 0).any(), name  # (Q8_0 keeps its scales in float16)
