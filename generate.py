"""Command line: load a checkpoint, prefill, decode (AR or S3D speculative), stream the text, print the metrics.

    python generate.py --compile                                  # the embedded SmolLM2-135M-Instruct, AR
    python generate.py --checkpoint checkpoints/X --prompt "..." --temperature 0.7 --top_k 50
    python generate.py --s3d heads/X.safetensors --compile --compare_ar       # S3D speculative decoding
    python generate.py --draft skip --skip 10:20 --gamma 3                    # training-free layer-skip draft
"""
import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch

import quantize
import s3d
from model import CheckpointError, Transformer, check_skip, load_heads, load_model, middle_third, new_heads
from tokenizer import Tokenizer

DEFAULT_CHECKPOINT = Path("checkpoints/SmolLM2-135M-Instruct")
DEFAULT_PROMPT = "Write a short story about a robot who learns to paint."
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class UsageError(Exception):
    """A mistake in the command line or its input; printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def skip_range(text: str) -> tuple[int, int]:
    """argparse type of --skip: 'S:E' -> (S, E); the model's layer count is checked later (check_skip)."""
    try:
        s, e = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected S:E (two layer numbers), got {text!r}") from None
    return s, e


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise UsageError(f"device {name!r} is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return device


def load(checkpoint: Path, device: torch.device, dtype: torch.dtype) -> tuple[Transformer, Tokenizer]:
    if not Path(checkpoint).exists() and Path(checkpoint) == DEFAULT_CHECKPOINT:
        raise CheckpointError(f"{checkpoint} is missing: run `make demo` (or scripts/convert_gguf.py --default) first")
    model = load_model(checkpoint, device, dtype)
    return model, Tokenizer(checkpoint)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the most memory PyTorch allocated; CPU: the process's peak resident set (since the last
    reset_peak_memory, on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:  # the kernel's high-water mark, which reset_peak_memory can reset (getrusage's cannot)
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak for peak_memory_bytes: CUDA's allocator statistics, or the kernel's peak-RSS mark (Linux;
    elsewhere the process-wide peak stays)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


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
    target's next token comes free as the bonus: `+ [ it]`."""

    GREEN, RED, YELLOW, DIM, RESET = "\033[32m", "\033[9;31m", "\033[33m", "\033[2m", "\033[0m"

    def __init__(self, tokenizer: Tokenizer, color: bool):
        self.tokenizer, self.color, self.accepted, self.gamma = tokenizer, color, [], 0

    def piece(self, token: int, style: str) -> str:
        text = "[" + self.tokenizer.decode([token]).replace("\n", "\\n") + "]"
        return f"{style}{text}{self.RESET}" if self.color else text

    def first_token(self, token: int) -> None:
        print(f"{0:4d}  prefill  {self.piece(token, self.YELLOW)}", flush=True)

    def __call__(self, drafts: list[int], n: int, target: int) -> None:
        self.accepted.append(n)
        self.gamma = len(drafts)
        line = "".join(self.piece(t, self.GREEN) for t in drafts[:n])
        if n == len(drafts):
            line += " + " + self.piece(target, self.YELLOW)
        else:
            line += f" x{self.piece(drafts[n], self.RED)} -> {self.piece(target, self.YELLOW)}"
            if n + 1 < len(drafts):
                line += "  (" + "".join(self.piece(t, self.DIM) for t in drafts[n + 1:]) + ")"
        print(f"{len(self.accepted):4d}  {n}/{len(drafts)}  {line.strip()}", flush=True)

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


def encode_prompt(tokenizer: Tokenizer, messages: list[dict], chat: bool) -> list[int]:
    if chat:
        return tokenizer.encode(tokenizer.apply_chat_template(messages), bos=False)
    return tokenizer.encode(messages[-1]["content"])


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description="Generate text with a gpt-fast-style engine; speculative decoding with S3D.")
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
                   help="auto: bfloat16 on GPUs and for --quantize, else float32 on CPUs (without native bf16 a "
                        "multi-token bf16 forward is slow on CPU, and S3D's verify forward is one; see BENCHMARKS.md)")
    p.add_argument("--compile", action="store_true", help="compile the decode steps (CUDA graphs on CUDA)")
    p.add_argument("--compile_prefill", action="store_true", help="compile prefill too, with dynamic shapes")
    p.add_argument("--interactive", action="store_true", help="read prompts from the terminal, one per turn")
    p.add_argument("--quantize", choices=quantize.MODES, default=None,
                   help="weight-only quantization: the checkpoint's file written by quantize.py, else on load "
                        "(int4: CUDA only)")
    p.add_argument("--groupsize", type=int, default=128, help="int4: input weights per scale")
    spec = p.add_argument_group("speculative decoding")
    spec.add_argument("--s3d", type=Path, metavar="HEADS", help="S3D with this heads file (implies --draft s3d)")
    spec.add_argument("--draft", choices=s3d.DRAFT_KINDS, default=None,
                      help="s3d: mask-token drafting by the layer-skipped model (fresh, untrained heads without --s3d); "
                           "skip: the layer-skipped model drafts one token at a time; model: --draft_checkpoint drafts")
    spec.add_argument("--gamma", type=int, default=None, help="tokens drafted per iteration (default: the heads', or 4)")
    spec.add_argument("--skip", metavar="S:E", type=skip_range, default=None,
                      help="skip layers S..E-1 in the draft (default: the heads' range, or the middle third)")
    spec.add_argument("--rank", type=int, default=8, help="adapter rank of fresh heads (--draft s3d without --s3d)")
    spec.add_argument("--draft_checkpoint", type=Path, help="the small draft model for --draft model")
    spec.add_argument("--compare_ar", action="store_true", help="also run plain AR decoding and report the speedup")
    spec.add_argument("--show_drafts", action="store_true",
                      help="show every iteration: accepted drafts (green), the first rejected one (red) and the "
                           "target's replacement or bonus token (yellow), then a histogram of accepted lengths")
    args = p.parse_args(argv)
    if args.s3d is not None and args.draft not in (None, "s3d"):
        p.error(f"--s3d goes with --draft s3d, not --draft {args.draft}")
    if args.s3d is not None:
        args.draft = "s3d"
    if args.draft == "model" and args.draft_checkpoint is None:
        p.error("--draft model needs --draft_checkpoint")
    if args.show_drafts and args.draft is None:
        p.error("--show_drafts shows speculative iterations: add --s3d HEADS or --draft {s3d,skip,model}")
    if args.gamma is not None and args.gamma < 1:
        p.error(f"--gamma must be at least 1, got {args.gamma}")
    if args.max_new_tokens < 1:
        p.error(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top_k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.num_samples < 1:
        p.error(f"--num_samples must be at least 1, got {args.num_samples}")
    return args


def check_length(model: Transformer, prompt: list[int], args: argparse.Namespace) -> None:
    context = model.config.block_size
    if len(prompt) + args.max_new_tokens + (args.gamma or 0) + 1 > context:
        raise UsageError(f"the prompt ({len(prompt)} tokens) plus --max_new_tokens ({args.max_new_tokens}) "
                         f"exceeds the model's context of {context} tokens")


def run_once(model: Transformer, tokenizer: Tokenizer, prompt: list[int], args: argparse.Namespace,
             stream: bool = True, draft_model: Optional[Transformer] = None, ar: bool = False,
             view: Optional[DraftView] = None) -> s3d.Result:
    """One generation; its text streams to stdout (with view, the iterations are shown instead)."""
    check_length(model, prompt, args)
    text = TextStream(tokenizer, stream and view is None)

    def on_token(token: int) -> None:
        text(token)
        if view is not None and len(text.tokens) == 1:  # prefill's token, before any iteration
            view.first_token(token)

    common = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_ids=tokenizer.eos_ids,
                  compile=args.compile, compile_prefill=args.compile_prefill, on_token=on_token)
    if args.draft is None or ar:
        return s3d.ar_generate(model, prompt, args.max_new_tokens, **common)
    return s3d.speculative_generate(model, prompt, args.max_new_tokens, draft=args.draft, gamma=args.gamma,
                                    skip=args.skip, draft_model=draft_model, on_iteration=view, **common)


