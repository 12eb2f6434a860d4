"""s3d.py: speculative decoding is lossless (greedy: token for token; sampling: in distribution), for every draft
kind and g, adaptive decoding and context lookup included, with exact EOS and max_new_tokens handling, no recompilation and one host
sync per iteration."""
import dataclasses
import itertools
import math
import re
import sys

import pytest
import torch

import cpu_kernels
import model as model_py
import s3d
from checkpoint import UsageError
from heads import new_heads
from model import ModelArgs, Transformer


def tiny_model(vocab=96, n_layer=6, dim=64, seed=0, scale=1.0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(block_size=256, vocab_size=vocab, n_layer=n_layer, n_head=4, n_local_heads=2, dim=dim,
                                  intermediate_size=96, name=f"tiny-{seed}"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1).add_(1 if p.dim() == 1 else 0)
    return model.eval()


def with_trained_looking_heads(model, skip=(2, 4), gamma=4, rank=4, seed=1, sequential_rank=0, bidirectional=False):
    """Heads with non-zero adapters (as after training), so the adapter path is exercised too."""
    heads = new_heads(model, skip, gamma, rank, sequential_rank=sequential_rank, bidirectional=bidirectional)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.05)
    model.set_heads(heads)
    return model


PROMPTS = [[3, 14, 15, 92, 65], [1, 2, 3], list(range(10, 40)), [7] * 12]


@pytest.mark.parametrize("draft,gamma", [("s3d", 1), ("s3d", 2), ("s3d", 4), ("skip", 1), ("skip", 3),
                                         ("model", 1), ("model", 4)])
def test_greedy_is_token_for_token_ar(draft, gamma):
    model = with_trained_looking_heads(tiny_model(), gamma=4)
    draft_model = tiny_model(n_layer=2, seed=5) if draft == "model" else None
    with torch.no_grad():
        for prompt in PROMPTS:
            ar = s3d.ar_generate(model, prompt, 40).tokens
            spec = s3d.speculative_generate(model, prompt, 40, s3d.Draft(draft, gamma, (1, 5), draft_model))
            assert spec.tokens == ar
            assert len(ar) == 40 and sum(n + 1 for n in spec.accepted) >= 39


def test_greedy_accepts_everything_when_the_draft_is_the_target():
    """The model draft with the target itself as draft model must accept all g drafts every iteration."""
    model = tiny_model()
    draft_model = tiny_model()
    with torch.no_grad():
        spec = s3d.speculative_generate(model, PROMPTS[0], 41, s3d.Draft("model", 4, model=draft_model))
    assert spec.accepted[:-1] == [4] * (len(spec.accepted) - 1) and len(spec.accepted) == 8


@pytest.mark.parametrize("draft", ["s3d", "skip"])
def test_max_new_tokens_truncates_exactly(draft):
    model = with_trained_looking_heads(tiny_model())
    with torch.no_grad():
        ar = s3d.ar_generate(model, PROMPTS[2], 30).tokens
        for k in range(1, 13):
            assert s3d.speculative_generate(model, PROMPTS[2], k, s3d.Draft(draft, 4, (2, 4))).tokens == ar[:k]


def test_eos_inside_an_accepted_block_ends_generation_there():
    model = tiny_model()
    draft_model = tiny_model()  # accepts every draft, so EOS falls inside accepted blocks
    with torch.no_grad():
        ar = s3d.ar_generate(model, PROMPTS[2], 30).tokens
        for eos in set(ar[1:12]):
            expected = ar[:ar.index(eos) + 1]
            spec = s3d.speculative_generate(model, PROMPTS[2], 30, s3d.Draft("model", 4, model=draft_model),
                                            eos_ids={eos})
            assert spec.tokens == expected
            assert s3d.ar_generate(model, PROMPTS[2], 30, eos_ids={eos}).tokens == expected


# ---------------------------------------------------------------------------------------------------------------
# Sampling: the distribution of the first 3 tokens under speculative sampling equals AR sampling's, computed exactly.


@pytest.mark.parametrize("draft", [None, "s3d", "skip"])
def test_generation_records_no_autograd_graph(draft):
    """Called with gradients on and trainable weights (as generate.py does), decoding must not build a graph: the
    KV cache would chain every step's graph together and keep each step's activations (with int8 weights, each
    step's dequantized weights: 200 MB a token on the default) alive until the cache is freed."""
    model = with_trained_looking_heads(tiny_model())
    model.requires_grad_(True)
    assert torch.is_grad_enabled()
    if draft is None:
        s3d.ar_generate(model, PROMPTS[0], 12)
    else:
        s3d.speculative_generate(model, PROMPTS[0], 12, s3d.Draft(draft, 3, (1, 5)))
    cache = model.layers[0].attention.kv_cache
    assert not cache.k_cache.requires_grad and cache.k_cache.grad_fn is None and cache.v_cache.grad_fn is None


def exact_first_tokens_distribution(model, prompt, n_tokens, temperature, top_k):
    """P(x1..xn) for AR sampling, by enumerating every prefix (the vocabulary is tiny)."""
    vocab = model.config.vocab_size
    dist = {}
    with torch.no_grad():
        model.setup_caches(1, 64)
        for seq in itertools.product(range(vocab), repeat=n_tokens - 1):
            tokens = torch.tensor([prompt + list(seq)])
            probs = s3d.logits_to_probs(model(tokens, torch.arange(tokens.shape[1]))[0], s3d.Sampling(temperature, top_k))
            p_prefix = math.prod(probs[len(prompt) - 1 + i, t].item() for i, t in enumerate(seq))
            for last in range(vocab):
                dist[seq + (last,)] = p_prefix * probs[-1, last].item()
    return dist


