"""Benchmarks, written up in BENCHMARKS.md.

    python bench.py --decode            # decode tokens/s: ours eager and compiled, and transformers' generate()
    python bench.py --methods ar s3d hf --heads H --limit 10 --json out.json     # Spec-Bench evaluation
    python bench.py --profile --heads A B --gammas 2 4 --plot speed.png   # the speed model: predicted vs measured
    python bench.py --sweep --draft skip --plot sweep.png                 # search skip ranges and g, keep the best
    python bench.py --formats float32 bfloat16 int8 --heads H             # weight formats: perplexity, speed, memory

The evaluation answers Spec-Bench prompts (multi-turn rows turn by turn) with every method in one process, after a
warm-up, and checks every greedy speculative answer against AR token for token. Every run prints the machine,
torch version and date with its table.
"""
import argparse
import ctypes
import datetime
import gc
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from torch._inductor.codecache import PyCodeCache
from tqdm import tqdm

import s3d
import quantize
from generate import (DEFAULT_CHECKPOINT, DTYPES, ArgumentParser, UsageError, load, peak_memory_bytes,
                      reset_peak_memory, skip_range)
from model import CheckpointError, middle_third

PROMPT = "Write a short story about a robot who learns to paint."


def cpu_name() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.machine()} ({torch.backends.cpu.get_cpu_capability()})"


