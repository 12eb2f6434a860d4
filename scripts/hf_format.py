"""The transformers checkpoint format and ours, both ways: config.json (config_from_hf), weight names and the q/k
RoPE layout (from_hf_weights, to_transformers). Used by the conversion scripts, and by bench.py to run
transformers on exactly our weights.

transformers rotates halves (x_i, x_{i+d/2}) of each head; we rotate interleaved pairs (x_2i, x_2i+1), as gpt-fast
does, so q and k rows are reordered on the way in (to_interleaved) and back on the way out (to_halves).
"""
import re
from pathlib import Path

import torch

from checkpoint import CheckpointError, check_config
from model import ModelArgs

# The transformers architectures we read, and what each sets beyond the keys all of them share.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": {},  # Llama 2/3/3.1/3.2, SmolLM2
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"attn_bias": True},
    "Phi3ForCausalLM": {},  # fused qkv_proj / gate_up_proj are split at conversion
}

# transformers name (layer index as {}) -> ours; q/k/v, Phi-3's fused maps and lm_head are handled apart.
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


def config_from_hf(config: dict, name: str = "") -> ModelArgs:
    """Reads a transformers config.json; raises CheckpointError for what we do not support."""
    archs = config.get("architectures") or [config.get("model_type", "?")]
    arch = archs[0]
    if arch not in HF_ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {arch!r} in config.json (supported: {', '.join(HF_ARCHITECTURES)})")
    for key in ("mlp_bias", "attention_bias") if arch != "Qwen2ForCausalLM" else ("mlp_bias",):
        if config.get(key):
            raise CheckpointError(f"{arch} with {key}=true is not supported")
    # transformers 5 writes rope_parameters (theta and scaling together); older checkpoints rope_theta/rope_scaling
    rope = config.get("rope_parameters") or {**(config.get("rope_scaling") or {}), "rope_theta": config.get("rope_theta", 10000.0)}
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise CheckpointError(f"{arch} with partial_rotary_factor={partial} is not supported")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise CheckpointError(f"rope scaling type {kind!r} is not supported (only 'llama3')")
    scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")} \
        if kind == "llama3" else None
    block_size = config.get("max_position_embeddings", 2048)
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if window:  # beyond the window the model attends differently; cap the context rather than be wrong
        block_size = min(block_size, window)
    missing = [k for k in ("num_attention_heads", "vocab_size", "num_hidden_layers", "hidden_size", "intermediate_size")
               if k not in config]
    if missing:
        raise CheckpointError(f"config.json lacks {', '.join(missing)}, which a {arch} needs")
    n_head = config["num_attention_heads"]
    if type(n_head) is not int or type(config["hidden_size"]) is not int or n_head < 1:
        raise CheckpointError("config.json: num_attention_heads and hidden_size must be positive whole numbers")
    return check_config(ModelArgs(
        architecture=arch,
        block_size=block_size,
        vocab_size=config["vocab_size"],
        n_layer=config["num_hidden_layers"],
        n_head=n_head,
        n_local_heads=config.get("num_key_value_heads") or n_head,
        dim=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        head_dim=config.get("head_dim") or config["hidden_size"] // n_head,
        rope_base=rope.get("rope_theta") or 10000.0,
        rope_scaling=scaling,
        norm_eps=config.get("rms_norm_eps", 1e-5),
        tie_embeddings=config.get("tie_word_embeddings", False),
        name=name,
        **HF_ARCHITECTURES[arch],
    ), Path("config.json"))


def to_interleaved(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """q/k rows (or biases) from transformers' halves layout to our interleaved pairs."""
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_halves(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """The inverse of to_interleaved."""
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def from_hf_weights(hf: dict[str, torch.Tensor], c: ModelArgs) -> dict[str, torch.Tensor]:
    """Maps transformers weights to ours (float32); KeyError names a weight the architecture needs and lacks."""
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


def to_transformers(model) -> torch.nn.Module:
    """A dense transformers LlamaForCausalLM with exactly our weights and dtype (the inverse of from_hf_weights),
    so that speed is compared on the same weights. (transformers 5 keeps a GGUF's weights packed and dequantizes in
    every matmul, which is a different workload.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    if c.architecture != "LlamaForCausalLM":
        raise CheckpointError("the transformers comparison is written for Llama-architecture checkpoints")
    hf_config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.intermediate_size,
                            num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_local_heads,
                            head_dim=c.head_dim, max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
                            rope_theta=c.rope_base, tie_word_embeddings=c.tie_embeddings)
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    ours_to_hf = {v: k for k, v in WEIGHT_MAP.items()}
    q_size, kv_size = c.n_head * c.head_dim, c.n_local_heads * c.head_dim
    for i in range(c.n_layer):
        q, k, v = sd[f"layers.{i}.attention.wqkv.weight"].split([q_size, kv_size, kv_size])
        h = f"model.layers.{i}.self_attn."
        out |= {h + "q_proj.weight": to_halves(q, c.n_head, c.head_dim),
                h + "k_proj.weight": to_halves(k, c.n_local_heads, c.head_dim), h + "v_proj.weight": v}
        out |= {ours_to_hf[name].format(i): sd[name.format(i)] for name in ours_to_hf if "{}" in name}
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_config)
    hf.load_state_dict({k: v.clone() for k, v in out.items()}, assign=True, strict=not c.tie_embeddings)
    if c.tie_embeddings:
        hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config)  # its buffers were made on the meta device
    return hf.to(model.output.weight.dtype).eval()
