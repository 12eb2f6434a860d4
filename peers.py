"""Other engines on exactly our weights, for side-by-side measurement in bench.py: transformers' generate() (its
Llama model, built from our weights by scripts/hf_format.py) and llama.cpp (llama-cpp-python, `make peers`), on a
GGUF written from the GGUF our checkpoint was converted from, beside our own decoding, eager and compiled.
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import cli
import s3d
from checkpoint import UsageError, find_default_gguf
from model import Transformer

PROMPT = "Write a short story about a robot who learns to paint."


def transformers_copy(model: Transformer) -> torch.nn.Module:
    try:
        from scripts.hf_format import to_transformers

        return to_transformers(model)
    except ImportError:
        raise UsageError("the transformers comparison needs transformers (pip install -r requirements-dev.txt)") from None


def hf_decode_rate(hf: torch.nn.Module, prompt: list[int], n: int) -> float:
    """transformers generate() for exactly n tokens, minus a 1-token generate (its prefill), per decoded token."""
    ids = torch.tensor([prompt], device=next(hf.parameters()).device)

    def timed(k):
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    return (n - 1) / (timed(n) - timed(1))


def hf_generate(hf: torch.nn.Module, prompt: list[int], max_new_tokens: int, eos_ids: set[int],
                sampling: s3d.Sampling) -> s3d.Result:
    """transformers generate() on the same weights, timed like ours: a streamer marks the first new token."""
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        calls, first = 0, None

        def put(self, value):  # called once with the prompt, then once per new token
            self.calls += 1
            self.first = time.perf_counter() if self.calls == 2 else self.first

        def end(self):
            pass

    streamer = FirstToken()
    t0 = time.perf_counter()
    mode = dict(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k or 0,
                top_p=sampling.top_p or 1.0) if sampling.temperature > 0 else dict(do_sample=False)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids),
                      pad_token_id=sorted(eos_ids)[0], streamer=streamer, **mode)[0, len(prompt):].tolist()
    t1 = time.perf_counter()
    first = streamer.first or t1
    return s3d.Result(out, time_to_first_token=first - t0, decode_time=t1 - first)


def ours_decode_rate(model: Transformer, prompt: list[int], n: int, compile: bool) -> float:
    """Decode tokens/s of one greedy run of exactly n tokens (EOS ignored), prefill excluded."""
    r = s3d.ar_generate(model, prompt, n, compile=compile)
    return (len(r.tokens) - 1) / r.decode_time


# llama.cpp: the GGUF types of our dtypes, and of our w8a8 weights (int8 weights and rows, as Q8_0's, which scales
# blocks of 32 weights where ours scales a whole output channel); norms and other 1-D tensors stay F32, as llama.cpp's
# converter keeps them
GGUF_TYPES = {"float32": "F32", "bfloat16": "BF16", "w8a8": "Q8_0"}


def llama_cpp_unusable(args, flag: str) -> Optional[str]:
    """Why `flag` cannot run llama.cpp with these arguments (bench.py --methods llama.cpp, quantize.py --llama_cpp),
    or None: llama-cpp-python is not installed, or there is no GGUF to write its copy of our weights from."""
    if not llama_cpp_available():
        return f"{flag} needs llama-cpp-python: make peers"
    if gguf_source(args) is None:
        return f"{flag} needs the GGUF this checkpoint was converted from: give it with --gguf"
    return None


def gguf_source(args) -> Optional[Path]:
    """The GGUF the checkpoint was converted from (llama.cpp runs a copy of it): --gguf, or the embedded model's."""
    if args.gguf is None and args.checkpoint.resolve() == cli.DEFAULT_CHECKPOINT.resolve():
        return find_default_gguf()
    return args.gguf


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def export_gguf(source: Path, out: Path, gguf_type: str) -> Path:
    """A copy of the GGUF `source` (the file our checkpoint came from) with every matrix in gguf_type: the same
    weights as ours in the same precision (we too dequantize the source to float32, then cast to our dtype or round
    to int8)."""
    import gguf
    from gguf.quants import dequantize, quantize

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(out, reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for f in reader.fields.values():
        if f.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE) or f.name.startswith("GGUF."):
            continue
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    qtype = gguf.GGMLQuantizationType[gguf_type]
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
                          "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    for t in reader.tensors:
        weights = dequantize(t.data, t.tensor_type).astype("float32")
        if weights.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(t.name, weights)
        else:
            writer.add_tensor(t.name, quantize(weights, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def llama_cpp_rate(llm, prompt: list[int], n: int) -> tuple[float, float]:
    """llama.cpp's (llama_cpp_model's) decoding tokens/s after the prompt (one token per forward, as llama-bench's
    generation test), and the cost of a 5-token forward in 1-token forwards at the same position (a verify-like
    batch)."""
    llm.reset()
    llm.eval(prompt)
    t = time.perf_counter()
    for _ in range(n):
        llm.eval([prompt[-1]])
    rate = n / (time.perf_counter() - t)

    def forward_s(k: int) -> float:
        times = []
        for _ in range(9):
            llm.n_tokens = len(prompt)  # back to the end of the prompt: the forward overwrites what follows it
            t = time.perf_counter()
            llm.eval(prompt[-k:])
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    return rate, forward_s(5) / forward_s(1)


def llama_cpp_model(gguf_source: Path, weights: str, n_ctx: int, folder: Path, logits_all: bool = False):
    """llama.cpp on a GGUF of our weights in the GGUF type of `weights` (a dtype, or w8a8), written into folder,
    with as many threads as torch; logits_all keeps every position's logits (for llama_cpp_perplexity)."""
    import llama_cpp

    gguf_type = GGUF_TYPES[weights]
    path = export_gguf(gguf_source, folder / f"model-{gguf_type}.gguf", gguf_type)
    threads = torch.get_num_threads()
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                           verbose=False)


def llama_cpp_perplexity(llm, tokens: list[int], window: int = 512) -> float:
    """cli.perplexity of llama.cpp (a llama_cpp_model with logits_all, n_ctx >= window): the same tokens, in the same
    windows, scored by its logits."""
    def logits_of(chunk: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(chunk)
        return torch.from_numpy(llm.scores[:len(chunk) - 1]).double()

    return cli.windowed_perplexity(tokens, window, logits_of)


def llama_cpp_generate(llm, prompt: list[int], max_new_tokens: int, eos_ids: set[int],
                       sampling: s3d.Sampling) -> s3d.Result:
    """llama.cpp's own generation loop on the same prompt, timed like ours: greedy, or sampling with the same
    temperature, top-k and top-p (its other samplers off)."""
    llm.reset()  # no reuse of the previous prompt's cache: every engine prefills the whole prompt
    mode = dict(temp=0.0) if sampling.temperature == 0 else dict(
        temp=sampling.temperature, top_k=sampling.top_k or 0, top_p=sampling.top_p or 1.0)
    out, first, t0 = [], None, time.perf_counter()
    for token in llm.generate(prompt, min_p=0.0, **mode):
        first = first or time.perf_counter()
        if s3d.emit(out, [token], max_new_tokens, eos_ids, None):
            break
    t1 = time.perf_counter()
    return s3d.Result(out, time_to_first_token=first - t0, decode_time=t1 - first)


def decode_rates(folder: Path, device: torch.device, dtype_name: str, n: int, repeats: int,
                 gguf_source: Optional[Path] = None) -> tuple[list[tuple], int]:
    """(dtype, engine, median tokens/s[, note]) of ours eager, ours compiled, transformers, and llama.cpp when it is
    installed and the checkpoint came from the GGUF gguf_source, in one dtype; and the prompt's length."""
    model, tok = cli.load(folder, device, cli.DTYPES[dtype_name])
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    hf = transformers_copy(model)
    engines = [("ours, eager", lambda: ours_decode_rate(model, prompt, n, False)),
               ("ours, --compile", lambda: ours_decode_rate(model, prompt, n, True)),
               ("transformers generate()", lambda: hf_decode_rate(hf, prompt, n))]
    ratios = []  # llama.cpp's 5-token / 1-token forward cost, from each of its runs

    def llama_cpp(llm) -> float:
        rate, ratio = llama_cpp_rate(llm, prompt, n)
        ratios.append(ratio)
        return rate

    with tempfile.TemporaryDirectory() as tmp:
        if gguf_source is not None and device.type == "cpu" and dtype_name in GGUF_TYPES and llama_cpp_available():
            llm = llama_cpp_model(gguf_source, dtype_name, len(prompt) + n + 16, Path(tmp))
            engines.append((f"llama.cpp {GGUF_TYPES[dtype_name]}", lambda: llama_cpp(llm)))
        rows = timed_rates(engines, dtype_name, repeats)
    if ratios:
        rows[-1] += (f"a 5-token forward costs {statistics.median(ratios):.2f} 1-token ones",)
    return rows, len(prompt)


def timed_rates(engines: list[tuple[str, Callable[[], float]]], dtype_name: str, repeats: int) -> list[tuple]:
    """Each engine once to warm up (and compile), then `repeats` timed runs: (dtype, engine, median tokens/s)."""
    rows = []
    with torch.no_grad():
        for name, rate in engines:
            rate()
            runs = [rate() for _ in range(repeats)]
            rows.append((dtype_name, name, statistics.median(runs)))
            print(f"{dtype_name:9} {name:24} median {statistics.median(runs):6.1f} tokens/s "
                  f"({', '.join(f'{r:.1f}' for r in runs)})", file=sys.stderr)
    return rows
