"""The transformer: ModelArgs, the static KV cache, a Llama-family Transformer whose forward can skip a block of
middle layers (the S3D draft path), and the S3D draft adapters (mask embeddings + low-rank adapters).

Covers Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Phi-3 and SmolLM2: they differ only in the fields of ModelArgs.
Weights use gpt-fast's names and the interleaved RoPE layout (see scripts/convert_hf_checkpoint.py).
"""
import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class CheckpointError(Exception):
    """A checkpoint or heads file that cannot be used; the message is meant for the user."""


@dataclass
class ModelArgs:
    architecture: str = "LlamaForCausalLM"
    block_size: int = 2048  # the longest context the model supports
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_local_heads: int = -1  # KV heads (GQA); -1 means n_head
    dim: int = 4096
    intermediate_size: int = 11008
    head_dim: int = -1  # -1 means dim // n_head
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama-3.1 style: factor, low/high_freq_factor, original_max_position_embeddings
    norm_eps: float = 1e-5
    attn_bias: bool = False  # q/k/v biases (Qwen2)
    tie_embeddings: bool = False
    name: str = ""  # where the weights came from, for humans and for the heads file's metadata
    fingerprint: str = ""  # hash of the converted weights, so heads can check they belong to these weights

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.head_dim == -1:
            self.head_dim = self.dim // self.n_head

    @classmethod
    def from_hf_config(cls, config: dict, name: str = "") -> "ModelArgs":
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
        n_head = config["num_attention_heads"]
        return cls(
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
        )

    @classmethod
    def from_json(cls, path: Path) -> "ModelArgs":
        """Reads our own config.json, as written by the conversion scripts."""
        try:
            config = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path} is not a JSON object")
        if "architectures" in config:  # a transformers folder that was never converted
            raise CheckpointError(f"{path} is a transformers config; convert it first with scripts/convert_hf_checkpoint.py")
        if config.get("architecture") not in HF_ARCHITECTURES:
            raise CheckpointError(f"unknown architecture {config.get('architecture')!r} in {path} "
                                  f"(supported: {', '.join(HF_ARCHITECTURES)})")
        known = {f.name for f in fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise CheckpointError(f"unknown keys in {path}: {', '.join(sorted(unknown))}")
        return cls(**config)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# The transformers architectures we load, and what each sets beyond the keys all of them share.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": {},  # Llama 2/3/3.1/3.2, SmolLM2
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"attn_bias": True},
    "Phi3ForCausalLM": {},  # fused qkv_proj / gate_up_proj are split at conversion
}


