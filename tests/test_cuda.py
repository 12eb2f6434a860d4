"""The GPU path (skipped without CUDA; `make gpu-check` runs it on a GPU machine): the compiled loop under CUDA graphs
is lossless for every draft kind (and a tree) in float32 (exactly) and bfloat16 (up to ties), records no new graph and compiles
nothing after warm-up, keeps what outlives a replay, samples, runs int8/int4, and synchronises with the host once
per iteration."""
import warnings

import pytest
import torch

import roofline
import s3d
from heads import new_heads
from model import ModelArgs, Transformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def fresh_compiled_steps():
    """Each test compiles and records its own steps: its new models would otherwise pile up recompilations of the
    shared compiled steps (one per model object)."""
    s3d.release_compiled()
    yield
    s3d.release_compiled()

PROMPTS = [[3, 14, 15, 92, 65], list(range(10, 40)), [7] * 12]
DRAFTS = [s3d.Draft("s3d", 4), s3d.Draft("skip", 3, (2, 4)), s3d.Draft("model", 3),
          s3d.Draft("s3d", 4, tree=s3d.top_k_tree((3, 2, 1, 1)))]


def draft_id(draft: s3d.Draft) -> str:
    return draft.kind + (f"-tree-{draft.tree}" if draft.tree else "")


def cuda_model(dtype: torch.dtype, n_layer: int = 6, seed: int = 0, dim: int = 128) -> Transformer:
    """A small random model on the GPU, with trained-looking (non-zero) heads."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(block_size=512, vocab_size=256, n_layer=n_layer, n_head=4, n_local_heads=2, dim=dim,
                                  intermediate_size=256, name=f"cuda-{seed}"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1).add_(1 if p.dim() == 1 else 0)
    model = model.to("cuda", dtype).eval()
    if n_layer > 2:
        heads = new_heads(model, (2, 4), 4, 4)
        with torch.no_grad():
            for p in heads.parameters():
                p.normal_(0, 0.05)
        model.set_heads(heads)
    return model


def draft_for(draft: s3d.Draft, dtype: torch.dtype) -> s3d.Draft:
    return s3d.Draft(draft.kind, draft.gamma, draft.skip, cuda_model(dtype, n_layer=2, seed=5) if draft.kind == "model"
                     else None, draft.tree)


def tie_free(spec: list[int], ar: list[int], model: Transformer, prompt: list[int]) -> bool:
    """Equal, or the first difference is a near-tie of the target's two best logits (bf16 rounding decides those)."""
    if spec == ar:
        return True
    i = next(i for i, (a, b) in enumerate(zip(spec, ar)) if a != b)
    with torch.no_grad():
        tokens = torch.tensor([prompt + ar[:i]], device="cuda")
        model.setup_caches(1, 512)
        logits = model(tokens, torch.arange(tokens.shape[1], device="cuda"))[0, -1].float()
    return abs(logits[spec[i]] - logits[ar[i]]).item() <= 0.02 * logits.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("draft", DRAFTS, ids=draft_id)
def test_greedy_under_cuda_graphs_equals_ar(draft, dtype):
    model, draft = cuda_model(dtype), draft_for(draft, dtype)
    with torch.no_grad():
        for prompt in PROMPTS:
            ar = s3d.ar_generate(model, prompt, 40, compile=True).tokens
            assert ar == s3d.ar_generate(model, prompt, 40).tokens or dtype == torch.bfloat16
            spec = s3d.speculative_generate(model, prompt, 40, draft, compile=True).tokens
            assert spec == ar if dtype == torch.float32 else tie_free(spec, ar, model, prompt)