def chi_square_p_value(counts: dict, expected_probs: dict, n: int) -> float:
    """Pearson's chi-square goodness of fit; cells expected below 5 are pooled into one."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for key, p in expected_probs.items():
        e, o = p * n, counts.get(key, 0)
        if e < 5:
            pooled_obs, pooled_exp = pooled_obs + o, pooled_exp + e
            continue
        stat += (o - e) ** 2 / e
        cells += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    df = cells - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)).item()


def speculative_samples(model, prompt, n_samples, temperature, top_k, gamma=3):
    counts = {}
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(n_samples):
            r = s3d.speculative_generate(model, prompt, 3, s3d.Draft("s3d", gamma),
                                         sampling=s3d.Sampling(temperature, top_k))
            counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
    return counts


SAMPLING_CASES = [(1.0, None), (0.7, 3)]
N_SAMPLES = 3000


def sampling_model():
    # vocab 5, logits scaled up so the distributions are far from uniform, heads random so drafts often miss
    return with_trained_looking_heads(tiny_model(vocab=5, n_layer=4, dim=32, scale=3.0), skip=(1, 3), gamma=3, rank=2)


@pytest.mark.parametrize("temperature,top_k", SAMPLING_CASES)
def test_sampling_matches_the_ar_distribution(temperature, top_k):
    model = sampling_model()
    prompt = [1, 3, 0, 2]
    exact = exact_first_tokens_distribution(model, prompt, 3, temperature, top_k)
    counts = speculative_samples(model, prompt, N_SAMPLES, temperature, top_k)
    p = chi_square_p_value(counts, exact, N_SAMPLES)
    tv = 0.5 * sum(abs(counts.get(k, 0) / N_SAMPLES - v) for k, v in exact.items())
    assert p > 1e-3, f"speculative sampling differs from AR sampling: chi-square p={p:.2e}, TV={tv:.3f}"
    assert tv < 0.08


def test_the_sampling_test_catches_a_broken_acceptance_rule(monkeypatch):
    """Always accepting the drafts makes the output follow the draft's distribution: the test above must see it."""
    def always_accept(drafts, draft_probs, target_probs):
        g = drafts.shape[0]
        bonus = s3d.sample_from(target_probs[-1:])
        return torch.tensor(g), torch.cat([drafts, bonus])

    monkeypatch.setattr(s3d, "accept_sampling", always_accept)
    model = sampling_model()
    prompt = [1, 3, 0, 2]
    exact = exact_first_tokens_distribution(model, prompt, 3, 1.0, None)
    counts = speculative_samples(model, prompt, N_SAMPLES, 1.0, None)
    assert chi_square_p_value(counts, exact, N_SAMPLES) < 1e-6


def test_acceptance_rule_on_known_distributions():
    """Point-mass checks of accept_sampling: a draft the target gives probability 0 is always rejected and replaced
    by a token the draft did not propose; a draft equal to the target is always accepted."""
    q = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    for _ in range(50):
        n, tokens = s3d.accept_sampling(torch.tensor([0, 1]), None, q)
        assert n.item() == 0 and tokens[0].item() == 1
        n, tokens = s3d.accept_sampling(torch.tensor([1, 0]), q[:2].clone(), q)
        assert n.item() == 2 and tokens[:2].tolist() == [1, 0]


def with_draft_vocab(model, vocab):
    """The same heads, drafting only the tokens of vocab."""
    heads = model.heads
    with_vocab = new_heads(model, heads.skip, heads.gamma, heads.rank, vocab)
    with_vocab.load_state_dict({**heads.state_dict(), "draft_vocab": vocab})
    model.set_heads(with_vocab)
    return model


def test_draft_vocabulary_is_lossless_and_drafts_only_its_tokens():
    model = with_trained_looking_heads(tiny_model())

    def run(prompt):
        drafts = []
        r = s3d.speculative_generate(model, prompt, 30, s3d.Draft("s3d", 4),
                                     on_iteration=lambda d, n, t, c: drafts.extend(c[0] for c in d))
        return r.tokens, drafts

    with torch.no_grad():
        full = [run(p) for p in PROMPTS]
        # the whole vocabulary in another order: the same drafts, once indices are mapped back to tokens
        order = torch.randperm(96, generator=torch.Generator().manual_seed(0))
        with_draft_vocab(model, order)
        assert [run(p) for p in PROMPTS] == full
        # 30 of the 96 tokens: still exactly AR's output, and nothing else is ever drafted
        with_draft_vocab(model, order[:30])
        for prompt in PROMPTS:
            tokens, drafts = run(prompt)
            assert tokens == s3d.ar_generate(model, prompt, 30).tokens
            assert set(drafts) <= set(order[:30].tolist())


def test_sampling_with_a_draft_vocabulary_matches_the_ar_distribution():
    """Drafts from 3 of the 5 tokens: the draft's p is 0 on the others, and the rule still gives AR's distribution."""
    model = with_draft_vocab(sampling_model(), torch.tensor([4, 0, 2]))
    prompt = [1, 3, 0, 2]
    exact = exact_first_tokens_distribution(model, prompt, 3, 1.0, None)
    counts = speculative_samples(model, prompt, N_SAMPLES, 1.0, None)
    assert chi_square_p_value(counts, exact, N_SAMPLES) > 1e-3


@pytest.mark.parametrize("sequential_rank,bidirectional", [(3, False), (0, True), (3, True)])
def test_sequential_head_and_bidirectional_block_are_lossless(sequential_rank, bidirectional):
    """Greedy equals AR token for token, eager and compiled (without recompiling: the bidirectional mask keeps
    the dynamic width of the causal one); and the options do change the drafts."""
    import torch._dynamo

    plain = with_trained_looking_heads(tiny_model())
    model = with_trained_looking_heads(tiny_model(), sequential_rank=sequential_rank, bidirectional=bidirectional)
    with torch.no_grad():
        if sequential_rank:
            model.heads.sequential_in.normal_(0, 1.0)
            model.heads.sequential_out.normal_(0, 1.0)
        drafted = {}
        for m, name in ((plain, "plain"), (model, "option")):
            drafted[name] = []
            for prompt in PROMPTS:
                r = s3d.speculative_generate(m, prompt, 30, s3d.Draft("s3d", 4),
                                             on_iteration=lambda d, n, t, c: drafted[name].extend(c[0] for c in d))
                assert r.tokens == s3d.ar_generate(m, prompt, 30).tokens
        assert drafted["plain"] != drafted["option"]
        warm = s3d.speculative_generate(model, PROMPTS[0], 20, s3d.Draft("s3d", 4), compile=True)
        assert warm.tokens == s3d.ar_generate(model, PROMPTS[0], 20).tokens
        torch._dynamo.config.error_on_recompile = True
        try:
            for prompt in PROMPTS[1:]:
                spec = s3d.speculative_generate(model, prompt, 25, s3d.Draft("s3d", 4), compile=True)
                assert spec.tokens == s3d.ar_generate(model, prompt, 25).tokens
        finally:
            torch._dynamo.config.error_on_recompile = False