def setup_draft(model: Transformer, args: argparse.Namespace, device: torch.device,
                dtype: torch.dtype) -> Optional[Transformer]:
    """Attaches heads (S3D) or loads the draft model; fills in args.skip and args.gamma. Returns the draft model."""
    if args.draft is None:
        return None
    n_layer = model.config.n_layer
    if args.skip is not None:
        args.skip = check_skip(args.skip, n_layer)
    if args.draft == "s3d":
        if args.s3d is not None:
            heads = load_heads(args.s3d, model.config)
            if args.gamma is not None and args.gamma > heads.gamma:
                raise UsageError(f"--gamma {args.gamma} exceeds the {heads.gamma} tokens these heads draft")
        else:
            print("note: --draft s3d without --s3d uses fresh, untrained heads: lossless, but few drafts are accepted",
                  file=sys.stderr)
            heads = new_heads(model, args.skip or middle_third(n_layer), args.gamma or 4, args.rank)
        model.set_heads(heads)
        args.gamma = args.gamma or heads.gamma
        return None
    args.gamma = args.gamma or 4
    if args.draft == "skip":
        args.skip = args.skip or middle_third(n_layer)
    elif args.draft == "model":
        draft_model, _ = load(args.draft_checkpoint, device, dtype)
        if draft_model.config.vocab_size != model.config.vocab_size:
            raise UsageError(f"the draft model's vocabulary ({draft_model.config.vocab_size}) differs from the "
                             f"target's ({model.config.vocab_size})")
        return draft_model
    return None


