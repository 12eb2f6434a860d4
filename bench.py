"""Benchmarks, written up in BENCHMARKS.md.

    python bench.py --decode        # decode tokens/s: ours eager and compiled, and transformers' generate(), per dtype
    python bench.py --speculative   # AR vs layer-skip vs S3D drafts: tau, acceptance per position, tokens/s

Every run prints the machine, torch version and date with its table, medians of --repeats runs measured in one
process with the same thread count.
"""
import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import s3d
from generate import DEFAULT_CHECKPOINT, DTYPES, load, skip_range
from model import middle_third

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
        model, tok = load(args.checkpoint, torch.device("cpu"), dtype)
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
        hf = to_transformers(model)
        with torch.no_grad():
            for name, rate in [("ours, eager", lambda: ours_decode_rate(model, prompt, args.tokens, False)),
                               ("ours, --compile", lambda: ours_decode_rate(model, prompt, args.tokens, True)),
                               ("transformers generate()", lambda: hf_decode_rate(hf, prompt, args.tokens))]:
                rate()  # warm-up (and compilation) outside the timed runs
                runs = [rate() for _ in range(args.repeats)]
                rows.append((dtype_name, name, statistics.median(runs), runs))
                print(f"{dtype_name:9} {name:24} median {statistics.median(runs):6.1f} tokens/s "
                      f"({', '.join(f'{r:.1f}' for r in runs)})", file=sys.stderr)
        del model, hf
    print(f"\nDecode speed, {args.tokens} greedy tokens after a chat prompt of {len(prompt)} tokens, "
          f"median of {args.repeats} runs. {machine_line()}.\n")
    print("| dtype | engine | tokens/s | vs transformers |\n|---|---|---|---|")
    for dtype_name, name, median, _ in rows:
        hf_median = next(m for d, n, m, _ in rows if d == dtype_name and n.startswith("transformers"))
        print(f"| {dtype_name} | {name} | {median:.1f} | {median / hf_median:.2f}x |")


