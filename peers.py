"""Other engines on exactly our weights, for side-by-side measurement in bench.py: transformers' generate() (its
Llama model, built from our weights by scripts/hf_format.py), beside our own decoding, eager and compiled.
"""
import statistics
import sys
import time
from pathlib import Path

import torch

import cli
import s3d
from checkpoint import UsageError
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


def decode_rates(folder: Path, device: torch.device, dtype_name: str, n: int, repeats: int) -> tuple[list[tuple], int]:
    """(dtype, engine, median tokens/s) of ours eager, ours compiled and transformers, in one dtype; prompt length."""
    model, tok = cli.load(folder, device, cli.DTYPES[dtype_name])
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    hf, rows = transformers_copy(model), []
    with torch.no_grad():
        for name, rate in [("ours, eager", lambda: ours_decode_rate(model, prompt, n, False)),
                           ("ours, --compile", lambda: ours_decode_rate(model, prompt, n, True)),
                           ("transformers generate()", lambda: hf_decode_rate(hf, prompt, n))]:
            rate()  # warm-up (and compilation) outside the timed runs
            runs = [rate() for _ in range(repeats)]
            rows.append((dtype_name, name, statistics.median(runs)))
            print(f"{dtype_name:9} {name:24} median {statistics.median(runs):6.1f} tokens/s "
                  f"({', '.join(f'{r:.1f}' for r in runs)})", file=sys.stderr)
    return rows, len(prompt)
