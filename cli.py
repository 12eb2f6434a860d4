"""What the command-line programs (generate.py, train_heads.py, quantize.py, bench.py) share: one-line errors, the
device and dtype rules, loading, the draft rules (heads, skip range, g) stated once, peak memory, the machine's
description, perplexity.
"""
import argparse
import ctypes
import datetime
import functools
import gc
import inspect
import logging
import math
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

import cpu_kernels
import model as model_py
import s3d
from checkpoint import UsageError, load_model
from heads import check_gamma, check_skip, load_heads, middle_third, new_heads
from model import Transformer
from tokenizer import Tokenizer

# torchao logs a warning for each optional kernel library its build lacks, and torch one for each enum torchao
# registers: a screenful of noise on every --quantize run that says nothing about the run
for _logger in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_logger).setLevel(logging.ERROR)

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "SmolLM2-135M-Instruct"  # from any folder
DEFAULT_PROMPT = "Write a short story about a robot who learns to paint."
PERPLEXITY_TEXT = Path(__file__).resolve().parent / "data" / "perplexity.txt"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def program(main: Callable) -> Callable:
    """Decorates a program's main(argv=None): a UsageError (the user's mistake) prints as one line and exits with
    code 2, Ctrl-C exits with 130; anything else is a bug and shows its traceback."""
    prog = Path(inspect.getfile(main)).name

    @functools.wraps(main)
    def run(argv: Optional[list[str]] = None):
        try:
            return main(argv)
        except UsageError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            sys.exit(130)

    return run


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


