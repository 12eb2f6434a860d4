"""Command line: load a checkpoint, prefill, decode (AR or S3D speculative), stream the text, print the metrics.

    python generate.py --compile                                  # the embedded SmolLM2-135M-Instruct, AR
    python generate.py --checkpoint checkpoints/X --prompt "..." --temperature 0.7 --top_k 50
    python generate.py --s3d heads/X.safetensors --compile --compare_ar       # S3D speculative decoding
    python generate.py --draft skip --skip 10:20 --gamma 3                    # training-free layer-skip draft
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional

import torch

import checkpoint
import cli
import cpu_kernels
import s3d
import spec_bench
from checkpoint import UsageError
from cli import DEFAULT_CHECKPOINT, DEFAULT_PROMPT, DTYPES
from model import Transformer
from tokenizer import Tokenizer


class TextStream:
    """Prints text as tokens arrive. Byte-level tokens can split a character, so decode the whole answer each time
    and hold back a trailing replacement character until its bytes are complete."""

    def __init__(self, tokenizer: Tokenizer, enabled: bool = True):
        self.tokenizer, self.enabled, self.tokens, self.printed = tokenizer, enabled, [], 0

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        if not self.enabled:
            return
        text = self.tokenizer.decode(self.tokens, skip_special=True)
        if text.endswith("\ufffd"):
            return
        print(text[self.printed:], end="", flush=True)
        self.printed = len(text)


class DraftView:
    """--show_drafts: one line per speculative iteration, showing what was drafted and what verification decided,
    then a histogram of accepted lengths. The text is the same with or without colour, which is used only on a
    terminal:

       7  2/4  [ The][ robot] x[ was] -> [ had]  ([ a][ brush])

    iteration 7 accepted 2 of its 4 drafts (green); the third was rejected (red) and the target's own token
    replaced it (yellow); the drafts after a rejection are never checked (dim). When all g are accepted, the
    target's next token comes free as the bonus: `+ [ it]`. With --tree, the candidates that lost to the accepted
    one at a depth follow it in braces, and all those tried at the depth where none was accepted are red:

       7  2/4  [ The]{[ A][ In]}[ robot]{[ cat]} x[ was][ is] -> [ had]

    Drafts copied from the context (--lookup) follow the word `copy`: `7  4/4  copy [ The][ robot][ was][ a] + [ big]`.
    With --adaptive, a plain AR step taken instead of an iteration shows as `AR -> [ had]`."""

    GREEN, RED, YELLOW, DIM, RESET = "\033[32m", "\033[9;31m", "\033[33m", "\033[2m", "\033[0m"

    def __init__(self, tokenizer: Tokenizer, gamma: int, color: bool):
        self.tokenizer, self.gamma, self.color, self.accepted = tokenizer, gamma, color, []

    def piece(self, token: int, style: str) -> str:
        text = "[" + self.tokenizer.decode([token]).replace("\n", "\\n") + "]"
        return f"{style}{text}{self.RESET}" if self.color else text

    def pieces(self, tokens: list[int], style: str) -> str:
        return "".join(self.piece(t, style) for t in tokens)

    def first_token(self, token: int) -> None:
        print(f"{0:4d}  prefill  {self.piece(token, self.YELLOW)}", flush=True)

    def __call__(self, candidates: list[list[int]], n: int, target: int, copied: bool = False) -> None:
        """candidates: s3d.speculative_generate's, the tokens tried at each depth (the accepted one first); None
        for an AR step. copied: the drafts were copied from the context (--lookup)."""
        if candidates is None:
            print(f"{'':4s}  AR   -> {self.piece(target, self.YELLOW)}", flush=True)
            return
        self.accepted.append(n)
        line = ""
        for tried in candidates[:n]:
            line += self.piece(tried[0], self.GREEN) + (f"{{{self.pieces(tried[1:], self.RED)}}}" if tried[1:] else "")
        if n == self.gamma:
            line += " + " + self.piece(target, self.YELLOW)
        else:
            line += f" x{self.pieces(candidates[n], self.RED)} -> {self.piece(target, self.YELLOW)}"
            if n + 1 < len(candidates):  # a chain's drafts after the rejected one
                line += f"  ({self.pieces([tried[0] for tried in candidates[n + 1:]], self.DIM)})"
        print(f"{len(self.accepted):4d}  {n}/{self.gamma}  {'copy ' * copied}{line.strip()}", flush=True)

    def histogram(self) -> str:
        if not self.accepted:
            return ""
        counts = [self.accepted.count(k) for k in range(self.gamma + 1)]
        scale = 40 / max(counts)
        bar = "\u2588" if self.color else "#"
        lines = [f"accepted drafts per iteration ({len(self.accepted)} iterations, "
                 f"tau {s3d.mean_tokens_per_iteration(self.accepted):.2f}):"]
        lines += [f"{k:4d} | {bar * round(c * scale):<40} {c}" for k, c in enumerate(counts)]
        return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description="Generate text with a gpt-fast-style engine; speculative decoding with S3D.")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="converted checkpoint folder")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the checkpoint's chat template (default: on when it has one)")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_samples", type=int, default=1, help="generate this many times (each timed)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bfloat16 on GPUs, for --quantize, on CPUs with native bf16 (AVX512_BF16, AMX) and "
                        "with --compile on other CPUs (bfloat16 weights, float32 products), else float32; it says "
                        "which")
    p.add_argument("--compile", action="store_true", help="compile the decode steps (CUDA graphs on CUDA)")
    p.add_argument("--compile_prefill", action="store_true", help="compile prefill too, with dynamic shapes")
    p.add_argument("--interactive", action="store_true", help="read prompts from the terminal, one per turn")
    p.add_argument("--quantize", choices=checkpoint.QUANTIZATIONS, default=None,
                   help="int8, int4 (torchao, weight-only; CUDA only for int4): the checkpoint's file written by "
                        "quantize.py, else on load; w8a8: int8 weights and activations, on load (fastest on a CPU "
                        "with AVX2 or AVX512_VNNI)")
    p.add_argument("--groupsize", type=int, default=128, help="int4: input weights per scale")
    spec = p.add_argument_group("speculative decoding")
    spec.add_argument("--s3d", type=Path, metavar="HEADS", help="S3D with this heads file (implies --draft s3d)")
    spec.add_argument("--draft", choices=list(s3d.DRAFTERS), default=None,
                      help="s3d: mask-token drafting by the layer-skipped model (fresh, untrained heads without --s3d); "
                           "skip: the layer-skipped model drafts one token at a time; model: --draft_checkpoint drafts")
    spec.add_argument("--gamma", type=int, default=None,
                      help="tokens drafted per iteration (default: the heads', or 4; at most 3 for S3D on a CPU "
                           "without native bf16 matrix instructions, and says so)")
    spec.add_argument("--skip", metavar="S:E", type=cli.skip_range, default=None,
                      help="skip layers S..E-1 in the draft (default: the heads' range, or the middle third)")
    spec.add_argument("--rank", type=int, default=8, help="adapter rank of fresh heads (--draft s3d without --s3d)")
    spec.add_argument("--draft_checkpoint", type=Path, help="the small draft model for --draft model")
    spec.add_argument("--tree", metavar="K1,K2,..", type=cli.tree_or_default, default="auto",
                      help="verify a tree of the S3D draft's candidates in one forward: how many at each depth (its "
                           "depth is g), e.g. 3,2,1,1: the best 3 at depth 1, the best 2 after each, .. (21 nodes); "
                           "or its nodes' candidate ranks, e.g. 0,1,00,10,000 (as bench.py --best_trees prints them); "
                           "chain: one candidate per depth; auto (default): 3,2,1,.. on a GPU, the chain on a CPU. "
                           "bench.py --sweep --trees measures them on this machine")
    spec.add_argument("--draft_weights", choices=list(cli.DRAFT_WEIGHTS), default="auto", help=cli.DRAFT_WEIGHTS_HELP)
    spec.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                      help="take plain AR steps instead of the draft forward wherever they have been making tokens "
                           "faster (timed as decoding runs); the output is the same (default: on for a CPU without "
                           "native bf16 matrix instructions, off elsewhere)")
    spec.add_argument("--lookup", type=int, default=None, metavar="N",
                      help="copy the drafts from the prompt and answer so far, with no draft forward, wherever their "
                           f"last N tokens (down to {s3d.LOOKUP_SHORTEST}) occurred before; the output is the same "
                           f"(default: {s3d.LOOKUP_LONGEST} with a chain of S3D or layer-skip drafts; 0: off)")
    spec.add_argument("--compare_ar", action="store_true",
                      help="also run plain AR decoding: the speedup, and whether the outputs agree as they must "
                           "(greedy: token for token, but at a tie of the target's logits; else exit code 1)")
    spec.add_argument("--show_drafts", action="store_true",
                      help="show every iteration: accepted drafts (green), the first rejected one (red) and the "
                           "target's replacement or bonus token (yellow), then a histogram of accepted lengths")
    args = p.parse_args(argv)
    if args.s3d is not None and args.draft not in (None, "s3d"):
        p.error(f"--s3d goes with --draft s3d, not --draft {args.draft}")
    if args.s3d is not None:
        args.draft = "s3d"
    if args.show_drafts and args.draft is None:
        p.error("--show_drafts shows speculative iterations: add --s3d HEADS or --draft {s3d,skip,model}")
    if args.adaptive and args.draft in (None, "model"):
        p.error("--adaptive chooses between AR steps and S3D or layer-skip drafts: add --s3d HEADS or --draft skip")
    if args.lookup and args.draft in (None, "model"):
        p.error("--lookup copies drafts in place of the S3D or layer-skip draft's: add --s3d HEADS or --draft skip")
    if args.lookup and args.lookup < s3d.LOOKUP_SHORTEST:
        p.error(f"--lookup matches {s3d.LOOKUP_SHORTEST} tokens or more, not {args.lookup}")
    if args.skip is not None and args.draft in (None, "model"):
        p.error("--skip sets the layers the S3D or layer-skip draft leaves out: add --s3d HEADS or --draft {s3d,skip}")
    if args.gamma is not None and args.draft is None:
        p.error("--gamma sets the tokens drafted per iteration: add --s3d HEADS or --draft {s3d,skip,model}")
    if args.gamma is not None and args.gamma < 1:
        p.error(f"--gamma must be at least 1, got {args.gamma}")
    if args.max_new_tokens < 1:
        p.error(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    cli.check_sampling(args.temperature, args.top_k, args.top_p)
    if args.num_samples < 1:
        p.error(f"--num_samples must be at least 1, got {args.num_samples}")
    return args


def check_length(model: Transformer, prompt: list[int], max_new_tokens: int, draft: Optional[s3d.Draft]) -> None:
    context = model.config.block_size
    if len(prompt) + max_new_tokens + (draft.slots if draft else 1) > context:
        raise UsageError(f"the prompt ({len(prompt)} tokens) plus --max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's context of {context} tokens")


def fit_chat(model: Transformer, tokenizer: Tokenizer, messages: list[dict], chat: bool, max_new_tokens: int,
             draft: Optional[s3d.Draft]) -> Optional[list[dict]]:
    """The chat's messages without its oldest turns, as many as must go for the answer to fit the context (saying
    so); None, with a note, if the newest message alone does not fit."""
    dropped = 0
    while True:
        try:
            check_length(model, cli.encode_prompt(tokenizer, messages, chat), max_new_tokens, draft)
        except UsageError as e:
            if len(messages) < 3:
                print(f"(not answered: {e}; the chat goes on)", file=sys.stderr)
                return None
            messages, dropped = messages[2:], dropped + 1  # the oldest question and its answer
            continue
        if dropped:
            print(f"(the {dropped} oldest turn{'s' * (dropped > 1)} left the context to make room)", file=sys.stderr)
        return messages


def run_once(model: Transformer, tokenizer: Tokenizer, prompt: list[int], args: argparse.Namespace,
             draft: Optional[s3d.Draft], stream: bool = True, view: Optional[DraftView] = None,
             max_new_tokens: Optional[int] = None) -> s3d.Result:
    """One generation, speculative with draft or AR without; its text streams to stdout (with view, the
    iterations are shown instead)."""
    max_new_tokens = max_new_tokens or args.max_new_tokens
    check_length(model, prompt, max_new_tokens, draft)
    text = TextStream(tokenizer, stream and view is None)

    def on_token(token: int) -> None:
        text(token)
        if view is not None and len(text.tokens) == 1:  # prefill's token, before any iteration
            view.first_token(token)

    common = dict(sampling=s3d.Sampling(args.temperature, args.top_k, args.top_p), eos_ids=tokenizer.eos_ids,
                  compile=args.compile, compile_prefill=args.compile_prefill, on_token=on_token)
    if draft is None:
        return s3d.ar_generate(model, prompt, max_new_tokens, **common)
    return s3d.speculative_generate(model, prompt, max_new_tokens, draft, on_iteration=view, **common)


def tokens_per_second(result: s3d.Result) -> float:
    n = len(result.tokens)
    return (n - 1) / result.decode_time if n > 1 and result.decode_time > 0 else float("nan")


def report(result: s3d.Result, model: Transformer, device: torch.device, compile_time: Optional[float],
           gamma: Optional[int] = None, ar: Optional[s3d.Result] = None, prompt: Optional[list[int]] = None,
           greedy: bool = True) -> bool:
    """Prints the run's metrics (and with ar, the comparison with AR's run); False where the two outputs disagree
    in a way the algorithm does not allow."""
    n = len(result.tokens)
    tokens_per_s = tokens_per_second(result)
    memory, peak = checkpoint.memory_breakdown(model), cli.peak_memory_bytes(device) / 2**30
    lines = [f"{n} tokens, decode {tokens_per_s:.1f} tokens/s, time to first token {result.time_to_first_token * 1000:.0f} ms",
             f"weights {memory['weights'] / 2**30:.3f} GiB ({model.quantization or model.tok_embeddings.weight.dtype}), "
             f"KV cache {memory['kv_cache'] / 2**30:.3f} GiB, adapters {memory['adapters'] / 2**20:.1f} MiB; "
             f"peak memory {peak:.2f} GiB ({'allocated' if device.type == 'cuda' else 'resident'}), "
             f"{tokens_per_s / peak:.1f} tokens/s per GiB",
             f"bandwidth achieved {memory['weights'] * tokens_per_s / 1e9:.1f} GB/s (weight bytes x tokens/s)"]
    if compile_time is not None:
        lines.append(f"compile time {compile_time:.1f} s")
    if result.accepted:
        rates = s3d.acceptance_rates(result.accepted, gamma)
        lines.append(f"{len(result.accepted)} iterations, tau {s3d.mean_tokens_per_iteration(result.accepted):.2f} tokens "
                     f"per iteration (bonus included), acceptance per draft position "
                     f"{' '.join(f'{a:.2f}' for a in rates)}")
    if any(result.copied):
        lines.append(f"{sum(result.copied)} of the {len(result.accepted)} iterations copied their drafts from the "
                     f"context, with no draft forward (--lookup)")
    if result.ar_steps:
        lines.append(f"{result.ar_steps} AR steps taken instead of iterations (--adaptive: speculating was the slower "
                     f"there)")
    agree = True
    if ar is not None:
        same, agree = compare_with_ar(model, prompt, ar.tokens, result.tokens, greedy)
        lines.append(f"AR {tokens_per_second(ar):.1f} tokens/s: speedup {tokens_per_s / tokens_per_second(ar):.2f}x, {same}")
    print("\n" + "\n".join(lines), file=sys.stderr)
    return agree


def compare_with_ar(model: Transformer, prompt: list[int], ar_tokens: list[int], tokens: list[int],
                    greedy: bool) -> tuple[str, bool]:
    """What --compare_ar says of the speculative output against AR's, and whether the two agree as the algorithm
    promises. Greedy: token for token, except where the target's two best logits are so close (spec_bench.TIE_ULPS
    rounding steps) that a 1-token AR step and a (g+1)-token verify forward, which round their sums differently,
    can pick either (bfloat16; docs/design.md). Sampling: each output is a sample of the target's distribution, so
    they differ in general."""
    if ar_tokens == tokens:
        return "identical output", True
    if not greedy:
        return "outputs differ (sampling: each is a sample of the target model's distribution)", True
    i = spec_bench.first_difference(ar_tokens, tokens)
    gap = spec_bench.gap_in_ulps(model, prompt, ar_tokens, i, tokens[i]) if i < len(tokens) else None
    dtype = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    if gap is not None and gap <= spec_bench.TIE_ULPS:
        return (f"outputs part at new token {i}, at a tie: the target's logits for the two tokens there are "
                f"{gap:.1f} rounding steps of {dtype} apart, which a 1-token and a multi-token forward may round "
                f"either way"), True
    where = "" if gap is None else f", where the target's logits are {gap:.0f} rounding steps of {dtype} apart"
    return f"MISMATCH: the outputs part at new token {i}{where}: not a tie, so not AR's output (a bug)", False


def load_weights(args: argparse.Namespace, device: torch.device) -> tuple[Transformer, Tokenizer]:
    """The checkpoint in args.dtype, quantized as --quantize asks: from quantize.py's file, else on load."""
    t = time.perf_counter()
    model, tokenizer = cli.load(args.checkpoint, device, DTYPES[args.dtype])
    print(f"loaded {model.config.name or args.checkpoint} ({args.dtype}, {device}) in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    if args.quantize:
        t = time.perf_counter()
        saved = checkpoint.quantized_path(args.checkpoint, args.quantize, args.groupsize, DTYPES[args.dtype])
        if saved.is_file() and args.quantize != "w8a8":  # (w8a8 is made on load: checkpoint.quantize_w8a8)
            checkpoint.load_quantized(model, saved)
            source = f"from {saved}"
        else:
            checkpoint.quantize(model, args.quantize, args.groupsize)
            source = "quantized on load"
        print(f"{model.quantization} weights {source} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        if device.type == "cpu" and args.dtype == "float32":  # checkpoint.py's quantization notes say why
            print("note: int8 weights with float32 activations on a CPU are slow (eager) or unpacked to float32 "
                  "(compiled); the default --dtype for --quantize is bfloat16", file=sys.stderr)
        if args.quantize == "w8a8" and device.type == "cpu" and args.compile and not cpu_kernels.int8_kernel():
            # without cpu_kernels' int8 kernel the int8 products run as Inductor's generic reductions: on AVX2 code
            # paths, before its AVX2 build, AR decoded 7 times slower than in bfloat16 (BENCHMARKS.md, section 40)
            print("note: w8a8 runs fast only with cpu_kernels' int8 kernel (AVX2, or AVX512_VNNI), which this CPU "
                  "lacks or S3D_DOT_BF16=0 turned off: here it is several times slower than --dtype bfloat16 "
                  "without --quantize", file=sys.stderr)
    return model, tokenizer


@cli.program
def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    device = cli.resolve_device(args.device)
    torch.manual_seed(args.seed)
    args.dtype = cli.resolve_dtype(args.dtype, device, args.quantize, args.compile)
    if args.quantize:
        checkpoint.check_quantization(args.quantize, device, args.groupsize)
    model, tokenizer = load_weights(args, device)
    chat = bool(tokenizer.chat_template) if args.chat is None else args.chat
    if chat and not tokenizer.chat_template:
        raise UsageError("this checkpoint has no chat template; use --no-chat")
    draft = cli.make_draft(model, args.draft, args.gamma, args.skip, args.s3d, args.rank, args.draft_checkpoint, args.tree,
                           args.draft_weights)
    lookup = args.lookup
    if lookup is None:  # on wherever it can serve: a chain of S3D or layer-skip drafts
        lookup = s3d.LOOKUP_LONGEST if draft is not None and draft.kind != "model" and draft.tree is None else 0
    adaptive = cli.resolve_adaptive(args.adaptive, draft, device)
    if adaptive or lookup:
        draft = dataclasses.replace(draft, adaptive=adaptive, lookup=lookup)
        s3d.check_draft(model, draft)
    messages = [{"role": "user", "content": args.prompt}]
    check_length(model, cli.encode_prompt(tokenizer, messages, chat), args.max_new_tokens, draft)
    compile_time = None
    if args.compile or args.compile_prefill:  # compile on a short run first, so the timed runs measure decoding
        print("compiling the decode steps (minutes on a CPU: Inductor tunes and freezes every matmul) ...",
              file=sys.stderr, flush=True)
        t = time.perf_counter()
        # (with the drafter's lookup off: a short run might copy every draft, and the drafter compile later)
        warm_drafts = [draft and dataclasses.replace(draft, lookup=0)]
        warm_drafts += [None] * (draft is not None and args.compare_ar)
        for warm_draft in warm_drafts:
            run_once(model, tokenizer, cli.encode_prompt(tokenizer, messages, chat), args, warm_draft, stream=False,
                     max_new_tokens=min(args.max_new_tokens, 8))
        compile_time = time.perf_counter() - t
        print(f"compiled in {compile_time:.1f} s", file=sys.stderr)
    agree = True  # every --compare_ar so far found the outputs as the algorithm allows
    while True:
        if args.interactive:
            try:
                text = input("\n> " if chat else "\nprompt> ")
            except EOFError:
                break
            except UnicodeDecodeError:
                print("(that line was not UTF-8 text: try again)", file=sys.stderr)
                continue
            if not text.strip():
                break
            history = messages if chat and messages[-1]["role"] == "assistant" else []
            fitted = fit_chat(model, tokenizer, history + [{"role": "user", "content": text}], chat,
                              args.max_new_tokens, draft)
            if fitted is None:  # this turn alone cannot be answered: the chat goes on without it
                continue
            messages = fitted
        prompt = cli.encode_prompt(tokenizer, messages, chat)
        for _ in range(args.num_samples):
            view = DraftView(tokenizer, draft.gamma, color=sys.stdout.isatty()) if args.show_drafts else None
            result = run_once(model, tokenizer, prompt, args, draft, view=view)
            if view is not None:
                print(f"\n{tokenizer.decode(result.tokens, skip_special=True)}\n\n{view.histogram()}")
            ar = None
            if args.compare_ar and draft is not None:
                torch.manual_seed(args.seed)
                ar = run_once(model, tokenizer, prompt, args, None, stream=False)
            agree &= report(result, model, device, compile_time, draft.gamma if draft else None, ar, prompt,
                            greedy=args.temperature == 0)
            compile_time = None
        if not args.interactive:
            break
        messages.append({"role": "assistant", "content": tokenizer.decode(result.tokens, skip_special=True)})
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
