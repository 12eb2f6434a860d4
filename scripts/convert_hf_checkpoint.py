"""Converts a transformers checkpoint (safetensors or .bin shards + config.json) into ours: model.safetensors with
gpt-fast names, q/k permuted to the interleaved RoPE layout, our config.json, and the tokenizer files copied over.
The source folder is left as it is; the result goes to checkpoints/<name> unless --out_dir says otherwise.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/hf/meta-llama/Llama-3.2-1B-Instruct
"""
import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import CheckpointError, ModelArgs, save_checkpoint  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")

# transformers name (layer index as {}) -> ours; q/k/v, Phi-3's fused maps and lm_head are handled in convert().
WEIGHT_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}


def to_interleaved(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """transformers rotates halves (x_i, x_{i+d/2}); we rotate pairs (x_2i, x_2i+1): reorder q/k rows to match."""
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    weights = {}
    for f in files:
        try:
            weights.update(load_file(str(f)) if f.suffix == ".safetensors"
                           else torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:
            raise CheckpointError(f"cannot read {f} (truncated or corrupt?): {e}") from None
    return weights


def convert(hf: dict[str, torch.Tensor], c: ModelArgs) -> dict[str, torch.Tensor]:
    """Maps transformers weights to ours (float32)."""
    hf = {k: v.float() for k, v in hf.items()}
    out = {}
    for name, w in hf.items():
        generic = re.sub(r"\.(\d+)\.", ".{}.", name, count=1)
        if generic in WEIGHT_MAP:
            layer = re.search(r"\.(\d+)\.", name)
            out[WEIGHT_MAP[generic].format(layer.group(1) if layer else "")] = w
    q_size, kv_size = c.n_head * c.head_dim, c.n_local_heads * c.head_dim
    for i in range(c.n_layer):
        p = f"model.layers.{i}."
        if c.architecture == "Phi3ForCausalLM":  # fused in the source: split, so q and k can be permuted apart
            q, k, v = hf[p + "self_attn.qkv_proj.weight"].split([q_size, kv_size, kv_size])
            gate, up = hf[p + "mlp.gate_up_proj.weight"].chunk(2)
            out[f"layers.{i}.feed_forward.w1.weight"], out[f"layers.{i}.feed_forward.w3.weight"] = gate, up
        else:
            q, k, v = (hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        out[f"layers.{i}.attention.wqkv.weight"] = torch.cat([
            to_interleaved(q, c.n_head, c.head_dim), to_interleaved(k, c.n_local_heads, c.head_dim), v])
        if c.attn_bias:
            qb, kb, vb = (hf[p + f"self_attn.{n}_proj.bias"] for n in "qkv")
            out[f"layers.{i}.attention.wqkv.bias"] = torch.cat([
                to_interleaved(qb, c.n_head, c.head_dim), to_interleaved(kb, c.n_local_heads, c.head_dim), vb])
    if not c.tie_embeddings:
        out["output.weight"] = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])
    return out


def convert_hf_checkpoint(checkpoint_dir: Path, out_dir: Path | None = None) -> Path:
    """Converts checkpoint_dir into out_dir (default checkpoints/<name>); returns out_dir."""
    checkpoint_dir = Path(checkpoint_dir)
    out_dir = Path(out_dir or Path("checkpoints") / checkpoint_dir.name)
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise CheckpointError("--out_dir must differ from --checkpoint_dir: both would hold a model.safetensors")
    config_path = checkpoint_dir / "config.json"
    try:
        hf_config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {config_path}: {e}") from None
    config = ModelArgs.from_hf_config(hf_config, name=checkpoint_dir.name)
    try:
        state_dict = convert(read_hf_weights(checkpoint_dir), config)
    except KeyError as e:
        raise CheckpointError(f"{checkpoint_dir} lacks weight {e} that a {config.architecture} needs") from None
    save_checkpoint(state_dict, config, out_dir)
    for name in TOKENIZER_FILES:
        if (checkpoint_dir / name).is_file():
            shutil.copy(checkpoint_dir / name, out_dir / name)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="folder with transformers weights")
    parser.add_argument("--out_dir", type=Path, default=None, help="where to write ours (default: checkpoints/<name>)")
    args = parser.parse_args()
    try:
        out = convert_hf_checkpoint(args.checkpoint_dir, args.out_dir)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")


if __name__ == "__main__":
    main()
