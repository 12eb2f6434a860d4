"""Decoding: plain autoregressive (AR) and S3D speculative decoding, sharing one KV cache and one sampler.

One S3D iteration (docs/design.md, section 2), with `cur` the last accepted token at position p, not yet cached:

  1. draft_s3d:   one forward of [cur, M1 .. M(g-1)] through the kept layers, adapters on -> drafts d1 .. dg
  2. verify_step: one forward of [cur, d1 .. dg] through all layers -> target distributions q0 .. qg, and
                  accept_greedy / accept_sampling decide how many drafts to keep and which token follows them
  3. advance p by the tokens added. Nothing is rolled back: what the draft wrote into the cache beyond p is
     overwritten by the verify forward or by the next iteration, and the causal mask never lets anyone see it.

The baselines use the same verify and acceptance and differ only in their draft function, chosen once before the
loop (DRAFTERS): the layer-skipped model drafting one token at a time (Draft & Verify style, no adapters) and a
separate small draft model (as in gpt-fast). The speed model (predicted_speedup) is at the end.
"""
import functools
import gc
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from heads import check_gamma
from model import Transformer

# ---------------------------------------------------------------------------------------------------------------
# Sampling. Temperature, top-k and top-p apply identically to draft and target distributions, which is what keeps
# sampled speculative decoding exactly distributed as AR sampling with the same settings.


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 is greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None


GREEDY = Sampling()


def logits_to_probs(logits: Tensor, sampling: Sampling) -> Tensor:
    logits = logits.float() / max(sampling.temperature, 1e-5)
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= sampling.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits.softmax(-1)


def sample_from(probs: Tensor) -> Tensor:
    """One sample per row, without a host synchronisation (unlike torch.multinomial): argmax of p / Exp(1)."""
    return torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1)


def sample(logits: Tensor, sampling: Sampling) -> tuple[Tensor, Optional[Tensor]]:
    """Tokens for each row of logits, and the distribution they were drawn from (None when greedy)."""
    if sampling.temperature == 0:
        return logits.argmax(-1), None
    probs = logits_to_probs(logits, sampling)
    return sample_from(probs), probs


# ---------------------------------------------------------------------------------------------------------------
# AR decoding


def causal_mask(model: Transformer, pos: int, n: int) -> Optional[Tensor]:
    """The causal mask rows of positions pos .. pos+n-1 over cache positions 0 .. pos+n-1 only, so that attention
    reads the live prefix of the static cache rather than all of it. The length changes at every step, so it is
    marked dynamic: one compiled step serves every length, without recompiling."""
    if model.causal_mask.device.type == "cuda":
        return None  # a CUDA graph is recorded per shape: there the steps keep the static cache's full width
    mask = model.causal_mask[None, None, pos:pos + n, :pos + n]
    torch._dynamo.maybe_mark_dynamic(mask, 3)
    return mask


def prefill(model: Transformer, prompt: Tensor, input_pos: Tensor, sampling: Sampling = GREEDY,
            mask: Optional[Tensor] = None) -> Tensor:
    """Runs the prompts (B, T) through the model, filling the cache; returns the first new tokens, shape (B, 1)."""
    logits = model(prompt, input_pos, mask=mask)
    return sample(logits[:, -1], sampling)[0].view(-1, 1)