class KVCache(nn.Module):
    """Static cache (batch, n_kv_heads, max_seq, head_dim), written by absolute position.

    Nothing is ever rolled back: a speculative iteration writes positions p..p+g, the next one starts at the new
    p and overwrites whatever was there. Entries beyond the current position are never attended to (causal mask).
    """

    def __init__(self, batch: int, max_seq: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.heads: Optional[DraftHeads] = None  # S3D draft adapters, attached by set_heads()
        self.quantization: Optional[str] = None  # set by quantize.py: "int8", "int4 (groupsize 128)"
        self.max_seq_length = -1
        self.register_buffer("freqs_cis", torch.empty(0), persistent=False)
        self.register_buffer("causal_mask", torch.empty(0, dtype=torch.bool), persistent=False)

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        """Allocates the KV caches and the RoPE table for sequences up to max_seq_length tokens."""
        if max_seq_length > self.config.block_size:
            raise ValueError(f"{max_seq_length} tokens exceed the model's context of {self.config.block_size}")
        c, device = self.config, self.output.weight.device
        # the cache (and so attention) in the activations' dtype (the output weight may be quantized), except on a
        # CPU: there attention runs in float32, since without native bf16 its bf16 kernel is several times slower
        # over a long cache (BENCHMARKS.md, section 5)
        dtype = torch.float32 if device.type == "cpu" else self.tok_embeddings.weight.dtype
        self.max_seq_length = max_seq_length
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_length, c.n_local_heads, c.head_dim, dtype).to(device)
        self.freqs_cis = precompute_freqs_cis(max_seq_length, c.head_dim, c.rope_base, c.rope_scaling).to(device)
        self.causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device))

    def forward(self, idx: Tensor, input_pos: Tensor, skip: Optional[tuple[int, int]] = None,
                draft: bool = False, mask: Optional[Tensor] = None) -> Tensor:
        """Logits (batch, len(input_pos), vocab) for tokens idx at absolute positions input_pos.

        skip=(s, e) runs layers [0, s) and [e, L) only: the layer-skip draft. draft=True is the S3D draft: each
        token of idx (batch, n) starts a draft block and the mask embeddings M1..M(g-1) fill the positions after it,
        g = len(input_pos) // n (n = 1 when decoding: [cur, M1 .. M(g-1)]; many blocks when training). The heads'
        adapters act on the kept layers and skip defaults to the heads' range. mask (batch or 1, 1, len(input_pos),
        keys) replaces the causal mask: training's block mask.
        """
        x = self.tok_embeddings(idx)
        adapters = None
        if draft:
            heads = self.heads
            bsz, n, dim = x.shape
            masks = heads.mask_embeddings[: input_pos.shape[0] // n - 1]  # g <= heads.gamma: use the first g-1
            blocks = torch.cat([x[:, :, None], masks.to(x.dtype).expand(bsz, n, -1, -1)], dim=2)
            x = blocks.view(bsz, -1, dim)
            skip = heads.skip if skip is None else skip
            adapters = heads.adapters
        if mask is None:
            mask = self.causal_mask[None, None, input_pos]
        freqs_cis = self.freqs_cis[input_pos]
        for i, layer in enumerate(self.layers):
            if skip is not None and skip[0] <= i < skip[1]:
                continue
            # a --skip override may keep a layer the heads have no adapter for: it then runs as in the target
            layer_adapters = adapters[str(i)] if adapters is not None and str(i) in adapters else None
            x = layer(x, input_pos, freqs_cis, mask, layer_adapters)
        return self.output(self.norm(x))

    def set_heads(self, heads: Optional["DraftHeads"]) -> None:
        """Attaches S3D draft adapters; they change the draft forward only, never the full one."""
        if heads is not None:
            heads.check_fits(self.config)
            heads.to(device=self.tok_embeddings.weight.device, dtype=self.tok_embeddings.weight.dtype)
        self.heads = heads


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, input_pos: Tensor, freqs_cis: Tensor, mask: Tensor,
                adapters: Optional[nn.ModuleDict] = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, input_pos, adapters)
        return h + self.feed_forward(self.ffn_norm(h), adapters)


def linear(layer: nn.Module, x: Tensor, adapters: Optional[nn.ModuleDict], name: str) -> Tensor:
    """layer(x), plus the draft adapter's low-rank term when the draft forward passes adapters."""
    y = layer(x)
    return y if adapters is None else y + adapters[name](x)


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        total_head_dim = (config.n_head + 2 * config.n_local_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, total_head_dim, bias=config.attn_bias)  # q, k, v fused: one matmul
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None
        self.n_head, self.head_dim, self.n_local_heads = config.n_head, config.head_dim, config.n_local_heads

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor, input_pos: Tensor,
                adapters: Optional[nn.ModuleDict] = None) -> Tensor:
        bsz, seqlen, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_local_heads * self.head_dim
        q, k, v = linear(self.wqkv, x, adapters, "wqkv").split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rotary_emb(q.view(bsz, seqlen, self.n_head, self.head_dim), freqs_cis)
        k = apply_rotary_emb(k.view(bsz, seqlen, self.n_local_heads, self.head_dim), freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v.view(bsz, seqlen, self.n_local_heads, self.head_dim)))
        k, v = self.kv_cache.update(input_pos, k, v)  # in the cache's dtype, which attention then runs in
        # Attend over the whole static cache; the causal mask row of each position hides everything after it,
        # including stale entries a previous speculative iteration left behind.
        y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask,
                                           enable_gqa=self.n_head != self.n_local_heads)
        y = y.to(x.dtype).transpose(1, 2).reshape(bsz, seqlen, q_size)
        return linear(self.wo, y, adapters, "wo")


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)  # down

    def forward(self, x: Tensor, adapters: Optional[nn.ModuleDict] = None) -> Tensor:
        h = F.silu(linear(self.w1, x, adapters, "w1")) * linear(self.w3, x, adapters, "w3")
        return linear(self.w2, h, adapters, "w2")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()  # normalise in fp32 as the reference does, whatever the weights' dtype
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def precompute_freqs_cis(seq_len: int, n_elem: int, base: float, rope_scaling: Optional[dict] = None) -> Tensor:
    """(seq_len, n_elem // 2, 2) table of cos and sin, kept in fp32 whatever the model's dtype."""
    freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2)[: n_elem // 2].float() / n_elem))
    if rope_scaling is not None:
        freqs = apply_llama3_scaling(freqs, rope_scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_llama3_scaling(freqs: Tensor, rope_scaling: dict) -> Tensor:
    """Llama-3.1 long-context frequency scaling: slow down low frequencies, keep high ones, blend between."""
    factor = rope_scaling["factor"]
    low_freq_factor, high_freq_factor = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    old_context_len = rope_scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    return torch.where(wavelen > low_freq_wavelen, freqs / factor, torch.where(wavelen < high_freq_wavelen, freqs, blended))


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotates consecutive pairs (x0, x1), (x2, x3), ...: the interleaved layout (q/k permuted at conversion)."""
    xshaped = x.float().reshape(*x.shape[:-1], -1, 2)
    freqs_cis = freqs_cis.view(1, xshaped.size(1), 1, xshaped.size(3), 2)
    x_out = torch.stack([
        xshaped[..., 0] * freqs_cis[..., 0] - xshaped[..., 1] * freqs_cis[..., 1],
        xshaped[..., 1] * freqs_cis[..., 0] + xshaped[..., 0] * freqs_cis[..., 1],
    ], -1)
    return x_out.flatten(3).type_as(x)


# ---------------------------------------------------------------------------------------------------------------
# S3D draft adapters ("heads")


class LowRank(nn.Module):
    """x -> B(A(x)): a rank-r correction to one linear map of a kept layer, used in the draft forward only."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))  # zero: an untrained adapter changes nothing

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.A), self.B)


