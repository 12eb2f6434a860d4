"""peers.py: the GGUF written for llama.cpp holds exactly our weights in the precision asked for, with the source's
tokenizer and chat template (llama.cpp itself is optional, `make peers`, and is exercised by bench.py --decode)."""
import gguf
import torch
from safetensors.torch import load_file

import peers
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