def test_compiled_loops_skip_guards_once_warm_and_restore_them():
    """Each compiled decoding loop checks its steps' guards until each step has run once, skips them after (the
    mask's width still changing every step), and leaves the stance as it was, on an error too."""
    import torch._dynamo.eval_frame as eval_frame

    skipping = lambda: eval_frame._stance.skip_guard_eval_unsafe  # noqa: E731
    model = with_trained_looking_heads(tiny_model())
    for prompt in PROMPTS[:2]:
        seen = {"ar": [], "s3d": []}
        with torch.no_grad():
            ar = s3d.ar_generate(model, prompt, 12, compile=True, on_token=lambda t: seen["ar"].append(skipping()))
            spec = s3d.speculative_generate(model, prompt, 30, s3d.Draft("s3d", 4), compile=True,
                                            on_iteration=lambda d, n, t, c: seen["s3d"].append(skipping()))
            adaptive = s3d.speculative_generate(model, prompt, 30, s3d.Draft("s3d", 4, adaptive=True), compile=True)
        assert ar.tokens == s3d.ar_generate(model, prompt, 12).tokens
        assert spec.tokens == adaptive.tokens == s3d.ar_generate(model, prompt, 30).tokens
        # the prefill's token and the first step's: guards checked; every later step's: skipped
        assert seen["ar"] == [False, False] + [True] * 10
        assert seen["s3d"][0] is False and all(seen["s3d"][1:]) and len(seen["s3d"]) > 3
        assert not skipping()

    def stop(token):
        if skipping():
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        s3d.speculative_generate(model, PROMPTS[0], 30, s3d.Draft("s3d", 4), compile=True, on_token=stop)
    assert not skipping()


def test_a_step_that_would_recompile_with_guards_skipped_raises(monkeypatch):
    """What makes skipping guards safe: a call that needs a new compile raises rather than run a stale step. Here
    the mask's length is left static, so the second step (the first unguarded) would need a recompile."""
    def static_mask(model, pos, n):
        return model.causal_mask[None, None, pos:pos + n, :pos + n]

    monkeypatch.setattr(s3d, "causal_mask", static_mask)
    model = tiny_model()
    with pytest.raises(RuntimeError, match="skip_guard_eval_unsafe"), torch.no_grad():
        s3d.ar_generate(model, PROMPTS[0], 6, compile=True)


def test_batched_decoding_skips_guards_once_warm(monkeypatch):
    """generate_batch (self-distillation) too: the stance set once, after its first compiled step, and restored;
    the answers those of eager decoding."""
    import torch._dynamo.eval_frame as eval_frame

    stances, set_stance = [], torch.compiler.set_stance
    monkeypatch.setattr(torch.compiler, "set_stance", lambda *a, **k: stances.append(k) or set_stance(*a, **k))
    model = tiny_model()
    model.setup_caches(3, 64)
    with torch.no_grad():
        eager = s3d.generate_batch(model, PROMPTS[:3], 12)
        assert stances == []
        assert s3d.generate_batch(model, PROMPTS[:3], 12, compile=True) == eager
    assert stances == [{"skip_guard_eval_unsafe": True}] and not eval_frame._stance.skip_guard_eval_unsafe


def test_sampling_with_a_sequential_head_matches_the_ar_distribution():
    """Each draft sampled from the logits biased by the draft before it: its p is that biased distribution, and
    the rule still gives AR's distribution."""
    model = with_trained_looking_heads(tiny_model(vocab=5, n_layer=4, dim=32, scale=3.0), skip=(1, 3), gamma=3,
                                       rank=2, sequential_rank=2, bidirectional=True)
    with torch.no_grad():  # a strong bias, so that a p that left it out would show
        model.heads.sequential_in.normal_(0, 1.0)
        model.heads.sequential_out.normal_(0, 2.0)
    prompt = [1, 3, 0, 2]
    exact = exact_first_tokens_distribution(model, prompt, 3, 1.0, None)
    counts = speculative_samples(model, prompt, N_SAMPLES, 1.0, None)
    assert chi_square_p_value(counts, exact, N_SAMPLES) > 1e-3


def test_untrained_heads_work_with_low_acceptance():
    model = tiny_model()
    model.set_heads(new_heads(model, (2, 4), 4, 8))
    with torch.no_grad():
        r = s3d.speculative_generate(model, PROMPTS[0], 40, s3d.Draft("s3d", 4))
    assert r.tokens == s3d.ar_generate(model, PROMPTS[0], 40).tokens
    assert s3d.mean_tokens_per_iteration(r.accepted) < 2.5


def test_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="needs draft heads"):
        s3d.speculative_generate(model, [1, 2], 4, s3d.Draft("s3d", 4))
    model.set_heads(new_heads(model, (2, 4), 3, 2))
    with pytest.raises(ValueError, match="gamma 4 exceeds"):
        s3d.speculative_generate(model, [1, 2], 4, s3d.Draft("s3d", 4))
    with pytest.raises(ValueError, match="vocabulary"):
        s3d.speculative_generate(model, [1, 2], 4, s3d.Draft("model", 3, model=tiny_model(vocab=50)))


# ---------------------------------------------------------------------------------------------------------------
# Adaptive decoding: AR steps wherever they have been making tokens faster.


