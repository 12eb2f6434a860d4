"""The transformer: ModelArgs, the static KV cache and a Llama-family Transformer whose forward can skip a block of
middle layers and switch on the S3D draft adapters (heads.py): the draft path (docs/design.md, section 2).

Covers Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Phi-3 and SmolLM2: they differ only in the fields of ModelArgs.
Weights use gpt-fast's names and the interleaved RoPE layout (scripts/hf_format.py converts them).
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# The transformers architectures whose checkpoints we run (scripts/hf_format.py says what each sets).
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM")


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


class KVCache(nn.Module):
    """Static cache (batch, n_kv_heads, max_seq, head_dim), written by absolute position.

    Nothing is ever rolled back: a speculative iteration writes positions p..p+g, the next one starts at the new
    p and overwrites whatever was there. Entries beyond the current position are never attended to (causal mask).
    """

    def __init__(self, batch: int, max_seq: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 attention_dtype: Optional[torch.dtype] = None):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq, head_dim)
        self.attention_dtype = attention_dtype  # what attention computes in; None: the cache's dtype
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
        self.heads: Optional[nn.Module] = None  # the S3D draft adapters (heads.DraftHeads), attached by set_heads()
        self.quantization: Optional[str] = None  # set by quantize.py: "int8", "int4 (groupsize 128)"
        self.max_seq_length = -1
        self.kv_dtype: Optional[torch.dtype] = None  # the KV cache's dtype; None: the activations'
        self.attention_dtype: Optional[torch.dtype] = None  # the dtype attention computes in; None: the cache's
        self.register_buffer("freqs_cis", torch.empty(0), persistent=False)
        self.register_buffer("causal_mask", torch.empty(0, dtype=torch.bool), persistent=False)

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        """Allocates the KV caches and the RoPE table for sequences up to max_seq_length tokens."""
        if max_seq_length > self.config.block_size:
            raise ValueError(f"{max_seq_length} tokens exceed the model's context of {self.config.block_size}")
        c, device = self.config, self.output.weight.device
        dtype = self.kv_dtype or self.tok_embeddings.weight.dtype  # (the output weight may be quantized)
        self.max_seq_length = max_seq_length
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_length, c.n_local_heads, c.head_dim, dtype,
                                               self.attention_dtype).to(device)
        self.freqs_cis = precompute_freqs_cis(max_seq_length, c.head_dim, c.rope_base, c.rope_scaling).to(device)
        self.causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device))

    def forward(self, idx: Tensor, input_pos: Tensor, skip: Optional[tuple[int, int]] = None,
                draft: bool = False, mask: Optional[Tensor] = None, positions: Optional[Tensor] = None,
                last_only: bool = False) -> Tensor:
        """Logits (batch, len(input_pos), vocab) for tokens idx at absolute positions input_pos.

        skip=(s, e) runs layers [0, s) and [e, L) only: the layer-skip draft. draft=True is the S3D draft: each
        token of idx (batch, n) starts a draft block and the mask embeddings M1..M(g-1) fill the positions after it,
        g = len(input_pos) // n (n = 1 when decoding: [cur, M1 .. M(g-1)]; many blocks when training). The heads'
        adapters act on the kept layers and skip defaults to the heads' range; heads with a draft vocabulary of K
        tokens give K logits, over those tokens only. mask (batch or 1, 1, len(input_pos),
        keys) replaces the causal mask over the whole cache: attention reads only the first `keys` cache positions
        (s3d.causal_mask gives the rows of the live prefix), or training's block mask. positions, when given, are
        the tokens' positions for RoPE and input_pos only their cache slots: in a token tree siblings share a
        position but not a slot (s3d.verify_tree_step). last_only=True gives the last position's logits only,
        (batch, 1, vocab): all a prefill needs, where the others would be most of its output head's work and memory.
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
            # (bidirectional heads: every position of the draft block sees all of it, as its last position does)
            rows = input_pos[-1:].expand_as(input_pos) if draft and self.heads.bidirectional else input_pos
            mask = self.causal_mask[None, None, rows]
        freqs_cis = self.freqs_cis[input_pos if positions is None else positions]
        for i, layer in enumerate(self.layers):
            if skip is not None and skip[0] <= i < skip[1]:
                continue
            # a --skip override may keep a layer the heads have no adapter for: it then runs as in the target
            layer_adapters = adapters[str(i)] if adapters is not None and str(i) in adapters else None
            x = layer(x, input_pos, freqs_cis, mask, layer_adapters)
        if last_only:
            x = x[:, -1:]
        if draft and self.heads.draft_vocab is not None:  # logit k is token heads.draft_vocab[k]
            if self.heads.draft_head_int8 is not None:  # the int8 draft's copy (heads.DraftHeads.fold_adapters)
                return linear_map(self.norm(x), self.heads.draft_head_int8, self.heads.draft_head_scale)
            return linear_map(self.norm(x), self.heads.draft_head)
        return linear(self.output, self.norm(x), None, "output")

    def set_heads(self, heads: Optional[nn.Module]) -> None:
        """Attaches S3D draft adapters; they change the draft forward only, never the full one."""
        if heads is not None:
            heads.check_fits(self.config)
            heads.to(device=self.tok_embeddings.weight.device, dtype=self.tok_embeddings.weight.dtype)
            if heads.draft_vocab is not None:  # the draft's own output head: a copy of the draft vocabulary's rows
                weight = plain_weight(self.output)
                heads.draft_head = weight.detach()[heads.draft_vocab].to(self.tok_embeddings.weight.dtype)
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