def machine_line() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()
    return (f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{datetime.date.today().isoformat()}")


def ours_decode_rate(model, prompt: list[int], n: int, compile: bool) -> float:
    """Decode tokens/s of one greedy run of exactly n tokens (EOS ignored), prefill excluded."""
    r = s3d.ar_generate(model, prompt, n, compile=compile)
    return (len(r.tokens) - 1) / r.decode_time


def hf_decode_rate(hf, prompt: list[int], n: int) -> float:
    """transformers generate() for exactly n tokens, minus a 1-token generate (its prefill), per decoded token."""
    ids = torch.tensor([prompt])

    def timed(k):
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    return (n - 1) / (timed(n) - timed(1))


def to_transformers(model) -> "torch.nn.Module":
    """A dense transformers LlamaForCausalLM with exactly our weights and dtype (the inverse of our conversion), so
    that speed is compared on the same weights. (transformers 5 keeps a GGUF's weights packed and dequantizes in
    every matmul, which is a different workload.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    if c.architecture != "LlamaForCausalLM":
        raise ValueError("the transformers comparison is written for Llama-architecture checkpoints")
    hf_config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.intermediate_size,
                            num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_local_heads,
                            head_dim=c.head_dim, max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
                            rope_theta=c.rope_base, tie_word_embeddings=c.tie_embeddings)
    halves = lambda w, n: w.reshape(n, c.head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)  # noqa: E731
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    q_size, kv_size = c.n_head * c.head_dim, c.n_local_heads * c.head_dim
    for i in range(c.n_layer):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = sd[p + "attention.wqkv.weight"].split([q_size, kv_size, kv_size])
        out |= {h + "self_attn.q_proj.weight": halves(q, c.n_head), h + "self_attn.k_proj.weight": halves(k, c.n_local_heads),
                h + "self_attn.v_proj.weight": v, h + "self_attn.o_proj.weight": sd[p + "attention.wo.weight"],
                h + "mlp.gate_proj.weight": sd[p + "feed_forward.w1.weight"], h + "mlp.up_proj.weight": sd[p + "feed_forward.w3.weight"],
                h + "mlp.down_proj.weight": sd[p + "feed_forward.w2.weight"],
                h + "input_layernorm.weight": sd[p + "attention_norm.weight"],
                h + "post_attention_layernorm.weight": sd[p + "ffn_norm.weight"]}
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_config)
    hf.load_state_dict({k: v.clone() for k, v in out.items()}, assign=True, strict=not c.tie_embeddings)
    if c.tie_embeddings:
        hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config)  # its buffers were made on the meta device
    return hf.to(model.output.weight.dtype).eval()


def bench_decode(args) -> None:
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        model, tok = load(args.checkpoint, torch.device(args.device), dtype)
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
        hf = to_transformers(model)
        with torch.no_grad():
            for name, rate in [("ours, eager", lambda: ours_decode_rate(model, prompt, args.max_new_tokens, False)),
                               ("ours, --compile", lambda: ours_decode_rate(model, prompt, args.max_new_tokens, True)),
                               ("transformers generate()", lambda: hf_decode_rate(hf, prompt, args.max_new_tokens))]:
                rate()  # warm-up (and compilation) outside the timed runs
                runs = [rate() for _ in range(args.repeats)]
                rows.append((dtype_name, name, statistics.median(runs), runs))
                print(f"{dtype_name:9} {name:24} median {statistics.median(runs):6.1f} tokens/s "
                      f"({', '.join(f'{r:.1f}' for r in runs)})", file=sys.stderr)
        del model, hf
    print(f"\nDecode speed, {args.max_new_tokens} greedy tokens after a chat prompt of {len(prompt)} tokens, "
          f"median of {args.repeats} runs. {machine_line()}.\n")
    print("| dtype | engine | tokens/s | vs transformers |\n|---|---|---|---|")
    for dtype_name, name, median, _ in rows:
        hf_median = next(m for d, n, m, _ in rows if d == dtype_name and n.startswith("transformers"))
        print(f"| {dtype_name} | {name} | {median:.1f} | {median / hf_median:.2f}x |")


# ---------------------------------------------------------------------------------------------------------------
# Spec-Bench-style evaluation: every method answers the same prompts, turn by turn, in one process.

SPECULATIVE = ("s3d", "skip", "model")
METHODS = ("ar", *SPECULATIVE, "hf")
# A greedy speculative answer may leave AR's only where the target's two best logits are within a few rounding
# steps (ulps) of its dtype: a tie that a 1-token forward (AR) and a (g+1)-token forward (verify) round differently.
# float32 hardly ever meets one; bfloat16 (8 significant bits, rounded after every layer) does every few hundred
# tokens. A wider gap is a wrong token: a bug.
TIE_ULPS = 4


def read_spec_bench(path: Path, limit: Optional[int]) -> list[dict]:
    """Rows {question_id, category, turns} of a Spec-Bench JSONL file, the first `limit` of each category."""
    rows, seen = [], {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns, category = row["turns"], row["category"]
            assert isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise UsageError(f"{path}:{number}: not a Spec-Bench row (question_id, category, turns: [str, ...])") from None
        if limit is None or seen.get(category, 0) < limit:
            seen[category] = seen.get(category, 0) + 1
            rows.append({"question_id": row.get("question_id", number), "category": category, "turns": turns})
    if not rows:
        raise UsageError(f"{path} has no prompts")
    return rows


def hf_generate(hf, prompt: list[int], max_new_tokens: int, eos_ids: set[int], temperature: float,
                top_k: Optional[int], top_p: Optional[float]) -> s3d.Result:
    """transformers generate() on the same weights, timed like ours: a streamer marks the first new token."""
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):  # called once with the prompt, then once per new token
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    streamer = FirstToken()
    t0 = time.perf_counter()
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0) \
        if temperature > 0 else dict(do_sample=False)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids),
                      pad_token_id=sorted(eos_ids)[0], streamer=streamer, **sampling)[0, len(prompt):].tolist()
    t1 = time.perf_counter()
    first = streamer.first or t1
    return s3d.Result(out, time_to_first_token=first - t0, decode_time=t1 - first)


def summarize(records: list[dict], ar_records: list[dict], gamma: int) -> dict:
    """Figures of one method over some prompts, against AR on the same prompts."""
    tokens = sum(r["new_tokens"] - 1 for r in records)
    decode = sum(r["decode_s"] for r in records)
    ar_rate = sum(r["new_tokens"] - 1 for r in ar_records) / max(1e-9, sum(r["decode_s"] for r in ar_records))
    accepted = [n for r in records for n in r["accepted"]]
    rate = tokens / decode if decode > 0 else float("nan")
    return {"answers": len(records), "new_tokens": sum(r["new_tokens"] for r in records), "tokens_per_s": rate,
            "speedup": rate / ar_rate, "tau": s3d.mean_tokens_per_iteration(accepted) if accepted else 1.0,
            "acceptance": s3d.acceptance_rates(accepted, gamma) if accepted else [],
            "matches_ar": sum(r["matches_ar"] for r in records), "ties": sum(map(is_tie, records))}


def is_tie(record: dict) -> bool:
    return record["gap_ulps"] is not None and record["gap_ulps"] <= TIE_ULPS


def gap_in_ulps(model, prompt: list[int], ar_tokens: list[int], i: int, other: int) -> Optional[float]:
    """How far apart the target's logits for AR's token i and for `other` are, in rounding steps of the model's
    dtype at their size, from one forward of the prompt and AR's answer before token i."""
    if i >= len(ar_tokens):
        return None
    tokens, device = prompt + ar_tokens[:i], model.output.weight.device
    s3d.prepare_cache(model, len(tokens))
    logits = model(torch.tensor([tokens], device=device), torch.arange(len(tokens), device=device))[0, -1].float()
    a, b = logits[ar_tokens[i]].item(), logits[other].item()
    ulp = torch.finfo(model.tok_embeddings.weight.dtype).eps * 2.0 ** math.floor(math.log2(max(abs(a), abs(b), 1e-30)))
    return abs(a - b) / ulp


def evaluate(args, model, tok, rows: list[dict], draft_model=None, reference: Optional[list[dict]] = None) -> dict:
    """Runs every method over every row, turn by turn; returns per-prompt records and summaries (JSON-ready).
    Answers are compared with AR's, from this run or, when AR is not among the methods, from reference records."""
    device, hf = model.output.weight.device, None
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)

    def run(method: str, prompt: list[int]) -> s3d.Result:
        if method == "ar":
            return s3d.ar_generate(model, prompt, args.max_new_tokens, eos_ids=tok.eos_ids, compile=args.compile,
                                   **sampling)
        if method == "hf":
            return hf_generate(hf, prompt, args.max_new_tokens, tok.eos_ids, **sampling)
        return s3d.speculative_generate(model, prompt, args.max_new_tokens, draft=method, gamma=args.gamma,
                                        skip=args.skip, draft_model=draft_model, eos_ids=tok.eos_ids,
                                        compile=args.compile, **sampling)

    # size the cache for the longest conversation now: growing it later would recompile inside the timed runs
    longest = max(len(tok.encode(tok.apply_chat_template([{"role": "user", "content": t} for t in r["turns"]])))
                  + len(r["turns"]) * (args.max_new_tokens + 16) for r in rows)  # + each answer and its markup
    for m in (model, draft_model):
        if m is not None:
            s3d.prepare_cache(m, min(m.config.block_size, longest + args.gamma + 1))
    reference = reference or []
    records, peaks = [], {}
    ar_answers = {(r["question_id"], r["turn"]): r["tokens"] for r in reference}
    with torch.no_grad():
        for n, method in enumerate(args.methods):
            if method == "hf":  # built only now, so that the other methods' peak memory does not include it
                try:
                    hf = to_transformers(model)
                except ImportError:
                    raise UsageError("--methods hf needs transformers (pip install -r requirements-dev.txt)") from None
            if n > 0:  # the methods before this one: their compiled steps would count in this one's peak memory
                release_compiled()
            first = tok.encode(tok.apply_chat_template([{"role": "user", "content": rows[0]["turns"][0]}]))
            run(method, first)  # warm-up and compilation, outside the timed runs
            return_freed_memory()
            reset_peak_memory(device)
            for row in tqdm(rows, desc=method, unit="prompt"):
                messages = []
                for turn, text in enumerate(row["turns"]):
                    messages.append({"role": "user", "content": text})
                    prompt = tok.encode(tok.apply_chat_template(messages))
                    torch.manual_seed(args.seed)
                    result = run(method, prompt)
                    key = (row["question_id"], turn)
                    if method == "ar":
                        ar_answers[key] = result.tokens
                    ar_tokens = ar_answers[key]
                    i = first_difference(result.tokens, ar_tokens) if result.tokens != ar_tokens else None
                    gap = None if i is None or method not in SPECULATIVE or args.temperature > 0 or i >= len(result.tokens) \
                        else gap_in_ulps(model, prompt, ar_tokens, i, result.tokens[i])
                    records.append({"question_id": row["question_id"], "category": row["category"], "turn": turn,
                                    "method": method, "prompt_tokens": len(prompt), "new_tokens": len(result.tokens),
                                    "decode_s": result.decode_time, "time_to_first_token_s": result.time_to_first_token,
                                    "tokens_per_s": (len(result.tokens) - 1) / result.decode_time
                                    if result.decode_time > 0 else None,
                                    "iterations": len(result.accepted), "accepted": result.accepted,
                                    "tau": s3d.mean_tokens_per_iteration(result.accepted) if result.accepted else 1.0,
                                    "matches_ar": i is None, "first_difference": i, "gap_ulps": gap,
                                    "tokens": result.tokens})
                    # greedy: the conversation goes on from AR's answer, so every turn is compared on AR's prompt
                    # (after a tie, a method's own answer would make all its later turns differ)
                    reply = ar_tokens if args.temperature == 0 else result.tokens
                    messages.append({"role": "assistant", "content": tok.decode(reply, skip_special=True)})
            peaks[method] = peak_memory_bytes(device)
    summary = {}
    for method in args.methods:
        mine = [r for r in records if r["method"] == method]
        ar = [r for r in records + reference if r["method"] == "ar"]
        figures = summarize(mine, ar, args.gamma)
        figures["peak_memory_gib"] = peaks[method] / 2**30
        figures["tokens_per_s_per_gib"] = figures["tokens_per_s"] / figures["peak_memory_gib"]
        figures["categories"] = {c: summarize([r for r in mine if r["category"] == c],
                                              [r for r in ar if r["category"] == c], args.gamma)
                                 for c in dict.fromkeys(r["category"] for r in mine)}
        summary[method] = figures
    mismatches = [{k: r[k] for k in ("method", "question_id", "category", "turn", "first_difference", "gap_ulps")}
                  for r in records if r["method"] in SPECULATIVE and not r["matches_ar"] and not is_tie(r)]
    return {"records": records, "summary": summary, "mismatches": mismatches if args.temperature == 0 else []}


