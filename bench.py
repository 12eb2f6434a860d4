"""Benchmarks, written up in BENCHMARKS.md.

    python bench.py --decode            # decode tokens/s: ours eager and compiled, transformers, llama.cpp (make peers)
    python bench.py --methods ar s3d hf --heads H --limit 10 --json out.json     # Spec-Bench evaluation
    python bench.py --methods ar s3d llama.cpp --heads H --interleave     # S3D beside llama.cpp (make peers)
    python bench.py --methods ar s3d lookup --heads H --interleave --rounds 3   # each round's speedup, the median
    python bench.py --profile --heads A B --gammas 2 4 --plot speed.png   # the speed model: predicted vs measured
    python bench.py --sweep --draft skip --plot sweep.png                 # search skip ranges and g, keep the best
    python bench.py --sweep --heads H --gammas 4 --trees 4,2,2,1 3,2,1,1 2,1,1,1   # chain or tree: which is fastest
    python bench.py --formats float32 bfloat16 int8 --heads H             # weight formats: perplexity, speed, memory

The evaluation answers Spec-Bench prompts (multi-turn rows turn by turn) with every method in one process, after a
warm-up, and checks every greedy speculative answer against AR token for token. Every run prints the machine,
torch version and date with its table; a greedy answer that differs from AR's (beyond a tie) exits with code 1.
"""
import argparse
import copy
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

import checkpoint
import cli
import peers
import roofline
import s3d
from checkpoint import UsageError
from cli import DEFAULT_CHECKPOINT, DTYPES, machine_line
from heads import check_skip, load_heads, middle_third, new_heads, symmetric_skips
from spec_bench import first_difference, gap_in_ulps, is_tie, read_spec_bench, report_mismatches, same_as_ar

def bench_decode(args) -> list:
    """--decode: tokens/s of ours (eager, compiled), transformers and, when installed (`make peers`), llama.cpp on
    a GGUF of the same weights in the same precision, written from the GGUF the checkpoint came from (--gguf)."""
    gguf = peers.gguf_source(args)
    if not peers.llama_cpp_available():
        print("llama.cpp is not installed: `make peers` adds it to the table", file=sys.stderr)
    elif gguf is None:
        print("llama.cpp needs the GGUF this checkpoint was converted from: give it with --gguf", file=sys.stderr)
    rows = []
    for dtype_name in args.dtypes:
        dtype_rows, prompt_len = peers.decode_rates(args.checkpoint, torch.device(args.device), dtype_name,
                                                    args.max_new_tokens, args.repeats, gguf)
        rows += dtype_rows
    print(f"\nDecode speed, {args.max_new_tokens} greedy tokens after a chat prompt of {prompt_len} tokens, "
          f"median of {args.repeats} runs, {torch.get_num_threads()} threads. {machine_line()}.\n")
    print("| dtype | engine | tokens/s | vs transformers | |\n|---|---|---|---|---|")
    for dtype_name, name, median, *note in rows:
        hf_median = next(r[2] for r in rows if r[0] == dtype_name and r[1].startswith("transformers"))
        print(f"| {dtype_name} | {name} | {median:.1f} | {median / hf_median:.2f}x | {''.join(note)} |")
    return []


# ---------------------------------------------------------------------------------------------------------------
# Spec-Bench-style evaluation: every method answers the same prompts, turn by turn, in one process.

# lookup: the s3d draft, with drafts copied from the context wherever its last tokens occurred before
# (s3d.ContextLookup); adaptive: the same, with AR steps in place of the draft wherever they are faster (s3d.Pace)
SPECULATIVE = (*s3d.DRAFTERS, "adaptive", "lookup")
METHODS = ("ar", *SPECULATIVE, "hf", "llama.cpp")  # hf, llama.cpp: other engines on the same weights


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
            "matches_ar": sum(r["matches_ar"] for r in records), "ties": sum(map(is_tie, records)),
            "ar_steps": sum(r["ar_steps"] for r in records),
            "copied": sum(c for r in records for c in r["copied"]),
            "tau_copied": tau_where(records, True), "tau_drafted": tau_where(records, False)}


def tau_where(records: list[dict], copied: bool) -> Optional[float]:
    """tau over the iterations whose drafts were copied from the context (or were not); None where there are none."""
    accepted = [n for r in records for n, c in zip(r["accepted"], r["copied"]) if c == copied]
    return s3d.mean_tokens_per_iteration(accepted) if accepted else None