def decode_one_token(model: Transformer, cur: Tensor, input_pos: Tensor, sampling: Sampling = GREEDY,
                     skip: Optional[tuple[int, int]] = None,
                     mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """One step of AR decoding (or of the layer-skip draft, with skip): the next tokens (B, 1), their distributions."""
    logits = model(cur, input_pos, skip=skip, mask=mask)
    token, probs = sample(logits[:, -1], sampling)
    return token.view(-1, 1), probs


@functools.cache
def compiled(fn: Callable, device_type: str, dynamic: bool = False, autotune: bool = True) -> Callable:
    """fn under torch.compile with a full graph. Static shapes on CUDA are also captured as CUDA graphs
    (reduce-overhead); dynamic=True is for prefill, whose length changes with every prompt. autotune (CPU): let
    Inductor time its own C++ GEMMs against the library's (see step_fn)."""
    options = None
    if device_type == "cpu":
        # Freezing folds the weights into the graph as constants (prepacked for oneDNN where the dtype is bf16);
        # max-autotune then lets Inductor's own C++ GEMM (one micro-kernel per shape) compete with the library's.
        # Set globally: torch.compile's options= does not reach freezing.
        import torch._inductor.config as inductor

        inductor.freezing, inductor.max_autotune_gemm_backends = True, "CPP,ATEN"
        options = {"max_autotune": autotune}
        # The gate and up projections, which read the same input, become one GEMM (as wqkv is by design): 30
        # fewer library calls a step.
        inductor.cpp.enable_concat_linear = True
        # Time outside the kernels (docs/design.md, section 4): a C++ wrapper calls the kernels instead of Python
        # (about 1 ms less per step of the default model), at some seconds more compile time.
        inductor.cpp_wrapper = True
        # autotuning stays quiet: its tables of timings per kernel choice are for Inductor's developers
        inductor.autotune_num_choices_displayed, inductor.max_autotune_report_choices_stats = 0, False
        # and so does a deprecation warning raised inside Inductor's autotuning on some CPUs
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
    # Dynamo guards every parameter of the module on every call; with recursive dict tags an unchanged module is
    # checked once as a whole (0.45 ms -> 0.18 ms per call on the default model).
    torch._dynamo.config.use_recursive_dict_tags_for_guards = True
    mode = "reduce-overhead" if device_type == "cuda" and not dynamic else None
    return torch.compile(fn, mode=mode, fullgraph=True, dynamic=dynamic, options=options)


def step_fn(fn: Callable, model: Transformer, compile: bool, dynamic: bool = False) -> Callable:
    """fn compiled for model's device and dtype (or fn itself). On a CPU, bf16 weights skip autotuning: it times
    each GEMM alone with its weights hot in cache, where Inductor's C++ GEMM of one row wins, while a decode step
    streams every weight from memory, where oneDNN's prepacked bf16 GEMM is about twice as fast (the AR step's
    linear maps: 11.8 ms autotuned, 6.0 ms with oneDNN's; BENCHMARKS.md, section 9). MKL's float32 GEMM of a few
    rows is slow on a 2-core AVX2 CPU, so float32 (and the int8 kernels) keep autotuning: S3D's draft and verify
    steps are exactly such shapes."""
    if not compile:
        return fn
    autotune = model.tok_embeddings.weight.dtype != torch.bfloat16 or model.quantization is not None
    return compiled(fn, model.output.weight.device.type, dynamic, autotune)


def release_compiled() -> None:
    """Frees every compiled step (on a CPU each holds its own frozen, prepacked copy of the weights)."""
    from torch._inductor.codecache import PyCodeCache

    torch._dynamo.reset()
    if torch.cuda.is_available():  # the recorded CUDA graphs and their memory pool
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()
    compiled.cache_clear()
    # Inductor keeps each compiled graph's generated module, whose globals hold the frozen weights, in its code
    # cache and in sys.modules; dynamo's reset leaves them there.
    PyCodeCache.cache_clear()
    for name in [m for m in sys.modules if m.startswith("torch._inductor.runtime.compile_tasks.")]:
        del sys.modules[name]
    gc.collect()


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


@torch.no_grad()  # inference: no autograd graph (it would keep every step's activations alive through the KV cache)
def ar_generate(model: Transformer, prompt: list[int], max_new_tokens: int, *, sampling: Sampling = GREEDY,
                eos_ids: set[int] = frozenset(), compile: bool = False, compile_prefill: bool = False,
                on_token: Optional[Callable[[int], None]] = None) -> Result:
    """Plain autoregressive decoding: one forward of one token per new token."""
    device = model.output.weight.device
    prepare_cache(model, len(prompt) + max_new_tokens + 1)
    run_prefill = step_fn(prefill, model, compile_prefill, dynamic=True)
    step = step_fn(decode_one_token, model, compile)
    t0 = time.perf_counter()
    cur = run_prefill(model, torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device), sampling,
                      causal_mask(model, 0, len(prompt)))
    out: list[int] = []
    done = emit(out, [cur.item()], max_new_tokens, eos_ids, on_token)
    t1 = time.perf_counter()
    pos = len(prompt)
    while not done:
        cur, _ = step(model, cur.clone(), torch.arange(pos, pos + 1, device=device), sampling, None, causal_mask(model, pos, 1))
        done = emit(out, [cur.item()], max_new_tokens, eos_ids, on_token)  # the one host sync of the step
        pos += 1
    return Result(out, time_to_first_token=t1 - t0, decode_time=time.perf_counter() - t1)