def middle_third(n_layer: int) -> tuple[int, int]:
    """The default skip range: the middle third of the layers (symmetric middle skipping worked best in S3D)."""
    return n_layer // 3, n_layer - n_layer // 3


def check_skip(skip: tuple[int, int], n_layer: int) -> tuple[int, int]:
    """Validates a draft skip range [s, e); ValueError with a message for the user otherwise."""
    s, e = skip
    if not (0 <= s < e <= n_layer) or (s == 0 and e == n_layer):
        raise ValueError(f"invalid skip range {s}:{e} for a model of {n_layer} layers "
                         f"(need 0 <= s < e <= {n_layer}, keeping at least one layer)")
    return s, e


class DraftHeads(nn.Module):
    """Everything S3D adds to the target: g-1 mask embeddings and low-rank adapters on the kept layers.

    meta records what the heads belong to (base_model, base_fingerprint) and how they were trained.
    """

    def __init__(self, config: ModelArgs, skip: tuple[int, int], gamma: int, rank: int, meta: Optional[dict] = None):
        super().__init__()
        if gamma < 1:
            raise ValueError(f"gamma must be at least 1, got {gamma}")
        if rank < 0:
            raise ValueError(f"rank must be at least 0, got {rank}")
        self.skip = check_skip(tuple(skip), config.n_layer)
        self.gamma, self.rank = gamma, rank
        self.meta = dict(meta or {})
        # Mi starts as a small random vector, distinct per offset; training moves it where it helps.
        self.mask_embeddings = nn.Parameter(torch.randn(gamma - 1, config.dim) * 0.02)
        qkv = (config.n_head + 2 * config.n_local_heads) * config.head_dim
        shapes = {"wqkv": (config.dim, qkv), "wo": (config.n_head * config.head_dim, config.dim),
                  "w1": (config.dim, config.intermediate_size), "w3": (config.dim, config.intermediate_size),
                  "w2": (config.intermediate_size, config.dim)}
        s, e = self.skip
        self.adapters = nn.ModuleDict({
            str(i): nn.ModuleDict({name: LowRank(fan_in, fan_out, rank) for name, (fan_in, fan_out) in shapes.items()})
            for i in range(config.n_layer) if not s <= i < e
        }) if rank > 0 else None

    def check_fits(self, config: ModelArgs) -> None:
        base, fingerprint = self.meta.get("base_model", ""), self.meta.get("base_fingerprint", "")
        if fingerprint and config.fingerprint and fingerprint != config.fingerprint:
            raise CheckpointError(f"these heads were trained for {base or 'another model'} (fingerprint "
                                  f"{fingerprint[:12]}), not for {config.name or 'this model'} "
                                  f"(fingerprint {config.fingerprint[:12]})")
        if self.mask_embeddings.shape[1] != config.dim or self.skip[1] > config.n_layer:
            raise CheckpointError(f"these heads (dim {self.mask_embeddings.shape[1]}, skip {self.skip[0]}:{self.skip[1]}) "
                                  f"do not fit a model of dim {config.dim} and {config.n_layer} layers")

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        metadata = {"format": "s3d-heads", "skip": f"{self.skip[0]}:{self.skip[1]}", "gamma": str(self.gamma),
                    "rank": str(self.rank), **{k: v if isinstance(v, str) else json.dumps(v) for k, v in self.meta.items()}}
        tensors = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata=metadata)