def evaluate(args, model, tok, rows: list[dict], drafts: dict[str, s3d.Draft],
             reference: Optional[list[dict]] = None) -> dict:
    """Runs every method of args.methods (the speculative ones with their drafts) over every row, turn by turn
    (method after method, or with args.interleave row after row, every method answering each row); returns
    per-prompt records and summaries (JSON-ready). Answers are compared with AR's, from this run or, when AR is not
    among the methods, from reference records."""
    device, hf, llm = model.output.weight.device, None, None
    sampling = s3d.Sampling(args.temperature, args.top_k, args.top_p)

    def run(method: str, prompt: list[int], warming: bool = False) -> s3d.Result:
        if method == "hf":
            return peers.hf_generate(hf, prompt, args.max_new_tokens, tok.eos_ids, sampling)
        if method == "llama.cpp":
            return peers.llama_cpp_generate(llm, prompt, args.max_new_tokens, tok.eos_ids, sampling)
        common = dict(sampling=sampling, eos_ids=tok.eos_ids, compile=args.compile)
        if method == "ar":
            return s3d.ar_generate(model, prompt, args.max_new_tokens, **common)
        # (a warm-up must compile the drafter: with context lookup, its run might copy every draft)
        draft = dataclasses.replace(drafts[method], lookup=0) if warming else drafts[method]
        return s3d.speculative_generate(model, prompt, args.max_new_tokens, draft, **common)

    # size the cache for the longest conversation now: growing it later would recompile inside the timed runs
    lengths = [len(tok.encode(tok.apply_chat_template([{"role": "user", "content": t} for t in r["turns"]])))
               + len(r["turns"]) * (args.max_new_tokens + 16) for r in rows]  # + each answer and its markup
    longest, gamma = max(lengths), max([d.gamma for d in drafts.values()], default=0)
    slots = max([d.slots for d in drafts.values()], default=1)
    if longest + slots > model.config.block_size:  # now, not when that prompt's turn comes
        row = rows[lengths.index(longest)]
        raise UsageError(f"question {row['question_id']} of {args.prompts} with its answers (about {longest} tokens) "
                         f"exceeds the model's context of {model.config.block_size}: lower --max_new_tokens or drop it")
    for m in [model] + [d.model for d in drafts.values() if d.model is not None]:
        s3d.prepare_cache(m, min(m.config.block_size, longest + slots))
    records, peaks = [], {}
    ar_answers = {(r["question_id"], r["turn"]): r["tokens"] for r in reference or []}

    def answer_row(method: str, row: dict, round_: int = 0) -> None:
        """The method's answers to the row's turns, one record per turn."""
        messages = []
        for turn, text in enumerate(row["turns"]):
            messages.append({"role": "user", "content": text})
            prompt = tok.encode(tok.apply_chat_template(messages))
            torch.manual_seed(args.seed)
            result = run(method, prompt)
            if method == "ar":
                ar_answers[(row["question_id"], turn)] = result.tokens
            ar_tokens = ar_answers[(row["question_id"], turn)]
            i = first_difference(result.tokens, ar_tokens) if result.tokens != ar_tokens else None
            gap = None if i is None or method not in SPECULATIVE or args.temperature > 0 or i >= len(result.tokens) \
                else gap_in_ulps(model, prompt, ar_tokens, i, result.tokens[i])
            records.append({"question_id": row["question_id"], "category": row["category"], "turn": turn,
                            "round": round_, "method": method, "prompt_tokens": len(prompt),
                            "new_tokens": len(result.tokens),
                            "decode_s": result.decode_time, "time_to_first_token_s": result.time_to_first_token,
                            "tokens_per_s": (len(result.tokens) - 1) / result.decode_time
                            if result.decode_time > 0 else None,
                            "iterations": len(result.accepted), "accepted": result.accepted,
                            "ar_steps": result.ar_steps, "copied": result.copied,
                            "paths": result.paths,
                            "tau": s3d.mean_tokens_per_iteration(result.accepted) if result.accepted else 1.0,
                            "matches_ar": i is None, "first_difference": i, "gap_ulps": gap,
                            "tokens": result.tokens})
            # greedy: the conversation goes on from AR's answer, so every turn is compared on AR's prompt
            # (after a tie, a method's own answer would make all its later turns differ)
            reply = ar_tokens if args.temperature == 0 else result.tokens
            messages.append({"role": "assistant", "content": tok.decode(reply, skip_special=True)})

    warm_up = tok.encode(tok.apply_chat_template([{"role": "user", "content": rows[0]["turns"][0]}]))

    def llama_cpp() -> object:  # (its GGUF, written into gguf_folder, must outlive it)
        return peers.llama_cpp_model(peers.gguf_source(args), args.quantize or args.dtype, min(model.config.block_size, longest + slots),
                                     Path(gguf_folder))

    with torch.no_grad(), tempfile.TemporaryDirectory() as gguf_folder:
        if args.interleave:
            # every method answers a row before the next row: a shared machine's changing load then slows all
            # methods alike, and the ratios to AR hold; the peak memory is that of all methods together
            hf = peers.transformers_copy(model) if "hf" in args.methods else None
            llm = llama_cpp() if "llama.cpp" in args.methods else None
            for method in args.methods:
                run(method, warm_up, warming=True)
            cli.return_freed_memory()
            cli.reset_peak_memory(device)
            for round_ in range(args.rounds):  # (--rounds: the whole evaluation again, its records marked with it)
                desc = " ".join(args.methods) + (f", round {round_ + 1} of {args.rounds}" if args.rounds > 1 else "")
                for row in tqdm(rows, desc=desc, unit="prompt"):
                    for method in args.methods:
                        answer_row(method, row, round_)
            peaks = dict.fromkeys(args.methods, cli.peak_memory_bytes(device))
        else:
            for n, method in enumerate(args.methods):
                if method == "hf":  # built only now, so that the other methods' peak memory does not include it
                    hf = peers.transformers_copy(model)
                if method == "llama.cpp":
                    llm = llama_cpp()
                if n > 0:  # the methods before this one: their compiled steps would count in this one's peak memory
                    s3d.release_compiled()
                run(method, warm_up, warming=True)
                cli.return_freed_memory()
                cli.reset_peak_memory(device)
                for row in tqdm(rows, desc=method, unit="prompt"):
                    answer_row(method, row)
                peaks[method] = cli.peak_memory_bytes(device)
    summary = {}
    for method in args.methods:
        mine, ar = [r for r in records if r["method"] == method], [r for r in records + (reference or []) if r["method"] == "ar"]
        figures = summarize(mine, ar, gamma)
        figures["peak_memory_gib"] = peaks[method] / 2**30
        figures["tokens_per_s_per_gib"] = figures["tokens_per_s"] / figures["peak_memory_gib"]
        if args.rounds > 1:  # tokens/s and the ratio to AR in each round, each from that round's answers alone
            rounds = [summarize([r for r in mine if r["round"] == k], [r for r in ar if r["round"] == k], gamma)
                      for k in range(args.rounds)]
            figures["round_tokens_per_s"] = [f["tokens_per_s"] for f in rounds]
            figures["round_speedups"] = [f["speedup"] for f in rounds]
            figures["median_speedup"] = statistics.median(figures["round_speedups"])
        figures["categories"] = {c: summarize([r for r in mine if r["category"] == c],
                                              [r for r in ar if r["category"] == c], gamma)
                                 for c in dict.fromkeys(r["category"] for r in mine)}
        summary[method] = figures
    mismatches = [{k: r[k] for k in ("method", "question_id", "category", "turn", "first_difference", "gap_ulps")}
                  for r in records if r["method"] in SPECULATIVE and not r["matches_ar"] and not is_tie(r)]
    return {"records": records, "summary": summary, "mismatches": mismatches if args.temperature == 0 else []}


def method_label(method: str, args, drafts: dict[str, s3d.Draft]) -> str:
    d = drafts.get(method)
    if method in ("s3d", "adaptive", "lookup"):
        tree = f", tree {d.tree} ({len(d.tree) - 1} nodes)" if d.tree else ""
        adaptive = ", adaptive" if d.adaptive else ""
        lookup = f", context lookup {s3d.LOOKUP_SHORTEST}-{d.lookup}" if d.lookup else ""
        return f"s3d {args.heads.name if args.heads else 'untrained'} {d.skip[0]}:{d.skip[1]}{tree}{adaptive}{lookup}"
    if method == "skip":
        return f"skip {d.skip[0]}:{d.skip[1]}"
    if method == "model":
        return f"model {args.draft_checkpoint.name}"
    if method == "llama.cpp":
        return f"llama.cpp {peers.GGUF_TYPES[args.quantize or args.dtype]}"
    return {"ar": "ar (ours, compiled)" if args.compile else "ar (ours, eager)", "hf": "transformers generate()"}[method]


