"""Decoding: plain autoregressive (AR) and S3D speculative decoding, sharing one KV cache and one sampler.

One S3D iteration (docs/design.md, section 2), with `cur` the last accepted token at position p, not yet cached:

  1. draft_s3d:   one forward of [cur, M1 .. M(g-1)] through the kept layers, adapters on -> drafts d1 .. dg
  2. verify_step: one forward of [cur, d1 .. dg] through all layers -> target distributions q0 .. qg, and
                  accept_greedy / accept_sampling decide how many drafts to keep and which token follows them
  3. advance p by the tokens added. Nothing is rolled back: what the draft wrote into the cache beyond p is
     overwritten by the verify forward or by the next iteration, and the causal mask never lets anyone see it.

The baselines use the same verify and acceptance and differ only in their draft function, chosen once before the
loop (DRAFTERS): the layer-skipped model drafting one token at a time (Draft & Verify style, no adapters) and a
separate small draft model (as in gpt-fast). Adaptive decoding (Pace) takes plain AR steps instead of iterations
wherever speculating has been the slower of the two; context lookup (ContextLookup) copies the drafts from the prompt
and answer instead of drafting them, wherever they repeat. The speed model (predicted_speedup) is at the end.
"""
import collections
import functools
import gc
import itertools
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

import cpu_kernels
import model as model_py
from checkpoint import UsageError
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
    logits = model(prompt, input_pos, mask=mask, last_only=True)
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
        # model.gemv (bfloat16 steps of a few rows) converts the weights to float32 in registers as it reads them:
        # freezing must not fold that into float32 copies of the weights, which would double the bytes every step
        # reads (nor an int8 weight's conversion into a bfloat16 copy). Set for every CPU step, as it is global.
        from torch._inductor.constant_folding import add_dont_constant_fold

        add_dont_constant_fold(torch.ops.prims.convert_element_type.default)
        # and gemv of a few rows is bound by its multiply-adds: let the compiler fuse them (FMA)
        inductor.cpp.enable_floating_point_contract_flag = "fast"
        # gemv of 2 rows or more on AVX512_BF16's dot products instead, where the CPU has them (built once)
        cpu_kernels.load()
    # Dynamo guards every parameter of the module on every call; with recursive dict tags an unchanged module is
    # checked once as a whole (0.45 ms -> 0.18 ms per call on the default model).
    torch._dynamo.config.use_recursive_dict_tags_for_guards = True
    mode = "reduce-overhead" if device_type == "cuda" and not dynamic else None
    return torch.compile(fn, mode=mode, fullgraph=True, dynamic=dynamic, options=options)


# Whether compiled float32 and int8 CPU steps let Inductor time its own C++ GEMMs against the library's (step_fn).
# It costs seconds of every compile; the tests turn it off except where they test it (tests/conftest.py).
CPU_AUTOTUNE = True


def step_fn(fn: Callable, model: Transformer, compile: bool, dynamic: bool = False) -> Callable:
    """fn compiled for model's device and dtype (or fn itself). On a CPU, bf16 weights skip autotuning: it times
    each GEMM alone with its weights hot in cache, where Inductor's C++ GEMM of one row wins, while a decode step
    streams every weight from memory, where oneDNN's prepacked bf16 GEMM is about twice as fast (the AR step's
    linear maps: 11.8 ms autotuned, 6.0 ms with oneDNN's; BENCHMARKS.md, section 9). MKL's float32 GEMM of a few
    rows is slow on a 2-core AVX2 CPU, so float32 (and the int8 kernels) keep autotuning: S3D's draft and verify
    steps are exactly such shapes. Compiled bf16 steps of a few rows on a CPU skip the library's GEMMs altogether
    (model.gemv: the AR step 1.3x cheaper again, BENCHMARKS.md section 20)."""
    if not compile:
        return fn
    autotune = CPU_AUTOTUNE and (model.tok_embeddings.weight.dtype != torch.bfloat16 or model.quantization is not None)
    return compiled(fn, model.output.weight.device.type, dynamic, autotune)