def release_compiled() -> None:
    """Frees the compiled steps of the method before (on a CPU each holds its own frozen, prepacked copy of the
    weights) and hands the freed memory back to the system, so that the next method's peak memory is its own."""
    torch._dynamo.reset()
    s3d.compiled.cache_clear()
    # Inductor keeps each compiled graph's generated module, whose globals hold the frozen weights, in its code
    # cache and in sys.modules; dynamo's reset leaves them there.
    PyCodeCache.cache_clear()
    for name in [m for m in sys.modules if m.startswith("torch._inductor.runtime.compile_tasks.")]:
        del sys.modules[name]
    return_freed_memory()


def return_freed_memory() -> None:
    """Collects garbage (such as what compilation leaves) and, on Linux, returns the freed heap to the system: peak
    memory is the resident set, which freed memory otherwise stays in."""
    gc.collect()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first token where a and b differ (the shorter length if one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def method_label(method: str, args) -> str:
    if method == "s3d":
        return f"s3d {args.heads.name if args.heads else 'untrained'} {args.skip[0]}:{args.skip[1]}"
    if method == "skip":
        return f"skip {args.skip[0]}:{args.skip[1]}"
    if method == "model":
        return f"model {args.draft_checkpoint.name}"
    return {"ar": "ar (ours, compiled)" if args.compile else "ar (ours, eager)", "hf": "transformers generate()"}[method]


def table_row(label: str, f: dict) -> str:
    rates = " ".join(f"{a:.2f}" for a in f["acceptance"]) or "-"
    return (f"| {label} | {f['tau']:.2f} | {rates} | {f['tokens_per_s']:.1f} | {f['speedup']:.2f}x | "
            f"{same_as_ar(f)} |")


def same_as_ar(f: dict) -> str:
    """'19/19', or '4/19 + 15 ties' when some answers left AR's at a tie (TIE_ULPS)."""
    return f"{f['matches_ar']}/{f['answers']}" + (f" + {f['ties']} ties" if f.get("ties") else "")


def print_evaluation(result: dict, args, n_rows: int) -> None:
    turns = sum(1 for r in result["records"] if r["method"] == "ar")
    mode = "greedy" if args.temperature == 0 else f"temperature {args.temperature}"
    print(f"\n{n_rows} Spec-Bench prompts ({turns} turns, at most {args.limit} per category) from {args.prompts}, "
          f"{args.max_new_tokens} new tokens, {mode}, g={args.gamma}, {args.dtype}, "
          f"{'compiled' if args.compile else 'eager'}. {machine_line()}.\n")
    print("| method | tau | acceptance per position | tokens/s | vs AR | output == AR | peak memory | tokens/s per GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for method, f in result["summary"].items():
        print(f"{table_row(method_label(method, args), f)} {f['peak_memory_gib']:.2f} GiB | "
              f"{f['tokens_per_s_per_gib']:.1f} |")
    for method, f in result["summary"].items():
        if method == "ar" or len(f["categories"]) < 2:
            continue
        print(f"\nPer category, {method_label(method, args)} against AR on the same prompts:\n")
        print("| category | tau | acceptance per position | tokens/s | vs AR | output == AR |\n|---|---|---|---|---|---|")
        for category, c in f["categories"].items():
            print(table_row(category, c))
    report_mismatches(result["records"], result["mismatches"], args.dtype)


def report_mismatches(records: list[dict], mismatches: list[dict], dtype: str) -> None:
    ties = [r for r in records if is_tie(r)]
    if ties:
        print(f"{len(ties)} greedy speculative answers left AR's at a tie: the target's two logits within "
              f"{max(r['gap_ulps'] for r in ties):.0f} rounding steps of {dtype} (the limit is {TIE_ULPS})",
              file=sys.stderr)
    for m in mismatches:
        gap = "" if m["gap_ulps"] is None else f", where the target's logits are {m['gap_ulps']:.0f} ulps apart"
        print(f"MISMATCH: {m['method']} differs from AR on question {m['question_id']} turn {m['turn']} "
              f"({m['category']}) from new token {m['first_difference']}{gap}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# The speed model (design.md section 4): step costs, acceptance, predicted against measured speedup.


def step_costs(model, gamma: int, compile: bool, skip: Optional[tuple[int, int]] = None,
               draft: str = "s3d", repeats: int = 20) -> dict[str, float]:
    """Median milliseconds of one AR step, one draft (S3D: one forward of g tokens through the kept layers; skip: g
    one-token forwards of the skipped model) and one verify step (g + 1 tokens, all layers), called as the decoding
    loops call them (so compiled, they are the same compiled code)."""
    device = model.output.weight.device
    cur, pos = torch.tensor([[1]], device=device), 64
    drafts = torch.ones(gamma, dtype=torch.long, device=device)
    one_token = s3d.step_fn(s3d.decode_one_token, model, compile)
    calls = {"ar": lambda: one_token(model, cur.clone(), torch.tensor([pos], device=device)),
             "draft": lambda: s3d.step_fn(s3d.draft_s3d, model, compile)(model, cur, torch.arange(pos, pos + gamma, device=device))
             if draft == "s3d" else s3d.draft_one_by_one(one_token, model, cur, pos, gamma, {}, skip),
             "verify": lambda: s3d.step_fn(s3d.verify_step, model, compile)(model, cur, drafts.clone(), None,
                                                                          torch.arange(pos, pos + gamma + 1, device=device))}
    costs = {}
    with torch.no_grad():
        for name, call in calls.items():
            call()
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                call()
                times.append(time.perf_counter() - t)
            costs[name] = 1000 * statistics.median(times)
    return costs


def symmetric_skips(n_layer: int) -> list[tuple[int, int]]:
    """Middle ranges skipping 2, 4, ... layers up to half the model, centred (the paper's best shape)."""
    return [((n_layer - k) // 2, (n_layer - k) // 2 + k) for k in range(2, n_layer // 2 + 1, 2)]


def profile(args, model, tok, rows: list[dict]) -> list[dict]:
    """For every (skip range, g) of the grid: cd and cv in AR steps, the acceptance per position and measured speedup
    on the prompts, and the speed model's prediction."""
    from model import load_heads, new_heads

    skips = args.skips or symmetric_skips(model.config.n_layer)
    if args.draft == "skip":
        configs = [(None, skip) for skip in skips]
    elif args.heads_files:
        configs = [(load_heads(h, model.config), h) for h in args.heads_files]
    else:  # fresh heads: for trying the machinery; their acceptance is that of untrained heads
        configs = [(new_heads(model, skip, max(args.gammas), 8), None) for skip in skips]
    base = argparse.Namespace(**{**vars(args), "methods": ["ar"]})
    ar = evaluate(base, model, tok, rows)
    points = []
    for heads, source in configs:
        skip = heads.skip if heads is not None else source
        model.set_heads(heads)
        for g in args.gammas:
            if heads is not None and g > heads.gamma:
                continue
            run_args = argparse.Namespace(**{**vars(args), "methods": [args.draft], "gamma": g, "skip": skip})
            result = evaluate(run_args, model, tok, rows, reference=ar["records"])
            figures = result["summary"][args.draft]
            report_mismatches(result["records"], result["mismatches"], args.dtype)
            costs = step_costs(model, g, args.compile, skip, args.draft)
            cd, cv = costs["draft"] / costs["ar"], costs["verify"] / costs["ar"]
            points.append({"draft": args.draft, "heads": str(source) if heads is not None and source else None,
                           "skip": list(skip), "skipped_layers": skip[1] - skip[0], "gamma": g, "cd": cd, "cv": cv,
                           "step_ms": costs,
                           "acceptance": figures["acceptance"], "tau": figures["tau"],
                           "predicted_speedup": s3d.predicted_speedup(figures["acceptance"], cd, cv),
                           "measured_speedup": figures["speedup"],
                           "matches_ar": figures["matches_ar"], "ties": figures["ties"], "answers": figures["answers"],
                           "mismatches": result["mismatches"]})
            tqdm.write(f"{args.draft} skip {skip[0]}:{skip[1]} g={g}: cd {cd:.2f}, cv {cv:.2f}, tau {figures['tau']:.2f}, "
                       f"predicted {points[-1]['predicted_speedup']:.2f}x, measured {figures['speedup']:.2f}x")
    model.set_heads(None)
    return points


def print_profile(points: list[dict], args, n_rows: int) -> None:
    print(f"\nSpeed model, {args.draft} draft, {n_rows} Spec-Bench prompts (at most {args.limit} per category), "
          f"{args.max_new_tokens} greedy tokens, {args.dtype}, {'compiled' if args.compile else 'eager'}. "
          f"{machine_line()}. cd, cv: the draft and verify step costs in AR steps (AR step "
          f"{statistics.median(p['step_ms']['ar'] for p in points):.1f} ms; each a median of 20).\n")
    print("| skip | layers skipped | g | cd | cv | acceptance per position | tau | predicted | measured | output == AR |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in points:
        print(f"| {p['skip'][0]}:{p['skip'][1]} | {p['skipped_layers']} | {p['gamma']} | {p['cd']:.2f} | {p['cv']:.2f} | "
              f"{' '.join(f'{a:.2f}' for a in p['acceptance'])} | {p['tau']:.2f} | {p['predicted_speedup']:.2f}x | "
              f"{p['measured_speedup']:.2f}x | {same_as_ar(p)} |")


def plot(points: list[dict], path: Path, title: str) -> None:
    """Predicted (dashed) and measured (solid) speedup against the number of skipped layers, one colour per g."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, g in enumerate(sorted({p["gamma"] for p in points})):
        mine = sorted((p for p in points if p["gamma"] == g), key=lambda p: p["skipped_layers"])
        x = [p["skipped_layers"] for p in mine]
        ax.plot(x, [p["measured_speedup"] for p in mine], "o-", color=f"C{i}", label=f"g = {g}, measured")
        ax.plot(x, [p["predicted_speedup"] for p in mine], "x--", color=f"C{i}", label=f"g = {g}, predicted")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("layers skipped by the draft")
    ax.set_ylabel("speedup over AR")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_row(args, fmt: str, rows: list[dict]) -> tuple[dict, list[dict]]:
    """One format's row of the --formats table and its mismatches (run in a process of its own)."""
    from model import load_heads

    dtype = fmt if fmt in DTYPES else args.dtype
    model, tok = load(args.checkpoint, torch.device(args.device), DTYPES[dtype])
    if fmt in quantize.MODES:
        quantize.quantize(model, fmt, args.groupsize)
    ppl = quantize.perplexity(model, tok.encode(quantize.PERPLEXITY_TEXT.read_text()))
    model.set_heads(load_heads(args.heads, model.config))
    run_args = argparse.Namespace(**{**vars(args), "methods": ["ar", "s3d"], "dtype": dtype, "skip": model.heads.skip})
    result = evaluate(run_args, model, tok, rows)
    report_mismatches(result["records"], result["mismatches"], dtype)
    row = {"format": f"{model.quantization} ({dtype} activations)" if model.quantization else dtype, "dtype": dtype,
           "perplexity": ppl, "memory_bytes": quantize.memory_breakdown(model), "process": os.getpid(),
           "ar": result["summary"]["ar"], "s3d": result["summary"]["s3d"]}
    return row, result["mismatches"]


def bench_formats(args) -> None:
    """One row per weight format (--formats): perplexity, AR and S3D speed, tau, memory, from one command. Each
    format runs in a fresh process: a process does not hand all the memory it used back to the system, so a
    format's peak memory would include what the formats before it left resident (BENCHMARKS.md, section 5)."""
    rows, table, mismatches = read_spec_bench(args.prompts, args.limit), [], []
    for fmt in args.formats:
        if fmt in quantize.MODES:
            quantize.check_supported(fmt, torch.device(args.device), args.groupsize)
    for fmt in args.formats:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh_process:
            row, row_mismatches = fresh_process.submit(format_row, args, fmt, rows).result()
        table.append(row)
        mismatches += row_mismatches
        ar, spec = row["ar"], row["s3d"]
        tqdm.write(f"{row['format']}: perplexity {row['perplexity']:.3f}, AR {ar['tokens_per_s']:.1f} tokens/s, S3D "
                   f"{spec['tokens_per_s']:.1f} tokens/s (tau {spec['tau']:.2f})")
    print(f"\nWeight formats, {len(rows)} Spec-Bench prompts (at most {args.limit} per category), {args.max_new_tokens} "
          f"greedy tokens, S3D with {args.heads.name}, "
          f"{'compiled' if args.compile else 'eager'}. Perplexity of {quantize.PERPLEXITY_TEXT.name}. {machine_line()}.\n")
    print("| weights | perplexity | weight memory | AR tokens/s | S3D tokens/s | S3D vs AR | tau | S3D == AR | "
          "peak memory (AR, S3D) | tokens/s per GiB (AR, S3D) |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        ar, spec = r["ar"], r["s3d"]
        print(f"| {r['format']} | {r['perplexity']:.3f} | {r['memory_bytes']['weights'] / 2**20:.0f} MiB | "
              f"{ar['tokens_per_s']:.1f} | {spec['tokens_per_s']:.1f} | {spec['speedup']:.2f}x | {spec['tau']:.2f} | "
              f"{same_as_ar(spec)} | {ar['peak_memory_gib']:.2f}, {spec['peak_memory_gib']:.2f} GiB | "
              f"{ar['tokens_per_s_per_gib']:.1f}, {spec['tokens_per_s_per_gib']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "args": jsonable(vars(args)), "formats": table,
                                         "mismatches": mismatches}, indent=1))
    if mismatches:
        raise Mismatch(f"{len(mismatches)} speculative answers differ from AR (listed above)")


def bench_speculative(args) -> None:
    from model import load_heads, new_heads

    model, tok = load(args.checkpoint, torch.device(args.device), DTYPES[args.dtype])
    if args.quantize:
        quantize.quantize(model, args.quantize, args.groupsize)
    rows = read_spec_bench(args.prompts, args.limit)
    if args.profile or args.sweep:
        if args.sweep and not args.skips and args.draft == "s3d" and not args.heads_files:
            raise UsageError("--sweep --draft s3d needs heads files (--heads A B ..., one per skip range): fresh "
                             "heads accept almost nothing; or sweep the training-free draft with --draft skip")
        points = profile(args, model, tok, rows)
        print_profile(points, args, len(rows))
        output = {"machine": machine_line(), "args": jsonable(vars(args)), "points": points,
                  "mismatches": [m for p in points for m in p["mismatches"]]}
        if args.sweep:
            best = max(points, key=lambda p: p["measured_speedup"])
            output["best"] = best
            flags = (f"--s3d {best['heads']}" if best["heads"] else f"--draft {best['draft']} --skip "
                     f"{best['skip'][0]}:{best['skip'][1]}") + f" --gamma {best['gamma']}"
            print(f"\nBest measured: skip {best['skip'][0]}:{best['skip'][1]}, g = {best['gamma']}, "
                  f"{best['measured_speedup']:.2f}x (predicted {best['predicted_speedup']:.2f}x): "
                  f"generate.py {flags}")
        if args.plot:
            plot(points, args.plot, f"{args.draft} draft, {model.config.name}; {machine_line()}")
            print(f"\nplot: {args.plot}", file=sys.stderr)
    else:
        draft_model = None
        if "s3d" in args.methods:
            heads = load_heads(args.heads, model.config) if args.heads else \
                new_heads(model, args.skip or middle_third(model.config.n_layer), args.gamma, 8)
            if args.gamma > heads.gamma:
                raise UsageError(f"--gamma {args.gamma} exceeds the {heads.gamma} tokens these heads draft")
            model.set_heads(heads)
            args.skip = args.skip or heads.skip
        args.skip = args.skip or middle_third(model.config.n_layer)
        if "model" in args.methods:
            if args.draft_checkpoint is None:
                raise UsageError("--methods model needs --draft_checkpoint")
            draft_model, _ = load(args.draft_checkpoint, torch.device(args.device), DTYPES[args.dtype])
        output = evaluate(args, model, tok, rows, draft_model)
        print_evaluation(output, args, len(rows))
        output = {"machine": machine_line(), "args": jsonable(vars(args))} | output
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(output, indent=1))
        print(f"per-prompt figures: {args.json}", file=sys.stderr)
    if output.get("mismatches"):
        raise Mismatch(f"{len(output['mismatches'])} speculative answers differ from AR (listed above)")


def jsonable(values: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) and v and
            isinstance(v[0], Path) else v for k, v in values.items()}


class Mismatch(Exception):
    """A greedy speculative answer differed from AR: exit code 1."""


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decode", action="store_true", help="decode tokens/s table: ours (eager, compiled) vs transformers")
    p.add_argument("--speculative", action="store_true", help="the Spec-Bench evaluation of --methods (the default)")
    p.add_argument("--profile", action="store_true", help="the speed model: step costs and acceptance for each "
                   "--skips range (or --heads file) and --gammas, predicted against measured speedup")
    p.add_argument("--sweep", action="store_true", help="--profile over a grid of skip ranges and g; prints and saves "
                   "the best")
    p.add_argument("--plot", type=Path, metavar="PNG", help="with --profile/--sweep: speedup against skipped layers")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every per-prompt figure here")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES), help="for --decode")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="default: bfloat16 on CUDA and for --quantize or --formats, else float32 (as generate.py)")
    p.add_argument("--max_new_tokens", "--tokens", type=int, default=128, help="new tokens per answer")
    p.add_argument("--repeats", type=int, default=3, help="for --decode")
    p.add_argument("--prompts", type=Path, default=Path("data/spec_bench_dev.jsonl"), help="Spec-Bench JSONL")
    p.add_argument("--limit", "--per_category", type=int, default=1, help="prompts per category")
    p.add_argument("--methods", nargs="+", default=["ar", "skip", "s3d"], choices=METHODS)
    p.add_argument("--heads", type=Path, nargs="+", default=None,
                   help="S3D heads file (default: fresh, untrained heads); --profile/--sweep take several")
    p.add_argument("--skip", type=skip_range, default=None, metavar="S:E",
                   help="skip range of the layer-skip draft and of fresh heads (default: the heads', or the middle third)")
    p.add_argument("--draft_checkpoint", type=Path, help="the small draft model of --methods model")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (outputs are then checked against AR)")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--draft", choices=["s3d", "skip"], default="s3d", help="for --profile/--sweep")
    p.add_argument("--skips", type=skip_range, nargs="+", metavar="S:E",
                   help="for --profile/--sweep (default: symmetric middle ranges)")
    p.add_argument("--gammas", type=int, nargs="+", default=[2, 4], help="for --profile/--sweep")
    p.add_argument("--quantize", choices=["int8", "int4"], help="quantize the weights (torchao, weight-only) first")
    p.add_argument("--formats", nargs="+", choices=["none", *DTYPES, *quantize.MODES], metavar="FORMAT",
                   help="a table of weight formats: float32, bfloat16, float16 (unquantized in that dtype), none "
                        "(unquantized, in --dtype), int8, int4 (activations in --dtype): perplexity, AR and S3D speed, "
                        "tau, memory")
    p.add_argument("--groupsize", type=int, default=128, help="int4: input weights per scale")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    if args.decode + args.speculative + (args.profile or args.sweep) > 1:
        p.error("choose one of --decode, --speculative (the default), --profile/--sweep")
    if "ar" not in args.methods:
        p.error("--methods needs ar: speedups are measured against it")
    if min([args.gamma, args.max_new_tokens, args.limit, *args.gammas]) < 1:
        p.error("--gamma, --gammas, --max_new_tokens and --limit must be at least 1")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.plot and not (args.profile or args.sweep):
        p.error("--plot goes with --profile or --sweep")
    args.methods = sorted(set(args.methods), key=METHODS.index)  # AR first (the reference), hf last (its own weights)
    args.heads_files = args.heads or []
    if len(args.heads_files) > 1 and not (args.profile or args.sweep):
        p.error("several --heads files go with --profile or --sweep")
    args.heads = args.heads_files[0] if args.heads_files else None
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") or args.quantize or args.formats
                                else "float32")
    if args.formats and (args.heads is None or args.profile or args.sweep or args.decode):
        p.error("--formats needs one --heads file (S3D runs with it in every format) and no other mode")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch._dynamo.config.cache_size_limit = 64  # a sweep compiles one draft per (skip, g): keep them all compiled
    if args.decode:
        bench_decode(args)
    elif args.formats:
        bench_formats(args)
    else:
        bench_speculative(args)


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, UsageError, ValueError, quantize.QuantizeError) as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Mismatch as e:
        print(f"bench.py: {e}", file=sys.stderr)
        sys.exit(1)