def tokens_per_second(result: s3d.Result) -> float:
    n = len(result.tokens)
    return (n - 1) / result.decode_time if n > 1 and result.decode_time > 0 else float("nan")


def report(result: s3d.Result, model: Transformer, device: torch.device, compile_time: Optional[float],
           gamma: Optional[int] = None, ar: Optional[s3d.Result] = None) -> None:
    n = len(result.tokens)
    tokens_per_s = tokens_per_second(result)
    memory, peak = quantize.memory_breakdown(model), peak_memory_bytes(device) / 2**30
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
    if ar is not None:
        same = "identical output" if ar.tokens == result.tokens else "outputs differ (sampling, or a near-tie)"
        lines.append(f"AR {tokens_per_second(ar):.1f} tokens/s: speedup {tokens_per_s / tokens_per_second(ar):.2f}x, {same}")
    print("\n" + "\n".join(lines), file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    if args.dtype == "auto":  # int8 weights on a CPU too: Inductor's int8 GEMM takes bfloat16 activations
        args.dtype = "float32" if device.type == "cpu" and not args.quantize else "bfloat16"
    if args.quantize:
        quantize.check_supported(args.quantize, device, args.groupsize)
    model, tokenizer = load(args.checkpoint, device, DTYPES[args.dtype])
    print(f"loaded {model.config.name or args.checkpoint} ({args.dtype}, {device}) in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    if args.quantize:
        t = time.perf_counter()
        saved = quantize.quantized_path(args.checkpoint, args.quantize, args.groupsize, DTYPES[args.dtype])
        if saved.is_file():
            quantize.load_quantized(model, saved)
            source = f"from {saved}"
        else:
            quantize.quantize(model, args.quantize, args.groupsize)
            source = "quantized on load"
        print(f"{model.quantization} weights {source} "
              f"in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        if device.type == "cpu" and args.dtype == "float32":  # quantize.py's docstring says why
            print("note: int8 weights with float32 activations on a CPU are slow (eager) or unpacked to float32 "
                  "(compiled); the default --dtype for --quantize is bfloat16", file=sys.stderr)
    chat = bool(tokenizer.chat_template) if args.chat is None else args.chat
    if chat and not tokenizer.chat_template:
        raise UsageError("this checkpoint has no chat template; use --no-chat")
    draft_model = setup_draft(model, args, device, DTYPES[args.dtype])
    messages = [{"role": "user", "content": args.prompt}]
    check_length(model, encode_prompt(tokenizer, messages, chat), args)
    compile_time = None
    if args.compile or args.compile_prefill:  # compile on a short run first, so the timed runs measure decoding
        t = time.perf_counter()
        warm = argparse.Namespace(**{**vars(args), "max_new_tokens": min(args.max_new_tokens, 8)})
        modes = [True] if args.draft is None else [False] + [True] * args.compare_ar  # True: the AR run
        for ar in modes:
            run_once(model, tokenizer, encode_prompt(tokenizer, messages, chat), warm, False, draft_model, ar=ar)
        compile_time = time.perf_counter() - t
    while True:
        if args.interactive:
            try:
                text = input("\n> " if chat else "\nprompt> ")
            except EOFError:
                break
            if not text.strip():
                break
            messages = (messages if chat and messages[-1]["role"] == "assistant" else []) + [{"role": "user", "content": text}]
        prompt = encode_prompt(tokenizer, messages, chat)
        for _ in range(args.num_samples):
            view = DraftView(tokenizer, color=sys.stdout.isatty()) if args.show_drafts else None
            result = run_once(model, tokenizer, prompt, args, draft_model=draft_model, view=view)
            if view is not None:
                print(f"\n{tokenizer.decode(result.tokens, skip_special=True)}\n\n{view.histogram()}")
            ar = None
            if args.compare_ar and args.draft is not None:
                torch.manual_seed(args.seed)
                ar = run_once(model, tokenizer, prompt, args, stream=False, ar=True)
            report(result, model, device, compile_time, args.gamma, ar)
            compile_time = None
        if not args.interactive:
            break
        messages.append({"role": "assistant", "content": tokenizer.decode(result.tokens, skip_special=True)})


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, UsageError, ValueError, quantize.QuantizeError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
