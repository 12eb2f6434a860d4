"""What the machine allows and where a step's time goes: read bandwidth, matmul throughput, the bytes a decode step
must read (its memory-bound floor), and the compiled steps' time split by kernel kind. bench.py --roofline
prints it (BENCHMARKS.md); bench.py --profile times its points' steps with costs_in_rounds; bench.py
--random_weights times the steps of 7B-class shapes with random weights (random weights decode exactly as fast as
real ones).
"""
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

import checkpoint
import s3d
from checkpoint import tensor_bytes
from heads import middle_third, new_heads
from model import ModelArgs, Transformer


def median_ms(call: Callable, repeats: int = 20, warmup: int = 2, before: Optional[Callable] = None) -> float:
    """Median milliseconds of `repeats` calls after `warmup` ones; before(), when given, runs untimed before each. A
    compiled step is timed as the decoding loops call it once warm, without dynamo's guard checks
    (s3d.GuardsUntilWarm): warmup=0 where it has just run."""
    gpu = torch.cuda.is_initialized()
    sync = torch.cuda.synchronize if gpu else (lambda: None)  # GPU work is asynchronous
    before = before or (lambda: None)
    for _ in range(warmup):
        before()
        call()
    times = []
    with s3d.GuardsUntilWarm(True, torch.device("cuda" if gpu else "cpu")) as guards:
        guards.warm()
        for _ in range(repeats):
            before()
            sync()
            t = time.perf_counter()
            call()
            sync()
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


# Each step is timed right after the step that comes before it in its decoding loop: the AR step after itself,
# verify after a draft, a draft after verify. Timed after itself, the draft found part of its weights still in the
# last-level cache and took about 10 % less than it does in the loop (BENCHMARKS.md, section 29).
BEFORE = {"ar": "ar", "verify": "draft", "draft": "verify"}


@torch.no_grad()  # (as the decoding loops run the steps: a step called with autograd on would compile anew)
def loop_ms(calls: dict[str, Callable], repeats: int = 20, names: Optional[list[str]] = None) -> dict[str, float]:
    """median_ms of the AR step, draft and verify calls of step_calls (those in names, or all), each after the one
    before it in the loop."""
    return {name: median_ms(calls[name], repeats, before=calls[BEFORE[name]]) for name in names or calls}


def last_level_cache_bytes() -> int:
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20}.get(text[-1], 1) if text[-1] in "KM" else int(text))
    return max(sizes, default=32 * 2**20)