class GraphRecordings:
    """Counts CUDA-graph captures (cudagraph trees record each new graph with one capture)."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = torch.cuda.CUDAGraph.capture_begin

        def counting(graph, *a, **k):
            self.count += 1
            return original(graph, *a, **k)

        monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", counting)


@pytest.mark.parametrize("draft", DRAFTS, ids=draft_id)
def test_no_recompile_and_no_rerecording_after_warm_up(draft, monkeypatch):
    import torch._dynamo

    model, draft = cuda_model(torch.float32), draft_for(draft, torch.float32)
    recordings = GraphRecordings(monkeypatch)
    with torch.no_grad():
        for _ in range(2):  # warm-up: cudagraph trees run a step eagerly once, then record it
            s3d.speculative_generate(model, PROMPTS[0], 30, draft, compile=True)
        warm = recordings.count
        assert warm > 0, "no CUDA graph was recorded: the steps do not run under CUDA graphs"
        torch._dynamo.config.error_on_recompile = True
        try:
            for prompt in PROMPTS[1:]:
                spec = s3d.speculative_generate(model, prompt, 30, draft, compile=True)
                assert spec.tokens == s3d.ar_generate(model, prompt, 30).tokens
        finally:
            torch._dynamo.config.error_on_recompile = False
    assert recordings.count == warm, f"{recordings.count - warm} CUDA graphs were recorded after warm-up"


def test_a_replay_does_not_overwrite_what_the_loop_still_reads():
    """The draft's outputs must survive the verify replay, and a step's outputs the next replay of the same step:
    read back after the later replays, they are what they were."""
    model = cuda_model(torch.float32)
    draft = s3d.Draft("skip", 3, (2, 4))
    drafter = s3d.DRAFTERS["skip"](model, draft, s3d.GREEDY, True, None)
    verify = s3d.step_fn(s3d.verify_step, model, True)
    s3d.prepare_cache(model, 64)
    cur = torch.tensor([[5]], device="cuda")
    with torch.no_grad():
        for pos in range(8, 14):  # past warm-up and recording
            drafts, _ = drafter(cur, pos)
            seen = drafts.clone()
            n, tokens = verify(model, cur, drafts.clone(), None, torch.arange(pos, pos + 4, device="cuda"))
            drafter(cur, pos + 1)  # the next replays of the draft steps
            assert torch.equal(drafts, seen)


def test_sampling_runs_under_cuda_graphs():
    model = cuda_model(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        r = s3d.speculative_generate(model, PROMPTS[0], 48, s3d.Draft("s3d", 4), sampling=s3d.Sampling(0.8, 50, 0.95),
                                     compile=True)
    assert len(r.tokens) == 48 and all(0 <= t < 256 for t in r.tokens) and len(r.accepted) >= 10


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_s3d_equals_its_own_ar_under_cuda_graphs(mode):
    pytest.importorskip("torchao")
    import checkpoint

    model = checkpoint.quantize(cuda_model(torch.bfloat16, dim=256), mode, groupsize=32)
    with torch.no_grad():
        for prompt in PROMPTS[:2]:
            ar = s3d.ar_generate(model, prompt, 32, compile=True).tokens
            for draft in DRAFTS[:2]:
                assert tie_free(s3d.speculative_generate(model, prompt, 32, draft, compile=True).tokens, ar, model,
                                prompt)


@pytest.mark.parametrize("draft", DRAFTS, ids=draft_id)
def test_one_host_sync_per_iteration_none_inside_the_steps(draft):
    """CUDA's sync debug mode warns at every synchronising call: after warm-up, a decode makes one per iteration
    (the accepted count and tokens) plus one for the first token, and none inside the draft and verify steps."""
    model, draft = cuda_model(torch.float32), draft_for(draft, torch.float32)
    with torch.no_grad():
        s3d.speculative_generate(model, PROMPTS[0], 30, draft, compile=True)
        s3d.speculative_generate(model, PROMPTS[0], 30, draft, compile=True)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                r = s3d.speculative_generate(model, PROMPTS[0], 30, draft, compile=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    # + the prompt's copy to the GPU and the first token (prefill's)
    assert len(syncs) == len(r.accepted) + 2, "\n".join(str(w.message) for w in syncs[:5])


def test_random_weights_costs_on_the_gpu():
    model = roofline.random_model("tiny", torch.device("cuda"), torch.bfloat16)
    costs = roofline.random_weights_costs(model, 64, [(2, 4)], [2, 4], repeats=5)
    assert set(costs["ms"]) == {"ar", "verify3", "verify5", "draft2 2:4", "draft4 2:4"}
    assert all(ms > 0 for ms in costs["ms"].values())
