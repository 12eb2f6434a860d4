"""Benchmarks, written up in BENCHMARKS.md.

    python bench.py --decode     # decode tokens/s: ours eager and compiled, and transformers' generate(), per dtype

Every run prints the machine, torch version and date with its table, medians of --repeats runs measured in one
process with the same thread count.
"""
import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import s3d
from generate import DEFAULT_CHECKPOINT, DTYPES, load

PROMPT = "Write a short story about a robot who learns to paint."


def machine_line() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.processor() or platform.machine()} CPU"
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decode", action="store_true", help="decode tokens/s table: ours (eager, compiled) vs transformers")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    p.add_argument("--tokens", type=int, default=128, help="new tokens per timed run")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.decode:
        bench_decode(args)
    else:
        p.error("choose a benchmark: --decode")


if __name__ == "__main__":
    main()