def plain_weight(layer: nn.Module) -> Tensor:
    """A linear map's weight as a plain tensor: torchao's quantized ones (tensor subclasses, quantize.py)
    dequantized, and w8a8's int8 ones (checkpoint.quantize_w8a8) times their scales, in float32."""
    weight, scale = layer.weight, getattr(layer, "scale", None)
    if type(weight) is not nn.Parameter:
        return weight.dequantize()
    return weight if scale is None else weight.float() * scale[:, None]


@torch.no_grad()
def int8_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight (out, in) as int8 and one float32 scale per row, symmetric: weight ~ weight_int8 * scale[:, None]."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


# A row multiplied by int8 weights is rounded to 8 bits with one step per block of this many inputs, as llama.cpp's
# Q8_0 rounds it: one step per row cost 4 % perplexity, a few inputs being far larger than the rest (BENCHMARKS.md,
# section 37)
INT8_BLOCK = 32


def int8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each row of x (its last dimension) rounded to 8 bits as cpu_kernels' gemv_int8 rounds it: x ~ q * s, q whole
    numbers from -127 to 127 (in x's dtype, which holds them exactly) and s the step of each input's block of
    INT8_BLOCK, the block's max |x| / 127 (float32, x's shape)."""
    k = x.shape[-1]
    blocks = F.pad(x.float(), (0, -k % INT8_BLOCK)).unflatten(-1, (-1, INT8_BLOCK))
    s = blocks.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s > 0, s, 1.0)
    q = torch.round(blocks * (1 / s)).clamp(-127, 127)
    return q.flatten(-2)[..., :k].to(x.dtype), s.expand_as(blocks).flatten(-2)[..., :k]


# Up to this many rows (tokens) a compiled bfloat16 step on a CPU computes its linear maps with gemv below rather
# than the library's GEMM: one row streams the weights at the read bandwidth there, and each row more costs a
# multiply-add per weight, so by 5 rows gemv only ties with oneDNN and by 8 it loses (BENCHMARKS.md, section 20).
GEMV_MAX_ROWS = 5
# On a CPU with AVX512_BF16, 2 to DOT_BF16_MAX_ROWS rows run on its dot products instead (cpu_kernels.py), which
# halve the work per weight: the verify step of 5 rows gets cheaper (BENCHMARKS.md, section 23), and so does a small
# tree's of up to 8, the rows one pass of that kernel over the weights takes (section 48). Past that, a second pass
# costs about what oneDNN's GEMM does (section 47): oneDNN stays there.
DOT_BF16_MAX_ROWS = 8
DOT_BF16 = False  # set by cpu_kernels.load() where that kernel is built and registered
DOT_INT8 = False  # the same for its kernel of int8 weights (AVX512_VNNI, or AVX2): the draft's copies, --quantize w8a8
# which takes up to 8 rows a pass over the weights: a step of w8a8 weights computes each row exactly as the AR step
# does (whole-number sums), so such steps go to it however many rows they have, a tree's verify in passes of 8 (up
# to ATTEND_MAX_ROWS, below), rather than to a bfloat16 GEMM that would round them otherwise
INT8_MAX_ROWS = 8
# The feed-forward's gate and up maps as one gemv call for a few rows (FeedForward.forward; off only to compare)
FUSE_GATE_UP = True


def use_gemv(x: Tensor, weight: Tensor) -> bool:
    """Whether x @ weight.T goes through gemv: compiled (the weight layout is made at compile time), on a CPU, in
    bfloat16, at most GEMV_MAX_ROWS rows known when tracing (DOT_BF16_MAX_ROWS where the AVX512_BF16 kernel takes
    them, ATTEND_MAX_ROWS for int8 weights where the AVX512_VNNI kernel does), and a plain weight (not a
    torchao-quantized one)."""
    most = (ATTEND_MAX_ROWS if DOT_INT8 and weight.dtype == torch.int8
            else DOT_BF16_MAX_ROWS if use_dot_bf16(weight) else GEMV_MAX_ROWS)
    return (torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.bfloat16
            and type(weight) in (nn.Parameter, Tensor) and weight.shape[0] % 16 == 0
            and isinstance(x.shape[-2], int) and math.prod(x.shape[:-1]) <= most)


def use_dot_bf16(weight: Tensor) -> bool:
    return DOT_BF16 and weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0


def dot_blocks(weight: Tensor, inputs: int) -> Tensor:
    """(n, k) -> (n/16, k/inputs, 16, inputs), the layout cpu_kernels' dot-product kernels read: 16 output channels
    times `inputs` consecutive inputs in one 64-byte load (2 bfloat16 inputs for gemv_bf16, 4 int8 for gemv_int8).
    In a compiled step freezing makes it once."""
    n, k = weight.shape
    return weight.view(n // 16, 16, k // inputs, inputs).transpose(1, 2).contiguous()


def gemv(x: Tensor, weight: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """x @ weight.T (times scale per output channel, for int8 weights) for a few rows, as Inductor reductions.

    oneDNN's bfloat16 GEMM of one row reads the weights at about half the read bandwidth of a 2-core CPU; this
    reaches it. The weight is read in blocks of 16 output channels (n/16, k, 16), a layout that freezing makes once,
    at compile time, so that the reduction over k keeps 16 outputs in one vector register. Each row is its own
    reduction: Inductor fuses them into one loop over the weights that keeps one accumulator per row, and a row's
    result does not depend on how many rows come with it. Where cpu_kernels.py's AVX512_BF16 kernel is loaded, 2 rows
    or more go to it instead (its sums, of pairs of products, round differently from the 1-row reduction's), and
    int8 weights (the draft's copies, --quantize w8a8) to its AVX512_VNNI kernel. With int8 weights the rows are
    rounded to 8 bits too, on either path."""
    from torch._inductor.inductor_prims import force_stride_order  # (imported only when compiling)

    n, k = weight.shape
    if scale is not None and DOT_INT8 and k % 4 == 0:
        # int8 weights (the draft's copies, --quantize w8a8) on AVX512_VNNI, the rows rounded to 8 bits too: 4 rows
        # cost about what 1 does (BENCHMARKS.md, section 24), and whole numbers are multiplied and summed exactly, so
        # a row's result is the same whatever rows come with it. 1 row too: then the AR step and verify (which
        # Inductor fuses differently around its own reductions, rounding to bfloat16 in other places) have the same
        # kernels, so each verify row is computed exactly as the AR step's row (BENCHMARKS.md, section 36).
        blocks = dot_blocks(weight, 4)
        if math.prod(x.shape[:-1]) <= INT8_MAX_ROWS:
            y = torch.ops.s3d_kernels.gemv_int8(x, blocks)
        else:  # more rows than one pass takes (a tree's verify): in passes, each row still computed alone
            parts = x.reshape(-1, k).split(INT8_MAX_ROWS)
            y = torch.cat([torch.ops.s3d_kernels.gemv_int8(part, blocks) for part in parts]).view(*x.shape[:-1], n)
        return (y * scale.float()).to(x.dtype)
    if use_dot_bf16(weight) and x.numel() > k:
        # 2 rows or more: AVX512_BF16's dot products, each taking 32 weights where a multiply-add below takes 16.
        # (1 row stays below: it reads the weights as fast, and Inductor fuses it with the layer's other work.)
        return torch.ops.s3d_kernels.gemv_bf16(x, dot_blocks(weight, 2)).to(x.dtype)
    blocks = weight.view(n // 16, 16, k).transpose(1, 2).contiguous()  # a constant of the compiled step
    rows = x.reshape(-1, k)
    if scale is not None:  # int8 weights: the rows rounded to 8 bits as well, as gemv_int8 rounds them (from the
        # rows as they are in x's dtype: in memory, not the float32 values a fused kernel would compute them from)
        rows, step = int8_rows(force_stride_order(rows, (k, 1)))
        rows = rows * step
    # the rows in float32 in memory, rather than the ops that made them recomputed inside the loop over the weights
    rows = force_stride_order(rows.float(), (k, 1))
    # (each row's sum stays (n/16, 16) until after the stack: viewed as (n,) first, Inductor would write each into
    # a buffer of its own and copy it into the stack, a loop and a thread barrier per row and map)
    y = torch.stack([(row[None, :, None] * blocks.float()).sum(1) for row in rows.unbind(0)]).view(-1, n)
    if scale is not None:
        y = y * scale.float()
    return y.view(*x.shape[:-1], n).to(x.dtype)


# A CPU without native bf16 matrix instructions (AVX2) multiplies bfloat16 matrices slowly: the library's GEMM of 64
# rows by a 576 x 1536 weight took 3.2 ms there, against 1.0 ms in float32, the weight converted at each call
# (BENCHMARKS.md, section 40). cli.load sets FLOAT32_MATMUL on such a CPU: bfloat16 linear maps of more rows than
# FLOAT32_MATMUL_ROWS (a prompt's prefill) then multiply in float32 and round the result to bfloat16, as the library's
# bfloat16 GEMM, which sums in float32, does. Decode steps of a few rows stay bfloat16, through gemv when compiled:
# there reading half the bytes of float32 is what counts.
FLOAT32_MATMUL = False
FLOAT32_MATMUL_ROWS = 8


def library_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear(x, weight, bias); multiplied in float32 and rounded to x's dtype where FLOAT32_MATMUL says so."""
    if (FLOAT32_MATMUL and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and type(weight) in (nn.Parameter, Tensor) and math.prod(x.shape[:-1]) > FLOAT32_MATMUL_ROWS):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


def linear_map(x: Tensor, weight: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """x @ weight.T (no bias; times scale per output channel for int8 weights): gemv where use_gemv says so (a
    compiled bfloat16 CPU step of a few rows), else the library's linear map (in float32 for many bfloat16 rows on a
    CPU without native bf16: FLOAT32_MATMUL)."""
    if use_gemv(x, weight):
        return gemv(x, weight, scale)
    if scale is not None:
        # int8 weights: the rows rounded to 8 bits too, as gemv's are, and multiplied in x's dtype (a bfloat16
        # prefill rounds them once more; Inductor turns the product by the int8 weight into its weight-only int8 GEMM)
        rows, step = int8_rows(x)
        return F.linear((rows.float() * step).to(x.dtype), weight.to(x.dtype)) * scale.to(x.dtype)
    return library_linear(x, weight)


# Compiled decode steps on a CPU with AVX2 or AVX-512 (up to ATTEND_MAX_ROWS tokens: AR, draft, verify, trees) attend
# with cpu_kernels.py's kernel rather than the library's attention, which is built for long queries (BENCHMARKS.md,
# sections 24 and 42). Prefill (compiled for any length) and training keep the library's.
ATTEND = False  # set by cpu_kernels.load() too
ATTEND_MAX_ROWS = 64


def use_attend(q: Tensor, k: Tensor, mask: Tensor, dtype: torch.dtype) -> bool:
    return (ATTEND and torch.compiler.is_compiling() and q.device.type == "cpu" and dtype == torch.float32
            and k.dtype in (torch.float32, torch.bfloat16) and mask.dtype == torch.bool and q.shape[-1] % 16 == 0
            and q.shape[-1] <= 128 and isinstance(q.shape[-2], int) and q.shape[-2] <= ATTEND_MAX_ROWS)


def map_weight(layer: nn.Module, adapters: Optional[nn.ModuleDict], name: str) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """The weight a linear map multiplies by, and its per-channel scale where it is int8: the layer's own, or in the
    draft forward (adapters passed) the draft's copy of W + BA. None where the draft adds an unfolded adapter's
    low-rank term instead (that map is then two)."""
    adapter = adapters[name] if adapters is not None else None
    if adapter is None:
        return layer.weight, getattr(layer, "scale", None)  # (w8a8 weights have a scale: checkpoint.quantize_w8a8)
    if adapter.weight_int8 is not None:
        # the draft's int8 copy of W + BA (heads.DraftHeads.fold_adapters): half the bytes of bfloat16 weights
        return adapter.weight_int8, adapter.scale
    if adapter.fold and type(layer.weight) is nn.Parameter and layer.weight.is_floating_point():
        # W + BA as one matrix (quantized weights are not: their int8 copies above are): where the compiled step
        # freezes the weights (CPU) it is computed once, at compile time, and the draft's linear maps then cost what
        # the target's do (heads.DraftHeads.fold_adapters)
        return layer.weight + adapter.B @ adapter.A, None
    return None


def linear(layer: nn.Module, x: Tensor, adapters: Optional[nn.ModuleDict], name: str) -> Tensor:
    """layer(x), plus the draft adapter's low-rank term when the draft forward passes adapters."""
    weight_scale = map_weight(layer, adapters, name)
    if weight_scale is None:
        return linear(layer, x, None, name) + adapters[name](x)
    weight, scale = weight_scale
    if scale is None and not use_gemv(x, weight):
        return library_linear(x, weight, layer.bias)
    y = linear_map(x, weight, scale)
    return y if layer.bias is None else y + layer.bias


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
        k, v = self.kv_cache.update(input_pos, k, v)  # in the cache's dtype
        # Attend over the cache positions the mask covers; the causal mask row of each position hides everything
        # after it, including stale entries a previous speculative iteration left behind.
        k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
        dtype = self.kv_cache.attention_dtype or k.dtype
        if use_attend(q, k, mask, dtype):  # (it reads a bfloat16 cache itself: no float32 copy)
            y = torch.ops.s3d_kernels.attend(q.to(dtype), k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask,
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
        gate, up = map_weight(self.w1, adapters, "w1"), map_weight(self.w3, adapters, "w3")
        if (FUSE_GATE_UP and gate is not None and up is not None and (gate[1] is None) == (up[1] is None)
                and use_gemv(x, gate[0]) and (x.numel() > x.shape[-1] or (gate[1] is not None and DOT_INT8))):
            # Gate and up read the same input: for a few rows, one gemv over both weights (stacked once, at compile
            # time) is one kernel call of two, which rounds the rows to 8 bits once for int8 weights (BENCHMARKS.md,
            # section 25). One row, Inductor's reductions already read the row once for both; one row of int8
            # weights goes to the same kernel as several (gemv).
            weight = torch.cat([gate[0], up[0]])
            scale = None if gate[1] is None else torch.cat([gate[1], up[1]])
            h = gemv(x, weight, scale)
            h = F.silu(h[..., :gate[0].shape[0]]) * h[..., gate[0].shape[0]:]
        else:
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
