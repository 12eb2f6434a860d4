"""Weight-only quantization with torchao: int8 (one scale per output channel) or int4 (one scale per group of
--groupsize input weights) for every linear map of the transformer blocks.

    python quantize.py --mode int8                       # writes checkpoints/SmolLM2-135M-Instruct/model-int8.pt
    python generate.py --quantize int8 --compile         # loads that file, or quantizes on load if there is none
    python quantize.py --perplexity --modes none int8    # perplexity of data/perplexity.txt per format

Activations are bfloat16 by default: Inductor turns `x @ w_int8.to(bfloat16) * scale` into its weight-only int8
GEMM, which reads one byte per weight; with float32 activations, freezing folds the dequantized weights back into
float32 constants, and eager PyTorch's float32 int8 kernel is slow, so float32 gains nothing (BENCHMARKS.md, 5).

What stays in high precision, and why: the S3D draft adapters (small, and trained in float); the token embeddings
(a lookup, not a matmul); a tied output head (quantizing it would keep a second copy of the embedding). The draft
and the verify forward run on the same quantized weights, so S3D's output is exactly the quantized model's.
"""
import argparse
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from model import CheckpointError, Transformer

MODES = ("int8", "int4")
PERPLEXITY_TEXT = Path(__file__).resolve().parent / "data" / "perplexity.txt"


class QuantizeError(Exception):
    """An unsupported format or device: one line, exit code 2."""


def check_supported(mode: str, device: torch.device, groupsize: int = 128) -> None:
    if mode not in MODES:
        raise QuantizeError(f"unknown quantization {mode!r} (choose from {', '.join(MODES)})")
    if mode == "int4" and device.type != "cuda":
        import torchao

        raise QuantizeError(f"int4 weight-only needs a CUDA GPU: torchao {torchao.__version__} has no CPU int4 kernel; "
                            "on a CPU use --quantize int8")
    if mode == "int4" and groupsize not in (32, 64, 128, 256):
        raise QuantizeError(f"--groupsize must be 32, 64, 128 or 256 for int4, got {groupsize}")