def new_heads(model: Transformer, skip: tuple[int, int], gamma: int, rank: int) -> DraftHeads:
    """Fresh (untrained) heads for this model: they work, with low acceptance."""
    c = model.config
    heads = DraftHeads(c, skip, gamma, rank, meta={"base_model": c.name, "base_fingerprint": c.fingerprint})
    return heads.to(device=model.tok_embeddings.weight.device)


def load_heads(path: Path, config: ModelArgs) -> DraftHeads:
    """Loads a heads file and checks it was made for this model; CheckpointError otherwise."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for unreadable files
        raise CheckpointError(f"cannot read heads file {path}: {e}") from None
    if meta.pop("format", None) != "s3d-heads":
        raise CheckpointError(f"{path} is not an S3D heads file (no 's3d-heads' metadata)")
    s, e = (int(v) for v in meta.pop("skip").split(":"))
    gamma, rank = int(meta.pop("gamma")), int(meta.pop("rank"))
    if e > config.n_layer:
        raise CheckpointError(f"heads {path} skip layers {s}:{e}, but the model has {config.n_layer} layers")
    heads = DraftHeads(config, (s, e), gamma, rank, meta)
    heads.check_fits(config)
    try:
        heads.load_state_dict(tensors)
    except RuntimeError as err:
        raise CheckpointError(f"heads {path} do not fit this model: {str(err).splitlines()[-1].strip()}") from None
    return heads


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: a folder with model.safetensors and config.json (ours), plus tokenizer files.


def weights_fingerprint(state_dict: dict[str, Tensor]) -> str:
    """A short hash of the weights, so a heads file can tell which model it was trained for."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().float().contiguous()
        h.update(name.encode())
        h.update(t.flatten()[:: max(1, t.numel() // 4096)].numpy().tobytes())  # a sample is enough to tell apart
    return h.hexdigest()[:32]


def save_checkpoint(state_dict: dict[str, Tensor], config: ModelArgs, folder: Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.fingerprint = weights_fingerprint(state_dict)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(config.to_json() + "\n")


def load_model(folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """Loads a converted checkpoint folder; CheckpointError (a one-line message) for anything wrong with it."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    for needed in ("config.json", "model.safetensors"):
        if not (folder / needed).is_file():
            raise CheckpointError(f"{folder} has no {needed}; is it a converted checkpoint? "
                                  "(see scripts/convert_hf_checkpoint.py and scripts/convert_gguf.py)")
    config = ModelArgs.from_json(folder / "config.json")
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state_dict = {}
    try:
        with safe_open(str(folder / "model.safetensors"), framework="pt", device="cpu") as f:
            for name in f.keys():
                state_dict[name] = f.get_tensor(name)
    except Exception as e:  # truncated or corrupt files raise SafetensorError, OSError or others
        raise CheckpointError(f"cannot read {folder / 'model.safetensors'} (truncated or corrupt?): {e}") from None
    if config.tie_embeddings:
        expected.pop("output.weight", None)
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{folder / 'model.safetensors'} does not match config.json: "
                              f"missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in expected.items():
        if state_dict[name].shape != shape:
            raise CheckpointError(f"{name} has shape {tuple(state_dict[name].shape)} in the weights, "
                                  f"{tuple(shape)} in config.json")
    model.load_state_dict(state_dict, assign=True, strict=False)
    model.freqs_cis, model.causal_mask = torch.empty(0), torch.empty(0, dtype=torch.bool)  # made by setup_caches
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device=device, dtype=dtype).eval()