INTERLEAVED = ", AR and the other methods in turn on each prompt (--interleave)"


def table_row(label: str, f: dict, args) -> str:
    rates = " ".join(f"{a:.2f}" for a in f["acceptance"]) or "-"
    return f"| {label} | {f['tau']:.2f} | {rates} | {f['tokens_per_s']:.1f} | {f['speedup']:.2f}x | {output_column(f, args)} |"


def output_column(f: dict, args) -> str:
    """The tables' 'output == AR': greedy, how many answers are AR's (or left it at a tie); sampled, a speculative
    answer is not AR's token for token but drawn from the same distribution (tests/test_s3d.py checks that)."""
    return same_as_ar(f) if args.temperature == 0 else "- (sampled)"


def per_category(args) -> str:
    """'at most 2 per category', naming the categories where --categories chose some."""
    return f"at most {args.limit} per category" + (f" of {', '.join(args.categories)}" if args.categories else "")


def sampling_mode(args) -> str:
    return "greedy" if args.temperature == 0 else f"temperature {args.temperature}"


def print_evaluation(result: dict, args, n_rows: int, drafts: dict[str, s3d.Draft]) -> None:
    turns = sum(1 for r in result["records"] if r["method"] == "ar" and r["round"] == 0)
    mode = sampling_mode(args)
    rounds = f", {args.rounds} rounds (every figure below is of all of them)" if args.rounds > 1 else ""
    print(f"\n{n_rows} Spec-Bench prompts ({turns} turns, {per_category(args)}) from {args.prompts}, "
          f"{args.max_new_tokens} new tokens, {mode}, g={args.gamma}, "
          f"{f'{args.quantize} weights, {args.dtype} activations' if args.quantize else args.dtype}, "
          f"{'compiled' if args.compile else 'eager'}{INTERLEAVED * args.interleave}{rounds}. {machine_line()}.\n")
    print("| method | tau | acceptance per position | tokens/s | vs AR | output == AR | peak memory | tokens/s per GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for method, f in result["summary"].items():
        print(f"{table_row(method_label(method, args, drafts), f, args)} {f['peak_memory_gib']:.2f} GiB | "
              f"{f['tokens_per_s_per_gib']:.1f} |")
    if "llama.cpp" in result["summary"]:  # the best a CPU user could run instead, on the same prompts
        peer = result["summary"]["llama.cpp"]["tokens_per_s"]
        print(f"\nAgainst {method_label('llama.cpp', args, drafts)}'s tokens/s on the same prompts: " + ", ".join(
            f"{method_label(m, args, drafts)} {f['tokens_per_s'] / peer:.2f}x"
            for m, f in result["summary"].items() if m not in ("llama.cpp", "hf")))
    if args.rounds > 1:  # the spell of a shared machine moves the ratios from one round to the next
        summary = result["summary"]
        print("\nEach round alone, tokens/s and against AR:\n")
        print("| round | " + " | ".join(method_label(m, args, drafts) for m in summary) + " |")
        print("|---" * (len(summary) + 1) + "|")
        for k in range(args.rounds):
            print(f"| {k + 1} | " + " | ".join(f"{f['round_tokens_per_s'][k]:.1f}" + (
                f", {f['round_speedups'][k]:.2f}x" if m != "ar" else "") for m, f in summary.items()) + " |")
        print("| median | " + " | ".join("" if m == "ar" else f"**{f['median_speedup']:.2f}x**"
                                         for m, f in summary.items()) + " |")
    for method, f in result["summary"].items():
        if f["ar_steps"]:
            print(f"\n{method_label(method, args, drafts)}: {f['ar_steps']} of its {f['new_tokens']} tokens "
                  f"({100 * f['ar_steps'] / f['new_tokens']:.0f} %) came from AR steps taken instead of iterations")
        if f["copied"]:
            iterations = sum(len(r["accepted"]) for r in result["records"] if r["method"] == method)
            drafted = f", {f['tau_drafted']:.2f} where the draft ran" if f["tau_drafted"] is not None else ""
            print(f"\n{method_label(method, args, drafts)}: {f['copied']} of its {iterations} iterations "
                  f"({100 * f['copied'] / iterations:.0f} %) copied their drafts from the context, with no draft "
                  f"forward (tau {f['tau_copied']:.2f} there{drafted})")
    for method, f in result["summary"].items():
        if method != "ar" and len(f["categories"]) > 1:
            print(f"\nPer category, {method_label(method, args, drafts)} against AR on the same prompts:\n")
            print("| category | tau | acceptance per position | tokens/s | vs AR | output == AR |\n|---|---|---|---|---|---|")
            for category, c in f["categories"].items():
                print(table_row(category, c, args))
    report_mismatches(result["records"], result["mismatches"], args.dtype)


# ---------------------------------------------------------------------------------------------------------------
# The speed model (docs/design.md, section 4): step costs, acceptance, predicted against measured speedup.


def decoding_position(records: list[dict], method: str) -> int:
    """Where the speed model times the steps: the median over method's answers of the position halfway through
    the answer (its prompt's tokens, earlier turns included, and half its new tokens)."""
    return int(statistics.median(r["prompt_tokens"] + r["new_tokens"] // 2 for r in records if r["method"] == method))


def profile(args, model, tok, rows: list[dict]) -> list[dict]:
    """For every (skip range, g) of the grid, as a chain and as each tree of --trees that is g deep: the acceptance
    per position and measured speedup on the prompts, cd and cv in AR steps (timed after all the points have run, in
    rounds over them: roofline.costs_in_rounds), and the speed model's prediction. For
    each g the biggest tree runs first; its node rates predict tau of the smaller trees inside it and of the chain,
    whose own runs then check the prediction (a draft with nodes outside it is predicted by its own figures, as the
    first is)."""
    n_layer = model.config.n_layer
    skips = [check_skip(skip, n_layer) for skip in args.skips] if args.skips else symmetric_skips(n_layer)
    if args.draft == "skip":
        configs = [(None, skip) for skip in skips]
    elif args.heads_files:
        configs = [(load_heads(h, model.config), h) for h in args.heads_files]
    else:  # fresh heads: for trying the machinery; their acceptance is that of untrained heads
        configs = [(new_heads(model, skip, max(args.gammas), 8), None) for skip in skips]
    # AR once, first; or with --interleave beside every point, so that each measured ratio is of one stretch of time
    ar = None if args.interleave else evaluate(argparse.Namespace(**{**vars(args), "methods": ["ar"]}), model, tok, rows, {})
    points, steps = [], []  # steps: each point's heads and step calls
    for heads, source in configs:
        skip = heads.skip if heads is not None else source
        model.set_heads(heads)
        for g in [g for g in args.gammas if heads is None or g <= heads.gamma]:
            trees = sorted((t for t in args.trees if t.depth == g), key=len, reverse=True) if args.draft == "s3d" else []
            rates = None  # the biggest tree's node rates
            queue = [*trees, None]
            while queue:
                tree = queue.pop(0)
                draft = s3d.Draft(args.draft, tree.depth if tree else g, skip, tree=tree,  # (a best tree: maybe less deep)
                                  int8=cli.DRAFT_WEIGHTS[args.draft_weights] if args.draft == "s3d" else None)
                run_args = argparse.Namespace(**{**vars(args), "methods": ["ar"] * args.interleave + [args.draft]})
                result = evaluate(run_args, model, tok, rows, {args.draft: draft}, reference=ar and ar["records"])
                figures = result["summary"][args.draft]
                report_mismatches(result["records"], result["mismatches"], args.dtype)
                # timed where these answers were decoded: attention's work grows with the context, so a step costs
                # more AR steps after a long prompt (BENCHMARKS.md, section 30)
                position = decoding_position(result["records"], args.draft)
                calls = roofline.step_calls(model, draft, args.compile, position)
                roofline.loop_ms(calls, 1)  # compiled now, with these heads attached; timed after the last point
                steps.append((model.heads, calls))
                own = tree or s3d.top_k_tree((1,) * g)
                # its own figures predict a draft's tau where no bigger tree's node rates cover it (as the chain's
                # acceptance does)
                own_prediction = figures["tau"] if tree else s3d.expected_tokens_per_iteration(figures["acceptance"])
                if rates is None:  # the first of this g
                    paths = [p for r in result["records"] for p in r["paths"]]
                    rates = s3d.node_rates(own, paths) if tree else None
                    predicted_tau = own_prediction
                    if tree:  # and its rates choose the best trees of --best_trees nodes inside it, run next
                        queue[:0] = [s3d.best_tree(rates, n) for n in args.best_trees if n < len(tree) - 1]
                elif all(node in rates for node in own.nodes[1:]):
                    predicted_tau = s3d.expected_tree_tokens(own, rates)
                else:  # a draft with nodes the first tree lacks, whose rates it has not
                    predicted_tau = own_prediction
                points.append({"draft": args.draft, "heads": str(source) if heads is not None and source else None,
                               "skip": list(skip), "skipped_layers": skip[1] - skip[0], "gamma": draft.gamma,
                               "tree": str(tree) if tree else None, "nodes": len(own) - 1, "position": position,
                               "acceptance": figures["acceptance"], "tau": figures["tau"], "predicted_tau": predicted_tau,
                               "measured_speedup": figures["speedup"], "matches_ar": figures["matches_ar"],
                               "ties": figures["ties"], "answers": figures["answers"], "mismatches": result["mismatches"]})
                tqdm.write(f"{args.draft} skip {skip[0]}:{skip[1]} g={draft.gamma}{f' tree {tree}' if tree else ''}: "
                           f"tau {figures['tau']:.2f} (predicted {predicted_tau:.2f}), measured {figures['speedup']:.2f}x")
    # the step costs of all points in rounds, so that the machine's slow spells hit them alike
    for point, costs in zip(points, roofline.costs_in_rounds(model, steps)):
        cd, cv = costs["draft"] / costs["ar"], costs["verify"] / costs["ar"]
        point.update(cd=cd, cv=cv, step_ms=costs, predicted_speedup=point["predicted_tau"] / (cd + cv))
    model.set_heads(None)
    return points


def print_profile(points: list[dict], args, n_rows: int) -> None:
    # sampled, whether a node is accepted depends on its siblings (the rejection rule): node rates predict greedy tau
    sampled = (" (the points after the biggest tree: predicted tau from its node rates, exact only greedy)"
               if args.temperature > 0 and args.trees else "")
    print(f"\nSpeed model, {args.draft} draft, {n_rows} Spec-Bench prompts ({per_category(args)}), "
          f"{args.max_new_tokens} new tokens, {sampling_mode(args)}{sampled}, {args.dtype}, "
          f"{'compiled' if args.compile else 'eager'}"
          f"{INTERLEAVED * args.interleave}. {machine_line()}. cd, cv: the draft and verify step costs in AR steps (AR step "
          f"{statistics.median(p['step_ms']['ar'] for p in points):.1f} ms; timed after the runs, in {roofline.COST_ROUNDS} "
          f"rounds over the points), at position "
          f"{statistics.median(p['position'] for p in points):.0f} (the median middle of the answers).\n")
    several = len({p["heads"] for p in points}) > 1  # then a column says which heads file each row measured
    print(f"|{' heads |' * several} skip | layers skipped | g | tree (nodes) | cd | cv | acceptance per position "
          "| tau (predicted) | predicted | measured | output == AR |")
    print("|---" * (11 + several) + "|")
    for p in points:
        tree = f"{p['tree']} ({p['nodes']})" if p.get("tree") else "chain"
        heads = f"| {Path(p['heads'] or 'untrained').name} " if several else ""
        print(f"{heads}| {p['skip'][0]}:{p['skip'][1]} | {p['skipped_layers']} | {p['gamma']} | {tree} | {p['cd']:.2f} | "
              f"{p['cv']:.2f} | {' '.join(f'{a:.2f}' for a in p['acceptance'])} | {p['tau']:.2f} "
              f"({p['predicted_tau']:.2f}) | {p['predicted_speedup']:.2f}x | {p['measured_speedup']:.2f}x | {output_column(p, args)} |")


def plot(points: list[dict], path: Path, title: str) -> None:
    """Predicted (dashed) and measured (solid) speedup against the number of skipped layers, one colour per g."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, g in enumerate(sorted({p["gamma"] for p in points})):
        mine = sorted((p for p in points if p["gamma"] == g and not p.get("tree")), key=lambda p: p["skipped_layers"])
        x = [p["skipped_layers"] for p in mine]
        ax.plot(x, [p["measured_speedup"] for p in mine], "o-", color=f"C{i}", label=f"g = {g}, measured")
        ax.plot(x, [p["predicted_speedup"] for p in mine], "x--", color=f"C{i}", label=f"g = {g}, predicted")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("layers skipped by the draft")
    ax.set_ylabel("speedup over AR")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with checkpoint.written_then_renamed(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def bench_roofline(args) -> list:
    """--roofline: the machine's bandwidth and arithmetic, then each compiled step at --context: its time, the bytes
    it must read, its memory-bound floor, and where the time goes."""
    import torch._inductor.config as inductor

    inductor.cpp.enable_kernel_profile = True  # each generated kernel then shows in the profiler under its name
    device = torch.device(args.device)
    model, _ = cli.load(args.checkpoint, device, DTYPES[args.dtype])
    if args.quantize:
        checkpoint.quantize(model, args.quantize, args.groupsize)
    n_layer, g = model.config.n_layer, args.gamma
    slots = max([g + 1] + [len(tree) for tree in args.trees])  # the most tokens a step writes to the cache
    if args.context + slots > model.config.block_size:
        raise UsageError(f"--context {args.context} does not fit the model's context of {model.config.block_size} tokens")
    s3d.prepare_cache(model, args.context + slots)
    flops = {dt: roofline.matmul_throughput(DTYPES[dt], device) for dt in ("float32", "bfloat16")}
    call_us = roofline.linear_call_us(DTYPES[args.dtype], device)
    # the heads' draft as decoding runs it (int8 copies of its layers where that is the default), the same with the
    # target's weights, with the adapters not folded into the weights (CPU), without their draft vocabulary if they
    # have one, and the draft without adapters (rank 0); fresh heads cost what trained ones do
    given = load_heads(args.heads, model.config) if args.heads else new_heads(model, middle_third(n_layer), g, 8)
    fold = device.type == "cpu"
    model.set_heads(given)
    int8 = s3d.int8_draft(model, s3d.Draft("s3d", g, given.skip, int8=cli.DRAFT_WEIGHTS[args.draft_weights]), True)
    heads = [(given, fold, int8)]
    if int8:  # the same heads on the target's weights
        heads.append((copy.deepcopy(given), fold, False))
    if fold and given.rank:
        heads.append((new_heads(model, given.skip, given.gamma, given.rank, given.draft_vocab), False, False))
    if given.draft_vocab is not None:
        heads.append((new_heads(model, given.skip, given.gamma, given.rank), fold, False))
    heads.append((new_heads(model, given.skip, given.gamma, 0), fold, False))
    rows, bandwidth = roofline.measure_steps(model, heads, args.context, trees=args.trees)
    ar_ms = rows[0]["ms"]
    weights = f"{model.quantization} weights, {args.dtype} activations" if model.quantization else args.dtype
    print(f"\nRoofline, {model.config.name} in {weights}, compiled, context {args.context}. {machine_line()}. "
          f"Read bandwidth {bandwidth:.1f} GB/s (sum of a float32 buffer beyond the last-level cache, a median over "
          f"the rounds that time the steps); matmul "
          f"{flops['float32']:.3g} GFLOP/s in float32, {flops['bfloat16']:.3g} in bfloat16. Floor: the bytes a step "
          f"must read at that bandwidth. Times are medians of 30 calls, split by each kind's share of 10 profiled "
          f"calls. A compiled linear map costs {call_us:.1f} us a call with next to nothing to do (a chain of 64 x 64 "
          f"maps): the GEMM calls' fixed cost is their number times that.\n")
    kinds = list(rows[0]["parts_ms"])
    print(f"| step | ms | AR steps | MB read | floor ms | % of floor | {' | '.join(kinds)} | GEMM calls (fixed cost ms) |")
    print("|---|---|---|---|---|---|" + "---|" * (len(kinds) + 1))
    for r in rows:
        print(f"| {r['step']} | {r['ms']:.2f} | {r['ms'] / ar_ms:.2f} | {sum(r['bytes'].values()) / 1e6:.0f} | "
              f"{r['floor_ms']:.2f} | {100 * r['floor_ms'] / r['ms']:.0f} % | "
              + " | ".join(f"{r['parts_ms'][k]:.2f}" for k in kinds)
              + f" | {r['gemm_calls']} ({r['gemm_calls'] * call_us / 1000:.2f}) |")
    print("\nAbove the floor: each part's milliseconds less what its bytes take at the read bandwidth (the linear maps' "
          "weights and adapters, the output head's rows, the KV cache; other kernels and time outside the kernels "
          "read none of these), which add up to the step's time above its floor.\n")
    print(f"| step | ms above the floor | {' | '.join(kinds)} |")
    print("|---|---|" + "---|" * len(kinds))
    for r in rows:
        print(f"| {r['step']} | {r['ms'] - r['floor_ms']:.2f} | "
              + " | ".join(f"{r['parts_ms'][k] - r['parts_floor_ms'][k]:.2f}" for k in kinds) + " |")
    write_json(args, {"machine": machine_line(), "args": vars(args), "bandwidth_gb_s": bandwidth,
                      "matmul_gflop_s": flops, "linear_call_us": call_us, "steps": rows})
    return []


def bench_random_weights(args) -> list:
    """--random_weights SHAPE: the AR, verify and draft steps of a published shape with random weights in each of
    --formats; AR tokens/s, the bandwidth it achieves against the device's, and the speedups the costs predict."""
    device = torch.device(args.device)
    bandwidth = roofline.read_bandwidth(roofline.read_buffer(device))
    rows = roofline.random_weights_bench(args.random_weights, device, args.formats or ["bfloat16"], args.context,
                                         args.skips, args.gammas, args.compile)
    rates = (0.5, 0.6, 0.7, 0.8, 0.9)
    print(f"\n{args.random_weights}, random weights, {'compiled' if args.compile else 'eager'}, context {args.context}. "
          f"{machine_line()}. Read bandwidth {bandwidth:.0f} GB/s. Step costs in AR steps; predicted speedup for a "
          f"uniform acceptance a per position: {', '.join(map(str, rates))}.\n")
    print("| format | AR ms | tokens/s | GB/s (% of read bandwidth) | step | AR steps | predicted speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ms, moved = r["ms"], sum(r["bytes"].values())
        r["gb_s"] = moved / ms["ar"] / 1e6
        head = f"| {r['format']} | {ms['ar']:.2f} | {1000 / ms['ar']:.1f} | {r['gb_s']:.0f} ({100 * r['gb_s'] / bandwidth:.0f} %) |"
        for name in (n for n in ms if n.startswith("draft")):
            g = int(name[5:].split()[0])
            cd, cv = ms[name] / ms["ar"], ms[f"verify{g + 1}"] / ms["ar"]
            r.setdefault("predicted", {})[name] = [s3d.predicted_speedup([a] * g, cd, cv) for a in rates]
            print(f"{head} {name} + verify{g + 1} | {cd:.2f} + {cv:.2f} | "
                  f"{' '.join(f'{x:.2f}x' for x in r['predicted'][name])} |")
            head = "| | | | |"
    write_json(args, {"machine": machine_line(), "args": vars(args), "bandwidth_gb_s": bandwidth, "formats": rows})
    return []


def format_row(args, fmt: str, rows: list[dict]) -> tuple[dict, list[dict]]:
    """One format's row of the --formats table and its mismatches (run in a process of its own)."""
    dtype = fmt if fmt in DTYPES else args.dtype
    model, tok = cli.load(args.checkpoint, torch.device(args.device), DTYPES[dtype])
    if fmt in checkpoint.QUANTIZATIONS:
        checkpoint.quantize(model, fmt, args.groupsize)
    ppl = cli.perplexity(model, tok.encode(cli.PERPLEXITY_TEXT.read_text()))
    draft = cli.make_draft(model, "s3d", args.gamma, heads=args.heads)
    result = evaluate(argparse.Namespace(**{**vars(args), "methods": ["ar", "s3d"], "dtype": dtype}), model, tok, rows,
                      {"s3d": draft})
    report_mismatches(result["records"], result["mismatches"], dtype)
    row = {"format": f"{model.quantization} ({dtype} activations)" if model.quantization else dtype, "dtype": dtype,
           "perplexity": ppl, "memory_bytes": checkpoint.memory_breakdown(model), "process": os.getpid(),
           "ar": result["summary"]["ar"], "s3d": result["summary"]["s3d"]}
    return row, result["mismatches"]


def bench_formats(args) -> list[dict]:
    """One row per weight format (--formats): perplexity, AR and S3D speed, tau, memory, from one command. Each
    format runs in a fresh process: a process does not hand all the memory it used back to the system, so a
    format's peak memory would include what the formats before it left resident (BENCHMARKS.md, section 5)."""
    rows, table, mismatches = read_spec_bench(args.prompts, args.limit, args.categories), [], []
    for fmt in args.formats:
        if fmt in checkpoint.QUANTIZATIONS:
            checkpoint.check_quantization(fmt, torch.device(args.device), args.groupsize)
    for fmt in args.formats:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh_process:
            row, row_mismatches = fresh_process.submit(format_row, args, fmt, rows).result()
        table.append(row)
        mismatches += row_mismatches
        ar, spec = row["ar"], row["s3d"]
        tqdm.write(f"{row['format']}: perplexity {row['perplexity']:.3f}, AR {ar['tokens_per_s']:.1f} tokens/s, S3D "
                   f"{spec['tokens_per_s']:.1f} tokens/s (tau {spec['tau']:.2f})")
    print(f"\nWeight formats, {len(rows)} Spec-Bench prompts ({per_category(args)}), {args.max_new_tokens} "
          f"greedy tokens, S3D with {args.heads.name}, {'compiled' if args.compile else 'eager'}"
          f"{INTERLEAVED * args.interleave}. Perplexity of "
          f"{cli.PERPLEXITY_TEXT.name}. {machine_line()}.\n")
    print("| weights | perplexity | weight memory | AR tokens/s | S3D tokens/s | S3D vs AR | tau | S3D == AR | "
          "peak memory (AR, S3D) | tokens/s per GiB (AR, S3D) |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        ar, spec = r["ar"], r["s3d"]
        print(f"| {r['format']} | {r['perplexity']:.3f} | {r['memory_bytes']['weights'] / 2**20:.0f} MiB | "
              f"{ar['tokens_per_s']:.1f} | {spec['tokens_per_s']:.1f} | {spec['speedup']:.2f}x | {spec['tau']:.2f} | "
              f"{same_as_ar(spec)} | {ar['peak_memory_gib']:.2f}, {spec['peak_memory_gib']:.2f} GiB | "
              f"{ar['tokens_per_s_per_gib']:.1f}, {spec['tokens_per_s_per_gib']:.1f} |")
    write_json(args, {"machine": machine_line(), "args": vars(args), "formats": table, "mismatches": mismatches})
    return mismatches


def bench_speculative(args) -> list[dict]:
    model, tok = cli.load(args.checkpoint, torch.device(args.device), DTYPES[args.dtype])
    if args.quantize:
        checkpoint.quantize(model, args.quantize, args.groupsize)
    rows = read_spec_bench(args.prompts, args.limit, args.categories)
    if args.profile or args.sweep:
        if args.sweep and not args.skips and args.draft == "s3d" and not args.heads_files:
            raise UsageError("--sweep --draft s3d needs heads files (--heads A B ..., one per skip range): fresh "
                             "heads accept almost nothing; or sweep the training-free draft with --draft skip")
        points = profile(args, model, tok, rows)
        print_profile(points, args, len(rows))
        output = {"machine": machine_line(), "args": vars(args), "points": points,
                  "mismatches": [m for p in points for m in p["mismatches"]]}
        if args.sweep:
            best = output["best"] = max(points, key=lambda p: p["measured_speedup"])
            flags = (f"--s3d {best['heads']}" if best["heads"] else f"--draft {best['draft']} --skip "
                     f"{best['skip'][0]}:{best['skip'][1]}") + (f" --tree {best['tree']}" if best["tree"] else
                                                                  f" --gamma {best['gamma']}")
            shape = f"tree {best['tree']}, " if best["tree"] else ""
            print(f"\nBest measured: skip {best['skip'][0]}:{best['skip'][1]}, g = {best['gamma']}, {shape}"
                  f"{best['measured_speedup']:.2f}x (predicted {best['predicted_speedup']:.2f}x): generate.py {flags}")
        if args.plot:
            plot(points, args.plot, f"{args.draft} draft, {model.config.name}; {machine_line()}")
            print(f"\nplot: {args.plot}", file=sys.stderr)
    else:
        drafts = {}
        for kind in [m for m in args.methods if m in SPECULATIVE]:
            skip = args.skip or (drafts["s3d"].skip if "s3d" in drafts else None)  # skip draws on the heads' range
            if kind in ("adaptive", "lookup"):  # the s3d method's draft, or the one it would have
                base = drafts.get("s3d") or cli.make_draft(model, "s3d", args.gamma, skip, args.heads, 8, None, args.tree,
                                                           args.draft_weights)
                lookup = args.lookup if base.tree is None else 0  # (adaptive: with the lookup, as generate.py's)
                drafts[kind] = dataclasses.replace(base, lookup=lookup, adaptive=kind == "adaptive")
                continue
            drafts[kind] = cli.make_draft(model, kind, args.gamma, skip, args.heads, 8, args.draft_checkpoint,
                                          *((args.tree, args.draft_weights) if kind == "s3d" else ()))
        output = evaluate(args, model, tok, rows, drafts)
        print_evaluation(output, args, len(rows), drafts)
        output = {"machine": machine_line(), "args": vars(args)} | output
    write_json(args, output)
    return output["mismatches"]


def write_json(args, output: dict) -> None:
    if args.json:
        with checkpoint.written_then_renamed(args.json) as tmp:
            tmp.write_text(json.dumps(output, indent=1, default=str))  # Paths as text
        print(f"per-prompt figures: {args.json}", file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--roofline", action="store_true", help="the machine's bandwidth, and each compiled step's time "
                   "against its memory-bound floor, split by kernel kind (at --context, --dtype, --gamma, --heads)")
    p.add_argument("--random_weights", choices=list(roofline.SHAPES), metavar="SHAPE", help="step costs of a "
                   f"published shape with random weights in --formats ({', '.join(roofline.SHAPES)})")
    p.add_argument("--context", type=int, default=512, help="for --roofline, --random_weights: the position of the steps")
    p.add_argument("--decode", action="store_true", help="decode tokens/s table: ours (eager, compiled) vs transformers")
    p.add_argument("--speculative", action="store_true", help="the Spec-Bench evaluation of --methods (the default)")
    p.add_argument("--profile", action="store_true", help="the speed model: step costs and acceptance for each "
                   "--skips range (or --heads file) and --gammas, predicted against measured speedup")
    p.add_argument("--sweep", action="store_true", help="--profile over a grid of skip ranges and g; prints and saves "
                   "the best")
    p.add_argument("--plot", type=Path, metavar="PNG", help="with --profile/--sweep: speedup against skipped layers")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every per-prompt figure here")
    p.add_argument("--force", action="store_true", help="replace --json and --plot files that exist")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gguf", type=Path, help="for --decode and --methods llama.cpp: the GGUF the checkpoint was "
                   "converted from, for llama.cpp (default: the embedded model's)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES), help="for --decode")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bfloat16 on GPUs, for --quantize or --formats, on CPUs with native bf16 and compiled "
                        "on other CPUs, else float32 (as generate.py)")
    p.add_argument("--max_new_tokens", "--tokens", type=int, default=128, help="new tokens per answer")
    p.add_argument("--repeats", type=int, default=3, help="for --decode")
    p.add_argument("--rounds", type=int, default=1, help="with --interleave: the evaluation this many times in one "
                   "process, and each method's speedup over AR in every round and their median")
    p.add_argument("--prompts", type=Path, default=Path("data/spec_bench_dev.jsonl"), help="Spec-Bench JSONL")
    p.add_argument("--limit", "--per_category", type=int, default=1, help="prompts per category")
    p.add_argument("--categories", nargs="+", default=None, metavar="CATEGORY",
                   help="only these categories of --prompts (summarization has the longest prompts: 650 tokens, "
                        "the median of the dev set's)")
    p.add_argument("--methods", nargs="+", default=["ar", "skip", "s3d"], choices=METHODS,
                   help="lookup: the s3d draft, with drafts copied from the context wherever they can be (--lookup); "
                        "adaptive: the same, with AR steps in place of the draft wherever they have been faster "
                        "(generate.py --adaptive); "
                        "hf: transformers' generate(); llama.cpp: llama.cpp on a GGUF of the same weights (make peers)")
    p.add_argument("--heads", type=Path, nargs="+", default=None,
                   help="S3D heads file (default: fresh, untrained heads); --profile/--sweep take several")
    p.add_argument("--skip", type=cli.skip_range, default=None, metavar="S:E",
                   help="skip range of the layer-skip draft and of fresh heads (default: the heads', or the middle third)")
    p.add_argument("--draft_checkpoint", type=Path, help="the small draft model of --methods model")
    p.add_argument("--gamma", type=int, default=None, help="tokens drafted per iteration (default: --tree's depth, or 4)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (outputs are then checked against AR)")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--draft", choices=["s3d", "skip"], default="s3d", help="for --profile/--sweep")
    p.add_argument("--skips", type=cli.skip_range, nargs="+", metavar="S:E",
                   help="for --profile/--sweep (default: symmetric middle ranges)")
    p.add_argument("--gammas", type=int, nargs="+", default=[2, 4], help="for --profile/--sweep")
    p.add_argument("--lookup", type=int, default=s3d.LOOKUP_LONGEST, metavar="N",
                   help="for --methods lookup: copy the drafts from after the latest earlier occurrence of the last N "
                        f"tokens (down to {s3d.LOOKUP_SHORTEST}), where there is one (generate.py --lookup)")
    p.add_argument("--tree", type=cli.tree_shape, metavar="K1,K2,..", help="the s3d method verifies this tree of "
                   "candidates (generate.py --tree); its depth is g")
    p.add_argument("--draft_weights", choices=list(cli.DRAFT_WEIGHTS), default="auto", help=cli.DRAFT_WEIGHTS_HELP)
    p.add_argument("--trees", type=cli.tree_shape, nargs="+", default=[], metavar="K1,K2,..",
                   help="for --profile/--sweep with the s3d draft: these trees too, beside the chain, at each g of "
                        "--gammas their depth equals; for --roofline: the verify step of each")
    p.add_argument("--best_trees", type=int, nargs="+", default=[], metavar="N",
                   help="for --profile/--sweep with --trees: at each g, the trees of N nodes that the biggest tree's "
                        "node rates say accept the most (s3d.best_tree; each printed as a --tree value), run after it")
    p.add_argument("--quantize", choices=checkpoint.QUANTIZATIONS, help="quantize the weights (torchao, weight-only) first")
    p.add_argument("--formats", nargs="+", choices=["none", *DTYPES, *checkpoint.QUANTIZATIONS], metavar="FORMAT",
                   help="a table of weight formats: float32, bfloat16, float16 (unquantized in that dtype), none "
                        "(unquantized, in --dtype), int8, int4 (activations in --dtype): perplexity, AR and S3D speed, "
                        "tau, memory")
    p.add_argument("--groupsize", type=int, default=128, help="int4: input weights per scale")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--interleave", action="store_true", help="run the methods one after another on each prompt, not "
                   "one after another over all prompts: on a machine whose load changes, the ratios to AR then hold "
                   "(the peak memory is that of all methods together); with --profile/--sweep, AR runs beside each point")
    args = p.parse_args(argv)
    args.device = str(cli.resolve_device(args.device))
    if args.roofline + args.decode + args.speculative + (args.profile or args.sweep) + bool(args.random_weights) > 1:
        p.error("choose one of --roofline, --random_weights, --decode, --speculative (the default), --profile/--sweep")
    if "ar" not in args.methods:
        p.error("--methods needs ar: speedups are measured against it")
    g = cli.tree_gamma(args.tree, args.gamma)
    args.gamma = 4 if g is None else g
    if min([args.gamma, args.max_new_tokens, args.limit, args.repeats, args.rounds, args.context, *args.gammas]) < 1:
        p.error("--gamma, --gammas, --max_new_tokens, --limit, --repeats, --rounds and --context must be at least 1")
    if args.random_weights and args.context + max(args.gammas) + 1 > roofline.SHAPES[args.random_weights]["block_size"]:
        p.error(f"--context {args.context} does not fit {args.random_weights}'s context of "
                f"{roofline.SHAPES[args.random_weights]['block_size']} tokens")
    cli.check_sampling(args.temperature, args.top_k, args.top_p)
    evaluation = not (args.roofline or args.random_weights or args.decode or args.profile or args.sweep or args.formats)
    if args.rounds > 1 and not (args.interleave and evaluation):
        p.error("--rounds goes with the evaluation (--methods), --interleave")
    if args.interleave and (args.roofline or args.random_weights or args.decode):
        p.error("--interleave goes with the evaluation, --profile/--sweep and --formats")
    if args.categories is not None:
        if args.roofline or args.random_weights or args.decode:
            p.error("--categories goes with the evaluation, --profile/--sweep and --formats")
        read_spec_bench(args.prompts, 1, args.categories)  # now, not after the model has loaded
    if args.plot and not (args.profile or args.sweep):
        p.error("--plot goes with --profile or --sweep")
    if args.tree is not None:
        if not {"s3d", "adaptive"} & set(args.methods) or args.profile or args.sweep:
            p.error("--tree goes with --methods s3d or adaptive (for --profile/--sweep: --trees)")
    if "lookup" in args.methods and args.tree is not None:
        p.error("--methods lookup copies a chain of drafts: it does not go with --tree")
    if args.lookup < s3d.LOOKUP_SHORTEST:
        p.error(f"--lookup matches {s3d.LOOKUP_SHORTEST} tokens or more, not {args.lookup}")
    if args.trees and not ((args.profile or args.sweep) and args.draft == "s3d" or args.roofline):
        p.error("--trees goes with --profile or --sweep of the s3d draft, or --roofline")
    if not args.roofline and [t for t in args.trees if t.depth not in args.gammas]:
        p.error(f"every tree of --trees must be as deep as a g of --gammas ({' '.join(map(str, args.gammas))})")
    if args.best_trees and not args.trees:
        p.error("--best_trees chooses trees inside the biggest of --trees: add --trees")
    if args.best_trees and args.roofline:
        p.error("--best_trees goes with --profile or --sweep, which measure the node rates that choose the trees")
    if [n for n in args.best_trees if n < 1]:
        p.error(f"--best_trees takes node counts of 1 or more, got {' '.join(map(str, args.best_trees))}")
    biggest = max((len(t) - 1 for t in args.trees), default=0)  # nodes of the biggest tree of --trees
    if args.best_trees and max(args.best_trees) >= biggest:
        p.error(f"--best_trees {max(args.best_trees)}: the best trees are chosen inside the biggest of --trees, "
                f"which has {biggest} nodes: give fewer")
    args.methods = sorted(set(args.methods), key=METHODS.index)  # AR first (the reference), hf last (its own weights)
    args.heads_files = args.heads or []
    inputs = (args.prompts, args.checkpoint, args.gguf, args.draft_checkpoint, *args.heads_files)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:  # now, not after the run whose results they are to hold
            checkpoint.check_output(path, args.force, inputs, flag)
    if args.json is not None and args.plot is not None and args.json.resolve() == args.plot.resolve():
        p.error("--json and --plot name the same file")
    if len(args.heads_files) > 1 and not (args.profile or args.sweep):
        p.error("several --heads files go with --profile or --sweep")
    args.heads = args.heads_files[0] if args.heads_files else None
    if not args.random_weights:  # there each format sets its own dtype
        args.dtype = cli.resolve_dtype(args.dtype, torch.device(args.device), args.quantize or args.formats,
                                        args.compile or args.roofline)
    if args.formats and not args.random_weights and (args.heads is None or args.profile or args.sweep or args.decode):
        p.error("--formats needs one --heads file (S3D runs with it in every format) and no other mode")
    if args.gguf is not None and not args.gguf.is_file():
        p.error(f"--gguf {args.gguf}: no such file")
    if "llama.cpp" in args.methods and evaluation:  # now, not after the other methods have run
        if problem := peers.llama_cpp_unusable(args, "--methods llama.cpp"):
            p.error(problem)
        if (torch.device(args.device).type != "cpu" or (args.quantize or args.dtype) not in peers.GGUF_TYPES
                or (args.quantize and args.dtype != "bfloat16")):
            p.error("--methods llama.cpp runs our weights in float32 or bfloat16, or --quantize w8a8 (as Q8_0), on "
                    "the CPU")
    return args


@cli.program
def main(argv=None) -> None:
    args = parse_args(argv)
    torch._dynamo.config.cache_size_limit = 64  # a sweep compiles one draft per (skip, g): keep them all compiled
    mode = bench_roofline if args.roofline else bench_random_weights if args.random_weights else bench_decode \
        if args.decode else bench_formats if args.formats else bench_speculative
    mismatches = mode(args)
    if mismatches:
        print(f"bench.py: {len(mismatches)} speculative answers differ from AR (listed above)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