@torch.no_grad()
def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = GREEDY,
                   eos_ids: set[int] = frozenset(), compile: bool = False) -> list[list[int]]:
    """AR decoding of many prompts at once (the cache must have a row for each); the new tokens of each, cut after
    its first EOS. Prompts are left-padded to a common length: RoPE makes attention depend only on relative
    positions, so the shift changes nothing but the padding, which the mask hides."""
    device = model.output.weight.device
    width = max(map(len, prompts))
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    slots = torch.arange(model.max_seq_length, device=device)
    key_valid = (slots[None, :] >= pad[:, None])[:, None, None, :]  # (B, 1, 1, S)
    # a padding slot attends to itself only, so that its (unused) state stays finite
    prefill_mask = model.causal_mask[None, None, :width] & (key_valid | (slots[None, None, :width, None] == slots))
    cur = prefill(model, idx, torch.arange(width, device=device), sampling, prefill_mask)
    step = step_fn(decode_one_token, model, compile)
    out, done = [[] for _ in prompts], [False] * len(prompts)
    for i in range(max_new_tokens):
        for r, t in enumerate(cur.view(-1).tolist()):
            if not done[r]:
                out[r].append(t)
                done[r] = t in eos_ids
        if all(done) or i == max_new_tokens - 1:
            break
        input_pos = torch.arange(width + i, width + i + 1, device=device)
        cur, _ = step(model, cur.clone(), input_pos, sampling, mask=model.causal_mask[None, None, input_pos] & key_valid)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Speculative decoding: draft, verify, accept.


def draft_mask(model: Transformer, pos: int, gamma: int) -> Optional[Tensor]:
    """The draft block's mask rows: causal, or with bidirectional heads every row seeing the whole block, as its
    last row does."""
    if not model.heads.bidirectional:
        return causal_mask(model, pos, gamma)
    last = causal_mask(model, pos + gamma - 1, 1)
    if last is None:
        return None  # (CUDA: Transformer.forward builds it)
    mask = last.expand(-1, -1, gamma, -1)
    torch._dynamo.maybe_mark_dynamic(mask, 3)
    return mask


