"""Command line: write a quantized copy of a checkpoint's weights (torchao int8 or int4 weight-only), and measure
the perplexity of each format.

    python quantize.py --mode int8                       # writes checkpoints/SmolLM2-135M-Instruct/model-int8.pt
    python generate.py --quantize int8 --compile         # loads that file, or quantizes on load if there is none
    python quantize.py --perplexity --modes none int8 w8a8   # perplexity of data/perplexity.txt per format
    python quantize.py --perplexity --modes none w8a8 --llama_cpp   # and llama.cpp's, on BF16 and Q8_0 GGUFs

w8a8 (int8 weights and activations, checkpoint.quantize_w8a8) is made on load in under a second: no file.

int8 keeps one scale per output channel, int4 one per group of --groupsize input weights. Activations are bfloat16
by default: Inductor turns `x @ w_int8.to(bfloat16) * scale` into its weight-only int8 GEMM, which reads one byte
per weight; with float32 activations, freezing folds the dequantized weights back into float32 constants, and
eager PyTorch's float32 int8 kernel is slow, so float32 gains nothing (BENCHMARKS.md, section 5). What is
quantized and what is not is said in checkpoint.py.
"""
import tempfile
import time
from pathlib import Path
from typing import Optional

import checkpoint
import cli
import peers
from checkpoint import QUANTIZATIONS, UsageError
from cli import DEFAULT_CHECKPOINT, DTYPES, PERPLEXITY_TEXT


@cli.program
def main(argv: Optional[list[str]] = None) -> None:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--mode", choices=QUANTIZATIONS, help="write a quantized copy of the weights next to the checkpoint's")
    p.add_argument("--groupsize", type=int, default=128, help="int4: input weights per scale")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                   help="activations' dtype: bfloat16, the one Inductor's int8 kernels take (int4 needs it too)")
    p.add_argument("--perplexity", action="store_true", help="perplexity of --text under each of --modes")
    p.add_argument("--modes", nargs="+", default=["none", "int8"], choices=["none", *QUANTIZATIONS])
    p.add_argument("--text", type=Path, default=PERPLEXITY_TEXT)
    p.add_argument("--force", action="store_true", help="replace a quantized file that exists")
    p.add_argument("--llama_cpp", action="store_true",
                   help="with --perplexity: llama.cpp's too (make peers), on a GGUF of the same weights in the "
                        "same format: float32 or bfloat16 beside none, Q8_0 beside w8a8")
    p.add_argument("--gguf", type=Path, help="for --llama_cpp: the GGUF the checkpoint was converted from "
                   "(default: the embedded model's)")
    args = p.parse_args(argv)
    if args.mode is None and not args.perplexity:
        p.error("choose --mode int8|int4 (write a quantized checkpoint) or --perplexity")
    device = cli.resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    if args.llama_cpp:
        if not args.perplexity:
            p.error("--llama_cpp measures perplexity: add --perplexity")
        if problem := peers.llama_cpp_unusable(args, "--llama_cpp"):
            p.error(problem)
        if device.type != "cpu" or args.dtype not in peers.GGUF_TYPES:
            p.error("--llama_cpp runs on the CPU, with --dtype float32 or bfloat16")
        if args.gguf is not None and not args.gguf.is_file():
            p.error(f"--gguf {args.gguf}: no such file")
    if args.perplexity:
        text = checkpoint.read_text_file(args.text, "--text")
    if args.mode == "w8a8":
        p.error("--mode w8a8 is made on load in under a second (generate.py --quantize w8a8): there is no file to write")
    if args.mode is not None:
        checkpoint.check_quantization(args.mode, device, args.groupsize)
        out = checkpoint.check_output(checkpoint.quantized_path(args.checkpoint, args.mode, args.groupsize, dtype),
                                      args.force, flag="--mode")
        model, _ = cli.load(args.checkpoint, device, dtype)
        t = time.perf_counter()
        checkpoint.quantize(model, args.mode, args.groupsize)
        checkpoint.save_quantized(model, out)
        print(f"{model.quantization} in {time.perf_counter() - t:.1f} s: {out} ({out.stat().st_size / 2**20:.0f} MiB; "
              f"weights {checkpoint.memory_breakdown(model)['weights'] / 2**20:.0f} MiB)")
    if args.perplexity:
        for mode in args.modes:
            if mode != "none":
                checkpoint.check_quantization(mode, device, args.groupsize)
        print(f"| weights | perplexity of {args.text.name} | weight memory |\n|---|---|---|")
        for mode in args.modes:
            model, tokenizer = cli.load(args.checkpoint, device, dtype)
            tokens = tokenizer.encode(text)
            if len(tokens) < 2:
                raise UsageError(f"--text {args.text} holds fewer than 2 tokens: nothing to measure")
            if mode != "none":
                checkpoint.quantize(model, mode, args.groupsize)
            print(f"| {str(dtype).removeprefix('torch.') if mode == 'none' else model.quantization} "
                  f"| {cli.perplexity(model, tokens):.3f} | "
                  f"{checkpoint.memory_breakdown(model)['weights'] / 2**20:.0f} MiB |", flush=True)
            weights = args.dtype if mode == "none" else mode  # (int8 and int4 have no GGUF of the same format)
            if args.llama_cpp and weights in peers.GGUF_TYPES:
                with tempfile.TemporaryDirectory() as folder:
                    llm = peers.llama_cpp_model(peers.gguf_source(args), weights, 512, Path(folder), logits_all=True)
                    size = next(Path(folder).glob("*.gguf")).stat().st_size
                    print(f"| llama.cpp {peers.GGUF_TYPES[weights]} | {peers.llama_cpp_perplexity(llm, tokens):.3f} "
                          f"| {size / 2**20:.0f} MiB (the file) |", flush=True)


if __name__ == "__main__":
    main()
