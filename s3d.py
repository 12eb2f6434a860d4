"""Decoding: plain autoregressive (AR) and S3D speculative decoding, sharing one KV cache and one sampler.

One S3D iteration (design.md section 2), with `cur` the last accepted token at position p, not yet in the cache:

  1. draft_s3d:   one forward of [cur, M1 .. M(g-1)] through the kept layers, adapters on -> drafts d1 .. dg
  2. verify_step: one forward of [cur, d1 .. dg] through all layers -> target distributions q0 .. qg, and
                  accept_greedy / accept_sampling decide how many drafts to keep and which token follows them
  3. advance p by the tokens added. Nothing is rolled back: what the draft wrote into the cache beyond p is
     overwritten by the verify forward or by the next iteration, and the causal mask never lets anyone see it.

The baselines use the same verify and acceptance: draft_skip (the layer-skipped model drafts one token at a time,
Draft & Verify style, no adapters) and draft_small_model (a separate small model with its own cache, as in
gpt-fast). The speed model (predicted_speedup) is at the end.
"""
import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from model import Transformer

# ---------------------------------------------------------------------------------------------------------------
# Sampling. Temperature 0 is greedy; top-k and top-p apply identically to draft and target distributions, which is
# what keeps sampled speculative decoding exactly distributed as AR sampling with the same settings.


def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                    top_p: Optional[float] = None) -> Tensor:
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits.softmax(-1)


def sample_from(probs: Tensor) -> Tensor:
    """One sample per row, without a host synchronisation (unlike torch.multinomial): argmax of p / Exp(1)."""
    return torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1)


def sample(logits: Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Tokens for each row of logits, and the distribution they were drawn from (None when greedy)."""
    if temperature == 0:
        return logits.argmax(-1), None
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return sample_from(probs), probs


# ---------------------------------------------------------------------------------------------------------------
# AR decoding


def prefill(model: Transformer, prompt: Tensor, input_pos: Tensor, temperature: float = 0.0,
            top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """Runs the prompt (1, T) through the model, filling the cache; returns the first new token, shape (1, 1)."""
    logits = model(prompt, input_pos)
    return sample(logits[:, -1], temperature, top_k, top_p)[0].view(1, 1)


def decode_one_token(model: Transformer, cur: Tensor, input_pos: Tensor, temperature: float = 0.0,
                     top_k: Optional[int] = None, top_p: Optional[float] = None,
                     skip: Optional[tuple[int, int]] = None) -> tuple[Tensor, Optional[Tensor]]:
    """One step of AR decoding (or of the layer-skip draft, with skip): the next token (1, 1) and its distribution."""
    logits = model(cur, input_pos, skip=skip)
    token, probs = sample(logits[:, -1], temperature, top_k, top_p)
    return token.view(1, 1), probs


@functools.cache
def compiled(fn: Callable, device_type: str, dynamic: bool = False) -> Callable:
    """fn under torch.compile with a full graph. Static shapes on CUDA are also captured as CUDA graphs
    (reduce-overhead); dynamic=True is for prefill, whose length changes with every prompt."""
    mode = "reduce-overhead" if device_type == "cuda" and not dynamic else None
    if device_type == "cpu":
        # Freezing folds the weights into the graph and prepacks them for oneDNN: on CPU, a 5-token fp32 forward
        # then costs about what a 1-token one does (without it, twice as much), which is what verification needs.
        import torch._inductor.config

        torch._inductor.config.freezing = True
    return torch.compile(fn, mode=mode, fullgraph=True, dynamic=dynamic)


def step_fn(fn: Callable, model: Transformer, compile: bool, dynamic: bool = False) -> Callable:
    return compiled(fn, model.output.weight.device.type, dynamic) if compile else fn


def prepare_cache(model: Transformer, length: int) -> None:
    """Makes sure the static KV cache holds `length` positions; reallocates (and so recompiles) only if it must."""
    if model.max_seq_length < length:
        model.setup_caches(1, min(model.config.block_size, -(-length // 256) * 256))


@dataclass
class Result:
    tokens: list[int]  # the new tokens, EOS included if generation stopped there
    accepted: list[int] = field(default_factory=list)  # per speculative iteration: drafts accepted (0 .. g)
    time_to_first_token: float = 0.0  # seconds
    decode_time: float = 0.0  # seconds from the first token to the last


def emit(out: list[int], new: list[int], max_new_tokens: int, eos_ids: set[int],
         on_token: Optional[Callable[[int], None]]) -> bool:
    """Appends new tokens up to EOS (included) or max_new_tokens exactly; True when generation is over."""
    for t in new:
        out.append(t)
        if on_token is not None:
            on_token(t)
        if t in eos_ids or len(out) >= max_new_tokens:
            return True
    return False


def ar_generate(model: Transformer, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0,
                top_k: Optional[int] = None, top_p: Optional[float] = None, eos_ids: set[int] = frozenset(),
                compile: bool = False, compile_prefill: bool = False,
                on_token: Optional[Callable[[int], None]] = None) -> Result:
    """Plain autoregressive decoding: one forward of one token per new token."""
    device = model.output.weight.device
    prepare_cache(model, len(prompt) + max_new_tokens + 1)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    run_prefill = step_fn(prefill, model, compile_prefill, dynamic=True)
    step = step_fn(decode_one_token, model, compile)
    t0 = time.perf_counter()
    cur = run_prefill(model, torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device), **sampling)
    out: list[int] = []
    done = emit(out, [cur.item()], max_new_tokens, eos_ids, on_token)
    t1 = time.perf_counter()
    pos = len(prompt)
    while not done:
        cur, _ = step(model, cur.clone(), torch.tensor([pos], device=device), **sampling)
        done = emit(out, [cur.item()], max_new_tokens, eos_ids, on_token)  # the one host sync of the step
        pos += 1
    return Result(out, time_to_first_token=t1 - t0, decode_time=time.perf_counter() - t1)