def draft_s3d(model: Transformer, cur: Tensor, input_pos: Tensor, sampling: Sampling = GREEDY,
              mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """S3D draft: one forward of [cur, M1 .. M(g-1)] at positions p .. p+g-1 through the kept layers with the
    adapters on. Position i predicts the token after it, so the g logits give d1 .. dg all at once. With a
    sequential head, draft i's logits then get the bias of the token before it (cur, d1, ..): g tiny steps, one
    after the other; a sampled draft's p is the biased distribution it was drawn from."""
    heads = model.heads
    logits = model(cur, input_pos, draft=True, mask=mask)[0]  # (g, vocab), or (g, K) over the draft vocabulary
    vocab = heads.draft_vocab
    if heads.sequential_rank == 0:
        indices, probs = sample(logits, sampling)
    else:
        previous, rows = cur.view(1), []
        for row in logits:  # (g is static: unrolled when compiled)
            index, p = sample(row[None] + heads.markov_bias(previous), sampling)
            previous = index if vocab is None else vocab[index]
            rows.append((index, p))
        indices = torch.cat([i for i, _ in rows])
        probs = None if rows[0][1] is None else torch.cat([p for _, p in rows])
    if vocab is None:
        return indices, probs
    # from the draft vocabulary's indices back to token ids; p is 0 outside the draft vocabulary
    full = None if probs is None else probs.new_zeros(len(probs), model.config.vocab_size).index_copy_(1, vocab, probs)
    return vocab[indices], full


def draft_one_by_one(step: Callable, model: Transformer, cur: Tensor, pos: int, gamma: int, sampling: Sampling,
                     skip: Optional[tuple[int, int]] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Drafts gamma tokens autoregressively: the training-free layer-skip draft (model = the target, with skip) or
    a separate small draft model (skip=None). Returns drafts (g,) and their distributions (g, vocab) or None."""
    tokens, probs = [], []
    for i in range(gamma):
        cur, p = step(model, cur.clone(), torch.arange(pos + i, pos + i + 1, device=cur.device), sampling, skip,
                      causal_mask(model, pos + i, 1))
        # copies: under CUDA graphs the next replay of the step writes its outputs over this one's
        tokens.append(cur.view(1).clone())
        probs.append(None if p is None else p.clone())
    return torch.cat(tokens), None if probs[0] is None else torch.cat(probs)


@dataclass
class Draft:
    """What drafts gamma tokens per iteration: kind "s3d" (the target's heads), "skip" (the target with layers
    skip[0] .. skip[1]-1 left out) or "model" (a separate small model with the target's vocabulary)."""
    kind: str = "s3d"
    gamma: int = 4
    skip: Optional[tuple[int, int]] = None
    model: Optional[Transformer] = None


# A drafter maps (cur (1, 1), its position p) to drafts (g,) and their distributions (g, vocab), or None for greedy.
Drafter = Callable[[Tensor, int], tuple[Tensor, Optional[Tensor]]]


def s3d_drafter(model: Transformer, draft: Draft, sampling: Sampling, compile: bool, prefill_fn: Callable) -> Drafter:
    # compiled on a CPU the weights are frozen into the step: the adapters are then folded into them for free
    model.heads.fold_adapters(compile and model.output.weight.device.type == "cpu")
    step = step_fn(draft_s3d, model, compile)
    return lambda cur, pos: step(model, cur, torch.arange(pos, pos + draft.gamma, device=cur.device), sampling,
                                 draft_mask(model, pos, draft.gamma))


def skip_drafter(model: Transformer, draft: Draft, sampling: Sampling, compile: bool, prefill_fn: Callable) -> Drafter:
    step = step_fn(decode_one_token, model, compile)
    return lambda cur, pos: draft_one_by_one(step, model, cur, pos, draft.gamma, sampling, draft.skip)


def model_drafter(model: Transformer, draft: Draft, sampling: Sampling, compile: bool, prefill_fn: Callable) -> Drafter:
    """The small model keeps its own cache of the same tokens, starting with the prompt (prefill_fn fills it). When
    all g drafts were accepted it never ran on d_g, so the next call first gives it that token's KV."""
    small = draft.model
    step = step_fn(decode_one_token, small, compile)
    prefill_fn(small)
    last: dict = {}

    def drafter(cur: Tensor, pos: int) -> tuple[Tensor, Optional[Tensor]]:
        if last and pos == last["pos"] + draft.gamma + 1:
            step(small, last["drafts"][-1:].view(1, 1).clone(), torch.arange(pos - 1, pos, device=cur.device), sampling,
                 None, causal_mask(small, pos - 1, 1))
        drafts, probs = draft_one_by_one(step, small, cur, pos, draft.gamma, sampling)
        last.update(pos=pos, drafts=drafts)
        return drafts, probs

    return drafter


DRAFTERS = {"s3d": s3d_drafter, "skip": skip_drafter, "model": model_drafter}


def accept_greedy(drafts: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Keeps the longest prefix of drafts equal to the target's argmax; the bonus is the target's next argmax.

    Returns n (0-dim, drafts accepted) and tokens (g+1,) whose first n+1 entries are the tokens to emit: the
    accepted drafts equal the target's choices, so they are simply target[:n+1]."""
    target = target_logits.argmax(-1)  # (g+1,): the target's choice after cur, d1, .., dg
    n = (drafts == target[:-1]).int().cumprod(0).sum()
    return n, target


def accept_sampling(drafts: Tensor, draft_probs: Optional[Tensor], target_probs: Tensor) -> tuple[Tensor, Tensor]:
    """The lossless rejection rule (Leviathan et al.; Chen et al.): accept d_i with probability min(1, q(d_i)/p(d_i));
    at the first rejection emit a sample of norm(max(0, q - p)) instead; if all g pass, a bonus sample of q_g.
    The emitted tokens are then distributed exactly as sampling the target alone. draft_probs None means the drafts
    were point masses (p(d_i) = 1). Returns n and tokens (g+1,) as accept_greedy does."""
    g = drafts.shape[0]
    if draft_probs is None:
        draft_probs = torch.nn.functional.one_hot(drafts, target_probs.shape[-1]).to(target_probs.dtype)
    q = target_probs[:-1].gather(-1, drafts[:, None]).squeeze(-1)
    p = draft_probs.gather(-1, drafts[:, None]).squeeze(-1)
    accepted = torch.rand_like(q) * p < q  # u < q/p, without dividing by p
    n = accepted.int().cumprod(0).sum()
    residual = (target_probs[:-1] - draft_probs).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), target_probs[:-1])  # p == q: never rejected
    fallback = sample_from(torch.cat([residual, target_probs[-1:]]))  # a replacement for every position, + bonus
    keep = torch.arange(g + 1, device=drafts.device) < n
    return n, torch.where(keep, torch.cat([drafts, drafts[-1:]]), fallback)


def verify_step(model: Transformer, cur: Tensor, drafts: Tensor, draft_probs: Optional[Tensor], input_pos: Tensor,
                sampling: Sampling = GREEDY, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One forward of [cur, d1 .. dg] at positions p .. p+g through all layers, adapters off, then acceptance.
    It writes the true KV of those positions over whatever the draft left there."""
    logits = model(torch.cat([cur.view(1, 1), drafts.view(1, -1)], dim=1), input_pos, mask=mask)[0]  # (g+1, vocab)
    if sampling.temperature == 0:
        return accept_greedy(drafts, logits)
    return accept_sampling(drafts, draft_probs, logits_to_probs(logits, sampling))


def check_draft(model: Transformer, draft: Draft) -> None:
    if draft.kind not in DRAFTERS:
        raise ValueError(f"unknown draft kind {draft.kind!r} (choose from {', '.join(DRAFTERS)})")
    if draft.kind == "s3d" and model.heads is None:
        raise ValueError("S3D drafting needs draft heads: load a heads file or make fresh ones")
    check_gamma(draft.gamma, model.heads if draft.kind == "s3d" else None)
    if draft.kind == "skip" and draft.skip is None:
        raise ValueError("the layer-skip draft needs a skip range")
    if draft.kind == "model" and (draft.model is None or draft.model.config.vocab_size != model.config.vocab_size):
        raise ValueError("the model draft needs a draft model with the target's vocabulary")


@torch.no_grad()
def speculative_generate(model: Transformer, prompt: list[int], max_new_tokens: int, draft: Draft, *,
                         sampling: Sampling = GREEDY, eos_ids: set[int] = frozenset(), compile: bool = False,
                         compile_prefill: bool = False, on_token: Optional[Callable[[int], None]] = None,
                         on_iteration: Optional[Callable[[list[int], int, int], None]] = None) -> Result:
    """Speculative decoding; the output is exactly the target's (greedy: token for token; sampling: in
    distribution). on_iteration(drafts, n, target_token) sees every iteration: the g drafts, how many were
    accepted, and the target's own token after them (the replacement of draft n+1, or the bonus when all g were
    accepted)."""
    check_draft(model, draft)
    gamma, device = draft.gamma, model.output.weight.device
    for m in (model, draft.model):
        if m is not None:
            prepare_cache(m, len(prompt) + max_new_tokens + gamma + 1)
    run_prefill = step_fn(prefill, model, compile_prefill, dynamic=True)
    verify = step_fn(verify_step, model, compile)

    t0 = time.perf_counter()
    prompt_t, prompt_pos = torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device)
    cur = run_prefill(model, prompt_t, prompt_pos, sampling, causal_mask(model, 0, len(prompt)))
    drafter = DRAFTERS[draft.kind](model, draft, sampling, compile,
                                   lambda m: run_prefill(m, prompt_t, prompt_pos, GREEDY, causal_mask(m, 0, len(prompt))))
    out: list[int] = []
    done = emit(out, [cur.item()], max_new_tokens, eos_ids, on_token)
    t1 = time.perf_counter()
    pos, accepted = len(prompt), []
    while not done:
        # copies of the drafts: under CUDA graphs the verify replay may reuse the memory of the draft's outputs
        drafts, probs = (None if t is None else t.clone() for t in drafter(cur, pos))
        n, tokens = verify(model, cur, drafts, probs, torch.arange(pos, pos + gamma + 1, device=device), sampling,
                           causal_mask(model, pos, gamma + 1))
        host = torch.cat([n.view(1), tokens, drafts]).tolist()  # the iteration's one host synchronisation
        n = host[0]
        accepted.append(n)
        if on_iteration is not None:
            on_iteration(host[gamma + 2:], n, host[n + 1])
        done = emit(out, host[1:n + 2], max_new_tokens, eos_ids, on_token)
        cur = tokens[n].view(1, 1).clone()
        pos += n + 1
    return Result(out, accepted, time_to_first_token=t1 - t0, decode_time=time.perf_counter() - t1)


def acceptance_rates(accepted: list[int], gamma: int) -> list[float]:
    """a_i: how often draft i was accepted among iterations whose drafts 1..i-1 all were (docs/design.md, 4)."""
    reached = [sum(n >= i for n in accepted) for i in range(gamma + 1)]  # reached[i]: drafts 1..i accepted
    return [reached[i] / reached[i - 1] if reached[i - 1] else 0.0 for i in range(1, gamma + 1)]


def mean_tokens_per_iteration(accepted: list[int]) -> float:
    """tau: tokens added per iteration, the bonus included."""
    return 1 + sum(accepted) / len(accepted) if accepted else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Speed model (docs/design.md, section 4): costs in units of one AR decode step.


def expected_tokens_per_iteration(acceptance: list[float]) -> float:
    """E[tau] = 1 + sum_i prod_{j<=i} a_j."""
    total, survive = 1.0, 1.0
    for a in acceptance:
        survive *= a
        total += survive
    return total


def predicted_speedup(acceptance: list[float], draft_cost: float, verify_cost: float) -> float:
    """IF(g, beta) = E[tau] / (cd(g, beta) + cv(g)): the speedup over AR that the costs and acceptance predict."""
    return expected_tokens_per_iteration(acceptance) / (draft_cost + verify_cost)