def tree_shape(text: str) -> s3d.Tree:
    """argparse type of --tree: candidates per depth, '3,2,1,1' (s3d.top_k_tree), or nodes, '0,1,00,10,000'."""
    try:
        return s3d.parse_tree(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def tree_or_default(text: str) -> s3d.Tree | str:
    """argparse type of generate.py's --tree: 'auto' (default_tree), 'chain', or candidates per depth."""
    return text if text in ("auto", "chain") else tree_shape(text)


def default_tree(device: torch.device, gamma: int) -> Optional[s3d.Tree]:
    """What --tree auto verifies. On a GPU, where a verify forward of a few dozen rows costs about what one of 5
    does, a tree: the draft's best 3 candidates at depth 1, the best 2 after each, then 1 (3,2,1,1 at g = 4, 21
    nodes; on an H100 1.03x AR against the chain's 0.87x, BENCHMARKS.md section 17). On a CPU, where each row
    costs, the chain (there 1.05x against 0.98x for the smallest tree, same section)."""
    return s3d.top_k_tree(((3, 2) + (1,) * gamma)[:gamma]) if device.type == "cuda" else None


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """--temperature, --top_k and --top_p, as generate.py and bench.py take them."""
    if not 0 <= temperature < math.inf:
        raise UsageError(f"--temperature must be a number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"--top_p must be in (0, 1], got {top_p}")


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


def native_bf16() -> list[str]:
    """The CPU's native bf16 matrix instructions (AMX, AVX512_BF16), from /proc/cpuinfo. S3D_NATIVE_BF16=1 or 0
    overrides the answer (for tests, or to compare both choices on one machine)."""
    override = os.environ.get("S3D_NATIVE_BF16")
    if override is not None:
        return ["S3D_NATIVE_BF16=1"] if override == "1" else []
    return cpu_bf16_flags()


@functools.cache  # (generate.py asks for --dtype, the attention and --adaptive; the CPU's flags do not change)
def cpu_bf16_flags() -> list[str]:
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


def resolve_dtype(name: str, device: torch.device, quantize: Optional[str] = None, compile: bool = False) -> str:
    """--dtype auto: bfloat16 on GPUs, for quantized weights (Inductor's int8 GEMM takes bfloat16 activations), on
    CPUs with native bf16 matrix instructions, and for compiled decoding on other CPUs: there the compiled steps of a
    few tokens read bfloat16 weights and multiply in float32 (model.gemv), and many rows (a prefill) multiply in
    float32 (model.FLOAT32_MATMUL), so every step reads half the bytes of float32's and none runs on slow bfloat16
    GEMMs (BENCHMARKS.md, section 40). Uncompiled on such a CPU, float32. Says what it chose and why, in one line."""
    if name != "auto":
        return name
    native = native_bf16() if device.type == "cpu" else []
    if device.type != "cpu":
        name, why = "bfloat16", f"a {device.type} device"
    elif quantize:
        name, why = "bfloat16", "quantized weights: Inductor's int8 kernels take bfloat16 activations"
    elif native:
        name, why = "bfloat16", f"this CPU has native bf16 matrix instructions ({', '.join(native)})"
    elif compile:
        name, why = "bfloat16", ("compiled; this CPU has no native bf16 matrix instructions, so the weights are read "
                                 "as bfloat16 and multiplied in float32")
    else:
        name, why = "float32", ("this CPU has no native bf16 matrix instructions (AMX, AVX512_BF16), so bf16 is slow "
                                "uncompiled; --compile reads bfloat16 weights")
    print(f"--dtype auto: {name} ({why})", file=sys.stderr)
    return name


def default_gamma(heads_gamma: int, device: torch.device) -> int:
    """g of the S3D draft when --gamma is not given: the heads' (4 for the shipped ones), but at most 3 on a CPU
    without native bf16 matrix instructions. There a verify row costs a multiply-add per weight, so a fifth row
    barely pays for its draft: on AVX2 code paths, the dev prompts, adaptive decoding with the lookup made 1.26x,
    1.23x and 1.19x AR at g = 3 against 1.11x, 1.12x and 1.21x at g = 4, and g = 2 1.09x (BENCHMARKS.md section
    44). Says so where it lowers g."""
    if device.type != "cpu" or heads_gamma <= 3 or native_bf16():
        return heads_gamma
    print(f"--gamma auto: 3 (this CPU has no native bf16 matrix instructions, so each verified row costs its "
          f"multiply-adds: 3 drafts an iteration rather than the heads' {heads_gamma}; --gamma {heads_gamma} drafts "
          f"them all)", file=sys.stderr)
    return 3


def resolve_adaptive(adaptive: Optional[bool], draft: Optional[s3d.Draft], device: torch.device) -> bool:
    """--adaptive's default: on for S3D or layer-skip drafts on a CPU without native bf16 matrix instructions, off
    elsewhere. There a few-row forward is bound by its multiply-adds, and a drafted iteration makes fewer tokens per
    AR step's time than an AR step (AVX2 code paths: adaptive decoding with the lookup a median 1.12x AR against 1.03x
    without it; with native bf16, where the draft pays, 1.61x against 1.68x; BENCHMARKS.md section 43). Says so where
    it turns it on."""
    if adaptive is not None:
        return adaptive
    if draft is None or draft.kind == "model" or device.type != "cpu" or native_bf16():
        return False
    print("--adaptive auto: on (this CPU has no native bf16 matrix instructions, so the draft forward often costs more "
          "than the tokens it saves: AR steps replace it wherever they have been faster; --no-adaptive: off)",
          file=sys.stderr)
    return True


def check_openmp_wait_policy(device: torch.device) -> None:
    """Warns, in one line, where OMP_WAIT_POLICY=passive tells OpenMP's threads to sleep as soon as a parallel loop
    ends: a decode step on a CPU runs its loops back to back, and each would then wake the threads again. Compiled
    decoding of the default model ran 2 to 3 times slower so (BENCHMARKS.md, section 49)."""
    if device.type == "cpu" and os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive":
        print("warning: OMP_WAIT_POLICY=passive puts OpenMP's threads to sleep between the parallel loops of every "
              "decode step: compiled decoding ran 2 to 3 times slower so on a 2-core CPU (BENCHMARKS.md, "
              "section 49); unset it for speed", file=sys.stderr)


def load(checkpoint: Path, device: torch.device, dtype: torch.dtype) -> tuple[Transformer, Tokenizer]:
    if not Path(checkpoint).exists() and Path(checkpoint).resolve() == DEFAULT_CHECKPOINT:
        raise UsageError(f"{checkpoint} is missing: run `make demo` (or scripts/convert_gguf.py --default) first")
    check_openmp_wait_policy(device)
    model = load_model(checkpoint, device, dtype)
    native = native_bf16() if device.type == "cpu" else []
    # without native bf16, many bfloat16 rows (a prefill) multiply faster in float32 (model.FLOAT32_MATMUL)
    model_py.FLOAT32_MATMUL = device.type == "cpu" and not native
    if device.type == "cpu" and "amx_bf16" not in native:
        # attention in float32 unless the CPU has AMX: without native bf16, bf16 attention over a long cache is
        # several times slower (BENCHMARKS.md, section 5), and with AVX512_BF16 alone PyTorch's bf16 attention of one
        # query is too (the AR step's attention at 512 positions: 7.3 ms in bf16, 2.0 ms in float32; section 9)
        model.attention_dtype = torch.float32
        # The cache itself stays in the model's dtype where the decode steps' attention kernel reads it
        # (cpu_kernels.attend sums in float32 from a bfloat16 cache: half the bytes of a float32 one, the same
        # numbers, as the keys and values come out of bfloat16 maps); elsewhere a bfloat16 cache would be copied to
        # float32 for every step.
        if not cpu_kernels.may_attend():
            model.kv_dtype = torch.float32
    return model, Tokenizer(checkpoint)


def encode_prompt(tokenizer: Tokenizer, messages: list[dict], chat: bool) -> list[int]:
    for m in messages:
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python's argv as lone surrogates
            raise UsageError("the prompt is not valid UTF-8 text") from None
    tokens = (tokenizer.encode(tokenizer.apply_chat_template(messages), bos=False) if chat
              else tokenizer.encode(messages[-1]["content"]))
    if not tokens:
        raise UsageError("the prompt is empty: give some text with --prompt (or drop --no-chat)")
    return tokens


def tree_gamma(tree: Optional[s3d.Tree], gamma: Optional[int]) -> Optional[int]:
    """g of a draft: a tree's depth when there is a tree (--gamma may only repeat it), else --gamma."""
    if tree is None:
        return gamma
    if gamma is not None and gamma != tree.depth:
        raise UsageError(f"--tree {tree} is {tree.depth} deep, so it drafts g = {tree.depth}: drop --gamma {gamma}")
    return tree.depth


# --draft_weights: what the S3D draft's layers read; auto: int8 where it measured faster (s3d.int8_draft)
DRAFT_WEIGHTS = {"auto": None, "int8": True, "target": False}
DRAFT_WEIGHTS_HELP = ("the S3D draft's layers: int8 copies of the weights with the adapters folded in (half the bytes "
                      "to read; the output is still the target's), or the target's own; auto (default): int8 when "
                      "compiled on a CPU with bfloat16 weights and cpu_kernels' int8 kernel (AVX2 or AVX512_VNNI)")


def make_draft(model: Transformer, kind: Optional[str], gamma: Optional[int] = None,
               skip: Optional[tuple[int, int]] = None, heads: Optional[Path] = None, rank: int = 8,
               draft_checkpoint: Optional[Path] = None, tree: Optional[s3d.Tree | str] = None,
               draft_weights: str = "auto") -> Optional[s3d.Draft]:
    """The draft settings from the command line's, with every default and check in one place: the skip range
    defaults to the heads' (or the middle third), g to the tree's depth, else the heads' (default_gamma; or 4), and
    may not exceed the heads'; S3D without a heads file gets fresh, untrained heads (attached to model). tree may also
    be 'auto' (default_tree for the model's device and g; printed) or 'chain'. draft_weights: one of DRAFT_WEIGHTS.
    None when kind is None: plain AR."""
    auto = tree == "auto"
    if tree == "chain" and kind != "s3d":
        raise UsageError("--tree chain is for the S3D draft: add --s3d HEADS")
    if tree in ("auto", "chain"):
        tree = None
    if tree is not None:
        if kind is None:
            raise UsageError("--tree verifies the S3D draft's candidates: add --s3d HEADS")
        if kind != "s3d":
            raise UsageError(f"--tree verifies the S3D draft's candidates, not the {kind} draft's")
        gamma = tree_gamma(tree, gamma)
    if draft_weights == "int8" and kind != "s3d":
        raise UsageError("--draft_weights int8 is for the S3D draft: add --s3d HEADS")
    if kind is None:
        return None
    n_layer = model.config.n_layer
    skip = check_skip(skip, n_layer) if skip is not None else None
    if kind == "s3d":
        device = model.output.weight.device
        if heads is not None:
            model.set_heads(load_heads(heads, model.config))
        else:
            print("note: --draft s3d without --s3d uses fresh, untrained heads: lossless, but few drafts are accepted",
                  file=sys.stderr)
            model.set_heads(new_heads(model, skip or middle_third(n_layer), gamma or 4, rank))
        gamma = check_gamma(gamma or default_gamma(model.heads.gamma, device), model.heads)
        if auto:
            tree = default_tree(device, gamma)
            print(f"--tree auto: {tree or 'the chain'} (a {device.type} device)", file=sys.stderr)
        draft = s3d.Draft("s3d", gamma, model.heads.skip, tree=tree, int8=DRAFT_WEIGHTS[draft_weights])
        s3d.check_draft(model, draft)
        return draft
    if kind == "model":
        if draft_checkpoint is None:
            raise UsageError("the model draft needs --draft_checkpoint")
        small = load_model(draft_checkpoint, model.output.weight.device, model.tok_embeddings.weight.dtype)
        if small.config.vocab_size != model.config.vocab_size:
            raise UsageError(f"the draft model's vocabulary ({small.config.vocab_size}) differs from the "
                             f"target's ({model.config.vocab_size})")
        return s3d.Draft("model", check_gamma(gamma or 4), model=small)
    return s3d.Draft("skip", check_gamma(gamma or 4), skip or middle_third(n_layer))


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


def return_freed_memory() -> None:
    """Collects garbage (such as what compilation leaves) and, on Linux, returns the freed heap to the system: peak
    memory is the resident set, which freed memory otherwise stays in."""
    gc.collect()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cpu_name() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    except OSError:
        names = []
    bf16 = ", ".join(cpu_bf16_flags()) or "no native bf16"
    return f"{names[0] if names else platform.machine()} ({torch.backends.cpu.get_cpu_capability()}; {bf16})"


def machine_line() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()
    return (f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{datetime.date.today().isoformat()}")


@torch.no_grad()
def perplexity(model: Transformer, tokens: list[int], window: int = 512) -> float:
    """exp(mean next-token negative log-likelihood) over the text, in consecutive windows of `window` tokens."""
    model.setup_caches(1, window)
    device = model.output.weight.device
    return windowed_perplexity(tokens, window, lambda chunk: model(
        torch.tensor([chunk], device=device), torch.arange(len(chunk), device=device))[0, :-1].float())


def windowed_perplexity(tokens: list[int], window: int, logits_of: Callable[[list[int]], torch.Tensor]) -> float:
    """perplexity's windows and sum, for any scorer: logits_of(chunk) gives the logits after each of chunk's tokens
    but the last (peers.llama_cpp_perplexity scores llama.cpp's in the same windows)."""
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window - 1):
        chunk = tokens[start:start + window]
        logits = logits_of(chunk)
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:], device=logits.device),
                                                 reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)
