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

import s3d
from generate import DEFAULT_CHECKPOINT, DTYPES, load

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


def bench_speculative(args) -> None:
    from model import load_heads, new_heads

    rows = []
    for dtype_name in args.dtypes:
        model, tok = load(args.checkpoint, torch.device("cpu"), DTYPES[dtype_name])
        n_layer = model.config.n_layer
        heads = load_heads(args.heads, model.config) if args.heads else new_heads(model, args.skip, args.gamma, 8)
        model.set_heads(heads.to(DTYPES[dtype_name]))
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))
                   for _, text in spec_bench_prompts(args.prompts, args.per_category)]
        methods = {"ar": lambda p: s3d.ar_generate(model, p, args.tokens, eos_ids=tok.eos_ids, compile=args.compile),
                   f"skip {args.skip[0]}:{args.skip[1]}": lambda p: s3d.speculative_generate(
                       model, p, args.tokens, draft="skip", gamma=args.gamma, skip=tuple(args.skip), eos_ids=tok.eos_ids,
                       compile=args.compile),
                   f"s3d {'untrained' if not args.heads else args.heads.name} {heads.skip[0]}:{heads.skip[1]}":
                       lambda p: s3d.speculative_generate(model, p, args.tokens, draft="s3d", gamma=args.gamma,
                                                          eos_ids=tok.eos_ids, compile=args.compile)}
        # size the cache for the longest prompt now: growing it later would recompile inside the timed runs
        s3d.prepare_cache(model, max(map(len, prompts)) + args.tokens + args.gamma + 1)
        outputs = {}
        with torch.no_grad():
            for name, run in methods.items():
                run(prompts[0])  # warm-up and compilation
                results = [run(p) for p in prompts]
                outputs[name] = [r.tokens for r in results]
                tokens = sum(len(r.tokens) - 1 for r in results)
                rate = tokens / sum(r.decode_time for r in results)
                accepted = [n for r in results for n in r.accepted]
                rows.append((dtype_name, name, rate, accepted, outputs[name] == outputs["ar"]))
                print(f"{dtype_name} {name}: {rate:.1f} tokens/s", file=sys.stderr)
    print(f"\nSpeculative decoding, {len(prompts)} Spec-Bench prompts ({args.per_category} per category), "
          f"{args.tokens} greedy tokens, g={args.gamma}, {'compiled' if args.compile else 'eager'}. {machine_line()}.\n")
    print("| dtype | method | tau | acceptance per position | tokens/s | vs AR | output == AR |\n|---|---|---|---|---|---|---|")
    for dtype_name, name, rate, accepted, same in rows:
        ar_rate = next(r for d, n, r, _, _ in rows if d == dtype_name and n == "ar")
        tau = f"{s3d.mean_tokens_per_iteration(accepted):.2f}" if accepted else "1"
        rates = " ".join(f"{a:.2f}" for a in s3d.acceptance_rates(accepted, args.gamma)) if accepted else "-"
        print(f"| {dtype_name} | {name} | {tau} | {rates} | {rate:.1f} | {rate / ar_rate:.2f}x | {'yes' if same else 'NO'} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decode", action="store_true", help="decode tokens/s table: ours (eager, compiled) vs transformers")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    p.add_argument("--tokens", type=int, default=128, help="new tokens per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--speculative", action="store_true", help="AR vs layer-skip vs S3D drafting on Spec-Bench prompts")
    p.add_argument("--prompts", type=Path, default=Path("data/spec_bench_dev.jsonl"))
    p.add_argument("--per_category", type=int, default=1)
    p.add_argument("--heads", type=Path, default=None, help="S3D heads file (default: fresh, untrained heads)")
    p.add_argument("--skip", type=lambda v: tuple(int(x) for x in v.split(":")), default=(10, 20), metavar="S:E")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    if args.decode:
        bench_decode(args)
    elif args.speculative:
        bench_speculative(args)
    else:
        p.error("choose a benchmark: --decode or --speculative")


if __name__ == "__main__":
    main()