def quantized_layers(model: Transformer):
    """The filter for torchao's quantize_: the blocks' linear maps, and the output head unless it is tied."""
    tied = model.output.weight is model.tok_embeddings.weight

    def keep(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and (name.startswith("layers.") or (name == "output" and not tied))

    return keep


def quantize(model: Transformer, mode: str, groupsize: int = 128) -> Transformer:
    """Quantizes model's weights in place (heads are left alone: attach them before or after)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    device = model.tok_embeddings.weight.device
    check_supported(mode, device, groupsize)
    if mode == "int4" and model.tok_embeddings.weight.dtype != torch.bfloat16:
        raise QuantizeError("int4 runs in bfloat16: add --dtype bfloat16")
    heads, model.heads = model.heads, None  # never quantize the draft adapters
    config = Int8WeightOnlyConfig() if mode == "int8" else \
        Int4WeightOnlyConfig(group_size=groupsize, int4_packing_format="tile_packed_to_4d")
    quantize_(model, config, filter_fn=quantized_layers(model))
    model.heads = heads
    model.quantization = mode if mode == "int8" else f"int4 (groupsize {groupsize})"
    return model


def quantized_path(folder: Path, mode: str, groupsize: int = 128, dtype: torch.dtype = torch.bfloat16) -> Path:
    """model-int8.pt, model-int4-g128.pt; a name ends in the activations' dtype unless it is bfloat16, since the
    scales and the float weights are stored in that dtype."""
    name = f"model-{mode}" + ("" if mode == "int8" else f"-g{groupsize}")
    return Path(folder) / (name + ("" if dtype == torch.bfloat16 else "-" + str(dtype).removeprefix("torch.")) + ".pt")


def save_quantized(model: Transformer, path: Path) -> None:
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.")}
    torch.save({"quantization": model.quantization, "fingerprint": model.config.fingerprint,
                "dtype": str(model.tok_embeddings.weight.dtype), "state_dict": state}, path)


def load_quantized(model: Transformer, path: Path) -> Transformer:
    """Replaces model's weights by those of a file written by save_quantized (for the same base model)."""
    try:
        saved = torch.load(path, map_location=model.tok_embeddings.weight.device, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} (truncated or corrupt?): {e}") from None
    if saved.get("fingerprint") != model.config.fingerprint:
        raise CheckpointError(f"{path} was quantized from other weights than {model.config.name or 'this checkpoint'}")
    if saved.get("dtype") != str(model.tok_embeddings.weight.dtype):
        raise CheckpointError(f"{path} holds weights for {saved.get('dtype')} activations, not "
                              f"{model.tok_embeddings.weight.dtype}: quantize again with that --dtype")
    model.load_state_dict(saved["state_dict"], assign=True, strict=False)
    if model.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.quantization = saved["quantization"]
    return model


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: a quantized tensor subclass counts its packed data and scales."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def memory_breakdown(model: Transformer) -> dict[str, int]:
    """Bytes of the target's weights, of the KV cache and of the S3D adapters (tied weights counted once)."""
    heads = {id(p) for p in model.heads.parameters()} if model.heads is not None else set()
    weights = sum(tensor_bytes(p) for p in model.parameters() if id(p) not in heads)
    kv = sum(tensor_bytes(b) for layer in model.layers if layer.attention.kv_cache is not None
             for b in layer.attention.kv_cache.buffers())
    adapters = sum(tensor_bytes(p) for p in model.heads.parameters()) if model.heads is not None else 0
    return {"weights": weights, "kv_cache": kv, "adapters": adapters}


@torch.no_grad()
def perplexity(model: Transformer, tokens: list[int], window: int = 512) -> float:
    """exp(mean next-token negative log-likelihood) over the text, in consecutive windows of `window` tokens."""
    model.setup_caches(1, window)
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window - 1):
        chunk = torch.tensor([tokens[start:start + window]])
        logits = model(chunk, torch.arange(chunk.shape[1]))[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def main(argv: Optional[list[str]] = None) -> None:
    from generate import DEFAULT_CHECKPOINT, DTYPES, ArgumentParser, load

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--mode", choices=MODES, help="write a quantized copy of the weights next to the checkpoint's")
    p.add_argument("--groupsize", type=int, default=128, help="int4: input weights per scale")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                   help="activations' dtype: bfloat16, the one Inductor's int8 kernels take (int4 needs it too)")
    p.add_argument("--perplexity", action="store_true", help="perplexity of --text under each of --modes")
    p.add_argument("--modes", nargs="+", default=["none", "int8"], choices=["none", *MODES])
    p.add_argument("--text", type=Path, default=PERPLEXITY_TEXT)
    args = p.parse_args(argv)
    if args.mode is None and not args.perplexity:
        p.error("choose --mode int8|int4 (write a quantized checkpoint) or --perplexity")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.mode is not None:
        check_supported(args.mode, device, args.groupsize)
        model, _ = load(args.checkpoint, device, dtype)
        t = time.perf_counter()
        quantize(model, args.mode, args.groupsize)
        out = quantized_path(args.checkpoint, args.mode, args.groupsize, dtype)
        save_quantized(model, out)
        print(f"{model.quantization} in {time.perf_counter() - t:.1f} s: {out} "
              f"({out.stat().st_size / 2**20:.0f} MiB; weights {memory_breakdown(model)['weights'] / 2**20:.0f} MiB)")
    if args.perplexity:
        for mode in args.modes:
            if mode != "none":
                check_supported(mode, device, args.groupsize)
        print(f"| weights | perplexity of {args.text.name} | weight memory |\n|---|---|---|")
        for mode in args.modes:
            model, tokenizer = load(args.checkpoint, device, dtype)
            tokens = tokenizer.encode(args.text.read_text())
            if mode != "none":
                quantize(model, mode, args.groupsize)
            print(f"| {str(dtype).removeprefix('torch.') if mode == 'none' else model.quantization} "
                  f"| {perplexity(model, tokens):.3f} | {memory_breakdown(model)['weights'] / 2**20:.0f} MiB |", flush=True)


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, QuantizeError) as e:
        print(f"quantize.py: error: {e}", file=sys.stderr)
        sys.exit(2)