def read_buffer(device: torch.device) -> Tensor:
    """A float32 buffer four times the last-level cache (at least 256 MiB, at most 2 GiB), to read for the bandwidth."""
    size = min(2 * 2**30, max(256 * 2**20, 4 * last_level_cache_bytes())) if device.type == "cpu" else 2**30
    return torch.ones(size // 4, device=device)


def read_bandwidth(buffer: Tensor, repeats: int = 10) -> float:
    """GB/s of summing a buffer beyond the last-level cache (read_buffer): what a decode step, which streams every
    weight once, can hope for."""
    ms = median_ms(lambda: buffer.sum().item(), repeats=repeats)
    return buffer.numel() * buffer.element_size() / ms / 1e6


def matmul_throughput(dtype: torch.dtype, device: torch.device, n: int = 2048) -> float:
    """GFLOP/s of an n x n x n matmul: the arithmetic a forward of many tokens can use. Sizes grow from 256 to n
    and stop once one matmul takes 50 ms (bf16 without native instructions runs at about 1 GFLOP/s)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    size = 256
    while True:
        a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
        if size >= n or median_ms(lambda: (a @ b, sync()), repeats=1, warmup=1) > 50:
            return 2 * size**3 / median_ms(lambda: (a @ b, sync()), repeats=5) / 1e6
        size *= 2


def linear_call_us(dtype: torch.dtype, device: torch.device, calls: int = 100) -> float:
    """Microseconds a compiled linear map costs per call when it has next to nothing to do (a chain of 64 x 64 maps,
    compiled as the decoding steps are): the fixed cost of each of a step's library calls, whatever their size."""
    chain = torch.nn.Sequential(*[torch.nn.Linear(64, 64, bias=False, dtype=dtype, device=device)
                                  for _ in range(calls)])
    first, x = chain[:1], torch.randn(1, 64, dtype=dtype, device=device)
    autotune = s3d.CPU_AUTOTUNE and dtype != torch.bfloat16  # as step_fn
    step = s3d.compiled(lambda net, x: net(x), device.type, False, autotune)
    with torch.no_grad():
        # one chain and the other in turns, 20 calls each a round: a pause of the machine (a shared one stalls for
        # milliseconds) spoils a round of both, not the whole of one, and the median of the rounds leaves it out
        rounds = [median_ms(lambda: step(chain, x)) - median_ms(lambda: step(first, x)) for _ in range(20)]
    return 1000 * max(0.0, statistics.median(rounds)) / (calls - 1)


def step_bytes(model: Transformer, context: int, layers: list[int], draft_vocab: int = 0,
               adapters: bool = False) -> dict[str, int]:
    """Bytes one forward must read: the linear maps of `layers`, the output head (or the draft's rows of it), the
    KV cache of `layers` up to `context` positions, and the draft adapters."""
    heads = model.heads
    if adapters and heads is not None and heads.int8:  # the draft reads its int8 copies (DraftHeads.fold_adapters)
        linear = sum(tensor_bytes(a.weight_int8) + tensor_bytes(a.scale) for i in layers
                     for a in heads.adapters[str(i)].values())
    else:
        linear = sum(tensor_bytes(p) for i in layers for name, p in model.layers[i].named_parameters()
                     if name.endswith("weight") and "norm" not in name)
    head = tensor_bytes(model.output.weight)
    if draft_vocab and adapters and heads.draft_head_int8 is not None:  # its int8 copy, too
        head = tensor_bytes(heads.draft_head_int8) + tensor_bytes(heads.draft_head_scale)
    elif draft_vocab:
        head = head * draft_vocab // model.config.vocab_size
    cache = model.layers[0].attention.kv_cache
    kv = 2 * len(layers) * cache.k_cache[0, :, :context].numel() * cache.k_cache.element_size()
    # the adapters, unless they are folded into the weights (compiled on a CPU: heads.DraftHeads.fold_adapters)
    extra = sum(tensor_bytes(p) for p in heads.parameters()) if adapters and heads and not heads.folded else 0
    return {"linear": linear, "head": head, "kv_cache": kv, "adapters": extra}


def kernel_kind(name: str, vocab_sizes: tuple[int, ...]) -> str:
    """The kind of a profiler event of a compiled CPU step: Inductor names its GEMM kernels gemm_m{M}n{N}k{K},
    its fused element-wise kernels cpp_fused_* (model.gemv's among them, with the ops they come from in the name),
    and the extern kernels it calls after the aten op (from the C++ wrapper: aoti_torch_cpu_<op>); cpu_kernels.py's
    operators are s3d_kernels::gemv_bf16, s3d_kernels::gemv_int8 (linear maps) and s3d_kernels::attend."""
    if name.startswith("aoti_torch_cpu_"):
        name = "aten::" + name.removeprefix("aoti_torch_cpu_")
    if "gemm_m" in name:
        n = int(name.split("gemm_m", 1)[1].split("n", 1)[1].split("k", 1)[0])
        return "output head" if n in vocab_sizes else "linear maps"
    if ("scaled_dot_product" in name and "cpp_fused" not in name) or name == "s3d_kernels::attend":
        return "attention"
    if "cpp_fused" in name and "stack" in name and "_sum" in name:
        return "linear maps"  # model.gemv's reductions (torch.stack of a sum per row), with what Inductor fused in
    if name.startswith("graph_") or "cpp_fused" in name:
        return "other kernels"
    if name.startswith(("aten::mm", "aten::addmm", "aten::linear", "aten::_linear_pointwise", "aten::_mkl_linear",
                        "mkldnn::", "torch_ops::", "aten::_weight_int8", "s3d_kernels::")):
        return "linear maps"
    return ""


def breakdown(call: Callable, wall_ms: float, vocab_sizes: tuple[int, ...],
              repeats: int = 10) -> tuple[dict[str, float], int]:
    """Milliseconds per call of each kernel kind, and the GEMM calls per call. The profiler times each kind's kernels
    in `repeats` calls; their share of the step's median without it (median_ms, just before) splits wall_ms, the
    step's median from the timed rounds, and 'outside kernels' is the rest (the wrapper between kernels, host work:
    not the profiler's own cost per kernel, which the unprofiled calls leave out). So the parts add up to the step even
    where these calls ran in another spell of a shared machine than the timed rounds (a split of the profiled times
    in milliseconds did not: BENCHMARKS.md, section 45)."""
    import torch._inductor.config as inductor
    from torch.profiler import ProfilerActivity, profile

    assert inductor.cpp.enable_kernel_profile, "the steps must be compiled with Inductor's kernel profiling on"
    # its warm-up call checks the guards, which picks the step's compiled version for the model's heads as they are
    # now; the calls after it, timed and profiled, skip them as the decoding loops do
    unprofiled_ms = median_ms(call, repeats, warmup=1)
    with s3d.GuardsUntilWarm(True, torch.device("cuda" if torch.cuda.is_initialized() else "cpu")) as guards:
        guards.warm()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                call()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    kinds = [kernel_kind(e.name, vocab_sizes) for e in events]
    if "output head" not in kinds:  # library GEMMs (oneDNN) carry no shape in their names: the head is each call's last
        linear = [i for i, kind in enumerate(kinds) if kind == "linear maps"]
        for i in linear[len(linear) // repeats - 1:: len(linear) // repeats] if len(linear) >= repeats else []:
            kinds[i] = "output head"
    parts = dict.fromkeys(["linear maps", "output head", "attention", "other kernels"], 0.0)
    for event, kind in zip(events, kinds):
        if kind:
            parts[kind] += event.self_cpu_time_total / 1000 / repeats
    scale = wall_ms / max(unprofiled_ms, sum(parts.values()))
    parts = {kind: ms * scale for kind, ms in parts.items()}
    parts["outside kernels"] = max(0.0, wall_ms - sum(parts.values()))
    return parts, sum(kind in ("linear maps", "output head") for kind in kinds) // repeats


def step_calls(model: Transformer, draft: s3d.Draft, compile: bool, pos: int) -> dict[str, Callable]:
    """The AR step, the draft (draft.kind's drafter, as the loop calls it) and the verify step (g + 1 tokens, or the
    tree's nodes), at position pos: the same compiled code the decoding loops run."""
    device = model.output.weight.device
    cur = torch.tensor([[1]], device=device)
    drafts = torch.ones(draft.gamma, dtype=torch.long, device=device)
    one_token = s3d.step_fn(s3d.decode_one_token, model, compile)
    drafter = s3d.DRAFTERS[draft.kind](model, draft, s3d.GREEDY, compile, None)
    calls = {"ar": lambda: one_token(model, cur.clone(), torch.arange(pos, pos + 1, device=device), s3d.GREEDY, None,
                                     s3d.causal_mask(model, pos, 1)),
             "draft": lambda: drafter(cur, pos)}
    slots = torch.arange(pos, pos + draft.slots, device=device)
    if draft.tree is None:
        verify = s3d.step_fn(s3d.verify_step, model, compile)
        calls["verify"] = lambda: verify(model, cur, drafts.clone(), None, slots, s3d.GREEDY,
                                         s3d.causal_mask(model, pos, draft.gamma + 1))
    else:
        verify_tree = s3d.step_fn(s3d.verify_tree_step, model, compile)
        nodes = torch.ones(len(draft.tree) - 1, dtype=torch.long, device=device)
        calls["verify"] = lambda: verify_tree(model, cur, nodes.clone(), slots, draft.tree, s3d.GREEDY,
                                              s3d.tree_mask(model, pos, draft.tree))
    return calls


COST_ROUNDS = 6  # rounds over a sweep's points that costs_in_rounds times (bench.py's table says how many)


def costs_in_rounds(model: Transformer, points: list[tuple[object, dict[str, Callable]]], rounds: int = COST_ROUNDS,
                    per_round: int = 4) -> list[dict[str, float]]:
    """Median milliseconds of the AR step, draft and verify step of every point of a sweep (its heads, its
    step_calls at the position where its answers were decoded), timed in rounds that take each point in
    turn, its heads attached: each step's median over the rounds of loop_ms of per_round calls. Timed once per point,
    one point after the other, the same draft's cost moved by up to a factor of two between the points of one sweep
    as the shared machine's speed drifted (BENCHMARKS.md, section 47); in rounds, a slow spell hits every point."""
    times = [{} for _ in points]  # per point: each step's milliseconds, a round at a time
    for _ in tqdm(range(rounds), desc="step costs", unit="round", leave=False):
        for (heads, calls), point_times in zip(points, times):
            model.heads = heads  # (set_heads would copy the draft head again)
            for name, ms in loop_ms(calls, per_round).items():
                point_times.setdefault(name, []).append(ms)
    return [{name: statistics.median(ms) for name, ms in point_times.items()} for point_times in times]


@torch.no_grad()
def measure_steps(model: Transformer, heads: list[tuple], context: int, rounds: int = 6, per_round: int = 5,
                  trees: Sequence[s3d.Tree] = ()) -> tuple[list[dict], float]:
    """bench.py --roofline's rows: the AR and verify(g+1) steps, the verify step of each tree of `trees` (its
    nodes as rows, under its tree mask), then the draft of each (heads, fold, int8) of
    `heads` (one skip range and g; fold: the adapters folded into the weights, as compiled decoding does on a CPU;
    int8: into int8 copies of the weights), at
    position `context`: ms, bytes read, memory-bound floor at the read bandwidth, split by kernel kind; and that
    bandwidth (GB/s). Every step is compiled first, then timed in rounds that take each step in turn (per_round calls
    after an untimed one, its heads attached, each call after the step before it in the loop: BEFORE), so that a
    slow spell of a shared machine hits every step alike. The bandwidth is read in every round too, before its
    steps: a shared machine's bandwidth drifts by a third within minutes (BENCHMARKS.md, section 44), and a floor
    measured once, before the steps, put some above 100 % of it."""
    n_layer, g, skip = model.config.n_layer, heads[0][0].gamma, heads[0][0].skip
    kept = [i for i in range(n_layer) if not skip[0] <= i < skip[1]]
    steps = []  # label, heads, call, layers, tokens, draft vocabulary size
    for i, (h, fold, int8) in enumerate(heads):
        new = len(steps)  # this heads' steps start here
        model.set_heads(h)
        calls = step_calls(model, s3d.Draft("s3d", g, skip, int8=int8), True, context)
        h.fold_adapters(fold, model if int8 else None)  # read when the draft is traced, at its first call below
        if i == 0:
            steps += [("AR step (1 token)", h, calls["ar"], list(range(n_layer)), 1, 0),
                      (f"verify ({g + 1} tokens)", h, calls["verify"], list(range(n_layer)), g + 1, 0)]
            for tree in trees:
                verify = step_calls(model, s3d.Draft("s3d", tree.depth, skip, tree=tree), True, context)["verify"]
                steps.append((f"verify (tree {tree}, {len(tree)} tokens)", h, verify, list(range(n_layer)), len(tree), 0))
        vocab = 0 if h.draft_vocab is None else len(h.draft_vocab)
        steps.append((f"draft ({g} tokens, {len(kept)} of {n_layer} layers, rank {h.rank}"
                      f"{', adapters folded' if fold and h.rank else ''}{' into int8 copies' if int8 else ''}"
                      f"{f', draft vocabulary {vocab}' if vocab else ''}"
                      f"{f', sequential head rank {h.sequential_rank}' if h.sequential_rank else ''})",
                      h, calls["draft"], kept, g, vocab))
        for step in steps[new:]:
            step[2]()  # compiles it
            print(f"compiled: {step[0]}", flush=True)
    times = {step[0]: [] for step in steps}

    def kind(label: str) -> str:  # which step of the loop a row times: "ar", "verify" (a chain's or a tree's), "draft"
        return "ar" if label.startswith("AR") else label.split()[0]

    first = {}  # the first step of each kind (the chain's verify; the heads' own draft, before verify)
    for step in steps:
        first.setdefault(kind(step[0]), step)
    buffer, reads = read_buffer(model.output.weight.device), []
    for _ in range(rounds):
        reads.append(read_bandwidth(buffer, repeats=per_round))
        for label, h, call, *_ in steps:
            before = first[BEFORE[kind(label)]]

            def run_before() -> None:
                model.heads = before[1]  # (set_heads would copy the draft head again)
                before[2]()
                model.heads = h

            run_before()
            call()
            times[label] += [median_ms(call, 1, warmup=0, before=run_before) for _ in range(per_round)]
    del buffer
    bandwidth, rows = statistics.median(reads), []
    for label, h, call, layers, tokens, vocab in steps:
        model.heads = h
        ms = statistics.median(times[label])
        moved = step_bytes(model, context + tokens, layers, vocab, adapters=layers is kept)
        parts, gemm_calls = breakdown(call, ms, (model.config.vocab_size, vocab))
        # what each part's bytes take at the bandwidth: the parts that read none (other kernels, outside them) 0
        part_bytes = {"linear maps": moved["linear"] + moved["adapters"], "output head": moved["head"],
                      "attention": moved["kv_cache"]}
        rows.append({"step": label, "ms": ms, "bytes": moved, "floor_ms": sum(moved.values()) / bandwidth / 1e6,
                     "parts_ms": parts, "gemm_calls": gemm_calls,
                     "parts_floor_ms": {kind: part_bytes.get(kind, 0) / bandwidth / 1e6 for kind in parts}})
        print(f"{label}: {ms:.2f} ms", flush=True)
    return rows, bandwidth


# ---------------------------------------------------------------------------------------------------------------
# Random weights of published shapes (bench.py --random_weights)

SHAPES = {
    "llama-7b": dict(vocab_size=32000, n_layer=32, n_head=32, dim=4096, intermediate_size=11008, block_size=4096),
    "llama3-8b": dict(vocab_size=128256, n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336,
                      rope_base=500000.0, block_size=8192),
    "qwen2.5-7b": dict(vocab_size=152064, n_layer=28, n_head=28, n_local_heads=4, dim=3584, intermediate_size=18944,
                       rope_base=1e6, attn_bias=True, block_size=32768),
    "tiny": dict(vocab_size=512, n_layer=6, n_head=4, n_local_heads=2, dim=64, intermediate_size=128, block_size=1024),
}


def random_model(shape: str, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A model of a SHAPES entry with random weights, made straight on the device in dtype (no float32 copy)."""
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device("meta"):
            model = Transformer(ModelArgs(name=f"{shape} (random weights)", **SHAPES[shape]))
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02, generator=generator)
    return model.eval()


@torch.no_grad()
def random_weights_costs(model: Transformer, context: int, skips: list[tuple[int, int]], gammas: list[int],
                         compile: bool = True, repeats: int = 20) -> dict:
    """The AR step, verify(g+1) for each g and draft(g) for each skip range and g, at position `context`, with
    fresh rank-8 heads (trained ones cost the same): ms, and the AR step's bytes read."""
    s3d.prepare_cache(model, context + max(gammas) + 1)
    n_layer = model.config.n_layer
    steps = {}
    for skip in skips:
        for g in gammas:
            model.set_heads(new_heads(model, skip, g, 8))
            calls = step_calls(model, s3d.Draft("s3d", g, skip), compile, context)
            # the AR step once, verify once per g, the draft for each skip range and g
            wanted = {"ar": "ar", "verify": f"verify{g + 1}", "draft": f"draft{g} {skip[0]}:{skip[1]}"}
            ms = loop_ms(calls, repeats, [name for name, key in wanted.items() if key not in steps])
            steps.update({wanted[name]: v for name, v in ms.items()})
    model.set_heads(None)
    return {"ms": steps, "bytes": step_bytes(model, context + 1, list(range(n_layer)))}


def random_weights_bench(shape: str, device: torch.device, formats: list[str], context: int,
                         skips: list[tuple[int, int]], gammas: list[int], compile: bool = True) -> list[dict]:
    """random_weights_costs for each format (bfloat16, float32, int8, int4), one model at a time."""
    rows = []
    for fmt in formats:
        dtype = torch.float32 if fmt == "float32" else torch.bfloat16
        model = random_model(shape, device, dtype)
        if fmt in checkpoint.QUANTIZATIONS:
            model = checkpoint.quantize(model, fmt, groupsize=128)
        skips = skips or [middle_third(model.config.n_layer)]
        rows.append({"format": fmt, **random_weights_costs(model, context, skips, gammas, compile)})
        del model
        s3d.release_compiled()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