def test_pace_times_ar_first_then_falls_back_for_longer_stretches_while_speculating_loses():
    pace = s3d.Pace(ar_probe=3, probe=8, stretch=16, longest=128, margin=0.15)
    for _ in range(3):  # the first steps time an AR step
        assert not pace.speculate()
        pace.ar_step_took(1.0)
    assert pace.speculate()
    for _ in range(8):  # 3 tokens per 2 s against 1 token per s: speculating wins
        pace.iteration_took(2.0, 3)
        assert pace.speculate()
    for _ in range(16):  # 1 token per 1.1 s: slower, but within the margin
        pace.iteration_took(1.1, 1)
        assert pace.speculate()
    for stretch in (16, 32, 64, 128, 128):  # 1 token per 2 s: it loses, and each time it tries again it loses again
        iterations = 0
        while pace.speculate():
            pace.iteration_took(2.0, 1)
            iterations += 1
        assert iterations >= 8  # judged on at least 8 iterations since the switch
        steps = 0
        while not pace.speculate():
            pace.ar_step_took(1.0)
            steps += 1
        assert steps == stretch
    for _ in range(8):  # once it wins again, the next stretch is the shortest
        pace.iteration_took(2.0, 3)
        assert pace.speculate()
    while pace.speculate():
        pace.iteration_took(2.0, 1)
    assert pace.ar_left == 16


class ScriptedPace:
    """AR steps (A) and iterations (S) in a fixed pattern, whatever the timings."""

    def __init__(self, pattern: str):
        self.pattern, self.steps = pattern, 0

    def speculate(self) -> bool:
        return self.pattern[self.steps % len(self.pattern)] == "S"

    def ar_step_took(self, seconds: float) -> None:
        self.steps += 1

    def iteration_took(self, seconds: float, tokens: int) -> None:
        self.steps += 1


@pytest.mark.parametrize("draft", ["s3d", "skip"])
@pytest.mark.parametrize("pattern", ["AS", "SAAS", None], ids=["AS", "SAAS", "timed"])
def test_adaptive_greedy_is_token_for_token_ar(monkeypatch, draft, pattern):
    if pattern is not None:
        monkeypatch.setattr(s3d, "Pace", lambda: ScriptedPace(pattern))
    model = with_trained_looking_heads(tiny_model())
    with torch.no_grad():
        for prompt in PROMPTS:
            spec = s3d.speculative_generate(model, prompt, 40, s3d.Draft(draft, 4, (2, 4), adaptive=True))
            assert spec.tokens == s3d.ar_generate(model, prompt, 40).tokens
            assert sum(n + 1 for n in spec.accepted) + spec.ar_steps >= 39
            if pattern is not None:
                assert spec.ar_steps > 0 and spec.accepted


def test_adaptive_refuses_the_model_draft():
    model = tiny_model()
    with pytest.raises(UsageError, match="adaptive decoding goes with"):
        s3d.speculative_generate(model, [1, 2], 4, s3d.Draft("model", 3, model=tiny_model(n_layer=2), adaptive=True))


@pytest.mark.parametrize("temperature,top_k", SAMPLING_CASES)
def test_adaptive_sampling_matches_the_ar_distribution(monkeypatch, temperature, top_k):
    """The first token after prefill from an AR step, the next from an iteration (and the reverse)."""
    model = sampling_model()
    prompt = [1, 3, 0, 2]
    exact = exact_first_tokens_distribution(model, prompt, 3, temperature, top_k)
    for pattern in ("AS", "SA"):
        monkeypatch.setattr(s3d, "Pace", lambda: ScriptedPace(pattern))
        counts = {}
        torch.manual_seed(0)
        with torch.no_grad():
            for _ in range(N_SAMPLES):
                r = s3d.speculative_generate(model, prompt, 3, s3d.Draft("s3d", 3, adaptive=True),
                                             sampling=s3d.Sampling(temperature, top_k))
                counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
        p = chi_square_p_value(counts, exact, N_SAMPLES)
        assert p > 1e-3, f"adaptive sampling ({pattern}) differs from AR sampling: chi-square p={p:.2e}"


# ---------------------------------------------------------------------------------------------------------------
# Context lookup: drafts copied from the context, where its last tokens occurred before.


def test_context_lookup_copies_what_followed_the_latest_occurrence_of_the_longest_match():
    lookup = s3d.ContextLookup([1, 2, 3, 4, 5, 6, 9, 3, 4, 7, 8, 2, 3, 4], 4, 3)
    # (2, 3, 4) occurred once before, at the start: its 3-gram beats the later (3, 4)'s 2-gram
    assert lookup.propose() == [5, 6, 9]
    lookup.extend([7])  # (3, 4, 7) occurred before: 8 followed it, then 2, 3 (the tokens just accepted)
    assert lookup.propose() == [8, 2, 3]
    lookup.extend([1])  # (7, 1), (1,): no match of 2 tokens, and 1 token is not enough
    assert lookup.propose() is None
    lookup.extend([2])  # (1, 2) at the start; the latest (2, 3, 4)'s copy runs on from there
    assert lookup.propose() == [3, 4, 5]


def test_context_lookup_takes_the_latest_occurrence_and_a_copy_that_reaches_the_end_repeats():
    assert s3d.ContextLookup([5, 1, 8, 5, 1, 9, 5, 1], 4, 2).propose() == [9, 5]  # (5, 1): after 9, not 8
    # (4, 5) last occurred just before the end: the copy goes on as the pattern would, 4 5 4 5 ..
    assert s3d.ContextLookup([9, 4, 5, 4, 5], 2, 5).propose() == [4, 5, 4, 5, 4]
    assert s3d.ContextLookup([3, 3], 4, 3).propose() is None  # (3, 3) ends at the last token: itself only


REPEATING = [[7] * 12, [3, 14, 15, 92, 65, 3, 14, 15, 40, 41, 3, 14]]