def spec_bench_prompts(path: Path, per_category: int) -> list[tuple[str, str]]:
    """(category, first turn) for the first per_category rows of each category of a Spec-Bench JSONL file."""
    rows, seen = [], {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if seen.get(row["category"], 0) < per_category:
            seen[row["category"]] = seen.get(row["category"], 0) + 1
            rows.append((row["category"], row["turns"][0]))
    return rows


def speculative_row(label: str, results: list, ar_results: list, gamma: int) -> str:
    """One markdown row: tau, acceptance per position, tokens/s, speedup over AR on the same prompts, output == AR."""
    rate = sum(len(r.tokens) - 1 for r in results) / sum(r.decode_time for r in results)
    ar_rate = sum(len(r.tokens) - 1 for r in ar_results) / sum(r.decode_time for r in ar_results)
    accepted = [n for r in results for n in r.accepted]
    tau = f"{s3d.mean_tokens_per_iteration(accepted):.2f}" if accepted else "1"
    rates = " ".join(f"{a:.2f}" for a in s3d.acceptance_rates(accepted, gamma)) if accepted else "-"
    same = all(r.tokens == a.tokens for r, a in zip(results, ar_results))
    return f"| {label} | {tau} | {rates} | {rate:.1f} | {rate / ar_rate:.2f}x | {'yes' if same else 'NO'} |"


def step_costs(model, gamma: int, compile: bool, repeats: int = 20) -> dict[str, float]:
    """Median milliseconds of one AR step, one S3D draft step (g tokens, kept layers) and one verify step (g + 1
    tokens, all layers), called as the decoding loops call them (so compiled, they are the same compiled code)."""
    device = model.output.weight.device
    cur, pos = torch.tensor([[1]], device=device), 64
    drafts = torch.ones(gamma, dtype=torch.long, device=device)
    calls = {"ar": lambda: s3d.step_fn(s3d.decode_one_token, model, compile)(model, cur.clone(), torch.tensor([pos], device=device)),
             "draft": lambda: s3d.step_fn(s3d.draft_s3d, model, compile)(model, cur, torch.arange(pos, pos + gamma, device=device)),
             "verify": lambda: s3d.step_fn(s3d.verify_step, model, compile)(model, cur, drafts.clone(), None,
                                                                          torch.arange(pos, pos + gamma + 1, device=device))}
    costs = {}
    for name, call in calls.items():
        call()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        costs[name] = 1000 * statistics.median(times)
    return costs


def bench_speculative(args) -> None:
    from model import load_heads, new_heads

    dtype = DTYPES[args.dtype]
    model, tok = load(args.checkpoint, torch.device("cpu"), dtype)
    heads = load_heads(args.heads, model.config) if args.heads else \
        new_heads(model, args.skip or middle_third(model.config.n_layer), args.gamma, 8)
    model.set_heads(heads)
    categories, texts = zip(*spec_bench_prompts(args.prompts, args.per_category))
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": text}])) for text in texts]
    skip = args.skip or heads.skip
    methods = {"ar": lambda p: s3d.ar_generate(model, p, args.tokens, eos_ids=tok.eos_ids, compile=args.compile),
               f"skip {skip[0]}:{skip[1]}": lambda p: s3d.speculative_generate(
                   model, p, args.tokens, draft="skip", gamma=args.gamma, skip=skip, eos_ids=tok.eos_ids,
                   compile=args.compile),
               f"s3d {args.heads.name if args.heads else 'untrained'} {heads.skip[0]}:{heads.skip[1]}":
                   lambda p: s3d.speculative_generate(model, p, args.tokens, draft="s3d", gamma=args.gamma,
                                                      eos_ids=tok.eos_ids, compile=args.compile)}
    methods = {name: run for name, run in methods.items() if name.split()[0] in args.methods}
    # size the cache for the longest prompt now: growing it later would recompile inside the timed runs
    s3d.prepare_cache(model, max(map(len, prompts)) + args.tokens + args.gamma + 1)
    results = {}
    with torch.no_grad():
        for name, run in methods.items():
            run(prompts[0])  # warm-up and compilation
            results[name] = [run(p) for p in tqdm(prompts, desc=name, unit="prompt")]
    ar = results["ar"]
    print(f"\nSpeculative decoding, {len(prompts)} Spec-Bench prompts ({args.per_category} per category), "
          f"{args.tokens} greedy tokens, g={args.gamma}, {args.dtype}, {'compiled' if args.compile else 'eager'}. "
          f"{machine_line()}.\n")
    print("| method | tau | acceptance per position | tokens/s | vs AR | output == AR |\n|---|---|---|---|---|---|")
    for name, rs in results.items():
        print(speculative_row(name, rs, ar, args.gamma))
    s3d_name = next((n for n in results if n.startswith("s3d")), None)
    if s3d_name is not None:
        with torch.no_grad():
            costs = step_costs(model, args.gamma, args.compile)
        accepted = [n for r in results[s3d_name] for n in r.accepted]
        cd, cv = costs["draft"] / costs["ar"], costs["verify"] / costs["ar"]
        predicted = s3d.predicted_speedup(s3d.acceptance_rates(accepted, args.gamma), cd, cv)
        print(f"\nStep costs (median of 20): AR step {costs['ar']:.1f} ms, S3D draft {costs['draft']:.1f} ms "
              f"(cd = {cd:.2f}), verify {costs['verify']:.1f} ms (cv = {cv:.2f}). Speed model: "
              f"E[tau] / (cd + cv) = {predicted:.2f}x predicted from the measured acceptance.")
    for name, rs in results.items():
        if name == "ar" or args.per_category < 2:
            continue
        print(f"\nPer category, {name} against AR on the same prompts:\n")
        print("| category | tau | acceptance per position | tokens/s | vs AR | output == AR |\n|---|---|---|---|---|---|")
        for category in dict.fromkeys(categories):
            keep = [i for i, c in enumerate(categories) if c == category]
            print(speculative_row(category, [rs[i] for i in keep], [ar[i] for i in keep], args.gamma))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decode", action="store_true", help="decode tokens/s table: ours (eager, compiled) vs transformers")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES), help="for --decode")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="for --speculative")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--speculative", action="store_true", help="AR vs layer-skip vs S3D drafting on Spec-Bench prompts")
    p.add_argument("--prompts", type=Path, default=Path("data/spec_bench_dev.jsonl"))
    p.add_argument("--per_category", type=int, default=1)
    p.add_argument("--heads", type=Path, default=None, help="S3D heads file (default: fresh, untrained heads)")
    p.add_argument("--skip", type=skip_range, default=None, metavar="S:E",
                   help="skip range of the layer-skip draft and of fresh heads (default: the heads', or the middle third)")
    p.add_argument("--methods", nargs="+", default=["ar", "skip", "s3d"], choices=["ar", "skip", "s3d"])
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    if "ar" not in args.methods:
        p.error("--methods needs ar: speedups are measured against it")
    if args.decode:
        bench_decode(args)
    elif args.speculative:
        bench_speculative(args)
    else:
        p.error("choose a benchmark: --decode or --speculative")


if __name__ == "__main__":
    main()
