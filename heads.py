"""The S3D draft adapters ("heads"): g-1 mask embeddings and low-rank adapters on the kept layers, active only in
the draft forward (docs/design.md, section 2), optionally a sequential head and a bidirectional draft block; the
rules for skip ranges and g; their safetensors file format.
"""
import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from checkpoint import CheckpointError, UsageError, written_then_renamed
from model import ModelArgs, Transformer, int8_per_channel, linear_map, plain_weight


class LowRank(nn.Module):
    """x -> B(A(x)): a rank-r correction to one linear map of a kept layer, used in the draft forward only."""

    fold = False  # True: model.linear applies W + BA as one matrix (DraftHeads.fold_adapters)

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))  # zero: an untrained adapter changes nothing
        # W + BA in int8, one scale per output channel, when the draft reads int8 copies (DraftHeads.fold_adapters)
        self.register_buffer("weight_int8", None, persistent=False)
        self.register_buffer("scale", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.A), self.B)


def middle_third(n_layer: int) -> tuple[int, int]:
    """The default skip range: the middle third of the layers (symmetric middle skipping worked best in S3D)."""
    return n_layer // 3, n_layer - n_layer // 3


def symmetric_skips(n_layer: int) -> list[tuple[int, int]]:
    """Candidate skip ranges for a sweep: middle ranges skipping 2, 4, ... layers up to half the model, centred (the paper's best shape)."""
    return [((n_layer - k) // 2, (n_layer - k) // 2 + k) for k in range(2, n_layer // 2 + 1, 2)]


def check_skip(skip: tuple[int, int], n_layer: int) -> tuple[int, int]:
    """Validates a draft skip range [s, e): UsageError otherwise."""
    s, e = skip
    if not (0 <= s < e <= n_layer) or (s == 0 and e == n_layer):
        raise UsageError(f"invalid skip range {s}:{e} for a model of {n_layer} layers "
                         f"(need 0 <= s < e <= {n_layer}, keeping at least one layer)")
    return s, e


def check_gamma(gamma: int, heads: Optional["DraftHeads"] = None) -> int:
    """g, the tokens drafted per iteration: at least 1, and with heads at most theirs (they have g-1 masks)."""
    if gamma < 1:
        raise UsageError(f"gamma must be at least 1, got {gamma}")
    if heads is not None and gamma > heads.gamma:
        raise UsageError(f"gamma {gamma} exceeds the {heads.gamma} tokens these heads draft "
                         f"(they have {heads.gamma - 1} mask embeddings)")
    return gamma


class DraftHeads(nn.Module):
    """Everything S3D adds to the target: g-1 mask embeddings, low-rank adapters on the kept layers and, optionally,
    a draft vocabulary: the K token ids the draft may propose (FR-Spec, EAGLE-3). The draft's output head then
    reads only those K rows of the target's (draft_head, copied by Transformer.set_heads); the verify forward keeps
    the full head, so the output is still exactly the target's, and a token outside the K is never drafted.

    Two options change what the draft block computes, not what it costs:
    - sequential_rank r > 0, the sequential head (DSpark's "Markov" head): draft k's logits get a rank-r bias from
      the token before it, sequential_out @ sequential_in[token] (markov_bias). A mask position alone can only guess
      a marginal over what comes two or three tokens ahead; the bias conditions it on the draft before it. It is
      applied after the one parallel draft forward, one tiny step per draft (s3d.draft_s3d).
    - bidirectional: every position of the block [cur, M1 .. M(g-1)] attends to all of it (DFlash's layout), not
      causally; the mask positions then see the ones after them too. Free at inference.

    meta records what the heads belong to (base_model, base_fingerprint) and how they were trained.
    """

    def __init__(self, config: ModelArgs, skip: tuple[int, int], gamma: int, rank: int, meta: Optional[dict] = None,
                 draft_vocab: Optional[Tensor] = None, sequential_rank: int = 0, bidirectional: bool = False):
        super().__init__()
        if rank < 0 or sequential_rank < 0:
            raise UsageError(f"rank and sequential rank must be at least 0, got {rank} and {sequential_rank}")
        self.skip = check_skip(tuple(skip), config.n_layer)
        self.gamma, self.rank = check_gamma(gamma), rank
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
        self.register_buffer("draft_vocab", None if draft_vocab is None else check_draft_vocab(draft_vocab, config))
        self.sequential_rank, self.bidirectional = sequential_rank, bidirectional
        if sequential_rank > 0:
            # in: one row per token id; out: one row per logit (the draft vocabulary's when there is one). out starts
            # at zero, so untrained the head changes nothing.
            drafted = config.vocab_size if draft_vocab is None else len(draft_vocab)
            self.sequential_in = nn.Parameter(torch.randn(config.vocab_size, sequential_rank))
            self.sequential_out = nn.Parameter(torch.zeros(drafted, sequential_rank))
        self.folded = self.int8 = False  # fold_adapters
        self.register_buffer("draft_head", None, persistent=False)  # (K, dim): the output head's draft_vocab rows
        # and their int8 copy, one scale per row, where the draft reads int8 copies (fold_adapters)
        self.register_buffer("draft_head_int8", None, persistent=False)
        self.register_buffer("draft_head_scale", None, persistent=False)

    def markov_bias(self, previous: Tensor) -> Tensor:
        """The sequential head's bias on the logits of the drafts that follow the tokens `previous` (any shape):
        (*previous.shape, logits)."""
        # (in a compiled CPU draft, one row through gemv costs a few microseconds where a library GEMM call costs 60)
        return linear_map(F.embedding(previous, self.sequential_in), self.sequential_out)

    def fold_adapters(self, fold: bool, int8_of: Optional[Transformer] = None) -> None:
        """fold=True: the draft forward multiplies by W + BA instead of adding B(Ax) to Wx. The same function, but
        only worth it where the compiled step freezes the weights (CPU): there W + BA becomes a constant, computed
        once, and the draft costs what rank 0 does. Elsewhere it would recompute W + BA at every step.

        int8_of (the model these heads are attached to): the draft's linear maps read int8 copies of W + BA made
        here, one scale per output channel: half the bytes of bfloat16 weights, and reading weights is most of a
        draft step's time on a CPU (BENCHMARKS.md, section 18); so does the draft head (set_heads made it). The drafts
        may then differ a little from the bfloat16 draft's; the verify forward never reads these copies, so the
        output is still the target's."""
        if (fold, int8_of is not None) == (self.folded, self.int8):
            return  # (the copies already made stay: new tensors would make a compiled draft step recompile)
        self.folded, self.int8 = fold, int8_of is not None
        self.draft_head_int8 = self.draft_head_scale = None
        if int8_of is not None and self.draft_head is not None:
            self.draft_head_int8, scale = int8_per_channel(self.draft_head)
            self.draft_head_scale = scale.to(self.draft_head.dtype)
        for i, layer_adapters in (self.adapters or {}).items():
            for name, adapter in layer_adapters.items():
                adapter.fold, adapter.weight_int8, adapter.scale = fold, None, None
                if int8_of is not None:
                    weight = plain_weight(getattr(int8_of.layers[int(i)].attention if name in ("wqkv", "wo")
                                                  else int8_of.layers[int(i)].feed_forward, name))
                    with torch.no_grad():
                        folded = weight.float() + adapter.B.float() @ adapter.A.float()
                    adapter.weight_int8, scale = int8_per_channel(folded)
                    adapter.scale = scale.to(adapter.B.dtype)

    def check_fits(self, config: ModelArgs) -> None:
        base, fingerprint = self.meta.get("base_model", ""), self.meta.get("base_fingerprint", "")
        if fingerprint and config.fingerprint and fingerprint != config.fingerprint:
            raise CheckpointError(f"these heads were trained for {base or 'another model'} (fingerprint "
                                  f"{fingerprint[:12]}), not for {config.name or 'this model'} "
                                  f"(fingerprint {config.fingerprint[:12]})")
        if not (fingerprint and config.fingerprint) and base != config.name:
            # without a fingerprint on both sides, fitting shapes alone could pair heads with another model's weights
            raise CheckpointError(f"cannot tell whether these heads belong to this model: "
                                  f"{'the heads' if not fingerprint else 'the model'} record no weights fingerprint "
                                  f"and the heads' base model {base!r} is not {config.name!r}")
        if self.mask_embeddings.shape[1] != config.dim or self.skip[1] > config.n_layer:
            raise CheckpointError(f"these heads (dim {self.mask_embeddings.shape[1]}, skip {self.skip[0]}:{self.skip[1]}) "
                                  f"do not fit a model of dim {config.dim} and {config.n_layer} layers")

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        metadata = {"format": "s3d-heads", "skip": f"{self.skip[0]}:{self.skip[1]}", "gamma": str(self.gamma),
                    "rank": str(self.rank), "sequential_rank": str(self.sequential_rank),
                    "bidirectional": str(int(self.bidirectional)), **{k: v if isinstance(v, str) else json.dumps(v) for k, v in self.meta.items()}}
        tensors = {k: (v.float() if v.is_floating_point() else v).detach().contiguous() for k, v in self.state_dict().items()}
        with written_then_renamed(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)


def check_draft_vocab(ids: Tensor, config: ModelArgs) -> Tensor:
    """A draft vocabulary: distinct token ids of the model's vocabulary, at least one; CheckpointError otherwise."""
    if ids.dim() != 1 or ids.dtype != torch.int64 or len(ids) == 0 or len(ids) > config.vocab_size:
        raise CheckpointError(f"a draft vocabulary is 1 to {config.vocab_size} int64 token ids, got a "
                              f"{ids.dtype} tensor of shape {tuple(ids.shape)}")
    if ids.min() < 0 or ids.max() >= config.vocab_size or len(ids.unique()) != len(ids):
        raise CheckpointError(f"a draft vocabulary holds distinct token ids below {config.vocab_size}")
    return ids.clone()


def most_frequent_tokens(sequences: list[list[int]], k: int, vocab_size: int) -> Tensor:
    """The k most frequent ids in sequences, ties (and tokens never seen) broken by the lower id: BPE vocabularies
    number their tokens roughly by how early, so how commonly, they were merged."""
    if not 1 <= k <= vocab_size:
        raise UsageError(f"a draft vocabulary needs 1 to {vocab_size} tokens, got {k}")
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for tokens in sequences:
        counts += torch.bincount(torch.tensor(tokens, dtype=torch.int64), minlength=vocab_size)[:vocab_size]
    rank = counts * vocab_size + (vocab_size - 1 - torch.arange(vocab_size))  # by count, then by lower id
    return torch.argsort(rank, descending=True)[:k]


def widened_draft_vocab(old: Tensor, ranked: Tensor, k: int) -> Tensor:
    """A draft vocabulary of k tokens that keeps `old` first, in its order (a sequential head's output rows are
    those tokens', trained), then the tokens of `ranked` (most frequent first) that it lacks."""
    if k < len(old):
        raise UsageError(f"--draft_vocab {k}: these heads' sequential head was trained on a draft vocabulary of "
                         f"{len(old)} tokens, whose rows it keeps; give at least {len(old)}")
    return torch.cat([old, ranked[~torch.isin(ranked, old)][:k - len(old)]])


def new_heads(model: Transformer, skip: tuple[int, int], gamma: int, rank: int,
              draft_vocab: Optional[Tensor] = None, sequential_rank: int = 0, bidirectional: bool = False) -> DraftHeads:
    """Fresh (untrained) heads for this model: they work, with low acceptance."""
    c = model.config
    heads = DraftHeads(c, skip, gamma, rank, meta={"base_model": c.name, "base_fingerprint": c.fingerprint},
                       draft_vocab=draft_vocab, sequential_rank=sequential_rank, bidirectional=bidirectional)
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
    try:
        s, e = (int(v) for v in meta.pop("skip").split(":"))
        gamma, rank = int(meta.pop("gamma")), int(meta.pop("rank"))
        # (heads from before these options have neither)
        sequential_rank, bidirectional = int(meta.pop("sequential_rank", 0)), meta.pop("bidirectional", "0")
    except (KeyError, ValueError):
        raise CheckpointError(f"{path} lacks its skip (S:E), gamma and rank metadata") from None
    if bidirectional not in ("0", "1"):
        raise CheckpointError(f"{path}: its 'bidirectional' metadata must be 0 or 1, got {bidirectional!r}")
    if e > config.n_layer:
        raise CheckpointError(f"heads {path} skip layers {s}:{e}, but the model has {config.n_layer} layers")
    check_skip((s, e), config.n_layer)
    # the metadata must agree with the tensors before anything is allocated from it
    masks = tensors.get("mask_embeddings")
    if masks is None or gamma < 1 or masks.dim() != 2 or masks.shape[0] != gamma - 1 or not 0 <= rank <= config.dim:
        raise CheckpointError(f"heads {path}: gamma {gamma} and rank {rank} in its metadata do not match its tensors")
    sequential = tensors.get("sequential_in")
    if (sequential is None) != (sequential_rank == 0) or (sequential is not None and sequential.shape[-1] != sequential_rank):
        raise CheckpointError(f"heads {path}: sequential rank {sequential_rank} in its metadata does not match its tensors")
    heads = DraftHeads(config, (s, e), gamma, rank, meta, tensors.get("draft_vocab"), sequential_rank, bidirectional == "1")
    heads.check_fits(config)
    try:
        heads.load_state_dict(tensors)
    except RuntimeError as err:
        raise CheckpointError(f"heads {path} do not fit this model: {str(err).splitlines()[-1].strip()}") from None
    return heads