class GuardsUntilWarm:
    """Before each call of a compiled step, dynamo checks its guards: the inputs' dtypes and shapes and every
    parameter and buffer of the model the step reads (0.2 to 0.4 ms a call for the default model on a CPU, some 5 %
    of a decode step). Within one decoding loop nothing they check changes once each of the loop's steps has run:
    shapes are static, and a mask's length is dynamic from its step's first compile. So from warm() to the end of
    the with block the loop's calls skip them: torch.compiler's stance skip_guard_eval_unsafe keeps only the guards
    that tell a step's compiled versions apart, and a call that would have recompiled raises instead of running a
    stale step (a mask whose length was left static does: tests/test_s3d.py). Compiled CPU steps only, where it was
    measured; the with block restores the stance whatever happens inside it."""

    def __init__(self, compile: bool, device: torch.device):
        self.skip, self.stance = compile and device.type == "cpu", None

    def __enter__(self) -> "GuardsUntilWarm":
        return self

    def warm(self) -> None:
        """Every step of the loop has now run once, compiled, its guards checked."""
        if self.skip and self.stance is None:
            self.stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)  # (set as it is made)

    def __exit__(self, *exc) -> None:
        if self.stance is not None:
            self.stance.__exit__(*exc)
            self.stance = None


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
    paths: list[list[int]] = field(default_factory=list)  # tree verification: the accepted path's nodes per iteration
    ar_steps: int = 0  # adaptive decoding: the AR steps taken instead of iterations
    copied: list[bool] = field(default_factory=list)  # per iteration: its drafts were copied from the context


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
    with GuardsUntilWarm(compile, device) as guards:
        while not done:
            cur, _ = step(model, cur.clone(), torch.arange(pos, pos + 1, device=device), sampling, None,
                          causal_mask(model, pos, 1))
            done = emit(out, [cur.item()], max_new_tokens, eos_ids, on_token)  # the one host sync of the step
            pos += 1
            guards.warm()
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
    with GuardsUntilWarm(compile, device) as guards:
        for i in range(max_new_tokens):
            for r, t in enumerate(cur.view(-1).tolist()):
                if not done[r]:
                    out[r].append(t)
                    done[r] = t in eos_ids
            if all(done) or i == max_new_tokens - 1:
                break
            input_pos = torch.arange(width + i, width + i + 1, device=device)
            cur, _ = step(model, cur.clone(), input_pos, sampling,
                          mask=model.causal_mask[None, None, input_pos] & key_valid)
            guards.warm()
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
    skip[0] .. skip[1]-1 left out) or "model" (a separate small model with the target's vocabulary). With a tree
    (S3D only), several candidates per position are verified at once, gamma being the tree's depth. Adaptive: take
    AR steps instead of iterations wherever they have been making tokens faster (Pace). int8 (S3D only): the draft
    reads int8 copies of its layers' weights (None: where that measured faster, see int8_draft). lookup: drafts
    copied from the context instead, wherever its last tokens occurred before (ContextLookup)."""
    kind: str = "s3d"
    gamma: int = 4
    skip: Optional[tuple[int, int]] = None
    model: Optional[Transformer] = None
    tree: Optional["Tree"] = None
    adaptive: bool = False
    int8: Optional[bool] = None
    lookup: int = 0  # context lookup (ContextLookup): the longest run of tokens matched; 0 turns it off

    @property
    def slots(self) -> int:
        """Cache slots one iteration writes beyond the accepted tokens: cur and the drafts, or the tree's nodes."""
        return self.gamma + 1 if self.tree is None else len(self.tree)


# A drafter maps (cur (1, 1), its position p) to drafts (g,) and their distributions (g, vocab), or None for greedy.
Drafter = Callable[[Tensor, int], tuple[Tensor, Optional[Tensor]]]


def int8_draft(model: Transformer, draft: Draft, compile: bool) -> bool:
    """Whether the S3D draft reads int8 copies of its layers (heads.DraftHeads.fold_adapters): draft.int8 when
    given, else where that measured faster: compiled on a CPU with bfloat16 activations and cpu_kernels' int8
    kernel (draft(4) 0.70 -> 0.57 AR steps: BENCHMARKS.md, section 18; then 0.53, section 24; on AVX2 code paths 0.67
    against 0.91 on the bfloat16 weights, section 41). Without that kernel the copies go through Inductor's
    reduction, rows rounded to 8 bits, which cost 3.77 AR steps there (section 40). The heads need adapters, whose
    folded weights the copies hold."""
    if draft.int8 is not None:
        return draft.int8
    if not (compile and model.output.weight.device.type == "cpu" and model.heads.rank > 0
            and model.tok_embeddings.weight.dtype == torch.bfloat16):
        return False
    cpu_kernels.load()  # (which sets model.DOT_INT8 where the kernel is built)
    return model_py.DOT_INT8


def s3d_drafter(model: Transformer, draft: Draft, sampling: Sampling, compile: bool, prefill_fn: Callable) -> Drafter:
    # compiled on a CPU the weights are frozen into the step: the adapters are then folded into them for free
    cpu = compile and model.output.weight.device.type == "cpu"
    model.heads.fold_adapters(cpu, model if int8_draft(model, draft, compile) else None)
    if draft.tree is not None:  # the tree's tokens; its candidates are point masses, so no distributions
        tree_step = step_fn(draft_tree, model, compile)
        return lambda cur, pos: (tree_step(model, cur, torch.arange(pos, pos + draft.gamma, device=cur.device),
                                           draft.tree, draft_mask(model, pos, draft.gamma)), None)
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

# Context lookup keeps to matches of 2 tokens or more: a single token recurs by chance too often for what followed
# it to be a good guess (BENCHMARKS.md, section 31, has what the lookup gains).
LOOKUP_SHORTEST = 2
LOOKUP_LONGEST = 4  # the programs' default: matches of 4, then 3, then 2 tokens


class ContextLookup:
    """Drafts without a draft forward: where the last n tokens of the prompt and answer so far occurred before (n
    from `longest` down to LOOKUP_SHORTEST), the g tokens that followed their latest occurrence (prompt lookup
    decoding, Saxena 2023, over the answer too). Answers repeat their prompt (a summary, an extraction, a name, code
    being edited) and themselves (lists, markup); there a copy is often right for several tokens, and its iteration
    costs one verify forward. Where nothing matches, the draft runs as usual. The drafts are point masses, checked
    by the same acceptance rule, so the output stays exactly the target's. An index of n-grams, kept up to date
    with each accepted token, makes a lookup a few dictionary reads."""

    def __init__(self, tokens: list[int], longest: int, gamma: int):
        self.tokens, self.gamma, self.sizes = [], gamma, range(longest, LOOKUP_SHORTEST - 1, -1)
        self.index: dict[tuple[int, ...], int] = {}  # an n-gram -> where the tokens after its latest occurrence start
        self.extend(tokens)

    def extend(self, new: list[int]) -> None:
        """The tokens accepted since; indexes every n-gram that a token follows (the one ending at the last token
        is left out: it would match itself)."""
        first = len(self.tokens)  # the n-grams ending before it are in the index already
        self.tokens += new
        for end in range(first, len(self.tokens)):
            for n in self.sizes:
                if end >= n:
                    self.index[tuple(self.tokens[end - n:end])] = end

    def propose(self) -> Optional[list[int]]:
        """g drafts copied from after the latest earlier occurrence of the longest matching n-gram, or None."""
        for n in self.sizes:
            start = self.index.get(tuple(self.tokens[-n:])) if len(self.tokens) >= n else None
            if start is not None:
                copy = self.tokens[start:start + self.gamma]
                while len(copy) < self.gamma:  # the copy ran into the last token: it goes on copying itself, as a
                    copy.append(copy[start + len(copy) - len(self.tokens)])  # repeating pattern would go on
                return copy
        return None


def accept_greedy(drafts: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Keeps the longest prefix of drafts equal to the target's argmax; the bonus is the target's next argmax.

    Returns n (0-dim, drafts accepted) and tokens (g+1,) whose first n+1 entries are the tokens to emit: the
    accepted drafts equal the target's choices, so they are simply target[:n+1]."""
    target = target_logits.argmax(-1)  # (g+1,): the target's choice after cur, d1, .., dg
    n = (drafts == target[:-1]).int().cumprod(0).sum()
    return n, target


def normalized_residual(residual: Tensor, target_probs: Tensor) -> Tensor:
    """The residual rows (what is left of q once the rejected drafts' mass is taken out), normalized. Where nothing
    is left, the drafts covered all of q and one of them is always accepted, so that row is never sampled: q itself
    keeps it finite."""
    mass = residual.sum(-1, keepdim=True)
    return torch.where(mass > 0, residual / mass.clamp_min(1e-30), target_probs)


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
    residual = normalized_residual((target_probs[:-1] - draft_probs).clamp_min(0), target_probs[:-1])
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


# ---------------------------------------------------------------------------------------------------------------
# Tree verification (docs/design.md, section 5). The S3D draft gives a whole distribution at each of its g
# positions, so instead of one chain it can offer several candidates per position: a static tree whose paths are
# the sequences tried, verified together in one forward (Medusa; SpecInfer), since a few-row forward costs little
# more than a one-row forward. Each node attends to the prefix and to its own ancestors only (the tree mask); its
# KV goes to its own cache slot, and the accepted path's KV is then moved to the slots of its positions.


@dataclass(frozen=True)
class Tree:
    """A static token tree. Node 0 is cur (the root); node j > 0 stands for the sequence of draft ranks nodes[j]:
    (0, 1) is the best candidate at depth 1, then the second best at depth 2 after it. Nodes are in breadth-first
    order (each depth's nodes contiguous, parents before children), so node j's siblings are its neighbours."""
    nodes: tuple[tuple[int, ...], ...]  # the rank sequence of every node; the root's is ()
    parents: tuple[int, ...]  # the root is its own parent
    depths: tuple[int, ...]
    paths: tuple[tuple[int, ...], ...]  # per node: the nodes from the root down to it, padded with it to depth + 1

    @property
    def depth(self) -> int:
        return max(self.depths)

    def __len__(self) -> int:
        return len(self.nodes)

    def __str__(self) -> str:  # its --tree value: candidates per depth for a top-k tree, else its nodes' ranks
        widths = [1 + max(n[d] for n in self.nodes if len(n) > d) for d in range(self.depth)]
        if len(self) == 1 + sum(math.prod(widths[:d]) for d in range(1, self.depth + 1)):  # every node of top-k
            return ",".join(map(str, widths))
        return ",".join("".join(map(str, n)) for n in self.nodes[1:])


def make_tree(nodes: list[tuple[int, ...]]) -> Tree:
    """The tree of these rank sequences (every prefix of one must be there too), in breadth-first order."""
    nodes = sorted(set(nodes) | {()}, key=lambda n: (len(n), n))
    index = {n: j for j, n in enumerate(nodes)}
    if any(n[:-1] not in index for n in nodes[1:]):
        raise ValueError("a tree's rank sequences must include every prefix of each")
    depth = max(map(len, nodes))
    paths = tuple(tuple(index[n[:d]] for d in range(len(n) + 1)) + (j,) * (depth - len(n)) for j, n in enumerate(nodes))
    return Tree(tuple(nodes), tuple(index[n[:-1]] if n else 0 for n in nodes), tuple(map(len, nodes)), paths)


MAX_TREE_NODES = 256


def top_k_tree(widths: tuple[int, ...]) -> Tree:
    """Top-k per depth: every node at depth d has widths[d] children, its parent's best candidates. (1, 1, 1, 1)
    is the chain of g = 4; (3, 2, 1, 1) tries 3 tokens at depth 1, 2 after each of those, and so on: 21 nodes."""
    if not widths or min(widths) < 1:
        raise ValueError(f"a tree needs at least one candidate per depth, got {widths}")
    nodes = sum(math.prod(widths[:d]) for d in range(1, len(widths) + 1))
    if nodes > MAX_TREE_NODES:  # a bound of sense: a verify forward of that many rows is compute-bound anywhere
        raise ValueError(f"the tree {','.join(map(str, widths))} has {nodes} nodes; at most {MAX_TREE_NODES}")
    return make_tree([n for d in range(1, len(widths) + 1) for n in itertools.product(*map(range, widths[:d]))])


def parse_tree(text: str) -> Tree:
    """--tree's value: candidates per depth, "3,2,1,1" (top_k_tree); or the tree's nodes in breadth-first order,
    each its draft ranks from depth 1 down as digits, "0,1,00,01,10,000" (str(best_tree(..)) prints such trees;
    they start with 0, where a width never is 0)."""
    items = text.split(",")
    if items[0] == "0":
        if not all(item.isdigit() for item in items) or len(set(items)) != len(items):
            raise ValueError(f"a tree's nodes are distinct rank sequences such as 0,1,00,10,000, got {text!r}")
        if len(items) > MAX_TREE_NODES:
            raise ValueError(f"the tree {text} has {len(items)} nodes; at most {MAX_TREE_NODES}")
        return make_tree([tuple(map(int, item)) for item in items])
    try:
        widths = tuple(int(w) for w in items)
    except ValueError:
        raise ValueError(f"--tree takes candidates per depth such as 3,2,1,1 (or nodes such as 0,1,00,10,000), "
                         f"got {text!r}") from None
    return top_k_tree(widths)


def tree_ancestors(tree: Tree, device: torch.device) -> Tensor:
    """(N, N): ancestors[j, a] when node a is on the path to node j (j included). Built from Python constants, so
    inside a compiled step it is a constant of the graph."""
    return torch.tensor([[a in path for a in range(len(tree))] for path in tree.paths], device=device)


cached_tree_ancestors = functools.cache(tree_ancestors)  # for the host, which builds the mask at every iteration


def tree_mask(model: Transformer, pos: int, tree: Tree) -> Tensor:
    """The tree's attention mask over the cache: node j (at slot pos + j) sees the prefix 0 .. pos-1 and the
    slots of its ancestors. As causal_mask: on a CPU only up to the tree's last slot (that width marked dynamic),
    on a GPU the full width."""
    n, device = len(tree), model.causal_mask.device
    width = model.max_seq_length if device.type == "cuda" else pos + n
    mask = torch.zeros(1, 1, n, width, dtype=torch.bool, device=device)
    mask[..., :pos] = True
    mask[..., pos:pos + n] = cached_tree_ancestors(tree, device)
    if device.type != "cuda":
        torch._dynamo.maybe_mark_dynamic(mask, 3)
    return mask


def draft_tree(model: Transformer, cur: Tensor, input_pos: Tensor, tree: Tree, mask: Optional[Tensor] = None) -> Tensor:
    """The tree's tokens (N - 1,), the root left out: the same one draft forward as draft_s3d, then node j gets the
    candidate of its rank at its depth (with a sequential head, after the bias of its parent's token). Candidates
    are the draft's best tokens, whatever the sampling: point masses, which the acceptance rules allow."""
    heads = model.heads
    logits = model(cur, input_pos, draft=True, mask=mask)[0]  # (depth, vocab), or (depth, K)
    tokens = cur.view(1)
    for d in range(1, tree.depth + 1):  # (static: unrolled when compiled)
        level = [j for j, depth in enumerate(tree.depths) if depth == d]
        rows = logits[d - 1].expand(len(level), -1)
        if heads.sequential_rank:
            rows = rows + heads.markov_bias(tokens[[tree.parents[j] for j in level]])
        width = 1 + max(tree.nodes[j][-1] for j in level)
        ranks = torch.tensor([tree.nodes[j][-1] for j in level], device=cur.device)
        chosen = rows.topk(width, dim=-1).indices.gather(1, ranks[:, None]).view(-1)
        tokens = torch.cat([tokens, chosen if heads.draft_vocab is None else heads.draft_vocab[chosen]])
    return tokens[1:]


def accept_tree_greedy(tree: Tree, tokens: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """tokens (N,), the root's first: a node is right when its token is the target's argmax after its parent; the
    accepted path ends at the deepest node whose ancestors are all right (at most one child of a node can be: its
    siblings are other tokens). Returns n (its depth), the tokens to emit (depth + 1,; the first n + 1 count: the
    target's choices along the path, the bonus last) and the path's nodes (depth + 1,)."""
    target = target_logits.argmax(-1)
    right = tokens == target[torch.tensor(tree.parents, device=tokens.device)]
    right[0] = True
    return tree_path(tree, right, target)


def tree_path(tree: Tree, right: Tensor, choices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The deepest node whose path is right all the way: its depth, choices along its path, its path."""
    depths = torch.tensor(tree.depths, device=right.device)
    reached = ~(tree_ancestors(tree, right.device) & ~right[None]).any(-1)
    best = torch.argmax(torch.where(reached, depths, -1)).view(1)  # (indexing by a 1-element tensor, not a 0-dim
    path = torch.tensor(tree.paths, device=right.device).index_select(0, best).view(-1)  # one: no host sync)
    return depths.index_select(0, best).view(()), choices[path], path


def accept_tree_sampling(tree: Tree, tokens: Tensor, target_probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Recursive rejection over siblings with point-mass candidates (SpecInfer; EAGLE-2): at a node whose target
    distribution is q, try its children in rank order; child c is accepted with probability q(c) / (1 - mass of
    the siblings tried before it), which is min(1, q'(c) / 1) for q' the residual after those siblings. If none is,
    emit a sample of q with every child's token removed (renormalized); after an accepted leaf, a sample of its q.
    Each try is the lossless rule of a point-mass draft, so the output is distributed as the target's. All the
    tries are drawn at once: a node is taken when it passes and no earlier sibling did. Returns as
    accept_tree_greedy does."""
    n = len(tree)
    parents = torch.tensor(tree.parents, device=tokens.device)
    q = target_probs[parents, tokens]  # q of each node's token under its parent's distribution (root: unused)
    earlier = torch.tensor([[0 < k < j and tree.parents[j] == tree.parents[k] for k in range(n)] for j in range(n)],
                           device=tokens.device)  # earlier[j, k]: k is a sibling of j, tried before it
    remaining = (1 - earlier.to(q.dtype) @ q).clamp_min(0)
    passes = torch.rand_like(q) * remaining < q  # u < q / remaining, without dividing
    taken = passes & ~(earlier & passes[None]).any(-1)
    taken[0] = True
    children_out = target_probs.index_put((parents[1:], tokens[1:]), torch.zeros_like(q[1:]))
    residual = normalized_residual(children_out, target_probs)
    depth, path_tokens, path = tree_path(tree, taken, tokens)
    last = sample_from(residual[path[-1:]])  # (the path is padded with its last node)
    out = torch.cat([path_tokens[1:], last])
    keep = torch.arange(len(out), device=tokens.device) < depth
    return depth, torch.where(keep, out, last), path


def verify_tree_step(model: Transformer, cur: Tensor, drafts: Tensor, input_pos: Tensor, tree: Tree,
                     sampling: Sampling = GREEDY, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """One forward of the tree's N tokens [cur, drafts] at cache slots p .. p+N-1 and positions p + depth, under
    the tree mask; acceptance; then the accepted path's KV moves from its nodes' slots to the slots of its
    positions, p+1 .. p+n (the whole padded path is moved, at fixed shape: what lands beyond p+n is stale, as in
    the chain). Returns n, the tokens to emit (depth + 1,) and the accepted path's nodes."""
    tokens = torch.cat([cur.view(1), drafts])
    positions = input_pos[0] + torch.tensor(tree.depths, device=tokens.device)
    logits = model(tokens[None], input_pos, mask=mask, positions=positions)[0]
    if sampling.temperature == 0:
        n, out, path = accept_tree_greedy(tree, tokens, logits)
    else:
        n, out, path = accept_tree_sampling(tree, tokens, logits_to_probs(logits, sampling))
    source, destination = input_pos[path], input_pos[:tree.depth + 1]
    for layer in model.layers:
        cache = layer.attention.kv_cache
        for buffer in (cache.k_cache, cache.v_cache):
            buffer.index_copy_(2, destination, buffer.index_select(2, source))
    return n, out, path


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
    if draft.adaptive and draft.kind == "model":  # the small model's cache would miss the AR steps' tokens
        raise UsageError("adaptive decoding goes with the drafts that share the target's cache (s3d, skip), not the "
                         "model draft")
    if draft.lookup and (draft.kind == "model" or draft.tree is not None):  # (the small model's cache: as above)
        raise UsageError("context lookup goes with a chain of S3D or layer-skip drafts, not with the model draft or "
                         "a tree")
    if draft.lookup and draft.lookup < LOOKUP_SHORTEST:
        raise UsageError(f"context lookup matches {LOOKUP_SHORTEST} tokens or more: --lookup {draft.lookup} is too few")
    if draft.int8 and (draft.kind != "s3d" or model.heads.rank == 0):
        raise UsageError("int8 draft weights are copies of the S3D heads' folded layers: they need heads with adapters "
                         "(rank > 0)")
    if draft.tree is not None:  # the user's tree: UsageError, one line from the programs (cli.make_draft calls this)
        if draft.kind != "s3d":
            raise UsageError(f"tree verification takes the S3D draft's candidates, not the {draft.kind} draft's")
        if draft.tree.depth != draft.gamma:
            raise UsageError(f"a tree {draft.tree.depth} deep drafts g = {draft.tree.depth}, not {draft.gamma}")
        choices = model.config.vocab_size if model.heads.draft_vocab is None else len(model.heads.draft_vocab)
        if max(n[-1] for n in draft.tree.nodes[1:]) >= choices:
            raise UsageError(f"the tree {draft.tree} asks for more candidates than the draft's {choices} tokens")


class Pace:
    """Adaptive decoding's choice, before each step, between a speculative iteration and a plain AR step: whichever
    has been making tokens faster, timed as decoding runs, so that it holds for this machine and this text.
    Speculation pays only where the text is predictable enough (docs/design.md, section 4: E[tau] against cd + cv);
    where it is not (a translation, say), AR steps cost less. Either way each token is the target's (the choice
    depends on the past only), so the output stays exactly AR's.

    The first few steps are AR steps, to time one. Then iterations run until their median time over their mean
    tokens (the last 16) is `margin` more than the median AR step (the last 16). The tokens an iteration makes vary
    a lot (1 to g + 1: the mean of 16 varies by some 13 %), so that is judged on at least `probe` iterations since
    the last switch, and with a margin against switching on noise; when they lose, a stretch of AR steps follows,
    twice as long each time they lose again, before the next try. With context lookup, copied drafts are verified
    wherever there are some and are not timed here: Pace chooses between the drafter and an AR step."""

    def __init__(self, ar_probe: int = 3, probe: int = 8, stretch: int = 16, longest: int = 128, margin: float = 0.15):
        self.probe, self.shortest, self.longest, self.margin = probe, stretch, longest, margin
        # (seconds, tokens) of the latest iterations since the last AR step (a stretch of AR steps empties it)
        self.iterations = collections.deque(maxlen=max(16, probe))
        self.ar_seconds = collections.deque(maxlen=16)  # seconds of the latest AR steps
        self.ar_left, self.stretch = ar_probe, stretch  # the AR steps still to take, the next stretch's length

    def speculate(self) -> bool:
        return self.ar_left == 0

    def ar_step_took(self, seconds: float) -> None:
        self.ar_seconds.append(seconds)
        self.ar_left -= 1

    def iteration_took(self, seconds: float, tokens: int) -> None:
        self.iterations.append((seconds, tokens))
        if len(self.iterations) < self.probe:
            return
        per_token = statistics.median(s for s, _ in self.iterations) / statistics.mean(t for _, t in self.iterations)
        if per_token <= (1 + self.margin) * statistics.median(self.ar_seconds):
            self.stretch = self.shortest
            return
        self.ar_left, self.stretch = self.stretch, min(2 * self.stretch, self.longest)
        self.iterations.clear()


@torch.no_grad()
def speculative_generate(model: Transformer, prompt: list[int], max_new_tokens: int, draft: Draft, *,
                         sampling: Sampling = GREEDY, eos_ids: set[int] = frozenset(), compile: bool = False,
                         compile_prefill: bool = False, on_token: Optional[Callable[[int], None]] = None,
                         on_iteration: Optional[Callable[[list[list[int]], int, int, bool], None]] = None) -> Result:
    """Speculative decoding; the output is exactly the target's (greedy: token for token; sampling: in
    distribution). on_iteration(candidates, n, target_token, copied) sees every iteration: the drafts tried at
    each depth ([[d1], [d2], ..] for a chain; for a tree, the candidates after the accepted path's node, down to
    the first depth where none was accepted, the accepted one first), how many were accepted, the target's own
    token after them (the replacement, or the bonus when all g were accepted), and whether the drafts were copied
    from the context (draft.lookup); with draft.adaptive, an AR step taken instead of an iteration shows as
    on_iteration(None, 0, its token, False)."""
    check_draft(model, draft)
    gamma, tree, device = draft.gamma, draft.tree, model.output.weight.device
    for m in (model, draft.model):
        if m is not None:
            prepare_cache(m, len(prompt) + max_new_tokens + draft.slots)
    run_prefill = step_fn(prefill, model, compile_prefill, dynamic=True)
    verify = step_fn(verify_step if tree is None else verify_tree_step, model, compile)
    ar_step, pace = (step_fn(decode_one_token, model, compile), Pace()) if draft.adaptive else (None, None)

    t0 = time.perf_counter()
    prompt_t, prompt_pos = torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device)
    cur = run_prefill(model, prompt_t, prompt_pos, sampling, causal_mask(model, 0, len(prompt)))
    drafter = DRAFTERS[draft.kind](model, draft, sampling, compile,
                                   lambda m: run_prefill(m, prompt_t, prompt_pos, GREEDY, causal_mask(m, 0, len(prompt))))
    out: list[int] = []
    done = emit(out, [cur.item()], max_new_tokens, eos_ids, on_token)
    t1 = time.perf_counter()
    pos, result = len(prompt), Result(out)
    lookup = ContextLookup(prompt + out, draft.lookup, gamma) if draft.lookup else None
    drafted = False  # whether the drafter has run: the guards stay on until it has (warm)
    with GuardsUntilWarm(compile, device) as guards:
        while not done:
            copied = lookup.propose() if lookup is not None else None
            if copied is None and pace is not None and not pace.speculate():
                start = time.perf_counter()
                cur, _ = ar_step(model, cur.clone(), torch.arange(pos, pos + 1, device=device), sampling, None,
                                 causal_mask(model, pos, 1))
                token = cur.item()  # the step's one host synchronisation
                pace.ar_step_took(time.perf_counter() - start)
                result.ar_steps += 1
                if on_iteration is not None:
                    on_iteration(None, 0, token, False)
                done = emit(out, [token], max_new_tokens, eos_ids, on_token)
                if lookup is not None:
                    lookup.extend([token])
                cur, pos = cur.clone(), pos + 1  # a copy: under CUDA graphs the next replay writes over the output
                continue
            start = time.perf_counter()
            if copied is not None:  # no draft forward. Sampling: the copies' point masses as distributions, as the
                drafts = torch.tensor(copied, device=device)  # drafter gives (None would take a second compiled verify)
                probs = None if sampling.temperature == 0 else \
                    torch.nn.functional.one_hot(drafts, model.config.vocab_size).float()
            else:  # copies of the drafts: under CUDA graphs the verify replay may reuse the memory of their outputs
                drafts, probs = (None if t is None else t.clone() for t in drafter(cur, pos))
                drafted = True
            slots = torch.arange(pos, pos + draft.slots, device=device)
            if tree is None:
                n, tokens = verify(model, cur, drafts, probs, slots, sampling, causal_mask(model, pos, gamma + 1))
                host = torch.cat([n.view(1), tokens, drafts]).tolist()  # the iteration's one host synchronisation
                candidates = [[d] for d in host[gamma + 2:]]
            else:
                n, tokens, path = verify(model, cur, drafts, slots, tree, sampling, tree_mask(model, pos, tree))
                host = torch.cat([n.view(1), tokens, path, drafts]).tolist()  # the one host synchronisation
                path = host[gamma + 2:2 * gamma + 3][:host[0] + 1]
                result.paths.append(path[1:])
                candidates = tree_candidates(tree, path, host[2 * gamma + 3:]) if on_iteration is not None else []
            n = host[0]
            result.accepted.append(n)
            result.copied.append(copied is not None)
            if pace is not None and copied is None:  # (pace judges the drafter: copies cost no draft forward)
                pace.iteration_took(time.perf_counter() - start, n + 1)
            if on_iteration is not None:
                on_iteration(candidates, n, host[n + 1], copied is not None)
            done = emit(out, host[1:n + 2], max_new_tokens, eos_ids, on_token)
            if lookup is not None:
                lookup.extend(host[1:n + 2])
            cur = tokens[n].view(1, 1).clone()
            pos += n + 1
            if drafted:  # (after an iteration: the adaptive loop's AR steps come first)
                guards.warm()
    result.time_to_first_token, result.decode_time = t1 - t0, time.perf_counter() - t1
    return result


def tree_candidates(tree: Tree, path: list[int], drafts: list[int]) -> list[list[int]]:
    """For on_iteration: at each depth down to the first without an accepted node, the tokens of the children of
    the path's node there, the accepted child first."""
    shown = []
    for d in range(1, min(len(path), tree.depth) + 1):
        children = [j for j in range(1, len(tree)) if tree.parents[j] == path[d - 1]]
        if d < len(path):  # the accepted one first
            children.remove(path[d])
            children.insert(0, path[d])
        shown.append([drafts[j - 1] for j in children])
    return shown


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


def node_rates(tree: Tree, paths: list[list[int]]) -> dict[tuple[int, ...], float]:
    """Per node (by its rank sequence): the fraction of iterations whose accepted path went through it
    (Result.paths of a tree run). Greedy, that is the probability that the node's tokens are all the target's."""
    counts = collections.Counter(j for path in paths for j in path)
    return {tree.nodes[j]: counts[j] / max(1, len(paths)) for j in range(1, len(tree))}


def expected_tree_tokens(tree: Tree, rates: dict[tuple[int, ...], float]) -> float:
    """E[tau] of a tree: 1 + the sum over its nodes of P(the node is on the accepted path), each such node being
    one accepted draft (for a chain this is the formula above). Greedy, whether a node is right does not depend
    on the rest of the tree, so the node_rates of one run of a big tree predict E[tau] of every tree inside it
    (up to where iterations start: a smaller tree accepts less, so its iterations start elsewhere)."""
    return 1 + sum(rates[n] for n in tree.nodes[1:])


def best_tree(rates: dict[tuple[int, ...], float], nodes: int) -> Tree:
    """The tree of at most `nodes` draft nodes, taken from those of `rates` (node_rates of a bigger tree's run), with
    the highest E[tau] (expected_tree_tokens): Medusa's sparse tree, fitted to the heads and prompts measured.
    Grown a node at a time: the child of the tree so far with the highest rate (a shallower one on ties), so that
    every prefix is in it. A node's rate is at most its parent's, so these are the `nodes` highest rates. Ranks
    stay below 10, so that str(tree) is a --tree value."""
    chosen: list[tuple[int, ...]] = []
    taken = {()}
    while len(chosen) < nodes:
        children = [n for n in rates if n not in taken and n[:-1] in taken and max(n) < 10]
        if not children:
            break
        node = max(children, key=lambda n: (rates[n], -len(n)))
        chosen.append(node)
        taken.add(node)
    return make_tree(chosen)


def predicted_speedup(acceptance: list[float], draft_cost: float, verify_cost: float) -> float:
    """IF(g, beta) = E[tau] / (cd(g, beta) + cv(g)): the speedup over AR that the costs and acceptance predict."""
    return expected_tokens_per_iteration(acceptance) / (draft_cost + verify_cost)