@pytest.mark.parametrize("draft", ["s3d", "skip"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["chain", "adaptive"])
def test_lookup_greedy_is_token_for_token_ar(monkeypatch, draft, adaptive):
    monkeypatch.setattr(s3d, "Pace", lambda: ScriptedPace("ASS"))
    model = with_trained_looking_heads(tiny_model())
    copied = []
    with torch.no_grad():
        for prompt in PROMPTS + REPEATING:
            spec = s3d.speculative_generate(model, prompt, 40, s3d.Draft(draft, 4, (2, 4), adaptive=adaptive, lookup=3))
            assert spec.tokens == s3d.ar_generate(model, prompt, 40).tokens
            assert len(spec.copied) == len(spec.accepted) and sum(n + 1 for n in spec.accepted) + spec.ar_steps >= 39
            copied += spec.copied
    assert any(copied) and not all(copied)  # both kinds of iteration ran


def test_adaptive_lookup_verifies_every_copy_and_paces_the_drafter_alone(monkeypatch):
    """Copied drafts cost no draft forward, so they are verified even while Pace takes AR steps, and Pace times the
    drafter's iterations only (here it never lets the drafter run)."""
    paces = []
    monkeypatch.setattr(s3d, "Pace", lambda: paces.append(ScriptedPace("A")) or paces[-1])
    model = with_trained_looking_heads(tiny_model())
    with torch.no_grad():
        for prompt in REPEATING:
            spec = s3d.speculative_generate(model, prompt, 40, s3d.Draft("s3d", 4, (2, 4), adaptive=True, lookup=3))
            assert spec.tokens == s3d.ar_generate(model, prompt, 40).tokens
            assert spec.ar_steps > 0 and spec.copied and all(spec.copied)
            assert paces[-1].steps == spec.ar_steps  # no iteration was timed


def test_lookup_sampling_matches_the_ar_distribution():
    """The prompt ends in 3 and has 3 followed by each token of the vocabulary, so whatever token prefill samples,
    the first iteration copies its drafts (point masses); the rest may copy or draft."""
    model = sampling_model()
    prompt = [1, 3, 0, 2, 3, 1, 4, 3, 2, 0, 3, 4, 1, 3, 3, 2, 1, 3]
    exact = exact_first_tokens_distribution(model, prompt, 3, 0.7, 3)
    counts, copied = {}, 0
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(N_SAMPLES):
            r = s3d.speculative_generate(model, prompt, 3, s3d.Draft("s3d", 2, lookup=2), sampling=s3d.Sampling(0.7, 3))
            counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
            copied += r.copied[0]
    assert copied == N_SAMPLES
    assert chi_square_p_value(counts, exact, N_SAMPLES) > 1e-3


@pytest.mark.parametrize("draft,lookup,pattern", [
    ("model", 4, "context lookup goes with a chain of S3D or layer-skip drafts"),
    ("tree", 4, "context lookup goes with a chain"),
    ("s3d", 1, "context lookup matches 2 tokens or more"),
])
def test_lookup_refuses_what_it_cannot_serve(draft, lookup, pattern):
    model = with_trained_looking_heads(tiny_model())
    kind, tree = ("s3d", s3d.top_k_tree((2, 1))) if draft == "tree" else (draft, None)
    small = tiny_model(n_layer=2) if draft == "model" else None
    with pytest.raises(UsageError, match=pattern):
        s3d.speculative_generate(model, [1, 2], 4, s3d.Draft(kind, 2, model=small, tree=tree, lookup=lookup))


# ---------------------------------------------------------------------------------------------------------------
# Compiled loop: no recompilation after warm-up, one host synchronisation per iteration.


@pytest.mark.parametrize("draft,adaptive", [pytest.param("s3d", False, marks=pytest.mark.autotune), ("skip", False),
                                            ("s3d", True)])
def test_compiled_loop_is_lossless_and_never_recompiles(monkeypatch, draft, adaptive):
    import torch._dynamo

    monkeypatch.setattr(s3d, "Pace", lambda: ScriptedPace("ASS"))  # adaptive: AR steps and iterations both
    model = with_trained_looking_heads(tiny_model())
    if draft == "s3d":  # compiled on a CPU: adapters folded into the frozen weights, and a draft vocabulary
        with_draft_vocab(model, torch.randperm(96, generator=torch.Generator().manual_seed(1))[:48])
    with torch.no_grad():
        warm = s3d.speculative_generate(model, PROMPTS[0], 20, s3d.Draft(draft, 4, (2, 4), adaptive=adaptive),
                                        compile=True)
        assert warm.tokens == s3d.ar_generate(model, PROMPTS[0], 20).tokens
        torch._dynamo.config.error_on_recompile = True
        try:
            for prompt in PROMPTS[1:]:
                spec = s3d.speculative_generate(model, prompt, 25, s3d.Draft(draft, 4, (2, 4), adaptive=adaptive),
                                                compile=True)
                assert spec.tokens == s3d.ar_generate(model, prompt, 25).tokens
                assert (spec.ar_steps > 0) == adaptive
        finally:
            torch._dynamo.config.error_on_recompile = False


def test_compiled_lookup_is_lossless_and_never_recompiles():
    """The prompt has 5 followed by every token and ends in 5, so the first iteration copies its drafts whatever
    token prefill makes: verify then runs before the drafter ever has, and the loop must keep checking guards until
    the drafter has run too (its first call compiles it)."""
    import torch._dynamo

    s3d.release_compiled()  # (the steps compiled by earlier tests count towards dynamo's limit of 8 versions)
    model = with_trained_looking_heads(tiny_model())
    prompt = [t for v in range(96) for t in (5, v)] + [5]
    with torch.no_grad():
        warm = s3d.speculative_generate(model, prompt, 25, s3d.Draft("s3d", 4, lookup=3), compile=True)
        assert warm.tokens == s3d.ar_generate(model, prompt, 25).tokens
        assert warm.copied[0] and not all(warm.copied)
        torch._dynamo.config.error_on_recompile = True
        try:
            for prompt in PROMPTS + REPEATING:
                spec = s3d.speculative_generate(model, prompt, 25, s3d.Draft("s3d", 4, lookup=3), compile=True)
                assert spec.tokens == s3d.ar_generate(model, prompt, 25).tokens
        finally:
            torch._dynamo.config.error_on_recompile = False
            s3d.release_compiled()  # (and so do this test's, for the tests after it)


@pytest.mark.parametrize("tree", [None, s3d.top_k_tree((3, 2, 1))], ids=["chain", "tree"])
def test_int8_draft_is_lossless_compiled_and_runs_on_int8_weights(tree, monkeypatch):
    """The draft reading int8 copies of its layers (Draft.int8): greedy output still AR's, eager and compiled, no
    recompilation after warm-up; with bfloat16 activations every one of the draft's linear maps reads its int8 copy
    (what makes the draft cheaper), and int8_draft picks it there by default."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    model = with_trained_looking_heads(tiny_model())
    draft = s3d.Draft("s3d", 3, (2, 4), tree=tree, int8=True)
    with torch.no_grad():
        try:
            for compile in (False, True):
                for prompt in PROMPTS[:2]:
                    spec = s3d.speculative_generate(model, prompt, 25, draft, compile=compile)
                    assert spec.tokens == s3d.ar_generate(model, prompt, 25).tokens
                    assert model.heads.int8
                    torch._dynamo.config.error_on_recompile = compile  # after the first compiled prompt
        finally:
            torch._dynamo.config.error_on_recompile = False
    by_default = dataclasses.replace(draft, int8=None)
    assert not s3d.int8_draft(model, by_default, True)  # float32: not by default
    model = with_trained_looking_heads(tiny_model()).to(torch.bfloat16)
    cpu_kernels.load()  # (sets model.DOT_INT8 on a CPU with AVX512_VNNI; set by hand below, both ways, on any CPU)
    monkeypatch.setattr(model_py, "DOT_INT8", True)
    assert s3d.int8_draft(model, by_default, True)  # bfloat16, compiled, with the VNNI kernel: by default
    assert not s3d.int8_draft(model, by_default, False)
    monkeypatch.setattr(model_py, "DOT_INT8", False)
    assert not s3d.int8_draft(model, by_default, True)  # without it (an AVX2 CPU), the draft reads the bf16 weights
    # (Inductor's reduction: cpu_kernels' gemv_int8, which AVX512_VNNI CPUs call instead, reads the copies in a
    # layout of its own and is tested in tests/test_cpu_kernels.py)
    with torch.no_grad():
        _, code = run_and_get_code(s3d.speculative_generate, model, PROMPTS[0], 8, draft, compile=True)
    # the draft's 3 rows go through model.gemv, which reads the int8 copies themselves: one frozen int8 weight per map
    # (gate and up as one: model.FeedForward)
    kept_maps = 5 * (model.config.n_layer - 2)
    frozen_int8 = set(re.findall(r"\(const int8_t\*\)\(_frozen_param\d+", " ".join(code)))
    assert len(frozen_int8) == kept_maps - (model.config.n_layer - 2)
    if tree is None:  # more rows than gemv takes: every map is Inductor's weight-only int8 GEMM
        counters.clear()
        model.set_heads(new_heads(model, (2, 4), 6, 4))
        with torch.no_grad():
            for p in model.heads.parameters():
                p.normal_(0, 0.05)
            s3d.speculative_generate(model, PROMPTS[0], 8, s3d.Draft("s3d", 6, (2, 4), int8=True), compile=True)
        assert counters["inductor"]["woq_matcher_count"] == kept_maps


def test_int8_draft_needs_adapters():
    model = tiny_model()
    model.set_heads(new_heads(model, (2, 4), 3, 0))
    with pytest.raises(UsageError, match="rank > 0"):
        s3d.speculative_generate(model, [1, 2], 4, s3d.Draft("s3d", 3, int8=True))
    with pytest.raises(UsageError, match="rank > 0"):
        s3d.speculative_generate(model, [1, 2], 4, s3d.Draft("skip", 3, (2, 4), int8=True))


@pytest.mark.parametrize("tree,adaptive,lookup", [(None, False, 0), (s3d.top_k_tree((3, 2, 1, 1)), False, 0),
                                                 (None, True, 0), (None, False, 3)],
                         ids=["chain", "tree", "adaptive", "lookup"])
def test_one_host_sync_per_iteration(monkeypatch, tree, adaptive, lookup):
    monkeypatch.setattr(s3d, "Pace", lambda: ScriptedPace("AS"))
    calls = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _original=original, **k):
            calls["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    model = with_trained_looking_heads(tiny_model())
    with torch.no_grad():
        r = s3d.speculative_generate(model, REPEATING[1] if lookup else PROMPTS[0], 30,
                                     s3d.Draft("s3d", 4, tree=tree, adaptive=adaptive, lookup=lookup))
    assert calls["n"] == len(r.accepted) + r.ar_steps + 1  # + the first token, sampled by prefill
    assert (r.ar_steps > 0) == adaptive and any(r.copied) == bool(lookup)


def test_batched_generation_equals_one_by_one_greedy():
    """Left-padded rows of different lengths decode as each would alone; sampled rows run to the same length."""
    model = tiny_model()
    prompts = [[3, 4, 5, 6, 7], [10, 11], [50, 7, 9]]
    model.setup_caches(len(prompts), 64)
    rows = s3d.generate_batch(model, prompts, 12)
    for prompt, row in zip(prompts, rows):
        model.setup_caches(1, 64)
        assert row == s3d.ar_generate(model, prompt, 12).tokens
    model.setup_caches(2 * len(prompts), 64)
    sampled = s3d.generate_batch(model, prompts * 2, 12, s3d.Sampling(0.8))
    assert len(sampled) == 6 and all(len(r) == 12 for r in sampled) and sampled != rows * 2


def test_speed_model_matches_a_hand_computation():
    acceptance, draft_cost, verify_cost = [0.8, 0.5, 0.5, 0.2], 0.6, 1.1
    tau = 1 + 0.8 + 0.8 * 0.5 + 0.8 * 0.5 * 0.5 + 0.8 * 0.5 * 0.5 * 0.2  # = 2.44
    assert s3d.expected_tokens_per_iteration(acceptance) == pytest.approx(2.44)
    assert s3d.predicted_speedup(acceptance, draft_cost, verify_cost) == pytest.approx(tau / 1.7)
    assert s3d.acceptance_rates([0, 4, 2, 1], 4) == pytest.approx([0.75, 2 / 3, 0.5, 1.0])
    assert s3d.mean_tokens_per_iteration([0, 4, 2, 1]) == pytest.approx(2.75)


def test_release_compiled_frees_the_generated_code_and_its_frozen_weights():
    """Each method's peak memory must be its own: the compiled steps of the method before, whose generated modules
    hold frozen copies of the weights, are gone after release_compiled."""
    import gc
    import weakref

    linear = torch.nn.Linear(64, 64)
    with torch.no_grad():
        s3d.compiled(linear, "cpu")(torch.randn(1, 64))
    generated = [weakref.ref(m) for name, m in sys.modules.items()
                 if name.startswith("torch._inductor.runtime.compile_tasks.")]
    assert generated, "Inductor registers its generated modules under this name: the release would miss them"
    s3d.release_compiled()
    gc.collect()
    assert all(ref() is None for ref in generated)


# ---------------------------------------------------------------------------------------------------------------
# Tree verification: several candidates per position in one verify forward, still lossless.


def test_top_k_trees_have_the_shape_they_say():
    tree = s3d.top_k_tree((3, 2, 1, 1))
    assert len(tree) == 1 + 3 + 6 + 6 + 6 and tree.depth == 4 and str(tree) == "3,2,1,1"
    assert tree.nodes[:5] == ((), (0,), (1,), (2,), (0, 0)) and tree.parents[:5] == (0, 0, 0, 0, 1)
    for j, (node, path) in enumerate(zip(tree.nodes, tree.paths)):
        assert tree.depths[j] == len(node) and len(path) == tree.depth + 1
        assert [tree.nodes[k] for k in path[:len(node) + 1]] == [node[:d] for d in range(len(node) + 1)]
        assert set(path[len(node):]) == {j}  # padded with the node itself
    assert s3d.top_k_tree((1, 1, 1)).nodes == ((), (0,), (0, 0), (0, 0, 0))  # the chain
    with pytest.raises(ValueError, match="at most 256"):
        s3d.top_k_tree((7, 7, 7))
    with pytest.raises(ValueError, match="every prefix"):
        s3d.make_tree([(0, 1)])


def wide_tree_model(**options):
    """Vocabulary 12 and a tree 12 wide at depth 1: some candidate at depth 1 is always the target's token, so every
    iteration accepts through a node that is not in the slot of its position, and its KV must be moved."""
    return with_trained_looking_heads(tiny_model(vocab=12), gamma=3, **options)


@pytest.mark.parametrize("shape", ["1,1,1", "2,1,1", "3,2,2", "12,4,2", "0,2,5,00,20,21,000,001,200"])
@pytest.mark.parametrize("sequential_rank,bidirectional", [(0, False), (3, True)])
def test_tree_greedy_is_token_for_token_ar(shape, sequential_rank, bidirectional):
    """Top-k trees, and a sparse one (best_tree's kind: ranks 0, 2 and 5 at depth 1, children under some nodes
    only): greedy output is AR's."""
    model = wide_tree_model(sequential_rank=sequential_rank, bidirectional=bidirectional)
    tree = s3d.parse_tree(shape)
    with torch.no_grad():
        if sequential_rank:
            model.heads.sequential_in.normal_(0, 1.0)
        for prompt in PROMPTS:
            prompt = [t % 12 for t in prompt]
            ar = s3d.ar_generate(model, prompt, 40).tokens
            spec = s3d.speculative_generate(model, prompt, 40, s3d.Draft("s3d", 3, tree=tree))
            assert spec.tokens == ar
            assert len(spec.paths) == len(spec.accepted) and [len(p) for p in spec.paths] == spec.accepted
            if shape.startswith("12,"):  # every token of the vocabulary at depth 1: the first is always right
                assert min(spec.accepted[:-1]) >= 1
            if shape == "1,1,1":  # the chain as a tree: the same drafts, so the same decisions
                assert spec.accepted == s3d.speculative_generate(model, prompt, 40, s3d.Draft("s3d", 3)).accepted


def test_tree_with_a_draft_vocabulary_drafts_only_its_tokens():
    model = with_draft_vocab(wide_tree_model(), torch.tensor([4, 0, 2, 7, 9, 11]))
    tried = set()
    with torch.no_grad():
        for prompt in PROMPTS:
            prompt = [t % 12 for t in prompt]
            spec = s3d.speculative_generate(model, prompt, 30, s3d.Draft("s3d", 3, tree=s3d.top_k_tree((3, 2, 1))),
                                            on_iteration=lambda d, n, t, c: tried.update(x for c in d for x in c))
            assert spec.tokens == s3d.ar_generate(model, prompt, 30).tokens
    assert tried <= {4, 0, 2, 7, 9, 11}
    with pytest.raises(UsageError, match="more candidates than the draft's 6 tokens"):  # one line from the programs
        s3d.speculative_generate(model, [1, 2], 4, s3d.Draft("s3d", 2, tree=s3d.top_k_tree((7, 1))))


def test_tree_on_iteration_shows_the_candidates_along_the_accepted_path():
    model = wide_tree_model()
    tree = s3d.top_k_tree((12, 2, 2))
    seen = []
    with torch.no_grad():
        spec = s3d.speculative_generate(model, [3, 1, 4], 30, s3d.Draft("s3d", 3, tree=tree),
                                        on_iteration=lambda d, n, t, c: seen.append((d, n, t)))
    position = 1
    for (candidates, n, target), path in zip(seen, spec.paths):
        assert len(candidates) == min(n + 1, 3) and len(candidates[0]) == 12 and sorted(candidates[0]) == list(range(12))
        accepted = [c[0] for c in candidates[:n]]  # the accepted candidate first
        emitted = spec.tokens[position:position + n + 1]  # (the last iteration's cut at max_new_tokens)
        assert (accepted + [target])[:len(emitted)] == emitted and emitted
        position += n + 1


def test_tree_compiled_is_lossless_and_never_recompiles():
    import torch._dynamo

    model = wide_tree_model(sequential_rank=3)  # a candidate's rank then depends on its parent's token
    tree = s3d.top_k_tree((4, 2, 1))
    prompts = [[t % 12 for t in p] for p in PROMPTS]
    with torch.no_grad():
        warm = s3d.speculative_generate(model, prompts[0], 20, s3d.Draft("s3d", 3, tree=tree), compile=True)
        assert warm.tokens == s3d.ar_generate(model, prompts[0], 20).tokens
        torch._dynamo.config.error_on_recompile = True
        try:
            for prompt in prompts[1:]:
                spec = s3d.speculative_generate(model, prompt, 25, s3d.Draft("s3d", 3, tree=s3d.top_k_tree((4, 2, 1))),
                                                compile=True)
                assert spec.tokens == s3d.ar_generate(model, prompt, 25).tokens
        finally:
            torch._dynamo.config.error_on_recompile = False


def tree_samples(model, prompt, n_samples, temperature, top_k, shape):
    counts = {}
    tree = s3d.parse_tree(shape)
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(n_samples):
            r = s3d.speculative_generate(model, prompt, 3, s3d.Draft("s3d", tree.depth, tree=tree),
                                         sampling=s3d.Sampling(temperature, top_k))
            counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
    return counts


@pytest.mark.parametrize("temperature,top_k,shape", [(1.0, None, "2,2,1"), (0.7, 3, "5,1,1"),
                                                     (1.0, None, "0,2,00,01,20,000")])
def test_tree_sampling_matches_the_ar_distribution(temperature, top_k, shape):
    """Top-k trees and a sparse one (siblings of ranks 0 and 2: the rule tries whatever candidates there are)."""
    model = sampling_model()
    prompt = [1, 3, 0, 2]
    exact = exact_first_tokens_distribution(model, prompt, 3, temperature, top_k)
    counts = tree_samples(model, prompt, N_SAMPLES, temperature, top_k, shape)
    assert chi_square_p_value(counts, exact, N_SAMPLES) > 1e-3


def test_the_tree_sampling_test_catches_a_broken_rule(monkeypatch):
    """Sampling the replacement from q itself instead of q without the rejected siblings' tokens favours those
    tokens: the test above must see it."""
    real_put = torch.Tensor.index_put
    monkeypatch.setattr(torch.Tensor, "index_put", lambda self, indices, values, accumulate=False: self.clone())
    model = sampling_model()
    prompt = [1, 3, 0, 2]
    exact = exact_first_tokens_distribution(model, prompt, 3, 1.0, None)
    counts = tree_samples(model, prompt, N_SAMPLES, 1.0, None, "2,2,1")
    monkeypatch.setattr(torch.Tensor, "index_put", real_put)
    assert chi_square_p_value(counts, exact, N_SAMPLES) < 1e-6


def test_best_tree_takes_the_highest_node_rates_and_prints_as_a_tree_value():
    """best_tree grows the tree of N nodes with the highest expected tau under the rates (each node's rate the
    product of per-depth, per-rank ones here): no top-k tree of N nodes or fewer inside the measured one expects
    more, every prefix of a node is in it, and str() of it (a node list: rank sequences) parses back to it, as a
    top-k tree's widths do."""
    per_rank = [0.6, 0.15, 0.1, 0.05]
    big = s3d.top_k_tree((4, 3, 2, 2))
    rates = {n: math.prod(per_rank[k] * 0.9 ** d for d, k in enumerate(n)) for n in big.nodes[1:]}
    for n in (1, 4, 8, 21, 40):
        best = s3d.best_tree(rates, n)
        assert len(best) == n + 1 and set(best.nodes) <= set(big.nodes)
        assert all(node[:-1] in best.nodes for node in best.nodes[1:])
        assert s3d.parse_tree(str(best)) == best
        tau = s3d.expected_tree_tokens(best, rates)
        for widths in itertools.product(range(1, 5), range(1, 4), range(1, 3), range(1, 3)):
            tree = s3d.top_k_tree(widths)
            if len(tree) <= n + 1:
                assert s3d.expected_tree_tokens(tree, rates) <= tau + 1e-12, (n, widths)
    assert str(s3d.best_tree(rates, 4)) == "0,1,00,000"  # (the second candidate at depth 1 beats a fourth deep)
    assert len(s3d.best_tree(rates, 500)) == len(big)  # (no more nodes than were measured)
    assert str(s3d.top_k_tree((3, 2, 1))) == "3,2,1" and s3d.parse_tree("3,2,1") == s3d.top_k_tree((3, 2, 1))
    for bad in ("0,0", "0,x", "0,11", "0,-1"):  # a repeated node, not digits, a node without its parent
        with pytest.raises(ValueError):
            s3d.parse_tree(bad)
    with pytest.raises(ValueError, match="at least one candidate per depth"):  # widths (nodes start with 0)
        s3d.parse_tree("3,0")


def test_tree_acceptance_rule_on_known_distributions():
    """The root's children are tokens 1 and 2 (nodes 1, 2), each with one child of token 0 (nodes 3, 4). After the
    root the target puts all its mass on 2: node 1 always fails and node 2 always passes; after 2 all on 0, so node
    4 passes, and the bonus is a sample of node 4's q, all on 3. Then with half of the mass on 4 after the root,
    the first token is 2 or the replacement 4, sampled with 1 and 2 taken out, never anything else."""
    tree = s3d.make_tree([(0,), (1,), (0, 0), (1, 0)])
    tokens = torch.tensor([5, 1, 2, 0, 0])
    q = torch.zeros(5, 6)
    q[0, 2] = 1.0
    q[1:, 0] = 1.0
    q[4, 0], q[4, 3] = 0.0, 1.0  # after node 4 (tokens 2, 0): the bonus is 3
    for _ in range(30):
        n, out, path = s3d.accept_tree_sampling(tree, tokens, q)
        assert n.item() == 2 and out.tolist() == [2, 0, 3] and path.tolist() == [0, 2, 4]
    q[0, 2], q[0, 4] = 0.5, 0.5  # half the time neither child: the replacement is 4, never 1 or 2
    outcomes = {tuple(s3d.accept_tree_sampling(tree, tokens, q)[1][:1].tolist()) for _ in range(100)}
    assert outcomes == {(2,), (4,)}


def test_tree_speed_model_counts_nodes_on_the_accepted_path():
    tree = s3d.top_k_tree((2, 1))
    rates = s3d.node_rates(tree, [[1, 3], [2], [], [1]])  # nodes: 1 (0,), 2 (1,), 3 (0, 0), 4 (1, 0)
    assert rates == {(0,): 0.5, (1,): 0.25, (0, 0): 0.25, (1, 0): 0.0}
    assert s3d.expected_tree_tokens(tree, rates) == 2.0
    assert s3d.expected_tree_tokens(s3d.top_k_tree((1, 1)), rates) == 1.75  # a tree inside it
